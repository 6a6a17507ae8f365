/*
 * mod_roster: rosters, presence subscriptions and presence broadcast for
 * local accounts (RFC 6121).
 *
 *   2.1-2.5  roster get/set/remove (jabber:iq:roster), validation (2.3.3),
 *            roster pushes to interested resources (2.1.6)
 *   2.6      roster versioning (urn:xmpp:features:rosterver): a per-user
 *            counter, each item stamped with the version of its last change,
 *            removed items kept as tombstones so a client gets only the delta
 *   3        the subscription state machine (Appendix A): outbound requests
 *            from clients, inbound ones for local users (from local or remote
 *            senders alike), pre-approval (3.4, urn:xmpp:features:pre-approval)
 *   4        presence broadcast to subscribers, probes on initial presence,
 *            answers to probes, unavailable presence when a session ends and
 *            to the targets of directed presence (4.6)
 *
 * Storage (one transaction per change, committed before anything is sent):
 *   roster          "user\0contact" -> item record (see item_encode)
 *   roster_ver      "user"          -> "<current version> <oldest delta base>"
 *   roster_pending  "user\0contact" -> the stored inbound subscribe (XML)
 * A record that is not in the roster is either a pending-in request the
 * user has not answered (RFC 6121 3.1.3: it is no roster item yet) or the
 * tombstone of a removed item, kept with its version for 2.6 deltas.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xmppd/hashtab.h>
#include <xmppd/module.h>

#define NS_ROSTER "jabber:iq:roster"
#define NS_ROSTERVER "urn:xmpp:features:rosterver"
#define NS_PREAPPROVAL "urn:xmpp:features:pre-approval"

/* Item flags, stored: the subscription state of RFC 6121 Appendix A. */
enum {
    F_TO = 1,        /* the user receives the contact's presence */
    F_FROM = 2,      /* the contact receives the user's presence */
    F_ASK = 4,       /* pending out: the user asked, no answer yet */
    F_PENDIN = 8,    /* pending in: the contact asked, the user did not answer */
    F_PREAPP = 16,   /* pre-approved (3.4) */
    F_INROSTER = 32  /* a roster item the client sees */
};
#define F_KNOWN 63u
#define F_VISIBLE (F_TO | F_FROM | F_ASK | F_PREAPP | F_INROSTER)

/* Hard caps for what is read back from storage, whatever the config says. */
#define HARD_MAX_GROUPS 1024
#define HARD_MAX_TEXT 4096
/* A stored subscription request bigger than this is kept without its payload. */
#define PENDING_MAX_BYTES 16384
#define KEY_MAX (2 * XD_JID_STR_MAX)

typedef struct roster_mod {
    xd_module *m;
    xd_db *items, *vers, *pending;
    long max_items, max_groups, max_text, max_pending, max_tombstones, max_directed;
    unsigned long long push_seq; /* ids of roster pushes */
    /* xd_roster_relation() answers, asked on every message by the spam
     * layers and the archive: "owner\x01peer" -> rel_entry.  An entry of an
     * older generation is stale; any roster change starts a new one. */
    xd_hashtab *rel;
    unsigned long rel_gen;
    xd_timer *rel_timer;
} roster_mod;

/* Entries kept before the cache starts afresh. */
#define REL_CACHE_MAX 65536
/* Seconds an answer may be kept: bounds what a change made outside this
 * process (xmppctl deluser) can leave behind. */
#define REL_CACHE_TTL 60.0

typedef struct rel_entry {
    unsigned long gen;
    int rel;
    char key[];
} rel_entry;

/* Per-session state. */
typedef struct rsess {
    int interested; /* requested the roster: receives pushes (2.1.6) */
    int ndirected;
    char **directed; /* JIDs that got directed available presence (4.6) */
    int cap;
} rsess;

typedef struct ritem {
    unsigned long long ver; /* roster version of the last visible change, 0 never visible */
    unsigned flags;
    char *name;             /* NULL when absent */
    int ngroups;
    char **groups;
} ritem;

/* ---- small helpers -------------------------------------------------------- */

static int
bare_str(const xd_jid *j, char *buf, size_t len)
{
    return xd_jid_format(j, 0, buf, len) < 0 ? -1 : 0;
}

static int
parse_ull(const char *s, unsigned long long *out)
{
    char *end;
    if (!s || *s < '0' || *s > '9' || strlen(s) > 20)
        return -1;
    *out = strtoull(s, &end, 10);
    return *end ? -1 : 0;
}

static int
type_is(xmpp_stanza_t *st, const char *t)
{
    const char *v = xmpp_stanza_get_type(st);
    return v && !strcmp(v, t);
}

static void
ritem_clear(ritem *it)
{
    free(it->name);
    for (int i = 0; i < it->ngroups; i++)
        free(it->groups[i]);
    free(it->groups);
    memset(it, 0, sizeof(*it));
}

static int
ritem_dup(ritem *dst, const ritem *src)
{
    memset(dst, 0, sizeof(*dst));
    dst->ver = src->ver;
    dst->flags = src->flags;
    if (src->name && !(dst->name = strdup(src->name)))
        return -1;
    if (src->ngroups) {
        if (!(dst->groups = calloc((size_t)src->ngroups, sizeof(char *))))
            goto fail;
        for (; dst->ngroups < src->ngroups; dst->ngroups++)
            if (!(dst->groups[dst->ngroups] = strdup(src->groups[dst->ngroups])))
                goto fail;
    }
    return 0;
fail:
    ritem_clear(dst);
    return -1;
}

/* Same roster item as the client sees it (2.6: what deserves a new version). */
static int
visible_eq(const ritem *a, const ritem *b)
{
    int ia = (a->flags & F_INROSTER) != 0, ib = (b->flags & F_INROSTER) != 0;
    if (!ia && !ib)
        return 1;
    if (ia != ib || (a->flags & F_VISIBLE) != (b->flags & F_VISIBLE))
        return 0;
    if ((a->name == NULL) != (b->name == NULL) || (a->name && strcmp(a->name, b->name)))
        return 0;
    if (a->ngroups != b->ngroups)
        return 0;
    for (int i = 0; i < a->ngroups; i++)
        if (strcmp(a->groups[i], b->groups[i]))
            return 0;
    return 1;
}

/* ---- records ----------------------------------------------------------------
 * An item record is NUL-separated text: "R1", the version, the flags, the
 * name ("-" absent, or "n" + name), then one field per group.  Names and
 * groups are XML character data, which cannot contain NUL. */

static char *
item_encode(const ritem *it, size_t *len)
{
    size_t n = 3 + 21 + 11 + 2 + (it->name ? strlen(it->name) : 0) + 1, off;
    char *buf;
    for (int i = 0; i < it->ngroups; i++)
        n += strlen(it->groups[i]) + 1;
    if (!(buf = malloc(n)))
        return NULL;
    off = (size_t)snprintf(buf, n, "R1%c%llu%c%u%c", 0, it->ver, 0, it->flags, 0);
    if (it->name)
        off += (size_t)snprintf(buf + off, n - off, "n%s", it->name) + 1;
    else
        off += (size_t)snprintf(buf + off, n - off, "-") + 1;
    for (int i = 0; i < it->ngroups; i++)
        off += (size_t)snprintf(buf + off, n - off, "%s", it->groups[i]) + 1;
    *len = off;
    return buf;
}

