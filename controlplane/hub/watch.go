package hub

import (
	"context"
	"time"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// WatchOptions filter what a watcher receives.
type WatchOptions struct {
	SkipHeartbeats bool
	SkipOutput     bool
}

// Watcher is one subscriber to fleet events, with a queue bounded by the
// fleet's state rather than by time.
//
// Events that only carry a host's state are kept latest-value-wins per host:
// a heartbeat replaces the host's unsent heartbeat, a HostStatusChanged
// replaces its unsent status and offline events, and so on, so a watcher
// that stalls holds at most a few events per host however long it stalls.
// An event replaced that way is dropped from its place and the newer one is
// queued at the end, never earlier than anything published before it, so
// what the watcher rebuilds is the same as if it had seen every event.
// Every other event (commands, their output, hosts added or removed, target
// and PR changes) keeps its order and counts against [Config.QueueLimit];
// only when those overflow is the backlog dropped for a resync snapshot.
type Watcher struct {
	opts   WatchOptions
	limit  int
	flush  int // events that end the batching wait early
	notify chan struct{}
	timer  *time.Timer // Next's batching wait; used by Next only

	// Guarded by the hub's mu: push runs under it and Next takes it to drain.
	// queue holds nil where an event was replaced by a newer one.
	queue []*fleetv1.FleetEvent
	// hosts says where each host's replaceable events sit in queue.
	hosts   map[string]pending
	live    int // non-nil entries of queue
	dead    int // nil entries of queue
	counted int // entries that count against limit
	// firstAt is when the queue last went from empty to not empty.
	firstAt time.Time
	resync  bool
	// Resyncs counts how often this watcher fell behind.
	Resyncs int
}

// pending locates one host's replaceable events in a watcher's queue, each
// as 1 + its index (0: none).
type pending struct {
	// hb is the latest heartbeat; hbInPlace says no other event of the host
	// was queued after it, so a newer heartbeat may take its very place.
	hb        int32
	hbInPlace bool
	// status is the latest HostStatusChanged; mstatus the latest one that
	// carries metrics, kept until one with metrics replaces it because a
	// status without metrics leaves a page's metrics as they were.
	status, mstatus int32
	// offline is a HostOffline queued after status.
	offline int32
}

// push queues ev. Caller holds the hub's mu. It never blocks.
func (w *Watcher) push(ev *fleetv1.FleetEvent) {
	if w.resync {
		return
	}
	switch ev.Kind.(type) {
	case *fleetv1.FleetEvent_HostHeartbeat:
		if w.opts.SkipHeartbeats {
			return
		}
	case *fleetv1.FleetEvent_CommandOutput:
		if w.opts.SkipOutput {
			return
		}
	}
	wasEmpty := len(w.queue) == 0
	if !w.enqueue(ev) {
		// Fell behind on events that cannot be replaced: drop the backlog
		// and send a fresh snapshot instead.
		w.resync = true
		w.queue = nil
		w.hosts = map[string]pending{}
		w.live, w.dead, w.counted = 0, 0, 0
		w.Resyncs++
		w.wake()
		return
	}
	if w.dead > 1024 && w.dead > w.live {
		w.compact()
	}
	if wasEmpty {
		w.firstAt = time.Now()
		w.wake()
	}
	if w.live == w.flush {
		w.wake()
	}
}

// enqueue adds ev to the queue, replacing what it supersedes; false when ev
// counts against the limit and the limit is reached.
func (w *Watcher) enqueue(ev *fleetv1.FleetEvent) bool {
	switch k := ev.Kind.(type) {
	case *fleetv1.FleetEvent_HostHeartbeat:
		id := k.HostHeartbeat.GetHostId()
		p := w.hosts[id]
		if p.hb != 0 && p.hbInPlace {
			w.queue[p.hb-1] = ev
			return true
		}
		// A newer heartbeat sets everything an older one set.
		w.drop(&p.hb)
		p.hb, p.hbInPlace = w.add(ev), true
		w.hosts[id] = p
		return true
	case *fleetv1.FleetEvent_HostStatusChanged:
		host := k.HostStatusChanged.GetHost()
		id := host.GetHostId()
		p := w.hosts[id]
		// A status carries every field of the host: it supersedes an
		// offline event and earlier statuses. Metrics are the exception: a
		// status without them (offline, or no heartbeat yet) leaves a page's
		// metrics as they were, so older metrics must still arrive.
		w.drop(&p.offline)
		if host.GetMetrics() != nil {
			w.drop(&p.hb)
			if p.mstatus != p.status {
				w.drop(&p.mstatus)
			}
			w.drop(&p.status)
			p.mstatus = 0
		} else if p.status != p.mstatus {
			w.drop(&p.status)
		}
		p.hbInPlace = false
		p.status = w.add(ev)
		if host.GetMetrics() != nil {
			p.mstatus = p.status
		}
		w.hosts[id] = p
		return true
	case *fleetv1.FleetEvent_HostOffline:
		id := k.HostOffline.GetHostId()
		p := w.hosts[id]
		// The heartbeat before it stays: its metrics outlive the offline.
		w.drop(&p.offline)
		p.hbInPlace = false
		p.offline = w.add(ev)
		w.hosts[id] = p
		return true
	case *fleetv1.FleetEvent_HostRegistered, *fleetv1.FleetEvent_HostRemoved:
		// Nothing of the host queued before it may be replaced by something
		// queued after it.
		delete(w.hosts, hostOf(ev))
	}
	if w.counted >= w.limit {
		return false
	}
	w.counted++
	w.add(ev)
	return true
}

// add appends ev and returns 1 + its index.
func (w *Watcher) add(ev *fleetv1.FleetEvent) int32 {
	w.queue = append(w.queue, ev)
	w.live++
	return int32(len(w.queue))
}

// drop clears the entry at *at (1 + index; 0: none) and resets *at.
func (w *Watcher) drop(at *int32) {
	if *at == 0 {
		return
	}
	w.queue[*at-1] = nil
	w.live--
	w.dead++
	*at = 0
}

// compact removes the nil entries by queueing the live ones again.
func (w *Watcher) compact() {
	old := w.queue
	w.queue = make([]*fleetv1.FleetEvent, 0, w.live+w.live/4)
	w.hosts = make(map[string]pending, len(w.hosts))
	w.live, w.dead, w.counted = 0, 0, 0
	for _, ev := range old {
		if ev != nil {
			w.enqueue(ev) // counted events were within the limit before
		}
	}
}

// take empties the queue and returns its live events in order.
func (w *Watcher) take() []*fleetv1.FleetEvent {
	batch := make([]*fleetv1.FleetEvent, 0, w.live)
	for _, ev := range w.queue {
		if ev == nil {
			continue
		}
		batch = append(batch, ev)
		if id := hostOf(ev); id != "" {
			delete(w.hosts, id)
		}
	}
	if len(w.hosts) != 0 {
		w.hosts = map[string]pending{}
	}
	if cap(w.queue) > 4096 {
		w.queue = nil // do not keep a stall's backlog array
	} else {
		clear(w.queue)
		w.queue = w.queue[:0]
	}
	w.live, w.dead, w.counted = 0, 0, 0
	return batch
}

// wake tells Next that there is something to look at: the first event of a
// batch, a full batch, or a resync. Only these wake it, not every event.
func (w *Watcher) wake() {
	select {
	case w.notify <- struct{}{}:
	default:
	}
}

// hostOf returns the host whose state ev carries, if any.
func hostOf(ev *fleetv1.FleetEvent) string {
	switch k := ev.Kind.(type) {
	case *fleetv1.FleetEvent_HostHeartbeat:
		return k.HostHeartbeat.GetHostId()
	case *fleetv1.FleetEvent_HostOffline:
		return k.HostOffline.GetHostId()
	case *fleetv1.FleetEvent_HostRegistered:
		return k.HostRegistered.GetHost().GetHostId()
	case *fleetv1.FleetEvent_HostRemoved:
		return k.HostRemoved.GetHostId()
	case *fleetv1.FleetEvent_HostStatusChanged:
		return k.HostStatusChanged.GetHost().GetHostId()
	}
	return ""
}

// Subscribe registers a watcher and returns it with the snapshot it starts
// from; events published after the snapshot are queued for it.
func (h *Hub) Subscribe(opts WatchOptions) (*Watcher, *fleetv1.Snapshot) {
	w := &Watcher{opts: opts, limit: h.cfg.QueueLimit, flush: h.cfg.FlushEvents, notify: make(chan struct{}, 1), hosts: map[string]pending{},
		timer: time.NewTimer(time.Hour)}
	w.timer.Stop()
	h.mu.Lock()
	build := h.snapshotLocked(false)
	h.watchers[w] = struct{}{}
	h.mu.Unlock()
	return w, build()
}

// Unsubscribe removes a watcher.
func (h *Hub) Unsubscribe(w *Watcher) {
	h.mu.Lock()
	delete(h.watchers, w)
	h.mu.Unlock()
	w.timer.Stop()
}

// WatcherCount returns how many watchers are registered.
func (h *Hub) WatcherCount() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.watchers)
}

