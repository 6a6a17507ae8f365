"""mod_strangers: messages from strangers held until the user accepts the
sender, seen from real client streams (TLS, SCRAM).

A chat/normal message with a body (or an encrypted payload) from a JID that
is not in the recipient's roster and that the recipient never wrote to is
neither delivered nor archived nor stored offline: it is held durably, the
user gets one notice per stranger, and can list/read/accept/reject the held
messages with XEP-0050 commands at the server's JID.  Accepting (roster add,
accepting a subscription, writing to the stranger, the command) delivers the
held messages in order with a XEP-0203 <delay/>; rejecting, denying the
subscription or blocking (once mod_blocking has accepted the block) deletes
them, without a word to the sender.  Held messages survive kill -9; quotas
drop the oldest and max_age expires them, each returned to its sender with
an error; the sweep works in bounded steps; one notice per stranger, at most
one per notice_interval (the others batched); other users cannot touch
them; bad command forms are refused."""

import re
import shutil
import signal
import subprocess
import time
from xml.etree import ElementTree as ET

import pytest

from xmpp_helpers import (DOMAIN, MALLORY, USERS, XMPPD, StanzaStream, error_condition, line_of,
                          uniq)

ALICE, BOB = "alice@localhost", "bob@localhost"
MAL = MALLORY[0]
CAROL = ("carol@localhost", "carol-Secret-4")
SPAMMERS = [("spam%d@localhost" % i, "spam-Secret-%d" % i) for i in range(8)]
PASSWORDS = dict(USERS, **{MALLORY[0]: MALLORY[1], CAROL[0]: CAROL[1]}, **dict(SPAMMERS))
MODULES = ("c2s", "roster", "blocking", "offline", "mam", "strangers")

NS_CLIENT = "jabber:client"
NS_CMD = "http://jabber.org/protocol/commands"
NS_DATA = "jabber:x:data"
NS_DELAY = "urn:xmpp:delay"
NS_MAM = "urn:xmpp:mam:2"
NS_FWD = "urn:xmpp:forward:0"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_OMEMO = "eu.siacs.conversations.axolotl"
NODE_LIST = "urn:xmppd:strangers:list"
NODE_FETCH = "urn:xmppd:strangers:fetch"
NODE_APPROVE = "urn:xmppd:strangers:approve"
NODE_REJECT = "urn:xmppd:strangers:reject"

OMEMO = ("<encrypted xmlns='%s'><header sid='1234567'>"
         "<key rid='7654321' prekey='true'>MwohBf0Rt+Xn0cW7C1p0/pd+R7z3K3kbN+fEqBkq8yQ=</key>"
         "<iv>Qy1vdXQtb2YtYmFuZA==</iv></header>"
         "<payload>3b7Q+/Ti0rVGvTgDfFs1Z1w/V0r7Zk1dGTxk8c6B5wM=</payload></encrypted>" % NS_OMEMO)


def q(tag, ns=NS_CLIENT):
    return "{%s}%s" % (ns, tag)


# ---------------------------------------------------------------- client streams

class Peer(StanzaStream):
    passwords = PASSWORDS

    def take(self, pred):
        """After a sync: every pending stanza matching pred (removed)."""
        self.sync()
        got = [e for e in self.pending if pred(e)]
        self.pending = [e for e in self.pending if not pred(e)]
        return got


@pytest.fixture
def peer():
    # closed one at a time: several streams closing at the same instant is
    # not what these tests are about
    yield from Peer.factory()


def start(xmppd_factory, extra="", name="xmppd", modules=MODULES, users=()):
    return xmppd_factory(name=name, modules=modules, extra=extra,
                         extra_users=[MALLORY, CAROL] + list(users))


@pytest.fixture
def srv(xmppd_factory):
    return start(xmppd_factory)


# ---------------------------------------------------------------- predicates/helpers

def from_(jid):
    """A message from that bare JID (any resource)."""
    return lambda e: (e.tag == q("message") and
                      (e.get("from") or "").split("/")[0] == jid)


def is_notice(stranger):
    return lambda e: (e.tag == q("message") and e.get("from") == DOMAIN and
                      stranger in (e.findtext(q("body")) or ""))


def any_message(e):
    return e.tag == q("message")


def delay_of(m):
    d = m.find(q("delay", NS_DELAY))
    assert d is not None, "no <delay/> on a released message: %s" % ET.tostring(m)
    return d


def error_of(st):
    """(type, condition, text) of a stanza error."""
    assert st.get("type") == "error", ET.tostring(st)
    err = st.find(q("error"))
    return err.get("type"), error_condition(st), err.findtext(q("text", NS_STANZAS))


def is_error(e):
    return e.tag == q("message") and e.get("type") == "error"


TEXT_QUOTA = "the recipient's queue of messages from unknown senders is full"
TEXT_EXPIRED = "not accepted by the recipient in time"


def command_condition(st):
    err = st.find(q("error"))
    for c in (err if err is not None else []):
        if c.tag.startswith("{%s}" % NS_CMD):
            return c.tag.split("}", 1)[1]
    return None


def ok(iq):
    assert iq.get("type") == "result", ET.tostring(iq)
    return iq


