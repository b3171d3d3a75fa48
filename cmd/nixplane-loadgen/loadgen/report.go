package loadgen

import (
	"fmt"
	"io"
	"slices"
	"text/tabwriter"
	"time"
)

// Report is what a run measured. Rates are per second of the measured
// window; -1 means not measured (no server pid, no /metrics access).
type Report struct {
	Machine  Machine  `json:"machine"`
	Scenario Scenario `json:"scenario"`
	// ConnectSeconds is how long every agent took to be welcomed.
	ConnectSeconds float64 `json:"connect_seconds"`
	WindowSeconds  float64 `json:"window_seconds"`
	// HeartbeatsOffered is what the agents sent; HeartbeatsHandled what the
	// server counted (nixplane_heartbeats_total).
	HeartbeatsOffered float64 `json:"heartbeats_offered_per_s"`
	HeartbeatsHandled float64 `json:"heartbeats_handled_per_s"`
	Server            Server  `json:"server"`
	// HeartbeatLatency is from the agent's send time (Heartbeat.sent_at,
	// passed through as HostHeartbeat.sent_at) to the watcher reading the
	// event, over every watcher.
	HeartbeatLatency     Latency            `json:"heartbeat_latency"`
	HeartbeatLatencyKind map[string]Latency `json:"heartbeat_latency_by_transport,omitempty"`
	// HeartbeatDelivery is heartbeat events per watcher over heartbeats
	// handled: below 1 when the server coalesced a host's unsent heartbeat
	// with a newer one (latest value wins — not a loss of state).
	HeartbeatDelivery float64 `json:"heartbeat_delivery_ratio"`
	// WatchResponsesPerSec is WatchFleetResponse messages per second per
	// watcher, EventsPerResponse the events each carried on average: how
	// well the server batches its fan-out writes.
	WatchResponsesPerSec float64 `json:"watch_responses_per_s"`
	EventsPerResponse    float64 `json:"events_per_response"`
	// EventsDropped counts resync snapshots in the window: each replaces a
	// backlog a watcher fell behind on.
	EventsDropped    int64  `json:"events_dropped"`
	ResyncsTotal     int64  `json:"resyncs_total"`
	Logs             *Logs  `json:"logs,omitempty"`
	AgentReconnects  int64  `json:"agent_reconnects"`
	AgentConnErrors  int64  `json:"agent_connection_errors"`
	WatcherReconnect int64  `json:"watcher_reconnects"`
	Storm            *Storm `json:"storm,omitempty"`
}

// Scenario is the load that was applied.
type Scenario struct {
	Server       string  `json:"server"`
	ServerPID    int     `json:"server_pid,omitempty"`
	Agents       int     `json:"agents"`
	Interval     string  `json:"interval"`
	Jitter       float64 `json:"jitter"`
	WebWatchers  int     `json:"web_watchers"`
	GRPCWatchers int     `json:"grpc_watchers"`
	LogHosts     int     `json:"log_hosts"`
	LogRate      float64 `json:"log_rate"`
	Duration     string  `json:"duration"`
	RestartAt    string  `json:"restart_at,omitempty"`
}

func scenarioOf(c Config) Scenario {
	s := Scenario{Agents: c.Agents, Interval: c.Interval.String(), Jitter: c.Jitter, WebWatchers: c.WebWatchers,
		GRPCWatchers: c.GRPCWatchers, LogHosts: c.LogHosts, Duration: c.Duration.String()}
	if c.LogHosts > 0 {
		s.LogRate = c.LogRate
	}
	if c.RestartAt > 0 {
		s.RestartAt = c.RestartAt.String()
	}
	return s
}

