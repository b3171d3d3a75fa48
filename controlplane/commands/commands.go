// Package commands runs the command lifecycle: validate (blocked with a
// reason code, or queued), deliver to the agent, running with live output
// that is stored before it is fanned out, post-validation of the goal, and
// the end — succeeded, partial, failed, stopped or timed out. It also closes
// commands the agent lost (reconnect without them), enforces warning and hard
// timeouts, serves logs from the store, and runs bulk commands.
package commands

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/controlplane/hub"
	"github.com/nixplane/nixplane/controlplane/status"
	"github.com/nixplane/nixplane/controlplane/store"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// BlockedError is a command the pre-checks refused.
type BlockedError struct {
	Reason  fleetv1.BlockReason
	Message string
	// RunningCommandID is set for BUSY.
	RunningCommandID string
}

func (e *BlockedError) Error() string { return e.Message }

// ErrNotFound: no such command or host.
var ErrNotFound = errors.New("not found")

// Timeouts of one command kind.
type Timeouts struct {
	Warning, Hard time.Duration
}

// Kinds maps command names to their protocol kind and timeouts (the
// predecessor's table).
var Kinds = map[string]struct {
	Kind typesv1.CommandKind
	Timeouts
}{
	"pull":        {typesv1.CommandKind_COMMAND_KIND_PULL, Timeouts{2 * time.Minute, 5 * time.Minute}},
	"switch":      {typesv1.CommandKind_COMMAND_KIND_SWITCH, Timeouts{10 * time.Minute, 30 * time.Minute}},
	"test":        {typesv1.CommandKind_COMMAND_KIND_TEST, Timeouts{5 * time.Minute, 10 * time.Minute}},
	"pull-switch": {typesv1.CommandKind_COMMAND_KIND_PULL_SWITCH, Timeouts{12 * time.Minute, 35 * time.Minute}},
	"rollback":    {typesv1.CommandKind_COMMAND_KIND_ROLLBACK, Timeouts{5 * time.Minute, 15 * time.Minute}},
	"restart":     {typesv1.CommandKind_COMMAND_KIND_RESTART, Timeouts{time.Minute, 2 * time.Minute}},
	"reboot":      {typesv1.CommandKind_COMMAND_KIND_REBOOT, Timeouts{5 * time.Minute, 15 * time.Minute}},
	"refresh":     {typesv1.CommandKind_COMMAND_KIND_REFRESH, Timeouts{time.Minute, 2 * time.Minute}},
}

// Store is what the manager persists to.
type Store interface {
	store.Commands
	store.Hosts
}

// TargetRefresher refetches the fleet target now.
type TargetRefresher interface {
	Refetch(ctx context.Context)
}

// Config configures a [Manager].
type Config struct {
	Hub   *hub.Hub
	Store Store
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// ReconnectWait is how long a command whose agent went away waits for it
	// to come back (a switch may restart the agent). Default 90s.
	ReconnectWait time.Duration
	// PostValidationWait bounds waiting for the agent's status report after
	// a switch. Default 60s.
	PostValidationWait time.Duration
	// StopGrace is the SIGTERM→SIGKILL grace the agent is given. Default 5s.
	StopGrace time.Duration
	// TimeoutScale multiplies every timeout (tests shrink them). Default 1.
	TimeoutScale float64
	// Target refetches the fleet target when a pull lands on another commit
	// than the cached one; nil judges against the cached target.
	Target TargetRefresher
	// OnComplete, if set, is called after a command ends (metrics, etc.).
	OnComplete func(*fleetv1.Command)
	Log        *slog.Logger
}

// Manager runs commands. Create with [New].
type Manager struct {
	cfg Config
	log *slog.Logger

	mu      sync.Mutex
	active  map[string]*run // by command id
	byHost  map[string]*run // host id → its active command
	waiters map[string][]chan struct{}
	bulks   map[string]*bulkRun
	bulkSeq uint64
	// stopped is closed when Loop ends (the server stops): bulk runs stop
	// waiting for their hosts then.
	stopped  chan struct{}
	stopOnce sync.Once
	deploy   *bulkRun // the running merge-and-deploy
}

// run is the manager's state of one active command.
type run struct {
	// id and host never change; read them without the lock.
	id, host string
	cmd      *fleetv1.Command // latest published copy; replaced, never mutated; guarded by m.mu
	kind     typesv1.CommandKind
	timeouts Timeouts
	// lostAt is when the agent went away while this ran; zero if connected.
	lostAt time.Time
	// timedOut: the hard timeout passed and a stop was sent.
	timedOut bool
	stopAt   time.Time
	// awaitStatusUntil is the post-validation deadline.
	awaitStatusUntil time.Time
	restarting       bool
	// fresh is the agent freshness judged when the agent came back after
	// this activation; nil until then.
	fresh *status.Judgement
	done  chan struct{}
	// pub serialises update and finish from clone to publish, so the store
	// and watchers see the states in the order they were decided.
	pub sync.Mutex
}

