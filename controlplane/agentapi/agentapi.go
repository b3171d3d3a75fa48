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
	"sync/atomic"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
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

// streamCancelKey keys the streamEnd of an agent stream's context.
type streamCancelKey struct{}

// streamEnd ends an agent stream: the cancellation of its context, and the
// first cause given (grpc-go cancels the context itself once a status is
// written, so the context's own cause may be just "canceled").
type streamEnd struct {
	cancel context.CancelCauseFunc
	cause  atomic.Pointer[error]
}

// ending reports whether the server is ending the stream: a cause was
// given (its status may still be on the way) or the context is done.
func (e *streamEnd) ending(ctx context.Context) bool {
	return e.cause.Load() != nil || ctx.Err() != nil
}

// why is the first cause the server gave, else the context's.
func (e *streamEnd) why(ctx context.Context) error {
	if c := e.cause.Load(); c != nil {
		return *c
	}
	return context.Cause(ctx)
}

// CancellableStream derives the context of an AgentService.Connect stream
// so that the server can end the stream from outside its receive loop: a
// transport hands the returned context to the stream (grpc.InTapHandle for
// native connections, the request's context for grpc.Server.ServeHTTP), and
// Connect cancels it — with the reason as the cause — to make a blocked
// Recv return. That keeps one goroutine per agent: the handler receives,
// and nothing else waits beside it.
func CancellableStream(ctx context.Context) context.Context {
	ctx, cancel := context.WithCancelCause(ctx)
	return context.WithValue(ctx, streamCancelKey{}, &streamEnd{cancel: cancel})
}

// statusWriter is what grpc-go's server stream (the ServerTransportStream
// in a handler's context) offers to end a stream with a status. grpc-go
// answers a Recv ended by its context with Canceled at once, so a session
// the server ends writes its own status first; the stream is then done and
// later statuses are dropped.
type statusWriter interface {
	WriteStatus(*status.Status) error
}

// statusWait bounds how long the end of a session waits for its status to
// be written before it cancels the stream regardless.
const statusWait = time.Second

// ending ends the stream of ctx for cause: the status that tells the agent
// why, then the cancellation that makes the handler's Recv return.
func (s *Server) ending(ctx context.Context, e *streamEnd) context.CancelCauseFunc {
	w, _ := grpc.ServerTransportStreamFromContext(ctx).(statusWriter)
	return func(cause error) {
		if cause == nil {
			cause = context.Canceled
		}
		if !e.cause.CompareAndSwap(nil, &cause) {
			return // the first cause is being acted on
		}
		st, _ := s.endStatus(cause)
		if st == nil || w == nil {
			e.cancel(cause)
			return
		}
		// The hub calls this under its locks; on net/http's transport a
		// status waits behind the stream's pending writes (an agent that
		// stopped reading), so it is written on its own goroutine, and the
		// cancellation follows it — at the latest after statusWait.
		go func() {
			t := time.AfterFunc(statusWait, func() { e.cancel(cause) })
			_ = w.WriteStatus(st)
			t.Stop()
			e.cancel(cause)
		}()
	}
}

// endStatus is the status and the logged reason of a session the server
// ends for cause; nil when cause is not the server's.
func (s *Server) endStatus(cause error) (*status.Status, string) {
	switch {
	case errors.Is(cause, hub.ErrReplaced):
		return status.New(codes.Aborted, "replaced by a newer connection for this host"), "replaced"
	case errors.Is(cause, hub.ErrHeartbeatTimeout):
		return status.New(codes.DeadlineExceeded, "no heartbeat within three intervals"), "heartbeat timeout"
	case errors.Is(cause, hub.ErrRemoved):
		return status.New(codes.PermissionDenied, "host removed or token revoked"), "token revoked"
	case errors.Is(cause, hub.ErrShutdown):
		return s.shutdownStatus(), "server shutting down"
	case errors.Is(cause, errNoHello):
		return status.New(codes.DeadlineExceeded, "no hello received"), "no hello"
	}
	return nil, ""
}

// errNoHello cancels a stream whose first message did not come in time.
var errNoHello = errors.New("no hello received")

// Connect serves one agent session: open registers it, serve handles what
// the agent sends until the session ends, close unregisters it. They are
// separate functions so that the frames left on the stack while the
// session waits for the next message are small — tens of thousands of
// sessions wait at once, and a goroutine's stack shrinks only to four times
// what it uses.
func (s *Server) Connect(stream agentv1.AgentService_ConnectServer) error {
	ctx := stream.Context()
	ender, ok := ctx.Value(streamCancelKey{}).(*streamEnd)
	if !ok {
		s.logger().Error("AgentService.Connect served without agentapi.CancellableStream")
		return status.Error(codes.Internal, "agent streams are not set up on this server")
	}
	// No cancel of the stream's context on return: on net/http's transport
	// that would race grpc-go writing the status returned here (the
	// transport ends the context itself once the stream is done).
	sess, err := s.open(ctx, stream, ender)
	if err != nil {
		return err
	}
	defer s.close(sess)
	return s.serve(ctx, stream, ender, sess)
}

// session is one agent's registered stream.
type session struct {
	conn   *hub.Conn
	reason string // why it ended, for the hub's offline event
}

