"""XEP-0163 PEP (mod_pep) over raw client streams: what OMEMO clients need
(open device list and bundles that strangers can fetch), access models
(without a roster module: owner only; with mod_roster: presence = subscription
'from', roster = roster item, for retrieval, notifications and the last items
sent when a contact gains access),
publish-options preconditions, max_items, retract, delete, configure,
notifications to the owner's resources and to contacts with +notify caps
(XEP-0115, the server's disco#info query answered by hand), persistence
across a restart, and requests that must be refused."""

import base64
import hashlib
import re
from xml.etree import ElementTree as ET

import pytest

from xmpp_helpers import MALLORY, USERS, RawStream

ALICE, BOB = "alice@localhost", "bob@localhost"
PUBSUB = "http://jabber.org/protocol/pubsub"
OWNER = PUBSUB + "#owner"
EVENT = PUBSUB + "#event"
ERRORS = PUBSUB + "#errors"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
XDATA = "jabber:x:data"
DISCO = "http://jabber.org/protocol/disco#info"
AXOLOTL = "eu.siacs.conversations.axolotl"
DEVICELIST = AXOLOTL + ".devicelist"
BUNDLE = AXOLOTL + ".bundles:12345"


@pytest.fixture
def srv(xmppd_factory):
    return xmppd_factory(modules=("c2s", "pep"), extra_users=[MALLORY])


@pytest.fixture
def raw():
    opened = []

    def make(server, jid, resource="raw", presence=True):
        r = RawStream(server)
        opened.append(r)
        pw = USERS.get(jid) or dict([MALLORY])[jid]
        r.full = r.login(jid, pw, resource)
        if presence:
            r.send("<presence/>")
            # our own presence comes back (mod_c2s): the session is available
            r.expect(re.compile(rb"<presence\b[^>]*?(?:/>|>.*?</presence>)", re.S),
                     what="own presence")
        return r

    yield make
    for r in opened:
        r.close()


# ---------------------------------------------------------------- helpers

_ids = iter(range(1, 1 << 30))


def read_stanza(r, name, ident=None, what=None, timeout=10):
    idpart = rb"[^>]*?\bid=[\"']%s[\"']" % re.escape(ident.encode()) if ident else b""
    pat = re.compile(rb"<%s\b%s[^>]*?(?:/>|>.*?</%s>)" % (name.encode(), idpart, name.encode()),
                     re.S)
    out = r.expect(pat, timeout=timeout, what=what or "%s id=%s" % (name, ident))
    start = out.rfind(b"<" + name.encode())
    # the match may begin after stanzas we skipped; parse only the last one
    m = pat.search(out[start:]) or pat.search(out)
    return ET.fromstring(m.group(0))


def iq(r, payload, type_="get", to=None):
    ident = "q%d" % next(_ids)
    r.send("<iq type='%s' id='%s'%s>%s</iq>"
           % (type_, ident, " to='%s'" % to if to else "", payload))
    return read_stanza(r, "iq", ident)


def ok(el):
    assert el.get("type") == "result", ET.tostring(el)
    return el


def error_of(el):
    """(type, stanza condition, pubsub#errors condition) of an error reply."""
    assert el.get("type") == "error", ET.tostring(el)
    err = el.find("error")
    cond = app = None
    for c in err:
        if c.tag.startswith("{%s}" % STANZAS) and not c.tag.endswith("}text"):
            cond = c.tag.split("}")[1]
        elif c.tag.startswith("{%s}" % ERRORS):
            app = c.tag.split("}")[1]
    return err.get("type"), cond, app


def form(form_type, **fields):
    out = ["<x xmlns='%s' type='submit'>" % XDATA,
           "<field var='FORM_TYPE' type='hidden'><value>%s</value></field>" % form_type]
    for k, v in fields.items():
        out.append("<field var='pubsub#%s'><value>%s</value></field>" % (k, v))
    out.append("</x>")
    return "".join(out)


def publish(r, node, payload, item_id=None, to=None, **options):
    opts = ""
    if options:
        opts = "<publish-options>%s</publish-options>" % form(PUBSUB + "#publish-options",
                                                              **options)
    item = "<item%s>%s</item>" % (" id='%s'" % item_id if item_id else "", payload)
    return iq(r, "<pubsub xmlns='%s'><publish node='%s'>%s</publish>%s</pubsub>"
              % (PUBSUB, node, item, opts), "set", to)


def fetch(r, owner, node, extra_attr="", inner=""):
    return iq(r, "<pubsub xmlns='%s'><items node='%s'%s>%s</items></pubsub>"
              % (PUBSUB, node, extra_attr, inner), "get", owner)


def fetched_ids(el):
    ok(el)
    items = el.find("{%s}pubsub/{%s}items" % (PUBSUB, PUBSUB))
    return [i.get("id") for i in items.findall("{%s}item" % PUBSUB)]


def owner_op(r, inner, type_="set"):
    return iq(r, "<pubsub xmlns='%s'>%s</pubsub>" % (OWNER, inner), type_)


def config_of(r, node):
    el = ok(owner_op(r, "<configure node='%s'/>" % node, "get"))
    x = el.find("{%s}pubsub/{%s}configure/{%s}x" % (OWNER, OWNER, XDATA))
    return {f.get("var"): f.findtext("{%s}value" % XDATA) for f in x.findall("{%s}field" % XDATA)}


def devicelist(*ids):
    return "<list xmlns='%s'>%s</list>" % (AXOLOTL, "".join("<device id='%d'/>" % i for i in ids))


