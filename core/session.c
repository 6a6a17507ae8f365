/*
 * One stream's connection: non-blocking socket I/O, TLS (STARTTLS, RFC 6120
 * 5, and direct TLS, XEP-0368), the output queue, closing and destruction.
 * Sessions are destroyed only between loop turns (the graveyard), so code
 * holding a session pointer inside a callback never sees it freed.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <strings.h>
#include <gnutls/x509.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "session.h"
#include "store.h"

static ev_prepare graveyard_w, flush_w;
static ev_timer idle_w;
/* A stream silent this long gives its XML parser back (xd_xmlstream_idle). */
#define IDLE_AFTER 10.0
static xd_session *graveyard;
static xd_session *to_flush;   /* sessions with output to write this turn */
static xd_session *to_durable; /* sessions with output waiting for the disk */
static int durable_armed;      /* a storage waiter will run deferred_cb */

/* A stanza or nonza that may go out only once commit `commit` is on disk. */
typedef struct xd_deferred {
    struct xd_deferred *next;
    uint64_t commit;
    size_t len;
    char data[];
} xd_deferred;

static void session_flush(xd_session *s);
static void send_close(xd_session *s, const char *condition, const char *text);
static void connection_lost(xd_session *s);
static void read_cb(struct ev_loop *loop, ev_io *w, int revents);
static void keep_input(xd_session *s);
static void connect_cb(struct ev_loop *loop, ev_io *w, int revents);

static void
format_peer(xd_session *s)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (s->addr.ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&s->addr;
        inet_ntop(AF_INET, &a->sin_addr, ip, sizeof(ip));
        port = ntohs(a->sin_port);
        snprintf(s->peer, sizeof(s->peer), "%s:%d", ip, port);
    } else if (s->addr.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&s->addr;
        inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof(ip));
        port = ntohs(a->sin6_port);
        snprintf(s->peer, sizeof(s->peer), "[%s]:%d", ip, port);
    } else
        snprintf(s->peer, sizeof(s->peer), "?");
}

static void
timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    xd_session *s = (xd_session *)((char *)w - offsetof(xd_session, timer));
    (void)loop;
    (void)revents;
    if (s->closing || s->detached) {
        if (s->detached)
            xd_info("%s: %s was not resumed in time", s->peer, s->full ? s->full : "?");
        xd_session_kill(s); /* the peer would not read our last bytes / never came back */
        return;
    }
    xd_info("%s: stream negotiation took too long", s->peer);
    xd_session_close(s, "connection-timeout", NULL);
}

static void
pause_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    xd_session *s = (xd_session *)((char *)w - offsetof(xd_session, pause_timer));
    (void)revents;
    s->paused = 0;
    if (s->dead || s->closing)
        return;
    ev_io_start(loop, &s->rio);
    /* Input may be waiting in expat or in GnuTLS's buffer, with no socket
     * event to announce it. */
    xd_stream_input(s);
    keep_input(s);
    if (!s->dead && !s->closing && !s->paused)
        read_cb(loop, &s->rio, EV_READ);
}

/*
 * A closing stream's last bytes are out.  Closing the socket now, with input
 * the peer sent still unread, makes the kernel send a reset that can destroy
 * our stream error before the peer reads it.  So shut our side and read and
 * discard until the peer closes too, or the close timer runs out.
 */
static void
linger(xd_session *s)
{
    if (s->lingering || s->dead)
        return;
    s->lingering = 1;
    ev_io_stop(xd_srv.loop, &s->wio);
    ev_timer_stop(xd_srv.loop, &s->pause_timer);
    if (s->tls_up)
        gnutls_bye(s->tls, GNUTLS_SHUT_WR); /* close_notify; non-blocking, best effort */
    if (shutdown(s->fd, SHUT_WR) != 0) {
        xd_session_kill(s);
        return;
    }
    ev_timer_stop(xd_srv.loop, &s->timer);
    ev_timer_set(&s->timer, 2., 0.);
    ev_timer_start(xd_srv.loop, &s->timer);
    ev_io_start(xd_srv.loop, &s->rio);
}

/* Reading while lingering: discard (bounded per call) until EOF or an error. */
static void
drain(xd_session *s)
{
    char buf[4096];
    for (int i = 0; i < 16; i++) {
        ssize_t n = recv(s->fd, buf, sizeof(buf), 0);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        if (n <= 0) {
            xd_session_kill(s);
            return;
        }
    }
}

static void
write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    xd_session *s = w->data;
    (void)loop;
    (void)revents;
    if (s->tls_handshaking)
        xd_session_start_tls(s);
    else
        session_flush(s);
    /* A closing stream is done once its last bytes are out. */
    if (s->closing && !s->close_waits && !s->dead && s->out_len == 0)
        linger(s);
}

/* What every session needs once s->fd and s->addr are set: a parser, its
 * watchers and timers, and a place in the list of sessions.  write_fn is
 * write_cb, or connect_cb while an outgoing connection is being made. */
static int
session_setup(xd_session *s, void (*write_fn)(struct ev_loop *, ev_io *, int))
{
    format_peer(s);
    if (!s->host)
        s->host = "";
    if (s->type == XD_STREAM_S2S && !s->s2s && !(s->s2s = calloc(1, sizeof(*s->s2s))))
        return -1;
    if (xd_stream_init(s) != 0) {
        free(s->s2s);
        s->s2s = NULL;
        return -1;
    }
    ev_io_init(&s->rio, read_cb, s->fd, EV_READ);
    ev_io_init(&s->wio, write_fn, s->fd, EV_WRITE);
    s->rio.data = s->wio.data = s;
    ev_timer_init(&s->timer, timeout_cb, xd_srv.conf.handshake_timeout, 0);
    ev_timer_init(&s->pause_timer, pause_cb, 0, 0);
    s->next = xd_srv.sessions;
    if (s->next)
        s->next->prev = s;
    xd_srv.sessions = s;
    xd_srv.nsessions++;
    return 0;
}

