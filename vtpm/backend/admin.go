package backend

import (
	"context"
	"errors"
	"io/fs"

	"github.com/google/go-tpm/tpm2/transport"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	backendpb "cvtpm/api/backend"
	"cvtpm/vtpm/tpmrpc"
)

// Enroller certifies a new instance's EKs (see package enroll); the
// backend calls it when an instance is created with enrollment.
type Enroller interface {
	EnrollInstance(ctx context.Context, instance string, tpm transport.TPM) ([]*backendpb.EnrolledEK, error)
}

// AdminServer serves the InstanceManager API for a Supervisor.
type AdminServer struct {
	backendpb.UnimplementedInstanceManagerServer
	Supervisor *Supervisor
	Enroller   Enroller // nil: CreateInstance with enroll fails
}

// TPM is a go-tpm transport (and swtpmproto.TPM) to one instance, through
// the supervisor like any link client, with caps (the administrator's
// enrollment needs only tpmrpc.CapCommand).
func (s *Supervisor) TPM(id string, caps tpmrpc.Capabilities) *tpmrpc.Client {
	return tpmrpc.NewClient(callerFunc(func(ctx context.Context, req []byte) ([]byte, error) {
		return s.Call(ctx, id, caps, req, nil)
	}), tpmrpc.ClientOptions{Timeout: s.cfg.CallTimeout, Logger: s.log})
}

func grpcErr(err error) error {
	switch {
	case errors.Is(err, fs.ErrExist):
		return status.Error(codes.AlreadyExists, err.Error())
	case errors.Is(err, fs.ErrNotExist):
		return status.Error(codes.NotFound, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

func toProto(i InstanceInfo) *backendpb.Instance {
	return &backendpb.Instance{Id: i.ID, State: i.State, Pid: int32(i.PID), Restarts: int32(i.Restarts), CreatedUnix: i.Created.Unix(), Error: i.Error}
}

// CreateInstance implements the API.
func (a *AdminServer) CreateInstance(ctx context.Context, req *backendpb.CreateInstanceRequest) (*backendpb.Instance, error) {
	if req.Enroll && a.Enroller == nil {
		return nil, status.Error(codes.FailedPrecondition, "enrollment asked for, but this backend has no CA configured (--ca)")
	}
	if err := ValidInstanceID(req.Id); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if req.Enroll && req.Incoming {
		return nil, status.Error(codes.InvalidArgument, "an incoming instance has no TPM state to enroll yet; its certificates arrive with its migrated state")
	}
	info, err := a.Supervisor.Create(ctx, req.Id, CreateOptions{Incoming: req.Incoming, ImportDir: req.ImportDir, Binding: req.WorkloadBinding})
	if err != nil {
		return nil, grpcErr(err)
	}
	out := toProto(info)
	if req.Enroll {
		eks, err := a.Enroller.EnrollInstance(ctx, req.Id, a.Supervisor.TPM(req.Id, tpmrpc.CapCommand))
		if err != nil {
			// The instance stays: enrollment can be retried with
			// "cvtpm enroll"-like tooling, and its state is the owner's.
			return nil, status.Errorf(codes.Unavailable, "instance %q created, but enrollment failed: %v", req.Id, err)
		}
		out.Enrolled = eks
	}
	return out, nil
}

// ListInstances implements the API.
func (a *AdminServer) ListInstances(context.Context, *backendpb.ListInstancesRequest) (*backendpb.ListInstancesResponse, error) {
	var out backendpb.ListInstancesResponse
	for _, i := range a.Supervisor.List() {
		out.Instances = append(out.Instances, toProto(i))
	}
	return &out, nil
}

// DeleteInstance implements the API.
func (a *AdminServer) DeleteInstance(ctx context.Context, req *backendpb.DeleteInstanceRequest) (*backendpb.DeleteInstanceResponse, error) {
	if err := a.Supervisor.Delete(ctx, req.Id); err != nil {
		return nil, grpcErr(err)
	}
	return &backendpb.DeleteInstanceResponse{}, nil
}
