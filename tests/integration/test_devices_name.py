"""The built-in devices are installed as ``vfu_devices`` (the repository keeps its ``devices/``
folder), so a user's own ``devices`` package on the path no longer hides them: every built-in
device starts next to it, and the user's own device runs too."""

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from vfu_server.client import Client
from vfu_server.testing.process import first_line

USER_DEVICE = '''
from vfu_server import PciDevice, PciIdentity


class Mine(PciDevice):
    identity = PciIdentity(vendor_id=0x1234, device_id=0x0BAD)
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project: its own ``devices`` package, with an ``example`` and an ``nvme`` of its
    own that would shadow ours if ours were still called ``devices``."""
    pkg = tmp_path / "devices"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "example.py").write_text(USER_DEVICE)
    (pkg / "nvme.py").write_text("raise ImportError('the user\\'s nvme, not ours')\n")
    (tmp_path / "peer.sock").touch()
    return tmp_path


async def _starts(project: Path, spec: str, *args: str) -> int:
    """Serve ``spec`` from the user's project directory (``python -m`` puts it first on the
    path, before the installed packages) and return the vendor/device word a client reads."""
    sock = project / "dev.sock"
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "vfu_server", spec, "--socket-path", str(sock), *args],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if not (await first_line(proc, 60)).startswith(b"listening on"):
            proc.kill()
            err = await proc.stderr.receive_some(65536)
            pytest.fail(f"{spec} did not start next to a user's devices package: {err.decode()}")
        async with await Client.connect(str(sock)) as dev:
            return await dev.config_read(0, 4)
    finally:
        proc.terminate()
        await proc.wait()


@pytest.mark.parametrize(("name", "args", "ident"), [
    ("example", (), 0xFE01_1234),
    ("nvme", ("--size", "1M"), None),
    ("virtio-blk", ("--size", "1M"), 0x1042_1AF4),
    ("virtio-rng", (), 0x1044_1AF4),
    ("virtio-net", ("--peer", "net.sock", "--listen"), 0x1041_1AF4),
])
async def test_every_builtin_device_starts_next_to_a_user_devices_package(project, name, args, ident):
    found = await _starts(project, name, *args)
    if ident is not None:
        assert found == ident
    else:
        assert found & 0xFFFF != 0xFFFF


async def test_the_users_own_devices_package_works(project):
    assert await _starts(project, "devices.example:Mine") == 0x0BAD_1234
