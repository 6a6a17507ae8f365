/*
 * mod_ratelimit: token-bucket limits on everything that comes in.
 *
 *   connections    per source address (an IPv4 address, or the /64 of an
 *                  IPv6 address) and per listener, at accept
 *                  (XD_HOOK_CONNECT): over the limit the connection is
 *                  refused before a byte of it is read.
 *   logins         SASL attempts (RFC 6120 6) per source address and per
 *                  claimed account (XD_HOOK_AUTH_ATTEMPT, run by mod_c2s):
 *                  over the limit the attempt fails with
 *                  <temporary-auth-failure/> (RFC 6120 6.5.11) and counts as
 *                  a failure for mod_c2s's growing delay and attempt cap.
 *   registrations  XEP-0077 in-band registrations per source address
 *                  (XD_HOOK_REGISTER_ATTEMPT, run by mod_register beside its
 *                  own hourly cap; refused with <resource-constraint/>).
 *   traffic        stanzas and bytes per client session and per server
 *                  stream (XD_HOOK_C2S_STANZA / XD_HOOK_S2S_STANZA).  Over
 *                  the limit the stanza still passes, but the stream is not
 *                  read again until its buckets have refilled, so TCP pushes
 *                  back on the sender and nothing is ever dropped (RFC 6120
 *                  13.12 item 4 asks for exactly this kind of throttling).
 *                  A stream held back for most of a time window is closed
 *                  with <policy-violation/> (RFC 6120 4.9.3.14).
 *
 * Buckets refill continuously: tokens += rate * elapsed, capped at the
 * burst.  Connection, login and registration buckets refuse when a token is
 * missing; traffic buckets may go into debt and the stream pauses for
 * exactly the time the debt takes to be repaid, which holds a flooding
 * stream at the configured rate on average.
 *
 * Per-address and per-account state sits in two bounded hash tables
 * (the core's keyed SipHash, xd_hash(), since account names are chosen by
 * whoever attacks); the tables are the module's own for the eviction
 * order.  An entry whose buckets are all full again says nothing a missing
 * entry would not, so a sweep drops it; when a table is at its cap the least
 * recently used entry goes.
 *
 * Settings: one string per limit, "RATE/UNIT [burst N]" or "off" (see
 * `kinds` for names and defaults); listener_limits and host_limits, lists of
 * "TARGET LIMIT SPEC" overrides (a host's wins over a listener's); exempt,
 * a list of networks; max_entries (65536 per table); abuse_window (60 s) and
 * abuse_held (30 s held back by the stanza limit within it closes; 0 never).
 */
#include <arpa/inet.h>
#include <math.h> /* isfinite */
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xmppd/module.h>

#define SWEEP_INTERVAL 30.0 /* seconds between sweeps of idle table entries */
#define MAX_PAUSE_MS 60000u /* one pause never exceeds this */
#define LOG_WINDOW 10.0     /* log lines of one kind: at most LOG_BURST per window */
#define LOG_BURST 5

/* ---- settings -------------------------------------------------------------- */

enum rl_kind {
    K_IP_CONN,
    K_LISTENER_CONN,
    K_IP_AUTH,
    K_ACCOUNT_AUTH,
    K_IP_REG,
    K_C2S_STANZAS,
    K_C2S_BYTES,
    K_S2S_STANZAS,
    K_S2S_BYTES,
    K_COUNT
};

#define SCOPE_LISTENER 1u
#define SCOPE_HOST 2u

/* Every limit: its setting, its default, and where it may be overridden.
 * Connection limits are decided before a stream names its host, and an
 * account's login bucket is shared by every listener, hence the scopes. */
static const struct {
    const char *name;
    const char *def;
    unsigned scopes;
} kinds[K_COUNT] = {
    [K_IP_CONN] = {"ip_connections", "10/s burst 20", SCOPE_LISTENER},
    [K_LISTENER_CONN] = {"listener_connections", "off", SCOPE_LISTENER},
    [K_IP_AUTH] = {"ip_auth", "30/min burst 30", SCOPE_LISTENER | SCOPE_HOST},
    [K_ACCOUNT_AUTH] = {"account_auth", "10/min burst 10", SCOPE_HOST},
    [K_IP_REG] = {"ip_registrations", "5/h burst 5", SCOPE_LISTENER | SCOPE_HOST},
    [K_C2S_STANZAS] = {"c2s_stanzas", "50/s burst 100", SCOPE_LISTENER | SCOPE_HOST},
    [K_C2S_BYTES] = {"c2s_bytes", "100k/s burst 1M", SCOPE_LISTENER | SCOPE_HOST},
    [K_S2S_STANZAS] = {"s2s_stanzas", "500/s burst 2000", SCOPE_LISTENER | SCOPE_HOST},
    [K_S2S_BYTES] = {"s2s_bytes", "1M/s burst 8M", SCOPE_LISTENER | SCOPE_HOST},
};

/* A rate in tokens per second and a bucket depth; rate 0 = no limit. */
typedef struct rl_limit {
    double rate, burst;
} rl_limit;

