/* Private to the core: one XML stream over one TCP connection. */
#ifndef XD_CORE_SESSION_H
#define XD_CORE_SESSION_H

#include <netinet/in.h>

#include "server.h"
#include "xmlstream.h"

#define XD_OUT_MAX (4u << 20)    /* bytes queued for a slow reader before we give up */
#define XD_READ_CHUNK 16384

enum { XD_RESTART_NONE = 0, XD_RESTART_STREAM, XD_RESTART_TLS };

/* The domains a server-to-server stream deals with. */
typedef struct xd_s2s_names {
    char remote[XD_JID_PART_MAX + 1];      /* outgoing: the domain we connect to */
    char stream_from[XD_JID_PART_MAX + 1]; /* incoming: 'from' of the peer's header */
    char peer_domain[XD_JID_PART_MAX + 1]; /* authenticated peer domain */
    char verified[XD_JID_PART_MAX + 1];    /* the domain the peer certificate was checked for */
} xd_s2s_names;

struct xd_session {
    xd_stream_type type;
    const xd_listener *listener;
    int fd;
    ev_io rio, wio;
    ev_timer timer;       /* handshake deadline, then the close linger */
    ev_timer pause_timer; /* xd_session_pause() */
    struct sockaddr_storage addr;
    char peer[64];

    /* TLS */
    gnutls_session_t tls;
    xd_tls_creds *creds;
    unsigned tls_handshaking : 1, tls_up : 1, tls_start_after_flush : 1;
    size_t tls_retry_len; /* gnutls_record_send() wants the same length again */

    /* output queue, written once per loop turn (xd_session_send_raw) */
    char *out;
    size_t out_off, out_len, out_cap;
    xd_session *flush_next, *flush_prev; /* on the list of sessions to write */
    unsigned flush_queued : 1, durable_waiting : 1;
    /* output that waits for the disk (xd_session_send_durable) */
    struct xd_deferred *deferred, *deferred_tail;
    xd_session *dwait_next, *dwait_prev; /* on the list of sessions that wait */
    unsigned close_waits : 1;            /* the close follows the deferred output */
    char *close_cond, *close_text;

    /* input: the chunk being parsed.  It is read into one buffer shared by
     * every session; only a chunk the parser stopped inside (a paused
     * stream) is copied to in_own and kept (see keep_input). */
    char *in, *in_own;
    size_t in_len;
    double last_input;     /* loop time of the last read */
    unsigned in_pending : 1, suspended : 1;
    xd_xmlstream *xs;

    /* server-to-server */
    unsigned initiator : 1, connecting : 1, direct_tls : 1, closed_hook_run : 1;
    xd_s2s_names *s2s; /* allocated for s2s streams only: clients never need it */

    /* stream state */
    unsigned header_sent : 1, header_received : 1, authenticated : 1, bound : 1, closing : 1,
        dead : 1, paused : 1, available : 1, presence_seen : 1, ending : 1,
        detached : 1,  /* bound, connection lost, awaiting resumption (XEP-0198) */
        lingering : 1; /* closed: our side shut, draining the peer's last bytes */
    double resume_timeout; /* > 0: a lost connection detaches instead of ending */
    unsigned stanzas_in;   /* routable stanzas received while bound (c2s) */
    uint64_t bytes_in;     /* bytes read (decrypted) */
    int restart;
    int priority;
    const char *host;        /* the served domain: a configured host's name, or "" */
    char id[33];
    xd_jid jid;
    char *full, *bare;       /* keys in the router's tables while bound */
    xmpp_stanza_t *presence;
    xd_session *res_next;    /* next resource of the same bare JID */
    xd_session *next, *prev; /* every session, for shutdown */
    xd_session *dead_next;   /* the graveyard */

    /* per-module data, allocated at the first xd_session_set_data() */
    struct xd_mslot {
        void *data;
        void (*free_fn)(void *);
    } *mslots;
    int nslots;
};

/* session.c */
xd_session *xd_session_new(const xd_listener *l, int fd, const struct sockaddr *sa, socklen_t len);
void xd_session_start_tls(xd_session *s);
void xd_session_kill(xd_session *s); /* stop now, destroy at the end of this loop turn */
void xd_graveyard_init(void);

/* stream.c */
int xd_stream_init(xd_session *s);
void xd_stream_free(xd_session *s);
void xd_stream_input(xd_session *s); /* parse s->in, dispatch what completes */
void xd_stream_send_error(xd_session *s, const char *cond, const char *text);
void xd_stream_send_header(xd_session *s);

#endif
