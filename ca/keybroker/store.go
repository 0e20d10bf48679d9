package keybroker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	bolt "go.etcd.io/bbolt"
)

// Store keeps the broker's sealed keys and the instances' anchors: per
// scope (a migration domain, or a backend without one) and instance, the
// highest state generation and the backend that owns the instance. The
// CA's own database holds them (bbolt or PostgreSQL), so CA replicas on
// PostgreSQL share them.
type Store interface {
	// SealedKey returns the sealed key called name, storing create's
	// result first if there is none (atomically: replicas racing to
	// create a key agree on one).
	SealedKey(ctx context.Context, name string, create func() ([]byte, error)) ([]byte, error)
	// Anchors returns the generations of scope's instances that backend
	// owns, and the owners of those another backend owns.
	Anchors(ctx context.Context, scope, backend string) (owned map[string]uint64, moved map[string]string, err error)
	// RaiseAnchors applies an owner's report of its instances'
	// generations (see anchor.report); it returns the instances backend
	// does not own (any more).
	RaiseAnchors(ctx context.Context, scope, backend string, gens map[string]uint64) (moved map[string]string, err error)
	// Claim applies a claim (see anchor.claim).
	Claim(ctx context.Context, scope, backend, instance string, gen uint64) (ClaimState, error)
	// NewSession records a new release of backend's keys: lease is its
	// session, the previous session's reports are refused from now on. It
	// returns the last report counter, which the new session continues.
	NewSession(ctx context.Context, backend string, lease []byte) (lastCounter uint64, err error)
	// Advance accepts a report of backend's session lease numbered
	// counter: ErrSuperseded unless lease is the current one, ErrReplay
	// unless counter is above the last.
	Advance(ctx context.Context, backend string, lease []byte, counter uint64) error
	// BindDomain records backend's migration domain the first time and
	// refuses another one later.
	BindDomain(ctx context.Context, backend, domain string) error
}

// Errors of Advance and BindDomain.
var (
	ErrSuperseded  = errors.New("this backend's keys were released to another session since (another CVM runs as this backend)")
	ErrReplay      = errors.New("report counter not above the last one (a replayed report)")
	ErrOtherDomain = errors.New("the backend belongs to another migration domain")
)

// session is a backend's current release: its lease and last counter.
type session struct {
	Lease   []byte `json:"lease"`
	Counter uint64 `json:"counter"`
}

func (se *session) advance(lease []byte, counter uint64) error {
	switch {
	case !bytes.Equal(se.Lease, lease):
		return ErrSuperseded
	case counter <= se.Counter:
		return fmt.Errorf("%w: %d <= %d", ErrReplay, counter, se.Counter)
	}
	se.Counter = counter
	return nil
}

// ClaimState is where a claim stands.
type ClaimState int

const (
	// ClaimGranted: the claimant owns the instance.
	ClaimGranted ClaimState = iota
	// ClaimPending: the owner has not confirmed yet that the claimed
	// state is its current state; ask again.
	ClaimPending
)

// Errors of Claim.
var (
	ErrStale  = errors.New("state older than the instance's anchored generation")
	ErrDenied = errors.New("the owning backend has newer state than the claimed export (an old export was replayed)")
)

var (
	bucketKeys    = []byte("broker-keys")
	bucketAnchors = []byte("broker-anchors")
	bucketRecords = []byte("broker-records") // sessions, domains
)

// BoltStore keeps the records in the CA's bbolt database.
type BoltStore struct{ DB *bolt.DB }

// NewBoltStore creates the broker's buckets in db.
func NewBoltStore(db *bolt.DB) (*BoltStore, error) {
	err := db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketKeys, bucketAnchors, bucketRecords} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("key broker store: %w", err)
	}
	return &BoltStore{DB: db}, nil
}

func (s *BoltStore) SealedKey(_ context.Context, name string, create func() ([]byte, error)) ([]byte, error) {
	var out []byte
	// Most calls find the key: a read transaction does not sync the file.
	s.DB.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketKeys).Get([]byte(name)); v != nil {
			out = append([]byte(nil), v...)
		}
		return nil
	})
	if out != nil {
		return out, nil
	}
	err := s.DB.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketKeys)
		if v := b.Get([]byte(name)); v != nil {
			out = append([]byte(nil), v...)
			return nil
		}
		v, err := create()
		if err != nil {
			return err
		}
		out = v
		return b.Put([]byte(name), v)
	})
	return out, err
}

