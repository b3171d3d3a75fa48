package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// TestAgentOnline: a started agent makes its host online, with real
// metrics, its clone's commit as generation and its version.
func TestAgentOnline(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	s.StartAgent(f, "alpha", AgentOptions{})
	s.WaitOnline("alpha")
	var h *fleetv1.Host
	waitFor(t, stateTimeout, func() (bool, string) {
		h = s.Host("alpha")
		return h.Online && h.GetMetrics().GetRamPercent() > 0,
			fmt.Sprintf("online=%v metrics=%v", h.Online, h.GetMetrics())
	})
	if m := h.GetMetrics(); m.RamPercent > 100 || m.CpuPercent < 0 || m.CpuPercent > 100 {
		t.Errorf("metrics out of range: %v", m)
	}
	waitFor(t, stateTimeout, func() (bool, string) {
		h = s.Host("alpha")
		return h.Generation == f.Head(), fmt.Sprintf("generation %q, want origin's %s", h.Generation, f.Head())
	})
	if h.AgentVersion == "" {
		t.Error("host has no agent_version")
	}
	if h.GetLastSeen() == nil {
		t.Error("host has no last_seen")
	}
}

// TestAgentReconnectsAfterServerRestart: the agent comes back by itself
// when the server restarts on the same port and data directory.
func TestAgentReconnectsAfterServerRestart(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	s.StartAgent(f, "alpha", AgentOptions{})
	s.WaitOnline("alpha")

	s.Restart()
	// Every host starts offline in a new server process, so online here
	// means the agent opened a new stream to it.
	h := s.WaitOnline("alpha")
	before := h.GetLastSeen().AsTime()
	waitFor(t, stateTimeout, func() (bool, string) {
		h = s.Host("alpha")
		return h.Online && h.GetLastSeen().AsTime().After(before),
			fmt.Sprintf("online=%v last_seen=%v (was %v): heartbeats do not flow after the reconnect", h.Online, h.GetLastSeen().AsTime(), before)
	})
}

// offlineEvent waits for a HostOffline of host on w and returns it.
func offlineEvent(t *testing.T, w *Watch, from int, host string, timeout time.Duration) *fleetv1.HostOffline {
	t.Helper()
	var off *fleetv1.HostOffline
	waitFor(t, timeout, func() (bool, string) {
		ev, ok := w.Find(from, func(ev *fleetv1.FleetEvent) bool { return ev.GetHostOffline().GetHostId() == host })
		if ok {
			off = ev.GetHostOffline()
		}
		return ok, fmt.Sprintf("no HostOffline for %s among %d events (stream error: %v)", host, w.Len(), w.Err())
	})
	return off
}

// TestAgentKilledGoesOffline: a killed agent's stream closes and its host
// goes offline at once — well before the heartbeat timeout would notice.
func TestAgentKilledGoesOffline(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	// A long interval: the heartbeat timeout (3×) would take 30s, so going
	// offline within the deadline can only come from the closed stream.
	a := s.StartAgent(f, "alpha", AgentOptions{Interval: 10 * time.Second})
	s.WaitOnline("alpha")
	w := s.Watch(&fleetv1.WatchFleetRequest{})
	if h := snapshotHost(w.Snapshot(), "alpha"); !h.GetOnline() {
		t.Fatalf("the watch's snapshot shows alpha %v, want online", h)
	}
	from := w.Len()

	a.Kill()
	off := offlineEvent(t, w, from, "alpha", 10*time.Second)
	if off.Reason != "stream closed" {
		t.Errorf("HostOffline reason %q, want \"stream closed\"", off.Reason)
	}
	if h := s.Host("alpha"); h.Online {
		t.Error("host still online after its HostOffline event")
	}
}

// TestAgentTerminated: on SIGTERM the agent closes its stream cleanly and
// exits 0; its host goes offline at once.
func TestAgentTerminated(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	a := s.StartAgent(f, "alpha", AgentOptions{Interval: 10 * time.Second})
	s.WaitOnline("alpha")
	w := s.Watch(&fleetv1.WatchFleetRequest{})
	if h := snapshotHost(w.Snapshot(), "alpha"); !h.GetOnline() {
		t.Fatalf("the watch's snapshot shows alpha %v, want online", h)
	}
	from := w.Len()

	if err := a.Term(); err != nil {
		t.Errorf("agent exit after SIGTERM: %v, want status 0", err)
	}
	off := offlineEvent(t, w, from, "alpha", 10*time.Second)
	if off.Reason != "stream closed" {
		t.Errorf("HostOffline reason %q, want \"stream closed\"", off.Reason)
	}
}

