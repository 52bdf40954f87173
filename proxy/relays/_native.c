/* proxy.relays._native: a TCP mapping's connections relayed in C (issue 17).
 *
 * Why: with the relay in Python, a short connection costs ~130,000 user-space instructions
 * (CPython, uvloop, the protocol objects), twice Go's, for the same system calls. Here the
 * accept, the dial and the relay of every connection of one listener run in C, behind one
 * epoll set; the event loop sees only that set's fd (loop.add_reader) and calls Relay.run()
 * when it is ready, so Python runs once per wake-up, not per connection or per read.
 *
 * What it keeps of the Python relay (proxy/relays/tcp.py), rule for rule:
 *   - one backend connection per client, dialled after the accept, with TCP_NODELAY and
 *     keepalive; the client's early bytes wait in its socket until the dial is done;
 *   - -dial-timeout (a dial still under way then fails: "timed out"), -max-conns (a client
 *     over the cap is reset), a failed dial resets its client;
 *   - half-close: a FIN is passed on once what was read before it is written, and both sockets
 *     close once both directions have ended; an error (a reset) on one side is a reset on the
 *     other (SO_LINGER 0);
 *   - backpressure: a direction whose bytes could not all be written stops reading until they
 *     are; at most one read's worth is held per direction;
 *   - a bulk direction (SPLICE_AFTER reads of SPLICE_MIN_READ bytes) switches to splice(2)
 *     through a pipe of its own, as proxy/relays/splice.py does;
 *   - the counters of proxy.ground.stats.MappingStats, added to the Python object at the end
 *     of every run(), so /metrics, -list and the engine read them exactly as before.
 * What it does not do (those mappings keep the Python relay: proxy/relays/native.py decides):
 * -allow, -proxy-protocol, -transparent, -idle-timeout, -dial-retry, the access log, debug
 * logging.
 *
 * Single-threaded: every entry point runs with the GIL held, from the loop's thread. A
 * connection closed while events for it are still in the batch being handled is only marked
 * dead, and freed once the batch is done.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define READ_SIZE (256 * 1024)     /* one read; what uvloop reads at most, too */
#define SPLICE_MIN_READ (64 * 1024) /* proxy/relays/splice.py's switch point, kept equal */
#define SPLICE_AFTER 4
#define PIPE_SIZE (1024 * 1024)
#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
#define ACCEPT_BATCH 64            /* clients taken per wake-up, so one listener can't starve */
#define EVENTS 256
#define SHORTAGE_PAUSE 0.05        /* out of fds or memory: retry the accept after 50 ms */
#define MAX_BUCKETS 40

enum { K_LISTENER = 1, K_TIMER, K_SIDE };  /* what an epoll event's pointer points at */
enum { DIALING = 1, RELAYING };
enum { EV_DIAL_FAILED = 1, EV_SHORTAGE = 2 };  /* what run() reports to on_event */

typedef struct conn conn_t;

typedef struct side {
    uint8_t kind;      /* K_SIDE: first, as in every struct an epoll event points at */
    uint8_t is_client;
    uint8_t eof;       /* its FIN arrived: nothing more to read from it */
    uint8_t fin_due;   /* the other side ended: shut this one's writing once its queue is out */
    uint8_t no_splice; /* a pipe could not be made: this direction stays on read and write */
    uint32_t mask;     /* events registered; 0 is "not in the epoll set" */
    int fd;
    int big_reads;
    char *buf;         /* bytes read from the peer, waiting to be written to this side */
    size_t off, len;
    int pipe_r, pipe_w; /* this side's incoming bytes, spliced on their way to the peer */
    size_t piped;       /* bytes in that pipe */
    conn_t *conn;
} side_t;

struct conn {
    side_t c, b;       /* the client, and the backend (container) connection */
    uint8_t state;
    uint8_t dead;      /* closed; freed at the end of the batch */
    uint8_t client_rdhup;  /* the client's FIN came during the dial (read after it) */
    struct sockaddr_in6 peer; /* the client's address, from accept4 (a sockaddr_in fits) */
    double started;    /* the dial's start, CLOCK_MONOTONIC seconds */
    conn_t *prev, *next;   /* every open connection */
    conn_t *dprev, *dnext; /* dials under way, oldest first */
};