func anchorKey(scope, instance string) []byte { return []byte(scope + "\x00" + instance) }

// anchor is one instance's record: its highest generation and owner, and
// a pending or denied claim by another backend.
type anchor struct {
	Gen      uint64 `json:"gen"`
	Owner    string `json:"owner"`
	Claimant string `json:"claimant,omitempty"`
	ClaimGen uint64 `json:"claim_gen,omitempty"`
	Denied   string `json:"denied,omitempty"` // a claimant whose claim the owner's newer state refuted
}

// report applies the owner's (or a first) report of generation g by
// backend. A pending claim completes when the owner's state is exactly the
// claimed state (nothing happened since the export: the owner hands over
// and its copy is stale from now on); it is denied when the owner has
// moved on. It returns the owner, if another backend owns the instance now.
func (a *anchor) report(exists bool, backend string, g uint64) (movedTo string) {
	switch {
	case !exists:
		*a = anchor{Gen: g, Owner: backend}
		return ""
	case a.Owner != backend:
		return a.Owner
	}
	if a.Claimant != "" {
		switch {
		case g == a.ClaimGen:
			a.Owner, a.Claimant, a.Gen = a.Claimant, "", max(a.Gen, g)
			return a.Owner
		case g > a.ClaimGen:
			a.Denied, a.Claimant = a.Claimant, ""
		}
	}
	a.Gen = max(a.Gen, g)
	return ""
}

// claim applies backend's claim of generation gen: granted at once if
// nobody or backend itself owns the instance, pending until the owner
// confirms, or refused (ErrStale, ErrDenied).
func (a *anchor) claim(exists bool, backend string, gen uint64) (ClaimState, error) {
	switch {
	case exists && a.Owner == backend:
		// The owner loading state of its own lineage (the rest of a
		// migration's blobs): its worker refuses anything not newer than
		// the instance's state.
		return ClaimGranted, nil
	case exists && a.Denied == backend:
		a.Denied = ""
		return 0, ErrDenied
	case exists && gen < a.Gen:
		return 0, fmt.Errorf("%w: generation %d < %d", ErrStale, gen, a.Gen)
	case !exists:
		*a = anchor{Gen: gen, Owner: backend}
		return ClaimGranted, nil
	}
	a.Claimant, a.ClaimGen = backend, gen
	return ClaimPending, nil
}

func parseAnchor(v []byte) (anchor, bool) {
	var a anchor
	if v == nil || json.Unmarshal(v, &a) != nil {
		return anchor{}, false
	}
	return a, true
}

func (a anchor) bytes() []byte {
	b, _ := json.Marshal(a)
	return b
}

func (s *BoltStore) Anchors(_ context.Context, scope, backend string) (map[string]uint64, map[string]string, error) {
	owned, moved := map[string]uint64{}, map[string]string{}
	prefix := []byte(scope + "\x00")
	err := s.DB.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketAnchors).Cursor()
		for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
			a, ok := parseAnchor(v)
			if !ok {
				continue
			}
			if inst := string(k[len(prefix):]); a.Owner == backend {
				owned[inst] = a.Gen
			} else {
				moved[inst] = a.Owner
			}
		}
		return nil
	})
	return owned, moved, err
}

func (s *BoltStore) RaiseAnchors(_ context.Context, scope, backend string, gens map[string]uint64) (map[string]string, error) {
	moved := map[string]string{}
	err := s.DB.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketAnchors)
		for inst, g := range gens {
			k := anchorKey(scope, inst)
			a, ok := parseAnchor(b.Get(k))
			if to := a.report(ok, backend, g); to != "" {
				moved[inst] = to
			}
			if err := b.Put(k, a.bytes()); err != nil {
				return err
			}
		}
		return nil
	})
	return moved, err
}

func (s *BoltStore) Claim(_ context.Context, scope, backend, instance string, gen uint64) (ClaimState, error) {
	var st ClaimState
	var claimErr error
	err := s.DB.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketAnchors)
		k := anchorKey(scope, instance)
		a, ok := parseAnchor(b.Get(k))
		st, claimErr = a.claim(ok, backend, gen)
		return b.Put(k, a.bytes())
	})
	if err != nil {
		return 0, err
	}
	return st, claimErr
}

