package verifier

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PGNonces is a NonceStore in PostgreSQL, so that verifier replicas
// behind a load balancer share their challenges: a nonce handed out by
// one is accepted once by any of them, and by none after that. Expired
// nonces are swept in the background; outstanding ones are bounded per
// client address as in memory (50,000) and in all (500,000).
type PGNonces struct {
	pool                   *pgxpool.Pool
	MaxOutstanding, PerSrc int
	stop                   context.CancelFunc
}

const pgNonceSchema = `
CREATE TABLE IF NOT EXISTS cvtpm_verifier_nonces (
	nonce   bytea PRIMARY KEY,
	expires timestamptz NOT NULL,
	source  text NOT NULL
);
CREATE INDEX IF NOT EXISTS cvtpm_verifier_nonces_expires ON cvtpm_verifier_nonces (expires);
CREATE INDEX IF NOT EXISTS cvtpm_verifier_nonces_source ON cvtpm_verifier_nonces (source);
`

// OpenPGNonces connects (a libpq connection string or URL), creates the
// table if needed and starts the sweep of expired nonces.
func OpenPGNonces(ctx context.Context, conn string) (*PGNonces, error) {
	pool, err := pgxpool.New(ctx, conn)
	if err != nil {
		return nil, fmt.Errorf("verifier database: %w", err)
	}
	if _, err := pool.Exec(ctx, pgNonceSchema); err != nil {
		pool.Close()
		return nil, fmt.Errorf("verifier database schema: %w", err)
	}
	sweep, stop := context.WithCancel(context.Background())
	p := &PGNonces{pool: pool, MaxOutstanding: 500_000, PerSrc: 50_000, stop: stop}
	go func() {
		t := time.NewTicker(10 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-sweep.Done():
				return
			case <-t.C:
				pool.Exec(sweep, `DELETE FROM cvtpm_verifier_nonces WHERE expires < now()`)
			}
		}
	}()
	return p, nil
}

// Close stops the sweep and closes the pool.
func (p *PGNonces) Close() { p.stop(); p.pool.Close() }

// Issue stores a nonce, or refuses with ErrBusy when its source (or the
// table) holds too many.
func (p *PGNonces) Issue(ctx context.Context, nonce []byte, expires time.Time) error {
	src := sourceOf(ctx)
	var perSource, total int
	err := p.pool.QueryRow(ctx, `SELECT
		(SELECT count(*) FROM (SELECT 1 FROM cvtpm_verifier_nonces WHERE source = $1 AND expires >= now() LIMIT $2) s),
		(SELECT count(*) FROM (SELECT 1 FROM cvtpm_verifier_nonces WHERE expires >= now() LIMIT $3) t)`,
		src, p.PerSrc, p.MaxOutstanding).Scan(&perSource, &total)
	if err != nil {
		return fmt.Errorf("verifier database: %w", err)
	}
	if perSource >= p.PerSrc || total >= p.MaxOutstanding {
		return ErrBusy
	}
	if _, err := p.pool.Exec(ctx, `INSERT INTO cvtpm_verifier_nonces (nonce, expires, source) VALUES ($1, $2, $3)`,
		nonce, expires, src); err != nil {
		return fmt.Errorf("verifier database: %w", err)
	}
	return nil
}

// Consume takes a nonce out (whichever replica issued it); it is valid if
// it was there and has not expired.
func (p *PGNonces) Consume(ctx context.Context, nonce []byte, now time.Time) (bool, string) {
	var expires time.Time
	err := p.pool.QueryRow(ctx, `DELETE FROM cvtpm_verifier_nonces WHERE nonce = $1 RETURNING expires`, nonce).Scan(&expires)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return false, "nonce-unknown-or-used"
	case err != nil:
		return false, "nonce-store-unavailable"
	case now.After(expires):
		return false, "nonce-expired"
	}
	return true, ""
}
