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

Servers that are not this project's (libvfio-user's, say) have no vendor features 0xF100..0xF103:
their stream is whatever their device writes, so it is treated as that server's own opaque
format and a one-line note says so (``note``, logged at info when no callable is given).
"""

from __future__ import annotations

import errno
import logging
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ..client import Client
from ..protocol.constants import Feature
from ..protocol.errors import RemoteError, VfioUserError
from .fsm import MigrationFeature, MigState

_STATE = struct.Struct("<Ii")
_LIST_HDR = struct.Struct("<HHI")
_ENTRY = struct.Struct("<16sHHHBB40s")
_SELECT = struct.Struct("<16sHH")
_KINDS = {0: "standard", 1: "opaque"}
_LAST_ERROR = struct.Struct("<iI")  # errno, reason length; the UTF-8 reason follows
CHUNK = 64 * 1024
#: What a server says to a DEVICE_FEATURE index it does not know: libvfio-user EINVAL, the
#: kernel and this project's server for indices outside migration ENOTTY.
_UNKNOWN_FEATURE = {errno.EINVAL, errno.ENOTTY, errno.ENOTSUP, errno.EOPNOTSUPP}
#: The name :class:`MigrationStats` gives a stream from a server that lists no formats.
SERVER_OPAQUE = "server-opaque"

log = logging.getLogger("vfu_server.migration.driver")
Note = Callable[[str], object]


class MigrationRefused(RemoteError):
    """The destination refused the stream; :attr:`reason` is what it said, when it could say."""

    def __init__(self, message: str, errno: int, reason: str | None) -> None:
        super().__init__(message, errno)
        self.reason = reason


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


async def offered_formats(client: Client) -> list[dict] | None:
    """:func:`list_formats`, or None when the server has no vendor feature 0xF100 (not this
    project's server): its stream is then its own opaque format."""
    try:
        return await list_formats(client)
    except RemoteError as exc:
        if exc.errno in _UNKNOWN_FEATURE:
            return None
        raise


def no_formats_note(client: Client) -> str:
    where = client.path or "the server"
    return (f"note: {where} lists no migration formats (no vendor feature 0xF100): its stream is "
            "treated as that server's own opaque format")


def _emit(note: Note | None, text: str) -> None:
    if note is None:
        log.info("%s", text)
    else:
        note(text)


async def refusal_reason(client: Client) -> tuple[int, str] | None:
    """Why the device last refused migration data or a state change, through vendor feature
    0xF103 (errno and a one-line reason); None from a server that cannot say."""
    try:
        data = await client.feature(Feature.MIG_LAST_ERROR, get=True, argsz=8 + _LAST_ERROR.size + 1024)
    except (RemoteError, VfioUserError):
        return None
    if len(data) < _LAST_ERROR.size:
        return None
    code, length = _LAST_ERROR.unpack_from(data)
    if not code:
        return None
    return code, bytes(data[_LAST_ERROR.size : _LAST_ERROR.size + length]).decode(errors="replace")


async def _refused(client: Client, exc: RemoteError) -> RemoteError:
    """``exc`` with the destination's own reason attached, when it gives one."""
    said = await refusal_reason(client)
    if said is None or said[0] != exc.errno:
        return exc
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    return MigrationRefused(f"destination refused the stream: {said[1]} ({name})", exc.errno, said[1])


async def _recover(client: Client, *, reset: bool, note: Note | None, who: str) -> None:
    """Bring a device whose migration failed back to RUNNING, best effort and without hiding
    the failure. DEVICE_RESET is not assumed to do it: libvfio-user keeps the migration state
    across a reset (its #844), so the state is read back and, if need be, asked for."""
    with trio.CancelScope(shield=True), trio.move_on_after(30):
        try:
            if await get_state(client) is MigState.RUNNING:
                return
            if reset:
                await client.reset()
                if await get_state(client) is MigState.RUNNING:
                    return
            await set_state(client, MigState.RUNNING)
            return
        except VfioUserError:
            pass
        try:
            left = (await get_state(client)).name
        except (VfioUserError, ValueError):
            left = "an unknown state"
        _emit(note, f"note: the {who} could not be returned to RUNNING and is left in {left}")


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
    # A reply shorter than asked ends the stream, so never ask for more than one message may
    # carry: a conforming server refuses that (EINVAL) rather than answer short.
    chunk = min(chunk, client.max_transfer)
    out = bytearray()
    while True:
        data = await client.mig_data_read(chunk)
        out += data
        if len(data) < chunk:
            return bytes(out)


async def _write_all(client: Client, data: bytes, chunk: int) -> None:
    chunk = min(chunk, client.max_transfer)
    for pos in range(0, len(data), chunk):
        await client.mig_data_write(data[pos : pos + chunk])


async def _choose(client: Client, fmt: str | None, note: Note | None) -> dict:
    """The format ``client`` will save in: ``fmt`` selected (or the selected one), or, from a
    server that lists none, its own opaque format (only ``None`` or ``"opaque"`` can mean that)."""
    formats = await offered_formats(client)
    if formats is None:
        if fmt not in (None, "opaque"):
            raise ValueError(f"format {fmt!r} cannot be chosen: the server lists no migration formats "
                             "(no vendor feature 0xF100), only its own opaque stream")
        _emit(note, no_formats_note(client))
        return {"name": SERVER_OPAQUE, "uuid": "", "kind": "opaque"}
    if fmt is not None:
        return await select_format(client, fmt)
    return next((f for f in formats if f["selected"]), {"name": "", "uuid": ""})


async def save(client: Client, *, fmt: str | None = None, chunk: int = CHUNK, resume: bool = True,
               note: Note | None = None) -> bytes:
    """Snapshot a device: its whole state stream. The device runs again afterwards if ``resume``."""
    await _choose(client, fmt, note)
    await set_state(client, MigState.STOP_COPY)
    try:
        stream = await _read_all(client, chunk)
    except BaseException:
        await _recover(client, reset=False, note=note, who="source")
        raise
    await set_state(client, MigState.RUNNING if resume else MigState.STOP)
    return stream


async def load(client: Client, stream: bytes, *, chunk: int = CHUNK, run: bool = True,
               note: Note | None = None) -> None:
    """Load a saved stream into a device (RESUMING, write, then RUNNING or STOP). A refusal is
    raised as :class:`MigrationRefused` with the device's reason when it gives one (0xF103)."""
    await set_state(client, MigState.RESUMING)
    try:
        await _write_all(client, stream, chunk)
        await set_state(client, MigState.RUNNING if run else MigState.STOP)
    except RemoteError as exc:
        # The reason first: the clean-up's own state changes may record errors of their own.
        refused = await _refused(client, exc)
        await _recover(client, reset=True, note=note, who="destination")
        if refused is exc:
            raise
        raise refused from exc
    except BaseException:
        # Leave the destination clean (as after reset) instead of stuck in RESUMING.
        await _recover(client, reset=True, note=note, who="destination")
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
    note: Note | None = None,
) -> MigrationStats:
    """Move the device state from ``src`` to ``dst``. ``while_precopy`` (an async callable)
    runs while the source is in PRE_COPY, e.g. to keep guest I/O going. On failure the
    destination is reset and both devices are asked back to RUNNING (the source keeps running
    the guest's device)."""
    stats = MigrationStats()
    t0 = time.perf_counter()
    report = progress or (lambda p: None)
    chosen = await _choose(src, fmt, note)
    stats.format, stats.format_uuid = chosen["name"], chosen["uuid"]
    features = await migration_features(src)
    logging_on = False
    if dma_logging and await _supports(src, Feature.DMA_LOGGING_START, note):
        ranges = [(mp.iova, mp.size) for mp in src._maps]
        payload = struct.pack("<QII", 4096, len(ranges), 0) + b"".join(struct.pack("<QQ", a, s) for a, s in ranges)
        await src.feature(Feature.DMA_LOGGING_START, set=True, data=payload)
        logging_on = True
    async def to_dst(step: Awaitable[None]) -> None:
        try:
            await step
        except RemoteError as exc:
            refused = await _refused(dst, exc)
            if refused is exc:
                raise
            raise refused from exc

    await set_state(dst, MigState.RESUMING)
    try:
        if precopy and features & MigrationFeature.PRE_COPY:
            await set_state(src, MigState.PRE_COPY)
            if while_precopy is not None:
                await while_precopy()  # type: ignore[misc]
            data = await _read_all(src, chunk)
            stats.rounds += 1
            stats.precopy_bytes += len(data)
            await to_dst(_write_all(dst, data, chunk))
            report(Progress("pre-copy", stats.precopy_bytes, stats.rounds))
        down = time.perf_counter()
        await set_state(src, MigState.STOP_COPY)
        data = await _read_all(src, chunk)
        stats.stopcopy_bytes = len(data)
        await to_dst(_write_all(dst, data, chunk))
        report(Progress("stop-copy", stats.total_bytes, stats.rounds))
        if logging_on:
            for mp in src._maps:
                bitmap = await src.feature(Feature.DMA_LOGGING_REPORT, get=True,
                                           data=struct.pack("<QQQ", mp.iova, mp.size, 4096),
                                           argsz=8 + 24 + ((mp.size // 4096 + 63) // 64) * 8)
                stats.dirty_pages += sum(bin(b).count("1") for b in bitmap[24:])
        await to_dst(set_state(dst, MigState.RUNNING))
        stats.downtime = time.perf_counter() - down
        report(Progress("resume", stats.total_bytes, stats.rounds))
        await set_state(src, MigState.STOP)
    except BaseException:
        await _recover(dst, reset=True, note=note, who="destination")
        await _recover(src, reset=False, note=note, who="source")
        raise
    finally:
        if logging_on:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                try:
                    await src.feature(Feature.DMA_LOGGING_STOP, set=True)
                except VfioUserError:
                    pass
    stats.total_time = time.perf_counter() - t0
    report(Progress("done", stats.total_bytes, stats.rounds))
    return stats


async def _supports(client: Client, feature: int, note: Note | None) -> bool:
    """PROBE a SET feature; a server without it gets a note instead of a failed migration."""
    try:
        await client.feature(feature, set=True, probe=True)
    except RemoteError as exc:
        if exc.errno not in _UNKNOWN_FEATURE:
            raise
        _emit(note, f"note: the source has no DEVICE_FEATURE {feature} ({Feature(feature).name}); "
                    "dirty pages are not counted")
        return False
    return True


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
