/*
 * mod_register: XEP-0077 In-Band Registration (version 2.4).
 *
 *   3.1  registration before authentication: the form (get) and the
 *        username/password submission (set), on a TLS client stream only
 *        (the core demands STARTTLS before anything else anyway)
 *   3.2  cancelling an existing registration (<remove/>), then the user's
 *        streams are closed with <not-authorized/>
 *   3.3  changing the password of an authenticated account
 *   4    the stream feature http://jabber.org/features/iq-register
 *   7    registration is a spam vector: it is off unless `open = true`, and
 *        limited per source address and hour
 *
 * Settings: open (bool, false), min_password_length (int, 8),
 * per_ip_per_hour (int, 5; 0 = no limit).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <netinet/in.h>

#include <xmppd/module.h>

#define NS_REGISTER "jabber:iq:register"
#define NS_FEATURE "http://jabber.org/features/iq-register"

#define PASSWORD_MAX_BYTES 1024 /* what the account store accepts */
#define RATE_SLOTS 4096         /* addresses remembered at once */
#define RATE_WINDOW 3600.0      /* seconds */

/* One source address (IPv4, or the /64 of an IPv6 address) and its window. */
typedef struct rate_slot {
    unsigned char addr[16];
    int used;
    double start; /* when its window began */
    long long count;
} rate_slot;

typedef struct reg_conf {
    xd_module *m;
    int open;
    long long min_pw;
    long long per_hour;
    rate_slot slots[RATE_SLOTS];
} reg_conf;

/* ---- helpers -------------------------------------------------------------- */

static xmpp_stanza_t *
text_child(const char *name, const char *text)
{
    xmpp_stanza_t *el = xd_stanza_new(name, NULL);
    if (text) {
        xmpp_stanza_t *t = xmpp_stanza_new(xd_ctx());
        xmpp_stanza_set_text(t, text);
        xmpp_stanza_add_child_ex(el, t, 0);
    }
    return el;
}

static void
send_error(xd_session *s, xmpp_stanza_t *iq, const char *type, const char *cond, const char *text)
{
    xmpp_stanza_t *e = xd_error_reply(iq, type, cond, text);
    if (e)
        xd_session_send(s, e);
}

/* The text of a child element, malloc'd ("" for <x/>), or NULL if absent. */
static char *
child_text(xmpp_stanza_t *q, const char *name)
{
    xmpp_stanza_t *el = xmpp_stanza_get_child_by_name(q, name);
    char *t, *out;
    if (!el)
        return NULL;
    t = xmpp_stanza_get_text(el);
    out = strdup(t ? t : "");
    if (t)
        xmpp_free(xd_ctx(), t);
    return out;
}

static void
free_secret(char *p)
{
    if (p) {
        explicit_bzero(p, strlen(p));
        free(p);
    }
}

/* Code points in a UTF-8 string (continuation bytes are not counted). */
static size_t
utf8_len(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        if (((unsigned char)*s & 0xC0) != 0x80)
            n++;
    return n;
}

/* NULL if the password is acceptable, else why not (for <text/>). */
static const char *
password_problem(const reg_conf *c, const char *pw, const char *user_raw, const char *user)
{
    static const char *const msgs[] = {"the password is too short", "the password is too long",
                                       "the password must not be the username",
                                       "the password must not contain control characters"};
    if (utf8_len(pw) < (size_t)c->min_pw)
        return msgs[0];
    if (strlen(pw) > PASSWORD_MAX_BYTES)
        return msgs[1];
    if ((user_raw && !strcmp(pw, user_raw)) || (user && !strcasecmp(pw, user)))
        return msgs[2];
    for (const char *p = pw; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            return msgs[3];
    return NULL;
}

/* ---- the per-address limit -------------------------------------------------- */

/* 16 bytes naming the source: an IPv4 address (mapped or not) in full, an
 * IPv6 address by its /64, since one host commonly holds a whole /64. */
static int
addr_key(const struct sockaddr *sa, unsigned char key[16])
{
    memset(key, 0, 16);
    if (!sa)
        return -1;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)sa;
        key[10] = key[11] = 0xff;
        memcpy(key + 12, &in->sin_addr, 4);
        return 0;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)sa;
        const unsigned char *a = in6->sin6_addr.s6_addr;
        static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (!memcmp(a, mapped, 12))
            memcpy(key, a, 16);
        else
            memcpy(key, a, 8);
        return 0;
    }
    return -1;
}

