/*
 * Asynchronous s2s DNS resolution: RFC 6120 §3.2 (SRV _xmpp-server._tcp,
 * A/AAAA fallback on 5269), XEP-0368 (SRV _xmpps-server._tcp, direct TLS),
 * RFC 2782 ordering.  See resolve.h for the ordering rules.
 *
 * c-ares runs on the server's loop: its socket-state callback opens and
 * closes xd_io watchers, and one xd_timer follows ares_timeout() for
 * retransmits.  Each query has its own deadline timer.
 *
 * Re-entrancy: user callbacks are never called from inside c-ares (c-ares
 * does not allow destroying the channel from its callbacks, and the user may
 * free the resolver).  Finished queries go on a "done" list that is drained
 * once the outermost entry point (io, timer) has left c-ares.  `depth`
 * counts nested entries; freeing the resolver while depth > 0 only marks
 * it, and the outermost exit does the real work.
 */
#include "resolve.h"

#include <ares.h>
#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_TIMEOUT 15.0

enum { SVC_TLS = 0, SVC_PLAIN = 1 };               /* SRV services, in query order */
enum { SRV_NONE = 0, SRV_RECORDS, SRV_DOT, SRV_ERROR };
enum { Q_RUNNING = 0, Q_DONE, Q_DELIVERING };
enum { PH_SRV = 0, PH_ADDR };

/* One outstanding c-ares request.  It outlives its query when the query is
 * cancelled or times out (c-ares cannot cancel a single request): q is then
 * NULL and the c-ares callback only frees it. */
typedef struct req {
    struct req *prev, *next;
    s2s_query *q;
    int idx; /* service (SRV phase) or target index (address phase) */
} req;

typedef struct qlist {
    s2s_query *head, *tail;
} qlist;

struct s2s_query {
    s2s_resolver *r;
    s2s_query *prev, *next; /* in r->active or r->done, by state */
    int state;
    int phase;
    s2s_resolve_cb cb;
    void *data;
    xd_timer *deadline;
    req *reqs;
    int pending; /* requests (plus a guard while starting them) */
    char domain[S2S_MAX_DOMAIN + 1];
    s2s_srv *raw[2];
    int nraw[2];
    int srv_state[2];
    s2s_srv *targets;
    int ntargets;
    struct ares_addrinfo **ai;
    int *ai_status;
    s2s_addr addrs[S2S_MAX_ADDRS];
    int naddrs;
    const char *err;
    char errbuf[96];
};

typedef struct watch {
    struct watch *next;
    ares_socket_t fd;
    xd_io *io;
} watch;

struct s2s_resolver {
    xd_module *m;
    ares_channel ch;
    int ch_ok;
    double timeout;
    int depth;
    int freeing;
    xd_timer *atimer; /* c-ares retransmits */
    xd_timer *flush;  /* delivers queries that finished inside s2s_resolve() */
    watch *watches;
    qlist active, done;
};

/* ---- RFC 2782 ordering ---------------------------------------------------- */

static void
order_service(s2s_srv *v, int n)
{
    /* Priority ascending; insertion sort is stable and n <= 32. */
    for (int i = 1; i < n; i++) {
        s2s_srv t = v[i];
        int j = i;
        for (; j > 0 && v[j - 1].priority > t.priority; j--)
            v[j] = v[j - 1];
        v[j] = t;
    }
    for (int i = 0; i < n;) {
        int end = i;
        while (end < n && v[end].priority == v[i].priority)
            end++;
        /* RFC 2782: weight-0 records first, then pick by running sum.  A
         * weight-0 record first in the list wins only when the random
         * number is 0, so it keeps "a very small chance" when others have
         * weight, and all-zero groups keep their order. */
        int z = i;
        for (int k = i; k < end; k++) {
            if (v[k].weight == 0) {
                s2s_srv t = v[k];
                memmove(&v[z + 1], &v[z], (size_t)(k - z) * sizeof(*v));
                v[z++] = t;
            }
        }
        for (int k = i; k < end; k++) {
            uint32_t sum = 0, run = 0, pick;
            int m;
            for (m = k; m < end; m++)
                sum += v[m].weight;
            pick = sum ? arc4random_uniform(sum + 1) : 0;
            for (m = k; m < end - 1; m++) {
                run += v[m].weight;
                if (run >= pick)
                    break;
            }
            if (m != k) { /* move the chosen one to k, keep the rest in order */
                s2s_srv t = v[m];
                memmove(&v[k + 1], &v[k], (size_t)(m - k) * sizeof(*v));
                v[k] = t;
            }
        }
        i = end;
    }
}

