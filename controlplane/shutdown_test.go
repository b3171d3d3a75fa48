package controlplane

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// stormAgent is an agent that reconnects at once whenever its stream ends,
// the worst case for a stopping server. It records whether it was welcomed
// on a stream it opened after being told the server is shutting down.
type stormAgent struct {
	host, tok string
	conn      *grpc.ClientConn

	welcomes       atomic.Int64
	toldShutdown   atomic.Bool
	welcomedAfter  atomic.Bool
	retryInfoSeen  atomic.Bool
	shutdownStatus atomic.Value // string: the status of the shutdown answer
}

func (a *stormAgent) run(ctx context.Context) {
	hello := &agentv1.Hello{Hostname: a.host, AgentVersion: "1.0.0", Generation: agentGen, LockHash: agentLock, OsVersion: "NixOS 26.05"}
	for ctx.Err() == nil {
		told := a.toldShutdown.Load()
		err := func() error {
			sctx, cancel := context.WithCancel(ctx)
			defer cancel()
			stream, err := agentv1.NewAgentServiceClient(a.conn).Connect(withToken(sctx, a.tok))
			if err != nil {
				return err
			}
			if err := stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: hello}}); err != nil {
				_, err = stream.Recv()
				return err
			}
			m, err := stream.Recv()
			if err != nil {
				return err
			}
			if m.GetWelcome() != nil {
				a.welcomes.Add(1)
				if told {
					a.welcomedAfter.Store(true)
				}
			}
			for {
				if _, err := stream.Recv(); err != nil {
					return err
				}
			}
		}()
		if st, ok := status.FromError(err); ok && st.Code() == codes.Unavailable && st.Message() == "server shutting down" {
			a.toldShutdown.Store(true)
			a.shutdownStatus.Store(st.Code().String())
			for _, d := range st.Details() {
				if ri, ok := d.(*errdetails.RetryInfo); ok && ri.GetRetryDelay().AsDuration() >= time.Second {
					a.retryInfoSeen.Store(true)
				}
			}
		}
		// Reconnect at once: no backoff, so a server that still accepts
		// streams while stopping is caught.
		select {
		case <-ctx.Done():
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// TestShutdownWithReconnectingAgents: a server whose agents reconnect as
// soon as it closes them still stops, and welcomes none of them again once
// it has told them it is shutting down.
func TestShutdownWithReconnectingAgents(t *testing.T) {
	const n = 120
	hosts := make([]string, n)
	for i := range hosts {
		hosts[i] = fmt.Sprintf("storm-%03d", i)
	}
	f := seed(t, hosts...)
	srv := start(t, f.dir)

	// Several client connections, each carrying many agent streams, as
	// agents behind one NAT or a load generator do.
	conns := make([]*grpc.ClientConn, 8)
	for i := range conns {
		c, err := grpc.NewClient(srv.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	agents := make([]*stormAgent, n)
	for i, h := range hosts {
		a := &stormAgent{host: h, tok: f.agentToken[h], conn: conns[i%len(conns)]}
		agents[i] = a
		wg.Go(func() { a.run(ctx) })
	}

	// Every agent welcomed, and the fleet watcher agrees they are online.
	fc := fleetv1.NewFleetServiceClient(conns[0])
	deadline := time.Now().Add(30 * time.Second)
	for {
		online := 0
		for _, hst := range mustListHosts(t, fc, f.readToken) {
			if hst.Online {
				online++
			}
		}
		if online == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d agents online", online, n)
		}
		time.Sleep(20 * time.Millisecond)
	}

	// stop cancels Run and fails the test unless it returns within its
	// generous deadline.
	srv.stop()

	told, retry := 0, 0
	for _, a := range agents {
		if a.welcomedAfter.Load() {
			t.Errorf("agent %s was welcomed again after the server told it it was shutting down", a.host)
		}
		if a.toldShutdown.Load() {
			told++
		}
		if a.retryInfoSeen.Load() {
			retry++
		}
	}
	// Every session was open when the server stopped; each must have been
	// told why it ended, with a retry hint.
	if told != n || retry != n {
		t.Fatalf("%d of %d agents were told the server is shutting down, %d with a retry delay", told, n, retry)
	}
}

func mustListHosts(t *testing.T, fc fleetv1.FleetServiceClient, tok string) []*fleetv1.Host {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := fc.ListHosts(withToken(ctx, tok), &fleetv1.ListHostsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return r.Hosts
}
