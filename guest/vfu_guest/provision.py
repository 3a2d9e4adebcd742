"""Provision QEMU 11.1 and a tiny Linux guest from Debian packages, into the user's cache.

QEMU comes from trixie-backports (trixie main's 10.0 has no vfio-user-pci client) and runs
from a private prefix through the prefix's own dynamic loader, so nothing is installed on the
host. The guest is Debian trixie's cloud kernel booted as an uncompressed vmlinux through PVH
(about a second faster under TCG than the bzImage) plus a busybox initramfs built here.

The result is keyed by the exact resolved package versions and a hash of this recipe; once a
complete kit exists, `provision()` returns it without touching apt (well under a second).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import initramfs
from .aptenv import DebFile, PrivateApt, ProvisionError

__all__ = ["GuestKit", "ProvisionError", "cache_dir", "current_kit", "provision"]

QEMU_PACKAGES = [
    "qemu-system-x86/trixie-backports",
    "qemu-system-data/trixie-backports",
    "seabios/trixie-backports",
    "ipxe-qemu/trixie",
]
# The shared-library closure of qemu-system-x86_64 (DT_NEEDED, followed transitively), mapped to
# trixie packages. A checked-in list rather than apt's Depends closure, which is twice as large
# (debconf, passwd, audio, usb...). `_verify_closure` checks it against the real binary on every
# provisioning, so a new backport that needs another library fails loudly, naming the soname.
# libgcc-s1 is not DT_NEEDED: glibc dlopen()s libgcc_s.so.1 for thread cancellation.
QEMU_LIBRARIES = [
    "libc6",
    "libgcc-s1",
    "libaio1t64",
    "libatomic1",
    "libblkid1",
    "libbpf1",
    "libcap2",
    "libcapstone5",
    "libdaxctl1",
    "libelf1t64",
    "libfdt1",
    "libffi8",
    "libfuse3-4",
    "libglib2.0-0t64",
    "libgmp10",
    "libgnutls30t64",
    "libhogweed6t64",
    "libibverbs1",
    "libidn2-0",
    "libjpeg62-turbo",
    "libkmod2",
    "libmount1",
    "libndctl6",
    "libnettle8t64",
    "libnl-3-200",
    "libnl-route-3-200",
    "libnuma1",
    "libp11-kit0",
    "libpcre2-8-0",
    "libpixman-1-0",
    "libpmem1",
    "libpng16-16t64",
    "librdmacm1t64",
    "libsasl2-2",
    "libseccomp2",
    "libselinux1",
    "libslirp0",
    "libssl3t64",
    "libtasn1-6",
    "libudev1",
    "libunistring5",
    "liburing2",
    "libuuid1",
    "libvdeplug2t64",
    "libzstd1",
    "zlib1g",
]
KERNEL_META = "linux-image-cloud-amd64/trixie"
BUSYBOX = "busybox-static/trixie"
# nvme-cli and the libraries it links; checked with the guest's own loader like QEMU's closure.
NVME_CLI = [
    "nvme-cli",
    "libnvme1t64",
    "libjson-c5",
    "libkeyutils1",
    "libssl3t64",
    "libzstd1",
    "zlib1g",
    "libc6",
    "libgcc-s1",
]
# Loaded by /init (with their dependencies). In the trixie cloud kernel nvme and virtio_pci are
# built in; anything here that turns out to be built in is skipped.
GUEST_MODULES = ["virtio_blk", "virtio_net", "virtio_rng", "qemu_fw_cfg"]

# Firmware and data QEMU on x86 never loads; pruning saves ~45 MB per kit.
_PRUNE = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/bin/qemu-system-i386",
    "usr/bin/qemu-system-x86_64-microvm",
]
_PRUNE_QEMU_DATA = re.compile(
    r"^(openbios-|s390-|hppa-|opensbi-|u-boot|skiboot|slof|vof|palcode-|petalogix-|npcm|pnv-|"
    r"QEMU,|qemu_vga\.ndrv|bamboo|canyonlands|edk2-(aarch64|arm|riscv|loongarch))"
)

MULTIARCH = "usr/lib/x86_64-linux-gnu"


@dataclass
class GuestKit:
    """Everything needed to boot the test guest. Paths are absolute."""

    key: str
    root: Path
    qemu: Path
    kernel: Path
    initramfs: Path
    qemu_version: str
    kernel_version: str
    kernel_release: str
    packages: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        for k in ("root", "qemu", "kernel", "initramfs"):
            data[k] = str(data[k])
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GuestKit:
        data = json.loads(text)
        for k in ("root", "qemu", "kernel", "initramfs"):
            data[k] = Path(data[k])
        return cls(**data)

    def complete(self) -> bool:
        return all(p.exists() for p in (self.qemu, self.kernel, self.initramfs))

    def summary(self) -> str:
        return "\n".join(
            [
                f"QEMU:      {self.qemu_version}",
                f"           {self.qemu}",
                f"kernel:    Linux {self.kernel_release} (Debian {self.kernel_version})",
                f"           {self.kernel}",
                f"initramfs: {self.initramfs}",
                f"kit:       {self.root}",
            ]
        )


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vfu-server" / "guest"


def _recipe() -> str:
    """Hash of everything that shapes a kit besides package versions (this code, /init, ...)."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("aptenv.py", "provision.py", "initramfs.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def current_kit() -> GuestKit | None:
    """The complete kit of the current recipe, if one exists (no network, no apt)."""
    try:
        pointer = json.loads((cache_dir() / "current.json").read_text())
        if pointer.get("recipe") != _recipe():
            return None
        kit = GuestKit.from_json((cache_dir() / "kits" / pointer["key"] / "kit.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return kit if kit.complete() else None


def provision(refresh: bool = False, log: bool = False) -> GuestKit:
    """Return a ready kit, building it first if needed.

    `refresh` re-reads the package lists and rebuilds if Debian has newer versions. Raises
    ProvisionError with a one-line message when something (archive, host tool) is missing.
    """
    if not refresh and (kit := current_kit()) is not None:
        return kit
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / "provision.lock"):
        # Another process may have finished the same work while we waited for the lock.
        if not refresh and (kit := current_kit()) is not None:
            return kit
        return _Builder(cache, log).build()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _need_tool(name: str, package: str) -> None:
    if shutil.which(name) is None:
        raise ProvisionError(f"host tool {name!r} is missing (apt-get install {package})")


class _Builder:
    def __init__(self, cache: Path, log: bool) -> None:
        self.cache = cache
        self.log_enabled = log
        self.t0 = time.monotonic()

    def log(self, msg: str) -> None:
        if self.log_enabled:
            print(
                f"[provision {time.monotonic() - self.t0:5.1f}s] {msg}", file=sys.stderr, flush=True
            )

    def build(self) -> GuestKit:
        _need_tool("apt-get", "apt")
        _need_tool("dpkg-deb", "dpkg")
        apt = PrivateApt(self.cache / "apt")
        self.log(f"updating private package lists from {apt.mirror}")
        apt.update()

        kernel_dep = apt.show_field(KERNEL_META, "Depends").split(",")[0].split()[0]
        specs = QEMU_PACKAGES + [f"{p}/trixie" for p in QEMU_LIBRARIES]
        guest_specs = [f"{kernel_dep}/trixie", BUSYBOX] + [f"{p}/trixie" for p in NVME_CLI]
        specs += [s for s in guest_specs if s not in specs]
        debs = {d.name: d for d in apt.resolve(specs)}
        recipe = _recipe()
        key_src = recipe + "".join(sorted(d.filename for d in debs.values()))
        key = hashlib.sha256(key_src.encode()).hexdigest()[:16]

        kits = self.cache / "kits"
        final = kits / key
        kit_json = final / "kit.json"
        if kit_json.is_file() and (kit := GuestKit.from_json(kit_json.read_text())).complete():
            self.log(f"kit {key} already built")
        else:
            debdir = self.cache / "debs"
            self.log(f"downloading {len(debs)} packages")
            apt.download(specs, debdir)
            for d in debs.values():
                if not (debdir / d.filename).is_file():
                    raise ProvisionError(f"apt did not download {d.filename}")
            work = kits / f"{key}.tmp-{os.getpid()}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            try:
                kit = self._build_kit(work, final, key, debs, debdir)
                (work / "kit.json").write_text(kit.to_json())
                shutil.rmtree(final, ignore_errors=True)
                work.rename(final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            # Old kits and superseded debs are dead weight (each kit is ~140 MB).
            for other in kits.iterdir():
                if other.name != key and not other.name.endswith(f".tmp-{os.getpid()}"):
                    shutil.rmtree(other, ignore_errors=True)
            wanted = {d.filename for d in debs.values()}
            for f in debdir.glob("*.deb"):
                if f.name not in wanted:
                    f.unlink()
        tmp = self.cache / f"current.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps({"key": key, "recipe": recipe}))
        tmp.rename(self.cache / "current.json")
        self.log("done")
        return kit

    # -- building ----------------------------------------------------------------------------

    def _build_kit(
        self, work: Path, final: Path, key: str, debs: dict[str, DebFile], debdir: Path
    ) -> GuestKit:
        qemu_names = [s.split("/")[0] for s in QEMU_PACKAGES] + QEMU_LIBRARIES
        kernel_deb = next(d for n, d in debs.items() if n.startswith("linux-image-"))
        self.log("unpacking")
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            kernel_job = pool.submit(self._kernel_parts, debdir / kernel_deb.filename)
            jobs = [
                pool.submit(_dpkg_x, debdir / debs[n].filename, work / "qemu/root")
                for n in qemu_names
            ]
            jobs += [
                pool.submit(_dpkg_x, debdir / debs[n].filename, work / "guestroot")
                for n in [*NVME_CLI, BUSYBOX.split("/")[0]]
            ]
            for j in jobs:
                j.result()
            vmlinuz, release, modules, builtin = kernel_job.result()

        root = work / "qemu/root"
        self._prune(root)
        wrapper = self._write_wrapper(work / "qemu")
        self.log("verifying the QEMU library closure")
        _verify_closure(root, root / "usr/bin/qemu-system-x86_64")
        if not (root / MULTIARCH / "libgcc_s.so.1").exists():
            raise ProvisionError("libgcc_s.so.1 missing from the QEMU prefix")
        qemu_version = self._check_qemu(wrapper)

        self.log("building the guest")
        guest = work / "guest"
        guest.mkdir()
        kernel = self._vmlinux(vmlinuz, guest)
        ko = _select_modules(GUEST_MODULES, modules, builtin)
        extra, links = self._nvme_cli(work / "guestroot")
        busybox = next(
            (
                p
                for p in (work / "guestroot/usr/bin/busybox", work / "guestroot/bin/busybox")
                if p.is_file()
            ),
            None,
        )
        if busybox is None:
            raise ProvisionError("busybox binary not found in busybox-static")
        applets = [
            Path(p).name
            for p in subprocess.run(
                [busybox, "--list"], capture_output=True, text=True, check=True
            ).stdout.split()
        ]
        (guest / "initramfs.gz").write_bytes(
            initramfs.build_base(busybox, applets, ko, extra, links)
        )
        shutil.copy2(busybox, guest / "busybox")
        shutil.rmtree(work / "guestroot")

        return GuestKit(
            key=key,
            root=final,
            qemu=final / "qemu/bin/qemu-system-x86_64",
            kernel=final / "guest" / kernel.name,
            initramfs=final / "guest/initramfs.gz",
            qemu_version=qemu_version,
            kernel_version=kernel_deb.version,
            kernel_release=release,
            packages={n: d.version for n, d in sorted(debs.items())},
        )

    def _prune(self, root: Path) -> None:
        for rel in _PRUNE:
            p = root / rel
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        data = root / "usr/share/qemu"
        for p in data.iterdir() if data.is_dir() else []:
            if _PRUNE_QEMU_DATA.match(p.name):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def _write_wrapper(self, qemu_dir: Path) -> Path:
        # Relocatable: the wrapper finds the prefix from its own location. QEMU is started through
        # the prefix's ld.so, which makes /proc/self/exe point at ld.so, so QEMU cannot find its
        # data directory by itself: hence the -L options. The module/gio/gconv variables keep the
        # host's (bookworm-built) plugins out.
        script = f"""#!/bin/sh
# QEMU from a private prefix of Debian packages (written by vfu_server.guest.provision).
R=$(dirname "$(dirname "$(readlink -f "$0")")")/root
L=$R/{MULTIARCH}
export QEMU_MODULE_DIR="$L/qemu" GIO_MODULE_DIR="$L/gio/modules" GCONV_PATH="$L/gconv"
exec "$L/ld-linux-x86-64.so.2" --inhibit-cache --library-path "$L" --argv0 qemu-system-x86_64 \\
    "$R/usr/bin/qemu-system-x86_64" -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" "$@"
"""
        path = qemu_dir / "bin/qemu-system-x86_64"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        path.chmod(0o755)
        return path

    def _check_qemu(self, wrapper: Path) -> str:
        out = subprocess.run([wrapper, "--version"], capture_output=True, text=True)
        m = re.search(r"QEMU emulator version (.*)", out.stdout)
        if out.returncode != 0 or not m:
            raise ProvisionError(
                f"provisioned QEMU does not start: {(out.stderr or out.stdout).strip()[:200]}"
            )
        probe = subprocess.run(
            [wrapper, "-device", "vfio-user-pci,help"], capture_output=True, text=True
        )
        if probe.returncode != 0 or "socket" not in probe.stdout:
            raise ProvisionError(f"provisioned QEMU ({m.group(1)}) has no vfio-user-pci device")
        return m.group(1).strip()

    def _kernel_parts(self, deb: Path) -> tuple[bytes, str, dict[str, bytes], set[str]]:
        """vmlinuz, release, {module name: compressed .ko} and built-in module names, streamed."""
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE)
        vmlinuz = b""
        release = ""
        modules: dict[str, bytes] = {}
        builtin: set[str] = set()
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.lstrip("./")
                if not member.isfile():
                    continue
                if re.match(r"boot/vmlinuz-", name):
                    vmlinuz = tar.extractfile(member).read()  # type: ignore[union-attr]
                    release = name.removeprefix("boot/vmlinuz-")
                elif re.match(r"(usr/)?lib/modules/[^/]+/kernel/.*\.ko(\.xz)?$", name):
                    modules[_modname(name)] = tar.extractfile(member).read()  # type: ignore[union-attr]
                elif re.match(r"(usr/)?lib/modules/[^/]+/modules\.builtin$", name):
                    text = tar.extractfile(member).read().decode()  # type: ignore[union-attr]
                    builtin = {_modname(line) for line in text.split()}
        if proc.wait() != 0 or not vmlinuz or not modules:
            raise ProvisionError(f"could not unpack the kernel from {deb.name}")
        return vmlinuz, release, modules, builtin

    def _vmlinux(self, vmlinuz: bytes, guest: Path) -> Path:
        """Extract the uncompressed ELF kernel from the bzImage, for a PVH boot.

        Falls back to the bzImage (a second slower per boot under TCG) if that is not possible.
        """
        setup_sects = vmlinuz[0x1F1] or 4
        payload_offset = int.from_bytes(vmlinuz[0x248:0x24C], "little")
        payload_length = int.from_bytes(vmlinuz[0x24C:0x250], "little")
        start = (setup_sects + 1) * 512 + payload_offset
        payload = vmlinuz[start : start + payload_length]
        elf = b""
        if payload[:4] == b"\x28\xb5\x2f\xfd":
            if shutil.which("zstd"):
                # The kernel appends the uncompressed size as a 4-byte trailer after the frame.
                out = subprocess.run(
                    ["zstd", "-d", "-q", "-c"], input=payload[:-4], capture_output=True
                )
                elf = out.stdout if out.returncode == 0 else b""
            else:
                print(
                    "provision: zstd is not installed; booting the bzImage (slower)",
                    file=sys.stderr,
                )
        elif payload[:6] == b"\xfd7zXZ\x00":
            elf = lzma.decompress(payload[:-4])
        if elf[:4] == b"\x7fELF":
            path = guest / "vmlinux"
            path.write_bytes(elf)
        else:
            path = guest / "vmlinuz"
            path.write_bytes(vmlinuz)
        return path

    def _nvme_cli(self, groot: Path) -> tuple[dict[str, tuple[bytes, int]], dict[str, str]]:
        """nvme-cli and exactly the shared objects it resolves to, as initramfs entries."""
        nvme = next(
            (p for p in (groot / "usr/sbin/nvme", groot / "usr/bin/nvme") if p.is_file()), None
        )
        if nvme is None:
            raise ProvisionError("nvme binary not found in nvme-cli")
        libs = _verify_closure(groot, nvme)
        extra: dict[str, tuple[bytes, int]] = {"bin/nvme": (nvme.read_bytes(), 0o755)}
        for soname, path in libs.items():
            if "/" in soname:  # the PT_INTERP line; the loader is added below
                continue
            extra[f"{MULTIARCH}/{soname}"] = (path.read_bytes(), 0o755)
        loader = groot / MULTIARCH / "ld-linux-x86-64.so.2"
        extra[f"{MULTIARCH}/ld-linux-x86-64.so.2"] = (loader.read_bytes(), 0o755)
        links = {"usr/lib64/ld-linux-x86-64.so.2": "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"}
        return extra, links


def _dpkg_x(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["dpkg-deb", "-x", deb, dest], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProvisionError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()[:200]}")


def _modname(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", name).replace("-", "_")


def _module_depends(ko: bytes) -> list[str]:
    # Debian kernel debs carry no modules.dep (depmod runs in postinst), but every module
    # records its dependencies in .modinfo as a NUL-terminated "depends=a,b" string.
    m = re.search(rb"(?:^|\0)depends=([^\0]*)", ko)
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d] if m else []


def _select_modules(
    wanted: list[str], modules: dict[str, bytes], builtin: set[str]
) -> list[tuple[str, bytes]]:
    """Wanted modules plus dependencies, decompressed, dependencies first; built-ins skipped."""
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in modules:
            raise ProvisionError(
                f"kernel module {name} is neither built in nor in the kernel package"
            )
        ko = modules[name]
        if ko[:6] == b"\xfd7zXZ\x00":
            ko = lzma.decompress(ko)
        for dep in _module_depends(ko):
            visit(dep)
        order.append((name, ko))

    for name in wanted:
        visit(name)
    return order


def _verify_closure(root: Path, binary: Path) -> dict[str, Path]:
    """Resolve `binary`'s libraries with the prefix's loader; fail on anything missing or outside.

    --inhibit-cache keeps /etc/ld.so.cache out, but ld.so would still fall back to the host's
    /lib/x86_64-linux-gnu, so *where* each library resolved is what gets checked.
    """
    libdir = root / MULTIARCH
    out = subprocess.run(
        [
            libdir / "ld-linux-x86-64.so.2",
            "--inhibit-cache",
            "--library-path",
            libdir,
            "--list",
            binary,
        ],
        capture_output=True,
        text=True,
    )
    resolved: dict[str, Path] = {}
    problems: list[str] = []
    for line in out.stdout.splitlines():
        m = re.match(r"\s*(\S+) => (.*?)(?: \(0x[0-9a-f]+\))?$", line)
        if not m:
            continue
        soname, where = m.groups()
        if where == "not found":
            problems.append(f"{soname} not found")
        elif not Path(where).resolve().is_relative_to(root.resolve()):
            problems.append(f"{soname} resolved outside the prefix ({where})")
        else:
            resolved[soname] = Path(where).resolve()
    if out.returncode != 0 or problems or not resolved:
        detail = "; ".join(problems) or out.stderr.strip()[:200]
        raise ProvisionError(f"library closure of {binary.name} is incomplete: {detail}")
    return resolved
