package commands

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/controlplane/store"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// bulkRun is a command run on many hosts.
type bulkRun struct {
	seq uint64 // creation order; never changes
	// plan's steps, batches and settings never change; plan.Hosts is
	// guarded by mu.
	plan store.BulkPlan
	// onlineBy, when set, is until when a host of a run continued after a
	// restart may take to reconnect before its next step is refused as
	// offline: agents come back some seconds after the server.
	onlineBy time.Time
	// interrupted: a host's step was given up because the server stopped.
	interrupted atomic.Bool
	mu          sync.Mutex
	bulk        *fleetv1.BulkCommand // replaced, never mutated once published
	// saveMu orders writes to the store: each write takes the latest state
	// under it, so the last write is never an older state.
	saveMu sync.Mutex
	// pubMu orders BulkProgress events the same way: hosts progress
	// concurrently, and an older state published after a newer one would
	// leave watchers, and the hub's snapshots, behind.
	pubMu sync.Mutex
}

func (b *bulkRun) snapshot() *fleetv1.BulkCommand {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.bulk
}

// progress returns a host's progress; ok is false before it started.
func (b *bulkRun) progress(hostID string) (store.BulkHostProgress, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	p, ok := b.plan.Hosts[hostID]
	return p, ok
}

// record is the run as stored.
func (b *bulkRun) record() store.BulkRun {
	b.mu.Lock()
	defer b.mu.Unlock()
	plan := b.plan
	plan.Hosts = maps.Clone(b.plan.Hosts)
	return store.BulkRun{Bulk: b.bulk, Plan: plan}
}

// KeptBulks is how many ended bulk runs GetBulk still answers for, in
// memory and in the store; older ones are forgotten (their commands stay in
// the store), so a long-running server does not grow with every run.
// Running ones are always kept.
const KeptBulks = 100

// ErrBusy: a merge-and-deploy is running already.
var ErrBusy = errors.New("a merge-and-deploy is running already")

// BulkSpec describes a bulk run.
type BulkSpec struct {
	Actor   string
	Command string // a command name, "do-all", or "merge-and-deploy"
	HostIDs []string
	// Concurrency bounds hosts at once (default 10).
	Concurrency int
	Force       bool
	// Batches, when set, run in order instead of one concurrent pool; the run
	// halts when more than MaxFailures hosts failed.
	Batches     [][]string
	MaxFailures int
	// PRNumber and Commit name what a merge-and-deploy deploys.
	PRNumber int32
	Commit   string
}

// bulkStore returns the store of bulk runs, or nil when the configured
// store keeps none: runs then live in memory only.
func (m *Manager) bulkStore() store.Bulks {
	bs, _ := m.cfg.Store.(store.Bulks)
	return bs
}

// RunBulk starts a bulk run and returns it at once; its progress is
// published as BulkProgress events. One host's failure never stops the
// others (unless batches with a failure threshold are given). When the
// store keeps bulk runs, the run is stored at every change and a restarted
// server continues it ([Manager.ResumeBulks]).
func (m *Manager) RunBulk(ctx context.Context, spec BulkSpec) (*fleetv1.BulkCommand, error) {
	steps := []string{spec.Command}
	switch spec.Command {
	case "do-all":
		steps = []string{"pull", "switch", "test"}
	case "merge-and-deploy":
		steps = []string{"pull-switch"}
	default:
		if _, ok := Kinds[spec.Command]; !ok {
			return nil, &BlockedError{Reason: fleetv1.BlockReason_BLOCK_REASON_UNKNOWN_COMMAND, Message: fmt.Sprintf("unknown command %q", spec.Command)}
		}
	}
	if spec.Concurrency <= 0 {
		spec.Concurrency = 10
	}
	if len(spec.Batches) == 0 {
		spec.Batches = [][]string{spec.HostIDs}
		spec.MaxFailures = -1
	}
	b := &bulkRun{
		bulk: &fleetv1.BulkCommand{BulkId: "bulk-" + newID()[4:], Command: spec.Command, State: fleetv1.BulkState_BULK_STATE_RUNNING,
			CreatedAt: timestamppb.New(m.now()), Actor: spec.Actor, PrNumber: spec.PRNumber, Commit: spec.Commit},
		plan: store.BulkPlan{Steps: steps, Batches: spec.Batches, Concurrency: spec.Concurrency, Force: spec.Force,
			MaxFailures: spec.MaxFailures, Hosts: map[string]store.BulkHostProgress{}},
	}
	for _, batch := range spec.Batches {
		for _, id := range batch {
			b.bulk.Results = append(b.bulk.Results, &fleetv1.BulkHostResult{HostId: id, Message: "waiting"})
		}
	}
	m.mu.Lock()
	if spec.Command == "merge-and-deploy" {
		if m.deploy != nil {
			m.mu.Unlock()
			return nil, ErrBusy
		}
		m.deploy = b
	}
	m.addBulkLocked(b)
	m.mu.Unlock()
	// Stored before anyone hears of it, so a restart right after the reply
	// still continues it.
	m.saveBulk(ctx, b)
	m.publishBulk(b)
	go m.runBulk(context.WithoutCancel(ctx), b)
	return b.snapshot(), nil
}

