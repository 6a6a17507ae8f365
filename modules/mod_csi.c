/*
 * mod_csi: XEP-0352 Client State Indication (urn:xmpp:csi:0).
 *
 *  - 4.1: <csi/> is offered in the stream features of authenticated client
 *    streams.  Not in the server's disco#info: the XEP defines discovery by
 *    stream feature only, and the state is a property of one stream, not of
 *    the server's address.
 *  - 4.2: <active/> and <inactive/> nonzas, no reply.  A stream begins
 *    active.  They are acted on once a resource is bound (before that there
 *    is nothing to deliver, so they are ignored).  Before authentication the
 *    feature has not been offered and the element is unknown on the stream:
 *    the core closes it with <unsupported-stanza-type/> (RFC 6120 4.9.3.22),
 *    as it does for any other unknown element there.
 *  - 3.2 (server behaviour): while a client is inactive, stanzas that are
 *    not worth waking a phone for are held and sent later, in order, as one
 *    burst: presence (only the newest per sender full JID, in the order the
 *    senders were first seen, an unavailable never being lost), chat-state
 *    only messages (the newest per sender and thread), receipts and chat
 *    markers without a body, and PEP/pubsub event notifications (OMEMO
 *    device lists included: a client reads the list before it encrypts, and
 *    a held update still goes out before any message that follows it).
 *    Everything else is urgent: it is sent at once, after what was held
 *    (messages with a <body/>, an OMEMO <encrypted/> payload, a subject, an
 *    unknown payload, carbons of such messages, errors, and every IQ: an IQ
 *    is a request or an answer someone is waiting for).
 *  - 5.1 (in-order processing): <active/> sends everything held before the
 *    next element of the stream is read.
 *  - 5.2 (stream resumption, XEP-0198): the state is not restored; the
 *    resumed stream is active.  What was held for the old stream moves with
 *    the session's data (xd_session_resume) and is sent at
 *    XD_HOOK_SESSION_RESUMED, which mod_smacks runs once <resumed/> and the
 *    stanzas it sends again (they are all older) are written.
 *
 * A held stanza goes out through xd_session_send_held(), so the STANZA_OUT
 * handlers ranked after ours (mod_smacks's count) see it only when it is
 * really written.  What is still held when a session ends is dropped: it is
 * only presence, chat states, receipts, markers and pubsub events -- never a
 * message with a body, which is urgent and never held.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xmppd/module.h>

#define NS_CSI "urn:xmpp:csi:0"
#define NS_CLIENT "jabber:client"
#define NS_SERVER "jabber:server"
#define NS_CHATSTATES "http://jabber.org/protocol/chatstates"
#define NS_RECEIPTS "urn:xmpp:receipts"
#define NS_MARKERS "urn:xmpp:chat-markers:0"
#define NS_PUBSUB_EVENT "http://jabber.org/protocol/pubsub#event"
#define NS_ADDRESS "http://jabber.org/protocol/address"
#define NS_HINTS "urn:xmpp:hints"
#define NS_SID "urn:xmpp:sid:0"
#define NS_DELAY "urn:xmpp:delay"
#define NS_CARBONS "urn:xmpp:carbons:2"
#define NS_FORWARD "urn:xmpp:forward:0"
#define NS_OMEMO_LEGACY "eu.siacs.conversations.axolotl"
#define NS_OMEMO2 "urn:xmpp:omemo:2"

/* What a stanza for an inactive client is. */
enum {
    K_URGENT = 0, /* send now, after whatever is held */
    K_AVAIL,      /* available presence: the newest per sender replaces the older */
    K_UNAVAIL,    /* unavailable presence: idem, and never lost to a later available */
    K_CHATSTATE,  /* chat-state-only message: the newest per sender and thread */
    K_OTHER       /* held as it is (receipts, markers, pubsub events, subscriptions) */
};

