#!/bin/sh
# Write DIR/xmppd.cfg: the sample config pointed at this build tree, with
# its data, certificate and list files under DIR (made by dev-cert.sh).
# Used by run-dev.sh and by the test that runs the sample configuration.
set -eu
cd "$(dirname "$0")/.."
dev=$(realpath "$1")
mkdir -p "$dev"
# The JabberSPAM list starts empty in development (no download).
[ -f "$dev/jabberspam-blacklist.txt" ] || : >"$dev/jabberspam-blacklist.txt"
sed -e "s|^data_dir *=.*|data_dir = \"$dev/data\";|" \
    -e "s|^# module_dir *=.*|module_dir = \"$PWD/build/modules\";|" \
    -e "s|cert = \"[^\"]*\"|cert = \"$dev/localhost.crt\"|" \
    -e "s|key = \"[^\"]*\"|key = \"$dev/localhost.key\"|" \
    -e "s|/var/lib/xmppd/|$dev/|" \
    -e "s|/etc/xmppd/patterns.txt|$PWD/config/patterns.txt|" \
    config/xmppd.cfg >"$dev/xmppd.cfg"
