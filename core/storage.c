/*
 * Storage on Berkeley DB 5.3: one transactional environment in the data
 * directory, one B-tree file per named table.  Every handle but the
 * environment's is used by the event loop's thread alone.
 *
 * Group commit.  A disk flush takes from microseconds (tmpfs) to 10 ms (a
 * real disk); doing one per change on the event loop made every user wait
 * for every other user's flush.  So, once the server has started the
 * flusher (xd_store_start_flusher):
 *
 *  - commits on the loop are DB_TXN_NOSYNC: the log records go to Berkeley
 *    DB's in-memory log buffer and the commit returns at once.  Each write
 *    commit gets the next number (xd_store_commits()).
 *  - before the loop sleeps (an ev_prepare watcher, so once per loop turn)
 *    it asks the flusher thread to make every commit so far durable.
 *  - the flusher writes and fsyncs the log (DB_ENV->log_flush, which covers
 *    every record written before it), at most once per FLUSH_MIN_INTERVAL,
 *    so under load many loop turns' commits share one flush; then it tells
 *    the loop (ev_async) how far the disk has got.  It also checkpoints and
 *    trickles dirty pages out of the cache, so the loop never waits for a
 *    page write either.
 *  - the loop then runs what waited for those commits (xd_store_when_durable):
 *    XEP-0198 acks, IQ results, notices.  Nothing tells a sender "done"
 *    before its data is on disk; a kill -9 loses only what was never
 *    acknowledged, and recovery at the next start replays the rest.
 *
 * Without the flusher (xmppctl, unit tests) commits are synchronous and
 * every commit is durable when it returns.
 *
 * One process at a time.  The environment is private (DB_PRIVATE): its cache
 * and locks live in this process's memory, not in __db.* files mapped from
 * the data directory, so the kernel never writes the cache back behind our
 * back and a page fault on it never waits for the file system's journal (it
 * did: p99.9 of tens of ms under load).  An exclusive lock on the file
 * LOCK_FILE keeps a second process out; xmppctl talks to a running server
 * over its admin socket instead (admin.c).
 *
 * If the log cannot be flushed, the flusher stops and the server shuts down:
 * it never acknowledges what it could not store (fail closed).
 */
#include <db.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <time.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <ev.h>

#include <xmppd/log.h>
#include <xmppd/storage.h>

#include "store.h"

#define TABLE_NAME_MAX 64
/* Held (flock, exclusive) by the one process that has the environment open;
 * it holds that process's pid, for the error message of the next one. */
#define LOCK_FILE "xmppd.lock"
#define TABLES_MAX 32
#define CACHE_BYTES (64u * 1024u * 1024u)
/* The in-memory log buffer: commits between two flushes must fit, or a
 * commit on the loop writes the buffer out itself (a write, not a sync). */
#define LOG_BUFFER_BYTES (8u * 1024u * 1024u)
/* At most one log flush per this many seconds: under load, the commits of
 * many loop turns share one.  An idle server flushes a lone commit at once. */
#define FLUSH_MIN_INTERVAL 0.004
/* Every this many seconds, checkpoint (dirty pages to the table files, old
 * log files removed) if this much log was written since the last one: small
 * and frequent, so no checkpoint is a burst of writes that holds up the loop. */
#define CHECKPOINT_INTERVAL 5.0
#define CHECKPOINT_KBYTES (4u * 1024u)
/* Keep this share of the cache clean, so the loop never writes a page. */
#define TRICKLE_PERCENT 20
/* foreach copies this many records, then closes its cursor before calling
 * back, so no page lock is held while fn runs (see xd_db_foreach). */
#define FOREACH_BATCH 64

struct xd_db {
    DB *dbp;
    int heap; /* a heap table (xd_heap_open), else a B-tree */
    char name[TABLE_NAME_MAX + 1];
};

/* A wrapper rather than a cast, so a stray xd_txn * cannot be mistaken for
 * another handle type. */
struct xd_txn {
    DB_TXN *t;
};

/*
 * The only mutable global state of the storage layer: the environment and
 * the tables opened so far.  Tables live until xd_store_close(); their
 * addresses are handed out to modules, hence a fixed array that never moves.
 */
/* Something waiting for a commit to be durable (xd_store_when_durable). */
typedef struct waiter {
    uint64_t commit;
    xd_durable_fn fn;
    xd_durable_fn drop;
    void *data;
} waiter;

static struct {
    DB_ENV *env;
    int lock_fd;
    int quiet_busy; /* xd_store_quiet_busy() */
    struct xd_db tables[TABLES_MAX];
    int ntables;

    /* Loop thread only. */
    uint64_t committed;   /* number of the newest write commit */
    uint64_t durable;     /* every commit up to here is on disk */
    uint64_t requested;   /* the flusher was asked up to here */
    waiter *waiters;      /* a ring, in commit order */
    size_t wfirst, wcount, wcap;
    struct ev_loop *loop;
    ev_prepare kick_w;
    ev_async done_w;
    xd_store_fail_fn on_failure;

