// Package controlplane is the nixplane server: it wires the store, the hub,
// the command manager and the APIs together and serves them on one port —
// native gRPC (agents, grpcurl), grpc-web (browsers), the REST gateway under
// /api/, the OpenAPI document, the login pages and the web UI.
//
// [Run] is the whole server: it returns when its context ends, after an
// ordered shutdown (agents told first, streams ended, HTTP drained, last-seen
// times flushed, store closed last).
package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/test/bufconn"

	"github.com/nixplane/nixplane/controlplane/agentapi"
	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/commands"
	"github.com/nixplane/nixplane/controlplane/fleetapi"
	"github.com/nixplane/nixplane/controlplane/github"
	"github.com/nixplane/nixplane/controlplane/hub"
	"github.com/nixplane/nixplane/controlplane/store"
	"github.com/nixplane/nixplane/controlplane/target"
	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// Config is the server's configuration; every field has a flag and a
// NIXPLANE_* environment variable in cmd/nixplane.
type Config struct {
	// Listen is the address of the one port, e.g. 127.0.0.1:8080.
	Listen string
	// DataDir holds nixplane.db and the fleet repository mirror.
	DataDir string
	// TLSCert and TLSKey enable TLS (HTTP/2 negotiated by ALPN).
	TLSCert, TLSKey string
	// AgentClientCA is a PEM bundle of CAs. When set, every agent must also
	// present a client certificate issued by one of them that names its host
	// (a DNS SAN, or the CN of a certificate without SANs). Browsers and API
	// clients are asked for a certificate but need none. It needs TLSCert:
	// the certificate is checked in this server's TLS handshake, so it cannot
	// work behind a TLS-terminating proxy.
	AgentClientCA string
	// AdminPassword is the first start's admin password; generated and
	// printed once when empty.
	AdminPassword string
	// Version is the server's version; agents of another version are marked
	// outdated.
	Version string
	// FleetRepo is the fleet's git repository (the target commit and
	// flake.lock come from its Branch); VersionURL a version.json instead.
	FleetRepo, Branch, VersionURL string
	// TargetPoll is how often the target is refetched (default 60s).
	TargetPoll time.Duration
	// GitHubRepo ("owner/name") enables the pending flake-update PR and
	// Merge & Deploy; GitHubTokenFile holds the API token (read at start).
	// Without GitHubRepo, MergeAndDeploy answers "not configured".
	GitHubRepo, GitHubTokenFile string
	// GitHubAPIURL is the REST API base, e.g. https://github.example.com/api/v3/
	// for GitHub Enterprise; empty means api.github.com.
	GitHubAPIURL string
	// GitHubPoll is how often the pending PR is looked for (default 60s).
	GitHubPoll time.Duration
	// GitHubPRLabels (comma-separated) and GitHubPRTitle (a regular
	// expression) say which open PR is the flake update; empty means the
	// defaults of [github.ParseRule], "-" disables one.
	GitHubPRLabels, GitHubPRTitle string
	// GitHubMergeMethod is merge, squash or rebase (default merge).
	GitHubMergeMethod string
	// AllowedOrigins are extra browser origins allowed to make changes.
	AllowedOrigins []string
	// TrustProxyHeaders: honour X-Forwarded-Proto from a TLS proxy.
	TrustProxyHeaders bool
	// GCPercent, when positive, is the process's GC target
	// (debug.SetGCPercent); nixplane serve leaves it 0 when GOGC is set. The server's heap is
	// mostly long-lived connection state, so a target below Go's 100
	// trades little CPU for much less memory (docs/PERFORMANCE.md).
	GCPercent int
	// SessionMax and SessionIdle bound browser sessions (default 24h, 2h).
	SessionMax, SessionIdle time.Duration
	// LogRetention is how long ended commands and their logs are kept
	// (default 30 days).
	LogRetention time.Duration
	// MaxMessageBytes bounds one gRPC message (default 4 MiB).
	MaxMessageBytes int
	// TimeoutScale multiplies command timeouts (tests shrink them).
	TimeoutScale float64
	// ReconnectWait is how long a command waits for its agent to return.
	ReconnectWait time.Duration
	// LastSeenFlush is how often last-seen times are written (default 30s).
	LastSeenFlush time.Duration
	// Out receives the one-time admin password; nil means os.Stderr.
	Out io.Writer
	// Ready, when set, is called with the bound address once serving.
	Ready func(addr string)
	Log   *slog.Logger
}

