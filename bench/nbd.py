"""The NBD backend (libnbd, ``vfu_server.block.nbd``) with multi-conn and with one connection,
in the same run, against one qemu-nbd on a file in the page cache.

    .venv/bin/python -m bench.nbd [--seconds 2] [--rounds 2] [--transport unix,tcp]

(At 0e7b438 the project's own NBD client was a third column; libnbd beat it and replaced it,
docs/performance.md "NBD on libnbd".) Each job runs for ``--seconds`` per variant and round,
the variants alternating so that a busy host slows both alike: 4 KiB random reads and writes at queue depth 1 and 32, 128 KiB
sequential reads at queue depth 8. Columns: IOPS and MB/s, and the client's CPU per I/O (this
process's user+system time over the I/Os it completed), which is what a device pays for its
backend whatever qemu-nbd costs. The medians over the rounds are printed.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .common import machine_line, median, table

KiB = 1024
SIZE = 256 << 20
JOBS = [  # name, op, block size, queue depth, random
    ("4K randread QD1", "read", 4 * KiB, 1, True),
    ("4K randread QD32", "read", 4 * KiB, 32, True),
    ("4K randwrite QD1", "write", 4 * KiB, 1, True),
    ("4K randwrite QD32", "write", 4 * KiB, 32, True),
    ("128K seqread QD8", "read", 128 * KiB, 8, False),
]


def start_qemu_nbd(work: Path, transport: str) -> tuple[str, subprocess.Popen[bytes]]:
    exe = shutil.which("qemu-nbd")
    if exe is None:
        sys.exit("qemu-nbd not found (Debian package qemu-utils)")
    image = work / "disk.raw"
    with open(image, "wb") as f:
        f.write(os.urandom(1 << 20) * (SIZE >> 20))  # real data, in the page cache
    common = [exe, "--format=raw", "--export-name=disk", "--persistent", "--shared=8", "--cache=writeback"]
    if transport == "unix":
        sock = work / "q.sock"
        proc = subprocess.Popen([*common, f"--socket={sock}", str(image)])
        uri = f"nbd+unix:///disk?socket={sock}"
        wait = lambda: sock.exists()  # noqa: E731
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([*common, "--bind=127.0.0.1", f"--port={port}", str(image)])
        uri = f"nbd://127.0.0.1:{port}/disk"

        def wait() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
    deadline = time.monotonic() + 20
    while not wait():
        if time.monotonic() > deadline or proc.poll() is not None:
            sys.exit("qemu-nbd did not start")
        time.sleep(0.05)
    return uri, proc


async def run_job(backend: Any, op: str, bs: int, qd: int, rand: bool, seconds: float) -> tuple[int, float, float]:
    """(I/Os, elapsed s, CPU s of this process) of one job."""
    blocks = SIZE // bs
    done = 0
    rng = random.Random(7)
    seq = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done, seq
        buf = bytearray(bs)
        view = [memoryview(buf)]
        while time.monotonic() < stop:
            if rand:
                offset = rng.randrange(blocks) * bs
            else:
                offset = (seq % blocks) * bs
                seq += 1
            if op == "read":
                await backend.readv(offset, view)
            else:
                await backend.writev(offset, view)
            done += 1

    cpu0, t0 = time.process_time(), time.monotonic()
    async with trio.open_nursery() as nursery:
        for _ in range(qd):
            nursery.start_soon(worker)
    return done, time.monotonic() - t0, time.process_time() - cpu0


def openers() -> dict[str, Callable[[str], Any]]:
    from vfu_server.block.nbd import NbdBackend, load

    if load() is None:
        sys.exit("libnbd is not installed (Debian's python3-libnbd; ./run links it into .venv)")
    return {"libnbd": NbdBackend.open,
            "libnbd, 1 connection": lambda uri: NbdBackend.open(uri, connections=1)}


async def bench(uri: str, seconds: float, rounds: int, transport: str) -> list[list[object]]:
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    clients = openers()
    for _ in range(rounds):
        for name, op, bs, qd, rand in JOBS:
            for client, opener in clients.items():
                async with opener(uri) as backend:
                    ios, elapsed, cpu = await run_job(backend, op, bs, qd, rand, seconds)
                results.setdefault((name, client), []).append(
                    (ios / elapsed, ios * bs / elapsed / 1e6, cpu / ios * 1e6 if ios else float("nan")))
    rows: list[list[object]] = []
    for name, *_ in JOBS:
        for client in clients:
            r = results[(name, client)]
            rows.append([transport, name, client, median([x[0] for x in r]), median([x[1] for x in r]),
                         median([x[2] for x in r])])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench.nbd", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--transport", default="unix,tcp")
    args = ap.parse_args()
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-nbd-") as d:
        for transport in args.transport.split(","):
            uri, proc = start_qemu_nbd(Path(d), transport)
            try:
                rows += trio.run(bench, uri, args.seconds, args.rounds, transport)
            finally:
                proc.terminate()
                proc.wait()
    print(machine_line())
    print(table(f"NBD clients against qemu-nbd (medians of {args.rounds} rounds of {args.seconds:g} s)",
                ["transport", "job", "client", "IOPS", "MB/s", "client CPU us/IO"], rows))


if __name__ == "__main__":
    main()
