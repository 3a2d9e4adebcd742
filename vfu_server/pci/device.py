"""The PCI device model a device author subclasses.

A device is a class with declarations (identity, BARs, capabilities) and a few methods::

    class Example(PciDevice):
        identity = PciIdentity(vendor_id=0x1234, device_id=0xfe01)
        bar0 = MemoryBar(0x1000)
        capabilities = (PowerManagement(), Msix(vectors=4, table_bar=2), PciExpress())

        @bar0.reader
        def read_regs(self, offset, size): ...

The base class turns those into everything vfio-user needs: config space, region info, region
access routing (including the MSI-X table and PBA), interrupts through the client's eventfds,
DMA through :attr:`dma`, and reset. The server (one per device process) drives it through an
:class:`~vfu_server.pci.endpoint.Endpoint`, which holds the server-facing methods, so that this
class shows only what an author declares, overrides and calls; a device never sees a message or
a socket. docs/device-guide.md builds a complete device step by step.

Callbacks run on the server's event loop and must not block. Work that takes time (block I/O,
a packet backend) runs in tasks started with :meth:`spawn`, which live as long as the device,
across client connections.

Guest RAM that the client maps without an fd (QEMU without shared memory) is reached through
DMA_READ/DMA_WRITE messages, transparently: ``self.dma`` looks the same, BAR write callbacks
and :meth:`spawn` tasks may use it (they run under :mod:`.msgdma`, which waits for the round
trips outside any reply). Tasks started on a nursery of the device's own must go through
``self.dma.executor.run_task`` (or ``executor.start_soon``) to get the same. A writable view of
such memory starts as zeros: write all of it, or pass ``update=True``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import inspect
import logging
import os
import struct
import typing
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Protocol

import trio

from ..protocol.constants import (
    IrqIndex,
    PciRegion,
)
from ..protocol.messages import RegionInfo
from ..sandbox import SandboxNeeds
from .bar import Bar, BarBacking
from .capabilities import Capability, Msi, Msix
from .config import CMD_MASTER, ConfigSpace, PciIdentity
from .dma import GuestMemory
from .irq import Interrupts
from .migration import DeviceMigration

log = logging.getLogger("vfu_server.device")


class ExtraRegion(Protocol):
    """A device-specific region (index >= 9), e.g. the legacy migration region."""

    def info(self, index: int) -> RegionInfo: ...
    def read(self, offset: int, count: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> Awaitable[None] | None: ...


class PciDevice:
    """Base class of every device. See the module docstring for the declaration style."""

    #: the device's name in logs and messages (default: the class name, lower case). It does not
    #: make ``vfu-server NAME`` work: that takes an entry point ``NAME = "pkg.mod:Class"`` in the
    #: ``vfu_server.devices`` group, or ``vfu-server pkg.mod:Class`` / ``path/to/file.py:Class``.
    cli_name: ClassVar[str | None] = None
    identity: ClassVar[PciIdentity]
    capabilities: ClassVar[tuple[Capability, ...]] = ()
    #: offer legacy INTx (interrupt pin A), used when the driver enables no MSI/MSI-X; on by
    #: default, as on most PCI devices, so that interrupts reach a driver that uses none of them
    intx: ClassVar[bool] = True
    #: size of an expansion ROM (0: none); the content comes from :meth:`rom_bytes`
    rom_size: ClassVar[int] = 0
    #: the device's migration formats: a :class:`vfu_server.migration.FormatSet`, or
    #: ``"package.module:NAME"`` of one, imported when a migration first needs it (a big state
    #: format then costs a server nothing at start-up). A device with formats must implement
    #: :meth:`save_state` and :meth:`load_state`.
    migration_formats: ClassVar[Any] = None
    #: names of the attributes that hold the device's state, each annotated on the class with
    #: its dataclass (``state: EngineState``). Saving and loading them needs no code: with no
    #: ``migration_formats`` the device gets an opaque format (``opaque/auto/NAME``) of these
    #: dataclasses and the generic PCI part; with formats whose state dataclass has the fields
    #: ``profile, pci, msix, intx`` followed by these names, :meth:`save_state` and
    #: :meth:`load_state` fill them in.
    migration_state: ClassVar[tuple[str, ...]] = ()
    #: what ``--fault`` rules can match and do on this device (a
    #: :class:`vfu_server.faults.FaultDomain`; None: no fault injection). A device with a domain
    #: sets ``self.faults = FaultSet(domain)`` and asks ``self.faults.match(...)`` (docs/faults.md).
    fault_domain: ClassVar[Any] = None
    #: the device's fault rules (a :class:`vfu_server.faults.FaultSet`), None without a domain
    faults: Any = None
    #: modules the device's migration code imports on first use (beyond its format module): a
    #: live handover imports them in a worker thread ahead of its pause
    migration_imports: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_declarations(cls)

    def __init__(self) -> None:
        cls = type(self)
        if not isinstance(getattr(cls, "identity", None), PciIdentity):
            raise TypeError(f"{cls.__name__} declares no identity: add "
                            "identity = PciIdentity(vendor_id=..., device_id=...) to the class")
        self.log = logging.getLogger(f"vfu_server.device.{self.name}")
        self.bars: list[Bar | None] = [None] * 6
        for klass in reversed(cls.__mro__):
            for value in vars(klass).values():
                if isinstance(value, Bar) and value.index is not None:
                    self.bars[value.index] = value
        self.caps: list[Capability] = [copy.deepcopy(c) for c in cls.capabilities]
        for cap in self.caps:
            cap.device = self
        self.config = ConfigSpace(
            cls.identity, self.bars, self.caps, interrupt_pin=1 if cls.intx else 0, rom_size=cls.rom_size
        )
        self.backing = [BarBacking(b, f"{self.name}-bar{i}") if b else None for i, b in enumerate(self.bars)]
        self.msix: Msix | None = next((c for c in self.caps if isinstance(c, Msix)), None)
        self.msi: Msi | None = next((c for c in self.caps if isinstance(c, Msi)), None)
        if self.msix is not None:
            self._check_msix(self.msix)
        self.msix_table = bytearray(self.msix.table_size if self.msix else 0)
        self._reset_msix_table()
        self.irqs = Interrupts(
            intx=cls.intx,
            msi_vectors=self.msi.vectors if self.msi else 0,
            msix_vectors=self.msix.vectors if self.msix else 0,
        )
        self.dma = GuestMemory()
        self.dma.config_image = self.config.data
        self.dma.window_filter = self._own_window
        self.dma.executor.spawn = self._spawn_unwrapped
        self.irqs.before_signal = self.dma.before_interrupt
        self.extra_regions: dict[int, ExtraRegion] = {}
        self._nursery: trio.Nursery | None = None
        self._pending_reset: str | None = None
        self._warned_no_interrupt = False
        self.migration: DeviceMigration | None = None
        if cls.migration_formats is not None or cls.migration_state:
            self.migration = DeviceMigration(self)
            self.extra_regions[PciRegion.MIGRATION] = self.migration.region

    # -- naming and command line ------------------------------------------------------------

    @property
    def name(self) -> str:
        """``cli_name``, else the class name in lower case: the device's name in logs."""
        return type(self).cli_name or type(self).__name__.lower()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add device options to the ``vfu-server`` command line."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PciDevice:
        """Build the device from parsed command-line options."""
        return cls()

    # -- lifecycle hooks for subclasses -----------------------------------------------------

    def reset(self) -> Awaitable[None] | None:
        """Device-specific reset (DEVICE_RESET, FLR). Config space is already back to power-on."""

    async def run(self) -> None:
        """Long-running device work, started once when the server starts. Optional.

        A device that needs the event loop to get ready (connect an NBD backend, open a TAP
        device) declares ``async def run(self, task_status=trio.TASK_STATUS_IGNORED)`` and calls
        ``task_status.started()`` once ready: the server says ``listening`` only after that, and
        an exception before it becomes a one-line start-up error instead of a running server
        with a broken device.
        """

    async def shutdown(self) -> None:
        """The server is exiting: finish in-flight work and flush backends."""

    def sandbox_needs(self) -> SandboxNeeds:
        """What the device still does once started beyond serving its client (``--sandbox``):
        sockets it opens again (a backend that reconnects), files it reads or removes.
        Called after :meth:`run` reported ready. None by default."""
        return SandboxNeeds()

    def client_connected(self) -> None:
        """A client negotiated a session."""

    def client_disconnected(self) -> Awaitable[None] | None:
        """The client went away: DMA maps and eventfds are gone, device state stays."""

    # -- migration hooks (only for devices that declare migration_formats) ------------------

    async def quiesce(self) -> None:
        """Stop starting new work and wait for in-flight DMA and interrupts to finish. Called
        before the device leaves a running migration state."""

    def resume(self) -> None:
        """Undo :meth:`quiesce`: the device is running again (after a migration or a failed one)."""

    def save_state(self) -> Any:
        """The device state as plain data, in the shape its formats encode (from
        ``migration_state`` unless overridden)."""
        if not type(self).migration_state:
            raise NotImplementedError(f"{type(self).__name__} declares migration_formats but neither "
                                      "migration_state nor save_state")
        from .migration_state import save_declared_state

        return save_declared_state(self)

    def load_state(self, state: Any) -> None:
        """Apply a fully validated state (called on the RESUMING -> STOP arc only)."""
        if not type(self).migration_state:
            raise NotImplementedError(f"{type(self).__name__} declares migration_formats but neither "
                                      "migration_state nor load_state")
        from .migration_state import load_declared_state

        load_declared_state(self, state)

    def reset_state(self) -> None:
        """Power-on state before loading (entering RESUMING). Override if :meth:`reset` is async."""
        self.config.reset()
        self._reset_msix_table()
        result = self.reset()
        if result is not None:
            raise TypeError(f"{type(self).__name__}.reset is async: override reset_state")

    def migration_arc(self, src: Any, dst: Any) -> None:
        """One migration state-machine arc; the device was already quiesced if it stops."""

    def migration_profile(self) -> Any:
        """The guest-visible profile a destination compares before loading."""
        from .migration_state import pci_profile

        return pci_profile(self)

    def pci_state(self) -> dict[str, Any]:
        """The generic PCI part of the state: ``{"pci": ..., "msix": ..., "intx": ...}``."""
        from .migration_state import pci_state

        return pci_state(self)

    def load_pci_state(self, state: Any) -> None:
        """Apply the generic PCI part (``state.pci``, ``.msix``, ``.intx``) of a loaded state."""
        from .migration_state import load_pci_state

        load_pci_state(self, state.pci, state.msix, state.intx)

    # -- live handover hooks (vfu_server.handover, docs/handover.md) ------------------------

    def handover_refusal(self) -> str | None:
        """Why this device cannot hand over right now (a one-line reason), or None. The
        state must be all in :meth:`save_state`; a device that keeps more (state no format
        holds) returns a reason, and every handover is refused cleanly."""
        return None

    def decode_device_abi(self, abi: bytes) -> Any:
        """The profile's ``device_abi`` bytes as a (dataclass) value, so that a refused
        handover can say which guest-visible setting differs. Default: the bytes."""
        return abi

    def handover_export(self) -> tuple[dict[str, Any], list[int]]:
        """Predecessor side, device quiesced: resources a successor cannot simply reopen (a
        TAP fd, a connected peer socket, a RAM disk), as plain data and fds. The fds stay
        ours (the successor gets copies) until :meth:`handover_released`."""
        return {}, []

    def handover_adopt(self, data: dict[str, Any], fds: list[int]) -> None:
        """Successor side, before the state is loaded: take over what the predecessor's
        :meth:`handover_export` gave. The fds become ours (close the ones not kept; raise
        ValueError, after closing them, to refuse)."""
        for fd in fds:
            os.close(fd)
        if data or fds:
            raise ValueError(f"{self.name} cannot adopt device resources {sorted(data)}")

    def handover_released(self) -> None:
        """Predecessor side: the successor took over. Closing our copies is fine (the process
        exits), but nothing shared may be torn down (unlinking a socket path the successor
        now listens on)."""

    def describe(self) -> dict[str, Any]:
        """Facts for logs and ``--list-devices``."""
        ident = type(self).identity
        return {"vendor": f"{ident.vendor_id:04x}", "device": f"{ident.device_id:04x}"}

    # -- services for subclasses ------------------------------------------------------------

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> None:
        """Start a task that lives as long as the device (until the server shuts down).

        An exception escaping the task is a device bug: it is logged with its traceback and
        ends that task only. It never takes the server down, since QEMU cannot survive a
        server that dies (the next guest reset aborts the VM)."""
        if self._nursery is None:
            raise RuntimeError("device is not attached to a running server")
        self._nursery.start_soon(self._guarded, fn, args, True, name=name or getattr(fn, "__name__", None))

    def _spawn_unwrapped(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> None:
        """:meth:`spawn` for the message-DMA executor's own tasks (which take its lock themselves)."""
        if self._nursery is None:
            raise RuntimeError("device is not attached to a running server")
        self._nursery.start_soon(self._guarded, fn, args, False, name=name)

    async def _guarded(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], dma_task: bool) -> None:
        try:
            if dma_task:
                # Synchronous code in the task may reach guest memory without an fd.
                await self.dma.executor.run_task(fn, *args)
            else:
                await fn(*args)
        except Exception:
            self.log.exception("device task %s failed", getattr(fn, "__qualname__", fn))
        except BaseExceptionGroup as group:
            # Cancellation (server shutdown) goes on; everything else is logged here.
            cancelled, rest = group.split(trio.Cancelled)
            if rest is not None:
                self.log.error("device task %s failed", getattr(fn, "__qualname__", fn), exc_info=rest)
            if cancelled is not None:
                raise cancelled from None

    def _own_window(self, iova: int, size: int) -> bool:
        """Whether ``[iova, iova + size)`` lies in one of our memory BARs as programmed (QEMU
        DMA-maps a device's mmapped BAR windows to it, without an fd; they are no guest RAM)."""
        data = self.config.data
        for i, bar in enumerate(self.bars):
            if bar is None or bar.kind.io:
                continue
            low = struct.unpack_from("<I", data, 0x10 + 4 * i)[0]
            addr = low & ~0xF
            if low & 0x4 and i < 5:
                addr |= struct.unpack_from("<I", data, 0x14 + 4 * i)[0] << 32
            if addr and addr <= iova and iova + size <= addr + bar.size:
                return True
        return False

    @property
    def bus_master(self) -> bool:
        """Bus Master Enable in the Command register: the driver allows the device to DMA."""
        return bool(self.config.data[4] & CMD_MASTER)

    def interrupt(self, vector: int = 0) -> bool:
        """Raise an interrupt the way the driver configured: MSI-X, else MSI, else INTx.

        For INTx this asserts the line (and sets the Interrupt Status bit); the device must call
        :meth:`set_intx` (False) when the cause is cleared, as level-triggered hardware does.

        Returns whether an interrupt went out. With nothing enabled by the driver (no MSI-X, no
        MSI, INTx disabled in the Command register) it returns False and logs a warning the
        first time: real hardware drops the message then too, and a driver that has not set up
        interrupts yet (or is tearing them down) is not a device bug, so this is no exception;
        but a device author whose interrupts never arrive learns why from the log.
        """
        irqs = self.irqs
        if self.msix is not None and (self.msix.enabled or irqs.lines[IrqIndex.MSIX].active):
            _check_vector(self, vector, self.msix.vectors, "Msix")
            return irqs.signal(IrqIndex.MSIX, vector)
        if self.msi is not None and (self.msi.enabled or irqs.lines[IrqIndex.MSI].active):
            _check_vector(self, vector, self.msi.vectors, "Msi")
            return irqs.signal(IrqIndex.MSI, vector)
        if type(self).intx:
            self.set_intx(True)
            if not self.config.intx_disabled:
                return True
        if not self._warned_no_interrupt:
            self._warned_no_interrupt = True
            self.log.warning(
                "interrupt(%d) dropped: the driver enabled no interrupt (MSI-X%s, MSI%s, INTx%s); "
                "logged once", vector,
                " off" if self.msix is not None else ": none declared",
                " off" if self.msi is not None else ": none declared",
                " disabled in the Command register" if type(self).intx else ": intx = False")
        return False

    def set_intx(self, asserted: bool) -> None:
        """Drive the INTx line (level-triggered): True while the device has a cause pending,
        False once the driver cleared it. Sets the Interrupt Status bit either way; the client
        is signalled unless the driver set Interrupt Disable."""
        self.config.set_interrupt_status(asserted)
        if asserted and self.config.intx_disabled:
            return
        self.irqs.set_intx(asserted)

    def request_reset(self, reason: str) -> None:
        """Ask for a device reset from inside a callback (e.g. FLR); it runs after the callback."""
        self._pending_reset = reason

    def rom_bytes(self) -> bytes:
        """The expansion ROM's content (``rom_size`` bytes at most; the rest reads as zero)."""
        return b""

    # -- MSI-X table (for clients that, unlike QEMU, do not emulate it) ---------------------

    def _check_msix(self, msix: Msix) -> None:
        for which, bar_index, off, size in (("table", msix.table_bar, msix.table_offset, msix.table_size),
                                            ("PBA", msix.pba_bar, msix.pba_offset, msix.pba_size)):
            bar = self.bars[bar_index]
            if bar is None or bar.kind.io or off + size > bar.size:
                raise ValueError(f"MSI-X {which} does not fit in memory BAR{bar_index}")

    def _reset_msix_table(self) -> None:
        table = self.msix_table
        table[:] = bytes(len(table))
        for off in range(12, len(table), 16):
            table[off] = 1  # every vector starts masked


