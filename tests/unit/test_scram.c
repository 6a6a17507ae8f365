/*
 * Unit tests for core/scram.c: the RFC 5802 section 5 (SCRAM-SHA-1) and
 * RFC 7677 section 3 (SCRAM-SHA-256) example exchanges run end to end
 * through the server, rejection of forged or malformed messages, base64 and
 * password verification.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xmppd/scram.h>

#include "scram_test.h"

struct vector {
    xd_scram_hash hash;
    const char *password;
    const char *salt_b64;
    unsigned iterations;
    const char *snonce;
    const char *client_first;
    const char *server_first;
    const char *client_final;
    const char *server_final;
};

static const struct vector RFC5802 = {
    XD_SCRAM_SHA1,
    "pencil",
    "QSXCR+Q6sek8bf92",
    4096,
    "3rfcNHYJY1ZVvWVs7j",
    "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
    "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
    "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
    "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
};

static const struct vector RFC7677 = {
    XD_SCRAM_SHA256,
    "pencil",
    "W22ZaJ0SNY7soEsUEjb6gQ==",
    4096,
    "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
    "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
};

static void creds_for(const struct vector *v, xd_scram_creds *c)
{
    size_t n = 0;
    unsigned char *salt = xd_base64_decode(v->salt_b64, strlen(v->salt_b64), &n);
    assert_non_null(salt);
    assert_true(n <= sizeof c->salt);
    memset(c, 0, sizeof *c);
    c->hash = v->hash;
    c->iterations = v->iterations;
    memcpy(c->salt, salt, n);
    c->salt_len = n;
    free(salt);
    assert_int_equal(xd_scram_derive(c, v->password), 0);
}

/* Runs client-first and server-first of v with credentials c; returns the
 * server ready for client-final. */
static xd_scram_server *start_exchange_with(const struct vector *v, const xd_scram_creds *c)
{
    xd_scram_server *s = xd_scram_server_new(v->hash);
    assert_non_null(s);
    const char *user = NULL, *err = NULL;
    assert_int_equal(xd_scram_server_start(s, v->client_first, strlen(v->client_first), &user, &err), 0);
    assert_string_equal(user, "user");
    xd_scram_server_set_nonce(s, v->snonce);
    char *out = NULL;
    size_t out_len = 0;
    assert_int_equal(xd_scram_server_first(s, c, &out, &out_len, &err), 0);
    assert_int_equal(out_len, strlen(v->server_first));
    assert_string_equal(out, v->server_first);
    free(out);
    return s;
}

static xd_scram_server *start_exchange(const struct vector *v)
{
    xd_scram_creds c;
    creds_for(v, &c);
    return start_exchange_with(v, &c);
}

/* Feeds client_final; returns the result, with *err / server-final. */
static int finish(xd_scram_server *s, const char *client_final, char **out, const char **err)
{
    size_t out_len = 0;
    *out = NULL;
    *err = NULL;
    return xd_scram_server_final(s, client_final, strlen(client_final), out, &out_len, err);
}

static void run_vector(const struct vector *v)
{
    xd_scram_server *s = start_exchange(v);
    char *out;
    const char *err;
    assert_int_equal(finish(s, v->client_final, &out, &err), 0);
    assert_string_equal(out, v->server_final);
    free(out);
    /* The exchange is over: another final is out of order. */
    assert_int_equal(finish(s, v->client_final, &out, &err), -1);
    assert_string_equal(err, "malformed-request");
    xd_scram_server_free(s);
}

static void test_rfc5802_sha1(void **state)
{
    (void)state;
    run_vector(&RFC5802);
}

static void test_rfc7677_sha256(void **state)
{
    (void)state;
    run_vector(&RFC7677);
}

/* Expects client_final to be refused with want_err. */
static void expect_final_fails(const struct vector *v, const char *client_final, const char *want_err)
{
    xd_scram_server *s = start_exchange(v);
    char *out;
    const char *err;
    assert_int_equal(finish(s, client_final, &out, &err), -1);
    assert_null(out);
    assert_string_equal(err, want_err);
    xd_scram_server_free(s);
}