/* The slot of this address, or NULL; *spare is then a free (or expired)
 * slot, NULL when the table is full of live windows. */
static rate_slot *
rate_find(reg_conf *c, const unsigned char key[16], rate_slot **spare)
{
    double now = xd_now();
    *spare = NULL;
    for (int i = 0; i < RATE_SLOTS; i++) {
        rate_slot *r = &c->slots[i];
        if (r->used && now - r->start >= RATE_WINDOW)
            r->used = 0; /* its hour is over */
        if (r->used && !memcmp(r->addr, key, 16))
            return r;
        if (!r->used && !*spare)
            *spare = r;
    }
    return NULL;
}

/* 1 if this source may register now.  Only successful registrations take
 * a slot, so failed attempts cannot fill the table. */
static int
rate_allows(reg_conf *c, xd_session *s)
{
    unsigned char key[16];
    rate_slot *r, *spare;
    if (c->per_hour <= 0 || addr_key(xd_session_addr(s), key) != 0)
        return 1; /* no limit, or not an IP stream (not on c2s listeners) */
    if ((r = rate_find(c, key, &spare)))
        return r->count < c->per_hour;
    if (!spare) {
        /* thousands of addresses registered this hour: fail closed */
        xd_warn("register: the per-address table is full; refusing registrations");
        return 0;
    }
    return 1;
}

static void
rate_count(reg_conf *c, xd_session *s)
{
    unsigned char key[16];
    rate_slot *r, *spare;
    if (c->per_hour <= 0 || addr_key(xd_session_addr(s), key) != 0)
        return;
    if ((r = rate_find(c, key, &spare))) {
        r->count++;
    } else if (spare) {
        memcpy(spare->addr, key, 16);
        spare->used = 1;
        spare->start = xd_now();
        spare->count = 1;
    }
}

/* ---- before authentication (XEP-0077 3.1) ------------------------------------- */

static void
send_form(xd_session *s, xmpp_stanza_t *iq)
{
    xmpp_stanza_t *r = xd_iq_result(iq);
    xmpp_stanza_t *q = xd_stanza_new("query", NS_REGISTER);
    xmpp_stanza_add_child_ex(
        q, text_child("instructions", "Choose a username and password for use with this service."),
        0);
    xmpp_stanza_add_child_ex(q, text_child("username", NULL), 0);
    xmpp_stanza_add_child_ex(q, text_child("password", NULL), 0);
    xmpp_stanza_add_child_ex(r, q, 0);
    xd_session_send(s, r);
}

static void
do_register(reg_conf *c, xd_session *s, xmpp_stanza_t *iq, xmpp_stanza_t *q)
{
    char *user_raw = child_text(q, "username"), *pw = child_text(q, "password");
    char user[XD_JID_PART_MAX + 1];
    const char *why;
    xd_jid j;
    int r;

    if (xmpp_stanza_get_child_by_name(q, "remove")) {
        send_error(s, iq, "auth", "not-authorized", "log in to cancel a registration");
        goto out;
    }
    if (!user_raw || !pw || !*user_raw || !*pw) {
        send_error(s, iq, "modify", "not-acceptable", "a username and a password are required");
        goto out;
    }
    if (xd_jid_prep_local(user, sizeof(user), user_raw) != 0 || !*user) {
        send_error(s, iq, "modify", "jid-malformed", "this username is not allowed");
        goto out;
    }
    if ((why = password_problem(c, pw, user_raw, user))) {
        send_error(s, iq, "modify", "not-acceptable", why);
        goto out;
    }
    if (!rate_allows(c, s)) {
        send_error(s, iq, "wait", "resource-constraint", "too many registrations; try later");
        goto out;
    }
    memset(&j, 0, sizeof(j));
    snprintf(j.local, sizeof(j.local), "%s", user);
    snprintf(j.domain, sizeof(j.domain), "%s", xd_session_host(s));
    {
        /* Other limits (mod_ratelimit's per-address buckets) have their say. */
        xd_event ev = {.session = s, .from = &j, .addr = xd_session_addr(s)};
        if (xd_hooks_run(XD_HOOK_REGISTER_ATTEMPT, &ev) == XD_DROP) {
            send_error(s, iq, "wait", "resource-constraint", "too many registrations; try later");
            goto out;
        }
    }
    r = xd_account_create(&j, pw);
    if (r == -2) {
        send_error(s, iq, "cancel", "conflict", "this username is taken");
    } else if (r != 0) {
        send_error(s, iq, "wait", "internal-server-error", NULL);
    } else {
        rate_count(c, s);
        xd_info("register: %s registered %s@%s", xd_session_peer(s), j.local, j.domain);
        xd_session_send(s, xd_iq_result(iq));
    }
out:
    free(user_raw);
    free_secret(pw);
}

