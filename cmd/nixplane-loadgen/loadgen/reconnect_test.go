package loadgen

import (
	"context"
	"net"
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

// refusingServer answers the n-th Connect after the Hello with steps[n].
type refusingServer struct {
	agentv1.UnimplementedAgentServiceServer
	mu    sync.Mutex
	steps []func(agentv1.AgentService_ConnectServer) error
	n     int
}

func (s *refusingServer) Connect(stream agentv1.AgentService_ConnectServer) error {
	if _, err := stream.Recv(); err != nil {
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

// TestSimAgentHonoursRetryDelay: a simulated agent refused by a stopping
// server (Unavailable with a RetryInfo) plans its reconnect no sooner than
// the suggested delay; without a suggestion it keeps its short backoff.
func TestSimAgentHonoursRetryDelay(t *testing.T) {
	shutdown := func(d time.Duration) error {
		st, err := status.New(codes.Unavailable, "server shutting down").WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(d)})
		if err != nil {
			t.Fatal(err)
		}
		return st.Err()
	}
	srv := &refusingServer{steps: []func(agentv1.AgentService_ConnectServer) error{
		func(agentv1.AgentService_ConnectServer) error { return shutdown(5 * time.Second) },
		func(agentv1.AgentService_ConnectServer) error { return status.Error(codes.Unavailable, "no hint") },
		func(s agentv1.AgentService_ConnectServer) error {
			if err := s.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Welcome{Welcome: &agentv1.Welcome{HostId: "sim-1"}}}); err != nil {
				return err
			}
			return shutdown(2 * time.Second)
		},
	}}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	agentv1.RegisterAgentServiceServer(gs, srv)
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var planned []time.Duration
	a := &simAgent{spec: &agentSpec{Addr: lis.Addr().String(), Interval: time.Hour}, host: HostToken{Name: "sim-1", Token: "npa_x"},
		st: &agentStats{}, logStop: make(chan struct{}), dial: sourceDialer(0, 0),
		timer: func(d time.Duration) (<-chan time.Time, func() bool) {
			planned = append(planned, d)
			if len(planned) == len(srv.steps) {
				cancel()
			}
			fire := make(chan time.Time, 1)
			fire <- time.Time{}
			return fire, func() bool { return false }
		}}
	a.run(ctx)
	if len(planned) != 3 {
		t.Fatalf("planned %d reconnects (%v), want 3", len(planned), planned)
	}
	if d := planned[0]; d < 5*time.Second || d > 7500*time.Millisecond {
		t.Errorf("refused with a 5s hint: waits %s, want 5s to 7.5s", d)
	}
	if d := planned[1]; d >= 5*time.Second {
		t.Errorf("refused without a hint: waits %s, want its own short backoff", d)
	}
	if d := planned[2]; d < 2*time.Second || d > 3*time.Second {
		t.Errorf("session ended with a 2s hint: waits %s, want 2s to 3s", d)
	}
	if w := a.st.Welcomes.Load(); w != 1 {
		t.Errorf("welcomes = %d, want 1", w)
	}
}
