/*
 * mod_s2s_external: federation over server-to-server streams that are
 * always encrypted and always authenticated by a CA-signed certificate.
 *
 *   outgoing: DNS (RFC 6120 3.2, XEP-0368) -> TCP -> STARTTLS (required) ->
 *             certificate checked for the remote domain (RFC 6125/7590) ->
 *             SASL EXTERNAL with our domain as authzid (XEP-0178) -> stanzas
 *   incoming: STARTTLS (core) -> SASL EXTERNAL offered only when the peer's
 *             certificate is valid for the 'from' of its stream header
 *
 * Server Dialback (XEP-0220) is never offered and is refused when tried.
 * Stanzas for a domain queue while its stream comes up; if it cannot be
 * reached or authenticated in time, each is bounced to its sender.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xmppd/module.h>

#include "resolve.h"

#define NS_SASL "urn:ietf:params:xml:ns:xmpp-sasl"
#define NS_STREAMS "http://etherx.jabber.org/streams"
#define NS_DIALBACK "jabber:server:dialback"
#define NROUTE_BUCKETS 4096
#define MAX_STATIC 64
#define MAX_ROUTES 10000       /* remote domains with state at once */
#define MAX_QUEUED_TOTAL 50000 /* stanzas waiting for any remote stream */

typedef enum route_state { R_IDLE, R_RESOLVING, R_CONNECTING, R_READY } route_state;

typedef struct s2s_mod s2s_mod;

/* Our streams from one local host to one remote domain. */
typedef struct route {
    s2s_mod *mod;
    char *local, *remote;
    route_state state;
    xmpp_stanza_t **queue;
    int nq, capq;
    xd_session *session;
    s2s_query *query;
    s2s_addr *addrs;
    int naddrs, next_addr;
    xd_timer *deadline;
    double last_used;
    unsigned hash;
    int auth_sent; /* this attempt sent <auth/>: only then may <success/> come */
    int in_ready;  /* route_ready() is sending the queue */
    char why[256]; /* why the last attempt failed */
    struct route *next;
} route;

typedef struct static_route {
    char domain[256];
    s2s_addr addr;
} static_route;

struct s2s_mod {
    xd_module *m;
    s2s_resolver *resolver;
    route *buckets[NROUTE_BUCKETS];
    static_route statics[MAX_STATIC];
    int nstatic;
    int connect_timeout, idle_timeout, queue_limit, allow_subdomains;
    int nroutes, queued;
    xd_timer *sweep;
};

static void route_start(route *r);
static void connect_next(route *r);

/* ---- routes ------------------------------------------------------------------- */

static unsigned
route_hash(const char *local, const char *remote)
{
    unsigned h = 2166136261u;
    for (const char *p = local; *p; p++)
        h = (h ^ (unsigned char)*p) * 16777619u;
    h = (h ^ ' ') * 16777619u;
    for (const char *p = remote; *p; p++)
        h = (h ^ (unsigned char)*p) * 16777619u;
    return h;
}

static route *
route_get(s2s_mod *mod, const char *local, const char *remote)
{
    unsigned h = route_hash(local, remote);
    route **b = &mod->buckets[h % NROUTE_BUCKETS], *r;

    for (r = *b; r; r = r->next)
        if (r->hash == h && !strcmp(r->local, local) && !strcmp(r->remote, remote))
            return r;
    if (mod->nroutes >= MAX_ROUTES || !(r = calloc(1, sizeof(*r))))
        return NULL;
    r->mod = mod;
    r->hash = h;
    r->last_used = xd_now();
    r->local = strdup(local);
    r->remote = strdup(remote);
    if (!r->local || !r->remote) {
        free(r->local);
        free(r->remote);
        free(r);
        return NULL;
    }
    r->next = *b;
    *b = r;
    mod->nroutes++;
    return r;
}

static void
route_free(route *r)
{
    free(r->queue);
    free(r->addrs);
    free(r->local);
    free(r->remote);
    free(r);
}

static void
route_stop_timers(route *r)
{
    xd_timer_stop(r->deadline);
    r->deadline = NULL;
    if (r->query) {
        s2s_resolve_cancel(r->query);
        r->query = NULL;
    }
}

