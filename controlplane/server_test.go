package controlplane

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/store"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

var quietLog = slog.New(slog.DiscardHandler)

// fleet is what a test server is seeded with.
type fleet struct {
	dir        string
	adminToken string
	readToken  string
	agentToken map[string]string
}

// seed creates hosts and API tokens in a fresh data directory, the way
// `nixplane hosts add` and `tokens create` do offline.
func seed(t *testing.T, hosts ...string) *fleet {
	t.Helper()
	ctx := context.Background()
	f := &fleet{dir: t.TempDir(), agentToken: map[string]string{}}
	st, err := OpenStore(ctx, f.dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, h := range hosts {
		tok := auth.NewSecret(auth.AgentTokenPrefix)
		if err := st.CreateHost(ctx, store.Host{ID: h, Record: &fleetv1.Host{HostId: h, Hostname: h}, CreatedAt: time.Now()}, auth.HashSecret(tok)); err != nil {
			t.Fatal(err)
		}
		f.agentToken[h] = tok
	}
	f.adminToken = auth.NewSecret(auth.APITokenPrefix)
	f.readToken = auth.NewSecret(auth.APITokenPrefix)
	for name, tk := range map[string]store.APIToken{
		"admin": {Scope: "admin", Hash: auth.HashSecret(f.adminToken)},
		"read":  {Scope: "read", Hash: auth.HashSecret(f.readToken)},
	} {
		tk.Name, tk.CreatedAt = name, time.Now()
		if err := st.CreateAPIToken(ctx, tk); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

type running struct {
	addr string
	stop func() // cancels Run and waits for it; fails the test on an error
}

func start(t *testing.T, dir string) *running {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	errc := make(chan error, 1)
	go func() {
		errc <- Run(ctx, Config{Listen: "127.0.0.1:0", DataDir: dir, AdminPassword: "correct horse battery", Version: "1.0.0",
			Ready: func(addr string) { ready <- addr }, Log: quietLog, Out: io.Discard})
	}()
	var addr string
	select {
	case addr = <-ready:
	case err := <-errc:
		cancel()
		t.Fatalf("server did not start: %v", err)
	case <-time.After(30 * time.Second):
		cancel()
		t.Fatal("server did not start in time")
	}
	stopped := false
	r := &running{addr: addr}
	r.stop = func() {
		t.Helper()
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-errc:
			if err != nil {
				t.Errorf("Run returned %v after its context ended", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("Run did not return after its context ended")
		}
	}
	t.Cleanup(r.stop)
	return r
}

func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func withToken(ctx context.Context, tok string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
}

const (
	agentGen  = "abcdef0123456789abcdef0123456789abcdef01"
	agentLock = "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f"
)

// testAgent is an in-process agent on the generated client: the test
// decides every message it sends.
type testAgent struct {
	stream agentv1.AgentService_ConnectClient
	done   chan error
}

// connectAgent opens the agent stream, sends the hello and waits for the
// welcome. If answer is set, a goroutine answers every RefreshStatus with
// the report it returns.
func connectAgent(t *testing.T, ctx context.Context, conn *grpc.ClientConn, host, tok string, answer func(*agentv1.RefreshStatus) *agentv1.StatusReport) *testAgent {
	t.Helper()
	stream, err := agentv1.NewAgentServiceClient(conn).Connect(withToken(ctx, tok))
	if err != nil {
		t.Fatal(err)
	}
	hello := &agentv1.Hello{Hostname: host, AgentVersion: "1.0.0", Generation: agentGen, LockHash: agentLock, OsVersion: "NixOS 26.05"}
	if err := stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: hello}}); err != nil {
		t.Fatal(err)
	}
	m, err := stream.Recv()
	if err != nil {
		t.Fatalf("agent %s: no welcome: %v", host, err)
	}
	if m.GetWelcome().GetHostId() != host {
		t.Fatalf("agent %s: first message %v, want a welcome", host, m)
	}
	a := &testAgent{stream: stream, done: make(chan error, 1)}
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				a.done <- err
				return
			}
			if r := m.GetRefresh(); r != nil && answer != nil {
				st := answer(r)
				if err := stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Status{Status: st}}); err != nil {
					a.done <- err
					return
				}
			}
		}
	}()
	return a
}

// clearCheckedAt drops the compartments' checked-at times, which move with
// every recomputation.
func clearCheckedAt(m proto.Message) {
	var walk func(us *typesv1.UpdateStatus)
	walk = func(us *typesv1.UpdateStatus) {
		for _, c := range []*typesv1.Compartment{us.GetAgent(), us.GetGit(), us.GetLock(), us.GetSystem(), us.GetTests()} {
			if c != nil {
				c.CheckedAt = nil
			}
		}
	}
	r := m.(*fleetv1.RefreshHostResponse)
	walk(r.UpdateStatus)
	walk(r.GetHost().GetUpdateStatus())
}

