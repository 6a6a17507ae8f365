/*
 * libFuzzer harness for core/xmlstream.c.
 *
 * Input layout:
 *   byte 0     config: bits 0-1 max stanza size (4096, 128, 512, 1024),
 *              bits 2-4 all set: open() refuses the header
 *   byte 1     stop policy: each element callback consumes one bit (cycling);
 *              a set bit returns 1 (stop)
 *   byte 2     what a stop does (2 bits per stop, cycling): 0/1 resume in the
 *              same bytes, 2 restart and feed the rest (SASL), 3 restart and
 *              drop the rest (STARTTLS)
 *   bytes 3-6  chunk sizes, cycled: size = 1 + byte
 *   rest       the stream bytes
 * Each chunk is copied into a heap buffer of exactly its size (so ASan sees any
 * read past it) that stays untouched while the parser is suspended in it,
 * as core/stream.c does.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <strophe.h>

#include "xmlstream.h"

static xmpp_ctx_t *ctx;

typedef struct st {
    uint8_t stop_bits, act_bits;
    unsigned nel, nstop;
    int refuse_open;
    int last_action; /* what to do for the stop just requested */
} st;

static const char *cb_open(void *ud, const char **attrs, const char *ns)
{
    st *s = ud;
    size_t n = 0;
    for (; attrs && attrs[0]; attrs += 2) {
        if (!attrs[1])
            abort(); /* attrs come in pairs */
        n += strlen(attrs[0]) + strlen(attrs[1]);
    }
    if (ns)
        n += strlen(ns);
    (void)n;
    return s->refuse_open ? "host-unknown" : NULL;
}

static void walk(xmpp_stanza_t *el, int depth)
{
    if (depth > 64)
        abort(); /* deeper than DEPTH_MAX should be impossible */
    (void)xmpp_stanza_get_name(el);
    (void)xmpp_stanza_get_ns(el);
    for (xmpp_stanza_t *c = xmpp_stanza_get_children(el); c; c = xmpp_stanza_get_next(c))
        walk(c, depth + 1);
}

static int cb_element(void *ud, xmpp_stanza_t *el)
{
    st *s = ud;
    char *buf = NULL;
    size_t len = 0;
    if (!el)
        abort();
    walk(el, 0);
    if (xmpp_stanza_to_text(el, &buf, &len) == XMPP_EOK) {
        if (buf && strlen(buf) != len)
            abort();
        xmpp_free(ctx, buf);
    }
    xmpp_stanza_release(el);
    int stop = (s->stop_bits >> (s->nel++ & 7)) & 1;
    if (stop)
        s->last_action = (s->act_bits >> (2 * (s->nstop++ & 3))) & 3;
    return stop;
}

static const xd_xmlstream_cb CB = {cb_open, cb_element};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    xmpp_initialize();
    ctx = xmpp_ctx_new(NULL, NULL);
    if (!ctx)
        abort();
    return 0;
}

static const size_t MAXES[4] = {4096, 128, 512, 1024};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 7)
        return 0;
    st s = {0};
    s.refuse_open = ((data[0] >> 2) & 7) == 7;
    s.stop_bits = data[1];
    s.act_bits = data[2];
    const uint8_t *sizes = data + 3;
    data += 7;
    size -= 7;

    xd_xmlstream *x = xd_xmlstream_new(ctx, &CB, &s);
    if (!x)
        abort();
    xd_xmlstream_set_max(x, MAXES[data[-7] & 3]);

    size_t off = 0;
    unsigned ci = 0;
    int done = 0;
    char *pend = NULL;     /* bytes left over after a SASL-style restart */
    size_t pend_len = 0;
    while (!done && (off < size || pend)) {
        char *in;
        size_t in_len;
        if (pend) {
            in = pend;
            in_len = pend_len;
            pend = NULL;
        } else {
            size_t n = 1 + (size_t)sizes[ci++ & 3];
            if (n > size - off)
                n = size - off;
            in = malloc(n ? n : 1);
            memcpy(in, data + off, n);
            in_len = n;
            off += n;
        }
        size_t used = 0;
        int r = xd_xmlstream_feed(x, in, in_len, &used);
        for (;;) {
            if (used > in_len)
                abort(); /* *used must stay inside the data */
            if (r == XD_XS_STOPPED) {
                int a = s.last_action;
                if (a <= 1) {
                    size_t before = used;
                    r = xd_xmlstream_resume(x, &used);
                    if (r != XD_XS_ERROR && used < before)
                        abort(); /* progress never goes backwards */
                    continue;
                }
                if (xd_xmlstream_restart(x) != 0)
                    abort();
                if (a == 2 && used < in_len) {
                    /* the next stream header may already be here */
                    pend_len = in_len - used;
                    pend = malloc(pend_len);
                    memcpy(pend, in + used, pend_len);
                }
                break;
            }
            if (r == XD_XS_DONE) {
                if (used != in_len)
                    abort(); /* DONE means every byte was parsed */
                break;
            }
            if (r == XD_XS_ERROR) {
                const char *e = xd_xmlstream_error(x);
                if (!e || !*e)
                    abort();
            }
            done = 1; /* ERROR or CLOSED: the session ends */
            break;
        }
        free(in);
    }
    free(pend);
    xd_xmlstream_free(x);
    return 0;
}
