"""cbuild: C helpers compiled on first use into the cache, and what happens when that fails."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vfu_server import cbuild


def test_builds_once_then_imports_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    name = f"_vfu_cbuild_test_{os.getpid()}"
    ffi = cbuild.builder(name, "int twice(int);", "int twice(int x) { return 2 * x; }")
    digest = cbuild.source_hash("int twice(int);", "twice")
    assert cbuild.load("test", name, digest, lambda: ffi, build=False) is None  # not built yet
    module = cbuild.load("test", name, digest, lambda: ffi)
    assert module is not None and module.lib.twice(21) == 42
    assert list((tmp_path / "vfu-server" / "test" / digest).glob(f"{name}*.so"))
    assert cbuild.load("test", name, digest, lambda: ffi) is module


def test_a_failed_build_is_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    name = f"_vfu_cbuild_broken_{os.getpid()}"
    ffi = cbuild.builder(name, "int broken(void);", "this is not C")
    with pytest.raises(OSError) as first:
        cbuild.load("test", name, "0" * 16, lambda: ffi)
    assert first.value.errno == errno.ENOSYS and name in first.value.strerror
    monkeypatch.setattr(ffi, "compile", lambda **kw: pytest.fail("compiled again"))
    with pytest.raises(OSError):
        cbuild.load("test", name, "0" * 16, lambda: ffi)


def test_fastio_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from vfu_devices import fastio

    monkeypatch.setenv("VFU_FASTIO", "0")
    assert fastio.load_module() is None
