package commands

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/controlplane/hub"
	"github.com/nixplane/nixplane/controlplane/store"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

var quietLog = slog.New(slog.DiscardHandler)

const (
	hostGen    = "aaaaaaa111111111111111111111111111111111"
	targetGen  = "bbbbbbb222222222222222222222222222222222"
	hostLock   = "1111111111111111111111111111111111111111111111111111111111111111"
	targetLock = "2222222222222222222222222222222222222222222222222222222222222222"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// hookStore is the real SQLite store with a hook before AppendLines.
type hookStore struct {
	*store.SQLite
	beforeAppend func(commandID string, lines []*typesv1.OutputLine)
	// recordWrites counts host-record writes.
	recordWrites atomic.Int64
}

func (s *hookStore) UpdateHostRecord(ctx context.Context, id string, rec *fleetv1.Host) error {
	s.recordWrites.Add(1)
	return s.SQLite.UpdateHostRecord(ctx, id, rec)
}

func (s *hookStore) AppendLines(ctx context.Context, id string, lines []*typesv1.OutputLine) error {
	if s.beforeAppend != nil {
		s.beforeAppend(id, lines)
	}
	return s.SQLite.AppendLines(ctx, id, lines)
}

type env struct {
	t     *testing.T
	ctx   context.Context
	st    *hookStore
	hub   *hub.Hub
	m     *Manager
	clock *fakeClock
}

func openStore(t *testing.T) *store.SQLite {
	t.Helper()
	st, err := store.Open(context.Background(), filepath.Join(t.TempDir(), "nixplane.db"), store.WithLogger(quietLog))
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func createHosts(t *testing.T, st store.Hosts, hosts ...string) {
	t.Helper()
	for _, id := range hosts {
		if err := st.CreateHost(context.Background(), store.Host{ID: id, Record: &fleetv1.Host{HostId: id, Hostname: id}, CreatedAt: time.Now()}, []byte("hash-"+id)); err != nil {
			t.Fatalf("create host %s: %v", id, err)
		}
	}
}

func newEnv(t *testing.T, hosts ...string) *env {
	t.Helper()
	st := &hookStore{SQLite: openStore(t)}
	createHosts(t, st, hosts...)
	return newEnvOn(t, st)
}

func newEnvOn(t *testing.T, st *hookStore) *env {
	t.Helper()
	ctx := context.Background()
	clk := &fakeClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
	h, err := hub.New(ctx, hub.Config{ServerVersion: "1.0.0", Store: st, Now: clk.Now, Log: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(ctx, Config{Hub: h, Store: st, Now: clk.Now, Log: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, ctx: ctx, st: st, hub: h, m: m, clock: clk}
}

// agent is an in-memory agent session: it records what the server sends
// and may answer from a hook.
type agent struct {
	id     string
	conn   *hub.Conn
	msgs   chan *agentv1.ConnectResponse
	onSend func(*agentv1.ConnectResponse)
	ctx    context.Context
}

func (a *agent) Send(m *agentv1.ConnectResponse) error {
	if a.onSend != nil {
		a.onSend(m)
	}
	a.msgs <- m
	return nil
}

func (e *env) hello(id string) *agentv1.Hello {
	return &agentv1.Hello{Hostname: id, AgentVersion: "1.0.0", Generation: hostGen, LockHash: hostLock}
}

// connect opens a session the way the agent API does: register, then
// reconcile the running command with the hello.
func (e *env) connect(id string, hello *agentv1.Hello) *agent {
	e.t.Helper()
	if hello == nil {
		hello = e.hello(id)
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	e.t.Cleanup(func() { cancel(nil) })
	a := &agent{id: id, msgs: make(chan *agentv1.ConnectResponse, 1000), ctx: ctx}
	c, _, err := e.hub.Connect(id, hello, a, cancel)
	if err != nil {
		e.t.Fatalf("connect %s: %v", id, err)
	}
	a.conn = c
	e.m.HandleHello(e.ctx, id, hello)
	return a
}

// disconnect ends a session the way the agent API does.
func (e *env) disconnect(a *agent) {
	e.hub.Disconnect(a.conn, "stream closed")
	e.m.HandleDisconnect(a.id)
}

func (a *agent) next(t *testing.T) *agentv1.ConnectResponse {
	t.Helper()
	select {
	case m := <-a.msgs:
		return m
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: no message from the server", a.id)
		return nil
	}
}

func (a *agent) expectRun(t *testing.T) *agentv1.RunCommand {
	t.Helper()
	m := a.next(t)
	if m.GetRun() == nil {
		t.Fatalf("%s got %v, want RunCommand", a.id, m)
	}
	return m.GetRun()
}

func (a *agent) expectStop(t *testing.T) *agentv1.StopCommand {
	t.Helper()
	m := a.next(t)
	if m.GetStop() == nil {
		t.Fatalf("%s got %v, want StopCommand", a.id, m)
	}
	return m.GetStop()
}

func (a *agent) expectNothing(t *testing.T) {
	t.Helper()
	select {
	case m := <-a.msgs:
		t.Fatalf("%s got unexpected %v", a.id, m)
	default:
	}
}

func (e *env) setTarget(commit, lock string) {
	e.hub.SetTarget(&fleetv1.FleetTarget{GitCommit: commit, LockHash: lock, FetchedAt: timestamppb.New(e.clock.Now())})
}

func (e *env) state(id string) *fleetv1.Command {
	e.t.Helper()
	c, err := e.m.Get(e.ctx, id)
	if err != nil {
		e.t.Fatalf("get %s: %v", id, err)
	}
	return c
}

// ended checks a command's end in the manager and in the store.
func (e *env) ended(id string, want typesv1.CommandState) *fleetv1.Command {
	e.t.Helper()
	c := e.state(id)
	if c.State != want {
		e.t.Fatalf("command %s is %v (%q), want %v", id, c.State, c.Message, want)
	}
	if c.FinishedAt == nil {
		e.t.Fatalf("command %s ended without finished_at", id)
	}
	stored, err := e.st.GetCommand(e.ctx, id)
	if err != nil {
		e.t.Fatal(err)
	}
	if stored.State != want {
		e.t.Fatalf("stored command %s is %v, want %v", id, stored.State, want)
	}
	if r := e.hub.Running(c.HostId); r != nil {
		e.t.Fatalf("hub still shows %s running on %s after it ended", r.CommandId, c.HostId)
	}
	if e.m.Done(id) != nil {
		e.t.Fatalf("command %s still active in the manager", id)
	}
	return c
}

func lines(from, to uint64) []*typesv1.OutputLine {
	var out []*typesv1.OutputLine
	for s := from; s <= to; s++ {
		out = append(out, &typesv1.OutputLine{Seq: s, Stream: typesv1.OutputStream_OUTPUT_STREAM_STDOUT, Text: fmt.Sprintf("line %d", s)})
	}
	return out
}

func blockReason(t *testing.T, err error) fleetv1.BlockReason {
	t.Helper()
	var be *BlockedError
	if !errors.As(err, &be) {
		t.Fatalf("error %v is not a BlockedError", err)
	}
	return be.Reason
}

func commandStates(evs []*fleetv1.FleetEvent, id string) []typesv1.CommandState {
	var out []typesv1.CommandState
	for _, ev := range evs {
		var c *fleetv1.Command
		switch k := ev.Kind.(type) {
		case *fleetv1.FleetEvent_CommandQueued:
			c = k.CommandQueued.Command
		case *fleetv1.FleetEvent_CommandUpdated:
			c = k.CommandUpdated.Command
		case *fleetv1.FleetEvent_CommandComplete:
			c = k.CommandComplete.Command
		}
		if c != nil && c.CommandId == id {
			out = append(out, c.State)
		}
	}
	return out
}

func drain(h *hub.Hub, w *hub.Watcher) []*fleetv1.FleetEvent {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var all []*fleetv1.FleetEvent
	for {
		b, err := h.Next(ctx, w)
		if err != nil {
			return all
		}
		all = append(all, b...)
	}
}

func TestPullLifecycle(t *testing.T) {
	e := newEnv(t, "web-1")
	e.setTarget(targetGen, targetLock)
	a := e.connect("web-1", nil)
	w, _ := e.hub.Subscribe(hub.WatchOptions{SkipHeartbeats: true})

	c, err := e.m.Run(e.ctx, "user:admin", "web-1", " Pull ", false)
	if err != nil {
		t.Fatal(err)
	}
	if c.State != typesv1.CommandState_COMMAND_STATE_RUNNING || c.StartedAt == nil || c.Actor != "user:admin" || c.Command != "pull" {
		t.Fatalf("Run returned %v", c)
	}
	run := a.expectRun(t)
	if run.CommandId != c.CommandId || run.Kind != typesv1.CommandKind_COMMAND_KIND_PULL || run.Timeout.AsDuration() != 5*time.Minute {
		t.Fatalf("agent got %v", run)
	}
	if h, _ := e.hub.Host("web-1"); h.RunningCommand.GetCommandId() != c.CommandId || h.UpdateStatus.Git.Status != typesv1.CompartmentStatus_COMPARTMENT_STATUS_WORKING {
		t.Fatalf("host while pulling: running %v, git %v", h.RunningCommand, h.UpdateStatus.Git)
	}
	e.m.HandleOutput(e.ctx, "web-1", &agentv1.CommandOutput{CommandId: c.CommandId, Lines: lines(1, 3)})
	e.m.HandleOutput(e.ctx, "other", &agentv1.CommandOutput{CommandId: c.CommandId, Lines: lines(4, 4)}) // not its command: dropped
	e.m.HandleProgress(e.ctx, "web-1", &agentv1.CommandProgress{CommandId: c.CommandId, Phase: "fetch", Current: 1, Total: 2})
	if got := e.state(c.CommandId); got.Phase != "fetch" || got.LineCount != 3 {
		t.Fatalf("running command = %v", got)
	}
	e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: c.CommandId, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED, Generation: targetGen})
	got := e.ended(c.CommandId, typesv1.CommandState_COMMAND_STATE_SUCCEEDED)
	if !strings.Contains(got.Message, "bbbbbbb") {
		t.Errorf("message %q does not name the new commit", got.Message)
	}
	stored, err := e.st.ReadLines(e.ctx, c.CommandId, 0, 100)
	if err != nil || len(stored) != 3 {
		t.Fatalf("stored lines = %v, %v; want 3", stored, err)
	}
	want := []typesv1.CommandState{typesv1.CommandState_COMMAND_STATE_QUEUED, typesv1.CommandState_COMMAND_STATE_RUNNING,
		typesv1.CommandState_COMMAND_STATE_RUNNING, typesv1.CommandState_COMMAND_STATE_SUCCEEDED}
	if got := commandStates(drain(e.hub, w), c.CommandId); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("published states %v, want %v", got, want)
	}

	// The next pull lands elsewhere: partial.
	c2, err := e.m.Run(e.ctx, "user:admin", "web-1", "pull", true)
	if err != nil {
		t.Fatal(err)
	}
	a.expectRun(t)
	e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: c2.CommandId, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED, Generation: hostGen})
	e.ended(c2.CommandId, typesv1.CommandState_COMMAND_STATE_PARTIAL)
}

func TestFailedWithExitCode(t *testing.T) {
	e := newEnv(t, "web-1")
	a := e.connect("web-1", nil)
	c, err := e.m.Run(e.ctx, "token:ci", "web-1", "test", false)
	if err != nil {
		t.Fatal(err)
	}
	a.expectRun(t)
	tests := &typesv1.TestReport{Passed: 1, Total: 2, Failed: []string{"boot"}, Generation: hostGen}
	e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: c.CommandId, Outcome: agentv1.Outcome_OUTCOME_FAILED, ExitCode: 3, Tests: tests})
	got := e.ended(c.CommandId, typesv1.CommandState_COMMAND_STATE_FAILED)
	if got.ExitCode != 3 || got.Message != "exit status 3" {
		t.Fatalf("failed command = exit %d, %q", got.ExitCode, got.Message)
	}
	h, _ := e.hub.Host("web-1")
	if h.UpdateStatus.Tests.Status != typesv1.CompartmentStatus_COMPARTMENT_STATUS_ERROR {
		t.Fatalf("tests compartment after a failing run = %v", h.UpdateStatus.Tests)
	}
	stored, err := e.st.GetHost(e.ctx, "web-1")
	if err != nil || stored.Record.GetTests().GetTotal() != 2 {
		t.Fatalf("stored host tests = %v, %v", stored.Record.GetTests(), err)
	}
}

