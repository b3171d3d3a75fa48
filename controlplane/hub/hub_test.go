package hub

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/controlplane/store"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

var quietLog = slog.New(slog.DiscardHandler)

// fakeClock is an injectable clock that only moves when told.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
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

// countingStore is the real SQLite store that counts last-seen batches and
// can be told to fail them.
type countingStore struct {
	*store.SQLite
	mu      sync.Mutex
	batches []map[string]time.Time
	fail    error
}

func (s *countingStore) SaveLastSeen(ctx context.Context, seen map[string]time.Time) error {
	s.mu.Lock()
	fail := s.fail
	if fail == nil {
		cp := make(map[string]time.Time, len(seen))
		for k, v := range seen {
			cp[k] = v
		}
		s.batches = append(s.batches, cp)
	}
	s.mu.Unlock()
	if fail != nil {
		return fail
	}
	return s.SQLite.SaveLastSeen(ctx, seen)
}

func (s *countingStore) batchCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.batches)
}

func openStore(t testing.TB) *store.SQLite {
	t.Helper()
	st, err := store.Open(context.Background(), filepath.Join(t.TempDir(), "nixplane.db"), store.WithLogger(quietLog))
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

type testHub struct {
	*Hub
	store *countingStore
	clock *fakeClock
}

// newTestHub returns a hub over a real SQLite store holding hosts.
func newTestHub(t testing.TB, queueLimit int, hosts ...string) *testHub {
	t.Helper()
	st := &countingStore{SQLite: openStore(t)}
	ctx := context.Background()
	for _, id := range hosts {
		if err := st.CreateHost(ctx, store.Host{ID: id, Record: &fleetv1.Host{HostId: id, Hostname: id}, CreatedAt: time.Now()}, []byte("hash-"+id)); err != nil {
			t.Fatalf("create host %s: %v", id, err)
		}
	}
	clk := newClock()
	h, err := New(ctx, Config{ServerVersion: "1.0.0", Store: st, Now: clk.Now, QueueLimit: queueLimit, Log: quietLog})
	if err != nil {
		t.Fatalf("new hub: %v", err)
	}
	return &testHub{Hub: h, store: st, clock: clk}
}

// recSender records what is sent down an agent stream.
type recSender struct {
	mu   sync.Mutex
	sent []*agentv1.ConnectResponse
}

func (s *recSender) Send(m *agentv1.ConnectResponse) error {
	s.mu.Lock()
	s.sent = append(s.sent, m)
	s.mu.Unlock()
	return nil
}

type session struct {
	conn *Conn
	ctx  context.Context
}

func (th *testHub) connect(t testing.TB, id string, interval time.Duration) session {
	t.Helper()
	ctx, cancel := context.WithCancelCause(context.Background())
	t.Cleanup(func() { cancel(nil) })
	hello := &agentv1.Hello{Hostname: id, AgentVersion: "1.0.0", Generation: "aaaaaaa1", LockHash: "11"}
	if interval > 0 {
		hello.HeartbeatInterval = durationpb.New(interval)
	}
	c, rec, err := th.Connect(id, hello, &recSender{}, cancel)
	if err != nil {
		t.Fatalf("connect %s: %v", id, err)
	}
	if rec.Generation != "aaaaaaa1" || rec.AgentVersion != "1.0.0" {
		t.Fatalf("record after hello = %v", rec)
	}
	return session{conn: c, ctx: ctx}
}

func metrics(cpu float64) *typesv1.Metrics { return &typesv1.Metrics{CpuPercent: cpu} }

func hb(cpu float64) *agentv1.Heartbeat {
	return &agentv1.Heartbeat{Metrics: metrics(cpu), Generation: "aaaaaaa1", LockHash: "11"}
}

// model is what a watcher reconstructs from a snapshot and the events after
// it, the way the web page does.
type model map[string]*fleetv1.Host

func (m model) apply(t testing.TB, evs []*fleetv1.FleetEvent) {
	t.Helper()
	for _, ev := range evs {
		switch k := ev.Kind.(type) {
		case *fleetv1.FleetEvent_Snapshot:
			clear(m)
			for _, h := range k.Snapshot.Hosts {
				m[h.HostId] = proto.Clone(h).(*fleetv1.Host)
			}
		case *fleetv1.FleetEvent_HostHeartbeat:
			h := m[k.HostHeartbeat.HostId]
			if h == nil {
				t.Fatalf("heartbeat for unknown host %s", k.HostHeartbeat.HostId)
			}
			h.Online, h.LastSeen, h.Metrics = true, k.HostHeartbeat.LastSeen, k.HostHeartbeat.Metrics
		case *fleetv1.FleetEvent_HostOffline:
			h := m[k.HostOffline.HostId]
			if h == nil {
				t.Fatalf("offline for unknown host %s", k.HostOffline.HostId)
			}
			h.Online, h.Metrics, h.AvailableCommands = false, nil, nil
			if k.HostOffline.LastSeen != nil {
				h.LastSeen = k.HostOffline.LastSeen
			}
		case *fleetv1.FleetEvent_HostRegistered:
			m[k.HostRegistered.Host.HostId] = proto.Clone(k.HostRegistered.Host).(*fleetv1.Host)
		case *fleetv1.FleetEvent_HostRemoved:
			delete(m, k.HostRemoved.HostId)
		case *fleetv1.FleetEvent_HostStatusChanged:
			m[k.HostStatusChanged.Host.HostId] = proto.Clone(k.HostStatusChanged.Host).(*fleetv1.Host)
		}
	}
}

func (m model) fromSnapshot(s *fleetv1.Snapshot) model {
	clear(m)
	for _, h := range s.Hosts {
		m[h.HostId] = proto.Clone(h).(*fleetv1.Host)
	}
	return m
}

// withoutCheckedAt drops compartments' checked-at times: a refetched target
// with unchanged content moves them without an event, by design.
func withoutCheckedAt(h *fleetv1.Host) *fleetv1.Host {
	h = proto.Clone(h).(*fleetv1.Host)
	if us := h.UpdateStatus; us != nil {
		for _, c := range []*typesv1.Compartment{us.Agent, us.Git, us.Lock, us.System, us.Tests} {
			if c != nil {
				c.CheckedAt = nil
			}
		}
	}
	return h
}

// assertMatches compares the reconstructed fleet with the hub's.
func assertMatches(t *testing.T, m model, want []*fleetv1.Host) {
	t.Helper()
	if len(m) != len(want) {
		t.Fatalf("watcher sees %d hosts, hub has %d", len(m), len(want))
	}
	for _, w := range want {
		got := m[w.HostId]
		if got == nil {
			t.Fatalf("watcher does not know host %s", w.HostId)
		}
		if got, w := withoutCheckedAt(got), withoutCheckedAt(w); !proto.Equal(got, w) {
			t.Fatalf("host %s as the watcher sees it differs from the hub:\n got %v\nwant %v", w.HostId, got, w)
		}
	}
}

// drain takes everything queued for w without waiting.
func drain(t testing.TB, h *Hub, w *Watcher) []*fleetv1.FleetEvent {
	t.Helper()
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

// TestSnapshotThenEventsIsCurrentState runs a random mix of operations on a
// few hosts, lets a watcher drain at random moments (so heartbeats coalesce
// in its queue) and checks that its snapshot plus events always rebuild the
// hub's state exactly.
func TestSnapshotThenEventsIsCurrentState(t *testing.T) {
	for seed := range uint64(20) {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			ids := []string{"web-1", "web-2", "db-1"}
			th := newTestHub(t, 100000, ids...)
			rng := rand.New(rand.NewPCG(seed, 7))
			sessions := map[string]*Conn{}
			var w *Watcher
			m := model{}
			cmdSeq := 0
			for step := range 400 {
				if step == 50 {
					var snap *fleetv1.Snapshot
					w, snap = th.Subscribe(WatchOptions{})
					m.fromSnapshot(snap)
				}
				th.clock.Advance(time.Duration(rng.IntN(1500)) * time.Millisecond)
				id := ids[rng.IntN(len(ids))]
				c := sessions[id]
				switch op := rng.IntN(10); {
				case c == nil && op < 5:
					s := th.connect(t, id, 0)
					sessions[id] = s.conn
				case c == nil:
					// offline host: a record change (e.g. an admin edit)
					if _, err := th.UpdateRecord(id, func(h *fleetv1.Host) { h.Location = fmt.Sprint("rack-", step) }); err != nil {
						t.Fatal(err)
					}
				case op < 6:
					gen := "aaaaaaa1"
					if rng.IntN(4) == 0 {
						gen = fmt.Sprintf("bbbbbb%02x", step%256)
					}
					th.Heartbeat(c, &agentv1.Heartbeat{Metrics: metrics(float64(step)), Generation: gen, LockHash: "11"})
				case op < 7:
					th.Disconnect(c, "stream closed")
					delete(sessions, id)
				case op < 8:
					cmdSeq++
					cmd := &fleetv1.Command{CommandId: fmt.Sprint("cmd-", cmdSeq), HostId: id, Command: "pull", State: typesv1.CommandState_COMMAND_STATE_RUNNING}
					if r := th.Running(id); r != nil {
						cmd = proto.Clone(r).(*fleetv1.Command)
						cmd.State = typesv1.CommandState_COMMAND_STATE_SUCCEEDED
					}
					th.CommandChanged(cmd)
				case op < 9:
					th.SetTarget(&fleetv1.FleetTarget{GitCommit: fmt.Sprintf("bbbbbb%02x", rng.IntN(256)), LockHash: "11", FetchedAt: timestamppb.New(th.clock.Now())})
				default:
					if _, err := th.UpdateRecord(id, func(h *fleetv1.Host) { h.ThemeColor = "#123456" }); err != nil {
						t.Fatal(err)
					}
				}
				if w != nil && rng.IntN(8) == 0 {
					m.apply(t, drain(t, th.Hub, w))
					assertMatches(t, m, th.Hosts())
				}
			}
			m.apply(t, drain(t, th.Hub, w))
			assertMatches(t, m, th.Hosts())
		})
	}
}

