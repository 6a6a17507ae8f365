/*
 * mod_pep: XEP-0163 Personal Eventing Protocol, the XEP-0060 pubsub service
 * every local account has at its bare JID.  What OMEMO (XEP-0384), avatars
 * (XEP-0084) and user nicknames/moods need:
 *
 *   XEP-0060 7.1     publish (owner only), auto-create (XEP-0163 3), item
 *                    ids generated when absent, max_items (oldest dropped)
 *   XEP-0060 7.1.5   publish-options: the values become a new node's config;
 *                    for an existing node each must equal the config, else
 *                    <conflict/> + <precondition-not-met/>
 *   XEP-0060 6.5     retrieve items: all, by id, max_items
 *   XEP-0060 7.2     retract (owner), <retract/> notifications (notify_retract)
 *   XEP-0060 8.1     create (owner), 8.2 configure get/set, 8.4 delete,
 *                    8.5 purge, all owner only
 *   XEP-0163 4       notifications: to the owner's available resources, and
 *                    to full JIDs that sent the owner available presence with
 *                    XEP-0115 caps whose features include "<node>+notify"
 *                    (4.3: filtered notifications), last item on presence
 *                    (send_last_published_item = on_sub_and_presence)
 *   XEP-0115 5       caps: disco#info asked of the client for an unknown ver;
 *                    the answer is shared by ver only if its SHA-1
 *                    verification string matches, otherwise it serves only
 *                    the full JID that gave it (no cache poisoning)
 *
 * Access models (XEP-0060 4.5), enforced on item retrieval (6.5) and on
 * every notification, last published items included:
 *   open       anyone;
 *   presence   the owner and contacts with a subscription "from" or "both"
 *              (they receive the owner's presence; xd_roster_relation FROM);
 *   roster     the owner and contacts that are roster items.  The roster
 *              provider tells only subscription flags, not groups, so
 *              pubsub#roster_groups_allowed is accepted empty (no group
 *              restriction: any roster item) and refused with groups in it
 *              (not-acceptable / precondition-not-met): access meant for one
 *              group must not silently widen to the whole roster;
 *   whitelist  the owner only (the only publisher and, with no affiliations
 *              to manage, the only whitelisted entity).
 * Without a roster module (xd_roster_relation() < 0) presence and roster
 * nodes serve the owner only: never someone who should not see them.
 * Refusals (6.5.9.x): <not-authorized/> with <presence-subscription-
 * required/> or <not-in-roster-group/>, <not-allowed/> with <closed-node/>.
 * A contact who gains access (XD_HOOK_ROSTER_CHANGED: a subscription
 * approved, an item added) and whose caps ask for +notify gets the last item
 * of each presence/roster node it can now see (XEP-0060 6.1.7 on_sub).  The
 * default access model is presence (XEP-0163 3), so nodes are private unless
 * the publisher asks for open, as OMEMO clients do.
 *
 * Storage (Berkeley DB, each change one transaction):
 *   pep_nodes  "owner\0node" -> "a=<access> m=<max_items, -1 = max> p=<persist>
 *                               r=<notify_retract> s=<send_last> q=<next seq>"
 *   pep_items  "owner\0node\0item id" -> "<seq>\n" + the payload's XML
 * The sequence orders a node's items by publication (a republished id moves
 * to the end).  Every key starts with the owner's bare JID and a NUL, so the
 * account's deletion purges it all.
 *
 * Interest records (watchers) and re-entrance: sending a stanza can end the
 * session it goes to (XEP-0198 max_queue, the core's output limit), and
 * SESSION_END (or an unavailable presence) runs our hooks again in the
 * middle of a loop that sends.  So a watcher is never freed nor moved while
 * any of our code may be running: it is marked dead, skipped by every loop
 * and lookup, and freed by a 0-second timer from the event loop, where none
 * of this module is on the stack.  Entries are only ever appended to the
 * table in between, so an index walk sees each live watcher once.
 *
 * Not implemented: subscriptions to PEP nodes other than by caps (XEP-0060
 * 6.1 subscribe answers <feature-not-implemented/>), affiliations (so the
 * whitelist holds the owner alone), roster groups (see above), collection
 * nodes.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xmppd/module.h>

#define NS_PUBSUB "http://jabber.org/protocol/pubsub"
#define NS_PUBSUB_OWNER "http://jabber.org/protocol/pubsub#owner"
#define NS_PUBSUB_EVENT "http://jabber.org/protocol/pubsub#event"
#define NS_PUBSUB_ERRORS "http://jabber.org/protocol/pubsub#errors"
#define NS_PUBLISH_OPTIONS "http://jabber.org/protocol/pubsub#publish-options"
#define NS_NODE_CONFIG "http://jabber.org/protocol/pubsub#node_config"
#define NS_XDATA "jabber:x:data"
#define NS_CAPS "http://jabber.org/protocol/caps"
#define NS_DISCO_INFO "http://jabber.org/protocol/disco#info"

#define NODE_MAX 256          /* bytes of a node name */
#define ITEM_ID_MAX 256       /* bytes of an item id */
#define IDS_PER_REQUEST 64    /* item ids in one retrieve request */
#define VER_MAX 128           /* bytes of a caps ver string */
#define NOTIFY_MAX 128        /* +notify features remembered per client */
#define CAPS_CACHE_MAX 256    /* distinct verified caps remembered */
#define WATCHERS_MAX 16384    /* (owner, full JID) interest records in all */
#define WATCHERS_PER_OWNER 512
#define REQUERY_AFTER 30.0    /* seconds before an unanswered disco#info is asked again */
#define LAST_ITEMS_BUDGET (1024u * 1024u) /* bytes of last items sent on one presence */
#define QID_PREFIX "pep-caps-"

enum { ACC_OPEN, ACC_PRESENCE, ACC_ROSTER, ACC_WHITELIST };
static const char *const access_names[] = {"open", "presence", "roster", "whitelist"};
enum { SL_NEVER, SL_ON_SUB, SL_ON_SUB_AND_PRESENCE };
static const char *const sendlast_names[] = {"never", "on_sub", "on_sub_and_presence"};

/* A node's configuration (XEP-0060 16.4.4, the fields we support). */
typedef struct node_conf {
    int access;
    long long max_items; /* -1: "max", the module's limit */
    int persist;
    int notify_retract;
    int send_last;
    unsigned long long seq; /* next item sequence */
} node_conf;

/* Fields present in a submitted form, and the var that made it invalid. */
enum { F_ACCESS = 1, F_MAX = 2, F_PERSIST = 4, F_RETRACT = 8, F_SENDLAST = 16 };
typedef struct form_in {
    unsigned has;
    node_conf c;
    char bad[64];
} form_in;

/* Interest of one full JID in one owner's nodes (XEP-0163 4.3). */
typedef struct watcher {
    char *owner;   /* bare JID whose nodes */
    char *full;    /* who gets the notifications */
    char *ver;     /* caps ver, NULL when the presence had no caps */
    int sha1;      /* the caps hash is sha-1 (verifiable) */
    int resolved;  /* notify[] is known */
    char **notify; /* node names the client asked for with +notify */
    size_t nnotify;
    char qid[40];  /* disco#info in flight, "" if none */
    double qtime;
    unsigned models; /* access models it could see when last served (MODEL bits) */
    int dead;        /* gone (session ended, unavailable...); freed by sweep_dead() */
} watcher;

typedef struct caps_ent {
    char *ver;
    char **notify;
    size_t nnotify;
    unsigned long long used;
} caps_ent;

typedef struct pep_mod {
    xd_module *m;
    xd_db *nodes;
    xd_db *items;
    long long max_items_limit;
    long long max_nodes;
    long long max_item_size;
    watcher **w;
    size_t nw, capw;
    size_t ndead;     /* entries of w marked dead, not swept yet */
    xd_timer *sweep;  /* pending sweep_dead(), or NULL */
    caps_ent caps[CAPS_CACHE_MAX];
    size_t ncaps;
    unsigned long long tick;
    unsigned long long counter;
} pep_mod;

/* ---- small helpers ------------------------------------------------------------------- */

static int
bare_of(const xd_jid *j, char *buf, size_t len)
{
    xd_jid b = *j;
    xd_jid_to_bare(&b);
    return xd_jid_format(&b, 0, buf, len) < 0 ? -1 : 0;
}

static int
is_true(const char *v)
{
    return v && (!strcmp(v, "1") || !strcmp(v, "true"));
}

static int
parse_bool(const char *v, int *out)
{
    if (is_true(v))
        *out = 1;
    else if (v && (!strcmp(v, "0") || !strcmp(v, "false")))
        *out = 0;
    else
        return -1;
    return 0;
}

static int
name_index(const char *v, const char *const *names, int n)
{
    for (int i = 0; v && i < n; i++)
        if (!strcmp(v, names[i]))
            return i;
    return -1;
}

static void
add_text(xmpp_stanza_t *el, const char *text)
{
    xmpp_stanza_t *t = xmpp_stanza_new(xd_ctx());
    xmpp_stanza_set_text(t, text);
    xmpp_stanza_add_child_ex(el, t, 0);
}

static xmpp_stanza_t *
text_el(const char *name, const char *text)
{
    xmpp_stanza_t *el = xd_stanza_new(name, NULL);
    add_text(el, text);
    return el;
}

/* First element child with this name (any namespace: children inherit it). */
static xmpp_stanza_t *
child_named(xmpp_stanza_t *st, const char *name)
{
    return xmpp_stanza_get_child_by_name(st, name);
}

static int
count_children(xmpp_stanza_t *st, const char *name)
{
    int n = 0;
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(st); c; c = xmpp_stanza_get_next(c))
        if (xmpp_stanza_is_tag(c) && (!name || !strcmp(xmpp_stanza_get_name(c), name)))
            n++;
    return n;
}

