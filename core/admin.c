/*
 * Account administration: the commands of xmppctl, and the admin socket
 * through which a running server takes them.
 *
 * Only one process may have the storage open (storage.c), so while xmppd
 * runs, xmppctl does not open it: it connects to ADMIN_SOCKET in the data
 * directory and the server runs the command itself.  That is also what
 * makes a command take effect at once: `deluser` ends the user's sessions
 * and lets the modules forget what they keep in memory, as an in-band
 * account removal does.  When no server runs, xmppctl takes the storage
 * and runs the same function, xd_admin_exec().
 *
 * The socket is mode 0600 in the 0700 data directory, and a peer must run
 * as root or as the server's user (SO_PEERCRED).  A request is at most
 * REQUEST_MAX bytes of fields, each ended by a newline, sent before the
 * client shuts down its side: the command, then its arguments (a password
 * is the last field, so it may hold anything but a newline or NUL).  The
 * reply is "ok\n" or "error\n", then the command's output, then the server
 * closes.  A change is answered only once it is on disk.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "admin.h"
#include "server.h"
#include "store.h"

#define REQUEST_MAX 4096
#define FIELDS_MAX 4
#define CONNS_MAX 8
#define CONN_TIMEOUT 30.0

/* ---- output ------------------------------------------------------------------ */

void
xd_admin_printf(xd_admin_out *o, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (o->failed)
        return;
    for (;;) {
        size_t room = o->cap - o->len;
        va_start(ap, fmt);
        n = vsnprintf(o->buf ? o->buf + o->len : NULL, o->buf ? room : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            o->failed = 1;
            return;
        }
        if (o->buf && (size_t)n < room) {
            o->len += (size_t)n;
            return;
        }
        size_t cap = o->cap ? o->cap * 2 : 256;
        while (cap < o->len + (size_t)n + 1)
            cap *= 2;
        char *b = realloc(o->buf, cap);
        if (!b) {
            o->failed = 1;
            return;
        }
        o->buf = b;
        o->cap = cap;
    }
}

void
xd_admin_out_free(xd_admin_out *o)
{
    free(o->buf);
    *o = (xd_admin_out){0};
}

/* ---- the commands -------------------------------------------------------------- */

/* A local account JID: localpart@served-host, no resource.  0, or -1 with
 * the reason in out. */
static int
account_jid(xd_jid *j, const char *s, xd_admin_out *out)
{
    if (xd_jid_parse(j, s) != 0) {
        xd_admin_printf(out, "'%s' is not a valid JID\n", s);
        return -1;
    }
    if (!j->local[0] || j->resource[0]) {
        xd_admin_printf(out, "'%s' must be a bare JID: user@host\n", s);
        return -1;
    }
    if (!xd_config_host(j->domain)) {
        xd_admin_printf(out, "'%s' is not a host this server serves\n", j->domain);
        return -1;
    }
    return 0;
}

static int
print_jid(const char *jid, void *data)
{
    xd_admin_printf(data, "%s\n", jid);
    return 0;
}

static void
print_counter(const char *name, const char *counter, unsigned long long value, void *data)
{
    xd_admin_printf(data, "%s.%s %llu\n", name, counter, value);
}

int
xd_admin_known(const char *cmd, int nargs)
{
    if (!cmd)
        return 0;
    if (!strcmp(cmd, "list"))
        return nargs <= 1;
    if (!strcmp(cmd, "stats"))
        return nargs == 0;
    if (!strcmp(cmd, "deluser"))
        return nargs == 1;
    if (!strcmp(cmd, "adduser") || !strcmp(cmd, "passwd"))
        return nargs == 2;
    return 0;
}

int
xd_admin_exec(int nargs, const char *cmd, const char *arg, const char *pw, xd_admin_out *out)
{
    xd_jid j;
    int r;

    if (!xd_admin_known(cmd, nargs)) {
        xd_admin_printf(out, "unknown command or wrong arguments\n");
        return -1;
    }
    if (!strcmp(cmd, "stats")) {
        xd_stats_foreach(print_counter, out);
        return 0;
    }
    if (!strcmp(cmd, "list")) {
        char dom[XD_JID_PART_MAX + 1];
        if (arg && (xd_jid_prep_domain(dom, sizeof(dom), arg) != 0 || !xd_config_host(dom))) {
            xd_admin_printf(out, "'%s' is not a host this server serves\n", arg);
            return -1;
        }
        if (xd_account_foreach(arg ? dom : NULL, print_jid, out) < 0) {
            xd_admin_printf(out, "could not read the accounts\n");
            return -1;
        }
        return 0;
    }
    if (account_jid(&j, arg, out) != 0)
        return -1;
    if (!strcmp(cmd, "deluser")) {
        r = xd_account_delete(&j);
        if (r == 0) {
            xd_close_user_sessions(&j, "not-authorized", "account removed");
            return 0;
        }
        xd_admin_printf(out, r == XD_NOTFOUND ? "no such user: %s\n" : "could not delete %s\n",
                        arg);
        return -1;
    }
    if (!pw || !*pw) {
        xd_admin_printf(out, "an empty password is not accepted\n");
        return -1;
    }
    if (!strcmp(cmd, "adduser")) {
        r = xd_account_create(&j, pw);
        if (r != 0)
            xd_admin_printf(out, r == -2 ? "user exists: %s\n" : "could not create %s\n", arg);
    } else {
        r = xd_account_set_password(&j, pw);
        if (r != 0)
            xd_admin_printf(out, r == XD_NOTFOUND ? "no such user: %s\n"
                                                  : "could not change the password of %s\n",
                            arg);
    }
    return r == 0 ? 0 : -1;
}

