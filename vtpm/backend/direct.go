package backend

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"syscall"
	"time"

	"cvtpm/internal/attestedlink"
	"cvtpm/internal/logfield"
	"cvtpm/vtpm/tpmrpc"
)

// Direct sessions (internal/attestedlink, direct.go): the supervisor
// authorises a guest's attested session, then hands its socket and keys
// to the instance's worker, which serves its plain TPM commands without
// the supervisor on the path. What stays here is what a worker must not
// decide alone: who may have a session (the Authorizer, asked again
// every directSyncInterval so that ACL reloads, revocations, binding
// changes and deletions reach sessions already handed over), and the
// lease that makes the worker stop serving when the key broker has not
// recorded this backend's state (anchoring) for too long.

// directSyncInterval is how often handed-over sessions are authorised
// again and the workers' leases renewed: the longest a revoked client
// keeps a direct session.
const directSyncInterval = time.Second

// maxDirectPerInstance bounds the direct sessions of one instance (a
// guest proxy holds one); the worker enforces the same bound.
const maxDirectPerInstance = 8

// directSession is the supervisor's record of one handed-over session.
type directSession struct {
	id          uint64
	w           *worker // the worker that holds it; gone with it
	caps        tpmrpc.Capabilities
	client      string
	reauthorize func(ctx context.Context) (tpmrpc.Capabilities, error)
}

// directState is the supervisor's side of direct sessions.
type directState struct {
	nextID   uint64 // under Supervisor.mu
	loopOnce sync.Once
	stop     chan struct{}
	done     chan struct{}
	syncs    sync.WaitGroup // rounds of syncDirect under way
	// workerLog limits the lines about what a worker answered a sync,
	// per instance: a worker taken over must not fill the log.
	workerLog logfield.Limiter
}

// HandOff implements attestedlink.DirectHandler: it gives an authorised
// session of instance h.Instance to the instance's worker.
func (s *Supervisor) HandOff(ctx context.Context, h *attestedlink.DirectHandoff) error {
	inst := s.lookup(h.Instance)
	if inst == nil {
		return fmt.Errorf("no instance %q on this backend", h.Instance)
	}
	if h.Caps&tpmrpc.HostBoot != 0 {
		// Its rights change when the workload locks the host path, which
		// only the supervisor sees.
		return errors.New("the host path of a bound instance is served by the supervisor only")
	}
	if h.Caps&tpmrpc.CapCommand == 0 {
		return errors.New("the session may not send TPM commands")
	}
	sc, ok := h.Conn.(syscall.Conn)
	if !ok {
		return errors.New("the session's connection cannot be handed over")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("the session's connection: %w", err)
	}
	id, err := s.attachDirect(ctx, inst, h, raw)
	if err != nil {
		return err
	}
	// Confirmed without the instance's lock, and within a deadline: the
	// write goes to a socket the host relays, which may never take it.
	h.Conn.SetWriteDeadline(time.Now().Add(acceptTimeout))
	err = h.Accept()
	h.Conn.SetWriteDeadline(time.Time{})
	if err != nil {
		s.endDirect(ctx, inst, []uint64{id})
		return fmt.Errorf("confirming the direct session: %w", err)
	}
	s.log.Info("direct session handed to the instance's worker", "instance", inst.id, "client", h.Client, "session", id)
	return nil
}

// acceptTimeout bounds the confirmation of a hand-off.
const acceptTimeout = 10 * time.Second

// attachDirect gives h's socket and keys to inst's worker and records the
// session; it returns the session's id.
func (s *Supervisor) attachDirect(ctx context.Context, inst *instance, h *attestedlink.DirectHandoff, raw syscall.RawConn) (uint64, error) {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	if err := s.serving(inst); err != nil {
		return 0, err
	}
	if h.Caps&tpmrpc.CapLock != 0 && inst.lockBroken {
		return 0, fmt.Errorf("instance %q: the host reset the TPM after the workload locked it (lock again after a reboot)", inst.id)
	}
	// Asked again under the lock: an ACL reload that came after the link
	// server asked is either seen here, or reaches this session through
	// ReauthorizeDirect, which takes the lock after it.
	if caps, err := h.Reauthorize(ctx); err != nil || caps != h.Caps {
		return 0, fmt.Errorf("the client's rights changed during the hand-off (%v)", err)
	}
	if inst.w == nil {
		if err := s.start(ctx, inst, startExisting); err != nil {
			return 0, fmt.Errorf("instance %q is not running: %w", inst.id, err)
		}
	}
	inst.pruneDirect()
	if len(inst.direct) >= maxDirectPerInstance {
		return 0, fmt.Errorf("instance %q already has %d direct sessions", inst.id, len(inst.direct))
	}
	lease, err := s.lease()
	if err != nil {
		return 0, err
	}
	s.mu.Lock()
	s.direct.nextID++
	id := s.direct.nextID
	s.mu.Unlock()
	grant := tpmrpc.AppendDirectGrant(nil, tpmrpc.DirectGrant{Caps: h.Caps, Lease: lease, Keys: h.Keys})
	req := tpmrpc.AppendRequest(nil, tpmrpc.Request{Op: tpmrpc.OpDirectAttach, Arg: id, Payload: grant})
	clear(grant)
	defer clear(req)
	var out []byte
	var callErr error
	if err := raw.Control(func(fd uintptr) {
		w := inst.w
		out, callErr = s.callWorkerWith(inst, tpmrpc.OpDirectAttach, func() ([]byte, error) {
			return w.caller.CallPassing(ctx, req, int(fd))
		})
	}); err != nil {
		return 0, fmt.Errorf("the session's connection: %w", err)
	}
	if callErr != nil {
		return 0, callErr
	}
	if p, err := tpmrpc.ParseResponse(out); err != nil || p.Err != "" {
		return 0, fmt.Errorf("the instance's worker refused the session: %v%s", err, p.Err)
	}
	inst.direct = append(inst.direct, &directSession{id: id, w: inst.w, caps: h.Caps, client: h.Client, reauthorize: h.Reauthorize})
	directSessions.Inc()
	s.direct.loopOnce.Do(s.startDirectLoop)
	return id, nil
}

