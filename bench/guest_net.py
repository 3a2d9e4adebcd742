"""In the guest: the project's virtio-net against QEMU's virtio-net-pci, same boot, TAP backends.

    .venv/bin/python -m bench.guest_net [--seconds 3] [--rounds 3] [--jobs tx,rx,rr]
                                        [--modes offloads,plain] [--variant 'LABEL=ARGS' ...]
                                        [--prefix vfun]                                  # as root

NICs in one boot, each on its own TAP interface, all TAPs moved into a network namespace of
the benchmark's own (nothing touches the host's network), compared in pairs:

* ours, ``vfu-server virtio-net --tap`` (checksum offload and TSO through the TAP's virtio-net
  headers), against QEMU's ``virtio-net-pci`` on a plain ``-netdev tap``: what users get by
  default from either (``--modes offloads``);
* ours with ``--no-offloads`` against QEMU's on ``-netdev tap,vnet_hdr=off``: without the
  virtio-net header on the TAP QEMU offers no offloads either, so this compares the devices'
  per-frame paths (``--modes plain``).

``--variant 'LABEL=ARGS'`` (repeatable) adds one NIC of ours per mode with these server options,
in the same boot; ``ARGS`` may start with ``@DIR`` (run that variant's server from another
checkout, e.g. ``git worktree add DIR COMMIT``: a lever against the tree before it, in one
boot), then ``python:INTERPRETER`` and ``NAME=VALUE`` environment settings, as for
``bench.guest``. Without variants there is one NIC of ours per mode, with the defaults.

Jobs (``bench/netload.c`` in the guest, built static on the host; a Python sink, pusher and
echo server in the namespace): TCP from the guest to the namespace (``tx``) and from the
namespace to the guest (``rx``), 64 KiB writes; and ``rr``, one-byte requests and responses on
one TCP connection with TCP_NODELAY, one at a time (transactions per second, p50 latency);
``rr64k`` (not by default), the same with 64 KiB each way. Job
by job, every NIC first runs the job for ``--warmup`` seconds, uncounted: the first guest-to-host
runs after boot were 15-25% slower than the later ones whichever NIC ran them (the boot's
first bulk transfers pay one-time costs, not measured further), and with ours first in the
list that fell mostly on ours. Then every round takes the NICs in a rotated order, so that neither a
slow stretch of the host nor a NIC's place in the turn favours one of them. The guest prints a marker around each
run; the host, watching the serial console, reads the CPU time of our server (and of the QEMU
process, for every NIC) at the markers: CPU per MB moved (per turn for ``rr``). Around each run
the guest also reads what its driver counted for that NIC (``netload NAME counters``: packets,
the driver's kicks per queue, the interrupts per vector): kicks and interrupts per 1,000 frames
of each queue, and the transmitted frames' average size, for ours and QEMU's NIC alike. A NIC
that takes fewer frames per kick lets the guest's vCPU spend more of itself on exits. The host's
idle and stolen CPU time and the share of a CPU QEMU's vCPU thread got say whether a slow run
lacked host CPU.

Prints medians over rounds (and each run's range), ours first with the worst ratio to QEMU's
NIC alike on top, then QEMU's NICs.

Needs root (a network namespace, TAP interfaces) and iproute2; says so and stops otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .common import HZ, REPO, Variant, cpu_seconds, machine_line, median, table

JOBS = {"tx": "TCP guest -> host", "rx": "TCP host -> guest", "rr": "TCP 1-byte request/response",
        "rr64k": "TCP 64 KiB request/response"}
PORTS = {"tx": 5000, "rx": 6000, "rr": 7000, "rr64k": 7000}
#: request/response jobs and their message size: netload's ``rr`` with SIZE (transactions/s, p50)
RR_SIZES = {"rr": 1, "rr64k": 65536}


def netload_args(job: str, address: str, seconds: float) -> str:
    """netload's subcommand and arguments for ``job``."""
    size = RR_SIZES.get(job)
    command = "rr" if size else job
    return f"{command} {address} {PORTS[job]} {seconds:g}" + (f" {size}" if size and size > 1 else "")
