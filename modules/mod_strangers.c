/*
 * mod_strangers: messages from strangers are held until the user accepts
 * the sender.
 *
 * A stranger, for a local user, is a JID that is not in the user's roster
 * (RFC 6121 2.1.2.5: no item, no subscription in either direction, no
 * pending outbound request; an unanswered inbound request alone does not
 * make it known) and that the user never wrote to.  A chat or normal
 * message from a stranger that carries a body or an end-to-end encrypted
 * payload (XEP-0384 OMEMO, XEP-0373 OpenPGP, XEP-0027) is not delivered
 * (RFC 6121 8.5.2): it is held, durably, before MAM (XEP-0313), carbons
 * (XEP-0280) and offline storage (XEP-0160) see it, so it is neither
 * archived nor stored offline until released.  Everything else (groupchat,
 * headline, error, body-less notifications, presence) is left alone;
 * subscription requests are mod_roster's (RFC 6121 3).
 *
 * The user is told once per stranger (while that stranger has messages
 * held) with a notice, by default a normal message from the server's JID
 * (see notice_send for why not a subscription request), at most one notice
 * per notice_interval: strangers that write in between are named together
 * in the next one, sent by a timer when the interval ends (at most
 * NOTICE_NAMED of them by name, the rest counted).  The user may then:
 *   - accept: add the sender to the roster, accept its subscription request
 *     or ask for its presence (XD_HOOK_ROSTER_CHANGED: relation now known),
 *     write to it (the user started a conversation), or run the XEP-0050
 *     command "approve".  The held messages are routed again, oldest first,
 *     each with a XEP-0203 <delay/> saying when the server received it, and
 *     go through the normal path (MAM, carbons, offline storage).
 *   - reject: the XEP-0050 command "reject", denying the sender's
 *     subscription request (the roster relation drops back to none), or
 *     blocking the sender (XEP-0191 3.3, XD_HOOK_BLOCKLIST_CHANGED once
 *     mod_blocking has committed the block): the held messages are deleted.
 *   - look: XEP-0050 commands "list" (senders) and "fetch" (a sender's
 *     messages, as a XEP-0004 result form).
 * No message is lost silently: when the user's quota is full the oldest
 * held message makes room and goes back to its sender as a
 * <resource-constraint/> error (RFC 6120 8.3.3.18, type wait); one not
 * accepted within max_age goes back as <service-unavailable/> (type cancel:
 * 8.3.3.19 forbids <recipient-unavailable/> towards an entity that may not
 * know the user's availability, which a stranger may not).  Each is counted.
 * Rejected messages (the user said no: the "reject" command, a denied
 * request, a block) are deleted without an error, which would confirm to a
 * spammer that the address is read.
 *
 * A released message is not held again because the sender is known by
 * the time it is routed: the roster change is committed before
 * XD_HOOK_ROSTER_CHANGED runs, the user's reply and the "approve" command
 * record the sender as known (and release nothing when that fails), and the
 * catch-up at login releases only senders known for certain.
 *
 * Storage (Berkeley DB, one transaction per change, committed before the
 * sender's stanza counts as taken):
 *   strangers         "user\0" + 8-byte big-endian sequence
 *                       -> version (1), arrival time (8, Unix seconds, BE),
 *                          sender length (2, BE), sender bare JID, the
 *                          stanza's XML as received
 *   strangers_meta    "user\0" -> the user's account of them: version (1),
 *                          records (4), bytes (8), next sequence (8), time
 *                          of the last notice (8), senders not told yet (4)
 *                     "user\0sender" -> version (1), records (4), told (1)
 *   strangers_expiry  arrival time (8) + "user\0" + sequence (8) -> empty:
 *                       the oldest first, so the sweep reads only what
 *                       expired and starts where the last batch stopped
 *   strangers_known   "user\0contact" -> time (8, BE): contacts the user
 *                       wrote to or accepted without a roster item
 * All but the expiry index are keyed with the user's bare JID and a NUL, so
 * an account's records leave with it; its index entries are deleted on
 * XD_HOOK_ACCOUNT_REMOVED (and the sweep drops any that point nowhere).
 * Sequences only grow, so key order is arrival order.  The meta records
 * make holding a message cost point reads (plus one positioned read per
 * message that makes room), and a login one read when nothing is held (one
 * short record per sender otherwise), instead of reading every held
 * message; records written before they existed are counted once, when the
 * user's meta record is first needed.  Listing, reading, accepting and
 * rejecting read the user's held messages: the user asked, and the quota
 * bounds them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <xmppd/module.h>

#define NS_DELAY "urn:xmpp:delay"
#define NS_HINTS "urn:xmpp:hints"
#define NS_DATA "jabber:x:data"
#define NS_OMEMO_LEGACY "eu.siacs.conversations.axolotl"
#define NS_OMEMO2 "urn:xmpp:omemo:2"
#define NS_OX "urn:xmpp:openpgp:0"
#define NS_PGP_LEGACY "jabber:x:encrypted"
#define FORM_TYPE "urn:xmppd:strangers"

#define NODE_LIST "urn:xmppd:strangers:list"
#define NODE_FETCH "urn:xmppd:strangers:fetch"
#define NODE_APPROVE "urn:xmppd:strangers:approve"
#define NODE_REJECT "urn:xmppd:strangers:reject"

#define RECORD_VERSION 1
#define RECORD_HEADER 11 /* version, time (8), sender length (2) */
#define META_VERSION 1
/* version, records (4), bytes (8), next sequence (8), last notice (8), untold (4) */
#define USER_META_LEN 33
#define SENDER_META_LEN 6 /* version, records (4), told (1) */
#define SEQ_LEN 8
#define TIME_LEN 8
#define KEY_MAX (2 * XD_JID_STR_MAX + 2)
#define HELD_KEY_MAX (XD_JID_STR_MAX + 1 + SEQ_LEN)
#define INDEX_KEY_MAX (TIME_LEN + HELD_KEY_MAX)

/* XD_HOOK_BLOCKLIST_CHANGED flags: the JID was blocked (not unblocked). */
#define BLOCKLIST_BLOCKED 1u

/* A client's command session id, echoed back (XEP-0050 3.4). */
#define SESSIONID_MAX 64
/* Values one submitted form may carry: a list-multi of senders. */
#define MAX_FORM_VALUES 100
/* Bytes of message text one "fetch" answer carries, so the answer stays a
 * reasonable stanza whatever the quota; the rest shows once released. */
#define FETCH_MAX_BYTES (256u * 1024u)
/* Senders a notice names; the others are counted (the "list" command has
 * them all): a server message is a phishing vehicle for the JIDs in it. */
#define NOTICE_NAMED 5
/* One sweep step (one transaction, one event-loop callback): at most this
 * many expired records and bytes; the next step follows shortly. */
#define SWEEP_BATCH 128
#define SWEEP_BATCH_BYTES (4u * 1024u * 1024u)
#define SWEEP_STEP 0.05

/* Relations that make a contact known (RFC 6121 2.1.2.5). */
#define ROSTER_KNOWN (XD_ROSTER_ITEM | XD_ROSTER_FROM | XD_ROSTER_TO | XD_ROSTER_PENDING_OUT)

/* What a returned message says to its sender. */
#define TEXT_QUOTA "the recipient's queue of messages from unknown senders is full"
#define TEXT_EXPIRED "not accepted by the recipient in time"

enum { NOTICE_MESSAGE = 0, NOTICE_SUBSCRIBE, NOTICE_NONE };
enum { CMD_LIST = 0, CMD_FETCH, CMD_APPROVE, CMD_REJECT, CMD_COUNT };

typedef struct strangers strangers;

typedef struct command {
    strangers *sp;
    int kind;
} command;

/* A user whose next notice waits for notice_interval to end.  What it will
 * say is in storage (the senders not told yet): memory per user is this. */
typedef struct pending {
    strangers *sp;
    xd_timer *timer;
    char user[]; /* bare JID */
} pending;

struct strangers {
    xd_module *m;
    xd_db *held; /* NULL under --check-config: the module then does nothing */
    xd_db *meta;
    xd_db *expiry;
    xd_db *known;
    int enabled;
    int exempt_local;
    int notice;
    char **hosts; /* prepared domains it applies to; NULL: every served host */
    int nhosts;
    long long quota, quota_bytes, max_size, max_age, max_known, sweep_interval;
    long long notice_interval;
    xd_timer *sweep;      /* every sweep_interval */
    xd_timer *sweep_next; /* the next step of a sweep that had more to do */
    xd_hashtab *pend;     /* users with a notice due later: bare JID -> pending */
    unsigned long notice_seq;
    unsigned long cmd_seq;
    command cmds[CMD_COUNT];
};

/* ---- small helpers -------------------------------------------------------------------- */

static int
bare_str(const xd_jid *j, char *buf, size_t len)
{
    return xd_jid_format(j, 0, buf, len) < 0 ? -1 : 0;
}

static int
parse_bare(const char *s, xd_jid *j)
{
    if (!s || xd_jid_parse(j, s) != 0)
        return -1;
    xd_jid_to_bare(j);
    return 0;
}

/* The domain part of a bare JID string. */
static const char *
domain_of(const char *bare)
{
    const char *at = strchr(bare, '@');
    return at ? at + 1 : bare;
}

static int
is_type(xmpp_stanza_t *st, const char *t)
{
    const char *v = xmpp_stanza_get_type(st);
    return v && !strcmp(v, t);
}

/* RFC 6121 5.2.2: no type is "normal". */
static int
chat_or_normal(xmpp_stanza_t *st)
{
    const char *t = xmpp_stanza_get_type(st);
    return !t || !strcmp(t, "chat") || !strcmp(t, "normal");
}

static int
ns_is(xmpp_stanza_t *el, const char *ns)
{
    const char *v = xmpp_stanza_get_ns(el);
    return v && !strcmp(v, ns);
}

/* A message someone means a person to read: a body, or an encrypted
 * payload.  An OMEMO element without <payload/> is a key transport that
 * clients send on their own, not a message. */
static int
has_content(xmpp_stanza_t *st)
{
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(st); c; c = xmpp_stanza_get_next(c)) {
        const char *name, *ns;
        if (!xmpp_stanza_is_tag(c) || !(name = xmpp_stanza_get_name(c)))
            continue;
        ns = xmpp_stanza_get_ns(c);
        if (!strcmp(name, "body") &&
            (!ns || !strcmp(ns, "jabber:client") || !strcmp(ns, "jabber:server")))
            return 1;
        if (!strcmp(name, "encrypted") && (ns_is(c, NS_OMEMO_LEGACY) || ns_is(c, NS_OMEMO2)) &&
            xmpp_stanza_get_child_by_name(c, "payload"))
            return 1;
        if ((!strcmp(name, "openpgp") && ns_is(c, NS_OX)) ||
            (!strcmp(name, "x") && ns_is(c, NS_PGP_LEGACY)))
            return 1;
    }
    return 0;
}

static int
host_enabled(const strangers *sp, const char *domain)
{
    if (!sp->enabled)
        return 0;
    if (!sp->hosts)
        return 1;
    for (int i = 0; i < sp->nhosts; i++)
        if (!strcmp(sp->hosts[i], domain))
            return 1;
    return 0;
}

static int
expired(const strangers *sp, long long when, long long now)
{
    return sp->max_age > 0 && when + sp->max_age <= now;
}

static void
add_text(xmpp_stanza_t *parent, const char *text)
{
    xmpp_stanza_t *t = xmpp_stanza_new(xd_ctx());
    xmpp_stanza_set_text(t, text);
    xmpp_stanza_add_child_ex(parent, t, 0);
}

static xmpp_stanza_t *
text_el(const char *name, const char *ns, const char *text)
{
    xmpp_stanza_t *el = xd_stanza_new(name, ns);
    add_text(el, text);
    return el;
}

/* XEP-0203: <delay xmlns='urn:xmpp:delay' from='domain' stamp='...Z'/>. */
static void
format_stamp(long long when, char *buf, size_t len)
{
    time_t t = (time_t)when;
    struct tm tm;
    if (!gmtime_r(&t, &tm) || !strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm))
        snprintf(buf, len, "1970-01-01T00:00:00Z");
}

static void
add_delay(xmpp_stanza_t *st, const char *domain, long long when)
{
    char stamp[32];
    xmpp_stanza_t *d = xd_stanza_new("delay", NS_DELAY);
    format_stamp(when, stamp, sizeof(stamp));
    xmpp_stanza_set_attribute(d, "from", domain);
    xmpp_stanza_set_attribute(d, "stamp", stamp);
    xmpp_stanza_add_child_ex(st, d, 0);
}

/* "user\0" + a sub-key (a contact or sender bare JID). */
static size_t
sub_key(char *key, const char *prefix, size_t plen, const char *contact)
{
    size_t cl = strlen(contact);
    memcpy(key, prefix, plen);
    memcpy(key + plen, contact, cl);
    return plen + cl;
}

/* ---- held records --------------------------------------------------------------------- */

/* The parts of a stored record. */
typedef struct rec_view {
    long long when;
    const char *sender; /* not NUL-terminated */
    size_t slen;
    const char *xml;
    size_t xlen;
} rec_view;

