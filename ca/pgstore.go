package ca

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PGStore is a Store in PostgreSQL, for several CA replicas behind a load
// balancer: they share issued and revoked certificates and the CRL number.
type PGStore struct{ pool *pgxpool.Pool }

const pgSchema = `
CREATE TABLE IF NOT EXISTS cvtpm_issued (
	serial      text PRIMARY KEY,
	instance_id text NOT NULL,
	der         bytea NOT NULL,
	issued      timestamptz NOT NULL,
	revoked     timestamptz,
	reason      integer NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS cvtpm_enrolled (
	slot      text PRIMARY KEY,
	ek_digest bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS cvtpm_meta (
	id         integer PRIMARY KEY CHECK (id = 1),
	crl_number bigint NOT NULL
);
INSERT INTO cvtpm_meta (id, crl_number) VALUES (1, 0) ON CONFLICT DO NOTHING;
`

// OpenPGStore connects (a libpq connection string or URL) and creates the
// tables if needed.
func OpenPGStore(ctx context.Context, conn string) (*PGStore, error) {
	pool, err := pgxpool.New(ctx, conn)
	if err != nil {
		return nil, fmt.Errorf("CA database: %w", err)
	}
	if _, err := pool.Exec(ctx, pgSchema); err != nil {
		pool.Close()
		return nil, fmt.Errorf("CA database schema: %w", err)
	}
	return &PGStore{pool: pool}, nil
}

// Close closes the connection pool.
func (s *PGStore) Close() error { s.pool.Close(); return nil }

func (s *PGStore) PutIssued(ctx context.Context, c IssuedCert) error {
	_, err := s.pool.Exec(ctx, `INSERT INTO cvtpm_issued (serial, instance_id, der, issued) VALUES ($1, $2, $3, $4)`,
		c.Serial, c.InstanceID, c.DER, c.Issued)
	return err
}

func (s *PGStore) Issued(ctx context.Context, serial string) (IssuedCert, error) {
	c := IssuedCert{Serial: serial}
	var revoked *time.Time
	err := s.pool.QueryRow(ctx, `SELECT instance_id, der, issued, revoked, reason FROM cvtpm_issued WHERE serial = $1`, serial).
		Scan(&c.InstanceID, &c.DER, &c.Issued, &revoked, &c.Reason)
	if errors.Is(err, pgx.ErrNoRows) {
		return c, fmt.Errorf("%w: %s", ErrUnknownSerial, serial)
	}
	if revoked != nil {
		c.Revoked = revoked.UTC()
	}
	c.Issued = c.Issued.UTC()
	return c, err
}

func (s *PGStore) Revoke(ctx context.Context, serial string, at time.Time, reason int) error {
	tag, err := s.pool.Exec(ctx, `UPDATE cvtpm_issued SET revoked = COALESCE(revoked, $2), reason = CASE WHEN revoked IS NULL THEN $3 ELSE reason END WHERE serial = $1`,
		serial, at.UTC(), reason)
	if err != nil {
		return err
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("%w: %s", ErrUnknownSerial, serial)
	}
	return nil
}

func (s *PGStore) Revoked(ctx context.Context) ([]x509.RevocationListEntry, error) {
	rows, err := s.pool.Query(ctx, `SELECT serial, revoked, reason FROM cvtpm_issued WHERE revoked IS NOT NULL ORDER BY revoked`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []x509.RevocationListEntry
	for rows.Next() {
		var serial string
		var at time.Time
		var reason int
		if err := rows.Scan(&serial, &at, &reason); err != nil {
			return nil, err
		}
		n, ok := new(big.Int).SetString(serial, 16)
		if !ok {
			return nil, fmt.Errorf("stored serial %q is not hex", serial)
		}
		out = append(out, x509.RevocationListEntry{SerialNumber: n, RevocationTime: at.UTC(), ReasonCode: reason})
	}
	return out, rows.Err()
}

func (s *PGStore) NextCRLNumber(ctx context.Context) (*big.Int, error) {
	var n int64
	if err := s.pool.QueryRow(ctx, `UPDATE cvtpm_meta SET crl_number = crl_number + 1 WHERE id = 1 RETURNING crl_number`).Scan(&n); err != nil {
		return nil, err
	}
	return big.NewInt(n), nil
}

// Pool is the connection pool, for other services of the CA process that
// keep their records beside the certificates (ca/keybroker).
func (s *PGStore) Pool() *pgxpool.Pool { return s.pool }

// RecordEnrollment implements EnrollmentRecorder: the row lock serialises
// replicas enrolling the same instance.
func (s *PGStore) RecordEnrollment(ctx context.Context, slot string, ekDigest []byte, rule string) error {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("CA database: %w", err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `INSERT INTO cvtpm_enrolled (slot, ek_digest) VALUES ($1, '') ON CONFLICT DO NOTHING`, slot); err != nil {
		return fmt.Errorf("CA database: %w", err)
	}
	var prev []byte
	if err := tx.QueryRow(ctx, `SELECT ek_digest FROM cvtpm_enrolled WHERE slot = $1 FOR UPDATE`, slot).Scan(&prev); err != nil {
		return fmt.Errorf("CA database: %w", err)
	}
	if err := applyReenroll(prev, len(prev) > 0, ekDigest, rule); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, `UPDATE cvtpm_enrolled SET ek_digest = $2 WHERE slot = $1`, slot, ekDigest); err != nil {
		return fmt.Errorf("CA database: %w", err)
	}
	return tx.Commit(ctx)
}
