"""kill -9 while a client pipelines messages: XEP-0198 acknowledges only
what is durable.

An <a h='N'/> in answer to <r/> tells the client the server has taken care
of its first N stanzas, and for a message to an offline user that means
mod_mam archived it and mod_offline stored it, durably: the client may
forget it.  So no message an <a/> covered may be lost when the server
process dies at any moment, however the server gets there (a synchronous
commit before the ack, or an ack held back until a group commit is on disk).

ROUNDS times over one data directory: alice logs in on a raw stream, enables
stream management and pipelines numbered messages to bob (offline all the
while), with <r/> after every R_EVERY of them, reading the <a/> answers
while she writes; a second thread kills the server with SIGKILL at a random
moment: before it handled her first message, in the middle of the pipeline,
or after the last one.  Messages 1..h of the round (h the highest count she
was told) are the acknowledged ones.  The server is started again on the
same data, and bob logs in, takes his offline messages (answering the
server's ping after each delivery round) and reads what his archive gained.
Every acknowledged message must be delivered exactly once and be in bob's
archive exactly once; no message, acknowledged or not, is delivered or
archived twice, and nothing arrives that alice never sent.  The copy bob
gets carries the archive id the archive has for it.  At the end both whole
archives are read again from the start (alice's must hold each acknowledged
message once, too).

Only where the kill lands is random (random.Random(seed); the seed is in
every failure message and XMPPD_CRASH_SEED=<seed> draws the same kills
again).  Whatever the draw, the assertions hold if the server is right; no
assertion is about timing.

What this shows and what it cannot: the kill takes the process, not the
machine.  Data the server handed to the kernel (write(2) into the page
cache) survives a kill -9 whether or not it was fsync()ed, so the test
proves the order "commit, then acknowledge" against the process dying: an
ack sent before the commit, an h one too high, or an ack for a commit whose
log records are still in Berkeley DB's log buffer (DB_TXN_NOSYNC and no
flush yet: recovery rebuilds the regions and reads only the log files, so
those records are gone) are caught when a kill lands in that window, as
over ROUNDS rounds some nearly always do.  An ack for a commit that was written but not
flushed to the disk (DB_TXN_WRITE_NOSYNC, a missing fsync, a disk cache
that lies) is not caught: only losing power or the kernel would show that,
and nothing on loopback does.
"""

import os
import random
import re
import select
import signal
import socket
import threading
import time
from collections import Counter
from xml.etree import ElementTree as ET

import pytest

from xmpp_helpers import (DOMAIN, IO_TIMEOUT, STOP_TIMEOUT, USERS, RawStream, StanzaStream,
                          uniq)

ALICE, BOB = "alice@localhost", "bob@localhost"
MODULES = ("c2s", "smacks", "roster", "offline", "mam")
# No resumption (the stream dies with the process anyway), no <r/> from the
# server; quotas and retention far above what the rounds store, so that
# nothing is bounced or pruned.
EXTRA = ("smacks = { request_every = 0; resume_timeout = 0; max_queue = 1000; };\n"
         "offline = { quota = 100000; };\n"
         "mam = { max_messages_per_user = 1000000; max_page = 1000; };\n")

ROUNDS = 20
MAX_PER_ROUND = 300   # messages alice writes at most in a round
R_EVERY = 3           # an <r/> after every R_EVERY messages (and after the last)
KILL_PAUSE = 0.030    # the kill comes up to this long after it is armed
KILL_LATEST = 5.0     # armed or not, the kill comes this long after SM is enabled
COLLECT_TIMEOUT = 20.0  # bob's offline delivery of one round
MAM_PAGE = 1000

NS_SM = "urn:xmpp:sm:3"
NS_CLIENT = "jabber:client"
NS_MAM = "urn:xmpp:mam:2"
NS_RSM = "http://jabber.org/protocol/rsm"
NS_FWD = "urn:xmpp:forward:0"
NS_SID = "urn:xmpp:sid:0"
NS_PING = "urn:xmpp:ping"

