/*
 * SCRAM-SHA-1 and SCRAM-SHA-256, server side, without channel binding.
 *
 *   RFC 5802 section 3  key derivation: SaltedPassword = Hi(password, salt, i)
 *                       (Hi is PBKDF2 with HMAC-H), ClientKey, StoredKey,
 *                       ServerKey, ClientSignature/Proof, ServerSignature.
 *   RFC 5802 section 5  the example exchange (SCRAM-SHA-1).
 *   RFC 5802 section 5.1 attributes (n=, r=, c=, s=, i=, p=, v=, m=, a=).
 *   RFC 5802 section 7  ABNF of the messages and the saslname escapes.
 *   RFC 5802 section 6  channel binding: we never advertise -PLUS, so the
 *                       gs2-cbind-flag "p=" is refused and "y" is accepted.
 *   RFC 7677 section 3  SCRAM-SHA-256 and its example exchange.
 *   RFC 4648 section 4  base64 (strict: padding required, no whitespace).
 *
 * Passwords are used as the UTF-8 bytes given, without SASLprep (RFC 4013).
 * That is deliberate: the same bytes are used when the credentials are
 * created and when a client proves them, so only clients that normalise
 * differently (e.g. non-ASCII passwords entered in NFD) are affected, and
 * pulling in a stringprep implementation for that edge case isn't worth it.
 * A caller that wants SASLprep can apply it before calling into this file.
 *
 * All cryptography comes from GnuTLS; comparisons of secrets are constant
 * time; key material is wiped with explicit_bzero() before memory is freed.
 */
#include <xmppd/scram.h>

#include "scram_test.h"

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Both SCRAM messages from the client are small; a bound keeps a hostile
 * client from making us allocate or hash arbitrary amounts of data. */
#define SCRAM_MAX_MSG 4096
/* 24 random bytes -> 32 base64 characters; base64 never contains ','. */
#define SCRAM_SNONCE_BYTES 24

static const char ERR_MALFORMED[] = "malformed-request";
static const char ERR_NOT_AUTHORIZED[] = "not-authorized";
static const char ERR_INVALID_AUTHZID[] = "invalid-authzid";
static const char ERR_TEMPORARY[] = "temporary-auth-failure";

enum scram_state {
    ST_NEW,        /* waiting for client-first-message */
    ST_STARTED,    /* client-first parsed, waiting for credentials */
    ST_FIRST_SENT, /* server-first sent, waiting for client-final */
    ST_DONE,       /* success, nothing more to do */
    ST_FAILED      /* any failure is final: SCRAM has no retry */
};

struct xd_scram_server {
    xd_scram_hash hash;
    enum scram_state state;
    char *user;          /* decoded authcid */
    char *gs2_header;    /* exactly as received, e.g. "n,," */
    char *cfb;           /* client-first-message-bare, for AuthMessage */
    size_t cfb_len;
    char *cnonce;
    char *snonce;        /* set by server_first, or by the test hook */
    char *server_first;  /* for AuthMessage */
    size_t sf_len;
    unsigned char stored_key[XD_SCRAM_MAX_HASH];
    unsigned char server_key[XD_SCRAM_MAX_HASH];
};

/* ---------------------------------------------------------------- helpers */

static int valid_hash(xd_scram_hash h)
{
    return h == XD_SCRAM_SHA1 || h == XD_SCRAM_SHA256;
}

size_t xd_scram_hash_len(xd_scram_hash h)
{
    switch (h) {
    case XD_SCRAM_SHA1: return 20;
    case XD_SCRAM_SHA256: return 32;
    }
    return 0;
}

const char *xd_scram_mech_name(xd_scram_hash h)
{
    switch (h) {
    case XD_SCRAM_SHA1: return "SCRAM-SHA-1";
    case XD_SCRAM_SHA256: return "SCRAM-SHA-256";
    }
    return NULL;
}

