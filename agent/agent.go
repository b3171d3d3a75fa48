// Package agent is nixplane-agent as a library: [Run] keeps the host's
// stream to the control plane open, reports heartbeats and status, keeps an
// isolated clone of the fleet repository, and runs the commands the server
// sends (pull, switch, test, rollback, restart, reboot, refresh). The
// command-line main, the demo and the tests all call [Run] with a typed
// [Config]; nothing here reads flags, the environment or globals.
package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"time"

	"github.com/nixplane/nixplane/agent/repo"
	"github.com/nixplane/nixplane/agent/session"
	"github.com/nixplane/nixplane/agent/status"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
	"google.golang.org/grpc/connectivity"
)

// ErrRestartRequested is returned by [Run] when the agent must be started
// again: after a restart command, or after a switch replaced the agent's own
// binary. The result of that command has been sent (or saved for the next
// start). nixplane-agent exits with [RestartExitCode] on it.
var ErrRestartRequested = session.ErrRestartRequested

// RestartExitCode is the exit status nixplane-agent uses for
// [ErrRestartRequested]; the NixOS module sets RestartForceExitStatus=101 so
// systemd starts the agent again even after a clean exit.
const RestartExitCode = 101

// Defaults for [Config] fields left zero.
const (
	DefaultBranch           = "main"
	DefaultInterval         = 5 * time.Second
	DefaultHealthCheckGrace = 30 * time.Second
	// pendingResultFile (under StateDir) holds a command result not yet sent.
	pendingResultFile = "pending-result.binpb"
	// repoDirName (under StateDir) is the isolated clone.
	repoDirName = "repo"
)

// Config is everything the agent needs; main fills it from flags and
// NIXPLANE_* environment variables.
type Config struct {
	// Server is the control plane URL: http://host:port (plaintext HTTP/2)
	// or https://host:port.
	Server string
	// CAFile adds a PEM CA bundle to the system roots for https.
	CAFile string
	// ClientCertFile and ClientKeyFile are the PEM client certificate and
	// key for a server that requires agent client certificates; both or
	// neither. They are read again at every reconnect, so renewing them
	// needs no restart.
	ClientCertFile, ClientKeyFile string
	// Hostname is the host's registered name (lower-case RFC 1123 label);
	// it is also the flake attribute of its configuration.
	Hostname string
	// TokenFile holds the host's agent token.
	TokenFile string
	// RepoURL is the fleet repository to clone.
	RepoURL string
	// Branch is the branch to follow (DefaultBranch when empty).
	Branch string
	// StateDir holds the clone (<StateDir>/repo) and the agent's state.
	StateDir string
	// Interval is the heartbeat interval (DefaultInterval when zero).
	Interval time.Duration
	// HostType selects the activation tool; unspecified means detect it
	// (see [DetectHostType]).
	HostType typesv1.HostType
	// Location, DeviceType and ThemeColor (#rrggbb) describe the host for
	// the fleet view.
	Location, DeviceType, ThemeColor string
	// SSHKeyFile is the private key git uses for an SSH RepoURL.
	SSHKeyFile string
	// RebuildCommand replaces nixos-rebuild, darwin-rebuild or home-manager
	// (it gets the same arguments and is not run through sudo).
	RebuildCommand string
	// RebootCommand is the command line that reboots the host; empty means
	// "reboot" (through "sudo -n" when not root).
	RebootCommand []string
	// NixCommand is the nix binary for the system check ("nix" when empty).
	NixCommand string
	// CurrentSystem is the link to the running system; empty means the host
	// type's default (/run/current-system or the Home Manager profile).
	CurrentSystem string
	// SystemCheckTimeout bounds one system check.
	SystemCheckTimeout time.Duration
	// HealthCheckCommand, when set, is a shell command run after a switch;
	// if it keeps failing for HealthCheckGrace the agent rolls back and the
	// switch fails.
	HealthCheckCommand string
	// HealthCheckGrace is how long the health check may fail before the
	// rollback (DefaultHealthCheckGrace when zero).
	HealthCheckGrace time.Duration
	// SelfPath is where the agent's binary is installed (e.g. a profile
	// symlink): after a switch, a file there that differs from the running
	// binary means the agent must restart. Empty disables the check.
	SelfPath string
	// Executable is the running binary; empty means os.Executable().
	Executable string
	// Git is the git binary ("git" when empty).
	Git string
	// Version and SourceCommit identify the agent build.
	Version, SourceCommit string

	// WelcomeTimeout, BackoffInitial, BackoffMax and HealthyAfter tune
	// reconnecting; zero means the session package's defaults.
	WelcomeTimeout, BackoffInitial, BackoffMax, HealthyAfter time.Duration
}

