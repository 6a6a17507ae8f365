/*
 * mod_smacks: XEP-0198 Stream Management for client streams.
 *
 *  - 3 / 4: <enable/> after resource binding, <r/> and <a h/> in both
 *    directions.  h counts stanzas (message, presence, iq) modulo 2^32; an
 *    ack for more than we sent is the stream error of section 4.
 *  - 5: resumption.  With <enable resume='true'/> the core keeps the session
 *    bound when its connection drops without </stream:stream> (a "detached"
 *    session) for resume_timeout seconds; a new stream of the same account
 *    sends <resume previd h/> before binding, takes the session over, and
 *    gets what it had not acknowledged again, in order; then
 *    XD_HOOK_SESSION_RESUMED runs for modules whose session data moved.
 *  - 5 (end): what a session never acknowledged is treated as undelivered:
 *    when it ends (timeout, error, clean close), each unacknowledged
 *    <message/> is routed again with its original from/to, so that offline
 *    storage (or a bounce) takes it.  It is routed with XD_EVENT_REROUTED:
 *    the server handled it once already (archived it, copied it to the
 *    user's other resources), and the stanza-id it carries is the server's.
 *
 * Outgoing stanzas are seen through XD_HOOK_STANZA_OUT (a copy is queued);
 * incoming ones are counted by the core (xd_session_stanzas_in).  An <a/>
 * (and the h of <resumed/>) says the server has taken responsibility for
 * those stanzas, so it is written only once everything they caused to be
 * stored is durable (xd_session_send_durable): a crash after it loses none.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xmppd/module.h>

#define NS_SM "urn:xmpp:sm:3"
/* Ask for an ack after this many stanzas by default: many clients (profanity)
 * ack only when asked, and a queue nobody asks about only grows until
 * max_queue ends the stream. */
#define REQUEST_EVERY 5
#define NS_STANZAS "urn:ietf:params:xml:ns:xmpp-stanzas"
#define NS_STREAMS_ERR "urn:ietf:params:xml:ns:xmpp-streams"

typedef struct sm_item {
    xmpp_stanza_t *st;
    struct sm_item *next;
} sm_item;

typedef struct sm_state sm_state;

typedef struct sm_mod {
    xd_module *m;
    long long resume_timeout; /* seconds a lost session waits for its client */
    long long request_every;  /* send <r/> after this many unacked stanzas; 0 never */
    long long max_queue;      /* unacked stanzas kept before the stream is closed */
    sm_state *all;            /* every session with SM enabled: previd lookup */
    unsigned serial;          /* makes ids unique even without /dev/urandom */
} sm_mod;

/* One session's stream management, per-session module data.  It moves with
 * the session when another stream resumes it (xd_session_resume). */
struct sm_state {
    sm_mod *mod;       /* NULL once the module is unloaded */
    xd_session *s;
    int resumable;
    uint32_t h_out;    /* stanzas sent to the client since <enable/> */
    uint32_t acked;    /* the client's last h */
    unsigned in_base;  /* xd_session_stanzas_in() at <enable/> */
    unsigned since_r;  /* stanzas sent since our last <r/> */
    sm_item *head, *tail;
    char id[40];
    sm_state *next, *prev;
};

static const xd_setting sm_settings[] = {
    {"resume_timeout", XD_SETTING_INT},
    {"request_every", XD_SETTING_INT},
    {"max_queue", XD_SETTING_INT},
    {NULL, 0},
};

static void
queue_clear(sm_state *st)
{
    while (st->head) {
        sm_item *it = st->head;
        st->head = it->next;
        xmpp_stanza_release(it->st);
        free(it);
    }
    st->tail = NULL;
}

static void
sm_state_free(void *p)
{
    sm_state *st = p;
    if (st->mod) {
        if (st->prev)
            st->prev->next = st->next;
        else
            st->mod->all = st->next;
        if (st->next)
            st->next->prev = st->prev;
    }
    queue_clear(st);
    free(st);
}

static uint32_t
h_in(const sm_state *st)
{
    return (uint32_t)(xd_session_stanzas_in(st->s) - st->in_base);
}

static void
new_id(sm_mod *sm, char *out, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char r[16] = {0};
    FILE *f = fopen("/dev/urandom", "rb");
    size_t n = 0;
    if (f) {
        n = fread(r, 1, sizeof(r), f);
        fclose(f);
    }
    if (n != sizeof(r)) {
        /* Uniqueness is what matters: a resume is only for the same account. */
        snprintf(out, len, "sm-%u-%.0f", ++sm->serial, xd_now() * 1000);
        return;
    }
    for (size_t i = 0; i < sizeof(r) && 2 * i + 2 < len; i++) {
        out[2 * i] = hex[r[i] >> 4];
        out[2 * i + 1] = hex[r[i] & 15];
        out[2 * i + 2] = '\0';
    }
}

