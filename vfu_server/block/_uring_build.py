"""cffi build script of the io_uring ring used by :mod:`vfu_server.block.uring`.

API (out-of-line) mode, raw syscalls: no liburing is needed, only ``<linux/io_uring.h>``
(linux-libc-dev) and a C compiler. :mod:`vfu_server.block.uring` compiles it on first use into
the user's cache directory; ``python -m vfu_server.block._uring_build DIR`` builds it ahead of
time (a packager can build ``HELPER.make_builder()`` instead).

The C part is deliberately small: set the ring up (with the completion eventfd registered), fill
one SQE, publish pending SQEs and enter the kernel, copy CQEs out. Everything with policy --
batching, waiting, errors, fallbacks -- is Python.

The ring is restricted before it is enabled (``IORING_REGISTER_RESTRICTIONS``, Linux 5.10+): it
runs NOP, READV, WRITEV and FSYNC without SQE flags and takes no more registrations. Seccomp
does not see what a ring does, so under ``--sandbox`` an unrestricted ring would be a way
around the filter (IORING_OP_SOCKET, CONNECT, OPENAT, ...) for code that got hold of it.
"""

from __future__ import annotations

import sys

from .. import cbuild

MODULE_NAME = "_vfu_uring"

CDEF = """
struct iovec { void *iov_base; size_t iov_len; };

struct vfu_ring {
    int fd;
    unsigned sq_entries;
    unsigned cq_entries;
    unsigned features;
    ...;
};

static const int VFU_OP_NOP;
static const int VFU_OP_READV;
static const int VFU_OP_WRITEV;
static const int VFU_OP_FSYNC;
static const int VFU_FSYNC_DATASYNC;

int vfu_ring_setup(struct vfu_ring *r, unsigned entries, int eventfd);
int vfu_ring_prep(struct vfu_ring *r, int op, int fd, const struct iovec *iov, unsigned nr,
                  uint64_t off, uint64_t user_data, int rw_flags);
int vfu_ring_submit(struct vfu_ring *r, unsigned wait_nr);
unsigned vfu_ring_reap(struct vfu_ring *r, uint64_t *user_data, int32_t *res, unsigned max);
unsigned vfu_ring_unsubmitted(struct vfu_ring *r);
void vfu_ring_close(struct vfu_ring *r);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/io_uring.h>

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif
#ifndef __NR_io_uring_register
#define __NR_io_uring_register 427
#endif

static const int VFU_OP_NOP = IORING_OP_NOP;
static const int VFU_OP_READV = IORING_OP_READV;
static const int VFU_OP_WRITEV = IORING_OP_WRITEV;
static const int VFU_OP_FSYNC = IORING_OP_FSYNC;
static const int VFU_FSYNC_DATASYNC = IORING_FSYNC_DATASYNC;

struct vfu_ring {
    int fd;
    unsigned sq_entries;
    unsigned cq_entries;
    unsigned features;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_map, *cq_map, *sqe_map;
    size_t sq_map_len, cq_map_len, sqe_map_len;
    unsigned fill;      /* SQEs filled so far (free-running) */
    unsigned published; /* SQEs made visible to the kernel in sq_array/sq_tail */
};

void vfu_ring_close(struct vfu_ring *r)
{
    if (r->sqe_map && r->sqe_map != MAP_FAILED)
        munmap(r->sqe_map, r->sqe_map_len);
    if (r->cq_map && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map && r->sq_map != MAP_FAILED)
        munmap(r->sq_map, r->sq_map_len);
    if (r->fd >= 0)
        close(r->fd);
    memset(r, 0, sizeof *r);
    r->fd = -1;
}

/* Only what the backend submits, and no registrations once enabled (see the module docstring). */
static int restrict_ring(int fd)
{
    static const uint8_t ops[] = {IORING_OP_NOP, IORING_OP_READV, IORING_OP_WRITEV, IORING_OP_FSYNC};
    struct io_uring_restriction res[sizeof ops];
    unsigned i;

    memset(res, 0, sizeof res);
    for (i = 0; i < sizeof ops; i++) {
        res[i].opcode = IORING_RESTRICTION_SQE_OP;
        res[i].sqe_op = ops[i];
    }
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_RESTRICTIONS, res, sizeof ops) < 0)
        return -1;
    return (int)syscall(__NR_io_uring_register, fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
}

int vfu_ring_setup(struct vfu_ring *r, unsigned entries, int eventfd)
{
    struct io_uring_params p;
    int err;
    char *sq, *cq;

    memset(r, 0, sizeof *r);
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_R_DISABLED;
    r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (r->fd < 0) {
        err = errno;
        r->fd = -1;
        return -err;
    }
    r->sq_entries = p.sq_entries;
    r->cq_entries = p.cq_entries;
    r->features = p.features;
    r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_map_len > r->sq_map_len)
            r->sq_map_len = r->cq_map_len;
        r->cq_map_len = r->sq_map_len;
    }
    r->sq_map = mmap(0, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     r->fd, IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED)
        goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        r->cq_map = r->sq_map;
    } else {
        r->cq_map = mmap(0, r->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                         r->fd, IORING_OFF_CQ_RING);
        if (r->cq_map == MAP_FAILED)
            goto fail;
    }
    r->sqe_map_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqe_map = mmap(0, r->sqe_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      r->fd, IORING_OFF_SQES);
    if (r->sqe_map == MAP_FAILED)
        goto fail;
    sq = r->sq_map;
    cq = r->cq_map;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    r->sqes = r->sqe_map;
    r->fill = r->published = *r->sq_tail;
    if (eventfd >= 0) {
        int efd = eventfd;
        if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_EVENTFD, &efd, 1) < 0)
            goto fail;
    }
    if (restrict_ring(r->fd) < 0)
        goto fail;
    return 0;
fail:
    err = errno;
    vfu_ring_close(r);
    return -err;
}

/* Fill one SQE; it reaches the kernel at the next vfu_ring_submit(). -EBUSY: SQ full. */
int vfu_ring_prep(struct vfu_ring *r, int op, int fd, const struct iovec *iov, unsigned nr,
                  uint64_t off, uint64_t user_data, int rw_flags)
{
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    struct io_uring_sqe *sqe;

    if (r->fill - head >= r->sq_entries)
        return -EBUSY;
    sqe = &r->sqes[r->fill & *r->sq_mask];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = (uint8_t)op;
    sqe->fd = fd;
    sqe->off = off;
    sqe->addr = (uint64_t)(uintptr_t)iov;
    sqe->len = nr;
    if (op == IORING_OP_FSYNC)
        sqe->fsync_flags = (uint32_t)rw_flags;
    else
        sqe->rw_flags = rw_flags;
    sqe->user_data = user_data;
    r->fill++;
    return 0;
}

/* Publish filled SQEs and enter the kernel once for everything it has not consumed yet;
   wait_nr > 0 also waits for that many completions. Returns io_uring_enter's result. */
int vfu_ring_submit(struct vfu_ring *r, unsigned wait_nr)
{
    unsigned mask = *r->sq_mask;
    unsigned tail = r->published;
    unsigned pending;
    int ret;

    while (tail != r->fill) {
        r->sq_array[tail & mask] = tail & mask;
        tail++;
    }
    r->published = tail;
    __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
    pending = tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (pending == 0 && wait_nr == 0)
        return 0;
    do {
        ret = (int)syscall(__NR_io_uring_enter, r->fd, pending, wait_nr,
                           wait_nr ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
    } while (ret < 0 && errno == EINTR);
    return ret < 0 ? -errno : ret;
}

unsigned vfu_ring_unsubmitted(struct vfu_ring *r)
{
    return r->fill - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
}

unsigned vfu_ring_reap(struct vfu_ring *r, uint64_t *user_data, int32_t *res, unsigned max)
{
    unsigned head = *r->cq_head;
    unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    unsigned mask = *r->cq_mask;
    unsigned n = 0;

    while (head != tail && n < max) {
        struct io_uring_cqe *c = &r->cqes[head & mask];
        user_data[n] = c->user_data;
        res[n] = c->res;
        n++;
        head++;
    }
    __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    return n;
}
"""


HELPER = cbuild.Helper("uring", MODULE_NAME, CDEF, SOURCE)


if __name__ == "__main__":
    HELPER.main(sys.argv[1:])
