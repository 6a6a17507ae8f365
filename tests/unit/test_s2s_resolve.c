/*
 * Unit tests for modules/s2s_external/resolve.c: RFC 2782 ordering, the
 * XEP-0368 / RFC 6120 §3.2 resolution against a private dnsmasq, fallback,
 * SRV target ".", NXDOMAIN, timeout, cancel and free at awkward moments.
 *
 * dnsmasq runs in the foreground on a free loopback port with --local=/test/
 * so that every unknown *.test name gets NXDOMAIN and nothing is forwarded.
 * Every wait is bounded by a wall-clock deadline.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "server.h" /* core: xd_srv, for the loop */
#include "resolve.h"

#ifndef DNSMASQ /* meson passes the full path */
#define DNSMASQ "dnsmasq"
#endif

static char fake_module[256]; /* opaque owner: the core only stores the pointer */
#define MOD ((xd_module *)fake_module)

static struct {
    pid_t pid;
    int port;
    char dir[64];
    char servers[64];  /* "127.0.0.1:port" of dnsmasq */
    char silent[64];   /* a bound UDP port that never answers */
    int silent_fd;
    ev_timer tick;     /* keeps EVRUN_ONCE from blocking forever */
} env = {.pid = -1, .silent_fd = -1};

/* ---- helpers -------------------------------------------------------------- */

static double
mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

typedef struct result {
    int calls;
    int seq; /* global order of the call */
    int n;
    s2s_addr addrs[S2S_MAX_ADDRS];
    char err[128];
    /* optional actions from inside the callback */
    s2s_resolver *free_r;
    s2s_query *cancel_q;
    s2s_query *self;
    s2s_resolver *again_r;
    struct result *again_res;
} result;

static void
rec_cb(void *data, const s2s_addr *addrs, int n, const char *err)
{
    static int seq;
    result *res = data;
    res->calls++;
    res->seq = ++seq;
    res->n = n;
    if (n > 0)
        memcpy(res->addrs, addrs, (size_t)n * sizeof(*addrs));
    snprintf(res->err, sizeof(res->err), "%s", err ? err : "");
    if (res->cancel_q)
        s2s_resolve_cancel(res->cancel_q);
    if (res->self)
        s2s_resolve_cancel(res->self); /* own query: must be a harmless no-op */
    if (res->again_r)
        assert_non_null(s2s_resolve(res->again_r, "plain.test", rec_cb, res->again_res));
    if (res->free_r)
        s2s_resolver_free(res->free_r);
}

/* Run the loop until *calls >= want or `seconds` of wall clock pass. */
static void
run_until(const int *calls, int want, double seconds)
{
    double end = mono() + seconds;
    while ((!calls || *calls < want) && mono() < end)
        ev_run(xd_srv.loop, EVRUN_ONCE);
}

static const char *
addr_str(const s2s_addr *a, char *buf, size_t len)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (a->sa.ss_family == AF_INET) {
        const struct sockaddr_in *s = (const struct sockaddr_in *)&a->sa;
        inet_ntop(AF_INET, &s->sin_addr, ip, sizeof(ip));
        port = ntohs(s->sin_port);
        snprintf(buf, len, "%s:%d", ip, port);
    } else if (a->sa.ss_family == AF_INET6) {
        const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)&a->sa;
        inet_ntop(AF_INET6, &s->sin6_addr, ip, sizeof(ip));
        port = ntohs(s->sin6_port);
        snprintf(buf, len, "[%s]:%d", ip, port);
    } else {
        snprintf(buf, len, "?");
    }
    return buf;
}

/* Assert addrs[i] is exactly "ip:port" / "[ip6]:port" with the given mode and host. */
static void
check_addr(const result *res, int i, const char *want, int tls, const char *host)
{
    char buf[80];
    assert_true(i < res->n);
    assert_string_equal(addr_str(&res->addrs[i], buf, sizeof(buf)), want);
    assert_int_equal(res->addrs[i].direct_tls, tls);
    assert_string_equal(res->addrs[i].host, host);
    assert_int_equal(res->addrs[i].len, res->addrs[i].sa.ss_family == AF_INET
                                            ? sizeof(struct sockaddr_in)
                                            : sizeof(struct sockaddr_in6));
}

static int
find_addr(const result *res, const char *want)
{
    char buf[80];
    for (int i = 0; i < res->n; i++)
        if (!strcmp(addr_str(&res->addrs[i], buf, sizeof(buf)), want))
            return i;
    return -1;
}

