/*
 * mod_mam: XEP-0313 Message Archive Management (urn:xmpp:mam:2) for local
 * users' one-to-one messages, with XEP-0359 stanza ids.
 *
 * What is archived (XEP-0313 5): messages of type chat or normal that carry
 * a <body/>, an OMEMO <encrypted/> payload (XEP-0384, legacy and v2
 * namespaces) or a XEP-0334 <store/> hint, and no <no-store/> or
 * <no-permanent-store/> hint.  Error, groupchat and headline messages are
 * never archived (nor chat states without a body).
 *   - outgoing: XD_HOOK_C2S_STANZA, into the sender's archive (a message to
 *     the user's own bare JID is left to the incoming side, once);
 *   - incoming: XD_HOOK_DELIVER_LOCAL at XD_PRIO_DEFAULT + 1, after blocking
 *     (XD_PRIO_HIGH) refused what it refuses and before offline storage
 *     (XD_PRIO_LOW), into the recipient's archive.  The delivered (or
 *     offline-stored) message gets <stanza-id by='user' id='archive id'/>
 *     (XEP-0359 3).
 * The stanza is stored exactly as received (its serialized XML): ciphertext
 * stays ciphertext; the server never looks inside an <encrypted/> element.
 *
 * XEP-0359 4 says a server must remove stanza-ids a sender put in with its
 * own 'by'.  libstrophe 0.12 cannot delete a child, and the core delivers
 * the very stanza object the hook saw, so a spoofed <stanza-id by='user'/>
 * is neutralised in place instead: its 'by' and 'id' attributes are removed,
 * leaving an inert <stanza-id xmlns='urn:xmpp:sid:0'/> that claims nothing.
 * This happens for every message to a local user, archived or not (but a
 * message the server itself routes again: see below).
 *
 * A message can reach DELIVER_LOCAL twice: XEP-0198 (mod_smacks) routes the
 * messages a session never acknowledged again when it ends, so that
 * offline storage keeps them, and flags that routing XD_EVENT_REROUTED.
 * Such a message was archived (or not, as the preferences said) and given
 * our stanza-id on its first pass: it is neither archived again nor
 * stripped of that id, so the copy offline storage delivers keeps the id
 * the archive knows.  Only the server routes with the flag: a message from
 * a sender never has it, so a replayed message with a guessed archive id
 * is neutralised and archived like any other.
 *
 * Preferences (XEP-0313 6): default always / never / roster, with always and
 * never JID lists; a JID in <never/> wins over <always/>.  A list entry
 * matches the other party's bare JID, or its full JID when the entry has a
 * resource.  Default 'roster' archives a message (either direction) only
 * when the other party's bare JID is an item of the user's roster
 * (xd_roster_relation() & XD_ROSTER_ITEM, asked at archiving time); with no
 * roster module, or when the roster cannot be read, nobody is in it.
 *
 * Queries (XEP-0313 4): an IQ set from one of the account's own resources,
 * with an optional XEP-0004 form (with, start, end; XEP-0082 timestamps) and
 * XEP-0059 result set management (max, after, before; an empty <before/> is
 * the last page).  Results go to the requesting session as <message/>s, then
 * the <fin/> IQ result.  A page is bounded by `max_page` items and
 * PAGE_MAX_BYTES of stored XML (a smaller page then says complete='false').
 * Not implemented: <flip-page/>, RSM <index/> (feature-not-implemented),
 * ids lookup (XEP-0313 4.1.1 'ids' field), archive queries of MUC rooms.
 *
 * Storage (Berkeley DB, one transaction per archived message):
 *   mam       "user@domain\0" + 8-byte big-endian archive id
 *               -> version byte, 8-byte time (Unix microseconds),
 *                  direction byte ('i' or 'o'), 2-byte length + the other
 *                  party's prepared JID (full when it had a resource), then
 *                  version 2: the 8-byte id of the body in mam_body and the
 *                  4-byte length of its XML;
 *                  version 1 (earlier versions; still read): the XML itself
 *   mam_body  (a heap table) -> version byte, owner count byte (1 or 2),
 *               each owner as 2-byte length + "user@domain\0" + the 8-byte
 *               archive id of its record, then the stanza's XML text
 *   mam_prefs "user@domain\0" -> version byte, default ('a', 'n', 'r'),
 *               then entries: 'A' or 'N', prepared JID, NUL
 *             SWEEP_KEY -> the core's count of removed accounts at the last
 *               sweep (below)
 * A message between two local users is stored once: the sender's hook
 * stores the body with both as owners, naming the id the recipient's record
 * will have (its archive's next id), and leaves it in `memo`; the
 * recipient's hook finds the same XML there and adds only its record (if its
 * next id moved meanwhile, it stores a body of its own).  Small records and a
 * heap that only appends write less than half of what two B-tree records
 * with the XML each did (log and pages; bench/compare.py: disk B/msg).  A
 * body goes when no owner's record points to it any more: when a record is
 * pruned, and for every record of an account that is removed
 * (XD_HOOK_ACCOUNT_REMOVED).  An account removed while the server was
 * stopped (xmppctl) leaves bodies nobody points to: at the next start the
 * core's count of removed accounts (xd_account_removals) differs from the
 * one stored at the last sweep, and a sweep of the heap, SWEEP_BATCH bodies
 * per SWEEP_EVERY seconds, deletes them.
 * The archive id is the sequence as 16 hex digits; a user's ids follow each
 * other.  A new archive starts at the clock in microseconds times 256, and at
 * least START_GAP past the last archive started in this process, so ids are
 * not reused if an account is deleted (the core purges every "user\0" key)
 * and created again, and archives made together do not share ids.  The
 * next and oldest sequence and the last time come from the archive's last
 * and first records (read once, then kept in memory), so an archived message
 * costs one record write (and the body); the mam_meta table of earlier
 * versions is no longer read or written (it leaves with each account).
 * Timestamps are made strictly increasing per user, so start/end filters
 * follow archive order.  Retention (`max_messages_per_user`, `max_age_days`)
 * removes the oldest records on insert, at most PRUNE_MAX per insert; a
 * query skips records older than max_age_days anyway.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <xmppd/hashtab.h>
#include <xmppd/module.h>

#define NS_MAM "urn:xmpp:mam:2"
#define NS_SID "urn:xmpp:sid:0"
#define NS_FORWARD "urn:xmpp:forward:0"
#define NS_DELAY "urn:xmpp:delay"
#define NS_RSM "http://jabber.org/protocol/rsm"
#define NS_DATA "jabber:x:data"
#define NS_HINTS "urn:xmpp:hints"
#define NS_CLIENT "jabber:client"
#define NS_OMEMO_LEGACY "eu.siacs.conversations.axolotl"
#define NS_OMEMO "urn:xmpp:omemo:2"

#define RECORD_INLINE 1 /* the XML in the record (written by earlier versions) */
#define RECORD_REF 2    /* the XML in mam_body */
#define RECORD_FIXED 12 /* version + time + direction + with length */
#define REF_TAIL 12     /* RECORD_REF: body id + XML length, after the JID */
#define BODY_VERSION 1
#define BODY_FIXED 2 /* version + owner count */
#define START_SHIFT 8       /* a new archive's first id: the clock in us, times 256 */
#define START_GAP 65536ull  /* at least this far from the last archive started */
#define SWEEP_KEY "\0sweep" /* in mam_prefs: the removals count at the last sweep */
#define SWEEP_BATCH 500       /* bodies per sweep step: a few ms of the loop */
#define SWEEP_EVERY 0.02      /* seconds between sweep steps */
#define PREFS_VERSION 1
#define SEQ_LEN 8
#define ID_LEN 16

#define PRUNE_MAX 16                   /* records removed per insert, at most */
#define PAGE_MAX_BYTES (1024u * 1024u) /* stored XML per result page */
#define RECORD_MAX_BYTES (1024u * 1024u)
#define PREFS_MAX_JIDS 500
#define US_PER_DAY (86400LL * 1000000LL)

/* The body the sender's hook just stored for a local recipient, so the
 * recipient's hook can point to it rather than store the same XML again. */
typedef struct memo {
    char *text; /* the XML, from xmpp_stanza_to_text */
    size_t tlen;
    uint64_t body;
    unsigned long long seq;         /* the id the recipient's record needs */
    char owner[XD_JID_STR_MAX + 1]; /* the recipient's key prefix */
} memo;

typedef struct mam {
    xd_module *m;
    xd_db *arch;
    xd_db *prefs;
    xd_db *bodies;
    memo memo;
    unsigned long long next_start; /* no new archive starts below this */
    xd_timer *sweep_timer;
    uint64_t sweep_pos;
    unsigned long long sweep_removals; /* the count the running sweep will record */
    long long max_msgs;
    long long max_age_days;
    long long max_page;
    xd_hashtab *cache; /* prefix -> ucache */
    xd_timer *cache_timer;
} mam;

typedef struct meta {
    unsigned long long next_seq;
    unsigned long long oldest_seq;
    long long last_time;
} meta;

/*
 * What archiving needs for every message, kept between messages: the user's
 * archive state (as last committed) and preferences.  mod_mam is their only
 * writer in this process; an entry is dropped when a write fails, when the
 * preferences change and when the account goes, and everything every
 * CACHE_TTL seconds (xmppctl changes the store from another process).
 */