static gnutls_mac_algorithm_t mac_alg(xd_scram_hash h)
{
    return h == XD_SCRAM_SHA1 ? GNUTLS_MAC_SHA1 : GNUTLS_MAC_SHA256;
}

static gnutls_digest_algorithm_t dig_alg(xd_scram_hash h)
{
    return h == XD_SCRAM_SHA1 ? GNUTLS_DIG_SHA1 : GNUTLS_DIG_SHA256;
}

/* Constant time: the time taken must not reveal how many leading bytes of
 * a guessed key were right. */
static int ct_equal(const unsigned char *a, const unsigned char *b, size_t n)
{
    volatile unsigned char diff = 0;
    for (size_t i = 0; i < n; i++)
        diff |= (unsigned char)(a[i] ^ b[i]);
    return diff == 0;
}

static void free_secret(void *p, size_t n)
{
    if (p) {
        explicit_bzero(p, n);
        free(p);
    }
}

static void free_str(char *p)
{
    if (p)
        free_secret(p, strlen(p));
}

static char *dup_span(const char *p, size_t n)
{
    char *r = malloc(n + 1);
    if (r) {
        memcpy(r, p, n);
        r[n] = '\0';
    }
    return r;
}

static int hmac(xd_scram_hash h, const void *key, size_t keylen, const void *data,
                size_t len, unsigned char *out)
{
    return gnutls_hmac_fast(mac_alg(h), key, keylen, data, len, out) == 0 ? 0 : -1;
}

/* ----------------------------------------------------------------- base64 */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

char *xd_base64_encode(const unsigned char *in, size_t len)
{
    if (!in && len)
        return NULL;
    if (len > (SIZE_MAX - 1) / 4 * 3 - 3) /* 4*ceil(len/3)+1 must not overflow */
        return NULL;
    size_t olen = (len + 2) / 3 * 4;
    char *out = malloc(olen + 1);
    if (!out)
        return NULL;
    char *o = out;
    size_t i = 0;
    for (; i + 3 <= len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        *o++ = B64[v >> 18 & 63];
        *o++ = B64[v >> 12 & 63];
        *o++ = B64[v >> 6 & 63];
        *o++ = B64[v & 63];
    }
    if (len - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        *o++ = B64[v >> 18 & 63];
        *o++ = B64[v >> 12 & 63];
        *o++ = '=';
        *o++ = '=';
    } else if (len - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        *o++ = B64[v >> 18 & 63];
        *o++ = B64[v >> 12 & 63];
        *o++ = B64[v >> 6 & 63];
        *o++ = '=';
    }
    *o = '\0';
    return out;
}

static int b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Strict decoding: the length must be a multiple of 4, '=' may only pad the
 * last quantum, and the unused bits before padding must be zero, so every
 * byte string has exactly one accepted encoding (RFC 4648 section 3.5). */
unsigned char *xd_base64_decode(const char *in, size_t len, size_t *out_len)
{
    if (!out_len)
        return NULL;
    *out_len = 0;
    if (!in && len)
        return NULL;
    /* XMPP SASL (RFC 6120 6.4.2) sends "=" for an empty payload. */
    if (len == 0 || (len == 1 && in[0] == '='))
        return calloc(1, 1);
    if (len % 4 != 0)
        return NULL;
    size_t pad = 0;
    if (in[len - 1] == '=')
        pad = in[len - 2] == '=' ? 2 : 1;
    unsigned char *out = malloc(len / 4 * 3 + 1);
    if (!out)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < len; i += 4) {
        int last = i + 4 == len;
        size_t have = last ? 4 - pad : 4;
        uint32_t v = 0;
        for (size_t j = 0; j < 4; j++) {
            int d = 0;
            if (j < have) {
                d = b64_value((unsigned char)in[i + j]);
                if (d < 0)
                    goto bad;
            }
            v = v << 6 | (uint32_t)d;
        }
        out[o++] = (unsigned char)(v >> 16);
        if (have > 2)
            out[o++] = (unsigned char)(v >> 8);
        if (have > 3)
            out[o++] = (unsigned char)v;
        if ((have == 2 && (v & 0xffff)) || (have == 3 && (v & 0xff)))
            goto bad; /* non-zero padding bits */
    }
    *out_len = o;
    return out;
