"""Block device throughput without a VM: the client drives NVMe and virtio-blk servers.

    .venv/bin/python -m bench.devices [--seconds 2] [--size 256M] [--io sync,uring]
                                      [--devices nvme,virtio-blk]

Jobs (each for ``--seconds``): 4 KiB random read and write at QD1 and QD32, 128 KiB sequential
read at QD1 and QD32. The backing file is in the page cache (written just before), so these
measure the device model and its I/O path, not a disk. Next to them, in the same run, the floor:
the same file read (and written) with ``os.preadv``/``os.pwritev`` by a plain Python loop.

The NVMe client enables shadow doorbells (``--no-shadow``: MMIO doorbells only), as the Linux
driver does with this controller. ``--server-args '--poll-us 0'`` turns the servers' polling
off: its spinning counts as server CPU, which is what "IOPS per server core" is computed from.

Columns: IOPS and MB/s as the client saw them; server CPU per I/O from the server's
``/proc/<pid>/stat`` (utime+stime delta / I/Os), which is what the device costs whatever the
client's own speed; client CPU per I/O (this process) to show when the driver is the limit.

``--io uring`` runs the same devices with :class:`~vfu_server.block.uring.UringFileBackend`
(see ``bench/_uring_devices.py``).
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import tempfile
import time
from dataclasses import dataclass

import trio

from .common import cpu_seconds, machine_line, running_server, table

KiB = 1024
JOBS = [  # name, op, block size, queue depth, random
    ("4K randread QD1", "read", 4 * KiB, 1, True),
    ("4K randread QD32", "read", 4 * KiB, 32, True),
    ("4K randwrite QD1", "write", 4 * KiB, 1, True),
    ("4K randwrite QD32", "write", 4 * KiB, 32, True),
    ("128K seqread QD1", "read", 128 * KiB, 1, False),
    ("128K seqread QD32", "read", 128 * KiB, 32, False),
]


@dataclass
class Result:
    ios: int
    elapsed: float
    server_cpu: float
    client_cpu: float
    bs: int

    @property
    def iops(self) -> float:
        return self.ios / self.elapsed

    @property
    def mbps(self) -> float:
        return self.ios * self.bs / self.elapsed / 1e6


class Offsets:
    def __init__(self, size: int, bs: int, rand: bool, seed: int = 1) -> None:
        self.blocks = size // bs
        self.bs = bs
        self.rand = rand
        self.rng = random.Random(seed)
        self.pos = 0

    def next(self) -> int:
        if self.rand:
            return self.rng.randrange(self.blocks) * self.bs
        off = self.pos * self.bs
        self.pos = (self.pos + 1) % self.blocks
        return off


# -- floor -------------------------------------------------------------------------------------


def floor_job(path: str, size: int, op: str, bs: int, rand: bool, seconds: float) -> Result:
    fd = os.open(path, os.O_RDWR)
    buf = memoryview(bytearray(bs))
    offs = Offsets(size, bs, rand)
    fn = os.preadv if op == "read" else os.pwritev
    n = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    end = t0 + seconds
    try:
        while True:
            for _ in range(64):
                fn(fd, [buf], offs.next())
            n += 64
            if time.perf_counter() >= end:
                break
    finally:
        os.close(fd)
    return Result(n, time.perf_counter() - t0, 0.0, time.process_time() - c0, bs)


# -- NVMe ----------------------------------------------------------------------------------------


async def nvme_jobs(path: str, pid: int, size: int, seconds: float, jobs: list[tuple],
                    shadow: bool = True) -> dict[str, Result]:
    from vfu_server.client import Client, GuestRam
    from vfu_server.testing.nvme import IO_READ, IO_WRITE, NvmeTestDriver, SubmissionEntry

    out = {}
    async with await Client.connect(path) as client:
        ram = GuestRam(64 << 20)
        drv = NvmeTestDriver(client, ram)
        await drv.start()
        if shadow:
            await drv.enable_shadow_doorbells()  # as Linux does with this controller
        q = await drv.create_io_queue_pair(1, entries=64)
        slots = []
        for _ in range(32):
            buf = drv.buffer(128 * KiB)
            ram.write(buf, os.urandom(128 * KiB))
            slots.append((buf, drv.prps(buf, 128 * KiB)))
        for name, op, bs, qd, rand in jobs:
            offs = Offsets(size, bs, rand)
            opcode = IO_READ if op == "read" else IO_WRITE
            lba = 512
            prp_cache = [drv.prps(buf, bs) for buf, _ in slots]

            def entry(slot: int) -> SubmissionEntry:
                slba = offs.next() // lba  # noqa: B023
                p1, p2 = prp_cache[slot]  # noqa: B023
                return SubmissionEntry(opcode, nsid=1, prp1=p1, prp2=p2, cdw10=slba & 0xFFFFFFFF,  # noqa: B023
                                       cdw11=slba >> 32, cdw12=bs // lba - 1)  # noqa: B023

            cid_slot: dict[int, int] = {}
            free = list(range(qd))
            n = 0
            c0, s0 = time.process_time(), cpu_seconds(pid)
            t0 = time.perf_counter()
            end = t0 + seconds
            stopping = False
            vec = drv.vectors[q.vector]
            while True:
                if not stopping:
                    while free:
                        slot = free.pop()
                        cid = await drv.submit(q, entry(slot), ring=False)
                        cid_slot[cid] = slot
                    await drv.ring_sq(q.qid, q.sq_tail)
                await drv.reap(q)
                if q.done:
                    for cid, c in list(q.done.items()):
                        if not c.ok:
                            raise RuntimeError(f"NVMe {name}: status {c.status:#x}")
                        free.append(cid_slot.pop(cid))
                        n += 1
                    q.done.clear()
                    if time.perf_counter() >= end:
                        stopping = True
                    if stopping and not cid_slot:
                        break
                    continue
                with trio.move_on_after(1.0):
                    await vec.wait()
            out[name] = Result(n, time.perf_counter() - t0, cpu_seconds(pid) - s0, time.process_time() - c0, bs)
    return out


# -- virtio-blk ----------------------------------------------------------------------------------


async def virtio_jobs(path: str, pid: int, size: int, seconds: float, jobs: list[tuple]) -> dict[str, Result]:
    from vfu_server.client import Client, GuestRam
    from vfu_server.testing.virtio import (
        VIRTIO_F_EVENT_IDX,
        VIRTIO_F_INDIRECT_DESC,
        Buf,
        init_device,
    )

    T_IN, T_OUT = 0, 1
    out = {}
    async with await Client.connect(path) as client:
        ram = GuestRam(64 << 20)
        await client.dma_map(ram)
        _, (q,) = await init_device(client, ram, VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX,
                                   size=64, slot_size=256)
        data = [ram.alloc(128 * KiB) for _ in range(32)]
        for addr in data:
            ram.write(addr, os.urandom(128 * KiB))
        for name, op, bs, qd, rand in jobs:
            offs = Offsets(size, bs, rand)
            head_buf: dict[int, int] = {}
            free = list(range(qd))
            n = 0
            c0, s0 = time.process_time(), cpu_seconds(pid)
            t0 = time.perf_counter()
            end = t0 + seconds
            stopping = False
            while True:
                if not stopping and free:
                    while free:
                        b = free.pop()
                        hdr = struct.pack("<IIQ", T_IN if op == "read" else T_OUT, 0, offs.next() // 512)
                        if op == "read":
                            req = q.add([hdr], [Buf(data[b], bs), 1], indirect=True)
                        else:
                            req = q.add([hdr, Buf(data[b], bs)], [1], indirect=True)
                        head_buf[req.head] = b
                    await q.kick()
                done = await q.wait_used(1)
                for req in done:
                    st = req.data(len(req.inbufs) - 1)[0]
                    if st != 0:
                        raise RuntimeError(f"virtio-blk {name}: status {st}")
                    free.append(head_buf.pop(req.head))
                    n += 1
                if time.perf_counter() >= end:
                    stopping = True
                if stopping and not head_buf:
                    break
            out[name] = Result(n, time.perf_counter() - t0, cpu_seconds(pid) - s0, time.process_time() - c0, bs)
    return out


# -- main --------------------------------------------------------------------------------------------


SERVERS = {
    ("nvme", "sync"): "nvme",
    ("nvme", "uring"): "bench._uring_devices:NvmeUring",
    ("virtio-blk", "sync"): "virtio-blk",
    ("virtio-blk", "uring"): "bench._uring_devices:VirtioBlkUring",
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.devices", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--io", default="sync,uring")
    ap.add_argument("--devices", default="nvme,virtio-blk")
    ap.add_argument("--jobs", default="", help="comma-separated job names (default: all)")
    ap.add_argument("--no-shadow", action="store_true",
                    help="NVMe: MMIO doorbells only (by default the client enables shadow doorbells, as Linux does)")
    ap.add_argument("--server-args", default="", metavar="ARGS",
                    help="extra server options, e.g. '--poll-us 0' (polling counts as server CPU)")
    args = ap.parse_args(argv)
    from vfu_server.block import parse_size

    size = parse_size(args.size)
    jobs = [j for j in JOBS if not args.jobs or j[0] in args.jobs.split(",")]
    print(machine_line())
    tmp = tempfile.mkdtemp(prefix="vfu-bench-")
    path = os.path.join(tmp, "disk.raw")
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
    results: dict[str, dict[str, Result]] = {}
    try:
        results["floor: os.preadv/pwritev loop"] = {
            name: floor_job(path, size, op, bs, rand, args.seconds) for name, op, bs, qd, rand in jobs if qd == 1}
        for dev in args.devices.split(","):
            for io in args.io.split(","):
                with running_server(SERVERS[dev, io], "--backing", path, *args.server_args.split()) as srv:
                    if dev == "nvme":
                        res = trio.run(nvme_jobs, srv.socket_path, srv.pid, size, args.seconds, jobs, not args.no_shadow)
                    else:
                        res = trio.run(virtio_jobs, srv.socket_path, srv.pid, size, args.seconds, jobs)
                    results[f"{dev} ({io})"] = res
    finally:
        os.unlink(path)
        os.rmdir(tmp)
    rows = []
    floor = results["floor: os.preadv/pwritev loop"]
    for who, res in results.items():
        for name, _op, _bs, _qd, _rand in jobs:
            r = res.get(name)
            if r is None:
                continue
            f = floor.get(name.replace("QD32", "QD1"))
            rows.append([who, name, r.iops, r.mbps, (r.iops / f.iops) if f and who != "floor: os.preadv/pwritev loop" else 1.0 if f is r else float("nan"),
                         r.server_cpu / r.ios * 1e6 if r.server_cpu else float("nan"), r.client_cpu / r.ios * 1e6])
    print()
    print(table(f"Device I/O without a VM ({args.seconds:g} s per job, {args.size} page-cached file)",
                ["path", "job", "IOPS", "MB/s", "x floor (QD1 loop)", "server CPU us/IO", "client CPU us/IO"], rows))
    nv = results.get("nvme (sync)", {}).get("4K randread QD32")
    nu = results.get("nvme (uring)", {}).get("4K randread QD32")
    best = max((r for r in (nv, nu) if r), key=lambda r: r.iops, default=None)
    if best:
        one_core = 1e6 / (best.server_cpu / best.ios * 1e6) if best.server_cpu else float("nan")
        print(f"NVMe 4K randread QD32: {best.iops:,.0f} IOPS measured, {one_core:,.0f} IOPS per server core "
              f"(1 s / server CPU per I/O); target 100,000: {'MET' if one_core >= 100_000 else 'MISSED'}")


if __name__ == "__main__":
    main()
