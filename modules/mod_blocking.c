/*
 * mod_blocking: XEP-0191 Blocking Command (version 1.3).
 *
 *   3.1  disco feature urn:xmpp:blocking (server and account JIDs)
 *   3.2  <blocklist/> retrieval; a resource that asks is "interested" and gets pushes
 *   3.3  <block/>: stored, pushed to interested resources, unavailable presence
 *        from the user's available resources to each newly blocked JID, and the
 *        stanza rules: inbound presence dropped, inbound message and IQ get/set
 *        answered <service-unavailable/>, other IQs dropped; outbound stanzas to a
 *        blocked JID refused with <not-acceptable/><blocked xmlns='urn:xmpp:blocking:errors'/>
 *        and outbound presence dropped
 *   3.4  <unblock/> with items, 3.5 without items (unblock all)
 *   6    JID matching as XEP-0016 2.1: user@domain/resource, user@domain,
 *        domain/resource, domain
 *
 * Storage: table "blocklist", key "user@domain" NUL "blocked-jid", empty value;
 * one transaction per request.
 *
 * Cost on the hot path: every client stanza (outbound) and every stanza to a
 * local account (inbound) is checked.  The blocklists of users with at least
 * one bound session live in an in-memory hash (loaded on the first check,
 * updated on block/unblock, dropped when the user's last session ends), kept
 * sorted so a check is at most four binary searches.  A user with no bound
 * session is checked with at most four point reads in the table instead, so
 * memory stays proportional to the users online, not to every account that
 * ever received a stanza.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xmppd/module.h>

#define NS_BLOCKING "urn:xmpp:blocking"
#define NS_BLOCKING_ERRORS "urn:xmpp:blocking:errors"

/* One user's blocklist: prepared JID strings, sorted for bsearch. */
typedef struct blk_user {
    struct blk_user *next; /* hash chain */
    char **jids;
    size_t n, cap;
    char bare[]; /* the user's bare JID, the hash key */
} blk_user;

typedef struct blk_conf {
    xd_module *m;
    xd_db *db; /* NULL under --check-config: the module then does nothing */
    long long max_items;
    unsigned long push_seq; /* ids of pushes */
    /* the cache: chained hash of blk_user by bare JID */
    blk_user **buckets;
    size_t nbuckets, count;
    int announcing; /* sending our own unavailable presence to newly blocked JIDs */
} blk_conf;

/* ---- the cache ----------------------------------------------------------- */

static size_t
hash_str(const char *s)
{
    size_t h = 1469598103934665603ull & (size_t)-1; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * (size_t)1099511628211ull;
    return h;
}

static int
cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void
user_free(blk_user *u)
{
    for (size_t i = 0; i < u->n; i++)
        free(u->jids[i]);
    free(u->jids);
    free(u);
}

static blk_user *
cache_find(blk_conf *c, const char *bare)
{
    blk_user *u;
    if (!c->nbuckets)
        return NULL;
    for (u = c->buckets[hash_str(bare) & (c->nbuckets - 1)]; u; u = u->next)
        if (!strcmp(u->bare, bare))
            return u;
    return NULL;
}

/* Double the table when it gets crowded; on failure keep the old one. */
static void
cache_grow(blk_conf *c)
{
    size_t nb = c->nbuckets ? c->nbuckets * 2 : 64;
    blk_user **b = calloc(nb, sizeof(*b));
    if (!b)
        return;
    for (size_t i = 0; i < c->nbuckets; i++) {
        for (blk_user *u = c->buckets[i], *next; u; u = next) {
            size_t h = hash_str(u->bare) & (nb - 1);
            next = u->next;
            u->next = b[h];
            b[h] = u;
        }
    }
    free(c->buckets);
    c->buckets = b;
    c->nbuckets = nb;
}

static void
cache_insert(blk_conf *c, blk_user *u)
{
    size_t h;
    if (c->count >= c->nbuckets * 2)
        cache_grow(c);
    if (!c->nbuckets) {
        user_free(u);
        return;
    }
    h = hash_str(u->bare) & (c->nbuckets - 1);
    u->next = c->buckets[h];
    c->buckets[h] = u;
    c->count++;
}

