package session

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
)

// unavailable is the server's refusal while it shuts down: Unavailable with
// a RetryInfo of delay (none when zero).
func unavailable(t *testing.T, delay time.Duration) error {
	t.Helper()
	st := status.New(codes.Unavailable, "server shutting down")
	if delay == 0 {
		return st.Err()
	}
	st, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(delay)})
	if err != nil {
		t.Fatal(err)
	}
	return st.Err()
}

func TestRetryDelay(t *testing.T) {
	hinted := unavailable(t, 7*time.Second)
	for _, tc := range []struct {
		name string
		err  error
		want time.Duration
		ok   bool
	}{
		{"nil", nil, 0, false},
		{"not a status", errors.New("connection refused"), 0, false},
		{"status without details", unavailable(t, 0), 0, false},
		{"RetryInfo", hinted, 7 * time.Second, true},
		{"wrapped", fmt.Errorf("session: %w", hinted), 7 * time.Second, true},
		{"negative delay", unavailable(t, -time.Second), 0, false},
	} {
		if d, ok := RetryDelay(tc.err); d != tc.want || ok != tc.ok {
			t.Errorf("%s: RetryDelay = %s, %v; want %s, %v", tc.name, d, ok, tc.want, tc.ok)
		}
	}
}

func TestReconnectDelay(t *testing.T) {
	hint := unavailable(t, 4*time.Second)
	for range 200 {
		if d, ok := ReconnectDelay(time.Second, hint, time.Minute); !ok || d < 4*time.Second || d > 6*time.Second {
			t.Fatalf("step 1s, hint 4s: %s, %v; want 4s to 6s from the hint", d, ok)
		}
	}
	if d, ok := ReconnectDelay(30*time.Second, hint, time.Minute); ok || d != 30*time.Second {
		t.Errorf("step 30s, hint 4s: %s, %v; want the longer step", d, ok)
	}
	if d, ok := ReconnectDelay(time.Second, unavailable(t, time.Hour), time.Minute); !ok || d != time.Minute {
		t.Errorf("hint 1h, most 1m: %s, %v; want the cap", d, ok)
	}
	if d, ok := ReconnectDelay(1500*time.Millisecond, errors.New("EOF"), time.Minute); ok || d != 1500*time.Millisecond {
		t.Errorf("no hint: %s, %v; want the step", d, ok)
	}
}

// scriptedServer answers each Connect with the next of its steps.
type scriptedServer struct {
	agentv1.UnimplementedAgentServiceServer
	mu    sync.Mutex
	steps []func(agentv1.AgentService_ConnectServer) error
	n     int
}

func (s *scriptedServer) Connect(stream agentv1.AgentService_ConnectServer) error {
	if _, err := stream.Recv(); err != nil { // the Hello
		return err
	}
	s.mu.Lock()
	i := s.n
	s.n++
	s.mu.Unlock()
	if i >= len(s.steps) {
		return status.Error(codes.Unavailable, "script ended")
	}
	return s.steps[i](stream)
}

// scriptedClient starts a gRPC server on loopback that plays steps and
// returns a client of it made from cfg (Server, Hostname and TokenFile
// filled in).
func scriptedClient(t *testing.T, cfg Config, steps ...func(agentv1.AgentService_ConnectServer) error) *Client {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	agentv1.RegisterAgentServiceServer(gs, &scriptedServer{steps: steps})
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	dir := t.TempDir()
	cfg.Server, cfg.Hostname, cfg.TokenFile = "http://"+lis.Addr().String(), "web-1", filepath.Join(dir, "token")
	if err := os.WriteFile(cfg.TokenFile, []byte("npa_test\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := New(cfg, testHandler{}, NewOutbox(8, filepath.Join(dir, "pending"), discard()), discard())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// recordDelays makes c's reconnect waits end at once and records them;
// after n it calls stop.
func recordDelays(c *Client, n int, stop func()) *[]time.Duration {
	planned := &[]time.Duration{}
	c.timer = func(d time.Duration) (<-chan time.Time, func() bool) {
		*planned = append(*planned, d) // only Run's goroutine calls timer
		if len(*planned) == n {
			stop()
		}
		fire := make(chan time.Time, 1)
		fire <- time.Time{}
		return fire, func() bool { return false }
	}
	return planned
}

type testHandler struct{}

func (testHandler) Hello(context.Context) *agentv1.Hello         { return &agentv1.Hello{Hostname: "web-1"} }
func (testHandler) Heartbeat(context.Context) *agentv1.Heartbeat { return &agentv1.Heartbeat{} }
func (testHandler) Run(*agentv1.RunCommand)                      {}
func (testHandler) Stop(*agentv1.StopCommand)                    {}
func (testHandler) Refresh(*agentv1.RefreshStatus)               {}

// TestReconnectHonoursServerRetryDelay runs the client against a gRPC
// server that refuses it as a stopping server does, and records the delay
// planned before each reconnect instead of waiting it out.
func TestReconnectHonoursServerRetryDelay(t *testing.T) {
	refuse := func(d time.Duration) func(agentv1.AgentService_ConnectServer) error {
		return func(agentv1.AgentService_ConnectServer) error { return unavailable(t, d) }
	}
	steps := []func(agentv1.AgentService_ConnectServer) error{
		refuse(7 * time.Second), // refused at the Hello
		refuse(0),               // refused without a hint: the usual backoff
		func(s agentv1.AgentService_ConnectServer) error { // welcomed, then the server stops
			if err := s.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Welcome{Welcome: &agentv1.Welcome{HostId: "web-1"}}}); err != nil {
				return err
			}
			return unavailable(t, 3*time.Second)
		},
		refuse(2 * time.Hour), // more than BackoffMax
	}
	c := scriptedClient(t, Config{BackoffInitial: 10 * time.Millisecond, BackoffMax: time.Minute}, steps...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	planned := recordDelays(c, len(steps), cancel)
	if err := c.Run(ctx); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if len(*planned) != len(steps) {
		t.Fatalf("planned %d reconnects (%v), want %d", len(*planned), *planned, len(steps))
	}
	within := func(i int, what string, lo, hi time.Duration) {
		if d := (*planned)[i]; d < lo || d > hi {
			t.Errorf("reconnect %d (%s): waits %s, want %s to %s", i+1, what, d, lo, hi)
		}
	}
	within(0, "refused with a 7s hint", 7*time.Second, 7*time.Second+7*time.Second/2)
	within(1, "refused without a hint", time.Millisecond, time.Second)
	within(2, "stream ended with a 3s hint", 3*time.Second, 3*time.Second+3*time.Second/2)
	within(3, "hint over BackoffMax", time.Minute, time.Minute)
}

// TestShutdownBeforeWelcomeClosesCleanly: an agent stopped after its Hello
// but before the Welcome half-closes the stream, so the server sees an
// orderly end (EOF) and not a cancelled stream.
func TestShutdownBeforeWelcomeClosesCleanly(t *testing.T) {
	gotHello, ended := make(chan struct{}), make(chan error, 1)
	c := scriptedClient(t, Config{DrainTimeout: 20 * time.Second}, func(s agentv1.AgentService_ConnectServer) error {
		close(gotHello)
		_, err := s.Recv()
		ended <- err
		return nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	select {
	case <-gotHello:
	case <-time.After(20 * time.Second):
		t.Fatal("no Hello")
	}
	cancel()
	select {
	case err := <-ended:
		if !errors.Is(err, io.EOF) {
			t.Errorf("the server saw the stream end with %v, want EOF", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the stream did not end")
	}
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
}
