package loadgen

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nixplane/nixplane/cmd/internal/cli"
	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/fleetapi"
	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// childEnv marks a process started by the load generator; a test binary
// uses it to act as nixplane-loadgen.
const childEnv = "NIXPLANE_LOADGEN_CHILD"

// spawnedAdminPassword is the admin password of a spawned server's fresh
// data directory (the server would print a generated one otherwise).
const spawnedAdminPassword = "loadgen-admin-password"

// hostNames returns n host names with prefix.
func hostNames(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s%05d", prefix, i+1)
	}
	return out
}

// provision registers hosts and an admin API token in a fresh data
// directory before the server starts, straight through the store (as
// `nixplane hosts add --data-dir` does), which is much faster than the API.
func provision(ctx context.Context, dir string, names []string) ([]HostToken, string, error) {
	st, err := controlplane.OpenStore(ctx, dir)
	if err != nil {
		return nil, "", err
	}
	defer st.Close()
	rec, admin, err := fleetapi.NewAPIToken("loadgen", adminv1.Scope_SCOPE_ADMIN, 0)
	if err != nil {
		return nil, "", err
	}
	if err := st.CreateAPIToken(ctx, rec); err != nil {
		return nil, "", err
	}
	hosts := make([]HostToken, 0, len(names))
	now := time.Now()
	for _, n := range names {
		_, tok, err := fleetapi.RegisterHost(ctx, st, &fleetv1.AddHostRequest{Hostname: n, Location: "loadgen"}, now)
		if err != nil {
			return nil, "", fmt.Errorf("register %s: %w", n, err)
		}
		hosts = append(hosts, HostToken{Name: n, Token: tok})
	}
	return hosts, admin, nil
}

