package controlplane

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/soheilhy/cmux"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/tap"

	"github.com/nixplane/nixplane/controlplane/agentapi"
	"github.com/nixplane/nixplane/controlplane/auth"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
)

// The one port serves two HTTP/2 stacks. A connection whose first request is
// native gRPC (an agent, grpcurl, the CLI) goes to grpc-go's own transport
// (grpc.Server.Serve), which needs about half the memory per connection of
// net/http's. Every other connection — HTTP/1.1, browsers, grpc-web, REST
// over HTTP/2 — goes to the net/http server, which still hands gRPC requests
// it receives to grpc.Server.ServeHTTP.
//
// The split is made per connection by cmux, after TLS (if any) has been
// terminated, from the first request's content-type.

// Transports, the label of the nixplane_connections_* series.
const (
	transportGRPC = "grpc" // grpc-go's own HTTP/2 transport
	transportHTTP = "http" // net/http (HTTP/1.1 and HTTP/2)
)

const (
	// sniffTimeout bounds the TLS handshake and the wait for a connection's
	// first request, like http.Server.ReadHeaderTimeout does for HTTP.
	sniffTimeout = 10 * time.Second
	// sniffLimit bounds what is read and buffered to classify a connection.
	sniffLimit = 256 << 10
	// frameHeaderLen is the length of an HTTP/2 frame header, which is all
	// of a SETTINGS acknowledgement.
	frameHeaderLen = 9
)

// connMetrics count the connections each transport accepted and holds.
type connMetrics struct {
	total *prometheus.CounterVec
	open  *prometheus.GaugeVec
}

func newConnMetrics(reg prometheus.Registerer) *connMetrics {
	m := &connMetrics{
		total: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nixplane_connections_total",
			Help: "Connections accepted on the one port, by the transport serving them (grpc: grpc-go's own; http: net/http)."}, []string{"transport"}),
		open: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "nixplane_connections_open",
			Help: "Open connections on the one port, by the transport serving them."}, []string{"transport"}),
	}
	for _, t := range []string{transportGRPC, transportHTTP} {
		m.total.WithLabelValues(t)
		m.open.WithLabelValues(t)
	}
	reg.MustRegister(m.total, m.open)
	return m
}

// onePort is the listener split: grpc for grpc.Server.Serve, http for
// http.Server.Serve. Closing either closes the port.
type onePort struct {
	root net.Listener
	mux  cmux.CMux
	grpc net.Listener
	http net.Listener
}

// splitPort splits ln. With tlsCfg, TLS is terminated first; the client
// certificate then reaches both transports (see nativeCreds and
// withConnTLS).
func splitPort(ln net.Listener, tlsCfg *tls.Config, m *connMetrics, log *slog.Logger) *onePort {
	if tlsCfg != nil {
		ln = tls.NewListener(ln, tlsCfg)
	}
	root := &rootListener{Listener: ln, log: log}
	mux := cmux.New(root)
	mux.SetReadTimeout(sniffTimeout)
	p := &onePort{root: root, mux: mux}
	handshake := func(w io.Writer, _ io.Reader) bool {
		if pc, _ := w.(*portConn); pc != nil && pc.unusable {
			return false // closed: see portConn.unusable
		}
		return !tlsHandshakeFailed(w, log)
	}
	p.grpc = &classListener{Listener: mux.MatchWithWriters(matchNativeGRPC), root: root, transport: transportGRPC, m: m}
	p.http = &classListener{Listener: mux.MatchWithWriters(handshake), root: root, transport: transportHTTP, m: m}
	// Connections that match neither (a failed TLS handshake) are closed;
	// the port goes on serving (cmux's default error handler).
	return p
}

