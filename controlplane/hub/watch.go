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

// Watcher is one subscriber to fleet events, with a bounded queue.
type Watcher struct {
	opts   WatchOptions
	limit  int
	flush  int // events that end the batching wait early
	notify chan struct{}
	timer  *time.Timer // Next's batching wait; used by Next only

	// Guarded by the hub's mu: push runs under it and Next takes it to drain.
	queue []*fleetv1.FleetEvent
	hbIdx map[string]int // host id → index of its unsent heartbeat in queue
	// firstAt is when the queue last went from empty to not empty.
	firstAt time.Time
	resync  bool
	// Resyncs counts how often this watcher fell behind.
	Resyncs int
}

// push queues ev. Caller holds the hub's mu. It never blocks.
func (w *Watcher) push(ev *fleetv1.FleetEvent) {
	if w.resync {
		return
	}
	switch k := ev.Kind.(type) {
	case *fleetv1.FleetEvent_HostHeartbeat:
		if w.opts.SkipHeartbeats {
			return
		}
		// Latest value wins: replace an unsent heartbeat of the same host.
		if i, ok := w.hbIdx[k.HostHeartbeat.HostId]; ok {
			w.queue[i] = ev
			return
		}
		if len(w.queue) < w.limit {
			w.hbIdx[k.HostHeartbeat.HostId] = len(w.queue)
		}
	case *fleetv1.FleetEvent_CommandOutput:
		if w.opts.SkipOutput {
			return
		}
	default:
		// An event carrying the host's state must not be overtaken by a later
		// heartbeat replacing an earlier unsent one: the next heartbeat of
		// this host is queued after it instead.
		if id := hostOf(ev); id != "" {
			delete(w.hbIdx, id)
		}
	}
	if len(w.queue) >= w.limit {
		// Fell behind: drop the backlog and send a fresh snapshot instead.
		w.resync = true
		w.queue = nil
		clear(w.hbIdx)
		w.Resyncs++
		w.wake()
		return
	}
	if len(w.queue) == 0 {
		w.firstAt = time.Now()
		w.wake()
	}
	w.queue = append(w.queue, ev)
	if len(w.queue) == w.flush {
		w.wake()
	}
}

// wake tells Next that there is something to look at: the first event of a
// batch, a full batch, or a resync. Only these wake it, not every event.
func (w *Watcher) wake() {
	select {
	case w.notify <- struct{}{}:
	default:
	}
}

// hostOf returns the host whose live state ev carries, if any.
func hostOf(ev *fleetv1.FleetEvent) string {
	switch k := ev.Kind.(type) {
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
	w := &Watcher{opts: opts, limit: h.cfg.QueueLimit, flush: h.cfg.FlushEvents, notify: make(chan struct{}, 1), hbIdx: map[string]int{},
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
		if len(w.queue) > 0 {
			wait := h.cfg.FlushInterval - time.Since(w.firstAt)
			if wait <= 0 || len(w.queue) >= w.flush || ctx.Err() != nil {
				batch := w.queue
				w.queue = make([]*fleetv1.FleetEvent, 0, min(len(batch), 256))
				clear(w.hbIdx)
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
