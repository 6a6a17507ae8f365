"""
The sample configuration (config/xmppd.cfg), as scripts/run-dev.sh makes it,
with every module it lists — all the spam-control layers at once — serving
real clients.  Only the ports, the certificate and the outside world are
changed: the listeners move to free ports, the certificate is the test CA's,
and federation is pointed at a closed local port so that nothing (the RTBL
subscription to xmppbl.org, say) ever leaves the machine.
"""

import re
import signal
import subprocess
import time

import pytest

from xmpp_helpers import (MALLORY, MODULE_DIR, REPO, XMPPD, free_port, port_accepts, uniq)

ALICE, BOB = "alice@localhost", "bob@localhost"


def sample_config(tmp, srv, certs, patterns):
    """scripts/dev-config.sh's output, adapted to the test (see the docstring)."""
    dev = tmp / "dev"
    subprocess.run([str(REPO / "scripts" / "dev-config.sh"), str(dev)], check=True, timeout=30)
    text = (dev / "xmppd.cfg").read_text()
    dead = "127.0.0.1:%d" % free_port()      # nothing listens there
    subs = [
        (r'^data_dir *=.*$', 'data_dir = "%s";' % srv.data_dir),
        (r'^module_dir *=.*$', 'module_dir = "%s";' % MODULE_DIR),
        (r'cert = "[^"]*"', 'cert = "%s"' % certs["cert"]),
        (r'key = "[^"]*"', 'key = "%s"' % certs["key"]),
        (r'port = 5222; tls = "starttls"; },\n  \{ stream = "c2s"; address = "::1"; *port = 5222;'
         r' tls = "starttls"; },',
         'port = %d; tls = "starttls"; },' % srv.starttls_port),
        (r'port = 5223;', 'port = %d;' % srv.direct_port),
        (r'port = 5269;', 'port = %d;' % free_port()),
        (r'# dns_servers = .*$', 'dns_servers = "%s";' % dead),
        (r'# static_routes = .*$', 'static_routes = ( "xmppbl.org=%s" );' % dead),
        (r'file = "[^"]*patterns.txt";', 'file = "%s";' % patterns),
        (r'^log_level = .*$', 'log_level = "debug";'),
    ]
    for rx, repl in subs:
        text, n = re.subn(rx, repl, text, flags=re.M)
        assert n >= 1, "the sample config no longer has %r" % rx
    live = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in live if "5222" in ln or "5269" in ln], "a default port is left"
    return text


@pytest.fixture
def sample(xmppd_factory, certs, tmp_path):
    srv = xmppd_factory(name="sample", extra_users=[MALLORY], start=False)
    patterns = tmp_path / "patterns.txt"
    patterns.write_text("# test rules\nlit/i:cheap followers\nre:\\bfree\\s+bitcoin\\b\n")
    srv.config_path.write_text(sample_config(tmp_path, srv, certs, patterns))
    srv.listeners = [(srv.host, srv.starttls_port, "starttls"),
                     (srv.host, srv.direct_port, "direct")]
    chk = subprocess.run([str(XMPPD), "--check-config", str(srv.config_path)],
                         capture_output=True, text=True, timeout=30)
    assert chk.returncode == 0, chk.stderr
    srv.start()
    return srv


def stats(srv, timeout=5.0):
    """SIGUSR1, then the counters the log shows: {"module.name": n}."""
    mark = len(srv.log())
    srv.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = srv.log()[mark:]
        if "stats: " in new:
            time.sleep(0.2)       # the whole batch is written in one loop turn
            new = srv.log()[mark:]
            return {k: int(v) for k, v in re.findall(r"stats: (\S+)=(\d+)", new)}
        time.sleep(0.05)
    raise AssertionError("no stats lines after SIGUSR1")


def test_every_module_of_the_sample_config_loads(sample):
    text = sample.config_path.read_text()
    listed = re.search(r"^modules = \((.*)\);", text, re.M).group(1)
    names = re.findall(r'"(\w+)"', listed)
    for layer in ("ratelimit", "jabberspam", "rtbl", "pattern_filter", "strangers",
                  "blocking"):
        assert layer in names, "the sample config does not enable %s" % layer
    log = sample.log()
    assert "started with %d module(s)" % len(names) in log, log[-2000:]


def test_all_layers_together(sample, clients):
    alice = clients(sample, ALICE + "/desk")
    bob = clients(sample, BOB + "/phone")
    mallory = clients(sample, MALLORY[0] + "/x", password=MALLORY[1])
    for c in (alice, bob, mallory):
        c.must_login()
        c.send_presence()
    # bob knows alice: her messages pass every layer
    bob.iq(None, "<query xmlns='jabber:iq:roster'><item jid='%s'/></query>" % ALICE, "set")
    hello = uniq("hello from a contact")
    alice.send_message(BOB, hello)
    assert bob.wait_message(hello)["body"] == hello

    # a stranger's spam never arrives: the pattern filter drops it ...
    spam = uniq("buy CHEAP followers now")
    mallory.send_message(BOB, spam)
    # ... and an innocent first message from the stranger is held for approval
    first = uniq("hi bob, it's mallory")
    mallory.send_message(BOB, first)
    notice = bob.wait_message(timeout=5)
    assert str(notice["from"]) == "localhost" and MALLORY[0] in notice["body"], notice
    mallory.ping_server()
    time.sleep(0.3)
    bodies = [m["body"] for m in bob.drain_messages()]
    assert spam not in bodies and first not in bodies, bodies

    # bob accepts mallory: the held message arrives, the spam never does
    bob.iq(None, "<query xmlns='jabber:iq:roster'><item jid='%s'/></query>" % MALLORY[0],
           "set")
    got = bob.wait_message(first)
    assert got["body"] == first
    time.sleep(0.3)
    assert spam not in [m["body"] for m in bob.drain_messages()]

    counts = stats(sample)
    assert counts.get("pattern_filter.dropped") == 1, counts
    assert counts.get("strangers.held") == 1 and counts.get("strangers.released") == 1, counts
    # the limiter saw everything and stopped nothing
    assert counts.get("ratelimit.connections_refused", 0) == 0, counts

    # the RTBL service (xmppbl.org, unreachable here) failing does not stop
    # anyone: the server keeps serving, and retries
    assert "rtbl" in sample.log()
    alice.send_message(BOB, "still here")
    assert bob.wait_message("still here")["body"] == "still here"


def test_direct_tls_listener_of_the_sample(sample, clients):
    c = clients(sample, ALICE + "/direct", transport="direct")
    c.must_login()
    assert c.is_tls
    assert port_accepts(sample.host, sample.starttls_port)
