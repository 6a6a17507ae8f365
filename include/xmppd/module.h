/*
 * xmppd public module API.
 *
 * This header (and the ones it includes) is the whole interface between the
 * server core and a module.  A module includes <xmppd/module.h> and nothing
 * else of ours, exports one descriptor with XD_MODULE(name), and is loaded
 * with dlopen() in the order the config's `modules` list gives.
 *
 * Ownership, one rule for the whole API: hooks and handlers borrow the
 * stanza they are given (the core frees it after the call chain); functions
 * that send or route a stanza take it (the caller must not touch it again).
 * Strings returned by getters are owned by the core and live as long as the
 * object they were read from.
 */
#ifndef XMPPD_MODULE_H
#define XMPPD_MODULE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <strophe.h>

#include <xmppd/hashtab.h>
#include <xmppd/jid.h>
#include <xmppd/log.h>
#include <xmppd/scram.h>
#include <xmppd/storage.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a public struct or signature changes incompatibly. */
#define XD_MODULE_ABI 2

/* What a hook or handler answers. */
enum {
    XD_PASS = 0,    /* not mine, or done with it: go on down the chain */
    XD_HANDLED = 1, /* taken care of (replied, stored, delivered): stop */
    XD_DROP = 2     /* discard silently: stop (the module logs why) */
};

/* Hook priorities: higher runs first. */
enum {
    XD_PRIO_FIRST = 1000,
    XD_PRIO_HIGH = 500,
    XD_PRIO_DEFAULT = 0,
    XD_PRIO_LOW = -500,
    XD_PRIO_LAST = -1000
};

typedef struct xd_module xd_module;   /* a loaded module (opaque) */
typedef struct xd_session xd_session; /* one XML stream (opaque) */

typedef enum xd_stream_type { XD_STREAM_C2S = 0, XD_STREAM_S2S = 1 } xd_stream_type;

/*
 * The hooks of the stanza pipeline, in the order a stanza meets them.
 * Each handler gets an xd_event; which fields are set depends on the hook.
 */
typedef enum xd_hook_id {
    XD_HOOK_CONNECT = 0,    /* new connection: session, addr. PASS or DROP (refuse) */
    XD_HOOK_STREAM_OPEN,    /* stream header received: session, to = requested host */
    XD_HOOK_C2S_STANZA,     /* stanza from an authenticated client stream, 'from' stamped */
    XD_HOOK_S2S_STANZA,     /* stanza from an authenticated server stream */
    XD_HOOK_S2S_AUTH,       /* peer domain authenticated: session, from = peer. DROP refuses */
    XD_HOOK_ROUTE,          /* before routing, any source: stanza, from, to */
    XD_HOOK_DELIVER_LOCAL,  /* to a local account (to.local set), also when no resource is online */
    XD_HOOK_DELIVER_REMOTE, /* to a domain that is not ours */
    XD_HOOK_SESSION_START,  /* a client resource was bound: session */
    XD_HOOK_SESSION_END,    /* a bound session is ending (still routable): session */
    XD_HOOK_STREAM_CLOSED,  /* any stream is gone (connect failed, closed, killed): session */
    XD_HOOK_PRESENCE_OUT,   /* a client's broadcast presence (no 'to') was recorded: session,
                               stanza, from; flags has XD_EVENT_INITIAL on its first available one */
    XD_HOOK_ACCOUNT_REMOVED, /* an account is being deleted (from = its bare JID); its records
                                keyed "bare JID\0..." in every table are purged right after */
    XD_HOOK_STANZA_OUT,     /* a routable stanza (message/presence/iq) is being sent to a bound
                               client session (also while it is detached): session, stanza.
                               HANDLED holds it (see xd_session_send_held), DROP discards it */
    XD_HOOK_AUTH_ATTEMPT,   /* a client starts a SASL attempt (run by mod_c2s): session, from =
                               the claimed account's bare JID when known. DROP refuses it
                               (<temporary-auth-failure/>) */
    XD_HOOK_REGISTER_ATTEMPT, /* in-band registration is about to create an account (run by
                               mod_register): session, from = the new bare JID. DROP refuses */
    XD_HOOK_ROSTER_CHANGED, /* a roster item changed (run by the roster module after its commit):
                               from = the user's bare JID, to = the contact's bare JID,
                               flags = the new XD_ROSTER_* relation (0: item removed),
                               plus XD_ROSTER_BY_USER when the user made the change */
    XD_HOOK_HOST_STANZA,    /* a message or presence addressed to a served domain itself (no
                               localpart), e.g. pubsub notifications for the server: stanza,
                               from, to. Unhandled messages bounce service-unavailable */
    XD_HOOK_RELOAD,         /* SIGHUP: re-read the files a module loaded (lists, patterns) */
    XD_HOOK_BLOCKLIST_CHANGED, /* a user's XEP-0191 block list changed (run by mod_blocking
                               after its commit): from = the user's bare JID, to = the JID
                               blocked or unblocked (NULL: unblock all), flags = 1 blocked */
    XD_HOOK_SESSION_RESUMED, /* a stream resumed a session (run by mod_smacks once <resumed/>
                               and the unacknowledged stanzas are written): session = the
                               new stream, which now carries the module data */
    XD_HOOK_COUNT
} xd_hook_id;