int
s2s_srv_order(s2s_srv *out, const s2s_srv *tls, int ntls, const s2s_srv *plain, int nplain)
{
    s2s_srv a[S2S_MAX_SRV], b[S2S_MAX_SRV];
    int i = 0, j = 0, n = 0;

    ntls = ntls < 0 ? 0 : ntls > S2S_MAX_SRV ? S2S_MAX_SRV : ntls;
    nplain = nplain < 0 ? 0 : nplain > S2S_MAX_SRV ? S2S_MAX_SRV : nplain;
    if (ntls)
        memcpy(a, tls, (size_t)ntls * sizeof(*a));
    if (nplain)
        memcpy(b, plain, (size_t)nplain * sizeof(*b));
    order_service(a, ntls);
    order_service(b, nplain);
    /* Merge by priority; ties go to direct TLS (XEP-0368). */
    while (i < ntls || j < nplain) {
        if (j >= nplain || (i < ntls && a[i].priority <= b[j].priority))
            out[n++] = a[i++];
        else
            out[n++] = b[j++];
    }
    return n;
}

/* ---- lists ---------------------------------------------------------------- */

static void
qlist_push(qlist *l, s2s_query *q)
{
    q->next = NULL;
    q->prev = l->tail;
    if (l->tail)
        l->tail->next = q;
    else
        l->head = q;
    l->tail = q;
}

static void
qlist_unlink(qlist *l, s2s_query *q)
{
    if (q->prev)
        q->prev->next = q->next;
    else
        l->head = q->next;
    if (q->next)
        q->next->prev = q->prev;
    else
        l->tail = q->prev;
    q->prev = q->next = NULL;
}

static req *
req_new(s2s_query *q, int idx)
{
    req *rq = calloc(1, sizeof(*rq));
    if (!rq)
        return NULL;
    rq->q = q;
    rq->idx = idx;
    rq->next = q->reqs;
    if (q->reqs)
        q->reqs->prev = rq;
    q->reqs = rq;
    q->pending++;
    return rq;
}

/* Called by every c-ares callback: frees the request and returns its query,
 * or NULL when the query is gone. */
static s2s_query *
req_take(req *rq)
{
    s2s_query *q = rq->q;
    if (q) {
        if (rq->prev)
            rq->prev->next = rq->next;
        else
            q->reqs = rq->next;
        if (rq->next)
            rq->next->prev = rq->prev;
        q->pending--;
    }
    free(rq);
    return q;
}

static void
detach_reqs(s2s_query *q)
{
    req *rq = q->reqs;
    while (rq) {
        req *next = rq->next;
        rq->q = NULL;
        rq->prev = rq->next = NULL;
        rq = next;
    }
    q->reqs = NULL;
    q->pending = 0;
}

static void
free_lookups(s2s_query *q)
{
    for (int i = 0; q->ai && i < q->ntargets; i++)
        if (q->ai[i])
            ares_freeaddrinfo(q->ai[i]);
    free(q->ai);
    free(q->ai_status);
    free(q->targets);
    free(q->raw[0]);
    free(q->raw[1]);
    q->ai = NULL;
    q->ai_status = NULL;
    q->targets = NULL;
    q->raw[0] = q->raw[1] = NULL;
}

/* Free a query that is in no list any more. */
static void
query_release(s2s_query *q)
{
    detach_reqs(q);
    if (q->deadline)
        xd_timer_stop(q->deadline);
    free_lookups(q);
    free(q);
}