static void
cache_remove(blk_conf *c, const char *bare)
{
    blk_user **pp;
    if (!c->nbuckets)
        return;
    for (pp = &c->buckets[hash_str(bare) & (c->nbuckets - 1)]; *pp; pp = &(*pp)->next) {
        if (!strcmp((*pp)->bare, bare)) {
            blk_user *u = *pp;
            *pp = u->next;
            user_free(u);
            c->count--;
            return;
        }
    }
}

static int
user_has(const blk_user *u, const char *jid)
{
    return u->n && bsearch(&jid, u->jids, u->n, sizeof(char *), cmp_str) != NULL;
}

/* Insert keeping the order; 0 ok (or already there), -1 out of memory. */
static int
user_add(blk_user *u, const char *jid)
{
    size_t lo = 0, hi = u->n;
    char *dup;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int r = strcmp(u->jids[mid], jid);
        if (r == 0)
            return 0;
        if (r < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (u->n == u->cap) {
        size_t cap = u->cap ? u->cap * 2 : 8;
        char **v = realloc(u->jids, cap * sizeof(*v));
        if (!v)
            return -1;
        u->jids = v;
        u->cap = cap;
    }
    if (!(dup = strdup(jid)))
        return -1;
    memmove(&u->jids[lo + 1], &u->jids[lo], (u->n - lo) * sizeof(char *));
    u->jids[lo] = dup;
    u->n++;
    return 0;
}

static void
user_del(blk_user *u, const char *jid)
{
    char **p = u->n ? bsearch(&jid, u->jids, u->n, sizeof(char *), cmp_str) : NULL;
    if (!p)
        return;
    free(*p);
    memmove(p, p + 1, (size_t)(&u->jids[u->n] - (p + 1)) * sizeof(char *));
    u->n--;
}

static void
user_clear(blk_user *u)
{
    for (size_t i = 0; i < u->n; i++)
        free(u->jids[i]);
    u->n = 0;
}

/* ---- storage -------------------------------------------------------------- */

/* key = bare NUL jid; returns its length or -1 if it does not fit. */
static int
make_key(char *key, size_t len, const char *bare, const char *jid)
{
    size_t bl = strlen(bare), jl = jid ? strlen(jid) : 0;
    if (bl + 1 + jl > len)
        return -1;
    memcpy(key, bare, bl);
    key[bl] = '\0';
    if (jl)
        memcpy(key + bl + 1, jid, jl);
    return (int)(bl + 1 + jl);
}

typedef struct load_ctx {
    blk_user *u;
    size_t plen;
    int failed;
} load_ctx;

static int
load_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    load_ctx *lc = data;
    char jid[XD_JID_STR_MAX];
    size_t jl = klen - lc->plen;
    (void)val;
    (void)vlen;
    if (klen <= lc->plen || jl >= sizeof(jid))
        return 0; /* not ours to understand: skip */
    memcpy(jid, (const char *)key + lc->plen, jl);
    jid[jl] = '\0';
    if (user_add(lc->u, jid) != 0) {
        lc->failed = 1;
        return 1;
    }
    return 0;
}

/* Read a user's whole list from the table; NULL on error. */
static blk_user *
load_user(blk_conf *c, xd_txn *txn, const char *bare)
{
    char prefix[XD_JID_STR_MAX + 1];
    size_t bl = strlen(bare);
    blk_user *u = calloc(1, sizeof(*u) + bl + 1);
    load_ctx lc = {u, bl + 1, 0};
    if (!u)
        return NULL;
    memcpy(u->bare, bare, bl + 1);
    memcpy(prefix, bare, bl + 1);
    if (xd_db_foreach(c->db, txn, prefix, bl + 1, load_visit, &lc) < 0 || lc.failed) {
        user_free(u);
        return NULL;
    }
    return u;
}

static int
count_one(xd_session *s, void *data)
{
    (void)s;
    (void)data;
    return 1; /* one is enough to know the user is online */
}

/* The cached list of an online user, loading it on first use; NULL when the
 * user is offline (or on error: the caller then falls back to the table). */
