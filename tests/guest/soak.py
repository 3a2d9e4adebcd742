"""The pieces of the handover soak test: the guest's workload, the host's TCP peer in a network
namespace, the successor servers and the checks of what the guest reports.

Guest side: ``soak.c`` (built static here, added to the initramfs through the harness's
``extra_files``) writes and reads back checksummed blocks with O_DIRECT from several threads on
each disk, and sends and receives a TCP stream whose every 8-byte word is its own index; busybox
``ping -A`` floods (each echo goes out as soon as the last reply came back) and a shell loop
reads /dev/hwrng. The host ends the soak by closing the stream it sends to the guest: the guest
then stops everything, reports and prints its dmesg.

Host side: `NetPeer` owns a network namespace, moves the virtio-net server's TAP into it and runs
the other end of both streams there (as a separate Python process), checking the guest's stream
word by word. `ServerChain` starts successor servers with ``--take-over`` and keeps the log of
every process in the chain.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vfu_guest import GuestKit, GuestResult, VfuDevice, run_guest
from vfu_guest.static import build_static

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]

HOST_IP = "10.16.71.1"
GUEST_IP = "10.16.71.2"
TX_PORT = 5000  # guest -> host stream
RX_PORT = 5001  # host -> guest stream; its end is the guest's stop signal

# Kernel messages that mean a driver and a device disagreed. The nvme driver logs timeouts,
# aborts and resets ("I/O tag ... timeout, aborting", "resetting controller"); virtio drivers
# log "virtio_..." errors and the block layer "I/O error" whatever the driver; a stalled
# transmit queue is the networking core's "NETDEV WATCHDOG".
BAD_DMESG = re.compile(
    r"nvme.*(timeout|abort|reset|fail|error|bogus|invalid|not ready|is down|I/O)"
    r"|virtio.*(error|fail|timeout|bad|invalid|broken)"
    r"|I/O error|blk_update_request|Buffer I/O error|NETDEV WATCHDOG|hwrng.*(fail|error)"
    r"|call trace|BUG:|WARNING:|hung task",
    re.I,
)


def build_soak(out_dir: Path) -> Path:
    return build_static(HERE / "soak.c", out_dir / "soak")


def guest_script(disks: Sequence[tuple[str, str]], *, threads: int = 4,
                 blocks_per_thread: int = 512, max_seconds: int = 3000) -> str:
    """The soak in the guest. `disks` is (name, /dev/...) for each disk to write.

    Each workload writes its report to a file of its own; they are printed only after all
    stopped, so that the lines do not interleave. The disks are read back once more with
    O_DIRECT as a whole (``<name>_sha``) for the host to compare with the backing files.
    """
    stop = "/tmp/soak-stop"
    lines = [
        *(f"vfu_wait_dev {dev} 60 || {{ dmesg | tail -40; exit 10; }}" for _, dev in disks),
        "vfu_wait_dev /dev/hwrng 60 || exit 11",
        f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 || exit 12",
        "n=0",
        f"until ping -c 1 -W 1 {HOST_IP} > /dev/null 2>&1; do",
        "    n=$((n + 1)); [ \"$n\" -gt 120 ] && { echo no ping; exit 13; }",
        "done",
        f"rm -f {stop}",
        "pids=",
    ]
    for name, dev in disks:
        lines += [
            f"soak disk {name} {dev} {threads} {blocks_per_thread} {stop} {max_seconds} "
            f"> /tmp/r.{name} 2>&1 &",
            "pids=\"$pids $!\"",
        ]
    lines += [
        f"soak tcp-tx net {HOST_IP} {TX_PORT} {stop} {max_seconds} > /tmp/r.tx 2>&1 &",
        "pids=\"$pids $!\"",
        # -A: the next echo as soon as the reply is in, the flood busybox's ping offers.
        f"ping -A -q -s 1000 {HOST_IP} > /tmp/r.ping 2>&1 &",
        "ping_pid=$!",
        "(",
        "    reads=0; bytes=0; errors=0",
        f"    while [ ! -e {stop} ]; do",
        "        n=$(dd if=/dev/hwrng bs=64 count=1 iflag=fullblock 2>/dev/null | wc -c)",
        "        if [ \"$n\" = 64 ]; then bytes=$((bytes + n)); else errors=$((errors + 1)); fi",
        "        reads=$((reads + 1))",
        "    done",
        "    echo \"soak rng name=rng reads=$reads bytes=$bytes errors=$errors\"",
        ") > /tmp/r.rng 2>&1 &",
        "pids=\"$pids $!\"",
        # The host's stream to the guest ends when the host is done: that is the stop signal.
        f"soak tcp-rx net {HOST_IP} {RX_PORT} {max_seconds} > /tmp/r.rx 2>&1",
        f"touch {stop}",
        "for p in $pids; do wait $p; done",
        "kill -INT $ping_pid; wait $ping_pid",
        "cat /tmp/r.*",
    ]
    for name, dev in disks:
        lines.append(
            f"echo \"soak sha name={name} sha=$(dd if={dev} bs=1M count="
            f"{threads * blocks_per_thread * 4096 >> 20} iflag=direct 2>/dev/null | sha256sum | cut -c1-64)\""
        )
    lines.append("dmesg | sed 's/^/dmesg: /'")
    return "\n".join(lines) + "\n"


def records(output: str) -> dict[str, dict[str, str]]:
    """``soak KIND name=NAME k=v ...`` lines as {"KIND NAME": {k: v}}."""
    found: dict[str, dict[str, str]] = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "soak" or not words[2].startswith("name="):
            continue
        values = dict(w.partition("=")[::2] for w in words[2:] if "=" in w)
        found[f"{words[1]} {values['name']}"] = values
    return found


def ping_stats(output: str) -> tuple[int, int]:
    """(transmitted, received) from busybox ping's summary."""
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", output)
    if not m:
        raise AssertionError(f"no ping summary in the guest output:\n{output}")
    return int(m.group(1)), int(m.group(2))


