"""virtio device state and its formats: ``virtio-blk/std/1``, ``virtio-net/std/1``,
``virtio-rng/std/1`` (documented records, docs/migration-format.md section 5.4) and the
implementation-private ``opaque/vfu-virtio-{blk,net,rng}``.

Standard payload, in this order::

    PROFILE (0x0001)       device_abi = VIRTIO_PROFILE (0x0201 layout: device id, offered
                           features, queues, queue size, notify multiplier, capability
                           layout, read-only device configuration and its SHA-256)
    PCI_CONFIG, MSIX, INTX (0x0002..0x0004)
    VIRTIO_PARTS (0x7100)  one VIRTIO 1.4 ``virtio_dev_part`` per record, verbatim, in spec
                           order: DEV_FEATURES, DRV_FEATURES, PCI_COMMON_CFG (x4),
                           DEVICE_STATUS, VQ_CFG x vq, VQ_NOTIFY_CFG x vq, then for net the
                           control-queue parts (RX mode, MAC table, MAC, MQ pairs)
    VQ_RUNTIME (0x0210)    per vq: ring positions VIRTIO 1.4 leaves out
    ISR_GEN (0x0211)       ISR status and config_generation
    NET_EXTRA (0x0220)     net: link status, guest offloads, announce counter
    BLK_CONFIG (0x0230)    blk: writeback
    BLK_ID (0x0232)        blk: the GET_ID string

The shared transport part (everything but the device-specific records) is what the design
calls ``virtio-pci/std/1``; the three device formats are that plus their own records.
"""

from __future__ import annotations

import errno
import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from vfu_server.migration import (
    FormatSet,
    MigrationFormatError,
    OpaqueFormat,
    Record,
    RecordLayout,
    RecordSet,
    StandardFormat,
    format_uuid,
    register_formats,
)
from vfu_server.migration.generic import (
    GENERIC_LAYOUTS,
    IntxState,
    MsixState,
    PciConfigState,
    PciProfile,
    PciState,
    generic_records,
    pci_parts_from_records,
    profile_of_records,
)

__all__ = [
    "BLK_FORMATS",
    "NET_FORMATS",
    "RNG_FORMATS",
    "BlkMig",
    "NetMig",
    "TransportMig",
    "VirtioDevState",
    "VirtioProfile",
    "VqMig",
    "decode_virtio_profile",
    "encode_virtio_profile",
    "sample_state",
]

NO_VECTOR = 0xFFFF
STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET = 4, 8, 0x40

# -- the state tree (plain data; the opaque formats serialise it as it is) ---------------------


@dataclass(frozen=True)
class VqMig:
    """One split virtqueue: configuration (VQ_CFG, VQ_NOTIFY_CFG) and position (VQ_RUNTIME)."""

    size: int
    ready: bool = False
    msix_vector: int = NO_VECTOR
    desc: int = 0
    driver: int = 0
    device: int = 0
    notify_off: int = 0
    last_avail_idx: int = 0
    used_idx: int = 0
    signalled_used: int = 0
    signalled_valid: bool = False


@dataclass(frozen=True)
class TransportMig:
    """The virtio-pci transport (common configuration, ISR, queues)."""

    driver_features: int = 0
    device_feature_select: int = 0
    driver_feature_select: int = 0
    config_msix_vector: int = NO_VECTOR
    queue_select: int = 0
    status: int = 0
    config_generation: int = 0
    isr: int = 0
    queues: tuple[VqMig, ...] = ()


@dataclass(frozen=True)
class BlkMig:
    writeback: int = 1
    serial: bytes = b""  # GET_ID string, up to 20 bytes, NUL padding stripped


@dataclass(frozen=True)
class NetMig:
    mac: bytes = bytes(6)
    promisc: bool = True
    allmulti: bool = False
    uni_macs: tuple[bytes, ...] = ()
    multi_macs: tuple[bytes, ...] = ()
    active_pairs: int = 1
    link_up: bool = False


@dataclass(frozen=True)
class VirtioDevState(PciState):
    transport: TransportMig = field(default_factory=TransportMig)
    blk: BlkMig | None = None
    net: NetMig | None = None