/* durable: the nonza acknowledges stanzas (<a/>, <resumed/>), so it waits
 * until what they stored is on disk. */
static void
write_nonza(xd_session *s, xmpp_stanza_t *el, int durable)
{
    char *buf = NULL;
    size_t len = 0;
    if (xmpp_stanza_to_text(el, &buf, &len) == XMPP_EOK) {
        if (durable)
            xd_session_send_durable(s, buf, len);
        else
            xd_session_send_raw(s, buf, len);
        xmpp_free(xd_ctx(), buf);
    }
    xmpp_stanza_release(el);
}

static void
send_nonza(xd_session *s, xmpp_stanza_t *el)
{
    write_nonza(s, el, 0);
}

static void
send_failed(xd_session *s, const char *cond)
{
    xmpp_stanza_t *f = xd_stanza_new("failed", NS_SM);
    xmpp_stanza_add_child_ex(f, xd_stanza_new(cond, NS_STANZAS), 0);
    send_nonza(s, f);
}

/* h as a decimal 32-bit unsigned, nothing else. */
static int
parse_h(const char *v, uint32_t *out)
{
    unsigned long long n = 0;
    if (!v || !*v || strlen(v) > 10)
        return -1;
    for (; *v; v++) {
        if (*v < '0' || *v > '9')
            return -1;
        n = n * 10 + (unsigned)(*v - '0');
    }
    if (n > UINT32_MAX)
        return -1;
    *out = (uint32_t)n;
    return 0;
}

/*
 * The client has handled h stanzas: forget them.  -1 if h acknowledges more
 * than we sent (section 4: handled-count-too-high), with nothing changed.
 */
static int
ack(sm_state *st, uint32_t h)
{
    uint32_t n = h - st->acked;
    if (n > st->h_out - st->acked)
        return -1;
    for (; n > 0 && st->head; n--) {
        sm_item *it = st->head;
        st->head = it->next;
        if (!st->head)
            st->tail = NULL;
        xmpp_stanza_release(it->st);
        free(it);
    }
    st->acked = h;
    return 0;
}

/* Section 4: undefined-condition with <handled-count-too-high/>. */
static void
too_high(xd_session *s, sm_state *st, uint32_t h)
{
    char buf[400];
    int n = snprintf(buf, sizeof(buf),
                     "<stream:error><undefined-condition xmlns='" NS_STREAMS_ERR
                     "'/><handled-count-too-high xmlns='" NS_SM
                     "' h='%u' send-count='%u'/></stream:error>",
                     (unsigned)h, (unsigned)st->h_out);
    xd_info("%s: acknowledged %u stanzas, %u were sent", xd_session_peer(s), (unsigned)h,
            (unsigned)st->h_out);
    if (n > 0 && (size_t)n < sizeof(buf))
        xd_session_send_raw(s, buf, (size_t)n);
    xd_session_close(s, NULL, NULL); /* only </stream:stream> after our error */
}

static void
send_request(xd_session *s)
{
    static const char r[] = "<r xmlns='" NS_SM "'/>";
    xd_session_send_raw(s, r, sizeof(r) - 1);
}

/* ---- outgoing stanzas -------------------------------------------------------- */

/* XD_HOOK_STANZA_OUT: about 30 instructions without stream management, a
 * stanza copy (a few hundred) with it. */
static int
stanza_out(xd_event *ev, void *data)
{
    sm_mod *sm = data;
    sm_state *st = xd_session_get_data(ev->session, sm->m);
    sm_item *it;

    if (!st || !ev->stanza)
        return XD_PASS;
    /* Our <r/> asks about what went before this stanza; it is still to be written. */
    if (sm->request_every > 0 && st->since_r >= (unsigned long long)sm->request_every &&
        !xd_session_is_detached(ev->session)) {
        st->since_r = 0;
        send_request(ev->session);
    }
    if (!(it = calloc(1, sizeof(*it))) || !(it->st = xmpp_stanza_copy(ev->stanza))) {
        free(it);
        /* Unqueued, the count would lie to the client: end the stream. */
        xd_session_close(ev->session, "internal-server-error", NULL);
        return XD_PASS;
    }
    if (st->tail)
        st->tail->next = it;
    else
        st->head = it;
    st->tail = it;
    st->h_out++;
    st->since_r++;
    if ((unsigned long long)(st->h_out - st->acked) > (unsigned long long)sm->max_queue)
        xd_session_close(ev->session, "resource-constraint", "too many unacknowledged stanzas");
    return XD_PASS;
}

/* Section 5: unacknowledged messages are undelivered.  The stream is gone
 * and unbound, so routing finds another resource or offline storage. */
