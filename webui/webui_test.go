package webui

import (
	"bytes"
	"html"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

const hostile = `</script><img src=x onerror=alert(1)>`

var (
	rowRE    = regexp.MustCompile(`<tr class="host-row[^"]*" data-host-id="([^"]+)"`)
	cardRE   = regexp.MustCompile(`<article class="host-card[^"]*" data-host-id="([^"]+)"`)
	scriptRE = regexp.MustCompile(`<script[^>]*>`)
	tagRE    = regexp.MustCompile(`<([a-zA-Z][a-zA-Z0-9-]*)([^>]*)>`)
	attrRE   = regexp.MustCompile(`\s*([^\s="'>/]+)(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'>]+))?`)
	jsonRE   = regexp.MustCompile(`(?s)<script type="application/json" id="fleet-snapshot">(.*?)</script>`)
)

func testHost(id string) *fleetv1.Host {
	return &fleetv1.Host{
		HostId:       id,
		Hostname:     id,
		HostType:     typesv1.HostType_HOST_TYPE_NIXOS,
		Online:       true,
		LastSeen:     timestamppb.New(time.Now().Add(-2 * time.Second)),
		Metrics:      &typesv1.Metrics{CpuPercent: 91, RamPercent: 40},
		AgentVersion: "1.0.0",
		Generation:   "0123456789abcdef0123456789abcdef01234567",
		ThemeColor:   "#7aa2f7",
		UpdateStatus: &typesv1.UpdateStatus{
			Git:  &typesv1.Compartment{Status: typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK, Message: "Up to date"},
			Lock: &typesv1.Compartment{Status: typesv1.CompartmentStatus_COMPARTMENT_STATUS_OUTDATED, Message: "flake.lock outdated"},
		},
	}
}

func render(t *testing.T, d DashboardData) string {
	t.Helper()
	var b bytes.Buffer
	if err := RenderDashboard(&b, d); err != nil {
		t.Fatalf("RenderDashboard: %v", err)
	}
	return b.String()
}

// checkNoActiveContent fails when the page holds anything the CSP would
// block or a browser would run: inline script, handlers, style attributes,
// or an unescaped hostile string.
func checkNoActiveContent(t *testing.T, page string) {
	t.Helper()
	for _, tag := range scriptRE.FindAllString(page, -1) {
		if !strings.Contains(tag, ` src="/assets/`) && tag != `<script type="application/json" id="fleet-snapshot">` {
			t.Errorf("inline script tag %q", tag)
		}
	}
	for _, tag := range tagRE.FindAllStringSubmatch(page, -1) {
		for _, a := range attrRE.FindAllStringSubmatch(tag[2], -1) {
			name := strings.ToLower(a[1])
			if strings.HasPrefix(name, "on") || name == "style" {
				t.Errorf("<%s> carries attribute %q", tag[1], name)
			}
		}
		if strings.EqualFold(tag[1], "style") {
			t.Errorf("inline <style> element")
		}
	}
	if strings.Contains(page, "<img") {
		t.Errorf("hostile markup reached the page unescaped")
	}
}

func TestDashboardEscapesHostileStrings(t *testing.T) {
	h := testHost("web-1")
	h.Hostname = hostile
	h.OsVersion = hostile
	h.GenerationMessage = hostile
	h.Location = hostile
	h.AgentVersion = hostile
	h.UpdateStatus.Git.Message = hostile
	snap := &fleetv1.Snapshot{
		Hosts:         []*fleetv1.Host{h},
		Target:        &fleetv1.FleetTarget{GitCommit: "abcdef0123456789", Message: hostile, Error: hostile, Branch: hostile},
		PendingPr:     &fleetv1.PendingPR{Number: 4, Title: hostile, Mergeable: true},
		ServerVersion: hostile,
		// The poll error is text from GitHub: it is escaped like host data.
		PullRequestsConfigured: true,
		PullRequestsError:      hostile,
	}
	page := render(t, DashboardData{Snapshot: snap, CSRFToken: `tok"en<>`, User: hostile})
	checkNoActiveContent(t, page)
	if !strings.Contains(page, html.EscapeString(hostile)) {
		t.Errorf("hostile text not shown escaped")
	}
	if !strings.Contains(page, `<meta name="csrf-token" content="tok&#34;en&lt;&gt;">`) {
		t.Errorf("CSRF token not escaped in meta tag")
	}

	// The embedded snapshot survives escaping intact: hydrate() reads exactly
	// what the server sent.
	m := jsonRE.FindStringSubmatch(page)
	if m == nil {
		t.Fatal("no fleet-snapshot script")
	}
	if strings.Contains(m[1], "</script") || strings.Contains(m[1], "<") {
		t.Errorf("snapshot JSON not escaped for a script element: %q", m[1])
	}
	var got fleetv1.Snapshot
	if err := protojson.Unmarshal([]byte(m[1]), &got); err != nil {
		t.Fatalf("snapshot JSON does not parse: %v", err)
	}
	if !proto.Equal(&got, snap) {
		t.Errorf("snapshot changed on the way through the page:\n got %v\nwant %v", &got, snap)
	}
}

func TestDashboardRendersRowsAndCards(t *testing.T) {
	snap := &fleetv1.Snapshot{
		Hosts:                  []*fleetv1.Host{testHost("web-2"), testHost("db-1"), testHost("web-1")},
		ServerVersion:          "1.2.3",
		PendingPr:              &fleetv1.PendingPR{Number: 42, Title: "Update flake.lock", Mergeable: true},
		PullRequestsConfigured: true,
		ActiveCommands: []*fleetv1.Command{
			{CommandId: "c1", HostId: "web-2", Command: "switch", State: typesv1.CommandState_COMMAND_STATE_RUNNING},
		},
	}
	page := render(t, DashboardData{Snapshot: snap, CSRFToken: "csrf123", User: "admin"})
	checkNoActiveContent(t, page)

	var rows, cards []string
	for _, m := range rowRE.FindAllStringSubmatch(page, -1) {
		rows = append(rows, m[1])
	}
	for _, m := range cardRE.FindAllStringSubmatch(page, -1) {
		cards = append(cards, m[1])
	}
	want := []string{"db-1", "web-1", "web-2"}
	if strings.Join(rows, ",") != strings.Join(want, ",") {
		t.Errorf("rows = %v, want %v (sorted by name)", rows, want)
	}
	if strings.Join(cards, ",") != strings.Join(want, ",") {
		t.Errorf("cards = %v, want %v", cards, want)
	}
	for _, s := range []string{
		`3/3 online`,
		`<div id="host-cards" class="host-cards">`,
		`id="empty-state" class="empty-state" hidden`,
		`data-compartment="lock" data-status="outdated"`,
		`class="comp has-pr" data-compartment="lock"`,
		`Merge &amp; Deploy PR #<span id="merge-deploy-number">42</span>`,
		`<span class="badge" data-field="badge">switch</span>`,
		`class="metric metric-high" data-field="cpu"`,
		`<code class="gen" data-field="generation"`,
		`>0123456</code>`,
		`<input type="hidden" name="csrf_token" value="csrf123">`,
		`<meta name="csrf-token" content="csrf123">`,
		`id="connection-state" class="connection" data-state="connecting"`,
		`src="/assets/app.js?v=` + AssetVersion() + `"`,
		`href="/assets/app.css?v=` + AssetVersion() + `"`,
		`<template id="tpl-host-row"><tr class="host-row host-offline" data-host-id=""`,
		`<template id="tpl-host-card"><article class="host-card host-offline" data-host-id=""`,
	} {
		if !strings.Contains(page, s) {
			t.Errorf("page lacks %q", s)
		}
	}
	if strings.Contains(page, `data-compartment="git" data-status="outdated"`) {
		t.Errorf("git compartment rendered with the wrong status")
	}
}

func TestDashboardEmptyFleet(t *testing.T) {
	for _, snap := range []*fleetv1.Snapshot{nil, {}} {
		page := render(t, DashboardData{Snapshot: snap, CSRFToken: "x", User: "admin"})
		checkNoActiveContent(t, page)
		if n := len(rowRE.FindAllString(page, -1)); n != 0 {
			t.Errorf("empty fleet rendered %d rows", n)
		}
		if !strings.Contains(page, `<p id="empty-state" class="empty-state">No hosts yet.`) {
			t.Errorf("empty fleet lacks the visible empty-state message")
		}
		if !strings.Contains(page, `0/0 online`) {
			t.Errorf("empty fleet lacks the host count")
		}
		if !strings.Contains(page, `id="merge-deploy" data-action="merge-deploy" hidden`) {
			t.Errorf("Merge & Deploy shown without a pending PR")
		}
	}
}

func TestHostViewStates(t *testing.T) {
	now := time.Now()
	h := testHost("a")
	h.LastSeen = timestamppb.New(now.Add(-90 * time.Second))
	if v := newHostView(h, nil, nil, "1", now); v.State != "stale" || v.LastSeenLevel != "stale" || v.LastSeen != "1m ago" {
		t.Errorf("90 s silent: state %q level %q text %q", v.State, v.LastSeenLevel, v.LastSeen)
	}
	h.Online = false
	if v := newHostView(h, nil, nil, "1", now); v.State != "offline" || v.Stale {
		t.Errorf("offline host: state %q stale %v", v.State, v.Stale)
	}
	h.Online = true
	h.LastSeen = timestamppb.New(now)
	done := &fleetv1.Command{Command: "switch", State: typesv1.CommandState_COMMAND_STATE_SUCCEEDED}
	if v := newHostView(h, done, nil, "1", now); v.Busy || v.State != "online" || v.LastSeenLevel != "ok" {
		t.Errorf("finished command counted as running: %+v", v)
	}
}

func TestLoginPage(t *testing.T) {
	var b bytes.Buffer
	if err := RenderLogin(&b, LoginData{Error: hostile, Username: hostile, Next: `/"><img src=x>`}); err != nil {
		t.Fatal(err)
	}
	page := b.String()
	checkNoActiveContent(t, page)
	for _, s := range []string{
		`<form method="post" action="/login"`,
		`name="username"`, `name="password"`, `name="totp"`, `<input type="hidden" name="next"`,
		html.EscapeString(hostile),
	} {
		if !strings.Contains(page, s) {
			t.Errorf("login page lacks %q", s)
		}
	}
	b.Reset()
	if err := RenderLogin(&b, LoginData{}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(b.String(), `id="login-error"`) {
		t.Errorf("login page shows an error without one")
	}
}

func TestAssets(t *testing.T) {
	h := Assets()
	for _, tc := range []struct {
		method, path string
		code         int
		ctype        string
	}{
		{"GET", "/assets/app.js?v=" + AssetVersion(), 200, "text/javascript"},
		{"HEAD", "/assets/app.css", 200, "text/css"},
		{"GET", "/assets/", 404, ""},
		{"GET", "/assets/missing.js", 404, ""},
		{"GET", "/assets/../webui.go", 404, ""},
		{"GET", "/other/app.js", 404, ""},
		{"POST", "/assets/app.js", 405, ""},
	} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(tc.method, tc.path, nil))
		if rec.Code != tc.code {
			t.Errorf("%s %s: status %d, want %d", tc.method, tc.path, rec.Code, tc.code)
			continue
		}
		if tc.code != http.StatusOK {
			continue
		}
		if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, tc.ctype) {
			t.Errorf("%s: Content-Type %q, want %s", tc.path, ct, tc.ctype)
		}
		if cc := rec.Header().Get("Cache-Control"); !strings.Contains(cc, "max-age=31536000") {
			t.Errorf("%s: Cache-Control %q", tc.path, cc)
		}
		if tc.method == "GET" && rec.Body.Len() < 1000 {
			t.Errorf("%s: body only %d bytes", tc.path, rec.Body.Len())
		}
	}
}

