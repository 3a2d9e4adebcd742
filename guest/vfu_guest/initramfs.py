"""The guest's initramfs: a newc cpio writer, PID 1 and the shell helpers test scripts can use.

The archive is written in Python rather than with cpio(1) so that building it needs no host tool
and the result does not depend on the host's file ownership (everything is root:root here).
Concatenated gzip'd newc archives are a legal initramfs, which is how per-boot extra files are
added without rebuilding the base archive (see `extra_archive`).
"""

from __future__ import annotations

import gzip
import io
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

# fw_cfg name of the test script; /init reads it from sysfs (qemu_fw_cfg module).
SCRIPT_FW_CFG_NAME = "opt/vfu/script"
BEGIN_MARKER = "VFU-BEGIN"
OUTPUT_PREFIX = "| "
RESULT_MARKER = "VFU-RESULT"
MODULE_DIR = "usr/lib/modules/vfu"

INIT = r"""#!/bin/sh
# PID 1 of the vfu-server test guest: set up the basics, run the test script, power off.
# The host side (vfu_server.guest.runner) looks for the VFU-BEGIN and VFU-RESULT lines.
export PATH=/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ip link set lo up 2>/dev/null
# Modules are listed dependencies first, so plain insmod is enough (no modules.dep needed).
while read -r m; do
    insmod "/usr/lib/modules/vfu/$m.ko" || echo "vfu-init: insmod $m failed"
done < /etc/vfu-modules
fw=/sys/firmware/qemu_fw_cfg/by_name/opt/vfu/script/raw
if [ -r "$fw" ]; then
    cat "$fw" > /tmp/vfu-script.sh
elif [ -r /test.sh ]; then
    cat /test.sh > /tmp/vfu-script.sh
else
    echo 'echo "vfu-init: no test script (fw_cfg opt/vfu/script or /test.sh)"; exit 127' > /tmp/vfu-script.sh
fi
# vfushell=1 on the kernel command line gives an interactive shell on the serial console first.
if [ -n "$vfushell" ]; then
    echo "vfu-init: interactive shell; exit it to run the test script"
    setsid cttyhack sh
fi
echo "VFU-BEGIN uptime=$(cut -d' ' -f1 /proc/uptime)"
# Every line the script prints (stdout and stderr, in order) gets a "| " prefix, so the host can
# tell it apart from kernel messages that land on the same serial console.
{
    sh -c '. /usr/lib/vfu/lib.sh; . /tmp/vfu-script.sh' vfu-script < /dev/null 2>&1
    echo $? > /tmp/vfu-rc
} | awk '{ print "| " $0; fflush() }'
rc=$(cat /tmp/vfu-rc)
echo "VFU-RESULT rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
"""

# Sourced before every test script, so these are available as shell functions.
LIB_SH = r"""# Helpers for vfu-server guest test scripts (busybox sh).

# vfu_wait_dev PATH [SECONDS]: wait until PATH exists (nvme namespaces appear asynchronously).
vfu_wait_dev() {
    _n=$(( ${2:-10} * 10 ))
    while [ ! -e "$1" ] && [ "$_n" -gt 0 ]; do sleep 0.1; _n=$((_n - 1)); done
    [ -e "$1" ] || { echo "vfu_wait_dev: $1 did not appear" >&2; return 1; }
}

# vfu_find_pci VENDOR DEVICE: print the sysfs directory of the first matching PCI function.
vfu_find_pci() {
    for _d in /sys/bus/pci/devices/*; do
        if [ "$(cat "$_d/vendor")" = "$1" ] && [ "$(cat "$_d/device")" = "$2" ]; then
            echo "$_d"; return 0
        fi
    done
    echo "vfu_find_pci: no PCI device $1:$2" >&2
    return 1
}

# vfu_bar_addr SYSFS_DIR N: print the start address of BAR N (from the sysfs resource file).
vfu_bar_addr() {
    sed -n "$(( $2 + 1 ))p" "$1/resource" | cut -d' ' -f1
}

# vfu_lspci: one line per PCI function: address vendor:device class subsystem driver.
vfu_lspci() {
    for _d in /sys/bus/pci/devices/*; do
        _drv=-
        [ -e "$_d/driver" ] && _drv=$(basename "$(readlink "$_d/driver")")
        echo "${_d##*/} $(cat "$_d/vendor"):$(cat "$_d/device") class=$(cat "$_d/class")" \
             "subsys=$(cat "$_d/subsystem_vendor"):$(cat "$_d/subsystem_device") driver=$_drv"
    done
}
"""


