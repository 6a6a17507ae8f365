"""
mod_jabberspam: the JabberSPAM domain blacklist at the server-to-server layer.

Two setups:
  * a plain xmppd for localhost (no federation): what the list contains is
    seen from a client: a stanza to a listed domain bounces <not-allowed/>
    from mod_jabberspam, one to an unlisted domain gets the core's
    <remote-server-not-found/> (no s2s module).  Matching (case, IDN,
    subdomains), parsing, SIGHUP reloads, malformed lists, and the https
    refresh against a local HTTPS server (thread) with every way it can fail.
  * an xmppd for evil.test in the federation (federation.py) listing
    prosody.test: the real Prosody cannot federate with it either way, the
    real ejabberd can, until a reload lists it; raw s2s streams check the
    <policy-violation/> stream error, subdomains and established streams.

Run: /usr/bin/python3 -m pytest -q tests/integration/test_jabberspam.py
"""

import queue
import re
import signal
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from federation import EJABBERD, EVIL, PROSODY, UNREACHABLE, RawS2S, XmppdPeer
from xmpp_helpers import USERS, XMPPD, RawStream, uniq

pytest_plugins = ["federation"]

ALICE = "alice@localhost"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"


# ====================================================================== helpers

def wait_log(get_log, pattern, since=0, timeout=10.0):
    """Wait until regex pattern appears in get_log()[since:]; returns the match."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, get_log()[since:])
        if m:
            return m
        if time.monotonic() > deadline:
            raise AssertionError("never logged %r; log since mark:\n%s"
                                 % (pattern, get_log()[since:][-4000:]))
        time.sleep(0.05)


def error_of(xml):
    """(condition, text) of the stanza error in xml, or (None, None)."""
    m = re.search(rb"<error\b[^>]*>\s*<([a-z-]+)\b[^>]*%s" % re.escape(STANZAS_NS.encode()),
                  xml)
    t = re.search(rb"<text\b[^>]*>([^<]*)</text>", xml)
    return (m.group(1).decode() if m else None, t.group(1).decode() if t else None)


class Pinger:
    """A raw client stream that pings addresses and reads back the outcome."""

    def __init__(self, server, jid=ALICE):
        self.r = RawStream(server)
        self.r.login(jid, USERS[jid], uniq("r"))

    def reply(self, to):
        """Everything read up to the reply to a ping sent to `to` (verbatim)."""
        ident = uniq("p")
        self.r.send("<iq type='get' id='%s' to='%s'><ping xmlns='urn:xmpp:ping'/></iq>"
                    % (ident, to))
        return self.r.expect(re.compile(
            rb"<iq\b[^>]*\bid=[\"']%s[\"'][^>]*?(?:/>|(?<!/)>.*?</iq>)" % ident.encode(), re.S),
            what="reply to the ping to %s" % to)

    def outcome(self, to):
        """'result' or the error condition of a ping to `to`."""
        got = self.reply(to)
        last = got[got.rfind(b"<iq"):]
        return "result" if re.search(rb"type=[\"']result[\"']", last) else error_of(last)[0]

    def close(self):
        self.r.close()


def assert_listed(p, *domains):
    for d in domains:
        assert p.outcome("someone@%s" % d) == "not-allowed", d


def assert_unlisted(p, *domains):
    for d in domains:
        # no s2s module in these servers: the core's own answer for remote domains
        assert p.outcome("someone@%s" % d) == "remote-server-not-found", d


def hup(srv):
    srv.proc.send_signal(signal.SIGHUP)


@pytest.fixture
def spam_server(xmppd_factory, tmp_path):
    """make(list_text or None, **jabberspam settings) -> (Server, list path)."""
    def make(text="", name="xmppd", **settings):
        path = tmp_path / ("%s-blacklist.txt" % name)
        if text is not None:
            path.write_text(text)
        settings.setdefault("file", str(path))
        conf = "".join("%s = %s; " % (k, '"%s"' % v if isinstance(v, str) else v)
                       for k, v in settings.items())
        srv = xmppd_factory(name=name, modules=("c2s", "jabberspam"),
                            extra="jabberspam = { %s};\n" % conf)
        return srv, path
    return make


@pytest.fixture
def pingers():
    made = []

    def make(server, jid=ALICE):
        p = Pinger(server, jid)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


# ====================================================================== the list

LIST = """\
# JabberSPAM blacklist (test copy)