static void test_wrong_proof(void **state)
{
    (void)state;
    /* Proofs of the right length with one changed byte. */
    expect_final_fails(&RFC5802,
                       "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,"
                       "p=w0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
                       "not-authorized");
    expect_final_fails(&RFC7677,
                       "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                       "p=eHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
                       "not-authorized");

    /* Credentials made from another password must reject the RFC proof. */
    xd_scram_creds c;
    creds_for(&RFC5802, &c);
    assert_int_equal(xd_scram_derive(&c, "pencil2"), 0);
    xd_scram_server *s = xd_scram_server_new(XD_SCRAM_SHA1);
    const char *user, *err;
    char *out;
    size_t out_len;
    assert_int_equal(xd_scram_server_start(s, RFC5802.client_first, strlen(RFC5802.client_first), &user, &err), 0);
    xd_scram_server_set_nonce(s, RFC5802.snonce);
    assert_int_equal(xd_scram_server_first(s, &c, &out, &out_len, &err), 0);
    free(out);
    assert_int_equal(finish(s, RFC5802.client_final, &out, &err), -1);
    assert_string_equal(err, "not-authorized");
    xd_scram_server_free(s);
}

static void test_wrong_proof_length(void **state)
{
    (void)state;
    expect_final_fails(&RFC5802, "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=AAAA",
                       "malformed-request");
    expect_final_fails(&RFC5802, "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=!!!!",
                       "malformed-request");
    expect_final_fails(&RFC5802, "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=",
                       "malformed-request");
}

static void test_tampered_nonce(void **state)
{
    (void)state;
    const char *p = ",p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=";
    static const char *const nonces[] = {
        "fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7k", /* last char changed */
        "fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7",  /* truncated */
        "fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7jX",/* extended */
        "fyko+d2lbbFgONRv9qkxdawL",                   /* client part only */
    };
    for (size_t i = 0; i < sizeof nonces / sizeof nonces[0]; i++) {
        char buf[256];
        snprintf(buf, sizeof buf, "c=biws,r=%s%s", nonces[i], p);
        expect_final_fails(&RFC5802, buf, "not-authorized");
    }
}

static void test_cbind_mismatch(void **state)
{
    (void)state;
    /* "eSws" is base64("y,,"), but the client sent "n,,". */
    expect_final_fails(&RFC5802,
                       "c=eSws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,"
                       "p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
                       "not-authorized");
    expect_final_fails(&RFC5802,
                       "c=,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,"
                       "p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
                       "not-authorized");
}

/* The "y" flag is accepted (we offer no -PLUS) and c= must then be "eSws". */
static void test_flag_y(void **state)
{
    (void)state;
    xd_scram_creds c;
    creds_for(&RFC5802, &c);
    xd_scram_server *s = xd_scram_server_new(XD_SCRAM_SHA1);
    const char *user, *err;
    char *out;
    size_t out_len;
    const char *cf = "y,,n=user,r=abc";
    assert_int_equal(xd_scram_server_start(s, cf, strlen(cf), &user, &err), 0);
    xd_scram_server_set_nonce(s, "def");
    assert_int_equal(xd_scram_server_first(s, &c, &out, &out_len, &err), 0);
    assert_string_equal(out, "r=abcdef,s=QSXCR+Q6sek8bf92,i=4096");
    free(out);
    /* Syntactically right, c= right, proof wrong: gets as far as the proof. */
    assert_int_equal(finish(s, "c=eSws,r=abcdef,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=", &out, &err), -1);
    assert_string_equal(err, "not-authorized");
    xd_scram_server_free(s);
}

static void expect_start_fails(xd_scram_hash h, const char *msg, size_t len, const char *want_err)
{
    xd_scram_server *s = xd_scram_server_new(h);
    assert_non_null(s);
    const char *user = (const char *)1, *err = NULL;
    assert_int_equal(xd_scram_server_start(s, msg, len, &user, &err), -1);
    assert_null(user);
    assert_non_null(err);
    if (want_err)
        assert_string_equal(err, want_err);
    xd_scram_server_free(s);
}

