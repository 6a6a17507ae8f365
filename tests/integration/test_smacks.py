"""mod_smacks: XEP-0198 Stream Management on raw client streams.

Enabling, <r/>/<a/> counting in both directions, the handled-count-too-high
stream error, and resumption (section 5): a client cut off without
</stream:stream> comes back with previd and its h, and gets exactly what it
had not acknowledged plus what arrived while it was away; a session that is
not resumed in time puts its unacknowledged messages into offline storage."""

import re
import socket
import time
from pathlib import Path

import pytest

from xmpp_helpers import USERS, RawStream

ALICE, BOB = "alice@localhost", "bob@localhost"
MODULES = ("c2s", "smacks", "offline")
NS_SM = "urn:xmpp:sm:3"
RESUME_TIMEOUT = 2

RE_ENABLED = re.compile(rb"<enabled\b[^>]*/>|<enabled\b[^>]*>\s*</enabled>")
RE_A = re.compile(rb"<a\b[^>]*\bh=[\"'](\d+)[\"'][^>]*/>")


@pytest.fixture
def server(xmppd_factory):
    return xmppd_factory(modules=MODULES,
                         extra="smacks = { resume_timeout = %d; };\n" % RESUME_TIMEOUT)


def attr(xml, name):
    m = re.search(rb"\b%s=[\"']([^\"']*)[\"']" % name.encode(), xml)
    return m.group(1).decode() if m else None


def enable(r, resume=True):
    r.send("<enable xmlns='%s'%s/>" % (NS_SM, " resume='true'" if resume else ""))
    got = r.expect(RE_ENABLED, what="<enabled/>")
    assert NS_SM.encode() in got
    return got


def ask_h(r):
    """Send <r/>, return the server's h."""
    r.send("<r xmlns='%s'/>" % NS_SM)
    return int(RE_A.search(r.expect(RE_A, what="<a h/>")).group(1))


def sync(r, ident):
    """Round trip with the server: everything sent to r before is in r.buf after."""
    r.send("<iq type='get' id='%s'><ping xmlns='urn:xmpp:ping'/></iq>" % ident)
    return r.expect(re.compile(rb"<iq\b[^>]*\bid=[\"']%s[\"'][^>]*/?>" % ident.encode()),
                    what="ping result %s" % ident)


def bodies(data):
    return [b.decode() for b in re.findall(rb"<body>(.*?)</body>", data)]


def test_stream_feature_and_enable(raw):
    r = raw()
    r.open_stream()
    r.starttls()
    feats = r.open_stream()
    assert b"urn:xmpp:sm:3" not in feats, "SM offered before authentication"
    assert r.auth_scram("alice", USERS[ALICE])
    feats = r.open_stream()
    assert re.search(rb"<sm\b[^>]*urn:xmpp:sm:3", feats), feats
    # Before bind: refused (section 3).
    r.send("<enable xmlns='%s'/>" % NS_SM)
    r.expect(re.compile(rb"<failed\b.*?unexpected-request.*?(?:/>|</failed>)", re.S))
    r.bind("e")
    got = enable(r)
    assert attr(got, "id"), got
    assert attr(got, "resume") in ("true", "1"), got
    assert attr(got, "max") == str(RESUME_TIMEOUT), got
    # Twice: refused.
    r.send("<enable xmlns='%s'/>" % NS_SM)
    r.expect(re.compile(rb"<failed\b.*?unexpected-request", re.S))


def test_enable_without_resume_has_no_id(raw):
    r = raw(ALICE)
    got = enable(r, resume=False)
    assert attr(got, "id") is None and attr(got, "resume") is None, got


def test_ack_before_enable_is_a_stream_error(raw):
    r = raw(ALICE)
    r.send("<r xmlns='%s'/>" % NS_SM)
    r.expect_stream_error("unsupported-stanza-type")


def test_server_counts_client_stanzas(raw):
    r = raw(ALICE)
    # Stanzas before <enable/> do not count.
    sync(r, "pre1")
    enable(r)
    assert ask_h(r) == 0
    for i in range(3):
        sync(r, "p%d" % i)
    r.send("<message to='bob@localhost' type='chat' id='m1'><body>x</body></message>")
    r.send("<presence/>")
    assert ask_h(r) == 5
    # Nonzas are not counted.
    r.send("<a xmlns='%s' h='0'/>" % NS_SM)
    assert ask_h(r) == 5


