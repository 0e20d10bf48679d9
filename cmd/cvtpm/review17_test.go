package main

// Review 17, finding 1 (fixed: guest attest is non-dumpable from the
// start). "cvtpm guest attest --link" loads the same link identity key
// (--tls-key) and holds the same attested sessions' keys as "cvtpm guest
// proxy", which 5fcc643 made non-dumpable at start; guest attest stays
// dumpable, so another process of its user (without CAP_SYS_PTRACE) reads
// its memory (/proc/PID/mem), environment and descriptors, and a crash
// writes the key into a core file.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"cvtpm/test/testenv"
)

func TestReview17GuestAttestLinkIsNotDumpable(t *testing.T) {
	testenv.NeedNobody(t)
	bin := testenv.Binary(t, testenv.Cvtpm)
	dir := testenv.OpenTempDir(t, "cvtpm-review17-", 0o755)

	// A link identity as 'cvtpm ca identity' writes it (the key readable
	// by the command's user), a policy, the verifier's public key, a log.
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(17), Subject: pkix.Name{CommonName: "guest-vm1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8, _ := x509.MarshalPKCS8PrivateKey(key)
	pub, _ := x509.MarshalPKIXPublicKey(key.Public())
	files := map[string][]byte{
		"id.pem":       pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		"id.key":       pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8}),
		"policy.json":  []byte("{}"),
		"verifier.pub": pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}),
		"eventlog":     []byte("log"),
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
		os.Chown(filepath.Join(dir, name), 65534, 65534)
	}

	// The "relay": accepts the link and never answers, so the command
	// waits in the attested link's handshake with its key loaded.
	sock := filepath.Join(dir, "link.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	os.Chmod(sock, 0o777)
	accepted := make(chan net.Conn, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			accepted <- c
		}
	}()

	argv := testenv.AsNobody(bin, "guest", "attest", "--link", "unix:"+sock, "--instance", "vm1",
		"--tls-cert", filepath.Join(dir, "id.pem"), "--tls-key", filepath.Join(dir, "id.key"),
		"--policy", filepath.Join(dir, "policy.json"), "--evidence-certs",
		"--ca", "127.0.0.1:1", "--ca-fingerprint", strings.Repeat("00", 32),
		"--verifier", "127.0.0.1:1", "--verifier-key", filepath.Join(dir, "verifier.pub"),
		"--event-log", filepath.Join(dir, "eventlog"), "--timeout", "20s")
	cmd := exec.Command(argv[0], argv[1:]...)
	var stderr testenv.SyncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	select {
	case c := <-accepted:
		defer c.Close()
	case <-time.After(15 * time.Second):
		t.Fatalf("guest attest never dialled the link: %s", stderr.String())
	}
	// setpriv execs cvtpm: the same PID, now holding --tls-key.
	if b, _ := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/comm"); string(b) != "cvtpm\n" {
		t.Fatalf("pid %d is %q, not cvtpm", cmd.Process.Pid, b)
	}
	if environReadable(cmd.Process.Pid) {
		t.Errorf("cvtpm guest attest --link (pid %d) holds its link identity's key (--tls-key) and is dumpable: "+
			"another process of its user read its /proc/PID/environ (and so may read /proc/PID/mem); "+
			"cvtpm guest proxy, holding the same key, is not dumpable", cmd.Process.Pid)
	}
}