// addBulkLocked registers a run; the caller holds m.mu.
func (m *Manager) addBulkLocked(b *bulkRun) {
	m.pruneBulksLocked()
	m.bulkSeq++
	b.seq = m.bulkSeq
	m.bulks[b.bulk.BulkId] = b
}

// publishBulk publishes the run's latest state. The hub keeps the states
// of running runs for snapshots.
func (m *Manager) publishBulk(b *bulkRun) {
	b.pubMu.Lock()
	defer b.pubMu.Unlock()
	m.cfg.Hub.Publish(&fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_BulkProgress{BulkProgress: &fleetv1.BulkProgress{Bulk: b.snapshot()}}})
}

// isStopped reports whether Loop ended (the server stops).
func (m *Manager) isStopped() bool {
	select {
	case <-m.stopped:
		return true
	default:
		return false
	}
}

// saveBulk stores the run's latest state. Once the server stops nothing is
// written: the store keeps the run as it last progressed, RUNNING, for the
// next server process to continue.
func (m *Manager) saveBulk(ctx context.Context, b *bulkRun) {
	bs := m.bulkStore()
	if bs == nil {
		return
	}
	b.saveMu.Lock()
	defer b.saveMu.Unlock()
	if m.isStopped() {
		return
	}
	rec := b.record()
	if err := bs.SaveBulk(context.WithoutCancel(ctx), rec); err != nil && !m.isStopped() {
		m.log.Error("store bulk run", "bulk_id", rec.Bulk.BulkId, "err", err)
	}
}

// updateHost applies fn to a copy of a host's result and to its progress, then
// stores and publishes the run.
func (m *Manager) updateHost(ctx context.Context, b *bulkRun, hostID string, fn func(*fleetv1.BulkHostResult, *store.BulkHostProgress)) {
	b.mu.Lock()
	nb := proto.Clone(b.bulk).(*fleetv1.BulkCommand)
	p := b.plan.Hosts[hostID]
	for _, r := range nb.Results {
		if r.HostId == hostID {
			fn(r, &p)
		}
	}
	b.plan.Hosts[hostID] = p
	b.bulk = nb
	b.mu.Unlock()
	m.saveBulk(ctx, b)
	m.publishBulk(b)
}

// setResult records one host's result (not its progress).
func (m *Manager) setResult(ctx context.Context, b *bulkRun, hostID string, fn func(*fleetv1.BulkHostResult)) {
	m.updateHost(ctx, b, hostID, func(r *fleetv1.BulkHostResult, _ *store.BulkHostProgress) { fn(r) })
}

// hostOutcome is how one host's part of a run ended.
type hostOutcome int

const (
	hostSucceeded hostOutcome = iota
	hostFailed
	// hostInterrupted: the server stopped while the host's step ran; the
	// next server process continues it.
	hostInterrupted
)