static blk_user *
user_get(blk_conf *c, const xd_jid *bare_jid, const char *bare)
{
    blk_user *u = cache_find(c, bare);
    if (u || xd_user_sessions(bare_jid, count_one, NULL) == 0)
        return u;
    if ((u = load_user(c, NULL, bare)))
        cache_insert(c, u);
    return cache_find(c, bare);
}

/* ---- matching (XEP-0016 2.1 order) ---------------------------------------- */

static int
candidate_blocked(blk_conf *c, const blk_user *u, const char *bare, const char *cand)
{
    char key[2 * XD_JID_STR_MAX + 1];
    void *val = NULL;
    int klen, r;
    if (u)
        return user_has(u, cand);
    if ((klen = make_key(key, sizeof(key), bare, cand)) < 0)
        return 0;
    r = xd_db_get(c->db, NULL, key, (size_t)klen, &val, NULL);
    free(val);
    return r == 0;
}

/* Does user (bare) block who?  Checks at most four forms of who. */
static int
is_blocked(blk_conf *c, const xd_jid *user, const xd_jid *who)
{
    char bare[XD_JID_STR_MAX], cand[XD_JID_STR_MAX];
    blk_user *u;

    if (!c->db || !user->local[0])
        return 0;
    snprintf(bare, sizeof(bare), "%s@%s", user->local, user->domain);
    u = user_get(c, user, bare); /* xd_user_sessions ignores the resource */
    if (u && u->n == 0)
        return 0; /* the common case: nothing blocked */
    if (who->local[0] && who->resource[0]) {
        snprintf(cand, sizeof(cand), "%s@%s/%s", who->local, who->domain, who->resource);
        if (candidate_blocked(c, u, bare, cand))
            return 1;
    }
    if (who->local[0]) {
        snprintf(cand, sizeof(cand), "%s@%s", who->local, who->domain);
        if (candidate_blocked(c, u, bare, cand))
            return 1;
    }
    if (who->resource[0]) {
        snprintf(cand, sizeof(cand), "%s/%s", who->domain, who->resource);
        if (candidate_blocked(c, u, bare, cand))
            return 1;
    }
    return candidate_blocked(c, u, bare, who->domain);
}

/* Stanzas between a user and their own account, or from/to the server
 * itself, are never subject to the list: blocking one's own domain must not
 * cut the user off from their server's answers. */
static int
exempt(const xd_jid *user, const xd_jid *other)
{
    if (!other)
        return 1;
    if (!strcmp(user->domain, other->domain) && !strcmp(user->local, other->local))
        return 1;
    return !other->local[0] && !other->resource[0] && xd_is_local_host(other->domain);
}

static int
type_is(xmpp_stanza_t *st, const char *t)
{
    const char *v = xmpp_stanza_get_type(st);
    return v && !strcmp(v, t);
}

/* XD_HOOK_DELIVER_LOCAL: a stanza from a blocked entity to the user. */
static int
blk_inbound(xd_event *ev, void *data)
{
    blk_conf *c = data;
    const char *name = xmpp_stanza_get_name(ev->stanza);

    if (exempt(ev->to, ev->from) || !is_blocked(c, ev->to, ev->from))
        return XD_PASS;
    if (!strcmp(name, "presence"))
        return XD_DROP; /* no error: the user just looks offline */
    if (!strcmp(name, "iq") && !type_is(ev->stanza, "get") && !type_is(ev->stanza, "set"))
        return XD_DROP;
    /* messages and IQ get/set: as if nobody were there (xd_bounce never
     * answers an error) */
    xd_bounce(ev->stanza, "cancel", "service-unavailable", NULL);
    return XD_HANDLED;
}

