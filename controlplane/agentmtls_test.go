package controlplane_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/nixplane/nixplane/agent/session"
	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/fleetapi"
	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	"github.com/nixplane/nixplane/tests/testpki"
)

func writeFile(t *testing.T, path string, b []byte) string {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// mtlsEnv is a server run with TLS and --agent-client-ca, seeded with the
// hosts web-1 and web-2 and an admin API token.
type mtlsEnv struct {
	addr   string
	dir    string
	ca     *testpki.CA
	roots  *x509.CertPool
	tokens map[string]string
	admin  string
}

func startMTLSServer(t *testing.T) *mtlsEnv {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	dir := t.TempDir()
	e := &mtlsEnv{dir: dir, ca: testpki.NewCA(t, "nixplane agents"), tokens: map[string]string{}}
	e.roots = e.ca.Pool()
	srv := e.ca.Server()

	st, err := controlplane.OpenStore(ctx, filepath.Join(dir, "data"))
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []string{"web-1", "web-2"} {
		_, tok, err := fleetapi.RegisterHost(ctx, st, &fleetv1.AddHostRequest{Hostname: h}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		e.tokens[h] = tok
	}
	tk, secret, err := fleetapi.NewAPIToken("ops", adminv1.Scope_SCOPE_ADMIN, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.CreateAPIToken(ctx, tk); err != nil {
		t.Fatal(err)
	}
	e.admin = secret
	st.Close()

	ready := make(chan string, 1)
	done := make(chan error, 1)
	cfg := controlplane.Config{Listen: "127.0.0.1:0", DataDir: filepath.Join(dir, "data"), Version: "1.0.0",
		TLSCert: writeFile(t, filepath.Join(dir, "server.pem"), srv.CertPEM()), TLSKey: writeFile(t, filepath.Join(dir, "server.key"), srv.KeyPEM()),
		AgentClientCA: writeFile(t, filepath.Join(dir, "agents-ca.pem"), e.ca.PEM()), AdminPassword: "correct horse battery",
		Out: io.Discard, Log: slog.New(slog.DiscardHandler), Ready: func(a string) { ready <- a }}
	go func() { done <- controlplane.Run(ctx, cfg) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server: %v", err)
		}
	})
	select {
	case e.addr = <-ready:
	case err := <-done:
		t.Fatalf("server did not start: %v", err)
	}
	return e
}

// conn is a native gRPC connection over TLS presenting cert (nil: none)
// whichever CAs the server asks for, as the agent does.
func (e *mtlsEnv) conn(t *testing.T, cert *tls.Certificate) *grpc.ClientConn {
	t.Helper()
	tc := &tls.Config{RootCAs: e.roots, MinVersion: tls.VersionTLS12}
	if cert != nil {
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
	}
	c, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// connect opens the agent stream with token (empty: none), says hello as
// host and returns the first answer's error (nil: welcomed).
func connectAgent(ctx context.Context, c *grpc.ClientConn, token, host string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	s, err := agentv1.NewAgentServiceClient(c).Connect(ctx)
	if err != nil {
		return err
	}
	if err := s.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: &agentv1.Hello{Hostname: host, AgentVersion: "1.0.0"}}}); err != nil && err != io.EOF {
		return err
	}
	m, err := s.Recv()
	if err != nil {
		return err
	}
	if m.GetWelcome() == nil {
		return status.Errorf(codes.Internal, "first message %T, want a welcome", m.GetMsg())
	}
	return nil
}

