/*
 * Module loading (dlopen in the config's order) and the registries modules
 * fill: hooks with priorities, IQ handlers by type and namespace, stream
 * features, stream-level element handlers, disco features and identities.
 */
#include <dlfcn.h>
#include <gnutls/crypto.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server.h"

typedef struct iq_entry {
    char key[512];
    xd_module *owner;
    xd_iq_fn fn;
    void *data;
} iq_entry;

typedef struct element_entry {
    char *ns;
    xd_module *owner;
    xd_element_fn fn;
    void *data;
    struct element_entry *next; /* another handler of the same namespace */
} element_entry;

typedef struct feature_entry {
    xd_module *owner;
    xd_stream_type type;
    xd_features_fn fn;
    void *data;
} feature_entry;

typedef struct disco_entry {
    xd_module *owner;
    char *a, *b, *c; /* feature: a only; identity: category, type, name */
    int account;     /* a feature of accounts, not of the server */
} disco_entry;

struct xd_timer {
    ev_timer w;
    xd_module *owner;
    xd_timer_fn fn;
    void *data;
};

/* Registries live as long as the server; they belong to the server object
 * but are private to this file. */
static struct {
    feature_entry features[XD_MAX_MODULES * 4];
    int nfeatures;
    disco_entry disco[XD_MAX_MODULES * 8];
    int ndisco;
    iq_entry *iqs[XD_MAX_MODULES * 16];
    int niqs;
    element_entry elements[XD_MAX_MODULES * 4];
    int nelements;
    char caps_ver[64];
} reg;

/* ---- loading ------------------------------------------------------------ */

static int
load_one(const char *name, int line)
{
    char path[PATH_MAX], sym[128];
    const xd_module_desc *desc;
    xd_module *m;
    void *dl;

    if (xd_srv.nmodules >= XD_MAX_MODULES) {
        fprintf(stderr, "%s:%d: too many modules (at most %d)\n", xd_srv.conf.path, line,
                XD_MAX_MODULES);
        return -1;
    }
    snprintf(path, sizeof(path), "%s/mod_%s.so", xd_srv.conf.module_dir, name);
    dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!dl) {
        fprintf(stderr, "%s:%d: module '%s': cannot load %s: %s\n", xd_srv.conf.path, line, name,
                path, dlerror());
        return -1;
    }
    snprintf(sym, sizeof(sym), XD_MODULE_SYMBOL_PREFIX "%s", name);
    desc = dlsym(dl, sym);
    if (!desc) {
        fprintf(stderr, "%s:%d: module '%s': %s has no descriptor '%s'\n", xd_srv.conf.path, line,
                name, path, sym);
        dlclose(dl);
        return -1;
    }
    if (desc->abi != XD_MODULE_ABI) {
        fprintf(stderr, "%s:%d: module '%s' was built for module ABI %u, this server has ABI %u\n",
                xd_srv.conf.path, line, name, desc->abi, XD_MODULE_ABI);
        dlclose(dl);
        return -1;
    }
    if (!desc->name || strcmp(desc->name, name) != 0) {
        fprintf(stderr, "%s:%d: module '%s': descriptor names itself '%s'\n", xd_srv.conf.path,
                line, name, desc->name ? desc->name : "(null)");
        dlclose(dl);
        return -1;
    }
    m = calloc(1, sizeof(*m));
    if (!m) {
        dlclose(dl);
        return -1;
    }
    m->desc = desc;
    m->dl = dl;
    m->list_line = line;
    m->index = xd_srv.nmodules;
    xd_srv.modules[xd_srv.nmodules++] = m;
    return 0;
}

/* Load every listed module, check its settings, then call each load(). */
int
xd_modules_load(void)
{
    config_setting_t *list = xd_srv.conf.modules;
    int n = list ? config_setting_length(list) : 0;

    for (int i = 0; i < n; i++) {
        config_setting_t *e = config_setting_get_elem(list, i);
        if (load_one(config_setting_get_string(e), xd_config_entry_line(&xd_srv.conf, e)))
            return -1;
    }
    if (xd_config_check_modules(&xd_srv.conf))
        return -1;
    for (int i = 0; i < xd_srv.nmodules; i++) {
        xd_module *m = xd_srv.modules[i];
        if (m->desc->load && m->desc->load(m) != 0) {
            fprintf(stderr, "%s:%d: module '%s' refused to load (see above)\n", xd_srv.conf.path,
                    m->list_line, m->desc->name);
            return -1;
        }
        xd_debug("module '%s' loaded", m->desc->name);
    }
    return 0;
}