/* Resolve one domain on a fresh resolver and wait (bounded) for the answer. */
static void
resolve_one(const char *servers, double timeout, const char *domain, result *res)
{
    s2s_resolver *r = s2s_resolver_new(MOD, servers, timeout);
    assert_non_null(r);
    memset(res, 0, sizeof(*res));
    assert_non_null(s2s_resolve(r, domain, rec_cb, res));
    assert_int_equal(res->calls, 0); /* never synchronous */
    run_until(&res->calls, 1, timeout + 3);
    s2s_resolver_free(r);
    assert_int_equal(res->calls, 1);
}

/* ---- dnsmasq -------------------------------------------------------------- */

static int
free_port(void)
{
    struct sockaddr_in sin;
    socklen_t len = sizeof(sin);
    int u = socket(AF_INET, SOCK_DGRAM, 0), t = socket(AF_INET, SOCK_STREAM, 0), port = -1;
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (u >= 0 && t >= 0 && bind(u, (struct sockaddr *)&sin, sizeof(sin)) == 0 &&
        getsockname(u, (struct sockaddr *)&sin, &len) == 0 &&
        bind(t, (struct sockaddr *)&sin, sizeof(sin)) == 0) /* TCP too: dnsmasq wants both */
        port = ntohs(sin.sin_port);
    if (u >= 0)
        close(u);
    if (t >= 0)
        close(t);
    return port;
}

/* One A query for plain.test; 1 when dnsmasq answers within 100 ms. */
static int
dns_ping(int port)
{
    static const unsigned char q[] = {0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0,
                                      5, 'p', 'l', 'a', 'i', 'n', 4, 't', 'e', 's', 't', 0,
                                      0, 1, 0, 1};
    unsigned char buf[512];
    struct sockaddr_in sin;
    struct pollfd pfd;
    int ok = 0, fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0)
        return 0;
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)port);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (sendto(fd, q, sizeof(q), 0, (struct sockaddr *)&sin, sizeof(sin)) == (ssize_t)sizeof(q)) {
        pfd.fd = fd;
        pfd.events = POLLIN;
        if (poll(&pfd, 1, 100) == 1 && recv(fd, buf, sizeof(buf), 0) >= 12 && buf[0] == 0x12)
            ok = 1;
    }
    close(fd);
    return ok;
}

static const char *const records[] = {
    /* a.test: one xmpp and one xmpps record, the xmpps one with v4 + v6 */
    "--srv-host=_xmpp-server._tcp.a.test,host1.a.test,5270,10,5",
    "--srv-host=_xmpps-server._tcp.a.test,host2.a.test,5223,5,0",
    "--host-record=host1.a.test,127.0.0.11",
    "--host-record=host2.a.test,127.0.0.12,::1",
    /* plain.test: no SRV at all: A fallback on 5269 */
    "--host-record=plain.test,127.0.0.13",
    /* dot.test: _xmpp-server is "." (no target): no s2s, and no fallback */
    "--srv-host=_xmpp-server._tcp.dot.test",
    "--host-record=dot.test,127.0.0.14",
    /* tlsdot.test: only _xmpps-server is ".": still falls back to 5269 */
    "--srv-host=_xmpps-server._tcp.tlsdot.test",
    "--host-record=tlsdot.test,127.0.0.15",
    /* mix.test: priorities interleaved across services, one dead target */
    "--srv-host=_xmpp-server._tcp.mix.test,ha.mix.test,5269,10,0",
    "--srv-host=_xmpps-server._tcp.mix.test,hb.mix.test,5270,10,0",
    "--srv-host=_xmpp-server._tcp.mix.test,hc.mix.test,5271,20,0",
    "--srv-host=_xmpps-server._tcp.mix.test,hd.mix.test,5272,1,0",
    "--srv-host=_xmpp-server._tcp.mix.test,missing.mix.test,5273,15,0",
    "--host-record=ha.mix.test,127.0.1.1",
    "--host-record=hb.mix.test,127.0.1.2",
    "--host-record=hc.mix.test,127.0.1.3",
    "--host-record=hd.mix.test,127.0.1.4",
    /* many.test: 10 targets x (v4 + v6) = 20 addresses, capped at 16 */
    "--srv-host=_xmpp-server._tcp.many.test,m0.many.test,6000,0,0",
    "--srv-host=_xmpp-server._tcp.many.test,m1.many.test,6001,1,0",
    "--srv-host=_xmpp-server._tcp.many.test,m2.many.test,6002,2,0",
    "--srv-host=_xmpp-server._tcp.many.test,m3.many.test,6003,3,0",
    "--srv-host=_xmpp-server._tcp.many.test,m4.many.test,6004,4,0",
    "--srv-host=_xmpp-server._tcp.many.test,m5.many.test,6005,5,0",
    "--srv-host=_xmpp-server._tcp.many.test,m6.many.test,6006,6,0",
    "--srv-host=_xmpp-server._tcp.many.test,m7.many.test,6007,7,0",
    "--srv-host=_xmpp-server._tcp.many.test,m8.many.test,6008,8,0",
    "--srv-host=_xmpp-server._tcp.many.test,m9.many.test,6009,9,0",
    "--host-record=m0.many.test,127.0.2.0,fd00::10",
    "--host-record=m1.many.test,127.0.2.1,fd00::11",
    "--host-record=m2.many.test,127.0.2.2,fd00::12",
    "--host-record=m3.many.test,127.0.2.3,fd00::13",
    "--host-record=m4.many.test,127.0.2.4,fd00::14",
    "--host-record=m5.many.test,127.0.2.5,fd00::15",
    "--host-record=m6.many.test,127.0.2.6,fd00::16",
    "--host-record=m7.many.test,127.0.2.7,fd00::17",
    "--host-record=m8.many.test,127.0.2.8,fd00::18",
    "--host-record=m9.many.test,127.0.2.9,fd00::19",
};

