/* Logging: levels to stderr, and to syslog when the config asks. */
#ifndef XMPPD_LOG_H
#define XMPPD_LOG_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum xd_log_level {
    XD_LOG_ERROR = 0,
    XD_LOG_WARN,
    XD_LOG_INFO,
    XD_LOG_DEBUG
} xd_log_level;

void xd_log(xd_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define xd_error(...) xd_log(XD_LOG_ERROR, __VA_ARGS__)
#define xd_warn(...) xd_log(XD_LOG_WARN, __VA_ARGS__)
#define xd_info(...) xd_log(XD_LOG_INFO, __VA_ARGS__)
#define xd_debug(...) xd_log(XD_LOG_DEBUG, __VA_ARGS__)

#ifdef __cplusplus
}
#endif
#endif
