// Package executor runs the agent's commands as real processes: each in its
// own process group (so a stop reaches every child it started), with stdout
// and stderr split into lines as they are printed, and a stop that sends
// SIGTERM to the whole group and SIGKILL after a grace period.
package executor

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// MaxLineBytes is the longest line kept whole; longer lines are cut and end
// with a marker saying how many bytes were dropped.
const MaxLineBytes = 16 * 1024

// DefaultGrace is how long a stopped process group gets between SIGTERM and
// SIGKILL when the caller gives no grace period.
const DefaultGrace = 5 * time.Second

// pipeDrainDelay bounds how long Wait waits for output after the process
// exited, when a grandchild still holds the output pipes open.
const pipeDrainDelay = 2 * time.Second

// LineFunc receives one output line as it is printed: the stream it came
// from and its text without the trailing newline (already cut to
// [MaxLineBytes] plus a marker, not yet UTF-8 sanitised).
type LineFunc func(stream typesv1.OutputStream, text string)

// Spec describes a process to start.
type Spec struct {
	// Path is the executable (looked up in PATH when it has no slash).
	Path string
	// Args are the arguments after the program name.
	Args []string
	// Dir is the working directory; empty means the agent's.
	Dir string
	// Env is the complete environment; nil means the agent's own.
	Env []string
	// Detached starts the process in a new session (setsid) instead of only a
	// new process group, so it survives the agent being stopped by its
	// service manager (used for nix-darwin switches).
	Detached bool
}

// Process is a started command.
type Process struct {
	cmd     *exec.Cmd
	pgid    int
	out     *lineWriter
	errw    *lineWriter
	done    chan struct{}
	mu      sync.Mutex
	stopped bool
	state   *os.ProcessState
	waitErr error
}

// Start starts spec with its output sent to lines.
func Start(spec Spec, lines LineFunc) (*Process, error) {
	if spec.Path == "" {
		return nil, errors.New("executor: empty command")
	}
	cmd := exec.Command(spec.Path, spec.Args...)
	cmd.Dir = spec.Dir
	cmd.Env = spec.Env
	if spec.Detached {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	} else {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	}
	p := &Process{
		cmd:  cmd,
		out:  &lineWriter{stream: typesv1.OutputStream_OUTPUT_STREAM_STDOUT, emit: lines},
		errw: &lineWriter{stream: typesv1.OutputStream_OUTPUT_STREAM_STDERR, emit: lines},
		done: make(chan struct{}),
	}
	cmd.Stdout = p.out
	cmd.Stderr = p.errw
	cmd.WaitDelay = pipeDrainDelay
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	// With Setpgid or Setsid and no explicit Pgid the child leads its group.
	p.pgid = cmd.Process.Pid
	go func() {
		err := cmd.Wait()
		p.out.flush()
		p.errw.flush()
		p.mu.Lock()
		p.state = cmd.ProcessState
		p.waitErr = err
		p.mu.Unlock()
		close(p.done)
	}()
	return p, nil
}

// Pgid is the process group id of the command (its pid).
func (p *Process) Pgid() int { return p.pgid }

// Done is closed when the process has exited and its output is flushed.
func (p *Process) Done() <-chan struct{} { return p.done }

// Wait waits for the process and returns its exit code: the exit status, or
// 128+signal when a signal ended it. err is non-nil only when waiting itself
// failed (not for a non-zero exit).
func (p *Process) Wait() (int, error) {
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	return ExitCode(p.state), ignoreExitError(p.waitErr)
}

// Stopped reports whether Stop was called.
func (p *Process) Stopped() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stopped
}

// Stop sends SIGTERM to the process group, then SIGKILL to whatever is left
// of it after grace (DefaultGrace when zero or negative). It returns once
// the main process has exited; it is safe to call more than once.
func (p *Process) Stop(grace time.Duration) {
	if grace <= 0 {
		grace = DefaultGrace
	}
	p.mu.Lock()
	p.stopped = true
	p.mu.Unlock()
	_ = syscall.Kill(-p.pgid, syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
		// The leader is gone; children that ignored SIGTERM are not.
		if GroupAlive(p.pgid) {
			select {
			case <-t.C:
			case <-p.groupGone():
				return
			}
			_ = syscall.Kill(-p.pgid, syscall.SIGKILL)
		}
	case <-t.C:
		_ = syscall.Kill(-p.pgid, syscall.SIGKILL)
		<-p.done
	}
}

