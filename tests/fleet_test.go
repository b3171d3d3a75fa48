package tests

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// floodLines is how many lines the flood test script prints (about 12 MB):
// far more than the socket buffers of a connection hold, so the server
// cannot hand everything to a watcher that does not read.
const floodLines = 60000

// TestWatchers: several watchers each see the host's heartbeats; a watcher
// that never reads (a grpc-web stream whose body is left unread while a
// command floods the fleet with output) delays neither the other watchers
// nor the command, and when it reads again it catches up.
func TestWatchers(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	f.WriteScript("hosts/alpha/tests/02-flood.sh", fmt.Sprintf(
		"#!/bin/sh\nseq 1 %d | sed 's/$/ %s/'\n", floodLines, strings.Repeat("flood-padding-", 13)))
	f.Commit("Flood test")
	s.StartAgent(f, "alpha", AgentOptions{})
	s.WaitOnline("alpha")

	var watchers []*Watch
	for range 3 {
		watchers = append(watchers, s.Watch(&fleetv1.WatchFleetRequest{SkipOutput: true}))
	}
	for i, w := range watchers {
		waitFor(t, stateTimeout, func() (bool, string) {
			_, snap := w.Find(0, func(ev *fleetv1.FleetEvent) bool { return ev.GetSnapshot() != nil })
			n := w.Count(0, heartbeatOf("alpha"))
			return snap && n > 0, fmt.Sprintf("watcher %d: snapshot=%v heartbeats=%d (stream error %v)", i, snap, n, w.Err())
		})
	}
	logHeartbeatSpread(t, watchers)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	blocked, err := s.GRPCWeb(ctx, "/nixplane.fleet.v1.FleetService/WatchFleet", s.AdminToken, &fleetv1.WatchFleetRequest{})
	if err != nil {
		t.Fatalf("grpc-web WatchFleet: %v", err)
	}
	defer blocked.Close()

	c := s.RunCommand("alpha", "test")
	c = s.WaitCommand(c.CommandId)
	if c.State != typesv1.CommandState_COMMAND_STATE_SUCCEEDED {
		t.Fatalf("flood test ended %s: %s", c.State, c.Message)
	}
	if c.LineCount < floodLines {
		t.Fatalf("flood command stored %d lines, want at least %d", c.LineCount, floodLines)
	}

	// The readers saw the command end and keep getting heartbeats while
	// the blocked watcher still holds its backlog.
	marks := make([]int, len(watchers))
	for i, w := range watchers {
		waitFor(t, stateTimeout, func() (bool, string) {
			_, ok := w.Find(0, func(ev *fleetv1.FleetEvent) bool {
				return ev.GetCommandComplete().GetCommand().GetCommandId() == c.CommandId
			})
			return ok, fmt.Sprintf("watcher %d has no CommandComplete for %s (stream error %v)", i, c.CommandId, w.Err())
		})
		marks[i] = w.Len()
	}
	for i, w := range watchers {
		waitFor(t, stateTimeout, func() (bool, string) {
			n := w.Count(marks[i], heartbeatOf("alpha"))
			return n >= 5, fmt.Sprintf("watcher %d: %d heartbeats since the flood ended, want 5 (stream error %v)", i, n, w.Err())
		})
	}

	// The blocked watcher, read at last, is not stale: it delivers the
	// command's end, either as the event or through a resync snapshot.
	caughtUp := make(chan error, 1)
	go func() {
		var resp fleetv1.WatchFleetResponse
		for {
			if err := blocked.Recv(&resp); err != nil {
				caughtUp <- err
				return
			}
			for _, ev := range resp.Events {
				if ev.GetCommandComplete().GetCommand().GetCommandId() == c.CommandId {
					caughtUp <- nil
					return
				}
				if snap := ev.GetSnapshot(); snap != nil && snap.Resync {
					t.Logf("the blocked watcher was resynced")
					active := false
					for _, ac := range snap.ActiveCommands {
						active = active || ac.CommandId == c.CommandId
					}
					if !active {
						caughtUp <- nil
						return
					}
				}
			}
		}
	}()
	select {
	case err := <-caughtUp:
		if err != nil {
			t.Fatalf("blocked watcher: %v", err)
		}
	case <-time.After(commandTimeout):
		t.Fatal("the blocked watcher, once read, did not learn that the command ended")
	}
}