/* jabber:client stanzas on a stream that is not bound yet. */
static int
reg_element(xd_session *s, xmpp_stanza_t *st, void *data)
{
    reg_conf *c = data;
    const char *type = xmpp_stanza_get_type(st);
    const char *name = xmpp_stanza_get_name(st);
    xmpp_stanza_t *q;

    if (xd_session_is_authenticated(s) || !name || strcmp(name, "iq") != 0 || !type ||
        !(q = xmpp_stanza_get_child_by_name_and_ns(st, "query", NS_REGISTER)))
        return XD_PASS; /* not ours: binding and the rest belong to mod_c2s */
    if (strcmp(type, "get") != 0 && strcmp(type, "set") != 0)
        return XD_PASS;
    if (!xd_session_is_tls(s)) {
        /* unreachable while the core requires STARTTLS; kept as a guard */
        send_error(s, st, "cancel", "not-allowed", "registration needs TLS");
        return XD_HANDLED;
    }
    if (!c->open) {
        send_error(s, st, "cancel", "not-allowed", "in-band registration is disabled");
        return XD_HANDLED;
    }
    if (!strcmp(type, "get"))
        send_form(s, st);
    else
        do_register(c, s, st, q);
    return XD_HANDLED;
}

static void
reg_features(xd_session *s, xmpp_stanza_t *features, void *data)
{
    reg_conf *c = data;
    if (c->open && xd_session_is_tls(s) && !xd_session_is_authenticated(s))
        xmpp_stanza_add_child_ex(features, xd_stanza_new("register", NS_FEATURE), 0);
}

/* ---- after authentication (XEP-0077 3.2, 3.3) ------------------------------------ */

static int
own_request(xd_event *ev)
{
    return ev->session && ev->from && ev->from->local[0] && xd_session_is_bound(ev->session) &&
           !strcmp(ev->from->local, ev->to->local) && !strcmp(ev->from->domain, ev->to->domain);
}