Spam.Example
b\u00fccher.test.          # IDN as U-label, with the root dot
xn--caf-dma.test          # IDN as A-label (caf\u00e9.test)
*.wild.test
   padded.test   \t
dup.test
DUP.test
bad..name
has space
<html>
"""


def test_matching_case_idn_subdomains(spam_server, pingers):
    srv, path = spam_server(LIST)
    log = srv.log()
    # bad lines: reported with file:line, skipped; the rest loaded
    for line, text in ((10, "bad..name"), (11, "has space"), (12, "<html>")):
        assert "%s:%d: '%s' is not a domain name; skipped" % (path, line, text) in log, log
    assert re.search(r"jabberspam: read \S+ \(12 lines, 3 skipped, 1 duplicates\): 6 listed "
                     r"domains", log), log
    p = pingers(srv)
    refused = ["spam.example", "SPAM.EXAMPLE", "chat.spam.example", "a.b.Spam.Example",
               "xn--bcher-kva.test", "B\u00dcCHER.test", "muc.b\u00fccher.test",
               "caf\u00e9.test", "CAF\u00c9.TEST", "xn--caf-dma.test", "wild.test",
               "x.wild.test", "padded.test", "dup.test", "spam.example."]
    assert_listed(p, *refused)
    # a suffix that is not at a label boundary, parents, look-alikes: not listed
    assert_unlisted(p, "notspam.example", "example", "spam.example.org", "bucher.test",
                    "cafe.test", "name", "bad.name", "wild.test.org")
    # the domain itself (no localpart) and a full JID too; the error names the list
    assert p.outcome("spam.example") == "not-allowed"
    cond, text = error_of(p.reply("bob@chat.spam.example/res"))
    assert cond == "not-allowed" and "spam.example" in text and "JabberSPAM" in text, text
    # one info line per refused stanza, with the matching entry
    mark = len(srv.log())
    p.outcome("x@deep.sub.spam.example")
    wait_log(srv.log, r"jabberspam: refused a <iq/> from alice@localhost/\S+ to "
             r"x@deep\.sub\.spam\.example: spam\.example is on the JabberSPAM list", mark)
    # counted: SIGUSR1 writes the counters
    mark = len(srv.log())
    srv.proc.send_signal(signal.SIGUSR1)
    n = len(refused) + 3
    wait_log(srv.log, r"stats: jabberspam\.stanzas_refused=%d\b" % n, mark)


def test_message_to_listed_domain_bounces(spam_server, pingers):
    srv, _ = spam_server("spam.example\n")
    p = pingers(srv)
    p.r.send("<message to='eve@spam.example' id='m1' type='chat'><body>hi</body></message>")
    got = p.r.expect(re.compile(rb"<message\b[^>]*\bid=[\"']m1[\"'][^>]*>.*?</message>", re.S))
    assert re.search(rb"type=[\"']error[\"']", got) and error_of(got)[0] == "not-allowed", got
    assert re.search(rb"from=[\"']eve@spam\.example[\"']", got), got
    # an error stanza to a listed domain is not answered (never an error loop)
    p.r.send("<message to='eve@spam.example' id='m2' type='error'><error type='cancel'>"
             "<item-not-found xmlns='%s'/></error></message>" % STANZAS_NS)
    got = p.reply("spam.example")   # everything up to this reply, in order
    assert error_of(got)[0] == "not-allowed" and b"m2" not in got, got


def test_reload_adds_removes_and_bad_files_keep_the_list(spam_server, pingers):
    srv, path = spam_server("one.test\n", max_size=1024)
    p = pingers(srv)
    assert_listed(p, "one.test")
    assert_unlisted(p, "two.test")

    def reload(expect):
        mark = len(srv.log())
        hup(srv)
        return wait_log(srv.log, expect, mark)

    path.write_text("one.test\ntwo.test\n")
    reload(r"jabberspam: read \S+ .*: 2 listed domains \(1 added, 0 removed\)")
    assert_listed(p, "one.test", "two.test", "x.two.test")

    # malformed: an HTML page, binary data, too big, no file at all: the list stays
    for content, why in (
            ("<html>\n<head><title>404 Not Found</title></head>\n<body>\nNot Found\n"
             "</body>\n</html>\n", r"6 of its 6 entries are not domain names \(line 1: '<html>'\)"),
            ("three.test\n\0\x01\x02garbage\n", r"binary data \(a NUL byte\) at line 2"),
            ("three.test\n" * 100, r"1100 bytes, more than max_size \(1024\)"),
            (None, r"cannot open it: No such file or directory")):
        if content is None:
            path.unlink()
        else:
            path.write_text(content)
        reload(r"jabberspam: %s not reloaded: %s[^\n]*; keeping the current list \(2 domains\)"
               % (re.escape(str(path)), why))
        assert_listed(p, "one.test", "two.test")
        assert_unlisted(p, "three.test")

    # a typo among good lines: skipped, reported, the rest replaces the list
    path.write_text("two.test\nthree..test\nfour.test\n")
    reload(r"read \S+ \(3 lines, 1 skipped, 0 duplicates\): 2 listed domains "
           r"\(1 added, 1 removed\)")
    assert "%s:2: 'three..test' is not a domain name" % path in srv.log()
    assert_listed(p, "two.test", "four.test")
    assert_unlisted(p, "one.test")
    # an empty file is the operator's choice: nothing is refused any more
    path.write_text("# nothing\n")
    reload(r"0 listed domains \(0 added, 2 removed\)")
    assert_unlisted(p, "two.test", "four.test")


@pytest.mark.parametrize("settings,key,msg", [
    ({"url": "http://127.0.0.1/list.txt"}, "url", "must be an https:// URL"),
    ({"refresh_interval": 0, "url": "https://127.0.0.1/l"}, "refresh_interval", "must be from"),
    ({"max_size": 10}, "max_size", "must be from"),
    ({"timeout": 0}, "timeout", "must be from"),
    ({"file": "/nonexistent/blacklist.txt"}, "file", "cannot open it"),
    ({"ca_file": "/nonexistent/ca.pem", "url": "https://127.0.0.1/l"}, "ca_file",
     "cannot read"),
    ({"bogus": 1}, "bogus", ""),
])
def test_bad_settings_refused_at_load(xmppd_factory, tmp_path, settings, key, msg):
    path = tmp_path / "blacklist.txt"
    path.write_text("spam.example\n")
    settings = dict({"file": str(path)}, **settings)
    conf = "".join("%s = %s; " % (k, '"%s"' % v if isinstance(v, str) else v)
                   for k, v in settings.items())
    srv = xmppd_factory(start=False, users={}, modules=("c2s", "jabberspam"),
                        extra="jabberspam = { %s};\n" % conf)
    r = subprocess.run([str(XMPPD), "--check-config", str(srv.config_path)],
                       capture_output=True, text=True, timeout=20)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert key in out and msg in out, out


# ====================================================================== the download

def certtool(*args):
    subprocess.run(["certtool", *map(str, args)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def untrusted_cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (not from the test CA)."""
    d = tmp_path_factory.mktemp("untrusted")
    (d / "t").write_text('cn = "127.0.0.1"\nip_address = "127.0.0.1"\ndns_name = "localhost"\n'
                         "expiration_days = 3\ntls_www_server\nsigning_key\n")
    certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", d / "key.pem")
    certtool("--generate-self-signed", "--load-privkey", d / "key.pem", "--template", d / "t",
             "--outfile", d / "cert.pem")
    return str(d / "cert.pem"), str(d / "key.pem")


