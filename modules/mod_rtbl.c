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
 * What no list can do: a mistaken or compromised service must not be able
 * to cut this server off from federation with one item, so items that would
 * block a large part of the network are refused (logged, counted as
 * items_refused): IPv4 ranges shorter than /8 (IPv4-mapped IPv6 ranges are
 * judged as IPv4), IPv6 ranges shorter than /32, and on domain lists a
 * single-label domain (a parent of every name under a top-level domain) or
 * anything that looks like an IP address.  A hash that happens to be the
 * digest of a top-level domain cannot be told apart; it is enforced.
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
 * of its domain, and when hash lists are non-empty two SHA-256 (the bare JID
 * and the domain) and two probes.  The tables are the core's xd_hashtab
 * (keyed SipHash): the service chooses every key, so it must not be able to
 * choose keys that fall into one chain.
 *
 * Storage: the lists live in memory (hash tables, a binary prefix tree for
 * the addresses) and are cached in Berkeley DB so that a restart blocks from
 * the first second, before the service answers:
 *   rtbl   "service\0node\0item id" -> the report summary (may be empty)
 * Changes are written in one transaction at most once per FLUSH_DELAY (see
 * cache_mark).
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
#define MAX_LOG_ID 80      /* bytes of an item id in a log line */
#define MAX_ITEMS 1000000  /* per list: a runaway service cannot take all memory */
#define MAX_PAGES 1000     /* RSM pages of one fetch */
#define MIN_V4_BITS 8      /* shorter address ranges are refused */
#define MIN_V6_BITS 32
#define REFUSED_LOGGED 20 /* lines about refused items per notification or resync */
#define FLUSH_DELAY 1.0   /* cache writes are batched over this long... */
#define MAX_DIRTY 65536   /* ...or this many changed items of a list */
#define IQ_TIMEOUT 60.0
#define BACKOFF_MIN 5.0
#define BACKOFF_MAX 900.0
#define KICK_DELAY 1.0  /* resync after the service's stream came back */
#define LOG_WINDOW 10.0 /* drop log lines: at most LOG_BURST per window */
#define LOG_BURST 20

typedef enum kind { K_DOMAINS, K_SHA256, K_IPS } kind;
static const char *const kind_names[] = {"domains", "sha256", "ips"};
static const char *const kind_what[] = {"a domain", "a hex SHA-256", "an address or CIDR range"};

typedef enum lstate { S_IDLE, S_SUBSCRIBING, S_FETCHING, S_SYNCED, S_WAITING } lstate;

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

/* A list item as the service names it: the id is the table key. */
typedef struct item {
    char *report; /* NULL when none; else inside this allocation */
    char id[];
} item;

/* One blocklist: a node on a service. */
typedef struct rlist {
    rtbl *r;
    char *service; /* prepared bare JID */
    char *node;
    char *name;     /* "service/node", for the logs */
    char *dbprefix; /* "service\0node\0" */
    size_t dbplen;
    kind kind;
    xd_hashtab *items;   /* item id -> item */
    xd_hashtab *pending; /* while fetching: what the service has sent so far */
    xd_hashtab *dirty;   /* ids whose cache record is out of date (key == value) */
    lstate state;
    unsigned gen; /* bumped by every sync start: older replies are ignored */
    char *after;  /* RSM: the last item id of the previous page */
    int pages;
    unsigned long refused; /* items of the current fetch that were too broad */
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
    char key[];
} idx;

