/*
 * mod_offline: XEP-0160 (Best Practices for Handling Offline Messages) for
 * local accounts.
 *
 * XEP-0160 3 and RFC 6121 8.5.2.1.1 / 8.5.3.2.1: a message of type normal or
 * chat for a local user who has no available resource with a non-negative
 * priority is stored instead of bounced; headline, groupchat and error
 * messages are left to the core (dropped or bounced).  XEP-0160 4: the
 * messages are delivered, oldest first, when the user next sends available
 * presence with a non-negative priority, each with a XEP-0203 <delay/>
 * saying when the server received it.  XEP-0334 4.3: <no-store/> is honoured.
 *
 * The stanza is stored exactly as received (its serialized XML): end-to-end
 * encrypted messages (XEP-0384 OMEMO: an <encrypted/> payload and no
 * <body/>) must reach the user untouched, so the server never looks inside.
 *
 * Storage (Berkeley DB, each change one transaction):
 *   offline       "user@domain\0" + 8-byte big-endian sequence
 *                   -> version byte, 8-byte big-endian arrival time (Unix
 *                      seconds), the stanza's XML text
 *   offline_meta  "user@domain\0" -> version byte, next sequence (8 bytes),
 *                   record count (4 bytes), record bytes (8 bytes)
 * The sequence only ever grows (the meta record is kept when the count drops
 * to zero), so key order is arrival order and a session can remember how far
 * it has read.  A stored message is deleted only once it was handed to the
 * session; a record that does not parse is logged and kept, never dropped.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <xmppd/module.h>

#define NS_DELAY "urn:xmpp:delay"
#define NS_HINTS "urn:xmpp:hints"
#define FEATURE_MSGOFFLINE "msgoffline" /* XEP-0160 5 */

#define RECORD_VERSION 1
#define RECORD_HEADER 9 /* version + time */
#define META_VERSION 1
#define META_LEN 21 /* version + next seq + count + bytes */
#define SEQ_LEN 8

/* One delivery round per session is bounded, so a large backlog does not
 * fill the session's output queue (the core kills a stream that falls 4 MiB
 * behind); the rest follows on a timer. */
#define BATCH_MAX_MSGS 50
#define BATCH_MAX_BYTES (256u * 1024u)
#define BATCH_INTERVAL 0.2

typedef struct offline {
    xd_module *m;
    xd_db *msgs;
    xd_db *meta;
    long long quota;        /* messages per user */
    long long quota_bytes;  /* stored bytes per user */
    long long max_size;     /* bytes of one stored record */
} offline;

/* The per-user meta record, decoded. */
typedef struct meta {
    unsigned long long next_seq;
    unsigned long count;
    unsigned long long bytes;
} meta;

/* A session's delivery state: how far it has read the user's messages, and
 * the timer of the next round when a backlog is being sent. */
typedef struct sent_rec {
    unsigned char seq[SEQ_LEN];
    size_t rlen;
} sent_rec;

/*
 * Delivery to one session.  A round's messages are deleted only when the
 * client has answered the XEP-0199 ping sent right after them: an answer
 * (result or error) means it read everything before it.  If the stream dies
 * first they stay stored and come again.  The answer also paces the rounds.
 */
typedef struct flush_state {
    offline *o;
    xd_session *s;                   /* refreshed on every use: see flush_tick */
    xd_jid bare;                     /* the user, to find s again */
    xd_timer *timer;
    unsigned char after[SEQ_LEN]; /* last sequence handled (delivered or skipped) */
    int has_after;
    sent_rec unacked[BATCH_MAX_MSGS]; /* sent, waiting for the ping's answer */
    int nunacked;
    int more;                        /* the store had more than this round */
    char ack_id[40];                 /* the ping in flight, or "" */
    unsigned long nping;
} flush_state;

/* ---- meta record ----------------------------------------------------------------------- */

typedef struct scan_acc {
    size_t plen;
    meta *mt;
} scan_acc;

static int
scan_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    scan_acc *a = data;
    (void)val;
    if (klen == a->plen + SEQ_LEN) {
        unsigned long long seq = xd_db_get_be((const unsigned char *)key + a->plen, SEQ_LEN);
        if (seq + 1 > a->mt->next_seq)
            a->mt->next_seq = seq + 1;
    }
    a->mt->count++;
    a->mt->bytes += vlen;
    return 0;
}