// open receives and checks the hello, registers the session with the hub,
// stores the host record if the hello changed it, and welcomes the agent.
func (s *Server) open(ctx context.Context, stream agentv1.AgentService_ConnectServer, ender *streamEnd) (*session, error) {
	id := auth.FromContext(ctx)
	if id == nil || id.Kind != auth.KindAgent {
		return nil, status.Error(codes.PermissionDenied, "only agents may connect")
	}
	end := s.ending(ctx, ender)
	hello, err := s.recvHello(ctx, stream, ender, end)
	if err != nil {
		return nil, err
	}
	if hello.Hostname != id.Name {
		return nil, status.Errorf(codes.PermissionDenied, "this token belongs to host %q, not %q", id.Name, validate.Printable(hello.Hostname, 64))
	}
	if err := validate.Hello(hello); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	// Once registered, the session can be sent to (a command, a refresh)
	// from other goroutines; the sender stays locked until the Welcome is
	// out, so the agent always hears the Welcome first.
	sender := &streamSender{s: stream}
	sender.mu.Lock()
	welcomed := false
	defer func() {
		if !welcomed {
			sender.mu.Unlock()
		}
	}()
	conn, rec, err := s.Hub.Connect(id.Name, hello, sender, end)
	if errors.Is(err, hub.ErrUnknownHost) {
		// Registered offline (nixplane hosts add --data-dir) while the
		// server ran: the token matched, so the host is in the store.
		if h, gerr := s.Hosts.GetHost(ctx, id.Name); gerr == nil {
			s.Hub.AddHost(h.Record, h.CreatedAt)
			conn, rec, err = s.Hub.Connect(id.Name, hello, sender, end)
		}
	}
	if errors.Is(err, hub.ErrUnknownHost) {
		return nil, status.Error(codes.PermissionDenied, "host was removed")
	} else if errors.Is(err, hub.ErrShutdown) {
		return nil, s.shutdownStatus().Err()
	} else if err != nil {
		return nil, status.Error(codes.Internal, "register session")
	}
	// The host is named in each line rather than through log.With, whose
	// copy each of tens of thousands of sessions would keep.
	log := s.logger()
	log.Info("agent connected", "host", id.Name, "version", hello.AgentVersion, "generation", hello.Generation)
	if s.Metrics != nil {
		s.Metrics.Connected(1)
	}
	sess := &session{conn: conn, reason: "stream closed"}
	if conn.RecordChanged() {
		if err := s.Hosts.UpdateHostRecord(ctx, id.Name, commands.Durable(rec)); err != nil {
			log.Warn("store host after hello", "host", id.Name, "err", err)
		}
	}
	err = stream.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Welcome{Welcome: &agentv1.Welcome{
		HostId: id.Name, ServerVersion: s.ServerVersion, HeartbeatInterval: durationpb.New(0)}}})
	welcomed = true
	sender.mu.Unlock()
	if err != nil {
		s.close(sess)
		return nil, err
	}
	s.Commands.HandleHello(ctx, id.Name, hello)
	return sess, nil
}

// close unregisters a session opened by open.
func (s *Server) close(sess *session) {
	if s.Metrics != nil {
		s.Metrics.Connected(-1)
	}
	s.Hub.Disconnect(sess.conn, sess.reason)
	s.Commands.HandleDisconnect(sess.conn.HostID)
}

// serve handles the agent's messages, in order, until the stream ends. The
// hub ends a session by cancelling the stream's context with the reason,
// which makes Recv return.
func (s *Server) serve(ctx context.Context, stream agentv1.AgentService_ConnectServer, ender *streamEnd, sess *session) error {
	for {
		m, err := stream.Recv()
		if err == nil && !ender.ending(ctx) {
			err = s.handle(ctx, sess.conn, m)
		}
		if err == nil && !ender.ending(ctx) {
			continue
		}
		return s.ended(ctx, ender, sess, err)
	}
}

// ended is the status a session ends with, and logs why.
func (s *Server) ended(ctx context.Context, ender *streamEnd, sess *session, err error) error {
	if st, why := s.endStatus(ender.why(ctx)); st != nil {
		sess.reason = why
		return st.Err()
	}
	host := sess.conn.HostID
	switch {
	case err == nil:
		return status.FromContextError(ctx.Err()).Err()
	case errors.Is(err, io.EOF):
		s.logger().Info("agent closed its stream", "host", host)
		return nil
	case status.Code(err) == codes.InvalidArgument:
		s.logger().Warn("agent sent a bad message", "host", host, "err", err)
	default:
		s.logger().Info("agent stream ended", "host", host, "err", err)
	}
	return err
}

// shutdownStatus is the answer while the server stops: Unavailable with a
// google.rpc.RetryInfo suggesting a random delay, which spreads the
// reconnects of a large fleet over the next seconds.
func (s *Server) shutdownStatus() *status.Status {
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
	return st
}

func (s *Server) recvHello(ctx context.Context, stream agentv1.AgentService_ConnectServer, ender *streamEnd, end context.CancelCauseFunc) (*agentv1.Hello, error) {
	wait := s.HelloTimeout
	if wait <= 0 {
		wait = 10 * time.Second
	}
	timer := time.AfterFunc(wait, func() { end(errNoHello) })
	m, err := stream.Recv()
	if !timer.Stop() {
		// The timeout fired (and is ending the stream), even if the hello
		// came in at that moment.
		st, _ := s.endStatus(errNoHello)
		return nil, st.Err()
	}
	if err != nil {
		return nil, err
	}
	h := m.GetHello()
	if h == nil {
		return nil, status.Error(codes.InvalidArgument, "the first message must be a hello")
	}
	return h, nil
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
