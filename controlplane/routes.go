package controlplane

import (
	"context"
	"io"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"github.com/improbable-eng/grpc-web/go/grpcweb"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/nixplane/nixplane/controlplane/agentapi"
	"github.com/nixplane/nixplane/controlplane/auth"
	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	"github.com/nixplane/nixplane/gen/openapi"
	"github.com/nixplane/nixplane/webui"
)

// MaxRESTBody bounds a REST request body.
const MaxRESTBody = 1 << 20

// forwarded are the HTTP headers the gateway passes to the gRPC server as
// metadata of the same name; everything else (including Grpc-Metadata-*
// injection) is dropped.
var forwarded = map[string]bool{
	"Cookie": true, "Origin": true, "X-Csrf-Token": true,
	"X-Nixplane-Host": true, "X-Nixplane-Transport": true, "X-Nixplane-Secure": true,
}

func newGateway(ctx context.Context, conn *grpc.ClientConn) (*runtime.ServeMux, error) {
	mux := runtime.NewServeMux(
		runtime.WithIncomingHeaderMatcher(func(k string) (string, bool) {
			k = textproto.CanonicalMIMEHeaderKey(k)
			if forwarded[k] {
				return strings.ToLower(k), true
			}
			return "", false
		}),
		runtime.WithMarshalerOption(runtime.MIMEWildcard, &runtime.JSONPb{
			MarshalOptions:   protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true},
			UnmarshalOptions: protojson.UnmarshalOptions{DiscardUnknown: false},
		}),
		runtime.WithErrorHandler(restError),
	)
	if err := fleetv1.RegisterFleetServiceHandler(ctx, mux, conn); err != nil {
		return nil, err
	}
	if err := adminv1.RegisterAdminServiceHandler(ctx, mux, conn); err != nil {
		return nil, err
	}
	return mux, nil
}

// restError is the gateway's error writer: JSON {code, message, details}
// with the standard mapping, except that a blocked command
// (FailedPrecondition) is 409 Conflict and an oversized one 413.
func restError(ctx context.Context, mux *runtime.ServeMux, m runtime.Marshaler, w http.ResponseWriter, r *http.Request, err error) {
	switch status.Code(err) {
	case codes.FailedPrecondition:
		w = &codeWriter{ResponseWriter: w, code: http.StatusConflict}
	case codes.InvalidArgument:
		if strings.Contains(status.Convert(err).Message(), "request body too large") {
			w = &codeWriter{ResponseWriter: w, code: http.StatusRequestEntityTooLarge}
		}
	case codes.ResourceExhausted:
		if strings.Contains(status.Convert(err).Message(), "larger than max") {
			w = &codeWriter{ResponseWriter: w, code: http.StatusRequestEntityTooLarge}
		}
	}
	runtime.DefaultHTTPErrorHandler(ctx, mux, m, w, r, err)
}

type codeWriter struct {
	http.ResponseWriter
	code int
}

func (c *codeWriter) WriteHeader(int) { c.ResponseWriter.WriteHeader(c.code) }

