/*
 * xmppload: a load generator for XMPP servers, speaking client-to-server
 * streams with STARTTLS (RFC 6120) like any ordinary client would.
 *
 *   xmppload --host ADDR --port N --domain D [--prefix u] [--password pw]
 *            [--mech PLAIN|SCRAM-SHA-1|SCRAM-SHA-256] [--timeout S=120]
 *            [--concurrency C] MODE [mode options]
 *
 *   register   --users N                 XEP-0077 accounts prefix0..prefix(N-1)
 *   roster     --pairs P                 make (2k, 2k+1) mutual contacts
 *   throughput --pairs P [--window W=100] [--duration S=10] [--warmup S=2] [--body-size B=100]
 *   rate       --pairs P --rate R [--duration S=10] [--warmup S=2] [--body-size B=100]
 *   idle       --sessions N [--hold S=5]   prints "READY n" on stderr when all are up
 *   login      [--users N] [--concurrency C=20] [--duration S=10]
 *
 * Accounts are <prefix><i>@<domain>, all with the same password; the mode
 * picks the strongest mechanism offered unless --mech says.  One JSON object
 * goes to stdout at the end; diagnostics go to stderr (the first few errors
 * of each kind in full, then a count per kind).  Exit status: 0 when the run
 * finished (its "errors" field counts stream errors, bounced messages and
 * lost connections during it), 1 on bad usage or when setup failed (a login,
 * a registration, a wrong password), 2 when --timeout passed first.
 *
 * Messages carry "R<run id> T<send time, ns>" then padding to --body-size;
 * messages from another run (e.g. stored offline) are counted as "stale".
 *
 * Design.  One thread, one libev loop, non-blocking sockets.  Every client is
 * a struct conn in one array and walks the login states (TCP connect, stream,
 * STARTTLS, TLS handshake, stream, SASL, stream, bind, session, presence),
 * each step driven by the top-level element that arrives.  Input is cut into
 * top-level elements by a byte-at-a-time scanner that counts depth outside
 * quotes, comments, PIs and CDATA; the few things we need (element name,
 * type/id/from, a child's text) are picked out of the element's bytes, so
 * there is no XML tree.  Output is appended to a per-connection buffer and
 * flushed once per loop turn, just before the loop sleeps, so a burst of
 * stanzas leaves in few TLS records.  At most --concurrency logins are in
 * progress at once (200 by default) so a server is not hit by 10,000
 * simultaneous handshakes.  Phase changes (everyone up, everyone subscribed,
 * everything drained or closed) are checked in one place, once per turn.
 * Message latency comes from a CLOCK_MONOTONIC send time written into each
 * body (sender and receiver are this process) and goes into a log-linear
 * histogram: 1 us steps below 256 us, under 1% relative error above.
 *
 * TLS certificates are NOT verified: this is a benchmark, not a client.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <ev.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#define STREAM_OPEN                                                                                \
    "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "                                   \
    "xmlns:stream='http://etherx.jabber.org/streams' to='%s' version='1.0'>"
#define NS_SASL "urn:ietf:params:xml:ns:xmpp-sasl"

#define MAX_ELEMENT (1024 * 1024) /* a bigger element from the server is an error */
#define MAX_DEPTH 64              /* nesting inside one top-level element */
#define READ_CHUNK 16384          /* bytes asked for per read */
#define READ_BUDGET (256 * 1024)  /* per wake-up, so one busy stream cannot hog the loop */
#define WRITE_ROUNDS 64           /* records written per flush before waiting for EPOLLOUT */
#define TLS_RECORD 16384          /* plaintext per gnutls_record_send */
#define IDLE_BUF_KEEP 4096        /* an empty buffer bigger than this is freed */
#define MAX_BACKLOG (4 << 20)     /* unsent bytes per client before rate mode skips a send */
#define MAX_KINDS 16              /* kinds of error told apart in the summary */
#define REPORTS_PER_KIND 3        /* errors of one kind shown in full */
#define DRAIN_GRACE 3.0           /* seconds to wait for messages in flight at the end */
#define CLOSE_GRACE 5.0           /* seconds to wait for servers to close streams */
#define RATE_TICK 0.001           /* rate mode sends what is due every millisecond */
#define DEFAULT_CONCURRENCY 200   /* logins in progress at once */
#define MAX_BODY 65536
#define SCRAM_MAX_ITER 1000000 /* PBKDF2 rounds we agree to compute */
#define HIST_SUB_BITS 7        /* 128 sub-buckets per power of two: < 1% error */
#define HIST_SUB (1 << HIST_SUB_BITS)
#define HIST_TOP_BIT 40 /* values are capped at 2^40 us (12 days) */
#define HIST_BUCKETS (2 * HIST_SUB + (HIST_TOP_BIT - HIST_SUB_BITS) * HIST_SUB)

/* ---- types -------------------------------------------------------------------------------- */

enum mode { M_REGISTER, M_ROSTER, M_THROUGHPUT, M_RATE, M_IDLE, M_LOGIN, M_COUNT };
enum mech { MECH_AUTO, MECH_PLAIN, MECH_SCRAM_SHA1, MECH_SCRAM_SHA256, MECH_COUNT };
enum phase { PH_SETUP, PH_RUN, PH_DRAIN, PH_CLOSING, PH_DONE };

static const char *const MODE_NAMES[M_COUNT] = {"register", "roster", "throughput",
                                                "rate",     "idle",   "login"};
static const char *const MECH_NAMES[MECH_COUNT] = {"auto", "PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"};

enum cstate {
    CS_IDLE,        /* slot without a connection */
    CS_CONNECTING,  /* TCP connect in progress */
    CS_STREAM,      /* stream opened in the clear, waiting for features */
    CS_STARTTLS,    /* <starttls/> sent, waiting for <proceed/> */
    CS_HANDSHAKE,   /* TLS handshake */
    CS_TLS_STREAM,  /* stream reopened over TLS, waiting for features */
    CS_REGISTER,    /* registration iq sent */
    CS_SASL,        /* SASL exchange */
    CS_AUTH_STREAM, /* stream reopened after SASL, waiting for features */
    CS_BIND,        /* bind iq sent */
    CS_SESSION,     /* session iq sent */
    CS_SYNC,        /* presence and a ping sent: up when the ping is answered */
    CS_READY,       /* logged in and available */
    CS_CLOSING,     /* </stream:stream> sent, waiting for the server's */
};

struct opts {
    const char *host, *domain, *prefix, *password, *mech_name;
    long port, users, concurrency, pairs, window, body_size, sessions;
    double timeout, duration, warmup, rate, hold;
    enum mode mode;
    enum mech mech;
};

/* A byte buffer; off is where unsent output starts. */
struct buf {
    char *data;
    size_t len, off, cap;
};

enum scan_state { SS_TEXT, SS_LT, SS_TAG, SS_QUOTE, SS_BANG, SS_PI, SS_COMMENT, SS_CDATA, SS_DECL };
enum scan_event { SE_MORE, SE_STREAM_OPEN, SE_STREAM_CLOSE, SE_ELEMENT, SE_ERROR };

/* Where the scanner is in a connection's input buffer (offsets into it). */
struct scanner {
    enum scan_state st;
    size_t pos;       /* next byte to look at */
    size_t tag_start; /* '<' of the tag being read */
    size_t top_start; /* '<' of the top-level element being read */
    int depth;        /* open elements inside the stream */
    int closing;      /* the tag being read is an end tag */
    int dashes;       /* '-' seen after "<!" */
    char quote, prev, prev2;
};

/* One complete top-level element, pointing into the input buffer. */
struct el {
    const char *s;
    size_t n;
};

struct scram {
    enum mech mech;
    int final_sent, verified;
    char nonce[40];               /* ours, base64 */
    char cfb[200];                /* client-first-message-bare, for AuthMessage */
    unsigned char server_sig[32]; /* what the server must prove */
};

/* A salted password kept per (hash, iterations, salt): accounts are logged
 * in again and again, and PBKDF2 would otherwise be the client's main cost. */
struct salted {
    char key[112];
    unsigned char sp[32];
};

struct conn {
    long slot;    /* index in B.conns; the partner is slot ^ 1 */
    long account; /* the i of <prefix><i> */
    int fd;
    enum cstate st;
    ev_io rio, wio;
    gnutls_session_t tls;
    struct buf in, out;
    struct scanner sc;
    struct scram *scram;
    size_t tls_retry; /* size of a record send to repeat after EAGAIN */
    uint64_t t_begin; /* ns, when this login started */
    uint64_t sent, received;
    unsigned long resource;
    unsigned in_flight : 1; /* counted in B.logging_in */
    unsigned dirty : 1;     /* listed in B.dirty */
    unsigned need_session : 1;
    unsigned roster_ok : 1, partner_seen : 1, roster_done : 1;
    char bare[160];
};

struct hist {
    uint64_t count, max;
    uint64_t b[HIST_BUCKETS];
};

/* The one benchmark: options, loop, clients and counters. */
struct bench {
    struct opts o;
    struct ev_loop *loop;
    struct sockaddr_storage addr;
    socklen_t addr_len;
    gnutls_certificate_credentials_t cred;
    uint64_t run_id; /* marks our messages; anything else is stale */
    char *password_xml;
    char *padding;
    struct conn *conns;
    long nconns, nclients; /* slots; accounts to use */
    long next;             /* next slot (or account, login mode) to start */
    long logging_in, nopen, nready, ndone;
    unsigned long launches;
    struct conn **dirty;
    long ndirty;
    enum phase phase;
    int sending, measuring, measured, run_over;
    double t_start, t_setup, t_run, t_measure, t_measure_end;
    ev_prepare prepare_w;
    ev_timer timeout_w, phase_w, tick_w;
    uint64_t sent, delivered, total_sent, total_received, stale, skipped;
    uint64_t errors, logins, created, existed;
    struct error_kind {
        char *why;
        uint64_t n;
    } kinds[MAX_KINDS];
    uint64_t rate_due; /* rate mode: sends scheduled so far */
    double rate_t0;
    long rr; /* rate mode: next sender */
    struct hist lat;
    struct salted *cache;
    size_t cache_slots;
    char scratch[READ_CHUNK]; /* every read lands here first */
};

static struct bench B;

