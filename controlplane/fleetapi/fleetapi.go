// Package fleetapi serves FleetService and AdminService: the API browsers
// (grpc-web), automation (REST through the gateway) and engineers (gRPC) use.
// Domain errors become gRPC status codes in one place, [toStatus]; internal
// error text never reaches clients.
package fleetapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/commands"
	"github.com/nixplane/nixplane/controlplane/hub"
	cpstatus "github.com/nixplane/nixplane/controlplane/status"
	"github.com/nixplane/nixplane/controlplane/store"
	"github.com/nixplane/nixplane/controlplane/validate"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// Store is what the fleet API reads and writes.
type Store interface {
	store.Hosts
	store.Commands
}

// Deployer merges the pending PR and deploys it; nil when PRs are not
// configured.
type Deployer interface {
	MergeAndDeploy(ctx context.Context, actor string, req *fleetv1.MergeAndDeployRequest) (*fleetv1.BulkCommand, error)
}

// TargetRefresher refetches the fleet target on demand; may be nil.
type TargetRefresher interface {
	Refetch(ctx context.Context)
}

// Fleet implements fleetv1.FleetServiceServer.
type Fleet struct {
	fleetv1.UnimplementedFleetServiceServer
	Hub      *hub.Hub
	Commands *commands.Manager
	Store    Store
	Deployer Deployer
	Target   TargetRefresher
	// Users holds TOTP secrets for destructive commands; may be nil.
	Users store.Users
	// Codes checks one-time codes, each accepted once per user; shared with
	// the login and TOTP enrolment. Nil: no replay protection.
	Codes *auth.OneTimeCodes
	// RefreshWait bounds how long RefreshHost waits for the agent (default 5s).
	RefreshWait time.Duration
	// Resyncs counts watchers that fell behind; may be nil.
	OnResync func()
	// MaxStreamsPerCaller bounds the WatchFleet and FollowCommandLog streams
	// one caller (user or API token) holds open at once, so a runaway
	// script cannot pin the server's memory and goroutines (default 32; a
	// page needs one).
	MaxStreamsPerCaller int
	Log                 *slog.Logger

	mu      sync.Mutex
	waiting map[string][]chan *agentv1.StatusReport // request id → waiters
	seq     uint64
	streams map[string]int // open streams by actor
	codes   codeLimiter
}

// DefaultMaxStreamsPerCaller is MaxStreamsPerCaller's default.
const DefaultMaxStreamsPerCaller = 32

// openStream counts a long-lived stream against its caller; ResourceExhausted
// when the caller holds the maximum already. The returned func releases it.
func (f *Fleet) openStream(ctx context.Context) (func(), error) {
	actor := auth.FromContext(ctx).Actor()
	limit := f.MaxStreamsPerCaller
	if limit <= 0 {
		limit = DefaultMaxStreamsPerCaller
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.streams[actor] >= limit {
		return nil, status.Errorf(codes.ResourceExhausted, "%d streams open for this caller already; close one first", limit)
	}
	if f.streams == nil {
		f.streams = map[string]int{}
	}
	f.streams[actor]++
	return func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.streams[actor]--; f.streams[actor] <= 0 {
			delete(f.streams, actor)
		}
	}, nil
}

func (f *Fleet) logger() *slog.Logger {
	if f.Log != nil {
		return f.Log
	}
	return slog.Default()
}

// toStatus maps domain errors to gRPC status errors; anything unexpected is
// logged and reported as Internal without its text.
func (f *Fleet) toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var be *commands.BlockedError
	switch {
	case errors.As(err, &be):
		st := status.New(codes.FailedPrecondition, be.Message)
		md := map[string]string{}
		if be.RunningCommandID != "" {
			md["running_command_id"] = be.RunningCommandID
		}
		if d, derr := st.WithDetails(&errdetails.ErrorInfo{Reason: be.Reason.String(), Domain: "nixplane", Metadata: md}); derr == nil {
			st = d
		}
		return st.Err()
	case errors.Is(err, commands.ErrNotFound), errors.Is(err, store.ErrNotFound), errors.Is(err, hub.ErrUnknownHost):
		return status.Error(codes.NotFound, "not found")
	case errors.Is(err, store.ErrExists):
		return status.Error(codes.AlreadyExists, "already exists")
	case errors.Is(err, commands.ErrBusy):
		return status.Error(codes.Aborted, err.Error())
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return status.FromContextError(err).Err()
	}
	f.logger().Error("internal error", "err", err)
	return status.Error(codes.Internal, "internal error; see the server log")
}

