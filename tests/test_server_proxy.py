"""The relay the server-death tests put in front of vLLM must pass on what a direct connection would."""

from __future__ import annotations

import http.server
import threading
import time

import httpx
from server_proxy import CuttableProxy


class _ClosesIdleConnections(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 0.5  # an idle connection is closed after 0.5 s, as uvicorn (vLLM) closes one after 5 s

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def test_a_server_closing_an_idle_connection_is_seen_by_the_client() -> None:
    """Else the client's next request on that connection goes nowhere and waits for its timeout (a resumed
    eval in CI waited 600 s)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ClosesIdleConnections)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = CuttableProxy(server.server_address[1])
    proxy.start()
    try:
        with httpx.Client(timeout=5) as client:
            assert client.get(proxy.url).text == "ok"
            time.sleep(1.5)  # the server closes the kept-alive connection meanwhile
            assert client.get(proxy.url).text == "ok"
    finally:
        proxy.cut()
        server.shutdown()
