"""bench.guest_net's plumbing without a guest: the NIC plan, the guest script's rotation and
the parser with its CPU readings."""

from __future__ import annotations

import math
import subprocess

import pytest

from bench.common import REPO, Variant
from bench.guest_net import CpuWatch, guest_script, parse, plan, report


def test_plan_pairs_every_variant_with_qemus_nic_alike() -> None:
    nics = plan([Variant("a"), Variant("b", ("--poll-us", "50"))], ["offloads", "plain"])
    assert [n.key for n in nics] == ["ours0-offloads", "ours0-plain", "ours1-offloads", "ours1-plain",
                                     "qemu-offloads", "qemu-plain"]
    assert len({n.mac for n in nics}) == len({n.net for n in nics}) == len(nics)
    assert [n.ours for n in nics] == [True] * 4 + [False] * 2


def test_script_rotates_nics_and_marks_every_run() -> None:
    nics = plan([Variant()], ["offloads", "plain"])
    script = guest_script(nics, ["tx", "rr"], 1.5, 3)
    runs = [ln.split()[1] for ln in script.splitlines()
            if ln.startswith("/usr/local/bin/netload") and ln.split()[2] != "counters"]
    assert len(runs) == 2 * 3 * 4
    firsts = [runs[i].split("/")[0] for i in range(0, 12, 4)]
    assert firsts == ["ours-offloads", "ours-plain", "qemu-offloads"]  # a new first NIC each round
    assert all(f"echo mark start {tag}" in script and f"echo mark end {tag}" in script for tag in runs)
    assert "rr 10.81.0.1 7000 1.5" in script and "tx 10.84.0.1 5000 1.5" in script


def test_parse_takes_medians_and_cpu_per_unit() -> None:
    nics = plan([Variant()], ["offloads"])
    watch = CpuWatch({n.key: n for n in nics})
    out = []
    for r, mbps in enumerate([100.0, 300.0, 200.0]):
        tag = f"ours-offloads/tx@{r}"
        out.append(f"netload name={tag} dir=tx mbps={mbps} bytes={int(mbps * 1e6 / 8)} seconds=1.000")
        watch.spent[tag] = (0.1, 0.5, 0.9, 1.0)
        watch.host[tag] = (50, 10, 200)
    out.append("netload name=qemu-offloads/rr@0 dir=rr mbps=0 bytes=2000 seconds=1.000 tps=1000.0 "
               "p50_us=900.0 p99_us=2000.0")
    watch.spent["qemu-offloads/rr@0"] = (float("nan"), 0.25, 0.5, 1.0)
    out.append("netload name=qemu-offloads/tx@1 dir=tx mbps=400.0 bytes=50000000 seconds=1.000")
    found = parse("\n".join(out), watch)
    tx = found[("ours-offloads", "tx")]
    assert tx["value"] == 200.0 and tx["runs"] == [100.0, 300.0, 200.0]
    assert tx["server_cpu"] == pytest.approx(0.1 * 1e6 / 25)  # 25 MB in the median run
    rr = found[("qemu-offloads", "rr")]
    assert rr["value"] == 1000.0 and rr["p50_us"] == 900.0
    assert rr["qemu_cpu"] == pytest.approx(250.0)  # 0.25 s over 1,000 turns
    assert rr["vcpu_pct"] == 50.0 and tx["vcpu_pct"] == 90.0
    assert (tx["host_idle"], tx["host_steal"]) == (25.0, 5.0)  # of all the host's ticks in the run
    assert rr["host_idle"] != rr["host_idle"]  # not read: n/a
    text = report(found, nics, ["tx", "rr"], "t")
    ours = text.split("QEMU's NICs")[0].splitlines()
    assert ours[4].split("|")[2].strip() == "TCP guest -> host" and ours[4].rstrip(" |").endswith("0.50")
    assert "100-300" in ours[4]  # every round's range
    assert ours[5].rstrip(" |").endswith("n/a")  # ours has no rr run: no ratio, listed last


