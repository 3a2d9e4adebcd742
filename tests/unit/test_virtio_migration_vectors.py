"""virtio-{blk,net,rng}/std/1 and opaque/vfu-virtio-*: golden vectors read by both readers
(vfu_server.migration and the independent vfu_server.stateinspect), and the load rules of
docs/migration-format.md 5.4 on hand-damaged records."""

from __future__ import annotations

import dataclasses
import errno
import json
import pathlib
import struct

import pytest
from vectors.jsonable import plain, positional

from devices.virtio import migration_format as vm
from vfu_server.migration import MigrationFormatError, Record, decode_envelope, encode_envelope
from vfu_server.migration.session import LoadSession
from vfu_server.stateinspect.reader import Bad, inspect_stream

VECTORS = pathlib.Path(__file__).parents[1] / "vectors"
EXPECTED = json.loads((VECTORS / "virtio-expected.json").read_text())
NAMES = sorted(EXPECTED["vectors"])
KINDS = ["blk", "net", "rng"]
STD = {"blk": vm.BLK_STANDARD, "net": vm.NET_STANDARD, "rng": vm.RNG_STANDARD}
OPQ = {"blk": vm.BLK_OPAQUE, "net": vm.NET_OPAQUE, "rng": vm.RNG_OPAQUE}
SETS = {"blk": vm.BLK_FORMATS, "net": vm.NET_FORMATS, "rng": vm.RNG_FORMATS}


def test_uuids():
    assert str(vm.BLK_STANDARD.uuid) == "ab98460e-85fd-568f-a280-3d7778c1fe09"
    assert str(vm.NET_STANDARD.uuid) == "84e4334b-be2e-5a28-90a9-647d5cd08be2"
    assert str(vm.RNG_STANDARD.uuid) == "617ff1a0-b7a8-56b5-b336-04e6081d3a06"
    assert {str(f.uuid) for f in OPQ.values()} == {
        "9869c674-e63f-5221-83e7-44718f060940", "9bc81a7e-6bfa-57f9-b88b-fa30d14d2a3f",
        "6dcb0475-3fd5-582b-872b-d52894225c79"}


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_still_produces_the_vectors(kind):
    state = vm.sample_state(kind)
    std = STD[kind].encode_precopy(state) + STD[kind].encode(state)
    assert std == (VECTORS / f"virtio-{kind}-standard.bin").read_bytes()
    assert OPQ[kind].encode(state) == (VECTORS / f"virtio-{kind}-opaque.bin").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_main_reader_matches_vector(name):
    meta = EXPECTED["vectors"][name]
    ls = LoadSession(SETS[meta["kind"]])
    ls.write((VECTORS / name).read_bytes())
    state = ls.finish()
    assert ls.format.name == meta["format"] and str(ls.format.uuid) == meta["format_uuid"]
    assert plain(state) == EXPECTED["states"][meta["kind"]]


def _by_name(env: dict, name: str) -> list[dict]:
    return [r for r in env["records"] if r["name"] == name]


