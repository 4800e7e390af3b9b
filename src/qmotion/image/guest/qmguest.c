/*
 * qmguest: the test guest's userspace for qmotion (echo server, memory workload with an
 * integrity checker, disk writer with sequence-numbered records, power-button handler).
 *
 * Built statically at image build time and run by the initramfs's /init. Everything it
 * reports is a single JSON line, on its TCP query port and on the serial console, so that
 * host-side tests can parse it without a guest agent.
 *
 * Memory integrity, in the spirit of QEMU's migration test guest (a-b-bootblock): the dirtier
 * rewrites pages strictly in order, pass after pass. Each page carries a header (index, the pass
 * that wrote it, a checksum of its payload), and the payload is pseudo-random (incompressible).
 * At any instant pages [0, cursor) belong to the current pass and [cursor, N) to the previous one,
 * so a check detects a torn page (bad checksum), a page that was never transferred (zero/garbage
 * header) and a stale page whose last write was lost (wrong pass), not just random corruption.
 *
 * Hot set (optional, HOT_MIB > 0): a busy VM does not dirty its memory uniformly; it keeps
 * rewriting a small working set. The first HOT_MIB MiB of the fill are that set: half of the dirty
 * budget rewrites them round-robin (a "hot pass" every HOT_MIB MiB, so each hot page's generation,
 * the pass number in its header, is bumped on every rewrite and its payload changes), the other
 * half sweeps the remaining pages as above. Both are strictly ordered, so the checker knows every
 * page's expected generation: hot pages [0, hot_cursor) carry hot_pass, [hot_cursor, HOT) carry
 * hot_pass - 1; a lost rewrite of a hot page is caught as stale like any other. With HOT_MIB equal
 * to the fill the whole budget goes to the hot set (there is nothing left to sweep).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#define PAGE 4096
#define PAGE_MAGIC 0x514d4f54494f4e31ULL /* "QMOTION1" */
#define DISK_MAGIC 0x514d4449534b3031ULL /* "QMDISK01" */

static void console(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    /* The serial console is the log of record; stdout may be redirected by init. */
    int fd = open("/dev/console", O_WRONLY | O_NOCTTY);
    if (fd >= 0) {
        dprintf(fd, "%s\n", buf);
        close(fd);
    }
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_s(double s) {
    if (s <= 0) return;
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static uint64_t mix(uint64_t a, uint64_t b) {
    uint64_t x = a * 0x9E3779B97F4A7C15ULL ^ (b + 0x632BE59BD9B4E019ULL);
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 29;
    return x | 1; /* xorshift must not be seeded with zero */
}

static uint64_t checksum(const uint64_t *w, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ w[i]) * 0x100000001b3ULL;
    return h;
}

static void read_boot_id(char *out, size_t n) {
    out[0] = 0;
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY);
    if (fd < 0) return;
    ssize_t r = read(fd, out, n - 1);
    close(fd);
    if (r < 0) r = 0;
    out[r] = 0;
    char *nl = strchr(out, '\n');
    if (nl) *nl = 0;
}

static int listen_tcp(int port) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 64) < 0) {
        close(s);
        return -1;
    }
    return s;
}

/* ---------------------------------------------------------------- echo */

static void *echo_conn(void *arg) {
    int c = (int)(intptr_t)arg;
    int one = 1;
    /* Echo replies are what tests time blackouts with; Nagle would add its own gaps. */
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char buf[65536];
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n <= 0) break;
        ssize_t off = 0;
        while (off < n) {
            ssize_t w = write(c, buf + off, (size_t)(n - off));
            if (w <= 0) goto out;
            off += w;
        }
    }
out:
    close(c);
    return NULL;
}

static int run_echo(int port) {
    int s = listen_tcp(port);
    if (s < 0) {
        console("QM echo: cannot listen on %d: %s", port, strerror(errno));
        return 1;
    }
    console("QM echo: listening on %d", port);
    for (;;) {
        int c = accept4(s, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) continue;
        pthread_t t;
        if (pthread_create(&t, NULL, echo_conn, (void *)(intptr_t)c) != 0) {
            close(c);
            continue;
        }
        pthread_detach(t);
    }
}

/* ---------------------------------------------------------------- memory */

