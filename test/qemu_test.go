package test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"sync"
	"testing"
	"time"

	"cvtpm/test/testenv"
)

// The guest's /init: mount the pseudo file systems, wait for /dev/tpm0,
// print the TPM's major version and its sha256 PCRs 0-7 on the serial
// console between markers, power off.
const guestInit = `#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
i=0
while [ ! -e /dev/tpm0 ] && [ $i -lt 100 ]; do $B sleep 0.1; i=$((i+1)); done
if [ -e /dev/tpm0 ]; then echo "CVTPM-TPM0: present"; else echo "CVTPM-TPM0: absent"; fi
echo "CVTPM-MAJOR: $($B cat /sys/class/tpm/tpm0/tpm_version_major)"
for n in 0 1 2 3 4 5 6 7; do echo "CVTPM-PCR$n: $($B cat /sys/class/tpm/tpm0/pcr-sha256/$n)"; done
if $B grep -q cvtpm.migrate /proc/cmdline; then
  # Live migration test: keep reading PCR 0 through the TPM while QEMU
  # moves the VM to another host.
  i=0
  while [ $i -lt 400 ]; do echo "CVTPM-TICK$i: $($B cat /sys/class/tpm/tpm0/pcr-sha256/0)"; $B sleep 0.2; i=$((i+1)); done
fi
/bin/guestprobe
echo "CVTPM-DONE"
$B poweroff -f
`

var (
	initrdOnce sync.Once
	initrdPath string
	initrdErr  error
)

// buildInitrd writes a newc cpio archive with busybox and the init script.
func buildInitrd(t *testing.T) string {
	initrdOnce.Do(func() {
		bb, err := os.ReadFile("/bin/busybox")
		if err != nil {
			initrdErr = fmt.Errorf("busybox-static is not installed (run 'make deps'): %w", err)
			return
		}
		var w cpioWriter
		for _, d := range []string{"bin", "dev", "proc", "sys"} {
			w.add(d, 0o040755, nil)
		}
		w.add("bin/busybox", 0o100755, bb)
		probe, err := buildGuestProbe()
		if err != nil {
			initrdErr = err
			return
		}
		w.add("bin/guestprobe", 0o100755, probe)
		w.add("init", 0o100755, []byte(guestInit))
		testenv.RemoveStaleTemp("cvtpm-initrd*")
		dir, err := os.MkdirTemp("", "cvtpm-initrd")
		if err != nil {
			initrdErr = err
			return
		}
		initrdPath = filepath.Join(dir, "initrd.cpio")
		initrdErr = os.WriteFile(initrdPath, w.finish(), 0o644)
	})
	if initrdErr != nil {
		t.Fatal(initrdErr)
	}
	return initrdPath
}

// buildGuestProbe compiles test/guestprobe statically for the guest.
func buildGuestProbe() ([]byte, error) {
	dir, err := os.MkdirTemp("", "cvtpm-probe")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "guestprobe")
	cmd := exec.Command("go", "build", "-o", out, "./test/guestprobe")
	cmd.Dir = testenv.RepoRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("building the guest probe: %v\n%s", err, b)
	}
	return os.ReadFile(out)
}

// cpioWriter writes the "newc" format the kernel unpacks as initramfs.
type cpioWriter struct {
	buf bytes.Buffer
	ino int
}

