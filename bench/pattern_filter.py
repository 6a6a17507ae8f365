#!/usr/bin/python3
"""
mod_pattern_filter at scale: messages per second through a real server
(TLS client streams, alice -> bob, alice a stranger to bob so every message
is scanned) without the module, and with it loaded with growing pattern
lists (default 10, 1,000 and 10,000 rules: 70 % literals -- some caseless --
and 30 % regexes, a few of them without any literal so they run on every
stanza).  Also the time the module itself spends per scanned stanza (its
scan_ns / scanned counters, read with SIGUSR1), the server's CPU time and
memory, and how long loading the list takes.

    /usr/bin/python3 bench/pattern_filter.py [--messages N] [--rules 10,1000,10000]
                                             [--spam 0.1] [--body-bytes 200] [--share 100]

The module runs with max_scan_share = 100 (--share): the figures are the
cost of matching every regex, never of skipping them.  With a lower share a
long enough run makes the module skip regexes (shown as "re skipped"): the
throughput then rises but measures less work.

Uses the build in $XMPPD_BUILD_DIR (default build/), throw-away data and
certificates, loopback only.  The sender and receiver are Python: the
figures include their cost, so compare the runs with each other; server
CPU (from /proc) is the server's own.
"""
import argparse
import os
import random
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from xml.sax.saxutils import escape

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from xmpp_helpers import RawStream, Server, USERS, make_certs  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")

WORDS = ("the of and to in is you that it he was for on are as with his they at be this "
         "have from or one had by word but not what all were we when your can said there use "
         "an each which she do how their if will up other about out many then them these so "
         "some her would make like him into time has look two more write go see number no way "
         "could people my than first water been call who oil its now find long down day did "
         "get come made may part over new sound take only little work know place year live me "
         "back give most very after thing our just name good sentence man think say great "
         "where help through much before line right too mean old any same tell boy follow came "
         "want show also around form three small set put end does another well large must big "
         "even such because turn here why ask went men read need land different home us move "
         "try kind hand picture again change off play spell air away animal house point page "
         "letter mother answer found study still learn should america world").split()


def token(rng, n=7):
    """Random letters with at least one digit: never inside innocent text."""
    s = [rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(n - 1)]
    s.insert(rng.randrange(n), rng.choice("0123456789"))
    return "".join(s)


def gen_rules(n, seed=1, always_per_10k=10):
    """n rules (70 % literals, 30 % regexes); each with a body that matches it.
    always_per_10k of every 10,000 are regexes without any literal (they run
    on every stanza)."""
    rng = random.Random(seed)
    rules, samples = [], []
    n_always = (n * always_per_10k + 9999) // 10000
    for i in range(n):
        k = rng.random()
        t, t2 = token(rng), token(rng)
        w = rng.choice(WORDS)
        if i < n_always:
            d = rng.randint(5, 9)
            rules.append("re:\\b[a-z]{3}\\d{%d}[a-z]{2}\\b" % d)
            samples.append("order %s%s%s" % ("xyz", "7" * d, "qq"))
        elif k < 0.40:
            s = "%s %s %s" % (w, rng.choice(WORDS), t)
            rules.append(s)
            samples.append("so " + s + " now")
        elif k < 0.55:
            s = "%s.example/%s" % (t, t2)
            rules.append("lit:" + s)
            samples.append("visit https://" + s + "?x")
        elif k < 0.70:
            s = "%s %s" % (w.capitalize(), t.upper())
            rules.append("lit/i:" + s)
            samples.append("hey " + s.lower())
        elif k < 0.80:
            rules.append("re:%s\\d{2,}" % t)
            samples.append("try %s4242 today" % t)
        elif k < 0.90:
            rules.append("re/i:%s\\s+%ss?\\b" % (w, t))
            samples.append("%s  %sS now" % (w.upper(), t.upper()))
        elif k < 0.95:
            rules.append("re:(?:win|won|get)\\s+an?\\s+%s(?:pro|max)?" % t)
            samples.append("you won a %smax" % t)
        else:
            rules.append("re:https?://%s\\.(?:com|net|org)/\\S*" % t)
            samples.append("see http://%s.net/abc" % t)
    return rules, samples


def innocent(rng, nbytes):
    out = []
    while sum(len(w) + 1 for w in out) < nbytes:
        out.append(rng.choice(WORDS))
    return " ".join(out).capitalize() + "."


def server_cpu(pid):
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def server_rss_mib(pid):
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0


def login(srv, jid, res):
    r = RawStream(srv)
    r.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    r.login(jid, USERS[jid], res)
    r.send("<presence/>")
    return r


class Receiver(threading.Thread):
    """Reads bob's stream, counting messages, until the marker arrives."""

    def __init__(self, stream, marker):
        super().__init__(daemon=True)
        self.s, self.marker = stream, marker.encode()
        self.count = 0
        self.done = threading.Event()
        self.error = None

    def run(self):
        tail = b""
        self.s.sock.settimeout(300)
        try:
            while True:
                chunk = self.s.sock.recv(1 << 16)
                if not chunk:
                    raise EOFError("bob's stream closed")
                data = tail + chunk
                self.count += data.count(b"</message>") - tail.count(b"</message>")
                if self.marker in data:
                    self.done.set()
                    return
                tail = data[-(len(self.marker) + 16):]
        except Exception as e:  # reported by the caller
            self.error = e
            self.done.set()


