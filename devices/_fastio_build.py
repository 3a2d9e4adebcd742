"""cffi build module of the devices' I/O fast paths: NVMe Read/Write, virtio-blk IN/OUT and
virtio-net transmit.

Two C functions do for a run of requests what the devices' inline Python paths do for one, on
a file namespace or disk in the page cache: ``vfu_fastio_run`` (NVMe, used by
:mod:`vfu_devices.nvme.fastio`) and ``vfu_blk_run`` (virtio-blk, used by :mod:`vfu_devices.virtio.blk`).
Each handles only the common case and stops, without consuming it, at the first request it
does not fully accept, so Python then handles that one with every check, status and error it
has. C is at least as strict as Python everywhere: anything it completes, Python would have
completed with a success status, and C never decides an error.

NVMe (``vfu_fastio_run``) accepts:

* Read or Write, no fused operation, PRPs (PSDT 0), no protection information; a write
  neither FUA nor with the volatile write cache disabled;
* a namespace on a file (``read_fd``/``write_fd`` >= 0: page-cache reads that cannot block,
  buffered writes to a writable file), the LBA range inside it, at most ``max_bytes``;
* PRP1 dword aligned, PRP2 or a single-page PRP list with page-aligned entries, every piece
  inside one DMA region (writable for a read), at most 1024 iovecs (IOV_MAX) after merging;
* room in the CQ.

virtio-blk (``vfu_blk_run``) accepts a chain (direct, or one indirect table when negotiated)
of a 16-byte header descriptor, data descriptors, and a 1-byte status descriptor, for IN or
OUT, sector-aligned and inside the disk, at most ``max_bytes``; every descriptor non-empty and
inside one DMA region, device-writable ones writable, at most 1024 iovecs after merging.

Both need the whole transfer done by one ``preadv2(RWF_NOWAIT)`` or ``pwritev2`` (a page-cache
miss, EAGAIN, an error or a short transfer stops the run; a re-done read or write is harmless).

virtio-net transmit (``vfu_net_tx_run``, used by :mod:`vfu_devices.virtio.net`) accepts a chain
(direct, or one indirect table when negotiated) of readable descriptors only, every non-empty
one inside one DMA region, ``min_len..max_len`` bytes in all, and sends it to the TAP with one
``writev`` straight from guest memory (less the virtio-net header for a TAP without one). A
failed write (EAGAIN included) stops the run with the frame not consumed: Python writes it
again and waits or drops it, as for any frame of its own.

virtio-net receive (``vfu_net_rx_run``) reads packets from the TAP into a buffer of its own and
copies each into the receive ring: with mergeable receive buffers over as many chains as it
needs, else into one chain, every chain all device-writable descriptors inside one writable
region. A packet it does not place (the device's filters other than promiscuous or its own
MAC, a size out of bounds, too few or too small buffers, a chain it does not take) stays in
the buffer for Python, which does with it what it does with any packet it reads.
"""

from __future__ import annotations

import sys

from vfu_server import cbuild
from vfu_server.iostats import C_STRUCT

MODULE_NAME = "_vfu_fastio"

# struct vfu_iostat (vfu_server/iostats.py): a queue's counters, which C updates per request
# when ``stats`` is set (kind 0 read, 1 write; latency from the run's start or the previous
# request's completion to this one's).
STRUCTS = C_STRUCT + """
struct vfu_write_behind { int fd; uint64_t lo, hi; };
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
    struct vfu_iostat *stats;
    uint64_t write_behind_until;
    struct vfu_write_behind wb;
};
struct vfu_sq {
    uint64_t sq_base; uint32_t sq_size, sq_head, sq_tail; uint32_t sqid;
    uint64_t cq_base; uint32_t cq_size, cq_head, cq_tail, cq_phase;
};
struct vfu_blk {
    const struct vfu_region *regions;
    unsigned nregions;
    int read_fd, write_fd;
    uint64_t capacity;
    uint64_t max_bytes;
    uint64_t bytes_read, bytes_written;
    int stop;
    struct vfu_iostat *stats;
    uint64_t write_behind_until;
    struct vfu_write_behind wb;
};
struct vfu_vq {
    uint64_t desc, avail, used;
    uint32_t size;
    uint32_t next_avail, next_used;
    int indirect_ok;
};
struct vfu_net {
    const struct vfu_region *regions;
    unsigned nregions;
    int fd;
    uint32_t skip;
    uint32_t min_len, max_len;
    uint64_t bytes, frames;
    int stop;
    int err;
    struct vfu_iostat *stats;
    uint8_t *buf;
    uint32_t buf_len;
    uint32_t hdr, rx_limit;
    int guest_csum, mergeable, promisc;
    uint8_t mac[6];
    uint32_t held;
};
"""