// serving returns nil if inst may serve calls now, or why not, in the
// words Call answers with. Called with inst.mu held.
func (s *Supervisor) serving(inst *instance) error {
	if inst.deleted {
		return fmt.Errorf("instance %q was deleted", inst.id)
	}
	if inst.movedTo != "" {
		return inst.lastErr
	}
	if d, stale := s.unanchoredFor(); stale {
		// Fail closed: writes the broker has not recorded could be rolled
		// back by whoever holds the disk, and a superseded session means
		// another CVM runs as this backend.
		return fmt.Errorf("instance %q: the key broker has not recorded this backend's state for %s (unreachable, or another CVM runs as this backend): refusing to serve until it does", inst.id, d.Round(time.Second))
	}
	return nil
}

// lease is how long from now a worker may serve direct calls: until the
// supervisor itself would stop serving for want of an anchor.
func (s *Supervisor) lease() (time.Duration, error) {
	if s.cfg.Anchorer == nil {
		return tpmrpc.LeaseUnbounded, nil
	}
	s.mu.Lock()
	left := s.maxUnanchored() - time.Since(s.anchorOK)
	s.mu.Unlock()
	if left <= 0 {
		return 0, errors.New("the key broker has not recorded this backend's state recently: refusing to serve until it does")
	}
	return left, nil
}

// pruneDirect forgets sessions held by a worker that is gone. Called with
// inst.mu held.
func (i *instance) pruneDirect() {
	i.direct = slices.DeleteFunc(i.direct, func(d *directSession) bool {
		if d.w != i.w || d.w == nil {
			directSessions.Dec()
			return true
		}
		return false
	})
}

func (s *Supervisor) startDirectLoop() {
	s.direct.stop, s.direct.done = make(chan struct{}), make(chan struct{})
	go s.directLoop()
}

// stopDirectLoop ends the loop, if it runs. Called by Close.
func (s *Supervisor) stopDirectLoop() {
	s.direct.loopOnce.Do(func() {}) // no loop starts after this
	if s.direct.stop != nil {
		close(s.direct.stop)
		<-s.direct.done
	}
	s.direct.syncs.Wait()
}

func (s *Supervisor) directLoop() {
	defer close(s.direct.done)
	t := time.NewTicker(directSyncInterval)
	defer t.Stop()
	for {
		select {
		case <-s.direct.stop:
			return
		case <-t.C:
		}
		s.syncAll()
	}
}

// syncAll starts a syncDirect round on every instance with direct
// sessions whose last round is over: a slow instance (a long TPM command,
// a CRL fetch) delays its own revocations only.
func (s *Supervisor) syncAll() {
	for _, inst := range s.snapshot() {
		inst.mu.Lock()
		n := len(inst.direct)
		inst.mu.Unlock()
		if n == 0 || !inst.directSyncing.CompareAndSwap(false, true) {
			continue
		}
		s.direct.syncs.Add(1)
		go func() {
			defer s.direct.syncs.Done()
			defer inst.directSyncing.Store(false)
			ctx, cancel := context.WithTimeout(context.Background(), 5*directSyncInterval)
			defer cancel()
			s.syncDirect(ctx, inst)
		}()
	}
}

// ReauthorizeDirect authorises every direct session again now and waits
// (at most until ctx ends) for the rounds: for an ACL reload, so that it
// takes effect at once on sessions handed to workers too.
func (s *Supervisor) ReauthorizeDirect(ctx context.Context) {
	var wg sync.WaitGroup
	for _, inst := range s.snapshot() {
		// Every instance, also those without direct sessions: syncDirect
		// takes the instance's lock, so a hand-off under way is recorded
		// (and then authorised again here) or sees the new rights itself.
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.syncDirect(ctx, inst)
		}()
	}
	wg.Wait()
}