func (c *Config) defaults() {
	if c.Listen == "" {
		c.Listen = "127.0.0.1:8080"
	}
	if c.TargetPoll <= 0 {
		c.TargetPoll = 60 * time.Second
	}
	if c.SessionMax <= 0 {
		c.SessionMax = 24 * time.Hour
	}
	if c.SessionIdle <= 0 {
		c.SessionIdle = 2 * time.Hour
	}
	if c.LogRetention <= 0 {
		c.LogRetention = 30 * 24 * time.Hour
	}
	if c.MaxMessageBytes <= 0 {
		c.MaxMessageBytes = 4 << 20
	}
	if c.LastSeenFlush <= 0 {
		c.LastSeenFlush = 30 * time.Second
	}
	if c.Branch == "" {
		c.Branch = "main"
	}
	if c.Out == nil {
		c.Out = os.Stderr
	}
	if c.Log == nil {
		c.Log = slog.Default()
	}
}

// OpenStore opens (creating if needed) the SQLite store in dataDir.
func OpenStore(ctx context.Context, dataDir string) (*store.SQLite, error) {
	if dataDir == "" {
		return nil, errors.New("no data directory given (--data-dir)")
	}
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create data directory: %w", err)
	}
	return store.Open(ctx, filepath.Join(dataDir, "nixplane.db"))
}

// DefaultGCPercent is nixplane serve's GC target: at 19,900 agents it cut
// RSS per agent from 63.5 to 48.7 KB at no measurable CPU cost.
const DefaultGCPercent = 25

// Run serves until ctx ends, then shuts down in order.
func Run(ctx context.Context, cfg Config) error {
	cfg.defaults()
	if cfg.GCPercent > 0 {
		debug.SetGCPercent(cfg.GCPercent)
	}
	// Refuse a bad client-certificate setup before touching the data.
	agentCAs, err := loadAgentClientCA(cfg)
	if err != nil {
		return err
	}
	st, err := OpenStore(ctx, cfg.DataDir)
	if err != nil {
		return err
	}
	defer st.Close()
	if pw, created, err := auth.EnsureAdmin(ctx, st, cfg.AdminPassword); err != nil {
		return fmt.Errorf("create admin user: %w", err)
	} else if created && cfg.AdminPassword == "" {
		fmt.Fprintf(cfg.Out, "Created user %q with password: %s\n(shown once; set NIXPLANE_ADMIN_PASSWORD before the first start to choose it)\n", auth.AdminUser, pw)
	}
	s, err := newServer(ctx, cfg, st)
	if err != nil {
		return err
	}
	s.setAgentClientCAs(agentCAs)
	return s.serve(ctx)
}

// server is one running control plane.
type server struct {
	cfg      Config
	log      *slog.Logger
	store    *store.SQLite
	hub      *hub.Hub
	cmds     *commands.Manager
	fleet    *fleetapi.Fleet
	authn    *auth.Authenticator
	grpc     *grpc.Server
	health   *health.Server
	target   *target.Poller
	prs      *github.Poller // nil unless GitHub is configured
	metrics  *metrics
	conns    *connMetrics
	inmem    *bufconn.Listener
	gwConn   *grpc.ClientConn
	handler  http.Handler
	listener net.Listener
	// agentCAs verify agents' client certificates; nil: not required.
	agentCAs *x509.CertPool
}

