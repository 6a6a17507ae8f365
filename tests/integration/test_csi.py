"""XEP-0352 Client State Indication (mod_csi) over raw client streams.

The stream feature after authentication only; <active/>/<inactive/> before
authentication (stream error) and before binding (ignored); an inactive
client gets no presence changes, chat states or receipts until something
urgent comes (a message with a body, an IQ, an error), and then the newest
presence of each sender first, in order, then the urgent stanza; <active/>
sends what was held before the next element is answered (5.1); the
max_held, max_held_bytes and max_delay bounds; carbons are as urgent as what
they carry; a flood of presence keeps one entry per sender; an unavailable
is never lost; and with stream management (5.2) what was held for a lost
connection goes to the resumed stream, after smacks's unacknowledged
stanzas, counted once; the state moves with the session (the resumed stream
holds again, and a second resumption carries that too), and what is held is
dropped when a detached session expires."""

import os
import re
import signal
import socket
import subprocess
import time
from xml.etree import ElementTree as ET

import pytest

from xmpp_helpers import DOMAIN, USERS, XMPPD, RawStream, StanzaStream, uniq

ALICE, BOB = "alice@localhost", "bob@localhost"
NS_CSI = "urn:xmpp:csi:0"
NS_SM = "urn:xmpp:sm:3"
NS_CARBONS = "urn:xmpp:carbons:2"
NS_FWD = "urn:xmpp:forward:0"
NS_CHATSTATES = "http://jabber.org/protocol/chatstates"
NS_RECEIPTS = "urn:xmpp:receipts"
NS_PUBSUB_EVENT = "http://jabber.org/protocol/pubsub#event"
NS_OMEMO = "eu.siacs.conversations.axolotl"
MODULES = ("c2s", "roster", "csi")
INACTIVE = "<inactive xmlns='%s'/>" % NS_CSI
ACTIVE = "<active xmlns='%s'/>" % NS_CSI
QUIET = 0.4  # how long "nothing arrives" is watched (the server is local)


def q(tag, ns="jabber:client"):
    return "{%s}%s" % (ns, tag)


def bare(jid):
    return (jid or "").split("/")[0]


# ------------------------------------------------------------------ a stanza reader

