// Package hub is the fleet's live registry and event fan-out.
//
// Live state — online, last seen, metrics, running command — lives here in
// memory; a heartbeat touches only this and costs no disk write (last-seen is
// written in batches). Every change is published as a typed
// [fleetv1.FleetEvent] to the watchers, in order, under one lock, so a
// watcher's snapshot plus the events after it is always the current state.
//
// A watcher never blocks the publisher: each has a queue in which a host's
// newer state (heartbeat, status, offline) replaces its unsent older state,
// so a stalled watcher holds a few events per host at most, and the other
// events — commands and their output above all — keep their order up to
// [Config.QueueLimit]. A watcher whose queue overflows anyway is marked for
// resync and gets a fresh snapshot instead of the events it missed. Command
// output is stored before it is published, so a resynced watcher can fetch
// what it missed. A watcher's events are gathered for a moment
// ([Config.FlushInterval]) so each stream write carries many of them.
package hub

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/controlplane/status"
	"github.com/nixplane/nixplane/controlplane/store"
	"github.com/nixplane/nixplane/controlplane/validate"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// Errors a session may end with; they are its context's cause.
var (
	// ErrReplaced: a newer connection for the same host took over.
	ErrReplaced = errors.New("replaced by a newer connection for this host")
	// ErrHeartbeatTimeout: no heartbeat within three intervals.
	ErrHeartbeatTimeout = errors.New("no heartbeat within three intervals")
	// ErrRemoved: the host was removed or its token revoked.
	ErrRemoved = errors.New("host removed or its token revoked")
	// ErrUnknownHost: no such host.
	ErrUnknownHost = errors.New("unknown host")
	// ErrShutdown: the server is stopping.
	ErrShutdown = errors.New("server shutting down")
)

// Sender sends a message down an agent's stream. Implementations must be
// safe for concurrent use.
type Sender interface {
	Send(*agentv1.ConnectResponse) error
}

// Conn is one agent session registered with the hub.
type Conn struct {
	HostID string
	sender Sender
	cancel context.CancelCauseFunc
	seq    uint64
	// changed: the hello changed a durable field of the host's record.
	changed bool
}

// RecordChanged reports whether the session's hello changed a durable field
// of the host's record (versions, generation, lock hash, repository,
// location, …). When it did not, the stored record is current and a
// reconnecting fleet costs no disk write per agent.
func (c *Conn) RecordChanged() bool { return c.changed }

// Send sends a message down the session's stream.
func (c *Conn) Send(m *agentv1.ConnectResponse) error { return c.sender.Send(m) }

// Close ends the session with cause.
func (c *Conn) Close(cause error) { c.cancel(cause) }

type liveHost struct {
	// rec holds durable fields and update status; it is immutable once
	// stored here (copy on write), so snapshots may share it.
	rec      *fleetv1.Host
	online   bool
	lastSeen time.Time
	metrics  *typesv1.Metrics
	conn     *Conn
	interval time.Duration
	// running is the active command on this host, if any.
	running *fleetv1.Command
	// system is the agent's last measured system check. The record's System
	// compartment shows "working" while a command changes the system, so the
	// measurement is kept here to come back when the command ends.
	system    *typesv1.Compartment
	seenDirty bool
}

// Config configures a [Hub].
type Config struct {
	// ServerVersion is the agent version the server expects.
	ServerVersion string
	// Store persists host records and last-seen times.
	Store store.Hosts
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// QueueLimit bounds the events in each watcher's queue that are not a
	// host's replaceable state (commands, output, hosts added or removed,
	// target and PR changes): past it the watcher is resynced (default
	// 4096). Heartbeats, status and offline events do not count: they are
	// bounded by the number of hosts.
	QueueLimit int
	// FlushInterval is how long a watcher's first queued event may wait for
	// more to join it in one batch, so a busy fleet costs each watcher tens
	// of stream writes a second instead of one per event (default
	// [DefaultFlushInterval]; negative: no wait). It is the added latency.
	FlushInterval time.Duration
	// FlushEvents ends the wait early once this many events are queued
	// (default [DefaultFlushEvents]).
	FlushEvents int
	// DefaultInterval is assumed when an agent does not say (default 5s).
	DefaultInterval time.Duration
	Log             *slog.Logger
}

