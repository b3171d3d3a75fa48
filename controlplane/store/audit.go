package store

import (
	"context"
	"database/sql"
	"errors"
	"strings"
)

// AppendAudit records an event; its ID is assigned by the database and
// never reused. A zero Time means now.
func (s *SQLite) AppendAudit(ctx context.Context, e AuditEvent) error {
	if e.Action == "" {
		return errors.New("store: append audit: empty action")
	}
	// The fields come from callers (a login form's user name): stored as
	// valid UTF-8, or the API could never list them again.
	for _, f := range []*string{&e.Actor, &e.Action, &e.HostID, &e.Result, &e.Detail} {
		*f = strings.ToValidUTF8(*f, "\uFFFD")
	}
	_, err := s.w.ExecContext(ctx,
		`INSERT INTO audit (time, actor, action, host_id, result, detail) VALUES (?, ?, ?, ?, ?, ?)`,
		s.orNow(e.Time).UnixMilli(), e.Actor, e.Action, e.HostID, e.Result, e.Detail)
	return mapErr(err, "append audit %q", e.Action)
}

// ListAudit returns events newest first, of one host or all (hostID empty),
// with ID below beforeID (0: no bound), at most limit (0 or less: no limit).
// The next page starts before the last event's ID.
func (s *SQLite) ListAudit(ctx context.Context, hostID string, limit int, beforeID int64) ([]AuditEvent, error) {
	var (
		where []string
		args  []any
	)
	if hostID != "" {
		where, args = append(where, "host_id = ?"), append(args, hostID)
	}
	if beforeID > 0 {
		where, args = append(where, "id < ?"), append(args, beforeID)
	}
	q := `SELECT id, time, actor, action, host_id, result, detail FROM audit`
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY id DESC"
	if limit > 0 {
		q, args = q+" LIMIT ?", append(args, limit)
	}
	rows, err := s.r.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, mapErr(err, "list audit")
	}
	defer rows.Close()
	var es []AuditEvent
	for rows.Next() {
		var (
			e AuditEvent
			t sql.NullInt64
		)
		if err := rows.Scan(&e.ID, &t, &e.Actor, &e.Action, &e.HostID, &e.Result, &e.Detail); err != nil {
			return nil, mapErr(err, "list audit")
		}
		e.Time = fromMillis(t)
		es = append(es, e)
	}
	if err := rows.Err(); err != nil {
		return nil, mapErr(err, "list audit")
	}
	return es, nil
}

// GetSetting returns a value; ErrNotFound if unset.
func (s *SQLite) GetSetting(ctx context.Context, key string) (string, error) {
	var v string
	if err := s.r.QueryRowContext(ctx, `SELECT value FROM settings WHERE key = ?`, key).Scan(&v); err != nil {
		return "", mapErr(err, "get setting %q", key)
	}
	return v, nil
}

// SetSetting inserts or replaces a value.
func (s *SQLite) SetSetting(ctx context.Context, key, value string) error {
	if key == "" {
		return errors.New("store: set setting: empty key")
	}
	_, err := s.w.ExecContext(ctx,
		`INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value`,
		key, value)
	return mapErr(err, "set setting %q", key)
}
