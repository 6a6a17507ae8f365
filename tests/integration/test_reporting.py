"""XEP-0377 Blocking Command Reports in mod_blocking, with real slixmpp
clients over TLS: a <report/> inside a <block/> item blocks the JID as usual,
is stored (table "reports", surviving restarts and unblocks), reaches the
operator's abuse account with the reporter named, and reaches a third-party
report address (an RTBL service) only when the reporter opted in with
<third-party/>, without the reporter's identity.  Bad reports and reports over
the hourly limit are refused as a whole: nothing blocked, stored or sent."""

import asyncio
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
from slixmpp.exceptions import IqError

from xmpp_helpers import DOMAIN, MALLORY, USERS, XMPPD, line_of, uniq

ALICE, BOB = "alice@localhost", "bob@localhost"
ABUSE = ("abuse@localhost", "abuse-Secret-4")     # the operator's abuse account
RTBL = ("rtbl@localhost", "rtbl-Secret-5")        # stands in for an RTBL's report address
PASSWORDS = dict(USERS, **dict([MALLORY, ABUSE, RTBL]))
MODULES = ("c2s", "blocking")

NS_BLOCKING = "urn:xmpp:blocking"
NS_REPORTING = "urn:xmpp:reporting:1"
NS_SID = "urn:xmpp:sid:0"
NS_JID = "urn:xmpp:jid:0"
NS_ADDRESS = "http://jabber.org/protocol/address"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
SPAM = "urn:xmpp:reporting:spam"
ABUSE_REASON = "urn:xmpp:reporting:abuse"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


def config(**settings):
    """The blocking group: strings and lists as libconfig wants them."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"%s"' % v
        if isinstance(v, (list, tuple)):
            return "[ %s ]" % ", ".join('"%s"' % x for x in v)
        return str(v)
    return "blocking = {\n%s};\n" % "".join("    %s = %s;\n" % (k, val(v))
                                          for k, v in settings.items())


def start(xmppd_factory, **settings):
    return xmppd_factory(modules=MODULES, extra=config(**settings),
                         extra_users=[MALLORY, ABUSE, RTBL])


def login(clients, srv, jid, resource="r"):
    c = clients(srv, "%s/%s" % (jid, resource), PASSWORDS[jid]).must_login()

    def catch_errors():     # slixmpp's "message" event only has messages with a <body/>
        c.errors = asyncio.Queue()
        c.xmpp.add_event_handler("message_error", c.errors.put_nowait)
    c.lt.call(catch_errors)
    c.send_presence()
    return c


def next_error(c, timeout=5.0):
    try:
        return c.lt.run(c.errors.get(), timeout)
    except TimeoutError:
        raise AssertionError("%s: no message error within %.0f s" % (c.jid, timeout)) from None


def report(reason=SPAM, text=None, lang=None, ids=(), opt=(), raw=""):
    """A <report/>: ids are (by, id) pairs; opt holds 'third-party' / 'report-origin'."""
    parts = ["<stanza-id xmlns='%s' by='%s' id='%s'/>" % (NS_SID, by, i) for by, i in ids]
    if text is not None:
        parts.append("<text%s>%s</text>" % (" xml:lang='%s'" % lang if lang else "",
                                            text.replace("&", "&amp;").replace("<", "&lt;")))
    parts += ["<%s/>" % o for o in opt]
    reason_attr = "" if reason is None else " reason='%s'" % reason
    return "<report xmlns='%s'%s>%s%s</report>" % (NS_REPORTING, reason_attr, "".join(parts), raw)


def block(c, *items):
    """items: (jid, report xml or None).  Returns the result IQ (raises IqError)."""
    xml = "".join("<item jid='%s'>%s</item>" % (j, r or "") for j, r in items)
    return c.iq(None, "<block xmlns='%s'>%s</block>" % (NS_BLOCKING, xml), "set")


def block_refused(c, *items):
    """The error a block request gets: (type, condition, text)."""
    with pytest.raises(IqError) as ei:
        block(c, *items)
    return error_of(ei.value.iq)


def error_of(stanza):
    """(type, condition, text) read from the XML: slixmpp 1.8 does not know
    RFC 6120's <policy-violation/>."""
    err = stanza.xml.find("{jabber:client}error")
    assert err is not None, stanza
    conds = [e.tag.split("}")[1] for e in err
             if e.tag.startswith("{%s}" % NS_STANZAS) and not e.tag.endswith("}text")]
    text = err.find("{%s}text" % NS_STANZAS)
    return err.get("type"), conds[0] if conds else None, text.text if text is not None else None


