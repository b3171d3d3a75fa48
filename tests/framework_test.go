package tests

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/nixplane/nixplane/controlplane/status"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// Deadlines. They are generous because the suite runs on loaded 2-core
// machines under -race; every wait still fails when its state never comes.
const (
	startTimeout   = 30 * time.Second
	stateTimeout   = 20 * time.Second
	commandTimeout = 30 * time.Second
	stopTimeout    = 20 * time.Second
	adminPassword  = "e2e-admin-password"
)

// bins holds the paths of the binaries TestMain built.
var bins struct {
	nixplane, agent string
}

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "nixplane-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	for _, tool := range []string{"go", "git", "sh"} {
		if _, err := exec.LookPath(tool); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: %s is required on PATH: %v\n", tool, err)
			return 1
		}
	}
	bins.nixplane = filepath.Join(dir, "nixplane")
	bins.agent = filepath.Join(dir, "nixplane-agent")
	for _, b := range []struct{ out, pkg, cgo string }{
		{bins.nixplane, "./cmd/nixplane", "1"},
		{bins.agent, "./cmd/nixplane-agent", "0"},
	} {
		cmd := exec.Command("go", "build", "-o", b.out, b.pkg)
		cmd.Dir = ".."
		cmd.Env = append(os.Environ(), "CGO_ENABLED="+b.cgo)
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: go build %s: %v\n%s", b.pkg, err, out)
			return 1
		}
	}
	return m.Run()
}

// baseEnv is the environment for child processes: the test's own, without
// any NIXPLANE_* setting that could leak in, with a fixed git identity.
func baseEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "NIXPLANE_") && !strings.HasPrefix(kv, "GIT_") {
			env = append(env, kv)
		}
	}
	env = append(env,
		"GIT_AUTHOR_NAME=nixplane e2e", "GIT_AUTHOR_EMAIL=e2e@nixplane.invalid",
		"GIT_COMMITTER_NAME=nixplane e2e", "GIT_COMMITTER_EMAIL=e2e@nixplane.invalid",
		"GIT_TERMINAL_PROMPT=0", "GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null")
	return append(env, extra...)
}

// waitFor polls cond until it reports true, failing the test with cond's
// last message when timeout passes first.
func waitFor(t testing.TB, timeout time.Duration, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, msg := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not reached within %s: %s", timeout, msg)
		}
		<-tick.C
	}
}

// logBuffer collects a child process's output for the test log and lets
// callers wait for a line matching a pattern.
type logBuffer struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	partial []byte
	waiters []logWaiter
}

type logWaiter struct {
	re *regexp.Regexp
	ch chan []string
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	l.partial = append(l.partial, p...)
	for {
		i := bytes.IndexByte(l.partial, '\n')
		if i < 0 {
			break
		}
		line := string(l.partial[:i])
		l.partial = l.partial[i+1:]
		kept := l.waiters[:0]
		for _, w := range l.waiters {
			if m := w.re.FindStringSubmatch(line); m != nil {
				w.ch <- m
				continue
			}
			kept = append(kept, w)
		}
		l.waiters = kept
	}
	return len(p), nil
}

// expect registers a waiter for the next line matching re.
func (l *logBuffer) expect(re *regexp.Regexp) <-chan []string {
	ch := make(chan []string, 1)
	l.mu.Lock()
	l.waiters = append(l.waiters, logWaiter{re: re, ch: ch})
	l.mu.Unlock()
	return ch
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// process is a running child process.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

func startProcess(name string, args, env []string, out io.Writer) (*process, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = env
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *process) signal(sig syscall.Signal) error {
	if p.exited() {
		return fmt.Errorf("process %d has exited: %v", p.cmd.Process.Pid, p.err)
	}
	return p.cmd.Process.Signal(sig)
}

// terminate sends sig and waits for the exit, killing the process when it
// does not end within stopTimeout. It reports whether sig alone ended it.
func (p *process) terminate(sig syscall.Signal) bool {
	if p.exited() {
		return true
	}
	_ = p.cmd.Process.Signal(syscall.SIGCONT) // a frozen process cannot handle sig
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return true
	case <-time.After(stopTimeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		return false
	}
}

// cliResult is the outcome of one nixplane command-line run.
type cliResult struct {
	stdout, stderr string
	code           int
}

// runCLI runs the nixplane binary with args and extra environment.
func runCLI(t testing.TB, env []string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bins.nixplane, args...)
	cmd.Env = baseEnv(env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := cliResult{stdout: stdout.String(), stderr: stderr.String()}
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("run nixplane %s: %v", strings.Join(args, " "), err)
		}
		res.code = ee.ExitCode()
	}
	return res
}

