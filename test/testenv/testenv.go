// Package testenv starts swtpm or cvtpm with the same command line for
// cross-component tests, waits until they serve, and cleans up after them.
// Tests written on it run unchanged against both implementations, which is
// how they prove cvtpm is a drop-in for swtpm.
package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	mathrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Impl names a TPM server implementation.
type Impl string

const (
	Swtpm Impl = "swtpm"
	Cvtpm Impl = "cvtpm"
)

// Both is the list tests iterate over.
var Both = []Impl{Swtpm, Cvtpm}

var (
	buildOnce sync.Once
	built     string
	buildErr  error
)

// RepoRoot is the module's root directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// Binary returns the path of impl's executable: swtpm from $SWTPM_BIN or
// PATH, cvtpm from $CVTPM_BIN or built once per test process from
// ./cmd/cvtpm.
func Binary(tb testing.TB, impl Impl) string {
	tb.Helper()
	if impl == Swtpm {
		if p := os.Getenv("SWTPM_BIN"); p != "" {
			return p
		}
		return Tool(tb, "swtpm")
	}
	if p := os.Getenv("CVTPM_BIN"); p != "" {
		return p
	}
	buildOnce.Do(func() {
		RemoveStaleTemp("cvtpm-testbin*")
		dir, err := os.MkdirTemp("", "cvtpm-testbin")
		if err != nil {
			buildErr = err
			return
		}
		// Reachable by other users: libvirt runs the swtpm symlink as tss.
		os.Chmod(dir, 0o755)
		built = filepath.Join(dir, "cvtpm")
		// cvtpm-verifier, cvtpm-worker and cvtpm-swtpm beside it:
		// `cvtpm verifier` and the backend run the first two from there.
		cmd := exec.Command("go", "build", "-o", dir+"/", "./cmd/cvtpm", "./cmd/cvtpm-verifier", "./cmd/cvtpm-worker", "./cmd/cvtpm-swtpm")
		cmd.Dir = RepoRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/cvtpm ./cmd/cvtpm-verifier: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		tb.Fatal(buildErr)
	}
	return built
}

// RemoveStaleTemp deletes temporary directories matching pattern that
// earlier test processes left (each process builds its own binaries and
// images, and nothing runs after the last test to remove them); an
// hour-old one belongs to no running test.
func RemoveStaleTemp(pattern string) {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), pattern))
	for _, d := range dirs {
		if fi, err := os.Stat(d); err == nil && time.Since(fi.ModTime()) > time.Hour {
			os.RemoveAll(d)
		}
	}
}

// Tool returns the path of a peer program, failing the test with the fix
// when it is missing: tests never skip silently.
func Tool(tb testing.TB, name string) string {
	tb.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		tb.Fatalf("%s is not installed: run 'make deps' (scripts/install-deps.sh)", name)
	}
	return p
}

// Options shape the command line; the same options give the same command
// line for both implementations.
type Options struct {
	StateDir  string   // default: a new temporary directory (StartSocket); Launch needs it
	TCP       bool     // data and control channel on loopback TCP instead of unix sockets
	NoServer  bool     // control channel only (as QEMU uses it)
	Flags     string   // --flags; default "not-need-init,startup-clear"
	NoFlags   bool     // no --flags at all (QEMU initialises the TPM itself)
	MSSIM     bool     // also serve --mssim (cvtpm only)
	ExtraArgs []string // appended verbatim, e.g. --key ...
	// RunAs passes --runas RunAs and gives the state and socket
	// directories to that user (a name in /etc/passwd); needs root.
	RunAs string

	// Start starts the prepared command; default (*exec.Cmd).Start. The
	// benchmarks use it to start the server pinned to a CPU.
	Start func(*exec.Cmd) error
}

// Server is a running TPM server.
type Server struct {
	Impl      Impl
	StateDir  string
	CtrlPath  string // unix control socket
	DataPath  string // unix data socket
	DataPort  int    // TCP data port (control is DataPort+1)
	MSSIMPort int
	Cmd       *exec.Cmd
	Log       *bytes.Buffer
	// StartDur is the time from starting the process until it served: its
	// data socket accepted a connection and its other sockets existed.
	StartDur time.Duration
	sockDir  string // removed by Close (and by StartSocket's cleanup)
	done     chan struct{}
}

