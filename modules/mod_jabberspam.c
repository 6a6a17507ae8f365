/*
 * mod_jabberspam: the JabberSPAM community blacklist (blacklist.txt, one
 * domain per line) enforced at the server-to-server layer.
 *
 *   incoming  a peer whose certificate proves a listed domain (RFC 6120
 *             13.7.1.4, RFC 6125, the identity SASL EXTERNAL / XEP-0178 then
 *             asserts) is refused with the <policy-violation/> stream error
 *             (RFC 6120 4.9.3.14) on the stream restarted after TLS, before
 *             SASL is offered; XD_HOOK_S2S_AUTH refuses it too (DROP:
 *             mod_s2s_external closes with <policy-violation/>) when the list
 *             changed between the two.  A stream authenticated before a
 *             reload listed its domain is closed the same way at its next
 *             stanza, and a stanza from a listed subdomain over an unlisted
 *             parent's stream is dropped.
 *   outgoing  a stanza for a listed domain never reaches mod_s2s_external
 *             (XD_HOOK_DELIVER_REMOTE at XD_PRIO_FIRST), so no stream is
 *             opened; the sender gets <not-allowed/> of type cancel, the
 *             condition RFC 6120 8.3.3.10 names for "sending to entities at
 *             a blacklisted domain".
 *
 * Matching: list entries and the domains we check are both prepared with
 * xd_jid_prep_domain (RFC 7622 3.2: IDNA2008/UTS #46 to lower-case A-labels),
 * so "BÜCHER.example", "bücher.example." and "xn--bcher-kva.example" are one
 * entry.  A domain matches when it or one of its parents (a suffix at a label
 * boundary) is listed: one hash probe per label.
 *
 * The list: a file (the operator's, or the cache of the download), read at
 * load and on SIGHUP; optionally refreshed from an https URL every
 * refresh_interval (retry_interval after a failure; SIGHUP fetches at once;
 * at start-up a file younger than refresh_interval is not fetched again)
 * with the libcurl multi interface driven by the server's event loop
 * (CURLMOPT_SOCKETFUNCTION / TIMERFUNCTION on xd_io / xd_timer), certificate
 * verified, https only (redirects too), size and time capped.  A new list
 * replaces the old one in a single pointer swap, and only when it parsed: an
 * unreadable file, a failed download or content that is not a domain list
 * keeps the last good list.  A download that parses is written to the file
 * (temp file + fsync + rename) before it is used, so a restart or a SIGHUP
 * starts from it.
 *
 * Parsing: '#' starts a comment (whole line or after the domain), blank
 * lines and surrounding white space are ignored, a leading "*." is accepted
 * (subdomains always match anyway).  A line that is not a domain name is
 * reported as file:line and skipped, so one typo does not drop the other
 * entries; but when such lines outnumber the domains, or the data holds a
 * NUL byte, the whole text is refused: that is an HTML error page, a binary
 * or the wrong file, not a list with a typo.  A download with no domain at
 * all is refused too (the real list is never empty; an empty answer is a
 * broken mirror), while an empty local file is the operator's choice.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>

#include <xmppd/module.h>

#define MAX_BAD_LOGGED 10      /* bad lines reported per read; then a count */
#define MAX_TOKEN 1100         /* longer than any domainpart (1023) plus "*." */
#define REFUSAL_TEXT "your domain is on this server's blacklist (JabberSPAM)"

/* ---- the set of listed domains -------------------------------------------------- */

/* Open addressing over prepared domain strings; cap is a power of two and
 * at most half full, so a probe ends quickly at an empty slot. */
typedef struct domset {
    char **slot;
    size_t cap, n;
} domset;

static unsigned long
hash_str(const char *s)
{
    unsigned long h = 14695981039346656037ul;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ul;
    return h;
}

static domset *
domset_new(void)
{
    domset *d = calloc(1, sizeof(*d));
    if (d && !(d->slot = calloc(d->cap = 64, sizeof(*d->slot)))) {
        free(d);
        return NULL;
    }
    return d;
}

static void
domset_free(domset *d)
{
    if (!d)
        return;
    for (size_t i = 0; i < d->cap; i++)
        free(d->slot[i]);
    free(d->slot);
    free(d);
}

static int
domset_has(const domset *d, const char *dom)
{
    size_t mask = d->cap - 1;
    for (size_t i = hash_str(dom) & mask; d->slot[i]; i = (i + 1) & mask)
        if (!strcmp(d->slot[i], dom))
            return 1;
    return 0;
}

