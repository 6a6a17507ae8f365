"""
Federation (s2s) test harness: real XMPP servers federating with each other
over loopback, authenticated with certificates only (SASL EXTERNAL, no
dialback), so xmppd can be dropped in as one more peer.

What it sets up (everything under one private temp dir, removed at the end):

  * addresses   a per-run base 127.<a>.<b>.0 (derived from the pid, skipping
                bases whose DNS address is already taken); each test domain
                gets its own 127.<a>.<b>.N and its s2s port (5269) there.
  * certs       a test CA (certtool) and per domain a key, a CA-signed cert
                with SAN dNSName=<domain>, a CA-signed "wrong" cert naming
                another domain (not-<domain>) and a self-signed cert.
  * DNS         a dnsmasq on <base>.53 port 53 (UDP+TCP), authoritative for
                *.test: _xmpp-server._tcp.<domain> SRV -> <domain>:<port>,
                <domain> A -> its address; other *.test names NXDOMAIN,
                nothing forwarded anywhere.
  * peers       Prosody and ejabberd, each in its own private mount namespace
                where a temp resolv.conf (nameserver <dnsmasq>) is bind-mounted
                over /etc/resolv.conf, running as their own system users
                (setpriv), in the foreground, with config/data/logs in temp.
  * clients     slixmpp clients (xmpp_helpers.Client) that log in over c2s
                STARTTLS, trusting the test CA.

Use from a test module:

    pytest_plugins = ["federation"]      # fixtures + log reporting, once per session

    def test_x(prosody_peer, ejabberd_peer, fed_clients):
        alice = fed_clients(prosody_peer, "alice")
        ...

Fixtures (session-scoped unless noted):
  federation      Federation: net, certs and a running dnsmasq (no peers).
  prosody_peer    started ProsodyPeer for prosody.test (users alice, bob).
  ejabberd_peer   started EjabberdPeer for ejabberd.test (users alice, bob).
  fed_loop        a LoopThread for slixmpp clients.
  fed_clients     (function scope) make(peer, user, resource=None,
                  login=True) -> FedClient; all closed at test teardown.

Building blocks (for more peers, refusal cases, xmppd):
  Federation(root=None, base=None)  .net (FedNet), .certs (FedCerts), .dns
      (Dnsmasq), .peers, .root; start_dns(), start_prosody(users, **kw),
      start_ejabberd(users, **kw), add_peer(peer, users), stop_peer(peer),
      attach(server, domain) for a server started by the test (xmppd),
      resolv_conf_unchanged(), close().
  FedNet      base, addr(domain), s2s_port(domain), srv(domain), dns_addr,
              dns_server ("ADDR:53", for xmppd's dns_servers), client_addr.
  FedCerts    ca, ca_key, [domain] -> DomainCert(key, cert, bundle, wrong_cert,
              wrong_bundle, wrong_name, selfsigned_cert, selfsigned_bundle).
  ProsodyPeer(fed, domain, cert="good"|"wrong"|"selfsigned", c2s_cert=None,
              extra_global, extra_host) / EjabberdPeer(fed, domain, cert,
              extra_yml, modules): host, c2s_port, s2s_port, users, jid(),
              log(), log_since(marks), wait_log(), log_tail(), ctl(), stop().
  FedClient   xmpp_helpers.Client + ping(jid), disco(jid), bare_jid; works
              with any object having host, c2s_port, domain, ca (and jid(),
              users for fed_clients).
  XmppdPeer(fed, domain, modules=(c2s, roster, offline, s2s_external),
              connect_timeout=5, s2s_options="", static_routes=(), extra="",
              name="xmppd")   the xmppd under test serving a federation
              domain (its certs, address, SRV port, the dnsmasq): the config
              is written at construction (attributes + write_config() to
              change it); add_users({local: pw}), launch(users=PEER_USERS,
              attach=True) = build/port checks + users + attach + start;
              start(), running(), terminate() (exit status, "hung" if
              killed; idempotent, start() again restarts), log(), mark(),
              log_tail(), wait_log(regex, since=0, timeout, count) ->
              findall list.  Subclass it for module-specific settings.
  RawS2S(fed, target, me=EVIL, cert=None, key=None)   an s2s stream spoken
              by hand to target's s2s port as `me` (its CA-signed cert by
              default): send, expect(regex) -> bytes, header() -> features
              or stream error, starttls(), sasl(expect), authenticate(),
              stream_error(out=None) -> condition,
              expect_stream_error(conditions), close().

On a failing test that used any of these fixtures, the part of every peer's
log (and dnsmasq's query log) written during the test is attached to the
report; set XMPPD_FED_KEEP=1 to keep the temp dir after the session.

(PYTEST_DONT_REWRITE: test modules import this module before pytest loads it
as a plugin; its asserts carry their own messages.)
"""

import atexit
import base64
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from xmpp_helpers import (DISCO_INFO_NS, MODULE_DIR, PING_NS, SASL_NS, STREAM_NS, TLS_NS,
                          XMPPCTL, XMPPD, Client, LoopThread, free_port, missing_binaries,
                          port_accepts, uniq)

# ------------------------------------------------------------------ constants

PROSODY = "prosody.test"
EJABBERD = "ejabberd.test"
XMPPD_A = "xmppd-a.test"
XMPPD_B = "xmppd-b.test"
EVIL = "evil.test"
UNREACHABLE = "unreachable.test"
# mod_rtbl's tests: a blocklist pubsub service, the domain its spammers and
# moderator live on (one Prosody serves both) and the xmppd that subscribes
RTBL = "rtbl.test"
SPAM = "spam.test"
XMPPD_RTBL = "xmppd-rtbl.test"
DOMAINS = (PROSODY, EJABBERD, XMPPD_A, XMPPD_B, EVIL, UNREACHABLE, RTBL, SPAM, XMPPD_RTBL)

# last octet of each domain's address inside the per-run /24
HOST_OCTET = {PROSODY: 11, EJABBERD: 12, XMPPD_A: 21, XMPPD_B: 22, EVIL: 31, UNREACHABLE: 41,
              RTBL: 51, SPAM: 52, XMPPD_RTBL: 23}