func TestStopped(t *testing.T) {
	e := newEnv(t, "web-1")
	a := e.connect("web-1", nil)
	c, err := e.m.Run(e.ctx, "user:admin", "web-1", "switch", false)
	if err != nil {
		t.Fatal(err)
	}
	a.expectRun(t)
	got, err := e.m.Run(e.ctx, "user:admin", "web-1", "stop", false)
	if err != nil || got.CommandId != c.CommandId {
		t.Fatalf("run stop = %v, %v", got, err)
	}
	st := a.expectStop(t)
	if st.CommandId != c.CommandId || st.Grace.AsDuration() != 5*time.Second {
		t.Fatalf("agent got %v", st)
	}
	if s := e.state(c.CommandId).State; s != typesv1.CommandState_COMMAND_STATE_RUNNING {
		t.Fatalf("state before the agent confirms = %v", s)
	}
	e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: c.CommandId, Outcome: agentv1.Outcome_OUTCOME_STOPPED, ExitCode: -1})
	e.ended(c.CommandId, typesv1.CommandState_COMMAND_STATE_STOPPED)

	// Stopping an ended command returns it; stopping nothing is refused.
	again, err := e.m.Stop(e.ctx, c.CommandId)
	if err != nil || again.State != typesv1.CommandState_COMMAND_STATE_STOPPED {
		t.Fatalf("stop of ended command = %v, %v", again, err)
	}
	a.expectNothing(t)
	if _, err := e.m.Stop(e.ctx, "cmd-nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("stop unknown = %v, want ErrNotFound", err)
	}
	_, err = e.m.Run(e.ctx, "user:admin", "web-1", "stop", false)
	if r := blockReason(t, err); r != fleetv1.BlockReason_BLOCK_REASON_ALREADY_CURRENT {
		t.Fatalf("stop with nothing running: %v", r)
	}
}

func TestStopWhileOffline(t *testing.T) {
	e := newEnv(t, "web-1")
	a := e.connect("web-1", nil)
	c, err := e.m.Run(e.ctx, "user:admin", "web-1", "switch", false)
	if err != nil {
		t.Fatal(err)
	}
	e.disconnect(a)
	if _, err := e.m.Stop(e.ctx, c.CommandId); err != nil {
		t.Fatal(err)
	}
	e.ended(c.CommandId, typesv1.CommandState_COMMAND_STATE_STOPPED)
}

