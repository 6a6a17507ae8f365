#!/usr/bin/python3
"""How fast messages to an offline user are stored durably (one Berkeley DB
transaction, fsync'd, per message) and delivered at login.

    /usr/bin/python3 bench/offline_store.py [--messages N]
"""
import argparse
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from xmpp_helpers import RawStream, Server, USERS, make_certs  # noqa: E402


def login(srv, jid, res):
    r = RawStream(srv)
    r.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    r.login(jid, USERS[jid], res)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1000)
    n = ap.parse_args().messages
    with tempfile.TemporaryDirectory(prefix="xmppd-bench-") as tmp:
        certs = make_certs(Path(tmp) / "certs")
        srv = Server(Path(tmp) / "srv", certs, log_level="warn", modules=("c2s", "offline"))
        for jid, pw in USERS.items():
            srv.adduser(jid, pw)
        srv.start()
        try:
            a = login(srv, "alice@localhost", "a")
            t0 = time.perf_counter()
            for i in range(n):
                a.send("<message to='bob@localhost' type='chat' id='m%d'><body>%s</body></message>"
                       % (i, "x" * 200))
            a.send("<iq type='get' id='done' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
            a.expect(re.compile(rb"id=[\"']done[\"']"), timeout=120)
            store = time.perf_counter() - t0
            b = login(srv, "bob@localhost", "b")
            t0 = time.perf_counter()
            b.send("<presence/>")
            got = 0
            item = re.compile(rb"<message\b.*?</message>|<iq\b[^>]*id=[\"'](offline-ack-\d+)"
                              rb"[\"'].*?</iq>", re.S)
            while got < n:
                out = b.expect(item, timeout=60)
                m = item.search(out)
                if m and m.group(1):
                    # answer the server's round ping so delivery goes on
                    b.send("<iq type='result' id='%s' to='localhost'/>" % m.group(1).decode())
                else:
                    got += 1
            deliver = time.perf_counter() - t0
        finally:
            srv.terminate()
    print("%d offline messages: stored in %.2f s (%.0f/s, %.2f ms each, each committed "
          "durably); delivered at login in %.2f s" % (n, store, n / store, store / n * 1e3,
                                                       deliver))


if __name__ == "__main__":
    main()