typedef struct rl_override {
    char *target; /* canonical "address:port" of a listener, or a served domain */
    unsigned scope;
    int kind;
    rl_limit lim;
} rl_override;

/* An exempt network, in the IPv6 space (IPv4 as ::ffff:a.b.c.d/96+n). */
typedef struct rl_net {
    unsigned char addr[16];
    int prefix;
} rl_net;

/* ---- buckets and tables ----------------------------------------------------------- */

typedef struct rl_bucket {
    double tokens, last;
    const rl_limit *lim; /* the limit it was last refilled under (for the sweep) */
} rl_bucket;             /* lim == NULL: never used, i.e. full */

enum { B_CONN, B_AUTH, B_REG, B_COUNT };

typedef struct rl_entry {
    struct rl_entry *hnext;         /* hash chain */
    struct rl_entry *newer, *older; /* use order, for eviction */
    uint64_t hash;
    rl_bucket b[B_COUNT];
    size_t klen;
    unsigned char key[]; /* 16 address bytes, or a bare JID */
} rl_entry;

typedef struct rl_table {
    rl_entry **slots;
    size_t mask, n, cap;
    rl_entry *newest, *oldest;
} rl_table;

/* A listener as sessions name it, with its own connection bucket. */
typedef struct rl_listener {
    struct rl_listener *next;
    char *name;
    rl_bucket conn;
    const rl_limit *lim[K_COUNT]; /* its override, or the default */
} rl_listener;

/* Log lines of one kind, so a storm cannot flood the log as well. */
typedef struct rl_loglim {
    double start;
    unsigned n;
    unsigned long dropped;
} rl_loglim;

typedef struct rl {
    xd_module *m;
    rl_limit def[K_COUNT];
    rl_override *ovr;
    int novr;
    rl_net *exempt;
    int nexempt;
    double abuse_window, abuse_held;
    rl_table addrs, accounts;
    rl_listener *listeners;
    xd_timer *sweep;
    rl_loglim log_conn, log_auth, log_reg, log_throttle;
} rl;

/* Per stream: its traffic buckets and how long it was held back lately. */
typedef struct rl_sess {
    const xd_session *owner; /* XEP-0198 resumption hands this to a new stream */
    int exempt;
    const rl_limit *lst, *lby; /* NULL: that limit is off */
    rl_bucket st, by;
    uint64_t seen; /* xd_session_bytes_in() at the last stanza */
    int throttled; /* the last stanza needed a pause */
    int win_used;
    double win_start, held_cur, held_prev; /* sliding window of held-back time */
} rl_sess;

static int
limit_on(const rl_limit *l)
{
    return l && l->rate > 0;
}

static void
bucket_refill(rl_bucket *b, const rl_limit *lim, double now)
{
    if (!b->lim)
        b->tokens = lim->burst; /* a bucket starts full */
    else if (now > b->last)
        b->tokens += lim->rate * (now - b->last);
    if (b->tokens > lim->burst)
        b->tokens = lim->burst; /* also when the limit in force is smaller */
    b->last = now;
    b->lim = lim;
}

/* Refusing buckets: take `cost` if it is there.  1 taken, 0 not. */
static int
bucket_has(rl_bucket *b, const rl_limit *lim, double now, double cost)
{
    bucket_refill(b, lim, now);
    return b->tokens >= cost;
}

/* Pausing buckets: take `cost` even into debt; the seconds until the debt
 * is repaid (0 when there is none). */
static double
bucket_charge(rl_bucket *b, const rl_limit *lim, double now, double cost)
{
    bucket_refill(b, lim, now);
    b->tokens -= cost;
    return b->tokens < 0 ? -b->tokens / lim->rate : 0;
}

static int
bucket_full(const rl_bucket *b, double now)
{
    return !b->lim || b->tokens + b->lim->rate * (now - b->last) >= b->lim->burst;
}

static int
table_init(rl_table *t, size_t cap)
{
    size_t nslots = 64;
    while (nslots < cap)
        nslots *= 2;
    memset(t, 0, sizeof(*t));
    if (!(t->slots = calloc(nslots, sizeof(*t->slots))))
        return -1;
    t->mask = nslots - 1;
    t->cap = cap;
    return 0;
}

static void
table_unlink(rl_table *t, rl_entry *e)
{
    rl_entry **pp = &t->slots[e->hash & t->mask];
    while (*pp != e)
        pp = &(*pp)->hnext;
    *pp = e->hnext;
    if (e->newer)
        e->newer->older = e->older;
    else
        t->newest = e->older;
    if (e->older)
        e->older->newer = e->newer;
    else
        t->oldest = e->newer;
    t->n--;
    free(e);
}

static void
table_free(rl_table *t)
{
    while (t->oldest)
        table_unlink(t, t->oldest);
    free(t->slots);
    t->slots = NULL;
}

/* The entry for key, made (full buckets) if absent, and marked as the most
 * recently used.  *evicted is set when an older entry had to make room. */
