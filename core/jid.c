/*
 * core/jid.c - XMPP addresses (JIDs) per RFC 7622.
 *
 *   RFC 7622 3.1    splitting a JID into localpart, domainpart, resourcepart
 *   RFC 7622 3.2    domainpart: IDNA2008 (RFC 5890-5892) via libidn2 with
 *                   UTS #46 non-transitional mapping, or an IP literal
 *   RFC 7622 3.3    localpart: PRECIS UsernameCaseMapped (RFC 8265 3.3),
 *                   plus the extra forbidden characters of 3.3.1
 *   RFC 7622 3.4    resourcepart: PRECIS OpaqueString (RFC 8265 4.2)
 *   RFC 8264 7, 8, 9  PRECIS order of operations, derived properties,
 *                   IdentifierClass / FreeformClass
 *   RFC 5892 2.6, App. A  Exceptions and CONTEXTJ / CONTEXTO rules
 *   RFC 5893 2      the Bidi Rule (localpart only, as RFC 8265 asks)
 *
 * Canonical forms stored in xd_jid (so prepared JIDs compare bytewise):
 *   - localpart: UTF-8, lower-cased, NFC;
 *   - domainpart: ASCII. DNS names are stored as lower-case A-labels
 *     ("xn--bcher-kva.example"), without the trailing dot; IPv4 literals
 *     (dotted quad accepted by inet_pton) as given; IPv6 literals in
 *     brackets as given but lower-cased (not compressed to RFC 5952 form);
 *   - resourcepart: UTF-8, NFC, non-ASCII spaces mapped to U+0020, case kept.
 *
 * Deliberate choices where the RFCs leave room or libraries differ:
 *   - DNS domainparts must be LDH host names after IDNA (no '_'), and
 *     libidn2 caps them at 255 octets, below RFC 7622's 1023;
 *   - a leading/trailing space in a resourcepart is accepted (RFC 7622
 *     erratum 4560 withdrew example 18 of section 3.5);
 *   - CONTEXTJ/CONTEXTO (RFC 5892 App. A) are applied in both PRECIS
 *     classes, as RFC 8264 9 requires.
 *
 * Unicode data comes from libunistring, so the set of assigned code points
 * is that of the installed libunistring, not a fixed Unicode version.
 * No global mutable state: everything lives on the stack or in buffers
 * freed before return.
 */
#include "xmppd/jid.h"

#include <arpa/inet.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <idn2.h>
#include <unicase.h>
#include <unictype.h>
#include <uninorm.h>
#include <unistr.h>

/*
 * Inputs may shrink during preparation (U+FF21 FULLWIDTH A is 3 bytes, 'a' is
 * 1; UTS #46 drops ignorable code points), so raw parts get a larger bound
 * than prepared ones. The bound exists to cap work on hostile input.
 */
#define JID_RAW_PART_MAX (4 * XD_JID_PART_MAX)
#define JID_RAW_MAX (3 * JID_RAW_PART_MAX + 2)

/* RFC 8264 7: apply the rules once, then re-apply up to three times. */
#define PRECIS_MAX_REAPPLY 3

#define DNS_LABEL_MAX 63

enum precis_class { PRECIS_IDENTIFIER, PRECIS_FREEFORM };

enum precis_prop {
    P_PVALID,
    P_CONTEXTJ,
    P_CONTEXTO,
    P_DISALLOWED,
    P_UNASSIGNED
};

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */
/* ------------------------------------------------------------------------ */

struct u8buf {
    uint8_t *p;
    size_t len;
    size_t cap;
};

static int u8buf_put(struct u8buf *b, ucs4_t c)
{
    if (b->cap - b->len < 6) {
        size_t ncap = b->cap ? 2 * b->cap : 64;
        uint8_t *np = realloc(b->p, ncap);
        if (np == NULL)
            return -1;
        b->p = np;
        b->cap = ncap;
    }
    int w = u8_uctomb(b->p + b->len, c, (ptrdiff_t)(b->cap - b->len));
    if (w < 0)
        return -1;
    b->len += (size_t)w;
    return 0;
}

