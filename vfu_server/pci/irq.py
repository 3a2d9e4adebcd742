"""Interrupts: the client's eventfds per IRQ index, and DEVICE_SET_IRQS semantics.

The server raises an interrupt by writing to the eventfd the client assigned to that vector.
QEMU emulates MSI and MSI-X masking itself and never tells the server, so MSI/MSI-X vectors are
signalled whenever they have an fd. Masking through SET_IRQS (which other clients may use) is
honoured with a pending bit that is delivered on unmask.

INTx is level-triggered with automask: after the trigger fd is signalled the line counts as
masked until the client unmasks it (QEMU does so on the next BAR access under TCG); if the
device still asserts the line then, it is signalled again.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..protocol.constants import IrqIndex, IrqInfoFlags, IrqSetFlags
from ..protocol.errors import VfioUserError
from ..protocol.messages import IrqInfo, IrqSet


@dataclass(slots=True)
class IrqLine:
    """One IRQ index: its vectors' fds, mask and pending bits."""

    index: int
    count: int
    flags: int
    fds: list[int | None] = field(default_factory=list)
    masked: list[bool] = field(default_factory=list)
    pending: list[bool] = field(default_factory=list)
    signals: int = 0

    def __post_init__(self) -> None:
        self.fds = [None] * self.count
        self.masked = [False] * self.count
        self.pending = [False] * self.count

    def close(self, start: int = 0, count: int | None = None) -> None:
        stop = self.count if count is None else min(self.count, start + count)
        for i in range(start, stop):
            fd = self.fds[i]
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                self.fds[i] = None

    @property
    def active(self) -> bool:
        return any(fd is not None for fd in self.fds)


