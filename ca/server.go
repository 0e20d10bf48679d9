package ca

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"log/slog"
	"net/http"
	"time"

	"github.com/google/go-attestation/attest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	capb "cvtpm/api/ca"
	"cvtpm/enroll"
	"cvtpm/internal/logfield"
)

// Server exposes an Authority over gRPC (api/ca) and its roots and CRL
// over HTTP.
type Server struct {
	capb.UnimplementedCAServer
	Authority *Authority
	Log       *slog.Logger
	// Admin allows Revoke. Serve the admin server only on a protected
	// listener (cvtpm ca puts it on a 0600 unix socket): revocation must
	// not be open to whoever can reach the enrollment port.
	Admin bool

	refusals logfield.Limiter // refusal log lines per client address
}

// Register adds the CA service to a gRPC server.
func (s *Server) Register(g *grpc.Server) { capb.RegisterCAServer(g, s) }

func (s *Server) Challenge(ctx context.Context, _ *capb.ChallengeRequest) (*capb.ChallengeResponse, error) {
	n, err := s.Authority.Challenge(ctx)
	if err != nil {
		return nil, s.refusal(err)
	}
	return &capb.ChallengeResponse{Nonce: n}, nil
}

func (s *Server) Enroll(ctx context.Context, req *capb.EnrollRequest) (*capb.EnrollResponse, error) {
	cert, err := s.Authority.Enroll(ctx, enroll.Request{
		InstanceID: req.GetInstanceId(), EKPublicArea: req.GetEkPublicArea(),
		Nonce: req.GetNonce(), Report: req.GetCsvReport(),
	})
	var r *Refusal
	switch {
	case errors.As(err, &r):
		// Every refusal is in the audit log; the service log gets a
		// bounded, rate-limited line.
		if ok, held := s.refusals.Allow(sourceOf(ctx)); ok {
			s.Log.Info("enrollment refused", "instance", logfield.Clip(req.GetInstanceId()), "reason", r.Reason,
				"detail", logfield.Clip(r.Detail), "from", sourceOf(ctx), "similar_lines_suppressed", held)
		}
		return nil, status.Error(codes.PermissionDenied, logfield.Clip(r.Error()))
	case err != nil:
		s.Log.Error("enrollment failed", "instance", logfield.Clip(req.GetInstanceId()), "err", err)
		return nil, status.Error(codes.Internal, err.Error())
	}
	s.Log.Info("EK certificate issued", "instance", req.GetInstanceId(), "serial", cert.SerialNumber.Text(16))
	return &capb.EnrollResponse{Certificate: cert.Raw}, nil
}

func (s *Server) Roots(_ context.Context, req *capb.RootsRequest) (*capb.RootsResponse, error) {
	p, err := ParsePurpose(req.GetPurpose())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	der, err := s.Authority.Root(p)
	if err != nil {
		return nil, status.Error(codes.NotFound, err.Error())
	}
	return &capb.RootsResponse{Certificates: [][]byte{der}}, nil
}