def roster_add(p, jid):
    return ok(p.iq("<query xmlns='jabber:iq:roster'><item jid='%s'/></query>" % jid))


def block(p, jid):
    return ok(p.iq("<block xmlns='urn:xmpp:blocking'><item jid='%s'/></block>" % jid))


def unblock(p, jid):
    return ok(p.iq("<unblock xmlns='urn:xmpp:blocking'><item jid='%s'/></unblock>" % jid))


def command(p, node, action=None, sid=None, form="", to=DOMAIN):
    attrs = "node='%s'" % node
    if action:
        attrs += " action='%s'" % action
    if sid:
        attrs += " sessionid='%s'" % sid
    return p.iq("<command xmlns='%s' %s>%s</command>" % (NS_CMD, attrs, form), "set", to)


def submit(var, values, ftype="submit"):
    return ("<x xmlns='%s' type='%s'><field var='%s'>%s</field></x>"
            % (NS_DATA, ftype, var, "".join("<value>%s</value>" % v for v in values)))


def cmd_of(iq):
    ok(iq)
    c = iq.find(q("command", NS_CMD))
    assert c is not None, ET.tostring(iq)
    return c


def form_rows(x):
    """The <item/> rows of a result form, as dicts var -> [values]."""
    rows = []
    for item in x.findall(q("item", NS_DATA)):
        rows.append({f.get("var"): [v.text or "" for v in f.findall(q("value", NS_DATA))]
                     for f in item.findall(q("field", NS_DATA))})
    return rows


def held(p):
    """The list command: {sender: count}."""
    c = cmd_of(command(p, NODE_LIST))
    assert c.get("status") == "completed", ET.tostring(c)
    x = c.find(q("x", NS_DATA))
    assert x is not None and x.get("type") == "result", ET.tostring(c)
    return {r["jid"][0]: int(r["count"][0]) for r in form_rows(x)}


def start_stage(p, node):
    """First stage of a command with a form: (sessionid, {field var: [option values]})."""
    c = cmd_of(command(p, node))
    assert c.get("status") == "executing", ET.tostring(c)
    sid = c.get("sessionid")
    assert sid, ET.tostring(c)
    x = c.find(q("x", NS_DATA))
    assert x is not None and x.get("type") == "form", ET.tostring(c)
    fields = {f.get("var"): [o.findtext(q("value", NS_DATA))
                             for o in f.findall(q("option", NS_DATA))]
              for f in x.findall(q("field", NS_DATA))}
    return sid, fields


def fetch(p, jid):
    """Two stages: the form offers the sender, the result lists its messages."""
    sid, fields = start_stage(p, NODE_FETCH)
    assert jid in fields["jid"], fields
    c = cmd_of(command(p, NODE_FETCH, "complete", sid, submit("jid", [jid])))
    assert c.get("status") == "completed", ET.tostring(c)
    x = c.find(q("x", NS_DATA))
    return [(r["from"][0], "\n".join(r["body"])) for r in form_rows(x)]


def run_choice(p, node, jids):
    sid, fields = start_stage(p, node)
    for j in jids:
        assert j in fields["jids"], fields
    c = cmd_of(command(p, node, "complete", sid, submit("jids", jids)))
    assert c.get("status") == "completed", ET.tostring(c)
    return c.findtext(q("note", NS_CMD))


def mam_messages(p):
    """The user's whole archive: [(from, body)]."""
    qid = uniq("q")
    ident = uniq("mam")
    p.send("<iq type='set' id='%s'><query xmlns='%s' queryid='%s'/></iq>" % (ident, NS_MAM, qid))
    out = []
    while True:
        el = p.wait(lambda e: (e.tag == q("iq") and e.get("id") == ident) or
                    (e.tag == q("message") and e.find(q("result", NS_MAM)) is not None),
                    "MAM query")
        if el.tag == q("iq"):
            break
        m = el.find(q("result", NS_MAM)).find(q("forwarded", NS_FWD)).find(q("message"))
        out.append(((m.get("from") or "").split("/")[0], m.findtext(q("body"))))
    assert el.get("type") == "result", ET.tostring(el)
    return out


def stats(server):
    """SIGUSR1, then the counters of mod_strangers it wrote: {name: value}."""
    mark = len(server.log())
    server.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        new = server.log()[mark:]
        # the dump ends with the last module's counters; ours are written in
        # one go, so once a later line (or a ping round) is there they all are
        if "stats: " in new:
            time.sleep(0.2)
            new = server.log()[mark:]
            return {m.group(1): int(m.group(2))
                    for m in re.finditer(r"stats: strangers\.(\w+)=(\d+)", new)}
        time.sleep(0.05)
    raise AssertionError("no stats after SIGUSR1:\n" + server.log_tail(30))


# ------------------------------------------------------------------------ tests