typedef struct csi_mod {
    xd_module *m;
    long long max_held;       /* stanzas held before they are all sent */
    long long max_held_bytes; /* bytes held before they are all sent */
    long long max_delay;      /* seconds the oldest held stanza may wait; 0: no limit */
} csi_mod;

typedef struct held {
    xmpp_stanza_t *st;
    char *key; /* sender (and thread) for K_AVAIL/K_UNAVAIL/K_CHATSTATE, else NULL */
    int kind;
    size_t bytes;
    struct held *prev, *next;
} held;

/*
 * One bound client session's state, made at its first <inactive/>.  A
 * resumption moves it to the new stream with the rest of the session's
 * data; `s` still names the old stream until XD_HOOK_SESSION_RESUMED.
 */
typedef struct csi_state {
    csi_mod *mod;
    xd_session *s;
    int inactive;
    held *head, *tail;
    size_t count, bytes;
    xd_timer *delay_timer; /* max_delay for the oldest held stanza */
} csi_state;

static const xd_setting csi_settings[] = {
    {"max_held", XD_SETTING_INT},
    {"max_held_bytes", XD_SETTING_INT},
    {"max_delay", XD_SETTING_INT},
    {NULL, 0},
};

/* ---- the held queue ------------------------------------------------------------ */

static void
held_free(held *h)
{
    if (h->st)
        xmpp_stanza_release(h->st);
    free(h->key);
    free(h);
}

static void
unlink_held(csi_state *st, held *h)
{
    if (h->prev)
        h->prev->next = h->next;
    else
        st->head = h->next;
    if (h->next)
        h->next->prev = h->prev;
    else
        st->tail = h->prev;
    h->prev = h->next = NULL;
    st->count--;
    st->bytes -= h->bytes;
}

static void
stop_delay(csi_state *st)
{
    /* a one-shot timer: its callback clears the pointer before anything else */
    if (st->delay_timer)
        xd_timer_stop(st->delay_timer);
    st->delay_timer = NULL;
}

/* Forget what is held; returns how many. */
static size_t
drop_all(csi_state *st)
{
    size_t n = 0;
    while (st->head) {
        held *h = st->head;
        unlink_held(st, h);
        held_free(h);
        n++;
    }
    return n;
}

static void
state_free(void *p)
{
    csi_state *st = p;
    stop_delay(st);
    drop_all(st);
    free(st);
}

/*
 * Send everything held, oldest first.  One at a time from the head: sending
 * may end the session (SESSION_END then empties the queue and the loop
 * stops) and nothing that re-enters here can reorder what is left.
 */
static void
flush(csi_state *st, const char *why)
{
    size_t n = 0;

    stop_delay(st);
    while (st->head) {
        held *h = st->head;
        xmpp_stanza_t *stanza = h->st;
        unlink_held(st, h);
        h->st = NULL;
        held_free(h);
        xd_session_send_held(st->s, st->mod->m, stanza); /* takes it, sent or not */
        n++;
    }
    if (n) {
        xd_count(st->mod->m, "flushed", n);
        xd_debug("csi: %s: %zu held stanza(s) sent (%s)", xd_session_peer(st->s), n, why);
    }
}

/* ---- what may wait ------------------------------------------------------------- */

/* Is ns the namespace of a stanza's own children (the stream's, or inherited)? */
static int
is_stanza_ns(const char *ns)
{
    return !ns || !strcmp(ns, NS_CLIENT) || !strcmp(ns, NS_SERVER);
}

static int
ns_is(const char *ns, const char *want)
{
    return ns && !strcmp(ns, want);
}