static void
free_strv(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

static char **
dup_strv(char *const *v, size_t n)
{
    char **out = calloc(n ? n : 1, sizeof(*out));
    for (size_t i = 0; out && i < n; i++)
        if (!(out[i] = strdup(v[i]))) {
            free_strv(out, i);
            return NULL;
        }
    return out;
}

/* A reply carrying an XEP-0060 application condition (pubsub#errors). */
static void
reply_err(xmpp_stanza_t *iq, const char *type, const char *cond, const char *app,
          const char *feature)
{
    xmpp_stanza_t *r = xd_error_reply(iq, type, cond, NULL);
    if (!r)
        return;
    if (app) {
        xmpp_stanza_t *e = xmpp_stanza_get_child_by_name(r, "error");
        xmpp_stanza_t *a = xd_stanza_new(app, NS_PUBSUB_ERRORS);
        if (feature)
            xmpp_stanza_set_attribute(a, "feature", feature);
        xmpp_stanza_add_child_ex(e, a, 0);
    }
    xd_route(r);
}

static int
valid_node(const char *node)
{
    return node && *node && strlen(node) <= NODE_MAX;
}

/* ---- node configuration ------------------------------------------------------------ */

static void
conf_default(node_conf *c)
{
    /* XEP-0163 3 / XEP-0060 16.4.4 PEP defaults */
    c->access = ACC_PRESENCE;
    c->max_items = 1;
    c->persist = 1;
    c->notify_retract = 1;
    c->send_last = SL_ON_SUB_AND_PRESENCE;
    c->seq = 1;
}

static size_t
node_key(char *buf, size_t len, const char *owner, const char *node)
{
    size_t ol = strlen(owner), nl = strlen(node);
    if (ol + 1 + nl > len)
        return 0;
    memcpy(buf, owner, ol);
    buf[ol] = '\0';
    memcpy(buf + ol + 1, node, nl);
    return ol + 1 + nl;
}

/* "owner\0node\0id" (id may be "" for the node's prefix). */
static size_t
item_key(char *buf, size_t len, const char *owner, const char *node, const char *id)
{
    size_t k = node_key(buf, len, owner, node), il = strlen(id);
    if (!k || k + 1 + il > len)
        return 0;
    buf[k] = '\0';
    memcpy(buf + k + 1, id, il);
    return k + 1 + il;
}

#define KEY_MAX (XD_JID_STR_MAX + NODE_MAX + ITEM_ID_MAX + 4)

/* 0 found, XD_NOTFOUND, -1 storage error. */
static int
conf_load(pep_mod *p, xd_txn *txn, const char *owner, const char *node, node_conf *c)
{
    char key[KEY_MAX];
    size_t klen = node_key(key, sizeof(key), owner, node), vlen;
    void *val = NULL;
    int r;

    if (!klen)
        return XD_NOTFOUND;
    if ((r = xd_db_get(p->nodes, txn, key, klen, &val, &vlen)) != 0)
        return r;
    conf_default(c);
    if (sscanf(val, "a=%d m=%lld p=%d r=%d s=%d q=%llu", &c->access, &c->max_items, &c->persist,
               &c->notify_retract, &c->send_last, &c->seq) != 6 ||
        c->access < ACC_OPEN || c->access > ACC_WHITELIST || c->send_last < SL_NEVER ||
        c->send_last > SL_ON_SUB_AND_PRESENCE) {
        /* a damaged record: keep the node private rather than guess */
        xd_error("pep: node record of %s '%s' does not parse; treating it as defaults", owner,
                 node);
        conf_default(c);
    }
    free(val);
    return 0;
}

static int
conf_store(pep_mod *p, xd_txn *txn, const char *owner, const char *node, const node_conf *c)
{
    char key[KEY_MAX], val[160];
    size_t klen = node_key(key, sizeof(key), owner, node);
    int n = snprintf(val, sizeof(val), "a=%d m=%lld p=%d r=%d s=%d q=%llu", c->access,
                     c->max_items, c->persist, c->notify_retract, c->send_last, c->seq);
    return klen ? xd_db_put(p->nodes, txn, key, klen, val, (size_t)n) : -1;
}

static long long
effective_max(const pep_mod *p, const node_conf *c)
{
    return c->max_items < 0 || c->max_items > p->max_items_limit ? p->max_items_limit
                                                                  : c->max_items;
}

/* Does a list-multi field carry a non-empty <value/>? */
static int
has_group_value(xmpp_stanza_t *field)
{
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(field); c; c = xmpp_stanza_get_next(c)) {
        char *t;
        int nonempty;
        if (!xmpp_stanza_is_tag(c) || strcmp(xmpp_stanza_get_name(c), "value"))
            continue;
        t = xmpp_stanza_get_text(c);
        nonempty = t && t[strspn(t, " \t\r\n")];
        if (t)
            xmpp_free(xd_ctx(), t);
        if (nonempty)
            return 1;
    }
    return 0;
}

/*
 * Read a submitted data form (XEP-0004) into f: only the fields we support;
 * any other var (but FORM_TYPE) or a bad value makes it invalid (-1, f->bad
 * names the field), since a setting we cannot honour must not be accepted
 * silently (XEP-0060 7.1.5, 8.2.5.3).
 */
static int
form_read(pep_mod *p, xmpp_stanza_t *x, const char *form_type, form_in *f)
{
    for (xmpp_stanza_t *fl = xmpp_stanza_get_children(x); fl; fl = xmpp_stanza_get_next(fl)) {
        const char *var;
        xmpp_stanza_t *vel;
        char *v;
        int bad = 0, i;

        if (!xmpp_stanza_is_tag(fl) || strcmp(xmpp_stanza_get_name(fl), "field"))
            continue;
        var = xmpp_stanza_get_attribute(fl, "var");
        if (!var)
            continue;
        vel = child_named(fl, "value");
        v = vel ? xmpp_stanza_get_text(vel) : NULL;
        if (!strcmp(var, "FORM_TYPE")) {
            bad = !v || strcmp(v, form_type);
        } else if (!strcmp(var, "pubsub#access_model")) {
            bad = (i = name_index(v, access_names, 4)) < 0;
            f->c.access = i;
            f->has |= F_ACCESS;
        } else if (!strcmp(var, "pubsub#max_items")) {
            char *end = NULL;
            long long n = v ? strtoll(v, &end, 10) : 0;
            if (v && !strcmp(v, "max"))
                f->c.max_items = -1;
            else if (!v || !*v || *end || n < 1 || n > p->max_items_limit)
                bad = 1;
            else
                f->c.max_items = n;
            f->has |= F_MAX;
        } else if (!strcmp(var, "pubsub#persist_items")) {
            bad = parse_bool(v, &f->c.persist);
            f->has |= F_PERSIST;
        } else if (!strcmp(var, "pubsub#notify_retract")) {
            bad = parse_bool(v, &f->c.notify_retract);
            f->has |= F_RETRACT;
        } else if (!strcmp(var, "pubsub#send_last_published_item")) {
            bad = (i = name_index(v, sendlast_names, 3)) < 0;
            f->c.send_last = i;
            f->has |= F_SENDLAST;
        } else if (!strcmp(var, "pubsub#roster_groups_allowed")) {
            /* Empty is what we do (any roster item); groups we cannot check
             * (see the header), so a group list is not accepted. */
            bad = has_group_value(fl);
        } else {
            bad = 1;
        }
        if (v)
            xmpp_free(xd_ctx(), v);
        if (bad) {
            snprintf(f->bad, sizeof(f->bad), "%s", var);
            return -1;
        }
    }
    return 0;
}

static void
form_apply(const form_in *f, node_conf *c)
{
    if (f->has & F_ACCESS)
        c->access = f->c.access;
    if (f->has & F_MAX)
        c->max_items = f->c.max_items;
    if (f->has & F_PERSIST)
        c->persist = f->c.persist;
    if (f->has & F_RETRACT)
        c->notify_retract = f->c.notify_retract;
    if (f->has & F_SENDLAST)
        c->send_last = f->c.send_last;
}

/* XEP-0060 7.1.5: every given option must equal the node's configuration. */
static int
form_matches(const pep_mod *p, const form_in *f, const node_conf *c)
{
    if ((f->has & F_ACCESS) && f->c.access != c->access)
        return 0;
    if ((f->has & F_MAX) && effective_max(p, &f->c) != effective_max(p, c))
        return 0;
    if ((f->has & F_PERSIST) && f->c.persist != c->persist)
        return 0;
    if ((f->has & F_RETRACT) && f->c.notify_retract != c->notify_retract)
        return 0;
    if ((f->has & F_SENDLAST) && f->c.send_last != c->send_last)
        return 0;
    return 1;
}

static xmpp_stanza_t *
xfield(const char *var, const char *type, const char *value)
{
    xmpp_stanza_t *f = xd_stanza_new("field", NULL);
    xmpp_stanza_set_attribute(f, "var", var);
    if (type)
        xmpp_stanza_set_attribute(f, "type", type);
    xmpp_stanza_add_child_ex(f, text_el("value", value), 0);
    return f;
}

static void
add_options(xmpp_stanza_t *field, const char *const *names, int n)
{
    for (int i = 0; i < n; i++) {
        xmpp_stanza_t *o = xd_stanza_new("option", NULL);
        xmpp_stanza_add_child_ex(o, text_el("value", names[i]), 0);
        xmpp_stanza_add_child_ex(field, o, 0);
    }
}

/* The node_config form (XEP-0060 8.2.1). */
static xmpp_stanza_t *
conf_form(const node_conf *c)
{
    xmpp_stanza_t *x = xd_stanza_new("x", NS_XDATA), *f;
    char num[32];

    xmpp_stanza_set_type(x, "form");
    xmpp_stanza_add_child_ex(x, xfield("FORM_TYPE", "hidden", NS_NODE_CONFIG), 0);
    f = xfield("pubsub#access_model", "list-single", access_names[c->access]);
    add_options(f, access_names, 4);
    xmpp_stanza_add_child_ex(x, f, 0);
    if (c->max_items < 0)
        snprintf(num, sizeof(num), "max");
    else
        snprintf(num, sizeof(num), "%lld", c->max_items);
    xmpp_stanza_add_child_ex(x, xfield("pubsub#max_items", "text-single", num), 0);
    xmpp_stanza_add_child_ex(x, xfield("pubsub#persist_items", "boolean", c->persist ? "1" : "0"),
                             0);
    xmpp_stanza_add_child_ex(
        x, xfield("pubsub#notify_retract", "boolean", c->notify_retract ? "1" : "0"), 0);
    f = xfield("pubsub#send_last_published_item", "list-single", sendlast_names[c->send_last]);
    add_options(f, sendlast_names, 3);
    xmpp_stanza_add_child_ex(x, f, 0);
    /* no groups: the roster model admits any roster item (see the header) */
    f = xd_stanza_new("field", NULL);
    xmpp_stanza_set_attribute(f, "var", "pubsub#roster_groups_allowed");
    xmpp_stanza_set_attribute(f, "type", "list-multi");
    xmpp_stanza_add_child_ex(x, f, 0);
    return x;
}

