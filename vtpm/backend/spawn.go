package backend

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"cvtpm/vtpm/tpmrpc"
)

// Starting a worker process (exec, the Go runtime, the binary's
// initialisers) is about half of what creating an instance costs, so the
// supervisor keeps one worker started ahead of need: a spare ("cvtpm-worker
// --spare") that has its socket and key pipes but no instance, key or
// state yet. Create, a restart or a backend start takes the spare, sends
// it the flags that name its instance over its socket (the same flags an
// immediately started worker gets on its command line), then the keys
// through its pipes, and a new spare is started in the background. A spare
// holds no secret and no state; like every worker it dies with the
// supervisor (Pdeathsig).

// spawned is a worker process that has not been given its keys yet.
type spawned struct {
	w      *worker
	keyW   *os.File // write end of the state key's pipe
	stderr *lastLine
	spare  bool // its flags go over the socket (sendFlags)
}

// worker is one running worker process.
type worker struct {
	cmd    *exec.Cmd
	conn   *os.File
	caller *tpmrpc.ConnCaller
	done   chan struct{}
	// owner is the instance the worker serves once it has been given
	// one; its exit is then reported to the supervisor (exited).
	owner atomic.Pointer[instance]
	// hung kills the worker when a call takes longer than CallTimeout:
	// armed for each call (calls are serialised by the instance's lock),
	// one timer for the worker's life rather than one per TPM command.
	hung *time.Timer
}

// spawn starts a worker with args after the configured command line.
func (s *Supervisor) spawn(args []string, spare bool) (*spawned, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair: %w", err)
	}
	// Both ends stay blocking: a call wakes its reader directly instead of
	// through the netpoller, which is most of a small command's cost. An
	// idle instance holds no thread: nobody reads its socket between calls.
	conn, child := os.NewFile(uintptr(fds[0]), "worker-conn"), os.NewFile(uintptr(fds[1]), "worker-conn")
	var toClose []*os.File
	fail := func(err error) (*spawned, error) {
		for _, f := range append(toClose, child, conn) {
			f.Close()
		}
		return nil, err
	}
	keyR, keyW, err := os.Pipe()
	if err != nil {
		return fail(fmt.Errorf("key pipe: %w", err))
	}
	toClose = append(toClose, keyR, keyW)
	// --state-root: the only part of the file system a worker sees
	// (internal/confine).
	argv := append(slices.Clone(s.cfg.Worker), "--conn-fd", "3", "--state-key-fd", "4", "--state-root", s.cfg.Dir)
	extra := []*os.File{child, keyR}
	if spare {
		argv = append(argv, "--spare")
	}
	argv = append(argv, args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.ExtraFiles = extra
	cmd.Env = append(os.Environ(), "GOMAXPROCS=1")
	stderr := &lastLine{}
	cmd.Stderr = stderr
	// Workers die with the supervisor, never outlive it holding state.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fail(fmt.Errorf("starting worker: %w", err))
	}
	workersStarted.Inc()
	// Only the worker may hold its ends: otherwise its death would not
	// show as EOF on conn.
	child.Close()
	keyR.Close()
	w := &worker{cmd: cmd, conn: conn, caller: tpmrpc.NewConnCaller(conn), done: make(chan struct{})}
	stderr.mu.Lock()
	stderr.log = func(line string) { s.workerSaid(w, line) }
	stderr.mu.Unlock()
	w.hung = time.AfterFunc(time.Hour, func() { cmd.Process.Kill() })
	w.hung.Stop()
	go func() {
		err := cmd.Wait()
		close(w.done)
		if inst := w.owner.Load(); inst != nil {
			s.exited(inst, w, err)
		}
	}()
	return &spawned{w: w, keyW: keyW, stderr: stderr, spare: spare}, nil
}

// sendFlags gives a spare the flags that name its instance: one message
// (vtpm/tpmrpc framing) holding them separated by NUL bytes.
func (sp *spawned) sendFlags(args []string) error {
	for _, a := range args {
		if strings.IndexByte(a, 0) >= 0 {
			return errors.New("a worker flag holds a NUL byte")
		}
	}
	body := strings.Join(args, "\x00")
	msg := binary.BigEndian.AppendUint32(nil, uint32(len(body)))
	_, err := sp.w.conn.Write(append(msg, body...))
	return err
}

// sendKey writes the state key into its pipe and closes it; the pipe
// holds far more than a key, so this does not wait for the worker. (The
// migration key stays in the supervisor, which seals and opens migrated
// state: a worker never holds it.)
func (sp *spawned) sendKey(stateKey []byte) error {
	_, err := sp.keyW.Write(stateKey)
	sp.keyW.Close()
	return err
}

// discard ends a worker that never got an instance.
func (sp *spawned) discard() {
	sp.keyW.Close()
	sp.w.conn.Close()
	sp.w.cmd.Process.Kill()
	<-sp.w.done
}

// spares keeps one worker started ahead of need.
type spares struct {
	mu      sync.Mutex
	ready   *spawned
	filling bool
	closed  bool
	refills sync.WaitGroup // refillSpare calls under way, so Close can wait for them
}

// takeSpare returns the spare worker, if one is ready and alive, and
// starts the next one in the background.
func (s *Supervisor) takeSpare() *spawned {
	s.spares.mu.Lock()
	sp := s.spares.ready
	s.spares.ready = nil
	s.spares.mu.Unlock()
	go s.refillSpare()
	if sp == nil {
		return nil
	}
	select {
	case <-sp.w.done: // it died idle (killed by someone): start afresh
		sp.discard()
		return nil
	default:
		return sp
	}
}

// refillSpare starts a spare worker unless one is ready or starting.
func (s *Supervisor) refillSpare() {
	s.spares.mu.Lock()
	if s.spares.closed || s.spares.ready != nil || s.spares.filling {
		s.spares.mu.Unlock()
		return
	}
	s.spares.filling = true
	s.spares.refills.Add(1)
	defer s.spares.refills.Done()
	s.spares.mu.Unlock()
	sp, err := s.spawn(nil, true)
	s.spares.mu.Lock()
	s.spares.filling = false
	if err != nil {
		s.spares.mu.Unlock()
		s.log.Warn("could not start a spare worker; instances start without one", "err", err)
		return
	}
	if s.spares.closed {
		s.spares.mu.Unlock()
		sp.discard()
		return
	}
	s.spares.ready = sp
	s.spares.mu.Unlock()
}

// closeSpares ends the spare worker for good.
func (s *Supervisor) closeSpares() {
	s.spares.mu.Lock()
	s.spares.closed = true
	sp := s.spares.ready
	s.spares.ready = nil
	s.spares.mu.Unlock()
	if sp != nil {
		sp.discard()
	}
	s.spares.refills.Wait() // a spare being started ends with it
}