struct rtbl {
    xd_module *m;
    char host[XD_JID_PART_MAX + 1];
    rlist lists[MAX_LISTS];
    int nlists;
    int exempt_roster;
    long long resync_interval;
    xd_db *db;
    xd_hashtab *domains; /* prepared domain -> idx */
    xd_hashtab *hashes;  /* lowercase hex SHA-256 -> idx */
    tnode *v4, *v6;
    size_t nips;
    xd_timer *start, *periodic, *kick, *flush;
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

/* Remote text for a log line: at most size - 1 bytes ("..." when cut), not
 * cut inside a UTF-8 sequence, no control characters.  Returns buf. */
static char *
clip(char *buf, size_t size, const char *s)
{
    size_t n = strlen(s);
    if (n < size) {
        memcpy(buf, s, n + 1);
    } else {
        size_t i = n = size - 4;
        while (i > 0 && ((unsigned char)s[i - 1] & 0xC0) == 0x80)
            i--;
        if (i > 0 && (unsigned char)s[i - 1] >= 0xC0) {
            unsigned char c = (unsigned char)s[i - 1];
            if (n - (i - 1) < (size_t)(c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2))
                n = i - 1; /* the last sequence is incomplete */
        }
        memcpy(buf, s, n);
        memcpy(buf + n, "...", 4);
    }
    sanitize(buf);
    return buf;
}

/* XEP-0377: "<reason>: <text>", short, from an item's <report/> (or NULL). */
static char *
report_summary(xmpp_stanza_t *item)
{
    xmpp_stanza_t *rep = child_ns(item, "report", NS_REPORTING);
    const char *reason, *shortr;
    char *text, *full, buf[MAX_REPORT_LEN + 1];
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
    n = strlen(shortr) + (text ? strlen(text) + 2 : 0) + 1;
    if (!(full = malloc(n))) {
        free(text);
        return NULL;
    }
    snprintf(full, n, "%s%s%s", shortr, text && *text ? ": " : "", text ? text : "");
    free(text);
    clip(buf, sizeof(buf), full);
    free(full);
    return strdup(buf);
}

/* Remove an entry and free its value (which holds the key). */
static int
free_entry(const char *key, void *val, void *data)
{
    xd_hashtab_del(data, key);
    free(val);
    return 0;
}

static void
tab_clear(xd_hashtab *t)
{
    if (t)
        xd_hashtab_foreach(t, free_entry, t);
}

static void
tab_free(xd_hashtab *t)
{
    tab_clear(t);
    xd_hashtab_free(t);
}

static void
sha256_hex(const char *s, char hex[65])
{
    static const char digits[] = "0123456789abcdef";
    unsigned char d[32];
    xd_sha256(s, strlen(s), d);
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = digits[d[i] >> 4];
        hex[2 * i + 1] = digits[d[i] & 15];
    }
    hex[64] = '\0';
}

/* ---- item ids -> lookup keys ---------------------------------------------------- */

typedef struct nkey {
    char s[XD_JID_PART_MAX + 1]; /* domains, sha256: the index key */
    unsigned char a[16];         /* ips: the address, host bits cleared */
    int v6, bits;
} nkey;

/* An address or range as a key: IPv4 (also written IPv4-mapped) in 4 bytes,
 * IPv6 in 16; host bits cleared. */
static int
parse_cidr(const char *s, nkey *k)
{
    static const unsigned char v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    unsigned char a[16];
    int bits;

    if (xd_cidr_parse(s, a, &bits) != 0)
        return -1;
    memset(k->a, 0, sizeof(k->a));
    k->v6 = memcmp(a, v4mapped, 12) != 0;
    if (!k->v6 && bits < 96)
        return -1; /* ::ffff:0:0/95 and shorter are not IPv4 ranges */
    k->bits = k->v6 ? bits : bits - 96;
    memcpy(k->a, k->v6 ? a : a + 12, k->v6 ? 16 : 4);
    return 0;
}

/* The key an item id stands for in its list's kind; -1 if it is not one. */
static int
normalize(kind kd, const char *id, nkey *k)
{
    size_t n = strnlen(id, MAX_ID_LEN + 1);

    if (n == 0 || n > MAX_ID_LEN)
        return -1;
    switch (kd) {
    case K_DOMAINS:
        return xd_jid_prep_domain(k->s, sizeof(k->s), id) == 0 && k->s[0] ? 0 : -1;
    case K_SHA256:
        if (n != 64)
            return -1;
        for (size_t i = 0; i < 64; i++) {
            if (!isxdigit((unsigned char)id[i]))
                return -1;
            k->s[i] = (char)tolower((unsigned char)id[i]);
        }
        k->s[64] = '\0';
        return 0;
    case K_IPS:
        return parse_cidr(id, k);
    }
    return -1;
}

