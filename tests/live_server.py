"""Run an ASGI app with uvicorn in a background thread on a free localhost port: ``with live(app) as url``."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

try:
    import httpx
except ImportError:  # newer openai clients are built on httpx2, which has the same API
    import httpx2 as httpx

__all__ = ["httpx", "live"]


@contextlib.contextmanager
def live(app, startup_timeout_s: float = 30):
    """Yields the base URL (``http://127.0.0.1:PORT/v1``); the server is shut down (lifespan included) on exit."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
