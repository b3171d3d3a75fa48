package auth

import (
	"context"
	"crypto/subtle"
	"crypto/x509"
	"errors"
	"log/slog"
	"net/url"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/nixplane/nixplane/controlplane/store"
)

// Metadata keys the authenticator reads. The one-port dispatcher removes the
// x-nixplane-* keys from every outside request and sets them itself, so they
// can be trusted whichever path a call took.
const (
	MDAuthorization = "authorization"
	MDCookie        = "cookie"
	MDOrigin        = "origin"
	MDCSRF          = "x-csrf-token"
	// MDHost is the Host the outside request was addressed to.
	MDHost = "x-nixplane-host"
	// MDTransport is "grpc", "grpc-web" or "rest".
	MDTransport = "x-nixplane-transport"
	// MDSecure is "1" when the outside request came over TLS (or a trusted
	// proxy said so).
	MDSecure = "x-nixplane-secure"
)

// SessionCookie is the browser session cookie's name.
const SessionCookie = "nixplane_session"

// Rule is what a method requires of its caller.
type Rule struct {
	// Public methods need no credential (health, reflection).
	Public bool
	// Agent methods accept only agent tokens.
	Agent bool
	// Scope is the least scope a user or API token needs.
	Scope Scope
	// Mutating methods need, when called with a session cookie, the session's
	// CSRF token and a same-origin Origin header.
	Mutating bool
	// SessionOnly methods act on the calling person's own account (TOTP
	// enrolment): API tokens are refused even with the admin scope.
	SessionOnly bool
}

// Policy maps full gRPC method names ("/pkg.Service/Method") to rules.
// Methods not in the policy are refused: a new RPC must be given a rule.
type Policy map[string]Rule

// Stores is what the authenticator reads.
type Stores interface {
	store.Hosts
	store.Users
	store.Sessions
	store.APITokens
}

// Authenticator identifies callers from request metadata.
type Authenticator struct {
	Stores Stores
	Policy Policy
	// AllowedOrigins are extra origins (scheme://host[:port]) accepted for
	// cookie-authenticated mutating calls besides the request's own host.
	AllowedOrigins []string
	// SessionIdle and SessionMax bound a session's life.
	SessionIdle, SessionMax time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	Log *slog.Logger
	// Codes checks one-time codes at login; share it with every other
	// place that checks codes so a code is accepted only once. Nil: codes
	// are checked without replay protection.
	Codes *OneTimeCodes
	// AgentClientCAs, when set, makes a client certificate the second factor
	// of an agent connection: AgentService calls must come over TLS with a
	// certificate issued by one of these CAs that names the token's host
	// (see [CertificateHostNames]). Other methods ignore client certificates.
	AgentClientCAs *x509.CertPool
}

func (a *Authenticator) now() time.Time {
	if a.Now != nil {
		return a.Now()
	}
	return time.Now()
}

// Errors returned by Authenticate, already carrying their gRPC status.
var (
	errNoCredential  = status.Error(codes.Unauthenticated, "authentication required: send 'Authorization: Bearer <token>' or log in")
	errBadCredential = status.Error(codes.Unauthenticated, "invalid or expired credential")
	errNoRule        = status.Error(codes.PermissionDenied, "method not permitted")
)

// Authenticate identifies the caller of method from md and checks the
// method's rule. It returns the identity (nil for public methods called
// without credentials) or a gRPC status error: Unauthenticated when the
// credential is missing, malformed, unknown or expired; PermissionDenied when
// the caller may not call the method, or a session's mutating call lacks its
// CSRF token or comes from a foreign origin. With AgentClientCAs set, an
// agent's call without a client certificate is Unauthenticated too, and one
// whose certificate names another host PermissionDenied.
func (a *Authenticator) Authenticate(ctx context.Context, method string, md metadata.MD) (*Identity, error) {
	rule, ok := a.Policy[method]
	if !ok {
		return nil, errNoRule
	}
	if rule.Public {
		return nil, nil
	}
	id, err := a.identify(ctx, md)
	if err != nil {
		return nil, err
	}
	if rule.Agent {
		if id.Kind != KindAgent {
			return nil, status.Error(codes.PermissionDenied, "only agents may call this method")
		}
		if a.AgentClientCAs != nil {
			if err := a.checkAgentCert(ctx, id.Name); err != nil {
				return nil, err
			}
		}
		return id, nil
	}
	if id.Kind == KindAgent {
		return nil, status.Error(codes.PermissionDenied, "agent tokens may only open the agent stream")
	}
	if rule.SessionOnly && id.SessionIDHash == nil {
		return nil, status.Error(codes.PermissionDenied, "only a browser session may call this method")
	}
	if id.Scope < rule.Scope {
		return nil, status.Errorf(codes.PermissionDenied, "this call needs the %s scope; the caller has %s", rule.Scope, id.Scope)
	}
	if rule.Mutating && id.SessionIDHash != nil {
		if err := a.checkBrowserWrite(md, id); err != nil {
			return nil, err
		}
	}
	return id, nil
}

func first(md metadata.MD, key string) string {
	if v := md.Get(key); len(v) > 0 {
		return v[0]
	}
	return ""
}

func (a *Authenticator) identify(ctx context.Context, md metadata.MD) (*Identity, error) {
	if authz := first(md, MDAuthorization); authz != "" {
		scheme, tok, ok := strings.Cut(authz, " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") {
			return nil, errBadCredential
		}
		return a.identifyToken(ctx, strings.TrimSpace(tok))
	}
	if sid := SessionIDFromCookies(md.Get(MDCookie)); sid != "" {
		return a.IdentifySession(ctx, sid)
	}
	return nil, errNoCredential
}

