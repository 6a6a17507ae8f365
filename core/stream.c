/*
 * The stream layer of a session (RFC 6120 4-5): answers the stream header,
 * offers features, performs STARTTLS, hands stanzas to the router and
 * everything else to the modules, restarts the stream after TLS and SASL,
 * and ends it with the right stream error.  Parsing is in xmlstream.c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/crypto.h>

#include "session.h"

#define NS_STREAMS "http://etherx.jabber.org/streams"
#define NS_STREAM_ERR "urn:ietf:params:xml:ns:xmpp-streams"
#define NS_TLS "urn:ietf:params:xml:ns:xmpp-tls"
#define PROCEED "<proceed xmlns='" NS_TLS "'/>"

static const char *
content_ns(const xd_session *s)
{
    return s->type == XD_STREAM_C2S ? "jabber:client" : "jabber:server";
}

/* ---- our side of the stream ---------------------------------------------------- */

static void
new_stream_id(xd_session *s)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char r[16];
    gnutls_rnd(GNUTLS_RND_NONCE, r, sizeof(r));
    for (int i = 0; i < 16; i++) {
        s->id[2 * i] = hex[r[i] >> 4];
        s->id[2 * i + 1] = hex[r[i] & 15];
    }
    s->id[32] = '\0';
}

void
xd_stream_send_header(xd_session *s)
{
    char buf[1400];
    const char *from = s->host[0] ? s->host : xd_srv.conf.hosts[0].domain;
    int n;

    if (s->initiator) {
        /* RFC 6120 4.7: we open the stream, so we name both ends. */
        n = snprintf(buf, sizeof(buf),
                     "<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                     "xmlns:stream='" NS_STREAMS "' from='%s' to='%s' version='1.0'>",
                     s->host, s->s2s->remote);
        s->header_sent = 1;
        if (n > 0 && (size_t)n < sizeof(buf))
            xd_session_send_raw(s, buf, (size_t)n);
        return;
    }
    if (!s->id[0])
        new_stream_id(s);
    n = snprintf(buf, sizeof(buf),
                 "<?xml version='1.0'?><stream:stream xmlns='%s' xmlns:stream='" NS_STREAMS
                 "' id='%s' from='%s' version='1.0' xml:lang='en'>",
                 content_ns(s), s->id, from);
    s->header_sent = 1;
    if (n > 0 && (size_t)n < sizeof(buf))
        xd_session_send_raw(s, buf, (size_t)n);
}

static size_t
xml_escape(char *out, size_t len, const char *in)
{
    size_t o = 0;
    for (; *in && o + 7 < len; in++) {
        const char *rep = NULL;
        switch (*in) {
        case '<': rep = "&lt;"; break;
        case '>': rep = "&gt;"; break;
        case '&': rep = "&amp;"; break;
        case '\'': rep = "&apos;"; break;
        case '"': rep = "&quot;"; break;
        }
        if (rep) {
            memcpy(out + o, rep, strlen(rep));
            o += strlen(rep);
        } else
            out[o++] = *in;
    }
    out[o] = '\0';
    return o;
}

void
xd_stream_send_error(xd_session *s, const char *cond, const char *text)
{
    char buf[1024], esc[512];
    int n;
    if (!s->header_sent)
        xd_stream_send_header(s); /* RFC 6120 4.9.1.1: a header comes first */
    if (text) {
        xml_escape(esc, sizeof(esc), text);
        n = snprintf(buf, sizeof(buf),
                     "<stream:error><%s xmlns='" NS_STREAM_ERR "'/><text xmlns='" NS_STREAM_ERR
                     "'>%s</text></stream:error></stream:stream>",
                     cond, esc);
    } else
        n = snprintf(buf, sizeof(buf),
                     "<stream:error><%s xmlns='" NS_STREAM_ERR "'/></stream:error></stream:stream>",
                     cond);
    if (n > 0 && (size_t)n < sizeof(buf))
        xd_session_send_raw(s, buf, (size_t)n);
}

static void
send_features(xd_session *s)
{
    xmpp_stanza_t *f = xd_stanza_new("stream:features", NULL);
    if (!f)
        return;
    if (!s->tls_up) {
        /* RFC 6120 5.3.1: TLS first, and nothing else until then. */
        xmpp_stanza_t *tls = xd_stanza_new("starttls", NS_TLS);
        xmpp_stanza_add_child_ex(tls, xd_stanza_new("required", NULL), 0);
        xmpp_stanza_add_child_ex(f, tls, 0);
    } else
        xd_features_fill(s, f);
    xd_session_send(s, f);
}

