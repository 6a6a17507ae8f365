/*
 * Unit tests for core/xmlstream.c: incremental parsing of a whole client
 * stream in any chunking, the open callback, stopping/resuming/restarting
 * at element boundaries (the SASL restart pattern), restricted XML (RFC 6120
 * 11.1), well-formedness and namespace errors, size and depth limits, and
 * random garbage.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xmlstream.h"

#define HDR                                                                          \
    "<stream:stream to='example.com' version='1.0' xml:lang='en' "                    \
    "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"

#define MAX_EV 64

/* ---- recorder ------------------------------------------------------------------ */

typedef struct rec {
    xmpp_ctx_t *ctx;
    char *ev[MAX_EV]; /* "OPEN ..." and "EL <serialized>" in order */
    int nev;
    int nopen, nel;
    const char *open_ret;  /* what open() returns */
    const char *stop_name; /* element() returns 1 for elements of this name */
    char last_name[64];
} rec;

static void rec_push(rec *r, char *s)
{
    assert_non_null(s);
    if (r->nev >= MAX_EV)
        fail_msg("too many events");
    r->ev[r->nev++] = s;
}

static const char *attr_get(const char **attrs, const char *name)
{
    for (; attrs && attrs[0]; attrs += 2)
        if (strcmp(attrs[0], name) == 0)
            return attrs[1];
    return NULL;
}

static const char *cb_open(void *ud, const char **attrs, const char *ns)
{
    rec *r = ud;
    char buf[512];
    const char *to = attr_get(attrs, "to"), *ver = attr_get(attrs, "version");
    snprintf(buf, sizeof(buf), "OPEN to=%s version=%s ns=%s", to ? to : "(null)",
             ver ? ver : "(null)", ns ? ns : "(null)");
    rec_push(r, strdup(buf));
    r->nopen++;
    return r->open_ret;
}

static int cb_element(void *ud, xmpp_stanza_t *el)
{
    rec *r = ud;
    char *buf = NULL, *s;
    size_t len = 0;
    int stop;
    assert_int_equal(xmpp_stanza_to_text(el, &buf, &len), XMPP_EOK);
    {
        const char *ns = xmpp_stanza_get_ns(el);
        size_t pre = strlen("EL ns= ") + (ns ? strlen(ns) : 6);
        s = malloc(pre + len + 1);
        assert_non_null(s);
        snprintf(s, pre + 1, "EL ns=%s ", ns ? ns : "(null)");
        memcpy(s + pre, buf, len);
        s[pre + len] = '\0';
    }
    xmpp_free(r->ctx, buf);
    rec_push(r, s);
    r->nel++;
    snprintf(r->last_name, sizeof(r->last_name), "%s",
             xmpp_stanza_get_name(el) ? xmpp_stanza_get_name(el) : "");
    stop = r->stop_name && strcmp(r->stop_name, r->last_name) == 0;
    xmpp_stanza_release(el);
    return stop;
}

static const xd_xmlstream_cb CB = {cb_open, cb_element};

static void rec_clear(rec *r)
{
    for (int i = 0; i < r->nev; i++)
        free(r->ev[i]);
    r->nev = r->nopen = r->nel = 0;
}

typedef struct fx {
    xmpp_ctx_t *ctx;
    rec r;
    rec ref;      /* reference events of a test */
    void *tmp[2]; /* buffers of a test, freed by teardown even after a failure */
    xd_xmlstream *x;
} fx;

/* Hand a buffer to the fixture (slot i), freeing what was there. */
static void *keep(fx *f, int i, void *p)
{
    assert_non_null(p);
    free(f->tmp[i]);
    f->tmp[i] = p;
    return p;
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));
    if (!f)
        return -1;
    f->ctx = xmpp_ctx_new(NULL, NULL);
    f->r.ctx = f->ctx;
    f->x = xd_xmlstream_new(f->ctx, &CB, &f->r);
    if (!f->ctx || !f->x)
        return -1;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    xd_xmlstream_free(f->x);
    rec_clear(&f->r);
    rec_clear(&f->ref);
    free(f->tmp[0]);
    free(f->tmp[1]);
    xmpp_ctx_free(f->ctx);
    free(f);
    return 0;
}

/* A fresh parser in f (the previous one is freed). */
static void fresh(fx *f)
{
    xd_xmlstream_free(f->x);
    rec_clear(&f->r);
    f->r.open_ret = NULL;
    f->r.stop_name = NULL;
    f->x = xd_xmlstream_new(f->ctx, &CB, &f->r);
    assert_non_null(f->x);
}

/* Feed one chunk, resuming over stops; the final status. */
static int feed_chunk(xd_xmlstream *x, const char *data, size_t len)
{
    size_t used = 0;
    int r = xd_xmlstream_feed(x, data, len, &used);
    while (r == XD_XS_STOPPED)
        r = xd_xmlstream_resume(x, &used);
    if (r == XD_XS_DONE)
        assert_int_equal(used, len);
    return r;
}

/* Feed data in chunks of at most `chunk` bytes until an end status; *at is
 * how many bytes had been handed over when it came. */
static int feed_chunks(xd_xmlstream *x, const char *data, size_t len, size_t chunk, size_t *at)
{
    size_t off = 0;
    int r = XD_XS_DONE;
    while (off < len) {
        size_t n = len - off < chunk ? len - off : chunk;
        r = feed_chunk(x, data + off, n);
        off += n;
        if (r != XD_XS_DONE)
            break;
    }
    if (at)
        *at = off;
    return r;
}

static int feed_str(xd_xmlstream *x, const char *s)
{
    return feed_chunk(x, s, strlen(s));
}