// Defaults of [Config.FlushInterval] and [Config.FlushEvents]: at 4,000
// heartbeats a second a watcher gets about 50 writes a second of about 80
// events each, and a heartbeat waits at most 20 ms for its batch.
const (
	DefaultFlushInterval = 20 * time.Millisecond
	DefaultFlushEvents   = 512
)

// Hub is the live registry. Create with [New].
type Hub struct {
	cfg Config
	log *slog.Logger

	mu       sync.Mutex
	hosts    map[string]*liveHost
	watchers map[*Watcher]struct{}
	commands map[string]*fleetv1.Command // active (not ended) commands
	// bulks holds the latest progress of each bulk run not yet ended, as
	// published in BulkProgress events, so a snapshot shows the runs too.
	bulks    map[string]*fleetv1.BulkCommand
	target   *fleetv1.FleetTarget
	pr       *fleetv1.PendingPR
	prConfig bool
	// prError and prChecked: the PR poll's last error ("" after a success)
	// and last success.
	prError   string
	prChecked time.Time
	connSeq   uint64
	// closed is set by CloseAll: the server is stopping, and Connect
	// refuses every new session from then on.
	closed bool
	// live counts hosts with a registered session; drained is closed once
	// the hub is closed and live is zero.
	live    int
	drained chan struct{}
}

