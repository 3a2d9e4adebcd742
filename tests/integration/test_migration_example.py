"""Migration of the example device between two real server processes, driven by the client:
v2 and the legacy region, opaque and standard formats, refusals, every state-machine arc, and
mutated streams that must never hurt the destination."""

from __future__ import annotations

import errno
import itertools

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfu_server.client import Client
from vfu_server.migration import driver as mg
from vfu_server.migration.fsm import MigState
from vfu_server.protocol.errors import RemoteError
from vfu_server.testing import migration_pair
from vfu_server.testing.fuzz import mutate_stream, server_processes

SCRATCH, SRC, DST, LEN, CTRL, STATUS, IRQS = 0x04, 0x08, 0x10, 0x18, 0x1C, 0x20, 0x24


async def _program_copy(dev: Client, src: int, dst: int, length: int) -> None:
    for off, value in ((SRC, src), (DST, dst), (LEN, length), (CTRL, 1)):
        await dev.write32(0, off, value)


@pytest.fixture
async def pair():
    async with migration_pair("example", ram_size=1 << 20) as (src, dst, ram):
        yield src, dst, ram


@pytest.mark.parametrize("fmt", ["opaque", "standard", "example/std/1", "ce57a4dc-accb-5abe-8b19-a5d115eca220"])
async def test_migrate_with_dma_in_flight(pair, fmt):
    src, dst, ram = pair
    await src.enable_bus_master()
    await src.write32(0, SCRATCH, 0xC0FFEE)
    ram.write(0x1000, b"before")
    await _program_copy(src, 0x1000, 0x2000, 6)

    async def guest_keeps_working() -> None:
        # The device runs during pre-copy: this copy's destination page must be reported dirty.
        ram.write(0x3000, b"during")
        await _program_copy(src, 0x3000, 0x5000, 6)

    stats = await mg.migrate(src, dst, fmt=fmt, while_precopy=guest_keeps_working)
    assert stats.total_bytes > 0 and stats.rounds == 1
    assert stats.dirty_pages >= 1, "the copy during pre-copy wrote a page that must be logged"
    assert await mg.get_state(src) == MigState.STOP
    assert await mg.get_state(dst) == MigState.RUNNING
    assert await dst.read32(0, SCRATCH) == 0xC0FFEE
    assert await dst.read32(0, IRQS) == 2
    assert ram.read(0x5000, 6) == b"during"
    # The destination device really works: a new copy through its own DMA.
    irq = (await dst.enable_msix(1))[0]
    ram.write(0x6000, b"after")
    await _program_copy(dst, 0x6000, 0x7000, 5)
    with trio.fail_after(5):
        await irq.wait()
    assert ram.read(0x7000, 5) == b"after"
    assert await dst.read32(0, IRQS) == 3


async def test_formats_listed_and_selected_in_band(pair):
    src, _, _ = pair
    formats = await mg.list_formats(src)
    kinds = {f["kind"] for f in formats}
    assert kinds == {"opaque", "standard"}
    chosen = await mg.select_format(src, "standard")
    assert [f["name"] for f in await mg.list_formats(src) if f["selected"]] == [chosen["name"]]
    with pytest.raises(ValueError, match="no migration format"):
        await mg.select_format(src, "nonsense")


async def test_standard_stream_survives_offline_round_trip(pair, tmp_path):
    src, dst, _ = pair
    await src.write32(0, SCRATCH, 0x1234)
    stream = await mg.save(src, fmt="standard")
    await mg.load(dst, stream)
    assert await dst.read32(0, SCRATCH) == 0x1234


async def _assert_clean_after_refusal(dst: Client) -> None:
    # Left as after reset: registers at power-on values, RUNNING, and still serving.
    assert await mg.get_state(dst) == MigState.RUNNING
    assert await dst.read32(0, SCRATCH) == 0
    assert await dst.read32(0, 0) == 0x56465530


async def test_opaque_into_destination_expecting_standard_is_refused(pair):
    src, dst, _ = pair
    await src.write32(0, SCRATCH, 7)
    stream = await mg.save(src, fmt="opaque")
    await dst.write32(0, SCRATCH, 99)
    await mg.select_format(dst, "standard", incoming=True)
    with pytest.raises(RemoteError) as info:
        await mg.load(dst, stream)
    assert info.value.errno == errno.EINVAL
    await _assert_clean_after_refusal(dst)