typedef struct { uint8_t kind; } marker_t;

typedef struct {
    PyObject_HEAD
    int epfd, tfd, lfd;
    marker_t lmark, tmark;
    int accepting;        /* the listener is in the epoll set */
    int stopped;          /* stop_accepting() was called */
    int aborted;          /* abort_all() was called: a late client is reset */
    double accept_resume; /* after a shortage: when to accept again (0: not paused) */
    double armed_at;      /* the timer's deadline (0: disarmed) */
    struct sockaddr_storage backend;
    socklen_t backend_len;
    int family, keepalive;
    double dial_timeout;  /* 0: none */
    long max_conns;       /* 0: none */
    long open;
    conn_t *head;
    conn_t *dhead, *dtail;
    conn_t *graveyard;    /* dead connections, through `next` */
    PyObject *stats, *on_event, *events;
    double buckets[MAX_BUCKETS];
    int nbuckets;
    /* added to `stats` at the end of run() */
    long long d_accepted, d_active, d_rejected_limit, d_dial_failures;
    long long d_from_client, d_from_container, d_spliced;
    long long d_bucket[MAX_BUCKETS + 1];
    double d_dial_sum;
    int dirty;
} Relay;

static char rbuf[READ_SIZE];  /* every read's bytes, for as long as the write after it */

static PyObject *s_accepted, *s_active, *s_rejected_limit, *s_dial_failures,
    *s_bytes_from_client, *s_bytes_from_container, *s_spliced, *s_dial_bucket_counts,
    *s_dial_seconds_sum;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline side_t *peer_of(side_t *s) {
    return s->is_client ? &s->conn->b : &s->conn->c;
}

/* Bytes waiting to be written to `s`: its buffer, and its peer's pipe. */
static inline size_t queued_into(side_t *s) {
    return (s->len - s->off) + peer_of(s)->piped;
}

static void linger_reset(int fd) {
    struct linger l = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

static void set_mask(Relay *r, side_t *s, uint32_t want) {
    if (s->fd < 0 || want == s->mask)
        return;
    if (want == 0) {
        epoll_ctl(r->epfd, EPOLL_CTL_DEL, s->fd, NULL);
    } else {
        struct epoll_event ev = {.events = want, .data.ptr = s};
        if (epoll_ctl(r->epfd, s->mask ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s->fd, &ev) < 0) {
            /* ENOMEM, ENOSPC (max_user_watches): this side would never be woken. Left out of
               the set, the connection is closed by its owner (see update()). */
            s->mask = 0;
            return;
        }
    }
    s->mask = want;
}

/* What a side waits for. While dialling: the backend's connect; of the client, only a
   reset or a FIN (a client that leaves cancels the dial). Then: reading, when the other side
   can take it (nothing queued to it), and writing, when something is queued to this one. */
static uint32_t wanted(side_t *s) {
    conn_t *conn = s->conn;
    if (conn->state == DIALING) {
        if (s->is_client)
            return conn->client_rdhup ? 0 : EPOLLRDHUP;
        return EPOLLOUT;
    }
    uint32_t m = 0;
    if (!s->eof && queued_into(peer_of(s)) == 0)
        m |= EPOLLIN;
    if (queued_into(s) > 0)
        m |= EPOLLOUT;
    return m;
}

static void close_conn(Relay *r, conn_t *conn, int reset_client, int reset_backend);

/* Register what both sides wait for now; a connection that can't be registered is reset. */
static void update(Relay *r, conn_t *conn) {
    uint32_t wc = wanted(&conn->c), wb = wanted(&conn->b);
    set_mask(r, &conn->c, wc);
    set_mask(r, &conn->b, wb);
    if (conn->c.mask != wc || conn->b.mask != wb)
        close_conn(r, conn, 1, 1);
}

static void report(Relay *r, int kind, PyObject *client, int err) {
    PyObject *event = Py_BuildValue("(iOi)", kind, client ? client : Py_None, err);
    if (event == NULL || PyList_Append(r->events, event) < 0)
        PyErr_Clear();  /* out of memory: the log line is lost, the counters are not */
    Py_XDECREF(event);
}

/* The client's address as (host, port), for the log line of a failed dial. */
static PyObject *client_address(conn_t *conn) {
    struct sockaddr_in6 *p = &conn->peer;
    char host[INET6_ADDRSTRLEN];
    if (p->sin6_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)p;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, ntohs(a->sin_port));
    }
    if (p->sin6_family == AF_INET6) {
        struct sockaddr_in6 *a = p;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, ntohs(a->sin6_port));
    }
    return NULL;
}

