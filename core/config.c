/*
 * The libconfig file: server-wide settings, hosts, listeners, the module
 * list, and one group per module.  Every mistake is reported as file:line
 * and stops the start-up; nothing is silently ignored.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "server.h"

#ifndef XD_MODULE_DIR
#define XD_MODULE_DIR "/usr/local/lib/xmppd/modules"
#endif

#define DEFAULT_PRIORITY                                                                      \
    "SECURE256:+SECURE128:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2:-CIPHER-ALL:+CHACHA20-POLY1305:" \
    "+AES-256-GCM:+AES-128-GCM:-MAC-ALL:+AEAD:-KX-ALL:+ECDHE-ECDSA:+ECDHE-RSA:-GROUP-ALL:"     \
    "+GROUP-X25519:+GROUP-SECP256R1:+GROUP-SECP384R1:%SERVER_PRECEDENCE"

/* The one server object: everything mutable the core owns hangs off it. */
xd_server xd_srv;

static const char *const top_keys[] = {"log_level", "log_syslog", "data_dir", "module_dir",
                                       "tls_priority", "hosts", "listeners", "modules", NULL};

static void
conf_error(const xd_config *c, const config_setting_t *st, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s:%d: ", c->path, st ? (int)config_setting_source_line(st) : 0);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/*
 * libconfig gives a scalar inside a list the line of the token after it, so
 * the last entry of a list written one per line is reported a line late.
 * Find the line that really holds the quoted value: the last one at or
 * before the reported line.
 */
int
xd_config_entry_line(const xd_config *c, const config_setting_t *e)
{
    int reported = (int)config_setting_source_line(e), best = reported, line = 1;
    const char *val = config_setting_get_string(e);
    char needle[300], buf[4096];
    FILE *f;

    if (!val || snprintf(needle, sizeof(needle), "\"%s\"", val) >= (int)sizeof(needle) ||
        !(f = fopen(c->path, "r")))
        return reported;
    while (line <= reported && fgets(buf, sizeof(buf), f)) {
        if (strstr(buf, needle))
            best = line;
        if (strchr(buf, '\n'))
            line++;
    }
    fclose(f);
    return best;
}

static void
entry_error(const xd_config *c, const config_setting_t *e, const char *fmt, const char *arg)
{
    fprintf(stderr, "%s:%d: ", c->path, xd_config_entry_line(c, e));
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
}

static int
in_list(const char *const *list, const char *name)
{
    for (; *list; list++)
        if (strcmp(*list, name) == 0)
            return 1;
    return 0;
}

/* Only the listed keys may appear in a group. */
static int
check_keys(const xd_config *c, config_setting_t *g, const char *const *keys, const char *what)
{
    int n = config_setting_length(g);
    for (int i = 0; i < n; i++) {
        config_setting_t *e = config_setting_get_elem(g, i);
        if (!in_list(keys, config_setting_name(e))) {
            conf_error(c, e, "unknown key '%s' in %s", config_setting_name(e), what);
            return -1;
        }
    }
    return 0;
}

static int
get_string(const xd_config *c, config_setting_t *g, const char *key, int required, char **out)
{
    config_setting_t *st = config_setting_get_member(g, key);
    if (!st) {
        if (required) {
            conf_error(c, g, "missing '%s'", key);
            return -1;
        }
        return 0;
    }
    if (config_setting_type(st) != CONFIG_TYPE_STRING) {
        conf_error(c, st, "'%s' must be a string", key);
        return -1;
    }
    free(*out);
    *out = strdup(config_setting_get_string(st));
    return *out ? 0 : -1;
}

static int
load_hosts(xd_config *c)
{
    static const char *const keys[] = {"domain", "cert", "key", NULL};
    config_setting_t *list = config_lookup(&c->cfg, "hosts");
    char dom[XD_JID_PART_MAX + 1];

    if (!list || !config_setting_is_list(list) || config_setting_length(list) == 0) {
        conf_error(c, list, "'hosts' must be a non-empty list of groups");
        return -1;
    }
    c->nhosts = config_setting_length(list);
    c->hosts = calloc(c->nhosts, sizeof(*c->hosts));
    if (!c->hosts)
        return -1;
    for (int i = 0; i < c->nhosts; i++) {
        config_setting_t *g = config_setting_get_elem(list, i);
        xd_host *h = &c->hosts[i];
        char *raw = NULL;
        if (!config_setting_is_group(g)) {
            conf_error(c, g, "each host must be a group { domain = ...; cert = ...; key = ...; }");
            return -1;
        }
        h->line = config_setting_source_line(g);
        if (check_keys(c, g, keys, "host") || get_string(c, g, "domain", 1, &raw) ||
            get_string(c, g, "cert", 1, &h->cert) || get_string(c, g, "key", 1, &h->key)) {
            free(raw);
            return -1;
        }
        if (xd_jid_prep_domain(dom, sizeof(dom), raw) != 0) {
            conf_error(c, g, "invalid domain '%s'", raw);
            free(raw);
            return -1;
        }
        free(raw);
        for (int j = 0; j < i; j++)
            if (strcmp(c->hosts[j].domain, dom) == 0) {
                conf_error(c, g, "host '%s' is listed twice", dom);
                return -1;
            }
        h->domain = strdup(dom);
        if (!h->domain)
            return -1;
    }
    return 0;
}

static int
load_listeners(xd_config *c)
{
    static const char *const keys[] = {"stream", "address", "port", "tls", NULL};
    config_setting_t *list = config_lookup(&c->cfg, "listeners");

    if (!list || !config_setting_is_list(list) || config_setting_length(list) == 0) {
        conf_error(c, list, "'listeners' must be a non-empty list of groups");
        return -1;
    }
    c->nlisteners = config_setting_length(list);
    c->listeners = calloc(c->nlisteners, sizeof(*c->listeners));
    if (!c->listeners)
        return -1;
    for (int i = 0; i < c->nlisteners; i++) {
        config_setting_t *g = config_setting_get_elem(list, i);
        xd_listener *l = &c->listeners[i];
        char *stream = NULL, *tls = NULL;
        int port = 0, bad = 0;

        l->fd = -1;
        if (!config_setting_is_group(g)) {
            conf_error(c, g, "each listener must be a group");
            return -1;
        }
        l->line = config_setting_source_line(g);
        if (check_keys(c, g, keys, "listener") || get_string(c, g, "stream", 1, &stream) ||
            get_string(c, g, "address", 1, &l->address) || get_string(c, g, "tls", 0, &tls)) {
            free(stream);
            free(tls);
            return -1;
        }
        if (strcmp(stream, "c2s") == 0)
            l->type = XD_STREAM_C2S;
        else if (strcmp(stream, "s2s") == 0)
            l->type = XD_STREAM_S2S;
        else {
            conf_error(c, g, "stream must be \"c2s\" or \"s2s\", not '%s'", stream);
            bad = 1;
        }
        if (!tls || strcmp(tls, "starttls") == 0)
            l->tls = XD_TLS_STARTTLS;
        else if (strcmp(tls, "direct") == 0)
            l->tls = XD_TLS_DIRECT;
        else if (!bad) {
            conf_error(c, g, "tls must be \"starttls\" or \"direct\", not '%s'", tls);
            bad = 1;
        }
        free(stream);
        free(tls);
        if (bad)
            return -1;
        if (!config_setting_lookup_int(g, "port", &port) || port < 1 || port > 65535) {
            conf_error(c, g, "port must be an integer from 1 to 65535");
            return -1;
        }
        l->port = port;
    }
    return 0;
}

static int
load_modules_list(xd_config *c)
{
    c->modules = config_lookup(&c->cfg, "modules");
    if (!c->modules)
        return 0;
    if (!config_setting_is_aggregate(c->modules) || config_setting_is_group(c->modules)) {
        conf_error(c, c->modules, "'modules' must be a list of names: ( \"c2s\", ... )");
        return -1;
    }
    for (int i = 0; i < config_setting_length(c->modules); i++) {
        config_setting_t *e = config_setting_get_elem(c->modules, i);
        const char *name = config_setting_get_string(e);
        if (!name || !*name || strspn(name, "abcdefghijklmnopqrstuvwxyz0123456789_") != strlen(name)) {
            entry_error(c, e, "module names are lowercase letters, digits and '_'%s", "");
            return -1;
        }
        for (int j = 0; j < i; j++)
            if (strcmp(config_setting_get_string_elem(c->modules, j), name) == 0) {
                entry_error(c, e, "module '%s' is listed twice", name);
                return -1;
            }
    }
    return 0;
}

static int
module_listed(const xd_config *c, const char *name)
{
    if (!c->modules)
        return 0;
    for (int i = 0; i < config_setting_length(c->modules); i++)
        if (strcmp(config_setting_get_string_elem(c->modules, i), name) == 0)
            return 1;
    return 0;
}

static int
load_log_level(xd_config *c)
{
    static const char *const names[] = {"error", "warn", "info", "debug", NULL};
    const char *lvl = NULL;
    int b = 0;

    c->log_level = XD_LOG_INFO;
    if (config_lookup(&c->cfg, "log_level") && !config_lookup_string(&c->cfg, "log_level", &lvl)) {
        conf_error(c, config_lookup(&c->cfg, "log_level"),
                   "log_level must be a string: \"error\", \"warn\", \"info\" or \"debug\"");
        return -1;
    }
    if (lvl) {
        for (c->log_level = 0; names[c->log_level]; c->log_level++)
            if (strcasecmp(names[c->log_level], lvl) == 0)
                break;
        if (!names[c->log_level]) {
            conf_error(c, config_lookup(&c->cfg, "log_level"),
                       "log_level must be error, warn, info or debug");
            return -1;
        }
    }
    if (config_lookup(&c->cfg, "log_syslog") && !config_lookup_bool(&c->cfg, "log_syslog", &b)) {
        conf_error(c, config_lookup(&c->cfg, "log_syslog"), "log_syslog must be true or false");
        return -1;
    }
    c->log_syslog = b;
    return 0;
}

int
xd_config_load(xd_config *c, const char *path)
{
    config_setting_t *root;

    memset(c, 0, sizeof(*c));
    c->path = strdup(path);
    c->max_stanza[XD_STREAM_C2S] = c->max_stanza[XD_STREAM_S2S] = 262144;
    c->handshake_timeout = 30;
    config_init(&c->cfg);
    if (!config_read_file(&c->cfg, path)) {
        if (config_error_type(&c->cfg) == CONFIG_ERR_FILE_IO)
            fprintf(stderr, "%s: cannot read the file\n", path);
        else
            fprintf(stderr, "%s:%d: %s\n", config_error_file(&c->cfg) ? config_error_file(&c->cfg) : path,
                    config_error_line(&c->cfg), config_error_text(&c->cfg));
        return -1;
    }
    root = config_root_setting(&c->cfg);
    if (load_modules_list(c))
        return -1;
    for (int i = 0; i < config_setting_length(root); i++) {
        config_setting_t *e = config_setting_get_elem(root, i);
        const char *name = config_setting_name(e);
        if (in_list(top_keys, name))
            continue;
        if (config_setting_is_group(e) && module_listed(c, name))
            continue;
        if (config_setting_is_group(e))
            conf_error(c, e, "settings group '%s' names no module in the 'modules' list", name);
        else
            conf_error(c, e, "unknown setting '%s'", name);
        return -1;
    }
    if (load_log_level(c) || get_string(c, root, "data_dir", 1, &c->data_dir) ||
        get_string(c, root, "module_dir", 0, &c->module_dir) ||
        get_string(c, root, "tls_priority", 0, &c->tls_priority))
        return -1;
    if (!c->module_dir && !(c->module_dir = strdup(XD_MODULE_DIR)))
        return -1;
    if (!c->tls_priority && !(c->tls_priority = strdup(DEFAULT_PRIORITY)))
        return -1;
    if (load_hosts(c) || load_listeners(c))
        return -1;
    return 0;
}

static int
setting_matches(const config_setting_t *st, xd_setting_type t)
{
    int ct = config_setting_type(st);
    switch (t) {
    case XD_SETTING_INT:
        return ct == CONFIG_TYPE_INT || ct == CONFIG_TYPE_INT64;
    case XD_SETTING_BOOL:
        return ct == CONFIG_TYPE_BOOL;
    case XD_SETTING_STRING:
        return ct == CONFIG_TYPE_STRING;
    case XD_SETTING_STRING_LIST:
        if (!config_setting_is_array(st) && !config_setting_is_list(st))
            return 0;
        for (int i = 0; i < config_setting_length(st); i++)
            if (config_setting_type(config_setting_get_elem(st, i)) != CONFIG_TYPE_STRING)
                return 0;
        return 1;
    }
    return 0;
}

static const char *const type_names[] = {"", "an integer", "true or false", "a string",
                                         "a list of strings"};

/* Each key in a module's group must be one the module declared, with its type. */
int
xd_config_check_modules(xd_config *c)
{
    for (int i = 0; i < xd_srv.nmodules; i++) {
        xd_module *m = xd_srv.modules[i];
        config_setting_t *g = config_lookup(&c->cfg, m->desc->name);
        m->group = g;
        if (!g)
            continue;
        for (int k = 0; k < config_setting_length(g); k++) {
            config_setting_t *e = config_setting_get_elem(g, k);
            const xd_setting *d = m->desc->settings;
            for (; d && d->name; d++)
                if (strcmp(d->name, config_setting_name(e)) == 0)
                    break;
            if (!d || !d->name) {
                conf_error(c, e, "module '%s' has no setting '%s'", m->desc->name,
                           config_setting_name(e));
                return -1;
            }
            if (!setting_matches(e, d->type)) {
                conf_error(c, e, "%s.%s must be %s", m->desc->name, d->name, type_names[d->type]);
                return -1;
            }
        }
    }
    return 0;
}

void
xd_config_free(xd_config *c)
{
    for (int i = 0; i < c->nhosts; i++) {
        free(c->hosts[i].domain);
        free(c->hosts[i].cert);
        free(c->hosts[i].key);
    }
    for (int i = 0; i < c->nlisteners; i++)
        free(c->listeners[i].address);
    free(c->hosts);
    free(c->listeners);
    free(c->data_dir);
    free(c->module_dir);
    free(c->tls_priority);
    free(c->path);
    config_destroy(&c->cfg);
    memset(c, 0, sizeof(*c));
}

const xd_host *
xd_config_host(const char *domain)
{
    for (int i = 0; i < xd_srv.conf.nhosts; i++)
        if (strcmp(xd_srv.conf.hosts[i].domain, domain) == 0)
            return &xd_srv.conf.hosts[i];
    return NULL;
}

int
xd_is_local_host(const char *domain)
{
    return xd_config_host(domain) != NULL;
}

int
xd_host_count(void)
{
    return xd_srv.conf.nhosts;
}

const char *
xd_host_name(int i)
{
    return i >= 0 && i < xd_srv.conf.nhosts ? xd_srv.conf.hosts[i].domain : NULL;
}

/* ---- module settings ---------------------------------------------------- */

static config_setting_t *
module_setting(const xd_module *m, const char *name)
{
    return m->group ? config_setting_get_member(m->group, name) : NULL;
}

long long
xd_config_int(const xd_module *m, const char *name, long long def)
{
    config_setting_t *st = module_setting(m, name);
    return st ? config_setting_get_int64(st) : def;
}

int
xd_config_bool(const xd_module *m, const char *name, int def)
{
    config_setting_t *st = module_setting(m, name);
    return st ? config_setting_get_bool(st) : def;
}

const char *
xd_config_string(const xd_module *m, const char *name, const char *def)
{
    config_setting_t *st = module_setting(m, name);
    return st ? config_setting_get_string(st) : def;
}

int
xd_config_list_count(const xd_module *m, const char *name)
{
    config_setting_t *st = module_setting(m, name);
    return st ? config_setting_length(st) : 0;
}

const char *
xd_config_list_item(const xd_module *m, const char *name, int i)
{
    config_setting_t *st = module_setting(m, name);
    return st ? config_setting_get_string_elem(st, i) : NULL;
}

void
xd_config_error(const xd_module *m, const char *name, const char *fmt, ...)
{
    config_setting_t *st = module_setting(m, name);
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s:%d: %s.%s: %s\n", xd_srv.conf.path,
            st ? (int)config_setting_source_line(st) : m->list_line, m->desc->name, name, msg);
}
