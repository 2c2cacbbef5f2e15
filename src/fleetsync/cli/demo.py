"""`fleetsync demo`: origin + two replicas on localhost, a generated tree, live changes."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--dir", "workdir", default=None, type=click.Path(file_okay=False),
              help="Working directory (default: a temporary one, removed afterwards).")
@click.option("--files", default=3000, show_default=True, type=click.IntRange(10), help="Files in the tree.")
@click.option("--keep", is_flag=True, help="Keep everything running after the demo until Ctrl-C.")
def command(workdir: str | None, files: int, keep: bool) -> None:
    """Replicate a generated tree to two local replicas while changing it, and check they converge."""
    from fleetsync.ops.demo import run_demo

    raise SystemExit(run_demo(workdir, files, keep))
