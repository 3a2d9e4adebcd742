"""``--sandbox``: what a running device server can still reach once start-up is complete.

Applied after the sockets are bound, the backing files and TAPs are open and the C helpers
are loaded, before the first client is served (:func:`apply`):

* resource limits (open files, no core dumps of guest memory),
* ``--user USER`` when started as root: supplementary groups, gid and uid dropped,
* every capability dropped (bounding, ambient, effective, permitted, inheritable sets),
* ``no_new_privs``,
* Landlock (:mod:`.landlock`): read-only access to the interpreter's and the project's code
  (modules are imported on demand, e.g. migration formats) and the cffi helpers' cache;
  removing files only where the server's own sockets are; TCP connections only to the ports a
  backend declared; no signals to and no abstract sockets of processes outside the sandbox,
* seccomp (:mod:`.seccomp`): a denylist of what a device server never does once running.

Modes: ``on`` (the default; a part the kernel lacks is left out and the start-up line says
so, unless ``--sandbox on`` was given explicitly, which then refuses to start), ``log``
(seccomp logs to the kernel's audit log instead of refusing, Landlock is not enforced) and
``off`` (nothing, with a warning). What a device or backend needs beyond the defaults it
declares through :class:`SandboxNeeds` (``PciDevice.sandbox_needs``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# The ctypes parts (_linux, landlock, seccomp) are imported when the sandbox is set up: every
# device imports this module for SandboxNeeds, and server start-up time is counted.

log = logging.getLogger("vfu_server.sandbox")

MODES = ("on", "log", "off")

#: Open files a sandboxed server may hold: DMA maps close their fds once mapped, eventfds are
#: bounded by the device's vectors, control clients by MAX_CONTROL_CLIENTS; thousands spare.
NOFILE_LIMIT = 4096

#: Files name resolution reads (for backends that connect to a host by name).
RESOLVER_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf")


class SandboxError(Exception):
    """The sandbox cannot be applied as asked; one line for users."""


@dataclass(frozen=True)
class SandboxNeeds:
    """What a device or backend still does after start-up, beyond serving its client.

    ``socket_families``: ``socket()`` of these address families (a backend that reconnects);
    ``tcp_connect_ports``: TCP ports it connects to; ``read_paths``: files or directories it
    reads; ``remove_in``: directories it removes its own files from (a socket it bound);
    ``signal_others``: it signals processes outside its sandbox (a live handover's fence kills
    a successor that stopped answering); ``abstract_unix``: it sends to abstract Unix sockets
    outside the sandbox (an abstract ``$NOTIFY_SOCKET``). The last two turn Landlock's
    scoping (ABI 6+) off for signals or abstract sockets.
    """

    socket_families: frozenset[int] = frozenset()
    tcp_connect_ports: frozenset[int] = frozenset()
    read_paths: frozenset[str] = frozenset()
    remove_in: frozenset[str] = frozenset()
    signal_others: bool = False
    abstract_unix: bool = False

    def __or__(self, other: SandboxNeeds) -> SandboxNeeds:
        return SandboxNeeds(self.socket_families | other.socket_families,
                            self.tcp_connect_ports | other.tcp_connect_ports,
                            self.read_paths | other.read_paths, self.remove_in | other.remove_in,
                            self.signal_others or other.signal_others, self.abstract_unix or other.abstract_unix)

    @staticmethod
    def union(needs: Iterable[SandboxNeeds]) -> SandboxNeeds:
        out = SandboxNeeds()
        for n in needs:
            out = out | n
        return out

    @staticmethod
    def unix_connect() -> SandboxNeeds:
        """Connecting (again) to a Unix socket path."""
        return SandboxNeeds(socket_families=frozenset({socket.AF_UNIX}))

    @staticmethod
    def tcp_connect(port: int) -> SandboxNeeds:
        """Connecting (again) to a host by name or address on ``port``."""
        return SandboxNeeds(
            # AF_NETLINK: getaddrinfo asks the kernel which address families are configured.
            socket_families=frozenset({socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK}),
            tcp_connect_ports=frozenset({port, 53}),  # 53: the resolver's TCP fallback
            read_paths=frozenset(RESOLVER_FILES),
        )

    @staticmethod
    def removes(path: str) -> SandboxNeeds:
        """Removing ``path`` (a socket it bound) at exit."""
        return SandboxNeeds(remove_in=frozenset({os.path.dirname(os.path.abspath(path))}))


@dataclass
class SandboxConfig:
    """The command line's choice, validated before start-up (:func:`configure`)."""

    mode: str = "on"
    explicit: bool = False  # --sandbox was given: what cannot be honoured is an error
    user: str | None = None
    uid: int | None = None
    gid: int | None = None
    landlock_abi: int = 0
    #: set once applied: what was applied, for logs (and tests)
    applied: list[str] = field(default_factory=list)


