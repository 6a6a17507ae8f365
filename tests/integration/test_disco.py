"""XEP-0030 disco#info for the server and for accounts, and the XEP-0115
capabilities hash the server puts in its stream features."""

import base64
import hashlib
import re
from xml.etree import ElementTree as ET

from xmpp_helpers import USERS, RawStream

DISCO = "http://jabber.org/protocol/disco#info"
CAPS = "http://jabber.org/protocol/caps"


def info(raw, to, ident):
    raw.send("<iq type='get' id='%s' to='%s'><query xmlns='%s'/></iq>" % (ident, to, DISCO))
    out = raw.expect(re.compile(rb"<iq\b[^>]*id=[\"']%s[\"'].*?</iq>" % ident.encode(), re.S))
    return ET.fromstring(out)


def caps_ver(query):
    """XEP-0115 5.1 from a disco#info <query/>."""
    ids = sorted("%s/%s//%s<" % (i.get("category"), i.get("type"), i.get("name") or "")
                 for i in query.findall("{%s}identity" % DISCO))
    feats = sorted("%s<" % f.get("var") for f in query.findall("{%s}feature" % DISCO))
    return base64.b64encode(hashlib.sha1("".join(ids + feats).encode()).digest()).decode()


def test_caps_in_stream_features_match_disco(server):
    r = RawStream(server)
    try:
        r.open_stream()
        r.starttls()
        feats = r.open_stream()
        m = re.search(rb"<c [^>]*xmlns=[\"']%s[\"'][^>]*>" % CAPS.encode(), feats)
        assert m, feats
        ver = re.search(rb"ver=[\"']([^\"']+)[\"']", m.group(0)).group(1).decode()
        assert re.search(rb"hash=[\"']sha-1[\"']", m.group(0))
        r.buf = b""
        assert r.auth_scram("alice", USERS["alice@localhost"])
        r.open_stream()
        r.bind("caps")
        q = info(r, "localhost", "d1").find("{%s}query" % DISCO)
        assert q.find("{%s}identity[@category='server']" % DISCO) is not None
        assert caps_ver(q) == ver
    finally:
        r.close()


def test_account_disco_info(server):
    a, b = RawStream(server), RawStream(server)
    try:
        a.login("alice@localhost", USERS["alice@localhost"], "a")
        b.login("bob@localhost", USERS["bob@localhost"], "b")
        iq = info(b, "alice@localhost", "d2")
        assert iq.get("type") == "result", ET.tostring(iq)
        q = iq.find("{%s}query" % DISCO)
        ident = q.find("{%s}identity" % DISCO)
        assert (ident.get("category"), ident.get("type")) == ("account", "registered")
        # An account that does not exist is not discoverable.
        iq = info(b, "nobody@localhost", "d3")
        assert iq.get("type") == "error"
    finally:
        a.close()
        b.close()