static void test_channel_binding_refused(void **state)
{
    (void)state;
    const char *m = "p=tls-unique,,n=user,r=fyko+d2lbbFgONRv9qkxdawL";
    expect_start_fails(XD_SCRAM_SHA1, m, strlen(m), "malformed-request");
    m = "p=tls-exporter,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    expect_start_fails(XD_SCRAM_SHA256, m, strlen(m), "malformed-request");
}

static void test_authzid(void **state)
{
    (void)state;
    const char *m = "n,a=admin,n=user,r=abc";
    expect_start_fails(XD_SCRAM_SHA256, m, strlen(m), "invalid-authzid");

    /* An empty a= is the same as none. */
    xd_scram_server *s = xd_scram_server_new(XD_SCRAM_SHA256);
    const char *user, *err;
    m = "n,a=,n=user,r=abc";
    assert_int_equal(xd_scram_server_start(s, m, strlen(m), &user, &err), 0);
    assert_string_equal(user, "user");
    xd_scram_server_free(s);
}

static void test_username_escapes(void **state)
{
    (void)state;
    xd_scram_server *s = xd_scram_server_new(XD_SCRAM_SHA256);
    const char *user, *err;
    const char *m = "n,,n=a=2Cb=3Dc\xc3\xa9,r=abc,x=ext";
    assert_int_equal(xd_scram_server_start(s, m, strlen(m), &user, &err), 0);
    assert_string_equal(user, "a,b=c\xc3\xa9");
    xd_scram_server_free(s);
}

static void test_malformed_first(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "",
        "n",
        "n,",
        "n,,",
        "x,,n=user,r=abc",
        "n,,r=abc",               /* missing n= */
        "n,,n=,r=abc",            /* empty user */
        "n,,n=us=2Xer,r=abc",     /* bad escape */
        "n,,n=user=,r=abc",       /* truncated escape */
        "n,,n=user=2,r=abc",
        "n,,n=us=2cer,r=abc",     /* escapes are upper case */
        "n,,n=\xff\xfe,r=abc",    /* not UTF-8 */
        "n,,n=\xc0\xaf,r=abc",    /* overlong */
        "n,,n=\xed\xa0\x80,r=abc",/* surrogate */
        "n,,n=user",              /* missing r= */
        "n,,n=user,r=",           /* empty nonce */
        "n,,n=user,r=ab c",       /* space in nonce */
        "n,,n=user,r=ab\x7f",
        "n,,n=user,r=abc,",       /* empty extension */
        "n,,n=user,r=abc,x",
        "n,,n=user,r=abc,1=x",
        "n,,n=user,r=abc,x=",
        "n,,m=foo,n=user,r=abc",  /* mandatory extension */
        "n,a,n=user,r=abc",
        "n,b=x,n=user,r=abc",
        "n,,,n=user,r=abc",
        "nn,,n=user,r=abc",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_start_fails(XD_SCRAM_SHA1, bad[i], strlen(bad[i]), "malformed-request");

    /* Embedded NUL. */
    static const char nul[] = "n,,n=us\0er,r=abc";
    expect_start_fails(XD_SCRAM_SHA1, nul, sizeof nul - 1, "malformed-request");

    /* Over-long: a valid message padded past 4096 bytes with an extension. */
    size_t n = 5000;
    char *big = malloc(n + 1);
    assert_non_null(big);
    strcpy(big, "n,,n=user,r=abc,x=");
    memset(big + strlen(big), 'a', n - strlen(big));
    big[n] = '\0';
    expect_start_fails(XD_SCRAM_SHA1, big, n, "malformed-request");
    /* ...while the same at exactly 4096 bytes is accepted. */
    xd_scram_server *s = xd_scram_server_new(XD_SCRAM_SHA1);
    const char *user, *err;
    assert_int_equal(xd_scram_server_start(s, big, 4096, &user, &err), 0);
    xd_scram_server_free(s);
    free(big);
}