var (
	hostnameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	colorRE    = regexp.MustCompile(`^#[0-9a-fA-F]{6}$`)
)

// ParseHostType parses "nixos", "darwin" or "home-manager"; "" (or "auto")
// gives HOST_TYPE_UNSPECIFIED, which means detect.
func ParseHostType(s string) (typesv1.HostType, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "auto":
		return typesv1.HostType_HOST_TYPE_UNSPECIFIED, nil
	case "nixos":
		return typesv1.HostType_HOST_TYPE_NIXOS, nil
	case "darwin", "nix-darwin", "macos":
		return typesv1.HostType_HOST_TYPE_DARWIN, nil
	case "home-manager", "homemanager", "hm":
		return typesv1.HostType_HOST_TYPE_HOME_MANAGER, nil
	}
	return 0, fmt.Errorf("host type %q: want nixos, darwin or home-manager", s)
}

// DetectHostType says how this machine is managed: NixOS when /etc/NIXOS
// exists, nix-darwin on macOS with darwin-rebuild, else Home Manager.
func DetectHostType() typesv1.HostType {
	if _, err := os.Stat("/etc/NIXOS"); err == nil {
		return typesv1.HostType_HOST_TYPE_NIXOS
	}
	if runtime.GOOS == "darwin" {
		if _, err := exec.LookPath("darwin-rebuild"); err == nil {
			return typesv1.HostType_HOST_TYPE_DARWIN
		}
	}
	return typesv1.HostType_HOST_TYPE_HOME_MANAGER
}

// withDefaults returns a copy with defaults filled in and the host type
// resolved.
func (c Config) withDefaults() Config {
	if c.Branch == "" {
		c.Branch = DefaultBranch
	}
	if c.Interval <= 0 {
		c.Interval = DefaultInterval
	}
	if c.HealthCheckGrace <= 0 {
		c.HealthCheckGrace = DefaultHealthCheckGrace
	}
	if c.HostType == typesv1.HostType_HOST_TYPE_UNSPECIFIED {
		c.HostType = DetectHostType()
	}
	if len(c.RebootCommand) == 0 {
		c.RebootCommand = []string{"reboot"}
		if os.Geteuid() != 0 {
			c.RebootCommand = []string{"sudo", "-n", "reboot"}
		}
	}
	if c.Version == "" {
		c.Version = "unknown"
	}
	if c.SourceCommit == "" {
		c.SourceCommit = "unknown"
	}
	return c
}

