/*
 * Services the core offers modules beyond the stanza pipeline: IQs the
 * server sends and waits for, XEP-0050 ad-hoc command registry, counters for
 * the operator, and the roster query that other modules ask of the roster
 * module.
 */
#include <arpa/inet.h>
#include <gnutls/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server.h"
#include "store.h"
#include "xmlstream.h"

/* ---- IQs sent by the server ------------------------------------------------ */

typedef struct pending_iq {
    ev_timer timer;
    char id[40];
    xd_jid to; /* who must answer */
    xd_module *owner;
    xd_iq_reply_fn fn;
    void *data;
    struct pending_iq *next, *prev;
} pending_iq;

static xd_hashtab *pending;   /* id -> pending_iq */
static pending_iq *pending_all; /* the same, as a list for unloading */

static void
pending_free(pending_iq *p)
{
    ev_timer_stop(xd_srv.loop, &p->timer);
    xd_hashtab_del(pending, p->id);
    if (p->prev)
        p->prev->next = p->next;
    else
        pending_all = p->next;
    if (p->next)
        p->next->prev = p->prev;
    free(p);
}

static void
pending_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    pending_iq *p = (pending_iq *)w;
    xd_iq_reply_fn fn = p->fn;
    void *data = p->data;
    (void)loop;
    (void)revents;
    pending_free(p); /* before the call: fn may send another IQ */
    fn(NULL, data);
}

int
xd_iq_send(xd_module *m, xmpp_stanza_t *iq, double timeout, xd_iq_reply_fn fn, void *data)
{
    const char *to = xmpp_stanza_get_to(iq), *id = xmpp_stanza_get_id(iq);
    pending_iq *p;
    unsigned char rnd[8];

    if (!pending && !(pending = xd_hashtab_new(64)))
        goto fail;
    if (!fn || !to || !(p = calloc(1, sizeof(*p))))
        goto fail;
    if (xd_jid_parse(&p->to, to) != 0) {
        free(p);
        goto fail;
    }
    if (id && *id && strlen(id) < sizeof(p->id) && !xd_hashtab_get(pending, id)) {
        snprintf(p->id, sizeof(p->id), "%s", id);
    } else {
        /* Unguessable, so a third party cannot answer in the addressee's name. */
        gnutls_rnd(GNUTLS_RND_NONCE, rnd, sizeof(rnd));
        snprintf(p->id, sizeof(p->id), "xd-%02x%02x%02x%02x%02x%02x%02x%02x", rnd[0], rnd[1],
                 rnd[2], rnd[3], rnd[4], rnd[5], rnd[6], rnd[7]);
        xmpp_stanza_set_id(iq, p->id);
    }
    p->owner = m;
    p->fn = fn;
    p->data = data;
    if (xd_hashtab_put(pending, p->id, p) != 0) {
        free(p);
        goto fail;
    }
    p->next = pending_all;
    if (p->next)
        p->next->prev = p;
    pending_all = p;
    ev_timer_init(&p->timer, pending_timeout, timeout > 0 ? timeout : 30., 0.);
    ev_timer_start(xd_srv.loop, &p->timer);
    xd_route(iq);
    return 0;
fail:
    xmpp_stanza_release(iq);
    return -1;
}

int
xd_iq_pending_reply(const xd_event *ev)
{
    const char *id = xmpp_stanza_get_id(ev->stanza), *type = xmpp_stanza_get_type(ev->stanza);
    pending_iq *p;

    if (!pending || !id || !type || (strcmp(type, "result") && strcmp(type, "error")))
        return 0;
    p = xd_hashtab_get(pending, id);
    if (!p || !ev->from || !xd_jid_equal(&p->to, ev->from, 1))
        return 0;
    xd_iq_reply_fn fn = p->fn;
    void *data = p->data;
    pending_free(p);
    fn(ev->stanza, data);
    return 1;
}

/* ---- ad-hoc commands --------------------------------------------------------- */

typedef struct adhoc_cmd {
    xd_module *owner;
    char *node, *name;
    xd_iq_fn fn;
    void *data;
} adhoc_cmd;

static adhoc_cmd commands[XD_MAX_MODULES];
static int ncommands;

int
xd_adhoc_register(xd_module *m, const char *node, const char *name, xd_iq_fn fn, void *data)
{
    if (!node || !name || !fn || ncommands >= XD_MAX_MODULES)
        return -1;
    for (int i = 0; i < ncommands; i++)
        if (commands[i].fn && !strcmp(commands[i].node, node))
            return -1;
    adhoc_cmd c = {m, strdup(node), strdup(name), fn, data};
    if (!c.node || !c.name) {
        free(c.node);
        free(c.name);
        return -1;
    }
    if (ncommands == 0)
        xd_disco_add_feature(m, XD_NS_COMMANDS);
    commands[ncommands++] = c;
    return 0;
}