static rl_entry *
table_get(rl_table *t, const void *key, size_t klen, int *evicted)
{
    uint64_t h = xd_hash(key, klen); /* keyed: attackers choose account names */
    rl_entry *e;

    for (e = t->slots[h & t->mask]; e; e = e->hnext)
        if (e->hash == h && e->klen == klen && memcmp(e->key, key, klen) == 0)
            break;
    if (e) {
        if (e != t->newest) { /* move to the front of the use order */
            e->newer->older = e->older;
            if (e->older)
                e->older->newer = e->newer;
            else
                t->oldest = e->newer;
            e->newer = NULL;
            e->older = t->newest;
            t->newest->newer = e;
            t->newest = e;
        }
        return e;
    }
    if (t->n >= t->cap && t->oldest) {
        table_unlink(t, t->oldest);
        *evicted = 1;
    }
    if (!(e = calloc(1, sizeof(*e) + klen)))
        return NULL;
    e->hash = h;
    e->klen = klen;
    memcpy(e->key, key, klen);
    e->hnext = t->slots[h & t->mask];
    t->slots[h & t->mask] = e;
    e->older = t->newest;
    if (t->newest)
        t->newest->newer = e;
    else
        t->oldest = e;
    t->newest = e;
    t->n++;
    return e;
}

/* Drop the entries whose buckets have all refilled. */
static void
table_sweep(rl_table *t, double now)
{
    rl_entry *e = t->oldest;
    while (e) {
        rl_entry *next = e->newer;
        int full = 1;
        for (int i = 0; i < B_COUNT && full; i++)
            full = bucket_full(&e->b[i], now);
        if (full)
            table_unlink(t, e);
        e = next;
    }
}

/* ---- addresses ---------------------------------------------------------------- */

/* A socket address in the IPv6 space (IPv4 as ::ffff:a.b.c.d).  0 ok, -1. */
static int
addr_norm(const struct sockaddr *sa, unsigned char out[16])
{
    if (!sa)
        return -1;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)sa;
        memset(out, 0, 10);
        out[10] = out[11] = 0xff;
        memcpy(out + 12, &a->sin_addr, 4);
        return 0;
    }
    if (sa->sa_family == AF_INET6) {
        memcpy(out, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
        return 0;
    }
    return -1;
}

static int
is_v4(const unsigned char a[16])
{
    static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return memcmp(a, mapped, 12) == 0;
}

/* The key of an address's bucket: IPv4 /32, IPv6 /64 (one customer's
 * network: an attacker there has 2^64 addresses to pick from). */
static void
addr_key(const unsigned char a[16], unsigned char key[16])
{
    memcpy(key, a, 16);
    if (!is_v4(a))
        memset(key + 8, 0, 8);
}

static void
key_str(const unsigned char key[16], char *buf, size_t len)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    if (is_v4(key)) {
        inet_ntop(AF_INET, key + 12, ip, sizeof(ip));
        snprintf(buf, len, "%s", ip);
    } else {
        inet_ntop(AF_INET6, key, ip, sizeof(ip));
        snprintf(buf, len, "%s/64", ip);
    }
}

static int
prefix_match(const unsigned char *a, const unsigned char *net, int prefix)
{
    int bytes = prefix / 8, bits = prefix % 8;
    if (memcmp(a, net, (size_t)bytes) != 0)
        return 0;
    return !bits || ((a[bytes] ^ net[bytes]) & (0xff << (8 - bits)) & 0xff) == 0;
}

static int
is_exempt(const rl *r, const unsigned char a[16])
{
    for (int i = 0; i < r->nexempt; i++)
        if (prefix_match(a, r->exempt[i].addr, r->exempt[i].prefix))
            return 1;
    return 0;
}

/* A listener as the core names it: "192.0.2.1:5222" or "[2001:db8::1]:5222",
 * written canonically (so "::0" and "::" are the same).  0 ok, -1. */
static int
listener_canon(const char *in, char *out, size_t len)
{
    char addr[INET6_ADDRSTRLEN + 2], *end;
    const char *colon = strrchr(in, ':');
    unsigned char bin[16];
    size_t alen;
    long port;

    if (!colon || colon == in)
        return -1;
    port = strtol(colon + 1, &end, 10);
    if (!colon[1] || *end || port < 1 || port > 65535)
        return -1;
    alen = (size_t)(colon - in);
    if (in[0] == '[') {
        if (alen < 3 || in[alen - 1] != ']' || alen - 2 >= sizeof(addr))
            return -1;
        memcpy(addr, in + 1, alen - 2);
        addr[alen - 2] = '\0';
        if (inet_pton(AF_INET6, addr, bin) != 1 || !inet_ntop(AF_INET6, bin, addr, sizeof(addr)))
            return -1;
        return snprintf(out, len, "[%s]:%ld", addr, port) < (int)len ? 0 : -1;
    }
    if (alen >= sizeof(addr))
        return -1;
    memcpy(addr, in, alen);
    addr[alen] = '\0';
    if (inet_pton(AF_INET, addr, bin) != 1 || !inet_ntop(AF_INET, bin, addr, sizeof(addr)))
        return -1;
    return snprintf(out, len, "%s:%ld", addr, port) < (int)len ? 0 : -1;
}

