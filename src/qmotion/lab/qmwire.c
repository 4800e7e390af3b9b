/*
 * qmwire: a delay line between pairs of interfaces, for labs on kernels without sch_netem.
 *
 *   qmwire DELAY_US A1:B1 [A2:B2 ...]
 *
 * Frames received on Ai are sent out of Bi after DELAY_US microseconds; frames received on Bi
 * go out of Ai at once. With one wire per host on its uplink, delaying only the host->switch
 * direction, host-to-host round trips get 2 x DELAY_US and order is preserved (FIFO).
 *
 * PACKET_VNET_HDR on every socket keeps GSO super-frames and partial checksums intact through
 * userspace (as QEMU's tap backend does), so TCP runs at full size without offload tweaks.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/virtio_net.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_PAIRS 64
#define FRAME_MAX (65536 + sizeof(struct virtio_net_hdr) + 64)
#define QUEUE_BYTES (256u << 20) /* per delayed direction: bounds the bandwidth-delay product */

struct pkt {
    uint64_t due_ns;
    uint32_t len;
};

struct queue {
    uint8_t *buf;
    size_t head, tail, used; /* byte ring of [struct pkt][payload] records */
    uint64_t dropped;
};

struct pair {
    int a, b; /* sockets bound to A (delayed side) and B */
    struct queue q;
};

static struct pair P[MAX_PAIRS];
static int npairs;
static uint64_t delay_ns;
static volatile sig_atomic_t stop;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int open_if(const char *name) {
    int s = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, htons(ETH_P_ALL));
    if (s < 0) return -1;
    int one = 1;
    if (setsockopt(s, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one) < 0) return -1;
    /* Do not see our own transmissions on this socket. */
    setsockopt(s, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one);
    int big = 64 << 20;
    setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    setsockopt(s, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big);
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL)};
    sll.sll_ifindex = (int)if_nametoindex(name);
    if (sll.sll_ifindex == 0) {
        errno = ENODEV;
        return -1;
    }
    if (bind(s, (struct sockaddr *)&sll, sizeof sll) < 0) return -1;
    return s;
}

static int push(struct queue *q, const uint8_t *data, uint32_t len, uint64_t due) {
    size_t need = sizeof(struct pkt) + len;
    need = (need + 7) & ~(size_t)7;
    if (q->used + need > QUEUE_BYTES) {
        q->dropped++;
        return -1;
    }
    /* Records never wrap: if the tail gap is too small, pad to the start. */
    if (q->tail + need > QUEUE_BYTES) {
        if (q->head > q->tail || q->head < need) { /* not enough room at the start either */
            q->dropped++;
            return -1;
        }
        struct pkt pad = {.due_ns = 0, .len = UINT32_MAX};
        if (QUEUE_BYTES - q->tail >= sizeof pad) memcpy(q->buf + q->tail, &pad, sizeof pad);
        q->used += QUEUE_BYTES - q->tail;
        q->tail = 0;
    }
    struct pkt h = {.due_ns = due, .len = len};
    memcpy(q->buf + q->tail, &h, sizeof h);
    memcpy(q->buf + q->tail + sizeof h, data, len);
    q->tail += need;
    q->used += need;
    return 0;
}

/* Sends every due frame; returns the due time of the next one, or 0 if the queue is empty. */
static uint64_t drain(struct queue *q, int out) {
    uint64_t now = now_ns();
    while (q->used > 0) {
        if (QUEUE_BYTES - q->head < sizeof(struct pkt)) { /* tail padding too small for a header */
            q->used -= QUEUE_BYTES - q->head;
            q->head = 0;
            continue;
        }
        struct pkt h;
        memcpy(&h, q->buf + q->head, sizeof h);
        if (h.len == UINT32_MAX) {
            q->used -= QUEUE_BYTES - q->head;
            q->head = 0;
            continue;
        }
        if (h.due_ns > now) return h.due_ns;
        ssize_t w = send(out, q->buf + q->head + sizeof h, h.len, 0);
        if (w < 0 && (errno == EAGAIN || errno == ENOBUFS)) return now + 20000; /* retry soon */
        size_t need = (sizeof h + h.len + 7) & ~(size_t)7;
        q->head += need;
        q->used -= need;
        if (q->head >= QUEUE_BYTES) q->head = 0;
    }
    q->head = q->tail = 0;
    return 0;
}

static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: qmwire DELAY_US A:B [A:B ...]\n");
        return 2;
    }
    delay_ns = (uint64_t)strtoull(argv[1], NULL, 10) * 1000ULL;
    for (int i = 2; i < argc && npairs < MAX_PAIRS; i++) {
        char *colon = strchr(argv[i], ':');
        if (!colon) {
            fprintf(stderr, "qmwire: pair %s is not A:B\n", argv[i]);
            return 2;
        }
        *colon = 0;
        struct pair *p = &P[npairs];
        p->a = open_if(argv[i]);
        p->b = open_if(colon + 1);
        if (p->a < 0 || p->b < 0) {
            fprintf(stderr, "qmwire: cannot open %s:%s: %s\n", argv[i], colon + 1,
                    strerror(errno));
            return 1;
        }
        p->q.buf = malloc(QUEUE_BYTES);
        if (!p->q.buf) return 1;
        npairs++;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct pollfd fds[2 * MAX_PAIRS + 1];
    static uint8_t frame[FRAME_MAX];
    fprintf(stderr, "qmwire: %d pairs, delay %llu us\n", npairs,
            (unsigned long long)(delay_ns / 1000));
    while (!stop) {
        int n = 0;
        for (int i = 0; i < npairs; i++) {
            fds[n++] = (struct pollfd){.fd = P[i].a, .events = POLLIN};
            fds[n++] = (struct pollfd){.fd = P[i].b, .events = POLLIN};
        }
        fds[n++] = (struct pollfd){.fd = tfd, .events = POLLIN};
        if (poll(fds, (nfds_t)n, 1000) < 0 && errno != EINTR) break;
        uint64_t expirations;
        if (read(tfd, &expirations, sizeof expirations) < 0) { /* not yet expired */
        }
        for (int i = 0; i < npairs; i++) {
            struct pair *p = &P[i];
            /* Bounded batches keep one busy direction from starving the others. */
            for (int k = 0; k < 256; k++) {
                ssize_t r = recv(p->a, frame, sizeof frame, 0);
                if (r <= 0) break;
                push(&p->q, frame, (uint32_t)r, now_ns() + delay_ns);
            }
            for (int k = 0; k < 256; k++) {
                ssize_t r = recv(p->b, frame, sizeof frame, 0);
                if (r <= 0) break;
                if (send(p->a, frame, (size_t)r, 0) < 0 && errno != EAGAIN && errno != ENOBUFS)
                    fprintf(stderr, "qmwire: send: %s\n", strerror(errno));
            }
        }
        uint64_t next = 0;
        for (int i = 0; i < npairs; i++) {
            uint64_t due = drain(&P[i].q, P[i].b);
            if (due && (!next || due < next)) next = due;
        }
        struct itimerspec its = {0};
        if (next) {
            its.it_value.tv_sec = (time_t)(next / 1000000000ULL);
            its.it_value.tv_nsec = (long)(next % 1000000000ULL);
        }
        timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
    }
    for (int i = 0; i < npairs; i++)
        if (P[i].q.dropped)
            fprintf(stderr, "qmwire: pair %d dropped %llu frames\n", i,
                    (unsigned long long)P[i].q.dropped);
    return 0;
}
