/*
 * Unit tests for core/jid.c: RFC 7622 3.5 examples, PRECIS profiles
 * (RFC 8265), IDNA domains, IP literals, API edge cases and hostile input.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xmppd/jid.h"

struct jid_case {
    const char *in;
    const char *local;
    const char *domain;
    const char *resource;
};

static void assert_parses_to(const char *in, const char *local,
                             const char *domain, const char *resource)
{
    xd_jid j;
    if (xd_jid_parse(&j, in) != 0)
        fail_msg("expected valid: \"%s\"", in);
    assert_string_equal(j.local, local);
    assert_string_equal(j.domain, domain);
    assert_string_equal(j.resource, resource);
}

static void assert_invalid(const char *in)
{
    xd_jid j;
    if (xd_jid_parse(&j, in) == 0)
        fail_msg("expected invalid: \"%s\" (got %s|%s|%s)", in, j.local,
                 j.domain, j.resource);
}

/* Parse, format, re-parse: the result must be the same JID and string. */
static void assert_roundtrip(const char *in)
{
    xd_jid a, b;
    char s1[XD_JID_STR_MAX], s2[XD_JID_STR_MAX];

    if (xd_jid_parse(&a, in) != 0)
        return;
    int n1 = xd_jid_format(&a, 1, s1, sizeof s1);
    assert_true(n1 >= 0);
    assert_int_equal((size_t)n1, strlen(s1));
    if (xd_jid_parse(&b, s1) != 0)
        fail_msg("re-parse failed for \"%s\"", s1);
    assert_true(xd_jid_equal(&a, &b, 1));
    assert_int_equal(xd_jid_format(&b, 1, s2, sizeof s2), n1);
    assert_string_equal(s1, s2);
}

