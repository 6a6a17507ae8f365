"""XEP-0191 Blocking Command (mod_blocking), over raw client streams: the
blocklist protocol (get, block, unblock, unblock all, pushes), what a block
does to stanzas in both directions, JID matching (full, bare, domain), bad
input, other users' lists, and the list surviving a restart."""

import re

import pytest

from xmpp_helpers import MALLORY, USERS, RawStream, uniq

ALICE, BOB = "alice@localhost", "bob@localhost"
NS = "urn:xmpp:blocking"
MODULES = ("c2s", "blocking")
Q = rb"[\"']"  # either quote


@pytest.fixture
def srv(xmppd_factory):
    return xmppd_factory(modules=MODULES, extra_users=[MALLORY])


@pytest.fixture
def raw():
    opened = []

    def make(server, jid, resource, available=True):
        r = RawStream(server)
        opened.append(r)
        pw = USERS.get(jid) or dict([MALLORY])[jid]
        r.full = r.login(jid, pw, resource)
        if available:
            r.send("<presence/>")
            sync(r)  # the presence was handled before anything that follows
        return r

    yield make
    for r in opened:
        close_cleanly(r)


def close_cleanly(r):
    """End the stream and wait for the server to close it, one stream at a
    time: several resources of one user dropping at the same instant can
    crash the core (re-entrant session kill on failed writes, a core bug)."""
    try:
        r.send("</stream:stream>")
        r.read_until_closed(timeout=3)
    except OSError:
        pass
    r.close()


def stanza(r, name, ident, what=None):
    """Read up to and including the <name/> stanza whose id is ident; returns
    every byte read, so what arrived before it can be inspected too."""
    return r.expect(re.compile(rb"<%s\b[^>]*\bid=[\"']%s[\"'][^>]*?(?:/>|(?<!/)>.*?</%s>)"
                               % (name.encode(), re.escape(ident).encode(), name.encode()),
                               re.S),
                    what=what or "%s id=%s" % (name, ident))


def last_stanza(data, name):
    """The last <name ...>...</name> (or empty element) in data."""
    starts = [m.start() for m in re.finditer(rb"<%s\b" % name.encode(), data)]
    assert starts, data
    return data[starts[-1]:]


def error_condition(xml):
    m = re.search(rb"<error\b[^>]*>\s*<([a-z-]+)\b[^>]*urn:ietf:params:xml:ns:xmpp-stanzas", xml)
    return m.group(1).decode() if m else None


def is_type(xml, t):
    return re.search(rb"\btype=[\"']%s[\"']" % t.encode(), xml.split(b">", 1)[0]) is not None


def sync(r):
    """A ping round trip: everything the server meant for r before now is in the result."""
    ident = uniq("sync")
    r.send("<iq type='get' id='%s' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>" % ident)
    return stanza(r, "iq", ident, "ping result")


def iq(r, payload, itype="get", to=None):
    """Send an IQ and return its answer (the answering stanza only)."""
    ident = uniq("iq")
    r.send("<iq type='%s' id='%s'%s>%s</iq>"
           % (itype, ident, " to='%s'" % to if to else "", payload))
    return last_stanza(stanza(r, "iq", ident), "iq")


def block(r, *jids):
    items = "".join("<item jid='%s'/>" % j for j in jids)
    return iq(r, "<block xmlns='%s'>%s</block>" % (NS, items), "set")


def unblock(r, *jids):
    items = "".join("<item jid='%s'/>" % j for j in jids)
    return iq(r, "<unblock xmlns='%s'>%s</unblock>" % (NS, items), "set")


def blocklist(r):
    """The JIDs of the blocklist (and r becomes a resource that gets pushes)."""
    out = iq(r, "<blocklist xmlns='%s'/>" % NS)
    assert is_type(out, "result"), out
    assert re.search(rb"<blocklist\b[^>]*xmlns=[\"']urn:xmpp:blocking[\"']", out), out
    return sorted(m.decode() for m in re.findall(rb"<item\b[^>]*\bjid=[\"']([^\"']+)[\"']", out))


def ok(out):
    assert is_type(out, "result"), out
    return out


