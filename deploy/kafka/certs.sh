#!/usr/bin/env bash
# Development PKI for the local broker: a CA and a broker certificate whose subject alternative
# names cover 127.0.0.1 and localhost (aiokafka checks the host name), packed as PKCS#12 for Kafka.
#   certs.sh OUT_DIR STORE_PASSWORD [EXTRA_SANS]
# EXTRA_SANS: more subject alternative names, comma-separated (compose: DNS:kafka, the name the
# services and the broker's own controller client connect to).
# Idempotent: keeps an existing CA, and the certificate while it carries every name asked for.
# Private keys are written 0600.
set -euo pipefail
out="$1"; pass="$2"; extra="${3:-}"
sans="IP:127.0.0.1,DNS:localhost${extra:+,$extra}"
mkdir -p "$out"; chmod 700 "$out"
umask 077
has_sans() {
  local text name
  text="$(openssl x509 -in "$out/broker.pem" -noout -ext subjectAltName 2>/dev/null)" || return 1
  text="${text//IP Address:/IP:}"
  IFS=',' read -ra names <<< "$sans"
  for name in "${names[@]}"; do
    [[ "$text" == *"$name"* ]] || return 1
  done
}
if [[ -f "$out/broker.p12" && -f "$out/ca.pem" && -f "$out/broker.pem" ]] && has_sans; then
  exit 0
fi
if [[ ! -f "$out/ca.pem" || ! -f "$out/ca.key" ]]; then
openssl req -x509 -newkey rsa:2048 -nodes -days 825 -sha256 \
  -keyout "$out/ca.key" -out "$out/ca.pem" -subj "/CN=RadStream development CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$out/broker.key" -out "$out/broker.csr" \
  -subj "/CN=localhost" 2>/dev/null
cat > "$out/broker.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$sans
EXT
openssl x509 -req -in "$out/broker.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial \
  -days 825 -sha256 -extfile "$out/broker.ext" -out "$out/broker.pem" 2>/dev/null
openssl pkcs12 -export -in "$out/broker.pem" -inkey "$out/broker.key" -certfile "$out/ca.pem" \
  -name broker -out "$out/broker.p12" -passout "pass:$pass"
rm -f "$out/broker.csr" "$out/broker.ext"
chmod 644 "$out/ca.pem"
