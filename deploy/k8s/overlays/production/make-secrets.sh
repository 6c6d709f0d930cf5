#!/usr/bin/env bash
# Make this overlay's secrets/ (read by kustomization.yaml; git ignores it): the fleet CA and one
# certificate per role (quantchat deploy certs), one random key per role (quantchat deploy keygen), the
# senders' plain copies and the receivers' hashed entries. Keep secrets/certs/ca-key.pem off the cluster
# (kustomize never reads it). QUANTCHAT=... picks the quantchat command (default: quantchat).
set -euo pipefail
cd "$(dirname "$0")"
Q=${QUANTCHAT:-quantchat}
NS=${NAMESPACE:-quantchat}
umask 077
mkdir -p secrets
$Q deploy certs --out secrets/certs \
    --host quantchat-controller --host "quantchat-controller.$NS.svc" \
    --host "quantchat-controller.$NS.svc.cluster.local" \
    --host "*.quantchat-worker.$NS.svc.cluster.local" \
    --host quantchat-api --host "quantchat-api.$NS.svc" ${API_HOST:+--host "$API_HOST"}
key() {  # NAME: secrets/NAME.secret (plain: the sender's) and secrets/NAME.keys (sha256: the receiver's)
    local out
    out=$($Q deploy keygen)
    sed -n 1p <<<"$out" > "secrets/$1.secret"
    sed -n 2p <<<"$out" > "secrets/$1.keys"
}
key worker
key admin
key api  # clients get secrets/api.secret; the API servers only its hash
echo "wrote $(pwd)/secrets (give clients the key in secrets/api.secret)"