/* ---- the peer's side: parser callbacks -------------------------------------------- */

/* The answer to a stream we opened: check it, say nothing. */
static const char *
initiator_open(xd_session *s, const char *ns, const char *version)
{
    s->header_received = 1;
    if (!ns || strcmp(ns, "jabber:server") != 0)
        return "invalid-namespace";
    if (!version || atoi(version) < 1)
        return "unsupported-version";
    return NULL;
}

static const char *
on_open(void *ud, const char **attrs, const char *ns)
{
    xd_session *s = ud;
    const char *to = NULL, *from = NULL, *version = NULL;
    char host[XD_JID_PART_MAX + 1];
    xd_event ev = {.session = s};

    for (int i = 0; attrs[i]; i += 2) {
        if (strcmp(attrs[i], "to") == 0)
            to = attrs[i + 1];
        else if (strcmp(attrs[i], "from") == 0)
            from = attrs[i + 1];
        else if (strcmp(attrs[i], "version") == 0)
            version = attrs[i + 1];
    }
    if (s->initiator)
        return initiator_open(s, ns, version);
    s->header_received = 1;
    if (s->type == XD_STREAM_S2S &&
        (!from || xd_jid_prep_domain(s->s2s->stream_from, sizeof(s->s2s->stream_from), from) != 0))
        s->s2s->stream_from[0] = '\0';
    new_stream_id(s);
    if (!to || xd_jid_prep_domain(host, sizeof(host), to) != 0 || !xd_is_local_host(host))
        return "host-unknown";
    if ((s->tls_up || s->authenticated) && s->host[0] && strcmp(host, s->host) != 0)
        return "host-unknown"; /* the restarted stream must be for the same host */
    s->host = xd_config_host(host)->domain; /* a served host: checked above */
    if (!ns || strcmp(ns, content_ns(s)) != 0)
        return "invalid-namespace";
    if (!version || atoi(version) < 1)
        return "unsupported-version";
    xd_stream_send_header(s);
    if (xd_hooks_run(XD_HOOK_STREAM_OPEN, &ev) == XD_DROP)
        return "policy-violation";
    send_features(s);
    if (s->dead || s->closing)
        return "internal-server-error"; /* stop parsing; nothing more is sent */
    return NULL;
}

static int
is_stanza(const xd_session *s, xmpp_stanza_t *st)
{
    const char *name = xmpp_stanza_get_name(st);
    const char *ns = xmpp_stanza_get_ns(st);
    if (!name || !ns || strcmp(ns, content_ns(s)) != 0)
        return 0;
    return !strcmp(name, "message") || !strcmp(name, "presence") || !strcmp(name, "iq");
}

/* An outgoing stream before TLS: STARTTLS is ours to do, and mandatory. */
static void
initiator_pre_tls(xd_session *s, xmpp_stanza_t *st, const char *name, const char *ns)
{
    if (!strcmp(name, "stream:features")) {
        if (xmpp_stanza_get_child_by_name_and_ns(st, "starttls", NS_TLS)) {
            static const char req[] = "<starttls xmlns='" NS_TLS "'/>";
            xd_session_send_raw(s, req, sizeof(req) - 1);
        } else {
            xd_warn("%s: %s does not offer STARTTLS; abandoning the stream", s->peer, s->s2s->remote);
            xd_session_close(s, "policy-violation", "STARTTLS is required");
        }
    } else if (ns && !strcmp(name, "proceed") && !strcmp(ns, NS_TLS)) {
        s->restart = XD_RESTART_TLS;
    } else {
        xd_warn("%s: %s refused STARTTLS (<%s/>)", s->peer, s->s2s->remote, name);
        xd_session_close(s, "policy-violation", "STARTTLS is required");
    }
}

