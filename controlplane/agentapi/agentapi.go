// Package agentapi serves AgentService: one bidirectional stream per agent.
// It checks the hello against the token's host, registers the session with
// the hub, and routes what the agent sends — heartbeats to the hub, output,
// results and status reports to the command manager — in the order sent.
package agentapi

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/commands"
	"github.com/nixplane/nixplane/controlplane/hub"
	"github.com/nixplane/nixplane/controlplane/store"
	"github.com/nixplane/nixplane/controlplane/validate"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Refresher receives status reports that answer a RefreshStatus.
type Refresher interface {
	Answer(hostID string, st *agentv1.StatusReport)
}

// Metrics counts agent traffic; may be nil.
type Metrics interface {
	Heartbeat()
	Connected(delta int)
}

// Server implements agentv1.AgentServiceServer.
type Server struct {
	agentv1.UnimplementedAgentServiceServer
	Hub           *hub.Hub
	Commands      *commands.Manager
	Hosts         store.Hosts
	Refresh       Refresher
	ServerVersion string
	// HelloTimeout bounds the wait for the first message (default 10s).
	HelloTimeout time.Duration
	// ShutdownRetryMax bounds the retry delay suggested to agents when the
	// server stops (default 10s): each is told a random delay between one
	// second and this, so a large fleet does not reconnect in one burst.
	ShutdownRetryMax time.Duration
	Metrics          Metrics
	Log              *slog.Logger
}

type streamSender struct {
	mu sync.Mutex
	s  agentv1.AgentService_ConnectServer
}

func (s *streamSender) Send(m *agentv1.ConnectResponse) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.s.Send(m)
}

// Connect serves one agent session.
func (s *Server) Connect(stream agentv1.AgentService_ConnectServer) error {
	id := auth.FromContext(stream.Context())
	if id == nil || id.Kind != auth.KindAgent {
		return status.Error(codes.PermissionDenied, "only agents may connect")
	}
	ctx, cancel := context.WithCancelCause(stream.Context())
	defer cancel(nil)

	hello, err := s.recvHello(ctx, stream)
	if err != nil {
		return err
	}
	if hello.Hostname != id.Name {
		return status.Errorf(codes.PermissionDenied, "this token belongs to host %q, not %q", id.Name, validate.Printable(hello.Hostname, 64))
	}
	if err := validate.Hello(hello); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	sender := &streamSender{s: stream}
	conn, rec, err := s.Hub.Connect(id.Name, hello, sender, cancel)
	if errors.Is(err, hub.ErrUnknownHost) {
		// Registered offline (nixplane hosts add --data-dir) while the
		// server ran: the token matched, so the host is in the store.
		if h, gerr := s.Hosts.GetHost(ctx, id.Name); gerr == nil {
			s.Hub.AddHost(h.Record, h.CreatedAt)
			conn, rec, err = s.Hub.Connect(id.Name, hello, sender, cancel)
		}
	}
	if errors.Is(err, hub.ErrUnknownHost) {
		return status.Error(codes.PermissionDenied, "host was removed")
	} else if errors.Is(err, hub.ErrShutdown) {
		return s.shutdownStatus()
	} else if err != nil {
		return status.Error(codes.Internal, "register session")
	}
	log := s.logger().With("host", id.Name)
	log.Info("agent connected", "version", hello.AgentVersion, "generation", hello.Generation)
	if s.Metrics != nil {
		s.Metrics.Connected(1)
		defer s.Metrics.Connected(-1)
	}
	reason := "stream closed"
	defer func() { s.Hub.Disconnect(conn, reason); s.Commands.HandleDisconnect(id.Name) }()
	if conn.RecordChanged() {
		if err := s.Hosts.UpdateHostRecord(ctx, id.Name, commands.Durable(rec)); err != nil {
			log.Warn("store host after hello", "err", err)
		}
	}
	if err := sender.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Welcome{Welcome: &agentv1.Welcome{
		HostId: id.Name, ServerVersion: s.ServerVersion, HeartbeatInterval: durationpb.New(0)}}}); err != nil {
		return err
	}
	s.Commands.HandleHello(ctx, id.Name, hello)

	// The receive loop handles messages itself, in order; this goroutine only
	// waits for the session to end one way or the other.
	recvErr := make(chan error, 1)
	go func() {
		for {
			m, err := stream.Recv()
			if err == nil && ctx.Err() == nil {
				err = s.handle(ctx, conn, m)
			}
			if err != nil {
				recvErr <- err
				return
			}
		}
	}()
	for {
		select {
		case <-ctx.Done():
			cause := context.Cause(ctx)
			switch {
			case errors.Is(cause, hub.ErrReplaced):
				reason = "replaced"
				return status.Error(codes.Aborted, "replaced by a newer connection for this host")
			case errors.Is(cause, hub.ErrHeartbeatTimeout):
				reason = "heartbeat timeout"
				return status.Error(codes.DeadlineExceeded, "no heartbeat within three intervals")
			case errors.Is(cause, hub.ErrRemoved):
				reason = "token revoked"
				return status.Error(codes.PermissionDenied, "host removed or token revoked")
			case errors.Is(cause, hub.ErrShutdown):
				reason = "server shutting down"
				return s.shutdownStatus()
			}
			return status.FromContextError(ctx.Err()).Err()
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				log.Info("agent closed its stream")
				return nil
			}
			if _, ok := status.FromError(err); ok && status.Code(err) == codes.InvalidArgument {
				log.Warn("agent sent a bad message", "err", err)
			} else {
				log.Info("agent stream ended", "err", err)
			}
			return err
		}
	}
}

