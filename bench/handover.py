"""Live handover: the pause a client sees while its server is replaced, per device and format.

    .venv/bin/python -m bench.handover [--handovers 50] [--devices nvme,virtio-blk,...]
                                       [--formats standard,opaque] [--qd 8]

For each device and format, one server runs with a control socket and the project's client (its
Python test drivers, as in bench/devices.py and bench/migration.py) keeps I/O in flight on it
the whole time, timestamping every completion:

* nvme, virtio-blk: ``--qd`` 4 KiB requests on one queue, random reads and writes alternating,
  on a page-cached backing file;
* virtio-net: ``--qd`` frames in flight to a ``--peer`` socket of the benchmark's own that sends
  each one straight back; a completion is a frame arriving on the receive queue;
* virtio-rng: ``--qd`` 64-byte entropy requests;
* example: one DMA copy at a time, its completion the MSI-X interrupt.

Meanwhile the server is handed over ``--handovers`` times: the benchmark starts ``vfu-server
DEVICE ... --take-over CTL --migration-format FORMAT``, waits for its ``listening on`` line and
for the predecessor to exit, then for the client's next completion, and goes on with the next.

**Pause**, the number this benchmark is about: for one handover, the longest gap between two
consecutive completions the client saw, among those gaps that overlap the handover window (from
starting the successor process until the predecessor has exited). That is the stall a guest
would notice: the predecessor quiescing, the state and file descriptors moving, the successor's
first answer, and whatever the successor's start-up (a Python interpreter loading the project)
takes away from the old server on a host with few CPUs. The table shows its median and maximum
over the handovers. Beside it, *I/O gap*: the same measure over windows of the same length
without a handover (the loop's own jitter on this machine), *completions/s* outside handovers,
*server pause*: what the predecessor logs as its pause (from holding the device until the
successor's ack; the client's pause adds the successor's first answer and scheduling), and
*handover ms*: from starting the successor to its ``listening on`` (the pause is part of it). The migration numbers to compare with are bench/migration.py's (downtime of a v2
migration between two servers with the same client).
"""

from __future__ import annotations

import argparse
import bisect
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from vfu_server.testing.process import first_line

from .common import REPO, machine_line, median, server_env, table

#: what a predecessor logs when it has handed over (vfu_server.handover)
SERVER_PAUSE = re.compile(r"handed over to the successor after a pause of ([0-9.]+) ms")
DEVICES = ["nvme", "virtio-blk", "virtio-net", "virtio-rng", "example"]
FORMATS = ["standard", "opaque"]
DISK = 64 << 20
MAC = bytes.fromhex("525400161601")


@dataclass
class Run:
    """One device and format: completion times and the window of each handover."""

    device: str
    fmt: str
    completions: list[float] = field(default_factory=list)
    windows: list[tuple[float, float]] = field(default_factory=list)
    handover_ms: list[float] = field(default_factory=list)
    #: the pause as the predecessor logged it (hold until the successor's ack), where it did
    server_pause_ms: list[float] = field(default_factory=list)

    def pauses(self) -> list[float]:
        return [longest_gap(self.completions, a, b) for a, b in self.windows]

    def quiet_gaps(self) -> list[float]:
        """The same measure over windows as long as the handovers', placed between them."""
        out = []
        for (_, end), (start, _) in zip(self.windows, self.windows[1:], strict=False):
            length = median([b - a for a, b in self.windows])
            if start - end > length * 3:
                mid = (start + end) / 2
                out.append(longest_gap(self.completions, mid - length / 2, mid + length / 2))
        return out


def longest_gap(times: list[float], start: float, end: float) -> float:
    """Longest interval between consecutive `times` (sorted) that overlaps [start, end]."""
    first = max(bisect.bisect_right(times, start) - 1, 0)
    last = min(bisect.bisect_left(times, end) + 1, len(times) - 1)
    return max((times[k + 1] - times[k] for k in range(first, last)), default=float("nan"))


# -- servers -------------------------------------------------------------------------------------


