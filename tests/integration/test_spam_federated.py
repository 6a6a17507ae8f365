"""
The spam layers with REAL remote senders: xmppd federating with the
session-scoped Prosody peer (prosody.test, users alice and bob; its
configuration is not touched) through the federation harness (federation.py:
dnsmasq SRV + A, the test CA, certificate-only s2s).

One xmppd for the whole module serves xmppd-rtbl.test with the modules c2s,
roster, blocking, pattern_filter, strangers, offline and s2s_external.  That
domain belongs to test_rtbl.py's module-scoped fixture while that module runs
and to test_ratelimit_s2s.py's per-test servers while that one runs; modules
run one after the other, so it is free while this one runs (launch() checks
that nothing serves its s2s address).  xmppd-a/-b.test are session-scoped
(test_s2s_xmppd.py) and evil.test is test_jabberspam.py's.  Every test uses
its own local users, so the shared server carries no state from one test to
the next that matters.

  * mod_strangers: alice@prosody.test writing to a local user who does not
    know her is held, never delivered; the user gets one notice naming her;
    adding her to the roster releases the held messages in order with a
    XEP-0203 <delay/>.  bob@prosody.test's message is rejected with the
    XEP-0050 "reject" command at the server's JID: it never arrives (not even
    once bob is accepted later) and bob gets no error.
  * mod_pattern_filter, scope "remote" only: alice@prosody.test's message
    matching a rule never arrives (although she is a roster contact: the
    scope is "remote", not "strangers"); a near miss arrives; a local
    stranger's message matching the same rule arrives.
  * mod_blocking XEP-0377: abuse_jids = [bob@prosody.test]; a local user
    blocks alice@prosody.test with a report: bob@prosody.test gets the report
    over federation with the reporter, the reported JID and the reason; the
    block also deletes what alice had sent (held by mod_strangers), and her
    next message bounces back to her over federation.

Absences are decided by fences, never by waiting for nothing: a later message
on the same s2s stream (streams keep their order), a ping round trip of the
recipient's own c2s stream, and for "no error came back" a message from the
local side to the remote sender after the fact (errors would travel on the
same xmppd -> prosody.test stream before it).

Run: /usr/bin/python3 -m pytest -q tests/integration/test_spam_federated.py
"""

import re
import time
import xml.etree.ElementTree as ET

import pytest

from federation import PEER_USERS, PROSODY, XMPPD_RTBL, XmppdPeer
from xmpp_helpers import uniq

pytest_plugins = ["federation"]

DOMAIN = XMPPD_RTBL
LOCAL_USERS = {"dave": "dave-Sf-1", "frank": "frank-Sf-2", "carol": "carol-Sf-3",
               "erin": "erin-Sf-4"}
MODULES = ("c2s", "roster", "blocking", "pattern_filter", "strangers", "offline",
           "s2s_external")
ABUSE_JID = "bob@" + PROSODY
assert "bob" in PEER_USERS and "alice" in PEER_USERS    # the Prosody peer's users

NS_CLIENT = "jabber:client"
NS_CMD = "http://jabber.org/protocol/commands"
NS_DATA = "jabber:x:data"
NS_DELAY = "urn:xmpp:delay"
NS_ROSTER = "jabber:iq:roster"
NS_BLOCKING = "urn:xmpp:blocking"
NS_REPORTING = "urn:xmpp:reporting:1"
NS_JID = "urn:xmpp:jid:0"
NS_ADDRESS = "http://jabber.org/protocol/address"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NODE_LIST = "urn:xmppd:strangers:list"
NODE_REJECT = "urn:xmppd:strangers:reject"
SPAM_REASON = "urn:xmpp:reporting:spam"

# pattern_filter rules: the line of the regex is checked in the drop's log line
PATTERNS = "# federated spam rules\nre:casino\\d{2,}\nlit:cheap-pills.example\n"
CASINO_LINE = 2

WAIT = 15.0     # anything that crosses the federation (first stream set-up included)


def q(tag, ns=NS_CLIENT):
    return "{%s}%s" % (ns, tag)


# ------------------------------------------------------------------ xmppd

