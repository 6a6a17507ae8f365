/* Logging with levels to stderr, and to syslog when the config asks. */
#include <stdarg.h>
#include <stdio.h>
#include <syslog.h>
#include <time.h>

#include <xmppd/log.h>

#include "server.h"

static const char *const level_names[] = {"error", "warn", "info", "debug"};
static const int syslog_prio[] = {LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG};

/* Set once at start-up, before the loop runs. */
static struct {
    int level;
    int use_syslog;
} log_conf = {XD_LOG_INFO, 0};

void
xd_log_setup(int level, int use_syslog)
{
    log_conf.level = level;
    if (use_syslog && !log_conf.use_syslog)
        openlog("xmppd", LOG_PID | LOG_NDELAY, LOG_DAEMON);
    log_conf.use_syslog = use_syslog;
}

void
xd_log(xd_log_level level, const char *fmt, ...)
{
    char msg[2048];
    char stamp[32];
    va_list ap;
    time_t now;
    struct tm tm;

    if ((int)level > log_conf.level)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    now = time(NULL);
    gmtime_r(&now, &tm);
    strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%SZ", &tm);
    fprintf(stderr, "%s %s: %s\n", stamp, level_names[level], msg);
    if (log_conf.use_syslog)
        syslog(syslog_prio[level], "%s", msg);
}