class ListServer:
    """HTTPS on 127.0.0.1 (certificate from the test CA) serving the list at
    /blacklist.txt; mode: "ok", "404", "badtls" (an untrusted certificate),
    "nolength" (body without Content-Length), "hang" (answers after 3 s)."""

    def __init__(self, certs, untrusted):
        self.body = b""
        self.mode = "ok"
        self.hits = 0
        self.good = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.good.load_cert_chain(certs["cert"], certs["key"])
        self.bad = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.bad.load_cert_chain(*untrusted)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner.hits += 1
                if owner.mode == "hang":
                    time.sleep(3)
                if owner.mode == "404" or self.path != "/blacklist.txt":
                    body = b"<html><body>Not Found</body></html>\n"
                    self.send_response(404)
                else:
                    body = owner.body
                    self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                if owner.mode != "nolength":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(HTTPServer):
            def handle_error(self, request, client_address):
                pass   # a client that gave up (the "hang" mode) is expected

            def get_request(self):
                sock, addr = self.socket.accept()
                sock.settimeout(5)
                try:
                    ctx = owner.bad if owner.mode == "badtls" else owner.good
                    return ctx.wrap_socket(sock, server_side=True), addr
                except OSError:
                    sock.close()
                    raise

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = "https://127.0.0.1:%d/blacklist.txt" % self.port
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def list_server(certs, untrusted_cert):
    s = ListServer(certs, untrusted_cert)
    yield s
    s.close()


