package auth

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pquerna/otp/totp"
	"golang.org/x/crypto/bcrypt"
	"google.golang.org/genproto/googleapis/api/annotations"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/nixplane/nixplane/controlplane/store"
	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

var quietLog = slog.New(slog.DiscardHandler)

// registeredMethods builds a gRPC server with every service the control
// plane serves and returns its full method names.
func registeredMethods(t *testing.T) []string {
	t.Helper()
	s := grpc.NewServer()
	agentv1.RegisterAgentServiceServer(s, agentv1.UnimplementedAgentServiceServer{})
	fleetv1.RegisterFleetServiceServer(s, fleetv1.UnimplementedFleetServiceServer{})
	adminv1.RegisterAdminServiceServer(s, adminv1.UnimplementedAdminServiceServer{})
	healthpb.RegisterHealthServer(s, health.NewServer())
	reflection.Register(s)
	var out []string
	for svc, info := range s.GetServiceInfo() {
		for _, m := range info.Methods {
			out = append(out, "/"+svc+"/"+m.Name)
		}
	}
	// The generated descriptors too: a method added to a proto but not yet
	// registered must have a rule before it can be served.
	for _, fd := range []protoreflect.FileDescriptor{agentv1.File_nixplane_agent_v1_agent_proto, fleetv1.File_nixplane_fleet_v1_fleet_proto, adminv1.File_nixplane_admin_v1_admin_proto} {
		for i := range fd.Services().Len() {
			sd := fd.Services().Get(i)
			for j := range sd.Methods().Len() {
				out = append(out, "/"+string(sd.FullName())+"/"+string(sd.Methods().Get(j).Name()))
			}
		}
	}
	if len(out) < 30 {
		t.Fatalf("only %d methods found; the walk is broken", len(out))
	}
	return out
}

func TestEveryMethodHasARule(t *testing.T) {
	p := DefaultPolicy()
	seen := map[string]bool{}
	for _, m := range registeredMethods(t) {
		seen[m] = true
		if _, ok := p[m]; !ok {
			t.Errorf("method %s has no rule in DefaultPolicy: give it one", m)
		}
	}
	for m := range p {
		if m != MethodMetrics && !seen[m] {
			t.Errorf("DefaultPolicy has a rule for %s, which no service defines", m)
		}
	}
}

// TestRulesMatchHTTPVerbs: a method bound to a non-GET HTTP verb changes
// something and must demand CSRF from sessions; a GET must not.
func TestRulesMatchHTTPVerbs(t *testing.T) {
	p := DefaultPolicy()
	for _, fd := range []protoreflect.FileDescriptor{fleetv1.File_nixplane_fleet_v1_fleet_proto, adminv1.File_nixplane_admin_v1_admin_proto} {
		for i := range fd.Services().Len() {
			sd := fd.Services().Get(i)
			for j := range sd.Methods().Len() {
				md := sd.Methods().Get(j)
				name := "/" + string(sd.FullName()) + "/" + string(md.Name())
				rule, ok := p[name]
				if !ok {
					continue // reported by TestEveryMethodHasARule
				}
				if rule.Public || rule.Agent || rule.Scope < ScopeRead {
					t.Errorf("%s: fleet and admin methods need a user or API token with a scope, got %+v", name, rule)
				}
				hr, _ := proto.GetExtension(md.Options(), annotations.E_Http).(*annotations.HttpRule)
				if hr == nil {
					t.Errorf("%s has no HTTP binding", name)
					continue
				}
				isGet := hr.GetGet() != ""
				if isGet == rule.Mutating {
					t.Errorf("%s: HTTP GET=%v but rule Mutating=%v", name, isGet, rule.Mutating)
				}
			}
		}
	}
	if !p[agentv1.AgentService_Connect_FullMethodName].Agent {
		t.Error("the agent stream must be agent-only")
	}
}

// clock is an injectable clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

type fixture struct {
	st    *store.SQLite
	authn *Authenticator
	clock *clock
	now   time.Time
	tok   map[string]string // name → bearer secret
	sid   map[string]string // name → session id
	csrf  string
}