/* Parse defensively: anything unexpected makes the record unreadable (-1). */
static int
item_decode(const void *val, size_t vlen, ritem *it)
{
    const char *p = val, *end = p + vlen;
    unsigned long long flags;
    int field = 0;

    memset(it, 0, sizeof(*it));
    if (vlen == 0 || p[vlen - 1] != '\0')
        return -1;
    while (p < end) {
        size_t l = strlen(p); /* bounded: the last byte is NUL */
        if (l > HARD_MAX_TEXT + 1)
            goto bad;
        if (field == 0) {
            if (strcmp(p, "R1"))
                goto bad;
        } else if (field == 1) {
            if (parse_ull(p, &it->ver))
                goto bad;
        } else if (field == 2) {
            if (parse_ull(p, &flags) || flags > F_KNOWN)
                goto bad;
            it->flags = (unsigned)flags;
        } else if (field == 3) {
            if (p[0] == 'n') {
                if (!(it->name = strdup(p + 1)))
                    goto bad;
            } else if (strcmp(p, "-"))
                goto bad;
        } else {
            char **g;
            if (l == 0 || it->ngroups >= HARD_MAX_GROUPS)
                goto bad;
            if (!(g = realloc(it->groups, sizeof(char *) * (size_t)(it->ngroups + 1))))
                goto bad;
            it->groups = g;
            if (!(it->groups[it->ngroups] = strdup(p)))
                goto bad;
            it->ngroups++;
        }
        field++;
        p += l + 1;
    }
    if (field < 4)
        goto bad;
    return 0;
bad:
    ritem_clear(it);
    return -1;
}

static size_t
item_key(char *key, const char *owner, const char *peer)
{
    size_t a = strlen(owner), b = strlen(peer);
    memcpy(key, owner, a);
    key[a] = '\0';
    memcpy(key + a + 1, peer, b);
    return a + 1 + b;
}

/* Stored flags as the public XD_ROSTER_* relation. */
static int
relation_of(unsigned f)
{
    return ((f & F_INROSTER) ? XD_ROSTER_ITEM : 0) | ((f & F_FROM) ? XD_ROSTER_FROM : 0) |
           ((f & F_TO) ? XD_ROSTER_TO : 0) | ((f & F_ASK) ? XD_ROSTER_PENDING_OUT : 0) |
           ((f & F_PENDIN) ? XD_ROSTER_PENDING_IN : 0);
}

/* 0 found, XD_NOTFOUND (it is empty), -1 error or unreadable. */
static int
item_load(roster_mod *rm, xd_txn *txn, const char *owner, const char *peer, ritem *it)
{
    char key[KEY_MAX];
    size_t klen = item_key(key, owner, peer), vlen;
    void *val;
    int r = xd_db_get(rm->items, txn, key, klen, &val, &vlen);

    memset(it, 0, sizeof(*it));
    if (r != 0)
        return r;
    r = item_decode(val, vlen, it);
    free(val);
    if (r)
        xd_error("roster: unreadable record %s -> %s", owner, peer);
    return r;
}

static int
ver_load(roster_mod *rm, xd_txn *txn, const char *owner, unsigned long long *cur,
         unsigned long long *floor)
{
    void *val;
    size_t vlen;
    int r = xd_db_get(rm->vers, txn, owner, strlen(owner), &val, &vlen);
    *cur = *floor = 0;
    if (r == XD_NOTFOUND)
        return 0;
    if (r)
        return -1;
    if (sscanf(val, "%llu %llu", cur, floor) != 2 || *floor > *cur) {
        xd_error("roster: unreadable version record for %s", owner);
        *cur = *floor = 0;
        r = -1;
    }
    free(val);
    return r;
}

static int
ver_store(roster_mod *rm, xd_txn *txn, const char *owner, unsigned long long cur,
          unsigned long long floor)
{
    char buf[64];
    int n = snprintf(buf, sizeof(buf), "%llu %llu", cur, floor);
    return xd_db_put(rm->vers, txn, owner, strlen(owner), buf, (size_t)n);
}

/* One user's records, decoded (unreadable ones are skipped). */
typedef struct rentry {
    char *peer;
    ritem it;
} rentry;

typedef struct rlist {
    rentry *v;
    int n, cap;
    int failed;
} rlist;

static int
collect_cb(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    rlist *l = data;
    const char *k = key;
    const char *sep = memchr(k, '\0', klen);
    size_t plen;
    rentry e;

    if (!sep)
        return 0;
    plen = klen - (size_t)(sep + 1 - k);
    if (plen == 0 || plen >= XD_JID_STR_MAX || memchr(sep + 1, '\0', plen))
        return 0;
    if (item_decode(val, vlen, &e.it) != 0) {
        xd_warn("roster: skipping an unreadable record");
        return 0;
    }
    if (!(e.peer = strndup(sep + 1, plen))) {
        ritem_clear(&e.it);
        l->failed = 1;
        return 1;
    }
    if (l->n == l->cap) {
        int nc = l->cap ? 2 * l->cap : 16;
        rentry *nv = realloc(l->v, sizeof(rentry) * (size_t)nc);
        if (!nv) {
            free(e.peer);
            ritem_clear(&e.it);
            l->failed = 1;
            return 1;
        }
        l->v = nv;
        l->cap = nc;
    }
    l->v[l->n++] = e;
    return 0;
}

static void
rlist_free(rlist *l)
{
    for (int i = 0; i < l->n; i++) {
        free(l->v[i].peer);
        ritem_clear(&l->v[i].it);
    }
    free(l->v);
    memset(l, 0, sizeof(*l));
}

static int
rlist_load(roster_mod *rm, xd_txn *txn, const char *owner, rlist *l)
{
    memset(l, 0, sizeof(*l));
    if (xd_db_foreach(rm->items, txn, owner, strlen(owner) + 1, collect_cb, l) < 0 || l->failed) {
        rlist_free(l);
        return -1;
    }
    return 0;
}

/* ---- changes: one transaction each ------------------------------------------ */

typedef struct change {
    roster_mod *rm;
    xd_txn *txn;
    char owner[XD_JID_STR_MAX], peer[XD_JID_STR_MAX];
    ritem old, it;    /* before, and after (what the caller edits) */
    char *pending;    /* inbound subscribe to store with F_PENDIN (XML) */
    unsigned long long ver;
    int visible;      /* the client-visible item changed: push it */
    int by_user;      /* the user made it (not the contact): XD_ROSTER_BY_USER */
} change;

enum { CH_OK = 0, CH_LIMIT = 1, CH_ERROR = -1 };

/* Every cached relation is stale from here on (O(1)). */
static void
rel_forget(roster_mod *rm)
{
    rm->rel_gen++;
}

static int
rel_free_entry(const char *key, void *val, void *data)
{
    xd_hashtab_del(data, key);
    free(val);
    return 0;
}

static void
rel_flush(roster_mod *rm)
{
    if (rm->rel)
        xd_hashtab_foreach(rm->rel, rel_free_entry, rm->rel);
}

static void
rel_timer_cb(void *data)
{
    roster_mod *rm = data;
    rel_forget(rm);
    rel_flush(rm);
}

