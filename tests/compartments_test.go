package tests

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

const (
	compOK       = typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK
	compOutdated = typesv1.CompartmentStatus_COMPARTMENT_STATUS_OUTDATED
	compError    = typesv1.CompartmentStatus_COMPARTMENT_STATUS_ERROR
	compUnknown  = typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN
)

// flakeLock is a flake.lock body; rev makes two locks differ.
func flakeLock(rev string) string {
	return fmt.Sprintf(`{
  "nodes": {
    "nixpkgs": {
      "locked": { "lastModified": 1700000000, "rev": %q, "type": "github", "owner": "NixOS", "repo": "nixpkgs" },
      "original": { "owner": "NixOS", "ref": "nixos-unstable", "repo": "nixpkgs", "type": "github" }
    },
    "root": { "inputs": { "nixpkgs": "nixpkgs" } }
  },
  "root": "root",
  "version": 7
}
`, rev)
}

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// compartmentsOf returns a host's Git and Lock compartments.
func compartmentsOf(h *fleetv1.Host) (git, lock *typesv1.Compartment) {
	return h.GetUpdateStatus().GetGit(), h.GetUpdateStatus().GetLock()
}

// waitCompartments refreshes each host (which refetches the fleet target and
// asks its agent for its status) until its Git and Lock compartments have
// the wanted states, and returns the hosts as last seen.
func waitCompartments(t *testing.T, s *Server, hosts []string, git, lock typesv1.CompartmentStatus) map[string]*fleetv1.Host {
	t.Helper()
	out := map[string]*fleetv1.Host{}
	for _, id := range hosts {
		waitFor(t, stateTimeout, func() (bool, string) {
			var r fleetv1.RefreshHostResponse
			s.API("POST", "/api/hosts/"+id+"/refresh", "{}", &r)
			h := s.Host(id)
			out[id] = h
			g, l := compartmentsOf(h)
			// Refreshed: the agent's own report (the System compartment,
			// the generation) is in, not only the server's view of the target.
			return r.Refreshed && g.GetStatus() == git && l.GetStatus() == lock,
				fmt.Sprintf("%s: refreshed %v, git %v %q, lock %v %q; want git %v, lock %v", id, r.Refreshed, g.GetStatus(), g.GetMessage(), l.GetStatus(), l.GetMessage(), git, lock)
		})
	}
	return out
}

// pullAll pulls on every host and requires success.
func pullAll(t *testing.T, s *Server, hosts []string) {
	t.Helper()
	for _, id := range hosts {
		c := s.RunCommand(id, "pull")
		if c = s.WaitCommand(c.CommandId); c.State != typesv1.CommandState_COMMAND_STATE_SUCCEEDED {
			t.Fatalf("pull on %s ended %s: %s", id, c.State, c.Message)
		}
	}
}

// TestGitAndLockFollowTheOrigin: with the fleet repository as the target, a
// commit pushed to the origin turns Git outdated on every host (with the
// commit pair and message), a pull turns it ok again; a commit that changes
// flake.lock does the same for Lock.
func TestGitAndLockFollowTheOrigin(t *testing.T) {
	hosts := []string{"alpha", "beta"}
	f := NewFleet(t, hosts...)
	f.Write("flake.lock", flakeLock("1111111111111111111111111111111111111111"))
	first := f.Commit("Lock nixpkgs")
	// A long poll: only RefreshHost and pulls refetch the target here.
	s := StartServerWith(t, "--fleet-repo", f.Origin, "--target-poll", "1h")
	for _, h := range hosts {
		s.StartAgent(f, h, AgentOptions{})
		s.WaitOnline(h)
	}
	for id, h := range waitCompartments(t, s, hosts, compOK, compOK) {
		if h.Generation != first || h.LockHash != sha256Hex(flakeLock("1111111111111111111111111111111111111111")) {
			t.Fatalf("%s: generation %s lock %s before any change", id, h.Generation, h.LockHash)
		}
	}

	for _, h := range hosts {
		f.Write("hosts/"+h+"/ssh.nix", "{ ... }: { services.openssh.enable = true; }\n")
	}
	second := f.Commit("hosts: enable ssh on every host\n\nA longer body that is not shown.")
	for id, h := range waitCompartments(t, s, hosts, compOutdated, compOK) {
		g, _ := compartmentsOf(h)
		want := fmt.Sprintf("Behind remote (%s → %s): hosts: enable ssh on every host", first[:7], second[:7])
		if g.Message != want {
			t.Errorf("%s: git message %q, want %q", id, g.Message, want)
		}
		if g.CheckedAt == nil {
			t.Errorf("%s: git compartment without checked-at", id)
		}
	}
	pullAll(t, s, hosts)
	for id, h := range waitCompartments(t, s, hosts, compOK, compOK) {
		if h.Generation != second {
			t.Errorf("%s: generation %s after the pull, want %s", id, h.Generation, second)
		}
	}

	newLock := flakeLock("2222222222222222222222222222222222222222")
	f.Write("flake.lock", newLock)
	third := f.Commit("flake.lock: update nixpkgs")
	for id, h := range waitCompartments(t, s, hosts, compOutdated, compOutdated) {
		_, l := compartmentsOf(h)
		want := fmt.Sprintf("flake.lock outdated (host: %s, target: %s)", h.LockHash[:8], sha256Hex(newLock)[:8])
		if l.Message != want {
			t.Errorf("%s: lock message %q, want %q", id, l.Message, want)
		}
	}
	pullAll(t, s, hosts)
	for id, h := range waitCompartments(t, s, hosts, compOK, compOK) {
		if h.Generation != third || h.LockHash != sha256Hex(newLock) {
			t.Errorf("%s: generation %s lock %s after the pull, want %s %s", id, h.Generation, h.LockHash, third, sha256Hex(newLock))
		}
		_, l := compartmentsOf(h)
		if l.Message != "flake.lock is current" {
			t.Errorf("%s: lock message %q", id, l.Message)
		}
	}
}