func TestBlocked(t *testing.T) {
	e := newEnv(t, "web-1", "db-1")
	a := e.connect("web-1", nil)
	c, err := e.m.Run(e.ctx, "user:admin", "web-1", "switch", false)
	if err != nil {
		t.Fatal(err)
	}
	a.expectRun(t)

	_, err = e.m.Run(e.ctx, "user:admin", "web-1", "pull", true)
	var be *BlockedError
	if !errors.As(err, &be) || be.Reason != fleetv1.BlockReason_BLOCK_REASON_BUSY || be.RunningCommandID != c.CommandId {
		t.Fatalf("second command = %v, want BUSY naming %s", err, c.CommandId)
	}
	if r := blockReason(t, mustErr(e.m.Run(e.ctx, "user:admin", "db-1", "pull", true))); r != fleetv1.BlockReason_BLOCK_REASON_OFFLINE {
		t.Fatalf("offline host: %v", r)
	}
	if r := blockReason(t, mustErr(e.m.Run(e.ctx, "user:admin", "web-1", "frobnicate", true))); r != fleetv1.BlockReason_BLOCK_REASON_UNKNOWN_COMMAND {
		t.Fatalf("unknown command: %v", r)
	}
	if _, err := e.m.Run(e.ctx, "user:admin", "ghost", "pull", true); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown host = %v, want ErrNotFound", err)
	}
	a.expectNothing(t)
	if n, _, err := e.st.ListCommands(e.ctx, "", 100, ""); err != nil || len(n) != 1 {
		t.Fatalf("stored commands = %d, %v; blocked runs must not be stored as runs", len(n), err)
	}
}

func mustErr(_ *fleetv1.Command, err error) error { return err }

func TestPullAlreadyCurrent(t *testing.T) {
	e := newEnv(t, "web-1")
	e.setTarget(hostGen, hostLock)
	a := e.connect("web-1", nil)
	if r := blockReason(t, mustErr(e.m.Run(e.ctx, "user:admin", "web-1", "pull", false))); r != fleetv1.BlockReason_BLOCK_REASON_ALREADY_CURRENT {
		t.Fatalf("pull on a current host: %v", r)
	}
	a.expectNothing(t)
	c, err := e.m.Run(e.ctx, "user:admin", "web-1", "pull", true)
	if err != nil || c.State != typesv1.CommandState_COMMAND_STATE_RUNNING {
		t.Fatalf("forced pull = %v, %v", c, err)
	}
	a.expectRun(t)

	// A failing target fetch never counts as current.
	e2 := newEnv(t, "web-2")
	e2.hub.SetTarget(&fleetv1.FleetTarget{Error: "git fetch: connection refused"})
	b := e2.connect("web-2", nil)
	if _, err := e2.m.Run(e2.ctx, "user:admin", "web-2", "pull", false); err != nil {
		t.Fatalf("pull with a failing target = %v", err)
	}
	b.expectRun(t)
}

// TestOutputStoredBeforePublished: when a watcher sees a CommandOutput event,
// its lines are in the store already.
func TestOutputStoredBeforePublished(t *testing.T) {
	e := newEnv(t, "web-1")
	a := e.connect("web-1", nil)
	probe, _ := e.hub.Subscribe(hub.WatchOptions{SkipHeartbeats: true})
	var published []string
	e.st.beforeAppend = func(id string, ls []*typesv1.OutputLine) {
		for _, ev := range drain(e.hub, probe) {
			if o := ev.GetCommandOutput(); o != nil && o.Lines[0].Seq == ls[0].Seq {
				published = append(published, fmt.Sprintf("seq %d published before it was stored", o.Lines[0].Seq))
			}
		}
	}
	c, err := e.m.Run(e.ctx, "user:admin", "web-1", "pull", true)
	if err != nil {
		t.Fatal(err)
	}
	a.expectRun(t)

	// A concurrent watcher reads the store the moment it sees output.
	w, _ := e.hub.Subscribe(hub.WatchOptions{SkipHeartbeats: true})
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	missing := make(chan string, 100)
	seen := make(chan uint64, 100)
	go func() {
		for {
			batch, err := e.hub.Next(ctx, w)
			if err != nil {
				return
			}
			for _, ev := range batch {
				o := ev.GetCommandOutput()
				if o == nil {
					continue
				}
				last := o.Lines[len(o.Lines)-1].Seq
				got, err := e.st.ReadLines(ctx, o.CommandId, o.Lines[0].Seq-1, 1000)
				if err != nil || len(got) == 0 || got[len(got)-1].Seq < last {
					missing <- fmt.Sprintf("lines up to %d not readable when published (read %d, %v)", last, len(got), err)
				}
				seen <- last
			}
		}
	}()
	for i := range uint64(20) {
		e.m.HandleOutput(e.ctx, "web-1", &agentv1.CommandOutput{CommandId: c.CommandId, Lines: lines(i*5+1, i*5+5)})
	}
	for n := 0; n < 20; n++ {
		select {
		case <-seen:
		case m := <-missing:
			t.Fatal(m)
		case <-time.After(10 * time.Second):
			t.Fatal("watcher did not see all output")
		}
	}
	select {
	case m := <-missing:
		t.Fatal(m)
	default:
	}
	if len(published) > 0 {
		t.Fatal(published[0])
	}
}

func TestSwitchPostValidation(t *testing.T) {
	for _, tc := range []struct {
		name   string
		system typesv1.CompartmentStatus
		want   typesv1.CommandState
	}{
		{"current", typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK, typesv1.CommandState_COMMAND_STATE_SUCCEEDED},
		{"outdated", typesv1.CompartmentStatus_COMPARTMENT_STATUS_OUTDATED, typesv1.CommandState_COMMAND_STATE_PARTIAL},
		{"error", typesv1.CompartmentStatus_COMPARTMENT_STATUS_ERROR, typesv1.CommandState_COMMAND_STATE_PARTIAL},
		{"unverifiable", typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN, typesv1.CommandState_COMMAND_STATE_SUCCEEDED},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, "web-1")
			a := e.connect("web-1", nil)
			c, err := e.m.Run(e.ctx, "user:admin", "web-1", "switch", false)
			if err != nil {
				t.Fatal(err)
			}
			a.expectRun(t)
			e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: c.CommandId, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED})
			if s := e.state(c.CommandId).State; s != typesv1.CommandState_COMMAND_STATE_POST_VALIDATION {
				t.Fatalf("after exit 0: %v, want POST_VALIDATION", s)
			}
			e.m.HandleStatus(e.ctx, "web-1", &agentv1.StatusReport{Generation: hostGen, LockHash: hostLock,
				System: &typesv1.SystemCheck{Status: tc.system, Message: "checked"}})
			e.ended(c.CommandId, tc.want)
			h, _ := e.hub.Host("web-1")
			if h.UpdateStatus.System.Status != tc.system {
				t.Fatalf("system compartment = %v, want %v", h.UpdateStatus.System.Status, tc.system)
			}
		})
	}
}

func TestSwitchWithoutStatusReportTimesOutPartial(t *testing.T) {
	e := newEnv(t, "web-1")
	a := e.connect("web-1", nil)
	c, _ := e.m.Run(e.ctx, "user:admin", "web-1", "switch", false)
	a.expectRun(t)
	e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: c.CommandId, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED})
	e.clock.Advance(59 * time.Second)
	e.m.Tick(e.ctx)
	if s := e.state(c.CommandId).State; s != typesv1.CommandState_COMMAND_STATE_POST_VALIDATION {
		t.Fatalf("before the post-validation wait: %v", s)
	}
	e.clock.Advance(2 * time.Second)
	e.m.Tick(e.ctx)
	e.ended(c.CommandId, typesv1.CommandState_COMMAND_STATE_PARTIAL)
}

