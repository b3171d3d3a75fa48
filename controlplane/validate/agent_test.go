package validate

import (
	"math"
	"strings"
	"testing"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

func hb(h *agentv1.Heartbeat) *agentv1.ConnectRequest {
	return &agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Heartbeat{Heartbeat: h}}
}

func TestAgentMessage(t *testing.T) {
	long := strings.Repeat("a", MaxField+1)
	cases := []struct {
		name string
		m    *agentv1.ConnectRequest
		ok   bool
	}{
		{"heartbeat", hb(&agentv1.Heartbeat{Metrics: &typesv1.Metrics{CpuPercent: 12.5, Load1: 0.3}, Generation: "abc123", LockHash: strings.Repeat("f", 64)}), true},
		{"empty heartbeat", hb(&agentv1.Heartbeat{}), true},
		{"NaN cpu", hb(&agentv1.Heartbeat{Metrics: &typesv1.Metrics{CpuPercent: math.NaN()}}), false},
		{"infinite load", hb(&agentv1.Heartbeat{Metrics: &typesv1.Metrics{Load1: math.Inf(1)}}), false},
		{"negative ram", hb(&agentv1.Heartbeat{Metrics: &typesv1.Metrics{RamPercent: -1}}), false},
		{"generation not hex", hb(&agentv1.Heartbeat{Generation: "<script>"}), false},
		{"upper-case generation", hb(&agentv1.Heartbeat{Generation: "ABCDEF"}), false},
		{"huge lock hash", hb(&agentv1.Heartbeat{LockHash: strings.Repeat("a", 129)}), false},
		{"huge running id", hb(&agentv1.Heartbeat{RunningCommandId: strings.Repeat("c", 65)}), false},
		{"result", &agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Result{Result: &agentv1.CommandResult{CommandId: "cmd-1", Message: "ok",
			Tests: &typesv1.TestReport{Passed: 1, Total: 2, Failed: []string{"02.sh"}}}}}, true},
		{"result message too long", &agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Result{Result: &agentv1.CommandResult{CommandId: "cmd-1", Message: long}}}, false},
		{"result passed > total", &agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Result{Result: &agentv1.CommandResult{CommandId: "c",
			Tests: &typesv1.TestReport{Passed: 3, Total: 2}}}}, false},
		{"status bad UTF-8", &agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Status{Status: &agentv1.StatusReport{GenerationMessage: "\xff\xfe"}}}, false},
		{"status system path too long", &agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Status{Status: &agentv1.StatusReport{
			System: &typesv1.SystemCheck{CurrentPath: long}}}}, false},
		{"status", &agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Status{Status: &agentv1.StatusReport{RequestId: "r1", Generation: "ab",
			System: &typesv1.SystemCheck{Status: typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK, CurrentPath: "/nix/store/x"}}}}, true},
		{"progress phase too long", &agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Progress{Progress: &agentv1.CommandProgress{CommandId: "c", Phase: long}}}, false},
		{"rejected", &agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Rejected{Rejected: &agentv1.CommandRejected{CommandId: "c", Message: "busy"}}}, true},
		{"second hello", &agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: &agentv1.Hello{Hostname: "a"}}}, false},
		{"empty message", &agentv1.ConnectRequest{}, false},
	}
	for _, tc := range cases {
		if err := AgentMessage(tc.m); (err == nil) != tc.ok {
			t.Errorf("%s: err=%v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

func TestHelloLastResultChecked(t *testing.T) {
	h := &agentv1.Hello{Hostname: "web-1", LastResult: &agentv1.CommandResult{CommandId: strings.Repeat("x", 65)}}
	if Hello(h) == nil {
		t.Fatal("hello with an oversized last_result accepted")
	}
	h.LastResult.CommandId = "cmd-1"
	if err := Hello(h); err != nil {
		t.Fatalf("valid hello refused: %v", err)
	}
}

func BenchmarkHeartbeat(b *testing.B) {
	m := hb(&agentv1.Heartbeat{Metrics: &typesv1.Metrics{CpuPercent: 12.5, RamPercent: 40, Load1: 0.3},
		Generation: strings.Repeat("a", 40), LockHash: strings.Repeat("f", 64)})
	b.ReportAllocs()
	for b.Loop() {
		if err := AgentMessage(m); err != nil {
			b.Fatal(err)
		}
	}
}

// FuzzAgentMessage: any wire bytes that decode to an agent message are
// checked without panicking, and an accepted message holds only bounded,
// valid UTF-8 text.
func FuzzAgentMessage(f *testing.F) {
	for _, m := range []*agentv1.ConnectRequest{
		hb(&agentv1.Heartbeat{Generation: "abc", Metrics: &typesv1.Metrics{CpuPercent: 1}}),
		{Msg: &agentv1.ConnectRequest_Status{Status: &agentv1.StatusReport{GenerationMessage: "fix <b>"}}},
		{Msg: &agentv1.ConnectRequest_Result{Result: &agentv1.CommandResult{CommandId: "c", Tests: &typesv1.TestReport{Total: 1}}}},
	} {
		b, _ := proto.Marshal(m)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var m agentv1.ConnectRequest
		if proto.Unmarshal(b, &m) != nil {
			return
		}
		if AgentMessage(&m) != nil {
			return
		}
		if s := m.GetStatus(); s != nil && (!utf8.ValidString(s.GenerationMessage) || len(s.GenerationMessage) > MaxField) {
			t.Fatalf("accepted a bad generation message")
		}
		if r := m.GetResult(); r != nil && (!utf8.ValidString(r.Message) || len(r.Message) > MaxField) {
			t.Fatalf("accepted a bad result message")
		}
	})
}

// FuzzHelloMessage decodes any bytes as an agent's hello, as the stream
// does, and checks it without panicking; an accepted hello names a valid
// host and holds only bounded, valid UTF-8 text.
func FuzzHelloMessage(f *testing.F) {
	for _, h := range []*agentv1.Hello{
		{Hostname: "web-1", AgentVersion: "1.0.0", Generation: "abcdef1", OsVersion: "NixOS 26.05"},
		{Hostname: "web-1", LastResult: &agentv1.CommandResult{CommandId: "c1", Message: "ok"}},
		{Hostname: "Web_1", Location: "\xff", ThemeColor: "red"},
	} {
		b, _ := proto.Marshal(h)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var h agentv1.Hello
		if proto.Unmarshal(b, &h) != nil {
			return
		}
		if err := Hello(&h); err != nil {
			if !utf8.ValidString(err.Error()) {
				t.Fatalf("error is not valid UTF-8: %q", err)
			}
			return
		}
		if Hostname(h.Hostname) != nil {
			t.Fatalf("accepted host name %q", h.Hostname)
		}
		for _, v := range []string{h.AgentVersion, h.OsVersion, h.NixpkgsVersion, h.RepoUrl, h.Branch, h.Location,
			h.DeviceType, h.StorePath, h.SourceCommit, h.GenerationMessage} {
			if !utf8.ValidString(v) || len(v) > MaxField {
				t.Fatalf("accepted free text of %d bytes", len(v))
			}
		}
		if d := h.GetHeartbeatInterval(); d != nil && d.AsDuration() < 0 {
			t.Fatalf("accepted a negative heartbeat interval")
		}
	})
}
