// Package loadgen is nixplane-loadgen: a load generator for a nixplane
// server. It simulates agents on their own gRPC connections (hello, then
// heartbeats with jitter; command output at a set rate when the server asks
// for a command), watchers of the fleet over grpc-web on HTTP/1.1 (as
// browsers speak it) and over native gRPC, and measures the server from
// /proc: CPU per heartbeat, resident memory per agent. It can start the
// server itself (a temporary data directory with the hosts already
// registered), restart it to cause a reconnect storm, or start a minimal
// receive-only gRPC server (the floor) to compare against.
//
// One process holds at most [Config.AgentsPerProc] agent connections; more
// agents are spread over worker processes (the same binary, subcommand
// "agents"), because a process's file limit may be lower than the fleet.
package loadgen

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// Exit codes of [Main].
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

const usage = `nixplane-loadgen — measured load for a nixplane server

Usage:
  nixplane-loadgen [run] [flags]           run a load and print a report
  nixplane-loadgen floor-server [flags]    a receive-only AgentService (the floor)
  nixplane-loadgen server [--cpuprofile F] [--memprofile F] -- SERVE-FLAGS
                                           the nixplane server, optionally profiled
  nixplane-loadgen agents --spec JSON      a worker process of agents (internal)

Against a running server:
  nixplane-loadgen --server http://127.0.0.1:8080 --admin-token-file T --server-pid PID \
      --agents 1000 --interval 5s --web-watchers 5 --grpc-watchers 5 --duration 30s --cleanup

Self-contained (temporary data directory, hosts registered before the start):
  nixplane-loadgen --spawn-server --agents 1000 --web-watchers 5 --grpc-watchers 5

Flags of run:
`

// Main runs the command line and returns the process exit code.
func Main(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	sub := "run"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		sub, args = args[0], args[1:]
	}
	var err error
	switch sub {
	case "run":
		err = runCmd(ctx, args, stdout, stderr)
	case "floor-server":
		err = floorCmd(ctx, args, stderr)
	case "server":
		err = serverCmd(ctx, args, stderr)
	case "agents":
		err = agentsCmd(ctx, args, stdin, stdout, stderr)
	case "help":
		fmt.Fprint(stdout, usage)
		return exitOK
	default:
		fmt.Fprintf(stderr, "nixplane-loadgen: unknown command %q (see --help)\n", sub)
		return exitUsage
	}
	var ue usageError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, flag.ErrHelp):
		return exitOK
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "nixplane-loadgen: %s\n", ue.msg)
		return exitUsage
	}
	fmt.Fprintf(stderr, "nixplane-loadgen: %v\n", err)
	return exitFailure
}

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

// Config is one load run.
type Config struct {
	// Server is the server's base URL, e.g. http://127.0.0.1:8080. With
	// SpawnServer or SpawnFloor it is chosen by the load generator.
	Server string
	// ServerPID is the server's process id, for CPU and memory figures;
	// 0 leaves them out (unless a server is spawned).
	ServerPID int
	// AdminTokenFile holds an admin-scope API token: it creates hosts,
	// starts commands, watches and reads /metrics.
	AdminTokenFile string
	// AgentTokens is a file of "hostname token" lines to use instead of
	// creating hosts.
	AgentTokens string
	// SpawnServer starts the server (ServerBin, or this binary's "server")
	// with a temporary data directory, hosts registered beforehand.
	SpawnServer bool
	// SpawnFloor starts this binary's floor-server instead.
	SpawnFloor bool
	// FloorNative serves the floor with grpc.Server.Serve instead of
	// net/http (the real server's transport).
	FloorNative bool
	// ServerBin is the server executable for SpawnServer; empty means this
	// binary's own "server" subcommand (the same server code).
	ServerBin string
	// ServerCPUProfile and ServerMemProfile write pprof profiles of the
	// spawned server (only with the built-in server).
	ServerCPUProfile, ServerMemProfile string
	// ServerLog receives the spawned server's log; empty: a temp file.
	ServerLog string
	// Agents is the number of simulated agents; Interval their heartbeat
	// interval, Jitter the fraction it varies by (0.1 = ±10%).
	Agents   int
	Interval time.Duration
	Jitter   float64
	// HostPrefix names the hosts: <prefix>00001 …
	HostPrefix string
	// WebWatchers and GRPCWatchers watch the fleet over grpc-web (HTTP/1.1)
	// and native gRPC.
	WebWatchers, GRPCWatchers int
	// LogHosts hosts each stream LogRate output lines per second, one line
	// per message, for a "test" command the load generator starts.
	LogHosts int
	LogRate  float64
	// Warmup is waited after every agent is connected before measuring;
	// Duration is the measured window.
	Warmup, Duration time.Duration
	// ConnectTimeout bounds the wait for every agent to be connected.
	ConnectTimeout time.Duration
	// RestartAt restarts the spawned server this long into the measured
	// window (reconnect storm); StormTimeout bounds the wait for every
	// agent to be back.
	RestartAt, StormTimeout time.Duration
	// SourceIPs spreads connections over 127.0.0.2 … 127.0.0.(1+SourceIPs).
	SourceIPs int
	// AgentsPerProc bounds the agents of one process; more agents run in
	// worker processes.
	AgentsPerProc int
	// Cleanup removes the hosts this run created on a running server.
	Cleanup bool
	// KeepData keeps a spawned server's temporary data directory.
	KeepData bool
	// JSON writes the report as JSON to this file.
	JSON string
}

