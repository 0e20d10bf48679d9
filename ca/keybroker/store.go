package keybroker

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	bolt "go.etcd.io/bbolt"
)

// Store keeps the broker's sealed keys and the anchored generations. The
// CA's own database holds them (bbolt or PostgreSQL), so CA replicas on
// PostgreSQL share them.
type Store interface {
	// SealedKey returns the sealed key called name, storing create's
	// result first if there is none (atomically: replicas racing to
	// create a key agree on one).
	SealedKey(ctx context.Context, name string, create func() ([]byte, error)) ([]byte, error)
	// Anchors returns backend's instance generations.
	Anchors(ctx context.Context, backend string) (map[string]uint64, error)
	// RaiseAnchors records generations, keeping the higher of old and new.
	RaiseAnchors(ctx context.Context, backend string, gens map[string]uint64) error
}

var (
	bucketKeys    = []byte("broker-keys")
	bucketAnchors = []byte("broker-anchors")
)

// BoltStore keeps the records in the CA's bbolt database.
type BoltStore struct{ DB *bolt.DB }

// NewBoltStore creates the broker's buckets in db.
func NewBoltStore(db *bolt.DB) (*BoltStore, error) {
	err := db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketKeys, bucketAnchors} {
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

func anchorKey(backend, instance string) []byte { return []byte(backend + "\x00" + instance) }

func (s *BoltStore) Anchors(_ context.Context, backend string) (map[string]uint64, error) {
	out := map[string]uint64{}
	prefix := []byte(backend + "\x00")
	err := s.DB.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketAnchors).Cursor()
		for k, v := c.Seek(prefix); k != nil && len(k) >= len(prefix) && string(k[:len(prefix)]) == string(prefix); k, v = c.Next() {
			if len(v) == 8 {
				out[string(k[len(prefix):])] = binary.BigEndian.Uint64(v)
			}
		}
		return nil
	})
	return out, err
}

func (s *BoltStore) RaiseAnchors(_ context.Context, backend string, gens map[string]uint64) error {
	return s.DB.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketAnchors)
		for inst, g := range gens {
			k := anchorKey(backend, inst)
			if v := b.Get(k); len(v) == 8 && binary.BigEndian.Uint64(v) >= g {
				continue
			}
			if err := b.Put(k, binary.BigEndian.AppendUint64(nil, g)); err != nil {
				return err
			}
		}
		return nil
	})
}

// PGStore keeps the records in the CA's PostgreSQL database.
type PGStore struct{ Pool *pgxpool.Pool }

const pgSchema = `
CREATE TABLE IF NOT EXISTS cvtpm_broker_keys (
  name   TEXT PRIMARY KEY,
  sealed BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS cvtpm_broker_anchors (
  backend    TEXT NOT NULL,
  instance   TEXT NOT NULL,
  generation BIGINT NOT NULL,
  PRIMARY KEY (backend, instance)
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

func (s *PGStore) Anchors(ctx context.Context, backend string) (map[string]uint64, error) {
	rows, err := s.Pool.Query(ctx, `SELECT instance, generation FROM cvtpm_broker_anchors WHERE backend = $1`, backend)
	if err != nil {
		return nil, fmt.Errorf("key broker store: %w", err)
	}
	defer rows.Close()
	out := map[string]uint64{}
	for rows.Next() {
		var inst string
		var g int64
		if err := rows.Scan(&inst, &g); err != nil {
			return nil, err
		}
		out[inst] = uint64(g)
	}
	return out, rows.Err()
}

func (s *PGStore) RaiseAnchors(ctx context.Context, backend string, gens map[string]uint64) error {
	for inst, g := range gens {
		if _, err := s.Pool.Exec(ctx, `INSERT INTO cvtpm_broker_anchors (backend, instance, generation) VALUES ($1, $2, $3)
ON CONFLICT (backend, instance) DO UPDATE SET generation = GREATEST(cvtpm_broker_anchors.generation, EXCLUDED.generation)`,
			backend, inst, int64(g)); err != nil {
			return fmt.Errorf("key broker store: %w", err)
		}
	}
	return nil
}
