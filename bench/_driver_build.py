"""cffi build module of the benchmark's C load loops, NVMe and virtio-blk (``bench.devices
--driver c``).

The Python test driver (:class:`vfu_server.testing.nvme.NvmeTestDriver`) costs 20-25 us of
CPU per I/O here, so with it the client, not the device, is what ``bench.devices`` measures at
QD32. This loop does what a guest's driver does once the queues exist, and nothing else: it
writes submission entries into the shared guest RAM, publishes the SQ tail and CQ head through
the shadow doorbells (asking Python for an MMIO doorbell write only when the event index says
so, like Linux's ``nvme_dbbuf_update_and_check_event``), reaps completions by phase tag and
sleeps on the vector's eventfd when there is nothing to reap.

``vbb_run`` is the same for one split virtqueue of a virtio-blk device: one indirect chain
per request (header, data as one descriptor or, with ``seg``, one per page in an order no
device can merge, as a guest's scattered pages arrive, status byte), the kick only when ``avail_event`` (EVENT_IDX) or
``VIRTQ_USED_F_NO_NOTIFY`` says so, like Linux's ``virtqueue_kick_prepare``, ``used_event``
set to what was reaped before sleeping.

The setup (connect, DMA map, MSI-X eventfds, queue creation, Doorbell Buffer Config, feature
negotiation) stays in Python with the test drivers; :mod:`bench.devices` hands the rings over.

What the two share (guest RAM, the interrupt eventfd, the job's length and slots, the
counters) is ``struct bench_job``, the ``job`` member of both. ``nvb_run``/``vbb_run`` return
NVB_DONE when the job's time is up and every request came back, NVB_RING when a doorbell must
be written (NVMe: ``ring_offset``/``ring_value``; virtio: the queue's notify) before calling
again, NVB_ERROR with ``job.error_status`` for a completion that is not a success, and
NVB_STALL when nothing completed for ``job.stall_ms``.
"""

from __future__ import annotations

import sys

from vfu_server import cbuild

MODULE_NAME = "_vfu_bench_driver"

STRUCTS = """
#define NVB_DONE 0
#define NVB_RING 1
#define NVB_ERROR -1
#define NVB_STALL -2
#define NVB_MAX_QD 256

struct bench_job {
    uintptr_t ram;            /* host address of guest RAM offset 0 */
    uint64_t base;            /* the IOVA guest RAM is mapped at */
    int irq_fd;               /* the queue's interrupt eventfd */
    int random;               /* random or sequential blocks */
    uint64_t rng;
    uint64_t next_seq;
    uint32_t qd;              /* requests in flight; the command id / head is the slot */
    double seconds;
    int stall_ms;
    /* progress, kept across calls */
    double end;
    int started, stopping;
    uint32_t nfree;
    uint16_t free_slots[256];
    uint32_t inflight;
    /* results */
    uint64_t ios, doorbells, irq_waits, poll_timeouts;
    uint32_t error_status, error_cid;
};

struct nvb {
    struct bench_job job;
    uint64_t sq, cq;          /* queue IOVAs */
    uint32_t entries;
    uint16_t qid;
    uint32_t sq_tail, cq_head, phase;
    uint64_t shadow_db, shadow_ei;   /* Doorbell Buffer Config IOVAs, 0: MMIO only */
    uint32_t doorbell_stride;        /* bytes between doorbells (4 << CAP.DSTRD) */
    uint8_t opcode;
    uint32_t lbas_per_io;
    uint64_t ios_in_ns;              /* I/O-sized blocks in the namespace */
    uint64_t prp1[256], prp2[256];   /* per slot */
    uint32_t ring_offset, ring_value;
};

struct vbb {
    struct bench_job job;
    uint64_t desc, avail, used;      /* ring IOVAs */
    uint32_t size;
    int event_idx;
    uint16_t avail_idx, last_used, kicked_at;
    uint32_t type;                   /* VIRTIO_BLK_T_IN 0 / T_OUT 1 */
    uint32_t bytes;
    uint32_t seg;                    /* 0: one data descriptor; else one per seg bytes */
    uint64_t ios_in_disk;
    uint64_t header[256], data[256], status[256], table[256];
};
"""

CDEF = STRUCTS + """
int nvb_run(struct nvb *b);
int vbb_run(struct vbb *b);
"""

