/*
 * mod_rtbl: real-time blocklists, the xmppbl.org protocol.
 *
 * A blocklist is a XEP-0060 pubsub node on a remote service, reached over
 * federation.  The item ids are the list (xmppbl.org's node names):
 *   spam_source_domains        a domain
 *   spam_source_jids_sha256,   lowercase hex SHA-256 of a bare JID; the hash
 *   muc_bans_sha256            of a bare domain lists that whole domain
 *   spam_source_ips            an IPv4/IPv6 address or CIDR range
 * and an item may carry a XEP-0377 <report/> (urn:xmpp:reporting:1), which
 * is kept for the log lines.
 *
 * Protocol (from the configured served domain to the service):
 *   XEP-0060 6.1   subscribe (jid = our domain), then
 *   XEP-0060 6.5   retrieve all items (following XEP-0059 RSM pages when the
 *                  service pages) and reconcile: a full resync
 *   XEP-0060 7.1.2.1, 7.2.2.1, 7.5, 8.4.2  item publish, retract, purge and
 *                  node delete notifications are applied as they arrive
 * When resyncs happen: at start, after a failed or timed-out request (with
 * backoff), every `resync_interval` seconds, on SIGHUP, and whenever the
 * service opens a new authenticated stream to us (XD_HOOK_S2S_AUTH) while
 * nothing is in flight: the core does not say when a federation stream goes
 * down, but notifications can only have been lost while the service had no
 * stream to us, and it opens a new one before it sends anything again.
 *
 * Enforcement: XD_HOOK_ROUTE at XD_PRIO_FIRST drops every stanza (messages,
 * presence including subscription requests, IQs) from a listed remote JID or
 * domain to a local account before any other processing: no offline
 * storage, no delivery and no error (an error would tell the sender whether
 * the account exists).  A sender already in the user's roster passes
 * (exempt_roster).  XD_HOOK_CONNECT refuses listed addresses on server-to-
 * server listeners.  Cost per stanza from a remote sender: a probe per label
 * of its domain, and when hash lists are non-empty one SHA-256 (the bare
 * JID) and one probe per hash (the domain's digest comes from a small cache).
 *
 * Storage: the lists live in memory (hash sets, a binary prefix tree for the
 * addresses) and are cached in Berkeley DB so that a restart blocks from
 * the first second, before the service answers:
 *   rtbl   "service\0node\0item id" -> the report summary (may be empty)
 * one transaction per notification or resync.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xmppd/module.h>

#define NS_PUBSUB "http://jabber.org/protocol/pubsub"
#define NS_PUBSUB_EVENT "http://jabber.org/protocol/pubsub#event"
#define NS_RSM "http://jabber.org/protocol/rsm"
#define NS_REPORTING "urn:xmpp:reporting:1"
#define NS_REPORTING_0 "urn:xmpp:reporting:0"

#define DEFAULT_SERVICE "xmppbl.org"
#define MAX_LISTS 32
#define MAX_NODE_LEN 255
#define MAX_ID_LEN 1023    /* longer item ids are ignored */
#define MAX_REPORT_LEN 200 /* bytes of a report kept for the logs */
#define MAX_ITEMS 1000000  /* per list: a runaway service cannot take all memory */
#define MAX_PAGES 1000     /* RSM pages of one fetch */
#define IQ_TIMEOUT 60.0
#define BACKOFF_MIN 5.0
#define BACKOFF_MAX 900.0
#define KICK_DELAY 1.0  /* resync after the service's stream came back */
#define DCACHE_SIZE 64  /* digests of recently seen domains */
#define LOG_WINDOW 10.0 /* drop log lines: at most LOG_BURST per window */
#define LOG_BURST 20

typedef enum kind { K_DOMAINS, K_SHA256, K_IPS } kind;
static const char *const kind_names[] = {"domains", "sha256", "ips"};
static const char *const kind_what[] = {"a domain", "a hex SHA-256", "an address or CIDR range"};

typedef enum lstate { S_IDLE, S_SUBSCRIBING, S_FETCHING, S_SYNCED, S_WAITING } lstate;

/* ---- a hash map with byte-string keys ------------------------------------------- */

typedef struct hent {
    struct hent *next;
    unsigned h;
    void *val;
    size_t klen;
    unsigned char key[]; /* klen bytes, then a NUL */
} hent;

typedef struct hmap {
    hent **b;
    size_t nb, n;
} hmap;