// singleLine returns s's only line, failing when s is not exactly one
// non-empty newline-terminated line.
func singleLine(t testing.TB, what, s string) string {
	t.Helper()
	if !strings.HasSuffix(s, "\n") || strings.Count(s, "\n") != 1 || strings.TrimSpace(s) == "" {
		t.Fatalf("%s: stdout must be exactly one line, got %q", what, s)
	}
	line := strings.TrimSuffix(s, "\n")
	if strings.TrimSpace(line) != line || strings.ContainsAny(line, " \t") {
		t.Fatalf("%s: stdout line must hold the secret alone, got %q", what, line)
	}
	return line
}

// Server is a nixplane server run as a child process with its own data
// directory. It can be stopped and started again on the same data
// directory and port.
type Server struct {
	t       testing.TB
	DataDir string
	// Addr is host:port and URL http://host:port of the one port.
	Addr, URL string
	// AdminToken is an admin-scope API token created with the CLI before
	// the first start.
	AdminToken string

	log    *logBuffer
	proc   *process
	client *http.Client
	webTr  *http.Transport
	// extraArgs are appended to every "nixplane serve" of this server.
	extraArgs []string
}

var listenRE = regexp.MustCompile(`msg="nixplane serving" addr=(\S+)`)

// StartServer creates a data directory with an admin token and starts the
// server on 127.0.0.1:0. The server is stopped when the test ends; its log
// is printed when the test failed.
func StartServer(t testing.TB) *Server {
	t.Helper()
	return StartServerWith(t)
}

// StartServerWith is [StartServer] with extra "nixplane serve" flags, e.g.
// --fleet-repo; they are kept for restarts.
func StartServerWith(t testing.TB, extraArgs ...string) *Server {
	t.Helper()
	s := &Server{t: t, DataDir: t.TempDir(), log: &logBuffer{}, extraArgs: extraArgs}
	res := runCLI(t, nil, "tokens", "create", "e2e-admin", "--scope", "admin", "--data-dir", s.DataDir)
	if res.code != 0 {
		t.Fatalf("tokens create: exit %d: %s", res.code, res.stderr)
	}
	s.AdminToken = singleLine(t, "tokens create", res.stdout)
	tr := &http.Transport{MaxIdleConnsPerHost: 4, ResponseHeaderTimeout: 30 * time.Second}
	s.client = &http.Client{Transport: tr, Timeout: 60 * time.Second}
	s.webTr = &http.Transport{MaxIdleConnsPerHost: 4}
	t.Cleanup(func() {
		s.Stop()
		tr.CloseIdleConnections()
		s.webTr.CloseIdleConnections()
		if t.Failed() {
			t.Logf("server log (%s):\n%s", s.DataDir, s.log.String())
		}
	})
	s.start("127.0.0.1:0")
	return s
}

func (s *Server) start(listen string) {
	t := s.t
	t.Helper()
	var lastErr string
	// The port of an earlier run may need a moment to become free again.
	for attempt := 0; attempt < 20; attempt++ {
		ready := s.log.expect(listenRE)
		p, err := startProcess(bins.nixplane, append([]string{"serve", "--listen", listen, "--data-dir", s.DataDir}, s.extraArgs...),
			baseEnv("NIXPLANE_ADMIN_PASSWORD="+adminPassword), s.log)
		if err != nil {
			t.Fatalf("start nixplane serve: %v", err)
		}
		select {
		case m := <-ready:
			s.proc = p
			s.Addr = m[1]
			s.URL = "http://" + s.Addr
			return
		case <-p.done:
			lastErr = fmt.Sprintf("exited: %v", p.err)
			if !strings.Contains(s.log.String(), "address already in use") {
				t.Fatalf("nixplane serve %s: %s\n%s", listen, lastErr, s.log.String())
			}
			time.Sleep(250 * time.Millisecond) // back-off before retrying the bind, not a state wait
		case <-time.After(startTimeout):
			p.terminate(syscall.SIGKILL)
			t.Fatalf("nixplane serve did not log its listen address within %s:\n%s", startTimeout, s.log.String())
		}
	}
	t.Fatalf("nixplane serve could not listen on %s: %s", listen, lastErr)
}