/* Copy a prepared string to the caller; -1 if it (with NUL) does not fit. */
static int emit(char *out, size_t outlen, const uint8_t *s, size_t n)
{
    if (n > XD_JID_PART_MAX || n + 1 > outlen)
        return -1;
    memcpy(out, s, n);
    out[n] = '\0';
    return 0;
}

static bool gc_is(ucs4_t c, const char *names)
{
    /* names: space separated two-letter category names, e.g. "Ll Lu". */
    const char *gc = uc_general_category_name(uc_general_category(c));
    if (gc == NULL || gc[0] == '\0' || gc[1] == '\0')
        return false;
    for (const char *p = names; p[0] != '\0' && p[1] != '\0'; p += 3) {
        if (p[0] == gc[0] && p[1] == gc[1])
            return true;
        if (p[2] == '\0')
            break;
    }
    return false;
}

/* ------------------------------------------------------------------------ */
/* PRECIS mapping rules (RFC 8264 5.2, RFC 8265 3.3.1 / 4.2.1)               */
/* ------------------------------------------------------------------------ */

/* Maps one code point to zero or more; returns the count written to dst. */
typedef int (*cp_map_fn)(ucs4_t c, ucs4_t *dst);

/* RFC 8265 3.3.1 rule 1: fullwidth/halfwidth to their decomposition only;
 * full NFKC would also fold e.g. ROMAN NUMERAL FOUR, which must instead be
 * rejected by the HasCompat rule. */
static int map_width(ucs4_t c, ucs4_t *dst)
{
    int tag;
    int n = uc_decomposition(c, &tag, dst);
    if (n > 0 && (tag == UC_DECOMP_WIDE || tag == UC_DECOMP_NARROW))
        return n;
    dst[0] = c;
    return 1;
}

/* RFC 8265 4.2.1 rule 2: non-ASCII spaces (Zs) become U+0020. */
static int map_space(ucs4_t c, ucs4_t *dst)
{
    dst[0] = (c != 0x20 && gc_is(c, "Zs")) ? 0x20 : c;
    return 1;
}

/* Returns a malloc'd mapped copy of valid UTF-8 s, or NULL. */
static uint8_t *map_codepoints(const uint8_t *s, size_t n, cp_map_fn fn,
                               size_t *outn)
{
    struct u8buf b = { NULL, 0, 0 };
    ucs4_t tmp[UC_DECOMPOSITION_MAX_LENGTH];
    size_t i = 0;

    while (i < n) {
        ucs4_t c;
        i += (size_t)u8_mbtouc_unsafe(&c, s + i, n - i);
        int k = fn(c, tmp);
        for (int m = 0; m < k; m++) {
            if (u8buf_put(&b, tmp[m]) < 0) {
                free(b.p);
                return NULL;
            }
        }
    }
    if (b.p == NULL)
        b.p = malloc(1); /* n == 0: still hand back a freeable pointer */
    *outn = b.len;
    return b.p;
}

/* One pass of UsernameCaseMapped mapping: width, toLowerCase, NFC. */
static uint8_t *username_map_once(const uint8_t *s, size_t n, size_t *outn)
{
    size_t wn;
    uint8_t *w = map_codepoints(s, n, map_width, &wn);
    if (w == NULL)
        return NULL;
    /* RFC 8265 3.3.1 rule 3 says toLowerCase (not case folding), so
     * U+00DF sharp s stays as it is and "fu\u00DFball" and "fussball"
     * remain distinct, as RFC 7622 3.5 expects. */
    uint8_t *r = u8_tolower(w, wn, NULL, UNINORM_NFC, NULL, outn);
    free(w);
    return r;
}

/* One pass of OpaqueString mapping: non-ASCII space to ASCII space, NFC. */
static uint8_t *opaque_map_once(const uint8_t *s, size_t n, size_t *outn)
{
    size_t sn;
    uint8_t *sp = map_codepoints(s, n, map_space, &sn);
    if (sp == NULL)
        return NULL;
    uint8_t *r = u8_normalize(UNINORM_NFC, sp, sn, NULL, outn);
    free(sp);
    return r;
}

typedef uint8_t *(*map_pass_fn)(const uint8_t *s, size_t n, size_t *outn);