static void dial_unlink(Relay *r, conn_t *conn) {
    if (conn->dprev) conn->dprev->dnext = conn->dnext; else if (r->dhead == conn) r->dhead = conn->dnext;
    if (conn->dnext) conn->dnext->dprev = conn->dprev; else if (r->dtail == conn) r->dtail = conn->dprev;
    conn->dprev = conn->dnext = NULL;
}

static void close_side(Relay *r, side_t *s, int reset) {
    if (s->fd >= 0) {
        if (s->mask)
            epoll_ctl(r->epfd, EPOLL_CTL_DEL, s->fd, NULL);
        if (reset)
            linger_reset(s->fd);
        close(s->fd);
        s->fd = -1;
        s->mask = 0;
    }
    if (s->pipe_r >= 0) { close(s->pipe_r); close(s->pipe_w); s->pipe_r = s->pipe_w = -1; }
    s->piped = 0;
    free(s->buf);
    s->buf = NULL;
    s->off = s->len = 0;
}

/* Close both sockets now (`reset_*`: with a reset rather than a FIN); the connection is freed
   once the batch of events that may still name it is done. */
static void close_conn(Relay *r, conn_t *conn, int reset_client, int reset_backend) {
    if (conn->dead)
        return;
    conn->dead = 1;
    if (conn->state == DIALING)
        dial_unlink(r, conn);
    close_side(r, &conn->c, reset_client);
    close_side(r, &conn->b, reset_backend);
    if (conn->prev) conn->prev->next = conn->next; else r->head = conn->next;
    if (conn->next) conn->next->prev = conn->prev;
    conn->prev = NULL;
    conn->next = r->graveyard;
    r->graveyard = conn;
    r->open--;
    r->d_active--;
    r->dirty = 1;
}

static void bury(Relay *r) {
    while (r->graveyard) {
        conn_t *conn = r->graveyard;
        r->graveyard = conn->next;
        free(conn);
    }
}

/* An error on `s`'s socket: a reset goes to the other side, as connection_lost(exc) does. */
static void failed(Relay *r, side_t *s) {
    conn_t *conn = s->conn;
    close_conn(r, conn, !s->is_client, s->is_client);
}

static void dial_failed(Relay *r, conn_t *conn, int err) {
    r->d_dial_failures++;
    r->dirty = 1;
    PyObject *client = client_address(conn);
    report(r, EV_DIAL_FAILED, client, err);
    Py_XDECREF(client);
    close_conn(r, conn, 1, 0);
}

static void observe_dial(Relay *r, double seconds) {
    int i = 0;
    while (i < r->nbuckets && seconds > r->buckets[i])  /* bisect_left: the first bound >= */
        i++;
    r->d_bucket[i]++;
    r->d_dial_sum += seconds;
    r->dirty = 1;
}

/* Arm the timer for the earliest deadline, unless it will fire before that anyway: a dial
   that completes leaves the timer as it is (a fire with nothing due costs less than a
   timerfd_settime() per connection). */
static void arm_timer(Relay *r) {
    double next = 0;
    if (r->dhead && r->dial_timeout > 0)
        next = r->dhead->started + r->dial_timeout;
    if (r->accept_resume > 0 && (next == 0 || r->accept_resume < next))
        next = r->accept_resume;
    if (next == 0 || (r->armed_at > 0 && r->armed_at <= next))
        return;
    struct itimerspec its = {{0, 0}, {(time_t)next, (long)((next - (double)(time_t)next) * 1e9)}};
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
        its.it_value.tv_nsec = 1;
    if (timerfd_settime(r->tfd, TFD_TIMER_ABSTIME, &its, NULL) == 0)
        r->armed_at = next;
}

