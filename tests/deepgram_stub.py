"""A local server speaking Deepgram's documented POST /v1/listen, for the real deepgram-sdk."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

KEY = "dg-test-key-0123456789abcdef"

WORDS = [
    {"word": "hello", "start": 0.10, "end": 0.40, "confidence": 0.98, "punctuated_word": "Hello"},
    {"word": "world", "start": 0.45, "end": 0.80, "confidence": 0.42, "punctuated_word": "world."},
]


def listen_response(model: str) -> dict:
    return {
        "metadata": {
            "transaction_key": "deprecated",
            "request_id": "5f1f5c1e-0000-4000-8000-000000000001",
            "sha256": "0" * 64,
            "created": "2024-01-01T00:00:00.000Z",
            "duration": 1.0,
            "channels": 1,
            "models": ["30089e05-99d1-4376-b32e-c263170674af"],
            "model_info": {"30089e05-99d1-4376-b32e-c263170674af": {"name": model, "version": "2024", "arch": "nova-3"}},
        },
        "results": {
            "channels": [
                {
                    "alternatives": [
                        {"transcript": "hello world", "confidence": 0.7, "words": [dict(w) for w in WORDS]}
                    ]
                }
            ]
        },
    }


class DeepgramServer:
    """POST /v1/listen as Deepgram documents it. ``plan`` is a list of behaviours, one per
    request (the last repeats): ok, 429, 500, 401, malformed; ``delay`` seconds before each answer
    (a transcription that takes time)."""

    def __init__(self, plan: list[str], delay: float = 0.0):
        self.plan = list(plan)
        self.delay = delay
        self.requests: list[dict] = []
        self.failures: list[str] = []
        self.answered = threading.Event()  # set once an answer has been sent
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json", headers=None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                server.answered.set()

            def do_POST(self):
                time.sleep(server.delay)
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                query = parse_qs(parts.query)
                req = {
                    "path": parts.path,
                    "query": query,
                    "auth": self.headers.get("Authorization"),
                    "content_type": self.headers.get("Content-Type"),
                    "body": body,
                }
                server.requests.append(req)
                behaviour = server.plan[min(len(server.requests) - 1, len(server.plan) - 1)]
                if parts.path != "/v1/listen":
                    return self._send(404, b'{"err_code":"NOT_FOUND","err_msg":"no such route"}')
                if behaviour == "401" or req["auth"] != f"Token {KEY}":
                    msg = {"err_code": "INVALID_AUTH", "err_msg": f"Invalid credentials: {req['auth']}",
                           "request_id": "r-401"}
                    return self._send(401, json.dumps(msg).encode())
                if behaviour == "429":
                    return self._send(429, b'{"err_code":"TOO_MANY_REQUESTS","err_msg":"slow down"}')
                if behaviour == "500":
                    return self._send(500, b'{"err_code":"INTERNAL","err_msg":"oops"}')
                if "model" not in query:
                    return self._send(400, b'{"err_code":"Bad Request","err_msg":"no model"}')
                if behaviour == "malformed":
                    return self._send(200, b'{"metadata": {"request_id": "x"}, "results": {"channels": [')
                return self._send(200, json.dumps(listen_response(query["model"][0])).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