def test_stranger_held_once_noticed_not_archived(srv, peer):
    alice = peer(srv, ALICE, "a")
    bob = peer(srv, BOB, "b")
    mal = peer(srv, MAL, "m")
    roster_add(alice, BOB)          # bob is a contact: the canary that passes

    sent = [mal.chat(ALICE, "spam %d" % i) for i in range(3)]
    mal.sync()
    notice = alice.wait(is_notice(MAL), "the notice")
    assert notice.get("type") == "normal", ET.tostring(notice)
    body = notice.findtext(q("body"))
    assert "xmpp:%s?roster" % MAL in body and NODE_APPROVE in body, body

    # the contact still gets through; nothing of mallory's, no second notice
    alice.message(bob.chat(ALICE, "from a contact"))
    assert alice.take(from_(MAL)) == []
    assert alice.take(is_notice(MAL)) == []
    # the stranger is not told anything (no error, no bounce)
    assert mal.take(any_message) == []

    more = [mal.chat(ALICE, "spam %d" % i) for i in (3, 4)]
    mal.sync()
    assert alice.take(any_message) == [], "a second notice or a held message leaked"
    assert held(alice) == {MAL: 5}
    assert [b for f, b in mam_messages(alice) if f == MAL] == [], "held message archived"

    # an encrypted payload is held too; a chat state, a headline and an
    # OMEMO key transport (no payload) are not this module's business
    omemo = mal.chat(ALICE, None, extra=OMEMO)
    state = mal.chat(ALICE, None, extra="<active xmlns='http://jabber.org/protocol/chatstates'/>")
    head = mal.chat(ALICE, "headline", mtype="headline")
    kt = mal.chat(ALICE, None, extra=OMEMO.replace(
        "<payload>3b7Q+/Ti0rVGvTgDfFs1Z1w/V0r7Zk1dGTxk8c6B5wM=</payload>", ""))
    mal.sync()
    got = {e.get("id") for e in alice.take(from_(MAL))}
    assert got == {state, head, kt}, got
    assert held(alice) == {MAL: 6}

    # accepting releases all six, in order, each with a delay
    roster_add(alice, MAL)
    order = sent + more + [omemo]
    got = [alice.wait(from_(MAL), "released message %d" % i) for i in range(len(order))]
    assert [m.get("id") for m in got] == order
    for m in got:
        assert delay_of(m).get("from") == DOMAIN
    assert got[-1].find(q("encrypted", NS_OMEMO)) is not None
    assert got[0].findtext(q("body")) == "spam 0"
    # the released messages took the normal path: archived now
    assert [b for f, b in mam_messages(alice)
            if f == MAL and (b or "").startswith("spam")] == ["spam %d" % i for i in range(5)]
    assert held(alice) == {}
    # and from now on mallory's messages go straight through
    live = mal.chat(ALICE, "now a contact")
    m = alice.message(live)
    assert m.find(q("delay", NS_DELAY)) is None, ET.tostring(m)


def test_offline_recipient_gets_only_the_notice(srv, peer):
    mal = peer(srv, MAL, "m")
    sent = [mal.chat(ALICE, "while you were out %d" % i) for i in range(2)]
    mal.sync()
    alice = peer(srv, ALICE, "a")     # available: offline storage is delivered
    notices = alice.take(is_notice(MAL))
    assert len(notices) == 1, [ET.tostring(n) for n in notices]
    assert notices[0].find(q("delay", NS_DELAY)) is not None, "the notice was stored offline"
    assert alice.take(from_(MAL)) == [], "a held message was stored offline"
    assert [f for f, b in mam_messages(alice) if f == MAL] == []
    assert held(alice) == {MAL: 2}
    # accepting by asking for mallory's presence (pending out) releases them
    alice.send("<presence type='subscribe' to='%s'/>" % MAL)
    got = [alice.wait(from_(MAL), "released %d" % i).get("id") for i in range(2)]
    assert got == sent


def test_accepting_or_denying_a_subscription(srv, peer):
    alice = peer(srv, ALICE, "a")
    mal = peer(srv, MAL, "m")
    carol = peer(srv, CAROL[0], "c")
    mal.send("<presence type='subscribe' to='%s'/>" % ALICE)
    sent = [mal.chat(ALICE, "please add me %d" % i) for i in range(2)]
    mal.sync()                      # mallory first
    carol.send("<presence type='subscribe' to='%s'/>" % ALICE)
    carol.chat(ALICE, "carol here")
    carol.sync()
    alice.wait(lambda e: e.tag == q("presence") and e.get("type") == "subscribe" and
               e.get("from") == MAL, "mallory's request")
    alice.wait(is_notice(MAL), "notice for mallory")
    # one notice per notice_interval (an hour by default): carol waits for
    # the next one, and the list command has her already
    assert alice.take(is_notice(CAROL[0])) == []
    assert held(alice) == {MAL: 2, CAROL[0]: 1}

    # a pending inbound request alone does not make mallory known
    assert alice.take(from_(MAL)) == []
    alice.send("<presence type='subscribed' to='%s'/>" % MAL)
    got = [alice.wait(from_(MAL), "released %d" % i) for i in range(2)]
    assert [m.get("id") for m in got] == sent
    for m in got:
        delay_of(m)

    # denying carol's request rejects what she sent
    alice.send("<presence type='unsubscribed' to='%s'/>" % CAROL[0])
    alice.sync()
    assert held(alice) == {}
    assert alice.take(from_(CAROL[0])) == []
    # refused, not returned: an error would tell a spammer the address is read
    assert carol.take(any_message) == []
    assert stats(srv).get("rejected") == 1


