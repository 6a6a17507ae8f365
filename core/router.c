/*
 * The router: bound client sessions indexed by full and bare JID, and
 * delivery per RFC 6121 8.5 after the pipeline hooks had their say.
 * Errors are never answered with errors (RFC 6120 8.3.1).
 */
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include <gnutls/crypto.h>

#include "session.h"

#define NS_STANZAS "urn:ietf:params:xml:ns:xmpp-stanzas"

xmpp_ctx_t *
xd_ctx(void)
{
    return xd_srv.ctx;
}

int
xd_router_init(void)
{
    xd_srv.full_jids = xd_hashtab_new(1024);
    xd_srv.bare_jids = xd_hashtab_new(1024);
    xd_srv.iq_handlers = xd_hashtab_new(64);
    xd_srv.elements[0] = xd_hashtab_new(16);
    xd_srv.elements[1] = xd_hashtab_new(16);
    return xd_srv.full_jids && xd_srv.bare_jids && xd_srv.iq_handlers && xd_srv.elements[0] &&
                   xd_srv.elements[1]
               ? 0
               : -1;
}

void
xd_router_free(void)
{
    xd_hashtab_free(xd_srv.full_jids);
    xd_hashtab_free(xd_srv.bare_jids);
    xd_hashtab_free(xd_srv.iq_handlers);
    xd_hashtab_free(xd_srv.elements[0]);
    xd_hashtab_free(xd_srv.elements[1]);
}

/* ---- stanza helpers --------------------------------------------------------- */

xmpp_stanza_t *
xd_stanza_new(const char *name, const char *ns)
{
    xmpp_stanza_t *st = xmpp_stanza_new(xd_srv.ctx);
    if (!st)
        return NULL;
    xmpp_stanza_set_name(st, name);
    if (ns)
        xmpp_stanza_set_ns(st, ns);
    return st;
}

int
xd_stanza_add_text_child(xmpp_stanza_t *parent, const char *name, const char *text)
{
    xmpp_stanza_t *el = xd_stanza_new(name, NULL);
    xmpp_stanza_t *t = xmpp_stanza_new(xd_srv.ctx);

    if (!el || !t || xmpp_stanza_set_text(t, text) != XMPP_EOK) {
        if (el)
            xmpp_stanza_release(el);
        if (t)
            xmpp_stanza_release(t);
        return -1;
    }
    xmpp_stanza_add_child_ex(el, t, 0);
    xmpp_stanza_add_child_ex(parent, el, 0);
    return 0;
}

/* A reply shell: same name and id, 'to' and 'from' swapped.  Built by hand
 * because xmpp_stanza_reply() copies every attribute and sets a NULL 'to'
 * when the original had no 'from'. */
static xmpp_stanza_t *
reply_shell(xmpp_stanza_t *st, const char *type)
{
    const char *id = xmpp_stanza_get_id(st);
    const char *from = xmpp_stanza_get_from(st);
    const char *to = xmpp_stanza_get_to(st);
    xmpp_stanza_t *r = xd_stanza_new(xmpp_stanza_get_name(st), NULL);
    if (!r)
        return NULL;
    xmpp_stanza_set_type(r, type);
    if (id)
        xmpp_stanza_set_id(r, id);
    if (from)
        xmpp_stanza_set_to(r, from);
    if (to)
        xmpp_stanza_set_from(r, to);
    return r;
}

xmpp_stanza_t *
xd_iq_result(xmpp_stanza_t *iq)
{
    return reply_shell(iq, "result");
}