static unsigned
hash_bytes(const void *k, size_t len)
{
    const unsigned char *p = k;
    unsigned h = 2166136261u;
    for (size_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

static hent *
hmap_find(const hmap *t, const void *k, size_t len)
{
    unsigned h;
    if (!t->n)
        return NULL;
    h = hash_bytes(k, len);
    for (hent *e = t->b[h & (t->nb - 1)]; e; e = e->next)
        if (e->h == h && e->klen == len && !memcmp(e->key, k, len))
            return e;
    return NULL;
}

static int
hmap_grow(hmap *t)
{
    size_t nb = t->nb ? t->nb * 2 : 64;
    hent **b = calloc(nb, sizeof(*b));
    if (!b)
        return -1;
    for (size_t i = 0; i < t->nb; i++)
        for (hent *e = t->b[i], *next; e; e = next) {
            next = e->next;
            e->next = b[e->h & (nb - 1)];
            b[e->h & (nb - 1)] = e;
        }
    free(t->b);
    t->b = b;
    t->nb = nb;
    return 0;
}

/* The entry for k, created (val NULL) if absent; NULL when out of memory. */
static hent *
hmap_add(hmap *t, const void *k, size_t len, int *created)
{
    hent *e = hmap_find(t, k, len);
    *created = 0;
    if (e)
        return e;
    if (t->n >= t->nb && hmap_grow(t) != 0)
        return NULL;
    if (!(e = calloc(1, sizeof(*e) + len + 1)))
        return NULL;
    e->h = hash_bytes(k, len);
    e->klen = len;
    memcpy(e->key, k, len);
    e->next = t->b[e->h & (t->nb - 1)];
    t->b[e->h & (t->nb - 1)] = e;
    t->n++;
    *created = 1;
    return e;
}

/* Unlink k's entry and return it (the caller frees it and its value). */
static hent *
hmap_unlink(hmap *t, const void *k, size_t len)
{
    unsigned h;
    if (!t->n)
        return NULL;
    h = hash_bytes(k, len);
    for (hent **p = &t->b[h & (t->nb - 1)], *e; (e = *p); p = &e->next)
        if (e->h == h && e->klen == len && !memcmp(e->key, k, len)) {
            *p = e->next;
            t->n--;
            return e;
        }
    return NULL;
}

static void
hmap_clear(hmap *t, void (*free_val)(void *))
{
    for (size_t i = 0; i < t->nb; i++)
        for (hent *e = t->b[i], *next; e; e = next) {
            next = e->next;
            if (free_val)
                free_val(e->val);
            free(e);
        }
    free(t->b);
    memset(t, 0, sizeof(*t));
}

/* ---- a binary prefix tree for addresses ----------------------------------------- */

struct rlist;

typedef struct tnode {
    struct tnode *c[2];
    unsigned count;          /* items ending here */
    const struct rlist *src; /* the last list that added one (for the logs) */
} tnode;

static int
bit_at(const unsigned char *a, int i)
{
    return (a[i >> 3] >> (7 - (i & 7))) & 1;
}

static int
trie_add(tnode **p, const unsigned char *a, int bits, const struct rlist *src)
{
    for (int i = 0;; i++) {
        if (!*p && !(*p = calloc(1, sizeof(**p))))
            return -1;
        if (i == bits) {
            (*p)->count++;
            (*p)->src = src;
            return 0;
        }
        p = &(*p)->c[bit_at(a, i)];
    }
}

static void
trie_del(tnode **p, const unsigned char *a, int bits, int i)
{
    tnode *n = *p;
    if (!n)
        return;
    if (i == bits) {
        if (n->count)
            n->count--;
    } else
        trie_del(&n->c[bit_at(a, i)], a, bits, i + 1);
    if (!n->count && !n->c[0] && !n->c[1]) {
        free(n);
        *p = NULL;
    }
}

/* Length of the shortest listed prefix of a, or -1. */
static int
trie_match(const tnode *n, const unsigned char *a, int max, const tnode **hit)
{
    for (int i = 0; n; i++) {
        if (n->count) {
            *hit = n;
            return i;
        }
        if (i == max)
            break;
        n = n->c[bit_at(a, i)];
    }
    return -1;
}

static void
trie_free(tnode *n)
{
    if (!n)
        return;
    trie_free(n->c[0]);
    trie_free(n->c[1]);
    free(n);
}

/* ---- state ---------------------------------------------------------------------- */

typedef struct rtbl rtbl;

/* One blocklist: a node on a service. */
typedef struct rlist {
    rtbl *r;
    char *service; /* prepared bare JID */
    char *node;
    char *name;     /* "service/node", for the logs */
    char *dbprefix; /* "service\0node\0" */
    size_t dbplen;
    kind kind;
    hmap items;   /* item id -> report summary (malloc'd) or NULL */
    hmap pending; /* while fetching: what the service has sent so far */
    lstate state;
    unsigned gen; /* bumped by every sync start: older replies are ignored */
    char *after;  /* RSM: the last item id of the previous page */
    int pages;
    double backoff;
    xd_timer *retry;
    int kick;              /* resync when the kick timer fires */
    unsigned long invalid; /* items whose id is not of this list's kind */
} rlist;

/* One IQ in flight: which list and which sync it belongs to.  Owned by the
 * module (the core drops pending IQs of an unloading module without a call). */
typedef struct ticket {
    rlist *l;
    unsigned gen;
    struct ticket *prev, *next;
} ticket;

/* Index entry for a domain or a digest: how many items list it. */
typedef struct idx {
    unsigned count;
    const rlist *src;
} idx;

typedef struct dcache {
    char domain[256];
    unsigned char digest[32];
} dcache;

struct rtbl {
    xd_module *m;
    char host[XD_JID_PART_MAX + 1];
    rlist lists[MAX_LISTS];
    int nlists;
    int exempt_roster;
    long long resync_interval;
    xd_db *db;
    hmap domains; /* prepared domain -> idx */
    hmap hashes;  /* 32-byte digest -> idx */
    tnode *v4, *v6;
    size_t nips;
    dcache dcache[DCACHE_SIZE];
    xd_timer *start, *periodic, *kick;
    ticket *tickets;
    double log_window;
    int log_lines;
    unsigned long log_suppressed;
};

static void sync_start(rlist *l);

/* ---- small helpers -------------------------------------------------------------- */

static xmpp_stanza_t *
child_ns(xmpp_stanza_t *st, const char *name, const char *ns)
{
    return st ? xmpp_stanza_get_child_by_name_and_ns(st, name, ns) : NULL;
}

static int
name_is(xmpp_stanza_t *st, const char *name)
{
    const char *n = xmpp_stanza_is_tag(st) ? xmpp_stanza_get_name(st) : NULL;
    return n && !strcmp(n, name);
}

static char *
text_of(xmpp_stanza_t *st)
{
    char *t = st ? xmpp_stanza_get_text(st) : NULL;
    char *copy = t ? strdup(t) : NULL;
    if (t)
        xmpp_free(xd_ctx(), t);
    return copy;
}

/* The condition of a stanza error, for the logs. */
static const char *
error_condition(xmpp_stanza_t *reply)
{
    xmpp_stanza_t *e = reply ? xmpp_stanza_get_child_by_name(reply, "error") : NULL;
    for (xmpp_stanza_t *c = e ? xmpp_stanza_get_children(e) : NULL; c; c = xmpp_stanza_get_next(c))
        if (xmpp_stanza_is_tag(c) && strcmp(xmpp_stanza_get_name(c), "text") != 0)
            return xmpp_stanza_get_name(c);
    return reply ? "malformed reply" : "timeout";
}

/* Logs stay one line per event: no control characters from remote text. */
static void
sanitize(char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            *s = ' ';
}

/* XEP-0377: "<reason>: <text>", short, from an item's <report/> (or NULL). */
static char *
report_summary(xmpp_stanza_t *item)
{
    xmpp_stanza_t *rep = child_ns(item, "report", NS_REPORTING);
    const char *reason, *shortr;
    char *text, buf[MAX_REPORT_LEN + 1];
    size_t n;

    if (!rep)
        rep = child_ns(item, "report", NS_REPORTING_0);
    if (!rep)
        return NULL;
    reason = xmpp_stanza_get_attribute(rep, "reason");
    if (!reason) { /* urn:xmpp:reporting:0 names the reason with a child */
        xmpp_stanza_t *c = xmpp_stanza_get_children(rep);
        while (c && (!xmpp_stanza_is_tag(c) || name_is(c, "text")))
            c = xmpp_stanza_get_next(c);
        reason = c ? xmpp_stanza_get_name(c) : "report";
    }
    shortr = strrchr(reason, ':') ? strrchr(reason, ':') + 1 : reason;
    text = text_of(xmpp_stanza_get_child_by_name(rep, "text"));
    snprintf(buf, sizeof(buf), "%s%s%s", shortr, text && *text ? ": " : "", text ? text : "");
    free(text);
    n = strlen(buf);
    if (n == MAX_REPORT_LEN) { /* cut short: do not end inside a UTF-8 sequence */
        while (n > 0 && ((unsigned char)buf[n - 1] & 0xC0) == 0x80)
            n--;
        if (n > 0 && (unsigned char)buf[n - 1] >= 0xC0)
            n--;
        buf[n] = '\0';
    }
    sanitize(buf);
    return strdup(buf);
}

/* ---- item ids -> lookup keys ---------------------------------------------------- */

typedef struct nkey {
    unsigned char b[XD_JID_PART_MAX + 1];
    size_t len;
    int v6, bits; /* K_IPS */
} nkey;

static int
hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = tolower(c);
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* "a.b.c.d", "a.b.c.d/n", "v6", "v6/n"; host bits are cleared. */
static int
parse_cidr(const char *s, nkey *k)
{
    char buf[INET6_ADDRSTRLEN + 1];
    const char *slash = strchr(s, '/');
    size_t n = slash ? (size_t)(slash - s) : strlen(s);
    int max, mapped = 0;
    static const unsigned char v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

    if (n == 0 || n >= sizeof(buf))
        return -1;
    memcpy(buf, s, n);
    buf[n] = '\0';
    memset(k, 0, sizeof(*k));
    if (inet_pton(AF_INET, buf, k->b) == 1) {
        max = 32;
    } else if (inet_pton(AF_INET6, buf, k->b) == 1) {
        if (!memcmp(k->b, v4mapped, 12)) {
            memmove(k->b, k->b + 12, 4);
            memset(k->b + 4, 0, 12);
            max = 32;
            mapped = 1;
        } else {
            k->v6 = 1;
            max = 128;
        }
    } else
        return -1;
    k->bits = max;
    if (slash) {
        const char *p = slash + 1;
        int v = 0;
        if (!*p || strlen(p) > 3)
            return -1;
        for (; *p; p++) {
            if (*p < '0' || *p > '9')
                return -1;
            v = v * 10 + (*p - '0');
        }
        if (mapped)
            v -= 96; /* ::ffff:a.b.c.d/120 is a.b.c.d/24 */
        if (v < 0 || v > max)
            return -1;
        k->bits = v;
    }
    for (int i = k->bits; i < max; i++)
        k->b[i >> 3] &= (unsigned char)~(0x80 >> (i & 7));
    k->len = max / 8;
    return 0;
}

/* The key an item id stands for in its list's kind; -1 if it is not one. */
static int
normalize(kind kd, const char *id, nkey *k)
{
    size_t n = strlen(id);

    if (n == 0 || n > MAX_ID_LEN)
        return -1;
    switch (kd) {
    case K_DOMAINS:
        if (xd_jid_prep_domain((char *)k->b, sizeof(k->b), id) != 0)
            return -1;
        k->len = strlen((char *)k->b);
        return k->len ? 0 : -1;
    case K_SHA256:
        if (n != 64)
            return -1;
        for (int i = 0; i < 32; i++) {
            int hi = hexval(id[2 * i]), lo = hexval(id[2 * i + 1]);
            if (hi < 0 || lo < 0)
                return -1;
            k->b[i] = (unsigned char)(hi << 4 | lo);
        }
        k->len = 32;
        return 0;
    case K_IPS:
        return parse_cidr(id, k);
    }
    return -1;
}

/* ---- the lookup index ----------------------------------------------------------- */

static int
index_inc(rtbl *r, const rlist *l, const nkey *k)
{
    hent *e;
    int created;
    idx *x;

    if (l->kind == K_IPS) {
        if (trie_add(k->v6 ? &r->v6 : &r->v4, k->b, k->bits, l) != 0)
            return -1;
        r->nips++;
        return 0;
    }
    if (!(e = hmap_add(l->kind == K_DOMAINS ? &r->domains : &r->hashes, k->b, k->len, &created)))
        return -1;
    if (created && !(e->val = calloc(1, sizeof(idx)))) {
        free(hmap_unlink(l->kind == K_DOMAINS ? &r->domains : &r->hashes, k->b, k->len));
        return -1;
    }
    x = e->val;
    x->count++;
    x->src = l;
    return 0;
}

static void
index_dec(rtbl *r, const rlist *l, const nkey *k)
{
    hmap *t;
    hent *e;
    idx *x;

    if (l->kind == K_IPS) {
        trie_del(k->v6 ? &r->v6 : &r->v4, k->b, k->bits, 0);
        if (r->nips)
            r->nips--;
        return;
    }
    t = l->kind == K_DOMAINS ? &r->domains : &r->hashes;
    if (!(e = hmap_find(t, k->b, k->len)))
        return;
    x = e->val;
    if (--x->count == 0) {
        e = hmap_unlink(t, k->b, k->len);
        free(e->val);
        free(e);
    }
}

/* ---- a list's items in memory --------------------------------------------------- */

/* Add or update an item.  1 added or changed, 0 unchanged, -1 refused. */
static int
mem_put(rlist *l, const char *id, const char *report)
{
    size_t len = strlen(id);
    hent *e = hmap_find(&l->items, id, len);
    nkey k;
    int created;

    if (e) {
        if ((!e->val && !report) || (e->val && report && !strcmp(e->val, report)))
            return 0;
        free(e->val);
        e->val = report ? strdup(report) : NULL;
        return 1;
    }
    if (normalize(l->kind, id, &k) != 0) {
        if (l->invalid++ < 5)
            xd_warn("rtbl: %s: item id '%.80s%s' is not %s; ignored", l->name, id,
                    len > 80 ? "..." : "", kind_what[l->kind]);
        return -1;
    }
    if (l->items.n >= MAX_ITEMS) {
        if (l->invalid++ < 5)
            xd_warn("rtbl: %s: more than %d items; the rest is ignored", l->name, MAX_ITEMS);
        return -1;
    }
    if (!(e = hmap_add(&l->items, id, len, &created)))
        return -1;
    if (index_inc(l->r, l, &k) != 0) {
        free(hmap_unlink(&l->items, id, len));
        return -1;
    }
    e->val = report ? strdup(report) : NULL;
    return 1;
}

static int
mem_del(rlist *l, const char *id)
{
    hent *e = hmap_unlink(&l->items, id, strlen(id));
    nkey k;

    if (!e)
        return 0;
    if (normalize(l->kind, id, &k) == 0)
        index_dec(l->r, l, &k);
    free(e->val);
    free(e);
    return 1;
}

static void
mem_clear(rlist *l)
{
    for (size_t i = 0; i < l->items.nb; i++)
        for (hent *e = l->items.b[i]; e; e = e->next) {
            nkey k;
            if (normalize(l->kind, (const char *)e->key, &k) == 0)
                index_dec(l->r, l, &k);
        }
    hmap_clear(&l->items, free);
}

/* The pending set of a fetch (no index: it is not enforced until reconciled). */
static void
pending_put(rlist *l, const char *id, const char *report)
{
    int created;
    hent *e;
    if (l->pending.n >= MAX_ITEMS || !(e = hmap_add(&l->pending, id, strlen(id), &created)))
        return;
    free(e->val);
    e->val = report ? strdup(report) : NULL;
}

static void
pending_del(rlist *l, const char *id)
{
    hent *e = hmap_unlink(&l->pending, id, strlen(id));
    if (e) {
        free(e->val);
        free(e);
    }
}

/* ---- the cache ------------------------------------------------------------------ */

static int
db_key(const rlist *l, const char *id, char **key, size_t *klen)
{
    size_t n = strlen(id);
    if (!(*key = malloc(l->dbplen + n)))
        return -1;
    memcpy(*key, l->dbprefix, l->dbplen);
    memcpy(*key + l->dbplen, id, n);
    *klen = l->dbplen + n;
    return 0;
}

static int
db_put(rlist *l, xd_txn *txn, const char *id, const char *report)
{
    char *key;
    size_t klen;
    int rc;
    if (!l->r->db)
        return 0;
    if (db_key(l, id, &key, &klen) != 0)
        return -1;
    rc = xd_db_put(l->r->db, txn, key, klen, report ? report : "", report ? strlen(report) : 0);
    free(key);
    return rc;
}

static int
db_del(rlist *l, xd_txn *txn, const char *id)
{
    char *key;
    size_t klen;
    int rc;
    if (!l->r->db)
        return 0;
    if (db_key(l, id, &key, &klen) != 0)
        return -1;
    rc = xd_db_del(l->r->db, txn, key, klen);
    free(key);
    return rc == XD_NOTFOUND ? 0 : rc;
}

/* One transaction per change; a failed cache write is logged, the list in
 * memory (what is enforced) is already right. */
static xd_txn *
txn_begin(rtbl *r)
{
    xd_txn *txn = NULL;
    if (r->db && xd_txn_begin(&txn) != 0)
        return NULL;
    return txn;
}

static void
txn_end(rtbl *r, xd_txn *txn, int ok, const rlist *l)
{
    if (!r->db || !txn)
        return;
    if (ok && xd_txn_commit(txn) == 0)
        return;
    if (!ok)
        xd_txn_abort(txn);
    xd_warn("rtbl: %s: the cache could not be updated (the list in memory is current)", l->name);
}

typedef struct load_ctx {
    rtbl *r;
    size_t loaded;
    char **stale;
    size_t *stale_len;
    size_t nstale, capstale;
} load_ctx;

static int
load_record(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    load_ctx *c = data;
    const char *k = key;
    char id[MAX_ID_LEN + 1], *report = NULL;

    for (int i = 0; i < c->r->nlists; i++) {
        rlist *l = &c->r->lists[i];
        size_t n = klen - l->dbplen;
        if (klen <= l->dbplen || memcmp(k, l->dbprefix, l->dbplen) != 0)
            continue;
        if (n > MAX_ID_LEN || memchr(k + l->dbplen, '\0', n))
            break;
        memcpy(id, k + l->dbplen, n);
        id[n] = '\0';
        if (vlen && (report = malloc(vlen + 1))) {
            memcpy(report, val, vlen);
            report[vlen] = '\0';
        }
        if (mem_put(l, id, report) > 0)
            c->loaded++;
        free(report);
        return 0;
    }
    /* a list no longer configured (or a bad record): remove it afterwards */
    if (c->nstale == c->capstale) {
        size_t cap = c->capstale ? c->capstale * 2 : 64;
        char **s = realloc(c->stale, cap * sizeof(*s));
        size_t *sl = s ? realloc(c->stale_len, cap * sizeof(*sl)) : NULL;
        if (s)
            c->stale = s;
        if (!s || !sl)
            return 0;
        c->stale_len = sl;
        c->capstale = cap;
    }
    if ((c->stale[c->nstale] = malloc(klen ? klen : 1))) {
        memcpy(c->stale[c->nstale], key, klen);
        c->stale_len[c->nstale++] = klen;
    }
    return 0;
}

static void
cache_load(rtbl *r)
{
    load_ctx c = {.r = r};
    xd_txn *txn;

    if (xd_db_foreach(r->db, NULL, NULL, 0, load_record, &c) < 0)
        xd_warn("rtbl: the cache could not be read completely");
    if (c.nstale && (txn = txn_begin(r))) {
        int ok = 1;
        for (size_t i = 0; i < c.nstale; i++)
            ok &= xd_db_del(r->db, txn, c.stale[i], c.stale_len[i]) >= 0;
        if (!ok || xd_txn_commit(txn) != 0) {
            if (!ok)
                xd_txn_abort(txn);
            xd_warn("rtbl: could not remove cached items of lists no longer configured");
        } else
            xd_info("rtbl: removed %zu cached items of lists no longer configured", c.nstale);
    }
    for (size_t i = 0; i < c.nstale; i++)
        free(c.stale[i]);
    free(c.stale);
    free(c.stale_len);
    xd_info("rtbl: %zu items loaded from the cache (%zu domains, %zu hashes, %zu address ranges)",
            c.loaded, r->domains.n, r->hashes.n, r->nips);
}

/* ---- changes from the service --------------------------------------------------- */

static void
apply_publish(rlist *l, xmpp_stanza_t *items)
{
    rtbl *r = l->r;
    xd_txn *txn = txn_begin(r);
    int ok = 1, n = 0;

    for (xmpp_stanza_t *c = xmpp_stanza_get_children(items); c; c = xmpp_stanza_get_next(c)) {
        const char *id;
        if (name_is(c, "item") && (id = xmpp_stanza_get_id(c))) {
            char *report = report_summary(c);
            if (l->state == S_FETCHING)
                pending_put(l, id, report);
            if (mem_put(l, id, report) > 0) {
                ok &= db_put(l, txn, id, report) == 0;
                xd_info("rtbl: %s: listed %s%s%s", l->name, id, report ? " -- " : "",
                        report ? report : "");
                n++;
            }
            free(report);
        } else if (name_is(c, "retract") && (id = xmpp_stanza_get_id(c))) {
            if (l->state == S_FETCHING)
                pending_del(l, id);
            if (mem_del(l, id)) {
                ok &= db_del(l, txn, id) == 0;
                xd_info("rtbl: %s: unlisted %s", l->name, id);
                n++;
            }
        }
    }
    xd_count(r->m, "items_changed", (unsigned long)n);
    txn_end(r, txn, ok, l);
}

static void
apply_purge(rlist *l, const char *what)
{
    rtbl *r = l->r;
    xd_txn *txn = txn_begin(r);
    int ok = 1;
    size_t n = l->items.n;

    for (size_t i = 0; i < l->items.nb; i++)
        for (hent *e = l->items.b[i]; e; e = e->next)
            ok &= db_del(l, txn, (const char *)e->key) == 0;
    txn_end(r, txn, ok, l);
    mem_clear(l);
    if (l->state == S_FETCHING)
        hmap_clear(&l->pending, free);
    xd_info("rtbl: %s: %s; %zu items unlisted", l->name, what, n);
}

/* Full resync: the list becomes exactly what the service returned. */
static void
reconcile(rlist *l)
{
    rtbl *r = l->r;
    xd_txn *txn = txn_begin(r);
    int ok = 1;
    size_t added = 0, removed = 0;

    for (size_t i = 0; i < l->items.nb; i++)
        for (hent *e = l->items.b[i], *next; e; e = next) {
            next = e->next; /* mem_del frees e */
            if (!hmap_find(&l->pending, e->key, e->klen)) {
                ok &= db_del(l, txn, (const char *)e->key) == 0;
                mem_del(l, (const char *)e->key);
                removed++;
            }
        }
    for (size_t i = 0; i < l->pending.nb; i++)
        for (hent *e = l->pending.b[i]; e; e = e->next)
            if (mem_put(l, (const char *)e->key, e->val) > 0) {
                ok &= db_put(l, txn, (const char *)e->key, e->val) == 0;
                added++;
            }
    txn_end(r, txn, ok, l);
    hmap_clear(&l->pending, free);
    xd_info("rtbl: %s: synchronized: %zu items (%zu added or changed, %zu removed)", l->name,
            l->items.n, added, removed);
    xd_count(r->m, "resyncs", 1);
}

/* ---- talking to the service ----------------------------------------------------- */

static ticket *
ticket_new(rlist *l)
{
    ticket *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->l = l;
    t->gen = l->gen;
    t->next = l->r->tickets;
    if (t->next)
        t->next->prev = t;
    l->r->tickets = t;
    return t;
}

/* The list a reply is for, or NULL when that sync was superseded. */
static rlist *
ticket_take(ticket *t)
{
    rlist *l = t->l;
    int current = t->gen == l->gen;
    if (t->prev)
        t->prev->next = t->next;
    else
        l->r->tickets = t->next;
    if (t->next)
        t->next->prev = t->prev;
    free(t);
    return current ? l : NULL;
}

static void
retry_cb(void *data)
{
    rlist *l = data;
    l->retry = NULL; /* a spent one-shot timer */
    sync_start(l);
}

static void
sync_failed(rlist *l, const char *step, xmpp_stanza_t *reply)
{
    double delay = l->backoff;
    char *text = text_of(reply ? child_ns(xmpp_stanza_get_child_by_name(reply, "error"), "text",
                                          "urn:ietf:params:xml:ns:xmpp-stanzas")
                               : NULL);
    if (text)
        sanitize(text);
    l->backoff = l->backoff * 2 > BACKOFF_MAX ? BACKOFF_MAX : l->backoff * 2;
    l->state = S_WAITING;
    hmap_clear(&l->pending, free);
    free(l->after);
    l->after = NULL;
    xd_warn("rtbl: %s: %s failed (%s%s%s); keeping the %zu items we have, retrying in %.0f s",
            l->name, step, error_condition(reply), text ? ": " : "", text ? text : "", l->items.n,
            delay);
    free(text);
    xd_count(l->r->m, "sync_failures", 1);
    if (l->retry)
        xd_timer_stop(l->retry);
    l->retry = xd_timer_start(l->r->m, delay, 0, retry_cb, l);
}

static xmpp_stanza_t *
pubsub_iq(rlist *l, const char *type, xmpp_stanza_t **pubsub)
{
    xmpp_stanza_t *iq = xd_stanza_new("iq", NULL);
    xmpp_stanza_set_type(iq, type);
    xmpp_stanza_set_from(iq, l->r->host);
    xmpp_stanza_set_to(iq, l->service);
    *pubsub = xd_stanza_new("pubsub", NS_PUBSUB);
    xmpp_stanza_add_child_ex(iq, *pubsub, 0);
    return iq;
}

static int
send_iq(rlist *l, xmpp_stanza_t *iq, xd_iq_reply_fn fn)
{
    ticket *t = ticket_new(l);
    if (!t) {
        xmpp_stanza_release(iq);
        return -1;
    }
    if (xd_iq_send(l->r->m, iq, IQ_TIMEOUT, fn, t) != 0) { /* iq was taken */
        ticket_take(t);
        return -1;
    }
    return 0;
}

static void items_reply(xmpp_stanza_t *reply, void *data);

static void
fetch_page(rlist *l)
{
    xmpp_stanza_t *pubsub, *iq = pubsub_iq(l, "get", &pubsub),
                           *items = xd_stanza_new("items", NULL);

    xmpp_stanza_set_attribute(items, "node", l->node);
    xmpp_stanza_add_child_ex(pubsub, items, 0);
    if (l->after) { /* XEP-0059 2.2: the next page */
        xmpp_stanza_t *set = xd_stanza_new("set", NS_RSM), *after = xd_stanza_new("after", NULL);
        xmpp_stanza_t *t = xmpp_stanza_new(xd_ctx());
        xmpp_stanza_set_text(t, l->after);
        xmpp_stanza_add_child_ex(after, t, 0);
        xmpp_stanza_add_child_ex(set, after, 0);
        xmpp_stanza_add_child_ex(pubsub, set, 0);
    }
    l->pages++;
    if (send_iq(l, iq, items_reply) != 0)
        sync_failed(l, "sending the items request", NULL);
}

static void
items_reply(xmpp_stanza_t *reply, void *data)
{
    rlist *l = ticket_take(data);
    xmpp_stanza_t *pubsub, *items, *set;
    const char *type, *node;
    char *last = NULL, *count = NULL;
    int got = 0;

    if (!l || l->state != S_FETCHING)
        return;
    type = reply ? xmpp_stanza_get_type(reply) : NULL;
    if (!type || strcmp(type, "result") != 0) {
        sync_failed(l, "fetching the items", reply);
        return;
    }
    pubsub = child_ns(reply, "pubsub", NS_PUBSUB);
    items = pubsub ? xmpp_stanza_get_child_by_name(pubsub, "items") : NULL;
    node = items ? xmpp_stanza_get_attribute(items, "node") : NULL;
    if (!items || (node && strcmp(node, l->node) != 0)) {
        /* never reconcile with a reply we do not understand: it would empty the list */
        sync_failed(l,
                    items ? "fetching the items (the reply is for another node)"
                          : "fetching the items (no <items/> in the reply)",
                    reply);
        return;
    }
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(items); c; c = xmpp_stanza_get_next(c)) {
        const char *id = name_is(c, "item") ? xmpp_stanza_get_id(c) : NULL;
        if (id) {
            char *report = report_summary(c);
            pending_put(l, id, report);
            free(report);
            got++;
        }
    }
    /* XEP-0060 6.5.4 / XEP-0059: a service may return a page only. */
    set = child_ns(pubsub, "set", NS_RSM);
    if (set) {
        last = text_of(xmpp_stanza_get_child_by_name(set, "last"));
        count = text_of(xmpp_stanza_get_child_by_name(set, "count"));
    }
    if (set && last && *last && got > 0 && (!l->after || strcmp(last, l->after) != 0) &&
        (!count || strtoul(count, NULL, 10) > l->pending.n)) {
        if (l->pages >= MAX_PAGES) {
            xd_warn("rtbl: %s: more than %d pages of items; using what we have", l->name,
                    MAX_PAGES);
        } else {
            free(l->after);
            l->after = last;
            free(count);
            fetch_page(l);
            return;
        }
    }
    free(last);
    free(count);
    free(l->after);
    l->after = NULL;
    reconcile(l);
    l->state = S_SYNCED;
    l->backoff = BACKOFF_MIN;
}

static void
subscribe_reply(xmpp_stanza_t *reply, void *data)
{
    rlist *l = ticket_take(data);
    xmpp_stanza_t *sub;
    const char *type, *state;

    if (!l || l->state != S_SUBSCRIBING)
        return;
    type = reply ? xmpp_stanza_get_type(reply) : NULL;
    if (!type || strcmp(type, "result") != 0) {
        sync_failed(l, "subscribing", reply);
        return;
    }
    sub = child_ns(reply, "pubsub", NS_PUBSUB);
    sub = sub ? xmpp_stanza_get_child_by_name(sub, "subscription") : NULL;
    state = sub ? xmpp_stanza_get_attribute(sub, "subscription") : NULL;
    if (state && strcmp(state, "subscribed") != 0)
        xd_warn("rtbl: %s: subscription is '%s': changes may not be pushed until it is "
                "approved (resyncs still fetch the list)",
                l->name, state);
    else
        xd_debug("rtbl: %s: subscribed as %s", l->name, l->r->host);
    /* Subscribed first, then fetched: nothing published in between is missed. */
    l->state = S_FETCHING;
    l->pages = 0;
    hmap_clear(&l->pending, free);
    fetch_page(l);
}

/* (Re)subscribe, then fetch everything and reconcile. */
static void
sync_start(rlist *l)
{
    xmpp_stanza_t *pubsub, *iq, *sub;

    if (l->retry) {
        xd_timer_stop(l->retry); /* not fired yet */
        l->retry = NULL;
    }
    l->gen++;
    l->kick = 0;
    l->state = S_SUBSCRIBING;
    hmap_clear(&l->pending, free);
    free(l->after);
    l->after = NULL;
    iq = pubsub_iq(l, "set", &pubsub);
    sub = xd_stanza_new("subscribe", NULL);
    xmpp_stanza_set_attribute(sub, "node", l->node);
    xmpp_stanza_set_attribute(sub, "jid", l->r->host); /* XEP-0060 6.1.1: our server's JID */
    xmpp_stanza_add_child_ex(pubsub, sub, 0);
    xd_debug("rtbl: %s: subscribing and fetching", l->name);
    if (send_iq(l, iq, subscribe_reply) != 0)
        sync_failed(l, "sending the subscription", NULL);
}

static void
start_cb(void *data)
{
    rtbl *r = data;
    r->start = NULL;
    for (int i = 0; i < r->nlists; i++)
        sync_start(&r->lists[i]);
}

static void
periodic_cb(void *data)
{
    rtbl *r = data;
    for (int i = 0; i < r->nlists; i++)
        if (r->lists[i].state == S_SYNCED)
            sync_start(&r->lists[i]);
}

static void
kick_cb(void *data)
{
    rtbl *r = data;
    r->kick = NULL;
    for (int i = 0; i < r->nlists; i++) {
        rlist *l = &r->lists[i];
        if (l->kick && (l->state == S_SYNCED || l->state == S_WAITING)) {
            xd_debug("rtbl: %s: resynchronizing after the service connected", l->name);
            sync_start(l);
        }
        l->kick = 0;
    }
}

/* ---- hooks ---------------------------------------------------------------------- */

/* XD_HOOK_S2S_AUTH: the service opened a new stream to us.  Notifications
 * sent while it had none may be lost: resync the lists that are not in the
 * middle of a fetch (a fetch answered over this stream is newer anyway). */
static int
s2s_auth(xd_event *ev, void *data)
{
    rtbl *r = data;
    int any = 0;

    if (!ev->from || !r->nlists)
        return XD_PASS;
    for (int i = 0; i < r->nlists; i++) {
        rlist *l = &r->lists[i];
        const char *at = strchr(l->service, '@');
        const char *dom = at ? at + 1 : l->service;
        if (strcmp(dom, ev->from->domain) != 0)
            continue;
        if ((l->state == S_SYNCED || l->state == S_WAITING) && !l->kick) {
            l->kick = 1;
            any++;
        }
    }
    if (any)
        xd_info("rtbl: %s connected to us again: resynchronizing %d list(s) of it",
                ev->from->domain, any);
    if (any && !r->kick)
        r->kick = xd_timer_start(r->m, KICK_DELAY, 0, kick_cb, r);
    return XD_PASS;
}

static rlist *
find_list(rtbl *r, const char *service, const char *node)
{
    for (int i = 0; node && i < r->nlists; i++)
        if (!strcmp(r->lists[i].service, service) && !strcmp(r->lists[i].node, node))
            return &r->lists[i];
    return NULL;
}

/* XD_HOOK_HOST_STANZA: pubsub notifications for the server (XEP-0060 7, 8.4). */
static int
host_stanza(xd_event *ev, void *data)
{
    rtbl *r = data;
    xmpp_stanza_t *event;
    const char *type = xmpp_stanza_get_type(ev->stanza);
    char from[XD_JID_STR_MAX];
    int ours = 0;

    if (!ev->from || !ev->to || !name_is(ev->stanza, "message") ||
        (type && !strcmp(type, "error")) ||
        !(event = child_ns(ev->stanza, "event", NS_PUBSUB_EVENT)))
        return XD_PASS;
    if (xd_jid_format(ev->from, 0, from, sizeof(from)) < 0)
        return XD_PASS;
    for (int i = 0; i < r->nlists; i++)
        ours |= !strcmp(r->lists[i].service, from);
    if (!ours || strcmp(ev->to->domain, r->host) != 0) {
        /* Only the services we subscribed to speak for the lists. */
        xd_debug("rtbl: ignoring a pubsub event from %s to %s: not a blocklist service", from,
                 ev->to->domain);
        return XD_PASS;
    }
    xd_count(r->m, "notifications", 1);
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(event); c; c = xmpp_stanza_get_next(c)) {
        rlist *l;
        if (!xmpp_stanza_is_tag(c))
            continue;
        if (!(l = find_list(r, from, xmpp_stanza_get_attribute(c, "node")))) {
            xd_debug("rtbl: %s: notification for a node we do not use", from);
            continue;
        }
        if (name_is(c, "items"))
            apply_publish(l, c);
        else if (name_is(c, "purge"))
            apply_purge(l, "node purged");
        else if (name_is(c, "delete")) {
            /* The node is gone, and our subscription with it: empty the list
             * and try again later (it may be re-created). */
            apply_purge(l, "node deleted");
            if (l->state != S_WAITING) {
                l->gen++; /* a fetch in flight would be of the old node */
                l->state = S_WAITING;
                l->backoff = BACKOFF_MIN;
                if (!l->retry)
                    l->retry = xd_timer_start(r->m, BACKOFF_MIN, 0, retry_cb, l);
            }
        }
    }
    return XD_HANDLED;
}