// New returns a manager. Commands left active by a previous server process
// are closed as failed: their agents lost them when the server went away.
func New(ctx context.Context, cfg Config) (*Manager, error) {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.ReconnectWait <= 0 {
		cfg.ReconnectWait = 90 * time.Second
	}
	if cfg.PostValidationWait <= 0 {
		cfg.PostValidationWait = 60 * time.Second
	}
	if cfg.StopGrace <= 0 {
		cfg.StopGrace = 5 * time.Second
	}
	if cfg.TimeoutScale <= 0 {
		cfg.TimeoutScale = 1
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	m := &Manager{cfg: cfg, log: cfg.Log, active: map[string]*run{}, byHost: map[string]*run{}, waiters: map[string][]chan struct{}{}, bulks: map[string]*bulkRun{},
		stopped: make(chan struct{})}
	stale, err := cfg.Store.ActiveCommands(ctx)
	if err != nil {
		return nil, err
	}
	for _, c := range stale {
		if err := m.adopt(ctx, c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *Manager) now() time.Time { return m.cfg.Now() }

// msgAwaitReconnect is the message of an activation waiting for the agent
// that it replaced; a restarted server recognises it by it.
const msgAwaitReconnect = "waiting for the new agent to reconnect"

// adopt takes over a command a previous server process left active. Its
// agent kept running it (or finished it, or restarted after a switch), so
// it gets ReconnectWait to come back and tell, exactly like an agent that
// went away: the hello then reconciles it, and an activation's agent
// freshness is judged against the identity stored before the restart.
// What cannot be reconciled ends as failed.
func (m *Manager) adopt(ctx context.Context, c *fleetv1.Command) error {
	c = proto.Clone(c).(*fleetv1.Command)
	k, known := Kinds[c.Command]
	_, hostKnown := m.cfg.Hub.Host(c.HostId)
	m.mu.Lock()
	busy := m.byHost[c.HostId] != nil
	m.mu.Unlock()
	activationCheck := c.State == typesv1.CommandState_COMMAND_STATE_POST_VALIDATION && isActivation(k.Kind)
	resumable := c.State == typesv1.CommandState_COMMAND_STATE_RUNNING || c.State == typesv1.CommandState_COMMAND_STATE_QUEUED || activationCheck
	if !known || !hostKnown || busy || !resumable {
		c.State = typesv1.CommandState_COMMAND_STATE_FAILED
		c.Message = "the server restarted while this command ran; its outcome is unknown"
		c.FinishedAt = timestamppb.New(m.now())
		c.Overdue = false
		return m.cfg.Store.UpdateCommand(ctx, c)
	}
	now := m.now()
	r := &run{id: c.CommandId, host: c.HostId, cmd: c, kind: k.Kind, timeouts: m.scaled(k.Timeouts), done: make(chan struct{}), lostAt: now}
	if activationCheck {
		r.awaitStatusUntil = now.Add(m.cfg.ReconnectWait)
		r.restarting = c.Message == msgAwaitReconnect
	}
	m.mu.Lock()
	m.active[r.id] = r
	m.byHost[r.host] = r
	m.mu.Unlock()
	m.cfg.Hub.CommandChanged(c)
	m.log.Info("resumed a command from before the restart; waiting for its agent", "command_id", c.CommandId, "host", c.HostId, "command", c.Command, "state", c.State.String())
	return nil
}

// isActivation reports whether a command kind activates a configuration
// (and so may replace the agent itself).
func isActivation(k typesv1.CommandKind) bool {
	switch k {
	case typesv1.CommandKind_COMMAND_KIND_SWITCH, typesv1.CommandKind_COMMAND_KIND_PULL_SWITCH, typesv1.CommandKind_COMMAND_KIND_ROLLBACK:
		return true
	}
	return false
}

func newID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return "cmd-" + hex.EncodeToString(b[:])
}

// Run validates and queues a command on a host.
func (m *Manager) Run(ctx context.Context, actor, hostID, name string, force bool) (*fleetv1.Command, error) {
	return m.run(ctx, actor, hostID, name, force, "")
}

func (m *Manager) run(ctx context.Context, actor, hostID, name string, force bool, bulkID string) (*fleetv1.Command, error) {
	name = strings.ToLower(strings.TrimSpace(name))
	host, ok := m.cfg.Hub.Host(hostID)
	if !ok {
		return nil, ErrNotFound
	}
	if name == "stop" {
		r := m.activeOn(hostID)
		if r == nil {
			return nil, &BlockedError{Reason: fleetv1.BlockReason_BLOCK_REASON_ALREADY_CURRENT, Message: "nothing is running on " + hostID}
		}
		return m.Stop(ctx, r.id)
	}
	k, ok := Kinds[name]
	if !ok {
		return nil, &BlockedError{Reason: fleetv1.BlockReason_BLOCK_REASON_UNKNOWN_COMMAND, Message: fmt.Sprintf("unknown command %q; known: pull, switch, test, pull-switch, rollback, restart, reboot, refresh, stop", name)}
	}
	conn := m.cfg.Hub.Conn(hostID)
	if conn == nil {
		return nil, &BlockedError{Reason: fleetv1.BlockReason_BLOCK_REASON_OFFLINE, Message: hostID + " is offline"}
	}
	if !force && name == "pull" && host.GetUpdateStatus().GetGit().GetStatus() == typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK &&
		host.GetUpdateStatus().GetLock().GetStatus() == typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK {
		return nil, &BlockedError{Reason: fleetv1.BlockReason_BLOCK_REASON_ALREADY_CURRENT, Message: hostID + " already runs the fleet target; force to pull anyway"}
	}
	now := m.now()
	cmd := &fleetv1.Command{CommandId: newID(), HostId: hostID, Command: name, State: typesv1.CommandState_COMMAND_STATE_QUEUED,
		CreatedAt: timestamppb.New(now), Actor: actor, BulkId: bulkID}
	r := &run{id: cmd.CommandId, host: hostID, cmd: cmd, kind: k.Kind, timeouts: m.scaled(k.Timeouts), done: make(chan struct{})}

	m.mu.Lock()
	if busy := m.byHost[hostID]; busy != nil {
		m.mu.Unlock()
		return nil, &BlockedError{Reason: fleetv1.BlockReason_BLOCK_REASON_BUSY, Message: fmt.Sprintf("%s is busy running %s (%s)", hostID, busy.cmd.Command, busy.cmd.CommandId), RunningCommandID: busy.cmd.CommandId}
	}
	m.active[cmd.CommandId] = r
	m.byHost[hostID] = r
	m.mu.Unlock()

	if err := m.cfg.Store.CreateCommand(ctx, cmd); err != nil {
		m.forget(r)
		return nil, fmt.Errorf("store command: %w", err)
	}
	m.cfg.Hub.CommandChanged(cmd)
	err := conn.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Run{Run: &agentv1.RunCommand{
		CommandId: cmd.CommandId, Kind: k.Kind, Timeout: durationpb.New(r.timeouts.Hard)}}})
	if err != nil {
		return m.finish(context.WithoutCancel(ctx), r, func(c *fleetv1.Command) {
			c.State = typesv1.CommandState_COMMAND_STATE_FAILED
			c.Message = "could not deliver the command to the agent: " + err.Error()
		}), nil
	}
	return m.update(ctx, r, func(c *fleetv1.Command) {
		// A fast agent may already have answered (output, a result moving
		// the command to post-validation): never move it back.
		if c.State == typesv1.CommandState_COMMAND_STATE_QUEUED {
			c.State = typesv1.CommandState_COMMAND_STATE_RUNNING
		}
		if c.StartedAt == nil {
			c.StartedAt = timestamppb.New(m.now())
		}
	}), nil
}

