"""``bench.guest`` with fio (the default load): ours against every peer in one boot.

Disks in the one boot, each on its own image of a distinct size so that the guest can tell them
apart:

* ours: the project's NVMe and virtio-blk (one pair per ``--variant``);
* QEMU's ``nvme`` and ``virtio-blk-pci`` (in QEMU's process, its default ``aio=threads``);
* qemu-storage-daemon's vhost-user-blk export of a raw file (the out-of-process virtio-blk a
  user would pick today; qemu-utils of the kit's QEMU, :mod:`vfu_guest.tools`);
* the ceiling: QEMU's ``virtio-blk-pci`` on ``null-co`` (no storage): how many I/Os the guest
  itself can issue under TCG.

Every job runs on every disk, round after round, the disks in rotating order (round r starts
at disk r), so that a slow or fast stretch of the host and the place in the turn hit every disk
alike; the tables show medians. fio (Debian's, with its library closure) runs with
``--direct=1 --ioengine=libaio`` and reports IOPS, MB/s and percentiles of the latency from
submission to completion (``--lat_percentiles``: with QEMU's own devices the work happens
during the doorbell write, inside ``io_submit``, so fio's completion latency alone would make
them look ten times quicker than they are), reads for a read or mixed job, writes for a write
job; a write+fsync job's latency excludes the fsync. Around each run the guest prints a marker; the host, watching the serial console,
reads ``/proc/PID/stat`` of each out-of-process server (ours, qemu-storage-daemon) at both
markers: server CPU per I/O.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .common import REPO, Variant, cpu_seconds, machine_line, median, table

KiB, MiB = 1024, 1024 * 1024
#: name, fio rw, block size, iodepth, numjobs, extra fio options
JOBS: list[tuple[str, str, int, int, int, tuple[str, ...]]] = [
    ("4K randread QD1", "randread", 4 * KiB, 1, 1, ()),
    ("4K randread QD32", "randread", 4 * KiB, 32, 1, ()),
    ("4K randwrite QD1", "randwrite", 4 * KiB, 1, 1, ()),
    ("4K randwrite QD32", "randwrite", 4 * KiB, 32, 1, ()),
    ("4K randread 16 jobs QD1", "randread", 4 * KiB, 1, 16, ()),
    ("4K randrw 70-30 QD8", "randrw", 4 * KiB, 8, 1, ("--rwmixread=70",)),
    ("4K randwrite+fsync QD1", "randwrite", 4 * KiB, 1, 1, ("--fsync=1",)),
    ("128K seqread QD1", "read", 128 * KiB, 1, 1, ()),
    ("128K seqwrite QD1", "write", 128 * KiB, 1, 1, ()),
    ("1M seqread QD1", "read", MiB, 1, 1, ()),
    ("1M seqwrite QD1", "write", MiB, 1, 1, ()),
]
FIELDS = ("iops", "mbps", "p50", "p99", "cpu_us")
NAN = float("nan")


class Disk:
    """One disk of the boot: key (guest-side name), kind, which device it is compared as."""

    def __init__(self, key: str, label: str, family: str, ours: bool = False) -> None:
        self.key, self.label, self.family, self.ours = key, label, family, ours
        self.pid: int | None = None  # the out-of-process server, for CPU per I/O


def guest_script(sizes: dict[str, int], jobs: list[tuple], seconds: float, rounds: int) -> str:
    lines = [
        f"for i in $(seq 30); do [ $(ls -d /sys/block/nvme*n1 /sys/block/vd* 2>/dev/null | wc -l) -ge {len(sizes)} ] "
        "&& break; sleep 1; done",
        "find_disk() { for d in /sys/block/nvme*n1 /sys/block/vd*; do "
        "[ \"$(cat $d/size 2>/dev/null)\" = \"$1\" ] && echo /dev/${d##*/} && return; done; }",
        "fio --version || { echo 'fio does not run'; exit 3; }",
        "cd /tmp",  # fio leaves its hooks' output files in the working directory
    ]
    for key, sectors in sizes.items():
        var = key.replace("-", "_")
        lines.append(f'{var}=$(find_disk {sectors}); echo "disk {key} $' + "{" + var + "}\"")
        lines.append(f'[ -n "${var}" ] || {{ echo "missing disk {key}"; exit 3; }}')
        # "write through" means the guest sends no FLUSH: a write+fsync job would then be plain
        # writes. qemu-storage-daemon's vhost-user-blk export starts with its config's write
        # cache off but lets the guest turn it on (VIRTIO_BLK_F_CONFIG_WCE: cache_type is
        # writable), and does not fdatasync per write meanwhile (4,000 fsync'd writes per second
        # there, above the null-co ceiling's write plus empty flush). Every disk is set to
        # "write back", as QEMU's and ours start, so that every fsync is a FLUSH that reaches
        # the host file, on every disk alike.
        lines.append(f'ct=/sys/block/${{{var}#/dev/}}/cache_type; if [ -w $ct ] && [ "$(cat $ct)" = "write through" ]; '
                     'then { echo "write back" > $ct; } 2>/dev/null || true; fi')
        lines.append(f'q=/sys/block/${{{var}#/dev/}}/queue; echo "queue {key} write_cache=\'$(cat $q/write_cache)\' '
                     f'max_sectors_kb=$(cat $q/max_sectors_kb) max_segments=$(cat $q/max_segments)"')
    keys = list(sizes)
    for name, rw, bs, qd, numjobs, extra in jobs:
        for r in range(rounds):
            # One fio per job and round, the disks one after another (stonewall): fio's start
            # (60 shared objects under TCG) cost ~1 s per run. Markers for the host's CPU
            # readings go straight to the serial port, around each disk's part.
            opts = ["--direct=1", "--ioengine=libaio", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
                    f"--numjobs={numjobs}", "--thread", "--group_reporting", "--time_based",
                    f"--runtime={seconds:g}", "--norandommap", "--randrepeat=0", "--lat_percentiles=1", "--percentile_list=50:99",
                    "--output-format=terse", "--terse-version=3", *extra]
            for key in keys[r % len(keys):] + keys[: r % len(keys)]:
                # fio writes each hook's output to NAME.prerun.txt: no "/" in a name
                tag = f"{key}@{name.replace(' ', '_')}@{r}"
                opts += [f"--name={tag}", f"--filename=${key.replace('-', '_')}", "--stonewall",
                         f"--exec_prerun='echo mark start {tag} | tee /dev/ttyS0'",  # fio sends stdout to a file
                         f"--exec_postrun='echo mark end {tag} | tee /dev/ttyS0'"]
            lines.append(f'fio {" ".join(opts)} || echo "fio failed {name}"')
    return "\n".join(lines) + "\n"


def parse_terse(line: str, bs: int) -> dict[str, float] | None:
    """One fio terse (v3) line: iops, mbps, p50/p99 latency (us; of completion, or with
    ``--lat_percentiles`` from submission to completion) and the I/O count.
    Latency percentiles are the read side's when there were reads, else the write side's."""
    f = line.split(";")
    pct = [i for i, v in enumerate(f) if "%=" in v]
    if len(f) < 50 or f[0] != "3" or len(pct) < 40:
        return None
    rd, wr = pct[0], pct[20]  # each side: kb, bw, iops, runtime, slat x4, clat x4, then percentiles

    def side(first_pct: int) -> tuple[float, float, float, dict[str, float]]:
        kb, bw, iops = (float(x) for x in f[first_pct - 12 : first_pct - 9])
        p = {}
        for v in f[first_pct : first_pct + 20]:
            k, _, val = v.partition("%=")
            p[k] = float(val)
        return kb, bw, iops, p

    rkb, rbw, riops, rp = side(rd)
    wkb, wbw, wiops, wp = side(wr)
    p = rp if rkb else wp
    return {"iops": riops + wiops, "mbps": (rbw + wbw) * 1024 / 1e6, "p50": p.get("50.000000", NAN),
            "p99": p.get("99.000000", NAN), "ios": (rkb + wkb) * 1024 / bs}


class CpuWatch:
    """Server CPU seconds between the guest's first ``mark start TAG`` and last ``mark end TAG``
    (fio runs a hook once per thread of a job)."""

    def __init__(self, disks: dict[str, Disk]) -> None:
        self.disks = disks
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def __call__(self, line: str) -> None:
        if not line.startswith("mark "):
            return
        _, what, tag = [*line.split(), "", ""][:3]
        disk = self.disks.get(tag.partition("@")[0])
        if disk is None or disk.pid is None:
            return
        try:
            now = cpu_seconds(disk.pid)
        except OSError:
            return
        if what == "start":
            self.first.setdefault(tag, now)
        elif what == "end":
            self.last[tag] = now

    def spent(self, tag: str) -> float:
        if tag in self.first and tag in self.last:
            return self.last[tag] - self.first[tag]
        return NAN


def find_server(marker: str) -> int | None:
    """The pid of the process whose command line contains ``marker`` (argument-wise)."""
    want = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if want in args:
            return int(entry)
    return None


def start_storage_daemon(image: Path, sock: Path) -> subprocess.Popen[bytes]:
    from vfu_guest.tools import storage_daemon

    qsd = storage_daemon(log=True)
    # As QEMU's own -drive: a raw file, page cache on, aio=threads.
    proc = subprocess.Popen([*qsd.argv, "--blockdev", f"driver=file,node-name=f0,filename={image}",
                             "--blockdev", "driver=raw,node-name=d0,file=f0",
                             "--export", f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,"
                                         f"addr.path={sock},writable=on,num-queues=1"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr and proc.poll() is not None else ""
            proc.kill()
            raise RuntimeError(f"qemu-storage-daemon did not start: {err.strip()[:300]}")
        time.sleep(0.05)
    return proc


def run(args: argparse.Namespace, variants: list[Variant], kinds: list[str],
        warn: Callable[[str], None] = print) -> None:
    from vfu_guest.initramfs import OUTPUT_PREFIX
    from vfu_guest.runner import (
        QemuDevice,
        VfuDevice,
        builtin_nvme,
        builtin_virtio_blk,
        qemu_accel,
        run_guest,
    )
    from vfu_guest.tools import fio_files

    jobs = [j for j in JOBS if not args.jobs or j[0] in args.jobs.split(",")]
    print(machine_line() + f", guest accel {qemu_accel()}, 1 vCPU, load: fio")
    tmp = Path(tempfile.mkdtemp(prefix="vfu-bench-fio-"))
    qsd: subprocess.Popen[bytes] | None = None
    disks: dict[str, Disk] = {}
    devices: list[VfuDevice | QemuDevice] = []
    sizes: dict[str, int] = {}
    try:
        extra = {k: str(v) for k, v in fio_files(log=True).items()}
        plan: list[tuple[str, str, str, Variant | None]] = []
        for kind in kinds:
            for i, variant in enumerate(variants):
                key = f"vfu-{kind}" if len(variants) == 1 else f"vfu-{kind}-{i}"
                plan.append((key, "vfu", kind, variant))
        if "nvme" in kinds:
            plan.append(("qemu-nvme", "qemu", "nvme", None))
        if "virtio-blk" in kinds:
            plan += [("qemu-virtio-blk", "qemu", "virtio-blk", None), ("qsd-vhost-user-blk", "qsd", "virtio-blk", None)]
        plan.append(("ceiling-null", "null", "virtio-blk", None))
        for i, (key, where, kind, variant) in enumerate(plan):
            mib = args.size + i
            sizes[key] = mib * 2048
            label = {"vfu": f"ours ({variant.label})" if variant and variant.label else "ours",
                     "qemu": "QEMU nvme" if kind == "nvme" else "QEMU virtio-blk-pci",
                     "qsd": "qemu-storage-daemon vhost-user-blk", "null": "ceiling: virtio-blk-pci null-co"}[where]
            disks[key] = Disk(key, label, kind, ours=where == "vfu")
            if where == "null":
                devices.append(QemuDevice("virtio-blk-null", {"BYTES": str(mib * MiB)}))
                continue
            img = tmp / f"{key}.img"
            with open(img, "wb") as f:
                chunk = os.urandom(MiB)
                for _ in range(mib):
                    f.write(chunk)
            if where == "vfu":
                assert variant is not None
                devices.append(VfuDevice(kind, args=["--backing", str(img), "--serial", f"VFU{i:04d}", *variant.args],
                                         env=dict(variant.env) or None, cwd=variant.checkout or str(REPO),
                                         python=variant.python))
            elif where == "qemu":
                devices.append(builtin_nvme(img) if kind == "nvme" else builtin_virtio_blk(img))
            else:
                sock = tmp / "qsd.sock"
                qsd = start_storage_daemon(img, sock)
                disks[key].pid = qsd.pid
                devices.append(QemuDevice("vhost-user-blk", {"SOCKET": str(sock)}))
        watch = CpuWatch(disks)

        def on_line(line: str) -> None:
            line = line.removeprefix(OUTPUT_PREFIX)  # what the script printed
            if line.startswith("mark ") and any(d.ours and d.pid is None for d in disks.values()):
                # started by the runner just before QEMU
                for d in disks.values():
                    if d.ours and d.pid is None:
                        # its image path is unique to this run (other benchmarks use the same serials)
                        d.pid = find_server(str(tmp / f"{d.key}.img"))
            watch(line)

        script = guest_script(sizes, jobs, args.seconds, args.rounds)
        result = run_guest(script, devices, memory_mib=args.memory, timeout=args.timeout,
                           extra_files=extra, watch=on_line)
    finally:
        if qsd is not None:
            qsd.terminate()
            try:
                qsd.wait(5)
            except subprocess.TimeoutExpired:
                qsd.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    if os.environ.get("VFU_BENCH_DEBUG"):
        print(result.output)
    found = collect(result.output, jobs, watch)
    report(found, disks, jobs, args)
    print("guest queues:", *(ln.removeprefix("queue ") for ln in result.output.splitlines()
                              if ln.startswith("queue ")), sep="\n  ")
    problems = [ln for ln in result.output.splitlines() if ln.startswith(("fio failed", "missing", "fio does not"))]
    if problems:
        warn("problems:\n  " + "\n  ".join(problems))
    print(f"guest run took {result.duration:.0f} s")


def collect(output: str, jobs: list[tuple], watch: CpuWatch) -> dict[tuple[str, str], dict[str, float]]:
    """Per (disk key, job name): medians over the rounds of FIELDS."""
    bs_of = {name.replace(" ", "_"): bs for name, _, bs, *_ in jobs}
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for line in output.splitlines():
        if not line.startswith("3;"):
            continue
        tag = line.split(";")[2]
        key, job, _round = [*tag.split("@"), "", ""][:3]
        r = parse_terse(line, bs_of.get(job, 4096))
        if r is None:
            continue
        r["cpu_us"] = watch.spent(tag) / r["ios"] * 1e6 if r["ios"] else NAN
        runs.setdefault((key, job.replace("_", " ")), []).append(r)
    return {k: {f: median([r[f] for r in rs]) for f in FIELDS} for k, rs in runs.items()}


def _ratio(a: float, b: float) -> float:
    return a / b if b else NAN


def report(found: dict[tuple[str, str], dict[str, float]], disks: dict[str, Disk], jobs: list[tuple],
           args: argparse.Namespace) -> None:
    none = dict.fromkeys(FIELDS, NAN)
    ceiling = "ceiling-null"
    title = (f"In the guest (QEMU 11.1, one boot, fio libaio O_DIRECT, {args.seconds:g} s per job, "
             f"median of {args.rounds} rounds in rotating order)")
    rows = []
    for ours in (d for d in disks.values() if d.ours):
        peers = [d for d in disks.values() if not d.ours and d.family == ours.family and d.key != ceiling]
        for name, *_ in jobs:
            a = found.get((ours.key, name), none)
            ratios = [_ratio(a["iops"], found.get((p.key, name), none)["iops"]) for p in peers]
            c = found.get((ceiling, name), none)
            rows.append([f"{ours.family}, {ours.label}", name, a["iops"], a["mbps"], a["p50"], a["p99"], a["cpu_us"],
                         " / ".join(f"{x:.2f}x" for x in ratios), _ratio(a["iops"], c["iops"]),
                         min(ratios, default=NAN)])
    rows.sort(key=lambda r: (r[-1] if r[-1] == r[-1] else 99))
    print()
    print(table(title + ": ours, worst ratio to a peer first",
                ["device", "job", "IOPS", "MB/s", "p50 us", "p99 us", "server CPU us/IO",
                 "IOPS ratio to peers (nvme: QEMU nvme; virtio-blk: QEMU virtio-blk-pci / qsd)", "ratio to ceiling",
                 "worst"], rows))
    peer_rows = []
    for d in disks.values():
        if d.ours:
            continue
        for name, *_ in jobs:
            p = found.get((d.key, name), none)
            c = found.get((ceiling, name), none)
            peer_rows.append([d.label, name, p["iops"], p["mbps"], p["p50"], p["p99"], p["cpu_us"],
                              _ratio(p["iops"], c["iops"])])
    print(table(title + ": the peers and the ceiling",
                ["disk", "job", "IOPS", "MB/s", "p50 us", "p99 us", "server CPU us/IO", "ratio to ceiling"],
                peer_rows))
