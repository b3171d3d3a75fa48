package cli

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// pr shows the pending flake-update PR (`nixplane pr`) or merges and
// deploys it (`nixplane merge-and-deploy N`).
func pr(ctx context.Context, cmd string, args []string, env Env) error {
	f := newFlags(cmd, env)
	t := targetFlags(f)
	hostList := f.String("hosts", "", "comma-separated hosts to deploy (default: every online host)")
	canaries := f.String("canary", "", "comma-separated hosts deployed first, alone (default: the first host)")
	batch := f.Int("batch-size", 0, "hosts per batch after the canaries (default 5)")
	maxFail := f.Int("max-failures", 0, "halt when more than this many hosts failed")
	wait := f.Bool("wait", true, "wait for the deploy to end and print every host's result; the exit status follows it")
	pos, err := f.parse(args)
	if err != nil {
		return err
	}
	fc, c, err := t.fleet()
	if err != nil {
		return err
	}
	defer c.Close()
	if cmd == "pr" {
		if len(pos) != 0 {
			return usagef("pr takes no arguments")
		}
		r, err := fc.GetFleetTarget(ctx, &fleetv1.GetFleetTargetRequest{})
		if err != nil {
			return rpcErr(err)
		}
		if t.json {
			b, err := jsonOut.Marshal(r)
			if err != nil {
				return err
			}
			fmt.Fprintln(env.Stdout, string(b))
			return nil
		}
		switch p := r.PendingPr; {
		case !r.PullRequestsConfigured:
			fmt.Fprintln(env.Stdout, "pull requests are not configured (serve with --github-repo and --github-token-file)")
		case p == nil:
			fmt.Fprintln(env.Stdout, "no flake-update PR is pending")
		default:
			state := "mergeable"
			if !p.Mergeable {
				state = "not mergeable"
			}
			fmt.Fprintf(env.Stdout, "#%d  %s  (%s)\n  %s\n", p.Number, p.Title, state, p.Url)
		}
		return nil
	}
	if len(pos) != 1 {
		return usagef("merge-and-deploy takes the PR number")
	}
	n, err := strconv.ParseInt(strings.TrimPrefix(pos[0], "#"), 10, 32)
	if err != nil || n <= 0 {
		return usagef("PR number %q is not a positive number", pos[0])
	}
	if *batch < 0 || *maxFail < 0 {
		return usagef("--batch-size and --max-failures must not be negative")
	}
	r, err := fc.MergeAndDeploy(ctx, &fleetv1.MergeAndDeployRequest{PrNumber: int32(n), HostIds: splitList(*hostList),
		CanaryHostIds: splitList(*canaries), BatchSize: int32(*batch), MaxFailures: int32(*maxFail)})
	if err != nil {
		return rpcErr(err)
	}
	fmt.Fprintf(env.Stderr, "PR #%d merged; deploying to %d host(s) as %s\n", n, len(r.Bulk.Results), r.Bulk.BulkId)
	fmt.Fprintln(env.Stdout, r.Bulk.BulkId)
	if !*wait {
		return nil
	}
	b := r.Bulk
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	retry := newRetry()
	for b.State == fleetv1.BulkState_BULK_STATE_RUNNING {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		g, err := fc.GetBulkCommand(ctx, &fleetv1.GetBulkCommandRequest{BulkId: b.BulkId})
		if err != nil {
			// The run survives a server restart; wait for the server.
			if retryable(ctx, err) && retry.NextBackOff() != backoff.Stop {
				fmt.Fprintf(env.Stderr, "%s: server unreachable (%v); waiting\n", b.BulkId, rpcErr(err))
				continue
			}
			return rpcErr(err)
		}
		retry.Reset()
		b = g.Bulk
	}
	for _, res := range b.Results {
		fmt.Fprintf(env.Stderr, "  %-20s %s\n", res.HostId, res.Message)
	}
	fmt.Fprintf(env.Stderr, "%s: %s\n", strings.ToLower(strings.TrimPrefix(b.State.String(), "BULK_STATE_")), b.Message)
	if b.State != fleetv1.BulkState_BULK_STATE_SUCCEEDED {
		return exitError{ExitFailure}
	}
	return nil
}

func splitList(s string) []string {
	var out []string
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}
