#!/usr/bin/python3
"""
xmppd against Prosody and ejabberd, on this machine, with one load generator.

    /usr/bin/python3 bench/compare.py [--build DIR] [--rounds N] [--quick]
        [--servers xmppd-min,xmppd-full,prosody,ejabberd] [--pairs P]
        [--duration S] [--sessions-big N] [--ejabberd-mam-db mnesia|sqlite]
        [--json FILE] [--keep]

Needs root (Prosody and ejabberd run as their own system users through
setpriv; /proc/<pid>/io of other users' processes), the Debian packages of
scripts/deps.sh (prosody 0.12, ejabberd 23.01, db5.3-util, gnutls-bin,
util-linux) and a build with bench/xmppload (`meson setup build && ninja -C
build`).  --quick (1 round, 3 s steps, 1,000 idle sessions only) takes about
4 minutes; the default run (3 rounds, 10 s steps, 1,000 idle sessions each
round and 10,000 in round 1) about 20 on 2 cores, most of it logins.  The
markdown report goes to stdout, progress to stderr.

The servers
-----------
Each has its own temp dir (config, data, logs), its own free ports on
127.0.0.1 and nothing else: no DNS, no federation, no outgoing connection.
All serve "localhost" with the same certificate (RSA 2048 from a test CA,
tests/integration/xmpp_helpers.make_certs), STARTTLS required on c2s, and
the same listen() backlog, 511 (xmppd's own; ejabberd's default is 5, which
turns a login burst into a measurement of the kernel's SYN retransmit timer,
Prosody's 128).

  xmppd-min    modules ("c2s", "register"): the core, plus in-band
               registration to make the accounts.  No roster, so the
               `roster` step is skipped (a message to a bare JID with an
               available resource is delivered without one).
               register = { open = true; per_ip_per_hour = 0; }.
  xmppd-full   config/xmppd.cfg as shipped, every module it lists (mod_mam too) and
               every other setting at its sample value, except what makes it
               run here (as scripts/dev-config.sh and
               tests/integration/test_sample_config.py do): data_dir,
               module_dir, certificate, the JabberSPAM list in the temp dir,
               config/patterns.txt; listeners on free ports of 127.0.0.1 (c2s
               STARTTLS, c2s direct TLS, s2s; the ::1 one dropped);
               federation pointed at a closed local port (dns_servers and a
               static route for xmppbl.org, so mod_rtbl stays on the machine);
               log_level "warn"; register.open = true,
               register.per_ip_per_hour = 0; mod_ratelimit's ip_connections,
               ip_auth, account_auth, ip_registrations, c2s_stanzas and
               c2s_bytes "off" (one address makes every connection, and a
               benchmark client floods by design).  Any of these that no
               longer matches the sample config stops the run for xmppd-full
               with an error instead of measuring something else.
  prosody      Prosody 0.12 (Debian), `prosody -F` as user prosody.  modules:
               roster saslauth tls disco ping posix register mam carbons
               blocklist smacks csi_simple pep (c2s, s2s, offline load
               themselves), roughly xmppd-full's features.  Debian's defaults
               otherwise: authentication "internal_hashed", storage "internal"
               (files), network_backend epoll (with its default nagle = true).
               MAM: default_archive_policy = true.  Limits: mod_limits not
               loaded (its c2s default is 10 kB/s), allow_registration = true,
               min_seconds_between_registrations = 0 (127.0.0.1 is on the
               registration allowlist anyway); network_settings.tcp_backlog =
               511.  Log: warn and up, to a file.  No s2s or HTTP ports.
  ejabberd     ejabberd 23.01 (Debian), `ejabberdctl foreground` as user
               ejabberd; a per-run node name and cookie, no epmd
               (ERL_DIST_PORT, bound to 127.0.0.1), as
               tests/integration/federation.py runs it.  modules: mod_disco
               mod_ping mod_roster mod_register mod_mam mod_carboncopy
               mod_blocking mod_privacy mod_stream_mgmt mod_client_state
               mod_offline mod_caps mod_pubsub (plugins flat, pep).  Storage:
               Mnesia (default_db); auth_method internal with
               auth_password_format scram and digest-md5/X-OAUTH2 disabled,
               as Debian's /etc/ejabberd/ejabberd.yml.  MAM: mod_mam default:
               always, on Mnesia, or SQLite with --ejabberd-mam-db sqlite
               (what ejabberd's own start-up warning recommends; needs package
               erlang-p1-sqlite3).  Limits: the c2s listener has shaper: none
               and the c2s_shaper rule is none; max_fsm_queue 100000 (default
               10000); registration_timeout: infinity; mod_register ip_access:
               all with an access rule allowing all; max_stanza_size 262144
               (xmppd's), backlog 511; ERL_MAX_PORTS=65536 (ejabberdctl's
               32000 is short of the 2-3 ports per connection of 10,000
               sessions).  acme auto: false (no certificate requests to the
               outside).  loglevel warning.

File descriptors: Prosody, ejabberd and xmppload get RLIMIT_NOFILE
65536/65536 (Debian's ejabberd.service has LimitNOFILE=65536), through
prlimit.  xmppd gets 1024 soft / 65536 hard, what a systemd service gets by
default: raising its soft limit is the server's own job.  Where the script
may not raise a hard limit (no CAP_SYS_RESOURCE), 65536 becomes the hard
limit it has.  The limit each server runs with is in the log and the JSON; a
server that stays at 1024 fails the 10,000-session step, and the report
says so.

The load
--------
<build>/bench/xmppload (C, one thread, libev + GnuTLS; its CLI and JSON are
the contract).  Accounts are made by in-band registration (`xmppload
register`).  u0..u<N-1> serve the idle sessions and logins: registered in
round 1, after which the server's state (data dir; ejabberd's Mnesia spool)
is copied, and every later round starts from that copy, so rounds repeat
the same run instead of measuring an ever bigger archive.  Each
message step of each round gets fresh pair accounts (t<round>x0.., then
r<round>x0..), made mutual contacts in pairs (2k, 2k+1) with `xmppload
roster` where the server has a roster (xmppd-full holds messages from
strangers otherwise): a server that could not keep up puts what it still
owed the previous step's clients in offline storage when they leave, and
that must not be delivered into the next measurement.  The server process
is restarted before each idle-session step and before the message steps
(memory is measured on a fresh process), and before each measurement the
script waits (up to 30 s, recorded as quiet_wait_s) until the server uses
under 5% of a CPU and writes under 256 KiB per 0.5 s: the previous step is
worked off, including the pages its messages dirtied (so the fixed-rate step
measures that rate, not the write-back of the burst before it).

Steps, per server per round (a failing step is reported, not fatal):

  idle-1000, idle-10000   `idle --sessions N --hold 3` (--sessions-big for
               10000): RSS of the server (VmRSS; for ejabberd beam.smp and its
               children) before the logins, and the highest reading during
               the hold that follows "READY" -> KiB per idle session =
               (rss_ready - rss_before) / N.  Shown with the same figure for
               RssAnon alone in parentheses: xmppd's Berkeley DB cache is a
               file mapping, so pages of it that the logins (or the
               checkpointer) touch count in VmRSS although the cache has a
               fixed size.  The 10,000 step runs in round
               1 only unless --big-every-round: memory per session hardly
               varies between rounds, and 10,000 logins to the slower servers
               take over a minute each.
  throughput   `throughput --pairs 50 --window 100 --duration 10`: delivered
               msg/s and latency percentiles.  During it /proc is sampled
               every 0.1 s (utime+stime and write_bytes of the server
               process: xmppd, Prosody's lua5.4, ejabberd's beam.smp) and for
               xmppd `xmppctl stats` every second (storage.log_flushes: the
               server's log flushes, counted by the server itself).  The measured window is [start + setup_s + warmup,
               + seconds] from xmppload's output; deltas between the samples
               inside it over msg/s times their time apart give CPU seconds
               per 10,000 messages, disk bytes written per message, log
               flushes per 1,000 messages.
  rate         `rate --pairs 50 --rate 1000 --duration 10`: p50/p99/p99.9.
  login-PLAIN, login-SCRAM-SHA-1   `login --users 100 --concurrency 20
               --duration 5` with each mechanism: logins/s (TCP + STARTTLS +
               SASL + bind + session + presence).

Rounds interleave the servers (round 1: each server in turn; round 2: again
...).  The report: medians over the rounds that succeeded ("(k/n)" when not
all did), ratios of xmppd-full to the others, steps that failed or counted
errors, the machine and versions.  --json FILE keeps every raw result.

Limits of the method: client and servers share the machine's cores (xmppload
is one thread; with 2 cores the fastest servers are partly measuring the
client), nothing else should run during a run (load average is not checked),
and the disk is whatever /tmp is on.

Everything is bounded: each xmppload run has its --timeout and a subprocess
timeout above it, server starts, waits and stops are bounded, and every
process this script started is stopped in finally/atexit (SIGTERM, then
SIGKILL of its whole session); the temp dir is removed unless --keep.
"""
import argparse
import atexit
import datetime
import glob
import json
import os
import platform
import pwd
import resource
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.dont_write_bytecode = True
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
from xmpp_helpers import make_certs  # noqa: E402  (stdlib only; certtool)