DNS_OCTET = 53
CLIENT_OCTET = 99        # source address for the tests' own DNS/TCP probes
# Advertised through SRV.  Not 5269: a system XMPP server listening on the
# wildcard address there (a freshly installed prosody or ejabberd) would make
# every 127.x address unusable for that port.
S2S_PORT = 15269

# users created on the Prosody / ejabberd peers: local part -> password
PEER_USERS = {"alice": "alice-Fed-1", "bob": "bob-Fed-2"}

START_TIMEOUT = 30.0     # peer start (ejabberd boots an Erlang VM: a few s)
STOP_TIMEOUT = 10.0      # exit after SIGTERM, then SIGKILL
CTL_TIMEOUT = 30.0       # prosodyctl / ejabberdctl invocations

SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
PROSODY_BIN = shutil.which("prosody") or "/usr/bin/prosody"
PROSODYCTL = shutil.which("prosodyctl") or "/usr/bin/prosodyctl"
EJABBERDCTL = shutil.which("ejabberdctl") or "/usr/sbin/ejabberdctl"
BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _run(argv, timeout=CTL_TIMEOUT, what=None, **kw):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout, **kw)
    assert r.returncode == 0, "%s failed (rc=%s):\n%s" % (what or " ".join(map(str, argv)),
                                                          r.returncode, r.stdout)
    return r.stdout


def _lua_str(s):
    return '"%s"' % str(s).replace("\\", "\\\\").replace('"', '\\"')


# ------------------------------------------------------------------ addresses

def _can_bind(addr, port, kind):
    try:
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
        return True
    except OSError:
        return False


def pick_base(pid=None, tries=32):
    """'127.<a>.<b>' for this run: derived from the pid (so concurrent runs
    differ), a in 16..239 and never 127.0.x / 127.255.x; moves on while the
    DNS address of a candidate is already in use (another run)."""
    pid = os.getpid() if pid is None else pid
    n = pid
    for _ in range(tries):
        a, b = 16 + (n >> 8) % 224, n & 0xFF
        base = "127.%d.%d" % (a, b)
        dns = "%s.%d" % (base, DNS_OCTET)
        if (_can_bind(dns, 53, socket.SOCK_DGRAM) and _can_bind(dns, 53, socket.SOCK_STREAM)
                and _can_bind("%s.%d" % (base, HOST_OCTET[PROSODY]), S2S_PORT, socket.SOCK_STREAM)):
            return base
        n += 7919
    raise AssertionError("no free 127.x.y.0/24 base found after %d tries" % tries)


class FedNet:
    """Addresses and DNS data of one run."""

    def __init__(self, base=None, domains=DOMAINS):
        self.base = base or pick_base()
        self.domains = tuple(domains)
        self.dns_addr = "%s.%d" % (self.base, DNS_OCTET)
        self.dns_port = 53
        self.client_addr = "%s.%d" % (self.base, CLIENT_OCTET)
        self._ports = {d: S2S_PORT for d in self.domains}

    @property
    def dns_server(self):
        """For xmppd: dns_servers = "<this>"."""
        return "%s:%d" % (self.dns_addr, self.dns_port)

    def addr(self, domain):
        return "%s.%d" % (self.base, HOST_OCTET[domain])

    def s2s_port(self, domain):
        return self._ports[domain]

    def set_s2s_port(self, domain, port):
        """Advertise another s2s port in the SRV record (before dnsmasq starts)."""
        self._ports[domain] = port

    def srv(self, domain):
        """(target, port) of _xmpp-server._tcp.<domain>."""
        return domain, self._ports[domain]

    def dnsmasq_records(self):
        args = []
        for d in self.domains:
            args.append("--host-record=%s,%s" % (d, self.addr(d)))
            args.append("--srv-host=_xmpp-server._tcp.%s,%s,%d,0,5" % (d, d, self._ports[d]))
        return args

    def resolv_conf_text(self):
        return ("# federation test resolver (bind-mounted in a private mount namespace)\n"
                "nameserver %s\noptions timeout:2 attempts:2\n" % self.dns_addr)


# ------------------------------------------------------------------ certificates

class DomainCert:
    """Paths for one domain. bundle = cert + key in one PEM (ejabberd's format)."""

    def __init__(self, d, domain):
        p = Path(d)
        self.domain = domain
        self.key = str(p / "key.pem")
        self.cert = str(p / "cert.pem")
        self.bundle = str(p / "bundle.pem")
        self.wrong_name = "not-" + domain
        self.wrong_cert = str(p / "wrong-cert.pem")            # CA-signed, SAN not-<domain>
        self.wrong_bundle = str(p / "wrong-bundle.pem")
        self.selfsigned_cert = str(p / "selfsigned-cert.pem")  # SAN <domain>, not CA-signed
        self.selfsigned_bundle = str(p / "selfsigned-bundle.pem")

    def __repr__(self):
        return "DomainCert(%s)" % self.domain


class FedCerts:
    """ca (CA cert path), ca_key, dir, and certs[domain] -> DomainCert."""

    def __init__(self, dirpath, ca, ca_key, certs):
        self.dir, self.ca, self.ca_key, self.certs = str(dirpath), ca, ca_key, certs

    def __getitem__(self, domain):
        return self.certs[domain]


def _leaf_template(cn, serial):
    return ('cn = "%s"\norganization = "xmppd federation tests"\nserial = %d\n'
            'expiration_days = 30\ndns_name = "%s"\n'
            "tls_www_server\ntls_www_client\nsigning_key\nencryption_key\n" % (cn, serial, cn))


