package verifier

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	attestpb "cvtpm/api/attest"
	"cvtpm/attest/csv"
	"cvtpm/attest/ear"
)

func newTestVerifier(t testing.TB, reference map[string]any) (*Verifier, *ecdsa.PrivateKey) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test EK CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	tmpl.Subject.CommonName = "test AK CA"
	akDER, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	v, err := New(context.Background(), Options{EKRoots: [][]byte{der}, AKRoots: [][]byte{akDER}, CSV: &csv.AppraisalPolicy{}, Signer: key, Reference: reference})
	if err != nil {
		t.Fatal(err)
	}
	return v, key
}

// The default policy: each missing fact shows as its reason, in the right
// submodule; simulated CSV evidence is a warning, not a pass.
func TestDefaultPolicy(t *testing.T) {
	v, _ := newTestVerifier(t, map[string]any{"pcrs": map[string]any{"sha256": map[string]any{"16": "AB"}}})
	good := func() *Facts {
		f := &Facts{}
		f.Nonce.OK = true
		f.TPM.EKTrusted, f.TPM.AKBound, f.TPM.QuoteOK = true, true, true
		f.TPM.PCRs = map[string]string{"16": "ab"}
		f.CSV.ReportOK, f.CSV.MatchesEKClaims = true, true
		return f
	}
	for _, tc := range []struct {
		name      string
		edit      func(*Facts)
		vtpm, plt string
		reason    string
	}{
		{"all good", func(*Facts) {}, StatusAffirming, StatusAffirming, ""},
		{"simulated", func(f *Facts) { f.CSV.Simulated = true }, StatusAffirming, StatusWarning, "simulated-csv-evidence"},
		{"nonce", func(f *Facts) { f.Nonce.OK, f.Nonce.Reason = false, "nonce-expired" }, StatusContraindicated, StatusContraindicated, "nonce-expired"},
		{"revoked", func(f *Facts) { f.TPM.EKRevoked = true }, StatusContraindicated, StatusAffirming, "ek-certificate-revoked"},
		{"ak", func(f *Facts) { f.TPM.AKBound, f.TPM.AKReason = false, "ak-not-bound-to-ek" }, StatusContraindicated, StatusAffirming, "ak-not-bound-to-ek"},
		{"pcr reference", func(f *Facts) { f.TPM.PCRs["16"] = "cd" }, StatusContraindicated, StatusAffirming, "pcr-16-not-reference"},
		{"pcr missing", func(f *Facts) { delete(f.TPM.PCRs, "16") }, StatusContraindicated, StatusAffirming, "pcr-16-not-reference"},
		{"other backend", func(f *Facts) { f.CSV.MatchesEKClaims = false }, StatusAffirming, StatusContraindicated, "csv-report-from-another-backend"},
		{"no EK claims", func(f *Facts) {
			f.CSV.MatchesEKClaims, f.CSV.EKClaimsReason = false, "ek-certificate-without-csv-claims"
		},
			StatusAffirming, StatusContraindicated, "ek-certificate-without-csv-claims"},
		{"csv", func(f *Facts) { f.CSV.ReportOK, f.CSV.Reason = false, csv.ReasonDebug }, StatusAffirming, StatusContraindicated, csv.ReasonDebug},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := good()
			tc.edit(f)
			got, err := v.policy.eval(context.Background(), f)
			if err != nil {
				t.Fatal(err)
			}
			if got["cvtpm-vtpm"].Status != tc.vtpm || got["csv-platform"].Status != tc.plt {
				t.Fatalf("got %+v, want vtpm %s platform %s", got, tc.vtpm, tc.plt)
			}
			if tc.reason != "" && !slices.Contains(append(got["cvtpm-vtpm"].Reasons, got["csv-platform"].Reasons...), tc.reason) {
				t.Fatalf("reasons %+v lack %q", got, tc.reason)
			}
		})
	}
}