static void
dispatch(xd_session *s, xmpp_stanza_t *st)
{
    const char *name = xmpp_stanza_get_name(st);
    const char *ns = xmpp_stanza_get_ns(st);

    if (!name)
        name = "";
    if (s->initiator) {
        if (!s->tls_up)
            initiator_pre_tls(s, st, name, ns);
        else if (is_stanza(s, st))
            xd_session_close(s, "unsupported-stanza-type", "this stream is one-way");
        else if (xd_element_dispatch(s, st) == XD_PASS)
            xd_session_close(s, "unsupported-stanza-type", name);
        xmpp_stanza_release(st);
        return;
    }
    if (!s->tls_up) {
        if (name && ns && !strcmp(name, "starttls") && !strcmp(ns, NS_TLS)) {
            xd_session_send_raw(s, PROCEED, sizeof(PROCEED) - 1);
            s->restart = XD_RESTART_TLS;
        } else
            xd_session_close(s, "policy-violation", "STARTTLS is required");
        xmpp_stanza_release(st);
        return;
    }
    if (is_stanza(s, st)) {
        if (s->authenticated && (s->bound || s->type == XD_STREAM_S2S)) {
            if (s->type == XD_STREAM_C2S)
                s->stanzas_in++; /* XEP-0198 h of the client */
            xd_route_from(s, st); /* takes st */
            return;
        }
        /* Not routable yet: registration, resource binding, or nothing at all. */
        if (xd_element_dispatch(s, st) == XD_PASS)
            xd_session_close(s, "not-authorized", NULL);
        xmpp_stanza_release(st);
        return;
    }
    if (xd_element_dispatch(s, st) == XD_PASS)
        xd_session_close(s, "unsupported-stanza-type", name);
    xmpp_stanza_release(st);
}

static int
on_element(void *ud, xmpp_stanza_t *el)
{
    xd_session *s = ud;
    if (s->dead || s->closing) {
        xmpp_stanza_release(el); /* the session ended while this was parsed */
        return 1;
    }
    dispatch(s, el);
    return s->restart || s->paused || s->closing || s->dead;
}

static const xd_xmlstream_cb callbacks = {on_open, on_element};

/* ---- input ------------------------------------------------------------------------- */

int
xd_stream_init(xd_session *s)
{
    s->xs = xd_xmlstream_new(xd_srv.ctx, &callbacks, s);
    if (!s->xs)
        return -1;
    xd_xmlstream_set_max(s->xs, xd_srv.conf.max_stanza[s->type]);
    return 0;
}

void
xd_stream_free(xd_session *s)
{
    xd_xmlstream_free(s->xs);
    s->xs = NULL;
}

/* After the element that ended at byte `used` of s->in: a new stream. */
static void
do_restart(xd_session *s, size_t used)
{
    int kind = s->restart;

    s->restart = XD_RESTART_NONE;
    s->header_received = 0;
    s->header_sent = 0; /* the new stream needs its own header, even before an error */
    if (xd_xmlstream_restart(s->xs) != 0) {
        xd_session_kill(s);
        return;
    }
    if (kind == XD_RESTART_TLS) {
        /* RFC 6120 5.4.3.3: whatever followed <starttls/> in the clear is
         * discarded, never parsed.  Reading stops until <proceed/> is out. */
        s->in_len = 0;
        s->in_pending = 0;
        ev_io_stop(xd_srv.loop, &s->rio);
        if (s->out_len == 0)
            xd_session_start_tls(s);
        else
            s->tls_start_after_flush = 1;
        return;
    }
    if (s->initiator)
        xd_stream_send_header(s); /* after SASL we speak first */
    /* SASL success: the next stream header may already be here. */
    if (used > s->in_len)
        used = s->in_len;
    memmove(s->in, s->in + used, s->in_len - used);
    s->in_len -= used;
    s->in_pending = s->in_len > 0;
}

void
xd_stream_input(xd_session *s)
{
    while (!s->dead && !s->closing && !s->paused) {
        size_t used = 0;
        int r;
        if (s->suspended)
            r = xd_xmlstream_resume(s->xs, &used);
        else if (s->in_pending) {
            s->in_pending = 0;
            r = xd_xmlstream_feed(s->xs, s->in, s->in_len, &used);
        } else
            return;
        s->suspended = 0;
        switch (r) {
        case XD_XS_DONE:
            break;
        case XD_XS_CLOSED:
            xd_debug("%s: stream closed by peer", s->peer);
            xd_session_close(s, NULL, NULL);
            return;
        case XD_XS_ERROR:
            xd_session_close(s, xd_xmlstream_error(s->xs), NULL);
            return;
        case XD_XS_STOPPED:
            if (s->restart && !s->dead && !s->closing)
                do_restart(s, used);
            else
                s->suspended = 1; /* paused: resume inside the same bytes later */
            break;
        }
    }
}

void
xd_stream_set_max_stanza_size(xd_stream_type type, size_t bytes)
{
    if ((unsigned)type <= XD_STREAM_S2S && bytes >= 4096)
        xd_srv.conf.max_stanza[type] = bytes;
}
