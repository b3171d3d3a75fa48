// Package fakeserver is an in-process AgentService for the agent's tests:
// a real gRPC server on a loopback port that accepts one token, answers the
// Hello with a Welcome, records everything the agent sends, and lets a test
// send commands down the stream.
package fakeserver

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Server is the fake control plane.
type Server struct {
	agentv1.UnimplementedAgentServiceServer

	// Token is the only accepted agent token.
	Token string
	// Addr is the listening address (127.0.0.1:port).
	Addr string

	srv *grpc.Server

	mu       sync.Mutex
	attempts int
	conns    []*Conn
}

// Conn is one agent session seen by the server.
type Conn struct {
	// Hello is the agent's first message.
	Hello *agentv1.Hello
	send  chan *agentv1.ConnectResponse
	done  chan struct{}

	mu   sync.Mutex
	msgs []*agentv1.ConnectRequest
	err  error
}

// Start listens on addr ("127.0.0.1:0" for any port) and serves until the
// test ends or Stop is called. A fixed port that is still busy (a server
// started again on the address of a stopped one, while some socket of the
// machine briefly holds the port) is tried again for up to ten seconds.
func Start(t testing.TB, addr, token string) *Server {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	lis, err := net.Listen("tcp", addr)
	for err != nil && errors.Is(err, syscall.EADDRINUSE) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond) // pacing the bind retries, not a wait for state
		lis, err = net.Listen("tcp", addr)
	}
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	s := &Server{Token: token, Addr: lis.Addr().String()}
	s.srv = grpc.NewServer(grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}))
	agentv1.RegisterAgentServiceServer(s.srv, s)
	go func() { _ = s.srv.Serve(lis) }()
	t.Cleanup(s.Stop)
	return s
}

// URL is the server URL for the agent.
func (s *Server) URL() string { return "http://" + s.Addr }

// Stop ends all streams and closes the listener.
func (s *Server) Stop() { s.srv.Stop() }

// Attempts counts Connect calls, rejected ones included.
func (s *Server) Attempts() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.attempts
}

// Conns returns the sessions that got past the Hello, oldest first.
func (s *Server) Conns() []*Conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*Conn(nil), s.conns...)
}

// Last returns the newest session, or nil.
func (s *Server) Last() *Conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.conns) == 0 {
		return nil
	}
	return s.conns[len(s.conns)-1]
}

// Connect implements AgentService.
func (s *Server) Connect(stream agentv1.AgentService_ConnectServer) error {
	s.mu.Lock()
	s.attempts++
	s.mu.Unlock()
	md, _ := metadata.FromIncomingContext(stream.Context())
	if auth := md.Get("authorization"); len(auth) != 1 || auth[0] != "Bearer "+s.Token {
		return status.Error(codes.Unauthenticated, "invalid agent token")
	}
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	hello := first.GetHello()
	if hello == nil {
		return status.Error(codes.InvalidArgument, "first message must be a hello")
	}
	c := &Conn{Hello: hello, send: make(chan *agentv1.ConnectResponse, 16), done: make(chan struct{})}
	if err := stream.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Welcome{Welcome: &agentv1.Welcome{
		HostId: hello.GetHostname(), ServerVersion: "fake",
	}}}); err != nil {
		return err
	}
	s.mu.Lock()
	s.conns = append(s.conns, c)
	s.mu.Unlock()

	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case m := <-c.send:
				if stream.Send(m) != nil {
					return
				}
			}
		}
	}()
	for {
		m, err := stream.Recv()
		if err != nil {
			c.mu.Lock()
			c.err = err
			c.mu.Unlock()
			close(c.done)
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		c.mu.Lock()
		c.msgs = append(c.msgs, m)
		c.mu.Unlock()
	}
}

// Send sends m down this session.
func (c *Conn) Send(m *agentv1.ConnectResponse) { c.send <- m }

// Run asks the agent to run a command.
func (c *Conn) Run(r *agentv1.RunCommand) {
	c.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Run{Run: r}})
}

// Done is closed when the session ended.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err is how the session ended (io.EOF for a clean close by the agent).
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Messages returns everything the agent sent after the Hello.
func (c *Conn) Messages() []*agentv1.ConnectRequest {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*agentv1.ConnectRequest(nil), c.msgs...)
}

// Heartbeats returns the heartbeats received so far.
func (c *Conn) Heartbeats() []*agentv1.Heartbeat {
	var out []*agentv1.Heartbeat
	for _, m := range c.Messages() {
		if h := m.GetHeartbeat(); h != nil {
			out = append(out, h)
		}
	}
	return out
}

// Result returns the result for commandID, or nil.
func (c *Conn) Result(commandID string) *agentv1.CommandResult {
	for _, m := range c.Messages() {
		if r := m.GetResult(); r != nil && r.GetCommandId() == commandID {
			return r
		}
	}
	return nil
}

// Lines returns the output lines of commandID in arrival order.
func (c *Conn) Lines(commandID string) []string {
	var out []string
	for _, m := range c.Messages() {
		if o := m.GetOutput(); o != nil && o.GetCommandId() == commandID {
			for _, l := range o.GetLines() {
				out = append(out, l.GetText())
			}
		}
	}
	return out
}

// Eventually polls cond every 10ms until it holds or timeout passes, then
// fails the test with msg.
func Eventually(t testing.TB, timeout time.Duration, msg string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tk := time.NewTicker(10 * time.Millisecond)
	defer tk.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for: %s", timeout, msg)
		}
		<-tk.C
	}
}
