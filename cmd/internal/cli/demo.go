package cli

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/nixplane/nixplane/agent"
	"github.com/nixplane/nixplane/cmd/internal/buildinfo"
	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/github/standin"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// demoHost is one simulated host of the demo fleet.
type demoHost struct {
	name, location, device string
	hostType               typesv1.HostType
	color                  string
	failingTest            bool
}

var demoFleet = []demoHost{
	{"web-1", "cloud", "server", typesv1.HostType_HOST_TYPE_NIXOS, "#7aa2f7", false},
	{"web-2", "cloud", "server", typesv1.HostType_HOST_TYPE_NIXOS, "#7dcfff", false},
	{"db-1", "office", "server", typesv1.HostType_HOST_TYPE_NIXOS, "#e0af68", true},
	{"studio", "home", "desktop", typesv1.HostType_HOST_TYPE_NIXOS, "#9ece6a", false},
	{"mac-1", "home", "laptop", typesv1.HostType_HOST_TYPE_DARWIN, "#bb9af7", false},
	{"pi-1", "home", "server", typesv1.HostType_HOST_TYPE_NIXOS, "#f7768e", false},
	{"build-1", "office", "server", typesv1.HostType_HOST_TYPE_NIXOS, "#73daca", false},
	{"laptop-2", "travel", "laptop", typesv1.HostType_HOST_TYPE_HOME_MANAGER, "#ff9e64", false},
}

// demoRebuild stands in for nixos-rebuild / darwin-rebuild / home-manager in
// the demo only: it prints a plausible build log over a few seconds.
const demoRebuild = `#!/bin/sh
# nixplane demo: simulated rebuild tool ($@)
echo "building the system configuration..."
for i in 1 2 3 4 5 6; do
  echo "these derivations will be built: /nix/store/demo$i-unit-$i.drv"
  sleep 0.5
  echo "building '/nix/store/demo$i-unit-$i.drv'... [$i/6]"
done
echo "activating the configuration..." >&2
sleep 0.5
echo "switch done ($*)"
`