func (a *Authenticator) identifyToken(ctx context.Context, tok string) (*Identity, error) {
	switch {
	case looksLikeSecret(tok, AgentTokenPrefix):
		hostID, err := a.Stores.HostIDByTokenHash(ctx, HashSecret(tok))
		if err != nil {
			return nil, a.lookupErr(err)
		}
		return &Identity{Kind: KindAgent, Name: hostID}, nil
	case looksLikeSecret(tok, APITokenPrefix):
		t, err := a.Stores.APITokenByHash(ctx, HashSecret(tok))
		if err != nil {
			return nil, a.lookupErr(err)
		}
		now := a.now()
		if !t.ExpiresAt.IsZero() && !now.Before(t.ExpiresAt) {
			return nil, errBadCredential
		}
		if now.Sub(t.LastUsedAt) > time.Minute {
			if err := a.Stores.TouchAPIToken(ctx, t.Name, now); err != nil {
				a.logger().Warn("record token use", "token", t.Name, "err", err)
			}
		}
		return &Identity{Kind: KindAPIToken, Name: t.Name, Scope: ParseScope(t.Scope)}, nil
	}
	return nil, errBadCredential
}

func (a *Authenticator) lookupErr(err error) error {
	if errors.Is(err, store.ErrNotFound) {
		return errBadCredential
	}
	a.logger().Error("credential lookup failed", "err", err)
	return status.Error(codes.Unavailable, "credential check failed; try again")
}

func (a *Authenticator) logger() *slog.Logger {
	if a.Log != nil {
		return a.Log
	}
	return slog.Default()
}

// IdentifySession returns the identity of a session id, or
// Unauthenticated when it is unknown or expired (absolute or idle).
func (a *Authenticator) IdentifySession(ctx context.Context, sessionID string) (*Identity, error) {
	h := HashSecret(sessionID)
	s, err := a.Stores.GetSession(ctx, h)
	if err != nil {
		return nil, a.lookupErr(err)
	}
	now := a.now()
	if !now.Before(s.ExpiresAt) || (a.SessionIdle > 0 && now.Sub(s.LastUsed) > a.SessionIdle) {
		_ = a.Stores.DeleteSession(ctx, h)
		return nil, errBadCredential
	}
	u, err := a.Stores.GetUser(ctx, s.User)
	if err != nil {
		return nil, a.lookupErr(err)
	}
	if now.Sub(s.LastUsed) > time.Minute {
		if err := a.Stores.TouchSession(ctx, h, now); err != nil {
			a.logger().Warn("record session use", "err", err)
		}
	}
	return &Identity{Kind: KindUser, Name: s.User, Scope: ScopeAdmin, SessionIDHash: h,
		CSRFToken: s.CSRFToken, TOTPEnabled: u.TOTPSecret != ""}, nil
}

// checkBrowserWrite enforces CSRF token and Origin for a session's mutating
// call.
func (a *Authenticator) checkBrowserWrite(md metadata.MD, id *Identity) error {
	if !csrfMatches(first(md, MDCSRF), id.CSRFToken) {
		return status.Error(codes.PermissionDenied, "missing or wrong CSRF token")
	}
	if !a.OriginAllowed(first(md, MDOrigin), first(md, MDHost)) {
		return status.Error(codes.PermissionDenied, "request from a foreign origin")
	}
	return nil
}

// csrfMatches compares a presented CSRF token with the session's in constant
// time; an empty token never matches.
func csrfMatches(got, want string) bool {
	return got != "" && want != "" && subtle.ConstantTimeCompare([]byte(got), []byte(want)) == 1
}

// OriginAllowed reports whether a browser's Origin header is the server's own
// (same host as the request) or one of AllowedOrigins. A missing Origin is
// refused: browsers send it on every cross-site and every fetch POST.
func (a *Authenticator) OriginAllowed(origin, host string) bool {
	if origin == "" {
		return false
	}
	for _, o := range a.AllowedOrigins {
		if strings.EqualFold(strings.TrimRight(o, "/"), origin) {
			return true
		}
	}
	u, err := url.Parse(origin)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") {
		return false
	}
	return host != "" && strings.EqualFold(u.Host, host)
}

// SessionIDFromCookies extracts the session cookie's value from Cookie
// header values.
func SessionIDFromCookies(headers []string) string {
	for _, h := range headers {
		for _, part := range strings.Split(h, ";") {
			name, val, ok := strings.Cut(strings.TrimSpace(part), "=")
			if ok && name == SessionCookie && len(val) <= 128 {
				return val
			}
		}
	}
	return ""
}

// UnaryInterceptor authenticates and authorizes unary calls.
func (a *Authenticator) UnaryInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		id, err := a.Authenticate(ctx, info.FullMethod, md)
		if err != nil {
			return nil, err
		}
		return handler(WithIdentity(ctx, id), req)
	}
}

// StreamInterceptor authenticates and authorizes streaming calls.
func (a *Authenticator) StreamInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		ctx := ss.Context()
		md, _ := metadata.FromIncomingContext(ctx)
		id, err := a.Authenticate(ctx, info.FullMethod, md)
		if err != nil {
			return err
		}
		return handler(srv, &identityStream{ServerStream: ss, ctx: WithIdentity(ctx, id)})
	}
}

type identityStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *identityStream) Context() context.Context { return s.ctx }
