package swtpmsocket

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cvtpm/vtpm/swtpmblob"
)

func TestParseSocketArgs(t *testing.T) {
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	none := env(nil)
	tests := []struct {
		name    string
		args    []string
		getenv  func(string) string
		wantErr string // substring; "" = success
		check   func(*socketConfig) bool
	}{
		{"libvirt style", []string{"--tpm2", "--tpmstate", "dir=/s,mode=0600", "--ctrl", "type=unixio,path=/r/c,mode=0600", "--log", "file=/l,level=20", "--pid", "file=/p", "--flags", "startup-clear"}, none, "",
			func(c *socketConfig) bool {
				return c.stateDir == "/s" && c.ctrl.typ == "unixio" && c.ctrl.path == "/r/c" && c.ctrl.mode == 0o600 && c.logLevel == 20 && c.pidFile == "/p" && c.startup == "clear"
			}},
		{"equals form and tcp defaults", []string{"--tpm2", "--tpmstate=dir=/s", "--server=type=tcp,port=2321,disconnect", "--ctrl=type=tcp,port=2322"}, none, "",
			func(c *socketConfig) bool {
				return c.server.port == 2321 && c.server.bindaddr == "127.0.0.1" && c.server.disconnect && c.ctrl.port == 2322
			}},
		{"TPM_PATH and TPM_PORT", []string{"--tpm2", "--server", "type=tcp"}, env(map[string]string{"TPM_PATH": "/e", "TPM_PORT": "7000"}), "",
			func(c *socketConfig) bool { return c.stateDir == "/e" && c.server.port == 7000 }},
		{"mssim", []string{"--tpm2", "--tpmstate", "dir=/s", "--mssim", "port=2321,bindaddr=::1"}, none, "",
			func(c *socketConfig) bool { return c.mssimPort == 2321 && c.mssimBind == "::1" }},
		{"not-need-init", []string{"--tpm2", "--tpmstate", "dir=/s", "--flags", "not-need-init,startup-state,disable-auto-shutdown"}, none, "",
			func(c *socketConfig) bool { return c.notNeedInit && c.startup == "state" }},
		{"key", []string{"--tpm2", "--tpmstate", "dir=/s", "--key", "pwdfile=/k,kdf=sha512,mode=sm4-gcm"}, none, "",
			func(c *socketConfig) bool {
				return c.key.pwdfile == "/k" && c.key.kdf == "sha512" && c.key.mode == "sm4-gcm"
			}},
		{"terminate (libvirt)", []string{"--tpm2", "--tpmstate", "dir=/s", "-t", "--daemon"}, none, "",
			func(c *socketConfig) bool { return c.terminate && c.daemon }},
		{"seccomp by default: kill, as swtpm", []string{"--tpm2", "--tpmstate", "dir=/s"}, none, "",
			func(c *socketConfig) bool { return c.seccomp == "kill" }},
		{"seccomp none", []string{"--tpm2", "--tpmstate", "dir=/s", "--seccomp", "action=none"}, none, "",
			func(c *socketConfig) bool { return c.seccomp == "none" }},
		{"seccomp log", []string{"--tpm2", "--tpmstate", "dir=/s", "--seccomp", "action=log"}, none, "",
			func(c *socketConfig) bool { return c.seccomp == "log" }},
		{"seccomp kill", []string{"--tpm2", "--tpmstate", "dir=/s", "--seccomp", "action=kill"}, none, "",
			func(c *socketConfig) bool { return c.seccomp == "kill" }},
		{"seccomp, unknown action", []string{"--tpm2", "--tpmstate", "dir=/s", "--seccomp", "action=trap"}, none, `--seccomp: action="trap": want none, log or kill`, nil},
		{"migration on shared storage", []string{"--tpm2", "--tpmstate", "dir=/s", "--migration", "incoming,release-lock-outgoing"}, none, "",
			func(c *socketConfig) bool { return c.migrationIncoming && c.releaseLockOutgoing && c.stateLock }},
		{"migration, unknown", []string{"--tpm2", "--tpmstate", "dir=/s", "--migration", "outgoing"}, none, "outgoing", nil},
		{"print capabilities needs nothing else", []string{"--print-capabilities"}, none, "", func(c *socketConfig) bool { return c.printCaps }},
		{"unknown option", []string{"--tpm2", "--bogus"}, none, "unknown option --bogus", nil},
		{"unknown parameter", []string{"--tpm2", "--server", "type=tcp,port=1,colour=red"}, none, `--server: unknown parameter "colour"`, nil},
		{"bad port", []string{"--tpm2", "--server", "type=tcp,port=70000"}, none, "--server: port=", nil},
		{"bad type", []string{"--server", "type=vsock"}, none, `--server: type="vsock"`, nil},
		{"missing value", []string{"--tpm2", "--ctrl"}, none, "--ctrl: missing value", nil},
		{"no tpm2", []string{"--tpmstate", "dir=/s"}, none, "--tpm2 is required", nil},
		{"no state dir", []string{"--tpm2"}, none, "--tpmstate", nil},
		{"tcp without port", []string{"--tpm2", "--tpmstate", "dir=/s", "--server", "type=tcp"}, none, "--server: no valid port", nil},
		{"unixio without path", []string{"--tpm2", "--tpmstate", "dir=/s", "--ctrl", "type=unixio"}, none, "--ctrl: type=unixio needs path=", nil},
		{"two key sources", []string{"--tpm2", "--tpmstate", "dir=/s", "--key", "file=/a,fd=3"}, none, "--key: give exactly one", nil},
		{"runas", []string{"--tpm2", "--tpmstate", "dir=/s", "--runas", "tss"}, none, "", func(c *socketConfig) bool { return c.runas == "tss" }},
		{"runas, short", []string{"--tpm2", "--tpmstate", "dir=/s", "-r", "65534"}, none, "", func(c *socketConfig) bool { return c.runas == "65534" }},
		{"runas, joined", []string{"--tpm2", "--tpmstate", "dir=/s", "-rtss"}, none, "", func(c *socketConfig) bool { return c.runas == "tss" }},
		{"port, joined", []string{"--tpm2", "--tpmstate", "dir=/s", "-p2321"}, none, "", func(c *socketConfig) bool { return c.server != nil && c.server.port == 2321 }},
		{"runas, empty", []string{"--tpm2", "--tpmstate", "dir=/s", "--runas="}, none, "--runas: no user given", nil},
		{"chroot", []string{"--tpm2", "--tpmstate", "dir=/s", "--chroot", "/srv/jail"}, none, "--chroot is not supported", nil},
		{"backend uri", []string{"--tpm2", "--tpmstate", "backend-uri=file:///x"}, none, "--tpmstate: backend-uri", nil},
		{"bad mode", []string{"--tpm2", "--tpmstate", "dir=/s,mode=999"}, none, "--tpmstate: mode=", nil},
		{"stray argument", []string{"--tpm2", "extra"}, none, `unexpected argument "extra"`, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := parseSocketArgs(tc.args, tc.getenv)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want it to contain %q", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), "\n") {
					t.Errorf("error spans several lines: %q", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("err = %v", err)
			}
			if tc.check != nil && !tc.check(c) {
				t.Errorf("parsed config %+v does not match", c)
			}
		})
	}
}

