package loadgen

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// target is the server under load.
type target struct {
	addr       string // host:port
	kind       string // "spawned", "floor", "floor-native", "external"
	pid        int
	admin      string // admin API token; empty for the floor
	metricsURL string
	hosts      []HostToken
	created    []string // hosts this run created through the API
	server     *child
	spec       serverSpec
	dir        string
	logFile    *os.File
}

// Run runs one load and returns its report. Progress goes to logw. The
// report is returned with an error when the run got far enough to say
// something.
func Run(ctx context.Context, cfg Config, logw io.Writer) (*Report, error) {
	// Worker processes write their stderr here too, from other goroutines.
	logw = &lockedWriter{w: logw}
	log := slog.New(slog.NewTextHandler(logw, nil))
	limit := raiseFileLimit(uint64(min(cfg.Agents, cfg.AgentsPerProc) + cfg.WebWatchers + cfg.GRPCWatchers + 1000))
	rep := &Report{Machine: machine(limit), Scenario: scenarioOf(cfg)}
	tg, err := setUp(ctx, cfg, log)
	if tg != nil {
		defer tg.tearDown(cfg, log)
	}
	if err != nil {
		return nil, err
	}
	rep.Scenario.Server = tg.kind
	rep.Scenario.ServerPID = tg.pid
	if tg.pid > 0 {
		rep.Server.RSSBaselineBytes, _, _ = procRSS(tg.pid)
	}

	// Watchers first: their snapshots are small while the hosts are
	// offline, and they then see every agent come online.
	runCtx, stopAll := context.WithCancel(ctx)
	defer stopAll()
	win := &window{}
	var watchers []*watcher
	var wwg sync.WaitGroup
	for i := range cfg.WebWatchers + cfg.GRPCWatchers {
		kind := "grpc-web"
		if i >= cfg.WebWatchers {
			kind = "grpc"
		}
		w := newWatcher(kind, tg.addr, tg.admin, sourceDialer(cfg.SourceIPs, 1000+i), win)
		watchers = append(watchers, w)
		wwg.Go(func() { w.run(runCtx) })
	}
	defer func() { stopAll(); wwg.Wait() }()
	if err := pollUntil(ctx, 30*time.Second, func() bool {
		for _, w := range watchers {
			if !w.ready() {
				return false
			}
		}
		return true
	}); err != nil {
		return nil, fmt.Errorf("%w within 30s: %v", errNoSnapshot, watcherErrors(watchers))
	}

	// Agents, in this process or in workers.
	logHosts := map[string]bool{}
	var logNames []string
	for _, h := range tg.hosts[:cfg.LogHosts] {
		logHosts[h.Name] = true
		logNames = append(logNames, h.Name)
	}
	var groups []*agentGroup
	defer func() {
		for _, g := range groups {
			g.stop()
		}
	}()
	agentsStart := time.Now()
	for off := 0; off < len(tg.hosts); off += cfg.AgentsPerProc {
		part := tg.hosts[off:min(off+cfg.AgentsPerProc, len(tg.hosts))]
		spec := agentSpec{Addr: tg.addr, Hosts: part, Interval: cfg.Interval, Jitter: cfg.Jitter, LogRate: cfg.LogRate,
			SourceIPs: cfg.SourceIPs, IPOffset: off}
		for _, h := range part {
			if logHosts[h.Name] {
				spec.LogHosts = append(spec.LogHosts, h.Name)
			}
		}
		if len(tg.hosts) <= cfg.AgentsPerProc {
			groups = append(groups, startLocalAgents(runCtx, spec))
			break
		}
		g, err := startWorker(spec, logw)
		if err != nil {
			return nil, err
		}
		groups = append(groups, g)
	}
	total := func() statsSnap {
		var s statsSnap
		for _, g := range groups {
			s = s.add(g.stats())
		}
		return s
	}
	log.Info("connecting agents", "agents", cfg.Agents, "processes", len(groups))
	if err := pollUntil(ctx, cfg.ConnectTimeout, func() bool { return total().Online >= int64(cfg.Agents) }); err != nil {
		s := total()
		return nil, fmt.Errorf("only %d of %d agents connected within %s (%d connection errors)", s.Online, cfg.Agents, cfg.ConnectTimeout, s.ConnErrors)
	}
	rep.ConnectSeconds = time.Since(agentsStart).Seconds()
	if tg.pid > 0 {
		rep.Server.RSSConnectedBytes, _, _ = procRSS(tg.pid)
	}
	log.Info("all agents connected", "seconds", fmt.Sprintf("%.1f", rep.ConnectSeconds))

	var cmdIDs []string
	if cfg.LogHosts > 0 {
		if cmdIDs, err = startCommands(ctx, tg, logNames); err != nil {
			return nil, err
		}
	}
	sleepCtx(ctx, cfg.Warmup)

	// The measured window. With a restart, the first RestartAt is steady
	// state before it, and the window starts once every agent is back.
	if cfg.RestartAt > 0 {
		sleepCtx(ctx, cfg.RestartAt)
		win.phase.Store(phaseStorm)
		rep.Storm, err = restartStorm(ctx, cfg, tg, total, log)
		if err != nil {
			return nil, err
		}
	}
	before := measure(tg, total())
	win.phase.Store(phaseMeasure)
	start := time.Now()
	sleepCtx(ctx, cfg.Duration-cfg.RestartAt)
	after := measure(tg, total())
	win.phase.Store(phaseOff)
	if cfg.ServerMemProfile != "" && tg.server != nil {
		// The built-in server writes its heap profile on SIGUSR1.
		_ = tg.server.cmd.Process.Signal(syscall.SIGUSR1)
		sleepCtx(ctx, 2*time.Second)
	}
	elapsed := time.Since(start)
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}

	// End the streamed commands and wait for every watcher to see them end.
	if len(cmdIDs) > 0 {
		for _, g := range groups {
			g.stopLogs()
		}
		_ = pollUntil(ctx, 15*time.Second, func() bool {
			for _, w := range watchers {
				w.mu.Lock()
				n := len(w.complete)
				w.mu.Unlock()
				if n < len(cmdIDs) {
					return false
				}
			}
			return true
		})
	}
	stopAll()
	wwg.Wait()
	for _, g := range groups {
		g.stop()
	}
	end := total()
	groups = nil
	rep.fill(cfg, before, after, elapsed, watchers, cmdIDs, end)
	return rep, nil
}

