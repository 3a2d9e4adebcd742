"""The successor's command line and environment for ``systemctl reload`` (vfu_server/reload.py)."""

from vfu_server.reload import successor_argv, successor_env


def test_socket_options_give_way_to_take_over(monkeypatch):
    monkeypatch.delenv("VFU_RELOAD_TEST_ARGS", raising=False)
    argv = ["nvme", "--socket-path", "/run/a.sock", "--backing", "d.img", "--control-socket=/run/a.ctl",
            "--size", "16M", "--fd=3"]
    assert successor_argv(argv, "/run/a.ctl") == ["nvme", "--backing", "d.img", "--size", "16M",
                                                  "--take-over", "/run/a.ctl"]
    # A successor reloading in turn replaces its own --take-over.
    assert successor_argv(["example", "--take-over", "/x.ctl", "--log-level", "info"], "/x.ctl") == \
        ["example", "--log-level", "info", "--take-over", "/x.ctl"]
    monkeypatch.setenv("VFU_RELOAD_TEST_ARGS", "--size '32M'")
    assert successor_argv(["nvme"], "/c")[-2:] == ["--size", "32M"]


def test_environment_keeps_notify_drops_activation_and_watchdog_pid():
    env = successor_env({"NOTIFY_SOCKET": "/run/n", "LISTEN_FDS": "2", "LISTEN_PID": "5", "LISTEN_FDNAMES": "a:b",
                         "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "5", "PATH": "/bin"})
    assert env == {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "10000000", "PATH": "/bin"}
