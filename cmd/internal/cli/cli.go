// Package cli is the nixplane command line: the server (`serve`, `demo`),
// offline administration of a data directory (`hosts add`, `tokens create`
// …), and a client for a running server (`hosts`, `status`, `refresh`,
// `run`, `logs`). Secrets and machine-readable results go to stdout alone;
// messages go to stderr, so `TOKEN=$(nixplane tokens create ci …)` works.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/nixplane/nixplane/cmd/internal/buildinfo"
	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/github"
)

// Exit codes.
const (
	ExitOK = 0
	// ExitFailure: the command failed (or a followed command did not succeed).
	ExitFailure = 1
	// ExitUsage: bad arguments.
	ExitUsage = 2
)

// Env carries the process's standard streams and environment.
type Env struct {
	Stdout, Stderr io.Writer
	Getenv         func(string) string
}

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

const usage = `nixplane — a control plane for fleets of Nix machines

Server:
  nixplane serve --listen 127.0.0.1:8080 --data-dir DIR   run the control plane
        [--github-repo OWNER/NAME --github-token-file F [--github-api-url URL]]
  nixplane demo [--listen ADDR] [--hosts N]               server + simulated fleet, no setup
  nixplane version

Administration (offline with --data-dir, or online with --server and a token):
  nixplane hosts add NAME     register a host; prints its agent token
  nixplane hosts list         list hosts (--json for JSON)
  nixplane hosts remove NAME
  nixplane hosts rotate-token NAME
  nixplane tokens create NAME [--scope read|operate|admin] [--ttl 720h]
  nixplane tokens list
  nixplane tokens revoke NAME

Client (--server URL, token from NIXPLANE_TOKEN or --token-file):
  nixplane hosts              table of hosts (--json)
  nixplane status HOST        one host's status
  nixplane refresh HOST       ask the agent to recompute its status
  nixplane run CMD HOST...|--all [--follow]
  nixplane logs COMMAND_ID [--follow]
  nixplane pr                 the pending flake-update PR
  nixplane merge-and-deploy PR [--hosts a,b] [--canary a] [--batch-size 5] [--max-failures 0]
                              merge it, then pull-switch: canaries first, then batches

Every flag can also be given as NIXPLANE_<FLAG> (e.g. NIXPLANE_DATA_DIR).
`

// Main runs the command line and returns the process exit code.
func Main(ctx context.Context, args []string, env Env) int {
	if env.Getenv == nil {
		env.Getenv = os.Getenv
	}
	err := dispatch(ctx, args, env)
	if err == nil {
		return ExitOK
	}
	var ue usageError
	var ee exitError
	switch {
	case errors.Is(err, flag.ErrHelp):
		return ExitOK
	case errors.As(err, &ue):
		fmt.Fprintf(env.Stderr, "nixplane: %s\n(see 'nixplane help')\n", ue.msg)
		return ExitUsage
	case errors.As(err, &ee):
		return ee.code
	}
	fmt.Fprintf(env.Stderr, "nixplane: %s\n", err)
	return ExitFailure
}

// exitError ends the process with a code after the message was printed.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit %d", e.code) }

func dispatch(ctx context.Context, args []string, env Env) error {
	if len(args) == 0 {
		fmt.Fprint(env.Stderr, usage)
		return usagef("no command given")
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "help", "-h", "--help":
		fmt.Fprint(env.Stdout, usage)
		return nil
	case "version", "--version":
		fmt.Fprintf(env.Stdout, "nixplane %s (%s)\n", buildinfo.Version, buildinfo.SourceCommit())
		return nil
	case "serve":
		return serve(ctx, rest, env)
	case "demo":
		return demo(ctx, rest, env)
	case "hosts":
		return hosts(ctx, rest, env)
	case "tokens":
		return tokens(ctx, rest, env)
	case "status", "refresh", "run", "logs":
		return client(ctx, cmd, rest, env)
	case "pr", "merge-and-deploy":
		return pr(ctx, cmd, rest, env)
	}
	return usagef("unknown command %q", cmd)
}

// flags is a FlagSet whose flags also read NIXPLANE_* variables and which
// accepts flags after positional arguments.
type flags struct {
	*flag.FlagSet
	env Env
}

func newFlags(name string, env Env) *flags {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	return &flags{FlagSet: fs, env: env}
}

// EnvName is the environment variable of a flag: data-dir → NIXPLANE_DATA_DIR.
func EnvName(flagName string) string {
	return "NIXPLANE_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// parse applies environment defaults, then parses args with flags allowed
// anywhere; it returns the positional arguments.
func (f *flags) parse(args []string) ([]string, error) {
	var envErr error
	f.VisitAll(func(fl *flag.Flag) {
		if v := f.env.Getenv(EnvName(fl.Name)); v != "" && envErr == nil {
			if err := fl.Value.Set(v); err != nil {
				envErr = usagef("%s=%q: %v", EnvName(fl.Name), v, err)
			}
		}
	})
	if envErr != nil {
		return nil, envErr
	}
	var pos []string
	for {
		if err := f.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, usagef("%v", err)
		}
		args = f.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func logger(w io.Writer, level string) *slog.Logger {
	var l slog.Level
	_ = l.UnmarshalText([]byte(level))
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l}))
}

