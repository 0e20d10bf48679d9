package backend

import (
	"context"
	"errors"
	"fmt"

	"cvtpm/vtpm/statestore"
	"cvtpm/vtpm/tpmrpc"
)

// An instance's state leaves and enters the backend sealed with the
// migration key, which only the supervisor holds: a worker (which runs
// libtpms on the host's and the guest's commands) exports its state in
// the clear with its generation, and the supervisor seals it for the
// instance, the blob and that generation before it leaves; the supervisor
// opens what arrives, and the worker sees only state that was sealed for
// this instance by a backend with the key (vtpm/migration).

// errNoMigrationKey: this backend was started without a migration key.
var errNoMigrationKey = errors.New("this backend has no migration key: state cannot leave or enter it")

// transferBlobs names the state blobs by swtpm's numbering.
var transferBlobs = map[uint64]string{1: "permall", 2: "volatilestate", 3: "savestate"}

// transferName checks that state may move at all and names the blob.
func (s *Supervisor) transferName(r tpmrpc.Request) (string, error) {
	if s.migrationKey == nil {
		return "", errNoMigrationKey
	}
	name, ok := transferBlobs[r.Arg]
	if !ok {
		return "", fmt.Errorf("unknown state blob type %d", r.Arg)
	}
	return name, nil
}

// openIncoming opens the envelope a set-state call carries and returns
// the call for the worker, which holds the blob in the clear (the caller
// clears it once sent), and the envelope's generation. An empty payload
// (QEMU's for a blob the source did not have) goes through as it is.
func (s *Supervisor) openIncoming(inst *instance, name string, r tpmrpc.Request) (req []byte, gen uint64, err error) {
	if len(r.Payload) == 0 {
		return tpmrpc.AppendRequest(nil, r), 0, nil
	}
	plain, gen, err := s.migrationKey.OpenTransfer(inst.id, name, r.Payload)
	if err != nil {
		if errors.Is(err, statestore.ErrNotTransfer) {
			return nil, 0, fmt.Errorf("%s state refused: %w; plaintext or host-made state is never loaded through the host path (an administrator imports swtpm state with 'cvtpm backend create --import')", name, err)
		}
		return nil, 0, fmt.Errorf("%s state refused: %w", name, err)
	}
	msg := tpmrpc.AppendPlainState(nil, gen, plain)
	clear(plain)
	req = tpmrpc.AppendRequest(nil, tpmrpc.Request{Op: tpmrpc.OpSetState, Arg: r.Arg, Payload: msg})
	clear(msg)
	return req, gen, nil
}

// sealOutgoing turns the worker's answer to get-state into the answer for
// the caller: the blob sealed for the instance, the blob and its
// generation, or the worker's refusal. The worker's answer (plaintext) is
// cleared; nothing of it reaches the caller unsealed.
func (s *Supervisor) sealOutgoing(inst *instance, name string, workerResp []byte) tpmrpc.Response {
	defer clear(workerResp)
	p, err := tpmrpc.ParseResponse(workerResp)
	if err != nil {
		return tpmrpc.Response{RC: rcFail, Err: fmt.Sprintf("reading the %s state from the worker: %v", name, err)}
	}
	if p.Err != "" || p.RC != 0 {
		return tpmrpc.Response{RC: p.RC, Err: p.Err}
	}
	gen, plain, err := tpmrpc.ParsePlainState(p.Payload)
	if err != nil {
		return tpmrpc.Response{RC: rcFail, Err: fmt.Sprintf("reading the %s state from the worker: %v", name, err)}
	}
	env, err := s.migrationKey.SealTransfer(inst.id, name, gen, plain)
	if err != nil {
		return tpmrpc.Response{RC: rcFail, Err: fmt.Sprintf("sealing the %s state: %v", name, err)}
	}
	return tpmrpc.Response{Payload: env}
}

// claim takes the instance over at the key broker at generation gen
// before the worker loads migrated state: state older than the instance's
// anchor (an export the host kept) is refused. Called with inst.mu held.
func (s *Supervisor) claim(ctx context.Context, inst *instance, name string, gen uint64) error {
	cctx, cancel := context.WithTimeout(ctx, s.claimTimeout())
	defer cancel()
	if err := s.cfg.Anchorer.Claim(cctx, inst.id, gen); err != nil {
		return fmt.Errorf("%s state refused: the key broker does not let this backend take the instance over at generation %d: %w", name, gen, err)
	}
	inst.incoming = false
	s.mu.Lock()
	s.seen[inst.id] = max(s.seen[inst.id], gen)
	s.mu.Unlock()
	return nil
}
