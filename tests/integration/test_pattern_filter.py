"""mod_pattern_filter: operator patterns (literals and PCRE2 regexes) matched
against message bodies and subscription-request texts from strangers/remote
senders; a match is dropped silently, counted and logged with the rule's
file:line.  Real clients over TLS; the pattern file lives in the test's tmp dir.

The 10,000-pattern throughput check is a benchmark, not a test:
bench/pattern_filter.py.
"""

import random
import re
import signal
import subprocess
import time
from xml.sax.saxutils import escape

from xmpp_helpers import MALLORY, USERS, XMPPD, line_of, uniq

ALICE, BOB = "alice@localhost", "bob@localhost"
PASSWORDS = dict(USERS)
PASSWORDS[MALLORY[0]] = MALLORY[1]

# Each rule names its own line, so a drop can be checked against file:line.
PATTERNS = """\
# spam rules for the tests
re:casino\\d{2,}
lit:cheap-pills.example
lit/i:ÜBERWEISUNG SOFORT
re/i:free\\s+bitcoins?\\b
re:\\p{Cyrillic}{10,}
lit:CaseSensitive
  # an indented comment, then a blank line

lit/i:ΟΔΟΣ
re:(?:win|won)\\s+an?\\s+iphone
lit:Straße 12
""" + "   plain literal with blanks around   \n"   # (trailing blanks kept on purpose)


def make_server(xmppd_factory, tmp_path, patterns=PATTERNS, scope=None, settings=""):
    """A server with c2s, roster and pattern_filter; mallory exists too."""
    path = tmp_path / "patterns.txt"
    path.write_text(patterns, encoding="utf-8")
    conf = 'file = "%s"; %s' % (path, settings)
    if scope is not None:
        conf += " scope = ( %s );" % ", ".join('"%s"' % s for s in scope)
    srv = xmppd_factory(modules=("c2s", "roster", "pattern_filter"),
                        extra="pattern_filter = { %s };\n" % conf,
                        extra_users=[MALLORY], log_level="info")
    srv.patterns = path
    return srv


def login(clients, srv, jid, resource="t"):
    c = clients(srv, "%s/%s" % (jid, resource), password=PASSWORDS[jid]).must_login()
    c.send_presence()
    return c


def send_raw(client, xml):
    client.lt.call(lambda: client.xmpp.send_raw(xml))


def send_body(client, to, body, extra=""):
    send_raw(client, "<message to='%s' type='chat' id='%s'><body>%s</body>%s</message>"
             % (to, uniq("m"), escape(body), extra))


def delivered(sender, receiver, bodies):
    """Send each body from sender to receiver, then a marker; once the marker
    is there every earlier message has been routed (one stream, in order).
    Returns the bodies that arrived, in order."""
    marker = uniq("marker")
    for b in bodies:
        send_body(sender, receiver.jid.split("/")[0], b)
    send_body(sender, receiver.jid.split("/")[0], marker)
    receiver.wait_message(marker, timeout=10)
    got = [m for m in getattr(receiver, "skipped", [])] + receiver.drain_messages()
    receiver.skipped = []
    return [m["body"] for m in got]


def wait_log(srv, pattern, timeout=5.0, what=None):
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = rx.search(srv.log())
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError("log never showed %s\n--- log ---\n%s"
                         % (what or pattern, srv.log_tail(60)))


def stats(srv):
    """SIGUSR1, then the module's counters from the log (the last values;
    scan_ns is the last of them)."""
    last = "stats: pattern_filter.scan_ns="
    before = srv.log().count(last)
    srv.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while srv.log().count(last) == before:
        assert time.monotonic() < deadline, "no stats after SIGUSR1:\n" + srv.log_tail(30)
        time.sleep(0.02)
    out = {}
    for name, n in re.findall(r"stats: pattern_filter\.(\w+)=(\d+)", srv.log()):
        out[name] = int(n)
    return out


# --------------------------------------------------------------------------- tests