xd_session *
xd_session_new(const xd_listener *l, int fd, const struct sockaddr *sa, socklen_t len)
{
    xd_session *s = calloc(1, sizeof(*s));
    xd_event ev = {0};

    if (!s)
        return NULL;
    s->type = l->type;
    s->listener = l;
    s->fd = fd;
    if (len > sizeof(s->addr))
        len = sizeof(s->addr);
    memcpy(&s->addr, sa, len);
    if (session_setup(s, write_cb) != 0) {
        free(s);
        return NULL;
    }

    ev.session = s;
    ev.addr = (const struct sockaddr *)&s->addr;
    if (xd_hooks_run(XD_HOOK_CONNECT, &ev) == XD_DROP) {
        xd_debug("%s: connection refused by a module", s->peer); /* the module logs, rate-limited */
        xd_session_kill(s);
        return s;
    }
    xd_debug("%s: connected (%s, %s)", s->peer, s->type == XD_STREAM_C2S ? "c2s" : "s2s",
             l->tls == XD_TLS_DIRECT ? "direct TLS" : "STARTTLS");
    ev_timer_start(xd_srv.loop, &s->timer);
    if (l->tls == XD_TLS_DIRECT)
        xd_session_start_tls(s);
    else
        ev_io_start(xd_srv.loop, &s->rio);
    return s;
}

/* ---- TLS ------------------------------------------------------------------ */

static int
tls_setup(xd_session *s)
{
    int r, host;

    r = gnutls_init(&s->tls, (s->initiator ? GNUTLS_CLIENT : GNUTLS_SERVER) | GNUTLS_NONBLOCK |
                                 GNUTLS_NO_SIGNAL);
    if (r < 0)
        goto fail;
    s->creds = xd_srv.creds;
    s->creds->refs++;
    if ((r = gnutls_priority_set(s->tls, xd_srv.priority)) < 0)
        goto fail;
    if (s->initiator) {
        /* Our certificate for this host (SASL EXTERNAL), SNI for theirs. */
        host = xd_tls_host_index(s->host);
        if (host < 0 || host >= s->creds->nclient) {
            r = GNUTLS_E_INVALID_REQUEST;
            goto fail;
        }
        if ((r = gnutls_credentials_set(s->tls, GNUTLS_CRD_CERTIFICATE, s->creds->client[host])) <
                0 ||
            (r = gnutls_server_name_set(s->tls, GNUTLS_NAME_DNS, s->s2s->remote, strlen(s->s2s->remote))) <
                0)
            goto fail;
    } else {
        if ((r = gnutls_credentials_set(s->tls, GNUTLS_CRD_CERTIFICATE, s->creds->cred)) < 0)
            goto fail;
        /* A peer server authenticates with its certificate; clients do not. */
        gnutls_certificate_server_set_request(s->tls, s->type == XD_STREAM_S2S
                                                          ? GNUTLS_CERT_REQUEST
                                                          : GNUTLS_CERT_IGNORE);
    }
    gnutls_transport_set_int(s->tls, s->fd);
    gnutls_handshake_set_timeout(s->tls, 0);
    s->tls_handshaking = 1;
    return 0;
fail:
    xd_warn("%s: TLS setup failed: %s", s->peer, gnutls_strerror(r));
    return -1;
}

/* Start or continue the handshake. */
void
xd_session_start_tls(xd_session *s)
{
    int r;

    if (!s->tls && tls_setup(s) != 0) {
        xd_session_kill(s);
        return;
    }
    r = gnutls_handshake(s->tls);
    if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
        if (gnutls_record_get_direction(s->tls)) {
            ev_io_stop(xd_srv.loop, &s->rio);
            ev_io_start(xd_srv.loop, &s->wio);
        } else {
            ev_io_stop(xd_srv.loop, &s->wio);
            ev_io_start(xd_srv.loop, &s->rio);
        }
        return;
    }
    if (r < 0) {
        xd_info("%s: TLS handshake failed: %s", s->peer, gnutls_strerror(r));
        xd_session_kill(s);
        return;
    }
    s->tls_handshaking = 0;
    s->tls_up = 1;
    ev_io_stop(xd_srv.loop, &s->wio);
    ev_io_start(xd_srv.loop, &s->rio);
    {
        char *desc = gnutls_session_get_desc(s->tls);
        xd_debug("%s: TLS up: %s", s->peer, desc ? desc : "?");
        gnutls_free(desc);
    }
    if (s->initiator)
        xd_stream_send_header(s); /* the stream (re)starts on the encrypted channel */
    if (s->out_len)
        session_flush(s);
}

/* ---- reading ------------------------------------------------------------------ */

static ssize_t
sock_read(xd_session *s, char *buf, size_t len)
{
    ssize_t n;
    if (s->tls_up) {
        n = gnutls_record_recv(s->tls, buf, len);
        if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED)
            return -2;
        if (n == GNUTLS_E_PREMATURE_TERMINATION)
            return 0;
        if (n < 0) {
            xd_info("%s: TLS read error: %s", s->peer, gnutls_strerror((int)n));
            return -1;
        }
        return n;
    }
    n = recv(s->fd, buf, len, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return -2;
    if (n < 0)
        xd_debug("%s: read error: %s", s->peer, strerror(errno));
    return n;
}

/* One read buffer for every session: an idle client costs none of it. */
static char read_buf[XD_READ_CHUNK];

static void
input_free(xd_session *s)
{
    free(s->in_own);
    s->in = s->in_own = NULL;
    s->in_len = 0;
}

/*
 * After parsing: a chunk the stream has not finished with (paused before or
 * inside it) must outlive the shared buffer; one it is done with is let go.
 */