func (m *Manager) scaled(t Timeouts) Timeouts {
	return Timeouts{Warning: time.Duration(float64(t.Warning) * m.cfg.TimeoutScale), Hard: time.Duration(float64(t.Hard) * m.cfg.TimeoutScale)}
}

// current returns r's latest command.
func (m *Manager) current(r *run) *fleetv1.Command {
	m.mu.Lock()
	defer m.mu.Unlock()
	return r.cmd
}

func (m *Manager) activeOn(hostID string) *run {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.byHost[hostID]
}

func (m *Manager) get(id string) *run {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.active[id]
}

func (m *Manager) forget(r *run) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.active, r.id)
	if m.byHost[r.host] == r {
		delete(m.byHost, r.host)
	}
}

// mutate applies fn to a copy of an active run's command and installs it.
// It reports false, with the final command, when the run already ended.
// The caller holds r.pub, so the store and watchers get the states in order.
func (m *Manager) mutate(r *run, fn func(*fleetv1.Command)) (*fleetv1.Command, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.active[r.id] != r {
		return r.cmd, false
	}
	c := proto.Clone(r.cmd).(*fleetv1.Command)
	fn(c)
	r.cmd = c
	return c, true
}

func (m *Manager) persist(ctx context.Context, c *fleetv1.Command) {
	if err := m.cfg.Store.UpdateCommand(ctx, c); err != nil {
		m.log.Error("store command", "command_id", c.CommandId, "err", err)
	}
}

// update applies fn to a copy of the command, stores and publishes it. A
// command that ended meanwhile (a fast agent's result may arrive before Run
// marks it running) is left as it ended.
func (m *Manager) update(ctx context.Context, r *run, fn func(*fleetv1.Command)) *fleetv1.Command {
	r.pub.Lock()
	defer r.pub.Unlock()
	c, ok := m.mutate(r, fn)
	if !ok {
		return c
	}
	m.persist(ctx, c)
	m.cfg.Hub.CommandChanged(c)
	m.notify(r.id)
	return c
}

