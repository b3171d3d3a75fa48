package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// client runs status, refresh, run and logs against a server.
func client(ctx context.Context, cmd string, args []string, env Env) error {
	f := newFlags(cmd, env)
	t := targetFlags(f)
	follow := f.Bool("follow", false, "stream output until the command ends; exit status follows the command")
	all := f.Bool("all", false, "run on every host")
	force := f.Bool("force", false, "skip pre-checks that are safe to skip")
	pos, err := f.parse(args)
	if err != nil {
		return err
	}
	fc, c, err := t.fleet()
	if err != nil {
		return err
	}
	defer c.Close()
	switch cmd {
	case "status", "refresh":
		if len(pos) != 1 {
			return usagef("%s takes one host", cmd)
		}
		var h *fleetv1.Host
		if cmd == "status" {
			r, err := fc.GetHost(ctx, &fleetv1.GetHostRequest{HostId: pos[0]})
			if err != nil {
				return rpcErr(err)
			}
			h = r.Host
		} else {
			r, err := fc.RefreshHost(ctx, &fleetv1.RefreshHostRequest{HostId: pos[0]})
			if err != nil {
				return rpcErr(err)
			}
			h = r.Host
			if !r.Refreshed && r.Online {
				fmt.Fprintln(env.Stderr, "The agent did not answer in time; showing the last known status.")
			}
		}
		if t.json {
			b, err := jsonOut.Marshal(h)
			if err != nil {
				return err
			}
			fmt.Fprintln(env.Stdout, string(b))
			return nil
		}
		printStatus(env.Stdout, h)
		return nil
	case "run":
		if len(pos) < 1 || (len(pos) < 2 && !*all) {
			return usagef("run takes a command and hosts (or --all)")
		}
		return run(ctx, env, fc, pos[0], pos[1:], *all, *force, *follow)
	case "logs":
		if len(pos) != 1 {
			return usagef("logs takes one command id")
		}
		if *follow {
			c, err := followLog(ctx, env.Stdout, env.Stderr, fc, pos[0], "")
			if err != nil {
				return err
			}
			return exitFor(env, []*fleetv1.Command{c})
		}
		var after uint64
		for {
			r, err := fc.GetCommandLog(ctx, &fleetv1.GetCommandLogRequest{CommandId: pos[0], AfterSeq: after})
			if err != nil {
				return rpcErr(err)
			}
			for _, l := range r.Lines {
				printLine(env.Stdout, "", l)
				after = l.Seq
			}
			if !r.More {
				return nil
			}
		}
	}
	return usagef("unknown command %q", cmd)
}

func printStatus(w io.Writer, h *fleetv1.Host) {
	state := "offline"
	if h.Online {
		state = "online"
	}
	fmt.Fprintf(w, "%s  %s  %s  agent %s  generation %s\n", h.HostId, state, hostTypeName(h.HostType), dash(h.AgentVersion), dash(short(h.Generation)))
	us := h.GetUpdateStatus()
	for _, c := range []struct {
		name string
		c    *typesv1.Compartment
	}{{"agent", us.GetAgent()}, {"git", us.GetGit()}, {"lock", us.GetLock()}, {"system", us.GetSystem()}, {"tests", us.GetTests()}} {
		fmt.Fprintf(w, "  %-7s %-9s %s\n", c.name, comp(c.c), c.c.GetMessage())
	}
	if rc := h.GetRunningCommand(); rc != nil {
		fmt.Fprintf(w, "  running %s (%s)\n", rc.Command, rc.CommandId)
	}
}

func printLine(w io.Writer, prefix string, l *typesv1.OutputLine) {
	mark := ""
	switch l.Stream {
	case typesv1.OutputStream_OUTPUT_STREAM_STDERR:
		mark = "! "
	case typesv1.OutputStream_OUTPUT_STREAM_SYSTEM:
		mark = "# "
	}
	fmt.Fprintf(w, "%s%s%s\n", prefix, mark, l.Text)
}