bad:
    free_secret(out, len / 4 * 3 + 1);
    return NULL;
}

/* ---------------------------------------------------------- key derivation */

int xd_scram_derive(xd_scram_creds *out, const char *password)
{
    if (!out || !password || !valid_hash(out->hash) || out->iterations == 0 ||
        out->salt_len == 0 || out->salt_len > sizeof out->salt)
        return -1;
    xd_scram_hash h = out->hash;
    size_t hl = xd_scram_hash_len(h);
    unsigned char salted[XD_SCRAM_MAX_HASH], client_key[XD_SCRAM_MAX_HASH];
    gnutls_datum_t key = {(unsigned char *)password, (unsigned)strlen(password)};
    gnutls_datum_t salt = {out->salt, (unsigned)out->salt_len};
    int rc = -1;

    if (gnutls_pbkdf2(mac_alg(h), &key, &salt, out->iterations, salted, hl) != 0)
        goto done;
    if (hmac(h, salted, hl, "Client Key", 10, client_key) != 0 ||
        hmac(h, salted, hl, "Server Key", 10, out->server_key) != 0)
        goto done;
    if (gnutls_hash_fast(dig_alg(h), client_key, hl, out->stored_key) != 0)
        goto done;
    rc = 0;
done:
    explicit_bzero(salted, sizeof salted);
    explicit_bzero(client_key, sizeof client_key);
    return rc;
}

int xd_scram_make(xd_scram_creds *out, xd_scram_hash h, unsigned iterations, const char *password)
{
    if (!out || !valid_hash(h) || iterations == 0 || !password)
        return -1;
    memset(out, 0, sizeof *out);
    out->hash = h;
    out->iterations = iterations;
    out->salt_len = XD_SCRAM_SALT_LEN;
    if (gnutls_rnd(GNUTLS_RND_RANDOM, out->salt, out->salt_len) != 0)
        return -1;
    if (xd_scram_derive(out, password) != 0) {
        explicit_bzero(out, sizeof *out);
        return -1;
    }
    return 0;
}

int xd_scram_verify_password(const xd_scram_creds *c, const char *password)
{
    if (!c || !password || !valid_hash(c->hash))
        return -1;
    xd_scram_creds tmp = *c;
    int rc = -1;
    if (xd_scram_derive(&tmp, password) == 0) {
        size_t hl = xd_scram_hash_len(c->hash);
        /* Both keys, combined without short-circuit, so timing is uniform. */
        int ok = ct_equal(tmp.stored_key, c->stored_key, hl);
        ok &= ct_equal(tmp.server_key, c->server_key, hl);
        rc = ok ? 1 : 0;
    }
    explicit_bzero(&tmp, sizeof tmp);
    return rc;
}

/* ------------------------------------------------------------ message syntax */

/* End of the attribute starting at p: the next ',' or end. */
static const char *field_end(const char *p, const char *end)
{
    const char *q = memchr(p, ',', (size_t)(end - p));
    return q ? q : end;
}

/* RFC 5802 section 7: printable = %x21-2B / %x2D-7E (no ','). */
static int valid_nonce(const char *p, size_t n)
{
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c < 0x21 || c > 0x7e || c == ',')
            return 0;
    }
    return 1;
}

