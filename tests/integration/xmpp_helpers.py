"""
Helpers for the xmppd integration tests: locating the binaries, free ports,
certificates, a running server, slixmpp clients on a background asyncio
loop, a raw (socket + ssl) XML stream for speaking the protocol by hand, and
one (StanzaStream) whose input is parsed into stanzas.

Everything a test starts lives under its own tmp dir and is stopped by the
fixtures in conftest.py.
"""

import asyncio
import base64
import concurrent.futures
import errno
import hashlib
import hmac
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path
from xml.etree import ElementTree as ET

REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ.get("XMPPD_BUILD_DIR", str(REPO / "build"))).resolve()
XMPPD = BUILD_DIR / "xmppd"
XMPPCTL = BUILD_DIR / "xmppctl"
MODULE_DIR = BUILD_DIR / "modules"

DOMAIN = "localhost"
USERS = {
    "alice@localhost": "alice-Secret-1",
    "bob@localhost": "bob-Secret-2",
}
MALLORY = ("mallory@localhost", "mallory-Secret-3")

STREAM_NS = "http://etherx.jabber.org/streams"
STREAMS_ERR_NS = "urn:ietf:params:xml:ns:xmpp-streams"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
STANZA_ERR_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
PING_NS = "urn:xmpp:ping"
DISCO_INFO_NS = "http://jabber.org/protocol/disco#info"

START_TIMEOUT = 10.0   # server start / port open
STOP_TIMEOUT = 10.0    # server exit after SIGTERM
IO_TIMEOUT = 10.0      # any single protocol wait


def missing_binaries():
    """Names of the build outputs the suite needs that do not exist (yet)."""
    need = [XMPPD, XMPPCTL, MODULE_DIR / "mod_c2s.so"]
    return [str(p) for p in need if not p.exists()]


def free_port(family=socket.AF_INET, host="127.0.0.1"):
    """A TCP port that was free a moment ago (bind to port 0, read, close)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_accepts(host, port, timeout=0.5):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((host, port))
            return True
    except OSError:
        return False


def uniq(prefix="t"):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:10])


# ---------------------------------------------------------------- certificates

def make_certs(dirpath):
    """A test CA and a server cert for localhost (DNS:localhost, IP 127.0.0.1, ::1),
    made with certtool. Returns a dict of paths."""
    d = Path(dirpath)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = d / "ca-key.pem", d / "ca.pem"
    key, cert = d / "key.pem", d / "cert.pem"
    (d / "ca.tmpl").write_text(
        'cn = "xmppd integration test CA"\n'
        'organization = "xmppd tests"\n'
        "serial = 1\n"
        "expiration_days = 30\n"
        "ca\n"
        "cert_signing_key\n"
        "crl_signing_key\n")
    (d / "server.tmpl").write_text(
        'cn = "localhost"\n'
        'organization = "xmppd tests"\n'
        "serial = 2\n"
        "expiration_days = 30\n"
        'dns_name = "localhost"\n'
        'ip_address = "127.0.0.1"\n'
        'ip_address = "::1"\n'
        "tls_www_server\n"
        "signing_key\n"
        "encryption_key\n")

    def run(*args):
        r = subprocess.run(["certtool", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=60, text=True)
        assert r.returncode == 0, "certtool %s failed:\n%s" % (" ".join(args), r.stdout)

    run("--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", str(ca_key))
    run("--generate-self-signed", "--load-privkey", str(ca_key),
        "--template", str(d / "ca.tmpl"), "--outfile", str(ca_cert))
    run("--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", str(key))
    run("--generate-certificate", "--load-privkey", str(key),
        "--load-ca-certificate", str(ca_cert), "--load-ca-privkey", str(ca_key),
        "--template", str(d / "server.tmpl"), "--outfile", str(cert))
    return {"ca": str(ca_cert), "cert": str(cert), "key": str(key), "dir": str(d)}


# ---------------------------------------------------------------------- server

def config_text(*, data_dir, module_dir, cert, key, listeners, modules=("c2s",),
                c2s=None, extra="", log_level="debug"):
    """A config file's text. listeners: list of (address, port, tls)."""
    lines = [
        "# xmppd integration test config (generated)",
        'log_level  = "%s";' % log_level,
        'data_dir   = "%s";' % data_dir,
        'module_dir = "%s";' % module_dir,
        'hosts      = ( { domain = "%s"; cert = "%s"; key = "%s"; } );' % (DOMAIN, cert, key),
        "listeners  = (",
    ]
    for i, (addr, port, tls) in enumerate(listeners):
        sep = "," if i < len(listeners) - 1 else ""
        lines.append('    { stream = "c2s"; address = "%s"; port = %d; tls = "%s"; }%s'
                     % (addr, port, tls, sep))
    lines.append(");")
    lines.append("modules    = ( %s );" % ", ".join('"%s"' % m for m in modules))
    if c2s is None:
        c2s = {"max_stanza_size": 262144}
    if c2s:
        lines.append("c2s = {")
        for k, v in c2s.items():
            lines.append("    %s = %s;" % (k, '"%s"' % v if isinstance(v, str) else v))
        lines.append("};")
    if extra:
        lines.extend(extra.rstrip("\n").split("\n"))
    return "\n".join(lines) + "\n"