func hostNotFound(id string) error {
	return status.Errorf(codes.NotFound, "host %q not found", validate.Printable(id, 64))
}

// ListHosts implements FleetService.
func (f *Fleet) ListHosts(ctx context.Context, _ *fleetv1.ListHostsRequest) (*fleetv1.ListHostsResponse, error) {
	return &fleetv1.ListHostsResponse{Hosts: f.Hub.Hosts()}, nil
}

// GetHost implements FleetService.
func (f *Fleet) GetHost(ctx context.Context, req *fleetv1.GetHostRequest) (*fleetv1.GetHostResponse, error) {
	h, ok := f.Hub.Host(req.HostId)
	if !ok {
		return nil, hostNotFound(req.HostId)
	}
	return &fleetv1.GetHostResponse{Host: h}, nil
}

// WatchFleet implements FleetService: snapshot first, then batches of
// events; a watcher that fell behind gets a resync snapshot.
func (f *Fleet) WatchFleet(req *fleetv1.WatchFleetRequest, stream fleetv1.FleetService_WatchFleetServer) error {
	ctx := stream.Context()
	release, err := f.openStream(ctx)
	if err != nil {
		return err
	}
	defer release()
	w, snap := f.Hub.Subscribe(hub.WatchOptions{SkipHeartbeats: req.SkipHeartbeats, SkipOutput: req.SkipOutput})
	defer f.Hub.Unsubscribe(w)
	if err := stream.Send(&fleetv1.WatchFleetResponse{Events: []*fleetv1.FleetEvent{{Kind: &fleetv1.FleetEvent_Snapshot{Snapshot: snap}}}}); err != nil {
		return err
	}
	for {
		batch, err := f.Hub.Next(ctx, w)
		if err != nil {
			return status.FromContextError(err).Err()
		}
		if len(batch) == 1 && batch[0].GetSnapshot() != nil && f.OnResync != nil {
			f.OnResync()
		}
		for len(batch) > 0 {
			n := min(len(batch), 512)
			if err := stream.Send(&fleetv1.WatchFleetResponse{Events: batch[:n]}); err != nil {
				return err
			}
			batch = batch[n:]
		}
	}
}

// Answer delivers a status report to a RefreshHost waiting for it.
func (f *Fleet) Answer(hostID string, st *agentv1.StatusReport) {
	f.mu.Lock()
	defer f.mu.Unlock()
	key := hostID + "/" + st.RequestId
	for _, ch := range f.waiting[key] {
		select {
		case ch <- st:
		default:
		}
	}
	delete(f.waiting, key)
}

// RefreshHost implements FleetService.
func (f *Fleet) RefreshHost(ctx context.Context, req *fleetv1.RefreshHostRequest) (*fleetv1.RefreshHostResponse, error) {
	if _, ok := f.Hub.Host(req.HostId); !ok {
		return nil, hostNotFound(req.HostId)
	}
	if f.Target != nil {
		f.Target.Refetch(ctx)
	}
	refreshed := false
	if conn := f.Hub.Conn(req.HostId); conn != nil {
		f.mu.Lock()
		f.seq++
		reqID := fmt.Sprintf("r%d", f.seq)
		ch := make(chan *agentv1.StatusReport, 1)
		if f.waiting == nil {
			f.waiting = map[string][]chan *agentv1.StatusReport{}
		}
		key := req.HostId + "/" + reqID
		f.waiting[key] = append(f.waiting[key], ch)
		f.mu.Unlock()
		wait := f.RefreshWait
		if wait <= 0 {
			wait = 5 * time.Second
		}
		if err := conn.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Refresh{Refresh: &agentv1.RefreshStatus{RequestId: reqID}}}); err == nil {
			timer := time.NewTimer(wait)
			select {
			case <-ch:
				refreshed = true
			case <-timer.C:
			case <-ctx.Done():
			}
			timer.Stop()
		}
		f.mu.Lock()
		delete(f.waiting, key)
		f.mu.Unlock()
	}
	h, ok := f.Hub.Host(req.HostId)
	if !ok {
		return nil, hostNotFound(req.HostId)
	}
	pr, _ := f.Hub.PendingPR()
	return &fleetv1.RefreshHostResponse{HostId: h.HostId, Online: h.Online, Generation: h.Generation, AgentVersion: h.AgentVersion,
		AgentOutdated: h.AgentOutdated, UpdateStatus: h.UpdateStatus, PendingPr: pr, Refreshed: refreshed, Host: h}, nil
}