// lockedWriter serialises writes to w.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func watcherErrors(ws []*watcher) string {
	var out []string
	for _, w := range ws {
		w.mu.Lock()
		out = append(out, w.errors...)
		w.mu.Unlock()
	}
	if len(out) == 0 {
		return "no error"
	}
	return strings.Join(out, "; ")
}

// point is the counters at one instant.
type point struct {
	at       time.Time
	agents   statsSnap
	cpu      time.Duration
	cpuOK    bool
	rss      int64
	handled  int64
	resyncsS int64
	// The server's Go runtime: goroutines, stack and heap in use (-1:
	// unknown).
	goroutines, stack, heap int64
	// heapIdle is heap memory free but not yet returned to the OS.
	heapIdle int64
}

func measure(tg *target, s statsSnap) point {
	p := point{at: time.Now(), agents: s, handled: -1, goroutines: -1, stack: -1, heap: -1, heapIdle: -1}
	if tg.pid > 0 {
		if c, err := procCPU(tg.pid); err == nil {
			p.cpu, p.cpuOK = c, true
		}
		p.rss, _, _ = procRSS(tg.pid)
	}
	if tg.metricsURL != "" {
		if v, err := scrapeSeries(tg.metricsURL, tg.admin); err == nil {
			for name, dst := range map[string]*int64{"nixplane_heartbeats_total": &p.handled, "go_goroutines": &p.goroutines,
				"go_memstats_stack_inuse_bytes": &p.stack, "go_memstats_heap_inuse_bytes": &p.heap} {
				if n, ok := v[name]; ok {
					*dst = n
				}
			}
			idle, ok1 := v["go_memstats_heap_idle_bytes"]
			released, ok2 := v["go_memstats_heap_released_bytes"]
			if ok1 && ok2 {
				p.heapIdle = idle - released
			}
		}
	}
	return p
}

// scrapeSeries reads the un-labelled series of a Prometheus text page.
func scrapeSeries(url, token string) (map[string]int64, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	out := map[string]int64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		name, v, ok := strings.Cut(sc.Text(), " ")
		if !ok || strings.HasPrefix(name, "#") || strings.Contains(name, "{") {
			continue
		}
		if f, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
			out[name] = int64(f)
		}
	}
	return out, sc.Err()
}

