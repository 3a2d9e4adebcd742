"""The vfio-user server: one device, one client connection at a time, requests strictly in order.

Structure (trio)::

    serve()                          nursery: device tasks + the accept loop
      └─ accept loop                 one client at a time; the next one waits in the backlog
           └─ Connection.run()       receive a batch -> handle each message in order -> send replies

Ordering: QEMU posts BAR writes (NO_REPLY) and only waits for the last of a batch of DMA maps,
so it relies on the server applying messages in the order they were sent. A connection handles
its messages one after the other, never concurrently. Replies to waited requests in one batch
are sent together in one ``sendmsg`` (a reply carrying an fd goes alone, since QEMU receives
fds only with the header of the message they belong to).

Server-to-client requests (DMA_READ/DMA_WRITE) are sent from device tasks, never from a
request handler, and their replies are routed by id: a reply is never held hostage to a
server-to-client round trip.

Latency: after a batch the connection may look for the next message in a busy loop for a
while before it sleeps in ``epoll`` (``--socket-poll-us``, adaptive as the queues' polling
is: the window grows while messages come back sooner than the maximum and shrinks to zero
when they do not). Sleeping and being woken costs a trio scheduler pass and a process wake-up,
about half of a REGION_READ round trip on the development VM. The loop never holds the event
loop when another task is runnable, and passes through the scheduler at least every
:data:`MAX_HOLD_NS`.

Robustness: a handler that raises :class:`VfioUserError` produces an error reply with its errno;
any other exception is a device bug, logged with its traceback and answered with EIO. A broken
stream (:class:`ProtocolError`) drops only that client. When a client goes away, its DMA maps
and eventfds are released and the device keeps its state for the next client.

The protocol's rules (VERSION first, NO_REPLY, errnos, batching, our request ids) are the
sans-IO :class:`~vfu_server.protocol.connection.ServerConnection`'s; :class:`Connection` moves
bytes and fds, awaits the handlers that wait, and holds the device's dispatch table.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from . import iostats, systemd
from .pci.device import PciDevice
from .pci.endpoint import Endpoint
from .pci.polling import MAX_POLL_US, AdaptivePoll
from .protocol import messages as m
from .protocol.codec import HEADER, Message, command_name
from .protocol.connection import FLUSH_BEFORE, ConnectionState, Due, Result, ServerConnection
from .protocol.constants import (
    HEADER_SIZE,
    Command,
    DmaUnmapFlags,
)
from .protocol.errors import (
    MalformedMessage,
    ProtocolError,
    RemoteError,
    ReplyTooLarge,
    VfioUserError,
)
from .protocol.negotiation import ServerOffer, Session
from .sandbox import refusal as sandbox_refusal
from .transport.channel import MessageChannel
from .transport.pending import PendingReplies, ReplyWaiter

log = logging.getLogger("vfu_server.server")
trace_log = logging.getLogger("vfu_server.trace")

Reply = Result

_HANDLERS: dict[int, str] = {}

#: The longest a connection looks for messages, or handles the ones its look found, without a
#: scheduler pass (which lets the device's tasks see their eventfds and lets shutdown in).
MAX_HOLD_NS = 1_000_000

#: How long a server-to-client DMA_READ/DMA_WRITE may wait for its reply (QEMU answers in
#: milliseconds; its own requests to us time out after 5 s).
DMA_REQUEST_TIMEOUT = 30.0

#: The most one DMA_READ/DMA_WRITE asks for, below the session's max_data_xfer_size: QEMU sends
#: its reply with one non-blocking write and drops what its socket buffer (~208 KiB) does not
#: take (digest §13, pitfall 23); a 1 MiB DMA_READ reply left the stream cut mid-message and
#: the device waiting for the rest.
DMA_CHUNK = 64 * 1024


#: Control-socket clients served at once; one more gets an EBUSY line and is closed.
MAX_CONTROL_CLIENTS = 8


class DeviceStartError(Exception):
    """The device could not get ready (e.g. its NBD server is unreachable); one line for users."""


async def _then(pending: Awaitable[None], value: bytes) -> bytes:
    await pending
    return value


def handles(command: Command) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a :class:`Connection` method as the handler of ``command``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _HANDLERS[command] = fn.__name__
        return fn

    return deco


class Hold:
    """A live handover holding the server still (see :meth:`Server.start_hold`)."""

    def __init__(self) -> None:
        self.parked = trio.Event()
        self._released = trio.Event()
        self._handed_over = False

    async def park(self) -> bool:
        """Wait here (not reading) until released; True when the successor took over."""
        self.parked.set()
        await self._released.wait()
        return self._handed_over

    def release(self, handed_over: bool) -> None:
        self._handed_over = handed_over
        self._released.set()


@dataclass
class Adopted:
    """A client session taken over from another server process (vfu_server.handover)."""

    sock: trio.socket.SocketType
    #: the protocol state: session, next request id, the bytes and fds read but not handled
    state: ConnectionState = field(default_factory=ConnectionState)
    #: called once the connection serves the session: the device may run (and reach guest
    #: memory through the connection) from then on
    on_serving: Callable[[], None] | None = None


class Connection:
    """One client session."""

    def __init__(self, server: Server, sock: trio.socket.SocketType, number: int,
                 state: ConnectionState | None = None) -> None:
        self.server = server
        self.device = server.device
        self.number = number
        # Large enough for a WRITE_MULTI of 200 entries and for max_data_xfer_size payloads.
        max_message = max(server.offer.max_data_xfer_size + 64, 64 * 1024)
        #: the protocol rules and state (sans-IO); the channel feeds its decoder
        self.core = ServerConnection(server.offer, _HANDLERS, max_message, state)
        self.channel = MessageChannel(sock, max_message, server.offer.max_msg_fds, self.core.decoder)
        self._pending = PendingReplies(self.core.requests)
        self.tracing = trace_log.isEnabledFor(logging.INFO)
        self.receive_scope = trio.CancelScope()
        self.poll = AdaptivePoll(server.socket_poll_us * 1000)
        self._last_pass = 0  # perf_counter_ns() after the last wait in the scheduler
        #: batches the busy look found / batches received after sleeping (logged at disconnect)
        self.batches_found = self.batches_waited = 0
        #: an async handler is being awaited: the connection reads nothing meanwhile, so no
        #: server request may wait for a reply (see _dma_request)
        self.handler_waiting = False
        self.warned_messages = False
        self.handlers: dict[int, Callable[[Message], Reply | Awaitable[Reply]]] = {
            cmd: getattr(self, name) for cmd, name in _HANDLERS.items()
        }

    @property
    def session(self) -> Session | None:
        return self.core.session

    # -- main loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the client goes away, or until shutdown stops the reading.

        On shutdown the connection is left open (DMA maps and eventfds intact) so the device
        can finish its in-flight work; :meth:`Server.finish` then closes it.
        """
        log.info("client %d connected", self.number)
        try:
            # One scope for every receive, cancelled by Server.stop(): entering and leaving a
            # CancelScope costs ~10 us on the development VM, and a REGION_READ round trip
            # used to pay for two (this one and a shield around the batch).
            batch: list[Message] | None = []
            while True:
                # A live handover holds the server (vfu_server.handover): nothing more is read
                # until it is released (rollback) or the successor took over (return).
                if self.server.hold is not None and not self.server.stopping and await self.server.hold.park():
                    return
                if self.server.stopping:
                    break  # shut down (below)
                with self.receive_scope:
                    while True:
                        batch = await self._receive()
                        if batch is None:
                            break
                        # A batch is applied completely even if shutdown starts meanwhile:
                        # _handle_batch reaches no checkpoint outside a shield.
                        await self._handle_batch(batch)
                if batch is None or self.server.stopping:
                    break
                # Cancelled for a handover (over already, if it failed before we got here):
                # a fresh scope, then park or read on.
                self.receive_scope = trio.CancelScope()
            if batch is None:
                self.core.closed()
                log.info("client %d disconnected (%d batches found by looking, %d after sleeping)",
                         self.number, self.batches_found, self.batches_waited)
                await self.close()
                return
            # Shutdown: what the client sent before the signal still takes effect (a posted
            # doorbell write is acknowledged work for the guest), then reading stops; the
            # session stays up for the device's drain.
            with trio.CancelScope(shield=True):
                await self._handle_batch(self.channel.receive_nowait())
        except ProtocolError as exc:
            self.core.broken(exc)
            log.warning("client %d: dropping connection: %s", self.number, exc)
            await self.close()
        except OSError as exc:
            log.warning("client %d: connection lost: %s", self.number, exc)
            await self.close()
        except BaseException:
            await self.close()
            raise

    async def _receive(self) -> list[Message] | None:
        """The next batch of messages (None at EOF): a busy look first when the poll window
        is open and nothing else is runnable, else a sleep until the socket is readable."""
        clock = time.perf_counter_ns
        if clock() - self._last_pass > MAX_HOLD_NS:
            await trio.lowlevel.checkpoint()  # before reading: a cancellation here loses nothing
            self._last_pass = clock()
        poll = self.poll
        deadline = poll.spin_deadline()
        if deadline and not trio.lowlevel.current_statistics().tasks_runnable:
            channel = self.channel
            while True:
                batch = channel.receive_ready()
                if batch is None or batch:
                    poll.found()
                    self.batches_found += 1
                    return batch
                now = clock()
                if now >= deadline:
                    break
                if now - self._last_pass > MAX_HOLD_NS:
                    # A long window must not hold what epoll, timers or signals would wake.
                    await trio.lowlevel.checkpoint()  # nothing read yet: a cancellation loses nothing
                    self._last_pass = clock()
                    if trio.lowlevel.current_statistics().tasks_runnable:
                        break  # the rest of the server has work: sleep, it runs meanwhile
        batch = await self.channel.receive()
        self._last_pass = clock()
        poll.woken()
        self.batches_waited += 1
        return batch

    async def close(self) -> None:
        if self.channel.closed:
            return
        self._pending.close()
        self.channel.close()
        await self.server.client_gone()

    async def _handle_batch(self, batch: list[Message]) -> None:
        """Handle ``batch`` in order; the replies without fds go out in one send.

        In the common case (every handler returns at once and the socket takes the replies)
        this reaches no checkpoint at all; each wait it does reach is shielded, so a batch is
        never cut short by cancellation.
        """
        outbox = self.core.outbox
        try:
            for msg in batch:
                if self.tracing:
                    trace_log.info("-> %s", self.server.describe(msg))
                if msg.is_reply:
                    self._route_reply(msg)
                    continue
                # Outbox.before's rule, inlined: a call per message is felt in the round trip.
                if msg.command in FLUSH_BEFORE and outbox.data:
                    await self._send(outbox.data)
                    outbox.data = bytearray()
                due = self._dispatch(msg)  # the reply is in the outbox, or due now
                if due is not None:
                    if not isinstance(due, list):
                        self._hold_server_requests()
                        try:
                            with trio.CancelScope(shield=True):
                                due = await due
                        finally:
                            self.handler_waiting = False
                    if due is not None:
                        for data, fds in due:
                            await self._send(data, fds)
        finally:
            for msg in batch:
                msg.close_fds()
        if outbox.data:
            await self._send(outbox.take())  # type: ignore[arg-type]

    def _hold_server_requests(self) -> None:
        """Nothing is read while a handler is awaited: fail the device's message DMA meanwhile
        (waiting ones at once) rather than deadlock against the client."""
        self.handler_waiting = True
        if len(self._pending):
            self._pending.close()

    async def _send(self, data: bytes | bytearray, fds: list[int] | None = None) -> None:
        """Send a reply (or several); waits, shielded, only when the socket is full."""
        if self.tracing:
            pos = 0
            while pos + HEADER_SIZE <= len(data):
                msg_id, cmd, size, flags, err = HEADER.unpack_from(data, pos)
                trace_log.info("<- %s", self.server.describe(Message(msg_id, cmd, flags, err, data[pos + 16 : pos + size], list(fds or []))))
                pos += size
        rest = self.channel.send_now(data, fds or ())
        if rest is None:
            return
        # The timeout only arms a timer here, when the socket is full.
        try:
            with trio.CancelScope(shield=True):
                await self.channel.send_rest(rest, timeout=self.server.send_timeout)
        except trio.TooSlowError:
            raise ProtocolError("client stopped reading replies") from None

    def _dispatch(self, msg: Message) -> Due | Coroutine[Any, Any, Due]:
        """Run ``msg``'s handler and answer it through the core: returns the sends due now
        (None when the reply went into the outbox or there is none), or, when the handler has
        to wait (or a reset is due), a coroutine that finishes the job."""
        core = self.core
        # check_request's fast path, inlined: one set lookup, no call.
        if msg.command not in core.admitted:
            refused = core.check_request(msg)
            if refused is not None:
                return self._failed(msg, refused)
        try:
            result = self.handlers[msg.command](msg)
            # A handler's result is its reply (bytes, bytearray, a tuple with fds, or None) or the
            # awaitable of one: the concrete types are the cheap test on this per-I/O path.
            if result is not None and not isinstance(result, (bytes, tuple, bytearray)):
                return self._finish(msg, result)
            if self.device.reset_pending:
                return self._finish(msg, None, result)
        except ProtocolError:
            raise
        except Exception as exc:
            return self._failed(msg, exc)
        return core.respond(msg, result)

    async def _finish(self, msg: Message, waiting: Awaitable[Reply] | None, result: Reply = None) -> Due:
        """Await the reply ``waiting`` (else the reply is ``result``), apply a pending device
        reset, then answer."""
        try:
            if waiting is not None:
                result = await waiting
            reason = self.device.take_pending_reset()
            if reason is not None:
                log.info("device reset: %s", reason)
                await self.device.do_reset()
        except ProtocolError:
            raise
        except Exception as exc:
            return self._failed(msg, exc)
        return self.core.respond(msg, result)

    def _failed(self, msg: Message, exc: Exception) -> None:
        """Log a failed request the way its cause deserves; the reply is the core's."""
        if isinstance(exc, VfioUserError):
            level = logging.DEBUG if exc.errno == errno.ENOTTY else logging.INFO
            log.log(level, "%s id=%d failed: %s (errno %d)", command_name(msg.command), msg.id, exc.message, exc.errno)
        else:
            refused = sandbox_refusal(exc)
            if refused is not None:  # expected of a confined server: one line, no traceback
                log.warning("%s id=%d: %s", command_name(msg.command), msg.id, refused)
            else:
                log.error("device error while handling %s id=%d", command_name(msg.command), msg.id, exc_info=exc)
        self.core.refuse(msg, exc)

    # -- server-initiated requests ----------------------------------------------------------

    def _route_reply(self, msg: Message) -> None:
        if not self._pending.deliver(msg):
            log.warning("client %d: reply id=%d matches no request of ours; ignored", self.number, msg.id)
            msg.close_fds()

    async def request(self, command: Command, payload: bytes) -> Message:
        """Send a request to the client and wait for its reply (from a device task only)."""
        waiter = ReplyWaiter()
        _, data = self.core.send_request(command, payload, waiter)  # EBUSY when every id waits
        await self._send(data)
        reply = await waiter.wait()
        if reply is None:
            raise VfioUserError("client went away during a server request", errno.ENOTCONN)
        if reply.is_error:
            raise RemoteError(f"client refused {command.name}", reply.error)
        return reply

    async def dma_read(self, address: int, count: int) -> bytes:
        """Read guest memory through DMA_READ messages (for maps that came without an fd), in
        requests of at most the session's ``max_data_xfer_size``. From device tasks only."""
        out = bytearray()
        for addr, n in self._dma_chunks(address, count):
            reply = await self._dma_request(Command.DMA_READ, m.DmaAccess(addr, n).pack())
            got = m.DmaAccess.unpack(reply.payload, with_data=True)
            if got.address != addr or got.count != n:
                raise VfioUserError(f"DMA_READ reply for {got.address:#x}+{got.count} to a request for {addr:#x}+{n}", errno.EIO)
            out += got.data
        return bytes(out)

    async def dma_write(self, address: int, data: bytes) -> None:
        """Write guest memory through DMA_WRITE messages; see :meth:`dma_read`."""
        pos = 0
        for addr, n in self._dma_chunks(address, len(data)):
            reply = await self._dma_request(Command.DMA_WRITE, m.DmaAccess(addr, n, data[pos : pos + n]).pack())
            got = m.DmaAccess.unpack(reply.payload, with_data=False)
            if got.address != addr or got.count != n:
                raise VfioUserError(f"DMA_WRITE reply for {got.address:#x}+{got.count} to a request for {addr:#x}+{n}", errno.EIO)
            pos += n

    def _dma_chunks(self, address: int, count: int) -> list[tuple[int, int]]:
        assert self.session is not None
        step = min(self.session.max_data_xfer_size, DMA_CHUNK)
        return [(address + pos, min(step, count - pos)) for pos in range(0, count, step)]

    async def _dma_request(self, command: Command, payload: bytes) -> Message:
        if self.handler_waiting:
            # The client waits for our reply to a request whose handler waits for the device:
            # a round trip now could only deadlock (QEMU serves it on the loop that waits).
            raise VfioUserError(f"{command.name} while the client waits for a reply", errno.EDEADLK)
        try:
            # A client that never answers must not wedge the device for good.
            with trio.fail_after(DMA_REQUEST_TIMEOUT):
                return await self.request(command, payload)
        except RemoteError as exc:
            raise VfioUserError(f"client refused {command.name}: {os.strerror(exc.errno)}", exc.errno) from None
        except trio.TooSlowError:
            raise VfioUserError(f"client did not answer {command.name} within {DMA_REQUEST_TIMEOUT:g} s",
                                errno.ETIMEDOUT) from None

    def _message_mode_started(self) -> None:
        if not self.warned_messages:
            self.warned_messages = True
            log.warning(
                "client %d: guest RAM came without an fd, so the device reaches it with DMA_READ/"
                "DMA_WRITE messages, which is far slower; for shared memory start QEMU with "
                "-object memory-backend-memfd,id=mem,size=...,share=on -machine memory-backend=mem",
                self.number)

    # -- handlers --------------------------------------------------------------------------------

    @handles(Command.VERSION)
    def _version(self, msg: Message) -> bytes:
        reply, request, session = self.core.negotiate(msg)
        log.info(
            "client %d: protocol %d.%d, client caps %s, max_data_xfer_size %d, write_multiple %s",
            self.number, session.major, session.minor, request.capabilities, session.max_data_xfer_size,
            session.write_multiple,
        )
        self.session_started()
        return reply

    def session_started(self) -> None:
        """The session is negotiated: by VERSION, or taken over from a predecessor (a live
        handover, whose DMA maps are already in place)."""
        dma = self.device.dma
        dma.port = self
        dma.on_message_mode = self._message_mode_started
        if dma.message_mode:
            self._message_mode_started()
        self.device.client_connected()

    @handles(Command.DMA_MAP)
    def _dma_map(self, msg: Message) -> None:
        req = m.DmaMap.unpack(msg.payload)
        if len(msg.fds) > 1:
            raise VfioUserError(f"DMA_MAP with {len(msg.fds)} fds", errno.EINVAL)
        fd = msg.fds.pop() if msg.fds else None
        self.device.dma.add(req.address, req.size, req.flags, fd, req.offset)

    @handles(Command.DMA_UNMAP)
    def _dma_unmap(self, msg: Message) -> bytes:
        req = m.DmaUnmap.unpack(msg.payload)
        if req.flags & DmaUnmapFlags.GET_DIRTY_BITMAP:
            raise VfioUserError("DMA_UNMAP dirty bitmaps are not supported; use DMA logging", errno.ENOTSUP)
        if req.flags & DmaUnmapFlags.ALL:
            if req.address or req.size:
                raise VfioUserError("DMA_UNMAP ALL with an address or size", errno.EINVAL)
            self.device.dma.clear()
        elif req.flags:
            raise VfioUserError(f"DMA_UNMAP flags {req.flags:#x}", errno.EINVAL)
        else:
            self.device.dma.remove(req.address, req.size)
        return m.DmaUnmap(req.flags, req.address, req.size).pack()

    @handles(Command.DEVICE_GET_INFO)
    def _get_info(self, msg: Message) -> bytes:
        req = m.DeviceInfo.unpack(msg.payload)
        if req.argsz < 16:
            raise VfioUserError(f"DEVICE_GET_INFO argsz {req.argsz} < 16", errno.EINVAL)
        d = self.device
        return m.DeviceInfo(d.device_flags, d.num_regions, 5).pack()

    @handles(Command.DEVICE_GET_REGION_INFO)
    def _get_region_info(self, msg: Message) -> tuple[bytes, list[int]]:
        if len(msg.payload) < 32:
            raise VfioUserError("DEVICE_GET_REGION_INFO payload shorter than 32 bytes", errno.EINVAL)
        req = m.RegionInfo.unpack(msg.payload)
        if req.argsz < 32:
            raise VfioUserError(f"DEVICE_GET_REGION_INFO argsz {req.argsz} < 32", errno.EINVAL)
        if req.index >= self.device.num_regions:
            raise VfioUserError(f"no region {req.index}", errno.EINVAL)
        info, fd = self.device.region_info(req.index)
        payload = info.pack(room=req.argsz)
        # Send the fd only with the complete reply; QEMU drops fds of replies it re-asks.
        complete = len(payload) == len(info.pack())
        return payload, [fd] if fd is not None and complete else []

    @handles(Command.DEVICE_GET_REGION_IO_FDS)
    def _get_region_io_fds(self, msg: Message) -> bytes:
        if len(msg.payload) < 16:
            raise VfioUserError("DEVICE_GET_REGION_IO_FDS payload too short", errno.EINVAL)
        req = m.RegionIoFds.unpack(msg.payload)
        if req.index >= self.device.num_regions:
            raise VfioUserError(f"no region {req.index}", errno.EINVAL)
        # No ioeventfds: every access arrives as a message, which keeps ordering simple.
        return m.RegionIoFds(req.index).pack(room=req.argsz)

    @handles(Command.DEVICE_GET_IRQ_INFO)
    def _get_irq_info(self, msg: Message) -> bytes:
        req = m.IrqInfo.unpack(msg.payload)
        return self.device.irqs.info(req.index).pack()

    @handles(Command.DEVICE_SET_IRQS)
    def _set_irqs(self, msg: Message) -> None:
        req = m.IrqSet.unpack(msg.payload)
        fds, msg.fds = msg.fds, []
        self.device.irqs.set_irqs(req, fds)

    @handles(Command.REGION_READ)
    def _region_read(self, msg: Message) -> bytes:
        payload = msg.payload
        if len(payload) != 16:
            raise MalformedMessage(f"REGION_READ payload of {len(payload)} bytes, expected 16")
        offset, region, count = m.REGION_ACCESS.unpack_from(payload)
        session = self.core.session  # a property's call is felt on this path
        assert session is not None
        if count > session.max_data_xfer_size:
            raise VfioUserError(f"REGION_READ of {count} bytes > max_data_xfer_size", errno.E2BIG)
        data = self.device.region_read(region, offset, count)
        return m.REGION_ACCESS.pack(offset, region, count) + data

    @handles(Command.REGION_WRITE)
    def _region_write(self, msg: Message) -> bytes | Awaitable[bytes]:
        payload = msg.payload
        if len(payload) < 16:
            raise MalformedMessage("REGION_WRITE payload shorter than 16 bytes")
        offset, region, count = m.REGION_ACCESS.unpack_from(payload)
        if len(payload) - 16 != count:
            raise MalformedMessage(f"REGION_WRITE count {count} but {len(payload) - 16} data bytes")
        pending = self.device.region_write(region, offset, bytes(payload[16:]))
        reply = m.REGION_ACCESS.pack(offset, region, count)
        return reply if pending is None else _then(pending, reply)

    @handles(Command.REGION_WRITE_MULTI)
    def _region_write_multi(self, msg: Message) -> Awaitable[None] | None:
        writes = m.unpack_write_multi(msg.payload)
        for i, (region, offset, data) in enumerate(writes):
            pending = self.device.region_write(region, offset, data)
            if pending is not None:
                return self._write_multi_rest(pending, writes[i + 1 :])
        return None

    async def _write_multi_rest(self, pending: Awaitable[None], rest: list[tuple[int, int, bytes]]) -> None:
        await pending
        for region, offset, data in rest:
            more = self.device.region_write(region, offset, data)
            if more is not None:
                await more

    @handles(Command.DEVICE_RESET)
    async def _reset(self, msg: Message) -> None:
        log.info("client %d: DEVICE_RESET", self.number)
        await self.device.do_reset()

    @handles(Command.DEVICE_FEATURE)
    async def _feature(self, msg: Message) -> bytes:
        req = m.DeviceFeature.unpack(msg.payload)
        echo = req.is_set or req.is_probe
        if echo and req.argsz < len(msg.payload):
            # The reply repeats the request, and argsz is the most the client takes back.
            raise VfioUserError(f"DEVICE_FEATURE argsz {req.argsz} < {len(msg.payload)}, the size of the "
                                "reply that echoes this request", errno.EINVAL)
        try:
            # The endpoint answers ENOTTY itself for a device without migration.
            result = await self.device.device_feature(req)
        except ReplyTooLarge as exc:
            log.debug("DEVICE_FEATURE %#x: %s; replying with argsz %d only", req.index, exc.message, exc.needed)
            return m.DeviceFeature(req.flags, argsz=exc.needed).pack()
        if echo:
            # "The reply payload must be the same as the request payload for setting or probing."
            return bytes(msg.payload)
        return m.DeviceFeature.get_reply(req.flags, result or b"", req.argsz)

    @handles(Command.MIG_DATA_READ)
    async def _mig_data_read(self, msg: Message) -> bytes:
        req = m.MigData.unpack(msg.payload, with_data=False)
        assert self.session is not None
        if req.argsz < 8 + req.size:
            raise VfioUserError(f"MIG_DATA_READ argsz {req.argsz} < 8 + size {req.size}: the reply "
                                "would not fit", errno.EINVAL)
        limit = self.session.max_data_xfer_size
        if req.size > limit:
            # Refused rather than cut short: a reply shorter than asked means "no more data" to
            # the reader, and data cannot be sent past the limit the client negotiated. So the
            # only reply that never lies about the stream's end is this error.
            raise VfioUserError(f"MIG_DATA_READ size {req.size} > max_data_xfer_size {limit}", errno.EINVAL)
        data = self.device.migration_data_read(req.size)  # ENOTTY without migration
        # argsz and size count the data; the message carries all ``size`` bytes asked for, the
        # rest zeros, as libvfio-user's server sends it: its client reads exactly that much.
        return m.MigData(len(data), data).pack().ljust(8 + req.size, b"\0")

    @handles(Command.MIG_DATA_WRITE)
    async def _mig_data_write(self, msg: Message) -> None:
        req = m.MigData.unpack(msg.payload, with_data=True)
        assert self.session is not None
        if req.size > self.session.max_data_xfer_size:
            raise VfioUserError(f"MIG_DATA_WRITE size {req.size} > max_data_xfer_size "
                                f"{self.session.max_data_xfer_size}", errno.EINVAL)
        self.device.migration_data_write(req.data)  # ENOTTY without migration
        # "There is no reply payload for this message."
        return None