CDEF = STRUCTS + """
static const int VFU_STOP_EMPTY, VFU_STOP_LIMIT, VFU_STOP_CQ_FULL, VFU_STOP_RINGS;
static const int VFU_STOP_COMMAND, VFU_STOP_DATA, VFU_STOP_IO;
unsigned vfu_fastio_run(struct vfu_fastio *c, struct vfu_sq *q, unsigned max);
void vfu_write_behind(struct vfu_write_behind *wb);
unsigned vfu_blk_run(struct vfu_blk *c, struct vfu_vq *q, unsigned max);
unsigned vfu_net_tx_run(struct vfu_net *c, struct vfu_vq *q, unsigned max);
unsigned vfu_net_rx_run(struct vfu_net *c, struct vfu_vq *q, unsigned max);
"""

SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <fcntl.h>
#include <sys/uio.h>
#include <time.h>
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

/* Linux's UIO_MAXIOV: a guest's 1 MiB request is 256 scattered pages, one iovec each (with
   64, such requests fell to Python and a worker thread at a third of the peers' speed). */
#define MAX_IOV 1024

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);  /* the vDSO: no system call */
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Write-behind. While the backend says the guest flushes often (write_behind_until,
   CLOCK_MONOTONIC ns), the byte range a run wrote is written back at once, so that the FLUSH
   that follows finds its data on the way to the disk (FileBackend.begin_flush;
   docs/performance.md "Tenth session"). A run only notes the range; vfu_write_behind() starts
   the write-back after the device has raised the run's interrupt, off the guest's wait. Only a
   hint to the kernel: an error here changes nothing the guest is told. */
void vfu_write_behind(struct vfu_write_behind *wb)
{
    if (wb->fd >= 0)
        (void)sync_file_range(wb->fd, (off_t)wb->lo, (off_t)(wb->hi - wb->lo), SYNC_FILE_RANGE_WRITE);
    wb->fd = -1;
}

static void note_write(uint64_t until, struct vfu_write_behind *wb, int fd, uint64_t off, uint64_t len)
{
    if (!until || now_ns() >= until)
        return;
    if (wb->fd >= 0 && (wb->fd != fd || off > wb->hi || off + len < wb->lo))
        vfu_write_behind(wb);  /* another file, or apart: never the dirty pages in between */
    if (wb->fd < 0) {
        wb->fd = fd;
        wb->lo = off;
        wb->hi = off + len;
    } else {
        if (off < wb->lo)
            wb->lo = off;
        if (off + len > wb->hi)
            wb->hi = off + len;
    }
}

/* One completed request into a queue's counters; *t0 moves on to now. The bucket is the
   number of boundaries <= ns, as Python's bisect_right. */
static void count_one(struct vfu_iostat *s, int kind, uint64_t bytes, uint64_t *t0)
{
    uint64_t t = now_ns(), ns = t - *t0;
    unsigned lo = 0, hi = s->nbounds;

    *t0 = t;
    s->ops[kind]++;
    s->bytes[kind] += bytes;
    if (!hi)
        return;
    s->lat_ns[kind] += ns;
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        if (s->bounds[mid] <= ns)
            lo = mid + 1;
        else
            hi = mid;
    }
    s->hist[kind][lo]++;
}
#define OPC_WRITE 0x01
#define OPC_READ 0x02

/* Host address of guest [iova, iova + len), or 0 when it is not inside one region (or that
   region is read-only and we are to write it). */
static uintptr_t xlate_in(const struct vfu_region *regions, unsigned nregions, uint64_t iova,
                          uint64_t len, int write)
{
    for (unsigned i = 0; i < nregions; i++) {
        const struct vfu_region *r = &regions[i];
        if (iova >= r->iova && iova - r->iova < r->len && len <= r->len - (iova - r->iova)) {
            if (write && !r->writable)
                return 0;
            return r->host + (uintptr_t)(iova - r->iova);
        }
    }
    return 0;
}

