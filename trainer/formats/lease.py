"""A job_dir's LEASE: which run is working there now, so that two runs never share a job_dir.

  {"run": <the launcher's run id>, "host", "pid", "expires": <epoch seconds>}

Changed only by compare-and-swap (trainer.infra.cas). Taken when absent, expired, already this run's
(a restart), or left by a dead process on this host; otherwise the run is refused. A daemon thread
renews it; losing it to another run (only possible after this one stopped renewing for
LEASE_SECONDS) ends this process.
"""

import json
import os
import socket
import threading
import time

from trainer import errors
from trainer.errors import UserError
from trainer.infra import cas, storage

# A lease not renewed for this long belongs to a run that died without releasing it (SIGKILL, a
# lost node): the next run takes it over. The holder renews it every LEASE_RENEW_SECONDS.
LEASE_SECONDS = 180
LEASE_RENEW_SECONDS = 45


def read_record(data):
    """The holder's record from a LEASE file's bytes, or None when there is none to respect.

    A lease that is not a record of this shape (not JSON, `[]`, `{"expires": "soon"}`, no pid, an
    expiry further ahead than any renewal sets it) protects nothing: it is taken over, as an
    expired one is. A live holder renews its record every LEASE_RENEW_SECONDS, so nothing is lost.
    """
    try:
        held = json.loads(data) if data else None
    except ValueError:
        return None
    fields = {"run": str, "host": str, "pid": int, "expires": (int, float)}
    if not isinstance(held, dict) or not all(isinstance(held.get(name), kind) for name, kind in fields.items()):
        return None
    if held["expires"] > time.time() + 2 * LEASE_SECONDS:  # a clock far ahead, or a hand-made lease
        return None
    return held


class Lease:
    """The LEASE at `url`, held for `run_id` once `take` returns."""

    def __init__(self, url, run_id):
        self.url, self.run_id = url, run_id
        self.generation = None
        self._stop = threading.Event()

    def _record(self):
        return json.dumps({"run": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + LEASE_SECONDS}).encode()

    def _free(self, held):
        if held is None or held["run"] == self.run_id or held["expires"] < time.time():
            return True
        # On this host, a holder whose process is gone (or whose pid is now ours) has died.
        return held["host"] == socket.gethostname() and (held["pid"] == os.getpid() or not _process_alive(held["pid"]))

    def take(self):
        for _ in range(3):  # another run may write between the read and the swap: look again
            data, generation = cas.read_with_generation(self.url)
            held = read_record(data)
            if not self._free(held):
                left = held["expires"] - time.time()
                raise UserError(
                    f"another run is using this job_dir: {held['run']} (pid {held['pid']} on {held['host']}) holds "
                    f"{self.url}; two runs must not share a job_dir. Wait for it to end, or use another --job_dir "
                    f"(a run that died without releasing it frees it within {left:.0f} s)")
            if cas.write_if_generation(self.url, self._record(), generation):
                self.generation = cas.read_with_generation(self.url)[1]
                threading.Thread(target=self._renew_forever, daemon=True, name="lease").start()
                return
        raise UserError(f"{self.url}: other runs keep taking this job_dir's lease; use another --job_dir")

    def _renew_forever(self):
        from absl import logging

        while not self._stop.wait(LEASE_RENEW_SECONDS):
            try:
                if not cas.write_if_generation(self.url, self._record(), self.generation):
                    _exit_lost(self.url)
                self.generation = cas.read_with_generation(self.url)[1]
            except Exception as error:  # noqa: BLE001 - a stalled store: try again at the next renewal
                logging.warning("could not renew %s: %s", self.url, error)

    def release(self):
        self._stop.set()
        try:
            if cas.read_with_generation(self.url)[1] == self.generation:
                storage.remove(self.url)
        except Exception:  # noqa: BLE001 - an unreleased lease only expires later
            pass


def _exit_lost(url):
    errors.exit_process(errors.EXIT_BAD_INPUT, f"error: lost {url} to another run (this one could not renew it "
                        f"for {LEASE_SECONDS} s); this run stops so that the two do not mix")


def _process_alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True
