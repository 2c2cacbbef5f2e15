"""Option parsing shared by commands."""

from __future__ import annotations

import click

from fleetsync.journal import DEFAULT_RETAIN
from fleetsync.transport.server import parse_listen


class ListenType(click.ParamType):
    """HOST:PORT."""

    name = "HOST:PORT"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        """Parse HOST:PORT or fail with a clear message."""
        if isinstance(value, tuple):
            return value
        try:
            return parse_listen(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


LISTEN = ListenType()


def parse_rate(text: str) -> float:
    """Bytes per second from e.g. '500K', '10M', '1.5G' or '65536' (K/M/G are powers of 1024)."""
    t = text.strip().upper().removesuffix("/S").removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if mult != 1 else t
    try:
        v = float(num) * mult
    except ValueError:
        raise ValueError(f"rate {text!r} must be a number of bytes per second, optionally with K, M or G") from None
    if not v > 0 or v == float("inf"):
        raise ValueError(f"rate {text!r} must be positive")
    return v


class RateType(click.ParamType):
    """A byte rate such as 500K or 10M (per second)."""

    name = "RATE"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        """Parse a rate or fail with a clear message."""
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_rate(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


RATE = RateType()
token_option = click.option("--token", envvar="FLEETSYNC_TOKEN", default=None,
                            help="Shared bearer token for the HTTP API (env FLEETSYNC_TOKEN).")
retain_option = click.option(
    "--retain", default=DEFAULT_RETAIN, show_default=True, type=click.IntRange(1000),
    help="Journal records kept for followers (of this node); a follower further behind resyncs from a snapshot.")
verbose_option = click.option("-v", "--verbose", count=True, help="Debug logging.")