def stats(srv):
    """SIGUSR1; the module's counters as the log then shows them."""
    line = "stats: pattern_filter.scan_ns"
    before = srv.log().count(line)
    srv.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while srv.log().count(line) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    return {k: int(v) for k, v in re.findall(r"stats: pattern_filter\.(\w+)=(\d+)", srv.log())}


def run(tmp, certs, nrules, messages, spam, body_bytes, seed, always, share):
    """One server, one measurement.  nrules None: without the module."""
    tag = "none" if nrules is None else str(nrules)
    modules = ("c2s", "roster") + (() if nrules is None else ("pattern_filter",))
    extra = ""
    samples = []
    if nrules is not None:
        rules, samples = gen_rules(nrules, seed, always)
        pfile = Path(tmp) / ("rules-%s.txt" % tag)
        pfile.write_text("# generated by bench/pattern_filter.py\n" + "\n".join(rules) + "\n")
        extra = 'pattern_filter = { file = "%s"; max_scan_share = %d; };\n' % (pfile, share)
    srv = Server(Path(tmp) / ("srv-" + tag), certs, log_level="info", modules=modules,
                 extra=extra)
    for jid, pw in USERS.items():
        srv.adduser(jid, pw)
    t0 = time.perf_counter()
    srv.start()
    load_s = time.perf_counter() - t0
    rng = random.Random(seed + 1)
    try:
        bob = login(srv, "bob@localhost", "b")
        alice = login(srv, "alice@localhost", "a")
        # warm up (and make sure both are in)
        bob.send("<iq type='get' id='w' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        bob.expect(re.compile(rb"id=[\"']w[\"']"))
        bodies = []
        nspam = 0
        for i in range(messages):
            if samples and rng.random() < spam:
                bodies.append(rng.choice(samples))
                nspam += 1
            else:
                bodies.append(innocent(rng, body_bytes))
        stanzas = ["<message to='bob@localhost' type='chat' id='m%d'><body>%s</body></message>"
                   % (i, escape(b)) for i, b in enumerate(bodies)]
        marker = "marker-%d" % rng.getrandbits(64)
        stanzas.append("<message to='bob@localhost' type='chat'><body>%s</body></message>"
                       % marker)
        recv = Receiver(bob, marker)
        recv.start()
        cpu0 = server_cpu(srv.proc.pid)
        t0 = time.perf_counter()
        for k in range(0, len(stanzas), 200):
            alice.sock.sendall("".join(stanzas[k:k + 200]).encode())
        if not recv.done.wait(600) or recv.error:
            raise SystemExit("%s: the marker never arrived (%s)" % (tag, recv.error))
        wall = time.perf_counter() - t0
        cpu = server_cpu(srv.proc.pid) - cpu0
        st = stats(srv) if nrules is not None else {}
        rss = server_rss_mib(srv.proc.pid)
        delivered = recv.count - 1
        if nrules is not None and delivered != messages - nspam and not st.get("regex_skipped"):
            raise SystemExit("%s: %d delivered, expected %d (%d spam dropped)"
                             % (tag, delivered, messages - nspam, nspam))
        loaded = re.search(r"pattern_filter: loaded .*", srv.log())
    finally:
        srv.terminate()
    return {
        "tag": tag, "wall": wall, "cpu": cpu, "rate": messages / wall, "delivered": delivered,
        "spam": nspam, "rss": rss, "load_s": load_s,
        "scan_us": (st["scan_ns"] / st["scanned"] / 1000) if st.get("scanned") else None,
        "scanned": st.get("scanned"), "dropped": st.get("dropped"),
        "skipped": st.get("regex_skipped"),
        "loaded": loaded.group(0) if loaded else "",
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--rules", default="10,1000,10000",
                    help="comma-separated rule counts (the run without the module is always made)")
    ap.add_argument("--spam", type=float, default=0.0, help="fraction of matching bodies")
    ap.add_argument("--body-bytes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--always", type=int, default=10,
                    help="regexes without any literal per 10,000 rules (default 10)")
    ap.add_argument("--share", type=int, default=100,
                    help="the module's max_scan_share (default 100: regexes never skipped)")
    a = ap.parse_args()
    counts = [None] + [int(x) for x in a.rules.split(",") if x]
    results = []
    with tempfile.TemporaryDirectory(prefix="xmppd-bench-") as tmp:
        certs = make_certs(Path(tmp) / "certs")
        for n in counts:
            r = run(tmp, certs, n, a.messages, a.spam, a.body_bytes, a.seed, a.always,
                    a.share)
            results.append(r)
            if r["loaded"]:
                print("  " + r["loaded"].split("pattern_filter: ", 1)[1])
    print("%d messages alice -> bob, bodies ~%d bytes, %.0f %% matching a rule; %d regexes "
          "without a literal per 10,000 rules" % (a.messages, a.body_bytes, a.spam * 100,
                                                  a.always))
    print("%-8s %10s %8s %14s %12s %12s %11s %9s %8s" % (
        "rules", "msgs/s", "wall s", "server CPU s", "CPU us/msg", "scan us/msg", "re skipped",
        "RSS MiB", "start s"))
    for r in results:
        print("%-8s %10.0f %8.2f %14.2f %12.1f %12s %11s %9.1f %8.2f" % (
            r["tag"], r["rate"], r["wall"], r["cpu"], r["cpu"] / a.messages * 1e6,
            "-" if r["scan_us"] is None else "%.2f" % r["scan_us"],
            "-" if r["skipped"] is None else r["skipped"], r["rss"], r["load_s"]))


if __name__ == "__main__":
    main()
