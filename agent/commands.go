package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nixplane/nixplane/agent/executor"
	"github.com/nixplane/nixplane/agent/status"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// kindNames are the short names used in output lines and logs.
var kindNames = map[typesv1.CommandKind]string{
	typesv1.CommandKind_COMMAND_KIND_PULL:        "pull",
	typesv1.CommandKind_COMMAND_KIND_SWITCH:      "switch",
	typesv1.CommandKind_COMMAND_KIND_TEST:        "test",
	typesv1.CommandKind_COMMAND_KIND_PULL_SWITCH: "pull-switch",
	typesv1.CommandKind_COMMAND_KIND_ROLLBACK:    "rollback",
	typesv1.CommandKind_COMMAND_KIND_RESTART:     "restart",
	typesv1.CommandKind_COMMAND_KIND_REBOOT:      "reboot",
	typesv1.CommandKind_COMMAND_KIND_REFRESH:     "refresh",
}

// resultWait bounds how long a reboot waits for its result to be sent.
const resultWait = 10 * time.Second

// Run implements [session.Handler]: it starts the command, or rejects it
// when another one runs or it is unknown.
func (a *agent) Run(rc *agentv1.RunCommand) {
	id := rc.GetCommandId()
	name, known := kindNames[rc.GetKind()]
	reject := func(reason agentv1.RejectReason, msg, running string) {
		a.log.Warn("rejected a command", "command_id", id, "reason", reason.String(), "message", msg)
		a.outbox.Push(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Rejected{Rejected: &agentv1.CommandRejected{
			CommandId: id, Reason: reason, Message: msg, RunningCommandId: running,
		}}})
	}
	if id == "" {
		reject(agentv1.RejectReason_REJECT_REASON_UNSUPPORTED, "command has no id", "")
		return
	}
	if !known {
		reject(agentv1.RejectReason_REJECT_REASON_UNSUPPORTED, fmt.Sprintf("unknown command kind %s", rc.GetKind()), "")
		return
	}
	a.mu.Lock()
	if a.cur != nil {
		cur := a.cur
		a.mu.Unlock()
		reject(agentv1.RejectReason_REJECT_REASON_BUSY, fmt.Sprintf("%s %s is running", kindNames[cur.kind], cur.id), cur.id)
		return
	}
	if a.ctx.Err() != nil {
		a.mu.Unlock()
		reject(agentv1.RejectReason_REJECT_REASON_NOT_READY, "the agent is shutting down", "")
		return
	}
	r := &running{
		id:       id,
		kind:     rc.GetKind(),
		detached: a.cfg.HostType == typesv1.HostType_HOST_TYPE_DARWIN && isActivation(rc.GetKind()),
		stopCh:   make(chan struct{}),
	}
	r.out = executor.NewOutput(id, func(o *agentv1.CommandOutput) {
		a.outbox.Push(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Output{Output: o}})
	})
	a.cur = r
	a.wg.Add(1)
	a.mu.Unlock()
	a.log.Info("command started", "command_id", id, "kind", name)
	go a.execute(r, rc.GetTimeout().AsDuration())
}

func isActivation(k typesv1.CommandKind) bool {
	return k == typesv1.CommandKind_COMMAND_KIND_SWITCH || k == typesv1.CommandKind_COMMAND_KIND_PULL_SWITCH || k == typesv1.CommandKind_COMMAND_KIND_ROLLBACK
}

// Stop implements [session.Handler].
func (a *agent) Stop(sc *agentv1.StopCommand) {
	a.mu.Lock()
	r := a.cur
	a.mu.Unlock()
	if r == nil || r.id != sc.GetCommandId() {
		a.log.Info("stop for a command that is not running", "command_id", sc.GetCommandId())
		return
	}
	go a.stop(r, sc.GetGrace().AsDuration(), "stopped on request")
}

// stop marks r stopped (no further step starts) and stops its process
// group: SIGTERM, then SIGKILL after grace.
func (a *agent) stop(r *running, grace time.Duration, reason string) {
	a.mu.Lock()
	if !r.stopped {
		r.stopped = true
		r.stopReason = reason
		close(r.stopCh)
		r.out.System(reason)
	}
	p := r.proc
	a.mu.Unlock()
	if p != nil {
		p.Stop(grace)
	}
}

