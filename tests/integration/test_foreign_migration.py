"""Migration against a server without this project's vendor features (point 5 of issue 17).

The spec's migration is DEVICE_FEATURE MIGRATION / MIG_DEVICE_STATE and MIG_DATA_READ/WRITE;
listing and choosing formats (0xF100..) and the refusal reason (0xF103) are this project's
additions. A client must still migrate between servers that only speak the spec: their stream
is their own opaque format, and a note says so. The servers here are real processes running
``foreign_migration_device:ForeignEngine``, which answers vendor features with EINVAL and keeps
its migration state across DEVICE_RESET, as libvfio-user does.
"""

from __future__ import annotations

import os
import sys
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from vfu_server.client import Client, GuestRam
from vfu_server.migration import driver as mg
from vfu_server.migration.fsm import MigState
from vfu_server.protocol.errors import RemoteError
from vfu_server.testing import running_server

HERE = os.path.dirname(os.path.abspath(__file__))
FOREIGN = "foreign_migration_device:ForeignEngine"
SCRATCH = 0x04
TIMEOUT = 60


@asynccontextmanager
async def servers(*devices: str):
    """One running server per device name, foreign or ours, importable from this directory."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_server(d, env={"PYTHONPATH": HERE})) for d in devices]


@asynccontextmanager
async def clients(*paths: str):
    async with await Client.connect(paths[0]) as a:
        if len(paths) == 1:
            yield [a]
            return
        async with await Client.connect(paths[1]) as b:
            yield [a, b]


async def test_migrate_between_servers_that_list_no_formats() -> None:
    """Two foreign servers: migrate() moves the state, names the stream the source's own
    opaque format and says so in one note."""
    notes: list[str] = []
    with trio.fail_after(TIMEOUT):
        async with servers(FOREIGN, FOREIGN) as (a, b), clients(a.socket_path, b.socket_path) as (src, dst):
            with GuestRam(1 << 20) as ram:
                await src.dma_map(ram)
                await dst.dma_map(ram)
                with pytest.raises(RemoteError):  # the premise: no vendor feature here
                    await mg.list_formats(src)
                await src.write32(0, SCRATCH, 0x5EED)
                stats = await mg.migrate(src, dst, note=notes.append)
                assert stats.format == mg.SERVER_OPAQUE and stats.total_bytes > 0
                assert await mg.get_state(dst) == MigState.RUNNING
                assert await mg.get_state(src) == MigState.STOP
                assert await dst.read32(0, SCRATCH) == 0x5EED
    assert len(notes) == 1, notes
    assert "no vendor feature 0xF100" in notes[0] and "opaque" in notes[0] and a.socket_path in notes[0]


async def test_save_and_load_without_vendor_features() -> None:
    notes: list[str] = []
    with trio.fail_after(TIMEOUT):
        async with servers(FOREIGN, FOREIGN) as (a, b):
            async with clients(a.socket_path) as (src,):
                await src.write32(0, SCRATCH, 0xABCD)
                stream = await mg.save(src, note=notes.append)
                assert await mg.get_state(src) == MigState.RUNNING
                with pytest.raises(ValueError, match="no vendor feature 0xF100"):
                    await mg.save(src, fmt="standard")
            async with clients(b.socket_path) as (dst,):
                await mg.load(dst, stream, note=notes.append)
                assert await dst.read32(0, SCRATCH) == 0xABCD
    assert len(notes) == 1 and "opaque" in notes[0], notes


async def test_mixed_directions() -> None:
    """Foreign source into our server and back: the stream is the same device's opaque one,
    and our destination identifies it from its own header."""
    with trio.fail_after(TIMEOUT):
        async with servers(FOREIGN, "example") as (a, b), clients(a.socket_path, b.socket_path) as (foreign, ours):
            await foreign.write32(0, SCRATCH, 1)
            await mg.migrate(foreign, ours, dma_logging=False, note=lambda _: None)
            assert await ours.read32(0, SCRATCH) == 1
            await ours.write32(0, SCRATCH, 2)
            await mg.set_state(foreign, MigState.RUNNING)
            await mg.migrate(ours, foreign, fmt="opaque", dma_logging=False)
            assert await foreign.read32(0, SCRATCH) == 2


async def test_clean_up_does_not_assume_reset_leaves_resuming() -> None:
    """Spec: "To recover from ERROR, VFIO_USER_DEVICE_RESET must be used to return back to
    RUNNING" -- nothing says a reset ends RESUMING, and libvfio-user's does not. After a refused
    stream, load() reads the state back instead of assuming, and says where the device was
    left; our own server is back in RUNNING and needs no note."""
    garbage = b"\x00" * 64 + b"junk"
    notes: list[str] = []
    with trio.fail_after(TIMEOUT):
        async with servers(FOREIGN, "example") as (a, b), clients(a.socket_path, b.socket_path) as (foreign, ours):
            with pytest.raises(RemoteError):
                await mg.load(foreign, garbage, note=notes.append)
            assert await mg.get_state(foreign) == MigState.RESUMING
            assert notes == ["note: the destination could not be returned to RUNNING and is left in RESUMING"]
            notes.clear()
            with pytest.raises(RemoteError):
                await mg.load(ours, garbage, note=notes.append)
            assert await mg.get_state(ours) == MigState.RUNNING
            assert notes == []


async def test_source_runs_again_after_a_refusal() -> None:
    """A destination that refuses mid-migration leaves the source running the guest's device
    (STOP_COPY -> STOP -> RUNNING through MIG_DEVICE_STATE, no reset of the source)."""
    with trio.fail_after(TIMEOUT):
        async with servers(FOREIGN, "virtio-rng") as (a, b), clients(a.socket_path, b.socket_path) as (src, dst):
            await src.write32(0, SCRATCH, 77)
            with pytest.raises(RemoteError):
                await mg.migrate(src, dst, dma_logging=False, note=lambda _: None)
            assert await mg.get_state(src) == MigState.RUNNING
            assert await src.read32(0, SCRATCH) == 77
            assert await mg.get_state(dst) == MigState.RUNNING


async def _vfu_migrate(*args: str) -> tuple[int, str]:
    proc = await trio.run_process([sys.executable, "-m", "vfu_server.migration.cli", *args],
                                  capture_stdout=True, capture_stderr=True, check=False)
    return proc.returncode, proc.stderr.decode()


async def test_vfu_migrate_save_load_run_print_the_note(tmp_path) -> None:
    state = str(tmp_path / "state.bin")
    with trio.fail_after(TIMEOUT):
        async with servers(FOREIGN, FOREIGN) as (a, b):
            async with clients(a.socket_path) as (src,):
                await src.write32(0, SCRATCH, 0x77)
            rc, err = await _vfu_migrate("save", "--from", a.socket_path, state)
            assert rc == 0, err
            assert f"note: {a.socket_path} lists no migration formats (no vendor feature 0xF100)" in err
            rc, err = await _vfu_migrate("load", "--to", b.socket_path, state)
            assert rc == 0, err
            async with clients(b.socket_path) as (dst,):
                assert await dst.read32(0, SCRATCH) == 0x77
                await dst.write32(0, SCRATCH, 0x78)
            rc, err = await _vfu_migrate("run", "--from", b.socket_path, "--to", a.socket_path)
            assert rc == 0, err
            assert "opaque" in err
            async with clients(a.socket_path) as (dst,):
                assert await dst.read32(0, SCRATCH) == 0x78
