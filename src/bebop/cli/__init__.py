"""`bebop …` command line: one module per command group (``train``, ``generate``, ``bench``, ``rl``, ``demo``,
``analyze``), assembled in :mod:`bebop.cli.app`; everything shown or written goes through :mod:`bebop.cli.render`.
Bad input prints one line ``error: …`` naming the bad value and exits with 2."""

from bebop.cli.app import app, main

__all__ = ["app", "main"]
