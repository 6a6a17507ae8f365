#!/bin/sh
# Build the libFuzzer harnesses into $1 (default: ./fuzz-out).
#   tests/fuzz/build.sh /tmp/fuzz/bin
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-fuzz-out}
mkdir -p "$out"
CC=${CC:-$(command -v clang || command -v clang-14)}
SAN=${SAN:--fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined}
CFLAGS="-g -O1 -fno-omit-frame-pointer -std=gnu11 -D_GNU_SOURCE -I$root/include -I$root/core $SAN"
if printf '#include <expat.h>\nint main(void){return XML_SetReparseDeferralEnabled!=0;}\n' |
   $CC -x c - -o /dev/null -lexpat 2>/dev/null; then
    CFLAGS="$CFLAGS -DHAVE_XML_REPARSE_DEFERRAL"
fi
set -x
$CC $CFLAGS $(pkg-config --cflags libstrophe) -o "$out/fuzz_xmlstream" \
    "$here/fuzz_xmlstream.c" "$root/core/xmlstream.c" $(pkg-config --libs libstrophe expat)
$CC $CFLAGS -o "$out/fuzz_jid" "$here/fuzz_jid.c" "$root/core/jid.c" \
    $(pkg-config --libs libidn2) -lunistring
$CC $CFLAGS $(pkg-config --cflags gnutls) -o "$out/fuzz_scram" \
    "$here/fuzz_scram.c" "$root/core/scram.c" $(pkg-config --libs gnutls)