def bundle(tag):
    return ("<bundle xmlns='%s'><signedPreKeyPublic signedPreKeyId='1'>%s</signedPreKeyPublic>"
            "<identityKey>BQ==</identityKey><prekeys><preKeyPublic preKeyId='1'>BQ==</preKeyPublic>"
            "</prekeys></bundle>" % (AXOLOTL, tag))


def event_message(r, node, timeout=10):
    """The next headline carrying a pubsub event for node."""
    while True:
        msg = read_stanza(r, "message", what="event for " + node, timeout=timeout)
        items = msg.find("{%s}event/*" % EVENT)
        if items is not None and items.get("node") == node:
            return msg


def assert_no_event(r, marker_from, timeout=10):
    """Nothing but the marker arrives: the stream is synchronised by a ping
    round trip, so an event sent before it would have been read."""
    ident = "sync%d" % next(_ids)
    r.send("<iq type='get' id='%s' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>" % ident)
    out = r.expect(re.compile(rb"<iq\b[^>]*?\bid=[\"']%s[\"']" % ident.encode()), timeout=timeout)
    assert EVENT.encode() not in out, "unexpected event before %s: %r" % (marker_from, out)


def caps_ver(identities, features):
    """XEP-0115 5.1 verification string (no forms)."""
    s = "".join("%s/%s//%s<" % i for i in sorted(identities))
    s += "".join("%s<" % f for f in sorted(features))
    return base64.b64encode(hashlib.sha1(s.encode()).digest()).decode()


CAPS_NODE = "https://test.invalid/client"


def caps_presence(features, to=None):
    ident = [("client", "pc", "pep test")]
    ver = caps_ver(ident, features)
    return ("<presence%s><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='%s' "
            "ver='%s'/></presence>" % (" to='%s'" % to if to else "", CAPS_NODE, ver)), ver, ident


def answer_disco(r, features, ident, ver):
    """Read the server's disco#info query for node#ver and answer it."""
    q = read_stanza(r, "iq", what="the server's disco#info query")
    assert q.get("type") == "get" and q.get("from") == "localhost", ET.tostring(q)
    query = q.find("{%s}query" % DISCO)
    assert query is not None and query.get("node") == "%s#%s" % (CAPS_NODE, ver), ET.tostring(q)
    body = "".join("<identity category='%s' type='%s' name='%s'/>" % i for i in ident)
    body += "".join("<feature var='%s'/>" % f for f in features)
    r.send("<iq type='result' id='%s' to='localhost'><query xmlns='%s' node='%s#%s'>%s</query>"
           "</iq>" % (q.get("id"), DISCO, CAPS_NODE, ver, body))


# ------------------------------------------------------------------ tests

def test_omemo_nodes_open_to_strangers(srv, raw):
    alice = raw(srv, ALICE, "phone")
    res = ok(publish(alice, DEVICELIST, devicelist(12345, 777), "current", access_model="open"))
    pub = res.find("{%s}pubsub/{%s}publish" % (PUBSUB, PUBSUB))
    assert pub.get("node") == DEVICELIST and pub.find("{%s}item" % PUBSUB).get("id") == "current"
    ok(publish(alice, BUNDLE, bundle("SPK1"), "current", access_model="open", max_items="max"))

    # bob has no subscription to alice at all
    bob = raw(srv, BOB, "laptop")
    el = ok(fetch(bob, ALICE, DEVICELIST))
    devs = el.findall(".//{%s}list/{%s}device" % (AXOLOTL, AXOLOTL))
    assert sorted(d.get("id") for d in devs) == ["12345", "777"], ET.tostring(el)
    el = ok(fetch(bob, ALICE, BUNDLE))
    assert el.findtext(".//{%s}signedPreKeyPublic" % AXOLOTL) == "SPK1", ET.tostring(el)
    assert fetched_ids(el) == ["current"]

    # the configuration is what the publish-options asked for
    conf = config_of(alice, BUNDLE)
    assert conf["pubsub#access_model"] == "open" and conf["pubsub#max_items"] == "max", conf
    assert config_of(alice, DEVICELIST)["pubsub#access_model"] == "open"

    # the account advertises PEP
    el = ok(iq(bob, "<query xmlns='%s'/>" % DISCO, "get", ALICE))
    feats = {f.get("var") for f in el.iter("{%s}feature" % DISCO)}
    for f in ("#publish", "#publish-options", "#auto-create", "#retrieve-items",
              "#access-open", "#delete-nodes", "#config-node", "#retract-items"):
        assert PUBSUB + f in feats, (f, feats)


@pytest.mark.parametrize("model,cond,app", [
    ("presence", ("auth", "not-authorized"), "presence-subscription-required"),
    ("roster", ("auth", "not-authorized"), "not-in-roster-group"),
    ("whitelist", ("cancel", "not-allowed"), "closed-node"),
])
def test_closed_access_models_refuse_strangers(srv, raw, model, cond, app):
    alice = raw(srv, ALICE, "a")
    node = "urn:xmpp:test:" + model
    ok(publish(alice, node, "<secret xmlns='urn:test'>x</secret>", "i1", access_model=model))
    bob = raw(srv, BOB, "b")
    assert error_of(fetch(bob, ALICE, node)) == (cond[0], cond[1], app)
    # asking for the item by id does not get around it
    assert error_of(fetch(bob, ALICE, node, inner="<item id='i1'/>"))[1] == cond[1]
    # the owner reads it
    assert fetched_ids(fetch(alice, None, node)) == ["i1"]


