package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// CreateUser inserts a user; ErrExists if the name is taken. A zero
// CreatedAt means now.
func (s *SQLite) CreateUser(ctx context.Context, u User) error {
	if u.Name == "" {
		return errors.New("store: create user: empty name")
	}
	if len(u.PasswordHash) == 0 {
		return fmt.Errorf("store: create user %q: empty password hash", u.Name)
	}
	_, err := s.w.ExecContext(ctx,
		`INSERT INTO users (name, password_hash, totp_secret, created_at) VALUES (?, ?, ?, ?)`,
		u.Name, u.PasswordHash, u.TOTPSecret, s.orNow(u.CreatedAt).UnixMilli())
	return mapErr(err, "create user %q", u.Name)
}

// GetUser returns a user; ErrNotFound if absent.
func (s *SQLite) GetUser(ctx context.Context, name string) (User, error) {
	var (
		u       User
		created sql.NullInt64
	)
	err := s.r.QueryRowContext(ctx,
		`SELECT name, password_hash, totp_secret, created_at FROM users WHERE name = ?`, name).
		Scan(&u.Name, &u.PasswordHash, &u.TOTPSecret, &created)
	if err != nil {
		return User{}, mapErr(err, "get user %q", name)
	}
	u.CreatedAt = fromMillis(created)
	return u, nil
}

// UpdateUser replaces a user's password hash and TOTP secret; ErrNotFound if
// absent.
func (s *SQLite) UpdateUser(ctx context.Context, u User) error {
	if len(u.PasswordHash) == 0 {
		return fmt.Errorf("store: update user %q: empty password hash", u.Name)
	}
	res, err := s.w.ExecContext(ctx,
		`UPDATE users SET password_hash = ?, totp_secret = ? WHERE name = ?`,
		u.PasswordHash, u.TOTPSecret, u.Name)
	if err == nil {
		err = requireOne(res)
	}
	return mapErr(err, "update user %q", u.Name)
}

// CountUsers returns how many users exist.
func (s *SQLite) CountUsers(ctx context.Context) (int, error) {
	var n int
	if err := s.r.QueryRowContext(ctx, `SELECT COUNT(*) FROM users`).Scan(&n); err != nil {
		return 0, mapErr(err, "count users")
	}
	return n, nil
}

// CreateSession inserts a session; ErrExists on a duplicate id hash,
// ErrNotFound if the user does not exist. Zero CreatedAt and LastUsed mean
// now; ExpiresAt is required.
func (s *SQLite) CreateSession(ctx context.Context, se Session) error {
	if len(se.IDHash) == 0 {
		return errors.New("store: create session: empty id hash")
	}
	if se.ExpiresAt.IsZero() {
		return fmt.Errorf("store: create session for %q: no expiry", se.User)
	}
	created := s.orNow(se.CreatedAt)
	used := se.LastUsed
	if used.IsZero() {
		used = created
	}
	_, err := s.w.ExecContext(ctx,
		`INSERT INTO sessions (id_hash, user_name, csrf_token, created_at, last_used, expires_at) VALUES (?, ?, ?, ?, ?, ?)`,
		se.IDHash, se.User, se.CSRFToken, created.UnixMilli(), used.UnixMilli(), se.ExpiresAt.UnixMilli())
	return mapErr(err, "create session for user %q", se.User)
}

// GetSession returns a session by id hash; ErrNotFound if absent. Expiry is
// the caller's to check.
func (s *SQLite) GetSession(ctx context.Context, idHash []byte) (Session, error) {
	var (
		se                     Session
		created, used, expires sql.NullInt64
	)
	err := s.r.QueryRowContext(ctx,
		`SELECT id_hash, user_name, csrf_token, created_at, last_used, expires_at FROM sessions WHERE id_hash = ?`,
		idHash).Scan(&se.IDHash, &se.User, &se.CSRFToken, &created, &used, &expires)
	if err != nil {
		return Session{}, mapErr(err, "get session")
	}
	se.CreatedAt, se.LastUsed, se.ExpiresAt = fromMillis(created), fromMillis(used), fromMillis(expires)
	return se, nil
}

