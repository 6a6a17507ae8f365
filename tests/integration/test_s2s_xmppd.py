"""
xmppd in the federation: real Prosody and ejabberd peers, a second xmppd,
the real DNS path (dnsmasq SRV + A records), certificate-only s2s; and every
refusal: self-signed peer, a certificate for another domain, dialback, a
spoofed 'from', a stanza before authentication, an unreachable domain.

Run: /usr/bin/python3 -m pytest -q tests/integration/test_s2s_xmppd.py
"""

import queue
import re
import socket
import ssl
import subprocess
import time

import pytest

from federation import (EVIL, PEER_USERS, UNREACHABLE, XMPPD_A, XMPPD_B, ProsodyPeer, RawS2S,
                        XmppdPeer)
from xmpp_helpers import SASL_NS, STREAM_NS, TLS_NS

pytest_plugins = ["federation"]


@pytest.fixture(scope="session")
def xmppd_a(federation):
    return XmppdPeer(federation, XMPPD_A).launch()


@pytest.fixture(scope="session")
def xmppd_b(federation):
    return XmppdPeer(federation, XMPPD_B).launch()


def converse(fed_clients, here, there, tag):
    """A message each way between alice@here and bob@there; both arrive with
    the sender's full JID and the body intact."""
    a = fed_clients(here, "alice")
    b = fed_clients(there, "bob")
    body = "%s: hello from %s" % (tag, here.domain)
    a.send_message(b.bare_jid, body)
    m = b.wait_message(body, timeout=15)
    assert str(m["from"]) == a.full_jid
    body = "%s: hello back from %s" % (tag, there.domain)
    b.send_message(a.full_jid, body)
    m = a.wait_message(body, timeout=15)
    assert str(m["from"]) == b.full_jid
    return a, b


def assert_ping(client, jid):
    r = client.ping(jid, timeout=15)
    assert r["type"] == "result", str(r)


# ---------------------------------------------------------------- federating

def test_xmppd_and_prosody(xmppd_a, prosody_peer, fed_clients):
    a, p = converse(fed_clients, xmppd_a, prosody_peer, "prosody")
    assert_ping(a, prosody_peer.domain)
    assert_ping(p, xmppd_a.domain)
    # Both directions were authenticated with certificates, not dialback.
    xmppd_a.wait_log(r"server prosody\.test authenticated \(SASL EXTERNAL\)")
    xmppd_a.wait_log(r"xmppd-a\.test -> prosody\.test: stream authenticated")
    assert "SASL EXTERNAL with %s succeeded" % XMPPD_A in prosody_peer.log()


def test_xmppd_and_ejabberd(xmppd_a, ejabberd_peer, fed_clients):
    a, e = converse(fed_clients, xmppd_a, ejabberd_peer, "ejabberd")
    assert_ping(a, ejabberd_peer.domain)
    assert_ping(e, xmppd_a.domain)
    xmppd_a.wait_log(r"server ejabberd\.test authenticated \(SASL EXTERNAL\)")
    assert re.search(r"Accepted inbound s2s EXTERNAL authentication xmppd-a\.test",
                     ejabberd_peer.log()), ejabberd_peer.log_tail(40)


def test_two_xmppd(xmppd_a, xmppd_b, fed_clients):
    a, b = converse(fed_clients, xmppd_a, xmppd_b, "xmppd")
    assert_ping(a, xmppd_b.domain)
    d = a.disco(xmppd_b.domain)
    assert d["type"] == "result"


def test_the_real_dns_path_was_used(federation, xmppd_a, xmppd_b, fed_clients):
    converse(fed_clients, xmppd_b, xmppd_a, "dns")
    names = {name for (_t, name, _src) in federation.dns.queries()}
    assert "_xmpp-server._tcp.%s" % XMPPD_A in names, names


def test_unreachable_domain_bounces_and_server_keeps_working(xmppd_a, xmppd_b, fed_clients):
    a = fed_clients(xmppd_a, "alice")
    errors = queue.Queue()
    a.lt.call(lambda: a.xmpp.add_event_handler("message_error", errors.put))
    a.send_message("someone@%s" % UNREACHABLE, "into the void")
    m = errors.get(timeout=20)
    assert str(m["from"]) == "someone@" + UNREACHABLE, str(m)
    assert m["error"]["condition"] in ("remote-server-not-found", "remote-server-timeout"), str(m)
    xmppd_a.wait_log(r"xmppd-a\.test -> unreachable\.test: remote-server-(not-found|timeout)")
    # And the federation still works.
    converse(fed_clients, xmppd_a, xmppd_b, "after-unreachable")