struct mem_state {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint8_t *base;
    uint64_t npages;
    uint64_t hot_pages; /* pages [0, hot_pages) are the hot set; the sweep covers the rest */
    uint64_t seed;
    double dirty_mib_s;
    /* Owned by the workload thread; read by the query thread under lock. */
    uint64_t pass;
    uint64_t cursor; /* sweep cursor, in [hot_pages, npages] */
    uint64_t hot_pass;
    uint64_t hot_cursor; /* in [0, hot_pages) */
    uint64_t dirtied_pages;
    uint64_t dirtied_hot_pages;
    int filled;
    double fill_seconds;
    /* Check requests are served by the workload thread so the check sees a quiescent memory. */
    uint64_t check_requested;
    uint64_t check_done;
    char last_check[768];
};

static struct mem_state M = {.lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER};

static void write_page(uint64_t idx, uint64_t pass) {
    uint64_t *w = (uint64_t *)(M.base + idx * PAGE);
    uint64_t s = mix(M.seed ^ idx, pass);
    size_t n = PAGE / 8;
    for (size_t i = 4; i < n; i++) w[i] = xorshift(&s);
    w[0] = PAGE_MAGIC ^ idx;
    w[1] = pass;
    w[2] = checksum(w + 4, n - 4);
    w[3] = 0;
}

/* The generation page idx must carry right now (see the hot-set note at the top). */
static uint64_t expected_pass(uint64_t idx) {
    if (idx < M.hot_pages) return idx < M.hot_cursor ? M.hot_pass : M.hot_pass - 1;
    return idx < M.cursor ? M.pass : M.pass - 1;
}

static void check_memory(void) {
    double t0 = now_s();
    uint64_t bad = 0, first_bad = UINT64_MAX, stale = 0, torn = 0, missing = 0, hot_bad = 0;
    size_t n = PAGE / 8;
    for (uint64_t i = 0; i < M.npages; i++) {
        const uint64_t *w = (const uint64_t *)(M.base + i * PAGE);
        uint64_t want = expected_pass(i);
        int ok = 1;
        if (w[0] != (PAGE_MAGIC ^ i)) {
            missing++;
            ok = 0;
        } else if (w[2] != checksum(w + 4, n - 4)) {
            torn++;
            ok = 0;
        } else if (w[1] != want) {
            stale++;
            ok = 0;
        }
        if (!ok) {
            bad++;
            if (i < M.hot_pages) hot_bad++;
            if (first_bad == UINT64_MAX) first_bad = i;
        }
    }
    char boot[64];
    read_boot_id(boot, sizeof boot);
    snprintf(M.last_check, sizeof M.last_check,
             "{\"kind\":\"mem\",\"consistent\":%s,\"pages\":%llu,\"bad_pages\":%llu,"
             "\"missing\":%llu,\"torn\":%llu,\"stale\":%llu,\"first_bad\":%lld,\"pass\":%llu,"
             "\"cursor\":%llu,\"hot_mib\":%.2f,\"hot_pages\":%llu,\"hot_bad\":%llu,"
             "\"hot_pass\":%llu,\"hot_cursor\":%llu,\"check_ms\":%.1f,\"uptime_s\":%.3f,"
             "\"boot_id\":\"%s\"}",
             bad == 0 ? "true" : "false", (unsigned long long)M.npages, (unsigned long long)bad,
             (unsigned long long)missing, (unsigned long long)torn, (unsigned long long)stale,
             first_bad == UINT64_MAX ? -1LL : (long long)first_bad, (unsigned long long)M.pass,
             (unsigned long long)M.cursor, (double)M.hot_pages / 256.0,
             (unsigned long long)M.hot_pages, (unsigned long long)hot_bad,
             (unsigned long long)M.hot_pass, (unsigned long long)M.hot_cursor,
             (now_s() - t0) * 1000.0, now_s(), boot);
    console("QM mem check: %s", M.last_check);
}

