package store

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path"
	"strconv"
	"strings"
	"time"
)

// ErrSchemaTooNew is returned by [Open] for a database migrated by a newer
// nixplane than this one: running old code on it could lose data.
var ErrSchemaTooNew = errors.New("store: database schema is newer than this nixplane supports")

// Migrations are plain SQL files named NNNN_description.sql, numbered from 1
// without gaps, each applied once in its own transaction. Never edit a file
// once released: add the next one.
//
//go:embed migrations/*.sql
var migrationFiles embed.FS

type migration struct {
	version int
	name    string
	sql     string
}

var migrations, migrationsErr = loadMigrations(migrationFiles)

func loadMigrations(fsys fs.FS) ([]migration, error) {
	names, err := fs.Glob(fsys, "migrations/*.sql")
	if err != nil {
		return nil, err
	}
	var ms []migration
	for _, n := range names { // fs.Glob returns names sorted
		base := path.Base(n)
		num, _, ok := strings.Cut(base, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || len(num) != 4 {
			return nil, fmt.Errorf("migration %s: name must be NNNN_description.sql", base)
		}
		if v != len(ms)+1 {
			return nil, fmt.Errorf("migration %s: version %d, want %d (numbers start at 1 without gaps)", base, v, len(ms)+1)
		}
		body, err := fs.ReadFile(fsys, n)
		if err != nil {
			return nil, err
		}
		ms = append(ms, migration{version: v, name: strings.TrimSuffix(base, ".sql"), sql: string(body)})
	}
	if len(ms) == 0 {
		return nil, errors.New("no migrations embedded")
	}
	return ms, nil
}

const sqlCreateSchemaMigrations = `CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER NOT NULL PRIMARY KEY,
    name       TEXT    NOT NULL,
    applied_at INTEGER NOT NULL
)`

type querier interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

func schemaVersion(ctx context.Context, q querier) (int, error) {
	var v int
	err := q.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&v)
	return v, err
}

// migrate applies the migrations up to version upTo that the database lacks.
// Each one re-reads the version inside its transaction, so two processes
// opening the same file at once apply each migration exactly once.
func migrate(ctx context.Context, db *sql.DB, log *slog.Logger, now func() time.Time, upTo int) error {
	if migrationsErr != nil {
		return fmt.Errorf("embedded migrations: %w", migrationsErr)
	}
	if _, err := db.ExecContext(ctx, sqlCreateSchemaMigrations); err != nil {
		return fmt.Errorf("create schema_migrations: %w", err)
	}
	cur, err := schemaVersion(ctx, db)
	if err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	if cur > len(migrations) {
		return fmt.Errorf("%w: database is at version %d, this binary knows up to %d; run a newer nixplane", ErrSchemaTooNew, cur, len(migrations))
	}
	for _, m := range migrations[:upTo] {
		if m.version <= cur {
			continue
		}
		applied, err := applyMigration(ctx, db, m, now)
		if err != nil {
			return fmt.Errorf("migration %s: %w", m.name, err)
		}
		if applied {
			log.InfoContext(ctx, "applied database migration", logKeyVersion, m.version, logKeyName, m.name)
		}
		cur = m.version
	}
	return nil
}

func applyMigration(ctx context.Context, db *sql.DB, m migration, now func() time.Time) (applied bool, err error) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return false, err
	}
	defer func() {
		if !applied {
			_ = tx.Rollback()
		}
	}()
	cur, err := schemaVersion(ctx, tx)
	if err != nil {
		return false, err
	}
	switch {
	case cur >= m.version:
		return false, nil // another process was first
	case cur != m.version-1:
		return false, fmt.Errorf("database is at version %d, cannot apply %d", cur, m.version)
	}
	if _, err := tx.ExecContext(ctx, m.sql); err != nil {
		return false, err
	}
	if _, err := tx.ExecContext(ctx,
		`INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)`,
		m.version, m.name, now().UnixMilli()); err != nil {
		return false, err
	}
	if err := tx.Commit(); err != nil {
		return false, err
	}
	return true, nil
}

// schemaTables is what the current schema must provide; checked after
// migrating so a hand-edited or half-restored file fails at start, not on
// first use. The query is portable: it names every column the code reads.
var schemaTables = []struct {
	table   string
	columns []string
}{
	{"schema_migrations", []string{"version", "name", "applied_at"}},
	{"hosts", []string{"id", "record", "token_hash", "created_at", "last_seen"}},
	{"users", []string{"name", "password_hash", "totp_secret", "created_at"}},
	{"sessions", []string{"id_hash", "user_name", "csrf_token", "created_at", "last_used", "expires_at"}},
	{"api_tokens", []string{"name", "hash", "scope", "created_at", "expires_at", "last_used_at"}},
	{"commands", []string{"id", "host_id", "created_at", "finished_at", "state", "line_count", "record"}},
	{"command_lines", []string{"command_id", "seq", "stream", "text", "time"}},
	{"audit", []string{"id", "time", "actor", "action", "host_id", "result", "detail"}},
	{"settings", []string{"key", "value"}},
	{"bulk_runs", []string{"seq", "id", "created_at", "finished_at", "state", "record", "plan"}},
}

func verifySchema(ctx context.Context, db *sql.DB) error {
	for _, t := range schemaTables {
		q := "SELECT " + strings.Join(t.columns, ", ") + " FROM " + t.table + " WHERE 1 = 0"
		rows, err := db.QueryContext(ctx, q)
		if err != nil {
			return fmt.Errorf("schema check: table %s: %w", t.table, err)
		}
		rows.Close()
	}
	return nil
}

// SchemaVersion returns the database's schema version: the number of the
// last migration applied.
func (s *SQLite) SchemaVersion(ctx context.Context) (int, error) {
	v, err := schemaVersion(ctx, s.r)
	if err != nil {
		return 0, fmt.Errorf("store: read schema version: %w", err)
	}
	return v, nil
}

// LatestSchemaVersion is the schema version this binary migrates to.
func LatestSchemaVersion() int { return len(migrations) }