# ---------------------------------------------------------------- refusals

def evil_prosody_message(federation, fed_clients, xmppd_a, cert):
    """A Prosody for evil.test presenting `cert` tries to message alice@xmppd-a."""
    evil = ProsodyPeer(federation, domain=EVIL, cert=cert, c2s_cert="good")
    federation.add_peer(evil, PEER_USERS)
    try:
        mark = len(xmppd_a.log())
        victim = fed_clients(xmppd_a, "alice")
        sender = fed_clients(evil, "bob")
        sender.send_message(victim.bare_jid, "evil-" + cert)
        xmppd_a.wait_log(r"refusing evil\.test: certificate not accepted", timeout=15, since=mark)
        time.sleep(1)
        assert not any(m["body"] == "evil-" + cert for m in victim.drain_messages())
    finally:
        federation.stop_peer(evil)


def test_self_signed_peer_refused(federation, fed_clients, xmppd_a):
    evil_prosody_message(federation, fed_clients, xmppd_a, "selfsigned")


def test_peer_with_certificate_for_another_domain_refused(federation, fed_clients, xmppd_a):
    evil_prosody_message(federation, fed_clients, xmppd_a, "wrong")


def test_dialback_refused(federation, xmppd_a):
    raw = RawS2S(federation, xmppd_a)
    try:
        mark = len(xmppd_a.log())
        raw.starttls()
        raw.send("<db:result from='%s' to='%s'>deadbeef</db:result>" % (EVIL, XMPPD_A))
        raw.expect(r"<db:result[^>]*type=['\"]error['\"]")
        raw.expect_stream_error(("policy-violation",))
        xmppd_a.wait_log(r"tried dialback \(db:result from evil\.test\); refused", since=mark)
    finally:
        raw.close()


def test_spoofed_from_refused(federation, xmppd_a, fed_clients):
    victim = fed_clients(xmppd_a, "alice")
    raw = RawS2S(federation, xmppd_a)
    try:
        mark = len(xmppd_a.log())
        raw.authenticate()
        raw.send("<message from='mallory@prosody.test/x' to='%s' id='spoof'>"
                 "<body>spoofed</body></message>" % victim.bare_jid)
        raw.expect_stream_error(("invalid-from",))
        xmppd_a.wait_log(r"authenticated as evil\.test\) sent a stanza from prosody\.test: "
                         r"spoofed", since=mark)
        time.sleep(0.5)
        assert not any(m["body"] == "spoofed" for m in victim.drain_messages())
    finally:
        raw.close()


def test_authenticated_peer_stanza_is_delivered(federation, xmppd_a, fed_clients):
    """The control for the spoofing test: the same raw peer, honest."""
    victim = fed_clients(xmppd_a, "alice")
    raw = RawS2S(federation, xmppd_a)
    try:
        raw.authenticate()
        raw.send("<message from='mallory@evil.test/x' to='%s' id='honest' type='chat'>"
                 "<body>honest</body></message>" % victim.full_jid)
        m = victim.wait_message("honest", timeout=10)
        assert str(m["from"]) == "mallory@evil.test/x"
    finally:
        raw.close()


def test_stanza_before_authentication_refused(federation, xmppd_a, fed_clients):
    victim = fed_clients(xmppd_a, "alice")
    raw = RawS2S(federation, xmppd_a)
    try:
        raw.starttls()
        raw.send("<message from='mallory@evil.test' to='%s'><body>early</body></message>"
                 % victim.bare_jid)
        raw.expect_stream_error(("not-authorized",))
        time.sleep(0.5)
        assert not any(m["body"] == "early" for m in victim.drain_messages())
    finally:
        raw.close()


def test_stanza_before_starttls_refused(federation, xmppd_a):
    raw = RawS2S(federation, xmppd_a)
    try:
        raw.header()
        raw.send("<message from='mallory@evil.test' to='alice@%s'><body>clear</body></message>"
                 % XMPPD_A)
        raw.expect_stream_error(("policy-violation",))
    finally:
        raw.close()