def test_default_access_is_presence(srv, raw):
    alice = raw(srv, ALICE, "a")
    ok(publish(alice, "http://jabber.org/protocol/mood", "<mood xmlns='http://jabber.org/protocol/mood'><happy/></mood>"))
    bob = raw(srv, BOB, "b")
    assert error_of(fetch(bob, ALICE, "http://jabber.org/protocol/mood")) == (
        "auth", "not-authorized", "presence-subscription-required")
    assert config_of(alice, "http://jabber.org/protocol/mood")["pubsub#access_model"] == "presence"
    # a node that does not exist
    assert error_of(fetch(bob, ALICE, "nope"))[1] == "item-not-found"


def test_publish_options_must_match_existing_node(srv, raw):
    alice = raw(srv, ALICE, "a")
    ok(publish(alice, DEVICELIST, devicelist(1), "current", access_model="open"))
    # a different access model: refused, and nothing changed
    err = publish(alice, DEVICELIST, devicelist(2), "current", access_model="presence")
    assert error_of(err) == ("cancel", "conflict", "precondition-not-met")
    bob = raw(srv, BOB, "b")
    el = ok(fetch(bob, ALICE, DEVICELIST))
    assert [d.get("id") for d in el.iter("{%s}device" % AXOLOTL)] == ["1"]
    # a different max_items too
    err = publish(alice, DEVICELIST, devicelist(2), "current", max_items="5")
    assert error_of(err) == ("cancel", "conflict", "precondition-not-met")
    # options that do match are fine
    ok(publish(alice, DEVICELIST, devicelist(3), "current", access_model="open", max_items="1"))
    el = ok(fetch(bob, ALICE, DEVICELIST))
    assert [d.get("id") for d in el.iter("{%s}device" % AXOLOTL)] == ["3"]
    # an option the server cannot honour, or a bad value, is not accepted silently
    for bad in ({"title": "x"}, {"access_model": "everyone"}, {"max_items": "0"},
                {"persist_items": "maybe"}):
        err = publish(alice, "urn:test:new", "<x xmlns='urn:test'/>", **bad)
        assert error_of(err)[1:] == ("conflict", "precondition-not-met"), bad
    assert error_of(fetch(alice, None, "urn:test:new"))[1] == "item-not-found"


def test_max_items_keeps_newest(srv, raw):
    alice = raw(srv, ALICE, "a")
    node = "urn:test:log"
    for i in range(5):
        ok(publish(alice, node, "<e xmlns='urn:test'>%d</e>" % i, "i%d" % i,
                   access_model="open", max_items="3"))
    bob = raw(srv, BOB, "b")
    assert fetched_ids(fetch(bob, ALICE, node)) == ["i2", "i3", "i4"]
    assert fetched_ids(fetch(bob, ALICE, node, " max_items='2'")) == ["i3", "i4"]
    # by id: present ones are returned, a missing one is not invented
    assert fetched_ids(fetch(bob, ALICE, node, inner="<item id='i3'/><item id='i0'/>")) == ["i3"]
    # republishing an id replaces it and makes it the newest
    ok(publish(alice, node, "<e xmlns='urn:test'>again</e>", "i2"))
    el = fetch(bob, ALICE, node)
    assert fetched_ids(el) == ["i3", "i4", "i2"]
    assert el.findall(".//{urn:test}e")[-1].text == "again"
    # generated ids are unique and returned
    ids = set()
    for _ in range(3):
        res = ok(publish(alice, node, "<e xmlns='urn:test'/>"))
        ids.add(res.find(".//{%s}item" % PUBSUB).get("id"))
    assert len(ids) == 3 and all(ids)
    assert set(fetched_ids(fetch(bob, ALICE, node))) == ids
    # the default for a node without options is one item
    for i in range(3):
        ok(publish(alice, "urn:test:one", "<e xmlns='urn:test'/>", "k%d" % i))
    assert fetched_ids(fetch(alice, None, "urn:test:one")) == ["k2"]


def test_retract_delete_configure(srv, raw):
    alice = raw(srv, ALICE, "a")
    bob = raw(srv, BOB, "b")
    node = "urn:test:retract"
    for i in range(3):
        ok(publish(alice, node, "<e xmlns='urn:test'/>", "r%d" % i, access_model="open",
                   max_items="10"))
    retract = "<pubsub xmlns='%s'><retract node='%s'><item id='%%s'/></retract></pubsub>" % (
        PUBSUB, node)
    # only the owner retracts
    assert error_of(iq(bob, retract % "r1", "set", ALICE))[1] == "forbidden"
    ok(iq(alice, retract % "r1", "set"))
    assert fetched_ids(fetch(bob, ALICE, node)) == ["r0", "r2"]
    assert error_of(iq(alice, retract % "r1", "set"))[1] == "item-not-found"

    # configure: get shows the config, set changes it (and trims to max_items)
    conf = config_of(alice, node)
    assert conf["FORM_TYPE"] == PUBSUB + "#node_config"
    assert conf["pubsub#max_items"] == "10" and conf["pubsub#access_model"] == "open"
    cfg = "<configure node='%s'>%s</configure>" % (
        node, form(PUBSUB + "#node_config", access_model="whitelist", max_items="1"))
    assert error_of(iq(bob, "<pubsub xmlns='%s'>%s</pubsub>" % (OWNER, cfg), "set",
                       ALICE))[1] == "forbidden"
    assert error_of(iq(bob, "<pubsub xmlns='%s'><configure node='%s'/></pubsub>" % (OWNER, node),
                       "get", ALICE))[1] == "forbidden"
    ok(owner_op(alice, cfg))
    conf = config_of(alice, node)
    assert conf["pubsub#access_model"] == "whitelist" and conf["pubsub#max_items"] == "1"
    assert fetched_ids(fetch(alice, None, node)) == ["r2"]
    assert error_of(fetch(bob, ALICE, node))[1] == "not-allowed"
    bad = "<configure node='%s'>%s</configure>" % (node, form(PUBSUB + "#node_config",
                                                              deliver_ftl="1"))
    assert error_of(owner_op(alice, bad))[1] == "not-acceptable"

    # delete: owner only; afterwards the node is gone, and can be made anew
    delete = "<delete node='%s'/>" % node
    assert error_of(iq(bob, "<pubsub xmlns='%s'>%s</pubsub>" % (OWNER, delete), "set",
                       ALICE))[1] == "forbidden"
    ok(owner_op(alice, delete))
    assert error_of(fetch(alice, None, node))[1] == "item-not-found"
    assert error_of(owner_op(alice, delete))[1] == "item-not-found"
    ok(publish(alice, node, "<e xmlns='urn:test'/>", "new", access_model="open"))
    assert fetched_ids(fetch(bob, ALICE, node)) == ["new"]
    assert config_of(alice, node)["pubsub#max_items"] == "1"


