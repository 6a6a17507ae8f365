/*
 * Storage: one Berkeley DB transactional environment in data_dir, seen by
 * modules as named key/value tables with transactions.  Keys and values are
 * opaque bytes.  Functions return 0 ok, XD_NOTFOUND, or -1 (logged).
 *
 * Durability is grouped: in the server a commit returns before its data is
 * on disk, and a thread flushes the log for many commits at once.  Whatever
 * tells someone that the server has taken responsibility for something (an
 * ack, a result, a notice) waits for the commits it depends on with
 * xd_store_when_durable(), or goes through xd_session_send_durable() /
 * xd_route_durable() (module.h), which do that.
 */
#ifndef XMPPD_STORAGE_H
#define XMPPD_STORAGE_H

#include <stddef.h>
#include <stdint.h>

#include <xmppd/jid.h>

#ifdef __cplusplus
extern "C" {
#endif

#define XD_NOTFOUND 1

typedef struct xd_db xd_db;   /* a named table; lives until the store closes */
typedef struct xd_txn xd_txn; /* a transaction; NULL means autocommit */

/* Open (creating if needed) the named table. NULL on error. */
xd_db *xd_db_open(const char *name);

int xd_txn_begin(xd_txn **txn);
int xd_txn_commit(xd_txn *txn);  /* committed; durable once xd_store_is_durable() says so */
void xd_txn_abort(xd_txn *txn);

/* The number of the newest write commit (transactions and writes without
 * one); numbers only grow. */
uint64_t xd_store_commits(void);
/* 1 once that commit, and every one before it, is on disk. */
int xd_store_is_durable(uint64_t commit);
/* fn(data) runs on the server's loop once `commit` is durable: at once if it
 * already is.  Waiters run in the order they were added.  If the store
 * closes first, drop(data) runs instead (when not NULL).  -1: out of memory,
 * nothing will run. */
typedef void (*xd_durable_fn)(void *data);
int xd_store_when_durable(uint64_t commit, xd_durable_fn fn, xd_durable_fn drop, void *data);

/* *val is malloc'd (caller frees), with a NUL after the bytes for convenience. */
int xd_db_get(xd_db *db, xd_txn *txn, const void *key, size_t klen, void **val, size_t *vlen);
int xd_db_put(xd_db *db, xd_txn *txn, const void *key, size_t klen, const void *val, size_t vlen);
int xd_db_del(xd_db *db, xd_txn *txn, const void *key, size_t klen);

/* Visit every record whose key starts with prefix (all when plen == 0), in key
 * order.  fn returns 0 to go on, non-zero to stop (that value is returned). */
typedef int (*xd_db_visit_fn)(const void *key, size_t klen, const void *val, size_t vlen,
                              void *data);
int xd_db_foreach(xd_db *db, xd_txn *txn, const void *prefix, size_t plen, xd_db_visit_fn fn,
                  void *data);

/* The first or last record (in key order) whose key starts with prefix, in
 * one lookup: 0 with *key and *val malloc'd (caller frees), XD_NOTFOUND, -1. */
int xd_db_first(xd_db *db, xd_txn *txn, const void *prefix, size_t plen, void **key, size_t *klen,
                void **val, size_t *vlen);
int xd_db_last(xd_db *db, xd_txn *txn, const void *prefix, size_t plen, void **key, size_t *klen,
               void **val, size_t *vlen);

/*
 * Heap tables: records in no key order, each named by the id the store gives
 * it when it is added (never 0; the id of a deleted record may be given to a
 * later one).  Cheaper to write than a B-tree record, for bodies that B-tree
 * records point to.  Account removal does not purge them (they have no user
 * keys): the module that writes them deletes them.  xd_db_* calls refuse a
 * heap table and xd_heap_* calls a B-tree.
 */
xd_db *xd_heap_open(const char *name);
int xd_heap_add(xd_db *h, xd_txn *txn, const void *val, size_t vlen, uint64_t *id);
int xd_heap_get(xd_db *h, xd_txn *txn, uint64_t id, void **val, size_t *vlen);
int xd_heap_del(xd_db *h, xd_txn *txn, uint64_t id);
/* Visit up to max records after *pos (from the first when *pos == 0), each
 * outside any transaction and cursor (fn may write), setting *pos to the one
 * visited; call again with *pos to go on.  Returns 0 (more may follow),
 * XD_NOTFOUND (the end was reached), fn's non-zero return, or -1. */
typedef int (*xd_heap_visit_fn)(uint64_t id, const void *val, size_t vlen, void *data);
int xd_heap_scan(xd_db *h, uint64_t *pos, size_t max, xd_heap_visit_fn fn, void *data);

/*
 * Keys.  A user's records are keyed with the bare JID and a NUL first, so a
 * prefix scan finds them and account removal purges them.  Returns the
 * prefix length (with the NUL), 0 if it does not fit in buf.
 */
size_t xd_db_user_prefix(const xd_jid *bare, char *buf, size_t len);
/* Big-endian unsigned integers of n bytes, which sort in numeric order. */
void xd_db_put_be(unsigned char *p, unsigned long long v, int n);
unsigned long long xd_db_get_be(const unsigned char *p, int n);

#ifdef __cplusplus
}
#endif
#endif
