package hub

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/controlplane/status"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// page rebuilds the fleet the way the web page does (webui/src/events.ts):
// a status without metrics and an offline event leave the metrics shown as
// they were, and command events set or clear the running command. It also
// records every event that is not a host's replaceable state, in order.
type page struct {
	hosts  map[string]*fleetv1.Host
	others []string
}

func newPage(s *fleetv1.Snapshot) *page {
	p := &page{hosts: map[string]*fleetv1.Host{}}
	for _, h := range s.Hosts {
		p.hosts[h.HostId] = proto.Clone(h).(*fleetv1.Host)
	}
	return p
}

func (p *page) apply(t *testing.T, evs []*fleetv1.FleetEvent) {
	t.Helper()
	for _, ev := range evs {
		switch k := ev.Kind.(type) {
		case *fleetv1.FleetEvent_Snapshot:
			t.Fatal("a lagging watcher was resynced")
		case *fleetv1.FleetEvent_HostHeartbeat:
			if h := p.hosts[k.HostHeartbeat.HostId]; h != nil {
				h.Online, h.LastSeen = true, k.HostHeartbeat.LastSeen
				if k.HostHeartbeat.Metrics != nil {
					h.Metrics = k.HostHeartbeat.Metrics
				}
			}
		case *fleetv1.FleetEvent_HostOffline:
			if h := p.hosts[k.HostOffline.HostId]; h != nil {
				h.Online, h.RunningCommand = false, nil
				if k.HostOffline.LastSeen != nil {
					h.LastSeen = k.HostOffline.LastSeen
				}
			}
		case *fleetv1.FleetEvent_HostStatusChanged:
			n := proto.Clone(k.HostStatusChanged.Host).(*fleetv1.Host)
			if old := p.hosts[n.HostId]; old != nil && n.Metrics == nil {
				n.Metrics = old.Metrics
			}
			p.hosts[n.HostId] = n
		case *fleetv1.FleetEvent_HostRegistered:
			p.others = append(p.others, fmt.Sprint(ev))
			p.hosts[k.HostRegistered.Host.HostId] = proto.Clone(k.HostRegistered.Host).(*fleetv1.Host)
		case *fleetv1.FleetEvent_HostRemoved:
			p.others = append(p.others, fmt.Sprint(ev))
			delete(p.hosts, k.HostRemoved.HostId)
		default:
			p.others = append(p.others, fmt.Sprint(ev))
		}
		p.command(ev)
	}
}

// command applies the page's running-command rules.
func (p *page) command(ev *fleetv1.FleetEvent) {
	var c *fleetv1.Command
	queued := false
	switch k := ev.Kind.(type) {
	case *fleetv1.FleetEvent_CommandQueued:
		c, queued = k.CommandQueued.Command, true
	case *fleetv1.FleetEvent_CommandUpdated:
		c = k.CommandUpdated.Command
	case *fleetv1.FleetEvent_CommandComplete:
		if h := p.hosts[k.CommandComplete.Command.HostId]; h != nil {
			if h.RunningCommand == nil || h.RunningCommand.CommandId == k.CommandComplete.Command.CommandId {
				h.RunningCommand = nil
			}
		}
		return
	default:
		return
	}
	h := p.hosts[c.HostId]
	if h == nil {
		return
	}
	cur := h.RunningCommand
	if status.IsTerminal(c.State) {
		if cur != nil && cur.CommandId == c.CommandId {
			h.RunningCommand = nil
		}
	} else if cur == nil || cur.CommandId == c.CommandId || queued {
		h.RunningCommand = c
	}
}

func (p *page) equal(t *testing.T, q *page, what string) {
	t.Helper()
	if len(p.hosts) != len(q.hosts) {
		t.Fatalf("%s: %d hosts against %d", what, len(p.hosts), len(q.hosts))
	}
	for id, h := range p.hosts {
		if o := q.hosts[id]; o == nil || !proto.Equal(withoutCheckedAt(h), withoutCheckedAt(o)) {
			t.Fatalf("%s: host %s differs:\n got %v\nwant %v", what, id, o, h)
		}
	}
	if fmt.Sprint(p.others) != fmt.Sprint(q.others) {
		t.Fatalf("%s: other events differ:\n got %v\nwant %v", what, q.others, p.others)
	}
}