def test_download_replaces_the_list_and_failures_keep_it(spam_server, pingers, list_server,
                                                          certs, tmp_path):
    ls = list_server
    ls.body = b"# from the URL\nfirst.test\n"
    cache = tmp_path / "cache" / "blacklist.txt"
    cache.parent.mkdir()
    # no file yet: the server starts with an empty list and downloads at once
    srv, _ = spam_server(None, file=str(cache), url=ls.url, ca_file=certs["ca"],
                         refresh_interval=3600, max_size=4096, timeout=2)
    wait_log(srv.log, r"jabberspam: downloaded %s \(2 lines, 0 skipped, 0 duplicates\): "
             r"1 listed domains \(1 added, 0 removed\)" % re.escape(ls.url))
    assert cache.read_bytes() == ls.body          # saved before use
    assert not list(cache.parent.glob("blacklist.txt.*"))   # no temp file left
    p = pingers(srv)
    assert_listed(p, "first.test", "sub.first.test")

    def refresh(expect):
        mark = len(srv.log())
        hup(srv)     # re-reads the file and downloads now
        return wait_log(srv.log, expect, mark)

    ls.body = b"first.test\nsecond.test\n"
    refresh(r"downloaded \S+ .*: 2 listed domains \(1 added, 0 removed\)")
    assert cache.read_bytes() == ls.body
    assert_listed(p, "first.test", "second.test")

    good = cache.read_bytes()
    failures = [
        ("404", None, r"HTTP status 404"),
        ("ok", b"<!DOCTYPE html>\n<html>\n<p>Moved</p>\n</html>\n",
         r"4 of its 4 entries are not domain names"),
        ("ok", b"", r"no domain in it"),
        ("ok", b"# only comments\n\n", r"no domain in it"),
        ("ok", b"first.test\n\0binary\n", r"binary data"),
        ("nolength", b"x.test\n" * 1000, r"larger than max_size \(4096 bytes\)"),
        ("ok", b"x.test\n" * 1000, r"larger than max_size \(4096 bytes\)"),
        ("badtls", b"third.test\n", r"certificate verification failed"),
    ]
    for mode, body, why in failures:
        ls.mode = mode
        if body is not None:
            ls.body = body
        refresh(r"jabberspam: download of %s failed: [^\n]*(%s)[^\n]*; keeping the current list "
                r"\(2 domains\); next attempt in 3600 s" % (re.escape(ls.url), why))
        assert cache.read_bytes() == good, mode
        assert_listed(p, "first.test", "second.test")
        assert_unlisted(p, "third.test", "x.test")
    # a server that does not answer: the download times out, and meanwhile the
    # server goes on serving (the transfer runs on the event loop, not in it)
    ls.mode = "hang"
    mark = len(srv.log())
    hup(srv)
    wait_log(srv.log, r"jabberspam: downloading ", mark)
    t0 = time.monotonic()
    for _ in range(5):
        assert_listed(p, "first.test")
    assert time.monotonic() - t0 < 1.0
    wait_log(srv.log, r"download of \S+ failed: [^\n]*[Tt]imed out[^\n]*; keeping the current "
             r"list \(2 domains\)", mark)
    failures.append(("hang", None, None))
    # and it recovers
    ls.mode, ls.body = "ok", b"third.test\n"
    refresh(r"downloaded \S+ .*: 1 listed domains \(1 added, 2 removed\)")
    assert_listed(p, "third.test")
    assert_unlisted(p, "first.test")
    mark = len(srv.log())
    srv.proc.send_signal(signal.SIGUSR1)
    wait_log(srv.log, r"stats: jabberspam\.downloads_failed=%d\b" % len(failures), mark)
    wait_log(srv.log, r"stats: jabberspam\.downloads=3\b", mark)


