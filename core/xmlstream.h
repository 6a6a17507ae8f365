/*
 * The XML stream parser (RFC 6120 4, 11): expat fed incrementally, one
 * libstrophe stanza per top-level element.  It knows nothing of sockets or
 * sessions, so it can be fed byte by byte in a unit test.
 */
#ifndef XD_CORE_XMLSTREAM_H
#define XD_CORE_XMLSTREAM_H

#include <stddef.h>

#include <strophe.h>

typedef struct xd_xmlstream xd_xmlstream;

typedef struct xd_xmlstream_cb {
    /* The stream header: attrs as name/value pairs ended by NULL, and the
     * default namespace (or NULL).  Return NULL to go on, or a stream error
     * condition to end the stream. */
    const char *(*open)(void *ud, const char **attrs, const char *ns);
    /* A complete top-level element; the callback takes it.  Return 0 to go
     * on parsing, 1 to stop here (a restart, a pause, a close). */
    int (*element)(void *ud, xmpp_stanza_t *el);
} xd_xmlstream_cb;

enum {
    XD_XS_ERROR = -1,  /* xd_xmlstream_error() names the stream error */
    XD_XS_DONE = 0,    /* every byte was parsed; feed more */
    XD_XS_STOPPED = 1, /* an element callback asked to stop; see *used */
    XD_XS_CLOSED = 2   /* the peer sent </stream:stream> */
};

xd_xmlstream *xd_xmlstream_new(xmpp_ctx_t *ctx, const xd_xmlstream_cb *cb, void *ud);
void xd_xmlstream_free(xd_xmlstream *x);
/* Forget the current stream and expect a new header (STARTTLS, SASL). */
int xd_xmlstream_restart(xd_xmlstream *x);
/* Largest top-level element, in bytes of input; larger ends the stream with <policy-violation/>. */
void xd_xmlstream_set_max(xd_xmlstream *x, size_t bytes);

/*
 * Parse len bytes.  On XD_XS_STOPPED, *used is how many bytes of data were
 * parsed; the parser is suspended inside data, which must stay untouched
 * until xd_xmlstream_resume() continues with the rest of it, or the caller
 * restarts the stream and feeds the rest itself.
 */
int xd_xmlstream_feed(xd_xmlstream *x, const char *data, size_t len, size_t *used);
int xd_xmlstream_resume(xd_xmlstream *x, size_t *used);
/* Free the parser of a stream that sits between two stanzas (it comes back
 * by itself with the next input).  1 freed, 0 not now (mid-stanza). */
int xd_xmlstream_idle(xd_xmlstream *x);
const char *xd_xmlstream_error(const xd_xmlstream *x);

#endif
