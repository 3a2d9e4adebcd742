"""The runtime (vfu_server, vfu_devices) stands without the optional guest harness (vfu_guest).

The harness is a distribution of its own (guest/pyproject.toml); a server installed without it
must import every one of its modules. Each package is imported in a fresh interpreter in which
``vfu_guest`` cannot be imported, so a dependency on it fails here as it would for a user.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import vfu_devices
import vfu_server

RUNTIME = ("vfu_server", "vfu_devices")
HARNESS = "vfu_guest"

# Runs in a fresh interpreter: vfu_guest made unimportable (a None entry in sys.modules makes
# every import of it raise ModuleNotFoundError), then every runtime module imported. The
# ``__main__`` modules run a command line when imported; the static check below covers them.
_IMPORT_ALL = f"""
import importlib, json, pkgutil, sys
sys.modules[{HARNESS!r}] = None
names, failed = [], {{}}
for top in {RUNTIME!r}:
    pkg = importlib.import_module(top)
    for info in pkgutil.walk_packages(pkg.__path__, top + "."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        names.append(info.name)
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed[info.name] = f"{{type(exc).__name__}}: {{exc}}"
print(json.dumps({{"names": names, "failed": failed,
                  "harness_loaded": sys.modules.get({HARNESS!r}) is not None}}))
"""


def _runtime_sources() -> list[Path]:
    out: list[Path] = []
    for pkg in (vfu_server, vfu_devices):
        for root in pkg.__path__:
            out += sorted(Path(root).rglob("*.py"))
    return out


def test_every_runtime_module_imports_without_the_guest_harness() -> None:
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, result["failed"]
    assert not result["harness_loaded"]
    # The walk really covered the runtime: its packages and modules of every layer.
    names = set(result["names"])
    for expected in ("vfu_server.cli", "vfu_server.server", "vfu_server.pci.device",
                     "vfu_server.protocol", "vfu_server.stateinspect.reader",
                     "vfu_server.testing", "vfu_devices.nvme.controller", "vfu_devices.virtio.net"):
        assert expected in names
    assert len(names) > 60


def test_no_runtime_source_names_the_harness() -> None:
    """Also the modules the import walk skips (``__main__``) and imports inside functions."""
    offenders = []
    for path in _runtime_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            if any(m == HARNESS or m.startswith(HARNESS + ".") for m in mods):
                offenders.append(f"{path}:{node.lineno}")
    assert offenders == []
    assert len(_runtime_sources()) > 60


def test_the_harness_is_not_part_of_the_runtime_package() -> None:
    """It ships as its own distribution, not as a subpackage of vfu_server."""
    for root in vfu_server.__path__:
        # (a checkout from before the move may keep an ignored __pycache__ there)
        assert not list((Path(root) / "guest").rglob("*.py"))
    repo = Path(vfu_server.__file__).resolve().parents[1]
    assert (repo / "guest" / "pyproject.toml").is_file()
    assert (repo / "guest" / HARNESS / "__init__.py").is_file()
