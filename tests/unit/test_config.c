/*
 * Unit tests for core/config.c and the module loading in core/module.c:
 * a good configuration and its values, and every kind of mistake, each of
 * which must be refused with a `file:line: message` on stderr naming the
 * right line.  Config files live in a mkdtemp() directory removed after
 * each test; the global xd_srv is torn down and zeroed between tests.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xmppd/jid.h>
#include <xmppd/log.h>
#include <xmppd/module.h>
#include <xmppd/scram.h>

#include "server.h"

#ifndef TEST_MODULE_DIR
#error "TEST_MODULE_DIR must name the directory of the built modules"
#endif

/* The modules call into the server; make sure every object file they need
 * is linked into this test binary (it links the core as a static library). */
void xd_stream_set_max_stanza_size(xd_stream_type type, size_t bytes);
void *volatile xd_test_keep[] = {
    (void *)xd_session_send,    (void *)xd_stream_set_max_stanza_size,
    (void *)xd_account_check_password, (void *)xd_scram_server_new,
    (void *)xd_jid_parse,       (void *)xd_log,
    (void *)xd_route,
};

/* ---- fixture ------------------------------------------------------------------------ */

typedef struct fx {
    char dir[64];
    char path[128];   /* the config file */
    char errpath[128];
    char *text;       /* the config written last */
    char *err;        /* stderr captured by the last call */
    int saved_fd;
    int loaded_modules;
} fx;

static int rm_entry(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    (void)st, (void)type, (void)ftw;
    return remove(path);
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof(*f));
    if (!f)
        return -1;
    strcpy(f->dir, "/tmp/xd_test_config_XXXXXX");
    if (!mkdtemp(f->dir))
        return -1;
    snprintf(f->path, sizeof(f->path), "%s/xmppd.cfg", f->dir);
    snprintf(f->errpath, sizeof(f->errpath), "%s/stderr.txt", f->dir);
    f->saved_fd = -1;
    memset(&xd_srv, 0, sizeof(xd_srv));
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    if (f->saved_fd >= 0) { /* a failed assertion inside a capture */
        fflush(stderr);
        dup2(f->saved_fd, STDERR_FILENO);
        close(f->saved_fd);
    }
    xd_modules_unload();
    if (f->loaded_modules)
        xd_router_free();
    if (xd_srv.ctx)
        xmpp_ctx_free(xd_srv.ctx);
    xd_config_free(&xd_srv.conf);
    memset(&xd_srv, 0, sizeof(xd_srv));
    nftw(f->dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
    free(f->text);
    free(f->err);
    free(f);
    return 0;
}