func TestSwitchAcrossAgentRestart(t *testing.T) {
	e := newEnv(t, "web-1")
	a := e.connect("web-1", nil)
	c, _ := e.m.Run(e.ctx, "user:admin", "web-1", "switch", false)
	a.expectRun(t)
	res := &agentv1.CommandResult{CommandId: c.CommandId, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED, AgentRestarting: true}
	e.m.HandleResult(e.ctx, "web-1", res)
	e.disconnect(a)
	e.clock.Advance(80 * time.Second) // within ReconnectWait (90s)
	e.m.Tick(e.ctx)
	hello := e.hello("web-1")
	hello.LastResult = res
	e.connect("web-1", hello)
	if s := e.state(c.CommandId).State; s != typesv1.CommandState_COMMAND_STATE_POST_VALIDATION {
		t.Fatalf("after the new agent's hello: %v", s)
	}
	e.m.HandleStatus(e.ctx, "web-1", &agentv1.StatusReport{System: &typesv1.SystemCheck{Status: typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK}})
	got := e.ended(c.CommandId, typesv1.CommandState_COMMAND_STATE_SUCCEEDED)
	if !strings.Contains(got.Message, "agent restarted") {
		t.Fatalf("message %q does not mention the restart", got.Message)
	}
}

func TestReconnect(t *testing.T) {
	type tc struct {
		name  string
		hello func(cmdID string, h *agentv1.Hello)
		want  typesv1.CommandState
		exit  int32
	}
	for _, tc := range []tc{
		{"without the command", func(string, *agentv1.Hello) {}, typesv1.CommandState_COMMAND_STATE_FAILED, 0},
		{"still running", func(id string, h *agentv1.Hello) { h.RunningCommandId = id }, typesv1.CommandState_COMMAND_STATE_RUNNING, 0},
		{"with a failed last result", func(id string, h *agentv1.Hello) {
			h.LastResult = &agentv1.CommandResult{CommandId: id, Outcome: agentv1.Outcome_OUTCOME_FAILED, ExitCode: 2}
		}, typesv1.CommandState_COMMAND_STATE_FAILED, 2},
		{"with a successful last result", func(id string, h *agentv1.Hello) {
			h.LastResult = &agentv1.CommandResult{CommandId: id, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED, Generation: hostGen}
		}, typesv1.CommandState_COMMAND_STATE_SUCCEEDED, 0},
		{"with another command's result", func(_ string, h *agentv1.Hello) {
			h.LastResult = &agentv1.CommandResult{CommandId: "cmd-other", Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED}
		}, typesv1.CommandState_COMMAND_STATE_FAILED, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, "web-1")
			a := e.connect("web-1", nil)
			c, err := e.m.Run(e.ctx, "user:admin", "web-1", "pull", true)
			if err != nil {
				t.Fatal(err)
			}
			a.expectRun(t)
			e.disconnect(a)
			if s := e.state(c.CommandId).State; s != typesv1.CommandState_COMMAND_STATE_RUNNING {
				t.Fatalf("right after the agent went away: %v", s)
			}
			hello := e.hello("web-1")
			tc.hello(c.CommandId, hello)
			e.connect("web-1", hello)
			if tc.want == typesv1.CommandState_COMMAND_STATE_RUNNING {
				if s := e.state(c.CommandId).State; s != tc.want {
					t.Fatalf("state = %v, want RUNNING", s)
				}
				// The reconnect cleared the absence: no failure later.
				e.clock.Advance(2 * time.Minute)
				e.m.Tick(e.ctx)
				if s := e.state(c.CommandId).State; s != tc.want {
					t.Fatalf("after the reconnect wait: %v", s)
				}
				return
			}
			got := e.ended(c.CommandId, tc.want)
			if got.ExitCode != tc.exit {
				t.Fatalf("exit code %d, want %d", got.ExitCode, tc.exit)
			}
		})
	}
}

func TestAgentNeverReturns(t *testing.T) {
	e := newEnv(t, "web-1")
	a := e.connect("web-1", nil)
	c, _ := e.m.Run(e.ctx, "user:admin", "web-1", "pull", true)
	e.disconnect(a)
	e.clock.Advance(89 * time.Second)
	e.m.Tick(e.ctx)
	if s := e.state(c.CommandId).State; s != typesv1.CommandState_COMMAND_STATE_RUNNING {
		t.Fatalf("before ReconnectWait: %v", s)
	}
	e.clock.Advance(2 * time.Second)
	e.m.Tick(e.ctx)
	e.ended(c.CommandId, typesv1.CommandState_COMMAND_STATE_FAILED)
}

func TestHardTimeout(t *testing.T) {
	e := newEnv(t, "web-1")
	a := e.connect("web-1", nil)
	c, _ := e.m.Run(e.ctx, "user:admin", "web-1", "pull", true)
	a.expectRun(t)

	e.clock.Advance(2*time.Minute + time.Second) // past the warning (2m)
	e.m.Tick(e.ctx)
	if got := e.state(c.CommandId); !got.Overdue || got.State != typesv1.CommandState_COMMAND_STATE_RUNNING {
		t.Fatalf("after the warning timeout: %v", got)
	}
	a.expectNothing(t)

	e.clock.Advance(3 * time.Minute) // past the hard timeout (5m)
	e.m.Tick(e.ctx)
	if st := a.expectStop(t); st.CommandId != c.CommandId {
		t.Fatalf("stop for %s, want %s", st.CommandId, c.CommandId)
	}
	e.m.Tick(e.ctx) // a second tick sends no second stop
	a.expectNothing(t)
	e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: c.CommandId, Outcome: agentv1.Outcome_OUTCOME_STOPPED, ExitCode: -1})
	got := e.ended(c.CommandId, typesv1.CommandState_COMMAND_STATE_TIMED_OUT)
	if got.Overdue {
		t.Fatal("ended command still overdue")
	}
}

func TestHardTimeoutAgentSilent(t *testing.T) {
	e := newEnv(t, "web-1")
	a := e.connect("web-1", nil)
	c, _ := e.m.Run(e.ctx, "user:admin", "web-1", "restart", false)
	a.expectRun(t)
	e.clock.Advance(2*time.Minute + time.Second)
	e.m.Tick(e.ctx)
	a.expectStop(t)
	e.clock.Advance(21 * time.Second) // grace 5s + 15s
	e.m.Tick(e.ctx)
	e.ended(c.CommandId, typesv1.CommandState_COMMAND_STATE_TIMED_OUT)
}

