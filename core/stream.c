/*
 * Stream framing (RFC 6120 4): an expat parser, fed incrementally, builds
 * one libstrophe stanza per top-level element.  The parser suspends after
 * each element so the stream can restart (STARTTLS, SASL) at exactly the
 * right byte.  Restricted XML (RFC 6120 11.1: DTDs, entity declarations,
 * comments, processing instructions) and oversized stanzas end the stream.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/crypto.h>

#include "session.h"

#define NS_STREAMS "http://etherx.jabber.org/streams"
#define NS_STREAM_ERR "urn:ietf:params:xml:ns:xmpp-streams"
#define NS_TLS "urn:ietf:params:xml:ns:xmpp-tls"
#define NS_XML "http://www.w3.org/XML/1998/namespace"
#define SEP '\x01' /* between namespace URI, local name and prefix */

static void parser_abort(xd_session *s, const char *cond);

/* ---- building stanzas ------------------------------------------------------ */

static int
text_flush(xd_session *s)
{
    xmpp_stanza_t *t;
    if (!s->text_len || s->depth < 2)
        return 0;
    if (!(t = xmpp_stanza_new(xd_ctx())))
        return -1;
    xmpp_stanza_set_text_with_size(t, s->text, s->text_len);
    xmpp_stanza_add_child_ex(s->stack[s->depth], t, 0);
    s->text_len = 0;
    return 0;
}

/* The effective namespace of the element at depth d. */
static const char *
ns_at(xd_session *s, int d)
{
    for (; d >= 2; d--) {
        const char *ns = xmpp_stanza_get_ns(s->stack[d]);
        if (ns)
            return ns;
    }
    return s->stream_ns ? s->stream_ns : "";
}

/* Split "uri SEP local [SEP prefix]" (or a plain "local") in place. */
static void
split_name(char *buf, const char **uri, const char **local, const char **prefix)
{
    char *a = strchr(buf, SEP), *b;
    *prefix = NULL;
    if (!a) {
        *uri = NULL;
        *local = buf;
        return;
    }
    *a++ = '\0';
    *uri = buf;
    *local = a;
    if ((b = strchr(a, SEP))) {
        *b++ = '\0';
        *prefix = b;
    }
}

static int
set_attributes(xd_session *s, xmpp_stanza_t *st, const char **attrs)
{
    char buf[1024];
    for (; attrs[0]; attrs += 2) {
        const char *uri, *local, *prefix;
        if (strlen(attrs[0]) >= sizeof(buf) - 8) {
            parser_abort(s, "policy-violation");
            return -1;
        }
        strcpy(buf, attrs[0]);
        split_name(buf, &uri, &local, &prefix);
        if (!uri) {
            xmpp_stanza_set_attribute(st, local, attrs[1]);
        } else if (strcmp(uri, NS_XML) == 0) {
            char name[1040];
            snprintf(name, sizeof(name), "xml:%s", local);
            xmpp_stanza_set_attribute(st, name, attrs[1]);
        } else {
            /* Keep a namespaced attribute with its prefix, and declare it. */
            char name[1040], decl[1040];
            if (!prefix)
                prefix = "ns1";
            snprintf(name, sizeof(name), "%s:%s", prefix, local);
            snprintf(decl, sizeof(decl), "xmlns:%s", prefix);
            xmpp_stanza_set_attribute(st, name, attrs[1]);
            xmpp_stanza_set_attribute(st, decl, uri);
        }
    }
    return 0;
}

static int
over_limit(xd_session *s)
{
    long long now = XML_GetCurrentByteIndex(s->parser);
    return now - s->mark > (long long)xd_srv.conf.max_stanza[s->type];
}

/* ---- the stream header ------------------------------------------------------- */

static void new_stream_id(xd_session *s);

void
xd_stream_send_header(xd_session *s)
{
    char buf[1400];
    int n;
    if (!s->id[0])
        new_stream_id(s);
    n = snprintf(buf, sizeof(buf),
                     "<?xml version='1.0'?><stream:stream xmlns='%s' "
                     "xmlns:stream='" NS_STREAMS "' id='%s' from='%s' version='1.0' "
                     "xml:lang='en'>",
                     s->type == XD_STREAM_C2S ? "jabber:client" : "jabber:server", s->id,
                     s->host[0] ? s->host : (xd_srv.conf.nhosts ? xd_srv.conf.hosts[0].domain : ""));
    s->header_sent = 1;
    if (n > 0 && (size_t)n < sizeof(buf))
        xd_session_send_raw(s, buf, (size_t)n);
}

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

