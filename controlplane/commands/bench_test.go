package commands_test

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/controlplane/commands"
	"github.com/nixplane/nixplane/controlplane/hub"
	"github.com/nixplane/nixplane/controlplane/store"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// nullSender accepts what the manager sends down an agent's stream.
type nullSender struct{}

func (nullSender) Send(*agentv1.ConnectResponse) error { return nil }

// benchRun is a manager on a real SQLite store with one connected host
// running a command, and watchers and followers draining concurrently as
// WatchFleet and FollowCommandLog streams do.
type benchRun struct {
	m     *commands.Manager
	cmdID string
	stop  func()
}

func newBenchRun(b *testing.B, watchers, followers int) *benchRun {
	b.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	quiet := slog.New(slog.DiscardHandler)
	st, err := store.Open(ctx, filepath.Join(b.TempDir(), "nixplane.db"), store.WithLogger(quiet))
	if err != nil {
		b.Fatal(err)
	}
	if err := st.CreateHost(ctx, store.Host{ID: "h", Record: &fleetv1.Host{HostId: "h", Hostname: "h"}, CreatedAt: time.Now()}, []byte("hash-of-h")); err != nil {
		b.Fatal(err)
	}
	h, err := hub.New(ctx, hub.Config{Store: st, Log: quiet})
	if err != nil {
		b.Fatal(err)
	}
	m, err := commands.New(ctx, commands.Config{Hub: h, Store: st, Log: quiet})
	if err != nil {
		b.Fatal(err)
	}
	if _, _, err := h.Connect("h", &agentv1.Hello{Hostname: "h"}, nullSender{}, func(error) {}); err != nil {
		b.Fatal(err)
	}
	c, err := m.Run(ctx, "bench", "h", "test", true)
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	for range watchers {
		w, _ := h.Subscribe(hub.WatchOptions{})
		wg.Go(func() {
			defer h.Unsubscribe(w)
			for {
				if _, err := h.Next(ctx, w); err != nil {
					return
				}
			}
		})
	}
	for range followers {
		wg.Go(func() {
			_, _ = m.Follow(ctx, c.CommandId, 0, func([]*typesv1.OutputLine) error { return nil })
		})
	}
	return &benchRun{m: m, cmdID: c.CommandId, stop: func() { cancel(); wg.Wait(); st.Close() }}
}

// BenchmarkHandleOutput is the log path of a running command: a batch of
// output lines from the agent is stored, then fanned out to every watcher
// and wakes every follower (which reads the new lines from the store).
func BenchmarkHandleOutput(b *testing.B) {
	for _, tc := range []struct{ batch, watchers, followers int }{
		{1, 0, 0}, {1, 10, 0}, {1, 100, 0}, {1, 10, 10}, {20, 10, 0},
	} {
		b.Run(fmt.Sprintf("batch=%d/watchers=%d/followers=%d", tc.batch, tc.watchers, tc.followers), func(b *testing.B) {
			r := newBenchRun(b, tc.watchers, tc.followers)
			defer r.stop()
			ctx := context.Background()
			var seq uint64
			now := timestamppb.Now()
			b.ReportAllocs()
			for b.Loop() {
				ls := make([]*typesv1.OutputLine, tc.batch)
				for i := range ls {
					seq++
					ls[i] = &typesv1.OutputLine{Seq: seq, Stream: typesv1.OutputStream_OUTPUT_STREAM_STDOUT, Time: now,
						Text: "building /nix/store/0123456789abcdef0123456789abcdef-step.drv ········································"}
				}
				r.m.HandleOutput(ctx, "h", &agentv1.CommandOutput{CommandId: r.cmdID, Lines: ls})
			}
			b.ReportMetric(float64(seq)/b.Elapsed().Seconds(), "lines/s")
		})
	}
}
