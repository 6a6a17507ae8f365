/*
 * String-keyed hash table: chaining, power-of-two buckets, doubled at load 1.
 * Keys often come from the network (JIDs, list items a remote service
 * publishes), so the hash is SipHash-1-3 with a key drawn at start-up: no
 * one can choose keys that all land in one chain.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

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

static uint64_t sip_k0, sip_k1;
static int sip_keyed;

static void
sip_key(void)
{
    uint64_t k[2];
    if (getrandom(k, sizeof(k), 0) != (ssize_t)sizeof(k)) {
        /* no entropy yet (early boot): still different per process */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        k[0] = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15u ^ (uint64_t)getpid();
        k[1] = (uint64_t)ts.tv_sec * 0xbf58476d1ce4e5b9u ^ (uint64_t)(uintptr_t)&ts;
    }
    sip_k0 = k[0];
    sip_k1 = k[1];
    sip_keyed = 1;
}

#define ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                   \
    do {                                                                                           \
        v0 += v1, v1 = ROTL(v1, 13), v1 ^= v0, v0 = ROTL(v0, 32);                                  \
        v2 += v3, v3 = ROTL(v3, 16), v3 ^= v2;                                                     \
        v0 += v3, v3 = ROTL(v3, 21), v3 ^= v0;                                                     \
        v2 += v1, v1 = ROTL(v1, 17), v1 ^= v2, v2 = ROTL(v2, 32);                                  \
    } while (0)

/* SipHash-1-3 of len bytes with the process's key. */
uint64_t
xd_hash(const void *data, size_t len)
{
    const unsigned char *s = data;
    size_t i;
    if (!sip_keyed)
        sip_key();
    uint64_t v0 = sip_k0 ^ 0x736f6d6570736575u, v1 = sip_k1 ^ 0x646f72616e646f6du;
    uint64_t v2 = sip_k0 ^ 0x6c7967656e657261u, v3 = sip_k1 ^ 0x7465646279746573u, m;

    for (i = 0; i + 8 <= len; i += 8) {
        memcpy(&m, s + i, 8); /* little-endian hosts; the value only feeds a hash */
        v3 ^= m;
        SIPROUND;
        v0 ^= m;
    }
    m = (uint64_t)len << 56;
    for (size_t j = 0; i + j < len; j++)
        m |= (uint64_t)s[i + j] << (8 * j);
    v3 ^= m;
    SIPROUND;
    v0 ^= m;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static uint32_t
siphash(const char *s)
{
    return (uint32_t)xd_hash(s, strlen(s));
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
    uint32_t hash = siphash(key);
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
    entry **p = find(h, key, siphash(key));
    return *p ? (*p)->val : NULL;
}

void *
xd_hashtab_del(xd_hashtab *h, const char *key)
{
    entry **p = find(h, key, siphash(key));
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
