/* TCP throughput from inside the guest, for bench.guest_net (built static on the host).
 *
 *   netload NAME tx ADDRESS PORT SECONDS   connect, send 64 KiB writes for SECONDS
 *   netload NAME rx ADDRESS PORT SECONDS   accept one connection there, read for SECONDS
 *   netload NAME rr ADDRESS PORT SECONDS   connect, then 1-byte request / 1-byte response
 *                                          turns (TCP_NODELAY) for SECONDS, one at a time
 *
 * Prints one line: "netload name=NAME dir=tx|rx|rr mbps=... bytes=... seconds=..." (rr adds
 * "tps=... p50_us=... p99_us=..."). The host side (a sink for tx, a pusher for rx, an echo
 * server for rr) lives in bench/guest_net.py.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int report(const char *name, const char *dir, unsigned long long bytes, double seconds)
{
    printf("netload name=%s dir=%s mbps=%.1f bytes=%llu seconds=%.3f\n", name, dir,
           seconds > 0 ? bytes * 8 / seconds / 1e6 : 0.0, bytes, seconds);
    return 0;
}

/* A connected TCP socket to ADDRESS:PORT (retried for 10 s: the host side may start late), or -1. */
static int connect_to(const char *address, int port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, address, &sa.sin_addr) != 1) {
        fprintf(stderr, "netload: bad address %s\n", address);
        return -1;
    }
    double give_up = now() + 10;
    for (;;) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
            return fd;
        if (fd >= 0)
            close(fd);
        if (now() > give_up) {
            perror("netload: connect");
            return -1;
        }
        usleep(50000);
    }
}

static int tx(const char *name, const char *address, int port, double seconds)
{
    static char buf[65536];
    int fd = connect_to(address, port);
    if (fd < 0)
        return 1;
    memset(buf, 0x5a, sizeof buf);
    unsigned long long bytes = 0;
    double t0 = now(), end = t0 + seconds;
    while (now() < end) {
        ssize_t n = send(fd, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("netload: send");
            return 1;
        }
        bytes += n;
    }
    double elapsed = now() - t0;
    close(fd);
    return report(name, "tx", bytes, elapsed);
}

static int rx(const char *name, const char *address, int port, double seconds)
{
    static char buf[65536];
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    /* the NIC's own address: the host pushes to every NIC's address in turn */
    if (inet_pton(AF_INET, address, &sa.sin_addr) != 1) {
        fprintf(stderr, "netload: bad address %s\n", address);
        return 2;
    }
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 1)) {
        perror("netload: listen");
        return 1;
    }
    struct pollfd p = {.fd = ls, .events = POLLIN};
    if (poll(&p, 1, 20000) <= 0) {
        fprintf(stderr, "netload: nobody connected\n");
        return 1;
    }
    int fd = accept(ls, NULL, NULL);
    close(ls);
    if (fd < 0) {
        perror("netload: accept");
        return 1;
    }
    unsigned long long bytes = 0;
    double t0 = 0, end = 0;
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            break;
        }
        if (!t0) {  /* from the first byte: the pusher's connect is not part of it */
            t0 = now();
            end = t0 + seconds;
        } else {
            bytes += n;
        }
        if (now() >= end)
            break;
    }
    double elapsed = t0 ? now() - t0 : 0;
    close(fd);
    return report(name, "rx", bytes, elapsed);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

#define MAX_TURNS (1 << 20)

static int rr(const char *name, const char *address, int port, double seconds)
{
    static double lat[MAX_TURNS];
    int fd = connect_to(address, port);
    if (fd < 0)
        return 1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char c = 'r';
    unsigned long turns = 0;
    double t0 = now(), end = t0 + seconds, t = t0;
    while (t < end && turns < MAX_TURNS) {
        ssize_t n;
        do /* an interrupted call is retried alone: a second request byte would be a second turn */
            n = send(fd, &c, 1, 0);
        while (n < 0 && errno == EINTR);
        if (n == 1)
            do
                n = recv(fd, &c, 1, 0);
            while (n < 0 && errno == EINTR);
        if (n != 1) {
            fprintf(stderr, "netload: request/response: %s\n", n < 0 ? strerror(errno) : "connection closed");
            return 1;
        }
        double t1 = now();
        lat[turns++] = t1 - t;
        t = t1;
    }
    double elapsed = t - t0;
    close(fd);
    qsort(lat, turns, sizeof lat[0], cmp_double);
    double p50 = turns ? lat[turns / 2] : 0, p99 = turns ? lat[turns * 99 / 100] : 0;
    printf("netload name=%s dir=rr mbps=0 bytes=%lu seconds=%.3f tps=%.1f p50_us=%.1f p99_us=%.1f\n", name,
           2 * turns, elapsed, elapsed > 0 ? turns / elapsed : 0.0, p50 * 1e6, p99 * 1e6);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 6 && !strcmp(argv[2], "tx"))
        return tx(argv[1], argv[3], atoi(argv[4]), atof(argv[5]));
    if (argc == 6 && !strcmp(argv[2], "rx"))
        return rx(argv[1], argv[3], atoi(argv[4]), atof(argv[5]));
    if (argc == 6 && !strcmp(argv[2], "rr"))
        return rr(argv[1], argv[3], atoi(argv[4]), atof(argv[5]));
    fprintf(stderr, "usage: netload NAME tx|rx|rr ADDRESS PORT SECONDS\n");
    return 2;
}