// Server is the server's cost, from /proc/<pid>.
type Server struct {
	CPUPercent float64 `json:"cpu_percent"`
	// CPUMicrosPerHeartbeat is user+system CPU over heartbeats handled
	// (offered when the count is unknown): everything the server did in
	// the window, fan-out and encoding for watchers included.
	CPUMicrosPerHeartbeat float64 `json:"cpu_us_per_heartbeat"`
	RSSBaselineBytes      int64   `json:"rss_baseline_bytes"`
	RSSConnectedBytes     int64   `json:"rss_connected_bytes"`
	RSSEndBytes           int64   `json:"rss_end_bytes"`
	// RSSPerAgentBytes is (end − baseline) / agents; RSSTotalPerAgent is
	// end / agents.
	RSSPerAgentBytes float64 `json:"rss_per_agent_bytes"`
	RSSTotalPerAgent float64 `json:"rss_total_per_agent_bytes"`
	// From the server's /metrics at the end, divided by agents (-1:
	// unknown): Go goroutines, goroutine stacks and heap in use.
	GoroutinesPerAgent float64 `json:"goroutines_per_agent"`
	StackPerAgentBytes float64 `json:"stack_per_agent_bytes"`
	HeapPerAgentBytes  float64 `json:"heap_per_agent_bytes"`
	// HeapIdlePerAgentBytes is free heap the runtime has not returned to
	// the OS yet (part of RSS; the scavenger returns it over minutes).
	HeapIdlePerAgentBytes float64 `json:"heap_idle_per_agent_bytes"`
}

// Latency summarises samples in milliseconds.
type Latency struct {
	Count int     `json:"count"`
	P50   float64 `json:"p50_ms"`
	P99   float64 `json:"p99_ms"`
	Max   float64 `json:"max_ms"`
}

func latencyOf(us []uint32) Latency {
	if len(us) == 0 {
		return Latency{}
	}
	s := slices.Clone(us)
	slices.Sort(s)
	q := func(p float64) float64 { return float64(s[min(len(s)-1, int(p*float64(len(s))))]) / 1000 }
	return Latency{Count: len(s), P50: q(0.50), P99: q(0.99), Max: float64(s[len(s)-1]) / 1000}
}

// Logs is the command output load's outcome.
type Logs struct {
	Commands  int   `json:"commands"`
	Completed int   `json:"completed_everywhere"`
	LinesSent int64 `json:"lines_sent"`
	// LinesStored is the sum of the commands' stored line counts.
	LinesStored int64 `json:"lines_stored"`
	// LinesLost counts, over every watcher, stored lines it never received
	// (plus lines sent but never stored).
	LinesLost   int64   `json:"lines_lost"`
	LineLatency Latency `json:"line_latency"`
}

// Storm is a reconnect storm after a server restart.
type Storm struct {
	Agents      int     `json:"agents"`
	StopSeconds float64 `json:"stop_seconds"`
	// ListeningSeconds and AllOnlineSeconds count from the SIGTERM.
	ListeningSeconds float64 `json:"listening_seconds"`
	AllOnlineSeconds float64 `json:"all_online_seconds"`
	Online           int64   `json:"online_at_end"`
	RSSPeakBytes     int64   `json:"rss_peak_bytes"`
	RSSAfterBytes    int64   `json:"rss_after_bytes"`
	// HeartbeatLatency is sampled from the SIGTERM until every agent is back.
	HeartbeatLatency Latency `json:"heartbeat_latency"`
}

