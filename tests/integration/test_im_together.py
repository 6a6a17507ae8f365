"""All the instant-messaging modules loaded together, in the sample config's
order: the layers meet as they should (a blocked sender's message is not
stored offline; a contact's presence and an offline message both arrive at
login; a registered account gets a working roster)."""

import re

import pytest

from xmpp_helpers import USERS, RawStream

MODULES = ("c2s", "roster", "blocking", "offline", "register")
EXTRA = "register = { open = true; };\n"
ALICE, BOB = "alice@localhost", "bob@localhost"


@pytest.fixture
def srv(xmppd_factory):
    return xmppd_factory(modules=MODULES, extra=EXTRA)


@pytest.fixture
def raw(srv):
    opened = []

    def make(jid, resource):
        r = RawStream(srv)
        r.login(jid, USERS[jid], resource)
        opened.append(r)
        return r

    yield make
    for r in opened:
        try:
            r.send("</stream:stream>")
        except OSError:
            pass
        r.close()


def iq_result(r, ident):
    out = r.expect(re.compile(rb"<iq\b[^>]*id=[\"']%s[\"'][^>]*?(?:/>|(?<!/)>.*?</iq>)" % ident.encode(),
                              re.S))
    assert re.search(rb"type=[\"']result[\"']", out), out
    return out