def test_stranger_withdrawing_its_request_decides_nothing(srv, peer):
    """A stranger cancelling its own contact request (or removing the user
    from its roster) is not the user refusing it: what it sent stays held."""
    alice = peer(srv, ALICE, "a")
    carol = peer(srv, CAROL[0], "c")
    carol.send("<presence type='subscribe' to='%s'/>" % ALICE)
    carol.chat(ALICE, "carol here")
    carol.sync()
    alice.sync()
    assert held(alice) == {CAROL[0]: 1}
    carol.send("<presence type='unsubscribe' to='%s'/>" % ALICE)
    carol.sync()
    alice.sync()
    assert held(alice) == {CAROL[0]: 1}
    assert stats(srv).get("rejected", 0) == 0
    # and the user can still accept them
    roster_add(alice, CAROL[0])
    got = alice.wait(from_(CAROL[0]), "released after the withdrawn request")
    assert got.findtext(q("body")) == "carol here"


def test_adhoc_list_fetch_approve_reject(srv, peer):
    alice = peer(srv, ALICE, "a")
    mal = peer(srv, MAL, "m")
    carol = peer(srv, CAROL[0], "c")

    items = ok(alice.iq("<query xmlns='http://jabber.org/protocol/disco#items' node='%s'/>"
                        % NS_CMD, "get", DOMAIN))
    nodes = {i.get("node") for i in items.iter("{http://jabber.org/protocol/disco#items}item")}
    assert {NODE_LIST, NODE_FETCH, NODE_APPROVE, NODE_REJECT} <= nodes, nodes

    # nothing held yet: the commands say so
    assert held(alice) == {}
    c = cmd_of(command(alice, NODE_APPROVE))
    assert c.get("status") == "completed" and "No messages" in c.findtext(q("note", NS_CMD))

    m_sent = [mal.chat(ALICE, "m%d &amp; line\nsecond line" % i) for i in range(2)]
    c_sent = [carol.chat(ALICE, "c%d" % i) for i in range(2)]
    mal.sync()
    carol.sync()
    assert held(alice) == {MAL: 2, CAROL[0]: 2}
    rows = fetch(alice, MAL)
    assert [b for _, b in rows] == ["m0 & line\nsecond line", "m1 & line\nsecond line"], rows
    assert all(f == mal.full for f, _ in rows), rows
    # reading does not release
    assert alice.take(from_(MAL)) == []
    assert held(alice) == {MAL: 2, CAROL[0]: 2}

    note = run_choice(alice, NODE_APPROVE, [CAROL[0]])
    assert "2 held messages delivered" in note, note
    got = [alice.wait(from_(CAROL[0]), "carol's %d" % i) for i in range(2)]
    assert [m.get("id") for m in got] == c_sent
    for m in got:
        delay_of(m)
    assert held(alice) == {MAL: 2}
    # approved by command: carol is known from now on, without a roster item
    live = carol.chat(ALICE, "straight through")
    assert alice.message(live).find(q("delay", NS_DELAY)) is None

    note = run_choice(alice, NODE_REJECT, [MAL])
    assert "2 held messages deleted" in note, note
    assert held(alice) == {}
    assert alice.take(from_(MAL)) == []
    assert mal.take(any_message) == [], "a rejected message was returned to its sender"
    # rejected means gone: accepting mallory later brings nothing back
    roster_add(alice, MAL)
    assert alice.take(from_(MAL)) == []
    del m_sent
    s = stats(srv)
    assert s.get("held") == 4 and s.get("released") == 2 and s.get("rejected") == 2, s


def test_one_round_trip_submission_and_cancel(srv, peer):
    alice = peer(srv, ALICE, "a")
    mal = peer(srv, MAL, "m")
    ident = mal.chat(ALICE, "hello")
    mal.sync()
    # a form submitted with the first request is taken at once
    c = cmd_of(command(alice, NODE_FETCH, form=submit("jid", [MAL])))
    assert c.get("status") == "completed"
    # cancel ends a session without doing anything
    sid, _ = start_stage(alice, NODE_APPROVE)
    c = cmd_of(command(alice, NODE_APPROVE, "cancel", sid))
    assert c.get("status") == "canceled"
    assert held(alice) == {MAL: 1}
    c = cmd_of(command(alice, NODE_APPROVE, form=submit("jids", [MAL])))
    assert c.get("status") == "completed"
    assert alice.wait(from_(MAL), "released").get("id") == ident


def test_blocking_deletes_held_messages(srv, peer):
    alice = peer(srv, ALICE, "a")
    mal = peer(srv, MAL, "m")
    carol = peer(srv, CAROL[0], "c")
    for i in range(2):
        mal.chat(ALICE, "b%d" % i)
    carol.chat(ALICE, "carol")
    mal.sync()
    carol.sync()
    assert held(alice) == {MAL: 2, CAROL[0]: 1}
    block(alice, MAL)
    assert held(alice) == {CAROL[0]: 1}
    # a bad block request (mod_blocking refuses it whole) deletes nothing
    r = alice.iq("<block xmlns='urn:xmpp:blocking'><item jid='%s'/><item jid='a@b@c'/></block>"
                 % CAROL[0])
    assert r.get("type") == "error"
    assert held(alice) == {CAROL[0]: 1}
    # blocking the whole domain takes carol's too
    block(alice, DOMAIN)
    assert held(alice) == {}
    unblock(alice, DOMAIN)
    unblock(alice, MAL)
    roster_add(alice, MAL)
    assert alice.take(from_(MAL)) == []
    # deleted without a word to the senders
    assert mal.take(any_message) == [] and carol.take(any_message) == []
    assert stats(srv).get("blocked") == 3