static void
query_drop(s2s_query *q)
{
    qlist_unlink(q->state == Q_DONE ? &q->r->done : &q->r->active, q);
    query_release(q);
}

/* The query is over: keep the result for delivery outside c-ares. */
static void
finish(s2s_query *q, const char *err)
{
    s2s_resolver *r = q->r;
    detach_reqs(q);
    if (q->deadline) {
        xd_timer_stop(q->deadline);
        q->deadline = NULL;
    }
    free_lookups(q);
    q->err = q->naddrs ? NULL : err ? err : "not found";
    qlist_unlink(&r->active, q);
    q->state = Q_DONE;
    qlist_push(&r->done, q);
    if (q->err)
        xd_debug("s2s resolve %s: %s", q->domain, q->err);
    else
        xd_debug("s2s resolve %s: %d address(es), first %s%s", q->domain, q->naddrs,
                 q->addrs[0].host, q->addrs[0].direct_tls ? " (direct TLS)" : "");
}

/* ---- loop integration ----------------------------------------------------- */

static void resched(s2s_resolver *r);
static void really_free(s2s_resolver *r);
static void on_flush(void *data);

/* Drain the done list: user callbacks run here, outside c-ares. */
static void
deliver(s2s_resolver *r)
{
    s2s_query *q;
    while (!r->freeing && (q = r->done.head)) {
        qlist_unlink(&r->done, q);
        q->state = Q_DELIVERING; /* cancel(q) from its own callback is a no-op */
        q->cb(q->data, q->addrs, q->naddrs, q->err);
        query_release(q);
    }
}

static void
enter(s2s_resolver *r)
{
    r->depth++;
}

/* may_deliver: 0 from s2s_resolve(), whose caller must get its handle
 * before any callback runs; a zero-delay timer delivers instead. */
static void
leave(s2s_resolver *r, int may_deliver)
{
    if (may_deliver && r->depth == 1)
        deliver(r);
    if (--r->depth > 0)
        return;
    if (r->freeing) {
        really_free(r);
        return;
    }
    if (r->done.head && !r->flush)
        r->flush = xd_timer_start(r->m, 0, 0, on_flush, r);
    resched(r);
}

static void
on_flush(void *data)
{
    s2s_resolver *r = data;
    r->flush = NULL; /* one-shot: the core already freed it */
    enter(r);
    leave(r, 1);
}

static void
on_ares_timer(void *data)
{
    s2s_resolver *r = data;
    r->atimer = NULL;
    enter(r);
    ares_process_fd(r->ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD); /* retransmits, timeouts */
    leave(r, 1);
}

/* Called after every entry into c-ares (from leave()): there is one timer
 * for the channel's next retransmit, none when nothing is pending. */
static void
resched(s2s_resolver *r)
{
    struct timeval tv, *tvp;
    if (r->atimer) {
        xd_timer_stop(r->atimer);
        r->atimer = NULL;
    }
    tvp = ares_timeout(r->ch, NULL, &tv);
    if (tvp) /* +1 ms: firing a hair early would only reschedule */
        r->atimer = xd_timer_start(r->m, (double)tvp->tv_sec + tvp->tv_usec / 1e6 + 0.001, 0,
                                   on_ares_timer, r);
}

static void
on_io(int fd, int events, void *data)
{
    s2s_resolver *r = data;
    enter(r);
    ares_process_fd(r->ch, (events & XD_IO_READ) ? fd : ARES_SOCKET_BAD,
                    (events & XD_IO_WRITE) ? fd : ARES_SOCKET_BAD);
    leave(r, 1);
}

