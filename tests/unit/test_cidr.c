/* xd_cidr_parse(): addresses and ranges, IPv4 in IPv6 form, host bits
 * cleared, and what is refused. */
#include <arpa/inet.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include <xmppd/module.h>

static void
expect(const char *in, const char *want6, int want_prefix)
{
    unsigned char a[16], w[16];
    int prefix = -7;
    assert_int_equal(xd_cidr_parse(in, a, &prefix), 0);
    assert_int_equal(inet_pton(AF_INET6, want6, w), 1);
    assert_memory_equal(a, w, 16);
    assert_int_equal(prefix, want_prefix);
}

static void
test_accepted(void **state)
{
    (void)state;
    expect("192.0.2.7", "::ffff:192.0.2.7", 128);
    expect("192.0.2.7/24", "::ffff:192.0.2.0", 120);
    expect("10.1.2.3/8", "::ffff:10.0.0.0", 104);
    expect("0.0.0.0/0", "::ffff:0.0.0.0", 96);
    expect("2001:db8::1", "2001:db8::1", 128);
    expect("2001:db8:ffff::1/32", "2001:db8::", 32);
    expect("::/0", "::", 0);
    expect("::ffff:192.0.2.9/120", "::ffff:192.0.2.0", 120);
}

static void
test_refused(void **state)
{
    static const char *bad[] = {"",          "/8",        "192.0.2.1/", "192.0.2.1/33",
                                "::1/129",   "1.2.3.4/-1", "1.2.3.4/+8", "1.2.3.4/ 8",
                                "1.2.3.4/0008", "example.org", "1.2.3", "2001:db8::g"};
    unsigned char a[16];
    int prefix;
    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(xd_cidr_parse(bad[i], a, &prefix), -1);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accepted),
        cmocka_unit_test(test_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
