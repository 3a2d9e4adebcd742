"""Packet backends of virtio-net: a TAP interface, or a Unix SOCK_SEQPACKET peer.

A backend moves whole Ethernet frames. One with ``vnet_hdr`` (a TAP opened with IFF_VNET_HDR)
puts the 12-byte ``virtio_net_hdr_v1`` in front of every frame both ways, which is what lets
the guest hand checksums and TCP segmentation to the host kernel (``set_offloads`` says which
ones the guest takes on receive); the others move bare frames. ``run`` receives
frames forever and hands each to ``deliver``, which may block: that is how a guest without
receive buffers slows a socket peer down instead of losing frames. What is queued is read in
bursts of up to ``BURST`` frames between waits. ``link`` reports the
carrier (a socket peer connected or not).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from vfu_server.sandbox import SandboxNeeds

Deliver = Callable[[bytes], Awaitable[None]]
Link = Callable[[bool], None]

#: the largest read: a 64 KiB segment, its virtio-net header and a VLAN tag, with room to spare
#: (a TAP cuts a longer packet short, which would corrupt it)
MAX_FRAME = 65536 + 64
#: Frames read in one go before the reader lets other tasks run (``deliver`` need not yield:
#: a flood of frames nobody wants must not starve the vfio-user connection).
BURST = 64
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
#: virtio_net_hdr_v1 (the layout of virtio_net_hdr_mrg_rxbuf): what the TAP reads and writes
VNET_HDR_LEN = 12
#: what a device's ``fast_receive`` returns besides a packet for ``deliver`` or None (it read
#: nothing: the backend reads): it placed what the fd held / a whole burst, more may follow
RX_DRAINED, RX_MORE = 0, 1


class NetBackend:
    #: frames carry a virtio_net_hdr_v1 in front, both ways (checksum and segmentation offloads)
    vnet_hdr = False

    def __init__(self) -> None:
        # Set while frames may be read: a live handover stops reading (a frame read by a
        # process that is about to exit, or by a successor that is refused, would be lost).
        self._reading = trio.Event()
        self._reading.set()
        #: the successor of a live handover took this backend over: tear nothing down that
        #: it now uses (a --listen socket path)
        self.released = False
        #: set by a device that reads packets from the fd itself (a C path), see RX_DRAINED
        self.fast_receive: Callable[[int], bytes | int | None] | None = None

    def _read_fast(self, fd: int) -> bytes | int | None:
        fast = self.fast_receive
        return fast(fd) if fast is not None else None

    def pause_reading(self) -> None:
        if self._reading.is_set():
            self._reading = trio.Event()

    def resume_reading(self) -> None:
        self._reading.set()

    async def _may_read(self) -> None:
        if not self._reading.is_set():
            await self._reading.wait()

    def export(self) -> tuple[dict[str, Any], list[int]]:
        """What a live handover's successor needs to go on (plain data, fds that stay ours)."""
        raise ValueError(f"{type(self).__name__} cannot be handed over")

    def adopt(self, data: dict[str, Any], fds: list[int]) -> None:
        """Take over a predecessor's :meth:`export` (fds become ours; closed here on error)."""
        for fd in fds:
            os.close(fd)
        raise ValueError(f"{type(self).__name__} cannot take a backend over")

    async def run(self, deliver: Deliver, link: Link) -> None:
        raise NotImplementedError

    def set_offloads(self, csum: bool = False, tso4: bool = False, tso6: bool = False, ecn: bool = False) -> None:
        """What received frames may still need (partial checksums, TCP segments up to 64 KiB):
        what the guest negotiated. Only for ``vnet_hdr`` backends."""

    async def send(self, frame: bytes) -> None:
        raise NotImplementedError

    def fast_tx_fd(self) -> int | None:
        """A descriptor the device's C path may ``writev`` a frame to (the same frame
        :meth:`send` would be given), or None: every frame goes through :meth:`send`."""
        return None

    def close(self) -> None:
        pass

    def describe(self) -> str:
        raise NotImplementedError

    def sandbox_needs(self) -> SandboxNeeds:
        """What the backend still opens once the server is confined: nothing for a TAP,
        whose descriptor is open before."""
        return SandboxNeeds()