class Server:
    """Serves one :class:`PciDevice` over vfio-user."""

    def __init__(self, device: PciDevice, offer: ServerOffer | None = None, send_timeout: float = 10.0,
                 socket_poll_us: int = 0) -> None:
        if not 0 <= socket_poll_us <= MAX_POLL_US:
            raise ValueError(f"socket poll must be 0..{MAX_POLL_US} us")
        # The server talks to the device through its endpoint (regions, reset, features);
        # PciDevice itself is the author's surface.
        self.device = Endpoint(device)
        self.offer = offer or ServerOffer()
        self.send_timeout = send_timeout
        self.socket_poll_us = socket_poll_us
        self.connection: Connection | None = None
        self._connections = 0
        self.stopping = False
        self._accept_scope = trio.CancelScope()
        #: set while a live handover holds the server at a message boundary
        self.hold: Hold | None = None
        #: the successor took over: leave the socket paths to it on exit
        self.handed_over = False
        #: called once the successor took over (serve() ends its signal watcher with it)
        self.on_handed_over: list[Callable[[], None]] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def serve_listener(self, listener: trio.socket.SocketType, *, first: Adopted | None = None,
                             task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept clients one at a time, until :meth:`stop`. ``first``: a session taken over
        from another process, served before the next accept."""
        task_status.started()
        if first is not None:
            await self.serve_socket(first.sock, adopted=first)
        while not self.stopping and not self.handed_over:
            if self.hold is not None:
                if await self.hold.park():
                    return
                continue
            with trio.CancelScope() as self._accept_scope:
                sock, _ = await listener.accept()
            if self._accept_scope.cancelled_caught:
                if self.stopping or self.handed_over:
                    return
                continue  # cancelled for a handover: park (above), or accept on if it is over
            await self.serve_socket(sock)

    async def serve_socket(self, sock: trio.socket.SocketType, *, adopted: Adopted | None = None) -> None:
        self._connections += 1
        conn = Connection(self, sock, self._connections, adopted.state if adopted is not None else None)
        if adopted is not None:
            if conn.session is not None:
                conn.session_started()
            if adopted.on_serving is not None:
                adopted.on_serving()
        self.connection = conn
        systemd.status(f"client {conn.number} connected")
        try:
            await conn.run()
        finally:
            if conn.channel.closed:
                self.connection = None
                if not self.stopping:
                    systemd.status(f"client {conn.number} gone; waiting for a client")

    def start_hold(self, *, stop_reading: bool = True) -> Hold:
        """Live handover, step 1: stop taking messages at the next message boundary (the batch
        being handled completes; bytes already read stay in the decoder) and stop accepting.
        ``await hold.parked.wait()`` until the server stands still. ``stop_reading=False``
        only reserves the server (no other handover or snapshot starts) until
        :meth:`stop_reading`."""
        if self.hold is not None:
            raise VfioUserError("a handover is already in progress", errno.EBUSY)
        self.hold = Hold()
        if stop_reading:
            self.stop_reading()
        return self.hold

    def rehold(self) -> Hold:
        """Let a parked server read again while it stays reserved (a request of the device's
        waits for the client's reply); :meth:`stop_reading` parks it again, on the new hold."""
        old, self.hold = self.hold, Hold()
        if old is not None:
            old.release(False)
        return self.hold

    def stop_reading(self) -> None:
        self._accept_scope.cancel()
        if self.connection is not None:
            self.connection.receive_scope.cancel()

    def end_hold(self, handed_over: bool) -> None:
        """Live handover, last step: resume where the server stopped (rollback), or leave
        everything to the successor (``handed_over``: the server then ends)."""
        hold, self.hold = self.hold, None
        if handed_over:
            self.handed_over = True
            self._accept_scope.cancel()
            for callback in self.on_handed_over:
                callback()
        if hold is not None:
            hold.release(handed_over)

    def stop(self) -> None:
        """Shutdown, step 1: stop accepting and stop reading requests (the message being
        handled completes). The session stays up so the device can drain."""
        self.stopping = True
        self._accept_scope.cancel()
        if self.connection is not None:
            self.connection.receive_scope.cancel()

    async def finish(self) -> None:
        """Shutdown, step 3 (after the device drained): close the session."""
        conn, self.connection = self.connection, None
        if conn is not None:
            if self.handed_over:
                # Our copies only: the session, its maps and eventfds live on in the successor,
                # and the device must not see a disconnect it would act on.
                conn._pending.close()
                conn.channel.close()
                return
            with trio.CancelScope(shield=True):
                await conn.close()

    async def client_gone(self) -> None:
        device = self.device
        device.dma.port = None
        if device.migration is not None:
            device.migration.client_gone()
        device.dma.clear()
        device.irqs.close()
        with trio.CancelScope(shield=True):
            result = device.client_disconnected()
            if result is not None:
                await result

    # -- tracing -------------------------------------------------------------------------------

    def describe(self, msg: Message) -> str:
        text = msg.describe()
        try:
            if msg.command in (Command.REGION_READ, Command.REGION_WRITE) and len(msg.payload) >= 16:
                a = m.RegionAccess.unpack(msg.payload, with_data=False)
                text += f" region={a.region} offset={a.offset:#x} count={a.count}"
                data = msg.payload[16:]
                if 0 < len(data) <= 8:
                    text += f" value={int.from_bytes(data, 'little'):#x}"
            elif msg.command == Command.DMA_MAP and len(msg.payload) >= 32 and not msg.is_reply:
                d = m.DmaMap.unpack(msg.payload)
                text += f" iova={d.address:#x} size={d.size:#x} offset={d.offset:#x} flags={d.flags:#x}"
            elif msg.command == Command.DMA_UNMAP and len(msg.payload) >= 24 and not msg.is_reply:
                u = m.DmaUnmap.unpack(msg.payload)
                text += f" iova={u.address:#x} size={u.size:#x} flags={u.flags:#x}"
            elif msg.command == Command.DEVICE_SET_IRQS and not msg.is_reply:
                s = m.IrqSet.unpack(msg.payload)
                text += f" index={s.index} flags={s.flags:#x} start={s.start} count={s.count}"
            elif msg.command in (Command.DEVICE_GET_REGION_INFO, Command.DEVICE_GET_IRQ_INFO) and len(msg.payload) >= 12:
                text += f" index={int.from_bytes(msg.payload[8:12], 'little')}"
            elif msg.command == Command.VERSION and len(msg.payload) > 4:
                text += f" {bytes(msg.payload[4:]).rstrip(bytes(1)).decode(errors='replace')}"
        except Exception:
            text += " (undecodable)"
        return text


@dataclass
class Endpoints:
    """What :func:`serve` serves on and removes at exit; a successor replaces all of it with
    what it took over."""

    listener: trio.socket.SocketType | None = None
    #: an inherited connected socket (no listener): serve it, then end
    connected: trio.socket.SocketType | None = None
    #: a session taken over from a predecessor
    adopted: Adopted | None = None
    control: trio.socket.SocketType | None = None
    control_path: str | None = None
    socket_path_to_remove: str | None = None

    def take_over(self, taken: Any) -> None:
        """Serve what a successor took over (a :class:`vfu_server.handover.Taken`)."""
        self.listener, self.connected, self.adopted = taken.listener, None, taken.adopted
        if self.listener is None and self.adopted is not None:
            self.connected = self.adopted.sock
        self.control, self.control_path = taken.control, taken.control_path
        self.socket_path_to_remove = taken.socket_path

    def close(self, server: Server) -> None:
        """Close the sockets; remove their files unless a successor owns them now."""
        from .transport.unix import remove_socket

        if self.listener is not None:
            self.listener.close()
        if self.control is not None:
            self.control.close()
            if not server.handed_over:
                remove_socket(self.control_path)
        if not server.handed_over:
            remove_socket(self.socket_path_to_remove)


@dataclass(frozen=True)
class ServeHooks:
    """The callbacks of :func:`serve` (see :class:`ServeOptions`)."""

    on_listening: Callable[[], None] | None = None
    on_stopping: Callable[[], None] | None = None
    before_serving: Callable[[str | None, str | None], Awaitable[None]] | None = None


@dataclass(frozen=True)
class ServeOptions:
    """Where and how :func:`serve` runs a device; the command line builds one from its arguments.

    Serve on ``socket_path`` (a new listener, its file removed at exit), or on ``listener``
    (with ``socket_path_to_remove`` its file, if any), or on one inherited ``connected`` socket
    until it ends. ``control``/``control_path``: the control socket (handover, status).

    ``socket_poll_us``: see ``--socket-poll-us`` (the command line's default is
    :data:`~vfu_server.pci.polling.DEFAULT_SOCKET_POLL_US`). Keep it 0 when the client runs in the same trio loop: a
    busy look for its next message would hold the very loop the client needs to send it.

    ``successor``: a :class:`vfu_server.handover.Successor`. Once the device is ready it takes
    over the sockets, the session and the state of the server running at its control socket
    (which raises :class:`~vfu_server.handover.HandoverRefused` if that fails); this server
    then serves them. After a handover to a successor :func:`serve` returns normally without
    removing socket files, which now belong to the successor.

    ``hooks.on_listening()`` runs once clients can connect; ``hooks.on_stopping()`` when a
    signal arrives. ``hooks.before_serving(socket_path, control_path)`` runs once the device is
    ready and before any client is served, with the socket files this server will remove at
    exit (the command line applies ``--sandbox`` there); an exception from it is a start-up
    error. A successor runs it before it asks for the device, with the paths
    ``handover-info`` gave, so that it is not part of the pause; after the take-over only when
    the predecessor gave none.
    """

    socket_path: str | None = None
    listener: trio.socket.SocketType | None = None
    socket_path_to_remove: str | None = None
    control: trio.socket.SocketType | None = None
    control_path: str | None = None
    connected: trio.socket.SocketType | None = None
    socket_poll_us: int = 0
    successor: Any = None
    hooks: ServeHooks = ServeHooks()


async def serve(device: PciDevice, options: ServeOptions = ServeOptions(), *,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run a device until SIGTERM/SIGINT (or until an inherited connection ends), as
    ``options`` (:class:`ServeOptions`) say.

    On a signal: the batch being handled completes, the device flushes its backends
    (:meth:`PciDevice.shutdown`), the socket file is removed, and this returns normally.
    """
    import signal

    from .transport.unix import open_unix_listener

    ends = Endpoints(options.listener, options.connected, None, options.control, options.control_path,
                     options.socket_path_to_remove)
    if options.socket_path is not None:
        ends.listener = open_unix_listener(options.socket_path)
        ends.socket_path_to_remove = options.socket_path
    hooks, successor = options.hooks, options.successor
    server = Server(device, socket_poll_us=options.socket_poll_us)
    start_error: Exception | None = None
    handover_error: Exception | None = None
    try:
        # From the start: a signal during start-up or a handover waits for the serving to begin.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as device_tasks:
                start_error, handover_error = await _get_ready(device, server, device_tasks, ends, successor, hooks)
                if start_error is None and handover_error is None:
                    if ends.control is not None:
                        device_tasks.start_soon(serve_control, device, ends.control, HandoverHost(
                            server, ends.listener, ends.control, ends.socket_path_to_remove, ends.control_path))
                    await _serve_until_stopped(device, server, ends, hooks, signals, task_status)
                    await server.finish()
                device_tasks.cancel_scope.cancel()
    finally:
        ends.close(server)
        server.device.close()
    if start_error is not None:
        raise DeviceStartError(f"{device.name}: {start_error}") from start_error
    if handover_error is not None:
        raise handover_error


async def _get_ready(device: PciDevice, server: Server, device_tasks: trio.Nursery, ends: Endpoints,
                     successor: Any, hooks: ServeHooks) -> tuple[Exception | None, Exception | None]:
    """Start the device, take over from a predecessor, run ``before_serving``: the start-up
    error and the handover error, None each when that step went well."""
    try:
        await server.device.start(device_tasks)
    except Exception as exc:
        return exc, None
    confined = False
    if successor is not None:
        try:
            # Confined before the predecessor pauses (it costs 6-25 ms), when it says where its
            # sockets are; else after the take-over (below).
            paths = await successor.prepare(device) if hooks.before_serving is not None else None
        except Exception as exc:
            return None, exc
        if paths is not None:
            assert hooks.before_serving is not None
            try:
                await hooks.before_serving(*paths)
            except Exception as exc:
                successor.close()
                return exc, None  # the predecessor was never paused
            confined = True
        try:
            ends.take_over(await successor.take_over(device, server))
        except Exception as exc:
            return None, exc
    if hooks.before_serving is not None and not confined:
        try:
            await hooks.before_serving(ends.socket_path_to_remove, ends.control_path)
        except Exception as exc:
            if successor is None:
                return exc, None
            # The predecessor is gone: the device has no other server now.
            log.error("%s; serving the taken-over device anyway", exc)
    return None, None


async def _serve_until_stopped(device: PciDevice, server: Server, ends: Endpoints, hooks: ServeHooks,
                               signals: Any, task_status: Any) -> None:
    """Serve clients until a signal (or the end of an inherited connection, or a handover),
    then let the device drain with the session still open."""
    import signal

    # Cancelled when the signal watcher is no longer needed (an inherited connection ended).
    signal_task = trio.CancelScope()
    server.on_handed_over.append(signal_task.cancel)

    async def one_connection(sock: trio.socket.SocketType, adopted: Adopted | None) -> None:
        await server.serve_socket(sock, adopted=adopted)
        signal_task.cancel()

    async def watch_signals() -> None:
        with signal_task:
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                if hooks.on_stopping is not None:
                    hooks.on_stopping()
                server.stop()
                return

    async with trio.open_nursery() as clients:
        if ends.listener is not None:
            await clients.start(partial(server.serve_listener, ends.listener, first=ends.adopted))
        else:
            sock = ends.adopted.sock if ends.adopted is not None else ends.connected
            assert sock is not None
            clients.start_soon(one_connection, sock, ends.adopted)
        if hooks.on_listening is not None:
            hooks.on_listening()
        task_status.started(server)
        clients.start_soon(watch_signals)
    # Every client task has returned: on a signal the session is still open, so in-flight work
    # can complete into guest memory and raise its interrupts.
    signal_task.cancel()
    if not server.handed_over:
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            await device.shutdown()


@dataclass
class HandoverHost:
    """What a live handover (``{"cmd": "handover"}`` on the control socket) hands on."""

    server: Server
    listener: trio.socket.SocketType | None
    control: trio.socket.SocketType | None
    socket_path: str | None
    control_path: str | None


async def serve_control(device: PciDevice, listener: trio.socket.SocketType,
                        host: HandoverHost | None = None) -> None:
    """The out-of-band control socket: one JSON object per line in, one per line out
    (docs/migration-format.md). Any number of control clients, each served in its own task.
    ``handover`` and ``snapshot`` (docs/handover.md) are answered by :mod:`vfu_server.handover`."""

    async def one(sock: trio.socket.SocketType) -> None:
        import json

        from . import faults

        stream = trio.SocketStream(sock)
        buf = b""
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                buf += data
                if len(buf) > 1 << 20:
                    await stream.send_all(b'{"ok": false, "errno": 7, "error": "E2BIG", "reason": "line too long"}\n')
                    return
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    try:
                        msg = json.loads(line)
                    except ValueError as exc:
                        reply = {"ok": False, "errno": errno.EINVAL, "error": "EINVAL", "reason": f"not JSON: {exc}"}
                    else:
                        if isinstance(msg, dict) and msg.get("cmd") == "handover" and host is not None:
                            from . import handover

                            # The connection now belongs to the handover, whatever its outcome.
                            try:
                                await handover.give(host, sock, msg, buf)
                            except Exception:  # give() rolls back itself; the server goes on
                                log.exception("handover failed")
                            return
                        # Each area's commands are a step of their own: None means not mine.
                        reply = iostats.handle_control(device, msg)
                        if reply is not None:
                            pass
                        elif isinstance(msg, dict) and msg.get("cmd") in faults.CONTROL_COMMANDS:
                            reply = await faults.handle_control(device, msg)
                        elif isinstance(msg, dict) and msg.get("cmd") == "handover-info" and host is not None:
                            from . import handover

                            reply = handover.info(host)
                        elif isinstance(msg, dict) and msg.get("cmd") == "snapshot" and host is not None:
                            from . import handover

                            try:
                                reply = await handover.snapshot(host, msg)
                            except Exception as exc:
                                log.exception("snapshot failed")
                                reply = {"ok": False, "errno": errno.EIO, "error": "EIO",
                                         "reason": f"{type(exc).__name__}: {exc}"}
                        elif device.migration is None:
                            reply = {"ok": False, "errno": errno.ENOTSUP, "error": "ENOTSUP",
                                     "reason": "device is not migratable"}
                        else:
                            reply = device.migration.controller.handle_control(msg)
                    try:
                        await stream.send_all(json.dumps(reply).encode() + b"\n")
                    except trio.BrokenResourceError:
                        return

    clients = 0

    async def counted(sock: trio.socket.SocketType) -> None:
        nonlocal clients
        clients += 1
        try:
            await one(sock)
        finally:
            clients -= 1

    async with trio.open_nursery() as nursery:
        while True:
            sock, _ = await listener.accept()
            if clients >= MAX_CONTROL_CLIENTS:
                # Each client may hold a line buffer of up to 1 MiB: their number is bounded too.
                with contextlib.suppress(OSError), trio.move_on_after(1):
                    await sock.send(b'{"ok": false, "errno": 16, "error": "EBUSY", "reason": "too many control clients"}\n')
                sock.close()
                continue
            nursery.start_soon(counted, sock)