async def _spawn(argv: list[str], err: Path, timeout: float = 60.0) -> trio.Process:
    """Start a server and wait for its ``listening on`` line."""
    with open(err, "wb") as errf:
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=errf,
                                                stdin=subprocess.DEVNULL, env=server_env(), cwd=REPO)
    line = await first_line(proc, timeout)
    if not line.startswith(b"listening on"):
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{' '.join(argv[3:])}: no 'listening on' (rc={proc.returncode}):\n"
                           f"{err.read_text(errors='replace')[-3000:]}")
    return proc


def _device_args(device: str, tmp: Path) -> list[str]:
    if device in ("nvme", "virtio-blk"):
        return ["--backing", str(tmp / "disk.raw")]
    if device == "virtio-net":
        return ["--peer", str(tmp / "peer.sock"), "--mac", ":".join(f"{b:02x}" for b in MAC)]
    return []


# -- I/O loops: each calls done() once per completion, until cancelled ---------------------------


async def nvme_io(client, ram, qd: int, done: Callable[[], None]) -> None:  # type: ignore[no-untyped-def]
    from vfu_server.testing.nvme import IO_READ, IO_WRITE, NvmeTestDriver, SubmissionEntry

    drv = NvmeTestDriver(client, ram)
    await drv.start()
    await drv.enable_shadow_doorbells()  # as Linux does with this controller
    q = await drv.create_io_queue_pair(1, entries=64)
    bufs = [drv.buffer(4096) for _ in range(qd)]
    for b in bufs:
        ram.write(b, os.urandom(4096))
    rng = random.Random(1)
    slot_of: dict[int, int] = {}
    free = list(range(qd))
    vec = drv.vectors[q.vector]
    n = 0
    while True:
        while free:
            slot = free.pop()
            n += 1
            p1, p2 = drv.prps(bufs[slot], 4096)
            lba = rng.randrange(DISK // 4096) * 8
            entry = SubmissionEntry(IO_READ if n % 2 else IO_WRITE, nsid=1, prp1=p1, prp2=p2,
                                    cdw10=lba & 0xFFFFFFFF, cdw11=lba >> 32, cdw12=7)
            slot_of[await drv.submit(q, entry, ring=False)] = slot
        await drv.ring_sq(q.qid, q.sq_tail)
        await drv.reap(q)
        if not q.done:
            with trio.move_on_after(1.0):
                await vec.wait()
            continue
        for cid, c in list(q.done.items()):
            if not c.ok:
                raise RuntimeError(f"NVMe: status {c.status:#x}")
            free.append(slot_of.pop(cid))
            done()
        q.done.clear()


async def virtio_blk_io(client, ram, qd: int, done: Callable[[], None]) -> None:  # type: ignore[no-untyped-def]
    from vfu_server.testing.virtio import (
        VIRTIO_F_EVENT_IDX,
        VIRTIO_F_INDIRECT_DESC,
        Buf,
        init_device,
    )

    await client.dma_map(ram)
    _, (q,) = await init_device(client, ram, VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX, size=64, slot_size=256)
    rng = random.Random(1)
    n = 0
    buf_of: dict[int, Buf] = {}

    def add(data: Buf) -> None:
        nonlocal n
        n += 1
        sector = rng.randrange(DISK // 4096) * 8
        if n % 2:
            req = q.add([struct.pack("<IIQ", 0, 0, sector)], [data, 1], indirect=True)
        else:
            req = q.add([struct.pack("<IIQ", 1, 0, sector), data], [1], indirect=True)
        buf_of[req.head] = data

    for _ in range(qd):
        add(Buf(ram.alloc(4096), 4096))
    await q.kick()
    while True:
        finished = await q.wait_used(1, timeout=3600)
        # every status first: re-adding reuses the freed descriptors and slots of this batch
        for req in finished:
            status = req.data(len(req.inbufs) - 1)[0]
            if status != 0:
                raise RuntimeError(f"virtio-blk: status {status}")
            done()
        for data in [buf_of.pop(req.head) for req in finished]:
            add(data)
        await q.kick()


async def virtio_net_io(client, ram, qd: int, done: Callable[[], None]) -> None:  # type: ignore[no-untyped-def]
    from vfu_server.testing.virtio import VirtioTimeout, init_device

    await client.dma_map(ram)
    _, (rx, tx) = await init_device(client, ram, 1 << 5, queues=(0, 1), slot_size=2048)  # F_MAC
    for _ in range(64):
        rx.add(in_sizes=[12 + 1518])
    await rx.kick()
    body = os.urandom(200)
    sent = 0
    waiting: set[int] = set()  # sequence numbers sent and not yet back
    owed = qd  # frames to send as soon as a transmit descriptor is free
    quiet_since = time.monotonic()
    while True:
        tx.reap()  # the device may hand transmit buffers back well after the frame left
        while owed and tx.free:
            tx.add([bytes(12) + MAC + b"\x02" * 6 + b"\x88\xb5" + struct.pack("<Q", sent) + body])
            waiting.add(sent)
            sent += 1
            owed -= 1
        await tx.kick()
        try:
            got = await rx.wait_used(1, timeout=0.05)
        except VirtioTimeout:
            if time.monotonic() - quiet_since > 10:
                raise RuntimeError(f"virtio-net: {len(waiting)} of {sent} frames never came back "
                                   f"(oldest {min(waiting, default=None)})") from None
            continue
        quiet_since = time.monotonic()
        # every frame first: re-adding reuses the freed descriptors and slots of this batch
        for req in got:
            (seq,) = struct.unpack_from("<Q", req.data(0), 12 + 14)
            if seq not in waiting:
                raise RuntimeError(f"virtio-net: frame {seq} came back twice (or was never sent)")
            waiting.discard(seq)
            done()
        for _ in got:
            rx.add(in_sizes=[12 + 1518])
        owed += len(got)
        await rx.kick()


async def virtio_rng_io(client, ram, qd: int, done: Callable[[], None]) -> None:  # type: ignore[no-untyped-def]
    from vfu_server.testing.virtio import init_device

    await client.dma_map(ram)
    _, (q,) = await init_device(client, ram, queues=(0,))
    for _ in range(qd):
        q.add(in_sizes=[64])
    await q.kick()
    while True:
        for _ in await q.wait_used(1, timeout=3600):
            done()
            q.add(in_sizes=[64])
        await q.kick()


async def example_io(client, ram, qd: int, done: Callable[[], None]) -> None:  # type: ignore[no-untyped-def]
    await client.dma_map(ram)
    await client.enable_bus_master()
    irq = (await client.enable_msix(1))[0]
    src, dst = ram.alloc(4096), ram.alloc(4096)
    ram.write(src, os.urandom(4096))
    for off, value in ((0x08, src), (0x0C, 0), (0x10, dst), (0x14, 0), (0x18, 4096)):
        await client.write32(0, off, value)
    while True:
        await client.write32(0, 0x1C, 1)  # copy; MSI-X 0 when done
        with trio.move_on_after(1.0):
            await irq.wait()
        if await client.read32(0, 0x20) & 1:
            done()


IO: dict[str, Callable[..., Awaitable[None]]] = {
    "nvme": nvme_io, "virtio-blk": virtio_blk_io, "virtio-net": virtio_net_io,
    "virtio-rng": virtio_rng_io, "example": example_io,
}


async def _echo_peer(path: str) -> None:
    """virtio-net's other end: every frame goes straight back (connections may come again)."""
    lsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await lsock.bind(path)
    lsock.listen(4)

    async def echo(conn: trio.socket.SocketType) -> None:
        with conn:
            while frame := await conn.recv(65536):
                await conn.send(frame)

    with lsock:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await lsock.accept()
                nursery.start_soon(echo, conn)


# -- one device and format ------------------------------------------------------------------------


async def one_run(device: str, fmt: str, handovers: int, qd: int) -> Run:
    from vfu_server.client import Client, GuestRam

    tmp = Path(tempfile.mkdtemp(prefix="vfu-bench-handover-"))
    if device in ("nvme", "virtio-blk"):
        with open(tmp / "disk.raw", "wb") as f:
            for _ in range(DISK >> 20):
                f.write(os.urandom(1 << 20))
    run = Run(device, fmt)
    sock, ctl = str(tmp / "dev.sock"), str(tmp / "dev.ctl")
    base = [sys.executable, "-m", "vfu_server", device, *_device_args(device, tmp)]
    async with trio.open_nursery() as nursery:
        if device == "virtio-net":
            nursery.start_soon(_echo_peer, str(tmp / "peer.sock"))
            await trio.sleep(0.05)
        current = await _spawn([*base, "--socket-path", sock, "--control-socket", ctl], tmp / "server-0.err")
        try:
            async with await Client.connect(sock) as client:
                ram = GuestRam(64 << 20)
                nursery.start_soon(IO[device], client, ram, qd, lambda: run.completions.append(time.perf_counter()))
                await _wait_for(run, 200)
                for i in range(1, handovers + 1):
                    t0 = time.perf_counter()
                    successor = await _spawn([*base, "--take-over", ctl, "--migration-format", fmt],
                                             tmp / f"server-{i}.err")
                    serving = time.perf_counter()
                    with trio.fail_after(30):
                        rc = await current.wait()
                    if rc != 0:
                        raise RuntimeError(f"{device}: predecessor {i - 1} exited with rc={rc}:\n"
                                           f"{(tmp / f'server-{i - 1}.err').read_text()[-3000:]}")
                    t1 = time.perf_counter()
                    logged = SERVER_PAUSE.search((tmp / f"server-{i - 1}.err").read_text(errors="replace"))
                    if logged:
                        run.server_pause_ms.append(float(logged.group(1)))
                    current = successor
                    run.windows.append((t0, t1))
                    run.handover_ms.append((serving - t0) * 1e3)
                    # Go on only once the successor has completed a few requests, and leave
                    # a quiet stretch between handovers for the I/O gap column.
                    await _wait_for(run, len(run.completions) + 20)
                    await trio.sleep(max(3 * (t1 - t0), 0.2))
                nursery.cancel_scope.cancel()
        finally:
            if current.returncode is None:
                current.send_signal(signal.SIGTERM)
                with trio.move_on_after(15) as cs:
                    cs.shield = True
                    await current.wait()
                if current.returncode is None:
                    current.kill()
            shutil.rmtree(tmp, ignore_errors=True)  # the 64 MiB disk and the servers' logs
    return run


async def _wait_for(run: Run, count: int, timeout: float = 60.0) -> None:
    with trio.fail_after(timeout):
        while len(run.completions) < count:
            await trio.sleep(0.005)


def _rate(run: Run) -> float:
    if len(run.completions) < 2:
        return float("nan")
    busy = run.completions[-1] - run.completions[0] - sum(b - a for a, b in run.windows)
    inside = sum(1 for t in run.completions for a, b in run.windows if a <= t <= b)
    return (len(run.completions) - inside) / busy if busy > 0 else float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.handover", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--handovers", type=int, default=50)
    ap.add_argument("--devices", default=",".join(DEVICES))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--qd", type=int, default=8, help="requests in flight (the example device: always 1)")
    args = ap.parse_args(argv)
    print(machine_line())
    rows = []
    for device in args.devices.split(","):
        for fmt in args.formats.split(","):
            run = trio.run(one_run, device, fmt, args.handovers, args.qd)
            pauses = [p * 1e3 for p in run.pauses()]
            quiet = [g * 1e3 for g in run.quiet_gaps()]
            worst = max(pauses, default=float("nan"))
            rows.append([device, fmt, len(pauses), median(pauses), worst, median(quiet),
                         max(quiet, default=float("nan")), median(run.server_pause_ms),
                         max(run.server_pause_ms, default=float("nan")), _rate(run), median(run.handover_ms)])
            print(f"  {device} {fmt}: pause median {median(pauses):.1f} ms, max {worst:.1f} ms, "
                  f"{len(run.completions)} completions", flush=True)
    print()
    print(table(f"Handover pause the client sees (QD {args.qd}; ms)",
                ["device", "format", "handovers", "pause median", "pause max", "I/O gap median",
                 "I/O gap max", "server pause median", "server pause max", "completions/s",
                 "handover ms (median)"], rows))


if __name__ == "__main__":
    main()