static void set_keepalive(int fd, int seconds) {
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &seconds, sizeof seconds);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &seconds, sizeof seconds);
}

static void connected(Relay *r, conn_t *conn) {
    dial_unlink(r, conn);
    conn->state = RELAYING;
    observe_dial(r, now() - conn->started);
    update(r, conn);
}

static void dial(Relay *r, conn_t *conn) {
    int one = 1;
    conn->started = now();
    int fd = socket(r->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    if (fd < 0) {
        dial_failed(r, conn, errno);
        return;
    }
    conn->b.fd = fd;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    set_keepalive(fd, r->keepalive);
    conn->state = DIALING;
    conn->dprev = r->dtail;
    if (r->dtail) r->dtail->dnext = conn; else r->dhead = conn;
    r->dtail = conn;
    if (connect(fd, (struct sockaddr *)&r->backend, r->backend_len) == 0) {
        connected(r, conn);
        return;
    }
    if (errno != EINPROGRESS) {
        dial_failed(r, conn, errno);
        return;
    }
    update(r, conn);
    if (!conn->dead)
        arm_timer(r);
}

static void accept_clients(Relay *r) {
    int one = 1;
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        struct sockaddr_in6 peer;
        socklen_t peer_len = sizeof peer;
        int fd = accept4(r->lfd, (struct sockaddr *)&peer, &peer_len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            int err = errno;
            if (err == EAGAIN || err == EWOULDBLOCK)
                return;
            if (err == EINTR || err == ECONNABORTED || err == EPERM || err == EPROTO
                    || err == ENOPROTOOPT || err == ENETDOWN || err == ENONET
                    || err == EHOSTDOWN || err == EHOSTUNREACH || err == ENETUNREACH
                    || err == EOPNOTSUPP)
                /* This client is gone, refused by a firewall, or brought a network error
                   that accept(2) hands on from the new socket ("treat as EAGAIN by
                   retrying"): the next one. */
                continue;
            /* Out of fds or memory (or the listener broke): the queue stays in the kernel;
               try again shortly, rather than spin on a listener that stays readable. The
               event carries the errno, so the log line tells a shortage from the rest. */
            epoll_ctl(r->epfd, EPOLL_CTL_DEL, r->lfd, NULL);
            r->accepting = 0;
            r->accept_resume = now() + SHORTAGE_PAUSE;
            arm_timer(r);
            report(r, EV_SHORTAGE, NULL, err);
            return;
        }
        r->d_accepted++;
        r->dirty = 1;
        if (r->aborted || (r->max_conns && r->open >= r->max_conns)) {
            if (!r->aborted)
                r->d_rejected_limit++;
            linger_reset(fd);
            close(fd);
            continue;
        }
        conn_t *conn = calloc(1, sizeof *conn);
        if (conn == NULL) {
            linger_reset(fd);
            close(fd);
            continue;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn->c = (side_t){.kind = K_SIDE, .is_client = 1, .fd = fd, .pipe_r = -1, .pipe_w = -1,
                           .conn = conn};
        if (peer_len <= sizeof conn->peer)
            memcpy(&conn->peer, &peer, peer_len);
        conn->b = (side_t){.kind = K_SIDE, .is_client = 0, .fd = -1, .pipe_r = -1, .pipe_w = -1,
                           .conn = conn};
        conn->next = r->head;
        if (r->head) r->head->prev = conn;
        r->head = conn;
        r->open++;
        r->d_active++;
        dial(r, conn);
    }
}

static inline void count(Relay *r, side_t *s, size_t n) {
    if (s->is_client) r->d_from_client += n; else r->d_from_container += n;
    r->dirty = 1;
}

/* Write what is queued to `s` (its buffer, then its peer's pipe), and pass a pending FIN on
   once it is all out. Returns -1 if the connection failed (and is closed). */
static int flush(Relay *r, side_t *s) {
    side_t *src = peer_of(s);
    if (s->len > s->off) {
        ssize_t w = send(s->fd, s->buf + s->off, s->len - s->off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) return 0;
            failed(r, s);
            return -1;
        }
        s->off += (size_t)w;
        if (s->off < s->len) return 0;
        free(s->buf);
        s->buf = NULL;
        s->off = s->len = 0;
    }
    while (src->piped > 0) {
        ssize_t w = splice(src->pipe_r, NULL, s->fd, NULL, src->piped, SPLICE_FLAGS);
        if (w <= 0) {
            if (w < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
            failed(r, s);  /* (0: the pipe lost what we put in it; never seen, never spun on) */
            return -1;
        }
        src->piped -= (size_t)w;
    }
    if (s->fin_due) {
        s->fin_due = 0;
        shutdown(s->fd, SHUT_WR);
    }
    return 0;
}

/* `s` sent its FIN: pass it on (after what is queued), and close once both ways have ended. */
static void ended(Relay *r, side_t *s) {
    side_t *p = peer_of(s);
    s->eof = 1;
    if (p->eof)
        return;  /* both ended: run()'s done check closes once the queues are out */
    if (queued_into(p) == 0)
        shutdown(p->fd, SHUT_WR);
    else
        p->fin_due = 1;
}

static void start_splice(Relay *r, side_t *s) {
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) {
        s->no_splice = 1;  /* out of fds, say: stay on the copying path */
        return;
    }
    fcntl(fds[1], F_SETPIPE_SZ, PIPE_SIZE);  /* a smaller pipe works too, with more calls */
    s->pipe_r = fds[0];
    s->pipe_w = fds[1];
    r->d_spliced++;
    r->dirty = 1;
}