// New returns a hub loaded with the stored hosts, all offline.
func New(ctx context.Context, cfg Config) (*Hub, error) {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.QueueLimit <= 0 {
		cfg.QueueLimit = 4096
	}
	if cfg.DefaultInterval <= 0 {
		cfg.DefaultInterval = 5 * time.Second
	}
	if cfg.FlushInterval == 0 {
		cfg.FlushInterval = DefaultFlushInterval
	}
	if cfg.FlushEvents <= 0 {
		cfg.FlushEvents = DefaultFlushEvents
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	h := &Hub{cfg: cfg, log: cfg.Log, hosts: map[string]*liveHost{}, watchers: map[*Watcher]struct{}{}, commands: map[string]*fleetv1.Command{},
		bulks: map[string]*fleetv1.BulkCommand{}, drained: make(chan struct{})}
	hosts, err := cfg.Store.ListHosts(ctx)
	if err != nil {
		return nil, err
	}
	for _, sh := range hosts {
		lh := &liveHost{rec: sh.Record, lastSeen: sh.LastSeen, interval: cfg.DefaultInterval}
		if lh.rec == nil {
			lh.rec = &fleetv1.Host{HostId: sh.ID, Hostname: sh.ID}
		}
		h.hosts[sh.ID] = lh
		h.recompute(lh)
	}
	return h, nil
}

func (h *Hub) now() time.Time { return h.cfg.Now() }

// recompute sets lh.rec to a new record with fresh compartments. Caller holds mu.
func (h *Hub) recompute(lh *liveHost) {
	in := lh.rec
	if s := in.GetUpdateStatus().GetSystem(); s.GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNSPECIFIED &&
		s.GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_WORKING {
		lh.system = s
	} else if lh.system != nil {
		in = proto.Clone(in).(*fleetv1.Host)
		if in.UpdateStatus == nil {
			in.UpdateStatus = &typesv1.UpdateStatus{}
		}
		in.UpdateStatus.System = lh.system
	}
	rec := proto.Clone(lh.rec).(*fleetv1.Host)
	rec.UpdateStatus = status.Compute(status.Inputs{Host: in, Target: h.target, PendingPR: h.pr, ServerVersion: h.cfg.ServerVersion, Running: lh.running, Now: h.now()})
	rec.AgentOutdated = rec.AgentVersion != "" && h.cfg.ServerVersion != "" && rec.AgentVersion != h.cfg.ServerVersion
	lh.rec = rec
}

// view returns a fresh Host message with durable and live fields. Caller
// holds mu; the result is not shared.
func (h *Hub) view(lh *liveHost) *fleetv1.Host { return refOf(lh).view() }

// availableCommands lists what would pass the pre-checks now.
func availableCommands(online bool, running *fleetv1.Command) []string {
	if !online || running != nil {
		return nil
	}
	return []string{"pull", "switch", "test", "pull-switch", "rollback", "restart", "reboot", "refresh"}
}

// publish queues ev for every watcher. Caller holds mu.
func (h *Hub) publish(ev *fleetv1.FleetEvent) {
	for w := range h.watchers {
		w.push(ev)
	}
}

// Publish sends an event to every watcher. A BulkProgress event also
// records the run's latest state for snapshots (see [Hub.ActiveBulks]), so
// its publisher must publish a run's states in order, the end last.
func (h *Hub) Publish(ev *fleetv1.FleetEvent) {
	h.mu.Lock()
	if bp, ok := ev.GetKind().(*fleetv1.FleetEvent_BulkProgress); ok {
		h.bulkProgressLocked(bp.BulkProgress.GetBulk())
	}
	h.publish(ev)
	h.mu.Unlock()
}

// bulkProgressLocked keeps a running bulk run's latest state and forgets
// one that ended. Caller holds mu.
func (h *Hub) bulkProgressLocked(b *fleetv1.BulkCommand) {
	if b.GetBulkId() == "" {
		return
	}
	if b.GetState() == fleetv1.BulkState_BULK_STATE_RUNNING {
		h.bulks[b.BulkId] = b
	} else {
		delete(h.bulks, b.BulkId)
	}
}

// ActiveBulks returns the bulk runs not yet ended, oldest first, as last
// published. The messages are shared: read them, do not change them.
func (h *Hub) ActiveBulks() []*fleetv1.BulkCommand {
	h.mu.Lock()
	out := h.activeBulksLocked()
	h.mu.Unlock()
	sortBulks(out)
	return out
}

// activeBulksLocked lists the running bulk runs. Caller holds mu.
func (h *Hub) activeBulksLocked() []*fleetv1.BulkCommand {
	out := make([]*fleetv1.BulkCommand, 0, len(h.bulks))
	for _, b := range h.bulks {
		out = append(out, b)
	}
	return out
}

// sortBulks orders bulk runs by start, then id.
func sortBulks(bs []*fleetv1.BulkCommand) {
	slices.SortFunc(bs, func(a, b *fleetv1.BulkCommand) int {
		if c := a.GetCreatedAt().AsTime().Compare(b.GetCreatedAt().AsTime()); c != 0 {
			return c
		}
		return strings.Compare(a.BulkId, b.BulkId)
	})
}

// statusChanged publishes lh's state. Caller holds mu.
func (h *Hub) statusChanged(lh *liveHost) {
	if len(h.watchers) == 0 {
		return
	}
	h.publish(&fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_HostStatusChanged{HostStatusChanged: &fleetv1.HostStatusChanged{Host: refOf(lh).sharedView()}}})
}

// AddHost registers a new host (already stored) and announces it.
func (h *Hub) AddHost(rec *fleetv1.Host, created time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.hosts[rec.HostId]; ok {
		// Already known (two sessions of a host added offline raced here):
		// never replace a live host and its session.
		return
	}
	lh := &liveHost{rec: rec, interval: h.cfg.DefaultInterval}
	h.hosts[rec.HostId] = lh
	h.recompute(lh)
	h.publish(&fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_HostRegistered{HostRegistered: &fleetv1.HostRegistered{Host: h.view(lh)}}})
}

// RemoveHost forgets a host, closes its session and announces the removal.
func (h *Hub) RemoveHost(id string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	lh, ok := h.hosts[id]
	if !ok {
		return
	}
	if lh.conn != nil {
		lh.conn.Close(ErrRemoved)
		h.sessionEnded()
	}
	delete(h.hosts, id)
	h.publish(&fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_HostRemoved{HostRemoved: &fleetv1.HostRemoved{HostId: id}}})
}