/* 0 when the record is one this version reads, -1 otherwise. */
static int
rec_parse(const void *val, size_t vlen, rec_view *out)
{
    const unsigned char *v = val;
    size_t slen;

    if (vlen < RECORD_HEADER || v[0] != RECORD_VERSION)
        return -1;
    slen = (size_t)xd_db_get_be(v + 1 + TIME_LEN, 2);
    if (slen == 0 || slen >= XD_JID_STR_MAX || RECORD_HEADER + slen >= vlen ||
        memchr(v + RECORD_HEADER, '\0', slen))
        return -1;
    out->when = (long long)xd_db_get_be(v + 1, TIME_LEN);
    out->sender = (const char *)v + RECORD_HEADER;
    out->slen = slen;
    out->xml = out->sender + slen;
    out->xlen = vlen - RECORD_HEADER - slen;
    return 0;
}

typedef struct held_rec {
    unsigned long long seq;
    long long when;
    size_t vlen;
    char *sender; /* NULL: unreadable record (kept, never delivered) */
    char *xml;    /* only when asked for */
    int gone;     /* to be deleted */
} held_rec;

typedef struct held_list {
    held_rec *v;
    size_t n, cap;
    size_t plen;
    const char *only; /* this sender only (NULL: all) */
    int want_xml;
    int failed;
} held_list;

static void
held_free(held_list *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i].sender);
        free(l->v[i].xml);
    }
    free(l->v);
    l->v = NULL;
    l->n = l->cap = 0;
}

static int
held_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    held_list *l = data;
    held_rec r;
    rec_view rv;
    int readable;

    if (klen != l->plen + SEQ_LEN)
        return 0; /* not one of ours: leave it alone */
    memset(&r, 0, sizeof(r));
    r.seq = xd_db_get_be((const unsigned char *)key + l->plen, SEQ_LEN);
    r.vlen = vlen;
    readable = rec_parse(val, vlen, &rv) == 0;
    if (l->only &&
        (!readable || strlen(l->only) != rv.slen || memcmp(l->only, rv.sender, rv.slen) != 0))
        return 0;
    if (readable) {
        r.when = rv.when;
        if (!(r.sender = strndup(rv.sender, rv.slen)))
            goto oom;
        if (l->want_xml && !(r.xml = strndup(rv.xml, rv.xlen)))
            goto oom;
    }
    if (l->n == l->cap) {
        size_t nc = l->cap ? 2 * l->cap : 16;
        held_rec *nv = realloc(l->v, nc * sizeof(*nv));
        if (!nv)
            goto oom;
        l->v = nv;
        l->cap = nc;
    }
    l->v[l->n++] = r;
    return 0;
oom:
    free(r.sender);
    free(r.xml);
    l->failed = 1;
    return 1;
}

/* A user's held records (or one sender's), in arrival order.  0 ok, -1.
 * For the user's own requests (list, read, accept, reject): bounded by the
 * quota, and not on the path of every message. */
static int
held_load(strangers *sp, xd_txn *txn, const char *prefix, size_t plen, const char *only,
          int want_xml, held_list *l)
{
    memset(l, 0, sizeof(*l));
    l->plen = plen;
    l->only = only;
    l->want_xml = want_xml;
    if (xd_db_foreach(sp->held, txn, prefix, plen, held_visit, l) < 0 || l->failed) {
        held_free(l);
        return -1;
    }
    return 0;
}

/* ---- the account of what a user has held ---------------------------------------------- */

typedef struct user_meta {
    unsigned long count;         /* records held */
    unsigned long long bytes;    /* their size */
    unsigned long long next_seq; /* of the next record */
    long long last_notice;       /* when the user was last told (0: never) */
    unsigned long untold;        /* senders the user was not told about yet */
} user_meta;

/* 0, XD_NOTFOUND (also for a record this version cannot read), -1. */
static int
meta_get(strangers *sp, xd_txn *txn, const char *prefix, size_t plen, user_meta *um)
{
    unsigned char *v = NULL;
    size_t vlen = 0;
    int r = xd_db_get(sp->meta, txn, prefix, plen, (void **)&v, &vlen);

    memset(um, 0, sizeof(*um));
    if (r != 0)
        return r < 0 ? -1 : XD_NOTFOUND;
    if (vlen != USER_META_LEN || v[0] != META_VERSION) {
        free(v);
        return XD_NOTFOUND;
    }
    um->count = (unsigned long)xd_db_get_be(v + 1, 4);
    um->bytes = xd_db_get_be(v + 5, 8);
    um->next_seq = xd_db_get_be(v + 13, 8);
    um->last_notice = (long long)xd_db_get_be(v + 21, 8);
    um->untold = (unsigned long)xd_db_get_be(v + 29, 4);
    free(v);
    return 0;
}

static int
meta_put(strangers *sp, xd_txn *txn, const char *prefix, size_t plen, const user_meta *um)
{
    unsigned char v[USER_META_LEN];
    v[0] = META_VERSION;
    xd_db_put_be(v + 1, um->count, 4);
    xd_db_put_be(v + 5, um->bytes, 8);
    xd_db_put_be(v + 13, um->next_seq, 8);
    xd_db_put_be(v + 21, (unsigned long long)um->last_notice, 8);
    xd_db_put_be(v + 29, um->untold, 4);
    return xd_db_put(sp->meta, txn, prefix, plen, v, sizeof(v)) == 0 ? 0 : -1;
}

/* A sender's count of held records (0: none) and whether the user was told. */
static int
sender_get(strangers *sp, xd_txn *txn, const char *prefix, size_t plen, const char *sender,
           unsigned long *count, int *told)
{
    char key[KEY_MAX];
    unsigned char *v = NULL;
    size_t vlen = 0;
    int r = xd_db_get(sp->meta, txn, key, sub_key(key, prefix, plen, sender), (void **)&v, &vlen);

    *count = 0;
    *told = 0;
    if (r < 0)
        return -1;
    if (r == 0 && vlen == SENDER_META_LEN && v[0] == META_VERSION) {
        *count = (unsigned long)xd_db_get_be(v + 1, 4);
        *told = v[5] != 0;
    }
    free(v);
    return 0;
}

static int
sender_put(strangers *sp, xd_txn *txn, const char *prefix, size_t plen, const char *sender,
           unsigned long count, int told)
{
    char key[KEY_MAX];
    unsigned char v[SENDER_META_LEN];
    size_t klen = sub_key(key, prefix, plen, sender);

    if (!count)
        return xd_db_del(sp->meta, txn, key, klen) < 0 ? -1 : 0;
    v[0] = META_VERSION;
    xd_db_put_be(v + 1, count, 4);
    v[5] = told ? 1 : 0;
    return xd_db_put(sp->meta, txn, key, klen, v, sizeof(v)) == 0 ? 0 : -1;
}

static size_t
held_key(unsigned char *key, const char *prefix, size_t plen, unsigned long long seq)
{
    memcpy(key, prefix, plen);
    xd_db_put_be(key + plen, seq, SEQ_LEN);
    return plen + SEQ_LEN;
}

static size_t
index_key(unsigned char *key, long long when, const char *prefix, size_t plen,
          unsigned long long seq)
{
    xd_db_put_be(key, (unsigned long long)when, TIME_LEN);
    return TIME_LEN + held_key(key + TIME_LEN, prefix, plen, seq);
}

/* Store a record and account for it.  *fresh: the sender had nothing held,
 * so the user is yet to be told about it. */
static int
rec_add(strangers *sp, xd_txn *txn, const char *prefix, size_t plen, user_meta *um, long long when,
        const char *sender, const unsigned char *rec, size_t rlen, int *fresh)
{
    unsigned char key[HELD_KEY_MAX], ikey[INDEX_KEY_MAX];
    unsigned long long seq = um->next_seq++;
    unsigned long count;
    int told;

    if (xd_db_put(sp->held, txn, key, held_key(key, prefix, plen, seq), rec, rlen) != 0 ||
        xd_db_put(sp->expiry, txn, ikey, index_key(ikey, when, prefix, plen, seq), NULL, 0) != 0 ||
        sender_get(sp, txn, prefix, plen, sender, &count, &told) != 0)
        return -1;
    *fresh = count == 0;
    if (*fresh) {
        told = sp->notice == NOTICE_NONE; /* no notice will ever name it */
        if (!told)
            um->untold++;
    }
    um->count++;
    um->bytes += rlen;
    return sender_put(sp, txn, prefix, plen, sender, count + 1, told);
}

/* Delete a record (rv NULL: unreadable) and take it off the account. */
static int
rec_remove(strangers *sp, xd_txn *txn, const char *prefix, size_t plen, user_meta *um,
           unsigned long long seq, size_t vlen, const rec_view *rv)
{
    unsigned char key[HELD_KEY_MAX], ikey[INDEX_KEY_MAX];
    char sender[XD_JID_STR_MAX];
    unsigned long count;
    int told;

    if (xd_db_del(sp->held, txn, key, held_key(key, prefix, plen, seq)) < 0)
        return -1;
    um->count -= um->count > 0;
    um->bytes -= vlen < um->bytes ? vlen : um->bytes;
    if (!rv)
        return 0; /* its index entry, if any, points nowhere now: the sweep drops it */
    if (xd_db_del(sp->expiry, txn, ikey, index_key(ikey, rv->when, prefix, plen, seq)) < 0)
        return -1;
    memcpy(sender, rv->sender, rv->slen);
    sender[rv->slen] = '\0';
    if (sender_get(sp, txn, prefix, plen, sender, &count, &told) != 0)
        return -1;
    if (!count)
        return 0;
    if (count == 1 && !told && um->untold)
        um->untold--; /* nothing left to tell about */
    return sender_put(sp, txn, prefix, plen, sender, count - 1, told);
}

typedef struct rebuild {
    strangers *sp;
    xd_txn *txn;
    const char *prefix;
    size_t plen;
    user_meta *um;
    int failed;
} rebuild;

static int
rebuild_clear(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    rebuild *rb = data;
    (void)val;
    (void)vlen;
    if (klen > rb->plen && xd_db_del(rb->sp->meta, rb->txn, key, klen) < 0) {
        rb->failed = 1;
        return 1;
    }
    return 0;
}

static int
rebuild_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    rebuild *rb = data;
    unsigned char ikey[INDEX_KEY_MAX];
    char sender[XD_JID_STR_MAX];
    unsigned long long seq;
    unsigned long count;
    rec_view rv;
    int told;

    if (klen != rb->plen + SEQ_LEN)
        return 0;
    seq = xd_db_get_be((const unsigned char *)key + rb->plen, SEQ_LEN);
    if (seq >= rb->um->next_seq)
        rb->um->next_seq = seq + 1;
    rb->um->count++;
    rb->um->bytes += vlen;
    if (rec_parse(val, vlen, &rv) != 0)
        return 0;
    memcpy(sender, rv.sender, rv.slen);
    sender[rv.slen] = '\0';
    if (xd_db_put(rb->sp->expiry, rb->txn, ikey,
                  index_key(ikey, rv.when, rb->prefix, rb->plen, seq), NULL, 0) != 0 ||
        sender_get(rb->sp, rb->txn, rb->prefix, rb->plen, sender, &count, &told) != 0 ||
        sender_put(rb->sp, rb->txn, rb->prefix, rb->plen, sender, count + 1, 1) != 0) {
        rb->failed = 1;
        return 1;
    }
    return 0;
}

/*
 * The user's account, in txn.  Without one (no stranger ever wrote, or the
 * records predate it, or it is unreadable) it is counted from the records:
 * usually none, one cursor positioning; their senders count as told, as
 * the version that stored them told the user at once.  The caller writes it
 * back with its change.  *existed (if not NULL): it was stored, not counted.
 */
static int
meta_load(strangers *sp, xd_txn *txn, const char *prefix, size_t plen, user_meta *um, int *existed)
{
    rebuild rb = {sp, txn, prefix, plen, um, 0};
    int r = meta_get(sp, txn, prefix, plen, um);

    if (existed)
        *existed = r == 0;
    if (r != XD_NOTFOUND)
        return r;
    if (xd_db_foreach(sp->meta, txn, prefix, plen, rebuild_clear, &rb) < 0 || rb.failed ||
        xd_db_foreach(sp->held, txn, prefix, plen, rebuild_visit, &rb) < 0 || rb.failed)
        return -1;
    if (um->count)
        xd_info("strangers: %s: counted %lu held message(s) without an account", prefix, um->count);
    return 0;
}

/* The user's oldest record: a prefix scan stopped at the first key. */
typedef struct oldest {
    size_t plen;
    unsigned long long seq;
    void *val;
    size_t vlen;
} oldest;

static int
oldest_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    oldest *o = data;
    if (klen != o->plen + SEQ_LEN)
        return 0;
    if (!(o->val = malloc(vlen ? vlen : 1)))
        return -1;
    memcpy(o->val, val, vlen);
    o->vlen = vlen;
    o->seq = xd_db_get_be((const unsigned char *)key + o->plen, SEQ_LEN);
    return 1;
}

