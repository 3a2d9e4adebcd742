"""Static guest tools built on the host: the guest has no libc of its own beyond busybox, so a
test's or benchmark's C program is linked statically and added to the initramfs
(``run_guest(extra_files=...)``). ``include/`` holds what those programs share."""

from __future__ import annotations

import subprocess
from pathlib import Path

INCLUDE_DIR = Path(__file__).resolve().parent / "include"


def build_static(source: Path, exe: Path) -> Path:
    """Compile and link `source` statically (gcc, -O2 -Wall -pthread) into `exe`; raises
    CalledProcessError with gcc's messages on stderr if it does not build."""
    subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-pthread", "-I", str(INCLUDE_DIR), "-o", str(exe),
         str(source)],
        check=True,
    )
    return exe
