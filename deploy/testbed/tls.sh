#!/usr/bin/env bash
# tls.sh [TESTBED_DIR] -- a private certificate authority and a server
# certificate signed by it, for the tests that go through nginx with TLS
# (tests/test_nginx.py runs its own nginx with deploy/nginx/m2d.conf).
# A real site uses its own certificate; this one is for localhost and
# 127.0.0.1 only, and nothing but the tests trusts the CA.
# State: TESTBED_DIR/tls/{ca.pem,ca.key,server.pem,server.key} (keys 0600).
# Idempotent: a certificate that verifies against the CA and is valid for
# another 30 days is kept.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

set_testbed_dir "${1:-}"
require_root
apt_install openssl
DIR=$TESTBED_DIR/tls
mkdir -p "$DIR"; chmod 755 "$DIR"
cd "$DIR"

valid() {  # valid CERT: signed by our CA, 30 more days to live
  [ -s "$1" ] && openssl verify -CAfile ca.pem "$1" >/dev/null 2>&1 \
    && openssl x509 -in "$1" -noout -checkend $((30 * 86400)) >/dev/null
}

if ! { [ -s ca.key ] && valid ca.pem; }; then
  log "making the test CA"
  (umask 077; openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null)
  openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=m2d testbed CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem
  rm -f server.pem  # signed by the old CA
fi

if ! { [ -s server.key ] && valid server.pem; }; then
  log "making the server certificate (localhost, 127.0.0.1)"
  (umask 077; openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server.key 2>/dev/null)
  openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
  printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days 825 \
    -extfile server.ext -out server.pem 2>/dev/null
  rm -f server.csr server.ext
fi
chmod 600 ca.key server.key
chmod 644 ca.pem server.pem
log "ready: $DIR/server.pem (CA: $DIR/ca.pem)"