/* The stream is gone for good: every waiting stanza goes back to its sender. */
static void
route_fail(route *r, const char *condition, const char *why)
{
    xd_session *s = r->session;
    const char *type = strcmp(condition, "remote-server-timeout") == 0 ? "wait" : "cancel";

    if (r->why[0] && !strncmp(why, "no authenticated stream", 23))
        why = r->why; /* the last attempt's own reason says more */
    xd_warn("s2s: %s -> %s: %s (%s); bouncing %d stanza(s)", r->local, r->remote, condition, why,
            r->nq);
    route_stop_timers(r);
    r->session = NULL;
    r->state = R_IDLE;
    free(r->addrs);
    r->addrs = NULL;
    r->naddrs = r->next_addr = 0;
    for (int i = 0; i < r->nq; i++) {
        xd_bounce(r->queue[i], type, condition, why);
        xmpp_stanza_release(r->queue[i]);
    }
    r->mod->queued -= r->nq;
    r->nq = 0;
    r->auth_sent = 0;
    if (s) {
        xd_session_set_data(s, r->mod->m, NULL, NULL);
        xd_session_close(s, NULL, NULL);
    }
}

static void
deadline_cb(void *data)
{
    route *r = data;
    r->deadline = NULL; /* one-shot timers free themselves */
    route_fail(r, "remote-server-timeout", "no authenticated stream in time");
}

static int
route_send(route *r, xmpp_stanza_t *st)
{
    r->last_used = xd_now();
    return xd_session_send(r->session, st);
}

static int route_enqueue(route *r, xmpp_stanza_t *st);

static void
route_ready(route *r)
{
    xd_session *s = r->session;
    xmpp_stanza_t **q = r->queue;
    int n = r->nq;

    /* Own the queue while sending: a failed send can close the stream and
     * re-enter this route through the stream-closed hook. */
    r->queue = NULL;
    r->nq = r->capq = 0;
    r->mod->queued -= n;
    r->state = R_READY;
    r->in_ready = 1;
    route_stop_timers(r);
    xd_info("s2s: %s -> %s: stream authenticated; sending %d queued stanza(s)", r->local,
            r->remote, n);
    for (int i = 0; i < n; i++) {
        xmpp_stanza_t *st = q[i];
        if (r->state == R_READY && r->session == s) {
            if (route_send(r, xmpp_stanza_clone(st)) != 0)
                xd_bounce(st, "wait", "remote-server-timeout", "the stream closed");
        } else
            route_enqueue(r, st); /* the stream went away: wait for the next one */
        xmpp_stanza_release(st);
    }
    free(q);
    r->in_ready = 0;
    if (r->state == R_IDLE && r->nq)
        route_start(r);
}

static int
route_enqueue(route *r, xmpp_stanza_t *st)
{
    if (r->nq >= r->mod->queue_limit || r->mod->queued >= MAX_QUEUED_TOTAL) {
        xd_bounce(st, "wait", "resource-constraint", "too many stanzas waiting for this domain");
        return -1;
    }
    if (r->nq == r->capq) {
        int cap = r->capq ? r->capq * 2 : 16;
        xmpp_stanza_t **q = realloc(r->queue, (size_t)cap * sizeof(*q));
        if (!q) {
            xd_bounce(st, "wait", "resource-constraint", NULL);
            return -1;
        }
        r->queue = q;
        r->capq = cap;
    }
    r->queue[r->nq++] = xmpp_stanza_clone(st);
    r->mod->queued++;
    return 0;
}

/* ---- connecting ----------------------------------------------------------------- */

static void
resolved(void *data, const s2s_addr *addrs, int n, const char *err)
{
    route *r = data;
    r->query = NULL;
    if (n <= 0) {
        route_fail(r, "remote-server-not-found", err ? err : "no address");
        return;
    }
    free(r->addrs);
    if (!(r->addrs = malloc((size_t)n * sizeof(*addrs)))) {
        route_fail(r, "remote-server-not-found", "out of memory");
        return;
    }
    memcpy(r->addrs, addrs, (size_t)n * sizeof(*addrs));
    r->naddrs = n;
    r->next_addr = 0;
    connect_next(r);
}