/* Forget what m registered, so modules unloaded after it (which may still
 * route a stanza or two) never call into its freed state. */
static void
forget_module(xd_module *m)
{
    xd_services_forget(m);
    for (int h = 0; h < XD_HOOK_COUNT; h++) {
        xd_hook_list *l = &xd_srv.hooks[h];
        int k = 0;
        for (int i = 0; i < l->n; i++)
            if (l->v[i].owner != m)
                l->v[k++] = l->v[i];
        l->n = k;
    }
    for (int i = 0; i < reg.niqs; i++)
        if (reg.iqs[i]->owner == m)
            xd_hashtab_del(xd_srv.iq_handlers, reg.iqs[i]->key);
    for (int i = 0; i < reg.nelements; i++)
        if (reg.elements[i].owner == m)
            reg.elements[i].fn = NULL;
    for (int i = 0; i < reg.nfeatures; i++)
        if (reg.features[i].owner == m)
            reg.features[i].fn = NULL;
}

void
xd_modules_unload(void)
{
    for (int i = xd_srv.nmodules - 1; i >= 0; i--) {
        xd_module *m = xd_srv.modules[i];
        if (m->desc->unload)
            m->desc->unload(m);
        forget_module(m);
    }
    for (int i = 0; i < XD_HOOK_COUNT; i++) {
        free(xd_srv.hooks[i].v);
        memset(&xd_srv.hooks[i], 0, sizeof(xd_srv.hooks[i]));
    }
    for (int i = 0; i < reg.niqs; i++)
        free(reg.iqs[i]);
    for (int i = 0; i < reg.nelements; i++)
        free(reg.elements[i].ns);
    for (int i = 0; i < reg.ndisco; i++) {
        free(reg.disco[i].a);
        free(reg.disco[i].b);
        free(reg.disco[i].c);
    }
    memset(&reg, 0, sizeof(reg));
    xd_services_free();
    for (int i = 0; i < xd_srv.nmodules; i++) {
        /* Leave the code mapped: stanzas and timers may still point at it
         * during the last moments of shutdown; the process exits next. */
        free(xd_srv.modules[i]);
    }
    xd_srv.nmodules = 0;
}

const char *
xd_module_name(const xd_module *m)
{
    return m->desc->name;
}

void *
xd_module_get_data(const xd_module *m)
{
    return m->data;
}

void
xd_module_set_data(xd_module *m, void *data)
{
    m->data = data;
}

/* ---- hooks -------------------------------------------------------------- */

int
xd_hook(xd_module *m, xd_hook_id id, xd_hook_fn fn, void *data, int priority)
{
    xd_hook_list *l;
    int i;

    if ((unsigned)id >= XD_HOOK_COUNT || !fn)
        return -1;
    l = &xd_srv.hooks[id];
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 8;
        xd_hook_entry *v = realloc(l->v, cap * sizeof(*v));
        if (!v)
            return -1;
        l->v = v;
        l->cap = cap;
    }
    /* Keep the list sorted by priority, highest first; equal priorities run
     * in registration (= module list) order. */
    for (i = l->n; i > 0 && l->v[i - 1].priority < priority; i--)
        l->v[i] = l->v[i - 1];
    l->v[i] = (xd_hook_entry){m, fn, data, priority};
    l->n++;
    return 0;
}

/* The handlers ranked after m's last one (a held stanza goes on from there). */
int
xd_hooks_run_after(xd_hook_id id, const xd_module *m, xd_event *ev)
{
    xd_hook_list *l = &xd_srv.hooks[id];
    int start = 0;
    for (int i = 0; i < l->n; i++)
        if (l->v[i].owner == m)
            start = i + 1;
    for (int i = start; i < l->n; i++) {
        int r = l->v[i].fn(ev, l->v[i].data);
        if (r != XD_PASS)
            return r;
    }
    return XD_PASS;
}