static void test_malformed_final(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "",
        "p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        "c=biws,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j",
        "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=,x=1",
        "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts",
        "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p= v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        ",",
        "c=biws,",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_final_fails(&RFC5802, bad[i], "malformed-request");
}

/* An unknown optional extension before p= is ignored, but it is part of
 * AuthMessage, so the RFC proof no longer matches: fails on the proof. */
static void test_final_extension_in_auth_message(void **state)
{
    (void)state;
    expect_final_fails(&RFC5802,
                       "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,x=y,"
                       "p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
                       "not-authorized");
}

static void test_out_of_order(void **state)
{
    (void)state;
    xd_scram_creds c;
    creds_for(&RFC5802, &c);
    const char *user, *err;
    char *out;
    size_t out_len;

    /* first before start */
    xd_scram_server *s = xd_scram_server_new(XD_SCRAM_SHA1);
    assert_int_equal(xd_scram_server_first(s, &c, &out, &out_len, &err), -1);
    assert_null(out);
    assert_string_equal(err, "malformed-request");
    xd_scram_server_free(s);

    /* final before first */
    s = xd_scram_server_new(XD_SCRAM_SHA1);
    assert_int_equal(xd_scram_server_start(s, RFC5802.client_first, strlen(RFC5802.client_first), &user, &err), 0);
    assert_int_equal(finish(s, RFC5802.client_final, &out, &err), -1);
    assert_string_equal(err, "malformed-request");
    xd_scram_server_free(s);

    /* start twice */
    s = xd_scram_server_new(XD_SCRAM_SHA1);
    assert_int_equal(xd_scram_server_start(s, RFC5802.client_first, strlen(RFC5802.client_first), &user, &err), 0);
    assert_int_equal(xd_scram_server_start(s, RFC5802.client_first, strlen(RFC5802.client_first), &user, &err), -1);
    assert_string_equal(err, "malformed-request");
    xd_scram_server_free(s);

    /* anything after a failure */
    s = xd_scram_server_new(XD_SCRAM_SHA1);
    assert_int_equal(xd_scram_server_start(s, "x", 1, &user, &err), -1);
    assert_int_equal(xd_scram_server_first(s, &c, &out, &out_len, &err), -1);
    assert_string_equal(err, "malformed-request");
    xd_scram_server_free(s);

    /* creds of the wrong hash */
    s = xd_scram_server_new(XD_SCRAM_SHA256);
    assert_int_equal(xd_scram_server_start(s, RFC5802.client_first, strlen(RFC5802.client_first), &user, &err), 0);
    assert_int_equal(xd_scram_server_first(s, &c, &out, &out_len, &err), -1);
    xd_scram_server_free(s);

    xd_scram_server_free(NULL);
    assert_null(xd_scram_server_new((xd_scram_hash)7));
}

/* Small fixed-seed generator, so failures reproduce. */
static uint32_t xorshift(uint32_t *st)
{
    uint32_t x = *st;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *st = x;
}

