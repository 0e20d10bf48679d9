package test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"cvtpm/attest/csv"
	"cvtpm/attest/ear"
	"cvtpm/attest/verifier"
	"cvtpm/ca"
	"cvtpm/test/testenv"
)

// The guest's /init for TestRealGuest: a Debian kernel booted by OVMF with
// the TPM on the frontend's socket (QEMU path, /dev/tpm0) and the guest
// proxy inside reaching the same instance through the host's relay over
// QEMU's user network (encrypted path, /dev/tpm1 through vtpm_proxy). It
// prints what the test checks between CVTPM- markers and powers off.
const realGuestInit = `#!/bin/sh
export PATH=/bin:/usr/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu HOME=/
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t securityfs securityfs /sys/kernel/security
mkdir -p /tmp
insmod /lib/modules/e1000e.ko
insmod /lib/modules/tpm_vtpm_proxy.ko
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
# The e1000e link comes up a moment after the interface.
i=0
while ! ping -c 1 -W 1 10.0.2.2 > /dev/null 2>&1 && [ $i -lt 30 ]; do sleep 0.5; i=$((i+1)); done
i=0
while [ ! -e /dev/tpm0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
for n in 0 1 2 3 4 5 6 7 8 9; do echo "CVTPM-QEMUPCR$n: $(cat /sys/class/tpm/tpm0/pcr-sha256/$n)"; done
echo "CVTPM-EVENTLOG: $(base64 -w 0 /sys/kernel/security/tpm0/binary_bios_measurements)"
cvtpm guest proxy --vtpm-proxy --link {{RELAY}} --instance vm1 --tls-cert /etc/cvtpm/guest.pem --tls-key /etc/cvtpm/guest.key \
  --policy {{POLICY}} --cert-dir {{CERTDIR}} > /tmp/proxy.log 2>&1 &
i=0
while [ ! -e /dev/tpmrm1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
if [ -e /dev/tpmrm1 ]; then echo "CVTPM-VTPM: present"; else echo "CVTPM-VTPM: absent"; cat /tmp/proxy.log; fi
export TPM2TOOLS_TCTI=device:/dev/tpmrm1
tpm2 pcrread sha256:0,1,2,3,4,5,6,7,8,9 | sed -n 's/^ *\([0-9]*\) *: *0x\([0-9A-Fa-f]*\)$/CVTPM-VTPMPCR\1: \2/p'
echo "CVTPM-RANDOM: $(tpm2 getrandom --hex 16)"
attest() {
  cvtpm guest attest --tpm /dev/tpmrm1 --ca {{CA}} --ca-fingerprint {{CAFP}} --verifier {{VERIFIER}} \
    --verifier-key /etc/cvtpm/verifier.pub.pem --workload-evidence --workload-csv-sim {{WORKLOAD}} --json > /tmp/out 2> /tmp/err
  echo "CVTPM-ATTEST$1RC: $?"
  echo "CVTPM-ATTEST$1: $(base64 -w 0 /tmp/out)"
  echo "CVTPM-ATTEST$1ERR: $(base64 -w 0 /tmp/err)"
}
attest 1
# PCR 9 (the kernel's EFI stub measured the initrd and command line into
# it) extended behind the event log's back.
tpm2 pcrextend 9:sha256={{UNLOGGED}}
attest 2
echo "CVTPM-PROXYLOG: $(base64 -w 0 /tmp/proxy.log)"
echo "CVTPM-DONE"
poweroff -f
`

