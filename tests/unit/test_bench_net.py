"""bench.guest_net's plumbing without a guest: the NIC plan, the guest script's rotation and
the parser with its CPU readings."""

from __future__ import annotations

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
    runs = [ln.split()[1] for ln in script.splitlines() if ln.startswith("/usr/local/bin/netload")]
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
        watch.spent[tag] = (0.1, 0.5)
    out.append("netload name=qemu-offloads/rr@0 dir=rr mbps=0 bytes=2000 seconds=1.000 tps=1000.0 "
               "p50_us=900.0 p99_us=2000.0")
    watch.spent["qemu-offloads/rr@0"] = (float("nan"), 0.25)
    out.append("netload name=qemu-offloads/tx@1 dir=tx mbps=400.0 bytes=50000000 seconds=1.000")
    found = parse("\n".join(out), watch)
    tx = found[("ours-offloads", "tx")]
    assert tx["value"] == 200.0 and tx["runs"] == [100.0, 300.0, 200.0]
    assert tx["server_cpu"] == pytest.approx(0.1 * 1e6 / 25)  # 25 MB in the median run
    rr = found[("qemu-offloads", "rr")]
    assert rr["value"] == 1000.0 and rr["p50_us"] == 900.0
    assert rr["qemu_cpu"] == pytest.approx(250.0)  # 0.25 s over 1,000 turns
    text = report(found, nics, ["tx", "rr"], "t")
    ours = text.split("QEMU's NICs")[0].splitlines()
    assert ours[4].split("|")[2].strip() == "TCP guest -> host" and ours[4].rstrip(" |").endswith("0.50")
    assert "100-300" in ours[4]  # every round's range
    assert ours[5].rstrip(" |").endswith("n/a")  # ours has no rr run: no ratio, listed last


def test_watch_reads_cpu_between_marks() -> None:
    nics = plan([Variant()], ["offloads"])
    proc = subprocess.Popen(["sleep", "30"])
    try:
        nics[0].pid = proc.pid
        watch = CpuWatch({n.key: n for n in nics}, qemu_pid=proc.pid)
        watch("mark start ours-offloads/tx@0")
        watch("mark end ours-offloads/tx@0")
        watch("mark end qemu-offloads/tx@0")  # no start: nothing
        watch("netload name=x")
        assert set(watch.spent) == {"ours-offloads/tx@0"}
        assert watch.spent["ours-offloads/tx@0"][0] >= 0
    finally:
        proc.kill()
        proc.wait()


def test_netload_builds() -> None:
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-fsyntax-only", str(REPO / "bench" / "netload.c")],
                   check=True)


@pytest.mark.parametrize(("text", "modes"), [("both", ["offloads", "plain"]), ("offloads,plain", ["offloads", "plain"]),
                                             ("plain", ["plain"]), ("offloads", ["offloads"]), ("", []),
                                             ("bogus", []), ("offloads,bogus", [])])
def test_modes_take_both_as_the_help_says(text: str, modes: list[str]) -> None:
    from bench.guest_net import parse_modes

    assert parse_modes(text) == modes