/* The message inside a carbon: <received|sent><forwarded><message/>. */
static xmpp_stanza_t *
carbon_inner(xmpp_stanza_t *wrap)
{
    for (xmpp_stanza_t *f = xmpp_stanza_get_children(wrap); f; f = xmpp_stanza_get_next(f)) {
        const char *n = xmpp_stanza_get_name(f);
        if (!xmpp_stanza_is_tag(f) || !n || strcmp(n, "forwarded") != 0 ||
            !ns_is(xmpp_stanza_get_ns(f), NS_FORWARD))
            continue;
        for (xmpp_stanza_t *m = xmpp_stanza_get_children(f); m; m = xmpp_stanza_get_next(m)) {
            n = xmpp_stanza_get_name(m);
            if (xmpp_stanza_is_tag(m) && n && !strcmp(n, "message"))
                return m;
        }
    }
    return NULL;
}

/*
 * K_URGENT, K_CHATSTATE or K_OTHER.  A message may wait only if every
 * payload is one we know to be unimportant; anything unknown (a call
 * proposal, an invitation, a MAM result...) is urgent, so a new kind of
 * payload is never held by mistake.
 */
static int
classify_message(xmpp_stanza_t *msg, int depth)
{
    const char *type = xmpp_stanza_get_type(msg);
    int chatstate = 0, other = 0;

    if (type && !strcmp(type, "error"))
        return K_URGENT;
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(msg); c; c = xmpp_stanza_get_next(c)) {
        const char *name, *ns;
        if (!xmpp_stanza_is_tag(c) || !(name = xmpp_stanza_get_name(c)))
            continue;
        ns = xmpp_stanza_get_ns(c);
        if (!strcmp(name, "body"))
            return K_URGENT; /* in whatever namespace it came: a human reads it */
        if (is_stanza_ns(ns)) {
            if (!strcmp(name, "thread"))
                continue;
            return K_URGENT; /* <subject/> (a MUC join ends with it), <error/>, ... */
        }
        if (!strcmp(ns, NS_OMEMO_LEGACY) || !strcmp(ns, NS_OMEMO2))
            return K_URGENT; /* encrypted message, key transport or heartbeat */
        if (!strcmp(ns, NS_CHATSTATES)) {
            chatstate = 1;
            continue;
        }
        if (!strcmp(ns, NS_HINTS) || !strcmp(ns, NS_SID) || !strcmp(ns, NS_DELAY))
            continue; /* metadata about the rest */
        if (!strcmp(ns, NS_RECEIPTS) || !strcmp(ns, NS_MARKERS) ||
            !strcmp(ns, NS_PUBSUB_EVENT) || !strcmp(ns, NS_ADDRESS)) {
            other = 1;
            continue;
        }
        if (!strcmp(ns, NS_CARBONS) && depth == 0 &&
            (!strcmp(name, "received") || !strcmp(name, "sent"))) {
            /* a carbon is as urgent as the message it carries */
            xmpp_stanza_t *inner = carbon_inner(c);
            if (!inner || classify_message(inner, 1) == K_URGENT)
                return K_URGENT;
            other = 1;
            continue;
        }
        return K_URGENT;
    }
    if (other)
        return K_OTHER;
    return chatstate ? K_CHATSTATE : K_OTHER;
}

/* Text of the first <thread/> child, or NULL (to be freed with xmpp_free). */
static char *
thread_of(xmpp_stanza_t *msg)
{
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(msg); c; c = xmpp_stanza_get_next(c)) {
        const char *name = xmpp_stanza_get_name(c);
        if (xmpp_stanza_is_tag(c) && name && !strcmp(name, "thread") &&
            is_stanza_ns(xmpp_stanza_get_ns(c)))
            return xmpp_stanza_get_text(c);
    }
    return NULL;
}

