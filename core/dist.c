/* The host communicator of data-parallel training (core/dist.h): a star of
 * TCP connections to rank 0. */
#define _POSIX_C_SOURCE 200809L
#include "dist.h"

#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "qlora/error.h"

struct ql_dist {
    int rank, world, local_rank, timeout_s;
    int *fd;     /* rank 0: fd[r] the connection of rank r (fd[0] unused); else fd[0] to rank 0 */
    void *buf;   /* rank 0: a peer's buffer as it arrives */
    size_t cap;
};

static const char hello_magic[8] = {'Q', 'L', 'D', 'I', 'S', 'T', '0', '1'};
static const char ready_magic[8] = {'Q', 'L', 'D', 'I', 'S', 'T', 'O', 'K'};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* an integer environment variable in [lo, hi]; *out = dflt when unset */
static int env_int(const char *name, long lo, long hi, long dflt, long *out)
{
    const char *s = getenv(name);
    *out = dflt;
    if (!s || !*s) return QL_OK;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return ql_error(QL_EINVAL, "%s=%s: expected an integer from %ld to %ld", name, s, lo, hi);
    *out = v;
    return QL_OK;
}

/* wait until fd is ready for `events` or the deadline passes */
static int wait_fd(ql_dist *d, int fd, short events, double deadline, int peer)
{
    for (;;) {
        double left = deadline - now_s();
        if (left <= 0)
            return ql_error(QL_EIO, "data parallel: no word from rank %d in %d s (QLORA_DIST_TIMEOUT)", peer,
                            d->timeout_s);
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, left > 1e6 ? 1000000000 : (int)(left * 1000) + 1);
        if (n < 0 && errno == EINTR) continue; /* a stop signal: the trainer looks at it between steps */
        if (n < 0) return ql_error(QL_EIO, "data parallel: poll: %s", strerror(errno));
        if (n > 0) return QL_OK;
    }
}

static int send_all(ql_dist *d, int fd, const void *p, size_t n, int peer)
{
    const char *c = p;
    const double deadline = now_s() + d->timeout_s;
    while (n) {
        int rc = wait_fd(d, fd, POLLOUT, deadline, peer);
        if (rc) return rc;
        ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
        if (w < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (w < 0)
            return ql_error(QL_EIO, "data parallel: rank %d is gone (it exited or was killed): %s", peer,
                            strerror(errno));
        c += w;
        n -= (size_t)w;
    }
    return QL_OK;
}

static int recv_all(ql_dist *d, int fd, void *p, size_t n, int peer)
{
    char *c = p;
    const double deadline = now_s() + d->timeout_s;
    while (n) {
        int rc = wait_fd(d, fd, POLLIN, deadline, peer);
        if (rc) return rc;
        ssize_t r = recv(fd, c, n, 0);
        if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (r <= 0)
            return ql_error(QL_EIO, "data parallel: rank %d closed its connection (it exited or was killed)%s%s", peer,
                            r < 0 ? ": " : "", r < 0 ? strerror(errno) : "");
        c += r;
        n -= (size_t)r;
    }
    return QL_OK;
}

static struct addrinfo *resolve(const char *host, const char *port, int passive, int *rc)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = passive ? AI_PASSIVE : 0};
    struct addrinfo *res = NULL;
    int e = getaddrinfo(host, port, &hints, &res);
    if (e) *rc = ql_error(QL_EINVAL, "MASTER_ADDR=%s MASTER_PORT=%s: %s", host, port, gai_strerror(e));
    return res;
}