/* Well-formed UTF-8 (RFC 3629): no overlongs, surrogates or > U+10FFFF. */
static int valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t more;
        uint32_t cp, min;
        if (c < 0x80) { i++; continue; }
        else if ((c & 0xe0) == 0xc0) { more = 1; cp = c & 0x1f; min = 0x80; }
        else if ((c & 0xf0) == 0xe0) { more = 2; cp = c & 0x0f; min = 0x800; }
        else if ((c & 0xf8) == 0xf0) { more = 3; cp = c & 0x07; min = 0x10000; }
        else return 0;
        if (n - i - 1 < more)
            return 0;
        for (size_t k = 1; k <= more; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return 0;
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += more + 1;
    }
    return 1;
}

/* saslname (RFC 5802 section 7): ',' and '=' appear only as "=2C" and
 * "=3D"; any other use of '=' is malformed.  Returns a new string or NULL. */
static char *decode_saslname(const char *p, const char *end)
{
    size_t n = (size_t)(end - p);
    if (n == 0)
        return NULL;
    char *out = malloc(n + 1);
    if (!out)
        return NULL;
    size_t o = 0;
    for (const char *q = p; q < end; q++) {
        if (*q != '=') {
            out[o++] = *q;
            continue;
        }
        if (end - q < 3)
            goto bad;
        if (q[1] == '2' && q[2] == 'C')
            out[o++] = ',';
        else if (q[1] == '3' && q[2] == 'D')
            out[o++] = '=';
        else
            goto bad;
        q += 2;
    }
    out[o] = '\0';
    if (o == 0 || !valid_utf8((const unsigned char *)out, o))
        goto bad;
    return out;
bad:
    free(out);
    return NULL;
}

/* Zero or more ",attr=value" (RFC 5802 section 7 "extensions"): attr is one
 * ALPHA, value non-empty.  Unknown optional extensions are ignored. */
static int valid_extensions(const char *p, const char *end)
{
    while (p < end) {
        if (*p != ',')
            return 0;
        p++;
        const char *q = field_end(p, end);
        if (q - p < 3)
            return 0;
        unsigned char a = (unsigned char)p[0];
        if (!((a >= 'a' && a <= 'z') || (a >= 'A' && a <= 'Z')) || p[1] != '=')
            return 0;
        p = q;
    }
    return 1;
}

/* Common checks on a client message: size bound and no NUL bytes (NUL is
 * not allowed anywhere in SCRAM and would truncate our C strings). */
static int valid_message(const char *msg, size_t len)
{
    return msg && len > 0 && len <= SCRAM_MAX_MSG && !memchr(msg, '\0', len);
}

/* ------------------------------------------------------------- server side */

xd_scram_server *xd_scram_server_new(xd_scram_hash h)
{
    if (!valid_hash(h))
        return NULL;
    xd_scram_server *s = calloc(1, sizeof *s);
    if (s) {
        s->hash = h;
        s->state = ST_NEW;
    }
    return s;
}

void xd_scram_server_free(xd_scram_server *s)
{
    if (!s)
        return;
    free_str(s->user);
    free_str(s->gs2_header);
    free_secret(s->cfb, s->cfb_len + 1);
    free_str(s->cnonce);
    free_str(s->snonce);
    free_secret(s->server_first, s->sf_len + 1);
    explicit_bzero(s, sizeof *s);
    free(s);
}

void xd_scram_server_set_nonce(xd_scram_server *s, const char *snonce)
{
    if (!s || !snonce || (s->state != ST_NEW && s->state != ST_STARTED))
        return;
    if (!valid_nonce(snonce, strlen(snonce)))
        return;
    char *copy = dup_span(snonce, strlen(snonce));
    if (!copy)
        return;
    free_str(s->snonce);
    s->snonce = copy;
}

static int fail(xd_scram_server *s, const char **err, const char *why)
{
    if (s)
        s->state = ST_FAILED;
    if (err)
        *err = why;
    return -1;
}

/* gs2-header = gs2-cbind-flag "," [authzid] ","  (RFC 5802 section 7).
 * Returns the header length, 0 on a malformed header (*err set). */