func TestFollow(t *testing.T) {
	e := newEnv(t, "web-1")
	a := e.connect("web-1", nil)
	c, _ := e.m.Run(e.ctx, "user:admin", "web-1", "pull", true)
	a.expectRun(t)
	e.m.HandleOutput(e.ctx, "web-1", &agentv1.CommandOutput{CommandId: c.CommandId, Lines: lines(1, 3)})

	type result struct {
		seqs []uint64
		cmd  *fleetv1.Command
		err  error
	}
	done := make(chan result, 1)
	firstBatch := make(chan struct{})
	go func() {
		var r result
		r.cmd, r.err = e.m.Follow(e.ctx, c.CommandId, 0, func(ls []*typesv1.OutputLine) error {
			for _, l := range ls {
				r.seqs = append(r.seqs, l.Seq)
			}
			if len(r.seqs) == 3 {
				close(firstBatch)
			}
			return nil
		})
		done <- r
	}()
	select {
	case <-firstBatch:
	case <-time.After(10 * time.Second):
		t.Fatal("Follow did not send the stored lines")
	}
	for i := range uint64(5) {
		e.m.HandleOutput(e.ctx, "web-1", &agentv1.CommandOutput{CommandId: c.CommandId, Lines: lines(4+i*10, 13+i*10)})
	}
	e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: c.CommandId, Outcome: agentv1.Outcome_OUTCOME_FAILED, ExitCode: 1})
	var r result
	select {
	case r = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Follow did not return after the command ended")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	if len(r.seqs) != 53 {
		t.Fatalf("Follow sent %d lines, want 53", len(r.seqs))
	}
	for i, s := range r.seqs {
		if s != uint64(i+1) {
			t.Fatalf("line %d has seq %d", i, s)
		}
	}
	if r.cmd.State != typesv1.CommandState_COMMAND_STATE_FAILED {
		t.Fatalf("Follow returned %v", r.cmd)
	}

	// An ended command: the rest of its log at once.
	var tail []uint64
	got, err := e.m.Follow(e.ctx, c.CommandId, 50, func(ls []*typesv1.OutputLine) error {
		for _, l := range ls {
			tail = append(tail, l.Seq)
		}
		return nil
	})
	if err != nil || got.State != typesv1.CommandState_COMMAND_STATE_FAILED || fmt.Sprint(tail) != "[51 52 53]" {
		t.Fatalf("follow of an ended command: %v %v %v", tail, got, err)
	}
	if _, err := e.m.Follow(e.ctx, "cmd-nope", 0, func([]*typesv1.OutputLine) error { return nil }); !errors.Is(err, ErrNotFound) {
		t.Fatalf("follow unknown = %v", err)
	}
	// A follower whose client went away ends.
	ctx, cancel := context.WithCancel(e.ctx)
	c2, _ := e.m.Run(e.ctx, "user:admin", "web-1", "pull", true)
	errc := make(chan error, 1)
	go func() {
		_, err := e.m.Follow(ctx, c2.CommandId, 0, func([]*typesv1.OutputLine) error { return nil })
		errc <- err
	}()
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("follow after cancel = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Follow did not end with its context")
	}
}

// TestFastAgentResultBeforeRunReturns: an agent may finish a command before
// Run has marked it running. The end must stick.
func TestFastAgentResultBeforeRunReturns(t *testing.T) {
	e := newEnv(t, "web-1")
	a := e.connect("web-1", nil)
	a.onSend = func(m *agentv1.ConnectResponse) {
		if r := m.GetRun(); r != nil {
			e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: r.CommandId, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED, Generation: hostGen})
		}
	}
	c, err := e.m.Run(e.ctx, "user:admin", "web-1", "pull", true)
	if err != nil {
		t.Fatal(err)
	}
	e.ended(c.CommandId, typesv1.CommandState_COMMAND_STATE_SUCCEEDED)
	if act := e.hub.ActiveCommands(); len(act) != 0 {
		t.Fatalf("hub lists %d active commands after the end", len(act))
	}
	if h, _ := e.hub.Host("web-1"); len(h.AvailableCommands) == 0 {
		t.Fatal("host shows as busy after its command ended")
	}
}

func TestRejectedByAgent(t *testing.T) {
	e := newEnv(t, "web-1")
	a := e.connect("web-1", nil)
	c, _ := e.m.Run(e.ctx, "user:admin", "web-1", "pull", true)
	a.expectRun(t)
	e.m.HandleRejected(e.ctx, "web-1", &agentv1.CommandRejected{CommandId: c.CommandId, Reason: agentv1.RejectReason_REJECT_REASON_BUSY, Message: "busy"})
	got := e.ended(c.CommandId, typesv1.CommandState_COMMAND_STATE_FAILED)
	if got.BlockReason != fleetv1.BlockReason_BLOCK_REASON_BUSY.String() {
		t.Fatalf("block reason %q", got.BlockReason)
	}
}

func TestCommandsLeftByAPreviousServer(t *testing.T) {
	for _, tc := range []struct {
		name    string
		cmd     *fleetv1.Command
		returns func(e *env, id string) // nil: the agent never comes back
		want    typesv1.CommandState
		msg     string
	}{
		{"running, the agent never returns", &fleetv1.Command{Command: "switch", State: typesv1.CommandState_COMMAND_STATE_RUNNING}, nil,
			typesv1.CommandState_COMMAND_STATE_FAILED, "did not come back"},
		{"running, the agent returns without it", &fleetv1.Command{Command: "test", State: typesv1.CommandState_COMMAND_STATE_RUNNING},
			func(e *env, id string) { e.connect("web-1", nil) }, typesv1.CommandState_COMMAND_STATE_FAILED, "reconnected without this command"},
		{"running, the agent returns with its result", &fleetv1.Command{Command: "test", State: typesv1.CommandState_COMMAND_STATE_RUNNING},
			func(e *env, id string) {
				h := e.hello("web-1")
				h.LastResult = &agentv1.CommandResult{CommandId: id, Outcome: agentv1.Outcome_OUTCOME_FAILED, ExitCode: 3, Message: "1 of 1 tests failed"}
				e.connect("web-1", h)
			}, typesv1.CommandState_COMMAND_STATE_FAILED, "1 of 1 tests failed"},
		{"running, the agent still runs it", &fleetv1.Command{Command: "test", State: typesv1.CommandState_COMMAND_STATE_RUNNING},
			func(e *env, id string) {
				h := e.hello("web-1")
				h.RunningCommandId = id
				e.connect("web-1", h)
				e.clock.Advance(2 * time.Minute) // past ReconnectWait: it came back, so no failure
				e.m.Tick(e.ctx)
				if s := e.state(id).State; s != typesv1.CommandState_COMMAND_STATE_RUNNING {
					e.t.Fatalf("resumed command = %v, want RUNNING", s)
				}
				e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: id, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED})
			}, typesv1.CommandState_COMMAND_STATE_SUCCEEDED, ""},
		{"pull checking the target", &fleetv1.Command{Command: "pull", State: typesv1.CommandState_COMMAND_STATE_POST_VALIDATION}, func(*env, string) {},
			typesv1.CommandState_COMMAND_STATE_FAILED, "server restarted"},
		{"unknown command", &fleetv1.Command{Command: "frobnicate", State: typesv1.CommandState_COMMAND_STATE_RUNNING}, func(*env, string) {},
			typesv1.CommandState_COMMAND_STATE_FAILED, "server restarted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := &hookStore{SQLite: openStore(t)}
			createHosts(t, st, "web-1")
			ctx := context.Background()
			c := proto.Clone(tc.cmd).(*fleetv1.Command)
			c.CommandId, c.HostId, c.CreatedAt, c.StartedAt = "cmd-old", "web-1", timestamppb.Now(), timestamppb.Now()
			if err := st.CreateCommand(ctx, c); err != nil {
				t.Fatal(err)
			}
			e := newEnvOn(t, st)
			if tc.returns == nil {
				if r := e.hub.Running("web-1"); r.GetCommandId() != "cmd-old" {
					t.Fatalf("the resumed command is not shown running: %v", r)
				}
				e.clock.Advance(89 * time.Second)
				e.m.Tick(e.ctx)
				if s := e.state("cmd-old").State; s != tc.cmd.State {
					t.Fatalf("before ReconnectWait: %v", s)
				}
				e.clock.Advance(2 * time.Second)
				e.m.Tick(e.ctx)
			} else {
				tc.returns(e, "cmd-old")
			}
			got := e.ended("cmd-old", tc.want)
			if !strings.Contains(got.Message, tc.msg) {
				t.Fatalf("message %q does not contain %q", got.Message, tc.msg)
			}
		})
	}
}

// Agent identities for the freshness tests.
var (
	oldAgent = identity{"1111111aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", strings.Repeat("a", 64), "/nix/store/aaaa-nixplane-agent/bin/nixplane-agent"}
	newAgent = identity{"2222222bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", strings.Repeat("b", 64), "/nix/store/bbbb-nixplane-agent/bin/nixplane-agent"}
)

