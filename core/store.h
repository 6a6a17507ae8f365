/* Core side of storage and accounts: opening the environment, account admin. */
#ifndef XD_CORE_STORE_H
#define XD_CORE_STORE_H

#include <ev.h>

#include <xmppd/module.h>
#include <xmppd/scram.h>
#include <xmppd/storage.h>

/* Open (create, run recovery on) the environment in dir, which only one
 * process may have open at a time: 0 ok, XD_BUSY if another has it, -1
 * (both logged, XD_BUSY not after xd_store_quiet_busy(1)). */
#define XD_BUSY (-2)
int xd_store_open(const char *dir);
void xd_store_quiet_busy(int quiet);
/* Checkpoint and close every table and the environment. Safe to call twice. */
void xd_store_close(void);
/* Group commit from here on (see storage.c); on_failure runs on the loop if
 * the log can no longer be flushed.  0 ok, -1 (logged). */
typedef void (*xd_store_fail_fn)(void);
int xd_store_start_flusher(struct ev_loop *loop, xd_store_fail_fn on_failure);
/* Flush the log now, on the caller's thread, and run every waiter (shutdown). */
void xd_store_flush(void);
/* Log flushes done by the flusher so far (statistics). */
unsigned long xd_store_flush_count(void);
/* Bytes written to the log since the store opened (statistics). */
unsigned long long xd_store_log_bytes(void);
/* Delete every record keyed with prefix, in every table (account removal). */
int xd_store_purge_prefix(xd_txn *txn, const void *prefix, size_t plen);

/*
 * Accounts live in the table "accounts": key = bare JID string, value = a
 * small versioned binary record with the SCRAM-SHA-1 and SCRAM-SHA-256
 * iterations, salts, StoredKey and ServerKey.  Never the password.
 */
/* xd_account_create/set_password/delete are public: include/xmppd/module.h */
/* Call fn for each account (bare JID string) of domain (NULL: all). */
int xd_account_foreach(const char *domain, int (*fn)(const char *jid, void *data), void *data);

#endif