def test_owner_other_resources_get_notifications(srv, raw):
    phone = raw(srv, ALICE, "phone")
    desk = raw(srv, ALICE, "desk")
    bob = raw(srv, BOB, "b")        # a stranger without caps: nothing for him
    ok(publish(phone, DEVICELIST, devicelist(42), "current", access_model="open"))
    for r in (desk, phone):
        msg = event_message(r, DEVICELIST)
        assert msg.get("type") == "headline" and msg.get("from") == ALICE, ET.tostring(msg)
        assert msg.get("to") == r.full
        item = msg.find("{%s}event/{%s}items/{%s}item" % (EVENT, EVENT, EVENT))
        assert item.get("id") == "current"
        assert item.find("{%s}list/{%s}device" % (AXOLOTL, AXOLOTL)).get("id") == "42"
    assert_no_event(bob, "ping")
    # a retraction is announced too (notify_retract defaults to on)
    ok(iq(phone, "<pubsub xmlns='%s'><retract node='%s'><item id='current'/></retract></pubsub>"
          % (PUBSUB, DEVICELIST), "set"))
    msg = event_message(desk, DEVICELIST)
    assert msg.find(".//{%s}retract" % EVENT).get("id") == "current"


def test_contact_with_notify_caps_gets_events(srv, raw):
    alice = raw(srv, ALICE, "phone")
    ok(publish(alice, DEVICELIST, devicelist(1), "current", access_model="open"))
    ok(publish(alice, "urn:test:private", "<p xmlns='urn:test'/>", "x"))  # presence access

    feats = [DISCO, AXOLOTL + ".devicelist+notify", "urn:test:private+notify"]
    bob = raw(srv, BOB, "laptop", presence=False)
    pres, ver, ident = caps_presence(feats, to=ALICE)
    bob.send(pres)
    answer_disco(bob, feats, ident, ver)
    # the last published item comes at once (send_last_published_item)
    msg = event_message(bob, DEVICELIST)
    assert msg.get("from") == ALICE and msg.get("to") == bob.full
    assert [d.get("id") for d in msg.iter("{%s}device" % AXOLOTL)] == ["1"]

    ok(publish(alice, DEVICELIST, devicelist(1, 2), "current"))
    msg = event_message(bob, DEVICELIST)
    assert [d.get("id") for d in msg.iter("{%s}device" % AXOLOTL)] == ["1", "2"]
    # a presence-access node is not sent to him, though he asked for it
    ok(publish(alice, "urn:test:private", "<p xmlns='urn:test'>2</p>", "y"))
    assert_no_event(bob, "private publish")

    # a second client with the same (verified) caps: no new query, last item at once
    bob2 = raw(srv, BOB, "tablet", presence=False)
    bob2.send(caps_presence(feats, to=ALICE)[0])
    msg = event_message(bob2, DEVICELIST)
    assert [d.get("id") for d in msg.iter("{%s}device" % AXOLOTL)] == ["1", "2"]

    # unavailable presence ends the interest
    bob.send("<presence type='unavailable' to='%s'/>" % ALICE)
    assert_no_event(bob, "the unavailable presence")  # processed before alice publishes
    ok(publish(alice, DEVICELIST, devicelist(3), "current"))
    event_message(bob2, DEVICELIST)
    assert_no_event(bob, "after unavailable")

    # a client whose caps do not ask for the node gets nothing
    feats_none = [DISCO]
    m = raw(srv, MALLORY[0], "m", presence=False)
    pres, ver2, ident2 = caps_presence(feats_none, to=ALICE)
    m.send(pres)
    answer_disco(m, feats_none, ident2, ver2)
    ok(publish(alice, DEVICELIST, devicelist(4), "current"))
    event_message(bob2, DEVICELIST)
    assert_no_event(m, "no +notify")


def test_forged_caps_answer_is_not_shared(srv, raw):
    """An answer that does not hash to its ver serves only the JID that gave it."""
    alice = raw(srv, ALICE, "phone")
    ok(publish(alice, DEVICELIST, devicelist(9), "current", access_model="open"))
    real = [DISCO]                                      # what the ver really says
    forged = [DISCO, AXOLOTL + ".devicelist+notify"]    # what mallory answers
    m = raw(srv, MALLORY[0], "m", presence=False)
    pres, ver, ident = caps_presence(real, to=ALICE)
    m.send(pres)
    answer_disco(m, forged, ident, ver)
    event_message(m, DEVICELIST)    # mallory herself is served by her own answer
    # bob with the same ver is asked again rather than trusting mallory's answer
    bob = raw(srv, BOB, "b", presence=False)
    bob.send(pres)
    answer_disco(bob, real, ident, ver)
    ok(publish(alice, DEVICELIST, devicelist(10), "current"))
    event_message(m, DEVICELIST)
    assert_no_event(bob, "forged caps")