/* ---- the socket (server side) ---------------------------------------------------- */

typedef struct conn {
    int fd;
    ev_io io;
    ev_timer timer;
    char in[REQUEST_MAX];
    size_t inlen;
    xd_admin_out out;
    size_t sent;
    int waiting; /* for the disk; the store holds a pointer to us */
    int dead;    /* closed while waiting: freed by the waiter */
    struct conn *next, **prev;
} conn;

static struct {
    int fd;
    ev_io io;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    conn *conns;
    int nconns;
} admin = {.fd = -1};

static void
conn_free(conn *c)
{
    explicit_bzero(c->in, sizeof(c->in));
    xd_admin_out_free(&c->out);
    free(c);
}

static void
conn_close(conn *c)
{
    ev_io_stop(xd_srv.loop, &c->io);
    ev_timer_stop(xd_srv.loop, &c->timer);
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    *c->prev = c->next;
    if (c->next)
        c->next->prev = c->prev;
    admin.nconns--;
    if (admin.fd >= 0 && !ev_is_active(&admin.io))
        ev_io_start(xd_srv.loop, &admin.io); /* was full: take the next */
    if (c->waiting)
        c->dead = 1;
    else
        conn_free(c);
}

/* Answered: read and drop what the client still sends (closing with unread
 * input would reset the connection before it read the answer) until it
 * closes, or the timer ends it. */
static void
drain_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    conn *c = w->data;
    char buf[4096];
    ssize_t n;
    (void)loop;
    (void)revents;

    while ((n = read(c->fd, buf, sizeof(buf))) > 0)
        ;
    if (n == 0 || (errno != EAGAIN && errno != EINTR))
        conn_close(c);
}

static void
write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    conn *c = w->data;
    (void)revents;

    while (c->sent < c->out.len) {
        ssize_t n = write(c->fd, c->out.buf + c->sent, c->out.len - c->sent);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n <= 0) {
            xd_debug("admin: write: %s", strerror(errno));
            conn_close(c);
            return;
        }
        c->sent += (size_t)n;
    }
    shutdown(c->fd, SHUT_WR);
    ev_io_stop(loop, &c->io);
    ev_io_init(&c->io, drain_cb, c->fd, EV_READ);
    c->io.data = c;
    ev_io_start(loop, &c->io);
}

static void
start_reply(conn *c)
{
    ev_io_stop(xd_srv.loop, &c->io);
    ev_io_init(&c->io, write_cb, c->fd, EV_WRITE);
    c->io.data = c;
    ev_io_start(xd_srv.loop, &c->io);
}

static void
durable_cb(void *data)
{
    conn *c = data;
    c->waiting = 0;
    if (c->dead)
        conn_free(c);
    else
        start_reply(c);
}

static void
dropped_cb(void *data)
{
    conn *c = data;
    c->waiting = 0;
    if (c->dead) {
        conn_free(c);
        return;
    }
    /* The store closed first: say so rather than "ok". */
    c->out.len = 0;
    xd_admin_printf(&c->out, "error\nthe server stopped before the change was on disk\n");
    start_reply(c);
}

/* The whole request is in: run it and answer (after the disk, if it wrote). */
static void
run_request(conn *c)
{
    const char *f[FIELDS_MAX] = {0};
    xd_admin_out out = {0};
    uint64_t before = xd_store_commits();
    char *p = c->in, *end = c->in + c->inlen;
    int n = 0, r;

    if (memchr(c->in, '\0', c->inlen)) {
        xd_admin_printf(&c->out, "error\na request holds no NUL byte\n");
        start_reply(c);
        return;
    }
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl || n == FIELDS_MAX) {
            xd_admin_printf(&c->out, "error\nmalformed request\n");
            start_reply(c);
            return;
        }
        *nl = '\0';
        f[n++] = p;
        p = nl + 1;
    }
    r = xd_admin_exec(n - 1, n ? f[0] : NULL, n > 1 ? f[1] : NULL, n > 2 ? f[2] : NULL, &out);
    xd_info("admin: %s%s%s: %s", n ? f[0] : "(empty)", n > 1 ? " " : "", n > 1 ? f[1] : "",
            r == 0 ? "ok" : "refused");
    xd_admin_printf(&c->out, "%s\n", r == 0 ? "ok" : "error");
    if (out.len)
        xd_admin_printf(&c->out, "%.*s", (int)out.len, out.buf);
    if (out.failed)
        c->out.failed = 1;
    xd_admin_out_free(&out);
    explicit_bzero(c->in, sizeof(c->in));
    if (c->out.failed) {
        conn_close(c);
        return;
    }
    if (xd_store_commits() != before && !xd_store_is_durable(xd_store_commits())) {
        c->waiting = 1;
        ev_io_stop(xd_srv.loop, &c->io);
        if (xd_store_when_durable(xd_store_commits(), durable_cb, dropped_cb, c) != 0) {
            c->waiting = 0;
            conn_close(c); /* cannot promise it: no answer, xmppctl says so */
        }
        return;
    }
    start_reply(c);
}