class Peer(StanzaStream):
    """A raw client stream parsed into top-level elements (stanzas and
    nonzas), nested ones (carbons) included."""

    wait_timeout = 5.0

    def take(self, n, timeout=5.0):
        """The next n elements, in the order they arrived."""
        deadline = time.monotonic() + timeout
        while len(self.pending) < n:
            if time.monotonic() > deadline:
                raise AssertionError("%s: %d of %d elements within %.0f s: %s\n%s" % (
                    self.full, len(self.pending), n, timeout,
                    [show(e) for e in self.pending], self.r.dump()))
            self._pump(deadline)
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def quiet(self, seconds=QUIET):
        """Everything that arrives within `seconds` (the caller expects nothing)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._pump(deadline)
        out, self.pending = self.pending, []
        return out

    def drain(self):
        self.sync()
        out, self.pending = self.pending, []
        return out

    def presence(self, status=None, ptype=None):
        self.send("<presence%s>%s</presence>" % (
            " type='%s'" % ptype if ptype else "",
            "<status>%s</status>" % status if status else ""))


def show(el):
    s = ET.tostring(el).decode()
    return s if len(s) < 300 else s[:300] + "..."


def is_presence(el, frm=None, status=None, ptype=None):
    if el.tag != q("presence") or (frm and el.get("from") != frm):
        return False
    if el.get("type") != ptype:
        return False
    return status is None or el.findtext(q("status")) == status


def is_message(el, body=None):
    return el.tag == q("message") and (body is None or el.findtext(q("body")) == body)


def chatstate(el):
    for c in el:
        if c.tag.startswith("{%s}" % NS_CHATSTATES):
            return c.tag.split("}")[1]
    return None


def summary(els):
    """Comparable form of what arrived: (kind, from, detail)."""
    out = []
    for el in els:
        kind = el.tag.split("}")[-1]
        if kind == "presence":
            out.append(("presence", el.get("from"), el.get("type") or el.findtext(q("status"))))
        elif kind == "message":
            out.append(("message", el.get("from"),
                        el.findtext(q("body")) or chatstate(el) or el.get("id")))
        else:
            out.append((kind, el.get("from"), el.get("id")))
    return out


def stats(server):
    """The module's counters, from the log line SIGUSR1 makes the server write."""
    start = len(server.log())
    os.kill(server.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = server.log()[start:]
        if "stats: " in text:
            time.sleep(0.1)  # all counters are written in one go
            text = server.log()[start:]
            return {k: int(v) for k, v in re.findall(r"stats: csi\.(\w+)=(\d+)", text)}
        time.sleep(0.05)
    raise AssertionError("no stats after SIGUSR1:\n" + server.log_tail(30))


# ------------------------------------------------------------------ fixtures

def make_server(factory, modules=MODULES, csi=None, smacks=None):
    extra = ""
    if csi:
        extra += "csi = { %s };\n" % " ".join("%s = %d;" % kv for kv in csi.items())
    if smacks:
        extra += "smacks = { %s };\n" % " ".join("%s = %d;" % kv for kv in smacks.items())
    return factory(modules=modules, extra=extra)


@pytest.fixture
def peers():
    made = []

    def make(server, jid, resource):
        p = Peer.login(server, jid, resource)
        made.append(p)
        return p

    make.made = made
    yield make
    for p in made:
        p.close()


def subscribe(x, y):
    """x subscribes to y's presence and y approves (RFC 6121 3.1)."""
    x.send("<presence to='%s' type='subscribe'/>" % y.bare)
    y.wait(lambda e: e.tag == q("presence") and e.get("type") == "subscribe"
           and bare(e.get("from")) == x.bare, "subscription request from " + x.bare)
    y.send("<presence to='%s' type='subscribed'/>" % x.bare)
    x.wait(lambda e: e.tag == q("presence") and e.get("type") == "subscribed"
           and bare(e.get("from")) == y.bare, "subscription approval from " + y.bare)


def online(p):
    p.send("<iq type='get' id='roster1'><query xmlns='jabber:iq:roster'/></iq>")
    p.wait(lambda e: e.get("id") == "roster1", "roster")
    p.presence()
    p.wait(lambda e: is_presence(e, p.full), "own presence echo")


def pair(server, peers):
    """alice/phone and bob/pc, available, subscribed to each other both ways,
    with nothing pending."""
    a = peers(server, ALICE, "phone")
    b = peers(server, BOB, "pc")
    online(a)
    online(b)
    subscribe(a, b)
    subscribe(b, a)
    a.wait(lambda e: is_presence(e, b.full), "bob's presence")
    b.wait(lambda e: is_presence(e, a.full), "alice's presence")
    b.drain()
    a.drain()
    return a, b


def go_inactive(a):
    a.send(INACTIVE)
    a.sync()  # handled in order: the server has processed <inactive/>


def chat_state(to, state, thread=None):
    return ("<message to='%s' type='chat'><%s xmlns='%s'/>%s</message>"
            % (to, state, NS_CHATSTATES, "<thread>%s</thread>" % thread if thread else ""))


def receipt(to, ident):
    return ("<message to='%s' id='rcpt-%s'><received xmlns='%s' id='%s'/></message>"
            % (to, ident, NS_RECEIPTS, ident))


def chat(to, body, ident=None):
    return "<message to='%s' type='chat'%s><body>%s</body></message>" % (
        to, " id='%s'" % ident if ident else "", body)


# ------------------------------------------------------------------ the protocol

def test_feature_only_after_authentication_and_nonza_before_it_is_an_error(xmppd_factory):
    srv = make_server(xmppd_factory)
    r = RawStream(srv)
    try:
        r.open_stream()
        r.starttls()
        feats = r.open_stream()
        assert NS_CSI.encode() not in feats, feats
        r.send(INACTIVE)  # not offered, not known on this stream yet
        r.expect_stream_error("unsupported-stanza-type")
    finally:
        r.close()

    r = RawStream(srv)
    try:
        r.authenticate("alice", USERS[ALICE])
        feats = r.open_stream()
        assert re.search(rb"<csi\s+xmlns=['\"]urn:xmpp:csi:0['\"]\s*/>", feats), feats
        # Authenticated, not bound: ignored (no reply, no error); the stream
        # then starts active once bound.
        r.send(INACTIVE)
        full = r.bind("early")
        p = Peer(r, full)
        b = Peer.login(srv, BOB, "x")
        try:
            b.send(chat_state(full, "composing"))
            got = p.wait(lambda e: e.tag == q("message"), "chat state", timeout=3)
            assert chatstate(got) == "composing"
            # After binding the nonzas work (no reply to either).
            p.send(INACTIVE)
            p.sync()
            b.send(chat_state(full, "paused"))
            b.sync()
            assert p.quiet() == []
            p.send(ACTIVE)
            assert chatstate(p.take(1)[0]) == "paused"
        finally:
            b.close()
        # An element of the namespace that is not a state is unknown.
        p.send("<csi xmlns='%s'/>" % NS_CSI)
        r.expect_stream_error("unsupported-stanza-type")
    finally:
        r.close()


def test_inactive_client_gets_latest_presence_then_the_message(xmppd_factory, peers):
    srv = make_server(xmppd_factory)
    a, b = pair(srv, peers)
    go_inactive(a)
    b.presence("away-1")
    b.presence("away-2")
    b.send(chat_state(a.full, "composing"))
    b.send(chat_state(a.full, "paused"))
    b.send(receipt(a.full, "r1"))
    b.sync()
    assert a.quiet() == [], "an inactive client got stanzas that may wait"
    # A message with a body is urgent: what was held comes first, in order of
    # first arrival, only the newest presence and chat state of bob/pc.
    b.send(chat(a.full, "hello", "m1"))
    got = summary(a.take(4))
    assert got == [("presence", b.full, "away-2"), ("message", b.full, "paused"),
                   ("message", b.full, "rcpt-r1"), ("message", b.full, "hello")], got
    a.sync()
    assert a.pending == []
    # Still inactive: the next presence waits again.
    b.presence("away-3")
    b.sync()
    assert a.quiet() == []
    s = stats(srv)
    assert s.get("held", 0) >= 6 and s.get("superseded", 0) >= 2, s
    assert s.get("flushed", 0) >= 3, s


def test_active_flushes_in_order_and_active_client_gets_everything(xmppd_factory, peers):
    srv = make_server(xmppd_factory)
    a, b = pair(srv, peers)
    # Active (the default): presence and chat states arrive at once.
    b.presence("here")
    b.send(chat_state(a.full, "composing"))
    got = summary(a.take(2, timeout=3))
    assert got == [("presence", b.full, "here"), ("message", b.full, "composing")], got
    go_inactive(a)
    b.presence("brb")
    b.send(chat_state(a.full, "gone"))
    b.sync()
    assert a.quiet() == []
    # 5.1: <active/> then a ping: what was held is on the wire before the pong.
    ident = uniq("ping")
    a.send(ACTIVE + "<iq type='get' id='%s' to='%s'><ping xmlns='urn:xmpp:ping'/></iq>"
           % (ident, DOMAIN))
    got = a.take(3)
    assert summary(got[:2]) == [("presence", b.full, "brb"), ("message", b.full, "gone")], \
        summary(got)
    assert got[2].tag == q("iq") and got[2].get("id") == ident
    b.presence("back")
    assert summary(a.take(1, timeout=3)) == [("presence", b.full, "back")]


def test_iqs_are_never_held(xmppd_factory, peers):
    srv = make_server(xmppd_factory)
    a, b = pair(srv, peers)
    go_inactive(a)
    b.presence("busy")
    b.sync()
    assert a.quiet() == []
    # bob pings alice's client: the IQ reaches her at once, after the held presence.
    b.send("<iq type='get' id='p2c' to='%s'><ping xmlns='urn:xmpp:ping'/></iq>" % a.full)
    got = a.take(2, timeout=3)
    assert summary(got[:1]) == [("presence", b.full, "busy")]
    assert got[1].tag == q("iq") and got[1].get("id") == "p2c" and got[1].get("type") == "get"
    a.send("<iq type='result' id='p2c' to='%s'/>" % b.full)
    b.wait(lambda e: e.get("id") == "p2c" and e.get("type") == "result", "pong from alice", 3)
    # An error is urgent too.
    b.presence("away")
    b.send("<message to='%s' type='error' id='e1'><error type='cancel'>"
           "<item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
           % a.full)
    got = summary(a.take(2, timeout=3))
    assert got == [("presence", b.full, "away"), ("message", b.full, "e1")], got


def test_urgent_payloads_and_what_may_wait(xmppd_factory, peers):
    srv = make_server(xmppd_factory)
    a, b = pair(srv, peers)
    go_inactive(a)
    # May wait: a PEP-style event (an OMEMO device list), a chat marker.
    b.send("<message to='%s' type='headline' id='ev1'><event xmlns='%s'>"
           "<items node='eu.siacs.conversations.axolotl.devicelist'><item id='current'>"
           "<list xmlns='%s'><device id='42'/></list></item></items></event></message>"
           % (a.full, NS_PUBSUB_EVENT, NS_OMEMO))
    b.send("<message to='%s' id='mk1'><displayed xmlns='urn:xmpp:chat-markers:0' id='m0'/>"
           "</message>" % a.full)
    b.sync()
    assert a.quiet() == []
    # Urgent: an OMEMO message without a fallback body (key transport).
    b.send("<message to='%s' type='chat' id='omemo1'><encrypted xmlns='%s'>"
           "<header sid='1'><key rid='2'>AAAA</key><iv>BBBB</iv></header></encrypted>"
           "<store xmlns='urn:xmpp:hints'/></message>" % (a.full, NS_OMEMO))
    got = summary(a.take(3, timeout=3))
    assert got == [("message", b.full, "ev1"), ("message", b.full, "mk1"),
                   ("message", b.full, "omemo1")], got
    # Urgent: an unknown payload (a call proposal) is never held.
    b.presence("x")
    b.send("<message to='%s' id='jmi1'><propose xmlns='urn:xmpp:jingle-message:0' id='c1'>"
           "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>"
           "</message>" % a.full)
    got = summary(a.take(2, timeout=3))
    assert got == [("presence", b.full, "x"), ("message", b.full, "jmi1")], got


def test_carbons_are_as_urgent_as_what_they_carry(xmppd_factory, peers):
    srv = make_server(xmppd_factory, modules=("c2s", "roster", "carbons", "csi"))
    a, b = pair(srv, peers)
    desk = peers(srv, ALICE, "desk")
    online(desk)
    a.send("<iq type='set' id='cb1'><enable xmlns='%s'/></iq>" % NS_CARBONS)
    a.wait(lambda e: e.get("id") == "cb1" and e.get("type") == "result", "carbons enabled")
    a.drain()
    go_inactive(a)
    # Her desk types to bob: a <sent/> carbon of a chat state may wait.
    desk.send(chat_state(b.full, "composing"))
    desk.sync()
    assert a.quiet() == []
    # The message itself: its carbon is urgent, after the held one.
    desk.send(chat(b.full, "from the desk", "d1"))
    got = a.take(2, timeout=3)
    kinds = []
    for el in got:
        sent = el.find(q("sent", NS_CARBONS))
        assert sent is not None, show(el)
        inner = sent.find(q("forwarded", NS_FWD)).find(q("message"))
        kinds.append(inner.findtext(q("body")) or chatstate(inner))
    assert kinds == ["composing", "from the desk"], kinds
    desk.close()


# ------------------------------------------------------------------ bounds

def test_max_held_and_max_held_bytes_flush(xmppd_factory, peers):
    srv = make_server(xmppd_factory, csi={"max_held": 4, "max_held_bytes": 2048})
    a, b = pair(srv, peers)
    go_inactive(a)
    for i in range(3):
        b.send(receipt(a.full, "n%d" % i))
    b.sync()
    assert a.quiet() == []
    b.send(receipt(a.full, "n3"))  # the 4th: all of them go
    got = summary(a.take(4, timeout=3))
    assert got == [("message", b.full, "rcpt-n%d" % i) for i in range(4)], got
    b.sync()
    assert a.quiet() == []
    # Bytes: one big receipt waits, the second passes the bound.
    big = "x" * 700  # twice in each receipt: about 1.5 kB
    b.send(receipt(a.full, big + "1"))
    b.sync()
    assert a.quiet() == []
    b.send(receipt(a.full, big + "2"))
    got = summary(a.take(2, timeout=3))
    assert got == [("message", b.full, "rcpt-" + big + "1"),
                   ("message", b.full, "rcpt-" + big + "2")]
    assert stats(srv).get("limit_flushes") == 2


def test_max_delay_flushes_by_timer(xmppd_factory, peers):
    srv = make_server(xmppd_factory, csi={"max_delay": 1})
    a, b = pair(srv, peers)
    go_inactive(a)
    t0 = time.monotonic()
    b.presence("later")
    b.sync()
    assert a.quiet(0.3) == []
    got = summary(a.take(1, timeout=4))
    assert got == [("presence", b.full, "later")], got
    assert time.monotonic() - t0 >= 0.8


@pytest.mark.parametrize("key,value", [("max_held", 0), ("max_held", 1001), ("max_held_bytes", 10),
                                       ("max_delay", -1)])
def test_bad_settings_refused(xmppd_factory, key, value):
    srv = xmppd_factory(modules=MODULES, extra="csi = { %s = %d; };\n" % (key, value),
                        start=False, users={})
    r = subprocess.run([str(XMPPD), "--check-config", str(srv.config_path)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=20)
    assert r.returncode == 1 and key in r.stdout + r.stderr, (r.returncode, r.stdout, r.stderr)


# ------------------------------------------------------------------ hostile

def test_presence_flood_keeps_newest_per_sender_and_unavailable(xmppd_factory, peers):
    srv = make_server(xmppd_factory)
    a, b = pair(srv, peers)
    b2 = peers(srv, BOB, "tablet")
    online(b2)
    a.wait(lambda e: is_presence(e, b2.full), "bob/tablet's presence")
    a.drain()
    go_inactive(a)  # nothing was held so far: the counters start at 0
    # bob/tablet goes away and comes back: both reach alice, unavailable first.
    b2.presence(ptype="unavailable")
    b2.presence("back")
    b2.sync()  # two streams: the order between them is only the one we make
    # bob/pc floods: one entry is kept for him.
    flood = "".join("<presence><status>n%d</status></presence>" % i for i in range(300))
    b.send(flood)
    b.sync()
    assert a.quiet() == []
    counters = stats(srv)
    assert counters.get("held") == 302 and counters.get("superseded") == 299, counters
    b.send(chat(a.full, "now", "m1"))
    got = summary(a.take(4, timeout=3))
    assert got == [("presence", b2.full, "unavailable"), ("presence", b2.full, "back"),
                   ("presence", b.full, "n299"), ("message", b.full, "now")], got
    a.sync()
    assert a.pending == []
    # Available then unavailable while inactive: only the unavailable.
    b2.presence("again")
    b2.presence(ptype="unavailable")
    b2.sync()
    assert a.quiet() == []
    b.send(chat(a.full, "and now", "m2"))
    got = summary(a.take(2, timeout=3))
    assert got == [("presence", b2.full, "unavailable"), ("message", b.full, "and now")], got


def test_chat_state_flood_and_state_toggling(xmppd_factory, peers):
    srv = make_server(xmppd_factory)
    a, b = pair(srv, peers)
    go_inactive(a)
    # Chat states: the newest per sender and thread.
    b.send("".join(chat_state(a.full, s) for s in ["composing", "paused"] * 200))
    b.send(chat_state(a.full, "composing", thread="t2"))
    b.sync()
    assert a.quiet() == []
    # A burst of toggles, ending inactive: each <active/> sends what was held.
    a.send((ACTIVE + INACTIVE) * 300)
    got = summary(a.take(2, timeout=5))
    assert got == [("message", b.full, "paused"), ("message", b.full, "composing")], got
    a.sync()
    assert a.pending == []
    b.presence("still-inactive")
    b.sync()
    assert a.quiet() == []
    a.send(ACTIVE + ACTIVE)
    assert summary(a.take(1, timeout=3)) == [("presence", b.full, "still-inactive")]
    # Nothing else was left behind, and the server still serves both.
    a.sync()
    assert a.pending == []
    b.send(chat(a.full, "alive"))
    a.wait(lambda e: is_message(e, "alive"), "message after the toggling", 3)
    assert srv.running()


# ------------------------------------------------------------------ stream management

def cut(p):
    """Lose the connection: no </stream:stream>."""
    try:
        p.r.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    p.r.sock.close()


def test_held_stanzas_follow_a_resumed_session(xmppd_factory, peers):
    srv = make_server(xmppd_factory, modules=("c2s", "roster", "smacks", "csi"),
                      smacks={"resume_timeout": 10})
    a, b = pair(srv, peers)
    a.send("<enable xmlns='%s' resume='true'/>" % NS_SM)
    enabled = a.wait(lambda e: e.tag == "{%s}enabled" % NS_SM, "<enabled/>")
    previd = enabled.get("id")
    assert previd
    go_inactive(a)  # sent after <enable/>: its pong is stanza 1
    b.send(chat(a.full, "before the cut", "m1"))  # stanza 2: urgent, written
    a.wait(lambda e: is_message(e, "before the cut"), "m1")
    b.presence("p1")
    b.presence("p2")
    b.sync()
    assert a.quiet() == []
    cut(a)
    time.sleep(0.3)  # the server notices; the session is detached
    b.presence("p3")  # held while detached, merged with p2
    b.sync()

    r = RawStream(srv)
    r.authenticate("alice", USERS[ALICE])
    r.open_stream()
    n = Peer(r, a.full)
    peers.made.append(n)
    # alice handled only the pong: m1 comes again, then what was held.
    n.send("<resume xmlns='%s' previd='%s' h='1'/>" % (NS_SM, previd))
    got = n.take(3, timeout=5)
    assert got[0].tag == "{%s}resumed" % NS_SM, show(got[0])
    assert summary(got[1:]) == [("message", b.full, "before the cut"),
                                ("presence", b.full, "p3")], summary(got[1:])
    # 5.2: the resumed stream is active.
    b.presence("p4")
    assert summary(n.take(1, timeout=3)) == [("presence", b.full, "p4")]
    # The held presence was counted by smacks once, when it was written: m1,
    # p3, p4 and the pong of sync() below are 4 stanzas after h=1.
    n.sync()
    assert n.pending == []
    n.send("<a xmlns='%s' h='5'/>" % NS_SM)
    n.sync()  # no error: 5 is exact (the second pong makes 6)
    n.send("<a xmlns='%s' h='7'/>" % NS_SM)
    r.expect_stream_error("undefined-condition")


def test_held_stanzas_are_dropped_when_the_session_ends(xmppd_factory, peers):
    srv = make_server(xmppd_factory)
    a, b = pair(srv, peers)
    go_inactive(a)
    b.presence("lost")
    b.send(chat_state(a.full, "composing"))
    b.sync()
    assert a.quiet() == []
    before = stats(srv)
    a.close()
    b.wait(lambda e: is_presence(e, a.full, ptype="unavailable"), "alice's unavailable")
    after = stats(srv)
    assert after.get("dropped", 0) - before.get("dropped", 0) == 2, (before, after)


def resume(srv, peers, full, previd, h):
    """A new stream of alice that resumes `previd`; returns it after <resumed/>."""
    r = RawStream(srv)
    r.authenticate("alice", USERS[ALICE])
    r.open_stream()
    n = Peer(r, full)
    peers.made.append(n)
    n.send("<resume xmlns='%s' previd='%s' h='%d'/>" % (NS_SM, previd, h))
    got = n.take(1, timeout=5)[0]
    assert got.tag == "{%s}resumed" % NS_SM, show(got)
    return n


def test_resumed_stream_holds_again_and_resumes_again(xmppd_factory, peers):
    srv = make_server(xmppd_factory, modules=("c2s", "roster", "smacks", "csi"),
                      smacks={"resume_timeout": 10})
    a, b = pair(srv, peers)
    a.send("<enable xmlns='%s' resume='true'/>" % NS_SM)
    previd = a.wait(lambda e: e.tag == "{%s}enabled" % NS_SM, "<enabled/>").get("id")
    go_inactive(a)  # its pong is stanza 1
    b.presence("p1")
    b.sync()
    assert a.quiet() == []

    # Taken over while the old connection is still open (the client thinks
    # it is dead): what it held moves to the new stream, which is active.
    n = resume(srv, peers, a.full, previd, 1)
    assert summary(n.take(1, timeout=3)) == [("presence", b.full, "p1")]
    a.r.read_until_closed(timeout=3)
    assert a.r.eof, "the old connection is still open"

    # The state now belongs to the new stream: it holds, and flushes there.
    go_inactive(n)  # 2 = p1, 3 = this pong
    b.presence("p2")
    b.sync()
    assert n.quiet() == []
    b.send(chat(n.full, "wake up", "w1"))
    assert summary(n.take(2, timeout=3)) == [("presence", b.full, "p2"),
                                             ("message", b.full, "wake up")]
    # Still inactive: held, then lost with the connection, then resumed
    # again: w1 (5, not acknowledged) comes again before what was held.
    b.presence("p3")
    b.sync()
    assert n.quiet() == []
    cut(n)
    time.sleep(0.3)  # the server notices; the session is detached
    n2 = resume(srv, peers, a.full, previd, 4)
    assert summary(n2.take(2, timeout=3)) == [("message", b.full, "wake up"),
                                              ("presence", b.full, "p3")]
    # active: nothing is held any more
    b.send(chat_state(n2.full, "composing"))
    assert chatstate(n2.take(1, timeout=3)[0]) == "composing"


def test_held_stanzas_are_dropped_when_a_detached_session_expires(xmppd_factory, peers):
    srv = make_server(xmppd_factory, modules=("c2s", "roster", "smacks", "csi"),
                      smacks={"resume_timeout": 1})
    a, b = pair(srv, peers)
    a.send("<enable xmlns='%s' resume='true'/>" % NS_SM)
    a.wait(lambda e: e.tag == "{%s}enabled" % NS_SM, "<enabled/>")
    go_inactive(a)
    b.presence("lost")
    b.sync()
    assert a.quiet() == []
    before = stats(srv)
    cut(a)
    b.wait(lambda e: is_presence(e, a.full, ptype="unavailable"), "alice's unavailable",
           timeout=5)
    after = stats(srv)
    assert after.get("dropped", 0) - before.get("dropped", 0) == 1, (before, after)
    assert after.get("flushed", 0) == before.get("flushed", 0), (before, after)