def test_owner_resource_caps_filter_and_last_item(srv, raw):
    alice = raw(srv, ALICE, "phone")
    ok(publish(alice, DEVICELIST, devicelist(5), "current", access_model="open"))
    ok(publish(alice, "urn:test:other", "<o xmlns='urn:test'/>", "o"))
    desk = raw(srv, ALICE, "desk", presence=False)
    feats = [DISCO, AXOLOTL + ".devicelist+notify"]
    pres, ver, ident = caps_presence(feats)
    desk.send(pres)
    answer_disco(desk, feats, ident, ver)
    msg = event_message(desk, DEVICELIST)
    assert [d.get("id") for d in msg.iter("{%s}device" % AXOLOTL)] == ["5"]
    # caps known and without urn:test:other+notify: filtered out
    ok(publish(alice, "urn:test:other", "<o xmlns='urn:test'/>", "o2"))
    assert_no_event(desk, "filtered node")


def test_items_survive_restart(srv, raw):
    alice = raw(srv, ALICE, "a")
    ok(publish(alice, BUNDLE, bundle("KEEP"), "current", access_model="open", max_items="max"))
    ok(publish(alice, "urn:test:many", "<e xmlns='urn:test'>1</e>", "a", max_items="2"))
    ok(publish(alice, "urn:test:many", "<e xmlns='urn:test'>2</e>", "b"))
    alice.close()
    assert srv.terminate() == 0
    srv.returncode = None
    srv.start()
    bob = raw(srv, BOB, "b")
    el = ok(fetch(bob, ALICE, BUNDLE))
    assert el.findtext(".//{%s}signedPreKeyPublic" % AXOLOTL) == "KEEP"
    alice = raw(srv, ALICE, "a")
    assert config_of(alice, BUNDLE)["pubsub#access_model"] == "open"
    # order and the sequence survive: a new item is still the newest
    ok(publish(alice, "urn:test:many", "<e xmlns='urn:test'>3</e>", "c"))
    assert fetched_ids(fetch(alice, None, "urn:test:many")) == ["b", "c"]
    # the options still hold the node to its config
    err = publish(alice, BUNDLE, bundle("X"), "current", access_model="presence")
    assert error_of(err)[1:] == ("conflict", "precondition-not-met")


def test_hostile_requests(xmppd_factory, raw):
    srv = xmppd_factory(modules=("c2s", "pep"), extra='pep = { max_nodes = 2; max_items_limit = 4; };\n')
    alice = raw(srv, ALICE, "a")
    bob = raw(srv, BOB, "b")
    # publishing to someone else's PEP service
    assert error_of(publish(bob, DEVICELIST, devicelist(666), "current", to=ALICE,
                            access_model="open"))[1] == "forbidden"
    assert error_of(fetch(alice, None, DEVICELIST))[1] == "item-not-found"
    # deleting someone else's node
    ok(publish(alice, "n1", "<e xmlns='urn:test'/>", "i", access_model="open"))
    assert error_of(iq(bob, "<pubsub xmlns='%s'><delete node='n1'/></pubsub>" % OWNER, "set",
                       ALICE))[1] == "forbidden"
    assert fetched_ids(fetch(bob, ALICE, "n1")) == ["i"]
    # a user to whom nothing is published / who does not exist
    assert error_of(fetch(alice, "nobody@localhost", "n1"))[1] == "service-unavailable"
    # node count bounded by max_nodes
    ok(publish(alice, "n2", "<e xmlns='urn:test'/>"))
    assert error_of(publish(alice, "n3", "<e xmlns='urn:test'/>"))[1] == "policy-violation"
    # max_items above the limit, "max" means the limit
    assert error_of(publish(alice, "n1", "<e xmlns='urn:test'/>", max_items="5"))[1] == "conflict"
    ok(owner_op(alice, "<configure node='n1'>%s</configure>"
                % form(PUBSUB + "#node_config", max_items="max")))
    for i in range(6):
        ok(publish(alice, "n1", "<e xmlns='urn:test'/>", "m%d" % i))
    assert fetched_ids(fetch(bob, ALICE, "n1")) == ["m2", "m3", "m4", "m5"]
    # long node names and item ids, missing payload, two payloads
    assert error_of(publish(alice, "n" * 300, "<e xmlns='urn:test'/>"))[1] == "not-acceptable"
    assert error_of(publish(alice, "n1", "<e xmlns='urn:test'/>", "i" * 300))[1] == \
        "not-acceptable"
    assert error_of(publish(alice, "n1", ""))[1:] == ("bad-request", "payload-required")
    assert error_of(publish(alice, "n1", "<a xmlns='urn:t'/><b xmlns='urn:t'/>"))[1:] == \
        ("bad-request", "invalid-payload")
    assert error_of(iq(alice, "<pubsub xmlns='%s'><publish node='n1'/></pubsub>" % PUBSUB,
                       "set"))[1:] == ("bad-request", "item-required")
    assert error_of(iq(alice, "<pubsub xmlns='%s'><publish/></pubsub>" % PUBSUB,
                       "set"))[1:] == ("bad-request", "nodeid-required")
    # a large but legal payload round-trips intact
    big = "A" * 100000
    ok(publish(alice, "n2", "<blob xmlns='urn:test'>%s</blob>" % big, "big"))
    el = ok(fetch(alice, None, "n2"))
    assert el.findtext(".//{urn:test}blob") == big
    # unsupported requests are answered, not dropped
    assert error_of(iq(bob, "<pubsub xmlns='%s'><subscribe node='n1' jid='%s'/></pubsub>"
                       % (PUBSUB, bob.full), "set", ALICE))[1] == "feature-not-implemented"
    # a reply to a disco#info query the server never sent is not taken as caps
    bob.send("<iq type='result' id='pep-caps-1' to='localhost'><query xmlns='%s'>"
             "<feature var='n1+notify'/></query></iq>" % DISCO)
    ok(publish(alice, "n1", "<e xmlns='urn:test'/>", "after"))
    assert_no_event(bob, "unsolicited caps answer")
    # the server still works for everyone
    assert fetched_ids(fetch(bob, ALICE, "n1"))[-1] == "after"