// TestTargetFetchFailureIsAnError: a fleet repository that cannot be read
// makes Git and Lock errors on every host — never ok — and the System
// compartment of a host without nix says unknown and why.
func TestTargetFetchFailureIsAnError(t *testing.T) {
	f := NewFleet(t, "alpha")
	s := StartServerWith(t, "--fleet-repo", filepath.Join(t.TempDir(), "no-such-origin.git"), "--target-poll", "1h")
	dir := t.TempDir()
	s.StartAgent(f, "alpha", AgentOptions{ExtraArgs: []string{"--nix-command", filepath.Join(dir, "no-nix")}})
	s.WaitOnline("alpha")
	h := waitCompartments(t, s, []string{"alpha"}, compError, compError)["alpha"]
	g, l := compartmentsOf(h)
	if !strings.Contains(g.Message, "Fleet target fetch failing") || !strings.Contains(l.Message, "Fleet target fetch failing") {
		t.Errorf("git %q, lock %q: want the fetch failure named", g.Message, l.Message)
	}
	sys := h.GetUpdateStatus().GetSystem()
	if sys.GetStatus() != compUnknown || !strings.Contains(sys.GetMessage(), "nix is not available") {
		t.Errorf("system without nix = %v %q, want unknown saying nix is missing", sys.GetStatus(), sys.GetMessage())
	}
}

// buildAgent builds nixplane-agent into dir with extra -ldflags (a
// different version or source commit gives a different binary).
func buildAgent(t *testing.T, dir, name, ldflags string) string {
	t.Helper()
	out := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-o", out, "-ldflags", ldflags, "./cmd/nixplane-agent")
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build nixplane-agent %s: %v\n%s", ldflags, err, b)
	}
	return out
}

const buildinfoPkg = "github.com/nixplane/nixplane/cmd/internal/buildinfo"

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