# ---------------------------------------------------------------- queueing, timeouts, idle

class Blackhole:
    """Accepts TCP connections and never says a word."""

    def __init__(self, host):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]

    def close(self):
        self.sock.close()


class Liar:
    """A fake peer for liar.test: STARTTLS with a self-signed certificate, then
    it claims SASL success without being asked.  Records what it receives."""

    def __init__(self, federation, host):
        import threading
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(4)
        self.sock.settimeout(20)
        self.port = self.sock.getsockname()[1]
        self.received = b""
        c = federation.certs[EVIL]
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(c.selfsigned_cert, c.key)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        hdr = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
               "xmlns:stream='%s' from='liar.test' id='x' version='1.0'>" % STREAM_NS)
        try:
            conn, _ = self.sock.accept()
            conn.settimeout(10)
            conn.recv(4096)
            conn.sendall((hdr + "<stream:features><starttls xmlns='%s'><required/></starttls>"
                          "</stream:features>" % TLS_NS).encode())
            conn.recv(4096)
            conn.sendall(("<proceed xmlns='%s'/>" % TLS_NS).encode())
            tls = self.ctx.wrap_socket(conn, server_side=True)
            tls.recv(4096)
            tls.sendall((hdr + "<success xmlns='%s'/>" % SASL_NS).encode())
            tls.sendall((hdr + "<stream:features/>").encode())
            while True:
                d = tls.recv(65536)
                if not d:
                    break
                self.received += d
        except (OSError, ssl.SSLError):
            pass

    def close(self):
        self.sock.close()


@pytest.fixture
def xmppd_evil(federation, xmppd_b):
    """A short-lived xmppd for evil.test (a valid CA-signed domain here) with a
    1 s idle timeout, a 2 s connect timeout and a static route to a black hole."""
    hole = Blackhole(federation.net.addr(EVIL))
    liar = Liar(federation, federation.net.addr(EVIL))
    srv = XmppdPeer(federation, EVIL, connect_timeout=2, s2s_options="idle_timeout = 1;",
                    static_routes=("blackhole.test=%s:%d" % (federation.net.addr(EVIL), hole.port),
                                   "liar.test=%s:%d" % (federation.net.addr(EVIL), liar.port)))
    srv.liar = liar
    srv.launch(attach=False)
    yield srv
    rc = srv.terminate()
    hole.close()
    liar.close()
    assert rc == 0, srv.log_tail()


def test_queued_stanzas_flow_in_order(xmppd_evil, xmppd_b, fed_clients):
    e = fed_clients(xmppd_evil, "alice")
    b = fed_clients(xmppd_b, "bob")
    bodies = ["in-order-%02d" % i for i in range(20)]
    for body in bodies:          # all sent before the stream to xmppd-b is up
        e.send_message(b.full_jid, body)
    got = [b.wait_message(timeout=15)["body"] for _ in bodies]
    assert got == bodies
    xmppd_evil.wait_log(r"evil\.test -> xmppd-b\.test: stream authenticated; sending \d+ queued")


def test_idle_stream_closes_and_reopens(xmppd_evil, xmppd_b, fed_clients):
    e = fed_clients(xmppd_evil, "alice")
    b = fed_clients(xmppd_b, "bob")
    e.send_message(b.full_jid, "before idle")
    b.wait_message("before idle", timeout=15)
    xmppd_evil.wait_log(r"evil\.test -> xmppd-b\.test: idle; closing", timeout=15)
    e.send_message(b.full_jid, "after idle")
    b.wait_message("after idle", timeout=15)
    assert len(re.findall(r"evil\.test -> xmppd-b\.test: stream authenticated",
                          xmppd_evil.log())) >= 2


def test_peer_that_never_answers_times_out(xmppd_evil, fed_clients):
    e = fed_clients(xmppd_evil, "alice")
    errors = queue.Queue()
    e.lt.call(lambda: e.xmpp.add_event_handler("message_error", errors.put))
    t0 = time.monotonic()
    e.send_message("someone@blackhole.test", "hello?")
    m = errors.get(timeout=15)
    assert m["error"]["condition"] == "remote-server-timeout", str(m)
    assert time.monotonic() - t0 >= 1.5   # the configured 2 s, not an instant failure
    # the server is fine: a ping still answers
    assert e.ping_server()["type"] == "result"