const serverHost = "nixplane.example:8080"

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "nixplane.db"), store.WithLogger(quietLog))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	now := time.Now().Truncate(time.Second)
	f := &fixture{st: st, clock: &clock{t: now}, now: now, tok: map[string]string{}, sid: map[string]string{}, csrf: "csrf-token-of-the-session"}
	f.authn = &Authenticator{Stores: st, Policy: DefaultPolicy(), AllowedOrigins: []string{"https://ops.example/"},
		SessionIdle: 2 * time.Hour, SessionMax: 24 * time.Hour, Now: f.clock.Now, Log: quietLog}

	// The lowest bcrypt cost keeps the race-detector run quick; HashPassword
	// is checked for the real cost in TestSecrets.
	pw, err := bcrypt.GenerateFromPassword([]byte("correct horse battery"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.CreateUser(ctx, store.User{Name: "admin", PasswordHash: pw, CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	for _, h := range []string{"web-1", "web-2"} {
		f.tok["agent:"+h] = NewSecret(AgentTokenPrefix)
		if err := st.CreateHost(ctx, store.Host{ID: h, Record: &fleetv1.Host{HostId: h, Hostname: h}, CreatedAt: now}, HashSecret(f.tok["agent:"+h])); err != nil {
			t.Fatal(err)
		}
	}
	for name, tk := range map[string]store.APIToken{
		"read":    {Scope: "read"},
		"operate": {Scope: "operate"},
		"admin":   {Scope: "admin", ExpiresAt: now.Add(time.Hour)},
		"expired": {Scope: "admin", ExpiresAt: now.Add(-time.Second)},
	} {
		f.tok[name] = NewSecret(APITokenPrefix)
		tk.Name, tk.Hash, tk.CreatedAt = name, HashSecret(f.tok[name]), now.Add(-48*time.Hour)
		if err := st.CreateAPIToken(ctx, tk); err != nil {
			t.Fatal(err)
		}
	}
	for name, s := range map[string]store.Session{
		"valid":   {CreatedAt: now, LastUsed: now, ExpiresAt: now.Add(24 * time.Hour)},
		"expired": {CreatedAt: now.Add(-25 * time.Hour), LastUsed: now.Add(-time.Minute), ExpiresAt: now.Add(-time.Hour)},
		"idle":    {CreatedAt: now.Add(-4 * time.Hour), LastUsed: now.Add(-3 * time.Hour), ExpiresAt: now.Add(20 * time.Hour)},
	} {
		f.sid[name] = NewSecret("")
		s.IDHash, s.User, s.CSRFToken = HashSecret(f.sid[name]), "admin", f.csrf
		if err := st.CreateSession(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func bearer(tok string) metadata.MD { return metadata.Pairs(MDAuthorization, "Bearer "+tok) }

func (f *fixture) session(name string, kv ...string) metadata.MD {
	md := metadata.Pairs(MDCookie, "theme=dark; "+SessionCookie+"="+f.sid[name], MDHost, serverHost)
	for i := 0; i+1 < len(kv); i += 2 {
		md.Append(kv[i], kv[i+1])
	}
	return md
}

func TestAuthenticate(t *testing.T) {
	f := newFixture(t)
	const (
		listHosts = fleetv1.FleetService_ListHosts_FullMethodName
		run       = fleetv1.FleetService_RunCommand_FullMethodName
		refresh   = fleetv1.FleetService_RefreshHost_FullMethodName
		addHost   = fleetv1.FleetService_AddHost_FullMethodName
		connect   = agentv1.AgentService_Connect_FullMethodName
		health    = "/grpc.health.v1.Health/Check"
		totpBegin = adminv1.AdminService_BeginTOTPEnrollment_FullMethodName
	)
	sameOrigin := "http://" + serverHost
	for _, tc := range []struct {
		name     string
		method   string
		md       metadata.MD
		want     codes.Code
		wantWho  string
		wantKind Kind
	}{
		{"no credential", listHosts, metadata.MD{}, codes.Unauthenticated, "", 0},
		{"no credential on a public method", health, metadata.MD{}, codes.OK, "system", 0},
		{"unknown method", "/nixplane.fleet.v1.FleetService/Nope", bearer(f.tok["admin"]), codes.PermissionDenied, "", 0},
		{"basic auth", listHosts, metadata.Pairs(MDAuthorization, "Basic YWRtaW46YWRtaW4="), codes.Unauthenticated, "", 0},
		{"bearer without token", listHosts, metadata.Pairs(MDAuthorization, "Bearer"), codes.Unauthenticated, "", 0},
		{"token of the wrong shape", listHosts, bearer("npt_short"), codes.Unauthenticated, "", 0},
		{"token without prefix", listHosts, bearer(strings.Repeat("a", 47)), codes.Unauthenticated, "", 0},
		{"unknown API token", listHosts, bearer(NewSecret(APITokenPrefix)), codes.Unauthenticated, "", 0},
		{"unknown agent token", connect, bearer(NewSecret(AgentTokenPrefix)), codes.Unauthenticated, "", 0},
		{"expired API token", listHosts, bearer(f.tok["expired"]), codes.Unauthenticated, "", 0},
		{"lower-case bearer scheme", listHosts, metadata.Pairs(MDAuthorization, "bearer "+f.tok["read"]), codes.OK, "token:read", KindAPIToken},
		{"read token reads", listHosts, bearer(f.tok["read"]), codes.OK, "token:read", KindAPIToken},
		{"read token may refresh", refresh, bearer(f.tok["read"]), codes.OK, "token:read", KindAPIToken},
		{"read token on an operate method", run, bearer(f.tok["read"]), codes.PermissionDenied, "", 0},
		{"operate token operates", run, bearer(f.tok["operate"]), codes.OK, "token:operate", KindAPIToken},
		{"operate token on an admin method", addHost, bearer(f.tok["operate"]), codes.PermissionDenied, "", 0},
		{"admin token administers", addHost, bearer(f.tok["admin"]), codes.OK, "token:admin", KindAPIToken},
		{"agent token on the agent stream", connect, bearer(f.tok["agent:web-1"]), codes.OK, "agent:web-1", KindAgent},
		{"agent token on a fleet method", listHosts, bearer(f.tok["agent:web-1"]), codes.PermissionDenied, "", 0},
		{"agent token on an operate method", run, bearer(f.tok["agent:web-2"]), codes.PermissionDenied, "", 0},
		{"API token on the agent stream", connect, bearer(f.tok["admin"]), codes.PermissionDenied, "", 0},
		{"session on the agent stream", connect, f.session("valid"), codes.PermissionDenied, "", 0},
		{"session reads without CSRF", listHosts, f.session("valid"), codes.OK, "user:admin", KindUser},
		{"session mutates without CSRF", run, f.session("valid", MDOrigin, sameOrigin), codes.PermissionDenied, "", 0},
		{"session with a wrong CSRF token", run, f.session("valid", MDOrigin, sameOrigin, MDCSRF, "nope"), codes.PermissionDenied, "", 0},
		{"session with CSRF and same Origin", run, f.session("valid", MDOrigin, sameOrigin, MDCSRF, f.csrf), codes.OK, "user:admin", KindUser},
		{"session with CSRF and an allowed Origin", addHost, f.session("valid", MDOrigin, "https://ops.example", MDCSRF, f.csrf), codes.OK, "user:admin", KindUser},
		{"session with CSRF and no Origin", run, f.session("valid", MDCSRF, f.csrf), codes.PermissionDenied, "", 0},
		{"session with CSRF and a foreign Origin", run, f.session("valid", MDOrigin, "https://evil.example", MDCSRF, f.csrf), codes.PermissionDenied, "", 0},
		{"session with CSRF and a look-alike Origin", run, f.session("valid", MDOrigin, "http://"+serverHost+".evil.example", MDCSRF, f.csrf), codes.PermissionDenied, "", 0},
		{"session with CSRF and a null Origin", run, f.session("valid", MDOrigin, "null", MDCSRF, f.csrf), codes.PermissionDenied, "", 0},
		{"refresh is mutating for sessions", refresh, f.session("valid", MDOrigin, sameOrigin), codes.PermissionDenied, "", 0},
		{"expired session", listHosts, f.session("expired"), codes.Unauthenticated, "", 0},
		{"idle session", listHosts, f.session("idle"), codes.Unauthenticated, "", 0},
		{"unknown session", listHosts, metadata.Pairs(MDCookie, SessionCookie+"="+NewSecret("")), codes.Unauthenticated, "", 0},
		{"oversized session cookie", listHosts, metadata.Pairs(MDCookie, SessionCookie+"="+strings.Repeat("a", 200)), codes.Unauthenticated, "", 0},
		{"admin token on a session-only method", totpBegin, bearer(f.tok["admin"]), codes.PermissionDenied, "", 0},
		{"session on a session-only method", totpBegin, f.session("valid", MDOrigin, sameOrigin, MDCSRF, f.csrf), codes.OK, "user:admin", KindUser},
		{"session-only methods need CSRF", totpBegin, f.session("valid", MDOrigin, sameOrigin), codes.PermissionDenied, "", 0},
		{"bearer wins over a cookie", run, metadata.Join(bearer(f.tok["read"]), f.session("valid")), codes.PermissionDenied, "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id, err := f.authn.Authenticate(context.Background(), tc.method, tc.md)
			if got := status.Code(err); got != tc.want {
				t.Fatalf("code = %v (%v), want %v", got, err, tc.want)
			}
			if err != nil {
				if _, ok := status.FromError(err); !ok {
					t.Fatalf("error %v is not a gRPC status", err)
				}
				return
			}
			if id.Actor() != tc.wantWho || (id != nil && id.Kind != tc.wantKind) {
				t.Fatalf("identity = %+v (%s), want %s", id, id.Actor(), tc.wantWho)
			}
		})
	}

	// Expired and idle sessions are deleted when seen.
	for _, name := range []string{"expired", "idle"} {
		if _, err := f.st.GetSession(context.Background(), HashSecret(f.sid[name])); err == nil {
			t.Errorf("%s session still stored after it was refused", name)
		}
	}
}

func TestSessionExpiresWithTheClock(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	if _, err := f.authn.IdentifySession(ctx, f.sid["valid"]); err != nil {
		t.Fatal(err)
	}
	f.clock.mu.Lock()
	f.clock.t = f.now.Add(2*time.Hour + time.Second)
	f.clock.mu.Unlock()
	if _, err := f.authn.IdentifySession(ctx, f.sid["valid"]); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("after the idle limit: %v", err)
	}
}

func TestSessionUseKeepsItAlive(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	for i := range 5 {
		f.clock.mu.Lock()
		f.clock.t = f.now.Add(time.Duration(i+1) * 90 * time.Minute)
		f.clock.mu.Unlock()
		if _, err := f.authn.IdentifySession(ctx, f.sid["valid"]); err != nil {
			t.Fatalf("use %d, %v after login: %v", i, time.Duration(i+1)*90*time.Minute, err)
		}
	}
}

func TestInterceptorsCarryIdentity(t *testing.T) {
	f := newFixture(t)
	ctx := metadata.NewIncomingContext(context.Background(), bearer(f.tok["operate"]))
	var got *Identity
	_, err := f.authn.UnaryInterceptor()(ctx, nil, &grpc.UnaryServerInfo{FullMethod: fleetv1.FleetService_RunCommand_FullMethodName},
		func(ctx context.Context, _ any) (any, error) { got = FromContext(ctx); return nil, nil })
	if err != nil || got.Actor() != "token:operate" || got.Scope != ScopeOperate {
		t.Fatalf("unary: %v, %+v", err, got)
	}
	called := false
	_, err = f.authn.UnaryInterceptor()(ctx, nil, &grpc.UnaryServerInfo{FullMethod: fleetv1.FleetService_AddHost_FullMethodName},
		func(context.Context, any) (any, error) { called = true; return nil, nil })
	if status.Code(err) != codes.PermissionDenied || called {
		t.Fatalf("unary refused call: %v, handler called %v", err, called)
	}
	ss := &fakeStream{ctx: metadata.NewIncomingContext(context.Background(), bearer(f.tok["agent:web-2"]))}
	err = f.authn.StreamInterceptor()(nil, ss, &grpc.StreamServerInfo{FullMethod: agentv1.AgentService_Connect_FullMethodName},
		func(_ any, s grpc.ServerStream) error { got = FromContext(s.Context()); return nil })
	if err != nil || got.Actor() != "agent:web-2" {
		t.Fatalf("stream: %v, %+v", err, got)
	}
	ss = &fakeStream{ctx: context.Background()}
	err = f.authn.StreamInterceptor()(nil, ss, &grpc.StreamServerInfo{FullMethod: fleetv1.FleetService_WatchFleet_FullMethodName},
		func(any, grpc.ServerStream) error { t.Fatal("handler called without a credential"); return nil })
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("stream without credential: %v", err)
	}
}

type fakeStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *fakeStream) Context() context.Context { return s.ctx }

func TestSecrets(t *testing.T) {
	a, b := NewSecret(AgentTokenPrefix), NewSecret(AgentTokenPrefix)
	if a == b || !looksLikeSecret(a, AgentTokenPrefix) || looksLikeSecret(a, APITokenPrefix) {
		t.Fatalf("secrets %q %q", a, b)
	}
	if looksLikeSecret(a[:len(a)-1]+"!", AgentTokenPrefix) {
		t.Fatal("a secret with a non-base64url character was accepted")
	}
	if string(HashSecret(a)) == string(HashSecret(b)) || len(HashSecret(a)) != 32 {
		t.Fatal("hashes collide or are not sha256")
	}
	for _, s := range []Scope{ScopeRead, ScopeOperate, ScopeAdmin} {
		if ParseScope(s.String()) != s {
			t.Errorf("scope %v does not round-trip", s)
		}
	}
	if ParseScope("root") != ScopeNone {
		t.Error("unknown scope parsed as something")
	}
	if _, err := HashPassword("short"); err == nil {
		t.Error("short password accepted")
	}
	h, err := HashPassword("correct horse battery")
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := bcrypt.Cost(h); c < bcrypt.DefaultCost || bcrypt.CompareHashAndPassword(h, []byte("correct horse battery")) != nil {
		t.Errorf("password hash cost %d", c)
	}
}

func TestEnsureAdmin(t *testing.T) {
	f := newFixture(t) // has an admin already
	if pw, created, err := EnsureAdmin(context.Background(), f.st, ""); err != nil || created || pw != "" {
		t.Fatalf("second EnsureAdmin = %q %v %v", pw, created, err)
	}
	st, err := store.Open(context.Background(), filepath.Join(t.TempDir(), "fresh.db"), store.WithLogger(quietLog))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	pw, created, err := EnsureAdmin(context.Background(), st, "")
	if err != nil || !created || len(pw) < 16 {
		t.Fatalf("first EnsureAdmin = %q %v %v", pw, created, err)
	}
}

// Login and logout over HTTP.

func (f *fixture) sessions() *Sessions {
	return &Sessions{Auth: f.authn, Audit: f.st, Log: quietLog,
		Render: func(w io.Writer, msg, user, next string) error {
			_, err := fmt.Fprintf(w, "error=%s user=%s next=%s", msg, user, next)
			return err
		}}
}

func loginRequest(user, pw, next, remote string, hdr ...string) *http.Request {
	return formRequest(url.Values{"username": {user}, "password": {pw}, "next": {next}}, remote, hdr...)
}

func formRequest(form url.Values, remote string, hdr ...string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "http://"+serverHost+"/login", strings.NewReader(form.Encode()))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	r.RemoteAddr = remote
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Set(hdr[i], hdr[i+1])
	}
	return r
}