def send_message(r, to, ident, body):
    r.send("<message to='%s' id='%s' type='chat'><body>%s</body></message>" % (to, ident, body))


def expect_delivered(r, ident, body):
    got = stanza(r, "message", ident, "message %s" % ident)
    assert body.encode() in last_stanza(got, "message"), got


def expect_bounce(r, name, ident, condition):
    got = last_stanza(stanza(r, name, ident, "the error for %s" % ident), name)
    assert is_type(got, "error"), got
    assert error_condition(got) == condition, got
    return got


def assert_nothing_with(r, needle):
    data = sync(r)
    assert needle.encode() not in data, "%r reached %s:\n%r" % (needle, r.full, data)


# --------------------------------------------------------------------------- tests

def test_block_stops_both_directions(srv, raw):
    a1 = raw(srv, ALICE, "a1")
    a2 = raw(srv, ALICE, "a2")
    bob = raw(srv, BOB, "b")
    assert blocklist(a1) == []
    assert blocklist(a2) == []

    # Before the block everything flows (the test can fail).
    body = uniq("before")
    send_message(bob, ALICE, "m0", body)
    expect_delivered(a1, "m0", body)
    bob.send("<presence to='%s' id='p0'/>" % a1.full)
    stanza(a1, "presence", "p0", "bob's directed presence before the block")

    ok(block(a1, BOB))
    # XEP-0191 3.3: pushed to every resource that asked for the list.
    push = a2.expect(re.compile(rb"<iq\b[^>]*>\s*<block\b[^>]*urn:xmpp:blocking.*?</iq>", re.S),
                     what="block push on a2")
    assert is_type(last_stanza(push, "iq"), "set"), push
    assert re.search(rb"<item\b[^>]*jid=" + Q + rb"bob@localhost" + Q, push), push
    # ... and bob sees alice's available resources go offline.
    seen = set()
    while len(seen) < 2:
        p = bob.expect(re.compile(rb"<presence\b[^>]*type=" + Q + rb"unavailable" + Q + rb"[^>]*>"),
                       what="unavailable presence from alice's resources")
        seen.add(re.search(rb"from=[\"']([^\"']+)", last_stanza(p, "presence")).group(1).decode())
    assert seen == {a1.full, a2.full}, seen

    # Inbound (3.3 stanza rules): message bounced, presence dropped, IQ get refused.
    body = uniq("blocked-msg")
    send_message(bob, ALICE, "m1", body)
    expect_bounce(bob, "message", "m1", "service-unavailable")
    send_message(bob, a2.full, "m2", body)
    expect_bounce(bob, "message", "m2", "service-unavailable")
    bob.send("<presence to='%s' id='p1'><status>%s</status></presence>" % (a1.full, body))
    bob.send("<iq type='get' id='q1' to='%s'><ping xmlns='urn:xmpp:ping'/></iq>" % a1.full)
    expect_bounce(bob, "iq", "q1", "service-unavailable")
    bob.send("<iq type='result' id='q2' to='%s'/>" % a1.full)
    assert_nothing_with(a1, body)
    assert_nothing_with(a2, body)
    assert_nothing_with(a1, "q2")

    # Outbound: refused with not-acceptable + <blocked/>, never routed.
    body = uniq("to-blocked")
    send_message(a1, BOB, "o1", body)
    err = expect_bounce(a1, "message", "o1", "not-acceptable")
    assert re.search(rb"<blocked\b[^>]*xmlns=" + Q + rb"urn:xmpp:blocking:errors" + Q, err), err
    a1.send("<iq type='get' id='o2' to='%s'><ping xmlns='urn:xmpp:ping'/></iq>" % bob.full)
    err = expect_bounce(a1, "iq", "o2", "not-acceptable")
    assert b"urn:xmpp:blocking:errors" in err, err
    a1.send("<presence to='%s' id='o3'><status>%s</status></presence>" % (BOB, body))
    data = sync(a1)
    assert b"o3" not in data, "directed presence to a blocked JID answered: %r" % data
    assert_nothing_with(bob, body)

    # Other users are unaffected.
    mallory = raw(srv, MALLORY[0], "m")
    body = uniq("mallory")
    send_message(mallory, ALICE, "x1", body)
    expect_delivered(a1, "x1", body)


