// Package session keeps the agent's one bidirectional gRPC stream to the
// control plane alive: it dials (h2c for http://, TLS for https://), sends
// the Hello with the host's token, waits for the Welcome, sends heartbeats
// on a ticker, sends what the [Outbox] holds, hands commands from the server
// to a [Handler], and reconnects with exponential backoff and jitter when
// the stream ends. A server that is shutting down refuses the stream with a
// suggested retry delay ([RetryDelay]); the agent then waits at least that
// long ([ReconnectDelay]), so a restarting server is not hammered. On
// shutdown it closes its side of the stream cleanly, even before the
// Welcome, so the server marks the host offline at once.
package session

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// ErrRestartRequested is returned by [Client.Run] after [Client.RequestRestart]:
// the agent should exit so its service manager starts it (possibly a new
// binary) again.
var ErrRestartRequested = errors.New("agent restart requested")

// Defaults for [Config] fields left zero.
const (
	DefaultInterval       = 5 * time.Second
	DefaultWelcomeTimeout = 30 * time.Second
	DefaultBackoffInitial = time.Second
	DefaultBackoffMax     = 60 * time.Second
	DefaultHealthyAfter   = 30 * time.Second
	DefaultDrainTimeout   = 5 * time.Second
	// minKeepaliveTime is grpc-go's floor for client keepalive pings.
	minKeepaliveTime = 10 * time.Second
)

// Handler is the agent side of a session: it builds the messages that carry
// the host's state and acts on what the server sends. The Run, Stop and
// Refresh methods are called from the receiving goroutine and must not
// block; they answer through the [Outbox].
type Handler interface {
	// Hello builds the first message of a session (last_result is filled
	// in by the session).
	Hello(ctx context.Context) *agentv1.Hello
	// Heartbeat builds a heartbeat with fresh data.
	Heartbeat(ctx context.Context) *agentv1.Heartbeat
	// Run starts (or rejects) a command.
	Run(*agentv1.RunCommand)
	// Stop stops a running command.
	Stop(*agentv1.StopCommand)
	// Refresh recomputes the status and answers with a StatusReport.
	Refresh(*agentv1.RefreshStatus)
}

// Config configures a [Client].
type Config struct {
	// Server is the control plane's URL: http://host:port (plaintext HTTP/2)
	// or https://host:port (TLS).
	Server string
	// Hostname names the host in log lines.
	Hostname string
	// TokenFile holds the host's agent token; it is read at every connect
	// so a rotated token is picked up.
	TokenFile string
	// CAFile, when set, adds a PEM CA bundle to the system roots for https.
	CAFile string
	// ClientCertFile and ClientKeyFile, when set, are the PEM client
	// certificate and key presented to an https server that requires agent
	// client certificates. Like the token they are read at every connect,
	// so renewed files are used from the next reconnect on.
	ClientCertFile, ClientKeyFile string
	// Interval is the heartbeat interval (DefaultInterval when zero); the
	// server's Welcome can override it.
	Interval time.Duration
	// WelcomeTimeout bounds connect + Hello + Welcome.
	WelcomeTimeout time.Duration
	// BackoffInitial and BackoffMax bound the reconnect delay, which grows
	// exponentially with jitter between them. A retry delay suggested by
	// the server replaces a shorter step, and is capped at BackoffMax too.
	BackoffInitial, BackoffMax time.Duration
	// HealthyAfter is how long a welcomed session must last for the
	// reconnect delay to start again from BackoffInitial.
	HealthyAfter time.Duration
	// DrainTimeout bounds sending what is queued on a clean shutdown.
	DrainTimeout time.Duration
}

func (c *Config) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.Interval, DefaultInterval)
	def(&c.WelcomeTimeout, DefaultWelcomeTimeout)
	def(&c.BackoffInitial, DefaultBackoffInitial)
	def(&c.BackoffMax, DefaultBackoffMax)
	def(&c.HealthyAfter, DefaultHealthyAfter)
	def(&c.DrainTimeout, DefaultDrainTimeout)
}