// Kick closes a host's live session, e.g. after its token was rotated.
func (h *Hub) Kick(id string, cause error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if lh, ok := h.hosts[id]; ok && lh.conn != nil {
		lh.conn.Close(cause)
	}
}

// Connect registers an agent session after its hello. An older session of
// the same host is closed with [ErrReplaced]. It returns the session and the
// host's updated durable record, which the caller persists. After
// [Hub.CloseAll] it refuses every session with [ErrShutdown], so agents that
// reconnect while the server stops are not welcomed again.
func (h *Hub) Connect(hostID string, hello *agentv1.Hello, sender Sender, cancel context.CancelCauseFunc) (*Conn, *fleetv1.Host, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, nil, ErrShutdown
	}
	lh, ok := h.hosts[hostID]
	if !ok {
		return nil, nil, ErrUnknownHost
	}
	if lh.conn != nil {
		lh.conn.Close(ErrReplaced)
	} else {
		h.live++
	}
	h.connSeq++
	c := &Conn{HostID: hostID, sender: sender, cancel: cancel, seq: h.connSeq}
	lh.conn = c
	lh.online = true
	lh.lastSeen = h.now()
	lh.seenDirty = true
	lh.interval = h.cfg.DefaultInterval
	if d := hello.GetHeartbeatInterval().AsDuration(); d > 0 {
		lh.interval = min(max(d, time.Second), 10*time.Minute)
	}
	rec := proto.Clone(lh.rec).(*fleetv1.Host)
	applyHello(rec, hello, lh.rec)
	// Before recompute, rec differs from the record only by the hello.
	c.changed = !proto.Equal(lh.rec, rec)
	lh.rec = rec
	h.recompute(lh)
	h.statusChanged(lh)
	return c, lh.rec, nil
}

// applyHello copies what the hello says into rec; prev is the record before.
// The agent's binary identity is left alone: the command manager records it
// after comparing it with the identity recorded before (agent freshness).
func applyHello(rec *fleetv1.Host, hl *agentv1.Hello, prev *fleetv1.Host) {
	rec.HostType = hl.HostType
	rec.AgentVersion = hl.AgentVersion
	rec.OsVersion = hl.OsVersion
	rec.NixpkgsVersion = hl.NixpkgsVersion
	rec.Generation = hl.Generation
	rec.GenerationMessage = hl.GenerationMessage
	rec.LockHash = hl.LockHash
	rec.RepoUrl = validate.RedactURL(hl.RepoUrl) // shown to every reader
	if hl.Location != "" {
		rec.Location = hl.Location
	}
	if hl.DeviceType != "" {
		rec.DeviceType = hl.DeviceType
	}
	if hl.ThemeColor != "" {
		rec.ThemeColor = hl.ThemeColor
	}
	rec.HeartbeatInterval = hl.HeartbeatInterval
}

// Disconnect marks a host offline when c is still its current session, and
// tells every watcher at once.
func (h *Hub) Disconnect(c *Conn, reason string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	lh, ok := h.hosts[c.HostID]
	if !ok || lh.conn != c {
		return
	}
	lh.conn = nil
	lh.online = false
	lh.metrics = nil
	lh.seenDirty = true
	h.sessionEnded()
	ev := &fleetv1.HostOffline{HostId: c.HostID, Reason: reason}
	if !lh.lastSeen.IsZero() {
		ev.LastSeen = timestamppb.New(lh.lastSeen)
	}
	h.publish(&fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_HostOffline{HostOffline: ev}})
}