#define xlate(c, iova, len, write) xlate_in((c)->regions, (c)->nregions, iova, len, write)

static int add_piece_in(const struct vfu_region *regions, unsigned nregions, struct iovec *iov,
                        int *n, uint64_t iova, uint64_t len, int write)
{
    uintptr_t host = xlate_in(regions, nregions, iova, len, write);
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

#define add_piece(c, iov, n, iova, len, write) add_piece_in((c)->regions, (c)->nregions, iov, n, iova, len, write)

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

/* One command; 0 done (*len_out its bytes), else the stop reason. */
static int run_one(struct vfu_fastio *c, const uint8_t *sqe, uint64_t *len_out)
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
    if (opc != OPC_READ)
        note_write(c->write_behind_until, &c->wb, ns->write_fd, slba << ns->lba_shift, len);
    *len_out = len;
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
    uint64_t t0 = c->stats ? now_ns() : 0;
    while (q->sq_head != q->sq_tail) {
        const uint8_t *entry;
        uint8_t sqe[64], *cqe;
        uint32_t dw2, dw3;
        uint64_t len = 0;
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
        stop = run_one(c, sqe, &len);
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
        if (c->stats)
            count_one(c->stats, sqe[0] == OPC_READ ? 0 : 1, len, &t0);
        count++;
    }
    return count;
}

/* -- virtio-blk ------------------------------------------------------------------------- */

#define VQ_DESC_F_NEXT 1
#define VQ_DESC_F_WRITE 2
#define VQ_DESC_F_INDIRECT 4
#define BLK_T_IN 0
#define BLK_T_OUT 1

static uint16_t load16(uintptr_t p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }

/* A walk over the descriptors of one chain, into one indirect table where negotiated. */
struct vq_cursor { uintptr_t tab; uint32_t limit, index, count; int indirect; };

static struct vq_cursor vq_chain(const struct vfu_vq *q, uintptr_t table, uint32_t head)
{
    struct vq_cursor w = {table, q->size, head, 0, 0};
    return w;
}

/* The walk's next descriptor (an indirect one is entered: its table's first): 0 and its
   fields, else a stop reason (too long a chain, a bad or nested indirect descriptor, a table
   outside guest memory). The guest may be writing the table: each field is read once. */
static int vq_desc(const struct vfu_region *regions, unsigned nregions, const struct vfu_vq *q,
                   struct vq_cursor *w, uint64_t *addr, uint32_t *len, uint16_t *flags, uint16_t *next)
{
    uint8_t desc[16];

    for (;;) {
        if (++w->count > q->size)
            return VFU_STOP_COMMAND;
        memcpy(desc, (const void *)(w->tab + 16 * (uintptr_t)w->index), 16);
        memcpy(addr, desc, 8);
        memcpy(len, desc + 8, 4);
        memcpy(flags, desc + 12, 2);
        memcpy(next, desc + 14, 2);
        if (!(*flags & VQ_DESC_F_INDIRECT))
            return 0;
        if (w->indirect || !q->indirect_ok || w->count != 1 || (*flags & VQ_DESC_F_NEXT)
                || !*len || *len % 16 || *len / 16 > q->size)
            return VFU_STOP_COMMAND;
        w->tab = xlate_in(regions, nregions, *addr, *len, 0);
        if (!w->tab)
            return VFU_STOP_DATA;
        w->indirect = 1;
        w->limit = *len / 16;
        w->index = 0;
        w->count = 0;
    }
}

/* The head of the chain at next_avail: 0, or a stop reason (a head outside the table). */
static int vq_head(const struct vfu_vq *q, uintptr_t avail, uint16_t *head)
{
    memcpy(head, (const void *)(avail + 4 + 2 * (uintptr_t)(q->next_avail % q->size)), 2);
    return *head >= q->size ? VFU_STOP_COMMAND : 0;
}

/* The chain at next_avail done: its used element at next_used, and both indexes move on. */
static void vq_done(struct vfu_vq *q, uintptr_t used, uint16_t head, uint32_t written)
{
    uint32_t elem[2] = {head, written};
    memcpy((void *)(used + 4 + 8 * (uintptr_t)(q->next_used % q->size)), elem, 8);
    q->next_avail = (q->next_avail + 1) & 0xFFFF;
    q->next_used = (q->next_used + 1) & 0xFFFF;
}