// Review 17, finding 2 (fixed: trustedSibling, also for cvtpm-worker and
// cvtpm-verifier). "cvtpm socket" execs whatever cvtpm-swtpm sits beside the
// resolved executable if only it is a regular file with an execute bit:
// not who owns it, nor whether others may write it. In a directory where
// other users may create files but not replace cvtpm (sticky and world
// writable: /tmp, /var/tmp, /dev/shm, a shared build tree), any local
// user plants cvtpm-swtpm and runs code as whoever starts the vTPM
// (libvirt's swtpm user, root) with its --key descriptors and state.
func TestReview17SocketExecsAnotherUsersLeanBinary(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root, to plant a file as another user")
	}
	bin := testenv.Binary(t, testenv.Cvtpm)
	shared := testenv.OpenTempDir(t, "cvtpm-review17-shared-", 0o1777) // like /tmp
	// cvtpm installed there by root: other users cannot replace it.
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	cvtpm := filepath.Join(shared, "cvtpm")
	if err := os.WriteFile(cvtpm, b, 0o755); err != nil {
		t.Fatal(err)
	}
	// uid 65534 creates cvtpm-swtpm beside it (the sticky bit lets it).
	marker := filepath.Join(shared, "ran-as")
	planted := filepath.Join(shared, "cvtpm-swtpm")
	if err := os.WriteFile(planted, []byte("#!/bin/sh\nid -u > "+marker+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(planted, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	out, _ := exec.Command(cvtpm, "socket", "--version").CombinedOutput()
	if who, err := os.ReadFile(marker); err == nil {
		t.Errorf("cvtpm socket (uid %d) ran %s, owned by uid 65534, as uid %s (output %q): "+
			"the lean binary must belong to cvtpm's owner (or root) and be writable by no one else",
			os.Getuid(), planted, strings.TrimSpace(string(who)), out)
	}
}

// Review 17, finding 3 (fixed: non-dumpable right after its flags are
// parsed). The backend, the model the other daemons follow ("as the
// backend does"), reads its master key (--master-key-file, --master-key-fd
// or the key broker's answer) and then its migration key before it makes
// itself non-dumpable. A read that does not return (a FIFO, a stalled
// disk or descriptor) keeps the master key, from which every instance's
// state key derives, in a dumpable process for as long as it lasts.
func TestReview17BackendHoldsMasterKeyWhileDumpable(t *testing.T) {
	testenv.NeedNobody(t)
	bin := testenv.Binary(t, testenv.Cvtpm)
	dir := testenv.OpenTempDir(t, "cvtpm-review17-backend-", 0o700)
	if out, err := exec.Command(bin, "csv", "simulate", "--out", filepath.Join(dir, "sim")).CombinedOutput(); err != nil {
		t.Fatalf("csv simulate: %v %s", err, out)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "identity CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	os.WriteFile(filepath.Join(dir, "client-ca.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(filepath.Join(dir, "acl.json"), []byte(`{"clients": {}}`), 0o644)
	os.WriteFile(filepath.Join(dir, "master.key"), []byte(strings.Repeat("ab", 32)+"\n"), 0o600)
	fifo := filepath.Join(dir, "migration.key")
	if err := unixMkfifo(fifo); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(filepath.Join(dir, "state"), 0o700)
	if out, err := exec.Command("chown", "-R", "65534:65534", dir).CombinedOutput(); err != nil {
		t.Fatalf("chown: %v %s", err, out)
	}
	argv := testenv.AsNobody(bin, "backend", "--dir", filepath.Join(dir, "state"), "--master-key-file", filepath.Join(dir, "master.key"),
		"--migration-key-file", fifo, "--client-ca", filepath.Join(dir, "client-ca.pem"), "--acl", filepath.Join(dir, "acl.json"),
		"--csv-sim", filepath.Join(dir, "sim"), "--listen", "unix:"+filepath.Join(dir, "link.sock"))
	cmd := exec.Command(argv[0], argv[1:]...)
	var stderr testenv.SyncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	// The backend logs this right after reading the master key; the
	// next step opens --migration-key-file, a FIFO no one writes.
	waiting := false
	for i := 0; i < 500 && !waiting; i++ {
		waiting = strings.Contains(stderr.String(), "master key read from a file")
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	if cmd.ProcessState != nil || syscall.Kill(cmd.Process.Pid, 0) != nil {
		t.Fatalf("the backend exited: %s", stderr.String())
	}
	if !waiting {
		t.Fatalf("the backend did not reach --migration-key-file: %s", stderr.String())
	}
	if environReadable(cmd.Process.Pid) {
		t.Errorf("the backend (pid %d) has read its master key and is still dumpable while it reads --migration-key-file: "+
			"another process of its user read its /proc/PID/environ (so may read /proc/PID/mem)", cmd.Process.Pid)
	}
}

func environReadable(pid int) bool {
	ok, _ := testenv.EnvironReadableByNobody(pid)
	return ok
}

func unixMkfifo(path string) error { return syscall.Mkfifo(path, 0o600) }
