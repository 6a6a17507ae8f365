/*
 * mod_c2s: what a client needs to start a session (RFC 6120 6-7) and a few
 * server basics: SASL SCRAM-SHA-256, SCRAM-SHA-1 and PLAIN (TLS only),
 * resource binding, the legacy session IQ (RFC 3921 3), presence to the
 * user's own resources, XEP-0199 ping, XEP-0030 disco#info for the server,
 * and XEP-0092 version when enabled.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xmppd/module.h>

#define NS_SASL "urn:ietf:params:xml:ns:xmpp-sasl"
#define NS_BIND "urn:ietf:params:xml:ns:xmpp-bind"
#define NS_SESSION "urn:ietf:params:xml:ns:xmpp-session"
#define NS_PING "urn:xmpp:ping"
#define NS_DISCO_INFO "http://jabber.org/protocol/disco#info"
#define NS_DISCO_ITEMS "http://jabber.org/protocol/disco#items"
#define NS_VERSION "jabber:iq:version"
#define NS_STANZAS "urn:ietf:params:xml:ns:xmpp-stanzas"
#define NS_CAPS "http://jabber.org/protocol/caps"
#define CAPS_NODE "https://xmppd.invalid/caps"

typedef struct c2s_conf {
    xd_module *m;
    unsigned failure_delay_ms;
    int max_attempts;
} c2s_conf;

/* One SASL negotiation in progress on a session. */
typedef struct sasl_state {
    xd_scram_server *scram;
    int attempts;
    int await_first; /* SCRAM without an initial response */
    xd_scram_hash hash;
    char user[XD_JID_PART_MAX + 1];
    int known;       /* the user exists (else we fail at the end) */
} sasl_state;

static void
sasl_state_free(void *p)
{
    sasl_state *st = p;
    xd_scram_server_free(st->scram);
    free(st);
}

static sasl_state *
sasl_state_get(xd_session *s, c2s_conf *c)
{
    sasl_state *st = xd_session_get_data(s, c->m);
    if (!st && (st = calloc(1, sizeof(*st))))
        xd_session_set_data(s, c->m, st, sasl_state_free);
    return st;
}

/* ---- stream features ------------------------------------------------------- */

static void
add_mechanism(xmpp_stanza_t *mechs, const char *name)
{
    xmpp_stanza_t *m = xd_stanza_new("mechanism", NULL);
    xmpp_stanza_t *t = xmpp_stanza_new(xd_ctx());
    xmpp_stanza_set_text(t, name);
    xmpp_stanza_add_child_ex(m, t, 0);
    xmpp_stanza_add_child_ex(mechs, m, 0);
}

static void
c2s_features(xd_session *s, xmpp_stanza_t *features, void *data)
{
    (void)data;
    if (!xd_session_is_tls(s))
        return; /* nothing but STARTTLS before TLS (the core offers it) */
    {
        /* XEP-0115 6.3: the server's own capabilities, so clients can skip disco. */
        xmpp_stanza_t *caps = xd_stanza_new("c", NS_CAPS);
        xmpp_stanza_set_attribute(caps, "hash", "sha-1");
        xmpp_stanza_set_attribute(caps, "node", CAPS_NODE);
        xmpp_stanza_set_attribute(caps, "ver", xd_disco_caps_ver());
        xmpp_stanza_add_child_ex(features, caps, 0);
    }
    if (!xd_session_is_authenticated(s)) {
        xmpp_stanza_t *mechs = xd_stanza_new("mechanisms", NS_SASL);
        add_mechanism(mechs, "SCRAM-SHA-256");
        add_mechanism(mechs, "SCRAM-SHA-1");
        add_mechanism(mechs, "PLAIN");
        xmpp_stanza_add_child_ex(features, mechs, 0);
    } else if (!xd_session_is_bound(s)) {
        xmpp_stanza_t *sess = xd_stanza_new("session", NS_SESSION);
        xmpp_stanza_add_child_ex(features, xd_stanza_new("bind", NS_BIND), 0);
        xmpp_stanza_add_child_ex(sess, xd_stanza_new("optional", NULL), 0);
        xmpp_stanza_add_child_ex(features, sess, 0);
    }
}

/* ---- SASL (RFC 6120 6) ----------------------------------------------------------- */

