"""mod_offline: XEP-0160 offline messages, seen from real client streams.

Messages of type chat/normal for a user with no available resource of
non-negative priority are stored durably and delivered, in order and with a
XEP-0203 <delay/>, on the next available presence with priority >= 0; they
are then gone.  Headline/groupchat/error and <no-store/> messages are not
stored; quotas bounce with <service-unavailable/>; a committed message
survives kill -9."""

import asyncio
import calendar
import subprocess
import time
from xml.etree import ElementTree as ET

import pytest
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from xmpp_helpers import DOMAIN, USERS, XMPPD, line_of, uniq

ALICE, BOB = "alice@localhost", "bob@localhost"
MODULES = ("c2s", "offline")
NS_CLIENT = "jabber:client"
NS_DELAY = "urn:xmpp:delay"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_OMEMO = "eu.siacs.conversations.axolotl"

# An OMEMO-like payload: no <body/>, only opaque base64 the server must not touch.
OMEMO = ("<encrypted xmlns='%s'><header sid='1234567'>"
         "<key rid='7654321' prekey='true'>MwohBf0Rt+Xn0cW7C1p0/pd+R7z3K3kbN+fEqBkq8yQ=</key>"
         "<iv>Qy1vdXQtb2YtYmFuZA==</iv></header>"
         "<payload>3b7Q+/Ti0rVGvTgDfFs1Z1w/V0r7Zk1dGTxk8c6B5wM=</payload></encrypted>"
         "<store xmlns='urn:xmpp:hints'/>" % NS_OMEMO)
AWKWARD_BODY = "<b>&amp; \"q\" 'a' \u00e9 \u4f60\u597d \U0001F600 ]]> "


@pytest.fixture
def server(xmppd_factory):
    return xmppd_factory(modules=MODULES)


def watch(c):
    """Queue every <message/> the client gets: slixmpp's own 'message' event
    only fires for messages with a <body/>, and OMEMO ones have none."""
    async def setup():
        q = asyncio.Queue()
        c.xmpp.register_handler(Callback("offline-test-messages",
                                         MatchXPath("{%s}message" % NS_CLIENT), q.put_nowait))
        return q
    c.allq = c.lt.run(setup())
    return c


def login(clients, srv, jid, resource, priority=None, presence=True):
    c = watch(clients(srv, "%s/%s" % (jid, resource), USERS[jid]))
    c.must_login()
    if presence:
        c.send_presence(priority=priority)
    return c


def next_message(c, timeout=5.0, what="a message"):
    try:
        return c.lt.run(c.allq.get(), timeout)
    except TimeoutError:
        raise AssertionError("%s: no %s within %.0f s" % (c.jid, what, timeout)) from None


def send_raw(c, to, inner, mtype="chat", ident=None, sync=True):
    """Send <message/> with the given inner XML; returns its id."""
    ident = ident or uniq("m")
    type_attr = " type='%s'" % mtype if mtype else ""
    xml = "<message to='%s' id='%s'%s>%s</message>" % (to, ident, type_attr, inner)
    c.lt.call(lambda: c.xmpp.send_raw(xml))
    if sync:
        c.ping_server()   # the server handles a stream in order: the message is done
    return ident


def body_xml(text):
    return "<body>%s</body>" % (text.replace("&", "&amp;").replace("<", "&lt;")
                                .replace(">", "&gt;"))


def until_marker(c, marker_id, timeout=5.0):
    """Messages received up to (not including) the one with id marker_id."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        m = next_message(c, max(0.1, deadline - time.monotonic()),
                         "marker %s (got before it: %s)" % (marker_id, [str(x) for x in got]))
        if m["id"] == marker_id:
            return got
        got.append(m)


def assert_nothing_pending(sender, receiver):
    """Prove by a marker sent to the receiver's full JID that nothing else
    was queued for it."""
    marker = send_raw(sender, receiver.full_jid, body_xml("marker"))
    extra = until_marker(receiver, marker)
    assert not extra, "%s got unexpected messages: %s" % (receiver.jid, [str(m) for m in extra])


def error_condition(m):
    err = m.xml.find("{%s}error" % NS_CLIENT)
    if err is None:
        return None
    for child in err:
        if child.tag.startswith("{%s}" % NS_STANZAS) and not child.tag.endswith("}text"):
            return child.tag.split("}", 1)[1]
    return None


def delay_of(m):
    d = m.xml.find("{%s}delay" % NS_DELAY)
    assert d is not None, "no XEP-0203 <delay/> on an offline message: %s" % m
    stamp = d.get("stamp")
    assert stamp and stamp.endswith("Z"), "bad stamp %r" % stamp
    when = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    return d.get("from"), when


def shape(el):
    """An element's exact content: name, attributes, text, children (in order)."""
    return (el.tag, sorted(el.attrib.items()), el.text or "",
            [shape(c) + (c.tail or "",) for c in el])