static int
ch_begin(roster_mod *rm, change *c, const char *owner, const char *peer)
{
    int r;
    rel_forget(rm); /* before and after the change: nothing read in between stays */
    memset(c, 0, sizeof(*c));
    c->rm = rm;
    snprintf(c->owner, sizeof(c->owner), "%s", owner);
    snprintf(c->peer, sizeof(c->peer), "%s", peer);
    if (xd_txn_begin(&c->txn) != 0)
        return -1;
    r = item_load(rm, c->txn, owner, peer, &c->old);
    if (r < 0 || ritem_dup(&c->it, &c->old) != 0) {
        ritem_clear(&c->old);
        xd_txn_abort(c->txn);
        c->txn = NULL;
        return -1;
    }
    return 0;
}

static void
ch_free(change *c)
{
    if (c->txn)
        xd_txn_abort(c->txn);
    c->txn = NULL;
    ritem_clear(&c->old);
    ritem_clear(&c->it);
    free(c->pending);
    c->pending = NULL;
}

/* Delete the oldest tombstones beyond the limit; the versions they covered
 * can no longer be served as a delta, so the floor moves up (2.6.3). */
static int
prune_tombstones(change *c, unsigned long long *floor)
{
    for (;;) {
        rlist l;
        int n = 0, oldest = -1;
        char key[KEY_MAX];
        if (rlist_load(c->rm, c->txn, c->owner, &l) != 0)
            return -1;
        for (int i = 0; i < l.n; i++) {
            if (l.v[i].it.flags != 0)
                continue;
            n++;
            if (oldest < 0 || l.v[i].it.ver < l.v[oldest].it.ver)
                oldest = i;
        }
        if (n <= c->rm->max_tombstones || oldest < 0) {
            rlist_free(&l);
            return 0;
        }
        if (l.v[oldest].it.ver > *floor)
            *floor = l.v[oldest].it.ver;
        if (xd_db_del(c->rm->items, c->txn, key, item_key(key, c->owner, l.v[oldest].peer)) < 0) {
            rlist_free(&l);
            return -1;
        }
        rlist_free(&l);
    }
}

/* XD_HOOK_ROSTER_CHANGED, after the commit: spam control and PEP follow
 * who the user knows. */
static void
tell_modules(const change *c)
{
    xd_jid user, contact;
    if (xd_jid_parse(&user, c->owner) != 0 || xd_jid_parse(&contact, c->peer) != 0)
        return;
    xd_event ev = {.from = &user,
                   .to = &contact,
                   .flags = (unsigned)relation_of(c->it.flags) | (c->by_user ? XD_ROSTER_BY_USER : 0)};
    xd_hooks_run(XD_HOOK_ROSTER_CHANGED, &ev);
}

/* Write the change, bump the version if the client sees a difference, and
 * commit.  The transaction is over whatever the result. */
static int
ch_commit(change *c)
{
    roster_mod *rm = c->rm;
    unsigned long long cur, floor;
    char key[KEY_MAX];
    size_t klen = item_key(key, c->owner, c->peer);
    int was_in = (c->old.flags & F_INROSTER) != 0, now_in = (c->it.flags & F_INROSTER) != 0;
    int existed = c->old.flags != 0 || c->old.ver != 0;
    int r = CH_ERROR;

    if (!now_in) {
        /* not a roster item: nothing of it to keep but a pending request */
        c->it.flags &= F_PENDIN;
        free(c->it.name);
        c->it.name = NULL;
        for (int i = 0; i < c->it.ngroups; i++)
            free(c->it.groups[i]);
        free(c->it.groups);
        c->it.groups = NULL;
        c->it.ngroups = 0;
    }
    c->visible = !visible_eq(&c->old, &c->it);
    if (ver_load(rm, c->txn, c->owner, &cur, &floor) != 0)
        goto out;
    if ((now_in && !was_in) || ((c->it.flags & F_PENDIN) && !existed)) {
        /* bound what one account (or its contacts) can make us store */
        rlist l;
        int items = 0, hidden = 0;
        if (rlist_load(rm, c->txn, c->owner, &l) != 0)
            goto out;
        for (int i = 0; i < l.n; i++) {
            if (l.v[i].it.flags & F_INROSTER)
                items++;
            else if (l.v[i].it.flags & F_PENDIN)
                hidden++;
        }
        rlist_free(&l);
        if ((now_in && !was_in && items >= rm->max_items) ||
            (!now_in && !existed && hidden >= rm->max_pending)) {
            r = CH_LIMIT;
            goto out;
        }
    }
    if (c->visible)
        c->it.ver = ++cur;
    if (c->it.flags == 0 && c->it.ver == 0) {
        /* never seen by the client: no tombstone needed */
        if (existed && xd_db_del(rm->items, c->txn, key, klen) < 0)
            goto out;
    } else if (c->it.flags != 0 || c->it.ver != 0) {
        size_t vlen;
        char *val = item_encode(&c->it, &vlen);
        int pr = val ? xd_db_put(rm->items, c->txn, key, klen, val, vlen) : -1;
        free(val);
        if (pr != 0)
            goto out;
    }
    if (c->it.flags & F_PENDIN) {
        if (c->pending &&
            xd_db_put(rm->pending, c->txn, key, klen, c->pending, strlen(c->pending)) != 0)
            goto out;
    } else if ((c->old.flags & F_PENDIN) && xd_db_del(rm->pending, c->txn, key, klen) < 0) {
        goto out;
    }
    if (c->it.flags == 0 && c->it.ver != 0 && c->old.flags != 0 &&
        prune_tombstones(c, &floor) != 0)
        goto out;
    if (c->visible && ver_store(rm, c->txn, c->owner, cur, floor) != 0)
        goto out;
    r = xd_txn_commit(c->txn) == 0 ? CH_OK : CH_ERROR;
    c->txn = NULL; /* a failed commit has ended the transaction too */
    rel_forget(rm);
    c->ver = cur;
    if (r != CH_OK)
        xd_error("roster: commit failed for %s -> %s", c->owner, c->peer);
    else if (relation_of(c->old.flags) != relation_of(c->it.flags))
        tell_modules(c);
    return r;
out:
    xd_txn_abort(c->txn);
    c->txn = NULL;
    if (r == CH_ERROR)
        xd_error("roster: storage error for %s -> %s", c->owner, c->peer);
    return r;
}

/* ---- per-session state ------------------------------------------------------ */

static void
rsess_free(void *p)
{
    rsess *rs = p;
    for (int i = 0; i < rs->ndirected; i++)
        free(rs->directed[i]);
    free(rs->directed);
    free(rs);
}

static rsess *
rsess_get(roster_mod *rm, xd_session *s, int create)
{
    rsess *rs = xd_session_get_data(s, rm->m);
    if (!rs && create && (rs = calloc(1, sizeof(*rs)))) {
        rs->cap = (int)rm->max_directed;
        if (rs->cap && !(rs->directed = calloc((size_t)rs->cap, sizeof(char *)))) {
            free(rs);
            return NULL;
        }
        xd_session_set_data(s, rm->m, rs, rsess_free);
    }
    return rs;
}

/* ---- roster pushes (2.1.6) --------------------------------------------------- */