// execute runs r to its end and reports the result.
func (a *agent) execute(r *running, timeout time.Duration) {
	defer a.wg.Done()
	name := kindNames[r.kind]
	if timeout > 0 {
		t := time.AfterFunc(timeout, func() {
			a.stop(r, executor.DefaultGrace, fmt.Sprintf("timed out after %s", timeout))
		})
		defer t.Stop()
	}
	res := &agentv1.CommandResult{CommandId: r.id, Kind: r.kind}
	r.out.System(fmt.Sprintf("%s started on %s", name, a.cfg.Hostname))
	err := a.runKind(r, res)

	a.mu.Lock()
	stopped, reason, code := r.stopped, r.stopReason, r.lastCode
	a.mu.Unlock()
	var ee *exitError
	switch {
	case stopped:
		res.Outcome = agentv1.Outcome_OUTCOME_STOPPED
		res.Message = reason
		res.ExitCode = int32(code)
		res.AgentRestarting = false
	case err != nil:
		res.Outcome = agentv1.Outcome_OUTCOME_FAILED
		res.Message = err.Error()
		res.ExitCode = 1
		if errors.As(err, &ee) {
			res.ExitCode = int32(ee.code)
		}
		res.AgentRestarting = false
	default:
		res.Outcome = agentv1.Outcome_OUTCOME_SUCCEEDED
	}
	res.Generation, _ = a.repo.Head(a.ctx)
	final := fmt.Sprintf("%s %s", name, strings.ToLower(strings.TrimPrefix(res.Outcome.String(), "OUTCOME_")))
	if res.Message != "" {
		final += ": " + res.Message
	}
	r.out.System(final)
	res.LastSeq = r.out.Close()

	a.mu.Lock()
	a.cur = nil
	a.mu.Unlock()
	a.log.Info("command finished", "command_id", r.id, "kind", name, "outcome", res.Outcome.String(), "exit_code", res.ExitCode, "message", res.Message)
	a.outbox.PushResult(res)
	a.client.HeartbeatNow()

	switch {
	case res.AgentRestarting, r.kind == typesv1.CommandKind_COMMAND_KIND_RESTART && res.Outcome == agentv1.Outcome_OUTCOME_SUCCEEDED:
		a.client.RequestRestart()
		return
	case r.kind == typesv1.CommandKind_COMMAND_KIND_REBOOT && res.Outcome == agentv1.Outcome_OUTCOME_SUCCEEDED:
		a.reboot(r.id)
		return
	case r.kind == typesv1.CommandKind_COMMAND_KIND_REFRESH:
		return // the command itself sent the report
	}
	rep := a.statusReport(a.ctx, "")
	a.outbox.Push(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Status{Status: rep}})
}

// runKind runs the steps of r's kind.
func (a *agent) runKind(r *running, res *agentv1.CommandResult) error {
	switch r.kind {
	case typesv1.CommandKind_COMMAND_KIND_PULL:
		return a.pull(r)
	case typesv1.CommandKind_COMMAND_KIND_SWITCH:
		return a.switchSystem(r, res)
	case typesv1.CommandKind_COMMAND_KIND_PULL_SWITCH:
		if err := a.pull(r); err != nil {
			return err
		}
		return a.switchSystem(r, res)
	case typesv1.CommandKind_COMMAND_KIND_ROLLBACK:
		if err := a.rollback(r); err != nil {
			return err
		}
		a.checkSelfUpdate(r, res)
		return nil
	case typesv1.CommandKind_COMMAND_KIND_TEST:
		return a.test(r, res)
	case typesv1.CommandKind_COMMAND_KIND_RESTART:
		r.out.System("the agent restarts after this result")
		return nil
	case typesv1.CommandKind_COMMAND_KIND_REBOOT:
		r.out.System("rebooting after this result: " + strings.Join(a.cfg.RebootCommand, " "))
		return nil
	case typesv1.CommandKind_COMMAND_KIND_REFRESH:
		a.phase(r, "status", 0, 0)
		rep := a.statusReport(a.ctx, "")
		r.out.System("system: " + rep.GetSystem().GetMessage())
		a.outbox.Push(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Status{Status: rep}})
		return nil
	}
	return fmt.Errorf("unsupported command kind %s", r.kind)
}