static pid_t
spawn_dnsmasq(int port)
{
    char portarg[32], pidarg[128], logarg[128];
    const char *argv[64];
    int argc = 0;
    pid_t pid;

    snprintf(portarg, sizeof(portarg), "--port=%d", port);
    snprintf(pidarg, sizeof(pidarg), "--pid-file=%s/pid", env.dir);
    snprintf(logarg, sizeof(logarg), "--log-facility=%s/log", env.dir);
    argv[argc++] = "dnsmasq";
    argv[argc++] = "--keep-in-foreground";
    argv[argc++] = "--conf-file=/dev/null";
    argv[argc++] = "--no-resolv";
    argv[argc++] = "--no-hosts";
    argv[argc++] = "--bind-interfaces";
    argv[argc++] = "--listen-address=127.0.0.1";
    argv[argc++] = "--local=/test/"; /* unknown *.test: NXDOMAIN, never forwarded */
    argv[argc++] = "--user=root";
    argv[argc++] = "--group=root";
    argv[argc++] = portarg;
    argv[argc++] = pidarg;
    argv[argc++] = logarg;
    for (size_t i = 0; i < sizeof(records) / sizeof(records[0]); i++)
        argv[argc++] = records[i];
    argv[argc] = NULL;

    pid = fork();
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDWR);
        if (devnull >= 0) {
            dup2(devnull, 0);
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        execvp(DNSMASQ, (char *const *)argv);
        _exit(127);
    }
    return pid;
}

static int
group_setup(void **state)
{
    struct sockaddr_in sin;
    socklen_t len = sizeof(sin);
    (void)state;

    signal(SIGPIPE, SIG_IGN);
    xd_srv.loop = ev_default_loop(0);
    snprintf(env.dir, sizeof(env.dir), "/tmp/test_s2s_resolve.XXXXXX");
    if (!mkdtemp(env.dir))
        return -1;

    for (int attempt = 0; attempt < 5 && env.pid < 0; attempt++) {
        int port = free_port(), up = 0;
        pid_t pid;
        if (port <= 0)
            continue;
        pid = spawn_dnsmasq(port);
        if (pid < 0)
            return -1;
        for (double end = mono() + 5; mono() < end;) {
            int st;
            if (waitpid(pid, &st, WNOHANG) == pid) { /* died: port taken? try another */
                pid = -1;
                break;
            }
            if (dns_ping(port)) {
                up = 1;
                break;
            }
        }
        if (up) {
            env.pid = pid;
            env.port = port;
        } else if (pid > 0) {
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
        }
    }
    if (env.pid < 0) {
        fprintf(stderr, "could not start dnsmasq (see %s/log)\n", env.dir);
        return -1;
    }
    snprintf(env.servers, sizeof(env.servers), "127.0.0.1:%d", env.port);

    /* A bound socket that never reads: queries vanish, no ICMP refusal. */
    env.silent_fd = socket(AF_INET, SOCK_DGRAM, 0);
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (env.silent_fd < 0 || bind(env.silent_fd, (struct sockaddr *)&sin, sizeof(sin)) < 0 ||
        getsockname(env.silent_fd, (struct sockaddr *)&sin, &len) < 0)
        return -1;
    snprintf(env.silent, sizeof(env.silent), "127.0.0.1:%d", ntohs(sin.sin_port));
    return 0;
}