func fileSHA256(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// switchThatRepoints is a rebuild stand-in whose activation points the
// installed agent link at another binary, as a real switch does when the
// configuration carries a new agent.
func switchThatRepoints(link, to string) string {
	return fmt.Sprintf("#!/bin/sh\necho \"activating $*\"\nln -sfn %q %q\n", to, link)
}

// waitAwaitingReconnect waits until a switch waits for its restarted agent.
func waitAwaitingReconnect(t *testing.T, s *Server, id string) {
	t.Helper()
	waitFor(t, commandTimeout, func() (bool, string) {
		c := s.Command(id)
		return c.State == typesv1.CommandState_COMMAND_STATE_POST_VALIDATION && strings.Contains(c.Message, "reconnect"),
			fmt.Sprintf("switch is %s: %s", c.State, c.Message)
	})
}

// TestFreshAgentAfterSwitchAcrossServerRestart: a switch installs a new
// agent binary; the agent exits for the service manager, the server
// restarts meanwhile, and the new binary reconnects. The server compares the
// identity it stored before the switch with the new one: fresh, and the
// switch succeeds saying so.
func TestFreshAgentAfterSwitchAcrossServerRestart(t *testing.T) {
	dir := t.TempDir()
	v1 := filepath.Join(dir, "agent-v1")
	copyFile(t, bins.agent, v1)
	v2 := buildAgent(t, dir, "agent-v2", "-X "+buildinfoPkg+".Commit=2222222222222222222222222222222222222222")
	link := filepath.Join(dir, "nixplane-agent")
	if err := os.Symlink(v1, link); err != nil {
		t.Fatal(err)
	}
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	a := s.StartAgent(f, "alpha", AgentOptions{Binary: link, SelfPath: link, Rebuild: switchThatRepoints(link, v2),
		ExtraArgs: []string{"--nix-command", filepath.Join(dir, "no-nix")}})
	h := s.WaitOnline("alpha")
	if h.AgentBinaryHash != fileSHA256(t, v1) || h.AgentStorePath != v1 || h.AgentSourceCommit == "" {
		t.Fatalf("identity before the switch: hash %s path %s commit %q; want %s %s", h.AgentBinaryHash, h.AgentStorePath, h.AgentSourceCommit, fileSHA256(t, v1), v1)
	}

	c := s.RunCommand("alpha", "switch")
	if code := a.WaitExit(commandTimeout); code != 101 {
		t.Fatalf("agent exit status %d after a switch that replaced it, want 101", code)
	}
	waitAwaitingReconnect(t, s, c.CommandId)
	s.Restart()
	a.Start("") // the service manager starts the installed link: now v2

	c = s.WaitCommand(c.CommandId)
	if c.State != typesv1.CommandState_COMMAND_STATE_SUCCEEDED || !strings.Contains(c.Message, "agent restarted") || !strings.Contains(c.Message, "a new agent binary runs") {
		t.Fatalf("switch ended %s: %q; want succeeded naming the new agent", c.State, c.Message)
	}
	h = s.Host("alpha")
	if h.AgentFreshness != typesv1.AgentFreshness_AGENT_FRESHNESS_FRESH || h.AgentBinaryHash != fileSHA256(t, v2) || h.AgentStorePath != v2 ||
		h.AgentSourceCommit != "2222222222222222222222222222222222222222" {
		t.Fatalf("after the switch: freshness %v hash %s path %s commit %s", h.AgentFreshness, h.AgentBinaryHash, h.AgentStorePath, h.AgentSourceCommit)
	}
	if ag := h.GetUpdateStatus().GetAgent(); ag.GetStatus() != compOK {
		t.Errorf("agent compartment %v %q", ag.GetStatus(), ag.GetMessage())
	}
}

// TestStaleAgentAfterSwitch: the host runs an outdated agent; a switch
// installs another binary but the service manager starts the old one again
// (P1100's "old binary kept running"). The identity is unchanged although
// a change was expected: stale, the switch is partial with the remedy, and
// the Agent compartment is an error saying what to do.
func TestStaleAgentAfterSwitch(t *testing.T) {
	dir := t.TempDir()
	old := buildAgent(t, dir, "agent-old", "-X "+buildinfoPkg+".Version=0.0.9")
	other := filepath.Join(dir, "agent-other")
	copyFile(t, bins.agent, other)
	link := filepath.Join(dir, "nixplane-agent")
	if err := os.Symlink(old, link); err != nil {
		t.Fatal(err)
	}
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	// The agent runs the old binary itself, not through the link.
	a := s.StartAgent(f, "alpha", AgentOptions{Binary: old, SelfPath: link, Rebuild: switchThatRepoints(link, other),
		ExtraArgs: []string{"--nix-command", filepath.Join(dir, "no-nix")}})
	h := s.WaitOnline("alpha")
	if !h.AgentOutdated || h.GetUpdateStatus().GetAgent().GetStatus() != compOutdated {
		t.Fatalf("an agent of another version: outdated=%v, compartment %v", h.AgentOutdated, h.GetUpdateStatus().GetAgent())
	}

	c := s.RunCommand("alpha", "switch")
	if code := a.WaitExit(commandTimeout); code != 101 {
		t.Fatalf("agent exit status %d, want 101", code)
	}
	waitAwaitingReconnect(t, s, c.CommandId)
	a.Start("") // still the old binary

	c = s.WaitCommand(c.CommandId)
	if c.State != typesv1.CommandState_COMMAND_STATE_PARTIAL || !strings.Contains(c.Message, "stale agent") || !strings.Contains(c.Message, "nix-collect-garbage -d") {
		t.Fatalf("switch ended %s: %q; want partial naming the stale agent and the remedy", c.State, c.Message)
	}
	h = s.Host("alpha")
	if h.AgentFreshness != typesv1.AgentFreshness_AGENT_FRESHNESS_STALE || h.AgentBinaryHash != fileSHA256(t, old) {
		t.Fatalf("after the switch: freshness %v hash %s", h.AgentFreshness, h.AgentBinaryHash)
	}
	ag := h.GetUpdateStatus().GetAgent()
	if ag.GetStatus() != compError || !strings.Contains(ag.GetMessage(), "0.0.9 still runs after the last switch") {
		t.Errorf("agent compartment %v %q", ag.GetStatus(), ag.GetMessage())
	}
}

// TestHealthCheckAfterSwitch: the agent runs the configured health check
// after a switch. One that passes within the grace period lets the switch
// succeed; one that keeps failing makes the agent roll back, and the
// command fails with the reason on the server.
func TestHealthCheckAfterSwitch(t *testing.T) {
	for _, tc := range []struct {
		name   string
		check  string
		want   typesv1.CommandState
		msg    string
		rollbk bool
	}{
		{"passes on the second try", `n=$(cat ../hc-count 2>/dev/null || echo 0); echo $((n+1)) > ../hc-count; test "$n" -ge 1 || { echo "service not up yet" >&2; exit 1; }`,
			typesv1.CommandState_COMMAND_STATE_SUCCEEDED, "", false},
		{"keeps failing", `echo "unhealthy: port 443 closed" >&2; exit 3`,
			typesv1.CommandState_COMMAND_STATE_FAILED, "health check failed (sh exited with status 3: unhealthy: port 443 closed); rolled back", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			calls := filepath.Join(dir, "rebuild-calls")
			s := StartServer(t)
			f := NewFleet(t, "alpha")
			s.StartAgent(f, "alpha", AgentOptions{
				Rebuild: fmt.Sprintf("#!/bin/sh\necho \"$*\" >> %q\necho \"rebuild $*\"\n", calls),
				ExtraArgs: []string{"--nix-command", filepath.Join(dir, "no-nix"),
					"--health-check-command", tc.check, "--health-check-grace", "3s"},
			})
			s.WaitOnline("alpha")
			c := s.RunCommand("alpha", "switch")
			c = s.WaitCommand(c.CommandId)
			if c.State != tc.want || !strings.Contains(c.Message, tc.msg) {
				t.Fatalf("switch ended %s: %q; want %s containing %q", c.State, c.Message, tc.want, tc.msg)
			}
			b, _ := os.ReadFile(calls)
			if got := strings.Contains(string(b), "switch --rollback"); got != tc.rollbk {
				t.Fatalf("rollback ran = %v, want %v; rebuild calls:\n%s", got, tc.rollbk, b)
			}
			var text []string
			for _, l := range s.CommandLog(c.CommandId) {
				text = append(text, l.Text)
			}
			log := strings.Join(text, "\n")
			if !strings.Contains(log, "health-check") {
				t.Errorf("the command log does not show the health check:\n%s", log)
			}
			if tc.rollbk {
				if !strings.Contains(log, "unhealthy: port 443 closed") || !strings.Contains(c.Message, "rolled back") {
					t.Errorf("the reason is not on the server: message %q, log:\n%s", c.Message, log)
				}
				if c.ExitCode == 0 {
					t.Error("a failed switch with exit code 0")
				}
			}
		})
	}
}

