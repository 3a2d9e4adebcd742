"""``--sandbox``: a device server taken over by a hostile guest gains nothing, and keeps serving.

Every other integration test runs its servers with the sandbox on as well (the default); the
tests here attack it on purpose (tests/integration/hostile_device.py) and check what
``/proc/PID/status`` says about the running server.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio

from vfu_server.client import Client
from vfu_server.protocol.errors import RemoteError
from vfu_server.sandbox import landlock
from vfu_server.testing import running_server

HOSTILE = "tests.integration.hostile_device:Hostile"
# register offset -> what the device tries
ATTEMPTS = {0x00: "/etc/shadow", 0x04: "planted", 0x08: "os.execv", 0x0C: "socket", 0x10: "os.fork",
            0x14: "PTRACE_ATTACH"}
if landlock.abi_version() >= 6:  # signals scoped to the sandbox
    ATTEMPTS[0x1C] = "os.kill"
THREAD_REFUSED, THREAD_ESCAPED = 1, 2

needs_landlock = pytest.mark.skipif(landlock.abi_version() == 0, reason="this kernel has no Landlock")


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@pytest.fixture
def target(tmp_path):
    """A directory the device may try to plant a file in and a TCP listener it may try to reach."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    env = {"VFU_HOSTILE_DIR": str(tmp_path), "VFU_HOSTILE_PORT": str(listener.getsockname()[1])}
    yield env, listener
    listener.close()


def was_connected(listener: socket.socket) -> bool:
    try:
        listener.accept()[0].close()
        return True
    except BlockingIOError:
        return False


@needs_landlock
async def test_every_escape_is_refused_logged_and_the_server_keeps_serving(target, tmp_path):
    env, listener = target
    async with running_server(HOSTILE, env=env) as server:
        st = status(server.process.pid)
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st
        if os.geteuid() == 0:
            assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0, st
        async with await Client.connect(server.socket_path) as dev:
            for offset in ATTEMPTS:
                with pytest.raises(RemoteError) as info:
                    await dev.write32(0, offset, 1)
                assert info.value.errno == errno.EIO
                assert await dev.read32(0, 8) == 0xC0FFEE  # still serving, after each attempt
            await dev.write32(0, 0x18, 1)  # the same from a worker thread
            with trio.fail_after(10):
                while (result := await dev.read32(0, 4)) == 0:
                    await trio.sleep(0.02)
            assert result == THREAD_REFUSED
            assert await dev.read32(0, 0) == 0, "no attempt may succeed"
        async with await Client.connect(server.socket_path) as dev:  # and a new client is served
            assert await dev.config_read(0, 4) == 0xBAD61234
        assert await server.terminate() == 0
    log = server.stderr()
    assert "sandbox: landlock ABI" in log and "seccomp" in log, log
    refusals = [line for line in log.splitlines() if "refused by the sandbox" in line]
    assert len(refusals) == len(ATTEMPTS) + 1, log
    for what, line in zip(ATTEMPTS.values(), refusals, strict=False):
        assert what in line, (what, line)
    assert "Traceback" not in log and "ESCAPED" not in log, log
    assert not (tmp_path / "planted").exists()
    assert not was_connected(listener)
    assert not os.path.exists(server.socket_path), "removed at exit, from inside the sandbox"


async def test_without_the_sandbox_the_same_device_escapes(target, tmp_path):
    """The control: what the tests above see refused does succeed in an unconfined server
    (only the attempts that do no harm to the test run)."""
    env, listener = target
    async with running_server(HOSTILE, "--sandbox", "off", env=env) as server:
        assert status(server.process.pid)["Seccomp"] == "0"
        async with await Client.connect(server.socket_path) as dev:
            await dev.write32(0, 0x04, 1)
            await dev.write32(0, 0x0C, 1)
            await dev.write32(0, 0x10, 1)
            await dev.write32(0, 0x1C, 1)
            if os.geteuid() == 0:
                await dev.write32(0, 0x00, 1)
            assert await dev.read32(0, 0) == (5 if os.geteuid() == 0 else 4)
    assert (tmp_path / "planted").exists()
    assert was_connected(listener)
    assert "--sandbox off" in server.stderr()