def test_refused_block_deletes_nothing(xmppd_factory, peer):
    """Held messages go only once mod_blocking has committed the block
    (XD_HOOK_BLOCKLIST_CHANGED), and a full JID covers only that resource."""
    srv = start(xmppd_factory, "blocking = { max_items = 1; };\n")
    alice = peer(srv, ALICE, "a")
    mal = peer(srv, MAL, "m")
    carol = peer(srv, CAROL[0], "c")
    for i in range(2):
        mal.chat(ALICE, "r%d" % i)
    carol.chat(ALICE, "carol")
    mal.sync()
    carol.sync()
    block(alice, "someone@elsewhere.example")
    r = alice.iq("<block xmlns='urn:xmpp:blocking'><item jid='%s'/></block>" % MAL)
    assert error_condition(r) == "policy-violation", ET.tostring(r)     # max_items
    assert held(alice) == {MAL: 2, CAROL[0]: 1}, "a refused block deleted held messages"
    r = alice.iq("<block xmlns='urn:xmpp:blocking'><item jid='%s'><report "
                 "xmlns='urn:xmpp:reporting:1' reason='urn:xmpp:reporting:nonsense'/>"
                 "</item></block>" % MAL)
    assert error_condition(r) == "bad-request", ET.tostring(r)          # a bad report
    assert held(alice) == {MAL: 2, CAROL[0]: 1}, "a refused block deleted held messages"

    unblock(alice, "someone@elsewhere.example")
    block(alice, MAL + "/elsewhere")                # XEP-0016 2.1: that resource only
    assert held(alice) == {MAL: 2, CAROL[0]: 1}
    unblock(alice, MAL + "/elsewhere")
    block(alice, mal.full)                          # the resource they came from
    assert held(alice) == {CAROL[0]: 1}
    unblock(alice, mal.full)
    assert held(alice) == {CAROL[0]: 1}             # an unblock brings nothing back
    assert mal.take(any_message) == []
    assert stats(srv).get("blocked") == 2


def test_reply_makes_the_stranger_known(srv, clients):
    """With slixmpp clients: writing to a stranger starts the conversation."""
    mal = clients(srv, MAL + "/m", MALLORY[1]).must_login()
    alice = clients(srv, ALICE + "/a").must_login()
    mal.send_presence()
    alice.send_presence()
    mal.send_message(ALICE, "hi, remember me?")
    mal.ping_server()
    notice = alice.wait_message()
    assert str(notice["from"]) == DOMAIN and MAL in notice["body"], str(notice)

    alice.send_message(MAL, "who are you?")
    assert str(mal.wait_message("who are you?")["from"]).startswith(ALICE)
    m = alice.wait_message("hi, remember me?")    # released by the reply
    assert m.xml.find(q("delay", NS_DELAY)) is not None, str(m)

    mal.send_message(ALICE, "the one from the conference")
    m = alice.wait_message("the one from the conference")
    assert m.xml.find(q("delay", NS_DELAY)) is None, str(m)
    # ... and that lasts (stored, not per session)
    alice.disconnect()
    alice = clients(srv, ALICE + "/b").must_login()
    alice.send_presence()
    mal.send_message(ALICE, "still there?")
    assert alice.wait_message("still there?")["body"] == "still there?"
    assert [str(x["from"]) for x in alice.drain_messages()] == []


def test_held_messages_survive_kill_9(xmppd_factory, peer):
    srv = start(xmppd_factory)
    mal = peer(srv, MAL, "m")
    sent = [mal.chat(ALICE, "durable %d" % i) for i in range(3)]
    mal.sync()          # handled, so committed
    srv.proc.kill()
    srv.proc.wait(10)
    srv._logf.close()
    srv.start()         # same data dir; the fixture checks this one exits 0

    alice = peer(srv, ALICE, "a")
    assert len(alice.take(is_notice(MAL))) == 1    # stored offline before the kill
    assert held(alice) == {MAL: 3}
    roster_add(alice, MAL)
    got = [alice.wait(from_(MAL), "released %d" % i).get("id") for i in range(3)]
    assert got == sent


def test_waiting_notice_outlives_a_restart(xmppd_factory, peer):
    """A notice waiting for notice_interval is kept in storage, not only in
    its timer: after a crash it is sent when the user logs in."""
    srv = start(xmppd_factory, "strangers = { notice_interval = 2; };\n")
    mal = peer(srv, MAL, "m")
    carol = peer(srv, CAROL[0], "c")
    mal.chat(ALICE, "first")
    mal.sync()          # alice is away: this notice is stored offline
    carol.chat(ALICE, "second")
    carol.sync()        # within the interval: carol waits for the next notice
    t0 = time.monotonic()
    srv.proc.kill()
    srv.proc.wait(10)
    srv._logf.close()
    srv.start()
    time.sleep(max(0.0, 2.1 - (time.monotonic() - t0)))

    alice = peer(srv, ALICE, "a")
    m = alice.take(is_notice(MAL))
    assert len(m) == 1 and m[0].find(q("delay", NS_DELAY)) is not None
    c = alice.take(is_notice(CAROL[0]))
    assert len(c) == 1, "the waiting notice was lost in the crash"
    # sent at login, not stored offline before the crash
    assert c[0].find(q("delay", NS_DELAY)) is None, ET.tostring(c[0])
    assert MAL not in c[0].findtext(q("body"))