static int serve(ql_dist *d, const char *host, const char *port)
{
    int rc = QL_OK;
    struct addrinfo *res = resolve(host, port, 1, &rc), *a;
    if (!res) return rc;
    int ls = -1;
    for (a = res; a && ls < 0; a = a->ai_next) {
        ls = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (ls < 0) continue;
        int one = 1;
        setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(ls, a->ai_addr, a->ai_addrlen) || listen(ls, d->world)) {
            rc = ql_error(QL_EIO, "data parallel: rank 0 cannot listen on %s:%s: %s", host, port, strerror(errno));
            close(ls);
            ls = -1;
        }
    }
    freeaddrinfo(res);
    if (ls < 0) return rc ? rc : ql_error(QL_EIO, "data parallel: rank 0 cannot listen on %s:%s", host, port);
    rc = QL_OK;
    const double deadline = now_s() + d->timeout_s;
    for (int joined = 1; joined < d->world && rc == QL_OK;) {
        struct pollfd p = {.fd = ls, .events = POLLIN};
        double left = deadline - now_s();
        int n = left > 0 ? poll(&p, 1, (int)(left * 1000) + 1) : 0;
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            rc = ql_error(QL_EIO, "data parallel: %d of %d ranks joined rank 0 on %s:%s in %d s (QLORA_DIST_TIMEOUT)",
                          joined, d->world, host, port, d->timeout_s);
            break;
        }
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) continue;
        uint32_t who[2];
        char magic[8];
        /* a rank says who it is at once: a connection that does not (not one
         * of ours) is dropped after 10 s */
        const int timeout = d->timeout_s;
        d->timeout_s = timeout < 10 ? timeout : 10;
        int bad = recv_all(d, fd, magic, sizeof magic, -1) || memcmp(magic, hello_magic, sizeof magic) ||
                  recv_all(d, fd, who, sizeof who, -1);
        d->timeout_s = timeout;
        if (bad) {
            close(fd);
            ql_error_clear();
            continue;
        }
        if ((int)who[1] != d->world) {
            rc = ql_error(QL_EINVAL, "data parallel: rank %u says WORLD_SIZE=%u, rank 0 has %d", who[0], who[1], d->world);
            close(fd);
        } else if (who[0] < 1 || (int)who[0] >= d->world || d->fd[who[0]] >= 0) {
            rc = ql_error(QL_EINVAL, "data parallel: a second rank %u (each RANK once, 0 to %d)", who[0], d->world - 1);
            close(fd);
        } else {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            d->fd[who[0]] = fd;
            joined++;
        }
    }
    close(ls);
    for (int r = 1; r < d->world && rc == QL_OK; r++) rc = send_all(d, d->fd[r], ready_magic, sizeof ready_magic, r);
    return rc;
}

static int join(ql_dist *d, const char *host, const char *port)
{
    int rc = QL_OK;
    const double deadline = now_s() + d->timeout_s;
    int fd = -1;
    while (fd < 0) { /* rank 0 may not listen yet */
        struct addrinfo *res = resolve(host, port, 0, &rc), *a;
        if (!res) return rc;
        for (a = res; a && fd < 0; a = a->ai_next) {
            fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
            if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen)) {
                close(fd);
                fd = -1;
            }
        }
        freeaddrinfo(res);
        if (fd >= 0) break;
        if (now_s() > deadline)
            return ql_error(QL_EIO, "data parallel: rank %d could not reach rank 0 at %s:%s in %d s (QLORA_DIST_TIMEOUT)",
                            d->rank, host, port, d->timeout_s);
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    d->fd[0] = fd;
    uint32_t who[2] = {(uint32_t)d->rank, (uint32_t)d->world};
    char magic[8];
    if ((rc = send_all(d, fd, hello_magic, sizeof hello_magic, 0)) || (rc = send_all(d, fd, who, sizeof who, 0)) ||
        (rc = recv_all(d, fd, magic, sizeof magic, 0)))
        return rc;
    if (memcmp(magic, ready_magic, sizeof magic)) return ql_error(QL_EIO, "data parallel: %s:%s is not rank 0", host, port);
    return QL_OK;
}