typedef struct ucache {
    unsigned have_meta : 1, have_prefs : 1;
    meta mt;
    char def;
    char *entries;
    size_t len;
    char key[];
} ucache;

#define CACHE_MAX 65536
#define CACHE_TTL 60.0

static int
cache_free_entry(const char *key, void *val, void *data)
{
    ucache *u = val;
    xd_hashtab_del(data, key);
    free(u->entries);
    free(u);
    return 0;
}

static void
cache_flush(mam *a)
{
    if (a->cache)
        xd_hashtab_foreach(a->cache, cache_free_entry, a->cache);
}

static void
cache_drop(mam *a, const char *prefix)
{
    ucache *u = a->cache ? xd_hashtab_del(a->cache, prefix) : NULL;
    if (u) {
        free(u->entries);
        free(u);
    }
}

/* The user's entry, made if missing; NULL without memory (then uncached). */
static ucache *
cache_entry(mam *a, const char *prefix)
{
    ucache *u = xd_hashtab_get(a->cache, prefix);
    size_t n = strlen(prefix);

    if (u)
        return u;
    if (xd_hashtab_count(a->cache) >= CACHE_MAX)
        cache_flush(a);
    if (!(u = calloc(1, sizeof(*u) + n + 1)))
        return NULL;
    memcpy(u->key, prefix, n + 1);
    if (xd_hashtab_put(a->cache, u->key, u) != 0) {
        free(u);
        return NULL;
    }
    return u;
}

static void
cache_timer_cb(void *data)
{
    cache_flush(data);
}

/* ---- encoding --------------------------------------------------------------------- */

static void
seq_to_id(unsigned long long seq, char out[ID_LEN + 1])
{
    snprintf(out, ID_LEN + 1, "%016llx", seq);
}

/* Archive ids are exactly 16 lower- or upper-case hex digits. */
static int
id_to_seq(const char *id, unsigned long long *seq)
{
    unsigned long long v = 0;
    if (!id || strlen(id) != ID_LEN)
        return -1;
    for (int i = 0; i < ID_LEN; i++) {
        char c = id[i];
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (d < 0)
            return -1;
        v = (v << 4) | (unsigned)d;
    }
    *seq = v;
    return 0;
}

static long long
now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

/* XEP-0082 DateTime with microseconds: 2024-05-01T12:00:00.000123Z. */
static void
format_stamp(long long us, char *buf, size_t len)
{
    time_t t = (time_t)(us / 1000000);
    struct tm tm;
    char base[32];
    if (us < 0 || !gmtime_r(&t, &tm) || !strftime(base, sizeof(base), "%Y-%m-%dT%H:%M:%S", &tm))
        snprintf(buf, len, "1970-01-01T00:00:00.000000Z");
    else
        snprintf(buf, len, "%s.%06lldZ", base, us % 1000000);
}

static int
digits(const char **p, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        char c = (*p)[i];
        if (c < '0' || c > '9')
            return -1;
        v = v * 10 + (c - '0');
    }
    *p += n;
    *out = v;
    return 0;
}

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm). */
static long long
days_from_civil(int y, int m, int d)
{
    long long yy = y - (m <= 2);
    long long era = (yy >= 0 ? yy : yy - 399) / 400;
    long long yoe = yy - era * 400;
    long long doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* XEP-0082 DateTime: CCYY-MM-DDThh:mm:ss[.sss]TZD, TZD = Z or (+|-)hh:mm.
 * Fractions beyond microseconds are ignored.  0 ok, -1 malformed. */
static int
parse_stamp(const char *s, long long *out)
{
    static const int mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int y, mo, d, h, mi, sec, frac = 0, fdigits = 0, tzh = 0, tzm = 0, sign = 0;
    const char *p = s;
    long long secs;

    if (!s || digits(&p, 4, &y) || *p++ != '-' || digits(&p, 2, &mo) || *p++ != '-' ||
        digits(&p, 2, &d) || *p++ != 'T' || digits(&p, 2, &h) || *p++ != ':' ||
        digits(&p, 2, &mi) || *p++ != ':' || digits(&p, 2, &sec))
        return -1;
    if (*p == '.') {
        p++;
        if (*p < '0' || *p > '9')
            return -1;
        for (; *p >= '0' && *p <= '9'; p++, fdigits++)
            if (fdigits < 6)
                frac = frac * 10 + (*p - '0');
        for (int i = fdigits; i < 6; i++)
            frac *= 10;
    }
    if (*p == 'Z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        sign = *p++ == '+' ? 1 : -1;
        if (digits(&p, 2, &tzh) || *p++ != ':' || digits(&p, 2, &tzm) || tzh > 23 || tzm > 59)
            return -1;
    } else {
        return -1;
    }
    if (*p || y < 1 || mo < 1 || mo > 12 || d < 1 || d > mdays[mo - 1] || h > 23 || mi > 59 ||
        sec > 59)
        return -1;
    if (mo == 2 && d == 29 && !((y % 4 == 0 && y % 100 != 0) || y % 400 == 0))
        return -1;
    secs = days_from_civil(y, mo, d) * 86400LL + h * 3600LL + mi * 60LL + sec;
    secs -= sign * (tzh * 3600LL + tzm * 60LL);
    *out = secs * 1000000LL + frac;
    return 0;
}

/* ---- stanza helpers ---------------------------------------------------------------- */

static xmpp_stanza_t *
first_tag(xmpp_stanza_t *st)
{
    xmpp_stanza_t *c = xmpp_stanza_get_children(st);
    while (c && !xmpp_stanza_is_tag(c))
        c = xmpp_stanza_get_next(c);
    return c;
}

static int
name_is(xmpp_stanza_t *st, const char *name)
{
    const char *n = xmpp_stanza_get_name(st);
    return n && strcmp(n, name) == 0;
}

static void
reply_error(xd_event *ev, const char *type, const char *cond, const char *text)
{
    xmpp_stanza_t *err = xd_error_reply(ev->stanza, type, cond, text);
    if (!err)
        return;
    if (ev->session)
        xd_session_send(ev->session, err);
    else
        xd_route(err);
}

/* ---- what is archived --------------------------------------------------------------- */

/* XEP-0313 5.1.1, XEP-0334: a one-to-one message worth keeping. */
static int
archivable(xmpp_stanza_t *st)
{
    const char *type = xmpp_stanza_get_type(st);

    if (!name_is(st, "message"))
        return 0;
    if (type && strcmp(type, "chat") != 0 && strcmp(type, "normal") != 0)
        return 0;
    if (xmpp_stanza_get_child_by_name_and_ns(st, "no-store", NS_HINTS) ||
        xmpp_stanza_get_child_by_name_and_ns(st, "no-permanent-store", NS_HINTS))
        return 0;
    return xmpp_stanza_get_child_by_name(st, "body") ||
           xmpp_stanza_get_child_by_name_and_ns(st, "encrypted", NS_OMEMO_LEGACY) ||
           xmpp_stanza_get_child_by_name_and_ns(st, "encrypted", NS_OMEMO) ||
           xmpp_stanza_get_child_by_name_and_ns(st, "store", NS_HINTS);
}

/* XEP-0359 4: strip (neutralise, see the header) stanza-ids claiming to be ours. */
static void
neutralise_stanza_ids(xmpp_stanza_t *st, const char *user_bare)
{
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(st); c; c = xmpp_stanza_get_next(c)) {
        const char *by, *ns;
        xd_jid j;
        char bare[XD_JID_STR_MAX];

        if (!xmpp_stanza_is_tag(c) || !name_is(c, "stanza-id") || !(ns = xmpp_stanza_get_ns(c)) ||
            strcmp(ns, NS_SID) != 0 || !(by = xmpp_stanza_get_attribute(c, "by")))
            continue;
        /* compare prepared forms: "ALICE@localhost" claims the same as "alice@localhost" */
        if (xd_jid_parse(&j, by) != 0 || j.resource[0] ||
            xd_jid_format(&j, 0, bare, sizeof(bare)) < 0 || strcmp(bare, user_bare) != 0)
            continue;
        xd_info("mam: neutralised a stanza-id claiming to be by %s", user_bare);
        xmpp_stanza_del_attribute(c, "by");
        if (xmpp_stanza_get_attribute(c, "id"))
            xmpp_stanza_del_attribute(c, "id");
    }
}

/* ---- preferences (XEP-0313 6) ------------------------------------------------------------- */

typedef struct prefs {
    char def;      /* 'a' always, 'n' never, 'r' roster */
    char *entries; /* 'A'/'N' + JID + NUL, repeated */
    size_t len;
} prefs;

static void
prefs_free(prefs *p)
{
    free(p->entries);
    p->entries = NULL;
    p->len = 0;
}

/* A copy of the preferences for the cache (best effort). */
static void
prefs_remember(mam *a, const char *prefix, const prefs *p)
{
    ucache *u = cache_entry(a, prefix);
    char *e = NULL;

    if (!u || (p->len && !(e = malloc(p->len))))
        return;
    if (p->len)
        memcpy(e, p->entries, p->len);
    free(u->entries);
    u->entries = e;
    u->len = p->len;
    u->def = p->def;
    u->have_prefs = 1;
}

