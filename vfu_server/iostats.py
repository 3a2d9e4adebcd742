"""I/O statistics of a device, per queue: commands by kind, bytes, errors by status, requests in
flight and latency histograms with boundaries the operator sets (as QEMU's
``block-latency-histogram-set``). Sans-IO: devices count, the control socket
(:func:`handle_control`), the Prometheus exporter (:mod:`vfu_server.metrics`) and
``vfu-server top`` read :meth:`IoStats.snapshot`.

Counting is on the hot paths, so it is plain list arithmetic on small integers (a kind is an
index). A C fast path counts into a ``struct vfu_iostat`` of its own per queue
(:attr:`QueueStats.c`, laid out by :data:`C_STRUCT`), updated in C per request with no call
into Python; a snapshot adds the two.

Latency is the server's: from the moment the server took a request off its queue to the moment
its completion was posted, in nanoseconds.
"""

from __future__ import annotations

import errno
from bisect import bisect_right
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

#: Largest number of histogram boundaries (the C side has room for this many).
MAX_BOUNDS = 32
#: 10 us .. 1 s in roughly 1-2.5-5 steps: where local and networked storage land.
DEFAULT_BOUNDS_NS: tuple[int, ...] = (
    10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000, 25_000_000, 50_000_000, 100_000_000, 1_000_000_000,
)
#: Kinds a C fast path counts (indices 0 and 1 of every block device's kinds).
C_KINDS = 2

#: The C layout of a queue's counters for the fast paths (devices/_fastio_build.py).
C_STRUCT = f"""
struct vfu_iostat {{
    uint64_t ops[{C_KINDS}], bytes[{C_KINDS}], lat_ns[{C_KINDS}];
    uint64_t hist[{C_KINDS}][{MAX_BOUNDS + 1}];
    uint64_t bounds[{MAX_BOUNDS}];
    uint32_t nbounds;
}};
"""

BLOCK_KINDS = ("read", "write", "flush", "discard", "write_zeroes", "other")
READ, WRITE, FLUSH, DISCARD, WRITE_ZEROES, OTHER = range(len(BLOCK_KINDS))


class StatsError(ValueError):
    """A request the statistics cannot take; ``errno`` and a one-line reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = code
        self.reason = reason


def check_bounds(bounds: Sequence[Any]) -> tuple[int, ...]:
    """Histogram boundaries in ns: 1..MAX_BOUNDS strictly increasing positive integers."""
    if not isinstance(bounds, list | tuple) or not 1 <= len(bounds) <= MAX_BOUNDS:
        raise StatsError(errno.EINVAL, f"boundaries: a list of 1..{MAX_BOUNDS} integers (ns)")
    if not all(type(b) is int and 0 < b < 1 << 63 for b in bounds):
        raise StatsError(errno.EINVAL, "boundaries: positive integers of nanoseconds below 2**63")
    if any(a >= b for a, b in pairwise(bounds)):
        raise StatsError(errno.EINVAL, "boundaries must increase strictly")
    return tuple(bounds)


class QueueStats:
    """The counters of one queue. ``record`` is what hot paths call."""

    __slots__ = ("bounds", "bytes", "c", "errors", "hist", "in_flight", "kinds", "lat_ns", "name", "ops")

    def __init__(self, name: str, kinds: Sequence[str], bounds: Sequence[int] | None) -> None:
        self.name = name
        self.kinds = tuple(kinds)
        self.bounds: tuple[int, ...] | None = tuple(bounds) if bounds is not None else None
        self.in_flight = 0
        self.c: Any = None  # struct vfu_iostat * once a fast path counts for this queue
        self.reset()

    def reset(self) -> None:
        k = len(self.kinds)
        self.ops = [0] * k
        self.bytes = [0] * k
        self.lat_ns = [0] * k
        self.errors: dict[str, int] = {}
        nbins = len(self.bounds) + 1 if self.bounds is not None else 0
        self.hist = [[0] * nbins for _ in range(k)]
        c = self.c
        if c is not None:
            for i in range(C_KINDS):
                c.ops[i] = c.bytes[i] = c.lat_ns[i] = 0
                for j in range(MAX_BOUNDS + 1):
                    c.hist[i][j] = 0

    def record(self, kind: int, nbytes: int, latency_ns: int) -> None:
        """One request completed (successfully or not: errors are counted in addition)."""
        self.ops[kind] += 1
        self.bytes[kind] += nbytes
        bounds = self.bounds
        if bounds is not None:
            self.lat_ns[kind] += latency_ns
            self.hist[kind][bisect_right(bounds, latency_ns)] += 1

    def error(self, status: str) -> None:
        self.errors[status] = self.errors.get(status, 0) + 1

    def attach_c(self, ffi: Any) -> Any:
        """This queue's ``struct vfu_iostat *`` for a C fast path (allocated on first use)."""
        if self.c is None:
            c = ffi.new("struct vfu_iostat *")
            self._bounds_to_c(c)
            self.c = c
        return self.c

    def _bounds_to_c(self, c: Any) -> None:
        bounds = self.bounds or ()
        c.nbounds = len(bounds)
        for i, b in enumerate(bounds):
            c.bounds[i] = b

    def set_bounds(self, bounds: tuple[int, ...]) -> None:
        """New boundaries; the histograms (and only they) start again from zero."""
        self.bounds = bounds
        self.hist = [[0] * (len(bounds) + 1) for _ in self.kinds]
        self.lat_ns = [0] * len(self.kinds)
        c = self.c
        if c is not None:
            for i in range(C_KINDS):
                c.lat_ns[i] = 0
                for j in range(MAX_BOUNDS + 1):
                    c.hist[i][j] = 0
            self._bounds_to_c(c)

    def snapshot(self) -> dict[str, Any]:
        ops, nbytes, lat = list(self.ops), list(self.bytes), list(self.lat_ns)
        hist = [list(h) for h in self.hist]
        c = self.c
        if c is not None:
            for i in range(min(C_KINDS, len(ops))):
                ops[i] += c.ops[i]
                nbytes[i] += c.bytes[i]
                if self.bounds is not None:
                    lat[i] += c.lat_ns[i]
                    for j in range(len(hist[i])):
                        hist[i][j] += c.hist[i][j]
        out: dict[str, Any] = {
            "ops": dict(zip(self.kinds, ops, strict=True)),
            "bytes": dict(zip(self.kinds, nbytes, strict=True)),
            "errors": dict(self.errors),
            "in_flight": self.in_flight,
        }
        if self.bounds is not None:
            out["latency_ns_sum"] = dict(zip(self.kinds, lat, strict=True))
            out["histogram"] = dict(zip(self.kinds, hist, strict=True))
        return out


