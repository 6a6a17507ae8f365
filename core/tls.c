/*
 * TLS credentials: one GnuTLS credentials object holding the certificate
 * and key of every host.  GnuTLS picks the pair matching the client's SNI.
 * SIGHUP loads a fresh set; streams keep a reference to the set they
 * started with, so renewed certificates apply to new connections only.
 */
#include <stdlib.h>

#include "server.h"

xd_tls_creds *
xd_tls_creds_load(void)
{
    xd_tls_creds *c = calloc(1, sizeof(*c));
    int r;

    if (!c)
        return NULL;
    if ((r = gnutls_certificate_allocate_credentials(&c->cred)) < 0) {
        xd_error("tls: %s", gnutls_strerror(r));
        free(c);
        return NULL;
    }
    for (int i = 0; i < xd_srv.conf.nhosts; i++) {
        const xd_host *h = &xd_srv.conf.hosts[i];
        r = gnutls_certificate_set_x509_key_file2(c->cred, h->cert, h->key, GNUTLS_X509_FMT_PEM,
                                                  NULL, 0);
        if (r < 0) {
            xd_error("%s:%d: host '%s': cannot load certificate %s / key %s: %s",
                     xd_srv.conf.path, h->line, h->domain, h->cert, h->key, gnutls_strerror(r));
            gnutls_certificate_free_credentials(c->cred);
            free(c);
            return NULL;
        }
    }
    c->refs = 1;
    return c;
}

void
xd_tls_creds_release(xd_tls_creds *c)
{
    if (c && --c->refs == 0) {
        gnutls_certificate_free_credentials(c->cred);
        free(c);
    }
}

int
xd_tls_init(void)
{
    const char *err = NULL;
    int r = gnutls_priority_init(&xd_srv.priority, xd_srv.conf.tls_priority, &err);
    if (r < 0) {
        xd_error("%s: tls_priority is invalid near '%s': %s", xd_srv.conf.path, err ? err : "?",
                 gnutls_strerror(r));
        return -1;
    }
    xd_srv.creds = xd_tls_creds_load();
    return xd_srv.creds ? 0 : -1;
}

void
xd_tls_reload(void)
{
    xd_tls_creds *c = xd_tls_creds_load();
    if (!c) {
        xd_warn("tls: reload failed; keeping the certificates in use");
        return;
    }
    xd_tls_creds_release(xd_srv.creds);
    xd_srv.creds = c;
    xd_info("tls: certificates reloaded for %d host(s)", xd_srv.conf.nhosts);
}
