package loadgen

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/agent/session"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// HostToken is a simulated host and its agent token.
type HostToken struct {
	Name  string `json:"name"`
	Token string `json:"token"`
}

// agentSpec is what one process of agents runs; a worker process reads it as
// JSON from the first line of its standard input.
type agentSpec struct {
	// Addr is the server's host:port.
	Addr     string        `json:"addr"`
	Hosts    []HostToken   `json:"hosts"`
	Interval time.Duration `json:"interval"`
	Jitter   float64       `json:"jitter"`
	// LogHosts name the hosts that stream output when asked to run a
	// command; LogRate is their lines per second.
	LogHosts []string `json:"log_hosts"`
	LogRate  float64  `json:"log_rate"`
	// SourceIPs and IPOffset choose each connection's 127.0.0.x source.
	SourceIPs int `json:"source_ips"`
	IPOffset  int `json:"ip_offset"`
}

// agentStats are one process's agent counters; a worker prints snapshots of
// them as JSON lines.
type agentStats struct {
	HBSent     atomic.Int64 `json:"-"`
	Welcomes   atomic.Int64 `json:"-"`
	Reconnects atomic.Int64 `json:"-"`
	ConnErrors atomic.Int64 `json:"-"`
	Online     atomic.Int64 `json:"-"`
	LinesSent  atomic.Int64 `json:"-"`
	Runs       atomic.Int64 `json:"-"`
	Results    atomic.Int64 `json:"-"`
}

// statsSnap is a copy of agentStats at one instant.
type statsSnap struct {
	HBSent     int64 `json:"hb_sent"`
	Welcomes   int64 `json:"welcomes"`
	Reconnects int64 `json:"reconnects"`
	ConnErrors int64 `json:"conn_errors"`
	Online     int64 `json:"online"`
	LinesSent  int64 `json:"lines_sent"`
	Runs       int64 `json:"runs"`
	Results    int64 `json:"results"`
}

func (s *agentStats) snap() statsSnap {
	return statsSnap{HBSent: s.HBSent.Load(), Welcomes: s.Welcomes.Load(), Reconnects: s.Reconnects.Load(),
		ConnErrors: s.ConnErrors.Load(), Online: s.Online.Load(), LinesSent: s.LinesSent.Load(), Runs: s.Runs.Load(), Results: s.Results.Load()}
}

func (a statsSnap) add(b statsSnap) statsSnap {
	return statsSnap{a.HBSent + b.HBSent, a.Welcomes + b.Welcomes, a.Reconnects + b.Reconnects, a.ConnErrors + b.ConnErrors,
		a.Online + b.Online, a.LinesSent + b.LinesSent, a.Runs + b.Runs, a.Results + b.Results}
}

// Fixed identity of every simulated host: heartbeats repeat the hello's
// generation and lock hash, so they carry live data only, as in a quiet
// fleet.
const (
	simGeneration = "0123456789abcdef0123456789abcdef01234567"
	simLockHash   = "89abcdef0123456789abcdef0123456789abcdef0123456789abcdef01234567"
)

// sourceDialer returns a dialer that binds connection i to 127.0.0.(2+i%n)
// (or lets the kernel choose when n is 0), so tens of thousands of
// connections to one server port do not run out of source ports.
func sourceDialer(n, i int) func(ctx context.Context, addr string) (net.Conn, error) {
	d := &net.Dialer{Control: bindNoPort}
	if n > 0 {
		d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(2+i%n))}
	}
	return func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }
}

// runAgents runs spec's agents until ctx ends. Closing logStop ends every
// streamed command (the agents send their results).
func runAgents(ctx context.Context, spec agentSpec, st *agentStats, logStop <-chan struct{}) {
	logHosts := map[string]bool{}
	for _, h := range spec.LogHosts {
		logHosts[h] = true
	}
	var wg sync.WaitGroup
	for i, h := range spec.Hosts {
		a := &simAgent{spec: &spec, host: h, st: st, logs: logHosts[h.Name], logStop: logStop,
			dial: sourceDialer(spec.SourceIPs, spec.IPOffset+i)}
		wg.Go(func() { a.run(ctx) })
		// Pace the connects a little: a burst of thousands of handshakes
		// at once only measures the accept queue.
		if i%200 == 199 {
			select {
			case <-ctx.Done():
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	wg.Wait()
}

// simAgent is one simulated agent: it keeps one connection and reconnects
// with exponential backoff and full jitter, like nixplane-agent, waiting at
// least the retry delay a stopping server suggests ([session.ReconnectDelay]).
type simAgent struct {
	spec    *agentSpec
	host    HostToken
	st      *agentStats
	logs    bool
	logStop <-chan struct{}
	dial    func(ctx context.Context, addr string) (net.Conn, error)
	// timer starts the wait before a reconnect (nil: a real timer); tests
	// set it to see the planned delays.
	timer func(time.Duration) (<-chan time.Time, func() bool)
}

// maxReconnectWait caps a simulated agent's wait between sessions, the
// server's suggested delay included.
const maxReconnectWait = 30 * time.Second

func (a *simAgent) run(ctx context.Context) {
	cc, err := grpc.NewClient("passthrough:///"+a.spec.Addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(a.dial),
		grpc.WithSharedWriteBuffer(true),
		grpc.WithReadBufferSize(8<<10),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: time.Second, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 30 * time.Second},
			MinConnectTimeout: 20 * time.Second}))
	if err != nil {
		a.st.ConnErrors.Add(1)
		return
	}
	defer cc.Close()
	client := agentv1.NewAgentServiceClient(cc)
	welcomed := false
	wait := time.Second
	timer := a.timer
	if timer == nil {
		timer = func(d time.Duration) (<-chan time.Time, func() bool) {
			t := time.NewTimer(d)
			return t.C, t.Stop
		}
	}
	for ctx.Err() == nil {
		ok, err := a.session(ctx, client, welcomed)
		if ok {
			welcomed = true
			wait = time.Second
		} else {
			a.st.ConnErrors.Add(1)
		}
		d, _ := session.ReconnectDelay(rand.N(wait)+10*time.Millisecond, err, maxReconnectWait)
		fire, stop := timer(d)
		select {
		case <-ctx.Done():
			stop()
			return
		case <-fire:
		}
		wait = min(wait*2, maxReconnectWait)
	}
}

