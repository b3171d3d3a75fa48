// Package validate checks input that comes from outside the control plane —
// host names, command requests, agent hellos, output lines — before it is
// stored or shown. Every check returns an error a person can act on.
package validate

import (
	"errors"
	"fmt"
	"math"
	"net/url"
	"regexp"
	"strings"
	"unicode/utf8"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// Limits on outside input.
const (
	MaxHostname   = 63
	MaxLineBytes  = 16 << 10 // agents cut longer lines
	MaxBatchLines = 4096
	MaxField      = 1024 // free-text hello fields
)

// Hostname checks an RFC 1123 label in lower case: letters, digits and '-',
// 1–63 characters, not starting or ending with '-'.
func Hostname(name string) error {
	if name == "" {
		return errors.New("host name is empty")
	}
	if len(name) > MaxHostname {
		return fmt.Errorf("host name is longer than %d characters", MaxHostname)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-' && i > 0 && i < len(name)-1:
		default:
			return fmt.Errorf("host name %q is not a valid host name: use lower-case letters, digits and '-' (not first or last)", Printable(name, 64))
		}
	}
	return nil
}

var colorRe = regexp.MustCompile(`^#[0-9a-fA-F]{6}$`)

// ThemeColor checks a #rrggbb colour; empty is allowed.
func ThemeColor(c string) error {
	if c != "" && !colorRe.MatchString(c) {
		return fmt.Errorf("theme colour %q is not #rrggbb", Printable(c, 16))
	}
	return nil
}

// hexField checks a lower-case hex digest or commit id of at most 128
// characters; empty is allowed.
func hexField(name, v string) error {
	if len(v) > 128 {
		return fmt.Errorf("%s is longer than 128 characters", name)
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return fmt.Errorf("%s must be lower-case hex", name)
		}
	}
	return nil
}

// textField checks free text from an agent: valid UTF-8, at most max bytes.
func textField(name, v string, max int) error {
	if len(v) > max {
		return fmt.Errorf("%s is longer than %d bytes", name, max)
	}
	if !utf8.ValidString(v) {
		return fmt.Errorf("%s is not valid UTF-8", name)
	}
	return nil
}

// firstErr returns the first non-nil error.
func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// Hello checks an agent's hello.
func Hello(h *agentv1.Hello) error {
	if err := Hostname(h.Hostname); err != nil {
		return err
	}
	if d := h.GetHeartbeatInterval(); d != nil && (d.AsDuration() < 0) {
		return errors.New("heartbeat_interval is negative")
	}
	if h.LastResult != nil {
		if err := Result(h.LastResult); err != nil {
			return fmt.Errorf("last_result: %w", err)
		}
	}
	return firstErr(ThemeColor(h.ThemeColor),
		hexField("generation", h.Generation), hexField("lock_hash", h.LockHash), hexField("binary_hash", h.BinaryHash),
		textField("agent_version", h.AgentVersion, MaxField), textField("os_version", h.OsVersion, MaxField),
		textField("nixpkgs_version", h.NixpkgsVersion, MaxField), textField("repo_url", h.RepoUrl, MaxField),
		textField("branch", h.Branch, MaxField), textField("location", h.Location, MaxField),
		textField("device_type", h.DeviceType, MaxField), textField("store_path", h.StorePath, MaxField),
		textField("source_commit", h.SourceCommit, MaxField), textField("generation_message", h.GenerationMessage, MaxField),
		textField("running_command_id", h.RunningCommandId, 64))
}

// Heartbeat checks a heartbeat. It runs for every heartbeat, so it only
// compares lengths and bytes: no allocation.
func Heartbeat(hb *agentv1.Heartbeat) error {
	if m := hb.Metrics; m != nil {
		for _, v := range [...]float64{m.CpuPercent, m.RamPercent, m.SwapPercent, m.Load1} {
			if math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
				return errors.New("metrics must be finite and not negative")
			}
		}
	}
	return firstErr(hexField("generation", hb.Generation), hexField("lock_hash", hb.LockHash),
		textField("running_command_id", hb.RunningCommandId, 64))
}

// Result checks a command result.
func Result(r *agentv1.CommandResult) error {
	if err := firstErr(textField("command_id", r.CommandId, 64), hexField("generation", r.Generation),
		textField("message", r.Message, MaxField)); err != nil {
		return err
	}
	return testReport(r.Tests)
}