RE_ENABLED = re.compile(rb"<enabled\b[^>]*/>|<enabled\b[^>]*>\s*</enabled>")
RE_A = re.compile(rb"<a\b[^>]*\bh=[\"'](\d+)[\"'][^>]*/>")


def q(tag, ns=NS_CLIENT):
    return "{%s}%s" % (ns, tag)


def message_id(rnd, i):
    return "c%02d-%03d" % (rnd, i)


def message_body(rnd, i):
    return "crash round %d, message %d" % (rnd, i)


class CrashCheckFailed(AssertionError):
    pass


class Ledger:
    """What was sent, acknowledged, delivered and archived, over all rounds;
    fail() says where, with the seed, the kills so far and the log tail."""

    def __init__(self, seed, srv):
        self.seed, self.srv = seed, srv
        self.sent = {}                 # message id -> body (everything alice wrote)
        self.acked = {}                # round -> ids 1..h of that round
        self.delivered = Counter()     # message id -> copies bob got offline
        self.archived = Counter()      # message id -> items in bob's archive
        self.archive_id = {}           # message id -> bob's archive id (the first)
        self.bob_archive = []          # (archive id, message id), in archive order
        self.rounds = []               # one line per round, for failure messages

    def fail(self, rnd, what, ids=None, extra=""):
        ids = sorted(ids) if ids is not None else None
        shown = "" if ids is None else " (%d): %s%s" % (
            len(ids), ids[:40], " ..." if len(ids) > 40 else "")
        raise CrashCheckFailed(
            "round %s of %d, seed %d (XMPPD_CRASH_SEED=%d draws the same kills): %s%s%s\n"
            "--- rounds ---\n%s\n--- server log (tail) ---\n%s"
            % (rnd, ROUNDS, self.seed, self.seed, what, shown,
               "\n" + extra if extra else "", "\n".join(self.rounds[-12:]),
               self.srv.log_tail(40)))


# ---------------------------------------------------------------- alice's round

class Killer(threading.Thread):
    """SIGKILLs the server `pause` seconds after armed is set (or after
    KILL_LATEST, armed or not: every round ends, whatever the server does)."""

    def __init__(self, proc, pause):
        super().__init__(name="kill-9", daemon=True)
        self.proc, self.pause = proc, pause
        self.armed = threading.Event()

    def run(self):
        self.armed.wait(KILL_LATEST)
        time.sleep(self.pause)
        try:
            self.proc.kill()
        except OSError:
            pass


def read_available(r):
    """Append to r.buf whatever has arrived, without waiting for more."""
    while not r.eof and (r.sock.pending() or select.select([r.sock], [], [], 0)[0]):
        try:
            r._recv_some(time.monotonic() + 0.2)   # the rest of a TLS record
        except socket.timeout:
            return


