/*
 * Closed-loop line-echo load client for the txsocketserver benchmarks.
 *
 * Usage: echoclient HOST PORT MODE CONNS WARMUP DURATION MESSAGE
 *   MODE      "persistent": each of CONNS connections sends MESSAGE, waits for
 *             the echoed line, and sends again, for the whole run.
 *             "connect": each of CONNS workers opens a new connection per
 *             request, sends MESSAGE, reads the reply, closes.
 *   WARMUP    seconds of load whose requests are not counted.
 *   DURATION  seconds of counted load after the warm-up.
 *   MESSAGE   the request line; a trailing newline is added.
 *
 * Prints one JSON line: {"requests": N, "seconds": S, "errors": E}.
 *
 * Why C: the machine under test has two cores, so every microsecond the load
 * client spends per request is taken from the server.  One epoll loop in C costs
 * a few microseconds of CPU per request (the system calls), several times less
 * than a selectors loop in Python, so the server, not the client, is what is
 * measured.  The Python fallback (pyclient.py) speaks the same protocol.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum state { CONNECTING, SENDING, READING };

struct conn {
    int fd;
    enum state st;
    size_t sent;
    size_t got;
};

static struct sockaddr_in addr;
static int epfd;
static int persistent;
static char msg[512];
static size_t msglen;
static char rbuf[4096];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int open_conn(struct conn *c) {
    int one = 1;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) return -1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->sent = c->got = 0;
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) == 0) {
        c->st = SENDING;
    } else if (errno == EINPROGRESS) {
        c->st = CONNECTING;
    } else {
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    return 0;
}

static void close_conn(struct conn *c) {
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
}

static void want(struct conn *c, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Try to send the rest of the request; returns -1 on a socket error. */
static int do_send(struct conn *c) {
    while (c->sent < msglen) {
        ssize_t n = send(c->fd, msg + c->sent, msglen - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) {
                want(c, EPOLLOUT);
                return 0;
            }
            return -1;
        }
        c->sent += (size_t)n;
    }
    c->st = READING;
    c->got = 0;
    want(c, EPOLLIN);
    return 0;
}

/* Read the reply; returns 1 once it equals the request, 0 to wait, -1 on error
 * (including a reply that is not the echo: a benchmark must not count garbage). */
static int do_read(struct conn *c) {
    for (;;) {
        ssize_t n = recv(c->fd, rbuf, sizeof rbuf, 0);
        if (n == 0) return -1;
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        if (c->got + (size_t)n > msglen || memcmp(rbuf, msg + c->got, (size_t)n) != 0) {
            return -1;
        }
        c->got += (size_t)n;
        if (c->got == msglen) return 1;
    }
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s HOST PORT MODE CONNS WARMUP DURATION MESSAGE\n", argv[0]);
        return 2;
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) return 2;
    persistent = strcmp(argv[3], "persistent") == 0;
    int nconns = atoi(argv[4]);
    double warmup = atof(argv[5]), duration = atof(argv[6]);
    msglen = (size_t)snprintf(msg, sizeof msg - 1, "%s\n", argv[7]);

    epfd = epoll_create1(0);
    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    long requests = 0, errors = 0;
    for (int i = 0; i < nconns; i++) {
        if (open_conn(&conns[i]) < 0) errors++;
    }
    double start = now(), measure_from = start + warmup, end = measure_from + duration;
    int counting = warmup <= 0;
    struct epoll_event events[256];
    for (;;) {
        double t = now();
        if (!counting && t >= measure_from) {
            counting = 1;
            requests = errors = 0;
        }
        if (t >= end) break;
        double limit = counting ? end : measure_from;
        int timeout_ms = (int)((limit - t) * 1000) + 1;
        int n = epoll_wait(epfd, events, 256, timeout_ms);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            int rc = 0;
            if (c->st == CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    rc = -1;
                } else {
                    c->st = SENDING;
                }
            }
            if (rc == 0 && c->st == SENDING) rc = do_send(c);
            else if (rc == 0 && c->st == READING && (rc = do_read(c)) == 1) {
                requests++;
                rc = 0;
                if (persistent) {
                    c->st = SENDING;
                    c->sent = 0;
                    rc = do_send(c);
                } else {
                    close_conn(c);
                    if (open_conn(c) < 0) errors++;
                    continue;
                }
            }
            if (rc < 0) {
                errors++;
                close_conn(c);
                if (open_conn(c) < 0) errors++;
            }
        }
    }
    double elapsed = now() - (warmup > 0 ? measure_from : start);
    printf("{\"requests\": %ld, \"seconds\": %.6f, \"errors\": %ld}\n", requests, elapsed, errors);
    return 0;
}