# ------------------------------------------------------------------------ tests

def test_offline_messages_delivered_in_order_with_delay(server, clients):
    alice = login(clients, server, ALICE, "home")
    t0 = time.time()
    sent = [
        send_raw(alice, BOB, body_xml("first " + AWKWARD_BODY), "chat"),
        send_raw(alice, BOB, body_xml("second, type normal"), "normal"),
        send_raw(alice, BOB, body_xml("third, no type"), None),
        send_raw(alice, BOB, OMEMO, "chat"),                       # OMEMO: no body
        send_raw(alice, BOB + "/gone", body_xml("fifth, to an absent full JID"), "chat"),
    ]
    t1 = time.time()
    assert alice.lt.run(_drain(alice), 5) == [], "the sender got something back"

    bob = login(clients, server, BOB, "phone")
    got = [next_message(bob, what="offline message %d" % (i + 1)) for i in range(len(sent))]
    assert [m["id"] for m in got] == sent, "order/ids: %s" % [str(m) for m in got]
    for m in got:
        assert str(m["from"]) == alice.full_jid, str(m)
        frm, when = delay_of(m)
        assert frm == DOMAIN, "delay from %r" % frm
        assert int(t0) - 1 <= when <= t1 + 1, "stamp %s not within [%s, %s]" % (when, t0, t1)
    assert got[0]["body"] == "first " + AWKWARD_BODY
    assert got[1]["type"] == "normal" and got[2]["body"] == "third, no type"
    enc = got[3].xml.find("{%s}encrypted" % NS_OMEMO)
    assert enc is not None, "OMEMO payload lost: %s" % got[3]
    assert got[3].xml.find("{%s}body" % NS_CLIENT) is None
    want = ET.fromstring("<x>%s</x>" % OMEMO).find("{%s}encrypted" % NS_OMEMO)
    assert shape(enc) == shape(want), "OMEMO payload altered:\n%s\n%s" % (
        ET.tostring(enc), ET.tostring(want))
    assert got[4]["body"] == "fifth, to an absent full JID"
    assert_nothing_pending(alice, bob)

    # delivered means deleted: a new login gets nothing
    bob.disconnect()
    bob2 = login(clients, server, BOB, "tablet")
    assert_nothing_pending(alice, bob2)

    # and live messages flow as usual while bob is online (nothing stored)
    live = send_raw(alice, BOB, body_xml("live"))
    m = next_message(bob2)
    assert m["id"] == live and m.xml.find("{%s}delay" % NS_DELAY) is None, str(m)


async def _drain(c):
    out = []
    while not c.allq.empty():
        out.append(str(c.allq.get_nowait()))
    return out


def test_large_backlog_arrives_complete_and_in_order(server, clients):
    """More than one delivery round (by count and by bytes): nothing lost,
    nothing duplicated, order kept."""
    alice = login(clients, server, ALICE, "home")
    # small ones fill a round by count, big ones (8 kB) by bytes
    sent = [send_raw(alice, BOB, body_xml("%d %s" % (i, "p" * (10 if i < 60 else 8000))),
                     sync=False) for i in range(130)]
    alice.ping_server()
    assert alice.lt.run(_drain(alice), 5) == [], "the sender got an error"
    bob = login(clients, server, BOB, "phone")
    got = [next_message(bob, what="backlog message %d" % i)["id"] for i in range(len(sent))]
    assert got == sent
    assert_nothing_pending(alice, bob)


def test_negative_priority_does_not_trigger_delivery(server, clients):
    alice = login(clients, server, ALICE, "home")
    m1 = send_raw(alice, BOB, body_xml("before any bob"))
    neg = login(clients, server, BOB, "neg", priority=-1)
    # stored too: no resource of bob's has priority >= 0 (RFC 6121 8.5.2.1.1)
    m2 = send_raw(alice, BOB, body_xml("while bob is at -1"))
    assert_nothing_pending(alice, neg)
    assert alice.lt.run(_drain(alice), 5) == [], "the sender got an error"

    zero = login(clients, server, BOB, "zero", priority=0)
    got = [next_message(zero)["id"], next_message(zero)["id"]]
    assert got == [m1, m2]
    assert_nothing_pending(alice, zero)
    assert_nothing_pending(alice, neg)


def test_raising_priority_delivers(server, clients):
    alice = login(clients, server, ALICE, "home")
    bob = login(clients, server, BOB, "p", priority=-5)
    m1 = send_raw(alice, BOB, body_xml("stored while at -5"))
    assert_nothing_pending(alice, bob)
    bob.send_presence(priority=3)
    m = next_message(bob)
    assert m["id"] == m1 and m["body"] == "stored while at -5"
    delay_of(m)
    assert_nothing_pending(alice, bob)