# -- VIRTIO_PROFILE: the device_abi of PROFILE --------------------------------------------------


@dataclass(frozen=True)
class VirtioProfile:
    device_id: int
    device_features: int
    num_queues: int
    queue_size_max: int
    notify_multiplier: int
    #: (bar, offset, length) of the common, notify, ISR and device configuration structures
    caps: tuple[tuple[int, int, int], ...]
    #: the device configuration with driver-writable and dynamic fields zeroed
    ro_config: bytes


VIRTIO_PROFILE = RecordLayout(0x0201, "VIRTIO_PROFILE", [
    ("device_id", "H"), ("num_queues", "H"), ("queue_size_max", "H"), ("reserved0", "H"),
    ("notify_off_multiplier", "I"), ("device_cfg_len", "I"),
    ("device_features_lo", "Q"), ("device_features_hi", "Q"),
    *[f for name in ("common", "notify", "isr", "device") for f in (
        (f"{name}_bar", "B"), (f"{name}_reserved", "B"), (f"{name}_reserved2", "H"),
        (f"{name}_offset", "I"), (f"{name}_length", "I"))],
    ("ro_config_sha256", "32s"),
], tail=True, doc="tail: device_cfg_len bytes of read-only device configuration")
_CAP_NAMES = ("common", "notify", "isr", "device")
_M64 = (1 << 64) - 1


def _bad(reason: str, err: int = errno.EINVAL) -> MigrationFormatError:
    return MigrationFormatError(err, reason)


def encode_virtio_profile(p: VirtioProfile) -> bytes:
    v: dict[str, object] = {
        "device_id": p.device_id, "num_queues": p.num_queues, "queue_size_max": p.queue_size_max,
        "notify_off_multiplier": p.notify_multiplier, "device_cfg_len": len(p.ro_config),
        "device_features_lo": p.device_features & _M64, "device_features_hi": p.device_features >> 64,
        "ro_config_sha256": hashlib.sha256(p.ro_config).digest(),
    }
    for name, (bar, off, length) in zip(_CAP_NAMES, p.caps, strict=True):
        v[f"{name}_bar"], v[f"{name}_offset"], v[f"{name}_length"] = bar, off, length
    return VIRTIO_PROFILE.pack(v, tail=p.ro_config).payload


def decode_virtio_profile(abi: bytes) -> VirtioProfile:
    v, tail = VIRTIO_PROFILE.unpack(abi)
    n = v["device_cfg_len"]
    if n > len(tail):
        raise _bad("VIRTIO_PROFILE: device_cfg_len overruns the profile", errno.EBADMSG)
    ro = bytes(tail[:n])
    if hashlib.sha256(ro).digest() != v["ro_config_sha256"]:
        raise _bad("VIRTIO_PROFILE: ro_config_sha256 does not match the configuration bytes")
    if not 1 <= v["num_queues"] <= 0x3FF or not v["queue_size_max"]:
        raise _bad(f"VIRTIO_PROFILE: {v['num_queues']} queues of {v['queue_size_max']}")
    return VirtioProfile(
        device_id=v["device_id"], device_features=v["device_features_lo"] | v["device_features_hi"] << 64,
        num_queues=v["num_queues"], queue_size_max=v["queue_size_max"],
        notify_multiplier=v["notify_off_multiplier"],
        caps=tuple((v[f"{n_}_bar"], v[f"{n_}_offset"], v[f"{n_}_length"]) for n_ in _CAP_NAMES),
        ro_config=ro)


# -- VIRTIO 1.4 device parts (record 0x7100, one virtio_dev_part each) ---------------------------

VIRTIO_PARTS = RecordLayout(0x7100, "VIRTIO_PARTS", [], per_instance=True,
                            doc="payload: virtio_dev_part_hdr (16 bytes) + value, verbatim")
