/*
 * Unit tests for core/storage.c and core/accounts.c.  Every test gets its own
 * mkdtemp() directory with a fresh environment, removed afterwards.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ev.h>

#include <xmppd/log.h>
#include <xmppd/module.h>
#include <xmppd/storage.h>

#include "store.h"

/* ---- stubs ------------------------------------------------------------------ */

static int error_lines; /* xd_error() calls, to check that failures are logged */

void xd_log(xd_log_level level, const char *fmt, ...)
{
    va_list ap;

    if (level == XD_LOG_ERROR)
        error_lines++;
    va_start(ap, fmt);
    fprintf(stderr, "[log %d] ", (int)level);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}


/* ---- fixtures --------------------------------------------------------------- */

static int rm_entry(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    (void)st;
    (void)type;
    (void)ftw;
    return remove(path);
}

static int setup(void **state)
{
    char *dir = strdup("/tmp/xd_test_storage_XXXXXX");

    if (!dir || !mkdtemp(dir))
        return -1;
    *state = dir;
    return xd_store_open(dir);
}

static int teardown(void **state)
{
    char *dir = *state;

    xd_store_close();
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
    return 0;
}

static void reopen(void **state)
{
    xd_store_close();
    assert_int_equal(xd_store_open(*state), 0);
}

static xd_jid make_jid(const char *local, const char *domain)
{
    xd_jid j;

    memset(&j, 0, sizeof(j));
    strcpy(j.local, local);
    strcpy(j.domain, domain);
    return j;
}

static void put_str(xd_db *db, xd_txn *txn, const char *k, const char *v)
{
    assert_int_equal(xd_db_put(db, txn, k, strlen(k), v, strlen(v)), 0);
}

static void assert_value(xd_db *db, xd_txn *txn, const char *k, const char *want)
{
    void *v;
    size_t vlen;

    assert_int_equal(xd_db_get(db, txn, k, strlen(k), &v, &vlen), 0);
    assert_int_equal(vlen, strlen(want));
    assert_string_equal(v, want); /* also checks the trailing NUL */
    free(v);
}

static void assert_absent(xd_db *db, xd_txn *txn, const char *k)
{
    void *v = (void *)1;

    assert_int_equal(xd_db_get(db, txn, k, strlen(k), &v, NULL), XD_NOTFOUND);
    assert_null(v);
}

/* ---- storage ---------------------------------------------------------------- */

static void test_put_get_del(void **state)
{
    xd_db *db = xd_db_open("kv");

    (void)state;
    assert_non_null(db);
    assert_ptr_equal(xd_db_open("kv"), db); /* cached */
    assert_absent(db, NULL, "a");
    put_str(db, NULL, "a", "one");
    assert_value(db, NULL, "a", "one");
    put_str(db, NULL, "a", "uno"); /* overwrite */
    assert_value(db, NULL, "a", "uno");
    put_str(db, NULL, "empty", "");
    assert_value(db, NULL, "empty", "");
    assert_int_equal(xd_db_del(db, NULL, "a", 1), 0);
    assert_absent(db, NULL, "a");
    assert_int_equal(xd_db_del(db, NULL, "a", 1), XD_NOTFOUND);
}

static void test_binary(void **state)
{
    static const unsigned char k1[] = {0, 1, 0, 2}, k2[] = {0, 1}, val[] = {'x', 0, 0, 'y', 0};
    xd_db *db = xd_db_open("bin");
    void *v;
    size_t vlen;

    (void)state;
    assert_int_equal(xd_db_put(db, NULL, k1, sizeof(k1), val, sizeof(val)), 0);
    assert_int_equal(xd_db_put(db, NULL, k2, sizeof(k2), "k2", 2), 0);
    assert_int_equal(xd_db_get(db, NULL, k1, sizeof(k1), &v, &vlen), 0);
    assert_int_equal(vlen, sizeof(val));
    assert_memory_equal(v, val, sizeof(val));
    assert_int_equal(((unsigned char *)v)[vlen], 0);
    free(v);
    assert_int_equal(xd_db_get(db, NULL, k2, sizeof(k2), &v, &vlen), 0);
    assert_int_equal(vlen, 2);
    assert_memory_equal(v, "k2", 2);
    free(v);
    /* A key that is a prefix of another is its own key. */
    assert_int_equal(xd_db_get(db, NULL, k1, 3, &v, &vlen), XD_NOTFOUND);
}

struct seen {
    char keys[200][32];
    int n;
    int stop_at;   /* stop (return 7) after this many, 0: never */
    int any_value; /* values are not copies of the keys */
};

static int collect(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    struct seen *s = data;

    assert_true(klen < 32);
    if (!s->any_value)
        assert_memory_equal(key, val, vlen < klen ? vlen : klen); /* value = key here */
    memcpy(s->keys[s->n], key, klen);
    s->keys[s->n][klen] = '\0';
    s->n++;
    return s->stop_at && s->n == s->stop_at ? 7 : 0;
}