/* Read the user's meta record in txn.  When it is missing or unreadable it
 * is rebuilt from the records themselves, so a new sequence can never land on
 * an existing key.  0 ok, -1 storage error. */
static int
meta_load(offline *o, xd_txn *txn, const char *prefix, size_t plen, meta *mt)
{
    void *val = NULL;
    size_t vlen = 0;
    int r = xd_db_get(o->meta, txn, prefix, plen, &val, &vlen);

    memset(mt, 0, sizeof(*mt));
    if (r < 0)
        return -1;
    if (r == 0 && vlen == META_LEN && ((unsigned char *)val)[0] == META_VERSION) {
        const unsigned char *p = val;
        mt->next_seq = xd_db_get_be(p + 1, 8);
        mt->count = (unsigned long)xd_db_get_be(p + 9, 4);
        mt->bytes = xd_db_get_be(p + 13, 8);
        free(val);
        return 0;
    }
    if (r == 0)
        xd_warn("offline: bad meta record for %s, rebuilding it", prefix);
    free(val);
    {
        scan_acc a = {plen, mt};
        if (xd_db_foreach(o->msgs, txn, prefix, plen, scan_visit, &a) != 0)
            return -1;
    }
    return 0;
}

static int
meta_save(offline *o, xd_txn *txn, const char *prefix, size_t plen, const meta *mt)
{
    unsigned char p[META_LEN];
    p[0] = META_VERSION;
    xd_db_put_be(p + 1, mt->next_seq, 8);
    xd_db_put_be(p + 9, mt->count, 4);
    xd_db_put_be(p + 13, mt->bytes, 8);
    /* Keyed with the NUL, like every per-user record: deleting the account
     * purges it with the messages. */
    return xd_db_put(o->meta, txn, prefix, plen, p, sizeof(p));
}

/* ---- storing (XEP-0160 3) ---------------------------------------------------------------- */

enum { STORE_OK = 0, STORE_FULL = 1, STORE_ERROR = -1 };

static int
store_message(offline *o, const xd_jid *bare, xmpp_stanza_t *st)
{
    char prefix[XD_JID_STR_MAX + 1];
    size_t plen = xd_db_user_prefix(bare, prefix, sizeof(prefix));
    unsigned char key[sizeof(prefix) + SEQ_LEN];
    unsigned char *rec = NULL;
    char *text = NULL;
    size_t tlen = 0, rlen;
    xd_txn *txn = NULL;
    meta mt;
    int ret = STORE_ERROR;

    if (!plen)
        return STORE_ERROR;
    if (xmpp_stanza_to_text(st, &text, &tlen) != XMPP_EOK || !text)
        return STORE_ERROR;
    rlen = RECORD_HEADER + tlen;
    if ((long long)rlen > o->max_size) {
        xd_info("offline: message for %s is %zu bytes, over the %lld byte limit", prefix, rlen,
                o->max_size);
        xmpp_free(xd_ctx(), text);
        return STORE_FULL;
    }
    if (!(rec = malloc(rlen))) {
        xmpp_free(xd_ctx(), text);
        return STORE_ERROR;
    }
    rec[0] = RECORD_VERSION;
    xd_db_put_be(rec + 1, (unsigned long long)time(NULL), 8);
    memcpy(rec + RECORD_HEADER, text, tlen);
    xmpp_free(xd_ctx(), text);

    if (xd_txn_begin(&txn) != 0)
        goto out;
    if (meta_load(o, txn, prefix, plen, &mt) != 0)
        goto abort;
    if ((long long)mt.count >= o->quota || (long long)(mt.bytes + rlen) > o->quota_bytes) {
        xd_info("offline: storage for %s is full (%lu messages, %llu bytes)", prefix, mt.count,
                mt.bytes);
        ret = STORE_FULL;
        goto abort;
    }
    memcpy(key, prefix, plen);
    xd_db_put_be(key + plen, mt.next_seq, SEQ_LEN);
    mt.next_seq++;
    mt.count++;
    mt.bytes += rlen;
    if (xd_db_put(o->msgs, txn, key, plen + SEQ_LEN, rec, rlen) != 0 ||
        meta_save(o, txn, prefix, plen, &mt) != 0)
        goto abort;
    /* the commit is durable: only now may the sender's message count as taken */
    if (xd_txn_commit(txn) == 0) {
        xd_debug("offline: stored message %llu for %s (%zu bytes)", mt.next_seq - 1, prefix, rlen);
        ret = STORE_OK;
    }
    goto out;
abort:
    xd_txn_abort(txn);
out:
    free(rec);
    return ret;
}

