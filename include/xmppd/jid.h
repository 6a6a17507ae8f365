/*
 * JIDs prepared per RFC 7622: the domainpart with IDNA2008/UTS#46 (libidn2),
 * the localpart with the PRECIS UsernameCaseMapped profile and the
 * resourcepart with the OpaqueString profile (RFC 8264/8265).
 */
#ifndef XMPPD_JID_H
#define XMPPD_JID_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define XD_JID_PART_MAX 1023 /* bytes per part, RFC 7622 3.1 */

typedef struct xd_jid {
    char local[XD_JID_PART_MAX + 1];    /* "" when absent */
    char domain[XD_JID_PART_MAX + 1];
    char resource[XD_JID_PART_MAX + 1]; /* "" when absent */
} xd_jid;

/* Parse and prepare a JID string. 0 ok, -1 invalid (j is then unspecified). */
int xd_jid_parse(xd_jid *j, const char *s);
/* Prepare each part on its own (NULL or "" for an absent part). 0 ok, -1 invalid. */
int xd_jid_prep_local(char *out, size_t outlen, const char *in);
int xd_jid_prep_domain(char *out, size_t outlen, const char *in);
int xd_jid_prep_resource(char *out, size_t outlen, const char *in);
/* Format as a string; with full == 0 the resource is left out.
 * Returns the length written (without NUL), or -1 if buf is too small. */
int xd_jid_format(const xd_jid *j, int full, char *buf, size_t len);
/* Make j its own bare JID (drop the resource). */
void xd_jid_to_bare(xd_jid *j);
/* 1 if equal (full comparison), 0 otherwise; prepared JIDs compare bytewise. */
int xd_jid_equal(const xd_jid *a, const xd_jid *b, int full);

/* Longest formatted JID: local@domain/resource plus NUL. */
#define XD_JID_STR_MAX (3 * XD_JID_PART_MAX + 3)

#ifdef __cplusplus
}
#endif
#endif