def pipeline(srv, rnd, n, plan, book):
    """alice writes up to n messages to bob, <r/> after every R_EVERY, and
    reads the <a/> answers as they come, until the connection dies.  The
    kill is armed (plan = (by, at, pause)) once `at` messages are written
    (by "written") or acknowledged (by "acked"); at 0: before the first.
    Returns (ids written, h values received, anything else received)."""
    by, at, pause = plan
    r = RawStream(srv)
    killer = Killer(srv.proc, pause)
    written, hs, pos = [], [], 0

    def progress():
        """Take the new <a/> answers; arm the kill when it is due."""
        nonlocal pos
        for m in RE_A.finditer(r.buf, pos):
            hs.append(int(m.group(1)))
            pos = m.end()
        if (len(written) if by == "written" else max(hs, default=0)) >= at:
            killer.armed.set()

    try:
        r.login(ALICE, USERS[ALICE], "crash%02d" % rnd)
        r.send("<enable xmlns='%s'/>" % NS_SM)
        r.expect(RE_ENABLED, what="<enabled/>")
        killer.start()
        progress()
        while len(written) < n and not r.eof:
            chunk = []
            for i in range(len(written) + 1, min(n, len(written) + R_EVERY) + 1):
                ident, body = message_id(rnd, i), message_body(rnd, i)
                book.sent[ident] = body    # written, or tried to be: all may arrive
                written.append(ident)
                chunk.append("<message to='%s' id='%s' type='chat'><body>%s</body></message>"
                             % (BOB, ident, body))
            chunk.append("<r xmlns='%s'/>" % NS_SM)
            r.sock.settimeout(IO_TIMEOUT)
            try:
                r.send("".join(chunk))
            except OSError:
                break                      # the server is gone
            read_available(r)
            progress()
        # The answers still to come, up to the connection the kill closes.
        deadline = time.monotonic() + KILL_LATEST + STOP_TIMEOUT
        while not r.eof:
            try:
                r._recv_some(deadline)
            except socket.timeout:
                book.fail(rnd, "alice's connection still open %.0f s after the kill was due"
                          % STOP_TIMEOUT)
            progress()
    finally:
        killer.armed.set()
        killer.join(KILL_LATEST + 1)
        r.close()
    # anything else (a bounce) would say why an acknowledged message is missing
    return written, hs, RE_A.sub(b"", r.buf).strip()


def restart_after_kill(srv, rnd, book):
    try:
        rc = srv.proc.wait(STOP_TIMEOUT)
    except Exception:
        book.fail(rnd, "xmppd still running %.0f s after SIGKILL" % STOP_TIMEOUT)
    if rc != -signal.SIGKILL:
        book.fail(rnd, "xmppd exited with status %s before it was killed (crashed?)" % rc)
    srv._logf.close()
    srv._logf = None
    srv.start()


# ---------------------------------------------------------------- bob's checks

def ping(p):
    ident = uniq("sync")
    p.send("<iq type='get' id='%s' to='%s'><ping xmlns='%s'/></iq>" % (ident, DOMAIN, NS_PING))
    return ident


def take_offline(p, rnd, book):
    """bob's initial presence, then every offline message until the server
    has nothing more: each delivery round ends with the server's ping, which
    bob answers, then pings the server himself; when his own ping's answer
    comes without a new delivery round before it, the store is empty (the
    server handles a stream's stanzas in order).  Returns [(message id,
    body, [ids of bob's stanza-ids])]."""
    got = []
    p.send("<presence/>")
    sync = ping(p)
    deadline = time.monotonic() + COLLECT_TIMEOUT
    for _ in range(20 * MAX_PER_ROUND):
        el = p.wait(lambda e: True, "offline messages for bob after round %d" % rnd,
                    timeout=max(0.1, deadline - time.monotonic()))
        if el.tag == q("message"):
            sids = [i.get("id") for i in el.findall(q("stanza-id", NS_SID)) if i.get("by") == BOB]
            got.append((el.get("id"), el.findtext(q("body")), sids))
        elif (el.tag == q("iq") and el.get("type") == "get" and
              el.find(q("ping", NS_PING)) is not None):
            p.send("<iq type='result' id='%s' to='%s'/>" % (el.get("id"), el.get("from")))
            sync = ping(p)
        elif el.tag == q("iq") and el.get("id") == sync:
            assert el.get("type") == "result", ET.tostring(el)
            return got
    book.fail(rnd, "bob's offline delivery did not end after %d stanzas" % len(got))


