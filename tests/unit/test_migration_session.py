"""Save/load sessions, the controller (v2), the v1 region, end to end between two devices."""

from __future__ import annotations

import dataclasses
import errno
import struct

import pytest

from vfu_devices.example_format import (
    EXAMPLE_FORMATS,
    EXAMPLE_OPAQUE,
    EXAMPLE_STANDARD,
    ExampleState,
    sample_state,
)
from vfu_server.migration.controller import (
    FEAT_GET,
    FEAT_PROBE,
    FEAT_SET,
    FEATURE_MIG_DEVICE_STATE,
    FEATURE_MIG_FORMAT_SELECT,
    FEATURE_MIG_FORMATS,
    FEATURE_MIGRATION,
    MigrationController,
)
from vfu_server.migration.errors import MigrationError, MigrationFormatError
from vfu_server.migration.fsm import MigState
from vfu_server.migration.generic import PciProfile
from vfu_server.migration.region import DATA_OFFSET, MigrationRegion
from vfu_server.migration.session import LoadSession, SaveSession

S = MigState


class FakeDevice:
    def __init__(self, state: ExampleState | None = None) -> None:
        self.state = state
        self.profile = sample_state().profile
        self.arcs: list[tuple[MigState, MigState]] = []
        self.loaded = 0

    def migration_arc(self, src, dst):
        self.arcs.append((src, dst))

    def save_state(self):
        return self.state

    def load_state(self, state):
        self.state = state
        self.loaded += 1

    def reset_state(self):
        self.state = None

    def migration_profile(self) -> PciProfile:
        return self.profile


def pump(src: MigrationController, dst: MigrationController, chunk: int = 37) -> None:
    while data := src.read_data(chunk):
        dst.write_data(data)


@pytest.mark.parametrize("fmt", ["standard", "opaque"])
@pytest.mark.parametrize("precopy", [False, True])
def test_v2_migration_end_to_end(fmt, precopy):
    a, b = FakeDevice(sample_state()), FakeDevice()
    src = MigrationController(a, EXAMPLE_FORMATS)
    dst = MigrationController(b, EXAMPLE_FORMATS)
    src.select_outgoing(fmt)
    dst.set_state(S.RESUMING)
    if precopy:
        src.set_state(S.PRE_COPY)
        pump(src, dst)
    src.set_state(S.STOP_COPY)
    pump(src, dst)
    assert src.read_data(100) == b""
    src.set_state(S.STOP)
    dst.set_state(S.RUNNING)
    assert b.state == a.state and b.loaded == 1
    assert dst.status()["last_loaded"] == EXAMPLE_FORMATS.find(fmt)[0].name
    assert b.arcs == [(S.RUNNING, S.STOP), (S.STOP, S.RESUMING), (S.RESUMING, S.STOP),
                      (S.STOP, S.RUNNING)]


def test_precopy_sends_profile_only_for_standard():
    s = SaveSession(EXAMPLE_STANDARD)
    s.precopy(sample_state())
    pre = s.pending_bytes
    assert 0 < pre < len(EXAMPLE_STANDARD.encode(sample_state()))
    s2 = SaveSession(EXAMPLE_OPAQUE)
    s2.precopy(sample_state())
    assert s2.pending_bytes == 0


def test_profile_mismatch_fails_on_first_precopy_write():
    a, b = FakeDevice(sample_state()), FakeDevice()
    b.profile = dataclasses.replace(b.profile, device_id=0x1234)
    src = MigrationController(a, EXAMPLE_FORMATS)
    dst = MigrationController(b, EXAMPLE_FORMATS)
    src.select_outgoing("standard")
    dst.set_state(S.RESUMING)
    src.set_state(S.PRE_COPY)
    with pytest.raises(MigrationFormatError) as ei:
        pump(src, dst, chunk=4096)
    assert ei.value.errno == errno.EINVAL and "device_id" in ei.value.reason


def test_opaque_profile_mismatch_caught_at_finish_device_untouched():
    a, b = FakeDevice(sample_state()), FakeDevice()
    b.profile = dataclasses.replace(b.profile, revision=9)
    src = MigrationController(a, EXAMPLE_FORMATS)
    dst = MigrationController(b, EXAMPLE_FORMATS)
    dst.set_state(S.RESUMING)
    src.set_state(S.STOP_COPY)
    pump(src, dst)
    with pytest.raises(MigrationError) as ei:
        dst.set_state(S.RUNNING)
    assert ei.value.errno == errno.EINVAL
    assert dst.state == S.RESUMING and b.state is None and b.loaded == 0