/* 1 added, 0 already there, -1 out of memory. */
static int
domset_add(domset *d, const char *dom)
{
    size_t mask;
    char *copy;

    if (domset_has(d, dom))
        return 0;
    if ((d->n + 1) * 2 > d->cap) {
        size_t cap = d->cap * 2;
        char **slot = calloc(cap, sizeof(*slot));
        if (!slot)
            return -1;
        for (size_t i = 0; i < d->cap; i++) {
            size_t k;
            if (!d->slot[i])
                continue;
            for (k = hash_str(d->slot[i]) & (cap - 1); slot[k]; k = (k + 1) & (cap - 1))
                ;
            slot[k] = d->slot[i];
        }
        free(d->slot);
        d->slot = slot;
        d->cap = cap;
    }
    if (!(copy = strdup(dom)))
        return -1;
    mask = d->cap - 1;
    size_t i;
    for (i = hash_str(dom) & mask; d->slot[i]; i = (i + 1) & mask)
        ;
    d->slot[i] = copy;
    d->n++;
    return 1;
}

/* An address literal names one host: it has no parent to inherit a listing. */
static int
is_ip_literal(const char *d)
{
    return d[0] == '[' || strspn(d, "0123456789.") == strlen(d);
}

/* The listed entry that covers a prepared domain (itself or a parent), or NULL. */
static const char *
domset_match(const domset *d, const char *dom)
{
    const char *p = dom;

    if (!d || !d->n || !*dom)
        return NULL;
    if (is_ip_literal(dom))
        return domset_has(d, dom) ? dom : NULL;
    for (;;) {
        if (domset_has(d, p))
            return p;
        if (!(p = strchr(p, '.')) || !*++p)
            return NULL;
    }
}

/* ---- module state ------------------------------------------------------------------ */

/* A socket libcurl asked us to watch. */
typedef struct curl_sock {
    int fd;
    xd_io *io;
    struct curl_sock *next;
} curl_sock;

typedef struct js_mod {
    xd_module *m;
    char *file, *url, *ca_file;
    long refresh_interval, retry_interval, timeout;
    size_t max_size;
    domset *set; /* the list in force (never NULL after load) */

    /* the download */
    CURLM *multi;
    CURL *easy;              /* non-NULL while a download runs */
    xd_timer *curl_timer;    /* libcurl's own timeout */
    xd_timer *refresh_timer; /* the next scheduled download */
    curl_sock *socks;
    char *buf;
    size_t len, cap;
    int too_big;
    char errbuf[CURL_ERROR_SIZE];
    int curl_inited;
} js_mod;

/* ---- parsing ------------------------------------------------------------------------- */

typedef struct parse_stats {
    size_t lines, entries, dups, bad;
    struct {
        size_t line;
        char text[96];
    } first_bad[MAX_BAD_LOGGED]; /* reported only if the text is accepted */
} parse_stats;

/* Printable excerpt of a bad line for the log (no control bytes, bounded). */
static void
excerpt(char *out, size_t outlen, const char *s, size_t n)
{
    size_t i, o = 0;
    for (i = 0; i < n && o + 4 < outlen; i++)
        out[o++] = ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) ? '?' : s[i];
    if (i < n && o + 4 <= outlen) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o] = '\0';
}

static int
is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f';
}

/*
 * Parse a list from buf (src names it in messages: a path or the URL).
 * 0 and *out = the new set, or -1 with why filled when the text as a whole
 * is refused (bad lines alone are reported and skipped).
 */
