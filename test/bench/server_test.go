package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"cvtpm/test/testenv"
)

// server is one TPM server implementation under comparison. Both are started
// by test/testenv with exactly the same `socket --tpm2 ...` command line.
type server struct {
	name string       // "cvtpm" or "swtpm", used in metric units
	impl testenv.Impl // which implementation
	bin  string       // absolute path of the executable
}

// network selects the data socket type passed to --server.
type network string

const (
	unixNet network = "unix"
	tcpNet  network = "tcp"
)

// process is one running server with its data socket address.
type process struct {
	*testenv.Server // StartDur: process start until the data socket accepted
	srv             server
	network         network
	addr            string // unix socket path or 127.0.0.1:port
}

// start launches srv on stateDir (created if missing) and returns once the
// data socket accepts a connection, or fails if the process exits or ctx ends
// first. The measured start time (StartDur) covers fork/exec until the first
// accepted connect.
// cpu >= 0 pins the server to that CPU.
func start(ctx context.Context, srv server, stateDir string, nw network, cpu int) (*process, error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir for %s: %w", srv.name, err)
	}
	if nw != unixNet && nw != tcpNet {
		return nil, fmt.Errorf("unknown network %q", nw)
	}
	s, err := testenv.Launch(ctx, srv.impl, srv.bin, testenv.Options{
		StateDir: stateDir,
		TCP:      nw == tcpNet,
		Start:    func(cmd *exec.Cmd) error { return startOnCPU(cmd, cpu) },
	})
	if err != nil {
		return nil, err
	}
	p := &process{Server: s, srv: srv, network: nw, addr: s.DataPath}
	if nw == tcpNet {
		p.addr = fmt.Sprintf("127.0.0.1:%d", s.DataPort)
	}
	return p, nil
}

// stop terminates the server with SIGTERM (SIGKILL after 5 s) and reaps it.
func (p *process) stop() error { return p.Close() }

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
	todo := []int{p.Cmd.Process.Pid}
	for len(todo) > 0 {
		pid := todo[0]
		todo = append(todo[1:], children[pid]...)
		kb, err := statusKiB(pid, field)
		if err != nil {
			if pid == p.Cmd.Process.Pid {
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