def test_available_without_presence_is_offline(server, clients):
    """A bound session that has sent no presence is not available: store."""
    alice = login(clients, server, ALICE, "home")
    bob = login(clients, server, BOB, "quiet", presence=False)
    m1 = send_raw(alice, BOB, body_xml("stored, bob sent no presence"))
    bob.send_presence()
    m = next_message(bob)
    assert m["id"] == m1
    delay_of(m)


def test_headline_groupchat_error_and_no_store_are_not_stored(server, clients):
    alice = login(clients, server, ALICE, "home")
    send_raw(alice, BOB, body_xml("headline"), "headline")
    gc = send_raw(alice, BOB, body_xml("groupchat"), "groupchat")
    send_raw(alice, BOB, "<error type='cancel'><item-not-found xmlns='%s'/></error>" % NS_STANZAS,
             "error")
    ns = send_raw(alice, BOB, body_xml("no-store") + "<no-store xmlns='urn:xmpp:hints'/>")
    kept = send_raw(alice, BOB, body_xml("kept"))

    errors = {}
    for _ in range(2):
        m = next_message(alice, what="error bounce")
        assert m["type"] == "error", "alice got %s" % m
        errors[m["id"]] = error_condition(m)
    assert errors == {gc: "service-unavailable", ns: "service-unavailable"}, errors
    assert alice.lt.run(_drain(alice), 5) == [], "more bounces than expected (headline?)"

    bob = login(clients, server, BOB, "phone")
    m = next_message(bob)
    assert m["id"] == kept, "got %s" % m
    assert_nothing_pending(alice, bob)


def test_unknown_user_is_bounced_not_stored(server, clients):
    alice = login(clients, server, ALICE, "home")
    ident = send_raw(alice, "nobody@localhost", body_xml("to no one"))
    m = next_message(alice, what="bounce for nobody@localhost")
    assert m["id"] == ident and error_condition(m) == "service-unavailable", str(m)


def test_quota_bounces_with_service_unavailable(xmppd_factory, clients):
    srv = xmppd_factory(modules=MODULES, extra="offline = { quota = 3; };\n")
    alice = login(clients, srv, ALICE, "home")
    stored = [send_raw(alice, BOB, body_xml("q%d" % i)) for i in range(3)]
    over = send_raw(alice, BOB, body_xml("over quota"))
    m = next_message(alice, what="quota bounce")
    assert m["id"] == over and m["type"] == "error", str(m)
    assert error_condition(m) == "service-unavailable", str(m)
    assert str(m["from"]) == BOB, "bounce from %s" % m["from"]

    bob = login(clients, srv, BOB, "phone")
    assert [next_message(bob)["id"] for _ in stored] == stored
    assert_nothing_pending(alice, bob)
    bob.disconnect()

    # delivery freed the quota
    again = send_raw(alice, BOB, body_xml("after delivery"))
    assert alice.lt.run(_drain(alice), 5) == [], "bounced although the store was emptied"
    bob2 = login(clients, srv, BOB, "tablet")
    assert next_message(bob2)["id"] == again


def test_oversized_message_is_bounced(xmppd_factory, clients):
    srv = xmppd_factory(modules=MODULES, extra="offline = { max_message_size = 4096; };\n")
    alice = login(clients, srv, ALICE, "home")
    big = send_raw(alice, BOB, body_xml("x" * 5000))
    small = send_raw(alice, BOB, body_xml("small"))
    m = next_message(alice, what="size bounce")
    assert m["id"] == big and error_condition(m) == "service-unavailable", str(m)
    bob = login(clients, srv, BOB, "phone")
    assert next_message(bob)["id"] == small
    assert_nothing_pending(alice, bob)


def test_stored_message_survives_kill_9(xmppd_factory, clients):
    srv = xmppd_factory(modules=MODULES)
    alice = login(clients, srv, ALICE, "home")
    ident = send_raw(alice, BOB, OMEMO)   # the ping after it: the commit is done
    srv.proc.kill()
    srv.proc.wait(10)
    # The killed process is not what the fixture checks: it SIGTERMs the new
    # one at teardown, which must still exit 0 (so no expect_failure here).
    srv._logf.close()
    srv.start()

    bob = login(clients, srv, BOB, "phone")
    m = next_message(bob, what="the message stored before kill -9")
    assert m["id"] == ident
    enc = m.xml.find("{%s}encrypted" % NS_OMEMO)
    want = ET.fromstring("<x>%s</x>" % OMEMO).find("{%s}encrypted" % NS_OMEMO)
    assert enc is not None and shape(enc) == shape(want), str(m)
    delay_of(m)


