/*
 * soak: the guest side of the handover soak test (built static on the host, like bench/loadgen).
 *
 *   soak disk NAME DEVICE THREADS BLOCKS_PER_THREAD STOPFILE SECONDS
 *   soak tcp-tx NAME ADDRESS PORT STOPFILE SECONDS
 *   soak tcp-rx NAME ADDRESS PORT SECONDS
 *
 * Every mode runs until STOPFILE exists (the host decides when the soak is over) or SECONDS
 * have passed (a guest whose stop signal never arrives still reports), then prints one line of
 * key=value words that the host parses:
 *
 *   disk: THREADS threads, each owning BLOCKS_PER_THREAD 4 KiB blocks of DEVICE (O_DIRECT),
 *     write runs of 1-16 blocks at random places of their range and read back random runs they
 *     wrote, with an fdatasync (a flush command) every 32 writes. A block carries its number, a
 *     generation that the writer counts up, a payload derived from both and a checksum, so a
 *     read-back tells a lost write (an older generation), a misplaced one (another block number)
 *     and torn or corrupted data (checksum, payload) apart. At the end every block of every
 *     thread is read back and checked once more.
 *       soak disk name=N writes=W reads=R blocks_checked=B flushes=F errors=E mismatches=M
 *   tcp-tx: connect and send a stream whose every 8-byte word is its own index
 *     (little-endian), then shut down the write side; the peer checks the pattern.
 *       soak tcp-tx name=N bytes=B errors=E
 *   tcp-rx: connect and read the same pattern the peer sends until it closes, checking each
 *     word: a lost, repeated or reordered byte range breaks the sequence.
 *       soak tcp-rx name=N bytes=B bad_at=-1|OFFSET errors=E
 *
 * Build: gcc -static -O2 -Wall -pthread -I guest/vfu_guest/include -o soak tests/guest/soak.c
 *        (python: vfu_guest.static.build_static)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "vfu_guest_tool.h" /* now(), xorshift() */

#define BLOCK 4096
#define MAX_RUN 16
#define MAGIC 0x6b616f732d756676ULL /* "vfu-soak" */

