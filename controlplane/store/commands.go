package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// terminalStates are the command states a run never leaves.
var terminalStates = []typesv1.CommandState{
	typesv1.CommandState_COMMAND_STATE_BLOCKED,
	typesv1.CommandState_COMMAND_STATE_SUCCEEDED,
	typesv1.CommandState_COMMAND_STATE_PARTIAL,
	typesv1.CommandState_COMMAND_STATE_FAILED,
	typesv1.CommandState_COMMAND_STATE_STOPPED,
	typesv1.CommandState_COMMAND_STATE_TIMED_OUT,
}

// Terminal reports whether a run in state st has ended.
func Terminal(st typesv1.CommandState) bool {
	for _, t := range terminalStates {
		if st == t {
			return true
		}
	}
	return false
}

// sqlTerminalList is "(2, 6, ...)": constants from the enum, not input.
var sqlTerminalList = func() string {
	var b strings.Builder
	b.WriteByte('(')
	for i, st := range terminalStates {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(strconv.Itoa(int(st)))
	}
	b.WriteByte(')')
	return b.String()
}()

const (
	sqlAppendLine = `INSERT INTO command_lines (command_id, seq, stream, text, time) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (command_id, seq) DO NOTHING`
	sqlAddLineCount = `UPDATE commands SET line_count = line_count + ? WHERE id = ?`
)

func tsMillis(ts *timestamppb.Timestamp) sql.NullInt64 {
	if ts == nil {
		return sql.NullInt64{}
	}
	return millis(ts.AsTime())
}

// encodeCommand validates a run and returns the stored record and its
// indexed columns.
func encodeCommand(c *fleetv1.Command) ([]byte, error) {
	switch {
	case c == nil:
		return nil, errors.New("nil command")
	case c.GetCommandId() == "":
		return nil, errors.New("empty command id")
	case c.GetHostId() == "":
		return nil, errors.New("empty host id")
	}
	return proto.MarshalOptions{Deterministic: true}.Marshal(c)
}

// CreateCommand inserts a run; ErrExists on a duplicate id, ErrNotFound if
// its host does not exist. A missing created_at is set to now (in the stored
// copy; c is not modified).
func (s *SQLite) CreateCommand(ctx context.Context, c *fleetv1.Command) error {
	if c != nil && c.GetCreatedAt() == nil {
		c = proto.CloneOf(c)
		c.CreatedAt = timestamppb.New(s.now())
	}
	rec, err := encodeCommand(c)
	if err != nil {
		return fmt.Errorf("store: create command: %w", err)
	}
	_, err = s.w.ExecContext(ctx,
		`INSERT INTO commands (id, host_id, created_at, finished_at, state, line_count, record) VALUES (?, ?, ?, ?, ?, 0, ?)`,
		c.GetCommandId(), c.GetHostId(), c.GetCreatedAt().AsTime().UnixMilli(), tsMillis(c.GetFinishedAt()),
		int32(c.GetState()), rec)
	return mapErr(err, "create command %q on host %q", c.GetCommandId(), c.GetHostId())
}

// UpdateCommand replaces a run's record, state and finish time; its host and
// creation time stay as created. ErrNotFound if absent (or on another host).
func (s *SQLite) UpdateCommand(ctx context.Context, c *fleetv1.Command) error {
	rec, err := encodeCommand(c)
	if err != nil {
		return fmt.Errorf("store: update command: %w", err)
	}
	res, err := s.w.ExecContext(ctx,
		`UPDATE commands SET finished_at = ?, state = ?, record = ? WHERE id = ? AND host_id = ?`,
		tsMillis(c.GetFinishedAt()), int32(c.GetState()), rec, c.GetCommandId(), c.GetHostId())
	if err == nil {
		err = requireOne(res)
	}
	return mapErr(err, "update command %q on host %q", c.GetCommandId(), c.GetHostId())
}

const sqlSelectCommand = `SELECT id, created_at, line_count, record FROM commands`

func scanCommand(sc interface{ Scan(...any) error }) (*fleetv1.Command, commandCursor, error) {
	var (
		cur   commandCursor
		lines int64
		rec   []byte
	)
	if err := sc.Scan(&cur.id, &cur.createdAt, &lines, &rec); err != nil {
		return nil, cur, err
	}
	c := &fleetv1.Command{}
	if err := proto.Unmarshal(rec, c); err != nil {
		return nil, cur, fmt.Errorf("decode record of command %q: %w", cur.id, err)
	}
	c.LineCount = uint64(lines)
	if c.CreatedAt == nil {
		c.CreatedAt = timestamppb.New(time.UnixMilli(cur.createdAt))
	}
	return c, cur, nil
}

// GetCommand returns a run; ErrNotFound if absent. Its line_count is the
// number of lines stored.
func (s *SQLite) GetCommand(ctx context.Context, id string) (*fleetv1.Command, error) {
	c, _, err := scanCommand(s.r.QueryRowContext(ctx, sqlSelectCommand+` WHERE id = ?`, id))
	if err != nil {
		return nil, mapErr(err, "get command %q", id)
	}
	return c, nil
}