// Heartbeat records an agent's heartbeat: live fields in memory, a
// HostHeartbeat to watchers, and — only when generation or lock hash moved —
// a status change. It returns the new record when durable fields changed
// (the caller persists it), else nil.
func (h *Hub) Heartbeat(c *Conn, hb *agentv1.Heartbeat) *fleetv1.Host {
	now := h.now()
	h.mu.Lock()
	defer h.mu.Unlock()
	lh, ok := h.hosts[c.HostID]
	if !ok || lh.conn != c {
		return nil
	}
	lh.lastSeen = now
	lh.seenDirty = true
	lh.metrics = hb.Metrics
	if len(h.watchers) > 0 { // no page open: no event to build
		h.publish(&fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_HostHeartbeat{HostHeartbeat: &fleetv1.HostHeartbeat{
			HostId: c.HostID, LastSeen: timestamppb.New(now), Metrics: hb.Metrics, RunningCommandId: hb.RunningCommandId, SentAt: hb.SentAt,
		}}})
	}
	if (hb.Generation != "" && hb.Generation != lh.rec.Generation) || hb.LockHash != lh.rec.LockHash {
		rec := proto.Clone(lh.rec).(*fleetv1.Host)
		if hb.Generation != "" && hb.Generation != rec.Generation {
			rec.Generation = hb.Generation
			rec.GenerationMessage = ""
		}
		rec.LockHash = hb.LockHash
		lh.rec = rec
		h.recompute(lh)
		h.statusChanged(lh)
		return lh.rec
	}
	return nil
}

// UpdateRecord applies fn to a copy of a host's durable record, recomputes
// its compartments and publishes the change. It returns the new record, or
// ErrUnknownHost.
func (h *Hub) UpdateRecord(hostID string, fn func(*fleetv1.Host)) (*fleetv1.Host, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	lh, ok := h.hosts[hostID]
	if !ok {
		return nil, ErrUnknownHost
	}
	rec := proto.Clone(lh.rec).(*fleetv1.Host)
	fn(rec)
	if proto.Equal(rec, lh.rec) {
		// Nothing changed: no recompute, no event for every watcher.
		return lh.rec, nil
	}
	lh.rec = rec
	h.recompute(lh)
	h.statusChanged(lh)
	return lh.rec, nil
}

// Host returns a host's current view, or false.
func (h *Hub) Host(id string) (*fleetv1.Host, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	lh, ok := h.hosts[id]
	if !ok {
		return nil, false
	}
	return h.view(lh), true
}

// Hosts returns every host's view, sorted by id.
func (h *Hub) Hosts() []*fleetv1.Host {
	h.mu.Lock()
	refs := h.refsLocked()
	h.mu.Unlock()
	return refs.build()
}

// Conn returns a host's live session, or nil when offline.
func (h *Hub) Conn(id string) *Conn {
	h.mu.Lock()
	defer h.mu.Unlock()
	if lh, ok := h.hosts[id]; ok {
		return lh.conn
	}
	return nil
}

// IsCurrent reports whether c is still its host's session.
func (h *Hub) IsCurrent(c *Conn) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	lh, ok := h.hosts[c.HostID]
	return ok && lh.conn == c
}

// CommandChanged records a command's new state and publishes it: queued,
// updated, or complete when its state is terminal. The hub keeps active
// commands for snapshots and the host's running command.
func (h *Hub) CommandChanged(c *fleetv1.Command) {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, known := h.commands[c.CommandId]
	terminal := status.IsTerminal(c.State)
	var ev *fleetv1.FleetEvent
	switch {
	case terminal:
		delete(h.commands, c.CommandId)
		ev = &fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_CommandComplete{CommandComplete: &fleetv1.CommandComplete{Command: c}}}
	case !known:
		h.commands[c.CommandId] = c
		ev = &fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_CommandQueued{CommandQueued: &fleetv1.CommandQueued{Command: c}}}
	default:
		h.commands[c.CommandId] = c
		ev = &fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_CommandUpdated{CommandUpdated: &fleetv1.CommandUpdated{Command: c}}}
	}
	h.publish(ev)
	lh, ok := h.hosts[c.HostId]
	if !ok {
		return
	}
	wasRunning := lh.running != nil
	if terminal {
		if lh.running != nil && lh.running.CommandId == c.CommandId {
			lh.running = nil
		}
	} else if c.State != typesv1.CommandState_COMMAND_STATE_VALIDATING {
		lh.running = c
	}
	if wasRunning != (lh.running != nil) || (lh.running != nil && lh.running.CommandId == c.CommandId) {
		h.recompute(lh)
		h.statusChanged(lh)
	}
}

