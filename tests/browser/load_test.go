package browser

import (
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/cdproto/performance"
	"github.com/chromedp/chromedp"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// The heartbeat load test measures the browser's main thread while the
// dashboard shows many hosts and receives heartbeats at a fleet's rate.
//
// Where the heartbeats come from: the page's own WatchFleet fetch is
// answered inside the page with grpc-web frames that Go encodes from the
// real protobuf types, so every heartbeat goes through exactly the code a
// real stream uses (connect-web's grpc-web decoding, applyEvent, hostStore,
// the per-frame render scheduler and renderHost). The first paint, the login
// and every other call go to the real server. Feeding 200 heartbeats per
// second through the server instead would need 1,000 agent streams in the
// test process; on a 2-core machine those would take the CPU the browser is
// being measured on, and the numbers would mostly measure that contention.
//
// What is reported comes from Chromium itself (CDP Performance.getMetrics):
// the main thread's task, script, layout and style time during the window,
// per second and per heartbeat, plus long tasks and the layout shift score
// from PerformanceObserver. Nothing is asserted about time. Set
// NIXPLANE_BENCH_TRACE=1 to log where the main thread's time goes, by trace
// event.

// heartbeatFeedJS replaces fetch for the WatchFleet call only. The stream's
// first chunk (the snapshot) is queued at once; __feed.run plays loaded
// chunks at a fixed interval and resolves when done.
const heartbeatFeedJS = `(() => {
  const realFetch = window.fetch.bind(window);
  const feed = { ctrl: null, queue: [], chunks: [], snapshot: null, longTasks: 0, longTaskMs: 0, shift: 0 };
  window.__feed = feed;
  const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  feed.setSnapshot = (b64) => { feed.snapshot = bytes(b64); };
  feed.load = (list) => { feed.chunks = list.map(bytes); return feed.chunks.length; };
  feed.enqueue = (b) => { if (feed.ctrl) feed.ctrl.enqueue(b); else feed.queue.push(b); };
  feed.run = (from, to, everyMs) => new Promise((resolve) => {
    let i = from;
    const t = setInterval(() => {
      if (i >= to) { clearInterval(t); resolve(i - from); return; }
      feed.enqueue(feed.chunks[i++]);
    }, everyMs);
  });
  window.fetch = (input, init) => {
    const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
    if (!url.endsWith("/nixplane.fleet.v1.FleetService/WatchFleet")) return realFetch(input, init);
    const body = new ReadableStream({
      start(c) {
        feed.ctrl = c;
        if (feed.snapshot) c.enqueue(feed.snapshot);
        for (const b of feed.queue) c.enqueue(b);
        feed.queue = [];
      },
    });
    init?.signal?.addEventListener("abort", () => { try { feed.ctrl?.error(new DOMException("aborted", "AbortError")); } catch {} feed.ctrl = null; });
    return Promise.resolve(new Response(body, { status: 200, headers: { "content-type": "application/grpc-web+proto" } }));
  };
  try {
    new PerformanceObserver((l) => { for (const e of l.getEntries()) { feed.longTasks++; feed.longTaskMs += e.duration; } }).observe({ type: "longtask" });
    new PerformanceObserver((l) => { for (const e of l.getEntries()) if (!e.hadRecentInput) feed.shift += e.value; }).observe({ type: "layout-shift" });
  } catch (e) { console.warn("performance observers unavailable", e); }
})();`

// injectFeed makes the page's WatchFleet stream the in-page feed, which
// starts with the given snapshot frame. Call it before the page loads.
func injectFeed(b *browser, snapshot []byte) {
	b.t.Helper()
	if _, err := chromedp.Call(b.timeout(waitLong), page.AddScriptToEvaluateOnNewDocument,
		page.AddScriptToEvaluateOnNewDocumentParams{Source: heartbeatFeedJS + "\nwindow.__feed.setSnapshot(" + js(base64.StdEncoding.EncodeToString(snapshot)) + ");"}); err != nil {
		b.t.Fatalf("inject the stream feed: %v", err)
	}
}

// feedEvents sends events to the page through the injected feed, as one
// network chunk.
func feedEvents(b *browser, evs ...*fleetv1.FleetEvent) {
	b.t.Helper()
	var chunk []byte
	for _, ev := range evs {
		chunk = append(chunk, grpcWebFrame(&fleetv1.WatchFleetResponse{Events: []*fleetv1.FleetEvent{ev}})...)
	}
	evalT[bool](b, `(__feed.enqueue(Uint8Array.from(atob(`+js(base64.StdEncoding.EncodeToString(chunk))+`), (c) => c.charCodeAt(0))), true)`)
}

// grpcWebFrame frames one message as a grpc-web data frame.
func grpcWebFrame(m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		panic(err)
	}
	out := make([]byte, 5, 5+len(b))
	binary.BigEndian.PutUint32(out[1:], uint32(len(b)))
	return append(out, b...)
}

