"""Domain errors. Every message tells the caller what to change.

The server layer turns any SaeMcpError into an MCP `isError` tool result carrying the message;
anything else is a crash and is logged with its traceback.
"""


class SaeMcpError(Exception):
    """Base class: an anticipated failure whose message is safe and useful to show the caller."""


class InvalidInput(SaeMcpError):
    """An argument is out of range, empty, malformed or inconsistent with the loaded model/SAE."""


class NotFound(SaeMcpError):
    """An SAE, feature, corpus or index that the caller named does not exist."""


class LoadError(SaeMcpError):
    """A model, SAE or corpus could not be loaded (offline, not cached, incompatible)."""


class Busy(SaeMcpError):
    """The device is busy with another call for longer than the admission timeout."""


class Cancelled(SaeMcpError):
    """Long work (a scan, a generation) was cancelled between batches/steps."""
