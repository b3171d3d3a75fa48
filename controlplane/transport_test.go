package controlplane_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/nixplane/nixplane/agent/session"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	"github.com/nixplane/nixplane/tests/testpki"
)

// portMetric reads one nixplane_connections_* series of the server at
// base (http:// or https://) through client.
func portMetric(t *testing.T, client *http.Client, base, token, name, transport string) float64 {
	t.Helper()
	req, _ := http.NewRequest("GET", base+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET /metrics: %d", resp.StatusCode)
	}
	prefix := name + `{transport="` + transport + `"} `
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	t.Fatalf("/metrics has no %s", strings.TrimSpace(prefix))
	return 0
}

// waitMetric polls a series until it has the value want.
func waitMetric(t *testing.T, client *http.Client, base, token, name, transport string, want float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := portMetric(t, client, base, token, name, transport)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s{transport=%q} = %v, want %v", name, transport, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestAgentsServedNatively: an agent's connection, dialled as
// nixplane-agent dials, is served by grpc-go's own transport, not through
// net/http; so are other gRPC clients' connections. Closing it is seen.
func TestAgentsServedNatively(t *testing.T) {
	e := startSecEnv(t, nil)
	hc := &http.Client{Transport: &http.Transport{}}
	defer hc.CloseIdleConnections()
	base, tok := "http://"+e.addr, e.api["admin"]
	if got := portMetric(t, hc, base, tok, "nixplane_connections_total", "grpc"); got != 0 {
		t.Fatalf("native connections before any gRPC client: %v", got)
	}
	httpBefore := portMetric(t, hc, base, tok, "nixplane_connections_total", "http")

	conn, err := session.Dial(session.Config{Server: "http://" + e.addr, Interval: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := connectAgent(ctx, conn, e.agent["m-1"], "m-1"); err != nil {
		t.Fatalf("agent not welcomed: %v", err)
	}
	if got := portMetric(t, hc, base, tok, "nixplane_connections_total", "grpc"); got != 1 {
		t.Fatalf("native connections after the agent connected: %v, want 1", got)
	}
	waitMetric(t, hc, base, tok, "nixplane_connections_open", "grpc", 1)
	if got := portMetric(t, hc, base, tok, "nixplane_connections_total", "http"); got != httpBefore {
		t.Errorf("HTTP connections went from %v to %v for an agent", httpBefore, got)
	}

	// The same for an API client on native gRPC.
	fc := fleetv1.NewFleetServiceClient(e.conn)
	if _, err := fc.ListHosts(e.grpcCtx(ctx, credRead), &fleetv1.ListHostsRequest{}); err != nil {
		t.Fatal(err)
	}
	waitMetric(t, hc, base, tok, "nixplane_connections_open", "grpc", 2)

	conn.Close()
	waitMetric(t, hc, base, tok, "nixplane_connections_open", "grpc", 1)
}

// TestNativeCallsCannotClaimRequestFacts: on the native transport the
// server, not the client, says which host a call was addressed to. A
// browser session's change with a foreign Origin stays refused when the
// client also claims that origin's host in x-nixplane-host; with the
// server's own origin it is accepted.
func TestNativeCallsCannotClaimRequestFacts(t *testing.T) {
	e := startSecEnv(t, nil)
	fc := fleetv1.NewFleetServiceClient(e.conn)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	forged := metadata.AppendToOutgoingContext(e.grpcCtx(ctx, credForeignOrigin),
		"x-nixplane-host", "evil.example", "x-nixplane-transport", "rest", "x-nixplane-secure", "1")
	_, err := fc.AddHost(forged, &fleetv1.AddHostRequest{Hostname: "forged-1"})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(status.Convert(err).Message(), "foreign origin") {
		t.Fatalf("session call with a foreign Origin and a claimed host: %v, want PermissionDenied (foreign origin)", err)
	}
	if _, err := fc.AddHost(e.grpcCtx(ctx, credSession), &fleetv1.AddHostRequest{Hostname: "same-origin-1"}); err != nil {
		t.Fatalf("session call from the server's own origin: %v", err)
	}
}

// grpcFrame is msg in gRPC's length-prefixed framing.
func grpcFrame(t *testing.T, msg proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(msg)
	if err != nil {
		t.Fatal(err)
	}
	f := make([]byte, 5+len(b))
	binary.BigEndian.PutUint32(f[1:5], uint32(len(b)))
	copy(f[5:], b)
	return f
}

// readGRPCFrame reads one length-prefixed message from r into msg.
func readGRPCFrame(r io.Reader, msg proto.Message) error {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return err
	}
	b := make([]byte, binary.BigEndian.Uint32(hdr[1:]))
	if _, err := io.ReadFull(r, b); err != nil {
		return err
	}
	return proto.Unmarshal(b, msg)
}

// grpcStatus is the grpc-status of a response whose body has been read:
// from the trailers, or from the headers of a trailers-only answer.
func grpcStatus(resp *http.Response) string {
	if s := resp.Trailer.Get("Grpc-Status"); s != "" {
		return s
	}
	return resp.Header.Get("Grpc-Status")
}

// healthOverHTTP calls grpc.health.v1.Health/Check as a plain HTTP/2
// request through client and returns the serving status.
func healthOverHTTP(t *testing.T, client *http.Client, base string) (healthpb.HealthCheckResponse_ServingStatus, bool) {
	t.Helper()
	reused := false
	ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused }})
	req, _ := http.NewRequestWithContext(ctx, "POST", base+"/grpc.health.v1.Health/Check", bytes.NewReader(grpcFrame(t, &healthpb.HealthCheckRequest{})))
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("TE", "trailers")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var hr healthpb.HealthCheckResponse
	if err := readGRPCFrame(resp.Body, &hr); err != nil {
		t.Fatalf("health answer: %v", err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.ProtoMajor != 2 || grpcStatus(resp) != "0" {
		t.Fatalf("health over %s: grpc-status %q", resp.Proto, grpcStatus(resp))
	}
	return hr.GetStatus(), reused
}

// TestGRPCOnHTTPConnection: a gRPC call on an HTTP/2 connection that began
// with an ordinary request (as a browser-style client's would) is still
// served, through the HTTP server's fallback to grpc.Server.ServeHTTP.
func TestGRPCOnHTTPConnection(t *testing.T) {
	e := startSecEnv(t, nil)
	base, tok := "http://"+e.addr, e.api["admin"]
	mc := &http.Client{Transport: &http.Transport{}}
	defer mc.CloseIdleConnections()
	nativeBefore := portMetric(t, mc, base, tok, "nixplane_connections_total", "grpc")

	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &protos, MaxConnsPerHost: 1}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	resp, err := client.Get(base + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.ProtoMajor != 2 {
		t.Fatalf("GET /healthz: %d over %s, want 200 over HTTP/2", resp.StatusCode, resp.Proto)
	}
	st, reused := healthOverHTTP(t, client, base)
	if st != healthpb.HealthCheckResponse_SERVING || !reused {
		t.Fatalf("health on the HTTP connection: %v (connection reused: %v)", st, reused)
	}
	if got := portMetric(t, mc, base, tok, "nixplane_connections_total", "grpc"); got != nativeBefore {
		t.Errorf("native connections went from %v to %v; the calls belong to the HTTP connection", nativeBefore, got)
	}
}

// TestAgentOnHTTPConnectionOverTLS: behind the split, the HTTP server still
// knows a connection's TLS state: on an HTTP/2 connection over TLS that
// began with a page, an agent stream is welcomed with its host's client
// certificate and refused for another host, as on the native transport.
func TestAgentOnHTTPConnectionOverTLS(t *testing.T) {
	e := startMTLSServer(t)
	web1 := e.ca.Client("web-1", testpki.DNS("web-1")).TLS()
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: e.roots, Certificates: []tls.Certificate{web1}}, ForceAttemptHTTP2: true, MaxConnsPerHost: 1}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	base := "https://" + e.addr
	resp, err := client.Get(base + "/login")
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.ProtoMajor != 2 || !strings.HasPrefix(resp.Header.Get("Strict-Transport-Security"), "max-age=") {
		t.Fatalf("GET /login: %d over %s, HSTS %q", resp.StatusCode, resp.Proto, resp.Header.Get("Strict-Transport-Security"))
	}

	connect := func(host string) (string, bool) {
		t.Helper()
		pr, pw := io.Pipe()
		defer pw.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, "POST", base+agentv1.AgentService_Connect_FullMethodName, pr)
		req.Header.Set("Content-Type", "application/grpc")
		req.Header.Set("TE", "trailers")
		req.Header.Set("Authorization", "Bearer "+e.tokens[host])
		go func() {
			_, _ = pw.Write(grpcFrame(t, &agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: &agentv1.Hello{Hostname: host, AgentVersion: "1.0.0"}}}))
		}()
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var m agentv1.ConnectResponse
		if err := readGRPCFrame(resp.Body, &m); err == nil {
			return "", m.GetWelcome() != nil
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		return grpcStatus(resp), false
	}
	if code, welcomed := connect("web-1"); !welcomed {
		t.Fatalf("web-1 with its certificate: not welcomed (grpc-status %q)", code)
	}
	if code, welcomed := connect("web-2"); welcomed || code != strconv.Itoa(int(codes.PermissionDenied)) {
		t.Fatalf("web-2 with web-1's certificate: welcomed %v, grpc-status %q, want PermissionDenied", welcomed, code)
	}
}