static void
send_features(xd_session *s)
{
    xmpp_stanza_t *f = xd_stanza_new("stream:features", NULL);
    if (!f)
        return;
    if (!s->tls_up) {
        xmpp_stanza_t *tls = xd_stanza_new("starttls", NS_TLS);
        xmpp_stanza_t *req = xd_stanza_new("required", NULL);
        xmpp_stanza_add_child_ex(tls, req, 0);
        xmpp_stanza_add_child_ex(f, tls, 0);
    } else
        xd_features_fill(s, f);
    xd_session_send(s, f);
}

static void
stream_open(xd_session *s, const char **attrs)
{
    const char *to = NULL, *version = NULL;
    char host[XD_JID_PART_MAX + 1];
    xd_event ev = {.session = s};

    for (int i = 0; attrs[i]; i += 2) {
        if (strcmp(attrs[i], "to") == 0)
            to = attrs[i + 1];
        else if (strcmp(attrs[i], "version") == 0)
            version = attrs[i + 1];
    }
    s->header_received = 1;
    new_stream_id(s);
    if (!to || xd_jid_prep_domain(host, sizeof(host), to) != 0 || !xd_is_local_host(host)) {
        parser_abort(s, "host-unknown");
        return;
    }
    if (s->authenticated && strcmp(host, s->host) != 0) {
        parser_abort(s, "host-unknown");
        return;
    }
    memcpy(s->host, host, strlen(host) + 1);
    if (!s->stream_ns ||
        strcmp(s->stream_ns, s->type == XD_STREAM_C2S ? "jabber:client" : "jabber:server") != 0) {
        parser_abort(s, "invalid-namespace");
        return;
    }
    if (!version || atoi(version) < 1) {
        parser_abort(s, "unsupported-version");
        return;
    }
    xd_stream_send_header(s);
    if (xd_hooks_run(XD_HOOK_STREAM_OPEN, &ev) == XD_DROP) {
        parser_abort(s, "policy-violation");
        return;
    }
    send_features(s);
}

/* ---- expat callbacks ----------------------------------------------------------- */

static void
parser_abort(xd_session *s, const char *cond)
{
    if (!s->err_cond)
        s->err_cond = cond;
    XML_StopParser(s->parser, XML_FALSE);
}

static void XMLCALL
on_start(void *ud, const char *name, const char **attrs)
{
    xd_session *s = ud;
    char buf[1024];
    const char *uri, *local, *prefix;
    xmpp_stanza_t *st;

    if (s->err_cond)
        return;
    if (strlen(name) >= sizeof(buf)) {
        parser_abort(s, "policy-violation");
        return;
    }
    strcpy(buf, name);
    split_name(buf, &uri, &local, &prefix);
    if (s->depth == 0) {
        if (!uri || strcmp(uri, NS_STREAMS) != 0 || strcmp(local, "stream") != 0) {
            parser_abort(s, "invalid-namespace");
            return;
        }
        s->depth = 1; /* depth counts the stream element too: stanzas are at 2 */
        stream_open(s, attrs);
        s->mark = XML_GetCurrentByteIndex(s->parser) + XML_GetCurrentByteCount(s->parser);
        return;
    }
    if (s->depth >= XD_DEPTH_MAX) {
        parser_abort(s, "policy-violation");
        return;
    }
    if (s->depth == 1)
        s->mark = XML_GetCurrentByteIndex(s->parser);
    else if (over_limit(s)) {
        parser_abort(s, "policy-violation");
        return;
    } else if (text_flush(s) != 0) {
        parser_abort(s, "internal-server-error");
        return;
    }
    if (!(st = xmpp_stanza_new(xd_ctx()))) {
        parser_abort(s, "internal-server-error");
        return;
    }
    if (uri && strcmp(uri, NS_STREAMS) == 0) {
        /* <stream:features/>, <stream:error/>: keep the prefix */
        char pname[1040];
        snprintf(pname, sizeof(pname), "stream:%s", local);
        xmpp_stanza_set_name(st, pname);
    } else {
        xmpp_stanza_set_name(st, local);
        if (uri && (s->depth == 1 || strcmp(uri, ns_at(s, s->depth)) != 0))
            xmpp_stanza_set_ns(st, uri);
        else if (!uri && s->depth > 1 && *ns_at(s, s->depth))
            xmpp_stanza_set_ns(st, ""); /* xmlns='' undeclares the default */
    }
    if (set_attributes(s, st, attrs) != 0) {
        xmpp_stanza_release(st);
        return;
    }
    if (s->depth > 1)
        xmpp_stanza_add_child_ex(s->stack[s->depth], st, 0);
    s->stack[++s->depth] = st;
}

