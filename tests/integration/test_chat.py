"""Messaging between two local users, IQ routing, ping, disco, priorities."""

import re

import pytest
from slixmpp.exceptions import IqError, IqTimeout

from xmpp_helpers import DISCO_INFO_NS, DOMAIN, PING_NS, uniq

ALICE = "alice@localhost"
BOB = "bob@localhost"


@pytest.fixture
def alice_bob(server, clients):
    alice = clients(server, ALICE + "/home").must_login()
    bob = clients(server, BOB + "/phone").must_login()
    alice.send_presence()
    bob.send_presence()
    return alice, bob


@pytest.mark.parametrize("address", ["bare", "full"])
def test_message_and_reply(alice_bob, address):
    alice, bob = alice_bob
    to = BOB if address == "bare" else bob.full_jid
    body = uniq("hello bob")
    alice.send_message(to, body)
    m = bob.wait_message(body)
    assert str(m["from"]) == alice.full_jid, "from=%s, expected alice's full JID %s" % (
        m["from"], alice.full_jid)
    assert m["body"] == body
    assert m["type"] == "chat"
    assert str(m["to"]) in (to, bob.full_jid), "to=%s" % m["to"]

    reply = uniq("hi alice")
    bob.send_message(m["from"], reply)
    r = alice.wait_message(reply)
    assert str(r["from"]) == bob.full_jid
    assert r["body"] == reply


def test_message_body_is_preserved(alice_bob):
    """XML escaping and non-ASCII text survive the round trip."""
    alice, bob = alice_bob
    body = "<b>&amp; \"quotes\" 'apos' \u00e9\u00e8 \u4f60\u597d \U0001F600 " + uniq("")
    alice.send_message(bob.full_jid, body)
    m = bob.wait_message(body)
    assert m["body"] == body


def test_iq_to_absent_full_jid_is_service_unavailable(alice_bob):
    alice, _bob = alice_bob
    with pytest.raises(IqError) as ei:
        alice.iq(BOB + "/nowhere", "<query xmlns='jabber:iq:version'/>")
    err = ei.value.iq
    assert err["type"] == "error"
    assert err["error"]["condition"] == "service-unavailable", str(err)
    assert str(err["from"]) == BOB + "/nowhere", "error from %s" % err["from"]


def test_iq_to_offline_user_full_jid_is_service_unavailable(server, clients):
    alice = clients(server, ALICE + "/home").must_login()
    with pytest.raises(IqError) as ei:
        alice.iq(BOB + "/phone", "<ping xmlns='%s'/>" % PING_NS)
    assert ei.value.iq["error"]["condition"] == "service-unavailable", str(ei.value.iq)


def test_ping_server(server, clients):
    alice = clients(server, ALICE + "/home").must_login()
    try:
        r = alice.ping_server()
    except (IqError, IqTimeout) as e:
        pytest.fail("ping to %s failed: %s" % (DOMAIN, getattr(e, "iq", e)))
    assert r["type"] == "result"
    assert str(r["from"]) in (DOMAIN, ""), "ping result from %s" % r["from"]


def test_ping_own_account_answered_by_the_server(server, clients, raw):
    """RFC 6120 10.3.3: a ping without 'to', or to one's own bare JID, is
    answered by the server (profanity's and xmpp.js's keepalive); another
    user's bare JID is not pinged on its owner's behalf."""
    alice = clients(server, ALICE + "/home").must_login()
    for to in (None, ALICE):
        try:
            r = alice.iq(to, "<ping xmlns='%s'/>" % PING_NS)
        except (IqError, IqTimeout) as e:
            pytest.fail("ping to %r failed: %s" % (to, getattr(e, "iq", e)))
        assert r["type"] == "result", str(r)
    bob = clients(server, BOB + "/desk").must_login()
    with pytest.raises(IqError) as ei:
        bob.iq(ALICE, "<ping xmlns='%s'/>" % PING_NS)
    assert ei.value.iq["error"]["condition"] == "service-unavailable", str(ei.value.iq)

    # the same on a hand-written stream, with the exact bytes
    r = raw(ALICE, "raw")
    r.send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
    out = r.expect(re.compile(rb"<iq\b[^>]*\bid=['\"]p1['\"][^>]*(/>|>.*?</iq>)", re.S),
                   what="ping result")
    assert re.search(rb"type=['\"]result['\"]", out), out
    r.send("<iq type='get' id='p2' to='alice@localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    out = r.expect(re.compile(rb"<iq\b[^>]*\bid=['\"]p2['\"][^>]*(/>|>.*?</iq>)", re.S),
                   what="ping result")
    assert re.search(rb"type=['\"]result['\"]", out), out


def test_disco_info_of_server(server, clients):
    alice = clients(server, ALICE + "/home").must_login()
    try:
        r = alice.disco_info(DOMAIN)
    except (IqError, IqTimeout) as e:
        pytest.fail("disco#info to %s failed: %s" % (DOMAIN, getattr(e, "iq", e)))
    assert r["type"] == "result"
    info = r["disco_info"]
    identities = {(cat, typ) for cat, typ, _lang, _name in info["identities"]}
    assert ("server", "im") in identities, "identities: %s\n%s" % (identities, r)
    assert DISCO_INFO_NS in info["features"] or PING_NS in info["features"], (
        "no features advertised: %s" % r)


def test_bare_jid_message_goes_to_highest_priority(server, clients):
    alice = clients(server, ALICE + "/home").must_login()
    high = clients(server, BOB + "/high").must_login()
    low = clients(server, BOB + "/low").must_login()
    high.send_presence(priority=10)   # each waits for a ping round trip, so the
    low.send_presence(priority=1)     # server has recorded the presence

    body = uniq("to the bare jid")
    alice.send_message(BOB, body)
    m = high.wait_message(body)
    assert str(m["from"]) == alice.full_jid

    # Marker to the low resource's full JID: the server handles alice's stream
    # in order, so once the marker is in, the bare-JID message would be too.
    marker = uniq("marker")
    alice.send_message(low.full_jid, marker)
    got = low.wait_message(marker)
    assert got["body"] == marker
    wrong = [x["body"] for x in getattr(low, "skipped", []) if x["body"] == body]
    assert not wrong, "message to the bare JID was also delivered to the priority-1 resource"

    # and the other way round once priorities swap
    low.send_presence(priority=20)
    body2 = uniq("after swap")
    alice.send_message(BOB, body2)
    m2 = low.wait_message(body2)
    assert str(m2["from"]) == alice.full_jid