static xmpp_stanza_t *
item_element(const char *peer, const ritem *it)
{
    xmpp_stanza_t *el = xd_stanza_new("item", NULL);
    static const char *const subs[] = {"none", "to", "from", "both"};
    xmpp_stanza_set_attribute(el, "jid", peer);
    if (!(it->flags & F_INROSTER)) {
        xmpp_stanza_set_attribute(el, "subscription", "remove");
        return el;
    }
    xmpp_stanza_set_attribute(el, "subscription", subs[it->flags & (F_TO | F_FROM)]);
    if (it->name)
        xmpp_stanza_set_attribute(el, "name", it->name);
    if ((it->flags & F_ASK) && !(it->flags & F_TO))
        xmpp_stanza_set_attribute(el, "ask", "subscribe");
    if (it->flags & F_PREAPP)
        xmpp_stanza_set_attribute(el, "approved", "true");
    for (int i = 0; i < it->ngroups; i++)
        xd_stanza_add_text_child(el, "group", it->groups[i]);
    return el;
}

typedef struct push_ctx {
    roster_mod *rm;
    xmpp_stanza_t *iq;
    xd_session *only;
} push_ctx;

static int
push_one(xd_session *s, void *data)
{
    push_ctx *p = data;
    rsess *rs = xd_session_get_data(s, p->rm->m);
    char full[XD_JID_STR_MAX];
    xmpp_stanza_t *c;

    if (p->only ? s != p->only : !(rs && rs->interested))
        return 0;
    if (xd_jid_format(xd_session_jid(s), 1, full, sizeof(full)) < 0 ||
        !(c = xmpp_stanza_copy(p->iq)))
        return 0;
    xmpp_stanza_set_to(c, full);
    xd_session_send(s, c);
    return 0;
}

static void
push_item(roster_mod *rm, const char *owner, const char *peer, const ritem *it,
          unsigned long long ver, xd_session *only)
{
    xmpp_stanza_t *iq = xmpp_iq_new(xd_ctx(), "set", NULL);
    xmpp_stanza_t *q = xd_stanza_new("query", NS_ROSTER);
    char id[40], vs[24];
    xd_jid oj;
    push_ctx p = {rm, iq, only};

    if (xd_jid_parse(&oj, owner) != 0) {
        xmpp_stanza_release(iq);
        xmpp_stanza_release(q);
        return;
    }
    snprintf(id, sizeof(id), "roster-push-%llu", ++rm->push_seq);
    snprintf(vs, sizeof(vs), "%llu", ver);
    xmpp_stanza_set_id(iq, id);
    xmpp_stanza_set_attribute(q, "ver", vs);
    xmpp_stanza_add_child_ex(q, item_element(peer, it), 0);
    xmpp_stanza_add_child_ex(iq, q, 0);
    xd_user_sessions(&oj, push_one, &p);
    xmpp_stanza_release(iq);
}

static void
ch_push(change *c)
{
    if (c->visible)
        push_item(c->rm, c->owner, c->peer, &c->it, c->it.ver ? c->it.ver : c->ver, NULL);
}

/* ---- presence helpers ------------------------------------------------------------ */

static void
route_presence(const char *from, const char *to, const char *type)
{
    xmpp_stanza_t *p = xmpp_presence_new(xd_ctx());
    if (type)
        xmpp_stanza_set_type(p, type);
    xmpp_stanza_set_from(p, from);
    xmpp_stanza_set_to(p, to);
    xd_route(p);
}

typedef struct pres_batch {
    xmpp_stanza_t **v;
    int n, cap;
    int unavailable; /* build <presence type='unavailable'/> instead of copying */
} pres_batch;

static int
collect_presence(xd_session *s, void *data)
{
    pres_batch *b = data;
    char full[XD_JID_STR_MAX];
    xmpp_stanza_t *p = NULL;

    if (!xd_session_is_available(s) || b->n >= b->cap)
        return 0;
    if (b->unavailable) {
        if (xd_jid_format(xd_session_jid(s), 1, full, sizeof(full)) < 0)
            return 0;
        p = xmpp_presence_new(xd_ctx());
        xmpp_stanza_set_type(p, "unavailable");
        xmpp_stanza_set_from(p, full);
    } else if (xd_session_presence(s)) {
        p = xmpp_stanza_copy(xd_session_presence(s));
    }
    if (p)
        b->v[b->n++] = p;
    return 0;
}

/* Send the current presence (or unavailable) of each available resource of
 * owner to `to`.  Returns how many were sent.  Stanzas are gathered first so
 * no routing happens while the session list is walked. */
static int
send_presence_of(const char *owner, const char *to, int unavailable)
{
    xmpp_stanza_t *v[64];
    pres_batch b = {v, 0, 64, unavailable};
    xd_jid oj;

    if (xd_jid_parse(&oj, owner) != 0)
        return 0;
    xd_user_sessions(&oj, collect_presence, &b);
    for (int i = 0; i < b.n; i++) {
        xmpp_stanza_set_to(b.v[i], to);
        xd_route(b.v[i]);
    }
    return b.n;
}

typedef struct deliver_ctx {
    xmpp_stanza_t *st;
    xmpp_stanza_t *v[64];
    xd_session *s[64];
    int n;
} deliver_ctx;

static int
collect_available(xd_session *s, void *data)
{
    deliver_ctx *d = data;
    if (xd_session_is_available(s) && d->n < 64) {
        d->s[d->n] = s;
        d->v[d->n++] = xmpp_stanza_copy(d->st);
    }
    return 0;
}

/* Deliver to every available resource of owner (RFC 6121 3.1.3, 3.2.3...). */
static void
deliver_available(const char *owner, xmpp_stanza_t *st)
{
    deliver_ctx d = {.st = st};
    xd_jid oj;
    if (xd_jid_parse(&oj, owner) != 0)
        return;
    xd_user_sessions(&oj, collect_available, &d);
    for (int i = 0; i < d.n; i++)
        if (d.v[i])
            xd_deliver_to_session(d.s[i], d.v[i]);
}

/* A subscription stanza with bare 'from' and 'to', the payload kept. */
static xmpp_stanza_t *
sub_stanza(xmpp_stanza_t *orig, const char *from, const char *to)
{
    xmpp_stanza_t *c = xmpp_stanza_copy(orig);
    if (!c)
        return NULL;
    xmpp_stanza_set_from(c, from);
    xmpp_stanza_set_to(c, to);
    return c;
}

/* The XML of an inbound request to keep until the user answers it. */
static char *
pending_xml(xmpp_stanza_t *st, const char *from, const char *to)
{
    xmpp_stanza_t *c = sub_stanza(st, from, to);
    char *buf = NULL, *out = NULL;
    size_t len = 0;

    if (c && xmpp_stanza_to_text(c, &buf, &len) == XMPP_EOK && len <= PENDING_MAX_BYTES)
        out = strndup(buf, len);
    if (buf)
        xmpp_free(xd_ctx(), buf);
    if (c)
        xmpp_stanza_release(c);
    if (!out) {
        /* too big to keep whole: the request itself is what matters */
        xmpp_stanza_t *p = xmpp_presence_new(xd_ctx());
        xmpp_stanza_set_type(p, "subscribe");
        xmpp_stanza_set_from(p, from);
        xmpp_stanza_set_to(p, to);
        buf = NULL;
        if (xmpp_stanza_to_text(p, &buf, &len) == XMPP_EOK)
            out = strndup(buf, len);
        if (buf)
            xmpp_free(xd_ctx(), buf);
        xmpp_stanza_release(p);
    }
    return out;
}

