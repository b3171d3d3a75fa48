package hub

import (
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
)

// TestRecordChangedOnlyWhenTheHelloChangesIt: a reconnect with the same
// hello changes nothing durable; any field the hello carries into the record
// does.
func TestRecordChangedOnlyWhenTheHelloChangesIt(t *testing.T) {
	th := newTestHub(t, 0, "a")
	base := &agentv1.Hello{Hostname: "a", AgentVersion: "1.0.0", Generation: "aaaaaaa1", LockHash: "11", OsVersion: "NixOS 26.05",
		RepoUrl: "https://example.com/fleet.git", HeartbeatInterval: durationpb.New(5 * time.Second)}
	connect := func(h *agentv1.Hello) bool {
		t.Helper()
		c, _, err := th.Connect("a", h, &recSender{}, func(error) {})
		if err != nil {
			t.Fatal(err)
		}
		return c.RecordChanged()
	}
	if !connect(base) {
		t.Fatal("the first hello of a new host changed nothing")
	}
	if connect(proto.Clone(base).(*agentv1.Hello)) {
		t.Fatal("the same hello again changed the record")
	}
	for name, edit := range map[string]func(*agentv1.Hello){
		"agent version": func(h *agentv1.Hello) { h.AgentVersion = "1.0.1" },
		"generation":    func(h *agentv1.Hello) { h.Generation = "bbbbbbb2" },
		"lock hash":     func(h *agentv1.Hello) { h.LockHash = "22" },
		"os version":    func(h *agentv1.Hello) { h.OsVersion = "NixOS 26.11" },
		"repository":    func(h *agentv1.Hello) { h.RepoUrl = "https://example.com/other.git" },
		"location":      func(h *agentv1.Hello) { h.Location = "rack 7" },
		"interval":      func(h *agentv1.Hello) { h.HeartbeatInterval = durationpb.New(10 * time.Second) },
	} {
		h := proto.Clone(base).(*agentv1.Hello)
		edit(h)
		if !connect(h) {
			t.Errorf("a hello with another %s changed nothing", name)
		}
		if connect(h) {
			t.Errorf("the same hello (other %s) twice changed the record the second time", name)
		}
	}
	// A heartbeat or a command between reconnects does not make the next
	// identical hello a change.
	c, _, _ := th.Connect("a", base, &recSender{}, func(error) {})
	th.Heartbeat(c, &agentv1.Heartbeat{Metrics: metrics(3), Generation: base.Generation, LockHash: base.LockHash})
	if connect(base) {
		t.Fatal("a heartbeat made the next identical hello a change")
	}
}
