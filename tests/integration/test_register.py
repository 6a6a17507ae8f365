"""XEP-0077 In-Band Registration (mod_register): creating an account before
authentication (only over TLS, only when the admin opened it, with checked
usernames and passwords and a per-address hourly limit), then changing the
password and cancelling the account after authentication."""

import re

import pytest

from xmpp_helpers import MALLORY, USERS, RawStream, uniq

ALICE, BOB = "alice@localhost", "bob@localhost"
NS = "jabber:iq:register"
MODULES = ("c2s", "register")
OPEN = "register = { open = true; per_ip_per_hour = 3; };\n"
GOOD_PW = "Correct-Horse-9"


@pytest.fixture
def streams():
    opened = []

    def track(r):
        opened.append(r)
        return r

    yield track
    for r in opened:
        r.close()


def stanza(r, name, ident, what=None):
    out = r.expect(re.compile(rb"<%s\b[^>]*\bid=[\"']%s[\"'][^>]*?(?:/>|(?<!/)>.*?</%s>)"
                              % (name.encode(), re.escape(ident).encode(), name.encode()),
                              re.S),
                   what=what or "%s id=%s" % (name, ident))
    return out[out.rfind(b"<%s" % name.encode()):]


def error_condition(xml):
    m = re.search(rb"<error\b[^>]*>\s*<([a-z-]+)\b[^>]*urn:ietf:params:xml:ns:xmpp-stanzas", xml)
    return m.group(1).decode() if m else None


def error_type(xml):
    m = re.search(rb"<error\b[^>]*\btype=[\"']([a-z]+)[\"']", xml)
    return m.group(1).decode() if m else None


def is_result(xml):
    return re.search(rb"\btype=[\"']result[\"']", xml.split(b">", 1)[0]) is not None


def pre_auth(server, streams):
    """A stream after STARTTLS, before SASL. Returns (stream, features)."""
    r = streams(RawStream(server))
    r.open_stream()
    r.starttls()
    return r, r.open_stream()


def iq(r, payload, itype="get", to=None):
    ident = uniq("reg")
    r.send("<iq type='%s' id='%s'%s>%s</iq>" % (itype, ident, " to='%s'" % to if to else "",
                                                 payload))
    return stanza(r, "iq", ident)


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")


def register(r, user, password):
    parts = ""
    if user is not None:
        parts += "<username>%s</username>" % esc(user)
    if password is not None:
        parts += "<password>%s</password>" % esc(password)
    return iq(r, "<query xmlns='%s'>%s</query>" % (NS, parts), "set")


def can_login(server, streams, user, password):
    r = streams(RawStream(server))
    r.open_stream()
    r.starttls()
    r.open_stream()
    return r.auth_scram(user, password)


def logged_in(server, streams, jid, password, resource="raw"):
    r = streams(RawStream(server))
    r.full = r.login(jid, password, resource)
    return r


# --------------------------------------------------------------------------- tests

def test_register_then_log_in(xmppd_factory, streams, clients):
    srv = xmppd_factory(modules=MODULES, extra=OPEN)
    r, features = pre_auth(srv, streams)
    assert re.search(rb"<register\b[^>]*xmlns=[\"']http://jabber.org/features/iq-register[\"']",
                     features), features
    form = iq(r, "<query xmlns='%s'/>" % NS)
    assert is_result(form), form
    for field in (b"<instructions>", b"<username", b"<password"):
        assert field in form, form
    out = register(r, "Newbie", GOOD_PW)
    assert is_result(out), out
    # The username was prepared (case-mapped); slixmpp logs in for real.
    c = clients(srv, "newbie@localhost/phone", GOOD_PW).must_login()
    assert c.full_jid == "newbie@localhost/phone"
    assert not can_login(srv, streams, "newbie", GOOD_PW + "x")


def test_server_advertises_the_feature(xmppd_factory, clients):
    srv = xmppd_factory(modules=MODULES)
    c = clients(srv, ALICE + "/x").must_login()
    info = c.disco_info("localhost")
    assert NS in info["disco_info"]["features"], info


def test_closed_by_default(xmppd_factory, streams):
    srv = xmppd_factory(modules=MODULES)
    r, features = pre_auth(srv, streams)
    assert b"iq-register" not in features, features
    out = iq(r, "<query xmlns='%s'/>" % NS)
    assert error_condition(out) == "not-allowed", out
    out = register(r, "sneaky", GOOD_PW)
    assert error_condition(out) == "not-allowed", out
    assert not can_login(srv, streams, "sneaky", GOOD_PW)
    # Explicitly closed is the same.
    srv2 = xmppd_factory(name="closed", modules=MODULES, extra="register = { open = false; };\n")
    r2, features = pre_auth(srv2, streams)
    assert b"iq-register" not in features
    assert error_condition(register(r2, "sneaky", GOOD_PW)) == "not-allowed"


def test_bad_usernames_refused(xmppd_factory, streams):
    srv = xmppd_factory(modules=MODULES, extra=OPEN)
    r, _ = pre_auth(srv, streams)
    for user in ("a@b", "two words", "", "tab\there", "x" * 1100, "a/b", "q\"uote", "<x>"):
        out = register(r, user, GOOD_PW)
        assert error_condition(out) in ("jid-malformed", "not-acceptable"), (user[:20], out)
    out = register(r, None, GOOD_PW)
    assert error_condition(out) == "not-acceptable", out
    out = register(r, "nopassword", None)
    assert error_condition(out) == "not-acceptable", out
    # None of those used up the hourly allowance (3): a valid one still works.
    for i in range(3):
        assert is_result(register(r, "valid%d" % i, GOOD_PW))
    assert not can_login(srv, streams, "two words", GOOD_PW)