/* The kind of st, and in *key (malloc'ed) what it is merged on, if anything. */
static int
classify(xmpp_stanza_t *st, char **key)
{
    const char *name = xmpp_stanza_get_name(st);
    const char *type = xmpp_stanza_get_type(st);
    const char *from = xmpp_stanza_get_from(st);
    int kind;

    *key = NULL;
    if (!name)
        return K_URGENT;
    if (!strcmp(name, "presence")) {
        if (!type || !strcmp(type, "available"))
            kind = K_AVAIL;
        else if (!strcmp(type, "unavailable"))
            kind = K_UNAVAIL;
        else if (!strcmp(type, "error"))
            return K_URGENT; /* the answer to something the client did */
        else
            return K_OTHER; /* subscription requests and answers: each one counts */
        if (!from)
            return K_OTHER;
        if (!(*key = strdup(from)))
            return K_URGENT;
        return kind;
    }
    if (!strcmp(name, "message")) {
        char *thread;
        size_t len;
        kind = classify_message(st, 0);
        if (kind != K_CHATSTATE)
            return kind;
        if (!from)
            return K_OTHER;
        /* one chat state per sender, message type and thread */
        thread = thread_of(st);
        len = strlen(from) + (type ? strlen(type) : 0) + (thread ? strlen(thread) : 0) + 3;
        if ((*key = malloc(len)))
            snprintf(*key, len, "%s\n%s\n%s", from, type ? type : "", thread ? thread : "");
        if (thread)
            xmpp_free(xd_ctx(), thread);
        return *key ? K_CHATSTATE : K_URGENT;
    }
    return K_URGENT; /* IQs, and anything else */
}

static held *
find_held(csi_state *st, int kind, const char *key)
{
    for (held *h = st->head; h; h = h->next)
        if (h->kind == kind && h->key && !strcmp(h->key, key))
            return h;
    return NULL;
}

/* h now carries stanza (the newer one) instead of what it held. */
static void
replace_held(csi_state *st, held *h, xmpp_stanza_t *stanza, size_t bytes, int kind)
{
    xmpp_stanza_release(h->st);
    h->st = xmpp_stanza_clone(stanza);
    st->bytes = st->bytes - h->bytes + bytes;
    h->bytes = bytes;
    h->kind = kind;
    xd_count(st->mod->m, "superseded", 1);
}

/*
 * Keep a reference to stanza (borrowed from the event) at its place in the
 * queue.  Takes key.  0 ok, -1 out of memory (nothing changed).
 */
static int
hold(csi_state *st, xmpp_stanza_t *stanza, int kind, char *key)
{
    char *text = NULL;
    size_t bytes = 0;
    held *h, *a, *u;

    /* its size on the wire bounds what a session can make us keep */
    if (xmpp_stanza_to_text(stanza, &text, &bytes) != XMPP_EOK) {
        free(key);
        return -1;
    }
    xmpp_free(xd_ctx(), text);
    xd_count(st->mod->m, "held", 1);

    if (kind == K_AVAIL || kind == K_UNAVAIL) {
        /* At most an unavailable followed by an available per sender: the
         * newest state wins, but an unavailable is delivered even when the
         * sender came back since (the client may keep per-resource state). */
        a = find_held(st, K_AVAIL, key);
        u = find_held(st, K_UNAVAIL, key);
        if (kind == K_AVAIL && a) {
            replace_held(st, a, stanza, bytes, K_AVAIL);
            free(key);
            return 0;
        }
        if (kind == K_UNAVAIL && (a || u)) {
            if (u) {
                replace_held(st, u, stanza, bytes, K_UNAVAIL);
                if (a) {
                    unlink_held(st, a);
                    held_free(a);
                    xd_count(st->mod->m, "superseded", 1);
                }
            } else {
                replace_held(st, a, stanza, bytes, K_UNAVAIL); /* keeps a's place */
            }
            free(key);
            return 0;
        }
    } else if (kind == K_CHATSTATE && (h = find_held(st, K_CHATSTATE, key))) {
        replace_held(st, h, stanza, bytes, K_CHATSTATE);
        free(key);
        return 0;
    }
    if (!(h = calloc(1, sizeof(*h)))) {
        free(key);
        return -1;
    }
    h->st = xmpp_stanza_clone(stanza);
    h->key = key;
    h->kind = kind;
    h->bytes = bytes;
    h->prev = st->tail;
    if (st->tail)
        st->tail->next = h;
    else
        st->head = h;
    st->tail = h;
    st->count++;
    st->bytes += bytes;
    return 0;
}

