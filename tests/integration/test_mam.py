"""mod_mam: XEP-0313 Message Archive Management (urn:xmpp:mam:2) with
XEP-0359 stanza ids, seen from hand-spoken client streams.

Both sides of a one-to-one conversation are archived in order; the recipient
gets the archive id as <stanza-id/>; queries filter by with/start/end and
page with XEP-0059 RSM both ways; OMEMO payloads come back untouched;
preferences are honoured; nobody reads another user's archive; a message
stored offline is archived too; bad requests are refused; retention drops
the oldest; the archive survives a restart."""

import re
import socket
import time
from xml.etree import ElementTree as ET

import pytest

from xmpp_helpers import MALLORY, StanzaStream, error_condition, uniq

ALICE, BOB = "alice@localhost", "bob@localhost"
MODULE_SETS = {
    "alone": ("c2s", "mam"),
    "together": ("c2s", "roster", "blocking", "mam", "offline"),
}

NS_CLIENT = "jabber:client"
NS_MAM = "urn:xmpp:mam:2"
NS_SID = "urn:xmpp:sid:0"
NS_FWD = "urn:xmpp:forward:0"
NS_DELAY = "urn:xmpp:delay"
NS_RSM = "http://jabber.org/protocol/rsm"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_OMEMO = "eu.siacs.conversations.axolotl"

OMEMO = ("<encrypted xmlns='%s'><header sid='1234567'>"
         "<key rid='7654321' prekey='true'>MwohBf0Rt+Xn0cW7C1p0/pd+R7z3K3kbN+fEqBkq8yQ=</key>"
         "<key rid='99'>AAAA&amp;&lt;notxml&gt;</key>"
         "<iv>Qy1vdXQtb2YtYmFuZA==</iv></header>"
         "<payload>3b7Q+/Ti0rVGvTgDfFs1Z1w/V0r7Zk1dGTxk8c6B5wM=</payload></encrypted>"
         "<store xmlns='urn:xmpp:hints'/>" % NS_OMEMO)


def q(tag, ns):
    return "{%s}%s" % (ns, tag)


def shape(el):
    """An element's exact content: name, attributes, text, children (in order)."""
    return (el.tag, sorted(el.attrib.items()), el.text or "",
            [shape(c) + (c.tail or "",) for c in el])


class Peer(StanzaStream):
    def unexpected(self, pred):
        self.sync()
        return [ET.tostring(e) for e in self.pending if pred(e)]


class Page:
    def __init__(self, iq, items, peer):
        self.iq = iq
        self.items = items
        fin = iq.find(q("fin", NS_MAM))
        self.fin = fin
        self.complete = fin.get("complete") if fin is not None else None
        rset = fin.find(q("set", NS_RSM)) if fin is not None else None
        self.count = int(rset.findtext(q("count", NS_RSM))) if rset is not None else None
        first = rset.find(q("first", NS_RSM)) if rset is not None else None
        self.first = first.text if first is not None else None
        self.index = int(first.get("index")) if first is not None else None
        self.last = rset.findtext(q("last", NS_RSM)) if rset is not None else None

    @property
    def ids(self):
        return [i["id"] for i in self.items]

    @property
    def bodies(self):
        return [i["body"] for i in self.items]


def form(**fields):
    out = ["<x xmlns='jabber:x:data' type='submit'>"
           "<field var='FORM_TYPE' type='hidden'><value>%s</value></field>" % NS_MAM]
    for k, v in fields.items():
        out.append("<field var='%s'><value>%s</value></field>" % (k, v))
    out.append("</x>")
    return "".join(out)


def rsm(max=None, after=None, before=None):
    parts = []
    if max is not None:
        parts.append("<max>%s</max>" % max)
    if after is not None:
        parts.append("<after>%s</after>" % after)
    if before is not None:
        parts.append("<before>%s</before>" % before if before else "<before/>")
    return "<set xmlns='%s'>%s</set>" % (NS_RSM, "".join(parts))


