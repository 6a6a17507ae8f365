"""
mod_rtbl: real-time blocklists (the xmppbl.org protocol) over real federation.

A Prosody started here stands in for xmppbl.org: its pubsub component
rtbl.test holds the blocklist nodes, and its virtual host spam.test has the
moderator who publishes (a pubsub admin) and the remote senders.  xmppd
serves xmppd-rtbl.test, subscribes to rtbl.test over certificate-only s2s
(the federation harness: dnsmasq, the test CA) and must stop what a list
names, within a second of the publish, and let it through again within a
second of the retract.

Whether a message got through is decided without sleeping: after the probe
the sender pings xmppd's domain (same s2s stream, so xmppd has routed the
probe before it answers), then the recipient pings xmppd (its stream carries
the probe, if delivered, before that answer).

Run: /usr/bin/python3 -m pytest -q tests/integration/test_rtbl.py
"""

import hashlib
import re
import signal
import socket
import subprocess
import time

import pytest

from federation import (RTBL, SPAM, XMPPD_RTBL, FedClient, ProsodyPeer, XmppdPeer, _lua_str,
                        _wait_ports, free_port)
from xmpp_helpers import XMPPD, uniq

pytest_plugins = ["federation"]

NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_OWNER = NS_PUBSUB + "#owner"
NS_EVENT = NS_PUBSUB + "#event"
NS_REPORTING = "urn:xmpp:reporting:1"

DOMAINS_NODE = "spam_source_domains"
JIDS_NODE = "spam_source_jids_sha256"
MUC_NODE = "muc_bans_sha256"
IPS_NODE = "spam_source_ips"
CUSTOM_NODE = "moderated"          # a node name without a known suffix: kind given in the config
NODES = (DOMAINS_NODE, JIDS_NODE, MUC_NODE, IPS_NODE, CUSTOM_NODE)
LISTS = ["%s %s" % (RTBL, n) for n in NODES[:4]] + ["%s %s domains" % (RTBL, CUSTOM_NODE)]

SPAM_USERS = {"moderator": "mod-Pw-1", "spammer": "spam-Pw-2", "other": "other-Pw-3",
              "friend": "friend-Pw-4"}
LOCAL_USERS = {"alice": "alice-Rtbl-1", "bob": "bob-Rtbl-2", "carol": "carol-Rtbl-3"}

BLOCK_WITHIN = 1.0       # the bar: publish -> blocked, retract -> flowing


def sha(jid):
    return hashlib.sha256(jid.encode()).hexdigest()


def report_xml(text):
    return ("<report xmlns='%s' reason='urn:xmpp:reporting:spam'><text xml:lang='en'>%s</text>"
            "</report>" % (NS_REPORTING, text))


# ------------------------------------------------------------------ the blocklist service

class RtblProsody(ProsodyPeer):
    """Prosody serving spam.test (moderator + senders) and the pubsub component
    rtbl.test, with rtbl.test's own certificate, listening for s2s on both
    domains' addresses."""

    def __init__(self, fed):
        q = _lua_str
        extra_global = "\n".join([
            "s2s_interfaces = { %s, %s }" % (q(fed.net.addr(SPAM)), q(fed.net.addr(RTBL))),
            "admins = { %s }" % q("moderator@" + SPAM),
        ])
        super().__init__(fed, domain=SPAM, extra_global=extra_global)
        c = fed.certs[RTBL]
        cert = self._install(c.cert, "%s.crt" % RTBL)
        key = self._install(c.key, "%s.key" % RTBL)
        self.extra_host = "\n".join([
            "",
            'Component %s "pubsub"' % q(RTBL),
            "    ssl = { certificate = %s; key = %s; cafile = %s; capath = false }"
            % (q(cert), q(key), q(self.ca)),
            # components do not inherit certificate checking for s2s
            '    modules_enabled = { "s2s_auth_certs" }',
            "    pubsub_max_items = 1000",
        ])
        self.config_path.write_text(self.config_text())
        self._own()

    def wait_ready(self, timeout=30.0):
        super().wait_ready(timeout)
        _wait_ports(self, [(self.fed.net.addr(RTBL), self.s2s_port)], timeout)


# ------------------------------------------------------------------ xmppd

class RtblXmppd(XmppdPeer):
    """xmppd for xmppd-rtbl.test with mod_rtbl subscribed to rtbl.test."""

    conf = ('rtbl = {\n'
            '    host = "%s";\n' % XMPPD_RTBL +
            '    lists = ( %s );\n' % ", ".join('"%s"' % x for x in LISTS) +
            '    exempt_roster = true;\n'
            '    resync_interval = 3600;\n'
            '};\n')

    def __init__(self, fed):
        super().__init__(fed, XMPPD_RTBL, extra=self.conf,
                         modules=("c2s", "roster", "offline", "s2s_external", "rtbl"))

    def write_config(self, static_routes=()):
        self.static_routes = static_routes
        super().write_config()