static xmpp_stanza_t *
first_child_tag(xmpp_stanza_t *st)
{
    xmpp_stanza_t *c = xmpp_stanza_get_children(st);
    while (c && !xmpp_stanza_is_tag(c))
        c = xmpp_stanza_get_next(c);
    return c;
}

static adhoc_cmd *
find_command(const char *node)
{
    for (int i = 0; node && i < ncommands; i++)
        if (commands[i].fn && !strcmp(commands[i].node, node))
            return &commands[i];
    return NULL;
}

/* IQs to a served domain about commands: the list, a command's info, running one. */
int
xd_adhoc_dispatch(xd_event *ev)
{
    xmpp_stanza_t *q = first_child_tag(ev->stanza), *res, *query;
    const char *type = xmpp_stanza_get_type(ev->stanza), *ns, *node;
    adhoc_cmd *c;

    if (!q || !type || !(ns = xmpp_stanza_get_ns(q)))
        return XD_PASS;
    node = xmpp_stanza_get_attribute(q, "node");
    if (!strcmp(type, "set") && !strcmp(ns, XD_NS_COMMANDS)) {
        if (!(c = find_command(node))) {
            xd_route(xd_error_reply(ev->stanza, "cancel", "item-not-found", NULL));
            return XD_HANDLED;
        }
        return c->fn(ev, c->data) == XD_PASS ? XD_PASS : XD_HANDLED;
    }
    if (strcmp(type, "get") || !node)
        return XD_PASS;
    if (!strcmp(ns, "http://jabber.org/protocol/disco#items") && !strcmp(node, XD_NS_COMMANDS)) {
        res = xd_iq_result(ev->stanza);
        query = xd_stanza_new("query", ns);
        xmpp_stanza_set_attribute(query, "node", node);
        /* The commands act on the requester's own account: list them to
         * local users only (XEP-0050 2.2: only what the requester may run). */
        for (int i = 0; ev->from && xd_is_local_host(ev->from->domain) && i < ncommands; i++) {
            if (!commands[i].fn)
                continue;
            xmpp_stanza_t *item = xd_stanza_new("item", NULL);
            xmpp_stanza_set_attribute(item, "jid", ev->to->domain);
            xmpp_stanza_set_attribute(item, "node", commands[i].node);
            xmpp_stanza_set_attribute(item, "name", commands[i].name);
            xmpp_stanza_add_child_ex(query, item, 0);
        }
        xmpp_stanza_add_child_ex(res, query, 0);
        xd_route(res);
        return XD_HANDLED;
    }
    if (!strcmp(ns, "http://jabber.org/protocol/disco#info") && (c = find_command(node))) {
        static const char *features[] = {XD_NS_COMMANDS, "jabber:x:data"};
        res = xd_iq_result(ev->stanza);
        query = xd_stanza_new("query", ns);
        xmpp_stanza_set_attribute(query, "node", node);
        xmpp_stanza_t *id = xd_stanza_new("identity", NULL);
        xmpp_stanza_set_attribute(id, "category", "automation");
        xmpp_stanza_set_attribute(id, "type", "command-node");
        xmpp_stanza_set_attribute(id, "name", c->name);
        xmpp_stanza_add_child_ex(query, id, 0);
        for (size_t i = 0; i < sizeof(features) / sizeof(features[0]); i++) {
            xmpp_stanza_t *f = xd_stanza_new("feature", NULL);
            xmpp_stanza_set_attribute(f, "var", features[i]);
            xmpp_stanza_add_child_ex(query, f, 0);
        }
        xmpp_stanza_add_child_ex(res, query, 0);
        xd_route(res);
        return XD_HANDLED;
    }
    return XD_PASS;
}

/* ---- counters ---------------------------------------------------------------- */

void
xd_count(xd_module *m, const char *name, unsigned long n)
{
    int i;
    if (!m || !name)
        return;
    for (i = 0; i < m->ncounters; i++)
        if (m->counters[i].name == name || !strcmp(m->counters[i].name, name))
            break;
    if (i == m->ncounters) {
        if (m->ncounters == XD_MAX_COUNTERS) {
            xd_warn("module %s: too many counters, '%s' not kept", m->desc->name, name);
            return;
        }
        m->counters[m->ncounters++] = (xd_counter){name, 0};
    }
    m->counters[i].value += n;
}

void
xd_stats_foreach(xd_stat_fn fn, void *data)
{
    fn("storage", "commits", (unsigned long long)xd_store_commits(), data);
    fn("storage", "log_flushes", xd_store_flush_count(), data);
    fn("storage", "log_bytes", xd_store_log_bytes(), data);
    for (int i = 0; i < xd_srv.nmodules; i++) {
        const xd_module *m = xd_srv.modules[i];
        for (int k = 0; k < m->ncounters; k++)
            fn(m->desc->name, m->counters[k].name, m->counters[k].value, data);
    }
}