def mam_items(p, after, rnd, book):
    """p's archive after archive id `after` (all of it if None), page by page:
    [(archive id, message id, body)]."""
    out = []
    for _ in range(1000):
        qid, ident = uniq("q"), uniq("mam")
        rsm = "<set xmlns='%s'><max>%d</max>%s</set>" % (
            NS_RSM, MAM_PAGE, "<after>%s</after>" % after if after else "")
        p.send("<iq type='set' id='%s'><query xmlns='%s' queryid='%s'>%s</query></iq>"
               % (ident, NS_MAM, qid, rsm))
        page = []
        while True:
            el = p.wait(lambda e: (e.tag == q("iq") and e.get("id") == ident) or
                        (e.tag == q("message") and e.find(q("result", NS_MAM)) is not None),
                        "archive page of %s (round %s)" % (p.bare, rnd))
            if el.tag == q("iq"):
                break
            res = el.find(q("result", NS_MAM))
            assert res.get("queryid") == qid, ET.tostring(el)
            m = res.find(q("forwarded", NS_FWD)).find(q("message"))
            page.append((res.get("id"), m.get("id"), m.findtext(q("body"))))
            if len(page) > MAM_PAGE:
                book.fail(rnd, "archive page longer than max=%d" % MAM_PAGE)
        if el.get("type") != "result":
            book.fail(rnd, "archive query refused: %r" % ET.tostring(el))
        out.extend(page)
        if el.find(q("fin", NS_MAM)).get("complete") == "true":
            return out
        if not page:
            book.fail(rnd, "archive page empty but not complete: %r" % ET.tostring(el))
        after = page[-1][0]
    book.fail(rnd, "archive of %s not complete after 1000 pages" % p.bare)


def check_round(srv, rnd, book):
    """bob after round rnd: offline messages, then what his archive gained."""
    p = StanzaStream.login(srv, BOB, "check%02d" % rnd)
    try:
        got = take_offline(p, rnd, book)
        after = book.bob_archive[-1][0] if book.bob_archive else None
        new = mam_items(p, after, rnd, book)
    finally:
        p.close()

    garbage = [g for g in got if book.sent.get(g[0]) != g[1]]
    if garbage:
        book.fail(rnd, "bob was delivered messages alice never sent", [repr(g) for g in garbage])
    book.delivered.update(g[0] for g in got)
    twice = [i for i, c in book.delivered.items() if c > 1]
    if twice:
        book.fail(rnd, "delivered more than once", twice)
    missing = set(book.acked[rnd]) - {g[0] for g in got}
    if missing:
        book.fail(rnd, "acknowledged (h=%d) but not delivered" % len(book.acked[rnd]), missing)

    garbage = [x for x in new if book.sent.get(x[1]) != x[2]]
    if garbage:
        book.fail(rnd, "archived messages alice never sent", [repr(x) for x in garbage])
    book.bob_archive.extend((x[0], x[1]) for x in new)
    book.archived.update(x[1] for x in new)
    for aid, mid, _ in new:
        book.archive_id.setdefault(mid, aid)
    twice = [i for i, c in book.archived.items() if c > 1]
    if twice:
        book.fail(rnd, "in bob's archive more than once", twice)
    missing = [i for i in book.acked[rnd] if not book.archived[i]]
    if missing:
        book.fail(rnd, "acknowledged but not in bob's archive", missing)
    # XEP-0359: the copy says where bob's archive has it (and no id when it
    # has not: the archive's commit comes first, so it cannot be the one lost)
    wrong = ["%s: delivered with stanza-id %s, archived as %s"
             % (mid, sids, book.archive_id.get(mid)) for mid, _, sids in got
             if sids != ([book.archive_id[mid]] if mid in book.archive_id else [])]
    if wrong:
        book.fail(rnd, "the delivered copy does not carry its archive id", wrong)
    return len(got), len(new)


