package github_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/nixplane/nixplane/agent"
	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/fleetapi"
	"github.com/nixplane/nixplane/controlplane/github"
	"github.com/nixplane/nixplane/controlplane/github/standin"
	"github.com/nixplane/nixplane/controlplane/store"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

var quietLog = slog.New(slog.DiscardHandler)

// The server installs a Deployer as the fleet API's.
var _ fleetapi.Deployer = (*github.Deployer)(nil)

const (
	ghToken  = "ghp_e2e_token"
	deadline = 60 * time.Second
)

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	end := time.Now().Add(deadline)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, msg := cond()
		if ok {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("%s: not reached within %s: %s", what, deadline, msg)
		}
		<-tick.C
	}
}

// world is a fleet origin with a stand-in GitHub API, a server configured
// for it and in-process agents.
type world struct {
	t        *testing.T
	ctx      context.Context
	dir      string
	origin   string
	api      *standin.Server
	apiURL   string
	token    string
	hostToks map[string]string
	addr     string
	conn     *grpc.ClientConn
	prNumber int
	prHead   string
}

func git(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("git", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("git %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// newWorld creates the origin (main with a flake.lock and one directory
// per host), a flake-update PR and an unrelated PR, and registers hosts.
func newWorld(t *testing.T, hosts ...string) *world {
	t.Helper()
	ctx := context.Background()
	w := &world{t: t, ctx: ctx, dir: t.TempDir(), hostToks: map[string]string{}}
	w.origin = filepath.Join(w.dir, "fleet.git")
	git(t, "init", "--quiet", "--bare", "--initial-branch=main", w.origin)
	var err error
	w.api, err = standin.New(standin.Config{Owner: "acme", Repo: "fleet", Origin: w.origin, Token: ghToken, Log: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(w.api.Handler())
	t.Cleanup(srv.Close)
	w.apiURL = srv.URL
	files := map[string]string{"flake.lock": `{"version": 7, "rev": "1"}` + "\n", "README.md": "fleet\n"}
	for _, h := range hosts {
		files["hosts/"+h+"/configuration.nix"] = "{ ... }: { networking.hostName = \"" + h + "\"; }\n"
	}
	if _, err := w.api.CommitFiles(ctx, "main", "", files, "Initial fleet"); err != nil {
		t.Fatal(err)
	}
	if _, err := w.api.CommitFiles(ctx, "docs", "main", map[string]string{"README.md": "fleet!\n"}, "docs"); err != nil {
		t.Fatal(err)
	}
	if _, err := w.api.OpenPR(ctx, standin.PR{Title: "docs: wording", Head: "docs"}); err != nil {
		t.Fatal(err)
	}
	if w.prHead, err = w.api.CommitFiles(ctx, "update-flake-lock", "main", map[string]string{"flake.lock": `{"version": 7, "rev": "2"}` + "\n"}, "flake.lock: Update"); err != nil {
		t.Fatal(err)
	}
	if w.prNumber, err = w.api.OpenPR(ctx, standin.PR{Title: "flake.lock: Update", Labels: []string{"dependencies"}, Head: "update-flake-lock"}); err != nil {
		t.Fatal(err)
	}

	if err := os.MkdirAll(filepath.Join(w.dir, "server"), 0o700); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(ctx, filepath.Join(w.dir, "server", "nixplane.db"), store.WithLogger(quietLog))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, h := range hosts {
		tok := auth.NewSecret(auth.AgentTokenPrefix)
		if err := st.CreateHost(ctx, store.Host{ID: h, Record: &fleetv1.Host{HostId: h, Hostname: h}, CreatedAt: time.Now()}, auth.HashSecret(tok)); err != nil {
			t.Fatal(err)
		}
		w.hostToks[h] = tok
	}
	w.token = auth.NewSecret(auth.APITokenPrefix)
	if err := st.CreateAPIToken(ctx, store.APIToken{Name: "ops", Scope: "operate", Hash: auth.HashSecret(w.token), CreatedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	return w
}

// tokenFile writes the GitHub token to a file and returns its path.
func (w *world) tokenFile(body string) string {
	p := filepath.Join(w.dir, "github-token")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		w.t.Fatal(err)
	}
	return p
}

// config is the server configuration with GitHub pointed at the stand-in.
func (w *world) config() controlplane.Config {
	return controlplane.Config{Listen: "127.0.0.1:0", DataDir: filepath.Join(w.dir, "server"), AdminPassword: "correct horse battery",
		Version: "1.0.0", FleetRepo: w.origin, Branch: "main", TargetPoll: time.Hour, Log: quietLog, Out: io.Discard,
		GitHubRepo: "acme/fleet", GitHubTokenFile: w.tokenFile(ghToken + "\n"), GitHubAPIURL: w.apiURL, GitHubPoll: 200 * time.Millisecond}
}

// start runs the server until the test ends, or until stop is called:
// stop ends it as a signal would and waits for it to return.
func (w *world) start(cfg controlplane.Config) (stop func()) {
	t := w.t
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	errc := make(chan error, 1)
	cfg.Ready = func(a string) { ready <- a }
	go func() { errc <- controlplane.Run(ctx, cfg) }()
	select {
	case w.addr = <-ready:
	case err := <-errc:
		cancel()
		t.Fatalf("server did not start: %v", err)
	case <-time.After(deadline):
		cancel()
		t.Fatal("server did not start in time")
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-errc:
				if err != nil {
					t.Errorf("server: %v", err)
				}
			case <-time.After(deadline):
				t.Error("server did not stop")
			}
		})
	}
	t.Cleanup(stop)
	conn, err := grpc.NewClient(w.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	w.conn = conn
	return stop
}

func (w *world) fleet() (fleetv1.FleetServiceClient, context.Context) {
	return fleetv1.NewFleetServiceClient(w.conn), metadata.AppendToOutgoingContext(w.ctx, "authorization", "Bearer "+w.token)
}

// startAgent runs a real agent in process; rebuild is the body of the
// script standing in for nixos-rebuild.
func (w *world) startAgent(host, rebuild string) {
	t := w.t
	t.Helper()
	dir := filepath.Join(w.dir, "agents", host)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	tokFile := filepath.Join(dir, "token")
	script := filepath.Join(dir, "rebuild")
	if err := os.WriteFile(tokFile, []byte(w.hostToks[host]+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(script, []byte(rebuild), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := agent.Config{Server: "http://" + w.addr, Hostname: host, TokenFile: tokFile, RepoURL: w.origin, Branch: "main",
		StateDir: filepath.Join(dir, "state"), Interval: time.Second, HostType: typesv1.HostType_HOST_TYPE_NIXOS,
		RebuildCommand: script, RebootCommand: []string{"true"}, Version: "1.0.0",
		// A restarted server is found again quickly.
		BackoffInitial: 50 * time.Millisecond, BackoffMax: 500 * time.Millisecond,
		NixCommand: filepath.Join(dir, "no-nix"), CurrentSystem: filepath.Join(dir, "no-current-system")}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = agent.Run(ctx, cfg, quietLog)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

func (w *world) waitOnline(hosts ...string) {
	fc, ctx := w.fleet()
	for _, h := range hosts {
		waitFor(w.t, h+" online", func() (bool, string) {
			r, err := fc.GetHost(ctx, &fleetv1.GetHostRequest{HostId: h})
			return err == nil && r.Host.Online, fmt.Sprint(r, err)
		})
	}
}

func (w *world) waitPending(number int) {
	fc, ctx := w.fleet()
	waitFor(w.t, "pending PR", func() (bool, string) {
		r, err := fc.GetFleetTarget(ctx, &fleetv1.GetFleetTargetRequest{})
		return err == nil && r.PullRequestsConfigured && r.PendingPr.GetNumber() == int32(number), fmt.Sprint(r, err)
	})
}

// scrape returns the /metrics text.
func (w *world) scrape() string {
	req, err := http.NewRequest(http.MethodGet, "http://"+w.addr+"/metrics", nil)
	if err != nil {
		w.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+w.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// series returns the value of an unlabelled series, or -1.
func series(body, name string) float64 {
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}

func (w *world) mainHead() string { return git(w.t, "-C", w.origin, "rev-parse", "main") }

func wantCode(t *testing.T, err error, code codes.Code, contains string) {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != code || !strings.Contains(st.Message(), contains) {
		t.Fatalf("err = %v, want %s containing %q", err, code, contains)
	}
}

const okRebuild = "#!/bin/sh\necho \"rebuild $*\"\n"

func TestMergeAndDeployHaltsOnAFailingHost(t *testing.T) {
	w := newWorld(t, "canary", "web-1", "web-2", "web-3")
	w.start(w.config())
	gate := filepath.Join(w.dir, "gate")
	// The canary's switch waits for the gate, so the run is surely in
	// progress when the second request comes.
	w.startAgent("canary", "#!/bin/sh\nwhile [ ! -e "+gate+" ]; do sleep 0.05; done\necho \"rebuild $*\"\n")
	w.startAgent("web-1", "#!/bin/sh\necho 'error: building the system failed' >&2\nexit 1\n")
	w.startAgent("web-2", okRebuild)
	w.startAgent("web-3", okRebuild)
	w.waitOnline("canary", "web-1", "web-2", "web-3")
	w.waitPending(w.prNumber)
	before := w.mainHead()
	fc, ctx := w.fleet()

	resp, err := fc.MergeAndDeploy(ctx, &fleetv1.MergeAndDeployRequest{PrNumber: int32(w.prNumber), CanaryHostIds: []string{"canary"}, BatchSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	bulk := resp.Bulk
	if bulk.Command != "merge-and-deploy" || bulk.State != fleetv1.BulkState_BULK_STATE_RUNNING || len(bulk.Results) != 4 || bulk.Results[0].HostId != "canary" {
		t.Fatalf("started bulk = %v", bulk)
	}
	merged := w.mainHead()
	if bulk.PrNumber != int32(w.prNumber) || bulk.Commit != merged {
		t.Fatalf("bulk names PR #%d commit %s, want #%d %s", bulk.PrNumber, bulk.Commit, w.prNumber, merged)
	}
	if merged == before {
		t.Fatal("main did not move: the PR was not merged")
	}
	if got := git(t, "-C", w.origin, "show", "main:flake.lock"); got != `{"version": 7, "rev": "2"}` {
		t.Fatalf("main's flake.lock after merge = %q", got)
	}
	if parents := git(t, "-C", w.origin, "rev-list", "--parents", "-n1", "main"); !strings.Contains(parents, w.prHead) {
		t.Fatalf("merge commit %s does not have the PR head %s as parent", parents, w.prHead)
	}

	// A second merge-and-deploy while this one runs is refused.
	_, err = fc.MergeAndDeploy(ctx, &fleetv1.MergeAndDeployRequest{PrNumber: int32(w.prNumber)})
	wantCode(t, err, codes.Aborted, "already running")

	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	var final *fleetv1.BulkCommand
	waitFor(t, "bulk end", func() (bool, string) {
		r, err := fc.GetBulkCommand(ctx, &fleetv1.GetBulkCommandRequest{BulkId: bulk.BulkId})
		if err != nil {
			return false, err.Error()
		}
		final = r.Bulk
		return final.State != fleetv1.BulkState_BULK_STATE_RUNNING, final.String()
	})
	if final.State != fleetv1.BulkState_BULK_STATE_FAILED || !strings.Contains(final.Message, "halted") {
		t.Fatalf("bulk ended %s %q, want FAILED halted", final.State, final.Message)
	}
	results := map[string]*fleetv1.BulkHostResult{}
	for _, r := range final.Results {
		results[r.HostId] = r
	}
	if c := results["canary"].GetCommand(); c.GetState() != typesv1.CommandState_COMMAND_STATE_SUCCEEDED || c.Command != "pull-switch" {
		t.Errorf("canary: %v", results["canary"])
	}
	if c := results["web-1"].GetCommand(); c.GetState() != typesv1.CommandState_COMMAND_STATE_FAILED {
		t.Errorf("web-1: %v, want a failed pull-switch", results["web-1"])
	}
	for _, h := range []string{"web-2", "web-3"} {
		if r := results[h]; r.GetCommand() != nil || !strings.Contains(r.GetMessage(), "halted") {
			t.Errorf("%s: %v, want skipped after the halt", h, r)
		}
	}
	// The canary runs the merged commit; the skipped hosts do not.
	for h, want := range map[string]bool{"canary": true, "web-2": false} {
		r, err := fc.GetHost(ctx, &fleetv1.GetHostRequest{HostId: h})
		if err != nil {
			t.Fatal(err)
		}
		if got := r.Host.Generation == merged; got != want {
			t.Errorf("%s generation %s, merged %s: deployed=%v, want %v", h, r.Host.Generation, merged, got, want)
		}
	}
	// The merged PR is no longer pending; the unrelated one never was.
	waitFor(t, "no pending PR", func() (bool, string) {
		r, err := fc.GetFleetTarget(ctx, &fleetv1.GetFleetTargetRequest{})
		return err == nil && r.PendingPr == nil && r.Target.GetGitCommit() == merged, fmt.Sprint(r, err)
	})
	// Now nothing is pending: a new request is refused, nothing merged.
	_, err = fc.MergeAndDeploy(ctx, &fleetv1.MergeAndDeployRequest{PrNumber: int32(w.prNumber)})
	wantCode(t, err, codes.FailedPrecondition, "no flake-update PR is pending")
}

func TestMergeAndDeployRefusals(t *testing.T) {
	w := newWorld(t, "web-1", "web-2", "idle")
	w.start(w.config())
	w.startAgent("web-1", okRebuild)
	w.startAgent("web-2", okRebuild)
	w.waitOnline("web-1", "web-2")
	w.waitPending(w.prNumber)
	before := w.mainHead()
	fc, ctx := w.fleet()
	n := int32(w.prNumber)

	for _, tc := range []struct {
		name     string
		req      *fleetv1.MergeAndDeployRequest
		code     codes.Code
		contains string
	}{
		{"no number", &fleetv1.MergeAndDeployRequest{}, codes.InvalidArgument, "pr_number"},
		{"wrong number", &fleetv1.MergeAndDeployRequest{PrNumber: 1}, codes.FailedPrecondition, fmt.Sprintf("PR #1 is not the pending flake-update PR (#%d is)", n)},
		{"unknown host", &fleetv1.MergeAndDeployRequest{PrNumber: n, HostIds: []string{"nope"}}, codes.NotFound, "nope"},
		{"offline host", &fleetv1.MergeAndDeployRequest{PrNumber: n, HostIds: []string{"web-1", "idle"}}, codes.FailedPrecondition, "offline host(s): idle"},
		{"duplicate host", &fleetv1.MergeAndDeployRequest{PrNumber: n, HostIds: []string{"web-1", "web-1"}}, codes.InvalidArgument, "twice"},
		{"canary outside", &fleetv1.MergeAndDeployRequest{PrNumber: n, HostIds: []string{"web-1"}, CanaryHostIds: []string{"web-2"}}, codes.InvalidArgument, "not among"},
		{"negative batch", &fleetv1.MergeAndDeployRequest{PrNumber: n, BatchSize: -1}, codes.InvalidArgument, "batch_size"},
	} {
		_, err := fc.MergeAndDeploy(ctx, tc.req)
		st, _ := status.FromError(err)
		if st.Code() != tc.code || !strings.Contains(st.Message(), tc.contains) {
			t.Errorf("%s: err = %v, want %s containing %q", tc.name, err, tc.code, tc.contains)
		}
	}

	// GitHub fails the merge: a clean error, nothing merged, nothing run.
	w.api.SetFault(func(r *http.Request) (int, string) {
		if r.Method == http.MethodPut {
			return http.StatusBadGateway, "server error"
		}
		return 0, ""
	})
	_, err := fc.MergeAndDeploy(ctx, &fleetv1.MergeAndDeployRequest{PrNumber: n})
	wantCode(t, err, codes.Unavailable, "GitHub is unavailable")
	if strings.Contains(status.Convert(err).Message(), ghToken) {
		t.Fatal("the error shows the token")
	}
	// GitHub rejects the token.
	w.api.SetFault(func(r *http.Request) (int, string) { return http.StatusUnauthorized, "Bad credentials" })
	_, err = fc.MergeAndDeploy(ctx, &fleetv1.MergeAndDeployRequest{PrNumber: n})
	wantCode(t, err, codes.FailedPrecondition, "token")
	// Meanwhile the polls fail too: the PR stays, the failures show.
	waitFor(t, "poll failures in /metrics", func() (bool, string) {
		body := w.scrape()
		return series(body, "nixplane_github_poll_failures") >= 2 && series(body, "nixplane_github_pending_pr") == float64(n), body
	})
	w.waitPending(w.prNumber)
	// ... and pages see why, next to the PR they keep.
	waitFor(t, "poll error on the fleet target", func() (bool, string) {
		r, err := fc.GetFleetTarget(ctx, &fleetv1.GetFleetTargetRequest{})
		return err == nil && strings.Contains(r.PullRequestsError, "401") && r.PendingPr.GetNumber() == n &&
			r.PullRequestsCheckedAt != nil, fmt.Sprint(r, err)
	})
	if r, _ := fc.GetFleetTarget(ctx, &fleetv1.GetFleetTargetRequest{}); strings.Contains(r.GetPullRequestsError(), ghToken) {
		t.Fatal("the poll error shows the token")
	}
	w.api.SetFault(nil)
	waitFor(t, "poll recovery in /metrics", func() (bool, string) {
		body := w.scrape()
		return series(body, "nixplane_github_poll_failures") == 0 && series(body, "nixplane_github_last_success_timestamp_seconds") > 0, body
	})
	waitFor(t, "poll error cleared", func() (bool, string) {
		r, err := fc.GetFleetTarget(ctx, &fleetv1.GetFleetTargetRequest{})
		return err == nil && r.PullRequestsError == "", fmt.Sprint(r, err)
	})

	if got := w.mainHead(); got != before {
		t.Fatalf("main moved to %s although every request was refused", got)
	}
	cmds, err := fc.ListCommands(ctx, &fleetv1.ListCommandsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(cmds.Commands) != 0 {
		t.Fatalf("commands ran although every request was refused: %v", cmds.Commands)
	}
	// The PR is still pending and can be deployed afterwards.
	w.waitPending(w.prNumber)
	resp, err := fc.MergeAndDeploy(ctx, &fleetv1.MergeAndDeployRequest{PrNumber: n, HostIds: []string{"web-1", "web-2"}})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "bulk end", func() (bool, string) {
		r, err := fc.GetBulkCommand(ctx, &fleetv1.GetBulkCommandRequest{BulkId: resp.Bulk.BulkId})
		return err == nil && r.Bulk.State == fleetv1.BulkState_BULK_STATE_SUCCEEDED, fmt.Sprint(r, err)
	})
}

func TestMergeAndDeployNotConfigured(t *testing.T) {
	w := newWorld(t, "web-1")
	cfg := w.config()
	cfg.GitHubRepo, cfg.GitHubTokenFile, cfg.GitHubAPIURL = "", "", ""
	w.start(cfg)
	fc, ctx := w.fleet()
	_, err := fc.MergeAndDeploy(ctx, &fleetv1.MergeAndDeployRequest{PrNumber: int32(w.prNumber)})
	wantCode(t, err, codes.Unimplemented, "not configured")
	r, err := fc.GetFleetTarget(ctx, &fleetv1.GetFleetTargetRequest{})
	if err != nil || r.PullRequestsConfigured || r.PendingPr != nil {
		t.Fatalf("GetFleetTarget = %v, %v; want not configured", r, err)
	}
}

func TestBadGitHubConfigStopsTheStart(t *testing.T) {
	w := newWorld(t)
	for name, tc := range map[string]struct {
		mod  func(*controlplane.Config)
		want string
	}{
		"empty token":   {func(c *controlplane.Config) { c.GitHubTokenFile = w.tokenFile("\n") }, "is empty"},
		"missing token": {func(c *controlplane.Config) { c.GitHubTokenFile = filepath.Join(w.dir, "none") }, "read GitHub token file"},
		"no token file": {func(c *controlplane.Config) { c.GitHubTokenFile = "" }, "--github-token-file"},
		"bad repo":      {func(c *controlplane.Config) { c.GitHubRepo = "acme" }, "not owner/name"},
		"no repo":       {func(c *controlplane.Config) { c.GitHubRepo = "" }, "need --github-repo"},
		"bad url":       {func(c *controlplane.Config) { c.GitHubAPIURL = "::" }, "not an http(s) URL"},
	} {
		cfg := w.config()
		tc.mod(&cfg)
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		err := controlplane.Run(ctx, cfg)
		cancel()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Run = %v, want an error containing %q", name, err, tc.want)
		}
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("%s: the server started", name)
		}
	}
}

// TestMergeAndDeployOutlivesItsCaller: a caller that goes away while the
// merge is under way does not cut it short; once GitHub merges, the hosts
// are deployed all the same, never left behind a merged main.
func TestMergeAndDeployOutlivesItsCaller(t *testing.T) {
	w := newWorld(t, "solo")
	w.start(w.config())
	w.startAgent("solo", okRebuild)
	w.waitOnline("solo")
	w.waitPending(w.prNumber)
	fc, ctx := w.fleet()
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	mergePath := "/repos/acme/fleet/pulls/" + strconv.Itoa(w.prNumber) + "/merge"
	w.api.SetFault(func(r *http.Request) (int, string) {
		if r.Method == http.MethodPut && r.URL.Path == mergePath {
			cancel() // the caller gives up while GitHub merges
			select {
			case <-r.Context().Done(): // the server dropped the merge request
			case <-time.After(2 * time.Second):
			}
		}
		return 0, ""
	})
	// The caller sees its own cancellation; what matters is the server.
	_, _ = fc.MergeAndDeploy(cctx, &fleetv1.MergeAndDeployRequest{PrNumber: int32(w.prNumber)})
	waitFor(t, "the merge", func() (bool, string) {
		parents := git(t, "-C", w.origin, "rev-list", "--parents", "-n1", "main")
		return strings.Contains(parents, w.prHead), parents
	})
	waitFor(t, "the deploy to solo", func() (bool, string) {
		r, err := fc.ListCommands(ctx, &fleetv1.ListCommandsRequest{HostId: "solo"})
		if err != nil {
			return false, err.Error()
		}
		for _, c := range r.Commands {
			if c.Command == "pull-switch" && c.BulkId != "" {
				return true, ""
			}
		}
		return false, fmt.Sprint(r.Commands)
	})
}

// TestMergeAndDeployContinuesAfterARestart: the server restarts while the
// canary deploys the merged commit. The new process takes the run over:
// the canary's switch, still running on its host, is waited for, the
// batches left deploy, and GetBulkCommand shows every host's result —
// main is never left merged with the fleet half deployed and nobody
// knowing.
func TestMergeAndDeployContinuesAfterARestart(t *testing.T) {
	w := newWorld(t, "canary", "web-1", "web-2", "web-3")
	cfg := w.config()
	stop := w.start(cfg)
	gate := filepath.Join(w.dir, "gate")
	w.startAgent("canary", "#!/bin/sh\nwhile [ ! -e "+gate+" ]; do sleep 0.05; done\necho \"rebuild $*\"\n")
	for _, h := range []string{"web-1", "web-2", "web-3"} {
		w.startAgent(h, okRebuild)
	}
	w.waitOnline("canary", "web-1", "web-2", "web-3")
	w.waitPending(w.prNumber)
	fc, ctx := w.fleet()
	resp, err := fc.MergeAndDeploy(ctx, &fleetv1.MergeAndDeployRequest{PrNumber: int32(w.prNumber), CanaryHostIds: []string{"canary"}, BatchSize: 2})
	if err != nil {
		t.Fatal(err)
	}
	bulk := resp.Bulk
	merged := w.mainHead()
	var canaryCmd string
	waitFor(t, "the canary deploying", func() (bool, string) {
		r, err := fc.GetBulkCommand(ctx, &fleetv1.GetBulkCommandRequest{BulkId: bulk.BulkId})
		if err != nil {
			return false, err.Error()
		}
		c := r.Bulk.Results[0].GetCommand()
		canaryCmd = c.GetCommandId()
		return c.GetState() == typesv1.CommandState_COMMAND_STATE_RUNNING, r.Bulk.String()
	})

	// The server stops mid-run and starts again on the same data and
	// address; the agents find it again.
	stop()
	cfg.Listen = w.addr
	w.start(cfg)
	fc, ctx = w.fleet()
	w.waitOnline("canary", "web-1", "web-2", "web-3")
	r, err := fc.GetBulkCommand(ctx, &fleetv1.GetBulkCommandRequest{BulkId: bulk.BulkId})
	if err != nil {
		t.Fatalf("GetBulkCommand after the restart: %v", err)
	}
	if r.Bulk.State != fleetv1.BulkState_BULK_STATE_RUNNING || r.Bulk.Commit != merged || r.Bulk.PrNumber != int32(w.prNumber) {
		t.Fatalf("run after the restart = %v", r.Bulk)
	}
	// The continued deploy still holds the merge-and-deploy slot.
	_, err = fc.MergeAndDeploy(ctx, &fleetv1.MergeAndDeployRequest{PrNumber: int32(w.prNumber)})
	wantCode(t, err, codes.Aborted, "already running")

	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	var final *fleetv1.BulkCommand
	waitFor(t, "bulk end", func() (bool, string) {
		r, err := fc.GetBulkCommand(ctx, &fleetv1.GetBulkCommandRequest{BulkId: bulk.BulkId})
		if err != nil {
			return false, err.Error()
		}
		final = r.Bulk
		return final.State != fleetv1.BulkState_BULK_STATE_RUNNING, final.String()
	})
	if final.State != fleetv1.BulkState_BULK_STATE_SUCCEEDED {
		t.Fatalf("bulk ended %s %q, want SUCCEEDED", final.State, final.Message)
	}
	if len(final.Results) != 4 {
		t.Fatalf("bulk has %d results, want 4", len(final.Results))
	}
	for _, res := range final.Results {
		if c := res.GetCommand(); c.GetState() != typesv1.CommandState_COMMAND_STATE_SUCCEEDED || c.Command != "pull-switch" || c.BulkId != bulk.BulkId {
			t.Errorf("%s: %v", res.HostId, res)
		}
		h, err := fc.GetHost(ctx, &fleetv1.GetHostRequest{HostId: res.HostId})
		if err != nil {
			t.Fatal(err)
		}
		if h.Host.Generation != merged {
			t.Errorf("%s runs %s, want the merged %s", res.HostId, h.Host.Generation, merged)
		}
	}
	if got := final.Results[0].GetCommand().GetCommandId(); got != canaryCmd {
		t.Errorf("the canary's result is %s, want its command from before the restart %s (deployed once)", got, canaryCmd)
	}
	cmds, err := fc.ListCommands(ctx, &fleetv1.ListCommandsRequest{HostId: "canary"})
	if err != nil {
		t.Fatal(err)
	}
	var deploys int
	for _, c := range cmds.Commands {
		if c.BulkId == bulk.BulkId {
			deploys++
		}
	}
	if deploys != 1 {
		t.Errorf("the canary ran %d commands of the run, want 1", deploys)
	}
}
