"""In the guest: the project's NVMe and virtio-blk against QEMU's built-in ones, same boot.

    .venv/bin/python -m bench.guest [--seconds 3] [--size 64] [--jobs ...] [--poll-us 0,500]
                                    [--rounds 3] [--load fio|loadgen]

With ``--load fio`` (the default) the load is Debian's fio and the peers are QEMU's devices,
qemu-storage-daemon's vhost-user-blk and a null-co ceiling: see :mod:`bench.guest_fio`. What
follows is ``--load loadgen``, the project's own small load generator of earlier sessions.

Builds ``bench/loadgen.c`` on the host (``vfu_guest.static.build_static``), adds it to the guest's
initramfs through the harness's ``extra_files``, boots QEMU 11.1 once with four disks -- vfu
NVMe, QEMU ``nvme``, vfu virtio-blk, QEMU ``virtio-blk-pci``, each on its own image file of a
distinct size so that the guest script can tell them apart -- and runs every job on every disk
in that one boot (O_DIRECT, so the guest page cache is out of the picture; the host files are
in the host page cache for all four alike). Prints a table with ours / QEMU ratios, and the
guest's interrupts per 1,000 I/Os of each disk's controller (``/proc/interrupts`` around each
job: ``nvme0q*`` or ``virtioN-*``), which is what a guest pays per batch under TCG.

``--poll-us A,B,...`` attaches one NVMe and one virtio-blk of the project's per value (each with
that ``--poll-us``), all in the same boot, so the settings are compared against each other and
against QEMU's devices under the same guest and host conditions. ``--variant 'LABEL=ARGS'``
(repeatable) does the same for any server options; ``ARGS`` may start with ``@DIR`` (run that
variant's servers from another checkout, e.g. ``git worktree add DIR COMMIT``: a regression
check in one boot), then ``python:INTERPRETER`` (run them with another venv's python, e.g.
another CPython build) and ``NAME=VALUE`` environment settings, as on a shell command line
(``--variant 'no C=VFU_FASTIO=0'``).
``--devices nvme`` leaves the virtio-blk pair out (and the other way round).
``--ram private`` gives the guest plain private RAM: the project's devices then reach it
through DMA_READ/DMA_WRITE messages (QEMU's own devices do not care), which shows what the
message path costs against a ``--ram shared`` run.

The accelerator is the harness's (``VFU_QEMU_ACCEL``, TCG by default): under TCG the absolute
numbers mostly measure the emulated CPU, the ratios are what to look at.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from .common import REPO, Variant, machine_line, median, table

JOBS = [  # name, op, bs, qd
    ("4K randread QD1", "randread", 4096, 1),
    ("4K randread QD32", "randread", 4096, 32),
    ("4K randwrite QD1", "randwrite", 4096, 1),
    ("4K randwrite QD32", "randwrite", 4096, 32),
    ("128K seqread QD1", "seqread", 131072, 1),
]
QEMU_DISKS = [("qemu-nvme", "nvme"), ("qemu-virtio-blk", "virtio-blk")]
KINDS = [("nvme", "NVMe"), ("virtio-blk", "virtio-blk")]


def disk_plan(kinds: list[tuple[str, str]], variants: list[Variant]) -> list[tuple[str, str, str, Variant | None]]:
    """(key, where, device, variant) per disk; a disk's index gives its distinct size."""
    plan: list[tuple[str, str, str, Variant | None]] = []
    for dev, _ in kinds:
        for i, variant in enumerate(variants):
            plan.append((_key(dev, i, len(variants)), "vfu", dev, variant))
    for (dev, _), (key, builtin) in zip(KINDS, QEMU_DISKS, strict=True):
        if (dev, _) in kinds:
            plan.append((key, "qemu", builtin, None))
    return plan


def _key(dev: str, index: int, count: int) -> str:
    return f"vfu-{dev}" if count == 1 else f"vfu-{dev}-{index}"


def build_loadgen(out_dir: Path) -> Path:
    from vfu_guest.static import build_static

    return build_static(REPO / "bench" / "loadgen.c", out_dir / "loadgen")