static int
parse_list(const char *buf, size_t len, const char *src, domset **out, parse_stats *st,
           char *why, size_t whylen)
{
    domset *d;
    const char *p = buf, *end = buf + len;
    const char *nul = memchr(buf, '\0', len);

    memset(st, 0, sizeof(*st));
    *out = NULL;
    if (nul) {
        size_t line = 1;
        for (const char *q = buf; q < nul; q++)
            line += *q == '\n';
        snprintf(why, whylen, "binary data (a NUL byte) at line %zu", line);
        return -1;
    }
    if (len >= 3 && !memcmp(p, "\xEF\xBB\xBF", 3))
        p += 3; /* a UTF-8 byte order mark some editors write */
    if (!(d = domset_new())) {
        snprintf(why, whylen, "out of memory");
        return -1;
    }
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        const char *s = p, *e = eol ? eol : end, *hash;
        char tok[MAX_TOKEN + 1], dom[XD_JID_PART_MAX + 1];
        size_t n;
        int r;

        p = eol ? eol + 1 : end;
        st->lines++;
        if ((hash = memchr(s, '#', (size_t)(e - s))))
            e = hash;
        while (s < e && is_space(*s))
            s++;
        while (e > s && is_space(e[-1]))
            e--;
        if (s == e)
            continue;
        n = (size_t)(e - s);
        if (n > MAX_TOKEN || memchr(s, ' ', n) || memchr(s, '\t', n)) {
            r = -1;
        } else {
            memcpy(tok, s, n);
            tok[n] = '\0';
            r = xd_jid_prep_domain(dom, sizeof(dom),
                                   !strncmp(tok, "*.", 2) && tok[2] ? tok + 2 : tok);
        }
        if (r != 0) {
            if (st->bad < MAX_BAD_LOGGED) {
                st->first_bad[st->bad].line = st->lines;
                excerpt(st->first_bad[st->bad].text, sizeof(st->first_bad[0].text), s, n);
            }
            st->bad++;
            continue;
        }
        if ((r = domset_add(d, dom)) < 0) {
            domset_free(d);
            snprintf(why, whylen, "out of memory");
            return -1;
        }
        if (r)
            st->entries++;
        else
            st->dups++;
    }
    if (st->bad && st->bad > st->entries) {
        snprintf(why, whylen,
                 "%zu of its %zu entries are not domain names (line %zu: '%s'): this is not a"
                 " domain list",
                 st->bad, st->bad + st->entries + st->dups, st->first_bad[0].line,
                 st->first_bad[0].text);
        domset_free(d);
        return -1;
    }
    /* A list worth using: now its typos are worth reporting, as file:line. */
    for (size_t i = 0; i < st->bad && i < MAX_BAD_LOGGED; i++)
        xd_warn("jabberspam: %s:%zu: '%s' is not a domain name; skipped", src,
                st->first_bad[i].line, st->first_bad[i].text);
    if (st->bad > MAX_BAD_LOGGED)
        xd_warn("jabberspam: %s: %zu more lines that are not domain names skipped", src,
                st->bad - MAX_BAD_LOGGED);
    *out = d;
    return 0;
}

