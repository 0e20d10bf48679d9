#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build, test and demo cvtpm.
# Idempotent and quiet when everything is already there; never asks.
set -euo pipefail

pkgs=(
  gcc pkg-config libtpms-dev          # the TPM engine (cgo)
  swtpm swtpm-tools                   # reference peer: swtpm, swtpm_ioctl, swtpm_setup
  tpm2-tools libtss2-tcti-swtpm0 libtss2-tcti-mssim0
  qemu-system-x86 seabios busybox-static linux-image-amd64 cpio
  openssl
  postgresql                          # the EK CA's replicated store, tested against a real server
  libvirt-daemon-system libvirt-clients   # libvirt using cvtpm as its swtpm (test/libvirt_test.go)
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

if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  echo "install-deps: note: Go is at /usr/local/go/bin; add it to PATH"
fi