/* Delete the records of l marked gone, in one transaction.  0 ok, -1. */
static int
held_remove_gone(strangers *sp, const char *prefix, size_t plen, held_list *l)
{
    user_meta um;
    xd_txn *txn;

    if (xd_txn_begin(&txn) != 0)
        return -1;
    if (meta_load(sp, txn, prefix, plen, &um, NULL) != 0)
        goto fail;
    for (size_t i = 0; i < l->n; i++) {
        held_rec *r = &l->v[i];
        rec_view rv = {r->when, r->sender, r->sender ? strlen(r->sender) : 0, NULL, 0};
        if (r->gone &&
            rec_remove(sp, txn, prefix, plen, &um, r->seq, r->vlen, r->sender ? &rv : NULL) != 0)
            goto fail;
    }
    if (meta_put(sp, txn, prefix, plen, &um) != 0)
        goto fail;
    return xd_txn_commit(txn) == 0 ? 0 : -1;
fail:
    xd_txn_abort(txn);
    return -1;
}

/* ---- returning messages to their senders ---------------------------------------------- */

enum { BOUNCE_QUOTA = 0, BOUNCE_EXPIRED };

/* Errors to send once the deletion they report is committed: a sender is
 * never told "not delivered" about a message that is still held. */
typedef struct bounce_list {
    xmpp_stanza_t **v;
    unsigned char *why;
    size_t n, cap;
} bounce_list;

/* Rebuild the stored stanza to answer its sender.  One that cannot be read
 * cannot be answered: the log says so.  0 ok, -1 out of memory (the caller
 * then gives up the change, and nothing is lost). */
static int
bounce_add(bounce_list *b, const char *xml, size_t xlen, int why, const char *user)
{
    xmpp_stanza_t *st = xml ? xd_stanza_parse(xml, xlen) : NULL;
    const char *name = st ? xmpp_stanza_get_name(st) : NULL;

    if (!name || strcmp(name, "message") != 0) {
        xd_error("strangers: %s: an unreadable held message was %s; its sender cannot be told",
                 user, why == BOUNCE_QUOTA ? "dropped" : "expired");
        if (st)
            xmpp_stanza_release(st);
        return 0;
    }
    if (b->n == b->cap) {
        size_t nc = b->cap ? 2 * b->cap : 8;
        xmpp_stanza_t **nv = realloc(b->v, nc * sizeof(*nv));
        unsigned char *nw = nv ? realloc(b->why, nc) : NULL;
        if (nv)
            b->v = nv;
        if (!nw) {
            xmpp_stanza_release(st);
            return -1;
        }
        b->why = nw;
        b->cap = nc;
    }
    b->v[b->n] = st;
    b->why[b->n++] = (unsigned char)why;
    return 0;
}

static void
bounce_discard(bounce_list *b)
{
    for (size_t i = 0; i < b->n; i++)
        xmpp_stanza_release(b->v[i]);
    free(b->v);
    free(b->why);
    memset(b, 0, sizeof(*b));
}

static void
bounce_send(bounce_list *b)
{
    for (size_t i = 0; i < b->n; i++) {
        if (b->why[i] == BOUNCE_QUOTA)
            xd_bounce(b->v[i], "wait", "resource-constraint", TEXT_QUOTA);
        else
            xd_bounce(b->v[i], "cancel", "service-unavailable", TEXT_EXPIRED);
    }
    bounce_discard(b);
}

/* ---- known contacts ------------------------------------------------------------------- */

/* 1 known, 0 not, -1 storage error. */
static int
known_has(strangers *sp, const char *prefix, size_t plen, const char *contact)
{
    char key[KEY_MAX];
    void *val = NULL;
    size_t vlen;
    int r = xd_db_get(sp->known, NULL, key, sub_key(key, prefix, plen, contact), &val, &vlen);
    free(val);
    return r == 0 ? 1 : r == XD_NOTFOUND ? 0 : -1;
}

typedef struct known_scan {
    size_t plen;
    unsigned long count;
    long long oldest;
    char oldest_key[KEY_MAX];
    size_t oldest_klen;
} known_scan;

static int
known_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    known_scan *k = data;
    long long when = vlen == TIME_LEN ? (long long)xd_db_get_be(val, TIME_LEN) : 0;
    if (klen <= k->plen || klen > sizeof(k->oldest_key))
        return 0;
    if (!k->count || when < k->oldest) {
        k->oldest = when;
        memcpy(k->oldest_key, key, klen);
        k->oldest_klen = klen;
    }
    k->count++;
    return 0;
}

/* Remember contact as known for the user; at max_known the contact
 * remembered longest ago makes room.  1 added, 0 already there, -1. */
static int
known_add(strangers *sp, const char *prefix, size_t plen, const char *contact)
{
    char key[KEY_MAX];
    size_t klen = sub_key(key, prefix, plen, contact);
    unsigned char when[TIME_LEN];
    void *val = NULL;
    size_t vlen;
    known_scan *k = NULL;
    xd_txn *txn;
    int r;

    if (xd_txn_begin(&txn) != 0)
        return -1;
    r = xd_db_get(sp->known, txn, key, klen, &val, &vlen);
    free(val);
    if (r == 0) {
        xd_txn_abort(txn);
        return 0;
    }
    if (r != XD_NOTFOUND || !(k = calloc(1, sizeof(*k))))
        goto fail;
    k->plen = plen;
    if (xd_db_foreach(sp->known, txn, prefix, plen, known_visit, k) < 0)
        goto fail;
    if ((long long)k->count >= sp->max_known &&
        xd_db_del(sp->known, txn, k->oldest_key, k->oldest_klen) < 0)
        goto fail;
    xd_db_put_be(when, (unsigned long long)time(NULL), TIME_LEN);
    if (xd_db_put(sp->known, txn, key, klen, when, sizeof(when)) != 0)
        goto fail;
    free(k);
    if (xd_txn_commit(txn) != 0)
        return -1;
    xd_count(sp->m, "known", 1);
    return 1;
fail:
    free(k);
    xd_txn_abort(txn);
    return -1;
}

/* Does the user (bare) receive messages from sender (bare)?  1 known, 0 a
 * stranger, -1 cannot tell (no roster module, or a storage error). */
static int
known_state(strangers *sp, const xd_jid *user, const xd_jid *sender, const char *prefix,
            size_t plen, const char *sender_str)
{
    int r = xd_roster_relation(user, sender);
    if (r >= 0 && (r & ROSTER_KNOWN))
        return 1;
    if (r < 0)
        return -1;
    return known_has(sp, prefix, plen, sender_str);
}

/* ---- the notice ----------------------------------------------------------------------- */

/* Senders a notice is about: all of them, to be marked told once it is
 * routed; the first NOTICE_NAMED are named in it. */
typedef struct notice_batch {
    char **jids;
    size_t named;
    unsigned long total;
} notice_batch;

static void
batch_free(notice_batch *nb)
{
    for (unsigned long i = 0; i < nb->total; i++)
        free(nb->jids[i]);
    free(nb->jids);
    memset(nb, 0, sizeof(*nb));
}

static int
notice_due(const strangers *sp, const user_meta *um, long long now)
{
    /* a clock set back counts as due: better one notice early than none */
    return sp->notice_interval == 0 || um->last_notice == 0 || now < um->last_notice ||
           now >= um->last_notice + sp->notice_interval;
}

static long long
notice_wait(const strangers *sp, const user_meta *um, long long now)
{
    long long w = um->last_notice + sp->notice_interval - now;
    return w > 0 ? w : 1;
}

typedef struct untold_scan {
    size_t plen;
    char **jids;
    size_t n, cap;
    int failed;
} untold_scan;

static int
untold_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    untold_scan *u = data;
    const unsigned char *v = val;
    if (klen <= u->plen || vlen != SENDER_META_LEN || v[0] != META_VERSION || v[5])
        return 0; /* the user's own record, or a sender already told about */
    if (u->n == u->cap) {
        size_t nc = u->cap ? 2 * u->cap : 16;
        char **nj = realloc(u->jids, nc * sizeof(*nj));
        if (!nj) {
            u->failed = 1;
            return 1;
        }
        u->jids = nj;
        u->cap = nc;
    }
    if (!(u->jids[u->n] = strndup((const char *)key + u->plen, klen - u->plen))) {
        u->failed = 1;
        return 1;
    }
    u->n++;
    return 0;
}

/*
 * In txn: the senders the user was not told about, for a notice.  Nothing
 * is marked here: batch_told does it once the notice is routed.  fresh,
 * when it is the only one (a new stranger while nothing else waits, the
 * usual case), saves the scan of the user's senders.
 */
static int
batch_take(strangers *sp, xd_txn *txn, const char *prefix, size_t plen, user_meta *um,
           const char *fresh, notice_batch *nb)
{
    untold_scan u = {plen, NULL, 0, 0, 0};

    memset(nb, 0, sizeof(*nb));
    if (fresh && um->untold == 1) {
        if (!(nb->jids = malloc(sizeof(*nb->jids))) || !(nb->jids[0] = strdup(fresh))) {
            free(nb->jids);
            nb->jids = NULL;
            return -1;
        }
        nb->total = 1;
    } else {
        if (xd_db_foreach(sp->meta, txn, prefix, plen, untold_visit, &u) < 0 || u.failed) {
            for (size_t i = 0; i < u.n; i++)
                free(u.jids[i]);
            free(u.jids);
            return -1;
        }
        nb->jids = u.jids;
        nb->total = (unsigned long)u.n;
        if (!u.n)
            um->untold = 0; /* the account was wrong: nobody to tell about */
    }
    nb->named = nb->total < NOTICE_NAMED ? (size_t)nb->total : NOTICE_NAMED;
    return 0;
}

/*
 * The notice about nb was routed (and, for a user away, stored by
 * mod_offline in its own transaction): only now are its senders marked
 * told, in a transaction of this one's own.  A notice that could not be
 * built, or a crash before it was routed, leaves them untold, so the next
 * notice names them; a crash between the routing and this commit names
 * them again in the next one.  A repeated notice is the side to err on: a
 * lost one means the user never learns that messages are held.
 */
static void
batch_told(strangers *sp, const char *user_s, const char *prefix, size_t plen,
           const notice_batch *nb)
{
    user_meta um;
    xd_txn *txn;
    int r;

    if (xd_txn_begin(&txn) != 0)
        goto fail;
    if ((r = meta_get(sp, txn, prefix, plen, &um)) != 0) {
        xd_txn_abort(txn);
        if (r == XD_NOTFOUND)
            return; /* nothing held any more (the account went meanwhile) */
        goto fail;
    }
    for (unsigned long i = 0; i < nb->total; i++) {
        unsigned long count;
        int told;
        if (sender_get(sp, txn, prefix, plen, nb->jids[i], &count, &told) != 0)
            goto abort;
        if (!count || told)
            continue; /* released, rejected or expired meanwhile */
        if (sender_put(sp, txn, prefix, plen, nb->jids[i], count, 1) != 0)
            goto abort;
        um.untold -= um.untold > 0;
    }
    um.last_notice = (long long)time(NULL);
    if (meta_put(sp, txn, prefix, plen, &um) != 0)
        goto abort;
    if (xd_txn_commit(txn) == 0)
        return;
    goto fail;
abort:
    xd_txn_abort(txn);
fail:
    xd_error("strangers: %s: could not record a notice as sent; the next one names its senders "
             "again",
             user_s);
}

static void
format_age(long long secs, char *buf, size_t len)
{
    if (secs % 86400 == 0)
        snprintf(buf, len, "%lld day%s", secs / 86400, secs == 86400 ? "" : "s");
    else if (secs % 3600 == 0)
        snprintf(buf, len, "%lld hour%s", secs / 3600, secs == 3600 ? "" : "s");
    else if (secs % 60 == 0)
        snprintf(buf, len, "%lld minute%s", secs / 60, secs == 60 ? "" : "s");
    else
        snprintf(buf, len, "%lld second%s", secs, secs == 1 ? "" : "s");
}

/* The closing sentences every notice has: what happens if the user does nothing. */
static void
notice_tail(const strangers *sp, char *buf, size_t len)
{
    char age[48], every[48];
    size_t n = 0;
    buf[0] = '\0';
    if (sp->max_age > 0) {
        format_age(sp->max_age, age, sizeof(age));
        n = (size_t)snprintf(buf, len,
                             " Held messages you do not accept within %s are returned to their "
                             "senders.",
                             age);
    }
    if (sp->notice_interval > 0 && n < len) {
        format_age(sp->notice_interval, every, sizeof(every));
        snprintf(buf + n, len - n,
                 " You are told about new senders at most once every %s; the command \"List "
                 "senders of held messages\" always has them all.",
                 every);
    }
}

static int
notice_message(strangers *sp, const char *user, const char *domain, const char *body)
{
    char id[64];
    xmpp_stanza_t *st;
    snprintf(id, sizeof(id), "strangers-%lx-%lu", (unsigned long)time(NULL), ++sp->notice_seq);
    if (!(st = xmpp_message_new(xd_ctx(), "normal", user, id)))
        return -1;
    xmpp_stanza_set_from(st, domain);
    xmpp_stanza_add_child_ex(st, text_el("body", NULL, body), 0);
    /* XEP-0334: worth archiving, whatever the archive's preferences */
    xmpp_stanza_add_child_ex(st, xd_stanza_new("store", NS_HINTS), 0);
    xd_route_durable(st); /* it speaks of held messages: only once they are on disk */
    xd_count(sp->m, "notices", 1);
    return 0;
}

