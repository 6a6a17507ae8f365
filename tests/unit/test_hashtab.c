/* The string-keyed hash table: insert, replace, lookup, delete, growth,
 * deleting while visiting, and keys that differ only past 8 bytes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <xmppd/hashtab.h>

#define N 20000

static char keys[N][48];

static void
test_put_get_del(void **state)
{
    (void)state;
    xd_hashtab *h = xd_hashtab_new(4);
    assert_non_null(h);
    for (int i = 0; i < N; i++) {
        /* long common prefixes: only the tail tells them apart */
        snprintf(keys[i], sizeof(keys[i]), "user-with-a-long-name-%d@example.org", i);
        assert_int_equal(xd_hashtab_put(h, keys[i], &keys[i]), 0);
    }
    assert_int_equal(xd_hashtab_count(h), N);
    for (int i = 0; i < N; i++)
        assert_ptr_equal(xd_hashtab_get(h, keys[i]), &keys[i]);
    assert_null(xd_hashtab_get(h, "user-with-a-long-name-20000@example.org"));
    assert_null(xd_hashtab_get(h, ""));
    /* replace keeps the count */
    assert_int_equal(xd_hashtab_put(h, keys[7], keys[8]), 0);
    assert_ptr_equal(xd_hashtab_get(h, keys[7]), keys[8]);
    assert_int_equal(xd_hashtab_count(h), N);
    for (int i = 0; i < N; i += 2)
        assert_ptr_equal(xd_hashtab_del(h, keys[i]), i == 8 ? (void *)&keys[8] : (void *)&keys[i]);
    assert_null(xd_hashtab_del(h, keys[0]));
    assert_int_equal(xd_hashtab_count(h), N / 2);
    for (int i = 0; i < N; i++)
        assert_true((xd_hashtab_get(h, keys[i]) != NULL) == (i % 2 == 1));
    xd_hashtab_free(h);
}

typedef struct visit {
    int seen;
    xd_hashtab *h;
} visit;

static int
del_visited(const char *key, void *val, void *data)
{
    visit *v = data;
    (void)val;
    v->seen++;
    xd_hashtab_del(v->h, key); /* the one entry fn may delete */
    return 0;
}

static void
test_delete_while_visiting(void **state)
{
    (void)state;
    visit ctx = {0, xd_hashtab_new(16)};
    for (int i = 0; i < 1000; i++) {
        snprintf(keys[i], sizeof(keys[i]), "k%d", i);
        xd_hashtab_put(ctx.h, keys[i], keys[i]);
    }
    xd_hashtab_foreach(ctx.h, del_visited, &ctx);
    assert_int_equal(ctx.seen, 1000);
    assert_int_equal(xd_hashtab_count(ctx.h), 0);
    xd_hashtab_free(ctx.h);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_put_get_del),
        cmocka_unit_test(test_delete_while_visiting),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
