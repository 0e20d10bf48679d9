package backend

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cvtpm/attest/csv"
	"cvtpm/attest/freshreport"
	"cvtpm/internal/logfield"
	"cvtpm/vtpm/statestore"
	"cvtpm/vtpm/tpmrpc"

	"golang.org/x/sys/unix"
)

// Config configures a Supervisor.
type Config struct {
	// Dir holds one state directory per instance, Dir/<instance id>.
	Dir string
	// Keys seals instance state. Required.
	Keys KeySource
	// Cipher is the state AEAD: "aes-256-gcm" (default) or "sm4-gcm".
	Cipher string
	// Worker is the command line that starts a worker; the supervisor
	// appends --state DIR --conn-fd 3 --state-key-fd 4 --cipher C. Typically
	// {os.Executable(), "worker"}.
	Worker []string
	Logger *slog.Logger
	// Evidence answers the fresh-report vendor command (attest/freshreport)
	// with a CSV report; ChipCerts is the chip's HSK||CEK for it. Without
	// Evidence the command fails with TPM_RC_FAILURE.
	Evidence  csv.ReportProvider
	ChipCerts []byte
	// CallTimeout bounds one call to a worker; a worker that does not
	// answer in time is killed and restarted. Zero means 2 minutes.
	CallTimeout time.Duration
	// MigrationKey (32+ bytes) seals state that leaves an instance for
	// another backend holding the same key (vtpm/migration). Nil: state
	// never leaves this backend, and none is loaded.
	MigrationKey []byte
	// Anchors are the instances' highest state generations recorded
	// outside this CVM's disk (the key broker's). An instance whose state
	// is older was rolled back by whoever holds the disk, and is refused.
	Anchors map[string]uint64
	// Anchorer, if set, records the instances' generations outside the
	// disk every AnchorInterval (default 1 s) and when the backend stops.
	Anchorer       Anchorer
	AnchorInterval time.Duration
	// MaxUnanchored bounds how long instances serve while their
	// generations cannot be recorded (the broker unreachable, or this
	// backend's session superseded by another CVM running as it): past
	// it, calls are refused until a report gets through. It bounds what a
	// host that cuts the broker off can roll back. Zero means 10 seconds.
	MaxUnanchored time.Duration
	// ClaimTimeout bounds the wait for the source backend to hand a
	// migrated instance over; zero means 30 seconds.
	ClaimTimeout time.Duration
	// Moved are instances the key broker says another backend owns now:
	// their copies here are stale and are not started.
	Moved map[string]string
}

// Anchorer records instance state generations where the host cannot lower
// them, and which backend owns each instance (the key broker).
type Anchorer interface {
	// Anchor records generations of instances this backend owns; it
	// returns those another backend owns now (after a migration: this
	// backend's copy is stale).
	Anchor(ctx context.Context, generations map[string]uint64) (moved map[string]string, err error)
	// Claim takes an instance over as this backend loads its migrated
	// state of generation gen; refused for state older than the anchor.
	Claim(ctx context.Context, instance string, gen uint64) error
}

// State of an instance's worker.
const (
	StateRunning    = "running"
	StateRestarting = "restarting"
	// StateFailed: the worker could not start (e.g. its state was refused
	// as tampered); Error says why. The other instances are unaffected.
	StateFailed = "failed"
)

// InstanceInfo describes an instance.
type InstanceInfo struct {
	ID       string
	State    string
	PID      int
	Restarts int
	Created  time.Time
	Error    string // why the worker is not running, if it failed
}

// CreateOptions are the ways to make an instance.
type CreateOptions struct {
	// Incoming leaves the new TPM uninitialised and without state, to
	// receive a migrated instance's sealed state (QEMU -incoming).
	Incoming bool
	// ImportDir is a directory with swtpm's unencrypted state files
	// (tpm2-00.permall, ...), as swtpm_setup writes them: the instance
	// starts from that state. This is an administrator's explicit act
	// inside the backend (logged); the host path never loads plaintext.
	ImportDir string
	// Binding (JSON, see Binding) ties the instance to its workload VM.
	Binding []byte
}

// startMode says what a worker may expect of its state directory.
type startMode int

const (
	startExisting startMode = iota // the instance's sealed state must be there
	startNew                       // an empty directory: a new TPM
	startImport                    // import swtpm files placed in the directory
)

// Supervisor owns the instances and their workers.
type Supervisor struct {
	refusalLog logfield.Limiter // "call refused" lines per instance
	workerLog  logfield.Limiter // lines workers write, per worker
	cfg        Config
	log        *slog.Logger

	mu        sync.Mutex
	instances map[string]*instance
	closed    bool
	// seen is each instance's highest state generation known: the
	// anchors, then what its workers reported. A worker that comes back
	// with less was rolled back.
	seen       map[string]uint64
	anchorOK   time.Time // the last report the Anchorer accepted
	stopAnchor context.CancelFunc
	anchorDone chan struct{}
	// migrationKey seals the state that leaves an instance and opens what
	// enters it (transfer.go); workers never hold it.
	migrationKey *statestore.Key
	// spares is the worker started ahead of need (spawn.go).
	spares spares
	direct directState // direct.go
}

type instance struct {
	id, dir string
	// incarnation is drawn at creation and bound into the state key, so
	// files of an earlier instance under the same id never open in this
	// one. Empty for instances created before it existed.
	incarnation string
	binding     *Binding // nil: not bound to a workload
	hostLocked  bool     // the workload closed the host path ("boot") until the next reset
	lockBroken  bool     // the host reset the TPM while it was locked: the workload must lock again
	created     time.Time

	mu          sync.Mutex // serialises calls, starts and deletion
	w           *worker
	restarts    int
	lastStart   time.Time
	quickDeaths int // consecutive deaths within quickDeath of starting
	deleted     bool
	movedTo     string // another backend owns the instance now: this copy is stale
	incoming    bool   // created to receive migrated state, not claimed yet: not anchored
	tpmRunning  bool   // the TPM was initialised and not stopped
	locality    uint8  // the TPM's current locality (set-locality)
	startedUp   bool   // TPM2_Startup succeeded since the last init
	lastErr     error
	direct      []*directSession // sessions handed to the worker (direct.go)
	// directSyncing: a round of syncDirect is under way (not under mu).
	directSyncing atomic.Bool
}