/*
 * Tell the user about the senders of a batch.  0 when it was routed (or
 * there is nothing to send), -1 when it could not be built: the caller then
 * leaves the senders untold.
 *
 * The default is a message of type normal from the server's JID, not a
 * <presence type='subscribe'/> in the stranger's name, although every
 * client (Conversations, Gajim, Dino) shows the latter as a contact
 * request with accept/deny buttons:
 *  - a subscription request the stranger never sent would be a forgery:
 *    mod_roster records it as the stranger's pending request, accepting it
 *    grants the stranger the user's presence (RFC 6121 3.1.5, a FROM
 *    subscription the user only meant as "let me read this") and sends the
 *    stranger a 'subscribed' it never asked for;
 *  - a message with a body from the server's JID is shown as a
 *    conversation by all three clients, goes through the normal path (it
 *    is stored offline when the user is away, archived, copied to the other
 *    resources), while a headline would be dropped for an offline user
 *    (RFC 6121 8.5.2.1.1) and is not shown by Dino;
 *  - its text names the ways to accept, with XEP-0147 URIs that the clients
 *    make clickable: xmpp:sender?roster opens the add-contact dialog, and
 *    adding the contact is an approval (XD_HOOK_ROSTER_CHANGED).
 * An operator who prefers the contact-request buttons sets
 * notice = "subscribe" (the request is routed through mod_roster like a
 * real one) for a batch of one; several senders at once get the summary
 * message all the same, as a burst of contact requests is the flood that
 * notice_interval is there to stop.  "none" sends nothing (the commands
 * still list the senders).
 */
static int
notice_send(strangers *sp, const char *user, const char *domain, const notice_batch *nb)
{
    char tail[512], *body;
    size_t blen, off;
    int r;

    if (sp->notice == NOTICE_NONE || !nb->total || !nb->named)
        return 0;
    notice_tail(sp, tail, sizeof(tail));
    if (nb->total == 1) {
        const char *sender = nb->jids[0];
        if (sp->notice == NOTICE_SUBSCRIBE) {
            xmpp_stanza_t *st = xmpp_presence_new(xd_ctx());
            if (!st)
                return -1;
            xmpp_stanza_set_type(st, "subscribe");
            xmpp_stanza_set_from(st, sender);
            xmpp_stanza_set_to(st, user);
            xd_route_durable(st);
            xd_count(sp->m, "notices", 1);
            return 0;
        }
        blen = 4 * strlen(sender) + 2 * strlen(domain) + sizeof(tail) + 1024;
        if (!(body = malloc(blen)))
            return -1;
        snprintf(body, blen,
                 "%s, who is not in your contact list, sent you a message. It is held by the "
                 "server and you will not see it until you accept the sender:\n"
                 "- add %s to your contacts (xmpp:%s?roster), or accept their contact request, "
                 "or write to them; or\n"
                 "- run the command \"Accept held messages\" of %s "
                 "(xmpp:%s?command;node=" NODE_APPROVE ").\n"
                 "The command \"Read held messages\" shows them without accepting the sender. "
                 "Blocking %s or the command \"Reject held messages\" deletes them.%s",
                 sender, sender, sender, domain, domain, sender, tail);
        r = notice_message(sp, user, domain, body);
        free(body);
        return r;
    }
    blen = 3 * strlen(domain) + sizeof(tail) + 1024;
    for (size_t i = 0; i < nb->named; i++)
        blen += strlen(nb->jids[i]) + 2;
    if (!(body = malloc(blen)))
        return -1;
    off = (size_t)snprintf(
        body, blen, "%lu senders who are not in your contact list wrote to you: ", nb->total);
    for (size_t i = 0; i < nb->named && off < blen; i++)
        off += (size_t)snprintf(body + off, blen - off, "%s%s", i ? ", " : "", nb->jids[i]);
    if (nb->total > nb->named && off < blen)
        off += (size_t)snprintf(body + off, blen - off, " and %lu more",
                                nb->total - (unsigned long)nb->named);
    if (off < blen)
        snprintf(body + off, blen - off,
                 ". They are held by the server and you will not see them until you accept "
                 "their senders:\n"
                 "- add a sender to your contacts, or accept their contact request, or write to "
                 "them; or\n"
                 "- run the command \"Accept held messages\" of %s "
                 "(xmpp:%s?command;node=" NODE_APPROVE ").\n"
                 "The command \"List senders of held messages\" "
                 "(xmpp:%s?command;node=" NODE_LIST ") shows every sender, \"Read held "
                 "messages\" what they wrote. Blocking a sender or the command \"Reject held "
                 "messages\" deletes their messages.%s",
                 domain, domain, domain, tail);
    r = notice_message(sp, user, domain, body);
    free(body);
    return r;
}

/* Send the notice about nb, then mark its senders told (see batch_told). */
static void
notice_tell(strangers *sp, const char *user, const char *domain, const char *prefix, size_t plen,
            const notice_batch *nb)
{
    if (notice_send(sp, user, domain, nb) != 0) {
        xd_error("strangers: %s: could not build a notice; its senders stay untold", user);
        return;
    }
    batch_told(sp, user, prefix, plen, nb);
}

/* ---- notices that wait for the interval to end ------------------------------------------ */

static void pend_fire(void *data);

/* Send the user's waiting notice in `wait` seconds, unless a timer is set
 * already.  Without one (out of memory) it goes at the user's next login or
 * next held message. */
static void
pend_arm(strangers *sp, const char *user, long long wait)
{
    size_t ul = strlen(user);
    pending *p;

    if (xd_hashtab_get(sp->pend, user) || !(p = calloc(1, sizeof(*p) + ul + 1)))
        return;
    memcpy(p->user, user, ul + 1);
    p->sp = sp;
    if (!(p->timer = xd_timer_start(sp->m, (double)wait, 0, pend_fire, p))) {
        free(p);
        return;
    }
    if (xd_hashtab_put(sp->pend, p->user, p) != 0) { /* the key lives in p */
        xd_timer_stop(p->timer);
        free(p);
    }
}

static void
pend_drop(strangers *sp, const char *user)
{
    pending *p = xd_hashtab_del(sp->pend, user);
    if (!p)
        return;
    xd_timer_stop(p->timer);
    free(p);
}

/* Send the notice the user is owed, if it is due (otherwise wait for it). */
static void
notice_flush(strangers *sp, const char *user_s)
{
    char prefix[XD_JID_STR_MAX + 1];
    long long now = (long long)time(NULL);
    notice_batch nb;
    user_meta um;
    xd_jid user;
    xd_txn *txn;
    size_t plen;

    if (parse_bare(user_s, &user) != 0 ||
        !(plen = xd_db_user_prefix(&user, prefix, sizeof(prefix))))
        return;
    if (xd_txn_begin(&txn) != 0)
        return;
    if (meta_get(sp, txn, prefix, plen, &um) != 0 || !um.untold) {
        xd_txn_abort(txn);
        return;
    }
    if (!notice_due(sp, &um, now)) {
        xd_txn_abort(txn);
        pend_arm(sp, user_s, notice_wait(sp, &um, now));
        return;
    }
    if (batch_take(sp, txn, prefix, plen, &um, NULL, &nb) != 0) {
        xd_txn_abort(txn);
        xd_error("strangers: %s: could not take the senders to tell about", user_s);
        return;
    }
    if (meta_put(sp, txn, prefix, plen, &um) != 0) {
        xd_txn_abort(txn);
        batch_free(&nb);
        return;
    }
    if (xd_txn_commit(txn) == 0 && nb.total)
        notice_tell(sp, user_s, user.domain, prefix, plen, &nb);
    batch_free(&nb);
}

static void
pend_fire(void *data)
{
    pending *p = data;
    strangers *sp = p->sp;

    if (xd_hashtab_get(sp->pend, p->user) == p)
        xd_hashtab_del(sp->pend, p->user);
    p->timer = NULL; /* a one-shot timer is spent once it fired */
    notice_flush(sp, p->user);
    free(p);
}

/* ---- holding -------------------------------------------------------------------------- */

enum { HOLD_ERROR = -1, HOLD_OK = 0, HOLD_TOO_BIG = 2 };

/*
 * Store st for user (bare) from sender (bare string), in one transaction:
 * the oldest records make room first (expired ones are the oldest), each
 * returned to its sender once the transaction is committed.  When the user
 * is due a notice, *nb gets its senders; otherwise *wait says in how many
 * seconds one is due (0: none waits).  Point reads and writes only, plus a
 * prefix positioning per record that makes room.
 */
static int
hold(strangers *sp, const xd_jid *user, const char *sender, xmpp_stanza_t *st, notice_batch *nb,
     long long *wait)
{
    char prefix[XD_JID_STR_MAX + 1];
    size_t plen = xd_db_user_prefix(user, prefix, sizeof(prefix));
    size_t slen = strlen(sender), tlen = 0, rlen;
    unsigned long nexp = 0, ndrop = 0;
    unsigned char *rec = NULL;
    char *text = NULL;
    long long now = (long long)time(NULL);
    bounce_list b = {0};
    xd_txn *txn = NULL;
    user_meta um;
    int fresh = 0, ret = HOLD_ERROR;

    memset(nb, 0, sizeof(*nb));
    *wait = 0;
    if (!plen || slen == 0 || slen > 0xffff)
        return HOLD_ERROR;
    if (xmpp_stanza_to_text(st, &text, &tlen) != XMPP_EOK || !text)
        return HOLD_ERROR;
    rlen = RECORD_HEADER + slen + tlen;
    if ((long long)rlen > sp->max_size) {
        xmpp_free(xd_ctx(), text);
        return HOLD_TOO_BIG;
    }
    if (!(rec = malloc(rlen))) {
        xmpp_free(xd_ctx(), text);
        return HOLD_ERROR;
    }
    rec[0] = RECORD_VERSION;
    xd_db_put_be(rec + 1, (unsigned long long)now, TIME_LEN);
    xd_db_put_be(rec + 1 + TIME_LEN, slen, 2);
    memcpy(rec + RECORD_HEADER, sender, slen);
    memcpy(rec + RECORD_HEADER + slen, text, tlen);
    xmpp_free(xd_ctx(), text);

    if (xd_txn_begin(&txn) != 0)
        goto out;
    if (meta_load(sp, txn, prefix, plen, &um, NULL) != 0)
        goto abort;
    while ((long long)um.count + 1 > sp->quota || (long long)(um.bytes + rlen) > sp->quota_bytes) {
        oldest o = {plen, 0, NULL, 0};
        rec_view rv;
        int readable, old, r;
        if ((r = xd_db_foreach(sp->held, txn, prefix, plen, oldest_visit, &o)) < 0)
            goto abort;
        if (r == 0) {
            /* nothing left: the account was wrong; now it is right */
            um.count = 0;
            um.bytes = 0;
            break;
        }
        readable = rec_parse(o.val, o.vlen, &rv) == 0;
        old = readable && expired(sp, rv.when, now);
        if (bounce_add(&b, readable ? rv.xml : NULL, readable ? rv.xlen : 0,
                       old ? BOUNCE_EXPIRED : BOUNCE_QUOTA, prefix) != 0 ||
            rec_remove(sp, txn, prefix, plen, &um, o.seq, o.vlen, readable ? &rv : NULL) != 0) {
            free(o.val);
            goto abort;
        }
        if (old) {
            nexp++;
        } else {
            ndrop++;
            xd_info("strangers: %s: quota full, returned the oldest held message to %.*s", prefix,
                    readable ? (int)rv.slen : 1, readable ? rv.sender : "?");
        }
        free(o.val);
    }
    if (rec_add(sp, txn, prefix, plen, &um, now, sender, rec, rlen, &fresh) != 0)
        goto abort;
    if (um.untold && notice_due(sp, &um, now) &&
        batch_take(sp, txn, prefix, plen, &um, fresh ? sender : NULL, nb) != 0)
        goto abort;
    if (meta_put(sp, txn, prefix, plen, &um) != 0)
        goto abort;
    /* the commit is durable: only now may the sender's message count as taken */
    if (xd_txn_commit(txn) != 0) {
        batch_free(nb);
        bounce_discard(&b);
        goto out;
    }
    bounce_send(&b);
    ret = HOLD_OK;
    if (um.untold && !nb->total)
        *wait = notice_wait(sp, &um, now);
    if (nexp)
        xd_count(sp->m, "expired", nexp);
    if (ndrop)
        xd_count(sp->m, "dropped", ndrop);
    goto out;
abort:
    batch_free(nb);
    bounce_discard(&b);
    xd_txn_abort(txn);
out:
    free(rec);
    return ret;
}

/* ---- releasing and deleting ----------------------------------------------------------- */