/* ---- limits -------------------------------------------------------------------- */

static int
kind_by_name(const char *name, size_t len)
{
    for (int k = 0; k < K_COUNT; k++)
        if (strlen(kinds[k].name) == len && strncmp(kinds[k].name, name, len) == 0)
            return k;
    return -1;
}

/* A number with an optional k (1000) or M (1000000) suffix. */
static const char *
parse_amount(const char *p, double *out)
{
    char *end;
    double v = strtod(p, &end);
    if (end == p || !isfinite(v) || v <= 0)
        return NULL;
    if (*end == 'k' || *end == 'K')
        v *= 1e3, end++;
    else if (*end == 'M')
        v *= 1e6, end++;
    *out = v;
    return end;
}

/*
 * "off", or "RATE/UNIT [burst N]": UNIT is s, min, h or day; the burst
 * defaults to one unit's worth (at least 1).  0 ok, -1.
 */
static int
parse_spec(const char *s, rl_limit *out)
{
    static const struct {
        const char *name;
        double secs;
    } units[] = {{"s", 1},       {"sec", 1},  {"second", 1},  {"min", 60},
                 {"minute", 60}, {"h", 3600}, {"hour", 3600}, {"day", 86400}};
    double per, burst = 0, secs = 0;
    const char *p = s;
    size_t n;

    while (*p == ' ')
        p++;
    if (strncmp(p, "off", 3) == 0 && !p[3 + strspn(p + 3, " ")]) {
        out->rate = out->burst = 0;
        return 0;
    }
    if (!(p = parse_amount(p, &per)) || *p++ != '/')
        return -1;
    n = strcspn(p, " ");
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++)
        if (strlen(units[i].name) == n && strncmp(units[i].name, p, n) == 0)
            secs = units[i].secs;
    if (secs == 0)
        return -1;
    p += n;
    p += strspn(p, " ");
    if (strncmp(p, "burst ", 6) == 0) {
        p += 6;
        p += strspn(p, " ");
        if (!(p = parse_amount(p, &burst)))
            return -1;
        p += strspn(p, " ");
    }
    if (*p)
        return -1;
    out->rate = per / secs;
    out->burst = burst > 0 ? burst : (per < 1 ? 1 : per);
    if (out->burst < 1 || out->burst > 1e15 || out->rate < 1e-6)
        return -1;
    return 0;
}

/* The listener's record (made on first sight), with its limits resolved. */
static rl_listener *
listener_get(rl *r, const char *name)
{
    char canon[INET6_ADDRSTRLEN + 16];
    rl_listener *l;

    for (l = r->listeners; l; l = l->next)
        if (strcmp(l->name, name) == 0)
            return l;
    if (!(l = calloc(1, sizeof(*l))) || !(l->name = strdup(name))) {
        free(l);
        return NULL;
    }
    if (listener_canon(name, canon, sizeof(canon)) != 0)
        canon[0] = '\0'; /* "" for streams we opened: defaults only */
    for (int k = 0; k < K_COUNT; k++)
        l->lim[k] = &r->def[k];
    for (int i = 0; i < r->novr; i++)
        if (r->ovr[i].scope == SCOPE_LISTENER && canon[0] && strcmp(r->ovr[i].target, canon) == 0)
            l->lim[r->ovr[i].kind] = &r->ovr[i].lim;
    l->next = r->listeners;
    r->listeners = l;
    return l;
}

/* The limit of a kind: a host override, else the listener's, else the default.
 * NULL when that limit is off. */
static const rl_limit *
limit_for(const rl *r, int kind, const rl_listener *l, const char *host)
{
    const rl_limit *lim = l ? l->lim[kind] : &r->def[kind];
    if (host)
        for (int i = 0; i < r->novr; i++)
            if (r->ovr[i].scope == SCOPE_HOST && r->ovr[i].kind == kind &&
                strcmp(r->ovr[i].target, host) == 0) {
                lim = &r->ovr[i].lim;
                break;
            }
    return limit_on(lim) ? lim : NULL;
}

/* ---- logging and counting ---------------------------------------------------------- */

/* Say how many lines of a kind were held back, once their window is over. */
static void
log_flush(rl_loglim *l, double now, const char *what)
{
    if (now - l->start < LOG_WINDOW)
        return;
    if (l->dropped)
        xd_info("ratelimit: %lu more %s in %.0f s (not logged one by one)", l->dropped, what,
                now - l->start);
    l->start = now;
    l->n = 0;
    l->dropped = 0;
}

static int
log_ok(rl_loglim *l, double now, const char *what)
{
    log_flush(l, now, what);
    if (l->n < LOG_BURST) {
        l->n++;
        return 1;
    }
    l->dropped++;
    return 0;
}

static rl_entry *
addr_entry(rl *r, const unsigned char key[16])
{
    int evicted = 0;
    rl_entry *e = table_get(&r->addrs, key, 16, &evicted);
    if (evicted)
        xd_count(r->m, "entries_evicted", 1);
    return e;
}