// phase reports a phase change as progress and as a system line.
func (a *agent) phase(r *running, name string, current, total uint32) {
	a.outbox.Push(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Progress{Progress: &agentv1.CommandProgress{
		CommandId: r.id, Phase: name, Current: current, Total: total,
	}}})
	if total > 0 {
		r.out.System(fmt.Sprintf("phase: %s (%d/%d)", name, current, total))
	} else {
		r.out.System("phase: " + name)
	}
}

// run starts one process for r, streams its output and waits for it. It
// refuses to start once r is stopped.
func (a *agent) run(r *running, spec executor.Spec) error {
	return a.runWith(r, spec, r.out.Line)
}

// runWith is run with another receiver of the output lines.
func (a *agent) runWith(r *running, spec executor.Spec, lines executor.LineFunc) error {
	a.mu.Lock()
	if r.stopped {
		a.mu.Unlock()
		return errStopped
	}
	r.out.System("$ " + executor.Describe(spec))
	p, err := executor.Start(spec, lines)
	if err != nil {
		r.lastCode = 127
		a.mu.Unlock()
		return fmt.Errorf("start %s: %w", spec.Path, err)
	}
	r.proc = p
	a.mu.Unlock()
	code, werr := p.Wait()
	a.mu.Lock()
	r.proc = nil
	r.lastCode = code
	stopped := r.stopped
	a.mu.Unlock()
	switch {
	case stopped:
		return errStopped
	case werr != nil:
		return fmt.Errorf("%s: %w", filepath.Base(spec.Path), werr)
	case code != 0:
		return &exitError{what: filepath.Base(spec.Path), code: code}
	}
	return nil
}

// gitExec adapts run to the repository's Exec.
func (a *agent) gitExec(r *running) func(ctx context.Context, dir string, env []string, name string, args ...string) error {
	return func(_ context.Context, dir string, env []string, name string, args ...string) error {
		return a.run(r, executor.Spec{Path: name, Args: args, Dir: dir, Env: env})
	}
}

func (a *agent) pull(r *running) error {
	a.phase(r, "fetch", 0, 0)
	before, _ := a.repo.Head(a.ctx)
	if err := a.repo.Pull(a.ctx, a.gitExec(r)); err != nil {
		return err
	}
	after, msg := a.repo.Head(a.ctx)
	if before == after {
		r.out.System("already at " + short(after) + ": " + msg)
	} else {
		r.out.System(fmt.Sprintf("updated %s → %s: %s", short(before), short(after), msg))
	}
	return nil
}

func short(h string) string {
	if len(h) > 7 {
		return h[:7]
	}
	if h == "" {
		return "(none)"
	}
	return h
}

// rebuildTool returns the activation tool for the host type and whether
// it must run through sudo.
func (a *agent) rebuildTool() (tool string, sudo bool) {
	if a.cfg.RebuildCommand != "" {
		return a.cfg.RebuildCommand, false
	}
	switch a.cfg.HostType {
	case typesv1.HostType_HOST_TYPE_NIXOS:
		return "nixos-rebuild", os.Geteuid() != 0
	case typesv1.HostType_HOST_TYPE_DARWIN:
		return "darwin-rebuild", os.Geteuid() != 0
	default:
		return "home-manager", false
	}
}

func (a *agent) rebuildSpec(args ...string) executor.Spec {
	tool, sudo := a.rebuildTool()
	spec := executor.Spec{Path: tool, Args: args, Dir: a.repo.Dir, Detached: a.cfg.HostType == typesv1.HostType_HOST_TYPE_DARWIN}
	if sudo {
		spec.Path, spec.Args = "sudo", append([]string{"-n", tool}, args...)
	}
	return spec
}