/* Why a valid item would block too much (see the file header), or NULL. */
static const char *
too_broad(kind kd, const nkey *k)
{
    const char *last;

    if (kd == K_IPS && k->bits < (k->v6 ? MIN_V6_BITS : MIN_V4_BITS))
        return k->v6 ? "an IPv6 range shorter than /32" : "an IPv4 range shorter than /8";
    if (kd != K_DOMAINS)
        return NULL;
    if (k->s[0] == '[')
        return "an IP address, not a domain";
    if (!(last = strrchr(k->s, '.')))
        return "a single-label domain (every domain under it would be blocked)";
    /* no top-level domain is all digits (RFC 3696 2): an address or junk */
    if (strspn(last + 1, "0123456789") == strlen(last + 1))
        return "an IP address, not a domain";
    return NULL;
}

/* Whether an item id may enter list l: 0 yes (k is its key), -1 it is not
 * of the list's kind, -2 it is too broad.  Logs (bounded) and counts what it
 * refuses; *refused counts the refusals of one notification or resync. */
static int
item_check(rlist *l, const char *id, nkey *k, unsigned long *refused)
{
    char shown[MAX_LOG_ID + 1];
    const char *why;

    if (normalize(l->kind, id, k) != 0) {
        xd_count(l->r->m, "items_invalid", 1);
        if (l->invalid++ < 5)
            xd_warn("rtbl: %s: item id '%s' is not %s; ignored", l->name,
                    clip(shown, sizeof(shown), id), kind_what[l->kind]);
        return -1;
    }
    if ((why = too_broad(l->kind, k))) {
        xd_count(l->r->m, "items_refused", 1);
        if ((*refused)++ < REFUSED_LOGGED)
            xd_warn("rtbl: %s: item '%s' refused: %s", l->name, clip(shown, sizeof(shown), id),
                    why);
        return -2;
    }
    return 0;
}

/* ---- the lookup index ----------------------------------------------------------- */

static int
index_inc(rtbl *r, const rlist *l, const nkey *k)
{
    xd_hashtab *t = l->kind == K_DOMAINS ? r->domains : r->hashes;
    idx *x;

    if (l->kind == K_IPS) {
        if (trie_add(k->v6 ? &r->v6 : &r->v4, k->a, k->bits, l) != 0)
            return -1;
        r->nips++;
        return 0;
    }
    if (!(x = xd_hashtab_get(t, k->s))) {
        size_t n = strlen(k->s) + 1;
        if (!(x = calloc(1, sizeof(*x) + n)))
            return -1;
        memcpy(x->key, k->s, n);
        if (xd_hashtab_put(t, x->key, x) != 0) {
            free(x);
            return -1;
        }
    }
    x->count++;
    x->src = l;
    return 0;
}

static void
index_dec(rtbl *r, const rlist *l, const nkey *k)
{
    xd_hashtab *t = l->kind == K_DOMAINS ? r->domains : r->hashes;
    idx *x;

    if (l->kind == K_IPS) {
        trie_del(k->v6 ? &r->v6 : &r->v4, k->a, k->bits, 0);
        if (r->nips)
            r->nips--;
        return;
    }
    if ((x = xd_hashtab_get(t, k->s)) && --x->count == 0)
        free(xd_hashtab_del(t, k->s));
}

/* ---- a list's items in memory --------------------------------------------------- */