static rl_entry *
account_entry(rl *r, const xd_jid *bare)
{
    char key[XD_JID_STR_MAX];
    int evicted = 0, n = xd_jid_format(bare, 0, key, sizeof(key));
    rl_entry *e;
    if (n < 0)
        return NULL;
    e = table_get(&r->accounts, key, strlen(key), &evicted);
    if (evicted)
        xd_count(r->m, "entries_evicted", 1);
    return e;
}

/* Where an event comes from: the hook's address, else its stream's. */
static const struct sockaddr *
event_addr(const xd_event *ev)
{
    if (ev->addr)
        return ev->addr;
    return ev->session ? xd_session_addr(ev->session) : NULL;
}

/* ---- connections --------------------------------------------------------------------- */

static int
on_connect(xd_event *ev, void *data)
{
    rl *r = data;
    xd_session *s = ev->session;
    double now = xd_monotonic();
    unsigned char a[16], key[16];
    const rl_limit *lip, *lls;
    rl_listener *l;
    rl_entry *e = NULL;
    const char *why = NULL;

    if (!s || addr_norm(event_addr(ev), a) != 0 || is_exempt(r, a))
        return XD_PASS;
    if (!(l = listener_get(r, xd_session_listener(s))))
        return XD_PASS;
    lip = limit_for(r, K_IP_CONN, l, NULL);
    lls = limit_for(r, K_LISTENER_CONN, l, NULL);
    addr_key(a, key);
    if (lip && (e = addr_entry(r, key)) && !bucket_has(&e->b[B_CONN], lip, now, 1))
        why = kinds[K_IP_CONN].name;
    else if (lls && !bucket_has(&l->conn, lls, now, 1))
        why = kinds[K_LISTENER_CONN].name;
    if (!why) {
        if (lip && e)
            e->b[B_CONN].tokens -= 1;
        if (lls)
            l->conn.tokens -= 1;
        return XD_PASS;
    }
    xd_count(r->m, "connections_refused", 1);
    if (log_ok(&r->log_conn, now, "connections refused")) {
        char ks[INET6_ADDRSTRLEN + 4];
        key_str(key, ks, sizeof(ks));
        xd_info("ratelimit: %s: connection to %s refused: over the %s limit (%s)",
                xd_session_peer(s), l->name, why, ks);
    }
    return XD_DROP;
}

/* ---- logins and registrations -------------------------------------------------------- */

static int
on_auth(xd_event *ev, void *data)
{
    rl *r = data;
    xd_session *s = ev->session;
    double now = xd_monotonic();
    const char *host = ev->from ? ev->from->domain : s ? xd_session_host(s) : NULL;
    rl_listener *l = s ? listener_get(r, xd_session_listener(s)) : NULL;
    const rl_limit *lip = limit_for(r, K_IP_AUTH, l, host);
    const rl_limit *lacc = ev->from ? limit_for(r, K_ACCOUNT_AUTH, l, host) : NULL;
    unsigned char a[16], key[16];
    int have_addr = addr_norm(event_addr(ev), a) == 0;
    rl_entry *eip = NULL, *eacc = NULL;
    const char *why = NULL;

    /* The operator's own machines log in as often as they need. */
    if (have_addr && is_exempt(r, a))
        return XD_PASS;
    if (have_addr)
        addr_key(a, key);
    if (lip && have_addr && (eip = addr_entry(r, key)) && !bucket_has(&eip->b[B_AUTH], lip, now, 1))
        why = kinds[K_IP_AUTH].name;
    else if (lacc && (eacc = account_entry(r, ev->from)) &&
             !bucket_has(&eacc->b[B_AUTH], lacc, now, 1))
        why = kinds[K_ACCOUNT_AUTH].name;
    if (!why) {
        if (eip)
            eip->b[B_AUTH].tokens -= 1;
        if (eacc)
            eacc->b[B_AUTH].tokens -= 1;
        return XD_PASS;
    }
    xd_count(r->m, "auth_refused", 1);
    if (log_ok(&r->log_auth, now, "login attempts refused")) {
        char jid[XD_JID_STR_MAX] = "?";
        if (ev->from)
            xd_jid_format(ev->from, 0, jid, sizeof(jid));
        xd_info("ratelimit: %s: login attempt for %s refused: over the %s limit",
                s ? xd_session_peer(s) : "?", jid, why);
    }
    return XD_DROP;
}

