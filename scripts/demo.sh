#!/usr/bin/env bash
# The README's main job, on embedded defaults and loopback only: a simulated
# HYGON CSV chip, cvtpm with sealed state, the EK CA certifying its EKs only
# on CSV evidence, tpm2-tools using the TPM, and refusals when evidence or
# state is not what it should be. It leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/bin/cvtpm
work=$(mktemp -d /tmp/cvtpm-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }
wait_for() { for _ in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done; echo "timed out waiting for $1"; exit 1; }

export TPM2TOOLS_TCTI="swtpm:path=$work/tpm.sock"
start_tpm() {
  "$BIN" socket --tpm2 --tpmstate dir="$work/state" \
    --key file="$work/state.key",format=hex,mode=sm4-gcm \
    --server type=unixio,path="$work/tpm.sock" \
    --ctrl type=unixio,path="$work/tpm.sock.ctrl" \
    --flags not-need-init,startup-clear --log file="$work/cvtpm.log",level=2 &
  tpm_pid=$!; pids+=("$tpm_pid")
  wait_for "$work/tpm.sock.ctrl"; wait_for "$work/tpm.sock"
}
stop_tpm() { kill "$tpm_pid"; wait "$tpm_pid" 2>/dev/null || true; }

measure=$(printf 'cvtpm vTPM CVM image v1' | sha256sum | cut -d' ' -f1)
step "1. A CSV confidential VM for the vTPM backend (simulated HYGON chip)"
"$BIN" csv simulate --out "$work/csv" --measure "$measure" --policy 0x3 >/dev/null
say "chip SIMCHIP0001 with its own (simulated) root; the CVM's launch measurement is $measure,"
say "its policy forbids debugging and key sharing (NODBG, NOKS)."

step "2. Start cvtpm as a swtpm drop-in, state sealed with SM4-GCM"
mkdir -p "$work/state"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/state.key"
start_tpm
say "cvtpm socket listens on $work/tpm.sock (pid $tpm_pid); tpm2-tools use it through the swtpm TCTI."

step "3. Start the EK CA: it trusts this simulated root and approves only this measurement"
cat > "$work/policy.json" <<JSON
{"simulator_roots": ["$work/csv/hrk.cert"], "approved_measurements": ["$measure"]}
JSON
# Chip certificates (HSK+CEK) by chip serial, as HYGON's KDS serves them.
mkdir -p "$work/kds/hsk_cek/SIMCHIP0001" && cp "$work/csv/hsk_cek.cert" "$work/kds/hsk_cek/SIMCHIP0001/"
"$BIN" ca --dir "$work/ca" --policy "$work/policy.json" --cert-dir "$work/kds" \
  --listen 127.0.0.1:0 --http "" 2> "$work/ca.log" &
pids+=($!)
for _ in $(seq 200); do grep -q 'EK CA serving' "$work/ca.log" && break; sleep 0.05; done
ca_addr=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$work/ca.log" | head -1)
say "CA at $ca_addr; its root certificate is $work/ca/ca.pem."

step "4. Enroll: EKs created, bound to a CSV report, certified by the CA, written to NV"
"$BIN" enroll --tpm-socket "$work/tpm.sock" --ca "$ca_addr" --instance demo-vm-1 --csv-sim "$work/csv" | sed 's/^/   /'
tpm2_nvread 0x01c00002 -C o -o "$work/ek-rsa.der" 2>/dev/null
openssl x509 -inform DER -in "$work/ek-rsa.der" -out "$work/ek-rsa.pem"
say "tpm2_nvread 0x01c00002 -> $(openssl verify -CAfile "$work/ca/ca.pem" "$work/ek-rsa.pem" | sed 's/.*: //') under openssl verify against the CA root;"
say "it is a TCG EK certificate: $(openssl x509 -in "$work/ek-rsa.pem" -noout -ext extendedKeyUsage,subjectAltName 2>/dev/null | grep -v ':$' | tr -s ' \n' ' ')"
"$BIN" enroll --tpm-socket "$work/tpm.sock" --ca "$ca_addr" --instance demo-vm-1 --csv-sim "$work/csv" >/dev/null
say "running enroll again changes nothing (the certificates in NV are valid)."