@pytest.mark.parametrize("name", NAMES)
def test_independent_reader_agrees(name):
    meta = EXPECTED["vectors"][name]
    state = EXPECTED["states"][meta["kind"]]
    envs = inspect_stream((VECTORS / name).read_bytes())
    assert [e["format"] for e in envs] == [meta["format"]] * len(envs)
    assert [e["format_uuid"] for e in envs] == [meta["format_uuid"]] * len(envs)
    assert [next(f for f in e["flags"] if f != "HAS_CRC") for e in envs] == meta["envelopes"]
    final = envs[-1]
    if meta["format"].startswith("opaque/"):
        (blob,) = final["records"]
        assert blob["fields"]["family_uuid"] == meta["format_uuid"]
        assert blob["fields"]["tree"] == positional(state)
        return
    assert [{"type": r["type"], "instance": r["instance"], "length": r["length"]}
            for r in final["records"]] == [
        {k: r[k] for k in ("type", "instance", "length")} for r in meta["final_records"]]
    t = state["transport"]
    (prof,) = _by_name(final, "PROFILE")
    vp = prof["fields"]["virtio_profile"]
    assert prof["fields"]["device_abi"] == state["profile"]["device_abi"]
    assert vp["num_queues"] == len(t["queues"]) and vp["device_id"] == {"blk": 2, "net": 1, "rng": 4}[meta["kind"]]
    parts = [r["fields"] for r in _by_name(final, "VIRTIO_PARTS")]
    by_part = {}
    for p in parts:
        by_part.setdefault(p["part"], []).append(p)
    assert int(by_part["DRV_FEATURES"][0]["features"], 16) == t["driver_features"]
    assert int(by_part["DEV_FEATURES"][0]["features"], 16) == int(vp["device_features"], 16)
    assert by_part["DEVICE_STATUS"][0]["status"] == t["status"]
    common = {p["field"]: p["value"] for p in by_part["PCI_COMMON_CFG"]}
    assert common == {"device_feature_select": t["device_feature_select"],
                      "driver_feature_select": t["driver_feature_select"],
                      "config_msix_vector": t["config_msix_vector"], "num_queues": len(t["queues"]),
                      "queue_select": t["queue_select"]}
    for i, (cfg, q) in enumerate(zip(by_part["VQ_CFG"], t["queues"], strict=True)):
        assert (cfg["vq"], cfg["queue_size"], cfg["vector"], cfg["enabled"], cfg["desc"],
                cfg["driver"], cfg["device"]) == (i, q["size"], q["msix_vector"], int(q["ready"]),
                                                   q["desc"], q["driver"], q["device"])
    assert [p["queue_notify_off"] for p in by_part["VQ_NOTIFY_CFG"]] == [q["notify_off"] for q in t["queues"]]
    runtime = _by_name(final, "VQ_RUNTIME")
    assert [(r["instance"], r["fields"]["last_avail_idx"], r["fields"]["used_idx"],
             r["fields"]["signalled_used"], r["fields"]["signalled_valid"]) for r in runtime] == [
        (i, q["last_avail_idx"], q["used_idx"], q["signalled_used"], int(q["signalled_valid"]))
        for i, q in enumerate(t["queues"])]
    (isr,) = _by_name(final, "ISR_GEN")
    assert (isr["fields"]["isr"], isr["fields"]["config_generation"]) == (t["isr"], t["config_generation"])
    if meta["kind"] == "blk":
        (ident,) = _by_name(final, "BLK_ID")
        assert bytes.fromhex(ident["fields"]["id"]).rstrip(b"\0").hex() == state["blk"]["serial"]
        (cfg,) = _by_name(final, "BLK_CONFIG")
        assert cfg["fields"]["writeback"] == state["blk"]["writeback"]
    if meta["kind"] == "net":
        n = state["net"]
        cvq = {p["name"]: p["value"] for p in by_part["NET_CVQ_CFG"]}
        assert cvq["RX_PROMISC"] == int(n["promisc"]) and cvq["RX_ALLMULTI"] == int(n["allmulti"])
        assert cvq["MAC_ADDR_SET"].replace(":", "") == n["mac"]
        assert [m.replace(":", "") for m in cvq["MAC_TABLE_SET"]["unicast"]] == n["uni_macs"]
        assert [m.replace(":", "") for m in cvq["MAC_TABLE_SET"]["multicast"]] == n["multi_macs"]
        assert cvq["MQ_VQ_PAIRS_SET"] == n["active_pairs"]
        (extra,) = _by_name(final, "NET_EXTRA")
        assert extra["fields"]["link_up"] == int(n["link_up"])


# -- load rules on damaged records ---------------------------------------------------------------


def _rewrite(kind: str, edit) -> bytes:
    """The sample's FINAL envelope with its record list passed through ``edit``."""
    fmt = STD[kind]
    env, _ = decode_envelope(fmt.encode(vm.sample_state(kind)), [fmt])
    records = edit(list(env.records))
    return encode_envelope(fmt.uuid, 1, 0, records, final=True)


def _parts(records: list[Record]) -> list[int]:
    return [i for i, r in enumerate(records) if r.type == 0x7100]


def _part_type(r: Record) -> int:
    return struct.unpack_from("<H", r.payload)[0]


def _renumber(records: list[Record]) -> list[Record]:
    n = 0
    out = []
    for r in records:
        if r.type == 0x7100:
            r = Record(r.type, r.payload, r.flags, n, r.version)
            n += 1
        out.append(r)
    return out


def _with_part(records: list[Record], index: int, payload: bytes) -> list[Record]:
    out = list(records)
    i = _parts(records)[index]
    out[i] = Record(0x7100, payload, records[i].flags, records[i].instance, records[i].version)
    return out


def _runtime(records: list[Record], **changes: int) -> list[Record]:
    out = []
    for r in records:
        if r.type == 0x0210 and r.instance == 0:
            v, _ = vm.VQ_RUNTIME.unpack(r)
            v.update(changes)
            r = vm.VQ_RUNTIME.pack(v, instance=0)
        out.append(r)
    return out


def _extra_part(records: list[Record], payload: bytes) -> list[Record]:
    last = _parts(records)[-1]
    return _renumber([*records[:last + 1], Record(0x7100, payload, 2, 0), *records[last + 1:]])