func run(ctx context.Context, env Env, fc fleetv1.FleetServiceClient, cmd string, hostIDs []string, all, force, follow bool) error {
	if all {
		r, err := fc.ListHosts(ctx, &fleetv1.ListHostsRequest{})
		if err != nil {
			return rpcErr(err)
		}
		hostIDs = nil
		for _, h := range r.Hosts {
			hostIDs = append(hostIDs, h.HostId)
		}
	}
	var started []*fleetv1.Command
	failed := false
	for _, h := range hostIDs {
		r, err := fc.RunCommand(ctx, &fleetv1.RunCommandRequest{HostId: h, Command: cmd, Force: force})
		if err != nil {
			fmt.Fprintf(env.Stderr, "%s: %v\n", h, rpcErr(err))
			failed = true
			continue
		}
		fmt.Fprintf(env.Stderr, "%s: %s queued as %s\n", h, cmd, r.Command.CommandId)
		if !follow {
			fmt.Fprintln(env.Stdout, r.Command.CommandId)
		}
		started = append(started, r.Command)
	}
	if !follow {
		if failed {
			return exitError{ExitFailure}
		}
		return nil
	}
	type res struct {
		c   *fleetv1.Command
		err error
	}
	out := &lockedWriter{w: env.Stdout}
	ch := make(chan res, len(started))
	for _, c := range started {
		prefix := ""
		if len(started) > 1 {
			prefix = c.HostId + " | "
		}
		go func() {
			c, err := followLog(ctx, out, env.Stderr, fc, c.CommandId, prefix)
			ch <- res{c, err}
		}()
	}
	var ended []*fleetv1.Command
	for range started {
		r := <-ch
		if r.err != nil {
			fmt.Fprintln(env.Stderr, r.err)
			failed = true
			continue
		}
		ended = append(ended, r.c)
	}
	if err := exitFor(env, ended); err != nil || failed {
		return exitError{ExitFailure}
	}
	return nil
}

// followLog prints a command's log from the start until the command ends
// and returns the ended command. A server that restarts or a connection that
// drops is waited for (up to reconnectFor) and the log resumes after the
// last line printed, so no line is lost or printed twice.
func followLog(ctx context.Context, w, notes io.Writer, fc fleetv1.FleetServiceClient, id, prefix string) (*fleetv1.Command, error) {
	var last uint64
	retry := newRetry()
	for {
		c, err := followOnce(ctx, w, fc, id, prefix, &last, retry.Reset)
		if err == nil {
			return c, nil
		}
		wait := retry.NextBackOff()
		if !retryable(ctx, err) || wait == backoff.Stop {
			if errors.Is(err, io.EOF) {
				return nil, fmt.Errorf("log stream of %s ended before the command did", id)
			}
			return nil, rpcErr(err)
		}
		fmt.Fprintf(notes, "%s: connection to the server lost (%v); reconnecting in %s\n", id, rpcErr(err), wait.Round(100*time.Millisecond))
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(wait):
		}
	}
}

// followOnce follows the log over one stream, printing lines after *last.
func followOnce(ctx context.Context, w io.Writer, fc fleetv1.FleetServiceClient, id, prefix string, last *uint64, progress func()) (*fleetv1.Command, error) {
	st, err := fc.FollowCommandLog(ctx, &fleetv1.FollowCommandLogRequest{CommandId: id, AfterSeq: *last})
	if err != nil {
		return nil, err
	}
	for {
		m, err := st.Recv()
		if err != nil {
			return nil, err
		}
		progress()
		for _, l := range m.Lines {
			if l.Seq <= *last {
				continue
			}
			printLine(w, prefix, l)
			*last = l.Seq
		}
		if m.Command != nil {
			return m.Command, nil
		}
	}
}

// reconnectFor is how long a waiting command keeps trying to reach a
// server that went away (a restart or an upgrade takes seconds to a minute).
var reconnectFor = 3 * time.Minute

// newRetry is the reconnect schedule of waiting commands.
func newRetry() backoff.BackOff {
	return backoff.NewExponentialBackOff(backoff.WithInitialInterval(250*time.Millisecond), backoff.WithMaxInterval(5*time.Second),
		backoff.WithMaxElapsedTime(reconnectFor))
}

// retryable: the server is restarting or the connection dropped, as opposed
// to an answer (not found, permission denied) that retrying cannot change.
func retryable(ctx context.Context, err error) bool {
	if ctx.Err() != nil {
		return false
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return true
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.Aborted, codes.Internal:
		return true
	}
	return false
}

// exitFor prints each ended command's outcome and fails unless all
// succeeded.
func exitFor(env Env, cmds []*fleetv1.Command) error {
	ok := true
	for _, c := range cmds {
		state := strings.ToLower(strings.TrimPrefix(c.State.String(), "COMMAND_STATE_"))
		fmt.Fprintf(env.Stderr, "%s: %s %s (exit %d): %s\n", c.HostId, c.Command, state, c.ExitCode, c.Message)
		if c.State != typesv1.CommandState_COMMAND_STATE_SUCCEEDED {
			ok = false
		}
	}
	if !ok {
		return exitError{ExitFailure}
	}
	return nil
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
