"""In the guest: the project's virtio-net against QEMU's virtio-net-pci, same boot, TAP backends.

    .venv/bin/python -m bench.guest_net [--seconds 3] [--rounds 2]      # as root

Four NICs in one boot, each on its own TAP interface, all four TAPs moved into a network
namespace of the benchmark's own (nothing touches the host's network), compared in pairs:

* ours, ``vfu-server virtio-net --tap`` (checksum offload and TSO through the TAP's virtio-net
  headers), against QEMU's ``virtio-net-pci`` on a plain ``-netdev tap``: what users get by
  default from either (QEMU also offers mergeable receive buffers);
* ours with ``--no-offloads`` against QEMU's on ``-netdev tap,vnet_hdr=off``: without the
  virtio-net header on the TAP QEMU offers no offloads either, so this compares the devices'
  per-frame paths.

Jobs, NIC after NIC and round after round so that a slow stretch of the host hits all alike:
TCP from the guest to the namespace (``tx``) and from the namespace to the guest (``rx``), 64
KiB writes, ``bench/netload.c`` in the guest (built static on the host) and a Python sink and
pusher in the namespace. Prints Mbit/s (medians over rounds) and ours / QEMU.

Needs root (a network namespace, TAP interfaces) and iproute2; says so and stops otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from .common import REPO, machine_line, median, table

# key, label, guest MAC, subnet (10.N.0.1 in the namespace, 10.N.0.2 in the guest)
NICS = [
    ("ours", "ours, offloads (default)", "52:54:00:ab:cd:01", 81),
    ("ours-plain", "ours, --no-offloads", "52:54:00:ab:cd:04", 84),
    ("qemu-offload", "QEMU virtio-net-pci, tap defaults (offloads)", "52:54:00:ab:cd:03", 83),
    ("qemu-plain", "QEMU virtio-net-pci, vnet_hdr=off (no offloads)", "52:54:00:ab:cd:02", 82),
]
#: which of QEMU's NICs each of ours is compared with
COUNTERPART = {"ours": "qemu-offload", "ours-plain": "qemu-plain"}
JOBS = [("tx", "TCP guest -> host"), ("rx", "TCP host -> guest")]

HELPER = r"""
import socket, sys, threading, time

def drain(c):
    while c.recv(1 << 20):
        pass
    c.close()

def sink(addr):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, 5000))
    ls.listen(4)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=drain, args=(c,), daemon=True).start()

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
    threading.Thread(target=sink, args=(a,), daemon=True).start()
