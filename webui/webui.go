// Package webui is the browser dashboard: the prebuilt script and stylesheet
// (built from webui/src by esbuild and committed under dist, so a Go build
// needs no Node) and the server-rendered pages. The dashboard's first paint
// is complete HTML — the whole host table and cards — so it shows the fleet
// before any script runs; the script then hydrates its store from the
// snapshot embedded in the page and keeps it live over one WatchFleet stream.
//
// The pages carry no inline script, style or event handler: they work under
// the strict Content-Security-Policy the server sends.
package webui

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"html/template"
	"io"
	"io/fs"
	"net/http"
	"path"
	"strings"
	"time"
	"unicode"

	"github.com/nixplane/nixplane/controlplane/status"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	"google.golang.org/protobuf/encoding/protojson"
)

//go:embed dist
var distFS embed.FS

//go:embed templates/*.html
var templateFS embed.FS

var (
	// assetFS is dist/ with the prefix removed.
	assetFS = mustSub(distFS, "dist")
	// assetVersion changes whenever the bundle changes; asset URLs carry it
	// so they can be cached for a year and still never go stale.
	assetVersion = hashAssets(assetFS, "app.js", "app.css")
	pages        = template.Must(template.New("").ParseFS(templateFS, "templates/*.html"))
)

func mustSub(f fs.FS, dir string) fs.FS {
	sub, err := fs.Sub(f, dir)
	if err != nil {
		panic(err)
	}
	return sub
}

func hashAssets(f fs.FS, names ...string) string {
	h := sha256.New()
	for _, n := range names {
		b, err := fs.ReadFile(f, n)
		if err != nil {
			panic(fmt.Sprintf("webui: embedded asset %s missing: %v", n, err))
		}
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:12]
}

// AssetVersion is the content hash the pages append to asset URLs
// (/assets/app.js?v=…); it changes with every rebuilt bundle.
func AssetVersion() string { return assetVersion }

// Assets serves the built bundle at /assets/ (strip prefix inside), with long cache headers.
func Assets() http.Handler {
	files := http.FileServerFS(assetFS)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		name := strings.TrimPrefix(r.URL.Path, "/assets/")
		if name == r.URL.Path || name == "" || strings.HasSuffix(name, "/") || path.Clean("/"+name) != "/"+name {
			http.NotFound(w, r)
			return
		}
		if _, err := fs.Stat(assetFS, name); err != nil {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Cache-Control", "public, max-age=31536000, immutable")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		r2 := r.Clone(r.Context())
		r2.URL.Path = "/" + name
		r2.URL.RawPath = ""
		files.ServeHTTP(w, r2)
	})
}

// DashboardData is what the server-rendered first paint shows.
type DashboardData struct {
	Snapshot  *fleetv1.Snapshot // hosts, target, pending PR, server version
	CSRFToken string
	User      string
}

// RenderDashboard writes the dashboard page: the full host table and cards rendered server-side (so the first paint needs no JS), with the data hydrate() reads.
func RenderDashboard(w io.Writer, d DashboardData) error {
	v, err := newDashboardView(d, time.Now())
	if err != nil {
		return err
	}
	return pages.ExecuteTemplate(w, "dashboard.html", v)
}

// LoginData is what the login page shows.
type LoginData struct {
	Error    string
	Username string
	Next     string
}

// RenderLogin writes the login page (form POST /login with fields username, password, totp, next).
func RenderLogin(w io.Writer, d LoginData) error {
	return pages.ExecuteTemplate(w, "login.html", struct {
		LoginData
		AssetVersion string
	}{d, assetVersion})
}

// dashboardView is the dashboard template's data.
type dashboardView struct {
	CSRFToken     string
	User          string
	AssetVersion  string
	ServerTime    string
	ServerVersion string
	// SnapshotJSON is the snapshot as protojson; html/template escapes it
	// for the <script type="application/json"> element it sits in.
	SnapshotJSON json.RawMessage
	Target       targetView
	PR           *prView
	PRStatus     prStatusView
	Hosts        []hostView
	Blank        hostView
	Online       int
}

type targetView struct {
	Commit  string
	Full    string
	Message string
	Branch  string
	Age     string
	Error   string
	Source  string
}

type prView struct {
	Number    int32
	Title     string
	URL       string
	Mergeable bool
	// MenuTitle is the Merge & Deploy entry's tooltip.
	MenuTitle string
	// LockLines are added to the Lock compartment's tooltip.
	LockLines []string
}

// prStatusView is the status line next to Bulk Actions while looking for
// pull requests fails; Text is empty when it is hidden.
type prStatusView struct {
	Text  string // Error + " " + Since
	Error string // "Pull requests: ERROR", shortened on screen when long
	Since string // "· last success 5m ago", always shown whole
	Title string
}