step "5. Use the TPM: random bytes, a measurement, a quote"
say "tpm2_getrandom 16 -> $(tpm2_getrandom --hex 16)"
tpm2_pcrextend 16:sha256=$(printf 'hello from cvtpm' | sha256sum | cut -d' ' -f1)
say "PCR 16 (sha256) is now $(tpm2_pcrread sha256:16 | awk '/16 *:/ {print $2}')"
tpm2_createak -C 0x81010001 -c "$work/ak.ctx" -G ecc -g sha256 -s ecdsa -u "$work/ak.pub" -f pem >/dev/null
tpm2_flushcontext -t  # no resource manager here (as with swtpm): free transient slots
nonce=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
tpm2_quote -c "$work/ak.ctx" -l sha256:0,16 -q "$nonce" -m "$work/q.msg" -s "$work/q.sig" -o "$work/q.pcrs" -g sha256 >/dev/null
tpm2_checkquote -u "$work/ak.pub" -m "$work/q.msg" -s "$work/q.sig" -f "$work/q.pcrs" -g sha256 -q "$nonce" >/dev/null
say "an AK under the certified RSA EK signed a quote of PCRs 0 and 16 for nonce $nonce: tpm2_checkquote accepts it."

step "6. Sealed state: an NV secret survives a restart and is in no file"
secret="cvtpm-demo-secret-$(date +%s)"
tpm2_nvdefine 0x1500016 -C o -s ${#secret} -a "ownerread|ownerwrite|authread|authwrite" >/dev/null
printf '%s' "$secret" > "$work/secret"
tpm2_nvwrite 0x1500016 -C o -i "$work/secret"
stop_tpm
if grep -rqa "$secret" "$work/state"; then say "!! the secret is visible in the state files"; exit 1; fi
say "stopped cvtpm; the secret appears in none of $(cd "$work/state" && ls | tr '\n' ' ')"
start_tpm
say "restarted; NV 0x1500016 reads: $(tpm2_nvread 0x1500016 -C o 2>/dev/null | tr -d '\0')"

step "7. Tamper: what the system refuses, and why"
"$BIN" csv simulate --out "$work/csv-other" --chip SIMCHIP0666 --measure "$measure" --policy 0x3 >/dev/null
mkdir -p "$work/kds/hsk_cek/SIMCHIP0666" && cp "$work/csv-other/hsk_cek.cert" "$work/kds/hsk_cek/SIMCHIP0666/"
"$BIN" socket --tpm2 --tpmstate dir="$work/state2" --server type=unixio,path="$work/tpm2.sock" \
  --ctrl type=unixio,path="$work/tpm2.sock.ctrl" --flags not-need-init,startup-clear &
pids+=($!)
wait_for "$work/tpm2.sock"
say "a second vTPM, in a CVM on a chip whose root the CA does not trust, asks for an EK certificate:"
"$BIN" enroll --tpm-socket "$work/tpm2.sock" --ca "$ca_addr" --instance demo-vm-2 --csv-sim "$work/csv-other" 2>&1 \
  | sed -n 's/.*desc = \(.*\)/\1/p' | cut -c1-150 | sed 's/^/     /' || true
printf 'x' | dd of="$work/state/cvtpm.permall" bs=1 seek=100 conv=notrunc 2>/dev/null
stop_tpm
say "one byte of the sealed permanent state was flipped; cvtpm refuses to start on it:"
"$BIN" socket --tpm2 --tpmstate dir="$work/state" --key file="$work/state.key",mode=sm4-gcm \
  --ctrl type=unixio,path="$work/x.ctrl" 2>&1 | sed 's/^/     /' || true
say "and the simulated CSV evidence is refused by a verifier that trusts only HYGON's real root:"
"$BIN" csv verify --report "$work/csv/report.cert" --hsk-cek "$work/csv/hsk_cek.cert" 2>&1 | sed 's/^/     /' || true

step "Done: everything stopped, temporary files removed."
