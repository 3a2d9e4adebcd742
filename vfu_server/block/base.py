"""The block-backend interface that NVMe and virtio-blk devices are written against.

A backend is a fixed-size array of bytes with asynchronous, scatter-gather access.  The I/O
methods take lists of memoryviews so that data moves straight between the storage and mmapped
guest RAM without intermediate copies.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Self

from ..sandbox import SandboxNeeds
from .errors import BlockRangeError, BlockReadOnlyError

__all__ = ["BlockBackend", "PendingFlush", "byte_views", "iov_length", "iov_slice"]

Buffer = memoryview | bytearray | bytes


class BlockBackend(abc.ABC):
    """Abstract block backend.

    Attributes are fixed once the backend is open:

    ``size``        capacity in bytes.
    ``block_size``  logical block size the backend prefers (512 or 4096); a device may still
                    expose its own LBA size, requests only need to be in range.
    ``read_only``   writes, discards and zeroing raise :class:`BlockReadOnlyError`.

    Completion semantics: a write coroutine returns only once the data reached the backend
    (page cache for files, the server's reply for NBD).  It is *durable* only after
    :meth:`flush`, or immediately when written with ``fua=True``.

    Errors: :class:`BlockRangeError` for requests outside ``[0, size)``,
    :class:`BlockReadOnlyError` for modifications of a read-only backend, :class:`BlockIOError`
    for everything else.  All carry ``errno``.
    """

    size: int
    block_size: int
    read_only: bool
    #: ``time.monotonic_ns()`` until which a device's C write path (which writes to
    #: :meth:`FileBackend.fast_io`'s fd itself) should start each write's write-back at once
    #: (``sync_file_range``), because the guest flushes often; 0: never. Only a hint.
    write_behind_until: int = 0

    @abc.abstractmethod
    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` in order with the bytes starting at ``offset``."""

    @abc.abstractmethod
    async def writev(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        """Write the concatenation of ``bufs`` at ``offset``; ``fua`` makes it durable first."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every write that has completed so far durable."""

    def begin_flush(self) -> PendingFlush:
        """A flush asked for now, awaited later: ``await backend.begin_flush().wait()`` makes
        every write completed before this call durable, as :meth:`flush` does. A device calls
        it where it fetches a flush command, so that a backend which can start the work at
        once (a file's fdatasync) does so there rather than a scheduler pass later, when the
        command's task first runs. Never raises; errors come from ``wait()``. By default the
        work starts in ``wait()``."""
        return PendingFlush(self.flush)

    async def make_writes_visible(self) -> None:
        """Make every write that has completed so far visible to *another client* of the same
        storage: a live handover's successor, or a migration's destination on shared storage,
        which open it anew while this process still holds it. Devices call it when they
        quiesce, once nothing is in flight. Raises :class:`BlockIOError` when it cannot (a
        handover is then refused).

        Nothing to do by default: a file's other openers share its page cache, and a RAM
        disk's memfd itself moves. An NBD export needs a flush (:class:`NbdBackend`)."""
        return None

    def sandbox_needs(self) -> SandboxNeeds:
        """What the backend still opens once the server is confined (``--sandbox``): nothing
        for a file or RAM, whose descriptors are open before."""
        return SandboxNeeds()

    @abc.abstractmethod
    async def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; later reads of it return zeroes."""

    @abc.abstractmethod
    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Zero a range; ``may_unmap`` allows deallocating it instead of writing zeroes."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Flush (unless read-only) and release every resource; idempotent."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Identity for logs and the migration profile: kind, location, size.  Never data."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # Helpers shared by the implementations.

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlockRangeError(
                f"request [{offset}, +{length}) outside device of {self.size} bytes"
            )

    def _check_writable(self) -> None:
        if self.read_only:
            raise BlockReadOnlyError(f"{self.describe().get('kind', 'backend')} is read-only")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"<{type(self).__name__} {fields}>"


class PendingFlush:
    """What :meth:`BlockBackend.begin_flush` returns: ``await wait()`` once for the result."""

    __slots__ = ("_wait",)

    def __init__(self, wait: Callable[[], Awaitable[None]]) -> None:
        self._wait = wait

    async def wait(self) -> None:
        """Until the flush is done; raises what the backend's flush raises."""
        await self._wait()


def byte_views(bufs: Sequence[Buffer]) -> list[memoryview]:
    """Normalise buffers to flat, non-empty unsigned-byte memoryviews (no copy).

    Guest memory may arrive as views with another format or shape; the I/O code slices by
    byte counts, so it needs 1-D ``'B'`` views.
    """
    out = []
    for b in bufs:
        mv = b if isinstance(b, memoryview) else memoryview(b)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        # Empty views are dropped: a zero-byte iovec would look like "no progress" to the
        # short-read/short-write loops.
        if mv.nbytes:
            out.append(mv)
    return out


def iov_length(bufs: Sequence[memoryview]) -> int:
    """Total number of bytes in an iovec list."""
    return sum(mv.nbytes for mv in bufs)


def iov_slice(
    bufs: Sequence[memoryview], start: int, length: int | None = None
) -> list[memoryview]:
    """Views covering bytes ``[start, start+length)`` of the concatenated iovec (no copy)."""
    out: list[memoryview] = []
    remaining = -1 if length is None else length
    for mv in bufs:
        n = mv.nbytes
        if start >= n:
            start -= n
            continue
        if remaining == 0:
            break
        end = n if remaining < 0 else min(n, start + remaining)
        piece = mv[start:end] if (start or end != n) else mv
        out.append(piece)
        if remaining > 0:
            remaining -= end - start
        start = 0
    return out