MODES = ("offloads", "plain")
NAN = float("nan")


@dataclass
class Nic:
    key: str
    label: str
    mode: str  # offloads | plain
    net: int  # 10.NET.0.1 in the namespace, 10.NET.0.2 in the guest
    variant: Variant | None = None  # None: QEMU's virtio-net-pci
    pid: int | None = None  # our server, for CPU per MB

    @property
    def ours(self) -> bool:
        return self.variant is not None

    @property
    def mac(self) -> str:
        return f"52:54:00:ab:cd:{self.net:02x}"


def plan(variants: list[Variant], modes: list[str]) -> list[Nic]:
    """Ours (per variant and mode), then QEMU's per mode; subnets 10.81.0.0/24 on."""
    nics: list[Nic] = []
    for i, variant in enumerate(variants):
        for mode in modes:
            name = "ours" if len(variants) == 1 else f"ours{i}"
            what = "offloads (default)" if mode == "offloads" else "--no-offloads"
            label = f"ours, {what}" + (f", {variant.label}" if variant.label else "")
            nics.append(Nic(f"{name}-{mode}", label, mode, 0, variant))
    for mode in modes:
        label = ("QEMU virtio-net-pci, tap defaults (offloads)" if mode == "offloads"
                 else "QEMU virtio-net-pci, vnet_hdr=off (no offloads)")
        nics.append(Nic(f"qemu-{mode}", label, mode, 0))
    for n, nic in enumerate(nics):
        nic.net = 81 + n
    return nics


