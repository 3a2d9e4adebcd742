/*
 * loadgen: a tiny static block load generator for the guest benchmarks.
 *
 *   loadgen NAME DEVICE OP BS QD SECONDS
 *
 * OP is randread, randwrite, seqread or seqwrite. QD synchronous threads each issue one
 * O_DIRECT pread/pwrite at a time (queue depth = threads; no libaio/io_uring needed, so it links
 * statically against glibc alone). Random offsets are BS-aligned and uniform over the device;
 * sequential jobs share one cursor. Prints one parseable line:
 *
 *   loadgen name=N dev=D op=O bs=B qd=Q secs=S ios=I iops=X mbps=Y lat_us=L errors=E
 *
 * Build: gcc -static -O2 -Wall -pthread -I guest/vfu_guest/include -o loadgen bench/loadgen.c
 *        (python: vfu_guest.static.build_static)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "vfu_guest_tool.h" /* now(), xorshift() */

enum { RANDREAD, RANDWRITE, SEQREAD, SEQWRITE };

struct job {
    int fd;
    int op;
    size_t bs;
    uint64_t blocks;
    double deadline;
};

struct worker {
    pthread_t thread;
    struct job *job;
    uint64_t seed;
    uint64_t ios;
    uint64_t errors;
    double busy;
};

static uint64_t seq_cursor;

static void *run(void *arg)
{
    struct worker *w = arg;
    struct job *j = w->job;
    void *buf;
    int write = j->op == RANDWRITE || j->op == SEQWRITE;

    if (posix_memalign(&buf, 4096, j->bs)) {
        w->errors++;
        return NULL;
    }
    memset(buf, 0x5a ^ (int)(w->seed & 0xff), j->bs);
    for (;;) {
        uint64_t block;
        double t0 = now();
        ssize_t n;

        if (t0 >= j->deadline)
            break;
        if (j->op == RANDREAD || j->op == RANDWRITE)
            block = xorshift(&w->seed) % j->blocks;
        else
            block = __atomic_fetch_add(&seq_cursor, 1, __ATOMIC_RELAXED) % j->blocks;
        if (write)
            n = pwrite(j->fd, buf, j->bs, (off_t)(block * j->bs));
        else
            n = pread(j->fd, buf, j->bs, (off_t)(block * j->bs));
        if (n != (ssize_t)j->bs)
            w->errors++;
        else
            w->ios++;
        w->busy += now() - t0;
    }
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    struct job job;
    struct worker *workers;
    const char *name, *dev, *opname;
    uint64_t size = 0, ios = 0, errors = 0;
    double busy = 0, start, secs;
    int qd, i;

    if (argc != 7) {
        fprintf(stderr, "usage: loadgen NAME DEVICE randread|randwrite|seqread|seqwrite BS QD SECONDS\n");
        return 2;
    }
    name = argv[1];
    dev = argv[2];
    opname = argv[3];
    if (!strcmp(opname, "randread"))
        job.op = RANDREAD;
    else if (!strcmp(opname, "randwrite"))
        job.op = RANDWRITE;
    else if (!strcmp(opname, "seqread"))
        job.op = SEQREAD;
    else if (!strcmp(opname, "seqwrite"))
        job.op = SEQWRITE;
    else {
        fprintf(stderr, "loadgen: bad op %s\n", opname);
        return 2;
    }
    job.bs = strtoul(argv[4], NULL, 0);
    qd = atoi(argv[5]);
    secs = atof(argv[6]);
    if (job.bs == 0 || job.bs % 512 || qd < 1 || qd > 1024 || secs <= 0) {
        fprintf(stderr, "loadgen: bad BS/QD/SECONDS\n");
        return 2;
    }
    job.fd = open(dev, (job.op == RANDWRITE || job.op == SEQWRITE ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (job.fd < 0) {
        fprintf(stderr, "loadgen: open %s: %s\n", dev, strerror(errno));
        return 1;
    }
    if (ioctl(job.fd, BLKGETSIZE64, &size) < 0) {
        off_t end = lseek(job.fd, 0, SEEK_END); /* a regular file (for trying it on the host) */
        size = end > 0 ? (uint64_t)end : 0;
    }
    if (size < job.bs) {
        fprintf(stderr, "loadgen: size of %s: %s\n", dev, strerror(errno));
        return 1;
    }
    job.blocks = size / job.bs;
    workers = calloc((size_t)qd, sizeof *workers);
    if (!workers)
        return 1;
    start = now();
    job.deadline = start + secs;
    for (i = 0; i < qd; i++) {
        workers[i].job = &job;
        workers[i].seed = 0x9e3779b97f4a7c15ULL * (uint64_t)(i + 1);
        if (pthread_create(&workers[i].thread, NULL, run, &workers[i])) {
            fprintf(stderr, "loadgen: pthread_create failed\n");
            return 1;
        }
    }
    for (i = 0; i < qd; i++) {
        pthread_join(workers[i].thread, NULL);
        ios += workers[i].ios;
        errors += workers[i].errors;
        busy += workers[i].busy;
    }
    secs = now() - start;
    printf("loadgen name=%s dev=%s op=%s bs=%zu qd=%d secs=%.3f ios=%" PRIu64
           " iops=%.0f mbps=%.2f lat_us=%.1f errors=%" PRIu64 "\n",
           name, dev, opname, job.bs, qd, secs, ios, ios / secs, ios * (double)job.bs / secs / 1e6,
           ios ? busy / ios * 1e6 : 0.0, errors);
    fflush(stdout);
    close(job.fd);
    return errors ? 1 : 0;
}