/* Route the held messages from sender (bare) to user (bare) again, oldest
 * first, each with a <delay/>; then delete them.  Those past max_age go back
 * to the sender instead.  Returns how many were released, -1 on a storage
 * error (nothing was sent then). */
static int
release(strangers *sp, const xd_jid *user, const char *sender)
{
    char prefix[XD_JID_STR_MAX + 1];
    size_t plen = xd_db_user_prefix(user, prefix, sizeof(prefix));
    long long now = (long long)time(NULL);
    unsigned long nrel = 0, nexp = 0;
    bounce_list b = {0};
    held_list l;

    if (!plen || held_load(sp, NULL, prefix, plen, sender, 1, &l) != 0)
        return -1;
    if (l.n == 0) {
        held_free(&l);
        return 0;
    }
    for (size_t i = 0; i < l.n; i++) {
        held_rec *r = &l.v[i];
        xmpp_stanza_t *st;
        if (expired(sp, r->when, now)) {
            /* out of memory: left for the sweep */
            if (bounce_add(&b, r->xml, strlen(r->xml), BOUNCE_EXPIRED, prefix) == 0) {
                r->gone = 1;
                nexp++;
            }
            continue;
        }
        st = xd_stanza_parse(r->xml, strlen(r->xml));
        if (!st || !xmpp_stanza_get_name(st) || strcmp(xmpp_stanza_get_name(st), "message") != 0) {
            /* never silently lose a message: keep it for an operator to look at */
            xd_error("strangers: %s: held message %llu from %s is unreadable; kept", prefix, r->seq,
                     sender);
            if (st)
                xmpp_stanza_release(st);
            continue;
        }
        add_delay(st, user->domain, r->when);
        /* synchronous: mod_blocking, MAM, carbons, offline storage or the
         * session see it before xd_route returns */
        xd_route(st);
        r->gone = 1;
        nrel++;
    }
    if (held_remove_gone(sp, prefix, plen, &l) != 0) {
        xd_error("strangers: %s: could not delete released messages from %s; they may come again",
                 prefix, sender);
        bounce_discard(&b);
        nexp = 0;
    } else {
        bounce_send(&b);
    }
    held_free(&l);
    if (nrel) {
        xd_info("strangers: %s: released %lu held message(s) from %s", prefix, nrel, sender);
        xd_count(sp->m, "released", nrel);
    }
    if (nexp) {
        xd_info("strangers: %s: %lu held message(s) from %s expired", prefix, nexp, sender);
        xd_count(sp->m, "expired", nexp);
    }
    return (int)nrel;
}

/* Does a held record come from who, as XEP-0016 2.1 matches a blocked JID:
 * a domain covers all of its JIDs, a bare JID its resources, a full JID only
 * itself (as the stored stanza's 'from' says)? */
static int
held_matches(const held_rec *r, const xd_jid *who, const char *who_bare)
{
    xmpp_stanza_t *st;
    const char *from;
    xd_jid fj;
    int match;

    if (!r->sender)
        return 0;
    if (!who->local[0] && !who->resource[0])
        return !strcmp(domain_of(r->sender), who->domain);
    if (strcmp(r->sender, who_bare) != 0)
        return 0;
    if (!who->resource[0])
        return 1;
    st = r->xml ? xd_stanza_parse(r->xml, strlen(r->xml)) : NULL;
    from = st ? xmpp_stanza_get_from(st) : NULL;
    match = from && xd_jid_parse(&fj, from) == 0 && xd_jid_equal(&fj, who, 1);
    if (st)
        xmpp_stanza_release(st);
    return match;
}

/* Delete the user's held messages from who (see held_matches).  They are
 * not returned: the user said no, and an error would tell a spammer that
 * the address is read.  Returns how many, -1. */
static int
delete_held(strangers *sp, const xd_jid *user, const xd_jid *who)
{
    char prefix[XD_JID_STR_MAX + 1], bare[XD_JID_STR_MAX];
    size_t plen = xd_db_user_prefix(user, prefix, sizeof(prefix));
    int domain = !who->local[0] && !who->resource[0], n = 0;
    xd_jid wb = *who;
    held_list l;

    xd_jid_to_bare(&wb);
    if (!plen || bare_str(&wb, bare, sizeof(bare)) ||
        held_load(sp, NULL, prefix, plen, domain ? NULL : bare, who->resource[0] != 0, &l) != 0)
        return -1;
    for (size_t i = 0; i < l.n; i++)
        if (held_matches(&l.v[i], who, bare)) {
            l.v[i].gone = 1;
            n++;
        }
    if (n && held_remove_gone(sp, prefix, plen, &l) != 0)
        n = -1;
    held_free(&l);
    return n;
}

/* The user's senders, in the order of their oldest held message. */
typedef struct sender_sum {
    char *jid;
    unsigned long count;
    long long first, last;
} sender_sum;

typedef struct sender_list {
    sender_sum *v;
    size_t n;
} sender_list;

static void
senders_free(sender_list *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->v[i].jid);
    free(s->v);
    s->v = NULL;
    s->n = 0;
}

/* From the records themselves, so what expired but was not swept yet is
 * left out.  For the commands (the user asked). */
static int
senders_load(strangers *sp, const xd_jid *user, sender_list *out)
{
    char prefix[XD_JID_STR_MAX + 1];
    size_t plen = xd_db_user_prefix(user, prefix, sizeof(prefix));
    long long now = (long long)time(NULL);
    held_list l;

    memset(out, 0, sizeof(*out));
    if (!plen || held_load(sp, NULL, prefix, plen, NULL, 0, &l) != 0)
        return -1;
    if (l.n && !(out->v = calloc(l.n, sizeof(*out->v)))) {
        held_free(&l);
        return -1;
    }
    for (size_t i = 0; i < l.n; i++) {
        held_rec *r = &l.v[i];
        size_t k;
        if (!r->sender || expired(sp, r->when, now))
            continue; /* the next change or the sweep deletes it */
        for (k = 0; k < out->n && strcmp(out->v[k].jid, r->sender); k++)
            ;
        if (k == out->n) {
            out->v[k].jid = r->sender;
            r->sender = NULL; /* moved */
            out->v[k].first = r->when;
            out->n++;
        }
        out->v[k].count++;
        out->v[k].last = r->when;
    }
    held_free(&l);
    return 0;
}

/* The senders of the user's meta records: one short record each, not the
 * messages. */
typedef struct name_scan {
    size_t plen;
    char **v;
    size_t n, cap;
    int failed;
} name_scan;

static int
name_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    name_scan *s = data;
    (void)val;
    (void)vlen;
    if (klen <= s->plen)
        return 0; /* the user's own record */
    if (s->n == s->cap) {
        size_t nc = s->cap ? 2 * s->cap : 16;
        char **nv = realloc(s->v, nc * sizeof(*nv));
        if (!nv) {
            s->failed = 1;
            return 1;
        }
        s->v = nv;
        s->cap = nc;
    }
    if (!(s->v[s->n] = strndup((const char *)key + s->plen, klen - s->plen))) {
        s->failed = 1;
        return 1;
    }
    s->n++;
    return 0;
}

/* Release what is held from senders that are known for certain by now
 * (accepted while this module was not running, or a release cut short). */
static void
release_known(strangers *sp, const xd_jid *user, const char *prefix, size_t plen)
{
    name_scan s = {plen, NULL, 0, 0, 0};

    if (xd_db_foreach(sp->meta, NULL, prefix, plen, name_visit, &s) >= 0 && !s.failed) {
        for (size_t i = 0; i < s.n; i++) {
            xd_jid sj;
            if (parse_bare(s.v[i], &sj) == 0 &&
                known_state(sp, user, &sj, prefix, plen, s.v[i]) == 1)
                release(sp, user, s.v[i]);
        }
    }
    for (size_t i = 0; i < s.n; i++)
        free(s.v[i]);
    free(s.v);
}

/* ---- hooks ---------------------------------------------------------------------------- */

/* XD_HOOK_DELIVER_LOCAL, after mod_blocking and before MAM, carbons and
 * offline storage.  About 3,100 instructions for a roster contact's message
 * (the relation comes from mod_roster's cache; no storage read). */
static int
st_deliver(xd_event *ev, void *data)
{
    strangers *sp = data;
    xmpp_stanza_t *st = ev->stanza;
    char user_s[XD_JID_STR_MAX], sender_s[XD_JID_STR_MAX], prefix[XD_JID_STR_MAX + 1];
    notice_batch nb;
    long long wait;
    xd_jid user, sender;
    size_t plen;
    int r;

    /* A re-routed stanza (smacks) was judged on its first pass. */
    if (!st || (ev->flags & XD_EVENT_REROUTED) || !ev->from || !ev->to || !ev->to->local[0] ||
        strcmp(xmpp_stanza_get_name(st), "message") != 0 || !chat_or_normal(st) ||
        !has_content(st) || !host_enabled(sp, ev->to->domain))
        return XD_PASS;
    user = *ev->to;
    xd_jid_to_bare(&user);
    sender = *ev->from;
    xd_jid_to_bare(&sender);
    if (xd_jid_equal(&user, &sender, 0))
        return XD_PASS; /* the user's own resources */
    if (!sender.local[0] && xd_is_local_host(sender.domain))
        return XD_PASS; /* the server itself (its notices, announcements) */
    if (sp->exempt_local && xd_is_local_host(sender.domain))
        return XD_PASS;
    if (bare_str(&user, user_s, sizeof(user_s)) || bare_str(&sender, sender_s, sizeof(sender_s)) ||
        !(plen = xd_db_user_prefix(&user, prefix, sizeof(prefix))))
        return XD_PASS;
    /* cannot tell (no roster module, storage error): deliver rather than
     * hold wrongly */
    if (known_state(sp, &user, &sender, prefix, plen, sender_s) != 0)
        return XD_PASS;
    if (xd_account_exists(&user) != 1)
        return XD_PASS; /* no such account (or no answer): the core bounces */
    if (xmpp_stanza_get_child_by_name_and_ns(st, "no-store", NS_HINTS)) {
        /* XEP-0334: the sender asked us not to store it, and it may not be
         * delivered: as for a user who cannot receive it */
        xd_info("strangers: refused a <no-store/> message from %s to %s", sender_s, user_s);
        xd_count(sp->m, "refused", 1);
        xd_bounce(st, "cancel", "service-unavailable", NULL);
        return XD_HANDLED;
    }
    r = hold(sp, &user, sender_s, st, &nb, &wait);
    if (r == HOLD_TOO_BIG) {
        xd_info("strangers: refused an oversized message from %s to %s", sender_s, user_s);
        xd_count(sp->m, "refused", 1);
        xd_bounce(st, "cancel", "service-unavailable", NULL);
        return XD_HANDLED;
    }
    if (r == HOLD_ERROR) {
        xd_error("strangers: could not hold a message from %s to %s", sender_s, user_s);
        xd_bounce(st, "wait", "internal-server-error", NULL);
        return XD_HANDLED;
    }
    xd_info("strangers: held a message from %s to %s", sender_s, user_s);
    xd_count(sp->m, "held", 1);
    if (nb.total)
        notice_tell(sp, user_s, user.domain, prefix, plen, &nb);
    else if (wait > 0)
        pend_arm(sp, user_s, wait);
    batch_free(&nb);
    return XD_HANDLED;
}

/* XD_HOOK_C2S_STANZA: the user writes to (or sends directed presence to,
 * e.g. joins a room at) a contact: the user started that conversation, so
 * the contact is known from now on and what it sent before is released.
 * Runs after mod_blocking: a stanza to a blocked JID never gets here.  About
 * 2,700 instructions for a message to a roster contact, nothing written. */
static int
st_c2s(xd_event *ev, void *data)
{
    strangers *sp = data;
    xmpp_stanza_t *st = ev->stanza;
    const char *name = xmpp_stanza_get_name(st);
    char contact_s[XD_JID_STR_MAX], prefix[XD_JID_STR_MAX + 1];
    xd_jid user, contact;
    size_t plen;
    int r;

    if (!ev->session || !ev->from || !ev->to)
        return XD_PASS;
    if (!strcmp(name, "message")) {
        if (!chat_or_normal(st) || !has_content(st))
            return XD_PASS; /* an automatic receipt or chat state is no reply */
    } else if (!strcmp(name, "presence")) {
        if (xmpp_stanza_get_type(st) || !xmpp_stanza_get_to(st))
            return XD_PASS;
    } else {
        return XD_PASS;
    }
    user = *ev->from;
    xd_jid_to_bare(&user);
    contact = *ev->to;
    xd_jid_to_bare(&contact);
    if (xd_jid_equal(&user, &contact, 0) || !host_enabled(sp, user.domain) ||
        (!contact.local[0] && xd_is_local_host(contact.domain)))
        return XD_PASS;
    r = xd_roster_relation(&user, &contact);
    if (r < 0 || (r & ROSTER_KNOWN))
        return XD_PASS;
    if (bare_str(&contact, contact_s, sizeof(contact_s)) ||
        !(plen = xd_db_user_prefix(&user, prefix, sizeof(prefix))))
        return XD_PASS;
    r = known_add(sp, prefix, plen, contact_s);
    if (r < 0) {
        /* not known, so a release would only be held again: the next
         * message the user writes tries again */
        xd_error("strangers: %s: could not record %s as known", prefix, contact_s);
    } else if (r > 0) {
        xd_debug("strangers: %s wrote to %s: known from now on", prefix, contact_s);
        release(sp, &user, contact_s);
    }
    return XD_PASS;
}

