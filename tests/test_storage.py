"""trainer/infra: local behaviour that fsspec alone would not give (permissions, links, compare-and-swap),
and the storage settings."""

import os
import stat
import threading

import pytest

from trainer.errors import UserError
from trainer.infra import cas, faults, folders, storage


def test_written_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        storage.write_text(str(tmp_path / "a" / "metrics.json"), "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "metrics.json").st_mode) == 0o644
    assert os.listdir(tmp_path / "a") == ["metrics.json"]  # no temporary left behind


def test_listing_follows_folder_links_once_and_leaves_out_dangling_ones(tmp_path):
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere" / "dogs"
    (photos / "cats").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    (photos / "cats" / "1.jpg").write_bytes(b"c")
    (elsewhere / "2.jpg").write_bytes(b"dd")
    os.symlink(elsewhere, photos / "dogs")  # a class folder kept somewhere else
    os.symlink(photos, photos / "cats" / "loop")  # a link back up: listed once, not forever
    os.symlink(tmp_path / "gone.jpg", photos / "cats" / "dangling.jpg")
    assert folders.list_files(str(photos)) == [("cats/1.jpg", 1), ("dogs/2.jpg", 2)]


def test_write_if_absent_has_exactly_one_winner_and_leaves_no_lock_file(tmp_path):
    target = str(tmp_path / "v1" / "CLAIM")
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(cas.write_if_absent(target, f"{i}".encode())))
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    assert os.listdir(tmp_path / "v1") == ["CLAIM"]


def test_a_tilde_means_home_in_every_local_path(tmp_path, monkeypatch):
    """`--source=~/photos` reaches the trainer with its `~` (no shell expands it after `=`)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    storage.write_text("~/photos/cats/a.txt", "x")
    assert (tmp_path / "photos" / "cats" / "a.txt").read_text() == "x"
    assert folders.list_files("~/photos") == [("cats/a.txt", 1)]
    assert storage.exists("~/photos/cats/a.txt") and storage.read_text("~/photos/cats/a.txt") == "x"


def test_check_writable_refuses_a_path_under_a_file_and_a_missing_bucket(tmp_path, gcs_server):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        storage.check_writable(str(tmp_path / "a-file" / "out" / "dataset.json"))
    storage.check_writable(str(tmp_path / "a-file"))  # an existing file is replaced: fine
    storage.check_writable(str(tmp_path / "new" / "deeper"))  # folders are made as needed
    with pytest.raises(UserError, match="bucket gs://no-such-bucket-here does not exist"):
        storage.check_writable("gs://no-such-bucket-here/run")



def test_listing_an_object_store_folder_by_folder_finds_exactly_what_one_listing_finds(gcs_bucket):
    import fsspec

    names = ["top.jpg", "cats/a.jpg", "cats/deep/er/b.jpg", "train/dogs/c.jpg", "train/dogs/x/y/d.png",
             "train/e.jpg", "val/cats/f.jpg", "[odd] name/g.jpg"]
    for index, name in enumerate(names):
        storage.write_bytes(f"{gcs_bucket}/root/{name}", b"x" * index)
    storage.write_bytes(f"{gcs_bucket}/rootless.jpg", b"not under root")

    listed = folders.list_files(f"{gcs_bucket}/root", with_md5=True)

    found = fsspec.filesystem("gs").find(f"{gcs_bucket.removeprefix('gs://')}/root", detail=True)
    assert [(name, size) for name, size, _ in listed] == sorted((name, names.index(name)) for name in names)
    assert all(md5 for _, _, md5 in listed) and len(found) == len(names)


def test_storage_settings_are_read_once_by_configure_and_checked():
    environ = {"TRAINER_STORAGE_TIMEOUT_SECONDS": "5", "STORAGE_EMULATOR_HOST": "http://127.0.0.1:1"}
    try:
        faults.configure(environ)
        assert faults.request_timeout_seconds() == 5.0
        # TensorFlow's own gs:// client, and gcsfs against an emulator, read these from the environment.
        assert environ["GCS_REQUEST_IDLE_TIMEOUT_SECS"] == "5" and environ["GCS_READ_REQUEST_TIMEOUT_SECS"] == "30"
        assert environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
        for bad in ("abc", "-1", "0", "inf", "nan"):
            with pytest.raises(UserError, match=f"TRAINER_STORAGE_TIMEOUT_SECONDS='{bad}' is not a positive number"):
                faults.configure({"TRAINER_STORAGE_TIMEOUT_SECONDS": bad})
    finally:
        faults.configure({})
    assert faults.request_timeout_seconds() == faults.DEFAULT_TIMEOUT_SECONDS


def test_a_bad_storage_timeout_is_a_one_line_error_of_every_command(tmp_path):
    from helpers import assert_one_line_error, run_trainer

    result = run_trainer("promote", f"--candidate={tmp_path / 'job'}", f"--production={tmp_path / 'production'}",
                         env={"TRAINER_STORAGE_TIMEOUT_SECONDS": "abc"})
    assert_one_line_error(result, "TRAINER_STORAGE_TIMEOUT_SECONDS='abc' is not a positive number of seconds")


def transient_errors():
    import aiohttp
    from gcsfs.retry import HttpError
    from google.api_core import exceptions

    return [aiohttp.ServerDisconnectedError(), aiohttp.ClientPayloadError("Response payload is not completed"),
            HttpError({"code": 503, "message": "Service Unavailable"}), HttpError({"code": 429, "message": "Slow"}),
            exceptions.TooManyRequests("rate limit"), exceptions.ServiceUnavailable("down"), TimeoutError()]


@pytest.mark.parametrize("error", transient_errors(), ids=lambda error: type(error).__name__)
def test_transport_errors_and_5xx_429_answers_of_every_client_end_as_retryable(error):
    from trainer import errors

    with pytest.raises(errors.RetryableError) as raised, faults.translate_gcs_errors("gs://bucket/data/x"):
        raise error
    assert errors.exit_status(raised.value)[0] == errors.EXIT_RETRYABLE
    assert "gs://bucket/data/x" in str(raised.value)


def test_answers_a_retry_cannot_change_are_not_made_retryable():
    from gcsfs.retry import HttpError

    with pytest.raises(UserError, match="storage refused the request for gs://bucket/x: Bad Request"), \
            faults.translate_errors("gs://bucket/x", remote=True):
        raise HttpError({"code": 400, "message": "Bad Request"})
    with pytest.raises(KeyError), faults.translate_errors("gs://bucket/x", remote=True):
        raise KeyError("a bug stays a bug")