/* ---- items ------------------------------------------------------------------------------ */

typedef struct item_rec {
    char *id;
    unsigned long long seq;
    char *xml; /* NULL when not asked for */
} item_rec;

typedef struct item_list {
    item_rec *v;
    size_t n, cap;
    size_t plen;
    int want_xml;
    int oom;
} item_list;

static void
items_free(item_list *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i].id);
        free(l->v[i].xml);
    }
    free(l->v);
    memset(l, 0, sizeof(*l));
}

/* A record's value: "<seq>\n<xml>".  0 ok, -1 damaged. */
static int
item_parse(const char *val, size_t vlen, unsigned long long *seq, const char **xml)
{
    const char *nl = memchr(val, '\n', vlen);
    char *end;
    if (!nl)
        return -1;
    *seq = strtoull(val, &end, 10);
    if (end != nl)
        return -1;
    *xml = nl + 1;
    return 0;
}

static int
items_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    item_list *l = data;
    item_rec r = {0};
    const char *xml;

    if (item_parse(val, vlen, &r.seq, &xml) != 0) {
        xd_error("pep: an item record does not parse; skipped");
        return 0;
    }
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        item_rec *v = realloc(l->v, cap * sizeof(*v));
        if (!v) {
            l->oom = 1;
            return 1;
        }
        l->v = v;
        l->cap = cap;
    }
    r.id = strndup((const char *)key + l->plen, klen - l->plen);
    /* foreach values are not NUL-terminated (only xd_db_get's are) */
    r.xml = l->want_xml ? strndup(xml, vlen - (size_t)(xml - (const char *)val)) : NULL;
    if (!r.id || (l->want_xml && !r.xml)) {
        free(r.id);
        free(r.xml);
        l->oom = 1;
        return 1;
    }
    l->v[l->n++] = r;
    return 0;
}

static int
item_cmp(const void *a, const void *b)
{
    const item_rec *x = a, *y = b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* A node's items, oldest first.  0 ok, -1 error. */
static int
items_list(pep_mod *p, xd_txn *txn, const char *owner, const char *node, int want_xml,
           item_list *l)
{
    char key[KEY_MAX];
    size_t plen = item_key(key, sizeof(key), owner, node, "");
    int r;

    memset(l, 0, sizeof(*l));
    l->plen = plen;
    l->want_xml = want_xml;
    if (!plen)
        return -1;
    r = xd_db_foreach(p->items, txn, key, plen, items_visit, l);
    if (r < 0 || l->oom) {
        items_free(l);
        return -1;
    }
    qsort(l->v, l->n, sizeof(*l->v), item_cmp);
    return 0;
}

static int
item_del(pep_mod *p, xd_txn *txn, const char *owner, const char *node, const char *id)
{
    char key[KEY_MAX];
    size_t klen = item_key(key, sizeof(key), owner, node, id);
    return klen ? xd_db_del(p->items, txn, key, klen) : -1;
}

/* Drop the oldest items beyond max (or all).  0 ok, -1 error. */
static int
items_trim(pep_mod *p, xd_txn *txn, const char *owner, const char *node, long long max)
{
    item_list l;
    int r = 0;
    if (items_list(p, txn, owner, node, 0, &l) != 0)
        return -1;
    for (size_t i = 0; (long long)(l.n - i) > max && r >= 0; i++)
        if (item_del(p, txn, owner, node, l.v[i].id) < 0)
            r = -1;
    items_free(&l);
    return r;
}

/* <item id='..'>payload</item> from a stored XML text. */
static xmpp_stanza_t *
item_el(const char *id, const char *xml)
{
    xmpp_stanza_t *it = xd_stanza_new("item", NULL);
    xmpp_stanza_set_id(it, id);
    if (xml && *xml) {
        xmpp_stanza_t *pl = xd_stanza_parse(xml, strlen(xml));
        if (pl)
            xmpp_stanza_add_child_ex(it, pl, 0);
        else
            xd_error("pep: stored payload of item '%s' does not parse", id);
    }
    return it;
}

/* ---- access models (XEP-0060 4.5) ------------------------------------------------- */

#define MODEL(a) (1u << (a))
#define MODELS_ALL                                                                                 \
    (MODEL(ACC_OPEN) | MODEL(ACC_PRESENCE) | MODEL(ACC_ROSTER) | MODEL(ACC_WHITELIST))

/* The models a contact with this roster relation may read (bits of ACC_*);
 * rel < 0 (no roster module, storage error) grants open nodes only. */
static unsigned
models_for_rel(int rel)
{
    unsigned m = MODEL(ACC_OPEN);
    if (rel > 0 && (rel & XD_ROSTER_FROM))
        m |= MODEL(ACC_PRESENCE); /* subscription from/both: gets the owner's presence */
    if (rel > 0 && (rel & XD_ROSTER_ITEM))
        m |= MODEL(ACC_ROSTER);
    return m;
}

/* The models whose nodes of owner the bare JID who may read. */
static unsigned
models_for(const char *owner, const char *who)
{
    xd_jid oj, wj;
    if (!strcmp(owner, who))
        return MODELS_ALL;
    if (xd_jid_parse(&oj, owner) != 0 || xd_jid_parse(&wj, who) != 0)
        return MODEL(ACC_OPEN);
    return models_for_rel(xd_roster_relation(&oj, &wj));
}

/* ---- notifications (XEP-0163 4) ------------------------------------------------------ */

static int
watcher_wants(const watcher *w, const char *node)
{
    for (size_t i = 0; i < w->nnotify; i++)
        if (!strcmp(w->notify[i], node))
            return 1;
    return 0;
}

static watcher *
watcher_find(pep_mod *p, const char *owner, const char *full)
{
    for (size_t i = 0; i < p->nw; i++)
        if (!p->w[i]->dead && !strcmp(p->w[i]->full, full) && !strcmp(p->w[i]->owner, owner))
            return p->w[i];
    return NULL;
}

static void
watcher_free(watcher *w)
{
    free(w->owner);
    free(w->full);
    free(w->ver);
    free_strv(w->notify, w->nnotify);
    free(w);
}

/* From the event loop only (see the header): free the dead, keep the order. */
static void
sweep_dead(void *data)
{
    pep_mod *p = data;
    size_t k = 0;

    p->sweep = NULL; /* a one-shot timer is spent once it fires */
    for (size_t i = 0; i < p->nw; i++)
        if (p->w[i]->dead)
            watcher_free(p->w[i]);
        else
            p->w[k++] = p->w[i];
    p->nw = k;
    p->ndead = 0;
}

/* The interest is gone.  The record stays in place until sweep_dead(): a
 * caller up the stack may hold it or be walking the table. */
static void
watcher_drop(pep_mod *p, watcher *w)
{
    if (w->dead)
        return;
    w->dead = 1;
    p->ndead++;
    if (!p->sweep)
        p->sweep = xd_timer_start(p->m, 0., 0., sweep_dead, p);
    /* no timer (out of memory): the next drop asks again; until then the
     * dead only take table space */
}

typedef struct sess_find {
    const char *full;
    int found;
} sess_find;

static int
find_session(xd_session *s, void *data)
{
    sess_find *f = data;
    char full[XD_JID_STR_MAX];
    if (xd_jid_format(xd_session_jid(s), 1, full, sizeof(full)) >= 0 && !strcmp(full, f->full))
        return f->found = 1;
    return 0;
}

/* A local full JID must be a bound session right now: the core delivers a
 * headline for a gone resource to the user's other resources.  (Directed
 * presence is enough to be interested: the session need not be available.) */
static int
recipient_ok(const char *full)
{
    xd_jid j;
    sess_find f = {full, 0};
    if (xd_jid_parse(&j, full) != 0 || !j.resource[0])
        return 0;
    if (!xd_is_local_host(j.domain))
        return 1;
    xd_jid_to_bare(&j);
    xd_user_sessions(&j, find_session, &f);
    return f.found;
}

/* <message from=owner to=full type=headline><event>child</event></message>, routed. */
static size_t
send_event(const char *owner, const char *full, xmpp_stanza_t *child)
{
    xmpp_stanza_t *msg = xmpp_message_new(xd_ctx(), "headline", full, NULL);
    xmpp_stanza_t *ev = xd_stanza_new("event", NS_PUBSUB_EVENT);
    size_t len = 0;
    char *buf = NULL;

    xmpp_stanza_set_from(msg, owner);
    xmpp_stanza_add_child_ex(ev, xmpp_stanza_copy(child), 0);
    xmpp_stanza_add_child_ex(msg, ev, 0);
    if (xmpp_stanza_to_text(msg, &buf, &len) == XMPP_EOK)
        xmpp_free(xd_ctx(), buf);
    xd_route(msg);
    return len;
}

typedef struct owner_notify {
    pep_mod *p;
    const char *owner;
    const char *node;
    xmpp_stanza_t *child;
} owner_notify;

static int
notify_own_resource(xd_session *s, void *data)
{
    owner_notify *o = data;
    char full[XD_JID_STR_MAX];
    watcher *w;

    if (!xd_session_is_available(s) ||
        xd_jid_format(xd_session_jid(s), 1, full, sizeof(full)) < 0)
        return 0;
    /* The owner's resources get every event unless their caps are known
     * and do not ask for this node (XEP-0163 4.3 filtering). */
    w = watcher_find(o->p, o->owner, full);
    if (w && w->resolved && !watcher_wants(w, o->node))
        return 0;
    send_event(o->owner, full, o->child);
    return 0;
}

/* Send an event about node to everyone entitled and interested. */
static void
notify_all(pep_mod *p, const char *owner, const char *node, const node_conf *c,
           xmpp_stanza_t *child)
{
    owner_notify o = {p, owner, node, child};
    xd_jid oj;

    if (xd_jid_parse(&oj, owner) == 0)
        xd_user_sessions(&oj, notify_own_resource, &o);
    for (size_t i = 0; i < p->nw; i++) {
        watcher *w = p->w[i];
        xd_jid fj;
        char fb[XD_JID_STR_MAX];
        if (w->dead || strcmp(w->owner, owner) || !w->resolved || !watcher_wants(w, node))
            continue;
        if (xd_jid_parse(&fj, w->full) != 0 || bare_of(&fj, fb, sizeof(fb)) ||
            !strcmp(fb, owner))
            continue; /* the owner's own resources were served above */
        /* the roster is asked at each event: a subscription may have gone */
        if (c->access != ACC_OPEN && !(models_for(owner, fb) & MODEL(c->access)))
            continue;
        if (recipient_ok(w->full))
            send_event(owner, w->full, child);
    }
}

/* <items node='N'><item id='X'>payload</item></items> */
static xmpp_stanza_t *
items_event(const char *node, const char *id, const char *xml)
{
    xmpp_stanza_t *items = xd_stanza_new("items", NULL);
    xmpp_stanza_set_attribute(items, "node", node);
    xmpp_stanza_add_child_ex(items, item_el(id, xml), 0);
    return items;
}

typedef struct node_names {
    char **v;
    size_t n, cap;
    size_t plen;
} node_names;

static int
names_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    node_names *nn = data;
    (void)val;
    (void)vlen;
    if (nn->n == nn->cap) {
        size_t cap = nn->cap ? nn->cap * 2 : 16;
        char **v = realloc(nn->v, cap * sizeof(*v));
        if (!v)
            return 1;
        nn->v = v;
        nn->cap = cap;
    }
    if (!(nn->v[nn->n] = strndup((const char *)key + nn->plen, klen - nn->plen)))
        return 1;
    nn->n++;
    return 0;
}

