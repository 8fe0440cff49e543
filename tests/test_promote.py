"""trainer promote against the real GCS server (fake-gcs-server honours generation preconditions).

Candidates are job_dir look-alikes: promote copies files and never loads the model, so a
placeholder saved_model.pb next to a real metadata.json and eval/metrics.json is enough.
"""

import json
import os
import threading

import pytest
from conftest import run_trainer

from trainer import gate, promote, storage
from trainer.errors import RetryableError, UserError


def make_candidate(root, name, accuracy):
    """Writes a candidate job_dir under `root`; returns its URL."""
    job_dir = storage.join(root, "runs", name)
    model = storage.join(job_dir, "model")
    storage.write_bytes(storage.join(model, "saved_model.pb"), b"saved model of " + name.encode())
    storage.write_bytes(storage.join(model, "variables", "variables.index"), b"index " + name.encode())
    storage.write_bytes(storage.join(model, "variables", "variables.data-00000-of-00001"),
                        os.urandom(64 * 1024))
    storage.write_json(storage.join(model, "metadata.json"), {
        "classes": ["cats", "dogs"], "image_size": 32, "backbone": "tiny", "num_classes": 2})
    correct = round(accuracy * 100)
    storage.write_json(storage.join(job_dir, "eval", "metrics.json"), {
        "split": "test", "examples": 100, "loss": 0.3, "accuracy": accuracy,
        "classes": ["cats", "dogs"],
        "per_class": {name: {"precision": accuracy, "recall": accuracy, "f1": accuracy, "support": 50}
                      for name in ("cats", "dogs")},
        "confusion_matrix": [[correct // 2, 50 - correct // 2], [50 - (correct - correct // 2),
                                                                 correct - correct // 2]],
        "roc_auc": accuracy, "pr_auc": accuracy, "model": storage.join(job_dir, "model"),
        "data": storage.join(root, "data", "dataset.json")})
    return job_dir


def latest(production):
    return json.loads(storage.read_bytes(storage.join(production, "LATEST")))


def versions(production):
    return sorted({relative.split("/")[0]
                   for relative, _ in storage.list_files(storage.join(production, "versions"))})


def assert_model_copied_whole(candidate, production, version):
    source = storage.join(candidate, "model")
    target = storage.join(production, "versions", version, "model")
    files = storage.list_files(source)
    assert storage.list_files(target) == files
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

    better = make_candidate(gcs_bucket, "better", 0.93)
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
    assert storage.read_bytes(storage.join(production, "LATEST")) == before
    assert versions(production) == [version]


def test_failing_candidate_is_not_promoted_through_the_cli(gcs_bucket):
    production = f"{gcs_bucket}/production"
    good = make_candidate(gcs_bucket, "good", 0.90)
    version = promote.promote(good, production)
    pointer_before = storage.read_bytes(storage.join(production, "LATEST"))

    worse = make_candidate(gcs_bucket, "worse", 0.85)
    result = run_trainer("promote", f"--candidate={worse}", f"--production={production}",
                         "--tolerance=0.01", timeout=300)
    assert result.returncode == 1, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "not promoted" in error_lines[0]
    assert "0.8500" in error_lines[0] and "Traceback" not in result.stderr
    assert storage.read_bytes(storage.join(production, "LATEST")) == pointer_before
    assert versions(production) == [version]  # nothing copied

    # Within the tolerance it passes, through the same command line.
    close = make_candidate(gcs_bucket, "close", 0.895)
    result = run_trainer("promote", f"--candidate={close}", f"--production={production}",
                         "--tolerance=0.01", timeout=300)
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


def test_crash_after_copying_leaves_production_unchanged(gcs_bucket, monkeypatch):
    production = f"{gcs_bucket}/production"
    old_version = promote.promote(make_candidate(gcs_bucket, "old", 0.90), production)
    pointer_before = storage.read_bytes(storage.join(production, "LATEST"))
    new = make_candidate(gcs_bucket, "new", 0.95)

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
    monkeypatch.setattr(promote, "version_name", lambda candidate: "29990101T000000Z-rerun")
    assert promote.promote(new, production) == "29990101T000000Z-rerun"
    assert latest(production)["version"] == "29990101T000000Z-rerun"
    assert_model_copied_whole(new, production, "29990101T000000Z-rerun")


def test_two_concurrent_promotions_cannot_both_win(gcs_bucket, monkeypatch):
    production = f"{gcs_bucket}/production"
    base = promote.promote(make_candidate(gcs_bucket, "base", 0.80), production)
    better = make_candidate(gcs_bucket, "better", 0.95)
    good = make_candidate(gcs_bucket, "good", 0.90)

    # Both promotions have read the same production and passed the gate against it before either
    # moves the pointer: exactly the race the compare-and-swap must settle.
    barrier = threading.Barrier(2, timeout=120)
    real_write = storage.write_if_generation
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

    monkeypatch.setattr(storage, "write_if_generation", racing_write)
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

    # Whichever won the race, the loser re-checked its gate against the winner: the better model
    # ends up in production, and the worse one never replaced it.
    assert isinstance(outcomes["better"], str)
    assert latest(production)["candidate"] == better
    assert latest(production)["version"] == outcomes["better"]
    if isinstance(outcomes["good"], str):  # "good" won the race, then "better" promoted over it
        assert versions(production) == sorted([base, outcomes["good"], outcomes["better"]])
    else:  # "better" won; "good" failed the re-check and its unused copy was removed
        assert isinstance(outcomes["good"], gate.GateFailed), outcomes["good"]
        assert versions(production) == sorted([base, outcomes["better"]])
    for version in versions(production):
        assert storage.exists(storage.join(production, "versions", version, "COMPLETE"))


# ---- The compare-and-swap promote relies on (trainer/storage.py) -------------------------------

@pytest.mark.parametrize("where", ["gcs", "local"])
def test_write_if_generation_lets_exactly_one_racer_win(where, gcs_bucket, tmp_path):
    root = gcs_bucket if where == "gcs" else str(tmp_path)
    url = storage.join(root, "pointer")
    assert storage.read_with_generation(url) == (None, 0)
    assert storage.write_if_generation(url, b"v1", 0)
    assert not storage.write_if_generation(url, b"again", 0)  # 0: only if absent
    data, generation = storage.read_with_generation(url)
    assert data == b"v1"

    barrier = threading.Barrier(4, timeout=60)
    results = []

    def racer(index):
        barrier.wait()
        results.append(storage.write_if_generation(url, f"v2 by {index}".encode(), generation))

    threads = [threading.Thread(target=racer, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == [False, False, False, True]
    data, newer = storage.read_with_generation(url)
    assert data.startswith(b"v2 by ") and newer != generation
    assert not storage.write_if_generation(url, b"stale", generation)


def test_promote_works_on_local_folders(tmp_path):
    production = str(tmp_path / "production")
    first = promote.promote(make_candidate(str(tmp_path), "first", 0.9), production)
    with pytest.raises(gate.GateFailed):
        promote.promote(make_candidate(str(tmp_path), "second", 0.5), production)
    assert latest(production)["version"] == first
    assert os.path.isfile(os.path.join(production, "versions", first, "model", "saved_model.pb"))


def test_version_names_sort_by_time_and_differ_by_candidate():
    import datetime

    morning = datetime.datetime(2026, 11, 28, 7, 0, 0, tzinfo=datetime.timezone.utc)
    evening = morning.replace(hour=19)
    assert promote.version_name("gs://b/runs/a", morning) == "20261128T070000Z-" + (
        __import__("hashlib").sha256(b"gs://b/runs/a").hexdigest()[:8])
    assert promote.version_name("gs://b/runs/a", morning) != promote.version_name("gs://b/runs/b", morning)
    assert promote.version_name("gs://b/runs/z", morning) < promote.version_name("gs://b/runs/a", evening)


def test_version_already_claimed_is_retryable(gcs_bucket, monkeypatch):
    production = f"{gcs_bucket}/production"
    candidate = make_candidate(gcs_bucket, "claimed", 0.9)
    monkeypatch.setattr(promote, "version_name", lambda candidate: "20260101T000000Z-taken")
    storage.write_bytes(f"{production}/versions/20260101T000000Z-taken/CLAIM", b"{}")
    with pytest.raises(RetryableError, match="already being written"):
        promote.promote(candidate, production)
    assert not storage.exists(f"{production}/LATEST")
