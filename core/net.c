/* Listening sockets (IPv4 and IPv6) and accepting connections. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "session.h"

static int
set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void
retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    xd_listener *l = w->data;
    (void)revents;
    if (l->fd >= 0)
        ev_io_start(loop, &l->io);
}

/* Out of descriptors: the socket stays readable, so stop watching it for a
 * moment instead of spinning (and logging) until one is free. */
static void
accept_pause(xd_listener *l)
{
    xd_warn("listener %s:%d: out of file descriptors (%d sessions); pausing accept for 1 s",
            l->address, l->port, xd_srv.nsessions);
    ev_io_stop(xd_srv.loop, &l->io);
    ev_timer_stop(xd_srv.loop, &l->retry);
    ev_timer_set(&l->retry, 1., 0.);
    ev_timer_start(xd_srv.loop, &l->retry);
}

static void
accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    xd_listener *l = w->data;
    (void)loop;
    (void)revents;
    /* Bounded, so one busy listener cannot hold the loop. */
    for (int i = 0; i < 64; i++) {
        struct sockaddr_storage sa;
        socklen_t len = sizeof(sa);
        int one = 1;
        int fd = accept4(l->fd, (struct sockaddr *)&sa, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                accept_pause(l);
            else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
                     errno != ECONNABORTED)
                xd_warn("listener %s:%d: accept: %s", l->address, l->port, strerror(errno));
            return;
        }
        if (xd_srv.stopping) {
            close(fd);
            continue;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (!xd_session_new(l, fd, (struct sockaddr *)&sa, len))
            close(fd);
    }
}

static int
open_one(xd_listener *l)
{
    struct addrinfo hints = {0}, *ai = NULL;
    char port[8];
    int one = 1, r, fd;

    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV;
    snprintf(port, sizeof(port), "%d", l->port);
    snprintf(l->name, sizeof(l->name), strchr(l->address, ':') ? "[%s]:%d" : "%s:%d", l->address,
             l->port);
    if ((r = getaddrinfo(l->address, port, &hints, &ai)) != 0) {
        xd_error("%s:%d: listener address '%s' is not a numeric IPv4 or IPv6 address: %s",
                 xd_srv.conf.path, l->line, l->address, gai_strerror(r));
        return -1;
    }
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto fail;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (ai->ai_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 511) != 0 || set_nonblock(fd))
        goto fail;
    freeaddrinfo(ai);
    l->fd = fd;
    ev_io_init(&l->io, accept_cb, fd, EV_READ);
    l->io.data = l;
    ev_timer_init(&l->retry, retry_cb, 1., 0.);
    l->retry.data = l;
    ev_io_start(xd_srv.loop, &l->io);
    xd_info("listening on %s port %d (%s, %s)", l->address, l->port,
            l->type == XD_STREAM_C2S ? "c2s" : "s2s", l->tls == XD_TLS_DIRECT ? "direct TLS" : "STARTTLS");
    return 0;
fail:
    xd_error("%s:%d: cannot listen on %s port %d: %s", xd_srv.conf.path, l->line, l->address,
             l->port, strerror(errno));
    if (fd >= 0)
        close(fd);
    freeaddrinfo(ai);
    return -1;
}

int
xd_listeners_open(void)
{
    for (int i = 0; i < xd_srv.conf.nlisteners; i++)
        if (open_one(&xd_srv.conf.listeners[i]) != 0)
            return -1;
    return 0;
}

void
xd_listeners_close(void)
{
    for (int i = 0; i < xd_srv.conf.nlisteners; i++) {
        xd_listener *l = &xd_srv.conf.listeners[i];
        if (l->fd >= 0) {
            ev_io_stop(xd_srv.loop, &l->io);
            ev_timer_stop(xd_srv.loop, &l->retry);
            close(l->fd);
            l->fd = -1;
        }
    }
}