static item *
item_new(const char *id, const char *report)
{
    size_t n = strlen(id) + 1, rn = report ? strlen(report) + 1 : 0;
    item *it = malloc(sizeof(*it) + n + rn);
    if (!it)
        return NULL;
    memcpy(it->id, id, n);
    it->report = report ? memcpy(it->id + n, report, rn) : NULL;
    return it;
}

/* Add or update an item (item_check accepted its id).  1 added or changed,
 * 0 unchanged, -1 not kept. */
static int
mem_put(rlist *l, const char *id, const char *report)
{
    item *old = xd_hashtab_get(l->items, id), *it;
    nkey k;

    if (old && (old->report ? report && !strcmp(old->report, report) : !report))
        return 0;
    /* the index must never hold what item_check refuses, whoever calls */
    if (!old && (normalize(l->kind, id, &k) != 0 || too_broad(l->kind, &k)))
        return -1;
    if (!old && xd_hashtab_count(l->items) >= MAX_ITEMS) {
        if (l->invalid++ < 5)
            xd_warn("rtbl: %s: more than %d items; the rest is ignored", l->name, MAX_ITEMS);
        return -1;
    }
    if (!(it = item_new(id, report)) || xd_hashtab_put(l->items, it->id, it) != 0) {
        free(it);
        return -1;
    }
    if (old) {
        free(old);
        return 1;
    }
    if (index_inc(l->r, l, &k) != 0) {
        xd_hashtab_del(l->items, it->id);
        free(it);
        return -1;
    }
    return 1;
}

static int
mem_del(rlist *l, const char *id)
{
    item *it = xd_hashtab_del(l->items, id);
    nkey k;

    if (!it)
        return 0;
    if (normalize(l->kind, it->id, &k) == 0)
        index_dec(l->r, l, &k);
    free(it);
    return 1;
}

/* The pending set of a fetch (no index: it is not enforced until reconciled);
 * only ids item_check accepted. */
static void
pending_put(rlist *l, const char *id, const char *report)
{
    item *old = xd_hashtab_get(l->pending, id), *it;

    if ((!old && xd_hashtab_count(l->pending) >= MAX_ITEMS) || !(it = item_new(id, report)))
        return;
    if (xd_hashtab_put(l->pending, it->id, it) != 0) {
        free(it);
        return;
    }
    free(old);
}

static void
pending_del(rlist *l, const char *id)
{
    free(xd_hashtab_del(l->pending, id));
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
    if (db_key(l, id, &key, &klen) != 0)
        return -1;
    rc = xd_db_del(l->r->db, txn, key, klen);
    free(key);
    return rc == XD_NOTFOUND ? 0 : rc;
}

typedef struct flush_ctx {
    rlist *l;
    xd_txn *txn;
    int ok;
} flush_ctx;

/* Write an item's record as it is in memory now (absent: deleted). */
static int
flush_item(const char *id, void *val, void *data)
{
    flush_ctx *c = data;
    item *it = xd_hashtab_get(c->l->items, id);

    if (c->txn)
        c->ok &= (it ? db_put(c->l, c->txn, id, it->report) : db_del(c->l, c->txn, id)) == 0;
    xd_hashtab_del(c->l->dirty, id);
    free(val);
    return 0;
}

/* Write every marked change in one transaction.  A failed write is logged;
 * the lists in memory (what is enforced) are right all the same. */
static void
cache_flush(rtbl *r)
{
    flush_ctx c = {.ok = 1};
    size_t n = 0;

    if (r->flush) {
        xd_timer_stop(r->flush);
        r->flush = NULL;
    }
    for (int i = 0; i < r->nlists; i++)
        n += r->lists[i].dirty ? xd_hashtab_count(r->lists[i].dirty) : 0;
    if (!r->db || !n)
        return;
    if (xd_txn_begin(&c.txn) != 0)
        c.txn = NULL;
    for (int i = 0; i < r->nlists; i++) {
        c.l = &r->lists[i];
        xd_hashtab_foreach(c.l->dirty, flush_item, &c);
    }
    if (c.txn && c.ok && xd_txn_commit(c.txn) == 0) {
        xd_debug("rtbl: cache: %zu change(s) written", n);
        return;
    }
    if (c.txn && !c.ok)
        xd_txn_abort(c.txn);
    xd_warn("rtbl: the cache could not be updated (%zu changes; the lists in memory are current)",
            n);
}