def query(peer, inner="", expect="result", to=None):
    """Run a MAM query; returns a Page (or the error IQ when expect='error')."""
    qid = uniq("q")
    ident = uniq("mamq")
    peer.send("<iq type='set' id='%s'%s><query xmlns='%s' queryid='%s'>%s</query></iq>"
              % (ident, " to='%s'" % to if to else "", NS_MAM, qid, inner))
    items = []
    while True:
        el = peer.wait(lambda e: (e.tag == q("iq", NS_CLIENT) and e.get("id") == ident) or
                       (e.tag == q("message", NS_CLIENT) and e.find(q("result", NS_MAM)) is not None),
                       "MAM query %s" % ident)
        if el.tag == q("iq", NS_CLIENT):
            break
        res = el.find(q("result", NS_MAM))
        assert res.get("queryid") == qid, ET.tostring(el)
        assert el.get("to") == peer.full and el.get("from") == peer.bare, ET.tostring(el)
        fwd = res.find(q("forwarded", NS_FWD))
        delay = fwd.find(q("delay", NS_DELAY))
        inner_msg = fwd.find(q("message", NS_CLIENT))
        assert inner_msg is not None, "no jabber:client <message/> forwarded: %s" % ET.tostring(el)
        items.append({"id": res.get("id"), "stamp": delay.get("stamp"), "msg": inner_msg,
                      "body": inner_msg.findtext(q("body", NS_CLIENT)),
                      "from": inner_msg.get("from"), "to": inner_msg.get("to"),
                      "mid": inner_msg.get("id")})
    assert el.get("type") == expect, ET.tostring(el)
    if expect == "error":
        assert not items, "results sent with an error"
        return el
    return Page(el, items, peer)


def stanza_ids(msg):
    return [(s.get("by"), s.get("id")) for s in msg.findall(q("stanza-id", NS_SID))]


@pytest.fixture
def make_peer():
    yield from Peer.factory()


@pytest.fixture(params=sorted(MODULE_SETS))
def srv(request, xmppd_factory):
    return xmppd_factory(modules=MODULE_SETS[request.param], extra_users=[MALLORY])


@pytest.fixture
def full_srv(xmppd_factory):
    return xmppd_factory(modules=MODULE_SETS["together"], extra_users=[MALLORY])


# ------------------------------------------------------------------------ tests

def test_conversation_archived_on_both_sides_with_stanza_ids(srv, make_peer):
    alice = make_peer(srv, ALICE, "a")
    bob = make_peer(srv, BOB, "b")
    script = [(alice, bob, "hello bob"), (alice, bob, "are you there?"),
              (bob, alice, "yes &amp; here"), (alice, bob, "good"), (bob, alice, "bye")]
    delivered = []
    for sender, rcpt, body in script:
        ident = sender.chat(rcpt.bare, body)
        m = rcpt.message(ident)
        assert m.get("from") == sender.full
        sids = stanza_ids(m)
        assert len(sids) == 1 and sids[0][0] == rcpt.bare, ET.tostring(m)
        assert re.fullmatch(r"[0-9a-f]{16}", sids[0][1]), sids
        delivered.append((ident, sids[0][1]))

    bodies = ["hello bob", "are you there?", "yes & here", "good", "bye"]
    for peer in (alice, bob):
        page = query(peer)
        assert page.bodies == bodies, page.bodies
        assert [i["mid"] for i in page.items] == [d[0] for d in delivered]
        assert page.complete == "true" and page.count == 5 and page.index == 0
        assert page.first == page.ids[0] and page.last == page.ids[-1]
        assert len(set(page.ids)) == 5
        assert page.ids == sorted(page.ids), "archive ids must follow archive order"
        stamps = [i["stamp"] for i in page.items]
        assert stamps == sorted(stamps) and len(set(stamps)) == 5, stamps
        for (sender, rcpt, _), item, (ident, sid) in zip(script, page.items, delivered):
            assert item["from"] == sender.full, item
            assert item["to"] == rcpt.bare, item
            if rcpt is peer:  # incoming: the id delivered is the archive's id
                assert item["id"] == sid, (item, sid)
    # nothing was archived twice nor delivered more than once
    assert not alice.unexpected(lambda e: e.tag == q("message", NS_CLIENT))
    assert not bob.unexpected(lambda e: e.tag == q("message", NS_CLIENT))


def test_what_is_not_archived(srv, make_peer):
    alice = make_peer(srv, ALICE, "a")
    bob = make_peer(srv, BOB, "b")
    skipped = [
        "<message to='%s' id='h' type='headline'><body>headline</body></message>",
        "<message to='%s' id='g' type='groupchat'><body>groupchat</body></message>",
        "<message to='%s' id='e' type='error'><body>err</body>"
        "<error type='cancel'><item-not-found xmlns='%s'/></error></message>" % ("%s", NS_STANZAS),
        "<message to='%s' id='ns' type='chat'><body>nostore</body>"
        "<no-store xmlns='urn:xmpp:hints'/></message>",
        "<message to='%s' id='np' type='chat'><body>noperm</body>"
        "<no-permanent-store xmlns='urn:xmpp:hints'/></message>",
        "<message to='%s' id='cs' type='chat'>"
        "<composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
    ]
    for x in skipped:
        alice.send(x % BOB)
    kept = alice.chat(BOB, "kept, type normal", mtype="normal")
    bob.message(kept)
    for peer in (alice, bob):
        page = query(peer)
        assert page.bodies == ["kept, type normal"], page.bodies
    # the chat state still reached bob (archiving never stops a message)
    bob.message("cs")