static void
connect_next(route *r)
{
    while (r->next_addr < r->naddrs) {
        const s2s_addr *a = &r->addrs[r->next_addr++];
        xd_session *s = xd_s2s_connect(r->mod->m, r->local, r->remote,
                                       (const struct sockaddr *)&a->sa, a->len, a->direct_tls);
        if (s) {
            r->auth_sent = 0;
            xd_debug("s2s: %s -> %s: connecting to %s (%s)", r->local, r->remote,
                     xd_session_peer(s), a->direct_tls ? "direct TLS" : "STARTTLS");
            r->session = s;
            r->state = R_CONNECTING;
            xd_session_set_data(s, r->mod->m, r, NULL);
            return;
        }
    }
    route_fail(r, "remote-server-not-found",
               "no authenticated stream to any address of the domain (see the log above)");
}

static const static_route *
static_lookup(const s2s_mod *mod, const char *domain)
{
    for (int i = 0; i < mod->nstatic; i++)
        if (!strcmp(mod->statics[i].domain, domain))
            return &mod->statics[i];
    return NULL;
}

static void
route_start(route *r)
{
    const static_route *st = static_lookup(r->mod, r->remote);

    r->why[0] = '\0';
    r->state = R_RESOLVING;
    r->deadline = xd_timer_start(r->mod->m, r->mod->connect_timeout, 0, deadline_cb, r);
    if (st) {
        resolved(r, &st->addr, 1, NULL);
        return;
    }
    r->query = s2s_resolve(r->mod->resolver, r->remote, resolved, r);
    if (!r->query)
        route_fail(r, "remote-server-not-found", "the name cannot be resolved");
}

static int
is_ip_literal(const char *d)
{
    return d[0] == '[' || strspn(d, "0123456789.") == strlen(d);
}

/* ---- hooks -------------------------------------------------------------------------- */

static int
deliver_remote(xd_event *ev, void *data)
{
    s2s_mod *mod = data;
    route *r;

    if (!ev->from || !xd_is_local_host(ev->from->domain))
        return XD_PASS; /* not ours to send: the core bounces it */
    if (is_ip_literal(ev->to->domain)) {
        /* No certificate names an address: such a peer could never authenticate. */
        xd_bounce(ev->stanza, "cancel", "remote-server-not-found", "not a domain name");
        return XD_HANDLED;
    }
    if (!(r = route_get(mod, ev->from->domain, ev->to->domain))) {
        xd_bounce(ev->stanza, "wait", "resource-constraint", "too many remote domains at once");
        return XD_HANDLED;
    }
    if (r->state == R_READY && r->session) {
        if (route_send(r, xmpp_stanza_clone(ev->stanza)) != 0)
            xd_bounce(ev->stanza, "wait", "remote-server-timeout", "the stream closed");
        return XD_HANDLED;
    }
    if (route_enqueue(r, ev->stanza) == 0 && r->state == R_IDLE)
        route_start(r);
    return XD_HANDLED;
}

static int
stream_closed(xd_event *ev, void *data)
{
    s2s_mod *mod = data;
    route *r = xd_session_get_data(ev->session, mod->m);

    if (!r || r->session != ev->session)
        return XD_PASS;
    r->session = NULL;
    xd_session_set_data(ev->session, mod->m, NULL, NULL);
    if (r->state == R_CONNECTING) {
        connect_next(r); /* the next address, or a bounce for everything */
    } else if (r->state == R_READY) {
        xd_debug("s2s: %s -> %s: stream closed", r->local, r->remote);
        r->state = R_IDLE;
        if (r->nq && !r->in_ready)
            route_start(r);
    }
    return XD_PASS;
}

/* RFC 6120 8.1.2.2 / 4.9.3.9: a peer speaks only for the domain it proved. */
static int
check_from(xd_event *ev, void *data)
{
    s2s_mod *mod = data;
    const char *peer = xd_session_peer_domain(ev->session);
    const char *from = ev->from->domain;
    size_t lf = strlen(from), lp = strlen(peer);
    int ok = !strcmp(from, peer) ||
             (mod->allow_subdomains && lf > lp + 1 && from[lf - lp - 1] == '.' &&
              !strcmp(from + lf - lp, peer));

    if (!ok) {
        xd_warn("s2s: %s (authenticated as %s) sent a stanza from %s: spoofed; closing", 
                xd_session_peer(ev->session), peer, from);
        xd_session_close(ev->session, "invalid-from", "stanza from a domain this stream did not authenticate");
        return XD_DROP;
    }
    if (strcmp(ev->to->domain, xd_session_host(ev->session)) != 0) {
        /* The stream was authenticated between the peer and this host only. */
        xd_warn("s2s: %s (%s) sent a stanza for %s on a stream to %s",
                xd_session_peer(ev->session), peer, ev->to->domain, xd_session_host(ev->session));
        xd_session_close(ev->session, "host-unknown", NULL);
        return XD_DROP;
    }
    return XD_PASS;
}