// switchSystem builds and activates the host's configuration from the
// clone, runs the health check, and notices a replaced agent binary.
func (a *agent) switchSystem(r *running, res *agentv1.CommandResult) error {
	gen, _ := a.repo.Head(a.ctx)
	if gen == "" {
		return errors.New("no clone of the fleet repository: pull first")
	}
	a.phase(r, "activate", 0, 0)
	if err := a.run(r, a.rebuildSpec("switch", "--flake", a.repo.Dir+"#"+a.cfg.Hostname)); err != nil {
		return err
	}
	if err := a.healthCheck(r); err != nil {
		return err
	}
	a.checkSelfUpdate(r, res)
	return nil
}

// rollback activates the previous generation.
func (a *agent) rollback(r *running) error {
	a.phase(r, "rollback", 0, 0)
	if a.cfg.HostType == typesv1.HostType_HOST_TYPE_HOME_MANAGER && a.cfg.RebuildCommand == "" {
		prev, err := previousHomeGeneration(a.currentSystem())
		if err != nil {
			return err
		}
		return a.run(r, executor.Spec{Path: filepath.Join(prev, "activate"), Dir: a.repo.Dir})
	}
	return a.run(r, a.rebuildSpec("switch", "--rollback"))
}

func (a *agent) currentSystem() string {
	if a.cfg.CurrentSystem != "" {
		return a.cfg.CurrentSystem
	}
	return status.DefaultCurrentSystem(a.cfg.HostType)
}

var genLinkRE = regexp.MustCompile(`^(.+)-(\d+)-link$`)

// previousHomeGeneration finds the Home Manager generation before the
// current one: profile is the profile link (…/home-manager), which points
// at home-manager-<N>-link; the highest <M> below N wins.
func previousHomeGeneration(profile string) (string, error) {
	target, err := os.Readlink(profile)
	if err != nil {
		return "", fmt.Errorf("no Home Manager profile at %s: %w", profile, err)
	}
	m := genLinkRE.FindStringSubmatch(filepath.Base(target))
	if m == nil {
		return "", fmt.Errorf("profile %s points at %s, not a generation link", profile, target)
	}
	cur, _ := strconv.Atoi(m[2])
	dir := filepath.Dir(profile)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	var gens []int
	for _, e := range ents {
		if g := genLinkRE.FindStringSubmatch(e.Name()); g != nil && g[1] == m[1] {
			if n, _ := strconv.Atoi(g[2]); n < cur {
				gens = append(gens, n)
			}
		}
	}
	if len(gens) == 0 {
		return "", fmt.Errorf("no Home Manager generation before %d", cur)
	}
	sort.Ints(gens)
	return filepath.Join(dir, fmt.Sprintf("%s-%d-link", m[1], gens[len(gens)-1])), nil
}

// healthCheck runs the configured health check until it passes; when it
// still fails after the grace period the agent rolls back and the switch
// fails with the reason.
func (a *agent) healthCheck(r *running) error {
	if a.cfg.HealthCheckCommand == "" {
		return nil
	}
	a.phase(r, "health-check", 0, 0)
	deadline := time.Now().Add(a.cfg.HealthCheckGrace)
	for {
		// The check's last line says why it failed; it goes into the
		// command's message, not only its log.
		var (
			mu     sync.Mutex
			tapped string
		)
		tap := func(stream typesv1.OutputStream, text string) {
			if t := strings.TrimSpace(text); t != "" {
				mu.Lock()
				tapped = t
				mu.Unlock()
			}
			r.out.Line(stream, text)
		}
		err := a.runWith(r, executor.Spec{Path: "/bin/sh", Args: []string{"-c", a.cfg.HealthCheckCommand}, Dir: a.repo.Dir}, tap)
		mu.Lock()
		last := tapped
		mu.Unlock()
		if err == nil {
			r.out.System("health check passed")
			return nil
		}
		if errors.Is(err, errStopped) {
			return err
		}
		if last != "" {
			if len(last) > 200 {
				last = strings.ToValidUTF8(last[:200], "") + "…" // never split a character
			}
			err = fmt.Errorf("%w: %s", err, last)
		}
		if !time.Now().Before(deadline) {
			r.out.System("health check still failing after " + a.cfg.HealthCheckGrace.String() + ": rolling back")
			if rerr := a.rollback(r); rerr != nil {
				return fmt.Errorf("health check failed (%v) and the rollback failed too: %w", err, rerr)
			}
			return fmt.Errorf("health check failed (%v); rolled back to the previous generation", err)
		}
		t := time.NewTimer(2 * time.Second)
		select {
		case <-t.C:
		case <-r.stopCh:
			t.Stop()
			return errStopped
		}
	}
}

