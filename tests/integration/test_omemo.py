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
"""

import secrets
import time

# python3-omemo, python3-twomemo, python3-xmlschema (Debian): a missing one is
# an error here, not a skip
import omemo
import pytest
from slixmpp.exceptions import IqError, IqTimeout

from omemo_client import FLAVOURS, NS_PUBSUB, OmemoDevice, fingerprint, q

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


def device(clients, devices, srv, flavour, full, priority, label, carbons=True):
    c = clients(srv, full)
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