def ca_signed(federation, tmp_path, template):
    """A certificate for evil.test's key, signed by the test CA, from a certtool template."""
    tmpl = tmp_path / "leaf.tmpl"
    tmpl.write_text(template)
    cert = tmp_path / "leaf.pem"
    key = federation.certs[EVIL].key
    subprocess.run(["certtool", "--generate-certificate", "--load-privkey", key,
                    "--load-ca-certificate", federation.certs.ca,
                    "--load-ca-privkey", federation.certs.ca_key,
                    "--template", str(tmpl), "--outfile", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), key


@pytest.mark.parametrize("ident,accepted", [
    ('xmpp_name = "evil.test"\n', True),            # XmppAddr only (RFC 6120 13.7.1.4)
    ('dns_name = "*.evil.test"\n', False),          # a wildcard does not cover the parent
    ('cn = "evil.test"\ndns_name = "other.test"\n', False),  # CN is ignored beside a DNS-ID
    ('cn = "evil.test"\n', False),                  # ... and without one (RFC 6125 6.4.4)
    ('cn = "evil.test"\nxmpp_name = "other.test"\n', False),
])
def test_certificate_identities(federation, xmppd_a, tmp_path, ident, accepted):
    template = ('serial = 4242\nexpiration_days = 3\ntls_www_server\ntls_www_client\n'
                'signing_key\nencryption_key\n' + ident)
    if "cn =" not in ident:
        template = 'cn = "test leaf"\n' + template
    cert, key = ca_signed(federation, tmp_path, template)
    raw = RawS2S(federation, xmppd_a, cert=cert, key=key)
    try:
        if accepted:
            raw.authenticate()
        else:
            raw.send("")  # TLS and then the refusal
            with pytest.raises(AssertionError):
                raw.authenticate()
            xmppd_a.wait_log(r"refusing evil\.test: certificate not accepted: "
                             r"the certificate does not name evil\.test")
    finally:
        raw.close()


def test_unrequested_sasl_success_is_not_trusted(xmppd_evil, fed_clients):
    e = fed_clients(xmppd_evil, "alice")
    errors = queue.Queue()
    e.lt.call(lambda: e.xmpp.add_event_handler("message_error", errors.put))
    e.send_message("bob@liar.test", "secret for liar.test")
    m = errors.get(timeout=15)
    assert m["error"]["condition"] == "remote-server-not-found", str(m)
    xmppd_evil.wait_log(r"SASL success without our <auth/>|claimed success before its "
                        r"certificate was verified|certificate")
    assert b"secret" not in xmppd_evil.liar.received
    assert b"<message" not in xmppd_evil.liar.received


def test_subscription_and_presence_across_federation(xmppd_a, prosody_peer, fed_clients):
    """RFC 6121 with a remote contact: the handshake reaches 'both' on our side
    (Prosody's slixmpp user auto-approves and subscribes back), and presence
    flows both ways."""
    a = fed_clients(xmppd_a, "bob")
    p = fed_clients(prosody_peer, "bob")
    a.lt.call(lambda: a.xmpp.send_presence(pto=p.bare_jid, ptype="subscribe"))
    deadline = time.monotonic() + 20
    sub = None
    while time.monotonic() < deadline:
        r = a.iq(None, "<query xmlns='jabber:iq:roster'/>")
        items = {str(j): d["subscription"] for j, d in r["roster"]["items"].items()}
        sub = items.get(p.bare_jid)
        if sub == "both":
            break
        time.sleep(0.3)
    assert sub == "both", (sub, str(r))
    # presence: bob@prosody goes away and comes back; our bob sees it
    got = queue.Queue()
    a.lt.call(lambda: a.xmpp.add_event_handler("presence_available", got.put))
    p.lt.call(lambda: p.xmpp.send_presence(pstatus="back again"))
    deadline = time.monotonic() + 15
    while True:
        pres = got.get(timeout=max(0.1, deadline - time.monotonic()))
        if str(pres["from"]).startswith(p.bare_jid) and pres["status"] == "back again":
            break