class TapBackend(NetBackend):
    """A TAP interface (created if missing) in the network namespace of this process.

    With ``offloads`` (the default) the TAP carries virtio-net headers, as QEMU's ``-netdev
    tap`` does, when the kernel allows it; otherwise bare frames."""

    def __init__(self, name: str, offloads: bool = True, *, adopt: bool = False) -> None:
        """``adopt``: open nothing; the TAP comes from a live handover's predecessor
        (:meth:`adopt`), which then has the virtio-net headers exactly when ``offloads``."""
        super().__init__()
        if not 0 < len(name.encode()) < 16:
            raise ValueError(f"bad TAP name {name!r}")
        self.name = name
        self.fd = -1
        self._adopted: trio.Event | None = None
        if adopt:
            self.vnet_hdr = offloads
            self._adopted = trio.Event()
            return
        if offloads:
            try:
                self._open(IFF_VNET_HDR)
                fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                if sys.byteorder == "big":  # VIRTIO 1.x headers are little-endian
                    fcntl.ioctl(self.fd, TUNSETVNETLE, struct.pack("i", 1))
                self.vnet_hdr = True
                return
            except OSError:
                self.close()  # an older or restricted kernel: bare frames, no offloads
        self._open(0)

    def _open(self, extra_flags: int) -> None:
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH22x", self.name.encode(),
                                                        IFF_TAP | IFF_NO_PI | extra_flags))
        except OSError:
            self.close()
            raise

    def set_offloads(self, csum: bool = False, tso4: bool = False, tso6: bool = False, ecn: bool = False) -> None:
        if not self.vnet_hdr or self.fd < 0:
            return
        flags = (TUN_F_CSUM if csum else 0) | (TUN_F_TSO4 if tso4 else 0) | (TUN_F_TSO6 if tso6 else 0) \
            | (TUN_F_TSO_ECN if ecn else 0)
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def export(self) -> tuple[dict[str, Any], list[int]]:
        return {"kind": "tap", "name": self.name, "vnet_hdr": self.vnet_hdr}, [self.fd]

    def adopt(self, data: dict[str, Any], fds: list[int]) -> None:
        try:
            if data.get("kind") != "tap" or len(fds) != 1:
                raise ValueError(f"the predecessor's network backend is {data.get('kind')!r}, this one a TAP")
            if data.get("name") != self.name:
                raise ValueError(f"the predecessor's TAP is {data.get('name')!r}, not {self.name!r}")
            if bool(data.get("vnet_hdr")) != self.vnet_hdr:
                raise ValueError("the predecessor's TAP " + ("has no" if self.vnet_hdr else "has")
                                 + " virtio-net headers (--offloads differs)")
        except ValueError:
            for fd in fds:
                os.close(fd)
            raise
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fds[0]
        if self._adopted is not None:
            self._adopted.set()

    async def run(self, deliver: Deliver, link: Link) -> None:
        if self._adopted is not None:
            await self._adopted.wait()
        link(True)
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            await self._may_read()
            for _ in range(BURST):
                frame = self._read_fast(self.fd)
                if isinstance(frame, int):  # RX_DRAINED, or RX_MORE: a checkpoint (the wait) first
                    break
                if frame is None:
                    try:
                        frame = os.read(self.fd, MAX_FRAME)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno == errno.EIO:  # interface down: no carrier, wait
                            await trio.sleep(0.1)
                            break
                        raise
                await deliver(frame)

    async def send(self, frame: bytes) -> None:
        while True:
            try:
                os.write(self.fd, frame)
                return
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.fd)
            except OSError:
                return  # interface down: the frame is lost, as on a wire

    def fast_tx_fd(self) -> int | None:
        return self.fd if self.fd >= 0 else None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def describe(self) -> str:
        return f"tap:{self.name}" + (" (vnet_hdr)" if self.vnet_hdr else "")