static void *mem_workload(void *unused) {
    (void)unused;
    double t0 = now_s();
    /* Pass 1 is the initial fill; the dirtier then writes pass 2, 3, ... in page order. */
    M.pass = 1;
    for (uint64_t i = 0; i < M.npages; i++) write_page(i, 1);
    pthread_mutex_lock(&M.lock);
    M.pass = 2;
    M.cursor = M.hot_pages;
    M.hot_pass = 2;
    M.hot_cursor = 0;
    M.filled = 1;
    M.fill_seconds = now_s() - t0;
    pthread_cond_broadcast(&M.cond);
    pthread_mutex_unlock(&M.lock);
    console("QM mem: filled %llu MiB in %.2f s, dirtying %.1f MiB/s, hot set %.2f MiB",
            (unsigned long long)(M.npages / 256), M.fill_seconds, M.dirty_mib_s,
            (double)M.hot_pages / 256.0);

    const double tick = 0.01;
    double budget = 0, last = now_s();
    /* Alternate hot and sweep writes: half of the budget each, interleaved in time. */
    int hot_turn = 1;
    for (;;) {
        pthread_mutex_lock(&M.lock);
        while (M.check_requested == M.check_done && M.dirty_mib_s <= 0)
            pthread_cond_wait(&M.cond, &M.lock);
        if (M.check_requested != M.check_done) {
            check_memory();
            M.check_done = M.check_requested;
            pthread_cond_broadcast(&M.cond);
            pthread_mutex_unlock(&M.lock);
            last = now_s();
            continue;
        }
        pthread_mutex_unlock(&M.lock);

        double t = now_s();
        budget += (t - last) * M.dirty_mib_s * 256.0;
        last = t;
        /* Cap the backlog so a long pause (a stopped VM) does not turn into a write burst. */
        if (budget > M.dirty_mib_s * 256.0) budget = M.dirty_mib_s * 256.0;
        while (budget >= 1.0) {
            pthread_mutex_lock(&M.lock);
            int hot = M.hot_pages > 0 && (hot_turn || M.hot_pages == M.npages);
            hot_turn = !hot_turn;
            if (hot) {
                write_page(M.hot_cursor, M.hot_pass);
                M.hot_cursor++;
                M.dirtied_hot_pages++;
                if (M.hot_cursor == M.hot_pages) {
                    M.hot_cursor = 0;
                    M.hot_pass++;
                }
            } else {
                write_page(M.cursor, M.pass);
                M.cursor++;
                if (M.cursor == M.npages) {
                    M.cursor = M.hot_pages;
                    M.pass++;
                }
            }
            M.dirtied_pages++;
            pthread_mutex_unlock(&M.lock);
            budget -= 1.0;
        }
        sleep_s(tick);
    }
    return NULL;
}

/* Fault injection, so tests can prove the checker catches what it claims to catch. */
static void mem_inject(char *out, size_t n, const char *what) {
    pthread_mutex_lock(&M.lock);
    uint64_t idx = M.npages / 2;
    uint64_t *w = (uint64_t *)(M.base + idx * PAGE);
    if (strcmp(what, "torn") == 0) {
        w[PAGE / 8 - 1] ^= 0x5a5a5a5a5a5a5a5aULL;
    } else if (strcmp(what, "stale") == 0) {
        /* A self-consistent page from an older pass: what a lost dirty page looks like. */
        write_page(idx, w[1] - 1);
    } else if (strcmp(what, "stale-hot") == 0 && M.hot_pages > 0) {
        /* A lost rewrite of a hot page: its previous generation. The page just behind the hot
         * cursor was rewritten last, so the dirtier leaves it alone for a whole hot pass and a
         * check that follows sees the fault. */
        idx = (M.hot_cursor + M.hot_pages - 1) % M.hot_pages;
        w = (uint64_t *)(M.base + idx * PAGE);
        write_page(idx, w[1] - 1);
    } else {
        pthread_mutex_unlock(&M.lock);
        snprintf(out, n, "{\"error\":\"inject torn|stale|stale-hot (%s)\"}\n",
                 M.hot_pages > 0 ? "unknown fault" : "stale-hot needs a hot set");
        return;
    }
    pthread_mutex_unlock(&M.lock);
    snprintf(out, n, "{\"injected\":\"%s\",\"page\":%llu}\n", what, (unsigned long long)idx);
}