static int conn_fail(struct conn *c, const char *why, const char *data, size_t n);
static void conn_flush(struct conn *c);
static void read_cb(struct ev_loop *loop, ev_io *w, int revents);
static void write_cb(struct ev_loop *loop, ev_io *w, int revents);

/* ---- small things ------------------------------------------------------------------------- */

__attribute__((noreturn, format(printf, 1, 2))) static void
die(const char *fmt, ...)
{
    va_list ap;
    fputs("xmppload: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

static uint64_t
mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double
mono_s(void)
{
    return (double)mono_ns() / 1e9;
}

static size_t
min_size(size_t a, size_t b)
{
    return a < b ? a : b;
}

static int
copy_out(char *out, size_t sz, const char *s, size_t n)
{
    n = min_size(n, sz - 1);
    memcpy(out, s, n);
    out[n] = '\0';
    return (int)n;
}

/* A value copied from a stanza goes back out in quotes it cannot contain. */
static char
quote_for(const char *value)
{
    return strchr(value, '\'') ? '"' : '\'';
}

/* ---- buffers ------------------------------------------------------------------------------ */

static void
buf_reserve(struct buf *b, size_t more)
{
    size_t cap = b->cap ? b->cap : 1024;
    char *p;
    if (b->cap - b->len >= more)
        return;
    while (cap - b->len < more)
        cap *= 2;
    if (!(p = realloc(b->data, cap)))
        die("out of memory");
    b->data = p;
    b->cap = cap;
}

static void
buf_append(struct buf *b, const char *s, size_t n)
{
    buf_reserve(b, n);
    memcpy(b->data + b->len, s, n);
    b->len += n;
}

static void
buf_vprintf(struct buf *b, const char *fmt, va_list ap)
{
    va_list again;
    int n;
    va_copy(again, ap);
    n = vsnprintf(b->data + b->len, b->cap - b->len, fmt, ap);
    if (n >= 0 && (size_t)n >= b->cap - b->len) {
        buf_reserve(b, (size_t)n + 1);
        n = vsnprintf(b->data + b->len, b->cap - b->len, fmt, again);
    }
    va_end(again);
    if (n > 0)
        b->len += (size_t)n;
}

static void
buf_free(struct buf *b)
{
    free(b->data);
    memset(b, 0, sizeof(*b));
}

/* Keeps idle clients small: 10,000 of them should not hold 16 KiB each. */
static void
buf_release_if_empty(struct buf *b)
{
    if (b->len == b->off && b->cap > IDLE_BUF_KEEP)
        buf_free(b);
    else if (b->len == b->off)
        b->len = b->off = 0;
}

/* ---- histogram ---------------------------------------------------------------------------- */

/* Exact below 2*HIST_SUB; above, HIST_SUB steps per power of two. */
static size_t
hist_index(uint64_t v)
{
    int msb, shift;
    if (v < 2 * HIST_SUB)
        return (size_t)v;
    if (v >= (uint64_t)1 << HIST_TOP_BIT)
        v = ((uint64_t)1 << HIST_TOP_BIT) - 1;
    msb = 63 - __builtin_clzll(v);
    shift = msb - HIST_SUB_BITS;
    return 2 * HIST_SUB + (size_t)(shift - 1) * HIST_SUB + (size_t)((v >> shift) - HIST_SUB);
}

/* The middle of bucket i. */
static uint64_t
hist_value(size_t i)
{
    size_t k, shift;
    if (i < 2 * HIST_SUB)
        return i;
    k = i - 2 * HIST_SUB;
    shift = k / HIST_SUB + 1;
    return ((uint64_t)(k % HIST_SUB + HIST_SUB) << shift) + (((uint64_t)1 << shift) - 1) / 2;
}

static void
hist_add(struct hist *h, uint64_t us)
{
    h->b[hist_index(us)]++;
    h->count++;
    if (us > h->max)
        h->max = us;
}

static double
hist_quantile_ms(const struct hist *h, double q)
{
    uint64_t want = (uint64_t)(q * (double)h->count + 0.999999), seen = 0;
    if (h->count == 0)
        return 0;
    for (size_t i = 0; i < HIST_BUCKETS; i++) {
        seen += h->b[i];
        if (seen >= want && seen > 0) {
            uint64_t v = hist_value(i);
            return (double)(v < h->max ? v : h->max) / 1000.0;
        }
    }
    return (double)h->max / 1000.0;
}

/* ---- XML scanner: top-level element boundaries ---------------------------------------------- */

static int
is_delim(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '/' || c == '>';
}

/* The local name (prefix dropped) of the tag at p, which points at its '<'. */
static const char *
tag_name(const char *p, const char *end, size_t *len)
{
    const char *s = p + 1, *e, *colon;
    if (s < end && *s == '/')
        s++;
    for (e = s; e < end && !is_delim(*e);)
        e++;
    if ((colon = memchr(s, ':', (size_t)(e - s))))
        s = colon + 1;
    *len = (size_t)(e - s);
    return s;
}

static int
tag_is(const char *p, const char *end, const char *want)
{
    size_t n;
    const char *s = tag_name(p, end, &n);
    return n == strlen(want) && memcmp(s, want, n) == 0;
}

static void
scan_reset(struct scanner *sc)
{
    memset(sc, 0, sizeof(*sc));
}

struct span_out {
    size_t off, len;
};

static enum scan_event
scan_span(struct span_out *sp, size_t off, size_t end, enum scan_event e)
{
    sp->off = off;
    sp->len = end - off;
    return e;
}

static enum scan_event
scan_end_tag(struct scanner *sc, struct span_out *sp)
{
    if (sc->depth == 0)
        return SE_STREAM_CLOSE;
    if (--sc->depth > 0)
        return SE_MORE;
    return scan_span(sp, sc->top_start, sc->pos, SE_ELEMENT);
}

/* Called on the '>' that ends a tag. */
static enum scan_event
scan_tag_end(struct scanner *sc, const char *d, struct span_out *sp)
{
    int self = sc->prev == '/';
    sc->st = SS_TEXT;
    if (sc->closing)
        return scan_end_tag(sc, sp);
    if (sc->depth == 0 && tag_is(d + sc->tag_start, d + sc->pos, "stream"))
        return scan_span(sp, sc->tag_start, sc->pos, SE_STREAM_OPEN);
    if (sc->depth == 0)
        sc->top_start = sc->tag_start;
    if (self)
        return sc->depth == 0 ? scan_span(sp, sc->top_start, sc->pos, SE_ELEMENT) : SE_MORE;
    return ++sc->depth > MAX_DEPTH ? SE_ERROR : SE_MORE;
}

static void
scan_after_lt(struct scanner *sc, char c)
{
    sc->closing = c == '/';
    sc->prev = sc->prev2 = 0;
    sc->dashes = 0;
    if (c == '?')
        sc->st = SS_PI;
    else if (c == '!')
        sc->st = SS_BANG;
    else
        sc->st = SS_TAG;
}

/* "<!--" starts a comment, "<![" CDATA, anything else a declaration. */
static void
scan_after_bang(struct scanner *sc, char c)
{
    if (c == '-' && ++sc->dashes == 2)
        sc->st = SS_COMMENT;
    else if (c == '[')
        sc->st = SS_CDATA;
    else if (c != '-')
        sc->st = SS_DECL;
}

/* Inside a PI, comment, CDATA section or declaration: wait for its end. */
static void
scan_skip(struct scanner *sc, char c)
{
    int end = c == '>' && (sc->st == SS_DECL || (sc->st == SS_PI && sc->prev == '?') ||
                           (sc->st == SS_COMMENT && sc->prev == '-' && sc->prev2 == '-') ||
                           (sc->st == SS_CDATA && sc->prev == ']' && sc->prev2 == ']'));
    sc->prev2 = sc->prev;
    sc->prev = c;
    if (end)
        sc->st = SS_TEXT;
}

static enum scan_event
scan_byte(struct scanner *sc, const char *d, struct span_out *sp)
{
    char c = d[sc->pos++];
    switch (sc->st) {
    case SS_TEXT:
        sc->st = SS_LT;
        sc->tag_start = sc->pos - 1; /* only '<' gets here */
        break;
    case SS_LT:
        scan_after_lt(sc, c);
        break;
    case SS_TAG:
        if (c == '>')
            return scan_tag_end(sc, d, sp);
        if (c == '"' || c == '\'') {
            sc->quote = c;
            sc->st = SS_QUOTE;
        }
        sc->prev = c;
        break;
    case SS_QUOTE:
        if (c == sc->quote)
            sc->st = SS_TAG;
        sc->prev = c;
        break;
    case SS_BANG:
        scan_after_bang(sc, c);
        break;
    default:
        scan_skip(sc, c);
        break;
    }
    return SE_MORE;
}

/* Scans d[pos..len) until something completes; SE_MORE when it needs more. */
static enum scan_event
scan_next(struct scanner *sc, const char *d, size_t len, struct span_out *sp)
{
    while (sc->pos < len) {
        enum scan_event e;
        if (sc->st == SS_TEXT) { /* character data: jump to the next tag */
            const char *lt = memchr(d + sc->pos, '<', len - sc->pos);
            if (!lt) {
                sc->pos = len;
                break;
            }
            sc->pos = (size_t)(lt - d);
        }
        if ((e = scan_byte(sc, d, sp)) != SE_MORE)
            return e;
    }
    return SE_MORE;
}

/* Bytes before this offset are no longer needed. */
static size_t
scan_keep(const struct scanner *sc)
{
    if (sc->depth > 0)
        return sc->top_start;
    return sc->st == SS_TEXT ? sc->pos : sc->tag_start;
}

static void
scan_shift(struct scanner *sc, size_t n)
{
    sc->pos -= n;
    sc->tag_start = sc->tag_start >= n ? sc->tag_start - n : 0;
    sc->top_start = sc->top_start >= n ? sc->top_start - n : 0;
}

/* ---- looking into one element --------------------------------------------------------------- */

/* The '>' closing the tag that starts at p, outside quoted values. */
static const char *
tag_end(const char *p, const char *end)
{
    char q = 0;
    for (; p < end; p++) {
        if (q) {
            if (*p == q)
                q = 0;
        } else if (*p == '"' || *p == '\'') {
            q = *p;
        } else if (*p == '>') {
            return p;
        }
    }
    return NULL;
}

static int
el_is(const struct el *e, const char *local)
{
    return tag_is(e->s, e->s + e->n, local);
}

static int
el_has(const struct el *e, const char *needle)
{
    return memmem(e->s, e->n, needle, strlen(needle)) != NULL;
}

/* The first descendant start tag <name ...>, or NULL. */
static const char *
el_find(const struct el *e, const char *name)
{
    size_t nl = strlen(name);
    const char *p = e->s + 1, *end = e->s + e->n;
    for (; (p = memchr(p, '<', (size_t)(end - p))) != NULL; p++)
        if ((size_t)(end - p) > nl + 1 && memcmp(p + 1, name, nl) == 0 && is_delim(p[1 + nl]))
            return p;
    return NULL;
}

/* Text up to the first child of the element starting at p ("" if empty). */
static int
text_at(const char *p, const char *end, char *out, size_t sz)
{
    const char *te = tag_end(p, end), *lt;
    if (!te)
        return -1;
    if (te[-1] == '/')
        return copy_out(out, sz, "", 0);
    lt = memchr(te + 1, '<', (size_t)(end - te - 1));
    return copy_out(out, sz, te + 1, (size_t)((lt ? lt : end) - te - 1));
}

/* The text of child <name>, or of the element itself when name is NULL. */
static int
el_text(const struct el *e, const char *name, char *out, size_t sz)
{
    const char *p = name ? el_find(e, name) : e->s;
    return p ? text_at(p, e->s + e->n, out, sz) : -1;
}

/* The value of attribute name of the element's own start tag, as written
 * (entities are left alone: we only compare and echo values). */
static int
el_attr(const struct el *e, const char *name, char *out, size_t sz)
{
    const char *p = e->s + 1, *end = e->s + e->n, *an, *v;
    size_t nl = strlen(name), al;
    char q;
    out[0] = '\0';
    while (p < end && !is_delim(*p))
        p++;
    for (;;) {
        while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n'))
            p++;
        if (p >= end || *p == '>' || *p == '/')
            return -1;
        for (an = p; p < end && *p != '=' && !is_delim(*p);)
            p++;
        al = (size_t)(p - an);
        while (p < end && (*p == '=' || *p == ' ' || *p == '\t' || *p == '\r' || *p == '\n'))
            p++;
        if (p >= end || (*p != '\'' && *p != '"'))
            return -1;
        q = *p++;
        if (!(p = memchr(v = p, q, (size_t)(end - p))))
            return -1;
        if (al == nl && memcmp(an, name, nl) == 0)
            return copy_out(out, sz, v, (size_t)(p - v));
        p++;
    }
}

/* The first child's start tag, e.g. "<not-authorized/>", for messages. */
static int
el_first_child(const struct el *e, char *out, size_t sz)
{
    const char *end = e->s + e->n, *te = tag_end(e->s, end), *p, *q;
    if (!te || te[-1] == '/' || !(p = memchr(te, '<', (size_t)(end - te))) || p[1] == '/' ||
        !(q = tag_end(p, end)))
        return copy_out(out, sz, "", 0);
    return copy_out(out, sz, p, (size_t)(q - p + 1));
}

/* A <session/> feature counts only if it is not marked <optional/> (RFC 3921
 * session establishment, as updated by draft-cridland-xmpp-session-01). */
static int
session_required(const struct el *e)
{
    const char *end = e->s + e->n, *p = el_find(e, "session"), *te, *close;
    if (!p || !(te = tag_end(p, end)))
        return 0;
    if (te[-1] == '/')
        return 1;
    close = memmem(te, (size_t)(end - te), "</", 2);
    return !memmem(te, (size_t)((close ? close : end) - te), "<optional", 9);
}

/* ---- errors -------------------------------------------------------------------------------- */

__attribute__((noreturn)) static void
die_conn(const struct conn *c, const char *why, const char *data, size_t n)
{
    fprintf(stderr, "xmppload: %s: %s%s%.*s\n", c->bare, why, n ? " " : "", (int)min_size(n, 200),
            n ? data : "");
    exit(1);
}

/* The count of errors like this one, so far. */
static uint64_t
count_kind(const char *why)
{
    int i;
    for (i = 0; i < MAX_KINDS - 1 && B.kinds[i].why; i++)
        if (strcmp(B.kinds[i].why, why) == 0)
            break;
    if (!B.kinds[i].why && !(B.kinds[i].why = strdup(i < MAX_KINDS - 1 ? why : "other")))
        die("out of memory");
    return ++B.kinds[i].n;
}

/* Shows the first few errors of each kind in full; all are counted. */
static void
count_error(const struct conn *c, const char *why, const char *data, size_t n)
{
    B.errors++;
    if (count_kind(why) <= REPORTS_PER_KIND)
        fprintf(stderr, "xmppload: %s: %s%s%.*s\n", c->bare, why, n ? ": " : "",
                (int)min_size(n, 200), n ? data : "");
}

static void
print_error_summary(void)
{
    for (int i = 0; i < MAX_KINDS && B.kinds[i].why; i++)
        fprintf(stderr, "xmppload: %" PRIu64 " x %s\n", B.kinds[i].n, B.kinds[i].why);
}

/* Setup must work completely; during a login run failures are just counted. */
static int
failure_is_fatal(void)
{
    if (B.o.mode == M_LOGIN || B.phase >= PH_CLOSING)
        return 0;
    return B.phase == PH_SETUP || B.o.mode == M_REGISTER;
}

/* ---- connections: sockets and TLS ------------------------------------------------------------ */

static void
conn_close(struct conn *c)
{
    if (c->fd < 0)
        return;
    ev_io_stop(B.loop, &c->rio);
    ev_io_stop(B.loop, &c->wio);
    if (c->tls)
        gnutls_deinit(c->tls);
    c->tls = NULL;
    close(c->fd);
    c->fd = -1;
    buf_free(&c->in);
    buf_free(&c->out);
    free(c->scram);
    c->scram = NULL;
    c->st = CS_IDLE;
    B.nopen--;
    if (c->in_flight)
        B.logging_in--;
    c->in_flight = 0;
}

/* The end the server asked for or answered: say goodbye to TLS, then close. */
static void
conn_close_clean(struct conn *c)
{
    if (c->tls)
        gnutls_bye(c->tls, GNUTLS_SHUT_WR); /* one try; a full socket just skips it */
    conn_close(c);
}

/* Always returns -1, so handlers can `return conn_fail(...)`. */
static int
conn_fail(struct conn *c, const char *why, const char *data, size_t n)
{
    if (failure_is_fatal())
        die_conn(c, why, data, n);
    count_error(c, why, data, n);
    conn_close(c);
    return -1;
}

static void
mark_dirty(struct conn *c)
{
    if (!c->dirty) {
        c->dirty = 1;
        B.dirty[B.ndirty++] = c;
    }
}

static void
conn_send(struct conn *c, const char *s)
{
    buf_append(&c->out, s, strlen(s));
    mark_dirty(c);
}

__attribute__((format(printf, 2, 3))) static void
conn_sendf(struct conn *c, const char *fmt, ...)
{
    va_list ap;
    buf_reserve(&c->out, 256);
    va_start(ap, fmt);
    buf_vprintf(&c->out, fmt, ap);
    va_end(ap);
    mark_dirty(c);
}

static ssize_t
tls_push(gnutls_transport_ptr_t p, const void *data, size_t n)
{
    struct conn *c = p;
    ssize_t r = send(c->fd, data, n, MSG_NOSIGNAL);
    if (r < 0)
        gnutls_transport_set_errno(c->tls, errno);
    return r;
}

static ssize_t
tls_pull(gnutls_transport_ptr_t p, void *data, size_t n)
{
    struct conn *c = p;
    ssize_t r = recv(c->fd, data, n, 0);
    if (r < 0)
        gnutls_transport_set_errno(c->tls, errno);
    return r;
}

/* GnuTLS asks this only with timeouts set; we never block, so just look. */
static int
tls_pull_timeout(gnutls_transport_ptr_t p, unsigned int ms)
{
    struct conn *c = p;
    struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
    (void)ms;
    return poll(&pfd, 1, 0);
}

enum { IO_AGAIN = -1, IO_ERROR = -2 };

/* >0 bytes read, 0 at end of stream, IO_AGAIN, or IO_ERROR with *why set. */
static ssize_t
read_some(struct conn *c, char *p, size_t n, const char **why)
{
    ssize_t r;
    if (!c->tls) {
        r = recv(c->fd, p, n, 0);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return IO_AGAIN;
        *why = r < 0 ? strerror(errno) : "";
        return r < 0 ? IO_ERROR : r;
    }
    r = gnutls_record_recv(c->tls, p, n);
    if (r >= 0)
        return r;
    if (r == GNUTLS_E_PREMATURE_TERMINATION)
        return 0;
    if (!gnutls_error_is_fatal((int)r)) /* EAGAIN, or an alert or ticket we can ignore */
        return IO_AGAIN;
    *why = gnutls_strerror((int)r);
    return IO_ERROR;
}

static ssize_t
write_some(struct conn *c, const char *p, size_t n, const char **why)
{
    ssize_t r;
    if (!c->tls) {
        r = send(c->fd, p, n, MSG_NOSIGNAL);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return IO_AGAIN;
        *why = strerror(errno);
        return r < 0 ? IO_ERROR : r;
    }
    r = gnutls_record_send(c->tls, p, n);
    if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
        c->tls_retry = n; /* GnuTLS wants the same call again */
        return IO_AGAIN;
    }
    c->tls_retry = 0;
    *why = r < 0 ? gnutls_strerror((int)r) : "";
    return r < 0 ? IO_ERROR : r;
}

/* Writes what is buffered; the write watcher runs while anything is left. */
static void
conn_flush(struct conn *c)
{
    const char *why = "";
    if (c->fd < 0 || c->st == CS_CONNECTING || c->st == CS_HANDSHAKE)
        return;
    for (int i = 0; i < WRITE_ROUNDS && c->out.off < c->out.len; i++) {
        size_t n = c->tls_retry ? c->tls_retry : min_size(c->out.len - c->out.off, TLS_RECORD);
        ssize_t r = write_some(c, c->out.data + c->out.off, n, &why);
        if (r == IO_AGAIN)
            break;
        if (r < 0) {
            conn_fail(c, why, NULL, 0);
            return;
        }
        c->out.off += (size_t)r;
    }
    if (c->out.off < c->out.len) {
        ev_io_start(B.loop, &c->wio);
        return;
    }
    ev_io_stop(B.loop, &c->wio);
    buf_release_if_empty(&c->out);
}

static void
flush_dirty(void)
{
    for (long i = 0; i < B.ndirty; i++) {
        struct conn *c = B.dirty[i];
        c->dirty = 0;
        conn_flush(c);
    }
    B.ndirty = 0;
}

static void
send_stream_open(struct conn *c)
{
    conn_sendf(c, STREAM_OPEN, B.o.domain);
}

static void
tls_ready(struct conn *c)
{
    ev_io_stop(B.loop, &c->wio);
    c->st = CS_TLS_STREAM;
    send_stream_open(c);
    if (gnutls_record_check_pending(c->tls))
        ev_feed_event(B.loop, &c->rio, EV_READ);
}

static void
tls_step(struct conn *c)
{
    int r = GNUTLS_E_AGAIN;
    for (int i = 0; i < 8; i++) { /* warning alerts are retried, a few times */
        r = gnutls_handshake(c->tls);
        if (r == 0 || r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED || gnutls_error_is_fatal(r))
            break;
    }
    if (r == 0) {
        tls_ready(c);
    } else if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED || !gnutls_error_is_fatal(r)) {
        if (gnutls_record_get_direction(c->tls))
            ev_io_start(B.loop, &c->wio);
        else
            ev_io_stop(B.loop, &c->wio);
    } else {
        conn_fail(c, gnutls_strerror(r), NULL, 0);
    }
}

