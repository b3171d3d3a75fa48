package cli

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"runtime/metrics"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nixplane/nixplane/controlplane"
)

// syncBuffer is a bytes.Buffer safe for a writer and a reader goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
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

// cliRun runs the command line with extra environment.
func cliRun(ctx context.Context, vars map[string]string, args ...string) (int, string, string) {
	var out, errb syncBuffer
	code := Main(ctx, args, Env{Stdout: &out, Stderr: &errb, Getenv: func(k string) string { return vars[k] }})
	return code, out.String(), errb.String()
}

func TestServeGitHubFlagsNeedAReadableToken(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	token := filepath.Join(dir, "token")
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(token, []byte("ghp_x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, tc := range []struct {
		name string
		vars map[string]string
		args []string
		want string
	}{
		{"no token file", nil, []string{"--github-repo", "acme/fleet"}, "--github-token-file"},
		{"empty token file from env", map[string]string{"NIXPLANE_GITHUB_REPO": "acme/fleet", "NIXPLANE_GITHUB_TOKEN_FILE": empty}, nil, "is empty"},
		{"token without repo", nil, []string{"--github-token-file", empty}, "need --github-repo"},
		{"bad title pattern", nil, []string{"--github-repo", "acme/fleet", "--github-token-file", token, "--github-pr-title", "("}, "PR title pattern"},
		{"bad merge method", nil, []string{"--github-repo", "acme/fleet", "--github-token-file", token, "--github-merge-method", "octopus"}, "merge method"},
	} {
		args := append([]string{"serve", "--listen", "127.0.0.1:0", "--data-dir", filepath.Join(dir, tc.name)}, tc.args...)
		code, _, stderr := cliRun(ctx, tc.vars, args...)
		if code != ExitFailure || !strings.Contains(stderr, tc.want) {
			t.Errorf("%s: exit %d, stderr %q; want exit %d mentioning %q", tc.name, code, stderr, ExitFailure, tc.want)
		}
	}
}

var (
	demoURL = regexp.MustCompile(`Open:\s+(http://\S+)`)
	demoPR  = regexp.MustCompile(`Flake-update PR #(\d+) is pending`)
)

// TestDemoMergeAndDeploy runs the demo and merges its pending PR through
// the command line: the demo's origin gets the merge, every host deploys it.
func TestDemoMergeAndDeploy(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Fatalf("git is required: %v", err)
	}
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	var out, errb syncBuffer
	done := make(chan int, 1)
	go func() {
		done <- Main(ctx, []string{"demo", "--listen", "127.0.0.1:0", "--hosts", "2", "--commit-every", "0", "--data-dir", dir},
			Env{Stdout: &out, Stderr: &errb, Getenv: func(string) string { return "" }})
	}()
	defer func() {
		cancel()
		select {
		case code := <-done:
			if code != ExitOK {
				t.Errorf("demo exited %d: %s", code, errb.String())
			}
		case <-time.After(time.Minute):
			t.Error("demo did not stop")
		}
	}()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var url, pr string
	deadline := time.Now().Add(time.Minute)
	for url == "" || pr == "" {
		if time.Now().After(deadline) {
			t.Fatalf("the demo printed no URL and PR:\n%s\n%s", out.String(), errb.String())
		}
		select {
		case code := <-done:
			t.Fatalf("demo exited %d: %s", code, errb.String())
		case <-tick.C:
		}
		if m := demoURL.FindStringSubmatch(out.String()); m != nil {
			url = m[1]
		}
		if m := demoPR.FindStringSubmatch(out.String()); m != nil {
			pr = m[1]
		}
	}
	code, tok, stderr := cliRun(ctx, nil, "tokens", "create", "ops", "--scope", "operate", "--data-dir", filepath.Join(dir, "server"))
	if code != ExitOK {
		t.Fatalf("tokens create: %d %s", code, stderr)
	}
	vars := map[string]string{"NIXPLANE_TOKEN": strings.TrimSpace(tok), "NIXPLANE_SERVER": url}

	// The server finds the PR on its first poll; the hosts come online.
	var shown string
	for deadline := time.Now().Add(time.Minute); ; {
		_, shown, _ = cliRun(ctx, vars, "pr")
		_, hosts, _ := cliRun(ctx, vars, "hosts")
		if strings.HasPrefix(shown, "#"+pr+" ") && strings.Count(hosts, " true ") == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pr shows %q, hosts %q", shown, hosts)
		}
		<-tick.C
	}
	if !strings.Contains(shown, "flake.lock: Update") || !strings.Contains(shown, "(mergeable)") {
		t.Fatalf("pr shows %q", shown)
	}
	code, _, stderr = cliRun(ctx, vars, "merge-and-deploy", pr)
	if code != ExitOK || !strings.Contains(stderr, "succeeded: 2 host(s) succeeded") {
		t.Fatalf("merge-and-deploy: exit %d: %s", code, stderr)
	}
	msg, err := exec.Command("git", "-C", filepath.Join(dir, "fleet.git"), "log", "-1", "--format=%s", "main").Output()
	if err != nil || !strings.Contains(string(msg), "Merge pull request #"+pr) {
		t.Fatalf("origin main: %q %v", msg, err)
	}
	if _, shown, _ = cliRun(ctx, vars, "pr"); !strings.Contains(shown, "no flake-update PR is pending") {
		t.Fatalf("after the merge pr shows %q", shown)
	}
	if code, _, stderr := cliRun(ctx, vars, "merge-and-deploy", pr); code != ExitFailure || !strings.Contains(stderr, "FailedPrecondition") {
		t.Fatalf("second merge-and-deploy: exit %d: %s", code, stderr)
	}
}