class Interrupts:
    """IRQ state of a device for one client connection (fds) plus device-side line levels."""

    def __init__(self, *, intx: bool, msi_vectors: int = 0, msix_vectors: int = 0, err: bool = True, req: bool = True) -> None:
        self.lines = {
            IrqIndex.INTX: IrqLine(IrqIndex.INTX, 1 if intx else 0,
                                   IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED),
            IrqIndex.MSI: IrqLine(IrqIndex.MSI, msi_vectors, IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE),
            IrqIndex.MSIX: IrqLine(IrqIndex.MSIX, msix_vectors, IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE),
            IrqIndex.ERR: IrqLine(IrqIndex.ERR, 1 if err else 0, IrqInfoFlags.EVENTFD),
            IrqIndex.REQ: IrqLine(IrqIndex.REQ, 1 if req else 0, IrqInfoFlags.EVENTFD),
        }
        self.intx_asserted = False
        self.intx_resample_fd: int | None = None
        #: called before an interrupt goes out (the device's message-DMA write-backs go first)
        self.before_signal: Callable[[], None] | None = None

    def info(self, index: int) -> IrqInfo:
        line = self.lines.get(index)  # type: ignore[call-overload]
        if line is None:
            raise VfioUserError(f"no IRQ index {index}", errno.EINVAL)
        return IrqInfo(index, line.flags, line.count)

    def set_irqs(self, req: IrqSet, fds: list[int]) -> None:
        """Apply one DEVICE_SET_IRQS. Takes ownership of ``fds`` (all closed on error)."""
        try:
            self._set_irqs(req, fds)
        except BaseException:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise

    def _set_irqs(self, req: IrqSet, fds: list[int]) -> None:
        line = self.lines.get(req.index)  # type: ignore[call-overload]
        if line is None:
            raise VfioUserError(f"SET_IRQS: no IRQ index {req.index}", errno.EINVAL)
        data, action = req.data_type, req.action
        if data != IrqSetFlags.DATA_EVENTFD and fds:
            raise VfioUserError("SET_IRQS: fds sent without DATA_EVENTFD", errno.EINVAL)
        if data == IrqSetFlags.DATA_NONE and action == IrqSetFlags.ACTION_TRIGGER and req.count == 0:
            # Disable the whole index.
            line.close()
            line.masked = [False] * line.count
            line.pending = [False] * line.count
            if req.index == IrqIndex.INTX and self.intx_resample_fd is not None:
                os.close(self.intx_resample_fd)
                self.intx_resample_fd = None
            return
        if req.start + req.count > line.count or req.count == 0:
            raise VfioUserError(
                f"SET_IRQS: vectors {req.start}..{req.start + req.count - 1} outside index {req.index} "
                f"with {line.count} vectors", errno.EINVAL)
        rng = range(req.start, req.start + req.count)
        if data == IrqSetFlags.DATA_EVENTFD:
            if fds and len(fds) != req.count:
                raise VfioUserError(f"SET_IRQS: {len(fds)} fds for {req.count} vectors", errno.EINVAL)
            if action == IrqSetFlags.ACTION_TRIGGER:
                line.close(req.start, req.count)
                if fds:
                    for i, fd in zip(rng, fds, strict=True):
                        line.fds[i] = fd
                    fds.clear()
                    # A vector that fired while it had no fd is delivered now.
                    for i in rng:
                        if line.pending[i] and not line.masked[i]:
                            line.pending[i] = False
                            self._write(line, i)
                return
            if action == IrqSetFlags.ACTION_UNMASK and req.index == IrqIndex.INTX and len(fds) == 1:
                # KVM's resample fd: readable when the guest EOIs. Kept for completeness; under
                # TCG QEMU sends NONE|UNMASK instead.
                if self.intx_resample_fd is not None:
                    os.close(self.intx_resample_fd)
                self.intx_resample_fd = fds.pop()
                return
            raise VfioUserError("SET_IRQS: eventfds only go with TRIGGER (or INTx UNMASK)", errno.EINVAL)
        selected = [True] * req.count if data == IrqSetFlags.DATA_NONE else [b != 0 for b in req.data]
        for i, on in zip(rng, selected, strict=True):
            if not on:
                continue
            if action == IrqSetFlags.ACTION_MASK:
                line.masked[i] = True
            elif action == IrqSetFlags.ACTION_UNMASK:
                line.masked[i] = False
                if req.index == IrqIndex.INTX:
                    if self.intx_asserted:
                        self._deliver(line, i)
                elif line.pending[i]:
                    line.pending[i] = False
                    self._write(line, i)
            else:  # software trigger
                self._deliver(line, i)

    # -- raising interrupts -------------------------------------------------------------------

    def _write(self, line: IrqLine, vector: int) -> bool:
        fd = line.fds[vector]
        if fd is None:
            line.pending[vector] = True
            return False
        try:
            os.eventfd_write(fd, 1)
        except OSError:
            return False
        line.signals += 1
        return True

    def _deliver(self, line: IrqLine, vector: int) -> bool:
        if line.masked[vector]:
            line.pending[vector] = True
            return False
        if line.flags & IrqInfoFlags.AUTOMASKED:
            line.masked[vector] = True
        return self._write(line, vector)

    def signal(self, index: IrqIndex, vector: int = 0) -> bool:
        """Raise ``vector`` of ``index``. Returns whether an eventfd was written."""
        if self.before_signal is not None:
            self.before_signal()
        line = self.lines[index]
        if not 0 <= vector < line.count:
            return False
        return self._deliver(line, vector)

    def set_intx(self, asserted: bool) -> None:
        """Drive the INTx line level; a rising edge signals the trigger fd (with automask)."""
        rising = asserted and not self.intx_asserted
        if rising and self.before_signal is not None:
            self.before_signal()
        self.intx_asserted = asserted
        line = self.lines[IrqIndex.INTX]
        if line.count and rising:
            self._deliver(line, 0)

    def pending_bits(self, index: IrqIndex) -> list[bool]:
        return list(self.lines[index].pending)

    # -- live handover -------------------------------------------------------------------------

    def export(self) -> tuple[dict[str, Any], list[int]]:
        """The client's interrupt set-up as plain data, and the fds it names in order (every
        index, vectors ascending, then the INTx resample fd). The fds stay ours; a handover
        sends copies."""
        lines: dict[str, Any] = {}
        fds: list[int] = []
        for index, line in self.lines.items():
            lines[str(int(index))] = {"count": line.count, "fds": [fd is not None for fd in line.fds],
                                      "masked": list(line.masked), "pending": list(line.pending),
                                      "signals": line.signals}
            fds += [fd for fd in line.fds if fd is not None]
        if self.intx_resample_fd is not None:
            fds.append(self.intx_resample_fd)
        return {"lines": lines, "intx_asserted": self.intx_asserted,
                "resample": self.intx_resample_fd is not None}, fds

    def adopt(self, data: dict[str, Any], fds: list[int]) -> None:
        """Take over an :meth:`export` of another process (with the fds it names, which become
        ours: closed here on error). The vector counts must be this device's."""
        try:
            lines = data["lines"]
            pos = 0
            staged: list[tuple[IrqLine, list[int | None], list[bool], list[bool], int]] = []
            for index, line in self.lines.items():
                d = lines[str(int(index))]
                if d["count"] != line.count or not (len(d["fds"]) == len(d["masked"]) == len(d["pending"]) == line.count):
                    raise ValueError(f"IRQ index {int(index)}: {d['count']} vectors, this device has {line.count}")
                mine: list[int | None] = []
                for present in d["fds"]:
                    if present:
                        if pos >= len(fds):
                            raise ValueError("fewer IRQ fds than the table names")
                        mine.append(fds[pos])
                        pos += 1
                    else:
                        mine.append(None)
                staged.append((line, mine, [bool(x) for x in d["masked"]], [bool(x) for x in d["pending"]],
                               int(d["signals"])))
            resample = None
            if data.get("resample"):
                if pos >= len(fds):
                    raise ValueError("the INTx resample fd is missing")
                resample = fds[pos]
                pos += 1
            if pos != len(fds):
                raise ValueError(f"{len(fds) - pos} IRQ fds more than the table names")
        except (KeyError, TypeError, ValueError) as exc:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise ValueError(f"IRQ table: {exc}") from None
        self.close()
        for line, mine, masked, pending, signals in staged:
            line.fds, line.masked, line.pending, line.signals = mine, masked, pending, signals
        self.intx_resample_fd = resample
        self.intx_asserted = bool(data.get("intx_asserted"))

    def close(self) -> None:
        """The client went away: close every fd, forget masks (device line levels persist)."""
        for line in self.lines.values():
            line.close()
            line.masked = [False] * line.count
            line.pending = [False] * line.count
        if self.intx_resample_fd is not None:
            os.close(self.intx_resample_fd)
            self.intx_resample_fd = None