static int
group_teardown(void **state)
{
    char path[128];
    (void)state;
    if (env.pid > 0) {
        kill(env.pid, SIGTERM);
        for (double end = mono() + 3; mono() < end;) {
            if (waitpid(env.pid, NULL, WNOHANG) == env.pid) {
                env.pid = -1;
                break;
            }
            usleep(10000);
        }
        if (env.pid > 0) {
            kill(env.pid, SIGKILL);
            waitpid(env.pid, NULL, 0);
        }
    }
    if (env.silent_fd >= 0)
        close(env.silent_fd);
    snprintf(path, sizeof(path), "%s/pid", env.dir);
    unlink(path);
    snprintf(path, sizeof(path), "%s/log", env.dir);
    unlink(path);
    rmdir(env.dir);
    return 0;
}

static void
tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
}

static int
setup(void **state)
{
    (void)state;
    ev_timer_init(&env.tick, tick_cb, 0.02, 0.02);
    ev_timer_start(xd_srv.loop, &env.tick);
    return 0;
}

static int
teardown(void **state)
{
    (void)state;
    ev_timer_stop(xd_srv.loop, &env.tick);
    return 0;
}

/* ---- ordering ------------------------------------------------------------- */

static s2s_srv
srv(const char *t, int port, int prio, int weight, int tls)
{
    s2s_srv s;
    memset(&s, 0, sizeof(s));
    snprintf(s.target, sizeof(s.target), "%s", t);
    s.port = (unsigned short)port;
    s.priority = (unsigned short)prio;
    s.weight = (unsigned short)weight;
    s.direct_tls = tls;
    return s;
}

static void
test_order_merge(void **state)
{
    s2s_srv tls[2], plain[3], out[5];
    (void)state;
    plain[0] = srv("p20", 1, 20, 0, 0);
    plain[1] = srv("p10", 2, 10, 0, 0);
    plain[2] = srv("p5", 3, 5, 0, 0);
    tls[0] = srv("t10", 4, 10, 0, 1);
    tls[1] = srv("t30", 5, 30, 0, 1);
    assert_int_equal(s2s_srv_order(out, tls, 2, plain, 3), 5);
    /* priority ascending; at 10 the direct TLS record first (XEP-0368) */
    assert_string_equal(out[0].target, "p5");
    assert_string_equal(out[1].target, "t10");
    assert_int_equal(out[1].direct_tls, 1);
    assert_string_equal(out[2].target, "p10");
    assert_string_equal(out[3].target, "p20");
    assert_string_equal(out[4].target, "t30");
    /* empty inputs */
    assert_int_equal(s2s_srv_order(out, NULL, 0, NULL, 0), 0);
}

static void
test_order_weights(void **state)
{
    s2s_srv in[3], out[3];
    int first[3] = {0, 0, 0}, runs = 4000;
    (void)state;
    /* all weight 0: kept as published */
    in[0] = srv("a", 1, 1, 0, 0);
    in[1] = srv("b", 1, 1, 0, 0);
    in[2] = srv("c", 1, 1, 0, 0);
    for (int i = 0; i < 50; i++) {
        assert_int_equal(s2s_srv_order(out, NULL, 0, in, 3), 3);
        assert_string_equal(out[0].target, "a");
        assert_string_equal(out[2].target, "c");
    }
    /* weights 90 / 10 / 0: chosen first in proportion (w+0)/(sum+1), weight 0 rarely */
    in[0] = srv("w90", 1, 1, 90, 0);
    in[1] = srv("w10", 1, 1, 10, 0);
    in[2] = srv("w0", 1, 1, 0, 0);
    for (int i = 0; i < runs; i++) {
        s2s_srv_order(out, NULL, 0, in, 3);
        for (int k = 0; k < 3; k++)
            if (!strcmp(out[0].target, in[k].target))
                first[k]++;
        /* whatever comes first, all three are there */
        assert_true(strcmp(out[0].target, out[1].target) && strcmp(out[1].target, out[2].target) &&
                    strcmp(out[0].target, out[2].target));
    }
    assert_in_range(first[0], runs * 80 / 100, runs * 96 / 100);
    assert_in_range(first[1], runs * 5 / 100, runs * 16 / 100);
    assert_in_range(first[2], 0, runs * 4 / 100);
}