// TestMergeAndDeployUsage: a missing, malformed or out-of-range PR number
// and negative batch settings are usage errors, refused before any call.
func TestMergeAndDeployUsage(t *testing.T) {
	// Nothing listens here: a call that got through would fail as
	// Unavailable (exit 1), not as a usage error (exit 2).
	vars := map[string]string{"NIXPLANE_SERVER": "http://127.0.0.1:1", "NIXPLANE_TOKEN": "t"}
	for _, args := range [][]string{
		{"merge-and-deploy"},
		{"merge-and-deploy", "abc"},
		{"merge-and-deploy", "0"},
		{"merge-and-deploy", "-3"},
		{"merge-and-deploy", "99999999999"},
		{"merge-and-deploy", "1", "2"},
		{"merge-and-deploy", "1", "--batch-size", "-1"},
		{"merge-and-deploy", "1", "--max-failures", "-1"},
		{"pr", "1"},
	} {
		code, _, stderr := cliRun(context.Background(), vars, args...)
		if code != ExitUsage || stderr == "" {
			t.Errorf("%v: exit %d, stderr %q; want a usage error", args, code, stderr)
		}
	}
	if code, _, stderr := cliRun(context.Background(), map[string]string{"NIXPLANE_TOKEN": "t"}, "merge-and-deploy", "1"); code != ExitUsage || !strings.Contains(stderr, "--server") {
		t.Errorf("without a server: exit %d, stderr %q", code, stderr)
	}
}

// TestServeGCPercent: serve sets the process's GC target from --gc-percent
// (default controlplane.DefaultGCPercent), leaves it alone when GOGC is in
// the environment, and refuses a target that is not positive.
func TestServeGCPercent(t *testing.T) {
	gogc := func() uint64 {
		s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
		metrics.Read(s)
		return s[0].Value.Uint64()
	}
	before := debug.SetGCPercent(100)
	t.Cleanup(func() { debug.SetGCPercent(before) })
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		vars map[string]string
		args []string
		want uint64
	}{
		{"flag", nil, []string{"--gc-percent", "37"}, 37},
		{"default", nil, nil, controlplane.DefaultGCPercent},
		{"GOGC wins", map[string]string{"GOGC": "100"}, []string{"--gc-percent", "37"}, 100},
	} {
		debug.SetGCPercent(100)
		ctx, cancel := context.WithCancel(context.Background())
		var out, errb syncBuffer
		done := make(chan int, 1)
		args := append([]string{"serve", "--listen", "127.0.0.1:0", "--data-dir", filepath.Join(dir, tc.name)}, tc.args...)
		go func() {
			done <- Main(ctx, args, Env{Stdout: &out, Stderr: &errb, Getenv: func(k string) string { return tc.vars[k] }})
		}()
		for deadline := time.Now().Add(time.Minute); !strings.Contains(errb.String(), "nixplane serving"); {
			if time.Now().After(deadline) {
				cancel()
				t.Fatalf("%s: the server did not start: %s", tc.name, errb.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
		got := gogc()
		cancel()
		if code := <-done; code != ExitOK {
			t.Errorf("%s: serve exited %d: %s", tc.name, code, errb.String())
		}
		if got != tc.want {
			t.Errorf("%s: GC target %d while serving, want %d", tc.name, got, tc.want)
		}
	}
	code, _, stderr := cliRun(context.Background(), nil, "serve", "--data-dir", dir, "--gc-percent", "0")
	if code != ExitUsage || !strings.Contains(stderr, "--gc-percent") {
		t.Errorf("--gc-percent 0: exit %d, %q; want a usage error", code, stderr)
	}
}
