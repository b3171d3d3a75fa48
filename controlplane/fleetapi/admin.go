package fleetapi

import (
	"context"
	"errors"
	"time"

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
}

// Admin implements adminv1.AdminServiceServer.
type Admin struct {
	adminv1.UnimplementedAdminServiceServer
	Store AdminStore
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