/* ---- SASL EXTERNAL ------------------------------------------------------------------ */

static void
send_sasl(xd_session *s, const char *name, const char *child, const char *text)
{
    xmpp_stanza_t *el = xd_stanza_new(name, NS_SASL);
    if (child)
        xmpp_stanza_add_child_ex(el, xd_stanza_new(child, NULL), 0);
    if (text) {
        xmpp_stanza_t *t = xmpp_stanza_new(xd_ctx());
        xmpp_stanza_set_text(t, text);
        xmpp_stanza_add_child_ex(el, t, 0);
    }
    xd_session_send(s, el);
}

/* Incoming: offer EXTERNAL only to a peer whose certificate fits its 'from'. */
static void
s2s_features(xd_session *s, xmpp_stanza_t *features, void *data)
{
    xmpp_stanza_t *mechs, *mech, *t;
    const char *from = xd_session_stream_from(s);
    char why[256];
    (void)data;

    if (xd_session_is_initiator(s) || !xd_session_is_tls(s) || xd_session_is_authenticated(s))
        return;
    if (!*from) {
        xd_warn("s2s: %s: stream header without a valid 'from'; refusing", xd_session_peer(s));
        xd_session_close(s, "not-authorized", "a server stream must say where it comes from");
        return;
    }
    if (!xd_session_verify_peer(s, from, why, sizeof(why))) {
        xd_warn("s2s: %s: refusing %s: certificate not accepted: %s", xd_session_peer(s), from,
                why);
        xd_session_close(s, "not-authorized", "a CA-signed certificate for your domain is required"
                                              " (SASL EXTERNAL); dialback is not accepted");
        return;
    }
    mechs = xd_stanza_new("mechanisms", NS_SASL);
    mech = xd_stanza_new("mechanism", NULL);
    t = xmpp_stanza_new(xd_ctx());
    xmpp_stanza_set_text(t, "EXTERNAL");
    xmpp_stanza_add_child_ex(mech, t, 0);
    xmpp_stanza_add_child_ex(mechs, mech, 0);
    xmpp_stanza_add_child_ex(features, mechs, 0);
}

static void
external_auth(xd_session *s, xmpp_stanza_t *el)
{
    const char *mech = xmpp_stanza_get_attribute(el, "mechanism");
    const char *from = xd_session_stream_from(s);
    char *text = xmpp_stanza_get_text(el), authz[1024] = "", why[256];
    int bad = 0;

    if (!mech || strcmp(mech, "EXTERNAL") != 0) {
        send_sasl(s, "failure", "invalid-mechanism", NULL);
        xd_warn("s2s: %s (%s) asked for SASL %s; only EXTERNAL is offered", xd_session_peer(s),
                from, mech ? mech : "(none)");
        xd_session_close(s, "not-authorized", NULL);
        xmpp_free(xd_ctx(), text);
        return;
    }
    if (text && *text && strcmp(text, "=") != 0) {
        size_t len = 0;
        unsigned char *raw = xd_base64_decode(text, strlen(text), &len);
        if (!raw || len >= sizeof(authz) || memchr(raw, '\0', len) ||
            xd_jid_prep_domain(authz, sizeof(authz), (memcpy(authz, raw, len), authz[len] = '\0',
                                                       authz)) != 0)
            bad = 1;
        free(raw);
    }
    xmpp_free(xd_ctx(), text);
    /* XEP-0178: an authzid, when given, is the domain in the stream's 'from'. */
    if (bad || (*authz && strcmp(authz, from) != 0)) {
        send_sasl(s, "failure", "invalid-authzid", NULL);
        xd_warn("s2s: %s: authzid does not match the stream's from=%s", xd_session_peer(s), from);
        xd_session_close(s, "not-authorized", NULL);
        return;
    }
    if (!xd_session_verify_peer(s, from, why, sizeof(why))) {
        send_sasl(s, "failure", "not-authorized", NULL);
        xd_warn("s2s: %s: refusing %s: %s", xd_session_peer(s), from, why);
        xd_session_close(s, "not-authorized", NULL);
        return;
    }
    /* Modules (blocklists) decide before <success/>: after it the peer
     * restarts its stream and would not read our error as one. */
    if (xd_session_set_peer_authenticated(s, from) != 0) {
        send_sasl(s, "failure", "not-authorized", NULL);
        xd_session_close(s, "policy-violation", "refused by policy");
        return;
    }
    send_sasl(s, "success", NULL, NULL);
}