/* c-ares tells us when a socket opens, changes interest, or closes (0, 0). */
static void
on_sock_state(void *data, ares_socket_t fd, int readable, int writable)
{
    s2s_resolver *r = data;
    int events = (readable ? XD_IO_READ : 0) | (writable ? XD_IO_WRITE : 0);
    watch **pp, *w;

    for (pp = &r->watches; (w = *pp); pp = &w->next)
        if (w->fd == fd)
            break;
    if (!events) {
        if (w) {
            *pp = w->next;
            xd_io_stop(w->io); /* fine inside its own callback: the core is done with it */
            free(w);
        }
        return;
    }
    if (w) {
        xd_io_set(w->io, events);
        return;
    }
    w = calloc(1, sizeof(*w));
    if (w && (w->io = xd_io_start(r->m, fd, events, on_io, r))) {
        w->fd = fd;
        w->next = r->watches;
        r->watches = w;
        return;
    }
    /* The request on this socket will time out (deadline), nothing worse. */
    free(w);
    xd_error("s2s resolver: out of memory watching a DNS socket");
}

/* ---- the resolution ------------------------------------------------------- */

static void step(s2s_query *q);

static void
record_srv(s2s_query *q, int svc, int status, unsigned char *abuf, int alen)
{
    struct ares_srv_reply *rep = NULL, *p;
    int n = 0, dot = 0, seen = 0;

    if (status == ARES_SUCCESS)
        status = ares_parse_srv_reply(abuf, alen, &rep);
    if (status != ARES_SUCCESS) {
        /* NXDOMAIN / NODATA: no such service; anything else is a failure.
         * Both lead to the fallback (RFC 6120 §3.2.2: "if the SRV lookup
         * fails"), which then decides the error. */
        q->srv_state[svc] = (status == ARES_ENOTFOUND || status == ARES_ENODATA) ? SRV_NONE
                                                                                 : SRV_ERROR;
        xd_debug("s2s resolve %s: SRV %s: %s", q->domain, svc == SVC_TLS ? "xmpps" : "xmpp",
                 ares_strerror(status));
        return;
    }
    q->raw[svc] = calloc(S2S_MAX_SRV, sizeof(s2s_srv));
    for (p = rep; q->raw[svc] && p && seen < S2S_MAX_SRV; p = p->next, seen++) {
        size_t len = strlen(p->host);
        if (len == 0 || !strcmp(p->host, ".")) { /* RFC 2782: "decidedly not available" */
            dot++;
            continue;
        }
        if (len >= sizeof(q->raw[svc][0].target))
            continue;
        memcpy(q->raw[svc][n].target, p->host, len + 1);
        q->raw[svc][n].port = p->port;
        q->raw[svc][n].priority = p->priority;
        q->raw[svc][n].weight = p->weight;
        q->raw[svc][n].direct_tls = svc == SVC_TLS;
        n++;
    }
    ares_free_data(rep);
    q->nraw[svc] = n;
    q->srv_state[svc] = !q->raw[svc] ? SRV_ERROR : n ? SRV_RECORDS : dot ? SRV_DOT : SRV_NONE;
}

static void
on_srv(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    req *rq = arg;
    int svc = rq->idx;
    s2s_query *q = req_take(rq);
    (void)timeouts;
    if (!q) /* cancelled, timed out, or the channel is being destroyed */
        return;
    record_srv(q, svc, status, abuf, alen);
    step(q);
}

static void
on_addr(void *arg, int status, int timeouts, struct ares_addrinfo *res)
{
    req *rq = arg;
    int i = rq->idx;
    s2s_query *q = req_take(rq);
    (void)timeouts;
    if (!q) {
        if (res)
            ares_freeaddrinfo(res);
        return;
    }
    q->ai_status[i] = status;
    if (status == ARES_SUCCESS)
        q->ai[i] = res;
    else if (res)
        ares_freeaddrinfo(res);
    step(q);
}