xmpp_stanza_t *
xd_error_reply(xmpp_stanza_t *st, const char *type, const char *condition, const char *text)
{
    xmpp_stanza_t *r = reply_shell(st, "error");
    xmpp_stanza_t *e = xd_stanza_new("error", NULL);
    xmpp_stanza_t *c = xd_stanza_new(condition, NS_STANZAS);
    if (!r || !e || !c) {
        if (r)
            xmpp_stanza_release(r);
        if (e)
            xmpp_stanza_release(e);
        if (c)
            xmpp_stanza_release(c);
        return NULL;
    }
    xmpp_stanza_set_type(e, type);
    xmpp_stanza_add_child_ex(e, c, 0);
    if (text) {
        xmpp_stanza_t *t = xd_stanza_new("text", NS_STANZAS);
        xmpp_stanza_t *body = xmpp_stanza_new(xd_srv.ctx);
        if (t && body) {
            xmpp_stanza_set_text(body, text);
            xmpp_stanza_add_child_ex(t, body, 0);
            xmpp_stanza_add_child_ex(e, t, 0);
        } else {
            if (t)
                xmpp_stanza_release(t);
            if (body)
                xmpp_stanza_release(body);
        }
    }
    xmpp_stanza_add_child_ex(r, e, 0);
    return r;
}

void
xd_bounce(xmpp_stanza_t *st, const char *type, const char *condition, const char *text)
{
    const char *t = xmpp_stanza_get_type(st);
    const char *name = xmpp_stanza_get_name(st);
    xmpp_stanza_t *err;

    if (t && (!strcmp(t, "error") || (name && !strcmp(name, "iq") && !strcmp(t, "result"))))
        return;
    if (!xmpp_stanza_get_from(st))
        return; /* nobody to tell */
    if ((err = xd_error_reply(st, type, condition, text)))
        xd_route(err);
}

/* ---- the tables -------------------------------------------------------------- */

static char *
jid_string(const xd_jid *j, int full)
{
    char buf[XD_JID_STR_MAX];
    return xd_jid_format(j, full, buf, sizeof(buf)) < 0 ? NULL : strdup(buf);
}

void
xd_router_bind(xd_session *s)
{
    xd_session *head = xd_hashtab_get(xd_srv.bare_jids, s->bare);
    s->res_next = head;
    xd_hashtab_put(xd_srv.bare_jids, s->bare, s);
    xd_hashtab_put(xd_srv.full_jids, s->full, s);
    s->bound = 1;
}

void
xd_router_unbind(xd_session *s)
{
    xd_session *head;
    if (!s->bound)
        return;
    s->bound = 0;
    s->available = 0;
    if (xd_hashtab_get(xd_srv.full_jids, s->full) == s)
        xd_hashtab_del(xd_srv.full_jids, s->full);
    head = xd_hashtab_get(xd_srv.bare_jids, s->bare);
    if (head == s) {
        if (s->res_next)
            xd_hashtab_put(xd_srv.bare_jids, s->res_next->bare, s->res_next);
        else
            xd_hashtab_del(xd_srv.bare_jids, s->bare);
    } else {
        for (; head && head->res_next != s; head = head->res_next)
            ;
        if (head)
            head->res_next = s->res_next;
    }
    s->res_next = NULL;
}

/* s takes old's place in both tables (stream resumption). */
void
xd_router_replace(xd_session *old, xd_session *s)
{
    xd_session *head = xd_hashtab_get(xd_srv.bare_jids, s->bare); /* s has old's keys */
    s->res_next = old->res_next;
    if (head == old)
        xd_hashtab_put(xd_srv.bare_jids, s->bare, s);
    else {
        for (; head && head->res_next != old; head = head->res_next)
            ;
        if (head)
            head->res_next = s;
    }
    xd_hashtab_put(xd_srv.full_jids, s->full, s);
    old->res_next = NULL;
    s->bound = 1;
}

xd_session *
xd_router_find_full(const char *full)
{
    return xd_hashtab_get(xd_srv.full_jids, full);
}

