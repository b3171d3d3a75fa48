// Package validate checks input that comes from outside the control plane —
// host names, command requests, agent hellos, output lines — before it is
// stored or shown. Every check returns an error a person can act on.
package validate

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"unicode/utf8"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
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

var hexRe = regexp.MustCompile(`^[0-9a-f]*$`)

// Hello checks an agent's hello.
func Hello(h *agentv1.Hello) error {
	if err := Hostname(h.Hostname); err != nil {
		return err
	}
	if err := ThemeColor(h.ThemeColor); err != nil {
		return err
	}
	for name, v := range map[string]string{"generation": h.Generation, "lock_hash": h.LockHash, "binary_hash": h.BinaryHash} {
		if len(v) > 128 || !hexRe.MatchString(v) {
			return fmt.Errorf("%s must be lower-case hex", name)
		}
	}
	for name, v := range map[string]string{"agent_version": h.AgentVersion, "os_version": h.OsVersion, "nixpkgs_version": h.NixpkgsVersion,
		"repo_url": h.RepoUrl, "branch": h.Branch, "location": h.Location, "device_type": h.DeviceType, "store_path": h.StorePath,
		"source_commit": h.SourceCommit, "generation_message": h.GenerationMessage, "running_command_id": h.RunningCommandId} {
		if len(v) > MaxField {
			return fmt.Errorf("%s is longer than %d bytes", name, MaxField)
		}
		if !utf8.ValidString(v) {
			return fmt.Errorf("%s is not valid UTF-8", name)
		}
	}
	if d := h.GetHeartbeatInterval(); d != nil && (d.AsDuration() < 0) {
		return errors.New("heartbeat_interval is negative")
	}
	return nil
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