// ListCommands returns runs newest first, of one host or all (hostID empty),
// at most limit (0 or less: no limit), starting after cursor (empty: the
// newest). It returns the cursor of the next page, empty after the last. A
// cursor not issued here gives ErrInvalidCursor.
func (s *SQLite) ListCommands(ctx context.Context, hostID string, limit int, cursor string) ([]*fleetv1.Command, string, error) {
	var (
		where []string
		args  []any
	)
	if hostID != "" {
		where, args = append(where, "host_id = ?"), append(args, hostID)
	}
	if cursor != "" {
		cur, err := decodeCommandCursor(cursor)
		if err != nil {
			return nil, "", fmt.Errorf("store: list commands: %w", err)
		}
		where = append(where, "(created_at < ? OR (created_at = ? AND id < ?))")
		args = append(args, cur.createdAt, cur.createdAt, cur.id)
	}
	q := sqlSelectCommand
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY created_at DESC, id DESC"
	if limit > 0 {
		// One extra row says whether there is a next page.
		q, args = q+" LIMIT ?", append(args, limit+1)
	}
	rows, err := s.r.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, "", mapErr(err, "list commands")
	}
	defer rows.Close()
	var (
		cs   []*fleetv1.Command
		last commandCursor
		more bool
	)
	for rows.Next() {
		if limit > 0 && len(cs) == limit {
			more = true
			break
		}
		c, cur, err := scanCommand(rows)
		if err != nil {
			return nil, "", mapErr(err, "list commands")
		}
		cs, last = append(cs, c), cur
	}
	if err := rows.Err(); err != nil {
		return nil, "", mapErr(err, "list commands")
	}
	if !more {
		return cs, "", nil
	}
	return cs, last.encode(), nil
}

// ActiveCommands returns runs not in a terminal state, oldest first.
func (s *SQLite) ActiveCommands(ctx context.Context) ([]*fleetv1.Command, error) {
	rows, err := s.r.QueryContext(ctx,
		sqlSelectCommand+` WHERE state NOT IN `+sqlTerminalList+` ORDER BY created_at, id`)
	if err != nil {
		return nil, mapErr(err, "active commands")
	}
	defer rows.Close()
	var cs []*fleetv1.Command
	for rows.Next() {
		c, _, err := scanCommand(rows)
		if err != nil {
			return nil, mapErr(err, "active commands")
		}
		cs = append(cs, c)
	}
	if err := rows.Err(); err != nil {
		return nil, mapErr(err, "active commands")
	}
	return cs, nil
}

// AppendLines stores output lines of one command in one transaction and
// counts the new ones in the run's line_count. A line whose seq is already
// stored is ignored (agents resend after a reconnect). ErrNotFound if the
// command does not exist. Seq numbers start at 1.
func (s *SQLite) AppendLines(ctx context.Context, commandID string, lines []*typesv1.OutputLine) error {
	if len(lines) == 0 {
		return nil
	}
	for i, l := range lines {
		switch {
		case l == nil:
			return fmt.Errorf("store: append lines to %q: line %d is nil", commandID, i)
		case l.GetSeq() == 0 || l.GetSeq() > math.MaxInt64:
			return fmt.Errorf("store: append lines to %q: line %d has seq %d, want 1 or more", commandID, i, l.GetSeq())
		}
	}
	err := s.withTx(ctx, func(tx *sql.Tx) error {
		ins := tx.StmtContext(ctx, s.stmtAppendLine)
		defer ins.Close()
		var added int64
		for _, l := range lines {
			res, err := ins.ExecContext(ctx, commandID, int64(l.GetSeq()), int32(l.GetStream()), l.GetText(), tsMillis(l.GetTime()))
			if err != nil {
				return err
			}
			n, err := res.RowsAffected()
			if err != nil {
				return err
			}
			added += n
		}
		if added == 0 {
			return nil
		}
		upd := tx.StmtContext(ctx, s.stmtLineCount)
		defer upd.Close()
		_, err := upd.ExecContext(ctx, added, commandID)
		return err
	})
	return mapErr(err, "append %d lines to command %q", len(lines), commandID)
}

// ReadLines returns lines with seq > afterSeq in seq order, at most limit (0
// or less: all). ErrNotFound if the command does not exist.
func (s *SQLite) ReadLines(ctx context.Context, commandID string, afterSeq uint64, limit int) ([]*typesv1.OutputLine, error) {
	if afterSeq > math.MaxInt64 {
		return nil, nil
	}
	q := `SELECT seq, stream, text, time FROM command_lines WHERE command_id = ? AND seq > ? ORDER BY seq`
	args := []any{commandID, int64(afterSeq)}
	if limit > 0 {
		q, args = q+" LIMIT ?", append(args, limit)
	}
	rows, err := s.r.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, mapErr(err, "read lines of command %q", commandID)
	}
	defer rows.Close()
	var ls []*typesv1.OutputLine
	for rows.Next() {
		var (
			seq    int64
			stream int32
			l      typesv1.OutputLine
			t      sql.NullInt64
		)
		if err := rows.Scan(&seq, &stream, &l.Text, &t); err != nil {
			return nil, mapErr(err, "read lines of command %q", commandID)
		}
		l.Seq, l.Stream = uint64(seq), typesv1.OutputStream(stream)
		if t.Valid {
			l.Time = timestamppb.New(fromMillis(t))
		}
		ls = append(ls, &l)
	}
	if err := rows.Err(); err != nil {
		return nil, mapErr(err, "read lines of command %q", commandID)
	}
	if len(ls) == 0 {
		// No lines: tell an empty log from a missing command.
		var one int
		err := s.r.QueryRowContext(ctx, `SELECT 1 FROM commands WHERE id = ?`, commandID).Scan(&one)
		if err != nil {
			return nil, mapErr(err, "read lines of command %q", commandID)
		}
	}
	return ls, nil
}

// PruneCommands deletes ended runs, and their lines, that finished (or, with
// no finish time, were created) before t. It returns how many runs went.
func (s *SQLite) PruneCommands(ctx context.Context, before time.Time) (int, error) {
	res, err := s.w.ExecContext(ctx,
		`DELETE FROM commands WHERE state IN `+sqlTerminalList+` AND COALESCE(finished_at, created_at) < ?`,
		before.UnixMilli())
	if err != nil {
		return 0, mapErr(err, "prune commands")
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, mapErr(err, "prune commands")
	}
	return int(n), nil
}