type identity struct{ commit, hash, path string }

func (e *env) helloAs(id string, version string, ident identity) *agentv1.Hello {
	h := e.hello(id)
	h.AgentVersion, h.SourceCommit, h.BinaryHash, h.StorePath = version, ident.commit, ident.hash, ident.path
	return h
}

func (e *env) freshness(id string) (typesv1.AgentFreshness, string) {
	e.t.Helper()
	h, ok := e.hub.Host(id)
	if !ok {
		e.t.Fatalf("no host %s", id)
	}
	stored, err := e.st.GetHost(e.ctx, id)
	if err != nil {
		e.t.Fatal(err)
	}
	if stored.Record.AgentFreshness != h.AgentFreshness || stored.Record.AgentBinaryHash != h.AgentBinaryHash ||
		stored.Record.AgentStorePath != h.AgentStorePath || stored.Record.AgentSourceCommit != h.AgentSourceCommit {
		e.t.Fatalf("stored freshness/identity %v %s differs from the live %v %s", stored.Record.AgentFreshness, stored.Record.AgentBinaryHash, h.AgentFreshness, h.AgentBinaryHash)
	}
	return h.AgentFreshness, h.AgentBinaryHash
}

// TestFreshnessAfterSwitch: a switch that restarts the agent is judged by
// the identity the new agent reports against the one stored before, also
// when the server restarted in between.
func TestFreshnessAfterSwitch(t *testing.T) {
	const (
		fresh      = typesv1.AgentFreshness_AGENT_FRESHNESS_FRESH
		suspicious = typesv1.AgentFreshness_AGENT_FRESHNESS_SUSPICIOUS
		stale      = typesv1.AgentFreshness_AGENT_FRESHNESS_STALE
		unknownF   = typesv1.AgentFreshness_AGENT_FRESHNESS_UNKNOWN
		succeeded  = typesv1.CommandState_COMMAND_STATE_SUCCEEDED
		partial    = typesv1.CommandState_COMMAND_STATE_PARTIAL
	)
	for _, tc := range []struct {
		name        string
		before      string // agent version before the switch
		after       identity
		afterV      string
		wantFresh   typesv1.AgentFreshness
		wantState   typesv1.CommandState
		wantMessage string
		agentStatus typesv1.CompartmentStatus
	}{
		{"new binary", "0.9.0", newAgent, "1.0.0", fresh, succeeded, "a new agent binary runs (binary aaaaaaa → bbbbbbb)", okStatus},
		{"only the commit changed", "0.9.0", identity{newAgent.commit, oldAgent.hash, oldAgent.path}, "0.9.0", suspicious, succeeded, "suspicious agent: the agent reports source commit 2222222 instead of 1111111", outdatedStatus},
		{"old binary still runs", "0.9.0", oldAgent, "0.9.0", stale, partial, "stale agent: the agent binary did not change although the server expects agent 1.0.0", errorStatus},
		{"unchanged but already expected", "1.0.0", oldAgent, "1.0.0", fresh, succeeded, "already the version the server expects", okStatus},
		{"new agent reports no identity", "0.9.0", identity{}, "1.0.0", unknownF, succeeded, "agent freshness unknown", okStatus},
	} {
		for _, restart := range []bool{false, true} {
			name := tc.name
			if restart {
				name += ", server restarted in between"
			}
			t.Run(name, func(t *testing.T) {
				e := newEnv(t, "web-1")
				a := e.connect("web-1", e.helloAs("web-1", tc.before, oldAgent))
				if f, hash := e.freshness("web-1"); f != unknownF || hash != oldAgent.hash {
					t.Fatalf("after the first hello: %v %s, want UNKNOWN with the identity recorded", f, hash)
				}
				c, err := e.m.Run(e.ctx, "user:admin", "web-1", "switch", false)
				if err != nil {
					t.Fatal(err)
				}
				a.expectRun(t)
				e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: c.CommandId, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED, AgentRestarting: true})
				e.disconnect(a)
				if restart {
					e = newEnvOn(t, e.st)
				}
				e.clock.Advance(80 * time.Second) // a slow restart, within ReconnectWait
				if s := e.state(c.CommandId); s.State != typesv1.CommandState_COMMAND_STATE_POST_VALIDATION || s.Message != msgAwaitReconnect {
					t.Fatalf("while the agent restarts: %v %q", s.State, s.Message)
				}
				a2 := e.connect("web-1", e.helloAs("web-1", tc.afterV, tc.after))
				if m := a2.next(t); m.GetRefresh() == nil {
					t.Fatalf("the reconnected agent got %v, want a RefreshStatus for the pending switch", m)
				}
				if f, _ := e.freshness("web-1"); f != tc.wantFresh {
					t.Fatalf("freshness after the reconnect = %v, want %v", f, tc.wantFresh)
				}
				// The new agent's status check gets the whole post-validation
				// wait, however long the restart took.
				e.clock.Advance(50 * time.Second)
				e.m.Tick(e.ctx)
				if s := e.state(c.CommandId).State; s != typesv1.CommandState_COMMAND_STATE_POST_VALIDATION {
					t.Fatalf("while the new agent checks its system: %v", s)
				}
				e.m.HandleStatus(e.ctx, "web-1", &agentv1.StatusReport{Generation: hostGen, LockHash: hostLock,
					System: &typesv1.SystemCheck{Status: typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK, Message: "current"}})
				got := e.ended(c.CommandId, tc.wantState)
				if !strings.Contains(got.Message, tc.wantMessage) || !strings.Contains(got.Message, "agent restarted") {
					t.Fatalf("message %q does not contain %q and the restart", got.Message, tc.wantMessage)
				}
				h, _ := e.hub.Host("web-1")
				if h.UpdateStatus.Agent.Status != tc.agentStatus {
					t.Fatalf("agent compartment = %v %q, want %v", h.UpdateStatus.Agent.Status, h.UpdateStatus.Agent.Message, tc.agentStatus)
				}
				// A later plain reconnect with the same binary keeps the verdict.
				e.disconnect(a2)
				e.connect("web-1", e.helloAs("web-1", tc.afterV, tc.after))
				if f, _ := e.freshness("web-1"); f != tc.wantFresh {
					t.Fatalf("freshness after a plain reconnect = %v, want it kept at %v", f, tc.wantFresh)
				}
			})
		}
	}
}

const (
	okStatus       = typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK
	outdatedStatus = typesv1.CompartmentStatus_COMPARTMENT_STATUS_OUTDATED
	errorStatus    = typesv1.CompartmentStatus_COMPARTMENT_STATUS_ERROR
)

// TestFreshnessOfSwitchWithoutRestart: an agent that was not replaced by a
// switch (its installed binary did not change) is never called stale — the
// fleet flake may still pin an older agent after a server upgrade, and such
// switches must not halt a deploy; at the expected version it is current.
func TestFreshnessOfSwitchWithoutRestart(t *testing.T) {
	for _, tc := range []struct {
		version string
		want    typesv1.CommandState
		fresh   typesv1.AgentFreshness
	}{
		{"0.9.0", typesv1.CommandState_COMMAND_STATE_SUCCEEDED, typesv1.AgentFreshness_AGENT_FRESHNESS_UNKNOWN},
		{"1.0.0", typesv1.CommandState_COMMAND_STATE_SUCCEEDED, typesv1.AgentFreshness_AGENT_FRESHNESS_FRESH},
	} {
		t.Run(tc.version, func(t *testing.T) {
			e := newEnv(t, "web-1")
			a := e.connect("web-1", e.helloAs("web-1", tc.version, oldAgent))
			c, _ := e.m.Run(e.ctx, "user:admin", "web-1", "pull-switch", false)
			a.expectRun(t)
			e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: c.CommandId, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED})
			e.m.HandleStatus(e.ctx, "web-1", &agentv1.StatusReport{System: &typesv1.SystemCheck{Status: typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK}})
			got := e.ended(c.CommandId, tc.want)
			if stale := strings.Contains(got.Message, "nix-collect-garbage -d"); stale != (tc.fresh == typesv1.AgentFreshness_AGENT_FRESHNESS_STALE) {
				t.Fatalf("message %q", got.Message)
			}
			if f, _ := e.freshness("web-1"); f != tc.fresh {
				t.Fatalf("freshness %v, want %v", f, tc.fresh)
			}
			a.expectNothing(t) // no refresh: the agent reports on its own
		})
	}
}