_active: SandboxConfig | None = None


def active() -> SandboxConfig | None:
    """The applied sandbox of this process, if any."""
    return _active


def configure(mode: str | None, user: str | None = None) -> SandboxConfig:
    """Check what ``--sandbox MODE`` / ``--user USER`` ask for against this kernel and
    process; raises :class:`SandboxError` for what cannot be honoured."""
    import pwd

    from . import _linux, landlock

    explicit = mode is not None
    cfg = SandboxConfig(mode=mode or "on", explicit=explicit, user=user)
    if cfg.mode not in MODES:
        raise SandboxError(f"--sandbox {cfg.mode!r}: expected one of {', '.join(MODES)}")
    if user is not None:
        if os.geteuid() != 0:
            raise SandboxError(f"--user {user}: only a server started as root can change user "
                               f"(running as uid {os.geteuid()})")
        try:
            entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        except KeyError:
            raise SandboxError(f"--user {user}: no such user") from None
        cfg.uid, cfg.gid = entry.pw_uid, entry.pw_gid
    if cfg.mode == "off":
        return cfg
    cfg.landlock_abi = landlock.abi_version()
    if cfg.explicit and cfg.mode == "on":
        if not _linux.SUPPORTED:
            raise SandboxError("--sandbox on: the seccomp filter is written for x86-64 only; "
                               "use --sandbox off on this machine")
        if cfg.landlock_abi == 0:
            raise SandboxError("--sandbox on: this kernel has no Landlock (Linux 5.13+ with "
                               "lsm=landlock); use --sandbox off or omit --sandbox")
    return cfg


# -- what may be read: the code ---------------------------------------------------------------


def _deep_enough(path: str) -> bool:
    """A read-only grant must name something below a top-level directory (never / or /home),
    so that an odd sys.path entry (the working directory) cannot open the whole disk."""
    parts = [p for p in path.split("/") if p]
    return len(parts) >= 2 and path != os.path.expanduser("~")


def code_paths() -> set[str]:
    """Directories the interpreter may import from or load shared objects from later."""
    import sysconfig

    from .. import cbuild

    found: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_path(key)
        if p:
            found.add(p)
    # The sys.path entry each loaded module came from: its siblings are what may be imported
    # later. Entries nothing came from (the working directory of ``python -m``) stay closed.
    roots = sorted((os.path.abspath(p) for p in sys.path if p), key=len, reverse=True)
    for module in list(sys.modules.values()):
        f = getattr(module, "__file__", None)
        if f:
            f = os.path.abspath(f)
            found.add(next((r for r in roots if f.startswith(r.rstrip("/") + "/")), os.path.dirname(f)))
    # Shared objects: their directories, for libraries loaded on demand (libgcc_s at a thread's
    # exit, NSS modules); not the interpreter's own directory (nothing runs from there again).
    executable = os.path.realpath(sys.executable)
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    mapped = fields[5].rstrip("\n").removesuffix(" (deleted)")
                    if mapped != executable:
                        found.add(os.path.dirname(mapped))
    except OSError:
        pass
    found.add(os.path.dirname(cbuild.cache_dir("x")))
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found.add(os.path.dirname(project))
    out = set()
    for p in found:
        p = os.path.realpath(p if os.path.isabs(p) else os.path.abspath(p))
        if os.path.isdir(p) and _deep_enough(p):
            out.add(p)
    # A directory beneath another one adds nothing.
    return {p for p in out if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in out)}