/* On to the descriptor ``next`` names: 0, or a stop reason when it lies outside the table. */
static int vq_follow(struct vq_cursor *w, uint16_t next)
{
    if (next >= w->limit)
        return VFU_STOP_COMMAND;
    w->index = next;
    return 0;
}

/* The chain at head: 0 and the request done, else a stop reason (nothing consumed). */
static int blk_one(struct vfu_blk *c, struct vfu_vq *q, uintptr_t table, uint32_t head,
                   uint32_t *written, int *kind, uint64_t *bytes)
{
    struct iovec iov[MAX_IOV];
    struct vq_cursor w = vq_chain(q, table, head);
    uint8_t hdr[16];
    uint64_t addr, total = 0;
    uint32_t len;
    uint16_t dflags, next;
    uintptr_t status = 0;
    int n = 0, rtype = -1, seen_write = 0, stop;
    ssize_t done;

    for (;;) {
        stop = vq_desc(c->regions, c->nregions, q, &w, &addr, &len, &dflags, &next);
        if (stop)
            return stop;
        if (!len)
            return VFU_STOP_COMMAND;
        if (rtype < 0) {  /* the header: one readable 16-byte descriptor */
            if (len != 16 || (dflags & VQ_DESC_F_WRITE))
                return VFU_STOP_COMMAND;
            uintptr_t h = xlate_in(c->regions, c->nregions, addr, 16, 0);
            if (!h)
                return VFU_STOP_DATA;
            memcpy(hdr, (const void *)h, 16);
            memcpy(&rtype, hdr, 4);
            if (rtype != BLK_T_IN && rtype != BLK_T_OUT)
                return VFU_STOP_COMMAND;
        } else if (status) {
            return VFU_STOP_COMMAND;  /* something after the status byte */
        } else if (dflags & VQ_DESC_F_WRITE) {
            seen_write = 1;
            if (!(dflags & VQ_DESC_F_NEXT)) {  /* the last one: the status byte */
                if (len != 1)
                    return VFU_STOP_COMMAND;
                status = xlate_in(c->regions, c->nregions, addr, 1, 1);
                if (!status)
                    return VFU_STOP_DATA;
            } else {
                if (rtype != BLK_T_IN)
                    return VFU_STOP_COMMAND;
                if (add_piece_in(c->regions, c->nregions, iov, &n, addr, len, 1))
                    return VFU_STOP_DATA;
                total += len;
            }
        } else {
            if (seen_write || rtype != BLK_T_OUT)
                return VFU_STOP_COMMAND;
            if (add_piece_in(c->regions, c->nregions, iov, &n, addr, len, 0))
                return VFU_STOP_DATA;
            total += len;
        }
        if (!(dflags & VQ_DESC_F_NEXT))
            break;
        if (vq_follow(&w, next))
            return VFU_STOP_COMMAND;
    }
    if (!status || !total || total % 512 || total > c->max_bytes)
        return VFU_STOP_COMMAND;
    uint64_t sector;
    memcpy(&sector, hdr + 8, 8);
    if (sector > c->capacity / 512 || total > c->capacity - sector * 512)
        return VFU_STOP_COMMAND;
    if (rtype == BLK_T_IN) {
        if (c->read_fd < 0)
            return VFU_STOP_COMMAND;
        done = preadv2(c->read_fd, iov, n, (off_t)(sector * 512), RWF_NOWAIT);
    } else {
        if (c->write_fd < 0)
            return VFU_STOP_COMMAND;
        done = pwritev2(c->write_fd, iov, n, (off_t)(sector * 512), 0);
    }
    if (done < 0 || (uint64_t)done != total)
        return VFU_STOP_IO;
    if (rtype != BLK_T_IN)
        note_write(c->write_behind_until, &c->wb, c->write_fd, sector * 512, total);
    *(volatile uint8_t *)status = 0;  /* VIRTIO_BLK_S_OK */
    *kind = rtype == BLK_T_IN ? 0 : 1;
    *bytes = total;
    if (rtype == BLK_T_IN) {
        c->bytes_read += total;
        *written = (uint32_t)total + 1;
    } else {
        c->bytes_written += total;
        *written = 1;
    }
    return 0;
}