// TestHeartbeatCoalescesLatestWins: unsent heartbeats of one host collapse
// into the newest; other hosts' heartbeats and other events stay.
func TestHeartbeatCoalescesLatestWins(t *testing.T) {
	th := newTestHub(t, 0, "a", "b")
	a := th.connect(t, "a", 0)
	b := th.connect(t, "b", 0)
	w, _ := th.Subscribe(WatchOptions{})
	for i := 1; i <= 50; i++ {
		th.clock.Advance(time.Second)
		th.Heartbeat(a.conn, hb(float64(i)))
		if i%10 == 0 {
			th.Heartbeat(b.conn, hb(float64(1000+i)))
		}
	}
	evs := drain(t, th.Hub, w)
	if len(evs) != 2 {
		t.Fatalf("got %d events, want 2 (one heartbeat per host): %v", len(evs), evs)
	}
	ha, hbb := evs[0].GetHostHeartbeat(), evs[1].GetHostHeartbeat()
	if ha.GetHostId() != "a" || ha.GetMetrics().GetCpuPercent() != 50 {
		t.Errorf("host a heartbeat = %v, want the 50th", ha)
	}
	if !ha.GetLastSeen().AsTime().Equal(th.clock.Now()) {
		t.Errorf("host a last seen = %v, want %v", ha.GetLastSeen().AsTime(), th.clock.Now())
	}
	if hbb.GetHostId() != "b" || hbb.GetMetrics().GetCpuPercent() != 1050 {
		t.Errorf("host b heartbeat = %v, want the 5th", hbb)
	}

	// After a drain, a new heartbeat is queued again.
	th.Heartbeat(a.conn, hb(99))
	evs = drain(t, th.Hub, w)
	if len(evs) != 1 || evs[0].GetHostHeartbeat().GetMetrics().GetCpuPercent() != 99 {
		t.Fatalf("after drain got %v", evs)
	}

	// SkipHeartbeats watchers get none.
	quiet, _ := th.Subscribe(WatchOptions{SkipHeartbeats: true})
	th.Heartbeat(a.conn, hb(100))
	if evs := drain(t, th.Hub, quiet); len(evs) != 0 {
		t.Fatalf("SkipHeartbeats watcher got %v", evs)
	}
}

