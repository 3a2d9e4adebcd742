"""NVMe golden vectors: the encoder still writes them byte for byte, and the independent
reader (vfu_server.stateinspect, stdlib only) decodes the same values as vfu_devices.nvme."""

from __future__ import annotations

import json
import pathlib

import pytest
from vectors.jsonable import plain, positional

from vfu_devices.nvme.migration_format import NVME_FORMATS, NVME_OPAQUE, NVME_STANDARD, sample_state
from vfu_server.migration.errors import MigrationError
from vfu_server.migration.session import LoadSession
from vfu_server.stateinspect import cli
from vfu_server.stateinspect.reader import Bad, inspect_stream

VECTORS = pathlib.Path(__file__).parents[1] / "vectors"
EXPECTED = json.loads((VECTORS / "nvme-expected.json").read_text())
STATE = EXPECTED["state"]


def test_encoder_reproduces_the_vectors():
    state = sample_state()
    assert plain(state) == STATE
    std = NVME_STANDARD.encode_precopy(state) + NVME_STANDARD.encode(state)
    assert std == (VECTORS / "nvme-standard.bin").read_bytes()
    assert NVME_OPAQUE.encode(state) == (VECTORS / "nvme-opaque.bin").read_bytes()


@pytest.mark.parametrize("name", sorted(EXPECTED["vectors"]))
def test_main_reader_matches_vector(name):
    data = (VECTORS / name).read_bytes()
    ls = LoadSession(NVME_FORMATS, local_profile=sample_state().profile)
    ls.write(data)
    assert ls.format.name == EXPECTED["vectors"][name]["format"]
    assert plain(ls.finish()) == STATE


@pytest.mark.parametrize("name", sorted(EXPECTED["vectors"]))
def test_independent_reader_envelopes(name):
    envs = inspect_stream((VECTORS / name).read_bytes())
    want = EXPECTED["vectors"][name]
    assert [e["format"] for e in envs] == [want["format"]] * len(envs)
    assert [e["format_uuid"] for e in envs] == [want["format_uuid"]] * len(envs)
    assert [next(f for f in e["flags"] if f != "HAS_CRC") for e in envs] == want["envelopes"]
    assert all(e["checksums"] == "verified" for e in envs)


def _final_records(name="nvme-standard.bin"):
    envs = inspect_stream((VECTORS / name).read_bytes())
    return envs[-1]["records"]


def test_independent_reader_record_list():
    recs = _final_records()
    flags = {"OPTIONAL": 1, "PER_INSTANCE": 2}
    got = [{"type": r["type"], "flags": sum(flags[f] for f in r["flags"]), "instance": r["instance"],
            "length": r["length"]} for r in recs]
    assert got == EXPECTED["final_records"]
    assert "unknown" not in {r["name"] for r in recs}