VCPU = """
import ctypes, threading, time
def spin():
    ctypes.CDLL(None).prctl(15, b"CPU 0/TCG")  # PR_SET_NAME, as QEMU names its vCPU threads
    while True:
        pass
threading.Thread(target=spin, daemon=True).start()
time.sleep(30)
"""


def test_watch_reads_cpu_between_marks() -> None:
    import sys
    import time

    nics = plan([Variant()], ["offloads"])
    proc = subprocess.Popen([sys.executable, "-c", VCPU])
    try:
        watch = CpuWatch({n.key: n for n in nics}, qemu_pid=proc.pid)
        while watch.vcpu_thread() is None:  # until the thread has its name
            assert proc.poll() is None
            time.sleep(0.01)
        assert watch.vcpu_thread() != f"/proc/{proc.pid}/task/{proc.pid}"
        nics[0].pid = proc.pid
        watch("mark start ours-offloads/tx@0")
        watch("mark end ours-offloads/tx@0")
        watch("mark end qemu-offloads/tx@0")  # no start: nothing
        watch("netload name=x")
        assert set(watch.spent) == {"ours-offloads/tx@0"}
        assert all(v >= 0 for v in watch.spent["ours-offloads/tx@0"])  # server, process, vCPU thread, wall
        idle, steal, total = watch.host["ours-offloads/tx@0"]
        assert 0 <= idle <= total and 0 <= steal <= total
    finally:
        proc.kill()
        proc.wait()


def test_host_ticks_read_proc_stat(tmp_path) -> None:
    from bench.guest_net import host_ticks

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 1000 20 3 4 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert host_ticks(str(stat)) == (1020, 7, 1189)
    assert all(math.isnan(x) for x in host_ticks(str(tmp_path / "none")))


def test_netload_builds() -> None:
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-fsyntax-only", str(REPO / "bench" / "netload.c")],
                   check=True)


@pytest.mark.parametrize(("text", "modes"), [("both", ["offloads", "plain"]), ("offloads,plain", ["offloads", "plain"]),
                                             ("plain", ["plain"]), ("offloads", ["offloads"]), ("", []),
                                             ("bogus", []), ("offloads,bogus", [])])
def test_modes_take_both_as_the_help_says(text: str, modes: list[str]) -> None:
    from bench.guest_net import parse_modes

    assert parse_modes(text) == modes


def test_script_reads_the_drivers_counters_around_every_run() -> None:
    nics = plan([Variant()], ["offloads"])
    lines = guest_script(nics, ["tx"], 1.0, 2).splitlines()
    assert "dev1=$dev" in lines  # each NIC's interface, by its index in the plan
    run = next(i for i, ln in enumerate(lines) if ln.startswith("/usr/local/bin/netload qemu-offloads/tx@0 tx"))
    failed = ' || echo "netload failed qemu-offloads/tx@0 counters"'
    assert lines[run - 2] == "/usr/local/bin/netload qemu-offloads/tx@0 counters $dev1 start" + failed
    assert lines[run - 1] == "echo mark start qemu-offloads/tx@0"
    assert lines[run + 2] == "/usr/local/bin/netload qemu-offloads/tx@0 counters $dev1 end" + failed