def test_blocklist_get_unblock_and_pushes(srv, raw):
    a1 = raw(srv, ALICE, "a1")
    a2 = raw(srv, ALICE, "a2")
    a3 = raw(srv, ALICE, "quiet")   # never asks for the list: gets no pushes
    bob = raw(srv, BOB, "b")
    blocklist(a2)
    # Items are prepared (RFC 7622) and duplicates collapse.
    ok(block(a1, "BOB@LocalHost", "bob@localhost", "spammer@example.org/Res",
             "evil.example"))
    a2.expect(re.compile(rb"<block\b[^>]*urn:xmpp:blocking"), what="push of the block")
    assert blocklist(a1) == ["bob@localhost", "evil.example", "spammer@example.org/Res"]

    body = uniq("blocked")
    send_message(bob, ALICE, "m1", body)
    expect_bounce(bob, "message", "m1", "service-unavailable")

    ok(unblock(a1, "bob@localhost", "never@blocked.example"))
    push = a2.expect(re.compile(rb"<iq\b[^>]*>\s*<unblock\b[^>]*urn:xmpp:blocking.*?</iq>",
                                re.S), what="push of the unblock")
    assert b"bob@localhost" in push, push
    assert blocklist(a1) == ["evil.example", "spammer@example.org/Res"]
    body = uniq("after-unblock")
    send_message(bob, ALICE, "m2", body)
    expect_delivered(a1, "m2", body)
    data = sync(a3)
    assert b"urn:xmpp:blocking" not in data, "push reached a resource that never asked: %r" % data


def test_unblock_all(srv, raw):
    a1 = raw(srv, ALICE, "a1")
    a2 = raw(srv, ALICE, "a2")
    bob = raw(srv, BOB, "b")
    blocklist(a2)
    ok(block(a1, BOB, "x@example.org", "example.net"))
    a2.expect(re.compile(rb"<block\b"), what="block push")
    ok(iq(a1, "<unblock xmlns='%s'/>" % NS, "set"))
    push = a2.expect(re.compile(rb"<iq\b[^>]*>\s*<unblock\b[^>]*(/>|>\s*</unblock>)"),
                     what="empty unblock push")
    assert b"<item" not in push.split(b"<unblock", 1)[1].split(b"</iq>")[0], push
    assert blocklist(a1) == []
    body = uniq("free")
    send_message(bob, ALICE, "m1", body)
    expect_delivered(a1, "m1", body)


def test_jid_matching_full_bare_and_domain(srv, raw):
    alice = raw(srv, ALICE, "a")
    b1 = raw(srv, BOB, "one")
    b2 = raw(srv, BOB, "two")

    # A full JID blocks that resource only.
    ok(block(alice, "bob@localhost/one"))
    body = uniq("full")
    send_message(b1, alice.full, "f1", body)
    expect_bounce(b1, "message", "f1", "service-unavailable")
    send_message(b2, alice.full, "f2", body)
    expect_delivered(alice, "f2", body)
    send_message(alice, "bob@localhost/one", "f3", body)
    expect_bounce(alice, "message", "f3", "not-acceptable")
    ok(unblock(alice, "bob@localhost/one"))

    # A domain blocks every JID at it -- but never the user's own server.
    ok(block(alice, "localhost"))
    body = uniq("domain")
    send_message(b2, alice.full, "d1", body)
    expect_bounce(b2, "message", "d1", "service-unavailable")
    send_message(alice, "bob@localhost/two", "d2", body)
    expect_bounce(alice, "message", "d2", "not-acceptable")
    out = iq(alice, "<ping xmlns='urn:xmpp:ping'/>", "get", "localhost")
    assert is_type(out, "result"), out
    assert_nothing_with(b2, body)
    ok(unblock(alice, "localhost"))

    # domain/resource matches that resource at any user of the domain.
    ok(block(alice, "localhost/two"))
    body = uniq("domres")
    send_message(b2, alice.full, "r1", body)
    expect_bounce(b2, "message", "r1", "service-unavailable")
    send_message(b1, alice.full, "r2", body)
    expect_delivered(alice, "r2", body)