static void
keep_input(xd_session *s)
{
    if (!s->in_pending && !s->suspended) {
        input_free(s);
        return;
    }
    if (s->in != read_buf)
        return;
    if (!(s->in_own = malloc(s->in_len ? s->in_len : 1))) {
        xd_error("%s: out of memory keeping input", s->peer);
        s->in = NULL;
        xd_session_kill(s);
        return;
    }
    memcpy(s->in_own, read_buf, s->in_len);
    s->in = s->in_own;
}

static void
read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    xd_session *s = w->data;
    (void)loop;
    (void)revents;

    if (s->lingering) {
        drain(s);
        return;
    }
    if (s->tls_handshaking) {
        xd_session_start_tls(s);
        return;
    }
    /* Bounded: a flood on one socket must not starve the others. */
    for (int round = 0; round < 8; round++) {
        ssize_t n;
        if (s->dead || s->closing || s->paused || s->in_pending || s->tls_handshaking ||
            s->tls_start_after_flush)
            return;
        n = sock_read(s, read_buf, sizeof(read_buf));
        if (n == -2)
            return;
        if (n <= 0) {
            if (n == 0)
                xd_debug("%s: connection closed by peer", s->peer);
            connection_lost(s);
            return;
        }
        input_free(s);
        s->last_input = ev_now(loop);
        s->in = read_buf;
        s->in_len = (size_t)n;
        s->bytes_in += (uint64_t)n;
        s->in_pending = 1;
        xd_stream_input(s);
        keep_input(s);
    }
}

/* ---- writing ------------------------------------------------------------------ */

static void
session_flush(xd_session *s)
{
    while (s->out_len > s->out_off) {
        size_t len = s->out_len - s->out_off;
        ssize_t n;
        if (s->tls_handshaking)
            return; /* written once the handshake is done */
        if (s->tls_up) {
            if (s->tls_retry_len)
                len = s->tls_retry_len;
            n = gnutls_record_send(s->tls, s->out + s->out_off, len);
            if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) {
                s->tls_retry_len = len;
                ev_io_start(xd_srv.loop, &s->wio);
                return;
            }
            s->tls_retry_len = 0;
        } else {
            n = send(s->fd, s->out + s->out_off, len, MSG_NOSIGNAL);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
                ev_io_start(xd_srv.loop, &s->wio);
                return;
            }
        }
        if (n < 0) {
            xd_debug("%s: write failed", s->peer);
            connection_lost(s);
            return;
        }
        s->out_off += (size_t)n;
    }
    /* All written: an idle session keeps no output buffer. */
    s->out_off = s->out_len = 0;
    free(s->out);
    s->out = NULL;
    s->out_cap = 0;
    ev_io_stop(xd_srv.loop, &s->wio);
    if (s->tls_start_after_flush) {
        /* <proceed/> is on the wire: from here on the socket speaks TLS. */
        s->tls_start_after_flush = 0;
        xd_session_start_tls(s);
    }
}

/*
 * Output is written once per loop turn, just before the loop waits: what a
 * turn sends to one client (a burst of messages, an ack, a presence flood)
 * goes out in as few TLS records and system calls as possible.
 */
static void
queue_flush(xd_session *s)
{
    if (s->flush_queued)
        return;
    s->flush_queued = 1;
    s->flush_prev = NULL;
    s->flush_next = to_flush;
    if (to_flush)
        to_flush->flush_prev = s;
    to_flush = s;
}

static void
unqueue_flush(xd_session *s)
{
    if (!s->flush_queued)
        return;
    if (s->flush_prev)
        s->flush_prev->flush_next = s->flush_next;
    else
        to_flush = s->flush_next;
    if (s->flush_next)
        s->flush_next->flush_prev = s->flush_prev;
    s->flush_queued = 0;
    s->flush_next = s->flush_prev = NULL;
}

static void
flush_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    while (to_flush) {
        xd_session *s = to_flush;
        unqueue_flush(s);
        if (s->dead || s->fd < 0 || ev_is_active(&s->wio))
            continue;
        session_flush(s);
        /* A closing stream is done once its last bytes are out. */
        if (s->closing && !s->close_waits && !s->dead && s->out_len == 0 && !s->tls_handshaking)
            linger(s);
    }
}

int
xd_session_send_raw(xd_session *s, const char *data, size_t len)
{
    if (s->dead || s->detached || s->lingering)
        return -1;
    if (s->out_len - s->out_off + len > XD_OUT_MAX) {
        xd_warn("%s: peer is not reading; %zu bytes queued; closing", s->peer,
                s->out_len - s->out_off);
        xd_session_kill(s);
        return -1;
    }
    if (s->out_off >= 65536 && !s->tls_retry_len) {
        /* Reclaim what was written so a busy stream's buffer does not creep. */
        memmove(s->out, s->out + s->out_off, s->out_len - s->out_off);
        s->out_len -= s->out_off;
        s->out_off = 0;
    }
    if (s->out_len + len > s->out_cap) {
        size_t cap = s->out_cap ? s->out_cap : 4096;
        char *p;
        while (cap < s->out_len + len)
            cap *= 2;
        if (!(p = realloc(s->out, cap))) {
            xd_session_kill(s);
            return -1;
        }
        s->out = p;
        s->out_cap = cap;
    }
    memcpy(s->out + s->out_len, data, len);
    s->out_len += len;
    if (!ev_is_active(&s->wio))
        queue_flush(s);
    return 0;
}

/* ---- output that waits for the disk -------------------------------------------- */

static void arm_durable(void);

static void
deferred_clear(xd_session *s)
{
    while (s->deferred) {
        xd_deferred *d = s->deferred;
        s->deferred = d->next;
        free(d);
    }
    s->deferred_tail = NULL;
    if (!s->durable_waiting)
        return;
    if (s->dwait_prev)
        s->dwait_prev->dwait_next = s->dwait_next;
    else
        to_durable = s->dwait_next;
    if (s->dwait_next)
        s->dwait_next->dwait_prev = s->dwait_prev;
    s->durable_waiting = 0;
    s->dwait_next = s->dwait_prev = NULL;
}