def test_weak_passwords_refused(xmppd_factory, streams):
    srv = xmppd_factory(modules=MODULES, extra=OPEN)
    r, _ = pre_auth(srv, streams)
    for user, pw in (("weakling", "short1"), ("weakling", "1234567"),
                     ("longusername1", "longusername1"), ("samename99", "SameName99")):
        out = register(r, user, pw)
        assert error_condition(out) == "not-acceptable", (user, pw, out)
        assert b"<text" in out, out
    # Nothing was created: the name is still free.
    assert is_result(register(r, "weakling", GOOD_PW))
    assert can_login(srv, streams, "weakling", GOOD_PW)


def test_min_password_length_setting(xmppd_factory, streams):
    srv = xmppd_factory(modules=MODULES,
                        extra="register = { open = true; min_password_length = 12; };\n")
    r, _ = pre_auth(srv, streams)
    assert error_condition(register(r, "carol", "elevenchars")) == "not-acceptable"
    assert is_result(register(r, "carol", "twelve-chars"))


def test_existing_user_conflict(xmppd_factory, streams):
    srv = xmppd_factory(modules=MODULES, extra=OPEN)
    r, _ = pre_auth(srv, streams)
    for user in ("alice", "ALICE"):
        out = register(r, user, GOOD_PW)
        assert error_condition(out) == "conflict", (user, out)
    # alice keeps her password.
    assert can_login(srv, streams, "alice", USERS[ALICE])
    assert not can_login(srv, streams, "alice", GOOD_PW)


def test_hourly_limit_per_address(xmppd_factory, streams):
    srv = xmppd_factory(modules=MODULES, extra=OPEN)
    for i in range(3):
        r, _ = pre_auth(srv, streams)
        assert is_result(register(r, "rate%d" % i, GOOD_PW)), i
    r, _ = pre_auth(srv, streams)
    out = register(r, "rate3", GOOD_PW)
    assert error_condition(out) == "resource-constraint", out
    assert error_type(out) == "wait", out
    assert not can_login(srv, streams, "rate3", GOOD_PW)
    assert can_login(srv, streams, "rate2", GOOD_PW)


def test_no_registration_before_tls(xmppd_factory, streams):
    srv = xmppd_factory(modules=MODULES, extra=OPEN)
    r = streams(RawStream(srv))
    features = r.open_stream()
    assert b"iq-register" not in features and b"starttls" in features, features
    r.send("<iq type='set' id='r1'><query xmlns='%s'><username>cleartext</username>"
           "<password>%s</password></query></iq>" % (NS, GOOD_PW))
    r.expect_stream_error("policy-violation")
    assert not can_login(srv, streams, "cleartext", GOOD_PW)


def test_change_password(xmppd_factory, streams):
    srv = xmppd_factory(modules=MODULES)   # registration closed: changing still works
    alice = logged_in(srv, streams, ALICE, USERS[ALICE])
    out = register(alice, "alice", "short")
    assert error_condition(out) == "not-acceptable", out
    out = register(alice, "bob", "New-Password-77")
    assert error_condition(out) == "bad-request", out
    # another user cannot change alice's password
    bob = logged_in(srv, streams, BOB, USERS[BOB])
    out = iq(bob, "<query xmlns='%s'><username>alice</username><password>Bobs-Choice-1"
                  "</password></query>" % NS, "set", ALICE)
    assert error_condition(out) == "forbidden", out
    out = register(alice, "alice", "New-Password-77")
    assert is_result(out), out
    assert can_login(srv, streams, "alice", "New-Password-77")
    assert not can_login(srv, streams, "alice", USERS[ALICE])
    assert not can_login(srv, streams, "alice", "Bobs-Choice-1")


def test_cancel_registration(xmppd_factory, streams):
    jid, pw = MALLORY
    srv = xmppd_factory(modules=MODULES, extra_users=[MALLORY])
    other = logged_in(srv, streams, jid, pw, "other")
    me = logged_in(srv, streams, jid, pw, "me")
    # bob cannot cancel mallory's account
    bob = logged_in(srv, streams, BOB, USERS[BOB])
    out = iq(bob, "<query xmlns='%s'><remove/></query>" % NS, "set", jid)
    assert error_condition(out) == "forbidden", out

    out = iq(me, "<query xmlns='%s'><remove/></query>" % NS, "set")
    assert is_result(out), out
    me.expect_stream_error("not-authorized")
    other.expect_stream_error("not-authorized")
    assert not can_login(srv, streams, "mallory", pw)
    # bob was not touched
    assert can_login(srv, streams, "bob", USERS[BOB])


def test_bad_setting_stops_the_server(xmppd_factory):
    srv = xmppd_factory(modules=MODULES, start=False,
                        extra="register = { open = true; min_password_length = 0; };\n")
    srv.expect_failure = True
    srv.start(wait=False)
    assert srv.wait_exit() != 0
    assert "min_password_length" in srv.log()
