package github

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nixplane/nixplane/controlplane/commands"
	"github.com/nixplane/nixplane/controlplane/hub"
	"github.com/nixplane/nixplane/controlplane/validate"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// DefaultBatchSize is the number of hosts per batch after the canaries.
const DefaultBatchSize = 5

// TargetRefresher refetches the fleet target now.
type TargetRefresher interface {
	Refetch(ctx context.Context)
}

// Merger merges a pull request; [Poller] is one.
type Merger interface {
	Merge(ctx context.Context, number int32, actor string) (MergeResult, error)
}

// Deployer implements Merge & Deploy: merge the pending flake-update PR,
// refetch the fleet target, then pull-switch the chosen hosts — canaries
// first and alone, then batches — halting when failures pass the
// threshold. It satisfies fleetapi.Deployer.
type Deployer struct {
	// PRs merges the pull request after the checks.
	PRs Merger
	// Hub knows the pending PR, the hosts and the fleet target.
	Hub *hub.Hub
	// Commands runs the deploy as a bulk run.
	Commands *commands.Manager
	// Target is refetched after the merge so hosts are judged against the
	// merged commit; may be nil.
	Target TargetRefresher
	// TargetWait bounds waiting for the target to show the merged commit
	// (default 10s); the deploy starts anyway after it.
	TargetWait time.Duration
	Log        *slog.Logger

	mu      sync.Mutex
	merging bool   // a merge is in progress
	bulkID  string // the latest deploy's bulk run
}

func (d *Deployer) logger() *slog.Logger {
	if d.Log != nil {
		return d.Log
	}
	return slog.Default()
}

// plan is a validated request.
type plan struct {
	hosts   []string
	batches [][]string
}

// MergeAndDeploy implements fleetapi.Deployer. Errors are gRPC status
// errors: InvalidArgument for a bad request, NotFound for an unknown host,
// FailedPrecondition when the PR is not the pending one, cannot be merged
// or a chosen host is offline, Aborted while another merge-and-deploy runs,
// Unavailable when GitHub cannot be reached. Nothing is merged or deployed
// when an error is returned.
func (d *Deployer) MergeAndDeploy(ctx context.Context, actor string, req *fleetv1.MergeAndDeployRequest) (*fleetv1.BulkCommand, error) {
	if req.PrNumber <= 0 {
		return nil, status.Error(codes.InvalidArgument, "pr_number is required")
	}
	pl, err := d.plan(req)
	if err != nil {
		return nil, err
	}
	if err := d.claim(); err != nil {
		return nil, err
	}
	defer d.release()

	pr, _ := d.Hub.PendingPR()
	switch {
	case pr == nil:
		return nil, status.Errorf(codes.FailedPrecondition, "no flake-update PR is pending; PR #%d cannot be deployed", req.PrNumber)
	case pr.Number != req.PrNumber:
		return nil, status.Errorf(codes.FailedPrecondition, "PR #%d is not the pending flake-update PR (#%d is)", req.PrNumber, pr.Number)
	}
	if err := ctx.Err(); err != nil {
		return nil, status.FromContextError(err).Err()
	}
	// Once asked, GitHub may merge whether or not the caller still waits:
	// the merge (bounded by the poller's timeout) and the deploy run to
	// the end even if the caller goes away, so main is never merged with
	// nobody deploying it.
	ctx = context.WithoutCancel(ctx)
	res, err := d.PRs.Merge(ctx, req.PrNumber, actor)
	if err != nil {
		return nil, mergeStatus(err)
	}
	d.awaitTarget(ctx, res.SHA)
	b, err := d.Commands.RunBulk(ctx, commands.BulkSpec{Actor: actor, Command: "merge-and-deploy", HostIDs: pl.hosts, Batches: pl.batches,
		MaxFailures: int(req.MaxFailures), PRNumber: req.PrNumber, Commit: res.SHA})
	if err != nil {
		d.logger().Error("merged, but the deploy did not start", "pr", req.PrNumber, "commit", res.SHA, "err", err)
		if errors.Is(err, commands.ErrBusy) {
			return nil, status.Errorf(codes.Aborted, "PR #%d was merged, but another merge-and-deploy is running; deploy the hosts when it ends", req.PrNumber)
		}
		return nil, status.Errorf(codes.Internal, "PR #%d was merged, but the deploy did not start; see the server log", req.PrNumber)
	}
	d.mu.Lock()
	d.bulkID = b.BulkId
	d.mu.Unlock()
	d.logger().Info("merge-and-deploy started", "pr", req.PrNumber, "commit", res.SHA, "bulk_id", b.BulkId, "hosts", len(pl.hosts),
		"batches", len(pl.batches), "max_failures", req.MaxFailures, "actor", actor)
	return b, nil
}

