"""
Glue between python-omemo 1.0 (the real OMEMO library) and the slixmpp
clients of xmpp_helpers, for the integration test of an end-to-end encrypted
conversation through xmppd.  Two OMEMO versions (one per device):
  twomemo  XEP-0384 0.8, urn:xmpp:omemo:2
  oldmemo  XEP-0384 0.3, eu.siacs.conversations.axolotl (what Conversations
           and most deployed clients speak)

What an OMEMO client does with the server, and what this glue does:
  - XEP-0384 0.8 5.3: the device list ("urn:xmpp:omemo:2:devices", item
    "current") and the bundles ("urn:xmpp:omemo:2:bundles", one item per
    device id, max_items=max) go to PEP (XEP-0163) with publish-options
    (XEP-0060 7.1.5) access_model=open, so strangers can start sessions;
    0.3: "...axolotl.devicelist" and one "...axolotl.bundles:<device id>"
    node per device, access_model=open too;
  - messages carry <encrypted/>; in 0.8 its content is a XEP-0420 (Stanza
    Content Encryption) envelope, in 0.3 the body text; the server only ever
    sees the ciphertext;
  - XEP-0280 carbons (the own account's other devices see what was sent and
    received), XEP-0160 offline storage, XEP-0313 MAM for the history.

Everything OMEMO runs on the client's slixmpp loop thread; the test calls
the synchronous wrappers (`OmemoDevice.start()`, `.send()`, `.wait_for()`,
...), each bounded by a timeout.  Incoming messages are decrypted as they
arrive, in arrival order, by one worker task per device (like a client
would), and every outcome -- plaintext or the exception -- is recorded in
`OmemoDevice.received` for the test to assert on.

Trust is "blind trust before verification" (BTBV): every new identity is
trusted on first sight, and that decision is recorded in `trust_decisions`.
"""

import asyncio
import base64
import copy
import datetime
import itertools
import logging
import secrets
from typing import Any, Dict, List, Optional
from xml.etree import ElementTree as ET

import omemo
from omemo.storage import Just, Maybe, Nothing
import oldmemo
import oldmemo.etree
import twomemo
import twomemo.etree

from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

log = logging.getLogger("omemo_client")

NS_CLIENT = "jabber:client"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_PUBSUB_EVENT = NS_PUBSUB + "#event"
NS_XDATA = "jabber:x:data"
NS_CARBONS = "urn:xmpp:carbons:2"
NS_FORWARD = "urn:xmpp:forward:0"
NS_DELAY = "urn:xmpp:delay"
NS_MAM = "urn:xmpp:mam:2"
NS_SID = "urn:xmpp:sid:0"
NS_HINTS = "urn:xmpp:hints"
NS_EME = "urn:xmpp:eme:0"
NS_SCE = "urn:xmpp:sce:1"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"

NS_OMEMO = twomemo.twomemo.NAMESPACE            # urn:xmpp:omemo:2
NS_OLDMEMO = oldmemo.oldmemo.NAMESPACE          # eu.siacs.conversations.axolotl
DEVICES_NODE = NS_OMEMO + ":devices"   # XEP-0384 0.8 5.3.1
BUNDLES_NODE = NS_OMEMO + ":bundles"   # XEP-0384 0.8 5.3.2
FALLBACK_BODY = ("I sent you an OMEMO encrypted message but your client doesn't seem to "
                 "support that.")

TRUST_BLIND = "blind"          # BTBV: trusted until someone verifies otherwise
TRUST_UNDECIDED = "undecided"
TRUST_DISTRUSTED = "distrusted"

IQ_TIMEOUT = 10.0
OP_TIMEOUT = 20.0

_ids = itertools.count(1)


def q(ns, tag):
    return "{%s}%s" % (ns, tag)


def bare(jid):
    return str(jid).split("/", 1)[0]


# ------------------------------------------------------------------ storage