/* Requests from next_avail up to the avail index; used elements go into the ring from
   next_used on, and the caller publishes the used index. Both indexes are updated. */
/* The rings of a split virtqueue in our address space and the avail index: 0, or
   VFU_STOP_RINGS (a bad size, a ring not inside one region or misaligned, a bad index: Python
   resets the device). */
static int vq_open(const struct vfu_region *regions, unsigned nregions, const struct vfu_vq *q,
                   uintptr_t *desc, uintptr_t *avail, uintptr_t *used, uint16_t *avail_idx)
{
    uint32_t size = q->size;

    if (!size || size > 32768 || (size & (size - 1)))
        return VFU_STOP_RINGS;
    *desc = xlate_in(regions, nregions, q->desc, 16 * (uint64_t)size, 0);
    *avail = xlate_in(regions, nregions, q->avail, 6 + 2 * (uint64_t)size, 0);
    *used = xlate_in(regions, nregions, q->used, 6 + 8 * (uint64_t)size, 1);
    if (!*desc || !*avail || !*used || (*avail & 1) || (*used & 3))
        return VFU_STOP_RINGS;
    *avail_idx = load16(*avail + 2);
    if ((uint16_t)(*avail_idx - q->next_avail) > size)
        return VFU_STOP_RINGS;
    return 0;
}

unsigned vfu_blk_run(struct vfu_blk *c, struct vfu_vq *q, unsigned max)
{
    uintptr_t desc, avail, used;
    unsigned count = 0;
    uint16_t avail_idx;

    c->stop = vq_open(c->regions, c->nregions, q, &desc, &avail, &used, &avail_idx);
    if (c->stop)
        return 0;
    uint64_t t0 = c->stats ? now_ns() : 0;
    while ((uint16_t)q->next_avail != avail_idx) {
        uint16_t head;
        uint32_t written = 0;
        uint64_t bytes = 0;
        int stop, kind = 0;

        if (count == max) {
            c->stop = VFU_STOP_LIMIT;
            break;
        }
        stop = vq_head(q, avail, &head);
        if (!stop)
            stop = blk_one(c, q, desc, head, &written, &kind, &bytes);
        if (stop) {
            c->stop = stop;
            break;
        }
        vq_done(q, used, head, written);
        if (c->stats)
            count_one(c->stats, kind, bytes, &t0);
        count++;
    }
    return count;
}

#define NET_HDR_LEN 12  /* virtio_net_hdr_v1 */

/* The descriptors of the chain at head into iov (direct, or one indirect table when
   negotiated), every non-empty one inside one region and all device-writable (``write``) or
   all device-readable: 0 and *total their bytes, else a stop reason. */
static int net_walk(const struct vfu_net *c, const struct vfu_vq *q, uintptr_t table, uint32_t head, int write,
                    struct iovec *iov, int *n, uint64_t *total)
{
    struct vq_cursor w = vq_chain(q, table, head);
    uint64_t addr;
    uint32_t len;
    uint16_t dflags, next;

    *total = 0;
    for (;;) {
        int stop = vq_desc(c->regions, c->nregions, q, &w, &addr, &len, &dflags, &next);
        if (stop)
            return stop;
        if (!(dflags & VQ_DESC_F_WRITE) != !write)
            return VFU_STOP_COMMAND;  /* mixed: Python's */
        if (len) {
            if (add_piece_in(c->regions, c->nregions, iov, n, addr, len, write))
                return VFU_STOP_DATA;
            *total += len;
        }
        if (!(dflags & VQ_DESC_F_NEXT))
            return 0;
        if (vq_follow(&w, next))
            return VFU_STOP_COMMAND;
    }
}

/* virtio-net transmit: a chain of readable descriptors holding the 12-byte
   virtio_net_hdr_v1 and a frame, min_len..max_len bytes in all, written to the TAP with one
   writev from guest memory, less the first ``skip`` bytes (the header, for a TAP without
   IFF_VNET_HDR). 0 and the frame sent, else a stop reason (nothing consumed). */