// heartbeatLoad configures one measurement.
type heartbeatLoad struct {
	hosts    int
	rate     int           // heartbeats per second
	warmup   time.Duration // played before the measured window
	window   time.Duration // measured
	tick     time.Duration // one chunk of rate*tick heartbeats per tick
	viewport [2]int
}

// loadResult is what one window measured.
type loadResult struct {
	heartbeats   int
	seconds      float64
	taskMs       float64 // main-thread task time in the window (wall time of its tasks)
	cpuMs        float64 // main-thread CPU time in the window
	scriptMs     float64
	layoutMs     float64
	styleMs      float64
	layouts      float64
	longTasks    float64
	longTaskMs   float64
	layoutShift  float64
	lastValueHit bool
	// Main-thread time per second of the same page without heartbeats.
	idleTaskMsPerS float64
}

func (r loadResult) perSecond(ms float64) float64 { return ms / r.seconds }
func (r loadResult) perBeatUs(ms float64) float64 { return ms * 1000 / float64(r.heartbeats) }

// aboveIdleUs is the main-thread time per heartbeat beyond the idle page's.
func (r loadResult) aboveIdleUs() float64 {
	return (r.taskMs - r.idleTaskMsPerS*r.seconds) * 1000 / float64(r.heartbeats)
}

func (r loadResult) String() string {
	return fmt.Sprintf("idle page: main thread busy %.1f ms/s; %d heartbeats in %.1f s: main thread busy %.1f ms/s (%.1f µs per heartbeat, %.1f µs above idle), CPU %.1f ms/s; script %.1f ms/s, layout %.2f ms/s (%d layouts), style %.2f ms/s; %d long tasks (%.0f ms); layout shift %.4f",
		r.idleTaskMsPerS, r.heartbeats, r.seconds, r.perSecond(r.taskMs), r.perBeatUs(r.taskMs), r.aboveIdleUs(), r.perSecond(r.cpuMs), r.perSecond(r.scriptMs), r.perSecond(r.layoutMs),
		int(r.layouts), r.perSecond(r.styleMs), int(r.longTasks), r.longTaskMs, r.layoutShift)
}

// listHosts reads every host through the REST API with the admin token.
func (f *fleet) listHosts() []*fleetv1.Host {
	f.t.Helper()
	req, err := http.NewRequest(http.MethodGet, f.url()+"/api/hosts", nil)
	if err != nil {
		f.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+f.token)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	if res.StatusCode != http.StatusOK {
		f.t.Fatalf("GET /api/hosts: %s: %.300s", res.Status, b)
	}
	var out fleetv1.ListHostsResponse
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(b, &out); err != nil {
		f.t.Fatalf("GET /api/hosts: %v", err)
	}
	return out.Hosts
}

func metricsAt(k int) *typesv1.Metrics {
	return &typesv1.Metrics{CpuPercent: float64((k * 7) % 100), RamPercent: float64(20 + (k*3)%70), SwapPercent: 1, Load1: float64(k%40) / 10}
}

func cdpMetrics(b *browser) map[string]float64 {
	b.t.Helper()
	res, err := chromedp.Call(b.timeout(waitLong), performance.GetMetrics, cdp.Empty{})
	if err != nil {
		b.t.Fatalf("Performance.getMetrics: %v", err)
	}
	m := map[string]float64{}
	for _, x := range res.Metrics {
		m[x.Name] = x.Value
	}
	return m
}

