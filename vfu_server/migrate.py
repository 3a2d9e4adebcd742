"""Driving a migration from the client side: list and select formats, save, load, migrate.

QEMU 11.1's vfio-user client cannot migrate a vfio-user device, so this is how a device's
migration is exercised today (and how device developers test theirs)::

    async with await Client.connect(src_path) as src, await Client.connect(dst_path) as dst:
        await dst.dma_map(ram)                 # the destination sees the same guest memory
        stats = await migrate(src, dst, fmt="standard", progress=print)
        print(stats.downtime, stats.total_bytes)

The sequence follows the vfio-user v2 state machine: the destination goes to RESUMING; the
source to PRE_COPY (if offered) and its pre-copy data is streamed while the device still
runs; then the source goes to STOP_COPY (the device quiesces: downtime starts), the rest of the
stream is copied, the destination goes to RUNNING (downtime ends) and the source to STOP.
DMA dirty logging runs on the source from the start to the end, and the pages it reports are
counted (with shared guest memory nothing has to be copied for them).
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .client import Client
from .migration.fsm import MigrationFeature, MigState
from .protocol.constants import Feature

_STATE = struct.Struct("<Ii")
_LIST_HDR = struct.Struct("<HHI")
_ENTRY = struct.Struct("<16sHHHBB40s")
_SELECT = struct.Struct("<16sHH")
_KINDS = {0: "standard", 1: "opaque"}
CHUNK = 64 * 1024


@dataclass
class Progress:
    phase: str  # "pre-copy", "stop-copy", "resume", "done"
    bytes: int
    rounds: int


@dataclass
class MigrationStats:
    format: str = ""
    format_uuid: str = ""
    precopy_bytes: int = 0
    stopcopy_bytes: int = 0
    rounds: int = 0
    downtime: float = 0.0
    total_time: float = 0.0
    dirty_pages: int = 0
    log: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.precopy_bytes + self.stopcopy_bytes


async def migration_features(client: Client) -> MigrationFeature:
    data = await client.feature(Feature.MIGRATION, get=True)
    return MigrationFeature(struct.unpack_from("<Q", data)[0])


async def get_state(client: Client) -> MigState:
    data = await client.feature(Feature.MIG_DEVICE_STATE, get=True)
    return MigState(_STATE.unpack_from(data)[0])


async def set_state(client: Client, state: MigState) -> None:
    await client.feature(Feature.MIG_DEVICE_STATE, set=True, data=_STATE.pack(state, -1))


async def list_formats(client: Client) -> list[dict]:
    """The device's formats through the in-band DEVICE_FEATURE 0xF100 extension."""
    data = await client.feature(Feature.MIG_FORMATS, get=True, argsz=8 + 8 + 64 * 64)
    count, size, _ = _LIST_HDR.unpack_from(data)
    out = []
    for i in range(count):
        raw, major, mmin, mmax, kind, flags, name = _ENTRY.unpack_from(data, _LIST_HDR.size + i * size)
        out.append({
            "uuid": str(uuid.UUID(bytes=raw)), "name": name.rstrip(b"\0").decode(), "kind": _KINDS.get(kind, "?"),
            "major": major, "minor_min": mmin, "minor_max": mmax,
            "selected": bool(flags & 1), "default": bool(flags & 2),
        })
    return out


def _match(formats: list[dict], key: str) -> dict:
    for f in formats:
        if key in (f["uuid"], f["name"], f["kind"]):
            return f
    names = ", ".join(f"{f['name']} ({f['kind']})" for f in formats)
    raise ValueError(f"no migration format {key!r}; the device offers {names}")


async def select_format(client: Client, key: str, *, incoming: bool = False) -> dict:
    """Select the outgoing format (or pin the incoming one) by name, kind or UUID."""
    fmt = _match(await list_formats(client), key)
    await client.feature(Feature.MIG_FORMAT_SELECT, set=True,
                         data=_SELECT.pack(uuid.UUID(fmt["uuid"]).bytes, 0xFFFF, 1 if incoming else 0))
    return fmt


async def _read_all(client: Client, chunk: int) -> bytes:
    out = bytearray()
    while True:
        data = await client.mig_data_read(chunk)
        out += data
        if len(data) < chunk:
            return bytes(out)


async def _write_all(client: Client, data: bytes, chunk: int) -> None:
    for pos in range(0, len(data), chunk):
        await client.mig_data_write(data[pos : pos + chunk])


async def save(client: Client, *, fmt: str | None = None, chunk: int = CHUNK, resume: bool = True) -> bytes:
    """Snapshot a device: its whole state stream. The device runs again afterwards if ``resume``."""
    if fmt is not None:
        await select_format(client, fmt)
    await set_state(client, MigState.STOP_COPY)
    stream = await _read_all(client, chunk)
    await set_state(client, MigState.RUNNING if resume else MigState.STOP)
    return stream


async def load(client: Client, stream: bytes, *, chunk: int = CHUNK, run: bool = True) -> None:
    """Load a saved stream into a device (RESUMING, write, then RUNNING or STOP)."""
    await set_state(client, MigState.RESUMING)
    try:
        await _write_all(client, stream, chunk)
        await set_state(client, MigState.RUNNING if run else MigState.STOP)
    except BaseException:
        # Leave the destination clean (as after reset) instead of stuck in RESUMING.
        await client.reset()
        raise


