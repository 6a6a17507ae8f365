"""SIGHUP reloads the certificates: new connections get the new one, open
ones keep working, and a broken file keeps the old certificate in service."""

import hashlib
import shutil
import signal
import subprocess
import time
from pathlib import Path

from xmpp_helpers import USERS, RawStream, Server


def new_cert(certs, outdir, serial):
    """Another server certificate for localhost, signed by the test CA."""
    d = Path(outdir)
    d.mkdir(parents=True, exist_ok=True)
    tmpl = d / "server.tmpl"
    tmpl.write_text('cn = "localhost"\nserial = %d\nexpiration_days = 30\n'
                    'dns_name = "localhost"\nip_address = "127.0.0.1"\n'
                    "tls_www_server\nsigning_key\nencryption_key\n" % serial)
    key, cert = d / "key.pem", d / "cert.pem"
    for args in (["--generate-privkey", "--key-type=ecdsa", "--outfile", str(key)],
                 ["--generate-certificate", "--load-privkey", str(key),
                  "--load-ca-certificate", certs["ca"],
                  "--load-ca-privkey", str(Path(certs["dir"]) / "ca-key.pem"),
                  "--template", str(tmpl), "--outfile", str(cert)]):
        subprocess.run(["certtool", *args], check=True, capture_output=True, timeout=60)
    return cert, key


def fingerprint(srv):
    r = RawStream(srv, direct=True)  # verifies the chain against the test CA
    try:
        return hashlib.sha256(r.sock.getpeercert(binary_form=True)).hexdigest(), r
    except Exception:
        r.close()
        raise


def wait_for(pred, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for " + what)


def test_sighup_reloads_certificates(tmp_path, certs, built):
    mine = dict(certs)
    mine["cert"], mine["key"] = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    shutil.copy(certs["cert"], mine["cert"])
    shutil.copy(certs["key"], mine["key"])
    srv = Server(tmp_path / "srv", mine, log_level="info")
    for jid, pw in USERS.items():
        srv.adduser(jid, pw)
    srv.start()
    opened = []
    try:
        before, old = fingerprint(srv)
        opened.append(old)

        cert, key = new_cert(certs, tmp_path / "renewed", serial=77)
        shutil.copy(cert, mine["cert"])
        shutil.copy(key, mine["key"])
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "certificates reloaded" in srv.log(), "the reload log line")

        after, fresh = fingerprint(srv)
        opened.append(fresh)
        assert after != before, "a new connection still got the old certificate"
        assert after == hashlib.sha256(
            subprocess.run(["certtool", "--certificate-info", "--outder", "--infile", str(cert)],
                           capture_output=True, check=True).stdout).hexdigest()

        # The stream opened before the reload still logs in and binds.
        old.login("alice", USERS["alice@localhost"], "before-hup")

        # A broken file: the reload is refused and the renewed cert stays.
        Path(mine["cert"]).write_text("not a certificate\n")
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in srv.log(), "the failed-reload log line")
        still, r = fingerprint(srv)
        opened.append(r)
        assert still == after
        assert srv.running()
    finally:
        for r in opened:
            r.close()
        rc = srv.terminate()
        assert rc == 0, "exit status %s after SIGTERM\n%s" % (rc, srv.log_tail())