# ------------------------------------------------------------------ the environment

class Env:
    def __init__(self, fed, prosody, xmppd, moderator):
        self.fed, self.prosody, self.xmppd, self.mod = fed, prosody, xmppd, moderator

    # -- the moderator's side (XEP-0060 over c2s to Prosody)
    def pubsub(self, xml, ns=NS_PUBSUB):
        return self.mod.iq(RTBL, "<pubsub xmlns='%s'>%s</pubsub>" % (ns, xml), itype="set",
                           timeout=10)

    def create(self, node):
        self.pubsub("<create node='%s'/><configure><x xmlns='jabber:x:data' type='submit'>"
                    "<field var='FORM_TYPE' type='hidden'><value>"
                    "http://jabber.org/protocol/pubsub#node_config</value></field>"
                    "<field var='pubsub#max_items'><value>1000</value></field>"
                    "</x></configure>" % node)

    def publish(self, node, item_id, report="spam"):
        """Publish; returns the time just before the request went out."""
        t0 = time.monotonic()
        self.pubsub("<publish node='%s'><item id='%s'>%s</item></publish>"
                    % (node, item_id, report_xml(report)))
        return t0

    def retract(self, node, item_id):
        t0 = time.monotonic()
        self.pubsub("<retract node='%s' notify='true'><item id='%s'/></retract>"
                    % (node, item_id))
        return t0

    def purge(self, node):
        t0 = time.monotonic()
        self.pubsub("<purge node='%s'/>" % node, ns=NS_OWNER)
        return t0

    def delete(self, node):
        t0 = time.monotonic()
        self.pubsub("<delete node='%s'/>" % node, ns=NS_OWNER)
        return t0

    def subscriptions(self, node):
        r = self.mod.iq(RTBL, "<pubsub xmlns='%s'><subscriptions node='%s'/></pubsub>"
                        % (NS_OWNER, node), timeout=10)
        return re.findall(r"<subscription [^>]*>", str(r))


@pytest.fixture(scope="module")
def env(federation, fed_loop):
    prosody = federation.add_peer(RtblProsody(federation), SPAM_USERS)
    xmppd = moderator = None
    try:
        moderator = FedClient(fed_loop, prosody, "moderator@%s/mod" % SPAM,
                              SPAM_USERS["moderator"]).must_login(timeout=15)
        e = Env(federation, prosody, None, moderator)
        for node in NODES:       # before xmppd starts: its first sync finds them
            e.create(node)
        xmppd = RtblXmppd(federation).launch(LOCAL_USERS)
        e.xmppd = xmppd
        xmppd.wait_log(r"rtbl: %s/\S+: synchronized" % re.escape(RTBL), timeout=20,
                       count=len(NODES))
        yield e
    finally:
        if moderator:
            moderator.close()
        rc = xmppd.terminate() if xmppd else 0
        federation.stop_peer(prosody)
    assert rc == 0, "xmppd exit status %r after SIGTERM" % rc


@pytest.fixture
def rt(env):
    """The environment, with every node purged again after the test (and the
    purges applied by xmppd before the next test starts)."""
    yield env
    if not env.xmppd.running():
        return
    mark, purged = env.xmppd.mark(), 0
    for node in NODES:
        try:
            env.purge(node)
            purged += 1
        except Exception:       # a test may have deleted the node
            pass
    env.xmppd.wait_log(r"rtbl: %s/\S+: node purged" % re.escape(RTBL), since=mark,
                       count=purged)


def delivered(sender, receiver, to=None, body=None):
    """Does a message from sender reach receiver?  Decided by two fences,
    without waiting for an absence."""
    body = body or uniq("probe")
    sender.send_message(to or receiver.bare_jid, body)
    assert sender.ping(XMPPD_RTBL, timeout=15)["type"] == "result"
    receiver.ping_server(timeout=10)
    return any(m["body"] == body for m in receiver.drain_messages())


def wait_state(sender, receiver, want, t0, limit=BLOCK_WITHIN, what=""):
    """Probe until delivery is `want`; assert it happened within `limit` s of
    t0 (the probe sent at most that long after t0 already showed it)."""
    deadline = t0 + max(limit, 1.0) + 10.0
    while True:
        sent = time.monotonic()
        if delivered(sender, receiver) == want:
            assert sent - t0 <= limit, "%s: took %.2f s (limit %.1f s)" % (what, sent - t0,
                                                                        limit)
            return sent - t0
        assert time.monotonic() < deadline, "%s: still %s after %.0f s" % (
            what, "delivered" if want is False else "blocked", deadline - t0)