# -- threads ----------------------------------------------------------------------------------


def _other_threads() -> set[int]:
    """Threads of this process other than the caller that run user code (io_uring's kernel
    workers, ``iou-*``, never return to user space)."""
    me = threading.get_native_id()
    out = set()
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        if tid == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("iou-"):
                    continue
        except OSError:
            continue  # gone
        out.add(tid)
    return out


async def _confine_other_threads(tids: set[int], per_thread: list[Any]) -> set[int]:
    """Run ``per_thread`` steps in each of ``tids`` (trio's idle worker threads): as many
    jobs as threads, each held at a barrier until all have started, land on distinct
    threads (the idle ones first). Returns the threads it could not reach."""
    import trio

    n = len(tids)
    barrier = threading.Barrier(n, timeout=5)
    reached: set[int] = set()
    errors: list[BaseException] = []

    def job() -> None:
        try:
            for step in per_thread:
                step()
            reached.add(threading.get_native_id())
        except BaseException as exc:  # reported below, in the event loop
            errors.append(exc)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(trio.to_thread.run_sync, job)
    if errors:
        raise errors[0]
    return tids - reached


# -- applying ---------------------------------------------------------------------------------


def _limit_resources() -> str:
    import resource
    open_now = len(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(min(soft, NOFILE_LIMIT), open_now + 256)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    # A core file would hold guest memory (the DMA maps are in the address space).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return f"nofile {want}"


def _drop_user(cfg: SandboxConfig, own_files: Iterable[str]) -> None:
    assert cfg.uid is not None and cfg.gid is not None
    for path in own_files:
        # The server removes its sockets at exit, as the new user.
        try:
            os.chown(path, cfg.uid, cfg.gid, follow_symlinks=False)
        except OSError as exc:
            log.warning("sandbox: cannot hand %s to %s: %s", path, cfg.user, exc.strerror)
    os.setgroups([])
    os.setresgid(cfg.gid, cfg.gid, cfg.gid)  # glibc applies these to every thread
    os.setresuid(cfg.uid, cfg.uid, cfg.uid)
    if os.getresuid() != (cfg.uid,) * 3 or os.getresgid() != (cfg.gid,) * 3 or os.getgroups():
        raise SandboxError(f"--user {cfg.user}: the user change did not take")


async def apply(cfg: SandboxConfig, needs: SandboxNeeds = SandboxNeeds(),
                own_sockets: Iterable[str | None] = ()) -> str:
    """Apply ``cfg`` to this process (from the event loop's thread, after start-up).

    Returns the start-up line (``sandbox: landlock ABI 7, seccomp 96 rules, ...``). Raises
    :class:`SandboxError` when an explicit ``--sandbox on`` (or ``--user``) cannot be
    honoured; in the default mode a part that fails is left out and the line says so.
    """
    global _active
    from . import _linux, landlock, seccomp

    sockets = [os.path.abspath(p) for p in own_sockets if p]
    parts: list[str] = []

    def fail(what: str, exc: BaseException) -> None:
        reason = getattr(exc, "strerror", None) or str(exc)
        if cfg.explicit and cfg.mode == "on":
            raise SandboxError(f"--sandbox on: {what}: {reason}") from exc
        parts.append(f"no {what} ({reason})")

    if cfg.mode == "off":
        if cfg.user is not None:
            _drop_user(cfg, sockets)
            parts.append(f"user {cfg.user}")
        return "sandbox: off" + (f", {', '.join(parts)}" if parts else "")  # the command line warned
    parts.append(_limit_resources())

    ruleset = None
    if cfg.mode == "on" and cfg.landlock_abi:
        paths = dict.fromkeys(code_paths(), landlock.READ_ONLY)
        paths["/etc/localtime"] = landlock.READ_FILE  # log timestamps in local time
        for p in needs.read_paths:
            paths[p] = paths.get(p, 0) | landlock.READ_FILE | landlock.READ_DIR
        for d in {os.path.dirname(s) for s in sockets} | set(needs.remove_in):
            paths[d] = paths.get(d, 0) | landlock.REMOVE_FILE
        try:
            scoped = (0 if needs.signal_others else landlock.SCOPE_SIGNAL) | \
                (0 if needs.abstract_unix else landlock.SCOPE_ABSTRACT_UNIX_SOCKET)
            ruleset = landlock.build(cfg.landlock_abi, paths, tuple(needs.tcp_connect_ports), scoped)
        except OSError as exc:
            fail("landlock", exc)
    flt = None
    if _linux.SUPPORTED:
        flt = seccomp.build(needs.socket_families, log_only=cfg.mode == "log")

    if cfg.user is not None:
        _drop_user(cfg, sockets)
    root_caps = _linux.effective_capabilities() != 0

    def nnp() -> None:
        _linux.set_no_new_privs()

    per_thread = [nnp]
    if root_caps:
        per_thread.append(_linux.drop_capabilities)
    if ruleset is not None:
        per_thread.append(ruleset.restrict_self)
    try:
        others = _other_threads()  # before Landlock closes /proc
        for step in per_thread:
            step()
        if others:
            missed = await _confine_other_threads(others, per_thread)
            if missed:
                raise SandboxError(f"{len(missed)} thread(s) that are not trio's could not be confined "
                                   "(a device starts its threads after it reports ready, or through "
                                   "trio.to_thread)")
    except (OSError, SandboxError) as exc:
        if ruleset is not None:
            ruleset.close()
        raise SandboxError(f"sandbox: {exc}") from exc
    if ruleset is not None:
        ports = f", tcp {','.join(map(str, ruleset.ports))}" if ruleset.ports else ""
        unscoped = [what for bit, what in ((landlock.SCOPE_SIGNAL, "signals"),
                                           (landlock.SCOPE_ABSTRACT_UNIX_SOCKET, "abstract sockets"))
                    if ruleset.abi >= 6 and not ruleset.scoped & bit]
        scope = f", not scoped: {' and '.join(unscoped)}" if unscoped else ""
        parts.insert(0, f"landlock ABI {ruleset.abi} ({len(ruleset.paths)} paths{ports}{scope})")
        ruleset.close()
    elif cfg.mode == "log":
        parts.insert(0, "landlock not enforced (log mode)")
    elif not cfg.landlock_abi:
        parts.insert(0, "no landlock (kernel)")
    if flt is not None:
        try:
            seccomp.install(flt)
            fams = seccomp.family_names(needs.socket_families)
            parts.insert(1, f"seccomp {flt.rules} rules" + (" (log only, to the kernel log)" if flt.log_only else "")
                         + (f", sockets {'/'.join(fams)}" if fams else ""))
        except OSError as exc:
            fail("seccomp", exc)
    else:
        fail("seccomp", OSError(errno.ENOTSUP, "x86-64 only"))
    parts.append("no_new_privs")
    if root_caps:
        parts.append("no capabilities")
    if cfg.user is not None:
        parts.append(f"user {cfg.user}")
    cfg.applied = parts
    _active = cfg
    return "sandbox: " + ", ".join(parts)


def refusal(exc: BaseException) -> str | None:
    """A one-line account of ``exc`` when it is the sandbox refusing something (EPERM or
    EACCES under an applied sandbox), naming the code that tried; else None."""
    if _active is None or _active.mode == "off" or not isinstance(exc, PermissionError):
        return None
    import sysconfig
    import traceback

    where = ""
    stdlib = sysconfig.get_path("stdlib") + "/"
    # The innermost frame that is not the standard library's: the code that tried.
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(stdlib)]
    if frames:
        f = frames[-1]
        where = f" at {os.path.basename(f.filename)}:{f.lineno} ({(f.line or f.name).strip()})"
    return f"refused by the sandbox{where}: {exc}"