static void test_foreach_prefix(void **state)
{
    static const char *keys[] = {"b", "a/2", "a/10", "a", "a/1", "ab", "a0", "c/1"};
    xd_db *db = xd_db_open("iter");
    struct seen s = {0};

    (void)state;
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        put_str(db, NULL, keys[i], keys[i]);

    assert_int_equal(xd_db_foreach(db, NULL, "a/", 2, collect, &s), 0);
    assert_int_equal(s.n, 3);
    assert_string_equal(s.keys[0], "a/1");
    assert_string_equal(s.keys[1], "a/10");
    assert_string_equal(s.keys[2], "a/2");

    memset(&s, 0, sizeof(s));
    assert_int_equal(xd_db_foreach(db, NULL, NULL, 0, collect, &s), 0);
    assert_int_equal(s.n, 8);
    assert_string_equal(s.keys[0], "a");
    assert_string_equal(s.keys[4], "a0");
    assert_string_equal(s.keys[7], "c/1");

    memset(&s, 0, sizeof(s));
    s.stop_at = 2;
    assert_int_equal(xd_db_foreach(db, NULL, "a", 1, collect, &s), 7);
    assert_int_equal(s.n, 2);

    memset(&s, 0, sizeof(s));
    assert_int_equal(xd_db_foreach(db, NULL, "zz", 2, collect, &s), 0);
    assert_int_equal(s.n, 0);
}

/* More records than one internal batch, deleted from inside the callback
 * with autocommit: must neither hang nor skip anything. */
static int delete_each(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    int *n = data;

    (void)val;
    (void)vlen;
    assert_int_equal(xd_db_del(xd_db_open("many"), NULL, key, klen), 0);
    (*n)++;
    return 0;
}

static void test_foreach_many_and_write_in_callback(void **state)
{
    xd_db *db = xd_db_open("many");
    struct seen s = {0};
    char k[16];
    int n = 0;

    (void)state;
    for (int i = 0; i < 150; i++) {
        snprintf(k, sizeof(k), "m%03d", i);
        put_str(db, NULL, k, k);
    }
    put_str(db, NULL, "n", "n");
    assert_int_equal(xd_db_foreach(db, NULL, "m", 1, collect, &s), 0);
    assert_int_equal(s.n, 150);
    for (int i = 0; i < 150; i++) {
        snprintf(k, sizeof(k), "m%03d", i);
        assert_string_equal(s.keys[i], k);
    }
    assert_int_equal(xd_db_foreach(db, NULL, "m", 1, delete_each, &n), 0);
    assert_int_equal(n, 150);
    memset(&s, 0, sizeof(s));
    assert_int_equal(xd_db_foreach(db, NULL, NULL, 0, collect, &s), 0);
    assert_int_equal(s.n, 1);
    assert_string_equal(s.keys[0], "n");
}

static void test_txn_abort(void **state)
{
    xd_db *db = xd_db_open("txn");
    xd_txn *txn;
    struct seen s = {.any_value = 1};

    put_str(db, NULL, "keep", "1");
    assert_int_equal(xd_txn_begin(&txn), 0);
    put_str(db, txn, "x", "1");
    put_str(db, txn, "y", "2");
    assert_int_equal(xd_db_del(db, txn, "keep", 4), 0);
    assert_value(db, txn, "x", "1"); /* visible inside */
    assert_int_equal(xd_db_foreach(db, txn, NULL, 0, collect, &s), 0);
    assert_int_equal(s.n, 2);
    xd_txn_abort(txn);
    assert_absent(db, NULL, "x");
    assert_absent(db, NULL, "y");
    assert_value(db, NULL, "keep", "1");
    reopen(state);
    db = xd_db_open("txn");
    assert_absent(db, NULL, "x");
    assert_value(db, NULL, "keep", "1");
}

/* Two transactions of the one thread wanting the same record: the second
 * must fail (lock timeout reported as a deadlock), not hang. */
static void test_self_deadlock_fails(void **state)
{
    xd_db *db = xd_db_open("lock");
    struct seen s = {0};
    xd_txn *a, *b;
    void *v;
    int before = error_lines;

    (void)state;
    put_str(db, NULL, "k", "0");
    assert_int_equal(xd_txn_begin(&a), 0);
    put_str(db, a, "k", "1");
    assert_int_equal(xd_db_put(db, NULL, "k", 1, "2", 1), -1);
    assert_true(error_lines > before);
    assert_int_equal(xd_db_get(db, NULL, "k", 1, &v, NULL), -1);
    assert_int_equal(xd_db_foreach(db, NULL, NULL, 0, collect, &s), -1);
    assert_int_equal(xd_txn_begin(&b), 0);
    assert_int_equal(xd_db_del(db, b, "k", 1), -1);
    xd_txn_abort(b);
    xd_txn_abort(a);
    assert_value(db, NULL, "k", "0");
    put_str(db, NULL, "k", "3");
    assert_value(db, NULL, "k", "3");
}