def error_catcher(client):
    errors = []
    client.lt.call(lambda: client.xmpp.add_event_handler("message_error", errors.append))
    return errors


@pytest.fixture
def people(rt, fed_clients):
    alice = fed_clients(rt.xmppd, "alice")
    # alice's client leaves subscription requests unanswered (slixmpp would
    # accept them: the sender would become a roster contact, hence exempt)
    alice.lt.call(lambda: setattr(alice.xmpp, "auto_authorize", None))
    alice.lt.call(lambda: setattr(alice.xmpp, "auto_subscribe", False))
    spammer = fed_clients(rt.prosody, "spammer")
    other = fed_clients(rt.prosody, "other")
    # nothing listed yet: both reach alice
    assert delivered(spammer, alice, body=uniq("first")), "control: spammer -> alice"
    assert delivered(other, alice), "control: other -> alice"
    return alice, spammer, other


# ------------------------------------------------------------------ subscribing

def test_subscribed_to_every_node_and_synchronized(rt):
    """XEP-0060 6.1: xmppd-rtbl.test subscribed itself (jid = its domain) to
    each node, and fetched each node's items."""
    for node in NODES:
        subs = rt.subscriptions(node)
        assert any("jid='%s'" % XMPPD_RTBL in s or 'jid="%s"' % XMPPD_RTBL in s for s in subs), \
            (node, subs)
        assert any("subscribed" in s for s in subs), (node, subs)
    log = rt.xmppd.log()
    assert "rtbl: 5 list(s), subscribing as %s; roster contacts are exempt" % XMPPD_RTBL in log
    for node in NODES:
        assert re.search(r"rtbl: %s/%s: synchronized: 0 items" % (RTBL, node), log), node


# ------------------------------------------------------------------ each node kind

def test_jid_hash_blocks_within_a_second_and_retract_restores(rt, people):
    alice, spammer, other = people
    errors = error_catcher(spammer)
    mark = rt.xmppd.mark()
    t0 = rt.publish(JIDS_NODE, sha("spammer@" + SPAM), "sent 500 ads in a minute")
    took = wait_state(spammer, alice, False, t0, what="blocked after publish")
    # only that JID: its neighbour on the same server still gets through
    assert delivered(other, alice)
    # to the full JID as well, and the sender learns nothing (no error)
    assert not delivered(spammer, alice, to=alice.full_jid)
    assert errors == [], [str(e) for e in errors]
    # the operator sees why, with the XEP-0377 report
    line = rt.xmppd.wait_log(r"rtbl: dropped message type=chat from spammer@%s/\S+ to "
                             r"alice@%s[^\n]*JID hash listed in %s/%s -- spam: sent 500 ads"
                             % (re.escape(SPAM), re.escape(XMPPD_RTBL), re.escape(RTBL),
                                JIDS_NODE), since=mark)
    assert line
    t1 = rt.retract(JIDS_NODE, sha("spammer@" + SPAM))
    took2 = wait_state(spammer, alice, True, t1, what="flowing after retract")
    print("publish->blocked %.3f s, retract->flowing %.3f s" % (took, took2))


def test_domain_listed_blocks_every_jid_of_it(rt, people, fed_clients):
    alice, spammer, other = people
    bob = fed_clients(rt.xmppd, "bob")
    mark = rt.xmppd.mark()
    t0 = rt.publish(DOMAINS_NODE, SPAM, "spam server")
    wait_state(spammer, alice, False, t0, what="spammer, domain listed")
    assert not delivered(other, alice)
    # local users are not affected
    assert delivered(bob, alice)
    assert delivered(alice, bob)
    t1 = rt.retract(DOMAINS_NODE, SPAM)
    wait_state(other, alice, True, t1, what="other, domain unlisted")
    assert delivered(spammer, alice)
    # one info line per notification; the items themselves at debug level
    log = rt.xmppd.log()[mark:]
    name = re.escape("%s/%s" % (RTBL, DOMAINS_NODE))
    for line in (r"info: rtbl: %s: update: 1 listed, 0 unlisted, 0 refused; first: %s$",
                 r"info: rtbl: %s: update: 0 listed, 1 unlisted, 0 refused; first: %s$",
                 r"debug: rtbl: %s: listed %s -- spam: spam server$",
                 r"debug: rtbl: %s: unlisted %s$"):
        assert len(re.findall(line % (name, re.escape(SPAM)), log, re.M)) == 1, line
    assert not re.search(r"info: rtbl: [^\n]*: (un)?listed ", log), log[-3000:]