func (r *Report) fill(cfg Config, before, after point, elapsed time.Duration, ws []*watcher, cmdIDs []string, end statsSnap) {
	secs := elapsed.Seconds()
	r.WindowSeconds = secs
	offered := float64(after.agents.HBSent - before.agents.HBSent)
	r.HeartbeatsOffered = offered / secs
	handled := offered
	r.HeartbeatsHandled = -1
	if before.handled >= 0 && after.handled >= 0 {
		handled = float64(after.handled - before.handled)
		r.HeartbeatsHandled = handled / secs
	}
	r.Server.CPUPercent, r.Server.CPUMicrosPerHeartbeat = -1, -1
	if before.cpuOK && after.cpuOK {
		cpu := after.cpu - before.cpu
		r.Server.CPUPercent = 100 * cpu.Seconds() / secs
		if handled > 0 {
			r.Server.CPUMicrosPerHeartbeat = float64(cpu.Microseconds()) / handled
		}
	}
	if after.rss > 0 {
		r.Server.RSSEndBytes = after.rss
		r.Server.RSSPerAgentBytes = float64(after.rss-r.Server.RSSBaselineBytes) / float64(cfg.Agents)
		r.Server.RSSTotalPerAgent = float64(after.rss) / float64(cfg.Agents)
	}
	per := func(v int64) float64 {
		if v < 0 || cfg.Agents == 0 {
			return -1
		}
		return float64(v) / float64(cfg.Agents)
	}
	r.Server.GoroutinesPerAgent, r.Server.StackPerAgentBytes, r.Server.HeapPerAgentBytes = per(after.goroutines), per(after.stack), per(after.heap)
	r.Server.HeapIdlePerAgentBytes = per(after.heapIdle)
	r.AgentReconnects = end.Reconnects
	r.AgentConnErrors = end.ConnErrors

	var all []uint32
	byKind := map[string][]uint32{}
	var hbEvents, responses, events int64
	var lineLat, stormLat []uint32
	for _, w := range ws {
		w.mu.Lock()
		stormLat = append(stormLat, w.stormLat...)
		all = append(all, w.hbLat...)
		byKind[w.kind] = append(byKind[w.kind], w.hbLat...)
		hbEvents += w.hbEvents
		responses += w.responses
		events += w.events
		r.EventsDropped += w.resyncs
		r.ResyncsTotal += w.resyncsAll
		r.WatcherReconnect += w.reconnects
		lineLat = append(lineLat, w.lineLat...)
		w.mu.Unlock()
	}
	r.HeartbeatLatency = latencyOf(all)
	if r.Storm != nil {
		r.Storm.HeartbeatLatency = latencyOf(stormLat)
	}
	if len(byKind) > 1 {
		r.HeartbeatLatencyKind = map[string]Latency{}
		for k, v := range byKind {
			r.HeartbeatLatencyKind[k] = latencyOf(v)
		}
	}
	if responses > 0 {
		r.WatchResponsesPerSec = float64(responses) / float64(len(ws)) / secs
		r.EventsPerResponse = float64(events) / float64(responses)
	}
	if len(ws) > 0 && handled > 0 {
		r.HeartbeatDelivery = float64(hbEvents) / float64(len(ws)) / handled
	}
	if len(cmdIDs) > 0 {
		lg := &Logs{Commands: len(cmdIDs), LinesSent: end.LinesSent, LineLatency: latencyOf(lineLat), Completed: len(cmdIDs)}
		stored := map[string]uint64{}
		for _, w := range ws {
			w.mu.Lock()
			for id, n := range w.complete {
				stored[id] = max(stored[id], n)
			}
			w.mu.Unlock()
		}
		for _, id := range cmdIDs {
			lg.LinesStored += int64(stored[id])
		}
		for _, w := range ws {
			w.mu.Lock()
			done := 0
			for _, id := range cmdIDs {
				if _, ok := w.complete[id]; ok {
					done++
				}
				got := int64(len(w.lines[id]))
				if want := int64(stored[id]); got < want {
					lg.LinesLost += want - got
				}
			}
			lg.Completed = min(lg.Completed, done)
			w.mu.Unlock()
		}
		if lg.LinesSent > lg.LinesStored {
			lg.LinesLost += lg.LinesSent - lg.LinesStored
		}
		r.Logs = lg
	}
}