static xmpp_stanza_t *
pending_load(roster_mod *rm, const char *owner, const char *peer)
{
    char key[KEY_MAX];
    size_t klen = item_key(key, owner, peer), vlen;
    void *val;
    xmpp_stanza_t *st = NULL;

    if (xd_db_get(rm->pending, NULL, key, klen, &val, &vlen) == 0) {
        if (strlen(val) == vlen)
            st = xd_stanza_parse(val, strlen(val));
        free(val);
    }
    if (st && (!xmpp_stanza_get_name(st) || strcmp(xmpp_stanza_get_name(st), "presence") ||
               !type_is(st, "subscribe"))) {
        xmpp_stanza_release(st);
        st = NULL;
    }
    if (!st) {
        /* lost or unreadable payload: the request still stands */
        st = xmpp_presence_new(xd_ctx());
        xmpp_stanza_set_type(st, "subscribe");
    }
    xmpp_stanza_set_from(st, peer);
    xmpp_stanza_set_to(st, owner);
    return st;
}

/* ---- roster IQs (2.1-2.5) --------------------------------------------------------- */

static void
reply_error(xmpp_stanza_t *iq, const char *type, const char *cond, const char *text)
{
    xmpp_stanza_t *e = xd_error_reply(iq, type, cond, text);
    if (e)
        xd_route(e);
}

/* The requesting session, when it is one of the account's own resources. */
static xd_session *
own_session(xd_event *ev)
{
    if (!ev->from || !ev->to || strcmp(ev->from->local, ev->to->local) ||
        strcmp(ev->from->domain, ev->to->domain) || !ev->session ||
        xd_session_type(ev->session) != XD_STREAM_C2S || !xd_session_is_bound(ev->session) ||
        !xd_jid_equal(xd_session_jid(ev->session), ev->from, 1))
        return NULL;
    return ev->session;
}

static int
ver_cmp(const void *a, const void *b)
{
    const rentry *x = a, *y = b;
    return x->it.ver < y->it.ver ? -1 : x->it.ver > y->it.ver;
}

static int
iq_roster_get(xd_event *ev, void *data)
{
    roster_mod *rm = data;
    xd_session *s = own_session(ev);
    xmpp_stanza_t *q = xmpp_stanza_get_child_by_name_and_ns(ev->stanza, "query", NS_ROSTER);
    const char *cver = q ? xmpp_stanza_get_attribute(q, "ver") : NULL;
    char owner[XD_JID_STR_MAX], vs[24];
    unsigned long long cur, floor, v;
    rsess *rs;
    rlist l;
    xmpp_stanza_t *r, *rq;

    if (!s) {
        /* RFC 6121 2.1.5: nobody else reads this roster */
        reply_error(ev->stanza, "auth", "forbidden", NULL);
        return XD_HANDLED;
    }
    if (!q || bare_str(ev->to, owner, sizeof(owner)) ||
        ver_load(rm, NULL, owner, &cur, &floor) != 0 || rlist_load(rm, NULL, owner, &l) != 0) {
        reply_error(ev->stanza, q ? "wait" : "modify", q ? "internal-server-error" : "bad-request",
                    NULL);
        return XD_HANDLED;
    }
    if ((rs = rsess_get(rm, s, 1)))
        rs->interested = 1;
    if (cver && parse_ull(cver, &v) == 0 && v >= floor && v <= cur && cur > 0) {
        /* 2.6.3: the client's cache is usable: empty result, then the delta */
        xd_route(xd_iq_result(ev->stanza));
        if (l.n)
            qsort(l.v, (size_t)l.n, sizeof(rentry), ver_cmp);
        for (int i = 0; i < l.n; i++)
            if (l.v[i].it.ver > v)
                push_item(rm, owner, l.v[i].peer, &l.v[i].it, l.v[i].it.ver, s);
        rlist_free(&l);
        return XD_HANDLED;
    }
    r = xd_iq_result(ev->stanza);
    rq = xd_stanza_new("query", NS_ROSTER);
    snprintf(vs, sizeof(vs), "%llu", cur);
    xmpp_stanza_set_attribute(rq, "ver", vs);
    for (int i = 0; i < l.n; i++)
        if (l.v[i].it.flags & F_INROSTER)
            xmpp_stanza_add_child_ex(rq, item_element(l.v[i].peer, &l.v[i].it), 0);
    xmpp_stanza_add_child_ex(r, rq, 0);
    rlist_free(&l);
    xd_route(r);
    return XD_HANDLED;
}

static void
route_sub(const char *from, const char *to, const char *type)
{
    route_presence(from, to, type);
}

/* 2.5: remove the item; cancel both subscription directions first. */
static void
roster_remove(roster_mod *rm, xd_event *ev, const char *owner, const char *peer)
{
    change c;
    unsigned old;
    int r;

    if (ch_begin(rm, &c, owner, peer) != 0) {
        reply_error(ev->stanza, "wait", "internal-server-error", NULL);
        return;
    }
    c.by_user = 1;
    if (!(c.old.flags & F_INROSTER)) {
        ch_free(&c);
        reply_error(ev->stanza, "cancel", "item-not-found", NULL);
        return;
    }
    old = c.old.flags;
    c.it.flags = 0;
    if ((r = ch_commit(&c)) != CH_OK) {
        ch_free(&c);
        reply_error(ev->stanza, "wait", "internal-server-error", NULL);
        return;
    }
    xd_route(xd_iq_result(ev->stanza));
    ch_push(&c);
    if (old & (F_TO | F_ASK))
        route_sub(owner, peer, "unsubscribe");
    if (old & (F_FROM | F_PENDIN)) {
        route_sub(owner, peer, "unsubscribed");
        if (old & F_FROM)
            send_presence_of(owner, peer, 1);
    }
    ch_free(&c);
}

/* XD_HOOK_ACCOUNT_REMOVED: the account's contacts learn that both directions
 * of every subscription are gone (RFC 6121 3.2, 3.3); the core then purges
 * the rows themselves. */
static int
roster_account_removed(xd_event *ev, void *data)
{
    roster_mod *rm = data;
    char owner[XD_JID_STR_MAX];
    rlist l;

    rel_forget(rm); /* its rows are purged after the hooks */
    if (!rm->items || xd_jid_format(ev->from, 0, owner, sizeof(owner)) < 0 ||
        rlist_load(rm, NULL, owner, &l) != 0)
        return XD_PASS;
    for (int i = 0; i < l.n; i++) {
        unsigned f = l.v[i].it.flags;
        if (f & (F_TO | F_ASK))
            route_sub(owner, l.v[i].peer, "unsubscribe");
        if (f & (F_FROM | F_PENDIN))
            route_sub(owner, l.v[i].peer, "unsubscribed");
    }
    rlist_free(&l);
    return XD_PASS;
}