def check_whole_archives(srv, book):
    acked = [i for ids in book.acked.values() for i in ids]
    p = StanzaStream.login(srv, BOB, "final")
    try:
        bob_all = mam_items(p, None, "final", book)
    finally:
        p.close()
    if [(x[0], x[1]) for x in bob_all] != book.bob_archive:
        book.fail("final", "bob's whole archive is not what the rounds read of it",
                  extra="read again: %d items, in the rounds: %d"
                  % (len(bob_all), len(book.bob_archive)))
    p = StanzaStream.login(srv, ALICE, "final")
    try:
        alice_all = mam_items(p, None, "final", book)
    finally:
        p.close()
    garbage = [x for x in alice_all if book.sent.get(x[1]) != x[2]]
    if garbage:
        book.fail("final", "alice's archive has messages she never sent",
                  [repr(x) for x in garbage])
    counts = Counter(x[1] for x in alice_all)
    twice = [i for i, c in counts.items() if c > 1]
    if twice:
        book.fail("final", "in alice's archive more than once", twice)
    missing = [i for i in acked if not counts[i]]
    if missing:
        book.fail("final", "acknowledged but not in alice's archive", missing)
    never = [i for i in acked if book.delivered[i] != 1]
    if never:
        book.fail("final", "acknowledged but not delivered exactly once", never)


# ----------------------------------------------------------------------- test

@pytest.fixture
def server(xmppd_factory):
    return xmppd_factory(modules=MODULES, extra=EXTRA)


def test_acknowledged_messages_survive_kill_9(server):
    seed = int(os.environ.get("XMPPD_CRASH_SEED") or random.SystemRandom().randrange(1 << 31))
    print("kill -9 seed: %d" % seed)
    rng = random.Random(seed)
    book = Ledger(seed, server)
    where = Counter()
    rnd = None
    try:
        for rnd in range(ROUNDS):
            # The kill is armed before the first message, once so many are
            # written, once so many are acknowledged (whatever the server's
            # speed, ASan or not, some kills land while acks flow), or once
            # the last is; it comes at once, within a few ms or up to
            # KILL_PAUSE later.  The server trails the pipeline, so the kill
            # lands before it handled anything, while it handles, or once
            # it is idle again.
            n = rng.randint(1, MAX_PER_ROUND)
            mode = rng.choice(("before",) + ("written",) * 3 + ("acked",) * 3 + ("idle",))
            at = 0 if mode == "before" else n if mode == "idle" else rng.randint(1, n)
            pause = rng.choice((0.0, rng.uniform(0, KILL_PAUSE / 10), rng.uniform(0, KILL_PAUSE)))
            plan = ("acked" if mode in ("acked", "idle") else "written", at, pause)
            written, hs, other = pipeline(server, rnd, n, plan, book)
            h = max(hs, default=0)
            book.rounds.append(
                "round %d: %d messages written, kill armed at %d %s + %.1f ms; last acks %s%s"
                % (rnd, len(written), plan[1], plan[0], plan[2] * 1000, hs[-3:],
                   "; alice also got %r" % other[:600] if other else ""))
            if hs != sorted(hs):
                book.fail(rnd, "the acknowledged count went down: %s" % hs)
            if h > len(written):
                book.fail(rnd, "h=%d acknowledges more than the %d messages sent"
                          % (h, len(written)))
            book.acked[rnd] = written[:h]
            restart_after_kill(server, rnd, book)
            ndel, narch = check_round(server, rnd, book)
            landed = ("before anything was stored" if narch == 0 else
                      "after the last ack" if h == len(written) else "while storing")
            book.rounds[-1] += "; h=%d, %d delivered, %d archived: killed %s" % (
                h, ndel, narch, landed)
            where[landed] += 1
        rnd = "final"
        check_whole_archives(server, book)
    except CrashCheckFailed:
        raise
    except Exception as e:   # a helper's timeout, a refused login: say where
        book.fail(rnd, "%s: %s" % (type(e).__name__, e))
    finally:
        if server.proc is not None and server.proc.poll() == -signal.SIGKILL:
            server.expect_failure = True   # our kill, not a crash: nothing to shut down
    print("\n".join(book.rounds))
    print("kills: %s; %d messages sent, %d acknowledged, %d delivered"
          % (", ".join("%d %s" % (c, w) for w, c in sorted(where.items())), len(book.sent),
             sum(len(ids) for ids in book.acked.values()), sum(book.delivered.values())))