/* Read the whole file (at most max bytes). 0, or -1 with why. */
static int
read_file(const char *path, size_t max, char **data, size_t *len, char *why, size_t whylen)
{
    struct stat sb;
    char *buf;
    size_t got = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    *data = NULL;
    *len = 0;
    if (fd < 0) {
        snprintf(why, whylen, "cannot open it: %s", strerror(errno));
        return -1;
    }
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        snprintf(why, whylen, "not a regular file");
        close(fd);
        return -1;
    }
    if ((unsigned long long)sb.st_size > max) {
        snprintf(why, whylen, "%lld bytes, more than max_size (%zu)", (long long)sb.st_size, max);
        close(fd);
        return -1;
    }
    if (!(buf = malloc((size_t)sb.st_size + 1))) {
        snprintf(why, whylen, "out of memory");
        close(fd);
        return -1;
    }
    /* read to EOF, but never beyond the size checked: the file may grow */
    while (got <= (size_t)sb.st_size) {
        ssize_t r = read(fd, buf + got, (size_t)sb.st_size + 1 - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            snprintf(why, whylen, "cannot read it: %s", strerror(errno));
            free(buf);
            close(fd);
            return -1;
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    if (got > (size_t)sb.st_size) {
        snprintf(why, whylen, "it changed while being read");
        free(buf);
        return -1;
    }
    *data = buf;
    *len = got;
    return 0;
}

/* How two lists differ, for the log line of a change. */
static void
diff_counts(const domset *old, const domset *new, size_t *added, size_t *removed)
{
    *added = *removed = 0;
    for (size_t i = 0; i < new->cap; i++)
        if (new->slot[i] && !(old && domset_has(old, new->slot[i])))
            (*added)++;
    if (old)
        for (size_t i = 0; i < old->cap; i++)
            if (old->slot[i] && !domset_has(new, old->slot[i]))
                (*removed)++;
}

/* The new list takes over in one step; the old one is freed. */
static void
swap_in(js_mod *mod, domset *set, const char *how)
{
    size_t added, removed;
    diff_counts(mod->set, set, &added, &removed);
    xd_info("jabberspam: %s: %zu listed domains (%zu added, %zu removed)", how, set->n, added,
            removed);
    domset_free(mod->set);
    mod->set = set;
}

/* (Re)load the file.  0: in force; -1 with why: the list in force stays. */
static int
load_file(js_mod *mod, char *why, size_t whylen)
{
    char *data;
    size_t len;
    domset *set;
    parse_stats st;
    char how[1200];

    if (read_file(mod->file, mod->max_size, &data, &len, why, whylen) != 0)
        return -1;
    if (parse_list(data, len, mod->file, &set, &st, why, whylen) != 0) {
        free(data);
        return -1;
    }
    free(data);
    if (!set->n)
        xd_warn("jabberspam: %s lists no domain: nothing is refused", mod->file);
    snprintf(how, sizeof(how), "read %s (%zu lines, %zu skipped, %zu duplicates)", mod->file,
             st.lines, st.bad, st.dups);
    swap_in(mod, set, how);
    return 0;
}

/* Write data to path atomically: a temp file beside it, then rename(2). */
static int
write_atomic(const char *path, const char *data, size_t len, char *why, size_t whylen)
{
    size_t n = strlen(path);
    char *tmp = malloc(n + 8);
    size_t off = 0;
    int fd;

    if (!tmp) {
        snprintf(why, whylen, "out of memory");
        return -1;
    }
    memcpy(tmp, path, n);
    memcpy(tmp + n, ".XXXXXX", 8);
    if ((fd = mkstemp(tmp)) < 0) {
        snprintf(why, whylen, "cannot create a temp file beside it: %s", strerror(errno));
        free(tmp);
        return -1;
    }
    while (off < len) {
        ssize_t r = write(fd, data + off, len - off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        off += (size_t)r;
    }
    if (off < len || fchmod(fd, 0644) != 0 || fsync(fd) != 0) {
        snprintf(why, whylen, "cannot write %s: %s", tmp, strerror(errno));
        close(fd);
        unlink(tmp);
        free(tmp);
        return -1;
    }
    if (close(fd) != 0 || rename(tmp, path) != 0) {
        snprintf(why, whylen, "cannot replace it: %s", strerror(errno));
        unlink(tmp);
        free(tmp);
        return -1;
    }
    free(tmp);
    return 0;
}

/* ---- the download (libcurl multi interface on the server's loop) ------------------ */

static void download_start(js_mod *mod);

static void
refresh_due(void *data)
{
    js_mod *mod = data;
    mod->refresh_timer = NULL; /* one-shot: the core freed it */
    download_start(mod);
}

static void
schedule_refresh(js_mod *mod, double seconds)
{
    xd_timer_stop(mod->refresh_timer);
    mod->refresh_timer = xd_timer_start(mod->m, seconds, 0, refresh_due, mod);
}

static void
download_done(js_mod *mod, CURLcode rc, long code)
{
    char why[512], how[1200];
    domset *set = NULL;
    parse_stats st;
    const char *body = mod->buf ? mod->buf : "";

    why[0] = '\0';
    if (mod->too_big || rc == CURLE_FILESIZE_EXCEEDED) /* as written, or as announced */
        snprintf(why, sizeof(why), "larger than max_size (%zu bytes)", mod->max_size);
    else if (rc != CURLE_OK)
        snprintf(why, sizeof(why), "%s", mod->errbuf[0] ? mod->errbuf : curl_easy_strerror(rc));
    else if (code != 200)
        snprintf(why, sizeof(why), "HTTP status %ld", code);
    else if (parse_list(body, mod->len, mod->url, &set, &st, why, sizeof(why)) != 0)
        set = NULL; /* why says it */
    else if (!set->n) {
        snprintf(why, sizeof(why), "no domain in it");
        domset_free(set);
        set = NULL;
    }
    if (!set) {
        xd_count(mod->m, "downloads_failed", 1);
        xd_warn("jabberspam: download of %s failed: %s; keeping the current list (%zu domains);"
                " next attempt in %ld s",
                mod->url, why, mod->set->n, mod->retry_interval);
        schedule_refresh(mod, (double)mod->retry_interval);
    } else {
        /* The file is the list's home across restarts and SIGHUPs, so it
         * gets what is about to be in force; if it cannot be written, the
         * list is used all the same. */
        if (write_atomic(mod->file, body, mod->len, why, sizeof(why)) != 0)
            xd_warn("jabberspam: cannot save the downloaded list to %s: %s; using it anyway",
                    mod->file, why);
        xd_count(mod->m, "downloads", 1);
        snprintf(how, sizeof(how), "downloaded %s (%zu lines, %zu skipped, %zu duplicates)",
                 mod->url, st.lines, st.bad, st.dups);
        swap_in(mod, set, how);
        schedule_refresh(mod, (double)mod->refresh_interval);
    }
    free(mod->buf);
    mod->buf = NULL;
    mod->len = mod->cap = 0;
}

/* Collect finished transfers (there is at most one). */
static void
check_done(js_mod *mod)
{
    CURLMsg *msg;
    int left;

    while ((msg = curl_multi_info_read(mod->multi, &left))) {
        CURL *e = msg->easy_handle;
        CURLcode rc = msg->data.result; /* msg is gone after remove_handle */
        long code = 0;

        if (msg->msg != CURLMSG_DONE)
            continue;
        curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &code);
        curl_multi_remove_handle(mod->multi, e);
        curl_easy_cleanup(e);
        if (e == mod->easy) {
            mod->easy = NULL;
            download_done(mod, rc, code);
        }
    }
}

static void
curl_timeout_cb(void *data)
{
    js_mod *mod = data;
    int running;
    mod->curl_timer = NULL; /* one-shot: the core freed it */
    curl_multi_socket_action(mod->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(mod);
}

/* CURLMOPT_TIMERFUNCTION: one timer, replaced at each call. */
static int
curl_timer_fn(CURLM *multi, long ms, void *userp)
{
    js_mod *mod = userp;
    (void)multi;
    xd_timer_stop(mod->curl_timer);
    mod->curl_timer = NULL;
    if (ms >= 0 && !(mod->curl_timer = xd_timer_start(mod->m, (double)ms / 1000.0, 0,
                                                      curl_timeout_cb, mod)))
        return -1;
    return 0;
}

static void
curl_io_cb(int fd, int events, void *data)
{
    js_mod *mod = data;
    int running;
    int action = (events & XD_IO_READ ? CURL_CSELECT_IN : 0) |
                 (events & XD_IO_WRITE ? CURL_CSELECT_OUT : 0);
    curl_multi_socket_action(mod->multi, fd, action, &running);
    check_done(mod);
}

/* CURLMOPT_SOCKETFUNCTION: watch what libcurl asks for on the loop. */
static int
curl_socket_fn(CURL *e, curl_socket_t fd, int what, void *userp, void *sockp)
{
    js_mod *mod = userp;
    curl_sock *cs = sockp;
    int events;
    (void)e;

    if (what == CURL_POLL_REMOVE) {
        if (cs) {
            for (curl_sock **p = &mod->socks; *p; p = &(*p)->next)
                if (*p == cs) {
                    *p = cs->next;
                    break;
                }
            xd_io_stop(cs->io);
            free(cs);
            curl_multi_assign(mod->multi, fd, NULL);
        }
        return 0;
    }
    events = (what & CURL_POLL_IN ? XD_IO_READ : 0) | (what & CURL_POLL_OUT ? XD_IO_WRITE : 0);
    if (cs) {
        xd_io_set(cs->io, events);
        return 0;
    }
    if (!(cs = calloc(1, sizeof(*cs))))
        return -1;
    cs->fd = fd;
    if (!(cs->io = xd_io_start(mod->m, fd, events, curl_io_cb, mod))) {
        free(cs);
        return -1;
    }
    cs->next = mod->socks;
    mod->socks = cs;
    curl_multi_assign(mod->multi, fd, cs);
    return 0;
}

static size_t
curl_write_fn(char *ptr, size_t size, size_t nmemb, void *userp)
{
    js_mod *mod = userp;
    size_t n = size * nmemb;

    if (n > mod->max_size - mod->len) {
        mod->too_big = 1;
        return 0; /* aborts the transfer */
    }
    if (mod->len + n > mod->cap) {
        size_t cap = mod->cap ? mod->cap : 65536;
        char *b;
        while (cap < mod->len + n)
            cap *= 2;
        if (cap > mod->max_size)
            cap = mod->max_size;
        if (!(b = realloc(mod->buf, cap)))
            return 0;
        mod->buf = b;
        mod->cap = cap;
    }
    memcpy(mod->buf + mod->len, ptr, n);
    mod->len += n;
    return n;
}

static void
download_start(js_mod *mod)
{
    CURL *e;
    int ok = 1;

    if (!mod->url || !mod->multi || mod->easy)
        return; /* nothing to fetch, or a download is already running */
    free(mod->buf);
    mod->buf = NULL;
    mod->len = mod->cap = 0;
    mod->too_big = 0;
    mod->errbuf[0] = '\0';
    if (!(e = curl_easy_init())) {
        xd_warn("jabberspam: cannot start a download of %s (libcurl)", mod->url);
        schedule_refresh(mod, (double)mod->retry_interval);
        return;
    }
    ok &= curl_easy_setopt(e, CURLOPT_URL, mod->url) == CURLE_OK;
    /* https only, redirects included: the list decides who we talk to */
    ok &= curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "https") == CURLE_OK;
    ok &= curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "https") == CURLE_OK;
    ok &= curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 1L) == CURLE_OK;
    ok &= curl_easy_setopt(e, CURLOPT_MAXREDIRS, 5L) == CURLE_OK;
    ok &= curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L) == CURLE_OK;
    ok &= curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L) == CURLE_OK;
    if (mod->ca_file)
        ok &= curl_easy_setopt(e, CURLOPT_CAINFO, mod->ca_file) == CURLE_OK;
    ok &= curl_easy_setopt(e, CURLOPT_TIMEOUT, mod->timeout) == CURLE_OK;
    ok &= curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT, mod->timeout < 30 ? mod->timeout : 30L) ==
          CURLE_OK;
    ok &= curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)mod->max_size) == CURLE_OK;
    ok &= curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L) == CURLE_OK;
    ok &= curl_easy_setopt(e, CURLOPT_USERAGENT, "xmppd mod_jabberspam") == CURLE_OK;
    ok &= curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, curl_write_fn) == CURLE_OK;
    ok &= curl_easy_setopt(e, CURLOPT_WRITEDATA, mod) == CURLE_OK;
    ok &= curl_easy_setopt(e, CURLOPT_ERRORBUFFER, mod->errbuf) == CURLE_OK;
    if (!ok || curl_multi_add_handle(mod->multi, e) != CURLM_OK) {
        xd_warn("jabberspam: cannot start a download of %s (libcurl options)", mod->url);
        curl_easy_cleanup(e);
        schedule_refresh(mod, (double)mod->retry_interval);
        return;
    }
    mod->easy = e;
    xd_debug("jabberspam: downloading %s", mod->url);
}

