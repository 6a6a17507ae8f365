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
 * (see send_notice for why not a subscription request), and may then:
 *   - accept: add the sender to the roster, accept its subscription request
 *     or ask for its presence (XD_HOOK_ROSTER_CHANGED: relation now known),
 *     write to it (the user started a conversation), or run the XEP-0050
 *     command "approve".  The held messages are routed again, oldest first,
 *     each with a XEP-0203 <delay/> saying when the server received it, and
 *     go through the normal path (MAM, carbons, offline storage).
 *   - reject: the XEP-0050 command "reject", denying the sender's
 *     subscription request (the roster relation drops back to none), or
 *     blocking the sender (XEP-0191 3.3): the held messages are deleted.
 *   - look: XEP-0050 commands "list" (senders) and "fetch" (a sender's
 *     messages, as a XEP-0004 result form).
 * Held messages are also dropped when they are older than max_age, and the
 * oldest go first when a user's quota is full; each is counted.
 *
 * Re-holding a released message is avoided twice over: the relation check
 * passes once the sender is known (the roster change is committed before
 * the hook runs; an ad-hoc approval records the sender as known before
 * releasing), and while a release is routing, the module lets that one
 * user/sender pair through (routing is synchronous), with nothing in the
 * stanza that a sender could forge.
 *
 * Storage (Berkeley DB, one transaction per change, committed before the
 * sender's stanza counts as taken):
 *   strangers        "user\0" + 8-byte big-endian sequence
 *                      -> version (1), arrival time (8, Unix seconds, BE),
 *                         sender length (2, BE), sender bare JID, the
 *                         stanza's XML as received
 *   strangers_known  "user\0contact" -> time (8, BE): contacts the user
 *                      wrote to or accepted without a roster item
 * Both are keyed with the user's bare JID and a NUL, so an account's
 * records leave with it.  The sequence of a new record is one more than the
 * largest held for the user, so key order is arrival order.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <xmppd/module.h>

#define NS_DELAY "urn:xmpp:delay"
#define NS_HINTS "urn:xmpp:hints"
#define NS_DATA "jabber:x:data"
#define NS_BLOCKING "urn:xmpp:blocking"
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
#define SEQ_LEN 8
#define TIME_LEN 8
#define KEY_MAX (2 * XD_JID_STR_MAX + 2)

/* A command's session lives this long between its stages (XEP-0050 3.4). */
#define SESSION_TTL 600
/* Values one submitted form may carry: a list-multi of senders. */
#define MAX_FORM_VALUES 100
/* Bytes of message text one "fetch" answer carries, so the answer stays a
 * reasonable stanza whatever the quota; the rest shows once released. */
#define FETCH_MAX_BYTES (256u * 1024u)
/* Expired records deleted per sweep transaction. */
#define SWEEP_BATCH 1000

/* Relations that make a contact known (RFC 6121 2.1.2.5). */
#define ROSTER_KNOWN (XD_ROSTER_ITEM | XD_ROSTER_FROM | XD_ROSTER_TO | XD_ROSTER_PENDING_OUT)

enum { NOTICE_MESSAGE = 0, NOTICE_SUBSCRIBE, NOTICE_NONE };
enum { CMD_LIST = 0, CMD_FETCH, CMD_APPROVE, CMD_REJECT, CMD_COUNT };

typedef struct strangers strangers;

typedef struct command {
    strangers *sp;
    int kind;
} command;

struct strangers {
    xd_module *m;
    xd_db *held; /* NULL under --check-config: the module then does nothing */
    xd_db *known;
    int enabled;
    int exempt_local;
    int notice;
    char **hosts; /* prepared domains it applies to; NULL: every served host */
    int nhosts;
    long long quota, quota_bytes, max_size, max_age, max_known, sweep_interval;
    xd_timer *sweep;
    unsigned char secret[32]; /* keys the ad-hoc session ids */
    unsigned long notice_seq;
    /* the release being routed: its messages must not be held again */
    const char *rel_user, *rel_sender;
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

/* ---- held records --------------------------------------------------------------------- */

typedef struct held_rec {
    unsigned long long seq;
    long long when;
    size_t vlen;
    char *sender; /* NULL: unreadable record (kept, never delivered) */
    char *xml;    /* only when asked for */
    int gone;     /* deleted in the transaction at hand */
} held_rec;

typedef struct held_list {
    held_rec *v;
    size_t n, cap;
    size_t plen;
    const char *only; /* this sender only (NULL: all) */
    int want_xml;
    int failed;
    int any;
    unsigned long long max_seq; /* of every record seen, for the next sequence */
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
    const unsigned char *v = val;
    held_rec r;
    size_t slen = 0;
    int readable;

    if (klen != l->plen + SEQ_LEN)
        return 0; /* not one of ours: leave it alone */
    memset(&r, 0, sizeof(r));
    r.seq = xd_db_get_be((const unsigned char *)key + l->plen, SEQ_LEN);
    if (!l->any || r.seq > l->max_seq)
        l->max_seq = r.seq;
    l->any = 1;
    r.vlen = vlen;
    readable = vlen >= RECORD_HEADER && v[0] == RECORD_VERSION &&
               (slen = (size_t)xd_db_get_be(v + 1 + TIME_LEN, 2)) > 0 && slen < XD_JID_STR_MAX &&
               RECORD_HEADER + slen < vlen && !memchr(v + RECORD_HEADER, '\0', slen);
    if (l->only &&
        (!readable || strlen(l->only) != slen || memcmp(l->only, v + RECORD_HEADER, slen) != 0))
        return 0;
    if (readable) {
        r.when = (long long)xd_db_get_be(v + 1, TIME_LEN);
        if (!(r.sender = strndup((const char *)v + RECORD_HEADER, slen)))
            goto oom;
        if (l->want_xml &&
            !(r.xml = strndup((const char *)v + RECORD_HEADER + slen, vlen - RECORD_HEADER - slen)))
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

/* A user's held records (or one sender's), in arrival order.  0 ok, -1. */
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

static int
held_del(strangers *sp, xd_txn *txn, const char *prefix, size_t plen, unsigned long long seq)
{
    unsigned char key[XD_JID_STR_MAX + 1 + SEQ_LEN];
    memcpy(key, prefix, plen);
    xd_db_put_be(key + plen, seq, SEQ_LEN);
    return xd_db_del(sp->held, txn, key, plen + SEQ_LEN) < 0 ? -1 : 0;
}

/* Delete the records marked gone, in one transaction.  0 ok, -1. */
static int
held_delete_gone(strangers *sp, const char *prefix, size_t plen, held_list *l)
{
    xd_txn *txn;
    if (xd_txn_begin(&txn) != 0)
        return -1;
    for (size_t i = 0; i < l->n; i++)
        if (l->v[i].gone && held_del(sp, txn, prefix, plen, l->v[i].seq) != 0) {
            xd_txn_abort(txn);
            return -1;
        }
    return xd_txn_commit(txn) == 0 ? 0 : -1;
}

/* ---- known contacts ------------------------------------------------------------------- */

static size_t
known_key(char *key, const char *prefix, size_t plen, const char *contact)
{
    size_t cl = strlen(contact);
    memcpy(key, prefix, plen);
    memcpy(key + plen, contact, cl);
    return plen + cl;
}

/* 1 known, 0 not, -1 storage error. */
static int
known_has(strangers *sp, const char *prefix, size_t plen, const char *contact)
{
    char key[KEY_MAX];
    void *val = NULL;
    size_t vlen;
    int r = xd_db_get(sp->known, NULL, key, known_key(key, prefix, plen, contact), &val, &vlen);
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
    size_t klen = known_key(key, prefix, plen, contact);
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

/* Is sender (bare) someone the user (bare) receives messages from?  A
 * storage error counts as known: deliver rather than lose or hold wrongly. */
static int
is_known(strangers *sp, const xd_jid *user, const xd_jid *sender, const char *prefix, size_t plen,
         const char *sender_str)
{
    int r = xd_roster_relation(user, sender);
    if (r < 0)
        return 1; /* no roster module: nobody can be told apart, so nobody is a stranger */
    if (r & ROSTER_KNOWN)
        return 1;
    return known_has(sp, prefix, plen, sender_str) != 0;
}

/* ---- holding -------------------------------------------------------------------------- */

enum { HOLD_ERROR = -1, HOLD_OK = 0, HOLD_FIRST = 1, HOLD_TOO_BIG = 2 };

/* Store st for user (bare) from sender (bare string), in one transaction:
 * expired records go, then the oldest until the new one fits the quota. */
static int
hold(strangers *sp, const xd_jid *user, const char *sender, xmpp_stanza_t *st)
{
    char prefix[XD_JID_STR_MAX + 1];
    size_t plen = xd_db_user_prefix(user, prefix, sizeof(prefix));
    unsigned char key[sizeof(prefix) + SEQ_LEN], *rec = NULL;
    size_t slen = strlen(sender), tlen = 0, rlen;
    unsigned long count = 0, nexp = 0, ndrop = 0;
    unsigned long long bytes = 0;
    char *text = NULL;
    long long now = (long long)time(NULL);
    int had = 0, ret = HOLD_ERROR;
    xd_txn *txn = NULL;
    held_list l;

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
    if (held_load(sp, txn, prefix, plen, NULL, 0, &l) != 0)
        goto abort;
    for (size_t i = 0; i < l.n; i++) {
        held_rec *r = &l.v[i];
        if (r->sender && expired(sp, r->when, now)) {
            if (held_del(sp, txn, prefix, plen, r->seq) != 0)
                goto abort_list;
            r->gone = 1;
            nexp++;
            continue;
        }
        count++;
        bytes += r->vlen;
        if (r->sender && !strcmp(r->sender, sender))
            had = 1; /* told already: its earlier messages are (or were) held */
    }
    /* the oldest first, until the new one fits (key order is arrival order) */
    for (size_t i = 0; i < l.n && ((long long)count + 1 > sp->quota ||
                                   (long long)(bytes + rlen) > sp->quota_bytes);
         i++) {
        held_rec *r = &l.v[i];
        if (r->gone)
            continue;
        if (held_del(sp, txn, prefix, plen, r->seq) != 0)
            goto abort_list;
        r->gone = 1;
        count--;
        bytes -= r->vlen;
        ndrop++;
        xd_info("strangers: %s: quota full, dropped the oldest held message (from %s)", prefix,
                r->sender ? r->sender : "?");
    }
    memcpy(key, prefix, plen);
    xd_db_put_be(key + plen, l.any ? l.max_seq + 1 : 0, SEQ_LEN);
    if (xd_db_put(sp->held, txn, key, plen + SEQ_LEN, rec, rlen) != 0)
        goto abort_list;
    held_free(&l);
    /* the commit is durable: only now may the sender's message count as taken */
    if (xd_txn_commit(txn) == 0) {
        ret = had ? HOLD_OK : HOLD_FIRST;
        if (nexp)
            xd_count(sp->m, "expired", nexp);
        if (ndrop)
            xd_count(sp->m, "dropped", ndrop);
    }
    goto out;
abort_list:
    held_free(&l);
abort:
    xd_txn_abort(txn);
out:
    free(rec);
    return ret;
}

/* ---- the notice ----------------------------------------------------------------------- */

static void
format_age(long long secs, char *buf, size_t len)
{
    if (secs % 86400 == 0)
        snprintf(buf, len, "%lld day%s", secs / 86400, secs == 86400 ? "" : "s");
    else if (secs % 3600 == 0)
        snprintf(buf, len, "%lld hour%s", secs / 3600, secs == 3600 ? "" : "s");
    else
        snprintf(buf, len, "%lld second%s", secs, secs == 1 ? "" : "s");
}

/*
 * Tell the user, once per stranger, that messages are held.
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
 * real one); "none" sends nothing (the commands still list the senders).
 */
static void
send_notice(strangers *sp, const char *user, const char *sender, const char *domain)
{
    char id[64], age[48], *body;
    size_t blen;
    xmpp_stanza_t *st;

    if (sp->notice == NOTICE_NONE)
        return;
    if (sp->notice == NOTICE_SUBSCRIBE) {
        st = xmpp_presence_new(xd_ctx());
        xmpp_stanza_set_type(st, "subscribe");
        xmpp_stanza_set_from(st, sender);
        xmpp_stanza_set_to(st, user);
        xd_route(st);
        xd_count(sp->m, "notices", 1);
        return;
    }
    if (sp->max_age > 0)
        format_age(sp->max_age, age, sizeof(age));
    blen = 4 * strlen(sender) + 2 * strlen(domain) + 1024;
    if (!(body = malloc(blen)))
        return;
    snprintf(body, blen,
             "%s, who is not in your contact list, sent you a message. It is held by the server "
             "and you will not see it until you accept the sender:\n"
             "- add %s to your contacts (xmpp:%s?roster), or accept their contact request, or "
             "write to them; or\n"
             "- run the command \"Accept held messages\" of %s "
             "(xmpp:%s?command;node=" NODE_APPROVE ").\n"
             "The command \"Read held messages\" shows them without accepting the sender. "
             "Blocking %s or the command \"Reject held messages\" deletes them.%s%s%s",
             sender, sender, sender, domain, domain, sender,
             sp->max_age > 0 ? " Held messages are deleted after " : "", sp->max_age > 0 ? age : "",
             sp->max_age > 0 ? "." : "");
    snprintf(id, sizeof(id), "strangers-%lx-%lu", (unsigned long)time(NULL), ++sp->notice_seq);
    st = xmpp_message_new(xd_ctx(), "normal", user, id);
    xmpp_stanza_set_from(st, domain);
    xmpp_stanza_add_child_ex(st, text_el("body", NULL, body), 0);
    /* XEP-0334: worth archiving, whatever the archive's preferences */
    xmpp_stanza_add_child_ex(st, xd_stanza_new("store", NS_HINTS), 0);
    free(body);
    xd_route(st);
    xd_count(sp->m, "notices", 1);
}

/* ---- releasing and deleting ----------------------------------------------------------- */

/* Route the held messages from sender (bare) to user (bare) again, oldest
 * first, each with a <delay/>; then delete them.  Returns how many were
 * released, -1 on a storage error (nothing was sent then). */
static int
release(strangers *sp, const xd_jid *user, const char *sender)
{
    char prefix[XD_JID_STR_MAX + 1];
    size_t plen = xd_db_user_prefix(user, prefix, sizeof(prefix));
    const char *prev_user = sp->rel_user, *prev_sender = sp->rel_sender;
    long long now = (long long)time(NULL);
    unsigned long nrel = 0, nexp = 0;
    held_list l;

    if (!plen || held_load(sp, NULL, prefix, plen, sender, 1, &l) != 0)
        return -1;
    if (l.n == 0) {
        held_free(&l);
        return 0;
    }
    sp->rel_user = prefix; /* the bare JID: prefix ends with its NUL */
    sp->rel_sender = sender;
    for (size_t i = 0; i < l.n; i++) {
        held_rec *r = &l.v[i];
        xmpp_stanza_t *st;
        if (expired(sp, r->when, now)) {
            r->gone = 1;
            nexp++;
            continue;
        }
        st = r->xml ? xd_stanza_parse(r->xml, strlen(r->xml)) : NULL;
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
    sp->rel_user = prev_user;
    sp->rel_sender = prev_sender;
    if (held_delete_gone(sp, prefix, plen, &l) != 0)
        xd_error("strangers: %s: could not delete released messages from %s; they may come again",
                 prefix, sender);
    held_free(&l);
    if (nrel) {
        xd_info("strangers: %s: released %lu held message(s) from %s", prefix, nrel, sender);
        xd_count(sp->m, "released", nrel);
    }
    if (nexp)
        xd_count(sp->m, "expired", nexp);
    return (int)nrel;
}

/* Delete the user's held messages from sender (a bare JID string), or from
 * every sender of domain when sender is NULL.  Returns how many, -1. */
static int
delete_held(strangers *sp, const xd_jid *user, const char *sender, const char *domain)
{
    char prefix[XD_JID_STR_MAX + 1];
    size_t plen = xd_db_user_prefix(user, prefix, sizeof(prefix));
    int n = 0;
    held_list l;

    if (!plen || held_load(sp, NULL, prefix, plen, sender, 0, &l) != 0)
        return -1;
    for (size_t i = 0; i < l.n; i++) {
        held_rec *r = &l.v[i];
        if (r->sender && (sender || (domain && !strcmp(domain_of(r->sender), domain)))) {
            r->gone = 1;
            n++;
        }
    }
    if (n && held_delete_gone(sp, prefix, plen, &l) != 0)
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

/* Release what is held from senders that are known by now (accepted while
 * this module was not running, or a release cut short). */
static void
release_known(strangers *sp, const xd_jid *user)
{
    char prefix[XD_JID_STR_MAX + 1];
    size_t plen = xd_db_user_prefix(user, prefix, sizeof(prefix));
    sender_list s;

    if (!plen || senders_load(sp, user, &s) != 0)
        return;
    for (size_t i = 0; i < s.n; i++) {
        xd_jid sj;
        if (parse_bare(s.v[i].jid, &sj) == 0 && is_known(sp, user, &sj, prefix, plen, s.v[i].jid))
            release(sp, user, s.v[i].jid);
    }
    senders_free(&s);
}

/* ---- hooks ---------------------------------------------------------------------------- */

/* XD_HOOK_DELIVER_LOCAL, after mod_blocking and before MAM, carbons and
 * offline storage. */
static int
st_deliver(xd_event *ev, void *data)
{
    strangers *sp = data;
    xmpp_stanza_t *st = ev->stanza;
    char user_s[XD_JID_STR_MAX], sender_s[XD_JID_STR_MAX], prefix[XD_JID_STR_MAX + 1];
    xd_jid user, sender;
    size_t plen;
    int r;

    if (!st || !ev->from || !ev->to || !ev->to->local[0] ||
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
    if (sp->rel_user && !strcmp(sp->rel_user, user_s) && !strcmp(sp->rel_sender, sender_s))
        return XD_PASS; /* being released right now */
    if (is_known(sp, &user, &sender, prefix, plen, sender_s))
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
    r = hold(sp, &user, sender_s, st);
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
    if (r == HOLD_FIRST)
        send_notice(sp, user_s, sender_s, user.domain);
    return XD_HANDLED;
}

/* XEP-0191 3.3: <block/> from the user.  Seen before mod_blocking answers
 * it; the held messages go only when every item is a valid JID, as
 * mod_blocking refuses the whole request otherwise.  A bare or full JID
 * item deletes that sender's messages; a domain item all of that domain's. */
static void
on_block(strangers *sp, const xd_jid *user, xmpp_stanza_t *block)
{
    unsigned long n = 0;
    int items = 0;

    for (int pass = 0; pass < 2; pass++) {
        for (xmpp_stanza_t *it = xmpp_stanza_get_children(block); it;
             it = xmpp_stanza_get_next(it)) {
            const char *jid;
            char bare[XD_JID_STR_MAX];
            xd_jid j;
            int r;
            if (!xmpp_stanza_is_tag(it) || strcmp(xmpp_stanza_get_name(it), "item") != 0)
                continue;
            jid = xmpp_stanza_get_attribute(it, "jid");
            if (!jid || xd_jid_parse(&j, jid) != 0)
                return;
            items++;
            if (pass == 0)
                continue;
            if (!j.local[0] && !j.resource[0]) {
                r = delete_held(sp, user, NULL, j.domain);
            } else {
                xd_jid_to_bare(&j);
                if (bare_str(&j, bare, sizeof(bare)))
                    continue;
                r = delete_held(sp, user, bare, NULL);
            }
            if (r > 0)
                n += (unsigned long)r;
        }
        if (!items)
            return;
    }
    if (n) {
        char u[XD_JID_STR_MAX];
        if (!bare_str(user, u, sizeof(u)))
            xd_info("strangers: %s blocked senders of %lu held message(s); deleted", u, n);
        xd_count(sp->m, "blocked", n);
    }
}

/* XD_HOOK_C2S_STANZA: the user writes to (or sends directed presence to,
 * e.g. joins a room at) a contact: the user started that conversation, so
 * the contact is known from now on and what it sent before is released.
 * Runs after mod_blocking: a stanza to a blocked JID never gets here. */
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
    user = *ev->from;
    xd_jid_to_bare(&user);
    contact = *ev->to;
    xd_jid_to_bare(&contact);
    if (!strcmp(name, "iq")) {
        xmpp_stanza_t *block = xmpp_stanza_get_child_by_name_and_ns(st, "block", NS_BLOCKING);
        if (block && is_type(st, "set") && xd_jid_equal(&user, ev->to, 1))
            on_block(sp, &user, block);
        return XD_PASS;
    }
    if (!strcmp(name, "message")) {
        if (!chat_or_normal(st) || !has_content(st))
            return XD_PASS; /* an automatic receipt or chat state is no reply */
    } else if (!strcmp(name, "presence")) {
        if (xmpp_stanza_get_type(st) || !xmpp_stanza_get_to(st))
            return XD_PASS;
    } else {
        return XD_PASS;
    }
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
    if (r < 0)
        xd_error("strangers: %s: could not record %s as known", prefix, contact_s);
    if (r > 0)
        xd_debug("strangers: %s wrote to %s: known from now on", prefix, contact_s);
    if (r > 0 || r < 0)
        release(sp, &user, contact_s);
    return XD_PASS;
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
    int n;

    if (!ev->from || !ev->to || !ev->from->local[0])
        return XD_PASS;
    user = *ev->from;
    xd_jid_to_bare(&user);
    contact = *ev->to;
    xd_jid_to_bare(&contact);
    if (bare_str(&contact, contact_s, sizeof(contact_s)))
        return XD_PASS;
    if (ev->flags & ROSTER_KNOWN) {
        release(sp, &user, contact_s);
    } else if (ev->flags == 0 && (n = delete_held(sp, &user, contact_s, NULL)) > 0) {
        xd_info("strangers: %s@%s refused %s: %d held message(s) deleted", user.local, user.domain,
                contact_s, n);
        xd_count(sp->m, "rejected", (unsigned long)n);
    }
    return XD_PASS;
}

/* XD_HOOK_PRESENCE_OUT, initial presence: catch up with approvals that
 * could not release at the time. */
static int
st_presence(xd_event *ev, void *data)
{
    strangers *sp = data;
    xd_jid user;

    if (!(ev->flags & XD_EVENT_INITIAL) || !ev->session || !xd_session_jid(ev->session))
        return XD_PASS;
    user = *xd_session_jid(ev->session);
    xd_jid_to_bare(&user);
    release_known(sp, &user);
    return XD_PASS;
}

/* ---- expiry --------------------------------------------------------------------------- */

typedef struct sweep_acc {
    const strangers *sp;
    long long now;
    unsigned char *keys[SWEEP_BATCH];
    size_t klens[SWEEP_BATCH];
    size_t n;
    int more;
} sweep_acc;

static int
sweep_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    sweep_acc *a = data;
    const unsigned char *v = val;
    if (vlen < RECORD_HEADER || v[0] != RECORD_VERSION ||
        !expired(a->sp, (long long)xd_db_get_be(v + 1, TIME_LEN), a->now))
        return 0;
    if (a->n == SWEEP_BATCH) {
        a->more = 1;
        return 1;
    }
    if (!(a->keys[a->n] = malloc(klen)))
        return 1;
    memcpy(a->keys[a->n], key, klen);
    a->klens[a->n++] = klen;
    return 0;
}

static void
sweep(void *data)
{
    strangers *sp = data;
    sweep_acc *a = calloc(1, sizeof(*a));
    xd_txn *txn = NULL;
    int ok = 1;

    if (!a)
        return;
    do {
        a->sp = sp;
        a->now = (long long)time(NULL);
        a->more = 0;
        a->n = 0;
        xd_db_foreach(sp->held, NULL, NULL, 0, sweep_visit, a);
        if (a->n && xd_txn_begin(&txn) == 0) {
            for (size_t i = 0; i < a->n && ok; i++)
                if (xd_db_del(sp->held, txn, a->keys[i], a->klens[i]) < 0)
                    ok = 0;
            if (ok && xd_txn_commit(txn) == 0) {
                xd_info("strangers: %zu held message(s) expired", a->n);
                xd_count(sp->m, "expired", a->n);
            } else {
                if (!ok)
                    xd_txn_abort(txn);
                ok = 0;
            }
        }
        for (size_t i = 0; i < a->n; i++)
            free(a->keys[i]);
    } while (ok && a->more);
    free(a);
}

/* ---- XEP-0050 commands ---------------------------------------------------------------- */

static void
hex(const unsigned char *p, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[p[i] >> 4];
        out[2 * i + 1] = digits[p[i] & 15];
    }
    out[2 * n] = '\0';
}

/* A session id the server need not remember: when it was made and a keyed
 * hash binding it to the requester's bare JID and the command, so it is
 * useless to anyone else and expires by itself. */
static void
session_id(const strangers *sp, const char *requester, const char *node, unsigned long long t,
           char *out, size_t len)
{
    size_t rl = strlen(requester), nl = strlen(node), n = 0;
    unsigned char *buf = malloc(sizeof(sp->secret) + rl + nl + 32), digest[32];
    char h[33];

    if (!buf) {
        snprintf(out, len, "x");
        return;
    }
    memcpy(buf, sp->secret, sizeof(sp->secret));
    n = sizeof(sp->secret);
    memcpy(buf + n, requester, rl + 1);
    n += rl + 1;
    memcpy(buf + n, node, nl + 1);
    n += nl + 1;
    n += (size_t)snprintf((char *)buf + n, 24, "%llu", t);
    xd_sha256(buf, n, digest);
    free(buf);
    hex(digest, 16, h);
    snprintf(out, len, "%llx-%s", t, h);
}

static int
session_valid(const strangers *sp, const char *requester, const char *node, const char *sid)
{
    char want[80], *end;
    unsigned long long t, now = (unsigned long long)time(NULL);
    unsigned char diff = 0;

    if (!sid || strlen(sid) >= sizeof(want) || !strchr(sid, '-'))
        return 0;
    t = strtoull(sid, &end, 16);
    if (*end != '-' || t + SESSION_TTL < now || t > now + 5)
        return 0;
    session_id(sp, requester, node, t, want, sizeof(want));
    if (strlen(want) != strlen(sid))
        return 0;
    for (size_t i = 0; want[i]; i++)
        diff |= (unsigned char)(want[i] ^ sid[i]);
    return diff == 0;
}

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
            n = delete_held(sp, user, jv.v[i], NULL);
            if (n > 0) {
                xd_info("strangers: %s rejected %s: %d held message(s) deleted", prefix, jv.v[i],
                        n);
                xd_count(sp->m, "rejected", (unsigned long)n);
            }
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
    char requester[XD_JID_STR_MAX], newsid[80];
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
    if (bare_str(&user, requester, sizeof(requester))) {
        cmd_error(ev, "modify", "bad-request", NULL, NULL);
        return XD_HANDLED;
    }
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
        /* a later stage: only the session this requester got for this node */
        if (!session_valid(sp, requester, node, sid)) {
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
    session_id(sp, requester, node, (unsigned long long)time(NULL), newsid, sizeof(newsid));
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

static void
strangers_free(strangers *sp)
{
    if (!sp)
        return;
    for (int i = 0; i < sp->nhosts; i++)
        free(sp->hosts[i]);
    free(sp->hosts);
    free(sp);
}

static void
make_secret(strangers *sp)
{
    FILE *f = fopen("/dev/urandom", "rb");
    if (!f || fread(sp->secret, 1, sizeof(sp->secret), f) != sizeof(sp->secret)) {
        /* weaker, but session ids stay bound to the requester all the same */
        struct timespec ts;
        unsigned char seed[64] = {0};
        clock_gettime(CLOCK_REALTIME, &ts);
        memcpy(seed, &ts, sizeof(ts) < 32 ? sizeof(ts) : 32);
        memcpy(seed + 32, &sp, sizeof(sp));
        xd_sha256(seed, sizeof(seed), sp->secret);
        xd_warn("strangers: /dev/urandom unreadable; ad-hoc session ids are weaker");
    }
    if (f)
        fclose(f);
}

static int
strangers_load(xd_module *m)
{
    strangers *sp = calloc(1, sizeof(*sp));
    const char *notice;
    int r = 0, n;

    if (!sp)
        return -1;
    sp->m = m;
    sp->enabled = xd_config_bool(m, "enabled", 1);
    sp->exempt_local = xd_config_bool(m, "exempt_local", 0);
    if (int_setting(m, "quota", 100, 1, 100000, &sp->quota) ||
        int_setting(m, "quota_bytes", 1024 * 1024, 4096, 1LL << 30, &sp->quota_bytes) ||
        int_setting(m, "max_message_size", 65536, 1024, 64LL * 1024 * 1024, &sp->max_size) ||
        int_setting(m, "max_age", 7 * 86400, 0, 10LL * 365 * 86400, &sp->max_age) ||
        int_setting(m, "sweep_interval", 3600, 1, 86400, &sp->sweep_interval) ||
        int_setting(m, "max_known", 10000, 1, 1000000, &sp->max_known))
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
    sp->known = sp->held ? xd_db_open("strangers_known") : NULL;
    if (!sp->held || !sp->known) {
        /* xmppd --check-config: no store, nothing to serve */
        sp->held = sp->known = NULL;
        xd_debug("strangers: storage not open; module inactive");
        return 0;
    }
    make_secret(sp);
    r |= xd_hook(m, XD_HOOK_DELIVER_LOCAL, st_deliver, sp, XD_PRIO_HIGH - 100);
    r |= xd_hook(m, XD_HOOK_C2S_STANZA, st_c2s, sp, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_ROSTER_CHANGED, st_roster_changed, sp, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_PRESENCE_OUT, st_presence, sp, XD_PRIO_DEFAULT);
    r |= xd_adhoc_register(m, NODE_LIST, "List senders of held messages", adhoc,
                           &sp->cmds[CMD_LIST]);
    r |= xd_adhoc_register(m, NODE_FETCH, "Read held messages", adhoc, &sp->cmds[CMD_FETCH]);
    r |= xd_adhoc_register(m, NODE_APPROVE, "Accept held messages", adhoc, &sp->cmds[CMD_APPROVE]);
    r |= xd_adhoc_register(m, NODE_REJECT, "Reject held messages", adhoc, &sp->cmds[CMD_REJECT]);
    if (sp->max_age > 0 && !(sp->sweep = xd_timer_start(m, (double)sp->sweep_interval,
                                                        (double)sp->sweep_interval, sweep, sp)))
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
    strangers *sp = xd_module_get_data(m);
    if (!sp)
        return;
    xd_timer_stop(sp->sweep);
    strangers_free(sp);
}

XD_MODULE(strangers) = {
    .abi = XD_MODULE_ABI,
    .name = "strangers",
    .settings = strangers_settings,
    .load = strangers_load,
    .unload = strangers_unload,
};
