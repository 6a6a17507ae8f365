"""mod_time: XEP-0202 entity time of the server, asked by slixmpp's plugin
and on a hand-written stream."""
import datetime
import re

import pytest
from slixmpp.exceptions import IqError

from xmpp_helpers import DOMAIN, USERS, RawStream

ALICE, BOB = "alice@localhost", "bob@localhost"
NS_TIME = "urn:xmpp:time"


@pytest.fixture
def srv(xmppd_factory):
    return xmppd_factory(modules=("c2s", "time"))


def near_now(utc):
    t = datetime.datetime.strptime(utc, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc)
    return abs((datetime.datetime.now(datetime.timezone.utc) - t).total_seconds()) < 30


def test_server_time_with_slixmpp(srv, clients):
    alice = clients(srv, ALICE + "/home").must_login()
    r = alice.iq(DOMAIN, "<time xmlns='%s'/>" % NS_TIME)
    t = r.xml.find("{%s}time" % NS_TIME)
    assert t is not None, str(r)
    assert t.findtext("{%s}tzo" % NS_TIME) == "+00:00", str(r)
    assert near_now(t.findtext("{%s}utc" % NS_TIME)), str(r)
    assert NS_TIME in alice.disco_info(DOMAIN)["disco_info"]["features"]
    # a bare JID is not the server's to answer for
    with pytest.raises(IqError) as ei:
        alice.iq(BOB, "<time xmlns='%s'/>" % NS_TIME)
    assert ei.value.iq["error"]["condition"] == "service-unavailable"


def test_server_time_on_a_raw_stream(srv):
    r = RawStream(srv)
    r.login(ALICE, USERS[ALICE], "raw")
    r.send("<iq type='get' id='t1' to='localhost'><time xmlns='urn:xmpp:time'/></iq>")
    out = r.expect(re.compile(rb"<iq\b[^>]*\bid=['\"]t1['\"][^>]*>.*?</iq>", re.S),
                   what="time result")
    assert re.search(rb"type=['\"]result['\"]", out), out
    assert b"<tzo>+00:00</tzo>" in out, out
    m = re.search(rb"<utc>([^<]+)</utc>", out)
    assert m and near_now(m.group(1).decode()), out
    r.close()


def test_without_the_module_it_is_unavailable(xmppd_factory, clients):
    srv = xmppd_factory(modules=("c2s",))
    alice = clients(srv, ALICE + "/home").must_login()
    with pytest.raises(IqError) as ei:
        alice.iq(DOMAIN, "<time xmlns='%s'/>" % NS_TIME)
    assert ei.value.iq["error"]["condition"] == "service-unavailable"
