/*
 * echoload: the load generator of the maccept benchmarks.
 *
 * It drives an RFC 862 echo server over loopback TCP from several threads,
 * each with its own epoll instance and its own share of the connections, and
 * prints one JSON object on stdout when the run ends.
 *
 * Modes:
 *   rr     request/response: every connection sends SIZE bytes, waits for the
 *          whole echo, compares every byte with what it sent, and repeats.  The
 *          payload is a pseudo-random pattern seeded by the connection number
 *          and the request number, so a server that echoes stale or misrouted
 *          bytes is caught.
 *   churn  connection churn: connect, send SIZE bytes (64 by default), read them
 *          back, shut down the sending side and read until the server closes
 *          (a byte after the echo is a mismatch), close, and start over.
 *          Client sockets are bound to one of SOURCES loopback addresses
 *          (127.0.0.2, 127.0.0.3, ...) so that the client ports left in
 *          TIME_WAIT do not cap the rate.
 *   burst  open CONNECTIONS connections as fast as possible, send one byte on
 *          each and hold them for the duration once it is echoed; the caller
 *          counts what the server did with them.  A line "# open N" on stderr
 *          says when every connect has finished, "# served N" (how many had
 *          their byte back) when every connection has had it back or failed,
 *          or half the duration has passed.  burst_lag_us in the report: from
 *          the last connect to finish to the last echo, what the server added
 *          to the burst.
 *
 * Output fields: requests completed in the measured window, rps, mib_s (payload
 * echoed back per second, one direction), latency p50_us / p99_us / p999_us /
 * max_us from the first byte sent to the last byte of the echo (churn and burst:
 * from connect(), so a burst's latency includes the wait to be accepted; each
 * clamped to the smallest and largest latency seen, since a bucket's middle can
 * lie beyond them), errors (connections that broke), connect_failures,
 * mismatches (requests whose echo differed from what was sent), stalled,
 * client_cpu_s and first_error.
 *
 * stalled (rr and churn): connections whose request had been sent and its echo
 * not completed (churn: or the server had not closed after it) when the run
 * ended for more than STALL_SECONDS (1 s), or three times the slowest echo
 * the thread saw if that is longer: a server that drops a byte or never
 * answers would otherwise leave them waiting unnoticed.  A second is hundreds of times a loopback echo's usual latency,
 * and the clock starts when the request is sent, so a connect() slowed by
 * dropped SYNs does not count.  A run shorter than that cannot see a stall.
 *
 * Only requests that complete inside the measured window (after the warm-up)
 * count towards requests, rps and the latency percentiles, and only those
 * whose echo was right: a wrong echo is a mismatch, not a request served
 * (churn: complete once the server has closed after the echo; the latency
 * still ends at the echo's last byte).  errors,
 * connect_failures and mismatches count over the whole run; first_error says
 * what broke first (the earliest over all threads) and when (for a wrong
 * echo, the first byte that differs), and client_cpu_s
 * how much CPU the client itself used (near threads x elapsed means the
 * client, not the server, is the limit).  The exit status is 1 when any echo
 * differed from what was sent or stalled, 2 on a usage error.
 * SIGTERM or SIGINT ends a run early; it still reports what it measured.
 *
 * Build: cc -O2 -pthread -o echoload echoload.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum mode { MODE_RR, MODE_CHURN, MODE_BURST };

struct options {
    enum mode mode;
    int connections;
    int threads;
    size_t size;
    int sources;
    double duration;
    double warmup;
    struct sockaddr_in target;
};

/* ---------------------------------------------------------------- clock */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Set by SIGTERM or SIGINT: end the run early, but still report. */
static volatile sig_atomic_t interrupted;

static void on_signal(int signum)
{
    (void)signum;
    interrupted = 1;
}

/* Sleep in short slices so that a signal ends the wait promptly. */
static void sleep_seconds(double seconds)
{
    uint64_t deadline = now_ns() + (uint64_t)(seconds > 0 ? seconds * 1e9 : 0);
    while (!interrupted) {
        uint64_t now = now_ns();
        if (now >= deadline)
            return;
        uint64_t slice = deadline - now < 10000000u ? deadline - now : 10000000u;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)slice};
        nanosleep(&ts, NULL);
    }
}

