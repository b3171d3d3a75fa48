package hub

import (
	"context"
	"testing"
	"time"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// newTunedHub is newTestHub with the batching and queue settings given.
func newTunedHub(t testing.TB, cfg Config, hosts ...string) *testHub {
	t.Helper()
	th := newTestHub(t, cfg.QueueLimit, hosts...)
	th.cfg.FlushInterval = cfg.FlushInterval
	if cfg.FlushEvents > 0 {
		th.cfg.FlushEvents = cfg.FlushEvents
	}
	return th
}

type nextResult struct {
	batch []*fleetv1.FleetEvent
	err   error
}

func nextAsync(ctx context.Context, h *Hub, w *Watcher) <-chan nextResult {
	ch := make(chan nextResult, 1)
	go func() { b, err := h.Next(ctx, w); ch <- nextResult{b, err} }()
	return ch
}

// TestNextBatchesUntilFull: with a long flush interval, Next gathers events
// until FlushEvents are queued and returns them as one batch, in order.
func TestNextBatchesUntilFull(t *testing.T) {
	th := newTunedHub(t, Config{FlushInterval: time.Hour, FlushEvents: 10}, "a")
	w, _ := th.Subscribe(WatchOptions{})
	got := nextAsync(context.Background(), th.Hub, w)
	for seq := uint64(1); seq <= 9; seq++ {
		th.Publish(outputEvent(seq))
	}
	select {
	case r := <-got:
		t.Fatalf("Next returned %d events before the batch was full or its time was up", len(r.batch))
	case <-time.After(50 * time.Millisecond):
	}
	th.Publish(outputEvent(10))
	select {
	case r := <-got:
		if r.err != nil || len(r.batch) != 10 {
			t.Fatalf("Next = %d events, %v; want one batch of 10", len(r.batch), r.err)
		}
		for i, ev := range r.batch {
			if s := ev.GetCommandOutput().GetLines()[0].GetSeq(); s != uint64(i+1) {
				t.Fatalf("event %d has seq %d", i, s)
			}
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Next did not return a full batch")
	}
}

// TestNextFlushesAfterInterval: a lone event is delivered once the flush
// interval has passed, without more events arriving.
func TestNextFlushesAfterInterval(t *testing.T) {
	th := newTunedHub(t, Config{FlushInterval: 30 * time.Millisecond, FlushEvents: 1000}, "a")
	w, _ := th.Subscribe(WatchOptions{})
	got := nextAsync(context.Background(), th.Hub, w)
	th.Publish(outputEvent(1))
	select {
	case r := <-got:
		if r.err != nil || len(r.batch) != 1 {
			t.Fatalf("Next = %v, %v", r.batch, r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a lone event was never flushed")
	}
}

// TestNextReturnsQueuedWhenContextEnds: a watcher whose stream ends while
// Next waits for more gets what was queued, then the context's error.
func TestNextReturnsQueuedWhenContextEnds(t *testing.T) {
	th := newTunedHub(t, Config{FlushInterval: time.Hour, FlushEvents: 1000}, "a")
	w, _ := th.Subscribe(WatchOptions{})
	ctx, cancel := context.WithCancel(context.Background())
	got := nextAsync(ctx, th.Hub, w)
	th.Publish(outputEvent(1))
	th.Publish(outputEvent(2))
	waitFor(t, 10*time.Second, func() bool {
		th.mu.Lock()
		defer th.mu.Unlock()
		return w.live == 2
	}, "events to be queued")
	cancel()
	select {
	case r := <-got:
		if r.err != nil || len(r.batch) != 2 {
			t.Fatalf("Next after cancel = %d events, %v; want the 2 queued", len(r.batch), r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Next kept waiting after its context ended")
	}
	if _, err := th.Next(ctx, w); err != context.Canceled {
		t.Fatalf("Next on an empty queue after cancel = %v", err)
	}
}

// TestNoWaitForBatchDisabled: a negative flush interval returns every event
// as soon as Next sees it.
func TestNoWaitForBatchDisabled(t *testing.T) {
	th := newTunedHub(t, Config{FlushInterval: -1, FlushEvents: 1000}, "a")
	w, _ := th.Subscribe(WatchOptions{})
	got := nextAsync(context.Background(), th.Hub, w)
	th.Publish(outputEvent(1))
	select {
	case r := <-got:
		if len(r.batch) != 1 {
			t.Fatalf("Next = %v", r.batch)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Next did not return")
	}
}
