package test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"cvtpm/test/testenv"
)

// TestSwtpmSetupImport: an unencrypted state directory made by swtpm_setup
// (EKs, EK certificates, locked NV) opened by cvtpm keeps its EK, its EK
// certificate and its persistent handles: cvtpm reads the same as swtpm.
func TestSwtpmSetupImport(t *testing.T) {
	made := t.TempDir()
	testenv.Run(t, nil, "swtpm_setup", "--tpm2", "--tpmstate", made, "--createek", "--create-ek-cert",
		"--lock-nvram", "--overwrite")
	perm, err := os.ReadFile(filepath.Join(made, "tpm2-00.permall"))
	if err != nil {
		t.Fatalf("swtpm_setup wrote no tpm2-00.permall: %v", err)
	}

	type view struct{ cert, ekPub, handles []byte }
	read := func(impl testenv.Impl) view {
		state := t.TempDir()
		os.WriteFile(filepath.Join(state, "tpm2-00.permall"), perm, 0o600)
		srv := testenv.StartSocket(t, impl, testenv.Options{StateDir: state})
		tt := tools{tb: t, tcti: srv.TCTI(), dir: t.TempDir()}
		var v view
		tt.run("tpm2_nvread", "0x01c00002", "-o", tt.path("cert.der"))
		v.cert, _ = os.ReadFile(tt.path("cert.der"))
		tt.run("tpm2_createek", "-c", tt.path("ek.ctx"), "-G", "rsa", "-u", tt.path("ek.pub"))
		v.ekPub, _ = os.ReadFile(tt.path("ek.pub"))
		v.handles = []byte(tt.run("tpm2_getcap", "handles-nv-index"))
		srv.Stop(t)
		return v
	}
	sw, cv := read(testenv.Swtpm), read(testenv.Cvtpm)

	// The certificate must be one that openssl, which relying parties use,
	// reads.
	der := filepath.Join(t.TempDir(), "ek.der")
	os.WriteFile(der, derPrefix(sw.cert), 0o600)
	issuer := testenv.Run(t, nil, "openssl", "x509", "-inform", "DER", "-in", der, "-noout", "-issuer")
	if !bytes.Equal(cv.cert, sw.cert) {
		t.Fatalf("EK certificate differs: cvtpm %d bytes, swtpm %d bytes", len(cv.cert), len(sw.cert))
	}
	if len(sw.ekPub) == 0 || !bytes.Equal(cv.ekPub, sw.ekPub) {
		t.Fatalf("tpm2_createek derives a different RSA EK under cvtpm")
	}
	if !bytes.Equal(cv.handles, sw.handles) {
		t.Fatalf("NV indices differ:\ncvtpm %s\nswtpm %s", cv.handles, sw.handles)
	}
	t.Logf("imported EK certificate (%s), %d NV indices listed alike", strings.TrimSpace(issuer), bytes.Count(sw.handles, []byte("0x")))
}

// derPrefix cuts a DER SEQUENCE with a two-byte length (as every EK
// certificate has) out of an NV index that may be longer.
func derPrefix(b []byte) []byte {
	if len(b) < 4 || b[0] != 0x30 || b[1] != 0x82 {
		return b
	}
	n := 4 + (int(b[2])<<8 | int(b[3]))
	if n > len(b) {
		return b
	}
	return b[:n]
}

// swtpm_setup as libvirt runs it for a new domain, with a `swtpm` symlink
// to cvtpm first in PATH: it asks --print-capabilities and --print-states,
// starts "swtpm socket" with a pid file it watches, manufactures the TPM
// (EKs, certificates from swtpm_localca, locked NV) and stops it. cvtpm
// then serves that state: the RSA EK certificate in NV certifies the EK
// tpm2_createek derives. A second run with --not-overwrite keeps it, and a
// second process on the directory is refused.
func TestSwtpmSetupThroughSymlink(t *testing.T) {
	// The full cvtpm, and the lean cvtpm-swtpm beside it.
	for _, target := range []string{"cvtpm", "cvtpm-swtpm"} {
		t.Run(target, func(t *testing.T) {
			swtpmSetupThroughSymlink(t, filepath.Join(filepath.Dir(testenv.Binary(t, testenv.Cvtpm)), target))
		})
	}
}

func swtpmSetupThroughSymlink(t *testing.T, target string) {
	bin := t.TempDir()
	if err := os.Symlink(target, filepath.Join(bin, "swtpm")); err != nil {
		t.Fatal(err)
	}
	env := []string{"PATH=" + bin + ":" + os.Getenv("PATH")}
	state := t.TempDir()
	setup := func() string {
		return testenv.Run(t, env, "swtpm_setup", "--tpm2", "--tpmstate", state, "--createek", "--create-ek-cert",
			"--create-platform-cert", "--lock-nvram", "--not-overwrite")
	}
	out := setup()
	if !strings.Contains(out, "Successfully authored TPM state") {
		t.Fatalf("swtpm_setup through the symlink:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(state, "cvtpm.permall")); err != nil {
		t.Fatalf("no cvtpm state after swtpm_setup: %v", err)
	}
	perm, _ := os.ReadFile(filepath.Join(state, "cvtpm.permall"))
	if out := setup(); !strings.Contains(out, "Not overwriting existing state file") {
		t.Errorf("a second swtpm_setup --not-overwrite:\n%s", out)
	}
	if again, _ := os.ReadFile(filepath.Join(state, "cvtpm.permall")); !bytes.Equal(again, perm) {
		t.Errorf("--not-overwrite changed the state")
	}

	srv := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{StateDir: state})
	tt := tools{tb: t, tcti: srv.TCTI(), dir: t.TempDir()}
	tt.run("tpm2_nvread", "0x01c00002", "-o", tt.path("cert.der"))
	tt.run("tpm2_createek", "-c", tt.path("ek.ctx"), "-G", "rsa", "-u", tt.path("ek.pem"), "-f", "pem")
	certKey := testenv.Run(t, nil, "openssl", "x509", "-inform", "DER", "-in", tt.path("cert.der"), "-noout", "-pubkey")
	ekPEM, _ := os.ReadFile(tt.path("ek.pem"))
	if strings.TrimSpace(certKey) != strings.TrimSpace(string(ekPEM)) {
		t.Errorf("the EK certificate swtpm_setup wrote does not certify the EK:\n%s\n%s", certKey, ekPEM)
	}
	// A second process on the same directory: refused, naming the holder.
	second, err := testenv.RunErr(nil, testenv.Binary(t, testenv.Cvtpm), "socket", "--tpm2", "--tpmstate", "dir="+state,
		"--server", "type=unixio,path="+filepath.Join(t.TempDir(), "s"), "--ctrl", "type=unixio,path="+filepath.Join(t.TempDir(), "c"))
	if err == nil || !strings.Contains(second, "is in use by PID") {
		t.Errorf("a second cvtpm socket on the directory: %v\n%s", err, second)
	}
}