static void capture_start(fx *f)
{
    int fd;
    fflush(stderr);
    f->saved_fd = dup(STDERR_FILENO);
    assert_true(f->saved_fd >= 0);
    fd = open(f->errpath, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    assert_true(dup2(fd, STDERR_FILENO) >= 0);
    close(fd);
}

static void capture_end(fx *f)
{
    FILE *fp;
    long n;
    fflush(stderr);
    assert_true(dup2(f->saved_fd, STDERR_FILENO) >= 0);
    close(f->saved_fd);
    f->saved_fd = -1;
    free(f->err);
    fp = fopen(f->errpath, "r");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    n = ftell(fp);
    rewind(fp);
    f->err = calloc(1, (size_t)n + 1);
    assert_non_null(f->err);
    assert_int_equal(fread(f->err, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
}

/* Write the config file: `text` with @DIR@ and @MODDIR@ replaced. */
static void write_cfg(fx *f, const char *text)
{
    FILE *fp = fopen(f->path, "w");
    assert_non_null(fp);
    free(f->text);
    f->text = strdup(text);
    assert_non_null(f->text);
    for (const char *p = text; *p;) {
        if (strncmp(p, "@DIR@", 5) == 0) {
            fputs(f->dir, fp);
            p += 5;
        } else if (strncmp(p, "@MODDIR@", 8) == 0) {
            fputs(TEST_MODULE_DIR, fp);
            p += 8;
        } else {
            fputc(*p++, fp);
        }
    }
    assert_int_equal(fclose(fp), 0);
}

/* 1-based line of the first line of the config containing `needle`. */
static int line_of(const fx *f, const char *needle)
{
    const char *hit = strstr(f->text, needle);
    int line = 1;
    if (!hit)
        fail_msg("test bug: '%s' is not in the config", needle);
    for (const char *p = f->text; p < hit; p++)
        if (*p == '\n')
            line++;
    return line;
}

static int load(fx *f, const char *text)
{
    int r;
    write_cfg(f, text);
    capture_start(f);
    r = xd_config_load(&xd_srv.conf, f->path);
    capture_end(f);
    return r;
}

static int load_modules(fx *f)
{
    int r;
    xd_srv.ctx = xmpp_ctx_new(NULL, NULL);
    assert_non_null(xd_srv.ctx);
    assert_int_equal(xd_router_init(), 0);
    f->loaded_modules = 1;
    capture_start(f);
    r = xd_modules_load();
    capture_end(f);
    return r;
}

/* stderr holds "<path>:<line>: " followed (on the same line) by `msg`. */
static void expect_err(const fx *f, int line, const char *msg)
{
    char prefix[256];
    const char *p;
    snprintf(prefix, sizeof(prefix), "%s:%d: ", f->path, line);
    p = strstr(f->err, prefix);
    if (!p)
        fail_msg("expected \"%s%s\" on stderr, got: \"%s\"", prefix, msg, f->err);
    {
        const char *eol = strchr(p, '\n');
        const char *m = strstr(p, msg);
        if (!m || (eol && m > eol))
            fail_msg("expected \"%s%s\" on stderr, got: \"%s\"", prefix, msg, f->err);
    }
}

#define GOOD_HEAD                                                                       \
    "# xmppd test configuration\n"                                                   \
    "log_level = \"debug\";\n"                                                         \
    "log_syslog = false;\n"                                                            \
    "data_dir = \"@DIR@/data\";\n"                                                     \
    "module_dir = \"@MODDIR@\";\n"

#define GOOD_HOSTS                                                                      \
    "hosts = (\n"                                                                      \
    "  { domain = \"Example.COM\"; cert = \"@DIR@/a.crt\"; key = \"@DIR@/a.key\"; },\n" \
    "  { domain = \"second.example\"; cert = \"@DIR@/b.crt\"; key = \"@DIR@/b.key\"; }\n" \
    ");\n"

#define GOOD_LISTENERS                                                                   \
    "listeners = (\n"                                                                    \
    "  { stream = \"c2s\"; address = \"127.0.0.1\"; port = 5222; },\n"                   \
    "  { stream = \"c2s\"; address = \"::1\"; port = 5223; tls = \"direct\"; },\n"       \
    "  { stream = \"s2s\"; address = \"0.0.0.0\"; port = 5269; tls = \"starttls\"; }\n" \
    ");\n"

/* A config with hosts, listeners, modules and `tail` appended. */
#define BASE GOOD_HEAD GOOD_HOSTS GOOD_LISTENERS

/* ---- a good configuration ------------------------------------------------------------ */

static void test_good_config(void **state)
{
    fx *f = *state;
    xd_config *c = &xd_srv.conf;
    char want[128];

    assert_int_equal(load(f, BASE "modules = ( \"c2s\" );\n"
                                  "c2s = {\n"
                                  "  max_stanza_size = 65536;\n"
                                  "  auth_max_attempts = 5;\n"
                                  "  version = true;\n"
                                  "};\n"),
                     0);
    assert_string_equal(f->err, "");
    assert_string_equal(c->path, f->path);
    assert_int_equal(c->log_level, XD_LOG_DEBUG);
    assert_int_equal(c->log_syslog, 0);
    snprintf(want, sizeof(want), "%s/data", f->dir);
    assert_string_equal(c->data_dir, want);
    assert_string_equal(c->module_dir, TEST_MODULE_DIR);
    assert_non_null(c->tls_priority);

    assert_int_equal(c->nhosts, 2);
    assert_string_equal(c->hosts[0].domain, "example.com");
    snprintf(want, sizeof(want), "%s/a.crt", f->dir);
    assert_string_equal(c->hosts[0].cert, want);
    snprintf(want, sizeof(want), "%s/a.key", f->dir);
    assert_string_equal(c->hosts[0].key, want);
    assert_int_equal(c->hosts[0].line, line_of(f, "Example.COM"));
    assert_string_equal(c->hosts[1].domain, "second.example");
    assert_int_equal(c->hosts[1].line, line_of(f, "second.example"));
    assert_non_null(xd_config_host("example.com"));
    assert_true(xd_is_local_host("second.example"));
    assert_false(xd_is_local_host("third.example"));

    assert_int_equal(c->nlisteners, 3);
    assert_int_equal(c->listeners[0].type, XD_STREAM_C2S);
    assert_int_equal(c->listeners[0].tls, XD_TLS_STARTTLS); /* the default */
    assert_int_equal(c->listeners[0].port, 5222);
    assert_string_equal(c->listeners[0].address, "127.0.0.1");
    assert_int_equal(c->listeners[0].fd, -1);
    assert_int_equal(c->listeners[0].line, line_of(f, "5222"));
    assert_int_equal(c->listeners[1].type, XD_STREAM_C2S);
    assert_int_equal(c->listeners[1].tls, XD_TLS_DIRECT);
    assert_int_equal(c->listeners[1].port, 5223);
    assert_string_equal(c->listeners[1].address, "::1");
    assert_int_equal(c->listeners[2].type, XD_STREAM_S2S);
    assert_int_equal(c->listeners[2].tls, XD_TLS_STARTTLS);
    assert_int_equal(c->listeners[2].port, 5269);
    assert_string_equal(c->listeners[2].address, "0.0.0.0");
    assert_int_equal(c->max_stanza[XD_STREAM_C2S], 262144); /* until c2s loads */

    assert_int_equal(load_modules(f), 0);
    assert_string_equal(f->err, "");
    assert_int_equal(xd_srv.nmodules, 1);
    assert_string_equal(xd_module_name(xd_srv.modules[0]), "c2s");
    assert_int_equal(xd_srv.modules[0]->list_line, line_of(f, "modules ="));
    assert_int_equal(xd_config_int(xd_srv.modules[0], "max_stanza_size", 0), 65536);
    assert_int_equal(xd_config_int(xd_srv.modules[0], "auth_max_attempts", 0), 5);
    assert_int_equal(xd_config_int(xd_srv.modules[0], "auth_failure_delay", 1234), 1234);
    assert_int_equal(xd_config_bool(xd_srv.modules[0], "version", 0), 1);
    assert_int_equal(c->max_stanza[XD_STREAM_C2S], 65536); /* c2s applied its setting */
}

static void test_minimal_config(void **state)
{
    fx *f = *state;
    xd_config *c = &xd_srv.conf;
    /* no log level, no modules, no module_dir: the defaults */
    assert_int_equal(load(f, "data_dir = \"/var/lib/x\";\n"
                             "hosts = ( { domain = \"localhost\"; cert = \"c\"; key = \"k\"; } );\n"
                             "listeners = ( { stream = \"c2s\"; address = \"::\"; port = 1; } );\n"),
                     0);
    assert_string_equal(f->err, "");
    assert_int_equal(c->log_level, XD_LOG_INFO);
    assert_null(c->modules);
    assert_non_null(c->module_dir);
    assert_int_equal(c->listeners[0].port, 1);
    assert_int_equal(load_modules(f), 0);
    assert_int_equal(xd_srv.nmodules, 0);
}

/* ---- xd_config_load errors -------------------------------------------------------------- */

static void test_syntax_error(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, GOOD_HEAD "hosts = (\n"
                                       "  { domain = \"a.example\"; cert = ; key = \"k\"; }\n"
                                       ");\n"),
                     -1);
    expect_err(f, line_of(f, "cert = ;"), "syntax error");

    xd_config_free(&xd_srv.conf);
    assert_int_equal(load(f, "data_dir = \"/x\";\n\n\nlog_syslog true;\n" GOOD_HOSTS GOOD_LISTENERS),
                     -1);
    expect_err(f, 4, "syntax error");
}

static void test_missing_file(void **state)
{
    fx *f = *state;
    char path[160];
    int r;
    snprintf(path, sizeof(path), "%s/does-not-exist.cfg", f->dir);
    capture_start(f);
    r = xd_config_load(&xd_srv.conf, path);
    capture_end(f);
    assert_int_equal(r, -1);
    assert_non_null(strstr(f->err, path));
    assert_non_null(strstr(f->err, "cannot read the file"));
}

static void test_missing_data_dir(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, "log_level = \"info\";\n" GOOD_HOSTS GOOD_LISTENERS), -1);
    assert_non_null(strstr(f->err, f->path));
    assert_non_null(strstr(f->err, "missing 'data_dir'"));
}

