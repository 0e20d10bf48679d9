#!/usr/bin/env bash
# The README's main job, on embedded defaults and loopback only.
# Today (issue 2 and 3 landed) it shows cvtpm as a swtpm drop-in with sealed
# state, driven by tpm2-tools, and a simulated HYGON CSV report checked by the
# CSV verifier. It leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/bin/cvtpm
work=$(mktemp -d /tmp/cvtpm-demo.XXXXXX)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }

export TPM2TOOLS_TCTI="swtpm:path=$work/tpm.sock"
start() {
  "$BIN" socket --tpm2 --tpmstate dir="$work/state" \
    --key file="$work/state.key",format=hex,mode=aes-256-gcm \
    --server type=unixio,path="$work/tpm.sock" \
    --ctrl type=unixio,path="$work/tpm.sock.ctrl" \
    --flags not-need-init,startup-clear --log file="$work/cvtpm.log",level=2 &
  pid=$!
  for _ in $(seq 100); do [ -S "$work/tpm.sock" ] && [ -S "$work/tpm.sock.ctrl" ] && return 0; sleep 0.05; done
  echo "cvtpm did not start; its log:"; cat "$work/cvtpm.log"; exit 1
}

step "1. Start cvtpm as a swtpm drop-in (state sealed with AES-256-GCM)"
mkdir -p "$work/state"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/state.key"
start
say "cvtpm socket is listening on $work/tpm.sock (pid $pid); tpm2-tools talk to it through the swtpm TCTI."

step "2. Ask the TPM for random bytes"
say "tpm2_getrandom 16 -> $(tpm2_getrandom --hex 16)"

step "3. Measure something into PCR 16"
tpm2_pcrextend 16:sha256=$(printf 'hello from cvtpm' | sha256sum | cut -d' ' -f1)
say "PCR 16 (sha256) is now $(tpm2_pcrread sha256:16 | awk '/16 *:/ {print $2}')"

step "4. Create an endorsement key and an attestation key, then sign a quote"
tpm2_createek -c "$work/ek.ctx" -G ecc -u "$work/ek.pub" >/dev/null
tpm2_createak -C "$work/ek.ctx" -c "$work/ak.ctx" -G ecc -g sha256 -s ecdsa -u "$work/ak.pub" -f pem >/dev/null
# No resource manager sits between tpm2-tools and the TPM here (as with
# swtpm): free the three transient object slots the tools left loaded.
tpm2_flushcontext -t
say "EK (ECC P-256) and AK (ECDSA, restricted signing) created."
nonce=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
tpm2_quote -c "$work/ak.ctx" -l sha256:0,16 -q "$nonce" -m "$work/q.msg" -s "$work/q.sig" -o "$work/q.pcrs" -g sha256 >/dev/null
tpm2_checkquote -u "$work/ak.pub" -m "$work/q.msg" -s "$work/q.sig" -f "$work/q.pcrs" -g sha256 -q "$nonce" >/dev/null
say "quote over PCRs 0 and 16 with nonce $nonce: signature and nonce check out (tpm2_checkquote)."

step "5. Store a secret in NV, restart the TPM, read it back"
secret="cvtpm-demo-secret-$(date +%s)"
tpm2_nvdefine 0x1500016 -C o -s ${#secret} -a "ownerread|ownerwrite|authread|authwrite" >/dev/null
printf '%s' "$secret" > "$work/secret"
tpm2_nvwrite 0x1500016 -C o -i "$work/secret"
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
say "stopped cvtpm; state files: $(cd "$work/state" && ls | tr '\n' ' ')"
if grep -rqa "$secret" "$work/state"; then
  say "!! the secret is visible in the state files"; exit 1
fi
say "the secret appears in no state file: state at rest is sealed."
start
say "restarted; NV index 0x1500016 reads: $(tpm2_nvread 0x1500016 -C o 2>/dev/null | tr -d '\0')"

step "6. A simulated HYGON CSV report, checked by the CSV verifier"
if "$BIN" csv --help >/dev/null 2>&1; then
  "$BIN" csv simulate --out "$work/csv" --report-data "$(printf 'demo' | od -An -tx1 | tr -d ' \n')" >/dev/null
  say "with the simulator's root trusted explicitly:"
  "$BIN" csv verify --report "$work/csv/report.cert" --hsk-cek "$work/csv/hsk_cek.cert" --root "$work/csv/hrk.cert" | sed 's/^/     /'
  say "with only HYGON's real root trusted (the default), the same report is refused:"
  "$BIN" csv verify --report "$work/csv/report.cert" --hsk-cek "$work/csv/hsk_cek.cert" 2>&1 | sed 's/^/     /' || true
else
  say "(cvtpm csv is not built into this binary yet)"
fi

step "Done: cvtpm stopped, temporary files removed."
