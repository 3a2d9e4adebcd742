"""Per-device migration controller: FSM + sessions + format selection, sans-IO.

This is what the server wires to the wire protocol:

=====================================  ==========================================
vfio-user                              controller
=====================================  ==========================================
DEVICE_FEATURE (16), any index         :meth:`MigrationController.device_feature`
MIG_DATA_READ (17)                     :meth:`MigrationController.read_data`
MIG_DATA_WRITE (18)                    :meth:`MigrationController.write_data`
device reset                           :meth:`MigrationController.reset`
control socket, one JSON object/line   :meth:`MigrationController.handle_control`
v1 migration region (legacy)           :class:`vfu_server.migration.region.MigrationRegion`
=====================================  ==========================================

The device supplies a :class:`MigratableDevice`; it sees single FSM arcs via
``migration_arc`` and never touches streams.
"""

from __future__ import annotations

import errno
import struct
import uuid
from typing import Any, Protocol, runtime_checkable

from .errors import MigrationError
from .formats import PRODUCER_UUID, FormatSet, StateFormat
from .fsm import SAVING_GROUP, MigrationFeature, MigrationStateMachine, MigState
from .generic import PciProfile, profile_to_record
from .session import LoadSession, SaveSession

__all__ = [
    "FEATURE_MIGRATION",
    "FEATURE_MIG_DEVICE_STATE",
    "FEATURE_MIG_FORMATS",
    "FEATURE_MIG_FORMAT_SELECT",
    "FEATURE_MIG_LAST_ERROR",
    "FEATURE_MIG_PROFILE",
    "MigratableDevice",
    "MigrationController",
]

FEATURE_MIGRATION = 1
FEATURE_MIG_DEVICE_STATE = 2
#: vfu-server private indices, far from the kernel's 0..11 (docs/migration-format.md 7.2).
FEATURE_MIG_FORMATS = 0xF100
FEATURE_MIG_FORMAT_SELECT = 0xF101
FEATURE_MIG_PROFILE = 0xF102
#: GET: why the device last refused migration data or a state change (docs/migration-format.md
#: 7.2): ``{i32 errno; u32 length}`` + the UTF-8 reason; errno 0 when nothing was refused.
FEATURE_MIG_LAST_ERROR = 0xF103

FEAT_MASK = 0xFFFF
FEAT_GET = 1 << 16
FEAT_SET = 1 << 17
FEAT_PROBE = 1 << 18

_MIG_STATE = struct.Struct("<Ii")  # device_state, data_fd (unused by vfio-user: -1)
_SELECT = struct.Struct("<16sHH")  # uuid, minor, flags
_LAST_ERROR = struct.Struct("<iI")  # errno, reason length
MAX_REASON = 1024
SELECT_INCOMING = 1 << 0  # flags: apply as expect-incoming (destination) instead
MINOR_MAX = 0xFFFF  # "the highest minor this side supports"
_FMT_LIST_HDR = struct.Struct("<HHI")  # count, entry_size, reserved
_FMT_ENTRY = struct.Struct("<16sHHHBB40s")  # uuid, major, minor_min, minor_max, kind, flags, name
FMT_KIND = {"standard": 0, "opaque": 1}
FMT_FLAG_SELECTED = 1 << 0
FMT_FLAG_DEFAULT = 1 << 1


@runtime_checkable
class MigratableDevice(Protocol):
    """What a device implements to be migratable."""

    def migration_arc(self, src: MigState, dst: MigState) -> None:
        """Do the work of one FSM arc (stop/start DMA and interrupts).  Raise
        MigrationError to refuse (device stays in ``src``)."""

    def save_state(self) -> Any:
        """Return the current state as plain data.  Called after the device has
        quiesced (entering STOP_COPY) and, for the PRE_COPY preview, while running."""

    def load_state(self, state: Any) -> None:
        """Apply a fully validated state.  Called on RESUMING -> STOP only."""

    def reset_state(self) -> None:
        """Return to power-on state (entering RESUMING: the load target is clean)."""

    def migration_profile(self) -> PciProfile | None:
        """This device's guest-visible profile (destination-side compatibility)."""