_PART_HDR = struct.Struct("<HBB8sI")
PART_OPTIONAL = 1
P_DEV_FEATURES, P_DRV_FEATURES, P_PCI_COMMON_CFG, P_DEVICE_STATUS = 0x100, 0x101, 0x102, 0x103
P_VQ_CFG, P_VQ_NOTIFY_CFG, P_NET_CVQ = 0x104, 0x105, 0x200
_VQ_CFG = struct.Struct("<HHHHQQQ")
_VQ_NOTIFY = struct.Struct("<HH4x")
# virtio_pci_common_cfg fields carried as PCI_COMMON_CFG parts: offset -> width
CFG_DEVICE_FEATURE_SELECT, CFG_DRIVER_FEATURE_SELECT, CFG_MSIX, CFG_NUM_QUEUES, CFG_QUEUE_SELECT = (
    0x00, 0x08, 0x10, 0x12, 0x16)
_COMMON_WIDTH = {CFG_DEVICE_FEATURE_SELECT: 4, CFG_DRIVER_FEATURE_SELECT: 4, CFG_MSIX: 2,
                 CFG_NUM_QUEUES: 2, CFG_QUEUE_SELECT: 2}
# virtio-net control-queue commands carried as NET_CVQ parts: (class, command)
CVQ_RX_PROMISC, CVQ_RX_ALLMULTI, CVQ_MAC_TABLE_SET, CVQ_MAC_ADDR_SET, CVQ_MQ_PAIRS_SET = (
    (0, 0), (0, 1), (1, 0), (1, 1), (4, 0))
_CVQ_KNOWN = {CVQ_RX_PROMISC, CVQ_RX_ALLMULTI, CVQ_MAC_TABLE_SET, CVQ_MAC_ADDR_SET, CVQ_MQ_PAIRS_SET}
_PART_ORDER = {P_DEV_FEATURES: 0, P_DRV_FEATURES: 1, P_PCI_COMMON_CFG: 2, P_DEVICE_STATUS: 3,
               P_VQ_CFG: 4, P_VQ_NOTIFY_CFG: 5, P_NET_CVQ: 6}


def part(ptype: int, selector: bytes, value: bytes, flags: int = 0) -> bytes:
    """One ``virtio_dev_part``: 16-byte header, then the value."""
    return _PART_HDR.pack(ptype, flags, 0, selector.ljust(8, b"\0"), len(value)) + value


def _feat(value: int) -> bytes:
    return struct.pack("<QQ", value & _M64, value >> 64)


def _sel_u32(v: int) -> bytes:
    return struct.pack("<I4x", v)


def _sel_u16(v: int) -> bytes:
    return struct.pack("<H6x", v)


def _mac_table(uni: tuple[bytes, ...], multi: tuple[bytes, ...]) -> bytes:
    return (struct.pack("<I", len(uni)) + b"".join(uni)
            + struct.pack("<I", len(multi)) + b"".join(multi))


def transport_parts(prof: VirtioProfile, t: TransportMig) -> list[bytes]:
    # VIRTIO 1.4 marks DEV_FEATURES VIRTIO_DEV_PART_F_OPTIONAL: it only repeats the profile.
    out = [part(P_DEV_FEATURES, b"", _feat(prof.device_features), flags=PART_OPTIONAL),
           part(P_DRV_FEATURES, b"", _feat(t.driver_features))]
    for off, value in ((CFG_DEVICE_FEATURE_SELECT, t.device_feature_select),
                       (CFG_DRIVER_FEATURE_SELECT, t.driver_feature_select),
                       (CFG_MSIX, t.config_msix_vector), (CFG_NUM_QUEUES, len(t.queues)),
                       (CFG_QUEUE_SELECT, t.queue_select)):
        out.append(part(P_PCI_COMMON_CFG, _sel_u32(off), value.to_bytes(_COMMON_WIDTH[off], "little")))
    out.append(part(P_DEVICE_STATUS, b"", bytes([t.status])))
    for i, q in enumerate(t.queues):
        out.append(part(P_VQ_CFG, _sel_u16(i), _VQ_CFG.pack(q.size, q.msix_vector, int(q.ready), 0,
                                                             q.desc, q.driver, q.device)))
    for i, q in enumerate(t.queues):
        out.append(part(P_VQ_NOTIFY_CFG, _sel_u16(i), _VQ_NOTIFY.pack(q.notify_off, 0)))
    return out


