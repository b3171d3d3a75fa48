package fleetapi

import (
	"bytes"
	"context"
	"errors"
	"image/png"
	"sync"
	"time"

	"github.com/pquerna/otp"
	"github.com/pquerna/otp/totp"
	"golang.org/x/crypto/bcrypt"
	"golang.org/x/time/rate"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/store"
	"github.com/nixplane/nixplane/controlplane/validate"
	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
)

// AdminStore is what the admin API reads and writes.
type AdminStore interface {
	store.APITokens
	store.Audit
	store.Users
	TOTPEnrolment
}

// TOTPEnrolment keeps a TOTP secret apart while it is being enrolled, so a
// secret the user's authenticator has not proven to hold never guards (or
// locks) the account. [store.SQLite] implements it.
type TOTPEnrolment interface {
	// SetPendingTOTP stores the secret being enrolled.
	SetPendingTOTP(ctx context.Context, user, secret string) error
	// PendingTOTP returns it; empty when no enrolment is under way.
	PendingTOTP(ctx context.Context, user string) (string, error)
	// ConfirmTOTP enables the pending secret if it is still secret;
	// store.ErrNotFound otherwise.
	ConfirmTOTP(ctx context.Context, user, secret string) error
	// DisableTOTP clears the enabled secret if it is still secret;
	// store.ErrNotFound otherwise.
	DisableTOTP(ctx context.Context, user, secret string) error
}

// TOTPIssuer names the server in authenticator apps.
const TOTPIssuer = "nixplane"

// Admin implements adminv1.AdminServiceServer.
type Admin struct {
	adminv1.UnimplementedAdminServiceServer
	Store AdminStore
	// Codes checks one-time codes, each accepted once per user; shared with
	// the login and destructive commands. Nil: no replay protection.
	Codes *auth.OneTimeCodes

	codes     codeLimiter
	passwords codeLimiter
}

// codeLimiter bounds guesses per user: 5 at once, then one every 12
// seconds, so a stolen session cannot try its way through the million
// one-time codes (or through likely passwords). The one-time code and the
// password guesses of a user are counted apart.
type codeLimiter struct {
	mu sync.Mutex
	m  map[string]*rate.Limiter
}

// allow takes one attempt for user; false when none is left.
func (l *codeLimiter) allow(user string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m == nil || len(l.m) > 10_000 {
		l.m = map[string]*rate.Limiter{}
	}
	lim := l.m[user]
	if lim == nil {
		lim = rate.NewLimiter(rate.Every(12*time.Second), 5)
		l.m[user] = lim
	}
	return lim.Allow()
}

// WhoAmI implements AdminService.
func (a *Admin) WhoAmI(ctx context.Context, _ *adminv1.WhoAmIRequest) (*adminv1.WhoAmIResponse, error) {
	id := auth.FromContext(ctx)
	return &adminv1.WhoAmIResponse{Actor: id.Actor(), Scope: adminv1.Scope(id.Scope), Session: id.SessionIDHash != nil, TotpEnabled: id.TOTPEnabled}, nil
}

// CreateAPIToken implements AdminService.
func (a *Admin) CreateAPIToken(ctx context.Context, req *adminv1.CreateAPITokenRequest) (*adminv1.CreateAPITokenResponse, error) {
	t, secret, err := NewAPIToken(req.Name, req.Scope, req.Ttl.AsDuration())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := a.Store.CreateAPIToken(ctx, t); err != nil {
		if errors.Is(err, store.ErrExists) {
			return nil, status.Errorf(codes.AlreadyExists, "a token named %q exists already", t.Name)
		}
		return nil, status.Error(codes.Internal, "store token")
	}
	return &adminv1.CreateAPITokenResponse{Token: tokenProto(t), Secret: secret}, nil
}

// NewAPIToken validates a token request and returns the record to store and
// its secret. The CLI's offline `tokens create` uses it too.
func NewAPIToken(name string, scope adminv1.Scope, ttl time.Duration) (store.APIToken, string, error) {
	if err := validate.APITokenName(name); err != nil {
		return store.APIToken{}, "", err
	}
	if scope == adminv1.Scope_SCOPE_UNSPECIFIED {
		scope = adminv1.Scope_SCOPE_READ
	}
	if scope < adminv1.Scope_SCOPE_READ || scope > adminv1.Scope_SCOPE_ADMIN {
		return store.APIToken{}, "", errors.New("unknown scope")
	}
	if ttl < 0 {
		return store.APIToken{}, "", errors.New("ttl must not be negative")
	}
	secret := auth.NewSecret(auth.APITokenPrefix)
	now := time.Now()
	t := store.APIToken{Name: name, Hash: auth.HashSecret(secret), Scope: auth.Scope(scope).String(), CreatedAt: now}
	if ttl > 0 {
		t.ExpiresAt = now.Add(ttl)
	}
	return t, secret, nil
}

