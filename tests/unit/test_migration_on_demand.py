"""The migration stack is loaded when a migration first needs it, not with the device.

Each check runs in a fresh interpreter: in the test process other tests have long imported
every format module, which would hide an eager import (and a tool that only works because of
one, as ``vfu-migrate convert nvme`` once did).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vfu_server.pci.config import PciIdentity
from vfu_server.pci.device import PciDevice
from vfu_server.pci.migration import migration_formats_of

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "vectors"

ON_DEMAND = """
import sys
from vfu_server import registry
from vfu_server.migration.fsm import MigState
from vfu_server.migration.region import REGION_SIZE
from vfu_server.pci.migration import migration_formats_of

HEAVY = ("vfu_server.migration.controller", "vfu_server.migration.session",
         "vfu_server.migration.generic", "vfu_devices.nvme.migration_format",
         "vfu_devices.nvme.migration", "vfu_devices.virtio.migration_format")

def loaded():
    return sorted(m for m in HEAVY if m in sys.modules)

for name in ("nvme", "virtio-blk", "virtio-net", "virtio-rng"):
    registry.load(name)
assert loaded() == [], loaded()
dev = registry.load("nvme")()
info = dev.extra_regions[9].info(9)
assert info.size == REGION_SIZE and dev.migration.state is MigState.RUNNING and dev.migration.running
dev.migration.reset()
assert loaded() == [], loaded()
ctl = dev.migration.controller
assert "vfu_devices.nvme.migration_format" in sys.modules
assert ctl.formats is migration_formats_of(type(dev))
assert {f.name for f in ctl.formats} == {"opaque/vfu-nvme", "nvme-ctrl/std/1"}
assert dev.extra_regions[9].region.size == info.size
assert type(dev.save_state()).__name__ == "NvmeMigState"
print("ok")
"""


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter with ``args``, in the repository."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def _vfu_migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return _python("-m", "vfu_server.migration.cli", *args)


def test_devices_load_their_formats_when_a_migration_needs_them() -> None:
    out = _python("-c", ON_DEMAND)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_vfu_migrate_finds_a_device_family_in_a_fresh_process(tmp_path: Path) -> None:
    dst = tmp_path / "std.bin"
    out = _vfu_migrate("convert", "nvme", str(VECTORS / "nvme-opaque.bin"), str(dst), "--to", "standard")
    assert out.returncode == 0, out.stderr
    assert "opaque/vfu-nvme -> nvme-ctrl/std/1" in out.stderr
    assert dst.read_bytes().startswith(b"DEVSTATE")
    listing = _vfu_migrate("formats")
    for family in ("example", "nvme", "virtio-blk", "virtio-net", "virtio-rng"):
        assert f'"{family}"' in listing.stdout, listing.stdout
    unknown = _vfu_migrate("formats", "nosuch")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("vfu-migrate: ENOENT: no migration formats for 'nosuch': "
                                     "unknown device 'nosuch' (known: ")


def _device(formats: str) -> type[PciDevice]:
    return type("Misdeclared", (PciDevice,), {
        "identity": PciIdentity(vendor_id=0x1234, device_id=0x1), "migration_formats": formats})


@pytest.mark.parametrize(("formats", "reason"), [
    ("no_such_module_here:FORMATS", "No module named 'no_such_module_here'"),
    ("vfu_server.migration.formats:NO_SUCH_NAME", "has no attribute 'NO_SUCH_NAME'"),
    ("vfu_server.migration.formats:NAMESPACE", "expected 'package.module:NAME' of a FormatSet"),
    ("vfu_server.migration.formats", "expected 'package.module:NAME' of a FormatSet"),
])
def test_a_misnamed_format_set_is_a_clear_error(formats: str, reason: str) -> None:
    with pytest.raises(TypeError) as exc:
        migration_formats_of(_device(formats))
    assert str(exc.value).startswith(f"Misdeclared.migration_formats = {formats!r}: ")
    assert reason in str(exc.value)


def test_every_name_of_the_migration_package_resolves() -> None:
    """vfu_server.migration loads its names on first use; each one in __all__ must be found
    where the lazy table says, and nothing else is pretended."""
    import vfu_server.migration as pkg

    assert sorted(pkg._WHERE) == sorted(pkg.__all__)
    for name in pkg.__all__:
        assert getattr(pkg, name) is getattr(__import__(f"vfu_server.migration.{pkg._WHERE[name]}",
                                                        fromlist=[name]), name)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        pkg.NoSuchName  # noqa: B018