def test_account_disco_has_the_pep_identity(xmppd_factory):
    """XEP-0163 6.1: clients (Conversations among them) look for pubsub/pep
    on the account before they use PEP for OMEMO."""
    import re as _re
    from xmpp_helpers import RawStream as _Raw
    srv = xmppd_factory(modules=("c2s", "pep"))
    r = _Raw(srv)
    try:
        r.login("alice@localhost", USERS["alice@localhost"], "d")
        r.send("<iq type='get' id='di' to='alice@localhost'>"
               "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        out = r.expect(_re.compile(rb"<iq\b[^>]*id=[\"']di[\"'].*?</iq>", _re.S))
        assert _re.search(rb"<identity[^>]*category=[\"']pubsub[\"'][^>]*type=[\"']pep[\"']"
                          rb"|<identity[^>]*type=[\"']pep[\"'][^>]*category=[\"']pubsub[\"']", out), out
        assert b"account" in out and b"registered" in out
    finally:
        r.close()


# ------------------------------------------------ access models and the roster

ROSTER = "jabber:iq:roster"


@pytest.fixture
def rsrv(xmppd_factory):
    """With mod_roster: presence and roster nodes follow the owner's roster."""
    return xmppd_factory(modules=("c2s", "roster", "pep"), extra_users=[MALLORY])


def roster_set(r, item_attrs):
    ok(iq(r, "<query xmlns='%s'><item %s/></query>" % (ROSTER, item_attrs), "set"))


def sync_ping(r):
    ident = "s%d" % next(_ids)
    r.send("<iq type='get' id='%s' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>" % ident)
    r.expect(re.compile(rb"<iq\b[^>]*?\bid=[\"']%s[\"']" % ident.encode()))


def subscribe(contact, owner_stream, owner):
    """contact asks owner for her presence and she approves: owner's roster
    gets contact with subscription 'from' (XEP-0060 4.5: presence access)."""
    contact.send("<presence type='subscribe' to='%s'/>" % owner)
    read_stanza(owner_stream, "presence", what="the subscription request")
    owner_stream.send("<presence type='subscribed' to='%s'/>" % contact.full.split("/")[0])
    sync_ping(owner_stream)   # processed (and committed) before we go on


MODELS = {"presence": ("auth", "not-authorized", "presence-subscription-required"),
          "roster": ("auth", "not-authorized", "not-in-roster-group"),
          "whitelist": ("cancel", "not-allowed", "closed-node")}


def test_access_models_follow_the_roster(rsrv, raw):
    alice = raw(rsrv, ALICE, "a")
    for model in MODELS:
        ok(publish(alice, "urn:test:" + model, "<s xmlns='urn:test'>%s</s>" % model, "i",
                   access_model=model))
    ok(publish(alice, BUNDLE, bundle("OPEN"), "current", access_model="open"))
    bob = raw(rsrv, BOB, "b")
    mallory = raw(rsrv, MALLORY[0], "m")

    def refused(r):
        return {m for m in MODELS if fetch(r, ALICE, "urn:test:" + m).get("type") == "error"}

    for r in (bob, mallory):
        for model, err in MODELS.items():
            assert error_of(fetch(r, ALICE, "urn:test:" + model)) == err, model
        assert fetched_ids(fetch(r, ALICE, BUNDLE)) == ["current"]

    # a roster item without any subscription: the roster model, not presence
    roster_set(alice, "jid='%s' name='Bob'" % BOB)
    assert refused(bob) == {"presence", "whitelist"}
    # bob's subscription approved ('from' in alice's roster): presence too
    subscribe(bob, alice, ALICE)
    assert refused(bob) == {"whitelist"}
    el = ok(fetch(bob, ALICE, "urn:test:presence"))
    assert el.findtext(".//{urn:test}s") == "presence"
    # mallory puts alice in *her* roster and asks to subscribe (alice does not
    # answer): that is mallory's roster, not alice's; nothing opens
    roster_set(mallory, "jid='%s'" % ALICE)
    mallory.send("<presence type='subscribe' to='%s'/>" % ALICE)
    read_stanza(alice, "presence", what="mallory's subscription request")
    assert refused(mallory) == set(MODELS)
    assert error_of(fetch(mallory, ALICE, "urn:test:presence", inner="<item id='i'/>"))[1] == \
        "not-authorized"
    # alice cancels bob's subscription: presence access goes, roster stays
    alice.send("<presence type='unsubscribed' to='%s'/>" % BOB)
    sync_ping(alice)
    assert refused(bob) == {"presence", "whitelist"}
    # and removed from the roster: nothing but open nodes
    roster_set(alice, "jid='%s' subscription='remove'" % BOB)
    assert refused(bob) == set(MODELS)
    assert fetched_ids(fetch(bob, ALICE, BUNDLE)) == ["current"]


