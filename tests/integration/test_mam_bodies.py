"""mod_mam's storage: a message between two local users is stored once and
shared by both archives; a body goes when no archive points to it (retention,
account removal live, account removal while stopped: the sweep); records of
earlier versions (the XML inline) are still served."""
import struct
import subprocess
import time

from test_mam import MODULE_SETS, Peer, query
from xmpp_helpers import MALLORY

ALICE, BOB = "alice@localhost", "bob@localhost"
CAROL = MALLORY[0]   # a third local user


def make_peers(srv, *jids):
    peers = []
    gen = Peer.factory()
    make = next(gen)
    for jid in jids:
        peers.append(make(srv, jid, "r"))
    return peers, gen


def close_all(gen):
    try:
        next(gen)
    except StopIteration:
        pass


def stats(srv):
    r = srv.ctl("stats")
    assert r.returncode == 0, r.stderr
    return {k: int(v) for k, v in (line.split(" ") for line in r.stdout.splitlines())}


def start(xmppd_factory, extra=""):
    return xmppd_factory(modules=MODULE_SETS["alone"], extra=extra,
                         extra_users=[MALLORY])


def test_one_body_for_both_archives(xmppd_factory):
    srv = start(xmppd_factory)
    (alice, bob), gen = make_peers(srv, ALICE, BOB)
    for i in range(4):
        bob.message(alice.chat(BOB, "s%d" % i))
    for i in range(2):
        alice.message(bob.chat(ALICE, "t%d" % i))
    bodies = ["s0", "s1", "s2", "s3", "t0", "t1"]
    assert stats(srv).get("mam.bodies_added") == 6, "not one body per message"
    for peer in (alice, bob):
        assert query(peer).bodies == bodies

    # alice goes: every body is still bob's
    alice.close()
    r = srv.ctl("deluser", ALICE)
    assert r.returncode == 0, r.stderr
    assert stats(srv).get("mam.bodies_deleted", 0) == 0
    assert query(bob).bodies == bodies
    # bob goes: nobody points to them any more
    bob.close()
    assert srv.ctl("deluser", BOB).returncode == 0
    st = stats(srv)
    assert st.get("mam.bodies_deleted") == 6, st
    close_all(gen)


def test_retention_deletes_bodies_nobody_keeps(xmppd_factory):
    srv = start(xmppd_factory, "mam = { max_messages_per_user = 3; };\n")
    (alice, bob), gen = make_peers(srv, ALICE, BOB)
    for i in range(5):
        bob.message(alice.chat(BOB, "r%d" % i))
    for peer in (alice, bob):
        assert query(peer).bodies == ["r2", "r3", "r4"]
    st = stats(srv)
    assert st.get("mam.bodies_added") == 5 and st.get("mam.bodies_deleted") == 2, st
    close_all(gen)


def test_sweep_after_accounts_removed_while_stopped(xmppd_factory):
    srv = start(xmppd_factory)
    (alice, bob, carol), gen = make_peers(srv, ALICE, BOB, CAROL)
    for i in range(3):
        bob.message(alice.chat(BOB, "ab%d" % i))
    for i in range(2):
        carol.message(bob.chat(CAROL, "bc%d" % i))
    close_all(gen)
    assert srv.terminate() == 0
    for jid in (ALICE, BOB):
        r = srv.ctl("deluser", jid)
        assert r.returncode == 0, r.stderr
    srv.returncode = None
    srv.start()
    deadline = time.monotonic() + 20
    while "mam: swept the archive's bodies" not in srv.log():
        assert time.monotonic() < deadline, srv.log_tail(30)
        time.sleep(0.05)
    assert "2 account(s) removed since the last sweep" in srv.log()
    st = stats(srv)
    assert st.get("mam.bodies_swept") == 3, st      # alice's and bob's; carol's stay
    (carol,), gen = make_peers(srv, CAROL)
    assert query(carol).bodies == ["bc0", "bc1"]
    close_all(gen)
    # nothing removed since: no sweep at the next start
    assert srv.terminate() == 0
    srv.returncode = None
    srv.start()
    (carol,), gen = make_peers(srv, CAROL)
    assert query(carol).bodies == ["bc0", "bc1"]
    assert srv.log().count("since the last sweep") == 1, srv.log_tail(30)
    close_all(gen)


def db_escape(b):
    return "".join("\\%02x" % c for c in b)


def test_records_of_earlier_versions_are_served(xmppd_factory):
    """A version 1 record (the XML in the record itself, as earlier versions
    wrote it) is served, and new messages follow it."""
    srv = start(xmppd_factory)
    assert srv.terminate() == 0
    seq = 0x0006000000000000
    when = int(time.time() * 1e6) - 60 * 1000000
    with_ = b"bob@localhost"
    xml = (b"<message xmlns='jabber:client' to='bob@localhost' type='chat' id='old1'>"
           b"<body>from an earlier version</body></message>")
    key = ALICE.encode() + b"\0" + struct.pack(">Q", seq)
    val = b"\x01" + struct.pack(">Q", when) + b"o" + struct.pack(">H", len(with_)) + with_ + xml
    r = subprocess.run(["db5.3_load", "-T", "-t", "btree", "-h", str(srv.data_dir), "mam.db"],
                       input="%s\n%s\n" % (db_escape(key), db_escape(val)),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=20)
    assert r.returncode == 0, r.stdout
    srv.returncode = None
    srv.start()
    (alice, bob), gen = make_peers(srv, ALICE, BOB)
    bob.message(alice.chat(BOB, "new"))
    p = query(alice)
    assert p.bodies == ["from an earlier version", "new"], p.bodies
    assert p.ids[0] == "%016x" % seq and p.ids[1] == "%016x" % (seq + 1), p.ids
    assert p.items[0]["mid"] == "old1"
    close_all(gen)