def make_federation_certs(dirpath, domains=DOMAINS):
    """The test CA and, for each domain, key + CA-signed cert (SAN dNSName=domain,
    serverAuth+clientAuth: s2s peers present it as a client cert too), a
    CA-signed cert for not-<domain> and a self-signed cert for domain (same key)."""
    d = Path(dirpath)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    ca_key, ca = d / "ca-key.pem", d / "ca.pem"
    (d / "ca.tmpl").write_text('cn = "xmppd federation test CA"\norganization = "xmppd tests"\n'
                               "serial = 1\nexpiration_days = 30\nca\ncert_signing_key\n"
                               "crl_signing_key\n")

    def certtool(*args):
        _run(["certtool", *map(str, args)], timeout=60, what="certtool " + args[0])

    certtool("--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", ca_key)
    certtool("--generate-self-signed", "--load-privkey", ca_key, "--template", d / "ca.tmpl",
             "--outfile", ca)
    os.chmod(ca, 0o644)
    out = {}
    serial = 100
    for dom in domains:
        dd = d / dom
        dd.mkdir()
        os.chmod(dd, 0o755)
        c = DomainCert(dd, dom)
        certtool("--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", c.key)
        for name, path, signed in ((dom, c.cert, True), (c.wrong_name, c.wrong_cert, True),
                                   (dom, c.selfsigned_cert, False)):
            serial += 1
            tmpl = dd / ("%s.tmpl" % Path(path).stem)
            tmpl.write_text(_leaf_template(name, serial))
            if signed:
                certtool("--generate-certificate", "--load-privkey", c.key,
                         "--load-ca-certificate", ca, "--load-ca-privkey", ca_key,
                         "--template", tmpl, "--outfile", path)
            else:
                certtool("--generate-self-signed", "--load-privkey", c.key,
                         "--template", tmpl, "--outfile", path)
        keytext = Path(c.key).read_text()
        for crt, bundle in ((c.cert, c.bundle), (c.wrong_cert, c.wrong_bundle),
                            (c.selfsigned_cert, c.selfsigned_bundle)):
            Path(bundle).write_text(Path(crt).read_text() + keytext)
        # test-only keys in our private dir; peers get their own 0600 copies
        for p in (c.key, c.bundle, c.wrong_bundle, c.selfsigned_bundle):
            os.chmod(p, 0o600)
        out[dom] = c
    return FedCerts(d, str(ca), str(ca_key), out)


# ------------------------------------------------------------------ processes