// Stop ends the server with SIGTERM and waits for it; it fails the test
// when the server needed SIGKILL or exited with an error.
func (s *Server) Stop() {
	if s.proc == nil {
		return
	}
	clean := s.proc.terminate(syscall.SIGTERM)
	err := s.proc.err
	s.proc = nil
	s.client.CloseIdleConnections()
	s.webTr.CloseIdleConnections()
	if !clean {
		s.t.Errorf("server did not stop within %s of SIGTERM", stopTimeout)
	} else if err != nil {
		s.t.Errorf("server exited with %v after SIGTERM", err)
	}
}

// Restart stops the server and starts it again on the same data directory
// and the same port.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	s.start(s.Addr)
}

// restResponse is one REST answer.
type restResponse struct {
	code   int
	header http.Header
	body   []byte
}

// Do sends a REST request; token "" sends no credentials.
func (s *Server) Do(method, path, token string, body []byte) restResponse {
	s.t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, s.URL+path, rd)
	if err != nil {
		s.t.Fatalf("REST %s %s: %v", method, path, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		s.t.Fatalf("REST %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		s.t.Fatalf("REST %s %s: read body: %v", method, path, err)
	}
	return restResponse{code: resp.StatusCode, header: resp.Header, body: b}
}

var unmarshalJSON = protojson.UnmarshalOptions{DiscardUnknown: true}

// API sends a REST request with the admin token, requires 200 and decodes
// the JSON answer into out (when non-nil).
func (s *Server) API(method, path string, body string, out proto.Message) {
	s.t.Helper()
	var b []byte
	if body != "" {
		b = []byte(body)
	}
	r := s.Do(method, path, s.AdminToken, b)
	if r.code != http.StatusOK {
		s.t.Fatalf("REST %s %s: status %d: %s", method, path, r.code, r.body)
	}
	if out != nil {
		if err := unmarshalJSON.Unmarshal(r.body, out); err != nil {
			s.t.Fatalf("REST %s %s: decode %s: %v", method, path, r.body, err)
		}
	}
}

// AddHost registers a host through the REST API and returns its agent
// token.
func (s *Server) AddHost(name string) string {
	s.t.Helper()
	var r fleetv1.AddHostResponse
	s.API("POST", "/api/hosts", fmt.Sprintf(`{"hostname": %q, "host_type": "HOST_TYPE_NIXOS"}`, name), &r)
	if r.AgentToken == "" {
		s.t.Fatalf("AddHost %s: no agent token in the answer", name)
	}
	return r.AgentToken
}

// Host returns a host as GET /api/hosts/{id} shows it.
func (s *Server) Host(id string) *fleetv1.Host {
	s.t.Helper()
	var r fleetv1.GetHostResponse
	s.API("GET", "/api/hosts/"+id, "", &r)
	return r.Host
}

// WaitOnline waits until the host is online with a heartbeat's metrics.
// A host is online from its Hello on, before the agent has its Welcome;
// the first heartbeat comes after the Welcome.
func (s *Server) WaitOnline(id string) *fleetv1.Host {
	s.t.Helper()
	var h *fleetv1.Host
	waitFor(s.t, stateTimeout, func() (bool, string) {
		h = s.Host(id)
		return h.Online && h.GetMetrics() != nil, fmt.Sprintf("host %s online=%v metrics=%v", id, h.Online, h.GetMetrics())
	})
	return h
}

// WaitOffline waits until the host is offline.
func (s *Server) WaitOffline(id string, timeout time.Duration) {
	s.t.Helper()
	waitFor(s.t, timeout, func() (bool, string) {
		h := s.Host(id)
		return !h.Online, fmt.Sprintf("host %s still online (last seen %v)", id, h.GetLastSeen().AsTime())
	})
}

// RunCommand starts a command through REST and returns it.
func (s *Server) RunCommand(host, command string) *fleetv1.Command {
	s.t.Helper()
	var r fleetv1.RunCommandResponse
	s.API("POST", "/api/hosts/"+host+"/commands", fmt.Sprintf(`{"command": %q, "force": true}`, command), &r)
	if r.Command.GetCommandId() == "" {
		s.t.Fatalf("RunCommand %s %s: no command id", host, command)
	}
	return r.Command
}

// Command returns a command as GET /api/commands/{id} shows it.
func (s *Server) Command(id string) *fleetv1.Command {
	s.t.Helper()
	var r fleetv1.GetCommandResponse
	s.API("GET", "/api/commands/"+id, "", &r)
	return r.Command
}

// WaitCommand waits until a command ends and returns it.
func (s *Server) WaitCommand(id string) *fleetv1.Command {
	s.t.Helper()
	var c *fleetv1.Command
	waitFor(s.t, commandTimeout, func() (bool, string) {
		c = s.Command(id)
		return status.IsTerminal(c.State), fmt.Sprintf("command %s (%s) is %s: %s", id, c.Command, c.State, c.Message)
	})
	return c
}

// CommandLog returns a command's whole log through REST, page by page.
func (s *Server) CommandLog(id string) []*typesv1.OutputLine {
	s.t.Helper()
	var lines []*typesv1.OutputLine
	var after uint64
	for page := 0; ; page++ {
		if page > 1000 {
			s.t.Fatalf("log of %s: too many pages", id)
		}
		var r fleetv1.GetCommandLogResponse
		s.API("GET", fmt.Sprintf("/api/commands/%s/log?after_seq=%d", id, after), "", &r)
		lines = append(lines, r.Lines...)
		if len(r.Lines) > 0 {
			after = r.Lines[len(r.Lines)-1].Seq
		}
		if !r.More || len(r.Lines) == 0 {
			return lines
		}
	}
}

// stdoutLines returns the texts of a log's stdout lines, in order.
func stdoutLines(lines []*typesv1.OutputLine) []string {
	var out []string
	for _, l := range lines {
		if l.Stream == typesv1.OutputStream_OUTPUT_STREAM_STDOUT {
			out = append(out, l.Text)
		}
	}
	return out
}

// bearer sends an API token with every RPC.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return false }

// GRPC returns a native gRPC connection (h2c) to the server, sending token
// with every call when non-empty. It is closed when the test ends.
func (s *Server) GRPC(token string) *grpc.ClientConn {
	s.t.Helper()
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer(token)))
	}
	conn, err := grpc.NewClient("passthrough:///"+s.Addr, opts...)
	if err != nil {
		s.t.Fatalf("grpc.NewClient: %v", err)
	}
	s.t.Cleanup(func() { conn.Close() })
	return conn
}

