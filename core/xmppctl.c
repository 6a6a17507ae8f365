/*
 * xmppctl: account administration.  With the server running, the command
 * goes to it over the admin socket; without, xmppctl opens the storage
 * itself.  Either way xd_admin_exec() runs it (admin.c).
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "admin.h"
#include "server.h"
#include "store.h"

/* How long to wait while the storage is busy (a server starting up, another
 * xmppctl) and for a running server's answer. */
#define BUSY_WAIT_S 15
#define ANSWER_WAIT_S 60

#define NO_SERVER 2

static void
usage(FILE *f)
{
    fprintf(f, "usage: xmppctl --config FILE adduser JID [--password P]\n"
               "       xmppctl --config FILE passwd JID [--password P]\n"
               "       xmppctl --config FILE deluser JID\n"
               "       xmppctl --config FILE list [DOMAIN]\n"
               "       xmppctl --config FILE stats\n"
               "Without --password, the password is read from the first line of stdin.\n"
               "While xmppd runs, the command is sent to it (the socket %s in its data\n"
               "directory) and takes effect at once.\n", XD_ADMIN_SOCKET);
}

static char *
read_password(const char *given)
{
    char buf[1100];
    size_t n;
    if (given)
        return strdup(given);
    if (!fgets(buf, sizeof(buf), stdin))
        return NULL;
    n = strcspn(buf, "\r\n");
    buf[n] = '\0';
    return strdup(buf);
}

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Print a reply body: output to stdout, reasons to stderr. */
static int
finish(int ok, const char *body, size_t len)
{
    if (ok) {
        fwrite(body, 1, len, stdout);
        return 0;
    }
    fputs("xmppctl: ", stderr);
    fwrite(body, 1, len, stderr);
    if (!len || body[len - 1] != '\n')
        fputc('\n', stderr);
    return 1;
}

static int
write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Run the command on a running server: its exit code, or NO_SERVER. */
static int
via_server(const char *const *f, int nf)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    xd_admin_out req = {0};
    char *reply = NULL;
    size_t len = 0, cap = 0;
    double deadline = now() + ANSWER_WAIT_S;
    int fd, r = 1;

    if (xd_admin_socket_path(xd_srv.conf.data_dir, sa.sun_path, sizeof(sa.sun_path)) != 0)
        return NO_SERVER; /* the server could not listen there either */
    if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
        return NO_SERVER;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        int e = errno;
        close(fd);
        if (e == ENOENT || e == ECONNREFUSED)
            return NO_SERVER;
        fprintf(stderr, "xmppctl: %s: %s\n", sa.sun_path, strerror(e));
        return 1;
    }
    for (int i = 0; i < nf; i++)
        xd_admin_printf(&req, "%s\n", f[i]);
    if (req.failed || write_all(fd, req.buf, req.len) != 0 || shutdown(fd, SHUT_WR) != 0) {
        fprintf(stderr, "xmppctl: sending to the server: %s\n", strerror(errno));
        goto out;
    }
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        double left = deadline - now();
        ssize_t n;
        if (left <= 0 || poll(&p, 1, (int)(left * 1000) + 1) == 0) {
            fprintf(stderr, "xmppctl: no answer from the server in %d s; the command may "
                            "or may not have been done\n", ANSWER_WAIT_S);
            goto out;
        }
        if (len == cap) {
            char *b = realloc(reply, cap = cap ? cap * 2 : 4096);
            if (!b) {
                fprintf(stderr, "xmppctl: out of memory\n");
                goto out;
            }
            reply = b;
        }
        n = read(fd, reply + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            fprintf(stderr, "xmppctl: reading the answer: %s\n", strerror(errno));
            goto out;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    if (len >= 3 && !memcmp(reply, "ok\n", 3))
        r = finish(1, reply + 3, len - 3);
    else if (len >= 6 && !memcmp(reply, "error\n", 6))
        r = finish(0, reply + 6, len - 6);
    else
        fprintf(stderr, "xmppctl: the server closed without an answer; the command may or "
                        "may not have been done (see its log)\n");
out:
    if (req.buf)
        explicit_bzero(req.buf, req.cap);
    xd_admin_out_free(&req);
    free(reply);
    close(fd);
    return r;
}

/* No server: open the storage and run the command here. */
static int
locally(const char *const *f, int nf)
{
    xd_admin_out out = {0};
    int r;

    r = xd_admin_exec(nf - 1, f[0], nf > 1 ? f[1] : NULL, nf > 2 ? f[2] : NULL, &out);
    r = finish(r == 0, out.buf ? out.buf : "", out.len);
    xd_admin_out_free(&out);
    return r;
}

static int
run(const char *const *f, int nf)
{
    double deadline = now() + BUSY_WAIT_S;
    int r;

    xd_store_quiet_busy(1);
    for (;;) {
        if ((r = via_server(f, nf)) != NO_SERVER)
            return r;
        if ((r = xd_store_open(xd_srv.conf.data_dir)) == 0)
            break;
        if (r != XD_BUSY || now() > deadline) {
            fprintf(stderr, "xmppctl: cannot open the storage in %s%s\n", xd_srv.conf.data_dir,
                    r == XD_BUSY ? ": another process holds it and no server answers on "
                                   "its admin socket" : "");
            return 1;
        }
        usleep(50 * 1000); /* a server starting up, or another xmppctl */
    }
    r = locally(f, nf);
    xd_store_close();
    return r;
}

int
main(int argc, char **argv)
{
    const char *path = NULL, *password = NULL;
    const char *f[3];
    char *pw = NULL;
    int nf = 0, r;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config") && i + 1 < argc)
            path = argv[++i];
        else if (!strcmp(argv[i], "--password") && i + 1 < argc)
            password = argv[++i];
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else if (nf < 2)
            f[nf++] = argv[i];
        else {
            usage(stderr);
            return 1;
        }
    }
    if (!path || !nf) {
        usage(stderr);
        return 1;
    }
    if (!strcmp(f[0], "adduser") || !strcmp(f[0], "passwd")) {
        if (nf != 2) {
            usage(stderr);
            return 1;
        }
        const char *why;
        pw = read_password(password);
        why = !pw || !*pw                 ? "an empty password is not accepted"
              : strpbrk(pw, "\r\n") != NULL ? "a password cannot hold a line break"
                                            : NULL;
        if (why) {
            free(pw);
            fprintf(stderr, "xmppctl: %s\n", why);
            return 1;
        }
        f[nf++] = pw;
    }
    if (!xd_admin_known(f[0], nf - 1)) {
        usage(stderr);
        if (pw)
            explicit_bzero(pw, strlen(pw));
        free(pw);
        return 1;
    }
    if (xd_config_load(&xd_srv.conf, path) != 0)
        return 1;
    xd_log_setup(XD_LOG_WARN, 0);
    r = run(f, nf);
    if (pw)
        explicit_bzero(pw, strlen(pw));
    free(pw);
    xd_config_free(&xd_srv.conf);
    return r;
}
