"""mod_ratelimit: token buckets on connections, logins, registrations and traffic,
seen from real sockets over loopback.  Sources other than 127.0.0.1 are other
addresses of 127.0.0.0/8 (all local on Linux), so "another address" is real.

Rates are checked with wide tolerance: these are functional checks of the limiter
(a flood is held near its rate, not at the thousands per second it would reach
unlimited), never measurements of the server's speed."""

import base64
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from xmpp_helpers import (IO_TIMEOUT, MALLORY, USERS, XMPPD, RawStream, free_port, line_of,
                          uniq)

ALICE, BOB = "alice@localhost", "bob@localhost"
CAROL = ("carol@localhost", "carol-Secret-4")
PASSWORDS = dict(USERS)
PASSWORDS.update([MALLORY, CAROL])
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
S2S_HEADER = ("<?xml version='1.0'?><stream:stream to='localhost' from='peer.example' "
              "xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' "
              "version='1.0'>")
C2S_HEADER = ("<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' "
              "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")


# ------------------------------------------------------------------ helpers

class SrcStream(RawStream):
    """A RawStream whose connection comes from the source address src."""

    def __init__(self, server, src, port=None, host=None, timeout=IO_TIMEOUT):
        self.server = server
        self.host = host or server.host
        port = port or server.starttls_port
        self.sock = socket.create_connection((self.host, port), timeout=timeout,
                                             source_address=(src, 0))
        self.buf = b""
        self.transcript = []
        self.eof = False
        self.tls = False


def probe(server, src, port=None, header=C2S_HEADER, host=None, timeout=5.0):
    """Connect from src and open a stream: True if the server answers with its
    stream header, False if it closes the connection without a word."""
    host = host or server.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.bind((src, 0))
        s.connect((host, port or server.starttls_port))
        try:
            s.sendall(header.encode())
        except OSError:
            return False
        data = b""
        deadline = time.monotonic() + timeout
        while b"<stream:stream" not in data and time.monotonic() < deadline:
            try:
                chunk = s.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                return False
            except socket.timeout:
                break
            if not chunk:
                return False
            data += chunk
        assert b"<stream:stream" in data, "neither answered nor closed: %r" % data
        return True


def storm(server, src, n, **kw):
    """n connections from src as fast as they go: (accepted, refused, seconds)."""
    t0 = time.monotonic()
    res = [probe(server, src, **kw) for _ in range(n)]
    return res.count(True), res.count(False), time.monotonic() - t0


def stats(server, timeout=5.0):
    """SIGUSR1, then the latest "stats: ratelimit.<name>=<n>" values of the log."""
    before = server.log().count("stats: ratelimit.")
    server.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log()
        if log.count("stats: ratelimit.") >= before + 6:
            break
        time.sleep(0.05)
    return {k: int(v) for k, v in re.findall(r"stats: ratelimit\.(\w+)=(\d+)", log)}


def sasl_plain(r, user, password):
    """One PLAIN attempt: "success" or the <failure/> condition."""
    token = base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()
    r.send("<auth xmlns='%s' mechanism='PLAIN'>%s</auth>" % (SASL_NS, token))
    out = r.expect(re.compile(rb"<success\b[^>]*/>|</success>|</failure>|<failure\b[^>]*/>"),
                   what="SASL success/failure")
    if out.rfind(b"<success") > out.rfind(b"<failure"):
        return "success"
    m = re.search(rb"<failure\b[^>]*>\s*<([a-z-]+)", out[out.rfind(b"<failure"):])
    return m.group(1).decode() if m else "?"


def tls_stream(server, src, **kw):
    """A SrcStream from src with TLS up and the stream open for SASL."""
    r = SrcStream(server, src, **kw)
    r.open_stream()
    r.starttls()
    r.open_stream()
    return r


def login_from(server, src, jid, password, resource="r", **kw):
    r = SrcStream(server, src, **kw)
    r.full = r.login(jid, password, resource, mech="PLAIN")
    return r


