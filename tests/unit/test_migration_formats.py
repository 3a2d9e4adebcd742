"""Format registry, record codec compatibility rules, opaque TLV codec."""

from __future__ import annotations

import dataclasses
import errno
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfu_devices.example_format import (
    EXAMPLE_FORMATS,
    EXAMPLE_OPAQUE,
    EXAMPLE_REGS,
    EXAMPLE_STANDARD,
    ExampleRegs,
    ExampleState,
    sample_state,
)
from vfu_server.migration import opaque
from vfu_server.migration.envelope import REC_OPTIONAL, Record, encode_envelope
from vfu_server.migration.errors import MigrationError, MigrationFormatError
from vfu_server.migration.formats import NAMESPACE, format_uuid, get_formats
from vfu_server.migration.generic import MsixState, MsixVector, PciProfile
from vfu_server.migration.records import RecordLayout


def test_uuids_follow_the_design_namespace():
    assert uuid.uuid5(uuid.NAMESPACE_URL, "urn:x-vfio-user-device-state") == NAMESPACE
    assert format_uuid("nvme-ctrl/std/1") == uuid.UUID("a035903e-a033-5eaf-812b-d1b8c0ea4232")
    assert EXAMPLE_STANDARD.uuid == format_uuid("example/std/1")
    assert EXAMPLE_OPAQUE.uuid == format_uuid("opaque/vfu-example")


@pytest.mark.parametrize("fmt", list(EXAMPLE_FORMATS), ids=lambda f: f.name)
def test_roundtrip_each_format_and_autodetect(fmt):
    s = sample_state()
    data = fmt.encode(s)
    assert fmt.decode(data) == s
    found, state = EXAMPLE_FORMATS.decode(data)
    assert found is fmt and state == s


def test_other_format_refused():
    data = EXAMPLE_STANDARD.encode(sample_state())
    with pytest.raises(MigrationFormatError) as ei:
        EXAMPLE_OPAQUE.decode(data)
    assert ei.value.errno == errno.EINVAL and "unknown state format" in ei.value.reason


@pytest.mark.parametrize(
    ("key", "name", "minor"),
    [("standard", "example/std/1", None), ("opaque", "opaque/vfu-example", None),
     ("example/std/1:0", "example/std/1", 0),
     ("ce57a4dc-accb-5abe-8b19-a5d115eca220", "example/std/1", None)],
)
def test_selection_by_name_alias_uuid(key, name, minor):
    fmt, m = EXAMPLE_FORMATS.find(key)
    assert fmt.name == name and m == minor


@pytest.mark.parametrize("key", ["nope", "example/std/1:7", "example/std/1:x",
                                 "00000000-0000-0000-0000-000000000000"])
def test_selection_refused(key):
    with pytest.raises(MigrationError) as ei:
        EXAMPLE_FORMATS.find(key)
    assert ei.value.errno == errno.EINVAL


def test_descriptors_and_registry():
    d = EXAMPLE_FORMATS.descriptors()
    assert {x["name"] for x in d} == {"example/std/1", "opaque/vfu-example"}
    for x in d:
        assert {"uuid", "name", "kind", "major", "minor_min", "minor_max"} <= set(x)
    assert [x["default"] for x in d] == [True, False]
    assert get_formats("example") is EXAMPLE_FORMATS


def test_record_append_only_rules():
    old = RecordLayout(0x0300, "R", [("a", "I"), ("b", "H")])
    new = RecordLayout(0x0300, "R", [("a", "I"), ("b", "H"), ("c", "Q", 42)])
    # old writer -> new reader: missing trailing field takes its default
    assert new.unpack(old.pack({"a": 1, "b": 2}))[0] == {"a": 1, "b": 2, "c": 42}
    # new writer -> old reader: extra trailing bytes ignored
    assert old.unpack(new.pack({"a": 1, "b": 2, "c": 3}))[0] == {"a": 1, "b": 2}
    # half a field is damage, not compatibility
    with pytest.raises(MigrationFormatError):
        new.unpack(new.pack({"a": 1, "b": 2, "c": 3}).payload[:10])
    with pytest.raises(MigrationFormatError):
        old.pack({"a": -1})


def test_tail_records_keep_tail_separate():
    old = RecordLayout(0x0301, "T", [("n", "H")], tail=True)
    new = RecordLayout(0x0301, "T", [("n", "H"), ("m", "H", 9)], tail=True)
    vals, tail = old.unpack(new.pack({"n": 1, "m": 2}, tail=b"xyz"))
    assert vals == {"n": 1} and tail == b"xyz"
    vals, tail = new.unpack(old.pack({"n": 1}, tail=b"xyz"))
    assert vals == {"n": 1, "m": 9} and tail == b"xyz"