// groupGone returns a channel closed once the process group is empty.
func (p *Process) groupGone() <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		tk := time.NewTicker(20 * time.Millisecond)
		defer tk.Stop()
		for range tk.C {
			if !GroupAlive(p.pgid) {
				close(ch)
				return
			}
		}
	}()
	return ch
}

// GroupAlive reports whether any process is left in process group pgid.
// Zombies (exited, not yet reaped) do not count when /proc can tell.
func GroupAlive(pgid int) bool {
	err := syscall.Kill(-pgid, 0)
	if err != nil && !errors.Is(err, syscall.EPERM) {
		return false
	}
	alive, ok := procGroupAlive(pgid)
	if !ok {
		return true
	}
	return alive
}

// procGroupAlive scans /proc for a live (non-zombie) member of pgid; ok is
// false when /proc is not available.
func procGroupAlive(pgid int) (alive, ok bool) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return false, false
	}
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// Fields after the parenthesised command name: state ppid pgrp ...
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 3 {
			continue
		}
		if g, _ := strconv.Atoi(f[2]); g == pgid && f[0] != "Z" && f[0] != "X" {
			return true, true
		}
	}
	return false, true
}

// ExitCode turns a process state into a shell-style exit code: the exit
// status, or 128+signal number when a signal ended the process, or -1 when
// there is no state.
func ExitCode(st *os.ProcessState) int {
	if st == nil {
		return -1
	}
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return st.ExitCode()
}

func ignoreExitError(err error) error {
	var ee *exec.ExitError
	if err == nil || errors.As(err, &ee) {
		return nil
	}
	if errors.Is(err, exec.ErrWaitDelay) {
		return nil
	}
	return err
}

// lineWriter splits what a process writes into lines, keeping at most
// MaxLineBytes of each and counting the rest.
type lineWriter struct {
	stream  typesv1.OutputStream
	emit    LineFunc
	mu      sync.Mutex
	buf     []byte
	dropped int
}

var _ io.Writer = (*lineWriter)(nil)

func (w *lineWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(b)
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		part := b
		if i >= 0 {
			part = b[:i]
		}
		w.add(part)
		if i < 0 {
			break
		}
		w.line()
		b = b[i+1:]
	}
	return n, nil
}

func (w *lineWriter) add(part []byte) {
	room := MaxLineBytes - len(w.buf)
	if room >= len(part) && w.dropped == 0 {
		w.buf = append(w.buf, part...)
		return
	}
	if room > 0 && w.dropped == 0 {
		w.buf = append(w.buf, part[:room]...)
		part = part[room:]
	}
	w.dropped += len(part)
}

func (w *lineWriter) line() {
	text := bytes.TrimSuffix(w.buf, []byte{'\r'})
	w.emit(w.stream, Cut(text, w.dropped))
	w.buf = w.buf[:0]
	w.dropped = 0
}

func (w *lineWriter) flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) > 0 || w.dropped > 0 {
		w.line()
	}
}

// Cut renders a line of which dropped further bytes were cut off: it backs
// up to a UTF-8 rune boundary (counting those bytes as dropped too) and
// appends the marker "… [truncated N bytes]".
func Cut(text []byte, dropped int) string {
	if dropped == 0 {
		return string(text)
	}
	end := len(text)
	for i := len(text) - 1; i >= 0 && i >= len(text)-utf8.UTFMax; i-- {
		if utf8.RuneStart(text[i]) {
			if !utf8.FullRune(text[i:]) {
				end = i
			}
			break
		}
	}
	dropped += len(text) - end
	return string(text[:end]) + "… [truncated " + strconv.Itoa(dropped) + " bytes]"
}

// Describe renders a command line for logs and system output lines.
func Describe(spec Spec) string {
	s := spec.Path
	for _, a := range spec.Args {
		s += " " + a
	}
	if spec.Dir != "" {
		return fmt.Sprintf("%s (in %s)", s, spec.Dir)
	}
	return s
}