    /* The flusher thread; the fields below are shared, under mu. */
    int flusher;          /* started */
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t want;        /* flush up to here */
    uint64_t flushed;     /* on disk up to here */
    unsigned long nflushes;
    int stop, failed;
} store = {.lock_fd = -1, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

/* ---- environment ---------------------------------------------------------- */

static void bdb_errcall(const DB_ENV *env, const char *prefix, const char *msg)
{
    (void)env;
    xd_error("storage: %s%s%s", prefix ? prefix : "", prefix ? ": " : "", msg);
}

static void bdb_msgcall(const DB_ENV *env, const char *msg)
{
    (void)env;
    xd_info("storage: %s", msg);
}

/* mkdir -p with mode 0700 for the parts we create. */
static int make_dir(const char *dir)
{
    char path[4096];
    size_t n = strlen(dir);

    if (n == 0 || n >= sizeof(path)) {
        xd_error("storage: bad data directory '%s'", dir);
        return -1;
    }
    memcpy(path, dir, n + 1);
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(path, 0700) != 0 && errno != EEXIST) {
            xd_error("storage: mkdir %s: %s", path, strerror(errno));
            return -1;
        }
        *p = '/';
    }
    if (mkdir(path, 0700) != 0 && errno != EEXIST) {
        xd_error("storage: mkdir %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

/*
 * DB_TXN_NOWAIT: in a single-threaded server a lock wait could only end when
 * another of our own transactions finishes, which never happens while we
 * wait, so a conflict fails at once with DB_LOCK_DEADLOCK instead of hanging.
 */
static int env_configure(DB_ENV *env)
{
    int ret;

    env->set_errcall(env, bdb_errcall);
    env->set_msgcall(env, bdb_msgcall);
    if ((ret = env->set_cachesize(env, 0, CACHE_BYTES, 1)) != 0 ||
        (ret = env->set_lk_detect(env, DB_LOCK_DEFAULT)) != 0 ||
        (ret = env->set_flags(env, DB_TXN_NOWAIT, 1)) != 0 ||
        (ret = env->set_lg_bsize(env, LOG_BUFFER_BYTES)) != 0 ||
        (ret = env->log_set_config(env, DB_LOG_AUTO_REMOVE, 1)) != 0) {
        xd_error("storage: configuring environment: %s", db_strerror(ret));
        return -1;
    }
    return 0;
}

/* Take LOCK_FILE in dir.  0 ok, XD_BUSY (another process has it), -1. */
static int take_lock(const char *dir)
{
    char path[4200], pid[32] = "";
    ssize_t n;
    int fd;

    snprintf(path, sizeof(path), "%s/%s", dir, LOCK_FILE);
    if ((fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600)) < 0) {
        xd_error("storage: %s: %s", path, strerror(errno));
        return -1;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int busy = errno == EWOULDBLOCK;
        if (busy && (n = pread(fd, pid, sizeof(pid) - 1, 0)) > 0)
            pid[strcspn(pid, "\n")] = '\0';
        if (!busy)
            xd_error("storage: locking %s: %s", path, strerror(errno));
        else if (!store.quiet_busy)
            xd_error("storage: %s is in use by another process%s%s (a running xmppd, or "
                     "xmppctl)", dir, pid[0] ? ", pid " : "", pid);
        close(fd);
        return busy ? XD_BUSY : -1;
    }
    n = snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) != 0 || pwrite(fd, pid, (size_t)n, 0) != n)
        xd_warn("storage: could not write the pid to %s", path); /* the lock is what counts */
    store.lock_fd = fd;
    return 0;
}

static void drop_lock(void)
{
    if (store.lock_fd >= 0)
        close(store.lock_fd); /* releases the flock */
    store.lock_fd = -1;
}

/* Region files of an environment that was not private (earlier versions,
 * db5.3_load -h): unused now, and ~90 MB of cache image on disk. */
static void remove_shared_regions(const char *dir)
{
    DB_ENV *env;

    if (db_env_create(&env, 0) != 0)
        return;
    env->remove(env, dir, DB_FORCE); /* frees the handle; nothing to do if none */
}

int xd_store_open(const char *dir)
{
    /* DB_THREAD: the flusher thread shares the environment handle (the
     * tables' handles stay with the loop).  DB_RECOVER replays the log
     * so a crash between commit and checkpoint loses nothing committed.
     * DB_PRIVATE: see the top of this file. */
    const u_int32_t flags = DB_CREATE | DB_INIT_TXN | DB_INIT_LOCK | DB_INIT_LOG |
                            DB_INIT_MPOOL | DB_RECOVER | DB_PRIVATE | DB_THREAD;
    DB_ENV *env;
    int ret;

    if (store.env) {
        xd_error("storage: already open");
        return -1;
    }
    if (!dir || make_dir(dir) != 0)
        return -1;
    if ((ret = take_lock(dir)) != 0)
        return ret;
    remove_shared_regions(dir);
    if ((ret = db_env_create(&env, 0)) != 0) {
        xd_error("storage: db_env_create: %s", db_strerror(ret));
        drop_lock();
        return -1;
    }
    if (env_configure(env) != 0) {
        env->close(env, 0);
        drop_lock();
        return -1;
    }
    if ((ret = env->open(env, dir, flags, 0600)) != 0) {
        xd_error("storage: opening environment %s: %s", dir, db_strerror(ret));
        env->close(env, 0);
        drop_lock();
        return -1;
    }
    store.env = env;
    store.ntables = 0;
    store.committed = store.durable = store.requested = 0;
    store.want = store.flushed = 0;
    store.stop = store.failed = 0;
    xd_debug("storage: environment open in %s", dir);
    return 0;
}

void xd_store_quiet_busy(int quiet)
{
    store.quiet_busy = quiet;
}

/* ---- group commit ----------------------------------------------------------- */

