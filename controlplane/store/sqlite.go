package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"path/filepath"
	"runtime"
	"strconv"
	"time"

	sqlite3 "github.com/mattn/go-sqlite3"
)

// Defaults for [Open].
const (
	// DefaultBusyTimeout is how long a statement waits for a lock held by
	// another connection or process (for example the CLI writing while the
	// server runs) before failing with SQLITE_BUSY.
	DefaultBusyTimeout = 5 * time.Second
	// DefaultReadConns is the minimum size of the read pool; the pool is at
	// least GOMAXPROCS connections.
	DefaultReadConns = 4
)

// Option configures [Open].
type Option func(*options)

type options struct {
	busyTimeout time.Duration
	readConns   int
	logger      *slog.Logger
	now         func() time.Time
}

// WithBusyTimeout sets how long a statement waits for a lock before failing;
// see [DefaultBusyTimeout].
func WithBusyTimeout(d time.Duration) Option {
	return func(o *options) { o.busyTimeout = d }
}

// WithReadConns sets how many connections the read pool may open.
func WithReadConns(n int) Option {
	return func(o *options) { o.readConns = n }
}

// WithLogger sets the logger for migrations and other rare events.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) { o.logger = l }
}

// WithClock sets the clock used for creation times the caller leaves zero.
func WithClock(now func() time.Time) Option {
	return func(o *options) { o.now = now }
}

// Log field names.
const (
	logKeyPath    = "path"
	logKeyVersion = "version"
	logKeyName    = "name"
)

// pragmas are the connection settings, typed so that a bad value is a
// compile error rather than a silently ignored DSN parameter. They are
// applied by the driver on every new connection and checked after Open.
type pragmas struct {
	journalMode string // WAL: readers never block the writer and vice versa
	synchronous string // NORMAL: durable at checkpoints, safe with WAL
	busyTimeout time.Duration
	foreignKeys bool
	// txLock IMMEDIATE takes the write lock at BEGIN, so a transaction never
	// fails half-way on a lock upgrade when another process writes.
	txLock string
	// readOnly opens the file read-only and sets query_only.
	readOnly bool
}

// dsn returns the go-sqlite3 data source name for an absolute path.
func (p pragmas) dsn(abs string) string {
	q := url.Values{}
	q.Set("_busy_timeout", strconv.FormatInt(p.busyTimeout.Milliseconds(), 10))
	if p.foreignKeys {
		q.Set("_foreign_keys", "on")
	} else {
		q.Set("_foreign_keys", "off")
	}
	q.Set("_synchronous", p.synchronous)
	if p.readOnly {
		q.Set("mode", "ro")
		q.Set("_query_only", "on")
	} else {
		q.Set("_journal_mode", p.journalMode)
		q.Set("_txlock", p.txLock)
	}
	u := url.URL{Scheme: "file", Path: filepath.ToSlash(abs), RawQuery: q.Encode()}
	return u.String()
}

// SQLite is the embedded [Store]: one SQLite file in WAL mode, one writer
// connection through which every write goes (SQLite allows one writer at a
// time anyway; queueing in Go is cheaper than spinning on SQLITE_BUSY), and a
// separate read-only pool so reads never wait for writes.
type SQLite struct {
	path string
	w    *sql.DB // exactly one connection; every write
	r    *sql.DB // read-only pool
	now  func() time.Time
	log  *slog.Logger

	// Prepared on the writer for the hot paths.
	stmtAppendLine *sql.Stmt
	stmtLineCount  *sql.Stmt
	stmtLastSeen   *sql.Stmt
}

var _ Store = (*SQLite)(nil)