static int
iq_account_set(xd_event *ev, void *data)
{
    reg_conf *c = data;
    xmpp_stanza_t *q = xmpp_stanza_get_child_by_ns(ev->stanza, NS_REGISTER);
    char *user_raw = NULL, *pw = NULL;
    char user[XD_JID_PART_MAX + 1];
    xd_jid bare;
    const char *why;
    int r;

    if (!own_request(ev)) {
        xd_bounce(ev->stanza, "auth", "forbidden", NULL);
        return XD_HANDLED;
    }
    bare = *ev->to;
    xd_jid_to_bare(&bare);
    if (xmpp_stanza_get_child_by_name(q, "remove")) {
        r = xd_account_delete(&bare);
        if (r != 0) {
            send_error(ev->session, ev->stanza, "wait", "internal-server-error", NULL);
            return XD_HANDLED;
        }
        xd_info("register: %s@%s cancelled its registration", bare.local, bare.domain);
        xd_session_send(ev->session, xd_iq_result(ev->stanza));
        xd_close_user_sessions(&bare, "not-authorized", "account removed"); /* 3.2 */
        return XD_HANDLED;
    }
    user_raw = child_text(q, "username");
    pw = child_text(q, "password");
    if (!pw || !*pw) {
        send_error(ev->session, ev->stanza, "modify", "bad-request", "a new password is required");
        goto out;
    }
    if (user_raw &&
        (xd_jid_prep_local(user, sizeof(user), user_raw) != 0 || strcmp(user, bare.local) != 0)) {
        send_error(ev->session, ev->stanza, "modify", "bad-request",
                   "the username is not the account's");
        goto out;
    }
    if ((why = password_problem(c, pw, user_raw, bare.local))) {
        send_error(ev->session, ev->stanza, "modify", "not-acceptable", why);
        goto out;
    }
    r = xd_account_set_password(&bare, pw);
    if (r != 0) {
        send_error(ev->session, ev->stanza, "wait", "internal-server-error", NULL);
        goto out;
    }
    xd_session_send(ev->session, xd_iq_result(ev->stanza));
out:
    free(user_raw);
    free_secret(pw);
    return XD_HANDLED;
}

/* XEP-0077 3.2.1-style answer for a registered user: <registered/> and the username. */
static int
iq_account_get(xd_event *ev, void *data)
{
    xmpp_stanza_t *r, *q;
    (void)data;
    if (!own_request(ev)) {
        xd_bounce(ev->stanza, "auth", "forbidden", NULL);
        return XD_HANDLED;
    }
    r = xd_iq_result(ev->stanza);
    q = xd_stanza_new("query", NS_REGISTER);
    xmpp_stanza_add_child_ex(q, xd_stanza_new("registered", NULL), 0);
    xmpp_stanza_add_child_ex(q, text_child("username", ev->to->local), 0);
    xmpp_stanza_add_child_ex(q, text_child("password", NULL), 0);
    xmpp_stanza_add_child_ex(r, q, 0);
    xd_session_send(ev->session, r);
    return XD_HANDLED;
}

/* ---- the module ------------------------------------------------------------------- */

static const xd_setting reg_settings[] = {
    {"open", XD_SETTING_BOOL},
    {"min_password_length", XD_SETTING_INT},
    {"per_ip_per_hour", XD_SETTING_INT},
    {NULL, 0},
};

static int
reg_load(xd_module *m)
{
    reg_conf *c;
    long long min_pw = xd_config_int(m, "min_password_length", 8);
    long long per_hour = xd_config_int(m, "per_ip_per_hour", 5);
    int r = 0;

    if (min_pw < 1 || min_pw > PASSWORD_MAX_BYTES) {
        xd_config_error(m, "min_password_length", "must be from 1 to %d", PASSWORD_MAX_BYTES);
        return -1;
    }
    if (per_hour < 0 || per_hour > 1000000) {
        xd_config_error(m, "per_ip_per_hour", "must be from 0 (no limit) to 1000000");
        return -1;
    }
    if (!(c = calloc(1, sizeof(*c))))
        return -1;
    c->m = m;
    c->open = xd_config_bool(m, "open", 0);
    c->min_pw = min_pw;
    c->per_hour = per_hour;
    xd_module_set_data(m, c);

    r |= xd_stream_features_add(m, XD_STREAM_C2S, reg_features, c);
    r |= xd_stream_element_register(m, XD_STREAM_C2S, "jabber:client", reg_element, c);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "set", NS_REGISTER, iq_account_set, c);
    r |= xd_iq_register(m, XD_IQ_ACCOUNT, "get", NS_REGISTER, iq_account_get, c);
    r |= xd_disco_add_feature(m, NS_REGISTER);
    return r ? -1 : 0;
}

static void
reg_unload(xd_module *m)
{
    free(xd_module_get_data(m));
}

XD_MODULE(register) = {
    .abi = XD_MODULE_ABI,
    .name = "register",
    .settings = reg_settings,
    .load = reg_load,
    .unload = reg_unload,
};
