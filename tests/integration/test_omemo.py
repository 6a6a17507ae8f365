"""A real OMEMO conversation through xmppd, with python-omemo 1.0 doing the
cryptography (see omemo_client.py), once in each OMEMO version: XEP-0384 0.8
(urn:xmpp:omemo:2, twomemo) and 0.3 (eu.siacs.conversations.axolotl, oldmemo).

alice has two devices (laptop, phone), bob one (desk); they are strangers (no
roster subscription).  What the server must get right for it to work:
  - PEP (XEP-0163, XEP-0060 7.1.5): device lists and bundles published with
    publish-options access_model=open (0.8 bundles: max_items=max, one item
    per device in one node; 0.3: one node per device), fetched by a stranger;
  - offline storage (XEP-0160) of an encrypted message with <delay/>;
  - MAM (XEP-0313) keeps the same ciphertext, under the stanza-id the
    delivered copy carries (XEP-0359);
  - carbons (XEP-0280): alice's phone sees what her laptop sent (<sent/>) and
    what bob sent to the laptop (<received/>), and decrypts both;
  - at rest: no plaintext in any file of the data dir nor in the debug log.

test_omemo_stream_resumption: bob's client uses XEP-0198 (slixmpp xep_0198);
his connection is cut mid-conversation (TCP closed under TLS: no
</stream:stream>, no close_notify) while alice sends; he resumes and
decrypts exactly what was sent meanwhile, once each, in order.  Cut again
and not resumed within resume_timeout, the session ends and its unacked
messages wait in offline storage for his next login (and are archived once).

test_omemo_access_models: a stranger fetches the open device list and bundle
and starts a real session, but not a presence-access node (XEP-0060 4.5),
which a subscribed contact can read.
"""

import asyncio
import secrets
import socket
import time

# python3-omemo, python3-twomemo, python3-xmlschema (Debian): a missing one is
# an error here, not a skip
import omemo
import pytest
from slixmpp.exceptions import IqError, IqTimeout

from omemo_client import FLAVOURS, NS_PUBSUB, OmemoDevice, fingerprint, q
from xmpp_helpers import MALLORY

ALICE, BOB = "alice@localhost", "bob@localhost"
MODULES = ("c2s", "roster", "pep", "carbons", "mam", "offline")
NS_OWNER = NS_PUBSUB + "#owner"
NS_XDATA = "jabber:x:data"
WAIT = 20.0


@pytest.fixture
def srv(xmppd_factory):
    return xmppd_factory(modules=MODULES)


@pytest.fixture(params=sorted(FLAVOURS))
def flavour(request):
    return FLAVOURS[request.param]


@pytest.fixture
def devices():
    made = []
    yield made
    for d in made:
        d.close()


def token(what):
    # distinctive, random: found nowhere unless it leaked
    return "omemo-%s-%s" % (what, secrets.token_hex(12))


def device(clients, devices, srv, flavour, full, priority, label, carbons=True, password=None):
    c = clients(srv, full, password)
    d = OmemoDevice(c, flavour=flavour, label=label)
    devices.append(d)
    c.must_login()
    c.send_presence(priority=priority)
    if carbons:
        d.enable_carbons()
    return d


def stranger_items(client, owner, node):
    """owner's node items as fetched by client: {item id: element}."""
    res = client.iq(owner, "<pubsub xmlns='%s'><items node='%s'/></pubsub>" % (NS_PUBSUB, node))
    items = res.xml.findall("%s/%s/%s" % (q(NS_PUBSUB, "pubsub"), q(NS_PUBSUB, "items"),
                                          q(NS_PUBSUB, "item")))
    return {i.get("id"): i for i in items}


def node_config(client, node):
    res = client.iq(None, "<pubsub xmlns='%s'><configure node='%s'/></pubsub>" % (NS_OWNER, node))
    x = res.xml.find("%s/%s/%s" % (q(NS_OWNER, "pubsub"), q(NS_OWNER, "configure"),
                                   q(NS_XDATA, "x")))
    return {f.get("var"): f.findtext(q(NS_XDATA, "value")) for f in x.findall(q(NS_XDATA, "field"))}


