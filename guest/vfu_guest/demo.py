"""``python -m vfu_guest demo`` (what ``./run demo`` runs).

Provisions QEMU and the guest if needed, starts the project's device servers as separate
processes, boots Linux with them attached over vfio-user and shows what the guest saw. Which
devices take part is data (DEMO_DEVICES) filtered by what ``python -m vfu_server --list-devices``
reports, so block devices join the demo as soon as they exist.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .aptenv import ProvisionError
from .checks import EXAMPLE_APPEND, EXAMPLE_SCRIPT, check_example
from .provision import provision
from .runner import GuestError, GuestResult, VfuDevice, run_guest

MIB = 1 << 20
PATTERN_MIB = 4

_BLOCK_SNIPPET = """
vfu_wait_dev {dev} 15 || exit 20
dd if=/dev/urandom of=/tmp/pattern bs=1M count={mib} 2>/dev/null
dd if=/tmp/pattern of={dev} bs=1M conv=fsync 2>/dev/null || exit 21
echo 3 > /proc/sys/vm/drop_caches
dd if={dev} of=/tmp/readback bs=1M count={mib} 2>/dev/null || exit 22
echo "wrote {mib} MiB of random data to {dev} and read it back:"
sha256sum /tmp/pattern /tmp/readback
echo "{key}=$(sha256sum < /tmp/readback | cut -d' ' -f1)"
cmp -s /tmp/pattern /tmp/readback || {{ echo "read-back differs"; exit 23; }}
"""


@dataclass
class DemoDevice:
    """One project device in the demo: how to start it and what the guest does with it."""

    name: str
    title: str
    script: str
    backing_mib: int = 0
    append: str = ""
    # Host-side check of the guest run (raises AssertionError); gets the result and backing file.
    check: Callable[[GuestResult, Path | None], None] | None = None


def _check_example(result: GuestResult, _backing: Path | None) -> None:
    check_example(result.values())


def _check_block(key: str) -> Callable[[GuestResult, Path | None], None]:
    def check(result: GuestResult, backing: Path | None) -> None:
        assert backing is not None
        with open(backing, "rb") as f:
            host = hashlib.sha256(f.read(PATTERN_MIB * MIB)).hexdigest()
        guest = result.values().get(key)
        assert guest == host, f"{key}: guest read back {guest}, host backing file has {host}"

    return check


def _check_rng(result: GuestResult, _backing: Path | None) -> None:
    facts = result.values()
    assert facts.get("rng_current") == "virtio_rng.0", f"hw_random uses {facts.get('rng_current')}"
    sample = facts.get("hwrng_bytes", "")
    assert len(sample) == 64 and sample != "0" * 64, f"/dev/hwrng gave {sample!r}"


DEMO_DEVICES: list[DemoDevice] = [
    DemoDevice(
        name="example",
        title="example DMA copy engine (1234:fe01): registers via busybox devmem, one DMA copy",
        script=EXAMPLE_SCRIPT,
        append=EXAMPLE_APPEND,
        check=_check_example,
    ),
    DemoDevice(
        name="nvme",
        title="NVMe controller (vfio-user) on a sparse backing file",
        script="vfu_wait_dev /dev/nvme0n1 15 || exit 20\nnvme list\n"
        "nvme id-ctrl /dev/nvme0 | head -n 12\n"
        + _BLOCK_SNIPPET.format(dev="/dev/nvme0n1", mib=PATTERN_MIB, key="nvme_sha256"),
        backing_mib=64,
        check=_check_block("nvme_sha256"),
    ),
    DemoDevice(
        name="virtio-blk",
        title="virtio-blk (vfio-user) on a sparse backing file",
        script="vfu_wait_dev /dev/vda 15 || exit 20\ncat /sys/block/vda/size | "
        'awk \'{print "vda: " $1 * 512 / 1048576 " MiB"}\'\n'
        + _BLOCK_SNIPPET.format(dev="/dev/vda", mib=PATTERN_MIB, key="vda_sha256"),
        backing_mib=64,
        check=_check_block("vda_sha256"),
    ),
    DemoDevice(
        name="virtio-rng",
        title="virtio-rng (vfio-user): the guest's /dev/hwrng",
        script="vfu_find_pci 0x1af4 0x1044 > /dev/null || exit 20\n"
        'echo "rng_current=$(cat /sys/class/misc/hw_random/rng_current)"\n'
        "echo \"hwrng_bytes=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')\"\n",
        check=_check_rng,
    ),
]


def available_devices() -> set[str]:
    """Device names the installed vfu-server knows (empty if it cannot even list them)."""
    proc = subprocess.run(
        [sys.executable, "-m", "vfu_server", "--list-devices"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        return set()
    return {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}


def _say(text: str = "") -> None:
    print(text, flush=True)


def _guest_script(devices: Sequence[DemoDevice]) -> str:
    parts = [
        "failed=0",
        'echo "== PCI functions the guest found (address vendor:device class) =="',
        "vfu_lspci",
    ]
    for dev in devices:
        # Each device runs in its own subshell, so one failing device does not hide the others.
        parts += [
            f'echo; echo "== {dev.title} =="',
            "(",
            dev.script.strip(),
            ")",
            f'rc=$?; [ $rc = 0 ] || {{ echo "{dev.name}: guest steps FAILED (rc=$rc)"; failed=$((failed + 1)); }}',
        ]
    parts.append("exit $failed")
    return "\n".join(parts) + "\n"


def run_demo(timeout: float = 300.0, only: Sequence[str] | None = None) -> int:
    try:
        kit = provision(log=True)
    except ProvisionError as exc:
        print(f"demo: provisioning failed: {exc}", file=sys.stderr)
        return 1
    _say(kit.summary())
    known = available_devices()
    wanted = [d for d in DEMO_DEVICES if (only is None or d.name in only)]
    devices = [d for d in wanted if d.name in known]
    skipped = [d.name for d in wanted if d.name not in known]
    if not devices:
        print(
            f"demo: none of {[d.name for d in wanted]} is available "
            f"(python -m vfu_server --list-devices lists {sorted(known) or 'nothing'})",
            file=sys.stderr,
        )
        return 1
    _say()
    if skipped:
        _say(f"not in this build of vfu-server yet, left out: {', '.join(skipped)}")

    with tempfile.TemporaryDirectory(prefix="vfu-demo-") as tmp:
        backings: dict[str, Path] = {}
        servers: list[VfuDevice] = []
        for dev in devices:
            args: list[str] = []
            if dev.backing_mib:
                backing = Path(tmp) / f"{dev.name}.img"
                with open(backing, "wb") as f:
                    f.truncate(dev.backing_mib * MIB)  # sparse
                backings[dev.name] = backing
                args = ["--backing", str(backing), "--size", str(dev.backing_mib * MIB)]
            servers.append(VfuDevice(dev.name, args))
            _say(
                f"device server: {sys.executable} -m vfu_server {dev.name} --socket-path SOCKET "
                + " ".join(args)
            )
        append = " ".join(d.append for d in devices if d.append)
        _say(
            f"booting Linux {kit.kernel_release} under QEMU {kit.qemu_version.split()[0]} (TCG)..."
        )
        try:
            result = run_guest(
                _guest_script(devices),
                servers,
                kit=kit,
                append=append,
                timeout=timeout,
                check=False,
            )
        except GuestError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        _say(f"guest finished in {result.duration:.1f}s with rc={result.rc}; what it printed:")
        _say()
        for line in result.output.splitlines():
            _say(f"  guest| {line}")
        _say()

        problems = [] if result.rc == 0 else [f"guest script rc={result.rc}"]
        for dev in devices:
            if dev.check is None:
                continue
            try:
                dev.check(result, backings.get(dev.name))
                _say(f"check {dev.name}: OK, the guest saw what the device contract says")
            except AssertionError as exc:
                problems.append(f"{dev.name}: {exc}")
        if result.qemu_warnings():
            problems.append("QEMU printed warnings:\n" + result.qemu_stderr)
        for name, log in result.servers.items():
            if log.stderr.strip():
                _say(f"server {name} stderr:\n{log.stderr.rstrip()}")
        if problems:
            print("demo: FAILED\n" + "\n".join(problems), file=sys.stderr)
            print(result.diagnostics(), file=sys.stderr)
            return 1
        _say("demo: all devices behaved; servers stopped, sockets and backing files removed")
        return 0
