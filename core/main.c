/* xmppd: start-up, signals, shutdown. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "admin.h"
#include "session.h"
#include "store.h"

static ev_signal sig_term, sig_int, sig_hup, sig_usr1;
static ev_timer drain_w;

static void
usage(FILE *f)
{
    fprintf(f, "usage: xmppd --config FILE      run in the foreground\n"
               "       xmppd --check-config FILE validate FILE and the modules it lists\n"
               "       xmppd --version\n");
}

static void
drain_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    /* Streams got <system-shutdown/>; wait (bounded) for them to flush. */
    if (xd_srv.nsessions == 0 || ev_now(loop) - (ev_tstamp)(intptr_t)w->data > 3.)
        ev_break(loop, EVBREAK_ALL);
}

/* Close the listeners, tell every stream, and let the loop run out. */
static void
shut_down(struct ev_loop *loop)
{
    if (xd_srv.stopping)
        return;
    xd_srv.stopping = 1;
    xd_listeners_close();
    xd_admin_close();
    xd_sessions_shutdown();
    xd_store_flush();
    ev_timer_init(&drain_w, drain_cb, 0.02, 0.02);
    drain_w.data = (void *)(intptr_t)ev_now(loop);
    ev_timer_start(loop, &drain_w);
}

static void
stop_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)revents;
    if (!xd_srv.stopping)
        xd_info("signal %d: shutting down", w->signum);
    shut_down(loop);
}

/* Nothing more can be made durable, so nothing more may be acknowledged. */
static void
storage_failed(void)
{
    xd_error("storage: the log cannot be written to disk; shutting down");
    shut_down(xd_srv.loop);
}

static void
hup_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    xd_event ev = {0};
    xd_info("SIGHUP: reloading certificates and module files");
    xd_tls_reload();
    xd_hooks_run(XD_HOOK_RELOAD, &ev);
}

static void
usr1_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    xd_stats_log();
}

/*
 * Every session is a descriptor: take the hard limit, so the server holds as
 * many clients as the operator allowed (systemd's LimitNOFILE, ulimit -Hn)
 * without a wrapper script raising the soft one.
 */
static void
raise_fd_limit(void)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= rl.rlim_max)
        return;
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        xd_warn("could not raise the open-file limit: %s", strerror(errno));
    else
        xd_debug("open-file limit raised to %llu", (unsigned long long)rl.rlim_cur);
}

/* Everything but the store and the sockets: shared by --check-config. */
static int
setup(const char *path)
{
    if (xd_config_load(&xd_srv.conf, path) != 0)
        return -1;
    xd_log_setup(xd_srv.conf.log_level, xd_srv.conf.log_syslog);
    xd_srv.loop = ev_default_loop(EVFLAG_AUTO);
    xmpp_initialize();
    xd_srv.ctx = xmpp_ctx_new(NULL, NULL);
    if (!xd_srv.loop || !xd_srv.ctx || xd_router_init() != 0)
        return -1;
    if (xd_tls_init() != 0)
        return -1;
    return 0;
}

/* The storage is one process's at a time: wait a little for an xmppctl that
 * has it (a second server waits, then gives up). */
static int
open_store(void)
{
    const char *dir = xd_srv.conf.data_dir;
    int r;

    xd_store_quiet_busy(1);
    for (int i = 0; (r = xd_store_open(dir)) == XD_BUSY && i < 50; i++) {
        if (i == 0)
            xd_info("storage: %s is in use; waiting up to 5 s", dir);
        usleep(100 * 1000);
    }
    xd_store_quiet_busy(0);
    if (r == XD_BUSY)
        r = xd_store_open(dir); /* once more, to log who has it */
    return r;
}

static void
teardown(void)
{
    xd_admin_close();
    xd_modules_unload();
    xd_store_close();
    if (xd_srv.creds)
        xd_tls_creds_release(xd_srv.creds);
    if (xd_srv.priority)
        gnutls_priority_deinit(xd_srv.priority);
    xd_router_free();
    if (xd_srv.ctx)
        xmpp_ctx_free(xd_srv.ctx);
    xmpp_shutdown();
    free(xd_srv.ca_file);
    xd_srv.ca_file = NULL;
    xd_config_free(&xd_srv.conf);
}

int
main(int argc, char **argv)
{
    const char *path = NULL;
    int check = 0;

    for (int i = 1; i < argc; i++) {
        if ((!strcmp(argv[i], "--config") || !strcmp(argv[i], "-c")) && i + 1 < argc)
            path = argv[++i];
        else if (!strcmp(argv[i], "--check-config") && i + 1 < argc) {
            path = argv[++i];
            check = 1;
        } else if (!strcmp(argv[i], "--version")) {
            printf("xmppd %s (module ABI %d)\n", XD_VERSION, XD_MODULE_ABI);
            return 0;
        } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "xmppd: unexpected argument '%s'\n", argv[i]);
            usage(stderr);
            return 1;
        }
    }
    if (!path) {
        usage(stderr);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGUSR1, SIG_IGN); /* stats, once the loop runs: never fatal before */
    if (setup(path) != 0) {
        teardown();
        return 1;
    }
    if (check) {
        int r = xd_modules_load();
        teardown();
        if (r == 0)
            printf("%s: ok\n", path);
        return r == 0 ? 0 : 1;
    }
    raise_fd_limit();
    if (open_store() != 0 || xd_store_start_flusher(xd_srv.loop, storage_failed) != 0 ||
        xd_modules_load() != 0 || xd_listeners_open() != 0 || xd_admin_open() != 0) {
        xd_error("xmppd did not start (see above)");
        xd_listeners_close();
        teardown();
        return 1;
    }
    xd_graveyard_init();
    ev_signal_init(&sig_term, stop_cb, SIGTERM);
    ev_signal_init(&sig_int, stop_cb, SIGINT);
    ev_signal_init(&sig_hup, hup_cb, SIGHUP);
    ev_signal_start(xd_srv.loop, &sig_term);
    ev_signal_start(xd_srv.loop, &sig_int);
    ev_signal_start(xd_srv.loop, &sig_hup);
    ev_signal_init(&sig_usr1, usr1_cb, SIGUSR1);
    ev_signal_start(xd_srv.loop, &sig_usr1);
    xd_info("xmppd %s started with %d module(s)", XD_VERSION, xd_srv.nmodules);
    ev_run(xd_srv.loop, 0);

    /* What waited for the disk goes out to the streams still open. */
    xd_store_flush();
    /* Whatever is left (a peer that never read its shutdown notice). */
    while (xd_srv.sessions) {
        xd_session *s = xd_srv.sessions;
        if (!s->dead)
            xd_session_kill(s);
        xd_session_destroy(s);
    }
    xd_listeners_close();
    xd_stats_log();
    teardown();
    xd_info("xmppd stopped");
    return 0;
}