static int net_tx_one(struct vfu_net *c, struct vfu_vq *q, uintptr_t table, uint32_t head, uint64_t *bytes)
{
    struct iovec iov[MAX_IOV];
    uint64_t total;
    int n = 0, stop = net_walk(c, q, table, head, 0, iov, &n, &total);

    if (stop)
        return stop;
    if (total < c->min_len || total > c->max_len || total <= c->skip)
        return VFU_STOP_COMMAND;
    int first = 0;
    for (uint32_t skip = c->skip; skip;) {  /* the header may span descriptors */
        if (iov[first].iov_len > skip) {
            iov[first].iov_base = (uint8_t *)iov[first].iov_base + skip;
            iov[first].iov_len -= skip;
            break;
        }
        skip -= iov[first++].iov_len;
    }
    ssize_t done = writev(c->fd, iov + first, n - first);
    if (done < 0) {
        c->err = errno;
        return VFU_STOP_IO;  /* Python writes it again: waits (EAGAIN) or drops it */
    }
    *bytes = total;
    return 0;
}

/* Frames from next_avail up to the avail index; used elements (length 0) go into the ring
   from next_used on, and the caller publishes the used index. Both indexes are updated. */
unsigned vfu_net_tx_run(struct vfu_net *c, struct vfu_vq *q, unsigned max)
{
    uintptr_t desc, avail, used;
    unsigned count = 0;
    uint16_t avail_idx;

    c->err = 0;
    c->stop = vq_open(c->regions, c->nregions, q, &desc, &avail, &used, &avail_idx);
    if (c->stop)
        return 0;
    uint64_t t0 = c->stats ? now_ns() : 0;
    while ((uint16_t)q->next_avail != avail_idx) {
        uint16_t head;
        uint64_t bytes = 0;
        int stop;

        if (count == max) {
            c->stop = VFU_STOP_LIMIT;
            break;
        }
        stop = vq_head(q, avail, &head);
        if (!stop)
            stop = net_tx_one(c, q, desc, head, &bytes);
        if (stop) {
            c->stop = stop;
            break;
        }
        vq_done(q, used, head, 0);
        c->bytes += bytes - NET_HDR_LEN;
        c->frames++;
        if (c->stats)
            count_one(c->stats, 1, bytes - NET_HDR_LEN, &t0);
        count++;
    }
    return count;
}

#define NET_MAX_MERGE 256  /* receive buffers of one packet: at most a ring's worth */

/* virtio-net receive, one packet already read into c->buf from offset NET_HDR_LEN - hdr on
   (``len`` bytes as the TAP gave them: its header, if it has one, then the frame), into the
   receive ring: with ``mergeable`` over as many chains as it needs, ``num_buffers`` in the
   first, else into one chain. 0 and the number of used elements in *chains, or a stop reason
   with nothing consumed (Python takes the packet: it filters, drops or waits for buffers). */