static int
stream_closed(xd_event *ev, void *data)
{
    sm_mod *sm = data;
    sm_state *st = xd_session_get_data(ev->session, sm->m);
    int n = 0;

    if (!st)
        return XD_PASS;
    st->resumable = 0;
    for (sm_item *it = st->head; it; it = it->next) {
        const char *name = xmpp_stanza_get_name(it->st);
        if (name && strcmp(name, "message") == 0) {
            /* flagged: archives and carbons handled it on its first pass */
            xd_route_flags(xmpp_stanza_copy(it->st), XD_EVENT_REROUTED);
            n++;
        }
    }
    if (n)
        xd_info("%s: %d unacknowledged message(s) routed again", xd_session_peer(ev->session), n);
    queue_clear(st);
    st->acked = st->h_out;
    return XD_PASS;
}

/* The session ends for good: no resuming it from here on. */
static int
session_end(xd_event *ev, void *data)
{
    sm_mod *sm = data;
    sm_state *st = xd_session_get_data(ev->session, sm->m);
    if (st)
        st->resumable = 0;
    return XD_PASS;
}

/* ---- nonzas -------------------------------------------------------------------- */

static int
do_enable(sm_mod *sm, xd_session *s, xmpp_stanza_t *el)
{
    const char *resume = xmpp_stanza_get_attribute(el, "resume");
    sm_state *st;
    xmpp_stanza_t *ok;
    char max[32];

    if (!xd_session_is_bound(s) || xd_session_get_data(s, sm->m)) {
        send_failed(s, "unexpected-request"); /* section 3: before bind, or twice */
        return XD_HANDLED;
    }
    if (!(st = calloc(1, sizeof(*st)))) {
        send_failed(s, "internal-server-error");
        return XD_HANDLED;
    }
    st->mod = sm;
    st->s = s;
    st->in_base = xd_session_stanzas_in(s);
    st->resumable = resume && (!strcmp(resume, "true") || !strcmp(resume, "1")) &&
                    sm->resume_timeout > 0;
    new_id(sm, st->id, sizeof(st->id));
    st->next = sm->all;
    if (st->next)
        st->next->prev = st;
    sm->all = st;
    xd_session_set_data(s, sm->m, st, sm_state_free);

    ok = xd_stanza_new("enabled", NS_SM);
    if (st->resumable) {
        snprintf(max, sizeof(max), "%lld", sm->resume_timeout);
        xmpp_stanza_set_attribute(ok, "id", st->id);
        xmpp_stanza_set_attribute(ok, "resume", "true");
        xmpp_stanza_set_attribute(ok, "max", max);
        xd_session_set_resumable(s, (double)sm->resume_timeout);
    }
    send_nonza(s, ok);
    return XD_HANDLED;
}

static int
do_resume(sm_mod *sm, xd_session *s, xmpp_stanza_t *el)
{
    const char *previd = xmpp_stanza_get_attribute(el, "previd");
    const xd_jid *me = xd_session_jid(s);
    sm_state *st;
    sm_item *rest;
    uint32_t h, h_old;
    char hbuf[16];
    xmpp_stanza_t *ok;

    if (!xd_session_is_authenticated(s) || xd_session_is_bound(s)) {
        send_failed(s, "unexpected-request");
        return XD_HANDLED;
    }
    if (parse_h(xmpp_stanza_get_attribute(el, "h"), &h) != 0) {
        send_failed(s, "bad-request");
        return XD_HANDLED;
    }
    for (st = sm->all; st; st = st->next) {
        const xd_jid *them;
        if (!previd || !st->resumable || strcmp(st->id, previd) != 0)
            continue;
        them = xd_session_jid(st->s);
        /* Only the same account may take a session over. */
        if (xd_session_is_bound(st->s) && !strcmp(them->local, me->local) &&
            !strcmp(them->domain, me->domain))
            break;
    }
    if (!st) {
        xd_info("%s: resumption of unknown or expired session refused", xd_session_peer(s));
        send_failed(s, "item-not-found");
        return XD_HANDLED;
    }
    if ((uint32_t)(h - st->acked) > st->h_out - st->acked) {
        too_high(s, st, h);
        return XD_HANDLED;
    }
    h_old = h_in(st);
    if (xd_session_resume(s, st->s) != 0) {
        send_failed(s, "item-not-found");
        return XD_HANDLED;
    }
    st->s = s; /* the state came along with the session's data */
    ack(st, h);

    ok = xd_stanza_new("resumed", NS_SM);
    snprintf(hbuf, sizeof(hbuf), "%u", (unsigned)h_old);
    xmpp_stanza_set_attribute(ok, "previd", st->id);
    xmpp_stanza_set_attribute(ok, "h", hbuf);
    write_nonza(s, ok, 1); /* what follows it waits behind it */

    /* Send again, in order, what was not acknowledged; the STANZA_OUT hook
     * queues and counts each one afresh from h. */
    rest = st->head;
    st->head = st->tail = NULL;
    st->h_out = st->acked;
    st->since_r = 0;
    while (rest) {
        sm_item *it = rest;
        rest = it->next;
        xd_session_send(s, it->st);
        free(it);
    }
    /* Modules that moved with the session (mod_csi) act after all of this;
     * not if sending ended the session (SESSION_END ran instead). */
    if (xd_session_is_bound(s)) {
        xd_event ev = {.session = s, .from = xd_session_jid(s)};
        xd_hooks_run(XD_HOOK_SESSION_RESUMED, &ev);
    }
    return XD_HANDLED;
}