static int
node_names_of(pep_mod *p, xd_txn *txn, const char *owner, node_names *nn)
{
    size_t plen = strlen(owner) + 1;
    memset(nn, 0, sizeof(*nn));
    nn->plen = plen;
    return xd_db_foreach(p->nodes, txn, owner, plen, names_visit, nn) == 0 ? 0 : -1;
}

/*
 * XEP-0163 4.3.2 / XEP-0060 6.1.7: the last item of each node w wants and
 * may see, to w alone.  only == 0: it became available and interested
 * (send_last_published_item on_sub_and_presence); otherwise it just gained
 * access to the models in `only` through its roster (on_sub as well).
 * Bounded in bytes so a user with many large nodes cannot flood one stream.
 */
static void
send_last_items(pep_mod *p, watcher *w, unsigned only)
{
    node_names nn;
    size_t budget = LAST_ITEMS_BUDGET;
    char who[XD_JID_STR_MAX];
    xd_jid fj;
    unsigned allowed;

    if (w->dead || xd_jid_parse(&fj, w->full) != 0 || bare_of(&fj, who, sizeof(who)) != 0)
        return;
    allowed = w->models = models_for(w->owner, who);
    if (only)
        allowed &= only;
    if (!allowed || !w->resolved || !w->nnotify || !recipient_ok(w->full) ||
        node_names_of(p, NULL, w->owner, &nn) != 0)
        return;
    /* w->dead: a send ended the session (w itself stays valid until the sweep) */
    for (size_t i = 0; i < nn.n && budget > 0 && !w->dead; i++) {
        node_conf c;
        item_list l;
        if (!watcher_wants(w, nn.v[i]) || conf_load(p, NULL, w->owner, nn.v[i], &c) != 0 ||
            !(allowed & MODEL(c.access)) ||
            (only ? c.send_last == SL_NEVER : c.send_last != SL_ON_SUB_AND_PRESENCE))
            continue;
        if (items_list(p, NULL, w->owner, nn.v[i], 1, &l) != 0)
            continue;
        if (l.n) {
            xmpp_stanza_t *ev = items_event(nn.v[i], l.v[l.n - 1].id, l.v[l.n - 1].xml);
            size_t sent = send_event(w->owner, w->full, ev);
            budget = sent >= budget ? 0 : budget - sent;
            xmpp_stanza_release(ev);
        }
        items_free(&l);
    }
    free_strv(nn.v, nn.n);
}

/* ---- entity capabilities (XEP-0115) ------------------------------------------------- */

static caps_ent *
caps_lookup(pep_mod *p, const char *ver)
{
    for (size_t i = 0; i < p->ncaps; i++)
        if (!strcmp(p->caps[i].ver, ver)) {
            p->caps[i].used = ++p->tick;
            return &p->caps[i];
        }
    return NULL;
}

static void
caps_store(pep_mod *p, const char *ver, char **notify, size_t n)
{
    caps_ent *e;
    char **copy;
    char *v;

    if (caps_lookup(p, ver))
        return;
    if (!(copy = dup_strv(notify, n)) || !(v = strdup(ver))) {
        if (copy)
            free_strv(copy, n);
        return;
    }
    if (p->ncaps < CAPS_CACHE_MAX) {
        e = &p->caps[p->ncaps++];
    } else {
        /* full: the least recently used entry goes */
        e = &p->caps[0];
        for (size_t i = 1; i < p->ncaps; i++)
            if (p->caps[i].used < e->used)
                e = &p->caps[i];
        free(e->ver);
        free_strv(e->notify, e->nnotify);
    }
    e->ver = v;
    e->notify = copy;
    e->nnotify = n;
    e->used = ++p->tick;
}

static void
watcher_resolve(watcher *w, char **notify, size_t n)
{
    char **copy = dup_strv(notify, n);
    if (!copy)
        return;
    free_strv(w->notify, w->nnotify);
    w->notify = copy;
    w->nnotify = n;
    w->resolved = 1;
    w->qid[0] = '\0';
}

/* Ask the client what it supports (XEP-0115 6.3): disco#info of node#ver. */
static void
caps_query(pep_mod *p, watcher *w, const char *capsnode, const char *from_domain)
{
    xmpp_stanza_t *iq = xmpp_iq_new(xd_ctx(), "get", NULL);
    xmpp_stanza_t *q = xd_stanza_new("query", NS_DISCO_INFO);
    char node[VER_MAX + 1100];

    snprintf(w->qid, sizeof(w->qid), QID_PREFIX "%llu", ++p->counter);
    w->qtime = xd_now();
    xmpp_stanza_set_id(iq, w->qid);
    xmpp_stanza_set_from(iq, from_domain);
    xmpp_stanza_set_to(iq, w->full);
    snprintf(node, sizeof(node), "%s#%s", capsnode, w->ver);
    xmpp_stanza_set_attribute(q, "node", node);
    xmpp_stanza_add_child_ex(iq, q, 0);
    xd_route(iq);
}

/*
 * A presence from full to owner (or the owner's own broadcast presence):
 * record, update or drop the interest it carries.
 */
static void
track_presence(pep_mod *p, const char *owner, const xd_jid *fromj, xmpp_stanza_t *pres)
{
    const char *type = xmpp_stanza_get_type(pres);
    xmpp_stanza_t *c = xmpp_stanza_get_child_by_name_and_ns(pres, "c", NS_CAPS);
    const char *ver = c ? xmpp_stanza_get_attribute(c, "ver") : NULL;
    const char *hash = c ? xmpp_stanza_get_attribute(c, "hash") : NULL;
    const char *cnode = c ? xmpp_stanza_get_attribute(c, "node") : NULL;
    char full[XD_JID_STR_MAX];
    watcher *w;
    size_t per_owner = 0;
    caps_ent *ce;
    int is_new = 0;

    if (!fromj->resource[0] || xd_jid_format(fromj, 1, full, sizeof(full)) < 0)
        return;
    if (type && strcmp(type, "unavailable"))
        return; /* subscriptions, probes, errors: not availability */
    w = watcher_find(p, owner, full);
    /* legacy caps (no 'hash') carry no usable ver (XEP-0115 1.2) */
    if (type || !ver || !hash || !cnode || !*ver || strlen(ver) > VER_MAX ||
        strlen(cnode) > 1024) {
        if (w)
            watcher_drop(p, w);
        return;
    }
    if (w && w->ver && !strcmp(w->ver, ver) &&
        (w->resolved || (w->qid[0] && xd_now() - w->qtime < REQUERY_AFTER)))
        return; /* nothing new (a status change) */
    if (!w) {
        xd_jid oj;
        /* presence to a user who does not exist must not take table space */
        if (xd_jid_parse(&oj, owner) != 0 || xd_account_exists(&oj) != 1)
            return;
        for (size_t i = 0; i < p->nw; i++)
            per_owner += !p->w[i]->dead && !strcmp(p->w[i]->owner, owner);
        if (p->nw - p->ndead >= WATCHERS_MAX || per_owner >= WATCHERS_PER_OWNER) {
            xd_debug("pep: interest table full; %s not tracked for %s", full, owner);
            return;
        }
        if (p->nw == p->capw) {
            size_t cap = p->capw ? p->capw * 2 : 64;
            watcher **v = realloc(p->w, cap * sizeof(*v));
            if (!v)
                return;
            p->w = v;
            p->capw = cap;
        }
        if (!(w = calloc(1, sizeof(*w))) || !(w->owner = strdup(owner)) ||
            !(w->full = strdup(full))) {
            if (w)
                watcher_free(w);
            return;
        }
        p->w[p->nw++] = w;
        is_new = 1;
    }
    if (!w->ver || strcmp(w->ver, ver)) {
        char *v = strdup(ver);
        if (!v)
            return;
        free(w->ver);
        w->ver = v;
        w->resolved = 0;
        w->qid[0] = '\0';
        is_new = 1; /* new capabilities: maybe new interests, last items again */
    }
    w->sha1 = !strcmp(hash, "sha-1");
    if ((ce = caps_lookup(p, ver))) {
        watcher_resolve(w, ce->notify, ce->nnotify);
        if (is_new)
            send_last_items(p, w, 0);
        return;
    }
    /* Another watcher of the same full JID and ver may already be asking. */
    for (size_t i = 0; i < p->nw; i++) {
        watcher *o = p->w[i];
        if (o != w && !o->dead && !strcmp(o->full, full) && o->ver && !strcmp(o->ver, ver)) {
            if (o->resolved) {
                watcher_resolve(w, o->notify, o->nnotify);
                if (is_new)
                    send_last_items(p, w, 0);
                return;
            }
            if (o->qid[0] && xd_now() - o->qtime < REQUERY_AFTER)
                return; /* its answer will resolve us too */
        }
    }
    {
        xd_jid oj;
        if (xd_jid_parse(&oj, owner) == 0)
            caps_query(p, w, cnode, oj.domain);
    }
}

typedef struct ident {
    const char *cat, *type, *lang, *name;
} ident;

static const char *
nz(const char *s)
{
    return s ? s : "";
}

