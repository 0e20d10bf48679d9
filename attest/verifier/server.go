package verifier

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync/atomic"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	attestpb "cvtpm/api/attest"
	"cvtpm/internal/logfield"
)

// Server exposes a Verifier over gRPC (attestpb.VerifierServer) and
// HTTP/JSON (Handler).
type Server struct {
	attestpb.UnimplementedVerifierServer
	// Verifier appraises; Replace swaps in another (a reload) while
	// calls run.
	Verifier *Verifier
	Log      *slog.Logger

	replaced   atomic.Pointer[Verifier]
	verdictLog logfield.Limiter
}

// Replace makes v the verifier of every call from now on (SIGHUP: new
// policies or reference values). Give v the same Nonces as the one it
// replaces, so challenges already handed out stay valid.
func (s *Server) Replace(v *Verifier) { s.replaced.Store(v) }

func (s *Server) current() *Verifier {
	if v := s.replaced.Load(); v != nil {
		return v
	}
	return s.Verifier
}

// Challenge implements the gRPC API.
func (s *Server) Challenge(ctx context.Context, _ *attestpb.ChallengeRequest) (*attestpb.ChallengeResponse, error) {
	n, exp, err := s.current().Challenge(ctx)
	if errors.Is(err, ErrBusy) {
		return nil, status.Error(codes.ResourceExhausted, err.Error())
	}
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &attestpb.ChallengeResponse{Nonce: n, ExpiresUnix: exp.Unix()}, nil
}

// Attest implements the gRPC API.
func (s *Server) Attest(ctx context.Context, req *attestpb.AttestRequest) (*attestpb.AttestResponse, error) {
	if req.GetEvidence() == nil {
		return nil, status.Error(codes.InvalidArgument, "no evidence")
	}
	res, err := s.current().Verify(ctx, req.GetNonce(), req.GetEvidence())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	s.log(ctx, res)
	return &attestpb.AttestResponse{Ear: res.Token}, nil
}

// log writes a verdict's line, within a rate per client address (every
// verdict is counted in the metrics): a client that attests in a loop,
// however bogus its evidence, must not fill the log.
func (s *Server) log(ctx context.Context, res *Result) {
	if s.Log == nil {
		return
	}
	ok, held := s.verdictLog.Allow(sourceOf(ctx))
	if !ok {
		return
	}
	args := []any{"verdicts_not_logged_before", held}
	for name, sm := range res.Submods {
		args = append(args, name, fmt.Sprintf("%s %v", sm.Status, sm.Reasons))
	}
	s.Log.Info("attestation appraised", args...)
}

// Handler serves the HTTP/JSON API:
//
//	POST /challenge  -> {"nonce": base64, "expiresUnix": ...}
//	POST /attest     <- {"nonce": base64, "evidence": {...}} (protojson of AttestRequest)
//	                 -> {"ear": "<JWS>"}
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /challenge", func(w http.ResponseWriter, r *http.Request) {
		// The caller's address counts its outstanding challenges.
		resp, err := s.Challenge(withPeer(r), &attestpb.ChallengeRequest{})
		writeProto(w, resp, err)
	})
	mux.HandleFunc("POST /attest", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxHTTPRequest))
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			http.Error(w, fmt.Sprintf("attestation request larger than %d bytes", MaxHTTPRequest), http.StatusRequestEntityTooLarge)
			return
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		var req attestpb.AttestRequest
		if err := protojson.Unmarshal(body, &req); err != nil {
			http.Error(w, "malformed attestation request: "+err.Error(), http.StatusBadRequest)
			return
		}
		resp, err := s.Attest(withPeer(r), &req)
		writeProto(w, resp, err)
	})
	return mux
}

// MaxHTTPRequest bounds a POST /attest body (JSON: the evidence in
// base64; gRPC takes 4 MiB of binary).
const MaxHTTPRequest = 6 << 20

// withPeer is r's context with the caller's address as a gRPC peer, so
// that per-source bounds apply to HTTP callers too.
func withPeer(r *http.Request) context.Context {
	ctx := r.Context()
	if addr, err := net.ResolveTCPAddr("tcp", r.RemoteAddr); err == nil {
		ctx = peer.NewContext(ctx, &peer.Peer{Addr: addr})
	}
	return ctx
}

func writeProto(w http.ResponseWriter, m proto.Message, err error) {
	if err != nil {
		code := http.StatusInternalServerError
		if status.Code(err) == codes.InvalidArgument {
			code = http.StatusBadRequest
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(map[string]string{"error": status.Convert(err).Message()})
		return
	}
	b, err := protojson.Marshal(m)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(b)
}
