/*
 * libFuzzer harness for core/jid.c: xd_jid_parse() on the input as a C
 * string; an accepted JID, formatted and parsed again, must give the same
 * JID (preparation is idempotent, RFC 8264 7), and its bare form too.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xmppd/jid.h>

static void hexdump(const char *what, const char *s)
{
    fprintf(stderr, "%s: \"", what);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\')
            fputc(c, stderr);
        else
            fprintf(stderr, "\\x%02x", c);
    }
    fprintf(stderr, "\"\n");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static xd_jid a, b; /* 3 KiB each: keep them off the stack */
    static char buf[XD_JID_STR_MAX], buf2[XD_JID_STR_MAX];
    char *s = malloc(size + 1);
    if (!s)
        return 0;
    memcpy(s, data, size);
    s[size] = '\0';

    if (xd_jid_parse(&a, s) == 0) {
        int n = xd_jid_format(&a, 1, buf, sizeof buf);
        if (n < 0 || (size_t)n != strlen(buf)) {
            hexdump("input", s);
            fprintf(stderr, "xd_jid_format failed on a parsed JID\n");
            abort();
        }
        if (a.domain[0] == '\0') {
            hexdump("input", s);
            fprintf(stderr, "parsed JID without a domainpart\n");
            abort();
        }
        if (xd_jid_parse(&b, buf) != 0) {
            hexdump("input", s);
            hexdump("formatted", buf);
            fprintf(stderr, "the formatted JID does not parse again\n");
            abort();
        }
        if (!xd_jid_equal(&a, &b, 1)) {
            hexdump("input", s);
            hexdump("formatted", buf);
            hexdump("local 1", a.local);
            hexdump("local 2", b.local);
            hexdump("domain 1", a.domain);
            hexdump("domain 2", b.domain);
            hexdump("resource 1", a.resource);
            hexdump("resource 2", b.resource);
            fprintf(stderr, "re-parsing the formatted JID changed it\n");
            abort();
        }
        /* the bare JID round-trips too */
        n = xd_jid_format(&a, 0, buf2, sizeof buf2);
        if (n < 0 || xd_jid_parse(&b, buf2) != 0 || !xd_jid_equal(&a, &b, 0) || b.resource[0]) {
            hexdump("input", s);
            hexdump("bare", buf2);
            fprintf(stderr, "the bare JID does not round-trip\n");
            abort();
        }
        /* each prepared part is a fixed point of its own preparation */
        char part[XD_JID_PART_MAX + 1];
        if ((a.local[0] && (xd_jid_prep_local(part, sizeof part, a.local) != 0 ||
                            strcmp(part, a.local) != 0)) ||
            xd_jid_prep_domain(part, sizeof part, a.domain) != 0 || strcmp(part, a.domain) != 0 ||
            (a.resource[0] && (xd_jid_prep_resource(part, sizeof part, a.resource) != 0 ||
                               strcmp(part, a.resource) != 0))) {
            hexdump("input", s);
            fprintf(stderr, "a prepared part is not stable under xd_jid_prep_*\n");
            abort();
        }
    }
    free(s);
    return 0;
}
