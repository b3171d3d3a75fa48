package browser

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

var (
	testPass = map[string]string{"01-config-present.sh": "#!/bin/sh\necho 'configuration present'\necho 'disk usage below 90%'\n"}
	testFail = map[string]string{
		"01-config-present.sh": "#!/bin/sh\necho 'configuration present'\n",
		"02-backup-fresh.sh":   "#!/bin/sh\necho 'last backup is 9 days old (limit 7)' >&2\nexit 1\n",
	}
	testSlow = map[string]string{"01-slow.sh": "#!/bin/sh\necho 'slow test started'\nsleep 120\necho 'slow test finished'\n"}
)

func twoHosts() []hostSpec {
	return []hostSpec{{name: "web-1", color: "#7aa2f7", tests: testPass}, {name: "web-2", color: "#7dcfff", tests: testPass}}
}

// waitOnline waits until every named host's row shows it online.
func waitOnline(b *browser, names ...string) {
	b.t.Helper()
	for _, n := range names {
		b.waitFor(n+" online", hostState(n)+` === "online"`)
	}
}

// menuCommand opens a host's ⋮ menu and clicks one of its entries.
func menuCommand(b *browser, host, command string) {
	b.t.Helper()
	item := `#host-menu [data-command=` + js(command) + `]`
	b.do(chromedp.Click(rowSel(host) + ` [data-action="menu"]`))
	b.waitFor("menu entry "+command+" enabled", `(() => { const e = document.querySelector(`+js(item)+`); return e && !e.disabled && e.offsetParent !== null; })()`)
	b.do(chromedp.Click(item))
}

// logText is the log panel body's text.
const logText = `(document.querySelector("#log-body")?.textContent ?? "")`

func TestLoginAndHydration(t *testing.T) {
	hosts := []hostSpec{{name: "web-1", color: "#7aa2f7"}, {name: "web-2", color: "#7dcfff"}, {name: "db-1", color: "#e0af68"}}
	f := newFleet(t, hosts, fleetOptions{noAgents: true})
	b := newBrowser(t, 1400, 900)

	// Without a session the dashboard sends the browser to the login page.
	b.do(chromedp.Navigate(f.url() + "/"))
	b.waitFor("the login form", `document.querySelector("#login-form") !== null`)
	b.loginForm(f.url())
	for _, h := range hosts {
		b.waitFor(h.name+" row and card", `document.querySelector(`+js(rowSel(h.name))+`) !== null && document.querySelector(`+js(cardSel(h.name))+`) !== null`)
		name := evalT[string](b, `document.querySelector(`+js(rowSel(h.name)+` [data-field="name"]`)+`).textContent`)
		if strings.TrimSpace(name) != h.name {
			t.Errorf("row %s shows name %q", h.name, name)
		}
		if st := evalT[string](b, hostState(h.name)); st != "offline" {
			t.Errorf("host %s without agent has state %q, want offline", h.name, st)
		}
	}
	if n := evalT[int](b, `document.querySelectorAll("tr[data-host-id]").length`); n != len(hosts) {
		t.Errorf("%d rows, want %d", n, len(hosts))
	}
	// The agents connect: the page shows them online without a reload.
	for _, h := range hosts {
		f.startAgent(h.name)
	}
	waitOnline(b, "web-1", "web-2", "db-1")
}

func TestHeartbeatUpdatesRow(t *testing.T) {
	f := newFleet(t, twoHosts(), fleetOptions{})
	b := newBrowser(t, 1400, 900)
	b.login(f.url())
	waitOnline(b, "web-1")
	status := js(rowSel("web-1") + ` [data-field="status"]`)
	beat := `(() => { const s = document.querySelector(` + status + `); return s.classList.contains("beat-a") ? "a" : s.classList.contains("beat-b") ? "b" : ""; })()`
	// Each heartbeat flips the ripple class; two flips in a row mean two
	// heartbeats reached the row.
	first := evalT[string](b, beat)
	b.waitFor("a heartbeat", beat+` !== `+js(first)+` && `+beat+` !== ""`)
	second := evalT[string](b, beat)
	b.waitFor("another heartbeat", beat+` !== `+js(second))
	b.waitFor("metrics", `/^\d+%$/.test(document.querySelector(`+js(rowSel("web-1")+` [data-field="cpu-val"]`)+`).textContent.trim())`)
	b.waitFor("last seen", `document.querySelector(`+js(rowSel("web-1")+` [data-field="last-seen"]`)+`).dataset.level === "ok"`)
}