@pytest.mark.parametrize("damage", ["uuid", "checksum", "truncated", "empty-tail", "garbage"])
async def test_bad_streams_are_refused_cleanly(pair, damage):
    src, dst, _ = pair
    await src.write32(0, SCRATCH, 7)
    stream = bytearray(await mg.save(src, fmt="standard"))
    if damage == "uuid":
        stream[16] ^= 0xFF
    elif damage == "checksum":
        stream[-9] ^= 0x01
    elif damage == "truncated":
        del stream[len(stream) // 2 :]
    elif damage == "empty-tail":
        del stream[-4:]
    else:
        stream[:] = b"\x00" * 64 + b"junk"
    with pytest.raises(RemoteError):
        await mg.load(dst, bytes(stream))
    await _assert_clean_after_refusal(dst)


STATES = [MigState.STOP, MigState.RUNNING, MigState.STOP_COPY, MigState.RESUMING, MigState.PRE_COPY]
# The arcs the vfio-user spec allows directly (P2P states are not offered).
ARCS = {
    (MigState.RUNNING, MigState.STOP), (MigState.STOP_COPY, MigState.STOP), (MigState.RESUMING, MigState.STOP),
    (MigState.PRE_COPY, MigState.RUNNING), (MigState.STOP, MigState.RUNNING),
    (MigState.RUNNING, MigState.PRE_COPY), (MigState.STOP, MigState.STOP_COPY),
    (MigState.PRE_COPY, MigState.STOP_COPY), (MigState.STOP, MigState.RESUMING),
}


async def _go(dev: Client, target: MigState) -> None:
    await dev.reset()
    if target != MigState.RUNNING:
        await mg.set_state(dev, MigState.STOP if target in (MigState.STOP_COPY, MigState.RESUMING) else target)
        if target in (MigState.STOP_COPY, MigState.RESUMING):
            await mg.set_state(dev, target)
    assert await mg.get_state(dev) == target


async def test_every_v2_arc_over_the_wire(pair):
    src, dst, _ = pair
    valid = await mg.save(dst)
    for a, b in itertools.product(STATES, STATES):
        if a == b:
            continue
        await _go(src, a)
        if a == MigState.RESUMING:
            # Leaving RESUMING loads the stream: give it a complete one.
            await src.mig_data_write(valid)
        if (a, b) in ARCS:
            await mg.set_state(src, b)
            assert await mg.get_state(src) == b, (a, b)
        else:
            # Multi-arc requests are walked by the shortest path, except into or out of the
            # saving states in ways the spec forbids (STOP_COPY -> PRE_COPY, RESUMING -> saving).
            try:
                await mg.set_state(src, b)
            except RemoteError as exc:
                assert exc.errno == errno.EINVAL, (a, b)
                assert await mg.get_state(src) == a, "a refused request must not move the device"
            else:
                assert await mg.get_state(src) == b, (a, b)
    await src.reset()
    with pytest.raises(RemoteError) as info:
        await mg.set_state(src, MigState.ERROR)
    assert info.value.errno == errno.EINVAL


async def test_v1_region_save_and_load_between_servers(pair):
    src, dst, _ = pair
    info, _ = await src.region_info(9)
    assert info.size > 0 and any(getattr(c, "type", None) == 3 and c.subtype == 1 for c in info.caps)
    await src.write32(0, SCRATCH, 0xABCD)
    assert await mg.region_get_state(src) == mg.V1_RUNNING
    stream = await mg.region_save(src)
    await mg.region_load(dst, stream)
    assert await dst.read32(0, SCRATCH) == 0xABCD
    assert await mg.region_get_state(dst) == mg.V1_RUNNING


async def test_v1_region_format_registers(pair):
    src, dst, _ = pair
    assert await src.read(9, 0x20, 4) == 0x46554656  # "VFUF": the format extension is present
    count = await src.read(9, 0x24, 4)
    kinds = {}
    for i in range(count):
        await src.write(9, 0x28, i, 4)
        kinds[await src.read(9, 0x46, 1)] = i
    assert set(kinds) == {0, 1}  # 0 standard, 1 opaque
    standard = kinds[0]
    await src.write(9, 0x28, standard, 4)
    await src.write(9, 0x48, standard, 4)  # select the standard format for saving
    stream = await mg.region_save(src)
    uuid_raw = await src.region_read(9, 0x30, 16)
    assert stream[16:32] == uuid_raw
    # illegal v1 transition: RESUMING while SAVING|RUNNING is refused
    await mg.region_set_state(dst, mg.V1_SAVING | mg.V1_RUNNING)
    with pytest.raises(RemoteError):
        await mg.region_set_state(dst, mg.V1_RESUMING | mg.V1_SAVING)


@pytest.fixture(scope="module")
def server_pair_paths():
    """Two example servers for the whole module (hypothesis examples reconnect to them)."""
    with server_processes("example") as paths:
        yield paths


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_streams_never_hurt_the_destination(server_pair_paths, data):
    src_path, dst_path = server_pair_paths
    fmt = data.draw(st.sampled_from(["opaque", "standard"]))

    async def one_example() -> None:
        async with await Client.connect(src_path) as src, await Client.connect(dst_path) as dst:
            stream = mutate_stream(data, await mg.save(src, fmt=fmt))
            with trio.fail_after(10):
                try:
                    await mg.load(dst, stream)
                except RemoteError as exc:
                    assert exc.errno in (errno.EINVAL, errno.EBADMSG, errno.EPROTO, errno.EFBIG, errno.E2BIG)
                    await _assert_clean_after_refusal(dst)
                assert await dst.read32(0, 0) == 0x56465530

    trio.run(one_example)
