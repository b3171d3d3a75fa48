package session

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	"google.golang.org/protobuf/proto"
)

// DefaultOutboxSize is how many messages wait for a connection before the
// oldest output is dropped.
const DefaultOutboxSize = 4096

// Outbox holds the messages the agent sends up (output, progress, results,
// rejections, status reports) in order, across reconnects: what cannot be
// sent while the server is away is sent on the next session. It is bounded;
// when full, the oldest output batch is dropped (the result's last_seq lets
// the server see the gap) — results are never dropped.
//
// The last command result is also kept apart until it has been sent: it is
// written to disk (so a restart of the agent does not lose it) and, when a
// session starts before it went out, carried in the Hello as last_result.
type Outbox struct {
	log         *slog.Logger
	max         int
	pendingPath string

	mu      sync.Mutex
	q       []*agentv1.ConnectRequest
	pending *agentv1.CommandResult
	dropped int
	notify  chan struct{}
}

// NewOutbox returns an outbox of size messages (DefaultOutboxSize when 0).
// pendingPath, when not empty, is the file the unsent result is kept in; a
// result left there by a previous run is loaded.
func NewOutbox(size int, pendingPath string, log *slog.Logger) *Outbox {
	if size <= 0 {
		size = DefaultOutboxSize
	}
	o := &Outbox{log: log, max: size, pendingPath: pendingPath, notify: make(chan struct{}, 1)}
	if pendingPath != "" {
		if b, err := os.ReadFile(pendingPath); err == nil {
			r := &agentv1.CommandResult{}
			if err := proto.Unmarshal(b, r); err == nil && r.GetCommandId() != "" {
				o.pending = r
				log.Info("loaded an unsent command result", "command_id", r.GetCommandId(), "outcome", r.GetOutcome().String())
			} else {
				log.Warn("ignoring unreadable pending result file", "path", pendingPath, "error", err)
				_ = os.Remove(pendingPath)
			}
		} else if !errors.Is(err, os.ErrNotExist) {
			log.Warn("cannot read pending result file", "path", pendingPath, "error", err)
		}
	}
	return o
}

// Push queues m.
func (o *Outbox) Push(m *agentv1.ConnectRequest) {
	o.mu.Lock()
	if len(o.q) >= o.max {
		o.dropOldestOutputLocked()
	}
	o.q = append(o.q, m)
	o.mu.Unlock()
	o.wake()
}

// PushResult queues a command result and keeps it (on disk too) until sent.
func (o *Outbox) PushResult(r *agentv1.CommandResult) {
	o.mu.Lock()
	o.pending = r
	o.persistLocked()
	o.mu.Unlock()
	o.Push(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Result{Result: r}})
}

// Pending returns the result not yet sent, or nil.
func (o *Outbox) Pending() *agentv1.CommandResult {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.pending
}

// Len is the number of queued messages.
func (o *Outbox) Len() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.q)
}

func (o *Outbox) wake() {
	select {
	case o.notify <- struct{}{}:
	default:
	}
}

func (o *Outbox) dropOldestOutputLocked() {
	for i, m := range o.q {
		if out := m.GetOutput(); out != nil {
			o.dropped += len(out.GetLines())
			o.q = append(o.q[:i], o.q[i+1:]...)
			o.log.Warn("outbox full: dropped output lines while disconnected", "command_id", out.GetCommandId(), "dropped_total", o.dropped)
			return
		}
	}
	// No output to drop: drop the oldest message that is not a result.
	for i, m := range o.q {
		if m.GetResult() == nil {
			o.q = append(o.q[:i], o.q[i+1:]...)
			return
		}
	}
}

// peek returns the first queued message, or nil.
func (o *Outbox) peek() *agentv1.ConnectRequest {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.q) == 0 {
		return nil
	}
	return o.q[0]
}

// sent removes m (the message peek returned) after a successful send.
func (o *Outbox) sent(m *agentv1.ConnectRequest) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.q) > 0 && o.q[0] == m {
		o.q = o.q[1:]
	}
	if r := m.GetResult(); r != nil && o.pending != nil && o.pending.GetCommandId() == r.GetCommandId() {
		o.pending = nil
		o.persistLocked()
	}
}

// helloResult returns the pending result for a Hello, and takes it out of
// the queue so it is not sent twice.
func (o *Outbox) helloResult() *agentv1.CommandResult {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.pending == nil {
		return nil
	}
	for i, m := range o.q {
		if r := m.GetResult(); r != nil && r.GetCommandId() == o.pending.GetCommandId() {
			o.q = append(o.q[:i], o.q[i+1:]...)
			break
		}
	}
	return o.pending
}

// welcomed forgets the pending result r after the server accepted the Hello
// that carried it.
func (o *Outbox) welcomed(r *agentv1.CommandResult) {
	if r == nil {
		return
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.pending == r {
		o.pending = nil
		o.persistLocked()
	}
}

func (o *Outbox) persistLocked() {
	if o.pendingPath == "" {
		return
	}
	if o.pending == nil {
		if err := os.Remove(o.pendingPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			o.log.Warn("cannot remove pending result file", "path", o.pendingPath, "error", err)
		}
		return
	}
	b, err := proto.Marshal(o.pending)
	if err == nil {
		tmp := o.pendingPath + ".tmp"
		if err = os.MkdirAll(filepath.Dir(o.pendingPath), 0o700); err == nil {
			if err = os.WriteFile(tmp, b, 0o600); err == nil {
				err = os.Rename(tmp, o.pendingPath)
			}
		}
	}
	if err != nil {
		o.log.Warn("cannot persist the unsent command result", "path", o.pendingPath, "error", err)
	}
}