func TestPrintCapabilities(t *testing.T) {
	var buf bytes.Buffer
	if err := printCapabilities(&buf); err != nil {
		t.Fatal(err)
	}
	var caps struct {
		Type     string   `json:"type"`
		Features []string `json:"features"`
		Version  string   `json:"version"`
	}
	if err := json.Unmarshal(buf.Bytes(), &caps); err != nil {
		t.Fatalf("not JSON: %v: %s", err, buf.Bytes())
	}
	has := map[string]bool{}
	for _, f := range caps.Features {
		has[f] = true
	}
	wants := []string{"tpm-2.0", "tpm-send-command-header", "flags-opt-startup"}
	if sealedStateSupported {
		wants = append(wants, "cmdarg-key-fd", "cmdarg-pwd-fd")
	}
	for _, want := range wants {
		if !has[want] {
			t.Errorf("feature %q missing from %s", want, buf.Bytes())
		}
	}
	if has["tpm-1.2"] {
		t.Errorf("claims tpm-1.2")
	}
	if caps.Type != "swtpm" {
		t.Errorf("type %q, want swtpm (libvirt checks it)", caps.Type)
	}
}

// TestServeSocket runs the socket command in-process and sends a raw
// TPM2_GetRandom on the data socket, then shuts it down over the control
// channel and checks that the sockets and the pid file are gone.
func TestServeSocket(t *testing.T) {
	dir := t.TempDir()
	data, ctrl, pid := filepath.Join(dir, "sock"), filepath.Join(dir, "sock.ctrl"), filepath.Join(dir, "pid")
	cfg, err := parseSocketArgs([]string{"--tpm2", "--tpmstate", "dir=" + filepath.Join(dir, "state"),
		"--server", "type=unixio,path=" + data, "--ctrl", "type=unixio,path=" + ctrl,
		"--flags", "not-need-init,startup-clear", "--pid", "file=" + pid, "--log", "file=-"}, os.Getenv)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- serveSocket(context.Background(), cfg) }()
	var c net.Conn
	for range 500 {
		if _, err := os.Stat(pid); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if c, err = net.Dial("unix", data); err != nil {
		t.Fatalf("data socket: %v", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}); err != nil {
		t.Fatal(err)
	}
	resp := make([]byte, 64)
	n, err := c.Read(resp)
	if err != nil || n != 20 || !bytes.Equal(resp[:10], []byte{0x80, 0x01, 0, 0, 0, 20, 0, 0, 0, 0}) {
		t.Fatalf("GetRandom: % x, %v", resp[:n], err)
	}
	cc, err := net.Dial("unix", ctrl)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	cc.Write([]byte{0, 0, 0, 3}) // CMD_SHUTDOWN
	if n, _ := cc.Read(resp); n != 4 || !bytes.Equal(resp[:4], []byte{0, 0, 0, 0}) {
		t.Errorf("SHUTDOWN reply % x", resp[:n])
	}
	if err := <-done; err != nil {
		t.Fatalf("serveSocket: %v", err)
	}
	for _, p := range []string{data, ctrl, pid} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s still exists after shutdown", p)
		}
	}
}