static void test_unknown_top_key(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, BASE "\nlog_levle = \"debug\";\n"), -1);
    expect_err(f, line_of(f, "log_levle"), "unknown setting 'log_levle'");
}

static void test_unknown_listener_key(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, GOOD_HEAD GOOD_HOSTS "listeners = (\n"
                                                  "  { stream = \"c2s\";\n"
                                                  "    address = \"127.0.0.1\";\n"
                                                  "    port = 5222;\n"
                                                  "    colour = \"red\"; }\n"
                                                  ");\n"),
                     -1);
    expect_err(f, line_of(f, "colour"), "unknown key 'colour' in listener");
}

static void test_unknown_host_key(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, GOOD_HEAD "hosts = (\n"
                                       "  { domain = \"a.example\";\n"
                                       "    cert = \"c\";\n"
                                       "    key = \"k\";\n"
                                       "    certificate = \"c\"; }\n"
                                       ");\n" GOOD_LISTENERS),
                     -1);
    expect_err(f, line_of(f, "certificate"), "unknown key 'certificate' in host");
}

static void test_bad_stream_and_tls(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, GOOD_HEAD GOOD_HOSTS
                          "listeners = (\n"
                          "  { stream = \"c2s\"; address = \"127.0.0.1\"; port = 5222; },\n"
                          "  { stream = \"x2s\"; address = \"127.0.0.1\"; port = 5223; }\n"
                          ");\n"),
                     -1);
    expect_err(f, line_of(f, "x2s"), "stream must be \"c2s\" or \"s2s\", not 'x2s'");

    xd_config_free(&xd_srv.conf);
    assert_int_equal(load(f, GOOD_HEAD GOOD_HOSTS
                          "listeners = (\n"
                          "  { stream = \"c2s\"; address = \"127.0.0.1\"; port = 5222; },\n"
                          "\n"
                          "  { stream = \"c2s\"; address = \"::1\"; port = 5223; tls = \"ssl\"; }\n"
                          ");\n"),
                     -1);
    expect_err(f, line_of(f, "\"ssl\""), "tls must be \"starttls\" or \"direct\", not 'ssl'");

    xd_config_free(&xd_srv.conf);
    assert_int_equal(load(f, GOOD_HEAD GOOD_HOSTS
                          "listeners = (\n"
                          "  { stream = 5; address = \"::1\"; port = 5223; }\n"
                          ");\n"),
                     -1);
    expect_err(f, line_of(f, "stream = 5"), "'stream' must be a string");
}