// TestAgentClientCertificates: with --agent-client-ca, an agent needs its
// token and a certificate from that CA naming its host; each way of getting
// it wrong is refused with its own code, while browsers and API clients
// carry on without a certificate.
func TestAgentClientCertificates(t *testing.T) {
	e := startMTLSServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	foreign := testpki.NewCA(t, "somebody else")
	web1 := e.ca.Client("web-1", testpki.DNS("web-1")).TLS()
	web2 := e.ca.Client("web-2", testpki.DNS("web-2")).TLS()
	web1CNOnly := e.ca.Client("web-1").TLS()
	web1Foreign := foreign.Client("web-1", testpki.DNS("web-1")).TLS()
	web1Upper := e.ca.Client("agent", testpki.DNS("other.example", "WEB-1")).TLS()

	for _, tc := range []struct {
		name        string
		cert        *tls.Certificate
		token, host string
		want        codes.Code
		msg         string
	}{
		{"token and its host's certificate", &web1, e.tokens["web-1"], "web-1", codes.OK, ""},
		{"certificate naming the host by CN only", &web1CNOnly, e.tokens["web-1"], "web-1", codes.OK, ""},
		{"host among several SANs, any case", &web1Upper, e.tokens["web-1"], "web-1", codes.OK, ""},
		{"second host with its own pair", &web2, e.tokens["web-2"], "web-2", codes.OK, ""},
		{"no certificate", nil, e.tokens["web-1"], "web-1", codes.Unauthenticated, "this server requires an agent client certificate"},
		{"another host's certificate", &web2, e.tokens["web-1"], "web-1", codes.PermissionDenied, `names "web-2", not host "web-1"`},
		{"certificate without its token", &web1, "", "web-1", codes.Unauthenticated, "authentication required"},
		{"certificate with another host's token", &web1, e.tokens["web-2"], "web-2", codes.PermissionDenied, `not host "web-2"`},
		// Refused by the TLS handshake itself: there is no gRPC answer.
		{"certificate from a foreign CA", &web1Foreign, e.tokens["web-1"], "web-1", codes.Unavailable, "certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := connectAgent(ctx, e.conn(t, tc.cert), tc.token, tc.host)
			if status.Code(err) != tc.want || !strings.Contains(status.Convert(err).Message(), tc.msg) {
				t.Fatalf("connect: %v; want %s containing %q", err, tc.want, tc.msg)
			}
		})
	}

	// API clients call the other services with or without a certificate.
	for name, cert := range map[string]*tls.Certificate{"without": nil, "with an agent's": &web1} {
		actx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+e.admin)
		resp, err := fleetv1.NewFleetServiceClient(e.conn(t, cert)).ListHosts(actx, &fleetv1.ListHostsRequest{})
		if err != nil || len(resp.GetHosts()) != 2 {
			t.Errorf("ListHosts %s client certificate: %v, %v", name, resp, err)
		}
		// An agent's certificate is no credential for anything else.
		_, err = fleetv1.NewFleetServiceClient(e.conn(t, cert)).ListHosts(ctx, &fleetv1.ListHostsRequest{})
		if status.Code(err) != codes.Unauthenticated {
			t.Errorf("ListHosts %s client certificate and no token: %v, want Unauthenticated", name, err)
		}
	}

	// A browser without a certificate gets the login page; REST with a
	// bearer token works.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.roots}, ForceAttemptHTTP2: true},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("https://" + e.addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/login" {
		t.Fatalf("GET / without session: %d to %q, want 303 to /login", resp.StatusCode, resp.Header.Get("Location"))
	}
	resp, err = hc.Get("https://" + e.addr + "/login")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(strings.ToLower(string(page)), "password") {
		t.Fatalf("GET /login: %d\n%s", resp.StatusCode, page)
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+e.addr+"/api/hosts", nil)
	req.Header.Set("Authorization", "Bearer "+e.admin)
	resp, err = hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"web-2"`) {
		t.Fatalf("GET /api/hosts with a token: %d\n%s", resp.StatusCode, body)
	}
}

// quietHandler is an agent that only says hello and sends empty heartbeats.
type quietHandler struct{ host string }

func (h quietHandler) Hello(context.Context) *agentv1.Hello {
	return &agentv1.Hello{Hostname: h.host, AgentVersion: "1.0.0"}
}
func (quietHandler) Heartbeat(context.Context) *agentv1.Heartbeat { return &agentv1.Heartbeat{} }
func (quietHandler) Run(*agentv1.RunCommand)                      {}
func (quietHandler) Stop(*agentv1.StopCommand)                    {}
func (quietHandler) Refresh(*agentv1.RefreshStatus)               {}

// lockedBuffer collects log output written from several goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestAgentSessionRotatesClientCertificate runs the agent's session client
// against the server: with another host's certificate in its files it is
// refused and keeps retrying; once the right certificate is written to the
// same files it connects, without being restarted.
func TestAgentSessionRotatesClientCertificate(t *testing.T) {
	e := startMTLSServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir := t.TempDir()
	tokenFile := writeFile(t, filepath.Join(dir, "token"), []byte(e.tokens["web-1"]+"\n"))
	caFile := writeFile(t, filepath.Join(dir, "ca.pem"), e.ca.PEM())
	certFile, keyFile := filepath.Join(dir, "client.pem"), filepath.Join(dir, "client.key")
	wrong := e.ca.Client("web-2", testpki.DNS("web-2"))
	writeFile(t, certFile, wrong.CertPEM())
	writeFile(t, keyFile, wrong.KeyPEM())

	logs := &lockedBuffer{}
	client, err := session.New(session.Config{Server: "https://" + e.addr, Hostname: "web-1", TokenFile: tokenFile,
		CAFile: caFile, ClientCertFile: certFile, ClientKeyFile: keyFile,
		BackoffInitial: 20 * time.Millisecond, BackoffMax: 100 * time.Millisecond},
		quietHandler{host: "web-1"}, session.NewOutbox(64, filepath.Join(dir, "pending"), slog.New(slog.DiscardHandler)),
		slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	runDone := make(chan error, 1)
	runCtx, stop := context.WithCancel(ctx)
	go func() { runDone <- client.Run(runCtx) }()
	defer func() {
		stop()
		if err := <-runDone; err != nil {
			t.Errorf("session: %v", err)
		}
	}()

	poll := func(what string, cond func() bool) {
		t.Helper()
		for !cond() {
			select {
			case <-ctx.Done():
				t.Fatalf("timed out waiting for %s; agent log:\n%s", what, logs.String())
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	poll("the refusal of web-2's certificate", func() bool {
		return strings.Contains(logs.String(), "PermissionDenied") && strings.Contains(logs.String(), `names \"web-2\"`)
	})

	fleet := fleetv1.NewFleetServiceClient(e.conn(t, nil))
	actx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+e.admin)
	online := func() bool {
		h, err := fleet.GetHost(actx, &fleetv1.GetHostRequest{HostId: "web-1"})
		if err != nil {
			t.Fatalf("GetHost: %v", err)
		}
		return h.GetHost().GetOnline()
	}
	if online() {
		t.Fatal("web-1 is online with web-2's certificate")
	}

	// Renew: the right certificate replaces the files in place.
	right := e.ca.Client("web-1", testpki.DNS("web-1"))
	writeFile(t, keyFile+".new", right.KeyPEM())
	writeFile(t, certFile+".new", right.CertPEM())
	if err := os.Rename(keyFile+".new", keyFile); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(certFile+".new", certFile); err != nil {
		t.Fatal(err)
	}
	poll("web-1 online with its own certificate", online)
}