class IoStats:
    """The statistics of one device: a :class:`QueueStats` per queue, made on first use."""

    def __init__(self, kinds: Sequence[str], *, latency: bool = True,
                 bounds: Sequence[int] = DEFAULT_BOUNDS_NS) -> None:
        self.kinds = tuple(kinds)
        self.bounds: tuple[int, ...] | None = check_bounds(bounds) if latency else None
        self.queues: dict[str, QueueStats] = {}

    def queue(self, name: str) -> QueueStats:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = QueueStats(name, self.kinds, self.bounds)
        return q

    def reset(self) -> None:
        for q in self.queues.values():
            q.reset()

    def set_bounds(self, bounds: Sequence[Any]) -> None:
        if self.bounds is None:
            raise StatsError(errno.ENOTSUP, "this device keeps no latency histograms")
        self.bounds = check_bounds(bounds)
        for q in self.queues.values():
            q.set_bounds(self.bounds)

    def snapshot(self) -> dict[str, Any]:
        """Every queue's counters and their sum (``total``), JSON-ready."""
        queues = {name: q.snapshot() for name, q in sorted(self.queues.items())}
        total: dict[str, Any] = {
            "ops": dict.fromkeys(self.kinds, 0),
            "bytes": dict.fromkeys(self.kinds, 0),
            "errors": {},
            "in_flight": 0,
        }
        if self.bounds is not None:
            total["latency_ns_sum"] = dict.fromkeys(self.kinds, 0)
            total["histogram"] = {k: [0] * (len(self.bounds) + 1) for k in self.kinds}
        for q in queues.values():
            for key in ("ops", "bytes", "latency_ns_sum"):
                if key in q:
                    for kind, n in q[key].items():
                        total[key][kind] += n
            for status, n in q["errors"].items():
                total["errors"][status] = total["errors"].get(status, 0) + n
            total["in_flight"] += q["in_flight"]
            for kind, h in q.get("histogram", {}).items():
                total["histogram"][kind] = [a + b for a, b in zip(total["histogram"][kind], h, strict=True)]
        out: dict[str, Any] = {"kinds": list(self.kinds), "total": total, "queues": queues}
        if self.bounds is not None:
            out["histogram_boundaries_ns"] = list(self.bounds)
        return out


def handle_control(device: Any, msg: Any) -> dict[str, Any] | None:
    """The control socket's statistics commands (``stats``, ``stats-reset``,
    ``stats-set-histogram``); None for any other command, which goes on to the next handler."""
    cmd = msg.get("cmd") if isinstance(msg, dict) else None
    if cmd not in ("stats", "stats-reset", "stats-set-histogram"):
        return None
    reply: dict[str, Any] = {"id": msg["id"]} if "id" in msg else {}
    stats: IoStats | None = getattr(device, "iostats", None)
    if stats is None:
        return {**reply, "ok": False, "errno": errno.ENOTSUP, "error": "ENOTSUP",
                "reason": f"{device.name} keeps no I/O statistics"}
    try:
        if cmd == "stats-reset":
            stats.reset()
        elif cmd == "stats-set-histogram":
            stats.set_bounds(msg.get("boundaries_ns"))
    except StatsError as exc:
        return {**reply, "ok": False, "errno": exc.errno, "error": errno.errorcode[exc.errno],
                "reason": exc.reason}
    return {**reply, "ok": True, "device": device.name, "stats": stats.snapshot()}