def test_hash_of_a_bare_domain_blocks_the_domain(rt, people):
    """muc_bans_sha256: the hash of a bare domain lists the whole domain."""
    alice, spammer, other = people
    t0 = rt.publish(MUC_NODE, sha(SPAM), "spam domain (hashed)")
    wait_state(other, alice, False, t0, what="domain hash")
    assert not delivered(spammer, alice)
    t1 = rt.retract(MUC_NODE, sha(SPAM))
    wait_state(spammer, alice, True, t1, what="domain hash retracted")


def raw_s2s_answer(xmppd, source):
    """Open a TCP connection to xmppd's s2s port from `source`, send a stream
    header; return what came back before the connection closed (b"" = refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((source, 0))
        s.settimeout(5)
        s.connect((xmppd.host, xmppd.s2s_port))
        try:
            s.sendall(("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                       "xmlns:stream='http://etherx.jabber.org/streams' from='%s' to='%s' "
                       "version='1.0'>" % (SPAM, XMPPD_RTBL)).encode())
            data = b""
            while b"<stream:features" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data
        except (ConnectionResetError, BrokenPipeError):
            return b""


def c2s_answers(xmppd, source):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((source, 0))
        s.settimeout(5)
        s.connect((xmppd.host, xmppd.c2s_port))
        s.sendall(("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                   "xmlns:stream='http://etherx.jabber.org/streams' to='%s' version='1.0'>"
                   % XMPPD_RTBL).encode())
        data = b""
        while b"starttls" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return b"starttls" in data


def wait_s2s(xmppd, source, accepted, t0, what):
    deadline = t0 + 10
    while True:
        sent = time.monotonic()
        got = raw_s2s_answer(xmppd, source)
        if bool(got) == accepted:
            assert sent - t0 <= BLOCK_WITHIN, "%s: took %.2f s" % (what, sent - t0)
            return got
        assert time.monotonic() < deadline, "%s: not after 10 s (got %r)" % (what, got)


def test_listed_addresses_are_refused_at_accept_for_s2s_only(rt):
    net = rt.fed.net
    listed = net.client_addr                         # <base>.99
    unlisted = "%s.%d" % (net.base, 120)
    cidr = "%s.96/28" % net.base                     # .96 - .111
    assert b"<stream:stream" in raw_s2s_answer(rt.xmppd, listed)      # control
    mark = rt.xmppd.mark()
    # hostile and odd ids on the same node are ignored, not fatal
    for bad in ("not-an-address", "10.0.0.0/33", "1.2.3.4/-1", "::1/129", "1.2.3.4/8/9",
                "x" * 1200):
        rt.publish(IPS_NODE, bad, "junk")
    rt.publish(IPS_NODE, "2001:db8::/32", "v6 range")
    rt.publish(IPS_NODE, "::ffff:192.0.2.0/120", "v4-mapped range")
    t0 = rt.publish(IPS_NODE, cidr, "spam farm")
    wait_s2s(rt.xmppd, listed, False, t0, "listed address refused")
    assert b"<stream:stream" in raw_s2s_answer(rt.xmppd, unlisted)
    # client connections from the same address are not affected
    assert c2s_answers(rt.xmppd, listed)
    log = rt.xmppd.log()[mark:]
    assert re.search(r"rtbl: refused a server-to-server connection from %s: in a /28 listed in "
                     r"%s/%s" % (re.escape(listed), RTBL, IPS_NODE), log), log[-3000:]
    for bad in ("not-an-address", "10.0.0.0/33", "::1/129"):
        assert "item id '%s' is not an address or CIDR range" % bad in log, bad
    assert "listed 2001:db8::/32" in log
    # a single address, then the range retracted: still refused until both are gone
    rt.publish(IPS_NODE, listed, "one address")
    rt.retract(IPS_NODE, cidr)
    assert raw_s2s_answer(rt.xmppd, listed) == b""
    t1 = rt.retract(IPS_NODE, listed)
    wait_s2s(rt.xmppd, listed, True, t1, "address unlisted")
    # and federation from the real peer still works all along
    assert rt.xmppd.running()


# ------------------------------------------------------------------ what no list can do

BROAD_IPS = {                      # every test address is in 127/8
    "0.0.0.0/0": "an IPv4 range shorter than /8",
    "::/0": "an IPv6 range shorter than /32",
    "::ffff:0.0.0.0/96": "an IPv4 range shorter than /8",      # mapped: /0
    "126.0.0.0/7": "an IPv4 range shorter than /8",            # 126-127.*
    "::ffff:126.0.0.0/103": "an IPv4 range shorter than /8",   # mapped: /7
    "2000::/3": "an IPv6 range shorter than /32",
}


def rtbl_stat(xmppd, name):
    mark = xmppd.mark()
    xmppd.proc.send_signal(signal.SIGUSR1)
    return int(xmppd.wait_log(r"stats: rtbl\.%s=(\d+)" % name, since=mark)[0])


def test_too_broad_items_are_refused_and_block_nothing(rt, people):
    """A mistaken or compromised service cannot cut federation off with one
    item: address ranges shorter than /8 (IPv4, and IPv4-mapped IPv6 judged
    as IPv4) or /32 (IPv6), and on domain lists single-label domains (the
    parent of every domain under a TLD: "test" would match spam.test) and IP
    addresses are refused, logged and counted; so they are when a resync
    finds them in the node."""
    alice, spammer, other = people
    listed = rt.fed.net.client_addr
    broad_domains = {"test": "a single-label domain", "TEST.": "a single-label domain",
                     "[::1]": "an IP address", listed: "an IP address"}
    mark = rt.xmppd.mark()
    for ip in BROAD_IPS:
        rt.publish(IPS_NODE, ip, "everyone")
    for d in broad_domains:
        rt.publish(DOMAINS_NODE, d, "everyone")
    rt.publish(CUSTOM_NODE, "test", "everyone")
    # the shortest range allowed is listed (no test address is in 10/8)
    rt.publish(IPS_NODE, "10.0.0.0/8", "a big range, still possible")
    rt.xmppd.wait_log(r"update: 1 listed, 0 unlisted, 0 refused; first: 10\.0\.0\.0/8",
                      since=mark)
    # notifications are applied in order: every broad one was seen by now,
    # and nothing is blocked: not the senders, not the peers' addresses
    assert delivered(spammer, alice)
    assert delivered(other, alice)
    assert b"<stream:stream" in raw_s2s_answer(rt.xmppd, listed)
    log = rt.xmppd.log()[mark:]
    assert len(re.findall(r"rtbl: %s/\S+: update: 0 listed, 0 unlisted, 1 refused$"
                          % re.escape(RTBL), log, re.M)) == len(BROAD_IPS) + len(broad_domains) + 1
    for item, why in list(BROAD_IPS.items()) + list(broad_domains.items()):
        assert "item '%s' refused: %s" % (item, why) in log, (item, log[-3000:])

    # a resync fetches them again: refused again, before they are kept
    mark = rt.xmppd.mark()
    rt.xmppd.proc.send_signal(signal.SIGHUP)
    for node, kept, refused in ((IPS_NODE, 1, len(BROAD_IPS)),
                                (DOMAINS_NODE, 0, len(broad_domains)), (CUSTOM_NODE, 0, 1)):
        rt.xmppd.wait_log(r"(?m)%s/%s: synchronized: %d items \(0 added or changed, 0 removed\); "
                          r"%d refused$" % (re.escape(RTBL), node, kept, refused), since=mark)
    rt.xmppd.wait_log(r"rtbl: %s/\S+: synchronized" % re.escape(RTBL), since=mark,
                      count=len(NODES))
    assert delivered(spammer, alice)
    assert b"<stream:stream" in raw_s2s_answer(rt.xmppd, listed)
    total = 2 * (len(BROAD_IPS) + len(broad_domains) + 1)
    assert rtbl_stat(rt.xmppd, "items_refused") >= total


# ------------------------------------------------------------------ what "dropped" means

def test_dropped_means_no_offline_storage_no_error_no_subscription(rt, people, fed_clients):
    alice, spammer, other = people
    errors = error_catcher(spammer)
    other_errors = error_catcher(other)
    t0 = rt.publish(JIDS_NODE, sha("spammer@" + SPAM))
    wait_state(spammer, alice, False, t0, what="listed")
    # carol is offline: the spammer's message is not stored, other's is
    spam_body, ok_body = uniq("stored-spam"), uniq("stored-ok")
    spammer.send_message("carol@" + XMPPD_RTBL, spam_body)
    other.send_message("carol@" + XMPPD_RTBL, ok_body)
    # an account that does not exist: the same silence (no service-unavailable)
    spammer.send_message("nosuchuser@" + XMPPD_RTBL, uniq("nobody"))
    other.send_message("nosuchuser@" + XMPPD_RTBL, uniq("nobody"))
    # a subscription request does not reach alice either
    try:
        spammer.lt.call(lambda: spammer.xmpp.send_presence(pto=alice.bare_jid,
                                                           ptype="subscribe"))
        other.lt.call(lambda: other.xmpp.send_presence(pto=alice.bare_jid, ptype="subscribe"))
        for c in (spammer, other):
            c.ping(XMPPD_RTBL, timeout=15)
        alice.ping_server()
        pres = alice.drain_presences()
    finally:
        # Prosody re-sends a pending request at each login: withdraw both
        for c in (spammer, other):
            c.lt.call(lambda c=c: c.xmpp.send_presence(pto=alice.bare_jid, ptype="unsubscribe"))
    subs = [str(p["from"]) for p in pres if p["type"] == "subscribe"]
    assert "other@" + SPAM in subs, subs
    assert "spammer@" + SPAM not in subs, subs
    assert errors == [], [str(e) for e in errors]
    conds = [e["error"]["condition"] for e in other_errors]
    assert "service-unavailable" in conds, conds      # the unlisted sender does get the error
    carol = fed_clients(rt.xmppd, "carol")
    got = carol.wait_message(ok_body, timeout=10)
    assert str(got["from"]).startswith("other@" + SPAM)
    carol.ping_server()
    bodies = [m["body"] for m in carol.drain_messages()] + \
        [m["body"] for m in getattr(carol, "skipped", [])]
    assert spam_body not in bodies, bodies
    rt.retract(JIDS_NODE, sha("spammer@" + SPAM))


def test_roster_contacts_are_exempt(rt, people, fed_clients):
    alice, spammer, other = people
    bob = fed_clients(rt.xmppd, "bob")
    friend = fed_clients(rt.prosody, "friend")
    alice.iq(None, "<query xmlns='jabber:iq:roster'><item jid='friend@%s'/></query>" % SPAM,
             itype="set")
    t0 = rt.publish(DOMAINS_NODE, SPAM)
    wait_state(spammer, alice, False, t0, what="domain listed")
    # in alice's roster: still reaches alice, but not bob (not in his)
    assert delivered(friend, alice)
    assert not delivered(friend, bob)
    assert not delivered(other, alice)
    rt.xmppd.wait_log(r"rtbl: dropped message type=chat from friend@%s/\S+ to bob@"
                      % re.escape(SPAM))
    rt.retract(DOMAINS_NODE, SPAM)
    alice.iq(None, "<query xmlns='jabber:iq:roster'><item jid='friend@%s' subscription='remove'/>"
             "</query>" % SPAM, itype="set")


# ------------------------------------------------------------------ purge, delete, hostile

def test_purge_unlists_everything_in_the_node(rt, people):
    alice, spammer, other = people
    rt.publish(JIDS_NODE, sha("spammer@" + SPAM))
    t0 = rt.publish(JIDS_NODE, sha("other@" + SPAM))
    wait_state(other, alice, False, t0, what="other listed")
    assert not delivered(spammer, alice)
    mark = rt.xmppd.mark()
    t1 = rt.purge(JIDS_NODE)
    wait_state(spammer, alice, True, t1, what="after purge")
    assert delivered(other, alice)
    rt.xmppd.wait_log(r"rtbl: %s/%s: node purged; 2 items unlisted" % (RTBL, JIDS_NODE),
                      since=mark)


def test_node_delete_unlists_and_sighup_resubscribes(rt, people):
    alice, spammer, _other = people
    t0 = rt.publish(CUSTOM_NODE, SPAM, "moderated list")
    wait_state(spammer, alice, False, t0, what="custom node (kind domains)")
    mark = rt.xmppd.mark()
    t1 = rt.delete(CUSTOM_NODE)
    wait_state(spammer, alice, True, t1, what="after node delete")
    rt.xmppd.wait_log(r"%s/%s: node deleted; 1 items unlisted" % (RTBL, CUSTOM_NODE),
                      since=mark)
    # re-created with an item: xmppd is not subscribed any more (the delete
    # ended it); SIGHUP resyncs every list at once
    rt.create(CUSTOM_NODE)
    rt.publish(CUSTOM_NODE, SPAM, "moderated again")
    assert delivered(spammer, alice)
    mark = rt.xmppd.mark()
    t2 = time.monotonic()
    rt.xmppd.proc.send_signal(signal.SIGHUP)
    wait_state(spammer, alice, False, t2, limit=5.0, what="resubscribed after SIGHUP")
    rt.xmppd.wait_log(r"%s/%s: synchronized: 1 items \(1 added" % (RTBL, CUSTOM_NODE),
                      since=mark)
    assert any("subscribed" in s for s in rt.subscriptions(CUSTOM_NODE))


def test_forged_and_malformed_items_are_ignored(rt, people):
    alice, spammer, other = people
    mark = rt.xmppd.mark()
    # a pubsub event from anyone but the service is not a list change
    forged = ("<message xmlns='jabber:client' to='%s' type='headline'><event xmlns='%s'>"
              "<items node='%s'><item id='%s'>%s</item></items></event></message>"
              % (XMPPD_RTBL, NS_EVENT, DOMAINS_NODE, SPAM, report_xml("forged")))

    spammer.lt.call(lambda: spammer.xmpp.send_raw(forged))
    assert delivered(spammer, alice)
    assert "listed %s" % SPAM not in rt.xmppd.log()[mark:]
    # ids that are not what the node holds, duplicates, huge ones
    for bad in ("zz", "g" * 64, sha("x")[:63], sha("x") + "00", "A" * 1500):
        rt.publish(JIDS_NODE, bad, "junk")
    for bad in ("bad domain!", "a" * 300 + ".test"):
        rt.publish(DOMAINS_NODE, bad, "junk")
    big = "<text>%s</text>" % ("\u00e9" * 5000)
    rt.pubsub("<publish node='%s'><item id='%s'><report xmlns='%s' "
              "reason='urn:xmpp:reporting:spam'>%s</report></item></publish>"
              % (JIDS_NODE, sha("spammer@" + SPAM).upper(), NS_REPORTING, big))
    t0 = rt.publish(JIDS_NODE, sha("spammer@" + SPAM))   # the same JID twice (two ids)
    wait_state(spammer, alice, False, t0, what="listed by two ids")
    assert delivered(other, alice)
    # one of the two ids retracted: still listed by the other
    rt.retract(JIDS_NODE, sha("spammer@" + SPAM).upper())
    assert not delivered(spammer, alice)
    t1 = rt.retract(JIDS_NODE, sha("spammer@" + SPAM))
    wait_state(spammer, alice, True, t1, what="both ids retracted")
    log = rt.xmppd.log()[mark:]
    assert "item id 'zz' is not a hex SHA-256" in log
    assert rt.xmppd.running()


# ------------------------------------------------------------------ the cache

def test_cache_blocks_from_the_first_second_and_resync_reconciles(rt, people, fed_clients):
    alice, spammer, other = people
    srv = rt.xmppd
    t0 = rt.publish(JIDS_NODE, sha("spammer@" + SPAM), "cached")
    wait_state(spammer, alice, False, t0, what="listed")
    for c in (alice, spammer, other):
        c.close()
    assert srv.terminate() == 0
    # Restart where the service cannot be reached at all: only the cache can block.
    dead = "%s.%d" % (rt.fed.net.base, 250)
    srv.write_config(static_routes=["%s=%s:%d" % (RTBL, dead, free_port(host="127.0.0.1"))])
    mark = srv.mark()
    srv.start()
    try:
        alice = fed_clients(srv, "alice")
        spammer = fed_clients(rt.prosody, "spammer")
        other = fed_clients(rt.prosody, "other")
        assert not delivered(spammer, alice), "the cached listing did not block at once"
        assert delivered(other, alice)
        log = srv.wait_log(r"rtbl: %s/%s: subscribing failed[^\n]*keeping the 1 items"
                           % (RTBL, JIDS_NODE), since=mark)
        assert log
        assert re.search(r"rtbl: 1 items loaded from the cache", srv.log()[mark:])
        # The service can still push to us: its notifications apply at once,
        # and its new stream to us makes xmppd resync (which fails again here).
        t1 = rt.publish(JIDS_NODE, sha("other@" + SPAM), "pushed")
        # (a new s2s stream from Prosody first: its DNS lookups take a while)
        wait_state(other, alice, False, t1, limit=10.0, what="pushed while our requests fail")
        srv.wait_log(r"rtbl: %s connected to us again: resynchronizing 5 list\(s\) of it"
                     % RTBL, since=mark)
        srv.wait_log(r"rtbl: %s/%s: subscribing failed" % (RTBL, JIDS_NODE), since=mark,
                     count=2)
        t2 = rt.retract(JIDS_NODE, sha("other@" + SPAM))
        wait_state(other, alice, True, t2, what="retract pushed while our requests fail")
        assert "synchronized" not in srv.log()[mark:]
        for c in (alice, spammer, other):
            c.close()
    finally:
        assert srv.terminate() == 0
        srv.write_config()
    # While xmppd is down the list changes, and the service gives up on
    # telling it (the notifications bounce): the resync at start must catch up.
    pmarks = rt.prosody.log_marks()
    rt.retract(JIDS_NODE, sha("spammer@" + SPAM))
    rt.publish(JIDS_NODE, sha("other@" + SPAM), "listed while you were away")
    rt.prosody.wait_log("queued stanzas because of failed outgoing connection to %s"
                        % XMPPD_RTBL, timeout=20, since=pmarks)
    mark = srv.mark()
    srv.start()
    alice = fed_clients(srv, "alice")
    spammer = fed_clients(rt.prosody, "spammer")
    other = fed_clients(rt.prosody, "other")
    srv.wait_log(r"rtbl: %s/%s: synchronized: 1 items \(1 added or changed, 1 removed\)"
                 % (RTBL, JIDS_NODE), since=mark, timeout=15)
    assert delivered(spammer, alice)
    assert not delivered(other, alice)
    rt.retract(JIDS_NODE, sha("other@" + SPAM))


def test_cache_writes_are_batched_and_survive_a_crash(rt, people, fed_clients):
    """Changes reach the cache in one transaction within about a second
    (not one fsync per notification), and what was written survives kill -9."""
    alice, spammer, other = people
    srv = rt.xmppd
    fillers = [sha("filler%d@%s" % (i, SPAM)) for i in range(4)]
    mark = srv.mark()
    for f in fillers:
        rt.publish(JIDS_NODE, f, "filler")
    t0 = rt.publish(JIDS_NODE, sha("spammer@" + SPAM), "cached before the crash")
    wait_state(spammer, alice, False, t0, what="listed")
    # the write that follows the last change (every marked change goes into it)
    log = srv.log()
    first = log.index("listed %s" % fillers[0], mark)
    last = log.index("listed %s" % sha("spammer@" + SPAM), mark)
    srv.wait_log(r"rtbl: cache: \d+ change\(s\) written", since=last, timeout=5)
    writes = re.findall(r"rtbl: cache: \d+ change\(s\) written", srv.log()[first:])
    assert 1 <= len(writes) <= 2, writes          # five notifications
    for c in (alice, spammer, other):
        c.close()
    srv.proc.kill()
    srv.proc.wait(5)
    srv.terminate()
    # restarted where the service cannot be reached: only the cache can block
    dead = "%s.%d" % (rt.fed.net.base, 250)
    srv.write_config(static_routes=["%s=%s:%d" % (RTBL, dead, free_port(host="127.0.0.1"))])
    mark = srv.mark()
    srv.start()
    try:
        srv.wait_log(r"rtbl: 5 items loaded from the cache", since=mark)
        alice = fed_clients(srv, "alice")
        spammer = fed_clients(rt.prosody, "spammer")
        other = fed_clients(rt.prosody, "other")
        assert not delivered(spammer, alice), "the cached listing did not survive kill -9"
        assert delivered(other, alice)
        for c in (alice, spammer, other):
            c.close()
    finally:
        assert srv.terminate() == 0
        srv.write_config()
    mark = srv.mark()
    srv.start()
    srv.wait_log(r"rtbl: %s/\S+: synchronized" % re.escape(RTBL), since=mark, timeout=20,
                 count=len(NODES))


# ------------------------------------------------------------------ configuration

BAD_SETTINGS = {
    "host-not-served": ('host = "elsewhere.example";', "rtbl.host: 'elsewhere.example' is not"),
    "one-word": ('host = "localhost"; lists = ( "%s" );' % RTBL, "rtbl.lists: "),
    "unknown-kind": ('host = "localhost"; lists = ( "%s %s" );' % (RTBL, CUSTOM_NODE),
                     "say what its item ids are"),
    "bad-kind": ('host = "localhost"; lists = ( "%s x hashes" );' % RTBL,
                 "the kind must be domains, sha256 or ips"),
    "bad-service": ('host = "localhost"; lists = ( "a@b@c %s" );' % JIDS_NODE,
                    "is not a pubsub service's JID"),
    "twice": ('host = "localhost"; lists = ( "%s %s", "%s %s" );'
              % (RTBL, JIDS_NODE, RTBL, JIDS_NODE), "is listed twice"),
    "resync": ('host = "localhost"; resync_interval = 5;', "rtbl.resync_interval"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_settings_are_refused(xmppd_factory, case):
    body, message = BAD_SETTINGS[case]
    srv = xmppd_factory(start=False, users={}, modules=("c2s", "rtbl"),
                        extra="rtbl = { %s };" % body)
    r = subprocess.run([str(XMPPD), "--check-config", str(srv.config_path)],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert message in r.stdout + r.stderr, r.stdout + r.stderr


def test_default_lists_are_xmppbls(xmppd_factory):
    """Nothing set: the four xmppbl.org nodes, subscribed from the first
    served domain.  Without federation the requests fail, are retried later,
    and the server serves on (exit 0)."""
    srv = xmppd_factory(modules=("c2s", "roster", "rtbl"), extra='rtbl = { };')
    deadline = time.monotonic() + 10
    while srv.log().count("xmppbl.org/") < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    log = srv.log()
    for node in ("spam_source_domains", "spam_source_jids_sha256", "muc_bans_sha256",
                 "spam_source_ips"):
        assert re.search(r"rtbl: xmppbl\.org/%s: subscribing failed \(remote-server-not-found"
                         r"[^\n]*retrying in 5 s" % node, log), log[-3000:]