typedef struct xd_event {
    xd_session *session;    /* the stream it came from, or NULL (internal) */
    xmpp_stanza_t *stanza;  /* borrowed; NULL for connection/session hooks */
    const xd_jid *from;     /* prepared sender, when known */
    const xd_jid *to;       /* prepared recipient, when known */
    const struct sockaddr *addr; /* peer address for XD_HOOK_CONNECT */
    unsigned flags;         /* XD_EVENT_* */
} xd_event;

#define XD_EVENT_INITIAL 1u /* XD_HOOK_PRESENCE_OUT: the session's initial presence */
/* Routing hooks: a module routes again a stanza the server already handled
 * once (mod_smacks: the unacknowledged stanzas of a session that was not
 * resumed).  Archives, carbons and spam filters have seen it already. */
#define XD_EVENT_REROUTED 2u

typedef int (*xd_hook_fn)(xd_event *ev, void *data);

/* Register fn on a hook. 0 ok, -1 on error.  Undone when the module unloads. */
int xd_hook(xd_module *m, xd_hook_id hook, xd_hook_fn fn, void *data, int priority);
/* Run a hook's chain (modules run the hooks they own: AUTH_ATTEMPT, ...).
 * Returns the first answer that is not XD_PASS, or XD_PASS. */
int xd_hooks_run(xd_hook_id hook, xd_event *ev);

/*
 * IQ handlers, keyed by the IQ type ("get" or "set") and the namespace of
 * its payload.  XD_IQ_HOST handlers answer IQs addressed to a served domain;
 * XD_IQ_ACCOUNT handlers answer IQs addressed to a local bare JID (or sent
 * by a client without 'to', which RFC 6120 10.3.3 treats as its own account).
 * The handler must answer (result or error) and return XD_HANDLED; an IQ
 * that no handler takes gets <service-unavailable/>.
 */
typedef enum xd_iq_scope { XD_IQ_HOST = 1, XD_IQ_ACCOUNT = 2 } xd_iq_scope;
typedef int (*xd_iq_fn)(xd_event *ev, void *data);
int xd_iq_register(xd_module *m, xd_iq_scope scope, const char *type, const char *ns,
                   xd_iq_fn fn, void *data);

/*
 * Stream features and stream-level elements (nonzas: <auth/>, <enable/>...).
 * A feature function appends children to <stream:features> for the session's
 * current state.  Element handlers receive top-level elements of `ns` that
 * are not routable stanzas, and (under the stream's namespace, e.g.
 * "jabber:client") stanzas sent before the session is bound.  Several
 * handlers may share a namespace: each is asked in turn until one does not
 * answer XD_PASS.
 */
typedef void (*xd_features_fn)(xd_session *s, xmpp_stanza_t *features, void *data);
int xd_stream_features_add(xd_module *m, xd_stream_type type, xd_features_fn fn, void *data);
typedef int (*xd_element_fn)(xd_session *s, xmpp_stanza_t *el, void *data);
int xd_stream_element_register(xd_module *m, xd_stream_type type, const char *ns,
                               xd_element_fn fn, void *data);

/*
 * IQs the server itself sends (from a served domain) and whose answer it
 * wants: st gets an id if it has none, is routed (taken), and fn runs once
 * with the result or error that comes back from the addressee (borrowed), or
 * with NULL after `timeout` seconds (default 30 when <= 0).  Pending ones are
 * forgotten, without a call, when the module unloads.  0 ok, -1 (st freed).
 * fn may run before xd_iq_send() returns, when the answer is immediate (a
 * local addressee, or a bounce because the domain cannot be reached).
 */
