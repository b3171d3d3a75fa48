package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/nixplane/nixplane/agent/executor"
	"github.com/nixplane/nixplane/agent/internal/fakeserver"
	"github.com/nixplane/nixplane/agent/internal/testgit"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
	"google.golang.org/protobuf/types/known/durationpb"
)

const (
	token   = "secret-token"
	wait    = 15 * time.Second
	lockTxt = "{\"nodes\":{},\"version\":7}\n"
)

// logRecorder is a slog handler that keeps messages for tests to wait on
// and forwards them to the test log.
type logRecorder struct {
	t    testing.TB
	mu   *sync.Mutex
	msgs *[]string
}

func (h logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (h logRecorder) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	*h.msgs = append(*h.msgs, r.Message)
	h.mu.Unlock()
	return nil
}
func (h logRecorder) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h logRecorder) WithGroup(string) slog.Handler      { return h }

func (h logRecorder) count(msg string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, m := range *h.msgs {
		if strings.Contains(m, msg) {
			n++
		}
	}
	return n
}

// env is one agent under test with its fake server, origin and scripts.
type env struct {
	t      *testing.T
	dir    string
	srv    *fakeserver.Server
	origin *testgit.Origin
	cfg    Config
	logs   logRecorder
	cancel context.CancelFunc
	done   chan error
}

const rebuildScript = `#!/bin/sh
echo "$@" >> "$D/rebuild.log"
case "$*" in *--rollback*) echo "rolled back"; exit 0;; esac
mode=$(cat "$D/mode" 2>/dev/null)
case "$mode" in
  sleep) echo "pgid $$"; sleep 300 & sleep 300;;
  fail) echo "build failed" >&2; exit 4;;
  lines) i=1; while [ $i -le 500 ]; do echo "line $i"; i=$((i+1)); done; printf 'bad \377 byte\n';;
  selfupdate) ln -sfn "$D/agent-v2" "$D/bin/nixplane-agent"; echo "switched";;
  wait) echo "waiting"; while [ ! -e "$D/go" ]; do sleep 0.05; done; echo "done";;
  *) echo "building"; echo "activating" >&2;;
esac
`

