#!/usr/bin/python3
"""What mod_ratelimit costs when nobody is over a limit, and how cheaply it
refuses a connection storm.

  1. messages alice -> bob (online) through a server without mod_ratelimit, then
     through one with it loaded and limits far above the load: the difference is
     the per-stanza accounting (two bucket updates and a byte delta);
  2. a connection storm from one address against ip_connections = 1/min burst 10:
     how many refusals per second the server hands out (each is an accept, a
     hash-table lookup and a close; no TLS, no parser).

    /usr/bin/python3 bench/ratelimit_overhead.py [--messages N] [--connections N]
"""
import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from xmpp_helpers import RawStream, Server, USERS, make_certs  # noqa: E402

HEADER = (b"<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
HIGH = """ratelimit = {
    c2s_stanzas = "1000000/s burst 1000000";
    c2s_bytes = "1000M/s burst 1000M";
    ip_connections = "1/min burst 10";
};
"""


def login(srv, jid, res):
    r = RawStream(srv)
    r.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    r.login(jid, USERS[jid], res)
    return r


def message_rate(srv, n, window=2000):
    """Messages per second alice -> bob, at most `window` in flight (the server
    drops a reader that falls 4 MB behind, so bob must keep up)."""
    a = login(srv, "alice@localhost", "a")
    b = login(srv, "bob@localhost", "b")
    one = "<message to='bob@localhost/b' type='chat'><body>%s</body></message>" % ("x" * 200)
    sent = got = 0
    buf = b""
    t0 = time.perf_counter()
    while got < n:
        if sent < n and sent - got < window:
            k = min(window // 2, n - sent)
            a.sock.sendall((one * k).encode())
            sent += k
        chunk = b.sock.recv(1 << 16)
        if not chunk:
            raise SystemExit("bob's stream closed")
        buf += chunk
        got += buf.count(b"</message>")
        buf = buf[buf.rfind(b"</message>") + 10:] if b"</message>" in buf else buf
    took = time.perf_counter() - t0
    a.close()
    b.close()
    return n / took


def refusal_rate(srv, n):
    refused = 0
    t0 = time.perf_counter()
    for _ in range(n):
        with socket.socket() as s:
            s.settimeout(5)
            s.bind(("127.0.0.2", 0))
            s.connect((srv.host, srv.starttls_port))
            try:
                s.sendall(HEADER)
                refused += s.recv(1) == b""  # an accepted one answers with its header
            except (ConnectionResetError, BrokenPipeError):
                refused += 1
    return refused, n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="xmppd-bench-") as tmp:
        certs = make_certs(Path(tmp) / "certs")
        rates = {}
        for name, modules, extra in (("without mod_ratelimit", ("c2s",), ""),
                                     ("with mod_ratelimit", ("c2s", "ratelimit"), HIGH)):
            srv = Server(Path(tmp) / name.replace(" ", "_"), certs, log_level="warn",
                         modules=modules, extra=extra)
            for jid, pw in USERS.items():
                srv.adduser(jid, pw)
            srv.start()
            try:
                rates[name] = message_rate(srv, args.messages)
                if "ratelimit" in modules:
                    refused, crate = refusal_rate(srv, args.connections)
            finally:
                srv.terminate()
    for name, r in rates.items():
        print("%-22s %8.0f messages/s (%.1f us each)" % (name, r, 1e6 / r))
    a, b = rates["without mod_ratelimit"], rates["with mod_ratelimit"]
    print("accounting overhead:   %+.1f us per stanza (noise included)" % (1e6 / b - 1e6 / a))
    print("connection storm:      %d of %d refused, %.0f connections/s handled"
          % (refused, args.connections, crate))


if __name__ == "__main__":
    main()
