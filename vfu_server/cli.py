"""``vfu-server DEVICE --socket-path PATH``: run one device as a vfio-user server.

Foreground only, as the vfio-user spec asks of device programs. Prints ``listening on PATH``
on stdout once clients can connect. Bad arguments: one line on stderr, exit code 2.

``vfu-server DEVICE --take-over CTL [options]`` takes a running device over from the server
whose control socket is CTL, client included (docs/handover.md); it prints ``listening on
PATH`` once it serves, or ``vfu-server: handover refused: REASON`` and exits 1.

SIGHUP (``systemctl reload``): a server with a control socket starts such a successor itself,
with its own options (vfu_server/reload.py); without one, SIGHUP is logged and ignored.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import trio

from . import registry, reload
from .pci.migration import is_migratable
from .pci.polling import DEFAULT_SOCKET_POLL_US, MAX_POLL_US
from .priority import DEFAULT_NICE, MAX_NICE, lower_to
from .sandbox import MODES, SandboxError
from .transport.unix import SocketPathError, inherited_socket, open_unix_listener

PROG = "vfu-server"


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        reload.report(f"failed: {self.prog}: error: {message}")
        raise SystemExit(2)


def _common(parser: argparse.ArgumentParser) -> None:
    # Neither: the sockets systemd passed (socket activation, vfu_server/systemd.py).
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="Unix socket to listen on (created 0600)")
    where.add_argument("--fd", type=int, metavar="N", help="inherited socket fd (listening or connected)")
    where.add_argument("--take-over", metavar="CTL",
                       help="live handover: take the device, its client and its sockets over from the server "
                            "whose control socket is CTL (docs/handover.md)")
    parser.add_argument("--handover-timeout", type=float, default=10.0, metavar="S",
                        help="with --take-over: how long either side waits at each step (default 10)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--trace", action="store_true", help="log one decoded line per message, both directions")
    parser.add_argument("--socket-poll-us", type=int, default=DEFAULT_SOCKET_POLL_US, metavar="US",
                        help="after a message, look for the next one for up to US microseconds before "
                             f"sleeping (adaptive; 0: never; default {DEFAULT_SOCKET_POLL_US})")
    parser.add_argument("--nice", type=int, default=DEFAULT_NICE, metavar="N",
                        help="lower the server's CPU priority by N at start, so that its polling gives way "
                             f"to the VM's vCPU threads (0..{MAX_NICE}; 0: keep the inherited priority; "
                             f"default {DEFAULT_NICE})")
    parser.add_argument("--metrics", metavar="ADDR:PORT",
                        help="serve the device's I/O statistics for Prometheus at http://ADDR:PORT/metrics")
    parser.add_argument("--sandbox", choices=MODES, metavar="MODE",
                        help="confine the server once started: on (default where the kernel allows; "
                             "given explicitly, refuse to start without it), log (report, do not "
                             "refuse), off (debugging)")
    parser.add_argument("--user", metavar="USER",
                        help="when started as root: run as USER (groups, gid, uid) once started")


def main(argv: list[str] | None = None, *, successor_class: Any = None) -> int:
    """``successor_class``: the :class:`vfu_server.handover.Successor` subclass ``--take-over``
    uses (tests give one that damages the stream or stalls)."""
    argv = sys.argv[1:] if argv is None else argv
    reload.take_status_fd()
    done = _other_commands(argv)
    if done is not None:
        return done
    name, device_cls, parser = _device_parser(argv)
    if is_migratable(device_cls) and "--list-migration-formats" in argv:
        import json

        from .pci.migration import migration_formats_of

        print(json.dumps(migration_formats_of(device_cls).descriptors(), indent=2))
        return 0
    args = parser.parse_args(argv)
    _set_up_logging(args)
    device = _configured_device(parser, args, name, device_cls)
    confinement = _confinement(parser, args)
    activated, listener, connected, where = _client_sockets(parser, args)
    _lower_priority(args.nice)
    successor = None
    if args.take_over is not None:
        from .handover import Successor

        successor = (successor_class or Successor)(args.take_over, insist=getattr(args, "migration_format", None),
                              timeout=args.handover_timeout)
    from . import systemd

    notifier = systemd.install()
    control = _control_socket(parser, args, name, device_cls, activated)
    return _serve_device(
        _Serving(argv=argv, name=name, args=args, device=device, confinement=confinement,
                 listener=listener, connected=connected, where=where, successor=successor,
                 notifier=notifier, control=control),
        parser,
    )


def _other_commands(argv: list[str]) -> int | None:
    """``vfu-server top``, ``--list-devices`` and the help without a device: their exit code,
    or None when argv names a device to serve."""
    if argv[:1] == ["top"]:
        from . import top

        return top.main(argv[1:])
    if "--list-devices" in argv:
        for name, spec in sorted(registry.available().items()):
            print(f"{name}\t{spec}")
        return 0
    first = OneLineParser(prog=PROG, add_help=False)
    first.add_argument("device", nargs="?")
    pre, _ = first.parse_known_args(argv)
    if pre.device is None or pre.device.startswith("-"):
        if "-h" in argv or "--help" in argv:
            print(f"usage: {PROG} DEVICE (--socket-path PATH | --fd N | --take-over CTL) [options]\n"
                  f"       {PROG} top CTL... (live I/O statistics of servers, by control socket)\n"
                  f"devices: {', '.join(sorted(registry.available()))} or module.path:ClassName\n"
                  f"{PROG} DEVICE --help shows a device's options; {PROG} --list-devices lists devices")
            return 0
        first.error("missing DEVICE (try --list-devices)")
    return None


def _device_parser(argv: list[str]) -> tuple[str, Any, OneLineParser]:
    """The device argv names, its class and the parser of its whole command line: the common
    options, the device's own, and the fault and migration ones where the device has them."""
    first = OneLineParser(prog=PROG, add_help=False)
    first.add_argument("device", nargs="?")
    pre, _ = first.parse_known_args(argv)
    try:
        device_cls = registry.load(pre.device)
    except registry.UnknownDevice as exc:
        first.error(str(exc))
    parser = OneLineParser(prog=f"{PROG} {pre.device}", description=(device_cls.__doc__ or "").strip().split("\n")[0])
    parser.add_argument("device")
    _common(parser)
    device_cls.add_arguments(parser)
    if getattr(device_cls, "fault_domain", None) is not None:
        parser.add_argument("--fault", action="append", default=[], metavar="RULE",
                            help="inject a fault: MATCH...,ACTION, e.g. op=read,lba=8,status=ure "
                                 "(repeatable; docs/faults.md)")
        if not is_migratable(device_cls):  # else the migration group has it
            parser.add_argument("--control-socket", metavar="PATH",
                                help="JSON-lines control socket: fault-add, fault-list, fault-remove, ...")
    if is_migratable(device_cls):
        mig = parser.add_argument_group("migration")
        mig.add_argument("--migration-format", metavar="NAME|UUID",
                         help="state format for outgoing migrations (default: the one "
                              "--list-migration-formats marks as default)")
        mig.add_argument("--list-migration-formats", action="store_true",
                         help="print the device's migration formats as JSON and exit")
        mig.add_argument("--control-socket", metavar="PATH",
                         help="JSON-lines control socket: list-formats, select-outgoing, status, ...")
    return pre.device, device_cls, parser