static int
sm_element(xd_session *s, xmpp_stanza_t *el, void *data)
{
    sm_mod *sm = data;
    const char *name = xmpp_stanza_get_name(el);
    sm_state *st = xd_session_get_data(s, sm->m);
    uint32_t h;

    if (!name)
        return XD_PASS;
    if (!strcmp(name, "enable"))
        return do_enable(sm, s, el);
    if (!strcmp(name, "resume"))
        return do_resume(sm, s, el);
    if (!st)
        return XD_PASS; /* <r/> and <a/> only after <enable/>: a stream error */
    if (!strcmp(name, "r")) {
        xmpp_stanza_t *a = xd_stanza_new("a", NS_SM);
        char buf[16];
        snprintf(buf, sizeof(buf), "%u", (unsigned)h_in(st));
        xmpp_stanza_set_attribute(a, "h", buf);
        write_nonza(s, a, 1); /* "handled" means stored: after the disk */
        return XD_HANDLED;
    }
    if (!strcmp(name, "a")) {
        if (parse_h(xmpp_stanza_get_attribute(el, "h"), &h) != 0) {
            xd_session_close(s, "invalid-xml", "bad h in <a/>");
            return XD_HANDLED;
        }
        if (ack(st, h) != 0)
            too_high(s, st, h);
        return XD_HANDLED;
    }
    return XD_PASS;
}

static void
sm_features(xd_session *s, xmpp_stanza_t *features, void *data)
{
    (void)data;
    if (xd_session_is_authenticated(s))
        xmpp_stanza_add_child_ex(features, xd_stanza_new("sm", NS_SM), 0);
}

/* ---- module ------------------------------------------------------------------------ */

static int
sm_load(xd_module *m)
{
    sm_mod *sm = calloc(1, sizeof(*sm));
    int r = 0;

    if (!sm)
        return -1;
    sm->m = m;
    sm->resume_timeout = xd_config_int(m, "resume_timeout", 300);
    sm->request_every = xd_config_int(m, "request_every", REQUEST_EVERY);
    sm->max_queue = xd_config_int(m, "max_queue", 1000);
    if (sm->resume_timeout < 0 || sm->resume_timeout > 86400) {
        xd_config_error(m, "resume_timeout", "must be 0 to 86400 seconds");
        free(sm);
        return -1;
    }
    if (sm->request_every < 0 || sm->request_every > 100000) {
        xd_config_error(m, "request_every", "must be 0 to 100000");
        free(sm);
        return -1;
    }
    if (sm->max_queue < 1 || sm->max_queue > 1000000) {
        xd_config_error(m, "max_queue", "must be 1 to 1000000");
        free(sm);
        return -1;
    }
    xd_module_set_data(m, sm);
    r |= xd_stream_features_add(m, XD_STREAM_C2S, sm_features, sm);
    r |= xd_stream_element_register(m, XD_STREAM_C2S, NS_SM, sm_element, sm);
    r |= xd_hook(m, XD_HOOK_STANZA_OUT, stanza_out, sm, XD_PRIO_DEFAULT);
    r |= xd_hook(m, XD_HOOK_SESSION_END, session_end, sm, XD_PRIO_FIRST);
    r |= xd_hook(m, XD_HOOK_STREAM_CLOSED, stream_closed, sm, XD_PRIO_DEFAULT);
    return r ? -1 : 0;
}

static void
sm_unload(xd_module *m)
{
    sm_mod *sm = xd_module_get_data(m);
    if (!sm)
        return;
    for (sm_state *st = sm->all; st; st = st->next)
        st->mod = NULL; /* sessions outliving us must not touch the list */
    free(sm);
}

XD_MODULE(smacks) = {
    .abi = XD_MODULE_ABI,
    .name = "smacks",
    .settings = sm_settings,
    .load = sm_load,
    .unload = sm_unload,
};