// TestDashboardPullRequestStatus: the first paint shows the pull-request
// poll's error next to Bulk Actions with the last success, keeps the last
// known PR, and shows nothing about pull requests when they are not
// configured.
func TestDashboardPullRequestStatus(t *testing.T) {
	now := time.Now()
	pr := &fleetv1.PendingPR{Number: 42, Title: "flake.lock: update", Mergeable: true}
	failing := &fleetv1.Snapshot{
		Hosts:                  []*fleetv1.Host{testHost("web-1")},
		PendingPr:              pr,
		PullRequestsConfigured: true,
		PullRequestsError:      "GitHub answered 401\nBad credentials",
		PullRequestsCheckedAt:  timestamppb.New(now.Add(-5 * time.Minute)),
	}
	v, err := newDashboardView(DashboardData{Snapshot: failing}, now)
	if err != nil {
		t.Fatal(err)
	}
	if want := "Pull requests: GitHub answered 401 Bad credentials · last success 5m ago"; v.PRStatus.Text != want {
		t.Errorf("status line %q, want %q", v.PRStatus.Text, want)
	}
	for _, want := range []string{"GitHub answered 401\nBad credentials", "Last success: ", "Last known pull request: #42 flake.lock: update"} {
		if !strings.Contains(v.PRStatus.Title, want) {
			t.Errorf("status tooltip lacks %q: %q", want, v.PRStatus.Title)
		}
	}
	if v.PR == nil || v.PR.Number != 42 || !strings.Contains(v.PR.MenuTitle, "looking for pull requests fails") {
		t.Errorf("the last known PR is not kept for Bulk Actions: %+v", v.PR)
	}
	if lock := v.Hosts[0].Comps[2]; lock.Name != "lock" || !lock.HasPR || !strings.Contains(lock.Title, "Pending PR #42") || !strings.Contains(lock.Title, "last known") {
		t.Errorf("lock compartment %+v", lock)
	}
	page := render(t, DashboardData{Snapshot: failing})
	if !strings.Contains(page, `<span id="pr-status" class="pr-status" data-kind="error" title="Looking for pull requests failed:`) ||
		!strings.Contains(page, `><span id="pr-status-error" class="pr-status-error">Pull requests: GitHub answered 401 Bad credentials</span><span id="pr-status-since" class="pr-status-since"> · last success 5m ago</span></span>`) {
		t.Errorf("page lacks the visible status line")
	}

	// Never succeeded; a long error is shortened inline, whole in the tooltip.
	long := strings.Repeat("é", 300)
	v, err = newDashboardView(DashboardData{Snapshot: &fleetv1.Snapshot{PullRequestsConfigured: true, PullRequestsError: long}}, now)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(v.PRStatus.Text, "… · no success yet") || utf8.RuneCountInString(v.PRStatus.Text) > prErrorInline+40 {
		t.Errorf("long error shown as %q", v.PRStatus.Text)
	}
	if !strings.Contains(v.PRStatus.Title, long) || !strings.Contains(v.PRStatus.Title, "No pull request was pending") {
		t.Errorf("tooltip %q", v.PRStatus.Title)
	}

	// Looking works: no status line.
	ok := &fleetv1.Snapshot{PendingPr: pr, PullRequestsConfigured: true, PullRequestsCheckedAt: timestamppb.New(now)}
	page = render(t, DashboardData{Snapshot: ok})
	if !strings.Contains(page, `<span id="pr-status" class="pr-status" data-kind="error" hidden><span id="pr-status-error" class="pr-status-error"></span><span id="pr-status-since" class="pr-status-since"></span></span>`) {
		t.Errorf("status line shown while looking works")
	}

	// Not configured: nothing about pull requests, even with a PR and an error.
	off := &fleetv1.Snapshot{Hosts: []*fleetv1.Host{testHost("web-1")}, PendingPr: pr, PullRequestsError: "boom"}
	page = render(t, DashboardData{Snapshot: off})
	for _, bad := range []string{"has-pr", "Pending PR", "boom</span>", `id="merge-deploy" data-action="merge-deploy" title`} {
		if strings.Contains(page, bad) {
			t.Errorf("PRs not configured, but the page has %q", bad)
		}
	}
	if !strings.Contains(page, `id="merge-deploy" data-action="merge-deploy" hidden`) || !strings.Contains(page, `id="pr-status" class="pr-status" data-kind="error" hidden`) {
		t.Errorf("PRs not configured, but Merge & Deploy or the status line is shown")
	}
}

func TestOneLine(t *testing.T) {
	for _, c := range []struct {
		in   string
		max  int
		want string
	}{
		{"a\n\tb\x00c  ", 10, "a b c"},
		{"  ", 10, ""},
		{"abcdef", 6, "abcdef"},
		{"abc def", 5, "abc…"},
		{"ééééé", 3, "éé…"},
	} {
		if got := oneLine(c.in, c.max); got != c.want {
			t.Errorf("oneLine(%q, %d) = %q, want %q", c.in, c.max, got, c.want)
		}
	}
}