static int
iq_roster_set(xd_event *ev, void *data)
{
    roster_mod *rm = data;
    xmpp_stanza_t *q = xmpp_stanza_get_child_by_name_and_ns(ev->stanza, "query", NS_ROSTER);
    xmpp_stanza_t *item = NULL, *ch;
    const char *jid, *name, *sub;
    char owner[XD_JID_STR_MAX], peer[XD_JID_STR_MAX];
    const char *err = NULL;
    ritem want;
    xd_jid pj;
    int nitems = 0;
    change c;

    memset(&want, 0, sizeof(want));
    if (!own_session(ev)) {
        reply_error(ev->stanza, "auth", "forbidden", NULL);
        return XD_HANDLED;
    }
    for (ch = q ? xmpp_stanza_get_children(q) : NULL; ch; ch = xmpp_stanza_get_next(ch))
        if (xmpp_stanza_is_tag(ch) && !strcmp(xmpp_stanza_get_name(ch), "item")) {
            item = ch;
            nitems++;
        }
    /* 2.3.3: exactly one item */
    if (nitems != 1 || bare_str(ev->to, owner, sizeof(owner))) {
        reply_error(ev->stanza, "modify", "bad-request", NULL);
        return XD_HANDLED;
    }
    jid = xmpp_stanza_get_attribute(item, "jid");
    if (!jid || xd_jid_parse(&pj, jid) != 0 || pj.resource[0] ||
        bare_str(&pj, peer, sizeof(peer))) {
        reply_error(ev->stanza, "modify", "jid-malformed", NULL);
        return XD_HANDLED;
    }
    sub = xmpp_stanza_get_attribute(item, "subscription");
    if (sub && !strcmp(sub, "remove")) {
        roster_remove(rm, ev, owner, peer);
        return XD_HANDLED;
    }
    /* Any other 'subscription' and any 'ask' are the server's business:
     * ignored (2.1.2.5, 2.3.1). */
    name = xmpp_stanza_get_attribute(item, "name");
    if (name && (long)strlen(name) > rm->max_text) {
        err = "not-acceptable";
        goto refuse;
    }
    if (name && *name && !(want.name = strdup(name)))
        goto oom;
    for (ch = xmpp_stanza_get_children(item); ch; ch = xmpp_stanza_get_next(ch)) {
        char *g;
        if (!xmpp_stanza_is_tag(ch) || strcmp(xmpp_stanza_get_name(ch), "group"))
            continue;
        if (want.ngroups >= rm->max_groups) {
            err = "not-acceptable";
            goto refuse;
        }
        g = xmpp_stanza_get_text(ch);
        if (!g || !*g || (long)strlen(g) > rm->max_text) {
            /* 2.3.3: empty or oversized group names */
            if (g)
                xmpp_free(xd_ctx(), g);
            err = "not-acceptable";
            goto refuse;
        }
        for (int i = 0; i < want.ngroups; i++)
            if (!strcmp(want.groups[i], g)) {
                xmpp_free(xd_ctx(), g);
                err = "bad-request"; /* 2.3.3: duplicate group */
                goto refuse;
            }
        {
            char **ng = realloc(want.groups, sizeof(char *) * (size_t)(want.ngroups + 1));
            char *gd = strdup(g);
            xmpp_free(xd_ctx(), g);
            if (ng)
                want.groups = ng;
            if (!ng || !gd) {
                free(gd);
                goto oom;
            }
            want.groups[want.ngroups++] = gd;
        }
    }
    if (ch_begin(rm, &c, owner, peer) != 0)
        goto oom;
    c.by_user = 1;
    c.it.flags |= F_INROSTER;
    free(c.it.name);
    for (int i = 0; i < c.it.ngroups; i++)
        free(c.it.groups[i]);
    free(c.it.groups);
    c.it.name = want.name;
    c.it.groups = want.groups;
    c.it.ngroups = want.ngroups;
    memset(&want, 0, sizeof(want));
    switch (ch_commit(&c)) {
    case CH_OK:
        xd_route(xd_iq_result(ev->stanza));
        ch_push(&c);
        break;
    case CH_LIMIT:
        reply_error(ev->stanza, "cancel", "not-allowed", "too many roster items");
        break;
    default:
        reply_error(ev->stanza, "wait", "internal-server-error", NULL);
    }
    ch_free(&c);
    return XD_HANDLED;
refuse:
    ritem_clear(&want);
    reply_error(ev->stanza, "modify", err, NULL);
    return XD_HANDLED;
oom:
    ritem_clear(&want);
    reply_error(ev->stanza, "wait", "internal-server-error", NULL);
    return XD_HANDLED;
}

/* ---- subscriptions from a local client (3.1.2, 3.2.2, 3.3.2, 3.4) --------------------- */

static void
outbound_subscription(roster_mod *rm, xd_event *ev, const char *type)
{
    char owner[XD_JID_STR_MAX], peer[XD_JID_STR_MAX];
    int route = 0, pres = 0, unavail = 0, r;
    change c;

    if (bare_str(ev->from, owner, sizeof(owner)) || bare_str(ev->to, peer, sizeof(peer)))
        return;
    if (!strcmp(owner, peer)) {
        /* one's own presence is known without asking: refused, nothing stored */
        xd_bounce(ev->stanza, "modify", "bad-request", "a subscription to oneself");
        return;
    }
    if (ch_begin(rm, &c, owner, peer) != 0) {
        xd_bounce(ev->stanza, "wait", "internal-server-error", NULL);
        return;
    }
    c.by_user = 1;
    if (!strcmp(type, "subscribe")) {
        if (!(c.it.flags & F_TO))
            c.it.flags |= F_ASK;
        c.it.flags |= F_INROSTER;
        route = 1;
    } else if (!strcmp(type, "subscribed")) {
        if (c.it.flags & F_PENDIN) {
            c.it.flags = (c.it.flags & ~(unsigned)(F_PENDIN | F_PREAPP)) | F_FROM | F_INROSTER;
            route = pres = 1;
        } else if (!(c.it.flags & F_FROM)) {
            /* 3.4: approve before being asked */
            c.it.flags |= F_PREAPP | F_INROSTER;
        }
    } else if (!strcmp(type, "unsubscribe")) {
        c.it.flags &= ~(unsigned)(F_TO | F_ASK);
        route = 1;
    } else { /* unsubscribed */
        unavail = (c.it.flags & F_FROM) != 0;
        c.it.flags &= ~(unsigned)(F_FROM | F_PENDIN | F_PREAPP);
        route = 1;
    }
    r = ch_commit(&c);
    if (r == CH_LIMIT)
        xd_bounce(ev->stanza, "cancel", "not-allowed", "too many roster items");
    else if (r != CH_OK)
        xd_bounce(ev->stanza, "wait", "internal-server-error", NULL);
    if (r != CH_OK) {
        ch_free(&c);
        return;
    }
    ch_push(&c);
    if (route) {
        xmpp_stanza_t *out = sub_stanza(ev->stanza, owner, peer);
        if (out)
            xd_route(out);
    }
    if (pres)
        send_presence_of(owner, peer, 0); /* 3.1.5: the new subscriber sees us now */
    if (unavail)
        send_presence_of(owner, peer, 1); /* 3.2.2 */
    ch_free(&c);
}

/* ---- directed presence (4.6) ------------------------------------------------------------ */

static void
track_directed(roster_mod *rm, xd_event *ev)
{
    char to[XD_JID_STR_MAX];
    rsess *rs;
    int i;

    if (xd_jid_format(ev->to, 1, to, sizeof(to)) < 0 || !(rs = rsess_get(rm, ev->session, 1)))
        return;
    for (i = 0; i < rs->ndirected && strcmp(rs->directed[i], to); i++)
        ;
    if (type_is(ev->stanza, "unavailable")) {
        if (i < rs->ndirected) {
            free(rs->directed[i]);
            rs->directed[i] = rs->directed[--rs->ndirected];
        }
    } else if (i == rs->ndirected) {
        if (rs->ndirected >= rs->cap)
            xd_debug("roster: directed presence set of a session is full; %s not tracked", to);
        else if ((rs->directed[rs->ndirected] = strdup(to)))
            rs->ndirected++;
    }
}