def guest_script(sizes: dict[str, int], jobs: list[tuple[str, str, int, int]], seconds: float,
                 rounds: int = 1) -> str:
    lines = [
        f"for i in $(seq 30); do [ $(ls -d /sys/block/nvme*n1 /sys/block/vd* 2>/dev/null | wc -l) -ge {len(sizes)} ] "
        "&& break; sleep 1; done",
        "find_disk() { for d in /sys/block/nvme*n1 /sys/block/vd*; do "
        "[ \"$(cat $d/size 2>/dev/null)\" = \"$1\" ] && echo /dev/${d##*/} && return; done; }",
        # The interrupt names of a disk's controller in /proc/interrupts: nvme0q0.. for
        # /dev/nvme0n1, virtio2-req.0.. for the /dev/vda of virtio2.
        "irq_prefix() { case $1 in /dev/nvme*) n=${1#/dev/}; echo ${n%n1}q;; "
        "*) v=$(readlink -f /sys/block/${1#/dev/}/device); echo ${v##*/}-;; esac; }",
        # Summed over CPUs: the count columns come before the chip's name.
        "irqs() { awk -v p=\"$1\" 'index($NF, p) == 1 { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) "
        "s += $i } END { print s + 0 }' /proc/interrupts; }",
    ]
    for key, sectors in sizes.items():
        var = key.replace("-", "_")
        lines.append(f'{var}=$(find_disk {sectors}); echo "disk {key} $' + "{" + var + "}\"")
        lines.append(f'[ -n "${var}" ] || {{ echo "missing disk {key}"; exit 3; }}')
        lines.append(f'{var}_irq=$(irq_prefix ${var})')
    # Job by job, every disk in turn: a slow or fast stretch of the host hits all disks alike.
    # Odd rounds take the disks in reverse order: the place in the turn biased results by up to
    # 0.1x (docs/performance.md, "Sixth session"), and with an even number of rounds every disk
    # then has the same mean place.
    for name, op, bs, qd in jobs:
        for r in range(rounds):
            for key in (list(sizes) if r % 2 == 0 else list(reversed(sizes))):
                var = key.replace("-", "_")
                tag = f"{key}/{name.replace(' ', '_')}"
                lines.append(f'before=$(irqs ${var}_irq)')
                lines.append(f'/usr/local/bin/loadgen {tag} ${var} {op} {bs} {qd} {seconds:g} || echo "loadgen failed {tag}"')
                lines.append(f'echo "irqs name={tag} count=$(( $(irqs ${var}_irq) - before ))"')
    return "\n".join(lines) + "\n"


FIELDS = ("iops", "mbps", "lat_us", "irqs_per_kio")