static int prefs_read(mam *a, const char *prefix, size_t plen, prefs *out);

/* 0 ok (defaults when none stored), -1 storage error or unreadable record. */
static int
prefs_load(mam *a, const char *prefix, size_t plen, prefs *out)
{
    ucache *u = xd_hashtab_get(a->cache, prefix);

    memset(out, 0, sizeof(*out));
    if (u && u->have_prefs) {
        if (u->len && !(out->entries = malloc(u->len)))
            return -1;
        if (u->len)
            memcpy(out->entries, u->entries, u->len);
        out->len = u->len;
        out->def = u->def;
        return 0;
    }
    if (prefs_read(a, prefix, plen, out) != 0)
        return -1;
    prefs_remember(a, prefix, out);
    return 0;
}

static int
prefs_read(mam *a, const char *prefix, size_t plen, prefs *out)
{
    void *val = NULL;
    size_t vlen = 0;
    int r = xd_db_get(a->prefs, NULL, prefix, plen, &val, &vlen);
    const unsigned char *v = val;

    memset(out, 0, sizeof(*out));
    out->def = 'a';
    if (r == XD_NOTFOUND)
        return 0;
    if (r != 0)
        return -1;
    if (vlen < 2 || v[0] != PREFS_VERSION || (v[1] != 'a' && v[1] != 'n' && v[1] != 'r') ||
        (vlen > 2 && v[vlen - 1] != '\0')) {
        xd_error("mam: unreadable preferences for %s", prefix);
        free(val);
        return -1;
    }
    out->def = (char)v[1];
    out->len = vlen - 2;
    if (out->len) {
        if (!(out->entries = malloc(out->len))) {
            free(val);
            return -1;
        }
        memcpy(out->entries, v + 2, out->len);
    }
    free(val);
    return 0;
}

/* Is jid ('A' or 'N' list) in the preferences?  jid is prepared. */
static int
prefs_has(const prefs *p, char list, const char *jid)
{
    for (size_t off = 0; off < p->len;) {
        const char *e = p->entries + off;
        size_t n = strlen(e);
        if (e[0] == list && strcmp(e + 1, jid) == 0)
            return 1;
        off += n + 1;
    }
    return 0;
}

/* XEP-0313 6: is the other party (bare, prepared) in the user's roster? */
static int
in_roster(const xd_jid *user, const char *other_bare)
{
    xd_jid u = *user, o;
    int rel;
    xd_jid_to_bare(&u);
    if (xd_jid_parse(&o, other_bare) != 0)
        return 0;
    if (xd_jid_equal(&u, &o, 0))
        return 1; /* between the user's own resources: never a stranger */
    rel = xd_roster_relation(&u, &o);
    return rel > 0 && (rel & XD_ROSTER_ITEM);
}

/* Should a message between user and `other` (prepared, full or bare) go in
 * the user's archive? */
static int
prefs_allow(mam *a, const xd_jid *user, const char *prefix, size_t plen, const char *other)
{
    char bare[XD_JID_STR_MAX];
    const char *slash = strchr(other, '/');
    size_t blen = slash ? (size_t)(slash - other) : strlen(other);
    prefs p;
    int ok;

    if (prefs_load(a, prefix, plen, &p) != 0)
        return 0; /* cannot tell what the user wants: keep nothing rather than too much */
    memcpy(bare, other, blen);
    bare[blen] = '\0';
    if (prefs_has(&p, 'N', bare) || (slash && prefs_has(&p, 'N', other)))
        ok = 0;
    else if (prefs_has(&p, 'A', bare) || (slash && prefs_has(&p, 'A', other)))
        ok = 1;
    else if (p.def == 'r')
        ok = in_roster(user, bare);
    else
        ok = p.def != 'n';
    prefs_free(&p);
    return ok;
}

static const char *
def_name(char def)
{
    return def == 'n' ? "never" : def == 'r' ? "roster" : "always";
}

static xmpp_stanza_t *
prefs_element(const prefs *p)
{
    xmpp_stanza_t *el = xd_stanza_new("prefs", NS_MAM);
    xmpp_stanza_t *always = xd_stanza_new("always", NULL);
    xmpp_stanza_t *never = xd_stanza_new("never", NULL);

    xmpp_stanza_set_attribute(el, "default", def_name(p->def));
    for (size_t off = 0; off < p->len;) {
        const char *e = p->entries + off;
        xd_stanza_add_text_child(e[0] == 'A' ? always : never, "jid", e + 1);
        off += strlen(e) + 1;
    }
    xmpp_stanza_add_child_ex(el, always, 0);
    xmpp_stanza_add_child_ex(el, never, 0);
    return el;
}

/* Append the <jid/>s of an <always/> or <never/> list.  0 ok, -1 bad JID, -2 too many. */
static int
prefs_parse_list(xmpp_stanza_t *list, char tag, char **buf, size_t *len, int *count)
{
    if (!list)
        return 0;
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(list); c; c = xmpp_stanza_get_next(c)) {
        char *text;
        xd_jid j;
        char s[XD_JID_STR_MAX];
        int n;
        char *nb;

        if (!xmpp_stanza_is_tag(c))
            continue;
        if (!name_is(c, "jid"))
            return -1;
        text = xmpp_stanza_get_text(c);
        n = text && xd_jid_parse(&j, text) == 0 ? xd_jid_format(&j, 1, s, sizeof(s)) : -1;
        if (text)
            xmpp_free(xd_ctx(), text);
        if (n < 0)
            return -1;
        if (++*count > PREFS_MAX_JIDS)
            return -2;
        if (!(nb = realloc(*buf, *len + (size_t)n + 2)))
            return -2;
        *buf = nb;
        nb[*len] = tag;
        memcpy(nb + *len + 1, s, (size_t)n + 1);
        *len += (size_t)n + 2;
    }
    return 0;
}

static void
prefs_get(mam *a, xd_event *ev, const char *prefix, size_t plen)
{
    prefs p;
    xmpp_stanza_t *res;

    if (prefs_load(a, prefix, plen, &p) != 0) {
        reply_error(ev, "wait", "internal-server-error", NULL);
        return;
    }
    if ((res = xd_iq_result(ev->stanza))) {
        xmpp_stanza_add_child_ex(res, prefs_element(&p), 0);
        xd_session_send(ev->session, res);
    }
    prefs_free(&p);
}

static void
prefs_set(mam *a, xd_event *ev, xmpp_stanza_t *el, const char *prefix, size_t plen)
{
    const char *def = xmpp_stanza_get_attribute(el, "default");
    prefs p = {0};
    unsigned char *rec = NULL;
    int count = 0, r;
    xmpp_stanza_t *res;

    if (!def || (strcmp(def, "always") && strcmp(def, "never") && strcmp(def, "roster"))) {
        reply_error(ev, "modify", "bad-request", "'default' must be always, never or roster");
        return;
    }
    p.def = def[0];
    r = prefs_parse_list(xmpp_stanza_get_child_by_name(el, "always"), 'A', &p.entries, &p.len,
                         &count);
    if (r == 0)
        r = prefs_parse_list(xmpp_stanza_get_child_by_name(el, "never"), 'N', &p.entries, &p.len,
                             &count);
    if (r != 0) {
        reply_error(ev, "modify", r == -1 ? "bad-request" : "not-acceptable",
                    r == -1 ? "bad <jid/> in preferences" : "too many JIDs in preferences");
        prefs_free(&p);
        return;
    }
    if (!(rec = malloc(p.len + 2))) {
        prefs_free(&p);
        reply_error(ev, "wait", "internal-server-error", NULL);
        return;
    }
    rec[0] = PREFS_VERSION;
    rec[1] = (unsigned char)p.def;
    if (p.len)
        memcpy(rec + 2, p.entries, p.len);
    /* autocommit: one put is one transaction */
    cache_drop(a, prefix);
    if (xd_db_put(a->prefs, NULL, prefix, plen, rec, p.len + 2) != 0) {
        reply_error(ev, "wait", "internal-server-error", NULL);
    } else if ((res = xd_iq_result(ev->stanza))) {
        /* XEP-0313 6.1: the result carries the preferences now in force */
        xmpp_stanza_add_child_ex(res, prefs_element(&p), 0);
        xd_session_send(ev->session, res);
    }
    free(rec);
    prefs_free(&p);
}

/* ---- storing ------------------------------------------------------------------------------- */

/* The sequence number of an archive key (prefix + SEQ_LEN bytes). */
static int
record_known(const void *v)
{
    unsigned char ver = *(const unsigned char *)v;
    return ver == RECORD_INLINE || ver == RECORD_REF;
}

/* A RECORD_REF record's body id and XML length; 0, or -1 if it is not one. */
static int
record_ref(const unsigned char *v, size_t vlen, uint64_t *body, size_t *tlen)
{
    size_t wlen;

    if (vlen < RECORD_FIXED || v[0] != RECORD_REF)
        return -1;
    wlen = (size_t)xd_db_get_be(v + 10, 2);
    if (vlen != RECORD_FIXED + wlen + REF_TAIL)
        return -1;
    *body = xd_db_get_be(v + RECORD_FIXED + wlen, 8);
    if (tlen)
        *tlen = (size_t)xd_db_get_be(v + RECORD_FIXED + wlen + 8, 4);
    return 0;
}

