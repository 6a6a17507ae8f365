"""
Fixtures for the xmppd integration tests (real server, real TLS sockets).

Run from the repo root:   /usr/bin/python3 -m pytest -q tests/integration
The binaries come from $XMPPD_BUILD_DIR (default <repo>/build).
"""

import sys

import pytest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree

from xmpp_helpers import (BUILD_DIR, USERS, ChatPair, Client, LoopThread, RawStream, Server,
                          make_certs, missing_binaries)


def pytest_report_header(config):
    return "xmppd build dir: %s" % BUILD_DIR


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure (call or teardown), show the logs of the servers the test ran."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for srv in getattr(item, "_xmppd_servers", []):
            rep.sections.append(("xmppd log: %s (%s)" % (srv.name, srv.log_path),
                                 srv.log_tail(200)))


@pytest.fixture(scope="session")
def built():
    missing = missing_binaries()
    if missing:
        pytest.fail("xmppd is not built (set XMPPD_BUILD_DIR or run `meson setup build && "
                    "ninja -C build`); missing: %s" % ", ".join(missing), pytrace=False)
    return BUILD_DIR


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """Test CA + server cert/key for localhost (certtool)."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def xmppd_factory(request, tmp_path, certs, built):
    """make(name=..., users=USERS, start=True, **Server kwargs) -> Server.

    Every server made is SIGTERMed at teardown, and must then exit 0 (unless
    the test marked it expect_failure)."""
    servers = []
    request.node._xmppd_servers = servers

    def make(name="xmppd", users=USERS, extra_users=(), start=True, **kw):
        srv = Server(tmp_path / name, certs, name=name, **kw)
        servers.append(srv)
        for jid, pw in list(users.items()) + list(extra_users):
            srv.adduser(jid, pw)
        if start:
            srv.start()
        return srv

    yield make

    problems = []
    for srv in servers:
        was_running = srv.running()
        rc = srv.terminate()
        if srv.expect_failure or srv.proc is None:
            continue
        if rc != 0:
            problems.append("%s: exit status %r after SIGTERM%s (expected 0)" % (
                srv.name, rc, "" if was_running else " -- it was no longer running at "
                "teardown (crashed or exited during the test)"))
    if problems:
        pytest.fail("server did not shut down cleanly: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def server(xmppd_factory):
    """A running xmppd with alice@localhost and bob@localhost."""
    return xmppd_factory()


@pytest.fixture
def raw(server):
    """make(jid=None, resource="raw") -> RawStream to `server` (logged in and
    bound as jid when given; its full JID in .full).  All closed at teardown.
    Test files with other needs define their own `raw`."""
    opened = []

    def make(jid=None, resource="raw"):
        r = RawStream(server)
        opened.append(r)
        if jid:
            r.full = r.login(jid, USERS[jid], resource)
        return r

    yield make
    for r in opened:
        r.close()


@pytest.fixture
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def clients(loop):
    """make(server, jid, password=None, transport="starttls", mech=None) -> Client
    (not yet connected). All are aborted at teardown."""
    made = []

    def make(server, jid, password=None, **kw):
        if password is None:
            password = USERS[jid.split("/")[0]]
        c = Client(loop, server, jid, password, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def chat_pair(loop):
    """make(server) -> ChatPair: alice and bob logged in and available."""
    made = []

    def make(server, resource="canary"):
        p = ChatPair(loop, server, resource)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