/* After <proceed/>: no certificate check (a benchmark), SNI set to the domain. */
static int
tls_start(struct conn *c)
{
    int r = gnutls_init(&c->tls, GNUTLS_CLIENT | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL);
    if (r < 0)
        return conn_fail(c, gnutls_strerror(r), NULL, 0);
    if ((r = gnutls_set_default_priority(c->tls)) < 0 ||
        (r = gnutls_credentials_set(c->tls, GNUTLS_CRD_CERTIFICATE, B.cred)) < 0 ||
        (r = gnutls_server_name_set(c->tls, GNUTLS_NAME_DNS, B.o.domain, strlen(B.o.domain))) < 0)
        return conn_fail(c, gnutls_strerror(r), NULL, 0);
    gnutls_transport_set_ptr(c->tls, c);
    gnutls_transport_set_push_function(c->tls, tls_push);
    gnutls_transport_set_pull_function(c->tls, tls_pull);
    gnutls_transport_set_pull_timeout_function(c->tls, tls_pull_timeout);
    gnutls_handshake_set_timeout(c->tls, 0);
    c->in.len = 0; /* nothing sent in the clear after <proceed/> counts */
    scan_reset(&c->sc);
    c->st = CS_HANDSHAKE;
    tls_step(c);
    return -1; /* stop reading the plaintext buffer */
}