// Running returns the active command on a host, or nil.
func (h *Hub) Running(hostID string) *fleetv1.Command {
	h.mu.Lock()
	defer h.mu.Unlock()
	if lh, ok := h.hosts[hostID]; ok {
		return lh.running
	}
	return nil
}

// ActiveCommands returns the commands not yet ended.
func (h *Hub) ActiveCommands() []*fleetv1.Command {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]*fleetv1.Command, 0, len(h.commands))
	for _, c := range h.commands {
		out = append(out, c)
	}
	return out
}

// SetTarget installs a new fleet target, recomputes every host's
// compartments and publishes the changes.
func (h *Hub) SetTarget(t *fleetv1.FleetTarget) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if proto.Equal(h.target, t) {
		return
	}
	h.target = t
	h.publish(&fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_TargetChanged{TargetChanged: &fleetv1.TargetChanged{Target: t}}})
	h.recomputeAll()
}

// recomputeAll recomputes every host's compartments after a fleet-wide input
// changed and publishes the ones that moved. Caller holds mu.
func (h *Hub) recomputeAll() {
	for _, lh := range h.hosts {
		before := lh.rec.UpdateStatus
		h.recompute(lh)
		if !sameStatus(before, lh.rec.UpdateStatus) {
			h.statusChanged(lh)
		}
	}
}

// sameStatus compares compartments ignoring checked-at.
func sameStatus(a, b *typesv1.UpdateStatus) bool {
	eq := func(x, y *typesv1.Compartment) bool {
		return x.GetStatus() == y.GetStatus() && x.GetMessage() == y.GetMessage()
	}
	return eq(a.GetAgent(), b.GetAgent()) && eq(a.GetGit(), b.GetGit()) && eq(a.GetLock(), b.GetLock()) &&
		eq(a.GetSystem(), b.GetSystem()) && eq(a.GetTests(), b.GetTests())
}

// ServerVersion is the agent version the server expects.
func (h *Hub) ServerVersion() string { return h.cfg.ServerVersion }

// Target returns the fleet target, or nil.
func (h *Hub) Target() *fleetv1.FleetTarget {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.target
}

// SetPendingPR installs the pending PR (nil: none) and publishes a change.
func (h *Hub) SetPendingPR(pr *fleetv1.PendingPR, configured bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.prConfig = configured
	if proto.Equal(h.pr, pr) {
		return
	}
	h.pr = pr
	h.publishPRLocked()
	h.recomputeAll()
}

// SetPullRequestHealth records the outcome of the latest look for pull
// requests: errText is empty when it worked; lastSuccess is zero when none
// worked yet. Watchers hear of it when the error changes.
func (h *Hub) SetPullRequestHealth(errText string, lastSuccess time.Time) {
	errText = validate.Printable(errText, 300)
	h.mu.Lock()
	defer h.mu.Unlock()
	changed := errText != h.prError
	h.prError, h.prChecked = errText, lastSuccess
	if changed {
		h.publishPRLocked()
	}
}

// PullRequestHealth returns the PR poll's last error ("" when it worked)
// and last success (nil: none yet).
func (h *Hub) PullRequestHealth() (string, *timestamppb.Timestamp) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.prError, tsOrNil(h.prChecked)
}

// publishPRLocked tells watchers the PR state. Caller holds mu.
func (h *Hub) publishPRLocked() {
	h.publish(&fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_PendingPrChanged{PendingPrChanged: &fleetv1.PendingPRChanged{
		PendingPr: h.pr, PullRequestsError: h.prError, PullRequestsCheckedAt: tsOrNil(h.prChecked)}}})
}

