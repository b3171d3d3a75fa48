package commands

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// bulkRun is a command run on many hosts.
type bulkRun struct {
	seq uint64 // creation order; never changes
	// interrupted: a host's step was given up because the server stopped.
	interrupted atomic.Bool
	mu          sync.Mutex
	bulk        *fleetv1.BulkCommand // replaced, never mutated once published
}

func (b *bulkRun) snapshot() *fleetv1.BulkCommand {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.bulk
}

// KeptBulks is how many ended bulk runs GetBulk still answers for; older
// ones are forgotten (their commands stay in the store), so a long-running
// server does not grow with every run. Running ones are always kept.
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

// RunBulk starts a bulk run and returns it at once; its progress is
// published as BulkProgress events. One host's failure never stops the
// others (unless batches with a failure threshold are given).
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
	b := &bulkRun{bulk: &fleetv1.BulkCommand{BulkId: "bulk-" + newID()[4:], Command: spec.Command, State: fleetv1.BulkState_BULK_STATE_RUNNING,
		CreatedAt: timestamppb.New(m.now()), Actor: spec.Actor, PrNumber: spec.PRNumber, Commit: spec.Commit}}
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
	m.pruneBulksLocked()
	m.bulkSeq++
	b.seq = m.bulkSeq
	m.bulks[b.bulk.BulkId] = b
	m.mu.Unlock()
	m.publishBulk(b)
	go m.runBulk(context.WithoutCancel(ctx), b, spec, steps)
	return b.snapshot(), nil
}

func (m *Manager) publishBulk(b *bulkRun) {
	m.cfg.Hub.Publish(&fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_BulkProgress{BulkProgress: &fleetv1.BulkProgress{Bulk: b.snapshot()}}})
}

// setResult records one host's result and publishes the bulk.
func (m *Manager) setResult(b *bulkRun, hostID string, fn func(*fleetv1.BulkHostResult)) {
	b.mu.Lock()
	nb := proto.Clone(b.bulk).(*fleetv1.BulkCommand)
	for _, r := range nb.Results {
		if r.HostId == hostID {
			fn(r)
		}
	}
	b.bulk = nb
	b.mu.Unlock()
	m.publishBulk(b)
}

func (m *Manager) runBulk(ctx context.Context, b *bulkRun, spec BulkSpec, steps []string) {
	failures := 0
	var fmu sync.Mutex
	halted, stopped := false, false
	for _, batch := range spec.Batches {
		if !halted && !stopped {
			select {
			case <-m.stopped:
				stopped = true
			default:
			}
		}
		if halted || stopped {
			msg := "skipped: the run halted"
			if stopped {
				msg = "skipped: the server stopped"
			}
			for _, id := range batch {
				m.setResult(b, id, func(r *fleetv1.BulkHostResult) { r.Message = msg })
			}
			continue
		}
		sem := make(chan struct{}, spec.Concurrency)
		var wg sync.WaitGroup
		for _, id := range batch {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				if !m.runSteps(ctx, b, spec, id, steps) {
					fmu.Lock()
					failures++
					fmu.Unlock()
				}
			}()
		}
		wg.Wait()
		if spec.MaxFailures >= 0 && failures > spec.MaxFailures {
			halted = true
		}
	}
	b.mu.Lock()
	nb := proto.Clone(b.bulk).(*fleetv1.BulkCommand)
	nb.FinishedAt = timestamppb.New(m.now())
	total := len(nb.Results)
	switch {
	case stopped || b.interrupted.Load():
		nb.State = fleetv1.BulkState_BULK_STATE_FAILED
		nb.Message = fmt.Sprintf("the server stopped before the run ended (%d failed host(s) so far)", failures)
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
	b.bulk = nb
	b.mu.Unlock()
	m.mu.Lock()
	if m.deploy == b {
		m.deploy = nil
	}
	m.mu.Unlock()
	m.publishBulk(b)
}

// runSteps runs steps on one host in order, stopping at the first that does
// not succeed; it reports success.
func (m *Manager) runSteps(ctx context.Context, b *bulkRun, spec BulkSpec, hostID string, steps []string) bool {
	bulkID := b.snapshot().BulkId // b.bulk is replaced by other hosts' goroutines
	for _, step := range steps {
		c, err := m.run(ctx, spec.Actor, hostID, step, spec.Force, bulkID)
		if err != nil {
			var be *BlockedError
			m.setResult(b, hostID, func(r *fleetv1.BulkHostResult) {
				r.Message = step + ": " + err.Error()
				if errors.As(err, &be) {
					r.BlockReason = be.Reason.String()
				}
			})
			return false
		}
		m.setResult(b, hostID, func(r *fleetv1.BulkHostResult) { r.Command, r.Message = c, step+" running" })
		if done := m.Done(c.CommandId); done != nil {
			select {
			case <-done:
			case <-ctx.Done():
				return false
			case <-m.stopped:
				b.interrupted.Store(true)
				m.setResult(b, hostID, func(r *fleetv1.BulkHostResult) { r.Message = step + ": the server stopped while it ran" })
				return false
			}
		}
		c, _ = m.Get(ctx, c.CommandId)
		m.setResult(b, hostID, func(r *fleetv1.BulkHostResult) { r.Command, r.Message = c, step+": "+c.GetMessage() })
		if c.GetState() != typesv1.CommandState_COMMAND_STATE_SUCCEEDED {
			return false
		}
	}
	return true
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

// GetBulk returns a bulk run of this server process; ended runs are kept
// for the latest KeptBulks.
func (m *Manager) GetBulk(id string) (*fleetv1.BulkCommand, bool) {
	m.mu.Lock()
	b, ok := m.bulks[id]
	m.mu.Unlock()
	if !ok {
		return nil, false
	}
	return b.snapshot(), true
}