def test_bad_requests(srv, raw):
    alice = raw(srv, ALICE, "a")
    for jid in ("a@b@c", "@localhost", "bob@localhost/", "x" * 1100 + "@localhost", ""):
        out = block(alice, jid)
        assert error_condition(out) == "jid-malformed", (jid[:40], out)
    out = iq(alice, "<block xmlns='%s'/>" % NS, "set")
    assert error_condition(out) == "bad-request", out
    out = iq(alice, "<block xmlns='%s'><item/></block>" % NS, "set")
    assert error_condition(out) == "bad-request", out
    out = iq(alice, "<block xmlns='%s'><foo jid='bob@localhost'/></block>" % NS, "set")
    assert error_condition(out) == "bad-request", out
    # One bad item spoils the whole request: nothing was stored.
    out = block(alice, "bob@localhost", "a@b@c")
    assert error_condition(out) == "jid-malformed", out
    assert blocklist(alice) == []


def test_list_size_is_bounded(xmppd_factory, raw):
    srv = xmppd_factory(modules=MODULES, extra="blocking = { max_items = 3; };\n")
    alice = raw(srv, ALICE, "a")
    out = block(alice, *["u%d@example.org" % i for i in range(4)])
    assert error_condition(out) == "policy-violation", out
    ok(block(alice, "u1@example.org", "u2@example.org"))
    ok(block(alice, "u2@example.org", "u3@example.org"))   # u2 again: still three
    out = block(alice, "u4@example.org")
    assert error_condition(out) == "policy-violation", out
    assert blocklist(alice) == ["u1@example.org", "u2@example.org", "u3@example.org"]


def test_other_users_cannot_read_or_change_the_list(srv, raw):
    alice = raw(srv, ALICE, "a")
    bob = raw(srv, BOB, "b")
    ok(block(alice, "secret@example.org"))
    out = iq(bob, "<blocklist xmlns='%s'/>" % NS, "get", ALICE)
    assert is_type(out, "error"), out
    assert error_condition(out) == "forbidden", out
    assert b"secret@example.org" not in out
    out = iq(bob, "<unblock xmlns='%s'/>" % NS, "set", ALICE)
    assert error_condition(out) == "forbidden", out
    out = iq(bob, "<block xmlns='%s'><item jid='mallory@localhost'/></block>" % NS, "set", ALICE)
    assert error_condition(out) == "forbidden", out
    assert blocklist(alice) == ["secret@example.org"]


def test_disco_advertises_blocking(srv, raw):
    alice = raw(srv, ALICE, "a")
    for target in ("localhost", ALICE):
        out = iq(alice, "<query xmlns='http://jabber.org/protocol/disco#info'/>", "get", target)
        assert re.search(rb"<feature\b[^>]*var=" + Q + rb"urn:xmpp:blocking" + Q, out), (target,
                                                                                       out)


def test_blocklist_survives_restart(srv, raw):
    alice = raw(srv, ALICE, "a")
    ok(block(alice, BOB, "example.net"))
    alice.close()
    rc = srv.terminate()
    assert rc == 0, rc
    srv.returncode = None
    srv.start()

    # alice is offline: the check reads the table.  An IQ to her account that
    # would otherwise be answered (disco#info) is refused.
    bob = raw(srv, BOB, "b")
    mallory = raw(srv, MALLORY[0], "m")
    disco = "<query xmlns='http://jabber.org/protocol/disco#info'/>"
    assert is_type(iq(mallory, disco, "get", ALICE), "result")
    out = iq(bob, disco, "get", ALICE)
    assert error_condition(out) == "service-unavailable", out

    alice = raw(srv, ALICE, "a")
    assert blocklist(alice) == ["bob@localhost", "example.net"]
    body = uniq("after-restart")
    send_message(bob, ALICE, "m1", body)
    expect_bounce(bob, "message", "m1", "service-unavailable")
    assert_nothing_with(alice, body)
