"""A volatile write cache over a block backend, for power-loss simulation (``--volatile-cache``).

Writes that are neither FUA nor flushed stay in this process's memory, as in a disk's DRAM
cache; reads see them. :meth:`VolatileCache.flush` writes them to the backend and flushes it,
so flushed data is never lost. :meth:`VolatileCache.power_cut` drops what is still cached,
optionally letting a seeded random subset of it reach the backend first, in no particular
order, as a real cache may have written back any part of itself before the power went.

The cache may also write back early (as a real one does): when it holds more than ``limit``
bytes, on Write Zeroes and Discard (which go straight through), and on a FUA write's blocks.
What it never does is claim durability it does not have.

The unit is a 512-byte block: every device request is a multiple of it. A partial block is
completed from the backend first (read-modify-write). A power cut keeps or loses whole aligned
4 KiB sectors (``ATOMIC``), as a drive with 4 KiB physical sectors behind 512-byte logical
blocks does: a write of one file-system block is never torn, so a file system that relies on
that (ext4 rewrites its 1 KiB superblock in place, outside the journal) survives a cut, as it
does on such a drive.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import trio

from .base import BlockBackend, byte_views, iov_length, iov_slice

__all__ = ["VolatileCache"]

UNIT = 512
ATOMIC = 4096  # what a power cut never tears (see the module docstring)
DEFAULT_LIMIT = 64 << 20
MAX_RUN = 1 << 20  # bytes per backend write when writing back


class VolatileCache(BlockBackend):
    """Keeps non-FUA writes in memory until :meth:`flush`; :meth:`power_cut` loses them."""

    def __init__(self, inner: BlockBackend, limit: int = DEFAULT_LIMIT) -> None:
        if limit < UNIT:
            raise ValueError(f"volatile cache limit must be at least {UNIT} bytes")
        self.inner = inner
        self.size = inner.size
        self.block_size = inner.block_size
        self.read_only = inner.read_only
        self.limit_blocks = limit // UNIT
        #: block -> its bytes, oldest write first; newer than the backend
        self._dirty: dict[int, bytes] = {}
        #: blocks a flush or an eviction is writing back: still newer than the backend
        self._writing: dict[int, bytes] = {}
        #: bumped by a power cut: a write-back that started before it stops
        self._epoch = 0
        self._lock = trio.Lock()
        self.power_cuts = 0

    # -- what is cached ---------------------------------------------------------------------

    @property
    def cached_bytes(self) -> int:
        """Bytes not yet durable (written back or not)."""
        return len(self._dirty.keys() | self._writing.keys()) * UNIT

    def _cached(self, blk: int) -> bytes | None:
        data = self._dirty.get(blk)
        return data if data is not None else self._writing.get(blk)

    def _block_len(self, blk: int) -> int:
        return min(UNIT, self.size - blk * UNIT)

    # -- I/O --------------------------------------------------------------------------------

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        views = byte_views(bufs)
        length = iov_length(views)
        self._check_range(offset, length)
        if not self._dirty and not self._writing:
            await self.inner.readv(offset, views)
            return
        # What is cached now is newer than what the backend read below returns, even if a
        # write-back moves it to the backend meanwhile.
        first, last = offset // UNIT, (offset + max(length, 1) - 1) // UNIT
        overlay = {}
        if last - first < len(self._dirty) + len(self._writing):
            for blk in range(first, last + 1):
                data = self._cached(blk)
                if data is not None:
                    overlay[blk] = data
        else:
            for blk in self._writing.keys() | self._dirty.keys():
                if first <= blk <= last:
                    overlay[blk] = self._cached(blk)  # type: ignore[assignment]
        await self.inner.readv(offset, views)
        for blk, data in overlay.items():
            start = max(blk * UNIT, offset)
            end = min(blk * UNIT + len(data), offset + length)
            if start < end:
                _copy_into(iov_slice(views, start - offset, end - start), data[start - blk * UNIT : end - blk * UNIT])

    async def writev(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        views = byte_views(bufs)
        length = iov_length(views)
        self._check_range(offset, length)
        self._check_writable()
        data = b"".join(views)  # the guest may reuse its buffer once the write completed
        if fua:
            # Through to the backend; cached copies of these blocks take the new bytes, so a
            # later write-back cannot put older ones over them.
            if self._writing:
                async with self._lock:
                    await self._write_through(offset, data)
            else:
                await self._write_through(offset, data)
            return
        await self._store(offset, data)
        if len(self._dirty) > self.limit_blocks:
            await self._evict()

    async def _write_through(self, offset: int, data: bytes) -> None:
        self._patch(offset, data)
        await self.inner.writev(offset, [memoryview(data)], fua=True)

    def _patch(self, offset: int, data: bytes) -> None:
        for cache in (self._dirty, self._writing):
            if not cache:
                continue
            for blk in range(offset // UNIT, (offset + len(data) + UNIT - 1) // UNIT):
                old = cache.get(blk)
                if old is None:
                    continue
                start, end = max(blk * UNIT, offset), min(blk * UNIT + len(old), offset + len(data))
                new = bytearray(old)
                new[start - blk * UNIT : end - blk * UNIT] = data[start - offset : end - offset]
                cache[blk] = bytes(new)

    async def _store(self, offset: int, data: bytes) -> None:
        pos, blk = 0, offset // UNIT
        while pos < len(data):
            lo = offset + pos - blk * UNIT
            blen = self._block_len(blk)
            n = min(blen - lo, len(data) - pos)
            if lo == 0 and n == blen:
                block = data[pos : pos + n]
            else:
                base = self._cached(blk)
                if base is None:
                    raw = bytearray(blen)
                    await self.inner.readv(blk * UNIT, [memoryview(raw)])
                    base = self._cached(blk)  # a write that landed meanwhile is newer
                    if base is None:
                        base = bytes(raw)
                merged = bytearray(base)
                merged[lo : lo + n] = data[pos : pos + n]
                block = bytes(merged)
            self._dirty.pop(blk, None)  # re-inserted: the dict stays in order of age
            self._dirty[blk] = block
            pos += n
            blk += 1

    async def flush(self) -> None:
        async with self._lock:
            if self._dirty:
                moving, self._dirty = self._dirty, {}
                await self._write_back(moving)
            await self.inner.flush()

    async def write_back(self) -> None:
        """Write everything cached to the backend, without flushing the backend: the data is
        then no more durable than an uncached write (see :meth:`make_writes_visible`)."""
        async with self._lock:
            if self._dirty:
                moving, self._dirty = self._dirty, {}
                await self._write_back(moving)

    async def make_writes_visible(self) -> None:
        """A migration's or a live handover's quiesce: what is cached goes to the backend
        (not flushed, so it is no more durable than an uncached write), then the backend makes
        it visible to other clients (an NBD flush). On an error what was not written back
        stays cached."""
        await self.write_back()
        await self.inner.make_writes_visible()

    async def _evict(self) -> None:
        """Over the limit: write the oldest half back (not flushed), as a full cache must."""
        async with self._lock:
            excess = len(self._dirty) - self.limit_blocks // 2
            if excess <= 0:
                return
            moving = {}
            per_sector = ATOMIC // UNIT
            for blk in list(self._dirty)[:excess]:
                if blk not in moving:  # with the rest of its sector: a power cut tears none
                    first = blk - blk % per_sector
                    for b in range(first, first + per_sector):
                        if b in self._dirty:
                            moving[b] = self._dirty.pop(b)
            await self._write_back(moving)

    async def _write_back(self, moving: dict[int, bytes]) -> None:
        """Write ``moving`` to the backend (called with the lock held). On an error the blocks
        not yet written go back into the cache, under anything newer."""
        self._writing = moving
        epoch = self._epoch
        try:
            for start, count in _runs(sorted(moving), MAX_RUN // UNIT):
                if self._epoch != epoch:
                    return  # power cut: what is left was lost
                chunk = b"".join(self._writing[b] for b in range(start, start + count))
                await self.inner.writev(start * UNIT, [memoryview(chunk)])
                for b in range(start, start + count):
                    del moving[b]
        except BaseException:
            if self._epoch == epoch:
                for blk, data in moving.items():
                    if blk not in self._dirty:
                        self._dirty[blk] = data
            raise
        finally:
            self._writing = {}

    async def discard(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        self._check_writable()
        async with self._lock:
            self._patch(offset, bytes(length))
            await self.inner.discard(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self._check_range(offset, length)
        self._check_writable()
        async with self._lock:
            self._patch(offset, bytes(length))
            await self.inner.write_zeroes(offset, length, may_unmap=may_unmap)

    # -- power loss -------------------------------------------------------------------------

    async def power_cut(self, keep: float = 0.0, seed: int = 0) -> dict[str, int]:
        """Lose the cache: each aligned 4 KiB sector's cached blocks reach the backend together
        with probability ``keep`` (chosen by a generator seeded with ``seed``, sectors in
        random order), the rest is gone. Returns how many bytes were kept and lost."""
        if not 0 <= keep <= 1:
            raise ValueError("keep must be 0..1")
        self._epoch += 1
        self.power_cuts += 1
        cached = {**self._writing, **self._dirty}
        self._dirty, self._writing = {}, {}
        async with self._lock:
            pass  # a write-back's run in flight has landed; it stops at the next one
        rng = random.Random(seed)
        per_sector = ATOMIC // UNIT
        sectors: dict[int, list[int]] = {}
        for blk in sorted(cached):
            sectors.setdefault(blk // per_sector, []).append(blk)
        order = list(sectors)
        rng.shuffle(order)
        kept = [blk for sector in order if keep and rng.random() < keep for blk in sectors[sector]]
        for blk in kept:
            await self.inner.writev(blk * UNIT, [memoryview(cached[blk])])
        return {"kept_bytes": sum(len(cached[b]) for b in kept),
                "lost_bytes": sum(len(d) for d in cached.values()) - sum(len(cached[b]) for b in kept)}

    # -- the rest ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        if not self.read_only and (self._dirty or self._writing):
            await self.flush()
        await self.inner.aclose()

    def describe(self) -> dict[str, Any]:
        # The backend's identity (migration profiles compare it); the cache is not storage.
        return self.inner.describe()


def _runs(blocks: list[int], max_count: int) -> list[tuple[int, int]]:
    """Sorted block numbers as (first, count) runs of consecutive blocks. A run longer than
    ``max_count`` is cut only where a 4 KiB sector starts, so that a power cut between two
    runs' writes tears no sector (it keeps or loses a sector whole)."""
    per_sector = ATOMIC // UNIT
    runs: list[tuple[int, int]] = []
    for blk in blocks:
        if runs and runs[-1][0] + runs[-1][1] == blk and (runs[-1][1] < max_count or blk % per_sector):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((blk, 1))
    return runs


def _copy_into(views: list[memoryview], data: bytes) -> None:
    pos = 0
    for v in views:
        v[:] = data[pos : pos + v.nbytes]
        pos += v.nbytes