func (s *BoltStore) NewSession(_ context.Context, backend string, lease []byte) (uint64, error) {
	var last uint64
	err := s.DB.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketRecords)
		var se session
		if v := b.Get([]byte("session/" + backend)); v != nil {
			json.Unmarshal(v, &se)
		}
		last = se.Counter
		v, _ := json.Marshal(session{Lease: lease, Counter: se.Counter})
		return b.Put([]byte("session/"+backend), v)
	})
	return last, err
}

func (s *BoltStore) Advance(_ context.Context, backend string, lease []byte, counter uint64) error {
	var advErr error
	err := s.DB.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketRecords)
		var se session
		if v := b.Get([]byte("session/" + backend)); v != nil {
			json.Unmarshal(v, &se)
		}
		if advErr = se.advance(lease, counter); advErr != nil {
			return nil
		}
		v, _ := json.Marshal(se)
		return b.Put([]byte("session/"+backend), v)
	})
	if err != nil {
		return err
	}
	return advErr
}

func (s *BoltStore) BindDomain(_ context.Context, backend, domain string) error {
	return s.DB.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketRecords)
		k := []byte("domain/" + backend)
		if v := b.Get(k); v != nil {
			if string(v) != "="+domain {
				return fmt.Errorf("%w %q (asked for %q)", ErrOtherDomain, string(v[1:]), domain)
			}
			return nil
		}
		return b.Put(k, []byte("="+domain))
	})
}

// PGStore keeps the records in the CA's PostgreSQL database.
type PGStore struct{ Pool *pgxpool.Pool }

const pgSchema = `
CREATE TABLE IF NOT EXISTS cvtpm_broker_keys (
  name   TEXT PRIMARY KEY,
  sealed BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS cvtpm_broker_records (
  name  TEXT PRIMARY KEY,
  value JSONB NOT NULL
);
CREATE TABLE IF NOT EXISTS cvtpm_broker_anchors (
  scope    TEXT NOT NULL,
  instance TEXT NOT NULL,
  record   JSONB NOT NULL,  -- keybroker.anchor
  PRIMARY KEY (scope, instance)
);`

// NewPGStore creates the broker's tables.
func NewPGStore(ctx context.Context, pool *pgxpool.Pool) (*PGStore, error) {
	if _, err := pool.Exec(ctx, pgSchema); err != nil {
		return nil, fmt.Errorf("key broker schema: %w", err)
	}
	return &PGStore{Pool: pool}, nil
}

func (s *PGStore) SealedKey(ctx context.Context, name string, create func() ([]byte, error)) ([]byte, error) {
	var v []byte
	err := s.Pool.QueryRow(ctx, `SELECT sealed FROM cvtpm_broker_keys WHERE name = $1`, name).Scan(&v)
	if err == nil {
		return v, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("key broker store: %w", err)
	}
	nv, err := create()
	if err != nil {
		return nil, err
	}
	// A replica that created the key first wins; everyone reads its key.
	if _, err := s.Pool.Exec(ctx, `INSERT INTO cvtpm_broker_keys (name, sealed) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING`, name, nv); err != nil {
		return nil, fmt.Errorf("key broker store: %w", err)
	}
	if err := s.Pool.QueryRow(ctx, `SELECT sealed FROM cvtpm_broker_keys WHERE name = $1`, name).Scan(&v); err != nil {
		return nil, fmt.Errorf("key broker store: %w", err)
	}
	return v, nil
}

func (s *PGStore) Anchors(ctx context.Context, scope, backend string) (map[string]uint64, map[string]string, error) {
	rows, err := s.Pool.Query(ctx, `SELECT instance, record FROM cvtpm_broker_anchors WHERE scope = $1`, scope)
	if err != nil {
		return nil, nil, fmt.Errorf("key broker store: %w", err)
	}
	defer rows.Close()
	owned, moved := map[string]uint64{}, map[string]string{}
	for rows.Next() {
		var inst string
		var rec []byte
		if err := rows.Scan(&inst, &rec); err != nil {
			return nil, nil, err
		}
		a, ok := parseAnchor(rec)
		if !ok {
			continue
		}
		if a.Owner == backend {
			owned[inst] = a.Gen
		} else {
			moved[inst] = a.Owner
		}
	}
	return owned, moved, rows.Err()
}