static void
log_rejected(strangers *sp, const xd_jid *user, const char *how, const char *who, int n)
{
    if (n <= 0)
        return;
    xd_info("strangers: %s@%s %s %s: %d held message(s) deleted", user->local, user->domain, how,
            who, n);
    xd_count(sp->m, !strcmp(how, "blocked") ? "blocked" : "rejected", (unsigned long)n);
}

/* XD_HOOK_ROSTER_CHANGED (committed): a contact became known (the user
 * added it, accepted its request or asked for its presence): release.  A
 * relation back to none (the user denied its request or removed it): what
 * it sent is rejected with it. */
static int
st_roster_changed(xd_event *ev, void *data)
{
    strangers *sp = data;
    char contact_s[XD_JID_STR_MAX];
    xd_jid user, contact;

    if (!ev->from || !ev->to || !ev->from->local[0])
        return XD_PASS;
    user = *ev->from;
    xd_jid_to_bare(&user);
    contact = *ev->to;
    xd_jid_to_bare(&contact);
    if (bare_str(&contact, contact_s, sizeof(contact_s)))
        return XD_PASS;
    if (ev->flags & ROSTER_KNOWN)
        release(sp, &user, contact_s);
    else if (ev->flags == XD_ROSTER_BY_USER)
        /* The user denied the request or removed the contact.  A stranger
         * withdrawing its own request (flags 0) decides nothing for the
         * user: its messages stay held, to expire and go back as usual. */
        log_rejected(sp, &user, "refused", contact_s, delete_held(sp, &user, &contact));
    return XD_PASS;
}

/* XD_HOOK_BLOCKLIST_CHANGED, once mod_blocking has committed the block
 * (XEP-0191 3.3): what the blocked JID sent is deleted.  A block that
 * mod_blocking refuses never gets here, so it deletes nothing. */
static int
st_blocklist_changed(xd_event *ev, void *data)
{
    strangers *sp = data;
    char who_s[XD_JID_STR_MAX];
    xd_jid user;

    if (!(ev->flags & BLOCKLIST_BLOCKED) || !ev->from || !ev->to || !ev->from->local[0] ||
        xd_jid_format(ev->to, 1, who_s, sizeof(who_s)) < 0)
        return XD_PASS;
    user = *ev->from;
    xd_jid_to_bare(&user);
    log_rejected(sp, &user, "blocked", who_s, delete_held(sp, &user, ev->to));
    return XD_PASS;
}

/* XD_HOOK_PRESENCE_OUT, initial presence: catch up with approvals that
 * could not release at the time, and with a notice that was waiting (its
 * timer does not outlive a restart). */
static int
st_presence(xd_event *ev, void *data)
{
    strangers *sp = data;
    char user_s[XD_JID_STR_MAX], prefix[XD_JID_STR_MAX + 1];
    long long now = (long long)time(NULL);
    user_meta um;
    xd_jid user;
    size_t plen;

    if (!(ev->flags & XD_EVENT_INITIAL) || !ev->session || !xd_session_jid(ev->session))
        return XD_PASS;
    user = *xd_session_jid(ev->session);
    xd_jid_to_bare(&user);
    if (bare_str(&user, user_s, sizeof(user_s)) ||
        !(plen = xd_db_user_prefix(&user, prefix, sizeof(prefix))) ||
        meta_get(sp, NULL, prefix, plen, &um) != 0)
        return XD_PASS; /* nothing held (or a storage error: the next login tries again) */
    if (um.count)
        release_known(sp, &user, prefix, plen);
    if (um.untold) {
        if (notice_due(sp, &um, now))
            notice_flush(sp, user_s);
        else
            pend_arm(sp, user_s, notice_wait(sp, &um, now));
    }
    return XD_PASS;
}

/* XD_HOOK_ACCOUNT_REMOVED: the core purges the records keyed by the user;
 * the expiry index is keyed by time, so its entries go here. */
static int
st_account_removed(xd_event *ev, void *data)
{
    strangers *sp = data;
    char prefix[XD_JID_STR_MAX + 1], user_s[XD_JID_STR_MAX];
    size_t plen;
    held_list l;
    xd_jid user;
    xd_txn *txn;
    int ok = 1;

    if (!ev->from)
        return XD_PASS;
    user = *ev->from;
    xd_jid_to_bare(&user);
    if (!bare_str(&user, user_s, sizeof(user_s)))
        pend_drop(sp, user_s);
    if (!(plen = xd_db_user_prefix(&user, prefix, sizeof(prefix))) ||
        held_load(sp, NULL, prefix, plen, NULL, 0, &l) != 0)
        return XD_PASS;
    if (l.n && xd_txn_begin(&txn) == 0) {
        for (size_t i = 0; ok && i < l.n; i++) {
            unsigned char ikey[INDEX_KEY_MAX];
            if (l.v[i].sender)
                ok = xd_db_del(sp->expiry, txn, ikey,
                               index_key(ikey, l.v[i].when, prefix, plen, l.v[i].seq)) >= 0;
        }
        if (ok)
            xd_txn_commit(txn);
        else
            xd_txn_abort(txn);
    }
    held_free(&l);
    return XD_PASS;
}

/* ---- expiry --------------------------------------------------------------------------- */

/* Index entries of records that expired, oldest first.  Each step deletes
 * the entries it handled, so the next one starts where it stopped: the
 * start of the index is the cursor. */
typedef struct sweep_acc {
    long long now;
    const strangers *sp;
    unsigned char *keys[SWEEP_BATCH];
    size_t klens[SWEEP_BATCH];
    size_t n;
    int more;
    int failed;
} sweep_acc;

static int
sweep_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    sweep_acc *a = data;
    (void)val;
    (void)vlen;
    if (klen >= TIME_LEN && !expired(a->sp, (long long)xd_db_get_be(key, TIME_LEN), a->now))
        return 1; /* all that follows is younger */
    if (a->n == SWEEP_BATCH) {
        a->more = 1;
        return 1;
    }
    if (!(a->keys[a->n] = malloc(klen ? klen : 1))) {
        a->failed = 1;
        return 1;
    }
    memcpy(a->keys[a->n], key, klen);
    a->klens[a->n++] = klen;
    return 0;
}

static void sweep_next(void *data);

/*
 * The sweep writes back the account of a user whose entries it handled.
 * An entry left behind by a deleted account (its records purged by the
 * core, e.g. by xmppctl, which loads no modules and so runs no
 * XD_HOOK_ACCOUNT_REMOVED of ours) rebuilds an empty account: storing that
 * would leave a record for a user who no longer exists.
 */
static int
sweep_meta_put(strangers *sp, xd_txn *txn, const char *prefix, size_t plen, const user_meta *um,
               int existed)
{
    if (!existed && !um->count && !um->untold && !um->next_seq)
        return 0;
    return meta_put(sp, txn, prefix, plen, um);
}

/*
 * One sweep step, one transaction: delete up to SWEEP_BATCH expired records
 * (and SWEEP_BATCH_BYTES), each returned to its sender after the commit.
 * When more are waiting, the next step runs SWEEP_STEP seconds later, so
 * the event loop serves everyone else in between.
 */
static void
sweep_step(strangers *sp)
{
    sweep_acc *a = calloc(1, sizeof(*a));
    char prefix[XD_JID_STR_MAX + 1];
    size_t plen = 0, bytes = 0, i;
    unsigned long nexp = 0, ngone = 0;
    bounce_list b = {0};
    xd_txn *txn = NULL;
    user_meta um;
    int ok = 1, existed = 0;

    if (!a)
        return;
    a->now = (long long)time(NULL);
    a->sp = sp;
    if (xd_db_foreach(sp->expiry, NULL, NULL, 0, sweep_visit, a) < 0 || a->failed || !a->n ||
        xd_txn_begin(&txn) != 0)
        goto out;
    for (i = 0; ok && i < a->n && bytes < SWEEP_BATCH_BYTES; i++) {
        const unsigned char *k = a->keys[i];
        size_t klen = a->klens[i],
               kplen = klen > TIME_LEN + SEQ_LEN ? klen - TIME_LEN - SEQ_LEN : 0;
        unsigned long long seq;
        void *val = NULL;
        size_t vlen = 0;
        rec_view rv;
        int r;

        if (kplen < 2 || kplen > sizeof(prefix) || k[TIME_LEN + kplen - 1] != '\0') {
            ok = xd_db_del(sp->expiry, txn, k, klen) >= 0; /* not an entry of ours */
            continue;
        }
        if (plen != kplen || memcmp(prefix, k + TIME_LEN, plen) != 0) {
            /* the next user: write back the account of the previous one */
            if (plen && sweep_meta_put(sp, txn, prefix, plen, &um, existed) != 0) {
                ok = 0;
                break;
            }
            plen = kplen;
            memcpy(prefix, k + TIME_LEN, plen);
            if (meta_load(sp, txn, prefix, plen, &um, &existed) != 0) {
                plen = 0;
                ok = 0;
                break;
            }
        }
        seq = xd_db_get_be(k + TIME_LEN + plen, SEQ_LEN);
        r = xd_db_get(sp->held, txn, k + TIME_LEN, plen + SEQ_LEN, &val, &vlen);
        if (r < 0) {
            ok = 0;
        } else if (r == 0 && rec_parse(val, vlen, &rv) == 0 &&
                   rv.when == (long long)xd_db_get_be(k, TIME_LEN)) {
            ok = bounce_add(&b, rv.xml, rv.xlen, BOUNCE_EXPIRED, prefix) == 0 &&
                 rec_remove(sp, txn, prefix, plen, &um, seq, vlen, &rv) == 0;
            nexp += ok;
            bytes += vlen;
        } else {
            /* its record is gone (or is another one now): the entry goes */
            ok = xd_db_del(sp->expiry, txn, k, klen) >= 0;
            ngone += ok;
        }
        free(val);
    }
    if (ok && plen && sweep_meta_put(sp, txn, prefix, plen, &um, existed) != 0)
        ok = 0;
    if (!ok) {
        xd_txn_abort(txn);
        bounce_discard(&b);
        goto out; /* the next sweep_interval tries again */
    }
    if (xd_txn_commit(txn) != 0) {
        bounce_discard(&b);
        goto out;
    }
    if (nexp) {
        xd_info("strangers: %lu held message(s) expired", nexp);
        xd_count(sp->m, "expired", nexp);
    }
    if (ngone)
        xd_info("strangers: dropped %lu expiry index entr%s whose message was gone", ngone,
                ngone == 1 ? "y" : "ies");
    bounce_send(&b);
    if ((a->more || i < a->n) && !sp->sweep_next)
        sp->sweep_next = xd_timer_start(sp->m, SWEEP_STEP, 0, sweep_next, sp);
out:
    for (i = 0; i < a->n; i++)
        free(a->keys[i]);
    free(a);
}

static void
sweep_next(void *data)
{
    strangers *sp = data;
    sp->sweep_next = NULL; /* spent */
    sweep_step(sp);
}

static void
sweep_tick(void *data)
{
    strangers *sp = data;
    if (!sp->sweep_next) /* otherwise a sweep is under way */
        sweep_step(sp);
}

/* ---- XEP-0050 commands ---------------------------------------------------------------- */

/* XEP-0050 4.6: the stanza error, with the command's own condition. */
static void
cmd_error(xd_event *ev, const char *type, const char *cond, const char *specific, const char *text)
{
    xmpp_stanza_t *e = xd_error_reply(ev->stanza, type, cond, text), *err;
    if (!e)
        return;
    if (specific && (err = xmpp_stanza_get_child_by_name(e, "error")))
        xmpp_stanza_add_child_ex(err, xd_stanza_new(specific, XD_NS_COMMANDS), 0);
    xd_route(e);
}

static xmpp_stanza_t *
cmd_reply(xd_event *ev, const char *node, const char *sid, const char *status,
          xmpp_stanza_t **cmd_out)
{
    xmpp_stanza_t *r = xd_iq_result(ev->stanza), *c = xd_stanza_new("command", XD_NS_COMMANDS);
    xmpp_stanza_set_attribute(c, "node", node);
    if (sid)
        xmpp_stanza_set_attribute(c, "sessionid", sid);
    xmpp_stanza_set_attribute(c, "status", status);
    xmpp_stanza_add_child_ex(r, c, 0);
    *cmd_out = c;
    return r;
}

static void
add_note(xmpp_stanza_t *cmd, const char *type, const char *text)
{
    xmpp_stanza_t *n = text_el("note", NULL, text);
    xmpp_stanza_set_attribute(n, "type", type);
    xmpp_stanza_add_child_ex(cmd, n, 0);
}