int
xd_session_bind(xd_session *s, const char *resource)
{
    char res[XD_JID_PART_MAX + 1];
    xd_session *old;
    xd_event ev = {.session = s};

    if (s->dead || s->closing || s->bound)
        return -1;
    if (resource && *resource) {
        if (xd_jid_prep_resource(res, sizeof(res), resource) != 0)
            return -1;
    } else {
        unsigned char r[8];
        gnutls_rnd(GNUTLS_RND_NONCE, r, sizeof(r));
        snprintf(res, sizeof(res), "xmppd-%02x%02x%02x%02x%02x%02x%02x%02x", r[0], r[1], r[2],
                 r[3], r[4], r[5], r[6], r[7]);
    }
    memcpy(s->jid.resource, res, strlen(res) + 1);
    free(s->full);
    free(s->bare);
    s->full = jid_string(&s->jid, 1);
    s->bare = jid_string(&s->jid, 0);
    if (!s->full || !s->bare)
        return -1;
    /* RFC 6120 7.7.2.2: the newer session wins; the older one is told why. */
    if ((old = xd_router_find_full(s->full)) && old != s)
        xd_session_close(old, "conflict", "replaced by a new connection");
    xd_router_bind(s);
    ev_timer_stop(xd_srv.loop, &s->timer); /* negotiation is over */
    ev.from = &s->jid;
    xd_info("%s: session started for %s", s->peer, s->full);
    xd_hooks_run(XD_HOOK_SESSION_START, &ev);
    return 0;
}

int
xd_user_sessions(const xd_jid *bare, xd_session_iter_fn fn, void *data)
{
    char key[XD_JID_STR_MAX];
    xd_session *s, *next;
    int n = 0;
    if (xd_jid_format(bare, 0, key, sizeof(key)) < 0)
        return 0;
    for (s = xd_hashtab_get(xd_srv.bare_jids, key); s; s = next) {
        next = s->res_next;
        n++;
        if (fn(s, data))
            break;
    }
    return n;
}

typedef struct sess_list {
    xd_session **v;
    size_t n, cap;
} sess_list;

static int
collect_session(xd_session *s, void *data)
{
    sess_list *l = data;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        xd_session **v = realloc(l->v, cap * sizeof(*v));
        if (!v)
            return 1;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = s;
    return 0;
}

/* Collected first: closing a session changes the chain being walked. */
void
xd_close_user_sessions(const xd_jid *bare, const char *condition, const char *text)
{
    sess_list l = {0};

    if (!xd_srv.bare_jids)
        return; /* xmppctl: no sessions */
    xd_user_sessions(bare, collect_session, &l);
    for (size_t i = 0; i < l.n; i++)
        xd_session_close(l.v[i], condition, text);
    free(l.v);
}

/* ---- delivery ----------------------------------------------------------------- */

void
xd_deliver_to_session(xd_session *s, xmpp_stanza_t *st)
{
    xd_session_send(s, st);
}

static int
type_is(xmpp_stanza_t *st, const char *t)
{
    const char *v = xmpp_stanza_get_type(st);
    return v ? strcmp(v, t) == 0 : strcmp(t, "normal") == 0;
}

/* RFC 6121 8.5.2.1: a message for the bare JID. */
static void
deliver_message_bare(xd_session *head, xmpp_stanza_t *st)
{
    int best = -1, n = 0;
    int headline = type_is(st, "headline");

    for (xd_session *s = head; s; s = s->res_next)
        if (s->available && s->priority >= 0 && s->priority > best)
            best = s->priority;
    for (xd_session *s = head, *next; s; s = next) {
        next = s->res_next; /* a failed send unbinds s */
        if (s->available && s->priority >= 0 && (headline || s->priority == best)) {
            xd_session_send(s, xmpp_stanza_clone(st));
            n++;
        }
    }
    if (n == 0 && !headline && !type_is(st, "error"))
        xd_bounce(st, "cancel", "service-unavailable", NULL);
}

/* Is there such an account?  A bound session answers without storage. */
static int
account_exists(const xd_jid *to, xd_session *head)
{
    return head ? 1 : xd_account_exists(to);
}