def test_notifications_follow_the_roster(rsrv, raw):
    alice = raw(rsrv, ALICE, "phone")
    ok(publish(alice, "urn:test:presence", "<p xmlns='urn:test'>1</p>", "p1"))  # default model
    ok(publish(alice, "urn:test:roster", "<r xmlns='urn:test'>1</r>", "r1", access_model="roster"))
    ok(publish(alice, DEVICELIST, devicelist(7), "current", access_model="open"))
    feats = [DISCO, DEVICELIST + "+notify", "urn:test:presence+notify", "urn:test:roster+notify"]
    bob = raw(rsrv, BOB, "laptop", presence=False)
    pres, ver, ident = caps_presence(feats, to=ALICE)
    bob.send(pres)
    answer_disco(bob, feats, ident, ver)
    # a stranger: the open node's last item only
    event_message(bob, DEVICELIST)
    assert_no_event(bob, "stranger's last items")
    ok(publish(alice, "urn:test:presence", "<p xmlns='urn:test'>2</p>", "p2"))
    ok(publish(alice, "urn:test:roster", "<r xmlns='urn:test'>2</r>", "r2"))
    assert_no_event(bob, "private publish to a stranger")

    # in alice's roster now: the roster node's last item comes at once
    # (XD_HOOK_ROSTER_CHANGED), the presence node's does not
    roster_set(alice, "jid='%s'" % BOB)
    msg = event_message(bob, "urn:test:roster")
    assert msg.find(".//{%s}item" % EVENT).get("id") == "r2"
    assert_no_event(bob, "roster item only")
    # subscription approved: the presence node's last item
    subscribe(bob, alice, ALICE)
    msg = event_message(bob, "urn:test:presence")
    assert msg.find(".//{%s}item" % EVENT).get("id") == "p2"
    assert msg.get("to") == bob.full and msg.get("from") == ALICE
    assert_no_event(bob, "no repeat of last items")
    # and the next publications
    ok(publish(alice, "urn:test:presence", "<p xmlns='urn:test'>3</p>", "p3"))
    assert event_message(bob, "urn:test:presence").find(".//{%s}item" % EVENT).get("id") == "p3"
    # the subscription cancelled: no more presence-node events
    alice.send("<presence type='unsubscribed' to='%s'/>" % BOB)
    sync_ping(alice)
    ok(publish(alice, "urn:test:presence", "<p xmlns='urn:test'>4</p>", "p4"))
    assert_no_event(bob, "after the subscription was cancelled")
    ok(publish(alice, "urn:test:roster", "<r xmlns='urn:test'>3</r>", "r3"))
    assert event_message(bob, "urn:test:roster").find(".//{%s}item" % EVENT).get("id") == "r3"
    # a new resource of bob's comes online (same caps, already verified): the
    # last items of what he may see now, the presence node not among them
    tablet = raw(rsrv, BOB, "tablet", presence=False)
    tablet.send(caps_presence(feats, to=ALICE)[0])
    nodes = []
    while "urn:test:roster" not in nodes:
        msg = read_stanza(tablet, "message", what="last items")
        nodes += [i.get("node") for i in msg.findall("{%s}event/{%s}items" % (EVENT, EVENT))]
    assert sorted(nodes) == sorted([DEVICELIST, "urn:test:roster"]), nodes
    assert_no_event(tablet, "the tablet's last items")


def test_roster_groups_allowed(rsrv, raw):
    """The roster provider knows no groups: an empty group list (any roster
    item) is accepted, a list of groups is refused, never widened."""
    alice = raw(rsrv, ALICE, "a")
    node = "urn:test:groups"
    groups = "<field var='pubsub#roster_groups_allowed'>%s</field>"
    opts = "<publish-options>%s</publish-options>"
    x = form(PUBSUB + "#publish-options", access_model="roster")
    empty = x.replace("</x>", groups % "" + "</x>")
    family = x.replace("</x>", groups % "<value>family</value>" + "</x>")
    item = "<publish node='%s'><item id='g'><g xmlns='urn:test'/></item></publish>" % node
    err = iq(alice, "<pubsub xmlns='%s'>%s%s</pubsub>" % (PUBSUB, item, opts % family), "set")
    assert error_of(err)[1:] == ("conflict", "precondition-not-met")
    assert error_of(fetch(alice, None, node))[1] == "item-not-found"
    ok(iq(alice, "<pubsub xmlns='%s'>%s%s</pubsub>" % (PUBSUB, item, opts % empty), "set"))
    conf = config_of(alice, node)
    assert conf["pubsub#access_model"] == "roster"
    assert "pubsub#roster_groups_allowed" in conf and conf["pubsub#roster_groups_allowed"] is None
    cfg = form(PUBSUB + "#node_config").replace("</x>", groups % "<value>work</value>" + "</x>")
    assert error_of(owner_op(alice, "<configure node='%s'>%s</configure>"
                             % (node, cfg)))[1] == "not-acceptable"
    bob = raw(rsrv, BOB, "b")
    assert error_of(fetch(bob, ALICE, node))[2] == "not-in-roster-group"
    roster_set(alice, "jid='%s'" % BOB)
    assert fetched_ids(fetch(bob, ALICE, node)) == ["g"]


# ------------------------------------------- sessions that end while being served

