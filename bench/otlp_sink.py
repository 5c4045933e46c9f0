"""A local OTLP/HTTP sink for `bench/run --otlp`: accepts every POST (the worker's
/v1/traces exports), counts it and throws it away, so the benchmark measures what exporting
costs the worker, not what a collector does with it. Standard library only."""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Sink(BaseHTTPRequestHandler):
    requests = 0
    bytes = 0
    lock = threading.Lock()

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        self.rfile.read(length)
        with _Sink.lock:
            _Sink.requests += 1
            _Sink.bytes += length
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def start():
    """Serve on a free local port in a daemon thread; the endpoint to export to."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def received():
    """(requests, bytes) received so far."""
    with _Sink.lock:
        return _Sink.requests, _Sink.bytes