def net_parts(n: NetMig) -> list[bytes]:
    def cvq(sel: tuple[int, int], value: bytes) -> bytes:
        return part(P_NET_CVQ, bytes(sel), value)

    return [cvq(CVQ_RX_PROMISC, bytes([n.promisc])), cvq(CVQ_RX_ALLMULTI, bytes([n.allmulti])),
            cvq(CVQ_MAC_TABLE_SET, _mac_table(n.uni_macs, n.multi_macs)),
            cvq(CVQ_MAC_ADDR_SET, n.mac), cvq(CVQ_MQ_PAIRS_SET, struct.pack("<H", n.active_pairs))]


@dataclass
class _Parts:
    """What the parts stream said, checked for order and completeness."""

    dev_features: int | None = None
    drv_features: int | None = None
    common: dict[int, int] = field(default_factory=dict)
    status: int | None = None
    vq_cfg: dict[int, tuple[int, ...]] = field(default_factory=dict)
    vq_notify: dict[int, int] = field(default_factory=dict)
    cvq: dict[tuple[int, int], bytes] = field(default_factory=dict)


def _parse_parts(payloads: list[bytes], net: bool) -> _Parts:
    out = _Parts()
    rank = -1
    last_vq = -1
    for p in payloads:
        if len(p) < _PART_HDR.size:
            raise _bad("VIRTIO_PARTS: part shorter than its 16-byte header", errno.EBADMSG)
        ptype, flags, rsvd, sel, length = _PART_HDR.unpack_from(p)
        value = p[_PART_HDR.size:]
        if length != len(value):
            raise _bad(f"VIRTIO_PARTS: part {ptype:#x} length {length} != {len(value)} bytes",
                       errno.EBADMSG)
        if rsvd or flags & ~PART_OPTIONAL:
            raise _bad(f"VIRTIO_PARTS: part {ptype:#x} reserved bits set", errno.EBADMSG)
        r = _PART_ORDER.get(ptype)
        if r is None or (ptype == P_NET_CVQ and not net):
            if flags & PART_OPTIONAL:
                continue
            raise _bad(f"VIRTIO_PARTS: unknown mandatory part type {ptype:#x}")
        if r < rank:
            raise _bad(f"VIRTIO_PARTS: part {ptype:#x} out of spec order")
        if r != rank:
            last_vq = -1
        rank = r
        if ptype in (P_DEV_FEATURES, P_DRV_FEATURES):
            if len(value) % 8 or not value or (len(value) > 16 and any(value[16:])):
                raise _bad(f"VIRTIO_PARTS: feature part of {len(value)} bytes")
            words = struct.unpack_from(f"<{min(len(value), 16) // 8}Q", value)
            bits = sum(w << (64 * i) for i, w in enumerate(words))
            if ptype == P_DEV_FEATURES:
                if out.dev_features is not None:
                    raise _bad("VIRTIO_PARTS: DEV_FEATURES twice")
                out.dev_features = bits
            else:
                if out.drv_features is not None:
                    raise _bad("VIRTIO_PARTS: DRV_FEATURES twice")
                out.drv_features = bits
        elif ptype == P_PCI_COMMON_CFG:
            off = int.from_bytes(sel[:4], "little")
            width = _COMMON_WIDTH.get(off)
            if width is None:
                if flags & PART_OPTIONAL:
                    continue
                raise _bad(f"VIRTIO_PARTS: PCI_COMMON_CFG field at offset {off} not supported")
            if len(value) != width or off in out.common:
                raise _bad(f"VIRTIO_PARTS: PCI_COMMON_CFG offset {off}: bad or repeated value")
            out.common[off] = int.from_bytes(value, "little")
        elif ptype == P_DEVICE_STATUS:
            if len(value) != 1 or out.status is not None:
                raise _bad("VIRTIO_PARTS: bad or repeated DEVICE_STATUS")
            out.status = value[0]
        elif ptype in (P_VQ_CFG, P_VQ_NOTIFY_CFG):
            vq = int.from_bytes(sel[:2], "little")
            if vq <= last_vq:
                raise _bad(f"VIRTIO_PARTS: part {ptype:#x} queues not ascending")
            last_vq = vq
            if ptype == P_VQ_CFG:
                if len(value) < _VQ_CFG.size:
                    raise _bad("VIRTIO_PARTS: VQ_CFG shorter than 32 bytes", errno.EBADMSG)
                out.vq_cfg[vq] = _VQ_CFG.unpack_from(value)
            else:
                if len(value) < _VQ_NOTIFY.size:
                    raise _bad("VIRTIO_PARTS: VQ_NOTIFY_CFG shorter than 8 bytes", errno.EBADMSG)
                out.vq_notify[vq] = _VQ_NOTIFY.unpack_from(value)[0]
        else:
            key = (sel[0], sel[1])
            if key not in _CVQ_KNOWN:
                if flags & PART_OPTIONAL:
                    continue
                raise _bad(f"VIRTIO_PARTS: control part class {key[0]} command {key[1]} not supported")
            if key in out.cvq:
                raise _bad(f"VIRTIO_PARTS: control part {key} twice")
            out.cvq[key] = bytes(value)
    return out