def key_rids(encrypted, ns):
    """{recipient device id: key exchange?} of an <encrypted/> header (0.8
    says kex='true', 0.3 prekey='true')."""
    return {int(k.get("rid")): (k.get("kex") or k.get("prekey")) in ("true", "1")
            for k in encrypted.iter(q(ns, "key"))}


def wait_offline(client, full_jid, timeout=5.0):
    """Until the server no longer has a session for full_jid (an IQ to it
    bounces)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.iq(full_jid, "<ping xmlns='urn:xmpp:ping'/>", timeout=2)
        except IqError:
            return
        except IqTimeout:
            pass
        time.sleep(0.1)
    raise AssertionError("%s still has a session %.0f s after logging out" % (full_jid, timeout))


def test_omemo_conversation(srv, clients, devices, flavour):
    ns = flavour.ns
    # ---- 1. devices publish their device lists and bundles (PEP, open)
    laptop = device(clients, devices, srv, flavour, ALICE + "/laptop", 5, "laptop")
    L = laptop.start()
    phone = device(clients, devices, srv, flavour, ALICE + "/phone", 1, "phone")
    P = phone.start()
    bob = device(clients, devices, srv, flavour, BOB + "/desk", 0, "desk", carbons=False)
    B = bob.start()
    assert len({L, P, B}) == 3

    # as a stranger sees them
    lists = stranger_items(bob.client, ALICE, flavour.devices_node)
    assert set(lists) == {"current"}, lists
    assert {int(d.get("id")) for d in lists["current"].iter(q(ns, "device"))} == {L, P}
    pre_key = {"twomemo": "pk", "oldmemo": "preKeyPublic"}[flavour.name]
    for owner, ids, client in ((ALICE, (L, P), bob.client), (BOB, (B,), laptop.client)):
        for dev_id in ids:
            node, item, options = flavour.bundle_node(dev_id)
            bundles = stranger_items(client, owner, node)
            assert item in bundles, (node, item, sorted(bundles))
            assert len(list(bundles[item].iter(q(ns, pre_key)))) == 100
    if flavour.name == "twomemo":
        # max_items=max: the phone's bundle did not push the laptop's out
        node, _, _ = flavour.bundle_node(L)
        assert set(stranger_items(bob.client, ALICE, node)) == {str(L), str(P)}
    for d, dev_id in ((laptop, L), (bob, B)):
        node, _, options = flavour.bundle_node(dev_id)
        conf = node_config(d.client, node)
        for k, v in options.items():
            assert conf["pubsub#" + k] == v, (node, conf)
        assert node_config(d.client, flavour.devices_node)["pubsub#access_model"] == "open"

    # ---- 2. bob goes offline; alice's laptop starts a session as a stranger
    bob.client.disconnect()
    bob.client.wait_disconnected(WAIT)
    wait_offline(laptop.client, BOB + "/desk")

    assert laptop.refresh(BOB) == {B}
    assert laptop.refresh(ALICE) == {L, P}
    hello = token("alice-to-bob")
    mid, sent_enc, errors = laptop.send(BOB, hello)
    assert not errors, errors
    # encrypted for bob's device and alice's other one, new sessions both
    assert key_rids(sent_enc, ns) == {B: True, P: True}, key_rids(sent_enc, ns)
    assert hello.encode() not in sent_enc.findtext(q(ns, "payload")).encode()
    fetched = [(owner, node, item) for op, owner, node, item, outcome in laptop.pep_log
               if op == "items" and outcome.endswith("item(s)") and not outcome.startswith("0")]
    assert (BOB, flavour.devices_node, None) in fetched, laptop.pep_log
    assert (BOB,) + flavour.bundle_node(B)[:2] in fetched, laptop.pep_log
    assert (BOB, B) in laptop.trust_decisions        # BTBV

    # the phone gets a <sent/> carbon and decrypts alice's own message
    r = phone.wait_for(lambda r: r.kind == "carbon-sent" and r.inner.get("id") == mid,
                       "the <sent/> carbon of " + mid, WAIT)
    assert r.error is None and r.body == hello, r
    assert (r.device.bare_jid, r.device.device_id) == (ALICE, L)
    # ... and completes the new session with an empty OMEMO message the laptop decrypts
    r = laptop.wait_for(lambda r: r.sender == ALICE + "/phone" and r.device is not None,
                        "the phone's session-completing message", WAIT)
    assert r.error is None and r.plaintext is None and r.device.device_id == P, r

    # ---- 3. bob comes back: offline delivery, then MAM
    backup = bob.storage.clone()      # bob's state at rest, before he reads anything
    bob2 = clients(srv, BOB + "/desk")
    bob.attach(bob2)
    bob2.must_login()
    bob.begin_catch_up()
    bob2.send_presence(priority=0)
    r = bob.wait_for(lambda r: r.kind == "direct" and r.inner.get("id") == mid,
                     "alice's message from offline storage", WAIT)
    assert r.error is None, r
    assert r.body == hello, r
    assert r.plaintext.count(hello.encode()) == 1
    assert r.sender == ALICE + "/laptop"
    assert (r.device.bare_jid, r.device.device_id) == (ALICE, L)
    assert r.delay, "offline message without <delay/>: %r" % r
    assert fingerprint(r.encrypted) == fingerprint(sent_enc), "the server changed the ciphertext"
    assert r.stanza_id and r.stanza_id[0] == BOB, "no stanza-id by bob: %r" % r.stanza_id
    offline_copy = r

    archived, _fin = bob.mam_query(with_jid=ALICE)
    hits = [(aid, delay, m) for aid, delay, m in archived
            if m is not None and m.find(q(ns, "encrypted")) is not None
            and fingerprint(m.find(q(ns, "encrypted"))) == fingerprint(sent_enc)]
    assert len(hits) == 1, "alice's message is not (once) in bob's archive: %r" % archived
    aid, delay, archived_msg = hits[0]
    assert aid == offline_copy.stanza_id[1], (aid, offline_copy.stanza_id)
    assert delay is not None and delay.get("stamp")
    # the live state already used this message's keys (forward secrecy) ...
    live = bob.decrypt_archived(ALICE, archived_msg)
    assert live.body is None and live.error is not None, live
    # ... the state bob had before reading it decrypts the archived copy
    twin = bob.restored_copy(backup)
    devices.append(twin)
    arch = twin.decrypt_archived(ALICE, archived_msg)
    assert arch.error is None and arch.body == hello, arch
    assert arch.device.device_id == L
    bob.end_catch_up()     # sends the queued session-completing message

    # ---- 4. bob replies; the laptop and the phone (carbon) decrypt it
    assert bob.refresh(ALICE) == {L, P}
    reply = token("bob-to-alice")
    rmid, reply_enc, errors = bob.send(ALICE, reply)
    assert not errors, errors
    # the laptop's session exists (no key exchange), the phone's is new
    assert key_rids(reply_enc, ns) == {L: False, P: True}, key_rids(reply_enc, ns)
    r = laptop.wait_for(lambda r: r.inner.get("id") == rmid, "bob's reply", WAIT)
    assert r.kind == "direct" and r.error is None and r.body == reply, r
    assert (r.device.bare_jid, r.device.device_id) == (BOB, B)
    # priority 1 < 5: the phone is not a recipient of the bare-JID message,
    # it gets a <received/> carbon
    r = phone.wait_for(lambda r: r.inner.get("id") == rmid, "bob's reply on the phone", WAIT)
    assert r.kind == "carbon-received", r
    assert r.error is None and r.body == reply, r
    # bob's queued empty message completed the laptop's session on the way
    r = laptop.wait_for(lambda r: r.sender == BOB + "/desk" and r.plaintext is None
                        and r.device is not None, "bob's session-completing message", WAIT)
    assert r.error is None

    # and the conversation goes on with the ratchet, no key exchange any more
    again = token("alice-again")
    amid, again_enc, errors = laptop.send(BOB, again)
    assert not errors and not any(key_rids(again_enc, ns).values()), key_rids(again_enc, ns)
    r = bob.wait_for(lambda r: r.inner.get("id") == amid, "alice's second message", WAIT)
    assert r.error is None and r.body == again and r.delay is None, r
    r = phone.wait_for(lambda r: r.inner.get("id") == amid, "the second <sent/> carbon", WAIT)
    assert r.kind == "carbon-sent" and r.error is None and r.body == again, r

    # nothing went wrong anywhere: every OMEMO message each device got was
    # decrypted, except the ones that were not encrypted for it
    for d in (laptop, phone, bob):
        d.settle()
        assert not d.problems, (d.client.jid, d.problems)
        bad = [r for r in d.received
               if r.error is not None and not isinstance(r.error, omemo.MessageNotForUs)]
        assert not bad, (d.client.jid, bad)

    # ---- 5. at rest: the plaintexts are nowhere on the server's disk
    rc = srv.terminate()
    assert rc == 0, "xmppd exit status %r" % rc
    files = [p for p in srv.data_dir.rglob("*") if p.is_file()]
    assert files, "no files under %s" % srv.data_dir
    disk = {p: p.read_bytes() for p in files}
    log = srv.log_path.read_bytes()
    assert len(log) > 0
    for secret in (hello, reply, again):
        s = secret.encode()
        leaks = [str(p) for p, data in disk.items() if s in data]
        assert not leaks, "plaintext %r found in %s" % (secret, leaks)
        assert s not in log, "plaintext %r found in the server log" % secret
    # the check looks at the right bytes: the archived ciphertext is on disk
    payload = sent_enc.findtext(q(ns, "payload")).encode()
    pieces = [payload[i:i + 24] for i in range(0, len(payload) - 24, 24)]
    assert any(piece in data for piece in pieces for data in disk.values()), \
        "the archived ciphertext is not in the data dir either: wrong place searched?"


# ------------------------------------------------- stream management (XEP-0198)

RESUME_TIMEOUT = 3       # seconds; short, so the expiry leg stays quick
NS_PUBSUB_ERRORS = NS_PUBSUB + "#errors"
NICK = "http://jabber.org/protocol/nick"


def with_sm(client):
    """Register slixmpp's XEP-0198 plugin (before login), with events to wait on."""
    async def go():
        x = client.xmpp
        client.ev_sm_enabled = asyncio.Event()
        client.ev_resumed = asyncio.Event()
        client.resumed_counts = []

        def resumed(_e):
            sm = x["xep_0198"]
            # the server's h (in <resumed/>) against what bob sent since <enable/>
            client.resumed_counts.append((sm.last_ack, sm.seq))
            client.ev_resumed.set()
        x.register_plugin("xep_0198")
        x.add_event_handler("sm_enabled", lambda _e: client.ev_sm_enabled.set())
        x.add_event_handler("session_resumed", resumed)
    client.lt.run(go(), 5)


