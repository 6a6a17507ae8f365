"""XEP-0280 Message Carbons (mod_carbons), over raw client streams: enabling
and disabling per resource, <received/> copies of what reaches the user's
other resources (full JID, bare JID with priorities, offline), <sent/> copies
of what one resource sends, which messages are never copied (private,
no-copy, headline, groupchat, error, bodiless normal, carbons), the exact
inner message (OMEMO included), other users' requests, the per-user bound,
and the layering with blocking and offline storage."""

import asyncio
import socket
from xml.etree import ElementTree as ET

import pytest

from xmpp_helpers import DOMAIN, MALLORY, StanzaStream, uniq

ALICE, BOB = "alice@localhost", "bob@localhost"
NS = "urn:xmpp:carbons:2"
NS_FWD = "urn:xmpp:forward:0"
NS_CLIENT = "jabber:client"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_DISCO = "http://jabber.org/protocol/disco#info"
NS_OMEMO = "eu.siacs.conversations.axolotl"
MODULES = ("c2s", "carbons")
LAYERED = ("c2s", "roster", "blocking", "carbons", "offline")

OMEMO = ("<encrypted xmlns='%s'><header sid='1234567'>"
         "<key rid='7654321' prekey='true'>MwohBf0Rt+Xn0cW7C1p0/pd+R7z3K3kbN+fEqBkq8yQ=</key>"
         "<iv>Qy1vdXQtb2YtYmFuZA==</iv></header>"
         "<payload>3b7Q+/Ti0rVGvTgDfFs1Z1w/V0r7Zk1dGTxk8c6B5wM=</payload></encrypted>"
         "<store xmlns='urn:xmpp:hints'/>"
         "<encryption xmlns='urn:xmpp:eme:0' namespace='%s' name='OMEMO'/>" % (NS_OMEMO, NS_OMEMO))


def q(tag, ns=NS_CLIENT):
    return "{%s}%s" % (ns, tag)


# ------------------------------------------------------------------ a stanza reader

class Peer(StanzaStream):
    """A logged-in raw stream whose input is parsed into top-level stanzas."""

    wait_timeout = 10.0

    def presence(self, priority=None, ptype=None):
        self.send("<presence%s>%s</presence>"
                  % (" type='%s'" % ptype if ptype else "",
                     "<priority>%d</priority>" % priority if priority is not None else ""))
        self.sync()

    def carbon(self, kind, ident):
        """The <kind/> carbon whose forwarded message has this id; returns (outer, inner)."""
        def match(e):
            inner = inner_of(e, kind)
            return inner is not None and inner.get("id") == ident
        outer = self.wait(match, "<%s/> carbon of %s" % (kind, ident))
        return outer, inner_of(outer, kind)

    def assert_no_carbons(self, *idents):
        """No carbon (or anything) with these ids reached us, up to now."""
        self.sync()
        for el in self.pending:
            for kind in ("sent", "received"):
                inner = inner_of(el, kind)
                assert inner is None or inner.get("id") not in idents, (
                    "%s got a <%s/> carbon of %s:\n%s" % (self.full, kind, inner.get("id"),
                                                          ET.tostring(el).decode()))
            assert el.get("id") not in idents, "%s got %s" % (self.full, ET.tostring(el))
        assert_carbons_from_own_account(self)

    def assert_no_carbons_at_all(self):
        self.sync()
        for el in self.pending:
            assert el.find(q("sent", NS)) is None and el.find(q("received", NS)) is None, (
                "%s got a carbon: %s" % (self.full, ET.tostring(el).decode()))


def inner_of(el, kind):
    if el.tag != q("message"):
        return None
    w = el.find(q(kind, NS))
    f = w.find(q("forwarded", NS_FWD)) if w is not None else None
    return f.find(q("message")) if f is not None else None


def assert_carbons_from_own_account(p):
    for el in p.pending:
        if el.find(q("received", NS)) is not None or el.find(q("sent", NS)) is not None:
            assert el.get("from") == p.bare, ET.tostring(el)


def shape(el):
    """An element as comparable data: name, attributes (any order), text, children."""
    return (el.tag, sorted(el.attrib.items()), el.text or "",
            [shape(c) + (c.tail or "",) for c in el])


def as_sent(xml, sender_full):
    """The stanza a client sent, as the server must forward it: 'from' stamped."""
    el = ET.fromstring("<w xmlns='jabber:client'>%s</w>" % xml)[0]
    el.set("from", sender_full)
    return el