static int
ident_cmp(const void *a, const void *b)
{
    const ident *x = a, *y = b;
    int r = strcmp(nz(x->cat), nz(y->cat));
    if (!r)
        r = strcmp(nz(x->type), nz(y->type));
    if (!r)
        r = strcmp(nz(x->lang), nz(y->lang));
    if (!r)
        r = strcmp(nz(x->name), nz(y->name));
    return r;
}

static int
str_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

typedef struct sbuf {
    char *s;
    size_t n, cap;
    int oom;
} sbuf;

static void
sb_add(sbuf *b, const char *s)
{
    size_t l = strlen(s);
    if (b->oom)
        return;
    if (b->n + l + 2 > b->cap) {
        size_t cap = (b->n + l + 2) * 2;
        char *ns = realloc(b->s, cap);
        if (!ns) {
            b->oom = 1;
            return;
        }
        b->s = ns;
        b->cap = cap;
    }
    memcpy(b->s + b->n, s, l);
    b->n += l;
    b->s[b->n++] = '<';
    b->s[b->n] = '\0';
}

/* Texts of the <value/> children of a field (borrowed from a string pool). */
typedef struct pool {
    char **v;
    size_t n, cap;
} pool;

static char *
pool_add(pool *pl, char *s)
{
    if (!s)
        return NULL;
    if (pl->n == pl->cap) {
        size_t cap = pl->cap ? pl->cap * 2 : 32;
        char **v = realloc(pl->v, cap * sizeof(*v));
        if (!v) {
            xmpp_free(xd_ctx(), s);
            return NULL;
        }
        pl->v = v;
        pl->cap = cap;
    }
    return pl->v[pl->n++] = s;
}

static void
pool_free(pool *pl)
{
    for (size_t i = 0; i < pl->n; i++)
        xmpp_free(xd_ctx(), pl->v[i]);
    free(pl->v);
}

/* Append one XEP-0128 form to S (XEP-0115 5.1 step 8).  -1: malformed. */
static int
form_string(xmpp_stanza_t *x, sbuf *b, pool *pl)
{
    size_t nf = (size_t)count_children(x, "field"), k = 0;
    xmpp_stanza_t **fields = calloc(nf ? nf : 1, sizeof(*fields));
    int r = 0;

    if (!fields)
        return -1;
    for (xmpp_stanza_t *f = xmpp_stanza_get_children(x); f; f = xmpp_stanza_get_next(f))
        if (xmpp_stanza_is_tag(f) && !strcmp(xmpp_stanza_get_name(f), "field")) {
            if (!xmpp_stanza_get_attribute(f, "var")) {
                r = -1;
                goto out;
            }
            fields[k++] = f;
        }
    /* sort by var (insertion sort: forms are small) */
    for (size_t i = 1; i < k; i++)
        for (size_t j = i; j > 0 && strcmp(xmpp_stanza_get_attribute(fields[j - 1], "var"),
                                           xmpp_stanza_get_attribute(fields[j], "var")) > 0;
             j--) {
            xmpp_stanza_t *t = fields[j];
            fields[j] = fields[j - 1];
            fields[j - 1] = t;
        }
    for (size_t i = 0; i < k; i++) {
        const char *var = xmpp_stanza_get_attribute(fields[i], "var");
        size_t nv = (size_t)count_children(fields[i], "value"), m = 0;
        char **vals = calloc(nv ? nv : 1, sizeof(*vals));
        if (!vals) {
            r = -1;
            goto out;
        }
        for (xmpp_stanza_t *v = xmpp_stanza_get_children(fields[i]); v;
             v = xmpp_stanza_get_next(v))
            if (xmpp_stanza_is_tag(v) && !strcmp(xmpp_stanza_get_name(v), "value")) {
                char *t = pool_add(pl, xmpp_stanza_get_text(v));
                vals[m++] = t ? t : "";
            }
        qsort(vals, m, sizeof(*vals), str_cmp);
        if (!strcmp(var, "FORM_TYPE")) {
            free(vals);
            continue; /* written first, by the caller */
        }
        sb_add(b, var);
        for (size_t j = 0; j < m; j++)
            sb_add(b, vals[j]);
        free(vals);
    }
out:
    free(fields);
    return r;
}

static char *
form_type_of(xmpp_stanza_t *x, pool *pl)
{
    for (xmpp_stanza_t *f = xmpp_stanza_get_children(x); f; f = xmpp_stanza_get_next(f)) {
        const char *var;
        xmpp_stanza_t *v;
        if (!xmpp_stanza_is_tag(f) || strcmp(xmpp_stanza_get_name(f), "field") ||
            !(var = xmpp_stanza_get_attribute(f, "var")) || strcmp(var, "FORM_TYPE"))
            continue;
        v = child_named(f, "value");
        return v ? pool_add(pl, xmpp_stanza_get_text(v)) : NULL;
    }
    return NULL;
}

typedef struct form_ref {
    const char *type;
    xmpp_stanza_t *x;
} form_ref;

static int
form_ref_cmp(const void *a, const void *b)
{
    return strcmp(((const form_ref *)a)->type, ((const form_ref *)b)->type);
}

/* XEP-0115 5.1/5.4: does the disco#info answer hash (SHA-1) to ver? */
static int
caps_verify(xmpp_stanza_t *query, const char *ver)
{
    size_t ni = (size_t)count_children(query, "identity"),
           nf = (size_t)count_children(query, "feature"), nx = (size_t)count_children(query, "x");
    ident *ids = calloc(ni ? ni : 1, sizeof(*ids));
    const char **feats = calloc(nf ? nf : 1, sizeof(*feats));
    form_ref *forms = calloc(nx ? nx : 1, sizeof(*forms));
    size_t ki = 0, kf = 0, kx = 0;
    sbuf b = {0};
    pool pl = {0};
    int ok = 0;

    if (!ids || !feats || !forms)
        goto out;
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(query); c; c = xmpp_stanza_get_next(c)) {
        const char *name;
        if (!xmpp_stanza_is_tag(c))
            continue;
        name = xmpp_stanza_get_name(c);
        if (!strcmp(name, "identity")) {
            ids[ki].cat = xmpp_stanza_get_attribute(c, "category");
            ids[ki].type = xmpp_stanza_get_attribute(c, "type");
            ids[ki].lang = xmpp_stanza_get_attribute(c, "xml:lang");
            ids[ki].name = xmpp_stanza_get_attribute(c, "name");
            ki++;
        } else if (!strcmp(name, "feature")) {
            if (!(feats[kf] = xmpp_stanza_get_attribute(c, "var")))
                goto out;
            kf++;
        } else if (!strcmp(name, "x") && xmpp_stanza_get_ns(c) &&
                   !strcmp(xmpp_stanza_get_ns(c), NS_XDATA)) {
            const char *t = form_type_of(c, &pl);
            if (t) { /* a form without FORM_TYPE is ignored (5.4 3.6) */
                forms[kx].type = t;
                forms[kx].x = c;
                kx++;
            }
        }
    }
    qsort(ids, ki, sizeof(*ids), ident_cmp);
    qsort(feats, kf, sizeof(*feats), str_cmp);
    qsort(forms, kx, sizeof(*forms), form_ref_cmp);
    for (size_t i = 0; i < ki; i++) {
        char tmp[4200];
        if (i && !ident_cmp(&ids[i - 1], &ids[i]))
            goto out; /* 5.4 3.4: duplicate identity */
        snprintf(tmp, sizeof(tmp), "%s/%s/%s/%s", nz(ids[i].cat), nz(ids[i].type),
                 nz(ids[i].lang), nz(ids[i].name));
        sb_add(&b, tmp);
    }
    for (size_t i = 0; i < kf; i++) {
        if (i && !strcmp(feats[i - 1], feats[i]))
            goto out; /* 5.4 3.5: duplicate feature */
        sb_add(&b, feats[i]);
    }
    for (size_t i = 0; i < kx; i++) {
        if (i && !strcmp(forms[i - 1].type, forms[i].type))
            goto out; /* 5.4 3.6: two forms of one FORM_TYPE */
        sb_add(&b, forms[i].type);
        if (form_string(forms[i].x, &b, &pl) != 0)
            goto out;
    }
    if (!b.oom) {
        unsigned char digest[20];
        char *enc;
        xmpp_sha1_digest((const unsigned char *)(b.s ? b.s : ""), b.n, digest);
        if ((enc = xd_base64_encode(digest, sizeof(digest)))) {
            ok = !strcmp(enc, ver);
            free(enc);
        }
    }
out:
    free(ids);
    free(feats);
    free(forms);
    free(b.s);
    pool_free(&pl);
    return ok;
}

/* XD_HOOK_ROUTE: answers to our disco#info queries (sent to the server).  About 230
 * instructions for any other stanza. */
static int
pep_route(xd_event *ev, void *data)
{
    pep_mod *p = data;
    xmpp_stanza_t *st = ev->stanza, *q;
    const char *id = xmpp_stanza_get_id(st), *type = xmpp_stanza_get_type(st);
    char from[XD_JID_STR_MAX];
    watcher *w = NULL;
    char **notify = NULL;
    size_t n = 0;
    char *ver;

    if (strcmp(xmpp_stanza_get_name(st), "iq") || !id || !type ||
        strncmp(id, QID_PREFIX, strlen(QID_PREFIX)) ||
        (strcmp(type, "result") && strcmp(type, "error")) || !ev->from ||
        xd_jid_format(ev->from, 1, from, sizeof(from)) < 0)
        return XD_PASS;
    /* only the JID we asked can answer (the id alone could be guessed) */
    for (size_t i = 0; i < p->nw && !w; i++)
        if (!p->w[i]->dead && !strcmp(p->w[i]->qid, id) && !strcmp(p->w[i]->full, from))
            w = p->w[i];
    if (!w)
        return XD_PASS; /* not an answer to us: the core routes it as usual */
    if (!strcmp(type, "error")) {
        w->qid[0] = '\0';
        return XD_DROP; /* stays unresolved: no notifications it did not ask for */
    }
    if (!(ver = strdup(w->ver)))
        return XD_DROP;
    q = xmpp_stanza_get_child_by_name_and_ns(st, "query", NS_DISCO_INFO);
    if (!(notify = calloc(NOTIFY_MAX, sizeof(*notify)))) {
        free(ver);
        return XD_DROP;
    }
    for (xmpp_stanza_t *c = q ? xmpp_stanza_get_children(q) : NULL; c && n < NOTIFY_MAX;
         c = xmpp_stanza_get_next(c)) {
        const char *var;
        size_t l;
        if (!xmpp_stanza_is_tag(c) || strcmp(xmpp_stanza_get_name(c), "feature") ||
            !(var = xmpp_stanza_get_attribute(c, "var")))
            continue;
        l = strlen(var);
        if (l > 7 && l - 7 <= NODE_MAX && !strcmp(var + l - 7, "+notify"))
            if (!(notify[n] = strndup(var, l - 7)))
                break;
        n += notify[n] != NULL;
    }
    /* Shared by ver only when the answer proves it (XEP-0115 5.4). */
    if (q && w->sha1 && caps_verify(q, ver))
        caps_store(p, ver, notify, n);
    else
        xd_debug("pep: caps of %s not verified; used for that JID only", from);
    for (size_t i = 0; i < p->nw; i++) {
        watcher *o = p->w[i];
        if (!o->dead && !strcmp(o->full, from) && o->ver && !strcmp(o->ver, ver) &&
            !o->resolved) {
            watcher_resolve(o, notify, n);
            send_last_items(p, o, 0);
        }
    }
    free_strv(notify, n);
    free(ver);
    return XD_DROP;
}

