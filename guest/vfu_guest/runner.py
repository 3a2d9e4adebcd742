"""Boot the test guest with devices attached, run a shell script in it, collect everything.

Project devices are started exactly as a user would start them, as separate processes
(``python -m vfu_server DEVICE --socket-path PATH ...``); QEMU is started only after each has
printed ``listening on PATH``, because QEMU connects during device realize and gives up at once
if nobody listens. Every process and file this module creates is removed again, also on timeout,
exception, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import initramfs
from .provision import GuestKit, provision
from .qemuconfig import load_args, placeholders

DEFAULT_APPEND = (
    "console=ttyS0 quiet panic=-1 reboot=t i8042.noaux i8042.nokbd i8042.nopnp "
    # Both initcalls cost ~0.2 s under TCG and nothing here needs them.
    "initcall_blacklist=jent_mod_init,load_system_certificate_list"
)
_RESULT = re.compile(rf"^{initramfs.RESULT_MARKER} rc=(\d+)", re.M)


class GuestError(RuntimeError):
    """The guest run failed; the message carries the logs needed to see why."""

    def __init__(self, message: str, result: GuestResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class VfuDevice:
    """A project device served by ``python -m vfu_server DEVICE`` over vfio-user.

    `device` is a device name (``example``) or ``module.path:ClassName``. `cwd` matters for the
    latter: ``python -m`` puts the working directory on sys.path.
    """

    device: str
    args: Sequence[str] = ()
    id: str | None = None
    env: Mapping[str, str] | None = None
    cwd: str | os.PathLike[str] | None = None
    config: str = "vfio-user"
    ready_timeout: float = 30.0
    #: the interpreter that runs the server (default: this one)
    python: str | None = None


@dataclass
class QemuDevice:
    """A device QEMU emulates itself, from qemu-configs/<config>.args (nvme, virtio-blk, ...)."""

    config: str
    params: Mapping[str, str] = field(default_factory=dict)
    id: str | None = None


def builtin_nvme(image: str | os.PathLike[str], id: str | None = None) -> QemuDevice:
    return QemuDevice("nvme", {"IMAGE": os.fspath(image)}, id)


def builtin_virtio_blk(image: str | os.PathLike[str], id: str | None = None) -> QemuDevice:
    return QemuDevice("virtio-blk", {"IMAGE": os.fspath(image)}, id)


def builtin_virtio_net(netdev: str = "user", id: str | None = None, mac: str = "52:54:00:12:34:56") -> QemuDevice:
    return QemuDevice("virtio-net", {"NETDEV": netdev, "MAC": mac}, id)


@dataclass
class ServerLog:
    name: str
    argv: list[str]
    stdout: str
    stderr: str
    returncode: int | None


@dataclass
class GuestResult:
    rc: int | None
    """Exit status of the test script, None if the guest never reported one."""
    serial: str
    qemu_stderr: str
    qemu_returncode: int | None
    servers: dict[str, ServerLog]
    qemu_argv: list[str]
    duration: float
    timed_out: bool = False

    @property
    def output(self) -> str:
        """What the script printed (stdout and stderr), without kernel messages or markers."""
        lines = self.serial.splitlines()
        begin = next(
            (i for i, ln in enumerate(lines) if ln.startswith(initramfs.BEGIN_MARKER)), None
        )
        if begin is None:
            return ""
        out: list[str] = []
        for ln in lines[begin + 1 :]:
            if ln.startswith(initramfs.RESULT_MARKER):
                break
            if ln.startswith(initramfs.OUTPUT_PREFIX):
                out.append(ln[len(initramfs.OUTPUT_PREFIX) :])
            elif ln == initramfs.OUTPUT_PREFIX.rstrip():
                out.append("")
        return "\n".join(out) + ("\n" if out else "")

    def values(self) -> dict[str, str]:
        """``key=value`` words of the script output, a cheap way for scripts to report facts."""
        found: dict[str, str] = {}
        for word in self.output.split():
            key, sep, value = word.partition("=")
            if sep and key:
                found[key] = value
        return found

    def qemu_warnings(self) -> list[str]:
        return [ln for ln in self.qemu_stderr.splitlines() if ln.strip()]

    def assert_no_qemu_warnings(self) -> None:
        if self.qemu_warnings():
            raise AssertionError("QEMU printed on stderr:\n" + self.qemu_stderr)

    def diagnostics(self, serial_lines: int = 60) -> str:
        parts = [
            f"guest script rc={self.rc}, QEMU rc={self.qemu_returncode}, "
            f"{self.duration:.1f}s{' (timed out)' if self.timed_out else ''}",
            "--- serial (tail) ---",
            _tail(self.serial, serial_lines),
            "--- QEMU stderr ---",
            _tail(self.qemu_stderr, 40) or "(empty)",
        ]
        for name, log in self.servers.items():
            parts += [
                f"--- server {name} (rc={log.returncode}) stderr ---",
                _tail(log.stderr, 40) or "(empty)",
            ]
        started = self.qemu_returncode is not None
        parts += [
            f"--- QEMU command{'' if started else ' (QEMU was not started)'} ---",
            " ".join(self.qemu_argv),
        ]
        return "\n".join(parts)


def _tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-n:])


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").replace("\r\n", "\n")
    except FileNotFoundError:
        return ""


def qemu_accel() -> str:
    # TCG unless told otherwise: KVM is often present but unusable in CI VMs (e.g. kvm_pvm
    # without VT-x/AMD-V, where a stock kernel crashes or crawls), and detecting that reliably
    # is harder than letting a developer with real KVM opt in.
    return os.environ.get("VFU_QEMU_ACCEL", "tcg")


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def _suppress_lookup() -> Iterator[None]:
    try:
        yield
    except ProcessLookupError:
        pass


class _Run:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.servers: list[tuple[str, list[str], subprocess.Popen[bytes], Path]] = []

    def start_server(self, dev: VfuDevice, dev_id: str) -> Path:
        sock = self.tmp / f"{dev_id}.sock"
        argv = [
            dev.python or sys.executable,
            "-m",
            "vfu_server",
            dev.device,
            "--socket-path",
            str(sock),
            *dev.args,
        ]
        logbase = self.tmp / f"server-{dev_id}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(dev.env or {})}
        with open(f"{logbase}.out", "wb") as out, open(f"{logbase}.err", "wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=dev.cwd,
                start_new_session=True,
            )
        self.servers.append((dev_id, argv, proc, logbase))
        deadline = time.monotonic() + dev.ready_timeout
        while True:
            if "listening on" in _read(Path(f"{logbase}.out")):
                return sock
            if proc.poll() is not None:
                raise RuntimeError(
                    f"device server {dev_id} ({dev.device}) exited with rc={proc.returncode} "
                    "before listening"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"device server {dev_id} ({dev.device}) did not print "
                    f"'listening on {sock}' within {dev.ready_timeout:.0f}s"
                )
            time.sleep(0.02)

    def stop_servers(self) -> dict[str, ServerLog]:
        logs: dict[str, ServerLog] = {}
        for dev_id, argv, proc, logbase in self.servers:
            _kill_group(proc, grace=5.0)
            logs[dev_id] = ServerLog(
                dev_id,
                argv,
                _read(Path(f"{logbase}.out")),
                _read(Path(f"{logbase}.err")),
                proc.returncode,
            )
        return logs


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While a guest runs, SIGTERM unwinds like Ctrl-C, so the cleanup below still stops QEMU
    and the servers: they run in sessions of their own, and a parent killed outright left them
    running. Only where SIGTERM still has its default action, and only in the main thread."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _watch_serial(qemu: subprocess.Popen[bytes], path: Path, watch: Callable[[str], None], deadline: float) -> None:
    """Wait for QEMU like ``qemu.wait`` until ``deadline``, handing each complete serial line
    to ``watch`` meanwhile."""
    pending = b""
    with open(path, "rb") as f:
        while True:
            try:
                qemu.wait(0.02)
                done = True
            except subprocess.TimeoutExpired:
                done = False
            pending += f.read()
            *lines, pending = pending.split(b"\n")
            for line in lines:
                watch(line.decode(errors="replace").rstrip("\r"))
            if done:
                return
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(qemu.args, 0)


@_sigterm_unwinds()
def run_guest(
    script: str,
    devices: Sequence[VfuDevice | QemuDevice] = (),
    *,
    kit: GuestKit | None = None,
    memory_mib: int = 512,
    timeout: float = 120.0,
    extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
    append: str = "",
    qemu_args: Sequence[str] = (),
    check: bool = True,
    shared_ram: bool = True,
    watch: Callable[[str], None] | None = None,
) -> GuestResult:
    """Boot the guest with `devices`, run `script` (busybox sh) in it, return what happened.

    `extra_files` maps guest paths to host files (e.g. a static binary built for a test); they
    are appended to the initramfs as a second archive. With `check` (the default) a guest that
    does not report ``rc=0`` raises GuestError carrying the serial tail, QEMU's and every
    server's stderr; a timeout, a QEMU or server start failure always raises.
    ``shared_ram=False`` gives the guest plain anonymous RAM (qemu-configs/ram-private.args):
    the servers then reach it through DMA_READ/DMA_WRITE messages only.
    ``watch`` is called with each line of the serial console as it arrives (within ~20 ms), on
    this thread, e.g. to sample host processes when the guest says a job starts.
    """
    kit = kit or provision()
    start = time.monotonic()
    keep = bool(os.environ.get("VFU_KEEP_GUEST_TMP"))
    tmp = Path(tempfile.mkdtemp(prefix="vfu-guest-"))
    run = _Run(tmp)
    qemu_argv: list[str] = []
    qemu: subprocess.Popen[bytes] | None = None
    timed_out = False
    failure: str | None = None
    servers: dict[str, ServerLog] = {}
    try:
        qemu_argv += _base_args(kit, tmp, script, memory_mib, append, shared_ram, extra_files)
        # In place: a device that fails to start leaves the arguments so far for the diagnostics.
        _add_device_args(qemu_argv, devices, run)
        qemu_argv += list(qemu_args)
        qemu = _start_qemu(qemu_argv, tmp)
        remaining = max(timeout - (time.monotonic() - start), 1.0)
        if not _wait_guest(qemu, tmp / "serial.log", watch, remaining):
            timed_out = True
            failure = f"guest did not finish within {timeout:.0f}s"
    except BaseException as exc:
        failure = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt etc.: still cleaned up by the finally below
    finally:
        if qemu is not None:
            _kill_group(qemu, grace=2.0)
        servers = run.stop_servers()
        serial = _read(tmp / "serial.log")
        qemu_err = _read(tmp / "qemu.err")
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    m = _RESULT.search(serial)
    result = GuestResult(
        rc=int(m.group(1)) if m else None,
        serial=serial,
        qemu_stderr=qemu_err,
        qemu_returncode=qemu.returncode if qemu else None,
        servers=servers,
        qemu_argv=qemu_argv,
        duration=time.monotonic() - start,
        timed_out=timed_out,
    )
    failure = _judge(result, failure, check)
    if failure is not None:
        kept = f" (files kept in {tmp})" if keep else ""
        raise GuestError(f"{failure}{kept}\n{result.diagnostics()}", result)
    return result


def _base_args(kit: GuestKit, tmp: Path, script: str, memory_mib: int, append: str,
               shared_ram: bool, extra_files: Mapping[str, str | os.PathLike[str]] | None
               ) -> list[str]:
    """QEMU, the machine, the kernel and an initramfs that runs `script` (qemu-configs/base.args
    and the RAM backend), before any device."""
    script_file = tmp / "script.sh"
    script_file.write_text(script)
    initrd = kit.initramfs
    if extra_files:
        initrd = tmp / "initrd.gz"
        initrd.write_bytes(kit.initramfs.read_bytes() + initramfs.extra_archive(extra_files))
    return [
        str(kit.qemu),
        *load_args(
            "base",
            {
                "ACCEL": qemu_accel(),
                "MEMORY": str(memory_mib),
                "KERNEL": str(kit.kernel),
                "INITRD": str(initrd),
                "SCRIPT": str(script_file),
                "APPEND": f"{DEFAULT_APPEND} {append}".strip(),
            },
        ),
        *load_args("ram-shared" if shared_ram else "ram-private", {"MEMORY": str(memory_mib)}),
    ]


def _add_device_args(qemu_argv: list[str], devices: Sequence[VfuDevice | QemuDevice], run: _Run) -> None:
    """Each device's arguments, one root-port chassis each; a VfuDevice's server is started
    first (QEMU connects once, at start-up, and never reconnects)."""
    counters: dict[str, int] = {}
    for chassis, dev in enumerate(devices, 1):
        prefix = "vu" if isinstance(dev, VfuDevice) else dev.config.replace("-", "")
        number = counters.get(prefix, 0)
        counters[prefix] = number + 1
        dev_id = dev.id or f"{prefix}{number}"
        params: dict[str, str] = {"ID": dev_id, "CHASSIS": str(chassis)}
        if isinstance(dev, VfuDevice):
            params["SOCKET"] = str(run.start_server(dev, dev_id))
        else:
            params.update(dev.params)
        missing = placeholders(dev.config) - params.keys()
        if missing:
            raise ValueError(f"qemu-configs/{dev.config}.args needs {sorted(missing)}")
        qemu_argv += load_args(dev.config, params)


def _start_qemu(qemu_argv: list[str], tmp: Path) -> subprocess.Popen[bytes]:
    """QEMU in a session of its own (so _kill_group reaches its helpers), the serial console to
    tmp/serial.log and stderr to tmp/qemu.err."""
    with open(tmp / "serial.log", "wb") as out, open(tmp / "qemu.err", "wb") as err:
        return subprocess.Popen(
            qemu_argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )


def _wait_guest(qemu: subprocess.Popen[bytes], serial: Path, watch: Callable[[str], None] | None,
                timeout: float) -> bool:
    """Wait up to `timeout` s for QEMU to exit (the guest powers off when its script ends),
    passing serial lines to `watch` meanwhile; False if it did not."""
    try:
        if watch is None:
            qemu.wait(timeout)
        else:
            _watch_serial(qemu, serial, watch, time.monotonic() + timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _judge(result: GuestResult, failure: str | None, check: bool) -> str | None:
    """What run_guest raises for, if anything: a failure on the way, no result from the guest
    (always), or with `check` a script that did not end with rc=0."""
    if failure is None and result.rc is None:
        failure = "guest did not report a result (crash, panic or QEMU failure)"
    elif failure is None and check and result.rc != 0:
        failure = f"guest script failed with rc={result.rc}"
    return failure if failure is not None and (check or result.rc is None) else None


async def run_guest_async(
    script: str, devices: Sequence[VfuDevice | QemuDevice] = (), **kwargs: object
) -> GuestResult:
    """`run_guest` in a worker thread, for trio tests. Cancellation waits for the cleanup."""
    import trio

    return await trio.to_thread.run_sync(functools.partial(run_guest, script, devices, **kwargs))  # type: ignore[arg-type]