typedef struct presence_scan {
    const xd_jid *to;
    int reachable; /* an available resource with priority >= 0 */
    int full_bound; /* the addressed full JID has a session */
} presence_scan;

static int
scan_session(xd_session *s, void *data)
{
    presence_scan *p = data;
    if (xd_session_is_available(s) && xd_session_priority(s) >= 0)
        p->reachable = 1;
    if (p->to->resource[0] && xd_jid_equal(xd_session_jid(s), p->to, 1))
        p->full_bound = 1;
    return 0;
}

/* XD_HOOK_DELIVER_LOCAL, at low priority so blocking and roster policy run first.
 * About 1,150 instructions for a recipient who is online (no storage touched). */
static int
offline_deliver(xd_event *ev, void *data)
{
    offline *o = data;
    xmpp_stanza_t *st = ev->stanza;
    const char *type;
    presence_scan ps = {ev->to, 0, 0};
    xd_jid bare;
    int n, r;

    if (!st || !ev->to || !ev->to->local[0] || strcmp(xmpp_stanza_get_name(st), "message") != 0)
        return XD_PASS;
    type = xmpp_stanza_get_type(st);
    /* XEP-0160 3: normal and chat only; headline is dropped and groupchat
     * and error bounced by the core (RFC 6121 8.5.2.1.1). */
    if (type && strcmp(type, "normal") != 0 && strcmp(type, "chat") != 0)
        return XD_PASS;
    if (xmpp_stanza_get_child_by_name_and_ns(st, "no-store", NS_HINTS))
        return XD_PASS; /* XEP-0334: the sender asked us not to */
    bare = *ev->to;
    xd_jid_to_bare(&bare);
    n = xd_user_sessions(&bare, scan_session, &ps);
    /* RFC 6121 8.5.3.1 / 8.5.2.1.1: a bound full JID, or someone to deliver
     * to: the core's normal delivery applies. */
    if (ps.full_bound || ps.reachable)
        return XD_PASS;
    if (n == 0 && xd_account_exists(&bare) != 1)
        return XD_PASS; /* no such account (or no answer): the core bounces */

    r = store_message(o, &bare, st);
    if (r == STORE_OK)
        return XD_HANDLED;
    if (r == STORE_FULL)
        xd_bounce(st, "cancel", "service-unavailable", "offline storage for this user is full");
    else
        xd_bounce(st, "wait", "internal-server-error", NULL);
    return XD_HANDLED;
}

/* ---- delivery (XEP-0160 4, XEP-0203) ------------------------------------------------------- */

typedef struct pending {
    unsigned char seq[SEQ_LEN];
    char *text;       /* NUL-terminated XML */
    long long when;
    size_t rlen;      /* the record's size, for the byte count */
    int ok;           /* parsed as a record (else kept and skipped) */
} pending;

typedef struct batch {
    const flush_state *fs;
    size_t plen;
    pending items[BATCH_MAX_MSGS];
    int n;
    size_t bytes;
    int full; /* stopped early: more may follow */
} batch;

static int
batch_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    batch *b = data;
    const unsigned char *seq = (const unsigned char *)key + b->plen;
    const unsigned char *v = val;
    pending *p;

    if (klen != b->plen + SEQ_LEN)
        return 0; /* not one of ours: leave it alone */
    if (b->fs->has_after && memcmp(seq, b->fs->after, SEQ_LEN) <= 0)
        return 0; /* handled earlier by this session (a kept corrupt record) */
    if (b->n == BATCH_MAX_MSGS || (b->n > 0 && b->bytes + vlen > BATCH_MAX_BYTES)) {
        b->full = 1;
        return 1;
    }
    p = &b->items[b->n++];
    memset(p, 0, sizeof(*p));
    memcpy(p->seq, seq, SEQ_LEN);
    p->rlen = vlen;
    b->bytes += vlen;
    if (vlen > RECORD_HEADER && v[0] == RECORD_VERSION) {
        p->when = (long long)xd_db_get_be(v + 1, 8);
        if ((p->text = malloc(vlen - RECORD_HEADER + 1))) {
            memcpy(p->text, v + RECORD_HEADER, vlen - RECORD_HEADER);
            p->text[vlen - RECORD_HEADER] = '\0';
            p->ok = 1;
        }
    }
    return 0;
}