static xmpp_stanza_t *
form_new(const char *type, const char *title, const char *instructions)
{
    xmpp_stanza_t *x = xd_stanza_new("x", NS_DATA), *f;
    xmpp_stanza_set_type(x, type);
    if (title)
        xmpp_stanza_add_child_ex(x, text_el("title", NULL, title), 0);
    if (instructions)
        xmpp_stanza_add_child_ex(x, text_el("instructions", NULL, instructions), 0);
    f = xd_stanza_new("field", NULL);
    xmpp_stanza_set_attribute(f, "var", "FORM_TYPE");
    xmpp_stanza_set_attribute(f, "type", "hidden");
    xmpp_stanza_add_child_ex(f, text_el("value", NULL, FORM_TYPE), 0);
    xmpp_stanza_add_child_ex(x, f, 0);
    return x;
}

static xmpp_stanza_t *
field_new(const char *var, const char *type, const char *label)
{
    xmpp_stanza_t *f = xd_stanza_new("field", NULL);
    xmpp_stanza_set_attribute(f, "var", var);
    if (type)
        xmpp_stanza_set_attribute(f, "type", type);
    if (label)
        xmpp_stanza_set_attribute(f, "label", label);
    return f;
}

static void
field_value(xmpp_stanza_t *f, const char *v)
{
    xmpp_stanza_add_child_ex(f, text_el("value", NULL, v), 0);
}

/* A field with one value, inside an <item/> of a result table. */
static void
cell(xmpp_stanza_t *item, const char *var, const char *v)
{
    xmpp_stanza_t *f = field_new(var, NULL, NULL);
    field_value(f, v);
    xmpp_stanza_add_child_ex(item, f, 0);
}

/* The submitted values of one field, prepared as bare JIDs. */
typedef struct jid_values {
    char *v[MAX_FORM_VALUES];
    int n;
} jid_values;

static void
values_free(jid_values *jv)
{
    for (int i = 0; i < jv->n; i++)
        free(jv->v[i]);
    jv->n = 0;
}

enum { FORM_OK = 0, FORM_MISSING, FORM_TOO_MANY, FORM_BAD_JID, FORM_OOM };

static int
form_jids(xmpp_stanza_t *x, const char *var, jid_values *out)
{
    out->n = 0;
    for (xmpp_stanza_t *f = xmpp_stanza_get_children(x); f; f = xmpp_stanza_get_next(f)) {
        const char *fv;
        if (!xmpp_stanza_is_tag(f) || strcmp(xmpp_stanza_get_name(f), "field") ||
            !(fv = xmpp_stanza_get_attribute(f, "var")) || strcmp(fv, var))
            continue;
        for (xmpp_stanza_t *v = xmpp_stanza_get_children(f); v; v = xmpp_stanza_get_next(v)) {
            char *text, bare[XD_JID_STR_MAX];
            xd_jid j;
            int dup = 0;
            if (!xmpp_stanza_is_tag(v) || strcmp(xmpp_stanza_get_name(v), "value"))
                continue;
            text = xmpp_stanza_get_text(v);
            if (!text || !*text || strlen(text) >= XD_JID_STR_MAX || parse_bare(text, &j) != 0 ||
                bare_str(&j, bare, sizeof(bare))) {
                if (text)
                    xmpp_free(xd_ctx(), text);
                values_free(out);
                return FORM_BAD_JID;
            }
            xmpp_free(xd_ctx(), text);
            for (int i = 0; i < out->n; i++)
                dup |= !strcmp(out->v[i], bare);
            if (dup)
                continue;
            if (out->n == MAX_FORM_VALUES) {
                values_free(out);
                return FORM_TOO_MANY;
            }
            if (!(out->v[out->n] = strdup(bare))) {
                values_free(out);
                return FORM_OOM;
            }
            out->n++;
        }
    }
    return out->n ? FORM_OK : FORM_MISSING;
}

/* Is jid among the user's senders? */
static const sender_sum *
find_sender(const sender_list *s, const char *jid)
{
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->v[i].jid, jid))
            return &s->v[i];
    return NULL;
}

/* The first stage of fetch/approve/reject: a form to choose senders. */
static xmpp_stanza_t *
choose_form(int kind, const sender_list *s)
{
    static const char *const titles[] = {NULL, "Read held messages", "Accept held messages",
                                         "Reject held messages"};
    static const char *const how[] = {
        NULL, "Choose the sender whose held messages you want to read. They stay held.",
        "Choose the senders to accept: their held messages are delivered now, and what they "
        "send from now on too.",
        "Choose the senders whose held messages are deleted."};
    xmpp_stanza_t *x = form_new("form", titles[kind], how[kind]);
    xmpp_stanza_t *f = field_new(kind == CMD_FETCH ? "jid" : "jids",
                                 kind == CMD_FETCH ? "list-single" : "list-multi", "Sender");
    xmpp_stanza_add_child_ex(f, xd_stanza_new("required", NULL), 0);
    for (size_t i = 0; i < s->n; i++) {
        char label[XD_JID_STR_MAX + 48];
        xmpp_stanza_t *o = xd_stanza_new("option", NULL);
        snprintf(label, sizeof(label), "%s (%lu message%s)", s->v[i].jid, s->v[i].count,
                 s->v[i].count == 1 ? "" : "s");
        xmpp_stanza_set_attribute(o, "label", label);
        field_value(o, s->v[i].jid);
        xmpp_stanza_add_child_ex(f, o, 0);
    }
    xmpp_stanza_add_child_ex(x, f, 0);
    return x;
}

static xmpp_stanza_t *
list_result(const sender_list *s)
{
    xmpp_stanza_t *x = form_new("result", "Held messages", NULL);
    xmpp_stanza_t *rep = xd_stanza_new("reported", NULL);
    xmpp_stanza_add_child_ex(rep, field_new("jid", "jid-single", "From"), 0);
    xmpp_stanza_add_child_ex(rep, field_new("count", "text-single", "Messages"), 0);
    xmpp_stanza_add_child_ex(rep, field_new("first", "text-single", "Oldest"), 0);
    xmpp_stanza_add_child_ex(rep, field_new("last", "text-single", "Newest"), 0);
    xmpp_stanza_add_child_ex(x, rep, 0);
    for (size_t i = 0; i < s->n; i++) {
        char count[24], first[32], last[32];
        xmpp_stanza_t *item = xd_stanza_new("item", NULL);
        snprintf(count, sizeof(count), "%lu", s->v[i].count);
        format_stamp(s->v[i].first, first, sizeof(first));
        format_stamp(s->v[i].last, last, sizeof(last));
        cell(item, "jid", s->v[i].jid);
        cell(item, "count", count);
        cell(item, "first", first);
        cell(item, "last", last);
        xmpp_stanza_add_child_ex(x, item, 0);
    }
    return x;
}

/* A held message as one row: who, when, what (text-multi: one value per line). */
static size_t
message_row(xmpp_stanza_t *x, const held_rec *r)
{
    xmpp_stanza_t *st = r->xml ? xd_stanza_parse(r->xml, strlen(r->xml)) : NULL;
    xmpp_stanza_t *item = xd_stanza_new("item", NULL), *f, *b;
    char stamp[32], *text = NULL;
    const char *from = st ? xmpp_stanza_get_from(st) : NULL,
               *type = st ? xmpp_stanza_get_type(st) : NULL;
    size_t used = 0;

    format_stamp(r->when, stamp, sizeof(stamp));
    cell(item, "from", from ? from : r->sender);
    cell(item, "stamp", stamp);
    cell(item, "type", type ? type : "normal");
    f = field_new("body", NULL, NULL);
    b = st ? xmpp_stanza_get_child_by_name(st, "body") : NULL;
    if (b && (text = xmpp_stanza_get_text(b))) {
        char *line = text, *nl;
        used = strlen(text);
        for (;;) {
            nl = strchr(line, '\n');
            if (nl)
                *nl = '\0';
            field_value(f, line);
            if (!nl)
                break;
            line = nl + 1;
        }
        xmpp_free(xd_ctx(), text);
    } else {
        field_value(f, st ? "[encrypted: accept the sender to read it]" : "[unreadable]");
    }
    xmpp_stanza_add_child_ex(item, f, 0);
    xmpp_stanza_add_child_ex(x, item, 0);
    if (st)
        xmpp_stanza_release(st);
    return used;
}

static void
fetch_result(strangers *sp, xd_event *ev, const xd_jid *user, const char *node, const char *sid,
             const char *sender)
{
    char prefix[XD_JID_STR_MAX + 1], note[XD_JID_STR_MAX + 96];
    size_t plen = xd_db_user_prefix(user, prefix, sizeof(prefix)), bytes = 0, shown = 0, live = 0;
    long long now = (long long)time(NULL);
    xmpp_stanza_t *r, *c, *x, *rep;
    held_list l;

    if (!plen || held_load(sp, NULL, prefix, plen, sender, 1, &l) != 0) {
        cmd_error(ev, "wait", "internal-server-error", NULL, NULL);
        return;
    }
    for (size_t i = 0; i < l.n; i++)
        live += !expired(sp, l.v[i].when, now);
    if (!live) {
        held_free(&l);
        cmd_error(ev, "cancel", "item-not-found", NULL, "no messages held from that sender");
        return;
    }
    r = cmd_reply(ev, node, sid, "completed", &c);
    x = form_new("result", "Held messages", NULL);
    rep = xd_stanza_new("reported", NULL);
    xmpp_stanza_add_child_ex(rep, field_new("from", "jid-single", "From"), 0);
    xmpp_stanza_add_child_ex(rep, field_new("stamp", "text-single", "Received"), 0);
    xmpp_stanza_add_child_ex(rep, field_new("type", "text-single", "Type"), 0);
    xmpp_stanza_add_child_ex(rep, field_new("body", "text-multi", "Message"), 0);
    xmpp_stanza_add_child_ex(x, rep, 0);
    for (size_t i = 0; i < l.n && bytes < FETCH_MAX_BYTES; i++) {
        if (expired(sp, l.v[i].when, now))
            continue;
        bytes += message_row(x, &l.v[i]);
        shown++;
    }
    snprintf(note, sizeof(note), "%zu message%s held from %s%s.", live, live == 1 ? "" : "s",
             sender, shown < live ? " (the oldest shown; accept the sender to read all)" : "");
    add_note(c, "info", note);
    xmpp_stanza_add_child_ex(c, x, 0);
    held_free(&l);
    xd_route(r);
}

/* The last stage of fetch/approve/reject, with the submitted form. */
static void
cmd_submit(command *cmd, xd_event *ev, const xd_jid *user, const char *node, const char *sid,
           xmpp_stanza_t *x)
{
    strangers *sp = cmd->sp;
    char prefix[XD_JID_STR_MAX + 1], note[512];
    size_t plen = xd_db_user_prefix(user, prefix, sizeof(prefix));
    unsigned long total = 0;
    jid_values jv;
    sender_list s;
    xmpp_stanza_t *r, *c;
    int fr;

    fr = form_jids(x, cmd->kind == CMD_FETCH ? "jid" : "jids", &jv);
    if (fr == FORM_OK && cmd->kind == CMD_FETCH && jv.n != 1)
        fr = FORM_TOO_MANY;
    if (fr != FORM_OK) {
        values_free(&jv);
        if (fr == FORM_OOM)
            cmd_error(ev, "wait", "internal-server-error", NULL, NULL);
        else if (fr == FORM_BAD_JID)
            cmd_error(ev, "modify", "jid-malformed", "bad-payload", "not a JID");
        else
            cmd_error(ev, "modify", "bad-request", "bad-payload",
                      fr == FORM_MISSING ? "no sender chosen" : "too many senders");
        return;
    }
    if (cmd->kind == CMD_FETCH) {
        fetch_result(sp, ev, user, node, sid, jv.v[0]);
        values_free(&jv);
        return;
    }
    /* all or nothing: every sender named must have messages held */
    if (!plen || senders_load(sp, user, &s) != 0) {
        values_free(&jv);
        cmd_error(ev, "wait", "internal-server-error", NULL, NULL);
        return;
    }
    for (int i = 0; i < jv.n; i++) {
        if (!find_sender(&s, jv.v[i])) {
            snprintf(note, sizeof(note), "no messages held from %s", jv.v[i]);
            senders_free(&s);
            values_free(&jv);
            cmd_error(ev, "cancel", "item-not-found", NULL, note);
            return;
        }
    }
    senders_free(&s);
    for (int i = 0; i < jv.n; i++) {
        int n;
        if (cmd->kind == CMD_APPROVE) {
            xd_jid sj;
            /* known first, so the release is not held again and later
             * messages pass; a storage error stops before anything moves */
            if (parse_bare(jv.v[i], &sj) != 0 || known_add(sp, prefix, plen, jv.v[i]) < 0) {
                values_free(&jv);
                cmd_error(ev, "wait", "internal-server-error", NULL, NULL);
                return;
            }
            n = release(sp, user, jv.v[i]);
        } else {
            xd_jid sj;
            n = parse_bare(jv.v[i], &sj) == 0 ? delete_held(sp, user, &sj) : -1;
            log_rejected(sp, user, "rejected", jv.v[i], n);
        }
        if (n < 0) {
            values_free(&jv);
            cmd_error(ev, "wait", "internal-server-error", NULL, NULL);
            return;
        }
        total += (unsigned long)n;
    }
    r = cmd_reply(ev, node, sid, "completed", &c);
    if (cmd->kind == CMD_APPROVE)
        snprintf(note, sizeof(note), "Accepted %d sender%s: %lu held message%s delivered.", jv.n,
                 jv.n == 1 ? "" : "s", total, total == 1 ? "" : "s");
    else
        snprintf(note, sizeof(note), "Rejected %d sender%s: %lu held message%s deleted.", jv.n,
                 jv.n == 1 ? "" : "s", total, total == 1 ? "" : "s");
    add_note(c, "info", note);
    values_free(&jv);
    xd_route(r);
}