// logHeartbeatSpread logs how far apart the watchers received the same
// heartbeat: informative only, timing is not asserted.
func logHeartbeatSpread(t *testing.T, ws []*Watch) {
	first := map[string][]time.Time{}
	for _, w := range ws {
		w.mu.Lock()
		seen := map[string]bool{}
		for _, e := range w.events {
			if hb := e.ev.GetHostHeartbeat(); hb != nil && hb.SentAt != nil {
				k := hb.SentAt.AsTime().String()
				if !seen[k] {
					seen[k] = true
					first[k] = append(first[k], e.at)
				}
			}
		}
		w.mu.Unlock()
	}
	for k, ts := range first {
		if len(ts) == len(ws) {
			lo, hi := ts[0], ts[0]
			for _, x := range ts {
				if x.Before(lo) {
					lo = x
				}
				if x.After(hi) {
					hi = x
				}
			}
			t.Logf("heartbeat sent %s reached %d watchers within %s", k, len(ts), hi.Sub(lo))
		}
	}
}

// errorInfoReason returns the reason of the ErrorInfo in a REST error body.
func errorInfoReason(t *testing.T, r restResponse) string {
	t.Helper()
	e := decodeRESTError(t, r)
	for _, d := range e.Details {
		var info struct {
			Type   string `json:"@type"`
			Reason string `json:"reason"`
		}
		if err := json.Unmarshal(d, &info); err == nil && strings.HasSuffix(info.Type, "google.rpc.ErrorInfo") {
			return info.Reason
		}
	}
	t.Errorf("no ErrorInfo in the error details: %s", r.body)
	return ""
}

// grpcReason returns the reason of the ErrorInfo in a gRPC error.
func grpcReason(err error) string {
	for _, d := range status.Convert(err).Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info.Reason
		}
	}
	return ""
}

// TestRunCommandRefused: offline and busy hosts are refused with 409 (REST)
// / FailedPrecondition (gRPC) and their reason codes.
func TestRunCommandRefused(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	s.AddHost("sleeper") // registered, never connected
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	r := s.Do("POST", "/api/hosts/sleeper/commands", s.AdminToken, []byte(`{"command": "test"}`))
	if r.code != http.StatusConflict {
		t.Errorf("RunCommand on an offline host: status %d, want 409: %s", r.code, r.body)
	}
	if got := errorInfoReason(t, r); got != "BLOCK_REASON_OFFLINE" {
		t.Errorf("offline host: reason %q, want BLOCK_REASON_OFFLINE", got)
	}
	_, err := s.Fleet().RunCommand(ctx, &fleetv1.RunCommandRequest{HostId: "sleeper", Command: "test"})
	if status.Code(err) != codes.FailedPrecondition || grpcReason(err) != "BLOCK_REASON_OFFLINE" {
		t.Errorf("gRPC RunCommand on an offline host: %v (reason %q)", err, grpcReason(err))
	}

	s.StartAgent(f, "alpha", AgentOptions{Rebuild: "#!/bin/sh\necho building\nexec sleep 1000\n"})
	s.WaitOnline("alpha")
	long := s.RunCommand("alpha", "switch")
	waitFor(t, commandTimeout, func() (bool, string) {
		c := s.Command(long.CommandId)
		return c.State == typesv1.CommandState_COMMAND_STATE_RUNNING && c.LineCount > 0, fmt.Sprintf("switch is %s with %d lines", c.State, c.LineCount)
	})
	r = s.Do("POST", "/api/hosts/alpha/commands", s.AdminToken, []byte(`{"command": "test"}`))
	if r.code != http.StatusConflict {
		t.Errorf("RunCommand on a busy host: status %d, want 409: %s", r.code, r.body)
	}
	if got := errorInfoReason(t, r); got != "BLOCK_REASON_BUSY" {
		t.Errorf("busy host: reason %q, want BLOCK_REASON_BUSY", got)
	}
	_, err = s.Fleet().RunCommand(ctx, &fleetv1.RunCommandRequest{HostId: "alpha", Command: "pull", Force: true})
	if status.Code(err) != codes.FailedPrecondition || grpcReason(err) != "BLOCK_REASON_BUSY" {
		t.Errorf("gRPC RunCommand on a busy host: %v (reason %q)", err, grpcReason(err))
	}
	// An unknown command is refused with its own reason.
	r = s.Do("POST", "/api/hosts/alpha/commands", s.AdminToken, []byte(`{"command": "format-disk"}`))
	if got := errorInfoReason(t, r); r.code != http.StatusConflict || got != "BLOCK_REASON_UNKNOWN_COMMAND" {
		t.Errorf("unknown command: status %d reason %q, want 409 BLOCK_REASON_UNKNOWN_COMMAND", r.code, got)
	}

	s.API("POST", "/api/commands/"+long.CommandId+"/stop", "{}", nil)
	if c := s.WaitCommand(long.CommandId); c.State != typesv1.CommandState_COMMAND_STATE_STOPPED {
		t.Errorf("stopped switch ended %s: %s", c.State, c.Message)
	}
	// Free again: a new command is accepted.
	waitFor(t, stateTimeout, func() (bool, string) {
		r := s.Do("POST", "/api/hosts/alpha/commands", s.AdminToken, []byte(`{"command": "test"}`))
		return r.code == http.StatusOK, fmt.Sprintf("RunCommand after the stop: %d %s", r.code, r.body)
	})
}