/* XEP-0203: <delay xmlns='urn:xmpp:delay' from='domain' stamp='...Z'/>. */
static void
add_delay(xmpp_stanza_t *st, const char *domain, long long when)
{
    char stamp[32];
    time_t t = (time_t)when;
    struct tm tm;
    xmpp_stanza_t *d;

    /* A message held earlier here (mod_strangers) already carries our
     * stamp, and that one is the true arrival time. */
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(st); c; c = xmpp_stanza_get_next(c)) {
        const char *ns = xmpp_stanza_is_tag(c) ? xmpp_stanza_get_ns(c) : NULL;
        const char *from = xmpp_stanza_get_attribute(c, "from");
        if (ns && !strcmp(ns, NS_DELAY) && from && !strcmp(from, domain))
            return;
    }
    d = xd_stanza_new("delay", NS_DELAY);
    if (!gmtime_r(&t, &tm) || !strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%SZ", &tm))
        snprintf(stamp, sizeof(stamp), "1970-01-01T00:00:00Z");
    xmpp_stanza_set_attribute(d, "from", domain);
    xmpp_stanza_set_attribute(d, "stamp", stamp);
    xmpp_stanza_add_child_ex(st, d, 0);
}

/* Delete the delivered records and update the count, in one transaction. */
static void
forget_acked(offline *o, const char *prefix, size_t plen, const sent_rec *done, int n)
{
    unsigned char key[XD_JID_STR_MAX + 1 + SEQ_LEN];
    xd_txn *txn;
    meta mt;

    if (n <= 0)
        return;
    if (xd_txn_begin(&txn) != 0)
        return;
    if (meta_load(o, txn, prefix, plen, &mt) != 0)
        goto abort;
    memcpy(key, prefix, plen);
    for (int i = 0; i < n; i++) {
        int r;
        memcpy(key + plen, done[i].seq, SEQ_LEN);
        if ((r = xd_db_del(o->msgs, txn, key, plen + SEQ_LEN)) < 0)
            goto abort;
        if (r == 0) {
            mt.count = mt.count ? mt.count - 1 : 0;
            mt.bytes = mt.bytes >= done[i].rlen ? mt.bytes - done[i].rlen : 0;
        }
    }
    /* kept even at zero: the sequence must keep growing (see the header) */
    if (meta_save(o, txn, prefix, plen, &mt) != 0)
        goto abort;
    if (xd_txn_commit(txn) != 0)
        xd_error("offline: %s: could not delete delivered messages; they may come again", prefix);
    return;
abort:
    xd_txn_abort(txn);
    xd_error("offline: %s: could not delete delivered messages; they may come again", prefix);
}

static void flush_tick(void *data);

/* The ping after a round; its answer confirms the round (see flush_state). */
static void
ask_ack(flush_state *fs, const char *user)
{
    char full[XD_JID_STR_MAX];
    xmpp_stanza_t *iq = xd_stanza_new("iq", NULL);

    snprintf(fs->ack_id, sizeof(fs->ack_id), "offline-ack-%lu", ++fs->nping);
    if (!iq || xd_jid_format(xd_session_jid(fs->s), 1, full, sizeof(full)) < 0) {
        if (iq)
            xmpp_stanza_release(iq);
        fs->ack_id[0] = '\0';
        return; /* nothing confirmed: the messages stay stored */
    }
    xmpp_stanza_set_type(iq, "get");
    xmpp_stanza_set_id(iq, fs->ack_id);
    xmpp_stanza_set_from(iq, xd_session_host(fs->s));
    xmpp_stanza_set_to(iq, full);
    xmpp_stanza_add_child_ex(iq, xd_stanza_new("ping", "urn:xmpp:ping"), 0);
    if (xd_session_send(fs->s, iq) != 0) {
        fs->ack_id[0] = '\0';
        xd_debug("offline: %s: stream gone before the round was confirmed; kept", user);
    }
}

