"""Errors as values: every failure carries the errno that goes into the reply header.

The pattern is h2's: an exception class knows its own code, so a handler can ``raise`` and the
connection turns it into an error reply without a lookup table. Two families:

* :class:`VfioUserError`: a request could not be served. The connection stays up; the peer gets
  an error reply with :attr:`errno`.
* :class:`ProtocolError`: the byte stream itself is broken (bad header, oversized message).
  There is no way to resynchronise a stream protocol, so the connection must be dropped.
"""

from __future__ import annotations

import errno as _errno


class VfioUserError(Exception):
    """A request failed; reply with ``errno`` and keep serving."""

    errno: int = _errno.EINVAL

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, errno={_errno.errorcode.get(self.errno, self.errno)})"


class MalformedMessage(VfioUserError):
    """The payload of one message does not decode; the stream itself is still in sync."""

    errno = _errno.EINVAL


class UnsupportedCommand(VfioUserError):
    errno = _errno.ENOSYS


class NotSupported(VfioUserError):
    """A known command asks for something this device does not offer."""

    errno = _errno.ENOTSUP


class ReplyTooLarge(VfioUserError):
    """The reply does not fit in the request's ``argsz``. Not an error reply: the spec's "Message
    sizes" rule sends the fixed part only, with ``argsz`` set to :attr:`needed`, so the client can
    ask again with a buffer that large."""

    errno = _errno.E2BIG

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


class DmaError(VfioUserError):
    """A guest (or client) address is not mapped, not writable, or out of range."""

    errno = _errno.EFAULT


class ProtocolError(Exception):
    """The stream is broken beyond repair; the only remedy is to close this connection."""

    def __init__(self, message: str, errno: int = _errno.EPROTO) -> None:
        super().__init__(message)
        self.errno = errno


class RemoteError(VfioUserError):
    """The peer answered one of our requests with an error reply."""
