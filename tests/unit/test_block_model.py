"""Property test: File and Memory backends behave like a plain bytearray.

Random sequences of reads, scattered writes, discards, zeroing, flushes and (for files)
close/reopen are applied to a backend and to a bytearray model; every read must match the
model and every out-of-range request must raise BlockRangeError without changing anything.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfu_server.block import BlockBackend, BlockRangeError, FileBackend, MemoryBackend

# Every flush, FUA write and reopen is an fdatasync; on tmpfs those are free, on a VM's disk
# they made this test take half a minute.  ext4/xfs specifics are covered in test_block_file.
FAST_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

# Small enough to hit the edges often, several pages so MADV_DONTNEED / hole punching
# of whole pages mixes with ragged edges.
SIZE = 5 * 4096 + 512

# Mostly in range (the interesting case), sometimes just outside it.
offsets = st.one_of(
    st.integers(0, SIZE), st.integers(0, SIZE), st.integers(0, SIZE), st.integers(-8, SIZE + 8)
)
lengths = st.integers(0, 2 * 4096)
splits = st.lists(st.integers(0, 2 * 4096), max_size=4)
# Nonzero bytes, so that a zeroing bug cannot hide behind data that was zero anyway.
payloads = st.one_of(
    st.builds(
        lambda n, s: bytes((i * 31 + s) % 251 + 1 for i in range(n)), lengths, st.integers(0, 250)
    ),
    st.binary(max_size=2 * 4096),
)

ops = st.one_of(
    st.tuples(st.just("write"), offsets, payloads, splits, st.booleans()),
    st.tuples(st.just("read"), offsets, lengths, splits),
    st.tuples(st.just("discard"), offsets, lengths),
    st.tuples(st.just("zero"), offsets, lengths, st.booleans()),
    st.tuples(st.just("flush")),
    st.tuples(st.just("reopen")),
)


def cut(data: bytes | bytearray, points: list[int]) -> list[memoryview]:
    """Split a buffer into an iovec at arbitrary points (possibly empty pieces)."""
    mv = memoryview(data)
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [mv[a:b] for a, b in itertools.pairwise(bounds)]


async def run_ops(kind: str, path: Path, sequence: list[tuple[Any, ...]]) -> None:
    model = bytearray(SIZE)

    def open_() -> BlockBackend:
        if kind == "file":
            return FileBackend(path, size=SIZE)
        return MemoryBackend(SIZE)

    backend = open_()
    try:
        for op in sequence:
            name = op[0]
            if name == "reopen":
                if kind == "file":  # memory contents do not survive, by design
                    await backend.aclose()
                    backend = open_()
                continue
            if name == "flush":
                await backend.flush()
                continue
            offset = op[1]
            length = len(op[2]) if name == "write" else op[2]
            in_range = offset >= 0 and offset + length <= SIZE
            try:
                if name == "write":
                    await backend.writev(offset, cut(op[2], op[3]), fua=op[4])
                    if in_range:
                        model[offset : offset + length] = op[2]
                elif name == "read":
                    buf = bytearray(length)
                    await backend.readv(offset, cut(buf, op[3]))
                    assert buf == model[offset : offset + length], (offset, length)
                elif name == "discard":
                    await backend.discard(offset, length)
                    if in_range:
                        model[offset : offset + length] = bytes(length)
                else:
                    await backend.write_zeroes(offset, length, may_unmap=op[3])
                    if in_range:
                        model[offset : offset + length] = bytes(length)
            except BlockRangeError:
                assert not in_range, op[:2]
            else:
                assert in_range, op[:2]
        whole = bytearray(SIZE)
        await backend.readv(0, [memoryview(whole)])
        assert whole == model
    finally:
        await backend.aclose()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["file", "memory"]), sequence=st.lists(ops, min_size=10, max_size=60))
def test_backends_match_bytearray_model(kind: str, sequence: list[tuple[Any, ...]]) -> None:
    # A fresh directory per example: hypothesis reruns the body, tmp_path would be shared.
    with tempfile.TemporaryDirectory(dir=FAST_DIR) as d:
        trio.run(run_ops, kind, Path(d) / "disk.raw", sequence)
