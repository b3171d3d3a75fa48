package agentapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"
	"google.golang.org/grpc/test/bufconn"

	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/commands"
	"github.com/nixplane/nixplane/controlplane/hub"
	"github.com/nixplane/nixplane/controlplane/store"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

var quietLog = slog.New(slog.DiscardHandler)

// countingStore is the real SQLite store counting host record writes.
type countingStore struct {
	*store.SQLite
	writes atomic.Int64
}

func (s *countingStore) UpdateHostRecord(ctx context.Context, id string, rec *fleetv1.Host) error {
	s.writes.Add(1)
	return s.SQLite.UpdateHostRecord(ctx, id, rec)
}

type testServer struct {
	st   *countingStore
	hub  *hub.Hub
	conn *grpc.ClientConn
}

// newTestServer serves AgentService over an in-memory listener; the host
// named in a request's "host" metadata is the caller, as a verified agent
// token would make it.
func newTestServer(t *testing.T, hosts ...string) *testServer {
	t.Helper()
	return newTestServerWith(t, testOptions{tap: true}, hosts...)
}

// testOptions vary the test server: tap serves Connect with
// CancellableStream as the real server does; helloTimeout bounds the hello.
type testOptions struct {
	tap          bool
	helloTimeout time.Duration
}

func newTestServerWith(t *testing.T, opts testOptions, hosts ...string) *testServer {
	t.Helper()
	gs, st, hb := newAgentServer(t, opts, hosts...)
	ln := bufconn.Listen(1 << 20)
	go func() { _ = gs.Serve(ln) }()
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return ln.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &testServer{st: st, hub: hb, conn: conn}
}

// newAgentServer is a gRPC server with AgentService on a real SQLite store
// holding hosts, its hub and command manager; the host named in a request's
// "x-test-host" metadata is the caller, as a verified agent token would
// make it. The caller serves it.
func newAgentServer(t *testing.T, opts testOptions, hosts ...string) (*grpc.Server, *countingStore, *hub.Hub) {
	t.Helper()
	ctx := context.Background()
	sq, err := store.Open(ctx, filepath.Join(t.TempDir(), "nixplane.db"), store.WithLogger(quietLog))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sq.Close() })
	st := &countingStore{SQLite: sq}
	for _, h := range hosts {
		if err := st.CreateHost(ctx, store.Host{ID: h, Record: &fleetv1.Host{HostId: h, Hostname: h}, CreatedAt: time.Now()}, []byte("hash-"+h)); err != nil {
			t.Fatal(err)
		}
	}
	hb, err := hub.New(ctx, hub.Config{ServerVersion: "1.0.0", Store: st, Log: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	cm, err := commands.New(ctx, commands.Config{Hub: hb, Store: st, Log: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	sopts := []grpc.ServerOption{grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		md, _ := metadata.FromIncomingContext(ss.Context())
		var id *auth.Identity
		if v := md.Get("x-test-host"); len(v) == 1 {
			id = &auth.Identity{Kind: auth.KindAgent, Name: v[0]}
		}
		return handler(srv, &identityStream{ServerStream: ss, ctx: auth.WithIdentity(ss.Context(), id)})
	})}
	if opts.tap {
		sopts = append(sopts, grpc.InTapHandle(func(ctx context.Context, _ *tap.Info) (context.Context, error) {
			return CancellableStream(ctx), nil
		}))
	}
	gs := grpc.NewServer(sopts...)
	agentv1.RegisterAgentServiceServer(gs, &Server{Hub: hb, Commands: cm, Hosts: st, ServerVersion: "1.0.0", HelloTimeout: opts.helloTimeout, Log: quietLog})
	return gs, st, hb
}

type identityStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *identityStream) Context() context.Context { return s.ctx }

// session opens an agent stream with hello and returns it after the
// welcome, or the error the server answered with.
func (ts *testServer) session(t *testing.T, ctx context.Context, hello *agentv1.Hello) (agentv1.AgentService_ConnectClient, error) {
	t.Helper()
	stream, err := agentv1.NewAgentServiceClient(ts.conn).Connect(metadata.AppendToOutgoingContext(ctx, "x-test-host", hello.Hostname))
	if err != nil {
		return nil, err
	}
	// A server that ends the stream at once makes Send fail with io.EOF;
	// the status comes with Recv.
	_ = stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: hello}})
	m, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	if m.GetWelcome() == nil {
		t.Fatalf("first message %v, want a welcome", m)
	}
	return stream, nil
}