func TestKilledAgentGoesOffline(t *testing.T) {
	f := newFleet(t, twoHosts(), fleetOptions{})
	b := newBrowser(t, 1400, 900)
	b.login(f.url())
	waitOnline(b, "web-1", "web-2")
	f.stopAgent("web-2")
	b.waitFor("web-2 offline", hostState("web-2")+` === "offline"`)
	b.waitFor("web-2 card offline", `document.querySelector(`+js(cardSel("web-2"))+`).classList.contains("host-offline")`)
	if st := evalT[string](b, hostState("web-1")); st != "online" {
		t.Errorf("web-1 is %q after web-2's agent stopped, want online", st)
	}
}

func TestRefreshButtonUpdatesCompartments(t *testing.T) {
	f := newFleet(t, twoHosts(), fleetOptions{})
	b := newBrowser(t, 1400, 900)
	b.login(f.url())
	waitOnline(b, "web-1")
	row := rowSel("web-1")
	b.do(chromedp.Click(row + ` [data-field="name"]`)) // hover the row so the button shows
	b.do(chromedp.Click(row + ` [data-action="refresh"]`))
	b.waitFor("refresh finished", `!document.querySelector(`+js(row+` [data-action="refresh"]`)+`).classList.contains("loading")`)
	b.waitFor("git compartment status", `["ok","outdated","error"].includes(document.querySelector(`+js(row+` [data-compartment="git"]`)+`).dataset.status)`)
	title := evalT[string](b, `document.querySelector(`+js(row+` [data-compartment="git"]`)+`).title`)
	if strings.TrimSpace(title) == "" {
		t.Error("git compartment has no tooltip after refresh")
	}
	if k := evalT[string](b, `document.querySelector("#toast")?.dataset.kind ?? ""`); k == "error" {
		t.Errorf("refresh showed an error toast: %s", b.eval(`document.querySelector("#toast").textContent`))
	}
}

func TestCommandLogLiveAndStop(t *testing.T) {
	hosts := []hostSpec{{name: "web-1", color: "#7aa2f7", tests: testPass}, {name: "slow-1", color: "#e0af68", tests: testSlow}}
	f := newFleet(t, hosts, fleetOptions{})
	b := newBrowser(t, 1400, 900)
	b.login(f.url())
	waitOnline(b, "web-1", "slow-1")

	menuCommand(b, "web-1", "test")
	b.waitFor("web-1 log tab", `document.querySelector('.log-tab[data-host-id="web-1"]') !== null`)
	b.waitFor("test output lines", `[...document.querySelectorAll("#log-body .log-line")].some(l => l.textContent.includes("configuration present"))`)
	b.waitFor("test completion", `[...document.querySelectorAll("#log-body .log-line")].some(l => l.textContent.includes("test succeeded"))`)
	b.waitFor("web-1 idle", hostState("web-1")+` === "online"`)

	menuCommand(b, "slow-1", "test")
	b.waitFor("slow-1 busy", hostState("slow-1")+` === "busy"`)
	b.waitFor("slow test line", `[...document.querySelectorAll("#log-body .log-line")].some(l => l.textContent.includes("slow test started"))`)
	if !strings.Contains(evalT[string](b, `document.querySelector(`+js(rowSel("slow-1")+` [data-field="badge"]`)+`).textContent`), "test") {
		t.Error("the busy host's badge does not name the running command")
	}
	menuCommand(b, "slow-1", "stop")
	b.waitFor("stopped", `[...document.querySelectorAll("#log-body .log-line")].some(l => /test (stopped|was stopped)/.test(l.textContent))`)
	b.waitFor("slow-1 idle", hostState("slow-1")+` === "online"`)
	if strings.Contains(evalT[string](b, logText), "slow test finished") {
		t.Error("the stopped test ran to its end")
	}
}

