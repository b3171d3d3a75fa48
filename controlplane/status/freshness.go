package status

import (
	"fmt"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// Identity is what identifies a running agent binary: the commit it was
// built from, the sha256 of the executable and its resolved path (a
// /nix/store path on Nix hosts). Comparing the identity a host reported
// before a switch with the one after it tells whether the switch really
// replaced the agent.
type Identity struct {
	SourceCommit, BinaryHash, StorePath string
}

// IdentityOf returns the agent identity recorded in a host record.
func IdentityOf(h *fleetv1.Host) Identity {
	return Identity{SourceCommit: h.GetAgentSourceCommit(), BinaryHash: h.GetAgentBinaryHash(), StorePath: h.GetAgentStorePath()}
}

// Set records id in a host record.
func (id Identity) Set(h *fleetv1.Host) {
	h.AgentSourceCommit, h.AgentBinaryHash, h.AgentStorePath = id.SourceCommit, id.BinaryHash, id.StorePath
}

// Known reports whether the identity can be compared: it has the binary's
// hash or path. A source commit alone ("unknown" in untagged builds) is not
// enough.
func (id Identity) Known() bool { return id.BinaryHash != "" || id.StorePath != "" }

// FreshnessInputs is what [JudgeFreshness] decides from.
type FreshnessInputs struct {
	// Prev is the identity recorded before (from the durable host record);
	// Cur is the one the agent reports now.
	Prev, Cur Identity
	// PrevFreshness is the freshness recorded before; it is kept when
	// nothing changed and no change was expected.
	PrevFreshness typesv1.AgentFreshness
	// AfterActivation: a switch, pull-switch or rollback ran since Prev was
	// recorded, so the agent may have been replaced.
	AfterActivation bool
	// ChangeExpected: the agent saw its installed binary change and
	// restarted to run it (CommandResult.agent_restarting).
	ChangeExpected bool
	// AgentVersion is the version the agent reports; ServerVersion the one
	// the server expects. When they differ after an activation, a new agent
	// was expected.
	AgentVersion, ServerVersion string
}

// Judgement is a freshness with what a person needs to know about it.
type Judgement struct {
	Freshness typesv1.AgentFreshness
	Message   string
}

// Advice for the operator, shared by the compartment and command messages.
const (
	staleAdvice      = "run nix-collect-garbage -d on the host and switch again"
	suspiciousAdvice = "a Nix cache issue? Rebuild the agent without the binary cache (--option narinfo-cache-negative-ttl 0) and switch again"
)

// JudgeFreshness decides whether the running agent binary is the one the
// last activation should have started (the predecessor's rules, with its
// missing implementation filled in):
//
//   - store path or binary hash changed → fresh;
//   - only the source commit changed → suspicious (a cache issue?);
//   - nothing changed after an activation that installed another agent
//     binary (the agent restarted for it) while the agent's version differs
//     from the server's → stale (the old binary still runs);
//   - nothing changed after an activation that installed no new agent → the
//     previous verdict stands (the fleet flake pins this agent; the Agent
//     compartment shows the version mismatch);
//   - nothing changed and no change expected → the previous verdict stands;
//   - identity missing on either side → unknown.
func JudgeFreshness(in FreshnessInputs) Judgement {
	prev, cur := in.Prev, in.Cur
	switch {
	case !cur.Known():
		return Judgement{typesv1.AgentFreshness_AGENT_FRESHNESS_UNKNOWN, "the agent did not report its binary's hash or path"}
	case !prev.Known() && in.AfterActivation:
		return Judgement{typesv1.AgentFreshness_AGENT_FRESHNESS_UNKNOWN, "no agent identity was recorded before the switch, so it cannot be told whether the agent changed"}
	case !prev.Known():
		return Judgement{keep(in.PrevFreshness), "first agent identity recorded"}
	case cur.BinaryHash != prev.BinaryHash || cur.StorePath != prev.StorePath:
		return Judgement{typesv1.AgentFreshness_AGENT_FRESHNESS_FRESH, "a new agent binary runs (" + change(prev, cur) + ")"}
	case cur.SourceCommit != prev.SourceCommit:
		return Judgement{typesv1.AgentFreshness_AGENT_FRESHNESS_SUSPICIOUS, fmt.Sprintf(
			"the agent reports source commit %s instead of %s, but its binary is unchanged: %s", Short(cur.SourceCommit), Short(prev.SourceCommit), suspiciousAdvice)}
	case in.AfterActivation && !in.ChangeExpected && in.ServerVersion != "" && in.AgentVersion != in.ServerVersion:
		return Judgement{keep(in.PrevFreshness), fmt.Sprintf(
			"the switch installed no new agent binary: the fleet flake still provides agent %s, the server expects %s", orUnknown(in.AgentVersion), in.ServerVersion)}
	case in.AfterActivation && in.ServerVersion != "" && in.AgentVersion != in.ServerVersion:
		return Judgement{typesv1.AgentFreshness_AGENT_FRESHNESS_STALE, fmt.Sprintf(
			"the agent binary did not change although the server expects agent %s and %s still runs: %s", in.ServerVersion, orUnknown(in.AgentVersion), staleAdvice)}
	case in.AfterActivation && in.ServerVersion == "":
		return Judgement{keep(in.PrevFreshness), "the agent binary is unchanged; the server expects no particular version"}
	case in.AfterActivation:
		return Judgement{typesv1.AgentFreshness_AGENT_FRESHNESS_FRESH, "the agent binary is unchanged and already the version the server expects"}
	}
	return Judgement{keep(in.PrevFreshness), "the agent binary is unchanged"}
}

// keep returns the recorded freshness, or unknown when none was recorded.
func keep(f typesv1.AgentFreshness) typesv1.AgentFreshness {
	if f == typesv1.AgentFreshness_AGENT_FRESHNESS_UNSPECIFIED {
		return typesv1.AgentFreshness_AGENT_FRESHNESS_UNKNOWN
	}
	return f
}

// change says what differs between two identities.
func change(prev, cur Identity) string {
	if prev.BinaryHash != cur.BinaryHash {
		return fmt.Sprintf("binary %s → %s", Short(orNone(prev.BinaryHash)), Short(orNone(cur.BinaryHash)))
	}
	return fmt.Sprintf("path %s → %s", orNone(prev.StorePath), orNone(cur.StorePath))
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

func orUnknown(s string) string {
	if s == "" {
		return "an unknown version"
	}
	return s
}