func pollUntil(ctx context.Context, limit time.Duration, ok func() bool) error {
	deadline := time.Now().Add(limit)
	for !ok() {
		if time.Now().After(deadline) {
			return errors.New("timed out")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// setUp spawns or reaches the server and gets a token for every host.
func setUp(ctx context.Context, cfg Config, log *slog.Logger) (*target, error) {
	names := hostNames(cfg.HostPrefix, cfg.Agents)
	switch {
	case cfg.SpawnFloor:
		addr, err := freeAddr()
		if err != nil {
			return nil, err
		}
		maddr, err := freeAddr()
		if err != nil {
			return nil, err
		}
		args := []string{"floor-server", "--listen", addr, "--metrics-listen", maddr}
		kind := "floor"
		if cfg.FloorNative {
			args = append(args, "--native")
			kind = "floor-native"
		}
		c, err := selfCommand(args...)
		if err != nil {
			return nil, err
		}
		tg := &target{addr: addr, kind: kind, metricsURL: "http://" + maddr + "/metrics"}
		if tg.logFile, err = serverLog(cfg); err != nil {
			return nil, err
		}
		c.Stdout, c.Stderr = tg.logFile, tg.logFile
		if tg.server, err = startChild(c); err != nil {
			return tg, err
		}
		tg.pid = tg.server.pid()
		for _, n := range names {
			tg.hosts = append(tg.hosts, HostToken{Name: n, Token: "floor"})
		}
		return tg, waitListening(ctx, addr, 30*time.Second, tg.server.exited)
	case cfg.SpawnServer:
		dir, err := os.MkdirTemp("", "nixplane-loadgen-")
		if err != nil {
			return nil, err
		}
		tg := &target{kind: "spawned", dir: dir}
		t0 := time.Now()
		if tg.hosts, tg.admin, err = provision(ctx, dir, names); err != nil {
			return tg, err
		}
		log.Info("registered hosts", "hosts", len(names), "seconds", fmt.Sprintf("%.1f", time.Since(t0).Seconds()), "data_dir", dir)
		if tg.addr, err = freeAddr(); err != nil {
			return tg, err
		}
		tg.metricsURL = "http://" + tg.addr + "/metrics"
		if tg.logFile, err = serverLog(cfg); err != nil {
			return tg, err
		}
		tg.spec = newServerSpec(cfg, tg.addr, dir, tg.logFile)
		if tg.server, err = tg.spec.start(); err != nil {
			return tg, err
		}
		tg.pid = tg.server.pid()
		return tg, waitListening(ctx, tg.addr, 60*time.Second, tg.server.exited)
	}
	tg := &target{kind: "external", pid: cfg.ServerPID}
	u := strings.TrimSuffix(cfg.Server, "/")
	switch {
	case strings.HasPrefix(u, "http://"):
		tg.addr = strings.TrimPrefix(u, "http://")
	case strings.Contains(u, "://"):
		return nil, usagef("--server: only plain http:// is supported (got %q); run against the server's own port behind the TLS proxy", cfg.Server)
	default:
		tg.addr = u
	}
	tg.metricsURL = "http://" + tg.addr + "/metrics"
	if cfg.AdminTokenFile != "" {
		b, err := os.ReadFile(cfg.AdminTokenFile)
		if err != nil {
			return nil, err
		}
		tg.admin = strings.TrimSpace(string(b))
	}
	if cfg.AgentTokens != "" {
		hs, err := readAgentTokens(cfg.AgentTokens)
		if err != nil {
			return nil, err
		}
		if len(hs) < cfg.Agents {
			return nil, usagef("%s has %d hosts, --agents is %d", cfg.AgentTokens, len(hs), cfg.Agents)
		}
		tg.hosts = hs[:cfg.Agents]
		return tg, nil
	}
	var err error
	tg.hosts, tg.created, err = createHosts(ctx, tg, names, log)
	return tg, err
}

func serverLog(cfg Config) (*os.File, error) {
	if cfg.ServerLog != "" {
		return os.Create(cfg.ServerLog)
	}
	return os.CreateTemp("", "nixplane-loadgen-server-*.log")
}

func readAgentTokens(path string) ([]HostToken, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []HostToken
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			return nil, fmt.Errorf("%s:%d: want 'hostname token'", path, i+1)
		}
		out = append(out, HostToken{Name: f[0], Token: f[1]})
	}
	return out, nil
}

func (tg *target) fleetConn() (*grpc.ClientConn, error) {
	return grpc.NewClient("passthrough:///"+tg.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxFrame)))
}

func (tg *target) authCtx(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tg.admin)
}

