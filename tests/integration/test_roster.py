"""mod_roster over real client streams: roster get/set/remove and pushes
(RFC 6121 2), validation of roster sets (2.3.3), roster versioning (2.6),
the subscription handshake and its server rules (3), presence broadcast,
probes and unavailable presence (4), and persistence across a restart."""

import re
import time
from xml.etree import ElementTree as ET

import pytest

from xmpp_helpers import MALLORY, USERS, RawStream

ALICE, BOB = "alice@localhost", "bob@localhost"
PASSWORDS = dict(USERS)
PASSWORDS[MALLORY[0]] = MALLORY[1]
NS = "jabber:iq:roster"
Q = "{%s}query" % NS
ITEM = "{%s}item" % NS
STANZA_RE = re.compile(rb"<(iq|presence|message)\b[^>]*?(?:/>|>.*?</\1>)", re.S)


def local(tag):
    return tag.rsplit("}", 1)[-1]


class Raw:
    """A logged-in client stream that parses the stanzas it receives and
    keeps the ones a wait did not ask for."""

    seq = 0

    def __init__(self, server, jid, resource):
        self.stream = RawStream(server)
        self.full = self.stream.login(jid, PASSWORDS[jid], resource)
        self.bare = jid
        self.kept = []

    def send(self, xml):
        self.stream.send(xml)

    def _read(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            out = self.stream.expect(STANZA_RE, timeout=remaining)
        except AssertionError as e:
            if "timed out" in str(e):
                return None
            raise
        return ET.fromstring(STANZA_RE.search(out).group(0))

    def wait(self, pred, what, timeout=5.0):
        for i, st in enumerate(self.kept):
            if pred(st):
                return self.kept.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            st = self._read(deadline)
            if st is None:
                raise AssertionError("%s: no %s within %.0f s; got instead: %s" % (
                    self.full, what, timeout, [ET.tostring(k)[:300] for k in self.kept]))
            if pred(st):
                return st
            self.kept.append(st)

    def iq(self, body, itype="get", to=None):
        Raw.seq += 1
        ident = "q%d" % Raw.seq
        self.send("<iq type='%s' id='%s'%s>%s</iq>" % (
            itype, ident, " to='%s'" % to if to else "", body))
        return self.wait(lambda s: local(s.tag) == "iq" and s.get("id") == ident,
                         "reply to iq %s" % ident)

    def sync(self):
        """Every stanza the server queued for us before now has arrived."""
        self.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost")

    def roster_get(self, ver=None):
        attr = "" if ver is None else " ver='%s'" % ver
        r = self.iq("<query xmlns='%s'%s/>" % (NS, attr))
        assert r.get("type") == "result", ET.tostring(r)
        return r

    def roster(self):
        q = self.roster_get().find(Q)
        return {i.get("jid"): i for i in q.findall(ITEM)}

    def roster_set(self, jid, name=None, groups=(), remove=False):
        attrs = "jid='%s'" % jid
        if name is not None:
            attrs += " name='%s'" % name
        if remove:
            attrs += " subscription='remove'"
        body = "".join("<group>%s</group>" % g for g in groups)
        return self.iq("<query xmlns='%s'><item %s>%s</item></query>" % (NS, attrs, body), "set")

    def push(self, jid, what=None, **attrs):
        """The next roster push for jid (whose item has those attributes); it is acked."""
        def pred(s):
            if local(s.tag) != "iq" or s.get("type") != "set" or s.find(Q) is None:
                return False
            it = s.find(Q).find(ITEM)
            return it is not None and it.get("jid") == jid and all(
                it.get(k.rstrip("_")) == v for k, v in attrs.items())
        st = self.wait(pred, what or "roster push for %s %s" % (jid, attrs))
        assert st.get("from") in (None, self.bare), ET.tostring(st)
        self.send("<iq type='result' id='%s'/>" % st.get("id"))
        return st

    def presence(self, frm, ptype=None, what=None):
        def pred(s):
            return (local(s.tag) == "presence" and s.get("from") == frm
                    and s.get("type") == ptype)
        return self.wait(pred, what or "presence type=%s from %s" % (ptype, frm))

    def nothing(self, pred, what):
        """After sync(), no kept stanza matches pred."""
        self.sync()
        for st in self.kept:
            assert not pred(st), "unexpected %s: %s" % (what, ET.tostring(st))

    def available(self):
        self.send("<presence/>")
        self.presence(self.full)  # mod_c2s echoes it: the server has processed it

    def close(self):
        """Close the stream the polite way and wait for the server to finish
        with it, so two resources of one user never die in the same instant
        (see the note on the core in the module's report)."""
        try:
            self.stream.send("</stream:stream>")
            self.stream.read_until_closed(timeout=3)
        except OSError:
            pass
        self.stream.close()


def child(st, name):
    """A child element by local name (the stream's default namespace may or
    may not be written on the stanza)."""
    for c in st:
        if local(c.tag) == name:
            return c
    return None


def error_condition(st):
    err = child(st, "error")
    assert err is not None, ET.tostring(st)
    for c in err:
        if c.tag.startswith("{urn:ietf:params:xml:ns:xmpp-stanzas}") and local(c.tag) != "text":
            return local(c.tag)
    return None


def is_sub(frm, ptype):
    return lambda s: (local(s.tag) == "presence" and s.get("type") == ptype
                      and s.get("from", "").split("/")[0] == frm)


@pytest.fixture
def rserver(xmppd_factory):
    return xmppd_factory(modules=("c2s", "roster"), extra_users=[MALLORY])


@pytest.fixture
def connect():
    opened = []

    def make(server, jid, resource="r"):
        r = Raw(server, jid, resource)
        opened.append(r)
        return r

    yield make
    for r in opened:
        r.close()


def handshake(a, b, sub="none"):
    """a subscribes to b (a's item had subscription sub) and b approves.
    Both are available and interested (requested their roster)."""
    a.send("<presence to='%s' type='subscribe'/>" % b.bare)
    a.push(b.bare, subscription=sub, ask="subscribe")
    req = b.wait(is_sub(a.bare, "subscribe"), "subscription request")
    assert req.get("from") == a.bare  # 3.1.2: stamped with the bare JID
    b.send("<presence to='%s' type='subscribed'/>" % a.bare)
    return req


def mutual(alice, bob):
    handshake(alice, bob)
    bob.push(ALICE, subscription="from")
    alice.push(BOB, subscription="to")
    alice.wait(is_sub(BOB, "subscribed"), "subscribed")
    handshake(bob, alice, "from")
    alice.push(BOB, subscription="both")
    bob.push(ALICE, subscription="both")


# ---------------------------------------------------------------- roster IQs

def test_rosterver_and_preapproval_features_offered(rserver):
    r = RawStream(rserver)
    try:
        r.open_stream()
        r.starttls()
        r.open_stream()
        assert r.auth_scram("alice", USERS[ALICE])
        feats = r.open_stream()
        assert b"urn:xmpp:features:rosterver" in feats, feats
        assert b"urn:xmpp:features:pre-approval" in feats, feats
    finally:
        r.close()


def test_roster_set_get_remove_with_pushes(rserver, connect):
    a = connect(rserver, ALICE, "a")
    b = connect(rserver, ALICE, "b")
    c = connect(rserver, ALICE, "c")  # never asks for the roster: not interested
    assert a.roster() == {} and b.roster() == {}

    r = a.roster_set(BOB, name="Bobby", groups=("Friends", "Work"))
    assert r.get("type") == "result" and r.find(Q) is None, ET.tostring(r)
    for res in (a, b):
        push = res.push(BOB, name="Bobby", subscription="none")
        assert push.find(Q).get("ver"), ET.tostring(push)
        groups = sorted(g.text for g in push.find(Q).find(ITEM).findall("{%s}group" % NS))
        assert groups == ["Friends", "Work"]
    item = b.roster()[BOB]
    assert item.get("name") == "Bobby" and item.get("subscription") == "none"
    assert item.get("ask") is None

    # an update replaces name and groups
    a.roster_set(BOB, name="Robert")
    b.push(BOB, name="Robert")
    item = a.roster()[BOB]
    assert item.get("name") == "Robert" and item.findall("{%s}group" % NS) == []

    r = b.roster_set(BOB, remove=True)
    assert r.get("type") == "result", ET.tostring(r)
    a.push(BOB, subscription="remove")
    b.push(BOB, subscription="remove")
    assert a.roster() == {}
    c.nothing(lambda s: s.find(Q) is not None, "roster push to a resource that never asked")

    # 2.5.3: removing what is not there
    r = a.roster_set(BOB, remove=True)
    assert r.get("type") == "error" and error_condition(r) == "item-not-found"


@pytest.mark.parametrize("item,cond", [
    ("<item jid='a@b@c'/>", "jid-malformed"),
    ("<item jid='@localhost'/>", "jid-malformed"),
    ("<item jid='bob@localhost/res'/>", "jid-malformed"),
    ("<item/>", "jid-malformed"),
    ("<item jid='bob@localhost'><group>g</group><group>g</group></item>", "bad-request"),
    ("<item jid='bob@localhost'><group></group></item>", "not-acceptable"),
    ("<item jid='bob@localhost' name='%s'/>" % ("n" * 1024), "not-acceptable"),
    ("<item jid='bob@localhost'><group>%s</group></item>" % ("g" * 1024), "not-acceptable"),
    ("<item jid='bob@localhost'/><item jid='mallory@localhost'/>", "bad-request"),
    ("", "bad-request"),
])
def test_bad_roster_set_refused(rserver, connect, item, cond):
    a = connect(rserver, ALICE, "a")
    a.roster_get()
    r = a.iq("<query xmlns='%s'>%s</query>" % (NS, item), "set")
    assert r.get("type") == "error", ET.tostring(r)
    assert error_condition(r) == cond, ET.tostring(r)
    assert a.roster() == {}
    a.nothing(lambda s: s.find(Q) is not None, "roster push after a refused set")


def test_roster_limits(xmppd_factory, connect):
    srv = xmppd_factory(modules=("c2s", "roster"),
                        extra="roster = { max_items = 2; max_groups = 2; };\n",
                        extra_users=[MALLORY])
    a = connect(srv, ALICE, "a")
    r = a.roster_set("x@localhost", groups=("1", "2", "3"))
    assert error_condition(r) == "not-acceptable", ET.tostring(r)
    for j in ("x@localhost", "y@localhost"):
        assert a.roster_set(j, groups=("1", "2")).get("type") == "result"
    r = a.roster_set("z@localhost")
    assert error_condition(r) == "not-allowed", ET.tostring(r)
    # an existing item can still be changed, and a subscription to a new
    # contact cannot grow the roster past the limit either
    assert a.roster_set("x@localhost", name="X").get("type") == "result"
    a.send("<presence to='z@localhost' type='subscribe' id='s1'/>")
    err = a.wait(lambda s: s.get("id") == "s1", "bounce of the subscribe")
    assert error_condition(err) == "not-allowed"
    assert sorted(a.roster()) == ["x@localhost", "y@localhost"]


def test_other_user_cannot_read_or_set_my_roster(rserver, connect):
    a = connect(rserver, ALICE, "a")
    a.roster_set(BOB, name="secret-name")
    m = connect(rserver, MALLORY[0], "m")
    r = m.iq("<query xmlns='%s'/>" % NS, to=ALICE)
    assert r.get("type") == "error" and error_condition(r) == "forbidden", ET.tostring(r)
    assert b"secret-name" not in ET.tostring(r)
    r = m.iq("<query xmlns='%s'><item jid='mallory@localhost'/></query>" % NS, "set", to=ALICE)
    assert error_condition(r) == "forbidden", ET.tostring(r)
    r = m.iq("<query xmlns='%s'><item jid='bob@localhost' subscription='remove'/></query>"
             % NS, "set", to=ALICE)
    assert error_condition(r) == "forbidden", ET.tostring(r)
    assert sorted(a.roster()) == [BOB]


# ------------------------------------------------------------ subscriptions

def test_subscription_handshake_to_both(rserver, connect):
    alice = connect(rserver, ALICE, "a")
    bob = connect(rserver, BOB, "b")
    for c in (alice, bob):
        c.roster_get()
        c.available()

    handshake(alice, bob)
    bob.push(ALICE, subscription="from")
    alice.push(BOB, subscription="to")
    sub = alice.wait(is_sub(BOB, "subscribed"), "subscribed")
    assert sub.get("from") == BOB
    # 3.1.5: once approved, alice gets bob's current presence
    alice.presence(bob.full)
    assert alice.roster()[BOB].get("ask") is None

    handshake(bob, alice, "from")
    alice.push(BOB, subscription="both")
    bob.push(ALICE, subscription="both")
    bob.wait(is_sub(ALICE, "subscribed"), "subscribed")
    bob.presence(alice.full)
    assert alice.roster()[BOB].get("subscription") == "both"
    assert bob.roster()[ALICE].get("subscription") == "both"

    # an approval nobody asked for is a pre-approval (3.4), not routed
    alice.send("<presence to='mallory@localhost' type='subscribed'/>")
    alice.push("mallory@localhost", subscription="none", approved="true")
    m = connect(rserver, MALLORY[0], "m")
    m.roster_get()
    m.available()
    m.send("<presence to='alice@localhost' type='subscribe'/>")
    m.push(ALICE, ask="subscribe")
    # alice's server answers for her, without asking her
    m.wait(is_sub(ALICE, "subscribed"), "automatic subscribed")
    m.push(ALICE, subscription="to")
    alice.push("mallory@localhost", subscription="from")
    alice.nothing(is_sub("mallory@localhost", "subscribe"), "pre-approved request delivered")


def test_invalid_transitions_are_ignored(rserver, connect):
    alice = connect(rserver, ALICE, "a")
    bob = connect(rserver, BOB, "b")
    for c in (alice, bob):
        c.roster_get()
        c.available()
    # bob never asked: alice's unsolicited unsubscribed/unsubscribe change nothing
    alice.send("<presence to='bob@localhost' type='unsubscribed'/>")
    alice.send("<presence to='bob@localhost' type='unsubscribe'/>")
    alice.sync()
    bob.nothing(lambda s: local(s.tag) == "presence" and s.get("type"),
                "subscription stanza without a matching state")
    assert bob.roster() == {}


def test_presence_flows_and_stop_after_unsubscribe(rserver, connect):
    alice = connect(rserver, ALICE, "a")
    bob = connect(rserver, BOB, "b")
    for c in (alice, bob):
        c.roster_get()
        c.available()
    mutual(alice, bob)

    # a new resource of alice: bob sees it come and go
    a2 = connect(rserver, ALICE, "second")
    a2.send("<presence><show>away</show></presence>")
    p = bob.presence(a2.full)
    assert child(p, "show").text == "away"
    a2.close()
    bob.presence(a2.full, "unavailable")

    # probes at login: bob comes back and learns alice's current presence
    bob.close()
    alice.presence(bob.full, "unavailable")
    bob = connect(rserver, BOB, "b2")
    bob.roster_get()
    bob.send("<presence/>")
    bob.presence(alice.full)

    # bob stops receiving alice's presence
    bob.send("<presence to='alice@localhost' type='unsubscribe'/>")
    bob.push(ALICE, subscription="from")
    alice.wait(is_sub(BOB, "unsubscribe"), "unsubscribe")
    alice.push(BOB, subscription="to")
    bob.presence(alice.full, "unavailable")  # 3.3.3
    alice.send("<presence><status>later</status></presence>")
    alice.presence(alice.full)
    alice.sync()
    bob.nothing(lambda s: local(s.tag) == "presence" and s.get("from") == alice.full
                and s.get("type") is None, "presence after unsubscribe")
    # alice still sees bob (subscription 'to'): he goes unavailable
    bob.close()
    alice.presence(bob.full, "unavailable")


def test_probe_from_non_subscriber_is_ignored(rserver, connect):
    alice = connect(rserver, ALICE, "a")
    alice.available()
    m = connect(rserver, MALLORY[0], "m")
    m.send("<presence to='alice@localhost' type='probe'/>")
    m.nothing(lambda s: local(s.tag) == "presence" and s.get("from", "").startswith(ALICE),
              "presence of alice leaked to a non-subscriber")
    alice.nothing(lambda s: s.get("type") == "probe", "probe delivered to a client")


def test_directed_presence_gets_unavailable(rserver, connect):
    alice = connect(rserver, ALICE, "a")
    alice.available()
    bob = connect(rserver, BOB, "b")
    bob.available()
    alice.send("<presence to='%s'/>" % bob.full)
    bob.presence(alice.full)
    alice.close()
    bob.presence(alice.full, "unavailable", "unavailable after directed presence")


def test_pending_request_waits_for_offline_user(rserver, connect):
    alice = connect(rserver, ALICE, "a")
    alice.roster_get()
    alice.send("<presence to='bob@localhost' type='subscribe'><status>hi bob</status>"
               "</presence>")
    alice.push(BOB, ask="subscribe")
    alice.sync()

    bob = connect(rserver, BOB, "b")
    bob.roster_get()
    bob.nothing(is_sub(ALICE, "subscribe"), "request before initial presence")
    # a pending request is no roster item (3.1.3)
    assert bob.roster() == {}
    bob.send("<presence/>")
    req = bob.wait(is_sub(ALICE, "subscribe"), "stored subscription request")
    assert req.get("from") == ALICE
    assert child(req, "status").text == "hi bob"
    bob.send("<presence to='alice@localhost' type='subscribed'/>")
    bob.push(ALICE, subscription="from")
    alice.push(BOB, subscription="to")

    # answered: not re-sent at the next login
    b2 = connect(rserver, BOB, "b2")
    b2.available()
    b2.nothing(is_sub(ALICE, "subscribe"), "answered request re-sent")


# ---------------------------------------------------------------- versioning

def test_roster_versioning_delta(rserver, connect):
    a = connect(rserver, ALICE, "a")
    q = a.roster_get(ver="").find(Q)
    assert q is not None and q.get("ver") is not None and q.findall(ITEM) == []
    a.roster_set("x@localhost", name="X")
    a.roster_set("y@localhost", name="Y")
    last = a.push("y@localhost").find(Q).get("ver")
    a.close()

    b = connect(rserver, ALICE, "b")
    b.roster_get()
    b.roster_set("x@localhost", remove=True)
    b.roster_set("z@localhost", name="Z")
    final = b.push("z@localhost").find(Q).get("ver")
    assert final != last
    b.close()

    c = connect(rserver, ALICE, "c")
    r = c.roster_get(ver=last)
    assert r.find(Q) is None, "expected an empty result: %s" % ET.tostring(r)
    gone = c.push("x@localhost", subscription="remove")
    new = c.push("z@localhost", name="Z")
    assert int(gone.find(Q).get("ver")) < int(new.find(Q).get("ver")) == int(final)
    c.nothing(lambda s: s.find(Q) is not None, "push for an item that did not change")

    # up to date: empty result, nothing else
    d = connect(rserver, ALICE, "d")
    assert d.roster_get(ver=final).find(Q) is None
    d.nothing(lambda s: s.find(Q) is not None, "push when the cache is current")

    # unknown versions get the whole roster
    for bad in ("bogus", str(int(final) + 5)):
        q = d.roster_get(ver=bad).find(Q)
        assert q is not None and q.get("ver") == final
        assert sorted(i.get("jid") for i in q.findall(ITEM)) == ["y@localhost", "z@localhost"]


def test_versioning_too_old_after_tombstones_pruned(xmppd_factory, connect):
    srv = xmppd_factory(modules=("c2s", "roster"), extra="roster = { max_tombstones = 1; };\n")
    a = connect(srv, ALICE, "a")
    a.roster_get()
    for j in ("p@localhost", "q@localhost", "keep@localhost"):
        a.roster_set(j)
    base = a.push("keep@localhost").find(Q).get("ver")
    a.roster_set("p@localhost", remove=True)
    a.roster_set("q@localhost", remove=True)  # p's tombstone is forgotten
    q = a.roster_get(ver=base).find(Q)
    assert q is not None, "a delta cannot be served any more: full roster expected"
    assert [i.get("jid") for i in q.findall(ITEM)] == ["keep@localhost"]


# ------------------------------------------------------------------ restart

def test_state_survives_restart(xmppd_factory, connect):
    srv = xmppd_factory(modules=("c2s", "roster"), extra_users=[MALLORY])
    alice = connect(srv, ALICE, "a")
    bob = connect(srv, BOB, "b")
    for c in (alice, bob):
        c.roster_get()
        c.available()
    mutual(alice, bob)
    alice.roster_set(BOB, name="Bob", groups=("Friends",))
    ver = alice.push(BOB, name="Bob").find(Q).get("ver")
    bob.close()
    alice.close()
    m = connect(srv, MALLORY[0], "m")
    m.send("<presence to='alice@localhost' type='subscribe'/>")
    m.sync()
    m.close()

    assert srv.terminate() == 0
    srv.returncode = None  # the restarted process is checked at teardown too
    srv.start()

    bob = connect(srv, BOB, "b")
    bob.roster_get()
    bob.available()
    alice = connect(srv, ALICE, "a")
    assert alice.roster_get(ver=ver).find(Q) is None  # same version, nothing changed
    item = alice.roster()[BOB]
    assert item.get("name") == "Bob" and item.get("subscription") == "both"
    assert [g.text for g in item.findall("{%s}group" % NS)] == ["Friends"]
    assert "mallory@localhost" not in alice.roster()
    assert bob.roster()[ALICE].get("subscription") == "both"
    alice.send("<presence/>")
    alice.presence(bob.full)  # the probe found bob's subscription
    bob.presence(alice.full)  # and bob is still a subscriber of alice
    alice.wait(is_sub("mallory@localhost", "subscribe"), "request stored before the restart")


@pytest.mark.parametrize("to", [ALICE, None])
def test_subscribe_to_oneself_refused(rserver, connect, clients, to):
    """A subscription request to one's own bare JID (or without 'to') gets
    bad-request, and leaves nothing behind: no roster item, no push."""
    a = connect(rserver, ALICE, "a")
    a.roster_get()
    a.send("<presence type='subscribe'%s/>" % (" to='%s'" % to if to else ""))
    err = a.wait(lambda s: local(s.tag) == "presence" and s.get("type") == "error",
                 "presence error")
    assert any(el.tag == "{urn:ietf:params:xml:ns:xmpp-stanzas}bad-request"
               for el in err.iter()), ET.tostring(err)
    a.nothing(lambda s: local(s.tag) == "iq" and s.get("type") == "set", "a roster push")
    assert ALICE not in a.roster()
    # a second client library sees the same
    c = clients(rserver, ALICE + "/slix").must_login()
    c.drain_presences()
    c.lt.call(lambda: c.xmpp.send_presence(pto=ALICE, ptype="subscribe"))
    c.ping_server()
    errs = [p for p in c.drain_presences() if p["type"] == "error"]
    assert errs and errs[0]["error"]["condition"] == "bad-request", [str(p) for p in errs]
    assert ALICE not in a.roster()
