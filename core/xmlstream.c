/*
 * The XML stream parser.  expat, with namespace processing, builds one
 * libstrophe stanza per top-level element and suspends after each, so the
 * caller can act (and restart the stream for STARTTLS or SASL) at exactly
 * the byte where the element ended.  Restricted XML (RFC 6120 11.1: DTDs,
 * entity declarations, comments, processing instructions) is refused; the
 * size of a stanza, the depth of elements and what expat buffers for an
 * unfinished token are bounded.
 *
 * An idle stream gives its expat parser back (xd_xmlstream_idle): between
 * two stanzas a parser holds nothing but the stream header's namespaces, so
 * the next input gets a fresh parser that is first fed a copy of that
 * header.  expat's buffers and tables are most of an idle client's memory.
 */
#include <expat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xmppd/log.h>

#include "xmlstream.h"

#define NS_STREAMS "http://etherx.jabber.org/streams"
#define NS_XML "http://www.w3.org/XML/1998/namespace"
#define SEP '\x01'         /* between namespace URI, local name and prefix */
#define DEPTH_MAX 48       /* deepest element nesting accepted */
#define NAME_MAX_LEN 1024  /* longest element or attribute name */

struct xd_xmlstream {
    XML_Parser p;
    xmpp_ctx_t *ctx;
    const xd_xmlstream_cb *cb;
    void *ud;
    size_t max;
    int depth;                        /* 1 inside the stream, 2 for a stanza */
    xmpp_stanza_t *stack[DEPTH_MAX + 2];
    char *text;                       /* character data not yet attached */
    size_t text_len, text_cap;
    xmpp_stanza_t *ready;             /* complete element waiting for the callback */
    const char *err;                  /* stream error chosen inside a handler */
    int closed;
    char *stream_ns;
    long long fed;                    /* bytes fed to this parser */
    long long chunk_base;             /* parser index where the current data starts */
    long long mark;                   /* where the current stanza (or gap) began */
    long long consumed;               /* just past the last complete element */
    const char *chunk;                /* the data being parsed */
    size_t chunk_len;
    char hist[16];                    /* the bytes fed just before chunk */
    size_t hist_len;
    char next_hist[16];               /* what hist becomes at the next feed */
    size_t next_hist_len;
    char *decls;                      /* the header's namespace declarations */
    char *header;                     /* the header again, for a fresh parser */
    long long shift;                  /* parser index minus stream index */
    int replay;                       /* the parser is reading our copy of the header */
    int at_start;                     /* nothing but white space fed since the restart */
    size_t chunk_skip;                /* white space dropped before chunk */
};

/* Where the parser is, counted in bytes of the stream (not of our copy). */
static long long
pos(const xd_xmlstream *x)
{
    return XML_GetCurrentByteIndex(x->p) - x->shift;
}

static void
fail(xd_xmlstream *x, const char *cond)
{
    if (!x->err)
        x->err = cond;
    XML_StopParser(x->p, XML_FALSE);
}

static int
over_limit(xd_xmlstream *x)
{
    return pos(x) - x->mark > (long long)x->max;
}

static int
text_flush(xd_xmlstream *x)
{
    xmpp_stanza_t *t;
    if (!x->text_len || x->depth < 2)
        return 0;
    if (!(t = xmpp_stanza_new(x->ctx)))
        return -1;
    if (xmpp_stanza_set_text_with_size(t, x->text, x->text_len) != XMPP_EOK) {
        xmpp_stanza_release(t);
        return -1;
    }
    xmpp_stanza_add_child_ex(x->stack[x->depth], t, 0);
    x->text_len = 0;
    return 0;
}

