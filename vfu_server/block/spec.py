"""Turning the CLI's ``--backing`` / ``--size`` into an open backend."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Literal

from .base import BlockBackend
from .errors import BackendSpecError
from .file import FileBackend
from .memory import MemoryBackend
from .nbd import NbdBackend, NbdTarget, parse_nbd_uri
from .nbd import load as load_libnbd

__all__ = ["BACKING_IO", "BackendSpec", "open_backend", "open_file_backend", "parse_backend_spec", "parse_size"]

#: How a file backing does its I/O (``--backing-io``): ``sync`` is :class:`FileBackend`
#: (inline ``preadv``/``pwritev`` where the page cache allows, a worker thread where it would
#: block), ``uring`` is :class:`~vfu_server.block.uring.UringFileBackend` (io_uring; it acts
#: like ``sync`` where io_uring cannot be had).
BACKING_IO = ("sync", "uring")

_SIZE_RE = re.compile(r"\s*(\d+)\s*([kmgtp]?)(i?b)?\s*", re.IGNORECASE)
_UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def parse_size(text: str | int) -> int:
    """Parse ``4096``, ``64K``, ``512M``, ``2G``, ``1T`` (binary units; ``KiB``/``KB`` too).

    Raises :class:`BackendSpecError` for anything else, including zero.
    """
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.fullmatch(text)
        if m is None or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
            raise BackendSpecError(f"bad size {text!r}: expected a number with optional K/M/G/T")
        value = int(m.group(1)) << _UNITS[m.group(2).lower()]
    if value <= 0:
        raise BackendSpecError(f"bad size {text!r}: must be positive")
    return value


@dataclass(frozen=True)
class BackendSpec:
    """A validated backend description; :func:`open_backend` turns it into a backend."""

    kind: Literal["memory", "file", "nbd"]
    size: int | None = None
    read_only: bool = False
    path: str | None = None
    nbd: NbdTarget | None = None
    io: Literal["sync", "uring"] = "sync"


def parse_backend_spec(
    backing: str | None, size: str | int | None = None, read_only: bool = False, io: str = "sync"
) -> BackendSpec:
    """Validate CLI input: ``backing`` is a path, an NBD URI, or None for RAM of ``size``;
    ``io`` is one of :data:`BACKING_IO` (file backings only).

    Only syntax is checked here (nothing is opened), so errors come before any side effect.
    """
    if io not in BACKING_IO:
        raise BackendSpecError(f"bad --backing-io {io!r}: expected one of {', '.join(BACKING_IO)}")
    spec = _parse_backing(backing, None if size is None else parse_size(size), read_only)
    if io == "sync":
        return spec
    if spec.kind != "file":
        what = "an NBD backing" if spec.kind == "nbd" else "a RAM disk"
        raise BackendSpecError(f"--backing-io {io} is for file backings, not {what} (RAM and NBD do their own I/O)")
    return replace(spec, io=io)


def _parse_backing(backing: str | None, nbytes: int | None, read_only: bool) -> BackendSpec:
    if backing is None or backing == "":
        if nbytes is None:
            raise BackendSpecError("--size is required when there is no --backing (RAM disk)")
        return BackendSpec("memory", size=nbytes, read_only=read_only)
    scheme = _SCHEME_RE.match(backing)
    if scheme and scheme.group(1).lower().split("+")[0] in ("nbd", "nbds"):
        target = parse_nbd_uri(backing)
        if load_libnbd() is None:
            raise BackendSpecError(f"backing {backing!r}: NBD needs libnbd (Debian's python3-libnbd, "
                                   "linked into .venv by ./run)")
        return BackendSpec("nbd", nbytes, read_only, nbd=target)
    if _URI_RE.match(backing):
        scheme = backing.split(":", 1)[0]
        raise BackendSpecError(
            f"unsupported backing {backing!r}: scheme {scheme!r} (use a file path or nbd://)"
        )
    if backing.startswith("file:"):
        backing = backing[len("file:") :]
    if os.path.isdir(backing):
        raise BackendSpecError(f"backing {backing!r} is a directory")
    return BackendSpec("file", nbytes, read_only, path=backing)


def open_file_backend(spec: BackendSpec) -> FileBackend:
    """The file backend ``spec`` describes (opened now: a bad path raises BlockError here)."""
    assert spec.kind == "file" and spec.path is not None
    if spec.io == "uring":
        from .uring import UringFileBackend  # cffi and the ring only when asked for

        return UringFileBackend(spec.path, size=spec.size, read_only=spec.read_only)
    return FileBackend(spec.path, size=spec.size, read_only=spec.read_only)


@contextlib.asynccontextmanager
async def open_backend(
    spec: BackendSpec | str | None, *, size: str | int | None = None, read_only: bool = False
) -> AsyncIterator[BlockBackend]:
    """``async with open_backend(spec) as backend:`` -- open, yield, flush and close.

    ``spec`` may be a :class:`BackendSpec` or the raw ``--backing`` string (then ``size`` and
    ``read_only`` complete it).  NBD backends run their reply reader in a nursery owned by
    this context manager, so every kind of backend has the same lifecycle.
    """
    if not isinstance(spec, BackendSpec):
        spec = parse_backend_spec(spec, size, read_only)
    if spec.kind == "nbd":
        assert spec.nbd is not None
        async with NbdBackend.open(spec.nbd, size=spec.size, read_only=spec.read_only) as nbd:
            yield nbd
        return
    backend: BlockBackend
    if spec.kind == "memory":
        assert spec.size is not None
        backend = MemoryBackend(spec.size, read_only=spec.read_only)
    else:
        backend = open_file_backend(spec)
    try:
        yield backend
    finally:
        await backend.aclose()
