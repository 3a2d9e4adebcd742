"""vfu_server.systemd's notifier against datagram sockets the test owns (path and abstract)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from vfu_server import systemd


def _receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096)
    return dict(line.split("=", 1) for line in data.decode().splitlines())


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_a_reload_says_reloading_with_its_time_then_ready(tmp_path, abstract) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"vfu-wt22-test-{os.getpid()}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify")
        sock.bind(address)
    sock.settimeout(10)
    try:
        notifier = systemd.install({"NOTIFY_SOCKET": address})
        assert notifier is not None
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading("reloading: starting the successor")
        reloading = _receive(sock)
        assert reloading["RELOADING"] == "1" and reloading["STATUS"] == "reloading: starting the successor"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.ready("serving")
        ready = _receive(sock)
        assert ready == {"READY": "1", "STATUS": "serving", "MAINPID": str(os.getpid())}
        systemd.status("one line")
        assert _receive(sock) == {"STATUS": "one line"}
    finally:
        systemd.install({})
        sock.close()


def test_outside_systemd_everything_is_a_no_op() -> None:
    assert systemd.install({}) is None
    assert systemd.Notifier.from_environ({"NOTIFY_SOCKET": "relative/path"}) is None
    systemd.status("nobody listens")


def test_a_manager_that_went_away_does_not_raise(tmp_path) -> None:
    notifier = systemd.Notifier(str(tmp_path / "gone"))
    assert notifier.send(ready=1) is False
    notifier.watchdog()  # logged once, never raised