HELPER = r"""
import socket, sys, threading, time

def serve(addr, port, handle):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(4)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()

def drain(c):
    while c.recv(1 << 20):
        pass
    c.close()

def echo(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(4096)
        if not d:
            break
        c.sendall(d)
    c.close()

def push(addr):
    buf = b"\x5a" * 65536
    while True:
        try:
            c = socket.create_connection((addr, 6000), timeout=0.5)
        except OSError:
            time.sleep(0.02)
            continue
        c.settimeout(None)
        try:
            while True:
                c.sendall(buf)
        except OSError:
            pass
        c.close()

for a in sys.argv[1].split(","):
    threading.Thread(target=serve, args=(a, 5000, drain), daemon=True).start()
    threading.Thread(target=serve, args=(a, 7000, echo), daemon=True).start()
for a in sys.argv[2].split(","):
    threading.Thread(target=push, args=(a,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def guest_script(nics: list[Nic], jobs: list[str], seconds: float, rounds: int, warmup: float = 0) -> str:
    """The guest's part: find and address every NIC, then per job a warm-up run on every NIC
    (``warmup`` seconds, tagged ``@warm`` and not counted), then the rounds."""
    lines = [
        f"for i in $(seq 60); do [ $(ls /sys/class/net | wc -l) -ge {len(nics) + 1} ] && break; sleep 1; done",
        "iface_of() { for d in /sys/class/net/*; do [ \"$(cat $d/address)\" = \"$1\" ] && echo ${d##*/} && return; done; }",
    ]
    for i, nic in enumerate(nics):
        lines += [
            f"dev=$(iface_of {nic.mac}); [ -n \"$dev\" ] || {{ echo \"missing nic {nic.key}\"; exit 3; }}",
            f"dev{i}=$dev",
            f"ip link set $dev up && ip addr add 10.{nic.net}.0.2/24 dev $dev || exit 4",
            f"n=0; until ping -c 1 -W 1 10.{nic.net}.0.1 >/dev/null 2>&1; do n=$((n + 1)); "
            f"[ $n -gt 90 ] && {{ echo \"no link {nic.key}\"; exit 5; }}; done",
        ]
    for job in jobs:
        if warmup > 0:
            for nic in nics:
                address = f"10.{nic.net}.0.2" if job == "rx" else f"10.{nic.net}.0.1"
                lines.append(f"/usr/local/bin/netload {nic.key}/{job}@warm {netload_args(job, address, warmup)} "
                             f">/dev/null || echo \"netload failed {nic.key}/{job}@warm\"")
        for r in range(rounds):
            for nic in nics[r % len(nics):] + nics[: r % len(nics)]:
                address = f"10.{nic.net}.0.2" if job == "rx" else f"10.{nic.net}.0.1"
                tag = f"{nic.key}/{job}@{r}"
                count = f"/usr/local/bin/netload {tag} counters $dev{nics.index(nic)}"
                lines += [f"{count} start || echo \"netload failed {tag} counters\"",
                          f"echo mark start {tag}",
                          f"/usr/local/bin/netload {tag} {netload_args(job, address, seconds)} "
                          f"|| echo \"netload failed {tag}\"",
                          f"echo mark end {tag}",
                          f"{count} end || echo \"netload failed {tag} counters\""]
    return "\n".join(lines) + "\n"


@dataclass
class CpuWatch:
    """CPU seconds of our servers (by NIC key), of the QEMU process and of its vCPU thread, and
    the wall time, between the guest's ``mark start TAG`` and ``mark end TAG`` lines."""

    nics: dict[str, Nic]
    qemu_pid: int | None = None
    start: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: tag -> (server, QEMU process, QEMU's vCPU thread, wall), seconds
    spent: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    #: tag -> the host's CPU ticks (all CPUs) idle, stolen (by the hypervisor under this
    #: host, if it is a VM) and in all
    host: dict[str, tuple[int, int, int] | None] = field(default_factory=dict)
    _vcpu: str | None = None

    def _read(self, pid: int | None) -> float:
        try:
            return cpu_seconds(pid) if pid is not None else NAN
        except OSError:
            return NAN

    def vcpu_thread(self) -> str | None:
        """/proc/PID/task/TID of QEMU's (first) vCPU thread, "CPU 0/TCG" or "CPU 0/KVM"."""
        if self._vcpu is None and self.qemu_pid is not None:
            try:
                for tid in sorted(os.listdir(f"/proc/{self.qemu_pid}/task"), key=int):
                    with open(f"/proc/{self.qemu_pid}/task/{tid}/comm") as f:
                        if f.read().startswith("CPU 0/"):
                            self._vcpu = f"/proc/{self.qemu_pid}/task/{tid}"
                            break
            except OSError:
                pass
        return self._vcpu

    def _read_vcpu(self) -> float:
        task = self.vcpu_thread()
        if task is None:
            return NAN
        try:
            with open(f"{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return NAN
        return (int(fields[11]) + int(fields[12])) / HZ

    def __call__(self, line: str) -> None:
        if not line.startswith("mark "):
            return
        _, what, tag = [*line.split(), "", ""][:3]
        nic = self.nics.get(tag.partition("/")[0])
        if nic is None:
            return
        now = (self._read(nic.pid), self._read(self.qemu_pid), self._read_vcpu(), time.monotonic(), *host_ticks())
        if what == "start":
            self.start[tag] = now
        elif what == "end" and tag in self.start:
            d = [b - a for a, b in zip(self.start[tag], now, strict=True)]
            self.spent[tag] = (d[0], d[1], d[2], d[3])
            # a reading that failed (NaN) leaves the run's host shares unknown, not wrong
            self.host[tag] = None if any(math.isnan(x) for x in d[4:7]) else (int(d[4]), int(d[5]), int(d[6]))


def host_ticks(stat: str = "/proc/stat") -> tuple[float, float, float]:
    """The host's CPU ticks so far, all CPUs: idle (iowait included), stolen, in all (NaN
    each if ``stat`` cannot be read)."""
    try:
        with open(stat) as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return (NAN, NAN, NAN)
    v += [0] * (8 - len(v))
    return v[3] + v[4], v[7], sum(v)


#: what the guest's driver did per run (:func:`driver_counts`)
COUNTS = ("host_idle", "host_steal", "vcpu_pct", "guest_busy", "tx_kb", "tx_kicks", "tx_irqs", "rx_kicks", "rx_irqs")
FIELDS = ("value", "p50_us", "server_cpu", "qemu_cpu", *COUNTS)
_QUEUE_KICKS = re.compile(r"(rx|tx)(?:\d+|_queue_\d+)_kicks")  # rx0_kicks; tx_queue_0_kicks before Linux 6.10
_VECTOR = re.compile(r"irq_(input|output)\.\d+")


def counter_deltas(output: str) -> dict[str, dict[str, int]]:
    """Per run tag: what each of the driver's counters (``netcounters`` lines) rose by between
    the ``at=start`` and the ``at=end`` reading. Runs without both readings are left out."""
    readings: dict[str, dict[str, dict[str, int]]] = {}
    for line in output.splitlines():
        if not line.startswith("netcounters name="):
            continue
        kv = dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)
        tag, at = kv.pop("name", ""), kv.pop("at", "")
        values = {k: int(v) for k, v in kv.items() if v.isascii() and v.isdigit()}
        readings.setdefault(tag, {})[at] = values
    deltas = {}
    for tag, at in readings.items():
        if "start" in at and "end" in at:
            deltas[tag] = {k: at["end"][k] - v for k, v in at["start"].items() if k in at["end"]}
    return deltas


def driver_counts(delta: dict[str, int]) -> dict[str, float]:
    """From one run's counter deltas: the share of the guest's CPU time it was busy (%; a
    guest at 100 cannot go faster, one below waits for the NIC), the transmitted frames'
    average size (KiB; a TSO frame is up to 64), and per queue its kicks and its vector's
    interrupts per 1,000 of its frames."""
    sums = {"tx_kicks": 0, "rx_kicks": 0, "tx_irqs": 0, "rx_irqs": 0}
    seen = set()
    for name, value in delta.items():
        if m := _QUEUE_KICKS.fullmatch(name):
            sums[f"{m[1]}_kicks"] += value
            seen.add(f"{m[1]}_kicks")
        elif m := _VECTOR.fullmatch(name):
            which = "tx" if m[1] == "output" else "rx"
            sums[f"{which}_irqs"] += value
            seen.add(f"{which}_irqs")
    frames = {"tx": delta.get("sys_tx_packets", 0), "rx": delta.get("sys_rx_packets", 0)}
    out = {k: sums[k] * 1000 / frames[k[:2]] if k in seen and frames[k[:2]] > 0 else NAN for k in sums}
    out["tx_kb"] = delta.get("sys_tx_bytes", 0) / frames["tx"] / 1024 if frames["tx"] > 0 else NAN
    ticks = delta.get("cpu_busy", 0) + delta.get("cpu_idle", 0)
    out["guest_busy"] = 100 * delta.get("cpu_busy", 0) / ticks if ticks > 0 else NAN
    return out


def host_shares(ticks: tuple[int, int, int] | None) -> dict[str, float]:
    """The host's idle and stolen time during a run, in % of all its CPUs' time."""
    if not ticks or ticks[2] <= 0:
        return {"host_idle": NAN, "host_steal": NAN}
    return {"host_idle": 100 * ticks[0] / ticks[2], "host_steal": 100 * ticks[1] / ticks[2]}


def parse(output: str, watch: CpuWatch | None = None) -> dict[tuple[str, str], dict[str, object]]:
    """Per (NIC key, job): medians over rounds of the value (Mbit/s; transactions/s for rr),
    rr's p50 latency, CPU per MB moved (per transaction for rr) of our server and of the
    QEMU process, the host's idle and stolen shares, the share of a CPU QEMU's vCPU thread
    had, and the guest driver's counts
    (:func:`driver_counts`); ``runs`` holds every round's value."""
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    deltas = counter_deltas(output)
    for line in output.splitlines():
        if not line.startswith("netload name="):
            continue
        kv = dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)
        tag = kv.get("name", "")
        key, _, rest = tag.partition("/")
        job = rest.partition("@")[0]
        try:  # a line the serial console garbled or cut is left out, not fatal to the report
            nbytes = float(kv["bytes"])
            value = float(kv["tps"]) if job in RR_SIZES else float(kv["mbps"])
            p50 = float(kv.get("p50_us", NAN))
        except (KeyError, ValueError):
            continue
        units = nbytes / (2 * RR_SIZES[job]) if job in RR_SIZES else nbytes / 1e6  # transactions, or MB
        server, qemu, vcpu, wall = watch.spent.get(tag, (NAN,) * 4) if watch else (NAN,) * 4
        runs.setdefault((key, job), []).append({
            "value": value,
            "p50_us": p50,
            "server_cpu": server * 1e6 / units if units else NAN,
            "qemu_cpu": qemu * 1e6 / units if units else NAN,
            **(driver_counts(deltas[tag]) if tag in deltas else dict.fromkeys(COUNTS, NAN)),
            "vcpu_pct": 100 * vcpu / wall if wall > 0 else NAN,
            **host_shares(watch.host.get(tag) if watch else None),
        })
    out: dict[tuple[str, str], dict[str, object]] = {}
    for k, rs in runs.items():
        out[k] = {f: median([r[f] for r in rs]) for f in FIELDS}
        out[k]["runs"] = [r["value"] for r in rs]
    return out


