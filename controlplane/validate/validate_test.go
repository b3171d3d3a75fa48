package validate

import (
	"regexp"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/durationpb"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// rfc1123Label is the lower-case RFC 1123 label the control plane accepts
// as a host name.
var rfc1123Label = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

func TestHostname(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"web-1", true},
		{"a", true},
		{"1", true},
		{"a-b-c", true},
		{"x1--y", true},
		{strings.Repeat("a", 63), true},
		{strings.Repeat("a", 64), false},
		{"", false},
		{"-web", false},
		{"web-", false},
		{"-", false},
		{"Web-1", false},
		{"web_1", false},
		{"web.example.com", false},
		{"web 1", false},
		{"wéb", false},
		{"web\x00", false},
		{"../etc", false},
		{"<script>", false},
	} {
		err := Hostname(tc.name)
		if (err == nil) != tc.ok {
			t.Errorf("Hostname(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
		if err != nil && strings.ContainsFunc(err.Error(), func(r rune) bool { return r < 0x20 }) {
			t.Errorf("Hostname(%q) error has control characters: %q", tc.name, err)
		}
	}
}

func TestThemeColorAndTokenName(t *testing.T) {
	for c, ok := range map[string]bool{"": true, "#7aa2f7": true, "#ABCDEF": true, "#abc": false, "7aa2f7": false, "#7aa2f7;": false, "red": false} {
		if (ThemeColor(c) == nil) != ok {
			t.Errorf("ThemeColor(%q) ok=%v", c, !ok)
		}
	}
	for n, ok := range map[string]bool{"ci": true, "deploy.bot_2-x": true, "": false, strings.Repeat("a", 65): false, "ci token": false, "cï": false} {
		if (APITokenName(n) == nil) != ok {
			t.Errorf("APITokenName(%q) ok=%v", n, !ok)
		}
	}
}

func goodHello() *agentv1.Hello {
	return &agentv1.Hello{Hostname: "web-1", AgentVersion: "1.2.3", Generation: "abcdef0123", LockHash: strings.Repeat("0f", 32),
		BinaryHash: "00ff", ThemeColor: "#112233", Location: "Rack 1 ✓", HeartbeatInterval: durationpb.New(5 * time.Second)}
}

func TestHello(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(h *agentv1.Hello)
		ok   bool
	}{
		{"good", func(*agentv1.Hello) {}, true},
		{"minimal", func(h *agentv1.Hello) { *h = agentv1.Hello{Hostname: "a"} }, true},
		{"bad host name", func(h *agentv1.Hello) { h.Hostname = "Web 1" }, false},
		{"bad colour", func(h *agentv1.Hello) { h.ThemeColor = "red;}" }, false},
		{"upper-case generation", func(h *agentv1.Hello) { h.Generation = "ABCDEF" }, false},
		{"non-hex lock hash", func(h *agentv1.Hello) { h.LockHash = "xyz" }, false},
		{"huge binary hash", func(h *agentv1.Hello) { h.BinaryHash = strings.Repeat("a", 129) }, false},
		{"long free text", func(h *agentv1.Hello) { h.OsVersion = strings.Repeat("x", MaxField+1) }, false},
		{"invalid UTF-8", func(h *agentv1.Hello) { h.RepoUrl = "https://\xff" }, false},
		{"negative interval", func(h *agentv1.Hello) { h.HeartbeatInterval = durationpb.New(-time.Second) }, false},
	} {
		h := goodHello()
		tc.mod(h)
		if err := Hello(h); (err == nil) != tc.ok {
			t.Errorf("%s: Hello = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

func outputOf(seqs ...uint64) *agentv1.CommandOutput {
	o := &agentv1.CommandOutput{CommandId: "cmd-1"}
	for _, s := range seqs {
		o.Lines = append(o.Lines, &typesv1.OutputLine{Seq: s, Text: "x"})
	}
	return o
}

func TestOutput(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    *agentv1.CommandOutput
		ok   bool
	}{
		{"good", outputOf(1, 2, 5), true},
		{"empty batch", outputOf(), true},
		{"no command id", &agentv1.CommandOutput{Lines: outputOf(1).Lines}, false},
		{"long command id", &agentv1.CommandOutput{CommandId: strings.Repeat("c", 65)}, false},
		{"seq zero", outputOf(0), false},
		{"repeated seq", outputOf(1, 1), false},
		{"decreasing seq", outputOf(2, 1), false},
		{"too many lines", func() *agentv1.CommandOutput {
			o := &agentv1.CommandOutput{CommandId: "c"}
			for i := range MaxBatchLines + 1 {
				o.Lines = append(o.Lines, &typesv1.OutputLine{Seq: uint64(i + 1)})
			}
			return o
		}(), false},
		{"long line", &agentv1.CommandOutput{CommandId: "c", Lines: []*typesv1.OutputLine{{Seq: 1, Text: strings.Repeat("x", MaxLineBytes+65)}}}, false},
		{"cut line with marker", &agentv1.CommandOutput{CommandId: "c", Lines: []*typesv1.OutputLine{{Seq: 1, Text: strings.Repeat("x", MaxLineBytes) + " … (cut)"}}}, true},
		{"invalid UTF-8", &agentv1.CommandOutput{CommandId: "c", Lines: []*typesv1.OutputLine{{Seq: 1, Text: "\xc3("}}}, false},
	} {
		if err := Output(tc.o); (err == nil) != tc.ok {
			t.Errorf("%s: Output = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

func TestPrintable(t *testing.T) {
	for _, tc := range []struct {
		in   string
		n    int
		want string
	}{
		{"web-1", 64, "web-1"},
		{"a\nb\x1b[31m", 64, "a?b?[31m"},
		{"\xff", 64, "\uFFFD"},
		{"abcdef", 3, "abc…"},
		{"aé", 2, "a…"}, // never half a character
		{"a€b", 3, "a…"},
	} {
		if got := Printable(tc.in, tc.n); got != tc.want {
			t.Errorf("Printable(%q, %d) = %q, want %q", tc.in, tc.n, got, tc.want)
		}
	}
}

func noControl(s string) bool {
	return !strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f })
}

func FuzzHostname(f *testing.F) {
	for _, s := range []string{"web-1", "a", "-a", "a-", "A", strings.Repeat("z", 63), strings.Repeat("z", 64), "a.b", "\x00", "é", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		err := Hostname(name)
		if (err == nil) != rfc1123Label.MatchString(name) {
			t.Fatalf("Hostname(%q) = %v, but the RFC 1123 label pattern says %v", name, err, rfc1123Label.MatchString(name))
		}
		if err != nil && (!utf8.ValidString(err.Error()) || !noControl(err.Error())) {
			t.Fatalf("error for %q is not printable: %q", name, err)
		}
	})
}

func FuzzHello(f *testing.F) {
	f.Add("web-1", "1.0.0", "abcdef1", strings.Repeat("0", 64), "#aabbcc", "Rack 1", int64(5e9))
	f.Add("Web", "", "ABC", "xyz", "red", "\xff", int64(-1))
	f.Add("a", strings.Repeat("v", 1025), "", "", "", "", int64(0))
	f.Fuzz(func(t *testing.T, hostname, version, generation, lockHash, color, location string, intervalNanos int64) {
		h := &agentv1.Hello{Hostname: hostname, AgentVersion: version, Generation: generation, LockHash: lockHash,
			ThemeColor: color, Location: location, HeartbeatInterval: durationpb.New(time.Duration(intervalNanos))}
		if err := Hello(h); err != nil {
			if !utf8.ValidString(err.Error()) || !noControl(err.Error()) {
				t.Fatalf("error is not printable: %q", err)
			}
			return
		}
		if !rfc1123Label.MatchString(hostname) {
			t.Fatalf("accepted host name %q", hostname)
		}
		for _, v := range []string{generation, lockHash} {
			if len(v) > 128 || strings.ContainsFunc(v, func(r rune) bool { return !(r >= '0' && r <= '9' || r >= 'a' && r <= 'f') }) {
				t.Fatalf("accepted non-hex %q", v)
			}
		}
		if color != "" && (len(color) != 7 || color[0] != '#') {
			t.Fatalf("accepted colour %q", color)
		}
		for _, v := range []string{version, location} {
			if !utf8.ValidString(v) || len(v) > MaxField {
				t.Fatalf("accepted free text %q", v)
			}
		}
		if intervalNanos < 0 {
			t.Fatalf("accepted negative interval %d", intervalNanos)
		}
	})
}

// FuzzOutput builds a batch from fuzzed text (one line per '\n') and seq
// steps (one byte per line; a zero step repeats a seq).
func FuzzOutput(f *testing.F) {
	f.Add("cmd-1", "hello\nworld", []byte{1, 1}, uint64(0))
	f.Add("cmd-1", "a\nb\nc", []byte{1, 0, 2}, uint64(10))
	f.Add("", "x", []byte{1}, uint64(0))
	f.Add("cmd-1", "\xc3(", []byte{1}, uint64(0))
	f.Add("cmd-1", strings.Repeat("y", MaxLineBytes+100), []byte{3}, uint64(1<<63))
	f.Fuzz(func(t *testing.T, id, text string, steps []byte, start uint64) {
		o := &agentv1.CommandOutput{CommandId: id}
		seq := start
		for i, line := range strings.Split(text, "\n") {
			step := uint64(1)
			if i < len(steps) {
				step = uint64(steps[i])
			}
			seq += step
			o.Lines = append(o.Lines, &typesv1.OutputLine{Seq: seq, Text: line})
		}
		if err := Output(o); err != nil {
			return
		}
		if o.CommandId == "" || len(o.CommandId) > 64 || len(o.Lines) > MaxBatchLines {
			t.Fatalf("accepted batch of %d lines for %q", len(o.Lines), o.CommandId)
		}
		var last uint64
		for _, l := range o.Lines {
			if l.Seq <= last {
				t.Fatalf("accepted seq %d after %d", l.Seq, last)
			}
			last = l.Seq
			if !utf8.ValidString(l.Text) || len(l.Text) > MaxLineBytes+64 {
				t.Fatalf("accepted line %q", l.Text)
			}
		}
	})
}