def test_client_acks_empty_the_queue_and_too_high_is_an_error(raw):
    a = raw(ALICE, "a")
    enable(a)
    b = raw(BOB, "b")
    for i in range(3):
        b.send("<message to='alice@localhost/a' type='chat' id='q%d'><body>q%d</body></message>"
               % (i, i))
    sync(b, "bs")
    sync(a, "as")  # 3 messages + 1 iq result sent to alice
    # Acknowledging all 4 is fine, and so is acknowledging them again.
    a.send("<a xmlns='%s' h='4'/>" % NS_SM)
    a.send("<a xmlns='%s' h='4'/>" % NS_SM)
    sync(a, "as2")  # the 5th stanza
    # One more than was sent: section 4.
    a.send("<a xmlns='%s' h='7'/>" % NS_SM)
    cond, data = a.expect_stream_error("undefined-condition")
    assert re.search(rb"<handled-count-too-high\b[^>]*urn:xmpp:sm:3", data), data
    # Nothing unacknowledged was left (h=4 acked all messages): no offline copies.
    again = raw(ALICE, "again")
    again.send("<presence/>")
    time.sleep(0.3)
    sync(again, "ag")
    assert b"<body>q" not in again.buf, again.dump()


def test_server_requests_acks(xmppd_factory):
    srv = xmppd_factory(modules=MODULES, extra="smacks = { request_every = 2; };\n")
    a = RawStream(srv)
    b = RawStream(srv)
    try:
        a.login(ALICE, USERS[ALICE], "a")
        enable(a)
        b.login(BOB, USERS[BOB], "b")
        for i in range(3):
            b.send("<message to='alice@localhost/a' type='chat'><body>r%d</body></message>" % i)
        got = a.expect(re.compile(rb"<r\s+xmlns=[\"']urn:xmpp:sm:3[\"']\s*/>"), what="<r/>")
        assert bodies(got) == ["r0", "r1"], got
    finally:
        a.close()
        b.close()


RE_TOKEN = re.compile(rb"<message\b|<r\s+xmlns=[\"']urn:xmpp:sm:3[\"']\s*/>")


@pytest.mark.parametrize("extra", ["", "sample"])
def test_client_that_only_answers_requests_is_kept(xmppd_factory, extra):
    """A client that acks only when asked (profanity) is asked often enough
    that its queue never reaches max_queue: with the module's defaults and
    with the sample config's smacks settings."""
    if extra == "sample":
        cfg = (Path(__file__).resolve().parents[2] / "config" / "xmppd.cfg").read_text()
        m = re.search(r"^smacks = \{.*?^\};", cfg, re.S | re.M)
        extra = m.group(0).replace("max_queue = 1000", "max_queue = 40") + "\n"
        assert "max_queue = 40" in extra, extra
    else:
        extra = "smacks = { max_queue = 40; };\n"
    srv = xmppd_factory(modules=MODULES, extra=extra)
    a = RawStream(srv)
    b = RawStream(srv)
    try:
        a.login(ALICE, USERS[ALICE], "a")
        enable(a, resume=False)
        b.login(BOB, USERS[BOB], "b")
        n, batch = 200, 10
        seen, data, pos = 0, b"", 0
        deadline = time.monotonic() + 30
        for k in range(0, n, batch):   # a conversation, not one burst over max_queue
            b.send("".join("<message to='alice@localhost/a' type='chat'><body>q%d</body>"
                           "</message>" % i for i in range(k, k + batch)))
            while len(bodies(data)) < k + batch:
                assert time.monotonic() < deadline, "got %d of %d" % (len(bodies(data)), n)
                data += a.expect(re.compile(rb"</message>|<r\b[^>]*/>"), what="messages")
                for tok in RE_TOKEN.finditer(data, pos):
                    if tok.group(0).startswith(b"<message"):
                        seen += 1
                    else:       # an <r/> asks about the stanzas before it
                        a.send("<a xmlns='%s' h='%d'/>" % (NS_SM, seen))
                    pos = tok.end()
        assert bodies(data) == ["q%d" % i for i in range(n)]
        assert b"stream:error" not in data, data[-500:]
        sync(a, "after")        # the stream is still open
    finally:
        a.close()
        b.close()