// TestHTTP2ClientWaitingForSettings: a client that, like gRPC clients,
// waits for the server's SETTINGS before its first request, but asks for a
// page, is served by the HTTP server without a protocol error, although
// the split answered its SETTINGS first.
func TestHTTP2ClientWaitingForSettings(t *testing.T) {
	e := startSecEnv(t, nil)
	c, err := net.DialTimeout("tcp", e.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(c, c)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	sentRequest := false
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("reading the answer: %v", err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if f.IsAck() {
				continue
			}
			if err := fr.WriteSettingsAck(); err != nil {
				t.Fatal(err)
			}
			if !sentRequest {
				sentRequest = true
				for _, hf := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", e.addr}, {":path", "/healthz"}} {
					_ = enc.WriteField(hpack.HeaderField{Name: hf[0], Value: hf[1]})
				}
				if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
					t.Fatal(err)
				}
			}
		case *http2.GoAwayFrame:
			t.Fatalf("GOAWAY %v: %q", f.ErrCode, f.DebugData())
		case *http2.RSTStreamFrame:
			t.Fatalf("stream reset: %v", f.ErrCode)
		case *http2.MetaHeadersFrame:
			if got := f.PseudoValue("status"); got != "200" {
				t.Fatalf("GET /healthz: status %s", got)
			}
			return
		}
	}
}