static void test_commit_persists(void **state)
{
    xd_db *db = xd_db_open("persist");
    xd_txn *txn;

    assert_int_equal(xd_txn_begin(&txn), 0);
    put_str(db, txn, "k1", "v1");
    put_str(db, txn, "k2", "v2");
    assert_int_equal(xd_txn_commit(txn), 0);
    put_str(db, NULL, "k3", "v3");
    xd_store_flush();
    reopen(state);
    reopen(state); /* close twice-safe, reopen again */
    db = xd_db_open("persist");
    assert_non_null(db);
    assert_value(db, NULL, "k1", "v1");
    assert_value(db, NULL, "k2", "v2");
    assert_value(db, NULL, "k3", "v3");
    xd_store_close();
    xd_store_close(); /* safe twice */
    assert_int_equal(xd_store_open(*state), 0);
}

/* The child commits and dies by SIGKILL without closing anything; the
 * parent's reopen runs recovery and must see every committed write. */
static void test_recovery_after_kill(void **state)
{
    int status;
    pid_t pid;

    xd_store_close(); /* the child must not inherit open handles */
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        xd_txn *txn;
        xd_db *db;

        if (xd_store_open(*state) != 0 || !(db = xd_db_open("crash")))
            _exit(2);
        if (xd_txn_begin(&txn) != 0 || xd_db_put(db, txn, "committed", 9, "yes", 3) != 0 ||
            xd_txn_commit(txn) != 0)
            _exit(3);
        if (xd_db_put(db, NULL, "auto", 4, "yes", 3) != 0)
            _exit(4);
        if (xd_txn_begin(&txn) != 0 || xd_db_put(db, txn, "pending", 7, "no", 2) != 0)
            _exit(5);
        kill(getpid(), SIGKILL);
        _exit(6);
    }
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status));
    assert_int_equal(WTERMSIG(status), SIGKILL);

    assert_int_equal(xd_store_open(*state), 0);
    xd_db *db = xd_db_open("crash");
    assert_non_null(db);
    assert_value(db, NULL, "committed", "yes");
    assert_value(db, NULL, "auto", "yes");
    assert_absent(db, NULL, "pending");
}

static void test_bad_table_names(void **state)
{
    char longname[80];

    (void)state;
    assert_null(xd_db_open(NULL));
    assert_null(xd_db_open(""));
    assert_null(xd_db_open("Upper"));
    assert_null(xd_db_open("a-b"));
    assert_null(xd_db_open("../etc"));
    assert_null(xd_db_open("a.db"));
    assert_null(xd_db_open("sp ace"));
    memset(longname, 'a', 65);
    longname[65] = '\0';
    assert_null(xd_db_open(longname));
    longname[64] = '\0';
    assert_non_null(xd_db_open(longname));
    assert_non_null(xd_db_open("ok_table_09"));
}

static void test_not_open(void **state)
{
    xd_txn *txn = (xd_txn *)1;

    xd_store_close();
    assert_null(xd_db_open("kv"));
    assert_int_equal(xd_txn_begin(&txn), -1);
    assert_null(txn);
    xd_store_flush(); /* harmless */
    assert_int_equal(xd_store_open(*state), 0);
    assert_int_equal(xd_store_open(*state), -1); /* already open */
}