func newDashboardView(d DashboardData, now time.Time) (*dashboardView, error) {
	snap := d.Snapshot
	if snap == nil {
		snap = &fleetv1.Snapshot{}
	}
	js, err := protojson.MarshalOptions{}.Marshal(snap)
	if err != nil {
		return nil, fmt.Errorf("webui: encode snapshot: %w", err)
	}
	if len(js) == 0 {
		js = []byte("{}")
	}
	v := &dashboardView{
		CSRFToken:     d.CSRFToken,
		User:          d.User,
		AssetVersion:  assetVersion,
		ServerTime:    now.UTC().Format(time.RFC3339Nano),
		ServerVersion: snap.GetServerVersion(),
		SnapshotJSON:  json.RawMessage(js),
	}
	if t := snap.GetTarget(); t != nil {
		v.Target = targetView{
			Commit:  shortHash(t.GetGitCommit()),
			Full:    t.GetGitCommit(),
			Message: t.GetMessage(),
			Branch:  t.GetBranch(),
			Error:   t.GetError(),
			Source:  t.GetSource(),
		}
		if ts := t.GetCommittedAt(); ts != nil && ts.IsValid() {
			v.Target.Age = formatAge(now.Sub(ts.AsTime()))
		}
	}
	v.PR, v.PRStatus = pullRequestsView(snap, now)
	running := map[string]*fleetv1.Command{}
	for _, c := range snap.GetActiveCommands() {
		running[c.GetHostId()] = c
	}
	for _, h := range sortedHosts(snap.GetHosts()) {
		if h.GetHostId() == "" {
			continue
		}
		cmd := h.GetRunningCommand()
		if cmd == nil || status.IsTerminal(cmd.GetState()) {
			cmd = running[h.GetHostId()]
		}
		hv := newHostView(h, cmd, v.PR, snap.GetServerVersion(), now)
		if hv.Online {
			v.Online++
		}
		v.Hosts = append(v.Hosts, hv)
	}
	v.Blank = newHostView(&fleetv1.Host{}, nil, nil, "", now)
	return v, nil
}

// prErrorInline is the longest poll error shown inline, in characters; the
// tooltip holds all of it. It matches PR_ERROR_INLINE in src/model.ts.
const prErrorInline = 160

// pullRequestsView mirrors renderPullRequests in src/render.ts: nothing
// unless PR support is configured; the pending PR for Bulk Actions and the
// Lock compartments; while looking fails, a status line with the error and
// the last success.
func pullRequestsView(snap *fleetv1.Snapshot, now time.Time) (*prView, prStatusView) {
	if !snap.GetPullRequestsConfigured() {
		return nil, prStatusView{}
	}
	errText := strings.TrimSpace(snap.GetPullRequestsError())
	var last time.Time
	if ts := snap.GetPullRequestsCheckedAt(); ts != nil && ts.IsValid() && ts.AsTime().UnixMilli() > 0 {
		last = ts.AsTime()
	}
	var pr *prView
	if p := snap.GetPendingPr(); p != nil && p.GetNumber() != 0 {
		pr = &prView{Number: p.GetNumber(), Title: p.GetTitle(), URL: p.GetUrl(), Mergeable: p.GetMergeable()}
		pr.MenuTitle = pr.Title
		if !pr.Mergeable {
			pr.MenuTitle += " (cannot be merged)"
		}
		pr.LockLines = []string{fmt.Sprintf("Pending PR #%d: %s", pr.Number, pr.Title)}
		if errText != "" {
			pr.MenuTitle += "\nLast known pull request: looking for pull requests fails (" + errText + ")"
			pr.LockLines = append(pr.LockLines, "(last known: pull requests cannot be checked now)")
		}
	}
	if errText == "" {
		return pr, prStatusView{}
	}
	since := "· no success yet"
	lines := []string{"Looking for pull requests failed:", errText}
	if last.IsZero() {
		lines = append(lines, "No look has succeeded yet.")
	} else {
		since = "· last success " + ago(last, now)
		lines = append(lines, fmt.Sprintf("Last success: %s (%s)", last.UTC().Format("2006-01-02T15:04:05.000Z"), ago(last, now)))
	}
	if pr != nil {
		lines = append(lines, fmt.Sprintf("Last known pull request: #%d %s", pr.Number, pr.Title))
	} else {
		lines = append(lines, "No pull request was pending at the last success.")
	}
	msg := "Pull requests: " + oneLine(errText, prErrorInline)
	return pr, prStatusView{Text: msg + " " + since, Error: msg, Since: since, Title: strings.Join(lines, "\n")}
}

// oneLine folds whitespace and control characters into single spaces and
// shortens s to max characters, as oneLine in src/model.ts does.
func oneLine(s string, maxChars int) string {
	var b strings.Builder
	space := false
	for _, r := range s {
		if unicode.IsSpace(r) || unicode.IsControl(r) {
			space = true
			continue
		}
		if space && b.Len() > 0 {
			b.WriteByte(' ')
		}
		space = false
		b.WriteRune(r)
	}
	flat := []rune(b.String())
	if len(flat) <= maxChars {
		return string(flat)
	}
	return strings.TrimRightFunc(string(flat[:maxChars-1]), unicode.IsSpace) + "…"
}
