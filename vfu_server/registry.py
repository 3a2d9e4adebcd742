"""Finding device classes: by registered name (entry points ``vfu_server.devices``, the only
place device names live), by
``module.path:ClassName`` (imported from the current directory first, as ``python -m`` does) or
by ``path/to/file.py:ClassName``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

from .pci.device import PciDevice


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


GROUP = "vfu_server.devices"


def _entry_points() -> dict[str, str]:
    """Name -> ``module:Class`` of every ``vfu_server.devices`` entry point on ``sys.path``,
    the first distribution along the path winning, as with imports.

    Read from the ``entry_points.txt`` files directly: importlib.metadata (with pathlib, email,
    zipfile) and its scan of every installed distribution cost 25-60 ms, a fifth of a server's
    start-up, for the few lines needed here."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in sorted(names):
            if not name.endswith((".dist-info", ".egg-info")):
                continue
            try:
                with open(os.path.join(entry or ".", name, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            for key, value in _group(text, GROUP):
                found.setdefault(key, value)
    return found


def _group(text: str, group: str) -> list[tuple[str, str]]:
    """``name = value`` lines of one ``[group]`` section of an entry_points.txt."""
    out, inside = [], False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            inside = line == f"[{group}]"
        elif inside and "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def available() -> dict[str, str]:
    """Name -> ``module:Class`` of every registered device that can be loaded."""
    out = {}
    for name, spec in _entry_points().items():
        try:
            _load(spec)
        except UnknownDevice:
            continue
        out[name] = spec
    return out


def load(name: str) -> type[PciDevice]:
    """Import only the selected device: ``module:Class`` or ``file.py:Class`` directly, a name
    through the ``vfu_server.devices`` entry points (which the library's own devices use too:
    it names none of them)."""
    if ":" in name:
        return _load(name, from_cwd=True)
    spec = _entry_points().get(name)
    if spec is None:
        known = ", ".join(sorted(available())) or "none registered"
        raise UnknownDevice(f"unknown device {name!r} (known: {known})")
    return _load(spec)