// TestRealGuest is a workload VM end to end, as an operator runs it: OVMF
// measures the boot into the instance (through QEMU and the frontend), the
// guest proxy inside the VM opens an attested session to the same instance
// through the host's relay and exposes it as /dev/tpm1, tpm2-tools use it,
// and `cvtpm guest attest` sends the firmware's own event log with the
// quote and the workload leg to the verifier on the host, which affirms it;
// a PCR extended behind the log's back is refused. The PCRs read through
// /dev/tpm0 (QEMU path), /dev/tpmrm1 (encrypted path) and the PCRs the
// verifier saw in the quote are the same: one instance, two paths. The
// firmware's log then gives reference values (`cvtpm verifier reference`)
// equal to the PCRs.
func TestRealGuest(t *testing.T) {
	qemu := testenv.Tool(t, "qemu-system-x86_64")
	const ovmfCode, ovmfVars = "/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"
	if _, err := os.Stat(ovmfCode); err != nil {
		t.Fatalf("OVMF is not installed (run 'make deps'): %v", err)
	}
	bin := testenv.Binary(t, testenv.Cvtpm)
	f := testenv.NewTopologyFiles(t, 0x7)
	caDir := filepath.Join(f.Dir, "ca")
	c := startCAProc(t, caDir, f.Policy, "--hsk-cek", filepath.Join(f.SimDir, csv.SimHSKCEKFile))
	topo := testenv.StartBackend(t, f, "--ca", c.Addr, "--ca-fingerprint", c.Fingerprint)
	if out := topo.Admin(t, "create", "--enroll", "vm1"); !strings.Contains(out, "vm1") {
		t.Fatalf("create --enroll: %s", out)
	}
	ctrl := startFrontend(t, f, topo, "vm1")["vm1"]
	relay := topo.StartPlainRelay(t)

	// The workload VM's own CSV report comes from the simulator (this VM is
	// not a CSV guest); the verifier finds its chip's HSK+CEK by serial.
	workloadMeasure := strings.Repeat("5a", 32)
	workload := filepath.Join(f.Dir, "workload-csv")
	testenv.Run(t, nil, bin, "csv", "simulate", "--out", workload, "--chip", "SIMWORK01", "--measure", workloadMeasure, "--policy", "0x7")
	os.MkdirAll(filepath.Join(f.CertDir, "hsk_cek", "SIMWORK01"), 0o700)
	copyFile(t, filepath.Join(workload, csv.SimHSKCEKFile), filepath.Join(f.CertDir, "hsk_cek", "SIMWORK01", csv.SimHSKCEKFile))
	workloadPolicy := filepath.Join(f.Dir, "workload-policy.json")
	os.WriteFile(workloadPolicy, []byte(fmt.Sprintf(`{"simulator_roots": [%q], "approved_measurements": [%q]}`,
		filepath.Join(workload, csv.SimRootFile), workloadMeasure)), 0o600)
	vAddr, vHTTP := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t)), fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	vKey := filepath.Join(f.Dir, "verifier.key")
	testenv.StartDaemon(t, "verifier", []string{"tcp:" + vAddr}, "verifier",
		"--ek-root", c.RootFile(ca.PurposeEK), "--ak-root", c.RootFile(ca.PurposeAK), "--crl", c.CRLURL(ca.PurposeEK), "--crl", c.CRLURL(ca.PurposeAK),
		"--policy", f.Policy, "--cert-dir", f.CertDir, "--workload-policy", workloadPolicy, "--require-workload",
		"--token-key", vKey, "--listen", vAddr, "--http", vHTTP)

	// From inside the VM, the host's loopback is 10.0.2.2 (QEMU's user
	// network); the guest's files sit at the host's paths so the policy
	// files' own paths hold.
	guestAddr := func(a string) string {
		return strings.Replace(strings.TrimPrefix(a, "tcp:"), "127.0.0.1", "10.0.2.2", 1)
	}
	initScript := strings.NewReplacer(
		"{{RELAY}}", "tcp:"+guestAddr(relay), "{{POLICY}}", f.Policy, "{{CERTDIR}}", f.CertDir,
		"{{CA}}", guestAddr(c.Addr), "{{CAFP}}", c.Fingerprint, "{{VERIFIER}}", guestAddr(vAddr),
		"{{WORKLOAD}}", workload, "{{UNLOGGED}}", strings.Repeat("ee", 32)).Replace(realGuestInit)
	var g guestImage
	g.addFile(t, "/etc/cvtpm/guest.pem", f.Certs["guest-vm1"][0])
	g.addFile(t, "/etc/cvtpm/guest.key", f.Certs["guest-vm1"][1])
	g.addFile(t, "/etc/cvtpm/verifier.pub.pem", vKey+".pub.pem")
	for _, p := range []string{f.Policy, f.SimDir, f.CertDir, workload} {
		g.addTree(t, p)
	}
	g.addProgram(t, "/bin/cvtpm", bin)
	g.addProgram(t, "/usr/bin/tpm2", "/usr/bin/tpm2")
	g.addProgram(t, "/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0", "/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0")
	g.addFile(t, "/bin/busybox", "/bin/busybox")
	for _, applet := range []string{"sh", "mount", "mkdir", "insmod", "ip", "sleep", "cat", "base64", "sed", "ping", "poweroff"} {
		g.symlink("/bin/"+applet, "busybox")
	}
	kver := strings.TrimPrefix(filepath.Base(kernel(t)), "vmlinuz-")
	g.addFile(t, "/lib/modules/e1000e.ko", filepath.Join("/lib/modules", kver, "kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko"))
	g.addFile(t, "/lib/modules/tpm_vtpm_proxy.ko", filepath.Join("/lib/modules", kver, "kernel/drivers/char/tpm/tpm_vtpm_proxy.ko"))
	for _, d := range []string{"/proc", "/sys", "/dev", "/tmp"} {
		g.mkdirs(d)
	}
	g.add("/init", 0o100755, []byte(initScript))
	dir := t.TempDir()
	initrd, vars := filepath.Join(dir, "initrd.cpio"), filepath.Join(dir, "OVMF_VARS.fd")
	os.WriteFile(initrd, g.w.finish(), 0o644)
	copyFile(t, ovmfVars, vars)

	serial := filepath.Join(dir, "serial.log")
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, qemu,
		"-M", "q35", "-accel", "tcg", "-m", "1024", "-smp", "1",
		"-display", "none", "-monitor", "none", "-no-reboot", "-serial", "file:"+serial,
		"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+ovmfCode,
		"-drive", "if=pflash,format=raw,unit=1,file="+vars,
		"-kernel", kernel(t), "-initrd", initrd, "-append", kernelCmdline,
		"-netdev", "user,id=net0", "-device", "e1000e,netdev=net0",
		"-chardev", "socket,id=chrtpm,path="+ctrl,
		"-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0")
	qemuOut, err := cmd.CombinedOutput()
	console, _ := os.ReadFile(serial)
	got := map[string]string{}
	for _, m := range markerRE.FindAllSubmatch(console, -1) {
		got[string(m[1])] = string(m[2])
	}
	t.Cleanup(func() {
		if t.Failed() {
			keepArtefact(t, "console.log", console)
			if pl, err := base64.StdEncoding.DecodeString(got["PROXYLOG"]); err == nil {
				t.Logf("guest proxy log:\n%s", pl)
			}
			t.Logf("backend log:\n%s", topo.Backend.Log)
		}
	})
	if err != nil || !doneRE.Match(console) {
		t.Fatalf("QEMU (OVMF, direct kernel boot): %v\n%s\nserial console:\n%s", err, qemuOut, tail(console))
	}
	t.Logf("guest booted, attested twice and powered off in %s", time.Since(start).Round(time.Second))

	// One instance, two paths: the PCRs through QEMU (the kernel's sysfs
	// of /dev/tpm0) equal those tpm2-tools read through the guest proxy's
	// /dev/tpmrm1.
	if got["VTPM"] != "present" {
		t.Fatalf("the guest proxy made no /dev/tpmrm1 (--vtpm-proxy)")
	}
	qemuPCRs := map[string]string{}
	for n := 0; n <= 9; n++ {
		q, v := strings.ToLower(got[fmt.Sprintf("QEMUPCR%d", n)]), strings.ToLower(got[fmt.Sprintf("VTPMPCR%d", n)])
		if len(q) != 64 || q != v {
			t.Fatalf("PCR %d: %q through /dev/tpm0 (QEMU), %q through /dev/tpmrm1 (guest proxy)", n, q, v)
		}
		qemuPCRs[fmt.Sprint(n)] = q
	}
	if qemuPCRs["0"] == strings.Repeat("0", 64) || qemuPCRs["9"] == strings.Repeat("0", 64) {
		t.Fatalf("PCRs 0 and 9 were not extended by the firmware and the kernel: %v", qemuPCRs)
	}
	if len(got["RANDOM"]) != 32 {
		t.Fatalf("tpm2 getrandom through /dev/tpmrm1: %q", got["RANDOM"])
	}

	// The first attestation: every leg present, the vTPM's affirming (the
	// CSV legs say "warning" only because their evidence is simulated),
	// and the quoted PCRs the verifier saw are the guest's.
	first := attestResult(t, got, "1")
	if first.rc != "0" {
		t.Fatalf("guest attest: exit %s\n%s\n%s", first.rc, first.out, first.err)
	}
	vtpm := first.submod(t, "cvtpm-vtpm")
	if vtpm.Status != verifier.StatusAffirming {
		t.Fatalf("cvtpm-vtpm: %+v", vtpm)
	}
	for _, leg := range []string{"csv-platform", "csv-workload"} {
		if s := first.submod(t, leg); s.Status != verifier.StatusWarning || len(s.Reasons) != 1 || s.Reasons[0] != "simulated-csv-evidence" {
			t.Fatalf("%s: %+v", leg, s)
		}
	}
	seen, _ := vtpm.Evidence["pcrs_sha256"].(map[string]any)
	for n, want := range qemuPCRs {
		if seen[n] != want {
			t.Fatalf("PCR %s: the verifier saw %v in the quote, the guest read %s", n, seen[n], want)
		}
	}
	// The second: PCR 9 no longer replays from the firmware's log.
	second := attestResult(t, got, "2")
	if second.rc != "3" {
		t.Fatalf("attest after an unlogged extend: exit %s\n%s\n%s", second.rc, second.out, second.err)
	}
	if s := second.submod(t, "cvtpm-vtpm"); s.Status != verifier.StatusContraindicated || !strings.Contains(strings.Join(s.Reasons, ","), "eventlog-does-not-match-pcrs") {
		t.Fatalf("cvtpm-vtpm after an unlogged extend of PCR 9: %+v", s)
	}

	// Reference values from this boot's log equal the PCRs.
	eventLog, err := base64.StdEncoding.DecodeString(got["EVENTLOG"])
	if err != nil || len(eventLog) < 1000 {
		t.Fatalf("the firmware's event log from the guest (%d bytes): %v", len(eventLog), err)
	}
	logFile, refFile := filepath.Join(dir, "boot.log"), filepath.Join(dir, "ref.json")
	os.WriteFile(logFile, eventLog, 0o600)
	// The log holds digests only: the operator checks it is the boot of
	// this command line and initrd before pinning its PCRs.
	testenv.Run(t, nil, bin, "verifier", "reference", "--event-log", logFile, "--pcrs", "0,1,2,3,4,5,6,7,9", "--out", refFile,
		"--kernel-cmdline", kernelCmdline+" initrd=initrd", "--initrd", initrd)
	if out, err := testenv.RunErr(nil, bin, "verifier", "reference", "--event-log", logFile, "--kernel-cmdline", kernelCmdline+" init=/bin/sh initrd=initrd"); err == nil || !strings.Contains(out, "--kernel-cmdline") {
		t.Errorf("reference from this boot's log for another command line: %v\n%s", err, out)
	}
	b, _ := os.ReadFile(refFile)
	ref, err := verifier.ParseReference(b)
	if err != nil {
		t.Fatal(err)
	}
	refPCRs := ref["pcrs"].(map[string]any)["sha256"].(map[string]any)
	for _, n := range []string{"0", "1", "2", "3", "4", "5", "6", "7", "9"} {
		if strings.ToLower(fmt.Sprint(refPCRs[n])) != qemuPCRs[n] {
			t.Errorf("reference PCR %s from the firmware's log: %v, the guest read %s", n, refPCRs[n], qemuPCRs[n])
		}
	}
}