// finish ends a command: terminal state via fn, stored, published, waiters
// woken. Finishing twice is harmless: the second call returns the first end.
func (m *Manager) finish(ctx context.Context, r *run, fn func(*fleetv1.Command)) *fleetv1.Command {
	r.pub.Lock()
	defer r.pub.Unlock()
	c, ok := m.mutate(r, func(c *fleetv1.Command) {
		fn(c)
		c.FinishedAt = timestamppb.New(m.now())
		c.Overdue = false
	})
	if !ok {
		return c
	}
	m.persist(ctx, c)
	// Only now that the end is stored does the command leave the active
	// set: until then Get answers from r.cmd, never from a stale store row.
	// r.pub keeps a second finish or an update out meanwhile.
	m.forget(r)
	m.cfg.Hub.CommandChanged(c)
	close(r.done)
	m.notify(r.id)
	if m.cfg.OnComplete != nil {
		m.cfg.OnComplete(c)
	}
	m.log.Info("command ended", "command_id", c.CommandId, "host", c.HostId, "command", c.Command, "state", c.State.String(), "exit_code", c.ExitCode)
	return c
}

// Stop asks the agent to stop a running command. A command that already
// ended is returned as it is.
func (m *Manager) Stop(ctx context.Context, id string) (*fleetv1.Command, error) {
	r := m.get(id)
	if r == nil {
		c, err := m.cfg.Store.GetCommand(ctx, id)
		if errors.Is(err, store.ErrNotFound) {
			return nil, ErrNotFound
		}
		return c, err
	}
	conn := m.cfg.Hub.Conn(r.host)
	if conn == nil {
		// The agent is gone; nothing can run it any more.
		return m.finish(ctx, r, func(c *fleetv1.Command) {
			c.State = typesv1.CommandState_COMMAND_STATE_STOPPED
			c.Message = "stopped while the host was offline"
		}), nil
	}
	m.mu.Lock()
	if r.stopAt.IsZero() {
		r.stopAt = m.now()
	}
	m.mu.Unlock()
	if err := conn.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Stop{Stop: &agentv1.StopCommand{
		CommandId: id, Grace: durationpb.New(m.cfg.StopGrace)}}}); err != nil {
		return nil, fmt.Errorf("send stop to agent: %w", err)
	}
	return m.current(r), nil
}

func (m *Manager) storeAndPublish(ctx context.Context, hostID, cmdID string, lines []*typesv1.OutputLine) {
	if err := m.cfg.Store.AppendLines(ctx, cmdID, lines); err != nil {
		m.log.Error("store output", "command_id", cmdID, "err", err)
	}
	m.cfg.Hub.Publish(&fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_CommandOutput{CommandOutput: &fleetv1.CommandOutput{
		CommandId: cmdID, HostId: hostID, Lines: lines}}})
	m.notify(cmdID)
}

// HandleOutput stores a batch of output lines from a host's agent, then fans
// them out. Lines for a command the host does not run are dropped.
func (m *Manager) HandleOutput(ctx context.Context, hostID string, out *agentv1.CommandOutput) {
	r := m.get(out.CommandId)
	if r == nil || r.host != hostID || len(out.Lines) == 0 {
		return
	}
	m.storeAndPublish(ctx, hostID, out.CommandId, out.Lines)
	m.mu.Lock()
	if last := out.Lines[len(out.Lines)-1].Seq; last > r.cmd.LineCount {
		c := proto.Clone(r.cmd).(*fleetv1.Command)
		c.LineCount = last
		r.cmd = c
	}
	m.mu.Unlock()
}

// HandleProgress records a phase of a running command.
func (m *Manager) HandleProgress(ctx context.Context, hostID string, p *agentv1.CommandProgress) {
	r := m.get(p.CommandId)
	if r == nil || r.host != hostID {
		return
	}
	m.update(ctx, r, func(c *fleetv1.Command) {
		c.Phase, c.ProgressCurrent, c.ProgressTotal = p.Phase, p.Current, p.Total
	})
}

// HandleRejected ends a command the agent refused.
func (m *Manager) HandleRejected(ctx context.Context, hostID string, rj *agentv1.CommandRejected) {
	r := m.get(rj.CommandId)
	if r == nil || r.host != hostID {
		return
	}
	m.finish(ctx, r, func(c *fleetv1.Command) {
		c.State = typesv1.CommandState_COMMAND_STATE_FAILED
		c.Message = "agent refused: " + rj.Message
		if rj.Reason == agentv1.RejectReason_REJECT_REASON_BUSY {
			c.BlockReason = fleetv1.BlockReason_BLOCK_REASON_BUSY.String()
		}
	})
}