def cut(r):
    """Lose the connection: no </stream:stream>, no TLS close_notify."""
    try:
        r.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    r.sock.close()


def resume_stream(server, user, previd, h):
    """A new stream, authenticated, not bound, sending <resume/>.
    Returns (stream, bytes up to the answer)."""
    r = RawStream(server)
    r.authenticate(user, USERS["%s@localhost" % user])
    r.open_stream()
    r.send("<resume xmlns='%s' previd='%s' h='%d'/>" % (NS_SM, previd, h))
    got = r.expect(re.compile(rb"<(resumed|failed)\b.*?(?:/>|</failed>)", re.S),
                   what="<resumed/> or <failed/>")
    return r, got


def test_resumption_delivers_exactly_the_unacked(raw, server):
    a = raw(ALICE, "phone")
    got = enable(a)
    previd = attr(got, "id")
    a.send("<presence/>")
    # Her own presence comes back to her (RFC 6121 4.2.2): stanza 1.
    a.expect(re.compile(rb"<presence\b[^>]*from=[\"']alice@localhost/phone"), what="echo")
    b = raw(BOB, "b")
    for i in range(1, 6):
        b.send("<message to='alice@localhost/phone' type='chat' id='m%d'><body>m%d</body>"
               "</message>" % (i, i))
    sync(b, "b1")
    data = sync(a, "a1")
    assert bodies(data) == ["m1", "m2", "m3", "m4", "m5"], a.dump()
    # Alice has handled 3: her presence, m1, m2.
    a.send("<a xmlns='%s' h='3'/>" % NS_SM)
    # She sends 2 more stanzas the server must count.
    a.send("<message to='bob@localhost/b' type='chat' id='fromA'><body>hello bob</body></message>")
    sync(a, "a2")
    bob_got = b.expect(re.compile(rb"<body>hello bob</body>"))
    assert bob_got
    cut(a)
    time.sleep(0.3)  # the server notices the lost connection
    # While she is away, more arrives for her full JID and her bare JID.
    b.send("<message to='alice@localhost/phone' type='chat'><body>m6</body></message>")
    b.send("<message to='alice@localhost' type='chat'><body>m7</body></message>")
    sync(b, "b2")

    r, got = resume_stream(server, "alice", previd, 3)
    assert got.startswith(b"<resumed"), r.dump()
    assert attr(got, "previd") == previd
    # Alice sent presence, ping a1, the message, ping a2: 4 stanzas after <enable/>.
    assert attr(got, "h") == "4", got
    # The same full JID: a message to it reaches the new stream, after the backlog.
    b.send("<message to='alice@localhost/phone' type='chat'><body>m8</body></message>")
    sync(b, "b3")
    data = sync(r, "r1")
    assert bodies(data) == ["m3", "m4", "m5", "m6", "m7", "m8"], r.dump()
    # The count goes on from her h=3: m3 m4 m5, the a1 and a2 results (resent),
    # m6 m7 (queued while away), m8 and the r1 result: 12 in all.
    r.send("<a xmlns='%s' h='12'/>" % NS_SM)
    r.send("<a xmlns='%s' h='12'/>" % NS_SM)
    assert ask_h(r) == 5  # her 4 before the cut, then ping r1
    # One more than sent is still the section 4 error: the count is exact.
    r.send("<a xmlns='%s' h='13'/>" % NS_SM)
    r.expect_stream_error("undefined-condition")


def test_resume_with_wrong_previd_or_user_fails(raw, server):
    a = raw(ALICE, "p")
    previd = attr(enable(a), "id")
    cut(a)
    time.sleep(0.2)
    r, got = resume_stream(server, "alice", "no-such-id", 0)
    assert re.search(rb"<failed\b[^>]*urn:xmpp:sm:3.*?<item-not-found\b", got, re.S), got
    # The stream is still usable: bind normally.
    assert r.bind("other") == "alice@localhost/other"
    r.close()
    # Bob cannot take over Alice's session.
    r, got = resume_stream(server, "bob", previd, 0)
    assert got.startswith(b"<failed"), got
    r.close()
    # The right user still can.
    r, got = resume_stream(server, "alice", previd, 0)
    assert got.startswith(b"<resumed"), got
    r.close()


