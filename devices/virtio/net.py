"""virtio-net (VIRTIO 1.2 section 5.1) on a TAP interface or a Unix datagram peer.

Queues: receiveq0, transmitq0, ..., receiveqN-1, transmitqN-1, controlq.

Offloads: on a TAP that carries virtio-net headers (the default, ``--no-offloads`` turns it off)
the device offers checksum offload and TCP segmentation both ways (CSUM, GUEST_CSUM,
HOST_TSO4/6, HOST_ECN, GUEST_TSO4/6, GUEST_ECN) and passes the 12-byte ``virtio_net_hdr_v1``
between the guest and the TAP unchanged: the host kernel checks the guest's headers, fills in
checksums and cuts segments, and marks what it hands up the same way, as with QEMU's own
virtio-net on a tap. Mergeable receive buffers (MRG_RXBUF) come with them: a large segment
spreads over as many of the guest's receive buffers as it needs. Without such a TAP (a socket
peer, ``--no-offloads``) no offload is offered: complete, checksummed frames, and a header that
is all zeroes but ``num_buffers`` = 1. The offered features are part of the migration profile:
source and destination must both offer offloads (TAPs) or both not (``--no-offloads`` or a
socket peer), as with QEMU's own virtio-net.

Received frames flow backend -> channel -> one receive pump that fills the guest's receive
buffers; when the guest has none, the pump waits for a kick and the backend stops reading
(a socket peer is slowed down, nothing is lost). The control queue handles RX mode
(promiscuous, all-multicast), the MAC filter table, the MAC address and the number of active
queue pairs.
"""

from __future__ import annotations

import argparse
import base64
import errno
import itertools
import os
import re
import struct
import zlib
from typing import TYPE_CHECKING, Any

import trio

from vfu_server.faults import FaultDomain, FaultSet, Rule, flip_bits
from vfu_server.iostats import IoStats, QueueStats
from vfu_server.migration import MigrationFormatError
from vfu_server.pci.polling import MAX_POLL_US
from vfu_server.sandbox import SandboxNeeds
from vfu_server.transport.timer import PreciseTimer

from ..fastio import RegionTable, load_vq
from ..fastio import load_module_async as load_fastio
from .netbackend import BURST, MAX_FRAME, RX_DRAINED, RX_MORE, NetBackend, SocketBackend, TapBackend
from .pci import VirtioPciDevice
from .queue import DescriptorChain, SplitQueue, VirtqueueError
from .spec import DeviceId, Status, bit

if TYPE_CHECKING:
    from .migration_format import VirtioDevState

MAX_PAIRS = 8
F_MAC, F_STATUS, F_CTRL_VQ, F_CTRL_RX, F_MQ, F_CTRL_MAC_ADDR = 5, 16, 17, 18, 22, 23
F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN = 0, 1, 7, 8, 9
F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_MRG_RXBUF = 11, 12, 13, 15
OFFLOAD_FEATURES = (bit(F_CSUM) | bit(F_GUEST_CSUM) | bit(F_GUEST_TSO4) | bit(F_GUEST_TSO6) | bit(F_GUEST_ECN)
                    | bit(F_HOST_TSO4) | bit(F_HOST_TSO6) | bit(F_HOST_ECN))
#: feature -> the features one of which it needs (VIRTIO 1.2 5.1.3.1)
_NEEDS = {F_GUEST_TSO4: (F_GUEST_CSUM,), F_GUEST_TSO6: (F_GUEST_CSUM,), F_GUEST_ECN: (F_GUEST_TSO4, F_GUEST_TSO6),
          F_HOST_TSO4: (F_CSUM,), F_HOST_TSO6: (F_CSUM,), F_HOST_ECN: (F_HOST_TSO4, F_HOST_TSO6)}
S_LINK_UP = 1
HDR_LEN = 12  # virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
RX_HDR = bytes(10) + struct.pack("<H", 1)
HDR_F_DATA_VALID = 2
ETH_HLEN = 14
_RX, _TX = 0, 1
#: what --fault rules can do to frames (docs/faults.md): op rx (to the guest) or tx (from it),
#: queue is the queue pair
NET_FAULTS = FaultDomain(name="virtio-net", ops={"rx": _RX, "tx": _TX}, matches=frozenset({"op", "queue"}),
                         actions=frozenset({"drop", "dup", "delay", "corrupt"}), fast_ops=frozenset({_RX, _TX}))
_FAST_RX, _FAST_TX = frozenset({_RX}), frozenset({_TX})
MAX_RX_FRAME = 1514 + 4  # without GUEST_TSO: an MTU-sized frame at most (+ VLAN tag)
#: a TCP segment the guest takes whole (GUEST_TSO4/6): the kernel's GSO limit is 65536 bytes
#: per packet; a VLAN tag on top
MAX_RX_GSO_FRAME = 65536 + 4
MAX_TX_FRAME = 65536 + 4
CTRL_RX, CTRL_MAC, CTRL_MQ = 0, 1, 4
RX_PROMISC, RX_ALLMULTI = 0, 1
MAC_TABLE_SET, MAC_ADDR_SET = 0, 1
MQ_VQ_PAIRS_SET = 0
OK, ERR = 0, 1
_STOP_EMPTY, _STOP_LIMIT = 0, 1  # VFU_STOP_* of devices/_fastio_build.py
MAC_TABLE_ENTRIES = 64
#: How long the completions of a bulk transfer's frames wait by default (VirtioNet._linger,
#: ``--tx-linger-us``), timed by a timerfd (trio's own sleeps are whole milliseconds at least).
#: Guest to host with offloads, two boots, against QEMU's NIC: 1.06x at 250 us, 1.19x at 500,
#: 1.29-1.31x at 1,000, 1.36x at 2,000 (docs/performance.md, "Eleventh session"); longer
#: waits also hold back a small write that follows a bulk one (TCP autocorking) for longer.
#: QEMU's own transmit timer (virtio-net-pci tx=timer, not its default) waits 150 us.
TX_LINGER_NS = 1_000_000
#: Frames of more bytes than this on average are a bulk transfer's (TSO segments; an
#: Ethernet frame has 1,514 at most)
TX_BULK_FRAME = 2048
#: Only a stream's completions wait: TSO-sized frames of more than TX_STREAM_BYTES sent in
#: passes each within TX_STREAM_NS of the one before. One response of a request/response
#: exchange (up to 256 KiB, in however many passes) is published at once, so that a small
#: write right after it is not held back by the guest's TCP for the wait.
TX_STREAM_NS = 5_000_000
TX_STREAM_BYTES = 256 * 1024
#: Received frames of more bytes than this on average carry data, not only ACKs: data coming
#: back between two bulk passes makes them an exchange, not a stream (a 64 KiB request/response
#: lost 12% of its turns to the wait: the next request waited for it without a kick).
RX_DATA_FRAME = 1024
#: The longest ``--tx-linger-us``: a wait must end well within TX_STREAM_NS, or a stream
#: would keep falling out of it.
MAX_TX_LINGER_US = 4000
BROADCAST = b"\xff" * 6


