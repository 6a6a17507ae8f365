/*
 * mod_pattern_filter: drop messages and subscription requests whose text
 * matches operator-supplied patterns (spam control).
 *
 *   RFC 6121 5.2.2 / 8.5.2  message <body/> (every xml:lang variant) of
 *                           messages to local accounts
 *   RFC 6121 3.1.3          <status/> text of inbound presence type='subscribe'
 *   XEP-0384 (OMEMO)        only the cleartext the server sees is matched: the
 *                           fallback <body/>; <encrypted/> is never looked into
 *
 * A matched stanza is dropped silently (spam gets no answer), counted and
 * logged with the rule's file:line and the sender (at most 20 lines a second).
 *
 * Scope (setting `scope`, a list combined with OR): "strangers" (the sender is
 * not in the recipient's roster, or no roster module is loaded), "remote" (the
 * sender's domain is not served here), "all"; default ("strangers", "remote").
 * A user's own account and the server itself are never filtered.
 *
 * The pattern file (setting `file`), one rule a line, reloaded on SIGHUP:
 *
 *   # comment               (first non-blank character '#'); blank lines skipped
 *   viagra                  plain line: a literal substring, case-sensitive,
 *                           leading and trailing blanks trimmed
 *   lit:<text>              a literal, verbatim to the end of the line
 *   lit/i:<text>            a literal, case-insensitive (Unicode simple folding)
 *   re:<pcre2>              a PCRE2 regular expression (UTF-8, Unicode properties)
 *   re/i:<pcre2>            the same, case-insensitive
 *
 * Regular expressions are checked alone first, so a bad one is reported with
 * its file:line.  Because they are then combined with others, these are
 * refused: numbered back references and subroutine calls (\1, \g1, \g{1},
 * \g<1>, (?1), (?R), (?(1)...)) -- relative (\g{-1}, (?-1)) and named ones
 * work; backtracking verbs and start-of-pattern options ((*COMMIT), (*MARK),
 * (*UTF), ... -- lower-case alpha assertions such as (*pla:...) are fine);
 * a group name used by an earlier rule; a `#` comment in (?x) mode that runs
 * to the end of the line; and any pattern that can match the empty string
 * (it would drop almost everything).  \K and (?|...) are harmless here (only
 * the yes/no answer and the rule are used) and allowed.
 *
 * One pass per stanza, cost flat in the number of rules (but for regexes
 * without a literal, below):
 *   - all literals live in one Aho-Corasick automaton written here, run over
 *     the text case-folded a code point at a time; a case-sensitive literal
 *     is in it folded too, and a hit is confirmed by comparing the original
 *     bytes that end at the same place (an exact occurrence ends where its
 *     folded form does);
 *   - regexes are combined into PCRE2 patterns of alternatives, each tagged
 *     (*MARK:<line>) so pcre2_get_mark() names the rule that matched, JIT
 *     compiled.  PCRE2 tries the alternatives one after another at each start
 *     position, so one pattern of N alternatives costs O(N) per byte (measured:
 *     500 alternatives, ~1 us a byte).  To keep the cost flat, each regex's
 *     required literal (a run of literal characters every match contains,
 *     one per top-level branch, at least 3 bytes; of the runs, the one least
 *     likely in ordinary text) goes into the same automaton, and regexes are
 *     combined in small groups (<= 4, sorted by that literal): a group runs
 *     only when the pass found one of its literals.  The literal is read
 *     from plain characters outside groups, classes and escapes; a regex
 *     with syntax that reading does not follow (octal, \Q...\E, comments,
 *     callouts, (?x), POSIX classes) gets none.  Regexes without a
 *     literal (say `\d{12,}`) are combined into as few patterns as PCRE2's
 *     size limit allows and run on every scanned stanza (each adds about
 *     1 us per 200-byte body); they are named in the log at load.
 *
 * Bounds on regex time: each match by `match_limit` (and a 512 KiB JIT
 * stack; without JIT, a backtracking depth of 10,000 and 4 MiB of heap); a
 * limit hit counts as no match, is counted (limit_hits) and logged.  Each
 * stanza by `max_scan_ms` (default 20) of regexes, after which the rest are
 * skipped.  All stanzas together by `max_scan_share` (default 25): the
 * percent of one CPU that regexes may use, averaged through a bucket of one
 * second's worth; when it is used up, regexes are skipped (literals still
 * apply) until half of it is back, counted (regex_skipped) and logged at
 * most every 10 s.  A flood aimed at a slow regex then suspends the regex
 * rules for a while (for every sender; literals still apply) instead of
 * taking the server's CPU.
 *
 * The scope's roster lookup (a storage read) runs only once a rule matched:
 * most stanzas match nothing, and the scan is cheaper than the read.
 *
 * Counters (xd_count): scanned (stanzas whose text was matched against the
 * rules), dropped, spared (a rule matched but the sender was out of scope,
 * e.g. a roster contact: a hint of a too-broad rule), limit_hits,
 * regex_skipped (stanzas scanned without their regexes: max_scan_share),
 * scan_ns (time spent matching; scan_ns / scanned is the cost per stanza).
 */
#include <errno.h>
#include <locale.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <wctype.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <xmppd/module.h>

#define PF_MIN_FACTOR 3      /* shorter required literals would hit too often */
#define PF_MAX_FACTOR 64     /* a prefix of a required literal is required too */
#define PF_GROUP_MAX 4       /* regexes per candidate-driven pattern */
#define PF_CHUNK_BYTES 40000 /* compiled size budget per combined pattern (link size 2: 64 KiB) */
#define PF_MAX_BRANCHES 256  /* top-level alternatives of a regex with a literal each */
#define PF_FACTOR_BIT 0x80000000u /* output: a regex group's literal */
#define PF_EXACT_BIT 0x40000000u  /* output: a case-sensitive literal to confirm */
#define PF_MAX_ERRORS 20          /* error lines reported per load */
#define PF_LOG_PER_SEC 20         /* lines (drops, limit hits) logged a second, the rest counted */
#define PF_RULE_TEXT 80           /* bytes of a rule's text kept for the log */
#define PF_JIT_STACK (512 * 1024) /* JIT matching stack */
#define PF_DEPTH_LIMIT 10000      /* interpreter: backtracking depth */
#define PF_HEAP_KIB 4096          /* interpreter: backtracking memory (KiB) */

#define PF_SCOPE_STRANGERS 1u
#define PF_SCOPE_REMOTE 2u
#define PF_SCOPE_ALL 4u

#define PF_RE_OPTIONS (PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF | PCRE2_NEVER_BACKSLASH_C)

/* ---- UTF-8 and case folding ------------------------------------------------ */

/* Decode one strictly valid UTF-8 sequence; its length, or 0 if invalid. */
static size_t
utf8_decode(const unsigned char *s, size_t len, unsigned *cp)
{
    unsigned c = s[0], v;
    size_t n, i;
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xc2 && c <= 0xdf)
        n = 2, v = c & 0x1f;
    else if (c >= 0xe0 && c <= 0xef)
        n = 3, v = c & 0x0f;
    else if (c >= 0xf0 && c <= 0xf4)
        n = 4, v = c & 0x07;
    else
        return 0;
    if (n > len)
        return 0;
    for (i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        v = (v << 6) | (s[i] & 0x3f);
    }
    if ((n == 3 && (v < 0x800 || (v >= 0xd800 && v <= 0xdfff))) ||
        (n == 4 && (v < 0x10000 || v > 0x10ffff)))
        return 0;
    *cp = v;
    return n;
}

static int
utf8_valid(const char *s, size_t len)
{
    unsigned cp;
    for (size_t i = 0, n; i < len; i += n)
        if (!(n = utf8_decode((const unsigned char *)s + i, len - i, &cp)))
            return 0;
    return 1;
}