def _proc_stats():
    """(pid, ppid, session id) of every process (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        out.append((int(entry), int(fields[1]), int(fields[3])))
    return out


def _children(pid):
    return [p for p, ppid, _ in _proc_stats() if ppid == pid]


def _session_members(sid):
    """Processes of the session we created for a peer (start_new_session:
    session id = the started pid). Only our processes can be in it."""
    return [p for p, _, s in _proc_stats() if s == sid]


class ManagedProcess:
    """One started process tree: own session/process group, stdout+stderr to
    console_log, bounded stop (SIGTERM, wait, SIGKILL the group)."""

    name = "process"

    def __init__(self, workdir):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.dir / "console.log"
        self.proc = None
        self.returncode = None
        self.stop_note = None
        self._console = None
        self._stopped = False

    def _popen(self, argv, env=None, cwd=None):
        self._console = open(self.console_log, "ab")
        self.proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                     stdout=self._console, stderr=subprocess.STDOUT,
                                     env=env if env is not None else dict(BASE_ENV),
                                     cwd=str(cwd or self.dir), start_new_session=True)
        return self.proc

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def term_targets(self):
        """Pids that get SIGTERM (default: the started process)."""
        return [self.proc.pid]

    def _exited(self):
        """Has the started process exited? (without reaping it, so its pid
        stays reserved while we clean up its session)"""
        if self.proc.returncode is not None:
            return True
        try:
            r = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return r is not None and r.si_pid == self.proc.pid

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM, wait up to timeout, then SIGKILL whatever is left of the
        session we started it in.  Idempotent.  Returns the exit code (or a
        string saying it had to be killed)."""
        if self.proc is None or self._stopped:
            return self.returncode
        self._stopped = True
        sid = self.proc.pid
        if not self._exited():
            for pid in self.term_targets():
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout
            while not self._exited() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self._exited():
                self.stop_note = "no exit %.0f s after SIGTERM: SIGKILLed" % timeout
        # leftovers (or everything, after the timeout): by pid, our session only
        for _ in range(3):
            # (the leader itself may be a zombie waiting for proc.wait())
            left = [p for p in _session_members(sid) if not (p == sid and self._exited())]
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.stop_note = (self.stop_note or "") + " (still not reaped after SIGKILL)"
        if self.returncode is None:
            self.returncode = self.stop_note or self.proc.returncode
        if self._console:
            self._console.close()
            self._console = None
        return self.returncode

    # -- logs
    def log_files(self):
        return [self.console_log]

    def log(self):
        parts = []
        for p in self.log_files():
            try:
                parts.append(Path(p).read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "".join(parts)

    def log_marks(self):
        """Current sizes of the log files (for log_since)."""
        marks = {}
        for p in self.log_files():
            try:
                marks[str(p)] = os.path.getsize(p)
            except OSError:
                marks[str(p)] = 0
        return marks

    def log_since(self, marks):
        out = []
        for p in self.log_files():
            try:
                with open(p, "rb") as f:
                    f.seek(marks.get(str(p), 0))
                    data = f.read().decode("utf-8", "replace")
            except OSError:
                continue
            if data:
                out.append("==> %s <==\n%s" % (p, data))
        return "\n".join(out)

    def log_tail(self, lines=200):
        out = []
        for p in self.log_files():
            try:
                text = Path(p).read_text(errors="replace")
            except FileNotFoundError:
                continue
            out.append("==> %s <==\n%s" % (p, "\n".join(text.splitlines()[-lines:])))
        return "\n".join(out)

    def wait_log(self, needle, timeout=10.0, since=None):
        """Wait (bounded) until needle (str) appears in the logs; returns the text."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_since(since) if since is not None else self.log()
            if needle in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError("%s: %r not in log after %.0f s\n%s"
                                     % (self.name, needle, timeout, self.log_tail(80)))
            time.sleep(0.1)


def _wait_ports(mp, endpoints, timeout):
    deadline = time.monotonic() + timeout
    pending = list(endpoints)
    while pending:
        if not mp.running():
            raise AssertionError("%s exited (rc=%s) before listening on %s\n%s"
                                 % (mp.name, mp.proc.returncode, pending, mp.log_tail(120)))
        if time.monotonic() > deadline:
            raise AssertionError("%s not listening on %s after %.0f s\n%s"
                                 % (mp.name, pending, timeout, mp.log_tail(120)))
        pending = [(a, p) for a, p in pending if not port_accepts(a, p)]
        if pending:
            time.sleep(0.1)


# ------------------------------------------------------------------ dnsmasq

class Dnsmasq(ManagedProcess):
    """dnsmasq authoritative for *.test on <base>.53:53 (UDP+TCP), as root,
    no upstream, no /etc/hosts, queries logged to console.log."""

    name = "dnsmasq"

    def __init__(self, workdir, net):
        super().__init__(workdir)
        self.net = net
        self.addr, self.port = net.dns_addr, net.dns_port

    def command(self):
        return [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                "--no-hosts", "--bind-interfaces", "--listen-address=%s" % self.addr,
                "--port=%d" % self.port, "--local=/test/", "--no-negcache",
                "--pid-file=%s" % (self.dir / "dnsmasq.pid"), "--log-facility=-",
                "--log-queries", *self.net.dnsmasq_records()]

    def start(self):
        self._popen(self.command())
        _wait_ports(self, [(self.addr, self.port)], 10)
        return self

    def queries(self):
        """(type, name, source address) of every query logged so far.  The
        peers query from 127.0.0.1; tests should use net.client_addr."""
        out = []
        for line in self.log().splitlines():
            if "query[" in line:
                q = line.split("query[", 1)[1]
                qtype, rest = q.split("] ", 1)
                parts = rest.split()
                out.append((qtype, parts[0], parts[2] if len(parts) > 2 else None))
        return out


# ------------------------------------------------------------------ peers

class Peer(ManagedProcess):
    """A third-party XMPP server for one domain.

    Attributes the rest of the harness (and xmpp_helpers.Client) use:
      domain, host (its 127.x address), c2s_port, s2s_port, ca (test CA path),
      users {jid: password}, dir, resolv_conf.
    cert: which certificate the peer presents: "good" (CA-signed, its
    domain), "wrong" (CA-signed, not-<domain>) or "selfsigned"."""

    name = "peer"
    user = "root"

    def __init__(self, fed, domain, workdir=None, cert="good"):
        super().__init__(workdir or Path(fed.root) / domain)
        self.fed = fed
        self.domain = domain
        self.host = fed.net.addr(domain)
        self.s2s_port = fed.net.s2s_port(domain)
        self.c2s_port = free_port(host=self.host)
        self.starttls_port = self.c2s_port     # xmpp_helpers.Client's name for it
        self.ca = fed.certs.ca
        self.certs = fed.certs[domain]
        self.cert_variant = cert
        self.cert_file, self.bundle_file = self.variant(cert)
        self.users = {}
        self.resolv_conf = self.dir / "resolv.conf"
        self.resolv_conf.write_text(fed.net.resolv_conf_text())
        os.chmod(self.resolv_conf, 0o644)
        self.home = self.dir / "home"
        self.home.mkdir(exist_ok=True)

    def variant(self, which):
        """(cert path, cert+key bundle path) of "good", "wrong" or "selfsigned"."""
        return {
            "good": (self.certs.cert, self.certs.bundle),
            "wrong": (self.certs.wrong_cert, self.certs.wrong_bundle),
            "selfsigned": (self.certs.selfsigned_cert, self.certs.selfsigned_bundle),
        }[which]

    def jid(self, local):
        return "%s@%s" % (local, self.domain)

    def password(self, local):
        return self.users[self.jid(local)]

    def _own(self):
        """Hand the peer's dir to its system user (it runs as that user)."""
        pw = pwd.getpwnam(self.user)
        os.chmod(self.dir, 0o750)
        for root, dirs, files in os.walk(self.dir):
            os.chown(root, pw.pw_uid, pw.pw_gid)
            for n in files + dirs:
                os.chown(os.path.join(root, n), pw.pw_uid, pw.pw_gid)

    def _install(self, src, name):
        """A 0600 copy of a cert/key file in the peer's dir (its user must read it)."""
        dst = self.dir / name
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o600)
        return str(dst)

    def env(self):
        e = dict(BASE_ENV)
        e["HOME"] = str(self.home)
        return e

    def as_user(self, argv):
        """argv run as the peer's system user (no other change)."""
        return [SETPRIV, "--reuid=%s" % self.user, "--regid=%s" % self.user,
                "--init-groups", *argv]

    def in_namespace(self, argv):
        """argv run as the peer's user inside a private mount namespace in which
        our resolv.conf is bind-mounted over /etc/resolv.conf (invisible
        outside: propagation private; the namespace dies with the process)."""
        script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
        return [UNSHARE, "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                str(self.resolv_conf), *self.as_user(argv)]

    def start(self):
        raise NotImplementedError

    def add_users(self, users):
        raise NotImplementedError

    def wait_ready(self, timeout=START_TIMEOUT):
        _wait_ports(self, [(self.host, self.c2s_port), (self.host, self.s2s_port)], timeout)


class ProsodyPeer(Peer):
    """Prosody 0.12 for one domain, run in the foreground (prosody -F) as the
    'prosody' user: Prosody refuses to run as root (mod_posix) unless
    run_as_root = true, and only prosodyctl switches users by itself.

    c2s_cert: another certificate variant for c2s only (c2s_ssl), e.g. a peer
    whose s2s cert is "wrong" but whose users can still log in with "good"."""

    name = "prosody"
    user = "prosody"

    def __init__(self, fed, domain=PROSODY, workdir=None, cert="good", c2s_cert=None,
                 extra_global="", extra_host=""):
        super().__init__(fed, domain, workdir, cert)
        self.config_path = self.dir / "prosody.cfg.lua"
        self.log_path = self.dir / "prosody.log"
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir(exist_ok=True)
        (self.dir / "certs").mkdir(exist_ok=True)   # empty: no auto-discovered certs
        self.cert = self._install(self.cert_file, "%s.crt" % domain)
        self.key = self._install(self.certs.key, "%s.key" % domain)
        self.c2s_cert = (self._install(self.variant(c2s_cert)[0], "c2s-%s.crt" % domain)
                         if c2s_cert else None)
        self.extra_global, self.extra_host = extra_global, extra_host
        self.config_path.write_text(self.config_text())
        self._own()

    def config_text(self):
        q = _lua_str
        return "\n".join([
            "-- generated by federation.py: certificate-only s2s (SASL EXTERNAL)",
            "pidfile = %s" % q(self.dir / "prosody.pid"),
            "data_path = %s" % q(self.data_dir),
            "certificates = %s" % q(self.dir / "certs"),
            "log = { { levels = { min = \"debug\" }, to = \"file\", filename = %s } }"
            % q(self.log_path),
            "plugin_paths = { }",
            "admins = { }",
            # c2s/s2s/presence/message/iq are loaded automatically
            'modules_enabled = { "roster"; "saslauth"; "tls"; "disco"; "ping"; "version";'
            ' "posix" }',
            # no dialback: s2s can only authenticate with SASL EXTERNAL (certs)
            'modules_disabled = { "dialback"; "offline"; "s2s_bidi" }',
            'authentication = "internal_plain"',
            'storage = "internal"',
            "c2s_require_encryption = true",
            "s2s_require_encryption = true",
            "s2s_secure_auth = true",
            "c2s_ports = { %d }" % self.c2s_port,
            "c2s_interfaces = { %s }" % q(self.host),
            "c2s_direct_tls_ports = { }",
            "s2s_ports = { %d }" % self.s2s_port,
            "s2s_interfaces = { %s }" % q(self.host),
            "s2s_direct_tls_ports = { }",
            "http_ports = { }", "https_ports = { }",
            "local_interfaces = { %s }" % q(self.host),
            "s2s_timeout = 15",
            "dns_timeout = 5",
            # trust only the test CA (for s2s peers' certificates)
            "ssl = { cafile = %s; capath = false }" % q(self.ca),
            "s2s_ssl = { cafile = %s; capath = false }" % q(self.ca),
            self.extra_global,
            "",
            "VirtualHost %s" % q(self.domain),
            "    ssl = { certificate = %s; key = %s; cafile = %s; capath = false }"
            % (q(self.cert), q(self.key), q(self.ca)),
            ("    c2s_ssl = { certificate = %s; key = %s }" % (q(self.c2s_cert), q(self.key))
             if self.c2s_cert else ""),
            self.extra_host,
            ""])

    def log_files(self):
        return [self.log_path, self.console_log]

    def start(self, timeout=START_TIMEOUT):
        self._popen(self.in_namespace([PROSODY_BIN, "--config", self.config_path, "-F"]),
                    env=self.env())
        self.wait_ready(timeout)
        return self

    def ctl(self, *args, timeout=CTL_TIMEOUT):
        return _run(self.as_user([PROSODYCTL, "--config", str(self.config_path), *args]),
                    timeout=timeout, env=self.env(), cwd=str(self.dir),
                    what="prosodyctl %s" % args[0])

    def add_users(self, users):
        """{local: password}; works with the server stopped or running."""
        for local, password in users.items():
            self.ctl("register", local, self.domain, password)
            self.users[self.jid(local)] = password


class EjabberdPeer(Peer):
    """ejabberd 23.01 for one domain, via `ejabberdctl ... foreground` run as
    the 'ejabberd' user (as root, ejabberdctl would `su ejabberd` itself).

    No epmd: ERL_DIST_PORT (ejabberdctl.cfg) makes the node listen on a fixed
    distribution port (bound to 127.0.0.1) and ejabberdctl's control nodes
    connect to it directly (-start_epmd false).  Node name and cookie are
    per run; HOME is in the temp dir (so is .erlang.cookie)."""

    name = "ejabberd"
    user = "ejabberd"

    def __init__(self, fed, domain=EJABBERD, workdir=None, cert="good", extra_yml="",
                 modules=None):
        super().__init__(fed, domain, workdir, cert)
        self.conf_dir = self.dir / "conf"
        self.logs_dir = self.dir / "logs"
        self.spool_dir = self.dir / "spool"
        for p in (self.conf_dir, self.logs_dir, self.spool_dir):
            p.mkdir(exist_ok=True)
        self.log_path = self.logs_dir / "ejabberd.log"
        self.error_log_path = self.logs_dir / "error.log"
        self.node = "ejabberd-fed%d-%s@localhost" % (os.getpid(), uniq("n")[2:8])
        self.dist_port = free_port()
        self.cookie = uniq("cookie").replace("-", "")
        self.bundle = self._install(self.bundle_file, "%s.pem" % domain)
        self.extra_yml = extra_yml
        self.modules = modules if modules is not None else {
            "mod_disco": "{}", "mod_ping": "{}", "mod_roster": "{}", "mod_version": "{}"}
        self.config_path = self.conf_dir / "ejabberd.yml"
        self.config_path.write_text(self.config_text())
        (self.conf_dir / "ejabberdctl.cfg").write_text("\n".join([
            "ERLANG_NODE=%s" % self.node,
            "ERL_DIST_PORT=%d" % self.dist_port,
            'ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0 -setcookie %s'
            ' -kernel inet_dist_use_interface {127,0,0,1}"' % self.cookie,
            "EJABBERD_PID_PATH=%s" % (self.dir / "ejabberd.pid"),
            "EJABBERD_BYPASS_WARNINGS=true",
            "CONTRIB_MODULES_PATH=%s" % (self.dir / "contrib"),
            "CONTRIB_MODULES_CONF_DIR=%s" % (self.dir / "contrib-conf"),
            ""]))
        # the Erlang resolver (inet_res) reads this resolv.conf path: inside
        # the peer's mount namespace it is the bind-mounted test one
        (self.conf_dir / "inetrc").write_text(
            '{lookup,["file","native"]}.\n{host,{127,0,0,1}, ["localhost"]}.\n'
            '{file, resolv, "/etc/resolv.conf"}.\n')
        self._own()

    def config_text(self):
        mods = "\n".join("  %s: %s" % (k, v) for k, v in self.modules.items())
        return """\
# generated by federation.py: certificate-only s2s (SASL EXTERNAL, no dialback)
hosts:
  - "{domain}"
loglevel: debug
log_rotate_count: 0
hide_sensitive_log_data: false
certfiles:
  - "{bundle}"
ca_file: "{ca}"
s2s_cafile: "{ca}"
s2s_use_starttls: required
s2s_access: all
s2s_dns_timeout: 5
s2s_dns_retries: 1
s2s_timeout: 30
auth_method: internal
listen:
  -
    port: {c2s_port}
    ip: "{host}"
    module: ejabberd_c2s
    starttls_required: true
  -
    port: {s2s_port}
    ip: "{host}"
    module: ejabberd_s2s_in
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
  announce:
    deny: all
  configure:
    deny: all
api_permissions:
  "console commands":
    from:
      - ejabberd_ctl
    who: all
    what: "*"
{extra}
# no mod_s2s_dialback: s2s can only authenticate with SASL EXTERNAL
modules:
{mods}
""".format(domain=self.domain, bundle=self.bundle, ca=self.ca, c2s_port=self.c2s_port,
           host=self.host, s2s_port=self.s2s_port, extra=self.extra_yml, mods=mods)

    def ctl_argv(self, *args):
        return [EJABBERDCTL, "--config-dir", str(self.conf_dir), "--logs", str(self.logs_dir),
                "--spool", str(self.spool_dir), *args]

    def log_files(self):
        return [self.log_path, self.error_log_path, self.console_log]

    def start(self, timeout=START_TIMEOUT):
        self._popen(self.in_namespace(self.ctl_argv("foreground")), env=self.env(),
                    cwd=self.spool_dir)
        self.wait_ready(timeout)
        return self

    def term_targets(self):
        # ejabberdctl (bash) waits for erl -> beam.smp: SIGTERM the VM (it
        # runs init:stop()), bash exits after it.
        return _children(self.proc.pid) or [self.proc.pid]

    def ctl(self, *args, timeout=CTL_TIMEOUT):
        return _run(self.as_user(self.ctl_argv(*args)), timeout=timeout, env=self.env(),
                    cwd=str(self.spool_dir), what="ejabberdctl %s" % args[0])

    def add_users(self, users):
        """{local: password}; the node must be running (ejabberdctl register)."""
        procs = []
        for local, password in users.items():
            argv = self.as_user(self.ctl_argv("register", local, self.domain, password))
            procs.append((local, password, subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env=self.env(), cwd=str(self.spool_dir))))
        problems = []
        for local, password, p in procs:
            try:
                out, _ = p.communicate(timeout=CTL_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate(5)
                problems.append("%s: timed out" % local)
                continue
            if p.returncode != 0:
                problems.append("%s: rc=%s %s" % (local, p.returncode, out))
            else:
                self.users[self.jid(local)] = password
        assert not problems, "ejabberdctl register failed: %s\n%s" % (problems, self.log_tail(60))


class ExternalPeer:
    """Adapter so a server started elsewhere (e.g. an xmpp_helpers.Server
    running xmppd for xmppd-a.test) gets the federation's log reporting and
    teardown: needs .log_path and .terminate(); name/domain are labels."""

    def __init__(self, server, domain, name="xmppd"):
        self.server, self.domain, self.name = server, domain, name
        self.dir = Path(server.log_path).parent

    def log_files(self):
        return [self.server.log_path]

    log = ManagedProcess.log
    log_marks = ManagedProcess.log_marks
    log_since = ManagedProcess.log_since
    log_tail = ManagedProcess.log_tail

    def stop(self):
        return self.server.terminate()


# ------------------------------------------------------------------ xmppd in the federation

class XmppdPeer:
    """xmppd serving one federation domain: c2s (STARTTLS) on a free port of
    the domain's address, s2s on its SRV port there, DNS through the
    federation's dnsmasq, the domain's CA-signed certificate.

    modules: the modules list; s2s_options: more s2s_external settings (text
    inside its block); static_routes: "DOMAIN=ADDRESS:PORT" strings; extra:
    config text appended (a module's block).  The config is written at once
    (add_users() needs it); change an attribute and call write_config() to
    restart with another.  launch() is what a fixture does: checks, users,
    attach, start.  terminate() is idempotent and returns the exit status
    ("hung" if it had to be killed); start() again restarts it."""

    wait_timeout = 10.0      # wait_log()'s default

    def __init__(self, fed, domain, modules=("c2s", "roster", "offline", "s2s_external"),
                 connect_timeout=5, s2s_options="", static_routes=(), extra="",
                 name="xmppd"):
        self.fed, self.domain, self.name = fed, domain, name
        self.host = fed.net.addr(domain)
        self.c2s_port = free_port(host=self.host)
        self.starttls_port = self.c2s_port
        self.s2s_port = fed.net.s2s_port(domain)
        self.ca = fed.certs.ca
        self.dir = fed.root / uniq("xmppd-%s" % domain)
        self.dir.mkdir(parents=True)
        self.config_path = self.dir / "xmppd.cfg"
        self.log_path = self.dir / "xmppd.log"
        self.modules, self.connect_timeout = modules, connect_timeout
        self.s2s_options, self.static_routes, self.extra = s2s_options, static_routes, extra
        self.users = {}
        self.proc = None
        self._logf = None
        self.write_config()

    def config_text(self):
        c = self.fed.certs[self.domain]
        s2s = "connect_timeout = %d;" % self.connect_timeout
        if self.s2s_options:
            s2s += " " + self.s2s_options
        if self.static_routes:
            s2s += " static_routes = ( %s );" % ", ".join('"%s"' % r for r in self.static_routes)
        listener = '{ stream = "%s"; address = "%s"; port = %d; tls = "starttls"; }'
        return "".join([
            'log_level = "debug";\n',
            'data_dir = "%s";\n' % (self.dir / "data"),
            'module_dir = "%s";\n' % MODULE_DIR,
            'hosts = ( { domain = "%s"; cert = "%s"; key = "%s"; } );\n'
            % (self.domain, c.cert, c.key),
            "listeners = ( %s,\n              %s );\n"
            % (listener % ("c2s", self.host, self.c2s_port),
               listener % ("s2s", self.host, self.s2s_port)),
            "modules = ( %s );\n" % ", ".join('"%s"' % m for m in self.modules),
            's2s_external = { ca_file = "%s"; dns_servers = "%s"; %s };\n'
            % (self.fed.certs.ca, self.fed.net.dns_server, s2s),
            self.extra])

    def write_config(self):
        self.config_path.write_text(self.config_text())

    def jid(self, local):
        return "%s@%s" % (local, self.domain)

    def add_users(self, users):
        for local, pw in users.items():
            r = subprocess.run([str(XMPPCTL), "--config", str(self.config_path), "adduser",
                                self.jid(local), "--password", pw],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            self.users[self.jid(local)] = pw

    def launch(self, users=PEER_USERS, attach=True):
        """Fail the test (not error) when xmppd is not built or something
        serves the domain's s2s address already; create users; with attach,
        register with the federation (its log in failure reports; stopped with
        it at the latest); start."""
        if missing_binaries():
            pytest.fail("xmppd is not built: %s" % missing_binaries(), pytrace=False)
        if port_accepts(self.host, self.s2s_port, 0.3):
            pytest.fail("something already serves %s's s2s address" % self.domain,
                        pytrace=False)
        self.add_users(users)
        if attach:
            self.fed.attach(self, self.domain, name=self.name)
        return self.start()

    def start(self):
        self._logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(XMPPD), "--config", str(self.config_path)],
                                     stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=self._logf)
        _wait_ports(self, [(self.host, self.c2s_port), (self.host, self.s2s_port)], 10)
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout=10):
        """SIGTERM; the exit status ("hung" if it had to be killed)."""
        if self.proc is None:
            return None
        rc = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                rc = "hung"
        if self._logf:
            self._logf.close()
            self._logf = None
        return rc or self.proc.returncode

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines=200):
        return "\n".join(self.log().splitlines()[-lines:])

    def mark(self):
        return len(self.log())

    def wait_log(self, pattern, since=0, timeout=None, count=1):
        """Wait until regex pattern occurs count times in log()[since:];
        returns re.findall's list."""
        timeout = self.wait_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            found = re.findall(pattern, self.log()[since:])
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError("%s %s never logged %r (x%d) after %.0f s\n--- log ---\n%s"
                                     % (self.name, self.domain, pattern, count, timeout,
                                        self.log_tail(80)))
            time.sleep(0.05)


