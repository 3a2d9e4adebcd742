"""bench.guest's fio plumbing: the terse (v3) parser and the guest script, without a guest."""

from __future__ import annotations

import pytest

from bench.guest_fio import JOBS, CpuWatch, Disk, collect, guest_script, parse_terse

# What fio 3.39 printed in the guest for a 4K 70/30 random mix (one second, QEMU's nvme).
MIX = "3;fio-3.39;qemu-nvme@4K_randrw_70-30_QD8@0;0;0;20368;20347;5086;1001;7;8550;78.987717;347.785899;101;9014;996.987641;1181.082021;50.000000%=522;99.000000%=6258;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;135;9023;1075.975358;1227.833543;16910;23792;100.000000%;20351.000000;4866.308868;8660;8651;2162;1001;8;4900;91.905799;337.220318;96;9195;1035.536428;1203.739255;50.000000%=552;99.000000%=6193;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;0%=0;141;9745;1127.442227;1269.779587;7009;10296;100.000000%;8652.500000;2324.259990;9.400000%;61.900000%;750;0;1;0.1%;0.1%;0.1%;99.9%;0.0%;0.0%;0.0%;0.00%;0.00%;0.00%;0.00%;0.00%;0.04%;11.22%;34.64%;21.22%;6.28%;11.23%;11.78%;3.58%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;nvme0n1;4367;1877;0;0;1760;838;2599;70.61%"


def test_terse_mix_adds_both_sides_and_takes_read_latency() -> None:
    r = parse_terse(MIX, 4096)
    assert r is not None
    assert r["iops"] == 5086 + 2162
    assert r["mbps"] == pytest.approx((20347 + 8651) * 1024 / 1e6)
    assert (r["p50"], r["p99"]) == (522, 6258)  # the read side's
    assert r["ios"] == (20368 + 8660) * 1024 / 4096


def test_terse_write_only_takes_write_latency() -> None:
    f = MIX.split(";")
    pct = [i for i, v in enumerate(f) if "%=" in v]
    f[pct[0] - 12] = "0"  # no bytes read
    r = parse_terse(";".join(f), 4096)
    assert r is not None and (r["p50"], r["p99"]) == (552, 6193)


@pytest.mark.parametrize("bad", ["", "3;fio-3.39;x", "2;" + MIX[2:], "fio: error"])
def test_terse_rejects_what_is_not_a_v3_line(bad: str) -> None:
    assert parse_terse(bad, 4096) is None


def test_collect_medians_and_cpu_per_io() -> None:
    disk = Disk("qemu-nvme", "QEMU nvme", "nvme")
    disk.pid = 1
    watch = CpuWatch({"qemu-nvme": disk})
    tag = "qemu-nvme@4K_randrw_70-30_QD8@0"
    watch.first[tag], watch.last[tag] = 10.0, 10.5
    found = collect(MIX + "\n", JOBS, watch)
    r = found[("qemu-nvme", "4K randrw 70-30 QD8")]
    assert r["cpu_us"] == pytest.approx(0.5 / ((20368 + 8660) / 4) * 1e6)


def test_script_rotates_disks_and_runs_every_job() -> None:
    sizes = {"a": 1000, "b": 2000, "c": 3000}
    script = guest_script(sizes, JOBS[:1], 1.5, 3)
    runs = [ln for ln in script.splitlines() if ln.startswith("fio --direct")]
    assert len(runs) == 3
    order = [[w.split("=")[1].split("@")[0] for w in run.split() if w.startswith("--name=")] for run in runs]
    assert order == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert all("--runtime=1.5" in run and "--stonewall" in run for run in runs)


def test_script_turns_a_write_through_disk_to_write_back_where_the_guest_may(tmp_path) -> None:
    """qemu-storage-daemon's export starts write-through; the script switches every disk whose
    cache_type the guest may write to write back (so fsync sends a FLUSH), leaves a read-only
    attribute alone and does not stop at a disk without one (NVMe)."""
    import subprocess

    script = guest_script({"a": 1000, "b": 2000, "c": 3000}, JOBS[:1], 1.5, 1)
    switch = [ln for ln in script.splitlines() if "cache_type" in ln]
    assert len(switch) == 3
    sysfs = tmp_path / "sys" / "block"
    (sysfs / "vda").mkdir(parents=True)
    (sysfs / "vda" / "cache_type").write_text("write through\n")
    # An attribute the kernel refuses to store (no CONFIG_WCE), even for root: an immutable file.
    (sysfs / "vdb").mkdir()
    refused = sysfs / "vdb" / "cache_type"
    refused.write_text("write through\n")
    if subprocess.run(["chattr", "+i", str(refused)], capture_output=True, check=False).returncode:
        refused.chmod(0o444)  # not root, or no chattr here: a read-only file
    (sysfs / "nvme0n1").mkdir()
    lines = [ln.replace("/sys/block", str(sysfs)) for ln in switch]
    shell = "set -e\na=/dev/vda\nb=/dev/vdb\nc=/dev/nvme0n1\n" + "\n".join(lines) + "\necho done\n"
    out = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "done", out
    try:
        assert (sysfs / "vda" / "cache_type").read_text() == "write back\n"
        assert refused.read_text() == "write through\n"
    finally:
        subprocess.run(["chattr", "-i", str(refused)], capture_output=True, check=False)