def test_warm_up_runs_go_before_the_rounds_and_are_not_counted() -> None:
    nics = plan([Variant()], ["offloads"])
    lines = guest_script(nics, ["tx", "rr"], 1.0, 2, warmup=0.5).splitlines()
    runs = [ln.split()[1] for ln in lines if ln.startswith("/usr/local/bin/netload") and " counters " not in ln]
    assert runs == ["ours-offloads/tx@warm", "qemu-offloads/tx@warm", "ours-offloads/tx@0", "qemu-offloads/tx@0",
                    "qemu-offloads/tx@1", "ours-offloads/tx@1", "ours-offloads/rr@warm", "qemu-offloads/rr@warm",
                    "ours-offloads/rr@0", "qemu-offloads/rr@0", "qemu-offloads/rr@1", "ours-offloads/rr@1"]
    warm = next(ln for ln in lines if "ours-offloads/tx@warm" in ln)
    assert warm.endswith('tx 10.81.0.1 5000 0.5 >/dev/null || echo "netload failed ours-offloads/tx@warm"')
    assert "@warm" not in "".join(ln for ln in lines if ln.startswith("echo mark"))
    assert not any("@warm" in ln for ln in guest_script(nics, ["tx"], 1.0, 2).splitlines())


def _counters(tag: str, at: str, **values: int) -> str:
    return f"netcounters name={tag} at={at} " + " ".join(f"{k.replace('__', '.')}={v}" for k, v in values.items())


def test_driver_counts_per_thousand_frames_of_each_queue() -> None:
    tag = "ours-offloads/tx@0"
    output = "\n".join([
        _counters(tag, "start", cpu_busy=1000, cpu_idle=500, sys_rx_packets=100, sys_tx_packets=50, sys_tx_bytes=0, rx0_kicks=7, tx0_kicks=9,
                  tx_kicks=9, irq_input__0=10, irq_output__0=20, irq_config=1),
        "netload name=ours-offloads/tx@0 dir=tx mbps=800.0 bytes=100000000 seconds=1.000",
        _counters(tag, "end", cpu_busy=1270, cpu_idle=530, sys_rx_packets=2100, sys_tx_packets=4050, sys_tx_bytes=4000 * 65536, rx0_kicks=27,
                  tx0_kicks=1009, tx_kicks=1009, irq_input__0=1010, irq_output__0=520, irq_config=1),
        _counters("ours-offloads/tx@1", "start", sys_tx_packets=1),  # no end: left out
    ])
    from bench.guest_net import counter_deltas, driver_counts

    deltas = counter_deltas(output)
    assert set(deltas) == {tag} and deltas[tag]["tx0_kicks"] == 1000
    counts = driver_counts(deltas[tag])
    # 4,000 frames sent, 2,000 received; tx_kicks (the driver's total) is not counted twice
    assert counts == {"tx_kicks": 250.0, "rx_kicks": 10.0, "tx_irqs": 125.0, "rx_irqs": 500.0, "tx_kb": 64.0,
                      "guest_busy": 90.0}  # 270 of 300 ticks
    found = parse(output)
    assert found[("ours-offloads", "tx")]["tx_kicks"] == 250.0
    text = report(found, plan([Variant()], ["offloads"]), ["tx"], "t")
    row = next(ln for ln in text.split("what the guest's driver did")[1].splitlines() if ln.startswith("| ours"))
    assert [c.strip() for c in row.split("|")[8:15]] == ["n/a", "90.0", "64.0", "250", "125", "10.0", "500"]


def test_driver_counts_take_the_older_names_and_say_nothing_without_frames() -> None:
    from bench.guest_net import driver_counts

    counts = driver_counts({"sys_tx_packets": 10, "sys_tx_bytes": 10240, "tx_queue_0_kicks": 5,
                            "sys_rx_packets": 0, "rx_queue_0_kicks": 3})
    assert counts["tx_kicks"] == 500.0 and counts["tx_kb"] == 1.0
    nan = [k for k, v in counts.items() if v != v]
    assert sorted(nan) == ["guest_busy", "rx_irqs", "rx_kicks", "tx_irqs"]  # no frames received, no vectors read