// TestCoalescedHeartbeatDoesNotOvertakeStatus: a heartbeat that replaces an
// unsent one must not be delivered before a status change that was
// published between them, or the watcher ends with stale live data.
func TestCoalescedHeartbeatDoesNotOvertakeStatus(t *testing.T) {
	th := newTestHub(t, 0, "a")
	a := th.connect(t, "a", 0)
	w, snap := th.Subscribe(WatchOptions{})
	m := model{}.fromSnapshot(snap)

	th.clock.Advance(time.Second)
	th.Heartbeat(a.conn, hb(10))
	th.clock.Advance(time.Second)
	if _, err := th.UpdateRecord("a", func(h *fleetv1.Host) { h.Location = "rack 2" }); err != nil {
		t.Fatal(err)
	}
	th.clock.Advance(time.Second)
	th.Heartbeat(a.conn, hb(20))

	m.apply(t, drain(t, th.Hub, w))
	assertMatches(t, m, th.Hosts())
	if got := m["a"].GetMetrics().GetCpuPercent(); got != 20 {
		t.Fatalf("watcher's cpu = %v, want the latest heartbeat's 20", got)
	}

	// The same across an offline/online cycle.
	th.Heartbeat(a.conn, hb(30))
	th.Disconnect(a.conn, "stream closed")
	a2 := th.connect(t, "a", 0)
	th.clock.Advance(time.Second)
	th.Heartbeat(a2.conn, hb(40))
	m.apply(t, drain(t, th.Hub, w))
	assertMatches(t, m, th.Hosts())
	if !m["a"].Online || m["a"].GetMetrics().GetCpuPercent() != 40 {
		t.Fatalf("after reconnect the watcher sees online=%v cpu=%v, want online with 40", m["a"].Online, m["a"].GetMetrics().GetCpuPercent())
	}
}

