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
 * and XEP-0377 Blocking Command Reports (urn:xmpp:reporting:1, version 0.4.1):
 *   3    disco feature urn:xmpp:reporting:1 (server and account JIDs); the
 *        reason features of version 0.1 (urn:xmpp:reporting:reason:*:0) are
 *        not advertised: since 0.3 the namespace implies both reasons
 *   4    <report reason='urn:xmpp:reporting:spam|abuse'/> with <text/>s
 *   5    processing opt-in: <third-party/> lets a report go to the
 *        forward_reports_to services (all reports with forward_without_opt_in),
 *        the reporter withheld unless forward_reporter; <report-origin/> is
 *        kept in the record but not acted on (no XEP-0157 lookup of the
 *        sender's abuse address)
 *   6    a report inside a <block/> item: the JID is blocked as usual and the
 *        report, with the <stanza-id/>s of the reported messages, is stored
 *        in the same transaction and sent to the operator's abuse_jids
 * Forwards use the standalone form of Prosody's mod_report_forward: a
 * <message/> from the server carrying the <report/> with the reported JID in
 * <jid xmlns='urn:xmpp:jid:0'/>.
 *
 * Storage: table "blocklist", key "user@domain" NUL "blocked-jid", empty value;
 * table "reports", key "user@domain" NUL 8-byte big-endian (2^64-1 - time in
 * microseconds) and 4-byte (2^32-1 - sequence), so a user's newest reports
 * come first and the hourly limit reads only the last hour; the value is a
 * <record/> element (reporter, reported JID, time, the rebuilt <report/>).
 * Both live under the user's key prefix, so account removal purges them; an
 * unblock leaves the reports.  One transaction per request.  Once it is
 * committed, XD_HOOK_BLOCKLIST_CHANGED runs for each JID that joined or left
 * the list (once, with no JID, for "unblock all"), so modules that act on a
 * block (mod_strangers) do nothing when the request is refused.
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
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <xmppd/module.h>

#define NS_BLOCKING "urn:xmpp:blocking"
#define NS_BLOCKING_ERRORS "urn:xmpp:blocking:errors"
#define NS_REPORTING "urn:xmpp:reporting:1"
#define NS_SID "urn:xmpp:sid:0"
#define NS_JID "urn:xmpp:jid:0"
#define NS_ADDRESS "http://jabber.org/protocol/address"
#define NS_RECORD "urn:xmppd:blocking:report-record:0" /* our own storage format */
#define REASON_SPAM "urn:xmpp:reporting:spam"
#define REASON_ABUSE "urn:xmpp:reporting:abuse"

/* Bounds on one report, beyond which it is refused as a whole. */
#define MAX_STANZA_IDS 20 /* reported messages */
#define MAX_TEXTS 8       /* <text/> elements (one per language) */
#define MAX_STANZA_ID_LEN 256
#define MAX_LANG_LEN 64
#define REPORT_KEY_TAIL 12 /* 8 bytes of time, 4 of sequence */

/* One user's blocklist: prepared JID strings, sorted for bsearch. */
typedef struct blk_user {
    char **jids;
    size_t n, cap;
    char bare[]; /* the user's bare JID, the cache's key */
} blk_user;

typedef struct jid_list {
    char **v;
    int n;
} jid_list;

typedef struct blk_conf {
    xd_module *m;
    xd_db *db; /* NULL under --check-config: the module then does nothing */
    xd_db *reports;
    long long max_items;
    /* XEP-0377 */
    int reporting;                  /* accept reports at all */
    jid_list abuse;                 /* the operator's accounts: every report, with the reporter */
    jid_list forward;               /* third parties (RTBL services): opted-in reports */
    int forward_reporter;           /* third parties learn who reported */
    int forward_without_opt_in;     /* ... even without <third-party/> */
    long long max_reports_per_hour; /* per reporting user; 0: no limit */
    long long max_report_text;      /* bytes of all <text/>s of one report */
    unsigned long report_seq;       /* tie-break of report keys within one microsecond */
    unsigned long forward_seq;      /* ids of forwarded reports */
    unsigned long push_seq;         /* ids of pushes */
    xd_hashtab *cache;              /* bare JID -> blk_user of the users online */
    int announcing;                 /* sending our own unavailable presence to newly blocked JIDs */
} blk_conf;

/* ---- the cache ----------------------------------------------------------- */

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

static void
cache_remove(blk_conf *c, const char *bare)
{
    blk_user *u = xd_hashtab_del(c->cache, bare);
    if (u)
        user_free(u);
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
    blk_user *u = xd_hashtab_get(c->cache, bare);
    if (u || xd_user_sessions(bare_jid, count_one, NULL) == 0)
        return u;
    if ((u = load_user(c, NULL, bare)) && xd_hashtab_put(c->cache, u->bare, u) != 0) {
        user_free(u);
        u = NULL;
    }
    return u;
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

/* XD_HOOK_DELIVER_LOCAL: a stanza from a blocked entity to the user.  Per message about
 * 1,200 instructions (callgrind, sample config): the user's list is in memory. */
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

/* XD_HOOK_C2S_STANZA: the user sends to a JID they blocked.  About 1,300 instructions
 * per message, from memory. */
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

/* ---- XEP-0377 reports ---------------------------------------------------------- */

/* The namespace an element is in: its own xmlns, or (the core's parser only
 * writes xmlns where it changes) its parent's. */
static int
ns_is(xmpp_stanza_t *el, const char *parent_ns, const char *ns)
{
    const char *own = xmpp_stanza_get_ns(el);
    return !strcmp(own ? own : parent_ns, ns);
}

static int
name_is(xmpp_stanza_t *el, const char *name)
{
    const char *n = xmpp_stanza_get_name(el);
    return n && !strcmp(n, name);
}

static void
add_text(xmpp_stanza_t *parent, const char *text)
{
    xmpp_stanza_t *t = xmpp_stanza_new(xd_ctx());
    xmpp_stanza_set_text(t, text);
    xmpp_stanza_add_child_ex(parent, t, 0);
}

static const char *
report_reason_name(const char *reason)
{
    return !strcmp(reason, REASON_SPAM) ? "spam" : "abuse";
}

static int
report_has(xmpp_stanza_t *rep, const char *name)
{
    return xmpp_stanza_get_child_by_name(rep, name) != NULL;
}

/* Trim XML whitespace at both ends, in place. */
static char *
trim(char *s)
{
    char *e;
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
        s++;
    e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r'))
        *--e = '\0';
    return s;
}

/*
 * The <report/> of one <item/>, checked and rebuilt from the parts this
 * module understands (reason, <stanza-id/>s, <text/>s, the opt-in flags);
 * other children are tolerated and left out.  0 with *out NULL (no report)
 * or set to the rebuilt report; -1 after an error reply, so a bad report
 * spoils the whole request before anything is stored.
 */
static int
report_parse(blk_conf *c, xd_event *ev, xmpp_stanza_t *item, xmpp_stanza_t **out)
{
    xmpp_stanza_t *rep = NULL, *norm;
    const char *reason;
    size_t nids = 0, ntexts = 0, textlen = 0;
    int origin = 0, third = 0;
    char msg[128];

    *out = NULL;
    for (xmpp_stanza_t *ch = xmpp_stanza_get_children(item); ch; ch = xmpp_stanza_get_next(ch)) {
        if (!xmpp_stanza_is_tag(ch) || !name_is(ch, "report") ||
            !ns_is(ch, NS_BLOCKING, NS_REPORTING))
            continue;
        if (rep) {
            reply_error(ev, "modify", "bad-request", "one <report/> per item");
            return -1;
        }
        rep = ch;
    }
    if (!rep)
        return 0;
    reason = xmpp_stanza_get_attribute(rep, "reason");
    if (!reason || (strcmp(reason, REASON_SPAM) != 0 && strcmp(reason, REASON_ABUSE) != 0)) {
        reply_error(ev, "modify", "bad-request",
                    "unknown report reason: use " REASON_SPAM " or " REASON_ABUSE);
        return -1;
    }
    norm = xd_stanza_new("report", NS_REPORTING);
    xmpp_stanza_set_attribute(norm, "reason", reason);
    for (xmpp_stanza_t *ch = xmpp_stanza_get_children(rep); ch; ch = xmpp_stanza_get_next(ch)) {
        if (!xmpp_stanza_is_tag(ch))
            continue;
        if (name_is(ch, "stanza-id") && ns_is(ch, NS_REPORTING, NS_SID)) {
            const char *id = xmpp_stanza_get_attribute(ch, "id");
            const char *by = xmpp_stanza_get_attribute(ch, "by");
            char bybuf[XD_JID_STR_MAX];
            xmpp_stanza_t *sid;
            xd_jid j;
            if (!id || !*id || strlen(id) > MAX_STANZA_ID_LEN || !by) {
                reply_error(ev, "modify", "bad-request",
                            "<stanza-id/> needs 'by' and an 'id' of at most 256 bytes");
                goto fail;
            }
            if (xd_jid_parse(&j, by) != 0 || xd_jid_format(&j, 1, bybuf, sizeof(bybuf)) < 0) {
                reply_error(ev, "modify", "jid-malformed", "bad 'by' of a <stanza-id/>");
                goto fail;
            }
            if (++nids > MAX_STANZA_IDS) {
                snprintf(msg, sizeof(msg), "a report names at most %d messages", MAX_STANZA_IDS);
                reply_error(ev, "modify", "policy-violation", msg);
                goto fail;
            }
            sid = xd_stanza_new("stanza-id", NS_SID);
            xmpp_stanza_set_attribute(sid, "by", bybuf);
            xmpp_stanza_set_attribute(sid, "id", id);
            xmpp_stanza_add_child_ex(norm, sid, 0);
        } else if (name_is(ch, "text") && ns_is(ch, NS_REPORTING, NS_REPORTING)) {
            char *raw = xmpp_stanza_get_text(ch), *t = raw ? trim(raw) : NULL;
            const char *lang = xmpp_stanza_get_attribute(ch, "xml:lang");
            size_t len = t ? strlen(t) : 0;
            textlen += len;
            if (++ntexts > MAX_TEXTS || textlen > (size_t)c->max_report_text) {
                if (raw)
                    xmpp_free(xd_ctx(), raw);
                snprintf(msg, sizeof(msg), "report text is limited to %lld bytes",
                         c->max_report_text);
                reply_error(ev, "modify", "policy-violation", msg);
                goto fail;
            }
            if (len) {
                xmpp_stanza_t *te = xd_stanza_new("text", NULL);
                if (lang && *lang && strlen(lang) <= MAX_LANG_LEN)
                    xmpp_stanza_set_attribute(te, "xml:lang", lang);
                add_text(te, t);
                xmpp_stanza_add_child_ex(norm, te, 0);
            }
            if (raw)
                xmpp_free(xd_ctx(), raw);
        } else if (name_is(ch, "report-origin") && ns_is(ch, NS_REPORTING, NS_REPORTING)) {
            origin = 1;
        } else if (name_is(ch, "third-party") && ns_is(ch, NS_REPORTING, NS_REPORTING)) {
            third = 1;
        }
    }
    /* schema order: stanza-ids, texts, then the opt-ins */
    if (origin)
        xmpp_stanza_add_child_ex(norm, xd_stanza_new("report-origin", NULL), 0);
    if (third)
        xmpp_stanza_add_child_ex(norm, xd_stanza_new("third-party", NULL), 0);
    *out = norm;
    return 0;
fail:
    xmpp_stanza_release(norm);
    return -1;
}

/* The request's items, prepared and without duplicates, each with its
 * rebuilt report (NULL: none).  0 ok; otherwise an error was sent. */
typedef struct item_list {
    char **v;
    xmpp_stanza_t **rep; /* per item; NULL array when reports are not read */
    size_t n, nrep;
} item_list;

static void
items_free(item_list *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i]);
        if (l->rep && l->rep[i])
            xmpp_stanza_release(l->rep[i]);
    }
    free(l->v);
    free(l->rep);
    l->v = NULL;
    l->rep = NULL;
    l->n = l->nrep = 0;
}