static void test_creates_directory(void **state)
{
    char sub[512];
    xd_db *db;
    struct stat st;

    xd_store_close();
    snprintf(sub, sizeof(sub), "%s/new/data", (char *)*state);
    assert_int_equal(xd_store_open(sub), 0);
    assert_int_equal(stat(sub, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0700);
    db = xd_db_open("t");
    put_str(db, NULL, "k", "v");
    snprintf(sub, sizeof(sub), "%s/new/data/t.db", (char *)*state);
    assert_int_equal(access(sub, F_OK), 0);
}

/* ---- accounts --------------------------------------------------------------- */

static int collect_jid(const char *jid, void *data)
{
    struct seen *s = data;

    assert_true(strlen(jid) < 32);
    strcpy(s->keys[s->n++], jid);
    return 0;
}

static void test_accounts(void **state)
{
    xd_jid alice = make_jid("alice", "example.org");
    xd_jid bob = make_jid("bob", "example.org");
    xd_jid carol = make_jid("carol", "example.net");
    xd_jid nobody = make_jid("nobody", "example.org");
    xd_scram_creds c1, c256;
    struct seen s = {0};

    assert_int_equal(xd_account_exists(&alice), 0);
    assert_int_equal(xd_account_create(&alice, "secret"), 0);
    assert_int_equal(xd_account_create(&alice, "other"), -2);
    assert_int_equal(xd_account_create(&bob, "pw-bob"), 0);
    assert_int_equal(xd_account_create(&carol, "pw-carol"), 0);
    assert_int_equal(xd_account_exists(&alice), 1);
    assert_int_equal(xd_account_exists(&nobody), 0);

    assert_int_equal(xd_account_check_password(&alice, "secret"), 1);
    assert_int_equal(xd_account_check_password(&alice, "other"), 0); /* dup left it alone */
    assert_int_equal(xd_account_check_password(&alice, "Secret"), 0);
    assert_int_equal(xd_account_check_password(&alice, ""), 0);
    assert_int_equal(xd_account_check_password(&nobody, "secret"), 0);

    assert_int_equal(xd_account_credentials(&alice, XD_SCRAM_SHA1, &c1), 0);
    assert_int_equal(xd_account_credentials(&alice, XD_SCRAM_SHA256, &c256), 0);
    assert_int_equal(c1.hash, XD_SCRAM_SHA1);
    assert_int_equal(c256.hash, XD_SCRAM_SHA256);
    assert_int_equal(c1.iterations, XD_SCRAM_DEFAULT_ITERATIONS);
    assert_int_equal(c256.iterations, XD_SCRAM_DEFAULT_ITERATIONS);
    assert_int_equal(c1.salt_len, XD_SCRAM_SALT_LEN);
    assert_int_equal(xd_scram_verify_password(&c1, "secret"), 1);
    assert_int_equal(xd_scram_verify_password(&c256, "secret"), 1);
    assert_int_equal(xd_account_credentials(&nobody, XD_SCRAM_SHA256, &c256), XD_NOTFOUND);

    assert_int_equal(xd_account_set_password(&alice, "new secret"), 0);
    assert_int_equal(xd_account_check_password(&alice, "secret"), 0);
    assert_int_equal(xd_account_check_password(&alice, "new secret"), 1);
    assert_int_equal(xd_account_set_password(&nobody, "x"), XD_NOTFOUND);
    assert_int_equal(xd_account_exists(&nobody), 0);

    assert_int_equal(xd_account_foreach("example.org", collect_jid, &s), 0);
    assert_int_equal(s.n, 2);
    assert_string_equal(s.keys[0], "alice@example.org");
    assert_string_equal(s.keys[1], "bob@example.org");
    memset(&s, 0, sizeof(s));
    assert_int_equal(xd_account_foreach(NULL, collect_jid, &s), 0);
    assert_int_equal(s.n, 3);
    assert_string_equal(s.keys[0], "alice@example.org");
    assert_string_equal(s.keys[2], "carol@example.net");
    memset(&s, 0, sizeof(s));
    assert_int_equal(xd_account_foreach("example.com", collect_jid, &s), 0);
    assert_int_equal(s.n, 0);
    memset(&s, 0, sizeof(s));
    assert_int_equal(xd_account_foreach("org", collect_jid, &s), 0); /* whole domain only */
    assert_int_equal(s.n, 0);

    /* Accounts survive a restart. */
    reopen(state);
    assert_int_equal(xd_account_check_password(&alice, "new secret"), 1);

    assert_int_equal(xd_account_delete(&bob), 0);
    assert_int_equal(xd_account_delete(&bob), XD_NOTFOUND);
    assert_int_equal(xd_account_exists(&bob), 0);
    assert_int_equal(xd_account_check_password(&bob, "pw-bob"), 0);
    memset(&s, 0, sizeof(s));
    assert_int_equal(xd_account_foreach("example.org", collect_jid, &s), 0);
    assert_int_equal(s.n, 1);
}

static void test_account_bad_input(void **state)
{
    xd_jid dave = make_jid("dave", "example.org");
    xd_jid domain_only = make_jid("", "example.org");
    char *big = malloc(1026);

    (void)state;
    assert_non_null(big);
    assert_int_equal(xd_account_create(&dave, ""), -1);
    assert_int_equal(xd_account_create(&dave, NULL), -1);
    memset(big, 'p', 1025);
    big[1025] = '\0';
    assert_int_equal(xd_account_create(&dave, big), -1);
    assert_int_equal(xd_account_exists(&dave), 0);
    big[1024] = '\0'; /* exactly 1024 bytes is allowed */
    assert_int_equal(xd_account_create(&dave, big), 0);
    assert_int_equal(xd_account_check_password(&dave, big), 1);
    assert_int_equal(xd_account_set_password(&dave, ""), -1);
    assert_int_equal(xd_account_check_password(&dave, big), 1);
    assert_int_equal(xd_account_create(&domain_only, "pw"), -1);
    free(big);
}

static int memmem_found(const void *hay, size_t hlen, const char *needle)
{
    return memmem(hay, hlen, needle, strlen(needle)) != NULL;
}

static void test_record_has_no_password(void **state)
{
    static const char pw[] = "Tr0ub4dor&3-unique-password";
    xd_jid erin = make_jid("erin", "example.org");
    void *v;
    size_t vlen;

    (void)state;
    assert_int_equal(xd_account_create(&erin, pw), 0);
    assert_int_equal(xd_db_get(xd_db_open("accounts"), NULL, "erin@example.org", 16, &v, &vlen),
                     0);
    assert_int_equal(((unsigned char *)v)[0], 1); /* format version */
    /* 1 + (4+1+16+20+20) + (4+1+16+32+32) */
    assert_int_equal(vlen, 147);
    assert_false(memmem_found(v, vlen, pw));
    assert_false(memmem_found(v, vlen, "Tr0ub4dor"));
    /* iterations, big-endian, right after the version byte */
    assert_int_equal(((unsigned char *)v)[3], (XD_SCRAM_DEFAULT_ITERATIONS >> 8) & 0xff);
    free(v);
}

static void test_corrupt_record(void **state)
{
    static const unsigned char bad_version[147] = {2};
    xd_jid frank = make_jid("frank", "example.org");
    xd_db *db = xd_db_open("accounts");
    const char *key = "frank@example.org";
    xd_scram_creds c;
    void *v;
    size_t vlen;

    (void)state;
    assert_int_equal(xd_account_create(&frank, "pw"), 0);
    assert_int_equal(xd_db_get(db, NULL, key, strlen(key), &v, &vlen), 0);

    /* Truncated by one byte, then by a lot, then an extra byte. */
    size_t lens[] = {vlen - 1, 10, 1, 0};
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        assert_int_equal(xd_db_put(db, NULL, key, strlen(key), v, lens[i]), 0);
        int before = error_lines;
        assert_int_equal(xd_account_credentials(&frank, XD_SCRAM_SHA256, &c), -1);
        assert_true(error_lines > before);
        assert_int_equal(xd_account_check_password(&frank, "pw"), -1);
        assert_int_equal(xd_account_exists(&frank), 1);
    }
    unsigned char *longer = malloc(vlen + 1);
    assert_non_null(longer);
    memcpy(longer, v, vlen);
    longer[vlen] = 0;
    assert_int_equal(xd_db_put(db, NULL, key, strlen(key), longer, vlen + 1), 0);
    assert_int_equal(xd_account_check_password(&frank, "pw"), -1);
    free(longer);

    assert_int_equal(xd_db_put(db, NULL, key, strlen(key), bad_version, sizeof(bad_version)), 0);
    assert_int_equal(xd_account_credentials(&frank, XD_SCRAM_SHA1, &c), -1);

    /* A salt length larger than the record claims room for. */
    ((unsigned char *)v)[5] = 200;
    assert_int_equal(xd_db_put(db, NULL, key, strlen(key), v, vlen), 0);
    assert_int_equal(xd_account_credentials(&frank, XD_SCRAM_SHA1, &c), -1);
    ((unsigned char *)v)[5] = XD_SCRAM_SALT_LEN;

    /* Zero iterations. */
    memset((unsigned char *)v + 1, 0, 4);
    assert_int_equal(xd_db_put(db, NULL, key, strlen(key), v, vlen), 0);
    assert_int_equal(xd_account_credentials(&frank, XD_SCRAM_SHA1, &c), -1);
    free(v);

    /* The account can still be repaired or removed. */
    assert_int_equal(xd_account_set_password(&frank, "pw2"), 0);
    assert_int_equal(xd_account_check_password(&frank, "pw2"), 1);
    assert_int_equal(xd_account_delete(&frank), 0);
}