def cut(client):
    """Lose the connection mid-stream: TCP shut down under TLS, no
    </stream:stream>, no close_notify."""
    def go():
        x = client.xmpp
        client.ev_disconnected.clear()
        x.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        x.transport.abort()
    client.lt.call(go)
    client.wait_disconnected(WAIT)


def resume(client, timeout=WAIT):
    """Reconnect the same slixmpp client: SASL, then <resume/> (no bind)."""
    async def go():
        client.ev_resumed.clear()
        await client._connect()
        await client.ev_resumed.wait()
    try:
        client.lt.run(go(), timeout)
    except TimeoutError:
        raise AssertionError("no <resumed/>: " + client.describe()) from None


def ack_all(client):
    """<a h/> for everything handled, as a client does when the server asks;
    the ping after it makes sure the server has read it."""
    client.lt.call(lambda: client.xmpp["xep_0198"].send_ack())
    client.ping_server()


def omemo_ids(dev):
    """Stanza ids of the OMEMO messages dev received, in arrival order."""
    return [r.inner.get("id") for r in dev.received]


def send_many(laptop, n, what):
    out = []
    for i in range(n):
        text = token("%s-%d" % (what, i))
        mid, enc, errors = laptop.send(BOB, text)
        assert not errors, errors
        out.append((mid, text, enc))
    laptop.client.ping_server()   # all routed before the test goes on
    return out


