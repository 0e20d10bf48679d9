package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// server is one TPM server implementation under comparison. Both are started
// with exactly the same `socket --tpm2 ...` command line.
type server struct {
	name string // "cvtpm" or "swtpm", used in metric units
	bin  string // absolute path of the executable
}

// network selects the data socket type passed to --server.
type network string

const (
	unixNet network = "unix"
	tcpNet  network = "tcp"
)

// process is one running server with its data socket address.
type process struct {
	srv      server
	cmd      *exec.Cmd
	network  network
	addr     string        // unix socket path or 127.0.0.1:port
	exited   chan struct{} // closed when the process has been reaped
	waitErr  error         // valid after exited is closed
	stderr   *strings.Builder
	startDur time.Duration // process start until the data socket accepted
}

// socketArgs is the shared command line: the same flags for both servers.
func socketArgs(stateDir string, nw network, addr string) []string {
	args := []string{"socket", "--tpm2",
		"--tpmstate", "dir=" + stateDir,
		"--flags", "not-need-init,startup-clear",
		"--ctrl", "type=unixio,path=" + filepath.Join(stateDir, "ctrl.sock"),
	}
	switch nw {
	case unixNet:
		args = append(args, "--server", "type=unixio,path="+addr)
	case tcpNet:
		_, port, _ := net.SplitHostPort(addr)
		args = append(args, "--server", "type=tcp,port="+port+",bindaddr=127.0.0.1")
	}
	return args
}

// freeTCPAddr asks the kernel for an unused loopback port. The port is free
// again when the server binds it; a collision with another process is
// possible but makes start fail loudly rather than measure the wrong thing.
func freeTCPAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("reserve loopback port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// start launches srv on stateDir (created if missing) and returns once the
// data socket accepts a connection, or fails if the process exits or ctx ends
// first. The measured start time covers fork/exec until the first accepted
// connect.
// cpu >= 0 pins the server to that CPU.
func start(ctx context.Context, srv server, stateDir string, nw network, cpu int) (*process, error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir for %s: %w", srv.name, err)
	}
	var addr string
	switch nw {
	case unixNet:
		addr = filepath.Join(stateDir, "data.sock")
		_ = os.Remove(addr) // a stale socket from the previous start
	case tcpNet:
		var err error
		if addr, err = freeTCPAddr(); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("unknown network %q", nw)
	}
	p := &process{srv: srv, network: nw, addr: addr, exited: make(chan struct{}), stderr: &strings.Builder{}}
	p.cmd = exec.Command(srv.bin, socketArgs(stateDir, nw, addr)...)
	p.cmd.Stderr = p.stderr
	p.cmd.Stdout = p.stderr
	t0 := time.Now()
	if err := startOnCPU(p.cmd, cpu); err != nil {
		return nil, fmt.Errorf("start %s (%s): %w", srv.name, srv.bin, err)
	}
	go func() { p.waitErr = p.cmd.Wait(); close(p.exited) }()
	for {
		c, err := net.Dial(string(nw), addr)
		if err == nil {
			p.startDur = time.Since(t0)
			c.Close()
			return p, nil
		}
		select {
		case <-p.exited:
			return nil, fmt.Errorf("%s exited before its data socket accepted (%v): %s %s\n%s",
				srv.name, p.waitErr, srv.bin, strings.Join(p.cmd.Args[1:], " "), p.stderr.String())
		case <-ctx.Done():
			p.stop()
			return nil, fmt.Errorf("%s data socket %s not accepting: %w\n%s", srv.name, addr, ctx.Err(), p.stderr.String())
		case <-time.After(100 * time.Microsecond):
		}
	}
}

// stop terminates the server with SIGTERM (SIGKILL after 5 s) and reaps it.
func (p *process) stop() error {
	select {
	case <-p.exited:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
		return fmt.Errorf("%s ignored SIGTERM for 5s; killed", p.srv.name)
	}
	return nil
}

// rssBytes sums a resident-set field of /proc/PID/status ("VmRSS", or
// "RssAnon" for the private anonymous part that each instance really costs:
// file-backed pages of the binary and libraries are shared and evictable)
// over the server and all its descendants (cvtpm may run its TPM in a
// worker child).
func (p *process) rssBytes(field string) (int64, error) {
	children := map[int][]int{}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, fmt.Errorf("list /proc: %w", err)
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue // the process went away
		}
		// Fields after the parenthesised command name: state ppid ...
		rest := string(stat[strings.LastIndexByte(string(stat), ')')+1:])
		f := strings.Fields(rest)
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		children[ppid] = append(children[ppid], pid)
	}
	var total int64
	todo := []int{p.cmd.Process.Pid}
	for len(todo) > 0 {
		pid := todo[0]
		todo = append(todo[1:], children[pid]...)
		kb, err := statusKiB(pid, field)
		if err != nil {
			if pid == p.cmd.Process.Pid {
				return 0, err
			}
			continue
		}
		total += kb * 1024
	}
	return total, nil
}

func statusKiB(pid int, field string) (int64, error) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read status of pid %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			f := strings.Fields(v)
			if len(f) == 0 {
				break
			}
			return strconv.ParseInt(f[0], 10, 64)
		}
	}
	return 0, errors.New("no " + field + " line in /proc/" + strconv.Itoa(pid) + "/status")
}
