"""`fleetsync status`: the fleet as an upstream sees it."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import click

from fleetsync.cli.options import token_option


async def fetch_status(url: str, token: str | None) -> dict[str, Any]:
    """GET /v1/status from an origin or relay."""
    from fleetsync.transport.client import UpstreamClient

    c = UpstreamClient(url, token=token, timeout=10)
    try:
        return await c.status()
    finally:
        await c.close()


def render(doc: dict[str, Any]) -> None:
    """Print a status document as a table."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    head = f"[bold]{doc.get('role')}[/] seq {doc.get('seq')} (retained from {doc.get('min_seq')})"
    if "entries" in doc:
        head += f", {doc['entries']} entries, {doc.get('pending', 0)} pending"
    con.print(head)
    if doc.get("paused"):
        con.print(f"[bold red]PAUSED:[/] {doc['paused']}")
    t = Table("replica", "applied", "lag (records)", "lag (s)", "last contact", "last error")
    now = doc.get("time", time.time())
    for r in doc.get("replicas", []):
        ago = f"{now - r['last_contact']:.1f}s ago" if r.get("last_contact") else "never"
        lag_s = "-" if r.get("lag_seconds") is None else f"{r['lag_seconds']:.2f}"
        t.add_row(r["id"], str(r["applied_seq"]), str(r["lag_records"]), lag_s, ago, r.get("last_error") or "")
    con.print(t)


@click.command("status")
@click.option("--upstream", required=True, help="URL of the origin (or a relay).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON document.")
@token_option
def command(upstream: str, as_json: bool, token: str | None) -> None:
    """Show the origin's sequence and each replica's position, lag and health."""
    try:
        doc = asyncio.run(fetch_status(upstream, token))
    except Exception as e:  # noqa: BLE001 - shown to the operator
        click.echo(f"fleetsync status: cannot reach {upstream}: {e}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        render(doc)
