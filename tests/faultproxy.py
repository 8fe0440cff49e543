"""A loopback TCP proxy between a storage client and the GCS server that can stall, cut or refuse.

Modes (`proxy.mode = ...`, switched at any time, also for connections already open):
  "pass"    forward bytes both ways;
  "stall"   accept connections and requests, never answer (a store that hangs);
  "cut"     close every connection (open ones at once, new ones as they come: a reset mid-request);
  "refuse"  stop listening: connecting fails with "connection refused" (a dead port);
  "drip"    forward the store's answers one byte a second (a store that never quite stalls);
  "503"     close open connections and answer every request with HTTP 503 (an overloaded store).

`proxy.go_bad_after(nbytes, mode)` switches to `mode` once the store has answered `nbytes`: the
fault strikes mid-run, after the command under test has started its work, whatever its timing.

Tests point STORAGE_EMULATOR_HOST at `proxy.url` for the process under test and flip the mode
while it runs. Works at the TCP level, so it serves every client (gcsfs, google-cloud-storage).
"""

import socket
import threading
import time

MODES = ("pass", "stall", "cut", "refuse", "drip", "503")
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class FaultProxy:
    def __init__(self, upstream_url):
        host_port = upstream_url.split("://", 1)[1].rstrip("/")
        host, port = host_port.rsplit(":", 1)
        self.upstream = (host, int(port))
        self._mode = "pass"
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open = set()
        self.connections = 0
        self.answered = 0  # bytes forwarded from the store
        self._bad_after = None  # (bytes, mode)
        threading.Thread(target=self._accept, daemon=True).start()

    def go_bad_after(self, nbytes, mode):
        self._bad_after = (nbytes, mode)

    @staticmethod
    def _listen(port):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        listener.settimeout(0.2)
        return listener

    @property
    def mode(self):
        return self._mode

    @mode.setter
    def mode(self, mode):
        if mode not in MODES:
            raise ValueError(mode)
        self._mode = mode
        if mode in ("cut", "refuse", "503"):
            with self._lock:
                for connection in list(self._open):
                    _close(connection)
                self._open.clear()

    def close(self):
        self._mode = "closed"

    def _accept(self):
        listening = True
        while self._mode != "closed":
            if self._mode == "refuse":
                if listening:
                    self._listener.close()
                    listening = False
                time.sleep(0.05)
                continue
            if not listening:
                self._listener = self._listen(self.port)
                listening = True
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            if self._mode == "cut":
                _close(client)
                continue
            if self._mode == "503":
                threading.Thread(target=self._unavailable, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
            for source, target, answers in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(source, target, answers), daemon=True).start()
        if listening:
            self._listener.close()

    def _unavailable(self, client):
        """Reads one request's head and answers 503."""
        try:
            client.settimeout(5)
            received = b""
            while b"\r\n\r\n" not in received:
                data = client.recv(65536)
                if not data:
                    break
                received += data
            client.sendall(UNAVAILABLE)
        except OSError:
            pass
        finally:
            _close(client)

    def _pump(self, source, target, answers):
        try:
            source.settimeout(0.2)
            while True:
                if self._mode == "stall":
                    time.sleep(0.05)  # hold the connection open, forward nothing
                    continue
                try:
                    data = source.recv(65536)
                except TimeoutError:
                    continue
                if not data or self._mode in ("cut", "refuse", "closed", "503"):
                    break
                if answers and self._mode == "drip":
                    for index in range(len(data)):
                        target.sendall(data[index:index + 1])
                        time.sleep(1.0)
                    continue
                target.sendall(data)
                if answers:
                    self.answered += len(data)
                    if self._bad_after and self.answered >= self._bad_after[0]:
                        self.mode = self._bad_after[1]
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(target)
            _close(source)
            _close(target)


def _close(connection):
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()