func newEnv(t *testing.T, mutate func(*Config)) *env {
	t.Helper()
	dir := t.TempDir()
	e := &env{t: t, dir: dir, logs: logRecorder{t: t, mu: &sync.Mutex{}, msgs: &[]string{}}}
	e.srv = fakeserver.Start(t, "127.0.0.1:0", token)
	e.origin = testgit.New(t, map[string]string{
		"flake.nix":                  "{ outputs = _: { }; }\n",
		"flake.lock":                 lockTxt,
		"hosts/web1/tests/10-ok":     "#!/bin/sh\necho ok one\n",
		"hosts/web1/tests/20-broken": "#!/bin/sh\necho 'expected 1, got 2' >&2\nexit 1\n",
		"hosts/web1/tests/30-ok":     "#!/bin/sh\necho ok three\n",
	})
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tokenFile := write("token", token+"\n", 0o600)
	rebuild := write("rebuild", strings.ReplaceAll(rebuildScript, `"$D`, `"`+dir), 0o755)
	reboot := write("reboot", "#!/bin/sh\ntouch "+dir+"/rebooted\n", 0o755)
	exe := write("agent-v1", "agent binary v1", 0o755)
	write("agent-v2", "agent binary v2", 0o755)
	if err := os.MkdirAll(filepath.Join(dir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(exe, filepath.Join(dir, "bin", "nixplane-agent")); err != nil {
		t.Fatal(err)
	}
	e.cfg = Config{
		Server:         e.srv.URL(),
		Hostname:       "web1",
		TokenFile:      tokenFile,
		RepoURL:        e.origin.Bare,
		StateDir:       filepath.Join(dir, "state"),
		Interval:       200 * time.Millisecond,
		HostType:       typesv1.HostType_HOST_TYPE_NIXOS,
		Location:       "lab",
		DeviceType:     "server",
		ThemeColor:     "#112233",
		RebuildCommand: rebuild,
		RebootCommand:  []string{reboot},
		NixCommand:     filepath.Join(dir, "no-nix"),
		Executable:     exe,
		SelfPath:       filepath.Join(dir, "bin", "nixplane-agent"),
		Version:        "1.2.3",
		SourceCommit:   "abc123",
		BackoffInitial: 50 * time.Millisecond,
		BackoffMax:     300 * time.Millisecond,
	}
	if mutate != nil {
		mutate(&e.cfg)
	}
	return e
}

func (e *env) mode(m string) {
	e.t.Helper()
	if err := os.WriteFile(filepath.Join(e.dir, "mode"), []byte(m), 0o644); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) start() {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	e.done = make(chan error, 1)
	go func() { e.done <- Run(ctx, e.cfg, slog.New(e.logs)) }()
	e.t.Cleanup(func() {
		cancel()
		select {
		case <-e.done:
		case <-time.After(wait):
			e.t.Error("Run did not return after cancel")
		}
	})
}

// stop cancels the agent and returns Run's error.
func (e *env) stop() error {
	e.t.Helper()
	e.cancel()
	select {
	case err := <-e.done:
		e.done <- err // for the cleanup
		return err
	case <-time.After(wait):
		e.t.Fatal("Run did not return after cancel")
		return nil
	}
}

// conn waits for the n-th session (1-based).
func (e *env) conn(n int) *fakeserver.Conn {
	e.t.Helper()
	fakeserver.Eventually(e.t, wait, "session "+strconv.Itoa(n), func() bool { return len(e.srv.Conns()) >= n })
	return e.srv.Conns()[n-1]
}

// result waits for the result of id.
func result(t *testing.T, c *fakeserver.Conn, id string) *agentv1.CommandResult {
	t.Helper()
	fakeserver.Eventually(t, wait, "result of "+id, func() bool { return c.Result(id) != nil })
	return c.Result(id)
}

func run(c *fakeserver.Conn, id string, kind typesv1.CommandKind) {
	c.Run(&agentv1.RunCommand{CommandId: id, Kind: kind})
}

func sha(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

func TestHelloAndHeartbeats(t *testing.T) {
	e := newEnv(t, nil)
	e.start()
	c := e.conn(1)
	h := c.Hello
	head := testgit.Git(t, e.origin.Work, "rev-parse", "HEAD")
	checks := map[string][2]string{
		"hostname":           {h.GetHostname(), "web1"},
		"host_type":          {h.GetHostType().String(), "HOST_TYPE_NIXOS"},
		"agent_version":      {h.GetAgentVersion(), "1.2.3"},
		"source_commit":      {h.GetSourceCommit(), "abc123"},
		"binary_hash":        {h.GetBinaryHash(), sha("agent binary v1")},
		"store_path":         {h.GetStorePath(), filepath.Join(e.dir, "agent-v1")},
		"generation":         {h.GetGeneration(), head},
		"generation_message": {h.GetGenerationMessage(), "initial"},
		"lock_hash":          {h.GetLockHash(), sha(lockTxt)},
		"repo_url":           {h.GetRepoUrl(), e.origin.Bare},
		"branch":             {h.GetBranch(), "main"},
		"location":           {h.GetLocation(), "lab"},
		"device_type":        {h.GetDeviceType(), "server"},
		"theme_color":        {h.GetThemeColor(), "#112233"},
		"heartbeat_interval": {h.GetHeartbeatInterval().AsDuration().String(), "200ms"},
		"running_command_id": {h.GetRunningCommandId(), ""},
	}
	for name, v := range checks {
		if v[0] != v[1] {
			t.Errorf("hello %s = %q, want %q", name, v[0], v[1])
		}
	}
	if h.GetOsVersion() == "" {
		t.Error("hello os_version is empty")
	}
	if h.GetLastResult() != nil {
		t.Errorf("hello carries a last result on a fresh start: %v", h.GetLastResult())
	}
	st, err := os.Stat(filepath.Join(e.cfg.StateDir, "repo"))
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("clone dir: %v, %v; want mode 0700", st, err)
	}

	// The first message after the Welcome is a heartbeat with real metrics.
	fakeserver.Eventually(t, wait, "first heartbeat", func() bool { return len(c.Messages()) > 0 })
	first := c.Messages()[0].GetHeartbeat()
	if first == nil {
		t.Fatalf("first message after welcome = %v, want a heartbeat", c.Messages()[0])
	}
	if first.GetMetrics().GetRamPercent() <= 0 || first.GetGeneration() != head || first.GetLockHash() != sha(lockTxt) || first.GetSentAt() == nil {
		t.Errorf("first heartbeat = %v", first)
	}
	// Heartbeats keep coming, and CPU use shows up.
	fakeserver.Eventually(t, wait, "more heartbeats with CPU use", func() bool {
		hbs := c.Heartbeats()
		if len(hbs) < 4 {
			return false
		}
		for _, hb := range hbs {
			if hb.GetMetrics().GetCpuPercent() > 0 {
				return true
			}
		}
		return false
	})
	for _, hb := range c.Heartbeats() {
		m := hb.GetMetrics()
		if m.GetCpuPercent() < 0 || m.GetCpuPercent() > 100 || m.GetRamPercent() > 100 || m.GetSwapPercent() < 0 || m.GetLoad1() < 0 {
			t.Errorf("metrics out of range: %v", m)
		}
	}
}

func TestReconnectAndCleanShutdown(t *testing.T) {
	e := newEnv(t, nil)
	e.start()
	c1 := e.conn(1)
	addr := e.srv.Addr
	e.srv.Stop()
	<-c1.Done()
	fakeserver.Eventually(t, wait, "the agent to notice", func() bool { return e.logs.count("reconnecting") > 0 })
	// The server comes back on the same address.
	e.srv = fakeserver.Start(t, addr, token)
	c2 := func() *fakeserver.Conn {
		fakeserver.Eventually(t, wait, "reconnect", func() bool { return e.srv.Last() != nil })
		return e.srv.Last()
	}()
	if c2.Hello.GetHostname() != "web1" {
		t.Errorf("hello after reconnect = %v", c2.Hello)
	}
	fakeserver.Eventually(t, wait, "heartbeat after reconnect", func() bool { return len(c2.Heartbeats()) > 0 })

	// SIGTERM (ctx cancel): the stream ends cleanly at once.
	if err := e.stop(); err != nil {
		t.Fatalf("Run after cancel = %v, want nil", err)
	}
	select {
	case <-c2.Done():
	case <-time.After(wait):
		t.Fatal("server did not see the stream end")
	}
	if !errors.Is(c2.Err(), io.EOF) {
		t.Errorf("stream ended with %v, want a clean close (EOF)", c2.Err())
	}
}

func TestRejectedTokenBacksOff(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.BackoffInitial = 100 * time.Millisecond
		c.BackoffMax = 400 * time.Millisecond
	})
	e.srv.Token = "another-token"
	e.start()
	fakeserver.Eventually(t, wait, "three rejected attempts", func() bool { return e.srv.Attempts() >= 3 })
	start, n0 := time.Now(), e.srv.Attempts()
	fakeserver.Eventually(t, wait, "two more attempts", func() bool { return e.srv.Attempts() >= n0+2 })
	// A hot loop would make hundreds of attempts per second; with the
	// backoff the attempts so far are few.
	elapsed := time.Since(start)
	if n := e.srv.Attempts() - n0; float64(n) > 2+elapsed.Seconds()/0.2*2 {
		t.Errorf("%d attempts in %s: not backing off", n, elapsed)
	}
	if e.logs.count("server rejected the agent token for host web1") < 3 {
		t.Errorf("no clear log line for the rejected token")
	}
	if len(e.srv.Conns()) != 0 {
		t.Error("a session was accepted with a bad token")
	}
}