def unblock(c, *jids):
    xml = "".join("<item jid='%s'/>" % j for j in jids)
    return c.iq(None, "<unblock xmlns='%s'>%s</unblock>" % (NS_BLOCKING, xml), "set")


def blocklist(c):
    res = c.iq(None, "<blocklist xmlns='%s'/>" % NS_BLOCKING)
    return sorted(i.get("jid") for i in res.xml.iter("{%s}item" % NS_BLOCKING))


def reaches(sender, receiver):
    """A chat message from sender arrives at receiver (the test can fail)."""
    body = uniq("hello")
    sender.send_message(receiver.jid.split("/")[0], body)
    receiver.wait_message(body)


def bounced(sender, receiver):
    """sender's message to receiver is bounced service-unavailable (XEP-0191
    3.3) and receiver never sees it."""
    body = uniq("spam")
    sender.send_message(receiver.jid.split("/")[0], body)
    m = next_error(sender)
    assert error_of(m)[1] == "service-unavailable", m
    receiver.ping_server()      # anything routed to receiver before now has arrived
    got = [x["body"] for x in receiver.drain_messages()]
    assert body not in got, "a blocked sender's message arrived: %r" % got


def forwarded(c, timeout=5.0):
    """The next message c gets, which must be a forwarded report; returns
    (message, its <report/> element)."""
    m = c.wait_message(timeout=timeout)
    rep = m.xml.find("{%s}report" % NS_REPORTING)
    assert rep is not None, "not a report: %s" % m
    assert str(m["from"]) == DOMAIN, m
    assert m["type"] == "normal", m
    return m, rep


def reported_jid(rep):
    j = rep.find("{%s}jid" % NS_JID)
    return j.text if j is not None else None


def texts(rep):
    return [(t.get(XML_LANG), t.text) for t in rep.findall("{%s}text" % NS_REPORTING)]


def stored_records(srv):
    """The values of the "reports" table of a stopped server, in key order."""
    dump = shutil.which("db5.3_dump")
    assert dump, "db5.3_dump missing: install the Debian package db5.3-util"
    r = subprocess.run([dump, "-p", str(srv.data_dir / "reports.db")], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=20)
    assert r.returncode == 0, r.stdout
    return [line.strip() for line in r.stdout.splitlines() if "<record" in line]


def sync_empty(c):
    c.ping_server()
    return c.drain_messages()


# --------------------------------------------------------------------------- tests