class Collector(threading.Thread):
    """Reads a raw stream in the background, timing each <message/> with a
    body "<prefix><n>" as it arrives."""

    def __init__(self, stream, prefix, expected, timeout):
        super().__init__(daemon=True)
        self.r, self.prefix, self.expected, self.timeout = stream, prefix, expected, timeout
        self.times = []      # arrival time of each message, in order
        self.seqs = []
        self.closed = False

    def run(self):
        pat = re.compile(rb"<body>%s(\d+)</body>" % re.escape(self.prefix.encode()))
        deadline = time.monotonic() + self.timeout
        pos = 0
        while len(self.times) < self.expected and time.monotonic() < deadline:
            try:
                chunk = self.r._recv_some(deadline)
            except (socket.timeout, OSError):
                break
            if not chunk:
                self.closed = True
                break
            now = time.monotonic()
            for m in pat.finditer(self.r.buf, pos):
                self.times.append(now)
                self.seqs.append(int(m.group(1)))
                pos = m.end()
            # keep the buffer short; the unmatched tail may hold half a stanza
            self.r.buf = self.r.buf[pos:]
            pos = 0


def send_in_background(stream, data):
    """sendall() in a thread: under back-pressure it blocks, which is the point.
    Nothing may read that stream until the thread is done (one TLS object must
    not be used by two threads at once)."""
    def go():
        try:
            stream.sock.sendall(data)
        except OSError:
            pass  # the server may close the stream; the test says what it expected
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def messages(to, prefix, n, body_pad=""):
    return "".join("<message to='%s' type='chat' id='m%d'><body>%s%d</body>%s</message>"
                   % (to, i, prefix, i, body_pad) for i in range(n)).encode()