class SpamXmppd(XmppdPeer):
    """xmppd for xmppd-rtbl.test with every spam layer that acts on delivery."""

    def __init__(self, fed):
        super().__init__(fed, DOMAIN, modules=MODULES, name="xmppd (spam federated)")
        self.patterns = self.dir / "patterns.txt"
        self.patterns.write_text(PATTERNS, encoding="utf-8")
        self.extra = (
            'pattern_filter = { file = "%s"; scope = ( "remote" ); };\n' % self.patterns +
            # local strangers pass mod_strangers: the pattern test needs a
            # local sender the recipient does not know
            "strangers = { exempt_local = true; };\n"
            'blocking = { abuse_jids = [ "%s" ]; };\n' % ABUSE_JID)
        self.write_config()


@pytest.fixture(scope="module")
def srv(federation, prosody_peer):
    """The module's xmppd (prosody_peer first: it is stopped after us)."""
    server = SpamXmppd(federation)
    try:
        server.launch(LOCAL_USERS)
        yield server
    finally:
        rc = server.terminate()
    assert rc == 0, "xmppd exit status %r after SIGTERM\n%s" % (rc, server.log_tail(60))


# ------------------------------------------------------------------ helpers

def local(fed_clients, srv, user):
    return fed_clients(srv, user)


def remote(fed_clients, prosody_peer, user, tries=3):
    """A prosody.test client whose server has a working stream to us: a
    stream of an earlier module's xmppd on this domain may just be closing,
    then the next ping opens a new one.  Errors it gets are collected."""
    c = fed_clients(prosody_peer, user)
    c.errors = []
    c.lt.call(lambda: c.xmpp.add_event_handler("message_error", c.errors.append))
    for i in range(tries):
        try:
            assert c.ping(DOMAIN, timeout=WAIT / tries)["type"] == "result"
            return c
        except Exception:
            if i == tries - 1:
                raise
    return c


def others(c):
    """Everything c received so far and did not consume (skipped by
    wait_message plus the queue)."""
    got = list(getattr(c, "skipped", [])) + c.drain_messages()
    c.skipped = []
    return got


def bare(jid):
    return str(jid).split("/")[0]


def ok(iq):
    assert iq["type"] == "result", iq
    return iq.xml


def roster_add(c, jid):
    return ok(c.iq(None, "<query xmlns='%s'><item jid='%s'/></query>" % (NS_ROSTER, jid), "set"))


def command(c, node, action=None, sid=None, form=""):
    attrs = "node='%s'" % node
    if action:
        attrs += " action='%s'" % action
    if sid:
        attrs += " sessionid='%s'" % sid
    cmd = ok(c.iq(DOMAIN, "<command xmlns='%s' %s>%s</command>" % (NS_CMD, attrs, form),
                  "set")).find(q("command", NS_CMD))
    assert cmd is not None, "no <command/> in the result"
    return cmd


def held(c):
    """XEP-0050 "list": {sender: count} of c's held messages."""
    cmd = command(c, NODE_LIST)
    assert cmd.get("status") == "completed", ET.tostring(cmd)
    x = cmd.find(q("x", NS_DATA))
    assert x is not None, ET.tostring(cmd)
    out = {}
    for item in x.findall(q("item", NS_DATA)):
        row = {f.get("var"): [v.text or "" for v in f.findall(q("value", NS_DATA))]
               for f in item.findall(q("field", NS_DATA))}
        out[row["jid"][0]] = int(row["count"][0])
    return out


def reject(c, jid):
    """XEP-0050 "reject" in two stages: the form offers the senders, then
    the one chosen is rejected.  Returns the note."""
    cmd = command(c, NODE_REJECT)
    assert cmd.get("status") == "executing", ET.tostring(cmd)
    sid = cmd.get("sessionid")
    x = cmd.find(q("x", NS_DATA))
    assert sid and x is not None and x.get("type") == "form", ET.tostring(cmd)
    offered = [o.findtext(q("value", NS_DATA)) for f in x.findall(q("field", NS_DATA))
               if f.get("var") == "jids" for o in f.findall(q("option", NS_DATA))]
    assert jid in offered, offered
    form = ("<x xmlns='%s' type='submit'><field var='jids'><value>%s</value></field></x>"
            % (NS_DATA, jid))
    cmd = command(c, NODE_REJECT, "complete", sid, form)
    assert cmd.get("status") == "completed", ET.tostring(cmd)
    return cmd.findtext(q("note", NS_CMD))