// runHeartbeatLoad opens the dashboard with cfg.hosts hosts, plays the
// warm-up, then measures cfg.window of heartbeats at cfg.rate per second.
func runHeartbeatLoad(tb testing.TB, cfg heartbeatLoad) loadResult {
	names := make([]string, cfg.hosts)
	for i := range names {
		names[i] = fmt.Sprintf("node-%04d", i)
	}
	f := newFleet(tb, nil, fleetOptions{noAgents: true, bareHosts: names})
	hosts := f.listHosts()
	if len(hosts) != cfg.hosts {
		tb.Fatalf("server lists %d hosts, want %d", len(hosts), cfg.hosts)
	}

	// The stream's snapshot shows every host online with metrics.
	start := time.Now()
	for i, h := range hosts {
		h.Online = true
		h.LastSeen = timestamppb.New(start)
		h.Metrics = metricsAt(i)
	}
	snap := grpcWebFrame(&fleetv1.WatchFleetResponse{Events: []*fleetv1.FleetEvent{{Kind: &fleetv1.FleetEvent_Snapshot{
		Snapshot: &fleetv1.Snapshot{Hosts: hosts, ServerVersion: "0.1.0"}}}}})

	// Heartbeats, one response per heartbeat (the unbatched worst case),
	// grouped into one network chunk per tick; hosts take turns.
	perTick := int(float64(cfg.rate) * cfg.tick.Seconds())
	if perTick < 1 {
		tb.Fatalf("rate %d/s at tick %v sends nothing", cfg.rate, cfg.tick)
	}
	ticks := int((cfg.warmup + cfg.window) / cfg.tick)
	warmTicks := int(cfg.warmup / cfg.tick)
	step := time.Second / time.Duration(cfg.rate)
	chunks := make([]string, ticks)
	last := map[string]int{}
	k := 0
	for i := range chunks {
		var chunk []byte
		for range perTick {
			h := hosts[k%len(hosts)]
			chunk = append(chunk, grpcWebFrame(&fleetv1.WatchFleetResponse{Events: []*fleetv1.FleetEvent{{Kind: &fleetv1.FleetEvent_HostHeartbeat{
				HostHeartbeat: &fleetv1.HostHeartbeat{HostId: h.HostId, LastSeen: timestamppb.New(start.Add(time.Duration(k) * step)), Metrics: metricsAt(k)}}}}})...)
			last[h.HostId] = k
			k++
		}
		chunks[i] = base64.StdEncoding.EncodeToString(chunk)
	}

	b := newBrowser(tb, cfg.viewport[0], cfg.viewport[1])
	injectFeed(b, snap)
	if _, err := chromedp.Call(b.timeout(waitLong), performance.Enable, performance.EnableParams{}); err != nil {
		tb.Fatalf("Performance.enable: %v", err)
	}
	b.login(f.url())
	b.waitFor("every host online", fmt.Sprintf(`document.querySelectorAll('#host-rows tr[data-state="online"]').length === %d`, cfg.hosts))
	if n := evalT[int](b, `__feed.load(`+jsList(chunks)+`)`); n != ticks {
		tb.Fatalf("page loaded %d chunks, want %d", n, ticks)
	}
	tickMs := int(cfg.tick / time.Millisecond)

	// Baseline: the same page for the same time without heartbeats (the
	// once-a-second tick of ages and stale looks, the footer).
	idle0 := cdpMetrics(b)
	i0 := time.Now()
	evalT[bool](b, fmt.Sprintf(`new Promise((r) => setTimeout(() => r(true), %d))`, cfg.window.Milliseconds()))
	idleSeconds := time.Since(i0).Seconds()
	idle1 := cdpMetrics(b)

	if warmTicks > 0 {
		if _, err := chromedp.Run(b.timeout(cfg.warmup*10+waitLong), chromedp.Evaluate[int](fmt.Sprintf(`__feed.run(0, %d, %d)`, warmTicks, tickMs), chromedp.EvalAwaitPromise)); err != nil {
			tb.Fatalf("play the warm-up: %v", err)
		}
	}
	evalT[int](b, `(__feed.longTasks = 0, __feed.longTaskMs = 0, __feed.shift = 0)`)
	var tr *mainThreadTrace
	if os.Getenv("NIXPLANE_BENCH_TRACE") == "1" {
		tr = startTrace(b)
	}
	before := cdpMetrics(b)
	t0 := time.Now()
	played, err := chromedp.Run(b.timeout(cfg.window*10+waitLong), chromedp.Evaluate[int](fmt.Sprintf(`__feed.run(%d, %d, %d)`, warmTicks, ticks, tickMs), chromedp.EvalAwaitPromise))
	if err != nil {
		tb.Fatalf("play the heartbeats: %v", err)
	}
	// Let the last chunk's frame render before reading the counters.
	evalT[bool](b, `new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))`)
	elapsed := time.Since(t0).Seconds()
	after := cdpMetrics(b)
	if tr != nil {
		tb.Logf("main thread by trace event (nested events counted in each):%s", tr.stop(25))
	}
	obs := evalT[map[string]float64](b, `({longTasks: __feed.longTasks, longTaskMs: __feed.longTaskMs, shift: __feed.shift})`)

	d := func(name string) float64 { return after[name] - before[name] }

	r := loadResult{
		heartbeats: played * perTick, seconds: elapsed,
		taskMs: d("TaskDuration") * 1000, cpuMs: d("ThreadTime") * 1000, scriptMs: d("ScriptDuration") * 1000, layoutMs: d("LayoutDuration") * 1000,
		styleMs: d("RecalcStyleDuration") * 1000, layouts: d("LayoutCount"),
		longTasks: obs["longTasks"], longTaskMs: obs["longTaskMs"], layoutShift: obs["shift"],
		idleTaskMsPerS: (idle1["TaskDuration"] - idle0["TaskDuration"]) * 1000 / idleSeconds,
	}

	// The page really applied the heartbeats: the last host fed shows the
	// CPU value of its last heartbeat.
	lastHost := hosts[(k-1)%len(hosts)].HostId
	want := fmt.Sprintf("%d%%", int(metricsAt(last[lastHost]).CpuPercent))
	b.waitFor("the last heartbeat rendered", `document.querySelector(`+js(rowSel(lastHost)+` [data-field="cpu-val"]`)+`).textContent.trim() === `+js(want))
	r.lastValueHit = true
	return r
}

