"""Benchmark tools from Debian, next to the guest kit: fio for the guest, qemu-storage-daemon for
the host.

* **fio** (trixie) with exactly the shared objects its binary resolves to, as files to append to
  the guest's initramfs (``run_guest(extra_files=...)``). Debian's fio links librados, librbd
  and glusterfs directly, so the closure is large (~40 MB); it goes into the guest only for
  the benchmarks, never into the kit's base initramfs.
* **qemu-storage-daemon** from qemu-utils (trixie-backports, the same QEMU as the kit's), run
  from a private prefix through that prefix's loader, like the kit's QEMU.

Both are unpacked with the kit's private apt configuration into
``~/.cache/vfu-server/tools/KEY`` (KEY: the .deb file names and this module), built once under a
lock and never touching the kit itself (other checkouts may be using it). A missing archive or
an incomplete closure is a :class:`ProvisionError` with a one-line reason.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .aptenv import PrivateApt, ProvisionError
from .provision import MULTIARCH, _dpkg_x, _locked, _verify_closure, cache_dir

__all__ = ["StorageDaemon", "fio_files", "storage_daemon"]

FIO = "fio/trixie"
QEMU_UTILS = "qemu-utils/trixie-backports"
# Dependencies that are not shared libraries (scripts, users, data): not needed by a binary.
_NOT_LIBRARIES = ("libpython", "libpam-", "libsemanage-common", "libaudit-common", "libtirpc-common")


def tools_dir() -> Path:
    return cache_dir().parent / "tools"


def _library_closure(apt: PrivateApt, spec: str) -> list[str]:
    """``spec`` and every library package it depends on, transitively, as apt specs."""
    out = apt.run("apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                  "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", spec)
    suite = spec.partition("/")[2]
    names = [ln.strip() for ln in out.splitlines() if ln and not ln.startswith(" ")]
    libs = [n for n in names[1:] if (n.startswith("lib") or n == "zlib1g") and not n.startswith(_NOT_LIBRARIES)]
    # The libraries come from trixie itself; a backport's own package from its suite.
    return [spec] + [f"{n}/trixie" for n in dict.fromkeys(libs)] if suite else [spec, *libs]


def _unpacked(name: str, spec: str, log: bool) -> Path:
    """The root into which ``spec`` and its library closure are unpacked (built once)."""
    base = tools_dir()
    base.mkdir(parents=True, exist_ok=True)
    apt = PrivateApt(cache_dir() / "apt")
    if not apt.lists_present():
        raise ProvisionError("no package lists yet: provision the guest kit first (./run test or ./run demo)")
    specs = _library_closure(apt, spec)
    debs = apt.resolve(specs)
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update("".join(sorted(d.filename for d in debs)).encode())
    root = base / f"{name}-{h.hexdigest()[:16]}"
    done = root / "done.json"
    if done.is_file():
        return root
    with _locked(base / "tools.lock"):
        if done.is_file():
            return root
        if log:
            print(f"[tools] {name}: {len(debs)} packages", flush=True)
        debdir = base / "debs"
        apt.download(specs, debdir)
        work = base / f"{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                for job in [pool.submit(_dpkg_x, debdir / d.filename, work) for d in debs]:
                    job.result()
            # Private libraries (librados' ceph/ directory) where the closure check, and the
            # guest's loader, look: beside the others.
            lib = work / MULTIARCH
            for so in lib.glob("*/*.so*"):
                if so.is_file() and not (lib / so.name).exists():
                    (lib / so.name).symlink_to(so.relative_to(lib))
            (work / "done.json").write_text(json.dumps({d.name: d.version for d in debs}, indent=1))
            shutil.rmtree(root, ignore_errors=True)
            work.rename(root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return root


def fio_files(log: bool = False) -> dict[str, Path]:
    """Guest path -> host file: ``/usr/bin/fio`` and the shared objects it resolves to."""
    root = _unpacked("fio", FIO, log)
    fio = root / "usr/bin/fio"
    if not fio.is_file():
        raise ProvisionError("fio binary not found in the fio package")
    files = {"/usr/bin/fio": fio}
    for soname, path in _verify_closure(root, fio).items():
        if "/" not in soname:  # the PT_INTERP line names the loader: added below
            files[f"/{MULTIARCH}/{soname}"] = path
    # The loader of this libc (the kit's may be of another trixie point release).
    files[f"/{MULTIARCH}/ld-linux-x86-64.so.2"] = root / MULTIARCH / "ld-linux-x86-64.so.2"
    return files


@dataclass
class StorageDaemon:
    """How to start qemu-storage-daemon from its private prefix."""

    argv: list[str]
    version: str


def storage_daemon(log: bool = False) -> StorageDaemon:
    root = _unpacked("qemu-utils", QEMU_UTILS, log)
    qsd = root / "usr/bin/qemu-storage-daemon"
    if not qsd.is_file():
        raise ProvisionError("qemu-storage-daemon not found in qemu-utils")
    _verify_closure(root, qsd)
    lib = root / MULTIARCH
    argv = [str(lib / "ld-linux-x86-64.so.2"), "--inhibit-cache", "--library-path", str(lib),
            "--argv0", "qemu-storage-daemon", str(qsd)]
    version = json.loads((root / "done.json").read_text()).get("qemu-utils", "?")
    return StorageDaemon(argv, version)
