"""``vfu-migrate``: offline tools for device-state streams.

    vfu-migrate formats [FAMILY]                      list formats (JSON descriptors)
    vfu-migrate convert FAMILY IN OUT --to FORMAT     re-encode a saved stream in another format
    vfu-migrate run --from SRC.sock --to DST.sock [--format F]   migrate a device between servers
    vfu-migrate save --from SOCK FILE [--format F]    save a device's state to a file
    vfu-migrate save --control CTL FILE [--format F]  snapshot a live device (client stays attached)
    vfu-migrate load --to SOCK FILE                   load a saved state into a device

``run``/``save``/``load`` talk vfio-user to servers that no VMM is attached to (a server
serves one client at a time); they show progress on stderr. ``save --control`` asks a running
server's control socket instead (its ``snapshot`` command, docs/handover.md): the device pauses
for a moment, as for a handover, and its client never notices.

``convert`` is the project's point in miniature: an opaque stream from one
build becomes a standard stream any implementation can load (or back).
"""

from __future__ import annotations

import argparse
import errno
import json
import sys

from .errors import MigrationError
from .formats import FormatSet, get_formats, registered_families
from .session import LoadSession


def family_formats(family: str) -> FormatSet:
    """A family's formats: registered with :func:`register_formats`, else those of the device of
    that name (``vfu-server --list-devices``), whose format module is imported now."""
    try:
        return get_formats(family)
    except MigrationError:
        pass
    from ..pci.migration import migration_formats_of
    from ..registry import UnknownDevice, load

    try:
        formats = migration_formats_of(load(family))
    except (UnknownDevice, TypeError) as exc:  # TypeError: a misnamed migration_formats
        raise MigrationError(errno.ENOENT, f"no migration formats for {family!r}: {exc}") from None
    if formats is None:
        raise MigrationError(errno.ENOENT, f"device {family!r} does not migrate")
    return formats


def all_families() -> list[str]:
    """Every device with migration formats, and every other registered family."""
    from ..pci.migration import is_migratable
    from ..registry import available, load

    devices = [name for name in available() if is_migratable(load(name))]
    return sorted({*devices, *registered_families()})


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
    p = sub.add_parser("run", help="migrate a device from one server to another")
    p.add_argument("--from", dest="src", required=True, metavar="SOCKET")
    p.add_argument("--to", dest="dst", required=True, metavar="SOCKET")
    p.add_argument("--format", help="format name, kind (opaque/standard) or UUID")
    p.add_argument("--no-precopy", action="store_true")
    p = sub.add_parser("save", help="save a device's state")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="src", metavar="SOCKET", help="a server no client is attached to")
    src.add_argument("--control", metavar="CTL", help="a live server's control socket (a snapshot)")
    p.add_argument("file")
    p.add_argument("--format")
    p = sub.add_parser("load", help="load a saved state into a device")
    p.add_argument("--to", dest="dst", required=True, metavar="SOCKET")
    p.add_argument("file")
    args = ap.parse_args(argv)
    if args.cmd == "save" and args.control:
        return _snapshot(args.control, args.file, args.format)
    if args.cmd in ("run", "save", "load"):
        return _online(args)
    try:
        if args.cmd == "formats":
            fams = [args.family] if args.family else all_families()
            print(json.dumps({f: family_formats(f).descriptors() for f in fams}, indent=2))
            return 0
        fs = family_formats(args.family)
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


def _bar(phase: str, done: int, total: int | None = None, width: int = 30) -> None:
    if total:
        filled = min(width, done * width // total)
        text = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} bytes"
    else:
        text = f"{done} bytes"
    print(f"\r{phase:<10} {text}", end="", file=sys.stderr, flush=True)


def _snapshot(control: str, path: str, fmt: str | None) -> int:
    """``save --control``: the control socket's ``snapshot`` into ``path``."""
    import base64
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)
            sock.connect(control)
            sock.sendall(json.dumps({"cmd": "snapshot", **({"format": fmt} if fmt else {})}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise OSError(errno.EPIPE, "the server closed the control connection")
                buf += chunk
        reply = json.loads(buf)
        if not reply.get("ok"):
            print(f"vfu-migrate: snapshot refused: {reply.get('reason')}", file=sys.stderr)
            return 1
        data = base64.b64decode(reply["stream"])
        with open(path, "wb") as f:
            f.write(data)
    except (OSError, ValueError, KeyError) as exc:
        print(f"vfu-migrate: {control}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"format": reply["format"], "bytes": len(data), "file": path}))
    return 0


def _online(args: argparse.Namespace) -> int:
    import trio

    from ..client import Client
    from ..protocol.errors import VfioUserError
    from .driver import Progress, load, migrate, save

    def note(text: str) -> None:
        print(text, file=sys.stderr)

    async def run() -> int:
        if args.cmd == "run":
            async with await Client.connect(args.src) as src, await Client.connect(args.dst) as dst:
                def show(p: Progress) -> None:
                    _bar(p.phase, p.bytes)
                stats = await migrate(src, dst, fmt=args.format, precopy=not args.no_precopy, progress=show,
                                      note=note)
            print(file=sys.stderr)
            print(json.dumps({
                "format": stats.format, "uuid": stats.format_uuid, "bytes": stats.total_bytes,
                "precopy_bytes": stats.precopy_bytes, "rounds": stats.rounds,
                "downtime_ms": round(stats.downtime * 1000, 3), "total_ms": round(stats.total_time * 1000, 3),
                "dirty_pages": stats.dirty_pages}))
            return 0
        if args.cmd == "save":
            async with await Client.connect(args.src) as src:
                data = await save(src, fmt=args.format, note=note)
            with open(args.file, "wb") as f:
                f.write(data)
            _bar("saved", len(data), len(data))
            print(file=sys.stderr)
            return 0
        with open(args.file, "rb") as f:
            data = f.read()
        async with await Client.connect(args.dst) as dst:
            await load(dst, data, note=note)
        _bar("loaded", len(data), len(data))
        print(file=sys.stderr)
        return 0

    try:
        return trio.run(run)
    except (VfioUserError, OSError, ValueError) as exc:
        print(f"\nvfu-migrate: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