/* Simple deterministic PRNG (xorshift64*) so runs are reproducible. */
static uint64_t rng_state;
static uint64_t rnd(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

/* ---- a whole stream ------------------------------------------------------------ */

static const char WHOLE[] =
    "<?xml version='1.0'?>\n" HDR
    "<message to='juliet@example.com' type='chat' id='m1' xml:lang='en'>"
    "<body>Hi &amp; &lt;bye&gt; &#x263A;<![CDATA[<raw> & ]]]>!</body>"
    "<x xmlns='urn:test:x' a='1'><y xmlns='urn:test:y'>deep</y><z/></x>"
    "<f:thing xmlns:f='urn:test:f' f:attr='v' plain='p'/>"
    "<html xmlns='http://jabber.org/protocol/xhtml-im'>"
    "<body xmlns='http://www.w3.org/1999/xhtml'><p>hi <b>there</b></p></body></html>"
    "</message>"
    " \n\t \n"
    "<iq type='get' id='i1' to='example.com'><ping xmlns='urn:xmpp:ping'/><a xmlns=''/></iq>"
    "\n"
    "<presence><show>away</show><status xml:lang='fr'>parti</status></presence>"
    "  "
    "</stream:stream>";

static void check_whole_events(rec *r)
{
    xmpp_stanza_t *st;
    assert_int_equal(r->nev, 4);
    assert_int_equal(r->nopen, 1);
    assert_string_equal(r->ev[0], "OPEN to=example.com version=1.0 ns=jabber:client");
    assert_non_null(strstr(r->ev[1], "EL ns=jabber:client <message "));
    /* entities and CDATA decoded, re-escaped on output; U+263A as UTF-8 */
    assert_non_null(strstr(r->ev[1], "<body>Hi &amp; &lt;bye&gt; \xe2\x98\xba&lt;raw&gt; &amp; ]!</body>"));
    assert_non_null(strstr(r->ev[1], "xml:lang=\"en\""));
    assert_non_null(strstr(r->ev[1], "<y xmlns=\"urn:test:y\">deep</y>"));
    assert_non_null(strstr(r->ev[1], "xmlns=\"urn:test:x\""));
    assert_non_null(strstr(r->ev[1], "<z/>"));
    assert_non_null(strstr(r->ev[1], "f:attr=\"v\""));
    assert_non_null(strstr(r->ev[1], "xmlns:f=\"urn:test:f\""));
    assert_non_null(strstr(r->ev[1], "<p>hi <b>there</b></p>"));
    assert_non_null(strstr(r->ev[1], "xmlns=\"http://www.w3.org/1999/xhtml\""));
    assert_non_null(strstr(r->ev[2], "EL ns=jabber:client <iq "));
    assert_non_null(strstr(r->ev[2], "<a xmlns=\"\"/>")); /* xmlns='' undeclares */
    assert_non_null(strstr(r->ev[2], "<ping xmlns=\"urn:xmpp:ping\"/>"));
    assert_non_null(strstr(r->ev[3], "EL ns=jabber:client <presence>"));
    assert_non_null(strstr(r->ev[3], "<show>away</show>"));
    assert_non_null(strstr(r->ev[3], "xml:lang=\"fr\""));
    assert_non_null(strstr(r->ev[3], ">parti</status>"));

    /* Re-parse the serialized message with libstrophe and check the tree. */
    st = xmpp_stanza_new_from_string(r->ctx, strchr(r->ev[1], '<'));
    assert_non_null(st);
    assert_string_equal(xmpp_stanza_get_name(st), "message");
    assert_string_equal(xmpp_stanza_get_to(st), "juliet@example.com");
    {
        xmpp_stanza_t *body = xmpp_stanza_get_child_by_name(st, "body");
        xmpp_stanza_t *x = xmpp_stanza_get_child_by_ns(st, "urn:test:x");
        xmpp_stanza_t *thing = xmpp_stanza_get_child_by_name(st, "thing");
        char *t;
        assert_non_null(body);
        t = xmpp_stanza_get_text(body);
        assert_string_equal(t, "Hi & <bye> \xe2\x98\xba<raw> & ]!");
        xmpp_free(r->ctx, t);
        assert_non_null(x);
        assert_string_equal(xmpp_stanza_get_attribute(x, "a"), "1");
        assert_non_null(thing);
        assert_string_equal(xmpp_stanza_get_ns(thing), "urn:test:f");
        assert_string_equal(xmpp_stanza_get_attribute(thing, "plain"), "p");
    }
    xmpp_stanza_release(st);
}

static void expect_same(rec *a, rec *b)
{
    assert_int_equal(a->nev, b->nev);
    for (int i = 0; i < a->nev; i++)
        assert_string_equal(a->ev[i], b->ev[i]);
}

static void test_whole_stream(void **state)
{
    fx *f = *state;
    size_t len = sizeof(WHOLE) - 1;
    rec *ref = &f->ref;
    size_t at;

    /* (a) one piece */
    assert_int_equal(feed_chunk(f->x, WHOLE, len), XD_XS_CLOSED);
    *ref = f->r; /* keep the reference events */
    memset(&f->r, 0, sizeof(f->r));
    f->r.ctx = f->ctx;
    check_whole_events(ref);

    /* (b) byte by byte: CLOSED exactly at the last byte */
    fresh(f);
    assert_int_equal(feed_chunks(f->x, WHOLE, len, 1, &at), XD_XS_CLOSED);
    assert_int_equal(at, len);
    expect_same(ref, &f->r);

    /* (c) random chunk sizes, fixed seed */
    rng_state = 0x9E3779B97F4A7C15ULL;
    for (int round = 0; round < 300; round++) {
        size_t off = 0;
        int r = XD_XS_DONE;
        fresh(f);
        while (off < len) {
            size_t n = 1 + rnd() % (round % 3 == 0 ? 7 : round % 3 == 1 ? 40 : 300);
            if (n > len - off)
                n = len - off;
            r = feed_chunk(f->x, WHOLE + off, n);
            off += n;
            if (r != XD_XS_DONE)
                break;
        }
        if (r != XD_XS_CLOSED || off != len)
            fail_msg("random chunks, round %d: status %d (expected CLOSED=2) after %zu of %zu "
                     "bytes, %d of %d events", round, r, off, len, f->r.nev, ref->nev);
        expect_same(ref, &f->r);
    }
}

/* ---- an idle stream gives its parser back ------------------------------------------ */

/* Chunked as in (c) above, with xd_xmlstream_idle() after every chunk: the
 * events are the same, the parser was dropped between stanzas (and only
 * there), and the stream's byte accounting goes on across the gaps. */
static void test_idle_parser(void **state)
{
    fx *f = *state;
    size_t len = sizeof(WHOLE) - 1;
    rec *ref = &f->ref;

    assert_int_equal(feed_chunk(f->x, WHOLE, len), XD_XS_CLOSED);
    *ref = f->r;
    memset(&f->r, 0, sizeof(f->r));
    f->r.ctx = f->ctx;

    int rounds_dropped = 0;
    rng_state = 0x243F6A8885A308D3ULL;
    for (int round = 0; round < 200; round++) {
        size_t off = 0;
        int r = XD_XS_DONE, dropped = 0;
        fresh(f);
        while (off < len && r == XD_XS_DONE) {
            size_t n = 1 + rnd() % (round % 2 ? 9 : 120);
            if (n > len - off)
                n = len - off;
            r = feed_chunk(f->x, WHOLE + off, n);
            off += n;
            dropped += r == XD_XS_DONE && xd_xmlstream_idle(f->x);
        }
        if (r != XD_XS_CLOSED || off != len)
            fail_msg("idle round %d: status %d after %zu of %zu bytes", round, r, off, len);
        expect_same(ref, &f->r);
        rounds_dropped += dropped > 0;
    }
    /* chunks end between two stanzas often enough to exercise the comeback */
    assert_true(rounds_dropped > 100);

    /* a prefix declared on the header still works after the parser came back */
    fresh(f);
    assert_int_equal(feed_str(f->x, "<s:stream xmlns:s='http://etherx.jabber.org/streams' "
                                     "xmlns='jabber:server' xmlns:db='jabber:server:dialback' "
                                     "xmlns:q='urn:x:&apos;&amp;'>"),
                     XD_XS_DONE);
    assert_int_equal(xd_xmlstream_idle(f->x), 1);
    assert_int_equal(xd_xmlstream_idle(f->x), 0); /* already gone */
    assert_int_equal(feed_str(f->x, "<db:result to='a' from='b'/><q:x/>"), XD_XS_DONE);
    assert_int_equal(f->r.nopen, 1);
    assert_int_equal(f->r.nel, 2);
    assert_non_null(strstr(f->r.ev[1], "jabber:server:dialback"));
    assert_non_null(strstr(f->r.ev[2], "urn:x:'&amp;"));
    /* not inside a stanza: the parser holds half of it */
    assert_int_equal(feed_str(f->x, "<message><bo"), XD_XS_DONE);
    assert_int_equal(xd_xmlstream_idle(f->x), 0);
    assert_int_equal(feed_str(f->x, "dy>x</body></message>"), XD_XS_DONE);
    assert_int_equal(f->r.nel, 3);

    /* the size limit counts the stream's bytes, not the replayed header */
    fresh(f);
    xd_xmlstream_set_max(f->x, 4096);
    assert_int_equal(feed_str(f->x, HDR), XD_XS_DONE);
    assert_int_equal(xd_xmlstream_idle(f->x), 1);
    {
        char *big = keep(f, 0, malloc(5000));
        memset(big, 'a', 4999);
        big[4999] = '\0';
        memcpy(big, "<message><body>", 15);
        assert_int_equal(feed_str(f->x, big), XD_XS_ERROR);
        assert_string_equal(xd_xmlstream_error(f->x), "policy-violation");
    }
}

/* ---- the open callback ------------------------------------------------------------ */

static void test_open_callback(void **state)
{
    fx *f = *state;

    assert_int_equal(feed_str(f->x, "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
                                     "version='1.0' to='Example.ORG' xmlns='jabber:server'>"),
                     XD_XS_DONE);
    assert_int_equal(f->r.nev, 1);
    assert_string_equal(f->r.ev[0], "OPEN to=Example.ORG version=1.0 ns=jabber:server");

    /* no default namespace, no attributes */
    fresh(f);
    assert_int_equal(feed_str(f->x, "<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>"),
                     XD_XS_DONE);
    assert_int_equal(f->r.nev, 1);
    assert_string_equal(f->r.ev[0], "OPEN to=(null) version=(null) ns=(null)");

    /* a condition returned from open ends the stream with it */
    fresh(f);
    f->r.open_ret = "host-unknown";
    assert_int_equal(feed_str(f->x, HDR "<message><body>x</body></message>"), XD_XS_ERROR);
    assert_string_equal(xd_xmlstream_error(f->x), "host-unknown");
    assert_int_equal(f->r.nopen, 1);
    assert_int_equal(f->r.nel, 0);

    /* also when the header arrives byte by byte */
    fresh(f);
    f->r.open_ret = "unsupported-version";
    {
        const char *s = HDR "<iq/>";
        size_t at;
        assert_int_equal(feed_chunks(f->x, s, strlen(s), 1, &at), XD_XS_ERROR);
        assert_int_equal(at, strlen(HDR));
        assert_string_equal(xd_xmlstream_error(f->x), "unsupported-version");
    }
}

/* ---- stopping, resuming, restarting ------------------------------------------------ */

#define A_EL "<a xmlns='urn:a'>one</a>"
#define B_EL "<b xmlns='urn:b'/>"
#define C_EL "<c>three</c>"

static void test_stop_resume(void **state)
{
    fx *f = *state;
    const char *in = HDR A_EL " " B_EL "\n" C_EL;
    size_t len = strlen(in), used = 12345;
    size_t end_a = strlen(HDR A_EL), end_b = strlen(HDR A_EL " " B_EL);

    f->r.stop_name = "a";
    assert_int_equal(xd_xmlstream_feed(f->x, in, len, &used), XD_XS_STOPPED);
    assert_int_equal(used, end_a);
    assert_int_equal(f->r.nel, 1);
    assert_string_equal(f->r.last_name, "a");

    f->r.stop_name = "b";
    used = 12345;
    assert_int_equal(xd_xmlstream_resume(f->x, &used), XD_XS_STOPPED);
    assert_int_equal(used, end_b); /* counted from the start of the fed data */
    assert_int_equal(f->r.nel, 2);
    assert_string_equal(f->r.last_name, "b");

    f->r.stop_name = NULL;
    assert_int_equal(xd_xmlstream_resume(f->x, &used), XD_XS_DONE);
    assert_int_equal(used, len);
    assert_int_equal(f->r.nel, 3);
    assert_string_equal(f->r.last_name, "c");

    /* a stop on the last element of a chunk: used == len */
    fresh(f);
    f->r.stop_name = "c";
    assert_int_equal(xd_xmlstream_feed(f->x, in, len, &used), XD_XS_STOPPED);
    assert_int_equal(used, len);
    assert_int_equal(xd_xmlstream_resume(f->x, &used), XD_XS_DONE);
    assert_int_equal(f->r.nel, 3);

    /* a stop in the second chunk: used counts within that chunk */
    fresh(f);
    f->r.stop_name = "b";
    assert_int_equal(feed_str(f->x, HDR "<a xmlns='urn:a'>o"), XD_XS_DONE);
    {
        const char *rest = "ne</a> " B_EL "\n" C_EL;
        assert_int_equal(xd_xmlstream_feed(f->x, rest, strlen(rest), &used), XD_XS_STOPPED);
        assert_int_equal(used, strlen("ne</a> " B_EL));
        assert_int_equal(xd_xmlstream_resume(f->x, &used), XD_XS_DONE);
        assert_int_equal(used, strlen(rest));
    }
    assert_int_equal(f->r.nel, 3);
}

#define AUTH "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGp1bGlldABy</auth>"
#define HDR2                                                                                \
    "<stream:stream to='example.com' version='1.0' xmlns='jabber:client' "                  \
    "xmlns:stream='http://etherx.jabber.org/streams'>"
#define BIND "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"

static void test_restart_same_chunk(void **state)
{
    fx *f = *state;
    const char *in = HDR AUTH HDR2 BIND "</stream:stream>";
    size_t len = strlen(in), used = 0;

    f->r.stop_name = "auth";
    assert_int_equal(xd_xmlstream_feed(f->x, in, len, &used), XD_XS_STOPPED);
    assert_int_equal(used, strlen(HDR AUTH));
    assert_int_equal(f->r.nopen, 1);
    assert_int_equal(f->r.nel, 1);
    assert_non_null(strstr(f->r.ev[1], "EL ns=urn:ietf:params:xml:ns:xmpp-sasl <auth "));
    assert_non_null(strstr(f->r.ev[1], ">AGp1bGlldABy</auth>"));

    assert_int_equal(xd_xmlstream_restart(f->x), 0);
    f->r.stop_name = NULL;
    assert_int_equal(feed_chunk(f->x, in + used, len - used), XD_XS_CLOSED);
    assert_int_equal(f->r.nopen, 2);
    assert_int_equal(f->r.nel, 2);
    assert_string_equal(f->r.ev[2], "OPEN to=example.com version=1.0 ns=jabber:client");
    assert_non_null(strstr(f->r.ev[3], "urn:ietf:params:xml:ns:xmpp-bind"));

    /* the remaining bytes fed byte by byte after the restart */
    fresh(f);
    f->r.stop_name = "auth";
    assert_int_equal(xd_xmlstream_feed(f->x, in, len, &used), XD_XS_STOPPED);
    assert_int_equal(xd_xmlstream_restart(f->x), 0);
    f->r.stop_name = NULL;
    {
        size_t at;
        assert_int_equal(feed_chunks(f->x, in + used, len - used, 1, &at), XD_XS_CLOSED);
        assert_int_equal(at, len - used);
    }
    assert_int_equal(f->r.nopen, 2);
    assert_int_equal(f->r.nel, 2);
}

static void test_restart_next_chunk(void **state)
{
    fx *f = *state;
    size_t used = 0;

    /* chunk ends exactly with the element that stops */
    f->r.stop_name = "auth";
    assert_int_equal(xd_xmlstream_feed(f->x, HDR AUTH, strlen(HDR AUTH), &used), XD_XS_STOPPED);
    assert_int_equal(used, strlen(HDR AUTH));
    assert_int_equal(xd_xmlstream_restart(f->x), 0);
    f->r.stop_name = NULL;
    assert_int_equal(feed_str(f->x, HDR2), XD_XS_DONE);
    assert_int_equal(feed_str(f->x, BIND), XD_XS_DONE);
    assert_int_equal(f->r.nopen, 2);
    assert_int_equal(f->r.nel, 2);
    assert_int_equal(feed_str(f->x, "</stream:stream>"), XD_XS_CLOSED);

    /* after a restart, a stanza without a new header is refused: the
     * parser really expects a new stream */
    fresh(f);
    f->r.stop_name = "auth";
    assert_int_equal(xd_xmlstream_feed(f->x, HDR AUTH BIND, strlen(HDR AUTH BIND), &used),
                     XD_XS_STOPPED);
    assert_int_equal(xd_xmlstream_restart(f->x), 0);
    f->r.stop_name = NULL;
    assert_int_equal(feed_str(f->x, BIND), XD_XS_ERROR);
    assert_string_equal(xd_xmlstream_error(f->x), "invalid-namespace");

    /* restart from the middle of an unfinished stanza drops it cleanly */
    fresh(f);
    assert_int_equal(feed_str(f->x, HDR "<message><body>half"), XD_XS_DONE);
    assert_int_equal(xd_xmlstream_restart(f->x), 0);
    assert_int_equal(feed_str(f->x, HDR2 "<presence/>"), XD_XS_DONE);
    assert_int_equal(f->r.nopen, 2);
    assert_int_equal(f->r.nel, 1);
    assert_string_equal(f->r.last_name, "presence");
}

/* ---- errors ------------------------------------------------------------------------- */

/* A fresh parser fed `in` in one piece and byte by byte: both end in ERROR
 * with `cond`. */
static void expect_error(fx *f, const char *in, size_t len, const char *cond)
{
    int r;
    size_t at;
    for (int mode = 0; mode < 2; mode++) {
        fresh(f);
        r = mode ? feed_chunks(f->x, in, len, 1, &at) : feed_chunk(f->x, in, len);
        if (r != XD_XS_ERROR)
            fail_msg("%s feed of \"%.*s\": status %d, expected ERROR %s",
                     mode ? "byte-wise" : "one-piece", (int)len, in, r, cond);
        if (strcmp(xd_xmlstream_error(f->x), cond) != 0)
            fail_msg("%s feed of \"%.*s\": condition %s, expected %s",
                     mode ? "byte-wise" : "one-piece", (int)len, in, xd_xmlstream_error(f->x), cond);
    }
}

#define EXPECT_ERROR(f, s, cond) expect_error(f, s, sizeof(s) - 1, cond)

/* go-sendxmpp (and its Go library): "</auth>\n" in one write, then after
 * <success/> an XML declaration and the new header.  The newline is white
 * space between two documents, not the start of the second. */
static void test_restart_whitespace_then_declaration(void **state)
{
    fx *f = *state;
    const char *first = HDR AUTH "\n";
    size_t used = 0;

    f->r.stop_name = "auth";
    assert_int_equal(xd_xmlstream_feed(f->x, first, strlen(first), &used), XD_XS_STOPPED);
    assert_int_equal(used, strlen(HDR AUTH));
    assert_int_equal(xd_xmlstream_restart(f->x), 0);
    f->r.stop_name = NULL;
    /* the rest of that read: the newline alone */
    assert_int_equal(xd_xmlstream_feed(f->x, first + used, strlen(first) - used, &used),
                     XD_XS_DONE);
    assert_int_equal(used, 1);
    assert_int_equal(feed_str(f->x, "<?xml version='1.0'?>" HDR2), XD_XS_DONE);
    assert_int_equal(f->r.nopen, 2);
    assert_int_equal(feed_str(f->x, BIND), XD_XS_DONE);
    assert_int_equal(f->r.nel, 2);

    /* white space and the declaration and header in one read, and more
     * white space in the same read after the stop */
    fresh(f);
    f->r.stop_name = "auth";
    {
        const char *in = HDR AUTH " \r\n\t<?xml version='1.0'?>" HDR2 BIND;
        size_t len = strlen(in), at;
        assert_int_equal(xd_xmlstream_feed(f->x, in, len, &used), XD_XS_STOPPED);
        assert_int_equal(xd_xmlstream_restart(f->x), 0);
        f->r.stop_name = NULL;
        assert_int_equal(xd_xmlstream_feed(f->x, in + used, len - used, &at), XD_XS_DONE);
        assert_int_equal(at, len - used);
    }
    assert_int_equal(f->r.nopen, 2);
    assert_int_equal(f->r.nel, 2);

    /* only white space is dropped: anything else before the header is not */
    fresh(f);
    f->r.stop_name = "auth";
    assert_int_equal(xd_xmlstream_feed(f->x, HDR AUTH, strlen(HDR AUTH), &used), XD_XS_STOPPED);
    assert_int_equal(xd_xmlstream_restart(f->x), 0);
    f->r.stop_name = NULL;
    assert_int_equal(feed_str(f->x, "\nx<?xml version='1.0'?>" HDR2), XD_XS_ERROR);
    assert_int_equal(f->r.nopen, 1);
}

static void test_restricted_xml(void **state)
{
    fx *f = *state;
    EXPECT_ERROR(f, "<!DOCTYPE stream:stream>" HDR, "restricted-xml");
    EXPECT_ERROR(f, "<?xml version='1.0'?><!DOCTYPE stream:stream SYSTEM 'http://x/y.dtd'>" HDR,
                 "restricted-xml");
    EXPECT_ERROR(f, "<!DOCTYPE s [<!ENTITY e 'x'>]>" HDR "<message><body>&e;</body></message>",
                 "restricted-xml");
    EXPECT_ERROR(f,
                 "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
                 "<!ENTITY lol1 '&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;'>"
                 "<!ENTITY lol2 '&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;'>"
                 "<!ENTITY lol3 '&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;'>"
                 "]>" HDR "<message><body>&lol3;</body></message>",
                 "restricted-xml");
    EXPECT_ERROR(f, "<!-- hi -->" HDR, "restricted-xml");
    EXPECT_ERROR(f, HDR "<!-- hi -->", "restricted-xml");
    EXPECT_ERROR(f, HDR "<message><!-- hi --></message>", "restricted-xml");
    EXPECT_ERROR(f, "<?foo bar?>" HDR, "restricted-xml");
    EXPECT_ERROR(f, HDR "<?foo bar?>", "restricted-xml");
    EXPECT_ERROR(f, HDR "<message><?foo bar?></message>", "restricted-xml");

    /* the XML declaration itself is fine */
    fresh(f);
    assert_int_equal(feed_str(f->x, "<?xml version='1.0' encoding='UTF-8'?>" HDR "<presence/>"),
                     XD_XS_DONE);
    assert_int_equal(f->r.nel, 1);
}

static void test_doctype_after_header(void **state)
{
    fx *f = *state;
    /* RFC 6120 11.1: a DTD anywhere in the stream is <restricted-xml/>. */
    EXPECT_ERROR(f, HDR "<!DOCTYPE foo>", "restricted-xml");
    EXPECT_ERROR(f, HDR "<!DOCTYPE foo [<!ENTITY e 'x'>]>", "restricted-xml");
}

static void test_not_well_formed(void **state)
{
    fx *f = *state;
    EXPECT_ERROR(f, HDR "<message><body>x</message>", "not-well-formed");
    EXPECT_ERROR(f, HDR "<a b='1' b='2'/>", "not-well-formed");
    EXPECT_ERROR(f, HDR "<message><body>\xff\xfe</body></message>", "not-well-formed");
    EXPECT_ERROR(f, HDR "<message><body>\xc3\x28</body></message>", "not-well-formed");
    EXPECT_ERROR(f, HDR "<message><body>a\0b</body></message>", "not-well-formed");
    EXPECT_ERROR(f, HDR "<message to='a\0b'/>", "not-well-formed");
    EXPECT_ERROR(f, HDR "<message><body>&bogus;</body></message>", "not-well-formed");
    EXPECT_ERROR(f, HDR "<message></body>", "not-well-formed");
    EXPECT_ERROR(f, HDR "</stream:streams>", "not-well-formed");
    EXPECT_ERROR(f, HDR "<a b=1/>", "not-well-formed");
    EXPECT_ERROR(f, "garbage<", "not-well-formed");
    EXPECT_ERROR(f, "x y z ", "not-well-formed");
}

static void test_namespaces(void **state)
{
    fx *f = *state;
    EXPECT_ERROR(f, HDR "<foo:bar/>", "bad-namespace-prefix");
    EXPECT_ERROR(f, HDR "<message><foo:bar/></message>", "bad-namespace-prefix");
    EXPECT_ERROR(f, HDR "<message foo:attr='1'/>", "bad-namespace-prefix");
    EXPECT_ERROR(f, "<stream:stream xmlns='jabber:client'>", "bad-namespace-prefix");

    EXPECT_ERROR(f, "<stream:stream xmlns:stream='http://example.com/wrong' xmlns='jabber:client'>",
                 "invalid-namespace");
    EXPECT_ERROR(f, "<stream xmlns='jabber:client'>", "invalid-namespace");
    EXPECT_ERROR(f, "<stream:STREAM xmlns:stream='http://etherx.jabber.org/streams'>",
                 "invalid-namespace");
    EXPECT_ERROR(f, "<message xmlns='jabber:client'/>", "invalid-namespace");
    EXPECT_ERROR(f,
                 "<stream:features xmlns:stream='http://etherx.jabber.org/streams'>",
                 "invalid-namespace");
    /* the root element's namespace and name matter, not its prefix */
    fresh(f);
    assert_int_equal(feed_str(f->x, "<s:stream xmlns:s='http://etherx.jabber.org/streams' "
                                     "xmlns='jabber:client'><presence/>"),
                     XD_XS_DONE);
    assert_int_equal(f->r.nel, 1);
    fresh(f);
    assert_int_equal(feed_str(f->x, "<stream xmlns='http://etherx.jabber.org/streams'>"
                                     "<presence xmlns='jabber:client'/>"),
                     XD_XS_DONE);
    assert_int_equal(f->r.nopen, 1);
    assert_int_equal(f->r.nel, 1);
}

static char *nested(int depth)
{
    size_t len = strlen(HDR) + (size_t)depth * 8 + 1;
    char *s = malloc(len), *p;
    if (!s)
        abort();
    p = s + sprintf(s, "%s", HDR);
    for (int i = 0; i < depth; i++)
        p += sprintf(p, "<a>");
    for (int i = 0; i < depth; i++)
        p += sprintf(p, "</a>");
    return s;
}

static void test_depth(void **state)
{
    fx *f = *state;
    char *s = keep(f, 0, nested(32));
    assert_int_equal(feed_str(f->x, s), XD_XS_DONE);
    assert_int_equal(f->r.nel, 1);

    s = keep(f, 0, nested(100));
    expect_error(f, s, strlen(s), "policy-violation");
    assert_int_equal(f->r.nel, 0);

    s = keep(f, 0, nested(100000)); /* well beyond anything: refused, not a stack overflow */
    fresh(f);
    assert_int_equal(feed_str(f->x, s), XD_XS_ERROR);
    assert_string_equal(xd_xmlstream_error(f->x), "policy-violation");
}

/* "<message><body>xxx...</body></message>" of exactly `total` bytes */
static char *stanza_of(size_t total)
{
    static const char pre[] = "<message><body>", post[] = "</body></message>";
    size_t fill = total - (sizeof(pre) - 1) - (sizeof(post) - 1);
    char *s = malloc(total + 1);
    assert_non_null(s);
    memcpy(s, pre, sizeof(pre) - 1);
    memset(s + sizeof(pre) - 1, 'x', fill);
    memcpy(s + sizeof(pre) - 1 + fill, post, sizeof(post));
    assert_int_equal(strlen(s), total);
    return s;
}

static void test_max_size(void **state)
{
    fx *f = *state;
    static const size_t sizes[] = {4000, 4096, 4097, 5000};
    static const size_t chunks[] = {100000, 1, 7, 1000};

    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        for (size_t c = 0; c < sizeof(chunks) / sizeof(chunks[0]); c++) {
            char *st = keep(f, 0, stanza_of(sizes[i]));
            int r;
            fresh(f);
            xd_xmlstream_set_max(f->x, 4096);
            assert_int_equal(feed_str(f->x, HDR), XD_XS_DONE);
            r = feed_chunks(f->x, st, sizes[i], chunks[c], NULL);
            if (sizes[i] <= 4096) {
                if (r != XD_XS_DONE || f->r.nel != 1)
                    fail_msg("%zu-byte stanza, chunks of %zu: status %d, %d elements (expected "
                             "accepted)", sizes[i], chunks[c], r, f->r.nel);
                /* and the next one still fits */
                assert_int_equal(feed_chunks(f->x, st, sizes[i], chunks[c], NULL), XD_XS_DONE);
                assert_int_equal(f->r.nel, 2);
            } else {
                if (r != XD_XS_ERROR || strcmp(xd_xmlstream_error(f->x), "policy-violation"))
                    fail_msg("%zu-byte stanza, chunks of %zu: status %d (%s), expected "
                             "policy-violation", sizes[i], chunks[c], r,
                             r == XD_XS_ERROR ? xd_xmlstream_error(f->x) : "-");
                assert_int_equal(f->r.nel, 0);
            }
        }
}

/* 1 MiB of one unterminated token, fed in 4 KiB chunks: refused long before
 * the end. */
static void giant_token(fx *f, const char *prefix, char fill)
{
    const size_t total = 1 << 20, chunk = 4096;
    char *buf = keep(f, 0, malloc(total));
    size_t at;
    int r;
    memset(buf, fill, total);
    memcpy(buf, prefix, strlen(prefix));
    fresh(f);
    xd_xmlstream_set_max(f->x, 4096);
    assert_int_equal(feed_str(f->x, HDR), XD_XS_DONE);
    r = feed_chunks(f->x, buf, total, chunk, &at);
    if (r != XD_XS_ERROR)
        fail_msg("giant token \"%s...\": status %d after all %zu bytes", prefix, r, at);
    assert_string_equal(xd_xmlstream_error(f->x), "policy-violation");
    if (at > 4096 + 2 * chunk)
        fail_msg("giant token \"%s...\": refused only after %zu bytes (max 4096)", prefix, at);
}

static void test_giant_tokens(void **state)
{
    fx *f = *state;
    giant_token(f, "<message to='", 'a');           /* attribute value */
    giant_token(f, "<message ", 'a');               /* attribute name */
    giant_token(f, "<m", 'a');                      /* element name */
    giant_token(f, "<message><body>", 'a');         /* text */
    giant_token(f, "<message><body><![CDATA[", 'a'); /* CDATA */
    giant_token(f, "<message><body a='", 'b');      /* attribute of a child */
    giant_token(f, "<message><body>&#x", '0');      /* a char reference */
}

static void test_giant_header(void **state)
{
    fx *f = *state;
    const size_t total = 1 << 20, chunk = 4096;
    char *buf = keep(f, 0, malloc(total));
    size_t at;
    memset(buf, 'a', total);
    memcpy(buf, "<stream:stream to='", 19);
    xd_xmlstream_set_max(f->x, 4096);
    assert_int_equal(feed_chunks(f->x, buf, total, chunk, &at), XD_XS_ERROR);
    assert_string_equal(xd_xmlstream_error(f->x), "policy-violation");
    assert_true(at <= 4096 + 2 * chunk);
}

/* Whitespace keepalives between stanzas are not a stanza: many of them,
 * adding up to more than the max, must not end the stream. */
static void test_keepalives_not_counted(void **state)
{
    fx *f = *state;
    char *ws = keep(f, 0, malloc(10000));
    size_t at;
    memset(ws, ' ', 10000);
    xd_xmlstream_set_max(f->x, 4096);
    assert_int_equal(feed_str(f->x, HDR "<presence/>"), XD_XS_DONE);
    /* 10000 one-byte keepalives, as a client would send them over hours */
    int r = feed_chunks(f->x, ws, 10000, 1, &at);
    if (r != XD_XS_DONE)
        fail_msg("10000 single-space keepalives with max 4096: status %d (%s) after %zu of them",
                 r, r == XD_XS_ERROR ? xd_xmlstream_error(f->x) : "-", at);
    assert_int_equal(feed_str(f->x, "<presence/>"), XD_XS_DONE);
    assert_int_equal(f->r.nel, 2);
}

/* Every complete token is parsed as soon as its last byte is fed: a server
 * must answer a header that arrived in two reads without waiting for more
 * bytes the client will never send (expat's reparse deferral must be off). */
static void test_split_token_parsed_at_once(void **state)
{
    fx *f = *state;
    const char *hdr = HDR;
    const char *st = "<message to='someone-with-a-long-name@a-long-domain.example.com/resource' "
                     "id='abcdefghijklmnopqrstuvwxyz0123456789' type='chat'/>";

    for (size_t split = 1; split < strlen(hdr); split += 7) {
        fresh(f);
        assert_int_equal(feed_chunk(f->x, hdr, split), XD_XS_DONE);
        assert_int_equal(f->r.nopen, 0);
        assert_int_equal(feed_chunk(f->x, hdr + split, strlen(hdr) - split), XD_XS_DONE);
        if (f->r.nopen != 1)
            fail_msg("header fed as %zu + %zu bytes: open() not called once all of it was fed",
                     split, strlen(hdr) - split);
    }
    for (size_t split = 1; split < strlen(st); split += 5) {
        fresh(f);
        assert_int_equal(feed_str(f->x, HDR), XD_XS_DONE);
        assert_int_equal(feed_chunk(f->x, st, split), XD_XS_DONE);
        assert_int_equal(feed_chunk(f->x, st + split, strlen(st) - split), XD_XS_DONE);
        if (f->r.nel != 1)
            fail_msg("<message/> fed as %zu + %zu bytes: no element once all of it was fed",
                     split, strlen(st) - split);
    }
}

/* ---- random garbage ------------------------------------------------------------- */

static const char *const conditions[] = {
    "bad-format", "bad-namespace-prefix", "conflict", "connection-timeout", "host-gone",
    "host-unknown", "improper-addressing", "internal-server-error", "invalid-from",
    "invalid-namespace", "invalid-xml", "not-authorized", "not-well-formed",
    "policy-violation", "remote-connection-failed", "reset", "resource-constraint",
    "restricted-xml", "see-other-host", "system-shutdown", "undefined-condition",
    "unsupported-encoding", "unsupported-feature", "unsupported-stanza-type",
    "unsupported-version", NULL};

static int is_condition(const char *c)
{
    for (int i = 0; conditions[i]; i++)
        if (strcmp(conditions[i], c) == 0)
            return 1;
    return 0;
}

static void test_random_garbage(void **state)
{
    fx *f = *state;
    static const char alphabet[] = "<>/='\" \n:abxmlns&;#![]-?CDATA\xc3\xa9\xff\x00stream";
    static const char *const frags[] = {"<", ">", "</", "/>", "='", "'", "xmlns", "xmlns:",
                                        "stream:", "<message>", "</message>", "<a>", "</a>",
                                        "&amp;", "&#", "<![CDATA[", "]]>", "<!--", "<?",
                                        "<!DOCTYPE", "xml:lang", "jabber:client", "\xf0\x9f",
                                        "</stream:stream>"};
    char buf[2048];
    int ndone = 0, nerr = 0, nel = 0, nwf = 0, nother = 0;

    rng_state = 0x123456789ABCDEF1ULL;
    for (int round = 0; round < 3000; round++) {
        size_t len = 0, off = 0, target = 1 + rnd() % (sizeof(buf) - 300);
        int r = XD_XS_DONE;
        if (round % 2 == 0) { /* half start with a valid header */
            memcpy(buf, HDR, strlen(HDR));
            len = strlen(HDR);
        }
        while (len < target) {
            uint64_t k = rnd();
            if (k % 4 == 0) {
                const char *fr = frags[(k >> 8) % (sizeof(frags) / sizeof(frags[0]))];
                size_t n = strlen(fr);
                memcpy(buf + len, fr, n);
                len += n;
            } else if (k % 4 == 1) {
                buf[len++] = (char)(k >> 16);
            } else {
                buf[len++] = alphabet[(k >> 8) % (sizeof(alphabet) - 1)];
            }
        }
        fresh(f);
        if (round % 3 == 0)
            xd_xmlstream_set_max(f->x, 64 + rnd() % 512);
        while (off < len) {
            size_t n = 1 + rnd() % 64;
            if (n > len - off)
                n = len - off;
            r = feed_chunk(f->x, buf + off, n);
            off += n;
            if (r != XD_XS_DONE)
                break;
        }
        nel += f->r.nel;
        if (r == XD_XS_CLOSED)
            continue; /* the garbage happened to close the stream properly */
        if (r == XD_XS_DONE)
            ndone++;
        if (r == XD_XS_ERROR) {
            nerr++;
            if (strcmp(xd_xmlstream_error(f->x), "not-well-formed") == 0)
                nwf++;
            else
                nother++;
        }
        if (r != XD_XS_DONE && r != XD_XS_ERROR)
            fail_msg("round %d: status %d", round, r);
        if (r == XD_XS_ERROR && !is_condition(xd_xmlstream_error(f->x)))
            fail_msg("round %d: condition '%s' is not an RFC 6120 stream error", round,
                     xd_xmlstream_error(f->x));
    }
    /* the generator does reach the interesting places */
    assert_true(ndone > 0);
    assert_true(nerr > 100);
    assert_true(nwf > 0);
    assert_true(nother > 0);
    assert_true(nel > 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_whole_stream, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idle_parser, setup, teardown),
        cmocka_unit_test_setup_teardown(test_open_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_resume, setup, teardown),
        cmocka_unit_test_setup_teardown(test_restart_same_chunk, setup, teardown),
        cmocka_unit_test_setup_teardown(test_restart_next_chunk, setup, teardown),
        cmocka_unit_test_setup_teardown(test_restart_whitespace_then_declaration, setup, teardown),
        cmocka_unit_test_setup_teardown(test_restricted_xml, setup, teardown),
        cmocka_unit_test_setup_teardown(test_doctype_after_header, setup, teardown),
        cmocka_unit_test_setup_teardown(test_not_well_formed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_namespaces, setup, teardown),
        cmocka_unit_test_setup_teardown(test_depth, setup, teardown),
        cmocka_unit_test_setup_teardown(test_max_size, setup, teardown),
        cmocka_unit_test_setup_teardown(test_giant_tokens, setup, teardown),
        cmocka_unit_test_setup_teardown(test_giant_header, setup, teardown),
        cmocka_unit_test_setup_teardown(test_keepalives_not_counted, setup, teardown),
        cmocka_unit_test_setup_teardown(test_split_token_parsed_at_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_random_garbage, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