/* `s` is readable (and its peer can take more): move its bytes on. */
static int pump(Relay *r, side_t *s) {
    side_t *p = peer_of(s);
    if (s->pipe_w >= 0) {
        for (int i = 0; i < 8 && queued_into(p) == 0; i++) {
            ssize_t n = splice(s->fd, NULL, s->pipe_w, NULL, PIPE_SIZE, SPLICE_FLAGS);
            if (n == 0) { ended(r, s); return 0; }
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) return 0;
                failed(r, s);
                return -1;
            }
            s->piped = (size_t)n;
            count(r, s, (size_t)n);
            if (flush(r, p) < 0) return -1;
        }
        return 0;
    }
    ssize_t n = recv(s->fd, rbuf, READ_SIZE, 0);
    if (n == 0) { ended(r, s); return 0; }
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return 0;
        failed(r, s);
        return -1;
    }
    count(r, s, (size_t)n);
    ssize_t w = send(p->fd, rbuf, (size_t)n, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            failed(r, p);
            return -1;
        }
        w = 0;
    }
    if (w < n) {  /* the rest waits, and `s` is not read again until it is written */
        p->buf = malloc((size_t)(n - w));
        if (p->buf == NULL) {
            failed(r, p);
            return -1;
        }
        memcpy(p->buf, rbuf + w, (size_t)(n - w));
        p->off = 0;
        p->len = (size_t)(n - w);
    }
    if (n >= SPLICE_MIN_READ && ++s->big_reads >= SPLICE_AFTER && !s->no_splice
            && queued_into(p) == 0)
        start_splice(r, s);
    return 0;
}

static void side_event(Relay *r, side_t *s, uint32_t ev) {
    conn_t *conn = s->conn;
    if (conn->state == DIALING) {
        if (s->is_client) {
            if (ev & (EPOLLERR | EPOLLHUP)) {
                close_conn(r, conn, 0, 0);  /* the client left: the dial is dropped */
                return;
            }
            conn->client_rdhup = 1;  /* its FIN (and any bytes before it) is read after */
            update(r, conn);
            return;
        }
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err == 0)
            connected(r, conn);
        else
            dial_failed(r, conn, err);
        return;
    }
    if ((ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && queued_into(s) > 0) {
        if (flush(r, s) < 0) return;
    }
    if ((ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) && (s->mask & EPOLLIN) && !s->eof
            && queued_into(peer_of(s)) == 0) {
        if (pump(r, s) < 0) return;
    }
    if (conn->c.eof && conn->b.eof && queued_into(&conn->c) == 0 && queued_into(&conn->b) == 0)
        close_conn(r, conn, 0, 0);
    else
        update(r, conn);
}