#: what a subclass may override, to recognise a misspelling of one (``capabilites``, ``def rest``)
_OVERRIDABLE = (
    "cli_name", "identity", "capabilities", "intx", "rom_size", "migration_formats",
    "migration_state", "add_arguments", "from_args", "run", "reset", "shutdown", "client_connected",
    "client_disconnected", "describe", "rom_bytes", "quiesce", "resume", "save_state",
    "load_state", "reset_state", "migration_arc", "migration_profile", "handover_refusal",
    "decode_device_abi", "handover_export", "handover_adopt", "handover_released", "fault_domain",
    "power_cut", "migration_imports", "sandbox_needs",
)


def _check_declarations(cls: type[PciDevice]) -> None:
    """Refuse, at class creation, the declarations a device would otherwise silently ignore."""
    inherited = {n for base in cls.__mro__[1:] for n in vars(base)}
    for name in vars(cls):
        if name.startswith("_") or name in inherited or name in _OVERRIDABLE:
            continue
        near = difflib.get_close_matches(name, _OVERRIDABLE, n=1, cutoff=0.85)
        # A known name with something added (``resets``, ``runner``) is the device's own.
        if near and not name.startswith(near[0]):
            raise TypeError(f"{cls.__name__}.{name} is not a PciDevice attribute and would be "
                            f"ignored: did you mean {near[0]!r}?")
    where = cls.__name__
    ident = vars(cls).get("identity")
    if ident is not None and not isinstance(ident, PciIdentity):
        raise TypeError(f"{where}.identity must be a PciIdentity(vendor_id=..., device_id=...), "
                        f"not {type(ident).__name__}")
    caps = cls.capabilities
    if not isinstance(caps, (tuple, list)):
        raise TypeError(f"{where}.capabilities must be a tuple of capabilities: write "
                        f"capabilities = ({type(caps).__name__}(...),) with the comma")
    for cap in caps:
        if not isinstance(cap, Capability):
            shown = cap.__name__ if isinstance(cap, type) else type(cap).__name__
            raise TypeError(f"{where}.capabilities holds {shown}, not a capability instance: "
                            f"write {shown}(...)" if isinstance(cap, type)
                            else f"{where}.capabilities holds a {shown}, not a capability")
    if type(cls.intx) is not bool:
        raise TypeError(f"{where}.intx must be True or False")
    if not isinstance(cls.rom_size, int) or cls.rom_size < 0 or (cls.rom_size and (
            cls.rom_size < 0x800 or cls.rom_size & (cls.rom_size - 1))):
        raise TypeError(f"{where}.rom_size must be 0 or a power of two of at least 0x800")
    state = cls.migration_state
    if not (isinstance(state, tuple) and all(isinstance(n, str) for n in state)):
        raise TypeError(f"{where}.migration_state must be a tuple of attribute names: "
                        f"write migration_state = ({state!r},) with the comma")
    if "migration_state" in vars(cls) and state:
        state_hints(cls)
    if cls.cli_name is not None and not (isinstance(cls.cli_name, str) and cls.cli_name):
        raise TypeError(f"{where}.cli_name must be a non-empty string")
    for hook in ("reset_state", "save_state", "load_state", "describe", "rom_bytes",
                 "migration_profile"):
        if inspect.iscoroutinefunction(vars(cls).get(hook)):
            raise TypeError(f"{where}.{hook} must be a plain def, not async def")
    for hook in ("run", "shutdown", "quiesce"):
        fn = vars(cls).get(hook)
        if fn is not None and not inspect.iscoroutinefunction(fn):
            raise TypeError(f"{where}.{hook} must be an async def")


def state_hints(cls: type[PciDevice]) -> dict[str, type]:
    """``migration_state`` name -> its dataclass type, from the class's annotations."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:
        raise TypeError(f"{cls.__name__}: cannot resolve the annotations of its migration_state "
                        f"({exc}); define the state dataclasses before the device class") from None
    out = {}
    for name in cls.migration_state:
        tp = hints.get(name)
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            raise TypeError(f"{cls.__name__}.migration_state names {name!r}: annotate it on the class "
                            f"with its dataclass, e.g. {name}: MyState")
        out[name] = tp
    return out


def _check_vector(device: PciDevice, vector: int, count: int, cap: str) -> None:
    if not 0 <= vector < count:
        raise ValueError(f"{type(device).__name__}.interrupt({vector}): the device declares "
                         f"{cap}(vectors={count}); use a vector from 0 to {count - 1}")
