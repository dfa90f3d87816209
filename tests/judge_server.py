"""A tiny OpenAI-compatible chat-completions server for tests: ``serve(handler) -> (base_url, stop)``.

``handler(request)`` gets the POSTed JSON body ({"model", "messages", "temperature", ...}) and returns

- a ``str``: sent as the assistant's reply in a chat-completion response;
- a ``dict``: sent as the JSON body, as is;
- ``(status, text)``: sent with that HTTP status, e.g. ``(500, "boom")``.

An exception in the handler answers 500; a handler that sleeps makes the server hang for
that request (each request has its own daemon thread, so ``stop()`` does not wait for it).
The server listens on 127.0.0.1 on a free port; ``base_url`` ends in ``/v1`` like OpenAI's.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(content: str, model: str = "test-judge") -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }


def serve(handler: Callable[[dict], str | dict | tuple[int, str]]) -> tuple[str, Callable[[], None]]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self._send(404, "text/plain", f"no route {self.path}")
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                answer = handler(request)
            except Exception as exc:  # noqa: BLE001 - a handler bug answers 500, as a real endpoint would
                return self._send(500, "text/plain", f"{type(exc).__name__}: {exc}")
            if isinstance(answer, tuple):
                status, text = answer
                return self._send(status, "text/plain", text)
            body = answer if isinstance(answer, dict) else completion(answer, request.get("model", "test-judge"))
            self._send(200, "application/json", json.dumps(body))

        def _send(self, status: int, content_type: str, text: str):
            data = text.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up (timed out) before the answer came
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join()

    return f"http://127.0.0.1:{server.server_address[1]}/v1", stop