def test_newer_minor_with_optional_record_loads():
    s = sample_state()
    recs = EXAMPLE_STANDARD.to_records(s, 0)
    recs.insert(3, Record(0x03FF, b"future", flags=REC_OPTIONAL))
    data = encode_envelope(EXAMPLE_STANDARD.uuid, 1, 5, recs)
    assert EXAMPLE_STANDARD.decode(data) == s
    recs[3] = Record(0x03FF, b"future")
    with pytest.raises(MigrationFormatError, match="0x03ff"):
        EXAMPLE_STANDARD.decode(encode_envelope(EXAMPLE_STANDARD.uuid, 1, 5, recs))


def test_standard_format_order_and_consistency_checks():
    s = sample_state()
    recs = EXAMPLE_STANDARD.to_records(s, 0)
    with pytest.raises(MigrationFormatError, match="PROFILE must come first"):
        EXAMPLE_STANDARD.decode(encode_envelope(EXAMPLE_STANDARD.uuid, 1, 0, recs[1:] + recs[:1]))
    with pytest.raises(MigrationFormatError, match="EXAMPLE_REGS missing"):
        EXAMPLE_STANDARD.decode(encode_envelope(EXAMPLE_STANDARD.uuid, 1, 0, recs[:-1]))
    with pytest.raises(MigrationFormatError, match=r"more than once|ascending"):
        EXAMPLE_STANDARD.decode(encode_envelope(EXAMPLE_STANDARD.uuid, 1, 0, recs + recs[-1:]))
    bad = dataclasses.replace(s, msix=MsixState((MsixVector(),), b"\0"))
    with pytest.raises(MigrationFormatError, match="vectors"):
        EXAMPLE_STANDARD.decode(EXAMPLE_STANDARD.encode(bad))


def test_regs_record_layout_is_documented_size():
    assert EXAMPLE_REGS.size == 40
    rec = EXAMPLE_REGS.pack(ExampleRegs(1, 2, 3, 4, 5, 6, 7))
    assert EXAMPLE_REGS.unpack(rec)[0]["src"] == 2


# ------------------------------------------------------------------ opaque
@dataclass(frozen=True)
class Inner:
    v: int
    b: bytes = b""


@dataclass(frozen=True)
class Outer:
    name: str
    items: tuple[Inner, ...]
    flag: bool
    maybe: int | None
    nums: list[int]


def test_opaque_roundtrip_and_schema():
    o = Outer("x", (Inner(-5, b"q"), Inner(2**64 - 1)), True, None, [1, 2])
    assert opaque.decode_tree(opaque.encode_tree(o), Outer) == o
    assert "Inner{v:int,b:bytes}" in opaque.schema_text(Outer)
    with pytest.raises(MigrationFormatError):
        opaque.encode_tree(Outer("x", (Inner(2**64),), True, None, []))
    with pytest.raises(MigrationFormatError):
        opaque.decode_tree(opaque.encode_tree(o), Inner)


def test_opaque_schema_mismatch_refused():
    fmt = type(EXAMPLE_OPAQUE)("opaque/vfu-example", state_type=ExampleState, schema_version=2)
    with pytest.raises(MigrationFormatError, match="schema"):
        fmt.decode(EXAMPLE_OPAQUE.encode(sample_state()))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_opaque_fuzz_only_format_errors(data):
    for tp in (Outer, ExampleState, PciProfile):
        try:
            opaque.decode_tree(data, tp)
        except MigrationFormatError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 400), st.integers(0, 255))
def test_opaque_mutation_only_format_errors(pos, val):
    b = bytearray(opaque.encode_tree(sample_state()))
    b[pos % len(b)] = val
    try:
        opaque.decode_tree(bytes(b), ExampleState)
    except MigrationFormatError:
        pass


def test_vfu_migrate_convert_opaque_to_standard(tmp_path):
    from vfu_server.migration import cli

    src = tmp_path / "o.bin"
    src.write_bytes(EXAMPLE_OPAQUE.encode(sample_state()))
    out = tmp_path / "s.bin"
    assert cli.main(["convert", "example", str(src), str(out), "--to", "standard"]) == 0
    data = out.read_bytes()
    assert data.startswith(b"DEVSTATE")
    from vfu_server.migration.session import LoadSession

    ls = LoadSession(EXAMPLE_FORMATS)
    ls.write(data)
    assert ls.finish() == sample_state() and ls.format is EXAMPLE_STANDARD
    assert cli.main(["convert", "example", str(src), str(out), "--to", "nope"]) == 1
    assert cli.main(["formats", "example"]) == 0