static void test_random_bytes(void **state)
{
    (void)state;
    uint32_t seed = 0x5c7a4d1u;
    static const char alphabet[] = "nyparcmsiv=,23CDX+/ \x01\x80\xff";
    unsigned char buf[300];
    xd_scram_creds c;
    creds_for(&RFC5802, &c);
    for (int round = 0; round < 2000; round++) {
        size_t len = xorshift(&seed) % sizeof buf;
        int from_alphabet = round & 1;
        for (size_t i = 0; i < len; i++) {
            uint32_t r = xorshift(&seed);
            buf[i] = from_alphabet ? (unsigned char)alphabet[r % (sizeof alphabet - 1)]
                                   : (unsigned char)r;
        }
        /* Random first message: never crashes, either fails cleanly or
         * (rarely) parses. */
        xd_scram_server *s = xd_scram_server_new(XD_SCRAM_SHA1);
        const char *user = NULL, *err = NULL;
        int rc = xd_scram_server_start(s, (const char *)buf, len, &user, &err);
        if (rc != 0)
            assert_non_null(err);
        xd_scram_server_free(s);

        /* Random final message after a valid start: must fail. */
        s = start_exchange_with(&RFC5802, &c);
        char *out = NULL;
        size_t out_len = 0;
        err = NULL;
        assert_int_equal(xd_scram_server_final(s, (const char *)buf, len, &out, &out_len, &err), -1);
        assert_null(out);
        assert_non_null(err);
        xd_scram_server_free(s);

        /* Random base64: no crash; if accepted, re-encodes canonically. */
        size_t n = 0;
        unsigned char *d = xd_base64_decode((const char *)buf, len, &n);
        if (d && len > 1) {
            char *e = xd_base64_encode(d, n);
            assert_int_equal(strlen(e), len);
            assert_memory_equal(e, buf, len);
            free(e);
        }
        free(d);
    }
}

