package controlplane_test

import (
	"context"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/fleetapi"
	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// startServer runs a server in-process with one host, "m-1", and an API
// token of the given scope.
func startServer(t *testing.T, scope adminv1.Scope) (addr, apiToken, hostToken string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	dir := t.TempDir()
	st, err := controlplane.OpenStore(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	tok, secret, err := fleetapi.NewAPIToken("test-token", scope, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.CreateAPIToken(ctx, tok); err != nil {
		t.Fatal(err)
	}
	_, htok, err := fleetapi.RegisterHost(ctx, st, &fleetv1.AddHostRequest{Hostname: "m-1"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	st.Close()
	ready := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- controlplane.Run(ctx, controlplane.Config{Listen: "127.0.0.1:0", DataDir: dir, AdminPassword: "metrics-test-pw",
			Version: "0.1.0", Out: io.Discard, Ready: func(a string) { ready <- a }})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server: %v", err)
		}
	})
	select {
	case addr = <-ready:
	case err := <-done:
		t.Fatalf("server did not start: %v", err)
	}
	return addr, secret, htok
}

func scrape(t *testing.T, addr, token string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/metrics", nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func series(body, name string) float64 {
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` ([0-9.e+-]+)$`).FindStringSubmatch(body)
	if m == nil {
		return -1
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// TestMetricsMoveUnderLoad scrapes /metrics: it needs a credential, and its
// agent and heartbeat series follow a real agent stream.
func TestMetricsMoveUnderLoad(t *testing.T) {
	addr, apiToken, hostToken := startServer(t, adminv1.Scope_SCOPE_READ)
	if code, _ := scrape(t, addr, ""); code != http.StatusUnauthorized {
		t.Fatalf("/metrics without a token: %d, want 401", code)
	}
	code, body := scrape(t, addr, apiToken)
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	if v := series(body, "nixplane_agents_connected"); v != 0 {
		t.Fatalf("agents connected before any agent: %v", v)
	}

	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+hostToken))
	defer cancel()
	stream, err := agentv1.NewAgentServiceClient(conn).Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: &agentv1.Hello{
		Hostname: "m-1", AgentVersion: "0.1.0", HeartbeatInterval: durationpb.New(time.Second)}}}); err != nil {
		t.Fatal(err)
	}
	if m, err := stream.Recv(); err != nil || m.GetWelcome() == nil {
		t.Fatalf("no welcome: %v %v", m, err)
	}
	const beats = 25
	for i := 0; i < beats; i++ {
		if err := stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Heartbeat{Heartbeat: &agentv1.Heartbeat{
			Metrics: &typesv1.Metrics{CpuPercent: float64(i)}}}}); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, body = scrape(t, addr, apiToken)
		if series(body, "nixplane_heartbeats_total") >= beats && series(body, "nixplane_agents_connected") == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("series did not move: heartbeats=%v agents=%v", series(body, "nixplane_heartbeats_total"), series(body, "nixplane_agents_connected"))
		}
		time.Sleep(50 * time.Millisecond) // poll interval, not a wait for state
	}
	if !regexp.MustCompile(`grpc_server_handled_total\{.*grpc_method="Connect"`).MatchString(body) &&
		!regexp.MustCompile(`grpc_server_started_total\{.*grpc_method="Connect"`).MatchString(body) {
		t.Errorf("gRPC server metrics missing the Connect stream")
	}
	cancel()
	deadline = time.Now().Add(15 * time.Second)
	for series(body, "nixplane_agents_connected") != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("agents connected did not drop after the stream ended")
		}
		time.Sleep(50 * time.Millisecond)
		_, body = scrape(t, addr, apiToken)
	}
}