static void
flush_cb(void *data)
{
    rtbl *r = data;
    r->flush = NULL; /* a spent one-shot timer */
    cache_flush(r);
}

/* Note that id's record must be rewritten.  The writes are batched: a
 * durable commit per notification would block the event loop on fsync as
 * often as the service publishes.  A crash loses at most the last
 * FLUSH_DELAY of changes, which is fine for a cache: the resync at start
 * fetches the whole list and repairs it. */
static void
cache_mark(rlist *l, const char *id)
{
    rtbl *r = l->r;
    char *s;

    if (!r->db || xd_hashtab_get(l->dirty, id))
        return;
    if (!(s = strdup(id)) || xd_hashtab_put(l->dirty, s, s) != 0) {
        free(s);
        xd_warn("rtbl: %s: out of memory: the cache may keep a stale record until a restart",
                l->name);
        return;
    }
    if (xd_hashtab_count(l->dirty) >= MAX_DIRTY)
        cache_flush(r);
    else if (!r->flush)
        r->flush = xd_timer_start(r->m, FLUSH_DELAY, 0, flush_cb, r);
}

typedef struct load_ctx {
    rtbl *r;
    size_t loaded;
    unsigned long refused;
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
    nkey nk;
    int kept = 0;

    for (int i = 0; i < c->r->nlists; i++) {
        rlist *l = &c->r->lists[i];
        size_t n = klen - l->dbplen;
        if (klen <= l->dbplen || memcmp(k, l->dbprefix, l->dbplen) != 0)
            continue;
        if (n > MAX_ID_LEN || memchr(k + l->dbplen, '\0', n))
            break;
        memcpy(id, k + l->dbplen, n);
        id[n] = '\0';
        /* cached by an older version, perhaps, with other rules: checked again */
        if (item_check(l, id, &nk, &c->refused) != 0)
            break;
        if (vlen && (report = malloc(vlen + 1))) {
            memcpy(report, val, vlen);
            report[vlen] = '\0';
            sanitize(report);
        }
        kept = mem_put(l, id, report) >= 0;
        c->loaded += kept;
        free(report);
        break;
    }
    if (kept)
        return 0;
    /* a list no longer configured, or a bad record: remove it afterwards */
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
    if (c.nstale && xd_txn_begin(&txn) == 0) {
        int ok = 1;
        for (size_t i = 0; i < c.nstale; i++)
            ok &= xd_db_del(r->db, txn, c.stale[i], c.stale_len[i]) >= 0;
        if (!ok || xd_txn_commit(txn) != 0) {
            if (!ok)
                xd_txn_abort(txn);
            xd_warn("rtbl: could not remove cached items of lists no longer configured");
        } else
            xd_info("rtbl: removed %zu cached items of lists no longer configured or refused",
                    c.nstale);
    }
    for (size_t i = 0; i < c.nstale; i++)
        free(c.stale[i]);
    free(c.stale);
    free(c.stale_len);
    xd_info("rtbl: %zu items loaded from the cache (%zu domains, %zu hashes, %zu address ranges)",
            c.loaded, xd_hashtab_count(r->domains), xd_hashtab_count(r->hashes), r->nips);
}

/* ---- changes from the service --------------------------------------------------- */