// RunCommand implements FleetService.
func (f *Fleet) RunCommand(ctx context.Context, req *fleetv1.RunCommandRequest) (*fleetv1.RunCommandResponse, error) {
	id := auth.FromContext(ctx)
	name := strings.ToLower(strings.TrimSpace(req.Command))
	if destructive(name) && id != nil && id.TOTPEnabled {
		if req.Totp != "" && !f.codes.allow(id.Name) {
			return nil, status.Error(codes.ResourceExhausted, "too many one-time code attempts; wait a minute")
		}
		if !f.validTOTP(ctx, id.Name, req.Totp) {
			return nil, f.toStatus(&commands.BlockedError{Reason: fleetv1.BlockReason_BLOCK_REASON_TOTP_REQUIRED, Message: name + " needs a fresh one-time code"})
		}
	}
	c, err := f.Commands.Run(ctx, id.Actor(), req.HostId, name, req.Force)
	if errors.Is(err, commands.ErrNotFound) {
		return nil, hostNotFound(req.HostId)
	}
	if err != nil {
		return nil, f.toStatus(err)
	}
	return &fleetv1.RunCommandResponse{Command: c}, nil
}

// destructive reports whether a command needs a fresh one-time code from a
// user who has TOTP set up.
func destructive(name string) bool { return name == "reboot" || name == "rollback" }

// validTOTP checks a fresh TOTP code of a user.
func (f *Fleet) validTOTP(ctx context.Context, user, code string) bool {
	if code == "" || f.Users == nil {
		return false
	}
	u, err := f.Users.GetUser(ctx, user)
	return err == nil && u.TOTPSecret != "" && f.Codes.Validate(user, code, u.TOTPSecret)
}

// StopCommand implements FleetService.
func (f *Fleet) StopCommand(ctx context.Context, req *fleetv1.StopCommandRequest) (*fleetv1.StopCommandResponse, error) {
	c, err := f.Commands.Stop(ctx, req.CommandId)
	if err != nil {
		return nil, f.toStatus(err)
	}
	return &fleetv1.StopCommandResponse{Command: c}, nil
}

// GetCommand implements FleetService.
func (f *Fleet) GetCommand(ctx context.Context, req *fleetv1.GetCommandRequest) (*fleetv1.GetCommandResponse, error) {
	c, err := f.Commands.Get(ctx, req.CommandId)
	if err != nil {
		return nil, f.toStatus(err)
	}
	return &fleetv1.GetCommandResponse{Command: c}, nil
}

// ListCommands implements FleetService.
func (f *Fleet) ListCommands(ctx context.Context, req *fleetv1.ListCommandsRequest) (*fleetv1.ListCommandsResponse, error) {
	n := int(req.PageSize)
	if n <= 0 {
		n = 50
	}
	n = min(n, 500)
	if req.HostId != "" {
		if _, ok := f.Hub.Host(req.HostId); !ok {
			return nil, hostNotFound(req.HostId)
		}
	}
	cmds, next, err := f.Store.ListCommands(ctx, req.HostId, n, req.PageToken)
	if errors.Is(err, store.ErrInvalidCursor) {
		return nil, status.Error(codes.InvalidArgument, "bad page token")
	} else if err != nil {
		return nil, f.toStatus(err)
	}
	// Active commands: show their live state.
	for i, c := range cmds {
		if !cpstatus.IsTerminal(c.State) {
			if live, err := f.Commands.Get(ctx, c.CommandId); err == nil {
				cmds[i] = live
			}
		}
	}
	return &fleetv1.ListCommandsResponse{Commands: cmds, NextPageToken: next}, nil
}

// GetCommandLog implements FleetService.
func (f *Fleet) GetCommandLog(ctx context.Context, req *fleetv1.GetCommandLogRequest) (*fleetv1.GetCommandLogResponse, error) {
	c, err := f.Commands.Get(ctx, req.CommandId)
	if err != nil {
		return nil, f.toStatus(err)
	}
	limit := int(req.Limit)
	if limit <= 0 || limit > 10000 {
		limit = 10000
	}
	lines, err := f.Store.ReadLines(ctx, req.CommandId, req.AfterSeq, limit+1)
	if err != nil {
		return nil, f.toStatus(err)
	}
	more := len(lines) > limit
	if more {
		lines = lines[:limit]
	}
	return &fleetv1.GetCommandLogResponse{Command: c, Lines: lines, More: more}, nil
}

