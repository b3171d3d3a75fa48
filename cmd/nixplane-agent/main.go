// Command nixplane-agent runs on every host of a nixplane fleet: it keeps one
// gRPC stream open to the control plane, reports heartbeats and status, and
// runs the commands it is sent. Every flag can also be given as a NIXPLANE_*
// environment variable (--token-file → NIXPLANE_TOKEN_FILE); flags win.
//
// Exit status: 0 after a clean shutdown (SIGINT/SIGTERM), 1 on an error,
// 2 on bad usage, and 101 when the agent must be started again (after a
// restart command, or after a switch replaced its binary); the NixOS module
// sets RestartForceExitStatus=101 for that.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nixplane/nixplane/agent"
	"github.com/nixplane/nixplane/cmd/internal/buildinfo"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func defaultStateDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/nixplane-agent"
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local/state/nixplane-agent")
	}
	return ""
}

func defaultHostname() string {
	h, err := os.Hostname()
	if err != nil {
		return ""
	}
	h, _, _ = strings.Cut(h, ".")
	return strings.ToLower(h)
}

func run(args []string) int {
	fs := flag.NewFlagSet("nixplane-agent", flag.ContinueOnError)
	var (
		cfg                    agent.Config
		hostType, rebootCmd    string
		logLevel               string
		showVersion, checkOnly bool
	)
	fs.StringVar(&cfg.Server, "server", "", "control plane URL: http://host:port (h2c) or https://host:port")
	fs.StringVar(&cfg.CAFile, "ca-file", "", "PEM CA bundle trusted in addition to the system roots (https)")
	fs.StringVar(&cfg.ClientCertFile, "tls-client-cert", "", "PEM client certificate naming this host, for a server run with --agent-client-ca (https; read at every reconnect)")
	fs.StringVar(&cfg.ClientKeyFile, "tls-client-key", "", "PEM private key of --tls-client-cert")
	fs.StringVar(&cfg.Hostname, "hostname", defaultHostname(), "this host's registered name (also its flake attribute)")
	fs.StringVar(&cfg.TokenFile, "token-file", "", "file holding this host's agent token")
	fs.StringVar(&cfg.RepoURL, "repo-url", "", "fleet repository to clone")
	fs.StringVar(&cfg.Branch, "branch", agent.DefaultBranch, "branch to follow")
	fs.StringVar(&cfg.StateDir, "state-dir", defaultStateDir(), "directory for the clone and the agent's state")
	fs.DurationVar(&cfg.Interval, "interval", agent.DefaultInterval, "heartbeat interval")
	fs.StringVar(&hostType, "host-type", "", "nixos, darwin or home-manager (detected when empty)")
	fs.StringVar(&cfg.Location, "location", "", "where the host is (shown in the fleet view)")
	fs.StringVar(&cfg.DeviceType, "device-type", "", "kind of device, e.g. server, desktop, laptop")
	fs.StringVar(&cfg.ThemeColor, "theme-color", "", "display colour, #rrggbb")
	fs.StringVar(&cfg.SSHKeyFile, "ssh-key-file", "", "SSH private key for the repository")
	fs.StringVar(&cfg.RebuildCommand, "rebuild-command", "", "replaces nixos-rebuild/darwin-rebuild/home-manager (same arguments, no sudo)")
	fs.StringVar(&rebootCmd, "reboot-command", "", "command line that reboots the host (default: reboot, via sudo -n when not root)")
	fs.StringVar(&cfg.NixCommand, "nix-command", "", "nix binary for the system check (default: nix from PATH)")
	fs.StringVar(&cfg.CurrentSystem, "current-system", "", "link to the running system (default: /run/current-system or the Home Manager profile)")
	fs.DurationVar(&cfg.SystemCheckTimeout, "system-check-timeout", 0, "bound for one system check evaluation (default 2m)")
	fs.StringVar(&cfg.HealthCheckCommand, "health-check-command", "", "shell command run after a switch; a switch whose check keeps failing is rolled back")
	fs.DurationVar(&cfg.HealthCheckGrace, "health-check-grace", agent.DefaultHealthCheckGrace, "how long the health check may fail before the rollback")
	fs.StringVar(&cfg.SelfPath, "self-path", agent.DefaultSelfPath(), "installed path of this binary, checked after a switch for a new agent")
	fs.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	fs.BoolVar(&showVersion, "version", false, "print the version and source commit, then exit")
	fs.BoolVar(&checkOnly, "check", false, "check the configuration, token file, repository and server, then exit")

	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "nixplane-agent: unexpected arguments: %s\n", strings.Join(fs.Args(), " "))
		return 2
	}
	if err := applyEnv(fs); err != nil {
		fmt.Fprintln(os.Stderr, "nixplane-agent:", err)
		return 2
	}
	if showVersion {
		fmt.Printf("nixplane-agent %s (commit %s)\n", buildinfo.Version, buildinfo.SourceCommit())
		return 0
	}
	var err error
	if cfg.HostType, err = agent.ParseHostType(hostType); err != nil {
		fmt.Fprintln(os.Stderr, "nixplane-agent:", err)
		return 2
	}
	cfg.RebootCommand = strings.Fields(rebootCmd)
	cfg.Version, cfg.SourceCommit = buildinfo.Version, buildinfo.SourceCommit()

	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		fmt.Fprintln(os.Stderr, "nixplane-agent: --log-level:", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	if checkOnly {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := agent.Check(ctx, cfg); err != nil {
			fmt.Fprintf(os.Stderr, "nixplane-agent: check failed:\n%v\n", err)
			return 1
		}
		fmt.Fprintln(os.Stderr, "nixplane-agent: configuration, token file, repository and server are fine")
		return 0
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	log.Info("starting", "version", cfg.Version, "source_commit", cfg.SourceCommit, "server", cfg.Server)
	err = agent.Run(ctx, cfg, log)
	switch {
	case errors.Is(err, agent.ErrRestartRequested):
		log.Info("exiting so the service manager restarts the agent", "exit_code", agent.RestartExitCode)
		return agent.RestartExitCode
	case err != nil:
		log.Error("agent stopped", "error", err)
		return 1
	}
	log.Info("stopped")
	return 0
}

// applyEnv sets every flag not given on the command line from its
// NIXPLANE_* environment variable, when set.
func applyEnv(fs *flag.FlagSet) error {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || f.Name == "version" || f.Name == "check" {
			return
		}
		env := "NIXPLANE_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(env); ok {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", env, err))
			}
		}
	})
	return errors.Join(errs...)
}
