package agentapi

import (
	"context"
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/nixplane/nixplane/controlplane/hub"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
)

// serveHTTP serves AgentService through grpc.Server.ServeHTTP behind an
// HTTP/2 TLS server, with CancellableStream as the one port's routes set
// it, and returns the hub and a client connection.
func serveHTTP(t *testing.T, dial ...grpc.DialOption) (*hub.Hub, *grpc.ClientConn) {
	t.Helper()
	gs, _, hb := newAgentServer(t, testOptions{}, "web-1")
	hs := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == agentv1.AgentService_Connect_FullMethodName {
			r = r.WithContext(CancellableStream(r.Context()))
		}
		gs.ServeHTTP(w, r)
	}))
	hs.EnableHTTP2 = true
	hs.StartTLS()
	t.Cleanup(hs.Close)
	conn, err := grpc.NewClient("passthrough:///"+strings.TrimPrefix(hs.URL, "https://"),
		append(dial, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{InsecureSkipVerify: true})))...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })

	return hb, conn
}

// TestServeHTTPKeepsHandlerStatus: over net/http's transport
// (grpc.Server.ServeHTTP, as proxied agents and the one port's HTTP side
// reach it), a status Connect returns itself — here PermissionDenied for a
// hello naming another host — reaches the agent every time.
func TestServeHTTPKeepsHandlerStatus(t *testing.T) {
	ctx := context.Background()
	_, conn := serveHTTP(t)
	const rounds = 100
	wrong := map[string]int{}
	for range rounds {
		sctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, "x-test-host", "web-1"), 10*time.Second)
		stream, err := agentv1.NewAgentServiceClient(conn).Connect(sctx)
		if err != nil {
			cancel()
			t.Fatal(err)
		}
		_ = stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: &agentv1.Hello{Hostname: "web-2", AgentVersion: "1.0.0"}}})
		_, err = stream.Recv()
		cancel()
		if status.Code(err) != codes.PermissionDenied {
			wrong[status.Code(err).String()+": "+err.Error()]++
		}
	}
	if len(wrong) > 0 {
		t.Fatalf("of %d hellos naming another host, these did not end with PermissionDenied: %v", rounds, wrong)
	}
}

// TestServeHTTPShutdownDrainsBlockedWriter: over net/http's transport, a
// session whose agent stopped reading (its flow-control window is full, so
// a Send is blocked in the transport) still ends when the hub closes it:
// the hub drains, instead of waiting for the agent's connection to die.
func TestServeHTTPShutdownDrainsBlockedWriter(t *testing.T) {
	hb, conn := serveHTTP(t, grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := agentv1.NewAgentServiceClient(conn).Connect(metadata.AppendToOutgoingContext(ctx, "x-test-host", "web-1"))
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: &agentv1.Hello{Hostname: "web-1", AgentVersion: "1.0.0"}}}); err != nil {
		t.Fatal(err)
	}
	if m, err := stream.Recv(); err != nil || m.GetWelcome() == nil {
		t.Fatalf("%v %v, want a welcome", m, err)
	}
	// The agent reads nothing more; the server sends until the window is
	// full and a Send blocks.
	c := hb.Conn("web-1")
	var sent atomic.Int64
	go func() {
		big := &agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Welcome{Welcome: &agentv1.Welcome{ServerVersion: strings.Repeat("x", 16<<10)}}}
		for range 64 {
			if c.Send(big) != nil {
				return
			}
			sent.Add(1)
		}
	}()
	last, still := int64(-1), 0
	for deadline := time.Now().Add(10 * time.Second); still < 20; {
		if time.Now().After(deadline) {
			t.Fatal("the server's sends never blocked")
		}
		if n := sent.Load(); n == last {
			still++
		} else {
			last, still = n, 0
		}
		time.Sleep(10 * time.Millisecond)
	}
	if last >= 64 {
		t.Fatal("every send went through; the window never filled")
	}
	hb.CloseAll()
	select {
	case <-hb.Drained():
	case <-time.After(20 * time.Second):
		t.Fatalf("hub not drained 20s after CloseAll; web-1 still connected: %v", hb.Conn("web-1") != nil)
	}
}
