"""``vfu-state inspect FILE [--json]``: print and verify a saved device-state stream."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .reader import Bad, inspect_stream


def _fmt_value(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:#x}" if v > 9 else str(v)
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


def render(envs: list[dict[str, Any]]) -> str:
    lines = []
    for e in envs:
        lines.append(f"envelope @{e['offset']}: format {e['format']} {e['format_uuid']}")
        lines.append(f"  version {e['format_version']} (envelope {e['envelope_version']}), "
                     f"flags {'|'.join(e['flags']) or '-'}, producer {e['producer_uuid']}")
        lines.append(f"  profile_crc32c {e['profile_crc32c']}, {e['record_count']} records, "
                     f"checksums {e['checksums']}")
        for r in e["records"]:
            lines.append(f"  record {r['type']} {r['name']:<13} flags "
                         f"{'|'.join(r['flags']) or '-'} instance {r['instance']} "
                         f"version {r['version']} length {r['length']}")
            for k, v in (r["fields"] or {}).items():
                if k.startswith("reserved"):
                    continue
                lines.append(f"      {k} = {_fmt_value(v)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vfu-state", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="decode and verify a device-state stream")
    p.add_argument("file", help="stream file, '-' for stdin")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    try:
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as f:
                data = f.read()
        envs = inspect_stream(data)
    except (Bad, OSError) as exc:
        print(f"vfu-state: {args.file}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(envs, indent=2) if args.json else render(envs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