static void mem_status(char *out, size_t n, int do_check) {
    pthread_mutex_lock(&M.lock);
    if (do_check) {
        /* A check asked for during the initial fill waits for the fill to finish. */
        while (!M.filled) pthread_cond_wait(&M.cond, &M.lock);
        uint64_t want = ++M.check_requested;
        pthread_cond_broadcast(&M.cond);
        while (M.check_done < want) pthread_cond_wait(&M.cond, &M.lock);
        snprintf(out, n, "%s\n", M.last_check);
    } else {
        char boot[64];
        read_boot_id(boot, sizeof boot);
        snprintf(out, n,
                 "{\"kind\":\"mem\",\"filled\":%s,\"pages\":%llu,\"pass\":%llu,\"cursor\":%llu,"
                 "\"dirtied_pages\":%llu,\"dirty_mib_s\":%.2f,\"hot_mib\":%.2f,\"hot_pages\":%llu,"
                 "\"hot_pass\":%llu,\"hot_cursor\":%llu,\"dirtied_hot_pages\":%llu,"
                 "\"fill_s\":%.3f,\"uptime_s\":%.3f,\"boot_id\":\"%s\"}\n",
                 M.filled ? "true" : "false", (unsigned long long)M.npages,
                 (unsigned long long)M.pass, (unsigned long long)M.cursor,
                 (unsigned long long)M.dirtied_pages, M.dirty_mib_s,
                 (double)M.hot_pages / 256.0, (unsigned long long)M.hot_pages,
                 (unsigned long long)M.hot_pass, (unsigned long long)M.hot_cursor,
                 (unsigned long long)M.dirtied_hot_pages, M.fill_seconds, now_s(), boot);
    }
    pthread_mutex_unlock(&M.lock);
}

/* ---------------------------------------------------------------- disk */

struct disk_state {
    pthread_mutex_t lock;
    int fd;
    uint64_t nslots;
    uint64_t acked; /* highest sequence number whose write completed with O_DSYNC */
    uint64_t first; /* first sequence number written by this boot */
    uint64_t errors;
    double rate;
    int paused;
    char last_error[128];
};

static struct disk_state D = {.lock = PTHREAD_MUTEX_INITIALIZER, .fd = -1};
static volatile uint64_t bulk_bytes; /* written by the bulk writer so far (reported by status) */

struct disk_rec {
    uint64_t magic;
    uint64_t seq;
    uint64_t sum;
    uint64_t when_ns;
};

