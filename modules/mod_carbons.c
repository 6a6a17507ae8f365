/*
 * mod_carbons: XEP-0280 Message Carbons (urn:xmpp:carbons:2).
 *
 * A client resource turns carbons on or off for itself (XEP-0280 3, 5.1);
 * the state lives on its session and ends with it.  For an eligible message
 * (XEP-0280 6, with the XEP-0334 <no-copy/> hint):
 *  - sent by one of the user's resources, every other enabled resource gets
 *    a <sent/> copy (XEP-0280 5);
 *  - arriving for the user, every enabled resource that the core's RFC 6121
 *    8.5 delivery will not hand the original to gets a <received/> copy
 *    (XEP-0280 4).  When no resource gets the original (the user is offline,
 *    or only has negative priorities) nothing is copied: offline storage or
 *    the bounce deals with the message.  Nor is a message the server routes
 *    again (XD_EVENT_REROUTED: XEP-0198 unacknowledged messages of a
 *    session that ended): it was copied on its first pass.
 * Copies are wrapped per XEP-0297 (Stanza Forwarding) and come from the
 * user's bare JID (XEP-0280 11: clients only trust carbons from there).
 */
#include <stdlib.h>
#include <string.h>

#include <xmppd/module.h>

#define NS_CARBONS "urn:xmpp:carbons:2"
#define NS_FORWARD "urn:xmpp:forward:0"
#define NS_HINTS "urn:xmpp:hints"
#define NS_CLIENT "jabber:client"
#define NS_SERVER "jabber:server"

/* Resources of one user that one message is copied to, at most: a user
 * with a flood of bound resources must not make each message cost without
 * bound. */
#define MAX_RESOURCES 64

typedef struct carbons {
    xd_module *m;
} carbons;

/* Per-session state; its presence on the session means "enabled". */
typedef struct carbons_state {
    int enabled;
} carbons_state;

static int
session_enabled(const xd_session *s, const carbons *c)
{
    const carbons_state *st = xd_session_get_data(s, c->m);
    return st && st->enabled;
}

/* ---- eligibility (XEP-0280 6, XEP-0334) ------------------------------------------ */

/* Is ns the namespace of a stanza's own children (the stream's, or inherited)? */
static int
is_stanza_ns(const char *ns)
{
    return !ns || !strcmp(ns, NS_CLIENT) || !strcmp(ns, NS_SERVER);
}

/* The first child element `name` in `ns` (NULL: the stanza's own namespace). */
static xmpp_stanza_t *
child(xmpp_stanza_t *st, const char *name, const char *ns)
{
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(st); c; c = xmpp_stanza_get_next(c)) {
        const char *n, *cns;
        if (!xmpp_stanza_is_tag(c) || !(n = xmpp_stanza_get_name(c)) || strcmp(n, name) != 0)
            continue;
        cns = xmpp_stanza_get_ns(c);
        if (ns ? cns && !strcmp(cns, ns) : is_stanza_ns(cns))
            return c;
    }
    return NULL;
}

static int
eligible(xmpp_stanza_t *st)
{
    const char *name = xmpp_stanza_get_name(st);
    const char *type = xmpp_stanza_get_type(st);

    if (!name || strcmp(name, "message") != 0)
        return 0;
    if (type && strcmp(type, "chat") != 0) {
        /* error, groupchat, headline and unknown types are never copied;
         * "normal" only with a body (a bare receipt or chat state is not a
         * conversation message) */
        if (strcmp(type, "normal") != 0 || !child(st, "body", NULL))
            return 0;
    } else if (!type && !child(st, "body", NULL)) {
        return 0;
    }
    /* the sender asked for no copies (XEP-0280 7, XEP-0334 4.3) */
    if (child(st, "private", NS_CARBONS) || child(st, "no-copy", NS_HINTS))
        return 0;
    /* a carbon is never carbon-copied again (XEP-0280 6) */
    if (child(st, "sent", NS_CARBONS) || child(st, "received", NS_CARBONS))
        return 0;
    return 1;
}

/* ---- building and sending copies ------------------------------------------------ */

/*
 * <message from=bare type=T><kind xmlns=carbons><forwarded xmlns=forward>
 * <message xmlns='jabber:client' .../></forwarded></kind></message>, without
 * 'to' (set per recipient).  The inner message is the original, untouched
 * except that it states jabber:client: inside <forwarded/> it would
 * otherwise inherit urn:xmpp:forward:0, and one that came over a server
 * stream is in jabber:server.
 */
