"""``nvme-ctrl/std/1`` for the independent reader, written from docs/migration-format.md 5.3.

Registered into :mod:`vfu_server.stateinspect.reader` (register_format, register_records) when the
reader is imported (entry point ``vfu_server.stateinspect`` in pyproject.toml). Standard library
only, like the reader.
"""

from __future__ import annotations

import struct
from typing import Any

from vfu_server.stateinspect.reader import (
    OPAQUE_RECORDS,
    PCI_RECORDS,
    Bad,
    decode_array,
    decode_fields,
    profile_hook,
    register_format,
    register_records,
    split_fixed,
)

# TP4159 I/O queue state entries (NVMe Base 2.1 Figs. 360 and 361), 24 bytes each.
_SQ = [("prp1", "Q"), ("qsize", "H"), ("qid", "H"), ("cqid", "H"), ("attr", "H"), ("head", "H"),
       ("tail", "H"), ("reserved0", "I")]
_CQ = [("prp1", "Q"), ("qsize", "H"), ("qid", "H"), ("head", "H"), ("tail", "H"), ("attr", "I"),
       ("reserved0", "I")]


def _sq(e: dict[str, Any]) -> dict[str, Any]:
    e = dict(e)
    e["entries"] = e["qsize"] + 1
    e["pc"], e["qprio"] = e["attr"] & 1, (e["attr"] >> 1) & 3
    return e


def _cq(e: dict[str, Any]) -> dict[str, Any]:
    e = dict(e)
    a = e["attr"]
    e["entries"] = e["qsize"] + 1
    e["pc"], e["ien"], e["s0pt"], e["iv"] = a & 1, (a >> 1) & 1, (a >> 2) & 1, a >> 16
    # Phase tag the controller writes next: S0PT once the tail left slot 0, else its inverse.
    e["phase"] = e["s0pt"] if e["tail"] else e["s0pt"] ^ 1
    return e


def _admin_queues(p: bytes) -> dict[str, Any]:
    if len(p) < 48:
        raise Bad("ADMIN_QUEUES shorter than two 24-byte entries")
    return {"sq": _sq(decode_fields(_SQ, p[:24])), "cq": _cq(decode_fields(_CQ, p[24:48]))}


def _nvmecs(p: bytes) -> dict[str, Any]:
    if len(p) < 8:
        raise Bad("NVMECS_V0 shorter than its header")
    ver, nsq, ncq, _ = struct.unpack_from("<HHHH", p)
    if ver != 0:
        raise Bad(f"NVMECS version {ver}")
    if len(p) != 8 + 24 * (nsq + ncq):
        raise Bad("NVMECS_V0 length does not match NIOSQ/NIOCQ")
    return {"ver": ver, "niosq": nsq, "niocq": ncq,
            "sqs": [_sq(e) for e in decode_array("NVMECS_V0", _SQ, p[8:], nsq, 24)],
            "cqs": [_cq(e) for e in decode_array("NVMECS_V0", _CQ, p[8 + 24 * nsq:], ncq, 24)]}


_FEATURE_NAMES = {0x01: "arbitration", 0x02: "power_management", 0x04: "temperature_threshold",
                  0x05: "error_recovery", 0x06: "volatile_write_cache", 0x07: "number_of_queues",
                  0x08: "interrupt_coalescing", 0x09: "interrupt_vector_config",
                  0x0A: "write_atomicity", 0x0B: "async_event_config", 0x0E: "timestamp",
                  0x0F: "keep_alive_timer", 0x16: "host_behavior_support"}