# -- project records --------------------------------------------------------------------------

VQ_RUNTIME = RecordLayout(0x0210, "VQ_RUNTIME", [
    ("last_avail_idx", "H"), ("used_idx", "H"), ("avail_wrap", "B"), ("used_wrap", "B"),
    ("signalled_used", "H"), ("signalled_valid", "B"), ("reset_pending", "B"),
    ("reserved0", "H"), ("inuse", "I"),
], per_instance=True)
ISR_GEN = RecordLayout(0x0211, "ISR_GEN", [
    ("isr", "B"), ("config_generation", "B"), ("reserved0", "H")])
NET_EXTRA = RecordLayout(0x0220, "NET_EXTRA", [
    ("link_up", "B"), ("reserved0", "B"), ("announce_pending", "H"), ("reserved1", "I"),
    ("guest_offloads", "Q")])
BLK_CONFIG = RecordLayout(0x0230, "BLK_CONFIG", [("writeback", "B", 1), ("reserved0", "B"),
                                                 ("reserved1", "H")])
BLK_INFLIGHT = RecordLayout(0x0231, "BLK_INFLIGHT", [("count", "H"), ("reserved0", "H")],
                            tail=True, per_instance=True,
                            doc="tail: count le16 descriptor heads, oldest first")
BLK_ID = RecordLayout(0x0232, "BLK_ID", [("id", "20s")])

TRANSPORT_LAYOUTS = (*GENERIC_LAYOUTS, VIRTIO_PARTS, VQ_RUNTIME, ISR_GEN)


# -- save / load --------------------------------------------------------------------------------


def _save(state: VirtioDevState, minor: int) -> Iterator[Record]:
    prof = decode_virtio_profile(state.profile.device_abi)
    t = state.transport
    yield from generic_records(state)
    parts = transport_parts(prof, t)
    if state.net is not None:
        parts += net_parts(state.net)
    for i, p in enumerate(parts):
        yield Record(VIRTIO_PARTS.type_id, p, VIRTIO_PARTS.flags, i)
    for i, q in enumerate(t.queues):
        yield VQ_RUNTIME.pack({"last_avail_idx": q.last_avail_idx, "used_idx": q.used_idx,
                               "signalled_used": q.signalled_used,
                               "signalled_valid": q.signalled_valid}, instance=i)
    yield ISR_GEN.pack({"isr": t.isr, "config_generation": t.config_generation})
    if state.net is not None:
        yield NET_EXTRA.pack({"link_up": state.net.link_up})
    if state.blk is not None:
        yield BLK_CONFIG.pack({"writeback": state.blk.writeback})
        yield BLK_ID.pack({"id": state.blk.serial.ljust(20, b"\0")})


def _macs(data: bytes, pos: int) -> tuple[tuple[bytes, ...], int]:
    if pos + 4 > len(data):
        raise _bad("MAC_TABLE_SET part truncated")
    (n,) = struct.unpack_from("<I", data, pos)
    pos += 4
    if n > 64 or pos + 6 * n > len(data):
        raise _bad(f"MAC_TABLE_SET part: {n} entries")
    return tuple(data[pos + 6 * i:pos + 6 * i + 6] for i in range(n)), pos + 6 * n