CASES = {
    "inuse": (lambda rs: _runtime(rs, inuse=1), errno.EINVAL),
    "not-drained": (lambda rs: _runtime(rs, used_idx=5), errno.EINVAL),
    "packed-wrap": (lambda rs: _runtime(rs, avail_wrap=1), errno.EINVAL),
    "parts-out-of-order": (lambda rs: _renumber(
        [rs[i] for i in range(len(rs)) if i != _parts(rs)[1]][:_parts(rs)[-1]]
        + [rs[_parts(rs)[1]]] + [rs[i] for i in range(_parts(rs)[-1] + 1, len(rs))]), errno.EINVAL),
    "unknown-mandatory-part": (lambda rs: _extra_part(rs, vm.part(0x1FF, b"", b"\x01")), errno.EINVAL),
    "dev-features-differ": (lambda rs: _with_part(rs, 0, vm.part(0x100, b"", struct.pack("<QQ", 1, 0))),
                            errno.EINVAL),
    "drv-features-not-offered": (lambda rs: _with_part(rs, 1, vm.part(0x101, b"", struct.pack("<QQ", 1 << 63, 0))),
                                 errno.EINVAL),
    "part-length-lies": (lambda rs: _with_part(rs, 1, vm.part(0x101, b"", bytes(16))[:-1]), errno.EBADMSG),
    "missing-vq-cfg": (lambda rs: _renumber([r for r in rs if not (r.type == 0x7100 and _part_type(r) == 0x104
                                                                   and r.payload[4] == 1)]), errno.EINVAL),
    "missing-isr-gen": (lambda rs: [r for r in rs if r.type != 0x0211], errno.EINVAL),
    "blk-inflight": (lambda rs: [*rs[:-1], vm.BLK_INFLIGHT.pack({"count": 1}, tail=b"\x05\x00"), *rs[-1:]],
                     errno.EINVAL),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_rules_refuse(case):
    edit, err = CASES[case]
    stream = _rewrite("blk", edit)
    with pytest.raises(MigrationFormatError) as info:
        vm.BLK_STANDARD.decode(stream)
    assert info.value.errno == err, info.value.reason


def test_unknown_optional_part_and_empty_inflight_are_accepted():
    stream = _rewrite("blk", lambda rs: _extra_part(rs, vm.part(0x1FF, b"", b"\x01", flags=1)))
    assert vm.BLK_STANDARD.decode(stream) == vm.sample_state("blk")
    stream = _rewrite("blk", lambda rs: [*rs[:-1], vm.BLK_INFLIGHT.pack({"count": 0}), *rs[-1:]])
    assert vm.BLK_STANDARD.decode(stream) == vm.sample_state("blk")


def test_ro_config_hash_is_checked_by_both_readers():
    state = vm.sample_state("net")
    abi = bytearray(state.profile.device_abi)
    abi[-1] ^= 1  # a config byte, the hash no longer matches
    bad = dataclasses.replace(state, profile=dataclasses.replace(state.profile, device_abi=bytes(abi)))
    with pytest.raises(MigrationFormatError):
        vm.NET_STANDARD.encode(bad)  # the writer refuses too: build it record by record
    env, _ = decode_envelope(vm.NET_STANDARD.encode(state), [vm.NET_STANDARD])
    from vfu_server.migration.generic import profile_to_record

    records = [profile_to_record(bad.profile), *list(env.records[1:])]
    stream = encode_envelope(vm.NET_STANDARD.uuid, 1, 0, records, final=True)
    with pytest.raises(MigrationFormatError) as info:
        vm.NET_STANDARD.decode(stream)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(Bad, match="sha256"):
        inspect_stream(stream)


def test_unknown_control_part_refused_unless_optional():
    vlan = vm.part(0x200, bytes([2, 0]), b"\x01\x00")  # VLAN_ADD: never offered
    with pytest.raises(MigrationFormatError, match="control part"):
        vm.NET_STANDARD.decode(_rewrite("net", lambda rs: _extra_part(rs, vlan)))
    optional = vm.part(0x200, bytes([2, 0]), b"\x01\x00", flags=1)
    assert vm.NET_STANDARD.decode(_rewrite("net", lambda rs: _extra_part(rs, optional))) == vm.sample_state("net")


def test_both_readers_refuse_a_lying_part():
    stream = _rewrite("net", lambda rs: _with_part(rs, 1, vm.part(0x101, b"", bytes(16))[:-1]))
    with pytest.raises(MigrationFormatError):
        vm.NET_STANDARD.decode(stream)
    with pytest.raises(Bad, match="length"):
        inspect_stream(stream)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trips(kind):
    state = vm.sample_state(kind)
    for fmt in (STD[kind], OPQ[kind]):
        assert fmt.decode(fmt.encode(state)) == state


@pytest.mark.parametrize("kind", sorted(STD))
def test_dev_features_part_is_optional_as_virtio_1_4_says(kind):
    """VIRTIO 1.4 marks the DEV_FEATURES part VIRTIO_DEV_PART_F_OPTIONAL; it is written so, and
    a stream from before (flags 0, the vectors up to this change) still loads."""
    env, _ = decode_envelope(STD[kind].encode(vm.sample_state(kind)), [STD[kind]])
    first = env.records[_parts(list(env.records))[0]]
    assert _part_type(first) == vm.P_DEV_FEATURES and first.payload[2] == vm.PART_OPTIONAL

    def clear_flag(records: list[Record]) -> list[Record]:
        i = _parts(records)[0]
        r = records[i]
        records[i] = Record(r.type, r.payload[:2] + b"\0" + r.payload[3:], r.flags, r.instance, r.version)
        return records

    assert STD[kind].decode(_rewrite(kind, clear_flag)) == vm.sample_state(kind)