// tlsHandshakeFailed reports whether w is a TLS connection of the port whose
// handshake failed (the TLS stack has sent the client its alert). The
// connection is then half-closed and drained briefly before cmux closes it,
// so that the client reads the alert (for example "unknown certificate
// authority") instead of a connection reset: with TLS 1.3 the client has
// already written its first request when the server refuses its
// certificate.
func tlsHandshakeFailed(w io.Writer, log *slog.Logger) bool {
	c, _ := w.(net.Conn)
	tc := tlsConn(c)
	if tc == nil {
		return false
	}
	err := tc.Handshake() // done already while matching; returns its result
	if err == nil {
		return false
	}
	log.Debug("TLS handshake failed", "remote", tc.RemoteAddr().String(), "err", err)
	raw := tc.NetConn()
	// Plain HTTP to the TLS port gets a readable answer, as net/http gives.
	var rh tls.RecordHeaderError
	if errors.As(err, &rh) && rh.Conn != nil && looksLikeHTTP(rh.RecordHeader) {
		_, _ = io.WriteString(raw, "HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
	}
	if tcp, ok := raw.(*net.TCPConn); ok {
		_ = tcp.CloseWrite()
	}
	_ = raw.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	_, _ = io.Copy(io.Discard, io.LimitReader(raw, 64<<10))
	return true
}

// looksLikeHTTP reports whether the first bytes of a TLS record are
// those of a plain HTTP/1 request.
func looksLikeHTTP(hdr [5]byte) bool {
	switch string(hdr[:]) {
	case "GET /", "HEAD ", "POST ", "PUT /", "OPTIO":
		return true
	}
	return false
}

// serve accepts and classifies connections until the port is closed.
func (p *onePort) serve() error { return p.mux.Serve() }

// portClosed reports whether err is what Serve and Accept return once the
// port was closed.
func portClosed(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, cmux.ErrListenerClosed) || errors.Is(err, cmux.ErrServerClosed)
}

// rootListener wraps every accepted connection in a *portConn.
type rootListener struct {
	net.Listener
	log *slog.Logger
}