// waitOffline waits until the hub has the host offline.
func (ts *testServer) waitOffline(t *testing.T, host string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for ts.hub.Conn(host) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("host %s still connected", host)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestReconnectWritesNothingUnchanged: the agent API stores the host record
// after a hello only when the hello changed it. (The command manager's
// record of the agent's identity is counted too, so the test compares
// a reconnect with the same hello against one with a new generation.)
func TestReconnectWritesNothingUnchanged(t *testing.T) {
	ts := newTestServer(t, "web-1")
	hello := &agentv1.Hello{Hostname: "web-1", AgentVersion: "1.0.0", Generation: "aaaaaaa1", LockHash: "11"}
	connectOnce := func(h *agentv1.Hello) int64 {
		t.Helper()
		before := ts.st.writes.Load()
		ctx, cancel := context.WithCancel(context.Background())
		if _, err := ts.session(t, ctx, h); err != nil {
			t.Fatal(err)
		}
		// The welcome is sent after the agent API's write, and the command
		// manager's hello handling runs right after it: wait for the host
		// to be registered, then end the session.
		cancel()
		ts.waitOffline(t, h.Hostname)
		return ts.st.writes.Load() - before
	}
	first := connectOnce(hello)
	same := connectOnce(hello)
	changed := &agentv1.Hello{Hostname: "web-1", AgentVersion: "1.0.0", Generation: "bbbbbbb2", LockHash: "11"}
	moved := connectOnce(changed)
	if first == 0 || moved != same+1 {
		t.Fatalf("host record writes: first hello %d, same hello again %d, new generation %d; want the new generation to cost exactly one more than the same hello", first, same, moved)
	}
	rec, err := ts.st.GetHost(context.Background(), "web-1")
	if err != nil || rec.Record.GetGeneration() != "bbbbbbb2" {
		t.Fatalf("stored record %v, %v; want the new generation", rec.Record, err)
	}
}

// TestConnectAfterCloseAllIsUnavailable: once the hub is closed for
// shutdown, a new agent session is refused with Unavailable and a retry
// delay, and an open one ends the same way.
func TestConnectAfterCloseAllIsUnavailable(t *testing.T) {
	ts := newTestServer(t, "web-1", "web-2")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	open, err := ts.session(t, ctx, &agentv1.Hello{Hostname: "web-1", AgentVersion: "1.0.0"})
	if err != nil {
		t.Fatal(err)
	}
	ts.hub.CloseAll()
	_, errOpen := open.Recv()
	_, errNew := ts.session(t, ctx, &agentv1.Hello{Hostname: "web-2", AgentVersion: "1.0.0"})
	for name, err := range map[string]error{"open session": errOpen, "new session": errNew} {
		st, _ := status.FromError(err)
		if st.Code() != codes.Unavailable {
			t.Fatalf("%s ended with %v, want Unavailable", name, err)
		}
		var delay time.Duration
		for _, d := range st.Details() {
			if ri, ok := d.(*errdetails.RetryInfo); ok {
				delay = ri.GetRetryDelay().AsDuration()
			}
		}
		if delay < time.Second || delay > 10*time.Second {
			t.Fatalf("%s: retry delay %v, want 1s–10s", name, delay)
		}
	}
	if ts.hub.Conn("web-2") != nil {
		t.Fatal("a host was registered after CloseAll")
	}
}

// TestHubEndsSilentSessions: the hub ends a session whose agent sends
// nothing — replaced by a newer connection, or its host removed — and the
// stream ends at once with the reason's code, though the handler was
// blocked receiving.
func TestHubEndsSilentSessions(t *testing.T) {
	ts := newTestServer(t, "web-1", "web-2")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	old, err := ts.session(t, ctx, &agentv1.Hello{Hostname: "web-1", AgentVersion: "1.0.0"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ts.session(t, ctx, &agentv1.Hello{Hostname: "web-1", AgentVersion: "1.0.0"}); err != nil {
		t.Fatal(err)
	}
	if _, err := old.Recv(); status.Code(err) != codes.Aborted {
		t.Fatalf("replaced session ended with %v, want Aborted", err)
	}
	gone, err := ts.session(t, ctx, &agentv1.Hello{Hostname: "web-2", AgentVersion: "1.0.0"})
	if err != nil {
		t.Fatal(err)
	}
	ts.hub.RemoveHost("web-2")
	if _, err := gone.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("removed host's session ended with %v, want PermissionDenied", err)
	}
	ts.waitOffline(t, "web-2")
}

// TestHelloTimeout: a stream that sends no hello is ended with
// DeadlineExceeded once HelloTimeout passes, and registers nothing.
func TestHelloTimeout(t *testing.T) {
	ts := newTestServerWith(t, testOptions{tap: true, helloTimeout: 50 * time.Millisecond}, "web-1")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := agentv1.NewAgentServiceClient(ts.conn).Connect(metadata.AppendToOutgoingContext(ctx, "x-test-host", "web-1"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("silent stream ended with %v, want DeadlineExceeded", err)
	}
	if ts.hub.Conn("web-1") != nil {
		t.Fatal("a host was registered without a hello")
	}
}

// TestConnectNeedsCancellableStream: served without CancellableStream,
// Connect refuses with Internal instead of running a session it could not
// end.
func TestConnectNeedsCancellableStream(t *testing.T) {
	ts := newTestServerWith(t, testOptions{}, "web-1")
	_, err := ts.session(t, context.Background(), &agentv1.Hello{Hostname: "web-1", AgentVersion: "1.0.0"})
	if status.Code(err) != codes.Internal {
		t.Fatalf("Connect without the tap: %v, want Internal", err)
	}
}

// TestWelcomeComesFirst: a message sent to a session as soon as the hub
// has it (a refresh or a command racing the connect) reaches the agent
// after its Welcome, never before.
func TestWelcomeComesFirst(t *testing.T) {
	ts := newTestServer(t, "web-1")
	for i := range 30 {
		ctx, cancel := context.WithCancel(context.Background())
		sent := make(chan error, 1)
		go func() {
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
				if c := ts.hub.Conn("web-1"); c != nil {
					sent <- c.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Refresh{Refresh: &agentv1.RefreshStatus{RequestId: "r"}}})
					return
				}
				runtime.Gosched()
			}
			sent <- errors.New("the session never registered")
		}()
		// A new generation each round: the hello changes the record, so the
		// server stores it between registering and welcoming.
		stream, err := ts.session(t, ctx, &agentv1.Hello{Hostname: "web-1", AgentVersion: "1.0.0", Generation: fmt.Sprintf("%08x", i+1)})
		if err != nil {
			t.Fatal(err)
		}
		if err := <-sent; err != nil {
			t.Fatal(err)
		}
		if m, err := stream.Recv(); err != nil || m.GetRefresh() == nil {
			t.Fatalf("round %d: after the welcome %v, %v; want the refresh", i, m, err)
		}
		cancel()
		ts.waitOffline(t, "web-1")
	}
}
