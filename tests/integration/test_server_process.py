"""``vfu-server`` as a process: signals, socket files, inherited fds, CLI errors, --trace."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio
from server_helpers import MAGIC, MAGIC_VALUE, SCRATCH

from vfu_server.client import Client
from vfu_server.pci.polling import DEFAULT_NICE, MAX_NICE
from vfu_server.protocol.negotiation import client_offer
from vfu_server.testing import running_server
from vfu_server.testing.process import first_line

REPO = str(Path(__file__).resolve().parents[2])
TIMEOUT = 30


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, e.get("PYTHONPATH")) if p)
    return e


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(prefix="vfu-proc-") as d:
        yield d


async def run_cli(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
    return await trio.run_process(
        [sys.executable, "-m", "vfu_server", *args],
        capture_stdout=True, capture_stderr=True, check=False, env=env(), pass_fds=pass_fds,
    )


class Spawned:
    def __init__(self, proc: trio.Process, stderr_path: str) -> None:
        self.proc = proc
        self.stderr_path = stderr_path

    def stderr(self) -> str:
        return Path(self.stderr_path).read_text(errors="replace")


async def spawn(workdir: str, *args: str, pass_fds: tuple[int, ...] = ()) -> tuple[Spawned, str]:
    """Start the server and wait for its ``listening on`` line."""
    err_path = os.path.join(workdir, "stderr")
    with open(err_path, "wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "vfu_server", *args], stdout=subprocess.PIPE, stderr=err,
            env=env(), pass_fds=pass_fds,
        )
    line = b""
    while not line.endswith(b"\n"):
        chunk = await proc.stdout.receive_some(1)
        if not chunk:
            break
        line += chunk
    return Spawned(proc, err_path), line.decode()


async def stop(sp: Spawned) -> int:
    if sp.proc.returncode is None:
        sp.proc.terminate()
    await sp.proc.wait()
    await sp.proc.stdout.aclose()
    return sp.proc.returncode


# --------------------------------------------------------------------------------------------
# shutdown and the socket file


async def test_sigterm_exits_0_and_removes_the_socket() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server("example") as srv:
            path = srv.socket_path
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
            assert await srv.terminate() == 0, srv.stderr()
            assert not os.path.exists(path)
            assert "Traceback" not in srv.stderr()


async def test_sigterm_with_a_client_connected() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server("example") as srv, await Client.connect(srv.socket_path) as c:
            await c.write32(0, SCRATCH, 5, posted=True)
            assert await c.read32(0, SCRATCH) == 5
            assert await srv.terminate() == 0, srv.stderr()
            assert not os.path.exists(srv.socket_path)
            assert "Traceback" not in srv.stderr()


async def test_path_that_is_not_a_socket_is_refused(workdir) -> None:
    path = os.path.join(workdir, "important.txt")
    Path(path).write_text("keep me")
    with trio.fail_after(TIMEOUT):
        res = await run_cli("example", "--socket-path", path)
    assert res.returncode == 2
    assert res.stderr.decode().count("\n") == 1 and b"not a socket" in res.stderr
    assert Path(path).read_text() == "keep me"


async def test_path_with_a_live_server_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server("example") as srv:
            res = await run_cli("example", "--socket-path", srv.socket_path)
            assert res.returncode == 2 and res.stderr.decode().count("\n") == 1
            # The first server is untouched.
            async with await Client.connect(srv.socket_path) as c:
                assert await c.read32(0, MAGIC) == MAGIC_VALUE


async def test_stale_socket_is_replaced(workdir) -> None:
    path = os.path.join(workdir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens
    with trio.fail_after(TIMEOUT):
        async with running_server("example", socket_path=path) as srv:
            async with await Client.connect(srv.socket_path) as c:
                assert await c.read32(0, MAGIC) == MAGIC_VALUE
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


# --------------------------------------------------------------------------------------------
# inherited sockets


async def test_fd_inherited_listening_socket(workdir) -> None:
    path = os.path.join(workdir, "inherited.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(4)
    fd = lsock.fileno()
    os.set_inheritable(fd, True)
    try:
        with trio.fail_after(TIMEOUT):
            sp, line = await spawn(workdir, "example", "--fd", str(fd), pass_fds=(fd,))
            try:
                assert line == f"listening on fd {fd}\n", sp.stderr()
                for value in (1, 2):  # two clients in turn
                    async with await Client.connect(path) as c:
                        await c.write32(0, SCRATCH, value)
                        assert await c.read32(0, SCRATCH) == value
            finally:
                rc = await stop(sp)
            assert rc == 0, sp.stderr()
    finally:
        lsock.close()


async def test_fd_inherited_connected_socket(workdir) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = theirs.fileno()
    os.set_inheritable(fd, True)
    with trio.fail_after(TIMEOUT):
        sp, line = await spawn(workdir, "example", "--fd", str(fd), pass_fds=(fd,))
        theirs.close()
        try:
            assert line.startswith("listening on"), sp.stderr()
            client = Client(trio.socket.from_stdlib_socket(ours))
            client._offer = client_offer()
            async with client:
                assert await client.read32(0, MAGIC) == MAGIC_VALUE
                await client.write32(0, SCRATCH, 42)
                assert await client.read32(0, SCRATCH) == 42
            # The one connection ended: the server exits by itself, cleanly.
            await sp.proc.wait()
            assert sp.proc.returncode == 0, sp.stderr()
        finally:
            await stop(sp)


# --------------------------------------------------------------------------------------------
# command line errors: one line on stderr, exit code 2


def _regular_file_fd(workdir: str) -> int:
    fd = os.open(os.path.join(workdir, "plain"), os.O_CREAT | os.O_RDWR, 0o600)
    os.set_inheritable(fd, True)
    return fd


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--socket-path", "{dir}/a.sock"],
        ["no-such-device", "--socket-path", "{dir}/a.sock"],
        ["no.such.module:Klass", "--socket-path", "{dir}/a.sock"],
        ["example"],
        ["example", "--socket-path", "{dir}/a.sock", "--fd", "3"],
        ["example", "--fd", "three"],
        ["example", "--fd", "987"],
        ["example", "--socket-path", "{dir}/a.sock", "--log-level", "loud"],
        ["example", "--socket-path", "{dir}/a.sock", "--bogus-option"],
        ["example", "--socket-path", "{dir}/no/such/dir/a.sock"],
        ["example", "--fd", "{plainfd}"],
        ["example", "--socket-path", "{dir}/a.sock", "--nice", "20"],
        ["example", "--socket-path", "{dir}/a.sock", "--nice", "-1"],
        ["example", "--socket-path", "{dir}/a.sock", "--nice", "low"],
    ],
)
async def test_bad_arguments(workdir, args) -> None:
    fd = _regular_file_fd(workdir)
    try:
        argv = [a.format(dir=workdir, plainfd=fd) for a in args]
        with trio.fail_after(TIMEOUT):
            res = await run_cli(*argv, pass_fds=(fd,))
    finally:
        os.close(fd)
    err = res.stderr.decode()
    assert res.returncode == 2, (argv, err)
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and err.startswith("vfu-server")
    assert res.stdout == b""
    assert not os.path.exists(os.path.join(workdir, "a.sock"))


async def test_list_devices_and_help() -> None:
    with trio.fail_after(TIMEOUT):
        res = await run_cli("--list-devices")
        assert res.returncode == 0 and re.search(rb"^example\t", res.stdout, re.M)
        res = await run_cli("--help")
        assert res.returncode == 0 and b"usage" in res.stdout


# --------------------------------------------------------------------------------------------
# --trace


TRACE = re.compile(r"vfu_server\.trace \w+: (->|<-) (\S+) (request|reply) id=(\d+)")


async def test_trace_prints_one_line_per_message_each_way() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server("example", "--trace") as srv:
            async with await Client.connect(srv.socket_path) as c:
                await c.read32(0, MAGIC)
                await c.write32(0, SCRATCH, 1, posted=True)
                await c.write32(0, SCRATCH, 2)
                await c.read32(0, SCRATCH)
            assert await srv.terminate() == 0
            lines = [TRACE.search(line) for line in srv.stderr().splitlines()]
            seen = [(t.group(1), t.group(2), t.group(3)) for t in lines if t]
    assert seen == [
        ("->", "VERSION", "request"),
        ("<-", "VERSION", "reply"),
        ("->", "REGION_READ", "request"),
        ("<-", "REGION_READ", "reply"),
        ("->", "REGION_WRITE", "request"),  # posted: no reply
        ("->", "REGION_WRITE", "request"),
        ("<-", "REGION_WRITE", "reply"),
        ("->", "REGION_READ", "request"),
        ("<-", "REGION_READ", "reply"),
    ]


async def test_no_trace_without_the_flag() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server("example") as srv:
            async with await Client.connect(srv.socket_path) as c:
                await c.read32(0, MAGIC)
            assert await srv.terminate() == 0
            assert "vfu_server.trace" not in srv.stderr()


# --------------------------------------------------------------------------------------------
# --socket-poll-us: the busy look for the next message

DISCONNECTED = re.compile(r"client 1 disconnected \((\d+) batches found by looking, (\d+) after sleeping\)")


async def _reads_then_counts(*server_args: str, reads: int = 300) -> tuple[int, int]:
    async with running_server("example", "--log-level", "info", *server_args) as srv:
        async with await Client.connect(srv.socket_path) as c:
            for _ in range(reads):
                assert await c.read32(0, MAGIC) == MAGIC_VALUE
        with trio.fail_after(TIMEOUT):
            while not DISCONNECTED.search(srv.stderr()):
                await trio.sleep(0.02)
        assert await srv.terminate() == 0
        found, waited = DISCONNECTED.search(srv.stderr()).groups()
    return int(found), int(waited)


async def test_socket_poll_finds_the_next_message() -> None:
    # A window far longer than the client's turn-around: once it has grown (16 us, doubling
    # per wake-up), every request is found by looking.
    with trio.fail_after(TIMEOUT):
        found, waited = await _reads_then_counts("--socket-poll-us", "200000")
    assert found >= 250 and waited <= 50, (found, waited)


async def test_socket_poll_off() -> None:
    with trio.fail_after(TIMEOUT):
        found, waited = await _reads_then_counts("--socket-poll-us", "0")
    assert found == 0 and waited >= 300, (found, waited)


# --------------------------------------------------------------------------------------------
# --nice: the server lowers its own CPU priority (every thread it starts inherits it)


def _thread_nices(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.parametrize(("args", "lowered_by"), [((), DEFAULT_NICE), (("--nice", "7"), 7), (("--nice", "0"), 0)])
async def test_nice(args, lowered_by) -> None:
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    with trio.fail_after(TIMEOUT):
        async with running_server("example", *args) as srv:
            async with await Client.connect(srv.socket_path) as c:
                assert await c.read32(0, MAGIC) == MAGIC_VALUE
                assert _thread_nices(srv.process.pid) == {min(MAX_NICE, ours + lowered_by)}
            assert await srv.terminate() == 0


FLOOD = """
import socket, sys
from vfu_server.protocol.codec import encode
from vfu_server.protocol.constants import Command
from vfu_server.protocol.messages import REGION_ACCESS
from vfu_server.protocol.negotiation import client_offer

sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(encode(0, Command.VERSION, client_offer().pack()))
sock.recv(4096)
burst = b"".join(encode(i, Command.REGION_WRITE, REGION_ACCESS.pack(4, 0, 4) + i.to_bytes(4, "little"),  # SCRATCH
                        no_reply=True) for i in range(1, 65))
print("flooding", flush=True)
try:
    while True:
        sock.sendall(burst)
except OSError:
    pass
"""


async def test_the_rest_of_the_server_runs_while_messages_keep_coming(tmp_path) -> None:
    # Posted writes from another process as fast as it can send them: with a long window
    # the busy look always finds more, and only its regular pass through the scheduler lets
    # the control socket's listener (woken by epoll) and SIGTERM in.
    from test_control_socket import _ask

    ctl = str(tmp_path / "dev.ctl")
    with trio.fail_after(TIMEOUT):
        async with running_server("example", "--socket-poll-us", "1000000", "--control-socket", ctl) as srv:
            flood = await trio.lowlevel.open_process([sys.executable, "-c", FLOOD, srv.socket_path],
                                                     stdout=subprocess.PIPE, env=env())
            try:
                assert await first_line(flood, TIMEOUT) == b"flooding\n"  # however the pipe splits it
                await trio.sleep(0.5)
                # Answered in ~10 ms; without the scheduler passes, not while the flood lasts.
                with trio.fail_after(3):
                    (status,) = await _ask(ctl, {"cmd": "status"})
                    assert status["ok"], status
                with trio.fail_after(3):
                    assert await srv.terminate() == 0, srv.stderr()
            finally:
                flood.kill()
                await flood.wait()
                await flood.stdout.aclose()
            assert "Traceback" not in srv.stderr()


async def test_a_long_look_lets_the_rest_of_the_server_in(tmp_path) -> None:
    # Reads 0.3 s apart grow the window past 0.3 s (it doubles per wake-up until the look
    # catches the next read), then the client goes quiet: the look that follows passes
    # through the scheduler every millisecond, so the control socket need not wait for it.
    from test_control_socket import _ask

    ctl = str(tmp_path / "dev.ctl")
    with trio.fail_after(TIMEOUT):
        async with running_server("example", "--socket-poll-us", "1000000", "--control-socket", ctl) as srv:
            async with await Client.connect(srv.socket_path) as c:
                for _ in range(20):
                    await c.read32(0, MAGIC)
                    await trio.sleep(0.3)
                await c.read32(0, MAGIC)
                await trio.sleep(0.05)  # the server looks for the next read now
                # ~1 ms; held until the window ends (~0.45 s more) without the scheduler passes
                with trio.fail_after(0.25):
                    (status,) = await _ask(ctl, {"cmd": "status"})
                assert status["ok"], status
            assert await srv.terminate() == 0