def test_matching_bodies_are_dropped_near_misses_arrive(xmppd_factory, tmp_path, clients):
    srv = make_server(xmppd_factory, tmp_path)
    alice = login(clients, srv, ALICE)
    bob = login(clients, srv, BOB)
    # alice is not in bob's roster: a stranger, in the default scope
    cases = [
        ("come to casino77 tonight", True),          # regex
        ("casino7 has one digit", False),            # near miss of the regex
        ("Casino77 with a capital", False),          # the regex is case-sensitive
        ("visit cheap-pills.example now", True),     # literal
        ("visit cheap-pills-example now", False),    # near miss
        ("bitte überweisung sofort!", True),         # caseless literal, folded Ü
        ("bitte UEBERWEISUNG SOFORT", False),        # not the same letters
        ("get FREE \t  Bitcoins today", True),       # caseless regex, \s+
        ("freebitcoins", False),                     # \s+ needs a blank
        ("здравствуйте товарищ", True),              # 12 Cyrillic letters in a row
        ("привет мир", False),                       # 6 and 3
        ("CaseSensitive", True),
        ("casesensitive", False),
        ("in der Straße 12 links", True),            # case-sensitive, not ASCII
        ("in der straße 12 links", False),
        ("IN DER STRAẞE 12", False),
        ("το τέλος της οδος", True),                 # final sigma folds like Σ
        ("οδο", False),
        ("you WON an iphone", False),                # case-sensitive regex
        ("you won an iphone", True),
        ("a plain literal with blanks around it", True),  # the plain line, trimmed
        ("plain literal with  blanks", False),
        ("", False),                                 # an empty body is no match
    ]
    got = delivered(alice, bob, [b for b, _ in cases])
    expect = [b for b, dropped in cases if not dropped]
    assert got == expect, "delivered %r, expected exactly %r" % (got, expect)

    # one log line per drop, naming the rule's file:line and the sender
    log = srv.log()
    casino_line = line_of(PATTERNS, "re:casino")
    assert re.search(r"pattern_filter: dropped message from alice@localhost/t to "
                     r"bob@localhost\S*: rule %s:%d " % (re.escape(str(srv.patterns)), casino_line),
                     log), log[-3000:]
    assert "%s:%d" % (srv.patterns, line_of(PATTERNS, "ΟΔΟΣ")) in log

    # a second body (another xml:lang) is scanned too
    spam_de = uniq("x") + " casino99"
    send_raw(alice, "<message to='%s' type='chat'><body>hello</body>"
                    "<body xml:lang='de'>%s</body></message>" % (BOB, spam_de))
    assert delivered(alice, bob, []) == []

    st = stats(srv)
    n_sent = len(cases) + 3   # the cases, a marker, the xml:lang message, a marker
    dropped = sum(1 for _, d in cases if d) + 1
    assert st.get("dropped") == dropped, st
    assert st.get("scanned") == n_sent, st
    assert "scan_ns" in st and st.get("limit_hits") == 0, st


def test_one_letter_property_escapes(xmppd_factory, tmp_path, clients):
    """\\pL, \\PL, \\pN without braces are one atom: the letter after the
    property name is not part of the rule's required literal (it used to be,
    and the rule silently never matched)."""
    rules = ["re:\\pLabc", "re:x\\pNyz", "re:foo\\PLbar", "re/i:\\pLuXYZ", "re:\\p{Lu}qrs"]
    srv = make_server(xmppd_factory, tmp_path, patterns="\n".join(rules) + "\n")
    alice = login(clients, srv, ALICE)
    bob = login(clients, srv, BOB)
    cases = [
        ("Xabc", True), ("éabc", True), ("1abc", False),
        ("x5yz", True), ("x٣yz", True), ("xayz", False),
        ("foo1bar", True), ("foo bar", True), ("fooxbar", False),
        ("яuxyz", True), ("яxyz", False),
        ("Éqrs", True), ("éqrs", False),
    ]
    got = delivered(alice, bob, [b for b, _ in cases])
    assert got == [b for b, d in cases if not d], got
    lines = [int(n) for n in re.findall(r"rule %s:(\d+) " % re.escape(str(srv.patterns)),
                                        srv.log())]
    assert lines == [1, 1, 2, 2, 3, 3, 4, 5], lines


