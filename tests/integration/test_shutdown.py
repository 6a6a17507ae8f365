"""SIGTERM: every stream gets <system-shutdown/>, the server exits 0."""

import signal

from xmpp_helpers import MALLORY, STOP_TIMEOUT, RawStream


def test_sigterm_sends_system_shutdown(xmppd_factory, clients):
    srv = xmppd_factory(extra_users=[MALLORY])
    raw_c2s = RawStream(srv)                       # authenticated, over STARTTLS
    raw_direct = RawStream(srv, direct=True)       # authenticated, over direct TLS
    raw_pre = RawStream(srv)                       # stream open, not authenticated
    alice = clients(srv, "alice@localhost/shutdown").must_login()
    try:
        raw_c2s.login(MALLORY[0], MALLORY[1], "sd1")
        raw_direct.login(MALLORY[0], MALLORY[1], "sd2")
        raw_pre.open_stream()

        srv.proc.send_signal(signal.SIGTERM)
        for r in (raw_c2s, raw_direct, raw_pre):
            r.expect_stream_error("system-shutdown", timeout=STOP_TIMEOUT)
        alice.wait_disconnected(timeout=STOP_TIMEOUT)
        assert "system-shutdown" in alice.stream_errors, alice.describe()
        rc = srv.proc.wait(STOP_TIMEOUT)
        assert rc == 0, "exit status %s after SIGTERM" % rc
    finally:
        for r in (raw_c2s, raw_direct, raw_pre):
            r.close()


def test_sigterm_idle_server_exits_0(xmppd_factory):
    srv = xmppd_factory()
    srv.proc.send_signal(signal.SIGTERM)
    rc = srv.proc.wait(STOP_TIMEOUT)
    assert rc == 0, "exit status %s after SIGTERM" % rc