static uint64_t fnv1a(const unsigned char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    while (n--) {
        h ^= *p++;
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* ---- disk ---------------------------------------------------------------------------------- */

struct header {
    uint64_t magic;
    uint64_t block;
    uint64_t generation;
    uint64_t thread;
};

struct disk {
    const char *name;
    int fd;
    uint64_t blocks_per_thread;
    const char *stopfile;
    double deadline;
};

struct worker {
    pthread_t thread;
    struct disk *disk;
    unsigned index;
    uint64_t *generation; /* per block of this worker's range, 0 = never written */
    uint64_t writes, reads, checked, flushes, errors, mismatches;
};

static pthread_mutex_t report_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned reported;

static void fill(unsigned char *b, uint64_t block, uint64_t generation, unsigned thread)
{
    struct header h = {MAGIC, block, generation, thread};
    uint64_t seed = (block + 1) * 0x9e3779b97f4a7c15ULL ^ generation * 0xbf58476d1ce4e5b9ULL;
    uint64_t sum;
    size_t i;

    memcpy(b, &h, sizeof h);
    for (i = sizeof h; i < BLOCK - 8; i += 8) {
        uint64_t v = xorshift(&seed);
        memcpy(b + i, &v, 8);
    }
    sum = fnv1a(b, BLOCK - 8);
    memcpy(b + BLOCK - 8, &sum, 8);
}

/* Compare a block read back with what its last write put there; report the first few. */
static int check(struct worker *w, const unsigned char *got, unsigned char *want, uint64_t block)
{
    uint64_t generation = w->generation[block - w->index * w->disk->blocks_per_thread];
    struct header h;
    uint64_t sum;

    if (generation == 0)
        return 0; /* never written: whatever the disk held before */
    fill(want, block, generation, w->index);
    if (!memcmp(got, want, BLOCK))
        return 0;
    memcpy(&h, got, sizeof h);
    memcpy(&sum, got + BLOCK - 8, 8);
    pthread_mutex_lock(&report_lock);
    if (reported++ < 10)
        fprintf(stderr,
                "soak %s: block %" PRIu64 " mismatch: want generation %" PRIu64
                ", read magic_ok=%d block=%" PRIu64 " generation=%" PRIu64 " checksum_ok=%d\n",
                w->disk->name, block, generation, h.magic == MAGIC, h.block, h.generation,
                sum == fnv1a(got, BLOCK - 8));
    pthread_mutex_unlock(&report_lock);
    return 1;
}

static void io_error(struct worker *w, const char *what, uint64_t block, ssize_t n, size_t want)
{
    int err = errno;
    w->errors++;
    pthread_mutex_lock(&report_lock);
    if (reported++ < 10)
        fprintf(stderr, "soak %s: %s at block %" PRIu64 ": %s\n", w->disk->name, what, block,
                n < 0 ? strerror(err) : (n == (ssize_t)want ? "?" : "short transfer"));
    pthread_mutex_unlock(&report_lock);
}

static int stopped(struct disk *d)
{
    return now() >= d->deadline || access(d->stopfile, F_OK) == 0;
}

static void *disk_worker(void *arg)
{
    struct worker *w = arg;
    struct disk *d = w->disk;
    uint64_t first = w->index * d->blocks_per_thread, n = d->blocks_per_thread;
    uint64_t seed = 0x2545f4914f6cdd1dULL * (w->index + 1), written = 0, i, k;
    unsigned char *buf, *want;
    ssize_t r;

    if (posix_memalign((void **)&buf, BLOCK, (size_t)BLOCK * MAX_RUN) ||
        posix_memalign((void **)&want, BLOCK, BLOCK)) {
        w->errors++;
        return NULL;
    }
    while (!stopped(d)) {
        uint64_t run = 1 + xorshift(&seed) % MAX_RUN;
        uint64_t at = xorshift(&seed) % (n - run + 1);

        for (i = 0; i < run; i++)
            fill(buf + i * BLOCK, first + at + i, w->generation[at + i] + 1, w->index);
        r = pwrite(d->fd, buf, run * BLOCK, (off_t)((first + at) * BLOCK));
        if (r != (ssize_t)(run * BLOCK)) {
            /* The blocks' content is now unknown: stop checking them rather than count twice. */
            io_error(w, "write", first + at, r, run * BLOCK);
            for (i = 0; i < run; i++)
                w->generation[at + i] = 0;
            continue;
        }
        for (i = 0; i < run; i++)
            w->generation[at + i]++;
        w->writes++;
        if (++written % 32 == 0) {
            if (fdatasync(d->fd))
                io_error(w, "fdatasync", first, -1, 0);
            w->flushes++;
        }
        /* Read back a random run of this worker's range (written or not). */
        run = 1 + xorshift(&seed) % MAX_RUN;
        at = xorshift(&seed) % (n - run + 1);
        r = pread(d->fd, buf, run * BLOCK, (off_t)((first + at) * BLOCK));
        if (r != (ssize_t)(run * BLOCK)) {
            io_error(w, "read", first + at, r, run * BLOCK);
            continue;
        }
        w->reads++;
        for (i = 0; i < run; i++)
            w->mismatches += check(w, buf + i * BLOCK, want, first + at + i);
    }
    if (fdatasync(d->fd))
        io_error(w, "final fdatasync", first, -1, 0);
    for (k = 0; k < n; k += MAX_RUN) {
        uint64_t run = n - k < MAX_RUN ? n - k : MAX_RUN;
        r = pread(d->fd, buf, run * BLOCK, (off_t)((first + k) * BLOCK));
        if (r != (ssize_t)(run * BLOCK)) {
            io_error(w, "final read", first + k, r, run * BLOCK);
            continue;
        }
        for (i = 0; i < run; i++) {
            w->mismatches += check(w, buf + i * BLOCK, want, first + k + i);
            w->checked++;
        }
    }
    free(buf);
    free(want);
    return NULL;
}

static int disk_main(int argc, char **argv)
{
    struct disk d;
    struct worker *workers;
    uint64_t writes = 0, reads = 0, checked = 0, flushes = 0, errors = 0, mismatches = 0;
    unsigned threads, i;

    if (argc != 8) {
        fprintf(stderr, "usage: soak disk NAME DEVICE THREADS BLOCKS_PER_THREAD STOPFILE SECONDS\n");
        return 2;
    }
    d.name = argv[2];
    threads = (unsigned)atoi(argv[4]);
    d.blocks_per_thread = strtoull(argv[5], NULL, 0);
    d.stopfile = argv[6];
    d.deadline = now() + atof(argv[7]);
    if (threads < 1 || threads > 256 || d.blocks_per_thread < MAX_RUN) {
        fprintf(stderr, "soak: bad THREADS or BLOCKS_PER_THREAD (at least %d)\n", MAX_RUN);
        return 2;
    }
    d.fd = open(argv[3], O_RDWR | O_DIRECT);
    if (d.fd < 0) {
        fprintf(stderr, "soak: open %s: %s\n", argv[3], strerror(errno));
        return 1;
    }
    workers = calloc(threads, sizeof *workers);
    if (!workers)
        return 1;
    for (i = 0; i < threads; i++) {
        workers[i].disk = &d;
        workers[i].index = i;
        workers[i].generation = calloc(d.blocks_per_thread, sizeof(uint64_t));
        if (!workers[i].generation || pthread_create(&workers[i].thread, NULL, disk_worker, &workers[i])) {
            fprintf(stderr, "soak: cannot start worker %u\n", i);
            return 1;
        }
    }
    for (i = 0; i < threads; i++) {
        pthread_join(workers[i].thread, NULL);
        writes += workers[i].writes;
        reads += workers[i].reads;
        checked += workers[i].checked;
        flushes += workers[i].flushes;
        errors += workers[i].errors;
        mismatches += workers[i].mismatches;
    }
    printf("soak disk name=%s writes=%" PRIu64 " reads=%" PRIu64 " blocks_checked=%" PRIu64
           " flushes=%" PRIu64 " errors=%" PRIu64 " mismatches=%" PRIu64 "\n",
           d.name, writes, reads, checked, flushes, errors, mismatches);
    fflush(stdout);
    return errors || mismatches ? 1 : 0;
}

/* ---- TCP ----------------------------------------------------------------------------------- */

static int connect_to(const char *address, int port, double give_up)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, address, &sa.sin_addr) != 1) {
        fprintf(stderr, "soak: bad address %s\n", address);
        return -1;
    }
    for (;;) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
            return fd;
        if (fd >= 0)
            close(fd);
        if (now() > give_up) {
            fprintf(stderr, "soak: connect %s:%d: %s\n", address, port, strerror(errno));
            return -1;
        }
        usleep(100000);
    }
}