/* This address did not work out: close it; the stream-closed hook tries the
 * next one, and the route fails only when none is left. */
static void
attempt_fail(route *r, xd_session *s, const char *why)
{
    xd_warn("s2s: %s -> %s via %s: %s", r->local, r->remote, xd_session_peer(s), why);
    snprintf(r->why, sizeof(r->why), "%s", why);
    r->auth_sent = 0;
    xd_session_close(s, "policy-violation", why);
}

static int
sasl_element(xd_session *s, xmpp_stanza_t *el, void *data)
{
    s2s_mod *mod = data;
    const char *name = xmpp_stanza_get_name(el);
    route *r = xd_session_get_data(s, mod->m);

    if (!xd_session_is_initiator(s)) {
        if (!strcmp(name, "auth") && !xd_session_is_authenticated(s))
            external_auth(s, el);
        else
            xd_session_close(s, "policy-violation", "unexpected SASL element");
        return XD_HANDLED;
    }
    if (!r || r->session != s) {
        xd_session_close(s, NULL, NULL);
        return XD_HANDLED;
    }
    if (!strcmp(name, "success") && r->auth_sent) {
        r->auth_sent = 0;
        xd_session_initiator_authenticated(s);
        return XD_HANDLED;
    }
    attempt_fail(r, s, !strcmp(name, "success") ? "SASL success without our <auth/>"
                                                : "the peer refused our certificate (SASL EXTERNAL)");
    return XD_HANDLED;
}

/* Outgoing: the peer's features after TLS, and again after SASL. */
static int
features_element(xd_session *s, xmpp_stanza_t *el, void *data)
{
    s2s_mod *mod = data;
    route *r = xd_session_get_data(s, mod->m);
    xmpp_stanza_t *mechs, *m;
    char why[256];
    char *authz;

    if (!xd_session_is_initiator(s) || strcmp(xmpp_stanza_get_name(el), "stream:features") != 0)
        return XD_PASS;
    if (!r || r->session != s) {
        xd_session_close(s, NULL, NULL);
        return XD_HANDLED;
    }
    if (xd_session_is_authenticated(s)) {
        route_ready(r);
        return XD_HANDLED;
    }
    if (r->auth_sent) {
        attempt_fail(r, s, "stream features again before the SASL outcome");
        return XD_HANDLED;
    }
    if (!xd_session_verify_peer(s, r->remote, why, sizeof(why))) {
        attempt_fail(r, s, why);
        return XD_HANDLED;
    }
    mechs = xmpp_stanza_get_child_by_name_and_ns(el, "mechanisms", NS_SASL);
    for (m = mechs ? xmpp_stanza_get_children(mechs) : NULL; m; m = xmpp_stanza_get_next(m)) {
        char *t = xmpp_stanza_is_tag(m) ? xmpp_stanza_get_text(m) : NULL;
        int ext = t && !strcmp(t, "EXTERNAL");
        xmpp_free(xd_ctx(), t);
        if (ext)
            break;
    }
    if (!m) {
        attempt_fail(r, s, "the peer does not offer SASL EXTERNAL (it may not trust our certificate)");
        return XD_HANDLED;
    }
    authz = xd_base64_encode((const unsigned char *)r->local, strlen(r->local));
    xmpp_stanza_t *auth = xd_stanza_new("auth", NS_SASL), *t = xmpp_stanza_new(xd_ctx());
    xmpp_stanza_set_attribute(auth, "mechanism", "EXTERNAL");
    xmpp_stanza_set_text(t, authz ? authz : "=");
    xmpp_stanza_add_child_ex(auth, t, 0);
    free(authz);
    r->auth_sent = 1;
    xd_session_send(s, auth);
    return XD_HANDLED;
}

