package loadgen

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain lets the test binary act as nixplane-loadgen when the load
// generator starts itself (server, floor-server, agent workers).
func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		code := Main(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	os.Exit(m.Run())
}

func small() Config {
	return Config{Agents: 20, Interval: 200 * time.Millisecond, Jitter: 0.1, HostPrefix: "t-", WebWatchers: 1, GRPCWatchers: 1,
		Warmup: 300 * time.Millisecond, Duration: 2 * time.Second, ConnectTimeout: 60 * time.Second, StormTimeout: 60 * time.Second,
		SourceIPs: 4, AgentsPerProc: 10, LogRate: 20}
}

// TestSpawnedServer runs 20 agents in two worker processes, a grpc-web and a
// gRPC watcher and two hosts streaming output against a spawned server, and
// checks that every figure of the report was measured.
func TestSpawnedServer(t *testing.T) {
	js := filepath.Join(t.TempDir(), "report.json")
	var stdout, stderr bytes.Buffer
	code := Main(t.Context(), []string{"--spawn-server", "--agents", "20", "--agents-per-proc", "10", "--interval", "200ms",
		"--host-prefix", "t-", "--web-watchers", "1", "--grpc-watchers", "1", "--log-hosts", "2", "--log-rate", "20",
		"--warmup", "300ms", "--duration", "2s", "--source-ips", "4", "--json", js}, strings.NewReader(""), &stdout, &stderr)
	if code != exitOK {
		t.Fatalf("exit %d\n%s", code, stderr.String())
	}
	b, err := os.ReadFile(js)
	if err != nil {
		t.Fatal(err)
	}
	var rep Report
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("report JSON: %v", err)
	}
	if rep.HeartbeatsHandled <= 0 || rep.HeartbeatsOffered <= 0 {
		t.Errorf("heartbeats offered %.1f/s, handled %.1f/s; want both > 0", rep.HeartbeatsOffered, rep.HeartbeatsHandled)
	}
	if rep.Server.CPUMicrosPerHeartbeat < 0 || rep.Server.RSSEndBytes <= 0 {
		t.Errorf("server figures not measured: %+v", rep.Server)
	}
	// 20 agents, each with at least a handler and grpc-go's reader.
	if rep.Server.GoroutinesPerAgent < 2 || rep.Server.StackPerAgentBytes <= 0 || rep.Server.HeapPerAgentBytes <= 0 || rep.Server.HeapIdlePerAgentBytes < 0 {
		t.Errorf("server's Go runtime figures not read from /metrics: %+v", rep.Server)
	}
	for _, k := range []string{"grpc-web", "grpc"} {
		if rep.HeartbeatLatencyKind[k].Count == 0 {
			t.Errorf("no heartbeat latency samples over %s: %+v", k, rep.HeartbeatLatencyKind)
		}
	}
	if rep.Logs == nil || rep.Logs.LinesStored == 0 || rep.Logs.LineLatency.Count == 0 || rep.Logs.Completed != 2 {
		t.Errorf("log load not measured: %+v", rep.Logs)
	}
	for _, want := range []string{"heartbeats/s handled", "heartbeat→watcher", "log lines", "server CPU per heartbeat", "server Go runtime per agent"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, stdout.String())
		}
	}
}

// TestFloor runs agents against the spawned floor-server and reads its
// heartbeat counter.
func TestFloor(t *testing.T) {
	cfg := small()
	cfg.SpawnFloor = true
	cfg.WebWatchers, cfg.GRPCWatchers = 0, 0
	cfg.Duration = time.Second
	var logs bytes.Buffer
	rep, err := Run(t.Context(), cfg, &logs)
	if err != nil {
		t.Fatalf("run: %v\n%s", err, logs.String())
	}
	if rep.Scenario.Server != "floor" || rep.HeartbeatsHandled <= 0 || rep.Server.CPUPercent < 0 {
		t.Errorf("floor run: server %q, handled %.1f/s, cpu %.1f%%", rep.Scenario.Server, rep.HeartbeatsHandled, rep.Server.CPUPercent)
	}
	if rep.Server.GoroutinesPerAgent <= 0 || rep.Server.StackPerAgentBytes <= 0 || rep.Server.HeapPerAgentBytes <= 0 {
		t.Errorf("floor's Go runtime figures not read: %+v", rep.Server)
	}
}

// TestUsage checks that bad flags are refused with a clear message and the
// usage exit code, and that --help works.
func TestUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
		code int
	}{
		{[]string{"--help"}, "", exitOK},
		{nil, "--spawn-server", exitUsage},
		{[]string{"--spawn-server", "--spawn-floor"}, "exclude each other", exitUsage},
		{[]string{"--spawn-server", "--agents", "0"}, "--agents", exitUsage},
		{[]string{"--spawn-server", "--interval", "1ms"}, "--interval", exitUsage},
		{[]string{"--spawn-floor", "--web-watchers", "1"}, "only receives heartbeats", exitUsage},
		{[]string{"--server", "http://127.0.0.1:1"}, "--admin-token-file", exitUsage},
		{[]string{"--spawn-server", "--agents", "5", "--log-hosts", "6"}, "--log-hosts", exitUsage},
		{[]string{"--restart-at", "5s", "--server", "http://x", "--admin-token-file", "f"}, "--restart-at needs", exitUsage},
		{[]string{"bogus"}, "unknown command", exitUsage},
	} {
		var stdout, stderr bytes.Buffer
		code := Main(t.Context(), tc.args, strings.NewReader(""), &stdout, &stderr)
		if code != tc.code || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%q: exit %d, stderr %q; want exit %d mentioning %q", tc.args, code, stderr.String(), tc.code, tc.want)
		}
	}
}

// TestReportJSON checks the JSON report round-trips.
func TestReportJSON(t *testing.T) {
	r := &Report{HeartbeatLatency: latencyOf([]uint32{1000, 2000, 3000, 100000})}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.HeartbeatLatency.Max != 100 || back.HeartbeatLatency.P50 != 3 {
		t.Errorf("latency round trip: %+v", back.HeartbeatLatency)
	}
}
