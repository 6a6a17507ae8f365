#!/bin/sh
# Install every package xmppd needs to build and test, on Debian 12.
# Only what is missing is installed; run as root or with sudo available.
set -eu

PKGS="meson ninja-build pkg-config gcc libc6-dev
libev-dev libgnutls28-dev libexpat1-dev libstrophe-dev libdb5.3-dev libconfig-dev
libidn2-dev libunistring-dev libcmocka-dev libc-ares-dev libpcre2-dev libcurl4-gnutls-dev db5.3-util
gnutls-bin python3 python3-slixmpp python3-pytest
dnsmasq-base prosody ejabberd util-linux
python3-omemo python3-twomemo python3-oldmemo python3-xmlschema"

missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing
# The tests start their own Prosody and ejabberd; the packaged services are
# not wanted (they would hold 5222/5269 on every address).
for svc in prosody ejabberd; do
    case " $missing " in
    *" $svc "*) $SUDO service "$svc" stop >/dev/null 2>&1 || true ;;
    esac
done
