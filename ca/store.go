package ca

import (
	"context"
	"crypto/subtle"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Store keeps what the CA issued and revoked. BoltStore is the embedded
// default; a PostgreSQL store for replicated CAs is tracked in issue 5.
type Store interface {
	PutIssued(ctx context.Context, c IssuedCert) error
	Revoke(ctx context.Context, serial string, at time.Time, reason int) error
	Revoked(ctx context.Context) ([]x509.RevocationListEntry, error)
	Issued(ctx context.Context, serial string) (IssuedCert, error)
	NextCRLNumber(ctx context.Context) (*big.Int, error)
}

// EnrollmentRecorder keeps each instance's EK of record (per EK algorithm)
// and applies the re-enrollment rule to it in one transaction, so that a
// CA restart or a second replica on the same database enforces the rule
// (BoltStore and PGStore implement it).
type EnrollmentRecorder interface {
	// RecordEnrollment checks rule ("never", "same-ek" or "any") for slot
	// against the EK of record and records ekDigest; ErrReenroll (wrapped,
	// with the reason) if the rule refuses it.
	RecordEnrollment(ctx context.Context, slot string, ekDigest []byte, rule string) error
}

// ErrReenroll: the re-enrollment rule refuses an enrollment.
var ErrReenroll = errors.New("re-enrollment refused")

// applyReenroll is the rule itself, for every store.
func applyReenroll(prev []byte, seen bool, ekDigest []byte, rule string) error {
	if !seen {
		return nil
	}
	switch {
	case rule == "never":
		return fmt.Errorf("%w: the instance is already enrolled", ErrReenroll)
	case rule == "same-ek" && subtle.ConstantTimeCompare(prev, ekDigest) != 1:
		return fmt.Errorf("%w: the instance is enrolled with another EK", ErrReenroll)
	}
	return nil
}

// IssuedCert is one issued certificate.
type IssuedCert struct {
	Serial     string    `json:"serial"` // hex
	InstanceID string    `json:"instance_id"`
	DER        []byte    `json:"der"`
	Issued     time.Time `json:"issued"`
	Revoked    time.Time `json:"revoked,omitzero"`
	Reason     int       `json:"reason,omitempty"` // RFC 5280 CRLReason
}

// ErrUnknownSerial is returned for a serial the CA never issued.
var ErrUnknownSerial = errors.New("no certificate with that serial")

var (
	bucketEnrolled = []byte("enrolled") // slot -> SHA-256 of the EK public area
	bucketIssued   = []byte("issued")
	bucketMeta     = []byte("meta")
	keyCRLNumber   = []byte("crl-number")
)

// BoltStore is a Store in one bbolt file: no setup, durable on commit.
type BoltStore struct{ db *bolt.DB }

// OpenBoltStore opens (creating) the database at path.
func OpenBoltStore(path string) (*BoltStore, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("CA database %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketIssued, bucketMeta, bucketEnrolled} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("CA database %s: %w", path, err)
	}
	return &BoltStore{db: db}, nil
}

// Close closes the database.
func (s *BoltStore) Close() error { return s.db.Close() }

// RecordEnrollment implements EnrollmentRecorder.
func (s *BoltStore) RecordEnrollment(_ context.Context, slot string, ekDigest []byte, rule string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketEnrolled)
		prev := b.Get([]byte(slot))
		if err := applyReenroll(prev, prev != nil, ekDigest, rule); err != nil {
			return err
		}
		return b.Put([]byte(slot), ekDigest)
	})
}

func (s *BoltStore) PutIssued(_ context.Context, c IssuedCert) error {
	b, err := json.Marshal(c)
	if err != nil {
		return err
	}
	// Batch coalesces concurrent issuances into one commit (one fsync).
	return s.db.Batch(func(tx *bolt.Tx) error { return tx.Bucket(bucketIssued).Put([]byte(c.Serial), b) })
}

func (s *BoltStore) Issued(_ context.Context, serial string) (IssuedCert, error) {
	var c IssuedCert
	err := s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketIssued).Get([]byte(serial))
		if b == nil {
			return fmt.Errorf("%w: %s", ErrUnknownSerial, serial)
		}
		return json.Unmarshal(b, &c)
	})
	return c, err
}

func (s *BoltStore) Revoke(_ context.Context, serial string, at time.Time, reason int) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucketIssued)
		b := bk.Get([]byte(serial))
		if b == nil {
			return fmt.Errorf("%w: %s", ErrUnknownSerial, serial)
		}
		var c IssuedCert
		if err := json.Unmarshal(b, &c); err != nil {
			return err
		}
		if !c.Revoked.IsZero() {
			return nil // revoking twice keeps the first time and reason
		}
		c.Revoked, c.Reason = at.UTC(), reason
		nb, err := json.Marshal(c)
		if err != nil {
			return err
		}
		return bk.Put([]byte(serial), nb)
	})
}

func (s *BoltStore) Revoked(context.Context) ([]x509.RevocationListEntry, error) {
	var out []x509.RevocationListEntry
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketIssued).ForEach(func(_, v []byte) error {
			var c IssuedCert
			if err := json.Unmarshal(v, &c); err != nil {
				return err
			}
			if c.Revoked.IsZero() {
				return nil
			}
			n, ok := new(big.Int).SetString(c.Serial, 16)
			if !ok {
				return fmt.Errorf("stored serial %q is not hex", c.Serial)
			}
			out = append(out, x509.RevocationListEntry{SerialNumber: n, RevocationTime: c.Revoked, ReasonCode: c.Reason})
			return nil
		})
	})
	return out, err
}

func (s *BoltStore) NextCRLNumber(context.Context) (*big.Int, error) {
	n := new(big.Int)
	err := s.db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucketMeta)
		if b := bk.Get(keyCRLNumber); b != nil {
			n.SetBytes(b)
		}
		n.Add(n, big.NewInt(1))
		return bk.Put(keyCRLNumber, n.Bytes())
	})
	return n, err
}

// crlTemplate is the next CRL's content: the given revocations, a fresh number,
// valid from now (less a minute of clock skew) for validity (default 24 h).
func crlTemplate(ctx context.Context, st Store, entries []x509.RevocationListEntry, validity time.Duration) (*x509.RevocationList, error) {
	num, err := st.NextCRLNumber(ctx)
	if err != nil {
		return nil, fmt.Errorf("CRL number: %w", err)
	}
	if validity <= 0 {
		validity = 24 * time.Hour
	}
	now := time.Now()
	return &x509.RevocationList{RevokedCertificateEntries: entries, Number: num,
		ThisUpdate: now.Add(-time.Minute), NextUpdate: now.Add(validity)}, nil
}

// DB is the underlying database, for other services of the CA process that
// keep their records beside the certificates (ca/keybroker).
func (s *BoltStore) DB() *bolt.DB { return s.db }
