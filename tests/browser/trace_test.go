package browser

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/tracing"
	"github.com/chromedp/chromedp"
)

// mainThreadTrace records a Chromium trace and sums, per event name, the
// time spent on the renderer's main thread. It answers "where does the main
// thread's time go" during a load test (NIXPLANE_BENCH_TRACE=1).
type mainThreadTrace struct {
	b    *browser
	mu   sync.Mutex
	evs  []traceEvent
	done chan struct{}
}

type traceEvent struct {
	Name string          `json:"name"`
	Ph   string          `json:"ph"`
	Dur  float64         `json:"dur"`
	Pid  int             `json:"pid"`
	Tid  int             `json:"tid"`
	Args json.RawMessage `json:"args"`
}

func startTrace(b *browser) *mainThreadTrace {
	tr := &mainThreadTrace{b: b, done: make(chan struct{})}
	if err := chromedp.Listen(b.ctx, func(ev any) {
		switch e := ev.(type) {
		case *tracing.EventDataCollected:
			tr.mu.Lock()
			for _, v := range e.Value {
				var te traceEvent
				if json.Unmarshal([]byte(v), &te) == nil {
					tr.evs = append(tr.evs, te)
				}
			}
			tr.mu.Unlock()
		case *tracing.EventTracingComplete:
			close(tr.done)
		}
	}); err != nil {
		b.t.Fatal(err)
	}
	if _, err := chromedp.Call(b.timeout(waitLong), tracing.Start, tracing.StartParams{
		TransferMode: tracing.StartTransferModeReportEvents,
		TraceConfig:  &tracing.TraceConfig{IncludedCategories: []string{"devtools.timeline", "blink", "cc", "v8.execute"}},
	}); err != nil {
		b.t.Fatalf("Tracing.start: %v", err)
	}
	return tr
}

// stop ends the trace and returns the top main-thread event names by time.
func (tr *mainThreadTrace) stop(top int) string {
	if _, err := chromedp.Call(tr.b.timeout(waitLong), tracing.End, cdp.Empty{}); err != nil {
		tr.b.t.Fatalf("Tracing.end: %v", err)
	}
	<-tr.done
	tr.mu.Lock()
	defer tr.mu.Unlock()
	type key struct{ pid, tid int }
	main := map[key]bool{}
	for _, e := range tr.evs {
		if e.Ph == "M" && e.Name == "thread_name" && strings.Contains(string(e.Args), "CrRendererMain") {
			main[key{e.Pid, e.Tid}] = true
		}
	}
	sums := map[string]float64{}
	counts := map[string]int{}
	for _, e := range tr.evs {
		if e.Ph == "X" && main[key{e.Pid, e.Tid}] {
			sums[e.Name] += e.Dur
			counts[e.Name]++
		}
	}
	names := make([]string, 0, len(sums))
	for n := range sums {
		names = append(names, n)
	}
	sort.Slice(names, func(i, j int) bool { return sums[names[i]] > sums[names[j]] })
	var sb strings.Builder
	for i, n := range names {
		if i == top {
			break
		}
		fmt.Fprintf(&sb, "\n  %-40s %9.1f ms %6d×", n, sums[n]/1000, counts[n])
	}
	return sb.String()
}
