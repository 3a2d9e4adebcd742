/* TCP throughput from inside the guest, for bench.guest_net (built static on the host).
 *
 *   netload NAME tx ADDRESS PORT SECONDS   connect, send 64 KiB writes for SECONDS
 *   netload NAME rx ADDRESS PORT SECONDS   accept one connection there, read for SECONDS
 *   netload NAME rr ADDRESS PORT SECONDS [SIZE]   connect, then SIZE-byte request / response
 *                                                 (default 1; the server echoes)
 *                                          turns (TCP_NODELAY) for SECONDS, one at a time
 *   netload NAME counters IFACE AT         what the NIC's driver counted so far (AT: a word
 *                                          the host pairs readings by, e.g. start or end)
 *
 * Prints one line: "netload name=NAME dir=tx|rx|rr mbps=... bytes=... seconds=..." (rr adds
 * "tps=... p50_us=... p99_us=..."). The host side (a sink for tx, a pusher for rx, an echo
 * server for rr) lives in bench/guest_net.py.
 *
 * counters prints "netcounters name=NAME at=AT cpu_busy=N ... sys_rx_packets=N ... STAT=N ...
 * irq_QUEUE=N ...": the guest's CPU ticks busy and idle (/proc/stat), the interface's packets
 * and bytes each way (sysfs), every statistic the driver gives ethtool
 * (ETHTOOL_GSTATS; virtio_net's per-queue kicks, tx0_kicks, or tx_queue_0_kicks before 6.10)
 * and, from /proc/interrupts, the interrupts of each of the device's vectors (virtioN-input.0,
 * virtioN-output.0, ... as irq_input.0, irq_output.0), summed over CPUs. The guest kit's
 * busybox has no ethtool, hence here.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <libgen.h>
#include <linux/ethtool.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
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

#define MAX_RR_SIZE (1 << 20)

/* All of len bytes through send or recv; 0, or -1 (errno; 0 for a closed connection). */
static int all(int fd, char *buf, size_t len, int sending)
{
    while (len) {
        ssize_t n = sending ? send(fd, buf, len, 0) : recv(fd, buf, len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (n == 0)
                errno = 0;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static int rr(const char *name, const char *address, int port, double seconds, size_t size)
{
    static double lat[MAX_TURNS];
    static char buf[MAX_RR_SIZE];
    if (size < 1 || size > MAX_RR_SIZE) {
        fprintf(stderr, "netload: request/response size must be 1..%d\n", MAX_RR_SIZE);
        return 2;
    }
    int fd = connect_to(address, port);
    if (fd < 0)
        return 1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    memset(buf, 'r', size);
    unsigned long turns = 0;
    double t0 = now(), end = t0 + seconds, t = t0;
    while (t < end && turns < MAX_TURNS) {
        if (all(fd, buf, size, 1) < 0 || all(fd, buf, size, 0) < 0) {
            fprintf(stderr, "netload: request/response: %s\n", errno ? strerror(errno) : "connection closed");
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
           2 * turns * (unsigned long)size, elapsed, elapsed > 0 ? turns / elapsed : 0.0, p50 * 1e6, p99 * 1e6);
    return 0;
}

/* The ethtool statistics of IFACE as " NAME=VALUE" pairs on stdout; 0, or -1 with a reason on stderr. */
/* One SIOCETHTOOL request on IFACE's ifr; 0, or -1 with a reason on stderr. */
static int ethtool(int fd, struct ifreq *ifr, void *data, const char *iface, const char *what)
{
    ifr->ifr_data = data;
    if (ioctl(fd, SIOCETHTOOL, ifr) < 0) {
        fprintf(stderr, "netload: %s: %s: %s\n", iface, what, strerror(errno));
        return -1;
    }
    return 0;
}

static int ethtool_stats(int fd, const char *iface)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", iface);
    struct {
        struct ethtool_sset_info info;
        __u32 n;
    } sset = {.info = {.cmd = ETHTOOL_GSSET_INFO, .sset_mask = 1ULL << ETH_SS_STATS}};
    if (ethtool(fd, &ifr, &sset, iface, "ETHTOOL_GSSET_INFO") < 0)
        return -1;
    __u32 n = sset.info.sset_mask ? sset.n : 0;
    if (!n)
        return 0;
    /* The kernel writes as many strings and values as the driver has when it is asked, not
       the n passed in; the count changes with the queue pairs (ethtool -L), so room to spare,
       and both answers must say n. */
    __u32 room = 2 * n + 64;
    struct ethtool_gstrings *names = calloc(1, sizeof *names + (size_t)room * ETH_GSTRING_LEN);
    struct ethtool_stats *stats = calloc(1, sizeof *stats + (size_t)room * sizeof(__u64));
    int rc = -1;
    if (!names || !stats) {
        fprintf(stderr, "netload: out of memory\n");
        goto out;
    }
    names->cmd = ETHTOOL_GSTRINGS;
    names->string_set = ETH_SS_STATS;
    names->len = n;
    if (ethtool(fd, &ifr, names, iface, "ETHTOOL_GSTRINGS") < 0)
        goto out;
    stats->cmd = ETHTOOL_GSTATS;
    stats->n_stats = n;
    if (ethtool(fd, &ifr, stats, iface, "ETHTOOL_GSTATS") < 0)
        goto out;
    if (names->len != n || stats->n_stats != n) {
        fprintf(stderr, "netload: %s: the driver's statistics changed while read (%u, %u, %u names)\n",
                iface, n, names->len, stats->n_stats);
        goto out;
    }
    for (__u32 i = 0; i < n && i < stats->n_stats; i++) {
        char name[ETH_GSTRING_LEN + 1];
        memcpy(name, names->data + (size_t)i * ETH_GSTRING_LEN, ETH_GSTRING_LEN);
        name[ETH_GSTRING_LEN] = 0;
        for (char *c = name; *c; c++)  /* one word per pair */
            if (*c == ' ' || *c == '=')
                *c = '_';
        if (*name)
            printf(" %s=%llu", name, (unsigned long long)stats->data[i]);
    }
    rc = 0;
out:
    free(names);
    free(stats);
    return rc;
}

/* The interrupts of IFACE's virtio device (its vectors are named virtioN-QUEUE in
 * /proc/interrupts) as " irq_QUEUE=COUNT" pairs, summed over CPUs. */
static int interrupts(const char *iface)
{
    char path[256], target[256];
    snprintf(path, sizeof path, "/sys/class/net/%s/device", iface);
    ssize_t len = readlink(path, target, sizeof target - 1);
    if (len < 0) {
        fprintf(stderr, "netload: %s: %s\n", path, strerror(errno));
        return -1;
    }
    target[len] = 0;
    char prefix[300];
    snprintf(prefix, sizeof prefix, "%s-", basename(target));  /* "virtio3-" */
    FILE *f = fopen("/proc/interrupts", "r");
    if (!f) {
        fprintf(stderr, "netload: /proc/interrupts: %s\n", strerror(errno));
        return -1;
    }
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        char *colon = strchr(line, ':');
        if (!colon)
            continue;
        unsigned long long sum = 0;
        char *p = colon + 1, *end;
        for (;;) {  /* the per-CPU counts, up to the first word that is not a number */
            unsigned long long v = strtoull(p, &end, 10);
            if (end == p)
                break;
            sum += v;
            p = end;
        }
        char *last = NULL, *word, *save;
        for (word = strtok_r(p, " \t\n", &save); word; word = strtok_r(NULL, " \t\n", &save))
            last = word;
        if (last && !strncmp(last, prefix, strlen(prefix)))
            printf(" irq_%s=%llu", last + strlen(prefix), sum);
    }
    fclose(f);
    return 0;
}

/* The interface's packet and byte counters (all queues) as " sys_rx_packets=N" etc.: since
 * Linux 6.10 virtio_net gives ethtool its kicks but no longer its packets per queue. */
static int totals(const char *iface)
{
    static const char *const which[] = {"rx_packets", "rx_bytes", "tx_packets", "tx_bytes"};
    for (size_t i = 0; i < sizeof which / sizeof which[0]; i++) {
        char path[256];
        unsigned long long v;
        snprintf(path, sizeof path, "/sys/class/net/%s/statistics/%s", iface, which[i]);
        FILE *f = fopen(path, "r");
        int ok = f && fscanf(f, "%llu", &v) == 1;
        if (f)
            fclose(f);
        if (!ok) {
            fprintf(stderr, "netload: %s: %s\n", path, f ? "not a number" : strerror(errno));
            return -1;
        }
        printf(" sys_%s=%llu", which[i], v);
    }
    return 0;
}

/* The guest's CPU time so far (all CPUs, in USER_HZ ticks) as " cpu_busy=N cpu_idle=N": under
 * TCG an idle vCPU is one that waits for the device, a busy one is the bottleneck. */
static int cpu_time(void)
{
    unsigned long long v[8] = {0};  /* user nice system idle iowait irq softirq steal */
    FILE *f = fopen("/proc/stat", "r");
    int ok = f && fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
                         &v[5], &v[6], &v[7]) == 8;
    if (f)
        fclose(f);
    if (!ok) {
        fprintf(stderr, "netload: /proc/stat: %s\n", f ? "no cpu line" : strerror(errno));
        return -1;
    }
    printf(" cpu_busy=%llu cpu_idle=%llu", v[0] + v[1] + v[2] + v[5] + v[6] + v[7], v[3] + v[4]);
    return 0;
}

static int counters(const char *name, const char *iface, const char *at)
{
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("netload: socket");
        return 1;
    }
    printf("netcounters name=%s at=%s", name, at);
    int rc = cpu_time() | totals(iface) | ethtool_stats(fd, iface) | interrupts(iface);
    printf("\n");
    close(fd);
    return rc ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc == 6 && !strcmp(argv[2], "tx"))
        return tx(argv[1], argv[3], atoi(argv[4]), atof(argv[5]));
    if (argc == 6 && !strcmp(argv[2], "rx"))
        return rx(argv[1], argv[3], atoi(argv[4]), atof(argv[5]));
    if ((argc == 6 || argc == 7) && !strcmp(argv[2], "rr"))
        return rr(argv[1], argv[3], atoi(argv[4]), atof(argv[5]), argc == 7 ? (size_t)atol(argv[6]) : 1);
    if (argc == 5 && !strcmp(argv[2], "counters"))
        return counters(argv[1], argv[3], argv[4]);
    fprintf(stderr, "usage: netload NAME tx|rx ADDRESS PORT SECONDS | netload NAME rr ADDRESS PORT SECONDS [SIZE]"
                    " | netload NAME counters IFACE AT\n");
    return 2;
}