static int
key_seq(const void *key, size_t klen, size_t plen, unsigned long long *seq)
{
    if (klen != plen + SEQ_LEN)
        return -1;
    *seq = xd_db_get_be((const unsigned char *)key + plen, SEQ_LEN);
    return 0;
}

/*
 * The user's archive state (next and oldest sequence, last time), from its
 * cached copy or from the archive itself: its first and last records, two
 * lookups.  Nothing else is stored, so nothing else can disagree with the
 * records after a crash.
 */
static int
meta_load(mam *a, xd_txn *txn, const char *prefix, size_t plen, meta *mt)
{
    ucache *u = xd_hashtab_get(a->cache, prefix);
    void *k = NULL, *v = NULL;
    size_t kl, vl;
    unsigned long long seq;
    int r;

    if (u && u->have_meta) {
        *mt = u->mt;
        return 0;
    }
    memset(mt, 0, sizeof(*mt));
    r = xd_db_last(a->arch, txn, prefix, plen, &k, &kl, &v, &vl);
    if (r == XD_NOTFOUND) { /* a new archive: its ids start at the clock (see the header) */
        unsigned long long start = (unsigned long long)now_us() << START_SHIFT;
        if (start < a->next_start)
            start = a->next_start;
        a->next_start = start + START_GAP;
        mt->next_seq = mt->oldest_seq = start;
        return 0;
    }
    if (r != 0 || key_seq(k, kl, plen, &seq) != 0) {
        free(k);
        free(v);
        return -1;
    }
    mt->next_seq = seq + 1;
    if (vl >= RECORD_FIXED && record_known(v))
        mt->last_time = (long long)xd_db_get_be((unsigned char *)v + 1, 8);
    free(k);
    free(v);
    if (xd_db_first(a->arch, txn, prefix, plen, &k, &kl, &v, &vl) != 0 ||
        key_seq(k, kl, plen, &seq) != 0) {
        free(k);
        free(v);
        return -1;
    }
    mt->oldest_seq = seq;
    free(k);
    free(v);
    return 0;
}

/* The owners of a body: (key prefix, archive id) pairs. */
typedef struct owner {
    const unsigned char *prefix; /* with its NUL */
    size_t plen;
    unsigned long long seq;
} owner;

/* Parse a body: up to 2 owners into o (*n of them) and the XML.  0 or -1. */
static int
body_parse(const unsigned char *b, size_t blen, owner o[2], int *n, const char **text,
           size_t *tlen)
{
    size_t pos = BODY_FIXED;

    if (blen < BODY_FIXED || b[0] != BODY_VERSION || b[1] < 1 || b[1] > 2)
        return -1;
    *n = b[1];
    for (int i = 0; i < *n; i++) {
        size_t olen;
        if (pos + 2 > blen || (olen = (size_t)xd_db_get_be(b + pos, 2)) < 2 ||
            olen > XD_JID_STR_MAX + 1 || pos + 2 + olen + SEQ_LEN > blen ||
            b[pos + 2 + olen - 1] != '\0')
            return -1;
        o[i] = (owner){b + pos + 2, olen, xd_db_get_be(b + pos + 2 + olen, SEQ_LEN)};
        pos += 2 + olen + SEQ_LEN;
    }
    if (pos >= blen)
        return -1;
    *text = (const char *)b + pos;
    *tlen = blen - pos;
    return 0;
}

/* The XML a record holds or points to: *text into *buf (free it), or -1. */
static int
record_text(mam *a, const unsigned char *v, size_t vlen, const char **text, size_t *tlen,
            void **buf)
{
    uint64_t body;
    size_t blen;
    owner o[2];
    int n;

    *buf = NULL;
    if (vlen >= RECORD_FIXED && v[0] == RECORD_INLINE) {
        size_t wlen = (size_t)xd_db_get_be(v + 10, 2);
        if (RECORD_FIXED + wlen >= vlen)
            return -1;
        *text = (const char *)v + RECORD_FIXED + wlen;
        *tlen = vlen - RECORD_FIXED - wlen;
        return 0;
    }
    if (record_ref(v, vlen, &body, NULL) != 0 ||
        xd_heap_get(a->bodies, NULL, body, buf, &blen) != 0)
        return -1;
    return body_parse(*buf, blen, o, &n, text, tlen);
}

/* Does the owner's record still point to body?  1, 0, -1. */
static int
owner_points(mam *a, xd_txn *txn, const owner *o, uint64_t body)
{
    unsigned char key[XD_JID_STR_MAX + 1 + SEQ_LEN];
    void *v = NULL;
    size_t vlen;
    uint64_t other;
    int r;

    memcpy(key, o->prefix, o->plen);
    xd_db_put_be(key + o->plen, o->seq, SEQ_LEN);
    r = xd_db_get(a->arch, txn, key, o->plen + SEQ_LEN, &v, &vlen);
    if (r == 0)
        r = record_ref(v, vlen, &other, NULL) == 0 && other == body;
    else
        r = r == XD_NOTFOUND ? 0 : -1;
    free(v);
    return r;
}

/* The record (prefix, seq) pointing to body is gone, or about to be: delete
 * the body unless another owner's record still points to it.  0 or -1. */
static int
body_release(mam *a, xd_txn *txn, uint64_t body, const unsigned char *prefix, size_t plen,
             unsigned long long seq)
{
    unsigned char *b = NULL;
    size_t blen, tlen;
    const char *text;
    owner o[2];
    int n, r, kept = 0, mine = 0;

    if ((r = xd_heap_get(a->bodies, txn, body, (void **)&b, &blen)) != 0)
        return r == XD_NOTFOUND ? 0 : -1;
    if (body_parse(b, blen, o, &n, &text, &tlen) != 0) {
        free(b);
        xd_error("mam: body %llu is unreadable; kept", (unsigned long long)body);
        return 0;
    }
    for (int i = 0; i < n && !kept; i++) {
        if (o[i].plen == plen && !memcmp(o[i].prefix, prefix, plen) && o[i].seq == seq) {
            mine = 1;
            continue;
        }
        if ((r = owner_points(a, txn, &o[i], body)) < 0) {
            free(b);
            return -1;
        }
        kept = r;
    }
    free(b);
    if (kept || !mine)
        return 0; /* still used, or not the body this record named */
    if (xd_heap_del(a->bodies, txn, body) < 0)
        return -1;
    xd_count(a->m, "bodies_deleted", 1);
    return 0;
}

/* Delete one record (key = prefix + id) and release its body.  0, XD_NOTFOUND, -1. */
static int
record_delete(mam *a, xd_txn *txn, const unsigned char *key, size_t plen,
              const unsigned char *v, size_t vlen)
{
    uint64_t body;
    int r;

    if ((r = xd_db_del(a->arch, txn, key, plen + SEQ_LEN)) != 0)
        return r;
    if (v && record_ref(v, vlen, &body, NULL) == 0)
        return body_release(a, txn, body, key, plen, xd_db_get_be(key + plen, SEQ_LEN));
    return 0;
}

/* Retention: drop the oldest records over the count or age limit, a bounded
 * number per insert; `keep` (the new record) is never dropped. */
static int
prune(mam *a, xd_txn *txn, const char *prefix, size_t plen, meta *mt, unsigned long long keep)
{
    unsigned char key[XD_JID_STR_MAX + 1 + SEQ_LEN];
    long long cutoff = a->max_age_days ? now_us() - a->max_age_days * US_PER_DAY : 0;

    memcpy(key, prefix, plen);
    for (int n = 0; n < PRUNE_MAX && mt->oldest_seq < keep; n++) {
        unsigned long long count = mt->next_seq - mt->oldest_seq;
        void *val = NULL;
        size_t vlen = 0;
        int r;

        if ((long long)count <= a->max_msgs && !cutoff)
            break;
        xd_db_put_be(key + plen, mt->oldest_seq, SEQ_LEN);
        r = xd_db_get(a->arch, txn, key, plen + SEQ_LEN, &val, &vlen);
        if (r < 0)
            return -1;
        if ((long long)count <= a->max_msgs) {
            long long t = r == 0 && vlen >= RECORD_FIXED
                              ? (long long)xd_db_get_be((unsigned char *)val + 1, 8)
                              : 0;
            if (r == 0 && t >= cutoff) {
                free(val);
                break;
            }
        }
        r = r == 0 ? record_delete(a, txn, key, plen, val, vlen) : 0;
        free(val);
        if (r < 0)
            return -1;
        mt->oldest_seq++;
    }
    return 0;
}

/* The body record: version, owner count, owners, then the XML. */
static unsigned char *
body_record(const owner *o, int n, const char *text, size_t tlen, size_t *len)
{
    size_t size = BODY_FIXED + tlen, pos = BODY_FIXED;
    unsigned char *b;

    for (int i = 0; i < n; i++)
        size += 2 + o[i].plen + SEQ_LEN;
    if (!(b = malloc(size)))
        return NULL;
    b[0] = BODY_VERSION;
    b[1] = (unsigned char)n;
    for (int i = 0; i < n; i++) {
        xd_db_put_be(b + pos, o[i].plen, 2);
        memcpy(b + pos + 2, o[i].prefix, o[i].plen);
        xd_db_put_be(b + pos + 2 + o[i].plen, o[i].seq, SEQ_LEN);
        pos += 2 + o[i].plen + SEQ_LEN;
    }
    memcpy(b + pos, text, tlen);
    *len = size;
    return b;
}