def test_corrupt_record_is_kept_not_lost(xmppd_factory, clients):
    """A stored record that no longer parses is logged and kept (never
    dropped silently); the messages after it still arrive."""
    srv = xmppd_factory(modules=MODULES)
    alice = login(clients, srv, ALICE, "home")
    send_raw(alice, BOB, body_xml("will be corrupted"))     # sequence 0
    good = send_raw(alice, BOB, body_xml("intact"))         # sequence 1
    assert srv.terminate() == 0
    # overwrite record 0 (key "bob@localhost" NUL + 8-byte sequence 0) with
    # a valid header and text that is not XML
    key = "bob@localhost" + "\\00" * 9
    val = "\\01" + "\\00" * 8 + "<message><unclosed"
    r = subprocess.run(["db5.3_load", "-T", "-t", "btree", "-h", str(srv.data_dir), "offline.db"],
                       input="%s\n%s\n" % (key, val), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=20)
    assert r.returncode == 0, r.stdout
    srv.returncode = None   # let the fixture check the restarted process
    srv.start()

    alice = login(clients, srv, ALICE, "home2")
    for resource in ("phone", "tablet"):
        bob = login(clients, srv, BOB, resource)
        if resource == "phone":
            assert next_message(bob)["id"] == good
        assert_nothing_pending(alice, bob)
        bob.disconnect()
    assert srv.log().count("stored message 0 is unreadable; kept") == 2, srv.log_tail(40)
    assert srv.terminate() == 0
    r = subprocess.run(["db5.3_dump", "-p", "-h", str(srv.data_dir), "offline.db"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=20)
    assert r.returncode == 0 and "<message><unclosed" in r.stdout, r.stdout


def test_disco_advertises_msgoffline(server, clients):
    alice = login(clients, server, ALICE, "home")
    info = alice.disco_info(DOMAIN)["disco_info"]
    assert "msgoffline" in info["features"], info["features"]


def test_check_config(xmppd_factory):
    good = xmppd_factory(modules=MODULES, start=False, users={},
                         extra="offline = { quota = 10; };\n")
    r = subprocess.run([str(XMPPD), "--check-config", str(good.config_path)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr

    bad = xmppd_factory(name="bad", modules=MODULES, start=False, users={},
                        extra="offline = {\n    quota = -1;\n};\n")
    r = subprocess.run([str(XMPPD), "--check-config", str(bad.config_path)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=20)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "quota" in out and ":%d" % line_of(bad.config, "quota = -1") in out, out


def test_messages_not_confirmed_by_a_dead_reader_are_kept(server, clients):
    """A client that logs in, stalls and vanishes mid-backlog loses nothing:
    a round is deleted only once the client answered the ping after it."""
    import socket
    from xmpp_helpers import RawStream

    alice = login(clients, server, ALICE, "home")
    sent = [send_raw(alice, BOB, body_xml("%d %s" % (i, "z" * 60000)), sync=False)
            for i in range(40)]
    alice.ping_server()
    stalled = RawStream(server)
    stalled.login(BOB, USERS[BOB], "stalled")
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.send("<presence/>")
    time.sleep(1.5)                      # reads nothing, answers no ping
    stalled.sock.close()
    bob = login(clients, server, BOB, "phone")
    got = [next_message(bob, what="message %d" % i)["id"] for i in range(len(sent))]
    assert sorted(got) == sorted(sent)
    assert_nothing_pending(alice, bob)


def test_stored_message_keeps_xml_lang(server, clients):
    """xml:lang on the stanza and on each <body/> survives storage (the
    stored text is parsed back with the stream parser, not libstrophe's,
    which turns xml:lang into a plain 'lang')."""
    alice = login(clients, server, ALICE, "home")
    ident = uniq("lang")
    xml = ("<message to='%s' id='%s' type='chat' xml:lang='de'><body>Guten Tag</body>"
           "<body xml:lang='fr'>Bonjour</body></message>" % (BOB, ident))
    alice.lt.call(lambda: alice.xmpp.send_raw(xml))
    alice.ping_server()
    bob = login(clients, server, BOB, "phone")
    m = next_message(bob, what="the offline message")
    assert m["id"] == ident, str(m)
    xml_ns = "{http://www.w3.org/XML/1998/namespace}lang"
    assert m.xml.get(xml_ns) == "de", "stanza xml:lang lost: %s" % m
    langs = [b.get(xml_ns) for b in m.xml.findall("{%s}body" % NS_CLIENT)]
    assert "fr" in langs, "body xml:lang lost: %s" % m
    assert not [k for k in m.xml.attrib if k == "lang"], "xml:lang became 'lang': %s" % m
