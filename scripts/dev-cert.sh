#!/bin/sh
# Make a self-signed development certificate for localhost in DIR
# (DIR/localhost.crt, DIR/localhost.key), unless one is already there.
set -eu
dir=${1:?usage: dev-cert.sh DIR}
mkdir -p "$dir"
[ -s "$dir/localhost.crt" ] && [ -s "$dir/localhost.key" ] && exit 0
tmpl=$(mktemp)
trap 'rm -f "$tmpl"' EXIT
cat >"$tmpl" <<EOT
cn = "localhost"
dns_name = "localhost"
ip_address = "127.0.0.1"
ip_address = "::1"
expiration_days = 365
tls_www_server
signing_key
EOT
certtool --generate-privkey --key-type=ecdsa --outfile "$dir/localhost.key" 2>/dev/null
certtool --generate-self-signed --load-privkey "$dir/localhost.key" --template "$tmpl" \
    --outfile "$dir/localhost.crt" 2>/dev/null
chmod 600 "$dir/localhost.key"
echo "dev-cert: made $dir/localhost.crt"