def bad_dmesg(output: str) -> list[str]:
    return [ln for ln in output.splitlines()
            if ln.startswith("dmesg: ") and BAD_DMESG.search(ln) and not _HARMLESS.search(ln)]


# Debian's modules are signed with a key the test kernel does not trust; nothing to do with us.
_HARMLESS = re.compile(r"module verification failed")


# -- the host's TCP peer, in a network namespace of its own ------------------------------------

PEER = r"""
import array, json, os, socket, sys, threading, time
result_file, stop_file, host_ip, tx_port, rx_port = sys.argv[1:6]
result = {}

def listener(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host_ip, int(port)))
    s.listen(1)
    return s

def sink(s):
    # The guest's stream: every 8-byte little-endian word is its index.
    c, _ = s.accept()
    result["tx_connected"] = time.time()
    got, carry, word, bad_at = 0, b"", 0, -1
    progress, reported = os.path.splitext(result_file)[0] + ".progress", 0.0
    while True:
        d = c.recv(1 << 16)
        if not d:
            break
        got += len(d)
        d = carry + d
        whole = len(d) // 8 * 8
        if bad_at < 0:
            expect = array.array("Q", range(word, word + whole // 8)).tobytes()
            if d[:whole] != expect:
                i = next(i for i in range(0, whole, 8) if d[i:i + 8] != expect[i:i + 8])
                bad_at = word * 8 + i
        word += whole // 8
        carry = d[whole:]
        if time.monotonic() > reported + 0.1:
            # How far the guest's stream got, for the host to pace its steps by.
            with open(progress + ".tmp", "w") as f:
                f.write(str(got))
            os.rename(progress + ".tmp", progress)
            reported = time.monotonic()
    c.close()
    result.update(tx_bytes=got, tx_bad_at=bad_at, tx_tail=len(carry))

def source(s):
    c, _ = s.accept()
    result["rx_connected"] = time.time()
    c.settimeout(0.5)  # look at the stop file even while the guest does not read
    word, sent, block = 0, 0, b""
    while not os.path.exists(stop_file):
        if not block:
            block = array.array("Q", range(word, word + 8192)).tobytes()
            word += 8192
        try:
            n = c.send(block)
        except TimeoutError:
            continue
        sent += n
        block = block[n:]
    c.close()
    result["rx_bytes"] = sent

threads = [threading.Thread(target=f, args=(listener(p),)) for f, p in ((sink, tx_port), (source, rx_port))]
for t in threads:
    t.start()
print("ready", flush=True)
for t in threads:
    t.join()
with open(result_file + ".tmp", "w") as f:
    json.dump(result, f)
os.rename(result_file + ".tmp", result_file)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class NetPeer:
    """A network namespace named ``v16g<random>`` (this branch's prefix) with the TAP of the
    virtio-net server in it and the host end of both TCP streams."""

    def __init__(self, workdir: Path) -> None:
        tag = uuid.uuid4().hex[:8]
        self.ns = f"v16g{tag}"
        self.tap = f"v16g{tag}"
        self.result_file = workdir / "peer.json"
        self.stop_file = workdir / "peer.stop"
        self.proc: subprocess.Popen[bytes] | None = None
        _ip("netns", "add", self.ns)

    def plumb(self, timeout: float = 120.0) -> None:
        """Once the server created the TAP, move it into the namespace and start the peer."""
        deadline = time.monotonic() + timeout
        while not Path(f"/sys/class/net/{self.tap}").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"TAP {self.tap} did not appear")
            time.sleep(0.05)
        _ip("link", "set", self.tap, "netns", self.ns)
        _ip("-n", self.ns, "addr", "add", f"{HOST_IP}/24", "dev", self.tap)
        _ip("-n", self.ns, "link", "set", self.tap, "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-c", PEER, str(self.result_file),
             str(self.stop_file), HOST_IP, str(TX_PORT), str(RX_PORT)],
            stdout=subprocess.PIPE,
        )

    def tx_progress(self) -> int:
        """Bytes of the guest's stream the host has checked so far."""
        try:
            return int(self.result_file.with_suffix(".progress").read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def stop(self) -> None:
        self.stop_file.touch()

    def result(self, timeout: float = 300.0) -> dict[str, int]:
        assert self.proc is not None
        self.proc.wait(timeout)
        return json.loads(self.result_file.read_text())

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


# -- successor servers -------------------------------------------------------------------------


@dataclass
class Handover:
    device: str
    args: list[str]
    env: dict[str, str]
    seconds: float  # from spawning the successor to its 'listening on'


@dataclass
class ServerChain:
    """The chain of servers for one device: the first one started by the guest harness, then a
    successor per handover, each taking over from the one before through `control`."""

    device: str
    device_args: list[str]
    control: str
    workdir: Path
    current: subprocess.Popen[bytes] | None = None  # None: the harness's first server
    procs: list[tuple[list[str], subprocess.Popen[bytes], Path]] = field(default_factory=list)
    handovers: list[Handover] = field(default_factory=list)

    def hand_over(self, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                  timeout: float = 120.0) -> Handover:
        """Start a successor with ``--take-over`` and wait until it serves and its predecessor
        has exited 0. Raises with both servers' stderr if either does not happen."""
        n = len(self.procs)
        argv = [sys.executable, "-m", "vfu_server", self.device, *self.device_args,
                "--take-over", self.control, *args]
        base = self.workdir / f"{self.device}-{n}"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        t0 = time.monotonic()
        with open(f"{base}.out", "wb") as out, open(f"{base}.err", "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env=full_env, cwd=REPO_ROOT, start_new_session=True)
        self.procs.append((argv, proc, base))
        deadline = t0 + timeout
        while "listening on" not in _read(Path(f"{base}.out")):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with rc={proc.returncode}" if proc.poll() is not None else "timed out"
                raise AssertionError(f"handover {n} of {self.device} ({' '.join(args)}): successor {why}\n"
                                     f"{_read(Path(f'{base}.err'))[-3000:]}")
            time.sleep(0.01)
        seconds = time.monotonic() - t0
        if self.current is not None:
            try:
                rc = self.current.wait(30)
            except subprocess.TimeoutExpired:
                rc = None
            if rc != 0:
                prev = self.procs[n - 1][2]
                raise AssertionError(f"handover {n} of {self.device}: predecessor rc={rc}\n"
                                     f"{_read(Path(f'{prev}.err'))[-3000:]}")
        self.current = proc
        record = Handover(self.device, list(args), dict(env or {}), seconds)
        self.handovers.append(record)
        return record

    def stop(self) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def logs(self) -> list[tuple[str, int | None, str]]:
        """(command, exit code, stderr) of every successor."""
        return [(" ".join(argv), proc.returncode, _read(Path(f"{base}.err"))) for argv, proc, base in self.procs]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# -- the whole soak --------------------------------------------------------------------------

MIB = 1 << 20
DISK_BYTES = 64 * MIB
THREADS = 4
BLOCKS_PER_THREAD = 512  # 8 MiB of each disk is written, in 4 KiB blocks


@dataclass
class SoakOutcome:
    guest: GuestResult
    peer: dict[str, int]
    chains: dict[str, ServerChain]
    images: dict[str, Path]
    rounds_done: int


def soak_devices(workdir: Path, peer: NetPeer) -> tuple[dict[str, ServerChain], list[VfuDevice], dict[str, Path]]:
    """The four servers (first generation, started by the harness) and their chains."""
    images = {"nvme": workdir / "nvme.img", "vblk": workdir / "vblk.img"}
    for image in images.values():
        with open(image, "wb") as f:
            f.truncate(DISK_BYTES)
    specs = {
        "nvme": ("nvme", ["--backing", str(images["nvme"]), "--serial", "SOAK0001"]),
        "vblk": ("virtio-blk", ["--backing", str(images["vblk"]), "--serial", "soak-vblk", "--num-queues", "2"]),
        "net": ("virtio-net", ["--tap", peer.tap, "--mac", "52:54:00:16:00:01"]),
        "rng": ("virtio-rng", []),
    }
    chains: dict[str, ServerChain] = {}
    devices: list[VfuDevice] = []
    for name, (device, args) in specs.items():
        control = str(workdir / f"{name}.ctl")
        chains[name] = ServerChain(device, args, control, workdir)
        devices.append(VfuDevice(device, [*args, "--control-socket", control], id=name, cwd=str(REPO_ROOT),
                                 ready_timeout=120))
    return chains, devices, images


def run_soak(kit: GuestKit, workdir: Path, rounds: int,
             step: Callable[[int, dict[str, ServerChain]], None], *, timeout: float = 2400) -> SoakOutcome:
    """Boot the guest with the four devices, start the soak, call ``step(round, chains)``
    `rounds` times while it runs (each time after the guest's stream to the host has moved on,
    so that every step happens under traffic), then end the soak and collect everything."""
    soak_exe = build_soak(workdir)
    peer = NetPeer(workdir)
    chains, devices, images = soak_devices(workdir, peer)
    script = guest_script([("nvme", "/dev/nvme0n1"), ("vblk", "/dev/vda")], threads=THREADS,
                          blocks_per_thread=BLOCKS_PER_THREAD)
    pidfile = workdir / "qemu.pid"
    done = 0
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            guest = pool.submit(run_guest, script, devices, kit=kit, timeout=timeout, check=False,
                                extra_files={"/bin/soak": soak_exe},
                                qemu_args=["-smp", "2", "-pidfile", str(pidfile)])
            try:
                peer.plumb()
                _wait_progress(peer, guest, 0)
                for done in range(1, rounds + 1):
                    moved = peer.tx_progress()
                    step(done, chains)
                    _wait_progress(peer, guest, moved)
            except BaseException:
                # The guest hears the end of the soak over the network, which may be what
                # broke: give it a minute, then end QEMU so that the failure is reported now.
                peer.stop()
                try:
                    guest.result(60)
                except concurrent.futures.TimeoutError:
                    _end_qemu(pidfile)
                raise
            finally:
                peer.stop()
                result = guest.result()
        return SoakOutcome(result, peer.result(), chains, images, done)
    finally:
        for chain in chains.values():
            chain.stop()
        peer.close()


def _end_qemu(pidfile: Path) -> None:
    try:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass  # gone already


def _wait_progress(peer: NetPeer, guest: concurrent.futures.Future[GuestResult], since: int,
                   step: int = 256 << 10, timeout: float = 300) -> None:
    """Wait until the guest's stream to the host passed `since` + `step` bytes."""
    deadline = time.monotonic() + timeout
    while peer.tx_progress() < since + step:
        if guest.done():
            raise AssertionError("the guest stopped before the soak was over:\n" + _guest_failure(guest))
        if time.monotonic() > deadline:
            raise AssertionError(f"the guest's TCP stream did not move on within {timeout:.0f}s")
        time.sleep(0.05)


def _guest_failure(guest: concurrent.futures.Future[GuestResult]) -> str:
    exc = guest.exception()
    if exc is not None:
        return str(exc)
    return guest.result().diagnostics()


def check_soak(out: SoakOutcome) -> None:
    """What the soak must show whatever happened meanwhile: every workload ran and reported
    no error, the data read back is the data written (also in the backing files), no TCP byte
    was lost, repeated or changed in either direction, and the guest's kernel logged no
    driver trouble."""
    result = out.guest
    assert result.rc == 0, result.diagnostics()
    output = result.output
    rec = records(output)
    for name, image in out.images.items():
        disk = rec.get(f"disk {name}")
        assert disk is not None, f"no report from the {name} workload:\n{output}"
        assert (disk["errors"], disk["mismatches"]) == ("0", "0"), f"{name}: {disk}\n{output}"
        assert int(disk["writes"]) > 0 and int(disk["blocks_checked"]) == THREADS * BLOCKS_PER_THREAD, disk
        written = image.read_bytes()[: THREADS * BLOCKS_PER_THREAD * 4096]
        assert rec[f"sha {name}"]["sha"] == hashlib.sha256(written).hexdigest(), (
            f"{name}: what the guest reads back differs from the backing file")
    tx, rx, peer = rec["tcp-tx net"], rec["tcp-rx net"], out.peer
    assert tx["errors"] == "0" and int(tx["bytes"]) > 0, tx
    assert (peer["tx_bytes"], peer["tx_bad_at"], peer["tx_tail"]) == (int(tx["bytes"]), -1, 0), (
        f"guest -> host stream: guest sent {tx['bytes']}, host {peer}")
    assert (rx["errors"], rx["bad_at"]) == ("0", "-1"), rx
    assert int(rx["bytes"]) == peer["rx_bytes"] > 0, f"host -> guest stream: guest got {rx}, host sent {peer}"
    rng = rec["rng rng"]
    assert rng["errors"] == "0" and int(rng["bytes"]) > 0, rng
    sent, received = ping_stats(output)
    assert received > 0 and sent - received <= max(2, sent // 100), f"ping: {received} of {sent} replies"
    assert not bad_dmesg(output), "\n".join(bad_dmesg(output))


#: what a predecessor logs when it has handed over (vfu_server.handover)
_PAUSE = re.compile(r"handed over to the successor after a pause of ([0-9.]+) ms")


def summary(out: SoakOutcome) -> str:
    """A few lines on what the soak did, for the test's output."""
    rec = records(out.guest.output)
    lines = [f"{out.rounds_done} rounds in {out.guest.duration:.0f} s"]
    for name, chain in out.chains.items():
        secs = sorted(h.seconds for h in chain.handovers)
        first = out.guest.servers.get(name)
        logs = [first.stderr if first else "", *(stderr for _, _, stderr in chain.logs())]
        pauses = sorted(float(m) for log in logs for m in _PAUSE.findall(log))
        if secs:
            lines.append(f"{name}: {len(secs)} handovers, successor start to serving median "
                         f"{secs[len(secs) // 2] * 1e3:.0f} ms, max {secs[-1] * 1e3:.0f} ms")
        if pauses:
            lines.append(f"{name}: pause the predecessors logged: median {pauses[len(pauses) // 2]:.1f} ms, "
                         f"max {pauses[-1]:.1f} ms ({len(pauses)} handovers)")
    lines += [f"{key}: {' '.join(f'{k}={v}' for k, v in values.items() if k != 'name')}"
              for key, values in rec.items()]
    sent, received = ping_stats(out.guest.output)
    lines.append(f"ping: {received} of {sent} replies")
    return "\n".join(lines)