/* The domain's SHA-256, from a small cache: spam usually comes from few domains. */
static const unsigned char *
domain_digest(rtbl *r, const char *domain, unsigned char tmp[32])
{
    size_t n = strlen(domain);
    dcache *c;

    if (n >= sizeof(c->domain)) {
        xd_sha256(domain, n, tmp);
        return tmp;
    }
    c = &r->dcache[hash_bytes(domain, n) % DCACHE_SIZE];
    if (strcmp(c->domain, domain) != 0) {
        xd_sha256(domain, n, c->digest);
        memcpy(c->domain, domain, n + 1);
    }
    return c->digest;
}

/* Which list names this sender, and how (for the log); NULL if none. */
static const rlist *
lookup_jid(rtbl *r, const xd_jid *from, const char **how)
{
    hent *e;

    if (r->domains.n) {
        /* the domain, or a parent: a listed spam domain's subdomains are its own */
        for (const char *d = from->domain; d; d = strchr(d, '.') ? strchr(d, '.') + 1 : NULL)
            if (*d && (e = hmap_find(&r->domains, d, strlen(d)))) {
                *how = d == from->domain ? "domain" : "parent domain";
                return ((idx *)e->val)->src;
            }
    }
    if (r->hashes.n) {
        unsigned char dig[32], tmp[32];
        char bare[XD_JID_STR_MAX];
        if (from->local[0] && xd_jid_format(from, 0, bare, sizeof(bare)) > 0) {
            xd_sha256(bare, strlen(bare), dig);
            if ((e = hmap_find(&r->hashes, dig, 32))) {
                *how = "JID hash";
                return ((idx *)e->val)->src;
            }
        }
        if ((e = hmap_find(&r->hashes, domain_digest(r, from->domain, tmp), 32))) {
            *how = "domain hash";
            return ((idx *)e->val)->src;
        }
    }
    return NULL;
}

