package test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"cvtpm/test/testenv"
)

var tickRE = regexp.MustCompile(`CVTPM-TICK(\d+): *([0-9A-Fa-f]{64})`)

// A running Linux guest migrates live between two QEMUs whose TPMs are
// instances on two backends (keys from the key broker, one migration
// domain), each behind its own frontend: QEMU moves the TPM state through
// the frontends' swtpm sockets (CMD_GET/SET_STATEBLOB) as sealed envelopes,
// the destination backend takes the instance over at the broker, and the
// guest goes on reading the same PCR 0 from the destination's TPM. The
// source's copy stops.
func TestQEMULiveMigration(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	addr, root := startBroker(t, f)
	src := testenv.StartBackend(t, f, brokerArgs(addr, root, "backend-a")...)
	dst := testenv.StartBackendAt(t, f, filepath.Join(f.Dir, "state-b"), brokerArgs(addr, root, "backend-b")...)
	src.Admin(t, "create", "vm1")
	dst.Admin(t, "create", "--incoming", "vm1")
	sctrl := startFrontend(t, f, src, "vm1")["vm1"]
	dctrl := startFrontend(t, f, dst, "vm1")["vm1"]

	dir := t.TempDir()
	port := testenv.FreePort(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	qemu := func(ctrl, serial, monitor string, extra ...string) *exec.Cmd {
		cmd := exec.CommandContext(ctx, testenv.Tool(t, "qemu-system-x86_64"), append([]string{
			"-M", "q35", "-accel", "tcg", "-m", "256", "-smp", "1",
			"-display", "none", "-no-reboot", "-serial", "file:" + serial,
			"-monitor", "unix:" + monitor + ",server,nowait",
			"-kernel", kernel(t), "-initrd", buildInitrd(t),
			"-append", "console=ttyS0 panic=-1 quiet cvtpm.migrate",
			"-chardev", "socket,id=chrtpm,path=" + ctrl,
			"-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
			"-device", "tpm-crb,tpmdev=tpm0"}, extra...)...)
		out := &strings.Builder{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	sSerial, dSerial := filepath.Join(dir, "src.serial"), filepath.Join(dir, "dst.serial")
	sMon, dMon := filepath.Join(dir, "src.mon"), filepath.Join(dir, "dst.mon")
	qemu(dctrl, dSerial, dMon, "-incoming", fmt.Sprintf("tcp:127.0.0.1:%d", port))
	qemu(sctrl, sSerial, sMon)
	logs := func() string {
		s, _ := os.ReadFile(sSerial)
		d, _ := os.ReadFile(dSerial)
		return fmt.Sprintf("source console:\n%s\ndestination console:\n%s\nsource backend:\n%s\ndestination backend:\n%s",
			tail(s), tail(d), src.Backend.Log, dst.Backend.Log)
	}
	waitFor := func(what string, cond func() bool) {
		for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			if cond() {
				return
			}
		}
		t.Fatalf("timed out waiting for %s\n%s", what, logs())
	}
	ticks := func(file string) [][]string {
		b, _ := os.ReadFile(file)
		var out [][]string
		for _, m := range tickRE.FindAllStringSubmatch(string(b), -1) {
			out = append(out, m[1:])
		}
		return out
	}
	waitFor("the guest to run on the source", func() bool { return len(ticks(sSerial)) >= 3 })
	pcr0 := ticks(sSerial)[0][1]
	if pcr0 == strings.Repeat("0", 64) {
		t.Fatalf("PCR 0 is zero on the source: nothing measured\n%s", logs())
	}
	monitor(t, sMon, fmt.Sprintf("migrate -d tcp:127.0.0.1:%d", port))
	waitFor("the guest to run on the destination", func() bool { return len(ticks(dSerial)) >= 3 })
	if st := monitor(t, sMon, "info status"); !strings.Contains(st, "postmigrate") {
		t.Errorf("source QEMU after the migration: %q", st)
	}
	for _, tk := range ticks(dSerial) {
		if tk[1] != pcr0 {
			t.Fatalf("after the migration the guest reads PCR 0 = %s (tick %s), before %s\n%s", tk[1], tk[0], pcr0, logs())
		}
	}
	t.Logf("guest migrated: ticks %s..%s on the source, %s..%s on the destination, PCR 0 %s", ticks(sSerial)[0][0],
		ticks(sSerial)[len(ticks(sSerial))-1][0], ticks(dSerial)[0][0], ticks(dSerial)[len(ticks(dSerial))-1][0], pcr0[:16])
	waitFor("the source's copy to stop", func() bool { return strings.Contains(src.Admin(t, "list"), "migrated to backend backend-b") })
}

// monitor sends one HMP command to a QEMU monitor socket and returns
// what the monitor printed.
func monitor(t *testing.T, sock, cmd string) string {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("QEMU monitor: %v", err)
	}
	defer c.Close()
	var out strings.Builder
	buf := make([]byte, 4096)
	read := func(d time.Duration) {
		c.SetReadDeadline(time.Now().Add(d))
		for {
			n, err := c.Read(buf)
			out.Write(buf[:n])
			if err != nil {
				return
			}
		}
	}
	read(300 * time.Millisecond) // the banner and prompt
	fmt.Fprintf(c, "%s\n", cmd)
	read(time.Second)
	return out.String()
}