// Target is a parsed server URL.
type Target struct {
	// Addr is host:port for grpc.NewClient.
	Addr string
	// TLS says whether to use TLS (https).
	TLS bool
	// Host is the host name for TLS verification.
	Host string
}

// ParseServer parses a server URL (http:// or https://, host and optional
// port, no path).
func ParseServer(s string) (Target, error) {
	u, err := url.Parse(s)
	if err != nil {
		return Target{}, fmt.Errorf("server URL %q: %w", s, err)
	}
	var t Target
	port := "80"
	switch u.Scheme {
	case "http":
	case "https":
		t.TLS, port = true, "443"
	default:
		return Target{}, fmt.Errorf("server URL %q: scheme must be http or https", s)
	}
	if u.Host == "" || u.Hostname() == "" {
		return Target{}, fmt.Errorf("server URL %q: no host", s)
	}
	if u.Path != "" && u.Path != "/" || u.RawQuery != "" || u.User != nil {
		return Target{}, fmt.Errorf("server URL %q: must be scheme://host[:port] only", s)
	}
	if u.Port() != "" {
		port = u.Port()
	}
	t.Host = u.Hostname()
	t.Addr = net.JoinHostPort(t.Host, port)
	return t, nil
}

// ReadToken reads and trims the token file.
func ReadToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read token file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("token file %s is empty", path)
	}
	return tok, nil
}

// LoadClientCert reads a PEM client certificate (with its intermediates, if
// any, after it) and its private key. Both files are required.
func LoadClientCert(certFile, keyFile string) (tls.Certificate, error) {
	if certFile == "" || keyFile == "" {
		return tls.Certificate{}, errors.New("a client certificate needs both --tls-client-cert and --tls-client-key")
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("load client certificate %s: %w", certFile, err)
	}
	return cert, nil
}

// KeepaliveParams returns client keepalive settings under which a silent
// (half-open) connection is noticed within about three intervals: pings
// every max(interval, 10s) (grpc-go's floor), each given the rest of the
// three intervals to be answered.
func KeepaliveParams(interval time.Duration) keepalive.ClientParameters {
	t := max(interval, minKeepaliveTime)
	timeout := max(3*interval-t, time.Second)
	return keepalive.ClientParameters{Time: t, Timeout: timeout, PermitWithoutStream: true}
}

// Dial opens a client connection to the server (not yet connected).
func Dial(cfg Config) (*grpc.ClientConn, error) {
	t, err := ParseServer(cfg.Server)
	if err != nil {
		return nil, err
	}
	interval := cfg.Interval
	if interval <= 0 {
		interval = DefaultInterval
	}
	creds := insecure.NewCredentials()
	if t.TLS {
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if cfg.CAFile != "" {
			pem, err := os.ReadFile(cfg.CAFile)
			if err != nil {
				return nil, fmt.Errorf("read CA file: %w", err)
			}
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("CA file %s holds no PEM certificates", cfg.CAFile)
			}
		}
		tc := &tls.Config{RootCAs: pool, ServerName: t.Host, MinVersion: tls.VersionTLS12}
		if cfg.ClientCertFile != "" || cfg.ClientKeyFile != "" {
			cert, err := LoadClientCert(cfg.ClientCertFile, cfg.ClientKeyFile)
			if err != nil {
				return nil, err
			}
			// Always present it: Go would otherwise send nothing when the
			// server asks for other CAs, and the agent would be told it has
			// no certificate instead of that its certificate is not trusted.
			tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
		}
		creds = credentials.NewTLS(tc)
	} else if cfg.ClientCertFile != "" || cfg.ClientKeyFile != "" {
		return nil, fmt.Errorf("server URL %q: a client certificate needs an https server", cfg.Server)
	}
	return grpc.NewClient(t.Addr,
		grpc.WithTransportCredentials(creds),
		grpc.WithKeepaliveParams(KeepaliveParams(interval)),
	)
}

