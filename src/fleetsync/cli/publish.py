"""`fleetsync publish`: tell the origin which paths a producer just wrote or deleted."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import click

from fleetsync import paths
from fleetsync.cli.options import token_option


async def send(upstream: str, items: list[bytes], token: str | None) -> tuple[int, dict]:
    """POST the paths to the origin's /v1/publish."""
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as s:
        body = {"paths": [paths.encode(p) for p in items]}
        async with s.post(upstream.rstrip("/") + "/v1/publish", json=body) as r:
            return r.status, await r.json(content_type=None)


@click.command("publish")
@click.argument("targets", nargs=-1, type=click.Path(path_type=bytes))
@click.option("--upstream", default="http://127.0.0.1:8470", show_default=True, help="URL of the origin.")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read paths from standard input, one per line.")
@click.option("-0", "nul", is_flag=True, help="With --stdin: paths are NUL-separated.")
@token_option
def command(targets: tuple[bytes, ...], upstream: str, from_stdin: bool, nul: bool, token: str | None) -> None:
    """Publish PATHs (absolute, or relative to the current directory) as changed."""
    items = [os.path.abspath(t) for t in targets]
    if from_stdin:
        data = sys.stdin.buffer.read()
        parts = data.split(b"\0") if nul else data.split(b"\n")
        items += [os.path.abspath(p) for p in parts if p]
    if not items:
        raise click.UsageError("nothing to publish: give PATHs or --stdin")
    try:
        status, doc = asyncio.run(send(upstream, items, token))
    except Exception as e:  # noqa: BLE001 - shown to the operator
        click.echo(f"fleetsync publish: cannot reach {upstream}: {e}", err=True)
        sys.exit(2)
    if status >= 400 and status != 207:
        click.echo(f"fleetsync publish: {upstream} answered {status}: {doc.get('error', json.dumps(doc))}", err=True)
        sys.exit(2)
    for a in doc.get("accepted", []):
        click.echo(f"{a['path']}: {a['action']}")
    for r in doc.get("rejected", []):
        click.echo(f"{r['path']}: rejected: {r['error']}", err=True)
    sys.exit(1 if doc.get("rejected") else 0)