static int
is_sub_type(const char *t)
{
    return t && (!strcmp(t, "subscribe") || !strcmp(t, "subscribed") ||
                 !strcmp(t, "unsubscribe") || !strcmp(t, "unsubscribed"));
}

/* XD_HOOK_C2S_STANZA: presence and subscriptions from the user.  About 4,000
 * instructions for a chat message, which it only looks at. */
static int
roster_c2s_stanza(xd_event *ev, void *data)
{
    roster_mod *rm = data;
    const char *type;

    if (!ev->session || !ev->from || !ev->to ||
        strcmp(xmpp_stanza_get_name(ev->stanza), "presence"))
        return XD_PASS;
    type = xmpp_stanza_get_type(ev->stanza);
    if (is_sub_type(type)) {
        /* without 'to' it is addressed to the account itself (ev->to) */
        outbound_subscription(rm, ev, type);
        return XD_HANDLED;
    }
    if (xmpp_stanza_get_to(ev->stanza) && (!type || !strcmp(type, "unavailable")))
        track_directed(rm, ev);
    return XD_PASS;
}

/* ---- inbound subscriptions and probes for a local user (3.1.3-3.3.3, 4.3.2) -------------- */

static void
answer_probe(roster_mod *rm, xd_event *ev, const char *owner, const char *peer)
{
    ritem it;
    char to[XD_JID_STR_MAX];

    if (item_load(rm, NULL, owner, peer, &it) != 0)
        return;
    if ((it.flags & F_FROM) && xd_jid_format(ev->from, 1, to, sizeof(to)) >= 0 &&
        send_presence_of(owner, to, 0) == 0)
        route_presence(owner, to, "unavailable");
    ritem_clear(&it);
}

static int
roster_deliver_local(xd_event *ev, void *data)
{
    roster_mod *rm = data;
    const char *type = xmpp_stanza_get_type(ev->stanza);
    char owner[XD_JID_STR_MAX], peer[XD_JID_STR_MAX];
    int deliver = 0, reply = 0, pres = 0, unavail = 0, r;
    xd_jid ob;
    change c;

    if (strcmp(xmpp_stanza_get_name(ev->stanza), "presence") || !ev->from ||
        !(is_sub_type(type) || (type && !strcmp(type, "probe"))))
        return XD_PASS;
    ob = *ev->to;
    xd_jid_to_bare(&ob);
    if (bare_str(&ob, owner, sizeof(owner)) || bare_str(ev->from, peer, sizeof(peer)))
        return XD_DROP;
    if (xd_account_exists(&ob) != 1)
        return XD_PASS; /* the core drops presence for unknown users */
    if (!strcmp(type, "probe")) {
        /* 4.3.2: answered by the server, never delivered */
        answer_probe(rm, ev, owner, peer);
        return XD_HANDLED;
    }
    if (ch_begin(rm, &c, owner, peer) != 0)
        return XD_DROP;
    if (!strcmp(type, "subscribe")) {
        if (c.it.flags & F_FROM) {
            reply = 1; /* 3.1.3: already approved: answer for the user */
        } else if (c.it.flags & F_PREAPP) {
            c.it.flags = (c.it.flags & ~(unsigned)F_PREAPP) | F_FROM;
            reply = pres = 1;
        } else if (c.it.flags & F_PENDIN) {
            /* Appendix A.2.1: already pending: no change, not delivered again
             * (and no storage write a stranger could repeat at will) */
        } else {
            c.it.flags |= F_PENDIN;
            c.pending = pending_xml(ev->stanza, peer, owner);
            deliver = 1;
        }
    } else if (!strcmp(type, "subscribed")) {
        if ((c.it.flags & F_ASK) && !(c.it.flags & F_TO)) {
            c.it.flags = (c.it.flags & ~(unsigned)F_ASK) | F_TO;
            deliver = 1;
        }
    } else if (!strcmp(type, "unsubscribe")) {
        if (c.it.flags & (F_FROM | F_PENDIN)) {
            unavail = (c.it.flags & F_FROM) != 0;
            c.it.flags &= ~(unsigned)(F_FROM | F_PENDIN);
            deliver = 1;
        }
    } else { /* unsubscribed */
        if (c.it.flags & (F_TO | F_ASK)) {
            c.it.flags &= ~(unsigned)(F_TO | F_ASK);
            deliver = 1;
        }
    }
    if (!deliver && !reply) {
        /* 3.1.6, 3.2.3, 3.3.3: not a valid transition: ignored silently */
        xd_debug("roster: ignoring %s from %s to %s", type, peer, owner);
        ch_free(&c);
        return XD_DROP;
    }
    r = ch_commit(&c);
    if (r != CH_OK) {
        xd_info("roster: %s from %s to %s dropped (%s)", type, peer, owner,
                r == CH_LIMIT ? "too many pending requests" : "storage error");
        ch_free(&c);
        return XD_DROP;
    }
    ch_push(&c);
    if (deliver) {
        xmpp_stanza_t *st = sub_stanza(ev->stanza, peer, owner);
        if (st) {
            deliver_available(owner, st);
            xmpp_stanza_release(st);
        }
    }
    if (reply)
        route_sub(owner, peer, "subscribed");
    if (pres)
        send_presence_of(owner, peer, 0);
    if (unavail)
        send_presence_of(owner, peer, 1); /* 3.3.3 */
    ch_free(&c);
    return XD_HANDLED;
}

/* ---- presence broadcast (4.2, 4.4, 4.5) ----------------------------------------------------- */

/* Send presence p (from a full JID) to the subscribers of owner and to the
 * session's directed-presence targets (for unavailable presence). */
static void
broadcast(roster_mod *rm, xd_session *s, xmpp_stanza_t *p, int unavailable, int initial)
{
    char owner[XD_JID_STR_MAX];
    rsess *rs = rsess_get(rm, s, 0);
    rlist l;

    if (bare_str(xd_session_jid(s), owner, sizeof(owner)) || rlist_load(rm, NULL, owner, &l))
        return;
    for (int i = 0; i < l.n; i++) {
        unsigned f = l.v[i].it.flags;
        if (!strcmp(l.v[i].peer, owner))
            continue; /* mod_c2s shows the user's own resources */
        if (f & F_FROM) {
            xmpp_stanza_t *c = xmpp_stanza_copy(p);
            if (c) {
                xmpp_stanza_set_to(c, l.v[i].peer);
                xd_route(c);
            }
        }
        if (initial && (f & F_TO))
            route_presence(owner, l.v[i].peer, "probe"); /* 4.2.2 */
    }
    if (initial) {
        /* 3.1.3: requests that waited for the user come with each login */
        for (int i = 0; i < l.n; i++)
            if (l.v[i].it.flags & F_PENDIN)
                xd_deliver_to_session(s, pending_load(rm, owner, l.v[i].peer));
    }
    rlist_free(&l);
    if (unavailable && rs) {
        /* 4.6.3: the targets of directed presence learn we left; the set is done */
        for (int i = 0; i < rs->ndirected; i++) {
            xmpp_stanza_t *c = xmpp_stanza_copy(p);
            if (c) {
                xmpp_stanza_set_to(c, rs->directed[i]);
                xd_route(c);
            }
            free(rs->directed[i]);
        }
        rs->ndirected = 0;
    }
}

