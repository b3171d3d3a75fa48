package commands

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/controlplane/store"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// openStoreAt opens the store file at path; the caller closes it.
func openStoreAt(t *testing.T, path string) *store.SQLite {
	t.Helper()
	st, err := store.Open(context.Background(), path, store.WithLogger(quietLog))
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	return st
}

// loop runs the manager's Loop until the returned stop is called; stop
// waits for Loop to return.
func (e *env) loop() (stop func()) {
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	go func() { done <- e.m.Loop(ctx) }()
	var stopped bool
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			e.t.Errorf("Loop: %v", err)
		}
	}
	e.t.Cleanup(stop)
	return stop
}

// ok is a successful command result.
func ok(*agentv1.RunCommand) *agentv1.CommandResult {
	return &agentv1.CommandResult{Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED, Generation: hostGen}
}

// fails is a failed command result.
func fails(*agentv1.RunCommand) *agentv1.CommandResult {
	return &agentv1.CommandResult{Outcome: agentv1.Outcome_OUTCOME_FAILED, ExitCode: 1, Message: "build failed"}
}

// deployAgent connects a host whose agent answers each RunCommand with
// result (nil result func, or a nil result: it never answers), reports a
// current system after a succeeded activation, and answers every status
// refresh (as after a reconnect) the same way. hello nil is the default.
func (e *env) deployAgent(id string, hello *agentv1.Hello, result func(*agentv1.RunCommand) *agentv1.CommandResult) *agent {
	e.t.Helper()
	if hello == nil {
		hello = e.hello(id)
	}
	current := &agentv1.StatusReport{System: &typesv1.SystemCheck{Status: typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK}}
	ctx, cancel := context.WithCancelCause(context.Background())
	e.t.Cleanup(func() { cancel(nil) })
	a := &agent{id: id, msgs: make(chan *agentv1.ConnectResponse, 1000), ctx: ctx}
	a.onSend = func(msg *agentv1.ConnectResponse) {
		switch {
		case msg.GetRefresh() != nil:
			go e.m.HandleStatus(e.ctx, id, current)
		case msg.GetRun() != nil && result != nil:
			run := msg.GetRun()
			go func() {
				// Like a real agent, answer after Run marked the command
				// running: a result that overtakes that mark loses its
				// post-validation state to it.
				for {
					c, err := e.m.Get(e.ctx, run.CommandId)
					if err != nil || c.State != typesv1.CommandState_COMMAND_STATE_QUEUED {
						break
					}
					time.Sleep(time.Millisecond)
				}
				res := result(run)
				if res == nil {
					return
				}
				res.CommandId = run.CommandId
				e.m.HandleResult(e.ctx, id, res)
				if isActivation(run.Kind) && res.Outcome == agentv1.Outcome_OUTCOME_SUCCEEDED {
					e.m.HandleStatus(e.ctx, id, current)
				}
			}()
		}
	}
	c, _, err := e.hub.Connect(id, hello, a, cancel)
	if err != nil {
		e.t.Fatalf("connect %s: %v", id, err)
	}
	a.conn = c
	e.m.HandleHello(e.ctx, id, hello)
	return a
}

// activeBulk returns the run with id among a snapshot's active bulk runs, or nil.
func activeBulk(s *fleetv1.Snapshot, id string) *fleetv1.BulkCommand {
	for _, b := range s.ActiveBulks {
		if b.BulkId == id {
			return b
		}
	}
	return nil
}

func resultsByHost(b *fleetv1.BulkCommand) map[string]*fleetv1.BulkHostResult {
	out := map[string]*fleetv1.BulkHostResult{}
	for _, r := range b.Results {
		out[r.HostId] = r
	}
	return out
}

func (e *env) bulkNow(id string) *fleetv1.BulkCommand {
	e.t.Helper()
	b, ok := e.m.GetBulk(id)
	if !ok {
		e.t.Fatalf("bulk %s unknown", id)
	}
	return b
}

