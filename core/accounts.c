/*
 * Local accounts, kept in the table "accounts": key = bare JID string,
 * value = the salted SCRAM keys for SHA-1 and SHA-256, never the password.
 *
 * Record format, version 1 (all integers big-endian):
 *   u8   version (1)
 *   then twice, SCRAM-SHA-1 first and SCRAM-SHA-256 second:
 *     u32  iterations (> 0)
 *     u8   salt length (1..sizeof salt)
 *     salt
 *     StoredKey  (hash length: 20 or 32 bytes)
 *     ServerKey  (hash length)
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <xmppd/module.h>

#include "server.h"
#include "store.h"

#define ACCOUNTS_TABLE "accounts"
#define RECORD_VERSION 1
#define PASSWORD_MAX 1024
#define RECORD_MAX (1 + 2 * (4 + 1 + XD_SCRAM_SALT_LEN * 2 + 2 * XD_SCRAM_MAX_HASH))

static const xd_scram_hash record_order[2] = {XD_SCRAM_SHA1, XD_SCRAM_SHA256};

/* ---- record encoding ------------------------------------------------------ */

static size_t hash_len(xd_scram_hash h)
{
    return h == XD_SCRAM_SHA1 ? 20 : h == XD_SCRAM_SHA256 ? 32 : 0;
}

static size_t encode_creds(unsigned char *p, const xd_scram_creds *c)
{
    size_t hl = hash_len(c->hash), n = 0;

    p[n++] = (unsigned char)(c->iterations >> 24);
    p[n++] = (unsigned char)(c->iterations >> 16);
    p[n++] = (unsigned char)(c->iterations >> 8);
    p[n++] = (unsigned char)c->iterations;
    p[n++] = (unsigned char)c->salt_len;
    memcpy(p + n, c->salt, c->salt_len);
    n += c->salt_len;
    memcpy(p + n, c->stored_key, hl);
    n += hl;
    memcpy(p + n, c->server_key, hl);
    return n + hl;
}

/* creds[0] is SHA-1, creds[1] SHA-256.  Returns the record length. */
static size_t encode_record(unsigned char *buf, const xd_scram_creds creds[2])
{
    size_t n = 0;

    buf[n++] = RECORD_VERSION;
    n += encode_creds(buf + n, &creds[0]);
    n += encode_creds(buf + n, &creds[1]);
    return n;
}

/* Parse one credential block at *pos; -1 if it runs past the end or is
 * implausible. */
static int decode_creds(const unsigned char *buf, size_t len, size_t *pos, xd_scram_hash h,
                        xd_scram_creds *c)
{
    size_t hl = hash_len(h), p = *pos;

    if (len - p < 5)
        return -1;
    memset(c, 0, sizeof(*c));
    c->hash = h;
    c->iterations = (unsigned)buf[p] << 24 | (unsigned)buf[p + 1] << 16 |
                    (unsigned)buf[p + 2] << 8 | (unsigned)buf[p + 3];
    c->salt_len = buf[p + 4];
    p += 5;
    if (c->iterations == 0 || c->salt_len == 0 || c->salt_len > sizeof(c->salt) ||
        len - p < c->salt_len + 2 * hl)
        return -1;
    memcpy(c->salt, buf + p, c->salt_len);
    p += c->salt_len;
    memcpy(c->stored_key, buf + p, hl);
    p += hl;
    memcpy(c->server_key, buf + p, hl);
    *pos = p + hl;
    return 0;
}

/* Both credential sets from a stored record; -1 if corrupt. */
static int decode_record(const unsigned char *buf, size_t len, xd_scram_creds creds[2])
{
    size_t pos = 1;

    if (len < 1 || buf[0] != RECORD_VERSION)
        return -1;
    for (int i = 0; i < 2; i++)
        if (decode_creds(buf, len, &pos, record_order[i], &creds[i]) != 0)
            return -1;
    return pos == len ? 0 : -1;
}

/* ---- helpers -------------------------------------------------------------- */

static xd_db *accounts_table(void)
{
    return xd_db_open(ACCOUNTS_TABLE);
}

/* "accounts_meta": key "removed" -> 8-byte count of accounts ever deleted. */
#define META_TABLE "accounts_meta"
#define REMOVED_KEY "removed"

static int removals_read(xd_txn *txn, unsigned long long *n)
{
    xd_db *db = xd_db_open(META_TABLE);
    void *v = NULL;
    size_t vlen = 0;
    int r;

    *n = 0;
    if (!db)
        return -1;
    r = xd_db_get(db, txn, REMOVED_KEY, strlen(REMOVED_KEY), &v, &vlen);
    if (r == 0 && vlen == 8)
        *n = xd_db_get_be(v, 8);
    free(v);
    return r < 0 ? -1 : 0;
}

