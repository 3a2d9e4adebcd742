"""VolatileCache (power-loss simulation) against a model: reads always see the newest data,
flushed and FUA data survive a power cut, keep=1 loses nothing, keep=0 only what was cached."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfu_server.block import MemoryBackend
from vfu_server.block.cache import VolatileCache

SIZE = 16 * 1024 + 512 * 3  # not a multiple of 4 KiB: a short last unit is possible too

ranges = st.tuples(st.integers(0, SIZE - 1), st.integers(1, 3000)).map(lambda r: (r[0], min(r[1], SIZE - r[0])))
ops = st.one_of(
    st.tuples(st.just("write"), ranges, st.booleans(), st.integers(0, 255)),
    st.tuples(st.just("read"), ranges),
    st.tuples(st.just("flush")),
    st.tuples(st.sampled_from(["discard", "zeroes"]), ranges),
)


async def run_ops(sequence: list[tuple[Any, ...]], keep: float, limit: int) -> None:
    inner = MemoryBackend(SIZE)
    cache = VolatileCache(inner, limit=limit)
    visible = bytearray(SIZE)
    #: bytes a power cut must not lose (None: whatever the cache did)
    durable: list[int | None] = [0] * SIZE
    for op in sequence:
        if op[0] == "write":
            (offset, length), fua, fill = op[1], op[2], op[3]
            data = bytes([fill]) * length
            await cache.writev(offset, [memoryview(data)], fua=fua)
            visible[offset : offset + length] = data
            durable[offset : offset + length] = list(data) if fua else [None] * length
        elif op[0] == "read":
            offset, length = op[1]
            buf = bytearray(length)
            await cache.readv(offset, [memoryview(buf)[: length // 2], memoryview(buf)[length // 2 :]])
            assert buf == visible[offset : offset + length]
        elif op[0] == "flush":
            await cache.flush()
            durable = list(visible)
        else:
            offset, length = op[1]
            if op[0] == "discard":
                await cache.discard(offset, length)
            else:
                await cache.write_zeroes(offset, length)
            visible[offset : offset + length] = bytes(length)
            durable[offset : offset + length] = [None] * length
    cut = await cache.power_cut(keep=keep, seed=7)
    media = bytearray(SIZE)
    await inner.readv(0, [memoryview(media)])
    if keep == 1:
        assert media == visible and cut["lost_bytes"] == 0
    for i, value in enumerate(durable):
        if value is not None:
            assert media[i] == value, f"byte {i} was durable and got lost"
    assert cache.cached_bytes == 0
    after = bytearray(SIZE)
    await cache.readv(0, [memoryview(after)])
    assert after == media, "after the cut the cache is empty: reads see the media"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=st.lists(ops, min_size=1, max_size=40), keep=st.sampled_from([0.0, 0.5, 1.0]),
       limit=st.sampled_from([512, 4096, 1 << 20]))
def test_cache_matches_model(sequence: list[tuple[Any, ...]], keep: float, limit: int) -> None:
    trio.run(run_ops, sequence, keep, limit)


async def test_power_cut_keeps_a_seeded_subset() -> None:
    results = []
    for _ in range(2):
        inner = MemoryBackend(64 * 512)
        cache = VolatileCache(inner)
        for blk in range(64):
            await cache.writev(blk * 512, [memoryview(bytes([blk + 1]) * 512)])
        cut = await cache.power_cut(keep=0.5, seed=3)
        media = bytearray(64 * 512)
        await inner.readv(0, [memoryview(media)])
        kept = [blk for blk in range(64) if media[blk * 512] == blk + 1]
        assert cut["kept_bytes"] == len(kept) * 512 and 0 < len(kept) < 64
        sectors = {blk // 8 for blk in kept}
        assert kept == [blk for s in sorted(sectors) for blk in range(s * 8, s * 8 + 8)], \
            "a 4 KiB sector is kept or lost whole"
        results.append(kept)
    assert results[0] == results[1], "the same seed keeps the same blocks"
    assert results[0] != list(range(len(results[0]))), "not simply the oldest writes"


async def test_power_cut_tears_no_4k_sector_written_in_pieces() -> None:
    """A 1 KiB write inside a sector that holds older cached blocks: the sector's blocks land
    together or not at all, whatever the seed (ext4's superblock is such a write)."""
    for seed in range(40):
        inner = MemoryBackend(16 * 512)
        cache = VolatileCache(inner)
        await cache.writev(0, [memoryview(b"a" * 4096)])
        await cache.writev(1024, [memoryview(b"b" * 1024)])
        await cache.writev(4096 + 1024, [memoryview(b"c" * 1024)])
        await cache.power_cut(keep=0.5, seed=seed)
        media = bytearray(16 * 512)
        await inner.readv(0, [memoryview(media)])
        assert media[:4096] in (bytes(4096), b"a" * 1024 + b"b" * 1024 + b"a" * 2048), seed
        assert media[4096:8192] in (bytes(4096), bytes(1024) + b"c" * 1024 + bytes(2048)), seed


async def test_flush_during_power_cut_and_bad_keep() -> None:
    cache = VolatileCache(MemoryBackend(1 << 20))
    with pytest.raises(ValueError):
        await cache.power_cut(keep=2)
    with pytest.raises(ValueError):
        VolatileCache(MemoryBackend(4096), limit=100)


class SlowWrites(MemoryBackend):
    """Writes take a scheduler round each, so that other tasks run in the middle of a flush."""

    async def writev(self, offset: int, bufs: Any, fua: bool = False) -> None:
        await trio.sleep(0.001)
        await super().writev(offset, bufs, fua)


async def test_reads_and_fua_writes_during_a_flush() -> None:
    inner = SlowWrites(16 * 512)
    cache = VolatileCache(inner)
    for blk in (0, 2, 4, 6):  # four runs: the flush writes them one at a time
        await cache.writev(blk * 512, [memoryview(b"old" + bytes(509))])
    seen: list[bytes] = []

    async def reader() -> None:
        for _ in range(20):
            whole, one = bytearray(8 * 512), bytearray(512)  # a range wider than the cache, and not
            await cache.readv(0, [memoryview(whole)])
            await cache.readv(6 * 512, [memoryview(one)])
            seen.extend([bytes(whole[6 * 512 : 6 * 512 + 3]), bytes(one[:3])])
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.flush)
        nursery.start_soon(reader)
        await trio.sleep(0)
        await cache.writev(4 * 512, [memoryview(b"new" + bytes(509))], fua=True)
    assert set(seen) == {b"old"}, "a block being written back is still read from the cache"
    media = bytearray(8 * 512)
    await inner.readv(0, [memoryview(media)])
    assert media[4 * 512 : 4 * 512 + 3] == b"new", "the older write-back did not overwrite FUA data"
    assert media[6 * 512 : 6 * 512 + 3] == b"old"


