package status

import (
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/timestamppb"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

const (
	commitA = "aaaaaaa111111111111111111111111111111111"
	commitB = "bbbbbbb222222222222222222222222222222222"
	lockA   = "1111111111111111111111111111111111111111111111111111111111111111"
	lockB   = "2222222222222222222222222222222222222222222222222222222222222222"
)

var (
	now       = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	fetchedAt = now.Add(-30 * time.Second)
)

func target(commit, lock string) *fleetv1.FleetTarget {
	return &fleetv1.FleetTarget{GitCommit: commit, LockHash: lock, Message: "flake: update nixpkgs\n\nlong body", FetchedAt: timestamppb.New(fetchedAt)}
}

func host(mod func(h *fleetv1.Host)) *fleetv1.Host {
	h := &fleetv1.Host{HostId: "web-1", AgentVersion: "1.0.0", Generation: commitA, LockHash: lockA,
		AgentFreshness: typesv1.AgentFreshness_AGENT_FRESHNESS_FRESH}
	if mod != nil {
		mod(h)
	}
	return h
}

type want struct {
	status typesv1.CompartmentStatus
	msg    string // substring
}

const (
	unk = typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN
	okk = typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK
	out = typesv1.CompartmentStatus_COMPARTMENT_STATUS_OUTDATED
	bad = typesv1.CompartmentStatus_COMPARTMENT_STATUS_ERROR
	wrk = typesv1.CompartmentStatus_COMPARTMENT_STATUS_WORKING
)

func check(t *testing.T, name string, c *typesv1.Compartment, w want) {
	t.Helper()
	if c.GetStatus() != w.status || !strings.Contains(c.GetMessage(), w.msg) {
		t.Errorf("%s = %v %q, want %v containing %q", name, c.GetStatus(), c.GetMessage(), w.status, w.msg)
	}
	if c.GetStatus() == unk && w.msg == "" {
		t.Errorf("%s: unknown without a reason", name)
	}
}

func TestGitAndLock(t *testing.T) {
	for _, tc := range []struct {
		name      string
		host      *fleetv1.Host
		target    *fleetv1.FleetTarget
		git, lock want
	}{
		{"no target", host(nil), nil, want{unk, "No fleet target"}, want{unk, "No fleet target"}},
		{"fetch error is never ok", host(nil), &fleetv1.FleetTarget{Error: "git fetch: timeout", GitCommit: commitA, LockHash: lockA},
			want{bad, "fetch failing: git fetch: timeout"}, want{bad, "fetch failing"}},
		{"target without commit or lock", host(nil), target("", ""), want{bad, "missing gitCommit"}, want{bad, "missing lockHash"}},
		{"target without lock hash", host(nil), target(commitA, ""), want{okk, "Up to date"}, want{bad, "missing lockHash"}},
		{"target without lock hash, host without lock", host(func(h *fleetv1.Host) { h.LockHash = "" }), target(commitA, ""), want{okk, ""}, want{bad, "missing lockHash"}},
		{"fetch error without data", host(nil), &fleetv1.FleetTarget{Error: "version.json: 404"}, want{bad, "fetch failing: version.json: 404"}, want{bad, "fetch failing"}},
		{"fetch error, host unknown too", host(func(h *fleetv1.Host) { h.Generation, h.LockHash = "", "" }), &fleetv1.FleetTarget{Error: "timeout", GitCommit: commitA, LockHash: lockA},
			want{bad, "fetch failing"}, want{bad, "fetch failing"}},
		{"seven-digit prefix of another commit", host(func(h *fleetv1.Host) { h.Generation = "aaaaaab" }), target(commitA, lockA), want{out, "Behind remote (aaaaaab → aaaaaaa)"}, want{okk, ""}},
		{"full commits differing after seven digits", host(func(h *fleetv1.Host) { h.Generation = "aaaaaaa2" + commitA[8:] }), target(commitA, lockA), want{out, "Behind remote (aaaaaaa21111 → aaaaaaa11111)"}, want{okk, ""}},
		{"short unrelated commit", host(func(h *fleetv1.Host) { h.Generation = "cccccc" }), target(commitA, lockA), want{out, "cccccc → aaaaaaa"}, want{okk, ""}},
		{"behind without a message", host(nil), &fleetv1.FleetTarget{GitCommit: commitB, LockHash: lockA, FetchedAt: timestamppb.New(fetchedAt)}, want{out, "Behind remote (aaaaaaa → bbbbbbb)"}, want{okk, ""}},
		{"current", host(nil), target(commitA, lockA), want{okk, "Up to date"}, want{okk, "current"}},
		{"abbreviated host commit", host(func(h *fleetv1.Host) { h.Generation = "aaaaaaa1" }), target(commitA, lockA), want{okk, "aaaaaaa"}, want{okk, ""}},
		{"abbreviated target commit", host(nil), target("AAAAAAA1", lockA), want{okk, ""}, want{okk, ""}},
		{"six-digit abbreviation is too short to tell", host(func(h *fleetv1.Host) { h.Generation = "aaaaaa" }), target(commitA, lockA), want{unk, "too short to compare"}, want{okk, ""}},
		{"short target commit is too short to tell", host(nil), target("aaaa", lockA), want{unk, "too short to compare"}, want{okk, ""}},
		{"behind", host(nil), target(commitB, lockB), want{out, "Behind remote (aaaaaaa → bbbbbbb): flake: update nixpkgs"}, want{out, "host: 11111111, target: 22222222"}},
		{"lock case differs", host(func(h *fleetv1.Host) { h.LockHash = strings.ToUpper(lockA) }), target(commitA, lockA), want{okk, ""}, want{okk, ""}},
		{"short lock hash", host(func(h *fleetv1.Host) { h.LockHash = "abc" }), target(commitA, lockA), want{okk, ""}, want{out, "host: abc,"}},
		{"unknown generation", host(func(h *fleetv1.Host) { h.Generation = "" }), target(commitA, lockA), want{unk, "not reported its commit"}, want{okk, ""}},
		{"no lock hash", host(func(h *fleetv1.Host) { h.LockHash = "" }), target(commitA, lockA), want{okk, ""}, want{unk, "not reported a flake.lock"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			us := Compute(Inputs{Host: tc.host, Target: tc.target, ServerVersion: "1.0.0", Now: now})
			check(t, "git", us.Git, tc.git)
			check(t, "lock", us.Lock, tc.lock)
			if tc.target != nil {
				if !us.Git.CheckedAt.AsTime().Equal(fetchedAt) && tc.target.FetchedAt != nil {
					t.Errorf("git checked at %v, want the target's fetch time %v", us.Git.CheckedAt.AsTime(), fetchedAt)
				}
			} else if us.Git.CheckedAt != nil {
				t.Error("an unchecked compartment has a checked-at time")
			}
		})
	}
}

// TestBehindMessage pins the Git message format operators read.
func TestBehindMessage(t *testing.T) {
	us := Compute(Inputs{Host: host(func(h *fleetv1.Host) { h.Generation = "a1b2c3d4e5f6" }), Target: &fleetv1.FleetTarget{
		GitCommit: "e4f5a6b7c8d9", LockHash: lockA, Message: "hosts: enable ssh\n\nbody"}, Now: now})
	if want := "Behind remote (a1b2c3d → e4f5a6b): hosts: enable ssh"; us.Git.Message != want || us.Git.Status != out {
		t.Fatalf("git = %v %q, want outdated %q", us.Git.Status, us.Git.Message, want)
	}
}

// TestUnknownIsNeverOutdated: whatever is missing on the host side makes a
// compartment unknown, never outdated or error, however the target looks.
func TestUnknownIsNeverOutdated(t *testing.T) {
	bare := &fleetv1.Host{HostId: "web-1"}
	for _, tg := range []*fleetv1.FleetTarget{target(commitA, lockA), target(commitB, lockB)} {
		us := Compute(Inputs{Host: bare, Target: tg, ServerVersion: "1.0.0", Now: now})
		for name, c := range map[string]*typesv1.Compartment{"agent": us.Agent, "git": us.Git, "lock": us.Lock, "system": us.System, "tests": us.Tests} {
			if c.Status != unk {
				t.Errorf("%s of a host that reported nothing = %v %q, want unknown", name, c.Status, c.Message)
			}
			if c.Message == "" {
				t.Errorf("%s: unknown without a reason", name)
			}
		}
	}
}

func TestLongTargetMessageIsCut(t *testing.T) {
	tg := target(commitB, lockA)
	tg.Message = strings.Repeat("x", 500) + "\nsecond line"
	us := Compute(Inputs{Host: host(nil), Target: tg, Now: now})
	if len(us.Git.Message) > 260 || strings.Contains(us.Git.Message, "second line") {
		t.Fatalf("git message not cut: %d bytes", len(us.Git.Message))
	}
}

func TestAgent(t *testing.T) {
	for _, tc := range []struct {
		name   string
		host   *fleetv1.Host
		server string
		want   want
	}{
		{"current", host(nil), "1.0.0", want{okk, "1.0.0 is current"}},
		{"no version reported", host(func(h *fleetv1.Host) { h.AgentVersion = "" }), "1.0.0", want{unk, "not reported its version"}},
		{"version mismatch is outdated", host(func(h *fleetv1.Host) { h.AgentVersion = "0.9.0" }), "1.0.0", want{out, "Agent 0.9.0, server expects 1.0.0: switch the host"}},
		{"server version unknown is not green by inference", host(func(h *fleetv1.Host) { h.AgentVersion = "0.9.0" }), "", want{unk, "cannot be compared"}},
		{"stale binary after a switch", host(func(h *fleetv1.Host) {
			h.AgentVersion = "0.9.0"
			h.AgentFreshness = typesv1.AgentFreshness_AGENT_FRESHNESS_STALE
		}), "1.0.0", want{bad, "Agent 0.9.0 still runs after the last switch although the server expects 1.0.0"}},
		{"stale names the remedy", host(func(h *fleetv1.Host) {
			h.AgentVersion = "0.9.0"
			h.AgentFreshness = typesv1.AgentFreshness_AGENT_FRESHNESS_STALE
		}), "1.0.0", want{bad, "nix-collect-garbage -d"}},
		{"stale verdict from an older server expectation", host(func(h *fleetv1.Host) { h.AgentFreshness = typesv1.AgentFreshness_AGENT_FRESHNESS_STALE }), "1.0.0", want{okk, "is current"}},
		{"suspicious freshness", host(func(h *fleetv1.Host) { h.AgentFreshness = typesv1.AgentFreshness_AGENT_FRESHNESS_SUSPICIOUS }), "1.0.0", want{out, "Nix cache issue?"}},
		{"suspicious and mismatched", host(func(h *fleetv1.Host) {
			h.AgentVersion = "0.9.0"
			h.AgentFreshness = typesv1.AgentFreshness_AGENT_FRESHNESS_SUSPICIOUS
		}), "1.0.0", want{out, "server expects 1.0.0; the last switch changed only its source commit"}},
		{"freshness unknown", host(func(h *fleetv1.Host) { h.AgentFreshness = typesv1.AgentFreshness_AGENT_FRESHNESS_UNKNOWN }), "1.0.0", want{okk, ""}},
		{"freshness unset", host(func(h *fleetv1.Host) { h.AgentFreshness = typesv1.AgentFreshness_AGENT_FRESHNESS_UNSPECIFIED }), "1.0.0", want{okk, ""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			check(t, "agent", Compute(Inputs{Host: tc.host, ServerVersion: tc.server, Now: now}).Agent, tc.want)
		})
	}
}

func TestSystem(t *testing.T) {
	measured := &typesv1.Compartment{Status: out, Message: "running /nix/store/old, flake builds /nix/store/new", CheckedAt: timestamppb.New(fetchedAt)}
	for _, tc := range []struct {
		name string
		sys  *typesv1.Compartment
		want want
	}{
		{"never checked", nil, want{unk, "not checked"}},
		{"unspecified", &typesv1.Compartment{}, want{unk, "not checked"}},
		{"measured", measured, want{out, "/nix/store/old"}},
		{"left working", &typesv1.Compartment{Status: wrk, Message: "switch running"}, want{unk, "not checked"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := host(func(h *fleetv1.Host) { h.UpdateStatus = &typesv1.UpdateStatus{System: tc.sys} })
			// Git and Lock being current never makes System green by inference.
			got := Compute(Inputs{Host: h, Target: target(commitA, lockA), Now: now}).System
			check(t, "system", got, tc.want)
		})
	}
}

func TestTests(t *testing.T) {
	ran := timestamppb.New(fetchedAt)
	for _, tc := range []struct {
		name  string
		tests *typesv1.TestReport
		want  want
	}{
		{"never ran", nil, want{unk, "No test run"}},
		{"all passed", &typesv1.TestReport{Passed: 3, Total: 3, Generation: commitA, RanAt: ran}, want{okk, "All 3 tests passed"}},
		{"ran on an abbreviation of the generation", &typesv1.TestReport{Passed: 3, Total: 3, Generation: "aaaaaaa1"}, want{okk, ""}},
		{"passed without a generation is not green", &typesv1.TestReport{Passed: 1, Total: 1}, want{unk, "unknown generation"}},
		{"failed without a generation", &typesv1.TestReport{Passed: 0, Total: 1, Failed: []string{"boot"}}, want{bad, "1 of 1 tests failed: boot"}},
		{"failing", &typesv1.TestReport{Passed: 1, Total: 3, Failed: []string{"boot", "ssh"}, Generation: commitA}, want{bad, "2 of 3 tests failed: boot, ssh"}},
		{"no tests", &typesv1.TestReport{Generation: commitA}, want{bad, "No tests found"}},
		{"outdated by a generation change", &typesv1.TestReport{Passed: 3, Total: 3, Generation: commitB}, want{out, "Tests ran on bbbbbbb; the host now runs aaaaaaa"}},
		{"outdated wins over failing", &typesv1.TestReport{Passed: 0, Total: 3, Generation: commitB}, want{out, ""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := host(func(h *fleetv1.Host) { h.Tests = tc.tests })
			got := Compute(Inputs{Host: h, Now: now}).Tests
			check(t, "tests", got, tc.want)
			if tc.tests.GetRanAt() != nil && !got.CheckedAt.AsTime().Equal(fetchedAt) {
				t.Errorf("tests checked at %v, want the run time", got.CheckedAt.AsTime())
			}
		})
	}
}

func TestWorkingOverlay(t *testing.T) {
	measured := &typesv1.Compartment{Status: okk, Message: "current"}
	tests := &typesv1.TestReport{Passed: 1, Total: 1, Generation: commitA}
	for _, tc := range []struct {
		command string
		working []string
	}{
		{"pull", []string{"git", "lock"}},
		{"switch", []string{"system"}},
		{"rollback", []string{"system"}},
		{"pull-switch", []string{"git", "lock", "system"}},
		{"test", []string{"tests"}},
		{"refresh", nil},
		{"reboot", nil},
	} {
		t.Run(tc.command, func(t *testing.T) {
			h := host(func(h *fleetv1.Host) {
				h.UpdateStatus = &typesv1.UpdateStatus{System: measured}
				h.Tests = tests
			})
			us := Compute(Inputs{Host: h, Target: target(commitA, lockA), ServerVersion: "1.0.0", Now: now,
				Running: &fleetv1.Command{CommandId: "cmd-1", Command: tc.command}})
			all := map[string]*typesv1.Compartment{"agent": us.Agent, "git": us.Git, "lock": us.Lock, "system": us.System, "tests": us.Tests}
			isWorking := map[string]bool{}
			for _, n := range tc.working {
				isWorking[n] = true
			}
			for n, c := range all {
				if isWorking[n] {
					check(t, n, c, want{wrk, tc.command + " running"})
				} else if c.Status != okk {
					t.Errorf("%s = %v while %s runs, want ok", n, c.Status, tc.command)
				}
			}
			if h.UpdateStatus.System != measured || measured.Status != okk {
				t.Error("Compute changed its input")
			}
		})
	}
}

func TestSameCommitAndShort(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want bool
	}{
		{commitA, commitA, true},
		{"aaaaaaa", commitA, true},
		{commitA, "AAAAAAA1", true},
		{"aaaaaa", commitA, false},
		{"", "", false},
		{"", commitA, false},
		{commitA, commitB, false},
		{"aaaaaaa2", commitA, false},
	} {
		if got := SameCommit(tc.a, tc.b); got != tc.want {
			t.Errorf("SameCommit(%q, %q) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
	if Short(commitA) != "aaaaaaa" || Short("abc") != "abc" {
		t.Error("Short")
	}
}

// TestPendingPRInLock: an open flake-update PR is named in the Lock
// compartment without changing its verdict; a broken target stays an error
// without the note.
func TestPendingPRInLock(t *testing.T) {
	pr := &fleetv1.PendingPR{Number: 42, Title: "flake.lock: update nixpkgs\n\nbody"}
	for _, tc := range []struct {
		name string
		host *fleetv1.Host
		tg   *fleetv1.FleetTarget
		want want
	}{
		{"current", host(nil), target(commitA, lockA), want{okk, "flake.lock is current · update pending in PR #42: flake.lock: update nixpkgs"}},
		{"behind", host(nil), target(commitA, lockB), want{out, "· update pending in PR #42"}},
		{"unknown", host(func(h *fleetv1.Host) { h.LockHash = "" }), target(commitA, lockA), want{unk, "PR #42"}},
	} {
		us := Compute(Inputs{Host: tc.host, Target: tc.tg, PendingPR: pr, Now: now})
		check(t, tc.name, us.Lock, tc.want)
		if strings.Contains(us.Lock.Message, "body") {
			t.Errorf("%s: PR body leaked into %q", tc.name, us.Lock.Message)
		}
	}
	us := Compute(Inputs{Host: host(nil), Target: target(commitA, ""), PendingPR: pr, Now: now})
	if us.Lock.Status != bad || strings.Contains(us.Lock.Message, "PR #") {
		t.Errorf("broken target lock = %v %q, want error without the PR note", us.Lock.Status, us.Lock.Message)
	}
	// Multi-byte titles are cut on a rune boundary.
	long := &fleetv1.PendingPR{Number: 1, Title: strings.Repeat("é", 300)}
	if m := Compute(Inputs{Host: host(nil), Target: target(commitA, lockA), PendingPR: long, Now: now}).Lock.Message; !utf8.ValidString(m) {
		t.Errorf("cut title is not valid UTF-8: %q", m)
	}
}
