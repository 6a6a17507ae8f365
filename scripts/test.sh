#!/bin/sh
# Install what is missing, build, and run every test: the C unit tests and
# the integration tests (real TLS clients against a real server), once on a
# normal build and once under AddressSanitizer + UndefinedBehaviorSanitizer.
set -eu
cd "$(dirname "$0")/.."
scripts/deps.sh

[ -d build ] || meson setup build
ninja -C build
meson test -C build --print-errorlogs
XMPPD_BUILD_DIR=$PWD/build /usr/bin/python3 -m pytest -q tests/integration

[ -d build-asan ] || meson setup build-asan -Db_sanitize=address,undefined -Db_lundef=false
ninja -C build-asan
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
meson test -C build-asan --print-errorlogs
XMPPD_BUILD_DIR=$PWD/build-asan /usr/bin/python3 -m pytest -q tests/integration
echo "test: all passed"
