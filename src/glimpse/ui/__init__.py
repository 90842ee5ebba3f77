"""``glimpse ui``: a local web app that runs the agent loop and shows each turn as it happens (see ``server``)."""

from glimpse.ui.server import build_app, serve_ui

__all__ = ["build_app", "serve_ui"]
