package session_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixplane/nixplane/agent/session"
	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/fleetapi"
	"github.com/nixplane/nixplane/controlplane/store"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type hostHandler struct{}

func (hostHandler) Hello(context.Context) *agentv1.Hello {
	return &agentv1.Hello{Hostname: "web-1", AgentVersion: "0.1.0", RepoUrl: "https://example.org/fleet.git", Branch: "main"}
}
func (hostHandler) Heartbeat(context.Context) *agentv1.Heartbeat { return &agentv1.Heartbeat{} }
func (hostHandler) Run(*agentv1.RunCommand)                      {}
func (hostHandler) Stop(*agentv1.StopCommand)                    {}
func (hostHandler) Refresh(*agentv1.RefreshStatus)               {}

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
	rec, token, err := fleetapi.NewHost(&fleetv1.AddHostRequest{Hostname: "web-1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.CreateHost(ctx, store.Host{ID: "web-1", Record: rec, CreatedAt: time.Now()}, auth.HashSecret(token)); err != nil {
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

	logs := &lockedBuffer{}
	c, err := session.New(session.Config{Server: "http://" + addr, Hostname: "web-1", TokenFile: tokenFile,
		BackoffInitial: 10 * time.Millisecond, BackoffMax: time.Minute},
		hostHandler{}, session.NewOutbox(8, filepath.Join(t.TempDir(), "pending"), slog.New(slog.DiscardHandler)),
		slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stopClient := context.WithCancel(ctx)
	runDone := make(chan error, 1)
	go func() { runDone <- c.Run(runCtx) }()
	defer func() {
		stopClient()
		if err := <-runDone; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	poll := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s; client log:\n%s", what, logs.String())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	poll("the client to connect", func() bool { return strings.Contains(logs.String(), "msg=connected") })
	stopServer()
	if err := <-done; err != nil {
		t.Fatalf("server: %v", err)
	}
	poll("the reconnect plan", func() bool { return strings.Contains(logs.String(), "msg=reconnecting") })
	line := logs.String()[strings.Index(logs.String(), "msg=reconnecting"):]
	line, _, _ = strings.Cut(line, "\n")
	if !strings.Contains(line, "server_retry_delay=true") || !strings.Contains(line, "Unavailable") {
		t.Errorf("the first reconnect did not follow the server's retry delay: %s", line)
	}
}
