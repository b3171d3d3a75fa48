package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nixplane/nixplane/agent/executor"
	"github.com/nixplane/nixplane/agent/metrics"
	"github.com/nixplane/nixplane/agent/repo"
	"github.com/nixplane/nixplane/agent/session"
	"github.com/nixplane/nixplane/agent/status"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
	"github.com/shirou/gopsutil/v4/host"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// agent is the session handler: host facts, heartbeats, status and the
// command runner.
type agent struct {
	ctx     context.Context
	cancel  context.CancelFunc
	cfg     Config
	log     *slog.Logger
	repo    *repo.Repo
	checker *status.SystemChecker
	sampler metrics.Sampler
	outbox  *session.Outbox
	client  *session.Client
	self    selfInfo

	osVersion      string
	nixpkgsVersion string

	mu        sync.Mutex
	cur       *running
	lastTests *typesv1.TestReport

	statusMu sync.Mutex     // one status computation at a time
	wg       sync.WaitGroup // command and refresh goroutines
}

func newAgent(ctx context.Context, cfg Config, log *slog.Logger) (*agent, error) {
	self, err := describeSelf(cfg.Executable)
	if err != nil {
		return nil, fmt.Errorf("identify the agent binary: %w", err)
	}
	actx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	a := &agent{
		ctx:    actx,
		cancel: cancel,
		cfg:    cfg,
		log:    log,
		self:   self,
		repo: &repo.Repo{
			Dir:        filepath.Join(cfg.StateDir, repoDirName),
			URL:        cfg.RepoURL,
			Branch:     cfg.Branch,
			SSHKeyFile: cfg.SSHKeyFile,
			Git:        cfg.Git,
		},
		outbox: session.NewOutbox(0, filepath.Join(cfg.StateDir, pendingResultFile), log),
	}
	a.checker = statusChecker(cfg, a.repo.Dir)
	a.osVersion = osVersion(ctx)
	a.nixpkgsVersion = nixpkgsVersion(ctx)

	// An existing valid clone is kept as is; a missing or broken one is
	// cloned now so the Hello carries the generation. Failure is not fatal:
	// the next pull clones again.
	cctx, ccancel := context.WithTimeout(ctx, 5*time.Minute)
	if cloned, err := a.repo.Ensure(cctx, a.logExec); err != nil {
		log.Error("cannot clone the fleet repository; a pull will retry", "repo_url", cfg.RepoURL, "error", err)
	} else if cloned {
		log.Info("cloned the fleet repository", "repo_url", cfg.RepoURL, "dir", a.repo.Dir)
	}
	ccancel()

	a.client, err = session.New(session.Config{
		Server:         cfg.Server,
		Hostname:       cfg.Hostname,
		TokenFile:      cfg.TokenFile,
		CAFile:         cfg.CAFile,
		ClientCertFile: cfg.ClientCertFile,
		ClientKeyFile:  cfg.ClientKeyFile,
		Interval:       cfg.Interval,
		WelcomeTimeout: cfg.WelcomeTimeout,
		BackoffInitial: cfg.BackoffInitial,
		BackoffMax:     cfg.BackoffMax,
		HealthyAfter:   cfg.HealthyAfter,
	}, a, a.outbox, log)
	if err != nil {
		cancel()
		return nil, err
	}
	return a, nil
}

// shutdown stops a running command (a detached one is left to finish) and
// waits for the agent's goroutines.
func (a *agent) shutdown() {
	a.mu.Lock()
	r := a.cur
	a.mu.Unlock()
	detached := r != nil && r.detached
	if r != nil && !detached {
		a.stop(r, 2*time.Second, "the agent is shutting down")
	}
	a.cancel()
	if !detached {
		a.wg.Wait()
	}
}