// startTimeout bounds StartSocket's wait for a server to serve.
const startTimeout = 10 * time.Second

// StartSocket starts `<impl> socket --tpm2 ...` and waits until it accepts
// connections. The server is stopped when the test ends.
func StartSocket(tb testing.TB, impl Impl, opts Options) *Server {
	tb.Helper()
	if opts.StateDir == "" {
		opts.StateDir = tb.TempDir()
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	s, err := Launch(ctx, impl, Binary(tb, impl), opts)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		s.Stop(tb)
		os.RemoveAll(s.sockDir)
	})
	return s
}

// Launch starts `bin socket --tpm2 ...` for impl with opts.StateDir and
// returns once the server serves, or an error when it exits first or ctx
// ends (the process is then ended). Unlike StartSocket it is not tied to a
// test: the caller ends it with Close. The benchmarks use it for servers that
// several benchmarks share.
func Launch(ctx context.Context, impl Impl, bin string, opts Options) (*Server, error) {
	if opts.StateDir == "" {
		return nil, fmt.Errorf("launching %s: no state directory in the options", impl)
	}
	s := &Server{Impl: impl, StateDir: opts.StateDir, Log: &bytes.Buffer{}, done: make(chan struct{})}
	sockDir, err := os.MkdirTemp("", "cvt")
	if err != nil {
		return nil, fmt.Errorf("socket directory for %s: %w", impl, err)
	}
	s.sockDir = sockDir
	flags := opts.Flags
	if flags == "" {
		flags = "not-need-init,startup-clear"
	}
	args := []string{"socket", "--tpm2", "--tpmstate", "dir=" + s.StateDir}
	if !opts.NoFlags {
		args = append(args, "--flags", flags)
	}
	switch {
	case opts.TCP:
		if s.DataPort, err = freePort(); err != nil {
			os.RemoveAll(sockDir)
			return nil, err
		}
		args = append(args,
			"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", s.DataPort),
			"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", s.DataPort+1))
	default:
		s.DataPath = filepath.Join(sockDir, "tpm.sock")
		s.CtrlPath = s.DataPath + ".ctrl"
		if !opts.NoServer {
			args = append(args, "--server", "type=unixio,path="+s.DataPath)
		}
		args = append(args, "--ctrl", "type=unixio,path="+s.CtrlPath)
	}
	if opts.MSSIM {
		if s.MSSIMPort, err = freePort(); err != nil {
			os.RemoveAll(sockDir)
			return nil, err
		}
		args = append(args, "--mssim", fmt.Sprintf("port=%d,bindaddr=127.0.0.1", s.MSSIMPort))
	}
	if opts.RunAs != "" {
		if err := chownTo(opts.RunAs, s.StateDir, sockDir); err != nil {
			os.RemoveAll(sockDir)
			return nil, err
		}
		args = append(args, "--runas", opts.RunAs)
	}
	args = append(args, opts.ExtraArgs...)
	s.Cmd = exec.Command(bin, args...)
	s.Cmd.Stdout, s.Cmd.Stderr = s.Log, s.Log
	start := opts.Start
	if start == nil {
		start = (*exec.Cmd).Start
	}
	t0 := time.Now()
	if err := start(s.Cmd); err != nil {
		os.RemoveAll(sockDir)
		return nil, fmt.Errorf("starting %s (%s): %w", impl, bin, err)
	}
	go func() { s.Cmd.Wait(); close(s.done) }()
	if err := s.waitServing(ctx, opts); err != nil {
		s.Close()
		return nil, err
	}
	s.StartDur = time.Since(t0)
	return s, nil
}

