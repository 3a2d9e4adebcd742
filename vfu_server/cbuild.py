"""Small C helpers built with cffi on first use and cached per user.

The project has no compiled wheel: a helper's C text lives in a build module (a cffi
``FFI`` with ``set_source``), and :func:`load` compiles it once into
``~/.cache/vfu-server/<kind>/<hash>/`` (``XDG_CACHE_HOME`` is honoured) and imports it from
there. The hash covers the C text, the cdef and the Python ABI, so an edit or another
interpreter builds afresh. Every caller keeps a pure-Python path for when this fails (no
compiler, no headers, read-only home): C here is an accelerator, never a requirement.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

from cffi import FFI


def cache_dir(kind: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vfu-server" / kind


def source_hash(*parts: str) -> str:
    """Identifies a build: the given texts (C source, cdef) and the Python ABI."""
    h = hashlib.sha256()
    for part in (*parts, sys.implementation.cache_tag or "", sys.platform):
        h.update(part.encode())
    return h.hexdigest()[:16]


#: why a helper could not be had, by module name: a failed build is not tried again
_failures: dict[str, str] = {}


def builder(module_name: str, cdef: str, source: str) -> FFI:
    """The cffi builder of a helper (API mode, -O2)."""
    ffi = FFI()
    ffi.cdef(cdef)
    ffi.set_source(module_name, source, extra_compile_args=["-O2"])
    return ffi


def load(kind: str, module_name: str, build_hash: str, ffibuilder: FFI) -> ModuleType:
    """The compiled module (``ffi``, ``lib``), built into the cache first if needed. Raises
    OSError(ENOSYS) on failure (compiler or headers missing, cache not writable), at once
    on later calls."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    if module_name in _failures:
        raise OSError(errno.ENOSYS, _failures[module_name])
    try:
        return _build_and_import(kind, module_name, build_hash, ffibuilder)
    except Exception as exc:
        _failures[module_name] = f"cannot build {module_name}: {type(exc).__name__}: {exc}"
        raise OSError(errno.ENOSYS, _failures[module_name]) from None


def _build_and_import(kind: str, module_name: str, build_hash: str, ffibuilder: FFI) -> ModuleType:
    target = cache_dir(kind) / build_hash
    found = sorted(target.glob(f"{module_name}*.so")) if target.is_dir() else []
    if not found:
        # Build in a private directory and rename it into place: servers starting at the same
        # time never see a half-written library.
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(os.fspath(target) + f".tmp{os.getpid()}")
        ffibuilder.compile(tmpdir=os.fspath(tmp), verbose=False)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
        found = sorted(target.glob(f"{module_name}*.so"))
        if not found:
            raise OSError(errno.ENOENT, f"no {module_name} library in {target}")
    spec = importlib.util.spec_from_file_location(module_name, found[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[module_name] = module
    return module