def _load(kind: str, rs: RecordSet) -> VirtioDevState:
    profile = profile_of_records(rs)
    prof = decode_virtio_profile(profile.device_abi)
    if prof.device_id != _DEVICE_IDS[kind]:
        raise _bad(f"virtio device id {prof.device_id} in a {kind} stream")
    pci, msix, intx = pci_parts_from_records(rs, profile)
    rs.all(VIRTIO_PARTS)  # instances strictly ascending
    parts = _parse_parts([r.payload for r in rs.records if r.type == VIRTIO_PARTS.type_id],
                         kind == "net")
    nq = prof.num_queues
    if parts.dev_features is not None and parts.dev_features != prof.device_features:
        raise _bad("DEV_FEATURES part differs from the profile's offered features")
    if parts.drv_features is None or parts.status is None:
        raise _bad("VIRTIO_PARTS: DRV_FEATURES and DEVICE_STATUS are mandatory")
    if parts.drv_features & ~prof.device_features:
        raise _bad(f"driver features {parts.drv_features:#x} not offered")
    if parts.common.get(CFG_NUM_QUEUES, nq) != nq:
        raise _bad(f"PCI_COMMON_CFG num_queues {parts.common[CFG_NUM_QUEUES]} != profile {nq}")
    if sorted(parts.vq_cfg) != list(range(nq)):
        raise _bad(f"VQ_CFG parts for queues {sorted(parts.vq_cfg)}, expected 0..{nq - 1}")
    if any(i >= nq for i in parts.vq_notify):
        raise _bad("VQ_NOTIFY_CFG for a queue that does not exist")
    runtime = {i: v for i, v, _ in rs.all(VQ_RUNTIME)}
    if sorted(runtime) != list(range(nq)):
        raise _bad(f"VQ_RUNTIME for queues {sorted(runtime)}, expected 0..{nq - 1}")
    queues = []
    for i in range(nq):
        size, vector, enabled, _, desc, drv, dev = parts.vq_cfg[i]
        rt = runtime[i]
        if not 0 < size <= prof.queue_size_max or size & (size - 1) or enabled > 1:
            raise _bad(f"VQ_CFG {i}: size {size}, enabled {enabled}")
        if rt["inuse"] or rt["reset_pending"] or rt["avail_wrap"] or rt["used_wrap"]:
            raise _bad(f"VQ_RUNTIME {i}: in-flight requests or packed-ring state "
                       "(this implementation drains and uses split rings)")
        if rt["signalled_valid"] > 1:
            raise _bad(f"VQ_RUNTIME {i}: signalled_valid {rt['signalled_valid']}")
        if (rt["used_idx"] - rt["last_avail_idx"]) & 0xFFFF:
            raise _bad(f"VQ_RUNTIME {i}: used_idx {rt['used_idx']} != last_avail_idx "
                       f"{rt['last_avail_idx']} after a drain")
        queues.append(VqMig(size=size, ready=bool(enabled), msix_vector=vector, desc=desc,
                            driver=drv, device=dev, notify_off=parts.vq_notify.get(i, i),
                            last_avail_idx=rt["last_avail_idx"], used_idx=rt["used_idx"],
                            signalled_used=rt["signalled_used"],
                            signalled_valid=bool(rt["signalled_valid"])))
    isr_v, _ = rs.one(ISR_GEN)
    transport = TransportMig(
        driver_features=parts.drv_features,
        device_feature_select=parts.common.get(CFG_DEVICE_FEATURE_SELECT, 0),
        driver_feature_select=parts.common.get(CFG_DRIVER_FEATURE_SELECT, 0),
        config_msix_vector=parts.common.get(CFG_MSIX, NO_VECTOR),
        queue_select=parts.common.get(CFG_QUEUE_SELECT, 0), status=parts.status,
        config_generation=isr_v["config_generation"], isr=isr_v["isr"] & 3, queues=tuple(queues))
    blk = net = None
    if kind == "blk":
        cfg, _ = rs.one(BLK_CONFIG)
        if cfg["writeback"] > 1:
            raise _bad(f"BLK_CONFIG writeback {cfg['writeback']}")
        for _, v, _tail in rs.all(BLK_INFLIGHT):
            if v["count"]:
                raise _bad("BLK_INFLIGHT: resubmitting in-flight requests is not supported")
        ident, _ = rs.one(BLK_ID)
        blk = BlkMig(writeback=cfg["writeback"], serial=ident["id"].rstrip(b"\0"))
    elif kind == "net":
        extra, _ = rs.one(NET_EXTRA)
        if extra["link_up"] > 1 or extra["guest_offloads"] or extra["announce_pending"]:
            raise _bad("NET_EXTRA: offloads or announcements this device never offers")
        cvq = parts.cvq
        promisc = cvq.get(CVQ_RX_PROMISC, b"\x01")
        allmulti = cvq.get(CVQ_RX_ALLMULTI, b"\x00")
        if len(promisc) != 1 or len(allmulti) != 1 or promisc[0] > 1 or allmulti[0] > 1:
            raise _bad("RX mode part is not a single 0/1 byte")
        uni: tuple[bytes, ...] = ()
        multi: tuple[bytes, ...] = ()
        if CVQ_MAC_TABLE_SET in cvq:
            table = cvq[CVQ_MAC_TABLE_SET]
            uni, pos = _macs(table, 0)
            multi, pos = _macs(table, pos)
            if pos != len(table):
                raise _bad("MAC_TABLE_SET part has trailing bytes")
        mac = cvq.get(CVQ_MAC_ADDR_SET, prof.ro_config[:6])
        pairs_raw = cvq.get(CVQ_MQ_PAIRS_SET, b"\x01\x00")
        if len(mac) != 6 or len(pairs_raw) != 2:
            raise _bad("MAC_ADDR_SET or VQ_PAIRS_SET part of the wrong size")
        (pairs,) = struct.unpack("<H", pairs_raw)
        if not 1 <= pairs <= (nq - 1) // 2:
            raise _bad(f"VQ_PAIRS_SET {pairs} outside 1..{(nq - 1) // 2}")
        net = NetMig(mac=mac, promisc=bool(promisc[0]), allmulti=bool(allmulti[0]),
                     uni_macs=uni, multi_macs=multi, active_pairs=pairs,
                     link_up=bool(extra["link_up"]))
    return VirtioDevState(profile, pci, msix, intx, transport, blk, net)


