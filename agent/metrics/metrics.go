// Package metrics samples the host's live resource use (CPU, RAM, swap,
// load) from the operating system through gopsutil, for the heartbeat.
package metrics

import (
	"context"
	"math"
	"sync"
	"time"

	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
	"github.com/shirou/gopsutil/v4/cpu"
	"github.com/shirou/gopsutil/v4/load"
	"github.com/shirou/gopsutil/v4/mem"
)

// MinWindow is the shortest CPU sample window: when the previous sample is
// more recent than this (or there is none), Sample measures over MinWindow.
const MinWindow = 250 * time.Millisecond

// Sampler computes CPU use between successive samples. It is safe for
// concurrent use; the zero value is ready.
type Sampler struct {
	mu     sync.Mutex
	prev   *cpu.TimesStat
	prevAt time.Time
}

// Sample reads the current metrics. CPU use is averaged since the previous
// call (or over [MinWindow] the first time). Values it cannot read are 0.
func (s *Sampler) Sample(ctx context.Context) *typesv1.Metrics {
	m := &typesv1.Metrics{}
	m.CpuPercent = s.cpuPercent(ctx)
	if vm, err := mem.VirtualMemoryWithContext(ctx); err == nil {
		m.RamPercent = finite(vm.UsedPercent)
	}
	if sw, err := mem.SwapMemoryWithContext(ctx); err == nil && sw.Total > 0 {
		m.SwapPercent = finite(sw.UsedPercent)
	}
	if l, err := load.AvgWithContext(ctx); err == nil {
		m.Load1 = finite(l.Load1)
	}
	return m
}

func (s *Sampler) cpuPercent(ctx context.Context) float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.prev == nil || time.Since(s.prevAt) < MinWindow {
		t, ok := totals(ctx)
		if !ok {
			return 0
		}
		s.prev, s.prevAt = t, time.Now()
		timer := time.NewTimer(MinWindow)
		select {
		case <-ctx.Done():
			timer.Stop()
			return 0
		case <-timer.C:
		}
	}
	t, ok := totals(ctx)
	if !ok {
		return 0
	}
	p := busyPercent(s.prev, t)
	s.prev, s.prevAt = t, time.Now()
	return p
}

func totals(ctx context.Context) (*cpu.TimesStat, bool) {
	ts, err := cpu.TimesWithContext(ctx, false)
	if err != nil || len(ts) == 0 {
		return nil, false
	}
	return &ts[0], true
}

// busyPercent is the share of non-idle time between two CPU time samples.
func busyPercent(a, b *cpu.TimesStat) float64 {
	idle := func(t *cpu.TimesStat) float64 { return t.Idle + t.Iowait }
	total := func(t *cpu.TimesStat) float64 {
		// Guest time is already counted in User and Nice on Linux.
		return t.User + t.System + t.Idle + t.Nice + t.Iowait + t.Irq + t.Softirq + t.Steal
	}
	dt := total(b) - total(a)
	if dt <= 0 {
		return 0
	}
	busy := dt - (idle(b) - idle(a))
	return finite(math.Min(100, math.Max(0, busy/dt*100)))
}

func finite(f float64) float64 {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return 0
	}
	return f
}