var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidInstanceID reports whether id may name an instance: 1-64 letters,
// digits, '.', '_' or '-', starting with a letter or digit.
func ValidInstanceID(id string) error {
	if !validID.MatchString(id) {
		return fmt.Errorf("instance id %q: want 1-64 of [A-Za-z0-9._-], starting with a letter or digit", id)
	}
	return nil
}

// New opens the instance directory and starts a worker for every instance
// found there.
func New(ctx context.Context, cfg Config) (*Supervisor, error) {
	if cfg.Keys == nil {
		return nil, errors.New("backend: no key source")
	}
	if len(cfg.Worker) == 0 {
		return nil, errors.New("backend: no worker command")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.CallTimeout == 0 {
		cfg.CallTimeout = 2 * time.Minute
	}
	// Absolute: a worker started as root keeps this directory writable in
	// a mount namespace of its own (internal/confine), and resolves it
	// before anything else.
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("backend: %w", err)
	}
	cfg.Dir = dir
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("backend: %w", err)
	}
	// Workers see the state directory, and nothing else, at this path
	// (internal/confine), and refuse one with a symlink on it: a symlink
	// the host could plant (on the disk it provides) must not choose what
	// they see. Said here, once, rather than by every worker.
	if real, err := filepath.EvalSymlinks(cfg.Dir); err != nil || real != cfg.Dir || cfg.Dir == "/" {
		return nil, fmt.Errorf("backend: the state directory %s must be given as a path without symlinks, other than / (it resolves to %s)", cfg.Dir, real)
	}
	s := &Supervisor{cfg: cfg, log: cfg.Logger, instances: map[string]*instance{}, seen: map[string]uint64{}}
	for id, g := range cfg.Anchors {
		s.seen[id] = g
	}
	if cfg.MigrationKey != nil {
		k, err := statestore.NewKey(cfg.MigrationKey, cfg.Cipher)
		if err != nil {
			return nil, fmt.Errorf("backend: migration key: %w", err)
		}
		s.migrationKey = k
	}
	entries, err := os.ReadDir(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("backend: %w", err)
	}
	started := 0
	for _, e := range entries {
		if !e.IsDir() || ValidInstanceID(e.Name()) != nil {
			continue
		}
		if started++; started%100 == 0 {
			s.log.Info("starting instances", "started", started)
		}
		inst := s.newInstance(e.Name())
		if fi, err := e.Info(); err == nil {
			inst.created = fi.ModTime()
		}
		if b, err := os.ReadFile(filepath.Join(inst.dir, incarnationFile)); err == nil {
			inst.incarnation = strings.TrimSpace(string(b))
		}
		var bindErr error
		if b, err := os.ReadFile(filepath.Join(inst.dir, bindingFile)); err == nil {
			inst.binding, bindErr = ParseBinding(b)
		}
		inst.mu.Lock()
		var err error
		if owner, ok := cfg.Moved[inst.id]; ok {
			s.markMoved(inst, owner)
		} else if bindErr != nil {
			inst.lastErr, err = bindErr, bindErr
		} else {
			err = s.start(ctx, inst, startExisting)
		}
		inst.mu.Unlock()
		if err != nil {
			// One instance's refused or broken state must not take the
			// others down: it is listed as failed, and every call to it
			// says why.
			s.log.Error("instance not started", "instance", inst.id, "err", err)
		}
		s.instances[inst.id] = inst
		instancesGauge.Inc()
	}
	s.log.Info("backend ready", "instances", len(s.instances), "dir", cfg.Dir)
	go s.refillSpare()
	if cfg.Anchorer != nil {
		s.mu.Lock()
		s.anchorOK = time.Now() // the keys and anchors were just released
		s.mu.Unlock()
		actx, cancel := context.WithCancel(context.Background())
		s.stopAnchor, s.anchorDone = cancel, make(chan struct{})
		go s.anchorLoop(actx)
	}
	return s, nil
}

// anchorLoop records the instances' generations with the Anchorer.
func (s *Supervisor) anchorLoop(ctx context.Context) {
	defer close(s.anchorDone)
	every := s.cfg.AnchorInterval
	if every == 0 {
		every = time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.anchorNow(ctx)
		}
	}
}

// anchorNow asks every running worker for its generation and reports
// them to the Anchorer.
func (s *Supervisor) anchorNow(ctx context.Context) {
	insts := s.snapshot()
	gens := s.collectGenerations(ctx, insts, min(anchorRoundWait, s.maxUnanchored()/4))
	// Sent even when there is nothing to report: it is also the heartbeat
	// that keeps the instances serving (MaxUnanchored).
	moved, err := s.cfg.Anchorer.Anchor(ctx, gens)
	if err != nil {
		s.log.Warn("recording state generations with the key broker failed; retrying", "err", err)
		return
	}
	s.mu.Lock()
	s.anchorOK = time.Now()
	s.mu.Unlock()
	for _, inst := range insts {
		if owner, ok := moved[inst.id]; ok {
			inst.mu.Lock()
			s.markMoved(inst, owner)
			inst.mu.Unlock()
		}
	}
}

// anchorRoundWait bounds how long a round of anchoring waits for the
// workers' generations: the round is also the heartbeat that keeps every
// instance serving (MaxUnanchored), so one slow worker (a taken-over one
// can answer late on purpose) must not hold it up.
const anchorRoundWait = 500 * time.Millisecond

