"""The server's CPU priority (``--nice``), lowered before the server imports anything heavy.

A live-handover successor starts while its predecessor still serves the guest: its interpreter
start-up and imports (~150 ms of CPU) would otherwise run at the inherited priority, ten steps
above the predecessor's default ``--nice 10``, and on a host with few CPUs take the
predecessor's CPU away in the middle of the guest's I/O. So ``vfu-server`` (and ``python -m
vfu_server``) read ``--nice`` from the raw command line and apply it first, stdlib only; the
argument parser later checks the value and applies what is left (the same value, normally).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["DEFAULT_NICE", "MAX_NICE", "lower_to", "nice_in_argv"]

#: How much a device server lowers its own CPU priority at start (``--nice``). The scheduler
#: weighs a thread that never sleeps as a full CPU's load, so on a host with few CPUs it leaves
#: a polling server a CPU of its own and puts the VM's vCPU thread and QEMU's main loop on
#: another, where they wait for each other. At nice 10 the poller weighs a tenth as much and
#: gives way to them sooner (docs/performance.md, "Sixth session").
DEFAULT_NICE = 10
#: The largest ``--nice`` (the kernel's lowest priority is nice 19).
MAX_NICE = 19

#: how much this process lowered its priority so far (os.nice is relative to the inherited one)
_lowered = 0


def nice_in_argv(argv: Sequence[str]) -> int | None:
    """The ``--nice`` a command line asks for (the default when it names none), or None when
    it cannot tell (a malformed value: the parser reports it)."""
    value: str | None = None
    for pos, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--nice":
            value = argv[pos + 1] if pos + 1 < len(argv) else None
            if value is None:
                return None
        elif arg.startswith("--nice="):
            value = arg.partition("=")[2]
    if value is None:
        return DEFAULT_NICE
    try:
        nice = int(value)
    except ValueError:
        return None
    return nice if 0 <= nice <= MAX_NICE else None


def lower_to(nice: int) -> str | None:
    """Run ``nice`` steps below the inherited priority (once per process: a second call applies
    only the difference). Returns why it could not, or None. Before trio starts: Linux keeps a
    nice value per thread, and threads started later (trio's worker threads) inherit it."""
    global _lowered
    step = nice - _lowered
    if step == 0:
        return None
    try:
        os.nice(step)  # raising back (a negative step) needs CAP_SYS_NICE
    except OSError as exc:
        return exc.strerror
    _lowered = nice
    return None