static int net_rx_one(struct vfu_net *c, struct vfu_vq *q, uintptr_t desc, uintptr_t avail, uintptr_t used,
                      uint16_t *avail_idx, uint32_t len, unsigned *chains)
{
    struct iovec iov[MAX_IOV];
    uint32_t start[NET_MAX_MERGE + 1], room[NET_MAX_MERGE];
    uint16_t heads[NET_MAX_MERGE];
    uint8_t *pkt = c->buf;  /* the stream the guest gets: a virtio-net header, then the frame */
    uint32_t flen = len - c->hdr, need = flen + NET_HDR_LEN, size = q->size, have = 0;
    unsigned k = 0;
    int n = 0;

    if (len < c->hdr || flen < 14 || flen > c->rx_limit)
        return VFU_STOP_COMMAND;
    if (!c->promisc && memcmp(pkt + NET_HDR_LEN, c->mac, 6))
        return VFU_STOP_COMMAND;  /* the filters (broadcast, multicast, tables) are Python's */
    while (have < need) {
        uint16_t head, next_avail = (uint16_t)(q->next_avail + k);
        uint64_t total;

        if (k == (c->mergeable ? NET_MAX_MERGE : 1) || k >= size)
            return VFU_STOP_COMMAND;  /* one chain too small, or a packet the ring cannot hold */
        if (next_avail == *avail_idx) {
            *avail_idx = load16(avail + 2);  /* the driver may have added some meanwhile */
            if ((uint16_t)(*avail_idx - q->next_avail) > size)
                return VFU_STOP_RINGS;
            if (next_avail == *avail_idx)
                return VFU_STOP_CQ_FULL;  /* too few buffers (no room): Python waits for more */
        }
        memcpy(&head, (const void *)(avail + 4 + 2 * (uintptr_t)(next_avail % size)), 2);
        if (head >= size)
            return VFU_STOP_COMMAND;
        /* Each chain's own iovecs: a guest's receive buffers are often adjacent in memory,
           and one iovec over two chains would put the second one's bytes in the first. */
        int m = 0;
        if (q->size > (uint32_t)(MAX_IOV - n))
            return VFU_STOP_COMMAND;
        start[k] = (uint32_t)n;
        int stop = net_walk(c, q, desc, head, 1, iov + n, &m, &total);
        if (stop)
            return stop;
        n += m;
        if (!k && total < NET_HDR_LEN)
            return VFU_STOP_COMMAND;  /* the header over two buffers: Python's (it patches the first) */
        heads[k] = head;
        room[k] = total > need ? need : (uint32_t)total;
        have += room[k];
        k++;
    }
    start[k] = (uint32_t)n;
    /* The header: the TAP's (flags and GSO type only for a guest that takes partial
       checksums), or none but num_buffers. */
    if (!c->hdr || !c->guest_csum)
        memset(pkt, 0, 10);
    pkt[10] = (uint8_t)k;
    pkt[11] = (uint8_t)(k >> 8);
    uint32_t pos = 0;
    for (unsigned i = 0; i < k; i++) {
        uint32_t part = need - pos < room[i] ? need - pos : room[i], left = part, elem[2];
        for (uint32_t j = start[i]; left; j++) {
            size_t m = iov[j].iov_len < left ? iov[j].iov_len : left;
            memcpy(iov[j].iov_base, pkt + pos, m);
            pos += (uint32_t)m;
            left -= (uint32_t)m;
        }
        elem[0] = heads[i];
        elem[1] = part;
        memcpy((void *)(used + 4 + 8 * (uintptr_t)((q->next_used + i) % size)), elem, 8);
    }
    q->next_avail = (q->next_avail + k) & 0xFFFF;
    q->next_used = (q->next_used + k) & 0xFFFF;
    *chains = k;
    return 0;
}

/* Up to max packets from the TAP (or peer socket) into the receive ring; returns the used
   elements written (the caller publishes the used index). c->stop says why it ended:
   VFU_STOP_EMPTY the TAP had no more (EAGAIN), VFU_STOP_LIMIT max packets, VFU_STOP_IO a read
   error or end of file (c->err), anything else with c->held > 0: a packet Python takes from
   c->buf (offset NET_HDR_LEN - hdr, c->held bytes). */
unsigned vfu_net_rx_run(struct vfu_net *c, struct vfu_vq *q, unsigned max)
{
    uintptr_t desc, avail, used;
    unsigned count = 0, frames = 0;
    uint16_t avail_idx;

    c->err = 0;
    c->held = 0;
    c->stop = vq_open(c->regions, c->nregions, q, &desc, &avail, &used, &avail_idx);
    if (c->stop)
        return 0;
    uint64_t t0 = c->stats ? now_ns() : 0;
    for (;;) {
        unsigned k = 0;
        if (frames == max) {
            c->stop = VFU_STOP_LIMIT;
            break;
        }
        ssize_t len = read(c->fd, c->buf + NET_HDR_LEN - c->hdr, c->buf_len);
        if (len <= 0) {
            c->err = len < 0 ? errno : 0;
            c->stop = len < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) ? VFU_STOP_EMPTY : VFU_STOP_IO;
            break;
        }
        int stop = net_rx_one(c, q, desc, avail, used, &avail_idx, (uint32_t)len, &k);
        if (stop) {
            c->stop = stop;
            c->held = (uint32_t)len;
            break;
        }
        c->bytes += (uint64_t)len - c->hdr;
        c->frames++;
        if (c->stats)
            count_one(c->stats, 0, (uint64_t)len - c->hdr, &t0);
        count += k;
        frames++;
    }
    return count;
}
"""


SOURCE = SOURCE.replace("@STRUCTS@", STRUCTS)
HELPER = cbuild.Helper("fastio", MODULE_NAME, CDEF, SOURCE)


if __name__ == "__main__":
    HELPER.main(sys.argv[1:])