def assert_carbon(p, kind, ident, sent_xml, sender_full, mtype="chat"):
    """p got exactly one well-formed <kind/> carbon of the message sent_xml."""
    outer, inner = p.carbon(kind, ident)
    assert outer.get("from") == p.bare, ET.tostring(outer)
    assert outer.get("to") == p.full, ET.tostring(outer)
    assert outer.get("type") == mtype, ET.tostring(outer)
    assert shape(inner) == shape(as_sent(sent_xml, sender_full)), (
        "the forwarded message differs from the original:\n got %s\nsent %s"
        % (ET.tostring(inner).decode(), sent_xml))
    # exactly one <forwarded/> with exactly one message in it
    w = outer.find(q(kind, NS))
    assert len(list(outer)) == 1 and len(list(w)) == 1 and len(list(w[0])) == 1, ET.tostring(outer)
    return outer, inner


def chat(ident, to, body, mtype="chat", extra=""):
    return "<message to='%s' id='%s'%s><body>%s</body>%s</message>" % (
        to, ident, " type='%s'" % mtype if mtype else "", body, extra)


def enable(p, to=None):
    r = p.iq("<enable xmlns='%s'/>" % NS, to=to)
    assert r.get("type") == "result", ET.tostring(r)


def disable(p):
    r = p.iq("<disable xmlns='%s'/>" % NS)
    assert r.get("type") == "result", ET.tostring(r)


def condition(el):
    e = el.find(q("error"))
    assert e is not None, ET.tostring(el)
    return [c.tag.split("}")[1] for c in e if c.tag.startswith("{%s}" % NS_STANZAS)][0]


@pytest.fixture
def srv(xmppd_factory):
    return xmppd_factory(modules=MODULES, extra_users=[MALLORY])


@pytest.fixture
def peer():
    made = []

    def make(server, jid, resource, priority=0, available=True, carbons=False, **kw):
        p = Peer.login(server, jid, resource, **kw)
        made.append(p)
        if available:
            p.presence(priority)
        if carbons:
            enable(p)
        return p

    yield make
    for p in reversed(made):
        p.close()


# ------------------------------------------------------------------------------ tests

def test_enable_disable_and_disco(srv, peer):
    desk = peer(srv, ALICE, "desk")
    # XEP-0280 2: advertised by the server.
    info = desk.iq("<query xmlns='%s'/>" % NS_DISCO, "get", to=DOMAIN)
    feats = [f.get("var") for f in info.iter("{%s}feature" % NS_DISCO)]
    assert NS in feats, feats
    # Without 'to' and to the own bare JID alike (XEP-0280 5.1); the answer
    # never comes from someone else.
    r = desk.iq("<enable xmlns='%s'/>" % NS)
    assert r.get("type") == "result" and r.get("from") in (None, ALICE), ET.tostring(r)
    r = desk.iq("<enable xmlns='%s'/>" % NS, to=ALICE)
    assert r.get("type") == "result" and r.get("from") == ALICE, ET.tostring(r)
    r = desk.iq("<disable xmlns='%s'/>" % NS, to=ALICE)
    assert r.get("type") == "result", ET.tostring(r)
    disable(desk)  # disabling twice is fine
    # Anything else in the namespace is refused.
    r = desk.iq("<enable-all xmlns='%s'/>" % NS)
    assert r.get("type") == "error" and condition(r) == "bad-request", ET.tostring(r)
    r = desk.iq("<enable xmlns='%s'/>" % NS, itype="get")
    assert r.get("type") == "error", ET.tostring(r)