// logExec runs git for work nobody watches (the start-up clone), logging
// its output.
func (a *agent) logExec(ctx context.Context, dir string, env []string, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir, cmd.Env = dir, env
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func osVersion(ctx context.Context) string {
	info, err := host.InfoWithContext(ctx)
	if err != nil {
		return ""
	}
	s := strings.TrimSpace(info.Platform + " " + info.PlatformVersion)
	if info.KernelVersion != "" {
		s += " (" + info.OS + " " + info.KernelVersion + ")"
	}
	return strings.TrimSpace(s)
}

func nixpkgsVersion(ctx context.Context) string {
	p, err := exec.LookPath("nixos-version")
	if err != nil {
		return ""
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, p).Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}

// runningID is the id of the running command, or "".
func (a *agent) runningID() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cur == nil {
		return ""
	}
	return a.cur.id
}

// Hello implements [session.Handler].
func (a *agent) Hello(ctx context.Context) *agentv1.Hello {
	gen, msg := a.repo.Head(ctx)
	return &agentv1.Hello{
		Hostname:          a.cfg.Hostname,
		HostType:          a.cfg.HostType,
		AgentVersion:      a.cfg.Version,
		SourceCommit:      a.cfg.SourceCommit,
		BinaryHash:        a.self.hash,
		StorePath:         a.self.path,
		OsVersion:         a.osVersion,
		NixpkgsVersion:    a.nixpkgsVersion,
		Generation:        gen,
		GenerationMessage: msg,
		RepoUrl:           a.cfg.RepoURL,
		Branch:            a.cfg.Branch,
		Location:          a.cfg.Location,
		DeviceType:        a.cfg.DeviceType,
		ThemeColor:        a.cfg.ThemeColor,
		HeartbeatInterval: durationpb.New(a.cfg.Interval),
		LockHash:          a.repo.LockHash(),
		RunningCommandId:  a.runningID(),
	}
}

// Heartbeat implements [session.Handler].
func (a *agent) Heartbeat(ctx context.Context) *agentv1.Heartbeat {
	gen, _ := a.repo.Head(ctx)
	return &agentv1.Heartbeat{
		Metrics:          a.sampler.Sample(ctx),
		Generation:       gen,
		LockHash:         a.repo.LockHash(),
		RunningCommandId: a.runningID(),
		SentAt:           timestamppb.Now(),
	}
}

// Refresh implements [session.Handler].
func (a *agent) Refresh(req *agentv1.RefreshStatus) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		rep := a.statusReport(a.ctx, req.GetRequestId())
		a.outbox.Push(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Status{Status: rep}})
	}()
}

// statusReport computes the host's status now.
func (a *agent) statusReport(ctx context.Context, requestID string) *agentv1.StatusReport {
	a.statusMu.Lock()
	defer a.statusMu.Unlock()
	gen, msg := a.repo.Head(ctx)
	rep := &agentv1.StatusReport{
		RequestId:         requestID,
		Generation:        gen,
		GenerationMessage: msg,
		LockHash:          a.repo.LockHash(),
		NixAvailable:      a.checker.NixPath() != "",
	}
	if gen == "" {
		rep.System = &typesv1.SystemCheck{
			Status:    typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN,
			Message:   "no clone of the fleet repository yet",
			CheckedAt: timestamppb.Now(),
		}
	} else {
		rep.System = a.checker.Check(ctx)
	}
	a.mu.Lock()
	if a.lastTests != nil {
		rep.Tests = proto.Clone(a.lastTests).(*typesv1.TestReport)
	}
	a.mu.Unlock()
	return rep
}

// errStopped ends the steps of a command that was stopped.
var errStopped = errors.New("stopped")

// exitError is a process that ended with a non-zero status.
type exitError struct {
	what string
	code int
}

func (e *exitError) Error() string { return fmt.Sprintf("%s exited with status %d", e.what, e.code) }

// running is the command in progress.
type running struct {
	id       string
	kind     typesv1.CommandKind
	detached bool
	out      *executor.Output

	// Guarded by agent.mu.
	proc       *executor.Process
	stopped    bool
	stopReason string
	stopCh     chan struct{}
	lastCode   int
}
