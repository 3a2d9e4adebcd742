"""Finding device classes: by registered name (entry points ``vfu_server.devices``) or by
``module.path:ClassName``."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

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


def available() -> dict[str, str]:
    """Name -> ``module:Class`` of every device that can be loaded."""
    found = dict(BUILTIN)
    for ep in entry_points(group="vfu_server.devices"):
        found[ep.name] = ep.value
    out = {}
    for name, spec in found.items():
        try:
            _load(spec)
        except UnknownDevice:
            continue
        out[name] = spec
    return out


def load(name: str) -> type[PciDevice]:
    if ":" in name:
        return _load(name)
    for ep in entry_points(group="vfu_server.devices"):
        if ep.name == name:
            return _load(ep.value)
    if name in BUILTIN:
        try:
            return _load(BUILTIN[name])
        except UnknownDevice:
            pass
    raise UnknownDevice(f"unknown device {name!r} (known: {', '.join(sorted(available()))})")