class CpioWriter:
    """Minimal newc ("070701") archive writer."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1000
        self._dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name_b = name.encode() + b"\0"
        self._ino += 1
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out = self._buf
        out.write(header + name_b)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))

    def dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        parent = str(PurePosixPath(path).parent)
        if parent not in (".", ""):
            self.dir(parent)
        if path and path not in self._dirs:
            self._dirs.add(path)
            self._entry(path, stat.S_IFDIR | mode)

    def _parent(self, path: str) -> str:
        path = path.strip("/")
        parent = str(PurePosixPath(path).parent)
        if parent != ".":
            self.dir(parent)
        return path

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(self._parent(path), stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self._entry(self._parent(path), stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(self._parent(path), stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self._buf.write(b"\0" * (-self._buf.tell() % 512))
        return self._buf.getvalue()


def build_base(
    busybox: Path,
    applets: Iterable[str],
    modules: list[tuple[str, bytes]],
    extra: Mapping[str, tuple[bytes, int]],
    symlinks: Mapping[str, str],
) -> bytes:
    """The gzip'd base initramfs: merged-/usr layout, busybox, kernel modules, /init, helpers.

    `modules` is (name, uncompressed .ko) in load order; `extra` maps guest paths to (data, mode).
    """
    w = CpioWriter()
    for d in (
        "bin",
        "usr/lib/x86_64-linux-gnu",
        "usr/lib64",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "mnt",
        MODULE_DIR,
        "usr/lib/vfu",
    ):
        w.dir(d)
    # The kernel opens /dev/console for PID 1 before devtmpfs is mounted.
    w.chardev("dev/console", 5, 1)
    for link, real in _BASE_SYMLINKS.items():
        w.symlink(link, os.path.relpath(real, os.path.dirname(link) or "."))
    w.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in sorted(set(applets) - {"busybox"}):
        w.symlink(f"bin/{applet}", "busybox")
    for name, ko in modules:
        w.file(f"{MODULE_DIR}/{name}.ko", ko)
    w.file("etc/vfu-modules", "".join(f"{name}\n" for name, _ in modules).encode())
    w.file("init", INIT.encode(), 0o755)
    w.file("usr/lib/vfu/lib.sh", LIB_SH.encode())
    w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.file("etc/group", b"root:x:0:\n")
    for path, (data, mode) in sorted(extra.items()):
        w.file(path, data, mode)
    for path, target in sorted(symlinks.items()):
        w.symlink(path, target)
    return gzip.compress(w.finish(), compresslevel=6, mtime=0)


_BASE_SYMLINKS = {
    "sbin": "bin",
    "usr/bin": "bin",
    "usr/sbin": "bin",
    "lib": "usr/lib",
    "lib64": "usr/lib64",
}


def _real_guest_path(path: str) -> str:
    path = path.strip("/")
    for link, real in _BASE_SYMLINKS.items():
        if path.startswith(link + "/"):
            return real + path[len(link) :]
    return path


def extra_archive(files: Mapping[str, str | os.PathLike[str]]) -> bytes:
    """A gzip'd cpio with host files placed at guest paths, to append to the base initramfs.

    Executable host files stay executable in the guest. Parent directories are created. Paths
    under the base layout's symlinked directories (/sbin, /usr/bin, /lib, ...) are rewritten to
    the real directory, because the kernel's unpacker would replace such a symlink with the
    directory entry we emit for the parent and so hide the base archive's contents.
    """
    w = CpioWriter()
    for guest_path, host_path in sorted(files.items()):
        data = Path(host_path).read_bytes()
        mode = 0o755 if os.access(host_path, os.X_OK) else 0o644
        w.file(_real_guest_path(guest_path), data, mode)
    return gzip.compress(w.finish(), compresslevel=1, mtime=0)