// tsOrNil converts t, with the zero time as nil.
func tsOrNil(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

// PendingPR returns the pending PR (nil: none) and whether PRs are configured.
func (h *Hub) PendingPR() (*fleetv1.PendingPR, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.pr, h.prConfig
}

// Sweep marks offline every host whose last heartbeat is older than three
// of its intervals, by closing its session. Run it every second or so.
func (h *Hub) Sweep() {
	now := h.now()
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, lh := range h.hosts {
		if lh.conn != nil && now.Sub(lh.lastSeen) > 3*lh.interval {
			lh.conn.Close(ErrHeartbeatTimeout)
		}
	}
}

// FlushLastSeen writes changed last-seen times in one batch.
func (h *Hub) FlushLastSeen(ctx context.Context) error {
	h.mu.Lock()
	batch := map[string]time.Time{}
	for id, lh := range h.hosts {
		if lh.seenDirty && !lh.lastSeen.IsZero() {
			batch[id] = lh.lastSeen
			lh.seenDirty = false
		}
	}
	h.mu.Unlock()
	if len(batch) == 0 {
		return nil
	}
	if err := h.cfg.Store.SaveLastSeen(ctx, batch); err != nil {
		h.mu.Lock()
		for id := range batch {
			if lh, ok := h.hosts[id]; ok {
				lh.seenDirty = true
			}
		}
		h.mu.Unlock()
		return err
	}
	return nil
}

// Run sweeps for silent hosts every second and flushes last-seen times every
// flush interval, until ctx ends; then it flushes once more.
func (h *Hub) Run(ctx context.Context, flush time.Duration) error {
	sweep := time.NewTicker(time.Second)
	defer sweep.Stop()
	fl := time.NewTicker(flush)
	defer fl.Stop()
	for {
		select {
		case <-ctx.Done():
			h.CloseAll()
			return h.FlushLastSeen(context.WithoutCancel(ctx))
		case <-sweep.C:
			h.Sweep()
		case <-fl.C:
			if err := h.FlushLastSeen(ctx); err != nil {
				h.log.Warn("persist last-seen times", "err", err)
			}
		}
	}
}

// CloseAll ends every agent session with [ErrShutdown] and makes
// [Hub.Connect] refuse new ones: the server is stopping. It is idempotent.
func (h *Hub) CloseAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for _, lh := range h.hosts {
		if lh.conn != nil {
			lh.conn.Close(ErrShutdown)
		}
	}
	h.checkDrained()
}

// Drained is closed once [Hub.CloseAll] ran and every session it closed has
// disconnected, so a stopping server can let agents hear why their stream
// ended before it tears the connections down.
func (h *Hub) Drained() <-chan struct{} { return h.drained }

// sessionEnded counts a session off. Caller holds mu.
func (h *Hub) sessionEnded() {
	h.live--
	h.checkDrained()
}

// checkDrained closes drained when the hub is closed and no session is
// left. Caller holds mu.
func (h *Hub) checkDrained() {
	if h.closed && h.live == 0 {
		select {
		case <-h.drained:
		default:
			close(h.drained)
		}
	}
}

// snapRefs are the pointers a snapshot is built from, taken under the lock;
// building the messages happens outside it.
type snapRefs struct {
	hosts []hostRef
}

// hostRef is a host's state at one instant: the immutable record plus
// copies of the live fields, so a view can be built outside the lock.
type hostRef struct {
	rec      *fleetv1.Host
	online   bool
	lastSeen time.Time
	metrics  *typesv1.Metrics
	running  *fleetv1.Command
	interval time.Duration
}

func refOf(lh *liveHost) hostRef {
	return hostRef{rec: lh.rec, online: lh.online, lastSeen: lh.lastSeen, metrics: lh.metrics, running: lh.running, interval: lh.interval}
}

// view returns a fresh Host message with durable and live fields that
// shares nothing with the hub: callers may change it.
func (hr hostRef) view() *fleetv1.Host {
	v := proto.Clone(hr.rec).(*fleetv1.Host)
	hr.setLive(v)
	return v
}