/* Queue bytes behind what already waits; commit 0: wait only for those. */
static int
defer(xd_session *s, const char *data, size_t len, uint64_t commit)
{
    xd_deferred *d = malloc(sizeof(*d) + len);

    if (!d) {
        xd_session_kill(s); /* the ack or result would be lost: end the stream */
        return -1;
    }
    d->next = NULL;
    d->commit = commit;
    d->len = len;
    memcpy(d->data, data, len);
    if (s->deferred_tail)
        s->deferred_tail->next = d;
    else
        s->deferred = d;
    s->deferred_tail = d;
    if (!s->durable_waiting) {
        s->durable_waiting = 1;
        s->dwait_prev = NULL;
        s->dwait_next = to_durable;
        if (to_durable)
            to_durable->dwait_prev = s;
        to_durable = s;
    }
    arm_durable();
    return 0;
}

/* Write what the disk has caught up with; 1 if some still waits. */
static int
release_durable(xd_session *s)
{
    while (s->deferred && xd_store_is_durable(s->deferred->commit)) {
        xd_deferred *d = s->deferred;
        int r;
        s->deferred = d->next;
        if (!s->deferred)
            s->deferred_tail = NULL;
        r = xd_session_send_raw(s, d->data, d->len);
        free(d);
        if (r != 0) {
            deferred_clear(s); /* gone: what it never got was never acknowledged */
            return 0;
        }
    }
    return s->deferred != NULL;
}

/*
 * The disk caught up: write what waited for it, session by session.  Writing
 * can end sessions and so run hooks that write to others; a call from in
 * there (a waiter that was already due) only asks for one more pass.
 */
static void
deferred_cb(void *data)
{
    static int running, again;
    xd_session *next;
    (void)data;

    durable_armed = 0;
    if (running) {
        again = 1;
        return;
    }
    running = 1;
    do {
        again = 0;
        for (xd_session *s = to_durable; s; s = next) {
            next = s->dwait_next;
            if (release_durable(s))
                continue;
            deferred_clear(s);
            if (s->close_waits && !s->dead) {
                s->close_waits = 0;
                send_close(s, s->close_cond, s->close_text);
            }
        }
    } while (again);
    running = 0;
    arm_durable(); /* unless a call from in there already did */
}

/* One storage waiter for every session: the oldest commit anyone waits for. */
static void
arm_durable(void)
{
    uint64_t first = UINT64_MAX;

    if (durable_armed || !to_durable)
        return;
    for (xd_session *s = to_durable; s; s = s->dwait_next)
        if (s->deferred && s->deferred->commit < first)
            first = s->deferred->commit;
    durable_armed = 1;
    if (xd_store_when_durable(first, deferred_cb, NULL, NULL) != 0)
        durable_armed = 0; /* logged; retried at the next defer() */
}

int
xd_session_send_durable(xd_session *s, const char *data, size_t len)
{
    uint64_t commit = xd_store_commits();

    if (s->dead || s->detached || s->lingering || s->closing)
        return -1;
    if (!s->deferred && xd_store_is_durable(commit))
        return xd_session_send_raw(s, data, len);
    return defer(s, data, len, commit);
}

/* An IQ result or error to a client says its request is done: it goes out
 * only once what the request wrote is durable. */
static int
needs_disk(const xd_session *s, xmpp_stanza_t *st)
{
    const char *name, *type;

    if (s->type != XD_STREAM_C2S || !(name = xmpp_stanza_get_name(st)) || strcmp(name, "iq"))
        return 0;
    type = xmpp_stanza_get_type(st);
    return type && (!strcmp(type, "result") || !strcmp(type, "error"));
}

static int
is_routable(xmpp_stanza_t *st)
{
    const char *n = xmpp_stanza_get_name(st);
    return n && (!strcmp(n, "message") || !strcmp(n, "presence") || !strcmp(n, "iq"));
}

/* Top-level stanzas inherit the stream's default namespace. */
static void
strip_stream_ns(xmpp_stanza_t *st)
{
    const char *ns = xmpp_stanza_get_ns(st);
    if (ns && (strcmp(ns, "jabber:client") == 0 || strcmp(ns, "jabber:server") == 0))
        xmpp_stanza_del_attribute(st, "xmlns");
}

static int write_stanza(xd_session *s, xmpp_stanza_t *st);

int
xd_session_send(xd_session *s, xmpp_stanza_t *st)
{
    if (!st)
        return -1;
    if (s->initiator && !s->authenticated && is_routable(st)) {
        /* Never on an outgoing stream that has not proved its peer. */
        xd_warn("%s: refusing to send a stanza before %s is authenticated", s->peer, s->s2s->remote);
        xmpp_stanza_release(st);
        return -1;
    }
    if (s->type == XD_STREAM_C2S && s->bound && !s->dead && !s->closing && is_routable(st)) {
        xd_event ev = {.session = s, .stanza = st, .from = &s->jid};
        /* HANDLED: a module holds it (CSI) and sends it later with
         * xd_session_send_held(); DROP: discarded. */
        if (xd_hooks_run(XD_HOOK_STANZA_OUT, &ev) != XD_PASS || s->detached) {
            xmpp_stanza_release(st); /* kept by whoever holds or queues it */
            return 0;
        }
    }
    return write_stanza(s, st);
}