func (e *env) storedBulk(id string) store.BulkRun {
	e.t.Helper()
	r, err := e.st.GetBulk(e.ctx, id)
	if err != nil {
		e.t.Fatalf("stored bulk %s: %v", id, err)
	}
	return r
}

// commandsOf returns how many commands a host ran.
func (e *env) commandsOf(host string) []*fleetv1.Command {
	e.t.Helper()
	cs, _, err := e.st.ListCommands(e.ctx, host, 100, "")
	if err != nil {
		e.t.Fatal(err)
	}
	return cs
}

// restart stops e's manager, closes its store and opens a new hub and
// manager on the same file, as a new server process would; the returned
// env's manager has continued the stored bulk runs and its Loop runs.
func restart(t *testing.T, e *env, path string) *env {
	t.Helper()
	st := openStoreAt(t, path)
	t.Cleanup(func() { st.Close() })
	e2 := newEnvOn(t, &hookStore{SQLite: st})
	if err := e2.m.ResumeBulks(e2.ctx); err != nil {
		t.Fatalf("ResumeBulks: %v", err)
	}
	e2.loop()
	return e2
}

// TestBulkContinuesAfterRestart: a batched merge-and-deploy whose server
// restarts mid-run continues in the new process: the step that ran across
// the restart is waited for (not run again), the hosts that ended keep
// their results, and the batches left run to the end.
func TestBulkContinuesAfterRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nixplane.db")
	st1 := openStoreAt(t, path)
	createHosts(t, st1, "a", "b", "c", "d")
	e1 := newEnvOn(t, &hookStore{SQLite: st1})
	stop1 := e1.loop()
	for _, id := range []string{"a", "c", "d"} {
		e1.deployAgent(id, nil, ok)
	}
	e1.deployAgent("b", nil, nil) // still deploying when the server goes
	const commit = "0123456789abcdef0123456789abcdef01234567"
	b, err := e1.m.RunBulk(e1.ctx, BulkSpec{Actor: "user:admin", Command: "merge-and-deploy", Batches: [][]string{{"a"}, {"b", "c"}, {"d"}},
		MaxFailures: 0, PRNumber: 7, Commit: commit})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "a and c deployed and b deploying", func() bool {
		rs := resultsByHost(e1.bulkNow(b.BulkId))
		return rs["a"].GetCommand().GetState() == typesv1.CommandState_COMMAND_STATE_SUCCEEDED &&
			rs["c"].GetCommand().GetState() == typesv1.CommandState_COMMAND_STATE_SUCCEEDED &&
			rs["b"].GetCommand().GetState() == typesv1.CommandState_COMMAND_STATE_RUNNING
	})
	bCmd := resultsByHost(e1.bulkNow(b.BulkId))["b"].Command.CommandId
	// A page opened now sees the run in the snapshot, as it progressed.
	waitUntil(t, "the snapshot to carry the run's latest progress", func() bool {
		return activeBulk(e1.hub.Snapshot(), b.BulkId) != nil && proto.Equal(activeBulk(e1.hub.Snapshot(), b.BulkId), e1.bulkNow(b.BulkId))
	})

	// The server stops: in memory the run ends and says it will continue;
	// the store keeps it running, with each host's progress.
	stop1()
	if got := e1.waitBulk(b.BulkId); got.State != fleetv1.BulkState_BULK_STATE_FAILED || !strings.Contains(got.Message, "continues when the server starts again") {
		t.Fatalf("bulk in the stopped process = %v", got)
	}
	waitUntil(t, "the stopped process's snapshot to drop the run", func() bool {
		return activeBulk(e1.hub.Snapshot(), b.BulkId) == nil
	})
	stored := e1.storedBulk(b.BulkId)
	if stored.Bulk.State != fleetv1.BulkState_BULK_STATE_RUNNING || !stored.Plan.Hosts["c"].Ended || stored.Plan.Hosts["b"].CommandID != bCmd ||
		stored.Plan.Hosts["b"].Ended {
		t.Fatalf("stored run = %v %+v", stored.Bulk, stored.Plan)
	}
	if err := st1.Close(); err != nil {
		t.Fatal(err)
	}

	e2 := restart(t, e1, path)
	if d, ok := e2.m.RunningDeploy(); !ok || d.BulkId != b.BulkId {
		t.Fatalf("RunningDeploy after the restart = %v, %v", d, ok)
	}
	if _, err := e2.m.RunBulk(e2.ctx, BulkSpec{Actor: "user:admin", Command: "merge-and-deploy", HostIDs: []string{"a"}}); err != ErrBusy {
		t.Fatalf("a second merge-and-deploy during the continued one: %v, want ErrBusy", err)
	}
	if got := e2.bulkNow(b.BulkId); got.State != fleetv1.BulkState_BULK_STATE_RUNNING || got.PrNumber != 7 || got.Commit != commit {
		t.Fatalf("continued run = %v", got)
	}
	// The agents come back; b finished its deploy while the server was away.
	for _, id := range []string{"a", "c"} {
		e2.deployAgent(id, nil, ok)
	}
	hello := e2.hello("b")
	hello.LastResult = &agentv1.CommandResult{CommandId: bCmd, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED, Generation: hostGen}
	e2.deployAgent("b", hello, ok)
	// d, of the last batch, is slower to come back: it is waited for, not
	// refused as offline.
	waitUntil(t, "the run waiting for d to reconnect", func() bool {
		return strings.Contains(resultsByHost(e2.bulkNow(b.BulkId))["d"].Message, "waiting for the host to reconnect")
	})
	// The continued run is in the new process's snapshots from the start.
	waitUntil(t, "the new process's snapshot to carry the continued run", func() bool {
		return proto.Equal(activeBulk(e2.hub.Snapshot(), b.BulkId), e2.bulkNow(b.BulkId))
	})
	e2.deployAgent("d", nil, ok)

	got := e2.waitBulk(b.BulkId)
	if got.State != fleetv1.BulkState_BULK_STATE_SUCCEEDED || got.FinishedAt == nil || !strings.Contains(got.Message, "4 host(s) succeeded") {
		t.Fatalf("bulk after the restart = %v", got)
	}
	// The end is published right after the run's state is set.
	waitUntil(t, "the snapshot to drop the ended run", func() bool {
		return activeBulk(e2.hub.Snapshot(), b.BulkId) == nil
	})
	rs := resultsByHost(got)
	for _, id := range []string{"a", "b", "c", "d"} {
		if c := rs[id].GetCommand(); c.GetState() != typesv1.CommandState_COMMAND_STATE_SUCCEEDED || c.GetBulkId() != b.BulkId {
			t.Errorf("host %s: %v", id, rs[id])
		}
		if n := len(e2.commandsOf(id)); n != 1 {
			t.Errorf("host %s ran %d commands, want 1 (nothing is run twice)", id, n)
		}
	}
	if rs["b"].Command.CommandId != bCmd {
		t.Errorf("b's result is %s, want the command from before the restart %s", rs["b"].Command.CommandId, bCmd)
	}
	if _, ok := e2.m.RunningDeploy(); ok {
		t.Error("the deploy is still running after it ended")
	}
	if s := e2.storedBulk(b.BulkId); s.Bulk.State != fleetv1.BulkState_BULK_STATE_SUCCEEDED || len(s.Bulk.Results) != 4 {
		t.Fatalf("stored run after the end = %v", s.Bulk)
	}
	evs, err := e2.st.ListAudit(e2.ctx, "", 10, 0)
	if err != nil || len(evs) != 1 || evs[0].Action != "ResumeBulkCommand" || evs[0].Result != "ok" ||
		!strings.Contains(evs[0].Detail, b.BulkId) || !strings.Contains(evs[0].Detail, "PR #7") || !strings.Contains(evs[0].Detail, "2 host(s) left") {
		t.Fatalf("audit = %+v, %v", evs, err)
	}

	// A later process (or one that forgot the run) answers from the store.
	m3, err := New(e2.ctx, Config{Hub: e2.hub, Store: e2.st, Log: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	if b3, ok := m3.GetBulk(b.BulkId); !ok || b3.State != fleetv1.BulkState_BULK_STATE_SUCCEEDED || len(b3.Results) != 4 {
		t.Fatalf("GetBulk from the store = %v, %v", b3, ok)
	}
	if _, ok := m3.GetBulk("bulk-nope"); ok {
		t.Fatal("GetBulk of an unknown run succeeded")
	}
}

// TestHaltedBulkStaysHaltedAfterRestart: failures from before a restart
// count after it. A run that halted stays halted; a run whose batch failed
// while another host of the batch was still deploying halts after that
// host ends, in the new process, and runs no later batch.
func TestHaltedBulkStaysHaltedAfterRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nixplane.db")
	st1 := openStoreAt(t, path)
	createHosts(t, st1, "a", "b", "c", "d", "x", "y")
	e1 := newEnvOn(t, &hookStore{SQLite: st1})
	stop1 := e1.loop()
	e1.deployAgent("a", nil, ok)
	e1.deployAgent("b", nil, fails)
	e1.deployAgent("c", nil, nil) // still deploying when the server goes
	e1.deployAgent("d", nil, ok)
	e1.deployAgent("x", nil, fails)
	e1.deployAgent("y", nil, ok)

	halted, err := e1.m.RunBulk(e1.ctx, BulkSpec{Actor: "user:admin", Command: "switch", Batches: [][]string{{"x"}, {"y"}}, MaxFailures: 0})
	if err != nil {
		t.Fatal(err)
	}
	if got := e1.waitBulk(halted.BulkId); got.State != fleetv1.BulkState_BULK_STATE_FAILED || !strings.Contains(got.Message, "halted") {
		t.Fatalf("halted run = %v", got)
	}
	b, err := e1.m.RunBulk(e1.ctx, BulkSpec{Actor: "user:admin", Command: "switch", Batches: [][]string{{"a"}, {"b", "c"}, {"d"}}, MaxFailures: 0})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "b failed and c deploying", func() bool {
		rs := resultsByHost(e1.bulkNow(b.BulkId))
		return rs["b"].GetCommand().GetState() == typesv1.CommandState_COMMAND_STATE_FAILED &&
			rs["c"].GetCommand().GetState() == typesv1.CommandState_COMMAND_STATE_RUNNING
	})
	waitUntil(t, "b's end stored", func() bool { return e1.storedBulk(b.BulkId).Plan.Hosts["b"].Ended })
	cCmd := resultsByHost(e1.bulkNow(b.BulkId))["c"].Command.CommandId
	stop1()
	e1.waitBulk(b.BulkId)
	if err := st1.Close(); err != nil {
		t.Fatal(err)
	}

	e2 := restart(t, e1, path)
	for _, id := range []string{"a", "b", "d", "x", "y"} {
		e2.deployAgent(id, nil, ok) // would succeed now: nothing may run them
	}
	h := e2.hello("c")
	h.LastResult = &agentv1.CommandResult{CommandId: cCmd, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED, Generation: hostGen}
	e2.deployAgent("c", h, ok)

	got := e2.waitBulk(b.BulkId)
	if got.State != fleetv1.BulkState_BULK_STATE_FAILED || !strings.Contains(got.Message, "halted after 1 failed host(s)") {
		t.Fatalf("bulk after the restart = %v", got)
	}
	rs := resultsByHost(got)
	if rs["c"].GetCommand().GetState() != typesv1.CommandState_COMMAND_STATE_SUCCEEDED || rs["c"].Command.CommandId != cCmd {
		t.Errorf("c: %v", rs["c"])
	}
	if rs["b"].GetCommand().GetState() != typesv1.CommandState_COMMAND_STATE_FAILED {
		t.Errorf("b: %v", rs["b"])
	}
	if rs["d"].Command != nil || !strings.Contains(rs["d"].Message, "skipped: the run halted") || len(e2.commandsOf("d")) != 0 {
		t.Errorf("d ran after the halt: %v", rs["d"])
	}
	if got := e2.bulkNow(halted.BulkId); got.State != fleetv1.BulkState_BULK_STATE_FAILED || len(e2.commandsOf("y")) != 0 {
		t.Fatalf("the halted run after the restart = %v; y ran %d commands", got, len(e2.commandsOf("y")))
	}
}

