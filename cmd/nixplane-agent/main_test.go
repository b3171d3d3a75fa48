package main

import (
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
	"google.golang.org/grpc"
)

// server is a minimal AgentService: it welcomes every agent, can send one
// command, and records how each stream ended.
type server struct {
	agentv1.UnimplementedAgentServiceServer
	mu      sync.Mutex
	hellos  int
	ends    []error
	command *agentv1.RunCommand
}

func (s *server) Connect(stream agentv1.AgentService_ConnectServer) error {
	if _, err := stream.Recv(); err != nil {
		return err
	}
	if err := stream.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Welcome{Welcome: &agentv1.Welcome{HostId: "web1"}}}); err != nil {
		return err
	}
	s.mu.Lock()
	s.hellos++
	cmd := s.command
	s.mu.Unlock()
	if cmd != nil {
		if err := stream.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Run{Run: cmd}}); err != nil {
			return err
		}
	}
	for {
		if _, err := stream.Recv(); err != nil {
			s.mu.Lock()
			s.ends = append(s.ends, err)
			s.mu.Unlock()
			return nil
		}
	}
}

func (s *server) state() (int, []error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hellos, append([]error(nil), s.ends...)
}

func startServer(t *testing.T, s *server) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	agentv1.RegisterAgentServiceServer(g, s)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	return "http://" + lis.Addr().String()
}

func gitRun(t *testing.T, dir string, args ...string) {
	t.Helper()
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GIT_CONFIG_GLOBAL=/dev/null", "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@t", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@t")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("git %v: %v\n%s", args, err, out)
	}
}

// fixture makes an origin repository and a token file.
func fixture(t *testing.T) (origin, tokenFile string) {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git is not installed")
	}
	dir := t.TempDir()
	origin = filepath.Join(dir, "origin.git")
	work := filepath.Join(dir, "work")
	gitRun(t, dir, "init", "-q", "--bare", "--initial-branch=main", origin)
	gitRun(t, dir, "init", "-q", "--initial-branch=main", work)
	if err := os.WriteFile(filepath.Join(work, "flake.nix"), []byte("{}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	gitRun(t, work, "add", "-A")
	gitRun(t, work, "commit", "-q", "-m", "init")
	gitRun(t, work, "push", "-q", origin, "HEAD:refs/heads/main")
	tokenFile = filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte("tok\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return origin, tokenFile
}

func TestCheck(t *testing.T) {
	origin, tok := fixture(t)
	url := startServer(t, &server{})
	base := []string{"--hostname", "web1", "--token-file", tok, "--state-dir", t.TempDir()}
	if code := run(append(base, "--check", "--server", url, "--repo-url", origin)); code != 0 {
		t.Errorf("check of a good setup = %d, want 0", code)
	}
	if code := run(append(base, "--check", "--server", url, "--repo-url", filepath.Join(t.TempDir(), "nope"))); code != 1 {
		t.Errorf("check with a missing repository = %d, want 1", code)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + lis.Addr().String()
	lis.Close()
	if code := run(append(base, "--check", "--server", dead, "--repo-url", origin)); code != 1 {
		t.Errorf("check with an unreachable server = %d, want 1", code)
	}
	if code := run([]string{"--check", "--hostname", "web1"}); code != 1 {
		t.Errorf("check with missing flags = %d, want 1", code)
	}
}

func TestUsageAndVersion(t *testing.T) {
	if code := run([]string{"--version"}); code != 0 {
		t.Errorf("--version = %d", code)
	}
	if code := run([]string{"--no-such-flag"}); code != 2 {
		t.Errorf("unknown flag = %d, want 2", code)
	}
	if code := run([]string{"--host-type", "windows", "--server", "http://x"}); code != 2 {
		t.Errorf("bad host type = %d, want 2", code)
	}
	t.Setenv("NIXPLANE_INTERVAL", "soon")
	if code := run([]string{"--version"}); code != 2 {
		t.Errorf("bad NIXPLANE_INTERVAL = %d, want 2", code)
	}
}

// buildAgent compiles the real binary (without cgo, as shipped).
func buildAgent(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "nixplane-agent")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestBinarySignalsAndRestartExitCode(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildAgent(t)
	origin, tok := fixture(t)

	start := func(s *server) *exec.Cmd {
		url := startServer(t, s)
		cmd := exec.Command(bin, "--hostname", "web1", "--state-dir", t.TempDir(), "--interval", "200ms")
		// Flags through the environment, as the service units pass them.
		cmd.Env = append(os.Environ(), "NIXPLANE_SERVER="+url, "NIXPLANE_TOKEN_FILE="+tok, "NIXPLANE_REPO_URL="+origin, "NIXPLANE_HOST_TYPE=nixos")
		cmd.Stderr = io.Discard
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		return cmd
	}

	// SIGTERM: the stream is closed cleanly and the exit status is 0.
	s := &server{}
	cmd := start(s)
	waitFor(t, "the agent to connect", func() bool { n, _ := s.state(); return n > 0 })
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("exit after SIGTERM: %v, want status 0", err)
	}
	waitFor(t, "the server to see the stream end", func() bool { _, ends := s.state(); return len(ends) > 0 })
	if _, ends := s.state(); !errors.Is(ends[0], io.EOF) {
		t.Errorf("stream ended with %v, want a clean close", ends[0])
	}

	// A restart command: exit status 101.
	s2 := &server{command: &agentv1.RunCommand{CommandId: "r1", Kind: typesv1.CommandKind_COMMAND_KIND_RESTART}}
	cmd = start(s2)
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 101 {
		t.Errorf("exit after a restart command: %v, want status 101", err)
	}
	// The server's handler records the end on its own goroutine, which may
	// run after the process is gone.
	waitFor(t, "the server to see the stream end after the restart", func() bool { _, ends := s2.state(); return len(ends) > 0 })
	if _, ends := s2.state(); !strings.Contains(ends[0].Error(), "EOF") {
		t.Errorf("stream end after restart: %v", ends)
	}
}
