package controlplane_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/fleetapi"
	"github.com/nixplane/nixplane/controlplane/store"
	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// BenchmarkAgentHeartbeat measures heartbeats end to end through the real
// server on a loopback port: HTTP/2 framing, the agent stream's receive
// loop, validation, the hub and fan-out to native gRPC watchers. Heartbeats
// go one after another on one agent stream; the clock stops when the server
// has counted the last one (and every watcher has seen it). The client runs
// in the same process, so ns/op includes its cost too; use it to profile
// and compare, and nixplane-loadgen for the server's cost alone.
func BenchmarkAgentHeartbeat(b *testing.B) {
	for _, watchers := range []int{0, 1, 10} {
		b.Run(fmt.Sprintf("watchers=%d", watchers), func(b *testing.B) { benchAgentHeartbeat(b, watchers) })
	}
}

func benchAgentHeartbeat(b *testing.B, watchers int) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	quiet := slog.New(slog.DiscardHandler)
	dir := b.TempDir()
	st, err := store.Open(ctx, filepath.Join(dir, "nixplane.db"), store.WithLogger(quiet))
	if err != nil {
		b.Fatal(err)
	}
	_, hostToken, err := fleetapi.RegisterHost(ctx, st, &fleetv1.AddHostRequest{Hostname: "bench"}, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	tokRec, admin, err := fleetapi.NewAPIToken("bench", adminv1.Scope_SCOPE_ADMIN, 0)
	if err != nil {
		b.Fatal(err)
	}
	if err := st.CreateAPIToken(ctx, tokRec); err != nil {
		b.Fatal(err)
	}
	st.Close()

	ready := make(chan string, 1)
	errc := make(chan error, 1)
	go func() {
		errc <- controlplane.Run(ctx, controlplane.Config{Listen: "127.0.0.1:0", DataDir: dir, AdminPassword: "correct horse battery",
			Ready: func(addr string) { ready <- addr }, Log: quiet, Out: io.Discard})
	}()
	var addr string
	select {
	case addr = <-ready:
	case err := <-errc:
		b.Fatalf("server: %v", err)
	}
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait(); <-errc }()

	dial := func() *grpc.ClientConn {
		cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { cc.Close() })
		return cc
	}

	// Watchers remember the send time of the last heartbeat they saw.
	var last []*atomic.Int64
	for range watchers {
		wctx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+admin)
		stream, err := fleetv1.NewFleetServiceClient(dial()).WatchFleet(wctx, &fleetv1.WatchFleetRequest{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := stream.Recv(); err != nil { // the snapshot
			b.Fatal(err)
		}
		seen := &atomic.Int64{}
		last = append(last, seen)
		wg.Go(func() {
			for {
				resp, err := stream.Recv()
				if err != nil {
					return
				}
				for _, ev := range resp.Events {
					if hb := ev.GetHostHeartbeat(); hb != nil {
						seen.Store(hb.SentAt.AsTime().UnixNano())
					}
				}
			}
		})
	}

	actx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+hostToken)
	stream, err := agentv1.NewAgentServiceClient(dial()).Connect(actx)
	if err != nil {
		b.Fatal(err)
	}
	const gen = "0123456789abcdef0123456789abcdef01234567"
	if err := stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: &agentv1.Hello{Hostname: "bench", Generation: gen}}}); err != nil {
		b.Fatal(err)
	}
	if m, err := stream.Recv(); err != nil || m.GetWelcome() == nil {
		b.Fatalf("welcome: %v %v", m, err)
	}
	go func() {
		for {
			if _, err := stream.Recv(); err != nil {
				return
			}
		}
	}()
	base, err := heartbeatsTotal(addr, admin)
	if err != nil {
		b.Fatal(err)
	}
	metrics := &typesv1.Metrics{CpuPercent: 12.5, RamPercent: 40, Load1: 0.7}
	t0 := time.Now()
	var sent int64
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		at := t0.Add(time.Duration(i))
		if err := stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Heartbeat{Heartbeat: &agentv1.Heartbeat{
			Metrics: metrics, Generation: gen, SentAt: timestamppb.New(at)}}}); err != nil {
			b.Fatal(err)
		}
		sent++
	}
	final := t0.Add(time.Duration(b.N - 1)).UnixNano()
	deadline := time.Now().Add(time.Minute)
	for {
		n, err := heartbeatsTotal(addr, admin)
		if err != nil {
			b.Fatal(err)
		}
		done := n-base >= sent
		for _, l := range last {
			done = done && l.Load() == final
		}
		if done {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("server counted %d of %d heartbeats", n-base, sent)
		}
		time.Sleep(time.Millisecond)
	}
	b.StopTimer()
	b.ReportMetric(float64(sent)/b.Elapsed().Seconds(), "heartbeats/s")
	_ = stream.CloseSend()
}

// heartbeatsTotal reads nixplane_heartbeats_total from /metrics.
func heartbeatsTotal(addr, token string) (int64, error) {
	req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "nixplane_heartbeats_total "); ok {
			f, err := strconv.ParseFloat(v, 64)
			return int64(f), err
		}
	}
	return 0, fmt.Errorf("/metrics: %s without nixplane_heartbeats_total", resp.Status)
}