// Fleet returns a FleetService client with the admin token.
func (s *Server) Fleet() fleetv1.FleetServiceClient {
	return fleetv1.NewFleetServiceClient(s.GRPC(s.AdminToken))
}

// Watch is a WatchFleet stream read in the background; events are kept
// for the test to inspect.
type Watch struct {
	mu     sync.Mutex
	events []watched
	err    error
	cancel context.CancelFunc
	done   chan struct{}
}

type watched struct {
	at time.Time
	ev *fleetv1.FleetEvent
}

// Watch opens a WatchFleet stream over native gRPC. It ends with the test.
func (s *Server) Watch(req *fleetv1.WatchFleetRequest) *Watch {
	s.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	st, err := s.Fleet().WatchFleet(ctx, req)
	if err != nil {
		cancel()
		s.t.Fatalf("WatchFleet: %v", err)
	}
	w := &Watch{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			m, err := st.Recv()
			if err != nil {
				w.mu.Lock()
				w.err = err
				w.mu.Unlock()
				return
			}
			now := time.Now()
			w.mu.Lock()
			for _, ev := range m.Events {
				w.events = append(w.events, watched{at: now, ev: ev})
			}
			w.mu.Unlock()
		}
	}()
	s.t.Cleanup(func() { cancel(); <-w.done })
	// The call returns before the server subscribed; the snapshot says it
	// did, so events caused after Watch returns are not missed.
	waitFor(s.t, stateTimeout, func() (bool, string) {
		ev, ok := w.Find(0, func(*fleetv1.FleetEvent) bool { return true })
		if ok && ev.GetSnapshot() == nil {
			s.t.Fatalf("WatchFleet's first event is not a snapshot: %v", ev)
		}
		return ok, fmt.Sprintf("no snapshot on the new watch (stream error %v)", w.Err())
	})
	return w
}

// Snapshot returns the watch's first snapshot.
func (w *Watch) Snapshot() *fleetv1.Snapshot {
	ev, _ := w.Find(0, func(ev *fleetv1.FleetEvent) bool { return ev.GetSnapshot() != nil })
	return ev.GetSnapshot()
}

