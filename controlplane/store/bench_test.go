package store

import (
	"fmt"
	"testing"
	"time"

	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// BenchmarkAppendLines stores batches of 20 output lines, the shape of a
// busy build streaming its log.
func BenchmarkAppendLines(b *testing.B) {
	s := openTemp(b)
	ctx := b.Context()
	mustCreateHost(b, s, "h", nil)
	if err := s.CreateCommand(ctx, cmd("c", "h", t0, typesv1.CommandState_COMMAND_STATE_RUNNING)); err != nil {
		b.Fatal(err)
	}
	const batch = 20
	var next uint64 = 1
	b.ReportAllocs()
	for b.Loop() {
		ls := lines(next, next+batch-1)
		next += batch
		if err := s.AppendLines(ctx, "c", ls); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "lines/s")
}

// BenchmarkSaveLastSeen writes one batch of last-seen times for a whole
// fleet, as the hub does periodically.
func BenchmarkSaveLastSeen(b *testing.B) {
	for _, hosts := range []int{1000, 20000} {
		b.Run(fmt.Sprintf("hosts=%d", hosts), func(b *testing.B) {
			s := openTemp(b)
			ctx := b.Context()
			seen := make(map[string]time.Time, hosts)
			for i := range hosts {
				id := fmt.Sprintf("host-%05d", i)
				mustCreateHost(b, s, id, nil)
				seen[id] = t0
			}
			b.ReportAllocs()
			round := 0
			for b.Loop() {
				round++
				at := t0.Add(time.Duration(round) * time.Second)
				for id := range seen {
					seen[id] = at
				}
				if err := s.SaveLastSeen(ctx, seen); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N*hosts)/b.Elapsed().Seconds(), "hosts/s")
		})
	}
}