static void fill_record(uint64_t *w, uint64_t seq) {
    uint64_t s = mix(DISK_MAGIC, seq);
    size_t n = PAGE / 8;
    for (size_t i = 4; i < n; i++) w[i] = xorshift(&s);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    w[0] = DISK_MAGIC;
    w[1] = seq;
    w[2] = checksum(w + 4, n - 4);
    w[3] = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Returns the record's sequence number, 0 for an empty slot, UINT64_MAX for a corrupt one. */
static uint64_t read_record(int fd, uint64_t slot, uint64_t *buf) {
    if (pread(fd, buf, PAGE, (off_t)(slot * PAGE)) != PAGE) return UINT64_MAX;
    if (buf[0] != DISK_MAGIC) return 0;
    if (buf[2] != checksum(buf + 4, PAGE / 8 - 4)) return UINT64_MAX;
    return buf[1];
}

static void *disk_writer(void *unused) {
    (void)unused;
    uint64_t *buf;
    if (posix_memalign((void **)&buf, PAGE, PAGE) != 0) return NULL;
    double interval = D.rate > 0 ? 1.0 / D.rate : 0.02;
    for (;;) {
        pthread_mutex_lock(&D.lock);
        int paused = D.paused;
        uint64_t seq = D.acked + 1;
        pthread_mutex_unlock(&D.lock);
        if (paused) {
            sleep_s(0.01);
            continue;
        }
        fill_record(buf, seq);
        ssize_t w = pwrite(D.fd, buf, PAGE, (off_t)((seq % D.nslots) * PAGE));
        pthread_mutex_lock(&D.lock);
        if (w == PAGE) {
            D.acked = seq;
        } else {
            D.errors++;
            snprintf(D.last_error, sizeof D.last_error, "%s", w < 0 ? strerror(errno) : "short");
        }
        pthread_mutex_unlock(&D.lock);
        sleep_s(interval);
    }
    return NULL;
}

/* Verifies every slot that must hold an acknowledged record; the writer is paused meanwhile. */
static void disk_verify(char *out, size_t n) {
    uint64_t *buf;
    if (posix_memalign((void **)&buf, PAGE, PAGE) != 0) {
        snprintf(out, n, "{\"kind\":\"disk\",\"error\":\"oom\"}\n");
        return;
    }
    pthread_mutex_lock(&D.lock);
    D.paused = 1;
    uint64_t acked = D.acked;
    pthread_mutex_unlock(&D.lock);
    /* The writer may be inside pwrite right now; wait for it to finish that record. */
    sleep_s(0.05);
    pthread_mutex_lock(&D.lock);
    acked = D.acked;
    pthread_mutex_unlock(&D.lock);
    uint64_t lo = acked >= D.nslots ? acked - D.nslots + 1 : 1;
    uint64_t lost = 0, first_lost = 0;
    for (uint64_t seq = lo; seq <= acked; seq++) {
        uint64_t got = read_record(D.fd, seq % D.nslots, buf);
        if (got != seq) {
            if (!lost) first_lost = seq;
            lost++;
        }
    }
    pthread_mutex_lock(&D.lock);
    D.paused = 0;
    pthread_mutex_unlock(&D.lock);
    free(buf);
    snprintf(out, n,
             "{\"kind\":\"disk\",\"intact\":%s,\"acked\":%llu,\"checked\":%llu,\"lost\":%llu,"
             "\"first_lost\":%llu,\"errors\":%llu}\n",
             lost == 0 ? "true" : "false", (unsigned long long)acked,
             (unsigned long long)(acked >= lo ? acked - lo + 1 : 0), (unsigned long long)lost,
             (unsigned long long)first_lost, (unsigned long long)D.errors);
    console("QM disk verify: %.*s", (int)strcspn(out, "\n"), out);
}

/* Fault injection: erase an acknowledged record, as a storage move that lost a write would. */
static void disk_inject_lost(char *out, size_t n) {
    uint64_t *buf;
    if (posix_memalign((void **)&buf, PAGE, PAGE) != 0) return;
    memset(buf, 0, PAGE);
    pthread_mutex_lock(&D.lock);
    uint64_t victim = D.acked > 1 ? D.acked - 1 : 1;
    ssize_t w = pwrite(D.fd, buf, PAGE, (off_t)((victim % D.nslots) * PAGE));
    pthread_mutex_unlock(&D.lock);
    free(buf);
    snprintf(out, n, "{\"injected\":\"lost\",\"seq\":%llu,\"ok\":%s}\n",
             (unsigned long long)victim, w == PAGE ? "true" : "false");
}

static void disk_status(char *out, size_t n) {
    pthread_mutex_lock(&D.lock);
    snprintf(out, n,
             "{\"kind\":\"disk\",\"acked\":%llu,\"first\":%llu,\"slots\":%llu,\"errors\":%llu,"
             "\"last_error\":\"%s\",\"uptime_s\":%.3f,\"bulk_bytes\":%llu}\n",
             (unsigned long long)D.acked, (unsigned long long)D.first,
             (unsigned long long)D.nslots, (unsigned long long)D.errors, D.last_error, now_s(),
             (unsigned long long)bulk_bytes);
    pthread_mutex_unlock(&D.lock);
}

static int disk_open(const char *dev) {
    /* O_DSYNC: a write returns only once the device says it is stable, so "acked" is honest. */
    D.fd = open(dev, O_RDWR | O_DIRECT | O_DSYNC | O_CLOEXEC);
    if (D.fd < 0) {
        console("QM disk: cannot open %s: %s", dev, strerror(errno));
        return -1;
    }
    uint64_t size = 0;
    struct stat st;
    /* A block device in the guest; a plain file when run natively by the tests. */
    if (ioctl(D.fd, BLKGETSIZE64, &size) < 0 && fstat(D.fd, &st) == 0) size = (uint64_t)st.st_size;
    if (size < 16 * PAGE) {
        console("QM disk: %s too small or unreadable", dev);
        return -1;
    }
    D.nslots = size / PAGE;
    if (D.nslots > (1u << 20)) D.nslots = 1u << 20;
    /* Resume after the newest record on the device, so a reboot or a cold move continues the
     * sequence instead of overwriting it. */
    /* Scan in 1 MiB reads: 4 KiB direct reads of a whole disk are slow under emulation. */
    const size_t chunk = 256 * PAGE;
    uint8_t *big;
    if (posix_memalign((void **)&big, PAGE, chunk) != 0) return -1;
    uint64_t newest = 0;
    for (uint64_t s = 0; s < D.nslots; s += 256) {
        ssize_t r = pread(D.fd, big, chunk, (off_t)(s * PAGE));
        if (r <= 0) break;
        for (uint64_t k = 0; k < (uint64_t)r / PAGE; k++) {
            const uint64_t *w = (const uint64_t *)(big + k * PAGE);
            if (w[0] == DISK_MAGIC && w[2] == checksum(w + 4, PAGE / 8 - 4) && w[1] > newest)
                newest = w[1];
        }
    }
    free(big);
    D.acked = newest;
    D.first = newest + 1;
    console("QM disk: %s %llu slots, resuming after record %llu", dev,
            (unsigned long long)D.nslots, (unsigned long long)newest);
    return 0;
}

/* ---------------------------------------------------------------- query server */

enum { Q_MEM = 1, Q_DISK = 2 };

static void *query_conn(void *arg) {
    intptr_t packed = (intptr_t)arg;
    int c = (int)(packed >> 4), kind = (int)(packed & 15);
    /* Separate streams: stdio cannot switch a socket stream between reading and writing. */
    FILE *f = fdopen(c, "r");
    int wc = dup(c);
    FILE *o = wc >= 0 ? fdopen(wc, "w") : NULL;
    if (!f || !o) {
        if (f) fclose(f); else close(c);
        if (wc >= 0 && !o) close(wc);
        return NULL;
    }
    char line[128], out[1024];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (kind == Q_MEM && strcmp(line, "check") == 0)
            mem_status(out, sizeof out, 1);
        else if (kind == Q_MEM && strcmp(line, "status") == 0)
            mem_status(out, sizeof out, 0);
        else if (kind == Q_MEM && strncmp(line, "inject ", 7) == 0)
            mem_inject(out, sizeof out, line + 7);
        else if (kind == Q_DISK && strcmp(line, "verify") == 0)
            disk_verify(out, sizeof out);
        else if (kind == Q_DISK && strcmp(line, "status") == 0)
            disk_status(out, sizeof out);
        else if (kind == Q_DISK && strcmp(line, "inject lost") == 0)
            disk_inject_lost(out, sizeof out);
        else
            snprintf(out, sizeof out, "{\"error\":\"unknown command\"}\n");
        fputs(out, o);
        fflush(o);
    }
    fclose(o);
    fclose(f);
    return NULL;
}