// Accept retries temporary errors (out of file descriptors, above all)
// after a pause, as http.Server does; cmux would retry at once, in a busy
// loop.
func (l *rootListener) Accept() (net.Conn, error) {
	var pause time.Duration
	for {
		c, err := l.Listener.Accept()
		if err == nil {
			return &portConn{Conn: c}, nil
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Temporary() {
			return nil, err
		}
		pause = min(max(2*pause, 5*time.Millisecond), time.Second)
		l.log.Warn("accept failed; retrying", "err", err, "in", pause)
		time.Sleep(pause)
	}
}

// portConn is a connection of the port: TCP, or a *tls.Conn over it.
type portConn struct {
	net.Conn
	// settingsAckEnd is set by matchNativeGRPC: the stream offset just past
	// the client's acknowledgement of the SETTINGS frame the matcher sent
	// (0: none sent).
	settingsAckEnd int64
	// unusable: the matcher sent SETTINGS but the connection went to
	// neither transport before the client acknowledged them (it sent no
	// request within sniffTimeout, or too much): net/http could not take
	// it over, so it is closed.
	unusable  bool
	m         *connMetrics
	transport string
	closed    atomic.Bool
}

func (c *portConn) Close() error {
	if c.closed.CompareAndSwap(false, true) && c.m != nil {
		c.m.open.WithLabelValues(c.transport).Dec()
	}
	return c.Conn.Close()
}

// tlsConn is the TLS connection under c (nil: plain TCP, or not a
// connection of the port).
func tlsConn(c net.Conn) *tls.Conn {
	for ; c != nil; c = wrapped(c) {
		if tc, ok := c.(*tls.Conn); ok {
			return tc
		}
	}
	return nil
}

// fromPort is the *portConn under c, or nil for a connection that did not
// come through the port (the gateway's in-memory connection).
func fromPort(c net.Conn) *portConn {
	for ; c != nil; c = wrapped(c) {
		if pc, ok := c.(*portConn); ok {
			return pc
		}
	}
	return nil
}

// wrapped is the connection one of the port's wrappers wraps, or nil.
func wrapped(c net.Conn) net.Conn {
	switch x := c.(type) {
	case *portConn:
		return x.Conn
	case *cmux.MuxConn:
		return x.Conn
	case *ackStripConn:
		return x.Conn
	}
	return nil
}

// classListener hands out one class of connections and counts them. Closing
// it closes the port, so http.Server.Shutdown and grpc.Server.Stop stop new
// connections of both kinds at once.
type classListener struct {
	net.Listener
	root      net.Listener
	transport string
	m         *connMetrics
}

func (l *classListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if pc := fromPort(c); pc != nil {
		pc.m, pc.transport = l.m, l.transport
		l.m.total.WithLabelValues(l.transport).Inc()
		l.m.open.WithLabelValues(l.transport).Inc()
		if pc.settingsAckEnd > 0 {
			// net/http's HTTP/2 server would take the acknowledgement of
			// a SETTINGS frame it never sent for a protocol error.
			c = &ackStripConn{Conn: c, from: pc.settingsAckEnd - frameHeaderLen, to: pc.settingsAckEnd}
		}
	}
	return c, nil
}

func (l *classListener) Close() error {
	err := l.root.Close()
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// isNativeGRPC reports whether an HTTP/2 content-type is gRPC's own
// (application/grpc, application/grpc+proto, ...), not grpc-web's.
func isNativeGRPC(ct string) bool {
	rest, ok := strings.CutPrefix(ct, "application/grpc")
	return ok && (rest == "" || rest[0] == '+' || rest[0] == ';')
}

// matchNativeGRPC is the cmux matcher of native gRPC connections: HTTP/2
// with prior knowledge whose first request has a gRPC content-type and did
// not come through a proxy. A proxy may pool one upstream connection for
// every route — agents' gRPC, pages, REST — so its connections stay with
// net/http, which serves all of them (gRPC through grpc.Server.ServeHTTP).
//
// gRPC clients send their first request only after the server's SETTINGS
// frame, so the matcher answers the client's SETTINGS with an empty one (as
// cmux.HTTP2MatchHeaderFieldSendSettings does). grpc-go ignores the
// client's acknowledgement of it; for a connection that goes to net/http,
// the matcher reads on until the acknowledgement and records where it is,
// so that it can be removed from what net/http reads.
func matchNativeGRPC(w io.Writer, r io.Reader) (grpc bool) {
	cr := &countingReader{r: r}
	if !cmux.HTTP2()(cr) {
		return false
	}
	pc, _ := w.(*portConn)
	var sentSettings, haveHeaders bool
	var ackEnd int64
	defer func() {
		// A connection for net/http after our SETTINGS: it can take the
		// connection over only once the acknowledgement is known.
		if grpc || !sentSettings || pc == nil {
			return
		}
		if ackEnd > 0 {
			pc.settingsAckEnd = ackEnd
		} else {
			pc.unusable = true
		}
	}()
	fr := http2.NewFramer(w, cr)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	// Until the server's own SETTINGS, a client may not send frames over
	// the default maximum of 16 KiB.
	fr.SetMaxReadFrameSize(64 << 10)
	for cr.n < sniffLimit {
		f, err := fr.ReadFrame()
		if err != nil {
			if _, stream := err.(http2.StreamError); !stream {
				return false
			}
			continue
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() && !sentSettings {
				if err := fr.WriteSettings(); err != nil {
					return false
				}
				sentSettings = true
			} else if f.IsAck() && sentSettings && ackEnd == 0 {
				ackEnd = cr.n
			}
		case *http2.MetaHeadersFrame:
			if !haveHeaders {
				haveHeaders = true
				grpc = isNativeGRPC(headerValue(f, "content-type")) && !proxied(f)
			}
		}
		if haveHeaders && (grpc || !sentSettings || ackEnd > 0) {
			return grpc
		}
	}
	return false
}

// proxied reports whether a request came through a proxy: it carries one of
// the headers proxies add (agents and the CLI send none of them).
func proxied(f *http2.MetaHeadersFrame) bool {
	for _, hf := range f.RegularFields() {
		switch hf.Name {
		case "forwarded", "via", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip":
			return true
		}
	}
	return false
}

func headerValue(f *http2.MetaHeadersFrame, name string) string {
	for _, hf := range f.RegularFields() {
		if hf.Name == name {
			return hf.Value
		}
	}
	return ""
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// ackStripConn removes the stream bytes [from, to) from what is read.
type ackStripConn struct {
	net.Conn
	pos, from, to int64
}

func (c *ackStripConn) Read(p []byte) (int, error) {
	for {
		n, err := c.Conn.Read(p)
		start, end := c.pos, c.pos+int64(n)
		c.pos = end
		if end <= c.from || start >= c.to {
			return n, err
		}
		a, b := max(start, c.from)-start, min(end, c.to)-start
		n = copy(p[a:], p[b:n]) + int(a)
		if n > 0 || err != nil {
			return n, err
		}
	}
}

// nativeCreds are the grpc.Server's transport credentials. TLS is
// terminated before the port is split, so there is no handshake left to do:
// a TLS connection's state becomes the peer's credentials.TLSInfo (so the
// agent client certificate check sees the certificate on both paths), a
// plain one gets plainInfo, and the gateway's in-memory connection
// inMemoryInfo.
type nativeCreds struct{}

// plainInfo is the AuthInfo of a plain-TCP connection of the port.
type plainInfo struct{ credentials.CommonAuthInfo }

func (plainInfo) AuthType() string { return "insecure" }

// inMemoryInfo is the AuthInfo of the REST gateway's connection.
type inMemoryInfo struct{ credentials.CommonAuthInfo }

func (inMemoryInfo) AuthType() string { return "in-memory" }

func (nativeCreds) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	if fromPort(c) == nil {
		return c, inMemoryInfo{credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}, nil
	}
	if tc := tlsConn(c); tc != nil {
		return c, credentials.TLSInfo{State: tc.ConnectionState(),
			CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}}, nil
	}
	return c, plainInfo{credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}, nil
}

func (nativeCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("nixplane: server-side credentials only")
}

func (nativeCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "nixplane"}
}