static void
sasl_send(xd_session *s, const char *name, const unsigned char *data, size_t len)
{
    xmpp_stanza_t *el = xd_stanza_new(name, NS_SASL);
    if (data) {
        char *b64 = len ? xd_base64_encode(data, len) : strdup("=");
        xmpp_stanza_t *t = xmpp_stanza_new(xd_ctx());
        xmpp_stanza_set_text(t, b64 ? b64 : "=");
        xmpp_stanza_add_child_ex(el, t, 0);
        free(b64);
    }
    xd_session_send(s, el);
}

static void
sasl_fail(xd_session *s, c2s_conf *c, sasl_state *st, const char *cond)
{
    xmpp_stanza_t *f = xd_stanza_new("failure", NS_SASL);
    xmpp_stanza_add_child_ex(f, xd_stanza_new(cond, NULL), 0);
    xd_scram_server_free(st->scram);
    st->scram = NULL;
    st->await_first = 0;
    xd_session_send(s, f);
    if (strcmp(cond, "aborted") == 0)
        return;
    xd_info("%s: authentication failed for '%s': %s", xd_session_peer(s), st->user, cond);
    /* Each failure costs the client time; a few in a row cost the stream. */
    if (++st->attempts >= c->max_attempts)
        xd_session_close(s, "policy-violation", "too many failed authentication attempts");
    else
        xd_session_pause(s, c->failure_delay_ms * (unsigned)st->attempts);
}

/* st is freed: a logged-in session keeps nothing of its SASL exchange. */
static void
sasl_succeed(xd_session *s, c2s_conf *c, sasl_state *st, const char *extra, size_t len)
{
    xd_info("%s: authenticated as %s@%s", xd_session_peer(s), st->user, xd_session_host(s));
    sasl_send(s, "success", (const unsigned char *)extra, len);
    xd_session_set_authenticated(s, st->user);
    xd_session_set_data(s, c->m, NULL, NULL);
}

/* The element's text, base64-decoded and NUL-terminated; "=" is the
 * empty response.  NULL when the text is not base64. */
static unsigned char *
sasl_payload(xmpp_stanza_t *el, size_t *len, int *present)
{
    char *text = xmpp_stanza_get_text(el);
    unsigned char *raw = NULL, *out;
    *present = text && *text;
    *len = 0;
    if (*present && strcmp(text, "=") != 0 &&
        !(raw = xd_base64_decode(text, strlen(text), len))) {
        xmpp_free(xd_ctx(), text);
        return NULL;
    }
    xmpp_free(xd_ctx(), text);
    if ((out = malloc(*len + 1))) {
        if (*len)
            memcpy(out, raw, *len);
        out[*len] = '\0';
    }
    if (raw) {
        explicit_bzero(raw, *len);
        free(raw);
    }
    return out;
}

static int
prep_user(sasl_state *st, const char *authcid)
{
    return xd_jid_prep_local(st->user, sizeof(st->user), authcid);
}

/* Modules (rate limits) may refuse an attempt on account j before any
 * password work is done.  1 refused (and answered). */
static int
attempt_refused(xd_session *s, c2s_conf *c, sasl_state *st, const xd_jid *j)
{
    xd_event ev = {.session = s, .from = j, .addr = xd_session_addr(s)};
    if (xd_hooks_run(XD_HOOK_AUTH_ATTEMPT, &ev) != XD_DROP)
        return 0;
    sasl_fail(s, c, st, "temporary-auth-failure");
    return 1;
}

static void
plain_auth(xd_session *s, c2s_conf *c, sasl_state *st, const unsigned char *msg, size_t len)
{
    /* authzid NUL authcid NUL passwd (RFC 4616) */
    const char *authzid = (const char *)msg;
    const char *authcid, *pw, *end = (const char *)msg + len;
    xd_jid j;
    int ok;

    authcid = memchr(authzid, '\0', len);
    if (!authcid || !(pw = memchr(authcid + 1, '\0', (size_t)(end - authcid - 1))) ||
        memchr(pw + 1, '\0', (size_t)(end - pw - 1))) {
        sasl_fail(s, c, st, "malformed-request");
        return;
    }
    authcid++;
    pw++;
    if (prep_user(st, authcid) != 0 || !*st->user) {
        snprintf(st->user, sizeof(st->user), "(invalid)");
        sasl_fail(s, c, st, "not-authorized");
        return;
    }
    if (*authzid) {
        char self[XD_JID_STR_MAX];
        xd_jid az;
        snprintf(self, sizeof(self), "%s@%s", st->user, xd_session_host(s));
        if (xd_jid_parse(&az, authzid) != 0 || az.resource[0] ||
            strcmp(az.local, st->user) || strcmp(az.domain, xd_session_host(s))) {
            sasl_fail(s, c, st, "invalid-authzid");
            return;
        }
    }
    memset(&j, 0, sizeof(j));
    snprintf(j.local, sizeof(j.local), "%s", st->user);
    snprintf(j.domain, sizeof(j.domain), "%s", xd_session_host(s));
    if (attempt_refused(s, c, st, &j))
        return;
    /* pw runs to the end of the message, which sasl_payload NUL-terminated */
    ok = xd_account_check_password(&j, pw);
    if (ok == 1)
        sasl_succeed(s, c, st, NULL, 0);
    else
        sasl_fail(s, c, st, ok < 0 ? "temporary-auth-failure" : "not-authorized");
}