// collectGenerations asks every running instance's worker for its state
// generation, all at once, and returns those that answered within wait.
// An instance busy with a long command (an RSA key generation) or a worker
// slower than wait is reported next round.
func (s *Supervisor) collectGenerations(ctx context.Context, insts []*instance, wait time.Duration) map[string]uint64 {
	type answer struct {
		id  string
		gen uint64
	}
	answers := make(chan answer, len(insts)) // late answers are dropped, never block
	asked := 0
	for _, inst := range insts {
		if !inst.mu.TryLock() {
			continue
		}
		if inst.w == nil || inst.deleted || inst.incoming {
			inst.mu.Unlock()
			continue
		}
		asked++
		go func() {
			defer inst.mu.Unlock()
			if g, err := s.generation(ctx, inst); err == nil {
				s.mu.Lock()
				s.seen[inst.id] = max(s.seen[inst.id], g)
				s.mu.Unlock()
				answers <- answer{inst.id, g}
			} else {
				answers <- answer{id: ""}
			}
		}()
	}
	gens := map[string]uint64{}
	deadline := time.After(wait)
	for range asked {
		select {
		case a := <-answers:
			if a.id != "" {
				// Reported even when unchanged: a migration claim for
				// this instance completes when its owner reports that
				// it is still at the claimed generation.
				gens[a.id] = a.gen
			}
		case <-deadline:
			return gens
		}
	}
	return gens
}

// markMoved stops a stale copy of an instance that another backend owns
// now. Called with inst.mu held.
func (s *Supervisor) markMoved(inst *instance, owner string) {
	if inst.movedTo != "" {
		return
	}
	inst.movedTo = owner
	inst.lastErr = fmt.Errorf("instance %s migrated to backend %s: this copy is stale and does not run", inst.id, owner)
	s.log.Warn("stale copy of a migrated instance stopped", "instance", inst.id, "owner", owner)
	s.stop(inst, time.Second)
}

// anchorOne records inst's current generation synchronously (before its
// state leaves). Called with inst.mu held and a worker running.
func (s *Supervisor) anchorOne(ctx context.Context, inst *instance) error {
	g, err := s.generation(ctx, inst)
	if err != nil {
		return err
	}
	moved, err := s.cfg.Anchorer.Anchor(ctx, map[string]uint64{inst.id: g})
	if err != nil {
		return fmt.Errorf("recording the state generation with the key broker: %w", err)
	}
	if owner, ok := moved[inst.id]; ok {
		s.markMoved(inst, owner)
		return inst.lastErr
	}
	s.mu.Lock()
	s.seen[inst.id] = max(s.seen[inst.id], g)
	s.anchorOK = time.Now()
	s.mu.Unlock()
	return nil
}

// unanchoredFor reports how long no report got through, and whether that
// is longer than MaxUnanchored.
// Ready reports whether the backend serves: nil, or why not (its key
// broker has not recorded its state for too long).
func (s *Supervisor) Ready() error {
	if d, stale := s.unanchoredFor(); stale {
		return fmt.Errorf("the key broker has not recorded this backend's state for %s", d.Round(time.Second))
	}
	return nil
}

func (s *Supervisor) maxUnanchored() time.Duration {
	if s.cfg.MaxUnanchored == 0 {
		return 10 * time.Second
	}
	return s.cfg.MaxUnanchored
}

func (s *Supervisor) unanchoredFor() (time.Duration, bool) {
	if s.cfg.Anchorer == nil {
		return 0, false
	}
	limit := s.maxUnanchored()
	s.mu.Lock()
	d := time.Since(s.anchorOK)
	s.mu.Unlock()
	return d, d > limit
}

func (s *Supervisor) claimTimeout() time.Duration {
	if s.cfg.ClaimTimeout > 0 {
		return s.cfg.ClaimTimeout
	}
	return 30 * time.Second
}

// generation asks inst's worker for its state generation. Called with
// inst.mu held and a worker running.
func (s *Supervisor) generation(ctx context.Context, inst *instance) (uint64, error) {
	out, err := s.callWorker(ctx, inst, tpmrpc.OpGeneration, tpmrpc.AppendRequest(nil, tpmrpc.Request{Op: tpmrpc.OpGeneration}))
	if err != nil {
		return 0, err
	}
	r, err := tpmrpc.ParseResponse(out)
	if err != nil {
		return 0, err
	}
	if r.Err != "" {
		return 0, errors.New(r.Err)
	}
	return uint64(r.V[0])<<32 | uint64(r.V[1]), nil
}

func (s *Supervisor) newInstance(id string) *instance {
	return &instance{id: id, dir: filepath.Join(s.cfg.Dir, id), created: time.Now(), tpmRunning: true}
}