/* ------------------------------------------------------------ histogram */

/*
 * Latencies in microseconds, in log-linear buckets: values below 2 * SUB are
 * exact, above that every power of two is split into SUB buckets, so a
 * percentile is within 1 / SUB (3%) of the true value at any scale.
 */
#define SUB_BITS 5
#define SUB (1 << SUB_BITS)
#define BUCKETS ((64 - SUB_BITS + 1) * SUB)

struct histogram {
    uint64_t counts[BUCKETS];
    uint64_t total;
    uint64_t min; /* meaningful only when total > 0 */
    uint64_t max;
};

static int bucket_of(uint64_t value)
{
    if (value < SUB)
        return (int)value;
    int shift = 63 - __builtin_clzll(value) - SUB_BITS;
    return (shift + 1) * SUB + (int)((value >> shift) - SUB);
}

static double bucket_middle(int index)
{
    if (index < SUB)
        return index;
    int shift = index / SUB - 1;
    uint64_t low = (uint64_t)(index % SUB + SUB) << shift;
    return (double)low + (double)((1ull << shift) - 1) / 2.0;
}

static void histogram_add(struct histogram *h, uint64_t micros)
{
    h->counts[bucket_of(micros)]++;
    if (h->total == 0 || micros < h->min)
        h->min = micros;
    h->total++;
    if (micros > h->max)
        h->max = micros;
}

static void histogram_merge(struct histogram *into, const struct histogram *from)
{
    for (int i = 0; i < BUCKETS; i++)
        into->counts[i] += from->counts[i];
    if (from->total > 0 && (into->total == 0 || from->min < into->min))
        into->min = from->min;
    into->total += from->total;
    if (from->max > into->max)
        into->max = from->max;
}

/* A bucket's middle, within what was seen: p99.9 never above max. */
static double clamp_seen(const struct histogram *h, double value)
{
    if (value > (double)h->max)
        return (double)h->max;
    if (value < (double)h->min)
        return (double)h->min;
    return value;
}

static double histogram_percentile(const struct histogram *h, double fraction)
{
    if (h->total == 0)
        return 0;
    uint64_t rank = (uint64_t)(fraction * (double)h->total);
    if (rank >= h->total)
        rank = h->total - 1;
    uint64_t seen = 0;
    for (int i = 0; i < BUCKETS; i++) {
        seen += h->counts[i];
        if (seen > rank)
            return clamp_seen(h, bucket_middle(i));
    }
    return clamp_seen(h, bucket_middle(BUCKETS - 1));
}

/* ------------------------------------------------------------- run state */

/* Written by the main thread, read by the workers without locks. */
static volatile int measuring;
static volatile int stopping;
/* When the threads started, to say when the first error happened. */
static uint64_t run_started_ns;
/* Burst mode: connects that have finished, one way or the other. */
static int settled;
/* Burst mode: connections whose byte came back, or that failed first. */
static int finished;
/* Burst mode: connections whose byte came back. */
static int echoed;
/* Burst mode: when the last connect finished and the last echo came. */
static uint64_t last_connected_ns, last_echoed_ns;

static void note_latest(uint64_t *latest, uint64_t ns)
{
    uint64_t seen = __atomic_load_n(latest, __ATOMIC_RELAXED);
    while (seen < ns &&
           !__atomic_compare_exchange_n(latest, &seen, ns, false, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED))
        ;
}

enum conn_state { CONN_IDLE, CONN_CONNECTING, CONN_ACTIVE, CONN_RETRY };

struct worker;

struct conn {
    struct worker *worker;
    int fd;
    uint32_t id;
    enum conn_state state;
    uint32_t events;
    uint64_t sequence;
    size_t sent;
    size_t received;
    bool corrupt;
    bool draining; /* churn: the echo is in, the write side shut; reading to EOF */
    bool counted_settled;
    bool counted_finished;
    uint64_t started_ns;
    uint64_t asked_ns; /* when the request now outstanding was started */
    uint64_t echoed_ns; /* churn: when the echo's last byte came, while draining */
    uint64_t retry_at_ns;
    unsigned char *payload;
};

