"""``systemctl reload`` (SIGHUP) against real server processes: the server starts its successor
through a live handover, which becomes the service's main process; a client keeps its session.
Notifications go to a datagram socket the test owns (as systemd's would)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import trio
from test_systemd import REPO, NotifySocket

from vfu_server.client import Client
from vfu_server.testing import running_server


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def wait_gone(pid: int, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while alive(pid):
            await trio.sleep(0.05)


async def test_sighup_reloads_through_a_handover_and_the_client_stays(tmp_path):
    ctl = str(tmp_path / "ctl")
    notify = await NotifySocket(tmp_path / "notify").bind()
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"}
    new_pid = None
    try:
        with trio.fail_after(120):
            async with running_server("example", "--control-socket", ctl, env=env) as srv, \
                    await Client.connect(srv.socket_path) as client:
                old_pid = srv.process.pid
                assert (await notify.until("READY"))["MAINPID"] == str(old_pid)
                old_nice = os.getpriority(os.PRIO_PROCESS, old_pid)
                await client.write32(0, 4, 0xC0FFEE)
                srv.process.send_signal(signal.SIGHUP)
                reloading = await notify.until("RELOADING")
                assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
                ready = await notify.until("READY")
                new_pid = int(ready["MAINPID"])
                assert new_pid != old_pid and "taken over" in ready["STATUS"]
                # Started by the lowered predecessor: --nice counts from the same base, not again.
                assert os.getpriority(os.PRIO_PROCESS, new_pid) == old_nice
                assert await srv.process.wait() == 0
                # The client's session went on in the successor: same connection, same registers.
                assert await client.read32(0, 4) == 0xC0FFEE
                await client.write32(0, 4, 0xBEEF)
                assert await client.read32(0, 4) == 0xBEEF
                # The successor pings the watchdog (WATCHDOG_PID named its predecessor: dropped).
                notify.drain()
                await trio.sleep(1.5)
                assert any("WATCHDOG" in m for m in notify.drain())
                # And it reloads again in turn.
                os.kill(new_pid, signal.SIGHUP)
                third = int((await notify.until("READY"))["MAINPID"])
                assert third not in (old_pid, new_pid)
                await wait_gone(new_pid)
                new_pid = third
                assert await client.read32(0, 4) == 0xBEEF
                os.kill(new_pid, signal.SIGTERM)
                await wait_gone(new_pid)
    finally:
        if new_pid is not None and alive(new_pid):
            os.kill(new_pid, signal.SIGKILL)


async def test_a_refused_reload_keeps_the_old_server_serving(tmp_path):
    ctl = str(tmp_path / "ctl")
    notify = await NotifySocket(tmp_path / "notify").bind()
    # The successor would have another namespace size: the predecessor refuses the handover.
    env = {"NOTIFY_SOCKET": notify.path, "VFU_RELOAD_TEST_ARGS": "--size 32M"}
    with trio.fail_after(120):
        async with running_server("nvme", "--size", "16M", "--control-socket", ctl, env=env) as srv, \
                await Client.connect(srv.socket_path) as client:
            await notify.until("READY")
            before = await client.config_read(0, 4)
            srv.process.send_signal(signal.SIGHUP)
            await notify.until("RELOADING")
            ready = await notify.until("READY")
            assert ready["STATUS"].startswith("reload failed: handover refused: guest-visible profile differs")
            assert srv.process.returncode is None
            assert await client.config_read(0, 4) == before
            assert "reload failed: handover refused" in srv.stderr()
            assert srv.process.returncode is None
    assert srv.process.returncode == 0


async def test_a_successor_that_cannot_start_is_reported_and_a_second_sighup_is_ignored(tmp_path):
    ctl = str(tmp_path / "ctl")
    notify = await NotifySocket(tmp_path / "notify").bind()
    env = {"NOTIFY_SOCKET": notify.path, "VFU_RELOAD_TEST_ARGS": "--no-such-option"}
    with trio.fail_after(120):
        async with running_server("example", "--control-socket", ctl, env=env) as srv, \
                await Client.connect(srv.socket_path) as client:
            await notify.until("READY")
            srv.process.send_signal(signal.SIGHUP)
            await notify.until("RELOADING")
            srv.process.send_signal(signal.SIGHUP)  # while the first one runs
            ready = await notify.until("READY")
            assert "unrecognized arguments: --no-such-option" in ready["STATUS"], ready
            await client.write32(0, 4, 7)
            assert await client.read32(0, 4) == 7
            assert "a reload is already running; ignored" in srv.stderr()
            assert sum("RELOADING" in m for m in notify.messages) == 1


async def test_sighup_without_a_control_socket_does_nothing(tmp_path):
    notify = await NotifySocket(tmp_path / "notify").bind()
    with trio.fail_after(60):
        async with running_server("example", env={"NOTIFY_SOCKET": notify.path}) as srv, \
                await Client.connect(srv.socket_path) as client:
            await notify.until("READY")
            srv.process.send_signal(signal.SIGHUP)
            with trio.move_on_after(1):
                while "reload needs a control socket" not in srv.stderr():
                    await trio.sleep(0.05)
            assert "reload needs a control socket" in srv.stderr()
            await client.write32(0, 4, 9)
            assert await client.read32(0, 4) == 9
            assert not any("RELOADING" in m for m in notify.drain())
            assert srv.process.returncode is None
        assert srv.process.returncode == 0


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate (Debian's systemd package) is not installed")
async def test_a_socket_activated_server_reloads_and_its_successor_keeps_the_sockets(tmp_path):
    """The service's own shape: both sockets from systemd, no socket options on the command line;
    the successor takes over from the control socket's path and gets no LISTEN_* variables."""
    sock, ctl = str(tmp_path / "nvme.sock"), str(tmp_path / "nvme.ctl")
    notify = await NotifySocket(tmp_path / "notify").bind()
    cmd = ["systemd-socket-activate", "-l", sock, "-l", ctl, "--fdname=vfio-user:control",
           "-E", f"NOTIFY_SOCKET={notify.path}", "-E", f"PYTHONPATH={REPO}",
           sys.executable, "-m", "vfu_server", "nvme", "--size", "16M"]
    with open(tmp_path / "stderr", "wb") as err:
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                                env={**os.environ, "PYTHONPATH": REPO})
    new_pid = None
    try:
        with trio.fail_after(120):
            while not (os.path.exists(sock) and os.path.exists(ctl)):
                await trio.sleep(0.05)
            async with await Client.connect(sock) as dev:
                first = await dev.config_read(0, 4)
                await notify.until("READY")
                proc.send_signal(signal.SIGHUP)
                await notify.until("RELOADING")
                ready = await notify.until("READY")
                new_pid = int(ready["MAINPID"])
                assert new_pid != proc.pid, ready
                assert await proc.wait() == 0
                assert await dev.config_read(0, 4) == first
            os.kill(new_pid, signal.SIGTERM)
            await wait_gone(new_pid)
        # The sockets belong to the service manager: neither server removed them.
        assert os.path.exists(sock) and os.path.exists(ctl)
    except BaseException as exc:
        exc.add_note((tmp_path / "stderr").read_text(errors="replace")[-3000:])
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if new_pid is not None and alive(new_pid):
            os.kill(new_pid, signal.SIGKILL)