// Client runs sessions one after another until its context ends.
type Client struct {
	cfg     Config
	log     *slog.Logger
	h       Handler
	outbox  *Outbox
	hbNow   chan struct{}
	restart chan struct{}
	once    sync.Once
	// timer starts the wait before a reconnect; tests replace it to see
	// the planned delays without waiting them out.
	timer func(time.Duration) (<-chan time.Time, func() bool)
}

// RetryDelay returns the retry delay the server suggested in err, a gRPC
// status carrying a google.rpc.RetryInfo detail (the server sends one with
// Unavailable while it shuts down), and whether there was a positive one.
func RetryDelay(err error) (time.Duration, bool) {
	if err == nil {
		return 0, false
	}
	st, ok := status.FromError(err)
	if !ok {
		return 0, false
	}
	for _, detail := range st.Details() {
		if ri, ok := detail.(*errdetails.RetryInfo); ok && ri.GetRetryDelay().IsValid() {
			if d := ri.GetRetryDelay().AsDuration(); d > 0 {
				return d, true
			}
		}
	}
	return 0, false
}

// ReconnectDelay is how long to wait before reconnecting after a session
// that ended with err, given the client's own backoff step: when the server
// suggested a delay ([RetryDelay]), that delay plus a random part of up to
// half of it again (so agents told the same delay do not return together),
// capped at most; the step instead when it is longer or there is no
// suggestion. hinted says whether the server's delay was used.
func ReconnectDelay(step time.Duration, err error, most time.Duration) (d time.Duration, hinted bool) {
	hint, ok := RetryDelay(err)
	if !ok {
		return step, false
	}
	hint += rand.N(hint/2 + 1)
	if most > 0 {
		hint = min(hint, most)
	}
	if step >= hint {
		return step, false
	}
	return hint, true
}

// New returns a client; Run starts it.
func New(cfg Config, h Handler, outbox *Outbox, log *slog.Logger) (*Client, error) {
	cfg.setDefaults()
	if _, err := ParseServer(cfg.Server); err != nil {
		return nil, err
	}
	return &Client{
		cfg: cfg, log: log, h: h, outbox: outbox,
		hbNow:   make(chan struct{}, 1),
		restart: make(chan struct{}),
		timer: func(d time.Duration) (<-chan time.Time, func() bool) {
			t := time.NewTimer(d)
			return t.C, t.Stop
		},
	}, nil
}

// HeartbeatNow asks for a heartbeat without waiting for the ticker.
func (c *Client) HeartbeatNow() {
	select {
	case c.hbNow <- struct{}{}:
	default:
	}
}

// RequestRestart makes Run send what is queued, close the stream cleanly
// and return ErrRestartRequested.
func (c *Client) RequestRestart() {
	c.once.Do(func() { close(c.restart) })
}

// Run connects and reconnects until ctx ends (then it returns nil after a
// clean close) or a restart is requested (ErrRestartRequested).
func (c *Client) Run(ctx context.Context) error {
	b := backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(c.cfg.BackoffInitial),
		backoff.WithMaxInterval(c.cfg.BackoffMax),
		backoff.WithMultiplier(2),
		backoff.WithRandomizationFactor(0.5),
		backoff.WithMaxElapsedTime(0),
	)
	for {
		start := time.Now()
		welcomed, err := c.session(ctx)
		if errors.Is(err, ErrRestartRequested) {
			return err
		}
		if ctx.Err() != nil {
			return nil
		}
		if welcomed && time.Since(start) >= c.cfg.HealthyAfter {
			b.Reset()
		}
		d, hinted := ReconnectDelay(b.NextBackOff(), err, c.cfg.BackoffMax)
		c.log.Info("reconnecting", "host", c.cfg.Hostname, "in", d.Round(time.Millisecond).String(), "server_retry_delay", hinted, "error", err)
		fire, stop := c.timer(d)
		select {
		case <-ctx.Done():
			stop()
			return nil
		case <-c.restart:
			stop()
			return ErrRestartRequested
		case <-fire:
		}
	}
}