def test_scheduled_refresh_and_fresh_cache(spam_server, pingers, list_server, certs, tmp_path):
    ls = list_server
    ls.body = b"new.test\n"
    cache = tmp_path / "blacklist.txt"
    cache.write_text("old.test\n")   # fresh (mtime now): no download before 2 s
    srv, _ = spam_server(None, file=str(cache), url=ls.url, ca_file=certs["ca"],
                         refresh_interval=2, retry_interval=1)
    t0 = time.monotonic()
    p = pingers(srv)
    assert_listed(p, "old.test")
    assert ls.hits == 0
    wait_log(srv.log, r"downloaded \S+ .*: 1 listed domains \(1 added, 1 removed\)", timeout=6)
    assert time.monotonic() - t0 > 1.0
    assert_listed(p, "new.test")
    assert_unlisted(p, "old.test")
    # a failure is retried after retry_interval, then the list follows the URL again
    ls.mode = "404"
    mark = len(srv.log())
    wait_log(srv.log, r"HTTP status 404; keeping the current list \(1 domains\); next attempt "
             r"in 1 s", mark, timeout=6)
    ls.mode, ls.body = "ok", b"newer.test\n"
    wait_log(srv.log, r"downloaded \S+ .*: 1 listed domains \(1 added, 1 removed\)", mark,
             timeout=6)
    assert_listed(p, "newer.test")


# ====================================================================== federation

class SpamPeer(XmppdPeer):
    """xmppd for evil.test in the federation (s2s_external + jabberspam)."""

    wait_timeout = 15.0

    def __init__(self, fed, list_text):
        super().__init__(fed, EVIL, modules=("c2s", "roster", "s2s_external", "jabberspam"),
                         s2s_options="allow_subdomains = true;", name="xmppd (jabberspam)")
        self.list_path = self.dir / "blacklist.txt"
        self.list_path.write_text(list_text)
        self.extra = 'jabberspam = { file = "%s"; };\n' % self.list_path
        self.write_config()

    def set_list(self, text):
        """Write the list and SIGHUP; returns once it is in force."""
        self.list_path.write_text(text)
        mark = self.mark()
        self.proc.send_signal(signal.SIGHUP)
        self.wait_log(r"jabberspam: read %s " % re.escape(str(self.list_path)), mark)


BASE_LIST = "# the federation test list\nprosody.test\nspam.unreachable.test\n"


@pytest.fixture(scope="module")
def spam_peer(federation):
    srv = SpamPeer(federation, BASE_LIST).launch()
    yield srv
    rc = srv.terminate()
    assert rc == 0, srv.log_tail()


@pytest.fixture
def spam(spam_peer):
    """The federation xmppd with the base list in force."""
    if spam_peer.list_path.read_text() != BASE_LIST:
        spam_peer.set_list(BASE_LIST)
    return spam_peer


def message_errors(client):
    q = queue.Queue()
    client.lt.call(lambda: client.xmpp.add_event_handler("message_error", q.put))
    return q


def iq_error(client, jid, timeout=20):
    """The error condition of a ping to jid (AssertionError if it succeeded)."""
    from slixmpp.exceptions import IqError
    try:
        r = client.ping(jid, timeout=timeout)
    except IqError as e:
        return e.iq["error"]["condition"], e.iq["error"]["text"]
    raise AssertionError("ping to %s succeeded: %s" % (jid, r))


def test_listed_peer_cannot_reach_us(spam, prosody_peer, fed_clients):
    ours = fed_clients(spam, "alice")
    theirs = fed_clients(prosody_peer, "alice")
    mark, pmarks = spam.mark(), prosody_peer.log_marks()
    theirs.send_message(ours.bare_jid, "spam from a listed domain")
    cond, text = iq_error(theirs, EVIL)
    # Prosody passes our stream error on to its user
    assert cond in ("remote-server-not-found", "remote-server-timeout"), (cond, text)
    assert "policy-violation" in text and "JabberSPAM" in text, text
    # refused at authentication, and said so on the wire: <policy-violation/>
    spam.wait_log(r"jabberspam: refused the server stream from prosody\.test \(\S+, "
                  r"certificate verified\): prosody\.test is on the JabberSPAM list", mark)
    assert not re.search(r"server prosody\.test authenticated", spam.log()[mark:])
    prosody_peer.wait_log("Outgoing s2s stream prosody.test->evil.test closed: "
                          "policy-violation", timeout=10, since=pmarks)
    time.sleep(0.5)
    assert not [m for m in ours.drain_messages() if m["body"] == "spam from a listed domain"]