static size_t parse_gs2_header(const char *msg, const char *end, const char **err)
{
    const char *p = msg;
    *err = ERR_MALFORMED;
    /* "p=" asks for channel binding, which we never offer (no -PLUS); RFC
     * 5802 section 6 requires failing.  "y" means the client could do it but
     * thinks we can't, which is true here, so it is fine. */
    if (p == end || (*p != 'n' && *p != 'y'))
        return 0;
    p++;
    if (p == end || *p != ',')
        return 0;
    p++;
    if (p < end && *p == 'a') {
        if (end - p < 2 || p[1] != '=')
            return 0;
        const char *q = field_end(p, end);
        /* Acting for another identity is not supported; an empty a= is the
         * same as none. */
        if (q - (p + 2) > 0) {
            *err = ERR_INVALID_AUTHZID;
            return 0;
        }
        p = q;
    }
    if (p == end || *p != ',')
        return 0;
    return (size_t)(p + 1 - msg);
}

/* client-first-message-bare = [reserved-mext ","] username "," nonce
 *                             ["," extensions]                          */
static int parse_client_first_bare(xd_scram_server *s, const char *p, const char *end)
{
    /* m= is reserved for a future mandatory extension we can't know. */
    if (end - p < 2 || p[0] != 'n' || p[1] != '=')
        return -1;
    const char *q = field_end(p + 2, end);
    s->user = decode_saslname(p + 2, q);
    if (!s->user)
        return -1;
    p = q;
    if (end - p < 3 || memcmp(p, ",r=", 3) != 0)
        return -1;
    p += 3;
    q = field_end(p, end);
    if (!valid_nonce(p, (size_t)(q - p)))
        return -1;
    s->cnonce = dup_span(p, (size_t)(q - p));
    if (!s->cnonce)
        return -1;
    return valid_extensions(q, end) ? 0 : -1;
}

int xd_scram_server_start(xd_scram_server *s, const char *client_first, size_t len,
                          const char **user, const char **err)
{
    const char *e = ERR_MALFORMED;
    if (user)
        *user = NULL;
    if (!s || s->state != ST_NEW || !valid_message(client_first, len))
        return fail(s, err, ERR_MALFORMED);
    const char *end = client_first + len;
    size_t hl = parse_gs2_header(client_first, end, &e);
    if (hl == 0)
        return fail(s, err, e);
    const char *bare = client_first + hl;
    if (parse_client_first_bare(s, bare, end) != 0)
        return fail(s, err, ERR_MALFORMED);
    s->gs2_header = dup_span(client_first, hl);
    s->cfb_len = (size_t)(end - bare);
    s->cfb = dup_span(bare, s->cfb_len);
    if (!s->gs2_header || !s->cfb)
        return fail(s, err, ERR_TEMPORARY);
    s->state = ST_STARTED;
    if (user)
        *user = s->user;
    return 0;
}

static int make_snonce(xd_scram_server *s)
{
    unsigned char raw[SCRAM_SNONCE_BYTES];
    if (gnutls_rnd(GNUTLS_RND_NONCE, raw, sizeof raw) != 0)
        return -1;
    s->snonce = xd_base64_encode(raw, sizeof raw);
    explicit_bzero(raw, sizeof raw);
    return s->snonce ? 0 : -1;
}

