"""``virtio-{blk,net,rng}/std/1`` for the independent reader, written from
docs/migration-format.md 5.4.

Registered into :mod:`vfu_server.stateinspect.reader` (register_format, register_records) when the
reader is imported (entry point ``vfu_server.stateinspect`` in pyproject.toml). Standard library
only, like the reader.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from vfu_server.stateinspect.reader import (
    OPAQUE_RECORDS,
    PCI_RECORDS,
    Bad,
    decode_fields,
    profile_hook,
    register_format,
    register_records,
    split_fixed,
)

_BLK_INFLIGHT = [("count", "H"), ("reserved0", "H")]
_RECORDS = {
    0x0210: ("VQ_RUNTIME", [("last_avail_idx", "H"), ("used_idx", "H"), ("avail_wrap", "B"),
                            ("used_wrap", "B"), ("signalled_used", "H"), ("signalled_valid", "B"),
                            ("reset_pending", "B"), ("reserved0", "H"), ("inuse", "I")], False),
    0x0211: ("ISR_GEN", [("isr", "B"), ("config_generation", "B"), ("reserved0", "H")], False),
    0x0220: ("NET_EXTRA", [("link_up", "B"), ("reserved0", "B"), ("announce_pending", "H"),
                           ("reserved1", "I"), ("guest_offloads", "Q")], False),
    0x0230: ("BLK_CONFIG", [("writeback", "B"), ("reserved0", "B"), ("reserved1", "H")], False),
    0x0231: ("BLK_INFLIGHT", _BLK_INFLIGHT, True),
    0x0232: ("BLK_ID", [("id", "20s")], False),
    0x7100: ("VIRTIO_PARTS", [], False),
}

_PART_NAMES = {0x100: "DEV_FEATURES", 0x101: "DRV_FEATURES", 0x102: "PCI_COMMON_CFG",
               0x103: "DEVICE_STATUS", 0x104: "VQ_CFG", 0x105: "VQ_NOTIFY_CFG",
               0x200: "NET_CVQ_CFG"}
_COMMON = {0x00: ("device_feature_select", 4), 0x08: ("driver_feature_select", 4),
           0x10: ("config_msix_vector", 2), 0x12: ("num_queues", 2), 0x16: ("queue_select", 2)}
_STATUS = {0: "ACKNOWLEDGE", 1: "DRIVER", 2: "DRIVER_OK", 3: "FEATURES_OK",
           6: "DEVICE_NEEDS_RESET", 7: "FAILED"}
_CVQ = {(0, 0): "RX_PROMISC", (0, 1): "RX_ALLMULTI", (1, 0): "MAC_TABLE_SET",
        (1, 1): "MAC_ADDR_SET", (4, 0): "MQ_VQ_PAIRS_SET"}


def _features(value: bytes) -> str:
    if len(value) % 8:
        raise Bad("feature part length not a multiple of 8")
    return f"{int.from_bytes(value, 'little'):#x}"


def _mac(b: bytes) -> str:
    return b.hex(":")


def _cvq(key: tuple[int, int], value: bytes) -> Any:
    name = _CVQ.get(key)
    if name in ("RX_PROMISC", "RX_ALLMULTI"):
        if len(value) != 1:
            raise Bad(f"{name} part is not one byte")
        return value[0]
    if name == "MAC_ADDR_SET":
        if len(value) != 6:
            raise Bad("MAC_ADDR_SET part is not 6 bytes")
        return _mac(value)
    if name == "MQ_VQ_PAIRS_SET":
        if len(value) != 2:
            raise Bad("MQ_VQ_PAIRS_SET part is not 2 bytes")
        return struct.unpack("<H", value)[0]
    if name == "MAC_TABLE_SET":
        tables = []
        pos = 0
        for _ in range(2):
            if pos + 4 > len(value):
                raise Bad("MAC_TABLE_SET part truncated")
            (n,) = struct.unpack_from("<I", value, pos)
            pos += 4
            if pos + 6 * n > len(value):
                raise Bad("MAC_TABLE_SET entries overrun the part")
            tables.append([_mac(value[pos + 6 * i:pos + 6 * i + 6]) for i in range(n)])
            pos += 6 * n
        if pos != len(value):
            raise Bad("MAC_TABLE_SET part has trailing bytes")
        return {"unicast": tables[0], "multicast": tables[1]}
    return value.hex()


def decode_part(p: bytes) -> dict[str, Any]:
    """One ``virtio_dev_part`` (VIRTIO 1.4): 16-byte header, then the value."""
    if len(p) < 16:
        raise Bad("VIRTIO_PARTS: part shorter than its 16-byte header")
    ptype, flags, rsvd, sel, length = struct.unpack_from("<HBB8sI", p)
    value = p[16:]
    if length != len(value):
        raise Bad(f"VIRTIO_PARTS: part {ptype:#x} length {length} != {len(value)}")
    if rsvd or flags & ~1:
        raise Bad(f"VIRTIO_PARTS: part {ptype:#x} reserved bits set")
    out: dict[str, Any] = {"part_type": f"{ptype:#05x}", "part": _PART_NAMES.get(ptype, "unknown"),
                           "optional": bool(flags & 1), "length": length}
    if ptype in (0x100, 0x101):
        out["features"] = _features(value)
    elif ptype == 0x102:
        off = int.from_bytes(sel[:4], "little")
        name, width = _COMMON.get(off, (f"offset_{off}", len(value)))
        if len(value) != width:
            raise Bad(f"PCI_COMMON_CFG {name}: {len(value)} bytes, expected {width}")
        out["offset"], out["field"], out["value"] = off, name, int.from_bytes(value, "little")
    elif ptype == 0x103:
        if len(value) != 1:
            raise Bad("DEVICE_STATUS part is not one byte")
        out["status"] = value[0]
        out["status_bits"] = [_STATUS.get(b, f"bit{b}") for b in range(8) if value[0] >> b & 1]
    elif ptype == 0x104:
        out["vq"] = int.from_bytes(sel[:2], "little")
        out.update(decode_fields([("queue_size", "H"), ("vector", "H"), ("enabled", "H"),
                            ("reserved0", "H"), ("desc", "Q"), ("driver", "Q"), ("device", "Q")],
                           value))
    elif ptype == 0x105:
        out["vq"] = int.from_bytes(sel[:2], "little")
        out.update(decode_fields([("queue_notify_off", "H"), ("queue_notif_config_data", "H")], value))
    elif ptype == 0x200:
        key = (sel[0], sel[1])
        out["class"], out["command"] = key
        out["name"] = _CVQ.get(key, "unknown")
        out["value"] = _cvq(key, value)
    else:
        out["value"] = value.hex()
    return out


def _inflight(p: bytes) -> dict[str, Any]:
    fixed, tail = split_fixed("BLK_INFLIGHT", p)
    out = decode_fields(_BLK_INFLIGHT, fixed)
    n = out.get("count", 0)
    if 2 * n > len(tail):
        raise Bad("BLK_INFLIGHT: heads overrun the record")
    out["heads"] = list(struct.unpack_from(f"<{n}H", tail))
    return out


_CAPS = ("common", "notify", "isr", "device")
_VPROF = ([("device_id", "H"), ("num_queues", "H"), ("queue_size_max", "H"), ("reserved0", "H"),
           ("notify_off_multiplier", "I"), ("device_cfg_len", "I"),
           ("device_features_lo", "Q"), ("device_features_hi", "Q")]
          + [f for c in _CAPS for f in ((f"{c}_bar", "B"), (f"{c}_reserved", "B"),
                                        (f"{c}_reserved2", "H"), (f"{c}_offset", "I"),
                                        (f"{c}_length", "I"))]
          + [("ro_config_sha256", "32s")])


def decode_virtio_profile(abi: bytes) -> dict[str, Any]:
    """PROFILE.device_abi of the virtio formats (the VIRTIO_PROFILE layout, 0x0201)."""
    fixed, tail = split_fixed("VIRTIO_PROFILE", abi)
    out = decode_fields(_VPROF, fixed)
    n = out.get("device_cfg_len", 0)
    if n > len(tail):
        raise Bad("VIRTIO_PROFILE: device_cfg_len overruns the profile")
    ro = tail[:n]
    if hashlib.sha256(ro).hexdigest() != out.get("ro_config_sha256"):
        raise Bad("VIRTIO_PROFILE: ro_config_sha256 does not match the configuration bytes")
    out["device_features"] = f"{out.get('device_features_lo', 0) | out.get('device_features_hi', 0) << 64:#x}"
    out["ro_config"] = ro.hex()
    return out


register_records(_RECORDS, {0x7100: decode_part, 0x0231: _inflight})
# Section 5.4's table: the transport records (virtio-pci/std/1, which no stream names as its
# format), then each device's own.
_TRANSPORT = [*PCI_RECORDS, 0x7100, 0x0210, 0x0211]
register_format("virtio-pci/std/1")
_hook = profile_hook("virtio_profile", decode_virtio_profile)
register_format("virtio-net/std/1", [*_TRANSPORT, 0x0220], envelope_hook=_hook)
register_format("virtio-blk/std/1", [*_TRANSPORT, 0x0230, 0x0231, 0x0232], envelope_hook=_hook)
register_format("virtio-rng/std/1", _TRANSPORT, envelope_hook=_hook)
for _name in ("opaque/vfu-virtio-blk", "opaque/vfu-virtio-net", "opaque/vfu-virtio-rng"):
    register_format(_name, OPAQUE_RECORDS)