static void
add_addr(s2s_query *q, const struct sockaddr *sa, socklen_t len, const s2s_srv *t)
{
    s2s_addr *a = &q->addrs[q->naddrs];

    if (len > sizeof(a->sa))
        return;
    if (sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        memset(a, 0, sizeof(*a));
        memcpy(&a->sa, sa, len);
        ((struct sockaddr_in *)&a->sa)->sin_port = htons(t->port);
    } else if (sa->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        memset(a, 0, sizeof(*a));
        memcpy(&a->sa, sa, len);
        ((struct sockaddr_in6 *)&a->sa)->sin6_port = htons(t->port);
    } else {
        return;
    }
    a->len = len;
    a->direct_tls = t->direct_tls;
    snprintf(a->host, sizeof(a->host), "%s", t->target);
    /* The same address and mode twice would only cost a second failed try. */
    for (int i = 0; i < q->naddrs; i++)
        if (q->addrs[i].len == a->len && q->addrs[i].direct_tls == a->direct_tls &&
            !memcmp(&q->addrs[i].sa, &a->sa, a->len))
            return;
    q->naddrs++;
}

static void
addr_done(s2s_query *q)
{
    int timeout = 0, other = ARES_SUCCESS;

    for (int i = 0; i < q->ntargets && q->naddrs < S2S_MAX_ADDRS; i++) {
        if (!q->ai[i])
            continue;
        for (struct ares_addrinfo_node *n = q->ai[i]->nodes; n && q->naddrs < S2S_MAX_ADDRS;
             n = n->ai_next)
            add_addr(q, n->ai_addr, (socklen_t)n->ai_addrlen, &q->targets[i]);
    }
    if (q->naddrs) {
        finish(q, NULL);
        return;
    }
    for (int i = 0; i < q->ntargets; i++) {
        int st = q->ai_status[i];
        if (st == ARES_ETIMEOUT)
            timeout = 1;
        else if (st != ARES_SUCCESS && st != ARES_ENOTFOUND && st != ARES_ENODATA &&
                 other == ARES_SUCCESS)
            other = st;
    }
    if (timeout) {
        finish(q, "timeout");
    } else if (other != ARES_SUCCESS) {
        snprintf(q->errbuf, sizeof(q->errbuf), "dns error: %s", ares_strerror(other));
        finish(q, q->errbuf);
    } else {
        finish(q, "not found");
    }
}

