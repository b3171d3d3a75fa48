package executor

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// collector records output batches.
type collector struct {
	mu      sync.Mutex
	batches []*agentv1.CommandOutput
}

func (c *collector) send(o *agentv1.CommandOutput) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.batches = append(c.batches, o)
}

func (c *collector) lines() []*typesv1.OutputLine {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*typesv1.OutputLine
	for _, b := range c.batches {
		out = append(out, b.GetLines()...)
	}
	return out
}

func script(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "s.sh")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestOutputInOrderSanitisedAndCut(t *testing.T) {
	long := strings.Repeat("x", MaxLineBytes+100)
	body := `
i=1
while [ $i -le 200 ]; do
  echo "out $i"
  if [ $((i % 50)) -eq 0 ]; then echo "err $i" >&2; fi
  i=$((i+1))
done
printf 'bad \377\376 bytes\n'
printf '%s\n' "` + long + `"
printf 'crlf\r\n'
printf 'no newline at end'
exit 3
`
	c := &collector{}
	out := NewOutput("cmd-1", c.send)
	p, err := Start(Spec{Path: script(t, body)}, out.Line)
	if err != nil {
		t.Fatal(err)
	}
	code, err := p.Wait()
	if err != nil || code != 3 {
		t.Fatalf("Wait = %d, %v; want 3", code, err)
	}
	last := out.Close()
	lines := c.lines()
	if uint64(len(lines)) != last {
		t.Fatalf("got %d lines, last seq %d", len(lines), last)
	}
	var stdout []string
	errCount := 0
	for i, l := range lines {
		if l.GetSeq() != uint64(i+1) {
			t.Fatalf("line %d has seq %d", i, l.GetSeq())
		}
		if !utf8.ValidString(l.GetText()) {
			t.Errorf("line %d is not valid UTF-8", l.GetSeq())
		}
		if l.GetTime() == nil {
			t.Errorf("line %d has no time", l.GetSeq())
		}
		switch l.GetStream() {
		case typesv1.OutputStream_OUTPUT_STREAM_STDOUT:
			stdout = append(stdout, l.GetText())
		case typesv1.OutputStream_OUTPUT_STREAM_STDERR:
			errCount++
		}
	}
	if errCount != 4 {
		t.Errorf("stderr lines = %d, want 4", errCount)
	}
	if len(stdout) != 204 {
		t.Fatalf("stdout lines = %d, want 204", len(stdout))
	}
	for i := 0; i < 200; i++ {
		if stdout[i] != "out "+strconv.Itoa(i+1) {
			t.Fatalf("stdout line %d = %q", i, stdout[i])
		}
	}
	if stdout[200] != "bad \uFFFD bytes" { // a run of invalid bytes becomes one U+FFFD
		t.Errorf("invalid UTF-8 line = %q", stdout[200])
	}
	wantCut := strings.Repeat("x", MaxLineBytes) + "… [truncated 100 bytes]"
	if stdout[201] != wantCut {
		t.Errorf("long line: len %d, suffix %q", len(stdout[201]), stdout[201][len(stdout[201])-30:])
	}
	if stdout[202] != "crlf" || stdout[203] != "no newline at end" {
		t.Errorf("tail lines = %q", stdout[202:])
	}
	c.mu.Lock()
	nb := len(c.batches)
	c.mu.Unlock()
	if nb >= len(lines) {
		t.Errorf("%d batches for %d lines: output is not batched", nb, len(lines))
	}
	for _, b := range c.batches {
		if len(b.GetLines()) > BatchLines || b.GetCommandId() != "cmd-1" {
			t.Errorf("batch of %d lines for %q", len(b.GetLines()), b.GetCommandId())
		}
	}
}

func TestCutKeepsRunesWhole(t *testing.T) {
	// "é" is two bytes; cutting between them must not leave half a rune.
	text := []byte(strings.Repeat("é", 10))
	got := Cut(text[:5], 15)
	if !utf8.ValidString(got) || !strings.HasPrefix(got, "éé… [truncated 16 bytes]") {
		t.Errorf("Cut = %q", got)
	}
}

func TestOutputFlushesWithoutMoreLines(t *testing.T) {
	c := &collector{}
	out := NewOutput("c", c.send)
	out.System("one line")
	waitFor(t, 5*time.Second, "a lone line to be flushed by the timer", func() bool { return len(c.lines()) == 1 })
}

func TestStopKillsTheWholeGroup(t *testing.T) {
	dir := t.TempDir()
	// A child that ignores SIGTERM and a grandchild sleeping: the stop must
	// reach both.
	body := `
trap '' TERM
sh -c 'trap "" TERM; sleep 300' &
sleep 300 &
echo started
wait
`
	c := &collector{}
	out := NewOutput("c", c.send)
	p, err := Start(Spec{Path: script(t, body), Dir: dir}, out.Line)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the script to start its children", func() bool {
		for _, l := range c.lines() {
			if l.GetText() == "started" {
				return true
			}
		}
		return false
	})
	if !GroupAlive(p.Pgid()) {
		t.Fatal("group not alive before stop")
	}
	p.Stop(300 * time.Millisecond)
	code, _ := p.Wait()
	if code != 128+int(syscall.SIGKILL) {
		t.Errorf("exit code = %d, want %d (SIGKILL after the grace)", code, 128+int(syscall.SIGKILL))
	}
	waitFor(t, 10*time.Second, "every process of the group to be gone", func() bool { return !GroupAlive(p.Pgid()) })
	if !p.Stopped() {
		t.Error("Stopped() = false")
	}
}

func TestStopTermIsEnough(t *testing.T) {
	c := &collector{}
	p, err := Start(Spec{Path: script(t, "echo hi\nexec sleep 300\n")}, NewOutput("c", c.send).Line)
	if err != nil {
		t.Fatal(err)
	}
	p.Stop(10 * time.Second)
	if code, _ := p.Wait(); code != 128+int(syscall.SIGTERM) {
		t.Errorf("exit code = %d, want %d", code, 128+int(syscall.SIGTERM))
	}
}

func TestStartMissingBinary(t *testing.T) {
	if _, err := Start(Spec{Path: filepath.Join(t.TempDir(), "nope")}, func(typesv1.OutputStream, string) {}); err == nil {
		t.Error("Start of a missing binary succeeded")
	}
}