static void test_base64(void **state)
{
    (void)state;
    /* RFC 4648 section 10 test vectors. */
    static const char *const plain[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
    static const char *const enc[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
    for (size_t i = 0; i < 7; i++) {
        char *e = xd_base64_encode((const unsigned char *)plain[i], strlen(plain[i]));
        assert_non_null(e);
        assert_string_equal(e, enc[i]);
        size_t n = 99;
        unsigned char *d = xd_base64_decode(e, strlen(e), &n);
        assert_non_null(d);
        assert_int_equal(n, strlen(plain[i]));
        assert_memory_equal(d, plain[i], n);
        free(d);
        free(e);
    }
    /* All byte values round-trip, at every length mod 3. */
    unsigned char all[256];
    for (int i = 0; i < 256; i++)
        all[i] = (unsigned char)i;
    for (size_t len = 0; len <= 256; len += 1) {
        char *e = xd_base64_encode(all, len);
        size_t n;
        unsigned char *d = xd_base64_decode(e, strlen(e), &n);
        assert_non_null(d);
        assert_int_equal(n, len);
        assert_memory_equal(d, all, len);
        free(d);
        free(e);
    }
    /* "=" is the XMPP empty payload. */
    size_t n = 99;
    unsigned char *d = xd_base64_decode("=", 1, &n);
    assert_non_null(d);
    assert_int_equal(n, 0);
    free(d);

    static const char *const invalid[] = {
        "Zg", "Zg=", "Zg===", "Z===", "====", "==", "Zm9v====", "Zm=v", "Z=9v", "Zm9vYg=a",
        "Zm 9v", "Zm9v\n", " Zm9v", "Zm9-", "Zm9_", "Zm9v*A==", "Zh==", "Zm9=", "Zm8=Zm8=",
        "Zm\x80v",
    };
    for (size_t i = 0; i < sizeof invalid / sizeof invalid[0]; i++) {
        d = xd_base64_decode(invalid[i], strlen(invalid[i]), &n);
        if (d)
            fail_msg("accepted invalid base64 \"%s\"", invalid[i]);
    }
    assert_null(xd_base64_decode("Zm9v", 4, NULL));
}

static void test_verify_password(void **state)
{
    (void)state;
    xd_scram_hash hashes[] = {XD_SCRAM_SHA1, XD_SCRAM_SHA256};
    for (size_t i = 0; i < 2; i++) {
        xd_scram_creds c;
        assert_int_equal(xd_scram_make(&c, hashes[i], 64, "s3cret \xc3\xa9"), 0);
        assert_int_equal(c.hash, hashes[i]);
        assert_int_equal(c.iterations, 64);
        assert_int_equal(c.salt_len, XD_SCRAM_SALT_LEN);
        assert_int_equal(xd_scram_verify_password(&c, "s3cret \xc3\xa9"), 1);
        assert_int_equal(xd_scram_verify_password(&c, "s3cret"), 0);
        assert_int_equal(xd_scram_verify_password(&c, ""), 0);

        /* Two makes with the same password get different salts and keys. */
        xd_scram_creds c2;
        assert_int_equal(xd_scram_make(&c2, hashes[i], 64, "s3cret \xc3\xa9"), 0);
        assert_memory_not_equal(c.salt, c2.salt, XD_SCRAM_SALT_LEN);
        assert_memory_not_equal(c.stored_key, c2.stored_key, xd_scram_hash_len(hashes[i]));
    }
    /* The RFC 5802 credentials verify "pencil". */
    xd_scram_creds c;
    creds_for(&RFC5802, &c);
    assert_int_equal(xd_scram_verify_password(&c, "pencil"), 1);
    assert_int_equal(xd_scram_verify_password(&c, "Pencil"), 0);

    assert_int_equal(xd_scram_verify_password(NULL, "x"), -1);
    assert_int_equal(xd_scram_make(&c, XD_SCRAM_SHA1, 0, "x"), -1);
    assert_int_equal(xd_scram_make(&c, (xd_scram_hash)9, 4096, "x"), -1);
    c.salt_len = 0;
    assert_int_equal(xd_scram_derive(&c, "x"), -1);
}

static void test_names(void **state)
{
    (void)state;
    assert_int_equal(xd_scram_hash_len(XD_SCRAM_SHA1), 20);
    assert_int_equal(xd_scram_hash_len(XD_SCRAM_SHA256), 32);
    assert_int_equal(xd_scram_hash_len((xd_scram_hash)0), 0);
    assert_string_equal(xd_scram_mech_name(XD_SCRAM_SHA1), "SCRAM-SHA-1");
    assert_string_equal(xd_scram_mech_name(XD_SCRAM_SHA256), "SCRAM-SHA-256");
    assert_null(xd_scram_mech_name((xd_scram_hash)0));
}

/* Without the test hook the server nonce is random base64 appended to the
 * client's, and two exchanges differ. */
static void test_random_server_nonce(void **state)
{
    (void)state;
    xd_scram_creds c;
    creds_for(&RFC7677, &c);
    char *outs[2];
    for (int i = 0; i < 2; i++) {
        xd_scram_server *s = xd_scram_server_new(XD_SCRAM_SHA256);
        const char *user, *err;
        size_t out_len;
        assert_int_equal(xd_scram_server_start(s, RFC7677.client_first, strlen(RFC7677.client_first), &user, &err), 0);
        assert_int_equal(xd_scram_server_first(s, &c, &outs[i], &out_len, &err), 0);
        assert_true(strncmp(outs[i], "r=rOprNGfwEbeRWgbNEkqO", 22) == 0);
        /* 32 base64 characters of server nonce, then ",s=". */
        assert_true(strncmp(outs[i] + 22 + 32, ",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", 34) == 0);
        xd_scram_server_free(s);
    }
    assert_string_not_equal(outs[0], outs[1]);
    free(outs[0]);
    free(outs[1]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rfc5802_sha1),
        cmocka_unit_test(test_rfc7677_sha256),
        cmocka_unit_test(test_wrong_proof),
        cmocka_unit_test(test_wrong_proof_length),
        cmocka_unit_test(test_tampered_nonce),
        cmocka_unit_test(test_cbind_mismatch),
        cmocka_unit_test(test_flag_y),
        cmocka_unit_test(test_channel_binding_refused),
        cmocka_unit_test(test_authzid),
        cmocka_unit_test(test_username_escapes),
        cmocka_unit_test(test_malformed_first),
        cmocka_unit_test(test_malformed_final),
        cmocka_unit_test(test_final_extension_in_auth_message),
        cmocka_unit_test(test_out_of_order),
        cmocka_unit_test(test_random_bytes),
        cmocka_unit_test(test_base64),
        cmocka_unit_test(test_verify_password),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_random_server_nonce),
    };
    return cmocka_run_group_tests_name("scram", tests, NULL, NULL);
}
