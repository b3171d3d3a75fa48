package browser

import (
	"context"
	"testing"
	"time"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/store"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// TestRunningDeployShowsOnLoad: a merge-and-deploy left running by the
// previous server process is continued by the new one, and a page opened
// meanwhile names it next to Bulk Actions from its first paint, before the
// stream says anything; a resync snapshot that no longer lists the run
// hides it. A page with the real stream shows it too.
func TestRunningDeployShowsOnLoad(t *testing.T) {
	f := newFleet(t, nil, fleetOptions{noAgents: true, bareHosts: []string{"web-1", "web-2"}})
	hosts := f.listHosts()
	if len(hosts) != 2 {
		t.Fatalf("%d hosts, want 2", len(hosts))
	}
	a, b := hosts[0].HostId, hosts[1].HostId

	// The previous process deployed a and stopped before b: b is offline,
	// so the continued run waits for it to reconnect and stays running.
	f.stopServer()
	ctx := context.Background()
	st, err := controlplane.OpenStore(ctx, f.dataDir)
	if err != nil {
		t.Fatal(err)
	}
	run := &fleetv1.BulkCommand{BulkId: "bulk-before-restart", Command: "merge-and-deploy", State: fleetv1.BulkState_BULK_STATE_RUNNING,
		CreatedAt: timestamppb.New(time.Now().Add(-time.Minute)), Actor: "user:admin", PrNumber: 42, Commit: "abcdef0123456789abcdef0123456789abcdef01",
		Results: []*fleetv1.BulkHostResult{
			{HostId: a, Message: "pull-switch: switched", Command: &fleetv1.Command{CommandId: "cmd-a", HostId: a, Command: "pull-switch",
				State: typesv1.CommandState_COMMAND_STATE_SUCCEEDED, BulkId: "bulk-before-restart"}},
			{HostId: b, Message: "waiting"},
		}}
	plan := store.BulkPlan{Steps: []string{"pull-switch"}, Batches: [][]string{{a, b}}, Concurrency: 2, MaxFailures: -1,
		Hosts: map[string]store.BulkHostProgress{a: {Step: 0, CommandID: "cmd-a", Ended: true, OK: true}}}
	if err := st.SaveBulk(ctx, store.BulkRun{Bulk: run, Plan: plan}); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	f.restartServer()

	const want = "Merge & Deploy PR #42 (abcdef0): 1/2 hosts"
	progress := `document.querySelector("#bulk-progress")`

	// A page whose stream has said nothing yet: what it shows is the first paint.
	quiet := newBrowser(t, 1400, 900)
	if _, err := chromedp.Call(quiet.timeout(waitLong), page.AddScriptToEvaluateOnNewDocument,
		page.AddScriptToEvaluateOnNewDocumentParams{Source: heartbeatFeedJS}); err != nil {
		t.Fatalf("inject the stream feed: %v", err)
	}
	quiet.do(chromedp.Navigate(f.url()+"/login"), chromedp.WaitVisible("#login-form"))
	if st := evalT[int](quiet, `fetch("/login", {method: "POST", body: new URLSearchParams({username: "admin", password: `+js(adminPassword)+`, totp: "", next: "/"})}).then(r => r.status)`); st != 200 {
		t.Fatalf("POST /login: status %d", st)
	}
	quiet.do(chromedp.Navigate(f.url() + "/"))
	quiet.waitFor("the running deploy from the first paint", progress+` !== null && `+progress+`.offsetParent !== null`)
	if got := evalT[string](quiet, progress+`.textContent`); got != want {
		t.Errorf("bulk progress on first paint %q, want %q", got, want)
	}
	if s := evalT[string](quiet, `document.querySelector("#connection-state").dataset.state`); s == "open" {
		t.Fatalf("the stream opened (%s): the label may not come from the first paint", s)
	}
	// The run ended while the page was not told: a resync snapshot without it hides it.
	feedEvents(quiet, &fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_Snapshot{Snapshot: &fleetv1.Snapshot{Hosts: hosts, ServerVersion: "0.1.0", Resync: true}}})
	quiet.waitOpen()
	quiet.waitFor("the ended deploy hidden", progress+`.hidden && `+progress+`.offsetParent === null`)

	// A page with the real stream: the first paint and the stream's snapshot
	// both carry the run.
	live := newBrowser(t, 1400, 900)
	live.login(f.url())
	live.waitFor("the running deploy", progress+`.offsetParent !== null`)
	if got := evalT[string](live, progress+`.textContent`); got != want {
		t.Errorf("bulk progress with the live stream %q, want %q", got, want)
	}
	if d := append(quiet.dialogsOpened(), live.dialogsOpened()...); len(d) != 0 {
		t.Errorf("the pages opened dialogs: %q", d)
	}
}