// blockingTarget is a target refresher that holds every refetch until
// released.
type blockingTarget struct{ release chan struct{} }

func (b *blockingTarget) Refetch(ctx context.Context) {
	select {
	case <-b.release:
	case <-ctx.Done():
	}
}

// TestStatusReportDoesNotEndAPullCheckingTheTarget: the status report an
// agent sends after a pull must not complete the pull as if it were a switch.
func TestStatusReportDoesNotEndAPullCheckingTheTarget(t *testing.T) {
	st := &hookStore{SQLite: openStore(t)}
	createHosts(t, st, "web-1")
	e := newEnvOn(t, st)
	bt := &blockingTarget{release: make(chan struct{})}
	m, err := New(e.ctx, Config{Hub: e.hub, Store: st, Now: e.clock.Now, Log: quietLog, Target: bt})
	if err != nil {
		t.Fatal(err)
	}
	e.m = m
	e.setTarget(hostGen, hostLock)
	a := e.connect("web-1", nil)
	c, err := e.m.Run(e.ctx, "user:admin", "web-1", "pull", true)
	if err != nil {
		t.Fatal(err)
	}
	a.expectRun(t)
	e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: c.CommandId, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED, Generation: targetGen})
	if s := e.state(c.CommandId).State; s != typesv1.CommandState_COMMAND_STATE_POST_VALIDATION {
		t.Fatalf("pull while the target is refetched: %v", s)
	}
	e.m.HandleStatus(e.ctx, "web-1", &agentv1.StatusReport{Generation: targetGen, System: &typesv1.SystemCheck{Status: typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK}})
	if s := e.state(c.CommandId); s.State != typesv1.CommandState_COMMAND_STATE_POST_VALIDATION {
		t.Fatalf("the status report ended the pull: %v %q", s.State, s.Message)
	}
	close(bt.release)
	done := e.m.Done(c.CommandId)
	if done != nil {
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("pull did not end after the refetch")
		}
	}
	got := e.ended(c.CommandId, typesv1.CommandState_COMMAND_STATE_PARTIAL)
	if !strings.Contains(got.Message, "pulled bbbbbbb, but the fleet target is aaaaaaa") {
		t.Fatalf("pull message %q", got.Message)
	}
}

// autoAgent connects a host whose agent answers every RunCommand: output,
// then a result from outcome.
func (e *env) autoAgent(id string, outcome func(kind typesv1.CommandKind) *agentv1.CommandResult) *agent {
	a := e.connect(id, nil)
	a.onSend = func(m *agentv1.ConnectResponse) {
		r := m.GetRun()
		if r == nil {
			return
		}
		go func() {
			e.m.HandleOutput(e.ctx, id, &agentv1.CommandOutput{CommandId: r.CommandId, Lines: lines(1, 2)})
			res := outcome(r.Kind)
			res.CommandId = r.CommandId
			e.m.HandleResult(e.ctx, id, res)
			if r.Kind == typesv1.CommandKind_COMMAND_KIND_SWITCH {
				e.m.HandleStatus(e.ctx, id, &agentv1.StatusReport{System: &typesv1.SystemCheck{Status: typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK}})
			}
		}()
	}
	return a
}

func succeed(typesv1.CommandKind) *agentv1.CommandResult {
	return &agentv1.CommandResult{Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED, Generation: hostGen}
}

