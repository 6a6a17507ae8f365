/*
 * Private test hook for core/scram.c.  Not part of the public API: only unit
 * tests include this, to reproduce the RFC 5802 / RFC 7677 example exchanges
 * byte for byte, which needs a known server nonce instead of a random one.
 */
#ifndef XD_CORE_SCRAM_TEST_H
#define XD_CORE_SCRAM_TEST_H

#include <xmppd/scram.h>

/* Use snonce as the server nonce part.  Must be called before
 * xd_scram_server_first(); ignored otherwise, or if snonce is not a valid
 * SCRAM nonce (non-empty printable ASCII without ','). */
void xd_scram_server_set_nonce(xd_scram_server *s, const char *snonce);

#endif