// TouchSession records use of a session (idle expiry); ErrNotFound if absent.
func (s *SQLite) TouchSession(ctx context.Context, idHash []byte, at time.Time) error {
	res, err := s.w.ExecContext(ctx, `UPDATE sessions SET last_used = ? WHERE id_hash = ?`, s.orNow(at).UnixMilli(), idHash)
	if err == nil {
		err = requireOne(res)
	}
	return mapErr(err, "touch session")
}

// DeleteSession removes a session; deleting one that is gone is not an error
// (logging out twice is fine).
func (s *SQLite) DeleteSession(ctx context.Context, idHash []byte) error {
	_, err := s.w.ExecContext(ctx, `DELETE FROM sessions WHERE id_hash = ?`, idHash)
	return mapErr(err, "delete session")
}

// DeleteExpiredSessions removes sessions whose absolute expiry is at or
// before now, or idle since before idleBefore (zero: no idle limit).
func (s *SQLite) DeleteExpiredSessions(ctx context.Context, now, idleBefore time.Time) (int, error) {
	var (
		res sql.Result
		err error
	)
	if idleBefore.IsZero() {
		res, err = s.w.ExecContext(ctx, `DELETE FROM sessions WHERE expires_at <= ?`, now.UnixMilli())
	} else {
		res, err = s.w.ExecContext(ctx, `DELETE FROM sessions WHERE expires_at <= ? OR last_used < ?`,
			now.UnixMilli(), idleBefore.UnixMilli())
	}
	if err != nil {
		return 0, mapErr(err, "delete expired sessions")
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, mapErr(err, "delete expired sessions")
	}
	return int(n), nil
}

// SetPendingTOTP stores a TOTP secret being enrolled for a user, replacing
// any earlier pending one; it does not change the enabled secret.
// ErrNotFound if the user is absent.
func (s *SQLite) SetPendingTOTP(ctx context.Context, user, secret string) error {
	res, err := s.w.ExecContext(ctx, `UPDATE users SET totp_pending = ? WHERE name = ?`, secret, user)
	if err == nil {
		err = requireOne(res)
	}
	return mapErr(err, "set pending TOTP of user %q", user)
}

// PendingTOTP returns a user's pending TOTP secret, empty when no enrolment
// is under way; ErrNotFound if the user is absent.
func (s *SQLite) PendingTOTP(ctx context.Context, user string) (string, error) {
	var secret string
	err := s.r.QueryRowContext(ctx, `SELECT totp_pending FROM users WHERE name = ?`, user).Scan(&secret)
	if err != nil {
		return "", mapErr(err, "get pending TOTP of user %q", user)
	}
	return secret, nil
}

// ConfirmTOTP enables the pending secret, if it is still the one given, and
// clears it, in one statement: two confirmations racing with a new
// enrolment cannot enable a secret the user never saw. ErrNotFound when the
// user is absent or the pending secret has changed.
func (s *SQLite) ConfirmTOTP(ctx context.Context, user, secret string) error {
	if secret == "" {
		return fmt.Errorf("store: confirm TOTP of user %q: empty secret", user)
	}
	res, err := s.w.ExecContext(ctx,
		`UPDATE users SET totp_secret = totp_pending, totp_pending = '' WHERE name = ? AND totp_pending = ?`, user, secret)
	if err == nil {
		err = requireOne(res)
	}
	return mapErr(err, "confirm TOTP of user %q", user)
}

// DisableTOTP clears a user's TOTP secret and any pending one, if the
// enabled secret is still the one given; ErrNotFound otherwise.
func (s *SQLite) DisableTOTP(ctx context.Context, user, secret string) error {
	res, err := s.w.ExecContext(ctx,
		`UPDATE users SET totp_secret = '', totp_pending = '' WHERE name = ? AND totp_secret = ? AND totp_secret <> ''`, user, secret)
	if err == nil {
		err = requireOne(res)
	}
	return mapErr(err, "disable TOTP of user %q", user)
}