def test_received_and_sent_carbons_full_jid(srv, peer):
    desk = peer(srv, ALICE, "desk", carbons=True)
    phone = peer(srv, ALICE, "phone", carbons=True)
    quiet = peer(srv, ALICE, "quiet")               # never enabled
    bob = peer(srv, BOB, "b")

    # Bob -> alice/desk: desk gets the original, phone a <received/> copy.
    body = "hi &amp; &lt;desk&gt; \u00e9 \U0001F600"
    xml = chat("m1", desk.full, body,
               extra="<thread>t-1</thread><active xmlns='http://jabber.org/protocol/chatstates'/>")
    bob.send(xml)
    orig = desk.message("m1")
    assert orig.find(q("received", NS)) is None, ET.tostring(orig)
    assert orig.get("from") == bob.full
    assert_carbon(phone, "received", "m1", xml, bob.full)
    desk.assert_no_carbons("m1")
    quiet.assert_no_carbons("m1")

    # alice/desk -> bob: bob gets it, phone a <sent/> copy, desk none.
    xml = chat("m2", BOB, "reply from desk")
    desk.send(xml)
    got = bob.message("m2")
    assert got.get("from") == desk.full
    assert_carbon(phone, "sent", "m2", xml, desk.full)
    desk.assert_no_carbons("m2")
    quiet.assert_no_carbons("m2")
    bob.assert_no_carbons_at_all()

    # A message without 'to' is for the own account; other bare-JID
    # addressing of a contact works the same as a full JID.
    xml = chat("m3", BOB, "to the bare jid")
    phone.send(xml)
    bob.message("m3")
    assert_carbon(desk, "sent", "m3", xml, phone.full)

    # phone disables: nothing more for it, desk still gets copies.
    disable(phone)
    bob.send(chat("m4", desk.full, "after disable"))
    desk.message("m4")
    phone.assert_no_carbons("m4")
    desk.send(chat("m5", BOB, "sent after disable"))
    bob.message("m5")
    phone.assert_no_carbons("m5")
    xml = chat("m6", phone.full, "to the phone")
    bob.send(xml)
    phone.message("m6")
    assert_carbon(desk, "received", "m6", xml, bob.full)
    quiet.assert_no_carbons("m4", "m5", "m6")


def test_messages_that_are_not_copied(srv, peer):
    desk = peer(srv, ALICE, "desk", carbons=True)
    phone = peer(srv, ALICE, "phone", carbons=True)
    bob = peer(srv, BOB, "b", carbons=True)
    bob2 = peer(srv, BOB, "b2", carbons=True)
    skipped = {
        "private": chat("n1", desk.full, "psst", extra="<private xmlns='%s'/>" % NS),
        "no-copy": chat("n2", desk.full, "hint", extra="<no-copy xmlns='urn:xmpp:hints'/>"),
        "headline": chat("n3", desk.full, "news", mtype="headline"),
        "groupchat": chat("n4", desk.full, "room", mtype="groupchat"),
        "error": "<message to='%s' id='n5' type='error'><body>x</body><error type='cancel'>"
                 "<item-not-found xmlns='%s'/></error></message>" % (desk.full, NS_STANZAS),
        "normal without body": "<message to='%s' id='n6'><received xmlns='urn:xmpp:receipts' "
                               "id='x'/></message>" % desk.full,
        "explicit normal without body": "<message to='%s' id='n7' type='normal'>"
                                        "<subject>s</subject></message>" % desk.full,
        "a carbon itself": "<message to='%s' id='n8' type='chat'><received xmlns='%s'>"
                           "<forwarded xmlns='%s'><message xmlns='jabber:client' id='n8i' "
                           "type='chat' from='x@example.org/r' to='%s'><body>fake</body></message>"
                           "</forwarded></received></message>" % (desk.full, NS, NS_FWD, ALICE),
        "unknown type": chat("n9", desk.full, "odd", mtype="bogus"),
    }
    for what, xml in skipped.items():
        bob.send(xml)
    # All were delivered to desk (the core hands a full JID's session any
    # type), and none was copied.
    for ident in ("n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9"):
        desk.message(ident)
    phone.assert_no_carbons(*["n%d" % i for i in range(1, 10)] + ["n8i"])
    bob2.assert_no_carbons(*["n%d" % i for i in range(1, 10)] + ["n8i"])
    desk.assert_no_carbons_at_all()

    # The same for what alice sends.
    for ident, extra, mtype in (("o1", "<private xmlns='%s'/>" % NS, "chat"),
                                ("o2", "<no-copy xmlns='urn:xmpp:hints'/>", "chat"),
                                ("o3", "", "headline"),
                                ("o4", "", "groupchat")):
        desk.send(chat(ident, bob.full, "out", mtype=mtype, extra=extra))
    for ident in ("o1", "o2", "o3"):
        bob.message(ident)
    desk.send("<message to='%s' id='o5'><thread>t</thread></message>" % bob.full)
    bob.message("o5")
    phone.assert_no_carbons("o1", "o2", "o3", "o4", "o5")

    # Controls: type normal with a body is copied, with its type (and a
    # message without type stays without one).
    xml = chat("n10", desk.full, "normal one", mtype="normal")
    bob.send(xml)
    desk.message("n10")
    assert_carbon(phone, "received", "n10", xml, bob.full, mtype="normal")
    xml = chat("n11", desk.full, "untyped", mtype=None)
    bob.send(xml)
    desk.message("n11")
    assert_carbon(phone, "received", "n11", xml, bob.full, mtype=None)
    # and bob's other resource sees what bob sent
    assert_carbon(bob2, "sent", "n11", xml, bob.full, mtype=None)


