#!/usr/bin/env bash
# Runs every `go test -fuzz` target in the module for a short time each.
# Usage: scripts/fuzz.sh [duration]   (default 10s per target)
set -euo pipefail
dur=${1:-10s}
cd "$(dirname "$0")/.."
n=0
for pkg in $(go list ./...); do
  dir=$(go list -f '{{.Dir}}' "$pkg")
  for fz in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
    echo "fuzz: $pkg $fz ($dur)"
    go test -run '^$' -fuzz "^${fz}\$" -fuzztime "$dur" "$pkg" >/tmp/fuzz.$$.log 2>&1 || { cat /tmp/fuzz.$$.log; exit 1; }
    n=$((n+1))
  done
done
echo "fuzz: $n targets ran without a failure"
