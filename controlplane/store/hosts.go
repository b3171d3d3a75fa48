package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

const sqlSaveLastSeen = `UPDATE hosts SET last_seen = ? WHERE id = ?`

// durableHost returns the bytes stored for a host record: a copy without the
// live fields, which belong to the hub's memory. created_at has its own
// column and is restored from it on read.
func durableHost(id string, rec *fleetv1.Host) ([]byte, error) {
	if rec == nil {
		rec = &fleetv1.Host{}
	}
	if rec.GetHostId() != "" && rec.GetHostId() != id {
		return nil, fmt.Errorf("record host_id %q does not match id %q", rec.GetHostId(), id)
	}
	c := proto.CloneOf(rec)
	c.HostId = id
	c.Online = false
	c.Metrics = nil
	c.RunningCommand = nil
	c.LastSeen = nil
	c.CreatedAt = nil
	return proto.MarshalOptions{Deterministic: true}.Marshal(c)
}

// nullBytes stores an empty slice as NULL, so "no token" never matches and
// never collides in the UNIQUE index.
func nullBytes(b []byte) any {
	if len(b) == 0 {
		return nil
	}
	return b
}

// CreateHost inserts a host with its token hash (nil: none yet); ErrExists if
// the id or the token hash is taken. A zero CreatedAt means now.
func (s *SQLite) CreateHost(ctx context.Context, h Host, tokenHash []byte) error {
	if h.ID == "" {
		return errors.New("store: create host: empty id")
	}
	rec, err := durableHost(h.ID, h.Record)
	if err != nil {
		return fmt.Errorf("store: create host %q: %w", h.ID, err)
	}
	_, err = s.w.ExecContext(ctx,
		`INSERT INTO hosts (id, record, token_hash, created_at, last_seen) VALUES (?, ?, ?, ?, ?)`,
		h.ID, rec, nullBytes(tokenHash), s.orNow(h.CreatedAt).UnixMilli(), millis(h.LastSeen))
	return mapErr(err, "create host %q", h.ID)
}

const sqlSelectHost = `SELECT id, record, created_at, last_seen FROM hosts`

func scanHost(sc interface{ Scan(...any) error }) (Host, error) {
	var (
		h        Host
		rec      []byte
		created  int64
		lastSeen sql.NullInt64
	)
	if err := sc.Scan(&h.ID, &rec, &created, &lastSeen); err != nil {
		return Host{}, err
	}
	h.Record = &fleetv1.Host{}
	if err := proto.Unmarshal(rec, h.Record); err != nil {
		return Host{}, fmt.Errorf("decode record of host %q: %w", h.ID, err)
	}
	h.CreatedAt = fromMillis(sql.NullInt64{Int64: created, Valid: true})
	h.LastSeen = fromMillis(lastSeen)
	h.Record.HostId = h.ID
	h.Record.CreatedAt = timestamppb.New(h.CreatedAt)
	if !h.LastSeen.IsZero() {
		h.Record.LastSeen = timestamppb.New(h.LastSeen)
	}
	return h, nil
}

// GetHost returns a host; ErrNotFound if absent. The record's host_id,
// created_at and last_seen are filled from their columns.
func (s *SQLite) GetHost(ctx context.Context, id string) (Host, error) {
	h, err := scanHost(s.r.QueryRowContext(ctx, sqlSelectHost+` WHERE id = ?`, id))
	if err != nil {
		return Host{}, mapErr(err, "get host %q", id)
	}
	return h, nil
}

// ListHosts returns every host sorted by id.
func (s *SQLite) ListHosts(ctx context.Context) ([]Host, error) {
	rows, err := s.r.QueryContext(ctx, sqlSelectHost+` ORDER BY id`)
	if err != nil {
		return nil, mapErr(err, "list hosts")
	}
	defer rows.Close()
	var hs []Host
	for rows.Next() {
		h, err := scanHost(rows)
		if err != nil {
			return nil, mapErr(err, "list hosts")
		}
		hs = append(hs, h)
	}
	if err := rows.Err(); err != nil {
		return nil, mapErr(err, "list hosts")
	}
	return hs, nil
}

// UpdateHostRecord replaces a host's durable record; ErrNotFound if absent.
// Live fields in rec are ignored.
func (s *SQLite) UpdateHostRecord(ctx context.Context, id string, rec *fleetv1.Host) error {
	if rec == nil {
		return fmt.Errorf("store: update host %q: nil record", id)
	}
	b, err := durableHost(id, rec)
	if err != nil {
		return fmt.Errorf("store: update host %q: %w", id, err)
	}
	res, err := s.w.ExecContext(ctx, `UPDATE hosts SET record = ? WHERE id = ?`, b, id)
	if err == nil {
		err = requireOne(res)
	}
	return mapErr(err, "update host %q", id)
}

// DeleteHost removes a host; its commands and their lines go with it
// (ON DELETE CASCADE). ErrNotFound if absent.
func (s *SQLite) DeleteHost(ctx context.Context, id string) error {
	res, err := s.w.ExecContext(ctx, `DELETE FROM hosts WHERE id = ?`, id)
	if err == nil {
		err = requireOne(res)
	}
	return mapErr(err, "delete host %q", id)
}

// SetHostToken replaces a host's token hash (nil removes it); ErrNotFound if
// the host is absent, ErrExists if another host has that hash.
func (s *SQLite) SetHostToken(ctx context.Context, id string, tokenHash []byte) error {
	res, err := s.w.ExecContext(ctx, `UPDATE hosts SET token_hash = ? WHERE id = ?`, nullBytes(tokenHash), id)
	if err == nil {
		err = requireOne(res)
	}
	return mapErr(err, "set token of host %q", id)
}

// HostIDByTokenHash returns the host a token hash belongs to; ErrNotFound
// for an unknown or empty hash.
func (s *SQLite) HostIDByTokenHash(ctx context.Context, tokenHash []byte) (string, error) {
	if len(tokenHash) == 0 {
		return "", fmt.Errorf("store: host by token: empty hash: %w", ErrNotFound)
	}
	var id string
	err := s.r.QueryRowContext(ctx, `SELECT id FROM hosts WHERE token_hash = ?`, tokenHash).Scan(&id)
	if err != nil {
		return "", mapErr(err, "host by token")
	}
	return id, nil
}

// SaveLastSeen writes many hosts' last-seen times in one transaction through
// a prepared statement; unknown ids are ignored.
func (s *SQLite) SaveLastSeen(ctx context.Context, seen map[string]time.Time) error {
	if len(seen) == 0 {
		return nil
	}
	err := s.withTx(ctx, func(tx *sql.Tx) error {
		st := tx.StmtContext(ctx, s.stmtLastSeen)
		defer st.Close()
		for id, t := range seen {
			if _, err := st.ExecContext(ctx, millis(t), id); err != nil {
				return err
			}
		}
		return nil
	})
	return mapErr(err, "save last seen of %d hosts", len(seen))
}