/* xd_db_first/xd_db_last: the ends of a prefix, whatever sorts around it. */
static void test_first_last(void **state)
{
    xd_db *db = xd_db_open("edges");
    static const char *keys[] = {"a", "ab\x01", "ab\x02", "ab\xff", "ab\xff\xff", "ac", "b"};
    void *k, *v;
    size_t kl, vl;

    (void)state;
    assert_non_null(db);
    assert_int_equal(xd_db_last(db, NULL, "ab", 2, &k, &kl, &v, &vl), XD_NOTFOUND);
    assert_null(k);
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        assert_int_equal(xd_db_put(db, NULL, keys[i], strlen(keys[i]), keys[i], strlen(keys[i])), 0);

    assert_int_equal(xd_db_first(db, NULL, "ab", 2, &k, &kl, &v, &vl), 0);
    assert_int_equal(kl, 3);
    assert_memory_equal(k, "ab\x01", 3);
    assert_string_equal(v, "ab\x01");
    free(k);
    free(v);
    assert_int_equal(xd_db_last(db, NULL, "ab", 2, &k, &kl, &v, &vl), 0);
    assert_int_equal(kl, 4);
    assert_memory_equal(k, "ab\xff\xff", 4);
    free(k);
    free(v);
    /* a prefix ending in 0xff, and one past the last key of the table */
    assert_int_equal(xd_db_last(db, NULL, "ab\xff", 3, &k, &kl, &v, &vl), 0);
    assert_int_equal(kl, 4);
    free(k);
    free(v);
    assert_int_equal(xd_db_last(db, NULL, "b", 1, &k, &kl, &v, &vl), 0);
    assert_memory_equal(k, "b", 1);
    free(k);
    free(v);
    assert_int_equal(xd_db_first(db, NULL, "aa", 2, &k, &kl, &v, &vl), XD_NOTFOUND);
    assert_int_equal(xd_db_last(db, NULL, "ad", 2, &k, &kl, &v, &vl), XD_NOTFOUND);
    assert_int_equal(xd_db_last(db, NULL, "c", 1, &k, &kl, &v, &vl), XD_NOTFOUND);
    /* the whole table */
    assert_int_equal(xd_db_last(db, NULL, NULL, 0, &k, &kl, &v, &vl), 0);
    assert_memory_equal(k, "b", 1);
    free(k);
    free(v);
}