static void serve_queries(int port, int kind) {
    int s = listen_tcp(port);
    if (s < 0) {
        console("QM query: cannot listen on %d: %s", port, strerror(errno));
        return;
    }
    for (;;) {
        int c = accept4(s, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) continue;
        pthread_t t;
        if (pthread_create(&t, NULL, query_conn, (void *)(((intptr_t)c << 4) | kind)) != 0) {
            close(c);
            continue;
        }
        pthread_detach(t);
    }
}

static void *mem_query_thread(void *arg) {
    serve_queries((int)(intptr_t)arg, Q_MEM);
    return NULL;
}

static int run_mem(double fill_mib, double dirty, int port, double check_every, double hot_mib) {
    M.npages = (uint64_t)(fill_mib * 256.0);
    if (M.npages < 1) M.npages = 1;
    M.hot_pages = hot_mib > 0 ? (uint64_t)(hot_mib * 256.0) : 0;
    if (M.hot_pages > M.npages) M.hot_pages = M.npages;
    M.dirty_mib_s = dirty;
    M.seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    M.base = mmap(NULL, M.npages * PAGE, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (M.base == MAP_FAILED) {
        console("QM mem: cannot map %.0f MiB: %s", fill_mib, strerror(errno));
        return 1;
    }
    pthread_t t;
    pthread_create(&t, NULL, mem_workload, NULL);
    if (check_every > 0) {
        /* Periodic self-checks land on the serial console for operators watching a guest. */
        pthread_t q;
        pthread_create(&q, NULL, mem_query_thread, (void *)(intptr_t)port);
        char out[1024];
        for (;;) {
            sleep_s(check_every);
            mem_status(out, sizeof out, 1);
        }
    }
    serve_queries(port, Q_MEM);
    return 1;
}

/* Bulk load: 1 MiB direct writes (not synced one by one) over the disk's second half, paced
 * at BULK.rate bytes/s, round and round: what a busy guest writes while its disk moves. The
 * records keep to the first half, so the load never touches what is verified. */
struct bulk_state {
    const char *dev;
    double rate;
    uint64_t from, to; /* byte range */
};
static struct bulk_state BULK;

static void *bulk_writer(void *unused) {
    (void)unused;
    const size_t chunk = 256 * PAGE;
    uint8_t *buf;
    if (posix_memalign((void **)&buf, PAGE, chunk) != 0) return NULL;
    int fd = open(BULK.dev, O_WRONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0) {
        console("QM disk: bulk writer cannot open %s: %s", BULK.dev, strerror(errno));
        return NULL;
    }
    uint64_t s = DISK_MAGIC ^ 0x5bd1e995ULL, off = BULK.from;
    double start = now_s(), written = 0;
    for (;;) {
        for (size_t i = 0; i < chunk / 8; i++) ((uint64_t *)buf)[i] = xorshift(&s);
        if (pwrite(fd, buf, chunk, (off_t)off) == (ssize_t)chunk) {
            written += (double)chunk;
            bulk_bytes += chunk;
        }
        off += chunk;
        if (off + chunk > BULK.to) off = BULK.from;
        double ahead = written / BULK.rate - (now_s() - start);
        if (ahead > 0) sleep_s(ahead);
    }
    return NULL;
}

static int run_disk(const char *dev, double rate, int port, double bulk_mib_s) {
    D.rate = rate;
    if (disk_open(dev) < 0) return 1;
    if (bulk_mib_s > 0) {
        /* Records in the first half from now on (their slots wrap there). */
        uint64_t half = D.nslots / 2;
        BULK = (struct bulk_state){dev, bulk_mib_s * 1048576.0, half * PAGE, D.nslots * PAGE};
        D.nslots = half;
        pthread_t b;
        pthread_create(&b, NULL, bulk_writer, NULL);
    }
    pthread_t t;
    pthread_create(&t, NULL, disk_writer, NULL);
    serve_queries(port, Q_DISK);
    return 1;
}

/* ---------------------------------------------------------------- power button */

static int run_powerbtn(void) {
    /* ACPI power button (QMP system_powerdown) arrives as KEY_POWER on an evdev device. */
    char path[64];
    int fds[16], nfd = 0;
    for (int i = 0; i < 16 && nfd < 16; i++) {
        snprintf(path, sizeof path, "/dev/input/event%d", i);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) fds[nfd++] = fd;
    }
    if (nfd == 0) {
        console("QM powerbtn: no input devices");
        return 1;
    }
    for (;;) {
        fd_set rs;
        FD_ZERO(&rs);
        int maxfd = 0;
        for (int i = 0; i < nfd; i++) {
            FD_SET(fds[i], &rs);
            if (fds[i] > maxfd) maxfd = fds[i];
        }
        if (select(maxfd + 1, &rs, NULL, NULL, NULL) < 0) continue;
        for (int i = 0; i < nfd; i++) {
            if (!FD_ISSET(fds[i], &rs)) continue;
            struct input_event ev;
            if (read(fds[i], &ev, sizeof ev) == sizeof ev && ev.type == EV_KEY &&
                ev.code == KEY_POWER && ev.value == 1) {
                console("QM powerbtn: power button pressed, powering off");
                sync();
                reboot(RB_POWER_OFF);
            }
        }
    }
}