DOMAIN = "localhost"
IDLE_PREFIX = "u"       # u0..u<N-1>: idle sessions and logins
# pairs: fresh accounts for each message step of each round, "t<round>x"
# (throughput) and "r<round>x" (rate), 0..2*pairs-1
PASSWORD = "bench-Pass-2024"
HOST = "127.0.0.1"
CLK = os.sysconf("SC_CLK_TCK")

# RLIMIT_NOFILE: Prosody, ejabberd and xmppload get NOFILE/NOFILE; xmppd gets
# 1024/NOFILE (systemd's default soft limit for a service).  NOFILE is 65536,
# or the hard limit this script has if it may not raise it (a container
# without CAP_SYS_RESOURCE): set by main() through nofile_ceiling().
NOFILE = 65536
XMPPD_SOFT_NOFILE = 1024
# listen() backlog: xmppd's (core/net.c), given to the peers too (ejabberd's
# default is 5, Prosody's 128)
BACKLOG = 511

QUIET_MAX = 30.0         # longest wait for a server to go idle before a step
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
PRLIMIT = shutil.which("prlimit") or "/usr/bin/prlimit"
PROSODY_BIN = shutil.which("prosody") or "/usr/bin/prosody"
EJABBERDCTL = shutil.which("ejabberdctl") or "/usr/sbin/ejabberdctl"
CERTTOOL = shutil.which("certtool") or "/usr/bin/certtool"
BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}

ALL_SERVERS = ("xmppd-min", "xmppd-full", "prosody", "ejabberd")
LABEL = {"xmppd-min": "xmppd-min", "xmppd-full": "xmppd-full",
         "prosody": "prosody+mam", "ejabberd": "ejabberd+mam"}


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


# ------------------------------------------------------------------ /proc

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_accepts(port, timeout=0.5):
    try:
        with socket.create_connection((HOST, port), timeout):
            return True
    except OSError:
        return False


def proc_stats():
    """[(pid, ppid, session id, comm)] of every process."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2:].split()
        out.append((int(entry), int(fields[1]), int(fields[3]), comm))
    return out


def descendants(pid):
    kids, todo, table = [], [pid], proc_stats()
    while todo:
        p = todo.pop()
        for c, pp, _, _ in table:
            if pp == p:
                kids.append(c)
                todo.append(c)
    return kids


def comm_of(pid):
    try:
        return Path("/proc/%d/comm" % pid).read_text().strip()
    except OSError:
        return None


def cpu_seconds(pid):
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def write_bytes(pid):
    for line in Path("/proc/%d/io" % pid).read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return None


def rss_parts(pids):
    """VmRSS and its parts (RssAnon, RssFile, RssShmem) in KiB, summed."""
    total = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    for pid in pids:
        try:
            for line in Path("/proc/%d/status" % pid).read_text().splitlines():
                k = line.split(":", 1)[0]
                if k in total:
                    total[k] += int(line.split()[1])
        except OSError:
            pass
    return total


def stream_probe(port, timeout=5.0):
    """None if a c2s stream opened on port is answered with stream
    features, else what went wrong."""
    try:
        with socket.create_connection((HOST, port), timeout) as s:
            s.settimeout(timeout)
            s.sendall(("<?xml version='1.0'?><stream:stream to='%s' xmlns='jabber:client' "
                       "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
                       % DOMAIN).encode())
            buf, deadline = b"", time.monotonic() + timeout
            while b"</stream:features>" not in buf and b"<stream:features/>" not in buf:
                if time.monotonic() > deadline:
                    return "timed out"
                chunk = s.recv(4096)
                if not chunk:
                    return "closed: %r" % buf[-200:]
                buf += chunk
            s.sendall(b"</stream:stream>")
            return None
    except OSError as e:
        return repr(e)


def wait_quiet(pid, deadline, busy=0.05, period=0.5, writes=256 * 1024):
    """Wait until the process uses under `busy` of a CPU and writes under
    `writes` bytes over `period` (start-up work, or what the previous step
    left to write back, done) or the deadline passes; the seconds waited."""
    t0 = time.monotonic()
    try:
        while time.monotonic() < deadline:
            c0, w0 = cpu_seconds(pid), write_bytes(pid)
            time.sleep(period)
            if ((cpu_seconds(pid) - c0) / period < busy and
                    write_bytes(pid) - w0 < writes):
                break
    except (OSError, TypeError):
        pass
    return round(time.monotonic() - t0, 1)


def nofile_limit(pid):
    try:
        for line in Path("/proc/%d/limits" % pid).read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return "%s/%s" % (soft, hard)
    except OSError:
        pass
    return None


# ------------------------------------------------------------------ processes

LIVE = []   # every Managed that may still run: stopped at exit whatever happens


class Managed:
    """A process started in its own session; stop() = SIGTERM to targets,
    bounded wait, then SIGKILL of whatever is left in that session."""

    def __init__(self, name, argv, log_path, env=None, cwd=None, term_targets=None):
        self.name = name
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env or dict(BASE_ENV), cwd=cwd,
                                     start_new_session=True)
        self.term_targets = term_targets
        LIVE.append(self)

    @property
    def pid(self):
        return self.proc.pid

    def running(self):
        return self.proc.poll() is None

    def stop(self, timeout=STOP_TIMEOUT):
        sid = self.proc.pid
        if self.proc.poll() is None:
            targets = (self.term_targets() if self.term_targets else None) or [sid]
            for p in targets:
                try:
                    os.kill(p, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(3):
            left = [p for p, _, s, _ in proc_stats() if s == sid and p != os.getpid()]
            left = [p for p in left if not (p == sid and self.proc.poll() is not None)]
            if not left:
                break
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self in LIVE:
            LIVE.remove(self)
        self._log.close()
        return self.proc.returncode


def stop_all():
    for m in list(reversed(LIVE)):
        try:
            m.stop(5)
        except Exception as e:  # keep stopping the others
            log("stopping %s: %r" % (m.name, e))


def tail(path, lines=15):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def own(path, user):
    pw = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for n in dirs + files:
            os.chown(os.path.join(root, n), pw.pw_uid, pw.pw_gid)


def nofile_wrap(argv, soft, hard):
    return [PRLIMIT, "--nofile=%d:%d" % (soft, hard), "--", *map(str, argv)]


def nofile_ceiling(want=65536):
    """want, if a child may be given that hard limit, else our own hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= want:
        return want
    r = subprocess.run([PRLIMIT, "--nofile=%d:%d" % (want, want), "--", "true"],
                       capture_output=True, timeout=10)
    return want if r.returncode == 0 else hard


