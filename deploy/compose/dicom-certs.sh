#!/bin/sh
# DICOM TLS for the compose gateway: a server certificate (gateway, localhost, 127.0.0.1) and one
# modality client certificate, both signed by the stack's development CA (mutual TLS).
#   dicom-certs.sh CA_DIR OUT_DIR      (CA_DIR holds ca.pem and ca.key; idempotent)
set -eu
ca="$1"; out="$2"
mkdir -p "$out"; chmod 755 "$out"
umask 077
issue() {  # name extension
  [ -f "$out/$1.pem" ] && return 0
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n%s\n' "$2" > "$out/$1.ext"
  openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$out/$1.key" -out "$out/$1.csr" \
    -subj "/CN=$1" 2>/dev/null
  openssl x509 -req -in "$out/$1.csr" -CA "$ca/ca.pem" -CAkey "$ca/ca.key" -CAcreateserial \
    -days 825 -sha256 -extfile "$out/$1.ext" -out "$out/$1.pem" 2>/dev/null
  rm -f "$out/$1.csr" "$out/$1.ext"
}
issue gateway "extendedKeyUsage=serverAuth
subjectAltName=DNS:gateway,DNS:localhost,IP:127.0.0.1"
issue modality "extendedKeyUsage=clientAuth"
chmod 644 "$out"/*.pem
# the gateway's key: readable by the service user (uid 10001 in deploy/Dockerfile) only
chown 10001 "$out/gateway.key" 2>/dev/null || true
chmod 400 "$out/gateway.key"