static void XMLCALL
on_end(void *ud, const char *name)
{
    xd_session *s = ud;
    (void)name;
    if (s->err_cond)
        return;
    if (s->depth == 1) {
        /* </stream:stream>: the peer is done. */
        s->depth = 0;
        s->restart = 0;
        s->err_cond = "";
        XML_StopParser(s->parser, XML_FALSE);
        return;
    }
    if (text_flush(s) != 0) {
        parser_abort(s, "internal-server-error");
        return;
    }
    if (--s->depth == 1) {
        if (over_limit(s)) {
            parser_abort(s, "policy-violation");
            return;
        }
        s->ready = s->stack[2];
        s->stack[2] = NULL;
        s->consumed = XML_GetCurrentByteIndex(s->parser) + XML_GetCurrentByteCount(s->parser);
        s->mark = s->consumed;
        XML_StopParser(s->parser, XML_TRUE);
    }
}

static void XMLCALL
on_text(void *ud, const char *text, int len)
{
    xd_session *s = ud;
    if (s->err_cond || s->depth < 2)
        return; /* whitespace between stanzas is a keepalive */
    if (over_limit(s)) {
        parser_abort(s, "policy-violation");
        return;
    }
    if (s->text_len + (size_t)len > s->text_cap) {
        size_t cap = s->text_cap ? s->text_cap : 256;
        char *p;
        while (cap < s->text_len + (size_t)len)
            cap *= 2;
        if (!(p = realloc(s->text, cap))) {
            parser_abort(s, "internal-server-error");
            return;
        }
        s->text = p;
        s->text_cap = cap;
    }
    memcpy(s->text + s->text_len, text, (size_t)len);
    s->text_len += (size_t)len;
}

static void XMLCALL
on_ns_start(void *ud, const char *prefix, const char *uri)
{
    xd_session *s = ud;
    if (s->depth == 0 && !prefix && uri && !s->stream_ns)
        s->stream_ns = strdup(uri);
}

static void XMLCALL
on_doctype(void *ud, const char *name, const char *sysid, const char *pubid, int internal)
{
    (void)name;
    (void)sysid;
    (void)pubid;
    (void)internal;
    parser_abort(ud, "restricted-xml");
}

static void XMLCALL
on_entity(void *ud, const char *name, int pe, const char *value, int vlen, const char *base,
          const char *sysid, const char *pubid, const char *notation)
{
    (void)name, (void)pe, (void)value, (void)vlen, (void)base, (void)sysid, (void)pubid,
        (void)notation;
    parser_abort(ud, "restricted-xml");
}

static void XMLCALL
on_comment(void *ud, const char *data)
{
    (void)data;
    parser_abort(ud, "restricted-xml");
}

static void XMLCALL
on_pi(void *ud, const char *target, const char *data)
{
    (void)target;
    (void)data;
    parser_abort(ud, "restricted-xml");
}

/* ---- parser lifecycle ----------------------------------------------------------- */

static void
parser_drop_tree(xd_session *s)
{
    if (s->stack[2]) /* an unfinished stanza; deeper entries are its children */
        xmpp_stanza_release(s->stack[2]);
    memset(s->stack, 0, sizeof(s->stack));
    if (s->ready)
        xmpp_stanza_release(s->ready);
    s->ready = NULL;
    s->depth = 0;
    s->text_len = 0;
}

int
xd_stream_init(xd_session *s)
{
    if (s->parser) {
        XML_ParserFree(s->parser);
        parser_drop_tree(s);
    }
    free(s->stream_ns);
    s->stream_ns = NULL;
    s->parser = XML_ParserCreateNS("UTF-8", SEP);
    if (!s->parser)
        return -1;
    XML_SetReturnNSTriplet(s->parser, 1);
    XML_SetUserData(s->parser, s);
    XML_SetElementHandler(s->parser, on_start, on_end);
    XML_SetCharacterDataHandler(s->parser, on_text);
    XML_SetStartNamespaceDeclHandler(s->parser, on_ns_start);
    XML_SetStartDoctypeDeclHandler(s->parser, on_doctype);
    XML_SetEntityDeclHandler(s->parser, on_entity);
    XML_SetCommentHandler(s->parser, on_comment);
    XML_SetProcessingInstructionHandler(s->parser, on_pi);
    XML_SetParamEntityParsing(s->parser, XML_PARAM_ENTITY_PARSING_NEVER);
    s->fed = s->mark = s->consumed = 0;
    s->err_cond = NULL;
    s->header_received = 0;
    s->suspended = 0;
    return 0;
}

void
xd_stream_free(xd_session *s)
{
    if (s->parser)
        XML_ParserFree(s->parser);
    s->parser = NULL;
    parser_drop_tree(s);
    free(s->text);
    free(s->stream_ns);
    s->text = NULL;
    s->stream_ns = NULL;
}

/* ---- stream errors ------------------------------------------------------------- */

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
        xd_stream_send_header(s);
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

/* ---- dispatch --------------------------------------------------------------------- */

static int
is_stanza(xd_session *s, xmpp_stanza_t *st)
{
    const char *name = xmpp_stanza_get_name(st);
    const char *ns = xmpp_stanza_get_ns(st);
    if (!name || !ns || strcmp(ns, s->stream_ns ? s->stream_ns : "") != 0)
        return 0;
    return !strcmp(name, "message") || !strcmp(name, "presence") || !strcmp(name, "iq");
}

