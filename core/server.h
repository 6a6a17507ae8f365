/* Private to the core: the one server object and the pieces it is made of. */
#ifndef XD_CORE_SERVER_H
#define XD_CORE_SERVER_H

#include <ev.h>
#include <expat.h>
#include <gnutls/gnutls.h>
#include <libconfig.h>

#include <xmppd/module.h>

#include "hashtab.h"

#define XD_MAX_MODULES 64

typedef struct xd_host {
    char *domain; /* prepared (A-label, lowercase) */
    char *cert;
    char *key;
    int line;
} xd_host;

typedef enum xd_tls_mode { XD_TLS_STARTTLS = 0, XD_TLS_DIRECT = 1 } xd_tls_mode;

typedef struct xd_listener {
    xd_stream_type type;
    xd_tls_mode tls;
    char *address;
    int port;
    int line;
    int fd;
    char name[80]; /* "address:port", for modules and logs */
    ev_io io;
    ev_timer retry; /* accept paused after running out of descriptors */
} xd_listener;

/* Certificates for every host, reference counted so SIGHUP can swap them
 * while streams opened under the old ones finish. */
typedef struct xd_tls_creds {
    gnutls_certificate_credentials_t cred;    /* server side: every host, SNI picks */
    gnutls_certificate_credentials_t *client; /* outgoing s2s: one per host */
    int nclient;
    int refs;
} xd_tls_creds;

typedef struct xd_config {
    char *path;
    config_t cfg;
    int log_level;
    int log_syslog;
    char *data_dir;
    char *module_dir;
    char *tls_priority;
    xd_host *hosts;
    int nhosts;
    xd_listener *listeners;
    int nlisteners;
    config_setting_t *modules; /* the `modules` list */
    size_t max_stanza[2];      /* per stream type */
    double handshake_timeout;  /* seconds to finish TLS + auth */
} xd_config;

typedef struct xd_hook_entry {
    xd_module *owner;
    xd_hook_fn fn;
    void *data;
    int priority;
} xd_hook_entry;

typedef struct xd_hook_list {
    xd_hook_entry *v;
    int n, cap;
} xd_hook_list;

#define XD_MAX_COUNTERS 32
typedef struct xd_counter {
    const char *name;
    unsigned long long value;
} xd_counter;

struct xd_module {
    const xd_module_desc *desc;
    void *dl;
    int index;                  /* slot for per-session data */
    config_setting_t *group;    /* its settings group, or NULL */
    int list_line;              /* line of its entry in `modules` */
    void *data;
    xd_counter counters[XD_MAX_COUNTERS]; /* xd_count() */
    int ncounters;
};

typedef struct xd_server {
    struct ev_loop *loop;
    xd_config conf;
    xd_tls_creds *creds;
    gnutls_priority_t priority;
    xmpp_ctx_t *ctx;
    xd_module *modules[XD_MAX_MODULES];
    int nmodules;
    xd_hook_list hooks[XD_HOOK_COUNT];
    xd_hashtab *iq_handlers;    /* "scope type ns" -> handler */
    xd_hashtab *elements[2];    /* per stream type: ns -> handler */
    xd_hashtab *full_jids;      /* full JID -> xd_session */
    xd_hashtab *bare_jids;      /* bare JID -> first xd_session of a chain */
    struct xd_session *sessions; /* every open stream, for shutdown */
    unsigned nsessions;
    int stopping;
    char *ca_file;   /* trust for peer certificates; NULL: the system store */
    int trust;       /* a module asked for peer verification */
} xd_server;

extern xd_server xd_srv; /* the one server object */

/* config.c */
int xd_config_load(xd_config *c, const char *path);
int xd_config_check_modules(xd_config *c); /* settings of the loaded modules */
void xd_config_free(xd_config *c);
const xd_host *xd_config_host(const char *domain);
int xd_config_entry_line(const xd_config *c, const config_setting_t *e);

/* log.c */
void xd_log_setup(int level, int use_syslog);

/* services.c */
int xd_iq_pending_reply(const xd_event *ev); /* 1: it answered an xd_iq_send() */
int xd_adhoc_dispatch(xd_event *ev);         /* XEP-0050 IQs to a served domain */
typedef void (*xd_stat_fn)(const char *name, const char *counter, unsigned long long value,
                           void *data);
void xd_stats_foreach(xd_stat_fn fn, void *data); /* the core's counters, then each module's */
void xd_stats_log(void);
void xd_services_forget(xd_module *m);
void xd_services_free(void);

/* module.c */
int xd_modules_load(void);
void xd_modules_unload(void);
int xd_hooks_run_after(xd_hook_id id, const xd_module *m, xd_event *ev);
int xd_iq_dispatch(xd_iq_scope scope, xd_event *ev);
int xd_element_dispatch(xd_session *s, xmpp_stanza_t *el);
void xd_features_fill(xd_session *s, xmpp_stanza_t *features);

/* tls.c */
xd_tls_creds *xd_tls_creds_load(void);
void xd_tls_creds_release(xd_tls_creds *c);
int xd_tls_init(void);
void xd_tls_reload(void);

/* net.c: listeners and connections */
int xd_listeners_open(void);
void xd_listeners_close(void);

/* session.c */
void xd_sessions_shutdown(void);
int xd_tls_host_index(const char *domain);
void xd_session_destroy(xd_session *s);

/* router.c */
int xd_router_init(void);
void xd_router_free(void);
void xd_router_bind(xd_session *s);
void xd_router_unbind(xd_session *s);
void xd_router_replace(xd_session *old, xd_session *s);
xd_session *xd_router_find_full(const char *full);
void xd_route_from(xd_session *s, xmpp_stanza_t *st);

#endif