// checkSelfUpdate marks the result agent_restarting when the installed
// agent binary is no longer the running one.
func (a *agent) checkSelfUpdate(r *running, res *agentv1.CommandResult) {
	if a.cfg.SelfPath == "" {
		return
	}
	real, err := filepath.EvalSymlinks(a.cfg.SelfPath)
	if err != nil {
		a.log.Warn("cannot resolve the installed agent binary", "path", a.cfg.SelfPath, "error", err)
		return
	}
	h, err := fileHash(real)
	if err != nil {
		a.log.Warn("cannot hash the installed agent binary", "path", real, "error", err)
		return
	}
	if h != a.self.hash {
		r.out.System("the agent binary changed (" + real + "): the agent restarts after this result")
		res.AgentRestarting = true
	}
}

// test runs every executable in hosts/<host>/tests in name order; every
// failing script counts.
func (a *agent) test(r *running, res *agentv1.CommandResult) error {
	dir := filepath.Join(a.repo.Dir, "hosts", a.cfg.Hostname, "tests")
	names, err := status.TestScripts(dir)
	if err != nil {
		return fmt.Errorf("list tests: %w", err)
	}
	gen, _ := a.repo.Head(a.ctx)
	rep := &typesv1.TestReport{Total: uint32(len(names)), Generation: gen, RanAt: timestamppb.Now()}
	res.Tests = rep
	if len(names) == 0 {
		r.out.System("no executable test scripts in " + dir)
		a.setLastTests(rep)
		return errors.New("no tests")
	}
	for i, n := range names {
		a.phase(r, "tests", uint32(i+1), uint32(len(names)))
		err := a.run(r, executor.Spec{Path: filepath.Join(dir, n), Dir: a.repo.Dir, Env: append(os.Environ(), "NIXPLANE_HOST="+a.cfg.Hostname, "NIXPLANE_REPO="+a.repo.Dir)})
		if errors.Is(err, errStopped) {
			return err
		}
		if err != nil {
			rep.Failed = append(rep.Failed, n)
			r.out.System("FAIL " + n + ": " + err.Error())
			continue
		}
		rep.Passed++
		r.out.System("PASS " + n)
	}
	rep.RanAt = timestamppb.Now()
	a.setLastTests(rep)
	if len(rep.Failed) > 0 {
		return fmt.Errorf("%d of %d tests failed: %s", len(rep.Failed), rep.Total, strings.Join(rep.Failed, ", "))
	}
	return nil
}

func (a *agent) setLastTests(rep *typesv1.TestReport) {
	a.mu.Lock()
	a.lastTests = rep
	a.mu.Unlock()
}

// reboot waits (bounded) until the reboot's result has been sent, then
// runs the reboot command.
func (a *agent) reboot(id string) {
	deadline := time.NewTimer(resultWait)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for p := a.outbox.Pending(); p != nil && p.GetCommandId() == id; p = a.outbox.Pending() {
		select {
		case <-deadline.C:
			a.log.Warn("rebooting before the result was sent; it is kept for the next start", "command_id", id)
			p = nil
		case <-tick.C:
		}
		if p == nil {
			break
		}
	}
	a.log.Info("rebooting", "command", strings.Join(a.cfg.RebootCommand, " "))
	ctx, cancel := context.WithTimeout(a.ctx, time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, a.cfg.RebootCommand[0], a.cfg.RebootCommand[1:]...).CombinedOutput()
	if err != nil {
		a.log.Error("reboot command failed", "error", err, "output", strings.TrimSpace(string(out)))
	}
}
