"""A device taken over by a hostile guest, for the sandbox tests: each register write tries one
escape. An attempt that the sandbox refuses raises (the server answers EIO and logs the
refusal); one that succeeds is counted in register 0 (the tests expect 0 under the sandbox).

The files it creates and the TCP port it connects to come from the environment
(``VFU_HOSTILE_DIR``, ``VFU_HOSTILE_PORT``), which the test sets.
"""

from __future__ import annotations

import ctypes
import os
import socket

import trio

from vfu_server import MemoryBar, PciDevice, PciIdentity

PTRACE_ATTACH, PTRACE_DETACH = 16, 17
THREAD_IDLE, THREAD_REFUSED, THREAD_ESCAPED = 0, 1, 2


class Hostile(PciDevice):
    identity = PciIdentity(vendor_id=0x1234, device_id=0xBAD6)
    bar0 = MemoryBar(0x1000, register_size=4)

    def __init__(self) -> None:
        super().__init__()
        self.escaped: list[str] = []
        self.thread_result = THREAD_IDLE

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # Leaves an idle worker thread behind when the sandbox comes: it must be confined too.
        await trio.to_thread.run_sync(lambda: None)
        task_status.started()

    @bar0.reader
    def read_register(self, offset: int, size: int) -> int:
        return {0: len(self.escaped), 4: self.thread_result}.get(offset, 0xC0FFEE)

    @bar0.writer
    def write_register(self, offset: int, size: int, value: int) -> None:
        attempt = {0: self.read_shadow, 4: self.create_file, 8: self.exec_shell, 0xC: self.connect_tcp,
                   0x10: self.fork, 0x14: self.ptrace_parent, 0x18: self.read_shadow_in_thread,
                   0x1C: self.signal_parent}[offset]
        attempt()

    def escape(self, what: str) -> None:
        self.escaped.append(what)
        self.log.warning("ESCAPED: %s", what)

    def read_shadow(self) -> None:
        with open("/etc/shadow", "rb") as f:
            f.read(1)
        self.escape("read /etc/shadow")

    def create_file(self) -> None:
        path = os.path.join(os.environ["VFU_HOSTILE_DIR"], "planted")
        with open(path, "w") as f:
            f.write("planted by a device")
        self.escape(f"created {path}")

    def exec_shell(self) -> None:
        os.execv("/bin/sh", ["/bin/sh", "-c", "exit 0"])  # on success this process is gone

    def connect_tcp(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.connect(("127.0.0.1", int(os.environ["VFU_HOSTILE_PORT"])))
        finally:
            sock.close()
        self.escape("connected to TCP")

    def fork(self) -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        self.escape("forked")

    def ptrace_parent(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.ptrace.restype = ctypes.c_long
        parent = os.getppid()
        if libc.ptrace(PTRACE_ATTACH, parent, None, None) == -1:
            err = ctypes.get_errno()
            raise OSError(err, f"ptrace(PTRACE_ATTACH, {parent}): {os.strerror(err)}")
        libc.ptrace(PTRACE_DETACH, parent, None, None)
        self.escape("ptraced the parent")

    def signal_parent(self) -> None:
        os.kill(os.getppid(), 0)  # signal 0: the permission check alone, harmless if it passes
        self.escape("may signal the parent")

    def read_shadow_in_thread(self) -> None:
        async def attempt() -> None:
            try:
                await trio.to_thread.run_sync(self.read_shadow)
                self.thread_result = THREAD_ESCAPED
            except PermissionError as exc:
                self.log.warning("worker thread: refused by the sandbox: %s", exc)
                self.thread_result = THREAD_REFUSED

        self.spawn(attempt)


class OwnThread(PciDevice):
    """Starts a thread of its own (not trio's) before it is ready: Landlock cannot reach it
    (a domain is per thread), so the server must refuse to start rather than leave it open."""

    identity = PciIdentity(vendor_id=0x1234, device_id=0xBAD7)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        import threading

        threading.Thread(target=threading.Event().wait, daemon=True, name="device-own").start()
        task_status.started()