// demo runs a server and a simulated fleet backed by real git repositories.
func demo(ctx context.Context, args []string, env Env) error {
	f := newFlags("demo", env)
	listen := f.String("listen", "127.0.0.1:8080", "address to serve on")
	dataDir := f.String("data-dir", "", "where the demo keeps its database and repositories (default: a new temporary directory)")
	n := f.Int("hosts", 6, fmt.Sprintf("number of simulated hosts (1–%d)", len(demoFleet)))
	every := f.Duration("commit-every", 3*time.Minute, "push a new commit to the fleet repository this often (0: never)")
	level := f.String("log-level", "warn", "log level")
	if pos, err := f.parse(args); err != nil {
		return err
	} else if len(pos) > 0 {
		return usagef("demo takes no arguments")
	}
	if *n < 1 || *n > len(demoFleet) {
		return usagef("--hosts must be 1 to %d", len(demoFleet))
	}
	if _, err := exec.LookPath("git"); err != nil {
		return fmt.Errorf("the demo needs git on PATH: %w", err)
	}
	dir := *dataDir
	if dir == "" {
		var err error
		if dir, err = os.MkdirTemp("", "nixplane-demo-"); err != nil {
			return err
		}
	}
	log := logger(env.Stderr, *level)
	fleet, err := newDemoRepo(ctx, dir, demoFleet[:*n])
	if err != nil {
		return fmt.Errorf("create the demo fleet repository: %w", err)
	}
	password := env.Getenv("NIXPLANE_ADMIN_PASSWORD")
	if password == "" {
		var b [9]byte
		_, _ = rand.Read(b[:])
		password = base64.RawURLEncoding.EncodeToString(b[:])
	}
	// Register hosts (offline) before the server starts.
	tokens := map[string]string{}
	for _, h := range demoFleet[:*n] {
		tokPath := filepath.Join(dir, "agents", h.name, "token")
		if b, err := os.ReadFile(tokPath); err == nil {
			tokens[h.name] = strings.TrimSpace(string(b))
			continue
		}
		tok, err := addHostOffline(ctx, filepath.Join(dir, "server"), &fleetv1.AddHostRequest{Hostname: h.name, HostType: h.hostType,
			Location: h.location, DeviceType: h.device, ThemeColor: h.color})
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(tokPath), 0o700); err != nil {
			return err
		}
		if err := os.WriteFile(tokPath, []byte(tok+"\n"), 0o600); err != nil {
			return err
		}
		tokens[h.name] = tok
	}
	rebuild := filepath.Join(dir, "demo-rebuild")
	if err := os.WriteFile(rebuild, []byte(demoRebuild), 0o755); err != nil {
		return err
	}

	g, gctx := errgroup.WithContext(ctx)
	gh, err := fleet.startGitHub(gctx, g, dir, log)
	if err != nil {
		return fmt.Errorf("start the GitHub stand-in: %w", err)
	}
	prNumber, err := fleet.openFlakeUpdate(gctx)
	if err != nil {
		return fmt.Errorf("open the demo flake-update PR: %w", err)
	}
	ready := make(chan string, 1)
	g.Go(func() error {
		return controlplane.Run(gctx, controlplane.Config{Listen: *listen, DataDir: filepath.Join(dir, "server"), AdminPassword: password,
			Version: buildinfo.Version, FleetRepo: fleet.origin, Branch: "main", TargetPoll: 15 * time.Second, Log: log,
			GitHubRepo: demoGitHubRepo, GitHubTokenFile: gh.tokenFile, GitHubAPIURL: gh.url, GitHubPoll: 5 * time.Second,
			Out: env.Stderr, Ready: func(a string) { ready <- a }})
	})
	var addr string
	select {
	case addr = <-ready:
	case <-gctx.Done():
		return g.Wait()
	}
	url := "http://" + addr
	for _, h := range demoFleet[:*n] {
		cfg := agent.Config{Server: url, Hostname: h.name, TokenFile: filepath.Join(dir, "agents", h.name, "token"), RepoURL: fleet.origin,
			Branch: "main", StateDir: filepath.Join(dir, "agents", h.name), Interval: 2 * time.Second, HostType: h.hostType,
			Location: h.location, DeviceType: h.device, ThemeColor: h.color, RebuildCommand: rebuild,
			RebootCommand: []string{"true"}, Version: buildinfo.Version, SourceCommit: buildinfo.SourceCommit(),
			NixCommand: filepath.Join(dir, "no-nix")}
		alog := log.With("agent", h.name)
		g.Go(func() error {
			for {
				err := agent.Run(gctx, cfg, alog)
				if gctx.Err() != nil {
					return nil
				}
				// A simulated "restart agent" or "reboot": come back, like a
				// service manager would.
				alog.Info("agent exited; restarting it", "err", err)
				select {
				case <-gctx.Done():
					return nil
				case <-time.After(time.Second):
				}
			}
		})
	}
	if *every > 0 {
		g.Go(func() error { fleet.commitLoop(gctx, *every, log); return nil })
	}
	fmt.Fprintf(env.Stdout, `
nixplane demo is running with %d simulated hosts.

  Open:      %s
  Log in:    admin / %s
  Data:      %s
  Fleet repo (bare origin): %s

A new commit lands in the fleet repository every %s, turning Git outdated;
pull and switch from the page (or: nixplane run pull-switch --all --server %s).
db-1 has a failing test.

Flake-update PR #%d is pending on a local stand-in for GitHub (%s, repo %s):
Merge & Deploy it from the page (or: nixplane merge-and-deploy %d --server %s).
Merging is real git on the fleet repository; another lock update opens as a
new PR later. Press Ctrl-C to stop.
`, *n, url, password, dir, fleet.origin, *every, url, prNumber, gh.url, demoGitHubRepo, prNumber, url)
	return g.Wait()
}

// demoRepo is the demo's fleet repository: a bare origin and a work tree
// that pushes to it, and the GitHub stand-in over the origin.
type demoRepo struct {
	origin, work string
	n            int
	gh           *standin.Server
}

// demoGitHubRepo is the repository name the demo's GitHub stand-in serves.
const demoGitHubRepo = "demo/fleet"