// routes builds the one-port handler.
func (s *server) routes(gw http.Handler) http.Handler {
	web := grpcweb.WrapServer(s.grpc,
		grpcweb.WithAllowedRequestHeaders([]string{"x-csrf-token"}),
		grpcweb.WithOriginFunc(func(origin string) bool { return false }), // same origin only
	)
	sessions := &auth.Sessions{Auth: s.authn, Audit: s.store, Log: s.log, SecureCookies: s.cfg.TLSCert != "",
		Render: func(w io.Writer, msg, user, next string) error {
			return webui.RenderLogin(w, webui.LoginData{Error: msg, Username: user, Next: next})
		}}
	mux := http.NewServeMux()
	mux.Handle("/login", sessions)
	mux.Handle("/logout", sessions)
	mux.Handle("/assets/", webui.Assets())
	mux.HandleFunc("GET /api/openapi.json", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(openapi.JSON)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.Handle("GET /metrics", s.requireRead(promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{})))
	mux.Handle("/api/", http.MaxBytesHandler(gw, MaxRESTBody))
	mux.HandleFunc("GET /{$}", s.dashboard)

	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The TLS state net/http cannot see under the port's split.
		if r.TLS == nil {
			r.TLS = connTLS(r.Context())
		}
		// Trusted request facts for the auth layer: drop what the client
		// claims, set what we know.
		for k := range r.Header {
			if strings.HasPrefix(k, "X-Nixplane-") {
				delete(r.Header, k)
			}
		}
		r.Header.Set("X-Nixplane-Host", r.Host)
		if r.TLS != nil || (s.cfg.TrustProxyHeaders && r.Header.Get("X-Forwarded-Proto") == "https") {
			r.Header.Set("X-Nixplane-Secure", "1")
		}
		if r.URL.Path == agentv1.AgentService_Connect_FullMethodName {
			r = r.WithContext(agentapi.CancellableStream(r.Context()))
		}
		ct := r.Header.Get("Content-Type")
		switch {
		case web.IsGrpcWebRequest(r) || web.IsAcceptableGrpcCorsRequest(r):
			r.Header.Set("X-Nixplane-Transport", "grpc-web")
			web.ServeHTTP(w, r)
		case r.ProtoMajor == 2 && strings.HasPrefix(ct, "application/grpc"):
			r.Header.Set("X-Nixplane-Transport", "grpc")
			s.grpc.ServeHTTP(w, r)
		default:
			securityHeaders(w.Header(), r.Header.Get("X-Nixplane-Secure") == "1")
			if strings.HasPrefix(r.URL.Path, "/api/") {
				r.Header.Set("X-Nixplane-Transport", "rest")
				if r.ContentLength > MaxRESTBody {
					w.Header().Set("Content-Type", "application/json")
					w.WriteHeader(http.StatusRequestEntityTooLarge)
					_, _ = w.Write([]byte(`{"code":8,"message":"request body larger than ` + strconv.Itoa(MaxRESTBody) + ` bytes","details":[]}`))
					return
				}
			}
			mux.ServeHTTP(w, r)
		}
	})
}

// securityHeaders are sent with every page and REST response; HSTS only
// when the request came over TLS (directly or through a trusted proxy), as
// browsers ignore it on plain HTTP.
func securityHeaders(h http.Header, tls bool) {
	h.Set("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
	h.Set("X-Frame-Options", "DENY")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "same-origin")
	if tls {
		h.Set("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
	}
}

// mdFromRequest is the metadata the auth layer reads for plain-HTTP routes.
func mdFromRequest(r *http.Request) metadata.MD {
	md := metadata.MD{}
	for k, key := range map[string]string{"Authorization": auth.MDAuthorization, "Cookie": auth.MDCookie, "Origin": auth.MDOrigin,
		"X-Csrf-Token": auth.MDCSRF, "X-Nixplane-Host": auth.MDHost} {
		if v := r.Header.Values(k); len(v) > 0 {
			md[key] = v
		}
	}
	return md
}

// requireRead admits callers with the read scope (API token or session).
func (s *server) requireRead(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, err := s.authn.Authenticate(r.Context(), auth.MethodMetrics, mdFromRequest(r))
		if err != nil {
			code := runtime.HTTPStatusFromCode(status.Code(err))
			http.Error(w, status.Convert(err).Message(), code)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// dashboard serves the page: the login page without a session, else the
// server-rendered fleet the script hydrates.
func (s *server) dashboard(w http.ResponseWriter, r *http.Request) {
	c, err := r.Cookie(auth.SessionCookie)
	if err != nil {
		http.Redirect(w, r, "/login", http.StatusSeeOther)
		return
	}
	id, err := s.authn.IdentifySession(r.Context(), c.Value)
	if err != nil {
		http.Redirect(w, r, "/login", http.StatusSeeOther)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if err := webui.RenderDashboard(w, webui.DashboardData{Snapshot: s.hub.Snapshot(), CSRFToken: id.CSRFToken, User: id.Name}); err != nil {
		s.log.Error("render dashboard", "err", err)
	}
}
