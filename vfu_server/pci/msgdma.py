"""Guest memory without an fd: DMA through DMA_READ/DMA_WRITE messages.

QEMU started without shared RAM (no ``memory-backend-memfd,share=on``) sends its DMA_MAPs
without an fd and serves the server's DMA_READ/DMA_WRITE requests instead, on its main loop.
Devices are written against synchronous guest memory (``dma.view/read/write``, queue walkers,
PRP lists, the C fast path). Rather than rewriting them, device code that may touch such memory
runs in a *greenlet*: when an access needs a message, the greenlet switches back to the trio
task driving it, that task does the round trip (and the rest of the server keeps serving
meanwhile), then switches back in with the data. To the device it looks like a slow load.

Rules that keep this correct:

* **No reply is held hostage.** A round trip is never awaited inside a request handler. A BAR
  write whose device callback needs a message is answered at once; the callback goes on in a
  device task (:meth:`DmaExecutor.call`). QEMU serves our requests on its main loop while a
  vCPU may wait for our reply (digest §13), so waiting there would deadlock for 5 s.
* **One device step at a time.** Device code assumes that what it does between two awaits
  is atomic. A step that waits for a message holds the executor; other device tasks' steps and
  BAR writes that arrive meanwhile wait their turn (the writes in order), so no step ever sees
  another half-done.
* **Data before completions.** A writable view of message memory is a bounce buffer written
  back with DMA_WRITE, in the order the views were taken: when the step ends (up to the last
  buffer already complete: small structures such as completion entries, and explicit
  :meth:`GuestMemory.write` data), before any interrupt is raised, and when the task ends. A
  data buffer that a backend fills across an await is written back by the completion after
  it, so the guest never sees a completion before its data.

With every DMA map carrying an fd none of this runs: device tasks step their coroutines
directly and BAR writes call the device directly (:attr:`GuestMemory.message_mode` is False).
"""

from __future__ import annotations

import contextvars
import errno
import logging
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import trio
from greenlet import greenlet

from ..protocol.errors import DmaError, VfioUserError

if TYPE_CHECKING:
    from .dma import GuestMemory

log = logging.getLogger("vfu_server.dma")

#: A writable view up to this size is a structure (completion entry, used ring element,
#: doorbell shadow): it is read first, since the device may update part of it, and it counts
#: as complete when the step ends. Larger ones are data buffers that a backend fills, unless
#: the device says otherwise (``GuestMemory.view(update=True)``: a ring it updates in place).
STRUCT_MAX = 256


class MessagePort(Protocol):
    """The connection's side of message DMA (the server's :class:`Connection`)."""

    async def dma_read(self, address: int, count: int) -> bytes: ...
    async def dma_write(self, address: int, data: bytes) -> None: ...


class _Op:
    __slots__ = ("address", "data", "length")

    def __init__(self, address: int, length: int, data: bytes | None) -> None:
        self.address, self.length, self.data = address, length, data


class _Done:
    __slots__ = ("exc", "finished", "value")

    def __init__(self, value: Any = None, finished: bool = False, exc: BaseException | None = None) -> None:
        self.value, self.finished, self.exc = value, finished, exc


class _Pending:
    """A write-back: ``buf`` goes to ``address`` with DMA_WRITE; ``sealed`` once its content is
    final (a structure, or explicit write data)."""

    __slots__ = ("address", "buf", "sealed")

    def __init__(self, address: int, buf: bytearray | bytes, sealed: bool) -> None:
        self.address, self.buf, self.sealed = address, buf, sealed


class DmaContext:
    """One task's (or one deferred callback's) message-DMA state: its greenlet while a step
    runs, and its write-backs not yet sent."""

    __slots__ = ("glet", "name", "writes")

    def __init__(self, name: str) -> None:
        self.name = name
        self.glet: greenlet | None = None
        self.writes: list[_Pending] = []

    # -- called from device code, inside the greenlet ---------------------------------------

    def suspend(self, op: _Op) -> bytes:
        glet = self.glet
        assert glet is not None and glet.parent is not None
        return glet.parent.switch(op)

    def read(self, address: int, length: int) -> bytes:
        if self.writes and self._overlaps(address, length):
            self.flush_sync(everything=True)  # the device reads back what it wrote
        return self.suspend(_Op(address, length, None))

    def bounce(self, address: int, length: int, update: bool = False) -> memoryview:
        if update or length <= STRUCT_MAX:
            buf = bytearray(self.read(address, length))
            self.writes.append(_Pending(address, buf, True))
        else:
            buf = bytearray(length)
            self.writes.append(_Pending(address, buf, False))
        return memoryview(buf)

    def write(self, address: int, data: bytes) -> None:
        self.writes.append(_Pending(address, data, True))

    def flush_sync(self, everything: bool = False) -> None:
        """Send the write-backs that are due, from inside the greenlet (before an interrupt)."""
        for item in self._take(everything):
            self.suspend(_Op(item.address, len(item.buf), bytes(item.buf)))

    def _overlaps(self, address: int, length: int) -> bool:
        end = address + length
        return any(w.address < end and address < w.address + len(w.buf) for w in self.writes)

    def _take(self, everything: bool) -> list[_Pending]:
        writes = self.writes
        if everything:
            self.writes = []
            return writes
        last = -1
        for i, w in enumerate(writes):
            if w.sealed:
                last = i
        if last < 0:
            return []
        due, self.writes = writes[: last + 1], writes[last + 1 :]
        return due