// HandleResult processes the end of a command on the agent: a failed or
// stopped command ends now; a successful one goes through post-validation.
func (m *Manager) HandleResult(ctx context.Context, hostID string, res *agentv1.CommandResult) {
	r := m.get(res.CommandId)
	if r == nil || r.host != hostID {
		return
	}
	m.applyResult(ctx, r, res)
}

func (m *Manager) applyResult(ctx context.Context, r *run, res *agentv1.CommandResult) {
	if res.Tests != nil {
		if _, err := m.cfg.Hub.UpdateRecord(r.host, func(h *fleetv1.Host) { h.Tests = res.Tests }); err == nil {
			m.persistHost(ctx, r.host)
		}
	}
	switch res.Outcome {
	case agentv1.Outcome_OUTCOME_STOPPED:
		m.mu.Lock()
		// Nobody asked for this stop: the agent enforced the hard timeout.
		timedOut := r.timedOut || r.stopAt.IsZero()
		m.mu.Unlock()
		m.finish(ctx, r, func(c *fleetv1.Command) {
			c.ExitCode = res.ExitCode
			if timedOut {
				c.State = typesv1.CommandState_COMMAND_STATE_TIMED_OUT
				c.Message = fmt.Sprintf("stopped after its hard timeout (%s)", r.timeouts.Hard)
			} else {
				c.State = typesv1.CommandState_COMMAND_STATE_STOPPED
				c.Message = "stopped on request"
			}
		})
		return
	case agentv1.Outcome_OUTCOME_SUCCEEDED:
	default:
		m.finish(ctx, r, func(c *fleetv1.Command) {
			c.State = typesv1.CommandState_COMMAND_STATE_FAILED
			c.ExitCode = res.ExitCode
			c.Message = res.Message
			if c.Message == "" {
				c.Message = fmt.Sprintf("exit status %d", res.ExitCode)
			}
		})
		return
	}
	// Post-validation: did the command reach its goal?
	switch r.kind {
	case typesv1.CommandKind_COMMAND_KIND_SWITCH, typesv1.CommandKind_COMMAND_KIND_PULL_SWITCH, typesv1.CommandKind_COMMAND_KIND_ROLLBACK:
		m.mu.Lock()
		r.awaitStatusUntil = m.now().Add(m.cfg.PostValidationWait)
		r.restarting = res.AgentRestarting
		if res.AgentRestarting {
			r.awaitStatusUntil = m.now().Add(m.cfg.ReconnectWait)
		}
		m.mu.Unlock()
		m.update(ctx, r, func(c *fleetv1.Command) {
			c.State = typesv1.CommandState_COMMAND_STATE_POST_VALIDATION
			c.ExitCode = res.ExitCode
			c.Message = "checking the running system"
			if res.AgentRestarting {
				c.Message = msgAwaitReconnect
			}
		})
		// The status report the agent sends after the result completes it
		// (HandleStatus); if the generation goal already fails, say so then.
		return
	}
	if t := m.cfg.Hub.Target(); r.kind == typesv1.CommandKind_COMMAND_KIND_PULL && m.cfg.Target != nil &&
		(t == nil || !status.SameCommit(res.Generation, t.GitCommit)) {
		// The host may have pulled a commit newer than the cached target:
		// refetch it before judging, off the agent's receive loop.
		m.update(ctx, r, func(c *fleetv1.Command) {
			c.State = typesv1.CommandState_COMMAND_STATE_POST_VALIDATION
			c.ExitCode = res.ExitCode
			c.Message = "checking the fleet target"
		})
		go func() {
			ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			m.cfg.Target.Refetch(ctx)
			m.finishWithGoal(ctx, r, res)
		}()
		return
	}
	m.finishWithGoal(ctx, r, res)
}

// finishWithGoal ends a command that exited 0 as succeeded or partial.
func (m *Manager) finishWithGoal(ctx context.Context, r *run, res *agentv1.CommandResult) {
	state, msg := m.checkGoal(r, res)
	m.finish(ctx, r, func(c *fleetv1.Command) {
		c.ExitCode = res.ExitCode
		c.State, c.Message = state, msg
	})
}

// checkGoal decides succeeded or partial for commands that need no status
// report: pull must land on the fleet target.
func (m *Manager) checkGoal(r *run, res *agentv1.CommandResult) (typesv1.CommandState, string) {
	if r.kind == typesv1.CommandKind_COMMAND_KIND_PULL {
		t := m.cfg.Hub.Target()
		switch {
		case t == nil || t.GitCommit == "" || t.Error != "":
			return typesv1.CommandState_COMMAND_STATE_SUCCEEDED, "pulled " + status.Short(res.Generation) + " (no fleet target to verify against)"
		case !status.SameCommit(res.Generation, t.GitCommit):
			return typesv1.CommandState_COMMAND_STATE_PARTIAL, fmt.Sprintf("pulled %s, but the fleet target is %s", status.Short(res.Generation), status.Short(t.GitCommit))
		}
		return typesv1.CommandState_COMMAND_STATE_SUCCEEDED, "now at " + status.Short(res.Generation)
	}
	if res.Message != "" {
		return typesv1.CommandState_COMMAND_STATE_SUCCEEDED, res.Message
	}
	return typesv1.CommandState_COMMAND_STATE_SUCCEEDED, "done"
}