/* ---- group commit ------------------------------------------------------------ */

typedef struct order {
    int seen[8];
    int n;
    int dropped;
} order;

static void note_1(void *data) { order *o = data; o->seen[o->n++] = 1; }
static void note_2(void *data) { order *o = data; o->seen[o->n++] = 2; }
static void note_3(void *data) { order *o = data; o->seen[o->n++] = 3; }
static void note_drop(void *data) { ((order *)data)->dropped++; }
static void no_failure(void) { fail_msg("the flusher reported a failure"); }

/* Turn the loop until `commit` is durable: at most 10 s (the storage
 * watchers do not keep a loop running, so each turn is a poll, then 1 ms). */
static void run_until_durable(struct ev_loop *loop, uint64_t commit)
{
    for (int i = 0; i < 10000 && !xd_store_is_durable(commit); i++) {
        ev_run(loop, EVRUN_NOWAIT);
        usleep(1000);
    }
    assert_true(xd_store_is_durable(commit));
}

/* With the flusher, a commit is not durable until the loop has asked for it
 * and the thread has synced the log; waiters run then, in order; what still
 * waits when the store closes is dropped, never run. */
static void test_group_commit(void **state)
{
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    xd_db *db = xd_db_open("gc");
    order o = {0};
    uint64_t c1, c2;

    (void)state;
    assert_non_null(loop);
    assert_non_null(db);
    assert_int_equal(xd_store_start_flusher(loop, no_failure), 0);
    assert_int_equal(xd_store_start_flusher(loop, no_failure), -1); /* once */

    put_str(db, NULL, "a", "1");
    c1 = xd_store_commits();
    assert_true(c1 > 0);
    assert_false(xd_store_is_durable(c1)); /* nobody asked the thread yet */
    assert_int_equal(xd_store_when_durable(c1, note_1, note_drop, &o), 0);
    {
        xd_txn *txn;
        assert_int_equal(xd_txn_begin(&txn), 0);
        put_str(db, txn, "b", "2");
        assert_int_equal(xd_txn_commit(txn), 0);
    }
    c2 = xd_store_commits();
    assert_true(c2 > c1);
    /* an earlier commit number still waits its turn behind the first waiter */
    assert_int_equal(xd_store_when_durable(c2, note_2, note_drop, &o), 0);
    assert_int_equal(xd_store_when_durable(c1, note_3, note_drop, &o), 0);
    assert_int_equal(o.n, 0);

    run_until_durable(loop, c2);
    assert_int_equal(o.n, 3);
    assert_int_equal(o.seen[0], 1);
    assert_int_equal(o.seen[1], 2);
    assert_int_equal(o.seen[2], 3);
    /* durable already: runs at once */
    assert_int_equal(xd_store_when_durable(c2, note_1, note_drop, &o), 0);
    assert_int_equal(o.n, 4);

    /* many commits between two loop turns share one flush */
    {
        unsigned long before = xd_store_flush_count();
        for (int i = 0; i < 200; i++) {
            char k[16];
            snprintf(k, sizeof(k), "k%d", i);
            put_str(db, NULL, k, "v");
        }
        run_until_durable(loop, xd_store_commits());
        assert_true(xd_store_flush_count() - before <= 2);
    }

    /* a waiter left at close is dropped */
    put_str(db, NULL, "c", "3");
    assert_int_equal(xd_store_when_durable(xd_store_commits(), note_1, note_drop, &o), 0);
    xd_store_close();
    assert_int_equal(o.dropped, 1);
    assert_int_equal(o.n, 4);
    ev_loop_destroy(loop);
    reopen(state);
    db = xd_db_open("gc");
    assert_value(db, NULL, "c", "3"); /* close flushed it */
}