// sharedView returns a fresh Host message whose nested messages are shared
// with the hub's immutable record: about ten times cheaper than view, for
// messages only encoded (snapshots and events sent to watchers). Nothing
// may change the result's nested messages.
func (hr hostRef) sharedView() *fleetv1.Host {
	r := hr.rec
	v := &fleetv1.Host{
		HostId: r.HostId, Hostname: r.Hostname, HostType: r.HostType,
		AgentVersion: r.AgentVersion, AgentOutdated: r.AgentOutdated, AgentFreshness: r.AgentFreshness,
		Generation: r.Generation, GenerationMessage: r.GenerationMessage, LockHash: r.LockHash,
		OsVersion: r.OsVersion, NixpkgsVersion: r.NixpkgsVersion, Location: r.Location, DeviceType: r.DeviceType,
		ThemeColor: r.ThemeColor, RepoUrl: r.RepoUrl, UpdateStatus: r.UpdateStatus, CreatedAt: r.CreatedAt, Tests: r.Tests,
		AgentSourceCommit: r.AgentSourceCommit, AgentBinaryHash: r.AgentBinaryHash, AgentStorePath: r.AgentStorePath,
	}
	hr.setLive(v)
	return v
}

// setLive sets the live fields of v.
func (hr hostRef) setLive(v *fleetv1.Host) {
	v.Online = hr.online
	if !hr.lastSeen.IsZero() {
		v.LastSeen = timestamppb.New(hr.lastSeen)
	}
	v.Metrics = hr.metrics
	v.RunningCommand = hr.running
	v.HeartbeatInterval = durationpb.New(hr.interval)
	v.AvailableCommands = availableCommands(hr.online, hr.running)
}

func (h *Hub) refsLocked() snapRefs {
	refs := snapRefs{hosts: make([]hostRef, 0, len(h.hosts))}
	for _, lh := range h.hosts {
		refs.hosts = append(refs.hosts, refOf(lh))
	}
	return refs
}

// byHostID orders hosts by id.
func byHostID(a, b *fleetv1.Host) int { return strings.Compare(a.HostId, b.HostId) }

func (r snapRefs) build() []*fleetv1.Host {
	out := make([]*fleetv1.Host, 0, len(r.hosts))
	for _, hr := range r.hosts {
		out = append(out, hr.view())
	}
	slices.SortFunc(out, byHostID)
	return out
}

// buildShared is build with shared nested messages (see sharedView), for
// snapshots that are only encoded.
func (r snapRefs) buildShared() []*fleetv1.Host {
	out := make([]*fleetv1.Host, 0, len(r.hosts))
	for _, hr := range r.hosts {
		out = append(out, hr.sharedView())
	}
	slices.SortFunc(out, byHostID)
	return out
}

// snapshotLocked captures what a snapshot needs; call build on the result
// outside the lock.
func (h *Hub) snapshotLocked(resync bool) func() *fleetv1.Snapshot {
	refs := h.refsLocked()
	target, pr, prc, prErr, prChecked := h.target, h.pr, h.prConfig, h.prError, tsOrNil(h.prChecked)
	active := make([]*fleetv1.Command, 0, len(h.commands))
	for _, c := range h.commands {
		active = append(active, c)
	}
	bulks := h.activeBulksLocked()
	version := h.cfg.ServerVersion
	return func() *fleetv1.Snapshot {
		sort.Slice(active, func(i, j int) bool { return active[i].CommandId < active[j].CommandId })
		sortBulks(bulks)
		return &fleetv1.Snapshot{Hosts: refs.buildShared(), Target: target, PendingPr: pr, PullRequestsConfigured: prc,
			PullRequestsError: prErr, PullRequestsCheckedAt: prChecked,
			ServerVersion: version, Resync: resync, ActiveCommands: active, ActiveBulks: bulks}
	}
}

// Snapshot returns the whole fleet now. Its hosts share nested messages
// with the hub: read it, encode it, do not change it.
func (h *Hub) Snapshot() *fleetv1.Snapshot {
	h.mu.Lock()
	build := h.snapshotLocked(false)
	h.mu.Unlock()
	return build()
}