_DEVICE_IDS = {"net": 1, "blk": 2, "rng": 4}


def _standard(kind: str, extra: tuple[RecordLayout, ...]) -> StandardFormat:
    name = f"virtio-{kind}/std/1"
    return StandardFormat(
        name, major=1, minor_max=0, records=(*TRANSPORT_LAYOUTS, *extra),
        save=_save, load=lambda rs, minor: _load(kind, rs), state_type=VirtioDevState,
            profile_from_records=profile_of_records,
        description=f"virtio-{kind}: VIRTIO 1.4 device parts + ring positions "
                    "(docs/migration-format.md 5.4)")


def _opaque(kind: str) -> OpaqueFormat:
    return OpaqueFormat(f"opaque/vfu-virtio-{kind}", state_type=VirtioDevState, schema_version=1,
                                            description=f"vfu-server's virtio-{kind}, implementation-private TLV")


BLK_STANDARD = _standard("blk", (BLK_CONFIG, BLK_INFLIGHT, BLK_ID))
NET_STANDARD = _standard("net", (NET_EXTRA,))
RNG_STANDARD = _standard("rng", ())
BLK_OPAQUE, NET_OPAQUE, RNG_OPAQUE = _opaque("blk"), _opaque("net"), _opaque("rng")
assert BLK_STANDARD.uuid == format_uuid("virtio-blk/std/1")

#: Opaque first: same-build migration is the common case.
BLK_FORMATS = FormatSet([BLK_OPAQUE, BLK_STANDARD])
NET_FORMATS = FormatSet([NET_OPAQUE, NET_STANDARD])
RNG_FORMATS = FormatSet([RNG_OPAQUE, RNG_STANDARD])
register_formats("virtio-blk", BLK_FORMATS)
register_formats("virtio-net", NET_FORMATS)
register_formats("virtio-rng", RNG_FORMATS)