/* One info line per stopped stanza or connection, at most LOG_BURST per window. */
static int
log_allowed(rtbl *r)
{
    double now = xd_now();
    if (now - r->log_window >= LOG_WINDOW) {
        if (r->log_suppressed)
            xd_info("rtbl: %lu more stopped stanzas/connections were not logged",
                    r->log_suppressed);
        r->log_window = now;
        r->log_lines = 0;
        r->log_suppressed = 0;
    }
    if (r->log_lines < LOG_BURST) {
        r->log_lines++;
        return 1;
    }
    r->log_suppressed++;
    return 0;
}

/* The report of the item that listed the sender, if we can tell which. */
static const char *
report_for(const rlist *l, const xd_jid *from, const char *how)
{
    hent *e = NULL;
    if (l->kind == K_DOMAINS) {
        for (const char *d = from->domain; d && !e; d = strchr(d, '.') ? strchr(d, '.') + 1 : NULL)
            e = hmap_find(&l->items, d, strlen(d));
    } else if (l->kind == K_SHA256) {
        unsigned char dig[32];
        char bare[XD_JID_STR_MAX], hex[65];
        if (!strcmp(how, "JID hash"))
            xd_jid_format(from, 0, bare, sizeof(bare));
        else
            snprintf(bare, sizeof(bare), "%s", from->domain);
        xd_sha256(bare, strlen(bare), dig);
        for (int i = 0; i < 32; i++)
            snprintf(hex + 2 * i, 3, "%02x", dig[i]);
        e = hmap_find(&l->items, hex, 64);
    }
    return e && e->val ? e->val : NULL;
}

