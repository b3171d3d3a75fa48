package browser

import (
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"google.golang.org/protobuf/types/known/timestamppb"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// TestPullRequestPollError feeds the page (through the stream's own
// decoding path) the pull-request poll's health: a failing look shows its
// error as text next to Bulk Actions with the last success, the PR dot and
// the merge entry keep the last known PR, a later success clears the error,
// a Merge & Deploy run names its PR and commit while it runs, and without PR
// support nothing about pull requests shows.
func TestPullRequestPollError(t *testing.T) {
	const hostile = `GitHub answered 401 Bad credentials <img src=x onerror=alert(1)>`
	f := newFleet(t, nil, fleetOptions{noAgents: true, bareHosts: []string{"web-1", "web-2"}})
	hosts := f.listHosts()
	now := time.Now()
	for i, h := range hosts {
		h.Online = true
		h.Metrics = metricsAt(i)
		h.LastSeen = timestamppb.New(now)
	}
	pr := &fleetv1.PendingPR{Number: 42, Title: "flake.lock: update nixpkgs", Mergeable: true}
	snapshot := func(configured bool, errText string) *fleetv1.FleetEvent {
		return &fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_Snapshot{Snapshot: &fleetv1.Snapshot{Hosts: hosts, ServerVersion: "0.1.0",
			PendingPr: pr, PullRequestsConfigured: configured, PullRequestsError: errText, PullRequestsCheckedAt: timestamppb.New(now.Add(-5 * time.Minute)), Resync: true}}}
	}
	b := newBrowser(t, 1400, 900)
	injectFeed(b, grpcWebFrame(&fleetv1.WatchFleetResponse{Events: []*fleetv1.FleetEvent{snapshot(true, "")}}))
	b.login(f.url())

	lock := rowSel("web-1") + ` [data-compartment="lock"]`
	status := `document.querySelector("#pr-status")`
	b.waitFor("the PR dot", `document.querySelector(`+js(lock)+`).classList.contains("has-pr")`)
	if !evalT[bool](b, status+`.hidden && `+status+`.offsetParent === null`) {
		t.Error("the poll status shows while looking for pull requests works")
	}

	// Looking fails: the event names no PR, the page keeps the last known one.
	feedEvents(b, &fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_PendingPrChanged{PendingPrChanged: &fleetv1.PendingPRChanged{
		PullRequestsError: hostile, PullRequestsCheckedAt: timestamppb.New(now.Add(-5 * time.Minute))}}})
	b.waitFor("the poll error", status+`.offsetParent !== null`)
	want := "Pull requests: " + hostile + " · last success 5m ago"
	if got := evalT[string](b, status+`.textContent`); got != want {
		t.Errorf("status line %q, want %q", got, want)
	}
	title := evalT[string](b, status+`.title`)
	for _, w := range []string{"Looking for pull requests failed:\n" + hostile, "Last success: ", "Last known pull request: #42 flake.lock: update nixpkgs"} {
		if !strings.Contains(title, w) {
			t.Errorf("status tooltip lacks %q: %q", w, title)
		}
	}
	if n := evalT[int](b, `document.querySelectorAll('img[src="x"]').length + document.querySelectorAll("#pr-status-error *, #pr-status-since *").length`); n != 0 {
		t.Errorf("the error text created %d elements", n)
	}
	// The last success is never cut off, however long the error.
	if !evalT[bool](b, `(() => { const o = `+status+`.getBoundingClientRect(), s = document.querySelector("#pr-status-since").getBoundingClientRect(); return s.width > 0 && s.left >= o.left && s.right <= o.right + 0.5; })()`) {
		t.Error("the last success is not shown whole")
	}
	// It sits with Bulk Actions, in the toolbar, left of its button; no banner.
	if !evalT[bool](b, `(() => { const s = `+status+`.getBoundingClientRect(), m = document.querySelector("#bulk-actions-button").getBoundingClientRect(); return document.querySelector(".toolbar").contains(`+status+`) && s.right <= m.left && Math.abs((s.top + s.bottom) / 2 - (m.top + m.bottom) / 2) < 10; })()`) {
		t.Error("the poll status is not next to Bulk Actions")
	}
	if n := evalT[int](b, `document.querySelectorAll("#flake-update-banner, .flake-update-banner").length`); n != 0 {
		t.Error("a global PR banner exists")
	}
	if !evalT[bool](b, `document.querySelector(`+js(lock)+`).classList.contains("has-pr")`) {
		t.Error("the PR dot went while looking for pull requests fails")
	}
	if lt := evalT[string](b, `document.querySelector(`+js(lock)+`).title`); !strings.Contains(lt, "Pending PR #42") || !strings.Contains(lt, "last known") {
		t.Errorf("lock tooltip %q", lt)
	}
	b.do(chromedp.Click("#bulk-actions-button"))
	b.waitFor("the merge entry", `document.querySelector("#merge-deploy").offsetParent !== null && !document.querySelector("#merge-deploy").disabled`)
	if mt := evalT[string](b, `document.querySelector("#merge-deploy").title`); !strings.Contains(mt, "looking for pull requests fails") {
		t.Errorf("merge entry title %q", mt)
	}
	b.do(chromedp.KeyEvent("\x1b"))

	// A later success clears the error.
	feedEvents(b, &fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_PendingPrChanged{PendingPrChanged: &fleetv1.PendingPRChanged{
		PendingPr: pr, PullRequestsCheckedAt: timestamppb.Now()}}})
	b.waitFor("the poll error gone", status+`.hidden && `+status+`.textContent === ""`)
	if lt := evalT[string](b, `document.querySelector(`+js(lock)+`).title`); strings.Contains(lt, "last known") {
		t.Errorf("lock tooltip still says last known: %q", lt)
	}

	// Merge & Deploy names its PR and commit while it runs.
	progress := `document.querySelector("#bulk-progress")`
	run := func(st fleetv1.BulkState, hostState typesv1.CommandState) *fleetv1.FleetEvent {
		return &fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_BulkProgress{BulkProgress: &fleetv1.BulkProgress{Bulk: &fleetv1.BulkCommand{
			BulkId: "bulk-1", Command: "merge-and-deploy", State: st, PrNumber: 42, Commit: "abcdef0123456789abcdef0123456789abcdef01",
			Results: []*fleetv1.BulkHostResult{
				{HostId: hosts[0].HostId, Command: &fleetv1.Command{CommandId: "c1", HostId: hosts[0].HostId, Command: "pull-switch", State: typesv1.CommandState_COMMAND_STATE_SUCCEEDED}},
				{HostId: hosts[1].HostId, Command: &fleetv1.Command{CommandId: "c2", HostId: hosts[1].HostId, Command: "pull-switch", State: hostState}},
			}}}}}
	}
	feedEvents(b, run(fleetv1.BulkState_BULK_STATE_RUNNING, typesv1.CommandState_COMMAND_STATE_RUNNING))
	b.waitFor("the merge-and-deploy progress", progress+`.offsetParent !== null`)
	if got := evalT[string](b, progress+`.textContent`); got != "Merge & Deploy PR #42 (abcdef0): 1/2 hosts" {
		t.Errorf("bulk progress %q", got)
	}
	feedEvents(b, run(fleetv1.BulkState_BULK_STATE_SUCCEEDED, typesv1.CommandState_COMMAND_STATE_SUCCEEDED))
	b.waitFor("the merge-and-deploy progress gone", progress+`.hidden`)

	// Without PR support nothing about pull requests shows, even with a PR and an error.
	feedEvents(b, snapshot(false, "GitHub answered 500"))
	b.waitFor("no PR dot", `!document.querySelector(`+js(lock)+`).classList.contains("has-pr")`)
	if !evalT[bool](b, status+`.hidden && document.querySelector("#merge-deploy").hidden && document.querySelector("#merge-deploy-sep").hidden`) {
		t.Error("PRs not configured, but the poll status or Merge & Deploy shows")
	}
	if lt := evalT[string](b, `document.querySelector(`+js(lock)+`).title`); strings.Contains(lt, "PR") {
		t.Errorf("PRs not configured, but the lock tooltip says %q", lt)
	}
	if d := b.dialogsOpened(); len(d) != 0 {
		t.Errorf("the page opened dialogs: %q", d)
	}
}
