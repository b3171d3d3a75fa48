package status

import (
	"strings"
	"testing"

	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

func TestJudgeFreshness(t *testing.T) {
	const (
		unknownF    = typesv1.AgentFreshness_AGENT_FRESHNESS_UNKNOWN
		fresh       = typesv1.AgentFreshness_AGENT_FRESHNESS_FRESH
		suspicious  = typesv1.AgentFreshness_AGENT_FRESHNESS_SUSPICIOUS
		stale       = typesv1.AgentFreshness_AGENT_FRESHNESS_STALE
		unspecified = typesv1.AgentFreshness_AGENT_FRESHNESS_UNSPECIFIED
	)
	old := Identity{SourceCommit: "1111111aaaa", BinaryHash: "aaaa1111bbbb", StorePath: "/nix/store/old-nixplane-agent/bin/nixplane-agent"}
	with := func(f func(*Identity)) Identity { id := old; f(&id); return id }
	for _, tc := range []struct {
		name       string
		prev, cur  Identity
		prevF      typesv1.AgentFreshness
		activation bool
		agentV     string
		want       typesv1.AgentFreshness
		msg        string
		// expect: the agent restarted because its installed binary changed.
		expect bool
	}{
		{"hash changed", old, with(func(i *Identity) { i.BinaryHash = "cccc2222dddd" }), stale, true, "1.0.0", fresh, "binary aaaa111 → cccc222", false},
		{"path changed", old, with(func(i *Identity) { i.StorePath = "/nix/store/new/bin/nixplane-agent" }), unspecified, true, "1.0.0", fresh, "path /nix/store/old", false},
		{"path and commit changed without a switch", old, with(func(i *Identity) { i.StorePath = "/x"; i.SourceCommit = "2222222" }), fresh, false, "0.9.0", fresh, "new agent binary", false},
		{"only commit changed", old, with(func(i *Identity) { i.SourceCommit = "2222222bbbb" }), fresh, true, "1.0.0", suspicious, "Nix cache issue?", false},
		{"only commit changed without a switch", old, with(func(i *Identity) { i.SourceCommit = "2222222bbbb" }), fresh, false, "1.0.0", suspicious, "2222222 instead of 1111111", false},
		{"nothing changed, change expected", old, old, fresh, true, "0.9.0", stale, "nix-collect-garbage -d", true},
		{"stale names both versions", old, old, fresh, true, "0.9.0", stale, "server expects agent 1.0.0 and 0.9.0 still runs", true},
		{"nothing changed, already the expected version", old, old, stale, true, "1.0.0", fresh, "already the version", false},
		{"nothing changed, no switch keeps fresh", old, old, fresh, false, "0.9.0", fresh, "unchanged", false},
		{"nothing changed, no switch keeps stale", old, old, stale, false, "0.9.0", stale, "unchanged", false},
		{"nothing changed, no verdict yet", old, old, unspecified, false, "1.0.0", unknownF, "unchanged", false},
		{"agent reports no identity", old, Identity{SourceCommit: "1111111aaaa"}, fresh, true, "1.0.0", unknownF, "did not report", false},
		{"nothing recorded before the switch", Identity{}, old, unspecified, true, "1.0.0", unknownF, "no agent identity was recorded before the switch", false},
		{"first connection", Identity{}, old, unspecified, false, "1.0.0", unknownF, "first", false},
		{"hash only, no path", Identity{BinaryHash: "aaaa"}, Identity{BinaryHash: "aaaa"}, fresh, true, "0.9.0", stale, "", true},
		{"nothing changed, no new agent installed", old, old, fresh, true, "0.9.0", fresh, "the fleet flake still provides agent 0.9.0", false},
		{"nothing changed, no new agent installed, no verdict yet", old, old, unspecified, true, "0.9.0", unknownF, "installed no new agent binary", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := JudgeFreshness(FreshnessInputs{Prev: tc.prev, Cur: tc.cur, PrevFreshness: tc.prevF, AfterActivation: tc.activation,
				ChangeExpected: tc.expect, AgentVersion: tc.agentV, ServerVersion: "1.0.0"})
			if got.Freshness != tc.want || !strings.Contains(got.Message, tc.msg) {
				t.Errorf("= %v %q, want %v containing %q", got.Freshness, got.Message, tc.want, tc.msg)
			}
			if got.Message == "" {
				t.Error("a verdict without a reason")
			}
		})
	}
	// Without an expected server version a switch cannot be judged stale.
	if got := JudgeFreshness(FreshnessInputs{Prev: old, Cur: old, AfterActivation: true, ChangeExpected: true, AgentVersion: "0.9.0"}); got.Freshness == stale {
		t.Errorf("stale without a server version: %v", got)
	}
}

func TestIdentityRoundTrip(t *testing.T) {
	id := Identity{SourceCommit: "c", BinaryHash: "h", StorePath: "/p"}
	h := host(nil)
	id.Set(h)
	if IdentityOf(h) != id || !id.Known() || (Identity{SourceCommit: "c"}).Known() {
		t.Fatalf("identity round trip: %+v", IdentityOf(h))
	}
}