static void test_bad_ports(void **state)
{
    fx *f = *state;
    static const char *const ports[] = {"0", "70000", "65536", "-1", "\"5222\"", "5222.0"};
    char cfg[2048];
    for (size_t i = 0; i < sizeof(ports) / sizeof(ports[0]); i++) {
        snprintf(cfg, sizeof(cfg),
                 GOOD_HEAD GOOD_HOSTS "listeners = (\n"
                                      "  { stream = \"c2s\"; address = \"127.0.0.1\"; port = 5222; },\n"
                                      "  { stream = \"c2s\"; address = \"::1\"; port = %s; }\n"
                                      ");\n",
                 ports[i]);
        xd_config_free(&xd_srv.conf);
        if (load(f, cfg) != -1)
            fail_msg("port = %s was accepted", ports[i]);
        expect_err(f, line_of(f, "\"::1\""), "port must be an integer from 1 to 65535");
    }
    /* and a missing port */
    xd_config_free(&xd_srv.conf);
    assert_int_equal(load(f, GOOD_HEAD GOOD_HOSTS
                          "listeners = ( { stream = \"c2s\"; address = \"::1\"; } );\n"),
                     -1);
    expect_err(f, line_of(f, "listeners"), "port must be an integer from 1 to 65535");
    /* the edges are fine */
    xd_config_free(&xd_srv.conf);
    assert_int_equal(load(f, GOOD_HEAD GOOD_HOSTS
                          "listeners = ( { stream = \"c2s\"; address = \"::1\"; port = 65535; } );\n"),
                     0);
    assert_int_equal(xd_srv.conf.listeners[0].port, 65535);
}

