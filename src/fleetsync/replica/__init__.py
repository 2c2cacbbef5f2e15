"""Replica side: follow an upstream's feed, fetch and verify content, apply it atomically under a root."""

from fleetsync.replica.follower import Replica

__all__ = ["Replica"]