def test_spoofed_stanza_id_is_neutralised(srv, make_peer):
    alice = make_peer(srv, ALICE, "a")
    bob = make_peer(srv, BOB, "b")
    spoof = ("<stanza-id xmlns='%s' by='BOB@localhost' id='fake-one'/>"
             "<stanza-id xmlns='%s' by='alice@localhost' id='keep-me'/>" % (NS_SID, NS_SID))
    ident = alice.chat(BOB, "spoofed", extra=spoof)
    m = bob.message(ident)
    sids = stanza_ids(m)
    ours = [s for s in sids if s[0] == BOB]
    assert len(ours) == 1 and ours[0][1] != "fake-one", sids
    assert ("alice@localhost", "keep-me") in sids, "another's stanza-id must stay: %s" % sids
    assert b"fake-one" not in ET.tostring(m)
    page = query(bob)
    assert page.ids == [ours[0][1]]
    assert b"fake-one" not in ET.tostring(page.items[0]["msg"])

    # not archived (prefs never): the claim is still removed
    r = bob.iq("<prefs xmlns='%s' default='never'/>" % NS_MAM)
    assert r.get("type") == "result"
    ident = alice.chat(BOB, "spoofed again", extra=spoof)
    m = bob.message(ident)
    assert [s for s in stanza_ids(m) if s[0] == BOB] == [], ET.tostring(m)
    assert b"fake-one" not in ET.tostring(m)


def test_filters_with_start_end(srv, make_peer):
    alice = make_peer(srv, ALICE, "a")
    bob = make_peer(srv, BOB, "b")
    mallory = make_peer(srv, MALLORY[0], "m")
    for i in range(6):
        rcpt = bob if i % 2 == 0 else mallory
        rcpt.message(alice.chat(rcpt.bare, "msg %d" % i))
    # incoming: 'with' is mallory's full JID
    alice.message(mallory.chat(ALICE, "from mallory"))
    alice.message(mallory.chat(ALICE, "from mallory 2"))

    everything = query(alice)
    assert everything.bodies == ["msg %d" % i for i in range(6)] + ["from mallory",
                                                                      "from mallory 2"]
    page = query(alice, form(**{"with": BOB}))
    assert page.bodies == ["msg 0", "msg 2", "msg 4"], page.bodies
    assert page.count == 3 and page.complete == "true"
    page = query(alice, form(**{"with": "MALLORY@localhost"}))
    assert page.bodies[:3] == ["msg 1", "msg 3", "msg 5"], page.bodies
    assert page.bodies[3:] == ["from mallory", "from mallory 2"], page.bodies
    # a full JID matches that resource only (alice wrote to mallory's bare JID)
    page = query(alice, form(**{"with": mallory.full}))
    assert page.bodies == ["from mallory", "from mallory 2"], page.bodies
    page = query(alice, form(**{"with": MALLORY[0] + "/elsewhere"}))
    assert page.bodies == [], page.bodies
    page = query(alice, form(**{"with": "nobody@localhost"}))
    assert page.items == [] and page.count == 0 and page.complete == "true"
    assert page.first is None and page.last is None

    items = query(alice).items
    stamps = [i["stamp"] for i in items]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", s) for s in stamps)
    bodies = [i["body"] for i in items]
    assert query(alice, form(start=stamps[2])).bodies == bodies[2:]
    assert query(alice, form(end=stamps[1])).bodies == bodies[:2]
    assert query(alice, form(start=stamps[1], end=stamps[3])).bodies == bodies[1:4]
    assert query(alice, form(start=stamps[3], end=stamps[1])).bodies == []
    # the same instant written with a zone offset
    s = stamps[2]
    hh = int(s[11:13])
    if hh < 22:
        shifted = "%s%02d%s+02:00" % (s[:11], hh + 2, s[13:-1])
        assert query(alice, form(start=shifted)).bodies == bodies[2:]
    both = query(alice, form(start=stamps[2], **{"with": BOB}))
    assert both.bodies == ["msg 2", "msg 4"]
    assert query(alice, form(start="1970-01-01T00:00:00Z", end="2999-12-31T23:59:59Z")).bodies \
        == bodies