static void
test_order_cap(void **state)
{
    s2s_srv in[40], out[64];
    (void)state;
    for (int i = 0; i < 40; i++)
        in[i] = srv("x", i, 40 - i, 1, 0);
    assert_int_equal(s2s_srv_order(out, in, 40, in, 40), 2 * S2S_MAX_SRV);
    for (int i = 1; i < 2 * S2S_MAX_SRV; i++)
        assert_true(out[i - 1].priority <= out[i].priority);
}

/* ---- resolution against dnsmasq ---------------------------------------------- */

static void
test_srv_both(void **state)
{
    result res;
    int v6, v4;
    (void)state;
    resolve_one(env.servers, 5, "a.test", &res);
    assert_string_equal(res.err, "");
    assert_int_equal(res.n, 3);
    /* xmpps (priority 5) first: both its addresses, either order (RFC 6724) */
    v6 = find_addr(&res, "[::1]:5223");
    v4 = find_addr(&res, "127.0.0.12:5223");
    assert_in_range(v6, 0, 1);
    assert_in_range(v4, 0, 1);
    check_addr(&res, v6, "[::1]:5223", 1, "host2.a.test");
    check_addr(&res, v4, "127.0.0.12:5223", 1, "host2.a.test");
    /* then xmpp (priority 10), STARTTLS */
    check_addr(&res, 2, "127.0.0.11:5270", 0, "host1.a.test");
}

static void
test_fallback(void **state)
{
    result res;
    (void)state;
    resolve_one(env.servers, 5, "plain.test", &res);
    assert_string_equal(res.err, "");
    assert_int_equal(res.n, 1);
    check_addr(&res, 0, "127.0.0.13:5269", 0, "plain.test");
}

static void
test_srv_dot(void **state)
{
    result res;
    (void)state;
    /* "." for xmpp-server: the service is decidedly not available, no fallback */
    resolve_one(env.servers, 5, "dot.test", &res);
    assert_int_equal(res.n, 0);
    assert_string_equal(res.err, "service not available");
    /* "." for xmpps-server only: direct TLS is off, the fallback still applies */
    resolve_one(env.servers, 5, "tlsdot.test", &res);
    assert_string_equal(res.err, "");
    assert_int_equal(res.n, 1);
    check_addr(&res, 0, "127.0.0.15:5269", 0, "tlsdot.test");
}

static void
test_not_found(void **state)
{
    result res;
    (void)state;
    resolve_one(env.servers, 5, "nx.test", &res);
    assert_int_equal(res.n, 0);
    assert_string_equal(res.err, "not found");
}

static void
test_mix_order(void **state)
{
    result res;
    (void)state;
    resolve_one(env.servers, 5, "mix.test", &res);
    assert_string_equal(res.err, "");
    assert_int_equal(res.n, 4); /* missing.mix.test has no address: skipped */
    check_addr(&res, 0, "127.0.1.4:5272", 1, "hd.mix.test");
    check_addr(&res, 1, "127.0.1.2:5270", 1, "hb.mix.test");
    check_addr(&res, 2, "127.0.1.1:5269", 0, "ha.mix.test");
    check_addr(&res, 3, "127.0.1.3:5271", 0, "hc.mix.test");
}

static void
test_cap(void **state)
{
    result res;
    (void)state;
    resolve_one(env.servers, 5, "many.test", &res);
    assert_string_equal(res.err, "");
    assert_int_equal(res.n, S2S_MAX_ADDRS);
    /* SRV order kept: targets m0, m0, m1, m1, ... m7, m7 */
    for (int i = 0; i < res.n; i++) {
        char want[32];
        snprintf(want, sizeof(want), "m%d.many.test", i / 2);
        assert_string_equal(res.addrs[i].host, want);
        assert_int_equal(ntohs(((struct sockaddr_in *)&res.addrs[i].sa)->sin_port), 6000 + i / 2);
    }
    assert_true(find_addr(&res, "[fd00::10]:6000") >= 0);
    assert_true(find_addr(&res, "127.0.2.7:6007") >= 0);
}