def _range(values: object) -> str:
    if not isinstance(values, list) or not values:
        return "n/a"
    fmt = (lambda v: f"{v:,.0f}") if max(values) >= 100 else (lambda v: f"{v:.1f}")
    return f"{fmt(min(values))}-{fmt(max(values))}" if len(values) > 1 else fmt(values[0])


def report(found: dict[tuple[str, str], dict[str, object]], nics: list[Nic], jobs: list[str],
           title: str) -> str:
    none: dict[str, object] = dict.fromkeys(FIELDS, NAN)
    qemu = {nic.mode: nic for nic in nics if not nic.ours}
    rows = []
    for nic in (n for n in nics if n.ours):
        for job in jobs:
            a = found.get((nic.key, job), none)
            b = found.get((qemu[nic.mode].key, job), none) if nic.mode in qemu else none
            ratio = a["value"] / b["value"] if b["value"] else NAN  # type: ignore[operator]
            rows.append([nic.label, JOBS[job], a["value"], _range(a.get("runs")), a["p50_us"], a["server_cpu"],
                         a["qemu_cpu"], ratio])
    rows.sort(key=lambda r: r[-1] if r[-1] == r[-1] else 99)
    unit = "Mbit/s (rr: turns/s)"
    cpu = "CPU us/MB (rr: /turn)"
    text = table(title + ": ours, worst ratio first",
                 ["NIC", "job", unit, "each round", "rr p50 us", "server " + cpu, "QEMU process " + cpu,
                  "ours / QEMU alike"], rows)
    peer_rows = []
    for nic in (n for n in nics if not n.ours):
        for job in jobs:
            p = found.get((nic.key, job), none)
            peer_rows.append([nic.label, JOBS[job], p["value"], _range(p.get("runs")), p["p50_us"], p["qemu_cpu"]])
    text += "\n" + table(title + ": QEMU's NICs", ["NIC", "job", unit, "each round", "rr p50 us",
                                                    "QEMU process " + cpu], peer_rows)
    count_rows = []
    for job in jobs:
        for nic in nics:
            c = found.get((nic.key, job), none)
            count_rows.append([nic.label, JOBS[job], c["value"], c["server_cpu"], c["qemu_cpu"],
                               *(c[k] for k in COUNTS)])
    return text + "\n" + table(
        title + ": what the guest's driver did, per 1,000 frames of each queue (medians)",
        ["NIC", "job", unit, "server " + cpu, "QEMU process " + cpu, "host idle %", "host steal %",
         "QEMU vCPU thread % of a CPU",
         "guest CPU busy %",
         "KiB per sent frame", "tx kicks",
         "tx interrupts", "rx kicks", "rx interrupts"], count_rows)