// kernelCmdline is the guest's command line (OVMF appends " initrd=initrd").
const kernelCmdline = "console=ttyS0 panic=-1 quiet"

type guestAttestation struct {
	rc, out, err string
	claims       ear.EAR
}

func attestResult(t *testing.T, got map[string]string, n string) *guestAttestation {
	t.Helper()
	a := &guestAttestation{rc: got["ATTEST"+n+"RC"]}
	out, _ := base64.StdEncoding.DecodeString(got["ATTEST"+n])
	errOut, _ := base64.StdEncoding.DecodeString(got["ATTEST"+n+"ERR"])
	a.out, a.err = string(out), string(errOut)
	if a.rc == "0" || a.rc == "3" {
		if err := json.Unmarshal(out, &a.claims); err != nil {
			t.Fatalf("guest attest %s --json: %v\n%s\n%s", n, err, out, errOut)
		}
	}
	return a
}

func (a *guestAttestation) submod(t *testing.T, name string) ear.Submod {
	t.Helper()
	s, ok := a.claims.Submods[name]
	if !ok {
		t.Fatalf("no %s in the verdict:\n%s", name, a.out)
	}
	return s
}

// guestImage is an initramfs built from host files: programs with the
// shared libraries ldd names, so the guest runs the host's own binaries.
type guestImage struct {
	w    cpioWriter
	dirs map[string]bool
	seen map[string]bool
}