func tokenProto(t store.APIToken) *adminv1.APIToken {
	p := &adminv1.APIToken{Name: t.Name, Scope: adminv1.Scope(auth.ParseScope(t.Scope)), CreatedAt: timestamppb.New(t.CreatedAt)}
	if !t.ExpiresAt.IsZero() {
		p.ExpiresAt = timestamppb.New(t.ExpiresAt)
	}
	if !t.LastUsedAt.IsZero() {
		p.LastUsedAt = timestamppb.New(t.LastUsedAt)
	}
	return p
}

// ListAPITokens implements AdminService.
func (a *Admin) ListAPITokens(ctx context.Context, _ *adminv1.ListAPITokensRequest) (*adminv1.ListAPITokensResponse, error) {
	ts, err := a.Store.ListAPITokens(ctx)
	if err != nil {
		return nil, status.Error(codes.Internal, "list tokens")
	}
	out := &adminv1.ListAPITokensResponse{}
	for _, t := range ts {
		out.Tokens = append(out.Tokens, tokenProto(t))
	}
	return out, nil
}

// RevokeAPIToken implements AdminService.
func (a *Admin) RevokeAPIToken(ctx context.Context, req *adminv1.RevokeAPITokenRequest) (*adminv1.RevokeAPITokenResponse, error) {
	if err := a.Store.RevokeAPIToken(ctx, req.Name); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil, status.Errorf(codes.NotFound, "no token named %q", validate.Printable(req.Name, 64))
		}
		return nil, status.Error(codes.Internal, "revoke token")
	}
	return &adminv1.RevokeAPITokenResponse{}, nil
}

// ListAuditEvents implements AdminService.
func (a *Admin) ListAuditEvents(ctx context.Context, req *adminv1.ListAuditEventsRequest) (*adminv1.ListAuditEventsResponse, error) {
	n := int(req.Limit)
	if n <= 0 {
		n = 100
	}
	evs, err := a.Store.ListAudit(ctx, req.HostId, min(n, 1000), req.BeforeId)
	if err != nil {
		return nil, status.Error(codes.Internal, "list audit events")
	}
	out := &adminv1.ListAuditEventsResponse{}
	for _, e := range evs {
		out.Events = append(out.Events, &adminv1.AuditEvent{Id: e.ID, Time: timestamppb.New(e.Time), Actor: e.Actor, Action: e.Action,
			HostId: e.HostID, Result: e.Result, Detail: e.Detail})
	}
	return out, nil
}

// BeginTOTPEnrollment implements AdminService: a new secret, kept pending
// until ConfirmTOTPEnrollment. It needs the user's password, so a stolen
// session cannot put its own authenticator on an account without TOTP and
// lock its owner out.
func (a *Admin) BeginTOTPEnrollment(ctx context.Context, req *adminv1.BeginTOTPEnrollmentRequest) (*adminv1.BeginTOTPEnrollmentResponse, error) {
	user, err := a.sessionUser(ctx)
	if err != nil {
		return nil, err
	}
	if user.TOTPSecret != "" {
		return nil, status.Error(codes.FailedPrecondition, "TOTP is already enabled; disable it first to enrol a new authenticator")
	}
	if err := a.checkPassword(user, req.Password); err != nil {
		return nil, err
	}
	key, err := totp.Generate(totp.GenerateOpts{Issuer: TOTPIssuer, AccountName: user.Name})
	if err != nil {
		return nil, status.Error(codes.Internal, "generate TOTP secret")
	}
	qr, err := qrPNG(key)
	if err != nil {
		return nil, status.Error(codes.Internal, "render QR code")
	}
	if err := a.Store.SetPendingTOTP(ctx, user.Name, key.Secret()); err != nil {
		return nil, status.Error(codes.Internal, "store pending TOTP secret")
	}
	return &adminv1.BeginTOTPEnrollmentResponse{Secret: key.Secret(), OtpauthUri: key.URL(), QrPng: qr}, nil
}