static xmpp_stanza_t *
make_carbon(xmpp_stanza_t *orig, const char *kind, const char *bare)
{
    xmpp_stanza_t *msg = xd_stanza_new("message", NULL);
    xmpp_stanza_t *wrap = xd_stanza_new(kind, NS_CARBONS);
    xmpp_stanza_t *fwd = xd_stanza_new("forwarded", NS_FORWARD);
    xmpp_stanza_t *inner = xmpp_stanza_copy(orig);
    const char *type = xmpp_stanza_get_type(orig);
    const char *ns;

    if (!msg || !wrap || !fwd || !inner) {
        if (msg)
            xmpp_stanza_release(msg);
        if (wrap)
            xmpp_stanza_release(wrap);
        if (fwd)
            xmpp_stanza_release(fwd);
        if (inner)
            xmpp_stanza_release(inner);
        return NULL;
    }
    ns = xmpp_stanza_get_ns(inner);
    if (!ns || strcmp(ns, NS_CLIENT) != 0)
        xmpp_stanza_set_ns(inner, NS_CLIENT);
    xmpp_stanza_set_from(msg, bare);
    if (type)
        xmpp_stanza_set_type(msg, type);
    xmpp_stanza_add_child_ex(fwd, inner, 0);
    xmpp_stanza_add_child_ex(wrap, fwd, 0);
    xmpp_stanza_add_child_ex(msg, wrap, 0);
    return msg;
}

/* The bound sessions of one user, and what default delivery does for them. */
typedef struct user_set {
    xd_session *s[MAX_RESOURCES];
    int n;
    int total;        /* bound sessions seen, beyond the cap too */
    /* for working out the recipients of the original, like the core does */
    const char *resource; /* the full JID's resource, or NULL */
    xd_session *target;   /* the session with that resource */
    int best;             /* highest non-negative priority of available ones, or -1 */
} user_set;

static int
collect(xd_session *s, void *data)
{
    user_set *u = data;
    /* xd_user_sessions walks newest first, like the core's full-JID table
     * (a newer bind replaces the older session): the first match wins */
    if (u->resource && !u->target && !strcmp(xd_session_jid(s)->resource, u->resource))
        u->target = s;
    if (xd_session_is_available(s) && xd_session_priority(s) >= 0 &&
        xd_session_priority(s) > u->best)
        u->best = xd_session_priority(s);
    if (u->n < MAX_RESOURCES)
        u->s[u->n++] = s;
    u->total++;
    return 0;
}

static void
user_set_fill(user_set *u, const xd_jid *to)
{
    xd_jid bare = *to;
    memset(u, 0, sizeof(*u));
    u->best = -1;
    u->resource = to->resource[0] ? to->resource : NULL;
    xd_jid_to_bare(&bare);
    xd_user_sessions(&bare, collect, u);
}

/*
 * Does the core's default delivery (core/router.c deliver_local and
 * deliver_message_bare, RFC 6121 8.5) hand a chat/normal message for
 * u's 'to' to s?  A full JID with a session: that session only; otherwise
 * (bare JID, or a full JID with no session) the available resources with
 * the highest non-negative priority.
 */
static int
gets_original(const user_set *u, const xd_session *s)
{
    if (u->target)
        return s == u->target;
    return u->best >= 0 && xd_session_is_available(s) && xd_session_priority(s) == u->best;
}

static int
anyone_gets_original(const user_set *u)
{
    return u->target || u->best >= 0;
}

/*
 * Copy orig as `kind` to the enabled sessions of u, except `except` and,
 * when `recipients` is set, the sessions default delivery gives it to.
 */
static void
send_carbons(const carbons *c, const user_set *u, xmpp_stanza_t *orig, const char *kind,
             const xd_jid *user, const xd_session *except, int recipients)
{
    char bare[XD_JID_STR_MAX], full[XD_JID_STR_MAX];
    xmpp_stanza_t *tmpl = NULL;
    int sent = 0;

    if (xd_jid_format(user, 0, bare, sizeof(bare)) < 0)
        return;
    for (int i = 0; i < u->n; i++) {
        xd_session *s = u->s[i];
        xmpp_stanza_t *copy;
        /* an earlier send may have failed and ended a session (it is then
         * unbound, but not freed before the loop comes back) */
        if (s == except || !xd_session_is_bound(s) || !session_enabled(s, c))
            continue;
        if (recipients && gets_original(u, s))
            continue;
        if (!tmpl && !(tmpl = make_carbon(orig, kind, bare)))
            return;
        if (xd_jid_format(xd_session_jid(s), 1, full, sizeof(full)) < 0)
            continue;
        if (!(copy = xmpp_stanza_copy(tmpl)))
            break;
        xmpp_stanza_set_to(copy, full);
        xd_deliver_to_session(s, copy);
        sent++;
    }
    if (tmpl)
        xmpp_stanza_release(tmpl);
    if (u->total > u->n)
        xd_debug("carbons: %s has %d resources; only the first %d were considered", bare,
                 u->total, u->n);
    if (sent)
        xd_debug("carbons: %d %s cop%s for %s", sent, kind, sent == 1 ? "y" : "ies", bare);
}

/* ---- hooks ---------------------------------------------------------------------- */

/* XD_HOOK_C2S_STANZA: a message from one of the user's resources (XEP-0280 5).  About
 * 1,800 instructions per message with no other resource to copy to. */