// Create makes a new instance with an empty TPM and starts its worker.
// Its TPM is initialised (as swtpm --flags not-need-init); TPM2_Startup is
// the client's business. opts may ask for an instance that waits for
// migrated state, or one imported from swtpm state files.
func (s *Supervisor) Create(ctx context.Context, id string, opts CreateOptions) (InstanceInfo, error) {
	if err := ValidInstanceID(id); err != nil {
		return InstanceInfo{}, err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return InstanceInfo{}, errors.New("backend is shutting down")
	}
	if _, ok := s.instances[id]; ok {
		s.mu.Unlock()
		return InstanceInfo{}, fmt.Errorf("instance %q: %w", id, fs.ErrExist)
	}
	inst := s.newInstance(id)
	inst.mu.Lock()
	defer inst.mu.Unlock()
	s.instances[id] = inst
	instancesGauge.Inc()
	s.mu.Unlock()
	fail := func(err error) (InstanceInfo, error) {
		inst.deleted = true
		s.mu.Lock()
		delete(s.instances, id)
		instancesGauge.Dec()
		s.mu.Unlock()
		return InstanceInfo{}, fmt.Errorf("creating instance %q: %w", id, err)
	}
	if opts.Incoming && opts.ImportDir != "" {
		return fail(errors.New("an instance is either incoming or imported, not both"))
	}
	if opts.Binding != nil {
		b, err := ParseBinding(opts.Binding)
		if err != nil {
			return fail(err)
		}
		inst.binding = b
	}
	if err := os.Mkdir(inst.dir, 0o700); err != nil {
		return fail(err)
	}
	// The new directory's files are written through its descriptor,
	// refusing symlinks: a worker sees the state directory (and may
	// rename in it), and could move a symlink the host left on its disk
	// into place between the mkdir and a write by path.
	idir, err := newInstanceDir(inst.dir)
	if err != nil {
		os.RemoveAll(inst.dir)
		return fail(err)
	}
	defer idir.Close()
	if opts.Binding != nil {
		if err := idir.create(bindingFile, opts.Binding); err != nil {
			os.RemoveAll(inst.dir)
			return fail(err)
		}
	}
	inc := make([]byte, 16)
	rand.Read(inc)
	inst.incarnation = hex.EncodeToString(inc)
	if err := idir.create(incarnationFile, []byte(inst.incarnation+"\n")); err != nil {
		os.RemoveAll(inst.dir)
		return fail(err)
	}
	mode := startNew
	if opts.ImportDir != "" {
		mode = startImport
		if err := copySwtpmState(opts.ImportDir, idir); err != nil {
			os.RemoveAll(inst.dir)
			return fail(err)
		}
	}
	if opts.Incoming {
		inst.tpmRunning, inst.incoming = false, true
	}
	err = s.start(ctx, inst, mode)
	if mode == startImport {
		// The worker sealed what it imported; plaintext copies go.
		removeSwtpmState(inst.dir)
	}
	if err != nil {
		os.RemoveAll(inst.dir)
		return fail(err)
	}
	switch {
	case opts.ImportDir != "":
		s.log.Warn("instance created from IMPORTED plaintext swtpm state (administrator action)", "instance", id, "from", opts.ImportDir, "pid", inst.w.cmd.Process.Pid)
	case opts.Incoming:
		s.log.Info("instance created, waiting for migrated state", "instance", id, "pid", inst.w.cmd.Process.Pid)
	default:
		s.log.Info("instance created", "instance", id, "pid", inst.w.cmd.Process.Pid)
	}
	return inst.info(), nil
}

// incarnationFile holds an instance's incarnation (not secret: changing
// it only makes the state unopenable).
const incarnationFile = "incarnation"

// swtpmStateFiles are the files swtpm_setup and swtpm write.
var swtpmStateFiles = []string{"tpm2-00.permall", "tpm2-00.volatilestate", "tpm2-00.savestate"}

func copySwtpmState(from string, to *instanceDir) error {
	n := 0
	for _, name := range swtpmStateFiles {
		b, err := os.ReadFile(filepath.Join(from, name))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("importing swtpm state: %w", err)
		}
		if err := to.create(name, b); err != nil {
			return fmt.Errorf("importing swtpm state: %w", err)
		}
		n++
	}
	if n == 0 {
		return fmt.Errorf("importing swtpm state: %s has no tpm2-00.permall", from)
	}
	return nil
}

// instanceDir is a new instance's directory, held open: its files are
// created through the descriptor, never through a symlink.
type instanceDir struct{ fd int }

func newInstanceDir(dir string) (*instanceDir, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", dir, err)
	}
	return &instanceDir{fd: fd}, nil
}

// create writes a new file (it must not exist, not even as a symlink).
func (d *instanceDir) create(name string, b []byte) error {
	fd, err := unix.Openat(d.fd, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("creating %s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing %s: %w", name, err)
	}
	return nil
}

func (d *instanceDir) Close() error { return unix.Close(d.fd) }

func removeSwtpmState(dir string) {
	for _, name := range swtpmStateFiles {
		os.Remove(filepath.Join(dir, name))
	}
}

// Delete stops an instance's worker and removes its state.
func (s *Supervisor) Delete(ctx context.Context, id string) error {
	s.mu.Lock()
	inst, ok := s.instances[id]
	if ok {
		delete(s.instances, id)
		instancesGauge.Dec()
	}
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("instance %q: %w", id, fs.ErrNotExist)
	}
	inst.mu.Lock()
	defer inst.mu.Unlock()
	inst.deleted = true
	s.stop(inst, 0)
	if err := os.RemoveAll(inst.dir); err != nil {
		return fmt.Errorf("deleting instance %q: %w", id, err)
	}
	s.log.Info("instance deleted", "instance", id)
	return nil
}

// List describes the instances, sorted by id.
func (s *Supervisor) List() []InstanceInfo {
	insts := s.snapshot()
	out := make([]InstanceInfo, 0, len(insts))
	for _, i := range insts {
		i.mu.Lock()
		out = append(out, i.info())
		i.mu.Unlock()
	}
	slices.SortFunc(out, func(a, b InstanceInfo) int {
		if a.ID < b.ID {
			return -1
		}
		if a.ID > b.ID {
			return 1
		}
		return 0
	})
	return out
}

// Info describes one instance.
func (s *Supervisor) Info(id string) (InstanceInfo, error) {
	inst := s.lookup(id)
	if inst == nil {
		return InstanceInfo{}, fmt.Errorf("instance %q: %w", id, fs.ErrNotExist)
	}
	inst.mu.Lock()
	defer inst.mu.Unlock()
	return inst.info(), nil
}

func (i *instance) info() InstanceInfo {
	info := InstanceInfo{ID: i.id, State: StateRestarting, Restarts: i.restarts, Created: i.created}
	switch {
	case i.w != nil:
		info.State, info.PID = StateRunning, i.w.cmd.Process.Pid
	case i.lastErr != nil:
		info.State, info.Error = StateFailed, i.lastErr.Error()
	}
	return info
}

// Binding implements Bindings.
func (s *Supervisor) Binding(id string) *Binding {
	if inst := s.lookup(id); inst != nil {
		return inst.binding // set at creation or start, never changed
	}
	return nil
}