def test_write_back_runs_and_evictions_keep_sectors_whole() -> None:
    """A long run is cut only where a sector starts, and an eviction takes a sector's cached
    blocks together: a power cut between two write-backs then tears no sector either."""
    from vfu_server.block.cache import _runs

    for first in range(0, 9):
        runs = _runs(list(range(first, first + 40)), 16)
        assert sum(n for _, n in runs) == 40
        for start, count in runs[:-1]:
            assert (start + count) % 8 == 0, runs


async def test_an_eviction_takes_whole_sectors() -> None:
    inner = MemoryBackend(64 * 512)
    cache = VolatileCache(inner, limit=8 * 512)  # over 4 blocks cached: the oldest half goes
    await cache.writev(3 * 512, [memoryview(b"x" * 512)])  # sector 0
    # sector 1 in one write: nine blocks cached, the oldest five go (block 3 and four of these)
    await cache.writev(8 * 512, [memoryview(b"y" * 4096)])
    media = bytearray(64 * 512)
    await inner.readv(0, [memoryview(media)])
    in_media = {blk for blk in range(16) if media[blk * 512]}
    assert in_media == {3, *range(8, 16)}, "the 4 KiB write went back whole, not half of it"
    await cache.power_cut(keep=0.0)
    await inner.readv(0, [memoryview(media)])
    assert media[8 * 512 : 16 * 512] == b"y" * 4096