for a in sys.argv[2].split(","):
    threading.Thread(target=push, args=(a,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def guest_script(seconds: float, rounds: int) -> str:
    lines = [
        f"for i in $(seq 60); do [ $(ls /sys/class/net | wc -l) -ge {len(NICS) + 1} ] && break; sleep 1; done",
        "iface_of() { for d in /sys/class/net/*; do [ \"$(cat $d/address)\" = \"$1\" ] && echo ${d##*/} && return; done; }",
    ]
    for key, _label, mac, net in NICS:
        lines += [
            f"dev=$(iface_of {mac}); [ -n \"$dev\" ] || {{ echo \"missing nic {key}\"; exit 3; }}",
            f"ip link set $dev up && ip addr add 10.{net}.0.2/24 dev $dev || exit 4",
            f"n=0; until ping -c 1 -W 1 10.{net}.0.1 >/dev/null 2>&1; do n=$((n + 1)); "
            f"[ $n -gt 90 ] && {{ echo \"no link {key}\"; exit 5; }}; done",
        ]
    for _ in range(rounds):
        for job, _label in JOBS:
            for key, _label2, _mac, net in NICS:
                address = f"10.{net}.0.1" if job == "tx" else f"10.{net}.0.2"
                port = 5000 if job == "tx" else 6000
                lines.append(f"/usr/local/bin/netload {key}/{job} {job} {address} {port} {seconds:g} "
                             f"|| echo \"netload failed {key}/{job}\"")
    return "\n".join(lines) + "\n"


def parse(output: str) -> dict[tuple[str, str], float]:
    """Median Mbit/s per (NIC key, job) over the rounds."""
    runs: dict[tuple[str, str], list[float]] = {}
    for line in output.splitlines():
        if line.startswith("netload name="):
            kv = dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)
            key, _, job = kv["name"].partition("/")
            runs.setdefault((key, job), []).append(float(kv["mbps"]))
    return {k: median(v) for k, v in runs.items()}


class Namespace:
    """A network namespace holding the TAPs (moved in as they appear) and the host helper."""

    def __init__(self, tag: str) -> None:
        self.name = f"vfu-bench-{tag}"
        self.helper: subprocess.Popen[str] | None = None
        self.error: str | None = None
        _ip("netns", "add", self.name)

    def adopt(self, taps: list[tuple[str, int]], timeout: float = 120.0) -> None:
        """Wait for each TAP, move it in, address it, then start the sink and pusher."""
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
            sinks = ",".join(f"10.{net}.0.1" for _, net in taps)
            guests = ",".join(f"10.{net}.0.2" for _, net in taps)
            self.helper = subprocess.Popen(["ip", "netns", "exec", self.name, sys.executable, "-c", HELPER,
                                            sinks, guests], stdout=subprocess.PIPE, text=True)
        except Exception as exc:  # the guest script then reports "no link"
            self.error = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        if self.helper is not None:
            self.helper.kill()
            self.helper.wait()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.guest_net", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--server-args", default="", metavar="ARGS", help="extra options of our server, e.g. '--poll-us 1000'")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("ip") or not os.path.exists("/dev/net/tun"):
        print("bench.guest_net needs root, iproute2 and /dev/net/tun (a network namespace and TAP interfaces)",
              file=sys.stderr)
        return 1
    from vfu_guest.runner import VfuDevice, builtin_virtio_net, qemu_accel, run_guest

    print(machine_line() + f", guest accel {qemu_accel()}, 1 vCPU")
    tag = uuid.uuid4().hex[:6]
    taps = {key: f"vfun{tag}{i}" for i, (key, *_rest) in enumerate(NICS)}
    tmp = Path(tempfile.mkdtemp(prefix="vfu-bench-net-"))
    ns = Namespace(tag)
    try:
        netload = tmp / "netload"
        subprocess.run(["gcc", "-static", "-O2", "-o", str(netload), str(REPO / "bench" / "netload.c")], check=True)
        mac = {key: m for key, _l, m, _n in NICS}
        extra = args.server_args.split()
        devices = [
            VfuDevice("virtio-net", ["--tap", taps["ours"], "--mac", mac["ours"], *extra], cwd=str(REPO)),
            VfuDevice("virtio-net", ["--tap", taps["ours-plain"], "--mac", mac["ours-plain"], "--no-offloads", *extra],
                      cwd=str(REPO)),
            builtin_virtio_net(f"tap,ifname={taps['qemu-offload']},script=no,downscript=no", mac=mac["qemu-offload"]),
            builtin_virtio_net(f"tap,ifname={taps['qemu-plain']},script=no,downscript=no,vnet_hdr=off",
                               mac=mac["qemu-plain"]),
        ]
        mover = threading.Thread(target=ns.adopt, args=([(taps[key], net) for key, _l, _m, net in NICS],),
                                 daemon=True)
        mover.start()
        result = run_guest(guest_script(args.seconds, args.rounds), devices, memory_mib=args.memory,
                           timeout=args.timeout, extra_files={"/usr/local/bin/netload": netload}, check=False)
    finally:
        ns.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if os.environ.get("VFU_BENCH_DEBUG") or result.rc != 0:
        print(result.output)
    if ns.error:
        print("namespace setup:", ns.error)
    found = parse(result.output)
    rows = []
    nan = float("nan")
    for job, job_label in JOBS:
        for key, label, _mac, _net in NICS:
            mbps = found.get((key, job), nan)
            theirs = found.get((COUNTERPART.get(key, ""), job), nan)
            rows.append([label, job_label, mbps, mbps / theirs if key in COUNTERPART and theirs else nan])
    print()
    rounds = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
    print(table(f"virtio-net in the guest (QEMU 11.1, one boot, TAP in a namespace, {args.seconds:g} s per job{rounds})",
                ["NIC", "job", "Mbit/s", "ours / QEMU alike"], rows))
    failed = [line for line in result.output.splitlines() if line.startswith(("netload failed", "missing", "no link"))]
    if failed:
        print("problems:", *failed, sep="\n  ")
    print(f"guest run took {result.duration:.0f} s")
    return 0 if result.rc == 0 and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