// snapshot lists the instances (for rounds over all of them).
func (s *Supervisor) snapshot() []*instance {
	s.mu.Lock()
	defer s.mu.Unlock()
	insts := make([]*instance, 0, len(s.instances))
	for _, i := range s.instances {
		insts = append(insts, i)
	}
	return insts
}

func (s *Supervisor) lookup(id string) *instance {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.instances[id]
}

// Close stops every worker. Their state is already on disk; their last
// generations are anchored first.
func (s *Supervisor) Close() {
	s.stopDirectLoop()
	s.closeSpares()
	if s.stopAnchor != nil {
		s.stopAnchor()
		<-s.anchorDone
		s.stopAnchor = nil
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s.anchorNow(ctx)
		cancel()
	}
	s.mu.Lock()
	s.closed = true
	insts := make([]*instance, 0, len(s.instances))
	for _, i := range s.instances {
		insts = append(insts, i)
	}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, inst := range insts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			inst.mu.Lock()
			defer inst.mu.Unlock()
			inst.deleted = true
			s.stop(inst, 2*time.Second)
		}()
	}
	wg.Wait()
}

// stop ends inst's worker: closing its socket makes it exit; after grace
// it is killed. Called with inst.mu held.
func (s *Supervisor) stop(inst *instance, grace time.Duration) {
	w := inst.w
	if w == nil {
		return
	}
	inst.w = nil
	w.conn.Close()
	select {
	case <-w.done:
	case <-time.After(grace):
		w.cmd.Process.Kill()
		<-w.done
	}
}

// start launches a worker for inst and brings its TPM back to where the
// clients left it. Called with inst.mu held.
func (s *Supervisor) start(ctx context.Context, inst *instance, mode startMode) error {
	err := s.startWorker(ctx, inst, mode)
	inst.lastErr = err
	return err
}

func (s *Supervisor) startWorker(ctx context.Context, inst *instance, mode startMode) error {
	label := inst.id
	if inst.incarnation != "" {
		label += "#" + inst.incarnation // '#' is not allowed in instance ids
	}
	if inst.binding != nil {
		label += inst.binding.keyLabel()
	}
	key, err := s.cfg.Keys.InstanceKey(ctx, label)
	if err != nil {
		return fmt.Errorf("state key: %w", err)
	}
	cipher := s.cfg.Cipher
	if cipher == "" {
		cipher = "aes-256-gcm"
	}
	args := []string{"--state", inst.dir, "--instance", inst.id, "--cipher", cipher}
	switch mode {
	case startNew:
		args = append(args, "--new")
		if inst.tpmRunning {
			// restore initialises the TPM at once, and its first blob
			// writes the manifest. An incoming instance writes nothing
			// until its state arrives: its manifest is written at once,
			// so that a restart before then finds a store.
			args = append(args, "--defer-manifest")
		}
	case startImport:
		args = append(args, "--import-swtpm")
	}
	s.mu.Lock()
	floor := s.seen[inst.id]
	s.mu.Unlock()
	if mode != startExisting && floor > 0 {
		// The id had an instance before: the new one's generations start
		// above that one's anchor.
		args = append(args, "--min-generation", fmt.Sprint(floor))
	}
	defer clear(key)
	if sp := s.takeSpare(); sp != nil {
		err := s.bringUp(ctx, inst, sp, args, key, floor)
		var refused *workerRefusal
		if err == nil || errors.As(err, &refused) || errors.Is(err, ErrRolledBack) {
			// Up, or refused for the instance's own sake (its state, its
			// anchor): a fresh worker would be refused alike.
			return err
		}
		// The spare died without a word, perhaps a moment before it was
		// taken (it was not reaped yet): a worker started now gets the
		// same chance.
		s.log.Debug("the spare worker could not take the instance; starting a worker for it", "instance", inst.id, "err", err)
	}
	sp, err := s.spawn(args, false)
	if err != nil {
		return err
	}
	return s.bringUp(ctx, inst, sp, args, key, floor)
}

// bringUp gives a started worker its instance (a spare its flags), its
// keys, and brings its TPM back to where the clients left it.
func (s *Supervisor) bringUp(ctx context.Context, inst *instance, sp *spawned, args []string, key []byte, floor uint64) error {
	if sp.spare {
		if err := sp.sendFlags(args); err != nil {
			sp.discard()
			return fmt.Errorf("passing the instance to the spare worker: %w", err)
		}
	}
	w, stderr := sp.w, sp.stderr
	w.owner.Store(inst)
	select {
	case <-w.done:
		// It exited before it had an owner, so its exit was reported to
		// nobody; from here on, an exit reaches exited.
		w.owner.Store(nil)
		sp.discard()
		return fmt.Errorf("the worker exited before it was given instance %s: %s", inst.id, stderr.String())
	default:
	}
	if err := sp.sendKey([]byte(hex.EncodeToString(key))); err != nil {
		w.owner.Store(nil)
		w.cmd.Process.Kill()
		<-w.done
		return fmt.Errorf("passing the state key: %w", err)
	}
	inst.w = w
	inst.lastStart = time.Now()
	inst.locality = 0 // a new libtpms starts at locality 0
	err := s.restore(ctx, inst)
	if err == nil && floor > 0 {
		err = s.checkNotRolledBack(ctx, inst, floor)
	}
	if err != nil {
		// A worker that cannot be brought up is not left running (nor
		// restarted by exited): the next call or a restart retries.
		inst.w = nil
		w.cmd.Process.Kill()
		<-w.done
		if why := stderr.String(); why != "" && !errors.Is(err, ErrRolledBack) {
			// The worker's own last word (e.g. its state was refused)
			// says more than the broken socket.
			return &workerRefusal{why}
		}
		return err
	}
	return nil
}

// workerRefusal is a worker's own reason for not taking its instance
// (the last line it wrote), e.g. sealed state that is missing or forged.
type workerRefusal struct{ reason string }

func (e *workerRefusal) Error() string { return e.reason }

