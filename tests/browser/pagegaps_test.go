package browser

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	cdpbrowser "github.com/chromedp/cdproto/browser"
	"github.com/chromedp/cdproto/emulation"
	"github.com/chromedp/chromedp"
	"google.golang.org/protobuf/types/known/timestamppb"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// TestStaleLookAndPRDot feeds the page a snapshot (through the stream's own
// decoding path) with one host whose last heartbeat is 57 s old and a pending
// PR: the host turns stale by itself after 60 s, a heartbeat brings it back,
// the Lock compartment carries the PR dot and Bulk Actions offers the merge.
func TestStaleLookAndPRDot(t *testing.T) {
	const hostilePR = `flake.lock: update <img src=x onerror=alert(1)>`
	f := newFleet(t, nil, fleetOptions{noAgents: true, bareHosts: []string{"quiet-1", "live-1"}})
	hosts := f.listHosts()
	now := time.Now()
	for i, h := range hosts {
		h.Online = true
		h.Metrics = metricsAt(i)
		h.LastSeen = timestamppb.New(now)
		if h.Hostname == "quiet-1" {
			h.LastSeen = timestamppb.New(now.Add(-57 * time.Second))
		}
	}
	pr := &fleetv1.PendingPR{Number: 42, Title: hostilePR, Mergeable: true}
	snap := grpcWebFrame(&fleetv1.WatchFleetResponse{Events: []*fleetv1.FleetEvent{{Kind: &fleetv1.FleetEvent_Snapshot{
		Snapshot: &fleetv1.Snapshot{Hosts: hosts, ServerVersion: "0.1.0", PendingPr: pr, PullRequestsConfigured: true}}}}})
	b := newBrowser(t, 1400, 900)
	injectFeed(b, snap)
	b.login(f.url())

	b.waitFor("quiet-1 stale", hostState("quiet-1")+` === "stale"`)
	row := rowSel("quiet-1")
	if !evalT[bool](b, `document.querySelector(`+js(row)+`).classList.contains("host-stale")`) {
		t.Error("the stale row lacks the stale look")
	}
	if title := evalT[string](b, `document.querySelector(`+js(row+` [data-field="status"]`)+`).title`); !strings.HasPrefix(title, "No heartbeat for") {
		t.Errorf("stale status title %q", title)
	}
	if st := evalT[string](b, hostState("live-1")); st != "online" {
		t.Errorf("live-1 is %q, want online", st)
	}
	feedEvents(b, &fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_HostHeartbeat{HostHeartbeat: &fleetv1.HostHeartbeat{
		HostId: "quiet-1", LastSeen: timestamppb.Now(), Metrics: metricsAt(7)}}})
	b.waitFor("quiet-1 back online", hostState("quiet-1")+` === "online" && !document.querySelector(`+js(row)+`).classList.contains("host-stale")`)

	// The PR dot on every Lock compartment, painted without a positioned box.
	lock := rowSel("live-1") + ` [data-compartment="lock"]`
	b.waitFor("the PR dot", `document.querySelector(`+js(lock)+`).classList.contains("has-pr")`)
	if bg := evalT[string](b, `getComputedStyle(document.querySelector(`+js(lock)+`)).backgroundImage`); !strings.Contains(bg, "radial-gradient") {
		t.Errorf("the PR dot is not painted: background-image %q", bg)
	}
	if title := evalT[string](b, `document.querySelector(`+js(lock)+`).title`); !strings.Contains(title, "#42") {
		t.Errorf("the Lock tooltip does not mention the PR: %q", title)
	}
	b.do(chromedp.Click("#bulk-actions-button"))
	b.waitFor("the merge entry", `document.querySelector("#merge-deploy").offsetParent !== null && !document.querySelector("#merge-deploy").disabled`)
	if txt := evalT[string](b, `document.querySelector("#merge-deploy").textContent`); strings.TrimSpace(txt) != "Merge & Deploy PR #42" {
		t.Errorf("merge entry reads %q", txt)
	}
	if title := evalT[string](b, `document.querySelector("#merge-deploy").title`); title != hostilePR {
		t.Errorf("merge entry title %q, want the PR title as text", title)
	}
	if n := evalT[int](b, `document.querySelectorAll('img[src="x"]').length`); n != 0 {
		t.Errorf("the PR title created %d img elements", n)
	}
	if n := evalT[int](b, `document.querySelectorAll("#flake-update-banner, .flake-update-banner").length`); n != 0 {
		t.Error("a global PR banner exists")
	}

	// The PR goes: dot and entry go with it.
	feedEvents(b, &fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_PendingPrChanged{PendingPrChanged: &fleetv1.PendingPRChanged{}}})
	b.waitFor("the PR dot gone", `!document.querySelector(`+js(lock)+`).classList.contains("has-pr") && document.querySelector("#merge-deploy").hidden`)
}