func qrPNG(key *otp.Key) ([]byte, error) {
	img, err := key.Image(256, 256)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// ConfirmTOTPEnrollment implements AdminService: the pending secret becomes
// the account's when the code matches it.
func (a *Admin) ConfirmTOTPEnrollment(ctx context.Context, req *adminv1.ConfirmTOTPEnrollmentRequest) (*adminv1.ConfirmTOTPEnrollmentResponse, error) {
	user, err := a.sessionUser(ctx)
	if err != nil {
		return nil, err
	}
	pending, err := a.Store.PendingTOTP(ctx, user.Name)
	if err != nil {
		return nil, status.Error(codes.Internal, "read pending TOTP secret")
	}
	if pending == "" {
		return nil, status.Error(codes.FailedPrecondition, "no TOTP enrolment under way; begin one first")
	}
	if err := a.checkCode(user.Name, req.Code, pending); err != nil {
		return nil, err
	}
	if err := a.Store.ConfirmTOTP(ctx, user.Name, pending); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil, status.Error(codes.FailedPrecondition, "the enrolment changed meanwhile; begin again")
		}
		return nil, status.Error(codes.Internal, "enable TOTP")
	}
	return &adminv1.ConfirmTOTPEnrollmentResponse{}, nil
}

// DisableTOTP implements AdminService: a current code turns TOTP off.
func (a *Admin) DisableTOTP(ctx context.Context, req *adminv1.DisableTOTPRequest) (*adminv1.DisableTOTPResponse, error) {
	user, err := a.sessionUser(ctx)
	if err != nil {
		return nil, err
	}
	if user.TOTPSecret == "" {
		return nil, status.Error(codes.FailedPrecondition, "TOTP is not enabled")
	}
	if err := a.checkCode(user.Name, req.Code, user.TOTPSecret); err != nil {
		return nil, err
	}
	if err := a.Store.DisableTOTP(ctx, user.Name, user.TOTPSecret); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return nil, status.Error(codes.FailedPrecondition, "TOTP changed meanwhile; reload and try again")
		}
		return nil, status.Error(codes.Internal, "disable TOTP")
	}
	return &adminv1.DisableTOTPResponse{}, nil
}

// sessionUser is the calling browser session's user. The policy admits
// only sessions to the TOTP methods; this is the second lock.
func (a *Admin) sessionUser(ctx context.Context) (store.User, error) {
	id := auth.FromContext(ctx)
	if id == nil || id.Kind != auth.KindUser || id.SessionIDHash == nil {
		return store.User{}, status.Error(codes.PermissionDenied, "only a browser session may manage its TOTP")
	}
	u, err := a.Store.GetUser(ctx, id.Name)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return store.User{}, status.Error(codes.Unauthenticated, "the session's user no longer exists")
		}
		return store.User{}, status.Error(codes.Internal, "read user")
	}
	return u, nil
}

// checkCode validates a six-digit code against secret, with guesses
// bounded per user, so a stolen session cannot guess its way to disabling
// TOTP.
func (a *Admin) checkCode(user, code, secret string) error {
	if len(code) != 6 {
		// Cannot match: no attempt spent.
		return status.Error(codes.InvalidArgument, "the one-time code has six digits")
	}
	if !a.codes.allow(user) {
		return status.Error(codes.ResourceExhausted, "too many one-time code attempts; wait a minute")
	}
	if !a.Codes.Validate(user, code, secret) {
		return status.Error(codes.InvalidArgument, "wrong or expired one-time code")
	}
	return nil
}

// errWrongPassword is the one answer to a missing or wrong password, so
// the answer tells nothing about why.
var errWrongPassword = status.Error(codes.InvalidArgument, "wrong password")

// checkPassword compares password with the user's bcrypt hash, with
// guesses bounded per user. An empty password cannot match (passwords
// have at least 8 bytes) and spends neither an attempt nor a hash; every
// other one costs a full bcrypt comparison, which takes the same time
// whatever the password, and an attempt.
func (a *Admin) checkPassword(user store.User, password string) error {
	if password == "" {
		return errWrongPassword
	}
	if !a.passwords.allow(user.Name) {
		return status.Error(codes.ResourceExhausted, "too many password attempts; wait a minute")
	}
	if bcrypt.CompareHashAndPassword(user.PasswordHash, []byte(password)) != nil {
		return errWrongPassword
	}
	return nil
}