// ErrRolledBack: an instance's state is older than its anchor.
var ErrRolledBack = errors.New("state rolled back")

func (s *Supervisor) checkNotRolledBack(ctx context.Context, inst *instance, floor uint64) error {
	g, err := s.generation(ctx, inst)
	if err != nil {
		return fmt.Errorf("reading the state generation: %w", err)
	}
	if g < floor {
		return fmt.Errorf("%w: the sealed state is at generation %d, but generation %d was anchored (an old copy of the directory was put back)", ErrRolledBack, g, floor)
	}
	s.mu.Lock()
	s.seen[inst.id] = max(s.seen[inst.id], g)
	s.mu.Unlock()
	return nil
}

// lastLine passes a worker's stderr on to the backend's log, a record per
// line with the line quoted (a worker taken over through a libtpms bug
// must not write records that read as the backend's own, nor flood the
// log: see workerSaid), and keeps its last line.
type lastLine struct {
	mu   sync.Mutex
	log  func(line string) // nil until the worker is started
	line []byte
}

func (l *lastLine) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, t := range bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n")) {
		if len(t) == 0 {
			continue
		}
		t = t[:min(len(t), 1024)]
		l.line = append(l.line[:0], t...)
		if l.log != nil {
			l.log(string(t))
		}
	}
	return len(b), nil
}

func (l *lastLine) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.TrimPrefix(string(l.line), "cvtpm worker: ")
}

// workerSaid logs a line a worker wrote, within a rate per worker.
func (s *Supervisor) workerSaid(w *worker, line string) {
	pid := w.cmd.Process.Pid
	ok, held := s.workerLog.Allow(strconv.Itoa(pid))
	if !ok {
		return
	}
	id := ""
	if inst := w.owner.Load(); inst != nil {
		id = inst.id
	}
	s.log.Warn("worker output", "instance", id, "pid", pid, "line", line, "similar_lines_suppressed", held)
}

// quickDeath: a worker that dies sooner than this after starting did not
// get going (bad state, bad key); starting it again at once is pointless.
const quickDeath = 200 * time.Millisecond

// startupClear is TPM2_Startup(TPM_SU_CLEAR).
var startupClear = []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0}

// restore initialises a fresh worker's TPM as the clients last saw it:
// running, and started up if they had started it. Volatile state (PCRs,
// loaded objects, sessions) does not survive a crash; to the guest it looks
// like a TPM reset. Called with inst.mu held.
func (s *Supervisor) restore(ctx context.Context, inst *instance) error {
	if !inst.tpmRunning {
		return nil
	}
	c := tpmrpc.NewClient(callerFunc(func(ctx context.Context, req []byte) ([]byte, error) {
		return s.callWorker(ctx, inst, tpmrpc.OpInit, req)
	}), tpmrpc.ClientOptions{Timeout: s.cfg.CallTimeout})
	if rc := c.Init(0); rc != 0 {
		return fmt.Errorf("initialising the TPM: result %#x: %v", rc, c.Err())
	}
	if inst.startedUp {
		if resp := c.Execute(nil, startupClear); responseCode(resp) != 0 {
			return fmt.Errorf("TPM2_Startup after restart: rc %#x", responseCode(resp))
		}
	}
	return nil
}

type callerFunc func(ctx context.Context, req []byte) ([]byte, error)

func (f callerFunc) Call(ctx context.Context, req []byte) ([]byte, error) { return f(ctx, req) }

func responseCode(resp []byte) uint32 {
	if len(resp) < 10 {
		return 0x101
	}
	return binary.BigEndian.Uint32(resp[6:10])
}

// exited restarts a worker that died unless the instance is going away.
func (s *Supervisor) exited(inst *instance, w *worker, waitErr error) {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	if inst.w != w || inst.deleted {
		return
	}
	inst.w = nil
	inst.restarts++
	workerRestarts.Inc()
	if inst.hostLocked {
		// The restart resets the TPM's volatile state (restore) under the
		// running workload, as a host reset would: it is told, and the
		// host path stays locked.
		inst.lockBroken = true
	}
	s.log.Warn("instance worker died; restarting it from its sealed state", "instance", inst.id, "pid", w.cmd.Process.Pid, "exit", fmt.Sprint(waitErr), "restarts", inst.restarts)
	// Back off when workers keep dying right after starting, so a broken
	// state directory does not turn into a fork loop. A worker that lived
	// is restarted at once.
	if time.Since(inst.lastStart) < quickDeath {
		inst.quickDeaths++
	} else {
		inst.quickDeaths = 0
	}
	if inst.quickDeaths > 2 {
		time.Sleep(min(50*time.Millisecond<<min(inst.quickDeaths-2, 7), 5*time.Second))
	}
	if err := s.start(context.Background(), inst, startExisting); err != nil {
		s.log.Error("instance worker restart failed; the next call retries", "instance", inst.id, "err", err)
		if inst.w != nil {
			inst.w.cmd.Process.Kill()
		}
	}
}