/* XD_HOOK_C2S_STANZA: the user sends to a JID they blocked. */
static int
blk_outbound(xd_event *ev, void *data)
{
    blk_conf *c = data;
    xmpp_stanza_t *st = ev->stanza, *err, *e;
    const char *name = xmpp_stanza_get_name(st);

    if (exempt(ev->from, ev->to) || !is_blocked(c, ev->from, ev->to))
        return XD_PASS;
    if (!strcmp(name, "presence") || type_is(st, "error") ||
        (!strcmp(name, "iq") && type_is(st, "result")))
        return XD_DROP; /* errors are never answered; presence just stops */
    err = xd_error_reply(st, "cancel", "not-acceptable", NULL);
    if (err && (e = xmpp_stanza_get_child_by_name(err, "error")))
        xmpp_stanza_add_child_ex(e, xd_stanza_new("blocked", NS_BLOCKING_ERRORS), 0);
    if (err)
        xd_session_send(ev->session, err);
    return XD_HANDLED;
}

/* XD_HOOK_ROUTE: presence a local user's server sends on the user's behalf
 * (roster broadcasts, probes, directed presence) never reaches a JID the user
 * blocked (XEP-0191 3.3). */
static int
blk_route(xd_event *ev, void *data)
{
    blk_conf *c = data;
    xd_jid user;

    if (c->announcing || !ev->from || !ev->to || !ev->from->local[0] ||
        strcmp(xmpp_stanza_get_name(ev->stanza), "presence") != 0 ||
        !xd_is_local_host(ev->from->domain))
        return XD_PASS;
    user = *ev->from;
    xd_jid_to_bare(&user);
    if (exempt(&user, ev->to) || !is_blocked(c, &user, ev->to))
        return XD_PASS;
    return XD_DROP;
}

/* ---- the protocol ----------------------------------------------------------- */

/* Only the account's own bound resources may see or change its list. */
static int
own_request(xd_event *ev)
{
    return ev->session && ev->from && ev->from->local[0] && xd_session_is_bound(ev->session) &&
           !strcmp(ev->from->local, ev->to->local) && !strcmp(ev->from->domain, ev->to->domain);
}

static void
reply_error(xd_event *ev, const char *type, const char *cond, const char *text)
{
    xmpp_stanza_t *e = xd_error_reply(ev->stanza, type, cond, text);
    if (e)
        xd_session_send(ev->session, e);
}

static xmpp_stanza_t *
item(const char *jid)
{
    xmpp_stanza_t *it = xd_stanza_new("item", NULL);
    xmpp_stanza_set_attribute(it, "jid", jid);
    return it;
}

/* The request's items, prepared and without duplicates.  0 ok; otherwise
 * an error was sent. */
typedef struct item_list {
    char **v;
    size_t n;
} item_list;