static void
srv_done(s2s_query *q)
{
    struct ares_addrinfo_hints hints;
    int nsrv = q->nraw[SVC_TLS] + q->nraw[SVC_PLAIN];

    if (nsrv) {
        q->targets = calloc((size_t)nsrv, sizeof(*q->targets));
        if (!q->targets) {
            finish(q, "out of memory");
            return;
        }
        q->ntargets = s2s_srv_order(q->targets, q->raw[SVC_TLS], q->nraw[SVC_TLS],
                                    q->raw[SVC_PLAIN], q->nraw[SVC_PLAIN]);
    } else if (q->srv_state[SVC_PLAIN] == SRV_DOT) {
        /* The domain says it offers no s2s service: RFC 2782 forbids the
         * fallback.  (A "." for xmpps alone only rules out direct TLS.) */
        finish(q, "service not available");
        return;
    } else {
        /* RFC 6120 §3.2.2: the domain's own addresses, STARTTLS on 5269. */
        if (strlen(q->domain) >= sizeof(q->targets[0].target)) {
            finish(q, "invalid domain");
            return;
        }
        q->targets = calloc(1, sizeof(*q->targets));
        if (!q->targets) {
            finish(q, "out of memory");
            return;
        }
        snprintf(q->targets[0].target, sizeof(q->targets[0].target), "%.255s", q->domain);
        q->targets[0].port = S2S_DEFAULT_PORT;
        q->ntargets = 1;
    }
    q->ai = calloc((size_t)q->ntargets, sizeof(*q->ai));
    q->ai_status = calloc((size_t)q->ntargets, sizeof(*q->ai_status));
    if (!q->ai || !q->ai_status) {
        finish(q, "out of memory");
        return;
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC; /* A and AAAA; c-ares sorts them per RFC 6724 */
    hints.ai_socktype = SOCK_STREAM;
    q->phase = PH_ADDR;
    q->pending++; /* guard: a lookup may complete synchronously (literal, hosts file) */
    for (int i = 0; i < q->ntargets; i++) {
        req *rq = req_new(q, i);
        if (!rq) {
            q->ai_status[i] = ARES_ENOMEM;
            continue;
        }
        ares_getaddrinfo(q->r->ch, q->targets[i].target, NULL, &hints, on_addr, rq);
    }
    q->pending--;
    step(q);
}

/* Advance once every outstanding request of the current phase has answered. */
static void
step(s2s_query *q)
{
    if (q->pending > 0 || q->state != Q_RUNNING)
        return;
    if (q->phase == PH_SRV)
        srv_done(q);
    else
        addr_done(q);
}

static void
on_deadline(void *data)
{
    s2s_query *q = data;
    s2s_resolver *r = q->r;
    q->deadline = NULL; /* one-shot: the core already freed it */
    enter(r);
    if (q->state == Q_RUNNING)
        finish(q, "timeout"); /* late c-ares answers are dropped (req->q == NULL) */
    leave(r, 1);
}

/* An IP literal domainpart (RFC 6120 §3.2.1 does not apply): connect as is. */
static int
ip_literal(s2s_query *q)
{
    char buf[64];
    size_t len = strlen(q->domain);
    struct sockaddr_in sin;
    struct sockaddr_in6 sin6;
    s2s_srv t;

    memset(&t, 0, sizeof(t));
    snprintf(t.target, sizeof(t.target), "%.255s", q->domain);
    t.port = S2S_DEFAULT_PORT;
    memset(&sin, 0, sizeof(sin));
    memset(&sin6, 0, sizeof(sin6));
    if (inet_pton(AF_INET, q->domain, &sin.sin_addr) == 1) {
        sin.sin_family = AF_INET;
        add_addr(q, (struct sockaddr *)&sin, sizeof(sin), &t);
        return 1;
    }
    if (len > 2 && len < sizeof(buf) && q->domain[0] == '[' && q->domain[len - 1] == ']') {
        memcpy(buf, q->domain + 1, len - 2);
        buf[len - 2] = '\0';
        if (inet_pton(AF_INET6, buf, &sin6.sin6_addr) == 1) {
            sin6.sin6_family = AF_INET6;
            add_addr(q, (struct sockaddr *)&sin6, sizeof(sin6), &t);
            return 1;
        }
    }
    return 0;
}

s2s_query *
s2s_resolve(s2s_resolver *r, const char *domain, s2s_resolve_cb cb, void *data)
{
    static const char *const prefix[2] = {"_xmpps-server._tcp.", "_xmpp-server._tcp."};
    s2s_query *q;
    size_t len;

    if (!r || !domain || !cb || r->freeing)
        return NULL;
    q = calloc(1, sizeof(*q));
    if (!q)
        return NULL;
    q->r = r;
    q->cb = cb;
    q->data = data;
    q->state = Q_RUNNING;
    qlist_push(&r->active, q);
    enter(r);
    len = strnlen(domain, S2S_MAX_DOMAIN + 1);
    if (len == 0 || len > S2S_MAX_DOMAIN) {
        snprintf(q->domain, sizeof(q->domain), "%.40s...", domain);
        finish(q, "invalid domain");
    } else {
        memcpy(q->domain, domain, len + 1);
        if (ip_literal(q)) {
            finish(q, NULL);
        } else if (!(q->deadline = xd_timer_start(r->m, r->timeout, 0, on_deadline, q))) {
            finish(q, "out of memory");
        } else {
            char name[sizeof(q->domain) + 32];
            q->phase = PH_SRV;
            q->pending++; /* guard: ares_query may answer synchronously (bad name...) */
            for (int svc = SVC_TLS; svc <= SVC_PLAIN; svc++) {
                req *rq = req_new(q, svc);
                if (!rq) {
                    q->srv_state[svc] = SRV_ERROR;
                    continue;
                }
                snprintf(name, sizeof(name), "%s%s", prefix[svc], q->domain);
                /* ares_query, not ares_search: the domain is absolute. */
                ares_query(r->ch, name, ns_c_in, ns_t_srv, on_srv, rq);
            }
            q->pending--;
            step(q);
        }
    }
    leave(r, 0);
    return q;
}

void
s2s_resolve_cancel(s2s_query *q)
{
    if (!q || q->state == Q_DELIVERING)
        return;
    query_drop(q);
}

/* ---- the resolver --------------------------------------------------------- */

s2s_resolver *
s2s_resolver_new(xd_module *m, const char *servers, double timeout_seconds)
{
    static char lookups[] = "b"; /* explicit servers: DNS only, not /etc/hosts */
    struct ares_options o;
    int mask, rc, ms;
    s2s_resolver *r;

    /* c-ares keeps its own init count, so pairing one ares_library_init()
     * with one ares_library_cleanup() per resolver is safe next to other
     * c-ares users in the process (all on the one loop thread). */
    rc = ares_library_init(ARES_LIB_INIT_ALL);
    if (rc != ARES_SUCCESS) {
        xd_error("s2s resolver: ares_library_init: %s", ares_strerror(rc));
        return NULL;
    }
    r = calloc(1, sizeof(*r));
    if (!r) {
        ares_library_cleanup();
        return NULL;
    }
    r->m = m;
    r->timeout = timeout_seconds > 0 ? timeout_seconds : DEFAULT_TIMEOUT;

    /* Two tries per server, the second twice as long: ~3 x per-try timeout
     * fits the deadline; capped so a long deadline still leaves time for
     * the A/AAAA fallback after a dead SRV lookup. */
    ms = (int)(r->timeout * 1000 / 3);
    ms = ms < 100 ? 100 : ms > 3000 ? 3000 : ms;
    memset(&o, 0, sizeof(o));
    o.flags = ARES_FLAG_NOSEARCH | ARES_FLAG_EDNS; /* NOCHECKRESP off: SERVFAIL moves on */
    o.timeout = ms;
    o.tries = 2;
    o.domains = NULL; /* no search list: XMPP domains are absolute */
    o.ndomains = 0;
    o.sock_state_cb = on_sock_state;
    o.sock_state_cb_data = r;
    o.ednspsz = 1232;
    mask = ARES_OPT_FLAGS | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_DOMAINS |
           ARES_OPT_SOCK_STATE_CB | ARES_OPT_EDNSPSZ;
    if (servers) {
        o.lookups = lookups;
        mask |= ARES_OPT_LOOKUPS;
    }
    rc = ares_init_options(&r->ch, &o, mask);
    if (rc != ARES_SUCCESS) {
        xd_error("s2s resolver: ares_init_options: %s", ares_strerror(rc));
        free(r);
        ares_library_cleanup();
        return NULL;
    }
    r->ch_ok = 1;
    if (servers && (rc = ares_set_servers_ports_csv(r->ch, servers)) != ARES_SUCCESS) {
        xd_error("s2s resolver: bad DNS servers \"%s\": %s", servers, ares_strerror(rc));
        really_free(r);
        return NULL;
    }
    return r;
}

static void
really_free(s2s_resolver *r)
{
    if (r->flush)
        xd_timer_stop(r->flush);
    if (r->atimer)
        xd_timer_stop(r->atimer);
    r->flush = r->atimer = NULL;
    /* Pending requests are all detached: their callbacks (ARES_EDESTRUCTION)
     * only free them.  Closing sockets calls on_sock_state(fd, 0, 0). */
    if (r->ch_ok)
        ares_destroy(r->ch);
    while (r->watches) {
        watch *w = r->watches;
        r->watches = w->next;
        xd_io_stop(w->io);
        free(w);
    }
    free(r);
    ares_library_cleanup();
}

void
s2s_resolver_free(s2s_resolver *r)
{
    if (!r || r->freeing)
        return;
    r->freeing = 1;
    while (r->active.head)
        query_drop(r->active.head);
    while (r->done.head)
        query_drop(r->done.head);
    if (r->depth > 0)
        return; /* inside a callback: the outermost leave() finishes */
    really_free(r);
}
