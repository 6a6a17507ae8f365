/*
 * libFuzzer harness for core/scram.c: xd_base64_decode()/encode() on the
 * input, and one server-side SCRAM exchange with fixed credentials.
 *
 * Input layout:
 *   byte 0   flags: bit 0 SCRAM-SHA-256 (else SHA-1); bit 1 random server
 *            nonce (else the fixed one of the RFC 5802 / RFC 7677 example);
 *            bit 2 replace the client proof by the right one (so mutated
 *            exchanges can reach the success path)
 *   rest     client-first-message, NUL, client-final-message
 * Oracles: base64 is canonical (decode then encode gives the input back);
 * the server accepts a proof only if it is the right one for the
 * AuthMessage, and then its "v=" verifies on the client side.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include <xmppd/scram.h>
#include "scram_test.h"

#define PASSWORD "pencil"

typedef struct fixed {
    xd_scram_hash h;
    const char *salt_b64, *snonce;
    xd_scram_creds creds;
    unsigned char client_key[XD_SCRAM_MAX_HASH], server_key[XD_SCRAM_MAX_HASH];
} fixed;

static fixed F[2] = {
    {XD_SCRAM_SHA1, "QSXCR+Q6sek8bf92", "3rfcNHYJY1ZVvWVs7j", {0}, {0}, {0}},
    {XD_SCRAM_SHA256, "W22ZaJ0SNY7soEsUEjb6gQ==", "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0", {0}, {0}, {0}},
};

static gnutls_mac_algorithm_t mac(xd_scram_hash h)
{
    return h == XD_SCRAM_SHA1 ? GNUTLS_MAC_SHA1 : GNUTLS_MAC_SHA256;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    for (int i = 0; i < 2; i++) {
        fixed *f = &F[i];
        size_t hl = xd_scram_hash_len(f->h), n = 0;
        unsigned char salted[XD_SCRAM_MAX_HASH];
        /* xd_scram_make() with a random salt, then the RFC example salt so
         * the RFC messages in the seed corpus verify byte for byte. */
        if (xd_scram_make(&f->creds, f->h, 4096, PASSWORD) != 0)
            abort();
        unsigned char *salt = xd_base64_decode(f->salt_b64, strlen(f->salt_b64), &n);
        if (!salt || n > sizeof f->creds.salt)
            abort();
        memcpy(f->creds.salt, salt, n);
        f->creds.salt_len = n;
        free(salt);
        if (xd_scram_derive(&f->creds, PASSWORD) != 0)
            abort();
        /* the client side, computed independently */
        gnutls_datum_t key = {(unsigned char *)PASSWORD, sizeof PASSWORD - 1};
        gnutls_datum_t sd = {f->creds.salt, (unsigned)f->creds.salt_len};
        if (gnutls_pbkdf2(mac(f->h), &key, &sd, f->creds.iterations, salted, hl) != 0 ||
            gnutls_hmac_fast(mac(f->h), salted, hl, "Client Key", 10, f->client_key) != 0 ||
            gnutls_hmac_fast(mac(f->h), salted, hl, "Server Key", 10, f->server_key) != 0)
            abort();
        if (memcmp(f->server_key, f->creds.server_key, hl) != 0)
            abort();
    }
    return 0;
}

static void fuzz_base64(const uint8_t *data, size_t size)
{
    size_t n = 0;
    char *in = malloc(size ? size : 1);
    memcpy(in, data, size);
    unsigned char *dec = xd_base64_decode(in, size, &n);
    if (dec) {
        char *enc = xd_base64_encode(dec, n);
        int special = size == 1 && in[0] == '=';
        if (!enc || (!special && (strlen(enc) != size || memcmp(enc, in, size) != 0))) {
            fprintf(stderr, "base64 decode/encode does not round-trip\n");
            abort();
        }
        free(enc);
        free(dec);
    }
    char *enc = xd_base64_encode(data, size);
    if (!enc)
        abort();
    dec = xd_base64_decode(enc, strlen(enc), &n);
    if (!dec || n != size || memcmp(dec, data, size) != 0) {
        fprintf(stderr, "base64 encode/decode does not round-trip\n");
        abort();
    }
    free(dec);
    free(enc);
    free(in);
}

static char *dup_exact(const uint8_t *p, size_t n)
{
    char *r = malloc(n ? n : 1);
    memcpy(r, p, n);
    return r;
}

