# cvtpm — see README.md. Every target installs what it needs on Debian.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go
BIN := bin/cvtpm

.PHONY: all build deps test unit fuzz demo bench clean

all: build

deps:
	@scripts/install-deps.sh

COMMIT := $(shell git describe --always --dirty 2>/dev/null || echo unknown)
LDFLAGS := -X cvtpm/internal/version.Commit=$(COMMIT)

build:
	@mkdir -p bin
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/cvtpm
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/cvtpm-verifier ./cmd/cvtpm-verifier
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/cvtpm-worker ./cmd/cvtpm-worker
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/cvtpm-swtpm ./cmd/cvtpm-swtpm

# The full suite: unit tests, cross-component tests against the real peers
# (tpm2-tools, swtpm-tools, QEMU), then a short run of every fuzz target.
test: deps build
	CVTPM_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout 15m ./...
	@scripts/fuzz.sh 10s

fuzz: deps
	@scripts/fuzz.sh $${FUZZTIME:-60s}

demo: deps build
	@scripts/demo.sh

# cvtpm vs swtpm (same run, alternating), CSV report verification next to a
# bare SM2 verify, CA enrollments with 64 concurrent clients, key releases.
bench: deps build
	CVTPM_BIN=$(CURDIR)/$(BIN) $(GO) test -run '^$$' -bench . -benchtime 2000x -count 1 ./test/bench/ | tee bench.txt
	$(GO) test -run '^$$' -bench 'VerifyReport|SM2Verify' -count 1 ./attest/csv/ | tee -a bench.txt
	$(GO) test -run '^$$' -bench Enroll -benchtime 2000x -count 1 ./ca/ | tee -a bench.txt
	$(GO) test -run '^$$' -bench ChallengeOutstanding -benchtime 200000x -count 1 ./ca/ | tee -a bench.txt
	$(GO) test -run '^$$' -bench LoadOutstanding -benchtime 1x -count 1 ./ca/ | tee -a bench.txt
	$(GO) test -run '^$$' -bench Release -benchtime 1000x -count 1 ./ca/keybroker/ | tee -a bench.txt
	$(GO) test -run '^$$' -bench Attested -benchtime 2000x -count 1 ./test/linkbench/ | tee -a bench.txt
	$(GO) test -run '^$$' -bench IdleInstances -benchtime 1x -count 1 -timeout 20m ./test/linkbench/ | tee -a bench.txt
	$(GO) test -run '^$$' -bench AttestationVerify -benchtime 1x -count 1 -cpu 1,2 ./test/ | tee -a bench.txt

clean:
	rm -rf bin bench.txt