/* Credentials for an unknown user, so the exchange looks the same. */
static void
fake_creds(xd_scram_creds *cr, xd_scram_hash h, const char *user)
{
    memset(cr, 0, sizeof(*cr));
    cr->hash = h;
    cr->iterations = XD_SCRAM_DEFAULT_ITERATIONS;
    cr->salt_len = XD_SCRAM_SALT_LEN;
    for (size_t i = 0; user[i]; i++)
        cr->salt[i % XD_SCRAM_SALT_LEN] ^= (unsigned char)(user[i] * 31u + i);
}

static void
scram_first(xd_session *s, c2s_conf *c, sasl_state *st, const unsigned char *msg, size_t len)
{
    const char *user = NULL, *err = NULL;
    char *out = NULL;
    size_t out_len = 0;
    xd_scram_creds cr;
    xd_jid j;
    int r;

    st->await_first = 0;
    if (xd_scram_server_start(st->scram, (const char *)msg, len, &user, &err) != 0) {
        snprintf(st->user, sizeof(st->user), "(malformed)");
        sasl_fail(s, c, st, err ? err : "malformed-request");
        return;
    }
    if (prep_user(st, user) != 0 || !*st->user) {
        snprintf(st->user, sizeof(st->user), "(invalid)");
        sasl_fail(s, c, st, "not-authorized");
        return;
    }
    memset(&j, 0, sizeof(j));
    snprintf(j.local, sizeof(j.local), "%s", st->user);
    snprintf(j.domain, sizeof(j.domain), "%s", xd_session_host(s));
    if (attempt_refused(s, c, st, &j))
        return;
    r = xd_account_credentials(&j, st->hash, &cr);
    if (r < 0) {
        sasl_fail(s, c, st, "temporary-auth-failure");
        return;
    }
    st->known = r == 0;
    if (!st->known)
        fake_creds(&cr, st->hash, st->user);
    if (xd_scram_server_first(st->scram, &cr, &out, &out_len, &err) != 0) {
        sasl_fail(s, c, st, err ? err : "temporary-auth-failure");
        return;
    }
    explicit_bzero(&cr, sizeof(cr));
    sasl_send(s, "challenge", (unsigned char *)out, out_len);
    free(out);
}

static void
scram_final(xd_session *s, c2s_conf *c, sasl_state *st, const unsigned char *msg, size_t len)
{
    const char *err = NULL;
    char *out = NULL;
    size_t out_len = 0;

    if (xd_scram_server_final(st->scram, (const char *)msg, len, &out, &out_len, &err) != 0 ||
        !st->known) {
        free(out);
        sasl_fail(s, c, st, st->known ? (err ? err : "not-authorized") : "not-authorized");
        return;
    }
    sasl_succeed(s, c, st, out, out_len);
    free(out);
}

