#!/usr/bin/env bash
# The README's main job, on embedded defaults and loopback only: a vTPM
# backend in a (simulated) HYGON CSV confidential VM, the EK CA certifying an
# instance's EKs only on CSV evidence, the host's frontend relaying a guest's
# end-to-end attested session it cannot read, tpm2-tools in the "guest", a
# crashed worker restarted from sealed state, the host trying to take and
# replace the instance's state, and refusals when evidence is not what it
# should be. It leaves nothing running.
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
wait_for() { for _ in $(seq 300); do [ -e "$1" ] && return 0; sleep 0.05; done; echo "timed out waiting for $1"; exit 1; }
wait_log() { for _ in $(seq 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done; echo "timed out waiting for '$2' in $1"; cat "$1"; exit 1; }

measure=$(printf 'cvtpm vTPM CVM image v1' | sha256sum | cut -d' ' -f1)
step "1. A CSV confidential VM for the vTPM backend (simulated HYGON chip)"
"$BIN" csv simulate --out "$work/csv" --measure "$measure" --policy 0x7 >/dev/null
say "chip SIMCHIP0001 with its own (simulated) root; the CVM's launch measurement is $measure,"
say "its policy forbids debugging and key sharing and encrypts its register state (NODBG, NOKS, ES: CSV2)."
# What relying parties accept: this simulated root and this measurement.
cat > "$work/policy.json" <<JSON
{"simulator_roots": ["$work/csv/hrk.cert"], "approved_measurements": ["$measure"]}
JSON

step "2. The EK CA and key broker: they trust this simulated root and approve only this measurement"
mkdir -p "$work/kds/hsk_cek/SIMCHIP0001" && cp "$work/csv/hsk_cek.cert" "$work/kds/hsk_cek/SIMCHIP0001/"
"$BIN" ca --dir "$work/ca" --policy "$work/policy.json" --cert-dir "$work/kds" --key-broker \
  --listen 127.0.0.1:0 --http 127.0.0.1:0 2> "$work/ca.log" &
pids+=($!)
wait_log "$work/ca.log" 'EK CA serving'
ca_addr=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$work/ca.log" | head -1)
ca_http=$(sed -n 's/.*EK CA serving.* http=\([^ ]*\).*/\1/p' "$work/ca.log" | head -1)
ca_fp=$(sed -n 's/.*fingerprint=\([0-9a-f]*\).*/\1/p' "$work/ca.log" | head -1)
say "CA at $ca_addr (TLS; clients pin its fingerprint $ca_fp). One root per purpose, so no"
say "certificate of one kind passes for another: ca.pem (EK), ak-ca.pem (AK), identity-ca.pem"
say "(link identities), service-ca.pem (its TLS and the key broker's answers). The same service"
say "releases vTPM backends' keys, but only to a CVM whose CSV report passes this policy."

step "3. Link identities from the CA: who may talk to the backend"
for who in frontend guest-vm1; do
  "$BIN" ca identity --dir "$work/ca" --name "$who" --out-cert "$work/$who.pem" --out-key "$work/$who.key" | sed 's/^/   /'
done
echo '{"clients": {"frontend": {"instances": ["*"], "capabilities": ["host"]}, "guest-vm1": {"instances": ["vm1"], "capabilities": ["guest"]}}}' > "$work/acl.json"
say "the backend will trust identities from the CA's identity root ($work/ca/identity-ca.pem): 'frontend' may use"
say "every instance, 'guest-vm1' only instance vm1."

step "4. Start the backend inside the CVM: keys from the key broker, one libtpms worker per instance, state sealed with SM4-GCM"
"$BIN" backend --dir "$work/backend" --listen "tcp:127.0.0.1:0" --cipher sm4-gcm \
  --key-broker "$ca_addr" --broker-root "$work/ca/service-ca.pem" --backend-id backend-a --migration-domain demo \
  --client-ca "$work/ca/identity-ca.pem" --client-crl "http://$ca_http/crl/identity" --acl "$work/acl.json" --csv-sim "$work/csv" --ca "$ca_addr" \
  --metrics 127.0.0.1:0 2> "$work/backend.log" &
pids+=($!)
wait_log "$work/backend.log" 'backend serving'
link=$(sed -n 's/.*backend serving" link=\([^ ]*\).*/\1/p' "$work/backend.log")
backend_metrics=$(sed -n 's/.*backend serving.* metrics=\([^ ]*\).*/\1/p' "$work/backend.log")
say "the backend proved with a CSV report (bound to a nonce and an ephemeral key) that it runs the"
say "approved image; the broker released its master key and the domain's migration key, wrapped to"
say "that key and signed by the CA. No key file on the CVM's disk."
say "backend: attested link on $link, management socket $work/backend/admin.sock"
"$BIN" backend create --admin "$work/backend/admin.sock" --enroll vm1 | sed 's/^/   /'

step "5. The host: frontend relay. The guest: an end-to-end attested session through it"
"$BIN" frontend --backend "tcp:$link" --relay "tcp:127.0.0.1:0" \
  --relay-capture "$work/relay.bytes" 2> "$work/frontend.log" &
pids+=($!)
wait_log "$work/frontend.log" 'relaying guest connections'
relay=$(sed -n 's/.*relaying guest connections" listen=\([^ ]*\).*/\1/p' "$work/frontend.log")
"$BIN" guest proxy --link "tcp:$relay" --instance vm1 --tls-cert "$work/guest-vm1.pem" --tls-key "$work/guest-vm1.key" \
  --policy "$work/policy.json" --cert-dir "$work/kds" --unix "$work/vm1-tpm.sock" 2> "$work/proxy.log" &
pids+=($!)
wait_log "$work/proxy.log" 'guest proxy serving'
say "guest proxy: $(sed -n 's/.*msg="backend attested" \(.*\)/\1/p' "$work/proxy.log")"
say "(the backend proved with a CSV report bound to this TLS session that it runs in the approved CVM)"
export TPM2TOOLS_TCTI="swtpm:path=$work/vm1-tpm.sock"

step "6. Use the TPM from the guest: the EK certificate, random bytes, a quote, an NV secret"
tpm2_nvread 0x01c00002 -C o -o "$work/ek-rsa.der" 2>/dev/null
openssl x509 -inform DER -in "$work/ek-rsa.der" -out "$work/ek-rsa.pem"
say "tpm2_nvread 0x01c00002 -> EK certificate; openssl verify against the CA's EK root: $(openssl verify -CAfile "$work/ca/ca.pem" "$work/ek-rsa.pem" | sed 's/.*: //')"
say "tpm2_getrandom 16 -> $(tpm2_getrandom --hex 16)"
tpm2_createak -C 0x81010001 -c "$work/ak.ctx" -G ecc -g sha256 -s ecdsa -u "$work/ak.pub" -f pem >/dev/null
tpm2_flushcontext -t  # no resource manager here (as with swtpm): free transient slots
nonce=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
tpm2_quote -c "$work/ak.ctx" -l sha256:0,16 -q "$nonce" -m "$work/q.msg" -s "$work/q.sig" -o "$work/q.pcrs" -g sha256 >/dev/null
tpm2_checkquote -u "$work/ak.pub" -m "$work/q.msg" -s "$work/q.sig" -f "$work/q.pcrs" -g sha256 -q "$nonce" >/dev/null
say "an AK under the certified RSA EK signed a quote for nonce $nonce: tpm2_checkquote accepts it."
secret="cvtpm-demo-secret-$(date +%s)"
tpm2_nvdefine 0x1500016 -C o -s ${#secret} -a "ownerread|ownerwrite|authread|authwrite" >/dev/null
printf '%s' "$secret" > "$work/secret"
tpm2_nvwrite 0x1500016 -C o -i "$work/secret"
say "wrote '$secret' to NV 0x1500016."
if grep -qa "$secret" "$work/relay.bytes"; then say "!! the relay saw the secret"; exit 1; fi
say "the host relayed $(stat -c %s "$work/relay.bytes") bytes and the secret is not among them;"
if grep -rqa "$secret" "$work/backend"; then say "!! the secret is visible in the state files"; exit 1; fi
say "nor is it in any of the instance's state files (sealed)."

step "7. Attest: one verdict for the workload VM, its vTPM, and the CVM that hosts the vTPM"
# The workload VM is a CSV guest too (simulated: its own chip and image).
workload_measure=$(printf 'tenant workload image v3' | sha256sum | cut -d' ' -f1)
"$BIN" csv simulate --out "$work/workload-csv" --chip SIMCHIP0042 --measure "$workload_measure" --policy 0x7 >/dev/null
mkdir -p "$work/kds/hsk_cek/SIMCHIP0042" && cp "$work/workload-csv/hsk_cek.cert" "$work/kds/hsk_cek/SIMCHIP0042/"
cat > "$work/workload-policy.json" <<JSON
{"simulator_roots": ["$work/workload-csv/hrk.cert"], "approved_measurements": ["$workload_measure"]}
JSON
"$BIN" verifier --ek-root "$work/ca/ca.pem" --ak-root "$work/ca/ak-ca.pem" --crl "http://$ca_http/crl" --crl "http://$ca_http/crl/ak" --policy "$work/policy.json" --cert-dir "$work/kds" \
  --workload-policy "$work/workload-policy.json" --require-workload \
  --token-key "$work/verifier.key" --listen 127.0.0.1:0 --http 127.0.0.1:0 2> "$work/verifier.log" &
pids+=($!)
wait_log "$work/verifier.log" 'verifier serving'
verifier=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$work/verifier.log" | head -1)
verifier_http=$(sed -n 's/.*verifier serving.* http=\([^ ]*\).*/\1/p' "$work/verifier.log" | head -1)
say "verifier at $verifier: trusts the CA's EK and AK roots and their CRLs, the backend policy of step 1,"
say "and a workload policy: the workload VM (chip SIMCHIP0042) must run image $workload_measure."
"$BIN" guest measure --tpm "unix:$work/vm1-tpm.sock" --event-log "$work/guest-events.log" "demo bootloader" "demo app v1" | sed 's/^/   /'
guest_attest() {
  "$BIN" guest attest --tpm "unix:$work/vm1-tpm.sock" --ca "$ca_addr" --ca-fingerprint "$ca_fp" --verifier "$verifier" \
    --event-log "$work/guest-events.log" --verifier-key "$work/verifier.key.pub.pem" \
    --workload-evidence --workload-csv-sim "$work/workload-csv" 2>&1 | grep -v 'CSV SIMULATOR' | sed 's/^/   /'
}
guest_attest | tee "$work/verdict.txt"
say "(one nonce for everything: the quote by a CA-certified AK, a fresh CSV report the backend made"
say " for this nonce and this EK, and the workload VM's own report for this nonce and this AK;"
say " 'warning' only because the CSV evidence is simulated)"
say "now PCR 16 is extended behind the event log's back, and the guest attests again:"
tpm2_pcrextend 16:sha256=$(printf 'unlogged code' | sha256sum | cut -d' ' -f1)
guest_attest || true

step "8. Crash: the instance's worker is killed with SIGKILL"
pid=$("$BIN" backend list --admin "$work/backend/admin.sock" | awk '$1=="vm1" {print $3}')
kill -9 "$pid"
sleep 0.3
say "worker $pid killed; the backend restarted it: $("$BIN" backend list --admin "$work/backend/admin.sock" | awk '$1=="vm1" {print "pid " $3 ", " $4 " restart(s)"}')"
say "NV 0x1500016 still reads: $(tpm2_nvread 0x1500016 -C o 2>/dev/null | tr -d '\0')"

step "9. The host tries to take the instance's state, and to replace it"
"$BIN" frontend --backend "tcp:$link" --tls-cert "$work/frontend.pem" --tls-key "$work/frontend.key" --policy "$work/policy.json" --cert-dir "$work/kds" \
  --vm vm1="$work/vm1.ctrl" 2> "$work/frontend-vm.log" &
pids+=($!)
wait_for "$work/vm1.ctrl"
say "the frontend serves vm1 to QEMU on $work/vm1.ctrl; the host runs swtpm_ioctl on that socket:"
swtpm_ioctl --unix "$work/vm1.ctrl" --save permanent "$work/stolen.permanent"
if grep -qa "$secret" "$work/stolen.permanent"; then say "!! the host read the secret"; exit 1; fi
say "--save permanent gave $(stat -c %s "$work/stolen.permanent") bytes sealed for vm1 under the migration key: the secret is not in them,"
mkdir -p "$work/clone"
swtpm socket --tpm2 --tpmstate dir="$work/clone" --ctrl type=unixio,path="$work/clone.ctrl" \
  --server type=unixio,path="$work/clone.sock" --flags not-need-init 2> "$work/clone.log" &
pids+=($!)
wait_for "$work/clone.ctrl"
swtpm_ioctl --unix "$work/clone.ctrl" --stop
say "and a real swtpm outside the TEE will not run them: $(swtpm_ioctl --unix "$work/clone.ctrl" --load permanent "$work/stolen.permanent" 2>&1 | tr -d '\n')"
sleep 0.1
say "  ($(tail -1 "$work/clone.log"))"
say "locality 4 (swtpm_ioctl -l 4): $(swtpm_ioctl --unix "$work/vm1.ctrl" -l 4 2>&1 | tr -d '\n') (refused: not the host's)"
swtpm_ioctl --unix "$work/clone.ctrl" -i
swtpm_ioctl --unix "$work/clone.ctrl" --save permanent "$work/host-made.permanent"
swtpm_ioctl --unix "$work/vm1.ctrl" --stop
say "the host stops vm1's TPM and loads state it made with its own swtpm (seeds it knows):"
say "  $(swtpm_ioctl --unix "$work/vm1.ctrl" --load permanent "$work/host-made.permanent" 2>&1 | tr -d '\n')"
say "  backend: $(grep 'state transfer refused' "$work/backend.log" | tail -1 | sed 's/.*reason="\([^";]*\).*/\1/' | cut -c1-120)"
swtpm_ioctl --unix "$work/vm1.ctrl" -i
tpm2_startup -c 2>/dev/null || true
say "after the VM reset the guest still reads NV 0x1500016: $(tpm2_nvread 0x1500016 -C o 2>/dev/null | tr -d '\0')"

step "10. Tamper: what else the system refuses, and why"
echo "{\"approved_measurements\": [\"$measure\"]}" > "$work/real-only.json"
say "a guest that trusts only HYGON's real root refuses this (simulated) backend before sending a command:"
"$BIN" guest proxy --link "tcp:$relay" --instance vm1 --tls-cert "$work/guest-vm1.pem" --tls-key "$work/guest-vm1.key" \
  --policy "$work/real-only.json" --cert-dir "$work/kds" --tcp 127.0.0.1:1 2>&1 | sed 's/^/     /' | cut -c1-220 || true
echo "{\"simulator_roots\": [\"$work/csv/hrk.cert\"], \"approved_measurements\": [\"$(printf 'other image' | sha256sum | cut -d' ' -f1)\"]}" > "$work/other.json"
say "a guest that expects another backend image refuses it too:"
"$BIN" guest proxy --link "tcp:$relay" --instance vm1 --tls-cert "$work/guest-vm1.pem" --tls-key "$work/guest-vm1.key" \
  --policy "$work/other.json" --cert-dir "$work/kds" --tcp 127.0.0.1:1 2>&1 | sed 's/^/     /' | cut -c1-220 || true
"$BIN" csv simulate --out "$work/csv-other" --chip SIMCHIP0666 --measure "$measure" --policy 0x7 >/dev/null
mkdir -p "$work/kds/hsk_cek/SIMCHIP0666" && cp "$work/csv-other/hsk_cek.cert" "$work/kds/hsk_cek/SIMCHIP0666/"
"$BIN" socket --tpm2 --tpmstate dir="$work/state2" --server type=unixio,path="$work/tpm2.sock" \
  --ctrl type=unixio,path="$work/tpm2.sock.ctrl" --flags not-need-init,startup-clear &
pids+=($!)
wait_for "$work/tpm2.sock"
say "a vTPM in a CVM on a chip whose root the CA does not trust asks for an EK certificate:"
"$BIN" enroll --tpm-socket "$work/tpm2.sock" --ca "$ca_addr" --ca-fingerprint "$ca_fp" --instance demo-vm-2 --csv-sim "$work/csv-other" 2>&1 \
  | sed -n 's/.*desc = \(.*\)/\1/p' | cut -c1-150 | sed 's/^/     /' || true
say "and the simulated CSV evidence is refused by a verifier that trusts only HYGON's real root:"
"$BIN" csv verify --report "$work/csv/report.cert" --hsk-cek "$work/csv/hsk_cek.cert" 2>&1 | sed 's/^/     /' || true

step "11. What an operator sees: health and the counters this run moved"
metric() { curl -s "http://$1/metrics" | grep -E "^$2" | sed 's/^/     /'; }
say "backend (http://$backend_metrics): /healthz $(curl -s "http://$backend_metrics/healthz"), /readyz $(curl -s "http://$backend_metrics/readyz")"
metric "$backend_metrics" 'cvtpm_backend_(instances|worker_restarts_total|calls_refused_total)'
metric "$backend_metrics" 'cvtpm_backend_call_seconds_count\{op="execute"\}'
say "EK CA (http://$ca_http): /healthz $(curl -s "http://$ca_http/healthz")"
metric "$ca_http" 'cvtpm_(ca_decisions|keybroker_releases)_total'
say "verifier (http://$verifier_http): /healthz $(curl -s "http://$verifier_http/healthz")"
metric "$verifier_http" 'cvtpm_verifier_verdicts_total'

step "In one line per leg: the verdict the relying party got for the workload VM in step 7"
sed -n '/^   *leg /,$p' "$work/verdict.txt"
say "(EAR submodules cvtpm-vtpm, csv-platform and csv-workload of one signed token; WARNING only because"
say " this demo's CSV evidence is simulated: nothing was refused)"

step "Done: everything stopped, temporary files removed."
