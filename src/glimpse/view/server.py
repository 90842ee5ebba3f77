"""Serve a report folder over HTTP (``glimpse view --serve``): static files, loopback by default."""

from __future__ import annotations

import functools
import http.server
import os


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def make_server(folder: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8765) -> http.server.HTTPServer:
    """A threading HTTP server for ``folder`` (``port=0`` picks a free port); call ``serve_forever`` on it."""
    handler = functools.partial(_QuietHandler, directory=os.fspath(folder))
    return http.server.ThreadingHTTPServer((host, port), handler)


def serve_report(folder: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until interrupted."""
    server = make_server(folder, host, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
