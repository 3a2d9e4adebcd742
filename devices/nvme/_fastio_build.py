"""cffi build module of the NVMe I/O fast path used by :mod:`devices.nvme.fastio`.

One C function, ``vfu_fastio_run``, does for a run of SQ entries what the controller's inline
Python path does for one: fetch the entry, check it, turn its PRPs into iovecs of guest memory,
``preadv2(RWF_NOWAIT)`` or ``pwritev2`` on the namespace's file, post the completion. It
handles only the common case and stops, without consuming it, at the first entry it does not
fully accept, so Python then handles that entry with every check, status and log entry it has:

* Read or Write, no fused operation, PRPs (PSDT 0), no protection information; a write
  neither FUA nor with the volatile write cache disabled;
* a namespace on a file (``read_fd``/``write_fd`` >= 0: page-cache reads that cannot block,
  buffered writes to a writable file), the LBA range inside it, at most ``max_bytes``;
* PRP1 dword aligned, PRP2 or a single-page PRP list with page-aligned entries, every piece
  inside one DMA region (writable for a read), at most 64 iovecs after merging;
* the whole transfer done by one call (a page-cache miss, EAGAIN, an error or a short
  transfer stops it; a re-done read or write is harmless);
* room in the CQ.

The C side is at least as strict as Python everywhere, so anything it accepts Python would have
accepted with status Success; C never decides an error status.
"""

from __future__ import annotations

import sys

from vfu_server import cbuild

MODULE_NAME = "_vfu_nvme_fastio"

STRUCTS = """
struct vfu_region { uint64_t iova; uint64_t len; uintptr_t host; int writable; };
struct vfu_ns { int read_fd; int write_fd; uint32_t lba_shift; uint64_t nsze; };
struct vfu_fastio {
    const struct vfu_region *regions;
    unsigned nregions;
    const struct vfu_ns *ns;
    unsigned nns;
    uint32_t page_size;
    uint64_t max_bytes;
    int write_cache;
    uint64_t bytes_read, bytes_written, read_cmds, write_cmds;
    int stop;
};
struct vfu_sq {
    uint64_t sq_base; uint32_t sq_size, sq_head, sq_tail; uint32_t sqid;
    uint64_t cq_base; uint32_t cq_size, cq_head, cq_tail, cq_phase;
};
"""

CDEF = STRUCTS + """
static const int VFU_STOP_EMPTY, VFU_STOP_LIMIT, VFU_STOP_CQ_FULL, VFU_STOP_RINGS;
static const int VFU_STOP_COMMAND, VFU_STOP_DATA, VFU_STOP_IO;
unsigned vfu_fastio_run(struct vfu_fastio *c, struct vfu_sq *q, unsigned max);
"""

SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

@STRUCTS@
/* Why the last run stopped (for tests and diagnostics). */
static const int VFU_STOP_EMPTY = 0;    /* head reached tail */
static const int VFU_STOP_LIMIT = 1;    /* handled max entries */
static const int VFU_STOP_CQ_FULL = 2;
static const int VFU_STOP_RINGS = 3;    /* SQ or CQ not inside one (writable) region */
static const int VFU_STOP_COMMAND = 4;  /* an entry for Python: opcode, flags, range, ... */
static const int VFU_STOP_DATA = 5;     /* its data pointer is for Python */
static const int VFU_STOP_IO = 6;       /* EAGAIN, an error or a short transfer */

#define MAX_IOV 64
#define OPC_WRITE 0x01
#define OPC_READ 0x02

/* Host address of guest [iova, iova + len), or 0 when it is not inside one region (or that
   region is read-only and we are to write it). */
static uintptr_t xlate(const struct vfu_fastio *c, uint64_t iova, uint64_t len, int write)
{
    for (unsigned i = 0; i < c->nregions; i++) {
        const struct vfu_region *r = &c->regions[i];
        if (iova >= r->iova && iova - r->iova < r->len && len <= r->len - (iova - r->iova)) {
            if (write && !r->writable)
                return 0;
            return r->host + (uintptr_t)(iova - r->iova);
        }
    }
    return 0;
}