async def test_log_mode_reports_instead_of_refusing(target, tmp_path):
    env, _ = target
    async with running_server(HOSTILE, "--sandbox", "log", env=env) as server:
        st = status(server.process.pid)
        assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
        async with await Client.connect(server.socket_path) as dev:
            await dev.write32(0, 0x10, 1)  # fork: logged by the kernel, not refused
            await dev.write32(0, 0x04, 1)  # Landlock is not enforced in log mode
            assert await dev.read32(0, 0) == 2
    assert "(log only, to the kernel log)" in server.stderr() and "landlock not enforced" in server.stderr()
    kernel_log = subprocess.run(["dmesg"], capture_output=True, text=True)
    if kernel_log.returncode == 0:  # readable here (root, or dmesg_restrict=0)
        # SECCOMP_RET_LOG records: the fork (clone without CLONE_THREAD, system call 56)
        # (unless the kernel's printk rate limit, 10 per 5 s without auditd, dropped it)
        logged = re.search(rf"type=1326 .* pid={server.process.pid} .* syscall=56 .* code=0x7ffc0000", kernel_log.stdout)
        assert logged or "limit exceeded" in kernel_log.stdout[-4000:], kernel_log.stdout[-2000:]


def run_server(*args: str, timeout: float = 60, check_listening: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a server to its end; ``check_listening``: one that serves is stopped (SIGTERM) once
    it says ``listening`` (its return code is then the clean exit's 0)."""
    cmd = [sys.executable, "-m", "vfu_server", *args]
    cwd = str(Path(__file__).resolve().parents[2])
    if not check_listening:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.startswith("listening on"):
            proc.terminate()
        out, err = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(cmd, proc.returncode, line + out, err)


def test_bad_sandbox_arguments_are_one_line_errors(tmp_path):
    sock = str(tmp_path / "s.sock")
    out = run_server("example", "--socket-path", sock, "--sandbox", "sometimes")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "--sandbox" in out.stderr
    out = run_server("example", "--socket-path", sock, "--user", "no-such-user-vfu")
    assert out.returncode == 2 and out.stderr.strip().endswith("--user no-such-user-vfu: no such user"), out.stderr
    assert not os.path.exists(sock)


@needs_landlock
def test_a_thread_the_sandbox_cannot_reach_stops_the_start(tmp_path):
    sock = tmp_path / "s.sock"
    out = run_server("tests.integration.hostile_device:OwnThread", "--socket-path", str(sock))
    assert out.returncode == 1 and out.stdout == "", out
    assert "thread(s) that are not trio's could not be confined" in out.stderr.strip().splitlines()[-1]
    assert not sock.exists()
    unconfined = run_server("tests.integration.hostile_device:OwnThread", "--socket-path", str(sock),
                            "--sandbox", "off", timeout=5, check_listening=True)
    assert unconfined.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs a server started as root")
async def test_user_drops_to_that_user_and_serves(request):
    nobody = pwd.getpwnam("nobody")
    # The socket directory must let the user reach and remove its socket at exit (pytest's
    # tmp_path is under a directory only root may enter).
    sockdir = Path(tempfile.mkdtemp(prefix="vfu-sandbox-user-"))
    request.addfinalizer(lambda: shutil.rmtree(sockdir, ignore_errors=True))
    os.chown(sockdir, nobody.pw_uid, nobody.pw_gid)
    sock = str(sockdir / "ex.sock")
    async with running_server("example", "--user", "nobody", socket_path=sock) as server:
        st = status(server.process.pid)
        assert st["Uid"].split() == [str(nobody.pw_uid)] * 4, st
        assert st["Gid"].split() == [str(nobody.pw_gid)] * 4, st
        assert st["Groups"] == "" and int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0, st
        async with await Client.connect(sock) as dev:
            assert await dev.config_read(0, 4) == 0xFE011234
        assert await server.terminate() == 0, server.stderr()
    assert "user nobody" in server.stderr()
    assert not os.path.exists(sock)


@pytest.mark.skipif(os.geteuid() == 0, reason="as root --user is allowed")
def test_user_is_refused_unless_root(tmp_path):
    out = run_server("example", "--socket-path", str(tmp_path / "s.sock"), "--user", "nobody")
    assert out.returncode == 2 and "only a server started as root" in out.stderr


# -- resource limits ----------------------------------------------------------------------------


async def test_resource_limits_and_bounded_control_clients(tmp_path):
    from vfu_server.server import MAX_CONTROL_CLIENTS

    ctl = str(tmp_path / "dev.ctl")
    async with running_server("example", "--control-socket", ctl) as server:
        limits = Path(f"/proc/{server.process.pid}/limits").read_text()
        nofile = next(line for line in limits.splitlines() if line.startswith("Max open files")).split()
        assert nofile[3] == nofile[4] and int(nofile[3]) <= 4096, nofile  # soft == hard: cannot be raised
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size")).split()
        assert core[4:6] == ["0", "0"], core  # no core file full of guest memory
        if landlock.abi_version() >= 6:
            # A control socket can hand the device over, whose fence may have to kill a successor.
            assert "not scoped: signals)" in server.stderr(), server.stderr()
        held = []
        try:
            for _ in range(MAX_CONTROL_CLIENTS):  # one after the other: the listen backlog is short
                stream = await trio.open_unix_socket(ctl)
                held.append(stream)
                await stream.send_all(b'{"cmd": "status"}\n')
                assert b'"ok": true' in await stream.receive_some(65536)  # being served
            extra = await trio.open_unix_socket(ctl)
            async with extra:
                reply = await extra.receive_some(65536)
                assert b'"EBUSY"' in reply and await extra.receive_some(100) == b""
        finally:
            for stream in held:
                await stream.aclose()
        # Once they are gone, a new control client is served again.
        with trio.fail_after(10):
            while True:
                stream = await trio.open_unix_socket(ctl)
                async with stream:
                    try:  # refused while the server has not yet seen the others go
                        await stream.send_all(b'{"cmd": "status"}\n')
                        if b'"ok": true' in await stream.receive_some(65536):
                            break
                    except trio.BrokenResourceError:
                        pass
                await trio.sleep(0.05)
        async with await Client.connect(server.socket_path) as dev:
            assert await dev.config_read(0, 4) == 0xFE011234


# -- live handover: fds leave a sandboxed server over a socket it already has -----------------

HANDOVER_CHILD = r"""
import os, socket, sys, trio
from vfu_server import sandbox

async def main():
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(sys.argv[1]); control.listen(1)
    device = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    device.bind(sys.argv[2]); device.listen(1)
    line = await sandbox.apply(sandbox.configure(None), own_sockets=sys.argv[1:3])
    print(line, flush=True)
    conn, _ = await trio.to_thread.run_sync(control.accept)
    state = os.memfd_create("device-state")  # made after the sandbox, as a handover would
    os.write(state, b"queues and registers")
    socket.send_fds(conn, [b"take them"], [device.fileno(), state])
    conn.close()

trio.run(main)
"""


@needs_landlock
async def test_a_sandboxed_server_can_hand_its_fds_over(tmp_path):
    control, device = str(tmp_path / "ctl"), str(tmp_path / "dev")
    proc = await trio.lowlevel.open_process([sys.executable, "-c", HANDOVER_CHILD, control, device],
                                            stdout=subprocess.PIPE, cwd=str(Path(__file__).resolve().parents[2]))
    try:
        line = await proc.stdout.receive_some(4096)
        assert line.startswith(b"sandbox: landlock"), line
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(control)
            msg, fds, _, _ = await trio.to_thread.run_sync(socket.recv_fds, conn, 100, 4)
        assert msg == b"take them" and len(fds) == 2
        listener = socket.socket(fileno=fds[0])
        with listener, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(device)  # the successor serves the predecessor's listening socket
            listener.accept()[0].close()
        assert os.pread(fds[1], 100, 0) == b"queues and registers"
        os.close(fds[1])
        assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await proc.stdout.aclose()


# -- every backend starts confined, with only what it declared -------------------------------

from server_helpers import assert_uring_in_use  # noqa: E402
from test_block_nbd import qemu_nbd, short_tmp  # noqa: E402,F401  (short_tmp is a fixture)

# (device, arguments with {disk}/{nbd}/{peer} filled in, what the start-up line must say)
BACKENDS = {
    "nvme-file": ("nvme", ["--backing", "{disk}"], ["seccomp 90 rules, nofile"]),
    "nvme-uring": ("nvme", ["--backing", "{disk}", "--backing-io", "uring", "--log-level", "info"],
                   ["seccomp 90 rules, nofile"]),
    "virtio-blk-ram": ("virtio-blk", ["--size", "16M"], ["seccomp 90 rules, nofile"]),
    # libnbd makes its connections at start-up and never again: no sockets, no ports
    "nvme-nbd-unix": ("nvme", ["--backing", "{nbd_unix}"], ["seccomp 90 rules, nofile"]),
    "virtio-blk-nbd-tcp": ("virtio-blk", ["--backing", "{nbd_tcp}"], ["seccomp 90 rules, nofile"]),
    "virtio-net-listen": ("virtio-net", ["--peer", "{peer}", "--listen"], ["seccomp 90 rules, nofile"]),
    "virtio-net-peer": ("virtio-net", ["--peer", "{peer}"], ["sockets UNIX"]),
}


@needs_landlock
@pytest.mark.parametrize("name", list(BACKENDS))
async def test_every_backend_starts_confined_and_serves(name, short_tmp):  # noqa: F811
    device, args, expected = BACKENDS[name]
    disk = short_tmp / "disk.raw"
    disk.write_bytes(bytes(16 << 20))
    fill = {"disk": str(disk), "peer": str(short_tmp / "peer.sock")}
    if "nbd" in name:
        nbd = qemu_nbd(short_tmp, "unix" if "unix" in name else "tcp")
        request_cleanup = nbd.kill
        fill["nbd_unix" if "unix" in name else "nbd_tcp"] = nbd.uri
    else:
        request_cleanup = None
    try:
        async with running_server(device, *(a.format(**fill) for a in args)) as server:
            st = status(server.process.pid)
            assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1", st
            async with await Client.connect(server.socket_path) as dev:
                assert await dev.config_read(0, 2) == (0x1AF4 if device.startswith("virtio") else 0x1234)
            if "nbd" in name:
                # A server on libnbd does not exit on SIGTERM yet, sandbox or not (its final
                # disconnect waits for ever); not this test's subject.
                await server.kill()
            else:
                assert await server.terminate() == 0, server.stderr()
        line = next(x for x in server.stderr().splitlines() if "sandbox:" in x)
        assert "landlock ABI" in line and "no_new_privs" in line, line
        for text in expected:
            assert text in line, (text, line)
        if "uring" in name:
            assert_uring_in_use(server.stderr())  # the ring made at start-up works in the sandbox
    finally:
        if request_cleanup is not None:
            request_cleanup()


# -- the handover fence: a sandboxed predecessor kills a successor that went silent after go -----

SILENT_AFTER_GO = r"""
import sys, time
from vfu_server import cli, handover

send = handover.Link.send

async def send_but_never_ack(self, obj, fds=()):
    if obj.get("msg") == "ack":
        print("got go", flush=True)
        while True:  # holds every fd, never answers: the predecessor must fence it off
            time.sleep(3600)
    await send(self, obj, fds)

handover.Link.send = send_but_never_ack
sys.exit(cli.main(sys.argv[1:]))
"""


@needs_landlock
async def test_a_sandboxed_predecessor_can_fence_off_a_silent_successor(tmp_path):
    ctl = str(tmp_path / "dev.ctl")
    repo = str(Path(__file__).resolve().parents[2])
    with trio.fail_after(120):
        async with running_server("nvme", "--size", "16M", "--control-socket", ctl) as pred:
            successor = await trio.lowlevel.open_process(
                [sys.executable, "-c", SILENT_AFTER_GO, "nvme", "--take-over", ctl, "--size", "16M",
                 "--handover-timeout", "1"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": repo}, cwd=repo)
            try:
                line = b""
                while not line.endswith(b"\n"):  # a pipe may deliver the line in pieces
                    chunk = await successor.stdout.receive_some(100)
                    assert chunk, "the successor ended before it got go"
                    line += chunk
                assert line == b"got go\n"
                assert await successor.wait() == -9, "killed by the predecessor's fence (SIGKILL)"
            finally:
                if successor.returncode is None:
                    successor.kill()
                    await successor.wait()
                await successor.stdout.aclose()
            async with await Client.connect(pred.socket_path) as dev:  # and it serves again
                assert await dev.config_read(0, 2) == 0x1234  # the NVMe controller's vendor id
            assert pred.process.returncode is None
    log = pred.stderr()
    assert "not scoped: signals" in log and "killing successor" in log, log