// runBulk runs the hosts that have not ended yet, batch after batch; hosts
// that ended (before a restart) count as they ended, so the halting rule
// is the same whether or not the server restarted in between.
func (m *Manager) runBulk(ctx context.Context, b *bulkRun) {
	plan := b.plan // steps, batches and settings: never change
	failures := 0
	var fmu sync.Mutex
	halted, stopped := false, false
	for _, batch := range plan.Batches {
		var todo []string
		for _, id := range batch {
			if p, ok := b.progress(id); ok && p.Ended {
				if !p.OK {
					failures++
				}
				continue
			}
			todo = append(todo, id)
		}
		if !halted && !stopped && m.isStopped() {
			stopped = true
		}
		if halted || stopped {
			msg := "skipped: the run halted"
			if stopped {
				msg = "skipped: the server stopped"
			}
			for _, id := range todo {
				m.setResult(ctx, b, id, func(r *fleetv1.BulkHostResult) { r.Message = msg })
			}
			continue
		}
		sem := make(chan struct{}, max(plan.Concurrency, 1))
		var wg sync.WaitGroup
		for _, id := range todo {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				out := m.runHost(ctx, b, id)
				if out == hostInterrupted {
					return // not ended: the next server process continues it
				}
				m.updateHost(ctx, b, id, func(_ *fleetv1.BulkHostResult, p *store.BulkHostProgress) { p.Ended, p.OK = true, out == hostSucceeded })
				if out == hostFailed {
					fmu.Lock()
					failures++
					fmu.Unlock()
				}
			}()
		}
		wg.Wait()
		if plan.MaxFailures >= 0 && failures > plan.MaxFailures {
			halted = true
		}
	}
	m.endBulk(ctx, b, func(nb *fleetv1.BulkCommand) {
		total := len(nb.Results)
		switch {
		case stopped || b.interrupted.Load():
			nb.State = fleetv1.BulkState_BULK_STATE_FAILED
			nb.Message = fmt.Sprintf("the server stopped before the run ended (%d failed host(s) so far)", failures)
			if m.bulkStore() != nil {
				nb.Message += "; it continues when the server starts again"
			}
		case halted:
			nb.State = fleetv1.BulkState_BULK_STATE_FAILED
			nb.Message = fmt.Sprintf("halted after %d failed host(s)", failures)
		case failures == 0:
			nb.State = fleetv1.BulkState_BULK_STATE_SUCCEEDED
			nb.Message = fmt.Sprintf("%d host(s) succeeded", total)
		case failures == total:
			nb.State = fleetv1.BulkState_BULK_STATE_FAILED
			nb.Message = fmt.Sprintf("all %d host(s) failed", total)
		default:
			nb.State = fleetv1.BulkState_BULK_STATE_PARTIAL
			nb.Message = fmt.Sprintf("%d of %d host(s) failed", failures, total)
		}
	})
}

// endBulk gives the run its end through fn, stores and publishes it, and
// prunes old ended runs from the store.
func (m *Manager) endBulk(ctx context.Context, b *bulkRun, fn func(*fleetv1.BulkCommand)) {
	b.mu.Lock()
	nb := proto.Clone(b.bulk).(*fleetv1.BulkCommand)
	nb.FinishedAt = timestamppb.New(m.now())
	fn(nb)
	b.bulk = nb
	b.mu.Unlock()
	m.mu.Lock()
	if m.deploy == b {
		m.deploy = nil
	}
	m.mu.Unlock()
	m.saveBulk(ctx, b)
	m.publishBulk(b)
	m.log.Info("bulk run ended", "bulk_id", nb.BulkId, "command", nb.Command, "state", nb.State.String(), "message", nb.Message)
	if bs := m.bulkStore(); bs != nil && !m.isStopped() {
		if _, err := bs.PruneBulks(ctx, KeptBulks); err != nil && !m.isStopped() {
			m.log.Warn("prune old bulk runs", "err", err)
		}
	}
}

// runHost runs the steps of one host in order, stopping at the first that
// does not succeed. A step whose command was queued before a restart is
// waited for, not run again.
func (m *Manager) runHost(ctx context.Context, b *bulkRun, hostID string) hostOutcome {
	first := b.snapshot()
	bulkID, actor := first.BulkId, first.Actor
	steps := b.plan.Steps
	i := 0
	if p, ok := b.progress(hostID); ok {
		i = p.Step
		if p.CommandID != "" {
			out := m.awaitStep(ctx, b, hostID, steps[i], p.CommandID)
			if out != hostSucceeded {
				return out
			}
			i++
		}
	}
	for ; i < len(steps); i++ {
		step := steps[i]
		if !m.awaitOnline(ctx, b, hostID) || m.isStopped() {
			// Nothing was queued: the next server process runs this step.
			b.interrupted.Store(true)
			m.setResult(ctx, b, hostID, func(r *fleetv1.BulkHostResult) { r.Message = step + ": not started, the server stopped" })
			return hostInterrupted
		}
		c, err := m.run(ctx, actor, hostID, step, b.plan.Force, bulkID)
		var be *BlockedError
		if errors.As(err, &be) && be.Reason == fleetv1.BlockReason_BLOCK_REASON_BUSY && be.RunningCommandID != "" {
			// The step was queued just before a restart, too late to be
			// recorded here: the busy command is this step's own.
			if rc, gerr := m.Get(ctx, be.RunningCommandID); gerr == nil && rc.BulkId == bulkID && rc.Command == step {
				c, err = rc, nil
			}
		}
		if err != nil {
			m.updateHost(ctx, b, hostID, func(r *fleetv1.BulkHostResult, p *store.BulkHostProgress) {
				p.Step, p.CommandID = i, ""
				r.Message = step + ": " + err.Error()
				if errors.Is(err, ErrNotFound) {
					r.Message = step + ": the host no longer exists"
				}
				if errors.As(err, &be) {
					r.BlockReason = be.Reason.String()
				}
			})
			return hostFailed
		}
		m.updateHost(ctx, b, hostID, func(r *fleetv1.BulkHostResult, p *store.BulkHostProgress) {
			p.Step, p.CommandID = i, c.CommandId
			r.Command, r.Message = c, step+" running"
		})
		if out := m.awaitStep(ctx, b, hostID, step, c.CommandId); out != hostSucceeded {
			return out
		}
	}
	return hostSucceeded
}