// Call implements attestedlink.Handler: it performs one tpmrpc request on
// the instance if caps permit it. Failures and refusals become tpmrpc
// error responses so that the link stays up; the worker is restarted if it
// failed.
func (s *Supervisor) Call(ctx context.Context, id string, caps tpmrpc.Capabilities, req, dst []byte) ([]byte, error) {
	inst := s.lookup(id)
	if inst == nil {
		return tpmrpc.AppendResponse(dst, tpmrpc.Response{Err: fmt.Sprintf("no instance %q on this backend", id)}), nil
	}
	r, err := tpmrpc.ParseRequest(req)
	if err != nil {
		return tpmrpc.AppendResponse(dst, tpmrpc.Response{Err: err.Error()}), nil
	}
	start := time.Now()
	defer func() { calls.WithLabelValues(r.Op.String()).Observe(time.Since(start).Seconds()) }()
	inst.mu.Lock()
	defer inst.mu.Unlock()
	if caps&tpmrpc.HostBoot != 0 && inst.hostLocked {
		// The workload locked the host path after its boot: a reset is
		// all the host may still do.
		caps &= tpmrpc.CapReset
	}
	checked := r
	if r.Op == tpmrpc.OpExecute && r.Arg&tpmrpc.ExecuteAtLocality == 0 {
		// A plain Execute runs at the locality the last set-locality left,
		// perhaps another caller's: check it as a command at that locality.
		checked.Locality, checked.Arg = inst.locality, tpmrpc.ExecuteAtLocality
	}
	if err := caps.Allow(checked); err != nil {
		refusedCalls.WithLabelValues(r.Op.String()).Inc()
		// Counted always, logged within a rate: a caller repeating a
		// refused call must not fill the log.
		if ok, held := s.refusalLog.Allow(id); ok {
			s.log.Warn("call refused", "instance", id, "op", r.Op.String(), "reason", err, "similar_lines_suppressed", held)
		}
		return tpmrpc.AppendResponse(dst, tpmrpc.Response{Err: fmt.Sprintf("instance %q: refused: %v", id, err)}), nil
	}
	if err := s.serving(inst); err != nil {
		return tpmrpc.AppendResponse(dst, tpmrpc.Response{Err: err.Error()}), nil
	}
	if r.Op == tpmrpc.OpLockHost {
		inst.hostLocked, inst.lockBroken = true, false
		s.log.Info("the workload locked the host path", "instance", id)
		return tpmrpc.AppendResponse(dst, tpmrpc.Response{}), nil
	}
	if caps&tpmrpc.CapLock != 0 && inst.lockBroken {
		// The host reset the TPM under the running workload (its one
		// remaining right): the workload's PCRs and sessions are gone and
		// whatever the host did since is not its boot. It is told, every
		// time, until it locks again after its own (re)boot.
		return tpmrpc.AppendResponse(dst, tpmrpc.Response{Err: fmt.Sprintf("instance %q: the host reset the TPM after the workload locked it (or its worker restarted); the TPM's volatile state is not the workload's any more (lock again after a reboot)", id)}), nil
	}
	if inst.w == nil {
		if err := s.start(ctx, inst, startExisting); err != nil {
			return tpmrpc.AppendResponse(dst, tpmrpc.Response{Err: fmt.Sprintf("instance %q is not running: %v", id, err)}), nil
		}
	}
	if r.Op == tpmrpc.OpGetState || r.Op == tpmrpc.OpSetState {
		return tpmrpc.AppendResponse(dst, s.transfer(ctx, inst, r)), nil
	}
	if r.Op == tpmrpc.OpExecute && freshreport.IsCommand(r.Payload) {
		return tpmrpc.AppendResponse(dst, tpmrpc.Response{Payload: s.freshReport(ctx, inst, r.Payload)}), nil
	}
	resp, err := s.callWorker(ctx, inst, r.Op, req)
	if err != nil {
		return tpmrpc.AppendResponse(dst, tpmrpc.Response{Err: err.Error()}), nil
	}
	s.track(inst, r, resp)
	if r.Op == tpmrpc.OpExecute && freshreport.IsGetCapability(r.Payload) {
		// The vendor command this backend serves is listed with libtpms'
		// own (the kernel's /dev/tpmrm0 passes only listed commands).
		if p, err := tpmrpc.ParseResponse(resp); err == nil && p.Err == "" {
			p.Payload = freshreport.AmendCapability(r.Payload, p.Payload)
			return tpmrpc.AppendResponse(dst, p), nil
		}
	}
	return append(dst, resp...), nil
}

// transfer performs get-state or set-state: state leaves sealed by the
// supervisor and enters opened by it (transfer.go), and with a key broker
// it leaves only at the anchored generation and enters only if it is not
// older than the anchor. State transfers are what a hostile host tries:
// every outcome is on record. Called with inst.mu held and a worker
// running.
func (s *Supervisor) transfer(ctx context.Context, inst *instance, r tpmrpc.Request) (resp tpmrpc.Response) {
	defer func() {
		if resp.Err != "" {
			s.log.Warn("state transfer refused", "instance", inst.id, "op", r.Op.String(), "blob", r.Arg, "reason", resp.Err)
		} else if resp.RC == 0 {
			s.log.Info("state transfer", "instance", inst.id, "op", r.Op.String(), "blob", r.Arg)
		}
	}()
	refuse := func(err error) tpmrpc.Response { return tpmrpc.Response{RC: rcFail, Err: err.Error()} }
	name, err := s.transferName(r)
	if err != nil {
		return refuse(err)
	}
	var req []byte
	switch r.Op {
	case tpmrpc.OpGetState:
		if s.cfg.Anchorer != nil {
			if err := s.anchorOne(ctx, inst); err != nil {
				return refuse(err)
			}
		}
		req = tpmrpc.AppendRequest(nil, tpmrpc.Request{Op: tpmrpc.OpGetState, Arg: r.Arg})
	case tpmrpc.OpSetState:
		var gen uint64
		if req, gen, err = s.openIncoming(inst, name, r); err != nil {
			return refuse(err)
		}
		defer clear(req)
		if s.cfg.Anchorer != nil && len(r.Payload) > 0 {
			if err := s.claim(ctx, inst, name, gen); err != nil {
				return refuse(err)
			}
		}
	}
	out, err := s.callWorker(ctx, inst, r.Op, req)
	if err != nil {
		return tpmrpc.Response{Err: err.Error()}
	}
	if r.Op == tpmrpc.OpGetState {
		return s.sealOutgoing(inst, name, out)
	}
	p, err := tpmrpc.ParseResponse(out)
	if err != nil {
		return tpmrpc.Response{RC: rcFail, Err: fmt.Sprintf("reading the worker's answer: %v", err)}
	}
	return tpmrpc.Response{RC: p.RC, Err: p.Err}
}