def find_process(*, arg: str | None = None, substring: str | None = None) -> int | None:
    """The pid of a process with ``arg`` as one of its arguments, or ``substring`` in one."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if (arg is not None and arg in args) or (substring is not None and any(substring in a for a in args)):
            return int(entry)
    return None


class Namespace:
    """A network namespace holding the TAPs (moved in as they appear) and the host helper."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.helper: subprocess.Popen[str] | None = None
        self.error: str | None = None
        _ip("netns", "add", self.name)

    def adopt(self, taps: list[tuple[str, int]], timeout: float = 120.0) -> None:
        """Wait for each TAP, move it in, address it, then start the sink, pusher and echo."""
        try:
            deadline = time.monotonic() + timeout
            for tap, net in taps:
                while not Path(f"/sys/class/net/{tap}").exists():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"TAP {tap} never appeared")
                    time.sleep(0.05)
                _ip("link", "set", tap, "netns", self.name)
                _ip("-n", self.name, "addr", "add", f"10.{net}.0.1/24", "dev", tap)
                _ip("-n", self.name, "link", "set", tap, "up")
            hosts = ",".join(f"10.{net}.0.1" for _, net in taps)
            guests = ",".join(f"10.{net}.0.2" for _, net in taps)
            self.helper = subprocess.Popen(["ip", "netns", "exec", self.name, sys.executable, "-c", HELPER,
                                            hosts, guests], stdout=subprocess.PIPE, text=True)
        except Exception as exc:  # the guest script then reports "no link"
            self.error = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        if self.helper is not None:
            self.helper.kill()
            self.helper.wait()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def parse_modes(text: str) -> list[str]:
    """``--modes``: a comma-separated list of MODES, or ``both``; [] for anything else."""
    modes = list(MODES) if text == "both" else [m for m in text.split(",") if m]
    return modes if modes and all(m in MODES for m in modes) else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.guest_net", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3, help="runs of every job per NIC, in rotating order; medians")
    ap.add_argument("--jobs", default="tx,rx,rr", help="comma-separated: tx, rx, rr, rr64k")
    ap.add_argument("--warmup", type=float, default=2.0, metavar="SECONDS",
                    help="before a job's rounds, run it this long on every NIC, uncounted (0: no warm-up)")
    ap.add_argument("--modes", default="both",
                    help="offloads (ours and QEMU's with TAP offloads), plain (both without), or both")
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--server-args", default="", metavar="ARGS",
                    help="extra options of every server of ours, e.g. '--poll-us 1000'")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                    help="a NIC of ours per mode with these server options ([@DIR] [python:PY] [NAME=VALUE ...] "
                         "OPTIONS), in the same boot; repeatable")
    ap.add_argument("--prefix", default="vfun", help="of the TAP and namespace names (up to 5 characters)")
    args = ap.parse_args(argv)
    jobs = [j for j in args.jobs.split(",") if j]
    modes = parse_modes(args.modes)
    if not jobs or any(j not in JOBS for j in jobs):
        ap.error(f"--jobs {args.jobs!r}: expected some of {', '.join(JOBS)}")
    if not modes:
        ap.error(f"--modes {args.modes!r}: expected offloads, plain, both or offloads,plain")
    if not 1 <= len(args.prefix) <= 5 or not args.prefix.isalnum():
        ap.error("--prefix: 1 to 5 letters or digits (a TAP name has at most 15 characters)")
    try:
        variants = [Variant.parse(v) for v in args.variant] or [Variant()]
    except ValueError as exc:
        ap.error(str(exc))
    if os.geteuid() != 0 or not shutil.which("ip") or not os.path.exists("/dev/net/tun"):
        print("bench.guest_net needs root, iproute2 and /dev/net/tun (a network namespace and TAP interfaces)",
              file=sys.stderr)
        return 1
    from vfu_guest.initramfs import OUTPUT_PREFIX
    from vfu_guest.runner import VfuDevice, builtin_virtio_net, qemu_accel, run_guest

    print(machine_line() + f", guest accel {qemu_accel()}, 1 vCPU")
    nics = plan(variants, modes)
    tag = uuid.uuid4().hex[:6]
    taps = {nic.key: f"{args.prefix}{tag}{i}" for i, nic in enumerate(nics)}
    tmp = Path(tempfile.mkdtemp(prefix="vfu-bench-net-"))
    ns = Namespace(f"{args.prefix}-bench-{tag}")
    watch = CpuWatch({nic.key: nic for nic in nics})
    try:
        netload = tmp / "netload"
        subprocess.run(["gcc", "-static", "-O2", "-o", str(netload), str(REPO / "bench" / "netload.c")], check=True)
        extra = args.server_args.split()
        devices: list = []
        for nic in nics:
            tap = taps[nic.key]
            if nic.variant is not None:
                v = nic.variant
                devices.append(VfuDevice("virtio-net", ["--tap", tap, "--mac", nic.mac,
                                                        *(["--no-offloads"] if nic.mode == "plain" else []),
                                                        *extra, *v.args],
                                         env=dict(v.env) or None, cwd=v.checkout or str(REPO), python=v.python))
            else:
                hdr = ",vnet_hdr=off" if nic.mode == "plain" else ""
                devices.append(builtin_virtio_net(f"tap,ifname={tap},script=no,downscript=no{hdr}", mac=nic.mac))

        def on_line(line: str) -> None:
            line = line.removeprefix(OUTPUT_PREFIX)
            if line.startswith("mark ") and watch.qemu_pid is None:
                # started by the runner before QEMU printed anything; the TAP names are this run's
                for nic in nics:
                    if nic.ours:
                        nic.pid = find_process(arg=taps[nic.key])
                watch.qemu_pid = find_process(substring=f"ifname={taps[nics[-1].key]},")
            watch(line)

        mover = threading.Thread(target=ns.adopt, args=([(taps[nic.key], nic.net) for nic in nics],), daemon=True)
        mover.start()
        result = run_guest(guest_script(nics, jobs, args.seconds, args.rounds, args.warmup), devices, memory_mib=args.memory,
                           timeout=args.timeout, extra_files={"/usr/local/bin/netload": netload}, check=False,
                           watch=on_line)
    finally:
        ns.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if os.environ.get("VFU_BENCH_DEBUG") or result.rc != 0:
        print(result.output)
    if ns.error:
        print("namespace setup:", ns.error)
    for nic, v in ((n, n.variant) for n in nics if n.ours):
        assert v is not None
        where = f" from {v.checkout}" if v.checkout else ""
        print(f"{nic.key}: {nic.label}{where}, server options {' '.join([*extra, *v.args]) or '(defaults)'}")
    print()
    rounds = f", median of {args.rounds} rounds in rotating order" if args.rounds > 1 else ""
    print(report(parse(result.output, watch), nics, jobs,
                 f"virtio-net in the guest (QEMU 11.1, one boot, TAP in a namespace, {args.seconds:g} s per job{rounds})"))
    failed = [line for line in result.output.splitlines() if line.startswith(("netload failed", "missing", "no link"))]
    if failed:
        print("problems:", *failed, sep="\n  ")
    print(f"guest run took {result.duration:.0f} s")
    return 0 if result.rc == 0 and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