typedef void (*xd_iq_reply_fn)(xmpp_stanza_t *reply, void *data);
int xd_iq_send(xd_module *m, xmpp_stanza_t *iq, double timeout, xd_iq_reply_fn fn, void *data);

/*
 * XEP-0050 ad-hoc commands offered by the server (to = a served domain):
 * listed in disco#items of node "http://jabber.org/protocol/commands" and
 * run by <iq type='set'><command node='...'/></iq>.  fn answers the IQ
 * (ev->from is the requester; check who may run it) and returns XD_HANDLED.
 */
#define XD_NS_COMMANDS "http://jabber.org/protocol/commands"
int xd_adhoc_register(xd_module *m, const char *node, const char *name, xd_iq_fn fn, void *data);

/* XEP-0030 features and identities the server advertises. */
int xd_disco_add_feature(xd_module *m, const char *ns);
int xd_disco_add_identity(xd_module *m, const char *category, const char *type, const char *name);
/* Features and identities of every local account's bare JID (PEP, blocking...);
 * account/registered is always there. */
int xd_disco_add_account_feature(xd_module *m, const char *ns);
int xd_disco_add_account_identity(xd_module *m, const char *category, const char *type,
                                  const char *name);
/* Fill a <query xmlns='http://jabber.org/protocol/disco#info'/> with the server's data. */
void xd_disco_fill_info(xmpp_stanza_t *query);
/* The same for an account (identity account/registered and account features). */
void xd_disco_fill_account_info(xmpp_stanza_t *query);
/* XEP-0115 verification string of the server's disco#info (SHA-1, base64). */
const char *xd_disco_caps_ver(void);

/* ---- sessions ------------------------------------------------------------ */

xd_stream_type xd_session_type(const xd_session *s);
int xd_session_is_tls(const xd_session *s);
int xd_session_is_authenticated(const xd_session *s);
int xd_session_is_bound(const xd_session *s);
const char *xd_session_host(const xd_session *s);   /* the served domain it talks to */
const xd_jid *xd_session_jid(const xd_session *s);  /* authenticated (and bound) JID */
const char *xd_session_peer(const xd_session *s);   /* "ip:port", for logs */
const struct sockaddr *xd_session_addr(const xd_session *s);
/* TLS channel binding data (tls-exporter / tls-unique), for SCRAM-PLUS later. */

/*
 * Send a stanza on this stream; takes ownership. 0 ok, -1 (stream closed).
 * Output is written at the end of the loop turn.  An IQ result or error to
 * a client waits until everything committed so far is durable (storage.h),
 * and whatever is sent to that client after it waits behind it, in order.
 */
int xd_session_send(xd_session *s, xmpp_stanza_t *st);
int xd_session_send_raw(xd_session *s, const char *data, size_t len);
/* Raw bytes that acknowledge something (a XEP-0198 <a/>): written once every
 * commit made so far is durable.  Dropped if the stream ends first. */
int xd_session_send_durable(xd_session *s, const char *data, size_t len);
/* Close with a stream error (condition from RFC 6120 4.9.3, or NULL for a clean close). */
void xd_session_close(xd_session *s, const char *condition, const char *text);

/* After a successful SASL exchange: remember the identity; the stream restarts. */
void xd_session_set_authenticated(xd_session *s, const char *localpart);
/*
 * Bind a resource (NULL: generate one).  A conflicting older session with the
 * same full JID is closed with <conflict/>.  0 ok, -1 bad resource.
 */
int xd_session_bind(xd_session *s, const char *resource);
/* Record the session's current presence (borrowed; copied). Availability and
 * priority drive RFC 6121 8.5 delivery to the bare JID. */
void xd_session_set_presence(xd_session *s, xmpp_stanza_t *presence);
int xd_session_is_available(const xd_session *s);
int xd_session_priority(const xd_session *s);
xmpp_stanza_t *xd_session_presence(const xd_session *s); /* borrowed, NULL if none */

/*
 * Stream resumption support (XEP-0198).  Routable stanzas received from the
 * client since it was bound (counts modulo 2^32):
 */