/* ---- SASL: PLAIN (RFC 4616) and SCRAM (RFC 5802, RFC 7677) ---------------------------------- */

static int
b64_encode(const void *data, size_t n, char *out, size_t sz)
{
    gnutls_datum_t in = {(unsigned char *)data, (unsigned int)n}, res;
    int len = -1;
    if (gnutls_base64_encode2(&in, &res) < 0)
        return -1;
    if (res.size < sz)
        len = copy_out(out, sz, (const char *)res.data, res.size);
    gnutls_free(res.data);
    return len;
}

/* Decodes into out and NUL-terminates; -1 if invalid or too long. */
static int
b64_decode(const char *s, char *out, size_t sz)
{
    gnutls_datum_t in = {(unsigned char *)s, (unsigned int)strlen(s)}, res;
    int len = -1;
    if (gnutls_base64_decode2(&in, &res) < 0)
        return -1;
    if (res.size < sz)
        len = copy_out(out, sz, (const char *)res.data, res.size);
    gnutls_free(res.data);
    return len;
}

static void
send_sasl(struct conn *c, const char *elem, const char *mech, const char *data, size_t n)
{
    char b64[1024];
    if (b64_encode(data, n, b64, sizeof(b64)) < 0)
        die("base64 encoding failed");
    if (mech)
        conn_sendf(c, "<%s xmlns='%s' mechanism='%s'>%s</%s>", elem, NS_SASL, mech, b64, elem);
    else
        conn_sendf(c, "<%s xmlns='%s'>%s</%s>", elem, NS_SASL, b64, elem);
}

static size_t
mech_hash_len(enum mech m)
{
    return m == MECH_SCRAM_SHA256 ? 32 : 20;
}

static gnutls_mac_algorithm_t
mech_mac(enum mech m)
{
    return m == MECH_SCRAM_SHA256 ? GNUTLS_MAC_SHA256 : GNUTLS_MAC_SHA1;
}

static void
sasl_plain(struct conn *c)
{
    char msg[512];
    int n = snprintf(msg, sizeof(msg), "%c%s%ld%c%s", 0, B.o.prefix, c->account, 0, B.o.password);
    send_sasl(c, "auth", "PLAIN", msg, (size_t)n);
}

static void
scram_first(struct conn *c, enum mech m)
{
    unsigned char raw[18];
    char first[256];
    struct scram *s = calloc(1, sizeof(*s));
    if (!s)
        die("out of memory");
    s->mech = m;
    gnutls_rnd(GNUTLS_RND_NONCE, raw, sizeof(raw));
    b64_encode(raw, sizeof(raw), s->nonce, sizeof(s->nonce));
    /* The prefix is checked to need no saslname escaping. */
    snprintf(s->cfb, sizeof(s->cfb), "n=%s%ld,r=%s", B.o.prefix, c->account, s->nonce);
    snprintf(first, sizeof(first), "n,,%s", s->cfb);
    c->scram = s;
    send_sasl(c, "auth", MECH_NAMES[m], first, strlen(first));
}

/* Value of attribute k in a SCRAM message "a=...,b=...". */
static int
scram_attr(const char *msg, char k, char *out, size_t sz)
{
    for (const char *p = msg; p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL)
        if (p[0] == k && p[1] == '=')
            return copy_out(out, sz, p + 2, strcspn(p + 2, ","));
    return -1;
}

static size_t
cache_hash(const char *key)
{
    size_t h = 2166136261u;
    for (; *key; key++)
        h = (h ^ (unsigned char)*key) * 16777619u;
    return h % B.cache_slots;
}

/* Hi(password, salt, i) of RFC 5802 2.2, i.e. PBKDF2, remembered per salt. */
static int
salted_password(enum mech m, const char *salt_b64, unsigned iter, unsigned char *sp)
{
    char key[sizeof(B.cache[0].key)], salt[256];
    int klen = snprintf(key, sizeof(key), "%d:%u:%s", (int)m, iter, salt_b64), slen;
    struct salted *e = klen < (int)sizeof(key) ? &B.cache[cache_hash(key)] : NULL;
    gnutls_datum_t pw = {(unsigned char *)B.o.password, (unsigned int)strlen(B.o.password)}, sd;
    if (e && strcmp(e->key, key) == 0) {
        memcpy(sp, e->sp, mech_hash_len(m));
        return 0;
    }
    if ((slen = b64_decode(salt_b64, salt, sizeof(salt))) <= 0)
        return -1;
    sd.data = (unsigned char *)salt;
    sd.size = (unsigned int)slen;
    if (gnutls_pbkdf2(mech_mac(m), &pw, &sd, iter, sp, mech_hash_len(m)) < 0)
        return -1;
    if (e) {
        memcpy(e->key, key, (size_t)klen + 1);
        memcpy(e->sp, sp, mech_hash_len(m));
    }
    return 0;
}

/* RFC 5802 3: ClientProof = ClientKey XOR HMAC(H(ClientKey), AuthMessage),
 * ServerSignature = HMAC(HMAC(SaltedPassword, "Server Key"), AuthMessage). */
static void
scram_proofs(struct scram *s, const unsigned char *sp, const char *auth, unsigned char *proof)
{
    size_t h = mech_hash_len(s->mech);
    gnutls_mac_algorithm_t mac = mech_mac(s->mech);
    unsigned char ck[32], stored[32], sig[32], sk[32];
    gnutls_hmac_fast(mac, sp, h, "Client Key", 10, ck);
    gnutls_hash_fast(s->mech == MECH_SCRAM_SHA256 ? GNUTLS_DIG_SHA256 : GNUTLS_DIG_SHA1, ck, h,
                     stored);
    gnutls_hmac_fast(mac, stored, h, auth, strlen(auth), sig);
    for (size_t i = 0; i < h; i++)
        proof[i] = ck[i] ^ sig[i];
    gnutls_hmac_fast(mac, sp, h, "Server Key", 10, sk);
    gnutls_hmac_fast(mac, sk, h, auth, strlen(auth), s->server_sig);
}

/* Parses server-first-message, sends client-final-message. */
static int
scram_final(struct conn *c, const struct el *el, const char *sf)
{
    struct scram *s = c->scram;
    char nonce[256], salt[256], iter_s[16], cfwp[320], auth[1400], proof_b64[64], msg[512];
    unsigned char sp[32], proof[32];
    unsigned long iter;
    if (scram_attr(sf, 'r', nonce, sizeof(nonce)) < 0 ||
        scram_attr(sf, 's', salt, sizeof(salt)) < 0 ||
        scram_attr(sf, 'i', iter_s, sizeof(iter_s)) < 0)
        return conn_fail(c, "malformed SCRAM challenge", el->s, el->n);
    iter = strtoul(iter_s, NULL, 10);
    if (strncmp(nonce, s->nonce, strlen(s->nonce)) != 0 || iter == 0 || iter > SCRAM_MAX_ITER)
        return conn_fail(c, "unacceptable SCRAM challenge", sf, strlen(sf));
    if (salted_password(s->mech, salt, (unsigned)iter, sp) < 0)
        return conn_fail(c, "SCRAM salt not usable", sf, strlen(sf));
    snprintf(cfwp, sizeof(cfwp), "c=biws,r=%s", nonce);
    snprintf(auth, sizeof(auth), "%s,%s,%s", s->cfb, sf, cfwp);
    scram_proofs(s, sp, auth, proof);
    b64_encode(proof, mech_hash_len(s->mech), proof_b64, sizeof(proof_b64));
    snprintf(msg, sizeof(msg), "%s,p=%s", cfwp, proof_b64);
    send_sasl(c, "response", NULL, msg, strlen(msg));
    s->final_sent = 1;
    return 0;
}