static void
deliver_local(xd_event *ev, xmpp_stanza_t *st)
{
    const char *name = xmpp_stanza_get_name(st);
    char key[XD_JID_STR_MAX];
    xd_session *target = NULL, *head;
    int exists;

    if (xd_hooks_run(XD_HOOK_DELIVER_LOCAL, ev) != XD_PASS)
        return;
    if (ev->to->resource[0] && xd_jid_format(ev->to, 1, key, sizeof(key)) >= 0)
        target = xd_router_find_full(key);
    if (target) {
        xd_session_send(target, xmpp_stanza_clone(st));
        return;
    }
    if (xd_jid_format(ev->to, 0, key, sizeof(key)) < 0)
        return;
    head = xd_hashtab_get(xd_srv.bare_jids, key);
    exists = account_exists(ev->to, head);
    if (exists != 1) {
        /* RFC 6121 8.5.1: no such user.  Presence is dropped silently. */
        if (strcmp(name, "presence") != 0)
            xd_bounce(st, exists < 0 ? "wait" : "cancel",
                      exists < 0 ? "internal-server-error" : "service-unavailable", NULL);
        return;
    }
    if (!strcmp(name, "message")) {
        if (type_is(st, "groupchat") || type_is(st, "error")) {
            xd_bounce(st, "cancel", "service-unavailable", NULL);
            return;
        }
        deliver_message_bare(head, st);
    } else if (!strcmp(name, "presence")) {
        /* RFC 6121 8.5.2.1.1 and 8.5.3.3: a presence for an absent resource
         * is dropped; for the bare JID it reaches every available resource. */
        if (ev->to->resource[0])
            return;
        for (xd_session *s = head, *next; s; s = next) {
            next = s->res_next; /* a failed send unbinds s */
            if (s->available)
                xd_session_send(s, xmpp_stanza_clone(st));
        }
    } else if (!strcmp(name, "iq")) {
        if (ev->to->resource[0])
            xd_bounce(st, "cancel", "service-unavailable", NULL);
        else if (xd_iq_dispatch(XD_IQ_ACCOUNT, ev) == XD_PASS)
            xd_bounce(st, "cancel", "service-unavailable", NULL);
    }
}

static void
deliver_host(xd_event *ev, xmpp_stanza_t *st)
{
    const char *name = xmpp_stanza_get_name(st);
    if (!strcmp(name, "iq")) {
        if (xd_iq_pending_reply(ev))
            return;
        if (xd_iq_dispatch(XD_IQ_HOST, ev) == XD_PASS)
            xd_bounce(st, "cancel", "service-unavailable", NULL);
        return;
    }
    if (xd_hooks_run(XD_HOOK_HOST_STANZA, ev) != XD_PASS)
        return;
    if (!strcmp(name, "message") && !type_is(st, "error") && !type_is(st, "headline"))
        xd_bounce(st, "cancel", "service-unavailable", NULL);
    /* presence to the server itself: nothing to do unless a module hooked it */
}

/* Route st; ev->from and ev->to are prepared. */
static void
route(xd_event *ev, xmpp_stanza_t *st)
{
    ev->stanza = st;
    if (xd_hooks_run(XD_HOOK_ROUTE, ev) != XD_PASS)
        return;
    if (xd_is_local_host(ev->to->domain)) {
        if (ev->to->local[0])
            deliver_local(ev, st);
        else
            deliver_host(ev, st);
        return;
    }
    if (xd_hooks_run(XD_HOOK_DELIVER_REMOTE, ev) == XD_PASS)
        xd_bounce(st, "cancel", "remote-server-not-found", NULL);
}

static int
is_routable_name(const char *name)
{
    return name && (!strcmp(name, "message") || !strcmp(name, "presence") || !strcmp(name, "iq"));
}

void
xd_route(xmpp_stanza_t *st)
{
    xd_route_flags(st, 0);
}

void
xd_route_flags(xmpp_stanza_t *st, unsigned flags)
{
    xd_jid from, to;
    xd_event ev = {.flags = flags};
    const char *f = xmpp_stanza_get_from(st), *t = xmpp_stanza_get_to(st);

    if (!is_routable_name(xmpp_stanza_get_name(st)) || !t || xd_jid_parse(&to, t) != 0) {
        xd_warn("router: dropping an internal stanza without a valid 'to'");
        xmpp_stanza_release(st);
        return;
    }
    if (f && xd_jid_parse(&from, f) == 0)
        ev.from = &from;
    ev.to = &to;
    route(&ev, st);
    xmpp_stanza_release(st);
}

