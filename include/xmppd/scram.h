/*
 * SCRAM (RFC 5802, RFC 7677): the salted keys stored for each account and
 * the server side of one SCRAM exchange, without channel binding.
 */
#ifndef XMPPD_SCRAM_H
#define XMPPD_SCRAM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum xd_scram_hash { XD_SCRAM_SHA1 = 1, XD_SCRAM_SHA256 = 2 } xd_scram_hash;

#define XD_SCRAM_MAX_HASH 32  /* SHA-256 digest size */
#define XD_SCRAM_SALT_LEN 16
#define XD_SCRAM_DEFAULT_ITERATIONS 4096

typedef struct xd_scram_creds {
    xd_scram_hash hash;
    unsigned iterations;
    unsigned char salt[XD_SCRAM_SALT_LEN * 2]; /* room for longer imported salts */
    size_t salt_len;
    unsigned char stored_key[XD_SCRAM_MAX_HASH];
    unsigned char server_key[XD_SCRAM_MAX_HASH];
} xd_scram_creds;

size_t xd_scram_hash_len(xd_scram_hash h);
const char *xd_scram_mech_name(xd_scram_hash h); /* "SCRAM-SHA-1", "SCRAM-SHA-256" */

/* Derive stored/server keys from a password (already SASLprep'd by the caller
 * or plain UTF-8). 0 ok, -1 error. salt/iterations must be set in out. */
int xd_scram_derive(xd_scram_creds *out, const char *password);

/* Fill salt with random bytes and derive keys. 0 ok, -1 error. */
int xd_scram_make(xd_scram_creds *out, xd_scram_hash h, unsigned iterations, const char *password);

/* Constant-time check of a plaintext password against stored keys: 1 match, 0 no, -1 error. */
int xd_scram_verify_password(const xd_scram_creds *c, const char *password);

/*
 * Server side of one exchange.
 *   xd_scram_server_start(): parse client-first-message; returns the
 *     authcid (username) through *user so the caller can look up credentials.
 *   xd_scram_server_first(): with the creds, build server-first-message.
 *   xd_scram_server_final(): check client-final-message; on success build
 *     server-final-message ("v=...").
 * All return 0 ok, -1 malformed or failed; on failure *err names the SASL
 * failure condition (RFC 6120 6.5: "malformed-request", "not-authorized", ...).
 * Messages in and out are the raw (base64-decoded) SCRAM strings.
 */
typedef struct xd_scram_server xd_scram_server;

xd_scram_server *xd_scram_server_new(xd_scram_hash h);
void xd_scram_server_free(xd_scram_server *s);
int xd_scram_server_start(xd_scram_server *s, const char *client_first, size_t len,
                          const char **user, const char **err);
int xd_scram_server_first(xd_scram_server *s, const xd_scram_creds *c, char **out,
                          size_t *out_len, const char **err);
int xd_scram_server_final(xd_scram_server *s, const char *client_final, size_t len, char **out,
                          size_t *out_len, const char **err);

/* Base64 helpers used by SASL (RFC 4648, no line breaks). Caller frees. */
char *xd_base64_encode(const unsigned char *in, size_t len);
/* Returns NULL on invalid input; *out_len set.  "=" alone decodes to empty. */
unsigned char *xd_base64_decode(const char *in, size_t len, size_t *out_len);

/* SHA-256 of data (spam lists key JIDs by their hash). */
void xd_sha256(const void *data, size_t len, unsigned char out[32]);

#ifdef __cplusplus
}
#endif
#endif