// Open opens (creating if needed) the database file at path, applies the
// embedded migrations and checks the schema. A database written by a newer
// nixplane is refused with [ErrSchemaTooNew]. In-memory databases are not
// supported: the read pool needs a file; tests use a temporary directory.
func Open(ctx context.Context, path string, opts ...Option) (*SQLite, error) {
	o := options{
		busyTimeout: DefaultBusyTimeout,
		readConns:   max(DefaultReadConns, runtime.GOMAXPROCS(0)),
		logger:      slog.Default(),
		now:         time.Now,
	}
	for _, opt := range opts {
		opt(&o)
	}
	if o.busyTimeout < 0 {
		return nil, fmt.Errorf("store: negative busy timeout %v", o.busyTimeout)
	}
	if o.readConns < 1 {
		return nil, fmt.Errorf("store: read pool needs at least 1 connection, got %d", o.readConns)
	}
	return open(ctx, path, o, len(migrations))
}

// open is Open migrating only up to schema version upTo, so tests can build
// databases of older schemas.
func open(ctx context.Context, path string, o options, upTo int) (_ *SQLite, err error) {
	if path == "" {
		return nil, errors.New("store: empty database path")
	}
	if path == ":memory:" || len(path) >= 5 && path[:5] == "file:" {
		return nil, fmt.Errorf("store: %q: give a file path, not a SQLite URI or :memory:", path)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("store: database path %q: %w", path, err)
	}
	wp := pragmas{
		journalMode: "WAL",
		synchronous: "NORMAL",
		busyTimeout: o.busyTimeout,
		foreignKeys: true,
		txLock:      "immediate",
	}
	rp := wp
	rp.readOnly = true

	s := &SQLite{path: abs, now: o.now, log: o.logger}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()

	s.w, err = sql.Open("sqlite3", wp.dsn(abs))
	if err != nil {
		return nil, fmt.Errorf("store: open %s: %w", abs, err)
	}
	s.w.SetMaxOpenConns(1)
	s.w.SetMaxIdleConns(1)
	s.w.SetConnMaxLifetime(0)
	s.w.SetConnMaxIdleTime(0)
	if err := checkPragmas(ctx, s.w, wp); err != nil {
		return nil, fmt.Errorf("store: open %s: %w", abs, err)
	}
	if err := migrate(ctx, s.w, s.log, s.now, upTo); err != nil {
		return nil, fmt.Errorf("store: %s: %w", abs, err)
	}

	// The read pool opens after migrating: a read-only connection cannot
	// create the file or switch it to WAL.
	s.r, err = sql.Open("sqlite3", rp.dsn(abs))
	if err != nil {
		return nil, fmt.Errorf("store: open %s read-only: %w", abs, err)
	}
	s.r.SetMaxOpenConns(o.readConns)
	s.r.SetMaxIdleConns(o.readConns)
	if err := checkPragmas(ctx, s.r, rp); err != nil {
		return nil, fmt.Errorf("store: open %s read-only: %w", abs, err)
	}
	if upTo == len(migrations) {
		if err := verifySchema(ctx, s.r); err != nil {
			return nil, fmt.Errorf("store: %s: %w", abs, err)
		}
	}

	if s.stmtAppendLine, err = s.w.PrepareContext(ctx, sqlAppendLine); err != nil {
		return nil, fmt.Errorf("store: prepare: %w", err)
	}
	if s.stmtLineCount, err = s.w.PrepareContext(ctx, sqlAddLineCount); err != nil {
		return nil, fmt.Errorf("store: prepare: %w", err)
	}
	if s.stmtLastSeen, err = s.w.PrepareContext(ctx, sqlSaveLastSeen); err != nil {
		return nil, fmt.Errorf("store: prepare: %w", err)
	}
	return s, nil
}

