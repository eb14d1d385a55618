"""Exceptions that carry a message an administrator can act on.

Every error raised towards the CLI derives from `HaError`, so the CLI can print the message and
exit with a clear status instead of a traceback.
"""


class HaError(Exception):
    """Base class: the message says what went wrong and what to fix."""


class ConfigError(HaError):
    """config.xml (or a fixture/payload file) cannot be read or is malformed."""


class SyncItemError(HaError):
    """A sync item definition is invalid or an item id is unknown."""


class MergeError(HaError):
    """A payload cannot be merged (unknown sections, protected sections, bad shape)."""


class TransportError(HaError):
    """The peer could not be reached, or spoke something we could not decode."""


class AuthError(TransportError):
    """The peer refused our credentials."""


class RemoteFault(TransportError):
    """The peer answered with an XML-RPC fault."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"backup answered fault {code}: {message}")
        self.code = code
        self.fault_string = message


class ServiceError(HaError):
    """A service action failed or named an unknown service."""


class FailoverError(HaError):
    """A CARP/pfsync/keepalived control action failed."""


class MethodFault(Exception):
    """Raised by an agent's method handler to answer with an XML-RPC fault (not an HaError: it is
    the reply to a caller, not a message for this node's administrator)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