def parse(output: str) -> dict[tuple[str, str], dict[str, float]]:
    """Per (disk, job): the median over rounds of iops, mbps, lat_us and the guest's interrupts
    per 1,000 I/Os (from /proc/interrupts around the job)."""
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    irqs: dict[tuple[str, str], list[int]] = {}
    for line in output.splitlines():
        if not line.startswith(("loadgen name=", "irqs name=")):
            continue
        kv = dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)
        key, _, job = kv["name"].partition("/")
        disk_job = (key, job.replace("_", " "))
        if line.startswith("irqs"):
            irqs.setdefault(disk_job, []).append(int(kv["count"]))
            continue
        runs.setdefault(disk_job, []).append(
            {**{k: float(kv[k]) for k in ("iops", "mbps", "lat_us")}, "ios": float(kv["ios"])})
    for k, v in runs.items():
        for r, n in zip(v, irqs.get(k, []), strict=False):
            r["irqs_per_kio"] = 1000 * n / r["ios"] if r["ios"] else float("nan")
    nan = float("nan")
    return {k: {f: median([r.get(f, nan) for r in v]) for f in FIELDS} for k, v in runs.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.guest", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=64, help="MiB per disk (plus 0..3 to tell them apart)")
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--jobs", default="", help="comma-separated job names (default: all)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every job this many times (disk after disk, odd rounds in reverse order); the table shows medians")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--poll-us", default="",
                    help="comma-separated --poll-us values: one NVMe and one virtio-blk of ours per "
                         "value, in the same boot (default: one each with the devices' default)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                    help="one NVMe and one virtio-blk of ours with these server options (and leading "
                         "NAME=VALUE environment settings), in the same boot; repeatable")
    ap.add_argument("--devices", default="nvme,virtio-blk", help="which pairs: nvme, virtio-blk or both")
    ap.add_argument("--ram", choices=("shared", "private"), default="shared",
                    help="guest RAM: a shared memfd (the servers map it) or plain private memory "
                         "(the servers reach it through DMA_READ/DMA_WRITE messages)")
    ap.add_argument("--load", choices=("fio", "loadgen"), default="fio",
                    help="fio (default: every peer, bench/guest_fio.py) or loadgen (bench/loadgen.c, ours and "
                         "QEMU's devices only, the jobs of earlier sessions)")
    args = ap.parse_args(argv)
    from vfu_guest.runner import (
        VfuDevice,
        builtin_nvme,
        builtin_virtio_blk,
        qemu_accel,
        run_guest,
    )

    variants: list[Variant] = []
    try:
        for v in args.poll_us.split(",") if args.poll_us else []:
            variants.append(Variant(f"poll {int(v)} us", ("--poll-us", str(int(v)))))
    except ValueError:
        ap.error(f"--poll-us: not a list of integers: {args.poll_us!r}")
    try:
        variants += [Variant.parse(v) for v in args.variant]
    except ValueError as exc:
        ap.error(str(exc))
    variants = variants or [Variant()]
    kinds = [k for k in KINDS if k[0] in args.devices.split(",")]
    if not kinds:
        ap.error(f"--devices {args.devices!r}: expected nvme, virtio-blk or both")
    if args.load == "fio":
        if args.ram != "shared":
            ap.error("--ram private needs --load loadgen (qemu-storage-daemon's vhost-user-blk, a peer "
                     "of the fio run, needs shared guest RAM)")
        from . import guest_fio

        if args.memory == 512:
            args.memory = 768  # fio's library closure lives in the initramfs
        guest_fio.run(args, variants, [k for k, _ in kinds])
        return
    print(machine_line() + f", guest accel {qemu_accel()}, 1 vCPU, {args.ram} guest RAM")
    jobs = [j for j in JOBS if not args.jobs or j[0] in args.jobs.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="vfu-bench-guest-"))
    try:
        loadgen = build_loadgen(tmp)
        devices = []
        sizes = {}
        for i, (key, where, dev, variant) in enumerate(disk_plan(kinds, variants)):
            img = tmp / f"{key}.img"
            mib = args.size + i
            with open(img, "wb") as f:
                chunk = os.urandom(1 << 20)
                for _ in range(mib):
                    f.write(chunk)
            sizes[key] = mib * 2048
            if where == "vfu":
                assert variant is not None
                # Linux refuses a second controller with the same serial (same subsystem).
                devices.append(VfuDevice(dev, args=["--backing", str(img), "--serial", f"VFU{i:04d}", *variant.args],
                                         env=dict(variant.env) or None, cwd=variant.checkout or str(REPO),
                                         python=variant.python))
            elif dev == "nvme":
                devices.append(builtin_nvme(img))
            else:
                devices.append(builtin_virtio_blk(img))
        script = guest_script(sizes, jobs, args.seconds, args.rounds)
        result = run_guest(script, devices, memory_mib=args.memory, timeout=args.timeout,
                           extra_files={"/usr/local/bin/loadgen": loadgen}, shared_ram=args.ram == "shared")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if os.environ.get("VFU_BENCH_DEBUG"):
        print(result.output)
    found = parse(result.output)
    rows = []
    for (dev, label), (theirs, _) in zip(KINDS, QEMU_DISKS, strict=True):
        if (dev, label) not in kinds:
            continue
        for i, variant in enumerate(variants):
            ours = _key(dev, i, len(variants))
            name_label = f"{label}, {variant.label}" if variant.label else label
            for name, _op, _bs, _qd in jobs:
                nan = dict.fromkeys(FIELDS, float("nan"))
                a, b = found.get((ours, name), nan), found.get((theirs, name), nan)
                rows.append([name_label, name, a["iops"], a["mbps"], b["iops"], b["mbps"],
                             a["iops"] / b["iops"] if b["iops"] else float("nan"), a["lat_us"], b["lat_us"],
                             a["irqs_per_kio"], b["irqs_per_kio"]])
    print()
    rounds = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
    print(table(f"In the guest (QEMU 11.1, one boot, {args.seconds:g} s per job{rounds}, O_DIRECT, loadgen threads)",
                ["device", "job", "ours IOPS", "ours MB/s", "QEMU IOPS", "QEMU MB/s", "ours / QEMU",
                 "ours lat us", "QEMU lat us", "ours irqs/1k IO", "QEMU irqs/1k IO"], rows))
    missing = [line for line in result.output.splitlines() if line.startswith(("loadgen failed", "missing"))]
    if missing:
        print("problems:", *missing, sep="\n  ")
    print(f"guest run took {result.duration:.0f} s")


if __name__ == "__main__":
    main()