def line_of(text, needle):
    """1-based number of the first line of text containing needle."""
    for i, line in enumerate(text.split("\n"), 1):
        if needle in line:
            return i
    raise AssertionError("%r not in config text" % needle)


class Server:
    """One xmppd process with its own tmp dir, config, data dir and log."""

    def __init__(self, tmp, certs, *, name="xmppd", module_dir=None, modules=("c2s",),
                 c2s=None, extra="", ipv6=False, log_level="debug"):
        self.name = name
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.certs = certs
        self.ca = certs["ca"]
        self.data_dir = self.tmp / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.config_path = self.tmp / "xmppd.conf"
        self.log_path = self.tmp / "xmppd.log"
        self.host = "127.0.0.1"
        self.starttls_port = free_port()
        self.direct_port = free_port()
        self.ipv6_port = free_port(socket.AF_INET6, "::1") if ipv6 else None
        listeners = [(self.host, self.starttls_port, "starttls"),
                     (self.host, self.direct_port, "direct")]
        if ipv6:
            listeners.append(("::1", self.ipv6_port, "starttls"))
        self.listeners = listeners
        self.config = config_text(
            data_dir=self.data_dir, module_dir=module_dir or MODULE_DIR,
            cert=certs["cert"], key=certs["key"], listeners=listeners,
            modules=modules, c2s=c2s, extra=extra, log_level=log_level)
        self.config_path.write_text(self.config)
        self.proc = None
        self.returncode = None
        self._logf = None
        self.expect_failure = False

    # -- xmppctl
    def ctl(self, *args, input=None, timeout=30):
        return subprocess.run([str(XMPPCTL), "--config", str(self.config_path), *args],
                              input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=timeout)

    def adduser(self, jid, password):
        r = self.ctl("adduser", jid, "--password", password)
        assert r.returncode == 0, ("xmppctl adduser %s failed (rc=%s): stdout=%r stderr=%r"
                                   % (jid, r.returncode, r.stdout, r.stderr))

    # -- process
    def start(self, wait=True):
        self._logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(XMPPD), "--config", str(self.config_path)],
                                     stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=self._logf, cwd=str(self.tmp))
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout=START_TIMEOUT):
        deadline = time.monotonic() + timeout
        pending = [(a, p) for a, p, _ in self.listeners]
        while pending:
            if self.proc.poll() is not None:
                raise AssertionError("xmppd exited with %s before listening on %s\n--- log ---\n%s"
                                     % (self.proc.returncode, pending, self.log_tail()))
            if time.monotonic() > deadline:
                raise AssertionError("xmppd not listening on %s after %.0f s\n--- log ---\n%s"
                                     % (pending, timeout, self.log_tail()))
            pending = [(a, p) for a, p in pending if not port_accepts(a, p)]
            if pending:
                time.sleep(0.05)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout=STOP_TIMEOUT):
        """SIGTERM, wait (bounded), SIGKILL if needed. Returns the exit code
        (negative: killed by that signal; 'hung' if SIGKILL was needed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                self.returncode = "hung (no exit %.0f s after SIGTERM, SIGKILLed)" % timeout
        if self.returncode is None:
            self.returncode = self.proc.returncode
        if self._logf:
            self._logf.close()
            self._logf = None
        return self.returncode

    def wait_exit(self, timeout=START_TIMEOUT):
        """For a server expected to stop by itself (bad config). Kills it on timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("xmppd still running %.0f s after start (expected it to exit)"
                                 "\n--- log ---\n%s" % (timeout, self.log_tail()))

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=150):
        return "\n".join(self.log().splitlines()[-lines:])