static int add_piece(const struct vfu_fastio *c, struct iovec *iov, int *n, uint64_t iova,
                     uint64_t len, int write)
{
    uintptr_t host = xlate(c, iova, len, write);
    if (!host)
        return -1;
    if (*n && (uintptr_t)iov[*n - 1].iov_base + iov[*n - 1].iov_len == host) {
        iov[*n - 1].iov_len += len;  /* contiguous in our address space: one iovec */
        return 0;
    }
    if (*n == MAX_IOV)
        return -1;
    iov[*n].iov_base = (void *)host;
    iov[*n].iov_len = len;
    (*n)++;
    return 0;
}

/* PRP1/PRP2 of a transfer of len bytes into iovecs; -1: leave the command to Python. */
static int prp_iov(const struct vfu_fastio *c, uint64_t prp1, uint64_t prp2, uint64_t len,
                   int write, struct iovec *iov)
{
    uint64_t page = c->page_size, first, remaining, needed, slots;
    int n = 0;

    if (prp1 & 3)
        return -1;
    first = page - (prp1 & (page - 1));
    if (first > len)
        first = len;
    if (add_piece(c, iov, &n, prp1, first, write))
        return -1;
    remaining = len - first;
    if (!remaining)
        return n;
    if (remaining <= page) {
        if (prp2 & (page - 1))
            return -1;
        return add_piece(c, iov, &n, prp2, remaining, write) ? -1 : n;
    }
    if (prp2 & 7)
        return -1;
    needed = (remaining + page - 1) / page;
    slots = (page - (prp2 & (page - 1))) / 8;
    if (needed > slots)
        return -1;  /* a chained list: Python */
    uintptr_t list = xlate(c, prp2, needed * 8, 0);
    if (!list)
        return -1;
    for (uint64_t i = 0; i < needed; i++) {
        uint64_t entry, piece = remaining < page ? remaining : page;
        memcpy(&entry, (const void *)(list + 8 * i), 8);  /* the guest may be writing it */
        if (entry & (page - 1))
            return -1;
        if (add_piece(c, iov, &n, entry, piece, write))
            return -1;
        remaining -= piece;
    }
    return n;
}

static uint32_t le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t le64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* One command; 0 done, else the stop reason. */
static int run_one(struct vfu_fastio *c, const uint8_t *sqe)
{
    uint8_t opc = sqe[0], flags = sqe[1];
    uint32_t nsid = le32(sqe + 4), cdw12 = le32(sqe + 48);
    uint64_t prp1 = le64(sqe + 24), prp2 = le64(sqe + 32);
    uint64_t slba = le64(sqe + 40);  /* CDW10 | CDW11 << 32 */
    uint64_t nlb = (uint64_t)(cdw12 & 0xFFFF) + 1, len;
    const struct vfu_ns *ns;
    struct iovec iov[MAX_IOV];
    int n;
    ssize_t done;

    if ((opc != OPC_READ && opc != OPC_WRITE) || flags)
        return VFU_STOP_COMMAND;
    if ((cdw12 >> 26) & 0xF)  /* PRINFO */
        return VFU_STOP_COMMAND;
    if (nsid == 0 || nsid > c->nns)
        return VFU_STOP_COMMAND;
    ns = &c->ns[nsid - 1];
    if ((opc == OPC_READ ? ns->read_fd : ns->write_fd) < 0 || slba > ns->nsze || nlb > ns->nsze - slba)
        return VFU_STOP_COMMAND;
    len = nlb << ns->lba_shift;
    if (len > c->max_bytes)
        return VFU_STOP_COMMAND;
    if (opc == OPC_WRITE && ((cdw12 & (1u << 30)) || !c->write_cache))
        return VFU_STOP_COMMAND;
    n = prp_iov(c, prp1, prp2, len, opc == OPC_READ, iov);
    if (n < 0)
        return VFU_STOP_DATA;
    if (opc == OPC_READ)
        done = preadv2(ns->read_fd, iov, n, (off_t)(slba << ns->lba_shift), RWF_NOWAIT);
    else
        done = pwritev2(ns->write_fd, iov, n, (off_t)(slba << ns->lba_shift), 0);
    if (done < 0 || (uint64_t)done != len)
        return VFU_STOP_IO;
    if (opc == OPC_READ) {
        c->bytes_read += len;
        c->read_cmds++;
    } else {
        c->bytes_written += len;
        c->write_cmds++;
    }
    return 0;
}

