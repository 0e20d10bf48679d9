package test

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cvtpm/test/testenv"
)

// TestLibvirtDomain: libvirt 9 (Debian's libvirt-daemon-system, qemu:///system)
// with a `swtpm` symlink to cvtpm first in the daemon's PATH boots a TCG
// domain with <tpm model='tpm-crb'><backend type='emulator' version='2.0'/>:
// libvirt runs swtpm_setup (which runs cvtpm), then cvtpm as the domain's
// swtpm; the guest sees a TPM 2.0 with firmware-measured PCRs and reads the
// EK certificate swtpm_setup wrote. After a shutdown and a second start the
// guest reads the same certificate (NV kept) from cvtpm's sealed-format
// state directory.
func TestLibvirtDomain(t *testing.T) {
	for _, tool := range []string{"libvirtd", "virtlogd", "virsh"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed: run 'make deps' (libvirt-daemon-system, libvirt-clients)", tool)
		}
	}
	if out, err := exec.Command("pgrep", "-x", "libvirtd").Output(); err == nil {
		t.Skipf("a libvirtd is already running (pid %s): this test starts its own, with cvtpm in its PATH", strings.TrimSpace(string(out)))
	}
	// libvirt runs swtpm_setup and swtpm as tss: the symlink's directory
	// must be reachable by it (t.TempDir's parent is not).
	bin, err := os.MkdirTemp("", "cvtpm-libvirt-bin")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(bin) })
	os.Chmod(bin, 0o755)
	if err := os.Symlink(testenv.Binary(t, testenv.Cvtpm), filepath.Join(bin, "swtpm")); err != nil {
		t.Fatal(err)
	}
	path := bin + ":" + os.Getenv("PATH")
	// swtpm_setup runs as tss and keeps its local CA here.
	os.MkdirAll("/var/lib/swtpm-localca", 0o750)
	exec.Command("chown", "-R", "tss:tss", "/var/lib/swtpm-localca").Run()
	daemon := func(name string) {
		cmd := exec.Command(name)
		cmd.Env = append(os.Environ(), "PATH="+path)
		log := &strings.Builder{}
		cmd.Stdout, cmd.Stderr = log, log
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	}
	daemon("virtlogd")
	daemon("libvirtd")
	virsh := func(args ...string) (string, error) {
		out, err := exec.Command("virsh", append([]string{"-c", "qemu:///system"}, args...)...).CombinedOutput()
		return string(out), err
	}
	for i := 0; ; i++ {
		if _, err := virsh("version"); err == nil {
			break
		}
		if i > 100 {
			t.Fatal("libvirtd did not come up")
		}
		time.Sleep(100 * time.Millisecond)
	}

	dir, err := os.MkdirTemp("", "cvtpm-libvirt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o777)
	initrd := filepath.Join(dir, "initrd.cpio")
	b, _ := os.ReadFile(buildInitrd(t))
	os.WriteFile(initrd, b, 0o644)
	name := fmt.Sprintf("cvtpm-test-%d", time.Now().UnixNano())
	var u [16]byte
	rand.Read(u[:])
	uuid := fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
	xml := filepath.Join(dir, "domain.xml")
	os.WriteFile(xml, []byte(fmt.Sprintf(`<domain type='qemu'>
  <name>%s</name>
  <uuid>%s</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>%s</kernel>
    <initrd>%s</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='%s/console-BOOT.log'/><target port='0'/></serial>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>`, name, uuid, kernel(t), initrd, dir)), 0o644)
	boot := func(n int) map[string]string {
		t.Helper()
		// Each boot writes its own console file.
		x, _ := os.ReadFile(xml)
		os.WriteFile(xml, []byte(strings.ReplaceAll(string(x), fmt.Sprintf("console-%d.log", n-1), fmt.Sprintf("console-%d.log", n))), 0o644)
		if n == 1 {
			x, _ := os.ReadFile(xml)
			os.WriteFile(xml, []byte(strings.ReplaceAll(string(x), "console-BOOT.log", "console-1.log")), 0o644)
		}
		if out, err := virsh("define", xml); err != nil {
			t.Fatalf("virsh define: %v\n%s", err, out)
		}
		if out, err := virsh("start", name); err != nil {
			t.Fatalf("virsh start: %v\n%s", err, out)
		}
		console := filepath.Join(dir, fmt.Sprintf("console-%d.log", n))
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		for ctx.Err() == nil {
			if c, _ := os.ReadFile(console); doneRE.Match(c) {
				got := map[string]string{}
				for _, m := range markerRE.FindAllSubmatch(c, -1) {
					got[string(m[1])] = string(m[2])
				}
				// The guest powers off; wait for libvirt to see it.
				for i := 0; i < 100; i++ {
					if st, _ := virsh("domstate", name); strings.Contains(st, "shut off") {
						break
					}
					time.Sleep(100 * time.Millisecond)
				}
				return got
			}
			time.Sleep(200 * time.Millisecond)
		}
		c, _ := os.ReadFile(console)
		log, _ := os.ReadFile("/var/log/libvirt/qemu/" + name + "-swtpm.log")
		t.Fatalf("boot %d did not finish:\n%s\nswtpm log:\n%s", n, tail(c), log)
		return nil
	}
	t.Cleanup(func() {
		virsh("destroy", name)
		virsh("undefine", name, "--tpm")
	})
	first := boot(1)
	if first["TPM0"] != "present" || first["MAJOR"] != "2" || len(first["PCR0"]) != 64 || first["PCR0"] == strings.Repeat("0", 64) {
		t.Fatalf("first boot: %v", first)
	}
	if len(first["EKCERT"]) != 64 {
		t.Fatalf("the guest read no EK certificate (swtpm_setup through libvirt): %q", first["EKCERT"])
	}
	state := filepath.Join("/var/lib/libvirt/swtpm", uuid, "tpm2")
	if _, err := os.Stat(filepath.Join(state, "cvtpm.permall")); err != nil {
		t.Fatalf("the domain's TPM state is not cvtpm's: %v", err)
	}
	second := boot(2)
	if second["EKCERT"] != first["EKCERT"] || second["PCR0"] != first["PCR0"] {
		t.Fatalf("second boot: EK certificate %s (first %s), PCR0 %s (first %s)", second["EKCERT"], first["EKCERT"], second["PCR0"], first["PCR0"])
	}
	t.Logf("libvirt domain with cvtpm as swtpm: PCR0 %s, EK certificate sha256 %s, kept across a restart", first["PCR0"][:16], first["EKCERT"][:16])
}