def test_truncated_or_corrupt_stream_never_half_loads():
    good = EXAMPLE_STANDARD.encode(sample_state())
    for bad in (good[:-8], good[:200] + bytes([good[200] ^ 0x40]) + good[201:]):
        b = FakeDevice()
        dst = MigrationController(b, EXAMPLE_FORMATS)
        dst.set_state(S.RESUMING)
        try:
            dst.write_data(bad)
        except MigrationFormatError:
            pass
        with pytest.raises(MigrationError):
            dst.set_state(S.STOP)
        assert b.state is None and b.loaded == 0
        dst.reset()
        assert dst.state == S.RUNNING


def test_unknown_uuid_refused_on_first_write_and_sticky():
    data = bytearray(EXAMPLE_STANDARD.encode(sample_state()))
    data[16] ^= 0xFF
    ls = LoadSession(EXAMPLE_FORMATS)
    ls.write(bytes(data[:10]))
    with pytest.raises(MigrationFormatError):
        ls.write(bytes(data[10:64]))
    with pytest.raises(MigrationFormatError):
        ls.finish()


def test_trailing_garbage_after_final_refused():
    ls = LoadSession(EXAMPLE_FORMATS)
    with pytest.raises(MigrationFormatError, match="after the FINAL"):
        ls.write(EXAMPLE_OPAQUE.encode(sample_state()) + b"x")


def test_expect_incoming_pins_format():
    ls = LoadSession(EXAMPLE_FORMATS, expect=EXAMPLE_STANDARD)
    with pytest.raises(MigrationFormatError, match="unknown state format"):
        ls.write(EXAMPLE_OPAQUE.encode(sample_state()))


def test_selection_latched_during_session():
    ctl = MigrationController(FakeDevice(sample_state()), EXAMPLE_FORMATS)
    ctl.set_state(S.PRE_COPY)
    with pytest.raises(MigrationError) as ei:
        ctl.select_outgoing("standard")
    assert ei.value.errno == errno.EBUSY
    ctl.set_state(S.RUNNING)
    ctl.select_outgoing("standard")


def test_data_ops_refused_in_wrong_state():
    ctl = MigrationController(FakeDevice(sample_state()), EXAMPLE_FORMATS)
    with pytest.raises(MigrationError):
        ctl.read_data(10)
    with pytest.raises(MigrationError):
        ctl.write_data(b"x")


def test_callback_crash_goes_to_error():
    class Broken(FakeDevice):
        def save_state(self):
            raise RuntimeError("register read failed")

    ctl = MigrationController(Broken(), EXAMPLE_FORMATS)
    with pytest.raises(MigrationError) as ei:
        ctl.set_state(S.STOP_COPY)
    assert ei.value.errno == errno.EIO and ctl.state == S.ERROR
    ctl.reset()
    assert ctl.state == S.RUNNING and ctl.save is None


def test_device_feature_payloads():
    ctl = MigrationController(FakeDevice(sample_state()), EXAMPLE_FORMATS)
    assert struct.unpack("<Q", ctl.device_feature(FEATURE_MIGRATION | FEAT_GET))[0] == 5
    assert ctl.device_feature(FEATURE_MIGRATION | FEAT_GET | FEAT_PROBE) == b""
    with pytest.raises(MigrationError):
        ctl.device_feature(FEATURE_MIGRATION | FEAT_SET, bytes(8))
    st = ctl.device_feature(FEATURE_MIG_DEVICE_STATE | FEAT_GET)
    assert struct.unpack("<Ii", st) == (S.RUNNING, -1)
    ctl.device_feature(FEATURE_MIG_DEVICE_STATE | FEAT_SET, struct.pack("<Ii", S.STOP, -1))
    assert ctl.state == S.STOP
    blob = ctl.device_feature(FEATURE_MIG_FORMATS | FEAT_GET)
    count, esize, _ = struct.unpack_from("<HHI", blob)
    assert (count, esize, len(blob)) == (2, 64, 8 + 128)
    names = [blob[8 + i * 64 + 24:8 + (i + 1) * 64].rstrip(b"\0").decode() for i in range(2)]
    assert names == ["opaque/vfu-example", "example/std/1"]
    sel = EXAMPLE_STANDARD.uuid.bytes + struct.pack("<HH", 0xFFFF, 0)
    ctl.device_feature(FEATURE_MIG_FORMAT_SELECT | FEAT_SET, sel)
    got = ctl.device_feature(FEATURE_MIG_FORMAT_SELECT | FEAT_GET)
    assert got[:16] == EXAMPLE_STANDARD.uuid.bytes
    with pytest.raises(MigrationError):
        ctl.device_feature(0x1234 | FEAT_GET)