int
xd_hooks_run(xd_hook_id id, xd_event *ev)
{
    xd_hook_list *l = &xd_srv.hooks[id];
    for (int i = 0; i < l->n; i++) {
        int r = l->v[i].fn(ev, l->v[i].data);
        if (r != XD_PASS)
            return r;
    }
    return XD_PASS;
}

/* ---- IQ handlers ---------------------------------------------------------- */

static int
iq_key(char *buf, size_t len, xd_iq_scope scope, const char *type, const char *ns)
{
    int n = snprintf(buf, len, "%d %s %s", (int)scope, type, ns);
    return n < 0 || (size_t)n >= len ? -1 : 0;
}

int
xd_iq_register(xd_module *m, xd_iq_scope scope, const char *type, const char *ns, xd_iq_fn fn,
               void *data)
{
    iq_entry *e;
    if (reg.niqs >= (int)(sizeof(reg.iqs) / sizeof(reg.iqs[0])) || !fn || !type || !ns ||
        (strcmp(type, "get") && strcmp(type, "set")))
        return -1;
    if (!(e = calloc(1, sizeof(*e))))
        return -1;
    if (iq_key(e->key, sizeof(e->key), scope, type, ns) ||
        xd_hashtab_get(xd_srv.iq_handlers, e->key)) {
        xd_error("module '%s': an IQ handler for %s %s is already registered", m->desc->name,
                 type, ns);
        free(e);
        return -1;
    }
    e->owner = m;
    e->fn = fn;
    e->data = data;
    reg.iqs[reg.niqs++] = e;
    return xd_hashtab_put(xd_srv.iq_handlers, e->key, e);
}

/* Returns XD_PASS when no handler exists; the caller answers the error. */
int
xd_iq_dispatch(xd_iq_scope scope, xd_event *ev)
{
    xmpp_stanza_t *payload = xmpp_stanza_get_children(ev->stanza);
    const char *type = xmpp_stanza_get_type(ev->stanza);
    char key[512];
    iq_entry *e;

    while (payload && !xmpp_stanza_is_tag(payload))
        payload = xmpp_stanza_get_next(payload);
    if (!payload || !type || !xmpp_stanza_get_ns(payload))
        return XD_PASS;
    if (scope == XD_IQ_HOST && xd_adhoc_dispatch(ev) != XD_PASS)
        return XD_HANDLED;
    if (iq_key(key, sizeof(key), scope, type, xmpp_stanza_get_ns(payload)))
        return XD_PASS;
    e = xd_hashtab_get(xd_srv.iq_handlers, key);
    return e ? e->fn(ev, e->data) : XD_PASS;
}

/* ---- stream features and elements ---------------------------------------- */

int
xd_stream_features_add(xd_module *m, xd_stream_type type, xd_features_fn fn, void *data)
{
    if (reg.nfeatures >= (int)(sizeof(reg.features) / sizeof(reg.features[0])))
        return -1;
    reg.features[reg.nfeatures++] = (feature_entry){m, type, fn, data};
    return 0;
}

void
xd_features_fill(xd_session *s, xmpp_stanza_t *features)
{
    for (int i = 0; i < reg.nfeatures; i++)
        if (reg.features[i].fn && reg.features[i].type == xd_session_type(s))
            reg.features[i].fn(s, features, reg.features[i].data);
}

int
xd_stream_element_register(xd_module *m, xd_stream_type type, const char *ns, xd_element_fn fn,
                           void *data)
{
    element_entry *e;
    if (reg.nelements >= (int)(sizeof(reg.elements) / sizeof(reg.elements[0])))
        return -1;
    e = &reg.elements[reg.nelements];
    if (!(e->ns = strdup(ns)))
        return -1;
    e->owner = m;
    e->fn = fn;
    e->data = data;
    e->next = NULL;
    reg.nelements++;
    {
        /* Append: handlers are asked in module order. */
        element_entry *head = xd_hashtab_get(xd_srv.elements[type], e->ns);
        if (head) {
            while (head->next)
                head = head->next;
            head->next = e;
            return 0;
        }
    }
    return xd_hashtab_put(xd_srv.elements[type], e->ns, e);
}