def test_paging_forwards_and_backwards(srv, make_peer):
    alice = make_peer(srv, ALICE, "a")
    bob = make_peer(srv, BOB, "b")
    for i in range(7):
        bob.message(alice.chat(BOB, "p%d" % i))
    allids = query(alice).ids
    names = ["p%d" % i for i in range(7)]

    p = query(alice, rsm(max=3))
    assert p.bodies == names[0:3] and p.complete == "false" and p.count == 7 and p.index == 0
    assert p.first == allids[0] and p.last == allids[2]
    p = query(alice, rsm(max=3, after=p.last))
    assert p.bodies == names[3:6] and p.complete == "false" and p.index == 3
    p = query(alice, rsm(max=3, after=p.last))
    assert p.bodies == names[6:] and p.complete == "true" and p.index == 6 and p.count == 7
    p = query(alice, rsm(max=3, after=allids[-1]))
    assert p.bodies == [] and p.complete == "true" and p.count == 7

    # backwards from the end: an empty <before/> is the last page
    p = query(alice, rsm(max=3, before=""))
    assert p.bodies == names[4:7] and p.complete == "false" and p.index == 4 and p.count == 7
    p = query(alice, rsm(max=3, before=p.first))
    assert p.bodies == names[1:4] and p.complete == "false" and p.index == 1
    p = query(alice, rsm(max=3, before=p.first))
    assert p.bodies == names[0:1] and p.complete == "true" and p.index == 0
    p = query(alice, rsm(before=""))
    assert p.bodies == names and p.complete == "true"

    # paging inside a filter
    p = query(alice, form(start=query(alice).items[2]["stamp"]) + rsm(max=2, before=""))
    assert p.bodies == names[5:7] and p.count == 5 and p.index == 3

    # max=0: only the count
    p = query(alice, rsm(max=0))
    assert p.items == [] and p.count == 7 and p.complete == "false"

    # unknown or malformed ids
    for bad in ("0000000000000001", "not-an-id", "", allids[0].upper() + "0"):
        err = query(alice, rsm(max=2, after=bad), expect="error")
        assert error_condition(err) in ("item-not-found", "bad-request"), ET.tostring(err)
        if bad != "":
            assert error_condition(err) == "item-not-found"
    err = query(alice, rsm(max=2, before="0000000000000001"), expect="error")
    assert error_condition(err) == "item-not-found"
    # bob's ids are not alice's
    bob_ids = query(bob).ids
    err = query(alice, rsm(after=bob_ids[0]), expect="error")
    assert error_condition(err) == "item-not-found"


def test_max_page_bounds_a_page(xmppd_factory, make_peer):
    srv = xmppd_factory(modules=MODULE_SETS["alone"], extra="mam = { max_page = 4; };\n")
    alice = make_peer(srv, ALICE, "a")
    bob = make_peer(srv, BOB, "b")
    for i in range(6):
        bob.message(alice.chat(BOB, "x%d" % i))
    p = query(alice, rsm(max=1000))
    assert p.bodies == ["x0", "x1", "x2", "x3"] and p.complete == "false" and p.count == 6
    p = query(alice)
    assert len(p.items) == 4 and p.complete == "false"
    p = query(alice, rsm(after=p.last))
    assert p.bodies == ["x4", "x5"] and p.complete == "true"


def test_omemo_message_archived_untouched(srv, make_peer):
    alice = make_peer(srv, ALICE, "a")
    bob = make_peer(srv, BOB, "b")
    ident = uniq("omemo")
    alice.send("<message to='%s' id='%s' type='chat'>%s</message>" % (BOB, ident, OMEMO))
    m = bob.message(ident)
    want = ET.fromstring("<x>%s</x>" % OMEMO).find(q("encrypted", NS_OMEMO))
    assert shape(m.find(q("encrypted", NS_OMEMO))) == shape(want)
    for peer in (alice, bob):
        p = query(peer)
        assert len(p.items) == 1, p.items
        inner = p.items[0]["msg"]
        assert inner.find(q("body", NS_CLIENT)) is None
        enc = inner.find(q("encrypted", NS_OMEMO))
        assert enc is not None and shape(enc) == shape(want), ET.tostring(inner)
        assert p.items[0]["mid"] == ident
    assert query(bob).ids == [stanza_ids(m)[0][1]]