// FollowCommandLog implements FleetService.
func (f *Fleet) FollowCommandLog(req *fleetv1.FollowCommandLogRequest, stream fleetv1.FleetService_FollowCommandLogServer) error {
	release, err := f.openStream(stream.Context())
	if err != nil {
		return err
	}
	defer release()
	c, err := f.Commands.Follow(stream.Context(), req.CommandId, req.AfterSeq, func(lines []*typesv1.OutputLine) error {
		return stream.Send(&fleetv1.FollowCommandLogResponse{Lines: lines})
	})
	if err != nil {
		return f.toStatus(err)
	}
	return stream.Send(&fleetv1.FollowCommandLogResponse{Command: c})
}

// AddHost implements FleetService.
func (f *Fleet) AddHost(ctx context.Context, req *fleetv1.AddHostRequest) (*fleetv1.AddHostResponse, error) {
	now := time.Now()
	rec, tok, err := RegisterHost(ctx, f.Store, req, now)
	var invalid *InvalidHostError
	switch {
	case errors.As(err, &invalid):
		return nil, status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, store.ErrExists):
		return nil, status.Errorf(codes.AlreadyExists, "host %q exists already", rec.HostId)
	case err != nil:
		return nil, f.toStatus(err)
	}
	f.Hub.AddHost(rec, now)
	h, _ := f.Hub.Host(rec.HostId)
	return &fleetv1.AddHostResponse{Host: h, AgentToken: tok}, nil
}

// HostCreator is where RegisterHost keeps a new host.
type HostCreator interface {
	CreateHost(ctx context.Context, h store.Host, tokenHash []byte) error
}

// InvalidHostError is RegisterHost's answer to a request that does not
// describe a valid host (its message says why).
type InvalidHostError struct{ Err error }

func (e *InvalidHostError) Error() string { return e.Err.Error() }
func (e *InvalidHostError) Unwrap() error { return e.Err }

// RegisterHost checks req (NewHost), stores the new host created at now with
// the hash of a fresh agent token, and returns the record and the token —
// shown once, never stored. Errors: *InvalidHostError for a bad request
// (nothing stored), store.ErrExists when the host is there already (the
// record is returned all the same, for its name).
func RegisterHost(ctx context.Context, st HostCreator, req *fleetv1.AddHostRequest, now time.Time) (*fleetv1.Host, string, error) {
	rec, tok, err := NewHost(req)
	if err != nil {
		return nil, "", &InvalidHostError{Err: err}
	}
	if err := st.CreateHost(ctx, store.Host{ID: rec.HostId, Record: rec, CreatedAt: now}, auth.HashSecret(tok)); err != nil {
		return rec, "", err
	}
	return rec, tok, nil
}

// NewHost validates an AddHostRequest and returns the host record and a new
// agent token. The CLI's offline `hosts add` uses it too.
func NewHost(req *fleetv1.AddHostRequest) (*fleetv1.Host, string, error) {
	name := strings.TrimSpace(req.Hostname)
	if err := validate.Hostname(name); err != nil {
		return nil, "", err
	}
	if err := validate.ThemeColor(req.ThemeColor); err != nil {
		return nil, "", err
	}
	for _, v := range []string{req.Location, req.DeviceType} {
		if len(v) > 64 {
			return nil, "", errors.New("location and device type are at most 64 characters")
		}
	}
	color := req.ThemeColor
	if color == "" {
		color = "#7aa2f7"
		if req.HostType == typesv1.HostType_HOST_TYPE_DARWIN {
			color = "#bb9af7"
		}
	}
	rec := &fleetv1.Host{HostId: name, Hostname: name, HostType: req.HostType, Location: req.Location, DeviceType: req.DeviceType,
		ThemeColor: color, CreatedAt: timestamppb.Now()}
	return rec, auth.NewSecret(auth.AgentTokenPrefix), nil
}

// RemoveHost implements FleetService.
func (f *Fleet) RemoveHost(ctx context.Context, req *fleetv1.RemoveHostRequest) (*fleetv1.RemoveHostResponse, error) {
	h, ok := f.Hub.Host(req.HostId)
	if !ok {
		return nil, hostNotFound(req.HostId)
	}
	if h.Online && !req.Force {
		return nil, status.Errorf(codes.FailedPrecondition, "host %q is online; stop its agent first or remove with force", req.HostId)
	}
	if err := f.Store.DeleteHost(ctx, req.HostId); err != nil {
		return nil, f.toStatus(err)
	}
	f.Hub.RemoveHost(req.HostId)
	return &fleetv1.RemoveHostResponse{}, nil
}