static void test_duplicate_host(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, GOOD_HEAD "hosts = (\n"
                                       "  { domain = \"example.com\"; cert = \"c\"; key = \"k\"; },\n"
                                       "  { domain = \"other.example\"; cert = \"c\"; key = \"k\"; },\n"
                                       "  { domain = \"EXAMPLE.com\"; cert = \"c\"; key = \"k\"; }\n"
                                       ");\n" GOOD_LISTENERS),
                     -1);
    expect_err(f, line_of(f, "EXAMPLE.com"), "host 'example.com' is listed twice");
}

static void test_invalid_domain(void **state)
{
    fx *f = *state;
    static const char *const bad[] = {"exa mple.com", "a..b", "", "user@example.com",
                                      "example.com/res"};
    char cfg[2048];
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(cfg, sizeof(cfg),
                 GOOD_HEAD "hosts = (\n"
                           "  { domain = \"ok.example\"; cert = \"c\"; key = \"k\"; },\n"
                           "  { domain = \"%s\"; cert = \"c\"; key = \"k\"; }\n"
                           ");\n" GOOD_LISTENERS,
                 bad[i]);
        char msg[128];
        xd_config_free(&xd_srv.conf);
        if (load(f, cfg) != -1)
            fail_msg("domain \"%s\" was accepted", bad[i]);
        snprintf(msg, sizeof(msg), "invalid domain '%s'", bad[i]);
        expect_err(f, line_of(f, "cert = \"c\"; key = \"k\"; }\n);"), msg);
    }
}

static void test_missing_host_fields(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, GOOD_HEAD "hosts = (\n"
                                       "  { domain = \"a.example\"; key = \"k\"; }\n"
                                       ");\n" GOOD_LISTENERS),
                     -1);
    expect_err(f, line_of(f, "a.example"), "missing 'cert'");

    xd_config_free(&xd_srv.conf);
    assert_int_equal(load(f, GOOD_HEAD "hosts = ();\n" GOOD_LISTENERS), -1);
    expect_err(f, line_of(f, "hosts"), "'hosts' must be a non-empty list of groups");
}

static void test_bad_log_level(void **state)
{
    fx *f = *state;
    /* BASE has its own log_level: a duplicate is refused where it is */
    assert_int_equal(load(f, BASE "\nlog_level = \"verbose\";\n"), -1);
    expect_err(f, line_of(f, "verbose"), "duplicate setting name");

    xd_config_free(&xd_srv.conf);
    assert_int_equal(load(f, "data_dir = \"/x\";\n"
                             "log_level = \"verbose\";\n" GOOD_HOSTS GOOD_LISTENERS),
                     -1);
    expect_err(f, 2, "log_level must be error, warn, info or debug");

    xd_config_free(&xd_srv.conf);
    assert_int_equal(load(f, "data_dir = \"/x\";\n"
                             "log_syslog = \"yes\";\n" GOOD_HOSTS GOOD_LISTENERS),
                     -1);
    expect_err(f, 2, "log_syslog must be true or false");
}