def _set_up_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    # A child logger's own level wins over the root's: trace lines appear exactly with --trace.
    logging.getLogger("vfu_server.trace").setLevel(logging.INFO if args.trace else logging.WARNING)


def _configured_device(parser: OneLineParser, args: argparse.Namespace, name: str, device_cls: Any) -> Any:
    """The device built from its options, with its --fault rules and --migration-format; a
    --take-over the device cannot do is refused first."""
    if args.take_over is not None:
        if not is_migratable(device_cls):
            parser.error(f"--take-over: {name} has no migration formats, so it cannot take over a device")
        if getattr(args, "control_socket", None):
            parser.error("--take-over takes over the predecessor's control socket; drop --control-socket")
        if not 0.1 <= args.handover_timeout <= 60:
            parser.error("--handover-timeout must be 0.1..60")
    try:
        device = device_cls.from_args(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if getattr(args, "fault", None):
        from .faults import FaultError

        for rule in args.fault:
            try:
                device.faults.add(rule)
            except FaultError as exc:
                parser.error(f"--fault {rule!r}: {exc.reason}")
    if getattr(args, "migration_format", None) and device.migration is not None:
        from .migration.errors import MigrationError

        try:
            device.migration.controller.select_outgoing(args.migration_format)
        except MigrationError as exc:
            parser.error(f"--migration-format: {exc.reason}")
    return device


def _confinement(parser: OneLineParser, args: argparse.Namespace) -> Any:
    """The sandbox's configuration (applied once the device is ready), and the range checks of
    the polling and priority options."""
    from . import sandbox

    try:
        confinement = sandbox.configure(args.sandbox, args.user)
    except SandboxError as exc:
        parser.error(str(exc))
    if confinement.mode == "off":
        logging.getLogger("vfu_server").warning(
            "--sandbox off: the server is not confined and can do whatever its user can")
    if not 0 <= args.socket_poll_us <= MAX_POLL_US:
        parser.error(f"--socket-poll-us must be 0..{MAX_POLL_US}")
    if not 0 <= args.nice <= MAX_NICE:
        parser.error(f"--nice must be 0..{MAX_NICE}")
    return confinement


def _lower_priority(nice: int) -> None:
    # Normally done already, from the raw command line (vfu_server/__main__.py); this applies
    # what the parser decided where that differs (or where main() is called directly).
    failed = lower_to(nice)
    if failed is not None:
        logging.getLogger("vfu_server").warning("--nice %d: %s; running at the inherited priority",
                                                 nice, failed)


def _client_sockets(parser: OneLineParser, args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    """Where clients come from: (systemd's sockets or None, listener, connected, where). With
    --take-over everything comes from the predecessor, so all three are None."""
    from . import systemd

    activated = None
    if args.socket_path is None and args.fd is None and args.take_over is None:
        try:
            activated = systemd.activated_sockets()
        except systemd.ActivationError as exc:
            parser.error(f"socket activation: {exc}")
        if activated is None:
            parser.error("one of the arguments --socket-path --fd --take-over is required (or socket activation)")
    listener = connected = None
    where = ""
    try:
        if args.take_over is not None:
            pass  # everything comes from the predecessor
        elif activated is not None:
            assert activated.vfio_user is not None
            listener, connected = trio.socket.from_stdlib_socket(activated.vfio_user), None
            where = f"fd {activated.vfio_user.fileno()} (socket activation)"
        elif args.socket_path is not None:
            listener = open_unix_listener(args.socket_path)
            where, connected = args.socket_path, None
        else:
            sock, listening = inherited_socket(args.fd)
            listener, connected = (sock, None) if listening else (None, sock)
            where = f"fd {args.fd}"
    except SocketPathError as exc:
        parser.error(str(exc))
    return activated, listener, connected, where


def _control_socket(parser: OneLineParser, args: argparse.Namespace, name: str, device_cls: Any,
                    activated: Any) -> trio.socket.SocketType | None:
    """The control socket: the one systemd passed, or --control-socket's, or none."""
    control_path = getattr(args, "control_socket", None)
    control = None
    if activated is not None and activated.control is not None:
        if control_path:
            parser.error("--control-socket: systemd passed a control socket already")
        if not is_migratable(device_cls) and getattr(device_cls, "fault_domain", None) is None:
            parser.error(f"socket activation: {name} has no control socket")
        control = trio.socket.from_stdlib_socket(activated.control)
    elif control_path:
        try:
            control = open_unix_listener(control_path)
        except SocketPathError as exc:
            parser.error(f"--control-socket: {exc}")
    return control


@dataclass
class _Serving:
    """What main has made ready for serving: the parsed command line, the device and its
    sockets."""

    argv: list[str]
    name: str
    args: argparse.Namespace
    device: Any
    confinement: Any
    listener: Any
    connected: Any
    where: str
    successor: Any
    notifier: Any
    control: trio.socket.SocketType | None


def _serve_device(run: _Serving, parser: OneLineParser) -> int:
    """Serve until a signal, a handover or a failure; the exit code."""
    from . import sandbox, systemd

    args, device, successor, control = run.args, run.device, run.successor, run.control
    notifier = run.notifier
    control_path = getattr(args, "control_socket", None)

    def ready() -> None:
        if successor is not None:
            taken = successor.taken
            path = taken.socket_path if taken is not None else None
            print(f"listening on {path or 'the handed-over socket'}", flush=True)
            if notifier is not None:
                # This process is the service's main process now (NotifyAccess=all lets a
                # successor started by `systemctl reload` say so).
                notifier.ready(f"serving {run.name} (taken over)")
            reload.report("ready")
            return
        print(f"listening on {run.where}", flush=True)
        if notifier is not None:
            notifier.ready(f"serving {run.name} on {run.where}; waiting for a client")

    from .handover import HandoverRefused
    from .server import DeviceStartError, ServeHooks, ServeOptions, serve

    async def confine(socket_path: str | None, control_path: str | None) -> None:
        t0 = time.perf_counter()
        line = await sandbox.apply(run.confinement, device.sandbox_needs() | sandbox_extra(), (socket_path, control_path))
        took = (time.perf_counter() - t0) * 1000
        sys.stderr.write(f"{PROG} {run.name}: {line} ({took:.1f} ms)\n")
        sys.stderr.flush()

    def sandbox_extra() -> sandbox.SandboxNeeds:
        # A server with a control socket can hand its device over, and must then be able to
        # kill a successor that stops answering (handover's fence): no signal scoping. An
        # abstract $NOTIFY_SOCKET (systemd) is reached through the notifier's socket.
        extra = sandbox.SandboxNeeds()
        if control is not None or successor is not None:
            extra = extra | sandbox.SandboxNeeds(signal_others=True)
        if notifier is not None and notifier.address.startswith("\0"):
            extra = extra | sandbox.SandboxNeeds(abstract_unix=True)
        return extra

    options = ServeOptions(
        listener=run.listener, connected=run.connected, socket_path_to_remove=args.socket_path,
        control=control, control_path=control_path, socket_poll_us=args.socket_poll_us, successor=successor,
        hooks=ServeHooks(on_listening=ready, on_stopping=notifier.stopping if notifier is not None else None,
                         before_serving=confine))
    metrics_listener = _metrics_listener(parser, args, run.name, device)
    reloader = _start_reloader(run)

    async def run_server() -> DeviceStartError | HandoverRefused | None:
        import signal

        with trio.open_signal_receiver(signal.SIGHUP) as hups:
            return await serve_until_done(hups)

    async def serve_until_done(hups: Any) -> DeviceStartError | HandoverRefused | None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_sighup, hups, nursery, reloader, run)
            if metrics_listener is not None:
                from .metrics import serve_metrics

                nursery.start_soon(serve_metrics, device, metrics_listener)
            interval = systemd.watchdog_interval()
            if notifier is not None and interval is not None:
                nursery.start_soon(systemd.watchdog_task, notifier, interval)
            try:
                await serve(device, options)
                if reloader is not None and reloader.busy:
                    # Handed over to a reload's successor: wait until it told systemd that it
                    # is the main process now, so that this one's exit is no failure.
                    with trio.move_on_after(reload.SUCCESSOR_TIMEOUT):
                        await reloader.succeeded.wait()
            except (DeviceStartError, HandoverRefused) as exc:
                return exc
            finally:
                nursery.cancel_scope.cancel()
        return None

    try:
        error = trio.run(run_server)
    finally:
        if reloader is not None:
            reloader.close()
    return _exit_code(error, run)


def _metrics_listener(parser: OneLineParser, args: argparse.Namespace, name: str, device: Any) -> Any:
    """--metrics' listening socket, or None without it."""
    if not args.metrics:
        return None
    if getattr(device, "iostats", None) is None:
        parser.error(f"--metrics: {name} keeps no I/O statistics")
    from .metrics import MetricsAddressError, open_listener

    try:
        return open_listener(args.metrics)
    except MetricsAddressError as exc:
        parser.error(str(exc))


def _start_reloader(run: _Serving) -> reload.Reloader | None:
    """A server that can hand its device over reloads on SIGHUP; its launcher must start
    before the sandbox forbids starting programs."""
    if run.control is None and run.successor is None:
        return None
    reloader = reload.Reloader(run.argv, run.notifier)
    try:
        reloader.start()
    except OSError as exc:
        logging.getLogger("vfu_server").warning("cannot start the reload launcher (%s): "
                                                 "SIGHUP will not reload", exc)
        return None
    return reloader


def _current_control(run: _Serving) -> trio.socket.SocketType | None:
    if run.successor is not None:
        return run.successor.taken.control if run.successor.taken is not None else None
    return run.control


async def _watch_sighup(hups: Any, nursery: trio.Nursery, reloader: reload.Reloader | None,
                        run: _Serving) -> None:
    rlog = logging.getLogger("vfu_server.reload")
    async for _ in hups:
        ctl = _current_control(run)
        if reloader is None or ctl is None:
            rlog.warning("SIGHUP: a reload needs a control socket (--control-socket or socket "
                         "activation); ignored")
        elif reloader.busy:
            rlog.warning("SIGHUP: a reload is already running; ignored")
        elif reloader.succeeded.is_set():
            rlog.warning("SIGHUP: the successor serves already; ignored")
        else:
            try:
                path = ctl.getsockname()
            except OSError:
                path = ""
            if not isinstance(path, str) or not path.startswith("/"):
                rlog.warning("SIGHUP: the control socket has no path to take over from; ignored")
                continue
            nursery.start_soon(reloader.reload, path)


def _exit_code(error: BaseException | None, run: _Serving) -> int:
    """The exit code after serving; the I/O statistics at exit, or the failure, reported."""
    from .handover import HandoverRefused

    device = run.device
    if error is None and getattr(device, "iostats", None) is not None:
        # The last word on the device's I/O, for the journal (the control socket is gone).
        import json

        logging.getLogger("vfu_server").info("I/O statistics at exit: %s",
                                             json.dumps(device.iostats.snapshot(), separators=(",", ":")))
    if isinstance(error, HandoverRefused):
        sys.stderr.write(f"{PROG}: handover refused: {error.reason}\n")
        reload.report(f"failed: handover refused: {error.reason}")
        return 1
    if error is not None:
        sys.stderr.write(f"{PROG} {run.name}: error: {error}\n")
        reload.report(f"failed: {error}")
        return 1
    return 0