/* A commit the flusher reported durable survives the process being killed
 * right after (the child waits for it, then SIGKILLs itself). */
static void test_group_commit_survives_kill(void **state)
{
    int status;
    pid_t pid;

    xd_store_close();
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
        xd_db *db;
        uint64_t c;

        if (!loop || xd_store_open(*state) != 0 || !(db = xd_db_open("crash")) ||
            xd_store_start_flusher(loop, no_failure) != 0)
            _exit(2);
        if (xd_db_put(db, NULL, "acked", 5, "yes", 3) != 0)
            _exit(3);
        c = xd_store_commits();
        for (int i = 0; i < 10000 && !xd_store_is_durable(c); i++) {
            ev_run(loop, EVRUN_NOWAIT);
            usleep(1000);
        }
        if (!xd_store_is_durable(c))
            _exit(4);
        kill(getpid(), SIGKILL);
        _exit(5);
    }
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status));
    assert_int_equal(WTERMSIG(status), SIGKILL);
    assert_int_equal(xd_store_open(*state), 0);
    xd_db *db = xd_db_open("crash");
    assert_non_null(db);
    assert_value(db, NULL, "acked", "yes");
}

/* ---- heap tables ------------------------------------------------------------ */

typedef struct heap_seen {
    uint64_t ids[600];
    int n;
    int del_every; /* delete every nth record visited (from the callback) */
    xd_db *h;
} heap_seen;

static int see(uint64_t id, const void *val, size_t vlen, void *data)
{
    heap_seen *s = data;
    assert_true(vlen >= 4);
    assert_memory_equal(val, "rec ", 4);
    assert_true(s->n < 600);
    s->ids[s->n++] = id;
    if (s->del_every && s->n % s->del_every == 0)
        assert_int_equal(xd_heap_del(s->h, NULL, id), 0);
    return 0;
}