/* XD_HOOK_DELIVER_LOCAL: presence from a contact (or anyone) to a local user. */
static int
pep_deliver_local(xd_event *ev, void *data)
{
    pep_mod *p = data;
    char owner[XD_JID_STR_MAX];

    if (strcmp(xmpp_stanza_get_name(ev->stanza), "presence") || !ev->from ||
        bare_of(ev->to, owner, sizeof(owner)))
        return XD_PASS;
    track_presence(p, owner, ev->from, ev->stanza);
    return XD_PASS;
}

/* XD_HOOK_PRESENCE_OUT: the owner's own resources. */
static int
pep_presence_out(xd_event *ev, void *data)
{
    pep_mod *p = data;
    char owner[XD_JID_STR_MAX];
    if (bare_of(xd_session_jid(ev->session), owner, sizeof(owner)))
        return XD_PASS;
    track_presence(p, owner, xd_session_jid(ev->session), ev->stanza);
    return XD_PASS;
}

static int
pep_session_end(xd_event *ev, void *data)
{
    pep_mod *p = data;
    char full[XD_JID_STR_MAX];
    if (xd_jid_format(xd_session_jid(ev->session), 1, full, sizeof(full)) < 0)
        return XD_PASS;
    /* We may be inside a send of ours to this very session (see the header). */
    for (size_t i = 0; i < p->nw; i++)
        if (!strcmp(p->w[i]->full, full))
            watcher_drop(p, p->w[i]);
    return XD_PASS;
}

/*
 * XD_HOOK_ROSTER_CHANGED (after mod_roster's commit): a contact of the user
 * may have gained access to presence or roster nodes.  Its interested
 * resources get the last items of what they can see now and could not
 * before (XEP-0060 6.1.7: as on a new subscription).  Losing access needs
 * nothing here: every event checks the roster again.
 */
static int
pep_roster_changed(xd_event *ev, void *data)
{
    pep_mod *p = data;
    char owner[XD_JID_STR_MAX], contact[XD_JID_STR_MAX];
    unsigned now;

    if (!ev->from || !ev->to || bare_of(ev->from, owner, sizeof(owner)) ||
        bare_of(ev->to, contact, sizeof(contact)) || !strcmp(owner, contact))
        return XD_PASS;
    now = models_for_rel((int)ev->flags);
    for (size_t i = 0; i < p->nw; i++) {
        watcher *w = p->w[i];
        xd_jid fj;
        char fb[XD_JID_STR_MAX];
        unsigned gained;
        if (w->dead || strcmp(w->owner, owner) || !w->resolved || xd_jid_parse(&fj, w->full) != 0 ||
            bare_of(&fj, fb, sizeof(fb)) || strcmp(fb, contact))
            continue;
        gained = now & ~w->models & ~MODEL(ACC_OPEN); /* open never depends on it */
        w->models = now;
        if (gained)
            send_last_items(p, w, gained);
    }
    return XD_PASS;
}

static int
pep_account_removed(xd_event *ev, void *data)
{
    pep_mod *p = data;
    char owner[XD_JID_STR_MAX];
    if (!ev->from || bare_of(ev->from, owner, sizeof(owner)))
        return XD_PASS;
    for (size_t i = 0; i < p->nw; i++)
        if (!strcmp(p->w[i]->owner, owner))
            watcher_drop(p, p->w[i]);
    return XD_PASS;
}

/* ---- the pubsub requests ------------------------------------------------------------- */

typedef struct req {
    pep_mod *p;
    xd_event *ev;
    xmpp_stanza_t *iq;
    char owner[XD_JID_STR_MAX];
    int is_owner;
} req;

static int
req_init(req *r, pep_mod *p, xd_event *ev)
{
    char from[XD_JID_STR_MAX];
    r->p = p;
    r->ev = ev;
    r->iq = ev->stanza;
    if (bare_of(ev->to, r->owner, sizeof(r->owner)) ||
        (ev->from && bare_of(ev->from, from, sizeof(from)))) {
        xd_bounce(ev->stanza, "modify", "jid-malformed", NULL);
        return -1;
    }
    r->is_owner = ev->from && !strcmp(from, r->owner);
    return 0;
}

static void
reply_pubsub(req *r, const char *ns, xmpp_stanza_t *child)
{
    xmpp_stanza_t *res = xd_iq_result(r->iq);
    if (child) {
        xmpp_stanza_t *ps = xd_stanza_new("pubsub", ns);
        xmpp_stanza_add_child_ex(ps, child, 0);
        xmpp_stanza_add_child_ex(res, ps, 0);
    }
    xd_route(res);
}

static void
storage_error(req *r)
{
    reply_err(r->iq, "wait", "internal-server-error", NULL, NULL);
}

/* Count the owner's nodes (for max_nodes). */
static int
count_visit(const void *k, size_t kl, const void *v, size_t vl, void *data)
{
    (void)k;
    (void)kl;
    (void)v;
    (void)vl;
    (*(long long *)data)++;
    return 0;
}

/* Create a node inside txn.  0 ok, 1 limit reached, -1 error. */
static int
node_create(req *r, xd_txn *txn, const char *node, const node_conf *c)
{
    long long n = 0;
    if (xd_db_foreach(r->p->nodes, txn, r->owner, strlen(r->owner) + 1, count_visit, &n) < 0)
        return -1;
    if (n >= r->p->max_nodes)
        return 1;
    return conf_store(r->p, txn, r->owner, node, c) ? -1 : 0;
}

static xmpp_stanza_t *
find_form(xmpp_stanza_t *parent)
{
    return parent ? xmpp_stanza_get_child_by_name_and_ns(parent, "x", NS_XDATA) : NULL;
}

/* XEP-0060 7.1 (with 7.1.5 publish-options) and XEP-0163 3 auto-create. */
static void
do_publish(req *r, xmpp_stanza_t *ps, xmpp_stanza_t *pub)
{
    pep_mod *p = r->p;
    const char *node = xmpp_stanza_get_attribute(pub, "node");
    xmpp_stanza_t *item = child_named(pub, "item"), *payload = NULL, *po, *x, *ev;
    const char *given_id = item ? xmpp_stanza_get_id(item) : NULL;
    char id[ITEM_ID_MAX + 1], key[KEY_MAX];
    form_in f = {0};
    node_conf c;
    xd_txn *txn = NULL;
    char *xml = NULL, *val = NULL;
    size_t xlen = 0, klen;
    int exists, rc;

    if (!r->is_owner) {
        reply_err(r->iq, "auth", "forbidden", NULL, NULL);
        return;
    }
    if (!node || !*node) {
        reply_err(r->iq, "modify", "bad-request", "nodeid-required", NULL);
        return;
    }
    if (!valid_node(node)) {
        reply_err(r->iq, "modify", "not-acceptable", NULL, NULL);
        return;
    }
    if (!item || count_children(pub, NULL) != 1) {
        reply_err(r->iq, "modify", "bad-request", item ? "invalid-payload" : "item-required",
                  NULL);
        return;
    }
    if (count_children(item, NULL) != 1) {
        /* PEP items carry exactly one payload (XEP-0060 7.1.3.6, 7.1.3.7) */
        reply_err(r->iq, "modify", "bad-request",
                  count_children(item, NULL) ? "invalid-payload" : "payload-required", NULL);
        return;
    }
    for (payload = xmpp_stanza_get_children(item); !xmpp_stanza_is_tag(payload);
         payload = xmpp_stanza_get_next(payload))
        ;
    if (given_id && (!*given_id || strlen(given_id) > ITEM_ID_MAX)) {
        reply_err(r->iq, "modify", "not-acceptable", NULL, NULL);
        return;
    }
    if ((po = child_named(ps, "publish-options")) && (x = find_form(po)) &&
        form_read(p, x, NS_PUBLISH_OPTIONS, &f) != 0) {
        xd_debug("pep: publish-options of %s: unsupported or bad field %s", r->owner, f.bad);
        reply_err(r->iq, "cancel", "conflict", "precondition-not-met", NULL);
        return;
    }
    if (xmpp_stanza_to_text(payload, &xml, &xlen) != XMPP_EOK || !xml) {
        storage_error(r);
        return;
    }
    if ((long long)xlen > p->max_item_size) {
        xmpp_free(xd_ctx(), xml);
        reply_err(r->iq, "modify", "not-acceptable", "payload-too-big", NULL);
        return;
    }
    if (xd_txn_begin(&txn) != 0) {
        xmpp_free(xd_ctx(), xml);
        storage_error(r);
        return;
    }
    exists = conf_load(p, txn, r->owner, node, &c);
    if (exists < 0)
        goto fail;
    if (exists == XD_NOTFOUND) {
        conf_default(&c);
        form_apply(&f, &c);
        if ((rc = node_create(r, txn, node, &c)) != 0) {
            if (rc < 0)
                goto fail;
            xd_txn_abort(txn);
            xmpp_free(xd_ctx(), xml);
            reply_err(r->iq, "cancel", "policy-violation", NULL, NULL);
            return;
        }
    } else if (!form_matches(p, &f, &c)) {
        xd_txn_abort(txn);
        xmpp_free(xd_ctx(), xml);
        reply_err(r->iq, "cancel", "conflict", "precondition-not-met", NULL);
        return;
    }
    if (given_id)
        snprintf(id, sizeof(id), "%s", given_id);
    else
        snprintf(id, sizeof(id), "%llx-%llx", (unsigned long long)(xd_now() * 1e6), c.seq);
    if (c.persist) {
        if (!(val = malloc(xlen + 32)))
            goto fail;
        klen = item_key(key, sizeof(key), r->owner, node, id);
        rc = snprintf(val, 32, "%llu\n", c.seq);
        memcpy(val + rc, xml, xlen);
        if (!klen || xd_db_put(p->items, txn, key, klen, val, (size_t)rc + xlen) != 0)
            goto fail;
        c.seq++;
        if (conf_store(p, txn, r->owner, node, &c) != 0 ||
            items_trim(p, txn, r->owner, node, effective_max(p, &c)) != 0)
            goto fail;
    } else if (items_trim(p, txn, r->owner, node, 0) != 0) {
        goto fail;
    }
    if (xd_txn_commit(txn) != 0) {
        txn = NULL;
        goto fail;
    }
    {
        xmpp_stanza_t *rp = xd_stanza_new("publish", NULL), *ri = xd_stanza_new("item", NULL);
        xmpp_stanza_set_attribute(rp, "node", node);
        xmpp_stanza_set_id(ri, id);
        xmpp_stanza_add_child_ex(rp, ri, 0);
        reply_pubsub(r, NS_PUBSUB, rp);
    }
    ev = items_event(node, id, xml);
    notify_all(p, r->owner, node, &c, ev);
    xmpp_stanza_release(ev);
    free(val);
    xmpp_free(xd_ctx(), xml);
    return;
fail:
    if (txn)
        xd_txn_abort(txn);
    free(val);
    xmpp_free(xd_ctx(), xml);
    storage_error(r);
}