def sample_state(kind: str) -> VirtioDevState:
    """A fully populated, deterministic state of a virtio-``kind`` device (golden vectors)."""
    from vfu_server.migration.generic import MsixVector

    nq = {"blk": 2, "net": 3, "rng": 1}[kind]
    dev_id = _DEVICE_IDS[kind]
    features = (1 << 32) | (1 << 29) | (1 << 28)
    if kind == "blk":
        features |= 0x7646  # SIZE_MAX SEG_MAX BLK_SIZE FLUSH TOPOLOGY MQ DISCARD WRITE_ZEROES
        ro = struct.pack("<QIIHBBIBBHIBxHIIIIIB3x", 8192, 1 << 20, 254, 0, 0, 0, 512, 0, 0, 1, 0,
                         1, nq, 0x3FFFFF, 32, 1, 0x3FFFFF, 32, 1)
    elif kind == "net":
        features |= 0xC70020  # MAC STATUS CTRL_VQ CTRL_RX MQ CTRL_MAC_ADDR
        ro = bytes.fromhex("525400123456") + struct.pack("<HH", 0, 1)
    else:
        ro = b""
    vprof = VirtioProfile(
        device_id=dev_id, device_features=features, num_queues=nq, queue_size_max=256,
        notify_multiplier=4,
        caps=((4, 0, 0x38), (4, 0x3000, 0x1000), (4, 0x1000, 1), (4, 0x2000, len(ro)) if ro else (0, 0, 0)),
        ro_config=ro)
    vectors = nq + 1
    profile = PciProfile(
        vendor_id=0x1AF4, device_id=0x1040 + dev_id, subsys_vendor_id=0x1AF4, subsys_id=dev_id,
        class_code={"blk": 0x010000, "net": 0x020000, "rng": 0xFF0000}[kind], revision=1,
        bar_sizes=(0, 0x1000, 0, 0, 0x4000, 0), bar_flags=(0, 0, 0, 0, 0x0C, 0),
        msix_vectors=vectors, msix_table_bir=1, msix_table_offset=0, msix_pba_bir=1,
        msix_pba_offset=0x800,
        capabilities=bytes([0x01, 0x40, 0x11, 0x48, 0x10, 0x54, 0x09, 0x90, 0x09, 0xA4, 0x09, 0xB8,
                            0x09, 0xC8, 0x09, 0xDC]),
        device_abi=encode_virtio_profile(vprof))
    queues = tuple(
        VqMig(size=128 if i < nq - 1 or kind == "rng" else 64, ready=True, msix_vector=i + 1,
              desc=0x10000 * (i + 1), driver=0x10000 * (i + 1) + 0x800,
              device=0x10000 * (i + 1) + 0x1000, notify_off=i, last_avail_idx=1000 + 7 * i,
              used_idx=1000 + 7 * i, signalled_used=999 + 7 * i, signalled_valid=i % 2 == 0)
        for i in range(nq))
    transport = TransportMig(driver_features=features & ~(1 << 28), device_feature_select=1,
                             driver_feature_select=1, config_msix_vector=0, queue_select=nq - 1,
                             status=0x0F, config_generation=3, isr=0, queues=queues)
    return VirtioDevState(
        profile=profile,
        pci=PciConfigState(command=0x0406, cache_line_size=0x10, interrupt_line=11,
                           bars=(0, 0xFEB01000, 0, 0, 0x0000000C, 0xFE), msix_control=0x8000 | (vectors - 1)),
        msix=MsixState(tuple(MsixVector(0xFEE00000 + 0x1000 * i, 0x4020 + i, 0) for i in range(vectors)),
                       bytes((vectors + 7) // 8)),
        intx=IntxState(0), transport=transport,
        blk=BlkMig(writeback=1, serial=b"vector-disk") if kind == "blk" else None,
        net=NetMig(mac=bytes.fromhex("52540000abcd"), promisc=False, allmulti=True,
                   uni_macs=(bytes.fromhex("020000000001"),),
                   multi_macs=(bytes.fromhex("01005e000001"), bytes.fromhex("333300000001")),
                   active_pairs=1, link_up=True) if kind == "net" else None)