def test_independent_reader_agrees_on_the_nvme_values():
    """Field by field: what stateinspect decodes from the spec equals vfu_devices.nvme's state."""
    recs = {}
    for r in _final_records():
        recs.setdefault(r["name"], []).append(r)
    one = {k: v[0]["fields"] for k, v in recs.items()}
    s = STATE

    prof = one["PROFILE"]["ctrl_profile"]
    abi = sample_state().profile.device_abi
    from vfu_devices.nvme.migration_format import decode_device_abi
    mine = decode_device_abi(abi)
    assert (prof["serial"], prof["model"], prof["firmware"]) == (mine.serial, mine.model, mine.firmware)
    assert prof["lba_data_sizes"] == [1 << b for b in mine.lba_formats]
    assert (prof["cap"], prof["mqes"], prof["nn"], prof["max_io_queue_pairs"]) == (
        mine.cap, mine.mqes, mine.nn, mine.max_io_queue_pairs)
    assert [(n["nsid"], n["size_bytes"], n["nguid"]) for n in prof["namespaces"]] == [
        (n.nsid, n.size_bytes, n.nguid.hex()) for n in mine.namespaces]

    assert {k: one["CTRL_REGS"][k] for k in s["regs"]} == s["regs"]

    queues_sq = [one["ADMIN_QUEUES"]["sq"], *one["NVMECS_V0"]["sqs"]]
    queues_cq = [one["ADMIN_QUEUES"]["cq"], *one["NVMECS_V0"]["cqs"]]
    assert [{"qid": q["qid"], "base": q["prp1"], "size": q["entries"], "cqid": q["cqid"],
             "priority": q["qprio"], "head": q["head"], "tail": q["tail"]} for q in queues_sq] == s["sqs"]
    assert [{"qid": q["qid"], "base": q["prp1"], "size": q["entries"], "vector": q["iv"],
             "irq_enabled": bool(q["ien"]), "head": q["head"], "tail": q["tail"],
             "phase": q["phase"]} for q in queues_cq] == s["cqs"]

    assert one["DBBUF"]["dbs"] == s["dbbuf"]["doorbells"]
    assert one["DBBUF"]["eis"] == s["dbbuf"]["event_idx"]
    assert one["DBBUF"]["enabled"] == 1

    features = {r["fields"]["fid"]: r["fields"] for r in recs["FEATURE"]}
    assert [r["instance"] for r in recs["FEATURE"]] == sorted(features)
    f = s["features"]
    assert features[0x01]["value"] == f["arbitration"]
    assert features[0x06]["value"] == int(f["volatile_write_cache"])
    assert (features[0x07]["nsqa"], features[0x07]["ncqa"]) == tuple(f["queues_granted"])
    assert features[0x0B]["value"] == f["async_event_config"]
    assert features[0x0F]["value"] == f["keep_alive_timer"]
    assert [(t["sensor"], t["kind"], t["threshold"]) for t in features[0x04]["thresholds"]] == [
        (t["sensor"], t["kind"], t["value"]) for t in f["temperature_thresholds"]]
    assert [(v["vector"], bool(v["cd"])) for v in features[0x09]["vectors"]] == [
        (v["vector"], v["coalescing_disable"]) for v in f["vector_config"]]
    assert features[0x0E]["timestamp_ms"] == f["timestamp_ms"]
    assert features[0x16]["data"] == f["host_behavior"]

    aer = one["AER"]
    assert aer["outstanding_cids"] == s["aer"]["outstanding"]
    assert [(e["type"], e["info"], e["log_page"]) for e in aer["events"]] == [
        (e["event_type"], e["info"], e["log_page"]) for e in s["aer"]["pending"]]
    assert [t for t in range(8) if aer["masked_types"] >> t & 1] == s["aer"]["masked_types"]
    assert aer["changed_namespaces"] == s["aer"]["changed_namespaces"]

    assert [{k: e[k] for k in ("error_count", "sqid", "cid", "status", "lba", "nsid")}
            for e in one["ERROR_LOG"]["entries"]] == s["error_log"]
    assert {k: one["SMART"][k] for k in s["smart"]} == s["smart"]
    assert "OPTIONAL" in recs["SMART"][0]["flags"] and "OPTIONAL" in recs["ERROR_LOG"][0]["flags"]

    ns = [r["fields"] for r in recs["NAMESPACE"]]
    assert [{"nsid": n["nsid"], "lba_format": n["flbas"], "lbads": n["lbads"], "nsze": n["nsze"],
             "nguid": n["nguid"], "eui64": n["eui64"], "uuid": n["uuid"],
             "write_protected": bool(n["write_protected"]), "backend_hash": n["backend_hash"]}
            for n in ns] == s["namespaces"]

    pending = [r["fields"] for r in recs["PENDING_CQE"]]
    assert [{"cqid": p["cqid"], "entries": [{"sqid": e["sqid"], "cid": e["cid"],
                                              "status": e["status_field"], "dw0": e["dw0"]}
                                             for e in p["entries"]]} for p in pending] == s["pending"]


def test_independent_reader_walks_the_opaque_tree():
    (blob,) = _final_records("nvme-opaque.bin")
    assert blob["fields"]["family_uuid"] == str(NVME_OPAQUE.uuid)
    assert blob["fields"]["tree"] == positional(STATE)


def test_cli_prints_nvme_records(capsys):
    assert cli.main(["inspect", str(VECTORS / "nvme-standard.bin")]) == 0
    out = capsys.readouterr().out
    for name in ("CTRL_REGS", "ADMIN_QUEUES", "NVMECS_V0", "DBBUF", "FEATURE", "AER", "ERROR_LOG",
                 "SMART", "NAMESPACE", "PENDING_CQE", "ctrl_profile"):
        assert name in out
    assert "nvme-ctrl/std/1 a035903e-a033-5eaf-812b-d1b8c0ea4232" in out


@pytest.mark.parametrize("cut", [10, 100, 700, -9])
def test_both_readers_refuse_damaged_vectors(cut):
    data = bytearray((VECTORS / "nvme-standard.bin").read_bytes())
    if cut > 0:
        del data[cut:]
    else:
        data[cut] ^= 1
    with pytest.raises(Bad):
        inspect_stream(bytes(data))
    ls = LoadSession(NVME_FORMATS)
    with pytest.raises(MigrationError):
        ls.write(bytes(data))
        ls.finish()