int xd_scram_server_first(xd_scram_server *s, const xd_scram_creds *c, char **out,
                          size_t *out_len, const char **err)
{
    if (out)
        *out = NULL;
    if (out_len)
        *out_len = 0;
    if (!s || s->state != ST_STARTED || !c || !out || !out_len)
        return fail(s, err, ERR_MALFORMED);
    /* Unusable credentials are a server-side problem, not the client's. */
    if (c->hash != s->hash || c->iterations == 0 || c->salt_len == 0 ||
        c->salt_len > sizeof c->salt)
        return fail(s, err, ERR_TEMPORARY);
    if (!s->snonce && make_snonce(s) != 0)
        return fail(s, err, ERR_TEMPORARY);
    char *salt = xd_base64_encode(c->salt, c->salt_len);
    if (!salt)
        return fail(s, err, ERR_TEMPORARY);
    int n = snprintf(NULL, 0, "r=%s%s,s=%s,i=%u", s->cnonce, s->snonce, salt, c->iterations);
    char *msg = n > 0 ? malloc((size_t)n + 1) : NULL;
    char *copy = n > 0 ? malloc((size_t)n + 1) : NULL;
    if (!msg || !copy) {
        free(msg);
        free(copy);
        free(salt);
        return fail(s, err, ERR_TEMPORARY);
    }
    snprintf(msg, (size_t)n + 1, "r=%s%s,s=%s,i=%u", s->cnonce, s->snonce, salt, c->iterations);
    free(salt);
    memcpy(copy, msg, (size_t)n + 1);
    s->server_first = msg;
    s->sf_len = (size_t)n;
    memcpy(s->stored_key, c->stored_key, sizeof s->stored_key);
    memcpy(s->server_key, c->server_key, sizeof s->server_key);
    s->state = ST_FIRST_SENT;
    *out = copy;
    *out_len = (size_t)n;
    return 0;
}

/* Syntax and binding checks on client-final-message-without-proof:
 *   channel-binding "," nonce ["," extensions]
 * Returns NULL on success, else the SASL condition. */
static const char *check_final_without_proof(const xd_scram_server *s, const char *p,
                                             const char *end)
{
    if (end - p < 2 || memcmp(p, "c=", 2) != 0)
        return ERR_MALFORMED;
    const char *q = field_end(p + 2, end);
    const char *cval = p + 2;
    size_t clen = (size_t)(q - cval);
    p = q;
    if (end - p < 3 || memcmp(p, ",r=", 3) != 0)
        return ERR_MALFORMED;
    p += 3;
    q = field_end(p, end);
    const char *rval = p;
    size_t rlen = (size_t)(q - p);
    if (!valid_nonce(rval, rlen) || !valid_extensions(q, end))
        return ERR_MALFORMED;

    /* c= must carry exactly the gs2 header of client-first; otherwise a
     * man in the middle could have altered the flag (downgrade). */
    char *want = xd_base64_encode((const unsigned char *)s->gs2_header, strlen(s->gs2_header));
    if (!want)
        return ERR_TEMPORARY;
    int c_ok = strlen(want) == clen && memcmp(want, cval, clen) == 0;
    free(want);
    if (!c_ok)
        return ERR_NOT_AUTHORIZED;

    size_t cn = strlen(s->cnonce), sn = strlen(s->snonce);
    if (rlen != cn + sn || memcmp(rval, s->cnonce, cn) != 0 || memcmp(rval + cn, s->snonce, sn) != 0)
        return ERR_NOT_AUTHORIZED;
    return NULL;
}

/* AuthMessage = client-first-message-bare "," server-first-message ","
 *               client-final-message-without-proof        (RFC 5802 3) */
static char *build_auth_message(const xd_scram_server *s, const char *cfwp, size_t cfwp_len,
                                size_t *len)
{
    *len = s->cfb_len + 1 + s->sf_len + 1 + cfwp_len;
    char *m = malloc(*len);
    if (!m)
        return NULL;
    char *o = m;
    memcpy(o, s->cfb, s->cfb_len);
    o += s->cfb_len;
    *o++ = ',';
    memcpy(o, s->server_first, s->sf_len);
    o += s->sf_len;
    *o++ = ',';
    memcpy(o, cfwp, cfwp_len);
    return m;
}

/* ClientKey = proof XOR HMAC(StoredKey, AuthMessage); accept iff
 * H(ClientKey) == StoredKey.  Returns 1 match, 0 no, -1 error. */