/* XEP-0220 is not spoken here: say so, and end the stream. */
static int
dialback_element(xd_session *s, xmpp_stanza_t *el, void *data)
{
    const char *name = xmpp_stanza_get_name(el);
    const char *from = xmpp_stanza_get_attribute(el, "from");
    const char *to = xmpp_stanza_get_attribute(el, "to");
    xmpp_stanza_t *reply, *err;
    (void)data;

    xd_warn("s2s: %s tried dialback (db:%s from %s); refused: certificates only", 
            xd_session_peer(s), name, from ? from : "?");
    reply = xd_stanza_new(!strcmp(name, "verify") ? "db:verify" : "db:result", NULL);
    xmpp_stanza_set_attribute(reply, "xmlns:db", NS_DIALBACK);
    if (to)
        xmpp_stanza_set_attribute(reply, "from", to);
    if (from)
        xmpp_stanza_set_attribute(reply, "to", from);
    xmpp_stanza_set_type(reply, "error");
    err = xd_stanza_new("error", NULL);
    xmpp_stanza_set_type(err, "cancel");
    xmpp_stanza_add_child_ex(err, xd_stanza_new("policy-violation", "urn:ietf:params:xml:ns:xmpp-stanzas"), 0);
    xmpp_stanza_add_child_ex(reply, err, 0);
    xd_session_send(s, reply);
    xd_session_close(s, "policy-violation",
                     "dialback is not accepted; authenticate with SASL EXTERNAL and a CA-signed certificate");
    return XD_HANDLED;
}

/* ---- idle streams ------------------------------------------------------------------- */

static void
sweep(void *data)
{
    s2s_mod *mod = data;
    double now = xd_now();
    for (int i = 0; i < NROUTE_BUCKETS; i++)
        for (route **p = &mod->buckets[i], *r; (r = *p);) {
            if (r->state == R_READY && r->session && now - r->last_used > mod->idle_timeout) {
                xd_session *s = r->session;
                xd_debug("s2s: %s -> %s: idle; closing", r->local, r->remote);
                r->session = NULL;
                r->state = R_IDLE;
                xd_session_set_data(s, mod->m, NULL, NULL);
                xd_session_close(s, NULL, NULL);
            }
            if (r->state == R_IDLE && !r->nq && !r->session && !r->query && !r->deadline &&
                now - r->last_used > mod->idle_timeout) {
                /* nothing left of this domain but memory */
                *p = r->next;
                mod->nroutes--;
                route_free(r);
                continue;
            }
            p = &r->next;
        }
}

/* ---- the module --------------------------------------------------------------------- */

static int
parse_static(s2s_mod *mod, const char *spec)
{
    char dom[256], host[256];
    int port;
    static_route *st;
    struct sockaddr_in *a4;
    struct sockaddr_in6 *a6;

    if (mod->nstatic >= MAX_STATIC || sscanf(spec, "%255[^=]=%255[^:]:%d", dom, host, &port) != 3)
        return -1;
    if (host[0] == '[') { /* [v6]:port */
        if (sscanf(spec, "%255[^=]=[%255[^]]]:%d", dom, host, &port) != 3)
            return -1;
    }
    if (port < 1 || port > 65535)
        return -1;
    st = &mod->statics[mod->nstatic];
    memset(st, 0, sizeof(*st));
    if (xd_jid_prep_domain(st->domain, sizeof(st->domain), dom) != 0)
        return -1;
    a4 = (struct sockaddr_in *)&st->addr.sa;
    a6 = (struct sockaddr_in6 *)&st->addr.sa;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        st->addr.len = sizeof(*a4);
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        st->addr.len = sizeof(*a6);
    } else
        return -1;
    snprintf(st->addr.host, sizeof(st->addr.host), "%s", host);
    mod->nstatic++;
    return 0;
}

