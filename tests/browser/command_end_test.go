package browser

import (
	"strings"
	"testing"
)

// logHeader is the text of the log panel's section header for the newest
// command of the shown tab.
const logHeader = `([...document.querySelectorAll("#log-body .log-section")].pop()?.textContent ?? "")`

// TestMenuTestShowsCompletion starts test from a host's ⋮ menu and waits for
// the log section header to show the command's final state and for the
// completion toast; the server ends the command on its own.
func TestMenuTestShowsCompletion(t *testing.T) {
	f := newFleet(t, twoHosts(), fleetOptions{})
	b := newBrowser(t, 1400, 900)
	b.login(f.url())
	waitOnline(b, "web-1")

	menuCommand(b, "web-1", "test")
	b.waitFor("web-1 log tab", `document.querySelector('.log-tab[data-host-id="web-1"]') !== null`)
	b.waitFor("test output", logText+`.includes("configuration present")`)
	b.waitFor("section header shows the final state", logHeader+`.includes("· succeeded")`)
	b.waitFor("completion toast", `(() => { const t = document.querySelector("#toast"); return t && !t.hidden && t.textContent.includes("test on web-1: succeeded"); })()`)
	if k := evalT[string](b, `document.querySelector("#toast").dataset.kind`); k != "ok" {
		t.Errorf("completion toast kind %q, want ok", k)
	}
	b.waitFor("web-1 idle", hostState("web-1")+` === "online"`)
	if h := evalT[string](b, logHeader); strings.Contains(h, "running") {
		t.Errorf("section header still says running: %q", h)
	}
}