static int
is_broadcast_presence(xmpp_stanza_t *st)
{
    const char *type = xmpp_stanza_get_type(st);
    return !strcmp(xmpp_stanza_get_name(st), "presence") &&
           (!type || !strcmp(type, "unavailable"));
}

/* RFC 6121 4.2, 4.4, 4.5: a client's presence without 'to' is its
 * availability.  The core records it (delivery to the bare JID depends on
 * it); modules broadcast it: to the user's own resources, to contacts... */
static void
presence_out(xd_event *ev, xd_session *s, xmpp_stanza_t *st)
{
    int was = s->available;
    xd_session_set_presence(s, st);
    ev->flags = (!s->presence_seen && s->available) ? XD_EVENT_INITIAL : 0;
    if (s->available)
        s->presence_seen = 1;
    if (!was && !s->available)
        return; /* unavailable while unavailable: nothing changed */
    xd_hooks_run(XD_HOOK_PRESENCE_OUT, ev);
}

/* A stanza from a client or server stream; takes st. */
void
xd_route_from(xd_session *s, xmpp_stanza_t *st)
{
    xd_jid to, from;
    xd_event ev = {.session = s, .stanza = st};
    const char *t = xmpp_stanza_get_to(st), *f = xmpp_stanza_get_from(st);
    char full[XD_JID_STR_MAX];

    if (s->type == XD_STREAM_C2S) {
        /* RFC 6120 8.1.2.1: the server stamps the sender's full JID. */
        if (xd_jid_format(&s->jid, 1, full, sizeof(full)) < 0) {
            xmpp_stanza_release(st);
            return;
        }
        xmpp_stanza_set_from(st, full);
        ev.from = &s->jid;
    } else {
        /* RFC 6120 8.1.2.2: a server stanza names its sender and recipient. */
        if (!f || !t || xd_jid_parse(&from, f) != 0) {
            xd_session_close(s, !f || !t ? "improper-addressing" : "invalid-from", NULL);
            xmpp_stanza_release(st);
            return;
        }
        ev.from = &from;
    }
    if (t) {
        if (xd_jid_parse(&to, t) != 0) {
            if (s->type == XD_STREAM_S2S) {
                /* its 'from' is not checked yet: no bounce to it */
                xd_session_close(s, "improper-addressing", "unusable 'to'");
                xmpp_stanza_release(st);
                return;
            }
            xd_bounce(st, "modify", "jid-malformed", NULL);
            xmpp_stanza_release(st);
            return;
        }
    } else {
        /* No 'to': the account itself (RFC 6120 10.3.3). */
        to = s->jid;
        to.resource[0] = '\0';
    }
    ev.to = &to;
    if (xd_hooks_run(s->type == XD_STREAM_C2S ? XD_HOOK_C2S_STANZA : XD_HOOK_S2S_STANZA, &ev) !=
        XD_PASS) {
        xmpp_stanza_release(st);
        return;
    }
    if (s->type == XD_STREAM_C2S && !t && is_broadcast_presence(st))
        presence_out(&ev, s, st);
    else
        route(&ev, st);
    xmpp_stanza_release(st);
}

/* ---- routing after the disk ---------------------------------------------------- */

static void
route_now(void *st)
{
    xd_route(st);
}

static void
route_dropped(void *st)
{
    xmpp_stanza_release(st);
}

void
xd_route_durable(xmpp_stanza_t *st)
{
    if (!st)
        return;
    if (xd_store_when_durable(xd_store_commits(), route_now, route_dropped, st) != 0) {
        xd_error("router: out of memory; a stanza waiting for storage was dropped");
        xmpp_stanza_release(st);
    }
}
