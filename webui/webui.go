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
	if pr := snap.GetPendingPr(); pr != nil && pr.GetNumber() != 0 {
		v.PR = &prView{Number: pr.GetNumber(), Title: pr.GetTitle(), URL: pr.GetUrl(), Mergeable: pr.GetMergeable()}
	}
	running := map[string]*fleetv1.Command{}
	for _, c := range snap.GetActiveCommands() {
		running[c.GetHostId()] = c
	}
	for _, h := range sortedHosts(snap.GetHosts()) {
		if h.GetHostId() == "" {
			continue
		}
		cmd := h.GetRunningCommand()
		if cmd == nil || isTerminal(cmd.GetState()) {
			cmd = running[h.GetHostId()]
		}
		hv := newHostView(h, cmd, v.PR != nil, snap.GetServerVersion(), now)
		if hv.Online {
			v.Online++
		}
		v.Hosts = append(v.Hosts, hv)
	}
	v.Blank = newHostView(&fleetv1.Host{}, nil, false, "", now)
	return v, nil
}
