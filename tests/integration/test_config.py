"""Config checking (xmppd --check-config / --config) and account admin (xmppctl)."""

import re
import subprocess
import time

import pytest

from xmpp_helpers import USERS, XMPPD, line_of, port_accepts

ALICE = "alice@localhost"


def check_config(path):
    return subprocess.run([str(XMPPD), "--check-config", str(path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=20)


def assert_names_line(output, path, line):
    """output must contain `<file>:<line>` (the path as given, or its basename)."""
    pat = r"(?:%s|%s):(\d+)" % (re.escape(str(path)), re.escape(path.name))
    found = [int(n) for n in re.findall(pat, output)]
    assert found, "no %s:LINE in output:\n%s" % (path.name, output)
    assert line in found, "expected %s:%d, output names line(s) %s:\n%s" % (
        path.name, line, found, output)


# Each bad config: (Server kwargs, token the message must name, marker of the line)
BAD_CONFIGS = {
    "unknown-module": (dict(modules=("c2s", "nosuch")), "nosuch", '"nosuch"'),
    "unknown-c2s-key": (dict(c2s={"max_stanza_size": 262144, "bogus": 1}), "bogus", "bogus = 1;"),
    "wrong-type-c2s-value": (dict(c2s={"max_stanza_size": "huge"}), "max_stanza_size",
                             'max_stanza_size = "huge";'),
    "syntax-error": (dict(extra="oops = ;"), None, "oops = ;"),
}


@pytest.fixture
def unstarted(xmppd_factory):
    """make(**kw) -> a Server with config written, alice and bob added, not started."""
    def make(**kw):
        return xmppd_factory(start=False, **kw)
    return make


def test_check_config_good(unstarted):
    srv = unstarted()
    r = check_config(srv.config_path)
    assert r.returncode == 0, "good config refused (rc=%s):\n%s%s\n--- config ---\n%s" % (
        r.returncode, r.stdout, r.stderr, srv.config)


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_check_config_bad(xmppd_factory, case):
    kw, token, marker = BAD_CONFIGS[case]
    # users=={} : xmppctl may rightly refuse to work with a broken config
    srv = xmppd_factory(start=False, users={}, **kw)
    line = line_of(srv.config, marker)
    r = check_config(srv.config_path)
    out = r.stdout + r.stderr
    assert r.returncode == 1, "--check-config of %s: rc=%s (expected 1):\n%s\n--- config ---\n%s" % (
        case, r.returncode, out, srv.config)
    if token:
        assert token in out, "message does not name %r:\n%s" % (token, out)
    assert_names_line(out, srv.config_path, line)


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_start_with_bad_config_exits_without_listening(xmppd_factory, case):
    kw, token, marker = BAD_CONFIGS[case]
    srv = xmppd_factory(start=False, users={}, **kw)
    srv.expect_failure = True
    line = line_of(srv.config, marker)
    srv.start(wait=False)
    listened = []
    deadline = time.monotonic() + 10
    while srv.proc.poll() is None and time.monotonic() < deadline:
        for addr, port, _ in srv.listeners:
            if port_accepts(addr, port, 0.2):
                listened.append(port)
        time.sleep(0.02)
    rc = srv.wait_exit(0.5)
    log = srv.log()
    assert rc == 1, "xmppd --config with %s exited %s (expected 1):\n%s" % (case, rc, log)
    assert not listened, "xmppd accepted connections on %s with a bad config" % listened
    if token:
        assert token in log, "log does not name %r:\n%s" % (token, log)
    assert_names_line(log, srv.config_path, line)


# ------------------------------------------------------------------- xmppctl

def out_of(r):
    return (r.stdout or "") + (r.stderr or "")


def test_adduser_twice_refused(unstarted):
    srv = unstarted()
    r = srv.ctl("adduser", ALICE, "--password", "another")
    assert r.returncode == 1, "second adduser: rc=%s %s" % (r.returncode, out_of(r))
    assert "exists" in out_of(r).lower(), "reason does not say 'exists': %r" % out_of(r)


@pytest.mark.parametrize("jid", ["@localhost", "alice@", "al ice@localhost",
                                 "alice@@localhost", "", "alice@localhost/resource"])
def test_adduser_bad_jid_refused(unstarted, jid):
    srv = unstarted()
    r = srv.ctl("adduser", jid, "--password", "pw")
    assert r.returncode == 1, "adduser %r: rc=%s %s" % (jid, r.returncode, out_of(r))
    assert out_of(r).strip(), "no reason given"


def test_adduser_unknown_host_refused(unstarted):
    srv = unstarted()
    r = srv.ctl("adduser", "carol@example.org", "--password", "pw")
    assert r.returncode == 1, "adduser for a host not served: rc=%s %s" % (r.returncode, out_of(r))
    assert out_of(r).strip(), "no reason given"
    r = srv.ctl("list")
    assert "carol" not in r.stdout


def test_list(unstarted):
    srv = unstarted()
    for args in (("list",), ("list", "localhost")):
        r = srv.ctl(*args)
        assert r.returncode == 0, "%s: rc=%s %s" % (args, r.returncode, out_of(r))
        listed = set(r.stdout.split())
        for jid in USERS:
            assert jid in listed, "%s does not show %s: %r" % (args, jid, r.stdout)


@pytest.fixture(params=["offline", "live"])
def admin_server(request, xmppd_factory):
    """(server, restart): the accounts are changed with xmppctl while the server
    is stopped ("offline", then it is started) or while it runs ("live")."""
    srv = xmppd_factory(start=(request.param == "live"))

    def ready():
        if not srv.running():
            srv.start()
    return srv, ready


def test_adduser_password_on_stdin(admin_server, clients):
    srv, ready = admin_server
    r = srv.ctl("adduser", "carol@localhost", input="carol-pw-stdin\n")
    assert r.returncode == 0, "adduser with stdin password: rc=%s %s" % (r.returncode, out_of(r))
    ready()
    for mech in ("SCRAM-SHA-256", "SCRAM-SHA-1"):
        c = clients(srv, "carol@localhost/" + mech, "carol-pw-stdin", mech=mech)
        assert c.login() == "session", "%s login: %s" % (mech, c.describe())


def test_passwd_then_login(admin_server, clients):
    """The new password works (at once, on a running server), the old one not."""
    srv, ready = admin_server
    r = srv.ctl("passwd", ALICE, input="brand-new-pw\n")
    assert r.returncode == 0, "passwd: rc=%s %s" % (r.returncode, out_of(r))
    ready()
    for mech in ("SCRAM-SHA-256", "SCRAM-SHA-1"):
        new = clients(srv, ALICE + "/new-" + mech, "brand-new-pw", mech=mech)
        assert new.login() == "session", "login with the new password (%s): %s" % (
            mech, new.describe())
    for mech in ("PLAIN", "SCRAM-SHA-256"):
        old = clients(srv, ALICE + "/old-" + mech, USERS[ALICE], mech=mech)
        assert old.login() == "failed", "old password still accepted (%s): %s" % (
            mech, old.describe())
        assert old.failures == ["not-authorized"], old.describe()


def test_passwd_unknown_user(unstarted):
    srv = unstarted()
    r = srv.ctl("passwd", "nobody@localhost", input="x\n")
    assert r.returncode == 1, "passwd of a missing account: rc=%s %s" % (r.returncode, out_of(r))


def test_deluser_then_login_fails(admin_server, clients):
    srv, ready = admin_server
    r = srv.ctl("deluser", "bob@localhost")
    assert r.returncode == 0, "deluser: rc=%s %s" % (r.returncode, out_of(r))
    r = srv.ctl("list")
    assert "bob@localhost" not in r.stdout.split(), "deleted user still listed: %r" % r.stdout
    assert ALICE in r.stdout.split()
    r = srv.ctl("deluser", "bob@localhost")
    assert r.returncode == 1, "second deluser: rc=%s %s" % (r.returncode, out_of(r))
    ready()
    for mech in ("PLAIN", "SCRAM-SHA-256"):
        c = clients(srv, "bob@localhost/gone-" + mech, mech=mech)
        assert c.login() == "failed", "deleted account could log in (%s): %s" % (
            mech, c.describe())
        assert c.failures == ["not-authorized"], c.describe()
    # the remaining account is unaffected
    a = clients(srv, ALICE + "/still")
    assert a.login() == "session", a.describe()