func (s *Server) Revoke(ctx context.Context, req *capb.RevokeRequest) (*capb.RevokeResponse, error) {
	if !s.Admin {
		return nil, status.Error(codes.PermissionDenied, "revocation is only served on the CA's admin socket")
	}
	if err := s.Authority.Revoke(ctx, req.GetSerial(), int(req.GetReason())); err != nil {
		if errors.Is(err, ErrUnknownSerial) {
			return nil, status.Error(codes.NotFound, err.Error())
		}
		if errors.Is(err, ErrBadReason) {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		return nil, status.Error(codes.Internal, err.Error())
	}
	s.Log.Info("certificate revoked", "serial", req.GetSerial(), "reason", req.GetReason())
	return &capb.RevokeResponse{}, nil
}

func (s *Server) AKChallenge(ctx context.Context, req *capb.AKChallengeRequest) (*capb.AKChallengeResponse, error) {
	p := req.GetAk()
	id, ec, err := s.Authority.AKChallenge(ctx, req.GetEkCertificate(), attest.AttestationParameters{
		Public: p.GetPublic(), CreateData: p.GetCreateData(), CreateAttestation: p.GetCreateAttestation(), CreateSignature: p.GetCreateSignature(),
	})
	if err != nil {
		return nil, s.refusal(err)
	}
	return &capb.AKChallengeResponse{ChallengeId: id, Credential: ec.Credential, Secret: ec.Secret}, nil
}

func (s *Server) AKCertify(ctx context.Context, req *capb.AKCertifyRequest) (*capb.AKCertifyResponse, error) {
	cert, err := s.Authority.AKCertify(ctx, req.GetChallengeId(), req.GetActivatedSecret())
	if err != nil {
		return nil, s.refusal(err)
	}
	s.Log.Info("AK certificate issued", "serial", cert.SerialNumber.Text(16))
	return &capb.AKCertifyResponse{Certificate: cert.Raw}, nil
}

// refusal maps an Authority error to a gRPC status that names the reason.
func (s *Server) refusal(err error) error {
	var r *Refusal
	if errors.As(err, &r) {
		return status.Error(codes.PermissionDenied, r.Error())
	}
	if errors.Is(err, ErrBusy) {
		return status.Error(codes.ResourceExhausted, err.Error())
	}
	s.Log.Error("CA request failed", "err", err)
	return status.Error(codes.Internal, err.Error())
}

// HTTPHandler serves each purpose's root and CRL: /roots.pem and /crl are
// the EK issuer's (what EK certificates chain to), /roots/{ak,identity}
// and /crl/{ak,identity} the others'. CRLs are DER, PEM with ?format=pem.
func (s *Server) HTTPHandler() http.Handler {
	mux := http.NewServeMux()
	root := func(w http.ResponseWriter, p string) {
		pp, err := ParsePurpose(p)
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		der, err := s.Authority.Root(pp)
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		w.Header().Set("Content-Type", "application/x-pem-file")
		pem.Encode(w, &pem.Block{Type: "CERTIFICATE", Bytes: der})
	}
	mux.HandleFunc("GET /roots.pem", func(w http.ResponseWriter, _ *http.Request) { root(w, "ek") })
	mux.HandleFunc("GET /roots/{purpose}", func(w http.ResponseWriter, r *http.Request) { root(w, r.PathValue("purpose")) })
	crl := func(w http.ResponseWriter, r *http.Request, p string) {
		a := s.Authority
		pp, err := ParsePurpose(p)
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		if a.Store == nil {
			http.Error(w, "this CA keeps no certificate store", http.StatusNotFound)
			return
		}
		der, err := a.CRL(r.Context(), pp, 24*time.Hour)
		if errors.Is(err, ErrNoIssuer) {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		if err != nil {
			s.Log.Error("making the CRL failed", "purpose", pp, "err", err)
			http.Error(w, "CRL unavailable", http.StatusInternalServerError)
			return
		}
		if r.URL.Query().Get("format") == "pem" {
			pem.Encode(w, &pem.Block{Type: "X509 CRL", Bytes: der})
			return
		}
		w.Header().Set("Content-Type", "application/pkix-crl")
		w.Write(der)
	}
	mux.HandleFunc("GET /crl", func(w http.ResponseWriter, r *http.Request) { crl(w, r, "ek") })
	mux.HandleFunc("GET /crl/{purpose}", func(w http.ResponseWriter, r *http.Request) { crl(w, r, r.PathValue("purpose")) })
	return mux
}

// Client is the enrollment protocol's CA over gRPC.
type Client struct{ C capb.CAClient }

var _ enroll.CA = Client{}

// Roots returns the EK root: what EK certificates chain to.
func (c Client) Roots(ctx context.Context) ([][]byte, error) {
	return c.RootsOf(ctx, PurposeEK)
}

// RootsOf returns the root of purpose p.
func (c Client) RootsOf(ctx context.Context, p Purpose) ([][]byte, error) {
	r, err := c.C.Roots(ctx, &capb.RootsRequest{Purpose: string(p)})
	if err != nil {
		return nil, err
	}
	return r.GetCertificates(), nil
}

func (c Client) Challenge(ctx context.Context) ([]byte, error) {
	r, err := c.C.Challenge(ctx, &capb.ChallengeRequest{})
	if err != nil {
		return nil, err
	}
	return r.GetNonce(), nil
}

func (c Client) Enroll(ctx context.Context, req enroll.Request) (*x509.Certificate, error) {
	r, err := c.C.Enroll(ctx, &capb.EnrollRequest{
		InstanceId: req.InstanceID, EkPublicArea: req.EKPublicArea, Nonce: req.Nonce, CsvReport: req.Report,
	})
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(r.GetCertificate())
}

// AKChallenge asks the CA for a credential that only the TPM holding both
// the certified EK and the AK can activate.
func (c Client) AKChallenge(ctx context.Context, ekCertDER []byte, ak attest.AttestationParameters) (string, *attest.EncryptedCredential, error) {
	r, err := c.C.AKChallenge(ctx, &capb.AKChallengeRequest{EkCertificate: ekCertDER, Ak: &capb.AKParameters{
		Public: ak.Public, CreateData: ak.CreateData, CreateAttestation: ak.CreateAttestation, CreateSignature: ak.CreateSignature}})
	if err != nil {
		return "", nil, err
	}
	return r.GetChallengeId(), &attest.EncryptedCredential{Credential: r.GetCredential(), Secret: r.GetSecret()}, nil
}

// AKCertify returns the AK certificate for the activated secret.
func (c Client) AKCertify(ctx context.Context, id string, secret []byte) (*x509.Certificate, error) {
	r, err := c.C.AKCertify(ctx, &capb.AKCertifyRequest{ChallengeId: id, ActivatedSecret: secret})
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(r.GetCertificate())
}

// IssueIdentity certifies a CSR (admin socket only).
func (s *Server) IssueIdentity(ctx context.Context, req *capb.IssueIdentityRequest) (*capb.IssueIdentityResponse, error) {
	if !s.Admin {
		return nil, status.Error(codes.PermissionDenied, "identities are only issued on the CA's admin socket")
	}
	csr, err := x509.ParseCertificateRequest(req.GetCsr())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, "CSR: "+err.Error())
	}
	cert, err := s.Authority.IssueIdentity(ctx, csr, time.Duration(req.GetValiditySeconds())*time.Second)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	s.Log.Info("identity certificate issued", "name", cert.Subject.CommonName, "serial", cert.SerialNumber.Text(16))
	return &capb.IssueIdentityResponse{Certificate: cert.Raw}, nil
}

