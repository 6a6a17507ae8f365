"""The admin socket: xmppctl against a running server, one process per data
directory, and hostile bytes on the socket."""

import fcntl
import os
import re
import signal
import socket
import threading
import time

import pytest

from xmpp_helpers import USERS, RawStream

ALICE = "alice@localhost"
BOB = "bob@localhost"
ROSTER_NS = "jabber:iq:roster"


def out_of(r):
    return (r.stdout or "") + (r.stderr or "")


def raw_login(srv, jid, resource="raw", password=None):
    r = RawStream(srv)
    r.full = r.login(jid, password or USERS[jid], resource)
    return r


def sock_path(srv):
    return str(srv.data_dir / "xmppctl.sock")


def admin_request(srv, data, shut=True, timeout=10):
    """Send raw bytes to the admin socket; the whole reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path(srv))
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return reply
            reply += chunk
    finally:
        s.close()


def roster_ids(r, iq_id):
    r.send("<iq type='get' id='%s'><query xmlns='%s'/></iq>" % (iq_id, ROSTER_NS))
    return r.expect(re.compile((r"<iq\b[^>]*\bid=['\"]%s['\"][^>]*(/>|>.*?</iq>)" % iq_id)
                               .encode(), re.S), what="roster result")


def test_live_deluser_ends_sessions_and_leaves_nothing(xmppd_factory):
    """deluser on a running server: the user's streams end at once, and an
    account made again under that name starts empty (no roster inherited
    from what the modules kept in memory)."""
    srv = xmppd_factory(modules=("c2s", "roster"))
    a = raw_login(srv, ALICE, "phone")
    a.send("<iq type='set' id='r1'><query xmlns='%s'><item jid='%s' name='Bobby'/></query></iq>"
           % (ROSTER_NS, BOB))
    a.expect(re.compile(rb"<iq\b[^>]*\bid=['\"]r1['\"]"), what="roster set result")
    assert b"Bobby" in roster_ids(a, "r2")
    b = raw_login(srv, BOB, "desk")

    r = srv.ctl("deluser", ALICE)
    assert r.returncode == 0, out_of(r)
    a.expect_stream_error("not-authorized")
    a.close()

    r = srv.ctl("adduser", ALICE, "--password", "fresh-start")
    assert r.returncode == 0, out_of(r)
    a2 = raw_login(srv, ALICE, "new", password="fresh-start")
    assert b"Bobby" not in roster_ids(a2, "r3"), "the new account inherited the old roster"
    # bob was never touched
    b.send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
    b.expect(re.compile(rb"<iq\b[^>]*\bid=['\"]p1['\"]"), what="ping result")
    for c in (a2, b):
        c.close()


def test_stats(xmppd_factory):
    srv = xmppd_factory()
    r = srv.ctl("adduser", "carol@localhost", "--password", "pw-carol")
    assert r.returncode == 0, out_of(r)
    r = srv.ctl("stats")
    assert r.returncode == 0, out_of(r)
    stats = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert int(stats["storage.commits"]) >= 1, r.stdout
    assert int(stats["storage.log_flushes"]) >= 1, r.stdout
    # offline: the same command, answered from the storage alone
    assert srv.terminate() == 0
    r = srv.ctl("stats")
    assert r.returncode == 0 and "storage.commits 0" in r.stdout, out_of(r)


def test_second_process_on_the_data_directory_refused(xmppd_factory, clients):
    """A second xmppd on the same data directory stops with a clear error
    naming the holder; the first keeps serving."""
    srv = xmppd_factory()
    other = xmppd_factory(name="intruder", users={}, start=False)
    other.config_path.write_text(other.config.replace(str(other.data_dir), str(srv.data_dir)))
    other.expect_failure = True
    other.start(wait=False)
    rc = other.wait_exit(timeout=30)
    assert rc == 1, "second server on one data directory: exit %r" % rc
    log = other.log()
    assert "in use by another process, pid %d" % srv.proc.pid in log, log
    c = clients(srv, ALICE + "/still")
    assert c.login() == "session", c.describe()
    r = srv.ctl("list")
    assert r.returncode == 0 and ALICE in r.stdout.split(), out_of(r)


def test_xmppctl_waits_for_the_lock(unstarted_srv):
    """Offline, another process holds the storage for a moment: xmppctl
    waits for it rather than failing or opening it twice."""
    srv = unstarted_srv
    fd = os.open(str(srv.data_dir / "xmppd.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    t = threading.Timer(1.0, lambda: os.close(fd))   # closing releases the flock
    t.start()
    try:
        r = srv.ctl("adduser", "dave@localhost", "--password", "pw-dave")
    finally:
        t.join()
    assert r.returncode == 0, out_of(r)
    r = srv.ctl("list")
    assert "dave@localhost" in r.stdout.split(), out_of(r)


@pytest.fixture
def unstarted_srv(xmppd_factory):
    return xmppd_factory(start=False)


def test_killed_server_leaves_nothing_in_the_way(xmppd_factory, clients):
    """After kill -9 the socket file is stale: xmppctl works offline, and the
    restarted server listens again."""
    srv = xmppd_factory()
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(10)
    r = srv.ctl("adduser", "carol@localhost", "--password", "pw-carol")
    assert r.returncode == 0, out_of(r)
    srv.returncode = None
    srv.start()
    c = clients(srv, "carol@localhost/back", "pw-carol")
    assert c.login() == "session", c.describe()
    r = srv.ctl("list")
    assert r.returncode == 0 and "carol@localhost" in r.stdout.split(), out_of(r)


HOSTILE = [
    (b"x" * 5000, b"error\nrequest over"),
    (b"adduser\0mallory@localhost\npw\n", b"error\na request holds no NUL"),
    (b"frobnicate\n", b"error\nunknown command"),
    (b"adduser\nmallory@localhost\n", b"error\nunknown command"),     # no password
    (b"deluser\nmallory@localhost", b"error\nmalformed"),               # no final newline
    (b"a\nb\nc\nd\ne\n", b"error\nmalformed"),
    (b"adduser\n@@@\npw\n", b"error\n'@@@' is not a valid JID"),
    (b"adduser\nmallory@example.org\npw\n", b"error\n'example.org' is not a host"),
    (b"passwd\nnobody@localhost\npw\n", b"error\nno such user"),
    (b"\n", b"error\nunknown command"),
    (b"", b"error\nunknown command"),
]


def test_hostile_admin_requests(xmppd_factory, clients):
    srv = xmppd_factory()
    # a client that never finishes its request does not hold up the others
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.connect(sock_path(srv))
    hung.sendall(b"list\n")
    for data, want in HOSTILE:
        reply = admin_request(srv, data)
        assert reply.startswith(want), "%r -> %r (wanted %r)" % (data[:40], reply, want)
    # more connections than the server takes at once: the extra are closed,
    # the rest answered
    held = []
    for _ in range(12):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path(srv))
        held.append(s)
    time.sleep(0.3)
    for s in held:
        s.close()
    hung.close()
    r = srv.ctl("list")
    assert r.returncode == 0 and ALICE in r.stdout.split(), out_of(r)
    assert "mallory@localhost" not in r.stdout
    c = clients(srv, ALICE + "/after")
    assert c.login() == "session", c.describe()
    assert srv.running()


def test_password_with_a_line_break_refused(unstarted_srv):
    r = unstarted_srv.ctl("adduser", "erin@localhost", "--password", "two\nlines")
    assert r.returncode == 1 and "line break" in out_of(r), out_of(r)
