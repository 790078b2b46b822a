"""An admin listener that records each request and answers what the test says."""

import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeAdmin:
    def __init__(self):
        self.requests = queue.Queue()
        self.status = 200
        admin = self

        class Handler(BaseHTTPRequestHandler):
            def do_DELETE(self):  # noqa: N802 - http.server's naming
                admin.requests.put(("DELETE", self.path, {k.lower(): v for k, v in self.headers.items()}))
                body = json.dumps({"path": self.path}).encode()
                self.send_response(admin.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=lambda: self.server.serve_forever(poll_interval=0.05), daemon=True)
        self.thread.start()

    def taken(self):
        out = []
        while not self.requests.empty():
            out.append(self.requests.get())
        return out

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