def test_omemo_stream_resumption(xmppd_factory, clients, devices, flavour):
    srv = xmppd_factory(modules=MODULES + ("smacks",),
                        extra="smacks = { resume_timeout = %d; };\n" % RESUME_TIMEOUT)
    laptop = device(clients, devices, srv, flavour, ALICE + "/laptop", 5, "laptop")
    laptop.start()
    bc = clients(srv, BOB + "/desk")
    with_sm(bc)
    bob = OmemoDevice(bc, flavour=flavour, label="desk")
    devices.append(bob)
    bc.must_login()
    bc.lt.run(bc.ev_sm_enabled.wait(), WAIT)
    bc.send_presence(priority=0)
    B = bob.start()

    # ---- 1. the conversation is under way
    assert laptop.refresh(BOB) == {B}
    hello = token("hello")
    mid, _, errors = laptop.send(BOB, hello)
    assert not errors, errors
    r = bob.wait_for(lambda r: r.inner.get("id") == mid, "alice's first message", WAIT)
    assert r.error is None and r.body == hello, r
    r = laptop.wait_for(lambda r: r.sender == BOB + "/desk" and r.device is not None,
                        "bob's session-completing message", WAIT)
    assert r.error is None and r.device.device_id == B, r
    bob.settle()

    # ---- 2. cut; alice goes on writing; bob resumes and gets exactly those
    cut(bc)
    away = send_many(laptop, 5, "while-away")
    resume(bc)
    h, sent = bc.resumed_counts[-1]
    assert h == sent, "the server counted %d of the %d stanzas bob sent" % (h, sent)
    for mid, text, enc in away:
        r = bob.wait_for(lambda r, mid=mid: r.inner.get("id") == mid, "message " + mid, WAIT)
        assert r.kind == "direct" and r.error is None and r.body == text, r
        assert r.delay is None, "came from offline storage, not the resumed session: %r" % r
        assert fingerprint(r.encrypted) == fingerprint(enc)
    bob.settle()
    ids = omemo_ids(bob)
    assert len(ids) == len(set(ids)), "duplicates after resumption: %r" % ids
    assert ids[-len(away):] == [m for m, _, _ in away], ids   # in order, nothing after
    # the resumed stream carries bob's replies too (same full JID, no new bind)
    assert bc.full_jid == BOB + "/desk"
    reply = token("bob-after-resume")
    rmid, _, errors = bob.send(ALICE, reply)
    assert not errors, errors
    r = laptop.wait_for(lambda r: r.inner.get("id") == rmid, "bob's reply", WAIT)
    assert r.error is None and r.body == reply, r

    # ---- 3. cut again, not resumed in time: offline storage keeps the unacked
    bob.settle()
    ack_all(bc)                  # what he read is acknowledged; the rest is not
    before = list(ids)
    cut(bc)
    late = send_many(laptop, 3, "never-resumed")
    time.sleep(RESUME_TIMEOUT + 0.3)
    wait_offline(laptop.client, BOB + "/desk", timeout=RESUME_TIMEOUT + 5)
    bc2 = clients(srv, BOB + "/desk")
    bob.attach(bc2)
    bc2.must_login()
    bc2.send_presence(priority=0)
    for mid, text, enc in late:
        r = bob.wait_for(lambda r, mid=mid: r.inner.get("id") == mid, "offline " + mid, WAIT)
        assert r.kind == "direct" and r.error is None and r.body == text, r
        assert r.delay, "not from offline storage: %r" % r
        assert fingerprint(r.encrypted) == fingerprint(enc)
    bob.settle()
    ids = omemo_ids(bob)
    assert ids[:len(before)] == before
    assert ids[len(before):] == [m for m, _, _ in late], \
        "after the expired session: %r (expected only the %d unacked)" % (ids[len(before):],
                                                                          len(late))
    # each is in bob's archive once, under the id its delivered copy carries
    archived, _fin = bob.mam_query(with_jid=ALICE)
    for mid, _text, enc in away + late:
        hits = [aid for aid, _d, m in archived if m is not None and m.get("id") == mid]
        assert len(hits) == 1, "%s archived %d times: %r" % (mid, len(hits), archived)
        r = next(r for r in bob.received if r.inner.get("id") == mid)
        assert r.stanza_id == (BOB, hits[0]), (r.stanza_id, hits)

    for d in (laptop, bob):
        d.settle()
        assert not d.problems, (d.client.jid, d.problems)
        bad = [r for r in d.received
               if r.error is not None and not isinstance(r.error, omemo.MessageNotForUs)]
        assert not bad, (d.client.jid, bad)