// TestMigrationKeySealsStateBlobs checks that --migration-key seals the
// blobs of GET_STATEBLOB: the plaintext is absent, the same key opens them,
// and a TPM without the key refuses them.
func TestMigrationKeySealsStateBlobs(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "mk")
	if err := os.WriteFile(keyFile, []byte(strings.Repeat("ab", 32)), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := parseSocketArgs([]string{"--tpm2", "--tpmstate", "dir=" + filepath.Join(dir, "st"),
		"--migration-key", "file=" + keyFile + ",format=hex"}, os.Getenv)
	if err != nil {
		t.Fatal(err)
	}
	store, sealer, err := openState(cfg, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	if sealer == nil {
		t.Fatal("no sealer for --migration-key")
	}
	plain := []byte("permanent state with a known secret")
	blob, err := swtpmblob.Encode(plain, sealer)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(blob, []byte("known secret")) {
		t.Error("sealed blob contains the plaintext")
	}
	if got, err := swtpmblob.Decode(blob, sealer); err != nil || !bytes.Equal(got, plain) {
		t.Errorf("open with the same key: %q, %v", got, err)
	}
	if _, err := swtpmblob.Decode(blob, nil); !errors.Is(err, swtpmblob.ErrBlobNeedsKey) {
		t.Errorf("open without a key: err %v, want ErrBlobNeedsKey", err)
	}
}

// TestProcfsElsewhere: the drop-in names every procfs mounted outside
// /proc, which its Landlock step does not cover.
func TestProcfsElsewhere(t *testing.T) {
	const mountinfo = `22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,nosuid - sysfs sysfs rw
27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 27 0:21 / /srv/chroot/proc rw,relatime shared:5 - proc proc rw
41 27 0:45 / /srv/proc-lookalike rw - tmpfs proc rw
`
	got := procfsElsewhere(mountinfo)
	if len(got) != 1 || got[0] != "/srv/chroot/proc" {
		t.Errorf("procfsElsewhere = %q, want [/srv/chroot/proc]", got)
	}
	if got := procfsElsewhere(""); len(got) != 0 {
		t.Errorf("empty mountinfo: %q", got)
	}
}
