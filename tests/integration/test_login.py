"""Client login: STARTTLS and direct TLS, each SASL mechanism, bad passwords, IPv6."""

import re
import time

import pytest

from xmpp_helpers import USERS, RawStream

ALICE = "alice@localhost"


def _check_session(c, transport, mech):
    assert c.is_tls, "session is not over TLS: " + c.describe()
    if transport in ("starttls", "ipv6"):
        assert c.had("tls_success"), "STARTTLS did not happen: " + c.describe()
    else:
        assert not c.had("tls_success"), "direct TLS stream also did STARTTLS: " + c.describe()
    assert c.used_mech == mech, "expected SASL %s, used %s: %s" % (mech, c.used_mech, c.describe())
    bound = c.xmpp.boundjid
    assert bound.bare == ALICE, "bound JID %s" % bound.full
    assert bound.resource, "no resource bound: %s" % bound.full
    # the session is usable: the server answers a ping
    r = c.ping_server()
    assert r["type"] == "result", str(r)


@pytest.mark.parametrize("transport", ["starttls", "direct"])
@pytest.mark.parametrize("mech", [None, "SCRAM-SHA-1", "PLAIN"],
                         ids=["SCRAM-SHA-256-default", "SCRAM-SHA-1", "PLAIN"])
def test_login(server, clients, transport, mech):
    c = clients(server, ALICE + "/login", transport=transport, mech=mech)
    result = c.login()
    assert result == "session", "login over %s with %s failed (%s): %s" % (
        transport, mech or "default mechanism", result, c.describe())
    _check_session(c, transport, mech or "SCRAM-SHA-256")


@pytest.mark.parametrize("mech", [None, "PLAIN"], ids=["SCRAM-SHA-256", "PLAIN"])
@pytest.mark.parametrize("who", ["wrong-password", "unknown-user"])
def test_bad_credentials_refused(server, clients, mech, who):
    if who == "wrong-password":
        c = clients(server, ALICE + "/bad", "not-" + USERS[ALICE], mech=mech)
    else:
        c = clients(server, "nobody@localhost/bad", "whatever", mech=mech)
    result = c.login()
    assert result in ("failed", "disconnected"), "expected refusal, got %s: %s" % (
        result, c.describe())
    assert not c.had("auth_success"), "SASL success for bad credentials: " + c.describe()
    assert not c.had("session_start"), "session for bad credentials: " + c.describe()
    assert c.failures, "no SASL <failure/> received: " + c.describe()
    assert c.failures[0] == "not-authorized", "SASL failure condition %r (expected "\
        "not-authorized): %s" % (c.failures[0], c.describe())


def test_right_password_after_refusal_still_works(server, clients):
    bad = clients(server, ALICE + "/bad", "nope", mech="PLAIN")
    assert bad.login() in ("failed", "disconnected")
    bad.close()
    good = clients(server, ALICE + "/good")
    assert good.login() == "session", good.describe()


def test_failed_logins_are_delayed(server):
    """Two wrong PLAIN attempts on one stream take about a second or more
    (whether the server delays the <failure/> or the next attempt), and the
    right password then still works on the same stream."""
    r = RawStream(server)
    try:
        r.open_stream()
        r.starttls()
        r.open_stream()
        t0 = time.monotonic()
        assert not r.auth_plain("alice", "wrong-1"), r.dump()
        assert not r.auth_plain("alice", "wrong-2"), r.dump()
        elapsed = time.monotonic() - t0
        assert elapsed >= 0.8, "two failed logins took only %.3f s: no delay" % elapsed
        assert r.auth_scram("alice", USERS[ALICE]), "right password refused after failures:\n" \
            + r.dump()
        r.open_stream()
        assert r.bind("after-failures").startswith(ALICE + "/")
    finally:
        r.close()


def test_ipv6_listener(xmppd_factory, clients):
    srv = xmppd_factory(ipv6=True)
    c = clients(srv, ALICE + "/v6", transport="ipv6")
    result = c.login()
    assert result == "session", "login over [::1]:%d failed (%s): %s" % (
        srv.ipv6_port, result, c.describe())
    peer = c.xmpp.transport.get_extra_info("peername")
    assert peer and peer[0] == "::1", "not connected over IPv6: %r" % (peer,)
    _check_session(c, "ipv6", "SCRAM-SHA-256")


@pytest.mark.parametrize("mech", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_repeated_logins_all_succeed(server, mech):
    """The right password works every time (25 fresh streams), not just mostly."""
    refused = []
    for i in range(25):
        r = RawStream(server)
        try:
            r.open_stream()
            r.starttls()
            r.open_stream()
            if mech == "PLAIN":
                ok = r.auth_plain("alice", USERS[ALICE])
            else:
                ok = r.auth_scram("alice", USERS[ALICE], "sha1" if mech == "SCRAM-SHA-1" else "sha256")
            if not ok:
                refused.append(i)
        finally:
            r.close()
    assert not refused, "%s refused the right password in attempts %s of 25" % (mech, refused)


@pytest.mark.parametrize("between", [b"\n", b"\r\n  \t", b""])
def test_whitespace_after_auth_then_xml_declaration(server, between):
    """go-sendxmpp's bytes: direct TLS, PLAIN with "</auth>\\n" in one write,
    then after <success/> an XML declaration and the new header.  The white
    space belongs between the two documents; the login goes through."""
    import base64
    r = RawStream(server, direct=True)
    try:
        r.open_stream()
        token = base64.b64encode(b"\0alice\0" + USERS[ALICE].encode()).decode()
        r.send(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
               + token.encode() + b"</auth>" + between)
        r.expect(re.compile(rb"<success\b[^>]*(/>|>[^<]*</success>)"), what="<success/>")
        feats = r.open_stream()      # "<?xml version='1.0'?><stream:stream ...>"
        assert b"bind" in feats, feats
        assert r.bind("sendxmpp").startswith(ALICE + "/")
    finally:
        r.close()
