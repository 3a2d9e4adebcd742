"""systemd's protocols against real server processes: readiness, status, stopping and watchdog
notifications to a datagram socket the test owns, and socket activation through
``systemd-socket-activate`` handing the vfio-user and the control socket to the server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from devices.nvme import NvmeController
from vfu_server.client import Client
from vfu_server.testing import running_server

REPO = str(Path(__file__).resolve().parents[2])


class NotifySocket:
    """The service manager's end: a datagram socket that collects notifications."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.messages: list[dict[str, str]] = []

    async def bind(self) -> NotifySocket:
        await self.sock.bind(self.path)
        return self

    async def next(self, timeout: float = 60) -> dict[str, str]:
        with trio.fail_after(timeout):
            data = await self.sock.recv(4096)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append(fields)
        return fields

    async def until(self, key: str, timeout: float = 60) -> dict[str, str]:
        with trio.fail_after(timeout):
            while True:
                fields = await self.next()
                if key in fields:
                    return fields

    def drain(self) -> list[dict[str, str]]:
        got = []
        while True:
            try:
                data = self.sock._sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return got
            got.append(dict(line.split("=", 1) for line in data.decode().splitlines() if line))


async def test_ready_only_once_serving_then_status_and_stopping(tmp_path):
    notify = await NotifySocket(tmp_path / "notify").bind()
    env = {"NOTIFY_SOCKET": notify.path}
    # The device needs 0.5 s to get ready: READY=1 must wait for it, and then it serves.
    async with running_server("tests.integration.buggy_device:SlowToStart", env=env) as srv:
        ready = await notify.until("READY")
        assert ready["READY"] == "1" and ready["MAINPID"] == str(srv.process.pid)
        assert "waiting for a client" in ready["STATUS"]
        async with await Client.connect(srv.socket_path) as dev:
            assert await dev.config_read(0, 4) == 0xBAD21234
            assert (await notify.next())["STATUS"] == "client 1 connected"
        assert "gone; waiting for a client" in (await notify.next())["STATUS"]
        srv.process.send_signal(signal.SIGTERM)
        stopping = await notify.until("STOPPING")
        assert stopping["STOPPING"] == "1" and stopping["STATUS"].startswith("stopping")
        with trio.fail_after(60):
            assert await srv.process.wait() == 0
    assert [m for m in notify.messages if "READY" in m] == [ready], "READY=1 exactly once"


def test_no_ready_for_a_device_that_cannot_start(tmp_path):
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(str(tmp_path / "notify"))
    out = subprocess.run([sys.executable, "-m", "vfu_server", "tests.integration.buggy_device:NeverReady",
                          "--socket-path", str(tmp_path / "dev.sock")], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert out.returncode == 1
    sent = []
    while True:
        try:
            sent.append(dgram.recv(4096, socket.MSG_DONTWAIT).decode())
        except BlockingIOError:
            break
    assert not any("READY=1" in s for s in sent), sent


async def test_watchdog_pings_from_the_event_loop_and_stop_when_it_is_stuck(tmp_path):
    notify = await NotifySocket(tmp_path / "notify").bind()
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "100000"}
    async with running_server("tests.integration.service_devices:Stuck", env=env) as srv:
        pings = 0
        while pings < 5:
            if "WATCHDOG" in await notify.next():
                pings += 1
        async with await Client.connect(srv.socket_path) as dev:
            await dev.write32(0, 0, 1, posted=True)  # the handler never returns
            # Whatever was sent before the loop got stuck arrives within this wait...
            await trio.sleep(2)
            notify.drain()
            # ...and then, at 20 pings a second while alive, not one more.
            await trio.sleep(2)
            assert notify.drain() == []
            await srv.kill()


def test_watchdog_for_another_pid_is_not_ours():
    from vfu_server import systemd

    assert systemd.watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 3.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}) == 3.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert systemd.watchdog_interval({}) is None


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate (Debian's systemd package) is not installed")
async def test_socket_activation_hands_both_sockets_to_the_server(tmp_path):
    sock, ctl = str(tmp_path / "nvme.sock"), str(tmp_path / "nvme.ctl")
    notify = await NotifySocket(tmp_path / "notify").bind()
    env = {**os.environ, "PYTHONPATH": REPO}
    # systemd-socket-activate passes its child only the variables named with -E.
    cmd = ["systemd-socket-activate", "-l", sock, "-l", ctl, "--fdname=vfio-user:control",
           "-E", f"NOTIFY_SOCKET={notify.path}", "-E", f"PYTHONPATH={REPO}",
           sys.executable, "-m", "vfu_server", "nvme", "--size", "16M"]
    with open(tmp_path / "stderr", "wb") as err:
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
    try:
        with trio.fail_after(60):
            while not (os.path.exists(sock) and os.path.exists(ctl)):
                await trio.sleep(0.05)
        # The first connection makes systemd-socket-activate exec the server, which finds
        # the connection waiting on the socket it was handed.
        async with await Client.connect(sock) as dev:
            ident = NvmeController.identity
            assert await dev.config_read(0, 4) == ident.device_id << 16 | ident.vendor_id
            ready = await notify.until("READY")
            assert "socket activation" in ready["STATUS"]
            stream = await trio.open_unix_socket(ctl)
            async with stream:
                await stream.send_all(b'{"cmd": "list-formats"}\n')
                reply = json.loads(await stream.receive_some(65536))
            assert reply["ok"] and reply["formats"]
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            assert await proc.wait() == 0
        # The sockets belong to the service manager: the server leaves them in place.
        assert os.path.exists(sock) and os.path.exists(ctl)
    except BaseException as exc:
        exc.add_note((tmp_path / "stderr").read_text(errors="replace")[-3000:])
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate (Debian's systemd package) is not installed")
def test_socket_activation_with_unknown_names_is_a_one_line_error(tmp_path):
    sock, other = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    proc = subprocess.Popen(["systemd-socket-activate", "-l", sock, "-l", other, "--fdname=vfio-user:metrics",
                             sys.executable, "-m", "vfu_server", "nvme", "--size", "1M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if os.path.exists(sock):
                break
            trio.run(trio.sleep, 0.05)
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(sock)  # starts the server
        out, err = proc.communicate(timeout=60)
        probe.close()
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert "socket activation: fd 4 is named 'metrics'" in err.splitlines()[-1]
    assert out == ""