func TestHostAddedWhilePageOpen(t *testing.T) {
	f := newFleet(t, twoHosts(), fleetOptions{})
	b := newBrowser(t, 1400, 900)
	b.login(f.url())
	waitOnline(b, "web-1")
	evalT[bool](b, `window.__noReload = true`)
	f.addHost("late-1", "#9ece6a")
	b.waitFor("late-1 row", `document.querySelector(`+js(rowSel("late-1"))+`) !== null && document.querySelector(`+js(cardSel("late-1"))+`) !== null`)
	f.startAgent("late-1")
	b.waitFor("late-1 online", hostState("late-1")+` === "online"`)
	if !evalT[bool](b, `window.__noReload === true`) {
		t.Error("the page reloaded")
	}
	if n := evalT[int](b, `document.querySelectorAll("tr[data-host-id]").length`); n != 3 {
		t.Errorf("%d rows, want 3", n)
	}
}

func TestRecoversAfterServerRestart(t *testing.T) {
	f := newFleet(t, twoHosts(), fleetOptions{})
	b := newBrowser(t, 1400, 900)
	b.login(f.url())
	waitOnline(b, "web-1", "web-2")
	evalT[bool](b, `window.__noReload = true`)
	f.stopServer()
	b.waitFor("stream lost", `document.querySelector("#connection-state").dataset.state !== "open"`)
	// The footer tells how long until the next attempt, and which attempt.
	b.waitFor("the footer's reconnect countdown", `document.querySelector("#connection-state").dataset.state === "reconnecting" && /^Disconnected — reconnecting in \d+s \(attempt [1-9]\d*\)$/.test(document.querySelector("#connection-state").textContent)`)
	f.restartServer()
	b.waitOpen()
	// Data flows again: a host's heartbeat ripple flips after the restart.
	status := js(rowSel("web-1") + ` [data-field="status"]`)
	beat := `document.querySelector(` + status + `).className`
	before := evalT[string](b, beat)
	b.waitFor("a heartbeat after the restart", beat+` !== `+js(before))
	waitOnline(b, "web-1", "web-2")
	if !evalT[bool](b, `window.__noReload === true`) {
		t.Error("the page reloaded instead of resuming its stream")
	}
	// A host that stops after the restart still turns offline.
	f.stopAgent("web-2")
	b.waitFor("web-2 offline after restart", hostState("web-2")+` === "offline"`)
}

func TestHostileStringsRenderAsText(t *testing.T) {
	const img = `<img src=x onerror=alert(1)>`
	const script = `<script>alert(2)</script>`
	hosts := []hostSpec{{name: "web-1", color: "#7aa2f7", tests: map[string]string{
		"01-hostile.sh": "#!/bin/sh\necho '" + img + "'\necho '" + script + "'\n",
	}}}
	f := newFleet(t, hosts, fleetOptions{commitMessage: img + " fleet " + script})
	b := newBrowser(t, 1400, 900)
	b.login(f.url())
	waitOnline(b, "web-1")

	// The commit message arrives as the fleet target and the host's generation.
	b.waitFor("target message", `(document.querySelector("#target-message")?.textContent ?? "").includes(`+js(img)+`)`)
	b.waitFor("generation message", `(document.querySelector(`+js(rowSel("web-1")+` [data-field="generation"]`)+`)?.title ?? "").includes(`+js(img)+`)`)

	menuCommand(b, "web-1", "test")
	b.waitFor("hostile log lines", `[...document.querySelectorAll("#log-body .log-line")].some(l => l.textContent.includes(`+js(img)+`))`)
	b.waitFor("script log line", `[...document.querySelectorAll("#log-body .log-line")].some(l => l.textContent.includes(`+js(script)+`))`)
	b.waitFor("test completion", `[...document.querySelectorAll("#log-body .log-line")].some(l => l.textContent.includes("test succeeded"))`)

	if n := evalT[int](b, `document.querySelectorAll('img[src="x"]').length`); n != 0 {
		t.Errorf("%d <img src=x> elements were created from host strings", n)
	}
	if n := evalT[int](b, `[...document.querySelectorAll("script:not([type=\"application/json\"])")].filter(s => s.textContent.includes("alert(")).length`); n != 0 {
		t.Errorf("%d script elements carry host strings", n)
	}
	visible := evalT[string](b, `document.querySelector("#log-body").innerText`)
	if !strings.Contains(visible, img) || !strings.Contains(visible, script) {
		t.Errorf("the log panel does not show the hostile lines as text:\n%s", visible)
	}
	if d := b.dialogsOpened(); len(d) > 0 {
		t.Errorf("JavaScript dialogs opened: %q", d)
	}
}