func outputEvent(seq uint64) *fleetv1.FleetEvent {
	return &fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_CommandOutput{CommandOutput: &fleetv1.CommandOutput{
		CommandId: "cmd-1", HostId: "a", Lines: []*typesv1.OutputLine{{Seq: seq, Text: "line"}}}}}
}

// TestStuckWatcherIsResyncedAndBlocksNobody publishes 100k events while one
// watcher never reads: Publish never waits for it, the draining watcher gets
// every output event in order, and the stuck one gets one resync snapshot.
func TestStuckWatcherIsResyncedAndBlocksNobody(t *testing.T) {
	const total = 100_000
	const chunk = 1000 // the drainer is never more than this behind: below the queue limit
	th := newTestHub(t, 4096, "a")
	a := th.connect(t, "a", 0)
	stuck, _ := th.Subscribe(WatchOptions{})
	live, _ := th.Subscribe(WatchOptions{})

	var mu sync.Mutex
	received := 0
	var order error
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		var next uint64 = 1
		for {
			batch, err := th.Next(ctx, live)
			if err != nil {
				return
			}
			for _, ev := range batch {
				switch k := ev.Kind.(type) {
				case *fleetv1.FleetEvent_CommandOutput:
					mu.Lock()
					if got := k.CommandOutput.Lines[0].Seq; got != next && order == nil {
						order = fmt.Errorf("output seq %d arrived, want %d", got, next)
					}
					next++
					received++
					mu.Unlock()
				case *fleetv1.FleetEvent_Snapshot:
					mu.Lock()
					if order == nil {
						order = errors.New("the draining watcher was resynced")
					}
					mu.Unlock()
				}
			}
		}
	}()

	for seq := uint64(1); seq <= total; seq++ {
		th.Publish(outputEvent(seq))
		if seq%3 == 0 {
			th.Heartbeat(a.conn, hb(float64(seq)))
		}
		if seq%chunk == 0 {
			waitFor(t, 30*time.Second, func() bool {
				mu.Lock()
				defer mu.Unlock()
				return received == int(seq) || order != nil
			}, "draining watcher to catch up")
		}
	}
	cancel()
	<-done
	mu.Lock()
	if order != nil {
		t.Fatal(order)
	}
	if received != total {
		t.Fatalf("draining watcher got %d output events, want %d", received, total)
	}
	mu.Unlock()

	batch := drain(t, th.Hub, stuck)
	if len(batch) != 1 || batch[0].GetSnapshot() == nil || !batch[0].GetSnapshot().Resync {
		t.Fatalf("stuck watcher got %d events (first %v), want one resync snapshot", len(batch), batch[0])
	}
	snap := batch[0].GetSnapshot()
	if len(snap.Hosts) != 1 || snap.Hosts[0].GetMetrics().GetCpuPercent() != float64(total/3*3) {
		t.Fatalf("resync snapshot hosts = %v, want host a with the latest metrics", snap.Hosts)
	}
	// After its resync the watcher is live again.
	th.Publish(outputEvent(total + 1))
	if evs := drain(t, th.Hub, stuck); len(evs) != 1 || evs[0].GetCommandOutput() == nil {
		t.Fatalf("after resync got %v", evs)
	}
	if stuck.Resyncs != 1 {
		t.Fatalf("stuck watcher resynced %d times, want 1", stuck.Resyncs)
	}
}