def test_scope_strangers_lets_roster_contacts_through(xmppd_factory, tmp_path, clients):
    srv = make_server(xmppd_factory, tmp_path, scope=["strangers"])
    alice = login(clients, srv, ALICE)
    mallory = login(clients, srv, MALLORY[0])
    bob = login(clients, srv, BOB)
    # bob puts alice in his roster (no subscription needed: an item is enough)
    bob.iq(None, "<query xmlns='jabber:iq:roster'><item jid='%s'/></query>" % ALICE, itype="set")

    spam = "casino77 " + uniq("from-contact")
    assert delivered(alice, bob, [spam]) == [spam], "a roster contact's message was filtered"
    assert delivered(mallory, bob, ["casino77 " + uniq("stranger")]) == [], \
        "a stranger's matching message arrived"
    # bob writing to his own account is never filtered
    own = "casino88 " + uniq("self")
    bob2 = login(clients, srv, BOB, "second")
    assert delivered(bob2, bob, [own]) == [own]
    st = stats(srv)
    assert (st.get("dropped"), st.get("spared")) == (1, 1), st


def test_scope_remote_only_leaves_local_strangers_alone(xmppd_factory, tmp_path, clients):
    srv = make_server(xmppd_factory, tmp_path, scope=["remote"])
    mallory = login(clients, srv, MALLORY[0])
    bob = login(clients, srv, BOB)
    spam = "casino77 " + uniq("local")
    assert delivered(mallory, bob, [spam]) == [spam]
    assert "dropped" not in srv.log()


def test_subscription_request_status_is_matched(xmppd_factory, tmp_path, clients):
    srv = make_server(xmppd_factory, tmp_path)
    alice = login(clients, srv, ALICE)
    mallory = login(clients, srv, MALLORY[0])
    bob = login(clients, srv, BOB)

    send_raw(mallory, "<presence to='%s' type='subscribe'><status>add me! cheap-pills.example"
                      "</status></presence>" % BOB)
    send_raw(alice, "<presence to='%s' type='subscribe'><status>hi, it is alice</status>"
                    "</presence>" % BOB)

    def next_subscribe(timeout):
        async def get():
            while True:
                p = await bob.presences.get()
                if p["type"] == "subscribe":
                    return p
        return bob.lt.run(get(), timeout)

    p = next_subscribe(5)
    assert str(p["from"]).startswith(ALICE), "first subscription request from %s: %s" % (
        p["from"], p)
    assert p["status"] == "hi, it is alice"
    # mallory's was dropped before alice's was routed (mallory sent first, but
    # on another stream: give it a moment more to be sure)
    try:
        late = next_subscribe(0.5)
    except TimeoutError:
        late = None
    assert late is None, "the matching subscription request arrived: %s" % late
    assert re.search(r"dropped subscription request from mallory@localhost\S* to bob@localhost: "
                     r"rule %s:%d" % (re.escape(str(srv.patterns)),
                                      line_of(PATTERNS, "cheap-pills")), srv.log())
    # a matching <status/> in other presence types is not looked at
    send_raw(mallory, "<presence to='%s'><status>cheap-pills.example</status></presence>" % BOB)
    assert delivered(mallory, bob, []) == []
    assert srv.log().count("dropped subscription request") == 1


def test_sighup_reload_and_a_bad_reload_keeps_the_old_set(xmppd_factory, tmp_path, clients):
    srv = make_server(xmppd_factory, tmp_path, patterns="re:casino\\d{2,}\n")
    alice = login(clients, srv, ALICE)
    bob = login(clients, srv, BOB)
    assert delivered(alice, bob, ["casino77", "newspam-token"]) == ["newspam-token"]

    srv.patterns.write_text("# v2\nlit:newspam-token\n")
    srv.proc.send_signal(signal.SIGHUP)
    wait_log(srv, r"pattern_filter: reloaded 1 rule", what="the reload line")
    assert delivered(alice, bob, ["casino77", "newspam-token"]) == ["casino77"]

    # lines 3 and 4 are bad: the whole file is refused, with both lines named
    srv.patterns.write_text("# v3\nlit:thirdspam\nre:foo(bar\nre:(a)b\\1\n")
    srv.proc.send_signal(signal.SIGHUP)
    wait_log(srv, r"reload of \S+ failed, keeping the previous 1 rule", what="the failed reload")
    log = srv.log()
    assert re.search(r"%s:3: bad regular expression at offset \d+: missing closing parenthesis"
                     % re.escape(str(srv.patterns)), log), log[-2000:]
    assert re.search(r"%s:4: numbered back references" % re.escape(str(srv.patterns)), log)
    assert delivered(alice, bob, ["newspam-token", "thirdspam"]) == ["thirdspam"]
    assert srv.running()