// chownTo gives dirs to the user name and that user's primary group, or,
// for a number, to that uid and the gid of the same number (--runas's
// reading).
func chownTo(name string, dirs ...string) error {
	uid, err := strconv.Atoi(name)
	gid := uid
	if err != nil {
		u, err := user.Lookup(name)
		if err != nil {
			return err
		}
		if uid, err = strconv.Atoi(u.Uid); err != nil {
			return err
		}
		if gid, err = strconv.Atoi(u.Gid); err != nil {
			return err
		}
	}
	for _, d := range dirs {
		if err := os.Chown(d, uid, gid); err != nil {
			return err
		}
	}
	return nil
}

// waitServing polls until the data socket accepts a connection and the
// other sockets exist or accept.
func (s *Server) waitServing(ctx context.Context, opts Options) error {
	type probe struct {
		network, addr string
		dial          bool
	}
	var probes []probe
	switch {
	case opts.TCP:
		probes = append(probes, probe{"tcp", fmt.Sprintf("127.0.0.1:%d", s.DataPort), true})
	case opts.NoServer:
		probes = append(probes, probe{"unix", s.CtrlPath, false})
	default:
		// A stat for the control socket: connecting would count as a
		// client (swtpm serves one control client at a time).
		probes = append(probes, probe{"unix", s.DataPath, true}, probe{"unix", s.CtrlPath, false})
	}
	if opts.MSSIM {
		probes = append(probes, probe{"tcp", fmt.Sprintf("127.0.0.1:%d", s.MSSIMPort), true})
	}
	// A fine poll: the start benchmarks time servers that start in a few
	// milliseconds.
	const poll = 100 * time.Microsecond
	for _, p := range probes {
		for {
			if p.dial {
				if c, err := net.DialTimeout(p.network, p.addr, time.Second); err == nil {
					c.Close()
					break
				}
			} else if fi, err := os.Stat(p.addr); err == nil && fi.Mode()&os.ModeSocket != 0 {
				break
			}
			select {
			case <-s.done:
				return fmt.Errorf("%s exited during start-up: %v\n%s", s.Impl, s.Cmd.ProcessState, s.Log)
			case <-ctx.Done():
				return fmt.Errorf("%s does not listen on %s: %w\n%s", s.Impl, p.addr, ctx.Err(), s.Log)
			case <-time.After(poll):
			}
		}
	}
	return nil
}

// TCTI is the tpm2-tss TCTI string for the swtpm protocol.
func (s *Server) TCTI() string {
	if s.DataPort != 0 {
		return fmt.Sprintf("swtpm:host=127.0.0.1,port=%d", s.DataPort)
	}
	return "swtpm:path=" + s.DataPath
}

// MSSIMTCTI is the tpm2-tss TCTI string for the mssim protocol.
func (s *Server) MSSIMTCTI() string {
	return fmt.Sprintf("mssim:host=127.0.0.1,port=%d", s.MSSIMPort)
}

// Exited reports whether the process has ended.
func (s *Server) Exited() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// Wait waits up to d for the process to end by itself.
func (s *Server) Wait(d time.Duration) bool {
	select {
	case <-s.done:
		return true
	case <-time.After(d):
		return false
	}
}

// Stop ends the server gracefully (SIGTERM), killing it after 5 s.
func (s *Server) Stop(tb testing.TB) {
	if err := s.stop(); err != nil {
		tb.Log(err)
	}
}

// Close ends a server started by Launch like Stop and removes its socket
// directory; the error tells when it had to be killed.
func (s *Server) Close() error {
	err := s.stop()
	os.RemoveAll(s.sockDir)
	return err
}

func (s *Server) stop() error {
	if s.Exited() {
		return nil
	}
	s.Cmd.Process.Signal(syscall.SIGTERM)
	if !s.Wait(5 * time.Second) {
		s.Cmd.Process.Kill()
		<-s.done
		return fmt.Errorf("%s ignored SIGTERM for 5s; killed it", s.Impl)
	}
	return nil
}

// Kill ends the server with SIGKILL.
func (s *Server) Kill(tb testing.TB) {
	if s.Exited() {
		return
	}
	s.Cmd.Process.Kill()
	<-s.done
}