class MigrationController:
    """One per device instance."""

    def __init__(
        self,
        device: MigratableDevice,
        formats: FormatSet,
        *,
        features: int = MigrationFeature.STOP_COPY | MigrationFeature.PRE_COPY,
        initial: MigState = MigState.RUNNING,
        producer_uuid: uuid.UUID | None = PRODUCER_UUID,
    ) -> None:
        self.device = device
        self.formats = formats
        self.fsm = MigrationStateMachine(features, self._on_arc, initial)
        self.producer_uuid = producer_uuid
        self.selected: StateFormat = formats.default
        self.selected_minor: int | None = None
        self.expected: StateFormat | None = None
        self.save: SaveSession | None = None
        self.load: LoadSession | None = None
        self.last_error: MigrationError | None = None
        #: Format of the last completed incoming stream, for status.
        self.last_loaded: StateFormat | None = None

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> MigState:
        return self.fsm.state

    def set_state(self, target: int) -> MigState:
        """MIG_DEVICE_STATE SET.  Raises MigrationError (errno for the reply)."""
        try:
            return self.fsm.request(target)
        except MigrationError as exc:
            self.last_error = exc
            raise

    def reset(self) -> None:
        """Device reset: drop sessions, leave ERROR, back to RUNNING."""
        self.save = self.load = None
        self.fsm.reset(MigState.RUNNING)

    def _on_arc(self, src: MigState, dst: MigState) -> None:
        if src is MigState.RESUMING:
            # Validate and decode everything before the device sees a byte of it.
            assert self.load is not None
            state = self.load.finish()
            self.device.load_state(state)
            self.last_loaded = self.load.format
            self.load = None
        self.device.migration_arc(src, dst)
        if dst is MigState.RESUMING:
            self.device.reset_state()
            self.load = LoadSession(self.formats, expect=self.expected,
                                    local_profile=self._local_profile())
        elif dst in SAVING_GROUP:
            if src not in SAVING_GROUP:
                self.save = SaveSession(self.selected, minor=self.selected_minor,
                                        producer_uuid=self.producer_uuid)
            assert self.save is not None
            if dst is MigState.STOP_COPY:
                self.save.stop_copy(self.device.save_state())
            elif src not in SAVING_GROUP:
                self.save.precopy(self.device.save_state())
        elif src in SAVING_GROUP:
            self.save = None

    def _local_profile(self) -> Any | None:
        get = getattr(self.device, "migration_profile", None)
        return get() if get else None

    # ------------------------------------------------------------------- data
    def read_data(self, size: int) -> bytes:
        """MIG_DATA_READ: fewer bytes than asked means no more data (for now)."""
        if self.state not in SAVING_GROUP or self.save is None:
            self.last_error = MigrationError(errno.EINVAL, f"MIG_DATA_READ in {self.state.name}")
            raise self.last_error
        return self.save.read(size)

    def write_data(self, data: bytes) -> None:
        """MIG_DATA_WRITE: only in RESUMING; format errors surface immediately."""
        if self.state is not MigState.RESUMING or self.load is None:
            self.last_error = MigrationError(errno.EINVAL, f"MIG_DATA_WRITE in {self.state.name}")
            raise self.last_error
        try:
            self.load.write(data)
        except MigrationError as exc:
            self.last_error = exc
            raise

    @property
    def pending_bytes(self) -> int:
        return self.save.pending_bytes if self.save else 0

    # -------------------------------------------------------------- selection
    def select_outgoing(self, key: str | uuid.UUID | None, minor: int | None = None) -> None:
        """Pick the format the next saving session uses (None = default).

        Latched when the saving session starts; EBUSY while one is running."""
        if self.save is not None:
            raise MigrationError(errno.EBUSY, "a saving session is in progress")
        if key is None:
            self.selected, self.selected_minor = self.formats.default, None
            return
        fmt, m = self.formats.find(key)
        if minor is not None:
            fmt._minor(minor)
            m = minor
        self.selected, self.selected_minor = fmt, m

    def expect_incoming(self, key: str | uuid.UUID | None) -> None:
        """Pin the format a destination accepts (None or "any" = any supported)."""
        if self.load is not None:
            raise MigrationError(errno.EBUSY, "a loading session is in progress")
        self.expected = None if key in (None, "any") else self.formats.find(key)[0]

    # --------------------------------------------------------- DEVICE_FEATURE
    def device_feature(self, flags: int, data: bytes = b"") -> bytes:
        """Handle VFIO_USER_DEVICE_FEATURE for the migration indices.

        ``flags`` is the request's flags word, ``data`` the bytes after
        argsz/flags.  Returns the bytes to put after argsz/flags in the reply
        (GET: the feature data; SET: the request data echoed; PROBE: empty).
        Raises MigrationError(EINVAL) for unknown indices or wrong ops,
        so the server can try other feature handlers first on EINVAL-free paths.
        """
        idx = flags & FEAT_MASK
        get, set_, probe = bool(flags & FEAT_GET), bool(flags & FEAT_SET), bool(flags & FEAT_PROBE)
        if get and set_ and not probe:
            raise MigrationError(errno.EINVAL, "GET and SET together without PROBE")
        ops = {
            FEATURE_MIGRATION: (True, False),
            FEATURE_MIG_DEVICE_STATE: (True, True),
            FEATURE_MIG_FORMATS: (True, False),
            FEATURE_MIG_FORMAT_SELECT: (True, True),
            FEATURE_MIG_PROFILE: (True, False),
            FEATURE_MIG_LAST_ERROR: (True, False),
        }
        if idx not in ops:
            raise MigrationError(errno.EINVAL, f"device feature {idx:#x} not supported")
        can_get, can_set = ops[idx]
        if (get and not can_get) or (set_ and not can_set) or not (get or set_):
            raise MigrationError(errno.EINVAL, f"device feature {idx:#x}: operation not supported")
        if probe:
            return b""
        if idx == FEATURE_MIGRATION:
            return struct.pack("<Q", int(self.fsm.features))
        if idx == FEATURE_MIG_DEVICE_STATE:
            if get:
                return _MIG_STATE.pack(self.state, -1)
            if len(data) < _MIG_STATE.size:
                raise MigrationError(errno.EINVAL, "MIG_DEVICE_STATE payload too short")
            new_state, _fd = _MIG_STATE.unpack_from(data, 0)
            self.set_state(new_state)
            return _MIG_STATE.pack(new_state, -1)
        if idx == FEATURE_MIG_FORMATS:
            return self.formats_blob()
        if idx == FEATURE_MIG_FORMAT_SELECT:
            if get:
                return self.selection_blob()
            if len(data) < _SELECT.size:
                raise MigrationError(errno.EINVAL, "MIG_FORMAT_SELECT payload too short")
            raw, minor, sflags = _SELECT.unpack_from(data, 0)
            key = None if raw == bytes(16) else uuid.UUID(bytes=raw)
            if sflags & ~SELECT_INCOMING:
                raise MigrationError(errno.EINVAL, f"MIG_FORMAT_SELECT flags {sflags:#x}")
            if sflags & SELECT_INCOMING:
                self.expect_incoming(key)
            else:
                self.select_outgoing(key, None if minor == MINOR_MAX else minor)
            return bytes(data[:_SELECT.size])
        if idx == FEATURE_MIG_LAST_ERROR:
            return self.last_error_blob()
        # FEATURE_MIG_PROFILE
        prof = self._local_profile()
        return profile_to_record(prof).payload if prof is not None else b""

    def formats_blob(self) -> bytes:
        """0xF100 GET payload: ``{u16 count; u16 entry_size=64; u32 0}`` + entries."""
        out = bytearray(_FMT_LIST_HDR.pack(len(self.formats), _FMT_ENTRY.size, 0))
        for f in self.formats:
            fl = (FMT_FLAG_SELECTED if f is self.selected else 0) | (
                FMT_FLAG_DEFAULT if f is self.formats.default else 0)
            out += _FMT_ENTRY.pack(f.uuid.bytes, f.major, f.minor_min, f.minor_max,
                                   FMT_KIND[f.kind], fl, f.name.encode()[:40])
        return bytes(out)

    def last_error_blob(self) -> bytes:
        """0xF103 GET payload: the last refusal's errno and reason (errno 0: none)."""
        if self.last_error is None:
            return _LAST_ERROR.pack(0, 0)
        reason = self.last_error.reason.encode()[:MAX_REASON]
        return _LAST_ERROR.pack(self.last_error.errno, len(reason)) + reason

    def selection_blob(self) -> bytes:
        """0xF101 GET payload: the latched outgoing selection."""
        minor = self.selected_minor if self.selected_minor is not None else self.selected.minor_max
        return _SELECT.pack(self.selected.uuid.bytes, minor, 0)

    # --------------------------------------------------------- control socket
    def status(self) -> dict[str, Any]:
        return {
            "state": self.state.name,
            "selected": self._sel(self.selected, self.selected_minor),
            "expected": self.expected.name if self.expected else "any",
            "saving": None if self.save is None else {
                "format": self.save.format.name, "minor": self.save.minor,
                "bytes_read": self.save.bytes_read, "pending_bytes": self.save.pending_bytes},
            "loading": None if self.load is None else {
                "format": self.load.format.name if self.load.format else None,
                "bytes_written": self.load.bytes_written},
            "last_loaded": self.last_loaded.name if self.last_loaded else None,
            "last_error": None if self.last_error is None else {
                "errno": self.last_error.errno, "reason": self.last_error.reason},
        }

    @staticmethod
    def _sel(fmt: StateFormat, minor: int | None) -> dict[str, Any]:
        return {"name": fmt.name, "uuid": str(fmt.uuid), "kind": fmt.kind,
                "minor": fmt.minor_max if minor is None else minor}

    def handle_control(self, msg: dict[str, Any]) -> dict[str, Any]:
        """One control-socket request -> one reply (docs/migration-format.md 7.4)."""
        reply: dict[str, Any] = {}
        if isinstance(msg, dict) and "id" in msg:
            reply["id"] = msg["id"]
        try:
            if not isinstance(msg, dict) or not isinstance(msg.get("cmd"), str):
                raise MigrationError(errno.EINVAL, "request must be an object with a \"cmd\"")
            cmd = msg["cmd"]
            if cmd == "list-formats":
                reply["formats"] = self.formats.descriptors()
            elif cmd == "get-selected":
                reply["selected"] = self._sel(self.selected, self.selected_minor)
                reply["expected"] = self.expected.name if self.expected else "any"
            elif cmd == "select-outgoing":
                minor = msg.get("minor")
                if minor is not None and not isinstance(minor, int):
                    raise MigrationError(errno.EINVAL, "minor must be an integer")
                self.select_outgoing(msg.get("format"), minor)
                reply["selected"] = self._sel(self.selected, self.selected_minor)
            elif cmd == "expect-incoming":
                self.expect_incoming(msg.get("format", "any"))
                reply["expected"] = self.expected.name if self.expected else "any"
            elif cmd == "check-incoming":
                fmt, _ = self.formats.find(str(msg.get("format", "")))
                minor = msg.get("minor", fmt.minor_max)
                if not isinstance(minor, int):
                    raise MigrationError(errno.EINVAL, "minor must be an integer")
                # Newer minors still load if their extra records are OPTIONAL;
                # only the stream can tell, so "compatible" is the UUID+minor_min test.
                reply["compatible"] = minor >= fmt.minor_min
                reply["minor_known"] = minor <= fmt.minor_max
                reply["format"] = fmt.descriptor()
                prof = msg.get("profile")
                if prof is not None:
                    local = self._local_profile()
                    mine = profile_to_record(local).payload.hex() if local else None
                    reply["profile_match"] = mine == prof
                    reply["compatible"] = reply["compatible"] and mine == prof
            elif cmd == "get-profile":
                local = self._local_profile()
                reply["profile"] = profile_to_record(local).payload.hex() if local else None
            elif cmd == "status":
                reply["status"] = self.status()
            else:
                raise MigrationError(errno.EINVAL, f"unknown command {cmd!r}")
            reply["ok"] = True
        except MigrationError as exc:
            reply.update(ok=False, errno=exc.errno,
                         error=errno.errorcode.get(exc.errno, str(exc.errno)), reason=exc.reason)
        return reply