static int
items_parse(blk_conf *c, xd_event *ev, xmpp_stanza_t *el, item_list *out, int reports)
{
    size_t max = 0;
    out->v = NULL;
    out->rep = NULL;
    out->n = out->nrep = 0;
    for (xmpp_stanza_t *ch = xmpp_stanza_get_children(el); ch; ch = xmpp_stanza_get_next(ch))
        if (xmpp_stanza_is_tag(ch))
            max++;
    if (max > (size_t)c->max_items) {
        char text[96];
        snprintf(text, sizeof(text), "a blocklist holds at most %lld items", c->max_items);
        reply_error(ev, "modify", "policy-violation", text);
        return -1;
    }
    if (max && (!(out->v = calloc(max, sizeof(char *))) ||
                (reports && !(out->rep = calloc(max, sizeof(*out->rep)))))) {
        items_free(out);
        reply_error(ev, "wait", "internal-server-error", NULL);
        return -1;
    }
    for (xmpp_stanza_t *ch = xmpp_stanza_get_children(el); ch; ch = xmpp_stanza_get_next(ch)) {
        const char *name = xmpp_stanza_get_name(ch), *attr;
        char buf[XD_JID_STR_MAX];
        xmpp_stanza_t *rep = NULL;
        xd_jid j;
        size_t dup = out->n;
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
        if (reports && report_parse(c, ev, ch, &rep) != 0) {
            items_free(out);
            return -1;
        }
        for (size_t i = 0; i < out->n && dup == out->n; i++)
            if (!strcmp(out->v[i], buf))
                dup = i;
        if (dup < out->n) {
            /* the same JID twice: one report at most counts for it */
            if (rep && !out->rep[dup]) {
                out->rep[dup] = rep;
                out->nrep++;
            } else if (rep) {
                xmpp_stanza_release(rep);
            }
            continue;
        }
        if (!(out->v[out->n] = strdup(buf))) {
            if (rep)
                xmpp_stanza_release(rep);
            reply_error(ev, "wait", "internal-server-error", NULL);
            items_free(out);
            return -1;
        }
        if (reports) {
            out->rep[out->n] = rep;
            out->nrep += rep != NULL;
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

/* ---- report storage, limits and forwarding --------------------------------------- */

typedef struct recent_ctx {
    size_t plen;
    unsigned long long since; /* microseconds */
    long long n;
} recent_ctx;

static int
recent_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    recent_ctx *rc = data;
    unsigned long long t;
    (void)val;
    (void)vlen;
    if (klen != rc->plen + REPORT_KEY_TAIL)
        return 0; /* not a key of ours */
    t = ~xd_db_get_be((const unsigned char *)key + rc->plen, 8);
    if (t < rc->since)
        return 1; /* newest first: everything after this is older */
    rc->n++;
    return 0;
}

/* The user's reports of the last hour, read from the table (so the limit
 * holds across restarts); -1 on error. */
static long long
reports_recent(blk_conf *c, const char *bare, unsigned long long now_us)
{
    char prefix[XD_JID_STR_MAX + 1];
    size_t bl = strlen(bare);
    recent_ctx rc = {bl + 1, now_us > 3600000000ull ? now_us - 3600000000ull : 0, 0};
    memcpy(prefix, bare, bl + 1);
    if (xd_db_foreach(c->reports, NULL, prefix, bl + 1, recent_visit, &rc) < 0)
        return -1;
    return rc.n;
}

/* A growing text buffer for the human-readable body. */
typedef struct sbuf {
    char *p;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_add(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
sb_add(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    int n;
    if (b->oom)
        return;
    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->oom = 1;
        return;
    }
    if (b->len + (size_t)n + 1 > b->cap) {
        size_t cap = (b->len + (size_t)n + 1) * 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* One stored or forwarded report, with what the request told us. */
typedef struct report_ctx {
    const char *domain;   /* the reporter's server: forwards come from it */
    const char *reporter; /* bare JID */
    const char *jid;      /* the reported (blocked) JID */
    const char *when;     /* ISO 8601 UTC */
    xmpp_stanza_t *rep;   /* the rebuilt <report/> */
} report_ctx;

/* The table's value: <record reporter= jid= time=><report/></record>. */
static char *
record_text(const report_ctx *r, size_t *len)
{
    xmpp_stanza_t *rec = xd_stanza_new("record", NS_RECORD);
    char *buf = NULL, *out = NULL;
    size_t blen = 0;
    xmpp_stanza_set_attribute(rec, "reporter", r->reporter);
    xmpp_stanza_set_attribute(rec, "jid", r->jid);
    xmpp_stanza_set_attribute(rec, "time", r->when);
    xmpp_stanza_add_child_ex(rec, xmpp_stanza_copy(r->rep), 0);
    if (xmpp_stanza_to_text(rec, &buf, &blen) == XMPP_EOK && (out = malloc(blen + 1))) {
        memcpy(out, buf, blen);
        out[blen] = '\0';
        *len = blen;
    }
    if (buf)
        xmpp_free(xd_ctx(), buf);
    xmpp_stanza_release(rec);
    return out;
}

/*
 * Send one report to `to` as a normal message from the reporter's server:
 * a body for people, and the <report/> with <jid xmlns='urn:xmpp:jid:0'/>
 * naming the reported JID for software.  With `identify` the reporter is
 * named (body and XEP-0033 'ofrom') and the <stanza-id/>s go along (their
 * 'by' is the reporter's archive); without it neither does: XEP-0377 5 lets a
 * server hide the reporter from third parties, never the reported JID.
 */
static void
forward_one(blk_conf *c, const report_ctx *r, const char *to, int identify)
{
    xmpp_stanza_t *msg, *rep, *j;
    sbuf b = {0};
    char id[48];
    size_t nids = 0;
    const char *reason = xmpp_stanza_get_attribute(r->rep, "reason");

    sb_add(&b, "%s report on %s\n", !strcmp(reason, REASON_SPAM) ? "Spam" : "Abuse", r->jid);
    if (identify)
        sb_add(&b, "Reporter: %s\n", r->reporter);
    else
        sb_add(&b, "Reporter: a user of %s (identity withheld)\n", r->domain);
    sb_add(&b, "Reported JID: %s\n", r->jid);
    sb_add(&b, "Reason: %s (%s)\n", report_reason_name(reason), reason);
    sb_add(&b, "Time: %s\n", r->when);

    rep = xd_stanza_new("report", NS_REPORTING);
    xmpp_stanza_set_attribute(rep, "reason", reason);
    j = xd_stanza_new("jid", NS_JID);
    add_text(j, r->jid);
    xmpp_stanza_add_child_ex(rep, j, 0);
    for (xmpp_stanza_t *ch = xmpp_stanza_get_children(r->rep); ch; ch = xmpp_stanza_get_next(ch)) {
        if (name_is(ch, "stanza-id")) {
            nids++;
            if (!identify)
                continue;
            sb_add(&b, "Reported message: %s (archive of %s)\n",
                   xmpp_stanza_get_attribute(ch, "id"), xmpp_stanza_get_attribute(ch, "by"));
        } else if (name_is(ch, "text")) {
            const char *lang = xmpp_stanza_get_attribute(ch, "xml:lang");
            char *t = xmpp_stanza_get_text(ch);
            sb_add(&b, "Text%s%s%s: %s\n", lang ? " [" : "", lang ? lang : "", lang ? "]" : "",
                   t ? t : "");
            if (t)
                xmpp_free(xd_ctx(), t);
        }
        xmpp_stanza_add_child_ex(rep, xmpp_stanza_copy(ch), 0);
    }
    if (nids && !identify)
        sb_add(&b, "Reported messages: %zu (ids withheld)\n", nids);
    if (report_has(r->rep, "third-party") || report_has(r->rep, "report-origin"))
        sb_add(&b, "Reporter allows forwarding to:%s%s\n",
               report_has(r->rep, "third-party") ? " third parties" : "",
               report_has(r->rep, "report-origin") ? " the sender's server" : "");

    snprintf(id, sizeof(id), "report-%lu", ++c->forward_seq);
    msg = xmpp_message_new(xd_ctx(), "normal", to, id);
    xmpp_stanza_set_from(msg, r->domain);
    if (!b.oom && b.len) {
        b.p[b.len - 1] = '\0'; /* no trailing newline */
        xmpp_message_set_body(msg, b.p);
    }
    free(b.p);
    xmpp_stanza_add_child_ex(msg, rep, 0);
    if (identify) {
        xmpp_stanza_t *addrs = xd_stanza_new("addresses", NS_ADDRESS);
        xmpp_stanza_t *a = xd_stanza_new("address", NULL);
        xmpp_stanza_set_attribute(a, "type", "ofrom");
        xmpp_stanza_set_attribute(a, "jid", r->reporter);
        xmpp_stanza_add_child_ex(addrs, a, 0);
        xmpp_stanza_add_child_ex(msg, addrs, 0);
    }
    xd_route(msg);
}

static void
forward_report(blk_conf *c, const report_ctx *r)
{
    int third = c->forward_without_opt_in || report_has(r->rep, "third-party");
    for (int i = 0; i < c->abuse.n; i++)
        forward_one(c, r, c->abuse.v[i], 1);
    /* XEP-0377 5: third parties only get what the reporter agreed to */
    for (int i = 0; third && i < c->forward.n; i++)
        forward_one(c, r, c->forward.v[i], c->forward_reporter);
}

/* XD_HOOK_BLOCKLIST_CHANGED, after the commit: other modules follow the
 * list (mod_strangers deletes what it holds from a JID the user blocked).
 * jid NULL: everything was unblocked. */
static void
announce_change(xd_event *req, const char *jid, unsigned blocked)
{
    xd_jid user = *req->to, who;
    xd_event ev;

    if (jid && xd_jid_parse(&who, jid) != 0)
        return; /* stored prepared: cannot happen */
    xd_jid_to_bare(&user);
    memset(&ev, 0, sizeof(ev));
    ev.session = req->session;
    ev.from = &user;
    ev.to = jid ? &who : NULL;
    ev.flags = blocked;
    xd_hooks_run(XD_HOOK_BLOCKLIST_CHANGED, &ev);
}

static int
do_block(blk_conf *c, xd_event *ev, blk_user *u, const char *bare, xmpp_stanza_t *el)
{
    item_list l;
    const char **fresh;
    size_t added = 0;
    xd_txn *txn = NULL;
    int ok = 1;
    unsigned long long now_us = 0;
    char when[32] = "";

    if (items_parse(c, ev, el, &l, c->reporting && c->reports) != 0)
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
    if (l.nrep) {
        /* Wall-clock time: it is written down and compared across restarts. */
        struct timespec ts;
        struct tm tm;
        long long recent;
        clock_gettime(CLOCK_REALTIME, &ts);
        now_us = (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000;
        gmtime_r(&ts.tv_sec, &tm);
        strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
        /* The hourly limit keeps reporting from flooding the abuse JIDs;
         * refused as a whole, like any bad request: nothing is blocked. */
        if (!c->max_reports_per_hour)
            recent = 0;
        else if ((recent = reports_recent(c, bare, now_us)) < 0) {
            reply_error(ev, "wait", "internal-server-error", NULL);
            goto out;
        }
        if (c->max_reports_per_hour && recent + (long long)l.nrep > c->max_reports_per_hour) {
            char text[128];
            snprintf(text, sizeof(text),
                     "at most %lld reports per hour; block without a report instead",
                     c->max_reports_per_hour);
            reply_error(ev, "wait", "policy-violation", text);
            xd_count(c->m, "reports_refused", l.nrep);
            xd_info("blocking: %zu report(s) from %s refused: %lld in the last hour", l.nrep, bare,
                    recent);
            goto out;
        }
    }
    if (added || l.nrep) {
        /* the block and its reports stand or fall together */
        ok = xd_txn_begin(&txn) == 0;
        for (size_t i = 0; ok && i < l.n; i++) {
            char key[2 * XD_JID_STR_MAX + 1];
            int klen = fresh[i] ? make_key(key, sizeof(key), bare, fresh[i]) : 0;
            if (fresh[i])
                ok = klen > 0 && xd_db_put(c->db, txn, key, (size_t)klen, NULL, 0) == 0;
        }
        for (size_t i = 0; ok && l.nrep && i < l.n; i++) {
            char key[XD_JID_STR_MAX + 1 + REPORT_KEY_TAIL];
            size_t bl = strlen(bare), vlen = 0;
            report_ctx r = {ev->to->domain, bare, l.v[i], when, l.rep[i]};
            char *val;
            if (!l.rep[i])
                continue;
            memcpy(key, bare, bl + 1);
            xd_db_put_be((unsigned char *)key + bl + 1, ~now_us, 8);
            xd_db_put_be((unsigned char *)key + bl + 9, ~(++c->report_seq) & 0xffffffffull, 4);
            ok = (val = record_text(&r, &vlen)) &&
                 xd_db_put(c->reports, txn, key, bl + 1 + REPORT_KEY_TAIL, val, vlen) == 0;
            free(val);
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
    for (size_t i = 0; i < l.n; i++)
        if (fresh[i])
            announce_change(ev, fresh[i], 1);
    for (size_t i = 0; l.nrep && i < l.n; i++) {
        report_ctx r = {ev->to->domain, bare, l.v[i], when, l.rep[i]};
        if (!l.rep[i])
            continue;
        xd_count(c->m, "reports", 1);
        xd_info("blocking: %s reported %s (%s)", bare, l.v[i],
                report_reason_name(xmpp_stanza_get_attribute(l.rep[i], "reason")));
        forward_report(c, &r);
    }
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
    unsigned char *was = NULL; /* per item: on the list before */
    size_t had = u->n;
    int ok, all;

    if (items_parse(c, ev, el, &l, 0) != 0) /* a report on an unblock means nothing */
        return XD_HANDLED;
    all = l.n == 0; /* 3.5: no items means everything */
    if (!all && !(was = calloc(l.n, 1))) {
        items_free(&l);
        reply_error(ev, "wait", "internal-server-error", NULL);
        return XD_HANDLED;
    }
    for (size_t i = 0; !all && i < l.n; i++)
        was[i] = (unsigned char)user_has(u, l.v[i]);
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
        free(was);
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
    if (all && had)
        announce_change(ev, NULL, 0);
    for (size_t i = 0; !all && i < l.n; i++)
        if (was[i])
            announce_change(ev, l.v[i], 0);
    free(was);
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
    {"reporting", XD_SETTING_BOOL},
    {"abuse_jids", XD_SETTING_STRING_LIST},
    {"forward_reports_to", XD_SETTING_STRING_LIST},
    {"forward_reporter", XD_SETTING_BOOL},
    {"forward_without_opt_in", XD_SETTING_BOOL},
    {"max_reports_per_hour", XD_SETTING_INT},
    {"max_report_text", XD_SETTING_INT},
    {NULL, 0},
};

static void
jids_free(jid_list *l)
{
    for (int i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

/* A list of forward destinations, prepared.  0 ok, -1 (reported). */
static int
jids_load(xd_module *m, const char *name, jid_list *out)
{
    int n = xd_config_list_count(m, name);
    out->v = NULL;
    out->n = 0;
    if (n <= 0)
        return 0;
    if (!(out->v = calloc((size_t)n, sizeof(char *))))
        return -1;
    for (int i = 0; i < n; i++) {
        const char *s = xd_config_list_item(m, name, i);
        char buf[XD_JID_STR_MAX];
        xd_jid j;
        if (!s || xd_jid_parse(&j, s) != 0 || xd_jid_format(&j, 1, buf, sizeof(buf)) < 0) {
            xd_config_error(m, name, "\"%s\" is not a valid JID", s ? s : "");
            return -1;
        }
        /* a served domain itself has nobody to read the message: it would bounce */
        if (!j.local[0] && !j.resource[0] && xd_is_local_host(j.domain)) {
            xd_config_error(m, name, "\"%s\" is a domain served here, not an account", s);
            return -1;
        }
        if (!(out->v[out->n] = strdup(buf)))
            return -1;
        out->n++;
    }
    return 0;
}

static int
cache_free_user(const char *bare, void *val, void *data)
{
    (void)bare;
    (void)data;
    user_free(val);
    return 0;
}

static void
blk_unload(xd_module *m)
{
    blk_conf *c = xd_module_get_data(m);
    if (!c)
        return;
    if (c->cache) {
        xd_hashtab_foreach(c->cache, cache_free_user, NULL);
        xd_hashtab_free(c->cache);
    }
    jids_free(&c->abuse);
    jids_free(&c->forward);
    free(c);
    xd_module_set_data(m, NULL);
}

static int
blk_load(xd_module *m)
{
    blk_conf *c;
    long long max = xd_config_int(m, "max_items", 1000);
    long long per_hour = xd_config_int(m, "max_reports_per_hour", 10);
    long long text = xd_config_int(m, "max_report_text", 1024);
    int r = 0;

    if (max < 1 || max > 100000) {
        xd_config_error(m, "max_items", "must be from 1 to 100000");
        return -1;
    }
    if (per_hour < 0 || per_hour > 100000) {
        xd_config_error(m, "max_reports_per_hour", "must be from 0 (no limit) to 100000");
        return -1;
    }
    if (text < 0 || text > 65536) {
        xd_config_error(m, "max_report_text", "must be from 0 to 65536 bytes");
        return -1;
    }
    if (!(c = calloc(1, sizeof(*c))))
        return -1;
    if (!(c->cache = xd_hashtab_new(64))) {
        free(c);
        return -1;
    }
    c->m = m;
    c->max_items = max;
    c->reporting = xd_config_bool(m, "reporting", 1);
    c->forward_reporter = xd_config_bool(m, "forward_reporter", 0);
    c->forward_without_opt_in = xd_config_bool(m, "forward_without_opt_in", 0);
    c->max_reports_per_hour = per_hour;
    c->max_report_text = text;
    xd_module_set_data(m, c);
    if (jids_load(m, "abuse_jids", &c->abuse) != 0 ||
        jids_load(m, "forward_reports_to", &c->forward) != 0) {
        blk_unload(m);
        return -1;
    }
    if (!(c->db = xd_db_open("blocklist")))
        return 0; /* --check-config: no store, nothing to serve */
    if (c->reporting && !(c->reports = xd_db_open("reports")))
        return -1;

    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "get", NS_BLOCKING, iq_get, c);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "set", NS_BLOCKING, iq_set, c);
    r |= xd_hook(m, XD_HOOK_DELIVER_LOCAL, blk_inbound, c, XD_PRIO_HIGH);
    r |= xd_hook(m, XD_HOOK_C2S_STANZA, blk_outbound, c, XD_PRIO_HIGH);
    r |= xd_hook(m, XD_HOOK_ROUTE, blk_route, c, XD_PRIO_HIGH);
    r |= xd_hook(m, XD_HOOK_SESSION_END, blk_session_end, c, XD_PRIO_DEFAULT);
    r |= xd_disco_add_feature(m, NS_BLOCKING);
    r |= xd_disco_add_account_feature(m, NS_BLOCKING);
    if (c->reporting) {
        /* clients look on the server's JID (Conversations) or the account's */
        r |= xd_disco_add_feature(m, NS_REPORTING);
        r |= xd_disco_add_account_feature(m, NS_REPORTING);
    }
    return r ? -1 : 0;
}

XD_MODULE(blocking) = {
    .abi = XD_MODULE_ABI,
    .name = "blocking",
    .settings = blk_settings,
    .load = blk_load,
    .unload = blk_unload,
};