static size_t
utf8_encode(unsigned cp, unsigned char *out)
{
    if (cp < 0x80) {
        out[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (unsigned char)(0xc0 | (cp >> 6));
        out[1] = (unsigned char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (unsigned char)(0xe0 | (cp >> 12));
        out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (unsigned char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (unsigned char)(0xf0 | (cp >> 18));
    out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
    out[3] = (unsigned char)(0x80 | (cp & 0x3f));
    return 4;
}

/*
 * Simple case folding, one code point to one: lower(upper(c)) in the
 * C.UTF-8 locale, so that K/k/KELVIN SIGN, s/S/LONG S and the three sigmas
 * fold alike.  Without that locale only ASCII folds.
 */
static unsigned
fold_cp(unsigned cp, locale_t loc)
{
    if (cp < 0x80)
        return cp >= 'A' && cp <= 'Z' ? cp + 32 : cp;
    if (!loc)
        return cp;
    wint_t f = towlower_l(towupper_l((wint_t)cp, loc), loc);
    return f > 0 && f <= 0x10ffff ? (unsigned)f : cp;
}

/* ---- Aho-Corasick ------------------------------------------------------------ */

/*
 * The compact automaton: states numbered breadth-first from 0 (the root), so
 * the shallow states most text keeps returning to share cache lines.  Each
 * state has its outgoing edges as a sorted byte run in label/target, a
 * failure link, a "dictionary" link (the nearest state on its failure chain
 * that has outputs) and a list of outputs, side by side in one record.  An
 * output value is a rule's line number, or PF_FACTOR_BIT | group for a
 * regex's required literal.  The root's transitions are a full table, the
 * hot path for text that matches nothing.
 */
typedef struct ac_out {
    uint32_t val, next; /* next: index + 1 in outs, 0 = end */
} ac_out;

typedef struct ac_state {
    uint32_t first;      /* edges [first, next state's first) */
    uint32_t fail, dict; /* dict: 0 = none */
    uint32_t out;        /* index + 1 in outs, 0 = none */
} ac_state;

typedef struct ac {
    uint32_t nstates, nouts;
    ac_state *st; /* nstates + 1: the last one only closes the edge runs */
    uint8_t *label;
    uint32_t *target;
    ac_out *outs;
    uint32_t root[256];
} ac;

/* Build-time trie: edges in a hash keyed by (state, byte). */
typedef struct ac_builder {
    uint64_t *keys; /* (state << 8 | byte) + 1, 0 = empty */
    uint32_t *vals;
    size_t cap, nedges;
    uint32_t nstates;
    uint32_t *out; /* per state, head (index + 1) */
    size_t outcap;
    ac_out *outs;
    uint32_t nouts, outsc;
    int failed;
} ac_builder;

static size_t
hash64(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return (size_t)k;
}

static uint32_t
acb_get(const ac_builder *b, uint32_t s, uint8_t c)
{
    uint64_t k = ((uint64_t)s << 8 | c) + 1;
    if (!b->cap)
        return 0;
    for (size_t i = hash64(k) & (b->cap - 1);; i = (i + 1) & (b->cap - 1)) {
        if (b->keys[i] == k)
            return b->vals[i];
        if (!b->keys[i])
            return 0;
    }
}

static int
acb_put(ac_builder *b, uint32_t s, uint8_t c, uint32_t t)
{
    uint64_t k = ((uint64_t)s << 8 | c) + 1;
    size_t i;
    if ((b->nedges + 1) * 2 > b->cap) {
        size_t ncap = b->cap ? b->cap * 2 : 1024;
        uint64_t *nk = calloc(ncap, sizeof(*nk));
        uint32_t *nv = malloc(ncap * sizeof(*nv));
        if (!nk || !nv) {
            free(nk);
            free(nv);
            return -1;
        }
        for (size_t j = 0; j < b->cap; j++) {
            if (!b->keys[j])
                continue;
            for (i = hash64(b->keys[j]) & (ncap - 1); nk[i]; i = (i + 1) & (ncap - 1))
                ;
            nk[i] = b->keys[j];
            nv[i] = b->vals[j];
        }
        free(b->keys);
        free(b->vals);
        b->keys = nk;
        b->vals = nv;
        b->cap = ncap;
    }
    for (i = hash64(k) & (b->cap - 1); b->keys[i]; i = (i + 1) & (b->cap - 1))
        ;
    b->keys[i] = k;
    b->vals[i] = t;
    b->nedges++;
    return 0;
}

/* Add a string with its output value; the empty string is never added. */
static void
acb_add(ac_builder *b, const unsigned char *s, size_t len, uint32_t val)
{
    uint32_t st = 0;
    if (b->failed || !len)
        return;
    if (!b->nstates)
        b->nstates = 1;
    for (size_t i = 0; i < len; i++) {
        uint32_t t = acb_get(b, st, s[i]);
        if (!t) {
            t = b->nstates++;
            if (acb_put(b, st, s[i], t) != 0) {
                b->failed = 1;
                return;
            }
        }
        st = t;
    }
    if (b->nstates > b->outcap) {
        size_t ncap = b->outcap ? b->outcap * 2 : 1024;
        while (ncap < b->nstates)
            ncap *= 2;
        uint32_t *o = realloc(b->out, ncap * sizeof(*o));
        if (!o) {
            b->failed = 1;
            return;
        }
        memset(o + b->outcap, 0, (ncap - b->outcap) * sizeof(*o));
        b->out = o;
        b->outcap = ncap;
    }
    for (uint32_t i = b->out[st]; i; i = b->outs[i - 1].next)
        if (b->outs[i - 1].val == val)
            return; /* the same rule twice (a regex's branches may share one) */
    if (b->nouts == b->outsc) {
        uint32_t ncap = b->outsc ? b->outsc * 2 : 256;
        ac_out *o = realloc(b->outs, ncap * sizeof(*o));
        if (!o) {
            b->failed = 1;
            return;
        }
        b->outs = o;
        b->outsc = ncap;
    }
    b->outs[b->nouts] = (ac_out){val, b->out[st]};
    b->out[st] = ++b->nouts;
}

static void
acb_free(ac_builder *b)
{
    free(b->keys);
    free(b->vals);
    free(b->out);
    free(b->outs);
    memset(b, 0, sizeof(*b));
}

static void
ac_free(ac *a)
{
    free(a->st);
    free(a->label);
    free(a->target);
    free(a->outs);
    memset(a, 0, sizeof(*a));
}

static uint32_t
ac_goto(const ac *a, uint32_t s, uint8_t c)
{
    uint32_t lo = a->st[s].first, hi = a->st[s + 1].first;
    if (hi - lo <= 8) {
        for (; lo < hi; lo++)
            if (a->label[lo] == c)
                return a->target[lo];
        return 0;
    }
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (a->label[mid] == c)
            return a->target[mid];
        if (a->label[mid] < c)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

static inline uint32_t
ac_step(const ac *a, uint32_t s, uint8_t c)
{
    for (;;) {
        uint32_t t;
        if (!s)
            return a->root[c];
        if ((t = ac_goto(a, s, c)))
            return t;
        s = a->st[s].fail;
    }
}

typedef struct edge {
    uint32_t from, to;
    uint8_t c;
} edge;

static int
edge_cmp(const void *x, const void *y)
{
    const edge *a = x, *b = y;
    if (a->from != b->from)
        return a->from < b->from ? -1 : 1;
    return (int)a->c - (int)b->c;
}

/* Turn the trie into the compact automaton: renumber breadth-first, then
 * failure and dictionary links in the same order.  0 ok, -1 out of memory;
 * b is consumed either way. */
static int
ac_finish(ac_builder *b, ac *a)
{
    uint32_t n = b->nstates, *oldfirst = NULL, *renum = NULL, *order = NULL, next = 1, ne = 0;
    edge *e = NULL;
    size_t k = 0;

    memset(a, 0, sizeof(*a));
    if (!n || b->failed) {
        int r = b->failed ? -1 : 0;
        acb_free(b);
        return r;
    }
    e = malloc((b->nedges ? b->nedges : 1) * sizeof(*e));
    oldfirst = calloc((size_t)n + 1, sizeof(uint32_t));
    renum = malloc((size_t)n * sizeof(uint32_t));
    order = malloc((size_t)n * sizeof(uint32_t));
    a->st = calloc((size_t)n + 1, sizeof(*a->st));
    a->label = malloc(b->nedges ? b->nedges : 1);
    a->target = malloc((b->nedges ? b->nedges : 1) * sizeof(uint32_t));
    if (!e || !oldfirst || !renum || !order || !a->st || !a->label || !a->target)
        goto oom;
    /* the trie's edges grouped by state, in byte order */
    for (size_t i = 0; i < b->cap; i++)
        if (b->keys[i])
            e[k++] = (edge){(uint32_t)((b->keys[i] - 1) >> 8), b->vals[i],
                            (uint8_t)((b->keys[i] - 1) & 0xff)};
    qsort(e, k, sizeof(*e), edge_cmp);
    for (size_t i = 0; i < k; i++)
        oldfirst[e[i].from + 1]++;
    for (uint32_t s = 0; s < n; s++)
        oldfirst[s + 1] += oldfirst[s];
    /* breadth-first: order[new] = old; a state's children get consecutive
     * numbers, so its edges are laid out in the same walk */
    order[0] = 0;
    renum[0] = 0;
    for (uint32_t q = 0; q < next; q++) {
        uint32_t old = order[q];
        a->st[q].first = ne;
        a->st[q].out = old < b->outcap ? b->out[old] : 0;
        for (uint32_t i = oldfirst[old]; i < oldfirst[old + 1]; i++) {
            renum[e[i].to] = next;
            order[next] = e[i].to;
            a->label[ne] = e[i].c;
            a->target[ne++] = next++;
        }
    }
    a->st[n].first = ne;
    a->nstates = n;
    a->outs = b->outs;
    a->nouts = b->nouts;
    b->outs = NULL;
    free(e);
    free(oldfirst);
    free(renum);
    free(order);
    e = NULL;

    /* failure links: depth 1 goes to the root; breadth-first order means a
     * state's failure target is always numbered (and linked) before it */
    for (uint32_t i = a->st[0].first; i < a->st[1].first; i++)
        a->root[a->label[i]] = a->target[i];
    for (uint32_t s = 1; s < n; s++) {
        for (uint32_t i = a->st[s].first; i < a->st[s + 1].first; i++) {
            uint32_t t = a->target[i], f;
            f = ac_step(a, a->st[s].fail, a->label[i]);
            a->st[t].fail = f == t ? 0 : f;
            f = a->st[t].fail;
            a->st[t].dict = a->st[f].out ? f : a->st[f].dict;
        }
    }
    acb_free(b);
    return 0;
oom:
    free(e);
    free(oldfirst);
    free(renum);
    free(order);
    ac_free(a);
    acb_free(b);
    return -1;
}

/* ---- the compiled set ---------------------------------------------------------- */

typedef struct pf_rule {
    uint32_t line;
    char text[PF_RULE_TEXT + 4];
} pf_rule;

/* A case-sensitive literal: the automaton has its folded form, a hit of
 * which is confirmed in the original text (rarely needed: the folded form
 * turns up without the exact one only in text of another case). */
typedef struct pf_exact {
    char *text;
    size_t len;
    uint32_t line;
} pf_exact;

typedef struct pf_set {
    ac ac;           /* over the case-folded text */
    pf_exact *exact; /* case-sensitive literals, checked on a folded hit */
    size_t nexact;
    pcre2_code **groups; /* combined regexes; [0, nalways) run on every stanza */
    uint32_t ngroups, nalways;
    uint32_t *stamp, gen;  /* per group: the scan that found one of its literals */
    uint32_t *cand, ncand; /* groups to run for this scan */
    pf_rule *rules;        /* sorted by line, for the log */
    size_t nrules, nlit, nre;
    size_t nre_factor; /* regexes behind a required literal */
} pf_set;

static void
set_free(pf_set *s)
{
    if (!s)
        return;
    ac_free(&s->ac);
    for (size_t i = 0; i < s->nexact; i++)
        free(s->exact[i].text);
    free(s->exact);
    for (uint32_t i = 0; i < s->ngroups; i++)
        pcre2_code_free(s->groups[i]);
    free(s->groups);
    free(s->stamp);
    free(s->cand);
    free(s->rules);
    free(s);
}

static const pf_rule *
set_rule(const pf_set *s, uint32_t line)
{
    size_t lo = 0, hi = s->nrules;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (s->rules[mid].line == line)
            return &s->rules[mid];
        if (s->rules[mid].line < line)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* ---- module state ---------------------------------------------------------------- */

typedef struct pf_conf {
    xd_module *m;
    const char *path;
    unsigned scope;
    uint32_t match_limit;
    uint64_t budget_ns;
    /* the regex time of all stanzas together: a token bucket of ns,
     * refilled at `share` percent of the clock, holding one second's worth;
     * used up (off), the regexes wait until half of it is back */
    unsigned share;
    int64_t share_tokens;
    uint64_t share_at, share_logged;
    int share_off;
    unsigned long share_skipped;
    pf_set *set;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jstack;
    pcre2_match_data *md;
    locale_t loc;
    /* drop log, rate-limited */
    double log_window;
    unsigned log_lines;
    unsigned long log_suppressed;
} pf_conf;

/* ---- loading a pattern file ------------------------------------------------------ */

typedef struct pf_regex {
    uint32_t line;
    int caseless;
    char *frag; /* (?:(*MARK:line)(?:re\E)) */
    size_t fraglen, csize;
    char *factors; /* one per top-level branch, each ended by a NUL */
    size_t factorslen;
    int nfactors; /* 0: runs on every stanza */
} pf_regex;

typedef struct pf_name {
    char *name;
    uint32_t line;
} pf_name;

typedef struct pf_build {
    pf_conf *c;
    const char *path;
    int at_start; /* errors go to xd_config_error, else the log */
    int errors;
    ac_builder ac;
    pf_exact *exact;
    size_t nexact, exactcap;
    pf_regex *re;
    size_t nre, recap;
    pf_rule *rules;
    size_t nrules, rulecap;
    pf_name *names;
    size_t nnames, namecap;
    size_t nlit;
} pf_build;

static void __attribute__((format(printf, 3, 4)))
build_error(pf_build *b, uint32_t line, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    b->errors++;
    if (b->errors > PF_MAX_ERRORS)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (b->at_start) {
        if (line)
            xd_config_error(b->c->m, "file", "%s:%u: %s", b->path, line, msg);
        else
            xd_config_error(b->c->m, "file", "%s: %s", b->path, msg);
    } else if (line) {
        xd_error("pattern_filter: %s:%u: %s", b->path, line, msg);
    } else {
        xd_error("pattern_filter: %s: %s", b->path, msg);
    }
}

static int
add_rule(pf_build *b, uint32_t line, const char *text, size_t len)
{
    pf_rule *r;
    if (b->nrules == b->rulecap) {
        size_t ncap = b->rulecap ? b->rulecap * 2 : 256;
        pf_rule *v = realloc(b->rules, ncap * sizeof(*v));
        if (!v)
            return -1;
        b->rules = v;
        b->rulecap = ncap;
    }
    r = &b->rules[b->nrules++];
    r->line = line;
    if (len > PF_RULE_TEXT) {
        /* cut on a character boundary, and say so */
        while (len > PF_RULE_TEXT || (len && ((unsigned char)text[len] & 0xc0) == 0x80))
            len--;
        memcpy(r->text, text, len);
        memcpy(r->text + len, "...", 4);
    } else {
        memcpy(r->text, text, len);
        r->text[len] = '\0';
    }
    return 0;
}

static void
fold_string(const char *s, size_t len, locale_t loc, unsigned char *out, size_t *outlen)
{
    size_t o = 0;
    for (size_t i = 0, n; i < len; i += n) {
        unsigned cp;
        n = utf8_decode((const unsigned char *)s + i, len - i, &cp);
        o += utf8_encode(fold_cp(cp, loc), out + o); /* s was validated */
    }
    *outlen = o;
}

/* Put the folded form of s (valid UTF-8) into the automaton. */
static void
add_folded(pf_build *b, const char *s, size_t len, uint32_t val)
{
    /* folding never makes a code point more than 4 bytes */
    unsigned char *f = malloc(len * 4 + 1);
    size_t flen;
    if (!f) {
        b->ac.failed = 1;
        return;
    }
    fold_string(s, len, b->c->loc, f, &flen);
    acb_add(&b->ac, f, flen, val);
    free(f);
}

static void
add_literal(pf_build *b, uint32_t line, const char *s, size_t len, int caseless)
{
    pf_exact *e;
    if (caseless) {
        add_folded(b, s, len, line);
        return;
    }
    if (b->nexact == b->exactcap) {
        size_t ncap = b->exactcap ? b->exactcap * 2 : 256;
        pf_exact *v = realloc(b->exact, ncap * sizeof(*v));
        if (!v) {
            b->ac.failed = 1;
            return;
        }
        b->exact = v;
        b->exactcap = ncap;
    }
    e = &b->exact[b->nexact];
    if (!(e->text = malloc(len))) {
        b->ac.failed = 1;
        return;
    }
    memcpy(e->text, s, len);
    e->len = len;
    e->line = line;
    add_folded(b, s, len, PF_EXACT_BIT | (uint32_t)b->nexact++);
}

/* -- reading PCRE2 syntax: only as much as the checks need -- */

static int
is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static int
is_alnum(char c)
{
    return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* A {n}, {n,}, {n,m} (or, newer PCRE2, {,m} with blanks) quantifier at p:
 * its end, and its minimum in *min (0 when unsure).  0 if not one. */
static size_t
brace_quant(const char *re, size_t len, size_t p, unsigned *min)
{
    size_t j = p + 1, k;
    unsigned v = 0;
    int digits = 0;
    if (p >= len || re[p] != '{')
        return 0;
    while (j < len &&
           (re[j] == ' ' || re[j] == '\t' || re[j] == ',' || (re[j] >= '0' && re[j] <= '9')))
        j++;
    if (j >= len || re[j] != '}')
        return 0;
    for (k = p + 1; k < j && (re[k] == ' ' || re[k] == '\t'); k++)
        ;
    for (; k < j && re[k] >= '0' && re[k] <= '9'; k++, digits = 1)
        v = v > 100000 ? v : v * 10 + (unsigned)(re[k] - '0');
    *min = digits ? v : 0;
    return j + 1;
}

/* p at '{', '<' or '\'': the index after the closing one, or 0. */
static size_t
delimited_end(const char *re, size_t len, size_t p)
{
    char close = re[p] == '{' ? '}' : re[p] == '<' ? '>' : '\'';
    for (p++; p < len; p++)
        if (re[p] == close)
            return p + 1;
    return 0;
}

/*
 * p at a backslash that does not stand for its own character: the end of
 * the sequence if it is one of those listed here -- a class (\d, \pL,
 * \p{Greek}), an assertion (\b), a reference (\k<n>, \g{-1}) or a coded
 * character (\x{e9}, \t) -- else 0 (octal, \Q, \E, ...).
 */
static size_t
escape_end(const char *re, size_t len, size_t p)
{
    char d = p + 1 < len ? re[p + 1] : '\0';
    size_t q = p + 2;

    if (d && strchr("dDwWsShHvVRXNbBAzZGKaefnrt", d))
        return q; /* \N{U+...} leaves a '{' that is no quantifier: see the caller */
    switch (d) {
    case 'p': /* \pL or \p{...} */
    case 'P':
        if (q < len && re[q] == '{')
            return delimited_end(re, len, q);
        return q < len && is_alnum(re[q]) ? q + 1 : 0;
    case 'x': /* \x{...} or up to two hex digits */
        if (q < len && re[q] == '{')
            return delimited_end(re, len, q);
        for (int k = 0; k < 2 && q < len && re[q] && strchr("0123456789abcdefABCDEF", re[q]); k++)
            q++;
        return q;
    case 'o':
        return q < len && re[q] == '{' ? delimited_end(re, len, q) : 0;
    case 'c': /* \cX, X any printable ASCII character */
        return q < len && (unsigned char)re[q] < 0x80 ? q + 1 : 0;
    case 'k':
    case 'g':
        if (q < len && (re[q] == '{' || re[q] == '<' || re[q] == '\''))
            return delimited_end(re, len, q);
        if (d == 'g' && q < len && re[q] == '-')
            q++;
        if (d != 'g' || q >= len || !is_digit(re[q]))
            return 0;
        while (q < len && is_digit(re[q]))
            q++;
        return q;
    }
    return 0;
}

/* p at a backslash inside a group or class: the end of the sequence, or 0. */
static size_t
any_escape_end(const char *re, size_t len, size_t p)
{
    if (p + 1 < len && (unsigned char)re[p + 1] < 0x80 && !is_alnum(re[p + 1]))
        return p + 2; /* escaped punctuation */
    return escape_end(re, len, p);
}

/* p at '[': the index after the class, or 0 if it holds what this reader
 * does not follow (a POSIX class, \Q...). */
static size_t
class_end(const char *re, size_t len, size_t p)
{
    p++;
    if (p < len && re[p] == '^')
        p++;
    if (p < len && re[p] == ']')
        p++; /* a ']' first is a member */
    while (p < len && re[p] != ']') {
        if (re[p] == '[')
            return 0;
        if (re[p] != '\\')
            p++;
        else if (!(p = any_escape_end(re, len, p)))
            return 0;
    }
    return p < len ? p + 1 : 0;
}

/* p at '(': the index after the matching ')', or 0. */
static size_t
group_end(const char *re, size_t len, size_t p)
{
    int depth = 0;
    while (p < len) {
        if (re[p] == '\\') {
            if (!(p = any_escape_end(re, len, p)))
                return 0;
        } else if (re[p] == '[') {
            if (!(p = class_end(re, len, p)))
                return 0;
        } else {
            if (re[p] == '(')
                depth++;
            else if (re[p] == ')' && --depth == 0)
                return p + 1;
            p++;
        }
    }
    return 0;
}

/* p at '\\Q': the index after the matching \E (or the end). */
static size_t
skip_quoted(const char *re, size_t len, size_t p)
{
    for (p += 2; p + 1 < len; p++)
        if (re[p] == '\\' && re[p + 1] == 'E')
            return p + 2;
    return len;
}

/* Why a regex cannot be combined with others, or NULL (see the header). */
static const char *
forbidden(const char *re, size_t len)
{
    size_t p = 0;
    while (p < len) {
        char c = re[p], d = p + 1 < len ? re[p + 1] : '\0', e = p + 2 < len ? re[p + 2] : '\0';
        char f = p + 3 < len ? re[p + 3] : '\0';
        if (c == '\\') {
            if (d == 'Q') {
                p = skip_quoted(re, len, p);
                continue;
            }
            if (d >= '1' && d <= '9')
                return "numbered back references (\\N) are not supported when patterns are "
                       "combined: use a relative \\g{-N} or a named group (octal: \\o{...})";
            if (d == 'g' && (is_digit(e) || ((e == '{' || e == '<' || e == '\'') && is_digit(f))))
                return "numbered references (\\gN, \\g{N}, \\g<N>) are not supported when patterns "
                       "are combined: use a relative (-N) or a named one";
            p += 2;
        } else if (c == '[') {
            /* inside a class, \1 is octal; a class not followed here is
             * read as if it were not one: on the safe side */
            size_t end = class_end(re, len, p);
            p = end ? end : p + 1;
        } else if (c == '(' && d == '*' && ((e >= 'A' && e <= 'Z') || e == ':')) {
            return "backtracking verbs and (*...) options are not supported when patterns are "
                   "combined";
        } else if (c == '(' && d == '?') {
            if (e == '#') {
                while (p < len && re[p] != ')')
                    p++;
                continue;
            }
            if (is_digit(e) || (e == 'R' && f == ')'))
                return "numbered subroutine calls and recursion ((?N), (?R)) are not "
                       "supported when patterns are combined: use (?-N) or (?&name)";
            if (e == '(' && (is_digit(f) || (f == 'R' && p + 4 < len && is_digit(re[p + 4]))))
                return "conditions on a group number ((?(N)...)) are not supported when patterns "
                       "are combined: use (?(<name>)...) or a relative (?(-N)...)";
            p += 2;
        } else {
            p++;
        }
    }
    return NULL;
}

/* Does an option group anywhere set (or unset) option letter o?  Crude but
 * on the safe side: used to decide that a regex may be caseless or
 * extended, never the other way. */
static int
mentions_option(const char *re, size_t len, char o)
{
    for (size_t p = 0; p + 2 < len; p++) {
        if (re[p] != '(' || re[p + 1] != '?')
            continue;
        for (size_t k = p + 2; k < len; k++) {
            char c = re[k];
            if (c == o)
                return 1;
            if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '-' || c == '^'))
                break;
        }
    }
    return 0;
}

/* The required literal of one top-level branch being scanned. */
typedef struct factor_scan {
    char cur[PF_MAX_FACTOR + 1], best[PF_MAX_FACTOR + 1];
    size_t curlen, bestlen;
    unsigned bestscore;
} factor_scan;

/* How rarely a run should turn up in ordinary text: lower-case letters and
 * blanks are everywhere, digits, capitals, punctuation and other scripts
 * less so.  The rarer the literal, the less often its regexes run. */
static unsigned
fs_score(const char *s, size_t n)
{
    unsigned v = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        v += (c >= 'a' && c <= 'z') || c == ' ' ? 2 : 3;
    }
    return v;
}

static void
fs_break(factor_scan *fs)
{
    unsigned score = fs->curlen >= PF_MIN_FACTOR ? fs_score(fs->cur, fs->curlen) : 0;
    if (score > fs->bestscore || (!fs->bestscore && fs->curlen > fs->bestlen)) {
        memcpy(fs->best, fs->cur, fs->curlen);
        fs->bestlen = fs->curlen;
        fs->bestscore = score;
        fs->best[fs->bestlen] = '\0';
    }
    fs->curlen = 0;
}

/* A literal character of the regex: part of the run, unless the regex is
 * caseless and the character is not ASCII (see below). */
static void
fs_take(factor_scan *fs, char *u, size_t un, int caseless)
{
    if (caseless && (un != 1 || (unsigned char)u[0] >= 0x80)) {
        fs_break(fs);
        return;
    }
    if (caseless && u[0] >= 'A' && u[0] <= 'Z')
        u[0] = (char)(u[0] + 32);
    if (fs->curlen + un > PF_MAX_FACTOR)
        fs_break(fs); /* a long run: what we have is required, start another */
    memcpy(fs->cur + fs->curlen, u, un);
    fs->curlen += un;
}

static int
no_factors(pf_regex *out)
{
    free(out->factors);
    out->factors = NULL;
    out->factorslen = 0;
    return 0;
}

/*
 * Literal characters every match of a regex contains: for each top-level
 * branch, the best run of characters (plain or escaped punctuation) that
 * are neither optional nor inside a group, class or escape sequence.  For
 * a caseless regex only ASCII runs are taken, folded to lower case (the
 * automaton they go into folds the text the same way; PCRE2's caseless
 * sets for non-ASCII characters are wider than a simple fold).  The number
 * of branches, or 0 when some branch has no such run of at least
 * PF_MIN_FACTOR bytes (the regex then runs on every stanza).
 *
 * A wrong literal would silently disable the rule, a missing one only
 * costs time: so this reads a small part of PCRE2's syntax, and the whole
 * regex gets no literal as soon as it meets anything outside that part
 * (octal, \Q...\E, comments, callouts, extended mode, POSIX classes, a
 * literal '{').  tests/unit/test_pattern_filter.c checks it against PCRE2
 * on random regexes.
 */
static int
extract_factors(const char *re, size_t len, int caseless, pf_regex *out)
{
    static const char *const unread[] = {"\\Q", "\\E", "(?#", "(?C"};
    factor_scan fs;
    size_t p = 0;
    int n = 0;

    for (size_t i = 0; i < sizeof(unread) / sizeof(*unread); i++)
        if (memmem(re, len, unread[i], strlen(unread[i])))
            return 0;
    if (mentions_option(re, len, 'x'))
        return 0; /* blanks and comments are not literal in extended mode */
    memset(&fs, 0, sizeof(fs));
    for (;;) {
        char u[4];
        size_t un = 0, q = 0;
        unsigned cp, min = 1;
        int quantified = 0;

        if (p >= len || re[p] == '|') {
            char *v;
            fs_break(&fs);
            if (fs.bestlen < PF_MIN_FACTOR || n == PF_MAX_BRANCHES ||
                !(v = realloc(out->factors, out->factorslen + fs.bestlen + 1)))
                return no_factors(out);
            memcpy(v + out->factorslen, fs.best, fs.bestlen + 1);
            out->factors = v;
            out->factorslen += fs.bestlen + 1;
            n++;
            if (p >= len)
                return n;
            memset(&fs, 0, sizeof(fs));
            p++;
            continue;
        }
        /* 1. the atom at p: a literal character u, or something else */
        if (re[p] == '\\' && p + 1 < len && (unsigned char)re[p + 1] < 0x80 &&
            !is_alnum(re[p + 1])) {
            u[0] = re[p + 1]; /* escaped punctuation or blank */
            un = 1;
            q = p + 2;
        } else if (re[p] == '\\') {
            q = escape_end(re, len, p);
        } else if (re[p] == '[') {
            q = class_end(re, len, p);
        } else if (re[p] == '(') {
            q = group_end(re, len, p);
        } else if (re[p] == '.' || re[p] == '^' || re[p] == '$') {
            q = p + 1;
        } else if (!strchr(")*+?{", re[p]) &&
                   (un = utf8_decode((const unsigned char *)re + p, len - p, &cp))) {
            memcpy(u, re + p, un);
            q = p + un;
        }
        if (!q)
            return no_factors(out);
        /* 2. its quantifier, if any */
        p = q;
        if (p < len && (re[p] == '?' || re[p] == '*' || re[p] == '+')) {
            min = re[p++] == '+';
            quantified = 1;
        } else if (p < len && re[p] == '{') {
            if (!(p = brace_quant(re, len, p, &min)))
                return no_factors(out); /* a literal '{' */
            quantified = 1;
        }
        if (quantified && p < len && (re[p] == '?' || re[p] == '+'))
            p++; /* lazy or possessive */
        /* 3. a literal that must occur extends the run; anything else ends it */
        if (un && min >= 1)
            fs_take(&fs, u, un, caseless);
        if (!un || quantified)
            fs_break(&fs);
    }
}

static int
add_regex(pf_build *b, uint32_t line, const char *re, size_t len, int caseless)
{
    pcre2_code *code;
    int err;
    PCRE2_SIZE off;
    size_t minlen = 0, namecount = 0, entrysize = 0, cap;
    PCRE2_SPTR table = NULL;
    const char *why;
    pf_regex *r;
    char *frag;

    if (!len) {
        build_error(b, line, "empty regular expression");
        return 0;
    }
    code = pcre2_compile((PCRE2_SPTR)re, len, PF_RE_OPTIONS | (caseless ? PCRE2_CASELESS : 0), &err,
                         &off, NULL);
    if (!code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof(msg));
        build_error(b, line, "bad regular expression at offset %zu: %s", (size_t)off, (char *)msg);
        return 0;
    }
    pcre2_pattern_info(code, PCRE2_INFO_MINLENGTH, &minlen);
    pcre2_pattern_info(code, PCRE2_INFO_NAMECOUNT, &namecount);
    pcre2_pattern_info(code, PCRE2_INFO_NAMEENTRYSIZE, &entrysize);
    pcre2_pattern_info(code, PCRE2_INFO_NAMETABLE, &table);
    if ((why = forbidden(re, len))) {
        build_error(b, line, "%s", why);
        pcre2_code_free(code);
        return 0;
    }
    if (minlen == 0) {
        build_error(b, line,
                    "the regular expression can match an empty string (it would drop "
                    "almost every message)");
        pcre2_code_free(code);
        return 0;
    }
    for (size_t i = 0; i < namecount; i++) {
        const char *name = (const char *)table + i * entrysize + 2;
        for (size_t k = 0; k < b->nnames; k++)
            if (!strcmp(b->names[k].name, name)) {
                build_error(b, line,
                            "group name '%s' is already used on line %u (names must be "
                            "unique across the file)",
                            name, b->names[k].line);
                pcre2_code_free(code);
                return 0;
            }
    }
    for (size_t i = 0; i < namecount; i++) {
        const char *name = (const char *)table + i * entrysize + 2;
        if (b->nnames == b->namecap) {
            size_t ncap = b->namecap ? b->namecap * 2 : 16;
            pf_name *v = realloc(b->names, ncap * sizeof(*v));
            if (!v) {
                pcre2_code_free(code);
                return -1;
            }
            b->names = v;
            b->namecap = ncap;
        }
        if (!(b->names[b->nnames].name = strdup(name))) {
            pcre2_code_free(code);
            return -1;
        }
        b->names[b->nnames++].line = line;
    }
    pcre2_code_free(code);

    /* The alternative as it goes into a combined pattern; compiled alone
     * too, which catches what would leak out of it (a (?x) comment running
     * to the end eats the closing parentheses).  \E ends a \Q left open. */
    cap = len + 64;
    if (!(frag = malloc(cap)))
        return -1;
    snprintf(frag, cap, "(?:(*MARK:%u)(?%s:%.*s\\E))", line, caseless ? "i" : "", (int)len, re);
    code = pcre2_compile((PCRE2_SPTR)frag, PCRE2_ZERO_TERMINATED, PF_RE_OPTIONS, &err, &off, NULL);
    if (!code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof(msg));
        build_error(b, line,
                    "the regular expression cannot be combined with others (%s); a (?x) "
                    "comment must not run to the end of the line",
                    (char *)msg);
        free(frag);
        return 0;
    }
    if (b->nre == b->recap) {
        size_t ncap = b->recap ? b->recap * 2 : 64;
        pf_regex *v = realloc(b->re, ncap * sizeof(*v));
        if (!v) {
            free(frag);
            pcre2_code_free(code);
            return -1;
        }
        b->re = v;
        b->recap = ncap;
    }
    r = &b->re[b->nre++];
    memset(r, 0, sizeof(*r));
    r->line = line;
    r->frag = frag;
    r->fraglen = strlen(frag);
    pcre2_pattern_info(code, PCRE2_INFO_SIZE, &r->csize);
    pcre2_code_free(code);
    r->caseless = caseless || mentions_option(re, len, 'i');
    /* without the locale the automaton does not fold KELVIN SIGN to k or
     * LONG S to s, which PCRE2's caseless matching does */
    r->nfactors = r->caseless && !b->c->loc ? 0 : extract_factors(re, len, r->caseless, r);
    return 0;
}

/* One line of the file (without its line ending).  0, or -1 out of memory. */
static int
parse_line(pf_build *b, uint32_t line, char *s, size_t len)
{
    size_t i = 0, start;
    int is_re = 0, caseless = 0;

    while (i < len && (s[i] == ' ' || s[i] == '\t'))
        i++;
    if (i == len || s[i] == '#')
        return 0;
    start = i;
    if (memchr(s, '\0', len)) {
        build_error(b, line, "NUL byte in the line");
        return 0;
    }
    if (!utf8_valid(s, len)) {
        build_error(b, line, "not valid UTF-8");
        return 0;
    }
    if (!strncmp(s + i, "re:", 3) || !strncmp(s + i, "re/", 3) || !strncmp(s + i, "lit:", 4) ||
        !strncmp(s + i, "lit/", 4)) {
        is_re = s[i] == 'r';
        i += is_re ? 2 : 3;
        if (s[i] == '/') {
            for (i++; i < len && s[i] != ':'; i++) {
                if (s[i] == 'i') {
                    caseless = 1;
                } else {
                    build_error(b, line, "unknown flag '%c' (known: i)", s[i]);
                    return 0;
                }
            }
            if (i == len) {
                build_error(b, line, "missing ':' after the flags");
                return 0;
            }
        }
        i++; /* ':' */
        if (add_rule(b, line, s + start, len - start) != 0)
            return -1;
        if (is_re)
            return add_regex(b, line, s + i, len - i, caseless);
        if (i == len) {
            build_error(b, line, "empty literal");
            return 0;
        }
        add_literal(b, line, s + i, len - i, caseless);
        b->nlit++;
        return 0;
    }
    /* a plain literal, trimmed */
    while (len > i && (s[len - 1] == ' ' || s[len - 1] == '\t'))
        len--;
    if (add_rule(b, line, s + i, len - i) != 0)
        return -1;
    add_literal(b, line, s + i, len - i, 0);
    b->nlit++;
    return 0;
}

static int
regex_cmp(const void *x, const void *y)
{
    const pf_regex *a = x, *b = y;
    if (!a->nfactors != !b->nfactors)
        return !a->nfactors ? -1 : 1; /* the ones that always run first */
    if (a->nfactors) {
        int r = strcmp(a->factors, b->factors); /* the first one */
        if (r)
            return r;
    }
    return a->line < b->line ? -1 : a->line > b->line;
}

/* Compile regexes [from, to) as one pattern into s->groups[s->ngroups++];
 * a pattern PCRE2 finds too large is split in two.  0 ok, -1 error. */
static int
compile_group(pf_build *b, pf_set *s, size_t from, size_t to)
{
    size_t len = 0, o = 0;
    char *pat;
    pcre2_code *code;
    int err, jr;
    PCRE2_SIZE off;

    for (size_t i = from; i < to; i++)
        len += b->re[i].fraglen + 1;
    if (!(pat = malloc(len + 1)))
        return -1;
    for (size_t i = from; i < to; i++) {
        if (i > from)
            pat[o++] = '|';
        memcpy(pat + o, b->re[i].frag, b->re[i].fraglen);
        o += b->re[i].fraglen;
    }
    code = pcre2_compile((PCRE2_SPTR)pat, o, PF_RE_OPTIONS, &err, &off, NULL);
    free(pat);
    if (!code) {
        PCRE2_UCHAR msg[256];
        if (err == PCRE2_ERROR_PATTERN_TOO_LARGE && to - from > 1) {
            size_t mid = from + (to - from) / 2;
            if (compile_group(b, s, from, mid) != 0)
                return -1;
            return compile_group(b, s, mid, to);
        }
        pcre2_get_error_message(err, msg, sizeof(msg));
        build_error(b, b->re[from].line,
                    "combining the regular expressions of lines %u.. failed: %s", b->re[from].line,
                    (char *)msg);
        return -1;
    }
    /* without JIT (no executable memory, say) the interpreter still works */
    if ((jr = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE)) != 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(jr, msg, sizeof(msg));
        xd_warn("pattern_filter: no JIT for the regexes from line %u (%s): interpreted",
                b->re[from].line, (char *)msg);
    }
    s->groups[s->ngroups++] = code;
    return 0;
}

/* Group the regexes, compile the groups, and feed the required literals to
 * the automaton.  0 ok, -1 error (reported). */
static int
build_groups(pf_build *b, pf_set *s)
{
    size_t i = 0, start, bytes;

    if (!b->nre)
        return 0;
    qsort(b->re, b->nre, sizeof(*b->re), regex_cmp);
    /* at most one pattern per regex, even split */
    if (!(s->groups = calloc(b->nre, sizeof(*s->groups))))
        return -1;
    /* the ones that always run: as few patterns as the size limit allows */
    while (i < b->nre && !b->re[i].nfactors) {
        for (start = i, bytes = 0; i < b->nre && !b->re[i].nfactors &&
                                   (i == start || bytes + b->re[i].csize <= PF_CHUNK_BYTES);
             i++)
            bytes += b->re[i].csize;
        if (compile_group(b, s, start, i) != 0)
            return -1;
    }
    s->nalways = s->ngroups;
    for (size_t k = 0; k < i; k++) {
        if (k == 20) {
            xd_info("pattern_filter: ... and %zu more such rule(s)", i - 20);
            break;
        }
        xd_info("pattern_filter: %s:%u has no literal of %d+ bytes: tried on every scanned "
                "stanza",
                b->path, b->re[k].line, PF_MIN_FACTOR);
    }
    while (i < b->nre) {
        for (start = i, bytes = 0; i < b->nre && i - start < PF_GROUP_MAX &&
                                   (i == start || bytes + b->re[i].csize <= PF_CHUNK_BYTES);
             i++)
            bytes += b->re[i].csize;
        uint32_t first = s->ngroups;
        if (compile_group(b, s, start, i) != 0)
            return -1;
        /* a split group: its literals wake all of its parts (rare; PCRE2
         * splits only when PF_CHUNK_BYTES is off) */
        for (uint32_t g = first; g < s->ngroups; g++)
            for (size_t k = start; k < i; k++)
                for (const char *fa = b->re[k].factors;
                     fa && fa < b->re[k].factors + b->re[k].factorslen; fa += strlen(fa) + 1)
                    add_folded(b, fa, strlen(fa), PF_FACTOR_BIT | g);
        s->nre_factor += i - start;
    }
    return 0;
}

static void
build_free(pf_build *b)
{
    for (size_t i = 0; i < b->nre; i++) {
        free(b->re[i].frag);
        free(b->re[i].factors);
    }
    free(b->re);
    for (size_t i = 0; i < b->nnames; i++)
        free(b->names[i].name);
    free(b->names);
    free(b->rules);
    acb_free(&b->ac);
    for (size_t i = 0; i < b->nexact; i++)
        free(b->exact[i].text);
    free(b->exact);
}

/* Read and compile the file.  The new set, or NULL (errors reported). */
static pf_set *
load_set(pf_conf *c, const char *path, int at_start)
{
    pf_build b;
    pf_set *s = NULL;
    FILE *f;
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    uint32_t lineno = 0;
    int oom = 0;

    memset(&b, 0, sizeof(b));
    b.c = c;
    b.path = path;
    b.at_start = at_start;
    if (!(f = fopen(path, "r"))) {
        build_error(&b, 0, "cannot open: %s", strerror(errno));
        return NULL;
    }
    while (!oom && (n = getline(&line, &cap, f)) >= 0) {
        size_t len = (size_t)n;
        lineno++;
        if (len && line[len - 1] == '\n')
            len--;
        if (len && line[len - 1] == '\r')
            len--;
        oom = parse_line(&b, lineno, line, len) != 0;
    }
    if (!oom && ferror(f))
        build_error(&b, 0, "read error: %s", strerror(errno));
    free(line);
    fclose(f);
    if (oom || b.ac.failed) {
        build_error(&b, 0, "out of memory");
        goto out;
    }
    if (b.errors)
        goto out;
    if (!(s = calloc(1, sizeof(*s))))
        goto fail;
    s->nlit = b.nlit;
    s->nre = b.nre;
    if (build_groups(&b, s) != 0)
        goto fail;
    if ((s->ngroups && (!(s->stamp = calloc(s->ngroups, sizeof(uint32_t))) ||
                        !(s->cand = calloc(s->ngroups, sizeof(uint32_t))))) ||
        ac_finish(&b.ac, &s->ac) != 0) {
        build_error(&b, 0, "out of memory");
        goto fail;
    }
    s->rules = b.rules;
    s->nrules = b.nrules;
    b.rules = NULL;
    s->exact = b.exact;
    s->nexact = b.nexact;
    b.exact = NULL;
    b.nexact = 0;
    goto out;
fail:
    if (!b.errors)
        build_error(&b, 0, "out of memory");
    set_free(s);
    s = NULL;
out:
    if (b.errors > PF_MAX_ERRORS) {
        if (at_start)
            xd_config_error(c->m, "file", "%s: %d more errors", path, b.errors - PF_MAX_ERRORS);
        else
            xd_error("pattern_filter: %s: %d more errors", path, b.errors - PF_MAX_ERRORS);
    }
    build_free(&b);
    return s;
}

static void
log_set(const char *what, const char *path, const pf_set *s)
{
    xd_info("pattern_filter: %s %zu rule(s) from %s: %zu literal(s), %zu regex(es) in %u "
            "pattern(s); %zu regex(es) without a literal of %d+ bytes run on every scanned stanza",
            what, s->nlit + s->nre, path, s->nlit, s->nre, s->ngroups, s->nre - s->nre_factor,
            PF_MIN_FACTOR);
}

/* ---- matching --------------------------------------------------------------------- */

/* The outputs reachable from state st, the text having been read up to
 * (not including) byte `end`: a literal's line, or 0 after noting the regex
 * groups whose literal was seen. */
static uint32_t
ac_outputs(const ac *a, uint32_t st, pf_set *s, const unsigned char *text, size_t end)
{
    for (uint32_t t = a->st[st].out ? st : a->st[st].dict; t; t = a->st[t].dict) {
        for (uint32_t o = a->st[t].out; o; o = a->outs[o - 1].next) {
            uint32_t v = a->outs[o - 1].val;
            if (v & PF_FACTOR_BIT) {
                v &= ~PF_FACTOR_BIT;
                if (s->stamp[v] != s->gen) {
                    s->stamp[v] = s->gen;
                    s->cand[s->ncand++] = v;
                }
            } else if (v & PF_EXACT_BIT) {
                /* an exact occurrence ends exactly here, if anywhere */
                const pf_exact *e = &s->exact[v & ~PF_EXACT_BIT];
                if (end >= e->len && !memcmp(text + end - e->len, e->text, e->len))
                    return e->line;
            } else {
                return v;
            }
        }
    }
    return 0;
}

#define AC_FEED(BYTE, END)                                                                         \
    do {                                                                                           \
        st = ac_step(a, st, (BYTE));                                                               \
        if ((a->st[st].out | a->st[st].dict) && (hit = ac_outputs(a, st, s, t, (END))) != 0)       \
            return hit;                                                                            \
    } while (0)

static uint64_t
mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

#define PF_LIMIT_MATCH 1u  /* a regex gave up on match_limit or its stack */
#define PF_LIMIT_BUDGET 2u /* the stanza's time budget ran out */
#define PF_LIMIT_SHARE 4u  /* max_scan_share was used up: regexes skipped */

/* One stanza's scan. */
typedef struct pf_scan {
    uint64_t deadline; /* monotonic ns: the stanza's max_scan_ms */
    int regexes;       /* 0: max_scan_share is used up, literals only */
    unsigned limited;  /* PF_LIMIT_* */
    uint64_t re_ns;    /* time spent in regexes */
} pf_scan;

/*
 * The line of the first rule found in text, or 0.  Once the stanza's
 * budget is spent, no more regexes run for it -- only the automaton, which
 * is linear -- so a stanza of many bodies cannot multiply the cost of a
 * slow regex.
 */
static uint32_t
scan_text(pf_conf *c, pf_set *s, const char *text, size_t len, pf_scan *sc)
{
    const unsigned char *t = (const unsigned char *)text;
    const ac *a = &s->ac;
    uint32_t st = 0, hit;
    uint64_t start = 0, now;

    if (++s->gen == 0) {
        if (s->stamp)
            memset(s->stamp, 0, s->ngroups * sizeof(uint32_t));
        s->gen = 1;
    }
    s->ncand = 0;
    /* one pass over the text, case-folded a code point at a time */
    for (size_t i = 0; i < len && a->nstates;) {
        unsigned char f[4];
        unsigned cp;
        size_t n, fn;
        if (t[i] < 0x80) {
            AC_FEED(t[i] >= 'A' && t[i] <= 'Z' ? t[i] + 32 : t[i], i + 1);
            i++;
            continue;
        }
        if ((n = utf8_decode(t + i, len - i, &cp))) {
            fn = utf8_encode(fold_cp(cp, c->loc), f);
        } else {
            f[0] = t[i]; /* not UTF-8: the byte as it is */
            fn = n = 1;
        }
        for (size_t k = 0; k < fn; k++)
            AC_FEED(f[k], i + n);
        i += n;
    }
    if (s->ncand + s->nalways && !sc->regexes) {
        sc->limited |= PF_LIMIT_SHARE;
        return 0;
    }
    /* the groups whose literal was seen, then the ones that always run */
    for (uint32_t k = 0; k < s->ncand + s->nalways && !(sc->limited & PF_LIMIT_BUDGET); k++) {
        uint32_t g = k < s->ncand ? s->cand[k] : k - s->ncand;
        int rc;
        if ((now = mono_ns()) > sc->deadline) {
            sc->limited |= PF_LIMIT_BUDGET;
            break;
        }
        if (!start)
            start = now;
        rc = pcre2_match(s->groups[g], t, len, 0, 0, c->md, c->mctx);
        if (rc >= 0) {
            PCRE2_SPTR mark = pcre2_get_mark(c->md);
            unsigned long line = mark ? strtoul((const char *)mark, NULL, 10) : 0;
            sc->re_ns += mono_ns() - start;
            return line ? (uint32_t)line : 1;
        }
        /* match_limit, depth/heap/JIT stack limits, out of memory: no
         * match, but say so */
        if (rc != PCRE2_ERROR_NOMATCH)
            sc->limited |= PF_LIMIT_MATCH;
    }
    if (start)
        sc->re_ns += mono_ns() - start;
    return 0;
}

#define PF_SHARE_LOG_NS 10000000000ull /* a warning about max_scan_share at most every 10 s */

/*
 * May the regexes run for a stanza starting at now (monotonic ns)?  The
 * bucket refills at max_scan_share percent of the clock up to one
 * second's worth; regexes that ran are charged with share_charge().  Once
 * it is empty they stay off until half of it is back: a flood of stanzas
 * for a slow regex then costs literals only, and the regexes do not flap
 * on and off with every stanza.
 */
static int
share_allows(pf_conf *c, uint64_t now)
{
    int64_t cap = (int64_t)c->share * 10000000; /* share % of 1 s, in ns */

    if (now > c->share_at) {
        uint64_t add = (now - c->share_at) / 100 * c->share;
        int64_t room = cap - c->share_tokens;
        c->share_tokens = add >= (uint64_t)room ? cap : c->share_tokens + (int64_t)add;
        c->share_at = now;
    }
    if (c->share_off && c->share_tokens >= cap / 2) {
        c->share_off = 0;
    } else if (!c->share_off && c->share_tokens <= 0) {
        c->share_off = 1;
        if (!c->share_logged || now - c->share_logged >= PF_SHARE_LOG_NS) {
            c->share_logged = now;
            xd_warn("pattern_filter: regular expressions used up max_scan_share (%u%% of one "
                    "CPU): skipped until half of that is back, literals still apply (%lu "
                    "stanza(s) without regexes so far)",
                    c->share, c->share_skipped);
        }
    }
    return !c->share_off;
}

static void
share_charge(pf_conf *c, uint64_t ns)
{
    c->share_tokens -= (int64_t)ns;
}

/* ---- the hook ------------------------------------------------------------------------ */

/* Never filtered: a user's own account, and the server itself. */
static int
exempt(const xd_jid *from, const xd_jid *to)
{
    if (!strcmp(from->local, to->local) && !strcmp(from->domain, to->domain))
        return 1;
    return !from->local[0] && xd_is_local_host(from->domain);
}

/* Is the sender in the configured scope?  The roster lookup (a storage
 * read) is left for last: the caller asks only after a rule matched. */
static int
in_scope(const pf_conf *c, const xd_jid *from, const xd_jid *to)
{
    xd_jid ub, cb;
    int rel;

    if (c->scope & PF_SCOPE_ALL)
        return 1;
    if ((c->scope & PF_SCOPE_REMOTE) && !xd_is_local_host(from->domain))
        return 1;
    if (c->scope & PF_SCOPE_STRANGERS) {
        ub = *to;
        cb = *from;
        xd_jid_to_bare(&ub);
        xd_jid_to_bare(&cb);
        rel = xd_roster_relation(&ub, &cb);
        /* -1: no roster module (or an error): nobody is known.  A contact
         * that only asked to subscribe is still a stranger. */
        if (rel <= 0 || !(rel & ~XD_ROSTER_PENDING_IN))
            return 1;
    }
    return 0;
}

/* One log line per event, at most PF_LOG_PER_SEC a second: a flood of spam
 * must not become a flood of log.  1 if this one may be logged. */
static int
log_budget(pf_conf *c)
{
    double now = xd_now();
    if (now - c->log_window >= 1.0) {
        if (c->log_suppressed)
            xd_info("pattern_filter: %lu more event(s) (drops, limit hits) not logged",
                    c->log_suppressed);
        c->log_window = now;
        c->log_lines = 0;
        c->log_suppressed = 0;
    }
    if (++c->log_lines > PF_LOG_PER_SEC) {
        c->log_suppressed++;
        return 0;
    }
    return 1;
}

static void
log_drop(pf_conf *c, const char *what, const xd_jid *from, const xd_jid *to, uint32_t line)
{
    char f[XD_JID_STR_MAX], t[XD_JID_STR_MAX], text[PF_RULE_TEXT * 4 + 8];
    const pf_rule *r = set_rule(c->set, line);
    size_t o = 0;

    if (!log_budget(c))
        return;
    if (xd_jid_format(from, 1, f, sizeof(f)) < 0)
        snprintf(f, sizeof(f), "?");
    if (xd_jid_format(to, 1, t, sizeof(t)) < 0)
        snprintf(t, sizeof(t), "?");
    /* the rule's text, with control characters escaped for the log */
    for (const char *p = r ? r->text : ""; *p && o + 5 < sizeof(text); p++) {
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            o += (size_t)snprintf(text + o, sizeof(text) - o, "\\x%02x", (unsigned char)*p);
        else
            text[o++] = *p;
    }
    text[o] = '\0';
    xd_info("pattern_filter: dropped %s from %s to %s: rule %s:%u (%s)", what, f, t, c->path, line,
            text);
}

static int
scan_children(pf_conf *c, xmpp_stanza_t *st, const char *name, uint32_t *line, pf_scan *sc)
{
    int found = 0;
    for (xmpp_stanza_t *ch = xmpp_stanza_get_children(st); ch && !*line;
         ch = xmpp_stanza_get_next(ch)) {
        const char *n = xmpp_stanza_is_tag(ch) ? xmpp_stanza_get_name(ch) : NULL;
        const char *ns;
        char *text;
        if (!n || strcmp(n, name) != 0)
            continue;
        /* jabber:client / jabber:server children carry no xmlns of their own */
        if ((ns = xmpp_stanza_get_ns(ch)) && strcmp(ns, "jabber:client") != 0 &&
            strcmp(ns, "jabber:server") != 0)
            continue;
        found = 1;
        if (!(text = xmpp_stanza_get_text(ch)))
            continue;
        *line = scan_text(c, c->set, text, strlen(text), sc);
        xmpp_free(xd_ctx(), text);
    }
    return found;
}

/* XD_HOOK_DELIVER_LOCAL: messages with a body, subscription requests.  About 900
 * instructions for a roster contact's message with the sample scope (the scan is
 * skipped); bench/pattern_filter.py measures the scan itself. */
static int
pf_deliver(xd_event *ev, void *data)
{
    pf_conf *c = data;
    xmpp_stanza_t *st = ev->stanza;
    const char *name = xmpp_stanza_get_name(st), *type, *child, *what;
    uint64_t t0, t1;
    uint32_t line = 0;
    pf_scan sc = {0};

    if (!c->set || !ev->from || !ev->to || !name)
        return XD_PASS;
    if (!strcmp(name, "message")) {
        child = "body";
        what = "message";
    } else if (!strcmp(name, "presence") && (type = xmpp_stanza_get_type(st)) &&
               !strcmp(type, "subscribe")) {
        child = "status";
        what = "subscription request";
    } else {
        return XD_PASS;
    }
    if (!xmpp_stanza_get_child_by_name(st, child) || exempt(ev->from, ev->to) ||
        (c->scope == PF_SCOPE_REMOTE && xd_is_local_host(ev->from->domain)))
        return XD_PASS;
    t0 = mono_ns();
    sc.deadline = t0 + c->budget_ns;
    sc.regexes = share_allows(c, t0);
    scan_children(c, st, child, &line, &sc);
    t1 = mono_ns();
    share_charge(c, sc.re_ns);
    xd_count(c->m, "scanned", 1);
    xd_count(c->m, "scan_ns", (unsigned long)(t1 - t0));
    if (sc.limited & PF_LIMIT_SHARE) {
        c->share_skipped++;
        xd_count(c->m, "regex_skipped", 1);
    }
    if (sc.limited & (PF_LIMIT_MATCH | PF_LIMIT_BUDGET)) {
        char f[XD_JID_STR_MAX];
        xd_count(c->m, "limit_hits", 1);
        if (xd_jid_format(ev->from, 1, f, sizeof(f)) < 0)
            snprintf(f, sizeof(f), "?");
        if (log_budget(c)) {
            if (sc.limited & PF_LIMIT_BUDGET)
                xd_warn("pattern_filter: a %s from %s used up max_scan_ms (%u): the rest of its "
                        "regular expressions were skipped",
                        what, f, (unsigned)(c->budget_ns / 1000000u));
            else
                xd_warn("pattern_filter: a regular expression hit match_limit (%u) or a stack "
                        "limit on a %s from %s: taken as no match",
                        c->match_limit, what, f);
        }
    }
    if (!line)
        return XD_PASS;
    if (!in_scope(c, ev->from, ev->to)) {
        xd_count(c->m, "spared", 1); /* a match, but from a contact: see the scope */
        return XD_PASS;
    }
    xd_count(c->m, "dropped", 1);
    log_drop(c, what, ev->from, ev->to, line);
    return XD_DROP; /* spam gets no answer */
}

/* XD_HOOK_RELOAD (SIGHUP): the new set replaces the old only if it all compiled. */
static int
pf_reload(xd_event *ev, void *data)
{
    pf_conf *c = data;
    pf_set *s = load_set(c, c->path, 0);
    (void)ev;
    if (!s) {
        xd_error("pattern_filter: reload of %s failed, keeping the previous %zu rule(s)", c->path,
                 c->set ? c->set->nlit + c->set->nre : 0);
        return XD_PASS;
    }
    set_free(c->set);
    c->set = s;
    log_set("reloaded", c->path, s);
    return XD_PASS;
}

/* ---- the module ------------------------------------------------------------------------ */

/* The limits of every match: match_limit for JIT and interpreter alike;
 * the interpreter (when JIT compilation failed) also gets a bound on its
 * backtracking depth and memory, which PCRE2 would let grow to gigabytes. */
static pcre2_match_context *
match_context_new(uint32_t match_limit, pcre2_jit_stack *js)
{
    pcre2_match_context *mc = pcre2_match_context_create(NULL);
    if (!mc)
        return NULL;
    pcre2_set_match_limit(mc, match_limit);
    pcre2_set_depth_limit(mc, PF_DEPTH_LIMIT);
    pcre2_set_heap_limit(mc, PF_HEAP_KIB);
    pcre2_jit_stack_assign(mc, NULL, js);
    return mc;
}

static const xd_setting pf_settings[] = {
    {"file", XD_SETTING_STRING},        /* the pattern file */
    {"scope", XD_SETTING_STRING_LIST},  /* strangers, remote, all */
    {"match_limit", XD_SETTING_INT},    /* per match */
    {"max_scan_ms", XD_SETTING_INT},    /* regex time per stanza */
    {"max_scan_share", XD_SETTING_INT}, /* regex time of all stanzas: % of one CPU */
    {NULL, 0},
};

static void
pf_unload(xd_module *m)
{
    pf_conf *c = xd_module_get_data(m);
    if (!c)
        return;
    set_free(c->set);
    pcre2_match_data_free(c->md);
    pcre2_match_context_free(c->mctx);
    pcre2_jit_stack_free(c->jstack);
    if (c->loc)
        freelocale(c->loc);
    free(c);
    xd_module_set_data(m, NULL);
}

static int
pf_load(xd_module *m)
{
    pf_conf *c;
    long long limit = xd_config_int(m, "match_limit", 1000000);
    long long budget = xd_config_int(m, "max_scan_ms", 20);
    long long share = xd_config_int(m, "max_scan_share", 25);
    int nscope = xd_config_list_count(m, "scope"), r = 0;

    if (!(c = calloc(1, sizeof(*c))))
        return -1;
    c->m = m;
    xd_module_set_data(m, c);
    if (limit < 1000 || limit > 1000000000) {
        xd_config_error(m, "match_limit", "must be from 1000 to 1000000000");
        return -1;
    }
    c->match_limit = (uint32_t)limit;
    if (budget < 1 || budget > 60000) {
        xd_config_error(m, "max_scan_ms", "must be from 1 to 60000");
        return -1;
    }
    c->budget_ns = (uint64_t)budget * 1000000u;
    if (share < 1 || share > 100) {
        xd_config_error(m, "max_scan_share", "must be from 1 to 100 (percent of one CPU)");
        return -1;
    }
    c->share = (unsigned)share;
    c->share_tokens = (int64_t)c->share * 10000000;
    c->share_at = mono_ns();
    if (nscope <= 0) /* absent or empty: the issue's "strangers and remote senders" */
        c->scope = PF_SCOPE_STRANGERS | PF_SCOPE_REMOTE;
    for (int i = 0; i < nscope; i++) {
        const char *v = xd_config_list_item(m, "scope", i);
        if (v && !strcmp(v, "strangers"))
            c->scope |= PF_SCOPE_STRANGERS;
        else if (v && !strcmp(v, "remote"))
            c->scope |= PF_SCOPE_REMOTE;
        else if (v && !strcmp(v, "all"))
            c->scope |= PF_SCOPE_ALL;
        else {
            xd_config_error(m, "scope", "unknown scope '%s' (known: strangers, remote, all)",
                            v ? v : "");
            return -1;
        }
    }
    if (!(c->path = xd_config_string(m, "file", NULL)) || !c->path[0]) {
        xd_config_error(m, "file", "the pattern file is required");
        return -1;
    }
    if (!(c->loc = newlocale(LC_CTYPE_MASK, "C.UTF-8", (locale_t)0)))
        xd_warn("pattern_filter: no C.UTF-8 locale: case-insensitive rules fold ASCII only");
    c->jstack = pcre2_jit_stack_create(32 * 1024, PF_JIT_STACK, NULL);
    c->md = pcre2_match_data_create(1, NULL);
    if (!c->jstack || !c->md || !(c->mctx = match_context_new(c->match_limit, c->jstack)))
        return -1;
    if (!(c->set = load_set(c, c->path, 1)))
        return -1;
    log_set("loaded", c->path, c->set);
    /* the counters show (as 0) from the start */
    xd_count(m, "scanned", 0);
    xd_count(m, "dropped", 0);
    xd_count(m, "spared", 0);
    xd_count(m, "limit_hits", 0);
    xd_count(m, "regex_skipped", 0);
    xd_count(m, "scan_ns", 0);
    r |= xd_hook(m, XD_HOOK_DELIVER_LOCAL, pf_deliver, c, XD_PRIO_HIGH + 100);
    r |= xd_hook(m, XD_HOOK_RELOAD, pf_reload, c, XD_PRIO_DEFAULT);
    return r ? -1 : 0;
}

XD_MODULE(pattern_filter) = {
    .abi = XD_MODULE_ABI,
    .name = "pattern_filter",
    .settings = pf_settings,
    .load = pf_load,
    .unload = pf_unload,
};