@types.coroutine
def _yield(trap: Any) -> Any:
    return (yield trap)


def _run_step(coro: Coroutine[Any, Any, Any], value: Any, exc: BaseException | None) -> _Done:
    try:
        trap = coro.send(value) if exc is None else coro.throw(exc)
    except StopIteration as stop:
        return _Done(stop.value, finished=True)
    except BaseException as error:
        return _Done(exc=error)
    return _Done(trap)


def _run_call(fn: Callable[..., Any], args: tuple[Any, ...]) -> _Done:
    try:
        return _Done(fn(*args), finished=True)
    except BaseException as error:
        return _Done(exc=error)


class DmaExecutor:
    """Runs device code that may need message DMA, one step at a time (module docstring)."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.holder: DmaContext | None = None
        self._free: trio.Event | None = None
        self._queue: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._draining = False
        #: starts a task that lives as long as the device (PciDevice.spawn); None: no device
        self.spawn: Callable[..., None] | None = None
        #: round trips done, for logs and tests
        self.round_trips = 0

    # -- the lock ------------------------------------------------------------------------------

    async def _acquire(self, ctx: DmaContext) -> None:
        while self.holder is not None:
            if self._free is None:
                self._free = trio.Event()
            await self._free.wait()
        self.holder = ctx

    def _release(self) -> None:
        self.holder = None
        if self._free is not None:
            self._free.set()
            self._free = None

    # -- doing one request ----------------------------------------------------------------------

    async def _do(self, op: _Op) -> bytes:
        port = self.mem.port
        if port is None:
            raise DmaError("the client went away: guest memory without an fd is unreachable", errno.ENOTCONN)
        self.round_trips += 1
        try:
            if op.data is None:
                data = await port.dma_read(op.address, op.length)
                if len(data) != op.length:
                    raise DmaError(f"DMA_READ at {op.address:#x} returned {len(data)} of {op.length} bytes", errno.EIO)
                return data
            await port.dma_write(op.address, op.data)
            return b""
        except VfioUserError as exc:
            if isinstance(exc, DmaError):
                raise
            raise DmaError(f"message DMA at {op.address:#x}+{op.length:#x}: {exc.message}", exc.errno) from None

    async def _drive(self, ctx: DmaContext, glet: greenlet, args: tuple[Any, ...] = (),
                     op: _Op | None = None) -> _Done:
        """Switch into ``glet`` (with ``args``, or with the outcome of ``op`` it waits on) until
        it is done, serving the requests it makes on the way."""
        mem = self.mem
        throw: BaseException | None = None
        while True:
            if op is not None:
                try:
                    args = (await self._do(op),)
                except BaseException as exc:  # DmaError, Cancelled: raised inside the device code
                    args, throw = (), exc
                op = None
            mem.context = ctx
            try:
                result = glet.throw(throw) if throw is not None else glet.switch(*args)
            finally:
                mem.context = None
            throw = None
            if isinstance(result, _Done):
                return result
            op = result

    async def _flush(self, ctx: DmaContext, everything: bool) -> None:
        for item in ctx._take(everything):
            try:
                await self._do(_Op(item.address, len(item.buf), bytes(item.buf)))
            except DmaError as exc:
                # The device cannot hear about it any more (its step is over); the guest sees
                # missing data, as with a master abort on real hardware.
                log.warning("%s: write-back of %d bytes at %#x failed: %s", ctx.name, len(item.buf),
                            item.address, exc.message)

    # -- device tasks ------------------------------------------------------------------------------

    async def run_task(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``fn(*args)`` so that any synchronous code it calls may use message DMA."""
        coro = fn(*args)
        ctx = DmaContext(getattr(fn, "__qualname__", repr(fn)))
        mem = self.mem
        send, throw = coro.send, coro.throw
        value: Any = None
        exc: BaseException | None = None
        try:
            while True:
                # Attributes, not the message_mode property: this runs once per await of
                # every device task, on the shared-memory fast path too.
                if (mem._fdless and mem.port is not None) or ctx.writes:
                    trap, finished = await self._message_step(ctx, coro, value, exc)
                    if finished:
                        return trap
                else:
                    try:
                        trap = send(value) if exc is None else throw(exc)
                    except StopIteration as stop:
                        return stop.value
                exc = None
                try:
                    value = await _yield(trap)
                except BaseException as error:
                    value, exc = None, error
        finally:
            coro.close()

    async def _message_step(self, ctx: DmaContext, coro: Coroutine[Any, Any, Any], value: Any,
                            exc: BaseException | None) -> tuple[Any, bool]:
        """One step of ``coro`` in a greenlet, holding the executor: (trap or result, finished)."""
        await self._acquire(ctx)
        try:
            glet = greenlet(_run_step)
            glet.gr_context = contextvars.copy_context()
            ctx.glet = glet
            done = await self._drive(ctx, glet, (coro, value, exc))
            ctx.glet = None
            with trio.CancelScope(shield=True):
                await self._flush(ctx, everything=done.finished or done.exc is not None)
        finally:
            self._release()
        if done.exc is not None:
            raise done.exc
        return done.value, done.finished

    def start_soon(self, nursery: trio.Nursery, fn: Callable[..., Awaitable[Any]], *args: Any,
                   name: str | None = None) -> None:
        """Start a short-lived device task (one request's work): through :meth:`run_task` only
        while message DMA is possible, so that the shared-memory path pays nothing per request.
        (A request started before the first map without an fd arrived that meets one fails
        its DMA; QEMU maps guest RAM before a driver runs.)"""
        if self.mem.message_mode:
            nursery.start_soon(self.run_task, fn, *args, name=name)
        else:
            nursery.start_soon(fn, *args, name=name)

    # -- BAR writes ----------------------------------------------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn(*args)`` (a device callback from a request handler) now if it can finish
        without waiting for a message; otherwise finish it in a device task, after whatever
        is already waiting, and return None at once so that the reply goes out."""
        if self.holder is None and not self._queue:
            ctx = DmaContext(getattr(fn, "__qualname__", repr(fn)))
            glet = greenlet(_run_call)
            glet.gr_context = contextvars.copy_context()
            ctx.glet = glet
            self.mem.context = ctx
            try:
                result = glet.switch(fn, args)
            finally:
                self.mem.context = None
            if isinstance(result, _Done):
                if ctx.writes:
                    self.holder = ctx  # its write-backs go before anything else steps
                    self._start_drain(ctx, glet, _Done())
                if result.exc is not None:
                    raise result.exc
                return result.value
            self.holder = ctx  # nothing else may step until this callback is done
            self._start_drain(ctx, glet, result)
            return None
        self._queue.append((fn, args))
        if not self._draining:
            self._start_drain(None, None, None)
        return None

    def _start_drain(self, ctx: DmaContext | None, glet: greenlet | None, first: Any) -> None:
        self._draining = True
        if self.spawn is None:
            raise RuntimeError("message DMA needs a device attached to a running server")
        self.spawn(self._drain, ctx, glet, first, name="message-dma")

    async def _drain(self, ctx: DmaContext | None, glet: greenlet | None, first: Any) -> None:
        try:
            if ctx is not None and glet is not None:
                # The holder was set by call(): finish the callback it started.
                try:
                    await self._finish_call(ctx, glet, first)
                finally:
                    self._release()
            while self._queue:
                fn, args = self._queue.popleft()
                ctx = DmaContext(getattr(fn, "__qualname__", repr(fn)))
                await self._acquire(ctx)
                try:
                    glet = greenlet(_run_call)
                    glet.gr_context = contextvars.copy_context()
                    ctx.glet = glet
                    await self._finish_call(ctx, glet, (fn, args))
                finally:
                    self._release()
        finally:
            self._draining = False

    async def _finish_call(self, ctx: DmaContext, glet: greenlet, first: Any) -> None:
        """``first``: the callback's outcome (a _Done), the request it waits on (an _Op), or
        the ``(fn, args)`` to start it with."""
        with trio.CancelScope(shield=True):
            if isinstance(first, _Done):
                done = first
            elif isinstance(first, _Op):
                done = await self._drive(ctx, glet, op=first)
            else:
                done = await self._drive(ctx, glet, first)
            ctx.glet = None
            await self._flush(ctx, everything=True)
        if done.exc is not None:
            if isinstance(done.exc, VfioUserError):
                log.info("%s (finished in a task for message DMA) failed: %s", ctx.name, done.exc.message)
            else:
                log.error("%s (finished in a task for message DMA) failed", ctx.name, exc_info=done.exc)
        elif isinstance(done.value, Awaitable):
            await done.value
