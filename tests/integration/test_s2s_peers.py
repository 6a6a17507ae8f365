"""
Proof of the federation harness (federation.py): a real Prosody and a real
ejabberd federate with each other over loopback, found through the test
dnsmasq (SRV + A), TLS with certificates from the test CA, s2s authenticated
with SASL EXTERNAL only (dialback is not loaded on either side).

Run:  /usr/bin/python3 -m pytest -q tests/integration/test_s2s_peers.py
"""

import os
import re
import socket
import struct

import pytest

from federation import (DOMAINS, EJABBERD, EVIL, PEER_USERS, PROSODY, UNREACHABLE, XMPPD_A,
                        ProsodyPeer, uniq)

pytest_plugins = ["federation"]

PING_NS = "urn:xmpp:ping"
DISCO_INFO_NS = "http://jabber.org/protocol/disco#info"


# ------------------------------------------------------------- a tiny DNS client

def dns_query(server, name, qtype, tcp=False, source=None, timeout=3.0):
    """(rcode, [answer rdata bytes]) for one question, over UDP or TCP, sent
    from source (an address of ours, so dnsmasq's log tells us from the peers)."""
    qid = 0x4242
    msg = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    msg += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    msg += struct.pack(">HH", qtype, 1)
    if tcp:
        with socket.create_connection((server, 53), timeout=timeout,
                                      source_address=(source, 0) if source else None) as s:
            s.sendall(struct.pack(">H", len(msg)) + msg)
            data = b""
            while len(data) < 2 or len(data) < 2 + struct.unpack(">H", data[:2])[0]:
                chunk = s.recv(4096)
                assert chunk, "DNS over TCP: connection closed early"
                data += chunk
            data = data[2:]
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            if source:
                s.bind((source, 0))
            s.sendto(msg, (server, 53))
            data = s.recv(4096)
    assert struct.unpack(">H", data[:2])[0] == qid
    rcode = data[3] & 0x0F
    ancount = struct.unpack(">H", data[6:8])[0]
    pos = 12
    while data[pos]:                      # skip the question name
        pos += 1 + data[pos]
    pos += 5
    answers = []
    for _ in range(ancount):
        if data[pos] & 0xC0 == 0xC0:
            pos += 2
        else:
            while data[pos]:
                pos += 1 + data[pos]
            pos += 1
        rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", data[pos:pos + 10])
        pos += 10
        if rtype == qtype:
            answers.append(data[pos:pos + rdlen])
        pos += rdlen
    return rcode, answers


def srv_decode(rdata):
    prio, weight, port = struct.unpack(">HHH", rdata[:6])
    labels, pos = [], 6
    while rdata[pos]:
        labels.append(rdata[pos + 1:pos + 1 + rdata[pos]].decode())
        pos += 1 + rdata[pos]
    return prio, weight, port, ".".join(labels)


def test_dns_serves_the_test_domains(federation):
    net = federation.net

    def dns_query(*a, **kw):
        return globals()["dns_query"](*a, source=net.client_addr, **kw)
    for tcp in (False, True):
        for d in DOMAINS:
            rcode, ans = dns_query(net.dns_addr, "_xmpp-server._tcp." + d, 33, tcp=tcp)
            assert rcode == 0 and len(ans) == 1, (d, rcode, ans)
            _, _, port, target = srv_decode(ans[0])
            assert (target, port) == net.srv(d)
            rcode, ans = dns_query(net.dns_addr, d, 1, tcp=tcp)
            assert rcode == 0 and [socket.inet_ntoa(a) for a in ans] == [net.addr(d)]
        # unknown *.test: NXDOMAIN (answered locally, never forwarded)
        rcode, ans = dns_query(net.dns_addr, "nothere.test", 1, tcp=tcp)
        assert (rcode, ans) == (3, [])
    # anything else is refused: dnsmasq has no upstream at all
    rcode, ans = dns_query(net.dns_addr, "example.com", 1)
    assert rcode != 0 and ans == []
    # addresses are all distinct 127.x.y.N, and nothing listens for unreachable.test
    addrs = [net.addr(d) for d in DOMAINS] + [net.dns_addr]
    assert len(set(addrs)) == len(addrs) and all(a.startswith("127.") for a in addrs)
    assert net.dns_server == net.dns_addr + ":53"
    with pytest.raises(OSError):
        socket.create_connection((net.addr(UNREACHABLE), net.s2s_port(UNREACHABLE)), 2).close()
    # certificates exist for every domain, including xmppd's
    for d in DOMAINS:
        c = federation.certs[d]
        assert c.cert and c.wrong_cert and c.selfsigned_cert and c.wrong_name != d
    assert federation.certs[XMPPD_A].domain == XMPPD_A