/* RFC 8264 7: re-apply the rules until the output is stable, rejecting
 * strings that do not settle; this makes prep(prep(x)) == prep(x). */
static uint8_t *map_until_stable(const uint8_t *s, size_t n, map_pass_fn fn,
                                 size_t *outn)
{
    uint8_t *cur = fn(s, n, outn);

    for (int reapply = 1; cur != NULL; reapply++) {
        size_t nn;
        uint8_t *next = fn(cur, *outn, &nn);
        if (next == NULL) {
            free(cur);
            return NULL;
        }
        bool stable = nn == *outn && memcmp(next, cur, nn) == 0;
        free(cur);
        cur = next;
        *outn = nn;
        if (stable)
            return cur;
        if (reapply >= PRECIS_MAX_REAPPLY) {
            free(cur);
            return NULL;
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* PRECIS derived property (RFC 8264 8 and 9)                                */
/* ------------------------------------------------------------------------ */

/* RFC 5892 2.6 Exceptions, -1 when c is not listed. */
static int exception_prop(ucs4_t c)
{
    switch (c) {
    case 0x00DF: case 0x03C2: case 0x06FD: case 0x06FE: case 0x0F0B:
    case 0x3007:
        return P_PVALID;
    case 0x00B7: case 0x0375: case 0x05F3: case 0x05F4: case 0x30FB:
        return P_CONTEXTO;
    case 0x0640: case 0x07FA: case 0x302E: case 0x302F: case 0x3031:
    case 0x3032: case 0x3033: case 0x3034: case 0x3035: case 0x303B:
        return P_DISALLOWED;
    default:
        break;
    }
    if ((c >= 0x0660 && c <= 0x0669) || (c >= 0x06F0 && c <= 0x06F9))
        return P_CONTEXTO;
    return -1;
}

/* RFC 8264 9.9: conjoining jamo (Hangul_Syllable_Type L, V, T). */
static bool is_old_hangul_jamo(ucs4_t c)
{
    return (c >= 0x1100 && c <= 0x11FF) || (c >= 0xA960 && c <= 0xA97C) ||
           (c >= 0xD7B0 && c <= 0xD7C6) || (c >= 0xD7CB && c <= 0xD7FB);
}

/* RFC 8264 9.17: toNFKC(cp) != cp. */
static bool has_compat(ucs4_t c)
{
    uint32_t buf[2 * UC_DECOMPOSITION_MAX_LENGTH];
    size_t n = sizeof buf / sizeof buf[0];
    uint32_t *r = u32_normalize(UNINORM_NFKC, &c, 1, buf, &n);
    if (r == NULL)
        return true; /* cannot tell: be conservative */
    bool changed = !(n == 1 && r[0] == c);
    if (r != buf)
        free(r);
    return changed;
}

static enum precis_prop precis_prop(ucs4_t c, enum precis_class cls)
{
    enum precis_prop cls_only =
        cls == PRECIS_FREEFORM ? P_PVALID : P_DISALLOWED;
    int exc = exception_prop(c);

    if (exc >= 0)
        return (enum precis_prop)exc;
    /* BackwardCompatible (9.7) is currently empty. */
    if (gc_is(c, "Cn") && !uc_is_property_not_a_character(c))
        return P_UNASSIGNED;
    if (c >= 0x21 && c <= 0x7E)
        return P_PVALID;
    if (uc_is_property_join_control(c))
        return P_CONTEXTJ;
    if (is_old_hangul_jamo(c))
        return P_DISALLOWED;
    if (uc_is_property_default_ignorable_code_point(c) ||
        uc_is_property_not_a_character(c))
        return P_DISALLOWED;
    if (gc_is(c, "Cc"))
        return P_DISALLOWED;
    if (has_compat(c))
        return cls_only;
    if (gc_is(c, "Ll Lu Lo Nd Lm Mn Mc"))
        return P_PVALID;
    if (gc_is(c, "Lt Nl No Me Zs Sm Sc Sk So Pc Pd Ps Pe Pi Pf Po"))
        return cls_only;
    return P_DISALLOWED;
}

/* ------------------------------------------------------------------------ */
/* Contextual rules (RFC 5892 Appendix A)                                   */
/* ------------------------------------------------------------------------ */

#define CCC_VIRAMA 9

static bool jt_is(ucs4_t c, int a, int b)
{
    int jt = uc_joining_type(c);
    return jt == a || jt == b;
}

/* A.1 ZERO WIDTH NON-JOINER: after a virama, or between joining letters. */
static bool zwnj_ok(const ucs4_t *u, size_t n, size_t i)
{
    if (i > 0 && uc_combining_class(u[i - 1]) == CCC_VIRAMA)
        return true;
    size_t l = i;
    while (l > 0 && uc_joining_type(u[l - 1]) == UC_JOINING_TYPE_T)
        l--;
    if (l == 0 || !jt_is(u[l - 1], UC_JOINING_TYPE_L, UC_JOINING_TYPE_D))
        return false;
    size_t r = i + 1;
    while (r < n && uc_joining_type(u[r]) == UC_JOINING_TYPE_T)
        r++;
    return r < n && jt_is(u[r], UC_JOINING_TYPE_R, UC_JOINING_TYPE_D);
}

static bool contextj_ok(const ucs4_t *u, size_t n, size_t i)
{
    if (u[i] == 0x200C)
        return zwnj_ok(u, n, i);
    /* A.2 ZERO WIDTH JOINER: only after a virama. */
    return i > 0 && uc_combining_class(u[i - 1]) == CCC_VIRAMA;
}

static bool script_is(ucs4_t c, const char *name)
{
    const uc_script_t *s = uc_script(c);
    return s != NULL && strcmp(s->name, name) == 0;
}

static bool any_in_range(const ucs4_t *u, size_t n, ucs4_t lo, ucs4_t hi)
{
    for (size_t k = 0; k < n; k++)
        if (u[k] >= lo && u[k] <= hi)
            return true;
    return false;
}

static bool katakana_dot_ok(const ucs4_t *u, size_t n)
{
    for (size_t k = 0; k < n; k++)
        if (script_is(u[k], "Hiragana") || script_is(u[k], "Katakana") ||
            script_is(u[k], "Han"))
            return true;
    return false;
}

static bool contexto_ok(const ucs4_t *u, size_t n, size_t i)
{
    ucs4_t c = u[i];

    switch (c) {
    case 0x00B7: /* A.3 MIDDLE DOT, only between two "l" (Catalan) */
        return i > 0 && i + 1 < n && u[i - 1] == 0x6C && u[i + 1] == 0x6C;
    case 0x0375: /* A.4 GREEK LOWER NUMERAL SIGN, before Greek */
        return i + 1 < n && script_is(u[i + 1], "Greek");
    case 0x05F3: /* A.5, A.6 HEBREW GERESH / GERSHAYIM, after Hebrew */
    case 0x05F4:
        return i > 0 && script_is(u[i - 1], "Hebrew");
    case 0x30FB: /* A.7 KATAKANA MIDDLE DOT, with Japanese script */
        return katakana_dot_ok(u, n);
    default:
        break;
    }
    /* A.8, A.9: the two sets of Arabic-Indic digits must not be mixed. */
    if (c >= 0x0660 && c <= 0x0669)
        return !any_in_range(u, n, 0x06F0, 0x06F9);
    if (c >= 0x06F0 && c <= 0x06F9)
        return !any_in_range(u, n, 0x0660, 0x0669);
    return false;
}

static bool class_ok(const ucs4_t *u, size_t n, enum precis_class cls)
{
    for (size_t i = 0; i < n; i++) {
        switch (precis_prop(u[i], cls)) {
        case P_PVALID:
            break;
        case P_CONTEXTJ:
            if (!contextj_ok(u, n, i))
                return false;
            break;
        case P_CONTEXTO:
            if (!contexto_ok(u, n, i))
                return false;
            break;
        default:
            return false;
        }
    }
    return true;
}

/* ------------------------------------------------------------------------ */
/* Bidi Rule (RFC 5893 2)                                                   */
/* ------------------------------------------------------------------------ */

static bool bidi_is_rtl(int bc)
{
    return bc == UC_BIDI_R || bc == UC_BIDI_AL || bc == UC_BIDI_AN;
}

static bool bidi_rtl_allowed(int bc)
{
    switch (bc) {
    case UC_BIDI_R: case UC_BIDI_AL: case UC_BIDI_AN: case UC_BIDI_EN:
    case UC_BIDI_ES: case UC_BIDI_CS: case UC_BIDI_ET: case UC_BIDI_ON:
    case UC_BIDI_BN: case UC_BIDI_NSM:
        return true;
    default:
        return false;
    }
}

/*
 * RFC 8265 3.3.1 rule 5 applies the Bidi Rule only to strings containing
 * right-to-left code points. Such a string can only satisfy RFC 5893 as an
 * RTL label (rule 5 bans R/AL/AN from LTR labels), so we check rules 1-4.
 */
static bool bidi_ok(const ucs4_t *u, size_t n)
{
    bool rtl = false;
    for (size_t i = 0; i < n && !rtl; i++)
        rtl = bidi_is_rtl(uc_bidi_class(u[i]));
    if (!rtl)
        return true;

    int first = uc_bidi_class(u[0]);
    if (first != UC_BIDI_R && first != UC_BIDI_AL)
        return false; /* rule 1 */

    bool en = false, an = false;
    for (size_t i = 0; i < n; i++) {
        int bc = uc_bidi_class(u[i]);
        if (!bidi_rtl_allowed(bc))
            return false; /* rule 2 */
        en = en || bc == UC_BIDI_EN;
        an = an || bc == UC_BIDI_AN;
    }
    if (en && an)
        return false; /* rule 4 */

    size_t last = n;
    while (last > 0 && uc_bidi_class(u[last - 1]) == UC_BIDI_NSM)
        last--;
    if (last == 0)
        return false;
    int lb = uc_bidi_class(u[last - 1]);
    return lb == UC_BIDI_R || lb == UC_BIDI_AL || lb == UC_BIDI_EN ||
           lb == UC_BIDI_AN; /* rule 3 */
}

/* ------------------------------------------------------------------------ */
/* Profiles                                                                 */
/* ------------------------------------------------------------------------ */

/* RFC 7622 3.3.1: characters that would be ambiguous in other protocols. */
static bool local_forbidden(ucs4_t c)
{
    return c == '"' || c == '&' || c == '\'' || c == '/' || c == ':' ||
           c == '<' || c == '>' || c == '@';
}

static bool username_checks(const ucs4_t *u, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (local_forbidden(u[i]))
            return false;
    return class_ok(u, n, PRECIS_IDENTIFIER) && bidi_ok(u, n);
}

static bool opaque_checks(const ucs4_t *u, size_t n)
{
    return class_ok(u, n, PRECIS_FREEFORM);
}

typedef bool (*check_fn)(const ucs4_t *u, size_t n);

/* Shared enforcement: map until stable, reject empty, run class checks. */
static int precis_enforce(char *out, size_t outlen, const uint8_t *s,
                          size_t n, map_pass_fn map, check_fn check)
{
    if (out == NULL || n > JID_RAW_PART_MAX || u8_check(s, n) != NULL)
        return -1;

    size_t pn;
    uint8_t *p = map_until_stable(s, n, map, &pn);
    if (p == NULL)
        return -1;

    int rc = -1;
    size_t un;
    uint32_t *u = NULL;
    /* RFC 8265 3.3.3 / 4.2.3: an empty result is an error. */
    if (pn == 0 || pn > XD_JID_PART_MAX)
        goto done;
    u = u8_to_u32(p, pn, NULL, &un);
    if (u == NULL || !check(u, un))
        goto done;
    rc = emit(out, outlen, p, pn);
done:
    free(u);
    free(p);
    return rc;
}

static int prep_local_n(char *out, size_t outlen, const uint8_t *s, size_t n)
{
    return precis_enforce(out, outlen, s, n, username_map_once,
                          username_checks);
}

static int prep_resource_n(char *out, size_t outlen, const uint8_t *s,
                           size_t n)
{
    return precis_enforce(out, outlen, s, n, opaque_map_once, opaque_checks);
}

/* ------------------------------------------------------------------------ */
/* Domainpart (RFC 7622 3.2)                                                */
/* ------------------------------------------------------------------------ */

/* Byte length of a trailing IDNA label separator (RFC 5890 2.3.2.1:
 * U+002E, U+3002, U+FF0E, U+FF61), or 0. */
static size_t trailing_dot_len(const uint8_t *s, size_t n)
{
    static const char *const dots[] = { ".", "\xE3\x80\x82", "\xEF\xBC\x8E",
                                        "\xEF\xBD\xA1" };
    for (size_t k = 0; k < sizeof dots / sizeof dots[0]; k++) {
        size_t dl = strlen(dots[k]);
        if (n >= dl && memcmp(s + n - dl, dots[k], dl) == 0)
            return dl;
    }
    return 0;
}

static void ascii_lower(char *s)
{
    for (; *s != '\0'; s++)
        if (*s >= 'A' && *s <= 'Z')
            *s = (char)(*s - 'A' + 'a');
}

/* RFC 3986 IP-literal without IPvFuture or zone IDs: "[" IPv6address "]". */
static int prep_ipv6(char *out, size_t outlen, const char *d, size_t n)
{
    char inner[INET6_ADDRSTRLEN + 1];
    struct in6_addr a;

    if (n < 3 || d[n - 1] != ']' || n - 2 >= sizeof inner)
        return -1;
    memcpy(inner, d + 1, n - 2);
    inner[n - 2] = '\0';
    if (inet_pton(AF_INET6, inner, &a) != 1)
        return -1;
    if (emit(out, outlen, (const uint8_t *)d, n) < 0)
        return -1;
    ascii_lower(out);
    return 0;
}

/* LDH host name check on the A-label form (RFC 5890 2.3.1, RFC 1123 2.1):
 * labels of 1..63 octets of [a-z0-9-], not starting or ending with '-'.
 * This also catches what UTS #46 lets through without STD3 rules ('@',
 * '_', spaces, ':', U+FF20 FULLWIDTH COMMERCIAL AT mapped to '@' ...)
 * and empty labels. */
static bool ldh_ok(const char *d)
{
    size_t lab = 0;
    for (const char *p = d;; p++) {
        if (*p == '.' || *p == '\0') {
            if (lab == 0 || lab > DNS_LABEL_MAX || p[-1] == '-')
                return false;
            if (*p == '\0')
                return true;
            lab = 0;
            continue;
        }
        bool alnum = (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9');
        if (!alnum && !(*p == '-' && lab > 0))
            return false;
        lab++;
    }
}

static int prep_dns(char *out, size_t outlen, const char *d)
{
    uint8_t *ace = NULL;
    /*
     * No IDN2_USE_STD3_ASCII_RULES: libidn2 2.3.x *deletes* characters
     * that STD3 disallows ("a@b" becomes "ab") instead of failing, which
     * would silently turn invalid input into a different, valid domain.
     * We run UTS #46 without it and enforce LDH on the result ourselves.
     */
    int flags = IDN2_NFC_INPUT | IDN2_NONTRANSITIONAL;

    if (idn2_lookup_u8((const uint8_t *)d, &ace, flags) != IDN2_OK)
        return -1;
    int rc = -1;
    ascii_lower((char *)ace);
    if (ldh_ok((const char *)ace))
        rc = emit(out, outlen, ace, strlen((const char *)ace));
    idn2_free(ace);
    return rc;
}

static int prep_domain_n(char *out, size_t outlen, const uint8_t *s, size_t n)
{
    char d[JID_RAW_PART_MAX + 1];
    struct in_addr a4;

    if (out == NULL || n > JID_RAW_PART_MAX || u8_check(s, n) != NULL)
        return -1;
    /* RFC 7622 3.2: a single trailing label separator is stripped. */
    n -= trailing_dot_len(s, n);
    if (n == 0)
        return -1;
    memcpy(d, s, n);
    d[n] = '\0';

    if (d[0] == '[')
        return prep_ipv6(out, outlen, d, n);
    if (inet_pton(AF_INET, d, &a4) == 1)
        return emit(out, outlen, (const uint8_t *)d, n);
    return prep_dns(out, outlen, d);
}

/* ------------------------------------------------------------------------ */
/* Public API                                                               */
/* ------------------------------------------------------------------------ */

/* Length of a C string, capped so hostile input is not scanned forever. */
static size_t bounded_len(const char *s, size_t max)
{
    return strnlen(s, max + 1);
}

static int prep_optional(char *out, size_t outlen, const char *in,
                         int (*prep)(char *, size_t, const uint8_t *, size_t))
{
    if (out == NULL || outlen == 0)
        return -1;
    if (in == NULL || in[0] == '\0') {
        out[0] = '\0'; /* absent part */
        return 0;
    }
    return prep(out, outlen, (const uint8_t *)in,
                bounded_len(in, JID_RAW_PART_MAX));
}

int xd_jid_prep_local(char *out, size_t outlen, const char *in)
{
    return prep_optional(out, outlen, in, prep_local_n);
}

int xd_jid_prep_resource(char *out, size_t outlen, const char *in)
{
    return prep_optional(out, outlen, in, prep_resource_n);
}

/* The domainpart is mandatory, so NULL or "" is invalid here. */
int xd_jid_prep_domain(char *out, size_t outlen, const char *in)
{
    if (in == NULL || in[0] == '\0')
        return -1;
    return prep_domain_n(out, outlen, (const uint8_t *)in,
                         bounded_len(in, JID_RAW_PART_MAX));
}

/*
 * RFC 7622 3.1: the resourcepart starts after the first '/', the localpart
 * ends at the first '@' before that. Splitting bytewise is safe in UTF-8
 * because '/' and '@' never occur inside multi-byte sequences.
 */
int xd_jid_parse(xd_jid *j, const char *s)
{
    if (j == NULL || s == NULL)
        return -1;
    size_t n = bounded_len(s, JID_RAW_MAX);
    if (n == 0 || n > JID_RAW_MAX || u8_check((const uint8_t *)s, n) != NULL)
        return -1;

    const uint8_t *b = (const uint8_t *)s;
    const uint8_t *slash = memchr(b, '/', n);
    size_t head = slash ? (size_t)(slash - b) : n;
    const uint8_t *at = memchr(b, '@', head);
    const uint8_t *dom = at ? at + 1 : b;
    size_t domlen = head - (size_t)(dom - b);

    j->local[0] = '\0';
    j->resource[0] = '\0';
    if (at != NULL &&
        prep_local_n(j->local, sizeof j->local, b, (size_t)(at - b)) < 0)
        return -1; /* includes the empty localpart "@domain" */
    if (prep_domain_n(j->domain, sizeof j->domain, dom, domlen) < 0)
        return -1;
    if (slash != NULL &&
        prep_resource_n(j->resource, sizeof j->resource, slash + 1,
                        n - head - 1) < 0)
        return -1; /* includes the empty resourcepart "domain/" */
    return 0;
}

int xd_jid_format(const xd_jid *j, int full, char *buf, size_t len)
{
    if (j == NULL || buf == NULL || len == 0)
        return -1;
    size_t ll = strnlen(j->local, sizeof j->local);
    size_t dl = strnlen(j->domain, sizeof j->domain);
    size_t rl = full ? strnlen(j->resource, sizeof j->resource) : 0;
    size_t total = dl + (ll ? ll + 1 : 0) + (rl ? rl + 1 : 0);

    if (total + 1 > len || ll == sizeof j->local || dl == sizeof j->domain ||
        rl == sizeof j->resource)
        return -1;
    char *p = buf;
    if (ll) {
        memcpy(p, j->local, ll);
        p += ll;
        *p++ = '@';
    }
    memcpy(p, j->domain, dl);
    p += dl;
    if (rl) {
        *p++ = '/';
        memcpy(p, j->resource, rl);
        p += rl;
    }
    *p = '\0';
    return (int)total;
}

void xd_jid_to_bare(xd_jid *j)
{
    if (j != NULL)
        j->resource[0] = '\0';
}

int xd_jid_equal(const xd_jid *a, const xd_jid *b, int full)
{
    if (a == NULL || b == NULL)
        return 0;
    return strcmp(a->local, b->local) == 0 &&
           strcmp(a->domain, b->domain) == 0 &&
           (!full || strcmp(a->resource, b->resource) == 0);
}