func TestPullFollowsOrigin(t *testing.T) {
	e := newEnv(t, nil)
	e.start()
	c := e.conn(1)
	clone := filepath.Join(e.cfg.StateDir, "repo")
	if err := os.WriteFile(filepath.Join(clone, "flake.nix"), []byte("tampered"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(clone, "junk"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	newLock := "{\"nodes\":{\"x\":{}},\"version\":7}\n"
	head := e.origin.Commit(t, "bump inputs", map[string]string{"flake.lock": newLock})
	run(c, "p1", typesv1.CommandKind_COMMAND_KIND_PULL)
	res := result(t, c, "p1")
	if res.GetOutcome() != agentv1.Outcome_OUTCOME_SUCCEEDED || res.GetGeneration() != head || res.GetKind() != typesv1.CommandKind_COMMAND_KIND_PULL {
		t.Fatalf("pull result = %v", res)
	}
	if b, _ := os.ReadFile(filepath.Join(clone, "flake.nix")); string(b) != "{ outputs = _: { }; }\n" {
		t.Errorf("tracked file not restored: %q", b)
	}
	if _, err := os.Stat(filepath.Join(clone, "junk")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("untracked file survived: %v", err)
	}
	fakeserver.Eventually(t, wait, "a heartbeat and a status report with the new generation", func() bool {
		hbs := c.Heartbeats()
		if len(hbs) == 0 || hbs[len(hbs)-1].GetGeneration() != head || hbs[len(hbs)-1].GetLockHash() != sha(newLock) {
			return false
		}
		for _, m := range c.Messages() {
			if s := m.GetStatus(); s != nil && s.GetGeneration() == head && s.GetGenerationMessage() == "bump inputs" {
				return true
			}
		}
		return false
	})
	// The progress phase and the system lines are there.
	var sawProgress bool
	for _, m := range c.Messages() {
		if p := m.GetProgress(); p != nil && p.GetCommandId() == "p1" && p.GetPhase() == "fetch" {
			sawProgress = true
		}
	}
	if !sawProgress {
		t.Error("no fetch progress for the pull")
	}
	if lines := c.Lines("p1"); uint64(len(lines)) != res.GetLastSeq() || !strings.Contains(strings.Join(lines, "\n"), "phase: fetch") {
		t.Errorf("pull output (%d lines, last_seq %d):\n%s", len(lines), res.GetLastSeq(), strings.Join(lines, "\n"))
	}
}

func TestStopKillsTheCommandAndItsChildren(t *testing.T) {
	e := newEnv(t, nil)
	e.mode("sleep")
	e.start()
	c := e.conn(1)
	run(c, "s1", typesv1.CommandKind_COMMAND_KIND_SWITCH)
	var pgid int
	fakeserver.Eventually(t, wait, "the switch to print its pgid", func() bool {
		for _, l := range c.Lines("s1") {
			if p, ok := strings.CutPrefix(l, "pgid "); ok {
				pgid, _ = strconv.Atoi(p)
				return true
			}
		}
		return false
	})
	fakeserver.Eventually(t, wait, "a heartbeat naming the running command", func() bool {
		hbs := c.Heartbeats()
		return len(hbs) > 0 && hbs[len(hbs)-1].GetRunningCommandId() == "s1"
	})
	c.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Stop{Stop: &agentv1.StopCommand{CommandId: "s1", Grace: durationpb.New(2 * time.Second)}}})
	res := result(t, c, "s1")
	if res.GetOutcome() != agentv1.Outcome_OUTCOME_STOPPED || res.GetExitCode() != 128+int32(syscall.SIGTERM) || !strings.Contains(res.GetMessage(), "stopped on request") {
		t.Errorf("result = %v", res)
	}
	fakeserver.Eventually(t, wait, "the command's process group to be empty", func() bool { return !executor.GroupAlive(pgid) })
	fakeserver.Eventually(t, wait, "an idle heartbeat", func() bool {
		hbs := c.Heartbeats()
		return len(hbs) > 0 && hbs[len(hbs)-1].GetRunningCommandId() == ""
	})
}

func TestBusyRejectionAndHardTimeout(t *testing.T) {
	e := newEnv(t, nil)
	e.mode("sleep")
	e.start()
	c := e.conn(1)
	c.Run(&agentv1.RunCommand{CommandId: "long", Kind: typesv1.CommandKind_COMMAND_KIND_SWITCH, Timeout: durationpb.New(time.Second)})
	fakeserver.Eventually(t, wait, "the switch to run", func() bool { return len(c.Lines("long")) > 3 })
	run(c, "second", typesv1.CommandKind_COMMAND_KIND_PULL)
	fakeserver.Eventually(t, wait, "a busy rejection", func() bool {
		for _, m := range c.Messages() {
			if r := m.GetRejected(); r != nil && r.GetCommandId() == "second" {
				return r.GetReason() == agentv1.RejectReason_REJECT_REASON_BUSY && r.GetRunningCommandId() == "long"
			}
		}
		return false
	})
	res := result(t, c, "long")
	if res.GetOutcome() != agentv1.Outcome_OUTCOME_STOPPED || !strings.Contains(res.GetMessage(), "timed out after 1s") {
		t.Errorf("timed-out result = %v", res)
	}
	if c.Result("second") != nil {
		t.Error("the rejected command ran")
	}
	// Unknown kinds are refused too.
	run(c, "weird", typesv1.CommandKind(99))
	fakeserver.Eventually(t, wait, "an unsupported rejection", func() bool {
		for _, m := range c.Messages() {
			if r := m.GetRejected(); r != nil && r.GetCommandId() == "weird" {
				return r.GetReason() == agentv1.RejectReason_REJECT_REASON_UNSUPPORTED
			}
		}
		return false
	})
}

func TestOutputStreamsInOrder(t *testing.T) {
	e := newEnv(t, nil)
	e.mode("lines")
	e.start()
	c := e.conn(1)
	run(c, "o1", typesv1.CommandKind_COMMAND_KIND_SWITCH)
	res := result(t, c, "o1")
	if res.GetOutcome() != agentv1.Outcome_OUTCOME_SUCCEEDED {
		t.Fatalf("result = %v", res)
	}
	var seq uint64
	var got []string
	for _, m := range c.Messages() {
		o := m.GetOutput()
		if o == nil || o.GetCommandId() != "o1" {
			continue
		}
		for _, l := range o.GetLines() {
			seq++
			if l.GetSeq() != seq {
				t.Fatalf("seq %d where %d was due", l.GetSeq(), seq)
			}
			if !utf8.ValidString(l.GetText()) {
				t.Errorf("invalid UTF-8 in line %d", l.GetSeq())
			}
			if l.GetStream() == typesv1.OutputStream_OUTPUT_STREAM_STDOUT {
				got = append(got, l.GetText())
			}
		}
	}
	if seq != res.GetLastSeq() {
		t.Errorf("last_seq = %d, lines = %d", res.GetLastSeq(), seq)
	}
	if len(got) != 501 {
		t.Fatalf("%d stdout lines, want 501", len(got))
	}
	for i := 0; i < 500; i++ {
		if got[i] != "line "+strconv.Itoa(i+1) {
			t.Fatalf("line %d = %q", i, got[i])
		}
	}
	if got[500] != "bad \uFFFD byte" {
		t.Errorf("invalid UTF-8 line = %q", got[500])
	}
	// The switch ran the rebuild tool with the flake of the clone.
	b, _ := os.ReadFile(filepath.Join(e.dir, "rebuild.log"))
	if want := "switch --flake " + filepath.Join(e.cfg.StateDir, "repo") + "#web1"; strings.TrimSpace(string(b)) != want {
		t.Errorf("rebuild args = %q, want %q", b, want)
	}
}

func TestTestCommandCountsEveryFailure(t *testing.T) {
	e := newEnv(t, nil)
	e.start()
	c := e.conn(1)
	run(c, "t1", typesv1.CommandKind_COMMAND_KIND_TEST)
	res := result(t, c, "t1")
	rep := res.GetTests()
	if res.GetOutcome() != agentv1.Outcome_OUTCOME_FAILED || rep.GetPassed() != 2 || rep.GetTotal() != 3 || strings.Join(rep.GetFailed(), ",") != "20-broken" {
		t.Fatalf("test result = %v", res)
	}
	if rep.GetGeneration() != testgit.Git(t, e.origin.Work, "rev-parse", "HEAD") || rep.GetRanAt() == nil {
		t.Errorf("test report = %v", rep)
	}
	if !strings.Contains(strings.Join(c.Lines("t1"), "\n"), "expected 1, got 2") {
		t.Error("the failing script's stderr is not in the output")
	}

	// Two failing scripts of three: both count (the last one passes).
	e.origin.Commit(t, "break another", map[string]string{"hosts/web1/tests/10-ok": "#!/bin/sh\nexit 3\n"})
	run(c, "p", typesv1.CommandKind_COMMAND_KIND_PULL)
	result(t, c, "p")
	run(c, "t2", typesv1.CommandKind_COMMAND_KIND_TEST)
	res = result(t, c, "t2")
	if rep := res.GetTests(); res.GetOutcome() != agentv1.Outcome_OUTCOME_FAILED || rep.GetPassed() != 1 || strings.Join(rep.GetFailed(), ",") != "10-ok,20-broken" {
		t.Fatalf("second test result = %v", res)
	}
	fakeserver.Eventually(t, wait, "a status report carrying the last test run", func() bool {
		for _, m := range c.Messages() {
			if s := m.GetStatus(); s != nil && s.GetTests().GetPassed() == 1 && s.GetTests().GetTotal() == 3 {
				return true
			}
		}
		return false
	})

	// No tests at all is a failure, not a pass.
	e.origin.Commit(t, "no tests", map[string]string{"hosts/web1/tests/10-ok": "-", "hosts/web1/tests/20-broken": "-", "hosts/web1/tests/30-ok": "-"})
	run(c, "p2", typesv1.CommandKind_COMMAND_KIND_PULL)
	result(t, c, "p2")
	run(c, "t3", typesv1.CommandKind_COMMAND_KIND_TEST)
	if res := result(t, c, "t3"); res.GetOutcome() != agentv1.Outcome_OUTCOME_FAILED || res.GetMessage() != "no tests" || res.GetTests().GetTotal() != 0 {
		t.Errorf("no-tests result = %v", res)
	}
}

func TestRefreshStatus(t *testing.T) {
	e := newEnv(t, nil)
	e.start()
	c := e.conn(1)
	c.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Refresh{Refresh: &agentv1.RefreshStatus{RequestId: "r1"}}})
	var rep *agentv1.StatusReport
	fakeserver.Eventually(t, wait, "a status report for r1", func() bool {
		for _, m := range c.Messages() {
			if s := m.GetStatus(); s != nil && s.GetRequestId() == "r1" {
				rep = s
				return true
			}
		}
		return false
	})
	if rep.GetGeneration() != testgit.Git(t, e.origin.Work, "rev-parse", "HEAD") || rep.GetLockHash() != sha(lockTxt) || rep.GetNixAvailable() ||
		rep.GetSystem().GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN || rep.GetTests() != nil {
		t.Errorf("status report = %v", rep)
	}
}