// checkPragmas reads the settings back: the driver ignores a DSN parameter
// it does not know, and WAL cannot be set on some file systems.
func checkPragmas(ctx context.Context, db *sql.DB, p pragmas) error {
	conn, err := db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	var (
		journal string
		fk      bool
		busy    int64
		queryRO bool
	)
	if err := conn.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&journal); err != nil {
		return fmt.Errorf("read journal_mode: %w", err)
	}
	if err := conn.QueryRowContext(ctx, "PRAGMA foreign_keys").Scan(&fk); err != nil {
		return fmt.Errorf("read foreign_keys: %w", err)
	}
	if err := conn.QueryRowContext(ctx, "PRAGMA busy_timeout").Scan(&busy); err != nil {
		return fmt.Errorf("read busy_timeout: %w", err)
	}
	if err := conn.QueryRowContext(ctx, "PRAGMA query_only").Scan(&queryRO); err != nil {
		return fmt.Errorf("read query_only: %w", err)
	}
	switch {
	case !equalFold(journal, p.journalMode):
		return fmt.Errorf("journal_mode is %q, want %q (does the file system support WAL?)", journal, p.journalMode)
	case fk != p.foreignKeys:
		return fmt.Errorf("foreign_keys is %v, want %v", fk, p.foreignKeys)
	case busy != p.busyTimeout.Milliseconds():
		return fmt.Errorf("busy_timeout is %dms, want %dms", busy, p.busyTimeout.Milliseconds())
	case queryRO != p.readOnly:
		return fmt.Errorf("query_only is %v, want %v", queryRO, p.readOnly)
	}
	return nil
}

func equalFold(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range len(a) {
		x, y := a[i], b[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// Path returns the absolute path of the database file.
func (s *SQLite) Path() string { return s.path }

// Close closes both pools; the last connection checkpoints the WAL.
func (s *SQLite) Close() error {
	var errs []error
	for _, st := range []*sql.Stmt{s.stmtAppendLine, s.stmtLineCount, s.stmtLastSeen} {
		if st != nil {
			errs = append(errs, st.Close())
		}
	}
	if s.r != nil {
		errs = append(errs, s.r.Close())
	}
	if s.w != nil {
		errs = append(errs, s.w.Close())
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("store: close: %w", err)
	}
	return nil
}

// withTx runs fn in one write transaction, committed when fn returns nil.
func (s *SQLite) withTx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.w.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	return tx.Commit()
}

// mapErr turns driver errors into the package's errors: constraint
// violations on a key into ErrExists, a missing row into ErrNotFound, a
// missing parent row (foreign key) into ErrNotFound. The driver's text is
// kept after the sentinel so the failing constraint stays visible in logs.
func mapErr(err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	what := fmt.Sprintf(format, args...)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("store: %s: %w", what, ErrNotFound)
	}
	var se sqlite3.Error
	if errors.As(err, &se) && se.Code == sqlite3.ErrConstraint {
		switch se.ExtendedCode {
		case sqlite3.ErrConstraintPrimaryKey, sqlite3.ErrConstraintUnique:
			return fmt.Errorf("store: %s: %w (%v)", what, ErrExists, err)
		case sqlite3.ErrConstraintForeignKey:
			return fmt.Errorf("store: %s: %w (%v)", what, ErrNotFound, err)
		}
	}
	return fmt.Errorf("store: %s: %w", what, err)
}

// requireOne returns ErrNotFound when an UPDATE or DELETE touched no row.
func requireOne(res sql.Result) error {
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n == 0 {
		return ErrNotFound
	}
	return nil
}

// millis converts a time to stored form: unix milliseconds, NULL for zero.
func millis(t time.Time) sql.NullInt64 {
	if t.IsZero() {
		return sql.NullInt64{}
	}
	return sql.NullInt64{Int64: t.UnixMilli(), Valid: true}
}

// fromMillis converts stored milliseconds back to a UTC time; NULL is zero.
func fromMillis(v sql.NullInt64) time.Time {
	if !v.Valid {
		return time.Time{}
	}
	return time.UnixMilli(v.Int64).UTC()
}

// orNow returns t, or the store's clock when t is zero.
func (s *SQLite) orNow(t time.Time) time.Time {
	if t.IsZero() {
		return s.now()
	}
	return t
}