func (w *cpioWriter) add(name string, mode int, data []byte) {
	w.ino++
	fmt.Fprintf(&w.buf, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		w.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	w.buf.WriteString(name)
	w.buf.WriteByte(0)
	w.pad()
	w.buf.Write(data)
	w.pad()
}

func (w *cpioWriter) pad() {
	for w.buf.Len()%4 != 0 {
		w.buf.WriteByte(0)
	}
}

func (w *cpioWriter) finish() []byte {
	w.ino = -1
	w.add("TRAILER!!!", 0, nil)
	return w.buf.Bytes()
}

func kernel(t *testing.T) string {
	ks, _ := filepath.Glob("/boot/vmlinuz-*")
	if len(ks) == 0 {
		t.Fatal("no /boot/vmlinuz-*: install linux-image-amd64 ('make deps')")
	}
	sort.Strings(ks)
	return ks[len(ks)-1]
}

var (
	markerRE = regexp.MustCompile(`CVTPM-(\w+): *(\S*)`)
	doneRE   = regexp.MustCompile(`CVTPM-DONE`)
)

// boot starts QEMU under TCG with the TPM device on srv's control socket
// and returns what the guest printed between the markers.
func boot(t *testing.T, srv *testenv.Server, device string) map[string]string {
	return bootWith(t, srv.CtrlPath, string(srv.Impl), srv.Log, device)
}

// bootWith boots QEMU against any swtpm control socket; logs explains a
// failure.
func bootWith(t *testing.T, ctrlPath, impl string, logs fmt.Stringer, device string) map[string]string {
	qemu := testenv.Tool(t, "qemu-system-x86_64")
	serial := filepath.Join(t.TempDir(), "serial.log")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemu,
		"-M", "q35", "-accel", "tcg", "-m", "256", "-smp", "1",
		"-display", "none", "-monitor", "none", "-no-reboot",
		"-serial", "file:"+serial,
		"-kernel", kernel(t), "-initrd", buildInitrd(t),
		"-append", "console=ttyS0 panic=-1 quiet",
		"-chardev", "socket,id=chrtpm,path="+ctrlPath,
		"-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
		"-device", device+",tpmdev=tpm0")
	out, err := cmd.CombinedOutput()
	console, _ := os.ReadFile(serial)
	if err != nil || !doneRE.Match(console) {
		t.Fatalf("QEMU with %s on %s: %v\n%s\nserial console:\n%s\n%s log:\n%s", device, impl, err, out, tail(console), impl, logs)
	}
	got := map[string]string{}
	for _, m := range markerRE.FindAllSubmatch(console, -1) {
		got[string(m[1])] = string(m[2])
	}
	return got
}

func tail(b []byte) []byte {
	if len(b) > 3000 {
		return b[len(b)-3000:]
	}
	return b
}

// TestQEMUBoot boots a Debian kernel with a busybox initramfs under QEMU's
// TCG, with the TPM behind -tpmdev emulator, for tpm-tis and tpm-crb: the
// guest must see a TPM 2.0 at /dev/tpm0, and the PCRs 0-7 that SeaBIOS
// measured must be the same with cvtpm as with swtpm.
func TestQEMUBoot(t *testing.T) {
	for _, device := range []string{"tpm-tis", "tpm-crb"} {
		t.Run(device, func(t *testing.T) {
			t.Parallel()
			results := map[testenv.Impl]map[string]string{}
			for _, impl := range testenv.Both {
				srv := testenv.StartSocket(t, impl, testenv.Options{NoServer: true, NoFlags: true})
				got := boot(t, srv, device)
				if got["TPM0"] != "present" || got["MAJOR"] != "2" {
					t.Fatalf("%s/%s: guest sees tpm0=%q major=%q", impl, device, got["TPM0"], got["MAJOR"])
				}
				t.Logf("%s with %s: PCR0=%s PCR4=%s", impl, device, got["PCR0"], got["PCR4"])
				results[impl] = got
			}
			for n := range 8 {
				k := fmt.Sprintf("PCR%d", n)
				sw, cv := results[testenv.Swtpm][k], results[testenv.Cvtpm][k]
				if len(sw) != 64 {
					t.Fatalf("swtpm boot: %s = %q, not a sha256 value", k, sw)
				}
				if cv != sw {
					t.Errorf("%s: cvtpm %s, swtpm %s", k, cv, sw)
				}
			}
			if results[testenv.Swtpm]["PCR0"] == "0000000000000000000000000000000000000000000000000000000000000000" {
				t.Fatalf("PCR0 is zero: firmware measured nothing, the comparison proves little")
			}
		})
	}
}