// TestLaggingWatcherSeesTheSameFleet runs random operations on a few hosts.
// One watcher reads after every operation; another reads rarely, so its
// backlog is collapsed latest-value-wins. Both must rebuild the same page,
// see every command and host event in the same order, and the lagging one's
// snapshot-plus-events must equal the hub's state.
func TestLaggingWatcherSeesTheSameFleet(t *testing.T) {
	for seed := range uint64(30) {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			ids := []string{"web-1", "web-2", "db-1", "db-2"}
			// A tiny queue limit: the collapsed backlog must stay under it.
			th := newTunedHub(t, Config{QueueLimit: 400, FlushInterval: -1}, ids...)
			rng := rand.New(rand.NewPCG(seed, 11))
			sessions := map[string]*Conn{}
			exists := map[string]bool{}
			for _, id := range ids {
				exists[id] = true
			}
			eager, snap := th.Subscribe(WatchOptions{})
			lagging, snap2 := th.Subscribe(WatchOptions{})
			ref, lag, m := newPage(snap), newPage(snap2), model{}.fromSnapshot(snap2)
			cmdSeq := 0
			for step := range 600 {
				th.clock.Advance(time.Duration(rng.IntN(1500)) * time.Millisecond)
				id := ids[rng.IntN(len(ids))]
				c := sessions[id]
				switch op := rng.IntN(20); {
				case !exists[id]:
					th.AddHost(&fleetv1.Host{HostId: id, Hostname: id}, th.clock.Now())
					exists[id] = true
				case op == 0:
					th.RemoveHost(id)
					delete(exists, id)
					delete(sessions, id)
				case c == nil && op < 10:
					sessions[id] = th.connect(t, id, 0).conn
				case c == nil:
					if _, err := th.UpdateRecord(id, func(h *fleetv1.Host) { h.Location = fmt.Sprint("rack-", step) }); err != nil {
						t.Fatal(err)
					}
				case op < 11:
					gen := "aaaaaaa1"
					if rng.IntN(5) == 0 {
						gen = fmt.Sprintf("bbbbbb%02x", step%256)
					}
					th.Heartbeat(c, &agentv1.Heartbeat{Metrics: metrics(float64(step)), Generation: gen, LockHash: "11"})
				case op < 13:
					th.Disconnect(c, "stream closed")
					delete(sessions, id)
				case op < 16:
					cmdSeq++
					cmd := &fleetv1.Command{CommandId: fmt.Sprint("cmd-", cmdSeq), HostId: id, Command: "pull", State: typesv1.CommandState_COMMAND_STATE_RUNNING}
					if r := th.Running(id); r != nil {
						cmd = proto.Clone(r).(*fleetv1.Command)
						cmd.State = typesv1.CommandState_COMMAND_STATE_SUCCEEDED
					}
					th.CommandChanged(cmd)
				case op < 17:
					th.SetTarget(&fleetv1.FleetTarget{GitCommit: fmt.Sprintf("bbbbbb%02x", rng.IntN(256)), LockHash: "11", FetchedAt: timestamppb.New(th.clock.Now())})
				case op < 18:
					th.Publish(&fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_CommandOutput{CommandOutput: &fleetv1.CommandOutput{
						CommandId: "cmd-x", HostId: id, Lines: []*typesv1.OutputLine{{Seq: uint64(step), Text: "line"}}}}})
				default:
					if _, err := th.UpdateRecord(id, func(h *fleetv1.Host) { h.ThemeColor = fmt.Sprintf("#%06x", step) }); err != nil {
						t.Fatal(err)
					}
				}
				ref.apply(t, drain(t, th.Hub, eager))
				if rng.IntN(60) == 0 {
					evs := drain(t, th.Hub, lagging)
					lag.apply(t, evs)
					m.apply(t, evs)
					ref.equal(t, lag, fmt.Sprint("step ", step))
					assertMatches(t, m, th.Hosts())
				}
			}
			evs := drain(t, th.Hub, lagging)
			lag.apply(t, evs)
			m.apply(t, evs)
			ref.equal(t, lag, "end")
			assertMatches(t, m, th.Hosts())
			if lagging.Resyncs != 0 {
				t.Fatalf("lagging watcher resynced %d times", lagging.Resyncs)
			}
		})
	}
}