static void
download_stop(js_mod *mod)
{
    if (mod->easy) {
        curl_multi_remove_handle(mod->multi, mod->easy);
        curl_easy_cleanup(mod->easy);
        mod->easy = NULL;
    }
    if (mod->multi) {
        curl_multi_cleanup(mod->multi);
        mod->multi = NULL;
    }
    while (mod->socks) { /* whatever libcurl did not remove itself */
        curl_sock *cs = mod->socks;
        mod->socks = cs->next;
        xd_io_stop(cs->io);
        free(cs);
    }
    xd_timer_stop(mod->curl_timer);
    mod->curl_timer = NULL;
    free(mod->buf);
    mod->buf = NULL;
}

/* ---- hooks ---------------------------------------------------------------------------- */

/*
 * Incoming, the header of the stream restarted after TLS: the peer's
 * certificate is there to prove the domain in its 'from'.  A listed domain
 * that proves it is refused here, before SASL is even offered: refusing at
 * XD_HOOK_S2S_AUTH comes after mod_s2s_external has sent <success/>, when
 * the peer restarts the stream and takes a stream error in place of our new
 * header for a malformed stream (Prosody answers <invalid-namespace/>).  A
 * claim that the certificate does not back is not ours to judge:
 * mod_s2s_external refuses it with <not-authorized/>.
 */