func newServer(ctx context.Context, cfg Config, st *store.SQLite) (*server, error) {
	s := &server{cfg: cfg, log: cfg.Log, store: st, metrics: newMetrics()}
	var err error
	s.hub, err = hub.New(ctx, hub.Config{ServerVersion: cfg.Version, Store: st, Log: cfg.Log})
	if err != nil {
		return nil, fmt.Errorf("load hosts: %w", err)
	}
	s.target = target.NewPoller(target.Config{RepoURL: cfg.FleetRepo, Branch: cfg.Branch, VersionURL: cfg.VersionURL,
		MirrorDir: filepath.Join(cfg.DataDir, "fleet-mirror"), Interval: cfg.TargetPoll, Log: cfg.Log, OnChange: s.hub.SetTarget})
	s.cmds, err = commands.New(ctx, commands.Config{Hub: s.hub, Store: st, Log: cfg.Log, TimeoutScale: cfg.TimeoutScale,
		ReconnectWait: cfg.ReconnectWait, OnComplete: s.metrics.commandDone, Target: s.target})
	if err != nil {
		return nil, fmt.Errorf("load commands: %w", err)
	}
	// One replay guard for every place that checks one-time codes.
	codes := &auth.OneTimeCodes{}
	s.fleet = &fleetapi.Fleet{Hub: s.hub, Commands: s.cmds, Store: st, Log: cfg.Log, Target: s.target, OnResync: s.metrics.resync, Users: st, Codes: codes}
	if err := s.setupGitHub(); err != nil {
		return nil, err
	}
	s.authn = &auth.Authenticator{Stores: st, Policy: auth.DefaultPolicy(), AllowedOrigins: cfg.AllowedOrigins,
		SessionIdle: cfg.SessionIdle, SessionMax: cfg.SessionMax, Log: cfg.Log, Codes: codes}

	s.conns = newConnMetrics(s.metrics.reg)
	s.grpc = grpc.NewServer(
		grpc.WaitForHandlers(true),
		grpc.MaxRecvMsgSize(cfg.MaxMessageBytes),
		// Native connections (see transport.go): TLS is already
		// terminated, and the tap sets the trusted request facts.
		grpc.Creds(nativeCreds{}),
		grpc.InTapHandle(s.nativeCallFacts),
		// Agents ping every max(interval, 10s) even without a stream
		// (agent/session.KeepaliveParams); answer, do not GOAWAY them.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		// As for HTTP/2 on net/http: notice a half-open connection by a
		// ping after 20s of silence, given 10s; close a connection without
		// a stream after 5 minutes.
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 20 * time.Second, Timeout: 10 * time.Second, MaxConnectionIdle: 5 * time.Minute}),
		grpc.MaxConcurrentStreams(250),
		// Request headers as net/http bounds them (grpc-go allows 16 MiB).
		grpc.MaxHeaderListSize(64<<10),
		// Tens of thousands of mostly idle agent connections with small
		// messages: small buffers instead of grpc-go's 32 KiB, and a write
		// buffer only while writing. Larger frames pass through; the heap
		// in use per agent went from 73 to 23 KB (docs/PERFORMANCE.md).
		grpc.SharedWriteBuffer(true),
		grpc.ReadBufferSize(nativeReadBuffer),
		grpc.WriteBufferSize(nativeWriteBuffer),
		// Static flow-control windows (net/http's budget per connection):
		// the dynamic window's bandwidth estimation sends a PING for
		// nearly every heartbeat of an otherwise quiet connection.
		grpc.StaticStreamWindowSize(nativeStreamWindow),
		grpc.StaticConnWindowSize(nativeConnWindow),
		grpc.ChainUnaryInterceptor(recoverUnary(cfg.Log), s.metrics.unary, s.authn.UnaryInterceptor(), auditUnary(st, s.authn.Policy, cfg.Log)),
		grpc.ChainStreamInterceptor(recoverStream(cfg.Log), s.metrics.stream, s.authn.StreamInterceptor()),
	)
	agentv1.RegisterAgentServiceServer(s.grpc, &agentapi.Server{Hub: s.hub, Commands: s.cmds, Hosts: st, Refresh: s.fleet,
		ServerVersion: cfg.Version, Metrics: s.metrics, Log: cfg.Log})
	fleetv1.RegisterFleetServiceServer(s.grpc, s.fleet)
	adminv1.RegisterAdminServiceServer(s.grpc, &fleetapi.Admin{Store: st, Codes: codes})
	s.health = health.NewServer()
	healthpb.RegisterHealthServer(s.grpc, s.health)
	reflection.Register(s.grpc)

	// The REST gateway reaches the gRPC server over an in-memory connection,
	// so every interceptor (auth, audit, limits) applies to REST calls too.
	s.inmem = bufconn.Listen(1 << 20)
	s.gwConn, err = grpc.NewClient("passthrough:///in-memory",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return s.inmem.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	if err != nil {
		return nil, err
	}
	gw, err := newGateway(ctx, s.gwConn)
	if err != nil {
		return nil, err
	}
	s.handler = s.routes(gw)
	return s, nil
}

