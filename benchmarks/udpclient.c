/*
 * Closed-loop datagram request/response load client for the txsocketserver
 * benchmarks (the datagram counterpart of echoclient.c).
 *
 * Usage: udpclient HOST PORT CLIENTS WARMUP DURATION MESSAGE
 *   CLIENTS   sockets, each with its own port, each keeping one datagram in
 *             flight: send, wait for the echo, send the next.
 *   WARMUP    seconds of load whose requests are not counted.
 *   DURATION  seconds of counted load after the warm-up.
 *   MESSAGE   the payload; an 8-digit sequence number is prepended, so that a
 *             late reply to a datagram given up on is never counted for the next.
 *
 * A datagram (or its reply) may be lost: a client that has waited LOSS_TIMEOUT
 * for its reply counts an error and sends the next datagram.  A reply that is
 * not the echo of the datagram in flight is ignored (a late one) or, if it is
 * no echo at all, counted as an error.
 *
 * Prints one JSON line: {"requests": N, "seconds": S, "errors": E}.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define LOSS_TIMEOUT 0.2 /* seconds; loopback replies take microseconds */
#define SEQ_DIGITS 8

struct client {
    int fd;
    unsigned long seq;
    double sent_at;
    char msg[600];
    size_t msglen;
};

static const char *payload;
static char rbuf[2048];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Send the client's next datagram; returns -1 on a socket error. */
static int send_next(struct client *c) {
    c->seq++;
    c->msglen = (size_t)snprintf(c->msg, sizeof c->msg, "%0*lu %s", SEQ_DIGITS,
                                 c->seq % 100000000UL, payload);
    c->sent_at = now();
    return send(c->fd, c->msg, c->msglen, 0) == (ssize_t)c->msglen ? 0 : -1;
}

/* Read waiting replies: 1 once the echo of the datagram in flight arrived,
 * 0 to wait, -1 on a socket error or a reply that is no echo at all. */
static int read_reply(struct client *c) {
    for (;;) {
        ssize_t n = recv(c->fd, rbuf, sizeof rbuf, 0);
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        if ((size_t)n == c->msglen && memcmp(rbuf, c->msg, c->msglen) == 0) return 1;
        if ((size_t)n != c->msglen || memcmp(rbuf + SEQ_DIGITS, c->msg + SEQ_DIGITS,
                                             c->msglen - SEQ_DIGITS) != 0) {
            return -1;
        }
        /* The echo of an earlier datagram we stopped waiting for: ignore it. */
    }
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s HOST PORT CLIENTS WARMUP DURATION MESSAGE\n", argv[0]);
        return 2;
    }
    struct sockaddr_in addr = {.sin_family = AF_INET};
    addr.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) return 2;
    int nclients = atoi(argv[3]);
    double warmup = atof(argv[4]), duration = atof(argv[5]);
    payload = argv[6];
    if (nclients < 1 || strlen(payload) > 500) return 2;

    int epfd = epoll_create1(0);
    struct client *clients = calloc((size_t)nclients, sizeof *clients);
    long requests = 0, errors = 0;
    for (int i = 0; i < nclients; i++) {
        struct client *c = &clients[i];
        c->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        /* connect(): the kernel then delivers only the server's datagrams. */
        if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
            perror("udp socket");
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    }
    double start = now(), measure_from = start + warmup, end = measure_from + duration;
    int counting = warmup <= 0;
    for (int i = 0; i < nclients; i++) {
        if (send_next(&clients[i]) < 0) errors++;
    }
    struct epoll_event events[256];
    for (;;) {
        double t = now();
        if (!counting && t >= measure_from) {
            counting = 1;
            requests = errors = 0;
        }
        if (t >= end) break;
        /* Wake at least every 10 ms to give up on lost datagrams. */
        double limit = counting ? end : measure_from;
        int timeout_ms = (int)((limit - t) * 1000) + 1;
        if (timeout_ms > 10) timeout_ms = 10;
        int n = epoll_wait(epfd, events, 256, timeout_ms);
        for (int i = 0; i < n; i++) {
            struct client *c = events[i].data.ptr;
            int rc = read_reply(c);
            if (rc == 0) continue;
            if (rc == 1) requests++;
            else errors++;
            if (send_next(c) < 0) errors++;
        }
        t = now();
        for (int i = 0; i < nclients; i++) {
            struct client *c = &clients[i];
            if (t - c->sent_at > LOSS_TIMEOUT) {
                errors++;
                if (send_next(c) < 0) errors++;
            }
        }
    }
    double elapsed = now() - (warmup > 0 ? measure_from : start);
    printf("{\"requests\": %ld, \"seconds\": %.6f, \"errors\": %ld}\n", requests, elapsed, errors);
    return 0;
}