/* "Every mistake is reported ... nothing is silently ignored": a log_level
 * that is not a string at all must not fall back to the default. */
static void test_log_level_wrong_type(void **state)
{
    fx *f = *state;
    int r = load(f, "data_dir = \"/x\";\n"
                    "log_level = 3;\n" GOOD_HOSTS GOOD_LISTENERS);
    if (r != -1)
        fail_msg("log_level = 3 (an integer) was accepted silently (log level %d)",
                 xd_srv.conf.log_level);
    expect_err(f, 2, "log_level");
}

static void test_group_of_unlisted_module(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, BASE "modules = ( \"c2s\" );\n"
                                  "c2s = { version = true; };\n"
                                  "\n"
                                  "muc = { history = 20; };\n"),
                     -1);
    expect_err(f, line_of(f, "muc ="), "settings group 'muc' names no module in the 'modules' list");

    /* the same with no modules list at all */
    xd_config_free(&xd_srv.conf);
    assert_int_equal(load(f, BASE "c2s = { version = true; };\n"), -1);
    expect_err(f, line_of(f, "c2s ="), "settings group 'c2s' names no module in the 'modules' list");
}

static void test_bad_modules_list(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, BASE "modules = (\n"
                                  "  \"c2s\",\n"
                                  "  \"C2S-x\",\n"
                                  "  \"other\"\n"
                                  ");\n"),
                     -1);
    expect_err(f, line_of(f, "C2S-x"), "module names are lowercase letters, digits and '_'");

    xd_config_free(&xd_srv.conf);
    assert_int_equal(load(f, BASE "modules = \"c2s\";\n"), -1);
    expect_err(f, line_of(f, "modules ="), "'modules' must be a list of names");
}

static void test_module_listed_twice(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, BASE "modules = (\n"
                                  "  \"c2s\",\n"
                                  "  \"c2s\",\n"
                                  "  \"other\"\n"
                                  ");\n"),
                     -1);
    expect_err(f, line_of(f, "modules =") + 2, "module 'c2s' is listed twice");
    /* all on one line */
    xd_config_free(&xd_srv.conf);
    assert_int_equal(load(f, BASE "modules = ( \"c2s\", \"c2s\" );\n"), -1);
    expect_err(f, line_of(f, "modules ="), "module 'c2s' is listed twice");
}

/* ---- xd_modules_load errors ---------------------------------------------------------- */

static void test_module_not_found(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, BASE "modules = (\n"
                                  "  \"c2s\",\n"
                                  "\n"
                                  "  \"nosuch\",\n"
                                  "  \"other\"\n"
                                  ");\n"),
                     0);
    assert_int_equal(load_modules(f), -1);
    expect_err(f, line_of(f, "\"nosuch\""), "module 'nosuch': cannot load");
    assert_non_null(strstr(f->err, "mod_nosuch.so"));
    assert_null(strstr(f->err, "other")); /* loading stops at the first failure */
}

/* The line of the LAST entry of a `modules` list written one entry per line
 * (the usual layout) must be that entry's line, not the line of the ")". */
static void test_module_line_last_entry(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, BASE "modules = (\n"
                                  "  \"c2s\",\n"
                                  "  \"nosuch\"\n"
                                  ");\n"),
                     0);
    assert_int_equal(load_modules(f), -1);
    expect_err(f, line_of(f, "\"nosuch\""), "module 'nosuch': cannot load");

    teardown(state);
    assert_int_equal(setup(state), 0);
    f = *state;
    assert_int_equal(load(f, BASE "modules = (\n"
                                  "  \"c2s\",\n"
                                  "  \"c2s\"\n"
                                  ");\n"),
                     -1);
    expect_err(f, line_of(f, "modules =") + 2, "module 'c2s' is listed twice");
}