def test_omemo_message_is_copied_exactly(srv, peer):
    desk = peer(srv, ALICE, "desk", carbons=True)
    phone = peer(srv, ALICE, "phone", carbons=True)
    bob = peer(srv, BOB, "b")
    xml = "<message to='%s' id='e1' type='chat'>%s</message>" % (desk.full, OMEMO)
    bob.send(xml)
    orig = desk.message("e1")
    assert shape(orig) == shape(as_sent(xml, bob.full))
    _, inner = assert_carbon(phone, "received", "e1", xml, bob.full)
    assert inner.find(q("body")) is None
    payload = inner.find("{%s}encrypted/{%s}payload" % (NS_OMEMO, NS_OMEMO))
    assert payload.text == "3b7Q+/Ti0rVGvTgDfFs1Z1w/V0r7Zk1dGTxk8c6B5wM="
    # and the byte string of the payload travels unchanged on the wire
    assert b"3b7Q+/Ti0rVGvTgDfFs1Z1w/V0r7Zk1dGTxk8c6B5wM=" in b"".join(
        d for who, d in phone.r.transcript if who == "S")

    xml = "<message to='%s' id='e2' type='chat'>%s</message>" % (BOB, OMEMO)
    desk.send(xml)
    bob.message("e2")
    assert_carbon(phone, "sent", "e2", xml, desk.full)


def test_other_users_cannot_enable_for_alice(srv, peer):
    desk = peer(srv, ALICE, "desk")
    phone = peer(srv, ALICE, "phone")       # alice never enables
    bob = peer(srv, BOB, "b")
    bob2 = peer(srv, BOB, "b2")
    mallory = peer(srv, MALLORY[0], "m")
    for p in (bob, mallory):
        r = p.iq("<enable xmlns='%s'/>" % NS, to=ALICE)
        assert r.get("type") == "error" and condition(r) == "forbidden", ET.tostring(r)
    # To a full JID it is the client's IQ to answer, not the server's.
    bob.send("<iq type='set' id='full1' to='%s'><enable xmlns='%s'/></iq>" % (desk.full, NS))
    got = desk.wait(lambda e: e.get("id") == "full1", "bob's IQ")
    assert got.get("from") == bob.full, ET.tostring(got)
    # An IQ to the server itself is not an account's business.
    r = bob.iq("<enable xmlns='%s'/>" % NS, to=DOMAIN)
    assert r.get("type") == "error", ET.tostring(r)
    # Nothing was enabled: neither alice's resources nor bob's.
    bob.send(chat("x1", desk.full, "hello"))
    desk.message("x1")
    phone.assert_no_carbons("x1")
    bob.assert_no_carbons("x1")
    bob2.assert_no_carbons("x1")
    mallory.send(chat("x2", phone.full, "hello"))
    phone.message("x2")
    desk.assert_no_carbons("x2")
    bob2.send(chat("x3", desk.full, "from b2"))
    desk.message("x3")
    bob.assert_no_carbons("x3")
    # A bare-JID enable from bob's own session enables bob only.
    enable(bob, to=BOB)
    xml = chat("x4", desk.full, "now with carbons")
    bob2.send(xml)
    desk.message("x4")
    assert_carbon(bob, "sent", "x4", xml, bob2.full)
    phone.assert_no_carbons("x4")


