/*
 * Asynchronous DNS for outgoing server-to-server connections.
 *
 * Finds where to connect for a remote XMPP domain: SRV _xmpps-server._tcp
 * (XEP-0368, direct TLS) and _xmpp-server._tcp (RFC 6120 §3.2, STARTTLS),
 * ordered per RFC 2782, falling back to the domain's own A/AAAA on port
 * 5269.  Runs on the server's event loop through c-ares; nothing blocks.
 *
 * Ordering chosen (XEP-0368 §3 leaves the details to us):
 *  - each service's records are ordered on their own per RFC 2782
 *    (priority ascending; weighted random inside a priority, weight-0
 *    records placed first so they keep a small chance, as the RFC says);
 *  - the two lists are merged by priority; at equal priority every direct
 *    TLS record comes before every STARTTLS one (XEP-0368: prefer direct
 *    TLS when priorities tie).  Weights are not compared across services:
 *    the two record sets are published for different ports and need not
 *    use the same scale.
 *  - each target's addresses follow in c-ares order (RFC 6724 sorted, so
 *    IPv6 first where usable), at most S2S_MAX_ADDRS in all, duplicates
 *    dropped.
 */
#ifndef XMPPD_S2S_RESOLVE_H
#define XMPPD_S2S_RESOLVE_H

#include <netinet/in.h>
#include <sys/socket.h>

#include <xmppd/module.h>

#define S2S_MAX_ADDRS 16           /* addresses handed to the callback, at most */
#define S2S_MAX_DOMAIN 1023        /* longer domains are refused ("invalid domain") */
#define S2S_MAX_SRV 32             /* SRV records considered per service */
#define S2S_DEFAULT_PORT 5269      /* RFC 6120 §3.2.2 fallback */

typedef struct s2s_resolver s2s_resolver;

typedef struct s2s_addr {
    struct sockaddr_storage sa; /* address + port */
    socklen_t len;
    int direct_tls;             /* from _xmpps-server (XEP-0368): TLS from the first byte */
    char host[256];             /* the SRV target (or the domain itself): for logs and checks */
} s2s_addr;

/*
 * addrs are ordered: try them in turn.  n == 0 with err set when nothing was
 * found: "timeout", "not found", "service not available" (the domain
 * published SRV target "."), "invalid domain", or "dns error: ...".
 * addrs and err live only during the call.
 */
typedef void (*s2s_resolve_cb)(void *data, const s2s_addr *addrs, int n, const char *err);

typedef struct s2s_query s2s_query;

/*
 * servers: NULL = the system's (/etc/resolv.conf), or "ip:port[,ip:port...]"
 * ("[v6]:port" for IPv6).  timeout_seconds bounds each whole resolution
 * (<= 0: 15 s).  Reads resolv.conf once (a local file): call at load time.
 * NULL on error (logged).
 */
s2s_resolver *s2s_resolver_new(xd_module *m, const char *servers, double timeout_seconds);

/* Cancels pending queries: callbacks are NOT called after free.  Safe from
 * inside a callback. */
void s2s_resolver_free(s2s_resolver *r);

/*
 * Start resolving domain.  cb is called exactly once, always later from the
 * event loop (never before s2s_resolve returns), unless the query is
 * cancelled or the resolver freed first.  The handle is invalid once cb has
 * returned.  NULL only when out of memory or the resolver is being freed
 * (cb is then never called).
 */
s2s_query *s2s_resolve(s2s_resolver *r, const char *domain, s2s_resolve_cb cb, void *data);

/* cb is never called after this.  Safe from any callback; a no-op (and
 * harmless) for the query whose callback is running. */
void s2s_resolve_cancel(s2s_query *q);

/* ---- exposed for unit tests ---------------------------------------------- */

typedef struct s2s_srv {
    char target[256];
    unsigned short port, priority, weight;
    int direct_tls;
} s2s_srv;

/*
 * Order tls[0..ntls) and plain[0..nplain) each per RFC 2782 and merge them
 * as described above into out (room for ntls + nplain).  Each input is capped
 * at S2S_MAX_SRV.  Returns the number written.
 */
int s2s_srv_order(s2s_srv *out, const s2s_srv *tls, int ntls, const s2s_srv *plain, int nplain);

#endif