static int
on_register(xd_event *ev, void *data)
{
    rl *r = data;
    xd_session *s = ev->session;
    double now = xd_monotonic();
    const char *host = ev->from ? ev->from->domain : s ? xd_session_host(s) : NULL;
    rl_listener *l = s ? listener_get(r, xd_session_listener(s)) : NULL;
    const rl_limit *lim = limit_for(r, K_IP_REG, l, host);
    unsigned char a[16], key[16];
    rl_entry *e;

    if (!lim || addr_norm(event_addr(ev), a) != 0 || is_exempt(r, a))
        return XD_PASS; /* an internal registration (no address) is not limited */
    addr_key(a, key);
    if (!(e = addr_entry(r, key)))
        return XD_PASS;
    if (bucket_has(&e->b[B_REG], lim, now, 1)) {
        e->b[B_REG].tokens -= 1;
        return XD_PASS;
    }
    xd_count(r->m, "registrations_refused", 1);
    if (log_ok(&r->log_reg, now, "registrations refused")) {
        char ks[INET6_ADDRSTRLEN + 4];
        key_str(key, ks, sizeof(ks));
        xd_info("ratelimit: %s: registration refused: over the %s limit (%s)",
                s ? xd_session_peer(s) : "?", kinds[K_IP_REG].name, ks);
    }
    return XD_DROP;
}

/* ---- traffic --------------------------------------------------------------------------- */

/* What applies to the stream s: it may come from another address or
 * listener than the one that had ss before a resumption. */
static void
sess_resolve(rl *r, rl_sess *ss, xd_session *s)
{
    unsigned char a[16];
    rl_listener *l = listener_get(r, xd_session_listener(s));
    int c2s = xd_session_type(s) == XD_STREAM_C2S;

    ss->owner = s;
    ss->seen = 0; /* a new connection's byte count starts again */
    ss->exempt = addr_norm(xd_session_addr(s), a) == 0 && is_exempt(r, a);
    ss->lst = limit_for(r, c2s ? K_C2S_STANZAS : K_S2S_STANZAS, l, xd_session_host(s));
    ss->lby = limit_for(r, c2s ? K_C2S_BYTES : K_S2S_BYTES, l, xd_session_host(s));
}

static rl_sess *
sess_get(rl *r, xd_session *s)
{
    rl_sess *ss = xd_session_get_data(s, r->m);

    if (ss) {
        if (ss->owner != s)
            sess_resolve(r, ss, s); /* XEP-0198: resumed on this stream */
        return ss;
    }
    if (!(ss = calloc(1, sizeof(*ss))))
        return NULL;
    sess_resolve(r, ss, s);
    xd_session_set_data(s, r->m, ss, free);
    return ss;
}

/* Add d seconds held back; the held-back time over the last window,
 * estimated from this window and the previous one (weighted by overlap). */
static double
held_add(rl_sess *ss, double now, double window, double d)
{
    if (!ss->win_used || now - ss->win_start >= 2 * window) {
        ss->win_used = 1;
        ss->win_start = now;
        ss->held_prev = ss->held_cur = 0;
    } else if (now - ss->win_start >= window) {
        ss->held_prev = ss->held_cur;
        ss->held_cur = 0;
        ss->win_start += window;
    }
    ss->held_cur += d;
    return ss->held_prev * (1 - (now - ss->win_start) / window) + ss->held_cur;
}

/* XD_HOOK_C2S_STANZA and S2S_STANZA: charge the stream's buckets.  About 90
 * instructions per stanza. */
static int
on_stanza(xd_event *ev, void *data)
{
    rl *r = data;
    xd_session *s = ev->session;
    double now = xd_monotonic(), wait_by = 0, wait_st = 0, wait;
    uint64_t total;
    unsigned ms;
    rl_sess *ss;

    if (!s || !(ss = sess_get(r, s)) || ss->exempt)
        return XD_PASS;
    /* Bytes arrive in read-sized chunks: the first stanza of a chunk is
     * charged for all of it, the ones after it for nothing. */
    total = xd_session_bytes_in(s);
    if (ss->lby)
        wait_by =
            bucket_charge(&ss->by, ss->lby, now, total > ss->seen ? (double)(total - ss->seen) : 0);
    ss->seen = total;
    if (ss->lst)
        wait_st = bucket_charge(&ss->st, ss->lst, now, 1);
    wait = wait_st > wait_by ? wait_st : wait_by;
    if (wait <= 0) {
        ss->throttled = 0;
        return XD_PASS;
    }
    /* Rounded up: waking before the debt is repaid would only pause again. */
    ms = wait * 1000 >= MAX_PAUSE_MS ? MAX_PAUSE_MS : (unsigned)(wait * 1000) + 1;
    /* Only the stanza limit counts towards closing: a stream held back by
     * its byte limit alone is big content (a file over XEP-0047 in-band
     * bytestreams, say) and is slowed, never cut. */
    if (r->abuse_held > 0 && wait_st > 0 &&
        held_add(ss, now, r->abuse_window, wait_st < ms / 1000. ? wait_st : ms / 1000.) >=
            r->abuse_held) {
        /* Held back most of the window: not a burst, a flood. */
        xd_count(r->m, "streams_closed", 1);
        xd_info("ratelimit: %s (%s): over its stanza limit for %.0f s of the last %.0f s; "
                "closing",
                xd_session_peer(s), xd_session_type(s) == XD_STREAM_C2S ? "c2s" : "s2s",
                r->abuse_held, r->abuse_window);
        xd_session_close(s, "policy-violation", "sending too fast for too long");
        /* This stanza was read before the verdict: it goes on like the others
         * (nothing is dropped); the rest of the flood stays unread. */
        return XD_PASS;
    }
    if (!ss->throttled && log_ok(&r->log_throttle, now, "streams throttled")) {
        char who[XD_JID_STR_MAX] = "";
        if (xd_session_type(s) == XD_STREAM_C2S)
            xd_jid_format(xd_session_jid(s), 1, who, sizeof(who));
        else
            snprintf(who, sizeof(who), "%s", xd_session_peer_domain(s));
        xd_info("ratelimit: %s (%s): over its %s limit; reading paused for %u ms",
                xd_session_peer(s), who, wait_st >= wait_by ? "stanza" : "byte", ms);
    }
    ss->throttled = 1;
    xd_count(r->m, "pauses", 1);
    xd_session_pause(s, ms);
    return XD_PASS;
}