def test_bare_jid_priorities(srv, peer):
    high = peer(srv, ALICE, "high", priority=5, carbons=True)
    low = peer(srv, ALICE, "low", priority=1, carbons=True)
    neg = peer(srv, ALICE, "neg", priority=-1, carbons=True)
    away = peer(srv, ALICE, "away", available=False, carbons=True)   # bound, no presence
    plain = peer(srv, ALICE, "plain", priority=1)                    # not enabled
    bob = peer(srv, BOB, "b")

    # RFC 6121 8.5.2.1.1: the highest priority gets the original; every
    # other enabled resource a <received/> copy.
    xml = chat("p1", ALICE, "to the bare jid")
    bob.send(xml)
    high.message("p1")
    for p in (low, neg, away):
        assert_carbon(p, "received", "p1", xml, bob.full)
    high.assert_no_carbons("p1")
    plain.assert_no_carbons("p1")

    # A full JID with no session counts as the bare JID (RFC 6121 8.5.3.2.1).
    xml = chat("p2", ALICE + "/gone", "to a missing resource")
    bob.send(xml)
    high.message("p2")
    for p in (low, neg, away):
        assert_carbon(p, "received", "p2", xml, bob.full)
    high.assert_no_carbons("p2")

    # A full JID with a session goes there, even to a negative priority.
    xml = chat("p3", neg.full, "to neg")
    bob.send(xml)
    neg.message("p3")
    for p in (high, low, away):
        assert_carbon(p, "received", "p3", xml, bob.full)

    # Two resources at the top priority both get the original, no copy.
    high2 = peer(srv, ALICE, "high2", priority=5, carbons=True)
    xml = chat("p4", ALICE, "tie")
    bob.send(xml)
    high.message("p4")
    high2.message("p4")
    high.assert_no_carbons("p4")
    high2.assert_no_carbons("p4")
    for p in (low, neg, away):
        assert_carbon(p, "received", "p4", xml, bob.full)

    # The user's own message to her bare JID: each resource sees it once.
    xml = chat("p5", ALICE, "note to self")
    low.send(xml)
    high.message("p5")
    high2.message("p5")
    for p in (neg, away):
        assert_carbon(p, "sent", "p5", xml, low.full)
    for p in (high, high2, low, neg, away):
        p.assert_no_carbons("p5")   # nothing more: no <received/> on top


def test_offline_user_gets_no_carbons(srv, peer):
    away = peer(srv, ALICE, "away", available=False, carbons=True)
    neg = peer(srv, ALICE, "neg", priority=-3, carbons=True)
    bob = peer(srv, BOB, "b")
    # Nobody will get the original: no copies, and (without mod_offline)
    # the sender learns it was not delivered.
    for ident, to in (("f1", ALICE), ("f2", ALICE + "/gone")):
        bob.send(chat(ident, to, "nobody home"))
        err = bob.message(ident)
        assert err.get("type") == "error" and condition(err) == "service-unavailable"
    away.assert_no_carbons("f1", "f2")
    neg.assert_no_carbons("f1", "f2")
    # Once a resource is available, the others get copies again.
    away.presence(0)
    xml = chat("f3", ALICE, "home now")
    bob.send(xml)
    away.message("f3")
    assert_carbon(neg, "received", "f3", xml, bob.full)


def test_resources_considered_are_bounded(srv, peer):
    """XEP-0280 has no limit; ours is 64 resources per user for one message."""
    target = peer(srv, ALICE, "target", available=False)
    others = [peer(srv, ALICE, "r%02d" % i, available=False, carbons=True, mech="PLAIN")
              for i in range(70)]
    bob = peer(srv, BOB, "b")
    bob.send(chat("big", target.full, "to many"))
    target.message("big")
    got = 0
    for p in others:
        p.sync()
        got += sum(1 for e in p.pending if inner_of(e, "received") is not None)
    assert got == 64, got
    # and the server is fine
    bob.send(chat("big2", target.full, "again"))
    target.message("big2")


def test_slixmpp_client_carbons(srv, peer, clients):
    """A real client library (slixmpp's XEP-0280 plugin) enables carbons and
    recognises both kinds of copy."""
    desk = peer(srv, ALICE, "desk")
    bob = peer(srv, BOB, "b")
    c = clients(srv, ALICE + "/slix")
    c.lt.call(lambda: c.xmpp.register_plugin("xep_0280"))

    async def setup():
        rq, sq = asyncio.Queue(), asyncio.Queue()
        c.xmpp.add_event_handler("carbon_received", rq.put_nowait)
        c.xmpp.add_event_handler("carbon_sent", sq.put_nowait)
        return rq, sq
    rq, sq = c.lt.run(setup())
    c.must_login()
    c.send_presence()
    async def plugin(name):
        return await getattr(c.xmpp.plugin["xep_0280"], name)()
    assert c.lt.run(plugin("enable"))["type"] == "result"

    body = uniq("slix-in")
    bob.send(chat("s1", desk.full, body))
    desk.message("s1")
    m = c.lt.run(rq.get())
    fwd = m["carbon_received"]
    assert fwd["body"] == body and str(fwd["from"]) == bob.full and str(fwd["to"]) == desk.full

    body = uniq("slix-out")
    desk.send(chat("s2", BOB, body))
    bob.message("s2")
    m = c.lt.run(sq.get())
    fwd = m["carbon_sent"]
    assert fwd["body"] == body and str(fwd["from"]) == desk.full and str(fwd["to"]) == BOB

    assert c.lt.run(plugin("disable"))["type"] == "result"
    bob.send(chat("s3", desk.full, "after disable"))
    desk.message("s3")
    c.ping_server()
    assert rq.empty(), "carbon after disable"


