"""Command line: ``python -m vfu_guest {provision,info,demo}``."""

from __future__ import annotations

import argparse
import sys
import time

from .aptenv import ProvisionError
from .provision import cache_dir, current_kit, provision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vfu_guest", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("provision", help="fetch QEMU 11.1 and build the test guest (cached)")
    p.add_argument("--refresh", action="store_true", help="re-read Debian's package lists")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    sub.add_parser("info", help="print the paths of the provisioned kit")
    d = sub.add_parser("demo", help="boot the guest with the project's devices attached")
    d.add_argument("--timeout", type=float, default=300.0)
    d.add_argument(
        "--devices", help="comma-separated subset, e.g. example,nvme (default: all available)"
    )
    args = parser.parse_args(argv)

    if args.cmd == "provision":
        t0 = time.monotonic()
        try:
            kit = provision(refresh=args.refresh, log=not args.quiet)
        except ProvisionError as exc:
            print(f"vfu_guest provision: error: {exc}", file=sys.stderr)
            return 1
        if not args.quiet:
            print(kit.summary())
            print(f"ready in {time.monotonic() - t0:.2f}s")
        return 0
    if args.cmd == "info":
        kit = current_kit()
        if kit is None:
            print(
                f"not provisioned (cache: {cache_dir()}); run: python -m vfu_guest provision",
                file=sys.stderr,
            )
            return 1
        print(kit.summary())
        return 0
    if args.cmd == "demo":
        from .demo import run_demo

        only = [n.strip() for n in args.devices.split(",")] if args.devices else None
        return run_demo(timeout=args.timeout, only=only)
    return 2


if __name__ == "__main__":
    sys.exit(main())