func TestPolicyErrors(t *testing.T) {
	if _, err := compilePolicy(context.Background(), "package cvtpm\nresult := {", nil); err == nil {
		t.Fatal("a broken policy compiled")
	}
	p, err := compilePolicy(context.Background(), `package cvtpm
result := {"x": {"status": "great", "reasons": []}}`, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.eval(context.Background(), &Facts{}); err == nil || !strings.Contains(err.Error(), `status "great"`) {
		t.Fatalf("unknown status accepted: %v", err)
	}
}

func TestToken(t *testing.T) {
	v, key := newTestVerifier(t, nil)
	n, _, _ := v.Challenge(context.Background())
	res, err := v.Verify(context.Background(), n, &attestpb.Evidence{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Affirming() || res.Submods["cvtpm-vtpm"].Status != StatusContraindicated {
		t.Fatalf("empty evidence: %+v", res.Submods)
	}
	tok, err := ear.Parse(res.Token, &key.PublicKey)
	if err != nil || tok.Submods["cvtpm-vtpm"].Status != StatusContraindicated || !slices.Contains(tok.Submods["cvtpm-vtpm"].Reasons, "ek-certificate-missing") {
		t.Fatalf("token: %+v %v", tok, err)
	}
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if _, err := ear.Parse(res.Token, &other.PublicKey); err == nil {
		t.Fatal("token verified with another key")
	}
	parts := strings.Split(res.Token, ".")
	parts[1] = parts[1][:len(parts[1])-2] + "AA"
	if _, err := ear.Parse(strings.Join(parts, "."), &key.PublicKey); err == nil {
		t.Fatal("altered token verified")
	}
	// The nonce was used: the same evidence again is refused for it.
	res, _ = v.Verify(context.Background(), n, &attestpb.Evidence{})
	if !slices.Contains(res.Submods["csv-platform"].Reasons, "nonce-unknown-or-used") {
		t.Fatalf("reused nonce: %+v", res.Submods)
	}
}

// Arbitrary evidence bytes never crash the verifier nor earn a pass.
func FuzzVerify(f *testing.F) {
	v, _ := newTestVerifier(f, nil)
	seed, _ := proto.Marshal(&attestpb.Evidence{InstanceId: "vm1", EkChain: [][]byte{{0x30, 0x03, 0x02, 0x01, 0x01}}, TpmAttestation: []byte{0x0a, 0x01, 0x00}})
	f.Add(seed)
	f.Fuzz(func(t *testing.T, b []byte) {
		ev := &attestpb.Evidence{}
		if proto.Unmarshal(b, ev) != nil {
			return
		}
		n, _, _ := v.Challenge(context.Background())
		res, err := v.Verify(context.Background(), n, ev)
		if err != nil {
			t.Fatal(err)
		}
		if res.Affirming() {
			t.Fatal("garbage evidence affirmed")
		}
	})
}

// The HTTP/JSON API: a challenge, then evidence as protojson, answered with
// an EAR token; malformed bodies are refused with a reason.
func TestHTTPAPI(t *testing.T) {
	v, key := newTestVerifier(t, nil)
	srv := httptest.NewServer((&Server{Verifier: v}).Handler())
	defer srv.Close()
	resp, err := http.Post(srv.URL+"/challenge", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	var ch attestpb.ChallengeResponse
	body, _ := io.ReadAll(resp.Body)
	if err := protojson.Unmarshal(body, &ch); err != nil || len(ch.Nonce) != 32 {
		t.Fatalf("challenge %s: %v", body, err)
	}
	req, _ := protojson.Marshal(&attestpb.AttestRequest{Nonce: ch.Nonce, Evidence: &attestpb.Evidence{InstanceId: "vm1"}})
	resp, err = http.Post(srv.URL+"/attest", "application/json", bytes.NewReader(req))
	if err != nil {
		t.Fatal(err)
	}
	var ar attestpb.AttestResponse
	body, _ = io.ReadAll(resp.Body)
	if err := protojson.Unmarshal(body, &ar); err != nil {
		t.Fatalf("attest %s: %v", body, err)
	}
	if tok, err := ear.Parse(ar.Ear, &key.PublicKey); err != nil || tok.Submods["csv-platform"].Status != StatusContraindicated {
		t.Fatalf("token %+v %v", tok, err)
	}
	resp, _ = http.Post(srv.URL+"/attest", "application/json", strings.NewReader("{not json"))
	body, _ = io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "malformed attestation request") {
		t.Fatalf("malformed body: %d %s", resp.StatusCode, body)
	}
	resp, _ = http.Post(srv.URL+"/attest", "application/json", strings.NewReader(`{"nonce": "AAAA"}`))
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("no evidence: %d", resp.StatusCode)
	}
}

// crlFunc is a CRLSource from a function.
type crlFunc func() (*x509.RevocationList, error)

func (f crlFunc) CRL(context.Context) (*x509.RevocationList, error) { return f() }

func makeCRL(t *testing.T, issuer *x509.Certificate, key *ecdsa.PrivateKey, next time.Time, serials ...int64) *x509.RevocationList {
	t.Helper()
	tmpl := &x509.RevocationList{Number: big.NewInt(1), ThisUpdate: time.Now().Add(-time.Hour), NextUpdate: next}
	for _, s := range serials {
		tmpl.RevokedCertificateEntries = append(tmpl.RevokedCertificateEntries,
			x509.RevocationListEntry{SerialNumber: big.NewInt(s), RevocationTime: time.Now()})
	}
	der, err := x509.CreateRevocationList(rand.Reader, tmpl, issuer, key)
	if err != nil {
		t.Fatal(err)
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		t.Fatal(err)
	}
	return crl
}

// The CRL check: a listed serial is revoked; a CRL past its NextUpdate or
// from another issuer makes the check fail rather than pass.
func TestRevoked(t *testing.T) {
	v, key := newTestVerifier(t, nil)
	root, _ := x509.ParseCertificate(v.opts.EKRoots[0])
	akRoot, _ := x509.ParseCertificate(v.opts.AKRoots[0])
	otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	later, earlier := time.Now().Add(time.Hour), time.Now().Add(-time.Minute)
	ekDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(7), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)},
		root, &otherKey.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ek, _ := x509.ParseCertificate(ekDER)
	for _, tc := range []struct {
		name    string
		crl     *x509.RevocationList
		revoked bool
		err     string
	}{
		{"not listed", makeCRL(t, root, key, later, 1, 2), false, ""},
		{"listed", makeCRL(t, root, key, later, 1, 7), true, ""},
		{"expired", makeCRL(t, root, key, earlier, 7), false, "expired"},
		{"forged under the issuer's name", makeCRL(t, root, otherKey, later), false, "not signed by the root that issued"},
		// The AK issuer's CRL says nothing about EK certificates.
		{"only another issuer's CRL", makeCRL(t, akRoot, key, later, 7), false, "no CRL of the issuer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v.opts.CRLs = []CRLSource{crlFunc(func() (*x509.RevocationList, error) { return tc.crl, nil })}
			revoked, err := v.revoked(context.Background(), ek)
			if revoked != tc.revoked || (err == nil) != (tc.err == "") || err != nil && !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("revoked, err = %v, %v; want %v, %q", revoked, err, tc.revoked, tc.err)
			}
		})
	}
}

// CachedCRL fetches again after MaxAge or once the CRL's NextUpdate has
// passed, and not in between.
func TestCachedCRL(t *testing.T) {
	v, key := newTestVerifier(t, nil)
	root, _ := x509.ParseCertificate(v.opts.EKRoots[0])
	fetches := 0
	next := time.Now().Add(time.Hour)
	c := &CachedCRL{MaxAge: 50 * time.Millisecond, Source: crlFunc(func() (*x509.RevocationList, error) {
		fetches++
		return makeCRL(t, root, key, next), nil
	})}
	get := func(want int) {
		t.Helper()
		if _, err := c.CRL(context.Background()); err != nil || fetches != want {
			t.Fatalf("err %v, %d fetches, want %d", err, fetches, want)
		}
	}
	get(1)
	get(1)
	time.Sleep(60 * time.Millisecond)
	get(2)
	next = time.Now().Add(-time.Second) // the next CRL is already stale
	time.Sleep(60 * time.Millisecond)
	get(3)
	get(4)
}