// HandleStatus records an agent's status report in the host's record and
// completes an activation waiting in post-validation: the running system
// decides succeeded or partial, and the agent's freshness is told — a stale
// agent (the agent saw its installed binary change and restarted, yet the
// old binary runs again) makes the command partial.
func (m *Manager) HandleStatus(ctx context.Context, hostID string, st *agentv1.StatusReport) {
	_, err := m.cfg.Hub.UpdateRecord(hostID, func(h *fleetv1.Host) { ApplyStatus(h, st) })
	if err != nil {
		return
	}
	m.persistHost(ctx, hostID)
	r := m.activeOn(hostID)
	// A pull re-checking the target is also in post-validation; only an
	// activation is completed by a status report.
	if r == nil || !isActivation(r.kind) || m.current(r).State != typesv1.CommandState_COMMAND_STATE_POST_VALIDATION {
		return
	}
	m.mu.Lock()
	fresh, restarting := r.fresh, r.restarting
	m.mu.Unlock()
	if fresh == nil {
		// The agent was not replaced. Unless it said its installed binary
		// changed, this activation brought no new agent and none was
		// expected of it — a fleet flake that still pins an older agent is
		// not a stale binary; the Agent compartment still shows the version
		// mismatch as outdated.
		j, ok := m.judgeFreshness(ctx, hostID, nil, true, restarting)
		if ok {
			fresh = &j
		}
	}
	m.finish(ctx, r, func(c *fleetv1.Command) {
		sys := st.GetSystem()
		switch sys.GetStatus() {
		case typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK:
			c.State, c.Message = typesv1.CommandState_COMMAND_STATE_SUCCEEDED, "running system is current"
		case typesv1.CompartmentStatus_COMPARTMENT_STATUS_OUTDATED, typesv1.CompartmentStatus_COMPARTMENT_STATUS_ERROR:
			c.State, c.Message = typesv1.CommandState_COMMAND_STATE_PARTIAL, "switch exited 0 but the running system is not what the flake builds: "+sys.GetMessage()
		default:
			c.State, c.Message = typesv1.CommandState_COMMAND_STATE_SUCCEEDED, "switch exited 0; running system not verifiable: "+sys.GetMessage()
		}
		if restarting {
			c.Message += " (agent restarted)"
		}
		if fresh == nil {
			return
		}
		switch fresh.Freshness {
		case typesv1.AgentFreshness_AGENT_FRESHNESS_STALE:
			c.State = typesv1.CommandState_COMMAND_STATE_PARTIAL
			c.Message += "; stale agent: " + fresh.Message
		case typesv1.AgentFreshness_AGENT_FRESHNESS_SUSPICIOUS:
			c.Message += "; suspicious agent: " + fresh.Message
		case typesv1.AgentFreshness_AGENT_FRESHNESS_FRESH:
			if restarting {
				c.Message += "; " + fresh.Message
			}
		case typesv1.AgentFreshness_AGENT_FRESHNESS_UNKNOWN:
			if restarting {
				c.Message += "; agent freshness unknown: " + fresh.Message
			}
		}
	})
}

// judgeFreshness decides the agent's freshness and records it with the
// identity in the host's durable record. hello is the agent's new hello, or
// nil when the agent did not reconnect (its identity is unchanged);
// afterActivation says a switch, pull-switch or rollback ran since the
// recorded identity. The previous identity is the stored record's, so the
// verdict survives a server restart between the switch and the reconnect.
func (m *Manager) judgeFreshness(ctx context.Context, hostID string, hello *agentv1.Hello, afterActivation, changeExpected bool) (status.Judgement, bool) {
	var j status.Judgement
	var before typesv1.AgentFreshness
	changed := false
	_, err := m.cfg.Hub.UpdateRecord(hostID, func(h *fleetv1.Host) {
		prev := status.IdentityOf(h)
		cur, version := prev, h.AgentVersion
		if hello != nil {
			cur = status.Identity{SourceCommit: hello.SourceCommit, BinaryHash: hello.BinaryHash, StorePath: hello.StorePath}
			version = hello.AgentVersion
		}
		before = h.AgentFreshness
		j = status.JudgeFreshness(status.FreshnessInputs{Prev: prev, Cur: cur, PrevFreshness: h.AgentFreshness,
			AfterActivation: afterActivation, ChangeExpected: changeExpected, AgentVersion: version, ServerVersion: m.cfg.Hub.ServerVersion()})
		changed = cur != prev || j.Freshness != h.AgentFreshness
		cur.Set(h)
		h.AgentFreshness = j.Freshness
	})
	if err != nil {
		return j, false
	}
	if changed {
		// A reconnect with the same binary writes nothing (a restart storm
		// of a large fleet would otherwise write every host).
		m.persistHost(ctx, hostID)
	}
	if afterActivation || j.Freshness != before {
		m.log.Info("agent freshness", "host", hostID, "freshness", j.Freshness.String(), "after_activation", afterActivation, "reason", j.Message)
	}
	return j, true
}