def test_preferences(srv, make_peer):
    alice = make_peer(srv, ALICE, "a")
    bob = make_peer(srv, BOB, "b")
    mallory = make_peer(srv, MALLORY[0], "m")

    r = alice.iq("<prefs xmlns='%s'/>" % NS_MAM, "get")
    assert r.get("type") == "result"
    assert r.find(q("prefs", NS_MAM)).get("default") == "always"

    r = alice.iq("<prefs xmlns='%s' default='never'/>" % NS_MAM)
    assert r.get("type") == "result" and r.find(q("prefs", NS_MAM)).get("default") == "never"
    bob.message(alice.chat(BOB, "unarchived for alice"))
    alice.message(bob.chat(ALICE, "unarchived reply"))
    assert query(alice).items == []
    assert query(bob).bodies == ["unarchived for alice", "unarchived reply"]

    # default always, never bob, always mallory; a JID in both lists: never wins
    r = alice.iq("<prefs xmlns='%s' default='always'><always><jid>mallory@localhost</jid>"
                 "<jid>bob@localhost</jid></always><never><jid>BOB@localhost</jid></never>"
                 "</prefs>" % NS_MAM)
    assert r.get("type") == "result", ET.tostring(r)
    got = alice.iq("<prefs xmlns='%s'/>" % NS_MAM, "get").find(q("prefs", NS_MAM))
    assert got.get("default") == "always"
    assert [j.text for j in got.find(q("never", NS_MAM))] == [BOB]
    assert [j.text for j in got.find(q("always", NS_MAM))] == [MALLORY[0], BOB]
    bob.message(alice.chat(BOB, "still not archived"))
    mallory.message(alice.chat(MALLORY[0], "archived"))
    assert query(alice).bodies == ["archived"]

    # default never with an always list
    r = alice.iq("<prefs xmlns='%s' default='never'><always><jid>bob@localhost</jid></always>"
                 "</prefs>" % NS_MAM)
    assert r.get("type") == "result"
    bob.message(alice.chat(BOB, "bob is always"))
    mallory.message(alice.chat(MALLORY[0], "mallory is not"))
    assert query(alice).bodies == ["archived", "bob is always"]

    # roster: mallory is not in alice's roster (in "alone" there is no roster
    # at all), so nothing with her is kept, in either direction
    assert alice.iq("<prefs xmlns='%s' default='roster'/>" % NS_MAM).get("type") == "result"
    mallory.message(alice.chat(MALLORY[0], "roster default"))
    alice.message(mallory.chat(ALICE, "roster default reply"))
    assert query(alice).bodies == ["archived", "bob is always"]

    # bad preferences change nothing
    for bad in ("<prefs xmlns='%s' default='sometimes'/>",
                "<prefs xmlns='%s'/>",
                "<prefs xmlns='%s' default='never'><always><jid>@@bad@@</jid></always></prefs>",
                "<prefs xmlns='%s' default='never'><never><item>x</item></never></prefs>"):
        r = alice.iq(bad % NS_MAM)
        assert r.get("type") == "error" and error_condition(r) == "bad-request", ET.tostring(r)
    too_many = "".join("<jid>u%d@example.net</jid>" % i for i in range(600))
    r = alice.iq("<prefs xmlns='%s' default='never'><never>%s</never></prefs>" % (NS_MAM, too_many))
    assert r.get("type") == "error", ET.tostring(r)
    assert alice.iq("<prefs xmlns='%s'/>" % NS_MAM, "get").find(
        q("prefs", NS_MAM)).get("default") == "roster"