func (c nativeCreds) Clone() credentials.TransportCredentials { return c }

func (nativeCreds) OverrideServerName(string) error { return nil }

// nativeCallFacts is the grpc.Server's tap: for a call that came over the
// native transport from outside, it does what the HTTP dispatcher in routes
// does for calls it hands to the gRPC server — drop the x-nixplane-* keys
// the client sent and set the trusted request facts the auth layer reads.
// Calls over ServeHTTP never reach it; calls of the REST gateway keep the
// facts the dispatcher set for their outside request.
func (s *server) nativeCallFacts(ctx context.Context, info *tap.Info) (context.Context, error) {
	if info.FullMethodName == agentv1.AgentService_Connect_FullMethodName {
		ctx = agentapi.CancellableStream(ctx)
	}
	secure := false
	if p, _ := peer.FromContext(ctx); p != nil {
		switch p.AuthInfo.(type) {
		case inMemoryInfo:
			return ctx, nil // the REST gateway forwards the dispatcher's facts
		case credentials.TLSInfo:
			secure = true
		}
	}
	// Anything else is a connection of the port: never trust what the
	// client sent under the server's own keys.
	md := make(metadata.MD, len(info.Header)+3)
	for k, v := range info.Header {
		if !strings.HasPrefix(k, "x-nixplane-") {
			md[k] = v
		}
	}
	md[auth.MDTransport] = []string{"grpc"}
	if a := info.Header[":authority"]; len(a) > 0 {
		md[auth.MDHost] = a[:1]
	}
	if secure || (s.cfg.TrustProxyHeaders && len(info.Header["x-forwarded-proto"]) > 0 && info.Header["x-forwarded-proto"][0] == "https") {
		md[auth.MDSecure] = []string{"1"}
	}
	return metadata.NewIncomingContext(ctx, md), nil
}

// connTLSKey keys the TLS state of an HTTP connection in its context.
type connTLSKey struct{}

// withConnTLS is the http.Server's ConnContext: it keeps the TLS state of a
// connection of the port, which net/http cannot see under cmux's wrapper,
// for the dispatcher to put into Request.TLS.
func withConnTLS(ctx context.Context, c net.Conn) context.Context {
	if tc := tlsConn(c); tc != nil {
		if st := tc.ConnectionState(); st.HandshakeComplete {
			return context.WithValue(ctx, connTLSKey{}, &st)
		}
	}
	return ctx
}

// connTLS is the TLS state withConnTLS kept (nil: plain connection).
func connTLS(ctx context.Context) *tls.ConnectionState {
	st, _ := ctx.Value(connTLSKey{}).(*tls.ConnectionState)
	return st
}

// Flow-control windows of the native transport: what a client may send
// before the server has read it, per stream and per connection.
const (
	nativeStreamWindow = 256 << 10
	nativeConnWindow   = 1 << 20
	// nativeWriteBuffer is a native connection's (shared) write buffer, as
	// net/http's HTTP/2 server has it. nativeReadBuffer is its read buffer:
	// an agent's frames are small, and a frame larger than the buffer is
	// read past it into its own, so 1 KiB costs no extra read for them and
	// saves 3 KiB per agent against net/http's 4 KiB (docs/PERFORMANCE.md).
	nativeWriteBuffer = 4 << 10
	nativeReadBuffer  = 1 << 10
)

// stopGRPC stops the gRPC server. GracefulStop comes first: native
// connections get GOAWAY only after what their handlers last wrote (an
// agent's "server shutting down") has been sent. After grace, Stop ends the
// streams that remain (watchers, log followers).
func (s *server) stopGRPC(grace time.Duration) {
	done := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(done) }()
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-done:
		return
	case <-t.C:
	}
	s.grpc.Stop()
	<-done
}