static int
s2s_open(xd_event *ev, void *data)
{
    js_mod *mod = data;
    xd_session *s = ev->session;
    const char *from, *hit;
    char why[256];

    if (!s || xd_session_type(s) != XD_STREAM_S2S || xd_session_is_initiator(s) ||
        !xd_session_is_tls(s) || xd_session_is_authenticated(s))
        return XD_PASS;
    from = xd_session_stream_from(s);
    if (!from || !*from || !(hit = domset_match(mod->set, from)) ||
        !xd_session_verify_peer(s, from, why, sizeof(why)))
        return XD_PASS;
    xd_count(mod->m, "streams_refused", 1);
    xd_info("jabberspam: refused the server stream from %s (%s, certificate verified): %s is on"
            " the JabberSPAM list",
            from, xd_session_peer(s), hit);
    xd_session_close(s, "policy-violation", REFUSAL_TEXT);
    return XD_DROP;
}

/* Incoming: the peer just proved its domain (SASL EXTERNAL).  With
 * mod_s2s_external a listed domain is refused at s2s_open already; this
 * catches a list that changed in between, and other s2s modules. */
static int
s2s_auth(xd_event *ev, void *data)
{
    js_mod *mod = data;
    const char *hit;

    if (!ev->from || !(hit = domset_match(mod->set, ev->from->domain)))
        return XD_PASS;
    xd_count(mod->m, "streams_refused", 1);
    xd_info("jabberspam: refused the server stream from %s (%s): %s is on the JabberSPAM list",
            ev->from->domain, ev->session ? xd_session_peer(ev->session) : "?", hit);
    return XD_DROP; /* mod_s2s_external closes it with <policy-violation/> */
}