def test_roster_preference(full_srv, make_peer):
    """default='roster' (XEP-0313 6): a one-to-one message is archived for the
    user only when the other party is in the user's roster, both directions."""
    alice = make_peer(full_srv, ALICE, "a")
    bob = make_peer(full_srv, BOB, "b")
    mallory = make_peer(full_srv, MALLORY[0], "m")
    r = alice.iq("<prefs xmlns='%s' default='roster'><always/><never/></prefs>" % NS_MAM)
    assert r.get("type") == "result" and r.find(q("prefs", NS_MAM)).get("default") == "roster"
    # a roster item, no subscription needed
    r = alice.iq("<query xmlns='jabber:iq:roster'><item jid='%s'/></query>" % BOB)
    assert r.get("type") == "result", ET.tostring(r)
    alice.message(bob.chat(ALICE, "from a contact"))
    bob.message(alice.chat(BOB, "to a contact"))
    # a stranger, even one who asked to subscribe (pending, not a roster item)
    mallory.send("<presence type='subscribe' to='%s'/>" % ALICE)
    alice.wait(lambda e: e.tag == q("presence", NS_CLIENT) and e.get("type") == "subscribe",
               "mallory's subscription request")
    alice.message(mallory.chat(ALICE, "from a stranger"))
    mallory.message(alice.chat(MALLORY[0], "to a stranger"))
    # between alice's own resources
    alice2 = make_peer(full_srv, ALICE, "a2")
    alice.message(alice2.chat(alice.full, "note to self"))
    page = query(alice)
    assert page.bodies == ["from a contact", "to a contact", "note to self"], page.bodies
    # the other side's preferences are its own (default always)
    assert query(mallory).bodies == ["from a stranger", "to a stranger"]
    assert query(bob).bodies == ["from a contact", "to a contact"]
    # a message delivered without an archive id carries none
    m = mallory.chat(ALICE, "no id")
    assert stanza_ids(alice.message(m)) == []
    # bob removed from the roster: no longer archived; an 'always' entry wins
    r = alice.iq("<query xmlns='jabber:iq:roster'><item jid='%s' subscription='remove'/>"
                 "</query>" % BOB)
    assert r.get("type") == "result", ET.tostring(r)
    alice.message(bob.chat(ALICE, "after removal"))
    r = alice.iq("<prefs xmlns='%s' default='roster'><always><jid>%s</jid></always></prefs>"
                 % (NS_MAM, MALLORY[0]))
    assert r.get("type") == "result"
    alice.message(mallory.chat(ALICE, "always mallory"))
    assert query(alice).bodies[3:] == ["always mallory"]


def test_unacked_message_routed_again_is_archived_once(xmppd_factory, make_peer):
    """XEP-0198: a session that is not resumed has its unacknowledged messages
    routed again (into offline storage).  The archive keeps one copy, and the
    offline copy carries the archive id the first delivery carried; a copy of
    that id on someone else's message is still a spoof."""
    srv = xmppd_factory(modules=("c2s", "roster", "mam", "offline", "smacks"),
                        extra="smacks = { resume_timeout = 1; };\n", extra_users=[MALLORY])
    alice = make_peer(srv, ALICE, "phone")
    alice.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
    alice.wait(lambda e: e.tag == "{urn:xmpp:sm:3}enabled", "<enabled/>")
    bob = make_peer(srv, BOB, "b")
    first = alice.message(bob.chat(ALICE, "never acknowledged"))
    [(by, sid)] = stanza_ids(first)
    assert by == ALICE
    # the connection is lost (no </stream:stream>) and never resumed
    alice.r.sock.shutdown(socket.SHUT_RDWR)
    alice.r.sock.close()
    time.sleep(1.8)
    again = make_peer(srv, ALICE, "laptop")
    m = again.wait(lambda e: e.tag == q("message", NS_CLIENT) and
                   e.findtext(q("body", NS_CLIENT)) == "never acknowledged", "offline copy")
    assert m.find(q("delay", NS_DELAY)) is not None, ET.tostring(m)
    assert stanza_ids(m) == [(ALICE, sid)], ET.tostring(m)
    page = query(again)
    assert page.bodies == ["never acknowledged"] and page.ids == [sid], page.ids
    # mallory sends the same text with that archive id: hers is a new message
    mallory = make_peer(srv, MALLORY[0], "m")
    spoof = "<stanza-id xmlns='%s' by='%s' id='%s'/>" % (NS_SID, ALICE, sid)
    m = again.message(mallory.chat(ALICE, "never acknowledged", extra=spoof))
    ids = [s for s in stanza_ids(m) if s != (None, None)]   # the spoof is neutralised
    assert len(ids) == 1 and ids[0][0] == ALICE and ids[0][1] != sid, ids
    assert query(again).ids == [sid, ids[0][1]]


def test_replayed_message_with_a_guessed_archive_id_is_not_trusted(srv, make_peer):
    """A sender cannot pass a message off as one the archive holds: bob sends
    one of his messages again, exactly, with its archive id (guessed, or
    learnt) in a <stanza-id by=alice/>, a second forged one and a server-like
    <delay/>.  Both claims are neutralised, and the replay is archived as a
    message of its own with a new id."""
    alice = make_peer(srv, ALICE, "a")
    bob = make_peer(srv, BOB, "b")
    ident = bob.chat(ALICE, "pay 10 to bob")
    [(by, sid)] = stanza_ids(alice.message(ident))
    assert by == ALICE
    forged = ("<stanza-id xmlns='%s' by='%s' id='%s'/>"
              "<stanza-id xmlns='%s' by='%s' id='00000000000000ff'/>"
              "<delay xmlns='%s' from='localhost' stamp='2001-01-01T00:00:00Z'/>"
              % (NS_SID, ALICE, sid, NS_SID, ALICE, NS_DELAY))
    bob.chat(ALICE, "pay 10 to bob", ident=ident, extra=forged)
    m = alice.message(ident)
    ids = [s for s in stanza_ids(m) if s != (None, None)]
    assert len(ids) == 1 and ids[0][0] == ALICE, ET.tostring(m)
    assert ids[0][1] not in (sid, "00000000000000ff"), ET.tostring(m)
    assert b"00000000000000ff" not in ET.tostring(m) and sid.encode() not in ET.tostring(m)
    page = query(alice)
    assert page.ids == [sid, ids[0][1]], page.ids
    assert page.bodies == ["pay 10 to bob"] * 2
    assert b"00000000000000ff" not in ET.tostring(page.items[1]["msg"])