/* XD_PASS when nobody handles the element. */
int
xd_element_dispatch(xd_session *s, xmpp_stanza_t *el)
{
    const char *ns = xmpp_stanza_get_ns(el);
    const char *name = xmpp_stanza_get_name(el);
    element_entry *e;

    if (!ns && name && strncmp(name, "stream:", 7) == 0)
        ns = "http://etherx.jabber.org/streams"; /* the parser keeps the stream: prefix */
    for (e = ns ? xd_hashtab_get(xd_srv.elements[xd_session_type(s)], ns) : NULL; e; e = e->next) {
        int r = e->fn ? e->fn(s, el, e->data) : XD_PASS;
        if (r != XD_PASS)
            return r;
    }
    return XD_PASS;
}

/* ---- disco ------------------------------------------------------------------ */

static int
disco_add(xd_module *m, int account, const char *a, const char *b, const char *c)
{
    disco_entry *e;
    for (int i = 0; i < reg.ndisco; i++)
        if (!b && !reg.disco[i].b && reg.disco[i].account == account &&
            strcmp(reg.disco[i].a, a) == 0)
            return 0; /* the same feature twice is harmless */
    if (reg.ndisco >= (int)(sizeof(reg.disco) / sizeof(reg.disco[0])))
        return -1;
    e = &reg.disco[reg.ndisco];
    e->owner = m;
    e->account = account;
    e->a = strdup(a);
    e->b = b ? strdup(b) : NULL;
    e->c = c ? strdup(c) : NULL;
    if (!e->a || (b && !e->b) || (c && !e->c))
        return -1;
    reg.ndisco++;
    reg.caps_ver[0] = '\0'; /* recomputed on demand */
    return 0;
}

int
xd_disco_add_feature(xd_module *m, const char *ns)
{
    return ns ? disco_add(m, 0, ns, NULL, NULL) : -1;
}

int
xd_disco_add_account_feature(xd_module *m, const char *ns)
{
    return ns ? disco_add(m, 1, ns, NULL, NULL) : -1;
}

int
xd_disco_add_identity(xd_module *m, const char *category, const char *type, const char *name)
{
    return category && type ? disco_add(m, 0, category, type, name) : -1;
}

int
xd_disco_add_account_identity(xd_module *m, const char *category, const char *type,
                              const char *name)
{
    return category && type ? disco_add(m, 1, category, type, name) : -1;
}

static void
add_identity(xmpp_stanza_t *query, const char *category, const char *type, const char *name)
{
    xmpp_stanza_t *el = xd_stanza_new("identity", NULL);
    if (!el)
        return;
    xmpp_stanza_set_attribute(el, "category", category);
    xmpp_stanza_set_attribute(el, "type", type);
    if (name)
        xmpp_stanza_set_attribute(el, "name", name);
    xmpp_stanza_add_child_ex(query, el, 0);
}

static void
fill(xmpp_stanza_t *query, int account)
{
    for (int i = 0; i < reg.ndisco; i++) {
        disco_entry *e = &reg.disco[i];
        if (e->b && e->account == account)
            add_identity(query, e->a, e->b, e->c);
    }
    if (account)
        add_identity(query, "account", "registered", NULL);
    for (int i = 0; i < reg.ndisco; i++) {
        disco_entry *e = &reg.disco[i];
        xmpp_stanza_t *el;
        if (e->b || e->account != account || !(el = xd_stanza_new("feature", NULL)))
            continue;
        xmpp_stanza_set_attribute(el, "var", e->a);
        xmpp_stanza_add_child_ex(query, el, 0);
    }
}

void
xd_disco_fill_info(xmpp_stanza_t *query)
{
    fill(query, 0);
}

void
xd_disco_fill_account_info(xmpp_stanza_t *query)
{
    fill(query, 1);
}

static int
cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* XEP-0115 5.1: identities "category/type/lang/name<" then features "var<",
 * each sorted, hashed with SHA-1, in base64. */