func restRefresh(t *testing.T, client *http.Client, addr, host, tok string) (int, *fleetv1.RefreshHostResponse) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://"+addr+"/api/hosts/"+host+"/refresh", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		return resp.StatusCode, nil
	}
	var out fleetv1.RefreshHostResponse
	if err := protojson.Unmarshal(body, &out); err != nil {
		t.Fatalf("REST body %s: %v", body, err)
	}
	return resp.StatusCode, &out
}

func TestRefreshHostSameOverGRPCAndREST(t *testing.T) {
	f := seed(t, "web-1", "db-1")
	srv := start(t, f.dir)
	conn := dial(t, srv.addr)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	checked := timestamppb.New(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
	var answers atomic.Int32
	connectAgent(t, ctx, conn, "web-1", f.agentToken["web-1"], func(r *agentv1.RefreshStatus) *agentv1.StatusReport {
		answers.Add(1)
		return &agentv1.StatusReport{RequestId: r.RequestId, Generation: agentGen, LockHash: agentLock,
			System: &typesv1.SystemCheck{Status: typesv1.CompartmentStatus_COMPARTMENT_STATUS_OUTDATED, Message: "a newer system is built", CheckedAt: checked},
			Tests:  &typesv1.TestReport{Passed: 2, Total: 2, Generation: agentGen, RanAt: checked}}
	})
	fc := fleetv1.NewFleetServiceClient(conn)
	client := &http.Client{Transport: &http.Transport{}}
	defer client.CloseIdleConnections()

	viaGRPC, err := fc.RefreshHost(withToken(ctx, f.readToken), &fleetv1.RefreshHostRequest{HostId: "web-1"})
	if err != nil {
		t.Fatal(err)
	}
	code, viaREST := restRefresh(t, client, srv.addr, "web-1", f.readToken)
	if code != http.StatusOK {
		t.Fatalf("REST refresh: HTTP %d", code)
	}
	for name, r := range map[string]*fleetv1.RefreshHostResponse{"gRPC": viaGRPC, "REST": viaREST} {
		if !r.Refreshed || !r.Online || r.HostId != "web-1" || r.Generation != agentGen || r.AgentVersion != "1.0.0" || r.AgentOutdated {
			t.Errorf("%s answer: %v", name, r)
		}
		us := r.GetUpdateStatus()
		if us.GetSystem().GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_OUTDATED ||
			us.GetTests().GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK ||
			us.GetGit().GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN ||
			us.GetAgent().GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK {
			t.Errorf("%s update status: %v", name, us)
		}
	}
	clearCheckedAt(viaGRPC)
	clearCheckedAt(viaREST)
	if !proto.Equal(viaGRPC, viaREST) {
		t.Fatalf("gRPC and REST differ:\ngRPC %v\nREST %v", viaGRPC, viaREST)
	}

	// Offline: last known status, not refreshed, same on both paths.
	offGRPC, err := fc.RefreshHost(withToken(ctx, f.readToken), &fleetv1.RefreshHostRequest{HostId: "db-1"})
	if err != nil {
		t.Fatal(err)
	}
	code, offREST := restRefresh(t, client, srv.addr, "db-1", f.readToken)
	if code != http.StatusOK || offGRPC.Online || offGRPC.Refreshed {
		t.Fatalf("offline refresh: HTTP %d, gRPC %v", code, offGRPC)
	}
	clearCheckedAt(offGRPC)
	clearCheckedAt(offREST)
	if !proto.Equal(offGRPC, offREST) {
		t.Fatalf("offline answers differ:\ngRPC %v\nREST %v", offGRPC, offREST)
	}

	// Unknown host: NotFound and 404.
	if _, err := fc.RefreshHost(withToken(ctx, f.readToken), &fleetv1.RefreshHostRequest{HostId: "ghost"}); status.Code(err) != codes.NotFound {
		t.Fatalf("gRPC unknown host: %v", err)
	}
	if code, _ := restRefresh(t, client, srv.addr, "ghost", f.readToken); code != http.StatusNotFound {
		t.Fatalf("REST unknown host: HTTP %d", code)
	}
	// The REST path passes through the same authentication.
	if code, _ := restRefresh(t, client, srv.addr, "web-1", "npt_"+strings.Repeat("x", 43)); code != http.StatusUnauthorized {
		t.Fatalf("REST with an unknown token: HTTP %d", code)
	}
	if _, err := fc.RefreshHost(ctx, &fleetv1.RefreshHostRequest{HostId: "web-1"}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("gRPC without a token: %v", err)
	}
	if n := answers.Load(); n != 2 {
		t.Fatalf("the agent answered %d refreshes, want 2", n)
	}
}

// TestNoGoroutineLeak: watchers, an agent stream and REST calls all end with
// the server, leaving no goroutines behind.
func TestNoGoroutineLeak(t *testing.T) {
	exercise := func(t *testing.T, f *fleet) {
		srv := start(t, f.dir)
		conn, err := grpc.NewClient(srv.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		fc := fleetv1.NewFleetServiceClient(conn)
		for i := range 3 {
			w, err := fc.WatchFleet(withToken(ctx, f.readToken), &fleetv1.WatchFleetRequest{SkipHeartbeats: i == 1})
			if err != nil {
				t.Fatal(err)
			}
			first, err := w.Recv()
			if err != nil || first.Events[0].GetSnapshot() == nil {
				t.Fatalf("watch %d: first message %v, %v", i, first, err)
			}
		}
		a := connectAgent(t, ctx, conn, "web-1", f.agentToken["web-1"], func(r *agentv1.RefreshStatus) *agentv1.StatusReport {
			return &agentv1.StatusReport{RequestId: r.RequestId, Generation: agentGen, LockHash: agentLock}
		})
		if err := a.stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Heartbeat{Heartbeat: &agentv1.Heartbeat{
			Metrics: &typesv1.Metrics{CpuPercent: 5}, Generation: agentGen, LockHash: agentLock}}}); err != nil {
			t.Fatal(err)
		}
		client := &http.Client{Transport: &http.Transport{}}
		if code, _ := restRefresh(t, client, srv.addr, "web-1", f.readToken); code != http.StatusOK {
			t.Fatalf("REST refresh: HTTP %d", code)
		}
		client.CloseIdleConnections()
		cancel()
		select {
		case err := <-a.done:
			if status.Code(err) != codes.Canceled {
				t.Fatalf("agent stream ended with %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("agent stream did not end with its context")
		}
		conn.Close()
		srv.stop()
	}

	f := seed(t, "web-1")
	// A first run starts whatever lives for the whole process (gRPC's
	// global resolvers, HTTP/2 machinery); it is not a leak.
	t.Run("warm-up", func(t *testing.T) { exercise(t, f) })
	runtime.GC()
	base := runtime.NumGoroutine()
	t.Run("measured", func(t *testing.T) { exercise(t, f) })

	deadline := time.Now().Add(15 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= base {
			return
		}
		if time.Now().After(deadline) {
			var buf bytes.Buffer
			_ = pprof.Lookup("goroutine").WriteTo(&buf, 1)
			t.Fatalf("%d goroutines remain, %d before the server ran:\n%s", n, base, buf.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestServedMethodsHaveRules walks the methods the real server registers.
func TestServedMethodsHaveRules(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cfg := Config{DataDir: t.TempDir(), Log: quietLog}
	cfg.defaults()
	st, err := OpenStore(ctx, cfg.DataDir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	s, err := newServer(ctx, cfg, st)
	if err != nil {
		t.Fatal(err)
	}
	defer s.gwConn.Close()
	n := 0
	for svc, info := range s.grpc.GetServiceInfo() {
		for _, m := range info.Methods {
			n++
			full := "/" + svc + "/" + m.Name
			if _, ok := s.authn.Policy[full]; !ok {
				t.Errorf("served method %s has no rule in the policy", full)
			}
		}
	}
	if n < 25 {
		t.Fatalf("only %d methods served", n)
	}
}

// TestAgentStreamRules: a host's token speaks only for that host, and a
// second connection replaces the first with a clear status.
func TestAgentStreamRules(t *testing.T) {
	f := seed(t, "web-1", "web-2")
	srv := start(t, f.dir)
	conn := dial(t, srv.addr)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	stream, err := agentv1.NewAgentServiceClient(conn).Connect(withToken(ctx, f.agentToken["web-2"]))
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: &agentv1.Hello{Hostname: "web-1"}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("web-2's token speaking for web-1: %v", err)
	}

	first := connectAgent(t, ctx, conn, "web-1", f.agentToken["web-1"], nil)
	connectAgent(t, ctx, conn, "web-1", f.agentToken["web-1"], nil)
	select {
	case err := <-first.done:
		if status.Code(err) != codes.Aborted || !strings.Contains(status.Convert(err).Message(), "replaced") {
			t.Fatalf("replaced stream ended with %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the replaced stream was not closed")
	}
	h, err := fleetv1.NewFleetServiceClient(conn).GetHost(withToken(ctx, f.readToken), &fleetv1.GetHostRequest{HostId: "web-1"})
	if err != nil || !h.Host.Online {
		t.Fatalf("host after replacement: %v, %v", h, err)
	}
}
