"""
mod_ratelimit on a real federated stream: the per-incoming-server-stream
limits (s2s_stanzas, s2s_bytes) hold a Prosody peer's flood at the configured
rate, lose nothing, keep the order, and leave the server's own clients fast.

An xmppd serves xmppd-rtbl.test in the federation harness (federation.py:
dnsmasq SRV + A, the test CA, certificate-only s2s).  That domain belongs to
test_rtbl.py's module-scoped fixture while that module runs; here each test
starts its own short-lived xmppd there (one at a time, stopped at teardown)
with the modules c2s, roster, s2s_external and ratelimit.  alice@prosody.test
(on the session-scoped Prosody peer, whose configuration is not touched)
sends a flood to alice@xmppd-rtbl.test; arrival times are taken as the local
client parses each message.

  * stanza limit "20/s burst 10" (the s2s_stanzas setting, and again as a
    host_limits override for the served domain): 100 messages take about
    (100-10)/20 s, arrive all and in order at about 20/s; ratelimit.pauses
    counts the pauses; a local pair's pings and chat stay fast meanwhile.
  * control, s2s_stanzas "off": the same flood arrives in a fraction of
    that time (so the limiter is what slowed it) and nothing is paused.
  * byte limit alone (big stanzas; a listener_limits override for the s2s
    listener): slowed to the byte rate, and never closed for it even with
    a tiny abuse_held.

Rates are checked with wide tolerance: functional checks of the limiter,
not measurements of the servers' speed.

Run: /usr/bin/python3 -m pytest -q tests/integration/test_ratelimit_s2s.py
"""

import re
import signal
import time

import pytest

from federation import XMPPD_RTBL, XmppdPeer
from xmpp_helpers import uniq

pytest_plugins = ["federation"]

DOMAIN = XMPPD_RTBL
LOCAL_USERS = {"alice": "alice-Rl-1", "bob": "bob-Rl-2", "carol": "carol-Rl-3"}

RATE, BURST, N = 20, 10, 100          # the stanza limit and the flood
LIMITED = (N - BURST) / RATE          # seconds the limit implies for the flood: 4.5


# ------------------------------------------------------------------ xmppd

class RatelimitXmppd(XmppdPeer):
    """xmppd for xmppd-rtbl.test with mod_ratelimit (settings: `conf`, in which
    @S2S@ stands for the s2s listener's ADDRESS:PORT)."""

    def __init__(self, fed, conf):
        s2s = "%s:%d" % (fed.net.addr(DOMAIN), fed.net.s2s_port(DOMAIN))
        super().__init__(fed, DOMAIN, modules=("c2s", "roster", "s2s_external", "ratelimit"),
                         extra="ratelimit = {\n%s\n};\n" % conf.replace("@S2S@", s2s),
                         name="xmppd (ratelimit s2s)")

    def stats(self, timeout=5.0):
        """SIGUSR1, then the latest "stats: ratelimit.<name>=<n>" values."""
        before = self.log().count("stats: ratelimit.")
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        log = self.log()
        while log.count("stats: ratelimit.") < before + 6 and time.monotonic() < deadline:
            time.sleep(0.05)
            log = self.log()
        assert log.count("stats: ratelimit.") >= before + 6, "no stats after SIGUSR1\n" + \
            self.log_tail(40)
        return {k: int(v) for k, v in re.findall(r"stats: ratelimit\.(\w+)=(\d+)", log)}


@pytest.fixture
def rl_xmppd(federation):
    """make(conf) -> a running RatelimitXmppd (one at a time: they share the
    domain's address); SIGTERMed at teardown, must exit 0."""
    made = []

    def make(conf):
        assert not made or not made[-1].running(), "one xmppd for %s at a time" % DOMAIN
        srv = RatelimitXmppd(federation, conf)
        made.append(srv)
        return srv.launch(LOCAL_USERS)

    yield make
    bad = [(s.dir.name, rc) for s in made if s.proc for rc in [s.terminate()] if rc != 0]
    assert not bad, "xmppd exit status after SIGTERM (expected 0): %s\n%s" % (
        bad, made[-1].log_tail(60))


# ------------------------------------------------------------------ helpers