/* The proof for cfb "," sf "," cfwp, as the client computes it. */
static void client_proof(const fixed *f, const char *cfb, size_t cfb_len, const char *sf,
                         size_t sf_len, const char *cfwp, size_t cfwp_len, unsigned char *proof,
                         unsigned char *server_sig)
{
    size_t hl = xd_scram_hash_len(f->h);
    size_t al = cfb_len + 1 + sf_len + 1 + cfwp_len;
    char *auth = malloc(al);
    unsigned char stored[XD_SCRAM_MAX_HASH], sig[XD_SCRAM_MAX_HASH];
    memcpy(auth, cfb, cfb_len);
    auth[cfb_len] = ',';
    memcpy(auth + cfb_len + 1, sf, sf_len);
    auth[cfb_len + 1 + sf_len] = ',';
    memcpy(auth + cfb_len + sf_len + 2, cfwp, cfwp_len);
    if (gnutls_hash_fast(f->h == XD_SCRAM_SHA1 ? GNUTLS_DIG_SHA1 : GNUTLS_DIG_SHA256,
                         f->client_key, hl, stored) != 0 ||
        gnutls_hmac_fast(mac(f->h), stored, hl, auth, al, sig) != 0 ||
        gnutls_hmac_fast(mac(f->h), f->server_key, hl, auth, al, server_sig) != 0)
        abort();
    for (size_t i = 0; i < hl; i++)
        proof[i] = f->client_key[i] ^ sig[i];
    free(auth);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t flags = data[0];
    data++, size--;
    fuzz_base64(data, size);

    const fixed *f = &F[flags & 1];
    size_t hl = xd_scram_hash_len(f->h);
    const uint8_t *sep = memchr(data, '\0', size);
    size_t cf_len = sep ? (size_t)(sep - data) : size;
    char *cf = dup_exact(data, cf_len);
    const char *user = NULL, *err = NULL;
    char *sf = NULL, *final = NULL, *cfin = NULL;
    size_t sf_len = 0, final_len = 0;

    xd_scram_server *s = xd_scram_server_new(f->h);
    if (!s)
        abort();
    if (!(flags & 2))
        xd_scram_server_set_nonce(s, f->snonce);
    if (xd_scram_server_start(s, cf, cf_len, &user, &err) != 0) {
        if (!err)
            abort();
        /* a failed exchange stays failed */
        if (xd_scram_server_first(s, &f->creds, &sf, &sf_len, &err) == 0)
            abort();
        goto out;
    }
    if (!user || !*user)
        abort();
    /* a second client-first is refused */
    if (xd_scram_server_start(s, cf, cf_len, NULL, NULL) == 0)
        abort();
    xd_scram_server_free(s);
    s = xd_scram_server_new(f->h);
    if (!(flags & 2))
        xd_scram_server_set_nonce(s, f->snonce);
    if (xd_scram_server_start(s, cf, cf_len, &user, &err) != 0)
        abort(); /* same input, same answer */
    if (xd_scram_server_first(s, &f->creds, &sf, &sf_len, &err) != 0) {
        fprintf(stderr, "server_first failed: %s\n", err ? err : "(null)");
        abort();
    }
    if (!sf || strlen(sf) != sf_len || sf_len < 2 || memcmp(sf, "r=", 2) != 0)
        abort();
    if (!sep)
        goto out;

    /* client-final */
    size_t fin_len = size - cf_len - 1;
    const uint8_t *fin = sep + 1;
    /* gs2 header: flag "," [a=...] ","; client-first-message-bare follows */
    const char *c1 = memchr(cf, ',', cf_len);
    const char *c2 = c1 ? memchr(c1 + 1, ',', cf_len - (size_t)(c1 + 1 - cf)) : NULL;
    const char *cfb = c2 ? c2 + 1 : cf;
    size_t cfb_len = cf_len - (size_t)(cfb - cf);
    /* the proof goes after the last ",p=" */
    size_t cut = fin_len;
    while (cut > 0 && fin[cut - 1] != ',')
        cut--;
    int has_p = cut > 0 && fin_len - cut >= 2 && fin[cut] == 'p' && fin[cut + 1] == '=';
    size_t cfwp_len = has_p ? cut - 1 : fin_len;
    unsigned char proof[XD_SCRAM_MAX_HASH], server_sig[XD_SCRAM_MAX_HASH];
    client_proof(f, cfb, cfb_len, sf, sf_len, (const char *)fin, cfwp_len, proof, server_sig);
    if ((flags & 4) && has_p) {
        char *p64 = xd_base64_encode(proof, hl);
        size_t pl = strlen(p64);
        cfin = malloc(cut + 2 + pl);
        memcpy(cfin, fin, cut + 2);
        memcpy(cfin + cut + 2, p64, pl);
        fin_len = cut + 2 + pl;
        free(p64);
    } else {
        cfin = dup_exact(fin, fin_len);
    }
    if (xd_scram_server_final(s, cfin, fin_len, &final, &final_len, &err) == 0) {
        /* accepted: the proof must be exactly the right one ... */
        size_t n = 0;
        unsigned char *got = has_p ? xd_base64_decode(cfin + cut + 2, fin_len - cut - 2, &n) : NULL;
        if (!got || n != hl || memcmp(got, proof, hl) != 0) {
            fprintf(stderr, "server accepted a wrong proof\n");
            abort();
        }
        free(got);
        /* ... and the server signature must verify */
        char *v = xd_base64_encode(server_sig, hl);
        if (!final || final_len != strlen(final) || final_len != 2 + strlen(v) ||
            memcmp(final, "v=", 2) != 0 || memcmp(final + 2, v, strlen(v)) != 0) {
            fprintf(stderr, "bad server signature\n");
            abort();
        }
        free(v);
        free(final);
    } else if (!err) {
        abort();
    }
out:
    free(sf);
    free(cfin);
    free(cf);
    xd_scram_server_free(s);
    return 0;
}