/*
 * Store the XML text in the user's archive: one transaction with the record,
 * and the body unless *body names one already (a shared body, which
 * expects this archive's next id to be `want`; if it is not, a body of its
 * own is stored instead).  `other` is a second owner for a new body (a local
 * recipient); *other_seq is then the id its record will need.  0 with
 * *seq_out and *body, or -1.
 */
static int
archive_store(mam *a, const char *prefix, size_t plen, char dir, const char *with,
              const char *text, size_t tlen, const char *other, unsigned long long *other_seq,
              unsigned long long want, uint64_t *body, unsigned long long *seq_out)
{
    unsigned char key[XD_JID_STR_MAX + 1 + SEQ_LEN], *rec = NULL, *brec = NULL;
    size_t wlen = strlen(with), rlen, blen;
    xd_txn *txn = NULL;
    meta mt;
    long long t;

    if (wlen > 0xffff || tlen > 0xffffffffu)
        return -1;
    rlen = RECORD_FIXED + wlen + REF_TAIL;
    if (RECORD_FIXED + wlen + tlen > RECORD_MAX_BYTES) {
        xd_info("mam: %s: a %zu byte message is over the archive's record limit", prefix, tlen);
        return -1;
    }
    if (!(rec = malloc(rlen)))
        return -1;
    if (xd_txn_begin(&txn) != 0)
        goto fail;
    if (meta_load(a, txn, prefix, plen, &mt) != 0)
        goto abort;
    if (*body && want != mt.next_seq)
        *body = 0; /* not the id the body expects: a body of our own */
    if (*body) { /* still there, and still naming this record */
        void *v = NULL;
        size_t vlen = 0, xlen;
        const char *x;
        owner o[2];
        int n, r = xd_heap_get(a->bodies, txn, *body, &v, &vlen), named = 0;
        if (r < 0)
            goto abort;
        if (r == 0 && body_parse(v, vlen, o, &n, &x, &xlen) == 0)
            for (int i = 0; i < n; i++)
                named |= o[i].plen == plen && !memcmp(o[i].prefix, prefix, plen) &&
                         o[i].seq == want;
        free(v);
        if (!named)
            *body = 0;
    }
    if (!*body) {
        owner o[2] = {{(const unsigned char *)prefix, plen, mt.next_seq}};
        meta om;
        int n = 1;
        if (other && meta_load(a, txn, other, strlen(other) + 1, &om) == 0) {
            ucache *u = cache_entry(a, other); /* so its hook finds the same next id */
            if (u && !u->have_meta) {
                u->mt = om;
                u->have_meta = 1;
            }
            o[n++] = (owner){(const unsigned char *)other, strlen(other) + 1, om.next_seq};
            *other_seq = om.next_seq;
        }
        if (!(brec = body_record(o, n, text, tlen, &blen)) ||
            xd_heap_add(a->bodies, txn, brec, blen, body) != 0)
            goto abort;
        xd_count(a->m, "bodies_added", 1);
    }
    t = now_us();
    if (t <= mt.last_time)
        t = mt.last_time + 1; /* strictly increasing: time order is archive order */
    rec[0] = RECORD_REF;
    xd_db_put_be(rec + 1, (unsigned long long)t, 8);
    rec[9] = (unsigned char)dir;
    xd_db_put_be(rec + 10, wlen, 2);
    memcpy(rec + RECORD_FIXED, with, wlen);
    xd_db_put_be(rec + RECORD_FIXED + wlen, *body, 8);
    xd_db_put_be(rec + RECORD_FIXED + wlen + 8, tlen, 4);
    memcpy(key, prefix, plen);
    xd_db_put_be(key + plen, mt.next_seq, SEQ_LEN);
    *seq_out = mt.next_seq;
    mt.next_seq++;
    mt.last_time = t;
    if (xd_db_put(a->arch, txn, key, plen + SEQ_LEN, rec, rlen) != 0 ||
        prune(a, txn, prefix, plen, &mt, *seq_out) != 0)
        goto abort;
    free(rec);
    free(brec);
    rec = brec = NULL;
    /* committed before the hook returns (durable before anything says so) */
    if (xd_txn_commit(txn) != 0)
        goto fail;
    {
        ucache *u = cache_entry(a, prefix);
        if (u) {
            u->mt = mt;
            u->have_meta = 1;
        }
    }
    xd_debug("mam: archived %016llx for %s (%c, with %s)", *seq_out, prefix, dir, with);
    return 0;
abort:
    xd_txn_abort(txn);
fail:
    free(rec);
    free(brec);
    *body = 0;
    cache_drop(a, prefix); /* read it again from what was committed */
    if (other)
        cache_drop(a, other);
    xd_error("mam: %s: could not archive a message", prefix);
    return -1;
}

static void
memo_clear(mam *a)
{
    if (a->memo.text)
        xmpp_free(xd_ctx(), a->memo.text);
    memset(&a->memo, 0, sizeof(a->memo));
}

/*
 * XD_HOOK_C2S_STANZA: the user's outgoing message, into the sender's archive.
 * The most expensive hook on the message path: about 44,000 instructions
 * (callgrind, sample config): the serialization 13,000, one transaction with
 * the record and the body 29,000 (the preferences and the archive state come
 * from memory).  The commit does not wait for the disk.  For a local
 * recipient the body is stored for both (see `memo`).
 */
static int
mam_outgoing(xd_event *ev, void *data)
{
    mam *a = data;
    char prefix[XD_JID_STR_MAX + 1], with[XD_JID_STR_MAX], other[XD_JID_STR_MAX + 1];
    size_t plen, tlen = 0;
    unsigned long long seq, other_seq = 0;
    uint64_t body = 0;
    char *text = NULL;
    int local;
    xd_jid bare, to;

    if (!ev->stanza || !ev->from || !ev->to || !archivable(ev->stanza))
        return XD_PASS;
    bare = *ev->from;
    xd_jid_to_bare(&bare);
    /* to oneself: the incoming side archives it, once */
    if (xd_jid_equal(&bare, ev->to, 0))
        return XD_PASS;
    if (!(plen = xd_db_user_prefix(&bare, prefix, sizeof(prefix))) ||
        xd_jid_format(ev->to, ev->to->resource[0] != '\0', with, sizeof(with)) < 0)
        return XD_PASS;
    if (!prefs_allow(a, &bare, prefix, plen, with))
        return XD_PASS;
    if (xmpp_stanza_to_text(ev->stanza, &text, &tlen) != XMPP_EOK || !text)
        return XD_PASS;
    to = *ev->to;
    xd_jid_to_bare(&to);
    local = to.local[0] && xd_is_local_host(to.domain) &&
            xd_db_user_prefix(&to, other, sizeof(other)) > 0;
    if (archive_store(a, prefix, plen, 'o', with, text, tlen, local ? other : NULL, &other_seq,
                      0, &body, &seq) == 0 && local && other_seq) {
        memo_clear(a);
        a->memo = (memo){text, tlen, body, other_seq, ""};
        memcpy(a->memo.owner, other, strlen(other) + 1);
        return XD_PASS; /* the memo has the text now */
    }
    xmpp_free(xd_ctx(), text);
    return XD_PASS; /* archiving never stops a message */
}

static int
any_session(xd_session *s, void *data)
{
    (void)s;
    (void)data;
    return 1;
}

/* XD_HOOK_DELIVER_LOCAL: a message for a local user, into the recipient's archive.
 * About 48,000 instructions, as mam_outgoing plus the stanza-id; for a
 * message from a local user, whose body the sender's hook stored, the
 * serialization and one small record. */