# ------------------------------------------------------------------ servers

class Server:
    """One server under test: start()/stop() as often as needed (new free
    ports and a rewritten config each time), data kept in self.dir across
    rounds.  Subclasses: write_config(), launch() -> Managed, main_pid()
    (the process whose CPU and I/O count), rss_pids(), log_tail()."""

    name = "?"
    has_roster = True
    is_xmppd = False

    def __init__(self, root, certs, build):
        self.dir = Path(root) / self.name
        self.dir.mkdir(parents=True)
        self.certs, self.build = certs, Path(build)
        self.proc = None
        self.port = None
        self.accounts = {}         # prefix -> accounts known to exist
        self.quiet_s = None
        self.snapshotted = False

    def log_path(self):
        return self.dir / "console.log"

    def start(self):
        self.port = free_port()
        self.write_config()
        self.proc = self.launch()
        deadline = time.monotonic() + START_TIMEOUT
        while not port_accepts(self.port):
            if not self.proc.running():
                raise RuntimeError("%s exited (rc=%s) before listening:\n%s"
                                   % (self.name, self.proc.proc.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                raise RuntimeError("%s not listening on %d after %.0f s:\n%s"
                                   % (self.name, self.port, START_TIMEOUT, self.log_tail()))
            time.sleep(0.1)
        # serving XMPP, not just accepting: the stream features come back
        while True:
            err = stream_probe(self.port)
            if err is None:
                break
            if not self.proc.running() or time.monotonic() > deadline:
                raise RuntimeError("%s: no stream features on port %d (%s):\n%s"
                                   % (self.name, self.port, err, self.log_tail()))
            time.sleep(0.5)
        self.quiet_s = wait_quiet(self.main_pid(), time.monotonic() + 30)
        return self

    def stop(self):
        if self.proc is not None:
            rc = self.proc.stop()
            self.proc = None
            return rc

    def restart(self):
        self.stop()
        return self.start()

    def main_pid(self):
        return self.proc.pid

    def rss_pids(self):
        return [self.main_pid()]

    def log_tail(self, lines=15):
        return tail(self.log_path(), lines)

    def db_flushes(self):
        return None

    def state_dirs(self):
        """What holds accounts and data (snapshot after registration)."""
        return [self.data_dir]

    def snapshot(self):
        """Copy the state (server stopped) as it is after registration."""
        self.stop()
        for d in self.state_dirs():
            snap = d.with_name(d.name + ".snapshot")
            shutil.rmtree(snap, ignore_errors=True)
            shutil.copytree(d, snap, symlinks=True)
        self.snapshotted = True
        return {"bytes": sum(f.stat().st_size for d in self.state_dirs()
                             for f in d.rglob("*") if f.is_file())}

    def restore(self):
        """Back to the snapshot (server stopped): every round starts alike."""
        self.stop()
        for d in self.state_dirs():
            shutil.rmtree(d)
            shutil.copytree(d.with_name(d.name + ".snapshot"), d, symlinks=True)


class Xmppd(Server):
    is_xmppd = True

    def __init__(self, root, certs, build):
        super().__init__(root, certs, build)
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "xmppd.cfg"

    def launch(self):
        chk = subprocess.run([str(self.build / "xmppd"), "--check-config", str(self.config_path)],
                             capture_output=True, text=True, timeout=30)
        if chk.returncode != 0:
            raise RuntimeError("xmppd --check-config failed:\n%s%s" % (chk.stdout, chk.stderr))
        return Managed(self.name, nofile_wrap([self.build / "xmppd", "--config",
                                               self.config_path],
                                              min(XMPPD_SOFT_NOFILE, NOFILE), NOFILE),
                       self.log_path(), cwd=str(self.dir))

    def db_flushes(self):
        """Log flushes so far (storage.log_flushes of `xmppctl stats`, which
        asks the running server: its environment is private to it)."""
        r = subprocess.run([str(self.build / "xmppctl"), "--config", str(self.config_path),
                            "stats"], capture_output=True, text=True, timeout=10)
        m = re.search(r"^storage\.log_flushes (\d+)$", r.stdout, re.M)
        return int(m.group(1)) if r.returncode == 0 and m else None


class XmppdMin(Xmppd):
    name = "xmppd-min"
    has_roster = False

    def write_config(self):
        self.config_path.write_text("\n".join([
            "# bench/compare.py: xmppd-min",
            'log_level = "warn";',
            'data_dir = "%s";' % self.data_dir,
            'module_dir = "%s";' % (self.build / "modules"),
            'hosts = ( { domain = "%s"; cert = "%s"; key = "%s"; } );'
            % (DOMAIN, self.certs["cert"], self.certs["key"]),
            'listeners = ( { stream = "c2s"; address = "%s"; port = %d; tls = "starttls"; } );'
            % (HOST, self.port),
            'modules = ( "c2s", "register" );',
            "register = { open = true; per_ip_per_hour = 0; };",
            ""]))


RATELIMIT_OFF = ("ip_connections", "ip_auth", "account_auth", "ip_registrations",
                 "c2s_stanzas", "c2s_bytes")


def full_config(sample, *, data_dir, module_dir, cert, key, files_dir, patterns, c2s_port,
                direct_port, s2s_port, dead):
    """config/xmppd.cfg adapted as the module docstring says.  Every
    substitution must apply (a changed sample fails loudly, not silently)."""
    text = sample

    def sub(rx, repl, flags=re.M, count=0, where=None):
        nonlocal text
        new, n = re.subn(rx, lambda _m: repl, text if where is None else where, count=count,
                         flags=flags)
        if n < 1:
            raise RuntimeError("config/xmppd.cfg no longer has %r" % rx)
        return new

    def block(name):
        m = re.search(r"^%s = \{.*?^\};" % name, text, re.M | re.S)
        if not m:
            raise RuntimeError("config/xmppd.cfg has no %s block" % name)
        return m

    text = sub(r"^log_level = .*$", 'log_level = "warn";')
    text = sub(r"^data_dir *=.*$", 'data_dir = "%s";' % data_dir)
    text = sub(r"^# module_dir *=.*$", 'module_dir = "%s";' % module_dir)
    text = sub(r'cert = "[^"]*"', 'cert = "%s"' % cert)
    text = sub(r'key = "[^"]*"', 'key = "%s"' % key)
    text = sub(r"^listeners = \(.*?^\);", "\n".join([
        "listeners = (",
        '  { stream = "c2s"; address = "%s"; port = %d; tls = "starttls"; },' % (HOST, c2s_port),
        '  { stream = "c2s"; address = "%s"; port = %d; tls = "direct"; },' % (HOST, direct_port),
        '  { stream = "s2s"; address = "%s"; port = %d; tls = "starttls"; }' % (HOST, s2s_port),
        ");"]), flags=re.M | re.S)
    text = sub(r"/var/lib/xmppd/", "%s/" % files_dir)
    text = sub(r"/etc/xmppd/patterns.txt", str(patterns))
    text = sub(r"# dns_servers = .*$", 'dns_servers = "%s";' % dead)
    text = sub(r"# static_routes = .*$", 'static_routes = ( "xmppbl.org=%s" );' % dead)
    m = block("register")
    reg = sub(r"open = \w+;", "open = true;", where=m.group(0))
    reg = sub(r"per_ip_per_hour = \d+;", "per_ip_per_hour = 0;", where=reg)
    text = text[:m.start()] + reg + text[m.end():]
    m = block("ratelimit")
    rl = m.group(0)
    for k in RATELIMIT_OFF:
        rl, n = re.subn(r'^(\s*%s\s*=\s*)"[^"]*";' % k, r'\1"off";', rl, flags=re.M)
        if n != 1:
            raise RuntimeError("config/xmppd.cfg: ratelimit.%s not found" % k)
    text = text[:m.start()] + rl + text[m.end():]
    live = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    left = [ln for ln in live if re.search(r"\b(5222|5223|5269)\b|/etc/xmppd|/var/lib/xmppd", ln)]
    if left:
        raise RuntimeError("a default port or path is left in the full config: %s" % left)
    return "# bench/compare.py: config/xmppd.cfg adapted (see its docstring)\n" + text


class XmppdFull(Xmppd):
    name = "xmppd-full"

    def write_config(self):
        files = self.dir / "files"
        files.mkdir(exist_ok=True)
        jl = files / "jabberspam-blacklist.txt"
        if not jl.exists():
            jl.write_text("")
        self.config_path.write_text(full_config(
            (REPO / "config" / "xmppd.cfg").read_text(), data_dir=self.data_dir,
            module_dir=self.build / "modules", cert=self.certs["cert"], key=self.certs["key"],
            files_dir=files, patterns=REPO / "config" / "patterns.txt", c2s_port=self.port,
            direct_port=free_port(), s2s_port=free_port(), dead="%s:%d" % (HOST, free_port())))


def lua(s):
    return '"%s"' % str(s).replace("\\", "\\\\").replace('"', '\\"')


class Prosody(Server):
    name = "prosody"
    user = "prosody"

    def __init__(self, root, certs, build):
        super().__init__(root, certs, build)
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir()
        (self.dir / "certs").mkdir()      # empty: no auto-discovered certificates
        self.home = self.dir / "home"
        self.home.mkdir()
        for src, dst in ((certs["cert"], "localhost.crt"), (certs["key"], "localhost.key")):
            shutil.copyfile(src, self.dir / dst)
            os.chmod(self.dir / dst, 0o600)
        self.config_path = self.dir / "prosody.cfg.lua"
        self.file_log = self.dir / "prosody.log"

    def write_config(self):
        self.config_path.write_text("\n".join([
            "-- bench/compare.py: prosody+mam (settings explained in its docstring)",
            "pidfile = %s" % lua(self.dir / "prosody.pid"),
            "data_path = %s" % lua(self.data_dir),
            "certificates = %s" % lua(self.dir / "certs"),
            'log = { { levels = { min = "warn" }, to = "file", filename = %s } }'
            % lua(self.file_log),
            "plugin_paths = { }",
            "admins = { }",
            'modules_enabled = { "roster"; "saslauth"; "tls"; "disco"; "ping"; "posix";'
            ' "register"; "mam"; "carbons"; "blocklist"; "smacks"; "csi_simple"; "pep" }',
            'authentication = "internal_hashed"',
            'storage = "internal"',
            "c2s_require_encryption = true",
            "allow_registration = true",
            "min_seconds_between_registrations = 0",
            "default_archive_policy = true",
            "c2s_ports = { %d }" % self.port,
            "c2s_interfaces = { %s }" % lua(HOST),
            "c2s_direct_tls_ports = { }",
            "s2s_ports = { }", "s2s_direct_tls_ports = { }",
            "http_ports = { }", "https_ports = { }",
            "local_interfaces = { %s }" % lua(HOST),
            "network_settings = { tcp_backlog = %d }" % BACKLOG,
            "ssl = { certificate = %s; key = %s }" % (lua(self.dir / "localhost.crt"),
                                                     lua(self.dir / "localhost.key")),
            "",
            "VirtualHost %s" % lua(DOMAIN),
            ""]))
        own(self.dir, self.user)

    def launch(self):
        env = dict(BASE_ENV, HOME=str(self.home))
        argv = [SETPRIV, "--reuid=%s" % self.user, "--regid=%s" % self.user, "--init-groups",
                PROSODY_BIN, "--config", self.config_path, "-F"]
        return Managed(self.name, nofile_wrap(argv, NOFILE, NOFILE), self.log_path(),
                       env=env, cwd=str(self.dir))

    def log_tail(self, lines=15):
        return tail(self.file_log, lines) + "\n" + tail(self.log_path(), lines)


class Ejabberd(Server):
    name = "ejabberd"
    user = "ejabberd"

    mam_db = "mnesia"      # or "sqlite" (--ejabberd-mam-db)

    def __init__(self, root, certs, build):
        super().__init__(root, certs, build)
        self.conf_dir, self.logs_dir, self.spool_dir = (self.dir / n for n in
                                                        ("conf", "logs", "spool"))
        self.home = self.dir / "home"
        for p in (self.conf_dir, self.logs_dir, self.spool_dir, self.home):
            p.mkdir()
        self.bundle = self.dir / "localhost.pem"
        self.bundle.write_text(Path(certs["cert"]).read_text() + Path(certs["key"]).read_text())
        os.chmod(self.bundle, 0o600)
        self.node = "ejabberd-bench%d@localhost" % os.getpid()
        self.cookie = "bench%d%s" % (os.getpid(), os.urandom(8).hex())

    def write_config(self):
        (self.conf_dir / "ejabberdctl.cfg").write_text("\n".join([
            "ERLANG_NODE=%s" % self.node,
            "ERL_DIST_PORT=%d" % free_port(),
            "ERL_MAX_PORTS=65536",
            'ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0 -setcookie %s'
            ' -kernel inet_dist_use_interface {127,0,0,1}"' % self.cookie,
            "EJABBERD_PID_PATH=%s" % (self.dir / "ejabberd.pid"),
            "EJABBERD_BYPASS_WARNINGS=true",
            "CONTRIB_MODULES_PATH=%s" % (self.dir / "contrib"),
            "CONTRIB_MODULES_CONF_DIR=%s" % (self.dir / "contrib-conf"),
            ""]))
        (self.conf_dir / "inetrc").write_text(
            '{lookup,["file","native"]}.\n{host,{127,0,0,1}, ["localhost"]}.\n')
        (self.conf_dir / "ejabberd.yml").write_text("""\
# bench/compare.py: ejabberd+mam (settings explained in its docstring)
hosts:
  - "{domain}"
loglevel: warning
log_rotate_count: 0
certfiles:
  - "{bundle}"
acme:
  auto: false
auth_method: internal
auth_password_format: scram
disable_sasl_mechanisms:
  - "digest-md5"
  - "X-OAUTH2"
max_fsm_queue: 100000
registration_timeout: infinity
{sql}shaper_rules:
  c2s_shaper: none
listen:
  -
    port: {port}
    ip: "{host}"
    module: ejabberd_c2s
    starttls_required: true
    shaper: none
    max_stanza_size: 262144
    backlog: {backlog}
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
  register:
    allow: all
api_permissions:
  "console commands":
    from:
      - ejabberd_ctl
    who: all
    what: "*"
modules:
  mod_disco: {{}}
  mod_ping: {{}}
  mod_roster: {{}}
  mod_register:
    access: register
    ip_access: all
  mod_mam:
    default: always
    db_type: {mam_db_type}
  mod_carboncopy: {{}}
  mod_blocking: {{}}
  mod_privacy: {{}}
  mod_stream_mgmt: {{}}
  mod_client_state: {{}}
  mod_offline: {{}}
  mod_caps: {{}}
  mod_pubsub:
    access_createnode: local
    plugins:
      - flat
      - pep
""".format(domain=DOMAIN, bundle=self.bundle, port=self.port, host=HOST, backlog=BACKLOG,
           mam_db_type="sql" if self.mam_db == "sqlite" else "mnesia",
           sql=('sql_type: sqlite\nsql_database: "%s"\n' % (self.spool_dir / "ejabberd.db")
                if self.mam_db == "sqlite" else "")))
        own(self.dir, self.user)

    def launch(self):
        env = dict(BASE_ENV, HOME=str(self.home))
        argv = [SETPRIV, "--reuid=%s" % self.user, "--regid=%s" % self.user, "--init-groups",
                EJABBERDCTL, "--config-dir", self.conf_dir, "--logs", self.logs_dir,
                "--spool", self.spool_dir, "foreground"]
        m = Managed(self.name, nofile_wrap(argv, NOFILE, NOFILE), self.log_path(),
                    env=env, cwd=str(self.spool_dir), term_targets=self.beam_pids)
        return m

    def beam_pids(self):
        if self.proc is None:
            return []
        return [p for p in descendants(self.proc.pid) if comm_of(p) == "beam.smp"]

    def main_pid(self):
        beams = self.beam_pids()
        if not beams:
            raise RuntimeError("ejabberd: no beam.smp below pid %d" % self.proc.pid)
        return beams[0]

    def rss_pids(self):
        beam = self.main_pid()
        return [beam] + descendants(beam)

    def state_dirs(self):
        return [self.spool_dir]

    def log_tail(self, lines=15):
        return "\n".join(tail(p, lines) for p in (self.logs_dir / "error.log",
                                                   self.logs_dir / "ejabberd.log",
                                                   self.log_path()))


SERVER_CLASSES = {"xmppd-min": XmppdMin, "xmppd-full": XmppdFull, "prosody": Prosody,
                  "ejabberd": Ejabberd}


# ------------------------------------------------------------------ the load

class StepFailed(Exception):
    """A step that did not give its measurement; result: what it did give."""

    def __init__(self, msg, result=None):
        super().__init__(msg)
        self.result = result


class Load:
    """Runs xmppload against one server."""

    def __init__(self, binary, timeout):
        self.binary = Path(binary)
        self.timeout = timeout      # xmppload's own --timeout

    def argv(self, srv, mode, args, mech, prefix, timeout):
        a = [self.binary, "--host", HOST, "--port", srv.port, "--domain", DOMAIN,
             "--prefix", prefix, "--password", PASSWORD, "--timeout", int(timeout)]
        if mech:
            a += ["--mech", mech]
        a += [mode] + list(args)
        return nofile_wrap(a, NOFILE, NOFILE)

    def run(self, srv, mode, args, *, expect_s, prefix, mech=None, on_start=None,
            on_stderr=None, timeout=None):
        """Run one xmppload; its JSON result.  on_start(t0) is called right
        after the spawn; on_stderr(line) for each stderr line.  Bounded by
        expect_s + xmppload's timeout + 30 s."""
        timeout = max(self.timeout, timeout or 0)   # xmppload's own
        argv = self.argv(srv, mode, args, mech, prefix, timeout)
        t0 = time.monotonic()
        p = subprocess.Popen([str(x) for x in argv], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             errors="replace", start_new_session=True)
        errlines, outlines = [], []

        def err_reader():
            for line in p.stderr:
                errlines.append(line.rstrip("\n"))
                del errlines[:-200]
                if on_stderr:
                    on_stderr(line)

        def out_reader():
            for line in p.stdout:
                outlines.append(line)
        readers = [threading.Thread(target=f, daemon=True) for f in (err_reader, out_reader)]
        for r in readers:
            r.start()
        if on_start:
            on_start(t0)
        limit = expect_s + timeout + 30
        try:
            p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            raise StepFailed("xmppload %s: no exit after %.0f s (killed)" % (mode, limit))
        finally:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
            for r in readers:
                r.join(5)
            p.stdout.close()
            p.stderr.close()
        t1 = time.monotonic()
        out = "".join(outlines)
        res = None
        for line in reversed(out.strip().splitlines()):
            try:
                res = json.loads(line)
                break
            except ValueError:
                continue
        if p.returncode != 0 or res is None:
            raise StepFailed("xmppload %s: rc=%s%s\n  stderr: %s\n  server: %s"
                             % (mode, p.returncode, "" if res else ", no JSON",
                                " | ".join(errlines[-6:]),
                                " | ".join(srv.log_tail(6).splitlines()[-6:]) if srv.proc else ""))
        res["_wall_s"] = round(t1 - t0, 3)
        res["_t0"] = t0
        res["_t1"] = t1
        return res


class Sampler(threading.Thread):
    """Samples (t, cpu_s, write_bytes) of a pid every `every` s, and
    (t, flushes) from srv.db_flushes() every `db_every` s."""

    def __init__(self, srv, every=0.1, db_every=1.0):
        super().__init__(daemon=True)
        self.srv, self.pid = srv, srv.main_pid()
        self.every, self.db_every = every, db_every
        self.samples, self.db = [], []
        self.done = threading.Event()

    def take(self):
        t = time.monotonic()
        try:
            self.samples.append((t, cpu_seconds(self.pid), write_bytes(self.pid)))
        except (OSError, IndexError, ValueError):
            pass

    def take_db(self):
        t = time.monotonic()
        try:
            v = self.srv.db_flushes()
        except (OSError, subprocess.SubprocessError):
            v = None
        if v is not None:     # stamped halfway through xmppctl's run
            self.db.append(((t + time.monotonic()) / 2, v))

    def run(self):
        next_db = 0.0
        while not self.done.is_set():
            self.take()
            if self.srv.is_xmppd and time.monotonic() >= next_db:
                self.take_db()
                next_db = time.monotonic() + self.db_every
            self.done.wait(self.every)
        self.take()
        if self.srv.is_xmppd:
            self.take_db()

    def stop(self):
        self.done.set()
        self.join(15)


def window_delta(samples, start, end, idx):
    """(value delta, seconds) between the first sample at/after start and the
    last one at/before end; None if fewer than two samples fall inside."""
    inside = [s for s in samples if start <= s[0] <= end and s[idx] is not None]
    if len(inside) < 2:
        return None
    a, b = inside[0], inside[-1]
    if b[0] - a[0] <= 0:
        return None
    return b[idx] - a[idx], b[0] - a[0]


# ------------------------------------------------------------------ steps

class Bench:
    def __init__(self, args, load):
        self.a, self.load = args, load
        q = args.quick
        self.warmup = 1 if q else 2
        self.duration = args.duration or (3 if q else 10)
        self.hold = 2 if q else 3
        self.login_s = 2 if q else 5
        self.sessions = [1000] if q else [1000, args.sessions_big]
        self.users = max(max(self.sessions), 100)

    def sessions_in(self, rnd):
        """Idle-session steps of round rnd: the big one in round 1 only,
        unless --big-every-round (memory per session hardly varies between
        rounds, and 10,000 logins to a slow server take a minute or more)."""
        if rnd == 1 or self.a.big_every_round:
            return self.sessions
        return self.sessions[:1]

    def register(self, srv, prefix, n):
        if srv.accounts.get(prefix, 0) >= n:
            return None
        t = time.monotonic()
        r = self.load.run(srv, "register", ["--users", n, "--concurrency", 50],
                          prefix=prefix, expect_s=n / 20, timeout=n / 25)
        srv.accounts[prefix] = n
        if n >= 1000:
            log("%s: registered %s0..%s%d in %.1f s" % (srv.name, prefix, prefix, n - 1,
                                                        time.monotonic() - t))
        return r

    def accounts(self, srv):
        """The idle/login accounts, once per server (kept across rounds)."""
        r = self.register(srv, IDLE_PREFIX, self.users)
        return {"register": r, "accounts": dict(srv.accounts)}

    def pairs(self, srv, prefix):
        """Fresh pair accounts for one message step, mutual contacts where
        the server has a roster.  Fresh, so that what a slow server still
        owed the previous step's clients (messages it put in offline
        storage when they left) is not delivered into this one."""
        out = {"register": self.register(srv, prefix, 2 * self.a.pairs)}
        if srv.has_roster:
            out["roster"] = self.load.run(srv, "roster", ["--pairs", self.a.pairs],
                                          prefix=prefix, expect_s=30)
        return out

    def idle(self, srv, n):
        time.sleep(0.5)
        before = rss_parts(srv.rss_pids())
        ready = threading.Event()
        readings = []

        def on_stderr(line):
            if line.startswith("READY"):
                ready.set()

        def watcher():
            # read /proc during the hold: every 0.25 s after READY
            while not ready.wait(0.1):
                if stop.is_set():
                    return
            t_end = time.monotonic() + self.hold
            while time.monotonic() < t_end and not stop.is_set():
                time.sleep(0.25)
                parts = rss_parts(srv.rss_pids())
                if parts["VmRSS"]:
                    readings.append(parts)
        stop = threading.Event()
        w = threading.Thread(target=watcher, daemon=True)
        w.start()
        try:
            res = self.load.run(srv, "idle", ["--sessions", n, "--hold", self.hold],
                                prefix=IDLE_PREFIX, expect_s=self.hold + n / 50,
                                timeout=self.hold + n / 25,
                                on_stderr=on_stderr)
        finally:
            stop.set()
            w.join(5)
        if not ready.is_set():
            raise StepFailed("idle %d: xmppload never printed READY" % n)
        if not readings:
            raise StepFailed("idle %d: no RSS reading during the hold" % n)
        ready = max(readings, key=lambda p: p["VmRSS"])
        res.update(rss_before_kib=before["VmRSS"], rss_ready_kib=ready["VmRSS"],
                   kib_per_session=(ready["VmRSS"] - before["VmRSS"]) / n,
                   rss_parts_before=before, rss_parts_ready=ready,
                   kib_per_session_parts={k: (ready[k] - before[k]) / n for k in ready},
                   anon_kib_per_session=(ready["RssAnon"] - before["RssAnon"]) / n,
                   nofile=nofile_limit(srv.main_pid()))
        return res

    def throughput(self, srv, prefix):
        s = Sampler(srv)
        s.start()
        try:
            res = self.load.run(srv, "throughput",
                                ["--pairs", self.a.pairs, "--window", 100,
                                 "--duration", self.duration, "--warmup", self.warmup],
                                prefix=prefix, expect_s=self.duration + self.warmup + 60)
        finally:
            s.stop()
        mps = res.get("msgs_per_s") or 0
        if mps <= 0:
            # a server too slow for the window: every message sent in the
            # measured window arrived after it (or never).  A result (0 msg/s),
            # with nothing to divide per message.
            res["note"] = ("nothing delivered within the measured window: delivery took "
                           "longer than the run")
            for k in ("p50_ms", "p99_ms", "p999_ms", "max_ms"):
                res[k] = None
            return res
        secs = res.get("seconds") or self.duration
        if "setup_s" in res:
            start = res["_t0"] + res["setup_s"] + self.warmup
            end = start + secs
        else:                       # no setup_s: the last `secs` before exit
            end = res["_t1"]
            start = end - secs
        res["window"] = [round(start - res["_t0"], 3), round(end - res["_t0"], 3)]
        d = window_delta(s.samples, start, end, 1)
        if d:
            res["cpu_s_per_10k"] = d[0] / (mps * d[1]) * 10000
            res["server_cpu_util"] = d[0] / d[1]
        d = window_delta(s.samples, start, end, 2)
        if d:
            res["disk_bytes_per_msg"] = d[0] / (mps * d[1])
        if srv.is_xmppd:
            # 1 s samples: widen by half a period so two fall inside a short window
            d = window_delta(s.db, start - 0.5, end + 0.5, 1)
            if d:
                res["log_flushes_per_1k"] = d[0] / (mps * d[1]) * 1000
        res["whole_run"] = {
            "cpu_s": s.samples[-1][1] - s.samples[0][1] if len(s.samples) > 1 else None,
            "write_bytes": (s.samples[-1][2] - s.samples[0][2]
                            if len(s.samples) > 1 and s.samples[0][2] is not None else None),
            "log_flushes": s.db[-1][1] - s.db[0][1] if len(s.db) > 1 else None}
        return res

    def rate(self, srv, prefix):
        return self.load.run(srv, "rate", ["--pairs", self.a.pairs, "--rate", 1000,
                                           "--duration", self.duration, "--warmup", self.warmup],
                             prefix=prefix, expect_s=self.duration + self.warmup + 60)

    def login(self, srv, mech):
        return self.load.run(srv, "login", ["--users", 100, "--concurrency", 20,
                                            "--duration", self.login_s],
                             prefix=IDLE_PREFIX, mech=mech, expect_s=self.login_s + 30)

    # -- one server, one round
    def server_round(self, srv, rnd, record, failures):
        def step(name, fn, *args, quiet=True):
            t = time.monotonic()
            try:
                waited = None
                if quiet and srv.proc is not None:
                    # what the last step left (queues, offline storage) is done
                    waited = wait_quiet(srv.main_pid(), t + QUIET_MAX)
                r = strip_times(fn(*args))
                if waited is not None:
                    r["quiet_wait_s"] = waited
                record[name] = r
                log("%s r%d %-18s ok  %s" % (srv.name, rnd, name, brief(name, r)))
            except Exception as e:    # a step's failure is reported, never fatal
                if not isinstance(e, (StepFailed, RuntimeError)):
                    e = StepFailed("%s: %s" % (type(e).__name__, e), getattr(e, "result", None))
                record[name] = {"failed": str(e)}
                if getattr(e, "result", None):
                    record[name]["result"] = {k: v for k, v in e.result.items()
                                              if not k.startswith("_t")}
                failures.append({"server": srv.name, "round": rnd, "step": name,
                                 "error": str(e)})
                log("%s r%d %-18s FAILED (%.0f s): %s" % (srv.name, rnd, name,
                                                          time.monotonic() - t, e))
                return False
            return True

        def restore():
            t = time.monotonic()
            srv.restore()
            return {"seconds": round(time.monotonic() - t, 2)}

        def fresh():
            srv.restart()
            pid = srv.main_pid()
            return {"nofile": nofile_limit(pid), "pid": pid, "comm": comm_of(pid),
                    "quiet_after_s": srv.quiet_s}

        try:
            if srv.snapshotted and not step("restore", restore, quiet=False):
                return
            if not step("start", fresh, quiet=False):
                return
            if not step("accounts", self.accounts, srv, quiet=False):
                return
            if not srv.snapshotted and not step("snapshot", srv.snapshot, quiet=False):
                return
            for n in self.sessions_in(rnd):
                if step("restart-idle-%d" % n, fresh, quiet=False):
                    step("idle-%d" % n, self.idle, srv, n)
            if not step("restart-traffic", fresh, quiet=False):
                return
            tp, rp = "t%dx" % rnd, "r%dx" % rnd
            if step("pairs-throughput", self.pairs, srv, tp, quiet=False):
                step("throughput", self.throughput, srv, tp)
            if step("pairs-rate", self.pairs, srv, rp, quiet=False):
                step("rate", self.rate, srv, rp)
            step("login-PLAIN", self.login, srv, "PLAIN")
            step("login-SCRAM-SHA-1", self.login, srv, "SCRAM-SHA-1")
        finally:
            srv.stop()


def strip_times(r):
    """The result without Load.run's monotonic stamps (_t0, _t1), nested too."""
    if isinstance(r, dict):
        return {k: strip_times(v) for k, v in r.items() if k not in ("_t0", "_t1")}
    return r


def brief(name, r):
    if name == "throughput":
        return "%.0f msg/s, cpu %s s/10k, p99 %s ms" % (
            r.get("msgs_per_s", 0), fmt(r.get("cpu_s_per_10k"), 2), fmt(r.get("p99_ms"), 2))
    if name == "rate":
        return "p50 %s p99 %s ms" % (fmt(r.get("p50_ms"), 2), fmt(r.get("p99_ms"), 2))
    if name.startswith("idle"):
        return "%.1f KiB/session (rss %d -> %d KiB, nofile %s)" % (
            r["kib_per_session"], r["rss_before_kib"], r["rss_ready_kib"], r.get("nofile"))
    if name.startswith("login"):
        return "%s logins/s" % fmt(r.get("logins_per_s"), 0)
    if name == "start" or name.startswith("restart"):
        return "%s nofile %s, quiet after %s s" % (r.get("comm"), r.get("nofile"),
                                                   r.get("quiet_after_s"))
    return ""


# ------------------------------------------------------------------ report

def fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000 and digits <= 1:
        return "{:,.0f}".format(v)
    return "%.*f" % (digits, v)


# (column title, step, key, digits)
COLUMNS = [
    ("msg/s", "throughput", "msgs_per_s", 0),
    ("CPU s/10k msg", "throughput", "cpu_s_per_10k", 2),
    ("thr p50/p99/p99.9 ms", "throughput", ("p50_ms", "p99_ms", "p999_ms"), 1),
    ("@1000/s p50/p99/p99.9 ms", "rate", ("p50_ms", "p99_ms", "p999_ms"), 2),
    ("disk B/msg", "throughput", "disk_bytes_per_msg", 0),
    ("log flushes/1k msg", "throughput", "log_flushes_per_1k", 2),
    ("KiB/idle (1k) VmRSS (anon)", "idle-1000", ("kib_per_session", "anon_kib_per_session"), 1),
    ("KiB/idle (big) VmRSS (anon)", "idle-big", ("kib_per_session", "anon_kib_per_session"), 1),
    ("logins/s PLAIN", "login-PLAIN", "logins_per_s", 0),
    ("logins/s SCRAM-SHA-1", "login-SCRAM-SHA-1", "logins_per_s", 0),
]


def medians(rounds, step, key):
    """(median or None, rounds with a value, rounds where the step ran,
    rounds where it failed)"""
    vals, tried, failed = [], 0, 0
    for rec in rounds:
        r = rec.get(step)
        if r is None:
            continue
        tried += 1
        if "failed" in r:
            failed += 1
        elif r.get(key) is not None:
            vals.append(r[key])
    return (statistics.median(vals) if vals else None), len(vals), tried, failed


def summarize(results, big):
    summary = {}
    for name, rounds in results.items():
        s = {}
        for title, step, key, digits in COLUMNS:
            st = "idle-%d" % big if step == "idle-big" else step
            keys = key if isinstance(key, tuple) else (key,)
            for k in keys:
                m, ok, tried, failed = medians(rounds, st, k)
                s["%s.%s" % (st, k)] = {"median": m, "ok": ok, "tried": tried,
                                        "failed": failed}
        summary[name] = s
    return summary


def cell(summary, name, step, key, digits):
    keys = key if isinstance(key, tuple) else (key,)
    parts, note = [], ""
    for k in keys:
        e = summary[name].get("%s.%s" % (step, k))
        if e is None or e["tried"] == 0:
            return "not run"
        if e["median"] is None:
            if keys.index(k) == 0:
                return "FAIL" if e["failed"] == e["tried"] else "-"
            parts.append("-")
            continue
        parts.append(fmt(e["median"], digits) if digits > 1 or e["median"] < 1000
                     else "{:,.0f}".format(e["median"]))
        if e["ok"] < e["tried"]:
            note = " (%d/%d)" % (e["ok"], e["tried"])
    if step.startswith("idle") and len(parts) == 2:
        return "%s (%s)%s" % (parts[0], parts[1], note)
    return "/".join(parts) + note


def machine_info(build=None):
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = "%.1f GiB" % (kb / 1048576)
    except (OSError, AttributeError):
        pass

    def q(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10,
                                  cwd=str(REPO)).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    try:
        pv = Path("/usr/lib/prosody/prosody.version").read_text().strip()
    except OSError:
        pv = q(["dpkg-query", "-W", "-f=${Version}", "prosody"])
    commit = q(["git", "rev-parse", "--short", "HEAD"])
    if q(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += " (+uncommitted changes)"
    try:     # the tree can move on after the build: say when the binary was made
        commit += ", binary built %s" % datetime.datetime.fromtimestamp(
            (Path(build) / "xmppd").stat().st_mtime).astimezone().isoformat(timespec="seconds")
    except (OSError, TypeError):
        pass
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "nproc": os.cpu_count(), "cpu": model, "memory": mem,
            "kernel": platform.release(), "xmppd": commit, "prosody": pv,
            "ejabberd": q(["dpkg-query", "-W", "-f=${Version}", "ejabberd"]),
            "python": platform.python_version(), "loadavg_start": loadavg()}


def loadavg():
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def report(info, summary, results, servers, args, big, failures, settings, elapsed):
    out = []
    out.append("# xmppd vs Prosody vs ejabberd (bench/compare.py)\n")
    out.append("- date: %s; run took %.1f min" % (info["date"], elapsed / 60))
    out.append("- machine: %s CPU(s), %s, %s RAM, kernel %s"
               % (info["nproc"], info["cpu"], info["memory"], info["kernel"]))
    out.append("- load average (1 min) at start %s, at end %s (other work on the machine "
               "skews everything)" % (info.get("loadavg_start"), info.get("loadavg_end")))
    out.append("- xmppd %s, Prosody %s, ejabberd %s"
               % (info["xmppd"], info["prosody"], info["ejabberd"]))
    out.append("- %s; %d round(s), interleaved; medians over rounds; (k/n) = k of n rounds "
               "succeeded" % (settings, args.rounds))
    nof = []
    for name in servers:
        seen = sorted({r.get("nofile") for rec in results[name] for k, r in rec.items()
                       if (k == "start" or k.startswith("restart")) and isinstance(r, dict)
                       and r.get("nofile")})
        nof.append("%s %s" % (LABEL[name], ", ".join(seen) or "?"))
    out.append("- RLIMIT_NOFILE in force after start (soft/hard; xmppd is started with %d "
               "soft and must raise it itself): %s"
               % (min(XMPPD_SOFT_NOFILE, NOFILE), "; ".join(nof)))
    out.append("")
    cols = [c for c in COLUMNS if not (c[1] == "idle-big" and big == 1000)]
    titles = [t.replace("(big)", "(%s)" % human(big)) for t, _, _, _ in cols]
    out.append("| server | " + " | ".join(titles) + " |")
    out.append("|---|" + "---:|" * len(cols))
    for name in servers:
        cells = []
        for title, step, key, digits in cols:
            st = "idle-%d" % big if step == "idle-big" else step
            if key == "log_flushes_per_1k" and not name.startswith("xmppd"):
                cells.append("n/a")
                continue
            cells.append(cell(summary, name, st, key, digits))
        out.append("| %s | %s |" % (LABEL[name], " | ".join(cells)))
    out.append("")
    # ratios
    base = "xmppd-full"
    others = [n for n in ("prosody", "ejabberd", "xmppd-min") if n in servers]
    if base in servers and others:
        rcols = [("msg/s", "throughput.msgs_per_s"), ("CPU/10k msg", "throughput.cpu_s_per_10k"),
                 ("p99 @1000/s", "rate.p99_ms"),
                 ("KiB/idle (%s)" % human(big), "idle-%d.kib_per_session" % big),
                 ("logins/s SCRAM-SHA-1", "login-SCRAM-SHA-1.logins_per_s")]
        out.append("Ratios (xmppd-full / other; msg/s and logins/s: higher is better for "
                   "xmppd-full, the others: lower is better):\n")
        out.append("| ratio | " + " | ".join(t for t, _ in rcols) + " |")
        out.append("|---|" + "---:|" * len(rcols))
        for o in others:
            cells = []
            for _, k in rcols:
                a = summary[base].get(k, {}).get("median")
                b = summary[o].get(k, {}).get("median")
                cells.append(ratio(a, b))
            out.append("| xmppd-full / %s | %s |" % (LABEL[o], " | ".join(cells)))
        out.append("")
    notes = []
    for name in servers:
        for i, rec in enumerate(results[name], 1):
            for st, r in rec.items():
                if isinstance(r, dict) and r.get("errors"):
                    notes.append("- %s round %d %s: xmppload counted %d error(s)"
                                 % (LABEL[name], i, st, r["errors"]))
                if isinstance(r, dict) and r.get("note"):
                    notes.append("- %s round %d %s: %s" % (LABEL[name], i, st, r["note"]))
    if notes:
        out.append("Notes (steps that finished, with errors counted or nothing to measure):\n")
        out.extend(notes)
        out.append("")
    if failures:
        out.append("Failed steps:\n")
        for f in failures:
            first = f["error"].splitlines()[0] if f["error"] else ""
            out.append("- %s round %d %s: %s" % (LABEL[f["server"]], f["round"], f["step"],
                                                first[:300]))
        out.append("")
    return "\n".join(out)


def ratio(a, b):
    if a is None or not b:
        return "-"
    r = a / b
    return "%.2fx" % r if r >= 0.1 else "%.2gx" % r


def human(n):
    return "%dk" % (n // 1000) if n % 1000 == 0 else str(n)


# ------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=str(REPO / "build"),
                    help="meson build dir with xmppd, modules/ and bench/xmppload "
                         "(default: build/ of this repository)")
    ap.add_argument("--xmppload", help="load generator (default: BUILD/bench/xmppload)")
    ap.add_argument("--servers", default=",".join(ALL_SERVERS),
                    help="comma-separated subset of %s" % ",".join(ALL_SERVERS))
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick: 1)")
    ap.add_argument("--quick", action="store_true",
                    help="development run: 1 round, 3 s steps, 1,000 idle sessions only")
    ap.add_argument("--pairs", type=int, default=50, help="sender/receiver pairs (default 50)")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds measured in throughput and rate (default 10; --quick 3)")
    ap.add_argument("--sessions-big", type=int, default=10000,
                    help="the large idle-session step (default 10000)")
    ap.add_argument("--big-every-round", action="store_true",
                    help="run the big idle-session step in every round (default: round 1 "
                         "only)")
    ap.add_argument("--load-timeout", type=float, default=120,
                    help="xmppload --timeout (default 120)")
    ap.add_argument("--ejabberd-mam-db", choices=("mnesia", "sqlite"), default="mnesia",
                    help="ejabberd's MAM backend: mnesia (its default_db; default) or sqlite "
                         "(what ejabberd recommends; needs package erlang-p1-sqlite3)")
    ap.add_argument("--json", help="write every raw result here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in servers if s not in SERVER_CLASSES]
    if bad or not servers:
        ap.error("unknown server(s): %s (known: %s)" % (",".join(bad), ",".join(ALL_SERVERS)))
    if args.rounds < 1 or args.pairs < 1:
        ap.error("--rounds and --pairs must be at least 1")
    build = Path(args.build).resolve()
    xload = Path(args.xmppload).resolve() if args.xmppload else build / "bench" / "xmppload"

    need = [xload, CERTTOOL, PRLIMIT]
    if any(s.startswith("xmppd") for s in servers):
        need += [build / "xmppd", build / "xmppctl", build / "modules" / "mod_c2s.so"]
    if "prosody" in servers:
        need += [PROSODY_BIN, SETPRIV]
    if "ejabberd" in servers:
        need += [EJABBERDCTL, SETPRIV]
        Ejabberd.mam_db = args.ejabberd_mam_db
        LABEL["ejabberd"] = "ejabberd+mam(%s)" % args.ejabberd_mam_db
        if args.ejabberd_mam_db == "sqlite" and not glob.glob("/usr/lib/erlang/lib/p1_sqlite3-*"):
            sys.exit("compare.py: --ejabberd-mam-db sqlite needs package erlang-p1-sqlite3")
    missing = [str(p) for p in need if not os.path.exists(p)]
    if missing:
        sys.exit("compare.py: missing: %s\n(build with `meson setup build && ninja -C build`; "
                 "packages: scripts/deps.sh)" % ", ".join(missing))
    if os.geteuid() != 0 and ("prosody" in servers or "ejabberd" in servers):
        sys.exit("compare.py: needs root (Prosody/ejabberd run as their own users)")

    global NOFILE
    NOFILE = nofile_ceiling(NOFILE)
    if NOFILE < args.sessions_big + 1000:
        log("warning: RLIMIT_NOFILE ceiling %d is low for %d sessions"
            % (NOFILE, args.sessions_big))

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    root = Path(tempfile.mkdtemp(prefix="xmppd-compare-"))
    os.chmod(root, 0o755)          # the peers' users must reach their dirs

    def cleanup():
        stop_all()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    atexit.register(cleanup)

    info = machine_info(build)
    t_start = time.monotonic()
    bench = Bench(args, Load(xload, args.load_timeout))
    results = {s: [] for s in servers}
    failures = []
    try:
        log("temp dir %s; making certificates" % root)
        certs = make_certs(root / "certs")
        os.chmod(root / "certs", 0o755)
        srvs = [SERVER_CLASSES[s](root, certs, build) for s in servers]
        for rnd in range(1, args.rounds + 1):
            for srv in srvs:
                rec = {}
                results[srv.name].append(rec)
                log("round %d/%d: %s" % (rnd, args.rounds, srv.name))
                bench.server_round(srv, rnd, rec, failures)
    except KeyboardInterrupt:
        log("interrupted: reporting what was measured")
    finally:
        stop_all()
    elapsed = time.monotonic() - t_start
    info["loadavg_end"] = loadavg()
    big = bench.sessions[-1]
    summary = summarize(results, big)
    settings = ("throughput: %d pairs, window 100, %gs (+%gs warmup); rate 1000 msg/s %gs; "
                "idle %s sessions (%s), hold %gs; login 100 users, concurrency 20, %gs; "
                "RLIMIT_NOFILE peers/xmppload %d, xmppd %d/%d"
                % (args.pairs, bench.duration, bench.warmup, bench.duration,
                   " and ".join(str(n) for n in bench.sessions),
                   "every round" if len(bench.sessions) == 1 or args.big_every_round
                   else "%d: round 1 only" % big, bench.hold, bench.login_s,
                   NOFILE, min(XMPPD_SOFT_NOFILE, NOFILE), NOFILE))
    text = report(info, summary, results, servers, args, big, failures, settings, elapsed)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": info, "settings": settings, "args": vars(args),
            "servers": {s: {"label": LABEL[s], "rounds": results[s], "median": summary[s]}
                        for s in servers},
            "failures": failures}, indent=1, default=str) + "\n")
        log("raw results in %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