/* ---- hooks ----------------------------------------------------------------------- */

static void
delay_expired(void *data)
{
    csi_state *st = data;
    st->delay_timer = NULL; /* spent */
    xd_count(st->mod->m, "delay_flushes", 1);
    flush(st, "max_delay");
}

/* XD_HOOK_STANZA_OUT at XD_PRIO_HIGH: before mod_smacks counts it.  About 30
 * instructions for an active client. */
static int
csi_out(xd_event *ev, void *data)
{
    csi_mod *cm = data;
    csi_state *st = xd_session_get_data(ev->session, cm->m);
    char *key;
    int kind;

    /* A state that does not name this session was moved here by a
     * resumption still under way: mod_smacks is sending again what the
     * client did not acknowledge, older than what is held. */
    if (!st || !ev->stanza || st->s != ev->session)
        return XD_PASS;
    if (!st->inactive) {
        if (st->head)
            flush(st, "active"); /* re-entered from a flush: what is left goes first */
        return XD_PASS;
    }
    kind = classify(ev->stanza, &key);
    if (kind == K_URGENT) {
        free(key);
        if (st->head)
            flush(st, "urgent stanza");
        return XD_PASS;
    }
    if (hold(st, ev->stanza, kind, key) != 0) {
        flush(st, "out of memory"); /* and this one goes out in order */
        return XD_PASS;
    }
    if (st->count >= (size_t)cm->max_held || st->bytes > (size_t)cm->max_held_bytes) {
        xd_count(cm->m, "limit_flushes", 1);
        flush(st, st->count >= (size_t)cm->max_held ? "max_held" : "max_held_bytes");
    } else if (cm->max_delay > 0 && !st->delay_timer) {
        st->delay_timer = xd_timer_start(cm->m, (double)cm->max_delay, 0, delay_expired, st);
    }
    return XD_HANDLED;
}

/* XD_HOOK_SESSION_END: the bound session is going for good.  Only presence,
 * chat states, receipts, markers and pubsub events are ever held (never a
 * message with a body): they may go. */
static int
csi_session_end(xd_event *ev, void *data)
{
    csi_mod *cm = data;
    csi_state *st = xd_session_get_data(ev->session, cm->m);
    size_t n;

    if (!st)
        return XD_PASS;
    st->s = ev->session; /* even if a resumption ends before it is announced */
    st->inactive = 0;    /* nothing sent to it from here on is held */
    stop_delay(st);
    if ((n = drop_all(st))) {
        xd_count(cm->m, "dropped", n);
        xd_debug("csi: %s: %zu held stanza(s) dropped (session ended)", xd_session_peer(st->s), n);
    }
    return XD_PASS;
}

/* XD_HOOK_SESSION_RESUMED: the old session's state came here with its data,
 * and mod_smacks has written <resumed/> and its re-sends: now what was held. */
static int
csi_resumed(xd_event *ev, void *data)
{
    csi_mod *cm = data;
    csi_state *st = xd_session_get_data(ev->session, cm->m);

    if (!st)
        return XD_PASS;
    st->s = ev->session;
    st->inactive = 0; /* 5.2: the resumed stream starts active */
    flush(st, "stream resumed");
    return XD_PASS;
}

/* ---- the protocol -------------------------------------------------------------- */

static void
csi_features(xd_session *s, xmpp_stanza_t *features, void *data)
{
    (void)data;
    if (xd_session_is_authenticated(s))
        xmpp_stanza_add_child_ex(features, xd_stanza_new("csi", NS_CSI), 0);
}