func jsList(items []string) string {
	var sb strings.Builder
	sb.WriteByte('[')
	for i, s := range items {
		if i > 0 {
			sb.WriteByte(',')
		}
		sb.WriteString(js(s))
	}
	sb.WriteByte(']')
	return sb.String()
}

// TestHeartbeatLoadSmall runs the load measurement briefly with fewer hosts:
// every heartbeat reaches the page through the stream's code path and none
// of them moves the layout. The full-size run is BenchmarkDashboardHeartbeats.
func TestHeartbeatLoadSmall(t *testing.T) {
	r := runHeartbeatLoad(t, heartbeatLoad{hosts: 100, rate: 200, warmup: 500 * time.Millisecond, window: 2 * time.Second,
		tick: 20 * time.Millisecond, viewport: [2]int{1400, 900}})
	t.Log(r)
	if r.heartbeats != 400 {
		t.Errorf("%d heartbeats played, want 400", r.heartbeats)
	}
	if r.layoutShift != 0 {
		t.Errorf("heartbeats moved the layout: layout shift score %.4f", r.layoutShift)
	}
}

// BenchmarkDashboardHeartbeats reports the main thread's time for 1,000
// hosts receiving 200 heartbeats per second, for 10 s per iteration:
//
//	go test ./tests/browser -run '^$' -bench DashboardHeartbeats -benchtime 1x
func BenchmarkDashboardHeartbeats(b *testing.B) {
	for b.Loop() {
		r := runHeartbeatLoad(b, heartbeatLoad{hosts: 1000, rate: 200, warmup: 2 * time.Second, window: 10 * time.Second,
			tick: 20 * time.Millisecond, viewport: [2]int{1400, 900}})
		b.Log(r)
		b.ReportMetric(r.perSecond(r.taskMs), "main-ms/s")
		b.ReportMetric(r.perBeatUs(r.taskMs), "main-µs/heartbeat")
		b.ReportMetric(r.idleTaskMsPerS, "idle-main-ms/s")
		b.ReportMetric(r.aboveIdleUs(), "above-idle-µs/heartbeat")
		b.ReportMetric(r.perSecond(r.cpuMs), "main-cpu-ms/s")
		b.ReportMetric(r.perSecond(r.scriptMs), "script-ms/s")
		b.ReportMetric(r.perSecond(r.layoutMs+r.styleMs), "layout+style-ms/s")
		b.ReportMetric(r.longTasks, "long-tasks")
		b.ReportMetric(r.layoutShift, "layout-shift")
	}
}