unsigned xd_session_stanzas_in(const xd_session *s);
/*
 * seconds > 0: when this bound client session loses its connection without
 * a clean </stream:stream>, it is detached instead of ended: the socket is
 * closed but the session stays bound and routable (XD_HOOK_STANZA_OUT still
 * runs for what is sent to it; nothing is written) for `seconds`, after
 * which it ends normally.  0 turns this off.
 */
void xd_session_set_resumable(xd_session *s, double seconds);
int xd_session_is_detached(const xd_session *s);
/*
 * The authenticated, not yet bound client session s takes over `old`, a
 * bound session of the same account (detached or not: a live one loses its
 * connection): s gets its full JID, presence state, received-stanza count
 * and per-module data (swapped with s's own where old had any) and its place
 * in the routing tables; no SESSION_END/SESSION_START hooks run.  The old
 * stream then ends (XD_HOOK_STREAM_CLOSED only).  0 ok, -1 refused.
 */
int xd_session_resume(xd_session *s, xd_session *old);

/* ---- server-to-server streams --------------------------------------------- */

/* 1 for a stream we opened (outgoing s2s), 0 for one a peer opened. */
int xd_session_is_initiator(const xd_session *s);
/* The 'from' domain a peer put in its stream header (prepared), or "". */
const char *xd_session_stream_from(const xd_session *s);
/* The peer domain authenticated on a server stream, or "". */
const char *xd_session_peer_domain(const xd_session *s);
/* An incoming server stream authenticated `domain` (SASL EXTERNAL): the
 * stream restarts.  Runs XD_HOOK_S2S_AUTH; returns -1 if a hook refused. */
int xd_session_set_peer_authenticated(xd_session *s, const char *domain);
/* An outgoing stream got <success/>: mark it and restart it (a new header is sent). */
void xd_session_initiator_authenticated(xd_session *s);
/*
 * Check the peer's TLS certificate: chain against the trust store, and
 * identity per RFC 6125 / RFC 7590 for `domain` (DNS-ID with wildcards,
 * SRV-ID _xmpp-server.domain, XmppAddr).  1 valid, 0 not (why says why).
 */
int xd_session_verify_peer(xd_session *s, const char *domain, char *why, size_t whylen);
/* Trust store for peer certificates: a PEM file, or NULL for the system's. */
int xd_tls_set_trust(const char *ca_file);
/*
 * Open an outgoing server stream from local_host to remote_domain at sa.
 * With direct_tls, TLS starts at once (XEP-0368); otherwise STARTTLS is
 * required and negotiated by the core.  After TLS, the peer's
 * <stream:features/> reach the module's element handler for
 * "http://etherx.jabber.org/streams".  XD_HOOK_STREAM_CLOSED tells when it ends.
 */
xd_session *xd_s2s_connect(xd_module *m, const char *local_host, const char *remote_domain,
                           const struct sockaddr *sa, socklen_t len, int direct_tls);

/* Per-module data on a session; free_fn runs when the session is destroyed. */
void *xd_session_get_data(const xd_session *s, const xd_module *m);
void xd_session_set_data(xd_session *s, xd_module *m, void *data, void (*free_fn)(void *));

/* Delay processing of this session's input for ms milliseconds (failed
 * logins, rate limits): the socket is not read, so TCP pushes back. */
void xd_session_pause(xd_session *s, unsigned ms);
/* Bytes read from the peer so far (before TLS decryption is not counted:
 * this is the XML the stream carried). */
uint64_t xd_session_bytes_in(const xd_session *s);
/* The listener a connection came in on, as "address:port" from the config,
 * or "" for a stream we opened. */
const char *xd_session_listener(const xd_session *s);
/*
 * Send a stanza that this module's XD_HOOK_STANZA_OUT handler held earlier
 * (it answered XD_HANDLED and kept a copy): the STANZA_OUT handlers ranked
 * after m's run, then it is written.  Takes st.  0 ok, -1 (session gone).
 */
int xd_session_send_held(xd_session *s, xd_module *m, xmpp_stanza_t *st);

/* Call fn for every bound session of a local bare JID; stop when fn returns non-zero. */
typedef int (*xd_session_iter_fn)(xd_session *s, void *data);
int xd_user_sessions(const xd_jid *bare, xd_session_iter_fn fn, void *data);
/* End every stream of the account with a stream error (e.g. "not-authorized",
 * "account removed"). */
void xd_close_user_sessions(const xd_jid *bare, const char *condition, const char *text);