def test_netload_counters_read_the_interface_or_say_why_not(tmp_path) -> None:
    exe = tmp_path / "netload"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(REPO / "bench" / "netload.c")], check=True)
    # lo has packet counters but no device behind it (no vectors) nor ethtool statistics
    r = subprocess.run([str(exe), "t/tx@0", "counters", "lo", "start"], capture_output=True, text=True)
    assert r.returncode == 1 and "/sys/class/net/lo/device" in r.stderr
    line = r.stdout.strip()
    assert line.startswith("netcounters name=t/tx@0 at=start cpu_busy=")
    values = dict(w.split("=") for w in line.split()[1:])
    assert int(values["sys_tx_bytes"]) >= 0 and int(values["cpu_busy"]) + int(values["cpu_idle"]) > 0
    r = subprocess.run([str(exe), "t", "counters", "s11t-none", "end"], capture_output=True, text=True)
    assert r.returncode == 1 and "s11t-none" in r.stderr
    r = subprocess.run([str(exe), "t", "counters", "lo"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr



def test_a_garbled_guest_line_is_left_out_not_fatal() -> None:
    """The serial console may cut or garble a line: the report goes on without it."""
    from bench.guest_net import counter_deltas

    good = "netload name=ours-offloads/tx@0 bytes=1000000 mbps=800.0"
    output = "\n".join([good, "netload name=ours-offloads/tx@1 bytes=10", "netload name=ours-offloads/tx@2 mbps=x bytes=1",
                        "netload bytes=5 mbps=1", "netcounters name=t at=start tx0_kicks=\u00b2 rx0_kicks=4"])
    assert parse(output)[("ours-offloads", "tx")]["runs"] == [800.0]
    assert counter_deltas(output + "\nnetcounters name=t at=end rx0_kicks=9") == {"t": {"rx0_kicks": 5}}


def test_a_failed_host_reading_leaves_the_host_shares_unknown(monkeypatch) -> None:
    import bench.guest_net as guest_net

    nics = plan([Variant()], ["offloads"])
    watch = CpuWatch({n.key: n for n in nics})
    watch("mark start ours-offloads/tx@0")
    monkeypatch.setattr(guest_net, "host_ticks", lambda: (math.nan,) * 3)
    watch("mark end ours-offloads/tx@0")
    assert watch.host["ours-offloads/tx@0"] is None
    shares = guest_net.host_shares(watch.host["ours-offloads/tx@0"])
    assert all(math.isnan(v) for v in shares.values())


def test_rr64k_runs_netload_rr_with_its_size_and_counts_transactions() -> None:
    nics = plan([Variant()], ["offloads"])
    lines = guest_script(nics, ["rr64k"], 1.0, 1).splitlines()
    assert any(ln.startswith("/usr/local/bin/netload ours-offloads/rr64k@0 rr 10.81.0.1 7000 1 65536 ")
               for ln in lines)
    out = parse("netload name=ours-offloads/rr64k@0 dir=rr mbps=0 bytes=1310720 seconds=1.0 tps=10.0 p50_us=90000.0")
    assert out[("ours-offloads", "rr64k")]["value"] == 10.0


def test_netload_rr_sends_and_takes_whole_messages(tmp_path) -> None:
    """netload rr with SIZE against an echo server on loopback: every turn moves SIZE bytes
    each way (a short read would be a second turn)."""
    import socket
    import threading

    exe = tmp_path / "netload"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(REPO / "bench" / "netload.c")], check=True)
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    received = []

    def echo() -> None:
        c, _ = ls.accept()
        while d := c.recv(65536):
            received.append(len(d))
            c.sendall(d)
        c.close()

    threading.Thread(target=echo, daemon=True).start()
    out = subprocess.run([str(exe), "t", "rr", "127.0.0.1", str(ls.getsockname()[1]), "0.2", "100000"],
                         capture_output=True, text=True, check=True).stdout
    kv = dict(w.split("=", 1) for w in out.split()[1:])
    turns, rest = divmod(int(kv["bytes"]), 2 * 100000)
    assert turns >= 1 and rest == 0 and abs(turns - float(kv["tps"]) * float(kv["seconds"])) < 2
    assert sum(received) in (100000 * turns, 100000 * (turns + 1))  # the last request may be in flight
    ls.close()