// freeAddr returns a loopback address with a port free right now.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// waitListening polls addr until it accepts a connection.
func waitListening(ctx context.Context, addr string, limit time.Duration, exited <-chan struct{}) error {
	deadline := time.Now().Add(limit)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not listening after %s", addr, limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-exited:
			return errors.New("the server exited during start (see its log)")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// child is a process the load generator started.
type child struct {
	cmd    *exec.Cmd
	exited chan struct{}
	err    error
}

func selfCommand(args ...string) (*exec.Cmd, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	c := exec.Command(self, args...)
	c.Env = append(os.Environ(), childEnv+"=1")
	return c, nil
}

func startChild(c *exec.Cmd) (*child, error) {
	if err := c.Start(); err != nil {
		return nil, err
	}
	ch := &child{cmd: c, exited: make(chan struct{})}
	go func() { ch.err = c.Wait(); close(ch.exited) }()
	return ch, nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

// stop sends SIGTERM and waits up to limit, then kills.
func (c *child) stop(limit time.Duration) {
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.exited:
	case <-time.After(limit):
		_ = c.cmd.Process.Kill()
		<-c.exited
	}
}

// serverSpec is how to start the server again (reconnect storm).
type serverSpec struct {
	args []string
	bin  string
	log  *os.File
}

func (s serverSpec) start() (*child, error) {
	var c *exec.Cmd
	if s.bin == "" {
		var err error
		if c, err = selfCommand(s.args...); err != nil {
			return nil, err
		}
	} else {
		c = exec.Command(s.bin, s.args...)
		c.Env = os.Environ()
	}
	c.Env = append(c.Env, "NIXPLANE_ADMIN_PASSWORD="+spawnedAdminPassword)
	c.Stdout, c.Stderr = s.log, s.log
	return startChild(c)
}

func newServerSpec(cfg Config, addr, dir string, log *os.File) serverSpec {
	serve := []string{"--listen", addr, "--data-dir", dir}
	if cfg.ServerBin != "" {
		return serverSpec{bin: cfg.ServerBin, args: append([]string{"serve"}, serve...), log: log}
	}
	args := []string{"server"}
	if cfg.ServerCPUProfile != "" {
		args = append(args, "--cpuprofile", cfg.ServerCPUProfile)
	}
	if cfg.ServerMemProfile != "" {
		args = append(args, "--memprofile", cfg.ServerMemProfile)
	}
	return serverSpec{args: append(append(args, "--"), serve...), log: log}
}

// serverCmd is the nixplane server (the same code as `nixplane serve`),
// optionally under the CPU profiler, with a heap profile written at exit.
func serverCmd(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cpu := fs.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	mem := fs.String("memprofile", "", "write a heap profile at exit to this file")
	fs.Usage = func() {
		fmt.Fprint(stderr, "nixplane-loadgen server [--cpuprofile F] [--memprofile F] -- SERVE-FLAGS\n"+
			"runs `nixplane serve SERVE-FLAGS` in this process, profiled; SIGTERM ends it and writes the profiles.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usagef("%v", err)
	}
	raiseFileLimit(1 << 20)
	if *cpu != "" {
		f, err := os.Create(*cpu)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	if *mem != "" {
		// SIGUSR1 writes the heap profile now: the load generator sends it at
		// the end of the measured window, while every agent is connected.
		usr1 := make(chan os.Signal, 1)
		signal.Notify(usr1, syscall.SIGUSR1)
		defer signal.Stop(usr1)
		go func() {
			for range usr1 {
				if err := writeHeapProfile(*mem); err != nil {
					fmt.Fprintf(stderr, "heap profile: %v\n", err)
				}
			}
		}()
	}
	code := cli.Main(ctx, append([]string{"serve"}, fs.Args()...), cli.Env{Stdout: stderr, Stderr: stderr, Getenv: os.Getenv})
	if code != 0 {
		return fmt.Errorf("server exited with status %d", code)
	}
	return nil
}

func writeHeapProfile(path string) error {
	runtime.GC()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := pprof.WriteHeapProfile(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// agentGroup is a set of agents running in this process or in a worker.
type agentGroup struct {
	mu      sync.Mutex
	last    statsSnap
	local   *agentStats
	logStop chan struct{}
	cancel  context.CancelFunc
	done    chan struct{}
	// worker only
	proc  *child
	stdin io.WriteCloser
}

func (g *agentGroup) stats() statsSnap {
	if g.local != nil {
		return g.local.snap()
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.last
}

// stopLogs ends the streamed commands.
func (g *agentGroup) stopLogs() {
	if g.local != nil {
		close(g.logStop)
		return
	}
	_, _ = io.WriteString(g.stdin, "stop-logs\n")
}

// stop ends the agents and waits for them.
func (g *agentGroup) stop() {
	if g.local != nil {
		g.cancel()
		<-g.done
		return
	}
	_ = g.stdin.Close()
	select {
	case <-g.done:
	case <-time.After(20 * time.Second):
		_ = g.proc.cmd.Process.Kill()
		<-g.done
	}
}

func startLocalAgents(ctx context.Context, spec agentSpec) *agentGroup {
	ctx, cancel := context.WithCancel(ctx)
	g := &agentGroup{local: &agentStats{}, logStop: make(chan struct{}), cancel: cancel, done: make(chan struct{})}
	go func() { defer close(g.done); runAgents(ctx, spec, g.local, g.logStop) }()
	return g
}

func startWorker(spec agentSpec, stderr io.Writer) (*agentGroup, error) {
	c, err := selfCommand("agents")
	if err != nil {
		return nil, err
	}
	c.Stderr = stderr
	stdin, err := c.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := c.StdoutPipe()
	if err != nil {
		return nil, err
	}
	proc, err := startChild(c)
	if err != nil {
		return nil, err
	}
	g := &agentGroup{proc: proc, stdin: stdin, done: make(chan struct{})}
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var s statsSnap
			if json.Unmarshal(sc.Bytes(), &s) == nil {
				g.mu.Lock()
				g.last = s
				g.mu.Unlock()
			}
		}
	}()
	go func() { <-readDone; <-proc.exited; close(g.done) }()
	if err := json.NewEncoder(stdin).Encode(spec); err != nil {
		proc.stop(5 * time.Second)
		return nil, fmt.Errorf("start agent worker: %w", err)
	}
	return g, nil
}

// agentsCmd is a worker process: its spec is the first JSON value on stdin;
// then "stop-logs" lines end streamed commands and end of input stops it.
// It prints its counters as one JSON line every 250ms and once at the end.
func agentsCmd(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		return usagef("agents takes no arguments: it reads its spec from standard input")
	}
	dec := json.NewDecoder(stdin)
	var spec agentSpec
	if err := dec.Decode(&spec); err != nil {
		return fmt.Errorf("read agent spec: %w", err)
	}
	raiseFileLimit(uint64(len(spec.Hosts) + 1000))
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var st agentStats
	logStop := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(io.MultiReader(dec.Buffered(), stdin))
		stopped := false
		for sc.Scan() {
			if strings.TrimSpace(sc.Text()) == "stop-logs" && !stopped {
				stopped = true
				close(logStop)
			}
		}
		cancel()
	}()
	done := make(chan struct{})
	go func() { defer close(done); runAgents(ctx, spec, &st, logStop) }()
	enc := json.NewEncoder(stdout)
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-done:
			return enc.Encode(st.snap())
		case <-t.C:
			if err := enc.Encode(st.snap()); err != nil {
				cancel()
			}
		}
	}
}