// session runs one stream. welcomed says whether the server accepted it.
func (c *Client) session(ctx context.Context) (welcomed bool, err error) {
	token, err := ReadToken(c.cfg.TokenFile)
	if err != nil {
		c.log.Error("cannot read the agent token", "host", c.cfg.Hostname, "error", err)
		return false, err
	}
	conn, err := Dial(c.cfg)
	if err != nil {
		return false, err
	}
	defer conn.Close()

	// The stream outlives ctx so that a shutdown can close it cleanly.
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	sctx = metadata.AppendToOutgoingContext(sctx, "authorization", "Bearer "+token)
	welcomeTimer := time.AfterFunc(c.cfg.WelcomeTimeout, cancel)

	// A shutdown before the server has the Hello cancels the stream; once
	// the Hello is sent it half-closes the stream instead (bounded by
	// DrainTimeout), so the server sees an orderly end and not a cancelled
	// stream. helloMu orders the shutdown against the Hello's Send, so a
	// shutdown racing the Send never cancels a stream the server accepted.
	var (
		helloMu   sync.Mutex
		helloSent bool
		stream    agentv1.AgentService_ConnectClient
	)
	stopEarly := context.AfterFunc(ctx, func() {
		helloMu.Lock()
		defer helloMu.Unlock()
		if !helloSent {
			cancel()
			return
		}
		_ = stream.CloseSend()
		time.AfterFunc(c.cfg.DrainTimeout, cancel)
	})
	defer func() { stopEarly() }()

	stream, err = agentv1.NewAgentServiceClient(conn).Connect(sctx)
	if err != nil {
		welcomeTimer.Stop()
		return false, c.explain(err)
	}
	hello := c.h.Hello(ctx)
	hello.LastResult = c.outbox.helloResult()
	helloMu.Lock()
	err = stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: hello}})
	helloSent = err == nil
	helloMu.Unlock()
	if err != nil {
		if errors.Is(err, io.EOF) {
			_, err = stream.Recv()
		}
		welcomeTimer.Stop()
		return false, c.explain(err)
	}
	first, err := stream.Recv()
	welcomeTimer.Stop()
	if err != nil {
		return false, c.explain(err)
	}
	w := first.GetWelcome()
	if w == nil {
		return false, fmt.Errorf("protocol error: first message from the server is %T, want a Welcome", first.GetMsg())
	}
	if !stopEarly() {
		// ctx ended while waiting for the Welcome; the stream is half-closed:
		// wait for the server to end it.
		for {
			if _, err := stream.Recv(); err != nil {
				return true, nil
			}
		}
	}
	c.outbox.welcomed(hello.LastResult)
	interval := c.cfg.Interval
	if d := w.GetHeartbeatInterval().AsDuration(); d > 0 {
		interval = d
	}
	c.log.Info("connected", "host", c.cfg.Hostname, "host_id", w.GetHostId(), "server_version", w.GetServerVersion(), "heartbeat_interval", interval.String())

	recvErr := make(chan error, 1)
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			c.dispatch(m)
		}
	}()

	loopCtx, stopLoops := context.WithCancel(sctx)
	hb := make(chan *agentv1.Heartbeat, 1)
	sendErr := make(chan error, 1)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); c.heartbeats(loopCtx, interval, hb) }()
	go func() { defer wg.Done(); sendErr <- c.send(loopCtx, stream, hb) }()
	stopLoopsAndWait := func() { stopLoops(); wg.Wait() }

	select {
	case err := <-recvErr:
		stopLoopsAndWait()
		if errors.Is(err, io.EOF) {
			err = errors.New("server closed the stream")
		}
		return true, c.explain(err)
	case err := <-sendErr:
		stopLoopsAndWait()
		if errors.Is(err, io.EOF) {
			// The server ended the stream: its status, which may carry a
			// retry delay, comes from the receiving side.
			if err = <-recvErr; errors.Is(err, io.EOF) {
				err = errors.New("server closed the stream")
			}
		}
		if err == nil {
			err = errors.New("send loop ended")
		}
		return true, c.explain(err)
	case <-ctx.Done():
		stopLoopsAndWait()
		c.closeCleanly(stream, cancel, recvErr)
		c.log.Info("disconnected", "host", c.cfg.Hostname, "reason", "shutdown")
		return true, nil
	case <-c.restart:
		stopLoopsAndWait()
		c.closeCleanly(stream, cancel, recvErr)
		c.log.Info("disconnected", "host", c.cfg.Hostname, "reason", "restart")
		return true, ErrRestartRequested
	}
}