// awaitStep waits for a step's command to end and records its result.
func (m *Manager) awaitStep(ctx context.Context, b *bulkRun, hostID, step, commandID string) hostOutcome {
	if done := m.Done(commandID); done != nil {
		select {
		case <-done:
		case <-ctx.Done():
			return hostFailed
		case <-m.stopped:
			b.interrupted.Store(true)
			m.setResult(ctx, b, hostID, func(r *fleetv1.BulkHostResult) { r.Message = step + ": the server stopped while it ran" })
			return hostInterrupted
		}
	}
	c, err := m.Get(ctx, commandID)
	if err != nil {
		m.setResult(ctx, b, hostID, func(r *fleetv1.BulkHostResult) {
			r.Message = fmt.Sprintf("%s: its command %s cannot be read: %v", step, commandID, err)
		})
		return hostFailed
	}
	m.setResult(ctx, b, hostID, func(r *fleetv1.BulkHostResult) { r.Command, r.Message = c, step+": "+c.GetMessage() })
	if c.GetState() != typesv1.CommandState_COMMAND_STATE_SUCCEEDED {
		return hostFailed
	}
	return hostSucceeded
}

// awaitOnline gives a host of a run continued after a restart until
// b.onlineBy to reconnect; a fresh run refuses an offline host at once.
// It reports false when the server stopped meanwhile.
func (m *Manager) awaitOnline(ctx context.Context, b *bulkRun, hostID string) bool {
	if b.onlineBy.IsZero() || m.cfg.Hub.Conn(hostID) != nil {
		return true
	}
	if _, ok := m.cfg.Hub.Host(hostID); !ok {
		return true
	}
	m.setResult(ctx, b, hostID, func(r *fleetv1.BulkHostResult) {
		r.Message = "waiting for the host to reconnect after the server restart"
	})
	wait := time.Until(b.onlineBy)
	if wait <= 0 {
		return true
	}
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	poll := time.NewTicker(200 * time.Millisecond)
	defer poll.Stop()
	for m.cfg.Hub.Conn(hostID) == nil {
		select {
		case <-deadline.C:
			return true
		case <-m.stopped:
			return false
		case <-ctx.Done():
			return true
		case <-poll.C:
		}
	}
	return true
}

// ResumeBulks continues the bulk runs a previous server process left
// running; call it once at start, after [New] took over the commands those
// runs were waiting for and before the API serves. Each run waits for its
// taken-over commands, then runs its remaining hosts and batches under the
// same halting rule; hosts get ReconnectWait to come back first. A run that
// cannot be continued ends as failed, saying how many hosts it left
// undone. Resumption is logged and, when the store keeps an audit log,
// recorded there.
func (m *Manager) ResumeBulks(ctx context.Context) error {
	bs := m.bulkStore()
	if bs == nil {
		return nil
	}
	recs, err := bs.UnfinishedBulks(ctx)
	if err != nil {
		return fmt.Errorf("load unfinished bulk runs: %w", err)
	}
	for _, rec := range recs {
		b := &bulkRun{bulk: rec.Bulk, plan: rec.Plan, onlineBy: time.Now().Add(m.cfg.ReconnectWait)}
		if b.plan.Hosts == nil {
			b.plan.Hosts = map[string]store.BulkHostProgress{}
		}
		left := 0
		for _, r := range b.bulk.Results {
			if p, ok := b.plan.Hosts[r.HostId]; !ok || !p.Ended {
				left++
			}
		}
		m.mu.Lock()
		if b.bulk.Command == "merge-and-deploy" && m.deploy == nil {
			m.deploy = b
		}
		m.addBulkLocked(b)
		m.mu.Unlock()
		attrs := []any{"bulk_id", b.bulk.BulkId, "command", b.bulk.Command, "hosts_left", left, "actor", b.bulk.Actor}
		if b.bulk.PrNumber != 0 {
			attrs = append(attrs, "pr", b.bulk.PrNumber, "commit", b.bulk.Commit)
		}
		if why := checkPlan(b); why != "" {
			undone := "did not run " + b.bulk.Command
			if b.bulk.Command == "merge-and-deploy" {
				undone = "not deployed"
			}
			msg := fmt.Sprintf("interrupted by a server restart; %d host(s) %s", left, undone)
			m.log.Error("a bulk run from before the restart cannot continue", append(attrs, "reason", why)...)
			m.auditResume(ctx, b, "FailedPrecondition", msg+" ("+why+")")
			m.endBulk(ctx, b, func(nb *fleetv1.BulkCommand) {
				nb.State, nb.Message = fleetv1.BulkState_BULK_STATE_FAILED, msg
			})
			continue
		}
		m.log.Info("continuing a bulk run from before the restart", attrs...)
		m.auditResume(ctx, b, "ok", fmt.Sprintf("continued after a server restart; %d host(s) left", left))
		m.publishBulk(b)
		go m.runBulk(context.WithoutCancel(ctx), b)
	}
	return nil
}