// ApplyStatus copies a status report into a host record.
func ApplyStatus(h *fleetv1.Host, st *agentv1.StatusReport) {
	if st.Generation != "" {
		h.Generation = st.Generation
		h.GenerationMessage = st.GenerationMessage
	}
	h.LockHash = st.LockHash
	if st.Tests != nil {
		h.Tests = st.Tests
	}
	if h.UpdateStatus == nil {
		h.UpdateStatus = &typesv1.UpdateStatus{}
	}
	if s := st.System; s != nil {
		h.UpdateStatus.System = &typesv1.Compartment{Status: s.Status, Message: s.Message, CheckedAt: s.CheckedAt}
	}
}

func (m *Manager) persistHost(ctx context.Context, hostID string) {
	h, ok := m.cfg.Hub.Host(hostID)
	if !ok {
		return
	}
	if err := m.cfg.Store.UpdateHostRecord(ctx, hostID, Durable(h)); err != nil && !errors.Is(err, store.ErrNotFound) {
		m.log.Error("store host", "host", hostID, "err", err)
	}
}

// Durable returns a copy of h without live fields, as stored.
func Durable(h *fleetv1.Host) *fleetv1.Host {
	d := proto.Clone(h).(*fleetv1.Host)
	d.Online, d.LastSeen, d.Metrics, d.RunningCommand, d.AvailableCommands = false, nil, nil, nil, nil
	return d
}

// HandleHello reconciles a reconnecting agent with the command it was
// running: a command it no longer runs is closed with its last result, or as
// failed, never left stuck. It records the agent's binary identity and
// judges its freshness: after an activation that was waiting for the agent,
// against the identity recorded before it. An activation still waiting in
// post-validation asks the new agent for the status report that completes
// it.
func (m *Manager) HandleHello(ctx context.Context, hostID string, hello *agentv1.Hello) {
	r := m.activeOn(hostID)
	if r != nil {
		m.reconcile(ctx, r, hello)
	}
	awaiting := r != nil && isActivation(r.kind) && hello.RunningCommandId != r.id && m.get(r.id) == r &&
		m.current(r).State == typesv1.CommandState_COMMAND_STATE_POST_VALIDATION
	restarting := false
	if awaiting {
		m.mu.Lock()
		restarting = r.restarting
		m.mu.Unlock()
	}
	j, ok := m.judgeFreshness(ctx, hostID, hello, awaiting, restarting)
	if !awaiting {
		return
	}
	m.mu.Lock()
	if ok {
		r.fresh = &j
	}
	// The new agent computes its status now (a nix evaluation): give it the
	// full post-validation wait from here, however long the restart took.
	if until := m.now().Add(m.cfg.PostValidationWait); r.awaitStatusUntil.Before(until) {
		r.awaitStatusUntil = until
	}
	m.mu.Unlock()
	if conn := m.cfg.Hub.Conn(hostID); conn != nil {
		if err := conn.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Refresh{Refresh: &agentv1.RefreshStatus{}}}); err != nil {
			m.log.Warn("ask the reconnected agent for its status", "host", hostID, "err", err)
		}
	}
}

// reconcile settles r with what a reconnecting agent's hello says.
func (m *Manager) reconcile(ctx context.Context, r *run, hello *agentv1.Hello) {
	m.mu.Lock()
	r.lostAt = time.Time{}
	m.mu.Unlock()
	if hello.RunningCommandId == r.id {
		return // still running; output and result will follow
	}
	if lr := hello.LastResult; lr != nil && lr.CommandId == r.id {
		if m.current(r).State != typesv1.CommandState_COMMAND_STATE_POST_VALIDATION {
			m.applyResult(ctx, r, lr)
		}
		return // post-validation completes with the status report
	}
	if m.current(r).State == typesv1.CommandState_COMMAND_STATE_POST_VALIDATION {
		return
	}
	m.finish(ctx, r, func(c *fleetv1.Command) {
		c.State = typesv1.CommandState_COMMAND_STATE_FAILED
		c.Message = "the agent reconnected without this command; its outcome is unknown"
	})
}

// HandleDisconnect notes that a host's agent went away; its command waits
// ReconnectWait for the agent to come back before it fails.
func (m *Manager) HandleDisconnect(hostID string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if r := m.byHost[hostID]; r != nil && r.lostAt.IsZero() {
		r.lostAt = m.now()
	}
}

