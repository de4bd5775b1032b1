"""Logging and console output shared by every command."""

from __future__ import annotations

import logging


def setup_logging(verbose: bool) -> None:
    """INFO with ``--verbose``, else WARNING, one format for every command."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def print_table(table, min_width: int = 0) -> None:
    """Print a rich table on stdout whole: as wide as it needs (at least ``min_width``),
    also when stdout is a pipe or a file, where rich would assume 80 columns and cut."""
    from rich.console import Console
    from rich.measure import Measurement

    console = Console()
    need = Measurement.get(console, console.options.update_width(10_000), table).maximum
    width = max(console.width, min_width, need) if not console.is_terminal else max(
        console.width, min_width)
    Console(width=width).print(table)