struct worker {
    const struct options *options;
    pthread_t thread;
    int epoll_fd;
    struct conn *conns;
    int count;
    int retrying;
    unsigned char *scratch;
    size_t scratch_size;
    struct histogram histogram;
    uint64_t requests;
    uint64_t errors;
    uint64_t connect_failures;
    uint64_t mismatches;
    uint64_t stalled;
    uint64_t slowest_ns; /* the longest any request took to be echoed, warm-up too */
    char first_error[96]; /* what broke first, to tell a server bug from a full queue */
    uint64_t first_error_ns;
};

#define RETRY_DELAY_NS 10000000u
/*
 * A request unanswered for this long when the run ends has stalled, or for
 * STALL_SLOWEST times the slowest echo its thread saw, whichever is longer: a
 * correct server that is slow (256 KiB messages) takes seconds at times.
 */
#define STALL_SECONDS 1
#define STALL_NS (STALL_SECONDS * 1000000000ull)
#define STALL_SLOWEST 3
#define MAX_EVENTS 256

static void fatal(const char *format, ...)
{
    va_list args;
    va_start(args, format);
    fputs("echoload: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
    exit(2);
}

static void *allocate(size_t size)
{
    void *p = calloc(1, size);
    if (p == NULL)
        fatal("out of memory");
    return p;
}

/* ------------------------------------------------------------- payloads */

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* A new pattern for every (connection, request) pair. */
static void fill_payload(struct conn *c)
{
    uint64_t state = ((uint64_t)c->id << 40) ^ c->sequence;
    size_t size = c->worker->options->size;
    size_t i = 0;
    for (; i + 8 <= size; i += 8) {
        uint64_t word = splitmix64(&state);
        memcpy(c->payload + i, &word, 8);
    }
    uint64_t word = splitmix64(&state);
    memcpy(c->payload + i, &word, size - i);
}

/* -------------------------------------------------------- connections */

static void watch(struct conn *c, uint32_t events)
{
    if (c->events == events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    int op = c->events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    if (epoll_ctl(c->worker->epoll_fd, op, c->fd, &ev) == -1)
        fatal("epoll_ctl: %s", strerror(errno));
    c->events = events;
}

static void close_conn(struct conn *c)
{
    if (c->fd >= 0)
        close(c->fd); /* closing also removes it from the epoll set */
    c->fd = -1;
    c->events = 0;
    c->state = CONN_IDLE;
    c->draining = false;
}

static void schedule_retry(struct conn *c)
{
    close_conn(c);
    c->state = CONN_RETRY;
    c->retry_at_ns = now_ns() + RETRY_DELAY_NS;
    c->worker->retrying++;
}

static void settle(struct conn *c)
{
    if (c->worker->options->mode == MODE_BURST && !c->counted_settled) {
        c->counted_settled = true;
        __atomic_add_fetch(&settled, 1, __ATOMIC_RELEASE);
    }
}

static void finish_burst(struct conn *c)
{
    if (c->worker->options->mode == MODE_BURST && !c->counted_finished) {
        c->counted_finished = true;
        __atomic_add_fetch(&finished, 1, __ATOMIC_RELEASE);
    }
}

/* Remember the first thing that went wrong in this thread. */
static void note_error(struct worker *w, const char *what, int error)
{
    if (w->first_error[0] != '\0')
        return;
    w->first_error_ns = now_ns();
    double at = (double)(w->first_error_ns - run_started_ns) / 1e9;
    if (error < 0)
        snprintf(w->first_error, sizeof w->first_error, "%s at %.3f s", what, at);
    else
        snprintf(w->first_error, sizeof w->first_error, "%s: %s at %.3f s", what,
                 error ? strerror(error) : "end of stream", at);
}

static void connect_failed(struct conn *c, const char *what, int error)
{
    note_error(c->worker, what, error);
    c->worker->connect_failures++;
    settle(c);
    finish_burst(c);
    if (c->worker->options->mode == MODE_BURST)
        close_conn(c); /* a burst tries each connection once */
    else
        schedule_retry(c);
}

static void broken(struct conn *c, const char *what, int error)
{
    note_error(c->worker, what, error);
    c->worker->errors++;
    finish_burst(c);
    if (c->worker->options->mode == MODE_BURST)
        close_conn(c);
    else
        schedule_retry(c);
}

/* Churn spreads the client over SOURCES addresses: 127.0.0.2, .3, ... */
static int bind_source(int fd, const struct conn *c)
{
    const struct options *o = c->worker->options;
    int one = 1;
    struct sockaddr_in source = {.sin_family = AF_INET};
    source.sin_addr.s_addr = htonl(0x7f000002u + c->id % (uint32_t)o->sources);
    /* Pick the port at connect(), per destination, where TIME_WAIT can be reused. */
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    return bind(fd, (struct sockaddr *)&source, sizeof source);
}

static void start_connect(struct conn *c)
{
    const struct options *o = c->worker->options;
    int one = 1;
    c->started_ns = now_ns();
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd == -1)
        fatal("socket: %s", strerror(errno));
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (o->mode == MODE_CHURN && bind_source(c->fd, c) == -1) {
        connect_failed(c, "bind", errno);
        return;
    }
    if (connect(c->fd, (const struct sockaddr *)&o->target, sizeof o->target) == -1 &&
        errno != EINPROGRESS) {
        connect_failed(c, "connect", errno);
        return;
    }
    c->state = CONN_CONNECTING;
    watch(c, EPOLLOUT);
}

/* Send what the socket takes; ask for EPOLLOUT only while some is left. */
static void pump_send(struct conn *c)
{
    size_t size = c->worker->options->size;
    while (c->sent < size) {
        ssize_t n = send(c->fd, c->payload + c->sent, size - c->sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->sent += (size_t)n;
        } else if (n == -1 && errno == EINTR) {
            continue;
        } else if (n == -1 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            broken(c, "send", n == 0 ? 0 : errno);
            return;
        }
    }
    watch(c, EPOLLIN | (c->sent < size ? EPOLLOUT : 0));
}

static void start_request(struct conn *c)
{
    c->sequence++;
    fill_payload(c);
    c->sent = 0;
    c->received = 0;
    c->corrupt = false;
    c->asked_ns = now_ns();
    if (c->worker->options->mode == MODE_RR)
        c->started_ns = c->asked_ns; /* churn times connect + echo */
    pump_send(c);
}

/*
 * The request's echo is complete (ECHOED_NS: its last byte), and in churn
 * the server has closed after it.  A wrong echo is a mismatch only: counted
 * as a request served, it would raise the rate and lower the latency of a
 * server that answers garbage.
 */
static void request_done(struct conn *c, uint64_t echoed_ns)
{
    struct worker *w = c->worker;
    uint64_t took = echoed_ns - c->asked_ns;
    if (took > w->slowest_ns)
        w->slowest_ns = took;
    if (c->corrupt) {
        w->mismatches++;
    } else if (measuring && !stopping) {
        w->requests++;
        histogram_add(&w->histogram, (echoed_ns - c->started_ns) / 1000u);
    }
    if (w->options->mode == MODE_CHURN) {
        close_conn(c);
        start_connect(c);
    } else {
        start_request(c);
    }
}

static void on_connected(struct conn *c)
{
    int error = 0;
    socklen_t length = sizeof error;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &error, &length) == -1 || error != 0) {
        connect_failed(c, "connect", error ? error : errno);
        return;
    }
    c->state = CONN_ACTIVE;
    if (c->worker->options->mode == MODE_BURST) {
        /* One byte, to time when the server has accepted and served it. */
        settle(c);
        note_latest(&last_connected_ns, now_ns());
        c->payload[0] = (unsigned char)(c->id * 31u + 7u);
        c->sent = 1;
        c->received = 0;
        if (send(c->fd, c->payload, 1, MSG_NOSIGNAL) != 1) {
            broken(c, "send", errno);
            return;
        }
        watch(c, EPOLLIN | EPOLLRDHUP);
        return;
    }
    start_request(c);
}