def test_report_blocks_stores_and_forwards(xmppd_factory, clients):
    srv = start(xmppd_factory, abuse_jids=[ABUSE[0]], forward_reports_to=[RTBL[0]])
    alice = login(clients, srv, ALICE)
    mallory = login(clients, srv, MALLORY[0])
    abuse = login(clients, srv, ABUSE[0])
    rtbl = login(clients, srv, RTBL[0])

    # XEP-0377 3: advertised on the server and on the account.
    for target in (DOMAIN, ALICE):
        feats = alice.disco_info(target)["disco_info"]["features"]
        assert NS_REPORTING in feats and NS_BLOCKING in feats, (target, feats)

    reaches(mallory, alice)     # before the report, mallory gets through
    text = "Buy cheap <pills> & more, " + uniq("t")
    block(alice, (MALLORY[0], report(SPAM, "\n  %s\n " % text, "en",
                                     ids=[(ALICE, "sid-1"), (ALICE, "sid-2")])))
    # Blocked as with a plain <block/>.
    assert blocklist(alice) == [MALLORY[0]]
    bounced(mallory, alice)

    # The operator's abuse account gets it with everything, reporter named.
    m, rep = forwarded(abuse)
    assert rep.get("reason") == SPAM
    assert reported_jid(rep) == MALLORY[0]
    assert texts(rep) == [("en", text)], ET.tostring(rep)
    sids = [(s.get("by"), s.get("id")) for s in rep.findall("{%s}stanza-id" % NS_SID)]
    assert sids == [(ALICE, "sid-1"), (ALICE, "sid-2")], sids
    assert rep.find("{%s}third-party" % NS_REPORTING) is None
    addr = m.xml.find("{%s}addresses/{%s}address" % (NS_ADDRESS, NS_ADDRESS))
    assert addr is not None and addr.get("type") == "ofrom" and addr.get("jid") == ALICE, m
    body = m["body"]
    for needle in (ALICE, MALLORY[0], "spam", text, "sid-1"):
        assert needle in body, (needle, body)

    # The third party got nothing: the reporter did not opt in (XEP-0377 5).
    # An opted-in abuse report of a remote JID goes there, reporter withheld.
    text2 = uniq("threats")
    block(alice, ("troll@example.org", report(ABUSE_REASON, text2, ids=[(ALICE, "sid-3")],
                                             opt=["third-party"])))
    m, rep = forwarded(rtbl)        # the first thing rtbl gets: the first report never came
    assert reported_jid(rep) == "troll@example.org"
    assert rep.get("reason") == ABUSE_REASON
    assert texts(rep) == [(None, text2)]
    assert rep.find("{%s}third-party" % NS_REPORTING) is not None
    assert rep.find("{%s}stanza-id" % NS_SID) is None, "stanza-id 'by' names the reporter"
    assert m.xml.find("{%s}addresses" % NS_ADDRESS) is None
    assert ALICE not in str(m), "the reporter leaked to a third party: %s" % m
    assert "troll@example.org" in m["body"] and "abuse" in m["body"]
    # ... and the abuse account gets that one too, with the reporter.
    m, rep = forwarded(abuse)
    assert reported_jid(rep) == "troll@example.org" and ALICE in m["body"]
    assert sync_empty(rtbl) == [] and sync_empty(abuse) == []
    assert sorted(blocklist(alice)) == [MALLORY[0], "troll@example.org"]

    # A report for a JID already blocked is still a report (nothing new blocked).
    block(alice, (MALLORY[0], report(SPAM)))
    m, rep = forwarded(abuse)
    assert reported_jid(rep) == MALLORY[0] and texts(rep) == []
    assert blocklist(alice) == [MALLORY[0], "troll@example.org"]

    # Stored under the reporter's account: deleting it deletes its reports.
    bob = login(clients, srv, BOB)
    block(bob, (MALLORY[0], report(ABUSE_REASON, "from bob")))
    forwarded(abuse)
    for c in (alice, mallory, abuse, rtbl, bob):
        c.close()
    assert srv.terminate() == 0
    records = stored_records(srv)
    assert sorted(r.count('reporter="%s"' % ALICE) for r in records) == [0, 1, 1, 1], records
    stored = ET.fromstring(records[2])          # keys sort newest first: the first report
    assert stored.get("jid") == MALLORY[0] and stored.get("time", "").startswith("20"), records
    rep = stored.find("{%s}report" % NS_REPORTING)
    assert rep.get("reason") == SPAM and texts(rep) == [("en", text)], records[2]
    assert [s.get("id") for s in rep.findall("{%s}stanza-id" % NS_SID)] == ["sid-1", "sid-2"]
    r = srv.ctl("deluser", ALICE)
    assert r.returncode == 0, r.stderr
    records = stored_records(srv)
    assert len(records) == 1 and 'reporter="%s"' % BOB in records[0], records