func (c *Config) register(fs *flag.FlagSet) {
	fs.StringVar(&c.Server, "server", "", "server base URL, e.g. http://127.0.0.1:8080 (not with --spawn-*)")
	fs.IntVar(&c.ServerPID, "server-pid", 0, "server process id, for CPU and memory figures from /proc")
	fs.StringVar(&c.AdminTokenFile, "admin-token-file", "", "file holding an admin API token (creates hosts, starts commands, watches, reads /metrics)")
	fs.StringVar(&c.AgentTokens, "agent-tokens", "", "file of 'hostname token' lines to use instead of creating hosts")
	fs.BoolVar(&c.SpawnServer, "spawn-server", false, "start the server with a temporary data directory and the hosts registered")
	fs.BoolVar(&c.SpawnFloor, "spawn-floor", false, "start the floor-server (receives heartbeats, discards them) instead")
	fs.BoolVar(&c.FloorNative, "floor-native", false, "serve the spawned floor with grpc.Server.Serve instead of net/http h2c")
	fs.StringVar(&c.ServerBin, "server-bin", "", "server executable for --spawn-server (default: this binary's built-in server)")
	fs.StringVar(&c.ServerCPUProfile, "server-cpuprofile", "", "write a CPU profile of the spawned server to this file")
	fs.StringVar(&c.ServerMemProfile, "server-memprofile", "", "write a heap profile of the spawned server at the end of the window to this file")
	fs.StringVar(&c.ServerLog, "server-log", "", "file for the spawned server's log (default: a temporary file)")
	fs.IntVar(&c.Agents, "agents", 1000, "number of simulated agents, each on its own connection")
	fs.DurationVar(&c.Interval, "interval", 5*time.Second, "heartbeat interval of each agent")
	fs.Float64Var(&c.Jitter, "jitter", 0.1, "heartbeat interval jitter as a fraction (0.1 = ±10%)")
	fs.StringVar(&c.HostPrefix, "host-prefix", "lg-", "prefix of the simulated host names")
	fs.IntVar(&c.WebWatchers, "web-watchers", 5, "WatchFleet streams over grpc-web on HTTP/1.1, as browsers")
	fs.IntVar(&c.GRPCWatchers, "grpc-watchers", 5, "WatchFleet streams over native gRPC")
	fs.IntVar(&c.LogHosts, "log-hosts", 0, "hosts that each run a command streaming output")
	fs.Float64Var(&c.LogRate, "log-rate", 20, "output lines per second per log host")
	fs.DurationVar(&c.Warmup, "warmup", 3*time.Second, "wait after all agents are connected before measuring")
	fs.DurationVar(&c.Duration, "duration", 30*time.Second, "measured window")
	fs.DurationVar(&c.ConnectTimeout, "connect-timeout", 60*time.Second, "bound on connecting every agent")
	fs.DurationVar(&c.RestartAt, "restart-at", 0, "restart the spawned server after this much steady load (reconnect storm); the window is the rest of --duration, once all are back")
	fs.DurationVar(&c.StormTimeout, "storm-timeout", 60*time.Second, "bound on every agent being back after a restart")
	fs.IntVar(&c.SourceIPs, "source-ips", 32, "spread connections over this many 127.0.0.x source addresses (0: kernel's choice)")
	fs.IntVar(&c.AgentsPerProc, "agents-per-proc", 9000, "agents per process; more run in worker processes")
	fs.BoolVar(&c.Cleanup, "cleanup", false, "remove the hosts this run created on a running server")
	fs.BoolVar(&c.KeepData, "keep-data", false, "keep the spawned server's temporary data directory")
	fs.StringVar(&c.JSON, "json", "", "also write the report as JSON to this file")
}