int xd_account_removals(unsigned long long *n)
{
    return removals_read(NULL, n);
}

/* The table key for a bare JID: "local@domain".  -1 if not an account JID. */
static int account_key(const xd_jid *bare, char *buf, size_t len)
{
    int n;

    if (!bare || !bare->local[0] || !bare->domain[0]) {
        xd_error("accounts: not a bare JID with a localpart");
        return -1;
    }
    if ((n = xd_jid_format(bare, 0, buf, len)) <= 0) {
        xd_error("accounts: cannot format JID");
        return -1;
    }
    return n;
}

static int password_ok(const char *password)
{
    size_t n = password ? strlen(password) : 0;

    if (n == 0 || n > PASSWORD_MAX) {
        xd_warn("accounts: password must be 1 to %d bytes", PASSWORD_MAX);
        return 0;
    }
    return 1;
}

/* Salt and derive both credential sets, then encode them. 0 ok, -1 error. */
static int make_record(const char *password, unsigned char *buf, size_t *len)
{
    xd_scram_creds creds[2];

    for (int i = 0; i < 2; i++) {
        if (xd_scram_make(&creds[i], record_order[i], XD_SCRAM_DEFAULT_ITERATIONS, password) !=
            0) {
            xd_error("accounts: deriving %s keys failed", xd_scram_mech_name(record_order[i]));
            return -1;
        }
        /* encode_creds trusts these bounds: check them once here. */
        if (creds[i].salt_len == 0 || creds[i].salt_len > sizeof(creds[i].salt) ||
            creds[i].iterations == 0) {
            xd_error("accounts: bad %s salt or iteration count",
                     xd_scram_mech_name(record_order[i]));
            return -1;
        }
    }
    *len = encode_record(buf, creds);
    memset(creds, 0, sizeof(creds));
    return 0;
}

/* Fetch and decode the record of key.  0, XD_NOTFOUND, -1 (logged). */
static int load_creds(xd_db *db, xd_txn *txn, const char *key, int klen,
                      xd_scram_creds creds[2])
{
    void *val;
    size_t vlen;
    int ret = xd_db_get(db, txn, key, (size_t)klen, &val, &vlen);

    if (ret != 0)
        return ret;
    if (decode_record(val, vlen, creds) != 0) {
        xd_error("accounts: corrupt record for %s (%zu bytes)", key, vlen);
        ret = -1;
    }
    free(val);
    return ret;
}

/*
 * Store fresh keys for key inside one transaction.  must_exist: 1 replaces
 * an existing account (XD_NOTFOUND otherwise), 0 creates one (-2 if it
 * exists).
 */
static int store_password(const xd_jid *bare, const char *password, int must_exist)
{
    char key[XD_JID_STR_MAX];
    unsigned char rec[RECORD_MAX];
    size_t rlen;
    void *old = NULL;
    xd_txn *txn;
    xd_db *db;
    int klen, ret;

    if (!password_ok(password) || (klen = account_key(bare, key, sizeof(key))) < 0 ||
        !(db = accounts_table()) || xd_txn_begin(&txn) != 0)
        return -1;
    ret = xd_db_get(db, txn, key, (size_t)klen, &old, NULL);
    free(old);
    if (ret == 0 && !must_exist)
        ret = -2;
    else if (ret == XD_NOTFOUND && !must_exist)
        ret = 0;
    if (ret == 0)
        ret = make_record(password, rec, &rlen);
    if (ret == 0)
        ret = xd_db_put(db, txn, key, (size_t)klen, rec, rlen);
    memset(rec, 0, sizeof(rec));
    if (ret != 0) {
        xd_txn_abort(txn);
        return ret;
    }
    return xd_txn_commit(txn);
}

/* ---- administration ------------------------------------------------------- */

int xd_account_create(const xd_jid *bare, const char *password)
{
    int ret = store_password(bare, password, 0);

    if (ret == 0)
        xd_info("accounts: created %s@%s", bare->local, bare->domain);
    return ret;
}

int xd_account_set_password(const xd_jid *bare, const char *password)
{
    int ret = store_password(bare, password, 1);

    if (ret == 0)
        xd_info("accounts: password changed for %s@%s", bare->local, bare->domain);
    return ret;
}

