#!/bin/sh
# Make the TLS and SuperNode-authentication material of a thorn/Flower deployment (POSIX sh: runs on
# the host or in docker/certs.yml's container). Needs openssl and ssh-keygen.
#
#   docker/gen-certs.sh [OUT_DIR]          (default OUT_DIR: docker/certs)
#
# Writes OUT_DIR/certificates/{ca.crt,ca.key,server.pem,server.key}: a CA and the SuperLink's server
# certificate for DNS:superlink (the compose service name), DNS:localhost, IP:127.0.0.1, IP:::1, plus
# $SUPERLINK_IP / $SUPERLINK_DNS (the SuperLink machine's address as other machines use it), and
# OUT_DIR/keys/supernode-<i>{,.pub} for i in 0..NUM_SUPERNODES-1: ECDSA P-384 OpenSSH key pairs.
# Register each .pub with `flwr supernode register <key>.pub <connection>`; give each private key only
# to its SuperNode. KEY_OWNER=uid:gid (as root) hands the private keys to that user, e.g. 49999:49999,
# the user of Flower's images. Existing files are kept (registered keys stay valid); FORCE=1 remakes them.
set -eu
OUT=${1:-$(dirname "$0")/certs}
N=${NUM_SUPERNODES:-3}
DAYS=${CERT_DAYS:-365}
CERTS="$OUT/certificates"
KEYS="$OUT/keys"
mkdir -p "$CERTS" "$KEYS"
umask 077

san="DNS:superlink,DNS:localhost,IP:127.0.0.1,IP:::1"
[ -n "${SUPERLINK_IP:-}" ] && san="$san,IP:$SUPERLINK_IP"
[ -n "${SUPERLINK_DNS:-}" ] && san="$san,DNS:$SUPERLINK_DNS"

if [ "${FORCE:-0}" = 1 ] || [ ! -f "$CERTS/server.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 -days "$DAYS" \
    -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" -subj "/O=thorn/CN=thorn deployment CA" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes \
    -keyout "$CERTS/server.key" -out "$CERTS/server.csr" -subj "/O=thorn/CN=superlink" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$CERTS/server.ext"
  openssl x509 -req -in "$CERTS/server.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" -CAcreateserial \
    -out "$CERTS/server.pem" -days "$DAYS" -sha384 -extfile "$CERTS/server.ext" 2>/dev/null
  rm -f "$CERTS/server.csr" "$CERTS/server.ext" "$CERTS/ca.srl"
  chmod 644 "$CERTS/ca.crt" "$CERTS/server.pem"
  echo "gen-certs: $CERTS/{ca.crt,server.pem,server.key} (SAN $san)"
else
  echo "gen-certs: keeping $CERTS/server.pem (FORCE=1 remakes it)"
fi

i=0
while [ "$i" -lt "$N" ]; do
  key="$KEYS/supernode-$i"
  if [ "${FORCE:-0}" = 1 ] || [ ! -f "$key" ]; then
    rm -f "$key" "$key.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "thorn-supernode-$i" -f "$key"
    chmod 644 "$key.pub"
    echo "gen-certs: $key{,.pub}"
  fi
  i=$((i + 1))
done

if [ -n "${KEY_OWNER:-}" ]; then
  chown "$KEY_OWNER" "$CERTS/server.key" "$KEYS"/supernode-* 2>/dev/null \
    || echo "gen-certs: could not chown to $KEY_OWNER (run as root); the containers' user must be able to read the keys"
fi