// WriteTable prints the report for people.
func (r *Report) WriteTable(out io.Writer) {
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	row := func(k, format string, args ...any) { fmt.Fprintf(tw, "%s\t"+format+"\n", append([]any{k}, args...)...) }
	na := func(v float64, format string) string {
		if v < 0 {
			return "n/a"
		}
		return fmt.Sprintf(format, v)
	}
	s := r.Scenario
	row("machine", "%d CPUs, %s, %s, file limit %d", r.Machine.CPUs, r.Machine.CPUModel, r.Machine.GoVersion, r.Machine.FileLimit)
	row("server", "%s (pid %d)", s.Server, s.ServerPID)
	row("load", "%d agents every %s ±%.0f%%, %d grpc-web + %d gRPC watchers, window %s", s.Agents, s.Interval, 100*s.Jitter, s.WebWatchers, s.GRPCWatchers, s.Duration)
	if s.LogHosts > 0 {
		row("log load", "%d hosts × %.0f lines/s", s.LogHosts, s.LogRate)
	}
	row("agents connected in", "%.1f s", r.ConnectSeconds)
	row("heartbeats/s offered", "%.0f", r.HeartbeatsOffered)
	row("heartbeats/s handled", "%s", na(r.HeartbeatsHandled, "%.0f"))
	row("server CPU", "%s %% of one core", na(r.Server.CPUPercent, "%.1f"))
	row("server CPU per heartbeat", "%s µs", na(r.Server.CPUMicrosPerHeartbeat, "%.1f"))
	if r.Server.RSSEndBytes > 0 {
		row("server RSS", "%.1f MiB (baseline %.1f MiB)", mib(r.Server.RSSEndBytes), mib(r.Server.RSSBaselineBytes))
		row("server RSS per agent", "%.1f KB above baseline, %.1f KB total", r.Server.RSSPerAgentBytes/1000, r.Server.RSSTotalPerAgent/1000)
	}
	if r.Server.StackPerAgentBytes >= 0 {
		row("server Go runtime per agent", "%.2f goroutines, %.1f KB stack, %.1f KB heap in use, %.1f KB heap free not yet returned",
			r.Server.GoroutinesPerAgent, r.Server.StackPerAgentBytes/1000, r.Server.HeapPerAgentBytes/1000, r.Server.HeapIdlePerAgentBytes/1000)
	}
	if r.HeartbeatLatency.Count > 0 {
		l := r.HeartbeatLatency
		row("heartbeat→watcher", "p50 %.1f ms, p99 %.1f ms, max %.1f ms (%d samples)", l.P50, l.P99, l.Max, l.Count)
		for _, k := range []string{"grpc-web", "grpc"} {
			if l, ok := r.HeartbeatLatencyKind[k]; ok {
				row("  over "+k, "p50 %.1f ms, p99 %.1f ms, max %.1f ms", l.P50, l.P99, l.Max)
			}
		}
		row("heartbeat events/watcher", "%.3f of handled (the rest coalesced, latest value wins)", r.HeartbeatDelivery)
		row("watch responses", "%.0f/s per watcher, %.1f events each", r.WatchResponsesPerSec, r.EventsPerResponse)
	}
	if s.WebWatchers+s.GRPCWatchers > 0 {
		row("events dropped (resyncs)", "%d in window, %d in all", r.EventsDropped, r.ResyncsTotal)
	}
	if lg := r.Logs; lg != nil {
		row("log lines", "%d sent, %d stored, %d lost; %d/%d commands seen ending by every watcher", lg.LinesSent, lg.LinesStored, lg.LinesLost, lg.Completed, lg.Commands)
		row("line→watcher", "p50 %.1f ms, p99 %.1f ms, max %.1f ms (%d samples)", lg.LineLatency.P50, lg.LineLatency.P99, lg.LineLatency.Max, lg.LineLatency.Count)
	}
	row("reconnects", "%d agent, %d watcher; %d agent connection errors", r.AgentReconnects, r.WatcherReconnect, r.AgentConnErrors)
	if st := r.Storm; st != nil {
		all := fmt.Sprintf("%.1f s", st.AllOnlineSeconds)
		if st.Online < int64(st.Agents) {
			all = fmt.Sprintf("NOT all back: %d of %d", st.Online, st.Agents)
		}
		row("restart storm", "stopped in %.1f s, listening at %.1f s, all %d online at %s", st.StopSeconds, st.ListeningSeconds, st.Agents, all)
		row("storm memory", "peak %.1f MiB, after %.1f MiB", mib(st.RSSPeakBytes), mib(st.RSSAfterBytes))
		l := st.HeartbeatLatency
		row("storm heartbeat→watcher", "p50 %.1f ms, p99 %.1f ms, max %.1f ms (%d samples)", l.P50, l.P99, l.Max, l.Count)
	}
	_ = tw.Flush()
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }
