/* Account administration: xmppctl's commands and the server's admin socket. */
#ifndef XD_CORE_ADMIN_H
#define XD_CORE_ADMIN_H

#include <stddef.h>

/* In the data directory; see admin.c for the protocol. */
#define XD_ADMIN_SOCKET "xmppctl.sock"

/* A growing text buffer for a command's output. */
typedef struct xd_admin_out {
    char *buf;
    size_t len, cap;
    int failed; /* out of memory: the output is incomplete */
} xd_admin_out;

void xd_admin_printf(xd_admin_out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void xd_admin_out_free(xd_admin_out *o);

/* Is cmd a command that takes nargs arguments? */
int xd_admin_known(const char *cmd, int nargs);
/* Run a command on the open store: adduser JID PW, passwd JID PW, deluser
 * JID, list [DOMAIN], stats.  0 with its output in out, or -1 with the
 * reason in out. */
int xd_admin_exec(int nargs, const char *cmd, const char *arg, const char *pw, xd_admin_out *out);

/* The socket's path for a data directory: 0, or -1 if it does not fit. */
int xd_admin_socket_path(const char *data_dir, char *buf, size_t len);
/* Listen on the admin socket (server, after the store is open). 0 or -1. */
int xd_admin_open(void);
/* Stop listening, remove the socket file, end the connections. */
void xd_admin_close(void);

#endif