func serve(h http.Handler, r *http.Request) *http.Response {
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w.Result()
}

func sessionCookie(resp *http.Response) *http.Cookie {
	for _, c := range resp.Cookies() {
		if c.Name == SessionCookie {
			return c
		}
	}
	return nil
}

func TestLogin(t *testing.T) {
	f := newFixture(t)
	s := f.sessions()
	ctx := context.Background()

	resp := serve(s, httptest.NewRequest(http.MethodGet, "/login?next=//evil.example", nil))
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "next=/") || strings.Contains(string(body), "evil") {
		t.Fatalf("login page: %d %q", resp.StatusCode, body)
	}

	for _, tc := range []struct{ user, pw string }{{"admin", "wrong password"}, {"nobody", "correct horse battery"}, {"admin", ""}} {
		resp := serve(s, loginRequest(tc.user, tc.pw, "/", "192.0.2.1:1000"))
		if resp.StatusCode != http.StatusUnauthorized || sessionCookie(resp) != nil {
			t.Fatalf("login %s/%q: %d, cookie %v", tc.user, tc.pw, resp.StatusCode, sessionCookie(resp))
		}
	}

	resp = serve(s, loginRequest("admin", "correct horse battery", "/hosts?sort=name", "192.0.2.2:1000", "Origin", "http://"+serverHost))
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/hosts?sort=name" {
		t.Fatalf("good login: %d to %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	c := sessionCookie(resp)
	if c == nil || !c.HttpOnly || c.SameSite != http.SameSiteLaxMode || c.Path != "/" || c.Secure || c.Value == "" {
		t.Fatalf("session cookie = %+v", c)
	}
	id, err := f.authn.IdentifySession(ctx, c.Value)
	if err != nil || id.Name != "admin" || id.CSRFToken == "" {
		t.Fatalf("new session: %+v %v", id, err)
	}
	if _, err := f.st.GetSession(ctx, []byte(c.Value)); err == nil {
		t.Fatal("the session id is stored in the clear")
	}

	// Behind TLS the cookie is Secure.
	resp = serve(s, loginRequest("admin", "correct horse battery", "/", "192.0.2.3:1000", MDSecure, "1"))
	if c := sessionCookie(resp); c == nil || !c.Secure {
		t.Fatalf("cookie under TLS = %+v", c)
	}

	// A login posted from another site is refused.
	resp = serve(s, loginRequest("admin", "correct horse battery", "/", "192.0.2.4:1000", "Origin", "https://evil.example"))
	if resp.StatusCode != http.StatusForbidden || sessionCookie(resp) != nil {
		t.Fatalf("foreign-origin login: %d", resp.StatusCode)
	}

	audit, err := f.st.ListAudit(ctx, "", 100, 0)
	if err != nil || len(audit) < 5 {
		t.Fatalf("audit has %d records (%v), want every attempt", len(audit), err)
	}

	resp = serve(s, httptest.NewRequest(http.MethodPut, "/login", nil))
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("PUT /login: %d", resp.StatusCode)
	}
}