static csi_state *
state_new(csi_mod *cm, xd_session *s)
{
    csi_state *st = calloc(1, sizeof(*st));
    if (!st) {
        xd_warn("csi: %s: out of memory; <inactive/> ignored", xd_session_peer(s));
        return NULL;
    }
    st->mod = cm;
    st->s = s;
    xd_session_set_data(s, cm->m, st, state_free);
    return st;
}

static int
csi_element(xd_session *s, xmpp_stanza_t *el, void *data)
{
    csi_mod *cm = data;
    const char *name = xmpp_stanza_get_name(el);
    csi_state *st;

    if (!name || (strcmp(name, "active") != 0 && strcmp(name, "inactive") != 0))
        return XD_PASS; /* <csi/> or anything else from a client: a stream error */
    if (!xd_session_is_authenticated(s))
        return XD_PASS; /* not offered yet: unsupported-stanza-type */
    if (!xd_session_is_bound(s)) {
        xd_debug("csi: %s: <%s/> before resource binding ignored", xd_session_peer(s), name);
        return XD_HANDLED;
    }
    st = xd_session_get_data(s, cm->m);
    if (!strcmp(name, "active")) {
        if (!st)
            return XD_HANDLED; /* never inactive: nothing held */
        if (st->inactive)
            xd_debug("csi: %s: active", xd_session_peer(s));
        st->inactive = 0;
        /* 5.1: all of it is written before the next element is processed */
        flush(st, "client active");
        return XD_HANDLED;
    }
    if (!st && !(st = state_new(cm, s)))
        return XD_HANDLED; /* the stream stays active: nothing is lost */
    if (!st->inactive)
        xd_debug("csi: %s: inactive", xd_session_peer(s));
    st->inactive = 1;
    return XD_HANDLED;
}

/* ---- module ------------------------------------------------------------------------ */

static int
csi_load(xd_module *m)
{
    csi_mod *cm = calloc(1, sizeof(*cm));
    int r = 0;

    if (!cm)
        return -1;
    cm->m = m;
    cm->max_held = xd_config_int(m, "max_held", 100);
    cm->max_held_bytes = xd_config_int(m, "max_held_bytes", 65536);
    cm->max_delay = xd_config_int(m, "max_delay", 0);
    /* The held queue is searched linearly when a newer presence replaces an
     * older one: kept short on purpose. */
    if (cm->max_held < 1 || cm->max_held > 1000) {
        xd_config_error(m, "max_held", "must be 1 to 1000 stanzas");
        free(cm);
        return -1;
    }
    if (cm->max_held_bytes < 1024 || cm->max_held_bytes > 16777216) {
        xd_config_error(m, "max_held_bytes", "must be 1024 to 16777216 bytes");
        free(cm);
        return -1;
    }
    if (cm->max_delay < 0 || cm->max_delay > 86400) {
        xd_config_error(m, "max_delay", "must be 0 (no limit) to 86400 seconds");
        free(cm);
        return -1;
    }
    xd_module_set_data(m, cm);
    r |= xd_stream_features_add(m, XD_STREAM_C2S, csi_features, cm);
    r |= xd_stream_element_register(m, XD_STREAM_C2S, NS_CSI, csi_element, cm);
    r |= xd_hook(m, XD_HOOK_STANZA_OUT, csi_out, cm, XD_PRIO_HIGH);
    r |= xd_hook(m, XD_HOOK_SESSION_END, csi_session_end, cm, XD_PRIO_FIRST);
    r |= xd_hook(m, XD_HOOK_SESSION_RESUMED, csi_resumed, cm, XD_PRIO_DEFAULT);
    return r ? -1 : 0;
}

static void
csi_unload(xd_module *m)
{
    /* Sessions (and their states) are destroyed before modules unload. */
    free(xd_module_get_data(m));
}

XD_MODULE(csi) = {
    .abi = XD_MODULE_ABI,
    .name = "csi",
    .settings = csi_settings,
    .load = csi_load,
    .unload = csi_unload,
};