# ------------------------------------------------- layering with the other modules

def test_layering_with_blocking_and_offline(xmppd_factory, peer):
    srv = xmppd_factory(modules=LAYERED)
    desk = peer(srv, ALICE, "desk", carbons=True)
    phone = peer(srv, ALICE, "phone", carbons=True)
    bob = peer(srv, BOB, "b")

    xml = chat("l1", desk.full, "with everything loaded")
    bob.send(xml)
    desk.message("l1")
    assert_carbon(phone, "received", "l1", xml, bob.full)

    # Blocking runs first: a blocked message is bounced and never copied.
    r = desk.iq("<block xmlns='urn:xmpp:blocking'><item jid='%s'/></block>" % BOB)
    assert r.get("type") == "result", ET.tostring(r)
    bob.send(chat("l2", desk.full, "blocked"))
    err = bob.message("l2")
    assert err.get("type") == "error", ET.tostring(err)
    phone.assert_no_carbons("l2")
    desk.assert_no_carbons("l2")
    r = desk.iq("<unblock xmlns='urn:xmpp:blocking'/>")
    assert r.get("type") == "result", ET.tostring(r)

    # Offline storage runs after: with no resource available and priority
    # >= 0, the message is stored (no error, no copies) and comes later.
    desk.presence(ptype="unavailable")
    phone.presence(ptype="unavailable")
    bob.send(chat("l3", ALICE, "while away"))
    bob.sync()
    phone.assert_no_carbons("l3")
    desk.assert_no_carbons("l3")
    assert not [e for e in bob.pending if e.get("id") == "l3"], "bounced: %s" % bob.r.dump()
    desk.send("<presence/>")
    stored = desk.message("l3", "the stored message")
    assert stored.find("{urn:xmpp:delay}delay") is not None, ET.tostring(stored)
    phone.assert_no_carbons("l3")

    # Back online: copies flow again.
    phone.presence(0)
    xml = chat("l4", ALICE, "both back")
    bob.send(xml)
    desk.message("l4")
    phone.message("l4")
    desk.assert_no_carbons("l4")
    phone.assert_no_carbons("l4")
    xml = chat("l5", phone.full, "to phone")
    bob.send(xml)
    phone.message("l5")
    assert_carbon(desk, "received", "l5", xml, bob.full)


def test_message_routed_again_is_not_copied_again(xmppd_factory, peer):
    """XEP-0198: the messages a session never acknowledged are routed again
    when it ends (mod_smacks), to another resource or offline storage.  The
    other resources got their <received/> copies the first time: none again."""
    srv = xmppd_factory(modules=("c2s", "carbons", "smacks", "offline"))
    phone = peer(srv, ALICE, "phone", priority=5)
    phone.send("<enable xmlns='urn:xmpp:sm:3'/>")
    phone.wait(lambda e: e.tag == "{urn:xmpp:sm:3}enabled", "<enabled/>")
    desk = peer(srv, ALICE, "desk", priority=1, carbons=True)
    laptop = peer(srv, ALICE, "laptop", priority=0, carbons=True)
    bob = peer(srv, BOB, "b")
    xml = chat("again1", ALICE, "copied once")
    bob.send(xml)
    phone.message("again1")
    assert_carbon(desk, "received", "again1", xml, bob.full)
    assert_carbon(laptop, "received", "again1", xml, bob.full)
    # the phone's connection ends before it acknowledged anything (no
    # resumption asked): the message is routed again, to the desk now
    phone.r.sock.shutdown(socket.SHUT_RDWR)
    phone.r.sock.close()
    again = desk.message("again1", "the message routed again")
    assert again.findtext(q("body")) == "copied once", ET.tostring(again)
    laptop.assert_no_carbons("again1")
    desk.assert_no_carbons("again1")
    # carbons go on as before for new messages
    xml = chat("again2", ALICE, "after")
    bob.send(xml)
    desk.message("again2")
    assert_carbon(laptop, "received", "again2", xml, bob.full)