static void
test_ip_literal(void **state)
{
    result res;
    (void)state;
    resolve_one(env.servers, 5, "192.0.2.1", &res);
    assert_int_equal(res.n, 1);
    check_addr(&res, 0, "192.0.2.1:5269", 0, "192.0.2.1");
    resolve_one(env.servers, 5, "[2001:db8::1]", &res);
    assert_int_equal(res.n, 1);
    check_addr(&res, 0, "[2001:db8::1]:5269", 0, "[2001:db8::1]");
}

static void
test_invalid_domain(void **state)
{
    char longname[S2S_MAX_DOMAIN + 2];
    result res;
    (void)state;
    memset(longname, 'a', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = '\0'; /* 1024 characters */
    resolve_one(env.servers, 5, longname, &res);
    assert_int_equal(res.n, 0);
    assert_string_equal(res.err, "invalid domain");
    resolve_one(env.servers, 5, "", &res);
    assert_string_equal(res.err, "invalid domain");
    /* 1023 is allowed by the bound, but no DNS name is that long */
    longname[S2S_MAX_DOMAIN] = '\0';
    resolve_one(env.servers, 5, longname, &res);
    assert_int_equal(res.n, 0);
    assert_true(res.err[0] != '\0');
}

static void
test_timeout(void **state)
{
    result res;
    double t0 = mono(), dt;
    unsigned it0 = ev_iteration(xd_srv.loop);
    (void)state;
    resolve_one(env.silent, 0.5, "a.test", &res);
    dt = mono() - t0;
    assert_int_equal(res.n, 0);
    assert_string_equal(res.err, "timeout");
    assert_true(dt > 0.4 && dt < 2.0);
    /* retransmits are timer-driven, not a busy loop: ~25 ticks + a few timers */
    assert_true(ev_iteration(xd_srv.loop) - it0 < 100);
}

static void
test_bad_servers(void **state)
{
    (void)state;
    assert_null(s2s_resolver_new(MOD, "not an address", 1));
}

/* ---- cancel and free ---------------------------------------------------------- */

static void
test_cancel(void **state)
{
    result a, b, c;
    s2s_resolver *r = s2s_resolver_new(MOD, env.servers, 5);
    s2s_resolver *slow = s2s_resolver_new(MOD, env.silent, 0.3);
    s2s_query *qa, *qc;
    (void)state;
    assert_non_null(r);
    assert_non_null(slow);
    memset(&a, 0, sizeof(a));
    memset(&b, 0, sizeof(b));
    memset(&c, 0, sizeof(c));
    qa = s2s_resolve(r, "a.test", rec_cb, &a);
    assert_non_null(s2s_resolve(r, "mix.test", rec_cb, &b));
    qc = s2s_resolve(slow, "a.test", rec_cb, &c);
    assert_non_null(qa);
    assert_non_null(qc);
    s2s_resolve_cancel(qa);
    s2s_resolve_cancel(qc);
    run_until(&b.calls, 1, 5);
    assert_int_equal(b.calls, 1);
    run_until(NULL, 0, 0.6); /* past the slow resolver's deadline */
    assert_int_equal(a.calls, 0);
    assert_int_equal(c.calls, 0);
    /* a cancelled invalid-domain query (already finished, not delivered) */
    qa = s2s_resolve(r, "", rec_cb, &a);
    s2s_resolve_cancel(qa);
    run_until(NULL, 0, 0.1);
    assert_int_equal(a.calls, 0);
    s2s_resolver_free(r);
    s2s_resolver_free(slow);
}

static void
test_free_pending(void **state)
{
    result res[4];
    s2s_resolver *r = s2s_resolver_new(MOD, env.servers, 5);
    s2s_resolver *slow = s2s_resolver_new(MOD, env.silent, 0.3);
    (void)state;
    assert_non_null(r);
    assert_non_null(slow);
    memset(res, 0, sizeof(res));
    assert_non_null(s2s_resolve(r, "a.test", rec_cb, &res[0]));
    assert_non_null(s2s_resolve(slow, "a.test", rec_cb, &res[2]));
    assert_non_null(s2s_resolve(slow, "plain.test", rec_cb, &res[3]));
    /* c-ares has sent the SRV queries already: answers are in flight.  (No
     * loop turn here: a fast dnsmasq can finish a.test within one.) */
    assert_non_null(s2s_resolve(r, "", rec_cb, &res[1])); /* done, not yet delivered */
    s2s_resolver_free(r);
    s2s_resolver_free(slow);
    run_until(NULL, 0, 0.6);
    for (int i = 0; i < 4; i++)
        if (res[i].calls)
            fail_msg("query %d called back: n=%d err=%s", i, res[i].n, res[i].err);
}

static void
test_free_in_callback(void **state)
{
    result first, second, third;
    s2s_resolver *r = s2s_resolver_new(MOD, env.servers, 5);
    (void)state;
    assert_non_null(r);
    memset(&first, 0, sizeof(first));
    memset(&second, 0, sizeof(second));
    memset(&third, 0, sizeof(third));
    first.free_r = r;
    /* two finished queries queued together, one still on the wire */
    assert_non_null(s2s_resolve(r, "", rec_cb, &first));
    assert_non_null(s2s_resolve(r, "", rec_cb, &second));
    assert_non_null(s2s_resolve(r, "a.test", rec_cb, &third));
    run_until(&first.calls, 1, 2);
    run_until(NULL, 0, 0.3);
    assert_int_equal(first.calls, 1);
    assert_int_equal(second.calls, 0);
    assert_int_equal(third.calls, 0);

    /* and from a callback driven by a DNS answer (inside the io path) */
    r = s2s_resolver_new(MOD, env.servers, 5);
    assert_non_null(r);
    memset(&first, 0, sizeof(first));
    memset(&second, 0, sizeof(second));
    first.free_r = r;
    assert_non_null(s2s_resolve(r, "plain.test", rec_cb, &first));
    assert_non_null(s2s_resolve(r, "many.test", rec_cb, &second));
    run_until(&first.calls, 1, 5);
    run_until(NULL, 0, 0.3);
    assert_int_equal(first.calls, 1);
    /* many.test may have been delivered before plain.test, never after */
    assert_true(second.calls == 0 || (second.calls == 1 && second.seq < first.seq));
}

static void
test_cancel_and_resolve_in_callback(void **state)
{
    result first, second, again;
    s2s_resolver *r = s2s_resolver_new(MOD, env.servers, 5);
    s2s_query *q1;
    (void)state;
    assert_non_null(r);
    memset(&first, 0, sizeof(first));
    memset(&second, 0, sizeof(second));
    memset(&again, 0, sizeof(again));
    q1 = s2s_resolve(r, "", rec_cb, &first);
    first.self = q1;
    first.cancel_q = s2s_resolve(r, "a.test", rec_cb, &second);
    first.again_r = r;
    first.again_res = &again;
    run_until(&again.calls, 1, 5);
    assert_int_equal(first.calls, 1);
    assert_int_equal(second.calls, 0);
    assert_int_equal(again.calls, 1);
    assert_int_equal(again.n, 1);
    check_addr(&again, 0, "127.0.0.13:5269", 0, "plain.test");
    s2s_resolver_free(r);
}

static void
test_many_parallel(void **state)
{
    static const char *const names[] = {"a.test", "plain.test", "nx.test", "mix.test",
                                        "dot.test", "many.test"};
    static const int want[] = {3, 1, 0, 4, 0, 16};
    result res[60];
    int total = 0;
    s2s_resolver *r = s2s_resolver_new(MOD, env.servers, 5);
    (void)state;
    assert_non_null(r);
    memset(res, 0, sizeof(res));
    for (int i = 0; i < 60; i++)
        assert_non_null(s2s_resolve(r, names[i % 6], rec_cb, &res[i]));
    for (double end = mono() + 5; total < 60 && mono() < end;) {
        ev_run(xd_srv.loop, EVRUN_ONCE);
        total = 0;
        for (int i = 0; i < 60; i++)
            total += res[i].calls;
    }
    for (int i = 0; i < 60; i++) {
        assert_int_equal(res[i].calls, 1);
        assert_int_equal(res[i].n, want[i % 6]);
    }
    s2s_resolver_free(r);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_order_merge),
        cmocka_unit_test(test_order_weights),
        cmocka_unit_test(test_order_cap),
        cmocka_unit_test_setup_teardown(test_srv_both, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fallback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_srv_dot, setup, teardown),
        cmocka_unit_test_setup_teardown(test_not_found, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mix_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cap, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ip_literal, setup, teardown),
        cmocka_unit_test_setup_teardown(test_invalid_domain, setup, teardown),
        cmocka_unit_test_setup_teardown(test_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_servers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_pending, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_in_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_and_resolve_in_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_many_parallel, setup, teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