static int
sasl_element(xd_session *s, xmpp_stanza_t *el, void *data)
{
    c2s_conf *c = data;
    const char *name = xmpp_stanza_get_name(el);
    sasl_state *st;
    unsigned char *msg;
    size_t len;
    int present;

    if (xd_session_is_authenticated(s)) {
        xd_session_close(s, "policy-violation", "already authenticated");
        return XD_HANDLED;
    }
    if (!xd_session_is_tls(s) || !(st = sasl_state_get(s, c))) {
        xd_session_close(s, "not-authorized", NULL);
        return XD_HANDLED;
    }
    if (!strcmp(name, "abort")) {
        sasl_fail(s, c, st, "aborted");
        return XD_HANDLED;
    }
    msg = sasl_payload(el, &len, &present);
    if (!msg) {
        sasl_fail(s, c, st, "incorrect-encoding");
        return XD_HANDLED;
    }
    if (!strcmp(name, "auth")) {
        const char *mech = xmpp_stanza_get_attribute(el, "mechanism");
        xd_scram_server_free(st->scram);
        st->scram = NULL;
        st->user[0] = '\0';
        if (mech && !strcmp(mech, "PLAIN")) {
            plain_auth(s, c, st, msg, len);
        } else if (mech && (!strcmp(mech, "SCRAM-SHA-256") || !strcmp(mech, "SCRAM-SHA-1"))) {
            st->hash = !strcmp(mech, "SCRAM-SHA-1") ? XD_SCRAM_SHA1 : XD_SCRAM_SHA256;
            st->scram = xd_scram_server_new(st->hash);
            if (!st->scram)
                sasl_fail(s, c, st, "temporary-auth-failure");
            else if (!present) {
                st->await_first = 1;
                sasl_send(s, "challenge", (const unsigned char *)"", 0);
            } else
                scram_first(s, c, st, msg, len);
        } else
            sasl_fail(s, c, st, "invalid-mechanism");
    } else if (!strcmp(name, "response") && st->scram) {
        if (st->await_first)
            scram_first(s, c, st, msg, len);
        else
            scram_final(s, c, st, msg, len);
    } else
        sasl_fail(s, c, st, "malformed-request");
    explicit_bzero(msg, len);
    free(msg);
    return XD_HANDLED;
}

/* ---- binding (RFC 6120 7) and the session IQ ---------------------------------------- */

static xmpp_stanza_t *
text_child(const char *name, const char *text)
{
    xmpp_stanza_t *el = xd_stanza_new(name, NULL);
    xmpp_stanza_t *t = xmpp_stanza_new(xd_ctx());
    xmpp_stanza_set_text(t, text);
    xmpp_stanza_add_child_ex(el, t, 0);
    return el;
}

static void
reply_error(xd_session *s, xmpp_stanza_t *iq, const char *type, const char *cond)
{
    xmpp_stanza_t *e = xd_error_reply(iq, type, cond, NULL);
    if (e)
        xd_session_send(s, e);
}

static void
bind_resource(xd_session *s, xmpp_stanza_t *iq, xmpp_stanza_t *bind)
{
    xmpp_stanza_t *res = xmpp_stanza_get_child_by_name(bind, "resource");
    char *want = res ? xmpp_stanza_get_text(res) : NULL;
    char full[XD_JID_STR_MAX];
    xmpp_stanza_t *reply, *b;
    int r = xd_session_bind(s, want && *want ? want : NULL);

    xmpp_free(xd_ctx(), want);
    if (r != 0) {
        reply_error(s, iq, "modify", "bad-request");
        return;
    }
    xd_jid_format(xd_session_jid(s), 1, full, sizeof(full));
    reply = xd_iq_result(iq); /* the iq had neither 'to' nor 'from' to swap */
    b = xd_stanza_new("bind", NS_BIND);
    xmpp_stanza_add_child_ex(b, text_child("jid", full), 0);
    xmpp_stanza_add_child_ex(reply, b, 0);
    xd_session_send(s, reply);
}

/* Stanzas on an authenticated stream before a resource is bound. */
static int
unbound_stanza(xd_session *s, xmpp_stanza_t *st, void *data)
{
    const char *type = xmpp_stanza_get_type(st);
    xmpp_stanza_t *bind, *sess;
    (void)data;

    if (!xd_session_is_authenticated(s) || strcmp(xmpp_stanza_get_name(st), "iq") != 0 || !type ||
        strcmp(type, "set") != 0)
        return XD_PASS;
    if ((bind = xmpp_stanza_get_child_by_name_and_ns(st, "bind", NS_BIND))) {
        bind_resource(s, st, bind);
        return XD_HANDLED;
    }
    if ((sess = xmpp_stanza_get_child_by_name_and_ns(st, "session", NS_SESSION))) {
        xd_session_send(s, xd_iq_result(st));
        return XD_HANDLED;
    }
    return XD_PASS;
}

/* ---- IQs to the server ------------------------------------------------------------------ */

static int
iq_empty_result(xd_event *ev, void *data)
{
    (void)data;
    xd_route(xd_iq_result(ev->stanza));
    return XD_HANDLED;
}

/*
 * A ping to the account's own bare JID, or without 'to' (RFC 6120 10.3.3:
 * the server answers for the account), is a ping of the server: clients
 * (profanity, xmpp.js) send it to watch their connection.  Anyone else
 * pinging a bare JID learns nothing from us, as with any unhandled IQ.
 */