// session runs one stream; it reports whether the server welcomed it and
// the error that ended the stream (which may carry a retry delay).
func (a *simAgent) session(ctx context.Context, client agentv1.AgentServiceClient, reconnect bool) (bool, error) {
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+a.host.Token))
	defer cancel()
	stream, err := client.Connect(ctx)
	if err != nil {
		return false, err
	}
	hello := &agentv1.Hello{Hostname: a.host.Name, HostType: typesv1.HostType_HOST_TYPE_NIXOS, AgentVersion: "0.1.0",
		OsVersion: "NixOS 25.11 (loadgen)", NixpkgsVersion: "25.11", Generation: simGeneration, LockHash: simLockHash,
		RepoUrl: "https://example.invalid/fleet.git", Branch: "main", HeartbeatInterval: durationpb.New(a.spec.Interval),
		GenerationMessage: "simulated host"}
	if err := stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: hello}}); err != nil {
		if errors.Is(err, io.EOF) {
			_, err = stream.Recv() // the server's status
		}
		return false, err
	}
	first, err := stream.Recv()
	if err != nil {
		return false, err
	}
	if first.GetWelcome() == nil {
		return false, fmt.Errorf("first message from the server is %T, want a Welcome", first.GetMsg())
	}
	a.st.Welcomes.Add(1)
	if reconnect {
		a.st.Reconnects.Add(1)
	}
	a.st.Online.Add(1)
	defer a.st.Online.Add(-1)

	var sendMu sync.Mutex
	send := func(m *agentv1.ConnectRequest) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return stream.Send(m)
	}
	var running atomic.Pointer[string]
	recvDone := make(chan struct{})
	var recvErr error // written before recvDone closes
	go func() {
		defer close(recvDone)
		for {
			m, err := stream.Recv()
			if err != nil {
				recvErr = err
				cancel()
				return
			}
			switch x := m.Msg.(type) {
			case *agentv1.ConnectResponse_Run:
				a.st.Runs.Add(1)
				id := x.Run.CommandId
				running.Store(&id)
				go func() {
					a.emit(ctx, send, x.Run)
					running.Store(nil)
				}()
			case *agentv1.ConnectResponse_Refresh:
				_ = send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Status{Status: &agentv1.StatusReport{
					RequestId: x.Refresh.RequestId, Generation: simGeneration, LockHash: simLockHash}}})
			}
		}
	}()
	metrics := &typesv1.Metrics{CpuPercent: rand.Float64() * 100, RamPercent: rand.Float64() * 100, Load1: rand.Float64() * 4}
	for {
		hb := &agentv1.Heartbeat{Metrics: metrics, Generation: simGeneration, LockHash: simLockHash, SentAt: timestamppb.Now()}
		if id := running.Load(); id != nil {
			hb.RunningCommandId = *id
		}
		if err := send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Heartbeat{Heartbeat: hb}}); err != nil {
			if errors.Is(err, io.EOF) {
				// The server ended the stream: receive its status (which
				// may carry a retry delay) rather than cancel it away.
				<-recvDone
			}
			break
		}
		a.st.HBSent.Add(1)
		d := a.spec.Interval
		if j := a.spec.Jitter; j > 0 {
			d = time.Duration(float64(d) * (1 - j + 2*j*rand.Float64()))
		}
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			<-recvDone
			return true, recvErr
		case <-t.C:
		}
	}
	cancel()
	<-recvDone
	return true, recvErr
}

// emit answers a RunCommand: a log host prints lines at the configured rate
// until the log phase ends, others finish at once; then the result.
func (a *simAgent) emit(ctx context.Context, send func(*agentv1.ConnectRequest) error, run *agentv1.RunCommand) {
	var seq uint64
	if a.logs {
		tick := time.NewTicker(time.Duration(float64(time.Second) / a.spec.LogRate))
		defer tick.Stop()
		pad := strings.Repeat("·", 40)
	loop:
		for {
			select {
			case <-ctx.Done():
				return
			case <-a.logStop:
				break loop
			case <-tick.C:
			}
			seq++
			line := &typesv1.OutputLine{Seq: seq, Stream: typesv1.OutputStream_OUTPUT_STREAM_STDOUT, Time: timestamppb.Now(),
				Text: fmt.Sprintf("building /nix/store/%s-step-%d.drv %s", simGeneration[:32], seq, pad)}
			if err := send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Output{Output: &agentv1.CommandOutput{
				CommandId: run.CommandId, Lines: []*typesv1.OutputLine{line}}}}); err != nil {
				return
			}
			a.st.LinesSent.Add(1)
		}
	}
	if err := send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Result{Result: &agentv1.CommandResult{
		CommandId: run.CommandId, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED, Generation: simGeneration, Kind: run.Kind, LastSeq: seq}}}); err == nil {
		a.st.Results.Add(1)
	}
}
