package session

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/fleetapi"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// onlineHandler is a [Handler] that says when the first heartbeat is
// built, that is when the session was welcomed.
type onlineHandler struct {
	testHandler
	once   sync.Once
	online chan struct{}
}

func (h *onlineHandler) Heartbeat(context.Context) *agentv1.Heartbeat {
	h.once.Do(func() { close(h.online) })
	return &agentv1.Heartbeat{}
}

// TestStoppingServerSuggestsTheReconnectDelay runs the client against the
// real server and stops the server: the retry delay the server sends
// reaches the client through the real transport and sets its wait.
func TestStoppingServerSuggestsTheReconnectDelay(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	data := t.TempDir()
	st, err := controlplane.OpenStore(ctx, data)
	if err != nil {
		t.Fatal(err)
	}
	_, token, err := fleetapi.RegisterHost(ctx, st, &fleetv1.AddHostRequest{Hostname: "web-1"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	st.Close()
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	srvCtx, stopServer := context.WithCancel(ctx)
	ready, done := make(chan string, 1), make(chan error, 1)
	go func() {
		done <- controlplane.Run(srvCtx, controlplane.Config{Listen: "127.0.0.1:0", DataDir: data, AdminPassword: "correct horse battery",
			Out: io.Discard, Log: slog.New(slog.DiscardHandler), Ready: func(a string) { ready <- a }})
	}()
	var addr string
	select {
	case addr = <-ready:
	case err := <-done:
		t.Fatalf("server did not start: %v", err)
	}

	h := &onlineHandler{online: make(chan struct{})}
	c, err := New(Config{Server: "http://" + addr, Hostname: "web-1", TokenFile: tokenFile,
		BackoffInitial: 10 * time.Millisecond, BackoffMax: time.Minute},
		h, NewOutbox(8, filepath.Join(t.TempDir(), "pending"), discard()), discard())
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stopClient := context.WithTimeout(ctx, 60*time.Second)
	defer stopClient()
	planned := recordDelays(c, 1, stopClient)
	runDone := make(chan error, 1)
	go func() { runDone <- c.Run(runCtx) }()
	select {
	case <-h.online:
	case err := <-runDone:
		t.Fatalf("Run ended before the session was welcomed: %v", err)
	}
	stopServer()
	if err := <-done; err != nil {
		t.Fatalf("server: %v", err)
	}
	if err := <-runDone; err != nil {
		t.Fatalf("Run: %v", err)
	}
	// The server suggests 1s to ShutdownRetryMax (10s by default); the
	// client adds up to half again.
	if len(*planned) != 1 || (*planned)[0] < time.Second || (*planned)[0] > 15*time.Second {
		t.Fatalf("planned reconnects %v, want one of 1s to 15s as the server suggested", *planned)
	}
}
