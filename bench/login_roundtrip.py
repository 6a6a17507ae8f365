#!/usr/bin/python3
"""
A small local benchmark: what one client login (TCP + STARTTLS + SCRAM-SHA-256
+ resource binding) and one message round trip (alice -> bob -> alice through
the server) cost, in wall time and in server CPU time.

    /usr/bin/python3 bench/login_roundtrip.py [--logins N] [--messages M]

Uses the build in $XMPPD_BUILD_DIR (default build/), a throw-away data dir and
certificate, and loopback only.  The client is Python, so wall-clock figures
include the client's own cost; server CPU (from /proc) is the server's alone.
"""
import argparse
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from xmpp_helpers import RawStream, Server, USERS, make_certs  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def server_cpu(pid):
    """User + system CPU seconds of a process."""
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def server_rss_kib(pid):
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def login(srv, jid, password, resource):
    user = jid.split("@")[0]
    s = RawStream(srv)
    # Without this the client's Nagle + the server's delayed ACK add ~40 ms
    # per exchange, which measures the kernel, not the server.
    s.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.open_stream()
    s.starttls()
    s.open_stream()
    if not s.auth_scram(user, password):
        raise SystemExit("login failed for %s" % jid)
    s.open_stream()
    full = s.bind(resource)
    return s, full


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logins", type=int, default=200)
    ap.add_argument("--messages", type=int, default=2000)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="xmppd-bench-") as tmp:
        certs = make_certs(Path(tmp) / "certs")
        srv = Server(Path(tmp) / "srv", certs, log_level="warn")
        for jid, pw in USERS.items():
            srv.adduser(jid, pw)
        srv.start()
        pid = srv.proc.pid
        try:
            (alice_jid, alice_pw), (bob_jid, bob_pw) = list(USERS.items())[:2]

            # Logins: sequential, each on a new TCP connection, closed after.
            times = []
            cpu0 = server_cpu(pid)
            for i in range(args.logins):
                t0 = time.perf_counter()
                s, _ = login(srv, alice_jid, alice_pw, "bench%d" % i)
                times.append(time.perf_counter() - t0)
                s.send("</stream:stream>")
                s.sock.close()
            login_cpu = (server_cpu(pid) - cpu0) / args.logins

            # Round trips: alice -> bob, bob answers, alice reads the answer.
            a, a_full = login(srv, alice_jid, alice_pw, "rt")
            b, b_full = login(srv, bob_jid, bob_pw, "rt")
            body = "x" * 64
            cpu0 = server_cpu(pid)
            t0 = time.perf_counter()
            for i in range(args.messages):
                a.send("<message to='%s' type='chat' id='m%d'><body>%s</body></message>"
                       % (b_full, i, body))
                b.expect(re.compile(rb"id=[\"']m%d[\"']" % i))
                b.send("<message to='%s' type='chat' id='r%d'><body>%s</body></message>"
                       % (a_full, i, body))
                a.expect(re.compile(rb"id=[\"']r%d[\"']" % i))
            rt = (time.perf_counter() - t0) / args.messages
            rt_cpu = (server_cpu(pid) - cpu0) / args.messages
            rss = server_rss_kib(pid)
        finally:
            srv.terminate()

    print("xmppd %s, %d logins, %d round trips (2 messages each)" % (
        srv.name, args.logins, args.messages))
    print("login (TCP+STARTTLS+SCRAM-SHA-256+bind): median %.2f ms, p90 %.2f ms wall; "
          "server CPU %.2f ms per login" % (
              statistics.median(times) * 1e3,
              sorted(times)[int(len(times) * 0.9)] * 1e3, login_cpu * 1e3))
    print("message round trip: %.1f us wall; server CPU %.1f us per round trip "
          "(%.1f us per message)" % (rt * 1e6, rt_cpu * 1e6, rt_cpu * 1e6 / 2))
    print("server RSS at the end: %d KiB" % rss)


if __name__ == "__main__":
    main()
