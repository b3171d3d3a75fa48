package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// CreateAPIToken inserts a token; ErrExists if the name (or, against all
// odds, the hash) is taken. A zero CreatedAt means now.
func (s *SQLite) CreateAPIToken(ctx context.Context, t APIToken) error {
	if t.Name == "" {
		return errors.New("store: create API token: empty name")
	}
	if len(t.Hash) == 0 {
		return fmt.Errorf("store: create API token %q: empty hash", t.Name)
	}
	if t.Scope == "" {
		return fmt.Errorf("store: create API token %q: empty scope", t.Name)
	}
	_, err := s.w.ExecContext(ctx,
		`INSERT INTO api_tokens (name, hash, scope, created_at, expires_at, last_used_at) VALUES (?, ?, ?, ?, ?, ?)`,
		t.Name, t.Hash, t.Scope, s.orNow(t.CreatedAt).UnixMilli(), millis(t.ExpiresAt), millis(t.LastUsedAt))
	return mapErr(err, "create API token %q", t.Name)
}

const sqlSelectToken = `SELECT name, hash, scope, created_at, expires_at, last_used_at FROM api_tokens`

func scanToken(sc interface{ Scan(...any) error }) (APIToken, error) {
	var (
		t                      APIToken
		created, expires, used sql.NullInt64
	)
	if err := sc.Scan(&t.Name, &t.Hash, &t.Scope, &created, &expires, &used); err != nil {
		return APIToken{}, err
	}
	t.CreatedAt, t.ExpiresAt, t.LastUsedAt = fromMillis(created), fromMillis(expires), fromMillis(used)
	return t, nil
}

// APITokenByHash returns a token by hash; ErrNotFound if absent. Expiry is
// the caller's to check.
func (s *SQLite) APITokenByHash(ctx context.Context, hash []byte) (APIToken, error) {
	if len(hash) == 0 {
		return APIToken{}, fmt.Errorf("store: API token by hash: empty hash: %w", ErrNotFound)
	}
	t, err := scanToken(s.r.QueryRowContext(ctx, sqlSelectToken+` WHERE hash = ?`, hash))
	if err != nil {
		return APIToken{}, mapErr(err, "API token by hash")
	}
	return t, nil
}

// ListAPITokens returns every token sorted by name.
func (s *SQLite) ListAPITokens(ctx context.Context) ([]APIToken, error) {
	rows, err := s.r.QueryContext(ctx, sqlSelectToken+` ORDER BY name`)
	if err != nil {
		return nil, mapErr(err, "list API tokens")
	}
	defer rows.Close()
	var ts []APIToken
	for rows.Next() {
		t, err := scanToken(rows)
		if err != nil {
			return nil, mapErr(err, "list API tokens")
		}
		ts = append(ts, t)
	}
	if err := rows.Err(); err != nil {
		return nil, mapErr(err, "list API tokens")
	}
	return ts, nil
}

// RevokeAPIToken deletes a token by name; ErrNotFound if absent.
func (s *SQLite) RevokeAPIToken(ctx context.Context, name string) error {
	res, err := s.w.ExecContext(ctx, `DELETE FROM api_tokens WHERE name = ?`, name)
	if err == nil {
		err = requireOne(res)
	}
	return mapErr(err, "revoke API token %q", name)
}

// TouchAPIToken records a token's last use; ErrNotFound if absent.
func (s *SQLite) TouchAPIToken(ctx context.Context, name string, at time.Time) error {
	res, err := s.w.ExecContext(ctx, `UPDATE api_tokens SET last_used_at = ? WHERE name = ?`, s.orNow(at).UnixMilli(), name)
	if err == nil {
		err = requireOne(res)
	}
	return mapErr(err, "touch API token %q", name)
}