// serverFlags registers the server's flags on f and returns the config they
// fill.
func serverFlags(f *flags) (*controlplane.Config, *string, *string) {
	cfg := &controlplane.Config{Version: buildinfo.Version}
	f.StringVar(&cfg.Listen, "listen", "127.0.0.1:8080", "address of the one port (gRPC, grpc-web, REST, UI)")
	f.StringVar(&cfg.DataDir, "data-dir", "", "directory for nixplane.db and the fleet repository mirror")
	f.StringVar(&cfg.TLSCert, "tls-cert", "", "TLS certificate file (PEM); enables TLS with --tls-key")
	f.StringVar(&cfg.TLSKey, "tls-key", "", "TLS private key file (PEM)")
	f.StringVar(&cfg.AgentClientCA, "agent-client-ca", "", "PEM CA bundle: agents must also present a client certificate from it naming their host (needs --tls-cert; not behind a TLS-terminating proxy)")
	f.StringVar(&cfg.AdminPassword, "admin-password", "", "password of the admin user created on first start (prefer NIXPLANE_ADMIN_PASSWORD)")
	f.StringVar(&cfg.FleetRepo, "fleet-repo", "", "fleet git repository: the target commit and flake.lock come from its branch")
	f.StringVar(&cfg.Branch, "branch", "main", "branch of the fleet repository hosts deploy")
	f.StringVar(&cfg.VersionURL, "version-url", "", "URL of a version.json giving the target (instead of --fleet-repo)")
	f.DurationVar(&cfg.TargetPoll, "target-poll", 60*time.Second, "how often the fleet target is refetched")
	f.StringVar(&cfg.GitHubRepo, "github-repo", "", "GitHub repository (owner/name) whose open flake.lock PR can be merged and deployed")
	f.StringVar(&cfg.GitHubTokenFile, "github-token-file", "", "file holding the GitHub API token (needed with --github-repo)")
	f.StringVar(&cfg.GitHubAPIURL, "github-api-url", "", "GitHub REST API URL, e.g. https://github.example.com/api/v3/ for GitHub Enterprise (default api.github.com)")
	f.DurationVar(&cfg.GitHubPoll, "github-poll", 60*time.Second, "how often GitHub is asked for the pending flake-update PR")
	f.StringVar(&cfg.GitHubPRLabels, "github-pr-labels", strings.Join(github.DefaultLabels, ","), "comma-separated labels that mark a flake-update PR (\"-\": none)")
	f.StringVar(&cfg.GitHubPRTitle, "github-pr-title", github.DefaultTitlePattern, "regular expression a flake-update PR's title matches (\"-\": none)")
	f.StringVar(&cfg.GitHubMergeMethod, "github-merge-method", "merge", "how Merge & Deploy merges the PR: merge, squash or rebase")
	f.DurationVar(&cfg.LogRetention, "log-retention", 30*24*time.Hour, "how long ended commands and their logs are kept")
	f.BoolVar(&cfg.TrustProxyHeaders, "trust-proxy-headers", false, "honour X-Forwarded-Proto from a TLS-terminating proxy")
	f.IntVar(&cfg.GCPercent, "gc-percent", controlplane.DefaultGCPercent, "Go GC target: heap growth in percent before a collection (GOGC in the environment wins)")
	origins := f.String("allowed-origins", "", "comma-separated extra browser origins allowed to make changes")
	level := f.String("log-level", "info", "log level: debug, info, warn, error")
	return cfg, origins, level
}

func serve(ctx context.Context, args []string, env Env) error {
	f := newFlags("serve", env)
	cfg, origins, level := serverFlags(f)
	if pos, err := f.parse(args); err != nil {
		return err
	} else if len(pos) > 0 {
		return usagef("serve takes no arguments, got %q", pos[0])
	}
	if cfg.DataDir == "" {
		return usagef("--data-dir (or NIXPLANE_DATA_DIR) is required")
	}
	if cfg.GCPercent <= 0 {
		return usagef("--gc-percent must be positive, got %d", cfg.GCPercent)
	}
	if env.Getenv("GOGC") != "" {
		cfg.GCPercent = 0 // the runtime already follows GOGC
	}
	if *origins != "" {
		cfg.AllowedOrigins = strings.Split(*origins, ",")
	}
	cfg.Log = logger(env.Stderr, *level)
	cfg.Out = env.Stderr
	return controlplane.Run(ctx, *cfg)
}