static int
mam_incoming(xd_event *ev, void *data)
{
    mam *a = data;
    xmpp_stanza_t *st = ev->stanza;
    char prefix[XD_JID_STR_MAX + 1], with[XD_JID_STR_MAX], id[ID_LEN + 1];
    size_t plen, tlen = 0;
    unsigned long long seq, want = 0;
    uint64_t body = 0;
    char *text = NULL;
    xmpp_stanza_t *sid;
    xd_jid bare;
    int r;

    if (!st || !ev->to || !ev->to->local[0] || !name_is(st, "message"))
        return XD_PASS;
    bare = *ev->to;
    xd_jid_to_bare(&bare);
    if (!(plen = xd_db_user_prefix(&bare, prefix, sizeof(prefix))))
        return XD_PASS;
    /* Routed again (XEP-0198: unacknowledged by a session that ended): it
     * was judged, archived and given our stanza-id on its first pass, and
     * any stanza-id spoofing us was neutralised then.  Only the server sets
     * this flag, so everything that comes from a sender is checked below. */
    if (ev->flags & XD_EVENT_REROUTED) {
        xd_debug("mam: %s: a message routed again is archived already", prefix);
        return XD_PASS;
    }
    neutralise_stanza_ids(st, prefix);
    if (!ev->from || !archivable(st) ||
        xd_jid_format(ev->from, ev->from->resource[0] != '\0', with, sizeof(with)) < 0)
        return XD_PASS;
    /* a bound session proves the account; else ask storage (the core bounces the rest) */
    if (xd_user_sessions(&bare, any_session, NULL) == 0 && xd_account_exists(&bare) != 1)
        return XD_PASS;
    if (!prefs_allow(a, &bare, prefix, plen, with) ||
        xmpp_stanza_to_text(st, &text, &tlen) != XMPP_EOK || !text)
        return XD_PASS;
    /* the sender's hook stored this very XML for us too? */
    if (a->memo.text && a->memo.tlen == tlen && !strcmp(a->memo.owner, prefix) &&
        !memcmp(a->memo.text, text, tlen)) {
        body = a->memo.body;
        want = a->memo.seq;
    }
    memo_clear(a);
    r = archive_store(a, prefix, plen, 'i', with, text, tlen, NULL, NULL, want, &body, &seq);
    xmpp_free(xd_ctx(), text);
    if (r != 0)
        return XD_PASS;
    /* XEP-0359 3: tell the recipient the id it will find in its archive */
    seq_to_id(seq, id);
    if ((sid = xd_stanza_new("stanza-id", NS_SID))) {
        xmpp_stanza_set_attribute(sid, "by", prefix);
        xmpp_stanza_set_attribute(sid, "id", id);
        xmpp_stanza_add_child_ex(st, sid, 0);
    }
    return XD_PASS; /* delivery (or offline storage) goes on */
}

/* ---- queries (XEP-0313 4) -------------------------------------------------------------------- */

typedef struct filter {
    char with[XD_JID_STR_MAX];
    size_t with_len;
    int with_full;    /* match the stored JID exactly, not its bare part */
    long long start;  /* inclusive, or -1 */
    long long end;    /* inclusive, or -1 */
    long long cutoff; /* max_age_days, or 0 */
} filter;

typedef struct page_item {
    unsigned long long seq;
    size_t vlen;
} page_item;

typedef struct scan {
    const filter *f;
    size_t plen;
    int has_after, has_before;
    unsigned long long after, before; /* before: only when has_before and not last page */
    int before_last;
    long long max;
    page_item *items;          /* max entries; a ring when paging backwards */
    unsigned long long total;  /* matching the filter */
    unsigned long long pre;    /* matching, at or before 'after' */
    unsigned long long window; /* matching, inside after/before */
} scan;

static int
record_matches(const filter *f, const unsigned char *v, size_t vlen)
{
    long long t;
    size_t wlen;
    const char *w;

    if (vlen < RECORD_FIXED || !record_known(v))
        return 0;
    t = (long long)xd_db_get_be(v + 1, 8);
    wlen = (size_t)xd_db_get_be(v + 10, 2);
    if (RECORD_FIXED + wlen > vlen)
        return 0;
    if ((f->start >= 0 && t < f->start) || (f->end >= 0 && t > f->end) ||
        (f->cutoff && t < f->cutoff))
        return 0;
    if (f->with_len) {
        w = (const char *)v + RECORD_FIXED;
        if (!f->with_full) {
            const char *slash = memchr(w, '/', wlen);
            if (slash)
                wlen = (size_t)(slash - w);
        }
        if (wlen != f->with_len || memcmp(w, f->with, wlen) != 0)
            return 0;
    }
    return 1;
}

static int
scan_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    scan *s = data;
    unsigned long long seq;

    uint64_t body;
    size_t tlen;

    if (klen != s->plen + SEQ_LEN || !record_matches(s->f, val, vlen))
        return 0;
    if (record_ref(val, vlen, &body, &tlen) == 0)
        vlen = tlen; /* the page's byte budget counts the XML */
    seq = xd_db_get_be((const unsigned char *)key + s->plen, SEQ_LEN);
    s->total++;
    if (s->has_after && seq <= s->after) {
        s->pre++;
        return 0;
    }
    if (s->has_before && !s->before_last && seq >= s->before)
        return 0;
    s->window++;
    if (s->max <= 0)
        return 0;
    if (!s->has_before) {
        if (s->window <= (unsigned long long)s->max)
            s->items[s->window - 1] = (page_item){seq, vlen};
    } else {
        s->items[(s->window - 1) % (unsigned long long)s->max] = (page_item){seq, vlen};
    }
    return 0;
}

/* Does this archive id name a record of the user's?  1 yes, 0 no, -1 error. */
static int
id_exists(mam *a, const char *prefix, size_t plen, unsigned long long seq)
{
    unsigned char key[XD_JID_STR_MAX + 1 + SEQ_LEN];
    void *val = NULL;
    size_t vlen;
    int r;

    memcpy(key, prefix, plen);
    xd_db_put_be(key + plen, seq, SEQ_LEN);
    r = xd_db_get(a->arch, NULL, key, plen + SEQ_LEN, &val, &vlen);
    free(val);
    return r == 0 ? 1 : r == XD_NOTFOUND ? 0 : -1;
}

/* The single <value/> of a form field, or NULL (none, or more than one: *bad). */
static char *
field_value(xmpp_stanza_t *field, int *bad)
{
    xmpp_stanza_t *v = NULL;
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(field); c; c = xmpp_stanza_get_next(c)) {
        if (!xmpp_stanza_is_tag(c) || !name_is(c, "value"))
            continue;
        if (v) {
            *bad = 1;
            return NULL;
        }
        v = c;
    }
    return v ? xmpp_stanza_get_text(v) : NULL;
}

/* XEP-0313 4.1.1: FORM_TYPE, with, start, end.  NULL ok, else the error text. */
static const char *
parse_form(xmpp_stanza_t *x, filter *f)
{
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(x); c; c = xmpp_stanza_get_next(c)) {
        const char *var, *err = NULL;
        char *val;
        int bad = 0;

        if (!xmpp_stanza_is_tag(c) || !name_is(c, "field"))
            continue;
        if (!(var = xmpp_stanza_get_attribute(c, "var")))
            return "a form field without 'var'";
        val = field_value(c, &bad);
        if (bad) {
            err = "more than one value in a field";
        } else if (!strcmp(var, "FORM_TYPE")) {
            if (!val || strcmp(val, NS_MAM) != 0)
                err = "FORM_TYPE must be " NS_MAM;
        } else if (!strcmp(var, "with")) {
            xd_jid j;
            int n;
            if (!val || xd_jid_parse(&j, val) != 0 ||
                (n = xd_jid_format(&j, j.resource[0] != '\0', f->with, sizeof(f->with))) <= 0)
                err = "'with' is not a valid JID";
            else {
                f->with_len = (size_t)n;
                f->with_full = j.resource[0] != '\0';
            }
        } else if (!strcmp(var, "start") || !strcmp(var, "end")) {
            long long t;
            if (!val || parse_stamp(val, &t) != 0)
                err = "'start' and 'end' must be XEP-0082 timestamps";
            else if (var[0] == 's')
                f->start = t;
            else
                f->end = t;
        } else {
            err = "unsupported form field";
        }
        if (val)
            xmpp_free(xd_ctx(), val);
        if (err)
            return err;
    }
    return NULL;
}

/* The RSM text of a child of <set/>, or NULL when absent; *present says if it was there. */
static char *
rsm_text(xmpp_stanza_t *set, const char *name, int *present)
{
    xmpp_stanza_t *el = set ? xmpp_stanza_get_child_by_name(set, name) : NULL;
    char *t;
    *present = el != NULL;
    if (!el)
        return NULL;
    t = xmpp_stanza_get_text(el);
    return t;
}

/* One <message><result><forwarded><delay/><message/>... for the requester:
 * the stored record v and the XML it holds or points to. */
static xmpp_stanza_t *
result_message(mam *a, const char *to, const char *from, const char *queryid,
               unsigned long long seq, const unsigned char *v, size_t vlen)
{
    char id[ID_LEN + 1], stamp[40];
    const char *xml = NULL;
    size_t tlen = 0;
    void *buf = NULL;
    char *text;
    xmpp_stanza_t *inner, *msg, *res, *fwd, *delay;

    if (record_text(a, v, vlen, &xml, &tlen, &buf) != 0 || !tlen || !(text = malloc(tlen + 1))) {
        free(buf);
        xd_error("mam: %s: archived message %016llx is unreadable; left out", from, seq);
        return NULL;
    }
    memcpy(text, xml, tlen);
    text[tlen] = '\0';
    free(buf);
    inner = xd_stanza_parse(text, strlen(text));
    free(text);
    if (!inner || !name_is(inner, "message")) {
        xd_error("mam: %s: archived message %016llx is unreadable; left out", from, seq);
        if (inner)
            xmpp_stanza_release(inner);
        return NULL;
    }
    if (!xmpp_stanza_get_ns(inner))
        xmpp_stanza_set_ns(inner, NS_CLIENT); /* else it would inherit forward:0 */
    seq_to_id(seq, id);
    format_stamp((long long)xd_db_get_be(v + 1, 8), stamp, sizeof(stamp));
    msg = xd_stanza_new("message", NULL);
    res = xd_stanza_new("result", NS_MAM);
    fwd = xd_stanza_new("forwarded", NS_FORWARD);
    delay = xd_stanza_new("delay", NS_DELAY);
    xmpp_stanza_set_to(msg, to);
    xmpp_stanza_set_from(msg, from);
    if (queryid)
        xmpp_stanza_set_attribute(res, "queryid", queryid);
    xmpp_stanza_set_attribute(res, "id", id);
    xmpp_stanza_set_attribute(delay, "stamp", stamp);
    xmpp_stanza_add_child_ex(fwd, delay, 0);
    xmpp_stanza_add_child_ex(fwd, inner, 0);
    xmpp_stanza_add_child_ex(res, fwd, 0);
    xmpp_stanza_add_child_ex(msg, res, 0);
    return msg;
}