class MemoryStorage(omemo.Storage):
    """python-omemo's key/value storage, in a dict of JSON values.  `clone()`
    copies the whole state: a second client restored from a backup."""

    def __init__(self, data=None):
        super().__init__(disable_cache=True)
        self.data: Dict[str, Any] = data if data is not None else {}

    async def _load(self, key: str) -> Maybe[Any]:
        if key in self.data:
            return Just(copy.deepcopy(self.data[key]))
        return Nothing()

    async def _store(self, key: str, value: Any) -> None:
        self.data[key] = copy.deepcopy(value)

    async def _delete(self, key: str) -> None:
        self.data.pop(key, None)

    def clone(self):
        return MemoryStorage(copy.deepcopy(self.data))


# --------------------------------------------------------- received messages

class Received:
    """One incoming OMEMO message and what became of it.

    kind: "direct" (addressed to us), "carbon-received", "carbon-sent"
    (XEP-0280, from our own bare JID).  `plaintext` is what the library
    decrypted (None for an empty/key-transport message or on error);
    `body` is the message text it carried (twomemo: the <body/> of the
    decrypted SCE envelope)."""

    def __init__(self, kind, outer, inner, encrypted):
        self.kind = kind
        self.outer = outer          # the stanza as it arrived
        self.inner = inner          # the message carrying <encrypted/>
        self.encrypted = encrypted  # the <encrypted/> element
        self.sender = inner.get("from", "")
        self.to = inner.get("to", "")
        self.delay = None           # XEP-0203 stamp on the outer stanza
        d = outer.find(q(NS_DELAY, "delay"))
        if d is not None:
            self.delay = d.get("stamp")
        self.stanza_id = None       # XEP-0359 id the archive gave it
        for sid in inner.findall(q(NS_SID, "stanza-id")):
            if sid.get("by") and sid.get("id"):
                self.stanza_id = (sid.get("by"), sid.get("id"))
        self.plaintext: Optional[bytes] = None
        self.body: Optional[str] = None
        self.device = None          # omemo.DeviceInformation of the sender
        self.error: Optional[BaseException] = None

    def __repr__(self):
        return "<Received %s from=%s body=%r err=%r delay=%s>" % (
            self.kind, self.sender, self.body, self.error, self.delay)


def fingerprint(el):
    """An <encrypted/> element in a canonical form: XML serialization may
    change prefixes, attribute order and the order of the keys, not one byte
    of the names, attributes and (base64) texts."""
    return (el.tag, tuple(sorted(el.attrib.items())), (el.text or "").strip(),
            tuple(sorted(fingerprint(c) for c in el)))