def test_bad_reports_refused_atomically(xmppd_factory, clients):
    srv = start(xmppd_factory, abuse_jids=[ABUSE[0]], max_report_text=64)
    alice = login(clients, srv, ALICE)
    mallory = login(clients, srv, MALLORY[0])
    abuse = login(clients, srv, ABUSE[0])

    cases = [
        ("unknown reason", [(MALLORY[0], report("urn:xmpp:reporting:annoying"))],
         "bad-request", "unknown report reason"),
        ("no reason", [(MALLORY[0], report(None))], "bad-request", "unknown report reason"),
        ("text too long", [(MALLORY[0], report(SPAM, "x" * 65))], "policy-violation", "64"),
        ("texts add up", [(MALLORY[0], report(SPAM, "y" * 40, raw="<text>%s</text>" % ("z" * 40)))],
         "policy-violation", "64"),
        ("too many messages", [(MALLORY[0], report(SPAM, ids=[(ALICE, "s%d" % i)
                                                              for i in range(21)]))],
         "policy-violation", "20"),
        ("stanza-id without by", [(MALLORY[0], report(SPAM, raw="<stanza-id xmlns='%s' id='x'/>"
                                                      % NS_SID))], "bad-request", "by"),
        ("stanza-id with a bad by", [(MALLORY[0], report(SPAM, ids=[("a@b@c", "x")]))],
         "jid-malformed", None),
        ("two reports in one item", [(MALLORY[0], report(SPAM) + report(ABUSE_REASON))],
         "bad-request", "one <report/>"),
        # a good item next to a bad one: neither is blocked
        ("one bad item of two", [(BOB, report(SPAM)), (MALLORY[0], report("spam"))],
         "bad-request", "unknown report reason"),
        ("a bad JID next to a report", [(MALLORY[0], report(SPAM)), ("a@b@c", None)],
         "jid-malformed", None),
    ]
    for what, items, cond, text in cases:
        etype, econd, etext = block_refused(alice, *items)
        assert econd == cond, (what, etype, econd, etext)
        if text:
            assert text in (etext or ""), (what, etext)
    assert blocklist(alice) == []
    reaches(mallory, alice)
    reaches(mallory, alice)
    # Nothing was stored or sent: the first report the abuse account gets is
    # the good one below.
    assert sync_empty(abuse) == []
    marker = uniq("good")
    block(alice, (MALLORY[0], report(SPAM, marker)))
    _m, rep = forwarded(abuse)
    assert texts(rep) == [(None, marker)], ET.tostring(rep)
    bounced(mallory, alice)

    # Unknown children are tolerated and not passed on; an unknown element
    # beside the report in the item changes nothing.
    block(alice, ("other@example.org", report(ABUSE_REASON, "ok", raw="<evil xmlns='urn:x'>x</evil>")
                  + "<other xmlns='urn:y'/>"))
    _m, rep = forwarded(abuse)
    assert [c.tag for c in rep] == ["{%s}jid" % NS_JID, "{%s}text" % NS_REPORTING], \
        ET.tostring(rep)

    # Another user cannot report in alice's name.
    bob = login(clients, srv, BOB)
    with pytest.raises(IqError) as ei:
        bob.iq(ALICE, "<block xmlns='%s'><item jid='%s'>%s</item></block>"
               % (NS_BLOCKING, MALLORY[0], report(SPAM)), "set")
    assert error_of(ei.value.iq)[1] == "forbidden"
    assert sync_empty(abuse) == []


