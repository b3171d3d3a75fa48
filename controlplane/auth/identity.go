// Package auth identifies every caller of the control plane — agent (per-host
// token), browser session (cookie, plus CSRF token and Origin for mutating
// calls), API token (with a scope) — and decides what it may call. It is the
// one place authentication and authorization happen: the gRPC interceptors
// here run for native gRPC, grpc-web and REST alike, because the REST gateway
// reaches the gRPC server through a client connection.
package auth

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"strings"
)

// Kind is what sort of caller an [Identity] is.
type Kind int

// Caller kinds.
const (
	// KindAgent is a nixplane-agent speaking for one host.
	KindAgent Kind = iota + 1
	// KindUser is a person with a browser session.
	KindUser
	// KindAPIToken is automation with a named API token.
	KindAPIToken
)

// Scope is what a user or API token may do. Scopes nest.
type Scope int

// Scopes, in increasing power.
const (
	ScopeNone Scope = iota
	ScopeRead
	ScopeOperate
	ScopeAdmin
)

// String returns the scope's name as stored and shown.
func (s Scope) String() string {
	switch s {
	case ScopeRead:
		return "read"
	case ScopeOperate:
		return "operate"
	case ScopeAdmin:
		return "admin"
	}
	return "none"
}

// ParseScope maps a stored scope name back; unknown names are ScopeNone.
func ParseScope(s string) Scope {
	switch s {
	case "read":
		return ScopeRead
	case "operate":
		return ScopeOperate
	case "admin":
		return ScopeAdmin
	}
	return ScopeNone
}

// Identity is an authenticated caller.
type Identity struct {
	Kind Kind
	// Name is the user name, the API token's name, or the agent's host id.
	Name  string
	Scope Scope
	// SessionIDHash is set for browser sessions.
	SessionIDHash []byte
	// CSRFToken is the session's CSRF token (browser sessions only).
	CSRFToken string
	// TOTPEnabled is set for users with TOTP set up.
	TOTPEnabled bool
}

// Actor names the identity in audit records and command runs:
// "user:admin", "token:ci", "agent:web-1".
func (id *Identity) Actor() string {
	if id == nil {
		return "system"
	}
	switch id.Kind {
	case KindAgent:
		return "agent:" + id.Name
	case KindUser:
		return "user:" + id.Name
	case KindAPIToken:
		return "token:" + id.Name
	}
	return "unknown"
}

type identityKey struct{}

// WithIdentity returns ctx carrying id.
func WithIdentity(ctx context.Context, id *Identity) context.Context {
	return context.WithValue(ctx, identityKey{}, id)
}

// FromContext returns the caller's identity, or nil for unauthenticated
// (health, reflection) calls.
func FromContext(ctx context.Context) *Identity {
	id, _ := ctx.Value(identityKey{}).(*Identity)
	return id
}

// Secret prefixes tell token kinds apart at a glance and let the
// authenticator route a bearer token to the right table without a lookup in
// each.
const (
	AgentTokenPrefix = "npa_"
	APITokenPrefix   = "npt_"
)

// NewSecret returns a 256-bit random secret, base64url, with prefix.
func NewSecret(prefix string) string {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("auth: no randomness: " + err.Error()) // crypto/rand never fails on supported platforms
	}
	return prefix + base64.RawURLEncoding.EncodeToString(b[:])
}

// HashSecret is how token and session secrets are stored: sha256. The secrets
// are 256-bit random, so a fast hash is enough; passwords use bcrypt.
func HashSecret(secret string) []byte {
	sum := sha256.Sum256([]byte(secret))
	return sum[:]
}

// looksLikeSecret reports whether s is a well-formed secret with prefix: the
// prefix and 43 base64url characters.
func looksLikeSecret(s, prefix string) bool {
	if !strings.HasPrefix(s, prefix) || len(s) != len(prefix)+43 {
		return false
	}
	for _, c := range s[len(prefix):] {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}