def test_other_users_cannot_use_the_archive(srv, make_peer):
    alice = make_peer(srv, ALICE, "a")
    bob = make_peer(srv, BOB, "b")
    bob.message(alice.chat(BOB, "private"))
    err = query(bob, to=ALICE, expect="error")
    assert error_condition(err) == "forbidden", ET.tostring(err)
    for payload, t in (("<prefs xmlns='%s'/>" % NS_MAM, "get"),
                       ("<prefs xmlns='%s' default='never'/>" % NS_MAM, "set"),
                       ("<query xmlns='%s'/>" % NS_MAM, "get")):
        r = bob.iq(payload, t, to=ALICE)
        assert r.get("type") == "error" and error_condition(r) == "forbidden", ET.tostring(r)
    assert not bob.unexpected(lambda e: e.find(q("result", NS_MAM)) is not None)
    # alice's archive and prefs are as they were
    assert query(alice).bodies == ["private"]
    assert alice.iq("<prefs xmlns='%s'/>" % NS_MAM, "get").find(
        q("prefs", NS_MAM)).get("default") == "always"
    # her own query with an explicit 'to' of her own bare JID works
    assert query(alice, to=ALICE).bodies == ["private"]


def test_form_and_features(srv, make_peer):
    alice = make_peer(srv, ALICE, "a")
    r = alice.iq("<query xmlns='%s'/>" % NS_MAM, "get")
    assert r.get("type") == "result", ET.tostring(r)
    x = r.find(q("query", NS_MAM)).find("{jabber:x:data}x")
    fields = {f.get("var"): f for f in x.findall("{jabber:x:data}field")}
    assert set(fields) == {"FORM_TYPE", "with", "start", "end"}
    assert fields["FORM_TYPE"].findtext("{jabber:x:data}value") == NS_MAM
    r = alice.iq("<query xmlns='http://jabber.org/protocol/disco#info'/>", "get", ALICE)
    feats = {f.get("var") for f in r.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert NS_MAM in feats and NS_SID in feats, feats


def test_bad_query_values(srv, make_peer):
    alice = make_peer(srv, ALICE, "a")
    bob = make_peer(srv, BOB, "b")
    bob.message(alice.chat(BOB, "one"))
    bad_forms = [
        form(start="yesterday"),
        form(start="2024-13-01T00:00:00Z"),
        form(start="2023-02-29T00:00:00Z"),
        form(end="2024-01-01T24:00:00Z"),
        form(end="2024-01-01T00:00:00"),
        form(end="2024-01-01T00:00:00.Z"),
        form(start="2024-01-01T00:00:00+2:00"),
        form(start=""),
        form(**{"with": "@@not a jid"}),
        form(**{"with": ""}),
        form(fulltext="hello"),
        "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
        "<value>urn:xmpp:mam:1</value></field></x>",
        "<x xmlns='jabber:x:data' type='submit'><field var='start'><value>2024-01-01T00:00:00Z"
        "</value><value>2024-01-02T00:00:00Z</value></field></x>",
        "<x xmlns='jabber:x:data' type='submit'><field><value>x</value></field></x>",
        rsm(max=-1),
        rsm(max="ten"),
        rsm(max=""),
    ]
    for inner in bad_forms:
        err = query(alice, inner, expect="error")
        assert error_condition(err) == "bad-request", (inner, ET.tostring(err))
    # valid forms still work afterwards
    assert query(alice, form(start="2024-01-01T00:00:00.5-05:30")).bodies == ["one"]
    assert query(alice, form(end="2000-01-01T00:00:00Z")).bodies == []


def test_offline_recipient_finds_the_message_in_mam(full_srv, make_peer):
    alice = make_peer(full_srv, ALICE, "a")
    ident = alice.chat(BOB, "while you were out")
    alice.sync()
    bob = make_peer(full_srv, BOB, "b")  # sends presence: offline delivery
    m = bob.message(ident, "the offline message")
    assert m.find(q("delay", NS_DELAY)) is not None, ET.tostring(m)
    sids = [s for s in stanza_ids(m) if s[0] == BOB]
    assert len(sids) == 1, ET.tostring(m)
    page = query(bob)
    assert page.bodies == ["while you were out"] and page.ids == [sids[0][1]]
    assert query(alice).bodies == ["while you were out"]


def test_retention_drops_the_oldest(xmppd_factory, make_peer):
    srv = xmppd_factory(modules=MODULE_SETS["alone"],
                        extra="mam = { max_messages_per_user = 3; max_age_days = 30; };\n")
    alice = make_peer(srv, ALICE, "a")
    bob = make_peer(srv, BOB, "b")
    for i in range(5):
        bob.message(alice.chat(BOB, "r%d" % i))
    for peer in (alice, bob):
        p = query(peer)
        assert p.bodies == ["r2", "r3", "r4"] and p.count == 3, p.bodies
    old = query(alice).ids
    bob.message(alice.chat(BOB, "r5"))
    p = query(alice)
    assert p.bodies == ["r3", "r4", "r5"] and p.ids[:2] == old[1:]
    err = query(alice, rsm(after=old[0]), expect="error")
    assert error_condition(err) == "item-not-found"


def test_bad_settings_refused(xmppd_factory):
    for extra in ("mam = { max_page = 0; };\n", "mam = { max_messages_per_user = -1; };\n",
                  "mam = { max_age_days = -3; };\n"):
        srv = xmppd_factory(name=uniq("bad"), modules=MODULE_SETS["alone"], extra=extra,
                            start=False)
        srv.expect_failure = True
        srv.start(wait=False)
        assert srv.wait_exit() != 0
        assert "mam" in srv.log(), srv.log_tail()


def test_archive_survives_restart(full_srv, make_peer):
    alice = make_peer(full_srv, ALICE, "a")
    bob = make_peer(full_srv, BOB, "b")
    for i in range(3):
        bob.message(alice.chat(BOB, "keep %d" % i))
    before_a, before_b = query(alice), query(bob)
    alice.close()
    bob.close()
    assert full_srv.terminate() == 0
    full_srv.returncode = None
    full_srv.start()
    alice = make_peer(full_srv, ALICE, "a2")
    bob = make_peer(full_srv, BOB, "b2")
    after_a, after_b = query(alice), query(bob)
    assert after_a.ids == before_a.ids and after_a.bodies == before_a.bodies
    assert [i["stamp"] for i in after_a.items] == [i["stamp"] for i in before_a.items]
    assert after_b.ids == before_b.ids
    # new messages go after the old ones
    ident = alice.chat(BOB, "after restart")
    m = bob.message(ident)
    new_id = stanza_ids(m)[0][1]
    p = query(bob)
    assert p.ids == before_b.ids + [new_id] and new_id > before_b.ids[-1]


def test_blocked_message_is_not_archived_for_the_recipient(full_srv, make_peer):
    alice = make_peer(full_srv, ALICE, "a")
    bob = make_peer(full_srv, BOB, "b")
    r = bob.iq("<block xmlns='urn:xmpp:blocking'><item jid='%s'/></block>" % ALICE)
    assert r.get("type") == "result", ET.tostring(r)
    ident = alice.chat(BOB, "blocked")
    err = alice.message(ident, "the bounce")
    assert err.get("type") == "error"
    assert query(bob).items == []
    assert not bob.unexpected(lambda e: e.tag == q("message", NS_CLIENT))


def test_page_is_bounded_in_bytes(srv, make_peer):
    """Big archived messages: a page stops at about 1 MiB of stored XML and
    says it is not complete; the rest comes on the next page."""
    alice = make_peer(srv, ALICE, "a")
    bob = make_peer(srv, BOB, "b")
    for i in range(6):
        bob.message(alice.chat(BOB, ("%d" % i) * 240000), what="big message %d" % i)
    p = query(alice)
    assert 1 <= len(p.items) < 6 and p.complete == "false" and p.count == 6, len(p.items)
    got = [b[0] for b in p.bodies]
    while p.complete != "true":
        p = query(alice, rsm(after=p.last))
        got += [b[0] for b in p.bodies]
    assert got == ["0", "1", "2", "3", "4", "5"]
    # backwards: the newest are kept, and the index says where they start
    p = query(alice, rsm(before=""))
    assert p.complete == "false" and [b[0] for b in p.bodies] == got[6 - len(p.items):]
    assert p.index == 6 - len(p.items)
