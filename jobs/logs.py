"""Logging set up once for every command."""

from __future__ import annotations

import logging


def setup_logging(verbose: bool) -> None:
    """INFO with ``--verbose``, else WARNING, one format for every command."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
