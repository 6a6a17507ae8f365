/* xmppctl: account administration on the server's storage. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server.h"
#include "store.h"

static void
usage(FILE *f)
{
    fprintf(f, "usage: xmppctl --config FILE adduser JID [--password P]\n"
               "       xmppctl --config FILE passwd JID [--password P]\n"
               "       xmppctl --config FILE deluser JID\n"
               "       xmppctl --config FILE list [DOMAIN]\n"
               "Without --password, the password is read from the first line of stdin.\n");
}

static int
fail(const char *fmt, const char *arg)
{
    fprintf(stderr, "xmppctl: ");
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    return 1;
}

/* A local account JID: localpart@served-host, no resource. */
static int
account_jid(xd_jid *j, const char *s)
{
    if (xd_jid_parse(j, s) != 0)
        return fail("'%s' is not a valid JID", s);
    if (!j->local[0] || j->resource[0])
        return fail("'%s' must be a bare JID: user@host", s);
    if (!xd_config_host(j->domain))
        return fail("'%s' is not a host this server serves", j->domain);
    return 0;
}

static char *
read_password(const char *given)
{
    char buf[1100];
    size_t n;
    if (given)
        return strdup(given);
    if (!fgets(buf, sizeof(buf), stdin))
        return NULL;
    n = strcspn(buf, "\r\n");
    buf[n] = '\0';
    return strdup(buf);
}

static int
print_jid(const char *jid, void *data)
{
    (void)data;
    puts(jid);
    return 0;
}

static int
run(const char *cmd, const char *arg, const char *password)
{
    xd_jid j;
    char *pw = NULL;
    int r;

    if (!strcmp(cmd, "list")) {
        char dom[XD_JID_PART_MAX + 1];
        if (arg && (xd_jid_prep_domain(dom, sizeof(dom), arg) != 0 || !xd_config_host(dom)))
            return fail("'%s' is not a host this server serves", arg);
        return xd_account_foreach(arg ? dom : NULL, print_jid, NULL) < 0 ? 1 : 0;
    }
    if (!arg) {
        usage(stderr);
        return 1;
    }
    if (account_jid(&j, arg))
        return 1;
    if (!strcmp(cmd, "deluser")) {
        r = xd_account_delete(&j);
        if (r == XD_NOTFOUND)
            return fail("no such user: %s", arg);
        return r == 0 ? 0 : fail("could not delete %s", arg);
    }
    if (strcmp(cmd, "adduser") && strcmp(cmd, "passwd")) {
        usage(stderr);
        return 1;
    }
    if (!(pw = read_password(password)) || !*pw) {
        free(pw);
        return fail("%s", "an empty password is not accepted");
    }
    if (!strcmp(cmd, "adduser")) {
        r = xd_account_create(&j, pw);
        if (r == -2)
            fail("user exists: %s", arg);
        else if (r != 0)
            fail("could not create %s", arg);
    } else {
        r = xd_account_set_password(&j, pw);
        if (r == XD_NOTFOUND)
            fail("no such user: %s", arg);
        else if (r != 0)
            fail("could not change the password of %s", arg);
    }
    explicit_bzero(pw, strlen(pw));
    free(pw);
    return r == 0 ? 0 : 1;
}

int
main(int argc, char **argv)
{
    const char *path = NULL, *cmd = NULL, *arg = NULL, *password = NULL;
    int r;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config") && i + 1 < argc)
            path = argv[++i];
        else if (!strcmp(argv[i], "--password") && i + 1 < argc)
            password = argv[++i];
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else if (!cmd)
            cmd = argv[i];
        else if (!arg)
            arg = argv[i];
        else {
            usage(stderr);
            return 1;
        }
    }
    if (!path || !cmd) {
        usage(stderr);
        return 1;
    }
    if (xd_config_load(&xd_srv.conf, path) != 0)
        return 1;
    xd_log_setup(XD_LOG_WARN, 0);
    if (xd_store_open(xd_srv.conf.data_dir) != 0) {
        fail("cannot open the storage in %s", xd_srv.conf.data_dir);
        xd_config_free(&xd_srv.conf);
        return 1;
    }
    r = run(cmd, arg, password);
    xd_store_close();
    xd_config_free(&xd_srv.conf);
    return r;
}
