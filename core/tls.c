/*
 * TLS credentials: one GnuTLS credentials object holding the certificate
 * and key of every host for the server side (GnuTLS picks the pair matching
 * the client's SNI), and one per host for outgoing server-to-server streams,
 * where we present our own certificate for SASL EXTERNAL.  SIGHUP loads a
 * fresh set; streams keep a reference to the set they started with, so
 * renewed certificates apply to new connections only.
 */
#include <stdlib.h>
#include <string.h>

#include "server.h"

static int
add_trust(gnutls_certificate_credentials_t cred)
{
    int r;
    if (!xd_srv.trust)
        return 0;
    r = xd_srv.ca_file ? gnutls_certificate_set_x509_trust_file(cred, xd_srv.ca_file,
                                                                 GNUTLS_X509_FMT_PEM)
                       : gnutls_certificate_set_x509_system_trust(cred);
    if (r < 0) {
        xd_error("tls: cannot load the trust store %s: %s",
                 xd_srv.ca_file ? xd_srv.ca_file : "(system)", gnutls_strerror(r));
        return -1;
    }
    if (r == 0)
        xd_warn("tls: the trust store %s holds no certificate",
                xd_srv.ca_file ? xd_srv.ca_file : "(system)");
    return 0;
}

static int
load_pair(gnutls_certificate_credentials_t cred, const xd_host *h)
{
    int r = gnutls_certificate_set_x509_key_file2(cred, h->cert, h->key, GNUTLS_X509_FMT_PEM, NULL,
                                                  0);
    if (r < 0) {
        xd_error("%s:%d: host '%s': cannot load certificate %s / key %s: %s", xd_srv.conf.path,
                 h->line, h->domain, h->cert, h->key, gnutls_strerror(r));
        return -1;
    }
    return 0;
}

static void
creds_free(xd_tls_creds *c)
{
    if (c->cred)
        gnutls_certificate_free_credentials(c->cred);
    for (int i = 0; i < c->nclient; i++)
        if (c->client[i])
            gnutls_certificate_free_credentials(c->client[i]);
    free(c->client);
    free(c);
}

xd_tls_creds *
xd_tls_creds_load(void)
{
    xd_tls_creds *c = calloc(1, sizeof(*c));
    int n = xd_srv.conf.nhosts;

    if (!c || !(c->client = calloc((size_t)n, sizeof(*c->client)))) {
        free(c);
        return NULL;
    }
    c->nclient = n;
    if (gnutls_certificate_allocate_credentials(&c->cred) < 0 || add_trust(c->cred) != 0)
        goto fail;
    for (int i = 0; i < n; i++) {
        const xd_host *h = &xd_srv.conf.hosts[i];
        if (load_pair(c->cred, h) != 0 ||
            gnutls_certificate_allocate_credentials(&c->client[i]) < 0 ||
            add_trust(c->client[i]) != 0 || load_pair(c->client[i], h) != 0)
            goto fail;
    }
    c->refs = 1;
    return c;
fail:
    creds_free(c);
    return NULL;
}

void
xd_tls_creds_release(xd_tls_creds *c)
{
    if (c && --c->refs == 0)
        creds_free(c);
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

int
xd_tls_set_trust(const char *ca_file)
{
    xd_tls_creds *c;
    free(xd_srv.ca_file);
    xd_srv.ca_file = ca_file ? strdup(ca_file) : NULL;
    xd_srv.trust = 1;
    if (ca_file && !xd_srv.ca_file)
        return -1;
    /* Rebuild the credentials now, so the trust applies to the first stream. */
    if (!(c = xd_tls_creds_load()))
        return -1;
    xd_tls_creds_release(xd_srv.creds);
    xd_srv.creds = c;
    return 0;
}

int
xd_tls_host_index(const char *domain)
{
    for (int i = 0; i < xd_srv.conf.nhosts; i++)
        if (strcmp(xd_srv.conf.hosts[i].domain, domain) == 0)
            return i;
    return -1;
}
