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
		})
	}
}
