#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build, test and demo cvtpm.
# Idempotent and quiet when everything is already there; never asks.
set -euo pipefail

pkgs=(
  gcc pkg-config libtpms-dev libssl-dev   # the TPM engine (cgo; libtpms.a and libcrypto.a, linked statically)
  swtpm swtpm-tools                   # reference peer: swtpm, swtpm_ioctl, swtpm_setup
  tpm2-tools libtss2-tcti-swtpm0 libtss2-tcti-mssim0
  qemu-system-x86 seabios ovmf busybox-static linux-image-amd64 cpio   # ovmf: test/realguest_test.go
  openssl curl git
  postgresql                          # the EK CA's replicated store, tested against a real server
  libvirt-daemon-system libvirt-clients   # libvirt using cvtpm as its swtpm (test/libvirt_test.go)
  systemd                             # systemd-analyze verify of contrib/systemd (test/operability_test.go)
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Go of the version go.mod pins, in /usr/local/go. Debian 12's golang-go
# (1.19) is too old to build cvtpm, but it can fetch the pinned toolchain:
# the Go module proxy serves every release as the module
# golang.org/toolchain, whole (what GOTOOLCHAIN does in newer Go).
want=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$(dirname "$0")/../go.mod")
have=""
for g in /usr/local/go/bin/go "$(command -v go 2>/dev/null || true)"; do
  [ -n "$g" ] && [ -x "$g" ] || continue
  have=$("$g" env GOVERSION 2>/dev/null | sed 's/^go//') || have=""
  [ -n "$have" ] && break
done
older() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -1)" = "$1" ] && [ "$1" != "$2" ]; }
if [ -z "$have" ] || older "$have" "$want"; then
  echo "install-deps: Go $want is needed (found: ${have:-none}); fetching it through the Go module proxy"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! command -v go >/dev/null 2>&1; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends golang-go ca-certificates >/dev/null
  fi
  arch=$(dpkg --print-architecture)
  mod="golang.org/toolchain@v0.0.1-go${want}.linux-${arch}"
  tmp=$(mktemp -d)
  # (A throwaway module around the download: old Go wants one.)
  printf 'module bootstrap\n\ngo 1.19\n' > "$tmp/go.mod"
  dir=$(cd "$tmp" && GOPATH="$tmp/gopath" GOFLAGS=-modcacherw GO111MODULE=on GOTOOLCHAIN=local go mod download -json "$mod" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  [ -x "$dir/bin/go" ] || [ -f "$dir/bin/go" ] || { echo "install-deps: could not fetch $mod" >&2; exit 1; }
  $sudo rm -rf /usr/local/go.new && $sudo cp -r "$dir" /usr/local/go.new
  # Module zips carry no file modes: the tools must be executable.
  $sudo chmod -R u+w,a+rX /usr/local/go.new
  $sudo chmod a+x /usr/local/go.new/bin/* /usr/local/go.new/pkg/tool/*/*
  $sudo rm -rf /usr/local/go && $sudo mv /usr/local/go.new /usr/local/go
  rm -rf "$tmp"
  echo "install-deps: Go $(/usr/local/go/bin/go env GOVERSION) installed in /usr/local/go"
fi
if ! command -v go >/dev/null 2>&1 || [ "$(command -v go)" != /usr/local/go/bin/go ]; then
  case ":$PATH:" in *:/usr/local/go/bin:*) ;; *) echo "install-deps: note: Go is at /usr/local/go/bin; the Makefile uses it from there" ;; esac
fi