static void
sweep(void *data)
{
    rl *r = data;
    double now = xd_monotonic();
    table_sweep(&r->addrs, now);
    table_sweep(&r->accounts, now);
    log_flush(&r->log_conn, now, "connections refused");
    log_flush(&r->log_auth, now, "login attempts refused");
    log_flush(&r->log_reg, now, "registrations refused");
    log_flush(&r->log_throttle, now, "streams throttled");
}

/* ---- the module --------------------------------------------------------------------------- */

/* clang-format off */
static const xd_setting rl_settings[] = {
    {"ip_connections", XD_SETTING_STRING},
    {"listener_connections", XD_SETTING_STRING},
    {"ip_auth", XD_SETTING_STRING},
    {"account_auth", XD_SETTING_STRING},
    {"ip_registrations", XD_SETTING_STRING},
    {"c2s_stanzas", XD_SETTING_STRING},
    {"c2s_bytes", XD_SETTING_STRING},
    {"s2s_stanzas", XD_SETTING_STRING},
    {"s2s_bytes", XD_SETTING_STRING},
    {"listener_limits", XD_SETTING_STRING_LIST},
    {"host_limits", XD_SETTING_STRING_LIST},
    {"exempt", XD_SETTING_STRING_LIST},
    {"max_entries", XD_SETTING_INT},
    {"abuse_window", XD_SETTING_INT},
    {"abuse_held", XD_SETTING_INT},
    {NULL, 0},
};
/* clang-format on */

static void
rl_free(rl *r)
{
    if (!r)
        return;
    xd_timer_stop(r->sweep);
    table_free(&r->addrs);
    table_free(&r->accounts);
    while (r->listeners) {
        rl_listener *l = r->listeners;
        r->listeners = l->next;
        free(l->name);
        free(l);
    }
    for (int i = 0; i < r->novr; i++)
        free(r->ovr[i].target);
    free(r->ovr);
    free(r->exempt);
    free(r);
}

/* One entry of listener_limits / host_limits: "TARGET LIMIT SPEC". */
static int
parse_override(rl *r, const char *setting, unsigned scope, const char *item)
{
    char target[1100];
    const char *p = item, *name;
    size_t n;
    rl_override *o = &r->ovr[r->novr];
    int kind;

    p += strspn(p, " ");
    n = strcspn(p, " ");
    if (n == 0 || n >= sizeof(target)) {
        xd_config_error(r->m, setting, "'%s': expected \"%s LIMIT RATE/UNIT [burst N]\"", item,
                        scope == SCOPE_HOST ? "DOMAIN" : "ADDRESS:PORT");
        return -1;
    }
    memcpy(target, p, n);
    target[n] = '\0';
    p += n;
    p += strspn(p, " ");
    name = p;
    n = strcspn(p, " ");
    if ((kind = kind_by_name(name, n)) < 0 || !(kinds[kind].scopes & scope)) {
        xd_config_error(r->m, setting, "'%s': '%.*s' is not a limit that can be set per %s", item,
                        (int)n, name, scope == SCOPE_HOST ? "host" : "listener");
        return -1;
    }
    p += n;
    if (parse_spec(p, &o->lim) != 0) {
        xd_config_error(r->m, setting,
                        "'%s': the limit must be \"off\" or \"RATE/UNIT [burst N]\""
                        " (UNIT s, min, h or day; k and M suffixes)",
                        item);
        return -1;
    }
    if (scope == SCOPE_LISTENER) {
        char canon[INET6_ADDRSTRLEN + 16];
        if (listener_canon(target, canon, sizeof(canon)) != 0) {
            xd_config_error(r->m, setting,
                            "'%s': '%s' is not ADDRESS:PORT ([ADDRESS]:PORT for "
                            "IPv6) of a listener",
                            item, target);
            return -1;
        }
        o->target = strdup(canon);
    } else {
        char dom[XD_JID_PART_MAX + 1];
        if (xd_jid_prep_domain(dom, sizeof(dom), target) != 0 || !xd_is_local_host(dom)) {
            xd_config_error(r->m, setting, "'%s': '%s' is not a host served here", item, target);
            return -1;
        }
        o->target = strdup(dom);
    }
    if (!o->target)
        return -1;
    for (int i = 0; i < r->novr; i++)
        if (r->ovr[i].scope == scope && r->ovr[i].kind == kind &&
            strcmp(r->ovr[i].target, o->target) == 0) {
            xd_config_error(r->m, setting, "'%s': %s is set twice for %s", item, kinds[kind].name,
                            o->target);
            free(o->target);
            return -1;
        }
    o->scope = scope;
    o->kind = kind;
    r->novr++;
    return 0;
}

