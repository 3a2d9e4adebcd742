"""Exceptions raised by block backends.

Devices translate these into NVMe / virtio-blk status codes, so every failure a backend can
produce is a :class:`BlockError` carrying an ``errno`` value; raw :class:`OSError` never escapes.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "BackendSpecError",
    "BlockError",
    "BlockIOError",
    "BlockRangeError",
    "BlockReadOnlyError",
]


class BlockError(Exception):
    """Base class of every backend failure; ``errno`` says what kind for status mapping."""

    errno: int

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{self.message} ({name})"

    @classmethod
    def from_oserror(cls, exc: OSError, what: str) -> BlockError:
        """Wrap an OSError, keeping its errno; ``what`` names the operation for the message."""
        code = exc.errno if exc.errno is not None else _errno.EIO
        return cls(code, f"{what}: {exc.strerror or os.strerror(code)}")


class BlockRangeError(BlockError):
    """A request reaches outside ``[0, size)`` (maps to NVMe "LBA out of range")."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EINVAL, message)


class BlockIOError(BlockError):
    """The medium or transport failed (disk error, NBD server error or disconnect)."""


class BlockReadOnlyError(BlockError):
    """A modifying request reached a read-only backend (maps to NVMe "write to RO range")."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EROFS, message)


class BackendSpecError(ValueError):
    """A ``--backing`` / ``--size`` specification cannot be understood; the message is one line."""