def test_control_socket_messages():
    ctl = MigrationController(FakeDevice(sample_state()), EXAMPLE_FORMATS)
    r = ctl.handle_control({"cmd": "list-formats", "id": 7})
    assert r["ok"] and r["id"] == 7 and len(r["formats"]) == 2
    r = ctl.handle_control({"cmd": "select-outgoing", "format": "standard"})
    assert r["ok"] and r["selected"]["name"] == "example/std/1"
    r = ctl.handle_control({"cmd": "select-outgoing", "format": "bogus"})
    assert not r["ok"] and r["error"] == "EINVAL" and "bogus" in r["reason"]
    prof = ctl.handle_control({"cmd": "get-profile"})["profile"]
    r = ctl.handle_control({"cmd": "check-incoming", "format": "example/std/1", "minor": 0,
                            "profile": prof})
    assert r["ok"] and r["compatible"] and r["profile_match"]
    assert ctl.handle_control({"cmd": "status"})["status"]["state"] == "RUNNING"
    assert not ctl.handle_control({"nope": 1})["ok"]


# ---------------------------------------------------------------------- v1
def rd(region: MigrationRegion, off: int, fmt: str):
    return struct.unpack(fmt, region.read(off, struct.calcsize(fmt)))[0]


def test_v1_region_save_and_resume():
    a, b = FakeDevice(sample_state()), FakeDevice()
    src = MigrationRegion(MigrationController(a, EXAMPLE_FORMATS), window_size=64)
    dst = MigrationRegion(MigrationController(b, EXAMPLE_FORMATS), window_size=64)
    assert rd(src, 0x20, "<I") == 0x46554656 and rd(src, 0x24, "<I") == 2
    # pick "standard" through the registers: find its index via the readout
    for i in range(2):
        src.write(0x28, struct.pack("<I", i))
        if src.read(0x30, 16) == EXAMPLE_STANDARD.uuid.bytes:
            src.write(0x48, struct.pack("<I", i))
    dst.write(0, struct.pack("<I", 0b100))  # RUNNING -> RESUMING
    src.write(0, struct.pack("<I", 0b011))  # pre-copy
    src.write(0, struct.pack("<I", 0b010))  # stop-and-copy
    chunks = []
    while rd(src, 8, "<Q"):
        off = rd(src, 0x10, "<Q")
        size = rd(src, 0x18, "<Q")
        chunks.append(src.read(off, size))
    for c in chunks:  # resume: same transaction sizes, in order
        off = rd(dst, 0x10, "<Q")
        dst.write(off, c)
        dst.write(0x18, struct.pack("<Q", len(c)))
    src.write(0, struct.pack("<I", 0b000))
    dst.write(0, struct.pack("<I", 0b001))  # resuming -> running
    assert b.state == a.state
    assert a.arcs[:3] == [(S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.STOP_COPY),
                          (S.STOP_COPY, S.STOP)]
    assert src.ctl.last_loaded is None and dst.ctl.last_loaded is EXAMPLE_STANDARD


def test_v1_region_refusals():
    r = MigrationRegion(MigrationController(FakeDevice(sample_state()), EXAMPLE_FORMATS))
    with pytest.raises(MigrationError):
        r.write(0, struct.pack("<I", 0b101))  # invalid combination
    with pytest.raises(MigrationError):
        r.write(0, struct.pack("<I", 0b110))  # ERROR cannot be requested
    r.write(0, struct.pack("<I", 0b011))
    with pytest.raises(MigrationError):
        r.write(0, struct.pack("<I", 0b001))  # pre-copy -> running not in the v1 table
    with pytest.raises(MigrationError) as ei:
        r.write(0x48, struct.pack("<I", 1))  # selection is latched during a session
    assert ei.value.errno == errno.EBUSY and rd(r, 0x54, "<I") == errno.EBUSY
    with pytest.raises(MigrationError):
        r.read(DATA_OFFSET + r.size, 4)