static int
rl_configure(rl *r)
{
    xd_module *m = r->m;
    int nl = xd_config_list_count(m, "listener_limits"),
        nh = xd_config_list_count(m, "host_limits");
    long long window = xd_config_int(m, "abuse_window", 60);
    long long held = xd_config_int(m, "abuse_held", 30);
    long long cap = xd_config_int(m, "max_entries", 65536);

    for (int k = 0; k < K_COUNT; k++) {
        const char *v = xd_config_string(m, kinds[k].name, kinds[k].def);
        if (parse_spec(v, &r->def[k]) != 0) {
            xd_config_error(m, kinds[k].name,
                            "'%s' must be \"off\" or \"RATE/UNIT [burst N]\" "
                            "(UNIT s, min, h or day; k and M suffixes), e.g. \"%s\"",
                            v, kinds[k].def);
            return -1;
        }
    }
    if (window < 1 || window > 86400) {
        xd_config_error(m, "abuse_window", "must be from 1 to 86400 seconds");
        return -1;
    }
    if (held < 0 || held > window) {
        xd_config_error(m, "abuse_held", "must be from 0 (never close) to abuse_window (%lld)",
                        window);
        return -1;
    }
    if (cap < 64 || cap > 16777216) {
        xd_config_error(m, "max_entries", "must be from 64 to 16777216");
        return -1;
    }
    r->abuse_window = (double)window;
    r->abuse_held = (double)held;
    if (nl + nh > 0 && !(r->ovr = calloc((size_t)(nl + nh), sizeof(*r->ovr))))
        return -1;
    for (int i = 0; i < nl; i++)
        if (parse_override(r, "listener_limits", SCOPE_LISTENER,
                           xd_config_list_item(m, "listener_limits", i)) != 0)
            return -1;
    for (int i = 0; i < nh; i++)
        if (parse_override(r, "host_limits", SCOPE_HOST,
                           xd_config_list_item(m, "host_limits", i)) != 0)
            return -1;
    r->nexempt = xd_config_list_count(m, "exempt");
    if (r->nexempt > 0 && !(r->exempt = calloc((size_t)r->nexempt, sizeof(*r->exempt))))
        return -1;
    for (int i = 0; i < r->nexempt; i++) {
        const char *v = xd_config_list_item(m, "exempt", i);
        if (xd_cidr_parse(v, r->exempt[i].addr, &r->exempt[i].prefix) != 0) {
            xd_config_error(m, "exempt", "'%s' is not an address or ADDRESS/PREFIX network", v);
            return -1;
        }
    }
    if (table_init(&r->addrs, (size_t)cap) != 0 || table_init(&r->accounts, (size_t)cap) != 0)
        return -1;
    return 0;
}

static int
rl_load(xd_module *m)
{
    static const char *const counters[] = {"connections_refused",   "auth_refused",
                                           "registrations_refused", "pauses",
                                           "streams_closed",        "entries_evicted"};
    rl *r = calloc(1, sizeof(*r));
    int ret = 0;

    if (!r)
        return -1;
    r->m = m;
    if (rl_configure(r) != 0) {
        rl_free(r);
        return -1;
    }
    xd_module_set_data(m, r);
    /* Zero counters show up in the stats too: "nothing refused" is news. */
    for (size_t i = 0; i < sizeof(counters) / sizeof(counters[0]); i++)
        xd_count(m, counters[i], 0);
    r->sweep = xd_timer_start(m, SWEEP_INTERVAL, SWEEP_INTERVAL, sweep, r);
    ret |= xd_hook(m, XD_HOOK_CONNECT, on_connect, r, XD_PRIO_FIRST);
    ret |= xd_hook(m, XD_HOOK_AUTH_ATTEMPT, on_auth, r, XD_PRIO_FIRST);
    ret |= xd_hook(m, XD_HOOK_REGISTER_ATTEMPT, on_register, r, XD_PRIO_FIRST);
    ret |= xd_hook(m, XD_HOOK_C2S_STANZA, on_stanza, r, XD_PRIO_FIRST);
    ret |= xd_hook(m, XD_HOOK_S2S_STANZA, on_stanza, r, XD_PRIO_FIRST);
    return ret || !r->sweep ? -1 : 0;
}

static void
rl_unload(xd_module *m)
{
    rl_free(xd_module_get_data(m));
    xd_module_set_data(m, NULL);
}

XD_MODULE(ratelimit) = {
    .abi = XD_MODULE_ABI,
    .name = "ratelimit",
    .settings = rl_settings,
    .load = rl_load,
    .unload = rl_unload,
};