class RawS2S:
    """An s2s stream to `target` (anything with host, s2s_port, domain)
    spoken by hand as `me`, with me's CA-signed certificate unless cert and
    key are given."""

    SUCCESS = r"<success[^>]*/>|<success[^>]*>.*?</success>"

    def __init__(self, fed, target, me=EVIL, cert=None, key=None):
        self.fed, self.target, self.me = fed, target, me
        self.cert = cert or fed.certs[me].cert
        self.key = key or fed.certs[me].key
        self.sock = socket.create_connection((target.host, target.s2s_port), timeout=10)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def expect(self, pattern, timeout=10):
        """What was received up to the end of the first match of pattern."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern, re.S)
        while True:
            m = rx.search(self.buf)
            if m:
                out, self.buf = self.buf[:m.end()], self.buf[m.end():]
                return out
            left = deadline - time.monotonic()
            assert left > 0, "timed out waiting for %r; got %r" % (pattern, self.buf[-500:])
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (ssl.SSLError, ConnectionResetError):
                chunk = b""
            assert chunk, "closed while waiting for %r; got %r" % (pattern, self.buf[-500:])
            self.buf += chunk

    def header(self):
        """A stream header (again after TLS or SASL); what answers it: the
        features, or a stream error."""
        self.send("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                  "xmlns:stream='%s' xmlns:db='jabber:server:dialback' from='%s' to='%s' "
                  "version='1.0'>" % (STREAM_NS, self.me, self.target.domain))
        return self.expect(r"</stream:features>|<stream:features/>|</stream:error>")

    def starttls(self):
        """STARTTLS with our certificate; what answers the new header."""
        self.header()
        self.send("<starttls xmlns='%s'/>" % TLS_NS)
        self.expect(r"<proceed[^>]*/>")
        ctx = ssl.create_default_context(cafile=self.fed.certs.ca)
        ctx.load_cert_chain(self.cert, self.key)
        self.sock = ctx.wrap_socket(self.sock, server_hostname=self.target.domain)
        return self.header()

    def sasl(self, expect=SUCCESS):
        """SASL EXTERNAL up to <success/> (or what `expect` says)."""
        self.send("<auth xmlns='%s' mechanism='EXTERNAL'>%s</auth>"
                  % (SASL_NS, base64.b64encode(self.me.encode()).decode()))
        return self.expect(expect)

    def authenticate(self):
        """STARTTLS, SASL EXTERNAL; the features of the authenticated stream."""
        feats = self.starttls()
        assert b"EXTERNAL" in feats, feats
        self.sasl()
        return self.header()

    def stream_error(self, out=None, timeout=10):
        """The condition of the stream error in out (default: the next one)."""
        out = out or self.expect(r"<stream:error>.*?</stream:error>", timeout)
        assert b"<stream:error>" in out, out
        cond = re.search(rb"<([a-z-]+) xmlns=['\"]urn:ietf:params:xml:ns:xmpp-streams", out)
        return cond.group(1).decode() if cond else out

    def expect_stream_error(self, conditions, timeout=10):
        cond = self.stream_error(timeout=timeout)
        assert cond in conditions, cond
        return cond

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ------------------------------------------------------------------ clients

class FedClient(Client):
    """xmpp_helpers.Client for a federation peer: c2s STARTTLS to peer.host:
    peer.c2s_port, TLS name = the peer's domain, trusting the test CA."""

    async def _connect(self):
        x = self.xmpp
        x.connect(address=(self.server.host, self.server.c2s_port))
        x.default_domain = self.server.domain

    def ping_server(self, timeout=5.0):
        return self.iq(self.server.domain, "<ping xmlns='%s'/>" % PING_NS, timeout=timeout)

    def ping(self, jid, timeout=5.0):
        """XEP-0199 ping to any JID (a remote server, a remote user's full JID)."""
        return self.iq(jid, "<ping xmlns='%s'/>" % PING_NS, timeout=timeout)

    def disco(self, jid, timeout=5.0):
        """disco#info result Iq of jid (sent as a raw IQ, so the reply is checked
        on the wire: returns the Iq; its payload is under DISCO_INFO_NS)."""
        return self.iq(jid, "<query xmlns='%s'/>" % DISCO_INFO_NS, timeout=timeout)

    @property
    def bare_jid(self):
        return str(self.xmpp.boundjid.bare)