// update runs fn on one instance's record in a transaction that holds the
// row lock, so replicas apply reports and claims one at a time.
func (s *PGStore) update(ctx context.Context, scope, instance string, fn func(a *anchor, exists bool)) error {
	tx, err := s.Pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("key broker store: %w", err)
	}
	defer tx.Rollback(ctx)
	// Make sure the row exists so that it can be locked.
	if _, err := tx.Exec(ctx, `INSERT INTO cvtpm_broker_anchors (scope, instance, record) VALUES ($1, $2, 'null') ON CONFLICT DO NOTHING`, scope, instance); err != nil {
		return fmt.Errorf("key broker store: %w", err)
	}
	var rec []byte
	if err := tx.QueryRow(ctx, `SELECT record FROM cvtpm_broker_anchors WHERE scope = $1 AND instance = $2 FOR UPDATE`, scope, instance).Scan(&rec); err != nil {
		return fmt.Errorf("key broker store: %w", err)
	}
	a, ok := parseAnchor(rec)
	ok = ok && a.Owner != ""
	fn(&a, ok)
	if _, err := tx.Exec(ctx, `UPDATE cvtpm_broker_anchors SET record = $3 WHERE scope = $1 AND instance = $2`, scope, instance, a.bytes()); err != nil {
		return fmt.Errorf("key broker store: %w", err)
	}
	return tx.Commit(ctx)
}

func (s *PGStore) RaiseAnchors(ctx context.Context, scope, backend string, gens map[string]uint64) (map[string]string, error) {
	moved := map[string]string{}
	for inst, g := range gens {
		err := s.update(ctx, scope, inst, func(a *anchor, exists bool) {
			if to := a.report(exists, backend, g); to != "" {
				moved[inst] = to
			}
		})
		if err != nil {
			return nil, err
		}
	}
	return moved, nil
}

func (s *PGStore) Claim(ctx context.Context, scope, backend, instance string, gen uint64) (ClaimState, error) {
	var st ClaimState
	var claimErr error
	err := s.update(ctx, scope, instance, func(a *anchor, exists bool) { st, claimErr = a.claim(exists, backend, gen) })
	if err != nil {
		return 0, err
	}
	return st, claimErr
}

// record runs fn on the record called name under its row lock.
func (s *PGStore) record(ctx context.Context, name string, fn func(v []byte) ([]byte, error)) error {
	tx, err := s.Pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("key broker store: %w", err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `INSERT INTO cvtpm_broker_records (name, value) VALUES ($1, 'null') ON CONFLICT DO NOTHING`, name); err != nil {
		return fmt.Errorf("key broker store: %w", err)
	}
	var v []byte
	if err := tx.QueryRow(ctx, `SELECT value FROM cvtpm_broker_records WHERE name = $1 FOR UPDATE`, name).Scan(&v); err != nil {
		return fmt.Errorf("key broker store: %w", err)
	}
	if string(v) == "null" {
		v = nil
	}
	nv, err := fn(v)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, `UPDATE cvtpm_broker_records SET value = $2 WHERE name = $1`, name, nv); err != nil {
		return fmt.Errorf("key broker store: %w", err)
	}
	return tx.Commit(ctx)
}

func (s *PGStore) NewSession(ctx context.Context, backend string, lease []byte) (uint64, error) {
	var last uint64
	err := s.record(ctx, "session/"+backend, func(v []byte) ([]byte, error) {
		var se session
		if v != nil {
			json.Unmarshal(v, &se)
		}
		last = se.Counter
		return json.Marshal(session{Lease: lease, Counter: se.Counter})
	})
	return last, err
}

func (s *PGStore) Advance(ctx context.Context, backend string, lease []byte, counter uint64) error {
	return s.record(ctx, "session/"+backend, func(v []byte) ([]byte, error) {
		var se session
		if v != nil {
			json.Unmarshal(v, &se)
		}
		if err := se.advance(lease, counter); err != nil {
			return nil, err
		}
		return json.Marshal(se)
	})
}

func (s *PGStore) BindDomain(ctx context.Context, backend, domain string) error {
	return s.record(ctx, "domain/"+backend, func(v []byte) ([]byte, error) {
		var have *string
		if v != nil {
			json.Unmarshal(v, &have)
		}
		if have != nil && *have != domain {
			return nil, fmt.Errorf("%w %q (asked for %q)", ErrOtherDomain, *have, domain)
		}
		return json.Marshal(domain)
	})
}