static void
items_free(item_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

static int
items_parse(blk_conf *c, xd_event *ev, xmpp_stanza_t *el, item_list *out)
{
    size_t max = 0;
    out->v = NULL;
    out->n = 0;
    for (xmpp_stanza_t *ch = xmpp_stanza_get_children(el); ch; ch = xmpp_stanza_get_next(ch))
        if (xmpp_stanza_is_tag(ch))
            max++;
    if (max > (size_t)c->max_items) {
        char text[96];
        snprintf(text, sizeof(text), "a blocklist holds at most %lld items", c->max_items);
        reply_error(ev, "modify", "policy-violation", text);
        return -1;
    }
    if (max && !(out->v = calloc(max, sizeof(char *)))) {
        reply_error(ev, "wait", "internal-server-error", NULL);
        return -1;
    }
    for (xmpp_stanza_t *ch = xmpp_stanza_get_children(el); ch; ch = xmpp_stanza_get_next(ch)) {
        const char *name = xmpp_stanza_get_name(ch), *attr;
        char buf[XD_JID_STR_MAX];
        xd_jid j;
        int dup = 0;
        if (!xmpp_stanza_is_tag(ch))
            continue;
        if (!name || strcmp(name, "item") != 0 || !(attr = xmpp_stanza_get_attribute(ch, "jid"))) {
            reply_error(ev, "modify", "bad-request", "expected <item jid='...'/>");
            items_free(out);
            return -1;
        }
        if (xd_jid_parse(&j, attr) != 0 || xd_jid_format(&j, 1, buf, sizeof(buf)) < 0) {
            reply_error(ev, "modify", "jid-malformed", NULL);
            items_free(out);
            return -1;
        }
        for (size_t i = 0; i < out->n && !dup; i++)
            dup = !strcmp(out->v[i], buf);
        if (dup)
            continue;
        if (!(out->v[out->n] = strdup(buf))) {
            reply_error(ev, "wait", "internal-server-error", NULL);
            items_free(out);
            return -1;
        }
        out->n++;
    }
    return 0;
}

typedef struct push_ctx {
    blk_conf *c;
    xmpp_stanza_t *payload;
} push_ctx;

static int
push_one(xd_session *s, void *data)
{
    push_ctx *p = data;
    char full[XD_JID_STR_MAX], id[32];
    xmpp_stanza_t *iq;
    if (!xd_session_get_data(s, p->c->m) ||
        xd_jid_format(xd_session_jid(s), 1, full, sizeof(full)) < 0)
        return 0;
    iq = xmpp_iq_new(xd_ctx(), "set", NULL);
    snprintf(id, sizeof(id), "blockpush-%lu", ++p->c->push_seq);
    xmpp_stanza_set_id(iq, id);
    xmpp_stanza_set_to(iq, full);
    xmpp_stanza_add_child_ex(iq, xmpp_stanza_copy(p->payload), 0);
    xd_deliver_to_session(s, iq);
    return 0;
}

/* XEP-0191 3.3/3.4: the change goes to every resource that asked for the list. */
static void
push(blk_conf *c, const xd_jid *bare, const char *what, const item_list *l)
{
    push_ctx p = {c, xd_stanza_new(what, NS_BLOCKING)};
    for (size_t i = 0; l && i < l->n; i++)
        xmpp_stanza_add_child_ex(p.payload, item(l->v[i]), 0);
    xd_user_sessions(bare, push_one, &p);
    xmpp_stanza_release(p.payload);
}

typedef struct unavail_ctx {
    const item_list *l;
    const char *const *fresh; /* per item: non-NULL if newly blocked */
} unavail_ctx;

static int
unavail_from(xd_session *s, void *data)
{
    unavail_ctx *u = data;
    char full[XD_JID_STR_MAX];
    if (!xd_session_is_available(s) || xd_jid_format(xd_session_jid(s), 1, full, sizeof(full)) < 0)
        return 0;
    for (size_t i = 0; i < u->l->n; i++) {
        xmpp_stanza_t *p;
        if (!u->fresh[i])
            continue;
        p = xmpp_presence_new(xd_ctx());
        xmpp_stanza_set_type(p, "unavailable");
        xmpp_stanza_set_from(p, full);
        xmpp_stanza_set_to(p, u->l->v[i]);
        xd_route(p);
    }
    return 0;
}

static int
iq_blocklist(xd_event *ev, void *data)
{
    blk_conf *c = data;
    char bare[XD_JID_STR_MAX];
    xmpp_stanza_t *r, *q;
    blk_user *u;

    if (!own_request(ev)) {
        xd_bounce(ev->stanza, "cancel", "forbidden", NULL);
        return XD_HANDLED;
    }
    if (xd_jid_format(ev->to, 0, bare, sizeof(bare)) < 0 || !(u = user_get(c, ev->to, bare))) {
        reply_error(ev, "wait", "internal-server-error", NULL);
        return XD_HANDLED;
    }
    /* this resource now wants pushes; any non-NULL value marks it */
    xd_session_set_data(ev->session, c->m, c, NULL);
    r = xd_iq_result(ev->stanza);
    q = xd_stanza_new("blocklist", NS_BLOCKING);
    for (size_t i = 0; i < u->n; i++)
        xmpp_stanza_add_child_ex(q, item(u->jids[i]), 0);
    xmpp_stanza_add_child_ex(r, q, 0);
    xd_session_send(ev->session, r);
    return XD_HANDLED;
}

static int
do_block(blk_conf *c, xd_event *ev, blk_user *u, const char *bare, xmpp_stanza_t *el)
{
    item_list l;
    const char **fresh;
    size_t added = 0;
    xd_txn *txn = NULL;
    int ok = 1;

    if (items_parse(c, ev, el, &l) != 0)
        return XD_HANDLED;
    if (l.n == 0) {
        reply_error(ev, "modify", "bad-request", "<block/> needs at least one item");
        return XD_HANDLED;
    }
    if (!(fresh = calloc(l.n, sizeof(*fresh)))) {
        items_free(&l);
        reply_error(ev, "wait", "internal-server-error", NULL);
        return XD_HANDLED;
    }
    for (size_t i = 0; i < l.n; i++)
        if (!user_has(u, l.v[i])) {
            fresh[i] = l.v[i];
            added++;
        }
    if (u->n + added > (size_t)c->max_items) {
        char text[96];
        snprintf(text, sizeof(text), "a blocklist holds at most %lld items", c->max_items);
        reply_error(ev, "modify", "policy-violation", text);
        goto out;
    }
    if (added) {
        ok = xd_txn_begin(&txn) == 0;
        for (size_t i = 0; ok && i < l.n; i++) {
            char key[2 * XD_JID_STR_MAX + 1];
            int klen = fresh[i] ? make_key(key, sizeof(key), bare, fresh[i]) : 0;
            if (fresh[i])
                ok = klen > 0 && xd_db_put(c->db, txn, key, (size_t)klen, NULL, 0) == 0;
        }
        if (ok)
            ok = xd_txn_commit(txn) == 0;
        else if (txn)
            xd_txn_abort(txn);
    }
    for (size_t i = 0; ok && i < l.n; i++)
        if (fresh[i] && user_add(u, fresh[i]) != 0) {
            /* stored but not cached: forget the cache so the next check reloads */
            cache_remove(c, bare);
            u = NULL;
            break;
        }
    if (!ok) {
        reply_error(ev, "wait", "internal-server-error", NULL);
        goto out;
    }
    xd_session_send(ev->session, xd_iq_result(ev->stanza));
    push(c, ev->to, "block", &l);
    {
        /* 3.3: the blocked entity sees the user go offline */
        unavail_ctx uc = {&l, fresh};
        c->announcing = 1;
        xd_user_sessions(ev->to, unavail_from, &uc);
        c->announcing = 0;
    }
    xd_info("blocking: %s blocked %zu JID(s)", bare, added);
out:
    free(fresh);
    items_free(&l);
    return XD_HANDLED;
}

static int
do_unblock(blk_conf *c, xd_event *ev, blk_user *u, const char *bare, xmpp_stanza_t *el)
{
    item_list l;
    xd_txn *txn = NULL;
    int ok, all;

    if (items_parse(c, ev, el, &l) != 0)
        return XD_HANDLED;
    all = l.n == 0; /* 3.5: no items means everything */
    ok = xd_txn_begin(&txn) == 0;
    if (all) {
        for (size_t i = 0; ok && i < u->n; i++) {
            char key[2 * XD_JID_STR_MAX + 1];
            int klen = make_key(key, sizeof(key), bare, u->jids[i]);
            ok = klen > 0 && xd_db_del(c->db, txn, key, (size_t)klen) >= 0;
        }
    } else {
        for (size_t i = 0; ok && i < l.n; i++) {
            char key[2 * XD_JID_STR_MAX + 1];
            int klen = make_key(key, sizeof(key), bare, l.v[i]);
            ok = klen > 0 && xd_db_del(c->db, txn, key, (size_t)klen) >= 0; /* absent: fine */
        }
    }
    if (ok)
        ok = xd_txn_commit(txn) == 0;
    else if (txn)
        xd_txn_abort(txn);
    if (!ok) {
        reply_error(ev, "wait", "internal-server-error", NULL);
        items_free(&l);
        return XD_HANDLED;
    }
    if (all)
        user_clear(u);
    else
        for (size_t i = 0; i < l.n; i++)
            user_del(u, l.v[i]);
    xd_session_send(ev->session, xd_iq_result(ev->stanza));
    push(c, ev->to, "unblock", &l);
    xd_info("blocking: %s unblocked %s", bare, all ? "everything" : "some JIDs");
    items_free(&l);
    return XD_HANDLED;
}

static int
iq_set(xd_event *ev, void *data)
{
    blk_conf *c = data;
    char bare[XD_JID_STR_MAX];
    xmpp_stanza_t *el;
    blk_user *u;

    if (!own_request(ev)) {
        xd_bounce(ev->stanza, "cancel", "forbidden", NULL);
        return XD_HANDLED;
    }
    if (xd_jid_format(ev->to, 0, bare, sizeof(bare)) < 0 || !(u = user_get(c, ev->to, bare))) {
        reply_error(ev, "wait", "internal-server-error", NULL);
        return XD_HANDLED;
    }
    if ((el = xmpp_stanza_get_child_by_name_and_ns(ev->stanza, "block", NS_BLOCKING)))
        return do_block(c, ev, u, bare, el);
    if ((el = xmpp_stanza_get_child_by_name_and_ns(ev->stanza, "unblock", NS_BLOCKING)))
        return do_unblock(c, ev, u, bare, el);
    reply_error(ev, "modify", "bad-request", NULL);
    return XD_HANDLED;
}

static int
iq_get(xd_event *ev, void *data)
{
    if (xmpp_stanza_get_child_by_name_and_ns(ev->stanza, "blocklist", NS_BLOCKING))
        return iq_blocklist(ev, data);
    if (own_request(ev))
        reply_error(ev, "modify", "bad-request", NULL);
    else
        xd_bounce(ev->stanza, "cancel", "forbidden", NULL);
    return XD_HANDLED;
}

static int
count_all(xd_session *s, void *data)
{
    (void)s;
    (void)data;
    return 0;
}

/* The user's last session is going: their list leaves memory. */
static int
blk_session_end(xd_event *ev, void *data)
{
    blk_conf *c = data;
    xd_jid bare = *xd_session_jid(ev->session);
    char key[XD_JID_STR_MAX];

    xd_jid_to_bare(&bare);
    /* the ending session is still bound: the last one counts itself */
    if (xd_user_sessions(&bare, count_all, NULL) <= 1 &&
        xd_jid_format(&bare, 0, key, sizeof(key)) >= 0)
        cache_remove(c, key);
    return XD_PASS;
}

/* ---- the module --------------------------------------------------------------- */

static const xd_setting blk_settings[] = {
    {"max_items", XD_SETTING_INT},
    {NULL, 0},
};

static int
blk_load(xd_module *m)
{
    blk_conf *c;
    long long max = xd_config_int(m, "max_items", 1000);
    int r = 0;

    if (max < 1 || max > 100000) {
        xd_config_error(m, "max_items", "must be from 1 to 100000");
        return -1;
    }
    if (!(c = calloc(1, sizeof(*c))))
        return -1;
    c->m = m;
    c->max_items = max;
    xd_module_set_data(m, c);
    if (!(c->db = xd_db_open("blocklist")))
        return 0; /* --check-config: no store, nothing to serve */

    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "get", NS_BLOCKING, iq_get, c);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "set", NS_BLOCKING, iq_set, c);
    r |= xd_hook(m, XD_HOOK_DELIVER_LOCAL, blk_inbound, c, XD_PRIO_HIGH);
    r |= xd_hook(m, XD_HOOK_C2S_STANZA, blk_outbound, c, XD_PRIO_HIGH);
    r |= xd_hook(m, XD_HOOK_ROUTE, blk_route, c, XD_PRIO_HIGH);
    r |= xd_hook(m, XD_HOOK_SESSION_END, blk_session_end, c, XD_PRIO_DEFAULT);
    r |= xd_disco_add_feature(m, NS_BLOCKING);
    r |= xd_disco_add_account_feature(m, NS_BLOCKING);
    return r ? -1 : 0;
}

static void
blk_unload(xd_module *m)
{
    blk_conf *c = xd_module_get_data(m);
    if (!c)
        return;
    for (size_t i = 0; i < c->nbuckets; i++)
        for (blk_user *u = c->buckets[i], *next; u; u = next) {
            next = u->next;
            user_free(u);
        }
    free(c->buckets);
    free(c);
}

XD_MODULE(blocking) = {
    .abi = XD_MODULE_ABI,
    .name = "blocking",
    .settings = blk_settings,
    .load = blk_load,
    .unload = blk_unload,
};