static int
roster_presence_out(xd_event *ev, void *data)
{
    roster_mod *rm = data;
    if (ev->session)
        broadcast(rm, ev->session, ev->stanza, type_is(ev->stanza, "unavailable"),
                  (ev->flags & XD_EVENT_INITIAL) != 0);
    return XD_PASS;
}

static int
roster_session_end(xd_event *ev, void *data)
{
    roster_mod *rm = data;
    char full[XD_JID_STR_MAX];
    xmpp_stanza_t *p;

    if (!ev->session || !xd_session_is_available(ev->session) ||
        xd_jid_format(xd_session_jid(ev->session), 1, full, sizeof(full)) < 0)
        return XD_PASS;
    p = xmpp_presence_new(xd_ctx());
    xmpp_stanza_set_type(p, "unavailable");
    xmpp_stanza_set_from(p, full);
    broadcast(rm, ev->session, p, 1, 0);
    xmpp_stanza_release(p);
    return XD_PASS;
}

/* ---- stream features ----------------------------------------------------------------- */

static void
roster_features(xd_session *s, xmpp_stanza_t *features, void *data)
{
    (void)data;
    if (!xd_session_is_authenticated(s) || xd_session_is_bound(s))
        return;
    xmpp_stanza_add_child_ex(features, xd_stanza_new("ver", NS_ROSTERVER), 0);
    xmpp_stanza_add_child_ex(features, xd_stanza_new("sub", NS_PREAPPROVAL), 0);
}

/* ---- the module ------------------------------------------------------------------------ */

static const xd_setting roster_settings[] = {
    {"max_items", XD_SETTING_INT},       /* roster items per user */
    {"max_groups", XD_SETTING_INT},      /* groups per item */
    {"max_name_length", XD_SETTING_INT}, /* bytes of an item name or a group name */
    {"max_pending", XD_SETTING_INT},     /* unanswered requests from non-contacts */
    {"max_tombstones", XD_SETTING_INT},  /* removed items remembered for versioning */
    {"max_directed", XD_SETTING_INT},    /* directed-presence targets per session */
    {NULL, 0},
};

static int
setting(xd_module *m, const char *name, long long def, long long lo, long long hi, long *out)
{
    long long v = xd_config_int(m, name, def);
    if (v < lo || v > hi) {
        xd_config_error(m, name, "must be from %lld to %lld", lo, hi);
        return -1;
    }
    *out = (long)v;
    return 0;
}

/* Remember an answer (best effort: without memory, it is asked again). */
static void
rel_store(roster_mod *rm, const char *key, int rel)
{
    rel_entry *e = xd_hashtab_get(rm->rel, key);
    size_t klen = strlen(key);

    if (e) {
        e->gen = rm->rel_gen;
        e->rel = rel;
        return;
    }
    if (xd_hashtab_count(rm->rel) >= REL_CACHE_MAX)
        rel_flush(rm);
    if (!(e = malloc(sizeof(*e) + klen + 1)))
        return;
    e->gen = rm->rel_gen;
    e->rel = rel;
    memcpy(e->key, key, klen + 1);
    if (xd_hashtab_put(rm->rel, e->key, e) != 0)
        free(e);
}

/*
 * xd_roster_relation() for the other modules: asked for most messages
 * (mod_strangers twice, mod_mam with the "roster" default).  A stored item
 * costs a Berkeley DB read and a decode (about 11,000 instructions); a
 * cached answer, one hash lookup (about 300).
 */
static int
roster_relation(const xd_jid *user, const xd_jid *contact, void *data)
{
    roster_mod *rm = data;
    char owner[XD_JID_STR_MAX], peer[XD_JID_STR_MAX], key[2 * XD_JID_STR_MAX + 2];
    rel_entry *e;
    ritem it;
    int r;

    if (bare_str(user, owner, sizeof(owner)) != 0 || bare_str(contact, peer, sizeof(peer)) != 0)
        return -1;
    snprintf(key, sizeof(key), "%s\x01%s", owner, peer);
    if ((e = xd_hashtab_get(rm->rel, key)) && e->gen == rm->rel_gen)
        return e->rel;
    r = item_load(rm, NULL, owner, peer, &it);
    if (r == XD_NOTFOUND)
        r = 0;
    else if (r != 0)
        return -1; /* not cached: a storage error is asked again */
    else {
        r = relation_of(it.flags);
        ritem_clear(&it);
    }
    rel_store(rm, key, r);
    return r;
}

static int
roster_load(xd_module *m)
{
    roster_mod *rm = calloc(1, sizeof(*rm));
    int r = 0;

    if (!rm)
        return -1;
    rm->m = m;
    if (setting(m, "max_items", 1000, 1, 100000, &rm->max_items) ||
        setting(m, "max_groups", 32, 0, HARD_MAX_GROUPS, &rm->max_groups) ||
        setting(m, "max_name_length", 1023, 1, HARD_MAX_TEXT, &rm->max_text) ||
        setting(m, "max_pending", 200, 1, 100000, &rm->max_pending) ||
        setting(m, "max_tombstones", 200, 0, 100000, &rm->max_tombstones) ||
        setting(m, "max_directed", 100, 0, 10000, &rm->max_directed)) {
        free(rm);
        return -1;
    }
    xd_module_set_data(m, rm);
    rm->items = xd_db_open("roster");
    rm->vers = xd_db_open("roster_ver");
    rm->pending = xd_db_open("roster_pending");
    if (!rm->items || !rm->vers || !rm->pending) {
        /* xmppd --check-config: no store, nothing to serve */
        xd_debug("roster: storage not open; module inactive");
        return 0;
    }
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "get", NS_ROSTER, iq_roster_get, rm);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "set", NS_ROSTER, iq_roster_set, rm);
    r |= xd_stream_features_add(m, XD_STREAM_C2S, roster_features, rm);
    r |= xd_hook(m, XD_HOOK_C2S_STANZA, roster_c2s_stanza, rm, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_DELIVER_LOCAL, roster_deliver_local, rm, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_PRESENCE_OUT, roster_presence_out, rm, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_SESSION_END, roster_session_end, rm, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_ACCOUNT_REMOVED, roster_account_removed, rm, XD_PRIO_DEFAULT);
    r |= xd_roster_provide(m, roster_relation, rm);
    if (!(rm->rel = xd_hashtab_new(1024)) ||
        !(rm->rel_timer = xd_timer_start(m, REL_CACHE_TTL, REL_CACHE_TTL, rel_timer_cb, rm)))
        r = -1;
    return r ? -1 : 0;
}

static void
roster_unload(xd_module *m)
{
    roster_mod *rm = xd_module_get_data(m);

    if (rm && rm->rel) {
        rel_flush(rm);
        xd_hashtab_free(rm->rel);
    }
    if (rm && rm->rel_timer)
        xd_timer_stop(rm->rel_timer);
    free(rm);
}

XD_MODULE(roster) = {
    .abi = XD_MODULE_ABI,
    .name = "roster",
    .settings = roster_settings,
    .load = roster_load,
    .unload = roster_unload,
};