/* XD_HOOK_ROUTE: a listed remote sender does not reach local accounts. */
static int
route_hook(xd_event *ev, void *data)
{
    rtbl *r = data;
    const rlist *l;
    const char *how = NULL;

    if (!ev->from || !ev->to || !ev->to->local[0] || (!r->domains.n && !r->hashes.n))
        return XD_PASS;
    if (xd_is_local_host(ev->from->domain) || !xd_is_local_host(ev->to->domain))
        return XD_PASS;
    if (!(l = lookup_jid(r, ev->from, &how)))
        return XD_PASS;
    if (r->exempt_roster) {
        xd_jid user = *ev->to, contact = *ev->from;
        int rel;
        xd_jid_to_bare(&user);
        xd_jid_to_bare(&contact);
        rel = xd_roster_relation(&user, &contact);
        if (rel > 0 && (rel & XD_ROSTER_ITEM)) {
            xd_count(r->m, "roster_exempted", 1);
            return XD_PASS;
        }
    }
    xd_count(r->m, "stanzas_dropped", 1);
    if (log_allowed(r)) {
        char f[XD_JID_STR_MAX], t[XD_JID_STR_MAX];
        const char *type = xmpp_stanza_get_type(ev->stanza), *rep = report_for(l, ev->from, how);
        xd_jid_format(ev->from, 1, f, sizeof(f));
        xd_jid_format(ev->to, 1, t, sizeof(t));
        xd_info("rtbl: dropped %s%s%s from %s to %s: %s listed in %s%s%s",
                xmpp_stanza_get_name(ev->stanza), type ? " type=" : "", type ? type : "", f, t, how,
                l->name, rep ? " -- " : "", rep ? rep : "");
    }
    return XD_DROP;
}

