package browser

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"

	"github.com/nixplane/nixplane/agent"
	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/fleetapi"
	"github.com/nixplane/nixplane/controlplane/store"
	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

const (
	chromiumPath  = "/usr/bin/chromium"
	adminPassword = "browser-test-pw"
	waitLong      = 30 * time.Second
)

// hostSpec describes one test host and the tests in its fleet directory.
type hostSpec struct {
	name  string
	color string
	// tests maps a file name under hosts/<name>/tests/ to its script body.
	tests map[string]string
}

// fleet is a running server, its fleet repository and its agents.
type fleet struct {
	t       testing.TB
	dir     string
	dataDir string
	origin  string
	work    string
	rebuild string
	addr    string
	token   string // admin API token
	log     *slog.Logger

	mu       sync.Mutex
	agents   map[string]context.CancelFunc
	agentWG  sync.WaitGroup
	stopSrv  context.CancelFunc
	srvDone  chan error
	hostToks map[string]string
}

// fleetOptions tune newFleet.
type fleetOptions struct {
	// commitMessage is the fleet repository's first commit message.
	commitMessage string
	// noAgents registers the hosts but starts no agents.
	noAgents bool
	// bareHosts are registered in the store only: no repository files and
	// no agent (for load tests with many hosts).
	bareHosts []string
	// files are more files of the fleet repository's first commit, by path.
	files map[string]string
}

const rebuildScript = `#!/bin/sh
echo "building the system configuration ($*)"
for i in 1 2 3; do echo "building unit $i/3"; sleep 0.2; done
echo "switch done"
`

func gitRun(t testing.TB, dir string, args ...string) {
	t.Helper()
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=test", "GIT_AUTHOR_EMAIL=test@nixplane.invalid",
		"GIT_COMMITTER_NAME=test", "GIT_COMMITTER_EMAIL=test@nixplane.invalid", "GIT_TERMINAL_PROMPT=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("git %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func writeFile(t testing.TB, path, body string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(body), mode); err != nil {
		t.Fatal(err)
	}
}

// newFleet creates the fleet repository, registers the hosts, starts the
// server and (unless opts.noAgents) one agent per host.
func newFleet(t testing.TB, hosts []hostSpec, opts fleetOptions) *fleet {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git is not installed")
	}
	dir := t.TempDir()
	f := &fleet{t: t, dir: dir, dataDir: filepath.Join(dir, "server"), origin: filepath.Join(dir, "fleet.git"),
		work: filepath.Join(dir, "fleet"), rebuild: filepath.Join(dir, "rebuild"), agents: map[string]context.CancelFunc{},
		hostToks: map[string]string{}}
	level := slog.LevelWarn
	if os.Getenv("NIXPLANE_TEST_LOG") != "" {
		level = slog.LevelDebug
	}
	f.log = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: level}))
	writeFile(t, f.rebuild, rebuildScript, 0o755)

	// Fleet repository: a bare origin and a work tree pushing to it.
	gitRun(t, dir, "init", "--quiet", "--bare", "--initial-branch=main", f.origin)
	gitRun(t, dir, "init", "--quiet", "--initial-branch=main", f.work)
	writeFile(t, filepath.Join(f.work, "flake.nix"), "{ outputs = { self }: { }; }\n", 0o644)
	for _, h := range hosts {
		f.writeHostFiles(h)
	}
	for p, body := range opts.files {
		writeFile(t, filepath.Join(f.work, p), body, 0o644)
	}
	msg := opts.commitMessage
	if msg == "" {
		msg = "Initial fleet configuration"
	}
	gitRun(t, f.work, "add", "-A")
	gitRun(t, f.work, "commit", "--quiet", "-m", msg)
	gitRun(t, f.work, "remote", "add", "origin", f.origin)
	gitRun(t, f.work, "push", "--quiet", "origin", "main")

	// Hosts and an admin API token, written before the server starts.
	ctx := context.Background()
	st, err := controlplane.OpenStore(ctx, f.dataDir)
	if err != nil {
		t.Fatal(err)
	}
	tok, secret, err := fleetapi.NewAPIToken("browser-test", adminv1.Scope_SCOPE_ADMIN, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.CreateAPIToken(ctx, tok); err != nil {
		t.Fatal(err)
	}
	f.token = secret
	for _, h := range hosts {
		rec, htok, err := fleetapi.NewHost(&fleetv1.AddHostRequest{Hostname: h.name, HostType: typesv1.HostType_HOST_TYPE_NIXOS,
			Location: "cloud", DeviceType: "server", ThemeColor: h.color})
		if err != nil {
			t.Fatal(err)
		}
		if err := st.CreateHost(ctx, store.Host{ID: rec.HostId, Record: rec, CreatedAt: time.Now()}, auth.HashSecret(htok)); err != nil {
			t.Fatal(err)
		}
		f.hostToks[h.name] = htok
	}
	for _, name := range opts.bareHosts {
		rec, _, err := fleetapi.NewHost(&fleetv1.AddHostRequest{Hostname: name, HostType: typesv1.HostType_HOST_TYPE_NIXOS,
			Location: "cloud", DeviceType: "server"})
		if err != nil {
			t.Fatal(err)
		}
		if err := st.CreateHost(ctx, store.Host{ID: rec.HostId, Record: rec, CreatedAt: time.Now()}, auth.HashSecret(name+"-unused-token")); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}

	f.startServer("127.0.0.1:0")
	t.Cleanup(f.shutdown)
	if !opts.noAgents {
		for _, h := range hosts {
			f.startAgent(h.name)
		}
	}
	return f
}