static void
query_run(mam *a, xd_event *ev, xmpp_stanza_t *query, const char *prefix, size_t plen)
{
    const char *queryid = xmpp_stanza_get_attribute(query, "queryid");
    xmpp_stanza_t *x = xmpp_stanza_get_child_by_name_and_ns(query, "x", NS_DATA);
    xmpp_stanza_t *set = xmpp_stanza_get_child_by_name_and_ns(query, "set", NS_RSM);
    filter f = {.with_len = 0, .start = -1, .end = -1};
    scan s = {0};
    char *max_t, *after_t, *before_t, requester[XD_JID_STR_MAX];
    int max_p, after_p, before_p, index_p, r;
    const char *err = NULL, *cond = "bad-request";
    size_t first = 0, n = 0, bytes = 0;
    int complete;
    xmpp_stanza_t *res, *fin, *rset;

    f.cutoff = a->max_age_days ? now_us() - a->max_age_days * US_PER_DAY : 0;
    if (x)
        err = parse_form(x, &f);
    max_t = rsm_text(set, "max", &max_p);
    after_t = rsm_text(set, "after", &after_p);
    before_t = rsm_text(set, "before", &before_p);
    index_p = set && xmpp_stanza_get_child_by_name(set, "index") != NULL;
    s.max = a->max_page;
    if (!err && max_p) {
        char *end = NULL;
        long long v = max_t ? strtoll(max_t, &end, 10) : -1;
        if (!max_t || !*max_t || *end || v < 0)
            err = "<max/> must be a non-negative integer";
        else if (v < s.max)
            s.max = v;
    }
    if (!err && index_p) {
        err = "<index/> is not supported";
        cond = "feature-not-implemented";
    }
    if (!err && after_p) {
        s.has_after = 1;
        if (!after_t || id_to_seq(after_t, &s.after) != 0 ||
            (r = id_exists(a, prefix, plen, s.after)) == 0) {
            err = "no such archive id in <after/>";
            cond = "item-not-found";
        } else if (r < 0) {
            err = "storage error";
            cond = "internal-server-error";
        }
    }
    if (!err && before_p) {
        s.has_before = 1;
        if (!before_t || !*before_t) {
            s.before_last = 1; /* XEP-0059 2.5: the last page */
        } else if (id_to_seq(before_t, &s.before) != 0 ||
                   (r = id_exists(a, prefix, plen, s.before)) == 0) {
            err = "no such archive id in <before/>";
            cond = "item-not-found";
        } else if (r < 0) {
            err = "storage error";
            cond = "internal-server-error";
        }
    }
    if (max_t)
        xmpp_free(xd_ctx(), max_t);
    if (after_t)
        xmpp_free(xd_ctx(), after_t);
    if (before_t)
        xmpp_free(xd_ctx(), before_t);
    if (err) {
        reply_error(ev, strcmp(cond, "internal-server-error") ? "modify" : "wait", cond, err);
        return;
    }

    s.f = &f;
    s.plen = plen;
    if (s.max > 0 && !(s.items = calloc((size_t)s.max, sizeof(*s.items)))) {
        reply_error(ev, "wait", "internal-server-error", NULL);
        return;
    }
    if (xd_db_foreach(a->arch, NULL, prefix, plen, scan_visit, &s) < 0) {
        free(s.items);
        reply_error(ev, "wait", "internal-server-error", NULL);
        return;
    }
    /* the page: items[first .. first+n) in archive order (a ring when backwards) */
    n = s.max > 0
            ? (size_t)(s.window < (unsigned long long)s.max ? s.window : (unsigned long long)s.max)
            : 0;
    if (s.has_before && n)
        first = (size_t)((s.window - n) % (unsigned long long)s.max);
    complete = s.window <= (unsigned long long)(s.max > 0 ? s.max : 0);
    {
        /* the byte budget trims the far end of the page: the end when paging
         * forwards, the beginning when paging backwards */
        size_t keep = 0;
        for (size_t i = 0; i < n; i++) {
            size_t k = s.has_before ? n - 1 - i : i;
            size_t vlen = s.items[(first + k) % (size_t)s.max].vlen;
            if (keep && bytes + vlen > PAGE_MAX_BYTES)
                break;
            bytes += vlen;
            keep++;
        }
        if (keep < n) {
            complete = 0;
            if (s.has_before)
                first = (first + (n - keep)) % (size_t)s.max;
            n = keep;
        }
    }

    xd_jid_format(ev->from, 1, requester, sizeof(requester));
    res = xd_iq_result(ev->stanza);
    fin = xd_stanza_new("fin", NS_MAM);
    rset = xd_stanza_new("set", NS_RSM);
    xmpp_stanza_set_attribute(fin, "complete", complete ? "true" : "false");
    {
        char id[ID_LEN + 1], num[24];
        unsigned long long index = s.pre + (s.has_before ? s.window - n : 0);
        int sent = 0;
        for (size_t i = 0; i < n; i++) {
            unsigned long long seq = s.items[(first + i) % (size_t)s.max].seq;
            unsigned char key[XD_JID_STR_MAX + 1 + SEQ_LEN];
            void *val = NULL;
            size_t vlen = 0;
            xmpp_stanza_t *msg;

            memcpy(key, prefix, plen);
            xd_db_put_be(key + plen, seq, SEQ_LEN);
            if (xd_db_get(a->arch, NULL, key, plen + SEQ_LEN, &val, &vlen) != 0) {
                free(val);
                continue;
            }
            msg = result_message(a, requester, prefix, queryid, seq, val, vlen);
            free(val);
            if (msg && xd_session_send(ev->session, msg) != 0)
                break; /* the requester is gone */
            sent++;
        }
        if (n) {
            xmpp_stanza_t *fel = xd_stanza_new("first", NULL);
            xmpp_stanza_t *t = xmpp_stanza_new(xd_ctx());
            seq_to_id(s.items[first % (size_t)s.max].seq, id);
            snprintf(num, sizeof(num), "%llu", index);
            xmpp_stanza_set_attribute(fel, "index", num);
            xmpp_stanza_set_text(t, id);
            xmpp_stanza_add_child_ex(fel, t, 0);
            xmpp_stanza_add_child_ex(rset, fel, 0);
            seq_to_id(s.items[(first + n - 1) % (size_t)s.max].seq, id);
            xd_stanza_add_text_child(rset, "last", id);
        }
        snprintf(num, sizeof(num), "%llu", s.total);
        xd_stanza_add_text_child(rset, "count", num);
        xd_debug("mam: %s: query sent %d of %zu item(s), %llu matching, complete=%d", prefix, sent,
                 n, s.total, complete);
    }
    xmpp_stanza_add_child_ex(fin, rset, 0);
    xmpp_stanza_add_child_ex(res, fin, 0);
    xd_session_send(ev->session, res);
    free(s.items);
}

/* XEP-0313 4.1.1: the form a client may fill in. */
static void
query_form(xd_event *ev)
{
    static const char *const fields[][2] = {
        {"jid-single", "with"}, {"text-single", "start"}, {"text-single", "end"}};
    xmpp_stanza_t *res = xd_iq_result(ev->stanza);
    xmpp_stanza_t *q = xd_stanza_new("query", NS_MAM);
    xmpp_stanza_t *x = xd_stanza_new("x", NS_DATA);
    xmpp_stanza_t *ft = xd_stanza_new("field", NULL);

    xmpp_stanza_set_type(x, "form");
    xmpp_stanza_set_type(ft, "hidden");
    xmpp_stanza_set_attribute(ft, "var", "FORM_TYPE");
    xd_stanza_add_text_child(ft, "value", NS_MAM);
    xmpp_stanza_add_child_ex(x, ft, 0);
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        xmpp_stanza_t *f = xd_stanza_new("field", NULL);
        xmpp_stanza_set_type(f, fields[i][0]);
        xmpp_stanza_set_attribute(f, "var", fields[i][1]);
        xmpp_stanza_add_child_ex(x, f, 0);
    }
    xmpp_stanza_add_child_ex(q, x, 0);
    xmpp_stanza_add_child_ex(res, q, 0);
    xd_session_send(ev->session, res);
}

/* Only the account's own resources, on their own streams, may read or
 * change its archive.  Fills the key prefix; 0 ok, -1 answered forbidden. */
