"""Index: turns detector hints into verified journal records (settle, lstat, hash, compare)."""

from fleetsync.index.indexer import Indexer

__all__ = ["Indexer"]