static void test_heap(void **state)
{
    xd_db *h = xd_heap_open("bodies"), *bt = xd_db_open("index");
    uint64_t ids[500], pos = 0, dup;
    char buf[64];
    void *v;
    size_t vl;
    heap_seen s = {.h = h};
    int r, rounds = 0;

    (void)state;
    assert_non_null(h);
    assert_non_null(bt);
    /* the kinds do not mix */
    assert_null(xd_db_open("bodies"));
    assert_null(xd_heap_open("index"));
    assert_int_equal(xd_db_put(h, NULL, "k", 1, "v", 1), -1);
    assert_int_equal(xd_heap_add(bt, NULL, "v", 1, &dup), -1);

    for (int i = 0; i < 500; i++) {
        int n = snprintf(buf, sizeof(buf), "rec %d %.*s", i, i % 40, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
        assert_int_equal(xd_heap_add(h, NULL, buf, (size_t)n, &ids[i]), 0);
        assert_true(ids[i] != 0);
        for (int j = 0; j < i; j++)
            assert_true(ids[j] != ids[i]);
    }
    assert_int_equal(xd_heap_get(h, NULL, ids[123], &v, &vl), 0);
    snprintf(buf, sizeof(buf), "rec %d", 123);
    assert_memory_equal(v, buf, strlen(buf));
    free(v);
    assert_int_equal(xd_heap_del(h, NULL, ids[123]), 0);
    assert_int_equal(xd_heap_get(h, NULL, ids[123], &v, &vl), XD_NOTFOUND);
    assert_int_equal(xd_heap_del(h, NULL, ids[123]), XD_NOTFOUND);

    /* scan in steps of 7, deleting every third record from the callback:
     * every record is seen once, even when the one a step ended on is gone */
    s.del_every = 3;
    while ((r = xd_heap_scan(h, &pos, 7, see, &s)) == 0)
        assert_true(++rounds < 200);
    assert_int_equal(r, XD_NOTFOUND);
    assert_int_equal(s.n, 499);
    for (int i = 0; i < s.n; i++)
        for (int j = 0; j < i; j++)
            assert_true(s.ids[i] != s.ids[j]);
    /* what is left: two of every three */
    s = (heap_seen){.h = h};
    pos = 0;
    assert_int_equal(xd_heap_scan(h, &pos, 1000, see, &s), XD_NOTFOUND);
    assert_int_equal(s.n, 499 - 499 / 3);
    /* heap tables are not purged by user prefix (their module does that) */
    {
        xd_txn *txn;
        assert_int_equal(xd_txn_begin(&txn), 0);
        assert_int_equal(xd_store_purge_prefix(txn, "rec ", 4), 0);
        assert_int_equal(xd_txn_commit(txn), 0);
    }
    s = (heap_seen){.h = h};
    pos = 0;
    assert_int_equal(xd_heap_scan(h, &pos, 1000, see, &s), XD_NOTFOUND);
    assert_int_equal(s.n, 499 - 499 / 3);
    /* an empty heap */
    {
        xd_db *e = xd_heap_open("empty");
        s = (heap_seen){.h = e};
        pos = 0;
        assert_int_equal(xd_heap_scan(e, &pos, 10, see, &s), XD_NOTFOUND);
        assert_int_equal(s.n, 0);
    }
}

/* The count of removed accounts survives a restart. */
static void test_account_removals(void **state)
{
    xd_jid a;
    unsigned long long n;

    assert_int_equal(xd_account_removals(&n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(xd_jid_parse(&a, "gone@example.org"), 0);
    assert_int_equal(xd_account_create(&a, "pw-gone-1"), 0);
    assert_int_equal(xd_account_delete(&a), 0);
    assert_int_equal(xd_account_delete(&a), XD_NOTFOUND);
    assert_int_equal(xd_account_removals(&n), 0);
    assert_int_equal(n, 1);
    xd_store_close();
    assert_int_equal(xd_store_open(*state), 0);
    assert_int_equal(xd_account_removals(&n), 0);
    assert_int_equal(n, 1);
}

/* A second process cannot open a data directory that one has open, and
 * can once that one is gone (even without closing: killed). */
static void test_one_process(void **state)
{
    int ready[2], done[2], status;
    char c = 0;
    pid_t pid;

    xd_store_close();
    assert_int_equal(pipe(ready), 0);
    assert_int_equal(pipe(done), 0);
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        if (xd_store_open(*state) != 0 || write(ready[1], "r", 1) != 1)
            _exit(1);
        if (read(done[0], &c, 1) != 1)
            _exit(2);
        _exit(0); /* no close: the lock goes with the process */
    }
    assert_int_equal(read(ready[0], &c, 1), 1);
    xd_store_quiet_busy(1);
    assert_int_equal(xd_store_open(*state), XD_BUSY);
    xd_store_quiet_busy(0);
    assert_int_equal(write(done[1], "d", 1), 1);
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_int_equal(xd_store_open(*state), 0);
    for (int i = 0; i < 2; i++) {
        close(ready[i]);
        close(done[i]);
    }
}

/* Account removal of a big archive: one transaction over thousands of pages
 * (and a heap of bodies) stays within the lock table. */
static void test_purge_big(void **state)
{
    xd_db *db = xd_db_open("big"), *h = xd_heap_open("big_bodies");
    char key[64], val[300];
    xd_txn *txn;
    uint64_t *ids = calloc(20000, sizeof(*ids));
    void *v;
    size_t vl;

    (void)state;
    assert_non_null(ids);
    memset(val, 'v', sizeof(val));
    for (int i = 0; i < 20000; i++) {
        int n = snprintf(key, sizeof(key), "%s%c%08d", i % 2 ? "big@x" : "other@x", 0, i);
        assert_int_equal(xd_db_put(db, NULL, key, (size_t)n, val, sizeof(val)), 0);
        assert_int_equal(xd_heap_add(h, NULL, val, sizeof(val), &ids[i]), 0);
    }
    assert_int_equal(xd_txn_begin(&txn), 0);
    assert_int_equal(xd_store_purge_prefix(txn, "big@x", 6), 0);
    for (int i = 1; i < 20000; i += 2)
        assert_int_equal(xd_heap_del(h, txn, ids[i]), 0);
    assert_int_equal(xd_txn_commit(txn), 0);
    {
        int n = snprintf(key, sizeof(key), "big@x%c%08d", 0, 1);
        assert_int_equal(xd_db_get(db, NULL, key, (size_t)n, &v, &vl), XD_NOTFOUND);
        n = snprintf(key, sizeof(key), "other@x%c%08d", 0, 0);
        assert_int_equal(xd_db_get(db, NULL, key, (size_t)n, &v, &vl), 0);
        free(v);
    }
    assert_int_equal(xd_heap_get(h, NULL, ids[1], &v, &vl), XD_NOTFOUND);
    assert_int_equal(xd_heap_get(h, NULL, ids[0], &v, &vl), 0);
    free(v);
    free(ids);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
        T(test_put_get_del),
        T(test_binary),
        T(test_foreach_prefix),
        T(test_foreach_many_and_write_in_callback),
        T(test_txn_abort),
        T(test_self_deadlock_fails),
        T(test_commit_persists),
        T(test_recovery_after_kill),
        T(test_bad_table_names),
        T(test_not_open),
        T(test_creates_directory),
        T(test_accounts),
        T(test_account_bad_input),
        T(test_record_has_no_password),
        T(test_corrupt_record),
        T(test_first_last),
        T(test_group_commit),
        T(test_group_commit_survives_kill),
        T(test_heap),
        T(test_account_removals),
        T(test_one_process),
        T(test_purge_big),
#undef T
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