// TestTargetPollReachesWatchers: without any refresh, the server's own poll
// of the fleet repository notices a pushed commit, and every watcher gets
// each host's Git compartment turning outdated as a status change.
func TestTargetPollReachesWatchers(t *testing.T) {
	hosts := []string{"alpha", "beta"}
	f := NewFleet(t, hosts...)
	f.Write("flake.lock", flakeLock("1111111111111111111111111111111111111111"))
	first := f.Commit("Lock nixpkgs")
	s := StartServerWith(t, "--fleet-repo", f.Origin, "--target-poll", "1s")
	for _, h := range hosts {
		s.StartAgent(f, h, AgentOptions{})
		s.WaitOnline(h)
	}
	for _, id := range hosts {
		waitFor(t, stateTimeout, func() (bool, string) {
			g, l := compartmentsOf(s.Host(id))
			return g.GetStatus() == compOK && l.GetStatus() == compOK, fmt.Sprintf("%s: git %v, lock %v", id, g, l)
		})
	}
	w := s.Watch(&fleetv1.WatchFleetRequest{})
	from := w.Len()
	f.Write("motd", "welcome\n")
	second := f.Commit("motd: greet")
	want := fmt.Sprintf("Behind remote (%s → %s): motd: greet", first[:7], second[:7])
	for _, id := range hosts {
		waitFor(t, stateTimeout, func() (bool, string) {
			_, ok := w.Find(from, func(ev *fleetv1.FleetEvent) bool {
				h := ev.GetHostStatusChanged().GetHost()
				return h.GetHostId() == id && h.GetUpdateStatus().GetGit().GetMessage() == want &&
					h.GetUpdateStatus().GetGit().GetStatus() == compOutdated
			})
			return ok, fmt.Sprintf("no status change of %s with git %q on the watch (stream error %v)", id, want, w.Err())
		})
	}
}