int ql_dist_from_env(ql_dist **out)
{
    *out = NULL;
    long world, rank, local, timeout, port;
    int rc;
    if ((rc = env_int("WORLD_SIZE", 1, 4096, 1, &world))) return rc;
    if (world == 1) return QL_OK;
    if (!getenv("RANK")) return ql_error(QL_EINVAL, "WORLD_SIZE=%ld without RANK (0 to %ld)", world, world - 1);
    if ((rc = env_int("RANK", 0, world - 1, 0, &rank)) || (rc = env_int("LOCAL_RANK", 0, 4095, rank, &local)) ||
        (rc = env_int("QLORA_DIST_TIMEOUT", 1, INT_MAX / 1000, 1800, &timeout)) ||
        (rc = env_int("MASTER_PORT", 1, 65535, 29500, &port)))
        return rc;
    const char *host = getenv("MASTER_ADDR");
    if (!host || !*host) host = "127.0.0.1";
    ql_dist *d = calloc(1, sizeof *d);
    if (!d || !(d->fd = malloc((size_t)world * sizeof *d->fd))) {
        free(d);
        return ql_error(QL_ENOMEM, "out of memory");
    }
    d->rank = (int)rank, d->world = (int)world, d->local_rank = (int)local, d->timeout_s = (int)timeout;
    for (long r = 0; r < world; r++) d->fd[r] = -1;
    char ports[16];
    snprintf(ports, sizeof ports, "%ld", port);
    rc = rank == 0 ? serve(d, host, ports) : join(d, host, ports);
    if (rc) {
        ql_dist_close(d);
        return rc;
    }
    *out = d;
    return QL_OK;
}

int ql_dist_rank(const ql_dist *d) { return d ? d->rank : 0; }
int ql_dist_world(const ql_dist *d) { return d ? d->world : 1; }
int ql_dist_local_rank(const ql_dist *d) { return d ? d->local_rank : 0; }

/* the sum of n elements of `size` bytes; add(acc, x, n) adds x into acc */
static int sum_any(ql_dist *d, void *x, size_t n, size_t size, void (*add)(void *, const void *, size_t))
{
    if (!d || d->world == 1) return QL_OK;
    const uint64_t bytes = (uint64_t)n * size;
    int rc;
    if (d->rank != 0) {
        uint64_t back = 0;
        if ((rc = send_all(d, d->fd[0], &bytes, sizeof bytes, 0)) || (rc = send_all(d, d->fd[0], x, bytes, 0)) ||
            (rc = recv_all(d, d->fd[0], &back, sizeof back, 0)))
            return rc;
        if (back != bytes) return ql_error(QL_EINTERNAL, "data parallel: rank 0 answered %llu bytes for %llu",
                                           (unsigned long long)back, (unsigned long long)bytes);
        return recv_all(d, d->fd[0], x, bytes, 0);
    }
    if (bytes > d->cap) {
        void *b = realloc(d->buf, bytes);
        if (!b) return ql_error(QL_ENOMEM, "out of memory");
        d->buf = b;
        d->cap = bytes;
    }
    for (int r = 1; r < d->world; r++) {
        uint64_t got = 0;
        if ((rc = recv_all(d, d->fd[r], &got, sizeof got, r))) return rc;
        if (got != bytes)
            return ql_error(QL_EINTERNAL, "data parallel: rank %d sent %llu bytes to sum, rank 0 has %llu", r,
                            (unsigned long long)got, (unsigned long long)bytes);
        if ((rc = recv_all(d, d->fd[r], d->buf, bytes, r))) return rc;
        add(x, d->buf, n);
    }
    for (int r = 1; r < d->world; r++)
        if ((rc = send_all(d, d->fd[r], &bytes, sizeof bytes, r)) || (rc = send_all(d, d->fd[r], x, bytes, r)))
            return rc;
    return QL_OK;
}

static void add_f32(void *acc, const void *x, size_t n)
{
    float *a = acc;
    const float *b = x;
    for (size_t i = 0; i < n; i++) a[i] += b[i];
}

static void add_f64(void *acc, const void *x, size_t n)
{
    double *a = acc;
    const double *b = x;
    for (size_t i = 0; i < n; i++) a[i] += b[i];
}

int ql_dist_sum_f32(ql_dist *d, float *x, size_t n) { return sum_any(d, x, n, sizeof *x, add_f32); }
int ql_dist_sum_f64(ql_dist *d, double *x, size_t n) { return sum_any(d, x, n, sizeof *x, add_f64); }

void ql_dist_close(ql_dist *d)
{
    if (!d) return;
    for (int r = 0; d->fd && r < d->world; r++)
        if (d->fd[r] >= 0) close(d->fd[r]);
    free(d->fd);
    free(d->buf);
    free(d);
}
