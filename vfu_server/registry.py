"""Finding device classes: by registered name (entry points ``vfu_server.devices``) or by
``module.path:ClassName``."""

from __future__ import annotations

import importlib
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


def _load(spec: str) -> type[PciDevice]:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise UnknownDevice(f"{spec!r}: expected module.path:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownDevice(f"cannot import {module_name}: {exc}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, PciDevice)):
        raise UnknownDevice(f"{spec} is not a PciDevice subclass")
    return cls


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
        return _load(name)
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