static int tcp_tx(int argc, char **argv)
{
    static uint64_t buf[8192];
    uint64_t word = 0, sent = 0, errors = 0;
    double deadline;
    int fd;

    if (argc != 7) {
        fprintf(stderr, "usage: soak tcp-tx NAME ADDRESS PORT STOPFILE SECONDS\n");
        return 2;
    }
    deadline = now() + atof(argv[6]);
    fd = connect_to(argv[3], atoi(argv[4]), now() + 60);
    if (fd < 0)
        return 1;
    while (now() < deadline && access(argv[5], F_OK) != 0) {
        size_t i, off = 0;
        for (i = 0; i < sizeof buf / 8; i++)
            buf[i] = word++; /* x86: the words go out little-endian, as the peer expects */
        while (off < sizeof buf) {
            ssize_t n = write(fd, (char *)buf + off, sizeof buf - off);
            if (n <= 0) {
                fprintf(stderr, "soak tcp-tx %s: write: %s\n", argv[2], n < 0 ? strerror(errno) : "0");
                errors++;
                goto out;
            }
            off += (size_t)n;
            sent += (uint64_t)n;
        }
    }
out:
    if (shutdown(fd, SHUT_WR))
        errors++;
    /* Wait for the peer to close: it has then read everything we sent. */
    while (read(fd, buf, sizeof buf) > 0)
        ;
    close(fd);
    printf("soak tcp-tx name=%s bytes=%" PRIu64 " errors=%" PRIu64 "\n", argv[2], sent, errors);
    fflush(stdout);
    return errors ? 1 : 0;
}

static int tcp_rx(int argc, char **argv)
{
    static unsigned char buf[65536];
    unsigned char carry[8];
    size_t have = 0;
    uint64_t word = 0, got = 0, errors = 0;
    int64_t bad_at = -1;
    int fd;

    if (argc != 6) {
        fprintf(stderr, "usage: soak tcp-rx NAME ADDRESS PORT SECONDS\n");
        return 2;
    }
    fd = connect_to(argv[3], atoi(argv[4]), now() + 60);
    if (fd < 0)
        return 1;
    {
        struct timeval tv = {.tv_sec = (time_t)atof(argv[5])};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    }
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf), i;
        if (n == 0)
            break;
        if (n < 0) {
            fprintf(stderr, "soak tcp-rx %s: read: %s\n", argv[2], strerror(errno));
            errors++;
            break;
        }
        for (i = 0; i < n; i++) {
            carry[have++] = buf[i];
            if (have == 8) {
                uint64_t v;
                memcpy(&v, carry, 8);
                if (v != word && bad_at < 0) {
                    bad_at = (int64_t)(word * 8);
                    fprintf(stderr, "soak tcp-rx %s: at byte %" PRId64 " got word %" PRIu64 "\n",
                            argv[2], bad_at, v);
                }
                word++;
                have = 0;
            }
        }
        got += (uint64_t)n;
    }
    close(fd);
    printf("soak tcp-rx name=%s bytes=%" PRIu64 " bad_at=%" PRId64 " errors=%" PRIu64 "\n", argv[2], got,
           bad_at, errors);
    fflush(stdout);
    return errors || bad_at >= 0 || have ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "disk"))
        return disk_main(argc, argv);
    if (argc > 1 && !strcmp(argv[1], "tcp-tx"))
        return tcp_tx(argc, argv);
    if (argc > 1 && !strcmp(argv[1], "tcp-rx"))
        return tcp_rx(argc, argv);
    fprintf(stderr, "usage: soak disk|tcp-tx|tcp-rx ...\n");
    return 2;
}