/* One delivery round for a session: up to BATCH_MAX_MSGS messages. */
static void
flush_batch(flush_state *fs)
{
    offline *o = fs->o;
    xd_session *s = fs->s;
    char prefix[XD_JID_STR_MAX + 1];
    xd_jid bare = *xd_session_jid(s);
    batch *b;
    int alive = 1;
    size_t plen;

    xd_jid_to_bare(&bare);
    if (!(plen = xd_db_user_prefix(&bare, prefix, sizeof(prefix))) || !(b = calloc(1, sizeof(*b))))
        return;
    b->fs = fs;
    b->plen = plen;
    if (xd_db_foreach(o->msgs, NULL, prefix, plen, batch_visit, b) < 0) {
        xd_error("offline: %s: could not read stored messages", prefix);
        b->full = 0;
    }
    for (int i = 0; i < b->n && alive; i++) {
        pending *p = &b->items[i];
        xmpp_stanza_t *st = p->ok ? xd_stanza_parse(p->text, strlen(p->text)) : NULL;

        if (!st || !xmpp_stanza_get_name(st) || strcmp(xmpp_stanza_get_name(st), "message") != 0) {
            /* never silently lose a message: keep it for an operator to look at */
            xd_error("offline: %s: stored message %llu is unreadable; kept, not delivered",
                     prefix, xd_db_get_be(p->seq, SEQ_LEN));
            if (st)
                xmpp_stanza_release(st);
            memcpy(fs->after, p->seq, SEQ_LEN);
            fs->has_after = 1;
            continue;
        }
        add_delay(st, xd_session_host(s), p->when);
        if (xd_session_send(s, st) != 0) {
            alive = 0; /* the stream is gone: what is left stays stored */
            break;
        }
        memcpy(fs->unacked[fs->nunacked].seq, p->seq, SEQ_LEN);
        fs->unacked[fs->nunacked++].rlen = p->rlen;
        memcpy(fs->after, p->seq, SEQ_LEN);
        fs->has_after = 1;
    }
    if (b->n)
        xd_debug("offline: %s: delivery round of %d stored message(s)%s", prefix, b->n,
                 alive && b->full ? ", more to follow" : "");
    fs->more = b->full;
    if (alive && fs->nunacked)
        ask_ack(fs, prefix);
    else if (alive && b->full)
        fs->timer = xd_timer_start(o->m, BATCH_INTERVAL, 0, flush_tick, fs);
    for (int i = 0; i < b->n; i++)
        free(b->items[i].text);
    free(b);
}

static int
deliverable(xd_session *s)
{
    return xd_session_is_bound(s) && xd_session_is_available(s) && xd_session_priority(s) >= 0;
}

/* The session that owns fs now: stream resumption (XEP-0198) may have moved
 * fs from the session it was made for to the one that took that one over. */
typedef struct owner_search {
    offline *o;
    flush_state *fs;
    xd_session *found;
} owner_search;

static int
find_owner(xd_session *s, void *data)
{
    owner_search *os = data;
    if (xd_session_get_data(s, os->o->m) == os->fs) {
        os->found = s;
        return 1;
    }
    return 0;
}

static void
flush_tick(void *data)
{
    flush_state *fs = data;
    owner_search os = {fs->o, fs, NULL};
    fs->timer = NULL; /* one-shot: spent */
    xd_user_sessions(&fs->bare, find_owner, &os);
    if (!os.found)
        return;
    fs->s = os.found;
    if (deliverable(fs->s))
        flush_batch(fs);
}

static void
flush_state_free(void *p)
{
    flush_state *fs = p;
    xd_timer_stop(fs->timer);
    free(fs);
}

/* A session whose backlog is delivered and confirmed (or who had none) keeps
 * no delivery state: it is most of an idle session's module data otherwise. */
static void
flush_settle(offline *o, xd_session *s, flush_state *fs)
{
    if (!fs->timer && !fs->ack_id[0] && !fs->more && !fs->nunacked &&
        xd_session_get_data(s, o->m) == fs)
        xd_session_set_data(s, o->m, NULL, NULL); /* frees fs */
}

/* XD_HOOK_PRESENCE_OUT: available with a non-negative priority, the initial
 * presence or a later one that raised a negative priority (XEP-0160 4). */
static int
offline_presence(xd_event *ev, void *data)
{
    offline *o = data;
    xd_session *s = ev->session;
    flush_state *fs;

    if (!s || !deliverable(s))
        return XD_PASS;
    if (!(fs = xd_session_get_data(s, o->m))) {
        if (!(fs = calloc(1, sizeof(*fs))))
            return XD_PASS;
        fs->o = o;
        fs->bare = *xd_session_jid(s);
        xd_jid_to_bare(&fs->bare);
        xd_session_set_data(s, o->m, fs, flush_state_free);
    }
    fs->s = s;
    if (fs->timer || fs->ack_id[0])
        return XD_PASS; /* a backlog is already on its way */
    flush_batch(fs);
    flush_settle(o, s, fs);
    return XD_PASS;
}

