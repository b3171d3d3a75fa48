package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// encodeBulk validates a run and returns its stored record and plan.
func encodeBulk(r BulkRun) (rec []byte, plan []byte, err error) {
	b := r.Bulk
	switch {
	case b == nil:
		return nil, nil, errors.New("nil bulk run")
	case b.GetBulkId() == "":
		return nil, nil, errors.New("empty bulk id")
	case b.GetState() == fleetv1.BulkState_BULK_STATE_UNSPECIFIED:
		return nil, nil, fmt.Errorf("bulk run %q has no state", b.GetBulkId())
	case b.GetCreatedAt() == nil:
		return nil, nil, fmt.Errorf("bulk run %q has no creation time", b.GetBulkId())
	}
	if rec, err = (proto.MarshalOptions{Deterministic: true}).Marshal(b); err != nil {
		return nil, nil, err
	}
	if plan, err = json.Marshal(r.Plan); err != nil {
		return nil, nil, err
	}
	return rec, plan, nil
}

// SaveBulk inserts or replaces a run by its bulk id. A run is unfinished
// while its state is RUNNING; an ended run without a finish time is stored
// as finished now.
func (s *SQLite) SaveBulk(ctx context.Context, r BulkRun) error {
	rec, plan, err := encodeBulk(r)
	if err != nil {
		return fmt.Errorf("store: save bulk run: %w", err)
	}
	b := r.Bulk
	var finished sql.NullInt64
	if b.GetState() != fleetv1.BulkState_BULK_STATE_RUNNING {
		finished = millis(s.now())
		if b.GetFinishedAt() != nil {
			finished = millis(b.GetFinishedAt().AsTime())
		}
	}
	_, err = s.w.ExecContext(ctx,
		`INSERT INTO bulk_runs (id, created_at, finished_at, state, record, plan) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET finished_at = excluded.finished_at, state = excluded.state, record = excluded.record, plan = excluded.plan`,
		b.GetBulkId(), b.GetCreatedAt().AsTime().UnixMilli(), finished, int32(b.GetState()), rec, string(plan))
	return mapErr(err, "save bulk run %q", b.GetBulkId())
}

const sqlSelectBulk = `SELECT id, record, plan FROM bulk_runs`

func scanBulk(sc interface{ Scan(...any) error }) (BulkRun, error) {
	var (
		id   string
		rec  []byte
		plan string
		r    BulkRun
	)
	if err := sc.Scan(&id, &rec, &plan); err != nil {
		return r, err
	}
	r.Bulk = &fleetv1.BulkCommand{}
	if err := proto.Unmarshal(rec, r.Bulk); err != nil {
		return r, fmt.Errorf("decode record of bulk run %q: %w", id, err)
	}
	if err := json.Unmarshal([]byte(plan), &r.Plan); err != nil {
		return r, fmt.Errorf("decode plan of bulk run %q: %w", id, err)
	}
	return r, nil
}

// GetBulk returns a run; ErrNotFound if absent.
func (s *SQLite) GetBulk(ctx context.Context, id string) (BulkRun, error) {
	r, err := scanBulk(s.r.QueryRowContext(ctx, sqlSelectBulk+` WHERE id = ?`, id))
	if err != nil {
		return BulkRun{}, mapErr(err, "get bulk run %q", id)
	}
	return r, nil
}

// UnfinishedBulks returns the runs still RUNNING in the order they were
// first saved.
func (s *SQLite) UnfinishedBulks(ctx context.Context) ([]BulkRun, error) {
	rows, err := s.r.QueryContext(ctx, sqlSelectBulk+` WHERE finished_at IS NULL ORDER BY seq`)
	if err != nil {
		return nil, mapErr(err, "list unfinished bulk runs")
	}
	defer rows.Close()
	var out []BulkRun
	for rows.Next() {
		r, err := scanBulk(rows)
		if err != nil {
			return nil, mapErr(err, "list unfinished bulk runs")
		}
		out = append(out, r)
	}
	return out, mapErr(rows.Err(), "list unfinished bulk runs")
}

// PruneBulks deletes ended runs but the newest keep (in the order they were
// first saved) and returns how many it deleted. Unfinished runs are never deleted.
func (s *SQLite) PruneBulks(ctx context.Context, keep int) (int, error) {
	if keep < 0 {
		keep = 0
	}
	res, err := s.w.ExecContext(ctx, `DELETE FROM bulk_runs WHERE finished_at IS NOT NULL AND id NOT IN (
    SELECT id FROM bulk_runs WHERE finished_at IS NOT NULL ORDER BY seq DESC LIMIT ?)`, keep)
	if err != nil {
		return 0, mapErr(err, "prune bulk runs")
	}
	n, err := res.RowsAffected()
	return int(n), mapErr(err, "prune bulk runs")
}