func TestSelfUpdateRestartsAfterTheResult(t *testing.T) {
	e := newEnv(t, nil)
	e.mode("selfupdate")
	e.start()
	c := e.conn(1)
	run(c, "u1", typesv1.CommandKind_COMMAND_KIND_SWITCH)
	res := result(t, c, "u1")
	if res.GetOutcome() != agentv1.Outcome_OUTCOME_SUCCEEDED || !res.GetAgentRestarting() {
		t.Fatalf("result = %v", res)
	}
	select {
	case err := <-e.done:
		e.done <- err
		if !errors.Is(err, ErrRestartRequested) {
			t.Fatalf("Run = %v, want ErrRestartRequested", err)
		}
	case <-time.After(wait):
		t.Fatal("Run did not return after the self-update")
	}
	<-c.Done()
	if !errors.Is(c.Err(), io.EOF) {
		t.Errorf("stream ended with %v, want a clean close", c.Err())
	}
	if _, err := os.Stat(filepath.Join(e.cfg.StateDir, pendingResultFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the sent result is still pending on disk: %v", err)
	}
}

func TestResultFinishedWhileDisconnectedGoesInTheNextHello(t *testing.T) {
	e := newEnv(t, nil)
	e.mode("wait")
	e.start()
	c1 := e.conn(1)
	run(c1, "w1", typesv1.CommandKind_COMMAND_KIND_SWITCH)
	fakeserver.Eventually(t, wait, "the switch to wait", func() bool {
		return strings.Contains(strings.Join(c1.Lines("w1"), "\n"), "waiting")
	})
	addr := e.srv.Addr
	e.srv.Stop()
	fakeserver.Eventually(t, wait, "the agent to notice", func() bool { return e.logs.count("reconnecting") > 0 })
	if err := os.WriteFile(filepath.Join(e.dir, "go"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// The agent logs "command finished" just before it queues the result,
	// so the file is waited for, not read once.
	fakeserver.Eventually(t, wait, "the switch to finish", func() bool { return e.logs.count("command finished") > 0 })
	fakeserver.Eventually(t, wait, "the unsent result to be kept on disk", func() bool {
		_, err := os.Stat(filepath.Join(e.cfg.StateDir, pendingResultFile))
		return err == nil
	})
	e.srv = fakeserver.Start(t, addr, token)
	fakeserver.Eventually(t, wait, "reconnect", func() bool { return e.srv.Last() != nil })
	c2 := e.srv.Last()
	lr := c2.Hello.GetLastResult()
	if lr.GetCommandId() != "w1" || lr.GetOutcome() != agentv1.Outcome_OUTCOME_SUCCEEDED || lr.GetLastSeq() == 0 {
		t.Fatalf("hello last_result = %v", lr)
	}
	if c2.Hello.GetRunningCommandId() != "" {
		t.Errorf("hello running_command_id = %q", c2.Hello.GetRunningCommandId())
	}
	fakeserver.Eventually(t, wait, "the pending result to be forgotten", func() bool {
		_, err := os.Stat(filepath.Join(e.cfg.StateDir, pendingResultFile))
		return errors.Is(err, os.ErrNotExist)
	})
	// Output printed while disconnected is delivered after the Welcome, and
	// the result is not sent twice.
	fakeserver.Eventually(t, wait, "the rest of the output", func() bool {
		return strings.Contains(strings.Join(c2.Lines("w1"), "\n"), "done")
	})
	if c2.Result("w1") != nil {
		t.Error("the result was sent again after the hello carried it")
	}
}

func TestRestartAndRebootCommands(t *testing.T) {
	e := newEnv(t, nil)
	e.start()
	c := e.conn(1)
	run(c, "rb", typesv1.CommandKind_COMMAND_KIND_REBOOT)
	if res := result(t, c, "rb"); res.GetOutcome() != agentv1.Outcome_OUTCOME_SUCCEEDED {
		t.Fatalf("reboot result = %v", res)
	}
	fakeserver.Eventually(t, wait, "the reboot command to run", func() bool {
		_, err := os.Stat(filepath.Join(e.dir, "rebooted"))
		return err == nil
	})
	run(c, "rs", typesv1.CommandKind_COMMAND_KIND_RESTART)
	if res := result(t, c, "rs"); res.GetOutcome() != agentv1.Outcome_OUTCOME_SUCCEEDED {
		t.Fatalf("restart result = %v", res)
	}
	select {
	case err := <-e.done:
		e.done <- err
		if !errors.Is(err, ErrRestartRequested) {
			t.Fatalf("Run = %v, want ErrRestartRequested", err)
		}
	case <-time.After(wait):
		t.Fatal("Run did not return after restart")
	}
}

func TestFailingHealthCheckRollsBack(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.HealthCheckCommand = "echo unhealthy >&2; exit 1"
		c.HealthCheckGrace = time.Millisecond
	})
	e.start()
	c := e.conn(1)
	run(c, "h1", typesv1.CommandKind_COMMAND_KIND_SWITCH)
	res := result(t, c, "h1")
	if res.GetOutcome() != agentv1.Outcome_OUTCOME_FAILED || !strings.Contains(res.GetMessage(), "health check failed") || !strings.Contains(res.GetMessage(), "rolled back") || !strings.Contains(res.GetMessage(), "unhealthy") {
		t.Fatalf("result = %v", res)
	}
	b, _ := os.ReadFile(filepath.Join(e.dir, "rebuild.log"))
	if !strings.Contains(string(b), "switch --rollback") {
		t.Errorf("no rollback ran: %q", b)
	}
}

func TestFailedSwitchReportsExitCode(t *testing.T) {
	e := newEnv(t, nil)
	e.mode("fail")
	e.start()
	c := e.conn(1)
	run(c, "f1", typesv1.CommandKind_COMMAND_KIND_PULL_SWITCH)
	res := result(t, c, "f1")
	if res.GetOutcome() != agentv1.Outcome_OUTCOME_FAILED || res.GetExitCode() != 4 || res.GetAgentRestarting() {
		t.Fatalf("result = %v", res)
	}
	if !strings.Contains(strings.Join(c.Lines("f1"), "\n"), "build failed") {
		t.Error("stderr of the failed build missing")
	}
}

func TestConfigValidation(t *testing.T) {
	dir := t.TempDir()
	tok := filepath.Join(dir, "tok")
	if err := os.WriteFile(tok, []byte("  \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := Config{Server: "ftp://x", Hostname: "Bad_Name", TokenFile: tok, ThemeColor: "red"}
	err := cfg.Validate()
	if err == nil {
		t.Fatal("Validate accepted a bad config")
	}
	for _, want := range []string{"scheme must be http or https", "Bad_Name", "is empty", "--repo-url is required", "--state-dir is required", "#rrggbb"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if err := Run(context.Background(), cfg, nil); err == nil {
		t.Error("Run accepted a bad config")
	}
	for in, want := range map[string]typesv1.HostType{"": 0, "nixos": 1, "darwin": 2, "home-manager": 3} {
		if got, err := ParseHostType(in); err != nil || got != want {
			t.Errorf("ParseHostType(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseHostType("windows"); err == nil {
		t.Error("ParseHostType accepted windows")
	}
}

// TestHealthCheckReasonIsCutOnARuneBoundary: a long last line of a failing
// health check is shortened for the result's message without splitting a
// character, so the result still travels (proto strings must be UTF-8).
func TestHealthCheckReasonIsCutOnARuneBoundary(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.HealthCheckCommand = "printf '" + strings.Repeat("€", 100) + "\\n' >&2; exit 1"
		c.HealthCheckGrace = time.Millisecond
	})
	e.start()
	c := e.conn(1)
	run(c, "h2", typesv1.CommandKind_COMMAND_KIND_SWITCH)
	res := result(t, c, "h2")
	if res.GetOutcome() != agentv1.Outcome_OUTCOME_FAILED || !utf8.ValidString(res.GetMessage()) || !strings.Contains(res.GetMessage(), "€€€…") {
		t.Fatalf("result = %v", res)
	}
}
