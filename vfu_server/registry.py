"""Finding device classes: by registered name (entry points ``vfu_server.devices``), by
``module.path:ClassName`` (imported from the current directory first, as ``python -m`` does) or
by ``path/to/file.py:ClassName``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

from .pci.device import PciDevice

# Built-in devices, also reachable when the package is used from a source tree without install.
BUILTIN = {
    "example": "devices.example:DmaCopyEngine",
    "nvme": "devices.nvme:NvmeController",
    "virtio-blk": "devices.virtio.blk:VirtioBlk",
    "virtio-net": "devices.virtio.net:VirtioNet",
    "virtio-rng": "devices.virtio.rng:VirtioRng",
}


class UnknownDevice(LookupError):
    pass


def _load(spec: str, *, from_cwd: bool = False) -> type[PciDevice]:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise UnknownDevice(f"{spec!r}: expected module.path:ClassName or path/to/file.py:ClassName")
    if module_name.endswith(".py") or os.sep in module_name:
        module = _import_file(module_name)
    else:
        if from_cwd and "" not in sys.path and os.getcwd() not in sys.path:
            # The console script puts its own bin/ directory first, not the current one as
            # `python -m` does; a device developer runs `vfu-server mydev:Dev` where mydev.py is.
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UnknownDevice(f"cannot import {module_name}: {exc}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise UnknownDevice(f"{module_name} has no {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, PciDevice)):
        raise UnknownDevice(f"{spec} is not a PciDevice subclass")
    return cls


def _import_file(path: str) -> Any:
    """Import ``path/to/file.py`` as module ``file``, with its directory first on the path so
    that it can import its neighbours, as running it as a script would."""
    if not os.path.isfile(path):
        raise UnknownDevice(f"{path}: no such file")
    name = os.path.splitext(os.path.basename(path))[0]
    if not name.isidentifier():
        raise UnknownDevice(f"{path}: {name!r} is not a Python module name; rename the file")
    loaded = sys.modules.get(name)
    if loaded is not None:
        if os.path.realpath(getattr(loaded, "__file__", "") or "") == os.path.realpath(path):
            return loaded
        raise UnknownDevice(f"{path}: module name {name!r} is taken by {loaded!r}; rename the file")
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as an import would: dataclasses and string-named
    # migration formats look the module up by name.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _entry_points() -> Any:
    # Imported on demand: importlib.metadata (with pathlib, email, zipfile) and the scan of every
    # installed distribution cost 25-60 ms, a fifth of a server's start-up, and a built-in
    # device name does not need them.
    from importlib.metadata import entry_points

    return entry_points(group="vfu_server.devices")


def available() -> dict[str, str]:
    """Name -> ``module:Class`` of every device that can be loaded (same precedence as
    :func:`load`: a loadable built-in, else an entry point of that name)."""
    out = {}
    for name, spec in BUILTIN.items():
        try:
            _load(spec)
        except UnknownDevice:
            continue
        out[name] = spec
    for ep in _entry_points():
        if ep.name in out:
            continue
        try:
            _load(ep.value)
        except UnknownDevice:
            continue
        out[ep.name] = ep.value
    return out


def load(name: str) -> type[PciDevice]:
    """Import only the selected device: a built-in name imports its own module and nothing
    else; other names are looked up among the ``vfu_server.devices`` entry points."""
    if ":" in name:
        return _load(name, from_cwd=True)
    if name in BUILTIN:
        # Built-in names win over entry points of the same name, so that they resolve without
        # scanning installed distributions (and cannot be hijacked by another package).
        try:
            return _load(BUILTIN[name])
        except UnknownDevice:
            pass
    for ep in _entry_points():
        if ep.name == name:
            return _load(ep.value)
    raise UnknownDevice(f"unknown device {name!r} (known: {', '.join(sorted(available()))})")