// TestStalledWatcherOfALargeFleetIsNotResynced: while one watcher reads
// nothing, every host of a 20,000-host fleet heartbeats twice, reconnects
// and heartbeats again. Its backlog stays a few events per host, it is not
// resynced, and what it then reads rebuilds the fleet exactly.
func TestStalledWatcherOfALargeFleetIsNotResynced(t *testing.T) {
	const n = 20000
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("host-%05d", i)
	}
	th := newTestHub(t, 0, ids...)
	conns := make([]*Conn, n)
	for i, id := range ids {
		conns[i] = th.connect(t, id, 0).conn
	}
	w, snap := th.Subscribe(WatchOptions{})
	m := model{}.fromSnapshot(snap)
	for round := range 2 {
		for i := range ids {
			th.Heartbeat(conns[i], hb(float64(round*n+i)))
		}
	}
	for i, id := range ids {
		th.Disconnect(conns[i], "stream closed")
		conns[i] = th.connect(t, id, 0).conn
		th.Heartbeat(conns[i], hb(float64(i)))
	}
	th.mu.Lock()
	live, resyncs := w.live, w.Resyncs
	th.mu.Unlock()
	if resyncs != 0 {
		t.Fatalf("stalled watcher resynced %d times", resyncs)
	}
	// Per host: the heartbeat before the offline, the status after the
	// reconnect and the heartbeat after it.
	if live > 3*n {
		t.Fatalf("backlog of %d events for %d hosts", live, n)
	}
	m.apply(t, drain(t, th.Hub, w))
	assertMatches(t, m, th.Hosts())
}

// TestBacklogIsCompacted: a host whose state changes thousands of times
// while a watcher stalls leaves no trail of replaced entries behind, and the
// events between those changes keep their order.
func TestBacklogIsCompacted(t *testing.T) {
	th := newTestHub(t, 0, "a", "b")
	a := th.connect(t, "a", 0).conn
	th.connect(t, "b", 0)
	w, snap := th.Subscribe(WatchOptions{})
	m := model{}.fromSnapshot(snap)
	seq := uint64(0)
	for i := range 5000 {
		th.clock.Advance(time.Second)
		th.Heartbeat(a, hb(float64(i)))
		if _, err := th.UpdateRecord("a", func(h *fleetv1.Host) { h.ThemeColor = fmt.Sprintf("#%06x", i) }); err != nil {
			t.Fatal(err)
		}
		if _, err := th.UpdateRecord("b", func(h *fleetv1.Host) { h.Location = fmt.Sprint("rack-", i) }); err != nil {
			t.Fatal(err)
		}
		if i%100 == 0 {
			seq++
			th.Publish(outputEvent(seq))
		}
	}
	th.Heartbeat(a, hb(-1))
	th.mu.Lock()
	size, live := len(w.queue), w.live
	th.mu.Unlock()
	if size > 3000 || live != int(seq)+3 {
		t.Fatalf("queue holds %d entries, %d live; want few, %d live", size, live, seq+3)
	}
	evs := drain(t, th.Hub, w)
	var next uint64 = 1
	for _, ev := range evs {
		if o := ev.GetCommandOutput(); o != nil {
			if got := o.Lines[0].Seq; got != next {
				t.Fatalf("output seq %d arrived, want %d", got, next)
			}
			next++
		}
	}
	if next != seq+1 {
		t.Fatalf("%d output events arrived, want %d", next-1, seq)
	}
	m.apply(t, evs)
	assertMatches(t, m, th.Hosts())
	if m["a"].GetMetrics().GetCpuPercent() != -1 {
		t.Fatalf("host a metrics %v, want the last heartbeat's", m["a"].GetMetrics())
	}
}