// TestCommandLogSurvivesRestart: a command's whole log is served after the
// server restarted.
func TestCommandLogSurvivesRestart(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	f.WriteScript("hosts/alpha/tests/02-rows.sh", "#!/bin/sh\nfor i in $(seq 1 50); do echo \"row $i\"; done\n")
	f.Commit("Rows")
	s.StartAgent(f, "alpha", AgentOptions{})
	s.WaitOnline("alpha")
	c := s.RunCommand("alpha", "test")
	if c = s.WaitCommand(c.CommandId); c.State != typesv1.CommandState_COMMAND_STATE_SUCCEEDED {
		t.Fatalf("test ended %s: %s", c.State, c.Message)
	}
	before := s.CommandLog(c.CommandId)

	s.Restart()

	after := s.CommandLog(c.CommandId)
	var rows []string
	for _, txt := range stdoutLines(after) {
		if strings.HasPrefix(txt, "row ") {
			rows = append(rows, txt)
		}
	}
	if len(rows) != 50 {
		t.Fatalf("after restart the log has %d of the 50 rows", len(rows))
	}
	for i, txt := range rows {
		if want := fmt.Sprintf("row %d", i+1); txt != want {
			t.Fatalf("row %d is %q, want %q", i, txt, want)
		}
	}
	if len(after) != len(before) {
		t.Errorf("log has %d lines after the restart, %d before", len(after), len(before))
	}
	for i, l := range after {
		if l.Seq != uint64(i+1) {
			t.Fatalf("after restart line %d has seq %d", i, l.Seq)
		}
	}
	if got := s.Command(c.CommandId); got.State != typesv1.CommandState_COMMAND_STATE_SUCCEEDED || got.LineCount != uint64(len(after)) {
		t.Errorf("after restart the command is %s with %d lines, want SUCCEEDED with %d", got.State, got.LineCount, len(after))
	}
}

// TestConcurrentOutput: commands running at once on several hosts lose no
// line and keep their order, in the store and on a watcher.
func TestConcurrentOutput(t *testing.T) {
	s := StartServer(t)
	hosts := []string{"h1", "h2", "h3"}
	f := NewFleet(t, hosts...)
	for _, h := range hosts {
		f.WriteScript("hosts/"+h+"/tests/02-count.sh", "#!/bin/sh\nfor i in $(seq 1 500); do echo \""+h+" line $i\"; done\n")
	}
	f.Commit("Counting tests")
	for _, h := range hosts {
		s.StartAgent(f, h, AgentOptions{})
	}
	for _, h := range hosts {
		s.WaitOnline(h)
	}
	w := s.Watch(&fleetv1.WatchFleetRequest{SkipHeartbeats: true})

	ids := map[string]string{}
	for _, h := range hosts {
		ids[h] = s.RunCommand(h, "test").CommandId
	}
	for _, h := range hosts {
		c := s.WaitCommand(ids[h])
		if c.State != typesv1.CommandState_COMMAND_STATE_SUCCEEDED {
			t.Fatalf("test on %s ended %s: %s", h, c.State, c.Message)
		}
		stored := s.CommandLog(c.CommandId)
		if uint64(len(stored)) != c.LineCount {
			t.Errorf("%s: %d lines stored, command says %d", h, len(stored), c.LineCount)
		}
		var numbered []string
		for i, l := range stored {
			if l.Seq != uint64(i+1) {
				t.Fatalf("%s: stored line %d has seq %d", h, i, l.Seq)
			}
			if strings.HasPrefix(l.Text, h+" line ") {
				numbered = append(numbered, l.Text)
			}
		}
		if len(numbered) != 500 {
			t.Fatalf("%s: %d of 500 numbered lines stored", h, len(numbered))
		}
		for i, txt := range numbered {
			if want := fmt.Sprintf("%s line %d", h, i+1); txt != want {
				t.Fatalf("%s: numbered line %d is %q, want %q", h, i, txt, want)
			}
		}
		// The watcher got the same lines, in the same order, none twice.
		waitFor(t, stateTimeout, func() (bool, string) {
			var seen []*typesv1.OutputLine
			w.mu.Lock()
			for _, e := range w.events {
				if out := e.ev.GetCommandOutput(); out.GetCommandId() == c.CommandId {
					seen = append(seen, out.Lines...)
				}
			}
			w.mu.Unlock()
			if len(seen) < len(stored) {
				return false, fmt.Sprintf("%s: watcher has %d of %d lines", h, len(seen), len(stored))
			}
			for i, l := range seen {
				if i >= len(stored) || l.Seq != stored[i].Seq || l.Text != stored[i].Text {
					t.Fatalf("%s: watcher line %d (seq %d %q) differs from the store", h, i, l.Seq, l.Text)
				}
			}
			return true, ""
		})
	}
}