func testReport(t *typesv1.TestReport) error {
	if t == nil {
		return nil
	}
	if len(t.Failed) > 1000 || t.Passed > t.Total {
		return errors.New("test report is inconsistent or too large")
	}
	for _, name := range t.Failed {
		if err := textField("failed test name", name, 256); err != nil {
			return err
		}
	}
	return hexField("test generation", t.Generation)
}

// Status checks an agent's status report.
func Status(st *agentv1.StatusReport) error {
	if err := firstErr(textField("request_id", st.RequestId, 64), hexField("generation", st.Generation),
		textField("generation_message", st.GenerationMessage, MaxField), hexField("lock_hash", st.LockHash)); err != nil {
		return err
	}
	if s := st.System; s != nil {
		if err := firstErr(textField("system message", s.Message, MaxField), textField("current_path", s.CurrentPath, MaxField),
			textField("expected_path", s.ExpectedPath, MaxField)); err != nil {
			return err
		}
	}
	return testReport(st.Tests)
}

// AgentMessage checks any message an agent sends after its hello, in one
// place, before anything stores or shows it.
func AgentMessage(m *agentv1.ConnectRequest) error {
	switch x := m.Msg.(type) {
	case *agentv1.ConnectRequest_Heartbeat:
		return Heartbeat(x.Heartbeat)
	case *agentv1.ConnectRequest_Output:
		return Output(x.Output)
	case *agentv1.ConnectRequest_Result:
		return Result(x.Result)
	case *agentv1.ConnectRequest_Progress:
		return firstErr(textField("command_id", x.Progress.CommandId, 64), textField("phase", x.Progress.Phase, 256))
	case *agentv1.ConnectRequest_Rejected:
		return firstErr(textField("command_id", x.Rejected.CommandId, 64), textField("message", x.Rejected.Message, MaxField),
			textField("running_command_id", x.Rejected.RunningCommandId, 64))
	case *agentv1.ConnectRequest_Status:
		return Status(x.Status)
	case *agentv1.ConnectRequest_Hello:
		return errors.New("hello may only be sent once")
	}
	return errors.New("empty or unknown message")
}

// Output checks a batch of output lines: at most MaxBatchLines, each valid
// UTF-8 of at most MaxLineBytes (plus a cut marker), with increasing seq.
func Output(o *agentv1.CommandOutput) error {
	if o.CommandId == "" || len(o.CommandId) > 64 {
		return errors.New("output without a valid command id")
	}
	if len(o.Lines) > MaxBatchLines {
		return fmt.Errorf("more than %d lines in one message", MaxBatchLines)
	}
	var last uint64
	for _, l := range o.Lines {
		if l.Seq == 0 || l.Seq <= last {
			return errors.New("output line sequence numbers must increase")
		}
		last = l.Seq
		if len(l.Text) > MaxLineBytes+64 {
			return fmt.Errorf("output line %d is longer than %d bytes", l.Seq, MaxLineBytes)
		}
		if !utf8.ValidString(l.Text) {
			return fmt.Errorf("output line %d is not valid UTF-8", l.Seq)
		}
	}
	return nil
}

// Printable returns s cut to n bytes with control characters replaced, safe
// to put in an error message or log.
func Printable(s string, n int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	if len(s) > n {
		for n > 0 && !utf8.RuneStart(s[n]) {
			n-- // cut between characters, never inside one
		}
		s = s[:n] + "…"
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return '?'
		}
		return r
	}, s)
}

// APITokenName checks an API token name: 1–64 of letters, digits, '.', '_', '-'.
func APITokenName(name string) error {
	if name == "" || len(name) > 64 {
		return errors.New("token name must be 1 to 64 characters")
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("token name %q may only hold letters, digits, '.', '_' and '-'", Printable(name, 64))
		}
	}
	return nil
}

// RedactURL hides the password (or token) of a URL meant for readers: a
// fleet repository cloned over HTTPS often carries one
// (https://oauth2:TOKEN@host/…, https://TOKEN@host/…). Other strings (ssh
// and scp-like addresses, paths) are returned as they are.
func RedactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.User == nil {
		return raw
	}
	if _, has := u.User.Password(); !has && (u.Scheme == "http" || u.Scheme == "https") {
		// https://TOKEN@host/…: the user name is the secret (an ssh
		// user name is not).
		u.User = url.User("xxxxx")
	}
	return u.Redacted()
}