/* server-final-message "v=<ServerSignature>": the server knew the password. */
static int
scram_verify(struct conn *c, const char *sfinal)
{
    struct scram *s = c->scram;
    char v[64], sig[64];
    if (scram_attr(sfinal, 'v', v, sizeof(v)) < 0 || b64_decode(v, sig, sizeof(sig)) < 0 ||
        memcmp(sig, s->server_sig, mech_hash_len(s->mech)) != 0)
        return -1;
    s->verified = 1;
    return 0;
}

/* Base64 text of a SASL element, decoded and NUL-terminated. */
static int
sasl_payload(const struct el *el, char *out, size_t sz)
{
    char b64[1024];
    if (el_text(el, NULL, b64, sizeof(b64)) < 0)
        return -1;
    if (b64[0] == '\0' || strcmp(b64, "=") == 0)
        return copy_out(out, sz, "", 0);
    return b64_decode(b64, out, sz);
}

static int
on_challenge(struct conn *c, const struct el *el)
{
    char msg[768];
    if (!c->scram || sasl_payload(el, msg, sizeof(msg)) < 0)
        return conn_fail(c, "unexpected SASL challenge", el->s, el->n);
    if (!c->scram->final_sent)
        return scram_final(c, el, msg);
    if (scram_verify(c, msg) < 0) /* some servers send v= as a last challenge */
        return conn_fail(c, "SCRAM server signature is wrong", el->s, el->n);
    conn_sendf(c, "<response xmlns='%s'/>", NS_SASL);
    return 0;
}

static int
on_sasl_success(struct conn *c, const struct el *el)
{
    char msg[768];
    if (c->scram && !c->scram->verified &&
        (sasl_payload(el, msg, sizeof(msg)) < 0 || scram_verify(c, msg) < 0))
        return conn_fail(c, "SCRAM server signature missing or wrong", el->s, el->n);
    free(c->scram);
    c->scram = NULL;
    c->st = CS_AUTH_STREAM; /* RFC 6120 6.4.6: a new stream, same scanner position */
    send_stream_open(c);
    return 0;
}

static int
on_sasl(struct conn *c, const struct el *el)
{
    char cond[128];
    if (el_is(el, "challenge"))
        return on_challenge(c, el);
    if (el_is(el, "success"))
        return on_sasl_success(c, el);
    if (el_is(el, "failure")) { /* wrong accounts or password: no run can work */
        el_first_child(el, cond, sizeof(cond));
        die_conn(c, "SASL failure", cond[0] ? cond : el->s, cond[0] ? strlen(cond) : el->n);
    }
    return conn_fail(c, "unexpected element during SASL", el->s, el->n);
}

static enum mech
pick_mech(const struct el *el)
{
    static const char *const tags[MECH_COUNT] = {NULL, ">PLAIN<", ">SCRAM-SHA-1<",
                                                 ">SCRAM-SHA-256<"};
    if (B.o.mech != MECH_AUTO)
        return el_has(el, tags[B.o.mech]) ? B.o.mech : MECH_AUTO;
    for (int m = MECH_SCRAM_SHA256; m > MECH_AUTO; m--)
        if (el_has(el, tags[m]))
            return (enum mech)m;
    return MECH_AUTO;
}

static int
sasl_start(struct conn *c, const struct el *el)
{
    enum mech m = pick_mech(el);
    if (m == MECH_AUTO) /* as hopeless as a wrong password: stop */
        die_conn(c,
                 B.o.mech ? "the server does not offer the chosen SASL mechanism"
                          : "the server offers no mechanism we know",
                 el->s, el->n);
    if (m == MECH_PLAIN)
        sasl_plain(c);
    else
        scram_first(c, m);
    c->st = CS_SASL;
    return 0;
}

/* ---- login steps ------------------------------------------------------------------------------
 */

static void
close_stream(struct conn *c)
{
    conn_send(c, "</stream:stream>");
    c->st = CS_CLOSING;
}