// Tick enforces timeouts; call it every second.
func (m *Manager) Tick(ctx context.Context) {
	now := m.now()
	m.mu.Lock()
	runs := make([]*run, 0, len(m.active))
	for _, r := range m.active {
		runs = append(runs, r)
	}
	m.mu.Unlock()
	for _, r := range runs {
		m.mu.Lock()
		c := r.cmd
		lostAt, stopAt, timedOut, until := r.lostAt, r.stopAt, r.timedOut, r.awaitStatusUntil
		m.mu.Unlock()
		started := c.GetStartedAt().AsTime()
		if c.StartedAt == nil {
			started = c.GetCreatedAt().AsTime()
		}
		switch {
		case !lostAt.IsZero() && now.Sub(lostAt) > m.cfg.ReconnectWait:
			m.finish(ctx, r, func(c *fleetv1.Command) {
				c.State = typesv1.CommandState_COMMAND_STATE_FAILED
				c.Message = "the agent went away and did not come back"
			})
		case c.State == typesv1.CommandState_COMMAND_STATE_POST_VALIDATION && !until.IsZero() && now.After(until):
			m.finish(ctx, r, func(c *fleetv1.Command) {
				c.State = typesv1.CommandState_COMMAND_STATE_PARTIAL
				c.Message = "exited 0, but the agent did not report the system's state in time"
			})
		case !stopAt.IsZero() && now.Sub(stopAt) > m.cfg.StopGrace+15*time.Second:
			m.finish(ctx, r, func(c *fleetv1.Command) {
				c.State = typesv1.CommandState_COMMAND_STATE_STOPPED
				if timedOut {
					c.State = typesv1.CommandState_COMMAND_STATE_TIMED_OUT
				}
				c.Message = "the agent did not confirm the stop"
			})
		case !timedOut && c.State == typesv1.CommandState_COMMAND_STATE_RUNNING && now.Sub(started) > r.timeouts.Hard:
			m.mu.Lock()
			r.timedOut = true
			m.mu.Unlock()
			if _, err := m.Stop(ctx, c.CommandId); err != nil {
				m.log.Warn("stop timed-out command", "command_id", c.CommandId, "err", err)
			}
		case !c.Overdue && c.State == typesv1.CommandState_COMMAND_STATE_RUNNING && now.Sub(started) > r.timeouts.Warning:
			m.update(ctx, r, func(c *fleetv1.Command) { c.Overdue = true })
		}
	}
}

// Loop enforces timeouts every second until ctx ends; then bulk runs end
// too, as nothing would end their commands any more.
func (m *Manager) Loop(ctx context.Context) error {
	defer m.stopOnce.Do(func() { close(m.stopped) })
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			m.Tick(ctx)
		}
	}
}

// Get returns a command: the live copy when active, else the stored one.
func (m *Manager) Get(ctx context.Context, id string) (*fleetv1.Command, error) {
	if r := m.get(id); r != nil {
		m.mu.Lock()
		defer m.mu.Unlock()
		return r.cmd, nil
	}
	c, err := m.cfg.Store.GetCommand(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, ErrNotFound
	}
	return c, err
}

// Done returns a channel closed when the command ends, or nil when it is not
// active.
func (m *Manager) Done(id string) <-chan struct{} {
	if r := m.get(id); r != nil {
		return r.done
	}
	return nil
}

// subscribe returns a channel signalled when a command gets lines or changes.
func (m *Manager) subscribe(id string) (chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	m.mu.Lock()
	m.waiters[id] = append(m.waiters[id], ch)
	m.mu.Unlock()
	return ch, func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		ws := m.waiters[id]
		for i, w := range ws {
			if w == ch {
				ws = append(ws[:i], ws[i+1:]...)
				break
			}
		}
		if len(ws) == 0 {
			delete(m.waiters, id)
		} else {
			m.waiters[id] = ws
		}
	}
}

func (m *Manager) notify(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, ch := range m.waiters[id] {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// Follow sends a command's lines after afterSeq to fn as they are stored,
// and returns the ended command once it is over and every line was sent.
func (m *Manager) Follow(ctx context.Context, id string, afterSeq uint64, fn func([]*typesv1.OutputLine) error) (*fleetv1.Command, error) {
	ch, cancel := m.subscribe(id)
	defer cancel()
	for {
		c, err := m.Get(ctx, id)
		if err != nil {
			return nil, err
		}
		ended := status.IsTerminal(c.State)
		for {
			lines, err := m.cfg.Store.ReadLines(ctx, id, afterSeq, 1000)
			if err != nil {
				return nil, err
			}
			if len(lines) == 0 {
				break
			}
			if err := fn(lines); err != nil {
				return nil, err
			}
			afterSeq = lines[len(lines)-1].Seq
		}
		if ended {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-ch:
		}
	}
}
