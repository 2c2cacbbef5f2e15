"""Exception types shared across fleetsync's stages."""


class FleetsyncError(Exception):
    """Base class for fleetsync errors; the message carries its context."""


class UnsafePath(FleetsyncError):
    """A path from the wire or a hint would escape the root or is malformed."""


class IntegrityError(FleetsyncError):
    """Content did not match its announced hash."""


class ResyncNeeded(FleetsyncError):
    """The follower is behind the upstream's retained journal (or the journal changed identity)."""


class RootVanished(FleetsyncError):
    """The origin root is missing or empty while the manifest has content (invariant 6)."""
