package store

import (
	"context"
	"database/sql"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// updateTestdata regenerates testdata/schema-v1.db:
//
//	go test ./controlplane/store -run TestUpgradeFromSchemaV1 -update-testdata
var updateTestdata = flag.Bool("update-testdata", false, "regenerate testdata/schema-v1.db")

const schemaV1File = "testdata/schema-v1.db"

func quietOptions() options {
	return options{
		busyTimeout: DefaultBusyTimeout,
		readConns:   2,
		logger:      slog.New(slog.NewTextHandler(io.Discard, nil)),
		now:         time.Now,
	}
}

// writeSchemaV1 builds a database with only migration 0001 applied and a few
// rows written with the SQL of that schema, as nixplane at schema 1 would
// have left it, then stores it as one self-contained file (no WAL).
func writeSchemaV1(t *testing.T, dst string) {
	ctx := t.Context()
	tmp := filepath.Join(t.TempDir(), "v1.db")
	s, err := open(ctx, tmp, quietOptions(), 1)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := proto.Marshal(&fleetv1.Host{
		HostId: "legacy", Hostname: "legacy.example", AgentVersion: "0.9.0",
		ThemeColor: "#bb9af7", Generation: "0123456789abcdef0123456789abcdef01234567",
	})
	if err != nil {
		t.Fatal(err)
	}
	cmdRec, err := proto.Marshal(&fleetv1.Command{
		CommandId: "legacy-cmd", HostId: "legacy", Command: "pull",
		State:     typesv1.CommandState_COMMAND_STATE_SUCCEEDED,
		CreatedAt: timestamppb.New(t0), FinishedAt: timestamppb.New(t0.Add(time.Minute)),
		Actor: "user:admin", Message: "pulled",
	})
	if err != nil {
		t.Fatal(err)
	}
	stmts := []struct {
		q    string
		args []any
	}{
		{`INSERT INTO hosts (id, record, token_hash, created_at, last_seen) VALUES (?, ?, ?, ?, ?)`,
			[]any{"legacy", rec, []byte("legacy-token-hash"), t0.UnixMilli(), t0.Add(time.Hour).UnixMilli()}},
		{`INSERT INTO users (name, password_hash, totp_secret, created_at) VALUES (?, ?, ?, ?)`,
			[]any{"admin", []byte("$2a$10$legacyhash"), "", t0.UnixMilli()}},
		{`INSERT INTO api_tokens (name, hash, scope, created_at, expires_at) VALUES (?, ?, ?, ?, ?)`,
			[]any{"ci", []byte("legacy-api-hash"), "operate", t0.UnixMilli(), nil}},
		{`INSERT INTO commands (id, host_id, created_at, finished_at, state, line_count, record) VALUES (?, ?, ?, ?, ?, ?, ?)`,
			[]any{"legacy-cmd", "legacy", t0.UnixMilli(), t0.Add(time.Minute).UnixMilli(), int32(typesv1.CommandState_COMMAND_STATE_SUCCEEDED), 3, cmdRec}},
		{`INSERT INTO audit (time, actor, action, host_id, result, detail) VALUES (?, ?, ?, ?, ?, ?)`,
			[]any{t0.UnixMilli(), "user:admin", "command.pull", "legacy", "ok", "legacy-cmd"}},
	}
	for i := 1; i <= 3; i++ {
		stmts = append(stmts, struct {
			q    string
			args []any
		}{`INSERT INTO command_lines (command_id, seq, stream, text, time) VALUES (?, ?, ?, ?, ?)`,
			[]any{"legacy-cmd", i, int32(typesv1.OutputStream_OUTPUT_STREAM_STDOUT), fmt.Sprintf("legacy line %d", i), t0.Add(time.Duration(i) * time.Second).UnixMilli()}})
	}
	for _, st := range stmts {
		if _, err := s.w.ExecContext(ctx, st.q, st.args...); err != nil {
			t.Fatalf("%s: %v", st.q, err)
		}
	}
	if err := s.r.Close(); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{`PRAGMA wal_checkpoint(TRUNCATE)`, `PRAGMA journal_mode = DELETE`, `VACUUM`} {
		if _, err := s.w.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	s.r = nil
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	copyFile(t, tmp, dst)
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func rawVersion(t *testing.T, path string) int {
	t.Helper()
	db, err := sql.Open("sqlite3", "file:"+path+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	v, err := schemaVersion(t.Context(), db)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestUpgradeFromSchemaV1(t *testing.T) {
	if *updateTestdata {
		writeSchemaV1(t, schemaV1File)
	}
	path := filepath.Join(t.TempDir(), "nixplane.db")
	copyFile(t, schemaV1File, path)
	if v := rawVersion(t, path); v != 1 {
		t.Fatalf("%s is at schema %d, want 1", schemaV1File, v)
	}

	up, err := Open(t.Context(), path, WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	if err != nil {
		t.Fatalf("open schema-v1 database: %v", err)
	}
	defer up.Close()
	ctx := t.Context()

	if v, err := up.SchemaVersion(ctx); err != nil || v != LatestSchemaVersion() {
		t.Fatalf("SchemaVersion = %d, %v; want %d", v, err, LatestSchemaVersion())
	}

	h, err := up.GetHost(ctx, "legacy")
	wantErr(t, err, nil)
	if h.Record.Hostname != "legacy.example" || h.Record.AgentVersion != "0.9.0" || !h.LastSeen.Equal(ms(t0.Add(time.Hour))) || !h.CreatedAt.Equal(ms(t0)) {
		t.Fatalf("legacy host = %+v / %v", h, h.Record)
	}
	if id, err := up.HostIDByTokenHash(ctx, []byte("legacy-token-hash")); err != nil || id != "legacy" {
		t.Fatalf("token lookup = %q, %v", id, err)
	}
	if u, err := up.GetUser(ctx, "admin"); err != nil || string(u.PasswordHash) != "$2a$10$legacyhash" {
		t.Fatalf("user = %+v, %v", u, err)
	}
	c, err := up.GetCommand(ctx, "legacy-cmd")
	wantErr(t, err, nil)
	if c.Message != "pulled" || c.LineCount != 3 || c.State != typesv1.CommandState_COMMAND_STATE_SUCCEEDED {
		t.Fatalf("command = %v", c)
	}
	ls, err := up.ReadLines(ctx, "legacy-cmd", 0, 0)
	if err != nil || fmt.Sprint(seqs(ls)) != "[1 2 3]" || ls[2].Text != "legacy line 3" {
		t.Fatalf("lines = %v, %v", ls, err)
	}
	wantErr(t, up.AppendLines(ctx, "legacy-cmd", lines(3, 4)), nil)
	if c, _ := up.GetCommand(ctx, "legacy-cmd"); c.LineCount != 4 {
		t.Fatalf("LineCount after append = %d", c.LineCount)
	}
	if es, err := up.ListAudit(ctx, "legacy", 10, 0); err != nil || len(es) != 1 || es[0].Action != "command.pull" {
		t.Fatalf("audit = %+v, %v", es, err)
	}

	// What migration 0002 added works on the old rows.
	tok, err := up.APITokenByHash(ctx, []byte("legacy-api-hash"))
	if err != nil || !tok.LastUsedAt.IsZero() || !tok.ExpiresAt.IsZero() {
		t.Fatalf("legacy token = %+v, %v", tok, err)
	}
	wantErr(t, up.TouchAPIToken(ctx, "ci", t0.Add(time.Hour)), nil)
	if tok, _ := up.APITokenByHash(ctx, []byte("legacy-api-hash")); !tok.LastUsedAt.Equal(ms(t0.Add(time.Hour))) {
		t.Fatalf("LastUsedAt = %v", tok.LastUsedAt)
	}
	wantErr(t, up.SetSetting(ctx, "k", "v"), nil)

	// What migration 0004 added: bulk runs, none unfinished after the upgrade.
	if un, err := up.UnfinishedBulks(ctx); err != nil || len(un) != 0 {
		t.Fatalf("UnfinishedBulks after upgrade = %v, %v", un, err)
	}
	wantErr(t, up.SaveBulk(ctx, bulkRun("bulk-after-upgrade", t0, fleetv1.BulkState_BULK_STATE_RUNNING)), nil)
	if un, err := up.UnfinishedBulks(ctx); err != nil || len(un) != 1 || un[0].Bulk.Results[0].Command.GetCommandId() != "cmd-a" {
		t.Fatalf("UnfinishedBulks = %v, %v", un, err)
	}
}

func TestRefuseNewerSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nixplane.db")
	s, err := Open(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.w.ExecContext(t.Context(),
		`INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'from_the_future', 0)`,
		LatestSchemaVersion()+1); err != nil {
		t.Fatal(err)
	}
	wantErr(t, s.Close(), nil)

	_, err = Open(t.Context(), path)
	wantErr(t, err, ErrSchemaTooNew)
	if !strings.Contains(err.Error(), fmt.Sprintf("version %d", LatestSchemaVersion()+1)) {
		t.Fatalf("error does not name the version: %v", err)
	}
}

func TestReopenKeepsData(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nixplane.db")
	ctx := t.Context()
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	wantErr(t, s.CreateHost(ctx, Host{ID: "h", Record: &fleetv1.Host{Hostname: "h.example"}, CreatedAt: t0}, []byte("tok")), nil)
	wantErr(t, s.CreateCommand(ctx, cmd("c", "h", t0, typesv1.CommandState_COMMAND_STATE_RUNNING)), nil)
	wantErr(t, s.AppendLines(ctx, "c", lines(1, 3)), nil)
	wantErr(t, s.SaveLastSeen(ctx, map[string]time.Time{"h": t0.Add(time.Minute)}), nil)
	wantErr(t, s.SetSetting(ctx, "k", "v"), nil)
	wantErr(t, s.Close(), nil)

	for range 2 { // reopening an up-to-date database applies nothing
		s, err = Open(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		h, err := s.GetHost(ctx, "h")
		if err != nil || h.Record.Hostname != "h.example" || !h.LastSeen.Equal(ms(t0.Add(time.Minute))) {
			t.Fatalf("host after reopen = %+v, %v", h, err)
		}
		ls, err := s.ReadLines(ctx, "c", 0, 0)
		if err != nil || len(ls) != 3 {
			t.Fatalf("lines after reopen = %d, %v", len(ls), err)
		}
		active, _ := s.ActiveCommands(ctx)
		if len(active) != 1 {
			t.Fatalf("active after reopen = %d", len(active))
		}
		var n int
		if err := s.r.QueryRowContext(ctx, `SELECT COUNT(*) FROM schema_migrations`).Scan(&n); err != nil || n != LatestSchemaVersion() {
			t.Fatalf("schema_migrations rows = %d, %v", n, err)
		}
		wantErr(t, s.Close(), nil)
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.db")
	if err := os.WriteFile(garbage, []byte(strings.Repeat("not a database ", 100)), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		path string
		opts []Option
	}{
		{"empty path", "", nil},
		{"memory", ":memory:", nil},
		{"uri", "file:x.db?mode=memory", nil},
		{"missing directory", filepath.Join(dir, "no", "such", "dir", "x.db"), nil},
		{"not a database", garbage, nil},
		{"zero read conns", filepath.Join(dir, "ok.db"), []Option{WithReadConns(0)}},
		{"negative busy timeout", filepath.Join(dir, "ok.db"), []Option{WithBusyTimeout(-time.Second)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Open(t.Context(), tc.path, tc.opts...)
			if err == nil {
				s.Close()
				t.Fatal("Open succeeded")
			}
		})
	}
}

func TestLoadMigrations(t *testing.T) {
	if migrationsErr != nil {
		t.Fatalf("embedded migrations: %v", migrationsErr)
	}
	if LatestSchemaVersion() < 2 {
		t.Fatalf("LatestSchemaVersion = %d", LatestSchemaVersion())
	}
	for i, m := range migrations {
		if m.version != i+1 || strings.TrimSpace(m.sql) == "" {
			t.Fatalf("migration %d = %+v", i, m)
		}
	}
	ok := "CREATE TABLE x (a INTEGER);"
	for _, tc := range []struct {
		name  string
		files fstest.MapFS
		ok    bool
	}{
		{"good", fstest.MapFS{"migrations/0001_a.sql": {Data: []byte(ok)}, "migrations/0002_b.sql": {Data: []byte(ok)}}, true},
		{"gap", fstest.MapFS{"migrations/0001_a.sql": {Data: []byte(ok)}, "migrations/0003_b.sql": {Data: []byte(ok)}}, false},
		{"not from 1", fstest.MapFS{"migrations/0002_a.sql": {Data: []byte(ok)}}, false},
		{"bad name", fstest.MapFS{"migrations/init.sql": {Data: []byte(ok)}}, false},
		{"short number", fstest.MapFS{"migrations/1_init.sql": {Data: []byte(ok)}}, false},
		{"none", fstest.MapFS{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := loadMigrations(tc.files)
			if (err == nil) != tc.ok {
				t.Fatalf("err = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

func TestPragmas(t *testing.T) {
	s := openTemp(t, WithBusyTimeout(1234*time.Millisecond))
	ctx := t.Context()
	for _, tc := range []struct {
		db      *sql.DB
		name    string
		pragma  string
		want    string
		canEdit bool
	}{
		{s.w, "writer", "journal_mode", "wal", true},
		{s.w, "writer", "synchronous", "1", true},
		{s.w, "writer", "foreign_keys", "1", true},
		{s.w, "writer", "busy_timeout", "1234", true},
		{s.w, "writer", "query_only", "0", true},
		{s.r, "reader", "journal_mode", "wal", false},
		{s.r, "reader", "foreign_keys", "1", false},
		{s.r, "reader", "busy_timeout", "1234", false},
		{s.r, "reader", "query_only", "1", false},
	} {
		var got string
		if err := tc.db.QueryRowContext(ctx, "PRAGMA "+tc.pragma).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != tc.want {
			t.Errorf("%s %s = %s, want %s", tc.name, tc.pragma, got, tc.want)
		}
	}
	if st := s.w.Stats(); st.MaxOpenConnections != 1 {
		t.Errorf("writer pool max = %d, want 1", st.MaxOpenConnections)
	}
	if _, err := s.r.ExecContext(ctx, `INSERT INTO settings (key, value) VALUES ('x', 'y')`); err == nil {
		t.Error("write through the read pool succeeded")
	}
}

// TestReadsDoNotWaitForWrites holds a write transaction open and reads
// through the store meanwhile: with WAL and a separate read pool the reads
// finish (seeing the last committed state) instead of waiting for the lock.
func TestReadsDoNotWaitForWrites(t *testing.T) {
	s := openTemp(t, WithBusyTimeout(30*time.Second))
	ctx := t.Context()
	mustCreateHost(t, s, "committed", nil)

	tx, err := s.w.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO hosts (id, record, created_at) VALUES ('pending', x'', 0)`); err != nil {
		t.Fatal(err)
	}

	// Far below the busy timeout: a read that queued behind the writer
	// would fail with a deadline error rather than pass slowly.
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			hs, err := s.ListHosts(rctx)
			if err == nil && (len(hs) != 1 || hs[0].ID != "committed") {
				err = fmt.Errorf("read saw uncommitted state: %d hosts", len(hs))
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetHost(ctx, "pending"); err != nil {
		t.Fatalf("after commit: %v", err)
	}
}

// TestConcurrentReadersDuringWrites runs writers (line batches, last-seen
// batches) against readers; none may fail, in particular with SQLITE_BUSY.
func TestConcurrentReadersDuringWrites(t *testing.T) {
	s := openTemp(t)
	ctx := t.Context()
	seen := map[string]time.Time{}
	for i := range 100 {
		id := fmt.Sprintf("h%03d", i)
		mustCreateHost(t, s, id, nil)
		seen[id] = t0
	}
	wantErr(t, s.CreateCommand(ctx, cmd("c", "h000", t0, typesv1.CommandState_COMMAND_STATE_RUNNING)), nil)

	const batches = 40
	var wg sync.WaitGroup
	errc := make(chan error, 16)
	report := func(err error) {
		select {
		case errc <- err:
		default:
		}
	}
	done := make(chan struct{})
	wg.Go(func() {
		defer close(done)
		for b := range uint64(batches) {
			if err := s.AppendLines(ctx, "c", lines(b*20+1, b*20+20)); err != nil {
				report(fmt.Errorf("AppendLines: %w", err))
				return
			}
			for id := range seen {
				seen[id] = t0.Add(time.Duration(b) * time.Second)
			}
			if err := s.SaveLastSeen(ctx, seen); err != nil {
				report(fmt.Errorf("SaveLastSeen: %w", err))
				return
			}
		}
	})
	wg.Go(func() { // a second writer queues on the one writer connection
		for i := range batches {
			if err := s.AppendAudit(ctx, AuditEvent{Actor: "t", Action: fmt.Sprint("a", i)}); err != nil {
				report(fmt.Errorf("AppendAudit: %w", err))
				return
			}
		}
	})
	for range 4 {
		wg.Go(func() {
			var last uint64
			for {
				select {
				case <-done:
					return
				default:
				}
				ls, err := s.ReadLines(ctx, "c", last, 50)
				if err != nil {
					report(fmt.Errorf("ReadLines: %w", err))
					return
				}
				for _, l := range ls {
					if l.Seq != last+1 {
						report(fmt.Errorf("ReadLines gap: %d after %d", l.Seq, last))
						return
					}
					last = l.Seq
				}
				if _, err := s.ListHosts(ctx); err != nil {
					report(fmt.Errorf("ListHosts: %w", err))
					return
				}
			}
		})
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	c, err := s.GetCommand(ctx, "c")
	if err != nil || c.LineCount != batches*20 {
		t.Fatalf("LineCount = %d, %v", c.GetLineCount(), err)
	}
}

// TestConcurrentOpen opens one new file from several goroutines at once, as
// the server and the CLI may: each migration is applied exactly once.
func TestConcurrentOpen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nixplane.db")
	var wg sync.WaitGroup
	stores := make([]*SQLite, 4)
	errs := make([]error, 4)
	for i := range stores {
		wg.Go(func() { stores[i], errs[i] = Open(t.Context(), path, WithBusyTimeout(30*time.Second)) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("Open %d: %v", i, err)
		}
		defer stores[i].Close()
	}
	var n int
	if err := stores[0].r.QueryRowContext(t.Context(), `SELECT COUNT(*) FROM schema_migrations`).Scan(&n); err != nil || n != LatestSchemaVersion() {
		t.Fatalf("schema_migrations rows = %d, %v", n, err)
	}
	// Writes through one store are visible through another.
	wantErr(t, stores[1].SetSetting(t.Context(), "k", "v"), nil)
	if v, err := stores[2].GetSetting(t.Context(), "k"); err != nil || v != "v" {
		t.Fatalf("GetSetting = %q, %v", v, err)
	}
}

// TestOddPath shows the path is escaped into the driver's URI: characters
// that mean something in a URI end up literally in the file name.
func TestOddPath(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data dir #1 ?x=y %41")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "fleet&co.db")
	for i := range 2 {
		s, err := Open(t.Context(), path, WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			wantErr(t, s.SetSetting(t.Context(), "k", "v"), nil)
		} else if v, err := s.GetSetting(t.Context(), "k"); err != nil || v != "v" {
			t.Fatalf("after reopen: %q, %v", v, err)
		}
		wantErr(t, s.Close(), nil)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("database not at the literal path: %v", err)
	}
}