const char *
xd_disco_caps_ver(void)
{
    char *items[sizeof(reg.disco) / sizeof(reg.disco[0])];
    char *s = NULL, *b64;
    size_t len = 0, n = 0;
    unsigned char digest[20];
    FILE *f;

    if (reg.caps_ver[0])
        return reg.caps_ver;
    for (int pass = 0; pass < 2; pass++) {
        size_t first = n;
        for (int i = 0; i < reg.ndisco; i++) {
            disco_entry *e = &reg.disco[i];
            char *item = NULL;
            if (e->account || (pass == 0) != (e->b != NULL))
                continue;
            if (pass == 0 ? asprintf(&item, "%s/%s//%s<", e->a, e->b, e->c ? e->c : "") < 0
                          : asprintf(&item, "%s<", e->a) < 0)
                goto out;
            items[n++] = item;
        }
        qsort(items + first, n - first, sizeof(items[0]), cmp_str);
    }
    if (!(f = open_memstream(&s, &len)))
        goto out;
    for (size_t i = 0; i < n; i++)
        fputs(items[i], f);
    fclose(f);
    if (gnutls_hash_fast(GNUTLS_DIG_SHA1, s, len, digest) == 0 &&
        (b64 = xd_base64_encode(digest, sizeof(digest)))) {
        snprintf(reg.caps_ver, sizeof(reg.caps_ver), "%s", b64);
        free(b64);
    }
    free(s);
out:
    for (size_t i = 0; i < n; i++)
        free(items[i]);
    return reg.caps_ver;
}

/* ---- timers ------------------------------------------------------------------ */

static void
timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    xd_timer *t = (xd_timer *)w;
    (void)loop;
    (void)revents;
    if (!ev_is_active(w)) {
        /* one-shot: the timer is spent, the callback may not stop it again */
        xd_timer_fn fn = t->fn;
        void *data = t->data;
        free(t);
        fn(data);
        return;
    }
    t->fn(t->data);
}

xd_timer *
xd_timer_start(xd_module *m, double seconds, double repeat, xd_timer_fn fn, void *data)
{
    xd_timer *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->owner = m;
    t->fn = fn;
    t->data = data;
    ev_timer_init(&t->w, timer_cb, seconds, repeat);
    ev_timer_start(xd_srv.loop, &t->w);
    return t;
}

/* Only for repeating timers, or one-shot timers that have not fired yet. */
void
xd_timer_stop(xd_timer *t)
{
    if (!t)
        return;
    ev_timer_stop(xd_srv.loop, &t->w);
    free(t);
}

/* ---- file descriptors --------------------------------------------------------- */

struct xd_io {
    ev_io w;
    xd_module *owner;
    xd_io_fn fn;
    void *data;
};

static void
io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    xd_io *io = (xd_io *)w;
    (void)loop;
    io->fn(w->fd, (revents & EV_READ ? XD_IO_READ : 0) | (revents & EV_WRITE ? XD_IO_WRITE : 0),
           io->data);
}

static int
ev_events(int events)
{
    return (events & XD_IO_READ ? EV_READ : 0) | (events & XD_IO_WRITE ? EV_WRITE : 0);
}

xd_io *
xd_io_start(xd_module *m, int fd, int events, xd_io_fn fn, void *data)
{
    xd_io *io = calloc(1, sizeof(*io));
    if (!io)
        return NULL;
    io->owner = m;
    io->fn = fn;
    io->data = data;
    ev_io_init(&io->w, io_cb, fd, ev_events(events));
    if (events)
        ev_io_start(xd_srv.loop, &io->w);
    return io;
}

void
xd_io_set(xd_io *io, int events)
{
    ev_io_stop(xd_srv.loop, &io->w);
    ev_io_set(&io->w, io->w.fd, ev_events(events));
    if (events)
        ev_io_start(xd_srv.loop, &io->w);
}

void
xd_io_stop(xd_io *io)
{
    if (!io)
        return;
    ev_io_stop(xd_srv.loop, &io->w);
    free(io);
}

double
xd_now(void)
{
    return ev_now(xd_srv.loop);
}

double
xd_monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}