# ------------------------------------------------------------------ the run

class Federation:
    """One federation run: temp root, addresses, certificates, dnsmasq, peers."""

    def __init__(self, root=None, base=None, domains=DOMAINS):
        self.root = Path(root or tempfile.mkdtemp(prefix="xmppd-fed-"))
        os.chmod(self.root, 0o755)   # peers run as their own users, below
        self.own_root = root is None
        self.resolv_before = Path("/etc/resolv.conf").read_bytes()
        self.dns = None
        self.peers = {}      # domain -> Peer (started by the harness)
        self.processes = []  # everything to stop, in start order
        self._closed = False
        try:
            self.net = FedNet(base, domains)
            self.certs = make_federation_certs(self.root / "certs", domains)
        except BaseException:
            self.close()
            raise
        # if pytest dies without running teardown: still stop what we started
        atexit.register(self.close)

    def start_dns(self):
        self.dns = Dnsmasq(self.root / "dnsmasq", self.net)
        self.processes.append(self.dns)
        self.dns.start()
        return self.dns

    def add_peer(self, peer, users=None):
        """Start peer (a Peer built with this Federation), create users
        ({local: password}) and register it for logs and teardown."""
        self.processes.append(peer)
        self.peers[peer.domain] = peer
        if isinstance(peer, ProsodyPeer) and users:
            peer.add_users(users)         # offline: before start
            users = None
        peer.start()
        if users:
            peer.add_users(users)
        return peer

    def start_prosody(self, users=PEER_USERS, **kw):
        return self.add_peer(ProsodyPeer(self, **kw), users)

    def start_ejabberd(self, users=PEER_USERS, **kw):
        return self.add_peer(EjabberdPeer(self, **kw), users)

    def stop_peer(self, peer):
        """Stop a peer before the end of the session (frees its address)."""
        rc = peer.stop()
        if self.peers.get(peer.domain) is peer:
            del self.peers[peer.domain]
        return rc

    def attach(self, server, domain, name="xmppd"):
        """Register a server started by the test itself (see ExternalPeer):
        its log is attached to failure reports and it is stopped with the
        federation (use for session-long servers only)."""
        ext = ExternalPeer(server, domain, name)
        self.processes.append(ext)
        return ext

    def log_marks(self):
        return {id(p): p.log_marks() for p in self.processes}

    def logs_since(self, marks):
        out = []
        for p in self.processes:
            text = p.log_since(marks.get(id(p), {}))
            if text:
                out.append(("%s log (%s)" % (p.name, getattr(p, "domain", p.dir)), text))
        return out

    def resolv_conf_unchanged(self):
        return Path("/etc/resolv.conf").read_bytes() == self.resolv_before

    def close(self):
        """Stop everything (reverse order, bounded), remove the temp root.
        Returns {name: exit status}."""
        results = {}
        if self._closed:
            return results
        self._closed = True
        for p in reversed(self.processes):
            try:
                results["%s %s" % (p.name, getattr(p, "domain", ""))] = p.stop()
            except Exception as e:    # keep stopping the others
                results[p.name] = "stop failed: %r" % e
        if self.own_root and not os.environ.get("XMPPD_FED_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)
        return results


# ------------------------------------------------------------------ pytest glue

FED_FIXTURES = {"federation", "prosody_peer", "ejabberd_peer", "fed_clients"}
_CURRENT = {"fed": None, "marks": None}


def _require(*paths):
    if os.geteuid() != 0:
        pytest.skip("the federation harness needs root (port 53, mount namespaces, setpriv)")
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        pytest.skip("not installed: %s" % ", ".join(missing))


@pytest.fixture(scope="session")
def federation():
    """Federation with certificates and dnsmasq running (no peers yet)."""
    _require(DNSMASQ, UNSHARE, SETPRIV, shutil.which("certtool") or "/usr/bin/certtool")
    fed = Federation()
    _CURRENT["fed"] = fed
    try:
        fed.start_dns()
        yield fed
    finally:
        results = fed.close()
        _CURRENT["fed"] = None
        # a peer that had to be SIGKILLed is worth a line in -rs output
        bad = {k: v for k, v in results.items() if isinstance(v, str)}
        if bad:
            print("federation teardown: %s" % bad)


@pytest.fixture(scope="session")
def prosody_peer(federation):
    """Running Prosody for prosody.test with PEER_USERS."""
    _require(PROSODY_BIN, PROSODYCTL)
    return federation.start_prosody()


@pytest.fixture(scope="session")
def ejabberd_peer(federation):
    """Running ejabberd for ejabberd.test with PEER_USERS."""
    _require(EJABBERDCTL)
    return federation.start_ejabberd()


@pytest.fixture(scope="session")
def fed_loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def fed_clients(fed_loop):
    """make(peer, user, resource=None, login=True, password=None) -> FedClient
    (logged in and available unless login=False). Closed at teardown."""
    made = []

    def make(peer, user, resource=None, login=True, password=None):
        jid = "%s/%s" % (peer.jid(user) if "@" not in user else user, resource or uniq("r"))
        bare = jid.split("/")[0]
        c = FedClient(fed_loop, peer, jid, password or peer.users[bare])
        made.append(c)
        if login:
            c.must_login(timeout=15)
            c.send_presence()
        return c

    yield make
    for c in made:
        c.close()


def pytest_runtest_setup(item):
    fed = _CURRENT["fed"]
    _CURRENT["marks"] = fed.log_marks() if fed else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure of a test using the federation, attach what every peer
    (and dnsmasq) logged since the test started."""
    outcome = yield
    rep = outcome.get_result()
    fed = _CURRENT["fed"]
    if not rep.failed or fed is None or not (FED_FIXTURES & set(item.fixturenames)):
        return
    marks = _CURRENT["marks"] or {}
    for title, text in fed.logs_since(marks):
        lines = text.splitlines()
        if len(lines) > 400:
            text = "[... %d lines ...]\n" % (len(lines) - 400) + "\n".join(lines[-400:])
        rep.sections.append((title, text))
