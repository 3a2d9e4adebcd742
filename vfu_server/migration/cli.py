"""``vfu-migrate``: offline tools for device-state streams.

    vfu-migrate formats [FAMILY]                      list formats (JSON descriptors)
    vfu-migrate convert FAMILY IN OUT --to FORMAT     re-encode a saved stream in another format

``convert`` is the project's point in miniature: an opaque stream from one
build becomes a standard stream any implementation can load (or back).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import example_format  # noqa: F401  (registers the example device's formats)
from .errors import MigrationError
from .formats import get_formats, registered_families
from .session import LoadSession


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vfu-migrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("formats", help="list migration formats")
    p.add_argument("family", nargs="?", help="device family (default: all)")
    p = sub.add_parser("convert", help="re-encode a saved stream")
    p.add_argument("family")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", required=True, help="NAME|ALIAS|UUID[:MINOR]")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "formats":
            fams = [args.family] if args.family else registered_families()
            print(json.dumps({f: get_formats(f).descriptors() for f in fams}, indent=2))
            return 0
        fs = get_formats(args.family)
        target, minor = fs.find(args.to)
        with open(args.input, "rb") as f:
            ls = LoadSession(fs)
            ls.write(f.read())
        state = ls.finish()
        out = (target.encode_precopy(state, minor=minor) or b"") + target.encode(state, minor=minor)
        with open(args.output, "wb") as f:
            f.write(out)
        print(f"{ls.format.name} -> {target.name}: {len(out)} bytes", file=sys.stderr)
        return 0
    except (MigrationError, OSError) as exc:
        print(f"vfu-migrate: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