static void
log_stat(const char *name, const char *counter, unsigned long long value, void *data)
{
    (void)data;
    xd_info("stats: %s.%s=%llu", name, counter, value);
}

void
xd_stats_log(void)
{
    xd_stats_foreach(log_stat, NULL);
}

/* ---- the roster query ---------------------------------------------------------- */

static struct {
    xd_module *owner;
    xd_roster_fn fn;
    void *data;
} roster;

int
xd_roster_provide(xd_module *m, xd_roster_fn fn, void *data)
{
    if (roster.fn && roster.owner != m)
        return -1;
    roster.owner = m;
    roster.fn = fn;
    roster.data = data;
    return 0;
}

int
xd_roster_relation(const xd_jid *user, const xd_jid *contact)
{
    return roster.fn ? roster.fn(user, contact, roster.data) : -1;
}

/* ---- address ranges ------------------------------------------------------------------ */

int
xd_cidr_parse(const char *s, unsigned char addr[16], int *prefix)
{
    char buf[INET6_ADDRSTRLEN + 1];
    const char *slash = strchr(s, '/');
    size_t n = slash ? (size_t)(slash - s) : strlen(s);
    int v4 = 0, bits = -1;

    if (n == 0 || n >= sizeof(buf))
        return -1;
    memcpy(buf, s, n);
    buf[n] = '\0';
    memset(addr, 0, 16);
    if (inet_pton(AF_INET, buf, addr + 12) == 1) {
        addr[10] = addr[11] = 0xff;
        v4 = 1;
    } else if (inet_pton(AF_INET6, buf, addr) != 1)
        return -1;
    if (slash) {
        const char *p = slash + 1;
        if (!*p || strlen(p) > 3)
            return -1;
        for (bits = 0; *p; p++) {
            if (*p < '0' || *p > '9')
                return -1;
            bits = bits * 10 + (*p - '0');
        }
        if (bits > (v4 ? 32 : 128))
            return -1;
        if (v4)
            bits += 96;
    }
    *prefix = bits < 0 ? 128 : bits;
    for (int i = *prefix; i < 128; i++)
        addr[i >> 3] &= (unsigned char)~(0x80 >> (i & 7));
    return 0;
}

/* ---- stored stanzas ---------------------------------------------------------------- */

static const char *
parse_open(void *ud, const char **attrs, const char *ns)
{
    (void)ud;
    (void)attrs;
    (void)ns;
    return NULL;
}

static int
parse_element(void *ud, xmpp_stanza_t *el)
{
    xmpp_stanza_t **out = ud;
    if (*out)
        xmpp_stanza_release(el); /* one element expected; keep the first */
    else
        *out = el;
    return 0;
}

/* The stream parser, not libstrophe's, so xml:lang and prefixed attributes
 * come back as they were received. */
xmpp_stanza_t *
xd_stanza_parse(const char *xml, size_t len)
{
    static const char head[] = "<stream:stream xmlns='jabber:client' "
                               "xmlns:stream='http://etherx.jabber.org/streams'>";
    static const xd_xmlstream_cb cb = {parse_open, parse_element};
    xmpp_stanza_t *el = NULL;
    xd_xmlstream *x;
    size_t used;

    if (!xml || !(x = xd_xmlstream_new(xd_srv.ctx, &cb, &el)))
        return NULL;
    xd_xmlstream_set_max(x, len + 1);
    if (xd_xmlstream_feed(x, head, sizeof(head) - 1, &used) != XD_XS_DONE ||
        xd_xmlstream_feed(x, xml, len, &used) != XD_XS_DONE) {
        if (el)
            xmpp_stanza_release(el);
        el = NULL;
    }
    xd_xmlstream_free(x);
    return el;
}

/* ---- unloading ------------------------------------------------------------------- */

void
xd_services_forget(xd_module *m)
{
    /* Pending IQs of m are dropped without a call: m's state is gone. */
    for (pending_iq *p = pending_all, *next; p; p = next) {
        next = p->next;
        if (p->owner == m)
            pending_free(p);
    }
    for (int i = 0; i < ncommands; i++)
        if (commands[i].owner == m) {
            commands[i].fn = NULL;
        }
    if (roster.owner == m)
        memset(&roster, 0, sizeof(roster));
}

void
xd_services_free(void)
{
    for (int i = 0; i < ncommands; i++) {
        free(commands[i].node);
        free(commands[i].name);
    }
    ncommands = 0;
    if (pending) {
        xd_hashtab_free(pending); /* forget() emptied it */
        pending = NULL;
    }
}
