"""trainer promote against the real GCS server (fake-gcs-server honours generation preconditions).

Candidates are job_dir look-alikes: promote copies files and never loads the model, so a
placeholder saved_model.pb next to a real metadata.json and eval/metrics.json is enough.
"""

import json
import os
import threading

import pytest
from helpers import run_trainer

from trainer.errors import UserError
from trainer.evaluate import gate
from trainer.formats import production as production_layout
from trainer.infra import cas, folders, storage
from trainer.release import promote


def make_candidate(root, name, accuracy, versus=None, passed=True, classes=("cats", "dogs"), split="test"):
    """Writes a candidate job_dir under `root`; returns its URL.

    Its metrics.json is what `trainer evaluate` writes: the model's id, and with `versus`
    (a production location) the paired comparison with the version production serves now, whose
    decision is `passed`.
    """
    job_dir = storage.join(root, "runs", name)
    model = storage.join(job_dir, "model")
    storage.write_bytes(storage.join(model, "saved_model.pb"), b"saved model of " + name.encode())
    storage.write_bytes(storage.join(model, "variables", "variables.index"), b"index " + name.encode())
    storage.write_bytes(storage.join(model, "variables", "variables.data-00000-of-00001"),
                        os.urandom(64 * 1024))
    storage.write_json(storage.join(model, "metadata.json"), {
        "classes": list(classes), "image_size": 32, "backbone": "tiny", "num_classes": len(classes)})
    correct = round(accuracy * 100)
    metrics = {
        "split": split, "examples": 100, "loss": 0.3, "accuracy": accuracy, "classes": list(classes),
        "per_class": {name: {"precision": accuracy, "recall": accuracy, "f1": accuracy, "support": 50}
                      for name in classes},
        "confusion_matrix": [[correct // 2, 50 - correct // 2], [50 - (correct - correct // 2),
                                                                 correct - correct // 2]],
        "model": model, "data": storage.join(root, "data", "dataset.json"), "model_id": folders.tree_digest(model)}
    if versus:
        pointer = latest(versus)
        served = storage.join(versus, *pointer["model"].split("/"))
        metrics["comparison"] = {
            "production": {"url": versus, "version": pointer["version"], "model_id": folders.tree_digest(served),
                           "classes": storage.read_json(storage.join(served, "metadata.json"))["classes"]},
            "passed": passed, "reason": f"{'not ' if passed else ''}significantly worse: accuracy {accuracy:.4f} "
                                        "vs production's ... (McNemar p=0.01)"}
    storage.write_json(storage.join(job_dir, "eval", "metrics.json"), metrics)
    storage.write_text(storage.join(job_dir, "eval", "report.html"), "<!DOCTYPE html>")  # written last
    return job_dir


def latest(production):
    return json.loads(storage.read_bytes(storage.join(production, "LATEST")))


def versions(production):
    return sorted({relative.split("/")[0]
                   for relative, _ in folders.list_files(storage.join(production, "versions"))})


def assert_model_copied_whole(candidate, production, version):
    source = storage.join(candidate, "model")
    target = storage.join(production, "versions", version, "model")
    files = folders.list_files(source)
    assert folders.list_files(target) == files
    for relative, _ in files:
        parts = relative.split("/")
        assert (storage.read_bytes(storage.join(target, *parts))
                == storage.read_bytes(storage.join(source, *parts)))


def test_first_and_better_candidates_are_promoted_previous_stays(gcs_bucket, caplog):
    production = f"{gcs_bucket}/production"
    first = make_candidate(gcs_bucket, "first", 0.90)
    first_version = promote.promote(first, production)

    pointer = latest(production)
    assert pointer["version"] == first_version
    assert pointer["candidate"] == first and pointer["accuracy"] == 0.90
    assert pointer["model"] == f"versions/{first_version}/model"
    assert_model_copied_whole(first, production, first_version)
    folder = storage.join(production, "versions", first_version)
    assert storage.read_json(storage.join(folder, "metrics.json"))["accuracy"] == 0.90
    assert json.loads(storage.read_bytes(storage.join(folder, "COMPLETE"))) == pointer

    better = make_candidate(gcs_bucket, "better", 0.93, versus=production)
    with caplog.at_level("INFO", logger="absl"):
        better_version = promote.promote(better, production)
    assert better_version != first_version
    assert latest(production)["version"] == better_version
    assert_model_copied_whole(better, production, better_version)
    # The previous version is untouched and addressable; the log says how to go back to it.
    assert versions(production) == sorted([first_version, better_version])
    assert_model_copied_whole(first, production, first_version)
    rollback = f"gcloud storage cp {folder}/COMPLETE {production}/LATEST"
    assert rollback in caplog.text


def test_promoting_the_production_candidate_again_changes_nothing(gcs_bucket):
    production = f"{gcs_bucket}/production"
    candidate = make_candidate(gcs_bucket, "once", 0.9)
    version = promote.promote(candidate, production)
    before = storage.read_bytes(storage.join(production, "LATEST"))
    assert promote.promote(candidate + "/", production) == version  # e.g. a retried CronJob pod
    # The same model in another folder (`./jp` for `jp`, a copy) is the same candidate: its content decides.
    copy = storage.join(gcs_bucket, "copies", "once")
    folders.copy_tree(candidate, copy)
    assert promote.promote(copy, production) == version
    assert storage.read_bytes(storage.join(production, "LATEST")) == before
    assert versions(production) == [version]


def test_failing_candidate_is_not_promoted_through_the_cli(gcs_bucket):
    production = f"{gcs_bucket}/production"
    good = make_candidate(gcs_bucket, "good", 0.90)
    version = promote.promote(good, production)
    pointer_before = storage.read_bytes(storage.join(production, "LATEST"))

    worse = make_candidate(gcs_bucket, "worse", 0.85, versus=production, passed=False)
    result = run_trainer("promote", f"--candidate={worse}", f"--production={production}", timeout=300)
    assert result.returncode == 1, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "not promoted: significantly worse" in error_lines[0]
    assert "0.8500" in error_lines[0] and "Traceback" not in result.stderr
    assert storage.read_bytes(storage.join(production, "LATEST")) == pointer_before
    assert versions(production) == [version]  # nothing copied

    # A candidate the paired test does not find worse passes, through the same command line.
    close = make_candidate(gcs_bucket, "close", 0.895, versus=production, passed=True)
    result = run_trainer("promote", f"--candidate={close}", f"--production={production}", timeout=300)
    assert result.returncode == 0, result.stderr
    assert latest(production)["candidate"] == close


def test_min_accuracy_gates_the_first_promotion(gcs_bucket):
    production = f"{gcs_bucket}/production"
    candidate = make_candidate(gcs_bucket, "weak", 0.6)
    with pytest.raises(gate.GateFailed, match="below --min_accuracy"):
        promote.promote(candidate, production, min_accuracy=0.8)
    assert not storage.exists(storage.join(production, "LATEST"))
    assert not storage.exists(storage.join(production, "versions"))


def test_candidate_without_evaluation_is_a_user_error(gcs_bucket):
    candidate = make_candidate(gcs_bucket, "unevaluated", 0.9)
    storage.remove(storage.join(candidate, "eval"), recursive=True)
    with pytest.raises(UserError, match="eval/metrics.json is missing"):
        promote.promote(candidate, f"{gcs_bucket}/production")


def test_an_evaluation_that_did_not_finish_is_refused(gcs_bucket):
    # metrics.json is written first, report.html last: an evaluation that died between the two
    # (a picture that failed, a killed pod) left a metrics.json promote must not act on.
    candidate = make_candidate(gcs_bucket, "half-evaluated", 0.9)
    storage.remove(storage.join(candidate, "eval", "report.html"))
    with pytest.raises(UserError, match="did not finish .*report.html, written last, is missing"):
        promote.promote(candidate, f"{gcs_bucket}/production")
    assert not storage.exists(f"{gcs_bucket}/production/LATEST")


def test_crash_after_copying_leaves_production_unchanged(gcs_bucket, monkeypatch):
    production = f"{gcs_bucket}/production"
    old_version = promote.promote(make_candidate(gcs_bucket, "old", 0.90), production)
    pointer_before = storage.read_bytes(storage.join(production, "LATEST"))
    new = make_candidate(gcs_bucket, "new", 0.95, versus=production)

    class Crash(BaseException):  # like the process dying: nothing catches it
        pass

    real_copy_model = promote.copy_model

    def copy_then_crash(source, destination):
        real_copy_model(source, destination)
        raise Crash

    monkeypatch.setattr(promote, "copy_model", copy_then_crash)
    with pytest.raises(Crash):
        promote.promote(new, production)
    assert storage.read_bytes(storage.join(production, "LATEST")) == pointer_before
    crashed = [v for v in versions(production) if v != old_version]
    assert len(crashed) == 1  # the copy is there, but never marked complete nor pointed to
    assert not storage.exists(storage.join(production, "versions", crashed[0], "COMPLETE"))

    # The rerun (a later second, hence a new version name) completes the promotion.
    monkeypatch.setattr(promote, "copy_model", real_copy_model)
    monkeypatch.setattr(production_layout, "version_name", lambda model_id: "29990101T000000Z-rerun")
    assert promote.promote(new, production) == "29990101T000000Z-rerun"
    assert latest(production)["version"] == "29990101T000000Z-rerun"
    assert_model_copied_whole(new, production, "29990101T000000Z-rerun")


def test_two_concurrent_promotions_cannot_both_win(gcs_bucket, monkeypatch):
    production = f"{gcs_bucket}/production"
    base = promote.promote(make_candidate(gcs_bucket, "base", 0.80), production)
    better = make_candidate(gcs_bucket, "better", 0.95, versus=production)
    good = make_candidate(gcs_bucket, "good", 0.90, versus=production)

    # Both promotions have read the same production and passed the gate against it before either
    # moves the pointer: exactly the race the compare-and-swap must settle.
    barrier = threading.Barrier(2, timeout=120)
    real_write = cas.write_if_generation
    first_attempts, local = [], threading.local()

    def racing_write(location, data, generation):
        # Only the pointer races (each version's CLAIM is written through the same function).
        if location.endswith("/LATEST") and not getattr(local, "raced", False):
            local.raced = True
            barrier.wait()
            won = real_write(location, data, generation)
            first_attempts.append(won)
            return won
        return real_write(location, data, generation)

    monkeypatch.setattr(cas, "write_if_generation", racing_write)
    outcomes = {}

    def run(name, candidate):
        try:
            outcomes[name] = promote.promote(candidate, production)
        except Exception as error:  # noqa: BLE001 - the outcome is what the test inspects
            outcomes[name] = error

    threads = [threading.Thread(target=run, args=args)
               for args in (("better", better), ("good", good))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(first_attempts) == [False, True]  # one winner among the racers

    # The loser was compared with a version production no longer serves: it fails, saying so,
    # and its unused copy is removed.
    winner = next(name for name, outcome in outcomes.items() if isinstance(outcome, str))
    loser = "good" if winner == "better" else "better"
    assert isinstance(outcomes[loser], gate.GateFailed), outcomes[loser]
    assert "production moved to version" in str(outcomes[loser])
    assert latest(production)["version"] == outcomes[winner]
    assert versions(production) == sorted([base, outcomes[winner]])
    for version in versions(production):
        assert storage.exists(storage.join(production, "versions", version, "COMPLETE"))


def test_a_malformed_comparison_is_refused_in_one_line(gcs_bucket):
    production = f"{gcs_bucket}/production"
    promote.promote(make_candidate(gcs_bucket, "first", 0.9), production)
    candidate = make_candidate(gcs_bucket, "hand-edited", 0.95, versus=production)
    metrics_url = storage.join(candidate, "eval", "metrics.json")
    for comparison in ({"production": {}}, [1], {"production": {"version": "v", "model_id": "m", "classes": []}}):
        storage.write_json(metrics_url, {**storage.read_json(metrics_url), "comparison": comparison})
        with pytest.raises(gate.GateFailed, match="malformed comparison with production"):
            promote.promote(candidate, production)


def test_an_evaluation_of_another_model_or_split_is_refused(gcs_bucket):
    production = f"{gcs_bucket}/production"
    candidate = make_candidate(gcs_bucket, "edited", 0.9)
    # The model changed after its evaluation (or metrics.json was copied from another run).
    storage.write_bytes(storage.join(candidate, "model", "saved_model.pb"), b"another model")
    with pytest.raises(UserError, match="is not an evaluation of"):
        promote.promote(candidate, production)
    trained_on = make_candidate(gcs_bucket, "train-split", 0.99, split="train")
    with pytest.raises(UserError, match="evaluates the 'train' split"):
        promote.promote(trained_on, production)
    assert not storage.exists(storage.join(production, "LATEST"))


def test_production_must_have_been_scored_on_the_same_examples(gcs_bucket):
    production = f"{gcs_bucket}/production"
    first = promote.promote(make_candidate(gcs_bucket, "first", 0.9), production)
    alone = make_candidate(gcs_bucket, "alone", 0.99)  # evaluated without --production
    with pytest.raises(gate.GateFailed, match=f"did not score production's model \\(version {first}\\).*--production="):
        promote.promote(alone, production)
    stale = make_candidate(gcs_bucket, "stale", 0.95, versus=production)
    second = promote.promote(make_candidate(gcs_bucket, "second", 0.92, versus=production), production)
    with pytest.raises(gate.GateFailed, match=f"compared with production version {first}, but production now "
                                              f"serves {second}"):
        promote.promote(stale, production)


def test_other_classes_replace_production_only_when_allowed(gcs_bucket):
    production = f"{gcs_bucket}/production"
    promote.promote(make_candidate(gcs_bucket, "two", 0.9), production)
    three = make_candidate(gcs_bucket, "three", 0.95, versus=production, classes=("cats", "dogs", "birds"))
    with pytest.raises(gate.GateFailed, match="differ from the candidate's.*--allow_class_change"):
        promote.promote(three, production)
    assert promote.promote(three, production, allow_class_change=True) == latest(production)["version"]
    assert latest(production)["candidate"] == three


# ---- The compare-and-swap promote relies on (trainer/storage.py) -------------------------------

@pytest.mark.parametrize("where", ["gcs", "local"])
def test_write_if_generation_lets_exactly_one_racer_win(where, gcs_bucket, tmp_path):
    root = gcs_bucket if where == "gcs" else str(tmp_path)
    url = storage.join(root, "pointer")
    assert cas.read_with_generation(url) == (None, 0)
    assert cas.write_if_generation(url, b"v1", 0)
    assert not cas.write_if_generation(url, b"again", 0)  # 0: only if absent
    data, generation = cas.read_with_generation(url)
    assert data == b"v1"

    barrier = threading.Barrier(4, timeout=60)
    results = []

    def racer(index):
        barrier.wait()
        results.append(cas.write_if_generation(url, f"v2 by {index}".encode(), generation))

    threads = [threading.Thread(target=racer, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == [False, False, False, True]
    data, newer = cas.read_with_generation(url)
    assert data.startswith(b"v2 by ") and newer != generation
    assert not cas.write_if_generation(url, b"stale", generation)


def test_promote_works_on_local_folders(tmp_path):
    production = str(tmp_path / "production")
    first = promote.promote(make_candidate(str(tmp_path), "first", 0.9), production)
    with pytest.raises(gate.GateFailed):
        promote.promote(make_candidate(str(tmp_path), "second", 0.5, versus=production, passed=False), production)
    assert latest(production)["version"] == first
    assert os.path.isfile(os.path.join(production, "versions", first, "model", "saved_model.pb"))


def test_version_names_sort_by_time_and_differ_by_model():
    import datetime

    morning = datetime.datetime(2026, 11, 28, 7, 0, 0, tzinfo=datetime.timezone.utc)
    evening = morning.replace(hour=19)
    assert production_layout.version_name("0123456789abcdef", morning) == "20261128T070000Z-01234567"
    name = production_layout.version_name
    assert name("aaaaaaaa11", morning) != name("bbbbbbbb11", morning)
    assert production_layout.version_name("ffffffff", morning) < production_layout.version_name("00000000", evening)


def test_the_same_model_promoted_again_in_the_same_second_gets_the_next_name(gcs_bucket, monkeypatch):
    production = f"{gcs_bucket}/production"
    # Every promotion below happens "in the same second".
    monkeypatch.setattr(production_layout, "version_name", lambda model_id: f"20260101T000000Z-{model_id[:8]}")
    first = make_candidate(gcs_bucket, "first", 0.9)
    version_a = promote.promote(first, production)
    version_b = promote.promote(make_candidate(gcs_bucket, "second", 0.95, versus=production), production)
    # Back to the first model (a rollback through the gate): its name of this second is taken.
    metrics = storage.read_json(f"{first}/eval/metrics.json")
    served = latest(production)
    metrics["comparison"] = {"production": {"url": production, "version": served["version"],
                                            "model_id": served["model_id"], "classes": ["cats", "dogs"]},
                             "passed": True, "reason": "not significantly worse"}
    storage.write_json(f"{first}/eval/metrics.json", metrics)
    version_a2 = promote.promote(first, production)
    assert version_a2 == f"{version_a}-2" and len({version_a, version_b, version_a2}) == 3
    assert latest(production)["version"] == version_a2 and sorted(versions(production)) == sorted(
        [version_a, version_b, version_a2])
    assert_model_copied_whole(first, production, version_a2)
    # A name claimed by another promotion that is still copying is left to it, too.
    storage.write_bytes(f"{production}/versions/{version_b}-2/CLAIM", b"{}")
    third = make_candidate(gcs_bucket, "third", 0.97, versus=production)
    monkeypatch.setattr(production_layout, "version_name", lambda model_id: version_b)
    assert promote.promote(third, production) == f"{version_b}-3"


def test_versions_that_a_killed_promotion_claimed_are_removed_once_abandoned(gcs_bucket):
    import datetime

    from trainer.formats import timestamps

    production = f"{gcs_bucket}/production"
    version = promote.promote(make_candidate(gcs_bucket, "first", 0.9), production)
    for name, hours in (("20260101T000000Z-killed00", 25), ("20260101T000000Z-running0", 1)):
        claimed = (timestamps.now() - datetime.timedelta(hours=hours)).strftime(timestamps.FORMAT)
        storage.write_json(storage.join(production, "versions", name, "CLAIM"), {"candidate": "c", "claimed": claimed})
        storage.write_bytes(storage.join(production, "versions", name, "model", "saved_model.pb"), b"half")
    promote.remove_abandoned_claims(production)
    # The killed one goes; one that may still be copying, and every complete version, stay.
    assert versions(production) == sorted([version, "20260101T000000Z-running0"])


def test_promotions_register_each_version_in_mlflow_with_the_champion_alias(gcs_bucket, mlflow_server):
    from mlflow.tracking import MlflowClient

    from trainer.errors import RetryableError

    production = f"{gcs_bucket}/production"
    registry = f"mlflow://{mlflow_server.split('://', 1)[1]}/pets-{gcs_bucket[-6:]}"
    name = registry.rsplit("/", 1)[1]
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    first = promote.promote(make_candidate(gcs_bucket, "first", 0.9), production, registry_url=registry)
    second_candidate = make_candidate(gcs_bucket, "second", 0.95, versus=production)
    second = promote.promote(second_candidate, production, registry_url=registry)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["production_version"] == second and champion.version == "2"
    assert champion.tags["model_id"] == latest(production)["model_id"]
    assert champion.source == f"{production}/versions/{second}/model"
    assert client.get_model_version(name, "1").tags["production_version"] == first
    # Promoting it again registers nothing new: the alias stays on its version.
    assert promote.promote(second_candidate, production, registry_url=registry) == second
    assert len(client.search_model_versions(f"name='{name}'")) == 2
    # A registry that fails after the switch: production serves the new version, and the error says
    # how to register it.
    third = make_candidate(gcs_bucket, "third", 0.97, versus=production)
    down = f"mlflow://127.0.0.1:9/{name}"
    with pytest.raises(RetryableError, match=r"production now serves .* but registering it in mlflow://127\.0\.0\.1:9/"
                                             r".* Register it by running the promotion again: trainer promote "):
        promote.promote(third, production, registry_url=down)
    assert latest(production)["candidate"] == third
    with pytest.raises(UserError, match="--registry='vertex:/x': expected mlflow://HOST:PORT/MODEL"):
        promote.promote(third, production, registry_url="vertex:/x")
