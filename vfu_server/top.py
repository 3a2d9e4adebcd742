"""``vfu-server top CTL...``: a live terminal view of the I/O of one or several servers, read from
their control sockets (``stats``) once per interval and drawn with rich.

Per server and per queue: requests per second and MB/s by kind (over the last interval),
requests in flight, errors, and the mean and the 99th percentile of the latency (the upper
boundary of the histogram bucket the percentile falls into, ``>`` the last boundary beyond it).
A server that is not there (yet, or any more) shows as a row with the reason; the view keeps
asking it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from .cli import OneLineParser


@dataclass
class Source:
    path: str
    stream: trio.SocketStream | None = None
    buf: bytes = b""
    previous: dict[str, Any] | None = None
    previous_at: float = 0.0
    current: dict[str, Any] | None = None
    current_at: float = 0.0
    device: str = ""
    error: str = ""
    rows: list[list[str]] = field(default_factory=list)

    async def poll(self) -> None:
        """One ``stats`` round trip; on failure the reason is kept and the next poll reconnects."""
        try:
            if self.stream is None:
                self.stream = await trio.open_unix_socket(self.path)
                self.buf = b""
            await self.stream.send_all(b'{"cmd": "stats"}\n')
            while b"\n" not in self.buf:
                chunk = await self.stream.receive_some(1 << 20)
                if not chunk:
                    raise ConnectionError("the server closed the control socket")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            reply = json.loads(line)
        except (OSError, ConnectionError, trio.BrokenResourceError, ValueError) as exc:
            self.error = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            if self.stream is not None:
                await self.stream.aclose()
            self.stream = None
            self.previous = self.current = None
            return
        if not reply.get("ok"):
            self.error = reply.get("reason", "error")
            return
        self.error = ""
        self.device = reply.get("device", "")
        self.previous, self.previous_at = self.current, self.current_at
        self.current, self.current_at = reply["stats"], time.monotonic()


def percentile_bound(hist: list[int], bounds: list[int], fraction: float) -> str:
    """The upper boundary of the bucket holding the ``fraction`` quantile, in microseconds."""
    total = sum(hist)
    if not total:
        return "-"
    need, seen = fraction * total, 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= need:
            return f"<={bounds[i] / 1000:g}" if i < len(bounds) else f">{bounds[-1] / 1000:g}"
    return "-"


def rows_of(source: Source) -> list[list[str]]:
    """Table rows of one server: its total, then each queue."""
    name = os.path.basename(source.path)
    if source.error:
        return [[name, source.device or "?", "", "", source.error, "", "", "", "", ""]]
    cur, prev = source.current, source.previous
    if cur is None:
        return [[name, source.device, "", "", "connecting", "", "", "", "", ""]]
    dt = source.current_at - source.previous_at if prev is not None else 0.0
    bounds = cur.get("histogram_boundaries_ns")
    parts = [("total", cur["total"], prev["total"] if prev else None)]
    parts += [(q, v, prev["queues"].get(q) if prev else None) for q, v in cur["queues"].items()]
    out = []
    for queue, now, before in parts:
        for kind in cur["kinds"]:
            ops = now["ops"][kind]
            if not ops:
                continue
            if before is not None and dt > 0:
                iops = (ops - before["ops"][kind]) / dt
                mbs = (now["bytes"][kind] - before["bytes"][kind]) / dt / 1e6
                rate, tput = f"{iops:,.0f}", f"{mbs:,.1f}"
            else:
                rate = tput = "…"
            mean = p99 = "-"
            if bounds is not None:
                mean = f"{now['latency_ns_sum'][kind] / ops / 1000:,.1f}"
                p99 = percentile_bound(now["histogram"][kind], bounds, 0.99)
            out.append([name, source.device, queue, kind, rate, tput, str(now["in_flight"]),
                        str(sum(now["errors"].values())), mean, p99])
    return out or [[name, source.device, "total", "", "idle", "", str(cur["total"]["in_flight"]), "0", "", ""]]


def render(sources: list[Source]) -> Any:
    from rich.table import Table

    table = Table(title="vfu-server top", expand=False)
    for col, justify in (("server", "left"), ("device", "left"), ("queue", "left"), ("kind", "left"),
                         ("ops/s", "right"), ("MB/s", "right"), ("in flight", "right"),
                         ("errors", "right"), ("mean us", "right"), ("p99 us", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for source in sources:
        for row in rows_of(source):
            table.add_row(*row)
    return table


async def run(paths: list[str], interval: float, once: bool) -> None:
    from rich.console import Console
    from rich.live import Live

    sources = [Source(p) for p in paths]

    async def poll_all() -> None:
        async with trio.open_nursery() as nursery:
            for s in sources:
                nursery.start_soon(s.poll)

    if once:
        await poll_all()
        await trio.sleep(interval)
        await poll_all()
        Console().print(render(sources))
        return
    with Live(render(sources), auto_refresh=False, screen=False) as live:
        while True:
            await poll_all()
            live.update(render(sources), refresh=True)
            await trio.sleep(interval)


def main(argv: list[str]) -> int:
    parser = OneLineParser(prog="vfu-server top", description="live I/O statistics of running servers")
    parser.add_argument("control", nargs="+", metavar="CTL", help="a server's control socket (--control-socket)")
    parser.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between updates (default 1)")
    parser.add_argument("--once", action="store_true", help="print one table (rates over one interval) and exit")
    args = parser.parse_args(argv)
    if not 0.05 <= args.interval <= 3600:
        parser.error("--interval must be 0.05..3600 seconds")
    try:
        trio.run(run, args.control, args.interval, args.once)
    except KeyboardInterrupt:
        pass
    sys.stdout.flush()
    return 0