SOURCE = r"""
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
""" + STRUCTS + r"""
static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint8_t *at(struct bench_job *j, uint64_t iova)
{
    return (uint8_t *)j->ram + (iova - j->base);
}

/* First call: the clock starts and every slot is free. */
static void job_start(struct bench_job *j)
{
    if (j->started)
        return;
    j->started = 1;
    j->end = now() + j->seconds;
    j->nfree = 0;
    for (uint32_t i = 0; i < j->qd; i++)
        j->free_slots[j->nfree++] = (uint16_t)(j->qd - 1 - i);
}

/* Whether to submit now: time is not up and a slot is free. */
static int job_may_submit(struct bench_job *j)
{
    if (!j->stopping && now() >= j->end)
        j->stopping = 1;
    return !j->stopping && j->nfree;
}

/* The next I/O-sized block of n: xorshift64* when random (any fixed-seed generator will do,
   it only has to be cheap), else the one after the last. */
static uint64_t next_block(struct bench_job *j, uint64_t n)
{
    if (j->random) {
        j->rng ^= j->rng >> 12;
        j->rng ^= j->rng << 25;
        j->rng ^= j->rng >> 27;
        return (j->rng * 2685821657736338717ULL) % n;
    }
    uint64_t block = j->next_seq;
    j->next_seq = (j->next_seq + 1) % n;
    return block;
}

static int job_failed(struct bench_job *j, uint32_t status, uint32_t cid)
{
    j->error_status = status;
    j->error_cid = cid;
    return NVB_ERROR;
}

static void job_completed(struct bench_job *j, uint16_t slot)
{
    j->free_slots[j->nfree++] = slot;
    j->inflight--;
    j->ios++;
}

/* Sleep on the interrupt eventfd for up to 10 ms; nonzero once nothing came for stall_ms. */
static int wait_irq(struct bench_job *j, int *idle_ms)
{
    struct pollfd p = {.fd = j->irq_fd, .events = POLLIN};
    if (poll(&p, 1, 10) > 0) {
        uint64_t count;
        j->irq_waits++;
        return read(j->irq_fd, &count, 8) < 0 && errno != EAGAIN;
    }
    j->poll_timeouts++;
    return (*idle_ms += 10) >= j->stall_ms;
}

/* Publish a new shadow doorbell value; nonzero if the MMIO doorbell must be written too. */
static int publish(struct nvb *b, unsigned index, uint32_t value)
{
    uint32_t *db = (uint32_t *)at(&b->job, b->shadow_db + 4 * index);
    uint32_t *ei = (uint32_t *)at(&b->job, b->shadow_ei + 4 * index);
    uint32_t old = __atomic_load_n(db, __ATOMIC_RELAXED);
    __atomic_store_n(db, value, __ATOMIC_RELEASE);
    /* the device reads the shadow value after writing the event index: a full fence, as
       Linux's nvme_dbbuf_update_and_check_event has */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t event = __atomic_load_n(ei, __ATOMIC_ACQUIRE);
    return (uint16_t)(value - event - 1) < (uint16_t)(value - old);
}

static int ring(struct nvb *b, unsigned index, uint32_t value)
{
    if (b->shadow_db && !publish(b, index, value))
        return 0;
    b->ring_offset = 0x1000 + index * b->doorbell_stride;
    b->ring_value = value;
    b->job.doorbells++;
    return 1;
}

static void write_sqe(struct nvb *b, uint16_t slot)
{
    uint8_t *e = at(&b->job, b->sq + 64ULL * b->sq_tail);
    uint64_t slba = next_block(&b->job, b->ios_in_ns) * b->lbas_per_io;
    uint32_t dw0 = b->opcode | (uint32_t)slot << 16, nsid = 1;
    uint32_t cdw10 = (uint32_t)slba, cdw11 = (uint32_t)(slba >> 32), cdw12 = b->lbas_per_io - 1;
    memset(e, 0, 64);
    memcpy(e + 0, &dw0, 4);
    memcpy(e + 4, &nsid, 4);
    memcpy(e + 24, &b->prp1[slot], 8);
    memcpy(e + 32, &b->prp2[slot], 8);
    memcpy(e + 40, &cdw10, 4);
    memcpy(e + 44, &cdw11, 4);
    memcpy(e + 48, &cdw12, 4);
    b->sq_tail = (b->sq_tail + 1) % b->entries;
}

int nvb_run(struct nvb *b)
{
    struct bench_job *j = &b->job;
    job_start(j);
    int idle_ms = 0;
    for (;;) {
        if (job_may_submit(j)) {
            while (j->nfree) {
                write_sqe(b, j->free_slots[--j->nfree]);
                j->inflight++;
            }
            if (ring(b, 2 * b->qid, b->sq_tail))
                return NVB_RING;
        }
        uint32_t reaped = 0;
        for (;;) {
            uint8_t *c = at(j, b->cq + 16ULL * b->cq_head);
            uint16_t status = __atomic_load_n((uint16_t *)(c + 14), __ATOMIC_ACQUIRE);
            if ((status & 1) != b->phase)
                break;
            uint16_t cid;
            memcpy(&cid, c + 12, 2);
            if (status >> 1)
                return job_failed(j, status >> 1, cid);
            if (cid >= j->qd)
                return job_failed(j, 0xFFFF, cid);
            job_completed(j, cid);
            reaped++;
            if (++b->cq_head == b->entries) {
                b->cq_head = 0;
                b->phase ^= 1;
            }
        }
        if (reaped) {
            idle_ms = 0;
            if (ring(b, 2 * b->qid + 1, b->cq_head))
                return NVB_RING;
            continue;
        }
        if (j->stopping && !j->inflight)
            return NVB_DONE;
        if (wait_irq(j, &idle_ms))
            return NVB_STALL;
    }
}

static void put_desc(uint8_t *d, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    memcpy(d, &addr, 8);
    memcpy(d + 8, &len, 4);
    memcpy(d + 12, &flags, 2);
    memcpy(d + 14, &next, 2);
}

static void add_request(struct vbb *b, uint16_t slot)
{
    struct bench_job *j = &b->job;
    uint64_t sector = next_block(j, b->ios_in_disk) * (b->bytes / 512);
    uint8_t *h = at(j, b->header[slot]);
    uint32_t reserved = 0;
    memcpy(h, &b->type, 4);
    memcpy(h + 4, &reserved, 4);
    memcpy(h + 8, &sector, 8);
    *at(j, b->status[slot]) = 0xFF;
    uint8_t *t = at(j, b->table[slot]);
    uint16_t dflags = b->type == 0 ? 3 : 1;                                  /* NEXT (|WRITE) */
    uint32_t n = 1;
    put_desc(t, b->header[slot], 16, 1, 1);                                  /* NEXT */
    if (!b->seg || b->seg >= b->bytes) {
        put_desc(t + 16, b->data[slot], b->bytes, dflags, 2);
    } else {
        /* As a guest's scattered pages: one descriptor per segment, last one first, so that
           no two neighbours are contiguous and the device cannot merge them. */
        uint32_t nseg = b->bytes / b->seg;
        for (uint32_t i = 0; i < nseg; i++, n++)
            put_desc(t + 16 * n, b->data[slot] + (uint64_t)(nseg - 1 - i) * b->seg, b->seg, dflags, n + 1);
        n--;
    }
    put_desc(t + 16 * (n + 1), b->status[slot], 1, 2, 0);                    /* WRITE */
    put_desc(at(j, b->desc + 16ULL * slot), b->table[slot], 16 * (n + 2), 4, 0);  /* INDIRECT */
    uint16_t *ring = (uint16_t *)at(j, b->avail + 4);
    ring[b->avail_idx % b->size] = slot;
    b->avail_idx++;
}

/* Nonzero if the device wants a notification for what was made available since the last. */
static int kick_needed(struct vbb *b)
{
    uint16_t new_idx = b->avail_idx, old = b->kicked_at;
    b->kicked_at = new_idx;
    /* avail->idx is published before the device's wish is read (virtio_mb in Linux) */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (b->event_idx) {
        uint16_t event = __atomic_load_n((uint16_t *)at(&b->job, b->used + 4 + 8ULL * b->size), __ATOMIC_ACQUIRE);
        return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
    }
    return !(__atomic_load_n((uint16_t *)at(&b->job, b->used), __ATOMIC_ACQUIRE) & 1);
}

int vbb_run(struct vbb *b)
{
    struct bench_job *j = &b->job;
    job_start(j);
    uint16_t *avail_idx = (uint16_t *)at(j, b->avail + 2);
    uint16_t *used_idx = (uint16_t *)at(j, b->used + 2);
    uint16_t *used_event = (uint16_t *)at(j, b->avail + 4 + 2ULL * b->size);
    int idle_ms = 0;
    for (;;) {
        if (job_may_submit(j)) {
            while (j->nfree) {
                add_request(b, j->free_slots[--j->nfree]);
                j->inflight++;
            }
            __atomic_store_n(avail_idx, b->avail_idx, __ATOMIC_RELEASE);
            if (kick_needed(b)) {
                j->doorbells++;
                return NVB_RING;
            }
        }
        uint32_t reaped = 0;
        uint16_t seen = __atomic_load_n(used_idx, __ATOMIC_ACQUIRE);
        while (b->last_used != seen) {
            uint8_t *elem = at(j, b->used + 4 + 8ULL * (b->last_used % b->size));
            uint32_t id;
            memcpy(&id, elem, 4);
            if (id >= j->qd)
                return job_failed(j, 0xFFFF, id);
            uint8_t st = *at(j, b->status[id]);
            if (st)
                return job_failed(j, st, id);
            job_completed(j, (uint16_t)id);
            b->last_used++;
            reaped++;
        }
        if (reaped) {
            idle_ms = 0;
            continue;
        }
        if (j->stopping && !j->inflight)
            return NVB_DONE;
        if (b->event_idx) {
            /* interrupt me for the next one; look once more after saying so */
            __atomic_store_n(used_event, b->last_used, __ATOMIC_RELEASE);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (__atomic_load_n(used_idx, __ATOMIC_ACQUIRE) != b->last_used)
                continue;
        }
        if (wait_irq(j, &idle_ms))
            return NVB_STALL;
    }
}
"""

HELPER = cbuild.Helper("bench-driver", MODULE_NAME, CDEF, SOURCE)


if __name__ == "__main__":
    HELPER.main(sys.argv[1:])