func (f *fleet) writeHostFiles(h hostSpec) {
	writeFile(f.t, filepath.Join(f.work, "hosts", h.name, "configuration.nix"),
		"{ ... }: { networking.hostName = \""+h.name+"\"; }\n", 0o644)
	tests := h.tests
	if tests == nil {
		tests = map[string]string{"01-config-present.sh": "#!/bin/sh\necho 'configuration present'\n"}
	}
	for name, body := range tests {
		writeFile(f.t, filepath.Join(f.work, "hosts", h.name, "tests", name), body, 0o755)
	}
}

// commit commits every change in the work tree and pushes it to the origin.
func (f *fleet) commit(msg string) {
	gitRun(f.t, f.work, "add", "-A")
	gitRun(f.t, f.work, "commit", "--quiet", "--allow-empty", "-m", msg)
	gitRun(f.t, f.work, "push", "--quiet", "origin", "main")
}

// startServer runs controlplane.Run on listen and waits until it serves.
func (f *fleet) startServer(listen string) {
	f.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- controlplane.Run(ctx, controlplane.Config{Listen: listen, DataDir: f.dataDir, AdminPassword: adminPassword,
			Version: "0.1.0", FleetRepo: f.origin, Branch: "main", TargetPoll: time.Hour, LastSeenFlush: time.Second,
			Out: io.Discard, Log: f.log.With("component", "server"), Ready: func(a string) { ready <- a }})
	}()
	select {
	case a := <-ready:
		f.addr = a
	case err := <-done:
		cancel()
		f.t.Fatalf("server did not start: %v", err)
	case <-time.After(waitLong):
		cancel()
		f.t.Fatal("server did not become ready")
	}
	f.stopSrv, f.srvDone = cancel, done
}

// stopServer ends the server and waits for Run to return.
func (f *fleet) stopServer() {
	f.t.Helper()
	if f.stopSrv == nil {
		return
	}
	f.stopSrv()
	select {
	case err := <-f.srvDone:
		if err != nil {
			f.t.Logf("server ended: %v", err)
		}
	case <-time.After(waitLong):
		f.t.Error("server did not stop")
	}
	f.stopSrv = nil
}

// restartServer stops the server and starts it again on the same address
// and data directory.
func (f *fleet) restartServer() {
	f.t.Helper()
	addr := f.addr
	f.stopServer()
	deadline := time.Now().Add(waitLong)
	for {
		// The port may stay briefly busy; retry until the deadline.
		ctx, cancel := context.WithCancel(context.Background())
		ready := make(chan string, 1)
		done := make(chan error, 1)
		go func() {
			done <- controlplane.Run(ctx, controlplane.Config{Listen: addr, DataDir: f.dataDir, AdminPassword: adminPassword,
				Version: "0.1.0", FleetRepo: f.origin, Branch: "main", TargetPoll: time.Hour, LastSeenFlush: time.Second,
				Out: io.Discard, Log: f.log.With("component", "server"), Ready: func(a string) { ready <- a }})
		}()
		select {
		case <-ready:
			f.stopSrv, f.srvDone = cancel, done
			return
		case err := <-done:
			cancel()
			if time.Now().After(deadline) {
				f.t.Fatalf("server did not restart on %s: %v", addr, err)
			}
			time.Sleep(100 * time.Millisecond) // retry pacing for a busy port, not a state wait
		case <-time.After(waitLong):
			cancel()
			f.t.Fatal("restarted server did not become ready")
		}
	}
}

