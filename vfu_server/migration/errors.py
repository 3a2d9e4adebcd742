"""Errors raised by the migration package.

Every failure that can reach a vfio-user reply carries an errno, because the
wire protocol can only report a number; the one-line ``reason`` is for logs and
for the control socket, which can carry text.
"""

from __future__ import annotations

import errno as _errno

__all__ = ["MigrationError", "MigrationFormatError"]


class MigrationError(Exception):
    """A migration operation was refused.

    ``errno`` is what the server puts in the vfio-user error reply;
    ``reason`` is a single line suitable for a log or a JSON ``error`` field.
    """

    def __init__(self, errno: int, reason: str) -> None:
        # Keep the reason on one line: it ends up in log lines and JSON replies.
        reason = " ".join(str(reason).split())
        super().__init__(errno, reason)
        self.errno = errno
        self.reason = reason

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{name}: {self.reason}"


class MigrationFormatError(MigrationError):
    """A device-state stream could not be accepted.

    errno conventions (see docs/migration-format.md, "Errors"):

    * ``EBADMSG`` the bytes are damaged: bad magic, checksum mismatch, truncation,
      record overrun, non-zero padding or reserved fields, trailing bytes;
    * ``EPROTO``  an envelope version this reader does not implement;
    * ``EINVAL``  a well-formed stream this device cannot accept: unknown format
      UUID, major mismatch, unknown mandatory record, profile mismatch, field out
      of range for the device.
    """