/*
 * Churn, once the whole echo is in: shut down the sending side, so that the
 * server closes its end, and read until it has.  A server that echoes more
 * than it was sent would otherwise pass, since the client closes with the
 * extra bytes unread.
 */
static void start_drain(struct conn *c, uint64_t echoed_ns)
{
    if (shutdown(c->fd, SHUT_WR) == -1) {
        broken(c, "shutdown", errno);
        return;
    }
    c->draining = true;
    c->echoed_ns = echoed_ns;
    /* epoll says when the end of stream comes: a recv() now would find nothing. */
}

/* Churn, after start_drain: the end of stream completes the request. */
static void on_drain(struct conn *c)
{
    struct worker *w = c->worker;
    for (;;) {
        ssize_t n = recv(c->fd, w->scratch, w->scratch_size, 0);
        if (n == 0) {
            c->draining = false;
            request_done(c, c->echoed_ns);
            return;
        }
        if (n > 0) {
            w->mismatches++;
            broken(c, "echo longer than the request (bytes after it)", -1);
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            broken(c, "recv", errno);
        return;
    }
}

/* Say where the first echo that differs from its request differs, and mark it. */
static void note_corrupt(struct conn *c, const unsigned char *echo, size_t length)
{
    if (c->corrupt)
        return; /* the first difference of this echo is noted already */
    c->corrupt = true;
    const unsigned char *sent = c->payload + c->received;
    size_t at = 0;
    while (at < length && echo[at] == sent[at])
        at++;
    char what[80];
    snprintf(what, sizeof what, "echo differs from the request at byte %zu", c->received + at);
    note_error(c->worker, what, -1);
}

/* Read the echo, comparing every byte with the payload we sent. */
static void on_readable(struct conn *c)
{
    struct worker *w = c->worker;
    size_t size = w->options->size;
    if (c->draining) {
        on_drain(c);
        return;
    }
    for (;;) {
        size_t want = size - c->received;
        if (want == 0 || w->options->mode == MODE_BURST)
            want = w->scratch_size; /* anything here is unexpected */
        if (want > w->scratch_size)
            want = w->scratch_size;
        ssize_t n = recv(c->fd, w->scratch, want, 0);
        if (n == 0 || (n == -1 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            broken(c, "recv", n == 0 ? 0 : errno);
            return;
        }
        if (n == -1) {
            if (errno == EINTR)
                continue;
            return;
        }
        if (w->options->mode == MODE_BURST && c->received == 0 && n == 1 &&
            w->scratch[0] == c->payload[0]) {
            c->received = 1;
            w->requests++;
            uint64_t now = now_ns();
            histogram_add(&w->histogram, (now - c->started_ns) / 1000u);
            note_latest(&last_echoed_ns, now);
            __atomic_add_fetch(&echoed, 1, __ATOMIC_RELEASE);
            finish_burst(c);
            continue; /* anything more is unexpected */
        }
        if (w->options->mode == MODE_BURST && c->received == 0 && w->scratch[0] != c->payload[0]) {
            /* Not the byte sent: the echo is wrong, not too long. */
            w->mismatches++;
            broken(c, "echo differs from the byte sent", -1);
            return;
        }
        if (w->options->mode == MODE_BURST || c->received + (size_t)n > c->sent) {
            /* More than we sent: the echo is out of step with our requests. */
            w->mismatches++;
            broken(c, "echo longer than the request", -1);
            return;
        }
        if (memcmp(w->scratch, c->payload + c->received, (size_t)n) != 0)
            note_corrupt(c, w->scratch, (size_t)n);
        c->received += (size_t)n;
        if (c->received == size) {
            if (w->options->mode == MODE_CHURN && !c->corrupt)
                start_drain(c, now_ns());
            else
                request_done(c, now_ns());
            return; /* the next echo cannot be here yet: epoll will say when */
        }
        if ((size_t)n < want)
            return; /* drained; saves a recv() that would only say EAGAIN */
    }
}

static void on_event(struct conn *c, uint32_t events)
{
    if (c->state == CONN_CONNECTING) {
        on_connected(c);
        return;
    }
    if (c->state != CONN_ACTIVE)
        return;
    if (c->worker->options->mode == MODE_BURST) {
        if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
            on_readable(c);
        return;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        on_readable(c);
        if (c->state != CONN_ACTIVE)
            return;
    }
    if (events & EPOLLOUT)
        pump_send(c);
}

static void run_retries(struct worker *w)
{
    uint64_t now = now_ns();
    for (int i = 0; i < w->count && w->retrying > 0; i++) {
        struct conn *c = &w->conns[i];
        if (c->state == CONN_RETRY && c->retry_at_ns <= now) {
            w->retrying--;
            c->state = CONN_IDLE;
            start_connect(c);
        }
    }
}

/*
 * At the end of the run, in the thread that owns them: connections whose
 * request has waited more than STALL_NS for its echo.  Nothing else would
 * tell a server that lost a byte from one that is slow.
 */
static void count_stalled(struct worker *w)
{
    if (w->options->mode == MODE_BURST)
        return; /* held on purpose; the burst counts what was served */
    uint64_t now = now_ns();
    uint64_t bound = STALL_SLOWEST * w->slowest_ns > STALL_NS ? STALL_SLOWEST * w->slowest_ns
                                                                : STALL_NS;
    uint64_t unclosed = 0; /* churn: echoed, but the server never closed */
    for (int i = 0; i < w->count; i++) {
        const struct conn *c = &w->conns[i];
        if (c->state == CONN_ACTIVE && now - c->asked_ns > bound) {
            w->stalled++;
            unclosed += c->draining;
        }
    }
    if (w->stalled > 0) {
        char what[80];
        snprintf(what, sizeof what, "%s (none for over %.1f s), found",
                 unclosed == w->stalled ? "no close after the echo" : "echo stalled",
                 (double)bound / 1e9);
        note_error(w, what, -1);
    }
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct epoll_event events[MAX_EVENTS];
    for (int i = 0; i < w->count; i++)
        start_connect(&w->conns[i]);
    while (!stopping) {
        int n = epoll_wait(w->epoll_fd, events, MAX_EVENTS, 10);
        if (n == -1 && errno != EINTR)
            fatal("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n && !stopping; i++)
            on_event(events[i].data.ptr, events[i].events);
        if (w->retrying > 0)
            run_retries(w);
    }
    count_stalled(w);
    for (int i = 0; i < w->count; i++)
        close_conn(&w->conns[i]);
    return NULL;
}

/* --------------------------------------------------------------- setup */

static void setup_workers(struct worker *workers, const struct options *o)
{
    size_t scratch = o->size < 65536 ? 65536 : o->size;
    for (int t = 0; t < o->threads; t++) {
        struct worker *w = &workers[t];
        w->options = o;
        w->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        if (w->epoll_fd == -1)
            fatal("epoll_create1: %s", strerror(errno));
        w->count = o->connections / o->threads + (t < o->connections % o->threads);
        w->conns = allocate(sizeof(struct conn) * (size_t)(w->count ? w->count : 1));
        w->scratch_size = scratch;
        w->scratch = allocate(scratch);
    }
    /* Connection i belongs to thread i % threads. */
    for (int i = 0; i < o->connections; i++) {
        struct worker *w = &workers[i % o->threads];
        struct conn *c = &w->conns[i / o->threads];
        c->worker = w;
        c->fd = -1;
        c->id = (uint32_t)i;
        c->payload = allocate(o->size + 8);
    }
}

static void wait_for_burst(const struct options *o, double limit)
{
    uint64_t deadline = now_ns() + (uint64_t)(limit * 1e9);
    while (__atomic_load_n(&settled, __ATOMIC_ACQUIRE) < o->connections && now_ns() < deadline &&
           !interrupted)
        sleep_seconds(0.001);
    fprintf(stderr, "# open %d\n", __atomic_load_n(&settled, __ATOMIC_ACQUIRE));
    fflush(stderr);
    while (__atomic_load_n(&finished, __ATOMIC_ACQUIRE) < o->connections &&
           now_ns() < deadline && !interrupted)
        sleep_seconds(0.001);
    fprintf(stderr, "# served %d\n", __atomic_load_n(&echoed, __ATOMIC_ACQUIRE));
    fflush(stderr);
}

static double run(struct worker *workers, const struct options *o)
{
    run_started_ns = now_ns();
    for (int t = 0; t < o->threads; t++)
        if (pthread_create(&workers[t].thread, NULL, worker_main, &workers[t]) != 0)
            fatal("pthread_create failed");
    uint64_t began = now_ns();
    if (o->mode == MODE_BURST) {
        measuring = 1;
        /* At most half the time waiting, so that the connections are
         * still held for the caller to count when the wait ends. */
        wait_for_burst(o, o->duration / 2);
        double spent = (double)(now_ns() - began) / 1e9;
        sleep_seconds(o->duration - spent);
        measuring = 0;
        stopping = 1;
        for (int t = 0; t < o->threads; t++)
            pthread_join(workers[t].thread, NULL);
        return spent > 0 ? spent : 1e-9;
    }
    sleep_seconds(o->warmup);
    uint64_t start = now_ns();
    measuring = 1;
    sleep_seconds(o->duration);
    measuring = 0;
    uint64_t end = now_ns();
    stopping = 1;
    for (int t = 0; t < o->threads; t++)
        pthread_join(workers[t].thread, NULL);
    return (double)(end - start) / 1e9;
}

static const char *mode_name(enum mode mode)
{
    return mode == MODE_RR ? "rr" : mode == MODE_CHURN ? "churn" : "burst";
}

static double cpu_seconds(void)
{
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return (double)usage.ru_utime.tv_sec + (double)usage.ru_utime.tv_usec / 1e6 +
           (double)usage.ru_stime.tv_sec + (double)usage.ru_stime.tv_usec / 1e6;
}

/* One JSON object on stdout; see the comment at the top for the fields. */
static int report(struct worker *workers, const struct options *o, double seconds)
{
    struct histogram *all = allocate(sizeof *all);
    struct worker sum = {0};
    const struct worker *first = NULL; /* the thread whose error came first */
    for (int t = 0; t < o->threads; t++) {
        struct worker *w = &workers[t];
        histogram_merge(all, &w->histogram);
        sum.requests += w->requests;
        sum.errors += w->errors;
        sum.connect_failures += w->connect_failures;
        sum.mismatches += w->mismatches;
        sum.stalled += w->stalled;
        if (w->first_error[0] && (first == NULL || w->first_error_ns < first->first_error_ns))
            first = w;
    }
    const char *first_error = first ? first->first_error : NULL;
    double rps = (double)sum.requests / seconds;
    double mib_s = o->mode == MODE_BURST ? 0 : rps * (double)o->size / 1048576.0;
    printf("{\"mode\": \"%s\", \"connections\": %d, \"threads\": %d, \"size\": %zu, "
           "\"seconds\": %.3f, \"requests\": %llu, \"rps\": %.1f, \"mib_s\": %.2f, ",
           mode_name(o->mode), o->connections, o->threads, o->size, seconds,
           (unsigned long long)sum.requests, rps, mib_s);
    printf("\"p50_us\": %.0f, \"p99_us\": %.0f, \"p999_us\": %.0f, \"max_us\": %llu, ",
           histogram_percentile(all, 0.50), histogram_percentile(all, 0.99),
           histogram_percentile(all, 0.999), (unsigned long long)all->max);
    printf("\"errors\": %llu, \"connect_failures\": %llu, \"mismatches\": %llu, "
           "\"stalled\": %llu, \"client_cpu_s\": %.2f, ",
           (unsigned long long)sum.errors, (unsigned long long)sum.connect_failures,
           (unsigned long long)sum.mismatches, (unsigned long long)sum.stalled, cpu_seconds());
    if (o->mode == MODE_BURST) {
        uint64_t connected = __atomic_load_n(&last_connected_ns, __ATOMIC_ACQUIRE);
        uint64_t served = __atomic_load_n(&last_echoed_ns, __ATOMIC_ACQUIRE);
        printf("\"burst_lag_us\": %llu, ",
               (unsigned long long)(served > connected ? (served - connected) / 1000u : 0));
    }
    if (first_error)
        printf("\"first_error\": \"%s\"}\n", first_error); /* our own text: no quotes */
    else
        printf("\"first_error\": null}\n");
    fflush(stdout);
    free(all);
    return sum.mismatches || sum.stalled ? 1 : 0;
}

/* ------------------------------------------------------------- options */

static void usage(void)
{
    fputs("usage: echoload [-m rr|churn|burst] [-c CONNECTIONS] [-t THREADS] [-s SIZE]\n"
          "                [-d SECONDS] [-w SECONDS] [-a SOURCES] HOST:PORT\n"
          "  -m, --mode         rr (default), churn or burst\n"
          "  -c, --connections  concurrent connections (default 256)\n"
          "  -t, --threads      client threads, each with its own epoll (default 1)\n"
          "  -s, --size         message size in bytes (default 1024; churn 64)\n"
          "  -d, --duration     measured seconds; burst: seconds to hold (default 3)\n"
          "  -w, --warmup       seconds before measuring (default 1; not in burst)\n"
          "  -a, --sources      churn: loopback source addresses 127.0.0.2.. (default 16)\n"
          "HOST must be an IPv4 loopback address (127.0.0.0/8).\n",
          stderr);
    exit(2);
}

static long parse_number(const char *text, long low, long high)
{
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || *end || value < low || value > high)
        fatal("bad number %s (expected %ld..%ld)", text, low, high);
    return value;
}

static double parse_seconds(const char *text)
{
    char *end;
    double value = strtod(text, &end);
    if (*end || value < 0 || value > 3600)
        fatal("bad duration %s", text);
    return value;
}

static void parse_target(const char *text, struct sockaddr_in *target)
{
    char host[64];
    const char *colon = strrchr(text, ':');
    if (colon == NULL || (size_t)(colon - text) >= sizeof host)
        fatal("target must be HOST:PORT, not %s", text);
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = '\0';
    target->sin_family = AF_INET;
    target->sin_port = htons((uint16_t)parse_number(colon + 1, 1, 65535));
    if (inet_pton(AF_INET, host, &target->sin_addr) != 1)
        fatal("HOST must be an IPv4 address, not %s", host);
    if ((ntohl(target->sin_addr.s_addr) >> 24) != 127)
        fatal("refusing to load %s: only loopback (127.0.0.0/8) targets", host);
}

static void parse_options(int argc, char **argv, struct options *o)
{
    static const struct option longs[] = {
        {"mode", required_argument, NULL, 'm'},     {"connections", required_argument, NULL, 'c'},
        {"threads", required_argument, NULL, 't'},  {"size", required_argument, NULL, 's'},
        {"duration", required_argument, NULL, 'd'}, {"warmup", required_argument, NULL, 'w'},
        {"sources", required_argument, NULL, 'a'},  {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    long size = -1;
    *o = (struct options){.mode = MODE_RR, .connections = 256, .threads = 1, .sources = 16,
                          .duration = 3, .warmup = 1};
    int opt;
    while ((opt = getopt_long(argc, argv, "m:c:t:s:d:w:a:h", longs, NULL)) != -1) {
        switch (opt) {
        case 'm':
            if (strcmp(optarg, "rr") == 0)
                o->mode = MODE_RR;
            else if (strcmp(optarg, "churn") == 0)
                o->mode = MODE_CHURN;
            else if (strcmp(optarg, "burst") == 0)
                o->mode = MODE_BURST;
            else
                usage();
            break;
        case 'c': o->connections = (int)parse_number(optarg, 1, 100000); break;
        case 't': o->threads = (int)parse_number(optarg, 1, 1024); break;
        case 's': size = parse_number(optarg, 1, 64L << 20); break;
        case 'd': o->duration = parse_seconds(optarg); break;
        case 'w': o->warmup = parse_seconds(optarg); break;
        case 'a': o->sources = (int)parse_number(optarg, 1, 250); break;
        default: usage();
        }
    }
    if (optind != argc - 1)
        usage();
    parse_target(argv[optind], &o->target);
    o->size = (size_t)(size > 0 ? size : o->mode == MODE_CHURN ? 64 : 1024);
    if (o->threads > o->connections)
        o->threads = o->connections;
    if (o->mode == MODE_BURST)
        o->warmup = 0;
}

int main(int argc, char **argv)
{
    struct options o;
    parse_options(argc, argv, &o);
    struct sigaction action = {.sa_handler = on_signal};
    sigemptyset(&action.sa_mask);
    sigaction(SIGTERM, &action, NULL);
    sigaction(SIGINT, &action, NULL);
    struct worker *workers = allocate(sizeof(struct worker) * (size_t)o.threads);
    setup_workers(workers, &o);
    double seconds = run(workers, &o);
    return report(workers, &o, seconds);
}