/* XD_HOOK_CONNECT: listed addresses do not get a server-to-server stream. */
static int
connect_hook(xd_event *ev, void *data)
{
    rtbl *r = data;
    const struct sockaddr *sa = ev->addr;
    unsigned char a[16];
    const tnode *hit = NULL;
    int v6 = 0, bits;

    if (!r->nips || !ev->session || !sa || xd_session_type(ev->session) != XD_STREAM_S2S)
        return XD_PASS;
    if (sa->sa_family == AF_INET) {
        memcpy(a, &((const struct sockaddr_in *)(const void *)sa)->sin_addr, 4);
    } else if (sa->sa_family == AF_INET6) {
        const struct in6_addr *in6 = &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr;
        if (IN6_IS_ADDR_V4MAPPED(in6))
            memcpy(a, in6->s6_addr + 12, 4);
        else {
            memcpy(a, in6->s6_addr, 16);
            v6 = 1;
        }
    } else
        return XD_PASS;
    bits = trie_match(v6 ? r->v6 : r->v4, a, v6 ? 128 : 32, &hit);
    if (bits < 0)
        return XD_PASS;
    xd_count(r->m, "connections_refused", 1);
    if (log_allowed(r)) {
        char ip[INET6_ADDRSTRLEN];
        inet_ntop(v6 ? AF_INET6 : AF_INET, a, ip, sizeof(ip));
        xd_info("rtbl: refused a server-to-server connection from %s: in a /%d listed in %s", ip,
                bits, hit->src ? hit->src->name : "a blocklist");
    }
    return XD_DROP;
}