static int
authorize(xd_event *ev, char *prefix, size_t len, size_t *plen)
{
    xd_jid bare;

    if (!ev->from || !ev->to || !ev->session || xd_session_type(ev->session) != XD_STREAM_C2S ||
        !xd_jid_equal(ev->from, ev->to, 0) ||
        !xd_jid_equal(xd_session_jid(ev->session), ev->from, 1)) {
        reply_error(ev, "auth", "forbidden", "only the account itself may use its archive");
        return -1;
    }
    bare = *ev->to;
    xd_jid_to_bare(&bare);
    if (!(*plen = xd_db_user_prefix(&bare, prefix, len))) {
        reply_error(ev, "modify", "bad-request", NULL);
        return -1;
    }
    return 0;
}

static int
mam_iq(xd_event *ev, void *data)
{
    mam *a = data;
    xmpp_stanza_t *el = first_tag(ev->stanza);
    int set = !strcmp(xmpp_stanza_get_type(ev->stanza), "set");
    char prefix[XD_JID_STR_MAX + 1];
    size_t plen;

    if (authorize(ev, prefix, sizeof(prefix), &plen) != 0)
        return XD_HANDLED;
    if (name_is(el, "query"))
        set ? query_run(a, ev, el, prefix, plen) : query_form(ev);
    else if (name_is(el, "prefs"))
        set ? prefs_set(a, ev, el, prefix, plen) : prefs_get(a, ev, prefix, plen);
    else
        reply_error(ev, "cancel", "feature-not-implemented", NULL);
    return XD_HANDLED;
}

/* ---- the module ---------------------------------------------------------------------------------
 */

static const xd_setting mam_settings[] = {
    {"max_messages_per_user", XD_SETTING_INT},
    {"max_age_days", XD_SETTING_INT},
    {"max_page", XD_SETTING_INT},
    {NULL, 0},
};

typedef struct ref_list {
    unsigned long long *seq;
    uint64_t *body;
    size_t n, cap;
    int oom;
} ref_list;

static int
collect_ref(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    ref_list *l = data;
    uint64_t body;

    (void)klen;
    if (record_ref(val, vlen, &body, NULL) != 0)
        return 0;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        unsigned long long *s = realloc(l->seq, cap * sizeof(*s));
        uint64_t *b = s ? realloc(l->body, cap * sizeof(*b)) : NULL;
        if (s)
            l->seq = s;
        if (!b) {
            l->oom = 1;
            return 1;
        }
        l->body = b;
        l->cap = cap;
    }
    l->seq[l->n] = xd_db_get_be((const unsigned char *)key + klen - SEQ_LEN, SEQ_LEN);
    l->body[l->n++] = body;
    return 0;
}

/*
 * XD_HOOK_ACCOUNT_REMOVED: the core purges the records right after; the
 * bodies only this account points to go now (those a local contact's
 * archive shares stay), and our copies are forgotten.  One transaction;
 * work in proportion to the archive (max_messages_per_user bounds it).
 */
static int
mam_account_removed(xd_event *ev, void *data)
{
    mam *a = data;
    char prefix[XD_JID_STR_MAX + 1];
    size_t plen;
    ref_list l = {0};
    xd_txn *txn = NULL;
    int r = 0;

    if (!(plen = xd_db_user_prefix(ev->from, prefix, sizeof(prefix))))
        return XD_PASS;
    cache_drop(a, prefix);
    if (!strcmp(a->memo.owner, prefix))
        memo_clear(a);
    if (xd_db_foreach(a->arch, NULL, prefix, plen, collect_ref, &l) < 0 || l.oom ||
        xd_txn_begin(&txn) != 0) {
        r = -1;
    } else {
        for (size_t i = 0; i < l.n && r == 0; i++)
            r = body_release(a, txn, l.body[i], (const unsigned char *)prefix, plen, l.seq[i]);
        if (r == 0)
            r = xd_txn_commit(txn);
        else
            xd_txn_abort(txn);
    }
    if (r != 0) /* the sweep at the next start collects them */
        xd_error("mam: %s: could not delete the archived bodies; they go at the next start",
                 prefix);
    free(l.seq);
    free(l.body);
    return XD_PASS;
}

/* ---- the sweep: bodies nobody points to (accounts removed while stopped) ----------------- */

static int
sweep_visit(uint64_t id, const void *val, size_t vlen, void *data)
{
    mam *a = data;
    const char *text;
    size_t tlen;
    owner o[2];
    int n, r, used = 0;

    if (body_parse(val, vlen, o, &n, &text, &tlen) != 0)
        return 0; /* unreadable: kept, never deleted on a guess */
    for (int i = 0; i < n && !used; i++) {
        if ((r = owner_points(a, NULL, &o[i], id)) < 0)
            return -1;
        used = r;
    }
    if (!used) {
        if (xd_heap_del(a->bodies, NULL, id) < 0)
            return -1;
        xd_count(a->m, "bodies_swept", 1);
    }
    return 0;
}

static void
sweep_step(void *data)
{
    mam *a = data;
    unsigned char v[8];
    int r = xd_heap_scan(a->bodies, &a->sweep_pos, SWEEP_BATCH, sweep_visit, a);

    if (r == 0)
        return; /* more next time */
    xd_timer_stop(a->sweep_timer);
    a->sweep_timer = NULL;
    if (r != XD_NOTFOUND) {
        xd_error("mam: the sweep of unused bodies failed; it runs again at the next start");
        return;
    }
    xd_db_put_be(v, a->sweep_removals, 8);
    if (xd_db_put(a->prefs, NULL, SWEEP_KEY, sizeof(SWEEP_KEY) - 1, v, sizeof(v)) != 0)
        xd_error("mam: could not record the sweep");
    xd_info("mam: swept the archive's bodies");
}

/* Accounts were removed since the last sweep (without us): start one. */
static int
sweep_start(mam *a)
{
    unsigned long long removed, swept = 0;
    void *v = NULL;
    size_t vlen = 0;
    int r;

    if (xd_account_removals(&removed) != 0)
        return -1;
    r = xd_db_get(a->prefs, NULL, SWEEP_KEY, sizeof(SWEEP_KEY) - 1, &v, &vlen);
    if (r == 0 && vlen == 8)
        swept = xd_db_get_be(v, 8);
    free(v);
    if (r < 0)
        return -1;
    if (removed == swept)
        return 0;
    a->sweep_removals = removed;
    a->sweep_pos = 0;
    xd_info("mam: %llu account(s) removed since the last sweep; sweeping unused bodies",
            removed - swept);
    return (a->sweep_timer = xd_timer_start(a->m, SWEEP_EVERY, SWEEP_EVERY, sweep_step, a))
               ? 0
               : -1;
}

static int
mam_load(xd_module *m)
{
    long long max_msgs = xd_config_int(m, "max_messages_per_user", 10000);
    long long max_age = xd_config_int(m, "max_age_days", 0);
    long long max_page = xd_config_int(m, "max_page", 100);
    mam *a;
    int r = 0;

    if (max_msgs < 1 || max_msgs > 10000000) {
        xd_config_error(m, "max_messages_per_user", "must be from 1 to 10000000");
        return -1;
    }
    if (max_age < 0 || max_age > 36500) {
        xd_config_error(m, "max_age_days", "must be from 0 (unlimited) to 36500");
        return -1;
    }
    if (max_page < 1 || max_page > 1000) {
        xd_config_error(m, "max_page", "must be from 1 to 1000");
        return -1;
    }
    if (!(a = calloc(1, sizeof(*a))))
        return -1;
    a->m = m;
    a->max_msgs = max_msgs;
    a->max_age_days = max_age;
    a->max_page = max_page;
    xd_module_set_data(m, a);

    a->arch = xd_db_open("mam");
    if (!a->arch) {
        xd_debug("mam: storage not open, archiving disabled"); /* xmppd --check-config */
        return 0;
    }
    if (!(a->prefs = xd_db_open("mam_prefs")) || !(a->bodies = xd_heap_open("mam_body")))
        return -1; /* the store is open, these tables are not: fail closed */
    if (!(a->cache = xd_hashtab_new(1024)) ||
        !(a->cache_timer = xd_timer_start(m, CACHE_TTL, CACHE_TTL, cache_timer_cb, a)))
        return -1;
    if (sweep_start(a) != 0)
        return -1;
    r |= xd_hook(m, XD_HOOK_ACCOUNT_REMOVED, mam_account_removed, a, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_C2S_STANZA, mam_outgoing, a, XD_PRIO_LOW);
    r |= xd_hook(m, XD_HOOK_DELIVER_LOCAL, mam_incoming, a, XD_PRIO_DEFAULT + 1);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "get", NS_MAM, mam_iq, a);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "set", NS_MAM, mam_iq, a);
    r |= xd_disco_add_account_feature(m, NS_MAM);
    r |= xd_disco_add_account_feature(m, NS_SID);
    return r ? -1 : 0;
}

static void
mam_unload(xd_module *m)
{
    mam *a = xd_module_get_data(m);

    if (a && a->cache) {
        cache_flush(a);
        xd_hashtab_free(a->cache);
    }
    if (a && a->cache_timer)
        xd_timer_stop(a->cache_timer);
    if (a && a->sweep_timer)
        xd_timer_stop(a->sweep_timer);
    if (a)
        memo_clear(a);
    free(a);
}

XD_MODULE(mam) = {
    .abi = XD_MODULE_ABI,
    .name = "mam",
    .settings = mam_settings,
    .load = mam_load,
    .unload = mam_unload,
};