// shutdownStatus is the answer while the server stops: Unavailable with a
// google.rpc.RetryInfo suggesting a random delay, which spreads the
// reconnects of a large fleet over the next seconds.
func (s *Server) shutdownStatus() error {
	most := s.ShutdownRetryMax
	if most <= 0 {
		most = 10 * time.Second
	}
	delay := time.Second
	if most > delay {
		delay += rand.N(most - delay)
	}
	st := status.New(codes.Unavailable, "server shutting down")
	if d, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(delay)}); err == nil {
		st = d
	}
	return st.Err()
}

func (s *Server) recvHello(ctx context.Context, stream agentv1.AgentService_ConnectServer) (*agentv1.Hello, error) {
	wait := s.HelloTimeout
	if wait <= 0 {
		wait = 10 * time.Second
	}
	type res struct {
		m   *agentv1.ConnectRequest
		err error
	}
	ch := make(chan res, 1)
	go func() { m, err := stream.Recv(); ch <- res{m, err} }()
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, r.err
		}
		h := r.m.GetHello()
		if h == nil {
			return nil, status.Error(codes.InvalidArgument, "the first message must be a hello")
		}
		return h, nil
	case <-timer.C:
		return nil, status.Error(codes.DeadlineExceeded, "no hello received")
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (s *Server) handle(ctx context.Context, conn *hub.Conn, m *agentv1.ConnectRequest) error {
	if err := validate.AgentMessage(m); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	host := conn.HostID
	switch x := m.Msg.(type) {
	case *agentv1.ConnectRequest_Heartbeat:
		if s.Metrics != nil {
			s.Metrics.Heartbeat()
		}
		if rec := s.Hub.Heartbeat(conn, x.Heartbeat); rec != nil {
			if err := s.Hosts.UpdateHostRecord(ctx, host, commands.Durable(rec)); err != nil {
				s.logger().Warn("store host", "host", host, "err", err)
			}
		}
	case *agentv1.ConnectRequest_Output:
		s.Commands.HandleOutput(ctx, host, x.Output)
	case *agentv1.ConnectRequest_Result:
		s.Commands.HandleResult(ctx, host, x.Result)
	case *agentv1.ConnectRequest_Progress:
		s.Commands.HandleProgress(ctx, host, x.Progress)
	case *agentv1.ConnectRequest_Rejected:
		s.Commands.HandleRejected(ctx, host, x.Rejected)
	case *agentv1.ConnectRequest_Status:
		s.Commands.HandleStatus(ctx, host, x.Status)
		if s.Refresh != nil && x.Status.RequestId != "" {
			s.Refresh.Answer(host, x.Status)
		}
	}
	return nil
}

func (s *Server) logger() *slog.Logger {
	if s.Log != nil {
		return s.Log
	}
	return slog.Default()
}
