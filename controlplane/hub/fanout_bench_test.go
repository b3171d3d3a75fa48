package hub

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkFanoutHeartbeats: heartbeats of many hosts fanned out to 10
// watchers that read as fast as they can, with and without the batching
// wait. events/batch is how many events each stream write would carry.
func BenchmarkFanoutHeartbeats(b *testing.B) {
	const hosts, watchers = 2000, 10
	for _, flush := range []time.Duration{-1, DefaultFlushInterval} {
		b.Run(fmt.Sprintf("flush=%v", flush), func(b *testing.B) {
			ids := make([]string, hosts)
			for i := range ids {
				ids[i] = fmt.Sprintf("host-%05d", i)
			}
			th := newTunedHub(b, Config{FlushInterval: flush}, ids...)
			conns := make([]*Conn, hosts)
			for i, id := range ids {
				conns[i] = th.connect(b, id, 0).conn
			}
			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			var batches, events atomic.Int64
			for range watchers {
				w, _ := th.Subscribe(WatchOptions{})
				wg.Go(func() {
					for {
						batch, err := th.Next(ctx, w)
						if err != nil {
							return
						}
						batches.Add(1)
						events.Add(int64(len(batch)))
					}
				})
			}
			m := hb(1)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				th.Heartbeat(conns[i%hosts], m)
				i++
			}
			cancel()
			wg.Wait()
			if n := batches.Load(); n > 0 {
				b.ReportMetric(float64(events.Load())/float64(n), "events/batch")
			}
		})
	}
}

// BenchmarkStalledWatcher: heartbeats and reconnects of a 20,000-host fleet
// while one watcher reads nothing; the cost of keeping its backlog, which
// must not overflow into a resync.
func BenchmarkStalledWatcher(b *testing.B) {
	const hosts = 20000
	ids := make([]string, hosts)
	for i := range ids {
		ids[i] = fmt.Sprintf("host-%05d", i)
	}
	th := newTestHub(b, 0, ids...)
	conns := make([]*Conn, hosts)
	for i, id := range ids {
		conns[i] = th.connect(b, id, 0).conn
	}
	w, _ := th.Subscribe(WatchOptions{})
	m := hb(1)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		k := i % hosts
		if i%10 == 9 {
			th.Disconnect(conns[k], "stream closed")
			conns[k] = th.connect(b, ids[k], 0).conn
		}
		th.Heartbeat(conns[k], m)
		i++
	}
	if w.Resyncs != 0 {
		b.Fatalf("the stalled watcher was resynced %d times", w.Resyncs)
	}
}