static void timer_event(Relay *r) {
    uint64_t expirations;
    if (read(r->tfd, &expirations, sizeof expirations) < 0) { /* nothing due: fine */ }
    r->armed_at = 0;
    double t = now();
    while (r->dial_timeout > 0 && r->dhead && r->dhead->started + r->dial_timeout <= t)
        dial_failed(r, r->dhead, 0);  /* 0: -dial-timeout, not an error of the socket's */
    if (r->accept_resume > 0 && r->accept_resume <= t) {
        r->accept_resume = 0;
        if (!r->stopped && !r->accepting) {
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &r->lmark};
            if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->lfd, &ev) == 0)
                r->accepting = 1;
        }
    }
    arm_timer(r);
}

static int add_to(PyObject *obj, PyObject *name, long long delta) {
    if (delta == 0) return 0;
    PyObject *old = PyObject_GetAttr(obj, name);
    if (old == NULL) return -1;
    PyObject *d = PyLong_FromLongLong(delta);
    PyObject *sum = d ? PyNumber_Add(old, d) : NULL;
    Py_DECREF(old);
    Py_XDECREF(d);
    if (sum == NULL) return -1;
    int rc = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return rc;
}

/* Add what changed since the last call to the MappingStats object. */
static int flush_one(PyObject *stats, PyObject *name, long long *delta) {
    if (*delta == 0) return 0;
    if (add_to(stats, name, *delta) < 0) return -1;
    *delta = 0;
    return 0;
}

static int flush_stats(Relay *r) {
    if (!r->dirty) return 0;
    /* Each delta is zeroed as it lands, so a failure part-way (out of memory) neither
       loses the rest, kept for the next call, nor counts the landed ones twice. */
    r->dirty = 1;
    if (flush_one(r->stats, s_accepted, &r->d_accepted) < 0
            || flush_one(r->stats, s_active, &r->d_active) < 0
            || flush_one(r->stats, s_rejected_limit, &r->d_rejected_limit) < 0
            || flush_one(r->stats, s_dial_failures, &r->d_dial_failures) < 0
            || flush_one(r->stats, s_bytes_from_client, &r->d_from_client) < 0
            || flush_one(r->stats, s_bytes_from_container, &r->d_from_container) < 0
            || flush_one(r->stats, s_spliced, &r->d_spliced) < 0)
        return -1;
    PyObject *counts = NULL;
    for (int i = 0; i <= r->nbuckets; i++) {
        if (!r->d_bucket[i]) continue;
        if (counts == NULL && (counts = PyObject_GetAttr(r->stats, s_dial_bucket_counts)) == NULL)
            return -1;
        PyObject *old = PySequence_GetItem(counts, i);
        if (old == NULL) { Py_DECREF(counts); return -1; }
        PyObject *d = PyLong_FromLongLong(r->d_bucket[i]);
        PyObject *sum = d ? PyNumber_Add(old, d) : NULL;
        Py_DECREF(old);
        Py_XDECREF(d);
        if (sum == NULL || PySequence_SetItem(counts, i, sum) < 0) {
            Py_XDECREF(sum);
            Py_DECREF(counts);
            return -1;
        }
        Py_DECREF(sum);
        r->d_bucket[i] = 0;
    }
    Py_XDECREF(counts);
    if (r->d_dial_sum > 0) {
        PyObject *old = PyObject_GetAttr(r->stats, s_dial_seconds_sum);
        if (old == NULL) return -1;
        PyObject *sum = PyFloat_FromDouble(PyFloat_AsDouble(old) + r->d_dial_sum);
        Py_DECREF(old);
        if (sum == NULL) return -1;
        int rc = PyObject_SetAttr(r->stats, s_dial_seconds_sum, sum);
        Py_DECREF(sum);
        if (rc < 0) return -1;
        r->d_dial_sum = 0;
    }
    r->dirty = 0;
    return 0;
}