// TestNarrowScreenCards shows the fleet as cards on a narrow screen, kept up
// to date by heartbeats that do not move anything in them.
func TestNarrowScreenCards(t *testing.T) {
	f := newFleet(t, twoHosts(), fleetOptions{})
	b := newBrowser(t, 600, 900)
	b.login(f.url())
	card := cardSel("web-1")
	b.waitFor("web-1 card online", `document.querySelector(`+js(card)+`)?.dataset.state === "online"`)
	if !evalT[bool](b, `document.querySelector("#host-table").offsetParent === null && document.querySelector(`+js(card)+`).offsetParent !== null`) {
		t.Fatal("a narrow screen does not show cards instead of the table")
	}
	b.waitFor("card metrics", `/^\d+%$/.test(document.querySelector(`+js(card+` [data-field="cpu-val"]`)+`).textContent.trim())`)

	rects := `JSON.stringify([...document.querySelectorAll(` + js(card+` [data-field], `+card+` [data-compartment]`) + `)].map((e) => { const r = e.getBoundingClientRect(); return [e.dataset.field || e.dataset.compartment, r.x, r.y, r.width, r.height]; }))`
	beat := `document.querySelector(` + js(card+` [data-field="status"]`) + `).className`
	before := evalT[string](b, rects)
	// Heartbeats rewrite the card's metrics and age…
	for range 3 {
		cls := evalT[string](b, beat)
		b.waitFor("a heartbeat on the card", beat+` !== `+js(cls))
	}
	// …but nothing in it moves.
	if after := evalT[string](b, rects); after != before {
		t.Errorf("heartbeats moved the card's layout:\nbefore %s\nafter  %s", before, after)
	}
}

// TestLogPanelCopyAndDownload copies and downloads a host's log as text.
func TestLogPanelCopyAndDownload(t *testing.T) {
	f := newFleet(t, twoHosts(), fleetOptions{})
	b := newBrowser(t, 1400, 900)
	dir := t.TempDir()
	if _, err := chromedp.CallBrowser(b.timeout(waitLong), cdpbrowser.SetDownloadBehavior, cdpbrowser.SetDownloadBehaviorParams{
		Behavior: cdpbrowser.SetDownloadBehaviorBehaviorAllow, DownloadPath: dir}); err != nil {
		t.Fatalf("Browser.setDownloadBehavior: %v", err)
	}
	b.login(f.url())
	for _, p := range []string{"clipboard-read", "clipboard-write"} {
		if _, err := chromedp.CallBrowser(b.timeout(waitLong), cdpbrowser.SetPermission, cdpbrowser.SetPermissionParams{
			Permission: &cdpbrowser.PermissionDescriptor{Name: p}, Setting: cdpbrowser.PermissionSettingGranted, Origin: f.url()}); err != nil {
			t.Fatalf("Browser.setPermission %s: %v", p, err)
		}
	}
	if _, err := chromedp.Call(b.timeout(waitLong), emulation.SetFocusEmulationEnabled, emulation.SetFocusEmulationEnabledParams{Enabled: true}); err != nil {
		t.Fatalf("Emulation.setFocusEmulationEnabled: %v", err)
	}
	waitOnline(b, "web-1")
	menuCommand(b, "web-1", "test")
	b.waitFor("test completion", logText+`.includes("test succeeded")`)
	b.waitFor("section header final", `[...document.querySelectorAll("#log-body .log-section")].pop()?.textContent.includes("· succeeded")`)

	b.do(chromedp.Click("#log-copy"))
	b.waitFor("copied", `document.querySelector("#log-panel").dataset.copied !== undefined`)
	copied := evalT[string](b, `navigator.clipboard.readText()`)
	for _, want := range []string{"=== test cmd-", "(succeeded) ===", "configuration present", "[SYS] test succeeded"} {
		if !strings.Contains(copied, want) {
			t.Errorf("copied log lacks %q:\n%s", want, copied)
		}
	}

	b.do(chromedp.Click("#log-download"))
	var got []byte
	deadline := time.Now().Add(waitLong)
	for got == nil {
		matches, _ := filepath.Glob(filepath.Join(dir, "web-1-test-cmd-*.log"))
		if len(matches) == 1 {
			if b, err := os.ReadFile(matches[0]); err == nil && len(b) > 0 {
				got = b
				break
			}
		}
		if time.Now().After(deadline) {
			entries, _ := os.ReadDir(dir)
			t.Fatalf("no web-1-test-cmd-*.log downloaded; %s holds %v", dir, entries)
		}
		time.Sleep(50 * time.Millisecond) // polling a directory for the download, with a deadline
	}
	if string(got) != copied {
		t.Errorf("the download differs from the copied text:\n%s\n---\n%s", got, copied)
	}
}