func (c *Config) check() error {
	switch {
	case c.SpawnServer && c.SpawnFloor:
		return usagef("--spawn-server and --spawn-floor exclude each other")
	case (c.SpawnServer || c.SpawnFloor) && c.Server != "":
		return usagef("--server is chosen by --spawn-*; leave it out")
	case !c.SpawnServer && !c.SpawnFloor && c.Server == "":
		return usagef("give --server URL (with --admin-token-file or --agent-tokens), or --spawn-server, or --spawn-floor")
	case !c.SpawnServer && !c.SpawnFloor && c.AdminTokenFile == "" && c.AgentTokens == "":
		return usagef("against a running server, --admin-token-file or --agent-tokens is needed")
	case c.Agents < 1:
		return usagef("--agents must be at least 1")
	case c.Interval < 100*time.Millisecond:
		return usagef("--interval must be at least 100ms")
	case c.Jitter < 0 || c.Jitter >= 1:
		return usagef("--jitter must be in [0, 1)")
	case c.WebWatchers < 0 || c.GRPCWatchers < 0 || c.LogHosts < 0:
		return usagef("watcher and log host counts must not be negative")
	case c.LogHosts > c.Agents:
		return usagef("--log-hosts (%d) exceeds --agents (%d)", c.LogHosts, c.Agents)
	case c.LogHosts > 0 && (c.LogRate <= 0 || c.LogRate > 1000):
		return usagef("--log-rate must be in (0, 1000]")
	case c.Duration <= 0 || c.Duration > 10*time.Minute:
		return usagef("--duration must be in (0, 10m]")
	case c.RestartAt != 0 && !c.SpawnServer:
		return usagef("--restart-at needs --spawn-server")
	case c.RestartAt < 0 || (c.RestartAt > 0 && c.RestartAt >= c.Duration):
		return usagef("--restart-at must be inside the window (--duration)")
	case c.SpawnFloor && (c.WebWatchers > 0 || c.GRPCWatchers > 0 || c.LogHosts > 0):
		return usagef("the floor server only receives heartbeats: use --web-watchers 0 --grpc-watchers 0 --log-hosts 0")
	case (c.ServerCPUProfile != "" || c.ServerMemProfile != "") && (!c.SpawnServer || c.ServerBin != ""):
		return usagef("--server-cpuprofile and --server-memprofile need --spawn-server with the built-in server")
	case c.SourceIPs < 0 || c.SourceIPs > 250:
		return usagef("--source-ips must be in [0, 250]")
	case c.AgentsPerProc < 1:
		return usagef("--agents-per-proc must be at least 1")
	case c.HostPrefix == "" || len(c.HostPrefix) > 40:
		return usagef("--host-prefix must be 1 to 40 characters")
	}
	return nil
}

func runCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("nixplane-loadgen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg Config
	cfg.register(fs)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usagef("%v", err)
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	if err := cfg.check(); err != nil {
		return err
	}
	rep, err := Run(ctx, cfg, stderr)
	if rep != nil {
		rep.WriteTable(stdout)
		if cfg.JSON != "" {
			b, jerr := json.MarshalIndent(rep, "", "  ")
			if jerr == nil {
				jerr = os.WriteFile(cfg.JSON, append(b, '\n'), 0o644)
			}
			if jerr != nil && err == nil {
				err = fmt.Errorf("write %s: %w", cfg.JSON, jerr)
			}
		}
	}
	return err
}
