"""Waits shorter than a millisecond, for trio: a timerfd.

trio sleeps in ``epoll_wait``, whose timeout CPython rounds up to whole milliseconds, so
``trio.sleep(250e-6)`` takes about 1.1 ms when nothing else wakes the loop. A device that
waits a fraction of a millisecond on purpose (completions gathered for a moment, as QEMU's
``virtio-net-pci tx=timer`` does) needs the kernel's own timer: a timerfd armed in
nanoseconds, waited on like any other fd. Python 3.11 has no ``os.timerfd_create``, so the
timerfd calls go through ctypes.
"""

from __future__ import annotations

import ctypes
import os

import trio

__all__ = ["PreciseTimer"]

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                                  ctypes.POINTER(_Itimerspec)]
_libc.timerfd_gettime.argtypes = [ctypes.c_int, ctypes.POINTER(_Itimerspec)]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class PreciseTimer:
    """One timerfd for waits of any length in nanoseconds, one wait at a time."""

    def __init__(self) -> None:
        self.fd: int | None = _check(_libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC),
                                     "timerfd_create")

    def _arm(self, ns: int) -> None:
        assert self.fd is not None
        spec = _Itimerspec()
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
        _check(_libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None), "timerfd_settime")

    def remaining_ns(self) -> int:
        """Until the armed wait ends (0: not armed, or over)."""
        assert self.fd is not None
        spec = _Itimerspec()
        _check(_libc.timerfd_gettime(self.fd, ctypes.byref(spec)), "timerfd_gettime")
        return spec.it_value.tv_sec * 1_000_000_000 + spec.it_value.tv_nsec

    def _clear(self) -> None:
        try:
            os.read(self.fd, 8)  # type: ignore[arg-type]
        except BlockingIOError:
            pass

    async def sleep_ns(self, ns: int) -> None:
        """Wait ``ns`` nanoseconds (at least 1: a zero ``it_value`` would disarm the timer).
        Cancelled, the timer is disarmed, so that the next wait starts clean."""
        if self.fd is None:
            raise trio.ClosedResourceError("timer closed")
        self._arm(max(1, ns))
        try:
            await trio.lowlevel.wait_readable(self.fd)
        finally:
            if self.fd is not None:
                self._arm(0)  # a zero it_value disarms
                self._clear()

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
