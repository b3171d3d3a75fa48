// Package status computes a host's status compartments — Agent, Git, Lock,
// System, Tests — from its record, the fleet target and what is running.
//
// The rules fix the predecessor's gaps: a failing target fetch is an error,
// never ok; unknown never counts as outdated; nothing is green by inference
// that was not checked (System is what the agent measured, not a guess from
// Git and Lock).
package status

import (
	"fmt"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// Inputs is what the compartments are computed from.
type Inputs struct {
	Host *fleetv1.Host
	// Target may be nil: no target source configured.
	Target *fleetv1.FleetTarget
	// ServerVersion is the agent version the server expects.
	ServerVersion string
	// Running is the command running on the host, if any.
	Running *fleetv1.Command
	// PendingPR is the open flake-update pull request, if any; the Lock
	// compartment names it.
	PendingPR *fleetv1.PendingPR
	Now       time.Time
}

func comp(s typesv1.CompartmentStatus, at time.Time, format string, args ...any) *typesv1.Compartment {
	c := &typesv1.Compartment{Status: s, Message: fmt.Sprintf(format, args...)}
	if !at.IsZero() {
		c.CheckedAt = timestamppb.New(at)
	}
	return c
}

// Short returns the first 7 characters of a commit or hash.
func Short(s string) string {
	if len(s) > 7 {
		return s[:7]
	}
	return s
}

// shortPair abbreviates two different commits to 7 digits, or to 12 when
// 7 would make them look equal.
func shortPair(a, b string) (string, string) {
	if Short(a) != Short(b) {
		return Short(a), Short(b)
	}
	return a[:min(12, len(a))], b[:min(12, len(b))]
}

// tooShortToCompare reports whether a and b agree on their common prefix
// but one is shorter than an unambiguous abbreviation: they may or may not
// name the same commit.
func tooShortToCompare(a, b string) bool {
	a, b = strings.ToLower(a), strings.ToLower(b)
	if len(a) > len(b) {
		a, b = b, a
	}
	return len(a) < 7 && strings.HasPrefix(b, a)
}

// SameCommit reports whether two commit ids name the same commit, allowing
// one to be an abbreviation (at least 7 hex digits) of the other.
func SameCommit(a, b string) bool {
	a, b = strings.ToLower(a), strings.ToLower(b)
	if a == "" || b == "" {
		return false
	}
	if len(a) > len(b) {
		a, b = b, a
	}
	return len(a) >= 7 && strings.HasPrefix(b, a)
}

const (
	unknown  = typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN
	ok       = typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK
	outdated = typesv1.CompartmentStatus_COMPARTMENT_STATUS_OUTDATED
	errored  = typesv1.CompartmentStatus_COMPARTMENT_STATUS_ERROR
	working  = typesv1.CompartmentStatus_COMPARTMENT_STATUS_WORKING
)

// Compute returns the host's compartments.
func Compute(in Inputs) *typesv1.UpdateStatus {
	h := in.Host
	var targetAt time.Time
	if t := in.Target; t != nil && t.FetchedAt != nil {
		targetAt = t.FetchedAt.AsTime()
	}
	us := &typesv1.UpdateStatus{
		Agent:  agent(h, in.ServerVersion, in.Now),
		Git:    git(h, in.Target, targetAt),
		Lock:   lock(h, in.Target, targetAt),
		System: system(h),
		Tests:  tests(h),
	}
	if pr := in.PendingPR; pr != nil && us.Lock.Status != errored {
		us.Lock.Message += fmt.Sprintf(" · update pending in PR #%d: %s", pr.Number, firstLine(pr.Title))
	}
	if in.Running != nil {
		overlayWorking(us, in.Running, in.Now)
	}
	return us
}

func agent(h *fleetv1.Host, want string, now time.Time) *typesv1.Compartment {
	v := h.AgentVersion
	mismatch := want != "" && v != want
	switch {
	case v == "":
		return comp(unknown, time.Time{}, "Agent has not reported its version")
	case want == "":
		return comp(unknown, time.Time{}, "Agent %s; the server expects no particular version, so it cannot be compared", v)
	case h.AgentFreshness == typesv1.AgentFreshness_AGENT_FRESHNESS_STALE && mismatch:
		return comp(errored, now, "Agent %s still runs after the last switch although the server expects %s: the old binary did not change; %s", v, want, staleAdvice)
	case h.AgentFreshness == typesv1.AgentFreshness_AGENT_FRESHNESS_SUSPICIOUS && mismatch:
		return comp(outdated, now, "Agent %s, server expects %s; the last switch changed only its source commit, not its binary: %s", v, want, suspiciousAdvice)
	case mismatch:
		return comp(outdated, now, "Agent %s, server expects %s: switch the host to a configuration with the new agent", v, want)
	case h.AgentFreshness == typesv1.AgentFreshness_AGENT_FRESHNESS_SUSPICIOUS:
		return comp(outdated, now, "Agent %s: the last switch changed only its source commit, not its binary: %s", v, suspiciousAdvice)
	}
	// A stale verdict with matching versions means the server's expectation
	// changed since: the running agent is the one it expects now.
	return comp(ok, now, "Agent %s is current", v)
}

// targetProblem is the compartment both Git and Lock show when the target
// itself cannot be compared against, or nil when it can.
func targetProblem(t *fleetv1.FleetTarget, at time.Time) *typesv1.Compartment {
	switch {
	case t == nil:
		return comp(unknown, time.Time{}, "No fleet target configured")
	case t.Error != "":
		return comp(errored, at, "Fleet target fetch failing: %s", t.Error)
	}
	return nil
}

func git(h *fleetv1.Host, t *fleetv1.FleetTarget, at time.Time) *typesv1.Compartment {
	if c := targetProblem(t, at); c != nil {
		return c
	}
	switch {
	case t.GitCommit == "":
		return comp(errored, at, "Fleet target is missing gitCommit: the fleet repository branch or version.json names no commit")
	case h.Generation == "":
		return comp(unknown, at, "Host has not reported its commit")
	case SameCommit(h.Generation, t.GitCommit):
		return comp(ok, at, "Up to date with remote (%s)", Short(t.GitCommit))
	case tooShortToCompare(h.Generation, t.GitCommit):
		return comp(unknown, at, "Host commit %s and target commit %s are too short to compare", h.Generation, t.GitCommit)
	}
	from, to := shortPair(h.Generation, t.GitCommit)
	if msg := firstLine(t.Message); msg != "" {
		return comp(outdated, at, "Behind remote (%s → %s): %s", from, to, msg)
	}
	return comp(outdated, at, "Behind remote (%s → %s)", from, to)
}

func lock(h *fleetv1.Host, t *fleetv1.FleetTarget, at time.Time) *typesv1.Compartment {
	if c := targetProblem(t, at); c != nil {
		return c
	}
	switch {
	case t.LockHash == "":
		return comp(errored, at, "Fleet target is missing lockHash: no flake.lock at the target commit, or version.json has no lockHash")
	case h.LockHash == "":
		return comp(unknown, at, "Host has not reported a flake.lock hash")
	case strings.EqualFold(h.LockHash, t.LockHash):
		return comp(ok, at, "flake.lock is current")
	}
	return comp(outdated, at, "flake.lock outdated (host: %s, target: %s)", h.LockHash[:min(8, len(h.LockHash))], t.LockHash[:min(8, len(t.LockHash))])
}

// system is what the agent measured; absent a measurement it is unknown.
func system(h *fleetv1.Host) *typesv1.Compartment {
	if s := h.GetUpdateStatus().GetSystem(); s != nil && s.Status != typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNSPECIFIED && s.Status != working {
		return s
	}
	return comp(unknown, time.Time{}, "System not checked yet")
}

func tests(h *fleetv1.Host) *typesv1.Compartment {
	t := h.Tests
	if t == nil {
		return comp(unknown, time.Time{}, "No test run yet")
	}
	var at time.Time
	if t.RanAt != nil {
		at = t.RanAt.AsTime()
	}
	switch {
	case t.Generation != "" && h.Generation != "" && !SameCommit(t.Generation, h.Generation):
		return comp(outdated, at, "Tests ran on %s; the host now runs %s: run the tests again", Short(t.Generation), Short(h.Generation))
	case t.Total == 0:
		return comp(errored, at, "No tests found")
	case t.Passed < t.Total:
		return comp(errored, at, "%d of %d tests failed: %s", t.Total-t.Passed, t.Total, strings.Join(t.Failed, ", "))
	case t.Generation == "" || h.Generation == "":
		// Passing tests count only for the generation they ran on.
		return comp(unknown, at, "All %d tests passed, but on an unknown generation: run the tests again", t.Total)
	}
	return comp(ok, at, "All %d tests passed", t.Total)
}

// overlayWorking marks the compartments a running command is changing.
func overlayWorking(us *typesv1.UpdateStatus, c *fleetv1.Command, now time.Time) {
	w := func() *typesv1.Compartment { return comp(working, now, "%s running", c.Command) }
	switch c.Command {
	case "pull":
		us.Git, us.Lock = w(), w()
	case "switch", "rollback":
		us.System = w()
	case "pull-switch":
		us.Git, us.Lock, us.System = w(), w(), w()
	case "test":
		us.Tests = w()
	}
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	if len(s) > 200 {
		s = strings.ToValidUTF8(s[:200], "") + "…"
	}
	return s
}

// IsTerminal reports whether a command state is final.
func IsTerminal(s typesv1.CommandState) bool {
	switch s {
	case typesv1.CommandState_COMMAND_STATE_BLOCKED, typesv1.CommandState_COMMAND_STATE_SUCCEEDED,
		typesv1.CommandState_COMMAND_STATE_PARTIAL, typesv1.CommandState_COMMAND_STATE_FAILED,
		typesv1.CommandState_COMMAND_STATE_STOPPED, typesv1.CommandState_COMMAND_STATE_TIMED_OUT:
		return true
	}
	return false
}
