package commands

import (
	"context"
	"testing"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// refetcher stands in for the target poller: a refetch installs next.
type refetcher struct {
	e     *env
	next  string
	calls chan struct{}
}

func (r *refetcher) Refetch(context.Context) {
	if r.next != "" {
		r.e.setTarget(r.next, targetLock)
	}
	r.calls <- struct{}{}
}

// TestPullRefetchesTarget: a pull that lands on a commit newer than the
// cached target is judged against the refetched target, not the stale one.
func TestPullRefetchesTarget(t *testing.T) {
	for _, tc := range []struct {
		name, next string
		want       typesv1.CommandState
	}{
		{"target moved to the pulled commit", hostGen, typesv1.CommandState_COMMAND_STATE_SUCCEEDED},
		{"target still elsewhere", "", typesv1.CommandState_COMMAND_STATE_PARTIAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, "web-1")
			rf := &refetcher{e: e, next: tc.next, calls: make(chan struct{}, 1)}
			e.m.cfg.Target = rf
			e.setTarget(targetGen, targetLock)
			a := e.connect("web-1", nil)
			c, err := e.m.Run(e.ctx, "user:admin", "web-1", "pull", true)
			if err != nil {
				t.Fatal(err)
			}
			a.expectRun(t)
			done := e.m.Done(c.CommandId)
			e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: c.CommandId, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED, Generation: hostGen})
			<-rf.calls
			<-done
			e.ended(c.CommandId, tc.want)
		})
	}
}