// callWorker sends req to inst's worker and returns its encoded answer,
// which is valid until the next call. Every call to a worker goes through
// here: the worker socket has no deadlines, so a worker that hangs past
// CallTimeout (one taken over can stop itself) is killed, which ends the
// call with EOF, instead of holding its instance's lock for good. A worker
// that died or hung is made sure to be gone (exited restarts it), and the
// error says so. Called with inst.mu held and a worker running.
func (s *Supervisor) callWorker(ctx context.Context, inst *instance, op tpmrpc.Op, req []byte) ([]byte, error) {
	w := inst.w
	return s.callWorkerWith(inst, op, func() ([]byte, error) { return w.caller.Call(ctx, req) })
}

// callWorkerWith is callWorker with the call made by call (on inst.w).
func (s *Supervisor) callWorkerWith(inst *instance, op tpmrpc.Op, call func() ([]byte, error)) ([]byte, error) {
	w := inst.w
	w.hung.Reset(s.cfg.CallTimeout)
	resp, err := call()
	w.hung.Stop()
	if err != nil {
		w.cmd.Process.Kill()
		s.log.Warn("instance worker failed during a call", "instance", inst.id, "op", op.String(), "err", err)
		return nil, fmt.Errorf("instance %q worker failed during %v (restarted from sealed state; the call may not have completed): %w", inst.id, op, err)
	}
	return resp, nil
}

// TPM response codes the backend itself answers with.
const (
	rcValue   = 0x84
	rcFailure = 0x101
	rcFail    = 0x09 // swtpm's TPM_FAIL, for control calls
)

func tpmError(rc uint32) []byte {
	return binary.BigEndian.AppendUint32([]byte{0x80, 0x01, 0, 0, 0, 10}, rc)
}

// freshReport answers the vendor command of attest/freshreport: a CSV
// report bound to the caller's nonce, the instance's EK and its id. Called
// with inst.mu held and a worker running.
func (s *Supervisor) freshReport(ctx context.Context, inst *instance, cmd []byte) []byte {
	req, err := freshreport.ParseCommand(cmd)
	if err != nil {
		s.log.Warn("fresh report command refused", "instance", inst.id, "err", err)
		return tpmError(rcValue)
	}
	// TPM2_ReadPublic(ekHandle) on the instance itself: the report binds
	// the EK that this TPM really holds.
	readPublic := binary.BigEndian.AppendUint32([]byte{0x80, 0x01, 0, 0, 0, 14, 0, 0, 0x01, 0x73}, req.EKHandle)
	out, err := s.callWorker(ctx, inst, tpmrpc.OpExecute, tpmrpc.AppendRequest(nil, tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: readPublic}))
	if err != nil {
		return tpmError(rcFailure)
	}
	resp, err := tpmrpc.ParseResponse(out)
	if err != nil || resp.Err != "" || len(resp.Payload) < 10 {
		return tpmError(rcFailure)
	}
	if rc := responseCode(resp.Payload); rc != 0 {
		return tpmError(rc)
	}
	p := resp.Payload[10:]
	if len(p) < 2 || len(p) < 2+int(binary.BigEndian.Uint16(p)) {
		return tpmError(rcFailure)
	}
	ekPublic := bytes.Clone(p[2 : 2+int(binary.BigEndian.Uint16(p))])
	if err := freshreport.CheckEK(req.EKHandle, ekPublic); err != nil {
		// A report binds the key it names: it must be the instance's EK,
		// not a key someone loaded.
		s.log.Warn("fresh report refused: not an EK", "instance", inst.id, "handle", fmt.Sprintf("%#x", req.EKHandle), "reason", err)
		return tpmError(rcValue)
	}
	res := freshreport.Result{Instance: inst.id, EKPublic: ekPublic}
	switch req.Part {
	case freshreport.PartChipCerts:
		res.Payload = s.cfg.ChipCerts
	default:
		if s.cfg.Evidence == nil {
			s.log.Warn("fresh report asked for, but this backend has no CSV evidence provider", "instance", inst.id)
			return tpmError(rcFailure)
		}
		rd := freshreport.ReportData(req.Nonce, ekPublic, inst.id)
		report, err := s.cfg.Evidence.Report(ctx, rd[:])
		if err != nil {
			s.log.Error("CSV report for a fresh attestation failed", "instance", inst.id, "err", err)
			return tpmError(rcFailure)
		}
		res.Payload = report
	}
	return freshreport.AppendResponse(nil, res)
}

// track follows the TPM's life cycle so that restore can replay it.
func (s *Supervisor) track(inst *instance, r tpmrpc.Request, resp []byte) {
	switch r.Op {
	case tpmrpc.OpInit:
		if p, err := tpmrpc.ParseResponse(resp); err == nil && p.Err == "" && p.RC == 0 {
			inst.tpmRunning, inst.startedUp = true, false
			if inst.hostLocked {
				inst.lockBroken = true
			}
			inst.hostLocked = false // a reset: the next boot runs through the host path
		}
	case tpmrpc.OpStop:
		inst.tpmRunning, inst.startedUp = false, false
	case tpmrpc.OpSetLocality:
		if p, err := tpmrpc.ParseResponse(resp); err == nil && p.Err == "" && p.RC == 0 {
			inst.locality = r.Locality
		}
	case tpmrpc.OpExecute:
		if r.Arg&tpmrpc.ExecuteAtLocality != 0 {
			// The locality stays set after the command (vtpm/engine
			// ExecuteAt, as swtpm's TPM_SEND_COMMAND prefix): the next
			// caller's plain commands are checked at it.
			if p, err := tpmrpc.ParseResponse(resp); err == nil && p.Err == "" {
				inst.locality = r.Locality
			}
		}
		if len(r.Payload) >= 10 && binary.BigEndian.Uint32(r.Payload[6:10]) == 0x144 {
			if p, err := tpmrpc.ParseResponse(resp); err == nil && p.Err == "" && responseCode(p.Payload) == 0 {
				inst.startedUp = true
			}
		}
	}
}