// createHosts registers hosts through FleetService.AddHost; a host that
// exists already gets a new token (RotateHostToken), so runs can repeat.
func createHosts(ctx context.Context, tg *target, names []string, log *slog.Logger) ([]HostToken, []string, error) {
	if tg.admin == "" {
		return nil, nil, usagef("creating hosts needs --admin-token-file")
	}
	cc, err := tg.fleetConn()
	if err != nil {
		return nil, nil, err
	}
	defer cc.Close()
	fc := fleetv1.NewFleetServiceClient(cc)
	ctx = tg.authCtx(ctx)
	hosts := make([]HostToken, len(names))
	created := make([]bool, len(names))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	t0 := time.Now()
	for i, n := range names {
		g.Go(func() error {
			r, err := fc.AddHost(gctx, &fleetv1.AddHostRequest{Hostname: n, Location: "loadgen"})
			if status.Code(err) == codes.AlreadyExists {
				rr, err := fc.RotateHostToken(gctx, &fleetv1.RotateHostTokenRequest{HostId: n})
				if err != nil {
					return fmt.Errorf("rotate token of %s: %w", n, err)
				}
				hosts[i] = HostToken{Name: n, Token: rr.AgentToken}
				return nil
			}
			if err != nil {
				return fmt.Errorf("add host %s: %w", n, err)
			}
			hosts[i] = HostToken{Name: n, Token: r.AgentToken}
			created[i] = true
			return nil
		})
	}
	err = g.Wait()
	var made []string
	for i, c := range created {
		if c {
			made = append(made, names[i])
		}
	}
	log.Info("hosts ready", "hosts", len(names), "created", len(made), "seconds", fmt.Sprintf("%.1f", time.Since(t0).Seconds()))
	return hosts, made, err
}

// startCommands starts a "test" command on each log host; the simulated
// agents answer with output lines until the log phase ends.
func startCommands(ctx context.Context, tg *target, hosts []string) ([]string, error) {
	cc, err := tg.fleetConn()
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	fc := fleetv1.NewFleetServiceClient(cc)
	ctx = tg.authCtx(ctx)
	var ids []string
	for _, h := range hosts {
		r, err := fc.RunCommand(ctx, &fleetv1.RunCommandRequest{HostId: h, Command: "test", Force: true})
		if err != nil {
			return nil, fmt.Errorf("run test on %s: %w", h, err)
		}
		ids = append(ids, r.Command.CommandId)
	}
	return ids, nil
}

// restartStorm stops the spawned server, starts it again on the same port
// and data directory, and measures how long until every agent is back.
func restartStorm(ctx context.Context, cfg Config, tg *target, total func() statsSnap, log *slog.Logger) (*Storm, error) {
	st := &Storm{Agents: cfg.Agents}
	t0 := time.Now()
	log.Info("restarting the server", "pid", tg.pid)
	tg.server.stop(15 * time.Second)
	st.StopSeconds = time.Since(t0).Seconds()
	var err error
	if tg.server, err = tg.spec.start(); err != nil {
		return nil, err
	}
	tg.pid = tg.server.pid()
	if err := waitListening(ctx, tg.addr, 60*time.Second, tg.server.exited); err != nil {
		return nil, err
	}
	st.ListeningSeconds = time.Since(t0).Seconds()
	deadline := t0.Add(cfg.StormTimeout)
	for {
		s := total()
		if rss, peak, err := procRSS(tg.pid); err == nil {
			st.RSSPeakBytes = max(st.RSSPeakBytes, peak, rss)
		}
		if s.Online >= int64(cfg.Agents) {
			st.AllOnlineSeconds = time.Since(t0).Seconds()
			st.Online = s.Online
			break
		}
		if time.Now().After(deadline) {
			st.Online = s.Online
			break
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	st.RSSAfterBytes, _, _ = procRSS(tg.pid)
	log.Info("agents back", "online", st.Online, "seconds", fmt.Sprintf("%.1f", st.AllOnlineSeconds))
	return st, nil
}

// tearDown removes created hosts when asked and stops a spawned server.
func (tg *target) tearDown(cfg Config, log *slog.Logger) {
	if cfg.Cleanup && len(tg.created) > 0 && tg.server == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if cc, err := tg.fleetConn(); err == nil {
			fc := fleetv1.NewFleetServiceClient(cc)
			g, gctx := errgroup.WithContext(tg.authCtx(ctx))
			g.SetLimit(8)
			for _, h := range tg.created {
				g.Go(func() error {
					_, err := fc.RemoveHost(gctx, &fleetv1.RemoveHostRequest{HostId: h, Force: true})
					return err
				})
			}
			if err := g.Wait(); err != nil {
				log.Warn("remove created hosts", "err", err)
			} else {
				log.Info("removed created hosts", "hosts", len(tg.created))
			}
			cc.Close()
		}
	}
	if tg.server != nil {
		tg.server.stop(30 * time.Second)
	}
	if tg.logFile != nil {
		tg.logFile.Close()
		if cfg.ServerLog == "" {
			log.Info("spawned server's log", "file", tg.logFile.Name())
		}
	}
	if tg.dir != "" {
		if cfg.KeepData {
			log.Info("spawned server's data directory kept", "dir", tg.dir)
		} else {
			_ = os.RemoveAll(tg.dir)
		}
	}
}