/* The access check of XEP-0060 6.5.9 (the models: see the header). */
static int
may_read(req *r, const node_conf *c)
{
    char from[XD_JID_STR_MAX];

    if (r->is_owner || c->access == ACC_OPEN)
        return 1;
    if (r->ev->from && bare_of(r->ev->from, from, sizeof(from)) == 0 &&
        (models_for(r->owner, from) & MODEL(c->access)))
        return 1;
    if (c->access == ACC_PRESENCE)
        reply_err(r->iq, "auth", "not-authorized", "presence-subscription-required", NULL);
    else if (c->access == ACC_ROSTER)
        reply_err(r->iq, "auth", "not-authorized", "not-in-roster-group", NULL);
    else
        reply_err(r->iq, "cancel", "not-allowed", "closed-node", NULL);
    return 0;
}

/* Load a node's config and answer item-not-found when it is absent.  0 found. */
static int
node_or_error(req *r, const char *node, node_conf *c)
{
    int rc;
    if (!valid_node(node)) {
        reply_err(r->iq, "modify", "bad-request", "nodeid-required", NULL);
        return -1;
    }
    rc = conf_load(r->p, NULL, r->owner, node, c);
    if (rc == XD_NOTFOUND)
        reply_err(r->iq, "cancel", "item-not-found", NULL, NULL);
    else if (rc < 0)
        storage_error(r);
    return rc;
}

/* XEP-0060 6.5: all items, the newest max_items, or the ones asked by id. */
static void
do_items(req *r, xmpp_stanza_t *items)
{
    const char *node = xmpp_stanza_get_attribute(items, "node");
    const char *maxs = xmpp_stanza_get_attribute(items, "max_items");
    xmpp_stanza_t *out;
    node_conf c;
    long long max = -1;
    int asked = 0;

    if (node_or_error(r, node, &c) != 0 || !may_read(r, &c))
        return;
    if (maxs) {
        char *end;
        max = strtoll(maxs, &end, 10);
        if (!*maxs || *end || max < 0) {
            reply_err(r->iq, "modify", "bad-request", NULL, NULL);
            return;
        }
    }
    out = xd_stanza_new("items", NULL);
    xmpp_stanza_set_attribute(out, "node", node);
    for (xmpp_stanza_t *it = xmpp_stanza_get_children(items); it; it = xmpp_stanza_get_next(it)) {
        const char *id;
        char key[KEY_MAX];
        size_t klen, vlen;
        void *val;
        unsigned long long seq;
        const char *xml;
        if (!xmpp_stanza_is_tag(it) || strcmp(xmpp_stanza_get_name(it), "item"))
            continue;
        if (++asked > IDS_PER_REQUEST) {
            xmpp_stanza_release(out);
            reply_err(r->iq, "modify", "not-acceptable", NULL, NULL);
            return;
        }
        id = xmpp_stanza_get_id(it);
        if (!id || !(klen = item_key(key, sizeof(key), r->owner, node, id)) ||
            strlen(id) > ITEM_ID_MAX)
            continue;
        if (xd_db_get(r->p->items, NULL, key, klen, &val, &vlen) != 0)
            continue; /* an id that is not there is simply not returned */
        if (item_parse(val, vlen, &seq, &xml) == 0)
            xmpp_stanza_add_child_ex(out, item_el(id, xml), 0);
        free(val);
    }
    if (!asked) {
        item_list l;
        size_t from;
        if (items_list(r->p, NULL, r->owner, node, 1, &l) != 0) {
            xmpp_stanza_release(out);
            storage_error(r);
            return;
        }
        from = max >= 0 && (size_t)max < l.n ? l.n - (size_t)max : 0;
        for (size_t i = from; i < l.n; i++)
            xmpp_stanza_add_child_ex(out, item_el(l.v[i].id, l.v[i].xml), 0);
        items_free(&l);
    }
    reply_pubsub(r, NS_PUBSUB, out);
}

/* XEP-0060 7.2 */
static void
do_retract(req *r, xmpp_stanza_t *ret)
{
    const char *node = xmpp_stanza_get_attribute(ret, "node");
    const char *notify = xmpp_stanza_get_attribute(ret, "notify");
    xmpp_stanza_t *item = child_named(ret, "item");
    const char *id = item ? xmpp_stanza_get_id(item) : NULL;
    node_conf c;
    int rc;

    if (!r->is_owner) {
        reply_err(r->iq, "auth", "forbidden", NULL, NULL);
        return;
    }
    if (node_or_error(r, node, &c) != 0)
        return;
    if (!id || !*id || strlen(id) > ITEM_ID_MAX) {
        reply_err(r->iq, "modify", "bad-request", "item-required", NULL);
        return;
    }
    rc = item_del(r->p, NULL, r->owner, node, id);
    if (rc == XD_NOTFOUND) {
        reply_err(r->iq, "cancel", "item-not-found", NULL, NULL);
        return;
    }
    if (rc != 0) {
        storage_error(r);
        return;
    }
    reply_pubsub(r, NS_PUBSUB, NULL);
    if (c.notify_retract || is_true(notify)) {
        xmpp_stanza_t *items = xd_stanza_new("items", NULL), *rt = xd_stanza_new("retract", NULL);
        xmpp_stanza_set_attribute(items, "node", node);
        xmpp_stanza_set_id(rt, id);
        xmpp_stanza_add_child_ex(items, rt, 0);
        notify_all(r->p, r->owner, node, &c, items);
        xmpp_stanza_release(items);
    }
}

/* XEP-0060 8.1.2/8.1.3: create with an optional configure form. */
static void
do_create(req *r, xmpp_stanza_t *ps, xmpp_stanza_t *create)
{
    const char *node = xmpp_stanza_get_attribute(create, "node");
    xmpp_stanza_t *cfg = child_named(ps, "configure"), *x = find_form(cfg);
    form_in f = {0};
    node_conf c;
    xd_txn *txn;
    int rc;

    if (!r->is_owner) {
        reply_err(r->iq, "auth", "forbidden", NULL, NULL);
        return;
    }
    if (!valid_node(node)) {
        /* instant nodes make no sense in PEP (XEP-0163 has none) */
        reply_err(r->iq, "modify", "not-acceptable", "nodeid-required", NULL);
        return;
    }
    if (x && form_read(r->p, x, NS_NODE_CONFIG, &f) != 0) {
        reply_err(r->iq, "modify", "not-acceptable", NULL, NULL);
        return;
    }
    conf_default(&c);
    form_apply(&f, &c);
    if (xd_txn_begin(&txn) != 0) {
        storage_error(r);
        return;
    }
    rc = conf_load(r->p, txn, r->owner, node, &(node_conf){0});
    if (rc == 0) {
        xd_txn_abort(txn);
        reply_err(r->iq, "cancel", "conflict", NULL, NULL);
        return;
    }
    if (rc < 0 || (rc = node_create(r, txn, node, &c)) < 0) {
        xd_txn_abort(txn);
        storage_error(r);
        return;
    }
    if (rc == 1) {
        xd_txn_abort(txn);
        reply_err(r->iq, "cancel", "policy-violation", NULL, NULL);
        return;
    }
    if (xd_txn_commit(txn) != 0) {
        storage_error(r);
        return;
    }
    reply_pubsub(r, NS_PUBSUB, NULL);
}

/* XEP-0060 8.2: configure get (form) and set (submit / cancel). */
static void
do_configure(req *r, xmpp_stanza_t *cfg, int set)
{
    const char *node = xmpp_stanza_get_attribute(cfg, "node");
    xmpp_stanza_t *x;
    form_in f = {0};
    node_conf c;
    xd_txn *txn;
    const char *xt;

    if (!r->is_owner) {
        reply_err(r->iq, "auth", "forbidden", NULL, NULL);
        return;
    }
    if (node_or_error(r, node, &c) != 0)
        return;
    if (!set) {
        xmpp_stanza_t *out = xd_stanza_new("configure", NULL);
        xmpp_stanza_set_attribute(out, "node", node);
        xmpp_stanza_add_child_ex(out, conf_form(&c), 0);
        reply_pubsub(r, NS_PUBSUB_OWNER, out);
        return;
    }
    x = find_form(cfg);
    xt = x ? xmpp_stanza_get_type(x) : NULL;
    if (!x || (xt && strcmp(xt, "submit") && strcmp(xt, "cancel"))) {
        reply_err(r->iq, "modify", "bad-request", NULL, NULL);
        return;
    }
    if (xt && !strcmp(xt, "cancel")) {
        reply_pubsub(r, NS_PUBSUB_OWNER, NULL);
        return;
    }
    if (form_read(r->p, x, NS_NODE_CONFIG, &f) != 0) {
        reply_err(r->iq, "modify", "not-acceptable", NULL, NULL);
        return;
    }
    if (xd_txn_begin(&txn) != 0) {
        storage_error(r);
        return;
    }
    if (conf_load(r->p, txn, r->owner, node, &c) != 0) {
        xd_txn_abort(txn);
        storage_error(r);
        return;
    }
    form_apply(&f, &c);
    if (conf_store(r->p, txn, r->owner, node, &c) != 0 ||
        items_trim(r->p, txn, r->owner, node, c.persist ? effective_max(r->p, &c) : 0) != 0 ||
        xd_txn_commit(txn) != 0) {
        xd_txn_abort(txn);
        storage_error(r);
        return;
    }
    reply_pubsub(r, NS_PUBSUB_OWNER, NULL);
}

