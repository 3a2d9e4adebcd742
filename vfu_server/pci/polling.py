"""Adaptive polling of doorbells that live in guest memory.

NVMe shadow doorbells and virtio's avail ring let a driver skip the MMIO doorbell write when the
device says it is looking anyway (an event index behind the tail, or VIRTQ_USED_F_NO_NOTIFY).
For an out-of-process device that MMIO write is expensive for both sides: the guest traps, QEMU
sends a vfio-user message, and the server wakes up from ``epoll``. Polling guest memory for a
while after a queue runs dry saves all three whenever the next request comes soon, at the price
of CPU time spent looking.

How long to look is decided per queue, the way QEMU's ``AioContext`` adapts its own polling
(``poll-max-ns``, ``poll-grow``, ``poll-shrink``): the window starts at zero, doubles while
requests keep arriving sooner than the maximum after the queue went idle, and halves when they
arrive later than that. A queue whose driver pauses for longer than the maximum therefore stops
polling by itself, and an idle device costs nothing.

::

    queue ran dry ──► poll(window) ──found──► run it (window kept)
                          │ nothing
                          ▼
                  ask for a doorbell, sleep ──woken──► adapt(idle time) ──► run it

Each look is a trio checkpoint, so the rest of the server (the vfio-user connection, other
queues) runs between looks.

Polling pays only while the driver waits for the device. A driver that keeps the queue deep
(queue depth 32 in a CPU-bound guest) is busy instead: when its next request comes it has not
yet consumed the completions the device posted before, and a poller then only takes a CPU
that the guest's vCPU and the VMM need (on a 2-CPU host, 0.70x of QEMU's own NVMe at 4K random
reads QD32 with polling, 1.11-1.47x without; docs/performance.md, "Seventh session"). The
device reports each arrival with :meth:`AdaptivePoll.arrived`, saying whether the driver was
behind (two or more completions unread: one may be a driver that wakes its submitter before it
records what it read); while it was in more than an eighth of recent arrivals the queue does
not poll (:attr:`AdaptivePoll.driver_busy`), and polling comes back by itself when the driver
catches up (queue depth 1). A device may also batch more while the driver is busy: the NVMe
controller then leaves a doorbell's commands to its queue task instead of running them inline.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from ..priority import DEFAULT_NICE, MAX_NICE  # noqa: F401  (--nice is defined with the early step)

#: First window after a grow from zero: about two trio scheduler passes.
START_NS = 16_000
#: The largest ``--poll-us`` a device accepts.
MAX_POLL_US = 1_000_000
#: The default maximum window: longer than a TCG guest's turn-around at queue depth 1 (300-600
#: us on the development VM, see docs/performance.md); a queue whose driver waits longer than
#: this stops polling after a few idle periods.
DEFAULT_POLL_US = 1000
#: Above this share of recent arrivals (of 1024, a moving average over about eight) that found
#: the driver behind on earlier completions, a queue does not poll: an eighth, so one late
#: arrival among queue-depth-1 ones costs the next two or three polls.
BEHIND_LIMIT = 128
#: The default maximum of a vfio-user connection's busy look for its next message (``--socket-poll-us``):
#: about two process wake-ups on the development VM, see docs/performance.md.
DEFAULT_SOCKET_POLL_US = 100


class AdaptivePoll:
    """The polling window of one queue.

    ``max_ns`` is the longest a queue polls after it ran dry (0 disables polling).
    """

    __slots__ = ("behind", "idle_since", "max_ns", "window_ns")

    def __init__(self, max_ns: int) -> None:
        if max_ns < 0:
            raise ValueError("polling maximum must be >= 0")
        self.max_ns = max_ns
        self.window_ns = 0
        #: perf_counter_ns() when the queue last ran dry (0: it has work, or polling is off)
        self.idle_since = 0
        #: moving average (0..1024) of arrivals that found the driver behind, see arrived()
        self.behind = 0

    def arrived(self, driver_behind: bool) -> None:
        """Work came: a look found it, or a doorbell brought it (NVMe counts every I/O SQ
        doorbell while polling is on, also one that comes while the queue still has work).
        ``driver_behind``: the driver had not yet consumed the completions the device had
        posted (two or more), so it is busy rather than waiting for the device."""
        self.behind += ((1024 if driver_behind else 0) - self.behind) >> 3

    @property
    def driver_busy(self) -> bool:
        """Recent work mostly found the driver behind: the queue does not poll."""
        return self.behind > BEHIND_LIMIT

    async def poll(self, has_work: Callable[[], bool], cancelled: Callable[[], bool]) -> bool:
        """The queue ran dry: look for work for up to the current window.

        True as soon as ``has_work()`` is (the window stays as it is). False when the window
        passed, is zero, or ``cancelled()`` (the queue is stopping or pausing): then the
        caller asks for a doorbell, sleeps, and calls :meth:`woken` when it wakes.
        """
        deadline = self.spin_deadline()
        if not deadline:
            return False
        while not cancelled():
            await trio.lowlevel.checkpoint()
            if has_work():
                self.found()
                return True
            if time.perf_counter_ns() >= deadline:
                break
        return False

    def spin_deadline(self) -> int:
        """The queue ran dry: the ``perf_counter_ns()`` at which to stop looking for work (0:
        do not look, the window is zero). :meth:`poll` looks with checkpoints; a caller that
        looks in a busy loop of its own calls this, then :meth:`found` or :meth:`woken`."""
        if not self.max_ns:
            return 0
        now = self.idle_since = time.perf_counter_ns()
        return now + self.window_ns if self.window_ns and not self.driver_busy else 0

    def found(self) -> None:
        """A look found work (the window stays as it is)."""
        self.idle_since = 0

    def ran_dry(self) -> None:
        """The queue ran dry and sleeps without polling (the window is zero)."""
        if self.max_ns:
            self.idle_since = time.perf_counter_ns()

    def woken(self) -> None:
        """The doorbell rang after a poll that found nothing: adapt the window to how long
        the queue was idle in all."""
        since, self.idle_since = self.idle_since, 0
        if not since:
            return
        idle_ns = time.perf_counter_ns() - since
        if idle_ns > self.max_ns:
            self.window_ns //= 2
            if self.window_ns < START_NS:
                self.window_ns = 0
        elif self.window_ns < self.max_ns:
            self.window_ns = min(self.max_ns, max(START_NS, self.window_ns * 2))
