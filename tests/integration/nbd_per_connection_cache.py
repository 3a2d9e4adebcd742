#!/usr/bin/env python3
"""An nbdkit ``sh`` plugin: an export whose server caches writes per connection until a flush,
which the NBD protocol allows a server without multi-conn (NBD_FLAG_CAN_MULTI_CONN) to do.

    nbdkit sh nbd_per_connection_cache.py image=FILE log=FILE [flush_delay=SECONDS] [flush_fails_if=PATH]

A connection's writes stay in its own overlay (its reads see them, other connections' do
not) until it sends NBD_CMD_FLUSH (or a FUA write, emulated by nbdkit as a flush) or
disconnects; then they go into FILE. ``log`` gets one line per call: ``METHOD HANDLE ...``,
in the order nbdkit made them. ``flush_delay`` makes every flush wait that long first (the
thread model is parallel: other connections are served meanwhile). While the file
``flush_fails_if`` exists, every flush fails with EIO and writes nothing back.

Every call is a new process (nbdkit's sh plugin); state lives in nbdkit's ``$tmpdir``.
"""

import os
import shutil
import sys
import time

UNIT = 512
TMP = os.environ.get("tmpdir", "")  # noqa: SIM112 (nbdkit sets it in lower case)


def setting(key: str, default: str = "") -> str:
    try:
        with open(os.path.join(TMP, f"config.{key}")) as f:
            return f.read()
    except FileNotFoundError:
        return default


def log(*words: object) -> None:
    path = setting("log")
    if path:
        with open(path, "a") as f:
            f.write(" ".join(str(w) for w in words) + "\n")


def block_path(handle: str, blk: int) -> str:
    return os.path.join(handle, str(blk))


def write_back(handle: str) -> int:
    """This connection's cached blocks into the image; how many."""
    names = [n for n in os.listdir(handle) if n.isdigit()]
    with open(setting("image"), "r+b") as image:
        for name in names:
            # Renamed first: a write that lands meanwhile makes a new file, which stays cached.
            moving = block_path(handle, int(name)) + ".moving"
            os.rename(block_path(handle, int(name)), moving)
            with open(moving, "rb") as f:
                image.seek(int(name) * UNIT)
                image.write(f.read())
            os.unlink(moving)
        image.flush()
        os.fsync(image.fileno())
    return len(names)


def read_blocks(handle: str, offset: int, count: int) -> bytes:
    with open(setting("image"), "rb") as image:
        image.seek(offset)
        data = bytearray(image.read(count))
    data += bytes(count - len(data))
    for blk in range(offset // UNIT, (offset + count + UNIT - 1) // UNIT):
        try:
            with open(block_path(handle, blk), "rb") as f:
                cached = f.read()
        except FileNotFoundError:
            continue
        start, end = max(blk * UNIT, offset), min(blk * UNIT + UNIT, offset + count)
        data[start - offset : end - offset] = cached[start - blk * UNIT : end - blk * UNIT]
    return bytes(data)


def main() -> int:
    method, args = sys.argv[1], sys.argv[2:]
    if method == "config":
        with open(os.path.join(TMP, f"config.{args[0]}"), "w") as f:
            f.write(args[1])
    elif method == "config_complete":
        if not setting("image"):
            print("EINVAL image=FILE is required", file=sys.stderr)
            return 1
    elif method == "thread_model":
        print("parallel")
    elif method == "open":
        handle = os.path.join(TMP, f"c{time.monotonic_ns()}-{os.getpid()}")
        os.mkdir(handle)
        log("open", handle)
        print(handle)
    elif method == "close":
        # A client that leaves without a flush: its writes are committed all the same.
        log("close", args[0], write_back(args[0]))
        shutil.rmtree(args[0], ignore_errors=True)
    elif method == "get_size":
        print(os.path.getsize(setting("image")))
    elif method in ("can_write", "can_flush"):
        return 0
    elif method in ("can_multi_conn", "can_zero", "can_trim", "can_extents", "can_fast_zero", "is_rotational"):
        return 3
    elif method == "can_fua":
        print("emulate")
    elif method == "pread":
        handle, count, offset = args[0], int(args[1]), int(args[2])
        log("pread", handle, offset, count)
        sys.stdout.buffer.write(read_blocks(handle, offset, count))
    elif method == "pwrite":
        handle, count, offset = args[0], int(args[1]), int(args[2])
        data = sys.stdin.buffer.read(count)
        for blk in range(offset // UNIT, (offset + count + UNIT - 1) // UNIT):
            start, end = max(blk * UNIT, offset), min(blk * UNIT + UNIT, offset + count)
            block = bytearray(read_blocks(handle, blk * UNIT, UNIT))
            block[start - blk * UNIT : end - blk * UNIT] = data[start - offset : end - offset]
            tmp = block_path(handle, blk) + ".new"
            with open(tmp, "wb") as f:
                f.write(block)
            os.rename(tmp, block_path(handle, blk))
        log("pwrite", handle, offset, count)
    elif method == "flush":
        time.sleep(float(setting("flush_delay", "0")))
        failing = setting("flush_fails_if")
        if failing and os.path.exists(failing):
            log("flush-failed", args[0])
            print("EIO flush_fails_if exists", file=sys.stderr)
            return 1
        log("flush", args[0], write_back(args[0]))
    else:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