def no_error_came_back(local_client, remote_client):
    """A message from the local side to the remote client arrives; any
    error xmppd sent that client before travelled the same stream ahead of
    it, so none came if none is there now."""
    body = uniq("fence")
    local_client.send_message(remote_client.bare_jid, body)
    remote_client.wait_message(body, timeout=WAIT)
    assert remote_client.errors == [], [str(e) for e in remote_client.errors]


def wait_error(c, timeout=WAIT):
    """The <error/> of the first message error c got (bounded wait)."""
    deadline = time.monotonic() + timeout
    while not c.errors:
        assert time.monotonic() < deadline, "%s: no message error within %.0f s" % (
            c.bare_jid, timeout)
        time.sleep(0.05)
    err = c.errors[0].xml.find(q("error"))
    assert err is not None, c.errors[0]
    return err


def delay_of(m):
    d = m.xml.find(q("delay", NS_DELAY))
    assert d is not None, "no <delay/> on a released message: %s" % m
    return d


# ------------------------------------------------------------------ strangers

def test_remote_stranger_held_noticed_released_and_rejected(srv, prosody_peer, fed_clients):
    dave = local(fed_clients, srv, "dave")
    alice = remote(fed_clients, prosody_peer, "alice")
    bob = remote(fed_clients, prosody_peer, "bob")
    A, B, D = alice.bare_jid, bob.bare_jid, dave.bare_jid

    first = uniq("hello dave, it is alice")
    alice.send_message(D, first)
    # the first thing dave gets is the notice, from the server, naming alice
    notice = dave.wait_message(timeout=WAIT)
    assert str(notice["from"]) == DOMAIN, notice
    assert notice["type"] == "normal", notice
    assert A in notice["body"] and "xmpp:%s?roster" % A in notice["body"], notice["body"]
    assert first not in notice["body"]

    second = uniq("are you there")
    alice.send_message(D, second)
    srv.wait_log(r"strangers: held a message from %s to %s" % (re.escape(A), re.escape(D)),
                 timeout=WAIT, count=2)
    dave.ping_server()
    assert others(dave) == [], "a held message or a second notice reached dave"
    assert held(dave) == {A: 2}

    # a second remote stranger: held too (its notice waits for notice_interval)
    spam = uniq("bob's unwanted message")
    bob.send_message(D, spam)
    srv.wait_log(r"strangers: held a message from %s to %s" % (re.escape(B), re.escape(D)),
                 timeout=WAIT)
    assert held(dave) == {A: 2, B: 1}

    # dave accepts alice by adding her: her two messages arrive, in order, delayed
    roster_add(dave, A)
    got = [dave.wait_message(timeout=WAIT), dave.wait_message(timeout=WAIT)]
    assert [m["body"] for m in got] == [first, second], [str(m) for m in got]
    for m in got:
        assert bare(m["from"]) == A, m
        assert delay_of(m).get("from") == DOMAIN, m
    assert held(dave) == {B: 1}
    # and from now on alice's messages go straight through
    live = uniq("live")
    alice.send_message(D, live)
    m = dave.wait_message(live, timeout=WAIT)
    assert m.xml.find(q("delay", NS_DELAY)) is None, m

    # dave rejects bob's message with the ad-hoc command
    note = reject(dave, B)
    assert note, "the reject command said nothing"
    assert held(dave) == {}
    srv.wait_log(r"strangers: %s \S+ %s: 1 held message\(s\) deleted"
                 % (re.escape(D), re.escape(B)), timeout=5)
    # accepting bob now releases nothing: the rejected message is gone
    roster_add(dave, B)
    after = uniq("bob again")
    bob.send_message(D, after)
    dave.wait_message(after, timeout=WAIT)
    assert spam not in [m["body"] for m in others(dave)], "a rejected message arrived"
    assert "released" not in "".join(l for l in srv.log().splitlines() if B in l), \
        srv.log_tail(40)
    # neither stranger was told anything
    no_error_came_back(dave, bob)
    no_error_came_back(dave, alice)


# ------------------------------------------------------------------ pattern_filter