static int
carbons_c2s(xd_event *ev, void *data)
{
    const carbons *c = data;
    const xd_jid *from = ev->from;
    user_set u;
    int to_self;

    if (!ev->session || !from || !ev->to || !eligible(ev->stanza))
        return XD_PASS;
    to_self = xd_jid_equal(from, ev->to, 0);
    user_set_fill(&u, to_self ? ev->to : from);
    /* A message to the user's own account: the resources that get the
     * original need no <sent/> copy of it as well (and carbons_deliver
     * sends no <received/> ones), so each resource sees it once. */
    send_carbons(c, &u, ev->stanza, "sent", from, ev->session, to_self);
    return XD_PASS;
}

/* XD_HOOK_DELIVER_LOCAL: a message for a local user (XEP-0280 4).  It runs
 * after blocking (a blocked message is never copied) and before offline
 * storage (which takes what no resource will get).  About 2,000 instructions per
 * message with nothing to copy. */
static int
carbons_deliver(xd_event *ev, void *data)
{
    const carbons *c = data;
    user_set u;

    if (!ev->to || !eligible(ev->stanza))
        return XD_PASS;
    /* Routed again by the server (XEP-0198: a session that ended without
     * acknowledging it): the other resources got their copies the first
     * time; now it only looks for a resource or offline storage. */
    if (ev->flags & XD_EVENT_REROUTED)
        return XD_PASS;
    if (ev->from && xd_jid_equal(ev->from, ev->to, 0) && ev->from->resource[0])
        return XD_PASS; /* the user's own message: carbons_c2s copied it as <sent/> */
    user_set_fill(&u, ev->to);
    if (!anyone_gets_original(&u))
        return XD_PASS; /* nobody online gets it: no copies (XEP-0280 4) */
    send_carbons(c, &u, ev->stanza, "received", ev->to, NULL, 1);
    return XD_PASS;
}

/* ---- enabling and disabling (XEP-0280 3 and 5.1) ----------------------------------- */

static int
iq_carbons(xd_event *ev, void *data)
{
    carbons *c = data;
    xmpp_stanza_t *iq = ev->stanza, *el = xmpp_stanza_get_child_by_ns(iq, NS_CARBONS);
    xd_session *s = ev->session;
    const char *name = el ? xmpp_stanza_get_name(el) : NULL;
    xmpp_stanza_t *r;

    /* Only the account's own resource decides for itself: another user, a
     * server stream or an internal stanza gets <forbidden/>. */
    if (!s || xd_session_type(s) != XD_STREAM_C2S || !xd_session_is_bound(s) || !ev->from ||
        !xd_jid_equal(ev->from, xd_session_jid(s), 1) || !xd_jid_equal(ev->from, ev->to, 0)) {
        xd_bounce(iq, "auth", "forbidden", NULL);
        return XD_HANDLED;
    }
    if (!name || (strcmp(name, "enable") != 0 && strcmp(name, "disable") != 0)) {
        xd_bounce(iq, "modify", "bad-request", NULL);
        return XD_HANDLED;
    }
    if (!strcmp(name, "enable")) {
        if (!session_enabled(s, c)) {
            carbons_state *st = calloc(1, sizeof(*st));
            if (!st) {
                xd_bounce(iq, "wait", "resource-constraint", NULL);
                return XD_HANDLED;
            }
            st->enabled = 1;
            xd_session_set_data(s, c->m, st, free);
        }
    } else {
        xd_session_set_data(s, c->m, NULL, NULL); /* frees the old state */
    }
    r = xd_iq_result(iq);
    if (!r)
        return XD_HANDLED;
    if (!xmpp_stanza_get_from(r)) {
        /* asked without 'to': the answer comes from the account itself */
        char bare[XD_JID_STR_MAX];
        if (xd_jid_format(ev->to, 0, bare, sizeof(bare)) >= 0)
            xmpp_stanza_set_from(r, bare);
    }
    xd_route(r);
    return XD_HANDLED;
}

/* ---- the module --------------------------------------------------------------------- */

static int
carbons_load(xd_module *m)
{
    carbons *c = calloc(1, sizeof(*c));
    int r = 0;

    if (!c)
        return -1;
    c->m = m;
    xd_module_set_data(m, c);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "set", NS_CARBONS, iq_carbons, c);
    r |= xd_hook(m, XD_HOOK_C2S_STANZA, carbons_c2s, c, XD_PRIO_DEFAULT);
    /* below blocking (XD_PRIO_HIGH), above offline storage (XD_PRIO_LOW) */
    r |= xd_hook(m, XD_HOOK_DELIVER_LOCAL, carbons_deliver, c, XD_PRIO_DEFAULT);
    r |= xd_disco_add_feature(m, NS_CARBONS);
    return r ? -1 : 0;
}

static void
carbons_unload(xd_module *m)
{
    free(xd_module_get_data(m));
}

XD_MODULE(carbons) = {
    .abi = XD_MODULE_ABI,
    .name = "carbons",
    .load = carbons_load,
    .unload = carbons_unload,
};
