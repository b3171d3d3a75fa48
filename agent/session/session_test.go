package session

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

func TestParseServer(t *testing.T) {
	for in, want := range map[string]Target{
		"http://127.0.0.1:8080":    {Addr: "127.0.0.1:8080", Host: "127.0.0.1"},
		"http://fleet.example/":    {Addr: "fleet.example:80", Host: "fleet.example"},
		"https://fleet.example":    {Addr: "fleet.example:443", Host: "fleet.example", TLS: true},
		"https://[::1]:9443":       {Addr: "[::1]:9443", Host: "::1", TLS: true},
		"https://fleet.example:99": {Addr: "fleet.example:99", Host: "fleet.example", TLS: true},
	} {
		got, err := ParseServer(in)
		if err != nil || got != want {
			t.Errorf("ParseServer(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "127.0.0.1:8080", "grpc://x", "http://", "http://x/api", "http://u:p@x"} {
		if _, err := ParseServer(bad); err == nil {
			t.Errorf("ParseServer(%q) accepted", bad)
		}
	}
}

func TestKeepaliveNoticesWithinThreeIntervals(t *testing.T) {
	for _, iv := range []time.Duration{time.Second, 5 * time.Second, 10 * time.Second, 30 * time.Second} {
		p := KeepaliveParams(iv)
		if p.Time < minKeepaliveTime {
			t.Errorf("interval %s: ping time %s below grpc's floor", iv, p.Time)
		}
		if iv >= 5*time.Second && p.Time+p.Timeout > 3*iv {
			t.Errorf("interval %s: a dead peer is noticed after %s, more than 3 intervals", iv, p.Time+p.Timeout)
		}
		if !p.PermitWithoutStream {
			t.Error("keepalive must run without active streams too")
		}
	}
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func output(id string, n int) *agentv1.ConnectRequest {
	o := &agentv1.CommandOutput{CommandId: id}
	for i := 0; i < n; i++ {
		o.Lines = append(o.Lines, &typesv1.OutputLine{Seq: uint64(i + 1)})
	}
	return &agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Output{Output: o}}
}

func TestOutboxKeepsResultsAndDropsOldestOutput(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pending")
	o := NewOutbox(3, path, discard())
	o.Push(output("a", 1))
	o.PushResult(&agentv1.CommandResult{CommandId: "a", Outcome: agentv1.Outcome_OUTCOME_SUCCEEDED})
	o.Push(output("b", 2))
	o.Push(output("b", 3)) // full: the oldest output ("a") goes
	if o.Len() != 3 {
		t.Fatalf("len = %d", o.Len())
	}
	if m := o.peek(); m.GetResult().GetCommandId() != "a" {
		t.Fatalf("front = %v, want the result", m)
	}

	// A restarted agent finds the unsent result on disk.
	o2 := NewOutbox(0, path, discard())
	if p := o2.Pending(); p.GetCommandId() != "a" {
		t.Fatalf("reloaded pending = %v", p)
	}

	// The Hello takes the result out of the queue; the Welcome forgets it.
	r := o.helloResult()
	if r.GetCommandId() != "a" || o.Len() != 2 {
		t.Fatalf("helloResult = %v, len %d", r, o.Len())
	}
	o.welcomed(r)
	if o.Pending() != nil {
		t.Error("pending result kept after the welcome")
	}
	if o3 := NewOutbox(0, path, discard()); o3.Pending() != nil {
		t.Error("pending result still on disk after the welcome")
	}

	// Sending a result clears it too.
	o.PushResult(&agentv1.CommandResult{CommandId: "b"})
	for m := o.peek(); m != nil; m = o.peek() {
		o.sent(m)
	}
	if o.Pending() != nil || o.Len() != 0 {
		t.Errorf("after sending all: pending %v, len %d", o.Pending(), o.Len())
	}
}

func TestDialClientCertificateErrors(t *testing.T) {
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.pem")
	if err := os.WriteFile(junk, []byte("not PEM\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"certificate over plain HTTP", Config{Server: "http://127.0.0.1:1", ClientCertFile: junk, ClientKeyFile: junk}, "needs an https server"},
		{"certificate without key", Config{Server: "https://127.0.0.1:1", ClientCertFile: junk}, "needs both --tls-client-cert and --tls-client-key"},
		{"key without certificate", Config{Server: "https://127.0.0.1:1", ClientKeyFile: junk}, "needs both"},
		{"unreadable pair", Config{Server: "https://127.0.0.1:1", ClientCertFile: junk, ClientKeyFile: filepath.Join(dir, "missing")}, "load client certificate " + junk},
	} {
		conn, err := Dial(tc.cfg)
		if err == nil {
			conn.Close()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Dial = %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}
