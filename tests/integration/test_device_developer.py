"""What a device developer meets: failures that show the device's traceback, the command line
that finds their class, and mistakes refused with a message that says what to change."""

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from vfu_server.client import Client
from vfu_server.protocol.errors import RemoteError
from vfu_server.testing import running_server
from vfu_server.testing.process import first_line

BUGGY = "tests.integration.buggy_device:Buggy"


async def test_a_failing_test_carries_the_device_traceback():
    with pytest.raises(RemoteError) as info:
        async with running_server(BUGGY) as server, await Client.connect(server.socket_path) as dev:
            await dev.read32(0, 8)  # the device's reader raises RuntimeError
    assert info.value.errno == errno.EIO
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert f"--- stderr of vfu-server {BUGGY} ---" in notes
    assert "Traceback (most recent call last)" in notes
    assert "RuntimeError: bug in a read callback" in notes
    assert "buggy_device.py" in notes, "the note points at the device's own source line"



MY_DEVICE = '''
from vfu_server import MemoryBar, PciDevice, PciIdentity


class MyDevice(PciDevice):
    identity = PciIdentity(vendor_id=0x1234, device_id=0x5EED)
    bar0 = MemoryBar(0x1000, register_size=4)

    @bar0.reader
    def read_register(self, offset: int, size: int) -> int:
        return 0xC0FFEE
'''


async def _serve_with_console_script(spec: str, cwd: Path, sock: Path) -> None:
    """Run the installed ``vfu-server`` console script (not ``python -m``, which puts the current
    directory on the path by itself) and read a register through it."""
    script = Path(sys.executable).parent / "vfu-server"
    proc = await trio.lowlevel.open_process([str(script), spec, "--socket-path", str(sock)], cwd=cwd,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = await first_line(proc, 60)
        if not line.startswith(b"listening on"):
            proc.kill()
            err = await proc.stderr.receive_some(65536)
            pytest.fail(f"vfu-server {spec} did not start: {line!r} {err.decode(errors='replace')}")
        async with await Client.connect(str(sock)) as dev:
            assert await dev.config_read(0, 4) == 0x5EED1234
            assert await dev.read32(0, 0) == 0xC0FFEE
    finally:
        proc.terminate()
        await proc.wait()


async def test_console_script_imports_module_from_the_current_directory(tmp_path):
    (tmp_path / "mydev.py").write_text(MY_DEVICE)
    await _serve_with_console_script("mydev:MyDevice", tmp_path, tmp_path / "a.sock")


async def test_console_script_loads_a_file_path(tmp_path):
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "helpers.py").write_text("DEVICE_ID = 0x5EED\n")
    # The file imports its neighbour, as it could when run as a script.
    (tmp_path / "lab" / "my_device.py").write_text(
        MY_DEVICE.replace("device_id=0x5EED", "device_id=helpers.DEVICE_ID").replace(
            "from vfu_server", "import helpers\nfrom vfu_server", 1))
    await _serve_with_console_script("lab/my_device.py:MyDevice", tmp_path, tmp_path / "b.sock")
    await _serve_with_console_script(f"{tmp_path}/lab/my_device.py:MyDevice", Path("/"), tmp_path / "c.sock")


@pytest.mark.parametrize(("spec", "message"), [
    ("nosuchmodule_xyz:Dev", "cannot import nosuchmodule_xyz"),
    ("lab/missing.py:Dev", "lab/missing.py: no such file"),
    ("mydev:Nope", "mydev has no 'Nope'"),
    ("mydev:helper", "mydev:helper is not a PciDevice subclass"),
    ("my-dev.py:Dev", "'my-dev' is not a Python module name"),
])
def test_a_device_that_cannot_be_found_is_one_line(tmp_path, spec, message):
    (tmp_path / "mydev.py").write_text(MY_DEVICE + "\nhelper = 1\n")
    (tmp_path / "my-dev.py").write_text(MY_DEVICE)
    script = Path(sys.executable).parent / "vfu-server"
    out = subprocess.run([str(script), spec, "--socket-path", str(tmp_path / "s")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