int xd_account_delete(const xd_jid *bare)
{
    char key[XD_JID_STR_MAX];
    xd_db *db;
    int klen, ret;

    xd_txn *txn = NULL;
    xd_event ev = {0};
    xd_jid who;

    if ((klen = account_key(bare, key, sizeof(key))) < 0 || !(db = accounts_table()))
        return -1;
    if ((ret = xd_account_exists(bare)) != 1)
        return ret == 0 ? XD_NOTFOUND : -1;
    /* Modules still holding the data say goodbye first (unsubscribe contacts...). */
    who = *bare;
    who.resource[0] = '\0';
    ev.from = &who;
    xd_hooks_run(XD_HOOK_ACCOUNT_REMOVED, &ev);
    /* Then the account and every record keyed "user\0..." go in one transaction,
     * so a name registered again later inherits nothing. */
    if (xd_txn_begin(&txn) != 0)
        return -1;
    ret = xd_db_del(db, txn, key, (size_t)klen);
    if (ret == 0) {
        char prefix[XD_JID_STR_MAX + 1];
        memcpy(prefix, key, (size_t)klen);
        prefix[klen] = '\0';
        ret = xd_store_purge_prefix(txn, prefix, (size_t)klen + 1);
    }
    if (ret == 0) {
        unsigned long long n;
        unsigned char v[8];
        xd_db *meta = xd_db_open(META_TABLE);
        ret = meta && removals_read(txn, &n) == 0 ? 0 : -1;
        if (ret == 0) {
            xd_db_put_be(v, n + 1, 8);
            ret = xd_db_put(meta, txn, REMOVED_KEY, strlen(REMOVED_KEY), v, sizeof(v));
        }
    }
    if (ret != 0) {
        xd_txn_abort(txn);
        return ret;
    }
    if ((ret = xd_txn_commit(txn)) == 0)
        xd_info("accounts: deleted %s and its data", key);
    return ret;
}

struct foreach_ctx {
    const char *domain;
    int (*fn)(const char *jid, void *data);
    void *data;
};

static int foreach_visit(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    const struct foreach_ctx *ctx = data;
    char jid[XD_JID_STR_MAX];
    const char *at;

    (void)val;
    (void)vlen;
    if (klen == 0 || klen >= sizeof(jid) || memchr(key, '\0', klen)) {
        xd_warn("accounts: skipping malformed key (%zu bytes)", klen);
        return 0;
    }
    memcpy(jid, key, klen);
    jid[klen] = '\0';
    /* A prepared localpart never contains '@', so the first one splits. */
    if (ctx->domain && (!(at = strchr(jid, '@')) || strcmp(at + 1, ctx->domain) != 0))
        return 0;
    return ctx->fn(jid, ctx->data);
}

int xd_account_foreach(const char *domain, int (*fn)(const char *jid, void *data), void *data)
{
    struct foreach_ctx ctx = {domain, fn, data};
    xd_db *db;

    if (!fn || !(db = accounts_table()))
        return -1;
    return xd_db_foreach(db, NULL, NULL, 0, foreach_visit, &ctx);
}

/* ---- module API ----------------------------------------------------------- */

int xd_account_exists(const xd_jid *bare)
{
    char key[XD_JID_STR_MAX];
    void *val;
    xd_db *db;
    int klen, ret;

    if ((klen = account_key(bare, key, sizeof(key))) < 0 || !(db = accounts_table()))
        return -1;
    ret = xd_db_get(db, NULL, key, (size_t)klen, &val, NULL);
    if (ret == 0) {
        free(val);
        return 1;
    }
    return ret == XD_NOTFOUND ? 0 : -1;
}

int xd_account_credentials(const xd_jid *bare, xd_scram_hash mech, xd_scram_creds *out)
{
    char key[XD_JID_STR_MAX];
    xd_scram_creds creds[2];
    xd_db *db;
    int klen, ret;

    if (!out || (mech != XD_SCRAM_SHA1 && mech != XD_SCRAM_SHA256)) {
        xd_error("accounts: bad credentials request");
        return -1;
    }
    if ((klen = account_key(bare, key, sizeof(key))) < 0 || !(db = accounts_table()))
        return -1;
    if ((ret = load_creds(db, NULL, key, klen, creds)) != 0)
        return ret;
    *out = creds[mech == XD_SCRAM_SHA1 ? 0 : 1];
    memset(creds, 0, sizeof(creds));
    return 0;
}

int xd_account_check_password(const xd_jid *bare, const char *password)
{
    /* Checked against when the account is missing, so an unknown user costs
     * the same key derivation as a wrong password. */
    static const xd_scram_creds dummy = {.hash = XD_SCRAM_SHA256,
                                         .iterations = XD_SCRAM_DEFAULT_ITERATIONS,
                                         .salt_len = XD_SCRAM_SALT_LEN};
    xd_scram_creds c;
    int ret;

    if (!password || strlen(password) > PASSWORD_MAX)
        return 0;
    ret = xd_account_credentials(bare, XD_SCRAM_SHA256, &c);
    if (ret == XD_NOTFOUND) {
        (void)xd_scram_verify_password(&dummy, password);
        return 0;
    }
    if (ret != 0)
        return -1;
    ret = xd_scram_verify_password(&c, password);
    memset(&c, 0, sizeof(c));
    return ret;
}