// TestRefreshHostThreePaths: RefreshHost answers the same on native gRPC,
// grpc-web and REST.
func TestRefreshHostThreePaths(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	s.StartAgent(f, "alpha", AgentOptions{})
	s.WaitOnline("alpha")
	waitFor(t, stateTimeout, func() (bool, string) {
		h := s.Host("alpha")
		return h.Generation == f.Head(), fmt.Sprintf("generation %q", h.Generation)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req := &fleetv1.RefreshHostRequest{HostId: "alpha"}

	viaGRPC, err := s.Fleet().RefreshHost(ctx, req)
	if err != nil {
		t.Fatalf("gRPC RefreshHost: %v", err)
	}
	viaWeb := &fleetv1.RefreshHostResponse{}
	if err := s.GRPCWebUnary(ctx, "/nixplane.fleet.v1.FleetService/RefreshHost", s.AdminToken, req, viaWeb); err != nil {
		t.Fatalf("grpc-web RefreshHost: %v", err)
	}
	viaREST := &fleetv1.RefreshHostResponse{}
	s.API("POST", "/api/hosts/alpha/refresh", "{}", viaREST)

	want := summary(viaGRPC)
	t.Logf("RefreshHost: %s", want)
	if !viaGRPC.Online || !viaGRPC.Refreshed || viaGRPC.Generation != f.Head() || viaGRPC.AgentVersion == "" || viaGRPC.UpdateStatus == nil {
		t.Errorf("gRPC RefreshHost of an online host: %s, refreshed=%v", want, viaGRPC.Refreshed)
	}
	for path, got := range map[string]*fleetv1.RefreshHostResponse{"grpc-web": viaWeb, "REST": viaREST} {
		if g := summary(got); g != want {
			t.Errorf("%s RefreshHost differs from gRPC:\n got  %s\n want %s", path, g, want)
		}
		if !got.Refreshed {
			t.Errorf("%s RefreshHost: refreshed=false for an online host", path)
		}
	}

	// Unknown host: NotFound on grpc-web too (REST and gRPC: TestAuth).
	err = s.GRPCWebUnary(ctx, "/nixplane.fleet.v1.FleetService/RefreshHost", s.AdminToken,
		&fleetv1.RefreshHostRequest{HostId: "ghost"}, &fleetv1.RefreshHostResponse{})
	if status.Code(err) != codes.NotFound {
		t.Errorf("grpc-web RefreshHost of an unknown host: %v, want NotFound", err)
	}
	if errors.Is(err, io.EOF) {
		t.Error("grpc-web error decoded as OK")
	}
}

// summary is the part of a RefreshHost answer that must not depend on the
// transport.
func summary(r *fleetv1.RefreshHostResponse) string {
	us := r.GetUpdateStatus()
	comp := func(c *typesv1.Compartment) string {
		if c == nil {
			return "nil"
		}
		return c.Status.String()
	}
	return fmt.Sprintf("host_id=%s online=%v generation=%s agent_version=%s agent_outdated=%v agent=%s git=%s lock=%s system=%s tests=%s",
		r.HostId, r.Online, r.Generation, r.AgentVersion, r.AgentOutdated,
		comp(us.GetAgent()), comp(us.GetGit()), comp(us.GetLock()), comp(us.GetSystem()), comp(us.GetTests()))
}