// TestBulkThatCannotContinue: a stored run whose plan the new process
// cannot follow ends as failed, saying how many hosts it left undone; a
// host removed while the server was away fails alone.
func TestBulkThatCannotContinue(t *testing.T) {
	st := &hookStore{SQLite: openStore(t)}
	createHosts(t, st, "a", "b")
	ctx := context.Background()
	mk := func(id string, plan store.BulkPlan, hosts ...string) {
		bk := &fleetv1.BulkCommand{BulkId: id, Command: "merge-and-deploy", State: fleetv1.BulkState_BULK_STATE_RUNNING,
			CreatedAt: timestamppb.Now(), Actor: "user:admin", PrNumber: 3, Commit: "abc"}
		for _, h := range hosts {
			bk.Results = append(bk.Results, &fleetv1.BulkHostResult{HostId: h, Message: "waiting"})
		}
		if err := st.SaveBulk(ctx, store.BulkRun{Bulk: bk, Plan: plan}); err != nil {
			t.Fatal(err)
		}
	}
	mk("bulk-badstep", store.BulkPlan{Steps: []string{"frobnicate"}, Batches: [][]string{{"a", "b"}}, Concurrency: 2, MaxFailures: -1}, "a", "b")
	mk("bulk-noplan", store.BulkPlan{}, "a")
	mk("bulk-gone", store.BulkPlan{Steps: []string{"pull-switch"}, Batches: [][]string{{"gone"}, {"a"}}, Concurrency: 2, MaxFailures: 1}, "gone", "a")

	e := newEnvOn(t, st)
	e.deployAgent("a", nil, ok)
	if err := e.m.ResumeBulks(e.ctx); err != nil {
		t.Fatal(err)
	}
	e.loop()
	for id, want := range map[string]string{"bulk-badstep": "interrupted by a server restart; 2 host(s) not deployed", "bulk-noplan": "interrupted by a server restart; 1 host(s) not deployed"} {
		got := e.waitBulk(id)
		if got.State != fleetv1.BulkState_BULK_STATE_FAILED || got.Message != want {
			t.Errorf("%s = %v, want FAILED %q", id, got, want)
		}
		if s := e.storedBulk(id); s.Bulk.State != fleetv1.BulkState_BULK_STATE_FAILED {
			t.Errorf("stored %s = %v", id, s.Bulk)
		}
	}
	got := e.waitBulk("bulk-gone")
	rs := resultsByHost(got)
	if got.State != fleetv1.BulkState_BULK_STATE_PARTIAL || !strings.Contains(rs["gone"].Message, "no longer exists") ||
		rs["a"].GetCommand().GetState() != typesv1.CommandState_COMMAND_STATE_SUCCEEDED {
		t.Fatalf("bulk-gone = %v", got)
	}
	// A run's end is published to the hub just after its state changes.
	waitUntil(t, "the snapshot to list no run once every run ended", func() bool {
		return len(e.hub.Snapshot().ActiveBulks) == 0
	})
	evs, err := st.ListAudit(ctx, "", 10, 0)
	if err != nil || len(evs) != 3 {
		t.Fatalf("audit = %+v, %v", evs, err)
	}
	var failed int
	for _, ev := range evs {
		if ev.Result != "ok" {
			failed++
		}
	}
	if failed != 2 {
		t.Fatalf("audit = %+v, want 2 failed resumptions", evs)
	}
}
