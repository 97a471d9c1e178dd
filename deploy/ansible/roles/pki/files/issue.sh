#!/bin/sh
# issue.sh DIR NAME CN EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
# Makes DIR/NAME.pem and DIR/NAME-key.pem (EC P-256) signed by DIR/ca.pem, and the CA
# first if DIR has none. Prints "issued" when it made something; an existing
# certificate is kept.
set -eu
dir=$1 name=$2 cn=$3 eku=$4 san=${5:-}
umask 077
mkdir -p "$dir"
if [ ! -f "$dir/ca.pem" ]; then
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" -days "${PKI_CA_DAYS:-3650}" \
        -subj "${PKI_CA_SUBJECT:-/CN=carousel etcd CA}" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    chmod 0644 "$dir/ca.pem"
    echo issued
fi
[ -f "$dir/$name.pem" ] && exit 0
ext=$(mktemp)
trap 'rm -f "$ext" "$dir/$name.csr"' EXIT
{
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [ -n "$san" ] && echo "subjectAltName=$san"
} >"$ext"
openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$dir/$name-key.pem" -out "$dir/$name.csr" -subj "/O=carousel/CN=$cn" 2>/dev/null
openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" -CAcreateserial \
    -out "$dir/$name.pem" -days "${PKI_CERT_DAYS:-825}" -extfile "$ext" 2>/dev/null
chmod 0644 "$dir/$name.pem"
echo issued