// claim refuses a second merge-and-deploy while one merges or deploys.
func (d *Deployer) claim() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.merging {
		return status.Error(codes.Aborted, "a merge-and-deploy is already running (merging its PR); wait for it to end")
	}
	// Also one a restarted server continues, which this deployer never started.
	if b, ok := d.Commands.RunningDeploy(); ok {
		return status.Errorf(codes.Aborted, "a merge-and-deploy is already running (%s); wait for it to end", b.BulkId)
	}
	if d.bulkID != "" {
		if b, ok := d.Commands.GetBulk(d.bulkID); ok && b.State == fleetv1.BulkState_BULK_STATE_RUNNING {
			return status.Errorf(codes.Aborted, "a merge-and-deploy is already running (%s); wait for it to end", b.BulkId)
		}
	}
	d.merging = true
	return nil
}

func (d *Deployer) release() {
	d.mu.Lock()
	d.merging = false
	d.mu.Unlock()
}

// plan validates the hosts and builds the batches: the canaries alone,
// then the rest in batches of batch_size.
func (d *Deployer) plan(req *fleetv1.MergeAndDeployRequest) (*plan, error) {
	if req.BatchSize < 0 {
		return nil, status.Error(codes.InvalidArgument, "batch_size must not be negative")
	}
	if req.MaxFailures < 0 {
		return nil, status.Error(codes.InvalidArgument, "max_failures must not be negative")
	}
	size := int(req.BatchSize)
	if size == 0 {
		size = DefaultBatchSize
	}
	var hosts []string
	var offline []string
	seen := map[string]bool{}
	if len(req.HostIds) == 0 {
		for _, h := range d.Hub.Hosts() {
			if h.Online {
				hosts = append(hosts, h.HostId)
			}
		}
		slices.Sort(hosts)
		if len(hosts) == 0 {
			return nil, status.Error(codes.FailedPrecondition, "no host is online to deploy to")
		}
	} else {
		for _, id := range req.HostIds {
			h, ok := d.Hub.Host(id)
			if !ok {
				return nil, status.Errorf(codes.NotFound, "host %q not found", printable(id))
			}
			if seen[id] {
				return nil, status.Errorf(codes.InvalidArgument, "host %q listed twice", id)
			}
			seen[id] = true
			if !h.Online {
				offline = append(offline, id)
			}
			hosts = append(hosts, id)
		}
	}
	for _, id := range hosts {
		seen[id] = true
	}
	canaries := req.CanaryHostIds
	if len(canaries) == 0 {
		canaries = hosts[:1]
	}
	isCanary := map[string]bool{}
	for _, id := range canaries {
		if !seen[id] {
			if _, ok := d.Hub.Host(id); !ok {
				return nil, status.Errorf(codes.NotFound, "canary host %q not found", printable(id))
			}
			if len(req.HostIds) == 0 {
				return nil, status.Errorf(codes.FailedPrecondition, "canary host %q is offline", id)
			}
			return nil, status.Errorf(codes.InvalidArgument, "canary host %q is not among the hosts to deploy", id)
		}
		if isCanary[id] {
			return nil, status.Errorf(codes.InvalidArgument, "canary host %q listed twice", id)
		}
		isCanary[id] = true
	}
	if len(offline) > 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "offline host(s): %s; choose online hosts or bring them back first", strings.Join(offline, ", "))
	}
	p := &plan{batches: [][]string{slices.Clone(canaries)}}
	p.hosts = slices.Clone(canaries)
	var batch []string
	for _, id := range hosts {
		if isCanary[id] {
			continue
		}
		p.hosts = append(p.hosts, id)
		batch = append(batch, id)
		if len(batch) == size {
			p.batches = append(p.batches, batch)
			batch = nil
		}
	}
	if len(batch) > 0 {
		p.batches = append(p.batches, batch)
	}
	return p, nil
}

// awaitTarget refetches the fleet target until it shows commit or the wait
// ends; hosts are then judged against the merged commit. A target that
// comes from a version.json built later is not waited for beyond the bound.
func (d *Deployer) awaitTarget(ctx context.Context, commit string) {
	if d.Target == nil || commit == "" {
		return
	}
	wait := d.TargetWait
	if wait <= 0 {
		wait = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		d.Target.Refetch(ctx)
		if tg := d.Hub.Target(); tg != nil && tg.GitCommit != "" && strings.HasPrefix(commit, tg.GitCommit) {
			return
		}
		select {
		case <-ctx.Done():
			d.logger().Warn("the fleet target does not show the merged commit yet; deploying anyway", "commit", commit)
			return
		case <-t.C:
		}
	}
}

// mergeStatus maps a merge error to a status with a message an operator
// can act on; GitHub's own message is kept (it holds no secret).
func mergeStatus(err error) error {
	msg := printable(err.Error())
	switch {
	case errors.Is(err, ErrNotMergeable):
		return status.Error(codes.FailedPrecondition, msg)
	case errors.Is(err, ErrNotFound):
		return status.Error(codes.FailedPrecondition, msg)
	case errors.Is(err, ErrUnauthorized):
		return status.Error(codes.FailedPrecondition, msg+"; check the token in --github-token-file")
	case errors.Is(err, context.Canceled):
		return status.FromContextError(err).Err()
	}
	return status.Error(codes.Unavailable, msg)
}

// printable bounds text from a client or from GitHub for a status message.
func printable(s string) string { return validate.Printable(s, 500) }