def test_unresumed_session_puts_unacked_messages_offline(raw, server):
    a = raw(ALICE, "lost")
    enable(a)
    a.send("<presence/>")
    a.expect(re.compile(rb"<presence\b[^>]*from=[\"']alice@localhost/lost"), what="echo")
    b = raw(BOB, "b")
    b.send("<message to='alice@localhost/lost' type='chat'><body>u1</body></message>")
    b.send("<message to='alice@localhost' type='chat'><body>u2</body></message>")
    sync(b, "b1")
    data = sync(a, "a1")
    assert bodies(data) == ["u1", "u2"]
    a.send("<a xmlns='%s' h='2'/>" % NS_SM)  # her presence and u1 were handled, u2 not
    sync(a, "a2")
    cut(a)
    time.sleep(RESUME_TIMEOUT + 1.0)
    n = raw(ALICE, "later")
    n.send("<presence/>")
    data = n.expect(re.compile(rb"<body>u2</body>.*?</message>", re.S))
    assert b"urn:xmpp:delay" in data, data
    sync(n, "n1")
    assert b"<body>u1</body>" not in n.buf + data, n.dump()


def test_clean_close_ends_the_session(raw, server):
    a = raw(ALICE, "c")
    previd = attr(enable(a), "id")
    a.send("</stream:stream>")
    a.read_until_closed(3)
    a.close()
    r, got = resume_stream(server, "alice", previd, 0)
    assert got.startswith(b"<failed"), got


def test_shutdown_keeps_unacked_messages_of_a_detached_session(xmppd_factory):
    srv = xmppd_factory(modules=MODULES, extra="smacks = { resume_timeout = 60; };\n")
    a, b = RawStream(srv), RawStream(srv)
    try:
        a.login(ALICE, USERS[ALICE], "gone")
        enable(a)
        b.login(BOB, USERS[BOB], "b")
        b.send("<message to='alice@localhost/gone' type='chat'><body>s1</body></message>")
        a.expect(re.compile(rb"<body>s1</body>"))
        cut(a)
        time.sleep(0.3)
        b.send("<message to='alice@localhost/gone' type='chat'><body>s2</body></message>")
        sync(b, "b1")
    finally:
        a.close()
        b.close()
    # The detached session ends with the server; neither message is lost.
    assert srv.terminate() == 0
    srv.start()
    n = RawStream(srv)
    try:
        n.login(ALICE, USERS[ALICE], "back")
        n.send("<presence/>")
        data = n.expect(re.compile(rb"<body>s2</body>.*?</message>", re.S))
        assert bodies(data) == ["s1", "s2"], n.dump()
    finally:
        n.close()


def test_resume_takes_over_a_live_connection(raw, server):
    a = raw(ALICE, "desk")
    previd = attr(enable(a), "id")
    b = raw(BOB, "b")
    b.send("<message to='alice@localhost/desk' type='chat'><body>t1</body></message>")
    a.expect(re.compile(rb"<body>t1</body>"))
    # The client thinks the old connection is dead; the server does not know yet.
    r, got = resume_stream(server, "alice", previd, 0)
    assert got.startswith(b"<resumed"), r.dump()
    assert attr(got, "h") == "0", got
    data = sync(r, "r1")
    assert bodies(data) == ["t1"], r.dump()
    # The old connection is gone, and sends nothing more.
    rest, eof = a.read_until_closed(3)
    assert eof and b"<body>" not in rest, a.dump()
    b.send("<message to='alice@localhost/desk' type='chat'><body>t2</body></message>")
    assert bodies(r.expect(re.compile(rb"<body>t2</body>"))) == ["t2"]


@pytest.mark.parametrize("h", ["-1", "abc", "99999999999", ""])
def test_malformed_h_is_a_stream_error(raw, h):
    a = raw(ALICE)
    enable(a)
    a.send("<a xmlns='%s' h='%s'/>" % (NS_SM, h))
    a.expect_stream_error("invalid-xml")