func TestDashboardScreenshot(t *testing.T) {
	hosts := []hostSpec{
		{name: "web-1", color: "#7aa2f7", tests: testPass},
		{name: "web-2", color: "#7dcfff", tests: testPass},
		{name: "db-1", color: "#e0af68", tests: testFail},
		{name: "studio", color: "#9ece6a", tests: testSlow},
		{name: "mac-1", color: "#bb9af7", tests: testPass},
		{name: "pi-1", color: "#f7768e", tests: testPass},
	}
	// A flake.lock makes the Lock compartment a real comparison instead of
	// an error about the missing file.
	f := newFleet(t, hosts, fleetOptions{commitMessage: "hosts: enable nightly backups", files: map[string]string{"flake.lock": screenshotLock}})
	b := newBrowser(t, 1400, 900)
	b.login(f.url())
	waitOnline(b, "web-1", "web-2", "db-1", "studio", "mac-1", "pi-1")

	for _, h := range []string{"web-1", "web-2", "pi-1"} {
		b.do(chromedp.Click(rowSel(h) + ` [data-action="refresh"]`))
	}
	menuCommand(b, "db-1", "test")
	b.waitFor("db-1 tests failed", `document.querySelector(`+js(rowSel("db-1")+` [data-compartment="tests"]`)+`).dataset.status === "error"`)
	f.stopAgent("mac-1")
	b.waitFor("mac-1 offline", hostState("mac-1")+` === "offline"`)
	menuCommand(b, "studio", "test")
	b.waitFor("studio busy", hostState("studio")+` === "busy"`)
	b.waitFor("studio log", `[...document.querySelectorAll("#log-body .log-line")].some(l => l.textContent.includes("slow test started"))`)
	b.waitFor("refreshes done", `document.querySelectorAll('[data-action="refresh"].loading').length === 0`)
	b.waitFor("Lock checked on the online hosts", `[...document.querySelectorAll('#host-rows tr[data-state="online"] [data-compartment="lock"]')].every((e) => e.dataset.status === "ok")`)
	if bad := evalT[string](b, `[...document.querySelectorAll('#host-rows [data-compartment="agent"], #host-rows [data-compartment="git"], #host-rows [data-compartment="lock"]')].filter((e) => e.dataset.status === "error").map((e) => e.title).join("; ")`); bad != "" {
		t.Errorf("the screenshot would show compartments in error: %s", bad)
	}

	if os.Getenv("NIXPLANE_UPDATE_SCREENSHOT") == "1" {
		// The metrics are the test machine's own: give a busy machine a
		// while to calm down so the picture does not show every host
		// overloaded by accident, but take it anyway if it stays busy.
		calm := `document.querySelectorAll('#host-rows tr[data-state="online"] .metric-high, #host-rows tr[data-state="busy"] .metric-high').length === 0`
		if _, err := chromedp.Run(b.timeout(35*time.Second), chromedp.Poll[bool](calm, chromedp.WithPollingTimeout(30*time.Second))); err != nil {
			t.Logf("the machine stayed busy: the screenshot shows high CPU or RAM (%v)", err)
		}
	}
	shot, err := chromedp.Run(b.timeout(waitLong), chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	if len(shot) < 1000 || string(shot[1:4]) != "PNG" {
		t.Fatalf("screenshot is not a PNG (%d bytes)", len(shot))
	}
	if os.Getenv("NIXPLANE_UPDATE_SCREENSHOT") == "1" {
		out := filepath.Join("..", "..", "docs", "dashboard.png")
		if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(out, shot, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s (%d bytes)", out, len(shot))
	}
}

// screenshotLock is the fleet repository's flake.lock in the screenshot.
const screenshotLock = `{
  "nodes": {
    "nixpkgs": {
      "locked": {
        "lastModified": 1763500000,
        "narHash": "sha256-0000000000000000000000000000000000000000000=",
        "owner": "NixOS",
        "repo": "nixpkgs",
        "rev": "0123456789abcdef0123456789abcdef01234567",
        "type": "github"
      },
      "original": { "owner": "NixOS", "ref": "nixos-25.05", "repo": "nixpkgs", "type": "github" }
    },
    "root": { "inputs": { "nixpkgs": "nixpkgs" } }
  },
  "root": "root",
  "version": 7
}
`