/* Hand the events gathered in this call to on_event, after the relay's own work is done
   (a callback that re-enters abort_all() or stop_accepting() then finds it consistent). */
static int deliver(Relay *r) {
    if (PyList_GET_SIZE(r->events) == 0 || r->on_event == NULL) return 0;
    PyObject *events = r->events;
    r->events = PyList_New(0);
    if (r->events == NULL) { r->events = events; return -1; }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(events); i++) {
        PyObject *res = PyObject_CallObject(r->on_event, PyList_GET_ITEM(events, i));
        if (res == NULL) { Py_DECREF(events); return -1; }
        Py_DECREF(res);
    }
    Py_DECREF(events);
    return 0;
}

static PyObject *Relay_run(Relay *r, PyObject *Py_UNUSED(ignored)) {
    struct epoll_event events[EVENTS];
    if (r->epfd < 0) Py_RETURN_NONE;
    int n = epoll_wait(r->epfd, events, EVENTS, 0);
    for (int i = 0; i < n; i++) {
        uint8_t kind = *(uint8_t *)events[i].data.ptr;
        if (kind == K_SIDE) {
            side_t *s = events[i].data.ptr;
            if (!s->conn->dead)
                side_event(r, s, events[i].events);
        } else if (kind == K_LISTENER) {
            if (r->accepting) accept_clients(r);
        } else {
            timer_event(r);
        }
    }
    bury(r);
    if (flush_stats(r) < 0 || deliver(r) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Relay_fileno(Relay *r, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(r->epfd);
}

static PyObject *Relay_stop_accepting(Relay *r, PyObject *Py_UNUSED(ignored)) {
    r->stopped = 1;
    r->accept_resume = 0;
    if (r->accepting && r->epfd >= 0) {
        epoll_ctl(r->epfd, EPOLL_CTL_DEL, r->lfd, NULL);
        r->accepting = 0;
    }
    Py_RETURN_NONE;
}

static long abort_every(Relay *r) {
    long n = r->open;
    while (r->head)
        close_conn(r, r->head, 0, 0);  /* as transport.abort(): now, without a reset */
    bury(r);
    return n;
}

static PyObject *Relay_abort_all(Relay *r, PyObject *Py_UNUSED(ignored)) {
    r->aborted = 1;
    long n = abort_every(r);
    if (flush_stats(r) < 0) return NULL;
    return PyLong_FromLong(n);
}

static void release(Relay *r) {
    abort_every(r);
    if (r->epfd >= 0) { close(r->epfd); r->epfd = -1; }
    if (r->tfd >= 0) { close(r->tfd); r->tfd = -1; }
    r->accepting = 0;
}

static PyObject *Relay_close(Relay *r, PyObject *Py_UNUSED(ignored)) {
    r->aborted = r->stopped = 1;
    release(r);
    if (flush_stats(r) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Relay_get_open_count(Relay *r, void *Py_UNUSED(closure)) {
    return PyLong_FromLong(r->open);
}

static int Relay_init(Relay *r, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"listen_fd", "family", "host", "port", "dial_timeout", "max_conns",
                             "keepalive", "stats", "buckets", "on_event", NULL};
    int lfd, family, port, keepalive;
    const char *host;
    double dial_timeout;
    long max_conns;
    PyObject *stats, *buckets, *on_event;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iisidliOOO", kwlist, &lfd, &family, &host,
                                     &port, &dial_timeout, &max_conns, &keepalive, &stats,
                                     &buckets, &on_event))
        return -1;
    if (r->epfd >= 0 || r->stats != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Relay is already initialised");
        return -1;
    }
    memset(&r->backend, 0, sizeof r->backend);
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&r->backend;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1) goto bad_host;
        r->backend_len = sizeof *a;
    } else if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&r->backend;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1) goto bad_host;
        r->backend_len = sizeof *a;
    } else {
        PyErr_SetString(PyExc_ValueError, "family must be AF_INET or AF_INET6");
        return -1;
    }
    PyObject *seq = PySequence_Fast(buckets, "buckets must be a sequence of floats");
    if (seq == NULL) return -1;
    if (PySequence_Fast_GET_SIZE(seq) > MAX_BUCKETS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many buckets");
        return -1;
    }
    r->nbuckets = (int)PySequence_Fast_GET_SIZE(seq);
    for (int i = 0; i < r->nbuckets; i++) {
        r->buckets[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred()) { Py_DECREF(seq); return -1; }
    }
    Py_DECREF(seq);
    r->lfd = lfd;
    r->family = family;
    r->dial_timeout = dial_timeout;
    r->max_conns = max_conns;
    r->keepalive = keepalive;
    r->lmark.kind = K_LISTENER;
    r->tmark.kind = K_TIMER;
    r->events = PyList_New(0);
    if (r->events == NULL) return -1;
    Py_INCREF(stats);
    r->stats = stats;
    Py_INCREF(on_event);
    r->on_event = on_event;
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    r->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (r->epfd < 0 || r->tfd < 0) goto os_error;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &r->tmark};
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->tfd, &ev) < 0) goto os_error;
    ev.data.ptr = &r->lmark;
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, lfd, &ev) < 0) goto os_error;
    r->accepting = 1;
    return 0;
