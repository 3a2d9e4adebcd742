"""Host-only checks of the guest harness pieces (no QEMU, no network)."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from vfu_guest import initramfs
from vfu_guest.aptenv import _sources_from_deb822, _sources_from_list
from vfu_guest.qemuconfig import configs_dir, load_args, parse_args_text, placeholders
from vfu_guest.runner import GuestResult
from vfu_guest.static import build_static


def _entries(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc archive: name -> (mode, data)."""
    out: dict[str, tuple[int, bytes]] = {}
    i = 0
    while True:
        assert archive[i : i + 6] == b"070701"
        mode = int(archive[i + 14 : i + 22], 16)
        size = int(archive[i + 54 : i + 62], 16)
        namesize = int(archive[i + 94 : i + 102], 16)
        name = archive[i + 110 : i + 110 + namesize - 1].decode()
        j = i + 110 + namesize
        j += -j % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, archive[j : j + size])
        j += size
        i = j + (-j % 4)


def test_extra_archive_places_files_with_parents(tmp_path: Path) -> None:
    tool = tmp_path / "loadgen"
    tool.write_bytes(b"\x7fELF fake")
    tool.chmod(0o755)
    data = tmp_path / "data.txt"
    data.write_text("hello")
    entries = _entries(
        gzip.decompress(initramfs.extra_archive({"/usr/local/bin/loadgen": tool, "/sbin/x": data}))
    )
    assert entries["usr/local/bin/loadgen"] == (stat.S_IFREG | 0o755, b"\x7fELF fake")
    assert stat.S_ISDIR(entries["usr/local/bin"][0])
    # /sbin is a symlink in the base archive; writing through it must not replace it.
    assert entries["bin/x"] == (stat.S_IFREG | 0o644, b"hello")
    assert "sbin" not in entries


def test_parse_args_format() -> None:
    text = '# comment\n\n-device {"a": "${X}", "b": 1}\n-nodefaults\n-append a=1 b=${Y}\n'
    assert parse_args_text(text, {"X": "x", "Y": "y"}) == [
        "-device",
        '{"a": "x", "b": 1}',
        "-nodefaults",
        "-append",
        "a=1 b=y",
    ]
    with pytest.raises(KeyError, match=r"<text>:3: no value for \$\{X\}"):
        parse_args_text(text, {"Y": "y"})


def test_vfio_user_config_is_json_socket() -> None:
    args = load_args("vfio-user", {"ID": "vu0", "CHASSIS": "1", "SOCKET": "/tmp/s.sock"})
    assert args == [
        "-device",
        "pcie-root-port,id=vu0-port,chassis=1",
        "-device",
        '{"driver":"vfio-user-pci","id":"vu0","bus":"vu0-port",'
        '"socket":{"type":"unix","path":"/tmp/s.sock"}}',
    ]


def test_every_config_file_is_documented() -> None:
    readme = (configs_dir() / "README.md").read_text()
    for f in configs_dir().glob("*.args"):
        assert f"`{f.name}`" in readme
        for name in placeholders(f.stem):
            assert f"`{name}`" in readme, (f.name, name)


def test_mirror_from_sources() -> None:
    deb822 = (
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert _sources_from_deb822(deb822) == ["http://mirror.example/debian"]
    classic = "deb http://sec.example/ bookworm-security main\ndeb [arch=amd64] http://m.example/d bookworm main\n"
    assert _sources_from_list(classic) == ["http://m.example/d"]


def test_result_output_drops_kernel_lines() -> None:
    serial = (
        "[    1.0] early\nVFU-BEGIN uptime=1\n| a=1\n[    2.0] nvme nvme0: irq=5\n|\n| b=2 c\n"
        "VFU-RESULT rc=0 uptime=3\n"
    )
    r = GuestResult(0, serial, "", 0, {}, [], 1.0)
    assert r.output == "a=1\n\nb=2 c\n"
    assert r.values() == {"a": "1", "b": "2"}


def test_watch_serial_hands_over_complete_lines(tmp_path: Path) -> None:
    """run_guest(watch=...): each complete line of a real process's output, as it is written."""
    import subprocess
    import time

    from vfu_guest.runner import _watch_serial

    log = tmp_path / "serial.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["sh", "-c", "printf 'one\\r\\ntw'; sleep 0.2; printf 'o\\nthree'"], stdout=out)
    seen: list[str] = []
    _watch_serial(proc, log, seen.append, time.monotonic() + 60)
    assert proc.returncode == 0
    assert seen == ["one", "two"]  # "three" never got its newline


def test_watch_serial_gives_up_at_the_deadline(tmp_path: Path) -> None:
    import subprocess
    import time

    from vfu_guest.runner import _watch_serial

    log = tmp_path / "serial.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["sleep", "60"], stdout=out)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            _watch_serial(proc, log, lambda line: None, time.monotonic() + 0.1)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc on this host")
def test_static_tools_share_the_guest_tool_header(tmp_path: Path) -> None:
    """A guest tool built by build_static finds vfu_guest_tool.h and links; the header's
    helpers behave (a clock that advances, a PRNG that does not repeat at once)."""
    src = tmp_path / "tool.c"
    src.write_text(
        '#include <stdio.h>\n#include "vfu_guest_tool.h"\n'
        "int main(void) { uint64_t s = 88172645463325252ULL; double t0 = now();\n"
        "  uint64_t a = xorshift(&s), b = xorshift(&s);\n"
        '  printf("%d %d\\n", a != b && a && b, now() >= t0); return 0; }\n'
    )
    exe = build_static(src, tmp_path / "tool")
    assert subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout == "1 1\n"