func (f *fleet) url() string { return "http://" + f.addr }

// startAgent runs the named host's agent in the test process.
func (f *fleet) startAgent(name string) {
	f.t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	tokPath := filepath.Join(f.dir, "agents", name, "token")
	writeFile(f.t, tokPath, f.hostToks[name]+"\n", 0o600)
	cfg := agent.Config{Server: f.url(), Hostname: name, TokenFile: tokPath, RepoURL: f.origin, Branch: "main",
		StateDir: filepath.Join(f.dir, "agents", name), Interval: time.Second, HostType: typesv1.HostType_HOST_TYPE_NIXOS,
		Location: "cloud", DeviceType: "server", RebuildCommand: f.rebuild, RebootCommand: []string{"true"},
		Version: "0.1.0", NixCommand: filepath.Join(f.dir, "no-nix"),
		BackoffInitial: 100 * time.Millisecond, BackoffMax: 500 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	f.agents[name] = cancel
	log := f.log.With("agent", name)
	f.agentWG.Add(1)
	go func() {
		defer f.agentWG.Done()
		if err := agent.Run(ctx, cfg, log); err != nil && ctx.Err() == nil {
			log.Warn("agent ended", "err", err)
		}
	}()
}

// stopAgent cancels the named host's agent.
func (f *fleet) stopAgent(name string) {
	f.mu.Lock()
	cancel := f.agents[name]
	delete(f.agents, name)
	f.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

func (f *fleet) shutdown() {
	f.mu.Lock()
	for _, c := range f.agents {
		c()
	}
	f.agents = map[string]context.CancelFunc{}
	f.mu.Unlock()
	f.agentWG.Wait()
	f.stopServer()
}

// addHost registers a host through the REST API with the admin token and
// returns its agent token.
func (f *fleet) addHost(name, color string) {
	f.t.Helper()
	body := fmt.Sprintf(`{"hostname":%q,"host_type":"HOST_TYPE_NIXOS","location":"home","device_type":"laptop","theme_color":%q}`, name, color)
	req, err := http.NewRequest(http.MethodPost, f.url()+"/api/hosts", strings.NewReader(body))
	if err != nil {
		f.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+f.token)
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	if res.StatusCode != http.StatusOK {
		f.t.Fatalf("POST /api/hosts: %s: %s", res.Status, b)
	}
	var out struct {
		AgentToken string `json:"agent_token"`
	}
	if err := json.Unmarshal(b, &out); err != nil || out.AgentToken == "" {
		f.t.Fatalf("POST /api/hosts: no agent token in %s (%v)", b, err)
	}
	f.mu.Lock()
	f.hostToks[name] = out.AgentToken
	f.mu.Unlock()
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// browser is one Chromium tab.
type browser struct {
	t   testing.TB
	ctx context.Context

	mu      sync.Mutex
	dialogs []string
}

// newBrowser starts Chromium with a fresh profile at the given window size.
func newBrowser(t testing.TB, width, height int) *browser {
	t.Helper()
	if _, err := os.Stat(chromiumPath); err != nil {
		if os.Getenv("NIXPLANE_REQUIRE_BROWSER") == "1" {
			t.Fatalf("NIXPLANE_REQUIRE_BROWSER=1 but %s is missing: %v", chromiumPath, err)
		}
		t.Skipf("%s is missing (install chromium; set NIXPLANE_REQUIRE_BROWSER=1 to make this fatal)", chromiumPath)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromiumPath), chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun,
		chromedp.UserDataDir(t.TempDir()), chromedp.WindowSize(width, height),
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true), chromedp.Flag("disable-dev-shm-usage", true))
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(func() { cancel(); cancelAlloc() })
	b := &browser{t: t, ctx: ctx}
	if err := chromedp.Listen(ctx, func(ev any) {
		if d, ok := ev.(*page.EventJavascriptDialogOpening); ok {
			b.mu.Lock()
			b.dialogs = append(b.dialogs, d.Message)
			b.mu.Unlock()
			// Close it from another goroutine so the page does not hang.
			go func() {
				_, _ = chromedp.Call(ctx, page.HandleJavaScriptDialog, page.HandleJavaScriptDialogParams{Accept: false})
			}()
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := chromedp.Do(b.timeout(waitLong), chromedp.EmulateViewport(int64(width), int64(height))); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	return b
}

func (b *browser) timeout(d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(b.ctx, d)
	b.t.Cleanup(cancel)
	return ctx
}

// do runs steps with a deadline.
func (b *browser) do(steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	if err := chromedp.Do(b.timeout(waitLong), steps...); err != nil {
		b.t.Fatalf("browser: %v", err)
	}
}

// waitFor polls a JavaScript expression until it is truthy. A poll that a
// navigation interrupts starts again.
func (b *browser) waitFor(what, expr string) {
	b.t.Helper()
	deadline := time.Now().Add(waitLong)
	for {
		left := time.Until(deadline)
		_, err := chromedp.Run(b.timeout(left+5*time.Second),
			chromedp.Poll[bool](expr, chromedp.WithPollingTimeout(left), chromedp.WithPollingInterval(50*time.Millisecond)))
		if err == nil {
			return
		}
		if (strings.Contains(err.Error(), "navigated or closed") || strings.Contains(err.Error(), "Cannot find context")) && time.Now().Before(deadline) {
			continue
		}
		b.t.Fatalf("waiting for %s (%s): %v\npage: %s", what, expr, err, b.eval(`document.body ? document.body.innerText.slice(0, 3000) : ""`))
	}
}

// eval evaluates expr and returns its value as JSON-ish text, for messages.
func (b *browser) eval(expr string) string {
	v, err := chromedp.Run(b.timeout(10*time.Second), chromedp.Evaluate[any](expr))
	if err != nil {
		return "<" + err.Error() + ">"
	}
	return fmt.Sprint(v)
}

// evalT evaluates expr into T.
func evalT[T any](b *browser, expr string) T {
	b.t.Helper()
	v, err := chromedp.Run(b.timeout(waitLong), chromedp.Evaluate[T](expr, chromedp.EvalAwaitPromise))
	if err != nil {
		b.t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// loginForm opens the login page, fills the form, submits it and waits
// for the fleet stream.
func (b *browser) loginForm(base string) {
	b.t.Helper()
	b.do(chromedp.Navigate(base+"/login"),
		chromedp.WaitVisible("#login-form"),
		chromedp.SendKeys("#username", "admin"),
		chromedp.SendKeys("#password", adminPassword),
		chromedp.Submit("#login-form"))
	b.waitFor("the dashboard or a login error", `document.querySelector("#connection-state") !== null || document.querySelector("#login-error") !== null`)
	if msg := evalT[string](b, `document.querySelector("#login-error")?.textContent ?? ""`); msg != "" {
		b.t.Fatalf("login form refused: %q", msg)
	}
	b.waitOpen()
}

// login posts the login page's form fields from the page with fetch (which
// sends the page's real Origin) and opens the dashboard.
func (b *browser) login(base string) {
	b.t.Helper()
	b.do(chromedp.Navigate(base+"/login"), chromedp.WaitVisible("#login-form"))
	st := evalT[int](b, `fetch("/login", {method: "POST", body: new URLSearchParams({username: "admin", password: `+js(adminPassword)+`, totp: "", next: "/"})}).then(r => r.status)`)
	if st != 200 {
		b.t.Fatalf("POST /login: status %d", st)
	}
	b.do(chromedp.Navigate(base + "/"))
	b.waitOpen()
}

func (b *browser) waitOpen() {
	b.t.Helper()
	b.waitFor("the fleet stream to open", `document.querySelector('#connection-state[data-state="open"]') !== null`)
}

func (b *browser) dialogsOpened() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.dialogs...)
}

// js quotes s as a JavaScript string literal.
func js(s string) string {
	q, _ := json.Marshal(s)
	return string(q)
}

func rowSel(id string) string  { return `tr[data-host-id=` + js(id) + `]` }
func cardSel(id string) string { return `.host-card[data-host-id=` + js(id) + `]` }

// hostState is the expression for a row's data-state.
func hostState(id string) string {
	return `(document.querySelector(` + js(rowSel(id)) + `)?.dataset.state ?? "")`
}