// FreePort returns a loopback TCP port P such that P and P+1 are free.
func FreePort(tb testing.TB) int {
	tb.Helper()
	p, err := freePort()
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

func freePort() (int, error) {
	// Below the kernel's ephemeral range: a port from there (what a
	// listen on port 0 returns) can be taken by any outgoing connection
	// of a test running in parallel between this check and the server's
	// bind ("address already in use", seen in TestManInTheMiddle...).
	lo, hi := 10000, ephemeralLow()-2
	for range 200 {
		p := lo + mathrand.IntN(hi-lo)
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		l2, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p+1))
		l.Close()
		if err == nil {
			l2.Close()
			return p, nil
		}
	}
	return 0, errors.New("no free pair of loopback ports")
}

// ephemeralLow is the first port of the kernel's range for outgoing
// connections (net.ipv4.ip_local_port_range), 32768 if unknown.
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 32768
	}
	n, err := strconv.Atoi(f[0])
	if err != nil || n < 12000 {
		return 32768
	}
	return n
}

// SockDir is a short temporary directory for unix sockets (their paths are
// limited to 108 bytes, which t.TempDir can exceed).
func SockDir(tb testing.TB) string {
	tb.Helper()
	d, err := os.MkdirTemp("", "cvt")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// Run runs a program with a 2-minute limit and returns its standard output;
// a failure fails the test with the program's output.
func Run(tb testing.TB, env []string, name string, args ...string) string {
	tb.Helper()
	out, err := RunErr(env, Tool(tb, name), args...)
	if err != nil {
		tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// RunErr runs a program and returns its combined output and error.
func RunErr(env []string, path string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String() + stderr.String(), err
	}
	return stdout.String(), nil
}

// CPUTime is the CPU time that the processes pids, and every process
// under them, have used so far: the first field of each thread's
// /proc/PID/task/TID/schedstat (nanoseconds, where /proc/PID/stat counts
// 10 ms ticks). Threads and processes that have ended are not counted.
func CPUTime(pids ...int) time.Duration {
	var total time.Duration
	for len(pids) > 0 {
		pid := pids[0]
		pids = append(pids[1:], ChildrenOf(pid)...)
		total += ThreadsCPU(pid)
	}
	return total
}

// ThreadsCPU is the CPU time of pid's own threads (schedstat), without
// its children's.
func ThreadsCPU(pid int) time.Duration {
	return time.Duration(threadsSchedstat(pid, 0))
}

// ThreadsRuns is how many times pid's own threads have been put on a CPU
// so far (the third field of schedstat): each wake-up of a sleeping
// thread counts one, so the difference over n commands says how many
// times per command the process woke.
func ThreadsRuns(pid int) int64 {
	return threadsSchedstat(pid, 2)
}

// threadsSchedstat sums field i of every thread's schedstat.
func threadsSchedstat(pid, i int) int64 {
	var total int64
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue // the thread ended
		}
		if f := strings.Fields(string(b)); len(f) > i {
			if v, err := strconv.ParseInt(f[i], 10, 64); err == nil {
				total += v
			}
		}
	}
	return total
}

// ChildrenOf lists the PIDs of pid's children (every thread's list), e.g.
// a backend's instance workers and its spare worker.
func ChildrenOf(pid int) []int {
	files, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	var out []int
	for _, f := range files {
		b, _ := os.ReadFile(f)
		for _, field := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(field); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// ThreadsNamed counts the threads of process pid whose name (comm) is
// name: a C thread a package names, where the Go runtime's own threads,
// which never exit, would hide a leak in the process's thread count.
func ThreadsNamed(pid int, name string) int {
	comms, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/comm", pid))
	n := 0
	for _, c := range comms {
		if b, err := os.ReadFile(c); err == nil && strings.TrimSpace(string(b)) == name {
			n++
		}
	}
	return n
}

// ProcStatus is one field of /proc/PID/status ("Threads", "VmRSS",
// "Seccomp", ...), its value with the spaces around it removed.
func ProcStatus(pid int, field string) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("no %s in /proc/%d/status", field, pid)
}