static void
apply_publish(rlist *l, xmpp_stanza_t *items)
{
    rtbl *r = l->r;
    unsigned long listed = 0, unlisted = 0, refused = 0;
    const char *first = NULL;
    char shown[MAX_LOG_ID + 1];

    for (xmpp_stanza_t *c = xmpp_stanza_get_children(items); c; c = xmpp_stanza_get_next(c)) {
        const char *id;
        nkey k;
        if (name_is(c, "item") && (id = xmpp_stanza_get_id(c))) {
            char *report;
            if (item_check(l, id, &k, &refused) != 0)
                continue;
            report = report_summary(c);
            if (l->state == S_FETCHING)
                pending_put(l, id, report);
            if (mem_put(l, id, report) > 0) {
                cache_mark(l, id);
                xd_debug("rtbl: %s: listed %s%s%s", l->name, id, report ? " -- " : "",
                         report ? report : "");
                first = first ? first : id;
                listed++;
            }
            free(report);
        } else if (name_is(c, "retract") && (id = xmpp_stanza_get_id(c))) {
            if (l->state == S_FETCHING)
                pending_del(l, id);
            if (mem_del(l, id)) {
                cache_mark(l, id);
                xd_debug("rtbl: %s: unlisted %s", l->name, id);
                first = first ? first : id;
                unlisted++;
            }
        }
    }
    xd_count(r->m, "items_changed", listed + unlisted);
    /* one line per notification, whatever the service packs into it */
    if (listed || unlisted || refused)
        xd_info("rtbl: %s: update: %lu listed, %lu unlisted, %lu refused%s%s", l->name, listed,
                unlisted, refused, first ? "; first: " : "",
                first ? clip(shown, sizeof(shown), first) : "");
}

static int
purge_item(const char *id, void *val, void *data)
{
    (void)val;
    cache_mark(data, id);
    mem_del(data, id);
    return 0;
}

static void
apply_purge(rlist *l, const char *what)
{
    size_t n = xd_hashtab_count(l->items);

    xd_hashtab_foreach(l->items, purge_item, l);
    if (l->state == S_FETCHING)
        tab_clear(l->pending);
    xd_info("rtbl: %s: %s; %zu items unlisted", l->name, what, n);
}

typedef struct sync_ctx {
    rlist *l;
    size_t added, removed;
} sync_ctx;

static int
sync_drop(const char *id, void *val, void *data)
{
    sync_ctx *c = data;
    (void)val;
    if (!xd_hashtab_get(c->l->pending, id)) {
        cache_mark(c->l, id);
        mem_del(c->l, id);
        c->removed++;
    }
    return 0;
}

static int
sync_add(const char *id, void *val, void *data)
{
    sync_ctx *c = data;
    if (mem_put(c->l, id, ((item *)val)->report) > 0) {
        cache_mark(c->l, id);
        c->added++;
    }
    return 0;
}