static void
dispatch(xd_session *s, xmpp_stanza_t *st)
{
    const char *name = xmpp_stanza_get_name(st);
    const char *ns = xmpp_stanza_get_ns(st);

    if (!s->tls_up) {
        /* RFC 6120 5.3.1: TLS is mandatory here; nothing else is accepted. */
        if (name && ns && !strcmp(name, "starttls") && !strcmp(ns, NS_TLS)) {
            xd_session_send_raw(s, "<proceed xmlns='" NS_TLS "'/>", sizeof("<proceed xmlns='" NS_TLS "'/>") - 1);
            s->restart = XD_RESTART_TLS;
        } else
            xd_session_close(s, "policy-violation", "STARTTLS is required");
        xmpp_stanza_release(st);
        return;
    }
    if (is_stanza(s, st)) {
        if (s->authenticated && (s->bound || s->type == XD_STREAM_S2S)) {
            xd_route_from(s, st); /* takes st */
            return;
        }
        /* Not yet routable: resource binding and the like. */
        if (!s->authenticated || xd_element_dispatch(s, st) == XD_PASS)
            xd_session_close(s, "not-authorized", NULL);
        xmpp_stanza_release(st);
        return;
    }
    if (xd_element_dispatch(s, st) == XD_PASS)
        xd_session_close(s, "unsupported-stanza-type", name);
    xmpp_stanza_release(st);
}

/* After an element: restart the stream if negotiation asked for it. */
static void
do_restart(xd_session *s)
{
    int kind = s->restart;
    long long off = s->consumed - s->chunk_base; /* bytes of `in` already parsed */

    s->restart = XD_RESTART_NONE;
    if (xd_stream_init(s) != 0) {
        xd_session_kill(s);
        return;
    }
    if (kind == XD_RESTART_TLS) {
        /* RFC 6120 5.4.3.3: anything sent after <starttls/> in the clear is
         * discarded, never parsed. */
        s->in_len = 0;
        s->in_pending = 0;
        s->tls_start_after_flush = 1;
        ev_io_stop(xd_srv.loop, &s->rio);
        if (s->out_len == 0) {
            s->tls_start_after_flush = 0;
            xd_session_start_tls(s);
        }
        return;
    }
    /* SASL success: the new stream header may already be in the buffer. */
    if (off < 0 || (size_t)off > s->in_len)
        off = (long long)s->in_len;
    memmove(s->in, s->in + off, s->in_len - (size_t)off);
    s->in_len -= (size_t)off;
    s->in_pending = s->in_len > 0;
}

static void
parse_error(xd_session *s)
{
    const char *cond = s->err_cond;
    if (cond && !*cond) {
        /* </stream:stream> */
        xd_debug("%s: stream closed by peer", s->peer);
        xd_session_close(s, NULL, NULL);
        return;
    }
    if (!cond) {
        enum XML_Error e = XML_GetErrorCode(s->parser);
        cond = (e == XML_ERROR_UNBOUND_PREFIX) ? "bad-namespace-prefix" : "not-well-formed";
        xd_info("%s: XML error: %s", s->peer, XML_ErrorString(e));
    }
    xd_session_close(s, cond, NULL);
}

void
xd_stream_input(xd_session *s)
{
    while (!s->dead && !s->closing && !s->paused) {
        enum XML_Status st;
        if (s->suspended) {
            st = XML_ResumeParser(s->parser);
        } else if (s->in_pending) {
            s->chunk_base = s->fed;
            s->fed += (long long)s->in_len;
            s->in_pending = 0;
            st = XML_Parse(s->parser, s->in, (int)s->in_len, 0);
        } else
            return;
        if (st == XML_STATUS_ERROR) {
            parse_error(s);
            return;
        }
        if (st == XML_STATUS_SUSPENDED) {
            xmpp_stanza_t *el = s->ready;
            s->suspended = 1;
            s->ready = NULL;
            if (el)
                dispatch(s, el);
            if (s->restart && !s->dead && !s->closing)
                do_restart(s);
            continue;
        }
        /* The whole chunk is parsed; bound what expat buffers for a token
         * that has not ended yet (a giant start tag, say). */
        s->suspended = 0;
        if (s->fed - s->mark > (long long)xd_srv.conf.max_stanza[s->type]) {
            xd_session_close(s, "policy-violation", "stanza too large");
            return;
        }
    }
}

void
xd_stream_set_max_stanza_size(xd_stream_type type, size_t bytes)
{
    if ((unsigned)type <= XD_STREAM_S2S && bytes >= 4096)
        xd_srv.conf.max_stanza[type] = bytes;
}
