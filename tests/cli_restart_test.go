package tests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// TestCLIFollowSurvivesServerRestart: `nixplane run switch --follow` keeps
// following while the server restarts under it: it waits for the server,
// resumes the log after the last line it printed (no line lost, none twice)
// and exits with the command's status.
func TestCLIFollowSurvivesServerRestart(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	gate := filepath.Join(t.TempDir(), "gate")
	rebuild := "#!/bin/sh\necho 'building before the restart'\nwhile [ ! -e " + gate + " ]; do sleep 0.05; done\necho 'activating after the restart'\n"
	s.StartAgent(f, "alpha", AgentOptions{Rebuild: rebuild})
	s.WaitOnline("alpha")

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cli := exec.CommandContext(ctx, bins.nixplane, "run", "switch", "alpha", "--server", s.URL, "--follow")
	cli.Env = baseEnv("NIXPLANE_TOKEN=" + s.AdminToken)
	var stdout, stderr bytes.Buffer
	cli.Stdout, cli.Stderr = &stdout, &stderr
	if err := cli.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cli.Wait() }()

	var id string
	waitFor(t, commandTimeout, func() (bool, string) {
		r, err := s.Fleet().ListCommands(context.Background(), &fleetv1.ListCommandsRequest{HostId: "alpha"})
		if err != nil || len(r.Commands) == 0 {
			return false, fmt.Sprintf("no command yet (%v)", err)
		}
		id = r.Commands[0].CommandId
		for _, l := range s.CommandLog(id) {
			if l.Text == "building before the restart" {
				return true, ""
			}
		}
		return false, "the rebuild has not printed its first line"
	})
	s.Restart()
	s.WaitOnline("alpha")
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatal(err)
		}
		if err != nil {
			t.Fatalf("run --follow across a restart: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
		}
	case <-ctx.Done():
		t.Fatalf("run --follow did not end\nstdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
	}
	out := stdout.String()
	for _, line := range []string{"building before the restart", "activating after the restart"} {
		if n := strings.Count(out, line); n != 1 {
			t.Errorf("stdout has %q %d times, want once:\n%s", line, n, out)
		}
	}
	if !strings.Contains(stderr.String(), "reconnecting") {
		t.Errorf("stderr does not say the connection was lost and resumed:\n%s", stderr.String())
	}
	if c := s.Command(id); c.State != typesv1.CommandState_COMMAND_STATE_SUCCEEDED {
		t.Errorf("command %s ended %s: %s", id, c.State, c.Message)
	}
}