static int
on_plain_features(struct conn *c, const struct el *el)
{
    if (!el_is(el, "features"))
        return conn_fail(c, "expected stream features", el->s, el->n);
    if (!el_find(el, "starttls"))
        die_conn(c, "the server offers no STARTTLS", el->s, el->n);
    conn_send(c, "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
    c->st = CS_STARTTLS;
    return 0;
}

static int
on_starttls_reply(struct conn *c, const struct el *el)
{
    if (!el_is(el, "proceed"))
        return conn_fail(c, "STARTTLS refused", el->s, el->n);
    return tls_start(c);
}

/* XEP-0077 3.1, straight to the submission: every server we drive takes it. */
static int
send_register(struct conn *c)
{
    conn_sendf(c,
               "<iq type='set' id='reg'><query xmlns='jabber:iq:register'><username>%s%ld"
               "</username><password>%s</password></query></iq>",
               B.o.prefix, c->account, B.password_xml);
    c->st = CS_REGISTER;
    return 0;
}

static int
on_tls_features(struct conn *c, const struct el *el)
{
    if (!el_is(el, "features"))
        return conn_fail(c, "expected stream features", el->s, el->n);
    return B.o.mode == M_REGISTER ? send_register(c) : sasl_start(c, el);
}

/* A taken username is fine: accounts from an earlier run are reused. */
static int
on_register_reply(struct conn *c, const struct el *el)
{
    char type[16];
    if (!el_is(el, "iq"))
        return 0;
    el_attr(el, "type", type, sizeof(type));
    if (strcmp(type, "result") == 0)
        B.created++;
    else if (strcmp(type, "error") == 0 && el_find(el, "conflict"))
        B.existed++;
    else
        return conn_fail(c, "registration failed", el->s, el->n);
    B.ndone++;
    close_stream(c);
    return 0;
}

static int
on_auth_features(struct conn *c, const struct el *el)
{
    if (!el_is(el, "features"))
        return conn_fail(c, "expected stream features", el->s, el->n);
    if (!el_find(el, "bind"))
        return conn_fail(c, "the server offers no resource binding", el->s, el->n);
    c->need_session = session_required(el);
    conn_sendf(c,
               "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
               "<resource>xmppload%lu</resource></bind></iq>",
               c->resource);
    c->st = CS_BIND;
    return 0;
}

static int
logged_in(struct conn *c)
{
    if (B.o.mode == M_LOGIN) {
        if (!B.run_over) {
            B.logins++;
            hist_add(&B.lat, (mono_ns() - c->t_begin) / 1000);
        }
        close_stream(c);
        return 0;
    }
    /* The ping is answered after the presence is handled: then we are surely
     * available, and messages to our bare JID reach us. */
    conn_sendf(c, "<presence/><iq type='get' id='sync' to='%s'><ping xmlns='urn:xmpp:ping'/></iq>",
               B.o.domain);
    c->st = CS_SYNC;
    return 0;
}

static int
bound(struct conn *c)
{
    if (!c->need_session)
        return logged_in(c);
    conn_send(c, "<iq type='set' id='sess'><session "
                 "xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>");
    c->st = CS_SESSION;
    return 0;
}

static void
mark_ready(struct conn *c)
{
    c->st = CS_READY;
    if (c->in_flight)
        B.logging_in--;
    c->in_flight = 0;
    B.nready++;
}

/* ---- stanzas once logged in ----------------------------------------------------------------- */

static struct conn *
partner(const struct conn *c)
{
    return &B.conns[c->slot ^ 1];
}

static int
pair_mode(void)
{
    return B.o.mode == M_ROSTER || B.o.mode == M_THROUGHPUT || B.o.mode == M_RATE;
}

static int
from_partner(const struct conn *c, const char *from)
{
    const char *bare;
    size_t n;
    if (!pair_mode())
        return 0;
    bare = partner(c)->bare;
    n = strlen(bare);
    return strncasecmp(from, bare, n) == 0 && (from[n] == '\0' || from[n] == '/');
}

static void
check_roster_done(struct conn *c)
{
    if (B.o.mode == M_ROSTER && c->roster_ok && c->partner_seen && !c->roster_done) {
        c->roster_done = 1;
        B.ndone++;
    }
}

static void
send_message(struct conn *s)
{
    char head[64];
    int hl = snprintf(head, sizeof(head), "R%016" PRIx64 " T%" PRIu64 " ", B.run_id, mono_ns());
    int pad = B.o.body_size > hl ? (int)B.o.body_size - hl : 0;
    conn_sendf(s, "<message to='%s' type='chat' id='m%" PRIu64 "'><body>%s%.*s</body></message>",
               partner(s)->bare, s->sent, head, pad, B.padding);
    s->sent++;
    B.total_sent++;
    if (B.measuring)
        B.sent++;
}

/* Throughput mode: keep the window of messages in flight to the partner full. */
static void
fill_window(struct conn *s)
{
    while (B.sending && s->st == CS_READY && s->sent - partner(s)->received < (uint64_t)B.o.window)
        send_message(s);
}

static void
message_received(struct conn *c, uint64_t t_sent)
{
    uint64_t now = mono_ns();
    c->received++;
    B.total_received++;
    if (B.measuring) {
        B.delivered++;
        hist_add(&B.lat, now > t_sent ? (now - t_sent) / 1000 : 0);
    }
    if (B.o.mode == M_THROUGHPUT)
        fill_window(partner(c));
}

static int
on_message(struct conn *c, const struct el *el)
{
    char type[16] = "", body[64];
    uint64_t run, t;
    el_attr(el, "type", type, sizeof(type));
    if (strcmp(type, "error") == 0) {
        if (B.phase < PH_CLOSING) /* later, it is one we left with in flight */
            count_error(c, "message bounced", el->s, el->n);
        return 0;
    }
    if (el_text(el, "body", body, sizeof(body)) < 0)
        return 0; /* chat states, receipts, ... */
    if (sscanf(body, "R%" SCNx64 " T%" SCNu64, &run, &t) != 2 || run != B.run_id ||
        el_find(el, "delay")) {
        B.stale++; /* left over from another run, e.g. stored offline */
        return 0;
    }
    message_received(c, t);
    return 0;
}

static int
on_presence(struct conn *c, const struct el *el)
{
    char type[32] = "", from[256] = "";
    el_attr(el, "type", type, sizeof(type));
    el_attr(el, "from", from, sizeof(from));
    if (strcmp(type, "subscribe") == 0) {
        char q = quote_for(from);
        from[strcspn(from, "/")] = '\0';
        conn_sendf(c, "<presence to=%c%s%c type='subscribed'/>", q, from, q);
    } else if (strcmp(type, "error") == 0) {
        count_error(c, "presence error", el->s, el->n);
    } else if (type[0] == '\0' && from_partner(c, from)) {
        c->partner_seen = 1;
        check_roster_done(c);
    }
    return 0;
}

/* Pings and roster pushes get a result, any other request an error, so the
 * server never waits on us (RFC 6120 8.2.3). */
static int
answer_iq(struct conn *c, const struct el *el, const char *type, const char *id)
{
    char from[256] = "", to[300] = "";
    int ok =
        el_has(el, "urn:xmpp:ping") || (strcmp(type, "set") == 0 && el_has(el, "jabber:iq:roster"));
    char qi = quote_for(id);
    if (el_attr(el, "from", from, sizeof(from)) > 0)
        snprintf(to, sizeof(to), " to=%c%s%c", quote_for(from), from, quote_for(from));
    if (ok)
        conn_sendf(c, "<iq type='result' id=%c%s%c%s/>", qi, id, qi, to);
    else
        conn_sendf(c,
                   "<iq type='error' id=%c%s%c%s><error type='cancel'><service-unavailable "
                   "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
                   qi, id, qi, to);
    return 0;
}

static int
on_iq_reply(struct conn *c, const struct el *el, const char *type, const char *id)
{
    int ok = strcmp(type, "result") == 0;
    if (strcmp(id, "bind") == 0 && c->st == CS_BIND)
        return ok ? bound(c) : conn_fail(c, "resource binding failed", el->s, el->n);
    if (strcmp(id, "sess") == 0 && c->st == CS_SESSION)
        return ok ? logged_in(c) : conn_fail(c, "session establishment failed", el->s, el->n);
    if (strcmp(id, "sync") == 0 && c->st == CS_SYNC) {
        mark_ready(c); /* a result or an error: either way the presence went first */
        return 0;
    }
    if (!ok) {
        count_error(c, "iq error", el->s, el->n);
    } else if (strcmp(id, "roster") == 0) {
        c->roster_ok = 1;
        check_roster_done(c);
    }
    return 0;
}

static int
on_iq(struct conn *c, const struct el *el)
{
    char type[16] = "", id[128] = "";
    el_attr(el, "type", type, sizeof(type));
    el_attr(el, "id", id, sizeof(id));
    if (strcmp(type, "get") == 0 || strcmp(type, "set") == 0)
        return answer_iq(c, el, type, id);
    return on_iq_reply(c, el, type, id);
}

static int
on_stanza(struct conn *c, const struct el *el)
{
    if (el_is(el, "message"))
        return on_message(c, el);
    if (el_is(el, "presence"))
        return on_presence(c, el);
    if (el_is(el, "iq"))
        return on_iq(c, el);
    return 0;
}

static int
on_element(struct conn *c, const struct el *el)
{
    if (el_is(el, "error")) /* a top-level <stream:error/> */
        return conn_fail(c, "stream error", el->s, el->n);
    switch (c->st) {
    case CS_STREAM:
        return on_plain_features(c, el);
    case CS_STARTTLS:
        return on_starttls_reply(c, el);
    case CS_TLS_STREAM:
        return on_tls_features(c, el);
    case CS_REGISTER:
        return on_register_reply(c, el);
    case CS_SASL:
        return on_sasl(c, el);
    case CS_AUTH_STREAM:
        return on_auth_features(c, el);
    default:
        return on_stanza(c, el);
    }
}

/* ---- input --------------------------------------------------------------------------------- */

static int
on_stream_closed(struct conn *c)
{
    if (c->st != CS_CLOSING)
        return conn_fail(c, "the server closed the stream", NULL, 0);
    conn_close_clean(c);
    return -1;
}

static int
on_scan_event(struct conn *c, enum scan_event e, const struct span_out *sp)
{
    struct el el = {c->in.data + sp->off, sp->len};
    switch (e) {
    case SE_ELEMENT:
        return on_element(c, &el);
    case SE_STREAM_CLOSE:
        return on_stream_closed(c);
    case SE_ERROR:
        return conn_fail(c, "elements nested too deep", c->in.data, c->in.len);
    default:
        return 0; /* the server's stream header */
    }
}

/* Handles every complete element in the buffer; -1 once the connection is
 * closed or its buffer must not be read further (TLS starting). */
static int
process_input(struct conn *c)
{
    struct span_out sp = {0, 0};
    enum scan_event e;
    size_t keep;
    while ((e = scan_next(&c->sc, c->in.data, c->in.len, &sp)) != SE_MORE)
        if (on_scan_event(c, e, &sp) < 0)
            return -1;
    keep = scan_keep(&c->sc);
    if (c->in.len - keep > MAX_ELEMENT)
        return conn_fail(c, "element too large", c->in.data + keep, c->in.len - keep);
    memmove(c->in.data, c->in.data + keep, c->in.len - keep);
    c->in.len -= keep;
    scan_shift(&c->sc, keep);
    return 0;
}

static void
conn_lost(struct conn *c, const char *why)
{
    char msg[160];
    if (c->st == CS_CLOSING) {
        conn_close(c);
        return;
    }
    snprintf(msg, sizeof(msg), "disconnected%s%s%s", why[0] ? " (" : "", why, why[0] ? ")" : "");
    conn_fail(c, msg, c->in.data, c->in.len);
}

static void
conn_read(struct conn *c)
{
    size_t total = 0;
    const char *why = "";
    while (total < READ_BUDGET) {
        ssize_t r = read_some(c, B.scratch, sizeof(B.scratch), &why);
        if (r == IO_AGAIN)
            break;
        if (r == 0 || r == IO_ERROR) {
            conn_lost(c, why);
            return;
        }
        /* Copied, so a client's buffer only grows as big as what it keeps. */
        buf_append(&c->in, B.scratch, (size_t)r);
        total += (size_t)r;
        if (process_input(c) < 0)
            return;
    }
    if (total >= READ_BUDGET) /* more may wait, in the socket or inside GnuTLS */
        ev_feed_event(B.loop, &c->rio, EV_READ);
    buf_release_if_empty(&c->in);
}

static void
connect_failed(struct conn *c, int err)
{
    char msg[160];
    snprintf(msg, sizeof(msg), "connect to %s port %ld: %s", B.o.host, B.o.port, strerror(err));
    conn_fail(c, msg, NULL, 0);
}

static void
conn_connected(struct conn *c)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err) {
        connect_failed(c, err);
        return;
    }
    ev_io_stop(B.loop, &c->wio);
    ev_io_start(B.loop, &c->rio);
    c->st = CS_STREAM;
    send_stream_open(c);
}

static void
read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct conn *c = w->data;
    (void)loop;
    (void)revents;
    if (c->st == CS_HANDSHAKE)
        tls_step(c);
    else
        conn_read(c);
}

static void
write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct conn *c = w->data;
    (void)loop;
    (void)revents;
    if (c->st == CS_CONNECTING)
        conn_connected(c);
    else if (c->st == CS_HANDSHAKE)
        tls_step(c);
    else
        conn_flush(c);
}

static void
conn_reset(struct conn *c, int fd, long account)
{
    c->fd = fd;
    c->account = account;
    snprintf(c->bare, sizeof(c->bare), "%s%ld@%s", B.o.prefix, account, B.o.domain);
    ev_io_init(&c->rio, read_cb, fd, EV_READ);
    ev_io_init(&c->wio, write_cb, fd, EV_WRITE);
    c->rio.data = c->wio.data = c;
    scan_reset(&c->sc);
    c->st = CS_CONNECTING;
    c->tls_retry = 0;
    c->sent = c->received = 0;
    c->need_session = c->roster_ok = c->partner_seen = c->roster_done = 0;
    c->resource = ++B.launches;
    c->t_begin = mono_ns();
    c->in_flight = 1;
    B.logging_in++;
    B.nopen++;
}

static void
conn_start(struct conn *c, long account)
{
    int one = 1, fd = socket(B.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(c->bare, sizeof(c->bare), "%s%ld@%s", B.o.prefix, account, B.o.domain);
        conn_fail(c, "socket", strerror(errno), strlen(strerror(errno)));
        return;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    conn_reset(c, fd, account);
    if (connect(fd, (struct sockaddr *)&B.addr, B.addr_len) < 0 && errno != EINPROGRESS) {
        connect_failed(c, errno);
        return;
    }
    ev_io_start(B.loop, &c->wio);
}

/* ---- phases --------------------------------------------------------------------------------- */

static void
arm_phase_timer(double after)
{
    ev_timer_stop(B.loop, &B.phase_w);
    ev_timer_set(&B.phase_w, after, 0.);
    ev_timer_start(B.loop, &B.phase_w);
}

/* Login mode reuses its C slots, the other modes give each account one. */
static void
launch_logins(void)
{
    if (B.o.mode == M_LOGIN) {
        if (B.phase != PH_RUN || B.run_over)
            return;
        for (long i = 0; i < B.nconns; i++)
            if (B.conns[i].fd < 0)
                conn_start(&B.conns[i], B.next++ % B.nclients);
        return;
    }
    while (B.phase <= PH_RUN && B.logging_in < B.o.concurrency && B.next < B.nclients) {
        conn_start(&B.conns[B.next], B.next);
        B.next++;
    }
}

static void
begin_measure(void)
{
    memset(&B.lat, 0, sizeof(B.lat));
    B.sent = B.delivered = B.logins = 0;
    B.measuring = B.measured = 1;
    B.t_measure = mono_s();
    arm_phase_timer(B.o.duration);
}

static void
end_measure(void)
{
    B.t_measure_end = mono_s();
    if (!B.measured) /* ended before the warmup was over */
        B.t_measure = B.t_measure_end;
    B.measuring = B.sending = 0;
    B.run_over = 1;
    ev_timer_stop(B.loop, &B.tick_w);
}

static void
rate_send_one(void)
{
    struct conn *s = &B.conns[B.rr++ % B.nclients];
    if (s->st != CS_READY || s->out.len - s->out.off > MAX_BACKLOG)
        B.skipped += B.measuring;
    else
        send_message(s);
}

/* Sends what is due since the start at R per second, at most R/10 at once so
 * that catching up after a stall does not freeze the loop. */
static void
tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    uint64_t due = (uint64_t)((mono_s() - B.rate_t0) * B.o.rate), n;
    uint64_t cap = (uint64_t)(B.o.rate / 10) + 1;
    (void)loop;
    (void)w;
    (void)revents;
    if (!B.sending || due <= B.rate_due)
        return;
    n = due - B.rate_due < cap ? due - B.rate_due : cap;
    B.rate_due += n;
    while (n--)
        rate_send_one();
}