def test_pattern_filter_remote_scope_drops_remote_spam_only(srv, prosody_peer, fed_clients):
    frank = local(fed_clients, srv, "frank")
    carol = local(fed_clients, srv, "carol")       # a local stranger to frank
    alice = remote(fed_clients, prosody_peer, "alice")
    A, F = alice.bare_jid, frank.bare_jid
    # alice is frank's contact: mod_strangers lets her through, and the scope
    # "remote" still filters her (scope "strangers" would not)
    roster_add(frank, A)

    spam = "come to casino77 tonight " + uniq("r")
    near = "casino7 has one digit " + uniq("r")
    marker = uniq("marker")
    for body in (spam, near, marker):
        alice.send_message(F, body)
    frank.wait_message(marker, timeout=WAIT)       # same stream: the earlier two were routed
    got = [m["body"] for m in others(frank)]
    assert near in got, "the near miss did not arrive: %r" % got
    assert spam not in got, "a remote message matching a rule arrived"
    drops = srv.wait_log(r"pattern_filter: dropped message from %s/\S+ to %s: rule (\S+):(\d+)"
                         % (re.escape(A), re.escape(F)), timeout=5)
    assert drops == [(str(srv.patterns), str(CASINO_LINE))], drops

    # a local sender's matching message to the same recipient: not in scope
    local_spam = "casino77 from next door " + uniq("l")
    carol.send_message(F, local_spam)
    frank.wait_message(local_spam, timeout=WAIT)
    assert len(re.findall(r"pattern_filter: dropped", srv.log())) == 1, srv.log_tail(40)
    # the remote spammer got no answer
    no_error_came_back(frank, alice)


# ------------------------------------------------------------------ blocking + reports

def test_block_report_is_forwarded_to_a_remote_abuse_jid(srv, prosody_peer, fed_clients):
    erin = local(fed_clients, srv, "erin")
    alice = remote(fed_clients, prosody_peer, "alice")     # the spammer
    abuse = remote(fed_clients, prosody_peer, "bob")       # the operator's abuse account
    A, E = alice.bare_jid, erin.bare_jid
    assert abuse.bare_jid == ABUSE_JID

    held_spam = uniq("buy followers")
    alice.send_message(E, held_spam)
    notice = erin.wait_message(timeout=WAIT)
    assert str(notice["from"]) == DOMAIN and A in notice["body"], notice
    assert held(erin) == {A: 1}

    text = "unsolicited advertising " + uniq("t")
    ok(erin.iq(None, "<block xmlns='%s'><item jid='%s'><report xmlns='%s' reason='%s'>"
                     "<text>%s</text></report></item></block>"
               % (NS_BLOCKING, A, NS_REPORTING, SPAM_REASON, text), "set"))

    # bob@prosody.test gets the report over federation, from our server
    m = abuse.wait_message(timeout=WAIT)
    assert str(m["from"]) == DOMAIN, m
    assert m["type"] == "normal", m
    body = m["body"]
    assert "Reporter: %s" % E in body, body
    assert "Reported JID: %s" % A in body, body
    assert "Reason: spam (%s)" % SPAM_REASON in body, body
    assert text in body, body
    rep = m.xml.find(q("report", NS_REPORTING))
    assert rep is not None, "no <report/> in %s" % m
    assert rep.get("reason") == SPAM_REASON, ET.tostring(rep)
    assert rep.findtext(q("jid", NS_JID)) == A, ET.tostring(rep)
    assert rep.findtext(q("text", NS_REPORTING)) == text, ET.tostring(rep)
    ofrom = [a.get("jid") for a in m.xml.iter(q("address", NS_ADDRESS))
             if a.get("type") == "ofrom"]
    assert ofrom == [E], ET.tostring(m.xml)
    srv.wait_log(r"blocking: %s reported %s" % (re.escape(E), re.escape(A)), timeout=5)

    # the block also deleted what alice had sent, and bounces what she sends now
    assert held(erin) == {}
    srv.wait_log(r"strangers: %s blocked %s: 1 held message\(s\) deleted"
                 % (re.escape(E), re.escape(A)), timeout=5)
    after = uniq("still there?")
    alice.send_message(E, after)
    err = wait_error(alice)
    assert err.find(q("service-unavailable", NS_STANZAS)) is not None, ET.tostring(err)
    erin.ping_server()
    assert [m["body"] for m in others(erin)] == [], "a blocked sender's message arrived"
    # one report, one forward: nothing else came to bob before a later message
    fence = uniq("fence")
    erin.send_message(ABUSE_JID, fence)
    abuse.wait_message(fence, timeout=WAIT)
    assert [str(x) for x in others(abuse)] == [], "more than one report was forwarded"