static void test_module_unknown_setting(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, BASE "modules = ( \"c2s\" );\n"
                                  "c2s = {\n"
                                  "  version = true;\n"
                                  "  bogus = 1;\n"
                                  "};\n"),
                     0);
    assert_int_equal(load_modules(f), -1);
    expect_err(f, line_of(f, "bogus"), "module 'c2s' has no setting 'bogus'");

    /* one line form, as in the brief */
    teardown(state);
    assert_int_equal(setup(state), 0);
    f = *state;
    assert_int_equal(load(f, BASE "modules = ( \"c2s\" );\nc2s = { bogus = 1; }\n"), 0);
    assert_int_equal(load_modules(f), -1);
    expect_err(f, line_of(f, "bogus"), "bogus");
}

static void test_module_wrong_type(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, BASE "modules = ( \"c2s\" );\n"
                                  "c2s = {\n"
                                  "  max_stanza_size = \"big\";\n"
                                  "};\n"),
                     0);
    assert_int_equal(load_modules(f), -1);
    expect_err(f, line_of(f, "\"big\""), "c2s.max_stanza_size must be an integer");

    teardown(state);
    assert_int_equal(setup(state), 0);
    f = *state;
    assert_int_equal(load(f, BASE "modules = ( \"c2s\" );\n"
                                  "c2s = {\n"
                                  "  version = 1;\n"
                                  "};\n"),
                     0);
    assert_int_equal(load_modules(f), -1);
    expect_err(f, line_of(f, "version = 1"), "c2s.version must be true or false");
}

static void test_module_out_of_range(void **state)
{
    fx *f = *state;
    assert_int_equal(load(f, BASE "modules = ( \"c2s\" );\n"
                                  "c2s = {\n"
                                  "  version = false;\n"
                                  "  max_stanza_size = 10;\n"
                                  "};\n"),
                     0);
    assert_int_equal(load_modules(f), -1);
    expect_err(f, line_of(f, "max_stanza_size = 10"),
               "c2s.max_stanza_size: must be from 4096 to 67108864 bytes");
    expect_err(f, line_of(f, "modules ="), "module 'c2s' refused to load");
    assert_int_equal(xd_srv.conf.max_stanza[XD_STREAM_C2S], 262144); /* not applied */

    teardown(state);
    assert_int_equal(setup(state), 0);
    f = *state;
    assert_int_equal(load(f, BASE "modules = ( \"c2s\" );\n"
                                  "c2s = { auth_max_attempts = 0; };\n"),
                     0);
    assert_int_equal(load_modules(f), -1);
    expect_err(f, line_of(f, "auth_max_attempts"), "c2s.auth_max_attempts: must be from 1 to 100");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_good_config, setup, teardown),
        cmocka_unit_test_setup_teardown(test_minimal_config, setup, teardown),
        cmocka_unit_test_setup_teardown(test_syntax_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_data_dir, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_top_key, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_listener_key, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_host_key, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_stream_and_tls, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_ports, setup, teardown),
        cmocka_unit_test_setup_teardown(test_duplicate_host, setup, teardown),
        cmocka_unit_test_setup_teardown(test_invalid_domain, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_host_fields, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_log_level, setup, teardown),
        cmocka_unit_test_setup_teardown(test_log_level_wrong_type, setup, teardown),
        cmocka_unit_test_setup_teardown(test_group_of_unlisted_module, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_modules_list, setup, teardown),
        cmocka_unit_test_setup_teardown(test_module_listed_twice, setup, teardown),
        cmocka_unit_test_setup_teardown(test_module_not_found, setup, teardown),
        cmocka_unit_test_setup_teardown(test_module_line_last_entry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_module_unknown_setting, setup, teardown),
        cmocka_unit_test_setup_teardown(test_module_wrong_type, setup, teardown),
        cmocka_unit_test_setup_teardown(test_module_out_of_range, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
