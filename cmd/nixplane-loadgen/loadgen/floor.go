package loadgen

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
)

// FloorServer is the floor: an AgentService that welcomes every agent and
// discards what it sends, counting heartbeats. It does no authentication, no
// registry, no fan-out and no storage, so its CPU per heartbeat is what gRPC
// alone costs; the real server is compared against it.
type FloorServer struct {
	agentv1.UnimplementedAgentServiceServer
	heartbeats atomic.Int64
	connected  atomic.Int64
}

// Heartbeats returns how many heartbeats were received.
func (f *FloorServer) Heartbeats() int64 { return f.heartbeats.Load() }

// Connect implements agentv1.AgentServiceServer.
func (f *FloorServer) Connect(stream agentv1.AgentService_ConnectServer) error {
	m, err := stream.Recv()
	if err != nil {
		return err
	}
	if m.GetHello() == nil {
		return status.Error(codes.InvalidArgument, "the first message must be a hello")
	}
	if err := stream.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Welcome{Welcome: &agentv1.Welcome{
		HostId: m.GetHello().Hostname, ServerVersion: "floor"}}}); err != nil {
		return err
	}
	f.connected.Add(1)
	defer f.connected.Add(-1)
	for {
		m, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if m.GetHeartbeat() != nil {
			f.heartbeats.Add(1)
		}
	}
}

// ServeMetrics writes the counters in the Prometheus text format, under the
// real server's metric names.
func (f *FloorServer) ServeMetrics(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	fmt.Fprintf(w, "nixplane_heartbeats_total %d\nnixplane_agents_connected %d\n", f.heartbeats.Load(), f.connected.Load())
	// The Go runtime's series the server's /metrics has too, for the
	// report's memory breakdown.
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	fmt.Fprintf(w, "go_goroutines %d\ngo_memstats_stack_inuse_bytes %d\ngo_memstats_heap_inuse_bytes %d\ngo_memstats_heap_idle_bytes %d\ngo_memstats_heap_released_bytes %d\n",
		runtime.NumGoroutine(), ms.StackInuse, ms.HeapInuse, ms.HeapIdle, ms.HeapReleased)
}

// ServeFloor serves f on ln until ctx ends: through net/http with h2c, as
// the real server serves agents, or with grpc.Server.Serve when native.
// When metrics is not nil, /metrics is served there.
func ServeFloor(ctx context.Context, f *FloorServer, ln, metrics net.Listener, native bool) error {
	gs := grpc.NewServer()
	agentv1.RegisterAgentServiceServer(gs, f)
	g, ctx := errgroup.WithContext(ctx)
	var servers []*http.Server
	if native {
		g.Go(func() error { return gs.Serve(ln) })
	} else {
		var protos http.Protocols
		protos.SetHTTP1(true)
		protos.SetUnencryptedHTTP2(true)
		hs := &http.Server{Protocols: &protos, ReadHeaderTimeout: 10 * time.Second,
			Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
					gs.ServeHTTP(w, r)
					return
				}
				http.NotFound(w, r)
			}),
			HTTP2: &http.HTTP2Config{MaxConcurrentStreams: 250}}
		servers = append(servers, hs)
		g.Go(func() error { return ignoreClosed(hs.Serve(ln)) })
	}
	if metrics != nil {
		mux := http.NewServeMux()
		mux.HandleFunc("GET /metrics", f.ServeMetrics)
		ms := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		servers = append(servers, ms)
		g.Go(func() error { return ignoreClosed(ms.Serve(metrics)) })
	}
	g.Go(func() error {
		<-ctx.Done()
		gs.Stop()
		for _, s := range servers {
			_ = s.Close()
		}
		return nil
	})
	err := g.Wait()
	if errors.Is(err, grpc.ErrServerStopped) {
		err = nil
	}
	return err
}

func ignoreClosed(err error) error {
	if errors.Is(err, http.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

func floorCmd(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("floor-server", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:8090", "address for AgentService")
	metricsAddr := fs.String("metrics-listen", "", "address for /metrics (heartbeat counter); empty: none")
	native := fs.Bool("native", false, "serve with grpc.Server.Serve instead of net/http h2c (the real server's transport)")
	fs.Usage = func() {
		fmt.Fprint(stderr, "nixplane-loadgen floor-server: a receive-only AgentService; it welcomes every agent, accepts any token,\n"+
			"and discards what agents send. The floor against which the real server's cost is compared.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usagef("%v", err)
	}
	raiseFileLimit(1 << 20)
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	var mln net.Listener
	if *metricsAddr != "" {
		if mln, err = net.Listen("tcp", *metricsAddr); err != nil {
			ln.Close()
			return err
		}
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	log.Info("floor-server listening", "addr", ln.Addr().String(), "native", *native)
	return ServeFloor(ctx, &FloorServer{}, ln, mln, *native)
}
