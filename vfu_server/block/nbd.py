"""An asynchronous NBD client backend (fixed-newstyle handshake, simple replies).

Protocol reference: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md.

Design
------
* One connection, many requests in flight: every request carries a unique handle (cookie),
  senders serialise only the *sending* of a request through a lock, and a single reader task
  demultiplexes replies by handle.  NVMe and virtio-blk queues submit concurrently, so a
  request/response lock-step would cap throughput at one round trip per command.
* Zero copy: write payloads go out with ``sendmsg`` straight from the guest's memoryviews, and
  read payloads are received with ``recv_into`` straight into them.
* Lifecycle: the reader task needs a nursery.  ``await NbdBackend.connect(nursery, target)``
  uses the caller's nursery; ``async with NbdBackend.open(target) as backend:`` brings its own.
  ``aclose()`` flushes, sends NBD_CMD_DISC and stops the reader.
* Failure: if the server goes away or violates the protocol the connection is marked dead,
  every pending request fails with :class:`BlockIOError` (EIO) and later requests fail
  immediately.  The reader task never raises into the caller's nursery, so a lost server
  fails I/O commands instead of tearing down the whole device process.
* Only simple replies are used (structured replies are not negotiated), which the protocol
  allows; a failed read then carries no payload.

Server capabilities are honoured: READ_ONLY makes the backend read-only, FUA is emulated with
a flush when SEND_FUA is absent, flush is a no-op without SEND_FLUSH (the server offers no
durability control), and discard uses NBD_CMD_WRITE_ZEROES *without* NBD_CMD_FLAG_NO_HOLE
rather than NBD_CMD_TRIM, because TRIM leaves the contents undefined while this interface
promises that discarded ranges read back as zeroes (the server is still free to deallocate).
Plain TRIM is available as :meth:`NbdBackend.trim`.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import struct
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ..sandbox import SandboxNeeds
from .base import BlockBackend, byte_views, iov_length, iov_slice
from .errors import BackendSpecError, BlockError, BlockIOError

__all__ = ["NbdBackend", "NbdTarget", "parse_nbd_uri"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809

# Handshake.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
OPT_REPLY_MAGIC = 0x0003E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_ERR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERR_BIT | 1
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3
_REP_ERR_NAMES = {
    REP_ERR_BIT | 1: "unsupported option",
    REP_ERR_BIT | 2: "denied by server policy",
    REP_ERR_BIT | 3: "invalid option",
    REP_ERR_BIT | 4: "unsupported on this platform",
    REP_ERR_BIT | 5: "TLS required",
    REP_ERR_BIT | 6: "unknown export",
    REP_ERR_BIT | 7: "server shutting down",
    REP_ERR_BIT | 8: "block size negotiation required",
    REP_ERR_BIT | 9: "request too big",
}

# Transmission flags (per export).
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_CAN_MULTI_CONN = 1 << 8

# Transmission phase.
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
_CMD_NAMES = {0: "read", 1: "write", 2: "disconnect", 3: "flush", 4: "trim", 6: "write-zeroes"}

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")

# NBD error values are defined to be these Linux errnos; anything else is reported as EIO.
_NBD_ERRNOS = {
    1: errno.EPERM,
    5: errno.EIO,
    12: errno.ENOMEM,
    22: errno.EINVAL,
    28: errno.ENOSPC,
    75: errno.EOVERFLOW,
    95: errno.EOPNOTSUPP,
    108: errno.ESHUTDOWN,
}

# The protocol's default maximum payload when the server states none.
DEFAULT_MAX_PAYLOAD = 32 << 20
# Length-only commands (trim, write-zeroes) have a 32-bit length; split well below it.
_MAX_LENGTH_ONLY = 1 << 30
_IOV_MAX = 1024
_ZERO_CHUNK = 1 << 20
_ZEROES = bytes(_ZERO_CHUNK)


@dataclass(frozen=True)
class NbdTarget:
    """Where an NBD export lives: a Unix socket path, or a TCP host and port."""

    export: str = ""
    host: str | None = None
    port: int = DEFAULT_PORT
    socket_path: str | None = None

    def __post_init__(self) -> None:
        if (self.host is None) == (self.socket_path is None):
            raise BackendSpecError("NBD target needs exactly one of host or socket_path")

    @property
    def uri(self) -> str:
        """The target as an NBD URI (the form ``parse_nbd_uri`` accepts)."""
        name = urllib.parse.quote(self.export)
        if self.socket_path is not None:
            return f"nbd+unix:///{name}?socket={urllib.parse.quote(self.socket_path)}"
        assert self.host is not None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"


def parse_nbd_uri(uri: str) -> NbdTarget:
    """Parse ``nbd://host[:port]/export`` or ``nbd+unix:///export?socket=/path``.

    Raises :class:`BackendSpecError` (a ValueError) with a one-line reason.
    """
    try:
        u = urllib.parse.urlsplit(uri)
        port = u.port
    except ValueError as exc:
        raise BackendSpecError(f"bad NBD URI {uri!r}: {exc}") from None
    scheme = u.scheme.lower()
    export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
    query = urllib.parse.parse_qs(u.query, keep_blank_values=True)
    if scheme.startswith("nbds"):
        raise BackendSpecError(f"bad NBD URI {uri!r}: TLS (nbds) is not supported")
    if scheme in ("nbd", "nbd+tcp"):
        if not u.hostname:
            raise BackendSpecError(f"bad NBD URI {uri!r}: no host (nbd://HOST[:PORT]/EXPORT)")
        if query:
            raise BackendSpecError(f"bad NBD URI {uri!r}: unexpected query {u.query!r}")
        return NbdTarget(export=export, host=u.hostname, port=port or DEFAULT_PORT)
    if scheme == "nbd+unix":
        if u.netloc:
            raise BackendSpecError(
                f"bad NBD URI {uri!r}: nbd+unix takes no host (nbd+unix:///EXPORT?socket=PATH)"
            )
        sockets = query.pop("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise BackendSpecError(f"bad NBD URI {uri!r}: needs exactly one ?socket=PATH")
        if query:
            raise BackendSpecError(f"bad NBD URI {uri!r}: unexpected query {sorted(query)}")
        return NbdTarget(export=export, socket_path=sockets[0])
    raise BackendSpecError(f"bad NBD URI {uri!r}: scheme must be nbd:// or nbd+unix://")


class _ProtocolError(Exception):
    pass


@dataclass(eq=False)
class _Pending:
    cmd: int
    offset: int
    length: int
    # Destination of a read; None once the waiting task gave up (the payload is drained).
    views: list[memoryview] | None = None
    done: trio.Event = field(default_factory=trio.Event)
    nbd_error: int = 0
    failed: tuple[int, str] | None = None


class NbdBackend(BlockBackend):
    """A block backend on an NBD export; see the module docstring for the design.

    Create it with :meth:`connect` or :meth:`open`, not directly.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        target: NbdTarget,
        export_size: int,
        flags: int,
        min_block: int,
        max_payload: int,
        size: int | None,
        read_only: bool,
    ) -> None:
        self.target = target
        self.export_size = export_size
        self.transmission_flags = flags
        self.min_block = min_block
        self.max_payload = max_payload
        self.size = export_size if size is None else size
        self.read_only = read_only or bool(flags & TF_READ_ONLY)
        # The device's LBA must be a multiple of what the server can address.
        self.block_size = 512 if min_block <= 512 else 4096
        self._sock = sock
        self._send_lock = trio.Lock()
        self._handles = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._dead: tuple[int, str] | None = None
        self._closed = False
        self._reader_scope = trio.CancelScope()
        self._reader_done = trio.Event()

    def sandbox_needs(self) -> SandboxNeeds:
        # The connection is made before the sandbox; a new one to the same place (a reconnect)
        # is the one socket a confined NBD device may still open.
        if self.target.socket_path is not None:
            return SandboxNeeds.unix_connect()
        return SandboxNeeds.tcp_connect(self.target.port)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        nursery: trio.Nursery,
        target: NbdTarget | str,
        *,
        size: int | None = None,
        read_only: bool = False,
        timeout: float = 30.0,
    ) -> NbdBackend:
        """Connect, negotiate the export and start the reply reader in ``nursery``.

        ``size`` exposes only a prefix of the export (an export smaller than ``size`` is
        refused).  The reader task stays in ``nursery`` until :meth:`aclose`; it never
        raises, so a lost server cannot cancel the caller's other tasks.
        """
        self = await cls._negotiate(target, size, read_only, timeout)
        nursery.start_soon(self._reader, name=f"nbd-reader {self.target.uri}")
        return self

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        target: NbdTarget | str,
        *,
        size: int | None = None,
        read_only: bool = False,
        timeout: float = 30.0,
    ) -> AsyncIterator[NbdBackend]:
        """``async with NbdBackend.open(uri) as backend:`` -- connect with a private nursery.

        Errors keep their type: connection failures are raised before the nursery exists,
        and since the reader never raises, the nursery's one-element ExceptionGroup around
        an exception from the ``async with`` body is unwrapped.
        """
        self = await cls._negotiate(target, size, read_only, timeout)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, name=f"nbd-reader {self.target.uri}")
                try:
                    yield self
                finally:
                    await self.aclose()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    @classmethod
    async def _negotiate(
        cls, target: NbdTarget | str, size: int | None, read_only: bool, timeout: float
    ) -> NbdBackend:
        if isinstance(target, str):
            target = parse_nbd_uri(target)
        try:
            with trio.fail_after(timeout):
                sock = await cls._open_socket(target)
                try:
                    export_size, flags, min_block, max_payload = await _handshake(sock, target)
                except BaseException:
                    sock.close()
                    raise
        except trio.TooSlowError:
            raise BlockIOError(
                errno.ETIMEDOUT, f"NBD {target.uri}: no handshake within {timeout}s"
            ) from None
        except OSError as exc:
            raise BlockIOError.from_oserror(exc, f"NBD {target.uri}: connect failed") from None
        except (_ProtocolError, EOFError) as exc:
            raise BlockIOError(errno.EPROTO, f"NBD {target.uri}: {exc}") from None
        if size is not None and size > export_size:
            sock.close()
            raise BackendSpecError(
                f"NBD {target.uri}: export is {export_size} bytes, smaller than --size {size}"
            )
        return cls(sock, target, export_size, flags, min_block, max_payload, size, read_only)

    @staticmethod
    async def _open_socket(target: NbdTarget) -> trio.socket.SocketType:
        if target.socket_path is not None:
            stream = await trio.open_unix_socket(target.socket_path)
        else:
            assert target.host is not None
            stream = await trio.open_tcp_stream(target.host, target.port)  # sets TCP_NODELAY
        return stream.socket

    # -- sending and receiving ---------------------------------------------------------------

    def _fail_connection(self, code: int, reason: str) -> None:
        """Mark the connection dead and fail every pending request (idempotent)."""
        if self._dead is None:
            self._dead = (code, f"NBD {self.target.uri}: {reason}")
            if not self._closed:
                log.warning("%s", self._dead[1])
        for p in self._pending.values():
            p.failed = self._dead
            p.done.set()
        self._pending.clear()
        self._reader_scope.cancel()
        self._sock.close()

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise BlockIOError(*self._dead)

    async def _send(self, parts: list[memoryview]) -> None:
        """Send a whole request; a request cut in half poisons the stream, so kill it."""
        sent = 0
        try:
            while parts:
                n = await self._sock.sendmsg(parts[:_IOV_MAX])
                sent += n
                parts = iov_slice(parts, n)
        except trio.Cancelled:
            # trio guarantees a cancelled sendmsg sent nothing, so only a partial request
            # leaves the stream unusable.
            if sent:
                self._fail_connection(errno.EIO, "request cancelled half-sent; connection dropped")
            raise
        except (OSError, trio.ClosedResourceError) as exc:
            self._fail_connection(errno.EIO, f"send failed: {exc}")
            self._raise_if_dead()

    async def _recv_into(self, view: memoryview) -> None:
        while view.nbytes:
            n = await self._sock.recv_into(view)
            if n == 0:
                raise EOFError("server closed the connection")
            view = view[n:]

    async def _reader(self) -> None:
        hdr = bytearray(_SIMPLE_REPLY.size)
        hdr_view = memoryview(hdr)
        scratch = memoryview(bytearray(64 * 1024))
        try:
            with self._reader_scope:
                while True:
                    await self._recv_into(hdr_view)
                    magic, error, handle = _SIMPLE_REPLY.unpack(hdr)
                    if magic != SIMPLE_REPLY_MAGIC:
                        raise _ProtocolError(f"bad reply magic {magic:#x}")
                    p = self._pending.pop(handle, None)
                    if p is None:
                        raise _ProtocolError(f"reply for unknown handle {handle}")
                    if p.cmd == CMD_READ and error == 0:
                        if p.views is not None:
                            for mv in p.views:
                                await self._recv_into(mv)
                        else:
                            left = p.length
                            while left:
                                n = min(left, scratch.nbytes)
                                await self._recv_into(scratch[:n])
                                left -= n
                    p.nbd_error = error
                    p.done.set()
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            self._fail_connection(errno.EIO, f"connection lost: {exc}")
        except EOFError as exc:
            self._fail_connection(errno.EIO, str(exc))
        except _ProtocolError as exc:
            self._fail_connection(errno.EPROTO, f"protocol error: {exc}")
        finally:
            if self._dead is None:
                self._fail_connection(errno.ESHUTDOWN, "connection closed")
            self._reader_done.set()

    async def _request(
        self,
        cmd: int,
        offset: int,
        length: int,
        flags: int = 0,
        payload: Sequence[memoryview] = (),
        into: list[memoryview] | None = None,
    ) -> None:
        """Send one command and wait for its reply."""
        self._raise_if_dead()
        handle = next(self._handles)
        p = _Pending(cmd, offset, length, views=into)
        header = _REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length)
        # Registered before sending: the reply can arrive before sendmsg returns.
        self._pending[handle] = p
        try:
            async with self._send_lock:
                self._raise_if_dead()
                await self._send([memoryview(header), *payload])
        except BaseException:
            self._pending.pop(handle, None)
            raise
        try:
            await p.done.wait()
        except trio.Cancelled:
            # The reply is still coming; the reader drains it instead of writing into memory
            # the caller may already have reused.
            p.views = None
            raise
        if p.failed is not None:
            raise BlockIOError(*p.failed)
        if p.nbd_error:
            code = _NBD_ERRNOS.get(p.nbd_error, errno.EIO)
            raise BlockIOError(
                code,
                f"NBD {self.target.uri}: {_CMD_NAMES.get(cmd, cmd)} at {offset}+{length} failed",
            )

    # -- BlockBackend ------------------------------------------------------------------------

    def _check_aligned(self, offset: int, length: int) -> None:
        # We asked for the server's block sizes, which obliges us to respect its minimum.
        if self.min_block > 1 and (offset % self.min_block or length % self.min_block):
            raise BlockError(
                errno.EINVAL,
                f"request {offset}+{length} not aligned to NBD minimum block {self.min_block}",
            )

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        views = byte_views(bufs)
        total = iov_length(views)
        self._check_range(offset, total)
        self._check_aligned(offset, total)
        if total == 0:
            await trio.lowlevel.checkpoint()
            self._raise_if_dead()
            return
        # Larger than the server accepts: split (sequentially; only huge requests get here).
        for start in range(0, total, self.max_payload):
            n = min(self.max_payload, total - start)
            await self._request(CMD_READ, offset + start, n, into=iov_slice(views, start, n))

    async def writev(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        views = byte_views(bufs)
        total = iov_length(views)
        self._check_range(offset, total)
        self._check_writable()
        self._check_aligned(offset, total)
        if total == 0:
            await trio.lowlevel.checkpoint()
            self._raise_if_dead()
            return
        native_fua = fua and bool(self.transmission_flags & TF_SEND_FUA)
        flags = CMD_FLAG_FUA if native_fua else 0
        for start in range(0, total, self.max_payload):
            n = min(self.max_payload, total - start)
            chunk = iov_slice(views, start, n)
            await self._request(CMD_WRITE, offset + start, n, flags, payload=chunk)
        if fua and not native_fua:
            await self.flush()

    async def flush(self) -> None:
        if self.transmission_flags & TF_SEND_FLUSH and not self.read_only:
            await self._request(CMD_FLUSH, 0, 0)
        else:
            # The server offers no flush: nothing we can do makes data more durable.
            await trio.lowlevel.checkpoint()
            self._raise_if_dead()

    async def discard(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length, may_unmap=True)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self._check_range(offset, length)
        self._check_writable()
        self._check_aligned(offset, length)
        if length == 0:
            await trio.lowlevel.checkpoint()
            self._raise_if_dead()
            return
        if self.transmission_flags & TF_SEND_WRITE_ZEROES:
            flags = 0 if may_unmap else CMD_FLAG_NO_HOLE
            step = _MAX_LENGTH_ONLY
            for start in range(0, length, step):
                n = min(step, length - start)
                await self._request(CMD_WRITE_ZEROES, offset + start, n, flags)
            return
        # No server-side zeroing: send zeroes as ordinary writes.
        step = min(_ZERO_CHUNK, self.max_payload)
        zeroes = memoryview(_ZEROES)
        for start in range(0, length, step):
            n = min(step, length - start)
            await self._request(CMD_WRITE, offset + start, n, payload=[zeroes[:n]])

    async def trim(self, offset: int, length: int) -> None:
        """NBD_CMD_TRIM: an advisory deallocation after which the contents are undefined.

        Not part of :class:`BlockBackend` because it does not guarantee zeroes; a no-op if the
        server does not accept TRIM.
        """
        self._check_range(offset, length)
        self._check_writable()
        self._check_aligned(offset, length)
        if not self.transmission_flags & TF_SEND_TRIM or length == 0:
            await trio.lowlevel.checkpoint()
            self._raise_if_dead()
            return
        for start in range(0, length, _MAX_LENGTH_ONLY):
            n = min(_MAX_LENGTH_ONLY, length - start)
            await self._request(CMD_TRIM, offset + start, n)

    @property
    def connected(self) -> bool:
        """False once the server went away or the backend was closed."""
        return self._dead is None

    async def aclose(self) -> None:
        """Flush, say goodbye (NBD_CMD_DISC) and stop the reader.

        Raises :class:`BlockIOError` only if the final flush fails; a connection that had
        already died was reported to the requests that used it, so closing it is quiet.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if self._dead is None:
                await self.flush()
                disc = _REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0)
                # Only a courtesy once the flush succeeded: the server may already be gone.
                with contextlib.suppress(BlockIOError):
                    async with self._send_lock:
                        self._raise_if_dead()
                        await self._send([memoryview(disc)])
        finally:
            self._fail_connection(errno.ESHUTDOWN, "backend closed")
            with trio.CancelScope(shield=True):
                await self._reader_done.wait()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "nbd",
            "uri": self.target.uri,
            "export": self.target.export,
            "size": self.size,
            "read_only": self.read_only,
        }


# -- handshake ---------------------------------------------------------------------------------


async def _recv_exact(sock: trio.socket.SocketType, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    while view.nbytes:
        got = await sock.recv_into(view)
        if got == 0:
            raise EOFError("server closed the connection during the handshake")
        view = view[got:]
    return bytes(buf)


async def _send_exact(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view.nbytes:
        view = view[await sock.send(view) :]


async def _send_option(sock: trio.socket.SocketType, option: int, data: bytes) -> None:
    await _send_exact(sock, struct.pack(">QII", IHAVEOPT, option, len(data)) + data)


async def _handshake(sock: trio.socket.SocketType, target: NbdTarget) -> tuple[int, int, int, int]:
    """Fixed-newstyle negotiation; returns (size, transmission flags, min block, max payload)."""
    magic, opt_magic, hflags = struct.unpack(">QQH", await _recv_exact(sock, 18))
    if magic != NBDMAGIC:
        raise _ProtocolError("not an NBD server (bad greeting)")
    if opt_magic == OLDSTYLE_MAGIC:
        raise _ProtocolError("oldstyle NBD servers are not supported")
    if opt_magic != IHAVEOPT:
        raise _ProtocolError(f"unknown handshake magic {opt_magic:#x}")
    no_zeroes = bool(hflags & FLAG_NO_ZEROES)
    fixed = bool(hflags & FLAG_FIXED_NEWSTYLE)
    await _send_exact(
        sock,
        struct.pack(
            ">I", (FLAG_FIXED_NEWSTYLE if fixed else 0) | (FLAG_NO_ZEROES if no_zeroes else 0)
        ),
    )
    name = target.export.encode()
    if len(name) > 4096:
        raise _ProtocolError("export name longer than 4096 bytes")
    if fixed:
        result = await _opt_go(sock, name)
        if result is not None:
            return result
    # Non-fixed servers, or fixed ones without NBD_OPT_GO: the original option.  Its only
    # failure signal is the server hanging up.
    await _send_option(sock, OPT_EXPORT_NAME, name)
    try:
        size, flags = struct.unpack(">QH", await _recv_exact(sock, 10))
    except EOFError:
        raise _ProtocolError(f"server refused export {target.export!r}") from None
    if not no_zeroes:
        await _recv_exact(sock, 124)
    return size, flags, 1, DEFAULT_MAX_PAYLOAD


async def _opt_go(sock: trio.socket.SocketType, name: bytes) -> tuple[int, int, int, int] | None:
    """NBD_OPT_GO asking for block sizes; None if the server does not know the option."""
    data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
    await _send_option(sock, OPT_GO, data)
    size: int | None = None
    flags = 0
    min_block, max_payload = 1, DEFAULT_MAX_PAYLOAD
    while True:
        magic, option, rtype, length = struct.unpack(">QIII", await _recv_exact(sock, 20))
        if magic != OPT_REPLY_MAGIC or option != OPT_GO:
            raise _ProtocolError(f"bad option reply (magic {magic:#x}, option {option})")
        if length > 1 << 20:
            raise _ProtocolError(f"option reply of {length} bytes")
        body = await _recv_exact(sock, length) if length else b""
        if rtype == REP_ACK:
            if size is None:
                raise _ProtocolError("server acknowledged NBD_OPT_GO without export info")
            return size, flags, min_block, max_payload
        if rtype == REP_INFO and len(body) >= 2:
            (info,) = struct.unpack_from(">H", body)
            if info == INFO_EXPORT and len(body) >= 12:
                size, flags = struct.unpack_from(">QH", body, 2)
            elif info == INFO_BLOCK_SIZE and len(body) >= 14:
                min_block, _preferred, max_payload = struct.unpack_from(">III", body, 2)
                min_block = max(min_block, 1)
                max_payload = max(max_payload, min_block)
            continue
        if rtype == REP_ERR_UNSUP:
            return None
        if rtype & REP_ERR_BIT:
            what = _REP_ERR_NAMES.get(rtype, f"error {rtype & ~REP_ERR_BIT}")
            msg = body.decode("utf-8", "replace").strip()
            raise _ProtocolError(f"export {name.decode()!r}: {what}" + (f" ({msg})" if msg else ""))
        # Unknown non-error replies are to be ignored.