/* ---- routing ------------------------------------------------------------- */

/* The stanza context every module builds stanzas with. */
xmpp_ctx_t *xd_ctx(void);
/* Route a stanza by its 'to' (and 'from') attributes; takes ownership. */
void xd_route(xmpp_stanza_t *st);
/* The same with XD_EVENT_* flags for the routing hooks (XD_EVENT_REROUTED). */
void xd_route_flags(xmpp_stanza_t *st, unsigned flags);
/* Route st (taken) once every commit made so far is durable: for a stanza
 * that tells someone their stanza was stored (a notice, a receipt). */
void xd_route_durable(xmpp_stanza_t *st);
/* Deliver to one session after hooks and routing decided; takes ownership. */
void xd_deliver_to_session(xd_session *s, xmpp_stanza_t *st);
/*
 * Bounce a stanza to its sender with an error (type "cancel", "modify",
 * "auth", "wait"); errors are never answered.  Borrows st.
 */
void xd_bounce(xmpp_stanza_t *st, const char *type, const char *condition, const char *text);
/* Is this domain served here? */
int xd_is_local_host(const char *domain);
/*
 * "address" or "address/prefix", IPv4 or IPv6.  The address comes back in
 * IPv6 form (IPv4 as ::ffff:a.b.c.d, its prefix plus 96; no prefix means the
 * one address, 128) with the bits after the prefix cleared.  0 ok, -1 not an
 * address, or a bad prefix.
 */
int xd_cidr_parse(const char *s, unsigned char addr[16], int *prefix);

/* The served domains (prepared), in the config's order. */
int xd_host_count(void);
const char *xd_host_name(int i); /* NULL when out of range */

/* Build an IQ result for iq (same id, to/from swapped); the caller sends it. */
xmpp_stanza_t *xd_iq_result(xmpp_stanza_t *iq);
/* Build a stanza error (RFC 6120 8.3) in reply to st; the caller sends it. */
xmpp_stanza_t *xd_error_reply(xmpp_stanza_t *st, const char *type, const char *condition,
                              const char *text);
/* Parse one element stored as text (what xmpp_stanza_to_text made of it)
 * with the stream parser's rules, keeping xml:lang; NULL if it is not
 * well-formed.  Use it instead of xmpp_stanza_new_from_string(), which
 * loses xml:lang.  The caller owns the result. */
xmpp_stanza_t *xd_stanza_parse(const char *xml, size_t len);
/* Create an empty element <name xmlns='ns'/>. */
xmpp_stanza_t *xd_stanza_new(const char *name, const char *ns);
/* Append <name>text</name> (in the parent's namespace) to parent.  0 or -1. */
int xd_stanza_add_text_child(xmpp_stanza_t *parent, const char *name, const char *text);

/* ---- rosters -------------------------------------------------------------- */

/* How a contact stands in a user's roster (RFC 6121 subscription states). */
enum {
    XD_ROSTER_ITEM = 1,        /* the contact is in the roster */
    XD_ROSTER_FROM = 2,        /* the contact receives the user's presence */
    XD_ROSTER_TO = 4,          /* the user receives the contact's presence */
    XD_ROSTER_PENDING_OUT = 8, /* the user asked to subscribe, no answer yet */
    XD_ROSTER_PENDING_IN = 16, /* the contact asked to subscribe, no answer yet */
    /* XD_HOOK_ROSTER_CHANGED only: the user made the change (roster set or
     * remove, an answer to a request); without it the contact did. */
    XD_ROSTER_BY_USER = 256
};
/*
 * The roster module answers queries for the others (PEP access models, MAM
 * preferences, spam control).  One provider; it returns XD_ROSTER_* flags,
 * 0 for a contact not in the roster, -1 on error.
 */
typedef int (*xd_roster_fn)(const xd_jid *user, const xd_jid *contact, void *data);
int xd_roster_provide(xd_module *m, xd_roster_fn fn, void *data);
/* user and contact are bare JIDs. -1 when no roster module is loaded. */
int xd_roster_relation(const xd_jid *user, const xd_jid *contact);

/* ---- accounts ------------------------------------------------------------ */