func (g *guestImage) add(name string, mode int, data []byte) {
	if g.seen[name] {
		return
	}
	g.mkdirs(filepath.Dir(name))
	g.seen[name] = true
	g.w.add(strings.TrimPrefix(name, "/"), mode, data)
}

func (g *guestImage) mkdirs(dir string) {
	if g.seen == nil {
		g.seen, g.dirs = map[string]bool{}, map[string]bool{}
	}
	if dir == "/" || dir == "." || g.dirs[dir] {
		return
	}
	g.mkdirs(filepath.Dir(dir))
	g.dirs[dir] = true
	g.w.add(strings.TrimPrefix(dir, "/"), 0o040755, nil)
}

func (g *guestImage) symlink(name, target string) {
	g.add(name, 0o120777, []byte(target))
}

// addFile puts the host file src (symlinks followed) at name.
func (g *guestImage) addFile(t *testing.T, name, src string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	mode := 0o100644
	if st, _ := os.Stat(src); st != nil && st.Mode()&0o111 != 0 {
		mode = 0o100755
	}
	g.add(name, mode, b)
}

// addTree copies a host file or directory to the same path in the guest.
func (g *guestImage) addTree(t *testing.T, root string) {
	t.Helper()
	err := filepath.Walk(root, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		g.addFile(t, p, p)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

var lddPath = regexp.MustCompile(`(?m)(?:=>\s*)?(/\S+)\s+\(0x`)

// addProgram adds a dynamically linked program (or library) and every
// library ldd resolves for it, at the host's paths.
func (g *guestImage) addProgram(t *testing.T, name, src string) {
	t.Helper()
	g.addFile(t, name, src)
	out, err := exec.Command("ldd", src).CombinedOutput()
	if err != nil && !bytes.Contains(out, []byte("not a dynamic executable")) {
		t.Fatalf("ldd %s: %v\n%s", src, err, out)
	}
	for _, m := range lddPath.FindAllSubmatch(out, -1) {
		g.addFile(t, string(m[1]), string(m[1]))
	}
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// keepArtefact saves b beyond the test's temporary directory (in
// $CVTPM_ARTEFACTS, default $TMPDIR/cvtpm-artefacts) and says where.
func keepArtefact(t *testing.T, name string, b []byte) {
	dir := os.Getenv("CVTPM_ARTEFACTS")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "cvtpm-artefacts")
	}
	path := filepath.Join(dir, strings.NewReplacer("/", "_").Replace(t.Name())+"-"+name)
	if err := os.MkdirAll(dir, 0o755); err == nil && os.WriteFile(path, b, 0o644) == nil {
		t.Logf("kept %s", path)
	}
}