bad_host:
    PyErr_Format(PyExc_ValueError, "not a numeric address: %s", host);
    return -1;
os_error:
    PyErr_SetFromErrno(PyExc_OSError);
    release(r);
    return -1;
}

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Relay *r = (Relay *)type->tp_alloc(type, 0);
    if (r != NULL) {
        r->epfd = r->tfd = r->lfd = -1;
    }
    return (PyObject *)r;
}

static int Relay_traverse(Relay *r, visitproc visit, void *arg) {
    Py_VISIT(r->stats);
    Py_VISIT(r->on_event);
    Py_VISIT(r->events);
    return 0;
}

static int Relay_clear(Relay *r) {
    Py_CLEAR(r->on_event);
    return 0;
}

static void Relay_dealloc(Relay *r) {
    PyObject_GC_UnTrack(r);
    release(r);
    Py_XDECREF(r->stats);
    Py_XDECREF(r->on_event);
    Py_XDECREF(r->events);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyMethodDef Relay_methods[] = {
    {"run", (PyCFunction)Relay_run, METH_NOARGS,
     "Handle what is ready: accepts, dials, reads, writes, timeouts (never blocks)."},
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS,
     "The epoll fd to watch for readability (loop.add_reader)."},
    {"stop_accepting", (PyCFunction)Relay_stop_accepting, METH_NOARGS,
     "Take no new client; what is in the kernel's queue stays there."},
    {"abort_all", (PyCFunction)Relay_abort_all, METH_NOARGS,
     "Close every connection now, and reset any client accepted later; returns how many."},
    {"close", (PyCFunction)Relay_close, METH_NOARGS,
     "Abort everything and release the relay's own fds (not the listener's)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Relay_getset[] = {
    {"open_count", (getter)Relay_get_open_count, NULL, "Connections open (dials included).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy.relays._native.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Relay_traverse,
    .tp_clear = (inquiry)Relay_clear,
    .tp_doc = "One TCP listener's connections, accepted, dialled and relayed in C.",
    .tp_new = Relay_new,
    .tp_init = (initproc)Relay_init,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
    .tp_getset = Relay_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native",
    "A TCP mapping's connections relayed in C (proxy/relays/native.py says when).", -1, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&RelayType) < 0) return NULL;
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_accepted, "accepted");
    INTERN(s_active, "active");
    INTERN(s_rejected_limit, "rejected_limit");
    INTERN(s_dial_failures, "dial_failures");
    INTERN(s_bytes_from_client, "bytes_from_client");
    INTERN(s_bytes_from_container, "bytes_from_container");
    INTERN(s_spliced, "spliced");
    INTERN(s_dial_bucket_counts, "dial_bucket_counts");
    INTERN(s_dial_seconds_sum, "dial_seconds_sum");
#undef INTERN
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