func TestLoginRedirectStaysOnSite(t *testing.T) {
	f := newFixture(t)
	for _, next := range []string{"//evil.example", "https://evil.example/", "/\\evil.example", "\\\\evil.example", "javascript:alert(1)",
		"/\t/evil.example", "/\n/evil.example", "/\r\n/evil.example", " //evil.example", "evil.example", ""} {
		s := f.sessions()
		resp := serve(s, loginRequest("admin", "correct horse battery", next, "192.0.2.9:1000"))
		if resp.StatusCode != http.StatusSeeOther {
			t.Fatalf("next=%q: status %d", next, resp.StatusCode)
		}
		if loc := resp.Header.Get("Location"); loc != "/" {
			t.Errorf("next=%q redirects to %q, want /", next, loc)
		}
	}
}

func TestLoginRateLimit(t *testing.T) {
	f := newFixture(t)
	s := f.sessions()
	for i := range 5 {
		if resp := serve(s, loginRequest("admin", "wrong", "/", "192.0.2.1:1000")); resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("attempt %d: %d", i+1, resp.StatusCode)
		}
	}
	resp := serve(s, loginRequest("admin", "correct horse battery", "/", "192.0.2.1:1000"))
	if resp.StatusCode != http.StatusTooManyRequests || sessionCookie(resp) != nil {
		t.Fatalf("sixth attempt: %d, cookie %v", resp.StatusCode, sessionCookie(resp))
	}
	ra, err := strconv.Atoi(resp.Header.Get("Retry-After"))
	if err != nil || ra < 1 || ra > 12 {
		t.Fatalf("Retry-After = %q", resp.Header.Get("Retry-After"))
	}
	// The same account from elsewhere is limited too.
	if resp := serve(s, loginRequest("Admin", "correct horse battery", "/", "198.51.100.7:1000")); resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("same account from another client: %d", resp.StatusCode)
	}
	// Another account from another client is not.
	if resp := serve(s, loginRequest("carol", "whatever1", "/", "198.51.100.8:1000")); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("unrelated login: %d", resp.StatusCode)
	}
}