static int check_proof(const xd_scram_server *s, const unsigned char *proof,
                       const char *auth, size_t auth_len)
{
    size_t hl = xd_scram_hash_len(s->hash);
    unsigned char sig[XD_SCRAM_MAX_HASH], key[XD_SCRAM_MAX_HASH], stored[XD_SCRAM_MAX_HASH];
    int rc = -1;
    if (hmac(s->hash, s->stored_key, hl, auth, auth_len, sig) != 0)
        goto done;
    for (size_t i = 0; i < hl; i++)
        key[i] = proof[i] ^ sig[i];
    if (gnutls_hash_fast(dig_alg(s->hash), key, hl, stored) != 0)
        goto done;
    rc = ct_equal(stored, s->stored_key, hl);
done:
    explicit_bzero(sig, sizeof sig);
    explicit_bzero(key, sizeof key);
    explicit_bzero(stored, sizeof stored);
    return rc;
}

/* server-final-message = "v=" base64(HMAC(ServerKey, AuthMessage)) */
static char *build_server_final(const xd_scram_server *s, const char *auth, size_t auth_len)
{
    size_t hl = xd_scram_hash_len(s->hash);
    unsigned char sig[XD_SCRAM_MAX_HASH];
    if (hmac(s->hash, s->server_key, hl, auth, auth_len, sig) != 0)
        return NULL;
    char *b = xd_base64_encode(sig, hl);
    explicit_bzero(sig, sizeof sig);
    if (!b)
        return NULL;
    size_t bl = strlen(b);
    char *m = malloc(bl + 3);
    if (m) {
        memcpy(m, "v=", 2);
        memcpy(m + 2, b, bl + 1);
    }
    free(b);
    return m;
}

int xd_scram_server_final(xd_scram_server *s, const char *client_final, size_t len, char **out,
                          size_t *out_len, const char **err)
{
    if (out)
        *out = NULL;
    if (out_len)
        *out_len = 0;
    if (!s || s->state != ST_FIRST_SENT || !out || !out_len || !valid_message(client_final, len))
        return fail(s, err, ERR_MALFORMED);
    const char *end = client_final + len;

    /* p= is always the last attribute, and base64 has no ',', so the last
     * ',' separates client-final-message-without-proof from the proof. */
    const char *comma = end;
    while (comma > client_final && comma[-1] != ',')
        comma--;
    if (comma == client_final)
        return fail(s, err, ERR_MALFORMED);
    comma--;
    if (end - comma < 3 || memcmp(comma, ",p=", 3) != 0)
        return fail(s, err, ERR_MALFORMED);

    const char *why = check_final_without_proof(s, client_final, comma);
    if (why)
        return fail(s, err, why);

    size_t hl = xd_scram_hash_len(s->hash), plen = 0;
    unsigned char *proof = xd_base64_decode(comma + 3, (size_t)(end - comma - 3), &plen);
    if (!proof || plen != hl) {
        free_secret(proof, plen);
        return fail(s, err, ERR_MALFORMED);
    }

    size_t auth_len;
    char *auth = build_auth_message(s, client_final, (size_t)(comma - client_final), &auth_len);
    int ok = auth ? check_proof(s, proof, auth, auth_len) : -1;
    free_secret(proof, plen);
    char *final = ok == 1 ? build_server_final(s, auth, auth_len) : NULL;
    free_secret(auth, auth ? auth_len : 0);
    if (ok != 1)
        return fail(s, err, ok == 0 ? ERR_NOT_AUTHORIZED : ERR_TEMPORARY);
    if (!final)
        return fail(s, err, ERR_TEMPORARY);

    /* Keys are no longer needed; wipe them now rather than at free. */
    explicit_bzero(s->stored_key, sizeof s->stored_key);
    explicit_bzero(s->server_key, sizeof s->server_key);
    s->state = ST_DONE;
    *out = final;
    *out_len = strlen(final);
    return 0;
}

void
xd_sha256(const void *data, size_t len, unsigned char out[32])
{
    gnutls_hash_fast(GNUTLS_DIG_SHA256, data, len, out);
}