static double
mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void
sleep_for(double seconds)
{
    struct timespec ts = {.tv_sec = (time_t)seconds,
                          .tv_nsec = (long)((seconds - (double)(time_t)seconds) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* A write transaction was committed: it gets the next number. */
static void
note_commit(void)
{
    store.committed++;
    if (!store.flusher)
        store.durable = store.committed; /* synchronous commits */
}

/* Checkpoint when enough log or time has gone by, and keep part of the cache
 * clean.  Flusher thread; errors are logged and retried next time. */
static void
maintain(double *last_checkpoint)
{
    int nwrote, ret;

    if ((ret = store.env->memp_trickle(store.env, TRICKLE_PERCENT, &nwrote)) != 0)
        xd_error("storage: trickle: %s", db_strerror(ret));
    if (mono_now() - *last_checkpoint < CHECKPOINT_INTERVAL)
        return;
    *last_checkpoint = mono_now();
    if ((ret = store.env->txn_checkpoint(store.env, CHECKPOINT_KBYTES, 0, 0)) != 0)
        xd_error("storage: checkpoint: %s", db_strerror(ret));
}

/* Wait (under mu) until there is something to flush, or a second passed. */
static void
wait_for_work(void)
{
    struct timespec until;

    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 1;
    pthread_cond_timedwait(&store.cv, &store.mu, &until);
}

static void *
flusher_main(void *arg)
{
    double last_flush = 0, last_checkpoint = mono_now();
    (void)arg;

    pthread_mutex_lock(&store.mu);
    while (!store.failed && (!store.stop || store.want > store.flushed)) {
        uint64_t target;
        double wait;
        int ret;

        if (store.want <= store.flushed) {
            wait_for_work();
            pthread_mutex_unlock(&store.mu);
            maintain(&last_checkpoint);
            pthread_mutex_lock(&store.mu);
            continue;
        }
        pthread_mutex_unlock(&store.mu);
        /* Let commits gather: the flush after this pause covers them all. */
        if ((wait = last_flush + FLUSH_MIN_INTERVAL - mono_now()) > 0)
            sleep_for(wait);
        pthread_mutex_lock(&store.mu);
        target = store.want;
        pthread_mutex_unlock(&store.mu);

        last_flush = mono_now();
        ret = store.env->log_flush(store.env, NULL);
        if (ret != 0)
            xd_error("storage: log flush: %s", db_strerror(ret));
        else
            maintain(&last_checkpoint);

        pthread_mutex_lock(&store.mu);
        if (ret != 0)
            store.failed = 1;
        else
            store.flushed = target;
        store.nflushes++;
        ev_async_send(store.loop, &store.done_w);
    }
    pthread_mutex_unlock(&store.mu);
    return NULL;
}

/* Run, in commit order, what waited for commits that are now durable. */
static void
run_waiters(void)
{
    while (store.wcount) {
        waiter w = store.waiters[store.wfirst];
        if (w.commit > store.durable)
            break;
        store.wfirst = (store.wfirst + 1) % store.wcap;
        store.wcount--;
        w.fn(w.data); /* may add waiters */
    }
}

/* Before the loop sleeps: ask for everything committed in this turn. */
static void
kick_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    if (store.committed <= store.requested)
        return;
    store.requested = store.committed;
    pthread_mutex_lock(&store.mu);
    store.want = store.requested;
    pthread_cond_signal(&store.cv);
    pthread_mutex_unlock(&store.mu);
}

static void
done_cb(struct ev_loop *loop, ev_async *w, int revents)
{
    uint64_t flushed;
    int failed;
    (void)loop;
    (void)w;
    (void)revents;

    pthread_mutex_lock(&store.mu);
    flushed = store.flushed;
    failed = store.failed;
    pthread_mutex_unlock(&store.mu);
    if (flushed > store.durable)
        store.durable = flushed;
    run_waiters();
    if (failed && store.on_failure) {
        xd_store_fail_fn fn = store.on_failure;
        store.on_failure = NULL; /* once */
        fn();
    }
}

int
xd_store_start_flusher(struct ev_loop *loop, xd_store_fail_fn on_failure)
{
    int ret;

    if (!store.env || store.flusher)
        return -1;
    /* From here on a commit only fills the log buffer; the flusher syncs. */
    if ((ret = store.env->set_flags(store.env, DB_TXN_NOSYNC, 1)) != 0) {
        xd_error("storage: DB_TXN_NOSYNC: %s", db_strerror(ret));
        return -1;
    }
    store.loop = loop;
    store.on_failure = on_failure;
    ev_prepare_init(&store.kick_w, kick_cb);
    ev_async_init(&store.done_w, done_cb);
    ev_prepare_start(loop, &store.kick_w);
    ev_async_start(loop, &store.done_w);
    ev_unref(loop); /* neither watcher keeps the loop running */
    ev_unref(loop);
    if ((ret = pthread_create(&store.thread, NULL, flusher_main, NULL)) != 0) {
        xd_error("storage: starting the flusher thread: %s", strerror(ret));
        store.env->set_flags(store.env, DB_TXN_NOSYNC, 0);
        ev_ref(loop);
        ev_ref(loop);
        ev_prepare_stop(loop, &store.kick_w);
        ev_async_stop(loop, &store.done_w);
        return -1;
    }
    store.flusher = 1;
    return 0;
}

static void
stop_flusher(void)
{
    if (!store.flusher)
        return;
    pthread_mutex_lock(&store.mu);
    store.stop = 1;
    pthread_cond_signal(&store.cv);
    pthread_mutex_unlock(&store.mu);
    pthread_join(store.thread, NULL);
    store.flusher = 0;
    ev_ref(store.loop);
    ev_ref(store.loop);
    ev_prepare_stop(store.loop, &store.kick_w);
    ev_async_stop(store.loop, &store.done_w);
    store.env->set_flags(store.env, DB_TXN_NOSYNC, 0);
}

uint64_t
xd_store_commits(void)
{
    return store.committed;
}

int
xd_store_is_durable(uint64_t commit)
{
    return commit <= store.durable;
}

int
xd_store_when_durable(uint64_t commit, xd_durable_fn fn, xd_durable_fn drop, void *data)
{
    waiter *w;

    if (!fn)
        return -1;
    if (commit <= store.durable) {
        fn(data);
        return 0;
    }
    if (store.wcount == store.wcap) {
        size_t cap = store.wcap ? store.wcap * 2 : 64;
        waiter *v = malloc(cap * sizeof(*v));
        if (!v) {
            xd_error("storage: out of memory");
            return -1;
        }
        for (size_t i = 0; i < store.wcount; i++)
            v[i] = store.waiters[(store.wfirst + i) % store.wcap];
        free(store.waiters);
        store.waiters = v;
        store.wfirst = 0;
        store.wcap = cap;
    }
    /* Kept in commit order: a later caller never waits for less. */
    if (store.wcount) {
        const waiter *last = &store.waiters[(store.wfirst + store.wcount - 1) % store.wcap];
        if (commit < last->commit)
            commit = last->commit;
    }
    w = &store.waiters[(store.wfirst + store.wcount) % store.wcap];
    *w = (waiter){.commit = commit, .fn = fn, .drop = drop, .data = data};
    store.wcount++;
    return 0;
}

unsigned long
xd_store_flush_count(void)
{
    unsigned long n;
    pthread_mutex_lock(&store.mu);
    n = store.nflushes;
    pthread_mutex_unlock(&store.mu);
    return n;
}

unsigned long long
xd_store_log_bytes(void)
{
    DB_LOG_STAT *st;
    unsigned long long n;

    if (!store.env || store.env->log_stat(store.env, &st, 0) != 0)
        return 0;
    n = (unsigned long long)st->st_w_mbytes * 1048576ull + st->st_w_bytes;
    free(st);
    return n;
}

static void
drop_waiters(void)
{
    while (store.wcount) {
        waiter w = store.waiters[store.wfirst];
        store.wfirst = (store.wfirst + 1) % store.wcap;
        store.wcount--;
        if (w.drop)
            w.drop(w.data);
    }
    free(store.waiters);
    store.waiters = NULL;
    store.wfirst = store.wcap = 0;
}

static void
checkpoint(void)
{
    int ret;

    if ((ret = store.env->log_flush(store.env, NULL)) != 0)
        xd_error("storage: log flush: %s", db_strerror(ret));
    if ((ret = store.env->txn_checkpoint(store.env, 0, 0, 0)) != 0)
        xd_error("storage: checkpoint: %s", db_strerror(ret));
}

/* Shutting down: make everything durable now and let its waiters go. */
void
xd_store_flush(void)
{
    int ret;

    if (!store.env)
        return;
    if ((ret = store.env->log_flush(store.env, NULL)) != 0) {
        xd_error("storage: log flush: %s", db_strerror(ret));
        return;
    }
    store.durable = store.committed;
    run_waiters();
}

void
xd_store_close(void)
{
    int ret;

    if (!store.env)
        return;
    stop_flusher();
    /* What still waits is dropped, not run: the server is past its loop. */
    drop_waiters();
    for (int i = 0; i < store.ntables; i++) {
        if ((ret = store.tables[i].dbp->close(store.tables[i].dbp, 0)) != 0)
            xd_error("storage: closing table %s: %s", store.tables[i].name, db_strerror(ret));
        store.tables[i].dbp = NULL;
    }
    store.ntables = 0;
    /* Checkpoint after the tables are synced so recovery at the next start
     * has nothing to replay. */
    checkpoint();
    if ((ret = store.env->close(store.env, 0)) != 0)
        xd_error("storage: closing environment: %s", db_strerror(ret));
    store.env = NULL;
    drop_lock();
}

/* ---- tables --------------------------------------------------------------- */

static int valid_table_name(const char *name)
{
    size_t n = 0;

    if (!name)
        return 0;
    for (; name[n]; n++) {
        char c = name[n];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
            return 0;
        if (n >= TABLE_NAME_MAX)
            return 0;
    }
    return n > 0;
}

/* Open a table as type (DB_UNKNOWN: whatever the existing file is). */
static xd_db *open_table(const char *name, DBTYPE type)
{
    char file[TABLE_NAME_MAX + 4];
    struct xd_db *t;
    DBTYPE got;
    DB *dbp;
    int ret;

    if (!store.env) {
        xd_debug("storage: table %s asked for while the store is closed (--check-config)", name ? name : "(null)");
        return NULL;
    }
    if (!valid_table_name(name)) {
        xd_error("storage: invalid table name '%s'", name ? name : "(null)");
        return NULL;
    }
    for (int i = 0; i < store.ntables; i++) {
        t = &store.tables[i];
        if (strcmp(t->name, name) != 0)
            continue;
        if (type != DB_UNKNOWN && (type == DB_HEAP) != t->heap) {
            xd_error("storage: table %s is open as a %s", name, t->heap ? "heap" : "B-tree");
            return NULL;
        }
        return t;
    }
    if (store.ntables == TABLES_MAX) {
        xd_error("storage: too many tables (max %d) opening %s", TABLES_MAX, name);
        return NULL;
    }
    if ((ret = db_create(&dbp, store.env, 0)) != 0) {
        xd_error("storage: db_create %s: %s", name, db_strerror(ret));
        return NULL;
    }
    snprintf(file, sizeof(file), "%s.db", name);
    ret = dbp->open(dbp, NULL, file, NULL, type,
                    DB_AUTO_COMMIT | (type == DB_UNKNOWN ? 0 : DB_CREATE), 0600);
    if (ret == 0 && (ret = dbp->get_type(dbp, &got)) == 0 && got != DB_BTREE && got != DB_HEAP)
        ret = EINVAL;
    if (ret != 0) {
        xd_error("storage: opening table %s: %s", name, db_strerror(ret));
        dbp->close(dbp, 0);
        return NULL;
    }
    t = &store.tables[store.ntables++];
    t->dbp = dbp;
    t->heap = got == DB_HEAP;
    strcpy(t->name, name);
    return t;
}

xd_db *xd_db_open(const char *name)
{
    return open_table(name, DB_BTREE);
}

xd_db *xd_heap_open(const char *name)
{
    return open_table(name, DB_HEAP);
}

/* ---- transactions --------------------------------------------------------- */

int xd_txn_begin(xd_txn **txn)
{
    struct xd_txn *x;
    int ret;

    *txn = NULL;
    if (!store.env) {
        xd_error("storage: transaction begun before the store is open");
        return -1;
    }
    if (!(x = malloc(sizeof(*x)))) {
        xd_error("storage: out of memory");
        return -1;
    }
    if ((ret = store.env->txn_begin(store.env, NULL, &x->t, 0)) != 0) {
        xd_error("storage: txn_begin: %s", db_strerror(ret));
        free(x);
        return -1;
    }
    *txn = x;
    return 0;
}

int xd_txn_commit(xd_txn *txn)
{
    int ret;

    if (!txn)
        return -1;
    /* The DB_TXN handle is gone after commit, whatever it returns. */
    ret = txn->t->commit(txn->t, 0);
    free(txn);
    if (ret != 0) {
        xd_error("storage: commit: %s", db_strerror(ret));
        return -1;
    }
    note_commit();
    return 0;
}

void xd_txn_abort(xd_txn *txn)
{
    int ret;

    if (!txn)
        return;
    if ((ret = txn->t->abort(txn->t)) != 0)
        xd_error("storage: abort: %s", db_strerror(ret));
    free(txn);
}

/* ---- records -------------------------------------------------------------- */

static DB_TXN *raw_txn(const xd_txn *txn)
{
    return txn ? txn->t : NULL;
}

/* Writes without a transaction still go through one of their own. */
static u_int32_t write_flags(const xd_txn *txn)
{
    return txn ? 0 : DB_AUTO_COMMIT;
}

static void set_dbt(DBT *d, const void *data, size_t len)
{
    memset(d, 0, sizeof(*d));
    d->data = (void *)(uintptr_t)data; /* BDB does not write input keys */
    d->size = (u_int32_t)len;
}

static int report(const xd_db *db, const char *op, int ret)
{
    if (ret == DB_LOCK_DEADLOCK || ret == DB_LOCK_NOTGRANTED)
        xd_error("storage: %s on %s: lock conflict (deadlock), transaction must be aborted",
                 op, db->name);
    else
        xd_error("storage: %s on %s: %s", op, db->name, db_strerror(ret));
    return -1;
}

/*
 * Reads without a transaction run in a short one of their own: only
 * transactional lockers honour DB_TXN_NOWAIT, and a plain read that met a
 * record locked by one of our open transactions would wait forever.
 */
static int read_begin(xd_db *db, xd_txn *txn, DB_TXN **t)
{
    int ret;

    *t = NULL;
    if (txn) {
        *t = txn->t;
        return 0;
    }
    if ((ret = store.env->txn_begin(store.env, NULL, t, 0)) != 0)
        return report(db, "txn_begin", ret);
    return 0;
}

/* Ends what read_begin started (nothing was written, so nothing to sync). */
static void read_end(xd_db *db, const xd_txn *txn, DB_TXN *t)
{
    int ret;

    if (!txn && t && (ret = t->commit(t, 0)) != 0)
        report(db, "read commit", ret);
}

static int check_args(const xd_db *db, const void *key, size_t klen)
{
    if (!db || !db->dbp || db->heap || (!key && klen) || klen > UINT32_MAX) {
        xd_error("storage: invalid arguments");
        return -1;
    }
    return 0;
}

/* The end of a get: the value (malloc'd by BDB) handed out with the
 * convenience NUL after it. */
static int take_value(xd_db *db, int ret, DBT *v, void **val, size_t *vlen)
{
    char *out;

    if (ret == DB_NOTFOUND || ret == DB_KEYEMPTY)
        return XD_NOTFOUND;
    if (ret != 0)
        return report(db, "get", ret);
    if (!(out = realloc(v->data, (size_t)v->size + 1))) {
        free(v->data);
        xd_error("storage: out of memory");
        return -1;
    }
    out[v->size] = '\0';
    *val = out;
    if (vlen)
        *vlen = v->size;
    return 0;
}

int xd_db_get(xd_db *db, xd_txn *txn, const void *key, size_t klen, void **val, size_t *vlen)
{
    DB_TXN *t;
    DBT k, v;
    int ret;

    *val = NULL;
    if (vlen)
        *vlen = 0;
    if (check_args(db, key, klen) != 0)
        return -1;
    if (read_begin(db, txn, &t) != 0)
        return -1;
    set_dbt(&k, key, klen);
    memset(&v, 0, sizeof(v));
    v.flags = DB_DBT_MALLOC;
    ret = db->dbp->get(db->dbp, t, &k, &v, 0);
    read_end(db, txn, t);
    return take_value(db, ret, &v, val, vlen);
}

int xd_db_put(xd_db *db, xd_txn *txn, const void *key, size_t klen, const void *val, size_t vlen)
{
    DBT k, v;
    int ret;

    if (check_args(db, key, klen) != 0 || (!val && vlen) || vlen > UINT32_MAX)
        return -1;
    set_dbt(&k, key, klen);
    set_dbt(&v, val, vlen);
    if ((ret = db->dbp->put(db->dbp, raw_txn(txn), &k, &v, write_flags(txn))) != 0)
        return report(db, "put", ret);
    if (!txn)
        note_commit();
    return 0;
}

/* Delete the record at key k: 0, XD_NOTFOUND, -1. */
static int del_key(xd_db *db, xd_txn *txn, DBT *k)
{
    int ret = db->dbp->del(db->dbp, raw_txn(txn), k, write_flags(txn));

    if (ret == DB_NOTFOUND || ret == DB_KEYEMPTY)
        return XD_NOTFOUND;
    if (ret != 0)
        return report(db, "del", ret);
    if (!txn)
        note_commit();
    return 0;
}

int xd_db_del(xd_db *db, xd_txn *txn, const void *key, size_t klen)
{
    DBT k;

    if (check_args(db, key, klen) != 0)
        return -1;
    set_dbt(&k, key, klen);
    return del_key(db, txn, &k);
}

/* ---- iteration ------------------------------------------------------------ */

struct rec {
    void *key, *val;
    size_t klen, vlen;
};

struct batch {
    struct rec r[FOREACH_BATCH];
    int n;
    int more; /* records may follow the batch */
};

static void batch_free(struct batch *b)
{
    for (int i = 0; i < b->n; i++) {
        free(b->r[i].key);
        free(b->r[i].val);
    }
    b->n = 0;
}

static void *dup_bytes(const void *p, size_t n)
{
    void *q = malloc(n ? n : 1);
    if (q && n)
        memcpy(q, p, n);
    return q;
}

static int batch_add(struct batch *b, const DBT *k, const DBT *v)
{
    struct rec *r = &b->r[b->n];

    r->key = dup_bytes(k->data, k->size);
    r->val = dup_bytes(v->data, v->size);
    if (!r->key || !r->val) {
        free(r->key);
        free(r->val);
        xd_error("storage: out of memory");
        return -1;
    }
    r->klen = k->size;
    r->vlen = v->size;
    b->n++;
    return 0;
}

/*
 * Copy up to FOREACH_BATCH records with the prefix, starting at the first key
 * >= from (the first key of the table when flen == 0).  The cursor is closed
 * before returning, on every path.
 */
static int batch_read(xd_db *db, DB_TXN *t, const void *prefix, size_t plen, const void *from,
                      size_t flen, struct batch *b)
{
    DBC *c;
    DBT k, v;
    int ret, cret, oom = 0, op = flen ? DB_SET_RANGE : DB_FIRST;

    b->n = 0;
    b->more = 0;
    if ((ret = db->dbp->cursor(db->dbp, t, &c, 0)) != 0)
        return report(db, "cursor", ret);
    set_dbt(&k, from, flen);
    memset(&v, 0, sizeof(v));
    while ((ret = c->get(c, &k, &v, (u_int32_t)op)) == 0) {
        op = DB_NEXT;
        if (plen && (k.size < plen || memcmp(k.data, prefix, plen) != 0))
            break; /* past the prefix: keys are sorted, nothing more matches */
        if (batch_add(b, &k, &v) != 0) {
            oom = 1;
            break;
        }
        if (b->n == FOREACH_BATCH) {
            b->more = 1;
            break;
        }
    }
    if ((cret = c->close(c)) != 0 && (ret == 0 || ret == DB_NOTFOUND))
        ret = cret;
    if (!oom && (ret == 0 || ret == DB_NOTFOUND))
        return 0;
    batch_free(b);
    return oom ? -1 : report(db, ret == cret ? "cursor close" : "cursor get", ret);
}

/* The smallest key after last in BDB's default order (bytewise, shorter
 * first) is last followed by one NUL byte. */
static int next_start(void **from, size_t *flen, const struct rec *last)
{
    unsigned char *p = malloc(last->klen + 1);

    if (!p) {
        xd_error("storage: out of memory");
        return -1;
    }
    memcpy(p, last->key, last->klen);
    p[last->klen] = 0;
    free(*from);
    *from = p;
    *flen = last->klen + 1;
    return 0;
}

/*
 * Records are read in batches and the cursor is closed while fn runs: a
 * callback may then write to the same table (even with a NULL txn, which
 * would otherwise block forever on the cursor's page lock in this single
 * threaded process).
 */
int xd_db_foreach(xd_db *db, xd_txn *txn, const void *prefix, size_t plen, xd_db_visit_fn fn,
                  void *data)
{
    struct batch *b;
    void *from = NULL;
    size_t flen = 0;
    int ret = 0;

    if (check_args(db, prefix, plen) != 0 || !fn)
        return -1;
    if (!(b = calloc(1, sizeof(*b))) || (plen && !(from = dup_bytes(prefix, plen)))) {
        free(b);
        xd_error("storage: out of memory");
        return -1;
    }
    flen = plen;
    do {
        DB_TXN *t;

        if ((ret = read_begin(db, txn, &t)) != 0)
            break;
        ret = batch_read(db, t, prefix, plen, from, flen, b);
        read_end(db, txn, t);
        if (ret != 0)
            break;
        for (int i = 0; i < b->n && ret == 0; i++)
            ret = fn(b->r[i].key, b->r[i].klen, b->r[i].val, b->r[i].vlen, data);
        if (ret == 0 && b->more && next_start(&from, &flen, &b->r[b->n - 1]) != 0)
            ret = -1;
        batch_free(b);
    } while (ret == 0 && b->more);
    free(from);
    free(b);
    return ret;
}

/* ---- the ends of a prefix ------------------------------------------------------ */

/* Copy a found record out of the cursor's DBTs (malloc'd, like xd_db_get). */
static int
edge_copy(const DBT *k, const DBT *v, void **key, size_t *klen, void **val, size_t *vlen)
{
    *key = dup_bytes(k->data, k->size);
    *val = malloc((size_t)v->size + 1);
    if (!*key || !*val) {
        free(*key);
        free(*val);
        *key = *val = NULL;
        xd_error("storage: out of memory");
        return -1;
    }
    memcpy(*val, v->data, v->size);
    ((char *)*val)[v->size] = '\0';
    *klen = k->size;
    *vlen = v->size;
    return 0;
}

/*
 * Position c on the first (last == 0) or last record whose key starts with
 * prefix.  The last one is found from the smallest key after every key with
 * the prefix: the prefix with its last byte below 0xff incremented.
 */
static int
edge_seek(DBC *c, const void *prefix, size_t plen, int last, DBT *k, DBT *v)
{
    unsigned char succ[512];
    size_t n = plen;
    int ret;

    memset(k, 0, sizeof(*k));
    memset(v, 0, sizeof(*v));
    if (!last) {
        set_dbt(k, prefix, plen);
        return c->get(c, k, v, DB_SET_RANGE);
    }
    if (plen > sizeof(succ))
        return EINVAL;
    if (plen)
        memcpy(succ, prefix, plen);
    while (n > 0 && succ[n - 1] == 0xff)
        n--;
    if (n == 0)
        return c->get(c, k, v, DB_LAST);
    succ[n - 1]++;
    set_dbt(k, succ, n);
    ret = c->get(c, k, v, DB_SET_RANGE);
    if (ret == DB_NOTFOUND)
        return c->get(c, k, v, DB_LAST);
    if (ret != 0)
        return ret;
    return c->get(c, k, v, DB_PREV);
}

static int
db_edge(xd_db *db, xd_txn *txn, const void *prefix, size_t plen, int last, void **key,
        size_t *klen, void **val, size_t *vlen)
{
    DB_TXN *t;
    DBC *c;
    DBT k, v;
    int ret, cret, r;

    *key = *val = NULL;
    *klen = *vlen = 0;
    if (check_args(db, prefix, plen) != 0 || read_begin(db, txn, &t) != 0)
        return -1;
    if ((ret = db->dbp->cursor(db->dbp, t, &c, 0)) != 0) {
        read_end(db, txn, t);
        return report(db, "cursor", ret);
    }
    ret = edge_seek(c, prefix, plen, last, &k, &v);
    if (ret == 0 && plen && (k.size < plen || memcmp(k.data, prefix, plen) != 0))
        ret = DB_NOTFOUND;
    r = ret == 0 ? edge_copy(&k, &v, key, klen, val, vlen) : 0;
    if ((cret = c->close(c)) != 0 && (ret == 0 || ret == DB_NOTFOUND))
        ret = cret;
    read_end(db, txn, t);
    if (ret == DB_NOTFOUND)
        return XD_NOTFOUND;
    if (ret != 0) {
        free(*key);
        free(*val);
        *key = *val = NULL;
        return report(db, "cursor get", ret);
    }
    return r;
}

int
xd_db_first(xd_db *db, xd_txn *txn, const void *prefix, size_t plen, void **key, size_t *klen,
            void **val, size_t *vlen)
{
    return db_edge(db, txn, prefix, plen, 0, key, klen, val, vlen);
}

int
xd_db_last(xd_db *db, xd_txn *txn, const void *prefix, size_t plen, void **key, size_t *klen,
           void **val, size_t *vlen)
{
    return db_edge(db, txn, prefix, plen, 1, key, klen, val, vlen);
}

/* ---- per-user purge --------------------------------------------------------- */

typedef struct key_list {
    void **k;
    size_t *len;
    size_t n, cap;
} key_list;

static int
collect_key(const void *key, size_t klen, const void *val, size_t vlen, void *data)
{
    key_list *l = data;
    (void)val;
    (void)vlen;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        void **k = realloc(l->k, cap * sizeof(*k));
        size_t *len = k ? realloc(l->len, cap * sizeof(*len)) : NULL;
        if (!k || !len) {
            if (k)
                l->k = k;
            return -1;
        }
        l->k = k;
        l->len = len;
        l->cap = cap;
    }
    if (!(l->k[l->n] = malloc(klen ? klen : 1)))
        return -1;
    memcpy(l->k[l->n], key, klen);
    l->len[l->n++] = klen;
    return 0;
}

/*
 * Delete every record whose key starts with prefix, in every table of the
 * environment (opened or not): the convention is that per-user data is keyed
 * "bare JID" NUL ..., so removing an account leaves nothing behind even when
 * the modules that wrote it are not loaded (xmppctl).
 */
int xd_store_purge_prefix(xd_txn *txn, const void *prefix, size_t plen)
{
    const char *home = NULL;
    DIR *d;
    struct dirent *e;
    int rc = 0;

    if (!store.env || store.env->get_home(store.env, &home) != 0 || !home || !(d = opendir(home)))
        return -1;
    while (rc == 0 && (e = readdir(d))) {
        char name[TABLE_NAME_MAX + 1];
        size_t len = strlen(e->d_name);
        key_list l = {0};
        xd_db *t;

        if (len < 4 || len - 3 > TABLE_NAME_MAX || strcmp(e->d_name + len - 3, ".db") != 0)
            continue;
        memcpy(name, e->d_name, len - 3);
        name[len - 3] = '\0';
        if (!valid_table_name(name) || !(t = open_table(name, DB_UNKNOWN)) || t->heap)
            continue; /* heap tables have no user keys: their module cleans them */
        if (xd_db_foreach(t, txn, prefix, plen, collect_key, &l) < 0)
            rc = -1;
        for (size_t i = 0; i < l.n; i++) {
            if (rc == 0 && xd_db_del(t, txn, l.k[i], l.len[i]) < 0)
                rc = -1;
            free(l.k[i]);
        }
        free(l.k);
        free(l.len);
    }
    closedir(d);
    return rc;
}

/* ---- heap tables ------------------------------------------------------------- */

/* A record's place (page, slot) as one number; never 0 (page 0 is the
 * table's meta page). */
static uint64_t rid_pack(const DB_HEAP_RID *r)
{
    return (uint64_t)r->pgno << 16 | r->indx;
}

static void rid_unpack(uint64_t id, DB_HEAP_RID *r)
{
    memset(r, 0, sizeof(*r));
    r->pgno = (db_pgno_t)(id >> 16);
    r->indx = (db_indx_t)(id & 0xffff);
}

static int check_heap(const xd_db *db)
{
    if (!db || !db->dbp || !db->heap) {
        xd_error("storage: not a heap table");
        return -1;
    }
    return 0;
}

int xd_heap_add(xd_db *db, xd_txn *txn, const void *val, size_t vlen, uint64_t *id)
{
    DB_HEAP_RID rid;
    DBT k, v;
    int ret;

    if (check_heap(db) != 0 || !id || (!val && vlen) || vlen > UINT32_MAX)
        return -1;
    memset(&k, 0, sizeof(k));
    k.data = &rid;
    k.ulen = sizeof(rid);
    k.flags = DB_DBT_USERMEM;
    set_dbt(&v, val, vlen);
    if ((ret = db->dbp->put(db->dbp, raw_txn(txn), &k, &v, DB_APPEND | write_flags(txn))) != 0)
        return report(db, "put", ret);
    *id = rid_pack(&rid);
    if (!txn)
        note_commit();
    return 0;
}

int xd_heap_get(xd_db *db, xd_txn *txn, uint64_t id, void **val, size_t *vlen)
{
    DB_HEAP_RID rid;
    DB_TXN *t;
    DBT k, v;
    int ret;

    *val = NULL;
    if (vlen)
        *vlen = 0;
    if (check_heap(db) != 0 || read_begin(db, txn, &t) != 0)
        return -1;
    rid_unpack(id, &rid);
    set_dbt(&k, &rid, DB_HEAP_RID_SZ);
    memset(&v, 0, sizeof(v));
    v.flags = DB_DBT_MALLOC;
    ret = db->dbp->get(db->dbp, t, &k, &v, 0);
    read_end(db, txn, t);
    return take_value(db, ret, &v, val, vlen);
}

int xd_heap_del(xd_db *db, xd_txn *txn, uint64_t id)
{
    DB_HEAP_RID rid;
    DBT k;

    if (check_heap(db) != 0)
        return -1;
    rid_unpack(id, &rid);
    set_dbt(&k, &rid, DB_HEAP_RID_SZ);
    return del_key(db, txn, &k);
}

/* Slots of a page probed when the record a scan stopped at is gone. */
#define HEAP_PROBE_SLOTS 1024

/* Position c at the first record at or after *at, probing slot by slot (a
 * heap cursor has no "at or after"); up to the last page. */
static int heap_seek(DB *dbp, DBC *c, DB_HEAP_RID *at, DBT *k, DBT *v, db_pgno_t last)
{
    for (; at->pgno <= last; at->pgno++, at->indx = 0) {
        for (; at->indx < HEAP_PROBE_SLOTS; at->indx++) {
            int ret = c->get(c, k, v, DB_SET);
            if (ret != DB_NOTFOUND && ret != DB_KEYEMPTY)
                return ret;
        }
    }
    (void)dbp;
    return DB_NOTFOUND;
}

int xd_heap_scan(xd_db *db, uint64_t *pos, size_t max, xd_heap_visit_fn fn, void *data)
{
    struct batch *b;
    DB_HEAP_RID rid;
    DB_HEAP_STAT *st = NULL;
    db_pgno_t last;
    DB_TXN *t;
    DBC *c;
    DBT k, v;
    int ret, cret, oom = 0, rc = 0;
    size_t seen = 0;

    if (check_heap(db) != 0 || !pos || !fn)
        return -1;
    if (!(b = malloc(sizeof(*b)))) {
        xd_error("storage: out of memory");
        return -1;
    }
    if ((ret = db->dbp->stat(db->dbp, NULL, &st, DB_FAST_STAT)) != 0) {
        free(b);
        return report(db, "stat", ret);
    }
    last = st->heap_pagecnt;
    free(st);
    while (seen < max && rc == 0) {
        b->n = 0;
        b->more = 0;
        if (read_begin(db, NULL, &t) != 0) {
            rc = -1;
            break;
        }
        if ((ret = db->dbp->cursor(db->dbp, t, &c, 0)) != 0) {
            read_end(db, NULL, t);
            rc = report(db, "cursor", ret);
            break;
        }
        memset(&k, 0, sizeof(k));
        k.data = &rid;
        k.size = DB_HEAP_RID_SZ;
        k.ulen = sizeof(rid);
        k.flags = DB_DBT_USERMEM;
        memset(&v, 0, sizeof(v));
        if (*pos == 0) {
            ret = c->get(c, &k, &v, DB_FIRST);
        } else {
            /* just after the last record visited: it, then the next */
            rid_unpack(*pos, &rid);
            ret = c->get(c, &k, &v, DB_SET);
            if (ret == 0)
                ret = c->get(c, &k, &v, DB_NEXT);
            else if (ret == DB_NOTFOUND || ret == DB_KEYEMPTY)
                ret = heap_seek(db->dbp, c, &rid, &k, &v, last);
        }
        while (ret == 0) {
            if (batch_add(b, &k, &v) != 0) {
                oom = 1;
                break;
            }
            if (b->n == FOREACH_BATCH || seen + (size_t)b->n >= max) {
                b->more = 1;
                break;
            }
            ret = c->get(c, &k, &v, DB_NEXT);
        }
        if ((cret = c->close(c)) != 0 && (ret == 0 || ret == DB_NOTFOUND))
            ret = cret;
        read_end(db, NULL, t);
        if (oom || (ret != 0 && ret != DB_NOTFOUND)) {
            batch_free(b);
            rc = oom ? -1 : report(db, "heap scan", ret);
            break;
        }
        for (int i = 0; i < b->n && rc == 0; i++) {
            DB_HEAP_RID r;
            /* BDB hands out the packed form (DB_HEAP_RID_SZ bytes) */
            memset(&r, 0, sizeof(r));
            memcpy(&r, b->r[i].key, b->r[i].klen < sizeof(r) ? b->r[i].klen : sizeof(r));
            *pos = rid_pack(&r);
            rc = fn(*pos, b->r[i].val, b->r[i].vlen, data);
        }
        seen += (size_t)b->n;
        if (!b->more && rc == 0)
            rc = XD_NOTFOUND; /* the end */
        batch_free(b);
    }
    free(b);
    return rc;
}

/* ---- keys -------------------------------------------------------------------- */

size_t xd_db_user_prefix(const xd_jid *bare, char *buf, size_t len)
{
    int n = len ? xd_jid_format(bare, 0, buf, len - 1) : -1;
    if (n < 0)
        return 0;
    buf[n] = '\0';
    return (size_t)n + 1;
}

void xd_db_put_be(unsigned char *p, unsigned long long v, int n)
{
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

unsigned long long xd_db_get_be(const unsigned char *p, int n)
{
    unsigned long long v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}