class Arrivals:
    """Times (monotonic, taken as the client's loop parses each message) and
    bodies of the messages whose body starts with prefix."""

    def __init__(self, client, prefix):
        self.items = []

        def on_message(m):
            body = str(m["body"])
            if body.startswith(prefix):
                self.items.append((time.monotonic(), body))
        client.lt.call(lambda: client.xmpp.add_event_handler("message", on_message))

    def wait(self, n, timeout):
        deadline = time.monotonic() + timeout
        while len(self.items) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.items)

    @property
    def times(self):
        return [t for t, _ in self.items]

    @property
    def bodies(self):
        return [b for _, b in self.items]


def send_all(client, to, bodies):
    """Hand every message to slixmpp in one go (it writes them as fast as the
    connection takes them)."""
    def go():
        for b in bodies:
            client.xmpp.send_message(mto=to, mbody=b, mtype="chat")
    client.lt.call(go)


def warm_up(sender, sink, tries=3):
    """Make sure the s2s stream prosody.test -> xmppd is up (a stream to an
    xmppd of an earlier test may just be closing: then the next try opens
    a new one), and let the new stream's stanza bucket fill again."""
    for _ in range(tries):
        body = uniq("warm")
        sender.send_message(sink.bare_jid, body)
        try:
            sink.wait_message(body, timeout=10)
            break
        except AssertionError:
            continue
    else:
        raise AssertionError("no message from %s reached %s in %d tries"
                             % (sender.bare_jid, sink.bare_jid, tries))
    time.sleep(BURST / RATE + 0.3)   # a full bucket: BURST tokens again


def flood_bodies(prefix, n, pad=""):
    return ["%s%03d%s" % (prefix, i, pad) for i in range(n)]


def assert_all_in_order(arrivals, bodies, what):
    got = arrivals.bodies
    assert len(got) == len(bodies), "%s: %d of %d messages arrived (missing from %s)" % (
        what, len(got), len(bodies), next((b[:12] for b in bodies if b not in got), None))
    assert got == bodies, "%s: messages out of order: %s" % (what, [b[:12] for b in got])


def no_errors(sender):
    """Nothing bounced back to the sender."""
    errs = [str(m) for m in sender.drain_messages() if m["type"] == "error"]
    assert not errs, errs


# ------------------------------------------------------------------ the tests

STANZA_LIMIT = "%d/s burst %d" % (RATE, BURST)


@pytest.mark.parametrize("conf", [
    '    s2s_stanzas = "%s";' % STANZA_LIMIT,
    # off in general, set for the domain the stream is addressed to (host_limits)
    '    s2s_stanzas = "off";\n    host_limits = ( "%s s2s_stanzas %s" );' % (DOMAIN, STANZA_LIMIT),
], ids=["setting", "host_override"])
def test_s2s_flood_is_held_at_the_stanza_rate(rl_xmppd, prosody_peer, fed_clients, conf):
    srv = rl_xmppd(conf)
    sink = fed_clients(srv, "alice")
    bob, carol = fed_clients(srv, "bob"), fed_clients(srv, "carol")
    sender = fed_clients(prosody_peer, "alice")
    warm_up(sender, sink)
    arrivals = Arrivals(sink, "s2s-")
    bodies = flood_bodies("s2s-", N)

    t0 = time.monotonic()
    send_all(sender, sink.bare_jid, bodies)
    # The server's own clients while the s2s stream is held back.
    time.sleep(0.5)
    rtts = []
    for _ in range(5):
        t = time.monotonic()
        assert bob.ping_server(timeout=5)["type"] == "result"
        rtts.append(time.monotonic() - t)
        time.sleep(0.05)
    body = uniq("canary")
    bob.send_message(carol.full_jid, body)
    assert str(carol.wait_message(body, timeout=5)["from"]) == bob.full_jid
    canary_done = time.monotonic()
    during = len(arrivals.items)

    arrivals.wait(N, timeout=3 * LIMITED + 10)
    assert_all_in_order(arrivals, bodies, "limited flood")
    times = arrivals.times
    took = times[-1] - t0
    # Held back: without the limit the flood takes a fraction of a second
    # (the control test), with it about (N - BURST) / RATE.
    assert took >= 0.6 * LIMITED, "flood took %.2f s; the limit implies %.2f s" % (took, LIMITED)
    assert took <= 2 * LIMITED + 3, "flood took %.2f s; the limit implies %.2f s" % (
        took, LIMITED)
    # After the burst it runs near the configured rate.
    first = BURST + 10
    steady = (N - 1 - first) / (times[-1] - times[first])
    assert 0.5 * RATE <= steady <= 1.5 * RATE, "steady rate %.1f/s, configured %d/s" % (
        steady, RATE)
    # The local pair was served while the flood was still coming in, fast.
    assert canary_done < times[-1] and during < N, (canary_done - t0, took, during)
    assert max(rtts) < took / 4, "ping round trips %s during a %.2f s flood" % (
        ["%.3f" % r for r in rtts], took)
    no_errors(sender)

    st = srv.stats()
    assert st.get("pauses", 0) >= (N - BURST) // 2, st
    assert st.get("streams_closed") == 0, st
    log = srv.log()
    assert re.search(r"ratelimit: \S+ \(prosody\.test\): over its stanza limit; reading "
                     r"paused for \d+ ms", log), srv.log_tail(60)