/* Full resync: the list becomes exactly what the service returned. */
static void
reconcile(rlist *l)
{
    sync_ctx c = {.l = l};
    char refused[48] = "";

    xd_hashtab_foreach(l->items, sync_drop, &c);
    xd_hashtab_foreach(l->pending, sync_add, &c);
    tab_clear(l->pending);
    if (l->refused)
        snprintf(refused, sizeof(refused), "; %lu refused", l->refused);
    xd_info("rtbl: %s: synchronized: %zu items (%zu added or changed, %zu removed)%s", l->name,
            xd_hashtab_count(l->items), c.added, c.removed, refused);
    xd_count(l->r->m, "resyncs", 1);
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
    tab_clear(l->pending);
    free(l->after);
    l->after = NULL;
    xd_warn("rtbl: %s: %s failed (%s%s%s); keeping the %zu items we have, retrying in %.0f s",
            l->name, step, error_condition(reply), text ? ": " : "", text ? text : "",
            xd_hashtab_count(l->items), delay);
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
        nkey k;
        if (id) {
            got++; /* a page of junk is still a page */
            if (item_check(l, id, &k, &l->refused) == 0) {
                char *report = report_summary(c);
                pending_put(l, id, report);
                free(report);
            }
        }
    }
    /* XEP-0060 6.5.4 / XEP-0059: a service may return a page only. */
    set = child_ns(pubsub, "set", NS_RSM);
    if (set) {
        last = text_of(xmpp_stanza_get_child_by_name(set, "last"));
        count = text_of(xmpp_stanza_get_child_by_name(set, "count"));
    }
    if (set && last && *last && got > 0 && (!l->after || strcmp(last, l->after) != 0) &&
        (!count || strtoul(count, NULL, 10) > xd_hashtab_count(l->pending))) {
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
    l->refused = 0;
    tab_clear(l->pending);
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
    tab_clear(l->pending);
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

/* Which list names this sender, and how (for the log); NULL if none. */
static const rlist *
lookup_jid(rtbl *r, const xd_jid *from, const char **how)
{
    idx *x;

    if (xd_hashtab_count(r->domains)) {
        /* the domain, or a parent: a listed spam domain's subdomains are its own */
        for (const char *d = from->domain; d; d = strchr(d, '.') ? strchr(d, '.') + 1 : NULL)
            if (*d && (x = xd_hashtab_get(r->domains, d))) {
                *how = d == from->domain ? "domain" : "parent domain";
                return x->src;
            }
    }
    if (xd_hashtab_count(r->hashes)) {
        char hex[65], bare[XD_JID_STR_MAX];
        if (from->local[0] && xd_jid_format(from, 0, bare, sizeof(bare)) > 0) {
            sha256_hex(bare, hex);
            if ((x = xd_hashtab_get(r->hashes, hex))) {
                *how = "JID hash";
                return x->src;
            }
        }
        sha256_hex(from->domain, hex);
        if ((x = xd_hashtab_get(r->hashes, hex))) {
            *how = "domain hash";
            return x->src;
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
    item *it = NULL;
    if (l->kind == K_DOMAINS) {
        for (const char *d = from->domain; d && !it; d = strchr(d, '.') ? strchr(d, '.') + 1 : NULL)
            it = xd_hashtab_get(l->items, d);
    } else if (l->kind == K_SHA256) {
        char bare[XD_JID_STR_MAX], hex[65];
        if (!strcmp(how, "JID hash"))
            xd_jid_format(from, 0, bare, sizeof(bare));
        else
            snprintf(bare, sizeof(bare), "%s", from->domain);
        sha256_hex(bare, hex);
        it = xd_hashtab_get(l->items, hex);
    }
    return it ? it->report : NULL;
}

/* XD_HOOK_ROUTE: a listed remote sender does not reach local accounts.  About 40
 * instructions for a local sender (nothing to look up). */
static int
route_hook(xd_event *ev, void *data)
{
    rtbl *r = data;
    const rlist *l;
    const char *how = NULL;

    if (!ev->from || !ev->to || !ev->to->local[0] ||
        (!xd_hashtab_count(r->domains) && !xd_hashtab_count(r->hashes)))
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
    l->items = xd_hashtab_new(0);
    l->pending = xd_hashtab_new(0);
    l->dirty = xd_hashtab_new(0);
    r->nlists++; /* from here on unload frees it */
    if (!l->service || !l->node || !l->dbprefix || !l->name || !l->items || !l->pending ||
        !l->dirty) {
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
    if (!(r->domains = xd_hashtab_new(0)) || !(r->hashes = xd_hashtab_new(0)))
        return -1;
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
    /* the store closes after the modules unload: write what is pending */
    cache_flush(r);
    while (r->tickets) /* the core forgets our pending IQs without calling back */
        ticket_take(r->tickets);
    for (int i = 0; i < r->nlists; i++) {
        rlist *l = &r->lists[i];
        xd_timer_stop(l->retry);
        tab_free(l->items);
        tab_free(l->pending);
        tab_free(l->dirty);
        free(l->after);
        free(l->service);
        free(l->node);
        free(l->name);
        free(l->dbprefix);
    }
    tab_free(r->domains);
    tab_free(r->hashes);
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