BAD_FILES = [
    # (file text, line, what the message says)
    ("lit:ok\n# fine\nre:foo(bar\n", 3, "missing closing parenthesis"),
    ("re:(a)\\1\n", 1, "numbered back references"),
    ("re:(a)\\g{1}\n", 1, "numbered references"),
    ("re:(?1)(a)\n", 1, "numbered subroutine calls"),
    ("re:ab(?R)?\n", 1, "numbered subroutine calls and recursion"),
    ("re:(*COMMIT)abc\n", 1, "backtracking verbs"),
    ("\n\nre:x*\n", 3, "empty string"),
    ("re:\\b\n", 1, "empty string"),
    ("re/q:abc\n", 1, "unknown flag 'q'"),
    ("lit:\n", 1, "empty literal"),
    ("re:(?<n>a)b\nre:(?<n>c)d\n", 2, "group name 'n' is already used on line 1"),
    ("re:(?x)abc # a comment\n", 1, "cannot be combined"),
]


def test_bad_pattern_files_are_refused_with_their_line(xmppd_factory, tmp_path):
    """--check-config reports every bad file with file:line and exits 1."""
    srv = make_server(xmppd_factory, tmp_path)
    srv.patterns.write_bytes(b"lit:ok\nlit:\xff\xfe\n")
    cases = [(None, 2, "not valid UTF-8")] + BAD_FILES
    for text, line, why in cases:
        if text is not None:
            srv.patterns.write_text(text, encoding="utf-8")
        r = subprocess.run([str(XMPPD), "--check-config", str(srv.config_path)],
                           capture_output=True, text=True, timeout=20)
        out = r.stdout + r.stderr
        assert r.returncode == 1, "%r accepted (rc=%s): %s" % (text, r.returncode, out)
        assert "%s:%d:" % (srv.patterns, line) in out, "%r: no %s:%d in %s" % (
            text, srv.patterns.name, line, out)
        assert why in out, "%r: %r not in %s" % (text, why, out)
    srv.patterns.write_text(PATTERNS, encoding="utf-8")
    r = subprocess.run([str(XMPPD), "--check-config", str(srv.config_path)],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bad_pattern_at_start_refuses_the_start(xmppd_factory, tmp_path):
    path = tmp_path / "patterns.txt"
    path.write_text("lit:fine\n# comment\nre:[unclosed\n", encoding="utf-8")
    srv = xmppd_factory(start=False, modules=("c2s", "roster", "pattern_filter"),
                        extra='pattern_filter = { file = "%s"; };\n' % path)
    srv.expect_failure = True
    srv.start(wait=False)
    rc = srv.wait_exit(10)
    log = srv.log()
    assert rc == 1, "started with a bad pattern file (rc=%s):\n%s" % (rc, log)
    assert "%s:3: bad regular expression" % path in log, log
    # and the config's own file:line of the setting
    assert "%s:%d:" % (srv.config_path, line_of(srv.config, "pattern_filter = {")) in log, log

    # no file at all, an unknown scope or a share out of range is refused as well
    for extra, token in (('pattern_filter = { file = "%s/nope.txt"; };' % tmp_path, "nope.txt"),
                         ('pattern_filter = { file = "%s"; scope = ("friends"); };' % path,
                          "unknown scope 'friends'"),
                         ('pattern_filter = { file = "%s"; max_scan_share = 0; };' % path,
                          "max_scan_share"),
                         ('pattern_filter = { file = "%s"; max_scan_share = 101; };' % path,
                          "max_scan_share")):
        srv.config_path.write_text(srv.config.replace(
            'pattern_filter = { file = "%s"; };' % path, extra))
        r = subprocess.run([str(XMPPD), "--check-config", str(srv.config_path)],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 1 and token in r.stdout + r.stderr, r.stdout + r.stderr


OMEMO_NS = "eu.siacs.conversations.axolotl"
OMEMO_FALLBACK = ("I sent you an OMEMO encrypted message but your client doesn't seem to "
                  "support that. Find more information on https://conversations.im/omemo")


def omemo(payload):
    return ("<encrypted xmlns='%s'><header sid='1234'><key rid='5678'>MwohBQ%sAAA==</key>"
            "<iv>SGVsbG8gV29ybGQh</iv></header><payload>%s</payload></encrypted>"
            "<store xmlns='urn:xmpp:hints'/>" % (OMEMO_NS, payload, payload))


def test_omemo_message_is_matched_on_its_fallback_body_only(xmppd_factory, tmp_path, clients):
    srv = make_server(xmppd_factory, tmp_path,
                      patterns="lit:Q2FzaW5vU3BhbQ\nre:casino\\d{2,}\n")
    alice = login(clients, srv, ALICE)
    bob = login(clients, srv, BOB)
    # the "ciphertext" contains a literal rule: not looked at, the message arrives intact
    send_body(alice, BOB, OMEMO_FALLBACK, omemo("Q2FzaW5vU3BhbQ=="))
    # the fallback body matches: dropped, encrypted or not
    send_body(alice, BOB, "casino77 " + OMEMO_FALLBACK, omemo("AAAA"))
    marker = uniq("marker")
    send_body(alice, BOB, marker)
    bob.wait_message(marker)
    got = bob.skipped
    bob.skipped = []
    assert [m["body"] for m in got] == [OMEMO_FALLBACK], [str(m) for m in got]
    enc = got[0].xml.find("{%s}encrypted" % OMEMO_NS)
    assert enc is not None, "the <encrypted/> element was lost: %s" % got[0]
    assert enc.find("{%s}payload" % OMEMO_NS).text == "Q2FzaW5vU3BhbQ=="


def test_pathological_regex_does_not_stall_the_server(xmppd_factory, tmp_path, clients,
                                                      chat_pair):
    # the per-stanza limits alone (max_scan_share: see the next test)
    srv = make_server(xmppd_factory, tmp_path, patterns="re:^(a+)+$\n",
                      settings="max_scan_share = 100;")
    alice = login(clients, srv, ALICE, "evil")
    bob = login(clients, srv, BOB, "victim")
    pair = chat_pair(srv)
    evil = "a" * 5000 + "b"          # exponential backtracking without a limit
    t0 = time.monotonic()
    for _ in range(10):
        send_body(alice, BOB, evil)
    pair.check("while the pathological regex runs")
    got = delivered(alice, bob, ["a" * 40])      # the rule works where it can
    elapsed = time.monotonic() - t0
    # a limit hit is no match: the 10 messages arrive
    assert len([b for b in got if b == evil]) == 10 and "a" * 40 not in got, [len(b) for b in got]
    assert elapsed < 8, "10 pathological messages took %.1f s" % elapsed
    pair.check("after it")
    st = stats(srv)
    assert st.get("limit_hits") == 10 and st.get("dropped") == 1, st
    assert "hit match_limit (1000000)" in srv.log()

    # Many bodies in one stanza do not multiply the cost: after max_scan_ms
    # (default 20) of regexes the rest is skipped.  Unbounded, these 2,000
    # bodies would cost 2,000 match limits (seconds).
    many = "".join("<body>%s</body>" % ("a" * 40 + "b") for _ in range(2000))
    t0 = time.monotonic()
    send_raw(alice, "<message to='%s' type='chat'>%s</message>" % (BOB, many))
    pair.check("after a stanza of 2,000 pathological bodies")
    got = [b for b in delivered(alice, bob, []) if not b.startswith("canary")]
    assert got == ["a" * 40 + "b"], got
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5, "a stanza of 2,000 pathological bodies took %.1f s" % elapsed
    assert "used up max_scan_ms (20)" in srv.log()


def test_regex_time_share_bounds_a_flood(xmppd_factory, tmp_path, clients, chat_pair):
    """max_scan_share bounds the regex time of all stanzas together: with 1 %
    of a CPU (a bucket of 10 ms, refilled at 10 ms a second) a flood of
    stanzas for a slow regex (a few ms each, up to match_limit) runs it a few
    times; then regexes are skipped (literals still drop) until half the
    bucket is back, at least 0.5 s later: the rest of the flood and what
    follows it in the same write are deterministically in that window."""
    srv = make_server(xmppd_factory, tmp_path,
                      patterns="re:^(a+)+$\nre:casino\\d{2,}\nlit:cheap-pills.example\n",
                      settings="max_scan_share = 1; match_limit = 4000000;")
    alice = login(clients, srv, ALICE, "flood")
    bob = login(clients, srv, BOB, "victim")
    pair = chat_pair(srv)
    evil = "a" * 5000 + "b"
    n = 40
    # one write: the flood, then a regex rule's spam and a literal's
    marker = uniq("marker")
    send_raw(alice, "".join("<message to='%s' type='chat'><body>%s</body></message>"
                            % (BOB, b) for b in [evil] * n + ["casino77 skipped",
                                                              "cheap-pills.example", marker]))
    bob.wait_message(marker, timeout=10)
    got = [m["body"] for m in bob.skipped]
    bob.skipped = []
    st = stats(srv)
    pair.check("after the flood")      # 3 more stanzas, counted after st
    ran = st.get("limit_hits")
    assert 1 <= ran <= 6, st           # the slow regex ran only until the share was used up
    assert st.get("regex_skipped") == n - ran + 2, st  # the rest, the casino and the marker
    assert st.get("dropped") == 1, st                  # the literal
    assert got.count(evil) == n and "casino77 skipped" in got, [b[:20] for b in got]
    assert "cheap-pills.example" not in got
    assert st.get("scan_ns") < n * 5_000_000 / 2, st   # not n slow matches
    assert "used up max_scan_share (1% of one CPU)" in srv.log()

    # back once half the bucket has refilled: a regex rule drops again
    deadline = time.monotonic() + 6
    while True:
        probe = "casino88 " + uniq("probe")
        if delivered(alice, bob, [probe]) == []:
            break
        assert time.monotonic() < deadline, "regexes never ran again:\n" + srv.log_tail(20)
        time.sleep(0.25)
    assert stats(srv).get("dropped") == 2


def generated_rules(n, seed=7):
    """n rules of assorted kinds, each with a body only it matches (random
    tokens with a digit never occur by chance in the other bodies)."""
    rng = random.Random(seed)

    def tok():
        t = [rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(7)]
        t[rng.randrange(7)] = rng.choice("0123456789")
        return "".join(t)

    rules, samples = [], []
    for i in range(n):
        t = tok()
        kind = i % 9
        if kind == 0:
            rules.append("spam words %s" % t)
            samples.append("oh spam words %s!" % t)
        elif kind == 1:
            rules.append("lit/i:Große %s" % t.upper())
            samples.append("eine GROSSE? nein: große %s" % t)
        elif kind == 2:
            rules.append("re:%s\\d{2,}" % t)
            samples.append("x%s42y" % t)
        elif kind == 3:
            rules.append("re/i:(?:alpha|beta)\\s+%s" % t)
            samples.append("BETA   %s" % t.upper())
        elif kind == 4:
            rules.append("re:https?://%s\\.(?:com|net)/" % t)
            samples.append("see https://%s.net/x" % t)
        elif kind == 5:
            rules.append("re:\\b%s(?:x|yy)?\\b" % t)
            samples.append("a %syy b" % t)
        elif kind == 6:
            rules.append("re:%sé+(?=!)" % t)
            samples.append("%séé!" % t)
        elif kind == 7:
            rules.append("lit:привет %s" % t)
            samples.append("привет %s" % t)
        else:
            rules.append("re:(?<w%d>[a-z])%s\\k<w%d>" % (i, t, i))
            samples.append("q%sq" % t)
    return rules, samples


def test_thousands_of_rules_each_drop_their_own_sample(xmppd_factory, tmp_path, clients):
    """3,000 rules (literals, caseless, regexes grouped behind their literals):
    every sample is dropped, and the log names the rule it was made for."""
    rules, samples = generated_rules(3000)
    srv = make_server(xmppd_factory, tmp_path, patterns="\n".join(rules) + "\n")
    alice = login(clients, srv, ALICE)
    bob = login(clients, srv, BOB)
    wait_log(srv, r"loaded 3000 rule\(s\)")
    send_raw(alice, "".join("<message to='%s' type='chat'><body>%s</body></message>"
                            % (BOB, escape(b)) for b in samples))
    innocent = ["ordinary words %d, nothing to see" % i for i in range(50)]
    assert delivered(alice, bob, innocent) == innocent
    st = stats(srv)
    assert st.get("dropped") == len(samples), st
    # the first drops logged (the log is rate-limited) name each sample's own rule
    lines = [int(n) for n in re.findall(r"rule %s:(\d+) " % re.escape(str(srv.patterns)),
                                        srv.log())]
    assert len(lines) >= 10 and lines == list(range(1, len(lines) + 1)), lines[:30]