def _feature(p: bytes) -> dict[str, Any]:
    fixed, tail = split_fixed("FEATURE", p)
    out = decode_fields([("fid", "B"), ("sel", "B"), ("reserved0", "H"), ("value", "I"),
                         ("data_len", "I")], fixed)
    n = out.get("data_len", 0)
    if n > len(tail):
        raise Bad("FEATURE data overruns the record")
    data = tail[:n]
    fid = out.get("fid")
    out["feature"] = _FEATURE_NAMES.get(fid, "unknown")
    if fid == 0x04:
        out["thresholds"] = decode_array("FEATURE", [("sensor", "B"), ("kind", "B"), ("threshold", "H")],
                                         data, n // 4, 4)
    elif fid == 0x07:
        out["nsqa"], out["ncqa"] = out["value"] & 0xFFFF, out["value"] >> 16
    elif fid == 0x09:
        out["vectors"] = decode_array("FEATURE", [("vector", "H"), ("cd", "B"), ("reserved0", "B")],
                                      data, n // 4, 4)
    elif fid == 0x0E and n >= 8:
        out["timestamp_ms"] = int.from_bytes(data[:6], "little")
        out["timestamp_attributes"] = data[6]
    elif n:
        out["data"] = data.hex()
    return out


def _aer(p: bytes) -> dict[str, Any]:
    fixed, tail = split_fixed("AER", p)
    out = decode_fields([("outstanding_count", "H"), ("event_count", "H"), ("event_size", "H"),
                         ("changed_ns_count", "H"), ("masked_types", "I"), ("reserved0", "I")], fixed)
    no, ne = out.get("outstanding_count", 0), out.get("event_count", 0)
    es, nc = out.get("event_size", 4), out.get("changed_ns_count", 0)
    if 2 * no + ne * es + 4 * nc > len(tail):
        raise Bad("AER lists overrun the record")
    out["outstanding_cids"] = list(struct.unpack_from(f"<{no}H", tail))
    out["events"] = decode_array("AER", [("type", "B"), ("info", "B"), ("log_page", "B"),
                                         ("reserved0", "B")], tail[2 * no:], ne, es)
    out["changed_namespaces"] = list(struct.unpack_from(f"<{nc}I", tail, 2 * no + ne * es))
    return out


def _error_log(p: bytes) -> dict[str, Any]:
    fixed, tail = split_fixed("ERROR_LOG", p)
    out = decode_fields([("count", "H"), ("entry_size", "H"), ("reserved0", "I")], fixed)
    out["entries"] = decode_array("ERROR_LOG", [
        ("error_count", "Q"), ("sqid", "H"), ("cid", "H"), ("status", "H"), ("reserved0", "H"),
        ("lba", "Q"), ("nsid", "I"), ("reserved1", "I")], tail, out.get("count", 0),
        out.get("entry_size", 32))
    return out


def _pending(p: bytes) -> dict[str, Any]:
    fixed, tail = split_fixed("PENDING_CQE", p)
    out = decode_fields([("cqid", "H"), ("count", "H"), ("entry_size", "H"), ("reserved0", "H")], fixed)
    entries = decode_array("PENDING_CQE", [("dw0", "I"), ("dw1", "I"), ("sqhd", "H"), ("sqid", "H"),
                                           ("cid", "H"), ("status", "H")],
                           tail, out.get("count", 0), out.get("entry_size", 16))
    for e in entries:
        e["status_field"] = e["status"] >> 1  # bit 0 is the phase tag, written when posted
    out["entries"] = entries
    return out


_SMART = [(n, "Q") for n in (
    "bytes_read", "bytes_written", "host_read_commands", "host_write_commands",
    "busy_time_minutes", "power_cycles", "power_on_seconds", "unsafe_shutdowns", "media_errors",
    "error_count")]


register_records({
    0x0110: ("CTRL_REGS", [("cc", "I"), ("csts", "I"), ("aqa", "I"), ("intms", "I"), ("asq", "Q"),
                           ("acq", "Q")], False),
    0x0111: ("ADMIN_QUEUES", [], False),
    0x7001: ("NVMECS_V0", [], False),
    0x0113: ("DBBUF", [("dbs", "Q"), ("eis", "Q"), ("enabled", "B"), ("reserved0", "B"),
                       ("reserved1", "H"), ("reserved2", "I")], False),
    0x0120: ("FEATURE", [], True),
    0x0130: ("AER", [], True),
    0x0131: ("ERROR_LOG", [], True),
    0x0132: ("SMART", _SMART, False),
    0x0140: ("NAMESPACE", [("nsid", "I"), ("flbas", "B"), ("lbads", "B"), ("attached", "B"),
                           ("write_protected", "B"), ("nsze", "Q"), ("ncap", "Q"),
                           ("nguid", "16s"), ("eui64", "8s"), ("uuid", "16s"),
                           ("backend_hash", "32s")], False),
    0x0150: ("PENDING_CQE", [], True),
}, {0x0111: _admin_queues, 0x7001: _nvmecs, 0x0120: _feature, 0x0130: _aer,
    0x0131: _error_log, 0x0150: _pending})

_ABI = [("cap", "Q"), ("vs", "I"), ("mqes", "H"), ("mdts", "B"), ("num_lba_formats", "B"),
        ("nn", "I"), ("oacs", "H"), ("oncs", "H"), ("sgls", "I"), ("max_io_queue_pairs", "H"),
        ("msix_vectors", "H"), ("aerl", "B"), ("elpe", "B"), ("vwc", "B"), ("ns_entry_size", "B"),
        ("ns_count", "H"), ("reserved0", "H"), ("lbads", "16s"), ("serial", "20s"),
        ("model", "40s"), ("firmware", "8s")]
_ABI_NS = [("nsid", "I"), ("lbads", "B"), ("flags", "B"), ("reserved0", "H"), ("size_bytes", "Q"),
           ("nguid", "16s"), ("eui64", "8s"), ("uuid", "16s")]


def decode_ctrl_profile(abi: bytes) -> dict[str, Any]:
    """PROFILE.device_abi of nvme-ctrl/std/1 (CTRL_PROFILE, 0x0101)."""
    if len(abi) < 4:
        raise Bad("CTRL_PROFILE too short")
    kind, flen = struct.unpack_from("<HH", abi)
    if kind != 0x0101:
        raise Bad(f"device_abi type {kind:#06x} is not CTRL_PROFILE")
    if 4 + flen > len(abi):
        raise Bad("CTRL_PROFILE fixed_len overruns")
    out = decode_fields(_ABI, abi[4:4 + flen])
    for text in ("serial", "model", "firmware"):
        if text in out:
            out[text] = bytes.fromhex(out[text]).decode("ascii", "replace").rstrip(" ")
    if "lbads" in out:
        out["lba_data_sizes"] = [1 << b for b in bytes.fromhex(out["lbads"])[:out["num_lba_formats"]]]
        del out["lbads"]
    out["namespaces"] = decode_array("CTRL_PROFILE", _ABI_NS, abi[4 + flen:], out.get("ns_count", 0),
                                     out.get("ns_entry_size", 56))
    return out


# Section 5.3's table: PROFILE, PCI_CONFIG, MSIX, INTX, CTRL_REGS, ADMIN_QUEUES, NVMECS_V0,
# DBBUF, FEATURE, AER, ERROR_LOG, SMART, NAMESPACE, PENDING_CQE.
register_format("nvme-ctrl/std/1", [*PCI_RECORDS, 0x0110, 0x0111, 0x7001, 0x0113, 0x0120, 0x0130,
                                    0x0131, 0x0132, 0x0140, 0x0150],
                envelope_hook=profile_hook("ctrl_profile", decode_ctrl_profile))
register_format("opaque/vfu-nvme", OPAQUE_RECORDS)