// syncDirect authorises inst's direct sessions again, ends those no
// longer authorised as they were, and renews the worker's lease.
func (s *Supervisor) syncDirect(ctx context.Context, inst *instance) {
	inst.mu.Lock()
	sessions := slices.Clone(inst.direct)
	inst.mu.Unlock()
	var end []uint64
	for _, d := range sessions {
		// Asked without the instance's lock: an Authorizer may fetch a
		// CRL. A session whose rights changed in any way ends; its client
		// asks again and gets the new ones.
		caps, err := d.reauthorize(ctx)
		if err != nil || caps != d.caps {
			why := fmt.Sprint(err)
			if err == nil {
				why = fmt.Sprintf("its rights changed to %v", caps)
			}
			s.log.Info("direct session ended: the client is no longer authorised as it was", "instance", inst.id, "client", d.client, "session", d.id, "why", why)
			end = append(end, d.id)
		}
	}
	s.endDirect(ctx, inst, end)
}

// endDirect ends the sessions named, renews the lease, and forgets
// sessions the worker no longer has. A worker that is not serving for
// any reason (deleted, moved, unanchored) ends them all.
func (s *Supervisor) endDirect(ctx context.Context, inst *instance, end []uint64) {
	inst.mu.Lock()
	defer inst.mu.Unlock()
	inst.pruneDirect()
	if len(inst.direct) == 0 {
		return
	}
	lease, err := s.lease()
	if err != nil || s.serving(inst) != nil {
		lease, end = 0, nil
		for _, d := range inst.direct {
			end = append(end, d.id)
		}
	}
	req := tpmrpc.AppendRequest(nil, tpmrpc.Request{Op: tpmrpc.OpDirectSync, Payload: tpmrpc.AppendDirectSync(nil, lease, end)})
	out, err := s.callWorker(ctx, inst, tpmrpc.OpDirectSync, req)
	if err != nil {
		return // the worker is gone, and its sessions with it
	}
	p, err := tpmrpc.ParseResponse(out)
	if err != nil || p.Err != "" {
		s.warnWorker(inst, "the instance's worker did not renew its direct sessions", "err", logfield.Clip(fmt.Sprint(err, p.Err)))
		return
	}
	reply, err := tpmrpc.ParseDirectSyncReply(p.Payload)
	if err != nil {
		s.warnWorker(inst, "the instance's worker answered a direct sync with bytes it should not", "err", err)
		return
	}
	// As refusals (below), bounded: what a worker taken over reports must
	// not drive the counters all instances share.
	directCalls.Add(float64(min(reply.Calls, maxDirectCallsPerSync)))
	directCallSeconds.Add(min(reply.Busy, maxDirectBusyPerSync).Seconds())
	s.logDirectRefusals(inst, reply.Refusals)
	inst.direct = slices.DeleteFunc(inst.direct, func(d *directSession) bool {
		if slices.Contains(reply.Open, d.id) {
			return false
		}
		directSessions.Dec()
		return true
	})
}

// logDirectRefusals counts and logs the calls inst's worker refused on
// its direct sessions, as the supervisor does its own callers' (under
// the same rate limit): an operator sees a guest's refused commands
// whichever way they came. Under inst.mu.
//
// The reply comes from the worker, which runs libtpms on guest input: a
// worker taken over could report what it likes. Only sessions this
// supervisor handed to this instance count, each once per sync, and at
// most maxRefusalsPerSync calls each (a worker serves far fewer in the
// second between syncs), so that it cannot drive the counter all
// instances share past where another instance's refusals still show.
func (s *Supervisor) logDirectRefusals(inst *instance, refusals []tpmrpc.DirectRefusal) {
	var seen []uint64
	for _, r := range refusals {
		i := slices.IndexFunc(inst.direct, func(d *directSession) bool { return d.id == r.Session })
		if i < 0 || slices.Contains(seen, r.Session) {
			s.warnWorker(inst, "the instance's worker reported refusals on a session it was not given (or twice)", "direct_session", r.Session)
			continue
		}
		seen = append(seen, r.Session)
		calls := min(r.Calls, maxRefusalsPerSync)
		refusedCalls.WithLabelValues(tpmrpc.OpExecute.String()).Add(float64(calls))
		if ok, held := s.refusalLog.Allow(inst.id); ok {
			s.log.Warn("call refused", "instance", inst.id, "op", tpmrpc.OpExecute.String(), "reason", r.Reason,
				"client", inst.direct[i].client, "direct_session", r.Session, "calls", calls, "similar_lines_suppressed", held)
		}
	}
}

// warnWorker logs what inst's worker answered wrongly, within a rate.
func (s *Supervisor) warnWorker(inst *instance, msg string, args ...any) {
	if ok, held := s.direct.workerLog.Allow(inst.id); ok {
		s.log.Warn(msg, append([]any{"instance", inst.id, "similar_lines_suppressed", held}, args...)...)
	}
}

// maxRefusalsPerSync bounds the refusals counted for one direct session
// in one sync; maxDirectCallsPerSync and maxDirectBusyPerSync the calls
// and time counted for one worker (one thread: it cannot be busy for
// much longer than the time between two syncs).
const (
	maxRefusalsPerSync    = 1 << 20
	maxDirectCallsPerSync = 1 << 20
	maxDirectBusyPerSync  = 5 * directSyncInterval
)