/* XEP-0060 8.4 delete and 8.5 purge. */
static void
do_delete(req *r, xmpp_stanza_t *el, int purge)
{
    const char *node = xmpp_stanza_get_attribute(el, "node");
    node_conf c;
    xd_txn *txn;
    char key[KEY_MAX];
    size_t klen;
    xmpp_stanza_t *ev;

    if (!r->is_owner) {
        reply_err(r->iq, "auth", "forbidden", NULL, NULL);
        return;
    }
    if (node_or_error(r, node, &c) != 0)
        return;
    if (xd_txn_begin(&txn) != 0) {
        storage_error(r);
        return;
    }
    klen = node_key(key, sizeof(key), r->owner, node);
    if (items_trim(r->p, txn, r->owner, node, 0) != 0 ||
        (!purge && xd_db_del(r->p->nodes, txn, key, klen) != 0) || xd_txn_commit(txn) != 0) {
        xd_txn_abort(txn);
        storage_error(r);
        return;
    }
    reply_pubsub(r, NS_PUBSUB_OWNER, NULL);
    ev = xd_stanza_new(purge ? "purge" : "delete", NULL);
    xmpp_stanza_set_attribute(ev, "node", node);
    notify_all(r->p, r->owner, node, &c, ev);
    xmpp_stanza_release(ev);
}

/* The first element child of the <pubsub/> element. */
static xmpp_stanza_t *
first_tag(xmpp_stanza_t *st)
{
    xmpp_stanza_t *c = st ? xmpp_stanza_get_children(st) : NULL;
    while (c && !xmpp_stanza_is_tag(c))
        c = xmpp_stanza_get_next(c);
    return c;
}

static void
unsupported(req *r, const char *what)
{
    reply_err(r->iq, "cancel", "feature-not-implemented", "unsupported", what);
}

static int
iq_pubsub(xd_event *ev, void *data)
{
    req r;
    int set = !strcmp(xmpp_stanza_get_type(ev->stanza), "set");
    xmpp_stanza_t *ps = xmpp_stanza_get_child_by_name_and_ns(ev->stanza, "pubsub", NS_PUBSUB);
    xmpp_stanza_t *op;
    const char *name;

    if (req_init(&r, data, ev) != 0)
        return XD_HANDLED;
    if (!ps || !(op = first_tag(ps))) {
        reply_err(ev->stanza, "modify", "bad-request", NULL, NULL);
        return XD_HANDLED;
    }
    name = xmpp_stanza_get_name(op);
    /* <publish/> may come after <publish-options/>, <create/> before <configure/> */
    if (set && child_named(ps, "publish"))
        do_publish(&r, ps, child_named(ps, "publish"));
    else if (set && child_named(ps, "create"))
        do_create(&r, ps, child_named(ps, "create"));
    else if (set && !strcmp(name, "retract"))
        do_retract(&r, op);
    else if (!set && !strcmp(name, "items"))
        do_items(&r, op);
    else if (!strcmp(name, "subscribe") || !strcmp(name, "unsubscribe"))
        unsupported(&r, "subscribe");
    else if (!strcmp(name, "subscriptions"))
        unsupported(&r, "retrieve-subscriptions");
    else if (!strcmp(name, "affiliations"))
        unsupported(&r, "retrieve-affiliations");
    else if (!strcmp(name, "options"))
        unsupported(&r, "subscription-options");
    else
        reply_err(ev->stanza, "modify", "bad-request", NULL, NULL);
    return XD_HANDLED;
}

static int
iq_pubsub_owner(xd_event *ev, void *data)
{
    req r;
    int set = !strcmp(xmpp_stanza_get_type(ev->stanza), "set");
    xmpp_stanza_t *ps =
        xmpp_stanza_get_child_by_name_and_ns(ev->stanza, "pubsub", NS_PUBSUB_OWNER);
    xmpp_stanza_t *op;
    const char *name;

    if (req_init(&r, data, ev) != 0)
        return XD_HANDLED;
    if (!ps || !(op = first_tag(ps))) {
        reply_err(ev->stanza, "modify", "bad-request", NULL, NULL);
        return XD_HANDLED;
    }
    name = xmpp_stanza_get_name(op);
    if (!strcmp(name, "configure"))
        do_configure(&r, op, set);
    else if (set && !strcmp(name, "delete"))
        do_delete(&r, op, 0);
    else if (set && !strcmp(name, "purge"))
        do_delete(&r, op, 1);
    else if (!set && !strcmp(name, "default")) {
        node_conf c;
        xmpp_stanza_t *out = xd_stanza_new("default", NULL);
        conf_default(&c);
        xmpp_stanza_add_child_ex(out, conf_form(&c), 0);
        reply_pubsub(&r, NS_PUBSUB_OWNER, out);
    } else if (!strcmp(name, "subscriptions") || !strcmp(name, "affiliations"))
        unsupported(&r, !strcmp(name, "affiliations") ? "modify-affiliations"
                                                       : "manage-subscriptions");
    else
        reply_err(ev->stanza, "modify", "bad-request", NULL, NULL);
    return XD_HANDLED;
}

/* ---- the module ------------------------------------------------------------------------- */

static const xd_setting pep_settings[] = {
    {"max_items_limit", XD_SETTING_INT}, /* what max_items = "max" means, and the ceiling */
    {"max_nodes", XD_SETTING_INT},       /* nodes per account */
    {"max_item_size", XD_SETTING_INT},   /* bytes of one item's payload */
    {NULL, 0},
};

static const char *const pep_features[] = {
    NS_PUBSUB "#publish",       NS_PUBSUB "#publish-options", NS_PUBSUB "#auto-create",
    NS_PUBSUB "#persistent-items", NS_PUBSUB "#retrieve-items", NS_PUBSUB "#access-open",
    NS_PUBSUB "#access-presence", NS_PUBSUB "#access-roster", NS_PUBSUB "#access-whitelist",
    NS_PUBSUB "#delete-nodes",  NS_PUBSUB "#purge-nodes",
    NS_PUBSUB "#config-node",   NS_PUBSUB "#retract-items",   NS_PUBSUB "#create-nodes",
    NS_PUBSUB "#create-and-configure", NS_PUBSUB "#filtered-notifications",
    NS_PUBSUB "#last-published", NS_PUBSUB "#item-ids",
};

static int
pep_load(xd_module *m)
{
    pep_mod *p;
    long long limit = xd_config_int(m, "max_items_limit", 256);
    long long nodes = xd_config_int(m, "max_nodes", 256);
    long long size = xd_config_int(m, "max_item_size", 262144);
    int r = 0;

    if (limit < 1 || limit > 100000) {
        xd_config_error(m, "max_items_limit", "must be from 1 to 100000");
        return -1;
    }
    if (nodes < 1 || nodes > 100000) {
        xd_config_error(m, "max_nodes", "must be from 1 to 100000");
        return -1;
    }
    if (size < 1024 || size > 64LL * 1024 * 1024) {
        xd_config_error(m, "max_item_size", "must be from 1024 to 67108864 bytes");
        return -1;
    }
    if (!(p = calloc(1, sizeof(*p))))
        return -1;
    p->m = m;
    p->max_items_limit = limit;
    p->max_nodes = nodes;
    p->max_item_size = size;
    xd_module_set_data(m, p);
    p->nodes = xd_db_open("pep_nodes");
    p->items = p->nodes ? xd_db_open("pep_items") : NULL;
    if (!p->nodes || !p->items) {
        /* xmppd --check-config: no store, nothing to serve */
        xd_debug("pep: storage not open; module inactive");
        return 0;
    }
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "get", NS_PUBSUB, iq_pubsub, p);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "set", NS_PUBSUB, iq_pubsub, p);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "get", NS_PUBSUB_OWNER, iq_pubsub_owner, p);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "set", NS_PUBSUB_OWNER, iq_pubsub_owner, p);
    r |= xd_hook(m, XD_HOOK_ROUTE, pep_route, p, XD_PRIO_DEFAULT);
    /* after mod_blocking (HIGH) has dropped what the user blocked */
    r |= xd_hook(m, XD_HOOK_DELIVER_LOCAL, pep_deliver_local, p, XD_PRIO_LOW + 100);
    r |= xd_hook(m, XD_HOOK_PRESENCE_OUT, pep_presence_out, p, XD_PRIO_LOW);
    r |= xd_hook(m, XD_HOOK_SESSION_END, pep_session_end, p, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_ACCOUNT_REMOVED, pep_account_removed, p, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_ROSTER_CHANGED, pep_roster_changed, p, XD_PRIO_DEFAULT);
    r |= xd_disco_add_account_identity(m, "pubsub", "pep", NULL); /* XEP-0163 6.1 */
    r |= xd_disco_add_account_feature(m, NS_PUBSUB);
    for (size_t i = 0; i < sizeof(pep_features) / sizeof(pep_features[0]); i++)
        r |= xd_disco_add_account_feature(m, pep_features[i]);
    return r ? -1 : 0;
}

static void
pep_unload(xd_module *m)
{
    pep_mod *p = xd_module_get_data(m);
    if (!p)
        return;
    xd_timer_stop(p->sweep); /* not fired yet, if set */
    for (size_t i = 0; i < p->nw; i++)
        watcher_free(p->w[i]);
    free(p->w);
    for (size_t i = 0; i < p->ncaps; i++) {
        free(p->caps[i].ver);
        free_strv(p->caps[i].notify, p->caps[i].nnotify);
    }
    free(p);
}

XD_MODULE(pep) = {
    .abi = XD_MODULE_ABI,
    .name = "pep",
    .settings = pep_settings,
    .load = pep_load,
    .unload = pep_unload,
};