static int
iq_account_ping(xd_event *ev, void *data)
{
    (void)data;
    if (!ev->from || !ev->to || !xd_jid_equal(ev->from, ev->to, 0))
        xd_bounce(ev->stanza, "cancel", "service-unavailable", NULL);
    else
        xd_route(xd_iq_result(ev->stanza));
    return XD_HANDLED;
}

static int
iq_disco_info(xd_event *ev, void *data)
{
    xmpp_stanza_t *q = xmpp_stanza_get_child_by_ns(ev->stanza, NS_DISCO_INFO);
    const char *node = q ? xmpp_stanza_get_attribute(q, "node") : NULL;
    xmpp_stanza_t *r, *rq;
    (void)data;

    if (node) {
        xd_bounce(ev->stanza, "cancel", "item-not-found", NULL);
        return XD_HANDLED;
    }
    r = xd_iq_result(ev->stanza);
    rq = xd_stanza_new("query", NS_DISCO_INFO);
    xd_disco_fill_info(rq);
    xmpp_stanza_add_child_ex(r, rq, 0);
    xd_route(r);
    return XD_HANDLED;
}

/* disco#info of a local account (XEP-0030 3.1: identity account/registered). */
static int
iq_account_disco_info(xd_event *ev, void *data)
{
    xmpp_stanza_t *q = xmpp_stanza_get_child_by_ns(ev->stanza, NS_DISCO_INFO);
    xmpp_stanza_t *r, *rq;
    (void)data;

    if (q && xmpp_stanza_get_attribute(q, "node")) {
        xd_bounce(ev->stanza, "cancel", "item-not-found", NULL);
        return XD_HANDLED;
    }
    r = xd_iq_result(ev->stanza);
    rq = xd_stanza_new("query", NS_DISCO_INFO);
    xd_disco_fill_account_info(rq);
    xmpp_stanza_add_child_ex(r, rq, 0);
    if (!xmpp_stanza_get_from(r)) {
        /* asked without 'to': the answer comes from the account itself */
        char bare[XD_JID_STR_MAX];
        if (xd_jid_format(ev->to, 0, bare, sizeof(bare)) >= 0)
            xmpp_stanza_set_from(r, bare);
    }
    xd_route(r);
    return XD_HANDLED;
}

static int
iq_disco_items(xd_event *ev, void *data)
{
    xmpp_stanza_t *r = xd_iq_result(ev->stanza);
    (void)data;
    xmpp_stanza_add_child_ex(r, xd_stanza_new("query", NS_DISCO_ITEMS), 0);
    xd_route(r);
    return XD_HANDLED;
}

static int
iq_version(xd_event *ev, void *data)
{
    xmpp_stanza_t *r = xd_iq_result(ev->stanza);
    xmpp_stanza_t *q = xd_stanza_new("query", NS_VERSION);
    (void)data;
    xmpp_stanza_add_child_ex(q, text_child("name", "xmppd"), 0);
    xmpp_stanza_add_child_ex(q, text_child("version", XD_VERSION), 0);
    xmpp_stanza_add_child_ex(r, q, 0);
    xd_route(r);
    return XD_HANDLED;
}

/* ---- presence to the user's own resources (RFC 6121 4.2.2, 4.5.2) ------------------------ */

typedef struct bcast {
    xmpp_stanza_t *presence;
    const xd_session *except;
} bcast;

static int
send_presence(xd_session *s, void *data)
{
    bcast *b = data;
    if (s != b->except && xd_session_is_available(s))
        xd_deliver_to_session(s, xmpp_stanza_copy(b->presence));
    return 0;
}

static void
broadcast_own(xd_session *s, xmpp_stanza_t *presence, const xd_session *except)
{
    xd_jid bare = *xd_session_jid(s);
    bcast b = {presence, except};
    xd_jid_to_bare(&bare);
    xd_user_sessions(&bare, send_presence, &b);
}

/* XD_HOOK_PRESENCE_OUT: the core recorded it; the user's own resources see it. */
static int
c2s_presence(xd_event *ev, void *data)
{
    xmpp_stanza_t *st = ev->stanza;
    (void)data;

    /* RFC 6121 4.2.2: the user's own available resources, this one included. */
    broadcast_own(ev->session, st, NULL);
    if (xmpp_stanza_get_type(st)) {
        /* the unavailable resource no longer counts as available, so tell it too */
        xd_deliver_to_session(ev->session, xmpp_stanza_copy(st));
    }
    return XD_PASS;
}