def parse_mac(text: str) -> bytes:
    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", text):
        raise ValueError(f"bad MAC address {text!r} (expected xx:xx:xx:xx:xx:xx)")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address")
    return mac


class VirtioNet(VirtioPciDevice):
    """virtio-net: an Ethernet NIC on a TAP interface (--tap) or a socket peer (--peer)."""

    cli_name = "virtio-net"
    virtio_id = DeviceId.NET  # PCI device 0x1041
    class_code = 0x020000  # network, Ethernet
    config_size = 10  # mac[6], status, max_virtqueue_pairs
    msix_vectors = 2 + 2 * MAX_PAIRS
    queue_max_size = 256
    #: opaque/vfu-virtio-net (default) and virtio-net/std/1; the backend is not migrated
    migration_formats = "vfu_devices.virtio.migration_format:NET_FORMATS"
    fault_domain = NET_FAULTS

    def __init__(self, backend: NetBackend, mac: bytes | None = None, queue_pairs: int = 1,
                 poll_us: int = 0, tx_linger_ns: int = TX_LINGER_NS) -> None:
        if not 1 <= queue_pairs <= MAX_PAIRS:
            raise ValueError(f"--queue-pairs must be 1..{MAX_PAIRS}")
        features = (bit(F_MAC) | bit(F_STATUS) | bit(F_CTRL_VQ) | bit(F_CTRL_RX) | bit(F_MQ)
                    | bit(F_CTRL_MAC_ADDR) | (OFFLOAD_FEATURES | bit(F_MRG_RXBUF) if backend.vnet_hdr else 0))
        super().__init__(num_queues=2 * queue_pairs + 1, device_features=features, poll_us=poll_us)
        self.backend = backend
        self.queue_pairs = queue_pairs
        if not 0 <= tx_linger_ns <= MAX_TX_LINGER_US * 1000:
            raise ValueError(f"--tx-linger-us must be 0..{MAX_TX_LINGER_US}")
        self.tx_linger_ns = tx_linger_ns
        #: bytes of TSO-sized frames a stream must have sent before its completions wait
        self.tx_stream_bytes = TX_STREAM_BYTES
        self.default_mac = mac or bytes([0x52, 0x54, 0x00, *os.urandom(3)])
        self.link_up = False
        self.rx_dropped = 0
        #: packets and bytes per queue ("rx0", "tx0", ...): kind 0 received, 1 sent; frames
        #: without a header and a virtio-net header (what the wire carried)
        self.iostats = IoStats(("rx", "tx"), latency=False)
        self._qstats: dict[int, QueueStats] = {}
        self.faults = FaultSet(NET_FAULTS)
        self._rx_send: trio.MemorySendChannel[bytes] | None = None
        #: receive queues the pump filled since it last published them, by index
        self._rx_filled: dict[int, SplitQueue] = {}
        # Frames on their way to the guest, which a live handover carries over: the one the
        # pump is placing, the ones queued for it, the one the backend holds while stopped.
        self._rx_receive: trio.MemoryReceiveChannel[bytes] | None = None
        self._rx_current: bytes | None = None
        #: frames were handed to the pump since it last found its channel empty: one may be on
        #: its way to the pump task without being in the channel's buffer (a receiver waiting
        #: takes it directly), so the receive C path must not overtake it
        self._rx_handed = False
        self._rx_held: bytes | None = None
        self._rx_exported: list[bytes] = []  # taken out of the queue by an export, until rollback
        self._rx_adopted: list[bytes] = []  # a predecessor's frames, placed before any of ours
        #: frames a ``delay`` fault holds back, by a number of their own: (frame, received?, send)
        self._delayed: dict[int, tuple[bytes, bool, Any]] = {}
        self._delay_ids = itertools.count()
        #: set while running; cleared while quiesced for migration (frames stay in the backend)
        self._rx_open = trio.Event()
        self._rx_open.set()
        #: set while the receive pump runs; a reset sets it (waking what waits) and replaces it
        self._rx_pump_up = trio.Event()
        self._link_seen: bool | None = None
        #: bytes in front of each backend frame (the virtio-net header of a vnet_hdr TAP)
        self._hdr = HDR_LEN if backend.vnet_hdr else 0
        self._rx_limit = MAX_RX_FRAME
        #: GUEST_CSUM negotiated: a TAP header's flags and GSO type reach the guest as they are
        self._guest_csum = False
        #: MRG_RXBUF negotiated (offered with a vnet_hdr TAP): a packet may span buffers
        self._mergeable = False
        #: the C transmit path (devices/_fastio_build.py), once loaded; None: Python only
        self._fast: _NetFast | None = None
        #: transmit queues C sent TSO frames on since their loop last published, and those
        #: whose loop waits to publish them (_linger)
        self._tx_bulk: set[int] = set()
        self._tx_lingering: set[int] = set()
        #: per transmit queue, when C last sent TSO-sized frames (trio's clock) and how many
        #: bytes of them the stream has sent so far
        self._tx_bulk_at: dict[int, tuple[float, int]] = {}
        #: data (not only ACKs) was received since the last bulk pass: no stream
        self._rx_data = False
        self._tx_timer_warned: set[int] = set()
        self._tx_timers: dict[int, PreciseTimer] = {}
        self._reset_filters()

    def queue_stats(self, index: int) -> QueueStats:
        q = self._qstats.get(index)
        if q is None:
            q = self._qstats[index] = self.iostats.queue(f"{'tx' if index % 2 else 'rx'}{index // 2}")
        return q

    def _reset_filters(self) -> None:
        self.mac = self.default_mac
        self.active_pairs = 1
        self.promisc = True  # until the driver sets an RX mode, as QEMU does
        self.allmulti = False
        self.uni_table: set[bytes] = set()
        self.multi_table: set[bytes] = set()

    # -- command line --------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        where = parser.add_mutually_exclusive_group(required=True)
        where.add_argument("--tap", metavar="NAME", help="TAP interface (created if missing; needs CAP_NET_ADMIN)")
        where.add_argument("--peer", metavar="PATH", help="Unix SOCK_SEQPACKET socket, one frame per datagram")
        parser.add_argument("--listen", action="store_true", help="with --peer: listen on PATH instead of connecting")
        parser.add_argument("--mac", metavar="MAC", help="MAC address (default: random 52:54:00:xx:xx:xx)")
        parser.add_argument("--queue-pairs", type=int, default=1, metavar="N", help=f"RX/TX queue pairs (1..{MAX_PAIRS})")
        parser.add_argument("--offloads", action=argparse.BooleanOptionalAction, default=True,
                            help="with --tap: offer checksum offload and TCP segmentation through a TAP with "
                                 "virtio-net headers, as QEMU's tap netdev does (default: on)")
        parser.add_argument("--poll-us", type=int, default=0, metavar="US",
                            help="keep polling a queue that ran dry (transmit) or has no receive buffers for US "
                                 "microseconds before asking the guest for a kick (adaptive, up to US; trades CPU "
                                 "for latency; default 0: off)")
        parser.add_argument("--tx-linger-us", type=int, default=TX_LINGER_NS // 1000, metavar="US",
                            help="publish the completions of TSO-sized frames US microseconds after sending them, "
                                 "with what the guest adds meanwhile, and ask for no kick in between (fewer kicks "
                                 "and interrupts and larger frames for bulk transfers, as QEMU's tx=timer; only "
                                 f"once a stream has sent {TX_STREAM_BYTES // 1024} KiB, so a small write right after "
                                 "a large one may wait as long in the guest's TCP only within a stream; "
                                 f"default {TX_LINGER_NS // 1000}, at most {MAX_TX_LINGER_US}; 0: publish at once)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> VirtioNet:
        if args.listen and not args.peer:
            raise ValueError("--listen goes with --peer")
        mac = parse_mac(args.mac) if args.mac else None
        if not 1 <= args.queue_pairs <= MAX_PAIRS:
            raise ValueError(f"--queue-pairs must be 1..{MAX_PAIRS}")
        # A successor (--take-over) gets its TAP or peer sockets from its predecessor.
        adopt = getattr(args, "take_over", None) is not None
        backend: NetBackend = (TapBackend(args.tap, offloads=args.offloads, adopt=adopt) if args.tap
                               else SocketBackend(args.peer, args.listen, adopt=adopt))
        if not 0 <= args.poll_us <= MAX_POLL_US:
            raise ValueError(f"--poll-us must be 0..{MAX_POLL_US}")
        if not 0 <= args.tx_linger_us <= MAX_TX_LINGER_US:
            raise ValueError(f"--tx-linger-us must be 0..{MAX_TX_LINGER_US}")
        return cls(backend, mac, args.queue_pairs, args.poll_us, args.tx_linger_us * 1000)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backend": self.backend.describe(), "mac": self.mac.hex(":"),
                "tx_linger_us": self.tx_linger_ns // 1000}

    def sandbox_needs(self) -> SandboxNeeds:
        return self.backend.sandbox_needs()

    # -- configuration -----------------------------------------------------------------

    def read_config(self) -> bytes:
        return self.mac + struct.pack("<HH", S_LINK_UP if self.link_up else 0, self.queue_pairs)

    def _set_link(self, up: bool) -> None:
        if up != self.link_up:
            self.link_up = up
            if self.vstate.status & Status.DRIVER_OK:
                self.config_changed()

    def virtio_reset(self) -> None:
        self._rx_pump_up.set()  # a frame waiting for the pump is dropped (_deliver_now)
        self._rx_pump_up = trio.Event()
        self._reset_filters()
        self._apply_offloads(0)
        # a reset cancels a linger before its end: the queues start again without a stream
        self._tx_bulk.clear()
        self._tx_bulk_at.clear()
        self._rx_data = False

    def features_ok(self, features: int) -> bool:
        for feature, needs in _NEEDS.items():
            if features >> feature & 1 and not any(features >> n & 1 for n in needs):
                self.log.info("refusing driver features %#x: feature %d needs one of %s", features, feature, needs)
                return False
        return True

    def driver_ok(self) -> None:
        self._apply_offloads(self.features)

    def _apply_offloads(self, features: int) -> None:
        """Tell the TAP what received frames may still need, from the negotiated features."""
        tso = features & (bit(F_GUEST_TSO4) | bit(F_GUEST_TSO6))
        self._rx_limit = MAX_RX_GSO_FRAME if tso else MAX_RX_FRAME
        self._guest_csum = bool(features >> F_GUEST_CSUM & 1)
        self._mergeable = bool(features >> F_MRG_RXBUF & 1)
        try:
            self.backend.set_offloads(csum=bool(features >> F_GUEST_CSUM & 1), tso4=bool(features >> F_GUEST_TSO4 & 1),
                                      tso6=bool(features >> F_GUEST_TSO6 & 1), ecn=bool(features >> F_GUEST_ECN & 1))
        except OSError as exc:
            self.log.warning("TAP refused the offloads %#x: %s", features & OFFLOAD_FEATURES, exc)

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            module = await load_fastio()
            self._fast = _NetFast(module, self.dma) if module is not None else None
            if self._fast is not None:
                self.backend.fast_receive = self._receive_fast
            await self.backend.run(self._deliver, self._set_link)
        finally:
            self.backend.close()

    async def _deliver(self, frame: bytes) -> None:
        if self.faults.active:
            pair = self._steer(frame, self._hdr)
            rule = self.faults.match(_RX, queue=pair)
            if rule is not None:
                if rule.action == "drop":  # the frames delivered are counted as they fill buffers
                    self.queue_stats(2 * pair).error("fault-dropped")
                for out in self._faulted(rule, frame, self._deliver_now):
                    await self._deliver_now(out)
                return
        await self._deliver_now(frame)

    def _faulted(self, rule: Rule, frame: bytes, send: Any) -> list[bytes]:
        """The frames a rule turns ``frame`` into (``send`` later takes delayed ones)."""
        if rule.action == "drop":
            return []
        if rule.action == "dup":
            return [frame, frame]
        if rule.action == "delay":
            key = next(self._delay_ids)
            received = send == self._deliver_now
            self._delayed[key] = (frame, received, send)

            async def later() -> None:
                await trio.sleep(rule.delay_ms / 1000)
                if received:
                    # Not while quiesced: the frame stays in _delayed, where a live handover
                    # finds it (a waiting _deliver_now would hold one frame only).
                    while not self._rx_open.is_set():
                        await self._rx_open.wait()
                if self._delayed.pop(key, None) is not None:
                    await send(frame)

            self.spawn(later, name="net-fault-delay")
            return []
        # corrupt: bits after the Ethernet header, so that the frame still reaches its
        # receiver; a received one loses DATA_VALID, so the guest checks its checksums.
        hdr = self._hdr
        data = bytearray(frame)
        if hdr and send == self._deliver_now:  # a bound method is a new object each time: not `is`
            data[0] &= ~HDR_F_DATA_VALID
        flip_bits([memoryview(data)[hdr + ETH_HLEN :]], rule.bits, rule.rng)
        return [bytes(data)]

    async def _deliver_now(self, frame: bytes) -> None:
        # No checkpoint while the pump keeps up: a backend hands over a whole burst (what its
        # socket or TAP holds, up to the channel's size) before the pump runs, and the pump
        # fills the guest's buffers for all of it with one used-index update and one
        # interrupt instead of one per frame.
        if not self._rx_open.is_set():
            await self._hold(frame, self._rx_open)
        send = self._rx_send
        if send is None and self._rx_pump_due():
            # The driver is ready (its receive buffers may be posted) but the pump's task has
            # not run yet: wait for it, as QEMU stops reading its backend meanwhile, instead
            # of dropping what arrives in that moment.
            await self._hold(frame, self._rx_pump_up)
            send = self._rx_send
        if send is None or not self._wanted(frame, self._hdr):
            self.rx_dropped += 1
            return
        self._rx_handed = True
        try:
            try:
                send.send_nowait(frame)
            except trio.WouldBlock:
                await send.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.rx_dropped += 1  # the device was reset meanwhile

    async def _hold(self, frame: bytes, until: trio.Event) -> None:
        """Keep ``frame`` where a handover's export finds it (``_rx_held``) while waiting."""
        self._rx_held = frame
        try:
            await until.wait()
        finally:
            self._rx_held = None

    def _rx_pump_due(self) -> bool:
        """The receive pump is about to start: the driver is ready, receiveq0 is set up and the
        device does not wait for a reset (then nothing would wake a frame waiting for it)."""
        status = self.vstate.status
        return bool(status & Status.DRIVER_OK and not status & Status.DEVICE_NEEDS_RESET
                    and self.queues and self.queues[0].state.ready)

    def needs_reset(self, reason: str) -> None:
        super().needs_reset(reason)
        self._rx_pump_up.set()  # a frame waiting for the pump is dropped: it will not start now

    def _wanted(self, frame: bytes, start: int = 0) -> bool:
        """Whether the frame at ``start`` (after a virtio-net header) passes the filters."""
        if not 14 <= len(frame) - start <= self._rx_limit:
            return False
        dst = frame[start : start + 6]
        if self.promisc:
            return True
        if dst[0] & 1:
            return dst == BROADCAST or self.allmulti or dst in self.multi_table
        return dst == self.mac or dst in self.uni_table

    # -- migration ---------------------------------------------------------------------

    def ro_config(self) -> bytes:
        # The configured MAC is ABI (a destination with another --mac is refused); the link
        # status is dynamic and the MAC the driver set is state (a MAC_ADDR_SET part).
        return self.default_mac + struct.pack("<HH", 0, self.queue_pairs)

    def save_device_state(self) -> dict[str, Any]:
        from .migration_format import NetMig

        return {"net": NetMig(mac=self.mac, promisc=self.promisc, allmulti=self.allmulti,
                              uni_macs=tuple(sorted(self.uni_table)),
                              multi_macs=tuple(sorted(self.multi_table)),
                              active_pairs=self.active_pairs, link_up=self.link_up)}

    def check_device_state(self, state: VirtioDevState) -> None:
        n = state.net
        if n is None or len(n.mac) != 6 or not 1 <= n.active_pairs <= self.queue_pairs or any(
                len(m) != 6 for m in (*n.uni_macs, *n.multi_macs)) or max(
                len(n.uni_macs), len(n.multi_macs)) > MAC_TABLE_ENTRIES:
            raise MigrationFormatError(errno.EINVAL, f"{self.name}: virtio-net state not loadable")

    def load_device_state(self, state: VirtioDevState) -> None:
        n = state.net
        assert n is not None
        self.mac, self.promisc, self.allmulti = n.mac, n.promisc, n.allmulti
        self.uni_table, self.multi_table = set(n.uni_macs), set(n.multi_macs)
        self.active_pairs = n.active_pairs
        # The link is this process's backend's; the guest learns a change on resume.
        self._link_seen = n.link_up

    async def quiesce_device(self) -> None:
        self._rx_open = trio.Event()  # frames not yet taken stay in the backend (socket, TAP)
        # Delayed transmits go now rather than never: a live handover ends this process's
        # tasks once the successor took over, and no state format records them.
        for key in [k for k, (_, received, _) in self._delayed.items() if not received]:
            frame, _, send = self._delayed.pop(key)
            await send(frame)

    # -- live handover: the TAP or peer sockets and the frames on their way move over ------

    def handover_export(self) -> tuple[dict[str, Any], list[int]]:
        self.backend.pause_reading()  # from now on frames stay in the TAP or socket
        data, fds = self.backend.export()
        frames = [] if self._rx_current is None else [self._rx_current]
        receive = self._rx_receive
        while receive is not None:
            try:
                self._rx_exported.append(receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        # Frames a delay fault holds back go with the others (early, rather than lost; a
        # rollback puts them back in the queue with the rest).
        for key in [k for k, (_, received, _) in self._delayed.items() if received]:
            self._rx_exported.append(self._delayed.pop(key)[0])
        frames += self._rx_exported
        if self._rx_held is not None:
            frames.append(self._rx_held)
        return {"backend": data, "frames": [base64.b64encode(f).decode() for f in frames]}, fds

    def handover_adopt(self, data: dict[str, Any], fds: list[int]) -> None:
        try:
            frames = [base64.b64decode(f, validate=True) for f in data.get("frames", [])]
        except (ValueError, TypeError) as exc:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"handed-over frames: {exc}") from None
        self.backend.adopt(data.get("backend", {}), fds)
        self.backend.pause_reading()  # until the device runs: a refused successor reads nothing
        self._rx_adopted = frames

    def handover_released(self) -> None:
        self.backend.released = True

    def resume_device(self) -> None:
        if self.vstate.status & Status.DRIVER_OK:
            self._apply_offloads(self.features)  # a destination's TAP starts without them
        # A handover that was rolled back: the frames its export took go back in front.
        exported, self._rx_exported = self._rx_exported, []
        for frame in exported:
            if self._rx_send is None:
                self.rx_dropped += 1
                continue
            try:
                self._rx_send.send_nowait(frame)
                self._rx_handed = True  # the receive C path must not place newer ones first
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self.rx_dropped += 1
        self.backend.resume_reading()
        self._rx_open.set()
        seen, self._link_seen = self._link_seen, None
        if seen is not None and seen != self.link_up and self.vstate.status & Status.DRIVER_OK:
            self.config_changed()

    # -- queues -------------------------------------------------------------------------

    @property
    def ctrl_index(self) -> int:
        return 2 * self.queue_pairs

    async def serve_queue(self, q: SplitQueue) -> None:
        if q.index == self.ctrl_index:
            await super().serve_queue(q)  # one command after another
        elif q.index % 2 == 1:
            await self._tx_loop(q)
        elif q.index == 0:
            await self._rx_pump()
        else:
            await trio.sleep_forever()  # the pump of receiveq0 fills every receive queue

    async def _tx_loop(self, q: SplitQueue) -> None:
        """Frames in order, C first (:meth:`complete_fast`), Python for what C leaves; one
        used-index update and interrupt per pass, at most a queue's worth per pass so that a
        guest that keeps the queue full cannot starve the other tasks. The completions of a
        bulk stream's frames wait a while first (:meth:`_linger`)."""
        try:
            await self._tx_passes(q)
        finally:
            # the loop's timer goes with it (a reset, the queue stopped, the server's end)
            timer = self._tx_timers.pop(q.index, None)
            if timer is not None:
                timer.close()

    async def _tx_passes(self, q: SplitQueue) -> None:
        while True:
            budget = q.state.size
            while budget > 0:
                budget -= self.complete_fast(q)
                if budget <= 0 or (chain := q.pop()) is None:
                    break
                budget -= 1
                q.push(chain, await self.process(q, chain))
                if self._fast is not None:
                    self.notify_queue(q)  # C completes only with nothing of Python's unpublished
            if budget <= 0:
                self.notify_queue(q)
                await trio.lowlevel.checkpoint()
                continue
            if q.index in self._tx_bulk and q.pending_elsewhere and self._serves_kicks(q):
                await self._linger(q)
                continue
            self._tx_bulk.discard(q.index)
            self.notify_queue(q)
            await self._sleep_until_kicked(q)

    async def _linger(self, q: SplitQueue) -> None:
        """Publish what C sent :attr:`tx_linger_ns` later, with what the driver adds
        meanwhile, which goes out then: no kick is asked for during the wait (a kick that
        comes anyway is served at once, as ever). As QEMU's ``tx=timer``.

        Why: with completions published at once, a guest writing 64 KiB at a time sent TSO
        frames of 33-34 KiB on average, each with its kick, interrupt and ACK; with them held
        back 1 ms, 48 KiB, a fifth of the kicks and a quarter of the transmit interrupts per
        frame, which is what bounds a TCG guest's throughput (docs/performance.md, "Eleventh
        session"). Most likely Linux's TCP: it sends the tail of a write as a
        segment of its own when nothing of the socket's is still in the device (autocorking),
        and its small-queue limit lets it send more only as earlier segments complete. QEMU's
        own NIC completes later too: its bottom half runs when its main loop gets to it. Only
        after TSO frames (more than :data:`TX_BULK_FRAME` bytes each on average): a small
        request's completion would cost a timer wake-up and save nothing; and only in a stream
        (:meth:`_note_bulk`), not after one large response. Not asking for kicks
        meanwhile halved the server's CPU per MB and kept a guest on a host with a busy CPU at
        QEMU's NIC's pace (its vCPU thread gets as much of a CPU as with QEMU's NIC)."""
        self._tx_lingering.add(q.index)
        try:
            await self._tx_pause(q.index)
        finally:
            self._tx_lingering.discard(q.index)
        self._tx_bulk.discard(q.index)
        self.complete_fast(q)
        self.notify_queue(q)

    async def _tx_pause(self, index: int) -> None:
        """The linger's wait, on a timerfd of the queue's own: ``trio.sleep`` cannot wait less
        than a millisecond (CPython rounds epoll's timeout up), which made a 250 us wait
        1.1-1.2 ms."""
        timer = self._tx_timers.get(index)
        if timer is None:
            try:
                timer = self._tx_timers[index] = PreciseTimer()
            except OSError as exc:  # out of fds, say: this wait in whole milliseconds, the next tries again
                if index not in self._tx_timer_warned:
                    self._tx_timer_warned.add(index)
                    self.log.warning("queue %d: no timerfd (%s); lingering in whole milliseconds meanwhile",
                                     index, exc)
                await trio.sleep(self.tx_linger_ns / 1e9)
                return
        await timer.sleep_ns(self.tx_linger_ns)

    def _serves_kicks(self, q: SplitQueue) -> bool:
        """Kicks of this queue are served in the connection's task (:meth:`queue_kicked`)."""
        return q.accepting and not q.poll.max_ns and not self.dma.message_mode

    def queue_kicked(self, queue: SplitQueue) -> None:
        # A transmit kick while the queue's loop sleeps (or lingers): C sends the frames right
        # here, in the connection's task, before it reads the next message. That saves the
        # loop's wake-up (a scheduler pass and the task's step) on every request of a
        # request/response exchange, and the frame reaches the TAP before the connection
        # re-arms its socket.
        try:
            # Odd queues transmit (the control queue's index is even).
            if (queue.index % 2 and self._serves_kicks(queue)
                    and (queue.doorbell.parked or queue.index in self._tx_lingering)
                    and self._transmit_now(queue)):
                return
        except Exception:
            # Never lose the kick: with EVENT_IDX the driver sends no other until the loop
            # has moved avail_event, so the loop must run whatever went wrong here.
            self.log.exception("queue %d: transmit from the kick failed; the loop takes it", queue.index)
        queue.doorbell.ring()

    def _transmit_now(self, queue: SplitQueue) -> bool:
        """What the transmit loop would do for a kick, in C only (:meth:`complete_fast`),
        publish and signal it and ask the driver for the next kick (unless the loop lingers,
        or is to linger: :meth:`_linger`). True: the queue is empty again and its loop may
        sleep on, or the loop lingers and takes whatever C left when its wait ends; False:
        the loop has work (a frame Python must see, more than a burst, a broken ring, a
        linger to start) and is woken for it."""
        if not self.complete_fast(queue):
            return False
        lingering = queue.index in self._tx_lingering
        start = not lingering and queue.index in self._tx_bulk
        if lingering or start:
            # No kick is asked for until the wait is over: the loop sends what the driver
            # adds meanwhile when it publishes, and asks for the next kick then.
            return not start
        self.notify_queue(queue)
        try:
            more = queue.enable_notification()
        except VirtqueueError:
            return False  # the loop meets it again and asks for a reset
        return not more

    def complete_fast(self, queue: SplitQueue) -> int:
        """Transmit frames in C (one ``writev`` each from guest memory to the TAP) while
        Python need not see them: no dirty-page logging, no fault rule that could match,
        nothing of Python's waiting to be published. Notes a bulk transfer's frames
        (:meth:`_linger`)."""
        fast = self._fast
        if fast is None or queue.index % 2 == 0 or queue.index == self.ctrl_index:
            return 0
        if self.dma.dirty_hook is not None or not queue.can_complete_elsewhere():
            return 0
        if self.faults.active and self.faults.could_match(_FAST_TX, queue.index // 2):
            return 0
        fd = self.backend.fast_tx_fd()
        if fd is None:
            return 0
        try:
            sent = fast.tx(queue, fd, HDR_LEN - self._hdr, self.queue_stats(queue.index))
        except Exception:
            self.log.exception("queue %d: fast path failed; Python only from now on", queue.index)
            self._fast = None
            return 0
        nbytes = fast.run_bytes
        if sent and self.tx_linger_ns and nbytes > sent * TX_BULK_FRAME:
            self._note_bulk(queue.index, nbytes)
        return sent

    def _note_bulk(self, index: int, nbytes: int) -> None:
        """A pass sent ``nbytes`` of TSO-sized frames: the queue's completions wait from now
        on if its stream has sent more than :attr:`tx_stream_bytes` (:data:`TX_STREAM_NS`),
        with no data received in between (:data:`RX_DATA_FRAME`)."""
        now = trio.current_time()
        last, streamed = self._tx_bulk_at.get(index, (None, 0))
        near = last is not None and now - last <= TX_STREAM_NS / 1e9 and not self._rx_data
        streamed = streamed + nbytes if near else nbytes
        self._rx_data = False
        self._tx_bulk_at[index] = (now, streamed)
        if streamed > self.tx_stream_bytes:
            self._tx_bulk.add(index)

    def _note_received(self, packets: int, nbytes: int) -> None:
        if packets and nbytes > packets * RX_DATA_FRAME:
            self._rx_data = True

    def _receive_fast(self, fd: int) -> bytes | int | None:
        """The backend's packets straight from ``fd`` into receiveq0, in C, while nothing of
        Python's is on its way to the guest (so that packets keep their order): one
        used-index update and interrupt per burst. Returns :data:`RX_DRAINED` (``fd`` has no
        more), :data:`RX_MORE` (a whole burst placed), a packet C read but left to Python
        (deliver it), or None: C read nothing, the backend reads itself."""
        fast = self._fast
        receive = self._rx_receive
        if (fast is None or self._rx_send is None or receive is None or not self._rx_open.is_set()
                or self._rx_handed or self._rx_current is not None or self._rx_adopted or self._rx_held is not None
                or self.active_pairs != 1 or self.dma.dirty_hook is not None or not self.queues):
            return None
        q = self.queues[0]
        if not q.can_complete_elsewhere():
            return None
        if self.faults.active and self.faults.could_match(_FAST_RX, 0):
            return None
        try:
            fast.set_receive(self._hdr, self._rx_limit, self._guest_csum, self._mergeable, self.promisc, self.mac)
            if fast.rx(q, fd, self._hdr, self.queue_stats(0)):
                self.notify_queue(q)
                self._note_received(fast.run_frames, fast.run_bytes)
            held = fast.held
        except Exception:
            self.log.exception("receive fast path failed; Python only from now on")
            self._fast = None
            self.backend.fast_receive = None
            return None
        if held is not None:
            return held
        stop = fast.stop_reason
        return RX_DRAINED if stop == _STOP_EMPTY else RX_MORE if stop == _STOP_LIMIT else None

    async def _rx_pump(self) -> None:
        send, receive = trio.open_memory_channel[bytes](64)
        self._rx_send = send
        self._rx_receive = receive
        self._rx_filled.clear()
        self._rx_pump_up.set()
        adopted, self._rx_adopted = self._rx_adopted, []
        try:
            hdr = self._hdr
            # Every receive queue a burst filled gets one used-index update and one interrupt
            # when the burst is through (or before the pump waits for receive buffers); the
            # frames queued meanwhile are taken without a scheduler pass each (a burst is at
            # most the channel's 64 frames).
            while True:
                if adopted:
                    frame = adopted.pop(0)
                else:
                    try:
                        frame = receive.receive_nowait()
                    except trio.WouldBlock:
                        self._publish_rx()
                        self._rx_handed = False
                        frame = await receive.receive()
                self._rx_current = frame
                self._note_received(1, len(frame) - hdr)
                q = self.queues[2 * self._steer(frame, hdr)]
                if self._mergeable:
                    await self._receive_merged(q, frame)
                else:
                    await self._receive_whole(q, frame, hdr)
                # Marked after placing: waiting for buffers publishes (and forgets) what
                # was filled until then, this queue included.
                self._rx_filled[q.index] = q
                self._rx_current = None
        except trio.EndOfChannel:
            pass
        finally:
            self._rx_current = None
            self._publish_rx()
            if self._rx_send is send:
                self._rx_send = None
                self._rx_receive = None
                if self._rx_pump_up.is_set():
                    self._rx_pump_up = trio.Event()
            receive.close()

    def _publish_rx(self) -> None:
        """Publish what the pump put into receive queues, and signal them."""
        for q in self._rx_filled.values():
            self.notify_queue(q)
        self._rx_filled.clear()

    async def _receive_whole(self, q: SplitQueue, frame: bytes, hdr: int) -> None:
        """One frame into one receive buffer (dropped if it does not fit)."""
        while (chain := q.pop()) is None:
            self._publish_rx()
            await self._sleep_until_kicked(q)
        if chain.write_len >= len(frame) + HDR_LEN - hdr:
            if hdr:
                written = chain.write_bytes(frame)
                self._fix_header(chain, 1)
            else:
                written = chain.write_bytes(RX_HDR + frame)
            q.push(chain, written)
            (self._qstats.get(q.index) or self.queue_stats(q.index)).record(0, len(frame) - hdr, 0)
        else:
            self.rx_dropped += 1
            q.push(chain, 0)
            self.queue_stats(q.index).error("dropped")

    async def _receive_merged(self, q: SplitQueue, packet: bytes) -> None:
        """MRG_RXBUF: a TAP packet (header included) over as many receive buffers as it needs,
        ``num_buffers`` in the first. Too few buffers: they go back, and the pump waits for
        the driver to add more; a packet the whole ring cannot hold is dropped."""
        need = len(packet)
        while True:
            chains: list[DescriptorChain] = []
            room = 0
            while room < need and (chain := q.pop()) is not None:
                chains.append(chain)
                room += chain.write_len
            if room >= need:
                break
            q.unpop(len(chains))
            if len(chains) >= q.state.size:
                self.rx_dropped += 1
                self.queue_stats(q.index).error("dropped")
                return
            self._publish_rx()
            await self._sleep_until_kicked(q, beyond=len(chains))
        view = memoryview(packet)
        pos = 0
        for chain in chains:
            n = chain.write_bytes(view[pos : pos + chain.write_len])
            pos += n
            q.push(chain, n)
        self._fix_header(chains[0], len(chains))
        (self._qstats.get(q.index) or self.queue_stats(q.index)).record(0, need - HDR_LEN, 0)

    def _fix_header(self, first: DescriptorChain, buffers: int) -> None:
        """Over the TAP's header (checksum state, segment size) in the first buffer:
        ``num_buffers``, and zero flags and GSO type for a guest without GUEST_CSUM."""
        if not self._guest_csum:
            first.write_bytes(bytes(10))
        first.write_bytes(struct.pack("<H", buffers), 10)

    def _steer(self, frame: bytes, start: int = 0) -> int:
        """Receive queue pair of a frame (at ``start``): a hash of addresses, so a flow keeps
        its order."""
        if self.active_pairs == 1:
            return 0
        f = frame[start : start + 34]
        key = f[:12] + (f[26:34] if f[12:14] == b"\x08\x00" else b"")
        return zlib.crc32(key) % self.active_pairs

    async def process(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        if queue.index == self.ctrl_index:
            return self._control(chain)
        length = chain.read_len
        if HDR_LEN + 14 <= length <= HDR_LEN + MAX_TX_FRAME:
            data = chain.read_bytes()
            # A vnet_hdr TAP takes the guest's header as it is: the kernel checks it and does
            # the checksum and segmentation it asks for (a bad one fails the write: dropped).
            frame = data if self._hdr else data[HDR_LEN:]
            if self.faults.active:
                rule = self.faults.match(_TX, queue=queue.index // 2)
                if rule is not None:
                    # Counted as the wire saw it: each copy sent is a frame, a dropped one an
                    # error "fault-dropped" (a delayed one is counted when it goes).
                    if rule.action == "drop":
                        self.queue_stats(queue.index).error("fault-dropped")

                    async def send(out: bytes, index: int = queue.index) -> None:
                        await self.backend.send(out)
                        self.queue_stats(index).record(1, len(out) - self._hdr, 0)

                    for out in self._faulted(rule, frame, send):
                        await send(out)
                    return 0
            await self.backend.send(frame)
            (self._qstats.get(queue.index) or self.queue_stats(queue.index)).record(1, length - HDR_LEN, 0)
        else:
            self.queue_stats(queue.index).error("malformed")
        return 0

    # -- control queue -------------------------------------------------------------------

    def _control(self, chain: DescriptorChain) -> int:
        if chain.write_len < 1:
            raise VirtqueueError("control command without an ack byte")
        data = chain.read_bytes(4096)
        ack = self._command(data[0], data[1], data[2:]) if len(data) >= 2 else ERR
        chain.write_bytes(bytes([ack]))
        return 1

    def _command(self, cls: int, cmd: int, payload: bytes) -> int:
        if cls == CTRL_RX and cmd in (RX_PROMISC, RX_ALLMULTI) and len(payload) == 1:
            if cmd == RX_PROMISC:
                self.promisc = bool(payload[0])
            else:
                self.allmulti = bool(payload[0])
            return OK
        if cls == CTRL_MAC and cmd == MAC_ADDR_SET and len(payload) == 6:
            self.mac = payload
            return OK
        if cls == CTRL_MAC and cmd == MAC_TABLE_SET:
            tables = []
            pos = 0
            for _ in range(2):
                if pos + 4 > len(payload):
                    return ERR
                (n,) = struct.unpack_from("<I", payload, pos)
                pos += 4
                if pos + 6 * n > len(payload):
                    return ERR
                tables.append({payload[pos + 6 * i : pos + 6 * i + 6] for i in range(n)})
                pos += 6 * n
            if pos != len(payload):
                return ERR
            uni, multi = tables
            if len(uni) > MAC_TABLE_ENTRIES or len(multi) > MAC_TABLE_ENTRIES:
                return ERR  # the driver then falls back to promiscuous / all-multicast
            self.uni_table, self.multi_table = uni, multi
            return OK
        if cls == CTRL_MQ and cmd == MQ_VQ_PAIRS_SET and len(payload) == 2:
            (pairs,) = struct.unpack("<H", payload)
            if not 1 <= pairs <= self.queue_pairs:
                return ERR
            self.active_pairs = pairs
            return OK
        return ERR


class _NetFast:
    """The C side of :meth:`VirtioNet.complete_fast` (transmit) and :meth:`VirtioNet._receive_fast`:
    their context, the region table and the receive buffer."""

    def __init__(self, module: Any, dma: Any) -> None:
        self.ffi, self.lib = module.ffi, module.lib
        self.ctx = self.ffi.new("struct vfu_net *")
        self.vq = self.ffi.new("struct vfu_vq *")
        self.regions = RegionTable(self.ffi, dma)
        c = self.ctx
        c.min_len, c.max_len = HDR_LEN + ETH_HLEN, HDR_LEN + MAX_TX_FRAME
        # a packet as the TAP gives it, after room for a header a TAP without one does not give
        self.buf = self.ffi.new("uint8_t[]", HDR_LEN + MAX_FRAME)
        c.buf, c.buf_len = self.buf, MAX_FRAME

    def _prepare(self, queue: SplitQueue, fd: int, stats: QueueStats) -> None:
        c = self.ctx
        c.stats = stats.c if stats.c is not None else stats.attach_c(self.ffi)
        if self.regions.sync():
            c.regions, c.nregions = self.regions.table, self.regions.count
        c.fd = fd
        c.bytes = c.frames = 0  # C adds this run's (run_bytes, run_frames)
        load_vq(self.vq, queue)

    def tx(self, queue: SplitQueue, fd: int, skip: int, stats: QueueStats, limit: int = 64) -> int:
        """Frames sent (``skip``: bytes of the guest's header the TAP does not take)."""
        self._prepare(queue, fd, stats)
        self.ctx.skip = skip
        n: int = self.lib.vfu_net_tx_run(self.ctx, self.vq, limit)
        if n:
            queue.completed_elsewhere(n, self.vq.next_avail)
        return n

    def rx(self, queue: SplitQueue, fd: int, hdr: int, stats: QueueStats, limit: int = BURST) -> int:
        """Packets read from ``fd`` and placed: the used elements written (:attr:`held` a
        packet read and left to Python)."""
        self._prepare(queue, fd, stats)
        n: int = self.lib.vfu_net_rx_run(self.ctx, self.vq, limit)
        if n:
            queue.completed_elsewhere(n, self.vq.next_avail)
        return n

    def set_receive(self, hdr: int, limit: int, guest_csum: bool, mergeable: bool, promisc: bool,
                    mac: bytes) -> None:
        """What the device's receive path decides by (the TAP's header, the filters)."""
        c = self.ctx
        c.hdr, c.rx_limit, c.guest_csum, c.mergeable, c.promisc = hdr, limit, guest_csum, mergeable, promisc
        self.ffi.memmove(c.mac, mac, 6)

    @property
    def held(self) -> bytes | None:
        """The packet the last :meth:`rx` read and left to Python, as read (None: none)."""
        n = self.ctx.held
        if not n:
            return None
        start = HDR_LEN - self.ctx.hdr
        return bytes(self.ffi.buffer(self.buf)[start : start + n])

    @property
    def run_frames(self) -> int:
        """Frames the last :meth:`tx` or :meth:`rx` sent or placed."""
        return int(self.ctx.frames)

    @property
    def run_bytes(self) -> int:
        """Their bytes, without virtio-net headers (as the device's counters take them)."""
        return int(self.ctx.bytes)

    @property
    def stop_reason(self) -> int:
        return int(self.ctx.stop)