// loadAgentClientCA reads cfg.AgentClientCA; nil when it is not set.
func loadAgentClientCA(cfg Config) (*x509.CertPool, error) {
	if cfg.AgentClientCA == "" {
		return nil, nil
	}
	if cfg.TLSCert == "" || cfg.TLSKey == "" {
		return nil, errors.New("--agent-client-ca needs --tls-cert and --tls-key: agent client certificates are checked in this server's own TLS handshake, which cannot happen behind a TLS-terminating proxy")
	}
	pool, err := auth.LoadCertPool(cfg.AgentClientCA)
	if err != nil {
		return nil, fmt.Errorf("--agent-client-ca: %w", err)
	}
	return pool, nil
}

// setAgentClientCAs makes a client certificate from pool the second factor
// of every agent connection (nil: the token alone).
func (s *server) setAgentClientCAs(pool *x509.CertPool) {
	s.agentCAs = pool
	s.authn.AgentClientCAs = pool
	if pool != nil {
		s.log.Info("agents must present a client certificate", "ca_file", s.cfg.AgentClientCA)
	}
}

// setupGitHub creates the PR poller and the Merge & Deploy deployer when a
// GitHub repository is configured.
func (s *server) setupGitHub() error {
	cfg := s.cfg
	if cfg.GitHubRepo == "" {
		if cfg.GitHubTokenFile != "" || cfg.GitHubAPIURL != "" {
			return errors.New("--github-token-file and --github-api-url need --github-repo")
		}
		return nil
	}
	token, err := github.ReadToken(cfg.GitHubTokenFile)
	if err != nil {
		return err
	}
	rule, err := github.ParseRule(cfg.GitHubPRLabels, cfg.GitHubPRTitle)
	if err != nil {
		return err
	}
	s.prs, err = github.New(github.Config{Repo: cfg.GitHubRepo, Token: token, APIURL: cfg.GitHubAPIURL, Base: cfg.Branch, Rule: rule,
		MergeMethod: cfg.GitHubMergeMethod, Interval: cfg.GitHubPoll, Log: cfg.Log,
		OnChange: func(pr *fleetv1.PendingPR) { s.hub.SetPendingPR(pr, true) },
		OnHealth: func(h github.Health) {
			var msg string
			if h.LastError != nil {
				msg = h.LastError.Error()
			}
			s.hub.SetPullRequestHealth(msg, h.LastSuccess)
		}})
	if err != nil {
		return err
	}
	s.hub.SetPendingPR(nil, true)
	// A failing poll keeps the last known PR; these series let an operator
	// alert on it (consecutive failures, time of the last good poll).
	prs := s.prs
	s.metrics.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nixplane_github_poll_failures", Help: "GitHub polls for the flake-update PR failed in a row (0: the last one succeeded)."},
			func() float64 { return float64(prs.Health().Failures) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nixplane_github_last_success_timestamp_seconds", Help: "Unix time of the last successful GitHub poll (0: none yet)."},
			func() float64 {
				if t := prs.Health().LastSuccess; !t.IsZero() {
					return float64(t.UnixNano()) / 1e9
				}
				return 0
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nixplane_github_pending_pr", Help: "Number of the pending flake-update PR (0: none)."},
			func() float64 { return float64(prs.Pending().GetNumber()) }),
	)
	d := &github.Deployer{PRs: s.prs, Hub: s.hub, Commands: s.cmds, Log: cfg.Log}
	if s.target.Configured() {
		d.Target = s.target
	}
	s.fleet.Deployer = d
	s.log.Info("flake-update PRs from GitHub", "repo", cfg.GitHubRepo, "api", cfg.GitHubAPIURL, "rule", rule.String())
	return nil
}