unsigned vfu_fastio_run(struct vfu_fastio *c, struct vfu_sq *q, unsigned max)
{
    uintptr_t sq, cq;
    unsigned count = 0;

    if (c->page_size < 4096 || (c->page_size & (c->page_size - 1))
            || !q->sq_size || !q->cq_size || q->sq_head >= q->sq_size || q->sq_tail >= q->sq_size
            || q->cq_tail >= q->cq_size || q->cq_head >= q->cq_size) {
        c->stop = VFU_STOP_RINGS;
        return 0;
    }
    sq = xlate(c, q->sq_base, (uint64_t)q->sq_size * 64, 0);
    cq = xlate(c, q->cq_base, (uint64_t)q->cq_size * 16, 1);
    if (!sq || !cq) {
        c->stop = VFU_STOP_RINGS;
        return 0;
    }
    c->stop = VFU_STOP_EMPTY;
    while (q->sq_head != q->sq_tail) {
        const uint8_t *entry;
        uint8_t sqe[64], *cqe;
        uint32_t dw2, dw3;
        int stop;

        if (count == max) {
            c->stop = VFU_STOP_LIMIT;
            break;
        }
        if ((q->cq_tail + 1) % q->cq_size == q->cq_head) {
            c->stop = VFU_STOP_CQ_FULL;
            break;
        }
        entry = (const uint8_t *)(sq + (uintptr_t)q->sq_head * 64);
        memcpy(sqe, entry, 64);  /* one snapshot: the guest could rewrite the entry meanwhile */
        stop = run_one(c, sqe);
        if (stop) {
            c->stop = stop;
            break;
        }
        q->sq_head = (q->sq_head + 1) % q->sq_size;
        cqe = (uint8_t *)(cq + (uintptr_t)q->cq_tail * 16);
        dw2 = q->sq_head | q->sqid << 16;
        dw3 = (uint32_t)sqe[2] | (uint32_t)sqe[3] << 8 | (q->cq_phase & 1) << 16;
        memset(cqe, 0, 8);
        memcpy(cqe + 8, &dw2, 4);
        /* The host polls the phase tag in dword 3: it must not see it before dwords 0-2. */
        __atomic_thread_fence(__ATOMIC_RELEASE);
        __atomic_store_n((uint32_t *)(cqe + 12), dw3, __ATOMIC_RELAXED);
        if (++q->cq_tail == q->cq_size) {
            q->cq_tail = 0;
            q->cq_phase ^= 1;
        }
        count++;
    }
    return count;
}
"""


def source_hash() -> str:
    return cbuild.source_hash(CDEF, SOURCE)


SOURCE = SOURCE.replace("@STRUCTS@", STRUCTS)
ffibuilder = cbuild.builder(MODULE_NAME, CDEF, SOURCE)


def build_into_cache() -> str:
    """Build (or find) the library in the user's cache; ``python -m`` this module does it
    ahead of the first server start."""
    module = cbuild.load("nvme-fastio", MODULE_NAME, source_hash(), ffibuilder)
    return str(module.__file__)


if __name__ == "__main__":
    print(build_into_cache() if len(sys.argv) < 2 else ffibuilder.compile(tmpdir=sys.argv[1], verbose=False))