// snapshotHost returns host from snap, or nil.
func snapshotHost(snap *fleetv1.Snapshot, host string) *fleetv1.Host {
	for _, h := range snap.GetHosts() {
		if h.HostId == host {
			return h
		}
	}
	return nil
}

// Len returns how many events arrived so far.
func (w *Watch) Len() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.events)
}

// Find returns the first event from index from on that matches pred.
func (w *Watch) Find(from int, pred func(*fleetv1.FleetEvent) bool) (*fleetv1.FleetEvent, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, e := range w.events[min(from, len(w.events)):] {
		if pred(e.ev) {
			return e.ev, true
		}
	}
	return nil, false
}

// Count returns how many events from index from on match pred.
func (w *Watch) Count(from int, pred func(*fleetv1.FleetEvent) bool) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, e := range w.events[min(from, len(w.events)):] {
		if pred(e.ev) {
			n++
		}
	}
	return n
}

// Err returns the error that ended the stream, if it ended.
func (w *Watch) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// heartbeatOf matches a HostHeartbeat of host.
func heartbeatOf(host string) func(*fleetv1.FleetEvent) bool {
	return func(ev *fleetv1.FleetEvent) bool { return ev.GetHostHeartbeat().GetHostId() == host }
}

// Fleet is a fleet repository: a bare origin the agents clone and a work
// tree the test commits and pushes from.
type Fleet struct {
	t            testing.TB
	Origin, Work string
}

// NewFleet creates the origin and a first commit with hosts/<host>/ for
// every host, each with one passing test script.
func NewFleet(t testing.TB, hosts ...string) *Fleet {
	t.Helper()
	dir := t.TempDir()
	f := &Fleet{t: t, Origin: filepath.Join(dir, "fleet.git"), Work: filepath.Join(dir, "fleet")}
	f.git(dir, "init", "--quiet", "--bare", "--initial-branch=main", f.Origin)
	f.git(dir, "init", "--quiet", "--initial-branch=main", f.Work)
	f.git(f.Work, "remote", "add", "origin", f.Origin)
	f.Write("README.md", "nixplane e2e fleet\n")
	for _, h := range hosts {
		f.Write("hosts/"+h+"/configuration.nix", "{ ... }: { networking.hostName = \""+h+"\"; }\n")
		f.WriteScript("hosts/"+h+"/tests/01-config-present.sh", "#!/bin/sh\ntest -f hosts/"+h+"/configuration.nix && echo 'configuration present'\n")
	}
	f.Commit("Initial fleet configuration")
	return f
}