// demoGitHub is the running GitHub stand-in.
type demoGitHub struct {
	url, tokenFile string
}

// startGitHub serves the GitHub REST API stand-in over the origin on a
// loopback port until gctx ends; its token is written next to the data.
func (r *demoRepo) startGitHub(gctx context.Context, g *errgroup.Group, dir string, log *slog.Logger) (*demoGitHub, error) {
	var b [18]byte
	_, _ = rand.Read(b[:])
	token := "demo_" + base64.RawURLEncoding.EncodeToString(b[:])
	tokenFile := filepath.Join(dir, "github-token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	url := "http://" + ln.Addr().String()
	owner, name, _ := strings.Cut(demoGitHubRepo, "/")
	r.gh, err = standin.New(standin.Config{Owner: owner, Repo: name, Origin: r.origin, Token: token, BaseURL: url, Log: log.With("component", "github-standin")})
	if err != nil {
		ln.Close()
		return nil, err
	}
	srv := &http.Server{Handler: r.gh.Handler(), ReadHeaderTimeout: 10 * time.Second}
	g.Go(func() error {
		if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed {
			return err
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(ctx)
	})
	return &demoGitHub{url: url, tokenFile: tokenFile}, nil
}

// openFlakeUpdate opens a flake-update PR (a branch off main that changes
// flake.lock) unless one is open; it returns the open one's number. An
// unrelated documentation PR is opened beside the first, so the page shows
// that only the lock update is picked.
func (r *demoRepo) openFlakeUpdate(ctx context.Context) (int, error) {
	for _, p := range r.gh.OpenPRs() {
		if p.Head == "update-flake-lock" {
			return p.Number, nil
		}
	}
	if _, ok := r.gh.PR(1); !ok {
		if _, err := r.gh.CommitFiles(ctx, "docs-layout", "main", map[string]string{"docs/LAYOUT.md": "hosts/<name>/ holds each host's configuration.\n"}, "docs: describe the layout"); err != nil {
			return 0, err
		}
		if _, err := r.gh.OpenPR(ctx, standin.PR{Title: "docs: describe the fleet layout", Head: "docs-layout"}); err != nil {
			return 0, err
		}
	}
	lockN := 100 + r.n*1000 + int(time.Now().Unix()%1000)
	if _, err := r.gh.CommitFiles(ctx, "update-flake-lock", "main", map[string]string{"flake.lock": demoLock(lockN)}, "flake.lock: Update\n\nnixpkgs moved forward."); err != nil {
		return 0, err
	}
	return r.gh.OpenPR(ctx, standin.PR{Title: "flake.lock: Update", Labels: []string{"dependencies"}, Head: "update-flake-lock"})
}

func gitRun(ctx context.Context, dir string, args ...string) error {
	cmd := exec.CommandContext(ctx, "git", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=nixplane demo", "GIT_AUTHOR_EMAIL=demo@nixplane.invalid",
		"GIT_COMMITTER_NAME=nixplane demo", "GIT_COMMITTER_EMAIL=demo@nixplane.invalid", "GIT_TERMINAL_PROMPT=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("git %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

func newDemoRepo(ctx context.Context, dir string, hosts []demoHost) (*demoRepo, error) {
	r := &demoRepo{origin: filepath.Join(dir, "fleet.git"), work: filepath.Join(dir, "fleet")}
	if _, err := os.Stat(filepath.Join(r.origin, "HEAD")); err == nil {
		return r, nil // reused data dir
	}
	if err := os.MkdirAll(r.work, 0o755); err != nil {
		return nil, err
	}
	if err := gitRun(ctx, dir, "init", "--quiet", "--bare", "--initial-branch=main", r.origin); err != nil {
		return nil, err
	}
	if err := gitRun(ctx, r.work, "init", "--quiet", "--initial-branch=main"); err != nil {
		return nil, err
	}
	files := map[string]string{
		"flake.nix": `{
  description = "nixplane demo fleet";
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
  outputs = { self, nixpkgs }: {
    nixosConfigurations = nixpkgs.lib.genAttrs [ ` + hostList(hosts) + ` ] (name:
      nixpkgs.lib.nixosSystem { system = "x86_64-linux"; modules = [ ./hosts/${name}/configuration.nix ]; });
  };
}
`,
		"flake.lock": demoLock(1),
	}
	for _, h := range hosts {
		files["hosts/"+h.name+"/configuration.nix"] = "{ ... }: {\n  networking.hostName = \"" + h.name + "\";\n  system.stateVersion = \"25.05\";\n}\n"
		files["hosts/"+h.name+"/tests/01-config-present.sh"] = "#!/bin/sh\ntest -f hosts/" + h.name + "/configuration.nix && echo 'configuration present'\n"
		files["hosts/"+h.name+"/tests/02-disk-space.sh"] = "#!/bin/sh\necho 'disk usage below 90%'\n"
		if h.failingTest {
			files["hosts/"+h.name+"/tests/03-backup-fresh.sh"] = "#!/bin/sh\necho 'last backup is 9 days old (limit 7)' >&2\nexit 1\n"
		}
	}
	for name, body := range files {
		p := filepath.Join(r.work, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return nil, err
		}
		mode := os.FileMode(0o644)
		if strings.HasSuffix(name, ".sh") {
			mode = 0o755
		}
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			return nil, err
		}
	}
	for _, args := range [][]string{{"add", "-A"}, {"commit", "--quiet", "-m", "Initial fleet configuration"},
		{"remote", "add", "origin", r.origin}, {"push", "--quiet", "origin", "main"}} {
		if err := gitRun(ctx, r.work, args...); err != nil {
			return nil, err
		}
	}
	return r, nil
}

func hostList(hosts []demoHost) string {
	var b strings.Builder
	for i, h := range hosts {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(`"` + h.name + `"`)
	}
	return b.String()
}

// demoLock is a flake.lock whose nixpkgs revision moves with n.
func demoLock(n int) string {
	return fmt.Sprintf(`{
  "nodes": {
    "nixpkgs": {
      "locked": {
        "lastModified": %d,
        "narHash": "sha256-demo%04dAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "owner": "NixOS",
        "repo": "nixpkgs",
        "rev": "%040x",
        "type": "github"
      },
      "original": { "owner": "NixOS", "ref": "nixos-unstable", "repo": "nixpkgs", "type": "github" }
    },
    "root": { "inputs": { "nixpkgs": "nixpkgs" } }
  },
  "root": "root",
  "version": 7
}
`, 1760000000+n*86400, n, n)
}

// commitLoop lands a new commit every interval: configuration changes on
// main, and every other time a flake.lock update as a pull request (when
// none is open already).
func (r *demoRepo) commitLoop(ctx context.Context, every time.Duration, log *slog.Logger) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.n++
		if r.n%2 == 0 && r.gh != nil {
			// Lock updates arrive as pull requests, like a bot's would.
			if n, err := r.openFlakeUpdate(ctx); err != nil {
				log.Warn("demo flake-update PR", "err", err)
			} else {
				log.Info("demo flake-update PR open", "pr", n)
			}
			continue
		}
		msg := fmt.Sprintf("hosts: tune services (change %d)", r.n)
		files := map[string]string{"CHANGES": fmt.Sprintf("change %d at %s\n", r.n, time.Now().UTC().Format(time.RFC3339))}
		// The origin may have moved (a merged PR): start from its main.
		if err := gitRun(ctx, r.work, "pull", "--quiet", "--ff-only", "origin", "main"); err != nil {
			log.Warn("demo commit", "err", err)
			continue
		}
		for name, body := range files {
			if err := os.WriteFile(filepath.Join(r.work, name), []byte(body), 0o644); err != nil {
				log.Warn("demo commit", "err", err)
			}
		}
		for _, args := range [][]string{{"add", "-A"}, {"commit", "--quiet", "-m", msg}, {"push", "--quiet", "origin", "main"}} {
			if err := gitRun(ctx, r.work, args...); err != nil {
				log.Warn("demo commit", "err", err)
				break
			}
		}
	}
}