static int
c2s_session_end(xd_event *ev, void *data)
{
    xd_session *s = ev->session;
    xmpp_stanza_t *p;
    char full[XD_JID_STR_MAX];
    (void)data;

    if (!xd_session_is_available(s))
        return XD_PASS;
    xd_jid_format(xd_session_jid(s), 1, full, sizeof(full));
    p = xmpp_presence_new(xd_ctx());
    xmpp_stanza_set_type(p, "unavailable");
    xmpp_stanza_set_from(p, full);
    broadcast_own(s, p, s);
    xmpp_stanza_release(p);
    return XD_PASS;
}

/* ---- the module ------------------------------------------------------------------------------- */

static const xd_setting c2s_settings[] = {
    {"max_stanza_size", XD_SETTING_INT},
    {"auth_failure_delay", XD_SETTING_INT},
    {"auth_max_attempts", XD_SETTING_INT},
    {"version", XD_SETTING_BOOL},
    {NULL, 0},
};

static int
c2s_load(xd_module *m)
{
    c2s_conf *c;
    long long max = xd_config_int(m, "max_stanza_size", 262144);
    long long delay = xd_config_int(m, "auth_failure_delay", 1000);
    long long attempts = xd_config_int(m, "auth_max_attempts", 3);
    int r = 0;

    if (max < 4096 || max > 64 * 1024 * 1024) {
        xd_config_error(m, "max_stanza_size", "must be from 4096 to 67108864 bytes");
        return -1;
    }
    if (delay < 0 || delay > 60000) {
        xd_config_error(m, "auth_failure_delay", "must be from 0 to 60000 milliseconds");
        return -1;
    }
    if (attempts < 1 || attempts > 100) {
        xd_config_error(m, "auth_max_attempts", "must be from 1 to 100");
        return -1;
    }
    if (!(c = calloc(1, sizeof(*c))))
        return -1;
    c->m = m;
    c->failure_delay_ms = (unsigned)delay;
    c->max_attempts = (int)attempts;
    xd_module_set_data(m, c);
    xd_stream_set_max_stanza_size(XD_STREAM_C2S, (size_t)max);

    r |= xd_stream_features_add(m, XD_STREAM_C2S, c2s_features, c);
    r |= xd_stream_element_register(m, XD_STREAM_C2S, NS_SASL, sasl_element, c);
    r |= xd_stream_element_register(m, XD_STREAM_C2S, "jabber:client", unbound_stanza, c);
    r |= xd_iq_register(m, XD_IQ_HOST, "set", NS_SESSION, iq_empty_result, c);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "set", NS_SESSION, iq_empty_result, c);
    r |= xd_iq_register(m, XD_IQ_HOST, "get", NS_PING, iq_empty_result, c);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "get", NS_PING, iq_account_ping, c);
    r |= xd_iq_register(m, XD_IQ_HOST, "get", NS_DISCO_INFO, iq_disco_info, c);
    r |= xd_iq_register(m, XD_IQ_HOST, "get", NS_DISCO_ITEMS, iq_disco_items, c);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "get", NS_DISCO_INFO, iq_account_disco_info, c);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "get", NS_DISCO_ITEMS, iq_disco_items, c);
    r |= xd_hook(m, XD_HOOK_PRESENCE_OUT, c2s_presence, c, XD_PRIO_HIGH);
    r |= xd_hook(m, XD_HOOK_SESSION_END, c2s_session_end, c, XD_PRIO_DEFAULT);
    r |= xd_disco_add_identity(m, "server", "im", "xmppd");
    r |= xd_disco_add_feature(m, NS_DISCO_INFO);
    r |= xd_disco_add_feature(m, NS_DISCO_ITEMS);
    r |= xd_disco_add_feature(m, NS_PING);
    if (xd_config_bool(m, "version", 0)) {
        r |= xd_iq_register(m, XD_IQ_HOST, "get", NS_VERSION, iq_version, c);
        r |= xd_disco_add_feature(m, NS_VERSION);
    }
    return r ? -1 : 0;
}

static void
c2s_unload(xd_module *m)
{
    free(xd_module_get_data(m));
}

XD_MODULE(c2s) = {
    .abi = XD_MODULE_ABI,
    .name = "c2s",
    .settings = c2s_settings,
    .load = c2s_load,
    .unload = c2s_unload,
};