/* 1 if the bare JID is a local account, 0 if not, -1 on storage error. */
int xd_account_exists(const xd_jid *bare);
/* Fetch SCRAM credentials (mech: XD_SCRAM_SHA1 or XD_SCRAM_SHA256). 0, XD_NOTFOUND, -1. */
int xd_account_credentials(const xd_jid *bare, xd_scram_hash mech, xd_scram_creds *out);
/* Check a plaintext password against the stored salted keys (PLAIN). 1 match, 0 no, -1. */
int xd_account_check_password(const xd_jid *bare, const char *password);
/* Create (-2 if it exists), change the password of (XD_NOTFOUND), delete (XD_NOTFOUND).
 * Deleting runs XD_HOOK_ACCOUNT_REMOVED, then purges every record whose key
 * starts with the bare JID and a NUL byte, in every table: key per-user data
 * that way and it leaves with the account. */
int xd_account_create(const xd_jid *bare, const char *password);
int xd_account_set_password(const xd_jid *bare, const char *password);
int xd_account_delete(const xd_jid *bare);
/* How many accounts were ever deleted here (by anyone: in-band, xmppctl with
 * or without a running server).  A module whose data a removal cannot reach
 * by key prefix compares it with the count it last saw.  0 or -1. */
int xd_account_removals(unsigned long long *n);

/* ---- settings and module state -------------------------------------------- */

typedef enum xd_setting_type {
    XD_SETTING_INT = 1,
    XD_SETTING_BOOL,
    XD_SETTING_STRING,
    XD_SETTING_STRING_LIST
} xd_setting_type;

typedef struct xd_setting {
    const char *name;
    xd_setting_type type;
} xd_setting;

/*
 * Read a setting from the module's config group.  Only declared settings
 * exist; a key in the group that the module did not declare, or a value of
 * the wrong type, stops the server at start-up with file:line.
 */
long long xd_config_int(const xd_module *m, const char *name, long long def);
int xd_config_bool(const xd_module *m, const char *name, int def);
const char *xd_config_string(const xd_module *m, const char *name, const char *def);
int xd_config_list_count(const xd_module *m, const char *name);
const char *xd_config_list_item(const xd_module *m, const char *name, int i);
/* Report a bad value: logged with the module's name and the setting's file:line. */
void xd_config_error(const xd_module *m, const char *name, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/*
 * Counters an operator reads in the log: each named counter of a module is
 * written as "stats: <module>.<name>=<n>" on SIGUSR1 and at shutdown.
 * Names are static strings (the pointer is kept).
 */
void xd_count(xd_module *m, const char *name, unsigned long n);

const char *xd_module_name(const xd_module *m);
void *xd_module_get_data(const xd_module *m);
void xd_module_set_data(xd_module *m, void *data);

/* Core limits a module may tune (mod_c2s sets the client stanza size). */
void xd_stream_set_max_stanza_size(xd_stream_type type, size_t bytes);

/* Timers on the server's event loop. */
typedef struct xd_timer xd_timer;
typedef void (*xd_timer_fn)(void *data);
xd_timer *xd_timer_start(xd_module *m, double seconds, double repeat, xd_timer_fn fn, void *data);
void xd_timer_stop(xd_timer *t);

/* File descriptors on the server's event loop (a resolver's sockets, say). */
enum { XD_IO_READ = 1, XD_IO_WRITE = 2 };
typedef struct xd_io xd_io;
typedef void (*xd_io_fn)(int fd, int events, void *data);
xd_io *xd_io_start(xd_module *m, int fd, int events, xd_io_fn fn, void *data);
void xd_io_set(xd_io *io, int events); /* change what is watched (0: nothing) */
void xd_io_stop(xd_io *io);            /* stop and free; the fd is not closed */
double xd_now(void);                   /* the loop's current time, in seconds */
double xd_monotonic(void); /* seconds on a clock that never steps back (rates, windows) */

/* ---- the descriptor ------------------------------------------------------ */

typedef struct xd_module_desc {
    unsigned abi;                /* XD_MODULE_ABI at build time */
    const char *name;            /* must match the file name: mod_<name>.so */
    const xd_setting *settings;  /* declared settings, ended by {NULL, 0}; may be NULL */
    int (*load)(xd_module *m);   /* register hooks, read settings. 0 ok, -1 refuse */
    void (*unload)(xd_module *m); /* free what load made (hooks are removed by the core) */
} xd_module_desc;

#define XD_MODULE_SYMBOL_PREFIX "xd_module_"
#define XD_MODULE(n) const xd_module_desc xd_module_##n

#ifdef __cplusplus
}
#endif
#endif
