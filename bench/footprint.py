"""Start-up time and idle memory of a device process.

    .venv/bin/python -m bench.footprint [--starts 15] [--devices example,nvme,virtio-blk]

Start-up: from spawning ``python -m vfu_server DEVICE --socket-path P`` to reading its
``listening on`` line (median and max of N starts, interleaved across devices), next to the
floor of the same run: ``python -c pass`` (interpreter start) and ``python -c "import trio"``.
Idle RSS: ``/proc/<pid>/statm`` (and PSS from ``smaps_rollup``) one second after ``listening``,
with no client connected.

``--importtime DEVICE`` prints the 20 slowest imports (``python -X importtime``) instead.

What the sandbox costs (``--sandbox`` is on by default): the same starts with ``--sandbox off``
interleaved with the default ones, and per I/O, with the sandbox on and off in alternating
rounds: a 4-byte REGION_READ round trip against ``example`` (every message passes the seccomp
filter three times: recvmsg, sendmsg, epoll) and NVMe 4 KiB random reads at queue depth 1 on a
page-cached file (C load loop, the server's CPU per I/O from /proc). ``--no-sandbox-cost``
skips this part.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import trio

from .common import (
    REPO,
    machine_line,
    median,
    pss_bytes,
    rss_bytes,
    running_server,
    server_argv,
    server_env,
    table,
)

# Block devices get a RAM disk so that the measurement does not depend on a file.
DEVICE_ARGS = {
    "nvme": ["--size", "64M"],
    "virtio-blk": ["--size", "64M"],
}


def _time_cmd(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=server_env(), cwd=REPO)
    return time.perf_counter() - t0


def available(devices: list[str]) -> list[str]:
    from vfu_server import registry

    ok = []
    for d in devices:
        try:
            registry.load(d)
        except registry.UnknownDevice as exc:
            print(f"(skipping {d}: {exc})")
            continue
        ok.append(d)
    return ok


def importtime(device: str) -> None:
    tmp = tempfile.mkdtemp(prefix="vfu-bench-")
    argv = [sys.executable, "-X", "importtime", *server_argv(device, os.path.join(tmp, "s"), *DEVICE_ARGS.get(device, []))[1:]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=server_env(), cwd=REPO)
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    rows = []
    for line in err.decode().splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            own, cum, name = line[len("import time:"):].split("|")
            rows.append((int(cum), int(own), name.rstrip()))
    print(f"{len(rows)} modules imported; the 25 slowest by cumulative time:")
    for cum, own, name in sorted(rows, reverse=True)[:25]:
        print(f"  {cum / 1000:8.1f} ms cumulative {own / 1000:7.1f} ms self  {name}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.footprint", description=__doc__.split("\n")[0])
    ap.add_argument("--starts", type=int, default=15)
    ap.add_argument("--devices", default="example,nvme,virtio-blk")
    ap.add_argument("--importtime", metavar="DEVICE")
    ap.add_argument("--no-sandbox-cost", action="store_true", help="skip what the sandbox costs")
    ap.add_argument("--rounds", type=int, default=3, help="sandbox on/off rounds of the per-I/O part")
    args = ap.parse_args(argv)
    if args.importtime:
        importtime(args.importtime)
        return
    print(machine_line())
    devices = available(args.devices.split(","))
    unconfined = [] if args.no_sandbox_cost else [f"{d} --sandbox off" for d in devices]
    starts: dict[str, list[float]] = {d: [] for d in ["python -c pass", "python -c 'import trio'", *devices,
                                                      *unconfined]}
    rss: dict[str, list[tuple[int, int | None]]] = {d: [] for d in devices}
    for _ in range(args.starts):
        starts["python -c pass"].append(_time_cmd([sys.executable, "-c", "pass"]))
        starts["python -c 'import trio'"].append(_time_cmd([sys.executable, "-c", "import trio"]))
        for d in devices:
            with running_server(d, *DEVICE_ARGS.get(d, [])) as srv:
                starts[d].append(srv.started_in)
                if len(rss[d]) < 3:
                    time.sleep(1.0)
                    rss[d].append((rss_bytes(srv.pid), pss_bytes(srv.pid)))
            if unconfined:
                with running_server(d, *DEVICE_ARGS.get(d, []), "--sandbox", "off") as srv:
                    starts[f"{d} --sandbox off"].append(srv.started_in)
    rows = []
    for name, ts in starts.items():
        r = rss.get(name)
        mem = median([x[0] for x in r]) / 2**20 if r else float("nan")
        pss = median([x[1] or 0 for x in r]) / 2**20 if r else float("nan")
        target = ""
        if r:
            ok = median(ts) < 0.3 and mem < 40
            target = "met" if ok else "MISSED"
        rows.append([name, median(ts) * 1000, max(ts) * 1000, mem, pss, target])
    print()
    print(table(f"Start-up and idle memory ({args.starts} starts each, interleaved)",
                ["process", "start median ms", "start max ms", "idle RSS MiB", "idle PSS MiB",
                 "target (<300 ms, <40 MiB)"], rows))
    if not args.no_sandbox_cost:
        sandbox_cost(devices, args.rounds)


def sandbox_cost(devices: list[str], rounds: int) -> None:
    """Per-I/O cost of the sandbox: the same measurements with it on and off, alternating."""
    from .devices import _available_drivers, nvme_jobs
    from .roundtrip import server_pingpong

    modes = {"on (default)": (), "off": ("--sandbox", "off")}
    lat: dict[str, list[float]] = {m: [] for m in modes}
    msg_cpu: dict[str, list[float]] = {m: [] for m in modes}
    iops: dict[str, list[float]] = {m: [] for m in modes}
    io_cpu: dict[str, list[float]] = {m: [] for m in modes}
    driver = _available_drivers(["c"])[0]
    job = [("4K randread QD1", "read", 4096, 1, True)]
    tmp = tempfile.mkdtemp(prefix="vfu-bench-")
    disk = os.path.join(tmp, "disk.raw")
    with open(disk, "wb") as f:
        f.write(os.urandom(64 << 20))
    lines = []
    try:
        for _ in range(rounds):
            for mode, extra in modes.items():
                with running_server("example", *extra) as srv:
                    lats, cpu = server_pingpong(srv.socket_path, srv.pid, 20000, 2000)
                    lat[mode].append(median(lats) / 1000)
                    msg_cpu[mode].append(cpu / 20000 * 1e6)
                    if not lines and mode.startswith("on"):
                        lines.append(srv.stderr_line("sandbox:"))
                if "nvme" in devices:
                    with running_server("nvme", "--backing", disk, *extra) as srv:
                        r = trio.run(nvme_jobs, srv.socket_path, srv.pid, 64 << 20, 1.0, job, True, driver)
                        res = r["4K randread QD1"]
                        iops[mode].append(res.iops)
                        io_cpu[mode].append(res.server_cpu / res.ios * 1e6)
    finally:
        os.unlink(disk)
        os.rmdir(tmp)
    rows = [[mode, median(lat[mode]), median(msg_cpu[mode]),
             median(iops[mode]) if iops[mode] else float("nan"),
             median(io_cpu[mode]) if io_cpu[mode] else float("nan")] for mode in modes]
    print()
    if lines and lines[0]:
        print(lines[0])
    print(table(f"What the sandbox costs per I/O (medians of {rounds} rounds, on and off alternating)",
                ["--sandbox", "REGION_READ round trip us", "server CPU us/message",
                 f"NVMe 4K randread QD1 IOPS ({driver} driver)", "server CPU us/IO"], rows))


if __name__ == "__main__":
    main()