def test_rate_limit_survives_restart_and_unblock_keeps_reports(xmppd_factory, clients):
    srv = start(xmppd_factory, abuse_jids=[ABUSE[0]], max_reports_per_hour=2)
    alice = login(clients, srv, ALICE)
    mallory = login(clients, srv, MALLORY[0])
    bob = login(clients, srv, BOB)
    abuse = login(clients, srv, ABUSE[0])

    first, second = uniq("first"), uniq("second")
    block(alice, (MALLORY[0], report(SPAM, first)))
    bounced(mallory, alice)
    unblock(alice, MALLORY[0])
    reaches(mallory, alice)                 # the unblock works ...
    block(alice, (MALLORY[0], report(SPAM, second)))   # ... and the first report still counts:
    etype, cond, text = block_refused(alice, (BOB, report(ABUSE_REASON, "third")))
    assert (etype, cond) == ("wait", "policy-violation"), (etype, cond, text)
    assert "2 reports per hour" in text, text
    assert blocklist(alice) == [MALLORY[0]]  # bob was not blocked
    reaches(bob, alice)
    # Two reports in one request count as two.
    etype, cond, _ = block_refused(alice, (BOB, None), ("x@example.org", report(SPAM)))
    assert cond == "policy-violation"
    assert blocklist(alice) == [MALLORY[0]]
    block(alice, (BOB, None))               # a plain block is never limited
    assert [reported_jid(forwarded(abuse)[1]) for _ in range(2)] == [MALLORY[0]] * 2
    assert sync_empty(abuse) == []
    unblock(alice)                          # unblock all: the reports stay

    for c in (alice, mallory, bob, abuse):
        c.close()
    assert srv.terminate() == 0
    log = srv.log()
    assert "stats: blocking.reports=2" in log, srv.log_tail(30)
    assert "stats: blocking.reports_refused=2" in log, srv.log_tail(30)

    # The stored records, read from the table file itself.
    records = stored_records(srv)
    assert len(records) == 2, records
    for rec, text in zip(records, (second, first)):       # newest first
        assert "reporter=\"%s\"" % ALICE in rec and "jid=\"%s\"" % MALLORY[0] in rec, rec
        assert SPAM in rec and text in rec and "time=\"20" in rec, rec

    # After a restart the limit still counts the stored reports.
    srv.returncode = None
    srv.start()
    alice = login(clients, srv, ALICE, "again")
    assert blocklist(alice) == []
    _t, cond, _ = block_refused(alice, (BOB, report(SPAM)))
    assert cond == "policy-violation"
    assert blocklist(alice) == []
    block(alice, (BOB, None))
    assert blocklist(alice) == [BOB]


def test_reporting_off_blocks_and_ignores_reports(xmppd_factory, clients):
    srv = start(xmppd_factory, reporting=False, abuse_jids=[ABUSE[0]])
    alice = login(clients, srv, ALICE)
    mallory = login(clients, srv, MALLORY[0])
    abuse = login(clients, srv, ABUSE[0])
    for target in (DOMAIN, ALICE):
        feats = alice.disco_info(target)["disco_info"]["features"]
        assert NS_BLOCKING in feats and NS_REPORTING not in feats, (target, feats)
    # XEP-0377 is not spoken: the <report/> is just an unknown child of the item.
    block(alice, (MALLORY[0], report("urn:xmpp:reporting:whatever", "x" * 5000)))
    assert blocklist(alice) == [MALLORY[0]]
    bounced(mallory, alice)
    assert sync_empty(abuse) == []
    assert not (srv.data_dir / "reports.db").exists()


def test_check_config_rejects_bad_settings(xmppd_factory):
    for bad, key in (('abuse_jids = [ "abuse@@localhost" ];', "abuse_jids"),
                     ('forward_reports_to = [ "localhost" ];', "forward_reports_to"),
                     ("max_reports_per_hour = -1;", "max_reports_per_hour"),
                     ("max_report_text = 100000;", "max_report_text")):
        srv = xmppd_factory(name=uniq("bad"), modules=MODULES, start=False, users={},
                            extra="blocking = {\n    %s\n};\n" % bad)
        r = subprocess.run([str(XMPPD), "--check-config", str(srv.config_path)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=20)
        out = r.stdout + r.stderr
        assert r.returncode == 1, (bad, out)
        assert key in out and ":%d" % line_of(srv.config, bad) in out, (bad, out)
    good = xmppd_factory(name="good", modules=MODULES, start=False, users={},
                         extra=config(abuse_jids=["abuse@localhost"],
                                      forward_reports_to=["report@rtbl.example"],
                                      forward_reporter=False, forward_without_opt_in=False,
                                      max_reports_per_hour=0, max_report_text=0))
    r = subprocess.run([str(XMPPD), "--check-config", str(good.config_path)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr
