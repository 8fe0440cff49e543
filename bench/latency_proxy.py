"""A loopback HTTP reverse proxy that adds a fixed delay to every request (object-store latency).

Real object storage answers each request in tens of milliseconds; a GCS server on loopback answers
in well under one. Putting this proxy between the client and the server (STORAGE_EMULATOR_HOST
points at the proxy) brings that per-request cost back, so per-object reads pay it for every image
and a sharded reader pays it once per block.

Each request waits in its own thread, so the delay is latency, not a queue: ten concurrent
requests all finish after one delay. `POST /__delay/<ms>` changes the delay at run time (the
benchmark switches between 0 and 20 ms without restarting its storage clients).

    python -m bench.latency_proxy --upstream=http://127.0.0.1:4443 --delay_ms=20
    # prints "port NNNNN" once it listens
"""

import argparse
import http.client
import http.server
import sys
import threading
import time
import urllib.parse

# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy recomputes after buffering the body.
_DROPPED = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
            "upgrade", "content-length"}


class LatencyProxy(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # socketserver listens with a backlog of 5: dozens of clients connecting at once would see SYNs
    # dropped and retried a second later, a delay no real object store adds.
    request_queue_size = 128

    def __init__(self, address, upstream, delay_seconds):
        super().__init__(address, ProxyHandler)
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port or 80
        self.delay_seconds = delay_seconds
        self.requests = 0
        self.verbose = False
        self._local = threading.local()

    def handle_error(self, request, client_address):
        # A client that closes its connection mid-answer (a cancelled read, the end of a run) is
        # routine for a proxy; anything else is still reported.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def upstream_connection(self, fresh=False):
        """One keep-alive connection to the server per handler thread."""
        if fresh or getattr(self._local, "connection", None) is None:
            self._local.connection = http.client.HTTPConnection(
                self.upstream_host, self.upstream_port, timeout=60)
        return self._local.connection


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive towards the client, as a real endpoint allows
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK would add ~40 ms to every answer on top of the intended delay.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    break
                chunks.append(chunk)
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _set_delay(self):
        self.server.delay_seconds = float(self.path.rsplit("/", 1)[1]) / 1000.0
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _forward(self):
        if self.command == "POST" and self.path.startswith("/__delay/"):
            self._set_delay()
            return
        body = self._read_body()
        self.server.requests += 1
        if self.server.verbose:
            print(self.command, self.path, flush=True, file=sys.stderr)
        time.sleep(self.server.delay_seconds)
        headers = {key: value for key, value in self.headers.items() if key.lower() not in _DROPPED}
        for attempt in range(2):
            connection = self.server.upstream_connection(fresh=attempt > 0)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                break
            except (ConnectionError, http.client.HTTPException):
                # The server closed an idle keep-alive connection: retry once on a new one.
                if attempt:
                    raise
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _DROPPED:
                self.send_header(key, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", response.getheader("Content-Length") or "0")
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="URL of the server, e.g. http://127.0.0.1:4443")
    parser.add_argument("--delay_ms", type=float, default=20.0, help="added latency per request")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    options = parser.parse_args(argv)
    proxy = LatencyProxy(("127.0.0.1", options.port), options.upstream, options.delay_ms / 1000.0)
    proxy.verbose = options.verbose
    print(f"port {proxy.server_address[1]}", flush=True)
    try:
        proxy.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