// CRL serves the current revocation list of the requested purpose.
func (s *Server) CRL(ctx context.Context, req *capb.CRLRequest) (*capb.CRLResponse, error) {
	p, err := ParsePurpose(req.GetPurpose())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	der, err := s.Authority.CRL(ctx, p, 24*time.Hour)
	if errors.Is(err, ErrNoIssuer) {
		return nil, status.Error(codes.NotFound, err.Error())
	}
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &capb.CRLResponse{Crl: der}, nil
}

// CRL fetches the EK issuer's current revocation list (DER).
func (c Client) CRL(ctx context.Context) ([]byte, error) {
	return c.CRLOf(PurposeEK).CRL(ctx)
}

// CRLOf is the revocation list of purpose p's issuer, fetched over gRPC.
func (c Client) CRLOf(p Purpose) CRLClient { return CRLClient{C: c.C, Purpose: p} }

// CRLClient fetches one issuer's revocation list.
type CRLClient struct {
	C       capb.CAClient
	Purpose Purpose
}

// CRL fetches the list (DER).
func (c CRLClient) CRL(ctx context.Context) ([]byte, error) {
	r, err := c.C.CRL(ctx, &capb.CRLRequest{Purpose: string(c.Purpose)})
	if err != nil {
		return nil, err
	}
	return r.GetCrl(), nil
}