class SocketBackend(NetBackend):
    """One SOCK_SEQPACKET connection at a time, one datagram per frame.

    ``listen``: bind ``path`` and accept a peer (again after it leaves); otherwise connect to
    ``path``, retrying until the listener exists and after it goes away.
    """

    def __init__(self, path: str, listen: bool, *, adopt: bool = False) -> None:
        """``adopt``: bind or connect nothing; the sockets come from a live handover's
        predecessor (:meth:`adopt`)."""
        super().__init__()
        self.path = path
        self.listen = listen
        self.sock: trio.socket.SocketType | None = None
        self._listener: trio.socket.SocketType | None = None
        self._adopted: trio.Event | None = trio.Event() if adopt else None
        #: a connected peer handed over with the backend, used before connecting or accepting
        self._handed: trio.socket.SocketType | None = None
        if listen and not adopt:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                raw.bind(path)  # here, so a bad path is a command-line error
                raw.listen(1)
            except OSError:
                raw.close()
                raise
            self._listener = trio.socket.from_stdlib_socket(raw)

    async def _connect(self) -> trio.socket.SocketType:
        if self._listener is not None:
            sock, _ = await self._listener.accept()
            return sock
        while True:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                await sock.connect(self.path)
                return sock
            except OSError:
                sock.close()
                await trio.sleep(0.1)

    def export(self) -> tuple[dict[str, Any], list[int]]:
        fds = [s.fileno() for s in (self._listener, self.sock) if s is not None]
        return {"kind": "peer", "path": self.path, "listen": self.listen, "listener": self._listener is not None,
                "connected": self.sock is not None}, fds

    def adopt(self, data: dict[str, Any], fds: list[int]) -> None:
        try:
            if data.get("kind") != "peer":
                raise ValueError(f"the predecessor's network backend is {data.get('kind')!r}, this one a --peer")
            if data.get("path") != self.path or bool(data.get("listen")) != self.listen:
                raise ValueError(f"the predecessor's peer is {'listen:' if data.get('listen') else ''}"
                                 f"{data.get('path')}, this one {'listen:' if self.listen else ''}{self.path}")
            if len(fds) != bool(data.get("listener")) + bool(data.get("connected")):
                raise ValueError("peer socket fds do not match their description")
        except ValueError:
            for fd in fds:
                os.close(fd)
            raise
        it = iter(fds)
        if data.get("listener"):
            self._listener = trio.socket.from_stdlib_socket(socket.socket(fileno=next(it)))
        if data.get("connected"):
            self._handed = trio.socket.from_stdlib_socket(socket.socket(fileno=next(it)))
        if self._adopted is not None:
            self._adopted.set()

    async def run(self, deliver: Deliver, link: Link) -> None:
        if self._adopted is not None:
            await self._adopted.wait()
        while True:
            if self._handed is not None:
                sock, self._handed = self._handed, None
            else:
                sock = await self._connect()
            self.sock = sock
            link(True)
            try:
                await self._receive(sock, deliver)
            except OSError:
                pass
            finally:
                self.sock = None
                sock.close()
                link(False)

    async def _receive(self, sock: trio.socket.SocketType, deliver: Deliver) -> None:
        """Frames until the peer leaves. Whatever the socket holds is read as one burst
        (``read`` on a SOCK_SEQPACKET fd is one datagram), so that the device can hand it to
        the guest with one interrupt; a wait comes only when the socket is empty."""
        fd = sock.fileno()
        while True:
            await trio.lowlevel.wait_readable(sock)
            await self._may_read()
            for _ in range(BURST):
                frame = self._read_fast(fd)
                if isinstance(frame, int):
                    break
                if frame is None:
                    try:
                        frame = os.read(fd, MAX_FRAME)
                    except BlockingIOError:
                        break
                if not frame:
                    return  # the peer closed
                await deliver(frame)

    def fast_tx_fd(self) -> int | None:
        # A datagram per writev, as per send(); no peer: Python drops the frame
        return self.sock.fileno() if self.sock is not None else None

    async def send(self, frame: bytes) -> None:
        sock = self.sock
        if sock is None:
            return  # no peer: no carrier, the frame is dropped
        try:
            await sock.send(frame)
        except OSError:
            pass

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            if not self.released:  # else the successor listens there now
                try:
                    os.unlink(self.path)
                except OSError:
                    pass

    def describe(self) -> str:
        return f"{'listen' if self.listen else 'peer'}:{self.path}"

    def sandbox_needs(self) -> SandboxNeeds:
        # Listening: the socket file is removed at exit. Connecting: a new socket per peer.
        return SandboxNeeds.removes(self.path) if self.listen else SandboxNeeds.unix_connect()