/* Incoming stanzas: a stream authenticated before a reload listed its domain,
 * or a listed subdomain speaking over an unlisted parent's stream. */
static int
s2s_stanza(xd_event *ev, void *data)
{
    js_mod *mod = data;
    const char *peer = ev->session ? xd_session_peer_domain(ev->session) : "";
    const char *hit;

    if (peer && *peer && (hit = domset_match(mod->set, peer))) {
        xd_count(mod->m, "streams_closed", 1);
        xd_info("jabberspam: closing the server stream from %s (%s): %s is on the JabberSPAM"
                " list",
                peer, xd_session_peer(ev->session), hit);
        xd_session_close(ev->session, "policy-violation", REFUSAL_TEXT);
        return XD_DROP;
    }
    if (ev->from && (hit = domset_match(mod->set, ev->from->domain))) {
        xd_count(mod->m, "stanzas_dropped", 1);
        xd_info("jabberspam: dropped a <%s/> from %s (stream of %s): %s is on the JabberSPAM"
                " list",
                ev->stanza ? xmpp_stanza_get_name(ev->stanza) : "?", ev->from->domain, peer, hit);
        return XD_DROP;
    }
    return XD_PASS;
}

/* Outgoing: refuse before mod_s2s_external would open a stream. */
static int
deliver_remote(xd_event *ev, void *data)
{
    js_mod *mod = data;
    char from[XD_JID_STR_MAX], to[XD_JID_STR_MAX], text[1200];
    const char *hit;

    if (!ev->to || !(hit = domset_match(mod->set, ev->to->domain)))
        return XD_PASS;
    if (!ev->from || xd_jid_format(ev->from, 1, from, sizeof(from)) < 0)
        snprintf(from, sizeof(from), "?");
    if (xd_jid_format(ev->to, 1, to, sizeof(to)) < 0)
        snprintf(to, sizeof(to), "%s", ev->to->domain);
    xd_count(mod->m, "stanzas_refused", 1);
    xd_info("jabberspam: refused a <%s/> from %s to %s: %s is on the JabberSPAM list",
            xmpp_stanza_get_name(ev->stanza), from, to, hit);
    snprintf(text, sizeof(text), "%s is on this server's blacklist (JabberSPAM): no federation"
                                 " with it",
             hit);
    xd_bounce(ev->stanza, "cancel", "not-allowed", text); /* errors are not answered */
    return XD_HANDLED;
}

/* SIGHUP: re-read the file now, and fetch the URL now. */
static int
reload(xd_event *ev, void *data)
{
    js_mod *mod = data;
    char why[512];
    (void)ev;

    if (load_file(mod, why, sizeof(why)) != 0) {
        xd_count(mod->m, "reloads_failed", 1);
        xd_warn("jabberspam: %s not reloaded: %s; keeping the current list (%zu domains)",
                mod->file, why, mod->set->n);
    }
    if (mod->url)
        download_start(mod);
    return XD_PASS;
}

/* ---- the module ------------------------------------------------------------------------ */

static const xd_setting js_settings[] = {
    {"file", XD_SETTING_STRING},
    {"url", XD_SETTING_STRING},
    {"refresh_interval", XD_SETTING_INT},
    {"retry_interval", XD_SETTING_INT},
    {"ca_file", XD_SETTING_STRING},
    {"timeout", XD_SETTING_INT},
    {"max_size", XD_SETTING_INT},
    {NULL, 0},
};