/* The XEP-0050 handler of all four commands (cmd->kind says which). */
static int
adhoc(xd_event *ev, void *data)
{
    command *cmd = data;
    strangers *sp = cmd->sp;
    xmpp_stanza_t *c = xmpp_stanza_get_child_by_name_and_ns(ev->stanza, "command", XD_NS_COMMANDS);
    const char *node = c ? xmpp_stanza_get_attribute(c, "node") : NULL;
    const char *action = c ? xmpp_stanza_get_attribute(c, "action") : NULL;
    const char *sid = c ? xmpp_stanza_get_attribute(c, "sessionid") : NULL;
    char newsid[48];
    xmpp_stanza_t *x = NULL, *r, *rc;
    xd_jid user;
    sender_list s;

    if (!c || !node || !is_type(ev->stanza, "set")) {
        cmd_error(ev, "modify", "bad-request", NULL, NULL);
        return XD_HANDLED;
    }
    /* only a local account, and only for its own held messages */
    if (!ev->from || !ev->from->local[0] || !xd_is_local_host(ev->from->domain) || !sp->held) {
        cmd_error(ev, "auth", "forbidden", NULL, NULL);
        return XD_HANDLED;
    }
    user = *ev->from;
    xd_jid_to_bare(&user);
    if (!action)
        action = "execute";
    if (strcmp(action, "execute") && strcmp(action, "complete") && strcmp(action, "cancel") &&
        strcmp(action, "next") && strcmp(action, "prev")) {
        cmd_error(ev, "modify", "bad-request", "malformed-action", NULL);
        return XD_HANDLED;
    }
    for (xmpp_stanza_t *ch = xmpp_stanza_get_children(c); ch; ch = xmpp_stanza_get_next(ch))
        if (xmpp_stanza_is_tag(ch) && !strcmp(xmpp_stanza_get_name(ch), "x") &&
            ns_is(ch, NS_DATA)) {
            x = ch;
            break;
        }

    if (sid) {
        /* a later stage.  XEP-0050 3.4: the id only lets the client tie
         * the stages of one execution together; every stage acts for the
         * requester (ev->from) on the requester's own messages, so nothing
         * is kept per session and any id of a sane length is taken */
        if (!*sid || strlen(sid) > SESSIONID_MAX) {
            cmd_error(ev, "modify", "bad-request", "bad-sessionid", NULL);
            return XD_HANDLED;
        }
        if (!strcmp(action, "cancel") || (x && is_type(x, "cancel"))) {
            xd_route(cmd_reply(ev, node, sid, "canceled", &rc));
            return XD_HANDLED;
        }
        if (cmd->kind == CMD_LIST || !strcmp(action, "next") || !strcmp(action, "prev")) {
            cmd_error(ev, "modify", "bad-request", "bad-action", NULL);
            return XD_HANDLED;
        }
        if (!x || !is_type(x, "submit")) {
            cmd_error(ev, "modify", "bad-request", "bad-payload", "a submitted form is required");
            return XD_HANDLED;
        }
        cmd_submit(cmd, ev, &user, node, sid, x);
        return XD_HANDLED;
    }

    /* a new execution */
    if (!strcmp(action, "cancel")) {
        xd_route(cmd_reply(ev, node, NULL, "canceled", &rc));
        return XD_HANDLED;
    }
    if (strcmp(action, "execute")) {
        cmd_error(ev, "modify", "bad-request", "bad-action", NULL);
        return XD_HANDLED;
    }
    /* unique, not secret: see above */
    snprintf(newsid, sizeof(newsid), "%llx-%lu", (unsigned long long)time(NULL), ++sp->cmd_seq);
    if (x && cmd->kind != CMD_LIST) {
        /* the form right away: one round trip for scripts */
        if (!is_type(x, "submit")) {
            cmd_error(ev, "modify", "bad-request", "bad-payload", "a submitted form is required");
            return XD_HANDLED;
        }
        cmd_submit(cmd, ev, &user, node, newsid, x);
        return XD_HANDLED;
    }
    if (senders_load(sp, &user, &s) != 0) {
        cmd_error(ev, "wait", "internal-server-error", NULL, NULL);
        return XD_HANDLED;
    }
    if (cmd->kind == CMD_LIST || s.n == 0) {
        char note[64];
        unsigned long total = 0;
        for (size_t i = 0; i < s.n; i++)
            total += s.v[i].count;
        r = cmd_reply(ev, node, newsid, "completed", &rc);
        if (s.n)
            snprintf(note, sizeof(note), "%lu message%s held from %zu sender%s.", total,
                     total == 1 ? "" : "s", s.n, s.n == 1 ? "" : "s");
        else
            snprintf(note, sizeof(note), "No messages are held.");
        add_note(rc, "info", note);
        if (cmd->kind == CMD_LIST)
            xmpp_stanza_add_child_ex(rc, list_result(&s), 0);
    } else {
        xmpp_stanza_t *actions = xd_stanza_new("actions", NULL);
        r = cmd_reply(ev, node, newsid, "executing", &rc);
        xmpp_stanza_set_attribute(actions, "execute", "complete");
        xmpp_stanza_add_child_ex(actions, xd_stanza_new("complete", NULL), 0);
        xmpp_stanza_add_child_ex(rc, actions, 0);
        xmpp_stanza_add_child_ex(rc, choose_form(cmd->kind, &s), 0);
    }
    senders_free(&s);
    xd_route(r);
    return XD_HANDLED;
}

/* ---- the module ----------------------------------------------------------------------- */

static const xd_setting strangers_settings[] = {
    {"enabled", XD_SETTING_BOOL},         /* default true */
    {"hosts", XD_SETTING_STRING_LIST},    /* served hosts it applies to; default all */
    {"exempt_local", XD_SETTING_BOOL},    /* senders of served domains pass; default false */
    {"quota", XD_SETTING_INT},            /* held messages per user */
    {"quota_bytes", XD_SETTING_INT},      /* held bytes per user */
    {"max_message_size", XD_SETTING_INT}, /* bytes of one held message */
    {"max_age", XD_SETTING_INT},          /* seconds a message is held; 0: until acted on */
    {"sweep_interval", XD_SETTING_INT},   /* seconds between expiry sweeps */
    {"max_known", XD_SETTING_INT},        /* contacts remembered per user from replies */
    {"notice", XD_SETTING_STRING},        /* "message", "subscribe" or "none" */
    {"notice_interval", XD_SETTING_INT},  /* seconds between two notices to a user; 0: no limit */
    {NULL, 0},
};

static int
int_setting(xd_module *m, const char *name, long long def, long long lo, long long hi,
            long long *out)
{
    long long v = xd_config_int(m, name, def);
    if (v < lo || v > hi) {
        xd_config_error(m, name, "must be from %lld to %lld", lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

static int
pend_free(const char *user, void *val, void *data)
{
    pending *p = val;
    (void)user;
    (void)data;
    xd_timer_stop(p->timer);
    free(p);
    return 0;
}

static void
strangers_free(strangers *sp)
{
    if (!sp)
        return;
    xd_timer_stop(sp->sweep);
    xd_timer_stop(sp->sweep_next);
    if (sp->pend) {
        xd_hashtab_foreach(sp->pend, pend_free, NULL);
        xd_hashtab_free(sp->pend);
    }
    for (int i = 0; i < sp->nhosts; i++)
        free(sp->hosts[i]);
    free(sp->hosts);
    free(sp);
}

static int
strangers_load(xd_module *m)
{
    strangers *sp = calloc(1, sizeof(*sp));
    const char *notice;
    int r = 0, n;

    if (!sp || !(sp->pend = xd_hashtab_new(64))) {
        free(sp);
        return -1;
    }
    sp->m = m;
    sp->enabled = xd_config_bool(m, "enabled", 1);
    sp->exempt_local = xd_config_bool(m, "exempt_local", 0);
    if (int_setting(m, "quota", 100, 1, 100000, &sp->quota) ||
        int_setting(m, "quota_bytes", 1024 * 1024, 4096, 1LL << 30, &sp->quota_bytes) ||
        int_setting(m, "max_message_size", 65536, 1024, 64LL * 1024 * 1024, &sp->max_size) ||
        int_setting(m, "max_age", 7 * 86400, 0, 10LL * 365 * 86400, &sp->max_age) ||
        int_setting(m, "sweep_interval", 3600, 1, 86400, &sp->sweep_interval) ||
        /* making room scans the user's known contacts: keep the list bounded */
        int_setting(m, "max_known", 10000, 1, 100000, &sp->max_known) ||
        int_setting(m, "notice_interval", 3600, 0, 7 * 86400, &sp->notice_interval))
        goto fail;
    if (sp->max_size > sp->quota_bytes) {
        xd_config_error(m, "max_message_size", "must not be more than quota_bytes (%lld)",
                        sp->quota_bytes);
        goto fail;
    }
    notice = xd_config_string(m, "notice", "message");
    if (!strcmp(notice, "message"))
        sp->notice = NOTICE_MESSAGE;
    else if (!strcmp(notice, "subscribe"))
        sp->notice = NOTICE_SUBSCRIBE;
    else if (!strcmp(notice, "none"))
        sp->notice = NOTICE_NONE;
    else {
        xd_config_error(m, "notice", "must be \"message\", \"subscribe\" or \"none\"");
        goto fail;
    }
    if ((n = xd_config_list_count(m, "hosts")) > 0) {
        if (!(sp->hosts = calloc((size_t)n, sizeof(char *))))
            goto fail;
        for (int i = 0; i < n; i++) {
            const char *h = xd_config_list_item(m, "hosts", i);
            char d[XD_JID_PART_MAX + 1];
            if (!h || xd_jid_prep_domain(d, sizeof(d), h) != 0 || !xd_is_local_host(d)) {
                xd_config_error(m, "hosts", "\"%s\" is not a served host", h ? h : "");
                goto fail;
            }
            if (!(sp->hosts[sp->nhosts] = strdup(d)))
                goto fail;
            sp->nhosts++;
        }
    }
    for (int i = 0; i < CMD_COUNT; i++) {
        sp->cmds[i].sp = sp;
        sp->cmds[i].kind = i;
    }
    xd_module_set_data(m, sp);

    sp->held = xd_db_open("strangers");
    sp->meta = sp->held ? xd_db_open("strangers_meta") : NULL;
    sp->expiry = sp->meta ? xd_db_open("strangers_expiry") : NULL;
    sp->known = sp->expiry ? xd_db_open("strangers_known") : NULL;
    if (!sp->held || !sp->meta || !sp->expiry || !sp->known) {
        /* xmppd --check-config: no store, nothing to serve */
        sp->held = sp->meta = sp->expiry = sp->known = NULL;
        xd_debug("strangers: storage not open; module inactive");
        return 0;
    }
    r |= xd_hook(m, XD_HOOK_DELIVER_LOCAL, st_deliver, sp, XD_PRIO_HIGH - 100);
    r |= xd_hook(m, XD_HOOK_C2S_STANZA, st_c2s, sp, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_ROSTER_CHANGED, st_roster_changed, sp, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_BLOCKLIST_CHANGED, st_blocklist_changed, sp, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_PRESENCE_OUT, st_presence, sp, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_ACCOUNT_REMOVED, st_account_removed, sp, XD_PRIO_DEFAULT);
    r |= xd_adhoc_register(m, NODE_LIST, "List senders of held messages", adhoc,
                           &sp->cmds[CMD_LIST]);
    r |= xd_adhoc_register(m, NODE_FETCH, "Read held messages", adhoc, &sp->cmds[CMD_FETCH]);
    r |= xd_adhoc_register(m, NODE_APPROVE, "Accept held messages", adhoc, &sp->cmds[CMD_APPROVE]);
    r |= xd_adhoc_register(m, NODE_REJECT, "Reject held messages", adhoc, &sp->cmds[CMD_REJECT]);
    if (sp->max_age > 0 &&
        !(sp->sweep = xd_timer_start(m, (double)sp->sweep_interval, (double)sp->sweep_interval,
                                     sweep_tick, sp)))
        r = -1;
    return r ? -1 : 0;
fail:
    strangers_free(sp);
    xd_module_set_data(m, NULL);
    return -1;
}

static void
strangers_unload(xd_module *m)
{
    strangers_free(xd_module_get_data(m));
    xd_module_set_data(m, NULL);
}

XD_MODULE(strangers) = {
    .abi = XD_MODULE_ABI,
    .name = "strangers",
    .settings = strangers_settings,
    .load = strangers_load,
    .unload = strangers_unload,
};
