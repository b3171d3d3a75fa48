package metrics

import (
	"context"
	"testing"

	"github.com/shirou/gopsutil/v4/cpu"
)

func TestSampleReadsTheOS(t *testing.T) {
	var s Sampler
	m := s.Sample(context.Background())
	if m.GetRamPercent() <= 0 || m.GetRamPercent() > 100 {
		t.Errorf("ram = %v", m.GetRamPercent())
	}
	if m.GetCpuPercent() < 0 || m.GetCpuPercent() > 100 || m.GetSwapPercent() < 0 || m.GetSwapPercent() > 100 || m.GetLoad1() < 0 {
		t.Errorf("metrics out of range: %v", m)
	}
}

func TestBusyPercent(t *testing.T) {
	a := &cpu.TimesStat{User: 10, System: 10, Idle: 80}
	b := &cpu.TimesStat{User: 40, System: 20, Idle: 120, Iowait: 20}
	// 100 ticks passed, 60 of them idle or waiting on I/O.
	if got := busyPercent(a, b); got != 40 {
		t.Errorf("busyPercent = %v, want 40", got)
	}
	if got := busyPercent(b, b); got != 0 {
		t.Errorf("no time passed: %v", got)
	}
}