@pytest.fixture
def streams():
    """make(server, src, ...) -> SrcStream; all closed at teardown."""
    made = []

    def make(server, src, jid=None, password=None, resource="r", **kw):
        if jid:
            r = login_from(server, src, jid, password or PASSWORDS[jid], resource, **kw)
        else:
            r = SrcStream(server, src, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def ratelimit_server(xmppd_factory, conf, modules=("c2s", "ratelimit"), c2s=None, **kw):
    return xmppd_factory(modules=modules, extra="ratelimit = {\n%s\n};\n" % conf,
                         extra_users=[MALLORY, CAROL], c2s=c2s, **kw)


# -------------------------------------------------------------------- traffic

def test_flood_is_held_at_its_rate_while_others_stay_fast(xmppd_factory, streams, chat_pair):
    rate, burst, n = 100, 50, 450
    srv = ratelimit_server(xmppd_factory, """
        c2s_stanzas = "%d/s burst %d";
        c2s_bytes = "10M/s burst 10M";
        abuse_held = 0;
    """ % (rate, burst))
    pair = chat_pair(srv)
    sink = streams(srv, "127.0.0.1", *CAROL, resource="sink")
    flooder = streams(srv, "127.0.0.1", *MALLORY, resource="flood")
    collector = Collector(sink, "f", n, timeout=30)
    collector.start()

    t0 = time.monotonic()
    send_in_background(flooder, messages(sink.full, "f", n))
    # The canary pair, while the flood is being held back.
    time.sleep(0.5)
    rtts = []
    for _ in range(5):
        t = time.monotonic()
        pair.alice.ping_server()
        rtts.append(time.monotonic() - t)
    pair.check("during the flood")
    canary_done = time.monotonic()
    collector.join(35)

    times = collector.times
    assert len(times) == n, "the flood lost messages: %d of %d arrived" % (len(times), n)
    assert collector.seqs == list(range(n)), "flood messages out of order"
    flood_time = times[-1] - t0
    expected = (n - burst) / rate
    # Held back: unlimited, 450 messages take a fraction of a second.
    assert flood_time >= 0.7 * expected, (flood_time, expected)
    # The steady part (after the burst) runs near the configured rate.
    first = burst + 10
    steady = (n - 1 - first) / (times[-1] - times[first])
    assert 0.5 * rate <= steady <= 1.5 * rate, "steady rate %.1f/s, configured %d/s" % (
        steady, rate)
    # Other clients were served normally meanwhile: the canary finished well
    # before the flood did, and no ping took more than a fraction of it.
    assert canary_done < times[-1], "canary not measured during the flood"
    assert max(rtts) < flood_time / 4, (rtts, flood_time)
    st = stats(srv)
    assert st.get("pauses", 0) >= (n - burst) // 2, st
    assert st.get("streams_closed") == 0, st


def test_byte_limit_holds_big_stanzas_back(xmppd_factory, streams):
    rate, burst, n = 40000, 8000, 40
    srv = ratelimit_server(xmppd_factory, """
        c2s_stanzas = "1000/s burst 1000";
        c2s_bytes = "40k/s burst 8k";
        abuse_window = 4;
        abuse_held = 1;
    """)
    sink = streams(srv, "127.0.0.1", *CAROL, resource="sink")
    flooder = streams(srv, "127.0.0.1", *MALLORY, resource="big")
    payload = messages(sink.full, "b", n, body_pad="<x xmlns='urn:test:pad'>%s</x>" % ("p" * 2000))
    collector = Collector(sink, "b", n, timeout=30)
    collector.start()
    t0 = time.monotonic()
    sender = send_in_background(flooder, payload)
    collector.join(35)
    sender.join(5)  # before this thread reads the flooder's stream itself
    assert collector.seqs == list(range(n)), "big stanzas lost or reordered: %s" % collector.seqs
    took = collector.times[-1] - t0
    expected = (len(payload) - burst) / rate
    assert took >= 0.7 * expected, (took, expected)
    assert len(payload) / took <= 1.5 * rate, "%.0f bytes/s through a %d bytes/s limit" % (
        len(payload) / took, rate)
    # Held back for ~2 s of a 4 s window, more than abuse_held: but big content
    # slowed by its byte limit alone is not abuse, and the stream stays open.
    flooder.send("<iq type='get' id='still' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    flooder.expect(re.compile(rb"<iq\b[^>]*\bid=['\"]still['\"]"), what="ping answer")
    assert "reading paused" in srv.log() and "over its byte limit" in srv.log()
    assert stats(srv).get("streams_closed") == 0


def test_stream_that_keeps_flooding_is_closed(xmppd_factory, streams, chat_pair):
    srv = ratelimit_server(xmppd_factory, """
        c2s_stanzas = "20/s burst 10";
        abuse_window = 4;
        abuse_held = 1;
    """)
    pair = chat_pair(srv)
    sink = streams(srv, "127.0.0.1", *CAROL, resource="sink")
    flooder = streams(srv, "127.0.0.1", *MALLORY, resource="flood")
    n = 300
    collector = Collector(sink, "x", n, timeout=15)
    collector.start()
    t0 = time.monotonic()
    # From this thread: ~35 KB fit in the socket buffers at once, and the TLS
    # object is never written by one thread while another reads it.
    flooder.send(messages(sink.full, "x", n))
    flooder.expect_stream_error("policy-violation", timeout=15)
    closed_after = time.monotonic() - t0
    collector.join(3)  # what was let through before the close is all there is
    # Held back from the first second on, and closed once held back a while:
    # far fewer than the 300 sent went through.
    assert len(collector.times) <= 10 + 20 * (closed_after + 1), (len(collector.times),
                                                                 closed_after)
    assert collector.seqs == list(range(len(collector.seqs)))
    assert "over its stanza limit for" in srv.log()
    # A client that stays under its limit is never closed.
    for i in range(8):
        pair.alice.send_message(pair.bob.full_jid, "calm-%d" % i)
        time.sleep(0.1)
    for i in range(8):
        pair.bob.wait_message("calm-%d" % i)
    pair.check("after the flooder was closed")
    st = stats(srv)
    assert st.get("streams_closed") == 1, st


def start_with_ports(xmppd_factory, conf, **kw):
    """A server whose ratelimit group may name its own listeners: @STARTTLS@ and
    @DIRECT@ become their ports before it starts."""
    srv = xmppd_factory(start=False, modules=("c2s", "ratelimit"), extra_users=[MALLORY, CAROL],
                        extra="ratelimit = {\n%s\n};\n" % conf, **kw)
    srv.config = srv.config.replace("@STARTTLS@", str(srv.starttls_port)).replace(
        "@DIRECT@", str(srv.direct_port))
    srv.config_path.write_text(srv.config)
    return srv.start()


def timed_flood(srv, n, direct=False):
    """Seconds for n messages from mallory (over the STARTTLS or the direct TLS
    listener) to reach carol; all must arrive, in order."""
    sink = RawStream(srv)
    flooder = RawStream(srv, direct=direct)
    try:
        full = sink.login(CAROL[0], CAROL[1], uniq("sink"))
        flooder.login(MALLORY[0], MALLORY[1], uniq("flood"))
        collector = Collector(sink, "o", n, timeout=20)
        collector.start()
        t0 = time.monotonic()
        send_in_background(flooder, messages(full, "o", n))
        collector.join(25)
        assert collector.seqs == list(range(n)), collector.seqs
        return collector.times[-1] - t0
    finally:
        sink.close()
        flooder.close()


def test_limits_per_listener_and_per_host(xmppd_factory):
    n, rate, burst = 35, 20, 5
    held = 0.7 * (n - burst) / rate
    # A listener override: the direct TLS listener is strict, the other is not.
    srv = start_with_ports(xmppd_factory, """
        c2s_stanzas = "1000/s burst 1000";
        listener_limits = ( "127.0.0.1:@DIRECT@ c2s_stanzas %d/s burst %d" );
    """ % (rate, burst))
    slow = timed_flood(srv, n, direct=True)
    fast = timed_flood(srv, n)
    assert slow >= held and fast < slow / 2, (slow, fast)
    # A host override wins over a listener's.
    srv2 = start_with_ports(xmppd_factory, """
        listener_limits = ( "127.0.0.1:@STARTTLS@ c2s_stanzas off" );
        host_limits = ( "localhost c2s_stanzas %d/s burst %d" );
    """ % (rate, burst), name="host")
    assert timed_flood(srv2, n) >= held


# ---------------------------------------------------------------- connections

def test_connection_storm_is_refused_per_address(xmppd_factory, streams):
    rate, burst = 1, 5
    srv = ratelimit_server(xmppd_factory, """
        ip_connections = "%d/s burst %d";
        exempt = ( "127.0.0.8/29" );
    """ % (rate, burst), ipv6=True)

    acc, ref, took = storm(srv, "127.0.0.2", 25)
    assert burst <= acc <= burst + rate * took + 1, (acc, ref, took)
    assert ref >= 25 - (burst + rate * took + 1), (acc, ref, took)
    # Another address is not affected: it connects and logs in.
    r = streams(srv, "127.0.0.3", ALICE, resource="other")
    assert r.full == "alice@localhost/other"
    # An exempt network (127.0.0.8/29) is not limited at all.
    assert storm(srv, "127.0.0.9", 25)[:2] == (25, 0)
    # IPv6 is limited as well (per /64); the harness's start-up probe took a token.
    acc6, _, took6 = storm(srv, "::1", 15, port=srv.ipv6_port, host="::1")
    assert burst - 1 <= acc6 <= burst - 1 + rate * took6 + 1, (acc6, took6)
    assert "connection to 127.0.0.1:%d refused: over the ip_connections limit" % (
        srv.starttls_port) in srv.log()
    st = stats(srv)
    assert st.get("connections_refused", 0) >= (25 - acc) + (15 - acc6), st


def test_address_table_is_bounded(xmppd_factory):
    srv = ratelimit_server(xmppd_factory, """
        ip_connections = "1/min burst 3";
        max_entries = 64;
    """)
    # 100 addresses, one connection each: all welcome, the oldest entries make room.
    got = [probe(srv, "127.0.1.%d" % i) for i in range(1, 101)]
    assert all(got), got.count(False)
    assert stats(srv).get("entries_evicted", 0) >= 100 - 64
    # Limiting still works with a full table.
    acc, ref, _ = storm(srv, "127.0.0.2", 8)
    assert (acc, ref) == (3, 5)


def test_listener_limit_on_an_s2s_listener(xmppd_factory, streams):
    srv = xmppd_factory(start=False, modules=("c2s", "ratelimit"), extra="""ratelimit = {
        listener_limits = ( "127.0.0.1:@S2S@ listener_connections 1/min burst 3",
                            "127.0.0.1:@S2S@ ip_connections 100/s" );
    };
    """)
    s2s_port = free_port()
    direct = '    { stream = "c2s"; address = "127.0.0.1"; port = %d; tls = "direct"; }' % (
        srv.direct_port)
    assert direct in srv.config
    srv.config = srv.config.replace(direct, direct + ',\n    { stream = "s2s"; address = '
                                    '"127.0.0.1"; port = %d; tls = "starttls"; }' % s2s_port)
    srv.config = srv.config.replace("@S2S@", str(s2s_port))
    srv.config_path.write_text(srv.config)
    srv.start()

    # Three peers from three addresses fill the listener's burst; the next are refused...
    got = [probe(srv, "127.0.0.%d" % i, port=s2s_port, header=S2S_HEADER) for i in (4, 5, 6, 7, 8)]
    assert got == [True, True, True, False, False], got
    # ...while the c2s listeners are not affected.
    assert probe(srv, "127.0.0.7")
    r = streams(srv, "127.0.0.8", BOB, resource="c2s")
    assert r.full == "bob@localhost/c2s"
    assert "over the listener_connections limit" in srv.log()


# --------------------------------------------------------------------- logins

def test_brute_force_logins_are_throttled(xmppd_factory, streams):
    acct_burst, ip_burst = 4, 6
    srv = ratelimit_server(xmppd_factory, """
        account_auth = "1/min burst %d";
        ip_auth = "1/min burst %d";
        exempt = ( "127.0.0.9", "::1/128" );
    """ % (acct_burst, ip_burst), ipv6=True,
        c2s={"auth_failure_delay": 50, "auth_max_attempts": 3})

    # Wrong passwords for alice from one address, over several connections.
    conds = []
    for _ in range(3):
        r = streams(srv, "127.0.0.2")
        r.open_stream()
        r.starttls()
        r.open_stream()
        for _ in range(3):
            conds.append(sasl_plain(r, "alice", "guess-%s" % uniq()))
        r.expect_stream_error("policy-violation")  # mod_c2s: 3 failures close the stream
    assert conds[:acct_burst] == ["not-authorized"] * acct_burst, conds
    assert conds[acct_burst:] == ["temporary-auth-failure"] * (9 - acct_burst), conds
    # Throttled means throttled: even the right password waits now.
    r = tls_stream(srv, "127.0.0.2")
    assert sasl_plain(r, "alice", USERS[ALICE]) == "temporary-auth-failure"
    # The operator's own exempt addresses still get in (IPv4 and IPv6)...
    assert streams(srv, "127.0.0.9", ALICE, resource="ops").full == "alice@localhost/ops"
    r6 = streams(srv, "::1", ALICE, resource="ops6", port=srv.ipv6_port, host="::1")
    assert r6.full == "alice@localhost/ops6"
    # ...and other accounts are not locked by alice's bucket.
    assert streams(srv, "127.0.0.5", BOB, resource="b").full == "bob@localhost/b"

    # Password spraying from one address over many accounts: the address's bucket.
    conds = []
    for i in range(3):
        r = tls_stream(srv, "127.0.0.3")
        for k in range(3):
            conds.append(sasl_plain(r, "user%d" % (3 * i + k), "password"))
        r.expect_stream_error("policy-violation")
    assert conds[:ip_burst] == ["not-authorized"] * ip_burst, conds
    assert conds[ip_burst:] == ["temporary-auth-failure"] * (9 - ip_burst), conds
    # (log lines of one kind are themselves limited: the first ones were alice's)
    assert "login attempt for alice@localhost refused: over the account_auth limit" in srv.log()
    st = stats(srv)
    assert st.get("auth_refused") == (9 - acct_burst) + 1 + (9 - ip_burst), st


# -------------------------------------------------------------- registrations

def register(srv, src, user, password="a-good-password"):
    r = tls_stream(srv, src)
    try:
        r.send("<iq type='set' id='reg1'><query xmlns='jabber:iq:register'><username>%s"
               "</username><password>%s</password></query></iq>" % (user, password))
        out = r.expect(re.compile(rb"<iq\b[^>]*\bid=['\"]reg1['\"][^>]*(/>|>.*?</iq>)", re.S),
                       what="registration answer")
        if re.search(rb"type=['\"]result['\"]", out):
            return "ok"
        m = re.search(rb"<([a-z-]+)\s+xmlns=['\"]urn:ietf:params:xml:ns:xmpp-stanzas['\"]", out)
        return m.group(1).decode() if m else out.decode()
    finally:
        r.close()


def test_registrations_per_address(xmppd_factory, streams):
    srv = xmppd_factory(
        modules=("c2s", "register", "ratelimit"),
        extra='register = { open = true; per_ip_per_hour = 0; };\n'
              'ratelimit = { ip_registrations = "1/h burst 2"; exempt = ( "127.0.0.9/32" ); };\n')
    a, b, c = uniq("ra"), uniq("rb"), uniq("rc")
    assert register(srv, "127.0.0.2", a) == "ok"
    assert register(srv, "127.0.0.2", b) == "ok"
    assert register(srv, "127.0.0.2", c) == "resource-constraint"
    # Another address, and an exempt one, still register.
    assert register(srv, "127.0.0.3", uniq("rd")) == "ok"
    for _ in range(3):
        assert register(srv, "127.0.0.9", uniq("re")) == "ok"
    # The refused account was not created; the accepted ones work.
    assert streams(srv, "127.0.0.4", "%s@localhost" % a, "a-good-password").full
    r = tls_stream(srv, "127.0.0.4")
    assert sasl_plain(r, c, "a-good-password") == "not-authorized"
    assert stats(srv).get("registrations_refused") == 1


# --------------------------------------------------------------------- config

BAD = {
    "bad-spec": ('c2s_stanzas = "fast";', "c2s_stanzas"),
    "bad-unit": ('ip_auth = "5/fortnight";', "ip_auth"),
    "bad-cidr": ('exempt = ( "10.0.0.0/33" );', "exempt"),
    "bad-listener": ('listener_limits = ( "localhost:5222 ip_connections 1/s" );',
                     "listener_limits"),
    "wrong-scope": ('host_limits = ( "localhost ip_connections 1/s" );', "host_limits"),
    "unknown-host": ('host_limits = ( "elsewhere.example c2s_stanzas 1/s" );', "host_limits"),
    "held-over-window": ("abuse_window = 10;\n    abuse_held = 20;", "abuse_held"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_settings_are_refused_with_their_line(xmppd_factory, case):
    setting, key = BAD[case]
    srv = xmppd_factory(start=False, users={}, modules=("c2s", "ratelimit"),
                        extra="ratelimit = {\n    %s\n};\n" % setting)
    r = subprocess.run([str(XMPPD), "--check-config", str(srv.config_path)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=20)
    out = r.stdout + r.stderr
    assert r.returncode != 0, "bad ratelimit setting accepted:\n%s" % srv.config
    line = line_of(srv.config, "%s =" % key)
    assert "%s:%d:" % (srv.config_path, line) in out and "ratelimit.%s" % key in out, out


def test_good_settings_with_overrides_are_accepted(xmppd_factory, streams):
    srv = ratelimit_server(xmppd_factory, """
        ip_connections = "10/s burst 20";
        listener_connections = "off";
        ip_auth = "30/min";
        account_auth = "10/min burst 10";
        ip_registrations = "5/h burst 5";
        c2s_stanzas = "50/s burst 100";
        c2s_bytes = "100k/s burst 1M";
        s2s_stanzas = "500/s burst 2000";
        s2s_bytes = "1M/s burst 8M";
        listener_limits = ( "[::1]:5999 ip_connections 2/s burst 4",
                            "127.0.0.1:5998 c2s_stanzas off" );
        host_limits = ( "localhost c2s_stanzas 20/s burst 40" );
        exempt = ( "10.0.0.0/8", "2001:db8::/32", "192.0.2.1" );
        max_entries = 1024;
        abuse_window = 60;
        abuse_held = 30;
    """)
    assert streams(srv, "127.0.0.1", ALICE).full
