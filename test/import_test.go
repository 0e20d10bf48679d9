package test

import (
	"bytes"
	"crypto/x509"
	"os"
	"path/filepath"
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

	cert, err := x509.ParseCertificate(bytes.TrimRight(sw.cert, "\xff\x00"))
	if err != nil {
		t.Fatalf("swtpm's NV 0x01c00002 holds no certificate: %v", err)
	}
	if !bytes.Equal(cv.cert, sw.cert) {
		t.Fatalf("EK certificate differs: cvtpm %d bytes, swtpm %d bytes", len(cv.cert), len(sw.cert))
	}
	if len(sw.ekPub) == 0 || !bytes.Equal(cv.ekPub, sw.ekPub) {
		t.Fatalf("tpm2_createek derives a different RSA EK under cvtpm")
	}
	if !bytes.Equal(cv.handles, sw.handles) {
		t.Fatalf("NV indices differ:\ncvtpm %s\nswtpm %s", cv.handles, sw.handles)
	}
	t.Logf("imported EK certificate %q, %d NV indices listed alike", cert.Issuer.CommonName, bytes.Count(sw.handles, []byte("0x")))
}