func (e *env) waitBulk(id string) *fleetv1.BulkCommand {
	e.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, ok := e.m.GetBulk(id)
		if !ok {
			e.t.Fatalf("bulk %s unknown", id)
		}
		if b.State != fleetv1.BulkState_BULK_STATE_RUNNING {
			return b
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("bulk %s still running: %v", id, b)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestBulk(t *testing.T) {
	e := newEnv(t, "a", "b", "c", "d")
	e.autoAgent("a", succeed)
	e.autoAgent("b", func(typesv1.CommandKind) *agentv1.CommandResult {
		return &agentv1.CommandResult{Outcome: agentv1.Outcome_OUTCOME_FAILED, ExitCode: 1}
	})
	e.autoAgent("c", succeed)
	// d stays offline.
	w, _ := e.hub.Subscribe(hub.WatchOptions{SkipHeartbeats: true, SkipOutput: true})

	b, err := e.m.RunBulk(e.ctx, BulkSpec{Actor: "user:admin", Command: "pull", HostIDs: []string{"a", "b", "c", "d"}, Concurrency: 2, Force: true})
	if err != nil {
		t.Fatal(err)
	}
	got := e.waitBulk(b.BulkId)
	if got.State != fleetv1.BulkState_BULK_STATE_PARTIAL || got.FinishedAt == nil {
		t.Fatalf("bulk = %v, want PARTIAL", got)
	}
	byHost := map[string]*fleetv1.BulkHostResult{}
	for _, r := range got.Results {
		byHost[r.HostId] = r
	}
	for _, id := range []string{"a", "c"} {
		if s := byHost[id].GetCommand().GetState(); s != typesv1.CommandState_COMMAND_STATE_SUCCEEDED {
			t.Errorf("host %s: %v", id, byHost[id])
		}
		if byHost[id].GetCommand().GetBulkId() != b.BulkId {
			t.Errorf("host %s command not tagged with the bulk id", id)
		}
	}
	if s := byHost["b"].GetCommand().GetState(); s != typesv1.CommandState_COMMAND_STATE_FAILED {
		t.Errorf("host b: %v", byHost["b"])
	}
	if r := byHost["d"]; r.BlockReason != fleetv1.BlockReason_BLOCK_REASON_OFFLINE.String() || r.Command != nil {
		t.Errorf("host d: %v", r)
	}
	var progress int
	var last *fleetv1.BulkCommand
	for _, ev := range drain(e.hub, w) {
		if p := ev.GetBulkProgress(); p != nil && p.Bulk.BulkId == b.BulkId {
			progress++
			last = p.Bulk
		}
	}
	if progress < 5 || !proto.Equal(last, got) {
		t.Fatalf("%d progress events, last %v; want several ending with the final state", progress, last)
	}

	// All succeed, with several steps per host.
	b2, err := e.m.RunBulk(e.ctx, BulkSpec{Actor: "user:admin", Command: "do-all", HostIDs: []string{"a", "c"}, Force: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := e.waitBulk(b2.BulkId); got.State != fleetv1.BulkState_BULK_STATE_SUCCEEDED {
		t.Fatalf("do-all bulk = %v", got)
	}
	cmds, _, err := e.st.ListCommands(e.ctx, "a", 100, "")
	if err != nil || len(cmds) != 4 { // pull from the first bulk, then pull, switch, test
		t.Fatalf("host a has %d commands, want 4 (%v)", len(cmds), err)
	}

	if _, err := e.m.RunBulk(e.ctx, BulkSpec{Command: "nope", HostIDs: []string{"a"}}); blockReason(t, err) != fleetv1.BlockReason_BLOCK_REASON_UNKNOWN_COMMAND {
		t.Fatal("unknown bulk command not refused")
	}
}

func TestBulkBatchesHalt(t *testing.T) {
	e := newEnv(t, "a", "b", "c")
	e.autoAgent("a", func(typesv1.CommandKind) *agentv1.CommandResult {
		return &agentv1.CommandResult{Outcome: agentv1.Outcome_OUTCOME_FAILED, ExitCode: 1}
	})
	e.autoAgent("b", succeed)
	e.autoAgent("c", succeed)
	b, err := e.m.RunBulk(e.ctx, BulkSpec{Actor: "user:admin", Command: "switch", Batches: [][]string{{"a"}, {"b", "c"}}, MaxFailures: 0})
	if err != nil {
		t.Fatal(err)
	}
	got := e.waitBulk(b.BulkId)
	if got.State != fleetv1.BulkState_BULK_STATE_FAILED {
		t.Fatalf("halted bulk = %v", got)
	}
	for _, r := range got.Results[1:] {
		if r.Command != nil || !strings.Contains(r.Message, "skipped") {
			t.Fatalf("host %s ran after the halt: %v", r.HostId, r)
		}
	}
}

func TestTimeoutScale(t *testing.T) {
	st := &hookStore{SQLite: openStore(t)}
	createHosts(t, st, "web-1")
	h, err := hub.New(context.Background(), hub.Config{Store: st, Log: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(context.Background(), Config{Hub: h, Store: st, TimeoutScale: 0.01, Log: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	a := &agent{id: "web-1", msgs: make(chan *agentv1.ConnectResponse, 10)}
	if _, _, err := h.Connect("web-1", &agentv1.Hello{Hostname: "web-1", HeartbeatInterval: durationpb.New(time.Second)}, a, func(error) {}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Run(context.Background(), "user:admin", "web-1", "switch", false); err != nil {
		t.Fatal(err)
	}
	if d := a.expectRun(t).Timeout.AsDuration(); d != 18*time.Second {
		t.Fatalf("scaled switch timeout = %v, want 18s", d)
	}
}

// TestEndedBulksAreForgotten: a long-running server keeps the latest ended
// bulk runs, not all of them; a running one is never dropped.
func TestEndedBulksAreForgotten(t *testing.T) {
	e := newEnv(t, "a", "b") // a stays offline: its runs end at once
	gate := make(chan struct{})
	e.autoAgent("b", func(typesv1.CommandKind) *agentv1.CommandResult {
		<-gate
		return &agentv1.CommandResult{Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED}
	})
	running, err := e.m.RunBulk(e.ctx, BulkSpec{Actor: "user:admin", Command: "refresh", HostIDs: []string{"b"}})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for range KeptBulks + 20 {
		b, err := e.m.RunBulk(e.ctx, BulkSpec{Actor: "user:admin", Command: "refresh", HostIDs: []string{"a"}})
		if err != nil {
			t.Fatal(err)
		}
		e.waitBulk(b.BulkId)
		ids = append(ids, b.BulkId)
	}
	e.m.mu.Lock()
	n := len(e.m.bulks)
	e.m.mu.Unlock()
	if n > KeptBulks+1 {
		t.Fatalf("%d bulk runs kept, want at most %d ended ones and the running one", n, KeptBulks)
	}
	if _, ok := e.m.GetBulk(ids[0]); ok {
		t.Error("the oldest ended run is still kept")
	}
	if _, ok := e.m.GetBulk(ids[len(ids)-1]); !ok {
		t.Error("the newest run was dropped")
	}
	if b, ok := e.m.GetBulk(running.BulkId); !ok || b.State != fleetv1.BulkState_BULK_STATE_RUNNING {
		t.Errorf("the running bulk was dropped: %v", b)
	}
	close(gate)
	e.waitBulk(running.BulkId)
}

// TestBulkEndsWhenTheManagerStops: a bulk run waiting for its hosts does
// not outlive the server: when Loop ends, the run ends too and says so,
// and its goroutines are gone.
func TestBulkEndsWhenTheManagerStops(t *testing.T) {
	e := newEnv(t, "a", "b")
	e.connect("a", nil) // never answers
	ctx, cancel := context.WithCancel(e.ctx)
	loopDone := make(chan error, 1)
	go func() { loopDone <- e.m.Loop(ctx) }()
	b, err := e.m.RunBulk(e.ctx, BulkSpec{Actor: "user:admin", Command: "switch", Batches: [][]string{{"a"}, {"b"}}, MaxFailures: 1})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the switch on a to run", func() bool {
		got, _ := e.m.GetBulk(b.BulkId)
		return got.Results[0].Command != nil
	})
	cancel()
	if err := <-loopDone; err != nil {
		t.Fatal(err)
	}
	got := e.waitBulk(b.BulkId)
	if got.State != fleetv1.BulkState_BULK_STATE_FAILED || !strings.Contains(got.Message, "server stopped") {
		t.Fatalf("bulk = %v, want FAILED because the server stopped", got)
	}
	if r := got.Results[1]; r.Command != nil || !strings.Contains(r.Message, "skipped") {
		t.Fatalf("host b: %v, want skipped", r)
	}
}

// waitUntil polls cond until it holds, failing the test after a deadline.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestFastResultIsNotOverwrittenByRunning: an agent that answers a switch
// before the server marked it running (the result arrives while Send is
// still returning) leaves the command in post-validation, and the status
// report completes it.
func TestFastResultIsNotOverwrittenByRunning(t *testing.T) {
	e := newEnv(t, "web-1")
	a := e.connect("web-1", nil)
	a.onSend = func(m *agentv1.ConnectResponse) {
		if run := m.GetRun(); run != nil {
			e.m.HandleResult(e.ctx, "web-1", &agentv1.CommandResult{CommandId: run.CommandId, Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED})
		}
	}
	c, err := e.m.Run(e.ctx, "user:admin", "web-1", "switch", false)
	if err != nil {
		t.Fatal(err)
	}
	if c.State != typesv1.CommandState_COMMAND_STATE_POST_VALIDATION || c.StartedAt == nil {
		t.Fatalf("after a fast result the command is %s (started %v), want post-validation", c.State, c.StartedAt)
	}
	e.m.HandleStatus(e.ctx, "web-1", &agentv1.StatusReport{System: &typesv1.SystemCheck{Status: typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK}})
	e.ended(c.CommandId, typesv1.CommandState_COMMAND_STATE_SUCCEEDED)
}

// TestSameAgentReconnectingWritesNothing: an agent that reconnects with the
// same binary (a restart storm) costs no host-record write; a new binary is
// recorded.
func TestSameAgentReconnectingWritesNothing(t *testing.T) {
	e := newEnv(t, "web-1")
	hello := e.helloAs("web-1", "1.0.0", oldAgent)
	a := e.connect("web-1", hello)
	e.disconnect(a)
	before := e.st.recordWrites.Load()
	a = e.connect("web-1", hello)
	if n := e.st.recordWrites.Load() - before; n != 0 {
		t.Fatalf("a reconnect with the same binary wrote the host record %d times", n)
	}
	e.disconnect(a)
	e.connect("web-1", e.helloAs("web-1", "1.0.0", newAgent))
	if e.st.recordWrites.Load() == before {
		t.Fatal("a new agent binary was not recorded")
	}
	if h, _ := e.hub.Host("web-1"); h.AgentBinaryHash != newAgent.hash {
		t.Fatalf("recorded binary hash %q, want %q", h.AgentBinaryHash, newAgent.hash)
	}
}