int
xd_session_send_held(xd_session *s, xd_module *m, xmpp_stanza_t *st)
{
    if (!st)
        return -1;
    if (s->type != XD_STREAM_C2S || !s->bound || s->dead || s->closing) {
        xmpp_stanza_release(st);
        return -1;
    }
    xd_event ev = {.session = s, .stanza = st, .from = &s->jid};
    if (xd_hooks_run_after(XD_HOOK_STANZA_OUT, m, &ev) != XD_PASS || s->detached) {
        xmpp_stanza_release(st);
        return 0;
    }
    return write_stanza(s, st);
}

/* Serialize and queue; takes st. */
static int
write_stanza(xd_session *s, xmpp_stanza_t *st)
{
    char *buf = NULL;
    size_t len = 0;
    int r = -1;

    if (!s->dead && !s->closing) {
        strip_stream_ns(st);
        if (xmpp_stanza_to_text(st, &buf, &len) == XMPP_EOK) {
            uint64_t commit = needs_disk(s, st) ? xd_store_commits() : 0;
            /* In order: behind whatever already waits for the disk. */
            if (s->deferred || !xd_store_is_durable(commit))
                r = defer(s, buf, len, commit);
            else
                r = xd_session_send_raw(s, buf, len);
            xmpp_free(xd_ctx(), buf);
        }
    }
    xmpp_stanza_release(st);
    return r;
}

/* ---- closing ------------------------------------------------------------------ */

/* Drop the connection (socket, TLS, parser input, output) but not the session. */
static void
drop_connection(xd_session *s)
{
    ev_io_stop(xd_srv.loop, &s->rio);
    ev_io_stop(xd_srv.loop, &s->wio);
    ev_timer_stop(xd_srv.loop, &s->timer);
    ev_timer_stop(xd_srv.loop, &s->pause_timer);
    if (s->tls) {
        gnutls_deinit(s->tls);
        s->tls = NULL;
    }
    s->tls_up = s->tls_handshaking = s->tls_start_after_flush = 0;
    s->tls_retry_len = 0;
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
    s->out_off = s->out_len = 0;
    input_free(s);
    s->in_pending = s->suspended = s->paused = 0;
}

/* XEP-0198 5: a resumable session outlives its connection for a while. */
static void
connection_lost(xd_session *s)
{
    if (s->dead)
        return;
    if (s->resume_timeout <= 0 || !s->bound || s->ending || s->closing || s->detached ||
        xd_srv.stopping) {
        xd_session_kill(s);
        return;
    }
    xd_info("%s: connection of %s lost; resumable for %.0f s", s->peer, s->full,
            s->resume_timeout);
    drop_connection(s);
    s->detached = 1;
    ev_timer_set(&s->timer, s->resume_timeout, 0.);
    ev_timer_start(xd_srv.loop, &s->timer);
}

/* SESSION_END hooks may write to other sessions, whose failure may end them
 * and write back to this one: `ending` makes this run once per session. */
static void
unbind(xd_session *s)
{
    if (s->bound && !s->ending) {
        xd_event ev = {.session = s, .from = &s->jid};
        s->ending = 1;
        xd_hooks_run(XD_HOOK_SESSION_END, &ev);
        xd_router_unbind(s);
    }
}

void
xd_session_close(xd_session *s, const char *condition, const char *text)
{
    if (s->dead || s->closing)
        return;
    if (s->connecting) {
        xd_session_kill(s); /* nothing was said yet */
        return;
    }
    if (condition)
        xd_info("%s: closing stream: %s%s%s", s->peer, condition, text ? ": " : "", text ? text : "");
    s->closing = 1; /* first: nothing routed to it from here on */
    unbind(s);
    if (s->dead)
        return;
    ev_io_stop(xd_srv.loop, &s->rio);
    ev_timer_stop(xd_srv.loop, &s->pause_timer);
    if (s->detached) {
        xd_session_kill(s); /* no one to tell */
        return;
    }
    /* Linger until the output is flushed, but not for ever. */
    ev_timer_stop(xd_srv.loop, &s->timer);
    ev_timer_set(&s->timer, 5., 0.);
    ev_timer_start(xd_srv.loop, &s->timer);
    if (s->deferred) {
        /* A result or ack waits for the disk (e.g. the answer to an account
         * removal): the close goes out after it, as the peer expects. */
        s->close_waits = 1;
        s->close_cond = condition ? strdup(condition) : NULL;
        s->close_text = text ? strdup(text) : NULL;
        return;
    }
    send_close(s, condition, text);
}

/* The stream error or </stream:stream>, then the lingering close. */
static void
send_close(xd_session *s, const char *condition, const char *text)
{
    if (condition)
        xd_stream_send_error(s, condition, text);
    else {
        if (!s->header_sent)
            xd_stream_send_header(s);
        xd_session_send_raw(s, "</stream:stream>", 16);
    }
    if (!s->dead && s->out_len == 0 && !s->tls_handshaking)
        linger(s);
}

void
xd_session_kill(xd_session *s)
{
    if (s->dead)
        return;
    s->dead = 1; /* first: re-entry through the hooks below stops here */
    s->detached = 0;
    unbind(s);
    if (!s->closed_hook_run) {
        xd_event ev = {.session = s};
        s->closed_hook_run = 1;
        xd_hooks_run(XD_HOOK_STREAM_CLOSED, &ev);
    }
    ev_io_stop(xd_srv.loop, &s->rio);
    ev_io_stop(xd_srv.loop, &s->wio);
    ev_timer_stop(xd_srv.loop, &s->timer);
    ev_timer_stop(xd_srv.loop, &s->pause_timer);
    s->dead_next = graveyard;
    graveyard = s;
}

