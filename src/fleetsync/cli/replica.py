"""`fleetsync replica`: follow an upstream into a local root."""

from __future__ import annotations

import hashlib
import os
import socket

import click

from fleetsync.cli.options import LISTEN, RATE, retain_option, token_option, verbose_option


@click.command("replica")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Local copy to maintain.")
@click.option("--state", required=True, type=click.Path(file_okay=False), help="Directory for replica state.")
@click.option("--upstream", required=True, help="URL of the origin or a relay, e.g. http://origin:8470.")
@click.option("--id", "replica_id", default=None, help="Name reported upstream (default: host + state dir).")
@click.option("--listen", default=None, type=LISTEN, help="Also serve the API here, to relay to other replicas.")
@click.option("--bwlimit", default=None, type=RATE,
              help="Limit content transfer from the upstream to RATE bytes/s, e.g. 500K or 10M (K/M/G = 1024^n).")
@click.option("--compress", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="zstd on blob streams: auto = on unless the upstream is a loopback address.")
@click.option("--bootstrap-workers", type=click.IntRange(0, 64), default=None,
              help="Processes that fetch and write the small files of a bootstrap into an empty root "
                   "(default: one per CPU, at most 4; 0: all in the replica's own process).")
@retain_option
@token_option
@verbose_option
def command(root: str, state: str, upstream: str, replica_id: str | None, listen: tuple[str, int] | None,
            bwlimit: float | None, compress: str, bootstrap_workers: int | None, retain: int, token: str | None,
            verbose: int) -> None:
    """Keep ROOT identical to the upstream's tree."""
    from fleetsync.cli import setup_logging
    from fleetsync.replica.run import run_replica

    setup_logging(verbose)
    if not upstream.startswith(("http://", "https://")):
        raise click.BadParameter("must start with http:// or https://", param_hint="--upstream")
    if replica_id is None:
        digest = hashlib.sha1(os.path.abspath(state).encode()).hexdigest()[:6]
        replica_id = f"{socket.gethostname()}-{digest}"
    run_replica(root, state, upstream, replica_id, listen, token=token, bwlimit=bwlimit, compress=compress,
                retain=retain, bootstrap_workers=bootstrap_workers)
