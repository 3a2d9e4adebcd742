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
import glob
import hashlib
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cffi import FFI

# Loading a built helper must stay cheap (it happens at every server start): cffi itself,
# pathlib and shutil are imported only to build.


def cache_dir(kind: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vfu-server", kind)


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
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(cdef)
    ffi.set_source(module_name, source, extra_compile_args=["-O2"])
    return ffi


def load(kind: str, module_name: str, build_hash: str, make_builder: Callable[[], FFI], *,
         build: bool = True) -> ModuleType | None:
    """The compiled module (``ffi``, ``lib``), built into the cache first if needed and
    ``build`` (else None when it is not built yet). Raises OSError(ENOSYS) when the build
    fails (compiler or headers missing, cache not writable), at once on later calls."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    if module_name in _failures:
        raise OSError(errno.ENOSYS, _failures[module_name])
    target = os.path.join(cache_dir(kind), build_hash)
    found = sorted(glob.glob(os.path.join(glob.escape(target), f"{module_name}*.so")))
    if not found and not build:
        return None
    try:
        if not found:
            found = [_build(target, module_name, make_builder)]
        return _import(module_name, found[0])
    except Exception as exc:
        _failures[module_name] = f"cannot build {module_name}: {type(exc).__name__}: {exc}"
        raise OSError(errno.ENOSYS, _failures[module_name]) from None


class Helper:
    """One C helper: where it is cached (``kind``), its module name, cdef and C source. A
    build module defines one (``HELPER = Helper(...)``) and nothing else runs at import."""

    def __init__(self, kind: str, module_name: str, cdef: str, source: str) -> None:
        self.kind, self.module_name, self.cdef, self.source = kind, module_name, cdef, source

    def source_hash(self) -> str:
        return source_hash(self.cdef, self.source)

    def make_builder(self) -> FFI:
        """The cffi builder (for ``cffi_modules``-style packaging, or to compile elsewhere)."""
        return builder(self.module_name, self.cdef, self.source)

    def load(self, *, build: bool = True) -> ModuleType | None:
        """:func:`load` of this helper."""
        return load(self.kind, self.module_name, self.source_hash(), self.make_builder, build=build)

    def main(self, argv: list[str]) -> None:
        """``python -m BUILD_MODULE [DIR]``: build into the cache (or into DIR) and say where."""
        if argv:
            print(self.make_builder().compile(tmpdir=argv[0], verbose=False))
        else:
            module = self.load()
            print(getattr(module, "__file__", module))


def _build(target: str, module_name: str, make_builder: Callable[[], FFI]) -> str:
    import shutil

    # Build in a private directory and rename it into place: servers starting at the same
    # time never see a half-written library.
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp{os.getpid()}"
    make_builder().compile(tmpdir=tmp, verbose=False)
    try:
        os.rename(tmp, target)
    except OSError:
        if not os.path.isdir(target):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    found = sorted(glob.glob(os.path.join(glob.escape(target), f"{module_name}*.so")))
    if not found:
        raise OSError(errno.ENOENT, f"no {module_name} library in {target}")
    return found[0]


def _import(module_name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[module_name] = module
    return module
