"""
An out-of-tree module built only against the installed headers and
pkg-config file (meson install into a tmp DESTDIR), loaded by the server.
"""

import glob
import os
import subprocess
import time

import pytest

from xmpp_helpers import BUILD_DIR, MODULE_DIR, REPO, line_of, port_accepts

HELLO_NS = "urn:xmppd:test:hello"
OOT_SRC = REPO / "tests" / "oot_module" / "mod_oot_hello.c"

BAD_ABI_SRC = r"""
#include <xmppd/module.h>
static int badabi_load(xd_module *m)
{
    (void)m;
    xd_error("BADABI-LOAD-WAS-CALLED");
    return 0;
}
XD_MODULE(badabi) = { .abi = 9999, .name = "badabi", .load = badabi_load };
"""


def run(cmd, env=None, timeout=120):
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    assert r.returncode == 0, "%s failed (rc=%s):\n%s" % (" ".join(map(str, cmd)),
                                                          r.returncode, r.stdout)
    return r.stdout


@pytest.fixture(scope="session")
def installed(tmp_path_factory, built):
    """`meson install --destdir` of the build; returns (destdir, pkg-config env)."""
    dest = tmp_path_factory.mktemp("destdir")
    run(["meson", "install", "-C", str(BUILD_DIR), "--destdir", str(dest), "--no-rebuild",
         "--quiet"])
    pcs = glob.glob(str(dest / "**" / "xmppd.pc"), recursive=True)
    assert pcs, "meson install put no xmppd.pc under %s" % dest
    headers = glob.glob(str(dest / "**" / "include" / "xmppd" / "module.h"), recursive=True)
    assert headers, "meson install put no include/xmppd/module.h under %s" % dest
    env = dict(os.environ)
    env["PKG_CONFIG_PATH"] = os.path.dirname(pcs[0])
    env["PKG_CONFIG_SYSROOT_DIR"] = str(dest)
    return dest, env


def pkg_cflags(env):
    out = run(["pkg-config", "--cflags", "xmppd"], env=env).split()
    return out


def compile_module(env, src, out):
    cflags = pkg_cflags(env)
    # only the installed headers: never the source tree's include/
    assert not any(str(REPO / "include") in f for f in cflags), cflags
    run(["cc", "-shared", "-fPIC", "-Wall", "-Werror", *cflags, str(src), "-o", str(out)], env=env)


@pytest.fixture(scope="session")
def oot_mods(tmp_path_factory, installed):
    """A module dir with the built mod_c2s.so, mod_oot_hello.so and mod_badabi.so."""
    _dest, env = installed
    mods = tmp_path_factory.mktemp("mods")
    os.symlink(MODULE_DIR / "mod_c2s.so", mods / "mod_c2s.so")
    compile_module(env, OOT_SRC, mods / "mod_oot_hello.so")
    bad_src = mods / "mod_badabi.c"
    bad_src.write_text(BAD_ABI_SRC)
    compile_module(env, bad_src, mods / "mod_badabi.so")
    return mods


def hello(client):
    r = client.iq("localhost", "<hello xmlns='%s'/>" % HELLO_NS)
    assert r["type"] == "result", str(r)
    el = r.xml.find("{%s}hello" % HELLO_NS)
    assert el is not None, "result without <hello xmlns='%s'/>: %s" % (HELLO_NS, r)
    return (el.text or ""), int(el.get("sessions", "-1"))


def test_oot_module_answers(xmppd_factory, clients, oot_mods):
    srv = xmppd_factory(module_dir=oot_mods, modules=("c2s", "oot_hello"),
                        extra='oot_hello = { greeting = "hi there"; };')
    alice = clients(srv, "alice@localhost/oot").must_login()
    text, n1 = hello(alice)
    assert text == "hi there", "greeting %r" % text
    assert n1 >= 1, "sessions=%d: the SESSION_START hook did not run" % n1
    bob = clients(srv, "bob@localhost/oot").must_login()
    text, n2 = hello(bob)
    assert text == "hi there"
    assert n2 >= n1 + 1, "sessions went %d -> %d after another login" % (n1, n2)


def wait_refused(srv, timeout=10):
    srv.expect_failure = True
    srv.start(wait=False)
    listened = []
    deadline = time.monotonic() + timeout
    while srv.proc.poll() is None and time.monotonic() < deadline:
        for addr, port, _ in srv.listeners:
            if port_accepts(addr, port, 0.2):
                listened.append(port)
        time.sleep(0.02)
    return srv.wait_exit(0.5), listened


def test_wrong_abi_refused(xmppd_factory, oot_mods):
    srv = xmppd_factory(module_dir=oot_mods, modules=("c2s", "badabi"), start=False, users={})
    rc, listened = wait_refused(srv)
    log = srv.log()
    assert rc == 1, "server with a wrong-ABI module exited %s (expected 1):\n%s" % (rc, log)
    assert not listened, "server listened with a wrong-ABI module"
    assert "badabi" in log, "message does not name the module:\n" + log
    assert "BADABI-LOAD-WAS-CALLED" not in log, "load() of a wrong-ABI module was called"


def test_oot_undeclared_setting_refused(xmppd_factory, oot_mods):
    srv = xmppd_factory(module_dir=oot_mods, modules=("c2s", "oot_hello"), start=False,
                        users={}, extra='oot_hello = {\n    greeting = "x";\n    nope = 1;\n};')
    rc, listened = wait_refused(srv)
    log = srv.log()
    assert rc == 1, "undeclared module setting: exit %s (expected 1):\n%s" % (rc, log)
    assert not listened
    assert "nope" in log, log
    assert "%s:%d" % (srv.config_path.name, line_of(srv.config, "nope = 1;")) in log, log