/* XD_HOOK_C2S_STANZA: the client's answer to our ping confirms the round. */
static int
offline_ack(xd_event *ev, void *data)
{
    offline *o = data;
    xd_session *s = ev->session;
    flush_state *fs = s ? xd_session_get_data(s, o->m) : NULL;
    const char *type = xmpp_stanza_get_type(ev->stanza), *id = xmpp_stanza_get_id(ev->stanza);
    char prefix[XD_JID_STR_MAX + 1];
    xd_jid bare;
    size_t plen;

    if (!fs || !fs->ack_id[0] || !id || strcmp(id, fs->ack_id) != 0 || !type ||
        (strcmp(type, "result") && strcmp(type, "error")) ||
        strcmp(xmpp_stanza_get_name(ev->stanza), "iq") != 0)
        return XD_PASS;
    fs->ack_id[0] = '\0';
    fs->s = s;
    bare = *xd_session_jid(s);
    xd_jid_to_bare(&bare);
    if ((plen = xd_db_user_prefix(&bare, prefix, sizeof(prefix))))
        forget_acked(o, prefix, plen, fs->unacked, fs->nunacked);
    fs->nunacked = 0;
    if (fs->more && deliverable(s))
        flush_batch(fs); /* the next round, paced by the client's reading */
    flush_settle(o, s, fs);
    return XD_HANDLED;
}

/* ---- the module ----------------------------------------------------------------------------- */

static const xd_setting offline_settings[] = {
    {"quota", XD_SETTING_INT},
    {"quota_bytes", XD_SETTING_INT},
    {"max_message_size", XD_SETTING_INT},
    {NULL, 0},
};

static int
offline_load(xd_module *m)
{
    long long quota = xd_config_int(m, "quota", 1000);
    long long quota_bytes = xd_config_int(m, "quota_bytes", 16LL * 1024 * 1024);
    /* Twice the core's default stanza limit: a stanza that got in may grow a
     * little when serialized again (escaping), and must still fit. */
    long long max_size = xd_config_int(m, "max_message_size", 512LL * 1024);
    offline *o;
    int r = 0;

    if (quota < 0 || quota > 1000000) {
        xd_config_error(m, "quota", "must be from 0 to 1000000 messages");
        return -1;
    }
    if (quota_bytes < 4096 || quota_bytes > (1LL << 32)) {
        xd_config_error(m, "quota_bytes", "must be from 4096 to 4294967296 bytes");
        return -1;
    }
    if (max_size < 4096 || max_size > 64LL * 1024 * 1024) {
        xd_config_error(m, "max_message_size", "must be from 4096 to 67108864 bytes");
        return -1;
    }
    if (!(o = calloc(1, sizeof(*o))))
        return -1;
    o->m = m;
    o->quota = quota;
    o->quota_bytes = quota_bytes;
    o->max_size = max_size;
    xd_module_set_data(m, o);

    o->msgs = xd_db_open("offline");
    o->meta = o->msgs ? xd_db_open("offline_meta") : NULL;
    if (!o->msgs || !o->meta) {
        /* xmppd --check-config: no store, nothing to serve */
        xd_debug("offline: storage not open, offline messages disabled");
        return 0;
    }
    r |= xd_hook(m, XD_HOOK_DELIVER_LOCAL, offline_deliver, o, XD_PRIO_LOW);
    r |= xd_hook(m, XD_HOOK_PRESENCE_OUT, offline_presence, o, XD_PRIO_LOW);
    r |= xd_hook(m, XD_HOOK_C2S_STANZA, offline_ack, o, XD_PRIO_FIRST);
    r |= xd_disco_add_feature(m, FEATURE_MSGOFFLINE);
    return r ? -1 : 0;
}

static void
offline_unload(xd_module *m)
{
    free(xd_module_get_data(m));
}

XD_MODULE(offline) = {
    .abi = XD_MODULE_ABI,
    .name = "offline",
    .settings = offline_settings,
    .load = offline_load,
    .unload = offline_unload,
};
