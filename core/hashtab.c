/* String-keyed hash table: FNV-1a, power-of-two buckets, doubled at load 1. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hashtab.h"

typedef struct entry {
    const char *key;
    void *val;
    uint32_t hash;
    struct entry *next;
} entry;

struct xd_hashtab {
    entry **b;
    size_t nb; /* power of two */
    size_t n;
};

static uint32_t
fnv1a(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

xd_hashtab *
xd_hashtab_new(size_t initial)
{
    xd_hashtab *h = calloc(1, sizeof(*h));
    size_t nb = 16;
    if (!h)
        return NULL;
    while (nb < initial)
        nb <<= 1;
    h->b = calloc(nb, sizeof(*h->b));
    if (!h->b) {
        free(h);
        return NULL;
    }
    h->nb = nb;
    return h;
}

void
xd_hashtab_free(xd_hashtab *h)
{
    if (!h)
        return;
    for (size_t i = 0; i < h->nb; i++) {
        entry *e = h->b[i];
        while (e) {
            entry *next = e->next;
            free(e);
            e = next;
        }
    }
    free(h->b);
    free(h);
}

static void
grow(xd_hashtab *h)
{
    size_t nb = h->nb << 1;
    entry **b = calloc(nb, sizeof(*b));
    if (!b)
        return; /* keep working with longer chains */
    for (size_t i = 0; i < h->nb; i++) {
        entry *e = h->b[i];
        while (e) {
            entry *next = e->next;
            e->next = b[e->hash & (nb - 1)];
            b[e->hash & (nb - 1)] = e;
            e = next;
        }
    }
    free(h->b);
    h->b = b;
    h->nb = nb;
}

static entry **
find(const xd_hashtab *h, const char *key, uint32_t hash)
{
    entry **p = &h->b[hash & (h->nb - 1)];
    for (; *p; p = &(*p)->next)
        if ((*p)->hash == hash && strcmp((*p)->key, key) == 0)
            return p;
    return p;
}

int
xd_hashtab_put(xd_hashtab *h, const char *key, void *val)
{
    uint32_t hash = fnv1a(key);
    entry **p = find(h, key, hash);
    if (*p) {
        (*p)->key = key;
        (*p)->val = val;
        return 0;
    }
    entry *e = malloc(sizeof(*e));
    if (!e)
        return -1;
    e->key = key;
    e->val = val;
    e->hash = hash;
    e->next = NULL;
    *p = e;
    if (++h->n > h->nb)
        grow(h);
    return 0;
}

void *
xd_hashtab_get(const xd_hashtab *h, const char *key)
{
    entry **p = find(h, key, fnv1a(key));
    return *p ? (*p)->val : NULL;
}

void *
xd_hashtab_del(xd_hashtab *h, const char *key)
{
    entry **p = find(h, key, fnv1a(key));
    entry *e = *p;
    void *val;
    if (!e)
        return NULL;
    val = e->val;
    *p = e->next;
    free(e);
    h->n--;
    return val;
}

size_t
xd_hashtab_count(const xd_hashtab *h)
{
    return h->n;
}

void
xd_hashtab_foreach(const xd_hashtab *h, int (*fn)(const char *, void *, void *), void *data)
{
    for (size_t i = 0; i < h->nb; i++)
        for (entry *e = h->b[i], *next; e; e = next) {
            next = e->next;
            if (fn(e->key, e->val, data))
                return;
        }
}
