"""Block device throughput without a VM: the client drives NVMe and virtio-blk servers.

    .venv/bin/python -m bench.devices [--seconds 2] [--size 256M] [--io sync,uring]
                                      [--devices nvme,virtio-blk] [--driver c|python|python,c]

Jobs (each for ``--seconds``): 4 KiB random read and write at QD1 and QD32, 4 KiB random
write each followed by a flush at QD1 (on the Python driver; the floor: pwritev + fdatasync), 128 KiB sequential
read at QD1 and QD32 and write at QD1, 1 MiB sequential read at QD1 and QD8 and write at QD1 (virtio-blk only; NVMe's MDTS is
128 KiB). The virtio-blk C loop hands its data over as a guest does, one descriptor per 4 KiB
page in an order the device cannot merge (``--segment 0``: one descriptor per request, as
before 2026-12-06), at most seg_max (254) of them: a 1 MiB request is 128 pieces of 8 KiB. The backing file is in the page cache (written just before), so these
measure the device model and its I/O path, not a disk. Next to them, in the same run, the floor:
the same file read (and written) with ``os.preadv``/``os.pwritev`` by a plain Python loop.

The load comes from a small C loop by default (``bench/_driver_build.py``: it fills the
rings, publishes them as a guest driver does and sleeps on the interrupt eventfd, about 1-3 us
of CPU per I/O), so that at QD32 the device is what is measured; ``--driver python`` uses the
project's Python test drivers instead (20-25 us per I/O here, which caps IOPS long before the
device does). Setup is the test drivers' in both cases.

The NVMe client enables shadow doorbells (``--no-shadow``: MMIO doorbells only), as the Linux
driver does with this controller. ``--server-args '--poll-us 0'`` turns the servers' polling
off: its spinning counts as server CPU, which is what "IOPS per server core" is computed from.

Columns: IOPS and MB/s as the client saw them; server CPU per I/O from the server's
``/proc/<pid>/stat`` (utime+stime delta / I/Os), which is what the device costs whatever the
client's own speed; client CPU per I/O (this process) to show when the driver is the limit.

``--io uring`` runs the same devices with ``--backing-io uring``
(:class:`~vfu_server.block.uring.UringFileBackend`).
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .common import cpu_seconds, machine_line, running_server, table

KiB = 1024
JOBS = [  # name, op, block size, queue depth, random
    ("4K randread QD1", "read", 4 * KiB, 1, True),
    ("4K randread QD32", "read", 4 * KiB, 32, True),
    ("4K randwrite QD1", "write", 4 * KiB, 1, True),
    ("4K randwrite QD32", "write", 4 * KiB, 32, True),
    # each write followed by a flush, counted once both came back (fio's fsync=1): always on
    # the Python driver, whose 20-25 us per I/O is small beside a flush
    ("4K randwrite+flush QD1", "write+flush", 4 * KiB, 1, True),
    ("128K seqread QD1", "read", 128 * KiB, 1, False),
    ("128K seqread QD32", "read", 128 * KiB, 32, False),
    ("128K seqwrite QD1", "write", 128 * KiB, 1, False),
    ("1M seqread QD1", "read", 1024 * KiB, 1, False),  # virtio-blk only: NVMe's MDTS is 128K
    ("1M seqread QD8", "read", 1024 * KiB, 8, False),
    ("1M seqwrite QD1", "write", 1024 * KiB, 1, False),
]
#: NVMe's largest transfer (MDTS); longer jobs are the guest's business (it splits them).
NVME_MAX_BS = 128 * KiB


@dataclass
class Result:
    ios: int
    elapsed: float
    server_cpu: float
    client_cpu: float
    bs: int
    doorbells: int | None = None  # MMIO doorbell writes sent (C driver)
    wakeups: int | None = None  # interrupts the driver slept for (C driver)
    timeouts: int = 0  # 10 ms sleeps that ended without an interrupt (C driver)

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
    sync = op == "write+flush"
    n = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    end = t0 + seconds
    try:
        while True:
            for _ in range(64):
                fn(fd, [buf], offs.next())
                if sync:
                    os.fdatasync(fd)
            n += 64
            if time.perf_counter() >= end:
                break
    finally:
        os.close(fd)
    return Result(n, time.perf_counter() - t0, 0.0, time.process_time() - c0, bs)


# -- NVMe ----------------------------------------------------------------------------------------


async def nvme_jobs(path: str, pid: int, size: int, seconds: float, jobs: list[tuple],
                    shadow: bool = True, driver: str = "python") -> dict[str, Result]:
    from vfu_server.client import Client, GuestRam
    from vfu_server.testing.nvme import NvmeTestDriver

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
        jobs = [j for j in jobs if j[2] <= NVME_MAX_BS]
        for name, op, bs, qd, rand in jobs:
            if driver == "c" and op != "write+flush":
                out[name] = await _nvme_job_c(drv, q, pid, size, seconds, name, op, bs, qd, rand,
                                              [buf for buf, _ in slots])
            else:
                out[name] = await _nvme_job_py(drv, q, pid, size, seconds, name, op, bs, qd, rand,
                                               [buf for buf, _ in slots])
    return out


async def _nvme_job_py(drv: Any, q: Any, pid: int, size: int, seconds: float, name: str, op: str,
                       bs: int, qd: int, rand: bool, buffers: list[int]) -> Result:
    """One job through the Python test driver; ``write+flush``: each write's slot then sends a
    Flush, and the I/O counts once that came back."""
    from vfu_server.testing.nvme import IO_FLUSH, IO_READ, IO_WRITE, SubmissionEntry

    offs = Offsets(size, bs, rand)
    opcode = IO_READ if op == "read" else IO_WRITE
    lba = 512
    prp_cache = [drv.prps(buf, bs) for buf in buffers]

    def entry(slot: int) -> SubmissionEntry:
        slba = offs.next() // lba
        p1, p2 = prp_cache[slot]
        return SubmissionEntry(opcode, nsid=1, prp1=p1, prp2=p2, cdw10=slba & 0xFFFFFFFF,
                               cdw11=slba >> 32, cdw12=bs // lba - 1)

    cid_slot: dict[int, tuple[int, bool]] = {}  # cid -> (slot, is the flush)
    free = list(range(qd))
    flushes: list[int] = []
    n = 0
    c0, s0 = time.process_time(), cpu_seconds(pid)
    t0 = time.perf_counter()
    end = t0 + seconds
    stopping = False
    vec = drv.vectors[q.vector]
    while True:
        if flushes or (free and not stopping):
            for slot in flushes:
                cid_slot[await drv.submit(q, SubmissionEntry(IO_FLUSH, nsid=1), ring=False)] = (slot, True)
            flushes.clear()
            while free and not stopping:
                slot = free.pop()
                cid_slot[await drv.submit(q, entry(slot), ring=False)] = (slot, False)
            await drv.ring_sq(q.qid, q.sq_tail)
        await drv.reap(q)
        if q.done:
            for cid, c in list(q.done.items()):
                if not c.ok:
                    raise RuntimeError(f"NVMe {name}: status {c.status:#x}")
                slot, was_flush = cid_slot.pop(cid)
                if op == "write+flush" and not was_flush:
                    flushes.append(slot)
                    continue
                free.append(slot)
                n += 1
            q.done.clear()
            if time.perf_counter() >= end:
                stopping = True
            if stopping and not cid_slot and not flushes:
                break
            continue
        with trio.move_on_after(1.0):
            await vec.wait()
    return Result(n, time.perf_counter() - t0, cpu_seconds(pid) - s0, time.process_time() - c0, bs)


@contextmanager
def _c_job(kind: str, ram: Any, irq_fd: int, qd: int, seconds: float, rand: bool) -> Iterator[tuple[Any, Any]]:
    """``(lib, struct kind)`` of the C load loop (``bench/_driver_build.py``), its shared
    ``job`` part filled in; guest RAM stays exported to C while the job runs."""
    from ._driver_build import HELPER

    mod = HELPER.load()
    ffi = mod.ffi
    b = ffi.new(f"struct {kind} *")
    host = ffi.from_buffer(ram.mem)
    try:
        j = b.job
        j.ram, j.base, j.irq_fd = int(ffi.cast("uintptr_t", host)), ram.base, irq_fd
        j.random, j.rng = int(rand), 0x9E3779B97F4A7C15
        j.qd, j.seconds, j.stall_ms = qd, seconds, 5000
        yield mod.lib, b
    finally:
        ffi.release(host)


async def _drive_c(lib: Any, run: Any, b: Any, ring: Callable[[], Awaitable[None]], pid: int, bs: int,
                   what: str, unit: str) -> Result:
    """Call the C loop ``run(b)`` until the job is done, writing doorbells with ``ring``."""
    j = b.job
    c0, s0 = time.process_time(), cpu_seconds(pid)
    t0 = time.perf_counter()
    while True:
        rc = run(b)
        if rc == lib.NVB_RING:
            await ring()
            continue
        if rc == lib.NVB_ERROR:
            raise RuntimeError(f"{what}: status {j.error_status:#x} for {unit} {j.error_cid}")
        if rc == lib.NVB_STALL:
            raise RuntimeError(f"{what}: nothing completed for {j.stall_ms} ms ({j.inflight} in flight)")
        break
    elapsed = time.perf_counter() - t0
    return Result(j.ios, elapsed, cpu_seconds(pid) - s0, time.process_time() - c0, bs,
                  doorbells=j.doorbells, wakeups=j.irq_waits, timeouts=j.poll_timeouts)


async def _nvme_job_c(drv: Any, q: Any, pid: int, size: int, seconds: float, name: str, op: str,
                      bs: int, qd: int, rand: bool, buffers: list[int]) -> Result:
    """One job through the C load loop on queue pair ``q``."""
    stride = 4 << ((await drv.cap()) >> 32 & 0xF)
    with _c_job("nvb", drv.ram, drv.vectors[q.vector].fd, qd, seconds, rand) as (lib, b):
        b.sq, b.cq, b.entries, b.qid = q.sq_base, q.cq_base, q.entries, q.qid
        b.sq_tail, b.cq_head, b.phase = q.sq_tail, q.cq_head, q.phase
        b.shadow_db, b.shadow_ei, b.doorbell_stride = drv.shadow_db, drv.shadow_ei, stride
        b.opcode = 0x02 if op == "read" else 0x01
        b.lbas_per_io, b.ios_in_ns = bs // 512, size // bs
        for slot in range(qd):
            b.prp1[slot], b.prp2[slot] = drv.prps(buffers[slot], bs)

        async def ring() -> None:
            await drv.client.write32(drv.bar, b.ring_offset, b.ring_value, posted=True)

        result = await _drive_c(lib, lib.nvb_run, b, ring, pid, bs, f"NVMe {name}", "command")
        # the queue goes on in Python (or the next C job) from where this job left it
        q.sq_tail, q.cq_head, q.phase = b.sq_tail, b.cq_head, b.phase
        return result


# -- virtio-blk ----------------------------------------------------------------------------------


async def virtio_jobs(path: str, pid: int, size: int, seconds: float, jobs: list[tuple],
                      driver: str = "python", segment: int = 4096) -> dict[str, Result]:
    from vfu_server.client import Client, GuestRam
    from vfu_server.testing.virtio import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, init_device

    out = {}
    async with await Client.connect(path) as client:
        buf_size = max(128 * KiB, *(bs for _, _, bs, _, _ in jobs))
        ram = GuestRam(64 << 20 if buf_size <= 128 * KiB else 32 * buf_size + (32 << 20))
        await client.dma_map(ram)
        # 256 entries, as Linux gets from the device: a chain of 4K pages of 1 MiB fits.
        _, (q,) = await init_device(client, ram, VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX,
                                   size=256, slot_size=256)
        data = [ram.alloc(buf_size) for _ in range(32)]
        for addr in data:
            ram.write(addr, os.urandom(buf_size))
        for name, op, bs, qd, rand in jobs:
            if driver == "c" and op != "write+flush":
                out[name] = await _virtio_job_c(q, pid, size, seconds, name, op, bs, qd, rand, data, segment)
            else:
                out[name] = await _virtio_job_py(q, pid, size, seconds, name, op, bs, qd, rand, data)
    return out


async def _virtio_job_py(q: Any, pid: int, size: int, seconds: float, name: str, op: str, bs: int,
                         qd: int, rand: bool, data: list[int]) -> Result:
    """One job through the Python test driver; ``write+flush``: each write's slot then sends a
    FLUSH, and the I/O counts once that came back."""
    from vfu_server.testing.virtio import Buf

    T_IN, T_OUT, T_FLUSH = 0, 1, 4
    offs = Offsets(size, bs, rand)
    head_buf: dict[int, tuple[int, bool]] = {}  # head -> (slot, is the flush)
    free = list(range(qd))
    flushes: list[int] = []
    n = 0
    c0, s0 = time.process_time(), cpu_seconds(pid)
    t0 = time.perf_counter()
    end = t0 + seconds
    stopping = False
    while True:
        if flushes or (free and not stopping):
            for b in flushes:
                head_buf[q.add([struct.pack("<IIQ", T_FLUSH, 0, 0)], [1], indirect=True).head] = (b, True)
            flushes.clear()
            while free and not stopping:
                b = free.pop()
                hdr = struct.pack("<IIQ", T_IN if op == "read" else T_OUT, 0, offs.next() // 512)
                if op == "read":
                    req = q.add([hdr], [Buf(data[b], bs), 1], indirect=True)
                else:
                    req = q.add([hdr, Buf(data[b], bs)], [1], indirect=True)
                head_buf[req.head] = (b, False)
            await q.kick()
        done = await q.wait_used(1)
        for req in done:
            st = req.data(len(req.inbufs) - 1)[0]
            if st != 0:
                raise RuntimeError(f"virtio-blk {name}: status {st}")
            b, was_flush = head_buf.pop(req.head)
            if op == "write+flush" and not was_flush:
                flushes.append(b)
                continue
            free.append(b)
            n += 1
        if time.perf_counter() >= end:
            stopping = True
        if stopping and not head_buf and not flushes:
            break
    return Result(n, time.perf_counter() - t0, cpu_seconds(pid) - s0, time.process_time() - c0, bs)


async def _virtio_job_c(q: Any, pid: int, size: int, seconds: float, name: str, op: str, bs: int,
                        qd: int, rand: bool, data: list[int], segment: int = 0) -> Result:
    """One job through the C load loop on virtqueue ``q`` (nothing outstanding on it)."""
    ram = q.ram
    with _c_job("vbb", ram, q.dev.vectors[q.vector].fd, qd, seconds, rand) as (lib, b):
        b.desc, b.avail, b.used, b.size, b.event_idx = q.desc, q.avail, q.used, q.size, int(q.event_idx)
        b.avail_idx, b.last_used, b.kicked_at = q.avail_idx, q.last_used, q._kicked_at
        b.type = 0 if op == "read" else 1
        b.bytes, b.ios_in_disk = bs, size // bs
        seg = segment if 0 < segment < bs and bs % segment == 0 else 0
        while seg and bs // seg > q.size - 2:
            seg *= 2  # the device's seg_max (queue size - 2): a guest would merge or split
        b.seg = seg
        table = 16 * (2 + (bs // b.seg if b.seg else 1))
        for slot in range(qd):
            b.header[slot], b.status[slot], b.table[slot] = ram.alloc(16, 16), ram.alloc(1, 16), ram.alloc(table, 16)
            b.data[slot] = data[slot]
        result = await _drive_c(lib, lib.vbb_run, b, lambda: q.dev.notify(q), pid, bs,
                                f"virtio-blk {name}", "head")
        q.avail_idx, q.last_used, q._kicked_at = b.avail_idx, b.last_used, b.kicked_at
        return result


# -- main --------------------------------------------------------------------------------------------


def _available_drivers(wanted: list[str]) -> list[str]:
    if "c" not in wanted:
        return wanted
    from ._driver_build import HELPER

    try:
        HELPER.load()
    except OSError as exc:
        print(f"C load loop unavailable ({exc.strerror}); the NVMe jobs run on the Python driver")
        return [d for d in wanted if d != "c"] or ["python"]
    return wanted


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.devices", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--io", default="sync,uring")
    ap.add_argument("--devices", default="nvme,virtio-blk")
    ap.add_argument("--jobs", default="", help="comma-separated job names (default: all)")
    ap.add_argument("--no-shadow", action="store_true",
                    help="NVMe: MMIO doorbells only (by default the client enables shadow doorbells, as Linux does)")
    ap.add_argument("--driver", default="c",
                    help="load loop: c (bench/_driver_build.py; falls back to python without a "
                         "compiler) or python (the test drivers), or both: python,c")
    ap.add_argument("--segment", type=int, default=4096, metavar="BYTES",
                    help="virtio-blk C loop: one data descriptor per BYTES, scattered as a guest's pages "
                         "(default %(default)s; 0: one descriptor per request)")
    ap.add_argument("--server-args", default="", metavar="ARGS",
                    help="extra server options, e.g. '--poll-us 0' (polling counts as server CPU)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=[@DIR]",
                    help="run the servers of another checkout too (LABEL=@DIR; LABEL= is this one), "
                         "in rotating order per round, to compare them in one run")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every server this many times (variants in rotating order); the table "
                         "shows each job's median round by IOPS")
    args = ap.parse_args(argv)
    from vfu_server.block import parse_size

    variants: list[tuple[str, Path | None]] = []
    for spec in args.variant:
        label, _, where = spec.partition("=")
        if where and not (where.startswith("@") and Path(where[1:]).is_dir()):
            ap.error(f"--variant {spec!r}: expected LABEL=@DIR with DIR a checkout")
        variants.append((label, Path(where[1:]).resolve() if where else None))
    if not variants:
        variants = [("", None)]

    size = parse_size(args.size)
    jobs = [j for j in JOBS if not args.jobs or j[0] in args.jobs.split(",")]
    print(machine_line())
    tmp = tempfile.mkdtemp(prefix="vfu-bench-")
    path = os.path.join(tmp, "disk.raw")
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
    rounds: dict[str, dict[str, list[Result]]] = {}
    try:
        drivers = _available_drivers(args.driver.split(","))
        for r in range(max(1, args.rounds)):
            rounds.setdefault("floor: os.preadv/pwritev loop", {})
            for name, op, bs, qd, rand in jobs:
                if qd == 1:
                    rounds["floor: os.preadv/pwritev loop"].setdefault(name, []).append(
                        floor_job(path, size, op, bs, rand, args.seconds))
            for dev in args.devices.split(","):
                for io in args.io.split(","):
                    for drv in drivers:
                        for vlabel, tree in variants[r % len(variants):] + variants[: r % len(variants)]:
                            io_args = [] if io == "sync" else ["--backing-io", io]  # sync: the default, also of older checkouts
                            with running_server(dev, "--backing", path, *io_args, *args.server_args.split(),
                                                tree=tree) as srv:
                                if dev == "nvme":
                                    res = trio.run(nvme_jobs, srv.socket_path, srv.pid, size, args.seconds, jobs,
                                                   not args.no_shadow, drv)
                                else:
                                    res = trio.run(virtio_jobs, srv.socket_path, srv.pid, size, args.seconds,
                                                   jobs, drv, args.segment)
                            label = f"{dev} ({io}, C driver)" if drv == "c" else f"{dev} ({io})"
                            if vlabel:
                                label += f" [{vlabel}]"
                            for name, result in res.items():
                                rounds.setdefault(label, {}).setdefault(name, []).append(result)
    finally:
        os.unlink(path)
        os.rmdir(tmp)
    # each job's median round by IOPS (with one round: that round)
    results = {who: {name: sorted(rs, key=lambda x: x.iops)[len(rs) // 2] for name, rs in res.items()}
               for who, res in rounds.items()}
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
    counted = [[who, name, r.doorbells * 1000 / max(1, r.ios), (r.wakeups or 0) * 1000 / max(1, r.ios), r.timeouts]
               for who, res in results.items() for name, r in res.items() if r.doorbells is not None]
    if counted:
        print(table("What the C driver saw", ["path", "job", "doorbells or kicks per 1,000 I/Os",
                                              "interrupt wake-ups per 1,000 I/Os", "10 ms sleeps without one"],
                    counted))
    candidates = [res["4K randread QD32"] for who, res in results.items()
                  if who.startswith("nvme") and "4K randread QD32" in res]
    best = max(candidates, key=lambda r: r.iops, default=None)
    if best:
        one_core = 1e6 / (best.server_cpu / best.ios * 1e6) if best.server_cpu else float("nan")
        print(f"NVMe 4K randread QD32: {best.iops:,.0f} IOPS measured, {one_core:,.0f} IOPS per server core "
              f"(1 s / server CPU per I/O); target 100,000: {'MET' if one_core >= 100_000 else 'MISSED'}")


if __name__ == "__main__":
    main()
