package ca

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"cvtpm/test/testenv"
)

// TestStores runs one suite against both stores; each case reopens its
// store to stand for a CA restart.
func TestStores(t *testing.T) {
	ctx := context.Background()
	type opener func() (Store, func())
	backends := map[string]func(t *testing.T) opener{
		"bbolt": func(t *testing.T) opener {
			path := filepath.Join(t.TempDir(), "ca.db")
			return func() (Store, func()) {
				s, err := OpenBoltStore(path)
				if err != nil {
					t.Fatal(err)
				}
				return s, func() { s.Close() }
			}
		},
		"postgresql": func(t *testing.T) opener {
			conn := testenv.StartPostgres(t)
			return func() (Store, func()) {
				s, err := OpenPGStore(ctx, conn)
				if err != nil {
					t.Fatal(err)
				}
				return s, func() { s.Close() }
			}
		},
	}
	for name, backend := range backends {
		t.Run(name, func(t *testing.T) {
			open := backend(t)
			s, closeStore := open()
			now := time.Now().UTC().Truncate(time.Second)
			for _, serial := range []string{"0a1b", "ff00"} {
				if err := s.PutIssued(ctx, IssuedCert{Serial: serial, InstanceID: "vm-" + serial, DER: []byte{1, 2, 3}, Issued: now}); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Revoke(ctx, "0a1b", now, 1); err != nil {
				t.Fatal(err)
			}
			if err := s.Revoke(ctx, "0a1b", now.Add(time.Hour), 4); err != nil {
				t.Fatal(err)
			}
			if err := s.Revoke(ctx, "dead", now, 1); !errors.Is(err, ErrUnknownSerial) {
				t.Fatalf("revoking an unknown serial: %v", err)
			}
			n1, err := s.NextCRLNumber(ctx)
			if err != nil {
				t.Fatal(err)
			}
			closeStore() // restart
			s, closeStore = open()
			defer closeStore()
			c, err := s.Issued(ctx, "0a1b")
			if err != nil || c.InstanceID != "vm-0a1b" || !c.Revoked.Equal(now) || c.Reason != 1 {
				t.Fatalf("after restart: %+v, %v (want first revocation kept)", c, err)
			}
			if _, err := s.Issued(ctx, "beef"); !errors.Is(err, ErrUnknownSerial) {
				t.Fatalf("unknown serial: %v", err)
			}
			revoked, err := s.Revoked(ctx)
			if err != nil || len(revoked) != 1 || revoked[0].SerialNumber.Text(16) != "a1b" || revoked[0].ReasonCode != 1 {
				t.Fatalf("revoked list %+v, %v", revoked, err)
			}
			n2, err := s.NextCRLNumber(ctx)
			if err != nil || n2.Cmp(n1) <= 0 {
				t.Fatalf("CRL number %v after %v: must grow across restarts", n2, n1)
			}
			// The re-enrollment rule is kept in the store: it holds across
			// a restart (and, on PostgreSQL, across replicas).
			rec := s.(EnrollmentRecorder)
			ek1, ek2 := []byte("ek one digest"), []byte("ek two digest")
			if err := rec.RecordEnrollment(ctx, "vm1/1", ek1, "never"); err != nil {
				t.Fatal(err)
			}
			if err := rec.RecordEnrollment(ctx, "vm2/1", ek1, "same-ek"); err != nil {
				t.Fatal(err)
			}
			closeStore()
			s, closeStore = open()
			defer closeStore()
			rec = s.(EnrollmentRecorder)
			for _, tc := range []struct {
				slot, rule string
				ek         []byte
				ok         bool
			}{
				{"vm1/1", "never", ek1, false},
				{"vm2/1", "same-ek", ek2, false},
				{"vm2/1", "same-ek", ek1, true},
				{"vm2/1", "any", ek2, true},
				{"vm3/1", "never", ek2, true},
			} {
				err := rec.RecordEnrollment(ctx, tc.slot, tc.ek, tc.rule)
				if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrReenroll)) {
					t.Errorf("after restart, %s %s: %v", tc.slot, tc.rule, err)
				}
			}
			if name == "postgresql" {
				// A second replica on the same database.
				s2, close2 := open()
				defer close2()
				if err := s2.(EnrollmentRecorder).RecordEnrollment(ctx, "vm3/1", ek2, "never"); !errors.Is(err, ErrReenroll) {
					t.Errorf("a second replica re-enrolled vm3 under never: %v", err)
				}
			}
		})
	}
}