func TestLoginTOTP(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	key, err := totp.Generate(totp.GenerateOpts{Issuer: "nixplane", AccountName: "admin"})
	if err != nil {
		t.Fatal(err)
	}
	u, err := f.st.GetUser(ctx, "admin")
	if err != nil {
		t.Fatal(err)
	}
	u.TOTPSecret = key.Secret()
	if err := f.st.UpdateUser(ctx, u); err != nil {
		t.Fatal(err)
	}
	if resp := serve(f.sessions(), loginRequest("admin", "correct horse battery", "/", "192.0.2.1:1000")); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("without a code: %d", resp.StatusCode)
	}
	code, err := totp.GenerateCode(key.Secret(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	form := url.Values{"username": {"admin"}, "password": {"correct horse battery"}, "totp": {code}}
	resp := serve(f.sessions(), formRequest(form, "192.0.2.2:1000"))
	if resp.StatusCode != http.StatusSeeOther || sessionCookie(resp) == nil {
		t.Fatalf("with a code: %d", resp.StatusCode)
	}
	id, err := f.authn.IdentifySession(ctx, sessionCookie(resp).Value)
	if err != nil || !id.TOTPEnabled {
		t.Fatalf("identity %+v %v", id, err)
	}
}

func TestLogout(t *testing.T) {
	f := newFixture(t)
	s := f.sessions()
	ctx := context.Background()
	resp := serve(s, loginRequest("admin", "correct horse battery", "/", "192.0.2.1:1000"))
	c := sessionCookie(resp)
	id, err := f.authn.IdentifySession(ctx, c.Value)
	if err != nil {
		t.Fatal(err)
	}
	logout := func(csrf, origin string) *http.Response {
		r := httptest.NewRequest(http.MethodPost, "http://"+serverHost+"/logout", strings.NewReader(url.Values{"csrf_token": {csrf}}.Encode()))
		r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		r.Header.Set("Origin", origin)
		r.AddCookie(c)
		return serve(s, r)
	}
	if resp := logout("", "http://"+serverHost); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("logout without CSRF: %d", resp.StatusCode)
	}
	if resp := logout(id.CSRFToken+"x", "http://"+serverHost); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("logout with a wrong CSRF token: %d", resp.StatusCode)
	}
	if resp := logout(id.CSRFToken, "https://evil.example"); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("logout from a foreign origin: %d", resp.StatusCode)
	}
	if _, err := f.authn.IdentifySession(ctx, c.Value); err != nil {
		t.Fatalf("a refused logout ended the session: %v", err)
	}
	resp = logout(id.CSRFToken, "http://"+serverHost)
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/login" {
		t.Fatalf("logout: %d to %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	if cleared := sessionCookie(resp); cleared == nil || cleared.MaxAge >= 0 || cleared.Value != "" {
		t.Fatalf("logout cookie = %+v, want it cleared", cleared)
	}
	// Server-side: the old cookie is worthless now.
	if _, err := f.authn.IdentifySession(ctx, c.Value); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("session after logout: %v", err)
	}
	md := metadata.Pairs(MDCookie, SessionCookie+"="+c.Value)
	if _, err := f.authn.Authenticate(ctx, fleetv1.FleetService_ListHosts_FullMethodName, md); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("API call with the old cookie: %v", err)
	}
}

func TestOriginAllowed(t *testing.T) {
	a := &Authenticator{AllowedOrigins: []string{"https://ops.example"}}
	for _, tc := range []struct {
		origin, host string
		want         bool
	}{
		{"http://nixplane.example:8080", "nixplane.example:8080", true},
		{"https://NIXPLANE.example:8080", "nixplane.example:8080", true},
		{"https://ops.example", "nixplane.example:8080", true},
		{"http://nixplane.example", "nixplane.example:8080", false},
		{"ftp://nixplane.example:8080", "nixplane.example:8080", false},
		{"http://nixplane.example:8080", "", false},
		{"", "nixplane.example:8080", false},
		{"null", "nixplane.example:8080", false},
	} {
		if got := a.OriginAllowed(tc.origin, tc.host); got != tc.want {
			t.Errorf("OriginAllowed(%q, %q) = %v, want %v", tc.origin, tc.host, got, tc.want)
		}
	}
}
