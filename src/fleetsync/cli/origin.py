"""`fleetsync origin`: watch a root and serve its change feed."""

from __future__ import annotations

import click

from fleetsync.cli.options import LISTEN, retain_option, token_option, verbose_option


@click.command("origin")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Tree to replicate.")
@click.option("--state", required=True, type=click.Path(file_okay=False), help="Directory for the journal.")
@click.option("--listen", default="127.0.0.1:8470", type=LISTEN, show_default=True, help="HOST:PORT to serve on.")
@click.option("--settle", default=0.2, show_default=True, type=click.FloatRange(0.0, 60.0),
              help="Seconds a file must be quiet (and closed) before it is recorded.")
@retain_option
@click.option("--allow-empty-root", is_flag=True, help="Propagate an empty root (normally a pause: invariant 6).")
@click.option("--ignore", multiple=True, help="Extra upload temp-name pattern to ignore (repeatable).")
@click.option("--detector", type=click.Choice(["auto", "fanotify", "inotify", "scan"]), default="auto",
              show_default=True, help="Change detection backend (auto: fanotify when root on Linux >= 5.9 and the root filesystem supports file handles, else inotify, else the portable scanner).")
@click.option("--scan-interval", default=1.0, show_default=True, type=click.FloatRange(0.05),
              help="Scanner: seconds between passes.")
@click.option("--scan-rate", default=5000.0, show_default=True, type=click.FloatRange(1.0),
              help="Scanner: file lstat calls per second for in-place edit detection (I/O budget).")
@click.option("--reconcile-rate", default=0.0, show_default=True, type=click.FloatRange(0.0),
              help="Start-up/overflow rescans: at most this many lstat calls per second (0 = unlimited).")
@token_option
@verbose_option
def command(root: str, state: str, listen: tuple[str, int], settle: float, retain: int, allow_empty_root: bool,
            ignore: tuple[str, ...], detector: str, scan_interval: float, scan_rate: float, reconcile_rate: float,
            token: str | None,
            verbose: int) -> None:
    """Watch ROOT, journal every change, and serve the feed to replicas."""
    from fleetsync.cli import setup_logging
    from fleetsync.origin import run_origin
    from fleetsync.paths import DEFAULT_IGNORE

    setup_logging(verbose)
    run_origin(root, state, listen, settle=settle, token=token, retain=retain, allow_empty=allow_empty_root,
               ignore=list(DEFAULT_IGNORE) + list(ignore), detector=detector, scan_interval=scan_interval,
               scan_rate=scan_rate, reconcile_rate=reconcile_rate)