def test_blocked_sender_is_not_stored_offline(srv, raw):
    alice = raw(ALICE, "a")
    alice.send("<iq type='set' id='blk'><block xmlns='urn:xmpp:blocking'>"
               "<item jid='%s'/></block></iq>" % BOB)
    iq_result(alice, "blk")
    alice.send("</stream:stream>")
    alice.close()
    bob = raw(BOB, "b")
    bob.send("<message to='%s' id='m1' type='chat'><body>let me in</body></message>" % ALICE)
    err = bob.expect(re.compile(rb"<message\b[^>]*id=[\"']m1[\"'].*?</message>", re.S))
    assert b"service-unavailable" in err, err
    alice2 = raw(ALICE, "a2")
    alice2.send("<presence/>")
    alice2.send("<iq type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    out = iq_result(alice2, "p")
    assert b"let me in" not in alice2.buf + out


def test_subscription_then_offline_message_and_presence_at_login(srv, raw):
    alice, bob = raw(ALICE, "a"), raw(BOB, "b")
    bob.send("<presence/>")            # requests reach available resources
    bob.expect(re.compile(rb"<presence\b[^>]*from=[\"']bob@localhost/b[\"']"), what="own echo")
    alice.send("<presence to='%s' type='subscribe'/>" % BOB)
    bob.expect(re.compile(rb"<presence\b[^>]*type=[\"']subscribe[\"']"))
    bob.send("<presence to='%s' type='subscribed'/>" % ALICE)
    alice.send("<presence/>")
    alice.expect(re.compile(rb"<presence\b[^>]*from=[\"']bob@localhost/b[\"']"), what="bob online")
    bob.send("</stream:stream>")
    bob.expect(re.compile(rb"</stream:stream>"), what="the server closing bob's stream")
    bob.close()
    alice.expect(re.compile(rb"<presence\b[^>]*from=[\"']bob@localhost/b[\"'][^>]*unavailable|"
                            rb"<presence\b[^>]*unavailable[^>]*from=[\"']bob@localhost/b[\"']"),
                 what="bob gone")
    alice.send("<message to='%s' id='off' type='chat'><body>while you were out</body></message>"
               % BOB)
    bob2 = raw(BOB, "b2")
    bob2.send("<presence/>")
    got = bob2.expect(re.compile(rb"<message\b.*?while you were out.*?</message>", re.S))
    assert b"urn:xmpp:delay" in got, got
    # alice, subscribed to bob, sees bob come back
    alice.expect(re.compile(rb"<presence\b[^>]*from=[\"']bob@localhost/b2[\"']"),
                 what="bob back online")


def test_registered_account_has_a_roster(srv):
    r = RawStream(srv)
    try:
        r.open_stream()
        r.starttls()
        r.open_stream()
        r.send("<iq type='set' id='reg'><query xmlns='jabber:iq:register'>"
               "<username>carol</username><password>carol-Secret-9</password></query></iq>")
        iq_result(r, "reg")
    finally:
        r.close()
    c = RawStream(srv)
    try:
        c.login("carol@localhost", "carol-Secret-9", "c")
        c.send("<iq type='set' id='rs'><query xmlns='jabber:iq:roster'>"
               "<item jid='alice@localhost' name='Alice'/></query></iq>")
        iq_result(c, "rs")
        c.send("<iq type='get' id='rg'><query xmlns='jabber:iq:roster'/></iq>")
        out = iq_result(c, "rg")
        assert b"alice@localhost" in out
    finally:
        c.send("</stream:stream>")
        c.close()


def subscribe_both(alice, bob):
    for me, other, mj, oj in ((alice, bob, ALICE, BOB), (bob, alice, BOB, ALICE)):
        me.send("<presence to='%s' type='subscribe'/>" % oj)
        other.expect(re.compile(rb"<presence\b[^>]*type=[\"']subscribe[\"']"), what="request")
        other.send("<presence to='%s' type='subscribed'/>" % mj)


def test_blocked_contact_gets_no_presence(srv, raw):
    alice, bob = raw(ALICE, "a"), raw(BOB, "b")
    for r, j in ((alice, "alice@localhost/a"), (bob, "bob@localhost/b")):
        r.send("<presence/>")
        r.expect(re.compile(rb"<presence\b[^>]*from=[\"']%s[\"']" % j.encode()), what="echo")
    subscribe_both(alice, bob)
    alice.send("<presence><show>chat</show></presence>")
    bob.expect(re.compile(rb"<presence\b[^>]*from=[\"']alice@localhost/a[\"'][^>]*>\s*<show>chat"),
               what="alice's presence while not blocked")
    alice.send("<iq type='set' id='blk'><block xmlns='urn:xmpp:blocking'>"
               "<item jid='%s'/></block></iq>" % BOB)
    iq_result(alice, "blk")
    bob.expect(re.compile(rb"<presence\b[^>]*type=[\"']unavailable[\"']"), what="unavailable")
    alice.send("<presence><show>away</show></presence>")
    # a ping after it: if the presence were routed to bob it would come first
    alice.send("<iq type='get' id='p2' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    iq_result(alice, "p2")
    bob.send("<iq type='get' id='p3' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    out = iq_result(bob, "p3")
    assert b"<show>away" not in bob.buf + out


def test_duplicate_subscribe_delivered_once(srv, raw):
    alice, bob = raw(ALICE, "a"), raw(BOB, "b")
    alice.send("<presence/>")
    alice.expect(re.compile(rb"<presence\b[^>]*from=[\"']alice@localhost/a[\"']"), what="echo")
    for _ in range(3):
        bob.send("<presence to='%s' type='subscribe'/>" % ALICE)
    bob.send("<iq type='get' id='p4' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    iq_result(bob, "p4")
    alice.send("<iq type='get' id='p5' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    iq_result(alice, "p5")
    seen = alice.transcript_text() if hasattr(alice, "transcript_text") else \
        b"".join(d for who, d in alice.transcript if who == "S")
    assert len(re.findall(rb"type=[\"']subscribe[\"']", seen)) == 1, seen


def register(srv, user, password):
    r = RawStream(srv)
    try:
        r.open_stream()
        r.starttls()
        r.open_stream()
        r.send("<iq type='set' id='reg'><query xmlns='jabber:iq:register'>"
               "<username>%s</username><password>%s</password></query></iq>" % (user, password))
        iq_result(r, "reg")
    finally:
        r.close()


def test_removed_account_leaves_nothing_to_its_successor(srv, raw):
    register(srv, "carol", "carol-Secret-9")
    c = RawStream(srv)
    c.login("carol@localhost", "carol-Secret-9", "c")
    c.send("<iq type='set' id='rs'><query xmlns='jabber:iq:roster'>"
           "<item jid='lawyer@example.org' name='my lawyer'/></query></iq>")
    iq_result(c, "rs")
    c.send("<iq type='set' id='bl'><block xmlns='urn:xmpp:blocking'>"
           "<item jid='stalker@example.net'/></block></iq>")
    iq_result(c, "bl")
    c.send("</stream:stream>")
    c.expect(re.compile(rb"</stream:stream>"))
    c.close()
    bob = raw(BOB, "b")
    bob.send("<message to='carol@localhost' id='n1' type='chat'><body>private note</body></message>")
    bob.send("<iq type='get' id='pb' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    iq_result(bob, "pb")
    c = RawStream(srv)
    c.login("carol@localhost", "carol-Secret-9", "c")
    c.send("<iq type='set' id='rm'><query xmlns='jabber:iq:register'><remove/></query></iq>")
    iq_result(c, "rm")
    c.close()
    register(srv, "carol", "other-Secret-7")
    n = RawStream(srv)
    try:
        n.login("carol@localhost", "other-Secret-7", "n")
        n.send("<presence/>")
        n.send("<iq type='get' id='rg'><query xmlns='jabber:iq:roster'/></iq>")
        roster = iq_result(n, "rg")
        n.send("<iq type='get' id='bg'><blocklist xmlns='urn:xmpp:blocking'/></iq>")
        blocks = iq_result(n, "bg")
        assert b"lawyer" not in roster and b"stalker" not in blocks, (roster, blocks)
        assert b"private note" not in n.buf + roster + blocks
    finally:
        n.send("</stream:stream>")
        n.close()


def test_removed_account_unsubscribes_its_contacts(srv, raw):
    register(srv, "dave", "dave-Secret-9")
    d = RawStream(srv)
    d.login("dave@localhost", "dave-Secret-9", "d")
    bob = raw(BOB, "b")
    for r, j in ((d, "dave@localhost/d"), (bob, "bob@localhost/b")):
        r.send("<presence/>")
        r.expect(re.compile(rb"<presence\b[^>]*from=[\"']%s[\"']" % j.encode()), what="echo")
    for me, other, oj, mj in ((d, bob, BOB, "dave@localhost"), (bob, d, "dave@localhost", BOB)):
        me.send("<presence to='%s' type='subscribe'/>" % oj)
        other.expect(re.compile(rb"<presence\b[^>]*type=[\"']subscribe[\"']"), what="request")
        other.send("<presence to='%s' type='subscribed'/>" % mj)
        me.expect(re.compile(rb"<presence\b[^>]*type=[\"']subscribed[\"']"), what="approval")
    bob.send("<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>")
    assert re.search(rb"jid=[\"']dave@localhost[\"'][^>]*subscription=[\"']both[\"']|"
                     rb"subscription=[\"']both[\"'][^>]*jid=[\"']dave@localhost[\"']",
                     iq_result(bob, "r1"))
    d.send("<iq type='set' id='rm'><query xmlns='jabber:iq:register'><remove/></query></iq>")
    iq_result(d, "rm")
    d.close()
    bob.expect(re.compile(rb"<presence\b[^>]*type=[\"']unsubscribed[\"']"), what="unsubscribed")
    bob.send("<iq type='get' id='r2'><query xmlns='jabber:iq:roster'/></iq>")
    out = iq_result(bob, "r2")
    assert not re.search(rb"subscription=[\"'](both|to|from)[\"']", out), out