// TestAgentFrozenGoesOfflineAndBack: a stopped (SIGSTOP) agent keeps its
// connection open but stops sending heartbeats; the server marks it offline
// after 3× the interval, and it comes back after SIGCONT.
func TestAgentFrozenGoesOfflineAndBack(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	const interval = time.Second
	a := s.StartAgent(f, "alpha", AgentOptions{Interval: interval})
	s.WaitOnline("alpha")
	w := s.Watch(&fleetv1.WatchFleetRequest{})
	if h := snapshotHost(w.Snapshot(), "alpha"); !h.GetOnline() {
		t.Fatalf("the watch's snapshot shows alpha %v, want online", h)
	}
	from := w.Len()

	a.Signal(syscall.SIGSTOP)
	off := offlineEvent(t, w, from, "alpha", 3*interval+10*time.Second)
	if off.Reason != "heartbeat timeout" {
		t.Errorf("HostOffline reason %q, want \"heartbeat timeout\"", off.Reason)
	}
	if h := s.Host("alpha"); h.Online {
		t.Error("host still online after its HostOffline event")
	}

	a.Signal(syscall.SIGCONT)
	s.WaitOnline("alpha")
}

// TestPullMakesCloneEqualOrigin: pull restores modified tracked files,
// removes untracked ones and moves the host's generation to origin's head.
func TestPullMakesCloneEqualOrigin(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	a := s.StartAgent(f, "alpha", AgentOptions{})
	s.WaitOnline("alpha")
	first := f.Head()
	waitFor(t, stateTimeout, func() (bool, string) {
		h := s.Host("alpha")
		return h.Generation == first, fmt.Sprintf("generation %q, want %s", h.Generation, first)
	})

	// Local damage in the clone, and a new commit on origin.
	readme := filepath.Join(a.Repo(), "README.md")
	junk := filepath.Join(a.Repo(), "hosts", "alpha", "junk.txt")
	if err := os.WriteFile(readme, []byte("edited on the host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(junk, []byte("untracked\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	f.Write("README.md", "nixplane e2e fleet, second revision\n")
	f.Write("hosts/alpha/new-file.nix", "{ }\n")
	second := f.Commit("Second revision")

	c := s.RunCommand("alpha", "pull")
	if c = s.WaitCommand(c.CommandId); c.State != typesv1.CommandState_COMMAND_STATE_SUCCEEDED {
		t.Fatalf("pull ended %s: %s", c.State, c.Message)
	}
	if b, err := os.ReadFile(readme); err != nil || string(b) != "nixplane e2e fleet, second revision\n" {
		t.Errorf("README.md in the clone after pull: %q, %v; want origin's content", b, err)
	}
	if _, err := os.Stat(junk); !os.IsNotExist(err) {
		t.Errorf("untracked file survived the pull: %v", err)
	}
	if _, err := os.Stat(filepath.Join(a.Repo(), "hosts", "alpha", "new-file.nix")); err != nil {
		t.Errorf("new file of origin missing in the clone: %v", err)
	}
	waitFor(t, stateTimeout, func() (bool, string) {
		h := s.Host("alpha")
		return h.Generation == second, fmt.Sprintf("generation %q, want the pulled commit %s", h.Generation, second)
	})
}

// TestStopKillsChildren: stopping a running command ends it as STOPPED and
// leaves none of its processes behind.
func TestStopKillsChildren(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	pidFile := filepath.Join(t.TempDir(), "child.pid")
	rebuild := "#!/bin/sh\nsleep 1000 &\necho $! > " + pidFile + ".tmp\nmv " + pidFile + ".tmp " + pidFile + "\necho \"building (child $!)\"\nwait\n"
	s.StartAgent(f, "alpha", AgentOptions{Rebuild: rebuild})
	s.WaitOnline("alpha")

	c := s.RunCommand("alpha", "switch")
	var pid int
	waitFor(t, commandTimeout, func() (bool, string) {
		b, err := os.ReadFile(pidFile)
		if err != nil {
			return false, fmt.Sprintf("the rebuild script has not started its child: %v (command %s)", err, s.Command(c.CommandId).State)
		}
		pid, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err == nil, fmt.Sprintf("pid file %q: %v", b, err)
	})
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
	if gone, _ := processGone(pid); gone {
		t.Fatalf("child %d is not running before the stop", pid)
	}
	if got := s.Command(c.CommandId); got.State != typesv1.CommandState_COMMAND_STATE_RUNNING {
		t.Fatalf("command is %s before the stop, want RUNNING", got.State)
	}

	var stopped fleetv1.StopCommandResponse
	s.API("POST", "/api/commands/"+c.CommandId+"/stop", "{}", &stopped)
	c = s.WaitCommand(c.CommandId)
	if c.State != typesv1.CommandState_COMMAND_STATE_STOPPED {
		t.Errorf("stopped command ended %s: %s", c.State, c.Message)
	}
	waitFor(t, stateTimeout, func() (bool, string) { return processGone(pid) })
	// The host is free again.
	waitFor(t, stateTimeout, func() (bool, string) {
		h := s.Host("alpha")
		return h.RunningCommand == nil, fmt.Sprintf("host still shows running command %v", h.RunningCommand)
	})
}

// TestOutputOrder: output lines arrive in order, numbered 1.. without gaps.
func TestOutputOrder(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	f.WriteScript("hosts/alpha/tests/02-count.sh", "#!/bin/sh\ni=1\nwhile [ $i -le 200 ]; do echo \"line $i\"; i=$((i+1)); done\necho 'to stderr' >&2\n")
	f.Commit("Counting test")
	s.StartAgent(f, "alpha", AgentOptions{})
	s.WaitOnline("alpha")

	c := s.RunCommand("alpha", "test")
	c = s.WaitCommand(c.CommandId)
	if c.State != typesv1.CommandState_COMMAND_STATE_SUCCEEDED {
		t.Fatalf("test ended %s: %s", c.State, c.Message)
	}
	lines := s.CommandLog(c.CommandId)
	for i, l := range lines {
		if l.Seq != uint64(i+1) {
			t.Fatalf("line %d has seq %d, want %d (gap or reorder): %q", i, l.Seq, i+1, l.Text)
		}
	}
	if c.LineCount != uint64(len(lines)) {
		t.Errorf("command says %d lines, log has %d", c.LineCount, len(lines))
	}
	var numbered []string
	for _, txt := range stdoutLines(lines) {
		if strings.HasPrefix(txt, "line ") {
			numbered = append(numbered, txt)
		}
	}
	if len(numbered) != 200 {
		t.Fatalf("got %d numbered stdout lines, want 200", len(numbered))
	}
	for i, txt := range numbered {
		if want := fmt.Sprintf("line %d", i+1); txt != want {
			t.Fatalf("numbered line %d is %q, want %q", i, txt, want)
		}
	}
	if !slices.ContainsFunc(lines, func(l *typesv1.OutputLine) bool {
		return l.Stream == typesv1.OutputStream_OUTPUT_STREAM_STDERR && l.Text == "to stderr"
	}) {
		t.Error("the stderr line is missing or not marked as stderr")
	}
}

// TestTestCommand: every failing test script fails `test`; a host whose
// scripts pass succeeds.
func TestTestCommand(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "good", "bad")
	f.WriteScript("hosts/bad/tests/02-backup-fresh.sh", "#!/bin/sh\necho 'backup is 9 days old' >&2\nexit 1\n")
	f.WriteScript("hosts/bad/tests/03-disk-space.sh", "#!/bin/sh\necho 'disk 97% full'\nexit 3\n")
	f.WriteScript("hosts/good/tests/02-disk-space.sh", "#!/bin/sh\necho 'disk 40% full'\n")
	f.Commit("Tests")
	s.StartAgent(f, "good", AgentOptions{})
	s.StartAgent(f, "bad", AgentOptions{})
	s.WaitOnline("good")
	s.WaitOnline("bad")

	good := s.RunCommand("good", "test")
	bad := s.RunCommand("bad", "test")
	if good = s.WaitCommand(good.CommandId); good.State != typesv1.CommandState_COMMAND_STATE_SUCCEEDED {
		t.Errorf("test on good ended %s: %s", good.State, good.Message)
	}
	if bad = s.WaitCommand(bad.CommandId); bad.State != typesv1.CommandState_COMMAND_STATE_FAILED {
		t.Errorf("test on bad ended %s, want FAILED: %s", bad.State, bad.Message)
	}
	if !slices.Contains(stdoutLines(s.CommandLog(bad.CommandId)), "disk 97% full") {
		t.Error("the failing script's output is not in the log")
	}
	// Both failing scripts count, not only the last one.
	waitFor(t, stateTimeout, func() (bool, string) {
		rep := s.Host("bad").GetTests()
		ok := rep.GetTotal() == 3 && rep.GetPassed() == 1 &&
			slices.Equal(rep.GetFailed(), []string{"02-backup-fresh.sh", "03-disk-space.sh"})
		return ok, fmt.Sprintf("test report of bad: %v", rep)
	})
	waitFor(t, stateTimeout, func() (bool, string) {
		rep := s.Host("good").GetTests()
		return rep.GetTotal() == 2 && rep.GetPassed() == 2 && len(rep.GetFailed()) == 0, fmt.Sprintf("test report of good: %v", rep)
	})
}