// checkPlan says why a stored run cannot be continued, or "".
func checkPlan(b *bulkRun) string {
	p := b.plan
	if len(p.Steps) == 0 || len(p.Batches) == 0 {
		return "the stored run has no plan to continue"
	}
	for _, s := range p.Steps {
		if _, ok := Kinds[s]; !ok {
			return fmt.Sprintf("unknown step %q", s)
		}
	}
	inPlan := map[string]bool{}
	for _, batch := range p.Batches {
		for _, id := range batch {
			inPlan[id] = true
		}
	}
	for _, r := range b.bulk.Results {
		if !inPlan[r.HostId] {
			return fmt.Sprintf("host %q is in no batch", r.HostId)
		}
	}
	for id, hp := range p.Hosts {
		if hp.Step < 0 || hp.Step >= len(p.Steps) {
			return fmt.Sprintf("host %q is at step %d of %d", id, hp.Step, len(p.Steps))
		}
	}
	return ""
}

// auditResume records a resumption in the audit log, when the store keeps one.
func (m *Manager) auditResume(ctx context.Context, b *bulkRun, result, detail string) {
	a, ok := m.cfg.Store.(store.Audit)
	if !ok {
		return
	}
	bk := b.snapshot()
	d := bk.BulkId + " " + bk.Command
	if bk.PrNumber != 0 {
		d += fmt.Sprintf(" PR #%d %s", bk.PrNumber, bk.Commit)
	}
	if err := a.AppendAudit(context.WithoutCancel(ctx), store.AuditEvent{Time: m.now(), Actor: "system", Action: "ResumeBulkCommand",
		Result: result, Detail: d + ": " + detail}); err != nil {
		m.log.Warn("write audit record", "bulk_id", bk.BulkId, "err", err)
	}
}

// pruneBulksLocked forgets the oldest ended bulk runs so that, with the
// one about to be added, at most KeptBulks ended ones remain. Caller holds
// m.mu (which may be held while taking a run's own lock).
func (m *Manager) pruneBulksLocked() {
	var done []*bulkRun
	for _, b := range m.bulks {
		if b.snapshot().State != fleetv1.BulkState_BULK_STATE_RUNNING {
			done = append(done, b)
		}
	}
	if len(done) < KeptBulks {
		return
	}
	slices.SortFunc(done, func(a, b *bulkRun) int { return cmp.Compare(a.seq, b.seq) })
	for _, b := range done[:len(done)-KeptBulks+1] {
		delete(m.bulks, b.snapshot().BulkId)
	}
}

// GetBulk returns a bulk run: a run of this server process from memory,
// else an ended (or not yet continued) one from the store, which keeps the
// latest KeptBulks ended runs across restarts.
func (m *Manager) GetBulk(id string) (*fleetv1.BulkCommand, bool) {
	m.mu.Lock()
	b, ok := m.bulks[id]
	m.mu.Unlock()
	if ok {
		return b.snapshot(), true
	}
	bs := m.bulkStore()
	if bs == nil || id == "" {
		return nil, false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rec, err := bs.GetBulk(ctx, id)
	if err != nil {
		if !errors.Is(err, store.ErrNotFound) {
			m.log.Error("read bulk run", "bulk_id", id, "err", err)
		}
		return nil, false
	}
	return rec.Bulk, true
}

// RunningDeploy returns the running merge-and-deploy, also one continued
// after a restart, so that no second one merges meanwhile.
func (m *Manager) RunningDeploy() (*fleetv1.BulkCommand, bool) {
	m.mu.Lock()
	b := m.deploy
	m.mu.Unlock()
	if b == nil {
		return nil, false
	}
	return b.snapshot(), true
}
