"""The command line: ``app`` (the typer commands, flags derived from the configs) and the printers behind them.

The commands only parse flags and call library functions; ``commands.py`` prints the runtime's commands (ask,
demo, synth, eval, view, serve) and ``train.py`` the training ones. Exit codes are defined once, in ``exits.py``.
"""

from glimpse.cli.app import app, main

__all__ = ["app", "main"]