NS_SM = "urn:xmpp:sm:3"


def sm_enable(r):
    r.send("<enable xmlns='%s'/>" % NS_SM)
    r.expect(re.compile(rb"<enabled\b[^>]*?(?:/>|>\s*</enabled>)"), what="<enabled/>")


def events_in(data):
    """The nodes of the pubsub events in a transcript, in order."""
    return [n.decode() for n in re.findall(rb"<items\b[^>]*?\bnode=[\"']([^\"']+)[\"']", data)]


def assert_no_sanitizer_report(srv):
    log = srv.log()
    assert "AddressSanitizer" not in log and "runtime error:" not in log, log[-6000:]


def test_last_items_to_a_session_that_ends_midway(xmppd_factory, raw):
    """Sending a last item can end the very session it goes to (here XEP-0198
    max_queue; the core's output limit likewise), which ends its interest
    in the middle of the loop: the rest is not sent, and nothing of the
    interest record is used after the session is gone (it was, under ASan:
    heap-use-after-free in send_last_items)."""
    srv = xmppd_factory(modules=("c2s", "smacks", "pep"), extra="smacks = { max_queue = 4; };\n")
    alice = raw(srv, ALICE, "phone")
    nodes = ["urn:test:n%d" % i for i in range(8)]
    for n in nodes:
        ok(publish(alice, n, "<e xmlns='urn:test'>%s</e>" % ("x" * 100), "i", access_model="open"))
    desk = raw(srv, ALICE, "desk", presence=False)
    sm_enable(desk)
    feats = [DISCO] + [n + "+notify" for n in nodes]
    pres, ver, ident = caps_presence(feats)
    desk.send(pres)
    answer_disco(desk, feats, ident, ver)
    # its own presence, the disco query, then last items until the 5th
    # unacknowledged stanza closes the stream
    _, data = desk.expect_stream_error("resource-constraint")
    got = events_in(data)
    assert 0 < len(got) < len(nodes) and set(got) <= set(nodes), data
    # the caps are known now: the last items go out from the presence itself
    tablet = raw(srv, ALICE, "tablet", presence=False)
    sm_enable(tablet)
    tablet.send(pres)
    _, data = tablet.expect_stream_error("resource-constraint")
    got = events_in(data)
    assert 0 < len(got) < len(nodes) and set(got) <= set(nodes), data
    # the server goes on: the owner's other resource is served as before
    ok(publish(alice, nodes[0], "<e xmlns='urn:test'>after</e>", "j"))
    assert event_message(alice, nodes[0]).find(".//{%s}item" % EVENT).get("id") == "j"
    assert_no_sanitizer_report(srv)


def test_event_reaches_everyone_when_a_recipient_ends(xmppd_factory, raw):
    """An event whose delivery ends the first recipient's session (and so
    its interest) still reaches the recipients after it."""
    srv = xmppd_factory(modules=("c2s", "smacks", "pep"), extra="smacks = { max_queue = 2; };\n",
                        extra_users=[MALLORY])
    alice = raw(srv, ALICE, "phone")
    feats = [DISCO, DEVICELIST + "+notify"]
    pres, ver, ident = caps_presence(feats, to=ALICE)
    bob = raw(srv, BOB, "b", presence=False)
    sm_enable(bob)
    bob.send(pres)
    answer_disco(bob, feats, ident, ver)        # unacknowledged: 1
    mallory = raw(srv, MALLORY[0], "m", presence=False)
    mallory.send(pres)                          # same verified caps: no query
    sync_ping(mallory)
    sync_ping(bob)                              # unacknowledged: 2
    # the event would be bob's 3rd unacknowledged stanza: his stream is
    # closed instead while it is being sent, before mallory's turn
    ok(publish(alice, DEVICELIST, devicelist(3), "current", access_model="open"))
    _, data = bob.expect_stream_error("resource-constraint")
    assert events_in(data) == [], data
    msg = event_message(mallory, DEVICELIST)
    assert [d.get("id") for d in msg.iter("{%s}device" % AXOLOTL)] == ["3"]
    assert_no_sanitizer_report(srv)


def test_roster_change_last_items_to_a_session_that_ends_midway(xmppd_factory, raw):
    """The same on XD_HOOK_ROSTER_CHANGED: a contact let into the roster gets
    the last items of the roster nodes until its session ends mid-way."""
    srv = xmppd_factory(modules=("c2s", "roster", "smacks", "pep"),
                        extra="smacks = { max_queue = 4; };\n")
    alice = raw(srv, ALICE, "phone")
    nodes = ["urn:test:r%d" % i for i in range(8)]
    for n in nodes:
        ok(publish(alice, n, "<e xmlns='urn:test'>%s</e>" % ("x" * 100), "i", access_model="roster"))
    bob = raw(srv, BOB, "laptop", presence=False)
    sm_enable(bob)
    feats = [DISCO] + [n + "+notify" for n in nodes]
    pres, ver, ident = caps_presence(feats, to=ALICE)
    bob.send(pres)
    answer_disco(bob, feats, ident, ver)      # unacknowledged: 1; nothing he may see yet
    roster_set(alice, "jid='%s'" % BOB)
    _, data = bob.expect_stream_error("resource-constraint")
    got = events_in(data)
    assert 0 < len(got) < len(nodes) and set(got) <= set(nodes), data
    ok(publish(alice, nodes[0], "<e xmlns='urn:test'>after</e>", "j"))
    assert event_message(alice, nodes[0]).find(".//{%s}item" % EVENT).get("id") == "j"
    assert_no_sanitizer_report(srv)
