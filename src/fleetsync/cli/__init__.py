"""Command-line interface: one small module per command."""

from __future__ import annotations

import logging
import resource
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


def raise_open_files_limit() -> int:
    """Raise the soft limit of open descriptors to the hard limit (a replica holds one per old
    version waiting to be unlinked and per cached directory); returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleetsync")
def main() -> None:
    """Replicate a static content tree from one origin to a fleet of web servers."""
    raise_open_files_limit()


def _register() -> None:
    from fleetsync.cli import demo, origin, publish, replica, status

    for mod in (origin, replica, status, publish, demo):
        main.add_command(mod.command)


_register()