static int
js_load(xd_module *m)
{
    js_mod *mod = calloc(1, sizeof(*mod));
    const char *file = xd_config_string(m, "file", NULL);
    const char *url = xd_config_string(m, "url", NULL);
    const char *ca = xd_config_string(m, "ca_file", NULL);
    long long ri = xd_config_int(m, "refresh_interval", 86400);
    long long rt = xd_config_int(m, "retry_interval", 3600);
    long long to = xd_config_int(m, "timeout", 60);
    long long ms = xd_config_int(m, "max_size", 4 << 20);
    char why[512];
    struct stat sb;
    int r = 0;

    if (!mod)
        return -1;
    xd_module_set_data(m, mod);
    mod->m = m;
    if (!file || !*file) {
        xd_config_error(m, "file", "required: the path of the list (blacklist.txt)");
        return -1;
    }
    if (url && strncmp(url, "https://", 8) != 0) {
        xd_config_error(m, "url", "must be an https:// URL");
        return -1;
    }
    if (url && (strlen(url) < 9 || strpbrk(url, " \t\r\n"))) {
        xd_config_error(m, "url", "not a valid URL");
        return -1;
    }
    if (ri < 1 || ri > 30 * 86400) {
        xd_config_error(m, "refresh_interval", "must be from 1 to 2592000 seconds");
        return -1;
    }
    if (rt < 1 || rt > 30 * 86400) {
        xd_config_error(m, "retry_interval", "must be from 1 to 2592000 seconds");
        return -1;
    }
    if (to < 1 || to > 3600) {
        xd_config_error(m, "timeout", "must be from 1 to 3600 seconds");
        return -1;
    }
    if (ms < 1024 || ms > (256LL << 20)) {
        xd_config_error(m, "max_size", "must be from 1024 to 268435456 bytes");
        return -1;
    }
    if (ca && access(ca, R_OK) != 0) {
        xd_config_error(m, "ca_file", "cannot read %s: %s", ca, strerror(errno));
        return -1;
    }
    if (ca && !url)
        xd_warn("jabberspam: ca_file is only used for the download, and no url is set");
    mod->file = strdup(file);
    mod->url = url ? strdup(url) : NULL;
    mod->ca_file = ca ? strdup(ca) : NULL;
    if (!mod->file || (url && !mod->url) || (ca && !mod->ca_file))
        return -1;
    mod->refresh_interval = (long)ri;
    mod->retry_interval = (long)(rt < ri ? rt : ri);
    mod->timeout = (long)to;
    mod->max_size = (size_t)ms;

    if (load_file(mod, why, sizeof(why)) != 0) {
        /* Without a URL the file is the only source: a bad path is a
         * config error.  With one, the download fills it. */
        if (!mod->url) {
            xd_config_error(m, "file", "%s: %s", mod->file, why);
            return -1;
        }
        xd_warn("jabberspam: %s: %s; starting with an empty list until the download of %s",
                mod->file, why, mod->url);
        if (!(mod->set = domset_new()))
            return -1;
    }

    if (mod->url) {
        double first = 0;
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
            xd_config_error(m, "url", "libcurl failed to initialise");
            return -1;
        }
        mod->curl_inited = 1;
        if (!(mod->multi = curl_multi_init()))
            return -1;
        r |= curl_multi_setopt(mod->multi, CURLMOPT_SOCKETFUNCTION, curl_socket_fn) != CURLM_OK;
        r |= curl_multi_setopt(mod->multi, CURLMOPT_SOCKETDATA, mod) != CURLM_OK;
        r |= curl_multi_setopt(mod->multi, CURLMOPT_TIMERFUNCTION, curl_timer_fn) != CURLM_OK;
        r |= curl_multi_setopt(mod->multi, CURLMOPT_TIMERDATA, mod) != CURLM_OK;
        if (r)
            return -1;
        /* The file's age says when it was last fetched: a restart does not
         * download again a list that is still fresh. */
        if (stat(mod->file, &sb) == 0 && mod->set->n) {
            double age = difftime(time(NULL), sb.st_mtime);
            if (age >= 0 && age < (double)mod->refresh_interval)
                first = (double)mod->refresh_interval - age;
        }
        schedule_refresh(mod, first);
    }
    r |= xd_hook(m, XD_HOOK_STREAM_OPEN, s2s_open, mod, XD_PRIO_FIRST);
    r |= xd_hook(m, XD_HOOK_S2S_AUTH, s2s_auth, mod, XD_PRIO_FIRST);
    /* after mod_s2s_external's spoofing check (XD_PRIO_FIRST) */
    r |= xd_hook(m, XD_HOOK_S2S_STANZA, s2s_stanza, mod, XD_PRIO_FIRST - 1);
    r |= xd_hook(m, XD_HOOK_DELIVER_REMOTE, deliver_remote, mod, XD_PRIO_FIRST);
    r |= xd_hook(m, XD_HOOK_RELOAD, reload, mod, XD_PRIO_DEFAULT);
    return r ? -1 : 0;
}

static void
js_unload(xd_module *m)
{
    js_mod *mod = xd_module_get_data(m);
    if (!mod)
        return;
    xd_timer_stop(mod->refresh_timer);
    mod->refresh_timer = NULL;
    download_stop(mod);
    if (mod->curl_inited)
        curl_global_cleanup();
    domset_free(mod->set);
    free(mod->file);
    free(mod->url);
    free(mod->ca_file);
    free(mod);
}

XD_MODULE(jabberspam) = {
    .abi = XD_MODULE_ABI,
    .name = "jabberspam",
    .settings = js_settings,
    .load = js_load,
    .unload = js_unload,
};
