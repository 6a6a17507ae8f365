/*
 * mod_oot_hello: an out-of-tree test module, built only against the
 * installed public headers (pkg-config xmppd).
 *
 * It declares one setting, `greeting` (string), counts the client sessions
 * it has seen start (XD_HOOK_SESSION_START) and answers
 *
 *   <iq type='get' to='DOMAIN'><hello xmlns='urn:xmppd:test:hello'/></iq>
 *
 * with
 *
 *   <iq type='result'><hello xmlns='urn:xmppd:test:hello' sessions='N'>GREETING</hello></iq>
 *
 * so a test proves that the module loaded, read its setting, that its hook
 * ran and that its IQ handler ran.
 */
#include <xmppd/module.h>

#define HELLO_NS "urn:xmppd:test:hello"

typedef struct hello_state {
    const char *greeting;   /* owned by the core's config */
    unsigned long sessions; /* XD_HOOK_SESSION_START events seen */
} hello_state;

static hello_state state;

static const xd_setting hello_settings[] = {
    {"greeting", XD_SETTING_STRING},
    {NULL, 0},
};

/* Decimal representation of v into buf (at least 21 bytes). */
static const char *ulong_str(unsigned long v, char *buf, size_t len)
{
    char *p = buf + len - 1;
    *p = '\0';
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v && p > buf);
    return p;
}

static int on_session_start(xd_event *ev, void *data)
{
    hello_state *st = data;
    (void)ev;
    st->sessions++;
    return XD_PASS;
}

static int on_hello(xd_event *ev, void *data)
{
    hello_state *st = data;
    xmpp_ctx_t *ctx = xd_ctx();
    xmpp_stanza_t *res, *hello, *text;
    char num[32];

    res = xd_iq_result(ev->stanza);
    if (!res) {
        xd_bounce(ev->stanza, "wait", "internal-server-error", NULL);
        return XD_HANDLED;
    }
    hello = xd_stanza_new("hello", HELLO_NS);
    text = xmpp_stanza_new(ctx);
    if (!hello || !text) {
        if (hello)
            xmpp_stanza_release(hello);
        if (text)
            xmpp_stanza_release(text);
        xmpp_stanza_release(res);
        xd_bounce(ev->stanza, "wait", "internal-server-error", NULL);
        return XD_HANDLED;
    }
    xmpp_stanza_set_attribute(hello, "sessions", ulong_str(st->sessions, num, sizeof num));
    xmpp_stanza_set_text(text, st->greeting);
    xmpp_stanza_add_child_ex(hello, text, 0); /* hello takes text */
    xmpp_stanza_add_child_ex(res, hello, 0);  /* res takes hello */

    xd_debug("oot_hello: answering %s (sessions=%lu)",
             ev->session ? xd_session_peer(ev->session) : "(internal)", st->sessions);
    xd_route(res); /* takes res */
    return XD_HANDLED;
}

static int hello_load(xd_module *m)
{
    state.greeting = xd_config_string(m, "greeting", "hello");
    state.sessions = 0;
    xd_module_set_data(m, &state);

    if (xd_hook(m, XD_HOOK_SESSION_START, on_session_start, &state, XD_PRIO_DEFAULT) != 0)
        return -1;
    if (xd_iq_register(m, XD_IQ_HOST, "get", HELLO_NS, on_hello, &state) != 0)
        return -1;
    xd_disco_add_feature(m, HELLO_NS); /* advertised; not needed by the test */
    xd_info("oot_hello: loaded, greeting \"%s\"", state.greeting);
    return 0;
}

static void hello_unload(xd_module *m)
{
    (void)m;
    state.greeting = NULL;
}

XD_MODULE(oot_hello) = {
    .abi = XD_MODULE_ABI,
    .name = "oot_hello",
    .settings = hello_settings,
    .load = hello_load,
    .unload = hello_unload,
};