/* CPU load: busy PERCENT of every 100 ms, asleep the rest (a VM with steady CPU demand, which
 * the host sees as its QEMU process's CPU use). */
static int run_cpu(double percent) {
    if (percent <= 0) return 0;
    if (percent > 100) percent = 100;
    const double period = 0.1, busy = period * percent / 100.0;
    volatile uint64_t spin = 0;
    for (;;) {
        double start = now_s();
        while (now_s() - start < busy) spin++;
        if (busy < period) sleep_s(period - (now_s() - start));
    }
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "echo") == 0) return run_echo(atoi(argv[2]));
    /* HOT_MIB is optional (older /init scripts pass five arguments): no hot set. */
    if (argc >= 6 && strcmp(argv[1], "mem") == 0)
        return run_mem(atof(argv[2]), atof(argv[3]), atoi(argv[4]), atof(argv[5]),
                       argc >= 7 ? atof(argv[6]) : 0.0);
    if (argc >= 5 && strcmp(argv[1], "disk") == 0)
        return run_disk(argv[2], atof(argv[3]), atoi(argv[4]), argc >= 6 ? atof(argv[5]) : 0.0);
    if (argc >= 2 && strcmp(argv[1], "powerbtn") == 0) return run_powerbtn();
    if (argc >= 3 && strcmp(argv[1], "cpu") == 0) return run_cpu(atof(argv[2]));
    fprintf(stderr,
            "usage: qmguest echo PORT | mem FILL_MIB DIRTY_MIB_S PORT CHECK_EVERY_S [HOT_MIB] |"
            " disk DEV RECORDS_PER_S PORT [BULK_MIB_S] | powerbtn | cpu PERCENT\n");
    return 2;
}
