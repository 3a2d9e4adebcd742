"""Migration benchmark: state size, pre-copy and stop-and-copy time, downtime and stream
throughput, per device and per format.

Each device runs as two real server processes sharing one guest RAM; the source is brought up
the way a driver would (NVMe: controller enabled with I/O queues; virtio: features negotiated
and queues live), then migrated source -> destination -> source ``--rounds`` times through the
vfio-user v2 protocol with the project's client, and the legacy region once. Numbers are
medians over the rounds.

    .venv/bin/python -m bench.migration [--rounds 10] [--devices example,nvme,...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import trio

from vfu_server.client import Client, GuestRam
from vfu_server.migration import driver as mg

from .common import machine_line, median, running_server, table

DEVICES = ["example", "nvme", "virtio-blk", "virtio-net", "virtio-rng"]


def _args(device: str, tmp: str, side: str) -> list[str]:
    if device in ("nvme", "virtio-blk"):
        return ["--size", "16M"]
    if device == "virtio-net":
        return ["--peer", os.path.join(tmp, f"peer-{side}"), "--listen", "--mac", "52:54:00:12:34:56"]
    return []


async def _bring_up(device: str, client: Client, ram: GuestRam) -> None:
    if device == "nvme":
        from vfu_server.testing.nvme import NvmeTestDriver

        drv = NvmeTestDriver(client, ram)
        await drv.start(map_ram=False)
        for qid in (1, 2, 3, 4):
            await drv.create_io_queue_pair(qid, entries=64)
    elif device.startswith("virtio"):
        from vfu_server.testing.virtio import init_device

        queues = {"virtio-blk": (0,), "virtio-net": (0, 1, 2), "virtio-rng": (0,)}[device]
        await init_device(client, ram, queues=queues)
    else:
        await client.write32(0, 0x04, 0x1234)


async def one_device(device: str, fmt: str, rounds: int) -> list[object]:
    tmp = tempfile.mkdtemp(prefix="vfu-bench-mig-")
    with running_server(device, *_args(device, tmp, "a")) as a, running_server(device, *_args(device, tmp, "b")) as b:
        async with await Client.connect(a.socket_path) as src, await Client.connect(b.socket_path) as dst:
            ram = GuestRam(64 << 20)
            await src.dma_map(ram)
            await dst.dma_map(ram)
            await _bring_up(device, src, ram)
            sizes, pre, down, total, thr = [], [], [], [], []
            for i in range(rounds):
                s, d = (src, dst) if i % 2 == 0 else (dst, src)
                stats = await mg.migrate(s, d, fmt=fmt)
                sizes.append(stats.total_bytes)
                pre.append(stats.precopy_bytes)
                down.append(stats.downtime * 1e3)
                total.append(stats.total_time * 1e3)
                thr.append(stats.total_bytes / stats.total_time / 1e6)
            last = src if rounds % 2 == 0 else dst
            t0 = time.perf_counter()
            stream = await mg.region_save(last)
            region_ms = (time.perf_counter() - t0) * 1e3
            return [device, fmt, int(median(sizes)), int(median(pre)), median(down), median(total),
                    median(thr), len(stream), region_ms]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.migration", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--devices", default=",".join(DEVICES))
    args = ap.parse_args(argv)
    print(machine_line())
    rows = []
    for device in args.devices.split(","):
        for fmt in ("opaque", "standard"):
            rows.append(trio.run(one_device, device, fmt, args.rounds))
    print(table(
        "Migration per device and format (medians; v2 protocol, pre-copy on; v1 region save once)",
        ["device", "format", "state bytes", "pre-copy bytes", "downtime ms", "total ms",
         "stream MB/s", "v1 region bytes", "v1 save ms"],
        rows,
    ))


if __name__ == "__main__":
    main()