func (s *server) serve(ctx context.Context) error {
	cfg := s.cfg
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	s.listener = ln
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetHTTP2(true)
	// TLS is terminated before the port is split (transport.go), so to
	// net/http every HTTP/2 connection is "unencrypted"; withConnTLS and
	// the dispatcher restore Request.TLS.
	protos.SetUnencryptedHTTP2(true)
	hs := &http.Server{
		Handler:           s.handler,
		Protocols:         &protos,
		ConnContext:       withConnTLS,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       5 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		HTTP2: &http.HTTP2Config{
			// Notice half-open agent connections: ping after 20s of silence,
			// give up 10s later.
			SendPingTimeout:      20 * time.Second,
			PingTimeout:          10 * time.Second,
			MaxConcurrentStreams: 250,
		},
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	tlsOn := cfg.TLSCert != "" || cfg.TLSKey != ""
	var tlsCfg *tls.Config
	if tlsOn {
		cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
		if err != nil {
			ln.Close()
			return fmt.Errorf("load TLS certificate: %w", err)
		}
		tlsCfg = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12, NextProtos: []string{"h2", "http/1.1"}}
		if s.agentCAs != nil {
			// Ask every client, require none: browsers and API clients
			// come without one; AgentService insists (auth.Authenticator).
			tlsCfg.ClientAuth = tls.VerifyClientCertIfGiven
			tlsCfg.ClientCAs = s.agentCAs
		}
	}
	// Native gRPC connections to grpc.Server.Serve, the rest to hs. Closing
	// either listener closes the port: http.Server.Shutdown stops new
	// connections of both kinds.
	port := splitPort(ln, tlsCfg, s.conns, s.log)

	// Bulk runs (a Merge & Deploy above all) that the previous process left
	// running continue before anyone can start another.
	if err := s.cmds.ResumeBulks(ctx); err != nil {
		ln.Close()
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	// Once shutdown has closed the port, its listeners' errors are the
	// expected end.
	closedOnStop := func(err error) error {
		if err != nil && gctx.Err() != nil && (portClosed(err) || errors.Is(err, http.ErrServerClosed)) {
			return nil
		}
		return err
	}
	g.Go(func() error { return s.grpc.Serve(s.inmem) })
	g.Go(func() error { return closedOnStop(port.serve()) })
	g.Go(func() error { return closedOnStop(s.grpc.Serve(port.grpc)) })
	g.Go(func() error {
		err := hs.Serve(port.http)
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return closedOnStop(err)
	})
	g.Go(func() error { return s.hub.Run(gctx, cfg.LastSeenFlush) })
	g.Go(func() error { return s.cmds.Loop(gctx) })
	g.Go(func() error { s.target.Run(gctx); return nil })
	if s.prs != nil {
		g.Go(func() error { s.prs.Run(gctx); return nil })
	}
	g.Go(func() error { return s.prune(gctx) })
	g.Go(func() error {
		<-gctx.Done()
		s.shutdown(hs)
		return nil
	})
	scheme := "http"
	if tlsOn {
		scheme = "https"
	}
	s.log.Info("nixplane serving", "addr", ln.Addr().String(), "url", scheme+"://"+ln.Addr().String(), "data_dir", cfg.DataDir, "version", cfg.Version)
	if cfg.Ready != nil {
		cfg.Ready(ln.Addr().String())
	}
	err = g.Wait()
	if err := s.hub.FlushLastSeen(context.Background()); err != nil {
		s.log.Warn("final last-seen flush", "err", err)
	}
	if errors.Is(err, grpc.ErrServerStopped) {
		err = nil
	}
	return err
}

// shutdown stops in order, each step bounded so a stop never hangs:
//  1. health says not serving;
//  2. no new connections: http.Server.Shutdown closes the listener at once
//     and sends HTTP/2 clients GOAWAY (so no new stream arrives on an open
//     connection either), then waits in the background for connections to
//     go idle;
//  3. the hub closes every agent session and refuses new ones (Unavailable
//     with a retry hint), and the agents are given a moment to hear it;
//  4. gRPC ends the remaining streams (http.Server.Shutdown alone would wait
//     for watchers forever); if that does not finish in time, every
//     connection is closed;
//  5. HTTP drains with a deadline.
func (s *server) shutdown(hs *http.Server) {
	const (
		agentsWait = 5 * time.Second  // for closed agent sessions to end
		grpcWait   = 10 * time.Second // for grpc.Server.Stop
		grpcGrace  = time.Second      // of that, for GracefulStop
		httpWait   = 10 * time.Second // for the HTTP drain after that
	)
	s.log.Info("shutting down")
	began := time.Now()
	var listenerAt, agentsAt, grpcAt time.Duration
	s.health.Shutdown()

	listenerClosed := make(chan struct{})
	hs.RegisterOnShutdown(func() { close(listenerClosed) })
	drainCtx, cancelDrain := context.WithCancel(context.Background())
	defer cancelDrain()
	drained := make(chan error, 1)
	go func() { drained <- hs.Shutdown(drainCtx) }()
	select {
	case <-listenerClosed:
	case err := <-drained: // Shutdown returned before its hooks ran
		drained <- err
	}
	listenerAt = time.Since(began)

	s.hub.CloseAll()
	agents := time.NewTimer(agentsWait)
	select {
	case <-s.hub.Drained():
	case <-agents.C:
		s.log.Warn("agent sessions still open after shutdown was announced", "waited", agentsWait)
	}
	agents.Stop()
	agentsAt = time.Since(began)

	stopped := make(chan struct{})
	go func() { s.stopGRPC(grpcGrace); close(stopped) }()
	grpcTimer := time.NewTimer(grpcWait)
	defer grpcTimer.Stop()
	select {
	case <-stopped:
	case <-grpcTimer.C:
		s.log.Warn("gRPC streams did not end in time; closing every connection", "waited", grpcWait)
		_ = hs.Close()
	}
	grpcAt = time.Since(began)

	httpTimer := time.NewTimer(httpWait)
	defer httpTimer.Stop()
	select {
	case err := <-drained:
		if err != nil {
			s.log.Warn("HTTP shutdown", "err", err)
			_ = hs.Close()
		}
	case <-httpTimer.C:
		s.log.Warn("HTTP connections did not drain in time; closing them", "waited", httpWait)
		cancelDrain()
		_ = hs.Close()
	}
	_ = s.gwConn.Close()
	s.log.Info("stopped serving", "listener_closed", listenerAt.Round(time.Millisecond), "agents_gone", agentsAt.Round(time.Millisecond),
		"grpc_stopped", grpcAt.Round(time.Millisecond), "http_drained", time.Since(began).Round(time.Millisecond))
}

// prune deletes ended commands older than the retention, hourly.
func (s *server) prune(ctx context.Context) error {
	t := time.NewTicker(time.Hour)
	defer t.Stop()
	for {
		n, err := s.store.PruneCommands(ctx, time.Now().Add(-s.cfg.LogRetention))
		if err != nil && ctx.Err() == nil {
			s.log.Warn("prune old commands", "err", err)
		} else if n > 0 {
			s.log.Info("pruned old commands", "count", n)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
