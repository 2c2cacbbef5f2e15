"""fleetsync: keep a fleet of web servers' static trees identical to one origin, at O(changes) cost."""

__version__ = "0.1.0"
