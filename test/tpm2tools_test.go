// Package test holds cross-component tests: cvtpm and swtpm driven by the
// real peers (tpm2-tools, swtpm-tools, QEMU) with the same command lines.
package test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"cvtpm/test/testenv"
)

// tools runs tpm2-tools against one TCTI.
type tools struct {
	tb   testing.TB
	tcti string
	dir  string
}

func (t tools) run(name string, args ...string) string {
	t.tb.Helper()
	return testenv.Run(t.tb, []string{"TPM2TOOLS_TCTI=" + t.tcti}, name, args...)
}

func (t tools) path(name string) string { return filepath.Join(t.dir, name) }

var pcr16 = regexp.MustCompile(`(?m)^\s*16\s*:\s*0x([0-9A-Fa-f]{64})`)

// exercise runs the tpm2-tools checklist against one TPM.
func exercise(t *testing.T, tt tools) {
	// getrandom
	out := tt.run("tpm2_getrandom", "--hex", "16")
	if len(strings.TrimSpace(out)) != 32 {
		t.Fatalf("tpm2_getrandom --hex 16 gave %q", out)
	}

	// pcrextend + pcrread: the value is the expected hash chain.
	digest := sha256.Sum256([]byte("measured by the cvtpm e2e test"))
	tt.run("tpm2_pcrextend", "16:sha256="+hex.EncodeToString(digest[:]))
	m := pcr16.FindStringSubmatch(tt.run("tpm2_pcrread", "sha256:16"))
	if m == nil {
		t.Fatalf("tpm2_pcrread printed no PCR 16")
	}
	want := sha256.Sum256(append(make([]byte, 32), digest[:]...))
	if !strings.EqualFold(m[1], hex.EncodeToString(want[:])) {
		t.Fatalf("PCR 16 = %s, want %x", m[1], want)
	}

	// createek, createak, quote + checkquote.
	tt.run("tpm2_createek", "-c", tt.path("ek.ctx"), "-G", "rsa", "-u", tt.path("ek.pub"))
	tt.run("tpm2_createak", "-C", tt.path("ek.ctx"), "-c", tt.path("ak.ctx"), "-G", "ecc", "-g", "sha256",
		"-s", "ecdsa", "-u", tt.path("ak.pub"), "-f", "pem")
	tt.run("tpm2_flushcontext", "-t") // no resource manager: free the transient slots
	nonce := "c0ffee0123456789"
	tt.run("tpm2_quote", "-c", tt.path("ak.ctx"), "-l", "sha256:0,16", "-q", nonce,
		"-m", tt.path("q.msg"), "-s", tt.path("q.sig"), "-o", tt.path("q.pcrs"), "-g", "sha256")
	tt.run("tpm2_checkquote", "-u", tt.path("ak.pub"), "-m", tt.path("q.msg"), "-s", tt.path("q.sig"),
		"-f", tt.path("q.pcrs"), "-g", "sha256", "-q", nonce)
	// A quote checked against another nonce must fail: the check can fail.
	if _, err := testenv.RunErr([]string{"TPM2TOOLS_TCTI=" + tt.tcti}, testenv.Tool(t, "tpm2_checkquote"),
		"-u", tt.path("ak.pub"), "-m", tt.path("q.msg"), "-s", tt.path("q.sig"),
		"-f", tt.path("q.pcrs"), "-g", "sha256", "-q", "00"+nonce[2:]); err == nil {
		t.Fatalf("tpm2_checkquote accepted a wrong nonce")
	}
	tt.run("tpm2_flushcontext", "-t")

	// nvdefine / nvwrite / nvread.
	secret := []byte("nv secret written by the e2e test, 0123456789")
	os.WriteFile(tt.path("secret"), secret, 0o600)
	tt.run("tpm2_nvdefine", "0x1500017", "-C", "o", "-s", "48", "-a", "ownerread|ownerwrite|authread|authwrite")
	tt.run("tpm2_nvwrite", "0x1500017", "-C", "o", "-i", tt.path("secret"))
	tt.run("tpm2_nvread", "0x1500017", "-C", "o", "-s", "48", "-o", tt.path("nv.out"))
	got, _ := os.ReadFile(tt.path("nv.out"))
	if !bytes.HasPrefix(got, secret) {
		t.Fatalf("tpm2_nvread gave %q, want %q", got, secret)
	}

	// evictcontrol: make the EK persistent and find it listed.
	tt.run("tpm2_evictcontrol", "-C", "o", "-c", tt.path("ek.ctx"), "0x81010001")
	if h := tt.run("tpm2_getcap", "handles-persistent"); !strings.Contains(h, "0x81010001") {
		t.Fatalf("persistent handle 0x81010001 not listed: %q", h)
	}
}