void
xd_session_destroy(xd_session *s)
{
    xd_router_unbind(s); /* normally done at close; never leave freed keys in the tables */
    unqueue_flush(s);
    deferred_clear(s);
    if (s->prev)
        s->prev->next = s->next;
    else
        xd_srv.sessions = s->next;
    if (s->next)
        s->next->prev = s->prev;
    xd_srv.nsessions--;
    for (int i = 0; i < s->nslots; i++)
        if (s->mslots[i].data && s->mslots[i].free_fn)
            s->mslots[i].free_fn(s->mslots[i].data);
    free(s->mslots);
    if (s->tls) {
        if (s->tls_up)
            gnutls_bye(s->tls, GNUTLS_SHUT_WR); /* best effort, non-blocking */
        gnutls_deinit(s->tls);
    }
    xd_tls_creds_release(s->creds);
    if (s->fd >= 0)
        close(s->fd);
    xd_stream_free(s);
    if (s->presence)
        xmpp_stanza_release(s->presence);
    free(s->out);
    free(s->in_own);
    free(s->close_cond);
    free(s->close_text);
    free(s->s2s);
    free(s->full);
    free(s->bare);
    xd_debug("%s: session destroyed", s->peer);
    free(s);
}

static void
graveyard_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    while (graveyard) {
        xd_session *s = graveyard;
        graveyard = s->dead_next;
        xd_session_destroy(s);
    }
}

/* Idle clients are most of a server's sessions: their parsers can go. */
static void
idle_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    double now = ev_now(loop);
    unsigned freed = 0;
    (void)w;
    (void)revents;
    for (xd_session *s = xd_srv.sessions; s; s = s->next)
        if (!s->dead && !s->closing && !s->in_pending && !s->suspended && !s->paused &&
            now - s->last_input >= IDLE_AFTER)
            freed += (unsigned)xd_xmlstream_idle(s->xs);
    if (freed)
        xd_debug("%u idle stream(s) let their parser go", freed);
}

void
xd_graveyard_init(void)
{
    ev_timer_init(&idle_w, idle_cb, IDLE_AFTER, IDLE_AFTER);
    ev_timer_start(xd_srv.loop, &idle_w);
    ev_unref(xd_srv.loop);
    ev_prepare_init(&flush_w, flush_cb);
    ev_set_priority(&flush_w, EV_MAXPRI); /* before the graveyard frees anyone */
    ev_prepare_start(xd_srv.loop, &flush_w);
    ev_unref(xd_srv.loop);
    ev_prepare_init(&graveyard_w, graveyard_cb);
    ev_prepare_start(xd_srv.loop, &graveyard_w);
    ev_unref(xd_srv.loop); /* the graveyard alone does not keep the loop alive */
}

/* SIGTERM: tell every stream, flush, and let the loop run out. */
void
xd_sessions_shutdown(void)
{
    for (xd_session *s = xd_srv.sessions; s; s = s->next)
        if (!s->dead)
            xd_session_close(s, "system-shutdown", NULL);
}

/* ---- the public session API ------------------------------------------------------ */

xd_stream_type
xd_session_type(const xd_session *s)
{
    return s->type;
}

int
xd_session_is_tls(const xd_session *s)
{
    return s->tls_up;
}

int
xd_session_is_authenticated(const xd_session *s)
{
    return s->authenticated;
}

int
xd_session_is_bound(const xd_session *s)
{
    return s->bound;
}

const char *
xd_session_host(const xd_session *s)
{
    return s->host;
}

const xd_jid *
xd_session_jid(const xd_session *s)
{
    return &s->jid;
}

const char *
xd_session_peer(const xd_session *s)
{
    return s->peer;
}

const struct sockaddr *
xd_session_addr(const xd_session *s)
{
    return (const struct sockaddr *)&s->addr;
}

void
xd_session_set_authenticated(xd_session *s, const char *localpart)
{
    snprintf(s->jid.local, sizeof(s->jid.local), "%s", localpart);
    snprintf(s->jid.domain, sizeof(s->jid.domain), "%s", s->host);
    s->jid.resource[0] = '\0';
    s->authenticated = 1;
    s->restart = XD_RESTART_STREAM;
}

void
xd_session_set_presence(xd_session *s, xmpp_stanza_t *presence)
{
    const char *type = xmpp_stanza_get_type(presence);
    xmpp_stanza_t *prio = xmpp_stanza_get_child_by_name(presence, "priority");

    if (s->presence)
        xmpp_stanza_release(s->presence);
    s->presence = NULL;
    s->priority = 0;
    s->available = !type || strcmp(type, "available") == 0;
    if (!s->available)
        return;
    s->presence = xmpp_stanza_copy(presence);
    if (prio) {
        char *t = xmpp_stanza_get_text(prio);
        if (t) {
            long v = strtol(t, NULL, 10);
            s->priority = v < -128 ? -128 : v > 127 ? 127 : (int)v;
            xmpp_free(xd_ctx(), t);
        }
    }
}

int
xd_session_is_available(const xd_session *s)
{
    return s->available;
}

int
xd_session_priority(const xd_session *s)
{
    return s->priority;
}

xmpp_stanza_t *
xd_session_presence(const xd_session *s)
{
    return s->presence;
}

void *
xd_session_get_data(const xd_session *s, const xd_module *m)
{
    return m->index < s->nslots ? s->mslots[m->index].data : NULL;
}

/* Room for n modules' data (one slot per loaded module). 0 ok, -1. */
static int
slots_reserve(xd_session *s, int n)
{
    struct xd_mslot *v;

    if (n <= s->nslots)
        return 0;
    if (n < xd_srv.nmodules)
        n = xd_srv.nmodules;
    if (!(v = realloc(s->mslots, (size_t)n * sizeof(*v))))
        return -1;
    memset(v + s->nslots, 0, (size_t)(n - s->nslots) * sizeof(*v));
    s->mslots = v;
    s->nslots = n;
    return 0;
}