# ------------------------------------------------------------- asyncio thread

class LoopThread:
    """An asyncio loop running in a daemon thread; slixmpp clients live on it,
    so they keep answering while the test thread blocks on raw sockets."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="slixmpp-loop", daemon=True)
        self.thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro, timeout=IO_TIMEOUT):
        """Run coro on the loop; its result, or TimeoutError after timeout s."""
        async def bounded():
            return await asyncio.wait_for(coro, timeout)
        fut = asyncio.run_coroutine_threadsafe(bounded(), self.loop)
        try:
            return fut.result(timeout + 5)
        except (asyncio.TimeoutError, concurrent.futures.TimeoutError):
            fut.cancel()
            raise TimeoutError("timed out after %.1f s" % timeout) from None

    def call(self, fn, *args, timeout=IO_TIMEOUT):
        async def c():
            return fn(*args)
        return self.run(c(), timeout)

    def close(self):
        async def cancel_all():
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            self.run(cancel_all(), 5)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


# -------------------------------------------------------------- slixmpp client

class LoginFailed(AssertionError):
    pass


class Client:
    """A slixmpp ClientXMPP on a LoopThread, with synchronous helpers.

    transport: "starttls" (STARTTLS port), "direct" (XEP-0368 direct TLS port)
    or "ipv6" (the server's ::1 STARTTLS listener).  mech: force one SASL
    mechanism ("PLAIN", "SCRAM-SHA-1", ...) or None for slixmpp's best choice.
    """

    def __init__(self, lt, server, jid, password, *, transport="starttls", mech=None):
        self.lt = lt
        self.server = server
        self.jid = jid
        self.password = password
        self.transport = transport
        self.mech = mech
        self.events = []          # (name, monotonic time)
        self.failures = []        # SASL <failure/> conditions
        self.stream_errors = []
        self.xmpp = None
        self.lt.run(self._create(), 10)

    async def _create(self):
        import slixmpp  # imported here: the loop thread is the running loop

        self.messages = asyncio.Queue()
        self.presences = asyncio.Queue()
        self.ev_session = asyncio.Event()
        self.ev_failed = asyncio.Event()
        self.ev_disconnected = asyncio.Event()
        x = slixmpp.ClientXMPP(self.jid, self.password)
        x.loop = asyncio.get_running_loop()
        x.register_plugin("xep_0030")
        x.register_plugin("xep_0199")
        ctx = ssl.create_default_context(cafile=self.server.ca)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        x.ssl_context = ctx
        x.ca_certs = Path(self.server.ca)
        if self.mech:
            x["feature_mechanisms"].use_mech = self.mech

        async def no_dns(domain, port=None):
            return []     # connect to exactly the address we give, no DNS
        x.get_dns_records = no_dns

        def mark(name):
            def h(*args):
                self.events.append((name, time.monotonic()))
            return h
        for name in ("connected", "tls_success", "auth_success", "session_bind",
                     "session_start", "failed_auth", "no_auth", "failed_all_auth",
                     "disconnected", "connection_failed", "ssl_invalid_chain",
                     "stream_error", "session_end", "killed"):
            x.add_event_handler(name, mark(name))
        x.add_event_handler("session_start", lambda _e: self.ev_session.set())
        x.add_event_handler("failed_auth", self._on_failed_auth)
        x.add_event_handler("no_auth", lambda _e: self.ev_failed.set())
        x.add_event_handler("failed_all_auth", lambda _e: self.ev_failed.set())
        x.add_event_handler("disconnected", lambda _e: self.ev_disconnected.set())
        x.add_event_handler("stream_error", lambda e: self.stream_errors.append(e["condition"]))
        x.add_event_handler("message", lambda m: self.messages.put_nowait(m))
        x.add_event_handler("presence", lambda p: self.presences.put_nowait(p))
        self.xmpp = x

    def _on_failed_auth(self, stanza):
        self.failures.append(stanza["condition"])
        self.ev_failed.set()

    def had(self, name):
        return any(n == name for n, _ in self.events)

    def when(self, name):
        for n, t in self.events:
            if n == name:
                return t
        return None

    def describe(self):
        t0 = self.events[0][1] if self.events else 0
        return "%s via %s events=%s sasl_failures=%s stream_errors=%s" % (
            self.jid, self.transport, [(n, round(t - t0, 3)) for n, t in self.events],
            self.failures, self.stream_errors)

    # -- connecting
    async def _connect(self):
        x = self.xmpp
        if self.transport == "direct":
            x.connect(address=(self.server.host, self.server.direct_port), use_ssl=True)
        elif self.transport == "ipv6":
            x.connect(address=("::1", self.server.ipv6_port))
        else:
            x.connect(address=(self.server.host, self.server.starttls_port))
        # connect() only schedules the attempt: name the TLS peer ourselves
        # (the cert is for "localhost"; slixmpp would use the IP literal).
        x.default_domain = DOMAIN

    async def _login(self):
        await self._connect()
        waits = {asyncio.ensure_future(e.wait()): name for e, name in (
            (self.ev_session, "session"), (self.ev_failed, "failed"),
            (self.ev_disconnected, "disconnected"))}
        try:
            done, _ = await asyncio.wait(waits.keys(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in waits:
                f.cancel()
        return "session" if self.ev_session.is_set() else waits[next(iter(done))]

    def login(self, timeout=IO_TIMEOUT):
        """Connect and authenticate; returns "session", "failed" (SASL failure)
        or "disconnected".  Raises TimeoutError."""
        try:
            return self.lt.run(self._login(), timeout)
        except TimeoutError:
            raise TimeoutError("login timed out: " + self.describe()) from None

    def must_login(self, timeout=IO_TIMEOUT):
        r = self.login(timeout)
        if r != "session":
            raise LoginFailed("login of %s did not reach a session (%s): %s"
                              % (self.jid, r, self.describe()))
        return self

    @property
    def full_jid(self):
        return str(self.xmpp.boundjid.full)

    @property
    def is_tls(self):
        return isinstance(self.xmpp.socket, (ssl.SSLObject, ssl.SSLSocket))

    @property
    def used_mech(self):
        m = self.xmpp["feature_mechanisms"].mech
        return m.name if m else None

    # -- stanzas
    def send_presence(self, priority=None, sync=True):
        def go():
            self.xmpp.send_presence(ppriority=priority)
        self.lt.call(go)
        if sync:
            self.ping_server()   # the server handles a stream's stanzas in order

    def send_message(self, to, body, mtype="chat"):
        def go():
            self.xmpp.send_message(mto=to, mbody=body, mtype=mtype)
        self.lt.call(go)

    def wait_message(self, body=None, timeout=5.0):
        """The next message (with that body, if given; others are skipped and kept
        in self.skipped)."""
        async def get():
            while True:
                m = await self.messages.get()
                if body is None or m["body"] == body:
                    return m
                self.skipped.append(m)
        if not hasattr(self, "skipped"):
            self.skipped = []
        try:
            return self.lt.run(get(), timeout)
        except TimeoutError:
            raise AssertionError("%s: no message%s within %.0f s (other messages: %s); %s"
                                 % (self.jid, " with body %r" % body if body else "", timeout,
                                    [str(m) for m in self.skipped], self.describe())) from None

    def _drain(self, queue):
        out = []
        async def d():
            while not queue.empty():
                out.append(queue.get_nowait())
        self.lt.run(d(), 5)
        return out

    def drain_messages(self):
        return self._drain(self.messages)

    def drain_presences(self):
        return self._drain(self.presences)

    def iq(self, to, payload_xml, itype="get", timeout=5.0):
        """Send an IQ; returns the result Iq. Raises slixmpp IqError/IqTimeout."""
        async def go():
            iq = self.xmpp.Iq()
            iq["type"] = itype
            if to:
                iq["to"] = to
            iq.append(ET.fromstring(payload_xml))
            return await iq.send(timeout=timeout)
        return self.lt.run(go(), timeout + 2)

    def ping_server(self, timeout=5.0):
        return self.iq(DOMAIN, "<ping xmlns='%s'/>" % PING_NS, timeout=timeout)

    def disco_info(self, jid, timeout=5.0):
        async def go():
            return await self.xmpp["xep_0030"].get_info(jid=jid, local=False, timeout=timeout)
        return self.lt.run(go(), timeout + 2)

    def wait_disconnected(self, timeout=5.0):
        self.lt.run(self.ev_disconnected.wait(), timeout)

    def close(self):
        """Abort the TCP connection (teardown); never raises."""
        if self.xmpp is None:
            return
        def go():
            x = self.xmpp
            x.cancel_connection_attempt()
            if x.transport:
                x.abort()
        try:
            self.lt.call(go, timeout=5)
        except Exception:
            pass

    def disconnect(self, timeout=5.0):
        async def go():
            await self.xmpp.disconnect(wait=2.0)
        try:
            self.lt.run(go(), timeout)
        except TimeoutError:
            self.close()


class ChatPair:
    """alice and bob, logged in and available: the canary that other clients
    keep being served while a hostile one misbehaves."""

    def __init__(self, lt, server, resource="canary"):
        a_jid, b_jid = list(USERS)[:2]
        self.alice = Client(lt, server, "%s/%s" % (a_jid, resource), USERS[a_jid]).must_login()
        self.bob = Client(lt, server, "%s/%s" % (b_jid, resource), USERS[b_jid]).must_login()
        self.alice.send_presence()
        self.bob.send_presence()

    def check(self, what="after the hostile client"):
        """alice -> bob (bare and full) and bob -> alice, each must arrive."""
        for to in ("bob@localhost", self.bob.full_jid):
            body = uniq("canary")
            self.alice.send_message(to, body)
            m = self.bob.wait_message(body, timeout=5)
            assert str(m["from"]) == self.alice.full_jid, (what, str(m))
        body = uniq("canary-reply")
        self.bob.send_message(self.alice.full_jid, body)
        m = self.alice.wait_message(body, timeout=5)
        assert str(m["from"]) == self.bob.full_jid, (what, str(m))
        return True

    def close(self):
        self.alice.close()
        self.bob.close()


# ------------------------------------------------------------ raw XML streams

STREAM_HEADER = ("<?xml version='1.0'?><stream:stream to='%s' xmlns='jabber:client' "
                 "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")

RE_FEATURES_END = re.compile(rb"</(?:stream:)?features\s*>|<(?:stream:)?features\b[^>]*/>")
RE_STREAM_ERROR = re.compile(
    rb"<(?:stream:)?error\b[^>]*>\s*<([A-Za-z-]+)\b[^>]*xmlns\s*=\s*['\"]"
    + re.escape(STREAMS_ERR_NS.encode()) + rb"['\"]")
RE_STREAM_END = re.compile(rb"</(?:stream:)?stream\s*>")


class StreamClosed(AssertionError):
    pass


class RawStream:
    """A client stream spoken by hand over socket (+ ssl)."""

    def __init__(self, server, port=None, *, direct=False, host=None, timeout=IO_TIMEOUT):
        self.server = server
        self.host = host or server.host
        port = port or (server.direct_port if direct else server.starttls_port)
        self.sock = socket.create_connection((self.host, port), timeout=timeout)
        self.buf = b""
        self.transcript = []     # ("C"/"S", bytes), for failure messages
        self.eof = False
        self.tls = False
        if direct:
            self._wrap_tls()

    # -- transport
    def _ctx(self):
        ctx = ssl.create_default_context(cafile=self.server.ca)
        return ctx

    def _wrap_tls(self):
        self.sock = self._ctx().wrap_socket(self.sock, server_hostname=DOMAIN)
        self.tls = True

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.transcript.append(("C", data))
        self.sock.sendall(data)

    def _recv_some(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout()
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            chunk = b""
        except ssl.SSLError as e:
            if "timed out" in str(e):
                raise socket.timeout() from None
            chunk = b""
        except OSError as e:
            if isinstance(e, socket.timeout):
                raise
            if e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
                chunk = b""
            else:
                raise
        if not chunk:
            self.eof = True
        else:
            self.transcript.append(("S", chunk))
            self.buf += chunk
        return chunk

    def dump(self, limit=4000):
        out = []
        for who, data in self.transcript:
            s = data.decode("utf-8", "replace")
            if len(s) > 600:
                s = s[:300] + " ...[%d bytes]... " % len(s) + s[-200:]
            out.append("%s: %s" % (who, s))
        text = "\n".join(out)
        return text[-limit:]

    def expect(self, pattern, timeout=IO_TIMEOUT, what=None):
        """Read until pattern (regex bytes) matches the buffer; consume up to the
        match end and return the consumed bytes."""
        if isinstance(pattern, (bytes, str)):
            pattern = re.compile(re.escape(pattern.encode() if isinstance(pattern, str) else pattern))
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.buf)
            if m:
                out, self.buf = self.buf[:m.end()], self.buf[m.end():]
                return out
            err = RE_STREAM_ERROR.search(self.buf)
            if err or self.eof:
                raise StreamClosed("waiting for %s: stream %s (error: %s)\n--- transcript ---\n%s"
                                   % (what or pattern.pattern, "closed" if self.eof else "error",
                                      err.group(1).decode() if err else None, self.dump()))
            try:
                self._recv_some(deadline)
            except socket.timeout:
                raise AssertionError("timed out (%.0f s) waiting for %s\n--- transcript ---\n%s"
                                     % (timeout, what or pattern.pattern, self.dump())) from None

    def read_until_closed(self, timeout=IO_TIMEOUT):
        """Everything the server sends until it closes the stream (</stream:stream>
        then EOF, or EOF).  Returns (bytes, closed_by_eof)."""
        deadline = time.monotonic() + timeout
        data = self.buf
        self.buf = b""
        while not self.eof:
            try:
                chunk = self._recv_some(deadline)
            except socket.timeout:
                break
            data += chunk
            self.buf = b""
            if RE_STREAM_END.search(data):
                # give the TCP close a short, bounded moment to follow
                deadline = min(deadline, time.monotonic() + 2.0)
        return data, self.eof

    def expect_stream_error(self, conditions, timeout=IO_TIMEOUT):
        """Assert the server sends <stream:error> with one of conditions and
        closes the stream.  Returns (condition, all bytes read)."""
        if isinstance(conditions, str):
            conditions = (conditions,)
        data, eof = self.read_until_closed(timeout)
        m = RE_STREAM_ERROR.search(data)
        assert m, ("expected a stream error %s, got none (connection %s)\n--- transcript ---\n%s"
                   % ("/".join(conditions), "closed" if eof else "still open", self.dump()))
        cond = m.group(1).decode()
        assert cond in conditions, ("expected stream error %s, got <%s/>\n--- transcript ---\n%s"
                                    % ("/".join(conditions), cond, self.dump()))
        assert eof or RE_STREAM_END.search(data[m.start():]), (
            "stream error <%s/> sent but the stream was not closed\n--- transcript ---\n%s"
            % (cond, self.dump()))
        return cond, data

    # -- protocol steps
    def open_stream(self, to=DOMAIN, header=None):
        self.send(header if header is not None else STREAM_HEADER % to)
        return self.expect(RE_FEATURES_END, what="</stream:features>")

    def starttls(self, trailing=b""):
        self.send(("<starttls xmlns='%s'/>" % TLS_NS).encode() + trailing)
        self.expect(re.compile(rb"<proceed\b[^>]*/>|<proceed\b[^>]*>\s*</proceed>"),
                    what="<proceed/>")
        assert self.buf == b"", "bytes after <proceed/> in clear text: %r" % self.buf
        self._wrap_tls()

    def auth_plain(self, user, password, authzid=""):
        """Returns True on <success/>, False on <failure/>."""
        token = base64.b64encode(("%s\0%s\0%s" % (authzid, user, password)).encode()).decode()
        self.send("<auth xmlns='%s' mechanism='PLAIN'>%s</auth>" % (SASL_NS, token))
        out = self.expect(re.compile(rb"<success\b[^>]*/>|</success>|</failure>|<failure\b[^>]*/>"),
                          what="SASL success/failure")
        return out.rfind(b"<success") > out.rfind(b"<failure")

    def bind(self, resource="raw"):
        self.send("<iq type='set' id='bind1'><bind xmlns='%s'><resource>%s</resource></bind></iq>"
                  % (BIND_NS, resource))
        out = self.expect(re.compile(rb"<iq\b[^>]*\bid=['\"]bind1['\"][^>]*(/>|>.*?</iq>)", re.S),
                          what="bind result")
        m = re.search(rb"<jid>([^<]+)</jid>", out)
        assert b"type='result'" in out or b'type="result"' in out, "bind failed: %r" % out
        assert m, "bind result without <jid>: %r" % out
        return m.group(1).decode()

    def auth_scram(self, user, password, hash_name="sha256"):
        """A minimal SCRAM-SHA-256 / SCRAM-SHA-1 client (RFC 5802, no channel
        binding).  Returns True on <success/> with a correct server signature,
        False on <failure/>."""
        mech = {"sha256": "SCRAM-SHA-256", "sha1": "SCRAM-SHA-1"}[hash_name]
        b64, unb64 = (lambda b: base64.b64encode(b).decode()), base64.b64decode
        cnonce = base64.b64encode(os.urandom(18)).decode()
        bare = "n=%s,r=%s" % (user.replace("=", "=3D").replace(",", "=2C"), cnonce)
        self.send("<auth xmlns='%s' mechanism='%s'>%s</auth>" % (SASL_NS, mech,
                                                                 b64(("n,," + bare).encode())))
        out = self.expect(re.compile(rb"</challenge>|</failure>|<failure\b[^>]*/>"),
                          what="SCRAM challenge")
        if b"<failure" in out:
            return False
        server_first = unb64(re.search(rb"<challenge[^>]*>([^<]*)</challenge>", out).group(1)).decode()
        attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
        assert attrs["r"].startswith(cnonce), "server nonce does not extend ours: " + server_first
        salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), unb64(attrs["s"]), int(attrs["i"]))
        client_key = hmac.new(salted, b"Client Key", hash_name).digest()
        stored_key = hashlib.new(hash_name, client_key).digest()
        without_proof = "c=biws,r=" + attrs["r"]
        auth_msg = ("%s,%s,%s" % (bare, server_first, without_proof)).encode()
        client_sig = hmac.new(stored_key, auth_msg, hash_name).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, client_sig))
        server_key = hmac.new(salted, b"Server Key", hash_name).digest()
        server_sig = hmac.new(server_key, auth_msg, hash_name).digest()
        self.send("<response xmlns='%s'>%s</response>" % (
            SASL_NS, b64(("%s,p=%s" % (without_proof, b64(proof))).encode())))
        out = self.expect(re.compile(rb"<success\b[^>]*/>|</success>|</failure>|<failure\b[^>]*/>"),
                          what="SCRAM success/failure")
        if out.rfind(b"<success") < out.rfind(b"<failure"):
            return False
        m = re.search(rb"<success[^>]*>([^<]+)</success>", out)
        assert m, "SCRAM <success/> without server-final-message: %r" % out
        assert unb64(m.group(1)).decode() == "v=" + b64(server_sig), "wrong server signature"
        return True

    def login(self, jid, password, resource="raw", mech="SCRAM-SHA-256"):
        """STARTTLS (unless already TLS), SASL, restart, bind. Returns the full JID."""
        if not self.tls:
            feats = self.open_stream()
            assert b"starttls" in feats, "no <starttls/> offered: %r" % feats
            self.starttls()
        self.open_stream()
        user = jid.split("@")[0]
        if mech == "PLAIN":
            ok = self.auth_plain(user, password)
        else:
            ok = self.auth_scram(user, password, "sha1" if mech == "SCRAM-SHA-1" else "sha256")
        assert ok, "%s auth refused\n%s" % (mech, self.dump())
        self.open_stream()
        return self.bind(resource)

    def authenticate(self, user, password):
        """STARTTLS (unless already TLS) and SCRAM-SHA-256; the caller restarts."""
        if not self.tls:
            self.open_stream()
            self.starttls()
        self.open_stream()
        assert self.auth_scram(user, password), "SCRAM auth refused\n" + self.dump()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass



def error_condition(st):
    """The defined condition of a parsed (ElementTree) stanza's error; None
    without one."""
    err = st.find("{jabber:client}error")
    if err is None:
        return None
    for c in err:
        if c.tag.startswith("{%s}" % STANZA_ERR_NS) and not c.tag.endswith("}text"):
            return c.tag.split("}", 1)[1]
    return None


class StanzaStream:
    """A bound client stream (RawStream r, bound as full) whose input is
    parsed into top-level elements, stanzas and nonzas (ElementTree, tags as
    {namespace}name): wait(pred) takes the first that matches, the others
    stay in `pending`; iq() sends an IQ and returns its reply; sync() returns
    once everything the server meant for us before now has arrived (it
    handles a stream's stanzas in order, and local routing is synchronous).
    login() opens one with a password from `passwords`, factory() is the
    body of a fixture; subclass to add accounts, checks or a wait_timeout."""

    passwords = dict(USERS, **{MALLORY[0]: MALLORY[1]})
    wait_timeout = 8.0
    ROOT = (b"<stream:stream xmlns='jabber:client' "
            b"xmlns:stream='http://etherx.jabber.org/streams'>")

    def __init__(self, r, full, bare=None):
        self.r, self.full = r, full
        self.bare = bare or (full or "").split("/")[0]
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.parser.feed(self.ROOT)
        self.root = None
        self.depth = 0
        self.pending = []      # elements read and not yet taken

    @classmethod
    def login(cls, server, jid, resource, mech="SCRAM-SHA-256", password=None):
        """A new stream of jid (bare): STARTTLS, SASL, bind."""
        r = RawStream(server)
        return cls(r, r.login(jid, password or cls.passwords[jid], resource, mech=mech))

    @classmethod
    def factory(cls):
        """For a fixture to `yield from`: make(server, jid, resource,
        presence=True) -> a stream, available unless presence=False; all
        closed at teardown, one at a time."""
        made = []

        def make(server, jid, resource, presence=True):
            p = cls.login(server, jid, resource)
            made.append(p)
            if presence:
                p.send("<presence/>")
                p.sync()
            return p

        yield make
        for p in made:
            p.close()

    def send(self, xml):
        self.r.send(xml)

    def _pump(self, deadline):
        """Parse what arrives before deadline; False if nothing did."""
        if not self.r.buf:
            try:
                self.r._recv_some(deadline)
            except OSError:
                return False  # timed out
            if self.r.eof and not self.r.buf:
                raise StreamClosed("%s: stream closed; transcript:\n%s"
                                   % (self.full, self.r.dump()))
        data, self.r.buf = self.r.buf, b""
        self.parser.feed(data)
        for ev, el in self.parser.read_events():
            if ev == "start":
                self.depth += 1
                if self.root is None:
                    self.root = el
            else:
                self.depth -= 1
                if self.depth == 1:
                    self.pending.append(el)
                    self.root.remove(el)   # parsed stanzas do not pile up
        return True

    def wait(self, pred, what, timeout=None):
        """The first element (read or still to come) for which pred is true;
        the ones before it stay pending."""
        deadline = time.monotonic() + (self.wait_timeout if timeout is None else timeout)
        while True:
            for i, el in enumerate(self.pending):
                if pred(el):
                    return self.pending.pop(i)
            if time.monotonic() > deadline:
                raise AssertionError("%s: timed out waiting for %s; pending %s; transcript:\n%s"
                                     % (self.full, what,
                                        [ET.tostring(e)[:300] for e in self.pending],
                                        self.r.dump()))
            self._pump(deadline)

    def iq(self, payload, itype="set", to=None):
        """Send an IQ; its reply."""
        ident = uniq("iq")
        self.send("<iq type='%s' id='%s'%s>%s</iq>"
                  % (itype, ident, " to='%s'" % to if to else "", payload))
        return self.wait(lambda e: e.tag == "{jabber:client}iq" and e.get("id") == ident,
                         "IQ reply " + ident)

    def sync(self):
        """A ping round trip with the server."""
        r = self.iq("<ping xmlns='%s'/>" % PING_NS, "get", DOMAIN)
        assert r.get("type") == "result", ET.tostring(r)

    def chat(self, to, body, ident=None, mtype="chat", extra=""):
        """Send a message (no <body/> if body is None); its id."""
        ident = ident or uniq("m")
        body_xml = "<body>%s</body>" % body if body is not None else ""
        self.send("<message to='%s' id='%s' type='%s'>%s%s</message>"
                  % (to, ident, mtype, body_xml, extra))
        return ident

    def message(self, ident, what=None, timeout=None):
        """The message with this id (not one that carries it, like a carbon)."""
        return self.wait(lambda e: e.tag == "{jabber:client}message" and e.get("id") == ident,
                         what or "message " + ident, timeout)

    def close(self):
        """End the stream and wait (bounded) for the server to close it: one
        stream at a time (several resources of one user dropping at the same
        instant has crashed the core before)."""
        try:
            self.r.send("</stream:stream>")
            self.r.read_until_closed(timeout=3)
        except OSError:
            pass
        self.r.close()