def test_quota_returns_the_oldest_to_its_sender(xmppd_factory, peer):
    srv = start(xmppd_factory, "strangers = { quota = 3; notice_interval = 0; };\n")
    alice = peer(srv, ALICE, "a")
    mal = peer(srv, MAL, "m")
    carol = peer(srv, CAROL[0], "c")
    m_sent = [mal.chat(ALICE, "q0"), mal.chat(ALICE, "q1")]
    mal.sync()
    c_sent = [carol.chat(ALICE, "q%d" % i) for i in range(2, 5)]
    carol.sync()
    # the two oldest (mallory's) went first, back to mallory with the reason
    assert held(alice) == {CAROL[0]: 3}
    assert [b for _, b in fetch(alice, CAROL[0])] == ["q2", "q3", "q4"]
    for ident in m_sent:
        assert error_of(mal.message(ident, "q0/q1 returned")) == \
            ("wait", "resource-constraint", TEXT_QUOTA)
    assert carol.take(any_message) == []
    mal.chat(ALICE, "q5")
    mal.sync()
    assert [b for _, b in fetch(alice, CAROL[0])] == ["q3", "q4"]
    assert error_of(carol.message(c_sent[0], "q2 returned")) == \
        ("wait", "resource-constraint", TEXT_QUOTA)
    assert mal.take(any_message) == [] and carol.take(any_message) == []
    # a new notice (notice_interval = 0): all of mallory's earlier messages were gone
    assert len(alice.take(is_notice(MAL))) == 2
    s = stats(srv)
    assert s.get("held") == 6 and s.get("dropped") == 3, s


def test_max_age_expires(xmppd_factory, peer):
    srv = start(xmppd_factory, "strangers = { max_age = 1; sweep_interval = 1; };\n")
    alice = peer(srv, ALICE, "a")
    mal = peer(srv, MAL, "m")
    ident = mal.chat(ALICE, "soon gone")
    mal.sync()
    body = alice.wait(is_notice(MAL), "notice").findtext(q("body"))
    assert "do not accept within 1 second are returned to their senders" in body, body
    # RFC 6120 8.3.3.19: not <recipient-unavailable/>, which would tell a
    # stranger whether the user is around
    assert error_of(mal.message(ident, "the expired message returned")) == \
        ("cancel", "service-unavailable", TEXT_EXPIRED)
    assert "held message(s) expired" in srv.log()
    assert held(alice) == {}
    roster_add(alice, MAL)
    assert alice.take(from_(MAL)) == []
    assert mal.take(any_message) == []
    assert stats(srv).get("expired") == 1


def test_expired_when_accepted_goes_back(xmppd_factory, peer):
    """Accepting a sender after max_age returns what expired instead."""
    srv = start(xmppd_factory, "strangers = { max_age = 1; sweep_interval = 3600; };\n")
    alice = peer(srv, ALICE, "a")
    mal = peer(srv, MAL, "m")
    ident = mal.chat(ALICE, "too late")
    mal.sync()
    time.sleep(2.05)    # arrival times are whole seconds
    assert held(alice) == {}
    roster_add(alice, MAL)
    assert error_of(mal.message(ident, "the expired message returned")) == \
        ("cancel", "service-unavailable", TEXT_EXPIRED)
    assert alice.take(from_(MAL)) == []
    s = stats(srv)
    assert s.get("expired") == 1 and not s.get("released"), s


def test_sweep_works_in_bounded_steps(xmppd_factory, peer):
    """More expired messages than one sweep step takes (128): every one is
    returned, in several short steps rather than one long callback."""
    srv = start(xmppd_factory, "strangers = { quota = 300; max_age = 1; sweep_interval = 1; };\n")
    alice = peer(srv, ALICE, "a")
    mal = peer(srv, MAL, "m")
    sent = [mal.chat(ALICE, "bulk %d" % i) for i in range(150)]
    mal.sync()
    back = [mal.wait(is_error, "returned message %d" % i, timeout=10).get("id")
            for i in range(len(sent))]
    assert sorted(back) == sorted(sent)
    deadline = time.monotonic() + 5
    while True:     # the log line of the last step may trail its bounces
        steps = [int(n) for n in re.findall(r"strangers: (\d+) held message\(s\) expired",
                                            srv.log())]
        if sum(steps) >= 150 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sum(steps) == 150 and len(steps) >= 2 and max(steps) <= 128, steps
    assert held(alice) == {}
    assert mal.take(any_message) == []
    assert stats(srv).get("expired") == 150


def test_notice_flood_is_rate_limited(xmppd_factory, peer):
    """A spammer changing localpart per message: one notice, then at most one
    per notice_interval naming a few of the senders that wrote meanwhile."""
    srv = start(xmppd_factory, "strangers = { notice_interval = 2; };\n", users=SPAMMERS)
    alice = peer(srv, ALICE, "a")
    spam = [peer(srv, jid, "s", presence=False) for jid, _ in SPAMMERS]
    server_msg = lambda e: e.tag == q("message") and e.get("from") == DOMAIN  # noqa: E731

    spam[0].chat(ALICE, "buy now")
    spam[0].sync()
    first = alice.wait(server_msg, "the first notice").findtext(q("body"))
    assert SPAMMERS[0][0] in first and "xmpp:%s?roster" % SPAMMERS[0][0] in first, first
    for s in spam[1:]:
        s.chat(ALICE, "buy now")
        s.sync()
    spam[0].chat(ALICE, "buy now, again")
    spam[0].sync()
    assert alice.take(server_msg) == [], "a second notice within notice_interval"

    # when the interval ends: one notice for the seven, five of them named
    body = alice.wait(server_msg, "the batched notice", timeout=6).findtext(q("body"))
    named = [jid for jid, _ in SPAMMERS[1:] if jid in body]
    assert len(named) == 5 and "7 senders" in body and "and 2 more" in body, body
    assert SPAMMERS[0][0] not in body and NODE_LIST in body, body
    assert held(alice) == dict({SPAMMERS[0][0]: 2}, **{jid: 1 for jid, _ in SPAMMERS[1:]})
    # told once per stranger, the counted ones as well as the named ones:
    # the notice marked every sender it was about
    counted = [i for i in range(1, len(SPAMMERS)) if SPAMMERS[i][0] not in body]
    assert len(counted) == 2, body
    for i in (3, counted[0]):
        spam[i].chat(ALICE, "hello?")
        spam[i].sync()
    time.sleep(2.2)
    assert alice.take(server_msg) == []
    assert stats(srv).get("notices") == 2


