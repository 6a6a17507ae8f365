/* A string-keyed hash table with chaining; keys are borrowed from the caller,
 * who keeps them alive while the entry exists. */
#ifndef XD_CORE_HASHTAB_H
#define XD_CORE_HASHTAB_H

#include <stddef.h>

typedef struct xd_hashtab xd_hashtab;

xd_hashtab *xd_hashtab_new(size_t initial);
void xd_hashtab_free(xd_hashtab *h);
/* Insert or replace. 0 ok, -1 out of memory. */
int xd_hashtab_put(xd_hashtab *h, const char *key, void *val);
void *xd_hashtab_get(const xd_hashtab *h, const char *key);
/* Remove; returns the value that was there, or NULL. */
void *xd_hashtab_del(xd_hashtab *h, const char *key);
size_t xd_hashtab_count(const xd_hashtab *h);
/* Visit every entry; fn returns non-zero to stop. */
void xd_hashtab_foreach(const xd_hashtab *h, int (*fn)(const char *key, void *val, void *data),
                        void *data);

#endif