// closeCleanly sends what is queued, half-closes the stream and waits
// (bounded) for the server to end it, so the server sees an orderly end.
func (c *Client) closeCleanly(stream grpc.BidiStreamingClient[agentv1.ConnectRequest, agentv1.ConnectResponse], cancel context.CancelFunc, recvErr <-chan error) {
	deadline := time.AfterFunc(c.cfg.DrainTimeout, cancel)
	defer deadline.Stop()
	for m := c.outbox.peek(); m != nil; m = c.outbox.peek() {
		if err := stream.Send(m); err != nil {
			break
		}
		c.outbox.sent(m)
	}
	_ = stream.CloseSend()
	select {
	case <-recvErr:
	case <-time.After(c.cfg.DrainTimeout):
	}
	cancel()
}

// heartbeats produces a heartbeat right away, then every interval and on
// HeartbeatNow; a heartbeat not yet sent is replaced by a fresher one.
func (c *Client) heartbeats(ctx context.Context, interval time.Duration, out chan *agentv1.Heartbeat) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		hb := c.h.Heartbeat(ctx)
		select {
		case <-out:
		default:
		}
		out <- hb
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-c.hbNow:
		}
	}
}

// send is the only goroutine that writes to the stream while it is open.
func (c *Client) send(ctx context.Context, stream grpc.BidiStreamingClient[agentv1.ConnectRequest, agentv1.ConnectResponse], hb <-chan *agentv1.Heartbeat) error {
	for {
		for m := c.outbox.peek(); m != nil; m = c.outbox.peek() {
			if err := stream.Send(m); err != nil {
				return err
			}
			c.outbox.sent(m)
			if ctx.Err() != nil {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case h := <-hb:
			if err := stream.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Heartbeat{Heartbeat: h}}); err != nil {
				return err
			}
		case <-c.outbox.notify:
		}
	}
}

func (c *Client) dispatch(m *agentv1.ConnectResponse) {
	switch msg := m.GetMsg().(type) {
	case *agentv1.ConnectResponse_Run:
		c.h.Run(msg.Run)
	case *agentv1.ConnectResponse_Stop:
		c.h.Stop(msg.Stop)
	case *agentv1.ConnectResponse_Refresh:
		c.h.Refresh(msg.Refresh)
	case *agentv1.ConnectResponse_Welcome:
		c.log.Warn("ignoring a second Welcome", "host", c.cfg.Hostname)
	default:
		c.log.Warn("ignoring an unknown message from the server", "type", fmt.Sprintf("%T", m.GetMsg()))
	}
}

// explain logs rejections clearly and returns err.
func (c *Client) explain(err error) error {
	switch status.Code(err) {
	case codes.Unauthenticated, codes.PermissionDenied:
		what := "token"
		if strings.Contains(status.Convert(err).Message(), "client certificate") {
			what = "client certificate"
		}
		c.log.Error("server rejected the agent "+what+" for host "+c.cfg.Hostname, "host", c.cfg.Hostname, "code", status.Code(err).String(), "detail", status.Convert(err).Message())
	case codes.Aborted:
		c.log.Warn("another connection for this host replaced this one", "host", c.cfg.Hostname, "detail", status.Convert(err).Message())
	}
	return err
}