func TestTPM2ToolsSwtpmTCTI(t *testing.T) {
	for _, impl := range testenv.Both {
		for _, tcp := range []bool{false, true} {
			name := string(impl) + "/unix"
			if tcp {
				name = string(impl) + "/tcp"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				srv := testenv.StartSocket(t, impl, testenv.Options{TCP: tcp})
				exercise(t, tools{tb: t, tcti: srv.TCTI(), dir: t.TempDir()})
			})
		}
	}
}

// swtpm 0.7 fails the mssim TCTI; serving it is one place cvtpm beats it.
func TestTPM2ToolsMssimTCTI(t *testing.T) {
	srv := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{MSSIM: true, Flags: "not-need-init"})
	tt := tools{tb: t, tcti: srv.MSSIMTCTI(), dir: t.TempDir()}
	tt.run("tpm2_startup", "-c")
	exercise(t, tt)
}

// TestRestartKeepsState: NV indices and persistent handles survive a
// restart on the same state directory, for both implementations.
func TestRestartKeepsState(t *testing.T) {
	for _, impl := range testenv.Both {
		t.Run(string(impl), func(t *testing.T) {
			t.Parallel()
			state := t.TempDir()
			srv := testenv.StartSocket(t, impl, testenv.Options{StateDir: state})
			tt := tools{tb: t, tcti: srv.TCTI(), dir: t.TempDir()}
			os.WriteFile(tt.path("v"), []byte("survives a restart"), 0o600)
			tt.run("tpm2_nvdefine", "0x1500018", "-C", "o", "-s", "18", "-a", "ownerread|ownerwrite")
			tt.run("tpm2_nvwrite", "0x1500018", "-C", "o", "-i", tt.path("v"))
			tt.run("tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "ecc", "-c", tt.path("p.ctx"))
			tt.run("tpm2_evictcontrol", "-C", "o", "-c", tt.path("p.ctx"), "0x81000005")
			srv.Stop(t)

			srv2 := testenv.StartSocket(t, impl, testenv.Options{StateDir: state})
			tt.tcti = srv2.TCTI()
			tt.run("tpm2_nvread", "0x1500018", "-C", "o", "-s", "18", "-o", tt.path("out"))
			if got, _ := os.ReadFile(tt.path("out")); string(got) != "survives a restart" {
				t.Fatalf("NV after restart = %q", got)
			}
			if h := tt.run("tpm2_getcap", "handles-persistent"); !strings.Contains(h, "0x81000005") {
				t.Fatalf("persistent handle lost across restart: %q", h)
			}
		})
	}
}

// TestKeySealsState: with --key no state file contains a plaintext NV
// value; without it the same value is found, which shows the check works.
func TestKeySealsState(t *testing.T) {
	cases := []struct {
		name string
		impl testenv.Impl
		mode string // "" = no key
	}{
		{"cvtpm/plain", testenv.Cvtpm, ""},
		{"cvtpm/aes-256-gcm", testenv.Cvtpm, "aes-256-gcm"},
		{"cvtpm/sm4-gcm", testenv.Cvtpm, "sm4-gcm"},
		{"swtpm/plain", testenv.Swtpm, ""},
		{"swtpm/aes-256-cbc", testenv.Swtpm, "aes-256-cbc"},
	}
	secret := []byte("KNOWN-PLAINTEXT-NV-VALUE-cvtpm-0123456789abcdef")
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			state := t.TempDir()
			var extra []string
			if tc.mode != "" {
				keyFile := filepath.Join(t.TempDir(), "key")
				os.WriteFile(keyFile, []byte(strings.Repeat("3c", 32)), 0o600)
				extra = []string{"--key", "file=" + keyFile + ",format=hex,mode=" + tc.mode}
			}
			start := func() *testenv.Server {
				return testenv.StartSocket(t, tc.impl, testenv.Options{StateDir: state, ExtraArgs: extra})
			}
			srv := start()
			tt := tools{tb: t, tcti: srv.TCTI(), dir: t.TempDir()}
			os.WriteFile(tt.path("v"), secret, 0o600)
			tt.run("tpm2_nvdefine", "0x1500019", "-C", "o", "-s", "47", "-a", "ownerread|ownerwrite")
			tt.run("tpm2_nvwrite", "0x1500019", "-C", "o", "-i", tt.path("v"))
			srv.Stop(t)

			found := false
			filepath.Walk(state, func(p string, fi os.FileInfo, err error) error {
				if err == nil && fi.Mode().IsRegular() {
					if b, _ := os.ReadFile(p); bytes.Contains(b, secret) {
						found = true
					}
				}
				return nil
			})
			if found != (tc.mode == "") {
				t.Fatalf("plaintext NV value in the state files: %v; want %v", found, tc.mode == "")
			}
			// And the sealed state still opens with the key.
			srv = start()
			tt.tcti = srv.TCTI()
			tt.run("tpm2_nvread", "0x1500019", "-C", "o", "-s", "47", "-o", tt.path("out"))
			if got, _ := os.ReadFile(tt.path("out")); !bytes.Equal(got, secret) {
				t.Fatalf("NV after restart = %q", got)
			}
		})
	}
}
