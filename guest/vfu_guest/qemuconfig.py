"""Read the QEMU argument files in qemu-configs/ (format: qemu-configs/README.md).

One option per line, optionally followed by one space and its value; the value is the rest of the
line, taken verbatim (so JSON -device values and kernel command lines need no quoting). `#` starts
a comment line. `${NAME}` is replaced by a parameter; a placeholder without a value is an error,
so a typo cannot silently produce a half-configured device.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def configs_dir() -> Path:
    override = os.environ.get("VFU_QEMU_CONFIGS")
    if override:
        return Path(override)
    # The files live at the repository root, next to the package directory.
    return Path(__file__).resolve().parents[2] / "qemu-configs"


def parse_args_text(text: str, params: Mapping[str, str], source: str = "<text>") -> list[str]:
    argv: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue

        def substitute(m: re.Match[str], lineno: int = lineno) -> str:
            name = m.group(1)
            if name not in params:
                raise KeyError(f"{source}:{lineno}: no value for ${{{name}}}")
            return str(params[name])

        option, _, value = line.partition(" ")
        argv.append(_PLACEHOLDER.sub(substitute, option))
        if value.strip():
            argv.append(_PLACEHOLDER.sub(substitute, value.strip()))
    return argv


def load_args(name: str, params: Mapping[str, str], directory: Path | None = None) -> list[str]:
    """Arguments of qemu-configs/<name>.args with placeholders filled in."""
    path = (directory or configs_dir()) / f"{name}.args"
    return parse_args_text(path.read_text(), params, str(path))


def placeholders(name: str, directory: Path | None = None) -> set[str]:
    path = (directory or configs_dir()) / f"{name}.args"
    text = "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
    return set(_PLACEHOLDER.findall(text))
