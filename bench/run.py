"""Run one benchmark (or all): ``python bench/run.py NAME [ARGS...]``.

Names: roundtrip, footprint, devices, migration, handover, guest, guest_net, all (every one, the guests last).
The same scripts run as ``.venv/bin/python -m bench.NAME``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

NAMES = ["roundtrip", "footprint", "devices", "migration", "handover", "guest", "guest_net"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in [*NAMES, "all"]:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    # Run as a script, this folder comes first on sys.path, where bench/devices.py would hide
    # the project's devices package from the benchmarks that import it (bench.footprint).
    here = Path(__file__).resolve().parent
    repo = str(here.parent)
    sys.path[:] = [repo, *(p for p in sys.path if Path(p or ".").resolve() != here and p != repo)]
    for name in NAMES if argv[0] == "all" else [argv[0]]:
        print(f"== bench.{name}", flush=True)
        importlib.import_module(f"bench.{name}").main(argv[1:] if argv[0] != "all" else [])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
