"""The trajectory viewer: a self-contained HTML report of a run (``glimpse view``), and a small local server."""

from glimpse.view.build import build_report, load_run
from glimpse.view.server import serve_report

__all__ = ["build_report", "load_run", "serve_report"]
