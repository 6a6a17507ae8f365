/*
 * A string-keyed hash table (chaining, keyed SipHash, so keys that come
 * from the network cannot be chosen to collide).  Keys are borrowed: the
 * caller keeps each key alive while its entry exists (store it in the value).
 */
#ifndef XMPPD_HASHTAB_H
#define XMPPD_HASHTAB_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct xd_hashtab xd_hashtab;

/* Keyed SipHash-1-3 of any bytes (the key is drawn once per process): for
 * modules with tables of their own whose keys come from the network. */
uint64_t xd_hash(const void *data, size_t len);

xd_hashtab *xd_hashtab_new(size_t initial);
void xd_hashtab_free(xd_hashtab *h); /* the values are the caller's to free */
/* Insert or replace. 0 ok, -1 out of memory. */
int xd_hashtab_put(xd_hashtab *h, const char *key, void *val);
void *xd_hashtab_get(const xd_hashtab *h, const char *key);
/* Remove; returns the value that was there, or NULL. */
void *xd_hashtab_del(xd_hashtab *h, const char *key);
size_t xd_hashtab_count(const xd_hashtab *h);
/* Visit every entry; fn returns non-zero to stop.  fn may delete the entry
 * it is given, no other. */
void xd_hashtab_foreach(const xd_hashtab *h, int (*fn)(const char *key, void *val, void *data),
                        void *data);

#ifdef __cplusplus
}
#endif
#endif