static int
reload_hook(xd_event *ev, void *data)
{
    rtbl *r = data;
    (void)ev;
    xd_info("rtbl: SIGHUP: resynchronizing %d list(s)", r->nlists);
    for (int i = 0; i < r->nlists; i++)
        sync_start(&r->lists[i]);
    return XD_PASS;
}

/* ---- configuration -------------------------------------------------------------- */

static const char *const default_lists[] = {
    DEFAULT_SERVICE " spam_source_domains",
    DEFAULT_SERVICE " spam_source_jids_sha256",
    DEFAULT_SERVICE " muc_bans_sha256",
    DEFAULT_SERVICE " spam_source_ips",
};

static int
ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

/* "service node [kind]"; kind defaults from the node name's suffix. */
static int
parse_list(rtbl *r, const char *spec, char *err, size_t errlen)
{
    char svc[XD_JID_STR_MAX], node[MAX_NODE_LEN + 2], kd[32], extra[2];
    int n = sscanf(spec, " %3071s %256s %31s %1s", svc, node, kd, extra);
    rlist *l;
    xd_jid j;
    char bare[XD_JID_STR_MAX];

    if (n < 2 || n > 3) {
        snprintf(err, errlen, "'%.200s' is not \"service node\" or \"service node kind\"", spec);
        return -1;
    }
    if (strlen(node) > MAX_NODE_LEN) {
        snprintf(err, errlen, "'%.200s': the node name is too long", spec);
        return -1;
    }
    if (xd_jid_parse(&j, svc) != 0 || j.resource[0] ||
        xd_jid_format(&j, 0, bare, sizeof(bare)) < 0) {
        snprintf(err, errlen, "'%.200s': '%.200s' is not a pubsub service's JID", spec, svc);
        return -1;
    }
    if (r->nlists >= MAX_LISTS) {
        snprintf(err, errlen, "at most %d lists", MAX_LISTS);
        return -1;
    }
    if (find_list(r, bare, node)) {
        snprintf(err, errlen, "'%.200s' is listed twice", spec);
        return -1;
    }
    l = &r->lists[r->nlists];
    if (n == 3) {
        if (!strcmp(kd, "domains"))
            l->kind = K_DOMAINS;
        else if (!strcmp(kd, "sha256"))
            l->kind = K_SHA256;
        else if (!strcmp(kd, "ips"))
            l->kind = K_IPS;
        else {
            snprintf(err, errlen, "'%.200s': the kind must be domains, sha256 or ips", spec);
            return -1;
        }
    } else if (ends_with(node, "_domains"))
        l->kind = K_DOMAINS;
    else if (ends_with(node, "_sha256"))
        l->kind = K_SHA256;
    else if (ends_with(node, "_ips"))
        l->kind = K_IPS;
    else {
        snprintf(err, errlen,
                 "'%.100s': say what its item ids are: \"%.100s %.100s domains|sha256|ips\"", spec,
                 svc, node);
        return -1;
    }
    l->r = r;
    l->service = strdup(bare);
    l->node = strdup(node);
    l->dbplen = strlen(bare) + 1 + strlen(node) + 1;
    l->dbprefix = malloc(l->dbplen);
    l->name = malloc(strlen(bare) + strlen(node) + 2);
    r->nlists++; /* from here on unload frees it */
    if (!l->service || !l->node || !l->dbprefix || !l->name) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    memcpy(l->dbprefix, bare, strlen(bare) + 1);
    memcpy(l->dbprefix + strlen(bare) + 1, node, strlen(node) + 1);
    snprintf(l->name, strlen(bare) + strlen(node) + 2, "%s/%s", bare, node);
    l->backoff = BACKOFF_MIN;
    return 0;
}

