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
	Now     time.Time
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
	if in.Running != nil {
		overlayWorking(us, in.Running, in.Now)
	}
	return us
}

func agent(h *fleetv1.Host, want string, now time.Time) *typesv1.Compartment {
	switch {
	case h.AgentVersion == "":
		return comp(unknown, time.Time{}, "Agent has not reported its version")
	case want != "" && h.AgentVersion != want:
		return comp(outdated, now, "Agent %s, server expects %s", h.AgentVersion, want)
	}
	switch h.AgentFreshness {
	case typesv1.AgentFreshness_AGENT_FRESHNESS_STALE:
		return comp(errored, now, "Agent binary did not change with the last switch: the old agent still runs (collect garbage and switch again)")
	case typesv1.AgentFreshness_AGENT_FRESHNESS_SUSPICIOUS:
		return comp(outdated, now, "Only the agent's source commit changed, not its binary: possibly a stale Nix cache")
	}
	return comp(ok, now, "Agent %s is current", h.AgentVersion)
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
		return comp(errored, at, "Fleet target has no commit")
	case h.Generation == "":
		return comp(unknown, at, "Host has not reported its commit")
	case SameCommit(h.Generation, t.GitCommit):
		return comp(ok, at, "Up to date with remote (%s)", Short(t.GitCommit))
	}
	msg := firstLine(t.Message)
	if msg != "" {
		return comp(outdated, at, "Behind remote (%s → %s): %s", Short(h.Generation), Short(t.GitCommit), msg)
	}
	return comp(outdated, at, "Behind remote (%s → %s)", Short(h.Generation), Short(t.GitCommit))
}

func lock(h *fleetv1.Host, t *fleetv1.FleetTarget, at time.Time) *typesv1.Compartment {
	if c := targetProblem(t, at); c != nil {
		return c
	}
	switch {
	case t.LockHash == "":
		return comp(errored, at, "Fleet target has no flake.lock hash")
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
		return comp(outdated, at, "Tests ran on %s; the host now runs %s", Short(t.Generation), Short(h.Generation))
	case t.Total == 0:
		return comp(errored, at, "No tests found")
	case t.Passed < t.Total:
		return comp(errored, at, "%d of %d tests failed: %s", t.Total-t.Passed, t.Total, strings.Join(t.Failed, ", "))
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
		s = s[:200] + "…"
	}
	return s
}