static void
read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    conn *c = w->data;
    ssize_t n;
    (void)loop;
    (void)revents;

    if (c->inlen == sizeof(c->in)) {
        xd_admin_printf(&c->out, "error\nrequest over %d bytes\n", REQUEST_MAX);
        start_reply(c);
        return;
    }
    n = read(c->fd, c->in + c->inlen, sizeof(c->in) - c->inlen);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n < 0) {
        conn_close(c);
        return;
    }
    if (n > 0) {
        c->inlen += (size_t)n;
        return;
    }
    run_request(c); /* end of the request */
}

static void
timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    conn *c = w->data;
    (void)loop;
    (void)revents;
    xd_info("admin: a connection timed out");
    conn_close(c); /* if a reply waits for the disk, the waiter frees it */
}

static int
peer_allowed(int fd)
{
    struct ucred cred;
    socklen_t len = sizeof(cred);

    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
        return 0;
    return cred.uid == 0 || cred.uid == getuid();
}

static void
accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)w;
    (void)revents;
    for (int i = 0; i < 16; i++) {
        int fd;
        conn *c;

        if (admin.nconns >= CONNS_MAX) {
            /* the rest wait in the listen queue until one is done */
            ev_io_stop(loop, &admin.io);
            return;
        }
        fd = accept4(admin.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR)
                xd_warn("admin: accept: %s", strerror(errno));
            return;
        }
        if (!peer_allowed(fd)) {
            xd_warn("admin: refused a connection from another user");
            close(fd);
            continue;
        }
        if (!(c = calloc(1, sizeof(*c)))) {
            xd_warn("admin: out of memory, a connection refused");
            close(fd);
            continue;
        }
        c->fd = fd;
        c->next = admin.conns;
        c->prev = &admin.conns;
        if (admin.conns)
            admin.conns->prev = &c->next;
        admin.conns = c;
        admin.nconns++;
        ev_io_init(&c->io, read_cb, fd, EV_READ);
        c->io.data = c;
        ev_io_start(loop, &c->io);
        ev_timer_init(&c->timer, timeout_cb, CONN_TIMEOUT, 0.);
        c->timer.data = c;
        ev_timer_start(loop, &c->timer);
    }
}

int
xd_admin_socket_path(const char *data_dir, char *buf, size_t len)
{
    int n = snprintf(buf, len, "%s/%s", data_dir, XD_ADMIN_SOCKET);
    return n < 0 || (size_t)n >= len ? -1 : 0;
}

int
xd_admin_open(void)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    mode_t old;
    int fd;

    if (xd_admin_socket_path(xd_srv.conf.data_dir, sa.sun_path, sizeof(sa.sun_path)) != 0) {
        xd_error("admin: data_dir '%s' is too long for the admin socket's path (at most %zu "
                 "bytes with /%s)", xd_srv.conf.data_dir, sizeof(sa.sun_path) - 1,
                 XD_ADMIN_SOCKET);
        return -1;
    }
    /* We hold the data directory's lock: a socket file left there is a
     * dead server's. */
    unlink(sa.sun_path);
    if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)) < 0) {
        xd_error("admin: socket: %s", strerror(errno));
        return -1;
    }
    old = umask(0177);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, CONNS_MAX) != 0) {
        umask(old);
        xd_error("admin: %s: %s", sa.sun_path, strerror(errno));
        close(fd);
        return -1;
    }
    umask(old);
    memcpy(admin.path, sa.sun_path, sizeof(admin.path));
    admin.fd = fd;
    ev_io_init(&admin.io, accept_cb, fd, EV_READ);
    ev_io_start(xd_srv.loop, &admin.io);
    xd_debug("admin: listening on %s", admin.path);
    return 0;
}

void
xd_admin_close(void)
{
    if (admin.fd < 0)
        return;
    ev_io_stop(xd_srv.loop, &admin.io);
    close(admin.fd);
    admin.fd = -1;
    unlink(admin.path);
    while (admin.conns)
        conn_close(admin.conns);
}