async def migrate(
    src: Client,
    dst: Client,
    *,
    fmt: str | None = None,
    chunk: int = CHUNK,
    precopy: bool = True,
    dma_logging: bool = True,
    progress: Callable[[Progress], None] | None = None,
    while_precopy: Callable[[], object] | None = None,
) -> MigrationStats:
    """Move the device state from ``src`` to ``dst``. ``while_precopy`` (an async callable)
    runs while the source is in PRE_COPY, e.g. to keep guest I/O going."""
    stats = MigrationStats()
    t0 = time.perf_counter()
    report = progress or (lambda p: None)
    if fmt is not None:
        chosen = await select_format(src, fmt)
    else:
        chosen = next((f for f in await list_formats(src) if f["selected"]), {"name": "", "uuid": ""})
    stats.format, stats.format_uuid = chosen["name"], chosen["uuid"]
    features = await migration_features(src)
    logging_on = False
    if dma_logging:
        ranges = [(mp.iova, mp.size) for mp in src._maps]
        payload = struct.pack("<QII", 4096, len(ranges), 0) + b"".join(struct.pack("<QQ", a, s) for a, s in ranges)
        await src.feature(Feature.DMA_LOGGING_START, set=True, data=payload)
        logging_on = True
    await set_state(dst, MigState.RESUMING)
    try:
        if precopy and features & MigrationFeature.PRE_COPY:
            await set_state(src, MigState.PRE_COPY)
            if while_precopy is not None:
                await while_precopy()  # type: ignore[misc]
            data = await _read_all(src, chunk)
            stats.rounds += 1
            stats.precopy_bytes += len(data)
            await _write_all(dst, data, chunk)
            report(Progress("pre-copy", stats.precopy_bytes, stats.rounds))
        down = time.perf_counter()
        await set_state(src, MigState.STOP_COPY)
        data = await _read_all(src, chunk)
        stats.stopcopy_bytes = len(data)
        await _write_all(dst, data, chunk)
        report(Progress("stop-copy", stats.total_bytes, stats.rounds))
        if logging_on:
            for mp in src._maps:
                bitmap = await src.feature(Feature.DMA_LOGGING_REPORT, get=True,
                                           data=struct.pack("<QQQ", mp.iova, mp.size, 4096),
                                           argsz=8 + 24 + ((mp.size // 4096 + 63) // 64) * 8)
                stats.dirty_pages += sum(bin(b).count("1") for b in bitmap[24:])
        await set_state(dst, MigState.RUNNING)
        stats.downtime = time.perf_counter() - down
        report(Progress("resume", stats.total_bytes, stats.rounds))
        await set_state(src, MigState.STOP)
    except BaseException:
        await dst.reset()
        raise
    finally:
        if logging_on:
            try:
                await src.feature(Feature.DMA_LOGGING_STOP, set=True)
            except Exception:
                pass
    stats.total_time = time.perf_counter() - t0
    report(Progress("done", stats.total_bytes, stats.rounds))
    return stats


# -- the legacy (v1) migration region, region 9 -------------------------------------------------

REGION = 9
V1_RUNNING, V1_SAVING, V1_RESUMING = 1, 2, 4
_R_STATE, _R_PENDING, _R_DATA_OFFSET, _R_DATA_SIZE = 0x00, 0x08, 0x10, 0x18


async def region_set_state(client: Client, v1_state: int) -> None:
    await client.write(REGION, _R_STATE, v1_state, 4)


async def region_get_state(client: Client) -> int:
    return await client.read(REGION, _R_STATE, 4)


async def region_save(client: Client, *, resume: bool = True) -> bytes:
    """Save through the v1 region: SAVING, then (pending_bytes, data_offset, data_size, read the
    window) until pending_bytes is 0, the v1 way."""
    await region_set_state(client, V1_SAVING)
    out = bytearray()
    for _ in range(1 << 16):
        pending = await client.read(REGION, _R_PENDING, 8)
        offset = await client.read(REGION, _R_DATA_OFFSET, 8)  # stages the next chunk
        size = await client.read(REGION, _R_DATA_SIZE, 8)
        if size:
            out += await client.region_read(REGION, offset, size)
        if not size and not pending:
            break
    await region_set_state(client, V1_RUNNING if resume else 0)
    return bytes(out)


async def region_load(client: Client, stream: bytes, *, run: bool = True) -> None:
    """Load through the v1 region: RESUMING, write each chunk into the window and commit it by
    writing data_size, then RUNNING (or stopped)."""
    await region_set_state(client, V1_RESUMING)
    offset = await client.read(REGION, _R_DATA_OFFSET, 8)
    info, _ = await client.region_info(REGION)
    window = info.size - offset
    try:
        for pos in range(0, len(stream), window):
            chunk = stream[pos : pos + window]
            await client.region_write(REGION, offset, chunk)
            await client.write(REGION, _R_DATA_SIZE, len(chunk), 8)
        await region_set_state(client, V1_RUNNING if run else 0)
    except BaseException:
        await client.reset()
        raise