static const xd_setting s2s_settings[] = {
    {"ca_file", XD_SETTING_STRING},
    {"dns_servers", XD_SETTING_STRING},
    {"static_routes", XD_SETTING_STRING_LIST},
    {"connect_timeout", XD_SETTING_INT},
    {"idle_timeout", XD_SETTING_INT},
    {"queue_limit", XD_SETTING_INT},
    {"allow_subdomains", XD_SETTING_BOOL},
    {NULL, 0},
};

static int
s2s_load(xd_module *m)
{
    s2s_mod *mod = calloc(1, sizeof(*mod));
    long long ct = xd_config_int(m, "connect_timeout", 30);
    long long it = xd_config_int(m, "idle_timeout", 600);
    long long ql = xd_config_int(m, "queue_limit", 1000);
    int r = 0;

    if (!mod)
        return -1;
    xd_module_set_data(m, mod);
    mod->m = m;
    if (ct < 1 || ct > 3600) {
        xd_config_error(m, "connect_timeout", "must be from 1 to 3600 seconds");
        return -1;
    }
    if (it < 1 || it > 86400) {
        xd_config_error(m, "idle_timeout", "must be from 1 to 86400 seconds");
        return -1;
    }
    if (ql < 1 || ql > 1000000) {
        xd_config_error(m, "queue_limit", "must be from 1 to 1000000");
        return -1;
    }
    mod->connect_timeout = (int)ct;
    mod->idle_timeout = (int)it;
    mod->queue_limit = (int)ql;
    mod->allow_subdomains = xd_config_bool(m, "allow_subdomains", 0);
    for (int i = 0; i < xd_config_list_count(m, "static_routes"); i++)
        if (parse_static(mod, xd_config_list_item(m, "static_routes", i)) != 0) {
            xd_config_error(m, "static_routes", "'%s' is not domain=address:port",
                            xd_config_list_item(m, "static_routes", i));
            return -1;
        }
    if (xd_tls_set_trust(xd_config_string(m, "ca_file", NULL)) != 0) {
        xd_config_error(m, "ca_file", "cannot load the trust store");
        return -1;
    }
    mod->resolver = s2s_resolver_new(m, xd_config_string(m, "dns_servers", NULL), ct);
    if (!mod->resolver) {
        xd_config_error(m, "dns_servers", "the resolver could not start");
        return -1;
    }
    mod->sweep = xd_timer_start(m, 5, 5, sweep, mod);
    r |= xd_hook(m, XD_HOOK_DELIVER_REMOTE, deliver_remote, mod, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_STREAM_CLOSED, stream_closed, mod, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_S2S_STANZA, check_from, mod, XD_PRIO_FIRST);
    r |= xd_stream_features_add(m, XD_STREAM_S2S, s2s_features, mod);
    r |= xd_stream_element_register(m, XD_STREAM_S2S, NS_SASL, sasl_element, mod);
    r |= xd_stream_element_register(m, XD_STREAM_S2S, NS_STREAMS, features_element, mod);
    r |= xd_stream_element_register(m, XD_STREAM_S2S, NS_DIALBACK, dialback_element, mod);
    return r ? -1 : 0;
}

static void
s2s_unload(xd_module *m)
{
    s2s_mod *mod = xd_module_get_data(m);
    int lost = 0;
    if (!mod)
        return;
    xd_timer_stop(mod->sweep);
    for (int i = 0; i < NROUTE_BUCKETS; i++)
        while (mod->buckets[i]) {
            route *r = mod->buckets[i];
            mod->buckets[i] = r->next;
            route_stop_timers(r);
            for (int k = 0; k < r->nq; k++) {
                /* back to the sender (stored offline if that module is loaded) */
                xd_bounce(r->queue[k], "wait", "remote-server-timeout", "server shutting down");
                xmpp_stanza_release(r->queue[k]);
            }
            lost += r->nq;
            route_free(r);
        }
    if (lost)
        xd_warn("s2s: %d stanza(s) still waiting for a remote stream at shutdown were bounced",
                lost);
    s2s_resolver_free(mod->resolver);
    free(mod);
}

XD_MODULE(s2s_external) = {
    .abi = XD_MODULE_ABI,
    .name = "s2s_external",
    .settings = s2s_settings,
    .load = s2s_load,
    .unload = s2s_unload,
};