// Validate checks the configuration without touching the network: required
// fields, formats, and a readable, non-empty token file.
func (c Config) Validate() error {
	var errs []error
	if c.Server == "" {
		errs = append(errs, errors.New("--server is required"))
	} else if _, err := session.ParseServer(c.Server); err != nil {
		errs = append(errs, err)
	}
	if c.Hostname == "" {
		errs = append(errs, errors.New("--hostname is required"))
	} else if !hostnameRE.MatchString(c.Hostname) {
		errs = append(errs, fmt.Errorf("hostname %q: want a lower-case RFC 1123 label (a-z, 0-9, -)", c.Hostname))
	}
	if c.TokenFile == "" {
		errs = append(errs, errors.New("--token-file is required"))
	} else if _, err := session.ReadToken(c.TokenFile); err != nil {
		errs = append(errs, err)
	}
	if c.RepoURL == "" {
		errs = append(errs, errors.New("--repo-url is required"))
	}
	if c.StateDir == "" {
		errs = append(errs, errors.New("--state-dir is required"))
	}
	if c.Branch != "" && (strings.HasPrefix(c.Branch, "-") || strings.ContainsAny(c.Branch, " \t:~^?*[\\")) {
		errs = append(errs, fmt.Errorf("branch %q is not a valid branch name", c.Branch))
	}
	if c.Interval < 0 || c.Interval > 0 && c.Interval < 100*time.Millisecond {
		errs = append(errs, fmt.Errorf("interval %s: want at least 100ms", c.Interval))
	}
	if c.ThemeColor != "" && !colorRE.MatchString(c.ThemeColor) {
		errs = append(errs, fmt.Errorf("theme color %q: want #rrggbb", c.ThemeColor))
	}
	if c.SSHKeyFile != "" {
		if _, err := os.Stat(c.SSHKeyFile); err != nil {
			errs = append(errs, fmt.Errorf("ssh key file: %w", err))
		}
	}
	if c.CAFile != "" {
		if _, err := os.Stat(c.CAFile); err != nil {
			errs = append(errs, fmt.Errorf("CA file: %w", err))
		}
	}
	if c.ClientCertFile != "" || c.ClientKeyFile != "" {
		if t, err := session.ParseServer(c.Server); err == nil && !t.TLS {
			errs = append(errs, fmt.Errorf("--tls-client-cert needs an https:// server, not %s", c.Server))
		}
		if _, err := session.LoadClientCert(c.ClientCertFile, c.ClientKeyFile); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Check validates cfg and then checks, with ctx bounding it, that the
// repository is reachable (git ls-remote) and that the server accepts
// connections. It is what `nixplane-agent --check` runs.
func Check(ctx context.Context, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	cfg = cfg.withDefaults()
	var errs []error
	r := &repo.Repo{Dir: filepath.Join(cfg.StateDir, repoDirName), URL: cfg.RepoURL, Branch: cfg.Branch, SSHKeyFile: cfg.SSHKeyFile, Git: cfg.Git}
	if err := r.LsRemote(ctx); err != nil {
		errs = append(errs, fmt.Errorf("repository: %w", err))
	}
	conn, err := session.Dial(session.Config{Server: cfg.Server, CAFile: cfg.CAFile, Interval: cfg.Interval,
		ClientCertFile: cfg.ClientCertFile, ClientKeyFile: cfg.ClientKeyFile})
	if err != nil {
		errs = append(errs, fmt.Errorf("server: %w", err))
	} else {
		defer conn.Close()
		conn.Connect()
		for {
			s := conn.GetState()
			if s == connectivity.Ready {
				break
			}
			if s == connectivity.TransientFailure || !conn.WaitForStateChange(ctx, s) {
				errs = append(errs, fmt.Errorf("server %s is not reachable (%s)", cfg.Server, s))
				break
			}
		}
	}
	return errors.Join(errs...)
}

// Run runs the agent until ctx ends (it then closes the stream cleanly,
// stops a running command and returns nil) or a restart is needed
// ([ErrRestartRequested]). A bad configuration is an error at once.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("agent config: %w", err)
	}
	cfg = cfg.withDefaults()
	log = log.With("host", cfg.Hostname)
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	a, err := newAgent(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer a.shutdown()
	return a.client.Run(ctx)
}

// selfInfo identifies the running binary.
type selfInfo struct {
	path string
	hash string
}

func describeSelf(exe string) (selfInfo, error) {
	if exe == "" {
		p, err := os.Executable()
		if err != nil {
			return selfInfo{}, err
		}
		exe = p
	}
	real, err := filepath.EvalSymlinks(exe)
	if err != nil {
		return selfInfo{}, err
	}
	h, err := fileHash(real)
	if err != nil {
		return selfInfo{}, err
	}
	return selfInfo{path: real, hash: h}, nil
}

func fileHash(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// DefaultSelfPath is the installed path of the running agent as it was
// invoked: os.Args[0], looked up in PATH when it has no slash, before any
// symlink is resolved (so a profile link that a switch repoints is seen).
func DefaultSelfPath() string {
	if len(os.Args) == 0 {
		return ""
	}
	p := os.Args[0]
	if !strings.Contains(p, "/") {
		if lp, err := exec.LookPath(p); err == nil {
			p = lp
		} else {
			return ""
		}
	}
	if abs, err := filepath.Abs(p); err == nil {
		p = abs
	}
	return p
}

// statusChecker builds the system checker for cfg.
func statusChecker(cfg Config, dir string) *status.SystemChecker {
	return &status.SystemChecker{
		Nix:           cfg.NixCommand,
		Flake:         dir,
		HostType:      cfg.HostType,
		Host:          cfg.Hostname,
		CurrentSystem: cfg.CurrentSystem,
		Timeout:       cfg.SystemCheckTimeout,
	}
}