# ------------------------------------------------- PEP access models (XEP-0060 4.5)

def wait_presence(client, pred, what, timeout=WAIT):
    async def get():
        while True:
            p = await client.presences.get()
            if pred(p):
                return p
    try:
        return client.lt.run(get(), timeout)
    except TimeoutError:
        raise AssertionError("%s: no %s within %.0f s" % (client.jid, what, timeout)) from None


def refusal(client, owner, node):
    """(stanza condition, pubsub#errors condition) of a refused fetch."""
    with pytest.raises(IqError) as e:
        stranger_items(client, owner, node)
    err = e.value.iq.xml.find("{jabber:client}error")
    app = [c.tag.split("}")[1] for c in err if c.tag.startswith("{%s}" % NS_PUBSUB_ERRORS)]
    return e.value.iq["error"]["condition"], app


def test_omemo_access_models(xmppd_factory, clients, devices, flavour):
    srv = xmppd_factory(modules=MODULES, extra_users=[MALLORY])
    laptop = device(clients, devices, srv, flavour, ALICE + "/laptop", 5, "laptop")
    L = laptop.start()
    # a node with the default access model (presence, XEP-0163 3) beside OMEMO's
    laptop.client.iq(None, "<pubsub xmlns='%s'><publish node='%s'><item id='current'>"
                     "<nick xmlns='%s'>Alice</nick></item></publish></pubsub>"
                     % (NS_PUBSUB, NICK, NICK), itype="set")
    assert node_config(laptop.client, NICK)["pubsub#access_model"] == "presence"

    # mallory, a stranger: device list and bundle are hers to fetch, and the
    # library makes a session of them; alice decrypts her message
    mal = device(clients, devices, srv, flavour, MALLORY[0] + "/m", 0, "m", carbons=False,
                 password=MALLORY[1])
    M = mal.start()
    assert mal.refresh(ALICE) == {L}
    node, item, _ = flavour.bundle_node(L)
    assert item in stranger_items(mal.client, ALICE, node)
    hi = token("mallory-hi")
    mmid, _, errors = mal.send(ALICE, hi)
    assert not errors, errors
    r = laptop.wait_for(lambda r: r.inner.get("id") == mmid, "mallory's message", WAIT)
    assert r.error is None and r.body == hi and r.device.device_id == M, r
    # ... but not the presence-access node
    assert refusal(mal.client, ALICE, NICK) == ("not-authorized",
                                                ["presence-subscription-required"])

    # bob subscribes to alice's presence; her client approves (slixmpp's
    # auto-authorize), so alice's roster has him with subscription 'from'
    bob = clients(srv, BOB + "/desk").must_login()
    bob.send_presence()
    assert refusal(bob, ALICE, NICK)[0] == "not-authorized"
    bob.lt.call(lambda: bob.xmpp.send_presence(pto=ALICE, ptype="subscribe"))
    wait_presence(bob, lambda p: p["type"] == "subscribed" and str(p["from"]) == ALICE,
                  "alice's approval")
    items = stranger_items(bob, ALICE, NICK)
    assert set(items) == {"current"} and items["current"].findtext("{%s}nick" % NICK) == "Alice"
    # the stranger is still a stranger
    assert refusal(mal.client, ALICE, NICK)[0] == "not-authorized"