// RotateHostToken implements FleetService.
func (f *Fleet) RotateHostToken(ctx context.Context, req *fleetv1.RotateHostTokenRequest) (*fleetv1.RotateHostTokenResponse, error) {
	tok := auth.NewSecret(auth.AgentTokenPrefix)
	if err := f.Store.SetHostToken(ctx, req.HostId, auth.HashSecret(tok)); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil, hostNotFound(req.HostId)
		}
		return nil, f.toStatus(err)
	}
	f.Hub.Kick(req.HostId, hub.ErrRemoved)
	return &fleetv1.RotateHostTokenResponse{AgentToken: tok}, nil
}

// RunBulkCommand implements FleetService.
func (f *Fleet) RunBulkCommand(ctx context.Context, req *fleetv1.RunBulkCommandRequest) (*fleetv1.RunBulkCommandResponse, error) {
	ids := req.HostIds
	if req.All {
		ids = nil
		for _, h := range f.Hub.Hosts() {
			ids = append(ids, h.HostId)
		}
	}
	if len(ids) == 0 {
		return nil, status.Error(codes.InvalidArgument, "no hosts: give host_ids or all=true")
	}
	seen := map[string]bool{}
	for _, id := range ids {
		if _, ok := f.Hub.Host(id); !ok {
			return nil, hostNotFound(id)
		}
		if seen[id] {
			return nil, status.Errorf(codes.InvalidArgument, "host %q listed twice", id)
		}
		seen[id] = true
	}
	name := strings.ToLower(strings.TrimSpace(req.Command))
	if name == "merge-and-deploy" {
		return nil, status.Error(codes.InvalidArgument, "use MergeAndDeploy for merge-and-deploy")
	}
	// A bulk run carries no one-time code: whoever needs one for reboot or
	// rollback runs them host by host with it.
	if id := auth.FromContext(ctx); destructive(name) && id != nil && id.TOTPEnabled {
		return nil, f.toStatus(&commands.BlockedError{Reason: fleetv1.BlockReason_BLOCK_REASON_TOTP_REQUIRED,
			Message: name + " needs a fresh one-time code, which a bulk run cannot carry; run it on each host with the code"})
	}
	b, err := f.Commands.RunBulk(ctx, commands.BulkSpec{Actor: auth.FromContext(ctx).Actor(), Command: name, HostIDs: ids,
		Concurrency: int(req.Concurrency), Force: req.Force})
	if err != nil {
		return nil, f.toStatus(err)
	}
	return &fleetv1.RunBulkCommandResponse{Bulk: b}, nil
}

// GetBulkCommand implements FleetService.
func (f *Fleet) GetBulkCommand(ctx context.Context, req *fleetv1.GetBulkCommandRequest) (*fleetv1.GetBulkCommandResponse, error) {
	b, ok := f.Commands.GetBulk(req.BulkId)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "bulk run %q not found", validate.Printable(req.BulkId, 64))
	}
	return &fleetv1.GetBulkCommandResponse{Bulk: b}, nil
}

// GetFleetTarget implements FleetService.
func (f *Fleet) GetFleetTarget(ctx context.Context, _ *fleetv1.GetFleetTargetRequest) (*fleetv1.GetFleetTargetResponse, error) {
	pr, conf := f.Hub.PendingPR()
	prErr, prChecked := f.Hub.PullRequestHealth()
	return &fleetv1.GetFleetTargetResponse{Target: f.Hub.Target(), PendingPr: pr, PullRequestsConfigured: conf,
		PullRequestsError: prErr, PullRequestsCheckedAt: prChecked}, nil
}

// MergeAndDeploy implements FleetService.
func (f *Fleet) MergeAndDeploy(ctx context.Context, req *fleetv1.MergeAndDeployRequest) (*fleetv1.MergeAndDeployResponse, error) {
	if f.Deployer == nil {
		return nil, status.Error(codes.Unimplemented, "pull requests are not configured (start the server with --github-repo and --github-token-file)")
	}
	b, err := f.Deployer.MergeAndDeploy(ctx, auth.FromContext(ctx).Actor(), req)
	if err != nil {
		return nil, f.toStatus(err)
	}
	return &fleetv1.MergeAndDeployResponse{Bulk: b}, nil
}