static void
start_roster(void)
{
    for (long i = 0; i < B.nclients; i++) {
        struct conn *c = &B.conns[i];
        conn_sendf(c,
                   "<iq type='set' id='roster'><query xmlns='jabber:iq:roster'><item jid='%s'/>"
                   "</query></iq><presence to='%s' type='subscribe'/>",
                   partner(c)->bare, partner(c)->bare);
    }
}

static void
start_run(void)
{
    B.phase = PH_RUN;
    B.t_run = mono_s();
    switch (B.o.mode) {
    case M_ROSTER:
        start_roster();
        break;
    case M_THROUGHPUT:
    case M_RATE:
        B.sending = 1;
        B.rate_t0 = B.t_run;
        if (B.o.mode == M_RATE)
            ev_timer_start(B.loop, &B.tick_w);
        for (long i = 0; B.o.mode == M_THROUGHPUT && i < B.nclients; i++)
            fill_window(&B.conns[i]);
        arm_phase_timer(B.o.warmup);
        break;
    case M_IDLE:
        fprintf(stderr, "READY %ld\n", B.nready);
        fflush(stderr);
        arm_phase_timer(B.o.hold);
        break;
    default: /* register and login start running at once */
        break;
    }
}

static void
start_closing(void)
{
    B.phase = PH_CLOSING;
    B.sending = 0;
    ev_timer_stop(B.loop, &B.timeout_w);
    ev_timer_stop(B.loop, &B.tick_w);
    for (long i = 0; i < B.nconns; i++) {
        struct conn *c = &B.conns[i];
        if (c->st >= CS_READY && c->st != CS_CLOSING)
            close_stream(c);
        else if (c->st != CS_CLOSING)
            conn_close(c);
    }
    arm_phase_timer(CLOSE_GRACE);
}

static int
run_complete(void)
{
    switch (B.o.mode) {
    case M_REGISTER:
    case M_ROSTER:
        return B.ndone == B.nclients || B.nopen == 0;
    case M_LOGIN:
        return B.run_over && B.logging_in == 0;
    default:
        return B.run_over || B.nopen == 0; /* or the server dropped everyone */
    }
}

static void
end_run(void)
{
    if (!B.run_over)
        end_measure();
    if (B.o.mode == M_THROUGHPUT || B.o.mode == M_RATE) {
        B.phase = PH_DRAIN;
        arm_phase_timer(DRAIN_GRACE);
    } else {
        start_closing();
    }
}

/* Checked once per loop turn: is the current phase over? */
static void
advance_phase(void)
{
    switch (B.phase) {
    case PH_SETUP:
        if (B.nready == B.nclients) {
            B.t_setup = mono_s();
            start_run();
        }
        break;
    case PH_RUN:
        if (run_complete())
            end_run();
        break;
    case PH_DRAIN:
        if (B.total_received >= B.total_sent)
            start_closing();
        break;
    case PH_CLOSING:
        if (B.nopen == 0) {
            B.phase = PH_DONE;
            ev_break(B.loop, EVBREAK_ALL);
        }
        break;
    default:
        break;
    }
}

static void
prepare_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    flush_dirty();
    launch_logins();
    advance_phase();
    flush_dirty();
}

static void
phase_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    if (B.phase == PH_RUN && (B.o.mode == M_THROUGHPUT || B.o.mode == M_RATE) && !B.measured)
        begin_measure(); /* the warmup is over */
    else if (B.phase == PH_RUN)
        end_measure();
    else if (B.phase == PH_DRAIN)
        start_closing();
    else if (B.phase == PH_CLOSING)
        for (long i = 0; i < B.nconns; i++) /* grace is over: the rest just goes */
            conn_close(&B.conns[i]);
}

/* Where the run stood, for the timeout message. */
static void
print_progress(void)
{
    if (B.phase == PH_SETUP)
        fprintf(stderr, "%ld of %ld clients up, %ld logins in progress", B.nready, B.nclients,
                B.logging_in);
    else if (B.o.mode == M_LOGIN)
        fprintf(stderr, "%" PRIu64 " logins done, %ld in progress", B.logins, B.logging_in);
    else if (B.o.mode == M_REGISTER || B.o.mode == M_ROSTER)
        fprintf(stderr, "%ld of %ld accounts done", B.ndone, B.nclients);
    else
        fprintf(stderr, "%" PRIu64 " messages delivered", B.total_received);
}

static void
timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    fprintf(stderr, "xmppload: timeout after %.0f s while %s: ", B.o.timeout,
            B.phase == PH_SETUP ? "setting up" : "running");
    print_progress();
    fprintf(stderr, ", %" PRIu64 " errors\n", B.errors);
    print_error_summary();
    exit(2);
}

/* ---- report -------------------------------------------------------------------------------- */

static void
print_latency(void)
{
    printf(",\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"p999_ms\":%.3f,\"max_ms\":%.3f",
           hist_quantile_ms(&B.lat, 0.50), hist_quantile_ms(&B.lat, 0.99),
           hist_quantile_ms(&B.lat, 0.999), (double)B.lat.max / 1000.0);
}

static void
print_messages(double secs)
{
    printf(",\"body_size\":%ld,\"sent\":%" PRIu64 ",\"delivered\":%" PRIu64 ",\"seconds\":%.3f"
           ",\"msgs_per_s\":%.1f",
           B.o.body_size, B.sent, B.delivered, secs, secs > 0 ? (double)B.delivered / secs : 0.0);
    print_latency();
    printf(",\"stale\":%" PRIu64, B.stale);
}

static void
print_report(void)
{
    double setup = B.t_setup - B.t_start, run = B.t_measure_end - B.t_run;
    double secs = B.t_measure_end - B.t_measure;
    printf("{\"mode\":\"%s\"", MODE_NAMES[B.o.mode]);
    if (pair_mode())
        printf(",\"pairs\":%ld,\"clients\":%ld", B.o.pairs, B.nclients);
    if (B.o.mode == M_THROUGHPUT)
        printf(",\"window\":%ld", B.o.window);
    if (B.o.mode == M_RATE)
        printf(",\"rate\":%.1f,\"skipped\":%" PRIu64, B.o.rate, B.skipped);
    if (B.o.mode == M_THROUGHPUT || B.o.mode == M_RATE)
        print_messages(secs);
    if (B.o.mode == M_ROSTER)
        printf(",\"subscribed\":%ld,\"seconds\":%.3f", B.ndone, run);
    if (B.o.mode == M_IDLE)
        printf(",\"sessions\":%ld,\"hold_s\":%.1f", B.nready, B.o.hold);
    if (B.o.mode == M_REGISTER)
        printf(",\"users\":%ld,\"registered\":%" PRIu64 ",\"created\":%" PRIu64
               ",\"existed\":%" PRIu64 ",\"seconds\":%.3f",
               B.nclients, B.created + B.existed, B.created, B.existed, run);
    if (B.o.mode == M_LOGIN) {
        printf(",\"users\":%ld,\"concurrency\":%ld,\"logins\":%" PRIu64 ",\"seconds\":%.3f"
               ",\"logins_per_s\":%.1f",
               B.nclients, B.o.concurrency, B.logins, secs,
               secs > 0 ? (double)B.logins / secs : 0.0);
        print_latency();
    }
    printf(",\"errors\":%" PRIu64, B.errors);
    if (B.o.mode != M_REGISTER && B.o.mode != M_LOGIN)
        printf(",\"setup_s\":%.3f", setup);
    printf("}\n");
    fflush(stdout);
}

/* ---- command line -------------------------------------------------------------------------- */

enum opt_kind { OPT_STR, OPT_LONG, OPT_NUM };

#define MB(m) (1u << (m))
#define ALL_MODES (MB(M_COUNT) - 1)
#define MSG_MODES (MB(M_THROUGHPUT) | MB(M_RATE))

/* Every option, its type, where it goes and which modes take it. */
static const struct opt_def {
    const char *name;
    enum opt_kind kind;
    size_t off;
    unsigned modes;
} OPTS[] = {
    {"host", OPT_STR, offsetof(struct opts, host), ALL_MODES},
    {"port", OPT_LONG, offsetof(struct opts, port), ALL_MODES},
    {"domain", OPT_STR, offsetof(struct opts, domain), ALL_MODES},
    {"prefix", OPT_STR, offsetof(struct opts, prefix), ALL_MODES},
    {"password", OPT_STR, offsetof(struct opts, password), ALL_MODES},
    {"mech", OPT_STR, offsetof(struct opts, mech_name), ALL_MODES},
    {"timeout", OPT_NUM, offsetof(struct opts, timeout), ALL_MODES},
    {"concurrency", OPT_LONG, offsetof(struct opts, concurrency), ALL_MODES},
    {"users", OPT_LONG, offsetof(struct opts, users), MB(M_REGISTER) | MB(M_LOGIN)},
    {"pairs", OPT_LONG, offsetof(struct opts, pairs), MB(M_ROSTER) | MSG_MODES},
    {"window", OPT_LONG, offsetof(struct opts, window), MB(M_THROUGHPUT)},
    {"rate", OPT_NUM, offsetof(struct opts, rate), MB(M_RATE)},
    {"duration", OPT_NUM, offsetof(struct opts, duration), MSG_MODES | MB(M_LOGIN)},
    {"warmup", OPT_NUM, offsetof(struct opts, warmup), MSG_MODES},
    {"body-size", OPT_LONG, offsetof(struct opts, body_size), MSG_MODES},
    {"sessions", OPT_LONG, offsetof(struct opts, sessions), MB(M_IDLE)},
    {"hold", OPT_NUM, offsetof(struct opts, hold), MB(M_IDLE)},
};
#define NOPTS (sizeof(OPTS) / sizeof(OPTS[0]))