def test_we_cannot_reach_listed_peer(spam, prosody_peer, fed_clients):
    ours = fed_clients(spam, "bob")
    theirs = fed_clients(prosody_peer, "bob")
    errors = message_errors(ours)
    mark, pmarks = spam.mark(), prosody_peer.log_marks()
    ours.send_message(theirs.bare_jid, "to a listed domain")
    m = errors.get(timeout=10)
    assert str(m["from"]) == theirs.bare_jid, str(m)
    assert m["error"]["condition"] == "not-allowed" and m["error"]["type"] == "cancel", str(m)
    assert "prosody.test is on this server's blacklist" in m["error"]["text"], str(m)
    assert iq_error(ours, PROSODY, timeout=10)[0] == "not-allowed"
    spam.wait_log(r"jabberspam: refused a <message/> from bob@evil\.test/\S+ to "
                  r"bob@prosody\.test: prosody\.test is on the JabberSPAM list", mark)
    spam.wait_log(r"jabberspam: refused a <iq/> from bob@evil\.test/\S+ to prosody\.test", mark)
    # no stream was even tried: no route, no DNS, nothing at Prosody
    time.sleep(0.5)
    assert not re.search(r"evil\.test -> prosody\.test", spam.log()[mark:])
    assert "evil.test" not in prosody_peer.log_since(pmarks)
    assert not [x for x in theirs.drain_messages() if x["body"] == "to a listed domain"]


def converse(fed_clients, spam, peer, tag):
    a = fed_clients(spam, "alice")
    b = fed_clients(peer, "bob")
    body = "%s: to %s" % (tag, peer.domain)
    a.send_message(b.bare_jid, body)
    assert str(b.wait_message(body, timeout=15)["from"]) == a.full_jid
    body = "%s: from %s" % (tag, peer.domain)
    b.send_message(a.full_jid, body)
    assert str(a.wait_message(body, timeout=15)["from"]) == b.full_jid
    return a, b


def test_unlisted_peer_federates_both_ways(spam, ejabberd_peer, fed_clients):
    a, b = converse(fed_clients, spam, ejabberd_peer, "unlisted")
    assert a.ping(EJABBERD, timeout=15)["type"] == "result"
    assert b.ping(EVIL, timeout=15)["type"] == "result"
    spam.wait_log(r"server ejabberd\.test authenticated \(SASL EXTERNAL\)")


def cert_for(fed, tmp_path, name, key):
    tmpl = tmp_path / ("%s.tmpl" % name)
    tmpl.write_text('cn = "%s"\ndns_name = "%s"\nserial = %d\nexpiration_days = 3\n'
                    "tls_www_server\ntls_www_client\nsigning_key\nencryption_key\n"
                    % (name, name, int(time.time()) % 100000 + 5000))
    out = tmp_path / ("%s.pem" % name)
    certtool("--generate-certificate", "--load-privkey", key, "--load-ca-certificate",
             fed.certs.ca, "--load-ca-privkey", fed.certs.ca_key, "--template", tmpl,
             "--outfile", out)
    return str(out)


