#!/bin/sh
# Install what is missing, build, make a development certificate for
# localhost and run xmppd in the foreground on the sample config (ports 5222
# STARTTLS and 5223 direct TLS, storage in build/dev/data).
set -eu
cd "$(dirname "$0")/.."
scripts/deps.sh
[ -d build ] || meson setup build
ninja -C build
dev=$PWD/build/dev
scripts/dev-cert.sh "$dev"
scripts/dev-config.sh "$dev"   # the sample config, pointed at the build tree
build/xmppd --check-config "$dev/xmppd.cfg"
echo "run-dev: add an account with: build/xmppctl --config $dev/xmppd.cfg adduser you@localhost"
exec build/xmppd --config "$dev/xmppd.cfg"
