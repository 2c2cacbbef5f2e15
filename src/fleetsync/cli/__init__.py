"""Command-line interface: one small module per command."""

from __future__ import annotations

import logging
import sys

import click

from fleetsync import __version__


def setup_logging(verbose: int) -> None:
    """Log to stderr with timestamps; -v for debug."""
    logging.basicConfig(
        level=logging.DEBUG if verbose > 0 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleetsync")
def main() -> None:
    """Replicate a static content tree from one origin to a fleet of web servers."""


def _register() -> None:
    from fleetsync.cli import demo, origin, publish, replica, status

    for mod in (origin, replica, status, publish, demo):
        main.add_command(mod.command)


_register()