/* The namespace in effect for children of the element at depth d. */
static const char *
ns_at(xd_xmlstream *x, int d)
{
    for (; d >= 2; d--) {
        const char *ns = xmpp_stanza_get_ns(x->stack[d]);
        if (ns)
            return ns;
    }
    return x->stream_ns ? x->stream_ns : "";
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
set_attributes(xd_xmlstream *x, xmpp_stanza_t *st, const char **attrs)
{
    char buf[NAME_MAX_LEN], name[NAME_MAX_LEN + 16], decl[NAME_MAX_LEN + 16];
    for (; attrs[0]; attrs += 2) {
        const char *uri, *local, *prefix;
        if (strlen(attrs[0]) >= sizeof(buf)) {
            fail(x, "policy-violation");
            return -1;
        }
        strcpy(buf, attrs[0]);
        split_name(buf, &uri, &local, &prefix);
        if (!uri) {
            xmpp_stanza_set_attribute(st, local, attrs[1]);
        } else if (strcmp(uri, NS_XML) == 0) {
            snprintf(name, sizeof(name), "xml:%s", local);
            xmpp_stanza_set_attribute(st, name, attrs[1]);
        } else {
            /* A namespaced attribute keeps its prefix, declared on the element. */
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

/* Append text to *buf (a NUL-terminated heap string).  0 ok, -1. */
static int
append(char **buf, const char *a, const char *b, const char *c)
{
    size_t n = *buf ? strlen(*buf) : 0;
    size_t add = strlen(a) + strlen(b) + strlen(c);
    char *p = realloc(*buf, n + add + 1);
    if (!p)
        return -1;
    snprintf(p + n, add + 1, "%s%s%s", a, b, c);
    *buf = p;
    return 0;
}

/* The header as a fresh parser needs it: the element and its namespace
 * declarations (attributes are the session's business, already read). */
static int
keep_header(xd_xmlstream *x, const char *prefix)
{
    free(x->header);
    x->header = NULL;
    if (append(&x->header, "<", prefix ? prefix : "", prefix ? ":stream" : "stream") != 0 ||
        append(&x->header, x->decls ? x->decls : "", ">", "") != 0) {
        free(x->header);
        x->header = NULL;
        return -1;
    }
    return 0;
}

static void
stream_header(xd_xmlstream *x, const char *uri, const char *local, const char *prefix,
              const char **attrs)
{
    const char *err;
    if (!uri || strcmp(uri, NS_STREAMS) != 0 || strcmp(local, "stream") != 0) {
        fail(x, "invalid-namespace");
        return;
    }
    x->depth = 1;
    if (x->replay)
        return; /* our own copy: the session has seen this header */
    if (keep_header(x, prefix) != 0) {
        fail(x, "internal-server-error");
        return;
    }
    x->mark = pos(x) + XML_GetCurrentByteCount(x->p);
    if ((err = x->cb->open(x->ud, attrs, x->stream_ns)))
        fail(x, err);
}

static void XMLCALL
on_start(void *ud, const char *name, const char **attrs)
{
    xd_xmlstream *x = ud;
    char buf[NAME_MAX_LEN];
    const char *uri, *local, *prefix;
    xmpp_stanza_t *st;

    if (x->err)
        return;
    if (strlen(name) >= sizeof(buf)) {
        fail(x, "policy-violation");
        return;
    }
    strcpy(buf, name);
    split_name(buf, &uri, &local, &prefix);
    if (x->depth == 0) {
        stream_header(x, uri, local, prefix, attrs);
        return;
    }
    if (x->depth > DEPTH_MAX) {
        fail(x, "policy-violation");
        return;
    }
    if (x->depth == 1)
        x->mark = pos(x);
    else if (over_limit(x)) {
        fail(x, "policy-violation");
        return;
    }
    if (text_flush(x) != 0 || !(st = xmpp_stanza_new(x->ctx))) {
        fail(x, "internal-server-error");
        return;
    }
    if (uri && strcmp(uri, NS_STREAMS) == 0) {
        /* <stream:features/>, <stream:error/>: keep the prefix */
        char pname[NAME_MAX_LEN + 8];
        snprintf(pname, sizeof(pname), "stream:%s", local);
        xmpp_stanza_set_name(st, pname);
    } else {
        xmpp_stanza_set_name(st, local);
        if (uri && (x->depth == 1 || strcmp(uri, ns_at(x, x->depth)) != 0))
            xmpp_stanza_set_ns(st, uri);
        else if (!uri && *ns_at(x, x->depth))
            xmpp_stanza_set_ns(st, ""); /* xmlns='' undeclares the default */
    }
    if (set_attributes(x, st, attrs) != 0) {
        xmpp_stanza_release(st);
        return;
    }
    if (x->depth > 1)
        xmpp_stanza_add_child_ex(x->stack[x->depth], st, 0);
    x->stack[++x->depth] = st;
}

static void XMLCALL
on_end(void *ud, const char *name)
{
    xd_xmlstream *x = ud;
    (void)name;
    if (x->err)
        return;
    if (x->depth == 1) {
        x->depth = 0;
        x->closed = 1;
        XML_StopParser(x->p, XML_FALSE);
        return;
    }
    if (text_flush(x) != 0) {
        fail(x, "internal-server-error");
        return;
    }
    if (--x->depth == 1) {
        x->consumed = pos(x) + XML_GetCurrentByteCount(x->p);
        if (x->consumed - x->mark > (long long)x->max) {
            fail(x, "policy-violation");
            return;
        }
        x->ready = x->stack[2];
        x->stack[2] = NULL;
        x->mark = x->consumed;
        XML_StopParser(x->p, XML_TRUE);
    }
}

static void XMLCALL
on_text(void *ud, const char *text, int len)
{
    xd_xmlstream *x = ud;
    if (x->err)
        return;
    if (x->depth < 2) {
        /* whitespace between stanzas is a keepalive: it starts no stanza */
        x->mark = pos(x) + len;
        return;
    }
    if (over_limit(x)) {
        fail(x, "policy-violation");
        return;
    }
    if (x->text_len + (size_t)len > x->text_cap) {
        size_t cap = x->text_cap ? x->text_cap : 256;
        char *p;
        while (cap < x->text_len + (size_t)len)
            cap *= 2;
        if (!(p = realloc(x->text, cap))) {
            fail(x, "internal-server-error");
            return;
        }
        x->text = p;
        x->text_cap = cap;
    }
    memcpy(x->text + x->text_len, text, (size_t)len);
    x->text_len += (size_t)len;
}

/* A declaration on the header: kept (escaped) to replay it later. */
static void XMLCALL
on_ns_start(void *ud, const char *prefix, const char *uri)
{
    xd_xmlstream *x = ud;
    char esc[NAME_MAX_LEN * 6 + 1], *o = esc;

    if (x->depth != 0 || x->replay || x->err)
        return;
    if (!prefix && uri && !x->stream_ns)
        x->stream_ns = strdup(uri);
    if (!uri)
        uri = "";
    if (strlen(uri) >= NAME_MAX_LEN) {
        fail(x, "policy-violation");
        return;
    }
    for (; *uri; uri++) {
        const char *e = *uri == '\'' ? "&apos;" : *uri == '&' ? "&amp;" : *uri == '<' ? "&lt;" : NULL;
        if (e) {
            strcpy(o, e);
            o += strlen(e);
        } else
            *o++ = *uri;
    }
    *o = '\0';
    if (append(&x->decls, prefix ? " xmlns:" : " xmlns", prefix ? prefix : "", "='") != 0 ||
        append(&x->decls, esc, "'", "") != 0)
        fail(x, "internal-server-error");
}

static void XMLCALL
on_doctype(void *ud, const char *name, const char *sysid, const char *pubid, int internal)
{
    (void)name, (void)sysid, (void)pubid, (void)internal;
    fail(ud, "restricted-xml");
}

static void XMLCALL
on_entity(void *ud, const char *name, int pe, const char *value, int vlen, const char *base,
          const char *sysid, const char *pubid, const char *notation)
{
    (void)name, (void)pe, (void)value, (void)vlen, (void)base, (void)sysid, (void)pubid,
        (void)notation;
    fail(ud, "restricted-xml");
}

static void XMLCALL
on_comment(void *ud, const char *data)
{
    (void)data;
    fail(ud, "restricted-xml");
}

static void XMLCALL
on_pi(void *ud, const char *target, const char *data)
{
    (void)target, (void)data;
    fail(ud, "restricted-xml");
}

static void
drop_tree(xd_xmlstream *x)
{
    if (x->stack[2]) /* an unfinished stanza; deeper entries are its children */
        xmpp_stanza_release(x->stack[2]);
    if (x->ready)
        xmpp_stanza_release(x->ready);
    memset(x->stack, 0, sizeof(x->stack));
    x->ready = NULL;
    x->depth = 0;
    x->text_len = 0;
}

static int parser_new(xd_xmlstream *x);

int
xd_xmlstream_restart(xd_xmlstream *x)
{
    if (x->p)
        XML_ParserFree(x->p);
    x->p = NULL;
    drop_tree(x);
    free(x->stream_ns);
    free(x->decls);
    free(x->header);
    x->stream_ns = x->decls = x->header = NULL;
    x->err = NULL;
    x->closed = 0;
    x->fed = x->chunk_base = x->mark = x->consumed = x->shift = 0;
    x->hist_len = x->next_hist_len = 0;
    x->at_start = 1;
    x->chunk_skip = 0;
    return parser_new(x);
}

/* Between two stanzas, nothing half-read: the parser can go. */
int
xd_xmlstream_idle(xd_xmlstream *x)
{
    XML_ParsingStatus st;

    if (!x->p || !x->header || x->depth != 1 || x->ready || x->stack[2] || x->text_len ||
        x->err || x->closed || x->fed != x->mark)
        return 0;
    XML_GetParsingStatus(x->p, &st);
    if (st.parsing != XML_PARSING)
        return 0; /* suspended inside the data: the caller still needs it */
    XML_ParserFree(x->p);
    x->p = NULL;
    free(x->text);
    x->text = NULL;
    x->text_cap = 0;
    return 1;
}

/* A fresh parser for an idle stream: it reads our copy of the header first,
 * and its byte index is shifted so the stream's own count goes on. */
static int
wake(xd_xmlstream *x)
{
    size_t n = strlen(x->header);

    if (parser_new(x) != 0)
        return -1;
    x->replay = 1;
    x->depth = 0;
    if (XML_Parse(x->p, x->header, (int)n, 0) != XML_STATUS_OK || x->depth != 1) {
        x->replay = 0;
        x->err = "internal-server-error";
        return -1;
    }
    x->replay = 0;
    x->shift = (long long)n - x->chunk_base; /* chunk_base: where this feed starts */
    return 0;
}

static int
parser_new(xd_xmlstream *x)
{
    x->p = XML_ParserCreateNS("UTF-8", SEP);
    if (!x->p)
        return -1;
    XML_SetReturnNSTriplet(x->p, 1);
    XML_SetUserData(x->p, x);
    XML_SetElementHandler(x->p, on_start, on_end);
    XML_SetCharacterDataHandler(x->p, on_text);
    XML_SetStartNamespaceDeclHandler(x->p, on_ns_start);
    XML_SetStartDoctypeDeclHandler(x->p, on_doctype);
    XML_SetEntityDeclHandler(x->p, on_entity);
    XML_SetCommentHandler(x->p, on_comment);
    XML_SetProcessingInstructionHandler(x->p, on_pi);
    XML_SetParamEntityParsing(x->p, XML_PARAM_ENTITY_PARSING_NEVER);
#ifdef HAVE_XML_REPARSE_DEFERRAL
    /* Deferral waits for more input before retrying an unfinished token; a
     * stream header split over two reads would then sit unparsed while the
     * peer waits for our answer. */
    XML_SetReparseDeferralEnabled(x->p, XML_FALSE);
#endif
    return 0;
}

xd_xmlstream *
xd_xmlstream_new(xmpp_ctx_t *ctx, const xd_xmlstream_cb *cb, void *ud)
{
    xd_xmlstream *x = calloc(1, sizeof(*x));
    if (!x)
        return NULL;
    x->ctx = ctx;
    x->cb = cb;
    x->ud = ud;
    x->max = 262144;
    if (xd_xmlstream_restart(x) != 0) {
        free(x);
        return NULL;
    }
    return x;
}

void
xd_xmlstream_free(xd_xmlstream *x)
{
    if (!x)
        return;
    if (x->p)
        XML_ParserFree(x->p);
    drop_tree(x);
    free(x->text);
    free(x->stream_ns);
    free(x->decls);
    free(x->header);
    free(x);
}

void
xd_xmlstream_set_max(xd_xmlstream *x, size_t bytes)
{
    x->max = bytes;
}

const char *
xd_xmlstream_error(const xd_xmlstream *x)
{
    return x->err ? x->err : "not-well-formed";
}

/* An expat error as an RFC 6120 stream error.  A DTD or entity declaration
 * inside the stream is a syntax error to expat, restricted XML to us. */
/* The byte at parser index i, if it is still at hand. */
static int
byte_at(const xd_xmlstream *x, long long i)
{
    long long off = i - x->chunk_base;
    if (off >= 0)
        return (size_t)off < x->chunk_len ? (unsigned char)x->chunk[off] : -1;
    off += (long long)x->hist_len;
    return off >= 0 ? (unsigned char)x->hist[off] : -1;
}

static const char *
classify_error(xd_xmlstream *x)
{
    long long at = pos(x);
    if (XML_GetErrorCode(x->p) == XML_ERROR_UNBOUND_PREFIX)
        return "bad-namespace-prefix";
    /* expat points at or just past the "<!" of a markup declaration */
    for (int back = 0; back < 2 && byte_at(x, at) != '<'; back++)
        at--;
    if (byte_at(x, at) == '<' && byte_at(x, at + 1) == '!' && byte_at(x, at + 2) != '[')
        return "restricted-xml";
    return "not-well-formed";
}

/* The last bytes of (hist + data), for classify_error() during the next
 * feed, when data itself may already be gone. */
static void
remember_tail(xd_xmlstream *x, const char *data, size_t len)
{
    size_t keep = sizeof(x->next_hist), from_hist;
    if (len >= keep) {
        memcpy(x->next_hist, data + len - keep, keep);
        x->next_hist_len = keep;
        return;
    }
    from_hist = x->hist_len < keep - len ? x->hist_len : keep - len;
    memcpy(x->next_hist, x->hist + x->hist_len - from_hist, from_hist);
    memcpy(x->next_hist + from_hist, data, len);
    x->next_hist_len = from_hist + len;
}

/* Hand each suspended element to the callback until the data is used up. */
static int
run(xd_xmlstream *x, enum XML_Status st, size_t *used)
{
    for (;;) {
        if (st == XML_STATUS_ERROR) {
            if (x->closed)
                return XD_XS_CLOSED;
            if (!x->err) {
                x->err = classify_error(x);
                xd_debug("xml: %s at byte %lld of the stream: %s", x->err, pos(x),
                         XML_ErrorString(XML_GetErrorCode(x->p)));
            }
            return XD_XS_ERROR;
        }
        if (st == XML_STATUS_SUSPENDED) {
            xmpp_stanza_t *el = x->ready;
            x->ready = NULL;
            *used = (size_t)(x->consumed - x->chunk_base) + x->chunk_skip;
            if (el && x->cb->element(x->ud, el))
                return XD_XS_STOPPED;
            st = XML_ResumeParser(x->p);
            continue;
        }
        /* All parsed.  Bound what expat keeps for a token that has not
         * ended yet (a giant start tag, say). */
        *used = (size_t)(x->fed - x->chunk_base) + x->chunk_skip;
        if (x->fed - x->mark > (long long)x->max) {
            x->err = "policy-violation";
            return XD_XS_ERROR;
        }
        return XD_XS_DONE;
    }
}

int
xd_xmlstream_feed(xd_xmlstream *x, const char *data, size_t len, size_t *used)
{
    size_t dummy;
    int r;
    if (!used)
        used = &dummy;
    *used = 0;
    if (len > (size_t)1 << 30)
        return XD_XS_ERROR;
    /* White space before a stream's header is between documents (the
     * newline a client wrote after </auth>, before its new header): drop
     * it, or an XML declaration after it would not be at the document's
     * start.  Prosody and ejabberd accept it too. */
    x->chunk_skip = 0;
    if (x->at_start) {
        while (x->chunk_skip < len && strchr(" \t\r\n", data[x->chunk_skip]) &&
               data[x->chunk_skip])
            x->chunk_skip++;
        data += x->chunk_skip;
        len -= x->chunk_skip;
        if (!len) {
            *used = x->chunk_skip;
            return XD_XS_DONE;
        }
        x->at_start = 0;
    }
    memcpy(x->hist, x->next_hist, x->next_hist_len);
    x->hist_len = x->next_hist_len;
    remember_tail(x, data, len);
    x->chunk_base = x->fed;
    x->fed += (long long)len;
    x->chunk = data;
    x->chunk_len = len;
    if (!x->p && wake(x) != 0)
        return XD_XS_ERROR;
    r = run(x, XML_Parse(x->p, data, (int)len, 0), used);
    return r;
}

int
xd_xmlstream_resume(xd_xmlstream *x, size_t *used)
{
    size_t dummy;
    if (!x->p)
        return XD_XS_ERROR; /* never idle while suspended */
    return run(x, XML_ResumeParser(x->p), used ? used : &dummy);
}