// TestPlainHTTPToTLSPort: a plain HTTP request to the TLS port is answered
// in plain HTTP, saying what went wrong, and the port goes on serving.
func TestPlainHTTPToTLSPort(t *testing.T) {
	e := startMTLSServer(t)
	resp, err := http.Get("http://" + e.addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "HTTP request to an HTTPS server") {
		t.Fatalf("plain HTTP to the TLS port: %d %q", resp.StatusCode, body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	web1 := e.ca.Client("web-1", testpki.DNS("web-1")).TLS()
	if err := connectAgent(ctx, e.conn(t, &web1), e.tokens["web-1"], "web-1"); err != nil {
		t.Fatalf("agent after a plain HTTP request: %v", err)
	}
}

// TestProxyConnectionWhoseFirstCallIsGRPC: a proxy that pools one HTTP/2
// upstream connection for every route may open it with an agent's gRPC
// call; the pages and REST calls that follow on the same connection are
// still served (the connection stays with net/http, which serves both).
func TestProxyConnectionWhoseFirstCallIsGRPC(t *testing.T) {
	e := startSecEnv(t, nil)
	base := "http://" + e.addr
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &protos, MaxConnsPerHost: 1}
	defer tr.CloseIdleConnections()
	// Every request carries what a proxy adds.
	client := &http.Client{Transport: roundTripperFunc(func(r *http.Request) (*http.Response, error) {
		r.Header.Set("X-Forwarded-For", "192.0.2.7")
		return tr.RoundTrip(r)
	})}
	if st, _ := healthOverHTTP(t, client, base); st != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("gRPC first through the proxy: %v", st)
	}
	reused := false
	ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused }})
	req, _ := http.NewRequestWithContext(ctx, "GET", base+"/healthz", nil)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !reused {
		t.Fatalf("GET /healthz after a gRPC call on the same proxied connection: %d %q (connection reused: %v)", resp.StatusCode, body, reused)
	}
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestServerEndsAgentStreamsOnBothTransports: the server ends an agent's
// stream with the reason's code on grpc-go's transport and on net/http's
// (a proxied connection): a session replaced by a newer one gets Aborted,
// a removed host's session PermissionDenied — while the agent is silent.
func TestServerEndsAgentStreamsOnBothTransports(t *testing.T) {
	e := startSecEnv(t, nil)
	hc := &http.Client{Transport: &http.Transport{}}
	defer hc.CloseIdleConnections()
	base, tok := "http://"+e.addr, e.api["admin"]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	open := func(host string, proxied bool) agentv1.AgentService_ConnectClient {
		t.Helper()
		conn, err := session.Dial(session.Config{Server: base, Interval: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		sctx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+e.agent[host])
		if proxied {
			sctx = metadata.AppendToOutgoingContext(sctx, "x-forwarded-for", "192.0.2.7")
		}
		s, err := agentv1.NewAgentServiceClient(conn).Connect(sctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: &agentv1.Hello{Hostname: host, AgentVersion: "1.0.0"}}}); err != nil {
			t.Fatal(err)
		}
		if m, err := s.Recv(); err != nil || m.GetWelcome() == nil {
			t.Fatalf("%s (proxied %v): %v %v, want a welcome", host, proxied, m, err)
		}
		return s
	}
	for _, proxied := range []bool{false, true} {
		httpBefore := portMetric(t, hc, base, tok, "nixplane_connections_total", "http")
		first := open("m-1", proxied)
		if got := portMetric(t, hc, base, tok, "nixplane_connections_total", "http"); proxied != (got > httpBefore) {
			t.Fatalf("proxied %v: HTTP connections went from %v to %v", proxied, httpBefore, got)
		}
		open("m-1", !proxied)
		if _, err := first.Recv(); status.Code(err) != codes.Aborted {
			t.Errorf("proxied %v: replaced session ended with %v, want Aborted", proxied, err)
		}
	}
	for _, tc := range []struct {
		host    string
		proxied bool
	}{{"m-2", false}, {"m-3", true}} {
		s := open(tc.host, tc.proxied)
		fc := fleetv1.NewFleetServiceClient(e.conn)
		if _, err := fc.RemoveHost(e.grpcCtx(ctx, credAdmin), &fleetv1.RemoveHostRequest{HostId: tc.host, Force: true}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Recv(); status.Code(err) != codes.PermissionDenied {
			t.Errorf("proxied %v: removed host's session ended with %v, want PermissionDenied", tc.proxied, err)
		}
	}
}