void
xd_session_set_data(xd_session *s, xd_module *m, void *data, void (*free_fn)(void *))
{
    struct xd_mslot *slot;

    if (slots_reserve(s, m->index + 1) != 0) {
        xd_error("%s: out of memory for module data", s->peer);
        if (data && free_fn)
            free_fn(data);
        xd_session_kill(s);
        return;
    }
    slot = &s->mslots[m->index];
    if (slot->data && slot->free_fn && slot->data != data)
        slot->free_fn(slot->data);
    slot->data = data;
    slot->free_fn = free_fn;
}

unsigned
xd_session_stanzas_in(const xd_session *s)
{
    return s->stanzas_in;
}

void
xd_session_set_resumable(xd_session *s, double seconds)
{
    s->resume_timeout = s->type == XD_STREAM_C2S && seconds > 0 ? seconds : 0;
}

int
xd_session_is_detached(const xd_session *s)
{
    return s->detached;
}

int
xd_session_resume(xd_session *s, xd_session *old)
{
    char *tmp;

    if (s == old || s->type != XD_STREAM_C2S || old->type != XD_STREAM_C2S || s->dead ||
        s->closing || !s->authenticated || s->bound || old->dead || old->closing ||
        old->ending || !old->bound || strcmp(s->jid.local, old->jid.local) != 0 ||
        strcmp(s->jid.domain, old->jid.domain) != 0)
        return -1;
    if (slots_reserve(s, old->nslots) != 0)
        return -1; /* before anything moves */
    if (!old->detached)
        drop_connection(old); /* the client says that connection is dead */
    /* Identity and presence state. */
    s->jid = old->jid;
    tmp = s->full, s->full = old->full, old->full = tmp;
    tmp = s->bare, s->bare = old->bare, old->bare = tmp;
    if (s->presence)
        xmpp_stanza_release(s->presence);
    s->presence = old->presence;
    old->presence = NULL;
    s->available = old->available;
    s->presence_seen = old->presence_seen;
    s->priority = old->priority;
    s->stanzas_in = old->stanzas_in;
    s->resume_timeout = old->resume_timeout;
    for (int i = 0; i < old->nslots; i++) {
        if (old->mslots[i].data) {
            struct xd_mslot t = s->mslots[i];
            s->mslots[i] = old->mslots[i];
            old->mslots[i] = t;
        }
    }
    /* Its place in the routing tables, without unbinding. */
    xd_router_replace(old, s);
    old->bound = old->available = 0;
    old->detached = 0;
    ev_timer_stop(xd_srv.loop, &s->timer); /* negotiation is over */
    xd_info("%s: session %s resumed (was %s)", s->peer, s->full, old->peer);
    xd_session_kill(old);
    return 0;
}

void
xd_session_pause(xd_session *s, unsigned ms)
{
    if (s->dead || s->closing || s->detached)
        return;
    s->paused = 1;
    ev_io_stop(xd_srv.loop, &s->rio);
    ev_timer_stop(xd_srv.loop, &s->pause_timer);
    ev_timer_set(&s->pause_timer, ms / 1000., 0.);
    ev_timer_start(xd_srv.loop, &s->pause_timer);
}

/* ---- server-to-server ------------------------------------------------------------ */

uint64_t
xd_session_bytes_in(const xd_session *s)
{
    return s->bytes_in;
}

const char *
xd_session_listener(const xd_session *s)
{
    return s->listener ? s->listener->name : "";
}

int
xd_session_is_initiator(const xd_session *s)
{
    return s->initiator;
}

const char *
xd_session_stream_from(const xd_session *s)
{
    return s->s2s ? s->s2s->stream_from : "";
}

const char *
xd_session_peer_domain(const xd_session *s)
{
    return s->s2s ? s->s2s->peer_domain : "";
}

int
xd_session_set_peer_authenticated(xd_session *s, const char *domain)
{
    xd_jid peer;
    xd_event ev = {.session = s, .from = &peer};

    if (!s->s2s || !s->tls_up || strcmp(s->s2s->verified, domain) != 0) {
        xd_warn("%s: refusing to authenticate %s: its certificate was not verified for it",
                s->peer, domain);
        return -1;
    }
    memset(&peer, 0, sizeof(peer));
    snprintf(peer.domain, sizeof(peer.domain), "%s", domain);
    snprintf(s->s2s->peer_domain, sizeof(s->s2s->peer_domain), "%s", domain);
    if (xd_hooks_run(XD_HOOK_S2S_AUTH, &ev) == XD_DROP) {
        xd_info("%s: server %s refused by a module", s->peer, domain);
        s->s2s->peer_domain[0] = '\0';
        return -1;
    }
    s->authenticated = 1;
    s->restart = XD_RESTART_STREAM;
    ev_timer_stop(xd_srv.loop, &s->timer); /* negotiation is over */
    xd_info("%s: server %s authenticated (SASL EXTERNAL) for %s", s->peer, domain, s->host);
    return 0;
}

void
xd_session_initiator_authenticated(xd_session *s)
{
    /* Only after our own check of their certificate: a <success/> alone
     * proves nothing. */
    if (!s->initiator || !s->s2s || !s->tls_up || strcmp(s->s2s->verified, s->s2s->remote) != 0) {
        xd_warn("%s: %s claimed success before its certificate was verified", s->peer,
                s->s2s->remote);
        xd_session_close(s, "policy-violation", "authentication out of order");
        return;
    }
    snprintf(s->s2s->peer_domain, sizeof(s->s2s->peer_domain), "%s", s->s2s->remote);
    s->authenticated = 1;
    s->restart = XD_RESTART_STREAM;
    ev_timer_stop(xd_srv.loop, &s->timer);
}