def sce_envelope(body, to, sender):
    """XEP-0420 3.1 envelope with the affix elements XEP-0384 0.8 4.4 asks for
    (rpad, from; to and time as well)."""
    env = ET.Element(q(NS_SCE, "envelope"))
    content = ET.SubElement(env, q(NS_SCE, "content"))
    ET.SubElement(content, q(NS_CLIENT, "body")).text = body
    ET.SubElement(env, q(NS_SCE, "rpad")).text = base64.b64encode(
        secrets.token_bytes(secrets.randbelow(32) + 1)).decode()
    ET.SubElement(env, q(NS_SCE, "time"),
                  stamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    ET.SubElement(env, q(NS_SCE, "to"), jid=to)
    ET.SubElement(env, q(NS_SCE, "from"), jid=sender)
    return ET.tostring(env)


class GlueError(AssertionError):
    pass


# ------------------------------------------------------------ OMEMO versions

class Flavour:
    """What differs between the two OMEMO versions on the wire."""
    name = ns = devices_node = None
    etree = None

    def backend(self, storage):
        raise NotImplementedError

    def bundle_node(self, device_id):
        """(node, item id, publish-options) of a device's bundle."""
        raise NotImplementedError

    def plaintext(self, body, to, sender):
        raise NotImplementedError

    def body_of(self, plaintext, sender):
        """(body, error) of a decrypted plaintext."""
        raise NotImplementedError

    async def parse_message(self, encrypted, sender_bare, device):
        raise NotImplementedError

    def __repr__(self):
        return self.name


class Twomemo(Flavour):
    """XEP-0384 0.8: one bundles node, an item per device (max_items=max);
    the plaintext is a XEP-0420 envelope."""
    name, ns, devices_node = "twomemo", NS_OMEMO, DEVICES_NODE
    list_tag = "devices"
    etree = twomemo.etree

    def backend(self, storage):
        return twomemo.Twomemo(storage)

    def bundle_node(self, device_id):
        return BUNDLES_NODE, str(device_id), {"access_model": "open", "max_items": "max"}

    def plaintext(self, body, to, sender):
        return sce_envelope(body, to, sender)

    def body_of(self, plaintext, sender):
        env = ET.fromstring(plaintext)
        body = env.findtext("%s/%s" % (q(NS_SCE, "content"), q(NS_CLIENT, "body")))
        frm = env.find(q(NS_SCE, "from"))
        # XEP-0420 4: the envelope's sender must be the stanza's
        if frm is None or bare(frm.get("jid")) != bare(sender):
            return body, GlueError("SCE <from/> %r does not match the sender %r"
                                   % (None if frm is None else frm.get("jid"), sender))
        return body, None

    async def parse_message(self, encrypted, sender_bare, device):
        return twomemo.etree.parse_message(encrypted, sender_bare)


class Oldmemo(Flavour):
    """XEP-0384 0.3 ("legacy", Conversations): a bundle node per device; the
    plaintext is the body text."""
    name, ns, devices_node = "oldmemo", NS_OLDMEMO, NS_OLDMEMO + ".devicelist"
    list_tag = "list"
    etree = oldmemo.etree

    def backend(self, storage):
        return oldmemo.Oldmemo(storage)

    def bundle_node(self, device_id):
        return "%s.bundles:%d" % (NS_OLDMEMO, device_id), "current", {"access_model": "open"}

    def plaintext(self, body, to, sender):
        return body.encode("utf-8")

    def body_of(self, plaintext, sender):
        return plaintext.decode("utf-8"), None

    async def parse_message(self, encrypted, sender_bare, device):
        return await oldmemo.etree.parse_message(encrypted, sender_bare, device.own_bare,
                                                 device.sm)


FLAVOURS = {f.name: f for f in (Twomemo(), Oldmemo())}


# ------------------------------------------------------------------- device

class OmemoDevice:
    """One OMEMO device: an account's client plus its own device id and
    identity key (python-omemo SessionManager with one backend: twomemo or
    oldmemo)."""

    def __init__(self, client, *, flavour="twomemo", storage=None, label=None, publish=True,
                 listen=True):
        self.flavour = FLAVOURS[flavour] if isinstance(flavour, str) else flavour
        self.ns = self.flavour.ns
        self.client = None
        self.lt = client.lt
        self.storage = storage or MemoryStorage()
        self.label = label
        self.publish = publish     # False: a restored copy that must not touch PEP
        self.own_bare = bare(client.jid)
        self.sm = None
        self._device_id = None
        self.received: List[Received] = []
        self.mam: Dict[str, list] = {}
        self.sent: List[tuple] = []          # (stanza id, to, <encrypted/> element)
        self.pep_log: List[tuple] = []       # (op, owner, node, item id, outcome)
        self.trust_decisions: List[tuple] = []
        self.problems: List[str] = []        # things a client would complain about
        self._queue = None
        self._changed = None
        self._lock = None
        self._worker = None
        self.attach(client, listen)

    # -- plumbing ----------------------------------------------------------

    def attach(self, client, listen=True):
        """Use this (new) connection of the account from now on, e.g. after a
        reconnection.  Call before it logs in, so nothing is missed."""
        assert bare(client.jid) == self.own_bare
        self.client = client
        self.lt = client.lt
        if listen:
            name = "omemo-%d" % next(_ids)
            client.xmpp.register_handler(Callback(
                name, MatchXPath("{%s}message" % NS_CLIENT), self._on_message))

        async def init():
            if self._queue is None:
                self._queue = asyncio.Queue()
                self._changed = asyncio.Condition()
                self._lock = asyncio.Lock()
                self._worker = asyncio.ensure_future(self._work())
        self.lt.run(init(), 5)

    @property
    def xmpp(self):
        return self.client.xmpp

    @property
    def device_id(self):
        return self._device_id if self.sm else None

    def run(self, coro, timeout=OP_TIMEOUT):
        return self.lt.run(coro, timeout)

    def _on_message(self, stanza):
        # slixmpp calls this on the loop, in stream order; the worker keeps it
        self._queue.put_nowait(copy.deepcopy(stanza.xml))

    async def _iq(self, itype, to, payload):
        iq = self.xmpp.Iq()
        iq["type"] = itype
        if to:
            iq["to"] = to
        iq.append(payload)
        return (await iq.send(timeout=IQ_TIMEOUT)).xml

    # -- PEP (XEP-0163 / XEP-0060) ------------------------------------------

    @staticmethod
    def _publish_options(**fields):
        po = ET.Element(q(NS_PUBSUB, "publish-options"))
        x = ET.SubElement(po, q(NS_XDATA, "x"), type="submit")
        f = ET.SubElement(x, q(NS_XDATA, "field"), var="FORM_TYPE", type="hidden")
        ET.SubElement(f, q(NS_XDATA, "value")).text = NS_PUBSUB + "#publish-options"
        for k, v in fields.items():
            f = ET.SubElement(x, q(NS_XDATA, "field"), var="pubsub#" + k)
            ET.SubElement(f, q(NS_XDATA, "value")).text = v
        return po

    async def _publish(self, node, item_id, payload, **options):
        ps = ET.Element(q(NS_PUBSUB, "pubsub"))
        pub = ET.SubElement(ps, q(NS_PUBSUB, "publish"), node=node)
        ET.SubElement(pub, q(NS_PUBSUB, "item"), id=item_id).append(payload)
        ps.append(self._publish_options(**options))
        try:
            await self._iq("set", None, ps)
        except (IqError, IqTimeout) as e:
            self.pep_log.append(("publish", self.own_bare, node, item_id, repr(e)))
            raise
        self.pep_log.append(("publish", self.own_bare, node, item_id, "ok"))

    async def _items(self, owner, node, item_id=None):
        """The <item/>s of owner's node; None if the node or item does not exist."""
        ps = ET.Element(q(NS_PUBSUB, "pubsub"))
        items = ET.SubElement(ps, q(NS_PUBSUB, "items"), node=node)
        if item_id is not None:
            ET.SubElement(items, q(NS_PUBSUB, "item"), id=item_id)
        try:
            res = await self._iq("get", owner, ps)
        except IqError as e:
            cond = e.iq["error"]["condition"]
            self.pep_log.append(("items", owner, node, item_id, cond))
            if cond == "item-not-found":
                return None
            raise
        except IqTimeout:
            self.pep_log.append(("items", owner, node, item_id, "timeout"))
            raise
        found = res.findall("%s/%s/%s" % (q(NS_PUBSUB, "pubsub"), q(NS_PUBSUB, "items"),
                                          q(NS_PUBSUB, "item")))
        if item_id is not None:
            found = [i for i in found if i.get("id") == item_id]
        self.pep_log.append(("items", owner, node, item_id, "%d item(s)" % len(found)))
        return found or None

    # -- what python-omemo asks of the XMPP side ------------------------------

    async def upload_bundle(self, bundle):
        if not self.publish:
            return
        if bundle.namespace != self.ns:
            raise omemo.UnknownNamespace(bundle.namespace)
        node, item, options = self.flavour.bundle_node(bundle.device_id)
        try:
            await self._publish(node, item, self.flavour.etree.serialize_bundle(bundle), **options)
        except (IqError, IqTimeout) as e:
            raise omemo.BundleUploadFailed(repr(e)) from e

    async def download_bundle(self, namespace, bare_jid, device_id):
        if namespace != self.ns:
            raise omemo.UnknownNamespace(namespace)
        node, item, _ = self.flavour.bundle_node(device_id)
        try:
            items = await self._items(bare_jid, node, item)
        except (IqError, IqTimeout) as e:
            raise omemo.BundleDownloadFailed(repr(e)) from e
        el = items[-1].find(q(self.ns, "bundle")) if items else None
        if el is None:
            raise omemo.BundleNotFound("%s/%s" % (bare_jid, device_id))
        try:
            return self.flavour.etree.parse_bundle(el, bare_jid, device_id)
        except Exception as e:
            self.problems.append("bad bundle of %s/%s: %r" % (bare_jid, device_id, e))
            raise omemo.BundleDownloadFailed(repr(e)) from e

    async def delete_bundle(self, namespace, device_id):
        if not self.publish:
            return
        node, item, _ = self.flavour.bundle_node(device_id)
        ps = ET.Element(q(NS_PUBSUB, "pubsub"))
        r = ET.SubElement(ps, q(NS_PUBSUB, "retract"), node=node)
        ET.SubElement(r, q(NS_PUBSUB, "item"), id=item)
        try:
            await self._iq("set", None, ps)
        except IqError as e:
            if e.iq["error"]["condition"] != "item-not-found":
                raise omemo.BundleDeletionFailed(repr(e)) from e
        except IqTimeout as e:
            raise omemo.BundleDeletionFailed(repr(e)) from e

    async def upload_device_list(self, namespace, device_list):
        if not self.publish:
            return
        if namespace != self.ns:
            raise omemo.UnknownNamespace(namespace)
        try:
            await self._publish(self.flavour.devices_node, "current",
                                self.flavour.etree.serialize_device_list(device_list),
                                access_model="open")
        except (IqError, IqTimeout) as e:
            raise omemo.DeviceListUploadFailed(repr(e)) from e

    async def download_device_list(self, namespace, bare_jid):
        if namespace != self.ns:
            raise omemo.UnknownNamespace(namespace)
        try:
            items = await self._items(bare_jid, self.flavour.devices_node)
        except (IqError, IqTimeout) as e:
            raise omemo.DeviceListDownloadFailed(repr(e)) from e
        if not items:
            return {}
        # "current" is the one to use (XEP-0384 5.3.1); a node could hold more
        item = next((i for i in items if i.get("id") == "current"), items[-1])
        el = item.find(q(self.ns, self.flavour.list_tag))
        if el is None:
            return {}
        return self.flavour.etree.parse_device_list(el)

    async def send_omemo(self, message, bare_jid, body=None, msg_id=None):
        """Send an OMEMO message (python-omemo's Message) to bare_jid."""
        if not self.publish:
            return None     # a restored copy stays silent
        encrypted = self.flavour.etree.serialize_message(message)
        m = self.xmpp.Message()
        m["to"] = bare_jid
        m["type"] = "chat"
        m["id"] = msg_id or "omemo-%s" % secrets.token_hex(6)
        m.append(encrypted)
        ET.SubElement(m.xml, q(NS_EME, "encryption"), namespace=self.ns, name="OMEMO")
        ET.SubElement(m.xml, q(NS_HINTS, "store"))
        if body is not None:
            m["body"] = body
        m.send()
        self.sent.append((m["id"], bare_jid, copy.deepcopy(encrypted)))
        return m["id"]

    # -- the session manager ---------------------------------------------------

    def _manager_class(self):
        dev = self

        class Manager(omemo.SessionManager):
            # python-omemo declares these static; instance methods that reach
            # the device through the closure do the same job
            async def _upload_bundle(self, bundle):
                await dev.upload_bundle(bundle)

            async def _download_bundle(self, namespace, bare_jid, device_id):
                return await dev.download_bundle(namespace, bare_jid, device_id)

            async def _delete_bundle(self, namespace, device_id):
                await dev.delete_bundle(namespace, device_id)

            async def _upload_device_list(self, namespace, device_list):
                await dev.upload_device_list(namespace, device_list)

            async def _download_device_list(self, namespace, bare_jid):
                return await dev.download_device_list(namespace, bare_jid)

            async def _evaluate_custom_trust_level(self, device):
                level = {TRUST_BLIND: omemo.TrustLevel.TRUSTED,
                         TRUST_UNDECIDED: omemo.TrustLevel.UNDECIDED,
                         TRUST_DISTRUSTED: omemo.TrustLevel.DISTRUSTED}.get(device.trust_level_name)
                if level is None:
                    raise omemo.UnknownTrustLevel(device.trust_level_name)
                return level

            async def _make_trust_decision(self, undecided, identifier):
                for d in undecided:   # BTBV
                    dev.trust_decisions.append((d.bare_jid, d.device_id))
                    await self.set_trust(d.bare_jid, d.identity_key, TRUST_BLIND)

            async def _send_message(self, message, bare_jid):
                # empty messages: handshake completion, staleness, healing
                await dev.send_omemo(message, bare_jid)

        return Manager

    async def _start(self, live):
        self.sm = await self._manager_class().create(
            [self.flavour.backend(self.storage)], self.storage, self.own_bare,
            self.label, TRUST_UNDECIDED)
        own, _ = await self.sm.get_own_device_information()
        self._device_id = own.device_id
        if live:
            await self.sm.after_history_sync()
        return own.device_id

    def start(self, live=True, timeout=OP_TIMEOUT):
        """Load or create the device: id, identity, pre keys, bundle and device
        list published (first run).  live=False stays in history sync mode."""
        return self.run(self._start(live), timeout)

    # -- account-side helpers --------------------------------------------------

    def enable_carbons(self):
        async def go():
            await self._iq("set", None, ET.Element(q(NS_CARBONS, "enable")))
        self.run(go(), IQ_TIMEOUT + 2)

    def refresh(self, bare_jid):
        """Fetch bare_jid's device list (what a PEP notification would bring)."""
        async def go():
            async with self._lock:
                await self.sm.refresh_device_list(self.ns, bare_jid)
                return {d.device_id for d in await self.sm.get_device_information(bare_jid)}
        return self.run(go())

    def begin_catch_up(self):
        self.lt.call(self.sm.before_history_sync)

    def end_catch_up(self):
        async def go():
            async with self._lock:
                await self.sm.after_history_sync()
        self.run(go())

    # -- encryption --------------------------------------------------------------

    def send(self, to_bare, text, timeout=OP_TIMEOUT):
        """Encrypt text (in an SCE envelope) for every device of to_bare and our
        own other devices, send it; returns (stanza id, <encrypted/>, errors)."""
        async def go():
            async with self._lock:
                plain = self.flavour.plaintext(text, to_bare, self.client.full_jid)
                messages, errors = await self.sm.encrypt(frozenset([to_bare]), {self.ns: plain})
                (msg,) = [m for m in messages if m.namespace == self.ns]
                mid = await self.send_omemo(msg, to_bare, body=FALLBACK_BODY)
                return mid, self.sent[-1][2], errors
        return self.run(go(), timeout)

    # -- decryption --------------------------------------------------------------

    async def _work(self):
        while True:
            xml = await self._queue.get()
            try:
                async with self._lock:
                    await self._handle(xml)
            except Exception as e:   # a client keeps running; the test sees it
                log.exception("handling %s", ET.tostring(xml)[:300])
                self.problems.append("handling failed: %r" % e)
            async with self._changed:
                self._changed.notify_all()

    async def _handle(self, xml):
        own_from = bare(xml.get("from", self.own_bare)) == self.own_bare

        # XEP-0313 4.2: archive results go to the query that asked for them
        res = xml.find(q(NS_MAM, "result"))
        if res is not None:
            if not own_from:
                self.problems.append("MAM result from a stranger: %s" % xml.get("from"))
                return
            fwd = res.find(q(NS_FORWARD, "forwarded"))
            self.mam.setdefault(res.get("queryid"), []).append(
                (res.get("id"), fwd.find(q(NS_DELAY, "delay")), fwd.find(q(NS_CLIENT, "message"))))
            return

        # XEP-0163: device list notifications keep the cache fresh
        ev = xml.find(q(NS_PUBSUB_EVENT, "event"))
        if ev is not None:
            items = ev.find(q(NS_PUBSUB_EVENT, "items"))
            if (items is not None and items.get("node") == self.flavour.devices_node
                    and self.sm is not None):
                for it in items.findall(q(NS_PUBSUB_EVENT, "item")):
                    lst = it.find(q(self.ns, self.flavour.list_tag))
                    if lst is not None and it.get("id") in (None, "current"):
                        await self.sm.update_device_list(
                            self.ns, bare(xml.get("from", self.own_bare)),
                            self.flavour.etree.parse_device_list(lst))
            return

        kind, inner = "direct", xml
        for k in ("received", "sent"):   # XEP-0280 carbons
            c = xml.find(q(NS_CARBONS, k))
            if c is not None:
                if not own_from:   # XEP-0280 11: only our own server may send these
                    self.problems.append("forged carbon from %s" % xml.get("from"))
                    return
                inner = c.find("%s/%s" % (q(NS_FORWARD, "forwarded"), q(NS_CLIENT, "message")))
                kind = "carbon-" + k
        if inner is None:
            return
        enc = inner.find(q(self.ns, "encrypted"))
        if enc is None or inner.get("type") == "error":
            return
        r = Received(kind, xml, inner, enc)
        if self.sm is None:
            r.error = GlueError("OMEMO not started yet")
        else:
            await self._decrypt_into(r)
        self.received.append(r)   # only once handled: waiters see the outcome

    async def _decrypt_into(self, r):
        try:
            message = await self.flavour.parse_message(r.encrypted, bare(r.sender), self)
            r.plaintext, r.device, _ = await self.sm.decrypt(message)
            if r.plaintext is not None:
                r.body, r.error = self.flavour.body_of(r.plaintext, r.sender)
        except Exception as e:
            r.error = e

    def decrypt_archived(self, sender_bare, message_el, timeout=OP_TIMEOUT):
        """Decrypt an archived <message/> (e.g. a MAM result) with this device's
        current state; returns a Received."""
        enc = message_el.find(q(self.ns, "encrypted"))
        if enc is None:
            raise GlueError("no <encrypted/> in %r" % ET.tostring(message_el)[:300])
        r = Received("archived", message_el, message_el, enc)
        r.sender = message_el.get("from") or sender_bare

        async def go():
            async with self._lock:
                await self._decrypt_into(r)
            return r
        return self.run(go(), timeout)

    def wait_for(self, pred, what, timeout=OP_TIMEOUT):
        """The first Received matching pred (waits for it to arrive and be
        handled)."""
        async def go():
            async with self._changed:
                while True:
                    for r in self.received:
                        if pred(r):
                            return r
                    await self._changed.wait()
        try:
            return self.run(go(), timeout)
        except TimeoutError:
            raise AssertionError("%s: nothing like %s within %.0f s; received=%r problems=%r"
                                 % (self.client.jid, what, timeout, self.received,
                                    self.problems)) from None

    def settle(self, timeout=OP_TIMEOUT):
        """Wait until every stanza received so far is handled (a ping first, so
        the server has sent us whatever it had queued before)."""
        self.client.ping_server(timeout=IQ_TIMEOUT)

        async def go():
            async with self._changed:
                while not self._queue.empty():
                    await self._changed.wait()
            async with self._lock:   # the one in progress
                pass
        self.run(go(), timeout)

    # -- MAM (XEP-0313) ---------------------------------------------------------

    def mam_query(self, with_jid=None, timeout=OP_TIMEOUT):
        """All of the account's archive (with with_jid): [(archive id, <delay/>,
        <message/>)], in archive order."""
        qid = "q-%s" % secrets.token_hex(4)

        async def go():
            query = ET.Element(q(NS_MAM, "query"), queryid=qid)
            if with_jid:
                x = ET.SubElement(query, q(NS_XDATA, "x"), type="submit")
                for var, val in (("FORM_TYPE", NS_MAM), ("with", with_jid)):
                    f = ET.SubElement(x, q(NS_XDATA, "field"), var=var)
                    ET.SubElement(f, q(NS_XDATA, "value")).text = val
            fin = await self._iq("set", None, query)
            if fin.find(q(NS_MAM, "fin")) is None:
                raise GlueError("MAM query result without <fin/>: %r" % ET.tostring(fin))
            # results precede the <fin/> on the stream; let the worker file them
            async with self._changed:
                while not self._queue.empty():
                    await self._changed.wait()
            async with self._lock:
                pass
            return self.mam.get(qid, []), fin
        return self.run(go(), timeout)

    # -- restored copy ----------------------------------------------------------

    def restored_copy(self, storage):
        """Another instance of this very device (same id, keys and sessions as
        in `storage`), that neither publishes nor sends: for decrypting an
        archived copy of a message this device already consumed."""
        twin = OmemoDevice(self.client, flavour=self.flavour, storage=storage, label=self.label,
                           publish=False, listen=False)
        twin.start(live=False)
        assert twin.device_id == self.device_id, (twin.device_id, self.device_id)
        return twin

    def close(self):
        """Stop the worker (the client is closed by the test fixture)."""
        async def go():
            if self._worker:
                self._worker.cancel()
        try:
            self.run(go(), 5)
        except Exception:
            pass