# ------------------------------------------------------------- federation proper

@pytest.fixture
def pair(prosody_peer, ejabberd_peer, fed_clients):
    """alice@prosody.test and alice@ejabberd.test, logged in and available."""
    p = fed_clients(prosody_peer, "alice")
    e = fed_clients(ejabberd_peer, "alice")
    return p, e


def exchange(sender, receiver, to=None, timeout=15):
    body = uniq("fed")
    sender.send_message(to or receiver.bare_jid, body)
    m = receiver.wait_message(body, timeout=timeout)
    assert str(m["from"]) == sender.full_jid, str(m)
    return m


def test_message_prosody_to_ejabberd(pair):
    p, e = pair
    exchange(p, e)                      # to the bare JID
    exchange(p, e, to=e.full_jid)       # to the full JID


def test_message_ejabberd_to_prosody(pair):
    p, e = pair
    exchange(e, p)
    exchange(e, p, to=p.full_jid)


def test_conversation_both_ways(prosody_peer, ejabberd_peer, fed_clients):
    pb = fed_clients(prosody_peer, "bob")
    eb = fed_clients(ejabberd_peer, "bob")
    for _ in range(3):
        exchange(pb, eb)
        exchange(eb, pb)


def _result_from(iq, jid):
    assert iq["type"] == "result" and str(iq["from"]) == jid, str(iq)
    return str(iq)


def test_iq_ping_and_disco_to_remote_server(pair):
    p, e = pair
    # the remote *server* answers (XEP-0199 / XEP-0030 on the domain JID)
    _result_from(p.ping(EJABBERD), EJABBERD)
    _result_from(e.ping(PROSODY), PROSODY)
    for client, server in ((p, EJABBERD), (e, PROSODY)):
        info = _result_from(client.disco(server), server)
        assert DISCO_INFO_NS in info and PING_NS in info, info
    # and a remote user's client answers through both servers
    _result_from(p.ping(e.full_jid), e.full_jid)
    _result_from(e.ping(p.full_jid), p.full_jid)


# ------------------------------------------------------------- how they did it

@pytest.fixture
def federated(pair):
    """Make sure both s2s directions exist (a message each way), return peers."""
    p, e = pair
    exchange(p, e)
    exchange(e, p)
    return pair


def test_prosody_s2s_used_sasl_external_not_dialback(federated, prosody_peer):
    log = prosody_peer.log()
    # outgoing prosody.test -> ejabberd.test: we authenticated with our cert
    assert "Initiating SASL EXTERNAL with ejabberd.test" in log, prosody_peer.log_tail(150)
    assert "SASL EXTERNAL with ejabberd.test succeeded" in log, prosody_peer.log_tail(150)
    assert "Outgoing s2s connection prosody.test->ejabberd.test complete" in log
    # incoming ejabberd.test -> prosody.test: ejabberd authenticated with its cert
    assert "Accepting SASL EXTERNAL identity from ejabberd.test" in log
    assert "Incoming s2s connection ejabberd.test->prosody.test complete" in log
    # the certificate chain was checked against the test CA, both ways
    assert not re.search(r"certificate.*(invalid|not trusted|could not be verified)", log, re.I)
    # dialback never loaded / never used
    assert not re.search(r"dialback", log, re.I), [
        line for line in log.splitlines() if "dialback" in line.lower()][:10]
    assert "jabber:server:dialback" not in log