// TestAgentClientCANeedsTLS: --agent-client-ca without the server's own
// TLS (as behind a TLS-terminating proxy) and a CA file without
// certificates are refused at start, before anything is created.
func TestAgentClientCANeedsTLS(t *testing.T) {
	dir := t.TempDir()
	ca := writeFile(t, filepath.Join(dir, "ca.pem"), testpki.NewCA(t, "agents").PEM())
	notCA := writeFile(t, filepath.Join(dir, "empty.pem"), []byte("not a certificate\n"))
	for _, tc := range []struct {
		name string
		cfg  controlplane.Config
		want string
	}{
		{"no TLS", controlplane.Config{AgentClientCA: ca}, "--agent-client-ca needs --tls-cert and --tls-key"},
		{"no certificate in the bundle", controlplane.Config{AgentClientCA: notCA, TLSCert: ca, TLSKey: ca}, "holds no PEM certificates"},
		{"missing bundle", controlplane.Config{AgentClientCA: filepath.Join(dir, "nope.pem"), TLSCert: ca, TLSKey: ca}, "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := filepath.Join(dir, tc.name)
			tc.cfg.DataDir, tc.cfg.Listen, tc.cfg.Out, tc.cfg.Log = data, "127.0.0.1:0", io.Discard, slog.New(slog.DiscardHandler)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err := controlplane.Run(ctx, tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Run = %v, want an error containing %q", err, tc.want)
			}
			if _, err := os.Stat(data); !os.IsNotExist(err) {
				t.Errorf("the data directory was created before the configuration was checked: %v", err)
			}
		})
	}
}