/* RFC 7622 3.5.1 */
static void test_rfc_valid_examples(void **state)
{
    (void)state;
    static const struct jid_case cases[] = {
        { "juliet@example.com", "juliet", "example.com", "" },
        { "juliet@example.com/foo", "juliet", "example.com", "foo" },
        { "juliet@example.com/foo bar", "juliet", "example.com", "foo bar" },
        { "juliet@example.com/foo@bar", "juliet", "example.com", "foo@bar" },
        { "foo\\20bar@example.com", "foo\\20bar", "example.com", "" },
        { "fussball@example.com", "fussball", "example.com", "" },
        { "fu\xC3\x9F" "ball@example.com", "fu\xC3\x9F" "ball", "example.com",
          "" },
        { "\xCF\x80@example.com", "\xCF\x80", "example.com", "" },
        /* U+03A3 SIGMA maps to U+03C3 (not final sigma: nothing precedes) */
        { "\xCE\xA3@example.com/foo", "\xCF\x83", "example.com", "foo" },
        { "\xCF\x83@example.com/foo", "\xCF\x83", "example.com", "foo" },
        { "\xCF\x82@example.com/foo", "\xCF\x82", "example.com", "foo" },
        { "king@example.com/\xE2\x99\x9A", "king", "example.com",
          "\xE2\x99\x9A" },
        { "example.com", "", "example.com", "" },
        { "example.com/foobar", "", "example.com", "foobar" },
        { "a.example.com/b@example.net", "", "a.example.com",
          "b@example.net" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_parses_to(cases[i].in, cases[i].local, cases[i].domain,
                         cases[i].resource);
        assert_roundtrip(cases[i].in);
    }
}

/* RFC 7622 3.5.2 */
static void test_rfc_invalid_examples(void **state)
{
    (void)state;
    static const char *const cases[] = {
        "\"juliet\"@example.com",     /* '"' forbidden in localpart */
        "foo bar@example.com",        /* space not in IdentifierClass */
        "@example.com/",              /* empty localpart and resource */
        "henry\xE2\x85\xA3@example.com", /* U+2163 ROMAN NUMERAL FOUR */
        "\xE2\x99\x9A@example.com",   /* U+265A symbol in localpart */
        "juliet@",                    /* empty domainpart */
        "/foobar",                    /* empty domainpart */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        assert_invalid(cases[i]);
}

/*
 * RFC 7622 3.5.2 example 18 lists "juliet@example.com/ foo" as invalid,
 * but verified erratum 4560 withdraws it: OpaqueString does not forbid
 * leading spaces (only the Nickname profile does). We follow the erratum.
 */
static void test_leading_space_resource(void **state)
{
    (void)state;
    assert_parses_to("juliet@example.com/ foo", "juliet", "example.com",
                     " foo");
    assert_roundtrip("juliet@example.com/ foo");
}

static void test_fussball_distinct(void **state)
{
    xd_jid a, b;
    (void)state;
    assert_int_equal(xd_jid_parse(&a, "fussball@example.com"), 0);
    assert_int_equal(xd_jid_parse(&b, "fu\xC3\x9F" "ball@example.com"), 0);
    assert_false(xd_jid_equal(&a, &b, 0));
    /* and sigma forms: final sigma stays distinct from sigma */
    assert_int_equal(xd_jid_parse(&a, "\xCF\x83@example.com"), 0);
    assert_int_equal(xd_jid_parse(&b, "\xCF\x82@example.com"), 0);
    assert_false(xd_jid_equal(&a, &b, 0));
}

static void test_case_mapping(void **state)
{
    (void)state;
    assert_parses_to("Juliet@EXAMPLE.COM/Balcony", "juliet", "example.com",
                     "Balcony");
    /* fullwidth JULIET: width mapping then lower case */
    assert_parses_to("\xEF\xBC\xAA\xEF\xBC\xB5\xEF\xBC\xAC\xEF\xBC\xA9"
                     "\xEF\xBC\xA5\xEF\xBC\xB4@example.com",
                     "juliet", "example.com", "");
    /* resourcepart is not case-mapped */
    xd_jid a, b;
    assert_int_equal(xd_jid_parse(&a, "x@example.com/Res"), 0);
    assert_int_equal(xd_jid_parse(&b, "X@Example.com/res"), 0);
    assert_true(xd_jid_equal(&a, &b, 0));
    assert_false(xd_jid_equal(&a, &b, 1));
}

static void test_idn_domains(void **state)
{
    (void)state;
    assert_parses_to("user@b\xC3\xBC" "cher.example", "user",
                     "xn--bcher-kva.example", "");
    /* uppercase U+00DC maps to U+00FC under UTS #46 */
    assert_parses_to("user@B\xC3\x9C" "CHER.EXAMPLE", "user",
                     "xn--bcher-kva.example", "");
    /* A-label input, any case, stays canonical */
    assert_parses_to("user@XN--BCHER-KVA.example", "user",
                     "xn--bcher-kva.example", "");
    /* non-transitional: sharp s is kept, not mapped to "ss" */
    assert_parses_to("x@fa\xC3\x9F.de", "x", "xn--fa-hia.de", "");
    /* decomposed u + U+0308 is NFC'ed first */
    assert_parses_to("user@bu\xCC\x88" "cher.example", "user",
                     "xn--bcher-kva.example", "");
    /* ideographic full stop is a label separator */
    assert_parses_to("x@b\xC3\xBC" "cher\xE3\x80\x82" "example", "x",
                     "xn--bcher-kva.example", "");
    assert_roundtrip("user@B\xC3\x9C" "CHER.EXAMPLE/r");

    assert_invalid("x@a@b");              /* '@' in domain */
    assert_invalid("x@a\xEF\xBC\xA0" "b"); /* fullwidth '@' maps to '@' */
    assert_invalid("x@_xmpp.example.com"); /* not LDH */
    assert_invalid("x@exa mple.com");
    assert_invalid("x@-abc.com");
    assert_invalid("x@abc-.com");
    assert_invalid("x@ab--c.com");        /* hyphens in 3rd/4th position */
    assert_invalid("x@xn--zz.com");       /* bogus A-label */
    assert_invalid("x@a..b");
    assert_invalid("x@.a");
    assert_invalid("x@\xE2\x99\x9A.com"); /* symbol: not IDNA2008 */
}

static void test_label_lengths(void **state)
{
    char buf[256];
    (void)state;
    /* 63-octet label ok, 64 not */
    memset(buf, 0, sizeof buf);
    memcpy(buf, "x@", 2);
    memset(buf + 2, 'a', 63);
    memcpy(buf + 65, ".com", 4);
    assert_parses_to(buf, "x", buf + 2, "");
    memset(buf + 2, 'a', 64);
    memcpy(buf + 66, ".com", 4);
    assert_invalid(buf);
}

static void test_trailing_dot(void **state)
{
    (void)state;
    assert_parses_to("juliet@example.com.", "juliet", "example.com", "");
    assert_parses_to("example.com./r", "", "example.com", "r");
    assert_parses_to("juliet@example.com\xE3\x80\x82", "juliet",
                     "example.com", "");
    /* only one separator is stripped */
    assert_invalid("juliet@example.com..");
    assert_invalid("juliet@.");
    assert_invalid(".");
    xd_jid a, b;
    assert_int_equal(xd_jid_parse(&a, "a@example.com."), 0);
    assert_int_equal(xd_jid_parse(&b, "a@example.com"), 0);
    assert_true(xd_jid_equal(&a, &b, 1));
}

static void test_ip_literals(void **state)
{
    (void)state;
    assert_parses_to("user@[::1]/r", "user", "[::1]", "r");
    assert_parses_to("[2001:DB8::A]", "", "[2001:db8::a]", "");
    assert_parses_to("user@[::ffff:192.0.2.1]", "user", "[::ffff:192.0.2.1]",
                     "");
    assert_parses_to("user@192.0.2.1/r", "user", "192.0.2.1", "r");
    assert_roundtrip("user@[2001:DB8::A]/x");
    assert_invalid("user@[::1");
    assert_invalid("user@::1");
    assert_invalid("user@[]");
    assert_invalid("user@[zz::1]");
    assert_invalid("user@[fe80::1%eth0]"); /* no zone ids */
    assert_invalid("user@[::1]x");
}

static void test_localpart_rules(void **state)
{
    (void)state;
    /* RFC 7622 3.3.1 forbidden characters (each can reach the localpart
     * only via prep_local, except those that survive splitting) */
    static const char *const forbidden[] = { "a\"b", "a&b", "a'b", "a/b",
                                             "a:b", "a<b", "a>b", "a@b" };
    char out[XD_JID_PART_MAX + 1];
    for (size_t i = 0; i < sizeof forbidden / sizeof forbidden[0]; i++)
        assert_int_equal(xd_jid_prep_local(out, sizeof out, forbidden[i]), -1);
    assert_invalid("a&b@example.com");
    assert_invalid("a:b@example.com");
    assert_invalid("a<b>@example.com");
    /* other ASCII printable is fine */
    assert_parses_to("a.b_c-d+e!#$%*=?^`{|}~@example.com",
                     "a.b_c-d+e!#$%*=?^`{|}~", "example.com", "");
    /* non-ASCII symbols, spaces and controls are not */
    assert_invalid("a\xE2\x82\xAC@example.com");   /* U+20AC euro */
    assert_invalid("a\xC2\xA0" "b@example.com");   /* U+00A0 nbsp */
    assert_invalid("a\xE2\x80\x8B" "b@example.com"); /* U+200B ZWSP */
    assert_invalid("a\xE2\x80\x8D" "b@example.com"); /* ZWJ, no virama */
    assert_invalid("\xEE\x80\x80@example.com");    /* U+E000 private use */
    assert_invalid("\xC2\xBD@example.com");        /* U+00BD, HasCompat */
    /* CONTEXTO: middle dot only between two 'l' */
    assert_parses_to("col\xC2\xB7la@example.com", "col\xC2\xB7la",
                     "example.com", "");
    assert_invalid("a\xC2\xB7" "b@example.com");
    /* Bidi rule: all-RTL ok, mixing LTR letters and RTL not */
    assert_parses_to("\xD7\xA9\xD7\x9C\xD7\x95\xD7\x9D@example.com",
                     "\xD7\xA9\xD7\x9C\xD7\x95\xD7\x9D", "example.com", "");
    assert_invalid("a\xD7\xA9@example.com");
    assert_invalid("\xD7\xA9" "a@example.com");
    /* combining mark is PVALID (Mn) */
    assert_parses_to("e\xCC\x81@example.com", "\xC3\xA9", "example.com", "");
}

static void test_resource_rules(void **state)
{
    (void)state;
    /* '/' after the first one belongs to the resource */
    assert_parses_to("a@b.example/c/d", "a", "b.example", "c/d");
    /* symbols, punctuation, compat chars are fine in FreeformClass */
    assert_parses_to("a@b.example/\xE2\x85\xA3 \xE2\x82\xAC!",
                     "a", "b.example", "\xE2\x85\xA3 \xE2\x82\xAC!");
    /* U+3000 ideographic space maps to U+0020 */
    assert_parses_to("a@b.example/x\xE3\x80\x80y", "a", "b.example", "x y");
    /* NFC */
    assert_parses_to("a@b.example/e\xCC\x81", "a", "b.example", "\xC3\xA9");
    assert_invalid("a@b.example/x\ty");
    assert_invalid("a@b.example/x\x7fy");
    assert_invalid("a@b.example/x\xC2\x85y");     /* U+0085 C1 control */
    assert_invalid("a@b.example/x\xE2\x80\x8By"); /* default ignorable */
    assert_invalid("a@b.example/x\xEF\xBF\xBEy"); /* U+FFFE noncharacter */
    assert_invalid("a@b.example/x\xF3\xA0\x80\x81y"); /* U+E0001 tag */
    assert_invalid("a@b.example/\xF0\xAF\xBF\xBF"); /* U+2FFFF unassigned */
    assert_invalid("a@b.example/");
}

static void test_invalid_utf8(void **state)
{
    (void)state;
    static const char *const cases[] = {
        "\xFF@example.com",
        "a@example.com/\xFF",
        "a@exam\xFFple.com",
        "\xC3@example.com",             /* truncated sequence */
        "a@example.com/\xC3",
        "\xC0\xAF@example.com",         /* overlong '/' */
        "a@example.com/\xC0\x80",       /* overlong NUL */
        "a\xE0\x80\xAF@example.com",    /* 3-byte overlong '/' */
        "a@example.com/\xF0\x80\x80\xAF", /* 4-byte overlong '/' */
        "a\xED\xA0\x80@example.com",    /* UTF-16 surrogate */
        "a@example.com/\xF4\x90\x80\x80", /* > U+10FFFF */
        "a@example.com/\x80",           /* lone continuation */
        "a@example.com/\xF8\x88\x80\x80\x80", /* 5-byte form */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        assert_invalid(cases[i]);
}

static char *repeat(char c, size_t n)
{
    char *s = malloc(n + 1);
    assert_non_null(s);
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

static void test_length_limits(void **state)
{
    (void)state;
    char *a1023 = repeat('a', 1023);
    char *a1024 = repeat('a', 1024);
    char *big = malloc(3 * 1024 + 64);
    assert_non_null(big);

    snprintf(big, 3 * 1024 + 64, "%s@example.com", a1023);
    assert_parses_to(big, a1023, "example.com", "");
    snprintf(big, 3 * 1024 + 64, "%s@example.com", a1024);
    assert_invalid(big);
    snprintf(big, 3 * 1024 + 64, "x@example.com/%s", a1023);
    assert_parses_to(big, "x", "example.com", a1023);
    snprintf(big, 3 * 1024 + 64, "x@example.com/%s", a1024);
    assert_invalid(big);
    snprintf(big, 3 * 1024 + 64, "x@%s", a1024);
    assert_invalid(big);

    /* 1023 bytes of prepared output from 3069 bytes of fullwidth input */
    char *fw = malloc(3 * 1024 + 16);
    assert_non_null(fw);
    size_t k = 0;
    for (int i = 0; i < 1023; i++) {
        memcpy(fw + k, "\xEF\xBD\x81", 3); /* U+FF41 fullwidth a */
        k += 3;
    }
    strcpy(fw + k, "@x.example");
    assert_parses_to(fw, a1023, "x.example", "");

    /* longest full JID formats into XD_JID_STR_MAX */
    xd_jid j;
    char out[XD_JID_STR_MAX];
    snprintf(big, 3 * 1024 + 64, "%s@example.com/%s", a1023, a1023);
    assert_int_equal(xd_jid_parse(&j, big), 0);
    assert_int_equal(xd_jid_format(&j, 1, out, sizeof out),
                     (int)strlen(big));

    /* a 5000-character string */
    char *s5000 = repeat('a', 5000);
    assert_invalid(s5000);
    s5000[10] = '@';
    assert_invalid(s5000);
    s5000[20] = '/';
    assert_invalid(s5000);
    free(s5000);
    char *huge = repeat('b', 100000);
    assert_invalid(huge);
    free(huge);

    free(fw);
    free(big);
    free(a1024);
    free(a1023);
}

static void test_structural_garbage(void **state)
{
    (void)state;
    static const char *const cases[] = {
        "", "@", "/", "@/", "/@", "//", "@@", "a@", "@a", "a/", "a@/b",
        "a@@b", "a@b@c", "@@@@@@@@@@@@@@@@", "a@b@c@d@e.com",
        "a\001b@example.com", "a@exa\nmple.com", "a\x7f@example.com",
        " @example.com", "a@ example.com", "a@example.com /r",
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        assert_invalid(cases[i]);
    xd_jid j;
    assert_int_equal(xd_jid_parse(NULL, "a@b"), -1);
    assert_int_equal(xd_jid_parse(&j, NULL), -1);
}

static void test_prep_functions(void **state)
{
    char out[XD_JID_PART_MAX + 1];
    char tiny[4];
    (void)state;

    assert_int_equal(xd_jid_prep_local(out, sizeof out, "Juliet"), 0);
    assert_string_equal(out, "juliet");
    assert_int_equal(xd_jid_prep_local(out, sizeof out, NULL), 0);
    assert_string_equal(out, "");
    assert_int_equal(xd_jid_prep_local(out, sizeof out, ""), 0);
    assert_string_equal(out, "");
    assert_int_equal(xd_jid_prep_resource(out, sizeof out, NULL), 0);
    assert_string_equal(out, "");
    assert_int_equal(xd_jid_prep_resource(out, sizeof out, "a/b@c"), 0);
    assert_string_equal(out, "a/b@c");
    assert_int_equal(xd_jid_prep_domain(out, sizeof out, NULL), -1);
    assert_int_equal(xd_jid_prep_domain(out, sizeof out, ""), -1);
    assert_int_equal(xd_jid_prep_domain(out, sizeof out, "EXAMPLE.com."), 0);
    assert_string_equal(out, "example.com");

    /* outlen counts the NUL */
    assert_int_equal(xd_jid_prep_local(tiny, sizeof tiny, "abc"), 0);
    assert_string_equal(tiny, "abc");
    assert_int_equal(xd_jid_prep_local(tiny, sizeof tiny, "abcd"), -1);
    assert_int_equal(xd_jid_prep_resource(tiny, sizeof tiny, "abcd"), -1);
    assert_int_equal(xd_jid_prep_domain(tiny, sizeof tiny, "a.bc"), -1);
    assert_int_equal(xd_jid_prep_domain(tiny, sizeof tiny, "a.b"), 0);
    assert_int_equal(xd_jid_prep_local(tiny, 0, "a"), -1);
    assert_int_equal(xd_jid_prep_local(NULL, 10, "a"), -1);

    /* prepared output is a fixed point */
    assert_int_equal(xd_jid_prep_local(out, sizeof out, "\xCE\xA3\xCE\xA3"),
                     0);
    char again[XD_JID_PART_MAX + 1];
    assert_int_equal(xd_jid_prep_local(again, sizeof again, out), 0);
    assert_string_equal(out, again);
}

static void test_format_bare_equal(void **state)
{
    xd_jid j, k;
    char buf[XD_JID_STR_MAX];
    (void)state;

    assert_int_equal(xd_jid_parse(&j, "Juliet@Example.com/Balcony"), 0);
    assert_int_equal(xd_jid_format(&j, 1, buf, sizeof buf), 26);
    assert_string_equal(buf, "juliet@example.com/Balcony");
    assert_int_equal(xd_jid_format(&j, 0, buf, sizeof buf), 18);
    assert_string_equal(buf, "juliet@example.com");
    /* exact fit vs one byte short */
    assert_int_equal(xd_jid_format(&j, 1, buf, 27), 26);
    assert_int_equal(xd_jid_format(&j, 1, buf, 26), -1);
    assert_int_equal(xd_jid_format(&j, 0, buf, 19), 18);
    assert_int_equal(xd_jid_format(&j, 0, buf, 18), -1);
    assert_int_equal(xd_jid_format(&j, 1, buf, 0), -1);

    assert_int_equal(xd_jid_parse(&k, "juliet@example.com"), 0);
    assert_false(xd_jid_equal(&j, &k, 1));
    assert_true(xd_jid_equal(&j, &k, 0));
    xd_jid_to_bare(&j);
    assert_string_equal(j.resource, "");
    assert_true(xd_jid_equal(&j, &k, 1));

    assert_int_equal(xd_jid_parse(&k, "example.com/r"), 0);
    assert_int_equal(xd_jid_format(&k, 1, buf, sizeof buf), 13);
    assert_string_equal(buf, "example.com/r");
    assert_false(xd_jid_equal(&j, &k, 0));
}

/* xorshift64*: deterministic and self-contained (no global rand state). */
static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

static void test_random_bytes(void **state)
{
    uint64_t seed = 0x9E3779B97F4A7C15ULL;
    char buf[256];
    (void)state;

    for (int iter = 0; iter < 20000; iter++) {
        size_t n = (size_t)(rng_next(&seed) % (sizeof buf - 1));
        for (size_t i = 0; i < n; i++) {
            char c = (char)(rng_next(&seed) & 0xFF);
            buf[i] = c ? c : 'a';
        }
        buf[n] = '\0';
        assert_roundtrip(buf);
    }
}

static const char *const frags[] = {
    "a", "Z", "0", "@", "/", ".", "-", " ", "_", "[", "]", ":", "::1",
    "\xC3\x9F", "\xC3\x9C", "\xCE\xA3", "\xCF\x82", "\xE2\x99\x9A",
    "\xE2\x85\xA3", "\xEF\xBC\xA1", "\xE3\x80\x82", "\xE3\x80\x80",
    "\xC2\xA0", "\xCC\x81", "\xD7\xA9", "\xD8\xB9", "\xD9\xA1",
    "\xDB\xB1", "\xC2\xB7", "l", "\xE2\x80\x8C", "\xE2\x80\x8D",
    "\xE0\xA5\x8D", "\xE3\x83\xBB", "\xE3\x81\x82", "xn--", "\xFF",
    "\xC0\x80", "\x01", "\t", "\xEF\xBF\xBE", "\xF0\x9F\x98\x80",
    "\xE1\x84\x80", "\xE1\x85\xA1", "\xCD\xBA", "\xE2\x84\xAA",
    "example.com", "1.2.3.4", "\xEF\xBD\xA1", "\xC2\xAD", "\xE0\xA4\x95",
};

static const char *const domains[] = {
    "example.com", "EXAMPLE.COM.", "b\303\274cher.example",
    "xn--bcher-kva.example", "fa\xC3\x9F.de", "[::1]", "[2001:DB8::A]",
    "192.0.2.1", "a\343\200\202b", "localhost", "\xCF\x80.example",
};

/* Appends up to count random fragments; returns the new length. */
static size_t add_frags(char *buf, size_t len, size_t cap, size_t count,
                        uint64_t *seed)
{
    const size_t nf = sizeof frags / sizeof frags[0];
    for (size_t i = 0; i < count; i++) {
        const char *f = frags[rng_next(seed) % nf];
        size_t fl = strlen(f);
        if (len + fl >= cap)
            break;
        memcpy(buf + len, f, fl);
        len += fl;
    }
    buf[len] = '\0';
    return len;
}

static size_t add_str(char *buf, size_t len, size_t cap, const char *s)
{
    size_t sl = strlen(s);
    if (len + sl < cap) {
        memcpy(buf + len, s, sl);
        len += sl;
    }
    buf[len] = '\0';
    return len;
}

/* Random strings built from fragments likely to reach deep code paths:
 * half free-form, half shaped like local@domain/resource so that a good
 * share of them parse and exercise the idempotence check. */
static void test_random_fragments(void **state)
{
    const size_t nd = sizeof domains / sizeof domains[0];
    uint64_t seed = 0xD1B54A32D192ED03ULL;
    char buf[512];
    (void)state;

    for (int iter = 0; iter < 40000; iter++) {
        size_t len = 0;
        buf[0] = '\0';
        if (iter % 2 == 0) {
            len = add_frags(buf, 0, sizeof buf, rng_next(&seed) % 24, &seed);
        } else {
            if (rng_next(&seed) % 4 != 0) {
                len = add_frags(buf, len, sizeof buf,
                                1 + rng_next(&seed) % 3, &seed);
                len = add_str(buf, len, sizeof buf, "@");
            }
            len = add_str(buf, len, sizeof buf,
                          domains[rng_next(&seed) % nd]);
            if (rng_next(&seed) % 2 != 0) {
                len = add_str(buf, len, sizeof buf, "/");
                len = add_frags(buf, len, sizeof buf,
                                1 + rng_next(&seed) % 4, &seed);
            }
        }
        (void)len;
        assert_roundtrip(buf);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rfc_valid_examples),
        cmocka_unit_test(test_rfc_invalid_examples),
        cmocka_unit_test(test_leading_space_resource),
        cmocka_unit_test(test_fussball_distinct),
        cmocka_unit_test(test_case_mapping),
        cmocka_unit_test(test_idn_domains),
        cmocka_unit_test(test_label_lengths),
        cmocka_unit_test(test_trailing_dot),
        cmocka_unit_test(test_ip_literals),
        cmocka_unit_test(test_localpart_rules),
        cmocka_unit_test(test_resource_rules),
        cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_length_limits),
        cmocka_unit_test(test_structural_garbage),
        cmocka_unit_test(test_prep_functions),
        cmocka_unit_test(test_format_bare_equal),
        cmocka_unit_test(test_random_bytes),
        cmocka_unit_test(test_random_fragments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