func waitFor(t testing.TB, d time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestNextWaitsAndEndsWithContext(t *testing.T) {
	th := newTestHub(t, 0, "a")
	w, _ := th.Subscribe(WatchOptions{})
	got := make(chan []*fleetv1.FleetEvent, 1)
	go func() {
		b, _ := th.Next(context.Background(), w)
		got <- b
	}()
	th.Publish(outputEvent(1))
	select {
	case b := <-got:
		if len(b) != 1 || b[0].GetCommandOutput() == nil {
			t.Fatalf("Next returned %v", b)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Next did not wake up on Publish")
	}

	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { _, err := th.Next(ctx, w); errc <- err }()
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Next after cancel = %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Next did not end with its context")
	}
}

func TestUnsubscribe(t *testing.T) {
	th := newTestHub(t, 0, "a")
	w1, _ := th.Subscribe(WatchOptions{})
	w2, _ := th.Subscribe(WatchOptions{SkipOutput: true})
	if n := th.WatcherCount(); n != 2 {
		t.Fatalf("WatcherCount = %d, want 2", n)
	}
	th.Unsubscribe(w1)
	th.Unsubscribe(w1) // twice is harmless
	if n := th.WatcherCount(); n != 1 {
		t.Fatalf("WatcherCount after unsubscribe = %d, want 1", n)
	}
	th.Publish(outputEvent(1))
	th.RemoveHost("a")
	if evs := drain(t, th.Hub, w1); len(evs) != 0 {
		t.Fatalf("unsubscribed watcher got %v", evs)
	}
	evs := drain(t, th.Hub, w2)
	if len(evs) != 1 || evs[0].GetHostRemoved().GetHostId() != "a" {
		t.Fatalf("SkipOutput watcher got %v, want only HostRemoved", evs)
	}
	th.Unsubscribe(w2)
	if n := th.WatcherCount(); n != 0 {
		t.Fatalf("WatcherCount = %d, want 0", n)
	}
}

func TestSweepClosesSilentHosts(t *testing.T) {
	th := newTestHub(t, 0, "quiet", "chatty", "slow")
	quiet := th.connect(t, "quiet", 5*time.Second)
	chatty := th.connect(t, "chatty", 5*time.Second)
	slow := th.connect(t, "slow", time.Minute)
	w, _ := th.Subscribe(WatchOptions{SkipHeartbeats: true})

	for range 14 {
		th.clock.Advance(time.Second)
		th.Heartbeat(chatty.conn, hb(1))
		th.Sweep()
	}
	for _, s := range []session{quiet, chatty, slow} {
		if s.ctx.Err() != nil {
			t.Fatalf("%s closed before three intervals passed: %v", s.conn.HostID, context.Cause(s.ctx))
		}
	}
	th.clock.Advance(2 * time.Second) // quiet: 16s > 3×5s
	th.Heartbeat(chatty.conn, hb(1))
	th.Sweep()
	if !errors.Is(context.Cause(quiet.ctx), ErrHeartbeatTimeout) {
		t.Fatalf("quiet host's session cause = %v, want ErrHeartbeatTimeout", context.Cause(quiet.ctx))
	}
	if chatty.ctx.Err() != nil || slow.ctx.Err() != nil {
		t.Fatal("a host that is not silent was closed")
	}
	// The session's end marks it offline for everyone.
	th.Disconnect(quiet.conn, "heartbeat timeout")
	if h, _ := th.Host("quiet"); h.Online {
		t.Fatal("quiet host still online after its session ended")
	}
	evs := drain(t, th.Hub, w)
	if len(evs) != 1 || evs[0].GetHostOffline().GetHostId() != "quiet" || evs[0].GetHostOffline().Reason != "heartbeat timeout" {
		t.Fatalf("watcher got %v, want HostOffline for quiet", evs)
	}

	th.clock.Advance(3 * time.Minute)
	th.Sweep()
	if !errors.Is(context.Cause(slow.ctx), ErrHeartbeatTimeout) {
		t.Fatalf("slow host not closed after 3 of its intervals: %v", context.Cause(slow.ctx))
	}
}

func TestReplacedConnection(t *testing.T) {
	th := newTestHub(t, 0, "a")
	old := th.connect(t, "a", 0)
	w, _ := th.Subscribe(WatchOptions{})
	cur := th.connect(t, "a", 0)
	if !errors.Is(context.Cause(old.ctx), ErrReplaced) {
		t.Fatalf("old session cause = %v, want ErrReplaced", context.Cause(old.ctx))
	}
	if th.IsCurrent(old.conn) || !th.IsCurrent(cur.conn) || th.Conn("a") != cur.conn {
		t.Fatal("the newer connection is not the current one")
	}
	drain(t, th.Hub, w)
	// The old session's late heartbeat and its end change nothing.
	if rec := th.Heartbeat(old.conn, &agentv1.Heartbeat{Generation: "ccccccc1", LockHash: "22"}); rec != nil {
		t.Fatal("heartbeat of a replaced session changed the record")
	}
	th.Disconnect(old.conn, "stream closed")
	if evs := drain(t, th.Hub, w); len(evs) != 0 {
		t.Fatalf("replaced session published %v", evs)
	}
	if h, _ := th.Host("a"); !h.Online || h.Generation != "aaaaaaa1" {
		t.Fatalf("host after the old session ended = online %v gen %s", h.Online, h.Generation)
	}
	th.Disconnect(cur.conn, "stream closed")
	if h, _ := th.Host("a"); h.Online {
		t.Fatal("host online after its current session ended")
	}
}

func TestConnectUnknownHost(t *testing.T) {
	th := newTestHub(t, 0)
	_, _, err := th.Connect("ghost", &agentv1.Hello{Hostname: "ghost"}, &recSender{}, func(error) {})
	if !errors.Is(err, ErrUnknownHost) {
		t.Fatalf("Connect unknown = %v, want ErrUnknownHost", err)
	}
}

func TestHostsStartOfflineAndKeepLastSeen(t *testing.T) {
	st := openStore(t)
	ctx := context.Background()
	seen := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	if err := st.CreateHost(ctx, store.Host{ID: "a", Record: &fleetv1.Host{HostId: "a", Hostname: "a", Generation: "abcdef1"}, CreatedAt: seen}, []byte("h")); err != nil {
		t.Fatal(err)
	}
	if err := st.SaveLastSeen(ctx, map[string]time.Time{"a": seen}); err != nil {
		t.Fatal(err)
	}
	h, err := New(ctx, Config{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	got, ok := h.Host("a")
	if !ok || got.Online || !got.LastSeen.AsTime().Equal(seen) || got.Generation != "abcdef1" || len(got.AvailableCommands) != 0 {
		t.Fatalf("host after start = %v", got)
	}
}

func TestFlushLastSeenBatches(t *testing.T) {
	th := newTestHub(t, 0, "a", "b", "c")
	ctx := context.Background()
	var conns []*Conn
	for _, id := range []string{"a", "b", "c"} {
		conns = append(conns, th.connect(t, id, 0).conn)
	}
	for range 20 {
		th.clock.Advance(time.Second)
		for _, c := range conns {
			th.Heartbeat(c, hb(1))
		}
	}
	if n := th.store.batchCount(); n != 0 {
		t.Fatalf("heartbeats wrote to the store %d times before a flush", n)
	}
	if err := th.FlushLastSeen(ctx); err != nil {
		t.Fatal(err)
	}
	if n := th.store.batchCount(); n != 1 {
		t.Fatalf("flush wrote %d batches, want 1", n)
	}
	if got := len(th.store.batches[0]); got != 3 {
		t.Fatalf("batch has %d hosts, want 3", got)
	}
	stored, err := th.store.ListHosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range stored {
		if !h.LastSeen.Equal(th.clock.Now()) {
			t.Errorf("stored last seen of %s = %v, want %v", h.ID, h.LastSeen, th.clock.Now())
		}
	}
	// Nothing changed: no write.
	if err := th.FlushLastSeen(ctx); err != nil || th.store.batchCount() != 1 {
		t.Fatalf("idle flush: err %v, batches %d", err, th.store.batchCount())
	}
	// A failed flush keeps the times dirty for the next one.
	th.clock.Advance(time.Second)
	th.Heartbeat(conns[1], hb(1))
	th.store.mu.Lock()
	th.store.fail = errors.New("disk full")
	th.store.mu.Unlock()
	if err := th.FlushLastSeen(ctx); err == nil {
		t.Fatal("flush with a failing store returned nil")
	}
	th.store.mu.Lock()
	th.store.fail = nil
	th.store.mu.Unlock()
	if err := th.FlushLastSeen(ctx); err != nil {
		t.Fatal(err)
	}
	if n := th.store.batchCount(); n != 2 {
		t.Fatalf("after retry %d batches, want 2", n)
	}
	if b := th.store.batches[1]; len(b) != 1 || !b["b"].Equal(th.clock.Now()) {
		t.Fatalf("retried batch = %v, want only b at %v", b, th.clock.Now())
	}
}

func TestCommandChangedTracksRunning(t *testing.T) {
	th := newTestHub(t, 0, "a")
	th.connect(t, "a", 0)
	w, _ := th.Subscribe(WatchOptions{})
	c := &fleetv1.Command{CommandId: "cmd-1", HostId: "a", Command: "switch", State: typesv1.CommandState_COMMAND_STATE_QUEUED}
	th.CommandChanged(c)
	if r := th.Running("a"); r.GetCommandId() != "cmd-1" {
		t.Fatalf("Running = %v", r)
	}
	h, _ := th.Host("a")
	if h.UpdateStatus.System.Status != typesv1.CompartmentStatus_COMPARTMENT_STATUS_WORKING || len(h.AvailableCommands) != 0 {
		t.Fatalf("host while a switch runs: system %v, available %v", h.UpdateStatus.System, h.AvailableCommands)
	}
	if got := th.Snapshot().ActiveCommands; len(got) != 1 {
		t.Fatalf("snapshot active commands = %v", got)
	}
	kindsOf := func(evs []*fleetv1.FleetEvent) string {
		var kinds []string
		for _, ev := range evs {
			kinds = append(kinds, fmt.Sprintf("%T", ev.Kind))
		}
		return fmt.Sprint(kinds)
	}
	if got, want := kindsOf(drain(t, th.Hub, w)), "[*fleetv1.FleetEvent_CommandQueued *fleetv1.FleetEvent_HostStatusChanged]"; got != want {
		t.Fatalf("events %v, want %v", got, want)
	}
	done := proto.Clone(c).(*fleetv1.Command)
	done.State = typesv1.CommandState_COMMAND_STATE_SUCCEEDED
	th.CommandChanged(done)
	if th.Running("a") != nil || len(th.ActiveCommands()) != 0 {
		t.Fatal("command still active after it ended")
	}
	if got, want := kindsOf(drain(t, th.Hub, w)), "[*fleetv1.FleetEvent_CommandComplete *fleetv1.FleetEvent_HostStatusChanged]"; got != want {
		t.Fatalf("events %v, want %v", got, want)
	}

	// A watcher that did not read in between gets every command event in
	// order, and the host's latest status once, after them.
	th.CommandChanged(c)
	th.CommandChanged(done)
	if got, want := kindsOf(drain(t, th.Hub, w)), "[*fleetv1.FleetEvent_CommandQueued *fleetv1.FleetEvent_CommandComplete *fleetv1.FleetEvent_HostStatusChanged]"; got != want {
		t.Fatalf("backlog %v, want %v", got, want)
	}
}

// Benchmarks: numbers for the design, never asserted.

func benchHub(b *testing.B, watchers int) (*testHub, *Conn, func()) {
	th := newTestHub(b, 0, "a")
	c := th.connect(b, "a", 0).conn
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range watchers {
		w, _ := th.Subscribe(WatchOptions{})
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				if _, err := th.Next(ctx, w); err != nil {
					return
				}
			}
		}()
	}
	return th, c, func() { cancel(); wg.Wait() }
}

func BenchmarkHeartbeat(b *testing.B) {
	for _, n := range []int{0, 10} {
		b.Run(fmt.Sprintf("watchers=%d", n), func(b *testing.B) {
			th, c, stop := benchHub(b, n)
			defer stop()
			m := hb(1)
			b.ReportAllocs()
			for b.Loop() {
				th.Heartbeat(c, m)
			}
		})
	}
}

func BenchmarkFanout(b *testing.B) {
	for _, n := range []int{10, 100} {
		b.Run(fmt.Sprintf("watchers=%d", n), func(b *testing.B) {
			th, _, stop := benchHub(b, n)
			defer stop()
			ev := outputEvent(1)
			b.ReportAllocs()
			for b.Loop() {
				th.Publish(ev)
			}
		})
	}
}

func BenchmarkSnapshot(b *testing.B) {
	for _, n := range []int{1000, 20000} {
		b.Run(fmt.Sprintf("hosts=%d", n), func(b *testing.B) {
			th := newTestHub(b, 0)
			for i := range n {
				id := fmt.Sprintf("host-%05d", i)
				th.AddHost(&fleetv1.Host{HostId: id, Hostname: id, AgentVersion: "1.0.0", Generation: "abcdef1", LockHash: "11"}, time.Now())
			}
			b.ReportAllocs()
			for b.Loop() {
				if s := th.Snapshot(); len(s.Hosts) != n {
					b.Fatalf("snapshot has %d hosts", len(s.Hosts))
				}
			}
		})
	}
}

// TestMeasuredSystemSurvivesACommand: while a switch runs the System
// compartment shows working; afterwards the last measurement is back.
func TestMeasuredSystemSurvivesACommand(t *testing.T) {
	th := newTestHub(t, 0, "a")
	th.connect(t, "a", 0)
	measured := &typesv1.Compartment{Status: typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK, Message: "running system is current"}
	if _, err := th.UpdateRecord("a", func(h *fleetv1.Host) { h.UpdateStatus = &typesv1.UpdateStatus{System: measured} }); err != nil {
		t.Fatal(err)
	}
	c := &fleetv1.Command{CommandId: "cmd-1", HostId: "a", Command: "switch", State: typesv1.CommandState_COMMAND_STATE_RUNNING}
	th.CommandChanged(c)
	if h, _ := th.Host("a"); h.UpdateStatus.System.Status != typesv1.CompartmentStatus_COMPARTMENT_STATUS_WORKING {
		t.Fatalf("system while switching = %v", h.UpdateStatus.System)
	}
	// A record change during the run (e.g. a heartbeat's new generation)
	// must not lose the measurement either.
	th.Heartbeat(th.Conn("a"), &agentv1.Heartbeat{Generation: "ccccccc1", LockHash: "11"})
	done := proto.Clone(c).(*fleetv1.Command)
	done.State = typesv1.CommandState_COMMAND_STATE_FAILED
	th.CommandChanged(done)
	h, _ := th.Host("a")
	if !proto.Equal(h.UpdateStatus.System, measured) {
		t.Fatalf("system after the command = %v, want the measurement %v", h.UpdateStatus.System, measured)
	}
}

// TestPendingPRChangesLockMessage: a new or merged PR recomputes every
// host's Lock compartment.
func TestPendingPRChangesLockMessage(t *testing.T) {
	th := newTestHub(t, 0, "a", "b")
	th.SetTarget(&fleetv1.FleetTarget{GitCommit: "aaaaaaa1", LockHash: "11", FetchedAt: timestamppb.New(th.clock.Now())})
	th.SetPendingPR(&fleetv1.PendingPR{Number: 7, Title: "update flake"}, true)
	for _, id := range []string{"a", "b"} {
		if h, _ := th.Host(id); !strings.Contains(h.UpdateStatus.Lock.Message, "PR #7") {
			t.Fatalf("%s lock = %q, want the pending PR named", id, h.UpdateStatus.Lock.Message)
		}
	}
	th.SetPendingPR(nil, true)
	if h, _ := th.Host("a"); strings.Contains(h.UpdateStatus.Lock.Message, "PR #") {
		t.Fatalf("lock after the PR went = %q", h.UpdateStatus.Lock.Message)
	}
}

// TestRepoURLCredentialsAreHidden: an agent cloning with a token in its
// repository URL does not show that token to every reader of the host.
func TestRepoURLCredentialsAreHidden(t *testing.T) {
	th := newTestHub(t, 0, "a")
	_, rec, err := th.Connect("a", &agentv1.Hello{Hostname: "a", RepoUrl: "https://oauth2:ghp_s3cret@github.com/acme/fleet.git"}, &recSender{}, func(error) {})
	if err != nil {
		t.Fatal(err)
	}
	h, _ := th.Host("a")
	for _, got := range []string{rec.GetRepoUrl(), h.RepoUrl} {
		if strings.Contains(got, "s3cret") || !strings.Contains(got, "github.com/acme/fleet.git") {
			t.Fatalf("repo URL = %q, want it without the token", got)
		}
	}
}

// TestPullRequestHealth: a failing PR poll is told to watchers once per
// distinct error and kept in snapshots; a success clears it.
func TestPullRequestHealth(t *testing.T) {
	th := newTestHub(t, 0, "a")
	th.SetPendingPR(&fleetv1.PendingPR{Number: 3, Title: "update flake"}, true)
	w, _ := th.Subscribe(WatchOptions{})
	ok := th.clock.Now()
	th.SetPullRequestHealth("GET …/pulls: 401 Bad credentials\x00", ok)
	th.SetPullRequestHealth("GET …/pulls: 401 Bad credentials\x00", ok) // same error: no event
	th.SetPullRequestHealth("", ok.Add(time.Minute))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var prEvents []*fleetv1.PendingPRChanged
	for len(prEvents) < 2 {
		b, err := th.Next(ctx, w)
		if err != nil {
			t.Fatalf("after %d PR events: %v", len(prEvents), err)
		}
		for _, ev := range b {
			if p := ev.GetPendingPrChanged(); p != nil {
				prEvents = append(prEvents, p)
			}
		}
	}
	if e := prEvents[0]; !strings.Contains(e.PullRequestsError, "401") || strings.ContainsRune(e.PullRequestsError, 0) ||
		e.PendingPr.GetNumber() != 3 || !e.PullRequestsCheckedAt.AsTime().Equal(ok) {
		t.Fatalf("first PR event = %v, want the error with the kept PR", e)
	}
	if e := prEvents[1]; e.PullRequestsError != "" || e.PendingPr.GetNumber() != 3 {
		t.Fatalf("second PR event = %v, want the error cleared", e)
	}
	th.SetPullRequestHealth("timeout", ok.Add(time.Minute))
	if snap := th.Snapshot(); snap.PullRequestsError != "timeout" || !snap.PullRequestsCheckedAt.AsTime().Equal(ok.Add(time.Minute)) {
		t.Fatalf("snapshot PR health = %q %v", snap.PullRequestsError, snap.PullRequestsCheckedAt)
	}
}

// TestUnchangedRecordPublishesNothing: an update that changes nothing sends
// no status event; the next real change does.
func TestUnchangedRecordPublishesNothing(t *testing.T) {
	th := newTestHub(t, 0, "a")
	w, _ := th.Subscribe(WatchOptions{})
	if _, err := th.UpdateRecord("a", func(h *fleetv1.Host) {}); err != nil {
		t.Fatal(err)
	}
	if _, err := th.UpdateRecord("a", func(h *fleetv1.Host) { h.Location = "office" }); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b, err := th.Next(ctx, w)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 1 || b[0].GetHostStatusChanged().GetHost().GetLocation() != "office" {
		t.Fatalf("events after a no-op and a real change = %v, want only the change", b)
	}
}

// TestAddHostKeepsALiveHost: adding a host the hub already knows (two
// sessions of a host registered offline racing) keeps its live session.
func TestAddHostKeepsALiveHost(t *testing.T) {
	th := newTestHub(t, 0, "a")
	th.connect(t, "a", 0)
	th.AddHost(&fleetv1.Host{HostId: "a", Hostname: "a"}, th.clock.Now())
	if h, _ := th.Host("a"); !h.Online {
		t.Fatal("adding a known host replaced its live session")
	}
	if th.Conn("a") == nil {
		t.Fatal("the live session is gone")
	}
}
