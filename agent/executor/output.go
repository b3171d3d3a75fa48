package executor

import (
	"strings"
	"sync"
	"time"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Batching limits for [Output]: a batch is sent when it holds BatchLines
// lines or when its first line is BatchDelay old, whichever comes first.
const (
	BatchLines = 64
	BatchDelay = 20 * time.Millisecond
)

// Output numbers the output lines of one command (1-based, gap-free, in the
// order they were printed, across stdout, stderr and system lines), makes
// them valid UTF-8, and hands them to send in small batches.
type Output struct {
	commandID string
	send      func(*agentv1.CommandOutput)
	now       func() time.Time

	// sendMu keeps batches in order: it is taken before mu is released.
	sendMu sync.Mutex
	mu     sync.Mutex
	seq    uint64
	batch  []*typesv1.OutputLine
	timer  *time.Timer
	closed bool
}

// NewOutput returns an Output for commandID that passes batches to send.
// send must not block for long; it is called with no lock held, from the
// writer's goroutine or a timer's.
func NewOutput(commandID string, send func(*agentv1.CommandOutput)) *Output {
	return &Output{commandID: commandID, send: send, now: time.Now}
}

// Line adds one line. It is a [LineFunc].
func (o *Output) Line(stream typesv1.OutputStream, text string) {
	if len(text) > MaxLineBytes+64 {
		text = Cut([]byte(text[:MaxLineBytes]), len(text)-MaxLineBytes)
	}
	text = strings.ToValidUTF8(text, "\uFFFD")
	o.mu.Lock()
	if o.closed {
		o.mu.Unlock()
		return
	}
	o.seq++
	o.batch = append(o.batch, &typesv1.OutputLine{
		Seq:    o.seq,
		Stream: stream,
		Text:   text,
		Time:   timestamppb.New(o.now()),
	})
	if len(o.batch) >= BatchLines {
		o.sendAndUnlock(o.takeLocked())
		return
	}
	if o.timer == nil {
		o.timer = time.AfterFunc(BatchDelay, o.Flush)
	}
	o.mu.Unlock()
}

// System adds a line written by the agent about the command (phase changes,
// what it runs, why it stopped).
func (o *Output) System(text string) {
	o.Line(typesv1.OutputStream_OUTPUT_STREAM_SYSTEM, text)
}

// Flush sends the lines not yet sent.
func (o *Output) Flush() {
	o.mu.Lock()
	o.sendAndUnlock(o.takeLocked())
}

// Close flushes and refuses further lines; it returns the last sequence
// number sent (0 when there was no output).
func (o *Output) Close() uint64 {
	o.mu.Lock()
	out := o.takeLocked()
	o.closed = true
	seq := o.seq
	o.sendAndUnlock(out)
	return seq
}

// LastSeq is the number of the last line added.
func (o *Output) LastSeq() uint64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.seq
}

// sendAndUnlock sends out (when non-nil) in order with other batches and
// releases mu, which the caller holds.
func (o *Output) sendAndUnlock(out *agentv1.CommandOutput) {
	if out == nil {
		o.mu.Unlock()
		return
	}
	o.sendMu.Lock()
	o.mu.Unlock()
	defer o.sendMu.Unlock()
	o.send(out)
}

func (o *Output) takeLocked() *agentv1.CommandOutput {
	if o.timer != nil {
		o.timer.Stop()
		o.timer = nil
	}
	if len(o.batch) == 0 {
		return nil
	}
	out := &agentv1.CommandOutput{CommandId: o.commandID, Lines: o.batch}
	o.batch = nil
	return out
}
