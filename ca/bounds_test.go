package ca

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"log/slog"
	"math/big"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"

	"google.golang.org/grpc/peer"
)

func fromSource(ip string) context.Context {
	return peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP(ip), Port: 4242}})
}

// Outstanding challenges are bounded in all and per client address; a
// refused challenge grows nothing.
func TestChallengeBounds(t *testing.T) {
	f := newFixture(t, true)
	f.auth.MaxOutstanding, f.auth.MaxPerSource = 5, 3
	for i := range 3 {
		if _, err := f.auth.Challenge(fromSource("10.0.0.1")); err != nil {
			t.Fatalf("challenge %d: %v", i, err)
		}
	}
	if _, err := f.auth.Challenge(fromSource("10.0.0.1")); !errors.Is(err, ErrBusy) {
		t.Fatalf("4th challenge from one source: %v", err)
	}
	for range 2 {
		if _, err := f.auth.Challenge(fromSource("10.0.0.2")); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.auth.Challenge(fromSource("10.0.0.3")); !errors.Is(err, ErrBusy) {
		t.Fatalf("challenge beyond the total: %v", err)
	}
	if st := (&Server{Authority: f.auth, Log: slog.New(slog.DiscardHandler)}).refusal(ErrBusy); !bytes.Contains([]byte(st.Error()), []byte("ResourceExhausted")) {
		t.Fatalf("gRPC status for a full table: %v", st)
	}
}

// The CRL is signed once per change: served again while nothing was
// revoked, signed anew after a revocation.
func TestCRLSignedOncePerChange(t *testing.T) {
	f := newFixture(t, true)
	st, err := OpenBoltStore(t.TempDir() + "/ca.db")
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	f.auth.Store = st
	ctx := context.Background()
	a, _ := f.auth.CRL(ctx, PurposeEK, time.Hour)
	b, _ := f.auth.CRL(ctx, PurposeEK, time.Hour)
	if !bytes.Equal(a, b) {
		t.Fatal("an unchanged CRL was signed again")
	}
	ek, err := f.auth.Enroll(ctx, f.request(t, "vm-1", ekArea(t), f.challenge(t), "vm-1"))
	if err != nil {
		t.Fatal(err)
	}
	id := issueTestIdentity(t, f.auth, "frontend")
	for _, c := range []*x509.Certificate{ek, id} {
		if err := f.auth.Revoke(ctx, c.SerialNumber.Text(16), 1); err != nil {
			t.Fatal(err)
		}
	}
	c, err := f.auth.CRL(ctx, PurposeEK, time.Hour)
	if err != nil || bytes.Equal(a, c) {
		t.Fatalf("the CRL after a revocation is the old one (%v)", err)
	}
	// Each issuer's CRL lists what it signed, under its own signature.
	for _, tc := range []struct {
		p    Purpose
		want *big.Int
	}{{PurposeEK, ek.SerialNumber}, {PurposeIdentity, id.SerialNumber}, {PurposeAK, nil}} {
		der, err := f.auth.CRL(ctx, tc.p, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		parsed, err := x509.ParseRevocationList(der)
		if err != nil {
			t.Fatal(err)
		}
		is, _ := f.auth.issuerOf(tc.p)
		if err := parsed.CheckSignatureFrom(is.Cert); err != nil {
			t.Errorf("%s CRL: %v", tc.p, err)
		}
		var got []*big.Int
		for _, e := range parsed.RevokedCertificateEntries {
			got = append(got, e.SerialNumber)
		}
		if (tc.want == nil && len(got) != 0) || (tc.want != nil && (len(got) != 1 || got[0].Cmp(tc.want) != 0)) {
			t.Errorf("%s CRL lists %v, want %v", tc.p, got, tc.want)
		}
	}
}

func issueTestIdentity(t testing.TB, a *Authority, name string) *x509.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: name}}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, _ := x509.ParseCertificateRequest(csrDER)
	id, err := a.IssueIdentity(context.Background(), csr, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// BenchmarkChallengeOutstanding is a challenge taken back (what every
// enrollment does) with 100,000 other challenges outstanding, next to an
// idle CA; it reports the ratio (the goal is at most 2).
func BenchmarkChallengeOutstanding(b *testing.B) {
	run := func(outstanding int) time.Duration {
		f := newFixture(b, true)
		f.auth.MaxPerSource = 1 << 20 // one (in-process) source here
		for range outstanding {
			if _, err := f.auth.Challenge(context.Background()); err != nil {
				b.Fatal(err)
			}
		}
		start := time.Now()
		for range b.N {
			n, err := f.auth.Challenge(context.Background())
			if err != nil {
				b.Fatal(err)
			}
			if r := f.auth.takeNonce(n); r != nil {
				b.Fatal(r)
			}
		}
		return time.Since(start) / time.Duration(b.N)
	}
	idle, loaded := run(0), run(100_000)
	b.ReportMetric(float64(idle.Nanoseconds())/1000, "idle-us")
	b.ReportMetric(float64(loaded.Nanoseconds())/1000, "100k-outstanding-us")
	b.ReportMetric(float64(loaded)/float64(idle), "ratio")
}

// AKChallenge takes only an EK certificate as the EK: a link identity of
// the same CA (a software key) gets no AK certified.
func TestAKChallengeRefusesIdentity(t *testing.T) {
	f := newFixture(t, true)
	id := issueTestIdentity(t, f.auth, "impostor")
	_, _, err := f.auth.AKChallenge(context.Background(), id.Raw, attest.AttestationParameters{})
	var r *Refusal
	if !errors.As(err, &r) || r.Reason != ReasonUntrustedRoot || !strings.Contains(r.Detail, "EK issuer") {
		t.Fatalf("identity certificate as the EK: %v", err)
	}
	// Even signed by the EK issuer, a certificate of another profile is
	// no EK certificate.
	tmpl := *id
	tmpl.SerialNumber = big.NewInt(77)
	forged, err := f.auth.EKIssuer.Sign(&tmpl, id.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = f.auth.AKChallenge(context.Background(), forged.Raw, attest.AttestationParameters{})
	if !errors.As(err, &r) || !strings.Contains(r.Detail, "not an EK certificate") {
		t.Fatalf("identity-profile certificate from the EK issuer as the EK: %v", err)
	}
}
