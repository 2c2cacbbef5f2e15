"""Option parsing shared by commands."""

from __future__ import annotations

import click

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
token_option = click.option("--token", envvar="FLEETSYNC_TOKEN", default=None,
                            help="Shared bearer token for the HTTP API (env FLEETSYNC_TOKEN).")
verbose_option = click.option("-v", "--verbose", count=True, help="Debug logging.")
