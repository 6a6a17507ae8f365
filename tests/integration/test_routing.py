"""RFC 6120/6121 routing rules seen from raw client streams: resource
conflicts, bounces (nothing is dropped silently), presence to the user's own
resources, stanzas before binding, and 'to' addresses that cannot be used."""

import re

import pytest

from xmpp_helpers import USERS

ALICE, BOB = "alice@localhost", "bob@localhost"


def stanza(r, name, ident, what=None):
    """Read the <name .../> stanza whose id is ident."""
    return r.expect(re.compile(rb"<%s\b[^>]*\bid=[\"']%s[\"'][^>]*?(?:/>|(?<!/)>.*?</%s>)"
                               % (name.encode(), ident.encode(), name.encode()), re.S),
                    what=what or "%s id=%s" % (name, ident))


def error_condition(xml):
    m = re.search(rb"<error\b[^>]*>\s*<([a-z-]+)\b[^>]*urn:ietf:params:xml:ns:xmpp-stanzas", xml)
    return m.group(1).decode() if m else None


def test_resource_conflict_replaces_older_session(raw):
    old = raw(ALICE, "desk")
    new = raw(ALICE, "desk")
    assert old.full == new.full == "alice@localhost/desk"
    old.expect_stream_error("conflict")
    # The newer session is the one that receives.
    bob = raw(BOB, "b")
    bob.send("<message to='alice@localhost/desk' id='c1' type='chat'><body>hi</body></message>")
    got = stanza(new, "message", "c1")
    assert b"from=\"bob@localhost/b\"" in got or b"from='bob@localhost/b'" in got


def test_server_generated_resource(raw):
    r = raw()
    r.open_stream()
    r.starttls()
    r.open_stream()
    assert r.auth_scram("alice", USERS[ALICE])
    r.open_stream()
    r.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    out = stanza(r, "iq", "b")
    m = re.search(rb"<jid>alice@localhost/([^<]+)</jid>", out)
    assert m and m.group(1), out


@pytest.mark.parametrize("target", ["bob@localhost", "bob@localhost/gone"])
def test_message_to_offline_user_is_bounced(raw, target):
    alice = raw(ALICE, "a")
    alice.send("<message to='%s' id='off1' type='chat'><body>x</body></message>" % target)
    err = stanza(alice, "message", "off1", "the bounce")
    assert b"type=\"error\"" in err or b"type='error'" in err, err
    assert error_condition(err) == "service-unavailable", err


def test_message_to_unknown_user_and_remote_domain_bounced(raw):
    alice = raw(ALICE, "a")
    alice.send("<message to='nobody@localhost' id='u1'><body>x</body></message>")
    assert error_condition(stanza(alice, "message", "u1")) == "service-unavailable"
    alice.send("<message to='someone@remote.example' id='r1'><body>x</body></message>")
    assert error_condition(stanza(alice, "message", "r1")) == "remote-server-not-found"


def test_malformed_to_gets_jid_malformed(raw):
    alice = raw(ALICE, "a")
    alice.send("<message to='a@b@c/' id='j1'><body>x</body></message>")
    assert error_condition(stanza(alice, "message", "j1")) == "jid-malformed"
    alice.send("<iq to='@localhost' type='get' id='j2'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert error_condition(stanza(alice, "iq", "j2")) == "jid-malformed"


def test_errors_are_not_answered_with_errors(raw):
    alice = raw(ALICE, "a")
    alice.send("<message to='nobody@localhost' id='e1' type='error'><body>x</body></message>")
    alice.send("<iq to='bob@localhost/none' type='result' id='e2'/>")
    # Nothing comes back for those two; the ping after them proves the order.
    alice.send("<iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    out = stanza(alice, "iq", "p1")
    assert b"e1" not in out and b"e2" not in out, out


def test_presence_reaches_own_resources(raw):
    one = raw(ALICE, "one")
    one.send("<presence><priority>5</priority></presence>")
    stanza_re = re.compile(rb"<presence\b[^>]*from=[\"']alice@localhost/one[\"']", re.S)
    one.expect(stanza_re, what="own presence echoed")
    two = raw(ALICE, "two")
    two.send("<presence/>")
    one.expect(re.compile(rb"<presence\b[^>]*from=[\"']alice@localhost/two[\"']"),
               what="presence of the second resource")
    two.close()
    one.expect(re.compile(rb"<presence\b[^>]*(from=[\"']alice@localhost/two[\"'][^>]*"
                          rb"type=[\"']unavailable[\"']|type=[\"']unavailable[\"'][^>]*"
                          rb"from=[\"']alice@localhost/two[\"'])"),
               what="unavailable presence when the second resource went away")


def test_stanza_before_bind_is_refused(raw):
    r = raw()
    r.open_stream()
    r.starttls()
    r.open_stream()
    assert r.auth_scram("alice", USERS[ALICE])
    r.open_stream()
    r.send("<message to='bob@localhost' id='early'><body>x</body></message>")
    r.expect_stream_error("not-authorized")


def test_sender_cannot_forge_from(raw):
    alice = raw(ALICE, "a")
    bob = raw(BOB, "b")
    alice.send("<message from='bob@localhost/b' to='bob@localhost/b' id='f1'><body>x</body>"
               "</message>")
    got = stanza(bob, "message", "f1")
    assert re.search(rb"from=[\"']alice@localhost/a[\"']", got), got


@pytest.mark.parametrize("after", ["starttls", "sasl"])
def test_error_after_restart_comes_with_a_new_header(raw, after):
    """RFC 6120 4.9.1.1: a stream error on the restarted stream is preceded by
    that stream's header, even when the peer never sent its own."""
    r = raw()
    r.open_stream()
    r.starttls()
    if after == "sasl":
        r.open_stream()
        assert r.auth_scram("alice", USERS[ALICE])
    r.send("<foo/>")
    cond, data = r.expect_stream_error(("invalid-namespace", "not-well-formed"))
    assert re.search(rb"<stream:stream\b[^>]*>.*<stream:error>", data, re.S), data