static void
connect_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    xd_session *s = w->data;
    int err = 0;
    socklen_t len = sizeof(err);
    (void)revents;

    ev_io_stop(loop, w);
    if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
        err = errno;
    if (err) {
        xd_info("%s: connecting to %s failed: %s", s->peer, s->s2s->remote, strerror(err));
        xd_session_kill(s);
        return;
    }
    s->connecting = 0;
    ev_io_init(&s->wio, write_cb, s->fd, EV_WRITE);
    s->wio.data = s;
    xd_debug("%s: connected to %s for %s", s->peer, s->s2s->remote, s->host);
    if (s->direct_tls)
        xd_session_start_tls(s);
    else {
        ev_io_start(loop, &s->rio);
        xd_stream_send_header(s);
    }
}

xd_session *
xd_s2s_connect(xd_module *m, const char *local_host, const char *remote_domain,
               const struct sockaddr *sa, socklen_t len, int direct_tls)
{
    static const xd_listener outgoing = {.type = XD_STREAM_S2S, .tls = XD_TLS_STARTTLS};
    const xd_host *host_conf = local_host ? xd_config_host(local_host) : NULL;
    xd_session *s;
    int fd;
    (void)m;

    if (xd_srv.stopping || !host_conf || len > sizeof(struct sockaddr_storage))
        return NULL;
    fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        xd_warn("s2s: socket: %s", strerror(errno));
        return NULL;
    }
    if (connect(fd, sa, len) != 0 && errno != EINPROGRESS) {
        xd_info("s2s: connecting to %s failed at once: %s", remote_domain, strerror(errno));
        close(fd);
        return NULL;
    }
    if (!(s = calloc(1, sizeof(*s)))) {
        close(fd);
        return NULL;
    }
    s->type = XD_STREAM_S2S;
    s->listener = &outgoing;
    s->fd = fd;
    s->initiator = s->connecting = 1;
    s->direct_tls = direct_tls != 0;
    memcpy(&s->addr, sa, len);
    s->host = host_conf->domain;
    if (!(s->s2s = calloc(1, sizeof(*s->s2s))) || session_setup(s, connect_cb) != 0) {
        close(fd);
        free(s->s2s);
        free(s);
        return NULL;
    }
    snprintf(s->s2s->remote, sizeof(s->s2s->remote), "%s", remote_domain);
    ev_io_start(xd_srv.loop, &s->wio);
    ev_timer_start(xd_srv.loop, &s->timer);
    return s;
}

/* ---- peer certificates (RFC 6125, RFC 7590) ----------------------------------------- */

/* The SRV-ID for XMPP server streams: "_xmpp-server." + domain. */
static int
srv_id_matches(const char *val, size_t len, const char *domain)
{
    static const char svc[] = "_xmpp-server.";
    size_t n = sizeof(svc) - 1;
    return len == n + strlen(domain) && strncasecmp(val, svc, n) == 0 &&
           strncasecmp(val + n, domain, len - n) == 0;
}

/*
 * RFC 6125 6.4 / RFC 7590: the reference identity is the domain; presented
 * identities are DNS-IDs (checked by GnuTLS, wildcards only in the leftmost
 * label), SRV-IDs and XmppAddrs.  The CN is never used: GnuTLS would fall
 * back to it when there is no dNSName, so DNS-IDs are checked only when the
 * certificate has one.
 */
static int
identity_matches(gnutls_x509_crt_t crt, const char *domain)
{
    int has_dns = 0;
    for (unsigned i = 0; i < 64; i++) {
        char val[1100];
        size_t len = sizeof(val) - 1;
        int t = gnutls_x509_crt_get_subject_alt_name(crt, i, val, &len, NULL);
        if (t == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
            break;
        if (t < 0)
            continue;
        val[len < sizeof(val) ? len : sizeof(val) - 1] = '\0';
        if (t == GNUTLS_SAN_DNSNAME)
            has_dns = 1;
        else if (t == GNUTLS_SAN_OTHERNAME_XMPP) {
            xd_jid j;
            if (strlen(val) == len && xd_jid_parse(&j, val) == 0 && !j.local[0] &&
                !j.resource[0] && strcmp(j.domain, domain) == 0)
                return 1;
        } else if (t == GNUTLS_SAN_OTHERNAME_SRV) {
            if (srv_id_matches(val, len, domain))
                return 1;
        }
    }
    return has_dns && gnutls_x509_crt_check_hostname2(crt, domain, 0);
}

int
xd_session_verify_peer(xd_session *s, const char *domain, char *why, size_t whylen)
{
    const gnutls_datum_t *chain;
    unsigned int n = 0, status = 0;
    gnutls_x509_crt_t crt;
    int ok, r;

    snprintf(why, whylen, "ok");
    if (!s->tls_up || !xd_srv.trust) {
        snprintf(why, whylen, "%s", s->tls_up ? "no trust store configured" : "no TLS");
        return 0;
    }
    chain = gnutls_certificate_get_peers(s->tls, &n);
    if (!chain || n == 0) {
        snprintf(why, whylen, "the peer presented no certificate");
        return 0;
    }
    if ((r = gnutls_certificate_verify_peers2(s->tls, &status)) < 0) {
        snprintf(why, whylen, "verification failed: %s", gnutls_strerror(r));
        return 0;
    }
    if (status) {
        gnutls_datum_t out;
        if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) == 0) {
            snprintf(why, whylen, "%s", out.data);
            gnutls_free(out.data);
        } else
            snprintf(why, whylen, "certificate not trusted (status 0x%x)", status);
        return 0;
    }
    if (gnutls_x509_crt_init(&crt) < 0)
        return 0;
    if (gnutls_x509_crt_import(crt, &chain[0], GNUTLS_X509_FMT_DER) < 0) {
        gnutls_x509_crt_deinit(crt);
        snprintf(why, whylen, "unreadable certificate");
        return 0;
    }
    ok = identity_matches(crt, domain);
    gnutls_x509_crt_deinit(crt);
    if (!ok)
        snprintf(why, whylen, "the certificate does not name %s", domain);
    else
        snprintf(s->s2s->verified, sizeof(s->s2s->verified), "%s", domain);
    return ok;
}