def db_keys(data_dir, table):
    """The keys of a table of a stopped server's store (db_dump, hex format)."""
    dump = shutil.which("db5.3_dump") or shutil.which("db_dump")
    r = subprocess.run([dump, "-h", str(data_dir), "%s.db" % table], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    data = lines[lines.index("HEADER=END") + 1:lines.index("DATA=END")]
    return [bytes.fromhex(k.strip()) for k in data[0::2]]


@pytest.mark.skipif(not (shutil.which("db5.3_dump") or shutil.which("db_dump")),
                    reason="needs db_dump (db5.3-util) to read the store")
def test_sweep_stores_nothing_for_a_deleted_account(xmppd_factory, peer):
    """xmppctl deletes an account without loading modules: the account's
    records go, its expiry index entries (keyed by time) stay behind.  The
    sweep drops them without writing an account record for the user that
    is gone (while a live user's account is kept)."""
    srv = start(xmppd_factory, "strangers = { max_age = 1; sweep_interval = 3600; };\n")
    mal = peer(srv, MAL, "m")
    for i in range(2):
        mal.chat(ALICE, "orphan %d" % i)
    mal.chat(CAROL[0], "for carol")
    mal.sync()
    assert srv.terminate() == 0
    r = srv.ctl("deluser", ALICE)
    assert r.returncode == 0, r.stderr
    assert [k for k in db_keys(srv.data_dir, "strangers_meta")
            if k.startswith(ALICE.encode() + b"\0")] == []
    assert len(db_keys(srv.data_dir, "strangers_expiry")) == 3     # alice's left behind

    srv.config_path.write_text(srv.config.replace("sweep_interval = 3600", "sweep_interval = 1"))
    srv.returncode = None       # a second run: teardown checks its exit
    srv.start()
    deadline = time.monotonic() + 8
    while not ("dropped 2 expiry index entries" in srv.log() and
               "strangers: 1 held message(s) expired" in srv.log()):
        assert time.monotonic() < deadline, srv.log_tail(40)
        time.sleep(0.05)
    assert srv.terminate() == 0
    meta = db_keys(srv.data_dir, "strangers_meta")
    assert [k for k in meta if k.startswith(ALICE.encode() + b"\0")] == [], \
        "an account record was stored for a deleted user"
    assert CAROL[0].encode() + b"\0" in meta       # carol's account is still kept
    assert db_keys(srv.data_dir, "strangers_expiry") == []


def test_hostile_commands(srv, peer):
    alice = peer(srv, ALICE, "a")
    bob = peer(srv, BOB, "b")
    mal = peer(srv, MAL, "m")
    sent = [mal.chat(ALICE, "for alice %d" % i) for i in range(2)]
    mal.sync()
    assert held(alice) == {MAL: 2}

    # bob cannot see, read, accept or reject alice's held messages
    assert held(bob) == {}
    for node, var in ((NODE_FETCH, "jid"), (NODE_APPROVE, "jids"), (NODE_REJECT, "jids")):
        r = command(bob, node, form=submit(var, [MAL]))
        assert r.get("type") == "error" and error_condition(r) == "item-not-found", \
            ET.tostring(r)
    # alice's session id is only a label: with it, bob still acts on his own
    sid, _ = start_stage(alice, NODE_APPROVE)
    r = command(bob, NODE_APPROVE, "complete", sid, submit("jids", [MAL]))
    assert error_condition(r) == "item-not-found", ET.tostring(r)

    bad = [
        (dict(action="complete", sid=sid), "bad-request", "bad-payload"),          # no form
        (dict(action="complete", sid=sid, form=submit("jids", [MAL], "form")),
         "bad-request", "bad-payload"),
        (dict(action="complete", sid=sid, form=submit("jids", [])), "bad-request", "bad-payload"),
        (dict(action="complete", sid=sid, form=submit("other", [MAL])),
         "bad-request", "bad-payload"),
        (dict(action="complete", sid=sid, form=submit("jids", ["a@b@c"])),
         "jid-malformed", "bad-payload"),
        (dict(action="complete", sid=sid, form=submit("jids", ["u%d@x.example" % i
                                                               for i in range(101)])),
         "bad-request", "bad-payload"),
        (dict(action="complete", sid=sid, form=submit("jids", [MAL, "nobody@localhost"])),
         "item-not-found", None),
        (dict(action="frobnicate", sid=sid), "bad-request", "malformed-action"),
        (dict(action="next", sid=sid), "bad-request", "bad-action"),
        (dict(action="complete"), "bad-request", "bad-action"),                    # no session
        (dict(action="complete", sid="x" * 5000, form=submit("jids", [MAL])),
         "bad-request", "bad-sessionid"),
    ]
    for kw, cond, specific in bad:
        r = command(alice, NODE_APPROVE, **kw)
        assert r.get("type") == "error", (kw, ET.tostring(r))
        assert error_condition(r) == cond, (kw, ET.tostring(r))
        if specific:
            assert command_condition(r) == specific, (kw, ET.tostring(r))
    r = command(alice, NODE_FETCH, form=submit("jid", [MAL, CAROL[0]]))
    assert error_condition(r) == "bad-request", ET.tostring(r)
    r = command(alice, "urn:xmppd:strangers:nope")
    assert error_condition(r) == "item-not-found", ET.tostring(r)

    # through all that, nothing moved: still held, delivered to no one
    assert held(alice) == {MAL: 2}
    assert alice.take(from_(MAL)) == [] and bob.take(from_(MAL)) == []
    # a duplicate value counts once
    c = cmd_of(command(alice, NODE_APPROVE, "complete", sid, submit("jids", [MAL, MAL])))
    assert "2 held messages delivered" in c.findtext(q("note", NS_CMD))
    assert [alice.wait(from_(MAL), "released").get("id") for _ in sent] == sent
    assert srv.running()


@pytest.mark.parametrize("extra,held_expected", [
    ("strangers = { exempt_local = true; };\n", False),
    ("strangers = { enabled = false; };\n", False),
    ('strangers = { hosts = ( "localhost" ); };\n', True),
])
def test_host_settings(xmppd_factory, peer, extra, held_expected):
    srv = start(xmppd_factory, extra)
    alice = peer(srv, ALICE, "a")
    mal = peer(srv, MAL, "m")
    ident = mal.chat(ALICE, "local sender")
    mal.sync()
    got = alice.take(from_(MAL))
    if held_expected:
        assert got == [] and held(alice) == {MAL: 1}
    else:
        assert [m.get("id") for m in got] == [ident]
        assert alice.take(is_notice(MAL)) == []


def test_notice_as_subscription_request(xmppd_factory, peer):
    srv = start(xmppd_factory, 'strangers = { notice = "subscribe"; };\n')
    alice = peer(srv, ALICE, "a")
    mal = peer(srv, MAL, "m")
    sent = [mal.chat(ALICE, "s%d" % i) for i in range(3)]
    mal.sync()
    subs = alice.take(lambda e: e.tag == q("presence") and e.get("type") == "subscribe")
    assert [s.get("from") for s in subs] == [MAL], [ET.tostring(s) for s in subs]
    assert alice.take(any_message) == []
    alice.send("<presence type='subscribed' to='%s'/>" % MAL)
    assert [alice.wait(from_(MAL), "released").get("id") for _ in sent] == sent


def test_check_config(xmppd_factory):
    good = xmppd_factory(modules=MODULES, start=False, users={},
                         extra='strangers = { quota = 10; notice = "none"; max_age = 0; };\n')
    r = subprocess.run([str(XMPPD), "--check-config", str(good.config_path)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr
    for i, (setting, line) in enumerate([
            ("quota", "quota = 0;"),
            ("notice", 'notice = "popup";'),
            ("hosts", 'hosts = ( "elsewhere.example" );'),
            ("max_message_size", "max_message_size = 9000000;"),
            ("max_age", "max_age = -1;"),
            ("notice_interval", "notice_interval = -1;")]):
        bad = xmppd_factory(name="bad%d" % i, modules=MODULES, start=False, users={},
                            extra="strangers = {\n    %s\n};\n" % line)
        r = subprocess.run([str(XMPPD), "--check-config", str(bad.config_path)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=20)
        out = r.stdout + r.stderr
        assert r.returncode == 1, (line, out)
        assert setting in out and ":%d" % line_of(bad.config, line) in out, (line, out)