def test_ejabberd_s2s_used_sasl_external_not_dialback(federated, ejabberd_peer):
    log = ejabberd_peer.log()
    # what ejabberd's s2s listener offered after TLS: EXTERNAL, no dialback
    feats = re.findall(r"Send XML on stream = <<\"(<stream:features>.*?</stream:features>)", log)
    s2s_feats = [f for f in feats if "EXTERNAL" in f]
    assert s2s_feats, feats
    assert not any("urn:xmpp:features:dialback" in f for f in feats), feats
    # outgoing ejabberd.test -> prosody.test
    assert re.search(r"Accepted outbound s2s EXTERNAL authentication ejabberd\.test -> "
                     r"prosody\.test", log), ejabberd_peer.log_tail(150)
    # incoming prosody.test -> ejabberd.test
    assert re.search(r"Accepted inbound s2s EXTERNAL authentication prosody\.test -> "
                     r"ejabberd\.test", log), ejabberd_peer.log_tail(150)
    # (ejabberd always declares xmlns:db in s2s stream headers; that is not use)
    assert not re.search(r"mod_s2s_dialback|<db:(result|verify)\b", log)


def test_peers_resolved_through_the_test_dns(federated, federation, prosody_peer,
                                             ejabberd_peer):
    """Each peer ran in its own mount namespace with the test resolv.conf
    bind-mounted over /etc/resolv.conf: dnsmasq saw their SRV queries (only
    Prosody looks up ejabberd.test and only ejabberd looks up prosody.test),
    and the machine's /etc/resolv.conf was never touched."""
    queries = [q for q in federation.dns.queries() if q[2] != federation.net.client_addr]
    assert ("SRV", "_xmpp-server._tcp.ejabberd.test", "127.0.0.1") in queries, queries
    assert ("SRV", "_xmpp-server._tcp.prosody.test", "127.0.0.1") in queries, queries
    # Prosody's resolver says which server it asked
    assert "Sending DNS query to %s" % federation.net.dns_addr in prosody_peer.log()
    # ejabberd connected to the address dnsmasq gave for prosody.test
    assert re.search(r"Accepted outbound s2s EXTERNAL authentication ejabberd\.test -> "
                     r"prosody\.test \(%s\)" % re.escape(prosody_peer.host),
                     ejabberd_peer.log()), ejabberd_peer.log_tail(100)
    assert federation.resolv_conf_unchanged()
    own_ns = os.readlink("/proc/self/ns/mnt")
    for peer in (prosody_peer, ejabberd_peer):
        assert peer.running()
        pid = peer.proc.pid
        assert os.readlink("/proc/%d/ns/mnt" % pid) != own_ns, peer.name
        # /etc/resolv.conf as the peer sees it, in its namespace
        with open("/proc/%d/root/etc/resolv.conf" % pid) as f:
            seen = f.read()
        assert "nameserver %s" % federation.net.dns_addr in seen, (peer.name, seen)


def test_no_fallback_when_the_certificate_names_another_domain(federation, ejabberd_peer,
                                                              fed_clients):
    """Certificate-only means no fallback: a Prosody for evil.test presenting a
    CA-signed cert for not-evil.test is refused by ejabberd (SASL EXTERNAL
    failure), gives up (no dialback to try), and the message is not delivered."""
    evil = federation.add_peer(ProsodyPeer(federation, domain=EVIL, cert="wrong",
                                           c2s_cert="good"), PEER_USERS)
    try:
        marks = ejabberd_peer.log_marks()
        m = fed_clients(evil, "alice")
        e = fed_clients(ejabberd_peer, "bob")
        body = uniq("must-not-arrive")
        m.send_message(e.bare_jid, body)
        ejabberd_peer.wait_log("Failed inbound s2s EXTERNAL authentication evil.test -> "
                               "ejabberd.test", timeout=15, since=marks)
        evil.wait_log("No fallback from SASL EXTERNAL failure, giving up", timeout=10)
        assert "Certificate host name mismatch" in ejabberd_peer.log_since(marks)
        assert body not in [str(x["body"]) for x in e.drain_messages()]
        assert not re.search(r"Accepted inbound s2s \S+ authentication evil\.test",
                             ejabberd_peer.log_since(marks))
    finally:
        federation.stop_peer(evil)