// Next waits for the watcher's next batch: queued events, or a resync
// snapshot when it fell behind (as one Snapshot event). Once an event is
// queued, Next waits up to [Config.FlushInterval] from that event's arrival
// for more to join it, or until [Config.FlushEvents] are queued; events that
// waited that long already (a watcher busy writing its previous batch) are
// returned at once. When ctx ends, what is queued is returned without
// waiting, then ctx's error.
func (h *Hub) Next(ctx context.Context, w *Watcher) ([]*fleetv1.FleetEvent, error) {
	for {
		h.mu.Lock()
		if w.resync {
			w.resync = false
			build := h.snapshotLocked(true)
			h.mu.Unlock()
			return []*fleetv1.FleetEvent{{Kind: &fleetv1.FleetEvent_Snapshot{Snapshot: build()}}}, nil
		}
		if w.live > 0 {
			wait := h.cfg.FlushInterval - time.Since(w.firstAt)
			if wait <= 0 || w.live >= w.flush || ctx.Err() != nil {
				batch := w.take()
				h.mu.Unlock()
				return batch, nil
			}
			h.mu.Unlock()
			w.timer.Reset(wait)
			select {
			case <-ctx.Done():
			case <-w.notify:
			case <-w.timer.C:
			}
			continue
		}
		h.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-w.notify:
		}
	}
}
