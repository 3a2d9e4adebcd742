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

__all__ = ["BASE_ENV", "DEFAULT_NICE", "MAX_NICE", "lower_to", "nice_in_argv"]

#: How much a device server lowers its own CPU priority at start (``--nice``). The scheduler
#: weighs a thread that never sleeps as a full CPU's load, so on a host with few CPUs it leaves
#: a polling server a CPU of its own and puts the VM's vCPU thread and QEMU's main loop on
#: another, where they wait for each other. At nice 10 the poller weighs a tenth as much and
#: gives way to them sooner (docs/performance.md, "Sixth session").
DEFAULT_NICE = 10
#: The largest ``--nice`` (the kernel's lowest priority is nice 19).
MAX_NICE = 19

#: The priority ``--nice`` counts from, handed down to the processes a server starts: a
#: successor the reload path starts inherits its predecessor's lowered priority, and must not
#: lower itself by ``--nice`` once more (it ended at 19 after a reload).
BASE_ENV = "VFU_NICE_BASE"


def nice_in_argv(argv: Sequence[str]) -> int | None:
    """The ``--nice`` a command line asks for (the default when it names none), or None when
    it cannot tell (a malformed value: the parser reports it)."""
    value: str | None = None
    for pos, arg in enumerate(argv):
        if arg == "--":
            break
        name = arg.partition("=")[0]
        if arg.startswith("--ni") and name != "--nice" and "--nice".startswith(name):
            return None  # an abbreviation argparse accepts: leave it to the parser
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
    """Run at ``nice`` steps below the base priority (the inherited one, or :data:`BASE_ENV`'s
    when a server started this process); calling it again with the same value changes nothing.
    Returns why it could not, or None. Before trio starts: Linux keeps a nice value per thread,
    and threads started later (trio's worker threads) inherit it."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        base = int(os.environ.get(BASE_ENV, ""))
    except ValueError:
        base = current
    if not -20 <= base <= MAX_NICE:
        base = current
    os.environ[BASE_ENV] = str(base)
    target = min(MAX_NICE, base + nice)
    if target == current:
        return None
    try:
        os.setpriority(os.PRIO_PROCESS, 0, target)  # going back up needs CAP_SYS_NICE
    except OSError as exc:
        return exc.strerror
    return None