def test_s2s_flood_without_a_stanza_limit_is_fast(rl_xmppd, prosody_peer, fed_clients):
    """The control: the same flood, same path, stanza limit off."""
    srv = rl_xmppd('    s2s_stanzas = "off";')
    sink = fed_clients(srv, "alice")
    sender = fed_clients(prosody_peer, "alice")
    warm_up(sender, sink)
    arrivals = Arrivals(sink, "free-")
    bodies = flood_bodies("free-", N)

    t0 = time.monotonic()
    send_all(sender, sink.bare_jid, bodies)
    arrivals.wait(N, timeout=LIMITED + 10)
    assert_all_in_order(arrivals, bodies, "unlimited flood")
    took = arrivals.times[-1] - t0
    # Well under what the limit of the other test implies (and under the
    # 0.6 x LIMITED that test requires): the limiter did the slowing there.
    assert took < 0.3 * LIMITED, "unlimited flood took %.2f s (limited: %.2f s)" % (
        took, LIMITED)
    no_errors(sender)
    st = srv.stats()
    assert st.get("pauses") == 0 and st.get("streams_closed") == 0, st
    assert "reading paused" not in srv.log()


def test_s2s_byte_limit_slows_big_stanzas_without_closing(rl_xmppd, prosody_peer,
                                                         fed_clients):
    """s2s_bytes alone (set for the s2s listener; the default of 1M/s would
    not be felt): big stanzas are slowed to the byte rate; a stream held
    back by its byte limit is never closed (only the stanza limit counts
    towards abuse_held, here 1 s of a 4 s window)."""
    rate, burst, n = 20000, 4000, 30
    srv = rl_xmppd('    s2s_stanzas = "off";\n'
                   '    listener_limits = ( "@S2S@ s2s_bytes 20k/s burst 4k" );\n'
                   '    abuse_window = 4;\n'
                   '    abuse_held = 1;')
    sink = fed_clients(srv, "alice")
    sender = fed_clients(prosody_peer, "alice")
    warm_up(sender, sink)
    arrivals = Arrivals(sink, "big-")
    bodies = flood_bodies("big-", n, pad="-" + "x" * 2000)
    # At least this many bytes cross the stream (the bodies alone).
    at_least = sum(len(b) for b in bodies)
    implied = (at_least - burst) / rate      # about 2.8 s

    t0 = time.monotonic()
    send_all(sender, sink.bare_jid, bodies)
    arrivals.wait(n, timeout=3 * implied + 10)
    assert_all_in_order(arrivals, bodies, "big stanzas")
    took = arrivals.times[-1] - t0
    assert took >= 0.6 * implied, "%d bytes took %.2f s through a %d bytes/s limit" % (
        at_least, took, rate)
    assert took <= 3 * implied + 3, (took, implied)
    # Held back for longer than abuse_held, yet the stream is still the one
    # it was: the next message needs no new connection.
    assert "reading paused" in srv.log() and "over its byte limit" in srv.log()
    body = uniq("after")
    sender.send_message(sink.bare_jid, body)
    sink.wait_message(body, timeout=10)
    assert not re.search(r"over its stanza limit|closing|policy-violation", srv.log()), \
        srv.log_tail(60)
    assert len(re.findall(r"server prosody\.test authenticated", srv.log())) == 1, \
        srv.log_tail(60)
    no_errors(sender)
    st = srv.stats()
    assert st.get("pauses", 0) >= 1 and st.get("streams_closed") == 0, st
