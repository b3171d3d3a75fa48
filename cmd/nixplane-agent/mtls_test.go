package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/fleetapi"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	"github.com/nixplane/nixplane/tests/testpki"
)

// syncBuffer is an io.Writer safe for a process's output and a poller.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestBinaryWithClientCertificate runs the real agent binary against the
// real server started with --agent-client-ca: configured through the
// environment with its certificate it connects; without one it is told
// that the server requires it.
func TestBinaryWithClientCertificate(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildAgent(t)
	origin, _ := fixture(t)
	pki := t.TempDir()
	ca := testpki.NewCA(t, "agents")
	ca.WriteCert(pki, "ca")
	ca.Server().WriteFiles(pki, "server")
	ca.Client("web-1", testpki.DNS("web-1")).WriteFiles(pki, "web-1")

	ctx, cancel := context.WithCancel(context.Background())
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
	tokenFile := filepath.Join(pki, "token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ready, done := make(chan string, 1), make(chan error, 1)
	go func() {
		done <- controlplane.Run(ctx, controlplane.Config{Listen: "127.0.0.1:0", DataDir: data, AdminPassword: "correct horse battery",
			TLSCert: filepath.Join(pki, "server.pem"), TLSKey: filepath.Join(pki, "server.key"), AgentClientCA: filepath.Join(pki, "ca.pem"),
			Out: io.Discard, Log: slog.New(slog.DiscardHandler), Ready: func(a string) { ready <- a }})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server: %v", err)
		}
	})
	var addr string
	select {
	case addr = <-ready:
	case err := <-done:
		t.Fatalf("server did not start: %v", err)
	}

	start := func(withCert bool) *syncBuffer {
		cmd := exec.Command(bin, "--hostname", "web-1", "--state-dir", t.TempDir(), "--interval", "200ms")
		cmd.Env = append(os.Environ(), "NIXPLANE_SERVER=https://"+addr, "NIXPLANE_CA_FILE="+filepath.Join(pki, "ca.pem"),
			"NIXPLANE_TOKEN_FILE="+tokenFile, "NIXPLANE_REPO_URL="+origin, "NIXPLANE_HOST_TYPE=nixos")
		if withCert {
			cmd.Env = append(cmd.Env, "NIXPLANE_TLS_CLIENT_CERT="+filepath.Join(pki, "web-1.pem"), "NIXPLANE_TLS_CLIENT_KEY="+filepath.Join(pki, "web-1.key"))
		}
		out := &syncBuffer{}
		cmd.Stderr = out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		return out
	}

	without := start(false)
	waitFor(t, "the refusal of the agent without a certificate", func() bool {
		return strings.Contains(without.String(), "server rejected the agent client certificate for host web-1") &&
			strings.Contains(without.String(), "this server requires an agent client certificate")
	})
	if strings.Contains(without.String(), "msg=connected") {
		t.Fatalf("the agent without a certificate connected:\n%s", without)
	}
	with := start(true)
	waitFor(t, "the agent with its certificate to connect", func() bool {
		return strings.Contains(with.String(), "msg=connected") && strings.Contains(with.String(), "host_id=web-1")
	})
}

// TestCheckClientCertificateFlags: --check refuses a certificate without
// its key.
func TestCheckClientCertificateFlags(t *testing.T) {
	origin, tok := fixture(t)
	pki := t.TempDir()
	testpki.NewCA(t, "agents").Client("web-1").WriteFiles(pki, "web-1")
	base := []string{"--check", "--hostname", "web-1", "--token-file", tok, "--state-dir", t.TempDir(), "--repo-url", origin, "--server", "https://127.0.0.1:1"}
	if code := run(append(base, "--tls-client-cert", filepath.Join(pki, "web-1.pem"))); code != 1 {
		t.Errorf("--check with a certificate but no key = %d, want 1", code)
	}
}
