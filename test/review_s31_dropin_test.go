package test

// Review s31: the swtpm drop-in's seccomp filter as the operator gets it
// from the real binaries.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/google/go-tpm/tpm2"
	"golang.org/x/sys/unix"

	"cvtpm/internal/tpmsock"
	"cvtpm/test/testenv"
)

// A helper process (this test binary again) reads a process's seccomp
// filter with ptrace: the test process itself must not be the tracer of
// its own child, whose stops Cmd.Wait would then collect.
func init() {
	p := os.Getenv("REVIEW_S31_GETFILTER")
	if p == "" {
		return
	}
	pid, _ := strconv.Atoi(p)
	rets, err := reviewS31FilterReturns(pid)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	for _, k := range rets {
		fmt.Printf("%#x\n", k)
	}
	os.Exit(0)
}

// reviewS31FilterReturns stops pid (PTRACE_SEIZE, PTRACE_INTERRUPT), reads
// its first seccomp filter (PTRACE_SECCOMP_GET_FILTER, CAP_SYS_ADMIN) and
// returns the values of its return-constant instructions.
func reviewS31FilterReturns(pid int) ([]uint32, error) {
	runtime.LockOSThread()
	if _, _, e := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_SEIZE, uintptr(pid), 0, 0, 0, 0); e != 0 {
		return nil, fmt.Errorf("PTRACE_SEIZE: %w", e)
	}
	defer unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_DETACH, uintptr(pid), 0, 0, 0, 0)
	if _, _, e := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_INTERRUPT, uintptr(pid), 0, 0, 0, 0); e != 0 {
		return nil, fmt.Errorf("PTRACE_INTERRUPT: %w", e)
	}
	var ws unix.WaitStatus
	if _, err := unix.Wait4(pid, &ws, unix.WALL, nil); err != nil {
		return nil, fmt.Errorf("wait4: %w", err)
	}
	n, _, e := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_SECCOMP_GET_FILTER, uintptr(pid), 0, 0, 0, 0)
	if e != 0 {
		return nil, fmt.Errorf("PTRACE_SECCOMP_GET_FILTER: %w", e)
	}
	prog := make([]unix.SockFilter, n)
	if _, _, e := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_SECCOMP_GET_FILTER, uintptr(pid), 0, uintptr(unsafe.Pointer(&prog[0])), 0, 0); e != 0 {
		return nil, fmt.Errorf("PTRACE_SECCOMP_GET_FILTER: %w", e)
	}
	var rets []uint32
	for _, in := range prog {
		if in.Code == unix.BPF_RET|unix.BPF_K {
			rets = append(rets, in.K)
		}
	}
	return rets, nil
}

// The drop-in's filter without --seccomp must refuse by killing, as
// swtpm's default and the documentation (README, vtpm/README, --help)
// say: SECCOMP_RET_KILL_PROCESS, no SECCOMP_RET_LOG. TestDropInSeccomp's
// "default" case only sees that some filter is there (Seccomp: 2), which
// action=log gives as well.
func TestReviewS31DropInDefaultActionIsKill(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("reading a filter with ptrace needs CAP_SYS_ADMIN")
	}
	srv := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprint("REVIEW_S31_GETFILTER=", srv.Cmd.Process.Pid))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("reading the drop-in's filter: %v: %s", err, out)
	}
	rets := strings.Fields(string(out))
	kill := fmt.Sprintf("%#x", uint32(unix.SECCOMP_RET_KILL_PROCESS))
	logged := fmt.Sprintf("%#x", uint32(unix.SECCOMP_RET_LOG))
	hasKill, hasLog := false, false
	for _, r := range rets {
		hasKill = hasKill || r == kill
		hasLog = hasLog || r == logged
	}
	if !hasKill || hasLog {
		t.Errorf("the drop-in started without --seccomp refuses with %v (want %s, SECCOMP_RET_KILL_PROCESS; %s is SECCOMP_RET_LOG: nothing refused)", rets, kill, logged)
	}
	// Still serving after the ptrace stop.
	conn, err := tpmsock.Dial(context.Background(), "unix", srv.DataPath)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(conn); err != nil {
		t.Fatalf("GetRandom after reading the filter: %v", err)
	}
}

// `cvtpm socket` served by the full binary (CVTPM_SOCKET_LEAN=off, or when
// the sibling cvtpm-swtpm is missing or not trusted) is dynamically
// linked and its libcrypto reads openssl.cnf: at its first use, in
// engine.New, after confineDropIn. A host configuration that has
// libcrypto open a socket or a device (here the afalg engine, which
// Debian's libssl3 ships; equally a PKCS#11 or TPM provider activated
// globally) then kills the drop-in with SIGSYS at start, where the lean
// binary, which reads no configuration, serves.
func TestReviewS31FullBinaryOpenSSLConfigUnderFilter(t *testing.T) {
	out, err := exec.Command("openssl", "version", "-e").Output()
	if err != nil {
		t.Fatalf("openssl version -e: %v", err)
	}
	m := regexp.MustCompile(`ENGINESDIR: "([^"]+)"`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no ENGINESDIR in %q", out)
	}
	afalg := filepath.Join(string(m[1]), "afalg.so")
	if _, err := os.Stat(afalg); err != nil {
		t.Fatalf("libssl3's afalg engine: %v", err)
	}
	cnf := filepath.Join(t.TempDir(), "openssl.cnf")
	os.WriteFile(cnf, []byte(`openssl_conf = openssl_init
[openssl_init]
engines = engine_section
[engine_section]
afalg = afalg_section
[afalg_section]
dynamic_path = `+afalg+`
default_algorithms = ALL
init = 1
`), 0o644)
	for _, c := range []struct {
		name string
		env  []string
	}{
		{"lean cvtpm-swtpm", nil},
		{"cvtpm socket with CVTPM_SOCKET_LEAN off", []string{"CVTPM_SOCKET_LEAN=off"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			env := append(append(os.Environ(), "OPENSSL_CONF="+cnf), c.env...)
			srv := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{
				ExtraArgs: []string{"--seccomp", "action=kill"},
				Start:     func(cmd *exec.Cmd) error { cmd.Env = env; return cmd.Start() },
			})
			conn, err := tpmsock.Dial(context.Background(), "unix", srv.DataPath)
			if err == nil {
				_, err = (tpm2.GetRandom{BytesRequested: 8}).Execute(conn)
				conn.Close()
			}
			if err == nil {
				return
			}
			srv.Wait(2 * time.Second)
			state := "still running"
			if srv.Exited() {
				state = srv.Cmd.ProcessState.String()
				if ws, ok := srv.Cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					state += " (" + ws.Signal().String() + ")"
				}
			}
			t.Errorf("with OPENSSL_CONF loading an engine, the drop-in does not serve: %v; process: %s\n%s", err, state, srv.Log)
		})
	}
}

// reviewS31CodeMappings lists pid's executable file mappings ("start
// path"), the vDSO and vsyscall pages left out.
func reviewS31CodeMappings(t *testing.T, pid int) []string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 6 || !strings.Contains(f[1], "x") || strings.HasPrefix(f[5], "[") {
			continue
		}
		out = append(out, strings.Split(f[0], "-")[0]+" "+filepath.Base(f[5]))
	}
	return out
}