static const xd_setting rtbl_settings[] = {
    {"lists", XD_SETTING_STRING_LIST},
    {"host", XD_SETTING_STRING},
    {"exempt_roster", XD_SETTING_BOOL},
    {"resync_interval", XD_SETTING_INT},
    {NULL, 0},
};

static int
rtbl_load(xd_module *m)
{
    rtbl *r = calloc(1, sizeof(*r));
    const char *host = xd_config_string(m, "host", NULL);
    int nl = xd_config_list_count(m, "lists"), rc = 0;
    char err[512];

    if (!r)
        return -1;
    xd_module_set_data(m, r);
    r->m = m;
    r->exempt_roster = xd_config_bool(m, "exempt_roster", 1);
    r->resync_interval = xd_config_int(m, "resync_interval", 3600);
    if (r->resync_interval != 0 && (r->resync_interval < 60 || r->resync_interval > 604800)) {
        xd_config_error(m, "resync_interval", "must be 0 (off) or from 60 to 604800 seconds");
        return -1;
    }
    /* The served domain whose JID subscribes: the first one unless named. */
    if (!host && !(host = xd_host_name(0))) {
        xd_config_error(m, "host", "no served domain to subscribe from (see hosts)");
        return -1;
    }
    if (xd_jid_prep_domain(r->host, sizeof(r->host), host) != 0 || !xd_is_local_host(r->host)) {
        xd_config_error(m, "host", "'%s' is not a domain served here (see hosts)", host);
        return -1;
    }
    for (int i = 0; i < (nl > 0 ? nl : (int)(sizeof(default_lists) / sizeof(*default_lists)));
         i++) {
        const char *spec = nl > 0 ? xd_config_list_item(m, "lists", i) : default_lists[i];
        if (parse_list(r, spec, err, sizeof(err)) != 0) {
            xd_config_error(m, "lists", "%s", err);
            return -1;
        }
    }
    /* --check-config: the store is not open; nothing to load or run then */
    if ((r->db = xd_db_open("rtbl")))
        cache_load(r);
    r->start = xd_timer_start(m, 0, 0, start_cb, r);
    if (r->resync_interval)
        r->periodic = xd_timer_start(m, (double)r->resync_interval, (double)r->resync_interval,
                                     periodic_cb, r);
    rc |= xd_hook(m, XD_HOOK_ROUTE, route_hook, r, XD_PRIO_FIRST);
    rc |= xd_hook(m, XD_HOOK_HOST_STANZA, host_stanza, r, XD_PRIO_DEFAULT);
    rc |= xd_hook(m, XD_HOOK_CONNECT, connect_hook, r, XD_PRIO_FIRST);
    rc |= xd_hook(m, XD_HOOK_S2S_AUTH, s2s_auth, r, XD_PRIO_DEFAULT);
    rc |= xd_hook(m, XD_HOOK_RELOAD, reload_hook, r, XD_PRIO_DEFAULT);
    xd_info("rtbl: %d list(s), subscribing as %s%s", r->nlists, r->host,
            r->exempt_roster ? "; roster contacts are exempt" : "");
    for (int i = 0; i < r->nlists; i++)
        xd_debug("rtbl: list %s (%s)", r->lists[i].name, kind_names[r->lists[i].kind]);
    return rc ? -1 : 0;
}

static void
rtbl_unload(xd_module *m)
{
    rtbl *r = xd_module_get_data(m);
    if (!r)
        return;
    xd_timer_stop(r->start);
    xd_timer_stop(r->periodic);
    xd_timer_stop(r->kick);
    while (r->tickets) /* the core forgets our pending IQs without calling back */
        ticket_take(r->tickets);
    for (int i = 0; i < r->nlists; i++) {
        rlist *l = &r->lists[i];
        xd_timer_stop(l->retry);
        hmap_clear(&l->items, free);
        hmap_clear(&l->pending, free);
        free(l->after);
        free(l->service);
        free(l->node);
        free(l->name);
        free(l->dbprefix);
    }
    hmap_clear(&r->domains, free);
    hmap_clear(&r->hashes, free);
    trie_free(r->v4);
    trie_free(r->v6);
    free(r);
}

XD_MODULE(rtbl) = {
    .abi = XD_MODULE_ABI,
    .name = "rtbl",
    .settings = rtbl_settings,
    .load = rtbl_load,
    .unload = rtbl_unload,
};
