"""Running a replica process (follow loop plus, optionally, the relay API)."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from fleetsync.replica.follower import Replica
from fleetsync.transport.server import ServerState, start_server

log = logging.getLogger("fleetsync.replica")


def run_replica(root: str, state: str, upstream: str, replica_id: str, listen: tuple[str, int] | None = None,
                **kw: Any) -> None:
    """Run a replica until SIGINT/SIGTERM."""
    async def main() -> None:
        r = Replica(root, state, upstream, replica_id, **kw)
        loop = asyncio.get_running_loop()
        def stop() -> None:
            r.stop()
            follow.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        runner = None
        srv = None
        if listen is not None:
            srv = ServerState(r.journal, root, role="replica", extra_status=r.status)
            r.on_applied.append(srv.notify)
            runner = await start_server(srv, *listen)
            log.info("replica %s serving relay API on http://%s:%d", replica_id, *listen)
        log.info("replica %s following %s into %s (applied seq %d)", replica_id, upstream, root, r.journal.head())
        follow = asyncio.create_task(r.run())
        try:
            await follow
        except asyncio.CancelledError:
            pass
        finally:
            if runner is not None:
                await runner.cleanup()
            if srv is not None:
                srv.close()
            await r.close()

    asyncio.run(main())