__attribute__((noreturn)) static void
usage(const char *why)
{
    if (why)
        fprintf(stderr, "xmppload: %s\n", why);
    fputs("usage: xmppload --host ADDR --port N --domain D [--prefix u] [--password pw]\n"
          "                [--mech PLAIN|SCRAM-SHA-1|SCRAM-SHA-256] [--timeout S=120]\n"
          "                [--concurrency C=200] MODE [mode options]\n"
          "  register   --users N\n"
          "  roster     --pairs P\n"
          "  throughput --pairs P [--window W=100] [--duration S=10] [--warmup S=2]"
          " [--body-size B=100]\n"
          "  rate       --pairs P --rate R [--duration S=10] [--warmup S=2] [--body-size B=100]\n"
          "  idle       --sessions N [--hold S=5]\n"
          "  login      [--users N=C] [--concurrency C=20] [--duration S=10]\n",
          stderr);
    exit(1);
}

static void
set_option(struct opts *o, const struct opt_def *d, const char *arg)
{
    char *end;
    void *field = (char *)o + d->off;
    if (d->kind == OPT_STR) {
        *(const char **)field = arg;
        return;
    }
    errno = 0;
    if (d->kind == OPT_LONG)
        *(long *)field = strtol(arg, &end, 10);
    else
        *(double *)field = strtod(arg, &end);
    if (errno || end == arg || *end ||
        (d->kind == OPT_LONG ? *(long *)field < 0 : *(double *)field < 0))
        die("--%s wants a non-negative number, not '%s'", d->name, arg);
}

static enum mode
parse_mode(const char *name)
{
    for (int m = 0; m < M_COUNT; m++)
        if (strcmp(name, MODE_NAMES[m]) == 0)
            return (enum mode)m;
    die("unknown mode '%s'", name);
}

static enum mech
parse_mech(const char *name)
{
    for (int m = MECH_PLAIN; m < MECH_COUNT; m++)
        if (strcasecmp(name, MECH_NAMES[m]) == 0)
            return (enum mech)m;
    die("unknown SASL mechanism '%s'", name);
}

static void
set_defaults(struct opts *o)
{
    memset(o, 0, sizeof(*o));
    o->prefix = "u";
    o->password = "xmppload-pw";
    o->timeout = 120;
    o->concurrency = o->users = -1; /* per mode, see check_options */
    o->window = 100;
    o->duration = 10;
    o->warmup = 2;
    o->body_size = 100;
    o->hold = 5;
}

static int
only_chars(const char *s, const char *allowed)
{
    return s[0] && s[strspn(s, allowed)] == '\0';
}

#define NAME_CHARS "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"

static void
check_common(struct opts *o)
{
    if (!o->host || !o->domain || o->port <= 0 || o->port > 65535)
        usage("--host, --port and --domain are required");
    if (!only_chars(o->prefix, NAME_CHARS) || strlen(o->prefix) > 64)
        die("--prefix may only hold letters, digits, '.', '_' and '-'");
    if (!only_chars(o->domain, NAME_CHARS) || strlen(o->domain) > 100)
        die("--domain '%s' is not a plain domain name", o->domain);
    if (strlen(o->password) > 256)
        die("--password is too long");
    o->mech = o->mech_name ? parse_mech(o->mech_name) : MECH_AUTO;
    if (o->timeout <= 0)
        die("--timeout must be positive");
}

static void
check_mode(struct opts *o)
{
    if (o->concurrency < 0)
        o->concurrency = o->mode == M_LOGIN ? 20 : DEFAULT_CONCURRENCY;
    if (o->users < 0)
        o->users = o->mode == M_LOGIN ? o->concurrency : 0;
    if (o->concurrency == 0)
        die("--concurrency must be at least 1");
    if ((o->mode == M_REGISTER || o->mode == M_LOGIN) && o->users == 0)
        die("%s needs --users N", MODE_NAMES[o->mode]);
    if ((MB(o->mode) & (MB(M_ROSTER) | MSG_MODES)) && o->pairs == 0)
        die("%s needs --pairs P", MODE_NAMES[o->mode]);
    if (o->mode == M_RATE && o->rate <= 0)
        die("rate needs --rate R (messages per second, all senders together)");
    if (o->mode == M_IDLE && o->sessions == 0)
        die("idle needs --sessions N");
    if (o->window == 0 || o->body_size > MAX_BODY || o->duration <= 0)
        die("--window must be at least 1, --body-size at most %d, --duration positive", MAX_BODY);
}

static void
parse_args(int argc, char **argv, struct opts *o)
{
    struct option longopts[NOPTS + 2];
    int seen[NOPTS] = {0}, idx, r;
    for (size_t i = 0; i < NOPTS; i++)
        longopts[i] = (struct option){OPTS[i].name, required_argument, NULL, 0};
    longopts[NOPTS] = (struct option){"help", no_argument, NULL, 'h'};
    longopts[NOPTS + 1] = (struct option){NULL, 0, NULL, 0};
    set_defaults(o);
    while ((r = getopt_long(argc, argv, "", longopts, &idx)) != -1) {
        if (r != 0)
            usage(r == 'h' ? NULL : "unknown option");
        set_option(o, &OPTS[idx], optarg);
        seen[idx] = 1;
    }
    if (optind != argc - 1)
        usage("give exactly one MODE");
    o->mode = parse_mode(argv[optind]);
    for (size_t i = 0; i < NOPTS; i++)
        if (seen[i] && !(OPTS[i].modes & MB(o->mode)))
            die("--%s does not apply to %s", OPTS[i].name, MODE_NAMES[o->mode]);
    check_common(o);
    check_mode(o);
}

/* ---- setup ---------------------------------------------------------------------------------- */

static void
raise_fd_limit(long need)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        die("getrlimit: %s", strerror(errno));
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
        die("setrlimit: %s", strerror(errno));
    if (rl.rlim_cur != RLIM_INFINITY && (rlim_t)need > rl.rlim_cur)
        die("%ld connections need more file descriptors than the limit of %lu", need,
            (unsigned long)rl.rlim_cur);
}

static void
resolve_server(void)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV}, *res;
    char port[16];
    int r;
    snprintf(port, sizeof(port), "%ld", B.o.port);
    if ((r = getaddrinfo(B.o.host, port, &hints, &res)) != 0)
        die("%s: %s", B.o.host, gai_strerror(r));
    memcpy(&B.addr, res->ai_addr, res->ai_addrlen);
    B.addr_len = res->ai_addrlen;
    freeaddrinfo(res);
}

static char *
xml_escape(const char *s)
{
    struct buf b = {0};
    for (; *s; s++) {
        const char *e = *s == '&' ? "&amp;" : *s == '<' ? "&lt;" : *s == '>' ? "&gt;" : NULL;
        buf_append(&b, e ? e : s, e ? strlen(e) : 1);
    }
    buf_append(&b, "", 1);
    return b.data;
}

static void *
zalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    if (!p)
        die("out of memory");
    return p;
}

/* Slots and accounts per mode. */
static void
size_run(void)
{
    switch (B.o.mode) {
    case M_REGISTER:
        B.nclients = B.nconns = B.o.users;
        break;
    case M_LOGIN:
        B.nclients = B.o.users;
        B.nconns = B.o.concurrency;
        break;
    case M_IDLE:
        B.nclients = B.nconns = B.o.sessions;
        break;
    default:
        B.nclients = B.nconns = 2 * B.o.pairs;
        break;
    }
}

static void
setup_bench(void)
{
    size_run();
    raise_fd_limit(B.nconns + 64);
    resolve_server();
    if (gnutls_certificate_allocate_credentials(&B.cred) < 0)
        die("cannot allocate TLS credentials");
    gnutls_rnd(GNUTLS_RND_NONCE, &B.run_id, sizeof(B.run_id));
    B.password_xml = xml_escape(B.o.password);
    B.padding = zalloc(MAX_BODY + 1, 1);
    memset(B.padding, 'x', MAX_BODY);
    B.conns = zalloc((size_t)B.nconns, sizeof(*B.conns));
    B.dirty = zalloc(2 * (size_t)B.nconns, sizeof(*B.dirty));
    for (long i = 0; i < B.nconns; i++) {
        B.conns[i].slot = i;
        B.conns[i].fd = -1;
    }
    for (B.cache_slots = 1024; B.cache_slots < 2 * (size_t)B.nclients && B.cache_slots < 65536;)
        B.cache_slots *= 2;
    B.cache = zalloc(B.cache_slots, sizeof(*B.cache));
}

static void
setup_loop(void)
{
    if (!(B.loop = ev_default_loop(EVFLAG_AUTO)))
        die("cannot start the event loop");
    ev_prepare_init(&B.prepare_w, prepare_cb);
    ev_prepare_start(B.loop, &B.prepare_w);
    ev_timer_init(&B.timeout_w, timeout_cb, B.o.timeout, 0.);
    ev_timer_start(B.loop, &B.timeout_w);
    ev_timer_init(&B.phase_w, phase_timer_cb, 1., 0.);
    ev_timer_init(&B.tick_w, tick_cb, RATE_TICK, RATE_TICK);
    B.t_start = mono_s();
    B.phase = B.o.mode == M_REGISTER || B.o.mode == M_LOGIN ? PH_RUN : PH_SETUP;
    B.t_run = B.t_setup = B.t_start;
    if (B.o.mode == M_LOGIN)
        begin_measure();
}

int
main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    parse_args(argc, argv, &B.o);
    setup_bench();
    setup_loop();
    ev_run(B.loop, 0);
    print_error_summary();
    print_report();
    return 0;
}