func (f *Fleet) git(dir string, args ...string) string {
	f.t.Helper()
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	cmd.Env = baseEnv()
	out, err := cmd.CombinedOutput()
	if err != nil {
		f.t.Fatalf("git %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// Write writes a file of the work tree (not yet committed).
func (f *Fleet) Write(name, body string) {
	f.write(name, body, 0o644)
}

// WriteScript writes an executable file of the work tree.
func (f *Fleet) WriteScript(name, body string) {
	f.write(name, body, 0o755)
}

func (f *Fleet) write(name, body string, mode os.FileMode) {
	f.t.Helper()
	p := filepath.Join(f.Work, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(body), mode); err != nil {
		f.t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		f.t.Fatal(err)
	}
}

// Commit commits everything and pushes it; it returns the new commit.
func (f *Fleet) Commit(msg string) string {
	f.t.Helper()
	f.git(f.Work, "add", "-A")
	f.git(f.Work, "commit", "--quiet", "-m", msg)
	f.git(f.Work, "push", "--quiet", "origin", "main")
	return f.Head()
}

// Head returns origin's main commit.
func (f *Fleet) Head() string {
	f.t.Helper()
	return f.git(f.Origin, "rev-parse", "main")
}

// Agent is a nixplane-agent run as a child process for one host.
type Agent struct {
	t        testing.TB
	Host     string
	StateDir string
	log      *logBuffer
	proc     *process
	// bin and args started the agent; [Agent.Start] reuses args.
	bin  string
	args []string
}

// AgentOptions tune an agent.
type AgentOptions struct {
	// Interval is the heartbeat interval (1s when zero).
	Interval time.Duration
	// Rebuild is the body of the script that stands in for nixos-rebuild;
	// empty means a script that prints its arguments and succeeds.
	Rebuild string
	// Binary is the agent executable to run (the built nixplane-agent when
	// empty).
	Binary string
	// SelfPath is the agent's --self-path (empty: the check is off).
	SelfPath string
	// ExtraArgs are appended to the agent's command line.
	ExtraArgs []string
}

// StartAgent registers host through the API and starts its agent against
// fleet. The agent is killed when the test ends; its log is printed when
// the test failed.
func (s *Server) StartAgent(f *Fleet, host string, o AgentOptions) *Agent {
	s.t.Helper()
	return s.StartAgentWithToken(f, host, s.AddHost(host), o)
}

// StartAgentWithToken starts the agent of an already registered host.
func (s *Server) StartAgentWithToken(f *Fleet, host, token string, o AgentOptions) *Agent {
	t := s.t
	t.Helper()
	dir := t.TempDir()
	a := &Agent{t: t, Host: host, StateDir: filepath.Join(dir, "state"), log: &logBuffer{}}
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	rebuild := o.Rebuild
	if rebuild == "" {
		rebuild = "#!/bin/sh\necho \"rebuild $*\"\n"
	}
	rebuildPath := filepath.Join(dir, "rebuild")
	if err := os.WriteFile(rebuildPath, []byte(rebuild), 0o755); err != nil {
		t.Fatal(err)
	}
	interval := o.Interval
	if interval == 0 {
		interval = time.Second
	}
	args := []string{"--server", s.URL, "--hostname", host, "--token-file", tokenFile, "--repo-url", f.Origin,
		"--state-dir", a.StateDir, "--interval", interval.String(), "--host-type", "nixos",
		"--rebuild-command", rebuildPath, "--reboot-command", "true",
		"--current-system", filepath.Join(dir, "no-current-system"), "--self-path", o.SelfPath}
	args = append(args, o.ExtraArgs...)
	a.bin, a.args = bins.agent, args
	if o.Binary != "" {
		a.bin = o.Binary
	}
	p, err := startProcess(a.bin, args, baseEnv(), a.log)
	if err != nil {
		t.Fatalf("start nixplane-agent: %v", err)
	}
	a.proc = p
	t.Cleanup(func() {
		a.proc.terminate(syscall.SIGKILL)
		if t.Failed() {
			t.Logf("agent %s log:\n%s", host, a.log.String())
		}
	})
	return a
}

// Signal sends sig to the agent process.
func (a *Agent) Signal(sig syscall.Signal) {
	a.t.Helper()
	if err := a.proc.signal(sig); err != nil {
		a.t.Fatalf("signal %v to agent %s: %v", sig, a.Host, err)
	}
}

// Term ends the agent with SIGTERM, waits for it, and returns its exit
// error (nil for status 0); it fails the test when SIGKILL was needed.
func (a *Agent) Term() error {
	a.t.Helper()
	if !a.proc.terminate(syscall.SIGTERM) {
		a.t.Errorf("agent %s did not exit within %s of SIGTERM", a.Host, stopTimeout)
	}
	return a.proc.err
}

// Kill ends the agent with SIGKILL and waits for it.
func (a *Agent) Kill() {
	a.proc.terminate(syscall.SIGKILL)
}

// WaitExit waits until the agent process exits on its own and returns its
// exit status.
func (a *Agent) WaitExit(timeout time.Duration) int {
	a.t.Helper()
	select {
	case <-a.proc.done:
	case <-time.After(timeout):
		a.t.Fatalf("agent %s did not exit within %s", a.Host, timeout)
	}
	return a.proc.cmd.ProcessState.ExitCode()
}

// Start starts the agent again after it exited, the way a service manager
// does, running binary (the previous executable when empty) with the same
// arguments and state directory.
func (a *Agent) Start(binary string) {
	a.t.Helper()
	if !a.proc.exited() {
		a.t.Fatalf("agent %s still runs", a.Host)
	}
	if binary != "" {
		a.bin = binary
	}
	p, err := startProcess(a.bin, a.args, baseEnv(), a.log)
	if err != nil {
		a.t.Fatalf("start nixplane-agent again: %v", err)
	}
	a.proc = p
}

// Repo is the agent's clone of the fleet repository.
func (a *Agent) Repo() string { return filepath.Join(a.StateDir, "repo") }

// processGone reports whether pid no longer runs (gone, or a zombie
// waiting to be reaped).
func processGone(pid int) (bool, string) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true, ""
	}
	// pid (comm) STATE ...
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && len(s) > i+2 && s[i+2] == 'Z' {
		return true, ""
	}
	return false, fmt.Sprintf("process %d still runs: %s", pid, strings.TrimSpace(s))
}