def test_raw_streams_policy_violation_subdomains_and_reload(spam, federation, fed_clients,
                                                            tmp_path):
    fed = federation
    opened = []

    def raw(me, cert, key):
        r = RawS2S(fed, spam, me, cert, key)
        opened.append(r)
        return r

    try:
        # a listed domain, and a subdomain of one, proven by CA-signed certificates
        pc = fed.certs[PROSODY]
        sub_cert = cert_for(fed, tmp_path, "chat.prosody.test", pc.key)
        for me, cert in ((PROSODY, pc.cert), ("chat.prosody.test", sub_cert)):
            mark = spam.mark()
            r = raw(me, cert, pc.key)
            # refused as soon as the certificate proves the domain: no SASL offered
            assert r.stream_error(r.starttls()) == "policy-violation"
            spam.wait_log(r"refused the server stream from %s \(\S+, certificate verified\): "
                          r"prosody\.test is on the JabberSPAM list" % re.escape(me), mark)
        # a certificate that does not prove the claim is mod_s2s_external's to refuse
        mark = spam.mark()
        r = raw(PROSODY, fed.certs[UNREACHABLE].cert, fed.certs[UNREACHABLE].key)
        assert r.stream_error(r.starttls()) == "not-authorized"
        assert "jabberspam" not in spam.log()[mark:]

        # unlisted unreachable.test gets in; a listed subdomain of it does not speak
        victim = fed_clients(spam, "alice")
        uc = fed.certs[UNREACHABLE]
        r = raw(UNREACHABLE, uc.cert, uc.key)
        r.authenticate()
        mark = spam.mark()
        r.send("<message from='eve@spam.unreachable.test/x' to='%s' type='chat'>"
               "<body>from a listed subdomain</body></message>" % victim.full_jid)
        r.send("<message from='eve@ok.unreachable.test/x' to='%s' type='chat'>"
               "<body>from an unlisted one</body></message>" % victim.full_jid)
        assert str(victim.wait_message("from an unlisted one", timeout=10)["from"]) == \
            "eve@ok.unreachable.test/x"
        spam.wait_log(r"dropped a <message/> from spam\.unreachable\.test \(stream of "
                      r"unreachable\.test\)", mark)
        assert not [m for m in victim.drain_messages()
                    if m["body"] == "from a listed subdomain"]

        # a reload lists it: the established stream is closed at its next stanza
        spam.set_list(BASE_LIST + "UNREACHABLE.TEST.\n")
        mark = spam.mark()
        r.send("<message from='eve@unreachable.test/x' to='%s' type='chat'>"
               "<body>after the reload</body></message>" % victim.full_jid)
        assert r.stream_error() == "policy-violation"
        spam.wait_log(r"closing the server stream from unreachable\.test \(\S+\): "
                      r"unreachable\.test is on the JabberSPAM list", mark)
        # and a new stream is refused at authentication
        r2 = raw(UNREACHABLE, uc.cert, uc.key)
        assert r2.stream_error(r2.starttls()) == "policy-violation"

        # listed between the features and <auth/>: XD_HOOK_S2S_AUTH refuses it
        spam.set_list(BASE_LIST)
        r3 = raw(UNREACHABLE, uc.cert, uc.key)
        assert b"EXTERNAL" in r3.starttls()
        spam.set_list(BASE_LIST + "unreachable.test\n")
        mark = spam.mark()
        # refused before <success/>, on the same stream: SASL failure, then
        # the stream error the peer can read
        r3.sasl(expect=r"<failure[^>]*><not-authorized/></failure>")
        assert r3.stream_error() == "policy-violation"
        spam.wait_log(r"jabberspam: refused the server stream from unreachable\.test "
                      r"\(\S+\): unreachable\.test is on the JabberSPAM list", mark)
        spam.wait_log(r"server unreachable\.test refused by a module", mark)
        time.sleep(0.3)
        assert not [m for m in victim.drain_messages() if m["body"] == "after the reload"]
    finally:
        for r in opened:
            r.close()


def test_reload_cuts_off_a_federated_peer(spam, ejabberd_peer, fed_clients):
    """Last: ejabberd remembers the refusal for a while (shared peer)."""
    a, b = converse(fed_clients, spam, ejabberd_peer, "before the reload")
    errors = message_errors(a)
    spam.set_list(BASE_LIST + "# added by the operator\nejabberd.test\n")
    mark, emarks = spam.mark(), ejabberd_peer.log_marks()
    # ours -> theirs: bounced at once, the open stream to ejabberd is not used
    a.send_message(b.bare_jid, "after the reload, out")
    m = errors.get(timeout=10)
    assert m["error"]["condition"] == "not-allowed", str(m)
    spam.wait_log(r"refused a <message/> from alice@evil\.test/\S+ to bob@ejabberd\.test: "
                  r"ejabberd\.test is on the JabberSPAM list", mark)
    # theirs -> ours: the established stream is closed at its next stanza (or, if
    # ejabberd had let it go idle, the new one is refused); then a new stream is
    # refused at authentication; nothing arrives
    b.send_message(a.full_jid, "after the reload, in 1")
    spam.wait_log(r"(closing|refused) the server stream from ejabberd\.test", mark)
    b.send_message(a.full_jid, "after the reload, in 2")
    spam.wait_log(r"refused the server stream from ejabberd\.test \(\S+, certificate verified\)",
                  mark)
    ejabberd_peer.wait_log("Stream closed by peer: your domain is on this server's blacklist "
                           "(JabberSPAM) (policy-violation)", timeout=10, since=emarks)
    assert not re.search(r"evil\.test -> ejabberd\.test: (connecting|stream authenticated)",
                         spam.log()[mark:])
    time.sleep(0.5)
    assert not [x for x in a.drain_messages() if x["body"].startswith("after the reload")]
