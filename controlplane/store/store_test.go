package store

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// t0 is a fixed time with sub-millisecond digits, to show what is truncated.
var t0 = time.Date(2026, 11, 22, 10, 30, 0, 123456789, time.UTC)

func ms(t time.Time) time.Time { return t.Truncate(time.Millisecond) }

func openTemp(t testing.TB, opts ...Option) *SQLite {
	t.Helper()
	opts = append([]Option{WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}, opts...)
	s, err := Open(t.Context(), filepath.Join(t.TempDir(), "nixplane.db"), opts...)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func wantErr(t *testing.T, err, want error) {
	t.Helper()
	if want == nil {
		if err != nil {
			t.Fatalf("unexpected error: %v", err)
		}
		return
	}
	if !errors.Is(err, want) {
		t.Fatalf("error = %v, want %v", err, want)
	}
}

func mustCreateHost(t testing.TB, s *SQLite, id string, token []byte) {
	t.Helper()
	if err := s.CreateHost(t.Context(), Host{ID: id, CreatedAt: t0}, token); err != nil {
		t.Fatalf("CreateHost(%s): %v", id, err)
	}
}

func TestHosts(t *testing.T) {
	s := openTemp(t)
	ctx := t.Context()

	rec := &fleetv1.Host{
		HostId:            "web1",
		Hostname:          "web1.example",
		HostType:          typesv1.HostType(1),
		Online:            true,
		LastSeen:          timestamppb.New(t0),
		Metrics:           &typesv1.Metrics{},
		RunningCommand:    &fleetv1.Command{CommandId: "c"},
		AgentVersion:      "1.2.3",
		Generation:        "abc",
		ThemeColor:        "#7aa2f7",
		HeartbeatInterval: durationpb.New(30 * time.Second),
	}
	if err := s.CreateHost(ctx, Host{ID: "web1", Record: rec, CreatedAt: t0}, []byte("hash-web1")); err != nil {
		t.Fatal(err)
	}
	if !rec.Online || rec.Metrics == nil {
		t.Fatal("CreateHost modified the caller's record")
	}

	t.Run("get clears live fields", func(t *testing.T) {
		h, err := s.GetHost(ctx, "web1")
		wantErr(t, err, nil)
		if h.ID != "web1" || !h.CreatedAt.Equal(ms(t0)) || !h.LastSeen.IsZero() {
			t.Fatalf("host = %+v", h)
		}
		want := proto.CloneOf(rec)
		want.Online, want.Metrics, want.RunningCommand, want.LastSeen = false, nil, nil, nil
		want.CreatedAt = timestamppb.New(ms(t0))
		if !proto.Equal(h.Record, want) {
			t.Fatalf("record = %v\nwant %v", h.Record, want)
		}
	})

	errCases := []struct {
		name string
		err  error
		want error
	}{
		{"create duplicate id", s.CreateHost(ctx, Host{ID: "web1"}, []byte("other")), ErrExists},
		{"create duplicate token", s.CreateHost(ctx, Host{ID: "web2"}, []byte("hash-web1")), ErrExists},
		{"get missing", func() error { _, err := s.GetHost(ctx, "nope"); return err }(), ErrNotFound},
		{"update missing", s.UpdateHostRecord(ctx, "nope", &fleetv1.Host{}), ErrNotFound},
		{"delete missing", s.DeleteHost(ctx, "nope"), ErrNotFound},
		{"token of missing", s.SetHostToken(ctx, "nope", []byte("x")), ErrNotFound},
		{"by unknown token", func() error { _, err := s.HostIDByTokenHash(ctx, []byte("zzz")); return err }(), ErrNotFound},
		{"by empty token", func() error { _, err := s.HostIDByTokenHash(ctx, nil); return err }(), ErrNotFound},
	}
	for _, c := range errCases {
		t.Run(c.name, func(t *testing.T) { wantErr(t, c.err, c.want) })
	}

	badInput := []struct {
		name string
		err  error
	}{
		{"empty id", s.CreateHost(ctx, Host{}, nil)},
		{"mismatched record id", s.CreateHost(ctx, Host{ID: "a", Record: &fleetv1.Host{HostId: "b"}}, nil)},
		{"nil record update", s.UpdateHostRecord(ctx, "web1", nil)},
		{"mismatched update id", s.UpdateHostRecord(ctx, "web1", &fleetv1.Host{HostId: "web9"})},
	}
	for _, c := range badInput {
		t.Run(c.name, func(t *testing.T) {
			if c.err == nil || errors.Is(c.err, ErrNotFound) || errors.Is(c.err, ErrExists) {
				t.Fatalf("error = %v, want a validation error", c.err)
			}
		})
	}

	t.Run("hosts without token", func(t *testing.T) {
		// NULL token hashes do not collide in the UNIQUE index.
		mustCreateHost(t, s, "b-host", nil)
		mustCreateHost(t, s, "a-host", []byte{})
		hs, err := s.ListHosts(ctx)
		wantErr(t, err, nil)
		var ids []string
		for _, h := range hs {
			ids = append(ids, h.ID)
		}
		if fmt.Sprint(ids) != "[a-host b-host web1]" {
			t.Fatalf("ListHosts ids = %v", ids)
		}
	})

	t.Run("token", func(t *testing.T) {
		id, err := s.HostIDByTokenHash(ctx, []byte("hash-web1"))
		if err != nil || id != "web1" {
			t.Fatalf("HostIDByTokenHash = %q, %v", id, err)
		}
		wantErr(t, s.SetHostToken(ctx, "a-host", []byte("hash-web1")), ErrExists)
		wantErr(t, s.SetHostToken(ctx, "web1", []byte("new")), nil)
		_, err = s.HostIDByTokenHash(ctx, []byte("hash-web1"))
		wantErr(t, err, ErrNotFound)
		id, err = s.HostIDByTokenHash(ctx, []byte("new"))
		if err != nil || id != "web1" {
			t.Fatalf("after rotation: %q, %v", id, err)
		}
	})

	t.Run("update record", func(t *testing.T) {
		upd := &fleetv1.Host{Generation: "def", Online: true}
		wantErr(t, s.UpdateHostRecord(ctx, "web1", upd), nil)
		h, err := s.GetHost(ctx, "web1")
		wantErr(t, err, nil)
		if h.Record.Generation != "def" || h.Record.Online || h.Record.AgentVersion != "" || h.Record.HostId != "web1" {
			t.Fatalf("record after update = %v", h.Record)
		}
	})

	t.Run("save last seen", func(t *testing.T) {
		wantErr(t, s.SaveLastSeen(ctx, map[string]time.Time{
			"web1":    t0.Add(time.Minute),
			"a-host":  t0.Add(2 * time.Minute),
			"unknown": t0,
		}), nil)
		wantErr(t, s.SaveLastSeen(ctx, nil), nil)
		for id, want := range map[string]time.Time{"web1": t0.Add(time.Minute), "a-host": t0.Add(2 * time.Minute), "b-host": {}} {
			h, err := s.GetHost(ctx, id)
			wantErr(t, err, nil)
			if !h.LastSeen.Equal(ms(want)) {
				t.Errorf("%s last seen = %v, want %v", id, h.LastSeen, ms(want))
			}
			if want.IsZero() != (h.Record.LastSeen == nil) {
				t.Errorf("%s record last seen = %v", id, h.Record.LastSeen)
			}
		}
		if _, err := s.GetHost(ctx, "unknown"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("SaveLastSeen created a host: %v", err)
		}
	})

	t.Run("delete", func(t *testing.T) {
		wantErr(t, s.DeleteHost(ctx, "b-host"), nil)
		_, err := s.GetHost(ctx, "b-host")
		wantErr(t, err, ErrNotFound)
	})
}

func TestUsersAndSessions(t *testing.T) {
	s := openTemp(t)
	ctx := t.Context()

	n, err := s.CountUsers(ctx)
	if err != nil || n != 0 {
		t.Fatalf("CountUsers = %d, %v", n, err)
	}
	wantErr(t, s.CreateUser(ctx, User{Name: "admin", PasswordHash: []byte("bcrypt1"), CreatedAt: t0}), nil)
	wantErr(t, s.CreateUser(ctx, User{Name: "admin", PasswordHash: []byte("x")}), ErrExists)
	if err := s.CreateUser(ctx, User{Name: "nopw"}); err == nil {
		t.Fatal("CreateUser without password hash succeeded")
	}
	_, err = s.GetUser(ctx, "nobody")
	wantErr(t, err, ErrNotFound)
	wantErr(t, s.UpdateUser(ctx, User{Name: "nobody", PasswordHash: []byte("x")}), ErrNotFound)

	wantErr(t, s.UpdateUser(ctx, User{Name: "admin", PasswordHash: []byte("bcrypt2"), TOTPSecret: "JBSWY3DP"}), nil)
	u, err := s.GetUser(ctx, "admin")
	wantErr(t, err, nil)
	if string(u.PasswordHash) != "bcrypt2" || u.TOTPSecret != "JBSWY3DP" || !u.CreatedAt.Equal(ms(t0)) {
		t.Fatalf("user = %+v", u)
	}
	if n, _ := s.CountUsers(ctx); n != 1 {
		t.Fatalf("CountUsers = %d", n)
	}

	mk := func(id string, created, expires time.Time) Session {
		return Session{IDHash: []byte(id), User: "admin", CSRFToken: "csrf-" + id, CreatedAt: created, ExpiresAt: expires}
	}
	wantErr(t, s.CreateSession(ctx, mk("s1", t0, t0.Add(24*time.Hour))), nil)
	wantErr(t, s.CreateSession(ctx, mk("s2", t0, t0.Add(time.Hour))), nil)
	wantErr(t, s.CreateSession(ctx, mk("s3", t0, t0.Add(24*time.Hour))), nil)
	wantErr(t, s.CreateSession(ctx, mk("s1", t0, t0.Add(time.Hour))), ErrExists)
	wantErr(t, s.CreateSession(ctx, Session{IDHash: []byte("s9"), User: "ghost", ExpiresAt: t0}), ErrNotFound)
	if err := s.CreateSession(ctx, Session{IDHash: []byte("s8"), User: "admin"}); err == nil {
		t.Fatal("CreateSession without expiry succeeded")
	}

	se, err := s.GetSession(ctx, []byte("s1"))
	wantErr(t, err, nil)
	want := Session{IDHash: []byte("s1"), User: "admin", CSRFToken: "csrf-s1", CreatedAt: ms(t0), LastUsed: ms(t0), ExpiresAt: ms(t0.Add(24 * time.Hour))}
	if !bytes.Equal(se.IDHash, want.IDHash) || se.User != want.User || se.CSRFToken != want.CSRFToken ||
		!se.CreatedAt.Equal(want.CreatedAt) || !se.LastUsed.Equal(want.LastUsed) || !se.ExpiresAt.Equal(want.ExpiresAt) {
		t.Fatalf("session = %+v\nwant %+v", se, want)
	}
	_, err = s.GetSession(ctx, []byte("nope"))
	wantErr(t, err, ErrNotFound)

	wantErr(t, s.TouchSession(ctx, []byte("s3"), t0.Add(3*time.Hour)), nil)
	wantErr(t, s.TouchSession(ctx, []byte("nope"), t0), ErrNotFound)
	se, _ = s.GetSession(ctx, []byte("s3"))
	if !se.LastUsed.Equal(ms(t0.Add(3 * time.Hour))) {
		t.Fatalf("LastUsed = %v", se.LastUsed)
	}

	// At t0+2h: s2 is past absolute expiry; with idleBefore t0+1h, s1 (last
	// used t0) is idle too; s3 was used at t0+3h.
	n, err = s.DeleteExpiredSessions(ctx, t0.Add(2*time.Hour), time.Time{})
	if err != nil || n != 1 {
		t.Fatalf("DeleteExpiredSessions (absolute) = %d, %v", n, err)
	}
	n, err = s.DeleteExpiredSessions(ctx, t0.Add(2*time.Hour), t0.Add(time.Hour))
	if err != nil || n != 1 {
		t.Fatalf("DeleteExpiredSessions (idle) = %d, %v", n, err)
	}
	for id, gone := range map[string]bool{"s1": true, "s2": true, "s3": false} {
		_, err := s.GetSession(ctx, []byte(id))
		if gone != errors.Is(err, ErrNotFound) {
			t.Errorf("session %s: err = %v, want gone=%v", id, err, gone)
		}
	}

	wantErr(t, s.DeleteSession(ctx, []byte("s3")), nil)
	wantErr(t, s.DeleteSession(ctx, []byte("s3")), nil) // idempotent
	_, err = s.GetSession(ctx, []byte("s3"))
	wantErr(t, err, ErrNotFound)
}

func TestAPITokens(t *testing.T) {
	s := openTemp(t)
	ctx := t.Context()

	wantErr(t, s.CreateAPIToken(ctx, APIToken{Name: "ci", Hash: []byte("h-ci"), Scope: "operate", CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}), nil)
	wantErr(t, s.CreateAPIToken(ctx, APIToken{Name: "backup", Hash: []byte("h-b"), Scope: "read", CreatedAt: t0}), nil)
	wantErr(t, s.CreateAPIToken(ctx, APIToken{Name: "ci", Hash: []byte("h-other"), Scope: "read"}), ErrExists)
	wantErr(t, s.CreateAPIToken(ctx, APIToken{Name: "dup", Hash: []byte("h-ci"), Scope: "read"}), ErrExists)
	for _, bad := range []APIToken{{Hash: []byte("x"), Scope: "read"}, {Name: "x", Scope: "read"}, {Name: "x", Hash: []byte("x")}} {
		if err := s.CreateAPIToken(ctx, bad); err == nil || errors.Is(err, ErrExists) {
			t.Errorf("CreateAPIToken(%+v) = %v, want validation error", bad, err)
		}
	}

	tok, err := s.APITokenByHash(ctx, []byte("h-ci"))
	wantErr(t, err, nil)
	if tok.Name != "ci" || tok.Scope != "operate" || !tok.CreatedAt.Equal(ms(t0)) || !tok.ExpiresAt.Equal(ms(t0.Add(time.Hour))) || !tok.LastUsedAt.IsZero() {
		t.Fatalf("token = %+v", tok)
	}
	_, err = s.APITokenByHash(ctx, []byte("nope"))
	wantErr(t, err, ErrNotFound)
	_, err = s.APITokenByHash(ctx, nil)
	wantErr(t, err, ErrNotFound)

	wantErr(t, s.TouchAPIToken(ctx, "ci", t0.Add(time.Minute)), nil)
	wantErr(t, s.TouchAPIToken(ctx, "nope", t0), ErrNotFound)

	ts, err := s.ListAPITokens(ctx)
	wantErr(t, err, nil)
	if len(ts) != 2 || ts[0].Name != "backup" || ts[1].Name != "ci" {
		t.Fatalf("ListAPITokens = %+v", ts)
	}
	if !ts[0].ExpiresAt.IsZero() || !ts[1].LastUsedAt.Equal(ms(t0.Add(time.Minute))) {
		t.Fatalf("ListAPITokens times = %+v", ts)
	}

	wantErr(t, s.RevokeAPIToken(ctx, "ci"), nil)
	wantErr(t, s.RevokeAPIToken(ctx, "ci"), ErrNotFound)
	_, err = s.APITokenByHash(ctx, []byte("h-ci"))
	wantErr(t, err, ErrNotFound)
}

func TestAuditAndSettings(t *testing.T) {
	s := openTemp(t)
	ctx := t.Context()

	for i := range 10 {
		host := "web1"
		if i%2 == 1 {
			host = "db1"
		}
		wantErr(t, s.AppendAudit(ctx, AuditEvent{
			Time: t0.Add(time.Duration(i) * time.Second), Actor: "user:admin",
			Action: fmt.Sprintf("action-%d", i), HostID: host, Result: "ok", Detail: "d",
		}), nil)
	}
	if err := s.AppendAudit(ctx, AuditEvent{Actor: "x"}); err == nil {
		t.Fatal("AppendAudit without action succeeded")
	}

	all, err := s.ListAudit(ctx, "", 0, 0)
	wantErr(t, err, nil)
	if len(all) != 10 || all[0].Action != "action-9" || all[9].Action != "action-0" {
		t.Fatalf("ListAudit all = %d events, first %+v", len(all), all[0])
	}
	if e := all[9]; e.Actor != "user:admin" || e.HostID != "web1" || e.Result != "ok" || e.Detail != "d" || !e.Time.Equal(ms(t0)) {
		t.Fatalf("event = %+v", e)
	}

	tests := []struct {
		name     string
		host     string
		limit    int
		beforeID int64
		want     []string
	}{
		{"newest 3", "", 3, 0, []string{"action-9", "action-8", "action-7"}},
		{"page 2", "", 3, all[2].ID, []string{"action-6", "action-5", "action-4"}},
		{"one host", "db1", 0, 0, []string{"action-9", "action-7", "action-5", "action-3", "action-1"}},
		{"one host paged", "web1", 2, all[3].ID, []string{"action-4", "action-2"}},
		{"unknown host", "nope", 10, 0, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			es, err := s.ListAudit(ctx, tc.host, tc.limit, tc.beforeID)
			wantErr(t, err, nil)
			var got []string
			for _, e := range es {
				got = append(got, e.Action)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
		})
	}

	_, err = s.GetSetting(ctx, "target")
	wantErr(t, err, ErrNotFound)
	wantErr(t, s.SetSetting(ctx, "target", "v1"), nil)
	wantErr(t, s.SetSetting(ctx, "target", "v2"), nil)
	wantErr(t, s.SetSetting(ctx, "other", ""), nil)
	if err := s.SetSetting(ctx, "", "x"); err == nil {
		t.Fatal("SetSetting with empty key succeeded")
	}
	for k, want := range map[string]string{"target": "v2", "other": ""} {
		v, err := s.GetSetting(ctx, k)
		if err != nil || v != want {
			t.Errorf("GetSetting(%s) = %q, %v; want %q", k, v, err, want)
		}
	}
}

// TestAuditIsAlwaysUTF8: whatever bytes a caller put in an event, it is
// read back as valid UTF-8 (the API could not send it otherwise).
func TestAuditIsAlwaysUTF8(t *testing.T) {
	s := openTemp(t)
	ctx := t.Context()
	wantErr(t, s.AppendAudit(ctx, AuditEvent{Actor: "user:\xffroot", Action: "login\xc3", HostID: "h\xe2\x82", Result: "ok", Detail: "d\xff"}), nil)
	evs, err := s.ListAudit(ctx, "", 0, 0)
	wantErr(t, err, nil)
	e := evs[0]
	for _, f := range []string{e.Actor, e.Action, e.HostID, e.Result, e.Detail} {
		if !utf8.ValidString(f) {
			t.Fatalf("invalid UTF-8 read back: %+v", e)
		}
	}
	if e.Actor != "user:\uFFFDroot" {
		t.Fatalf("actor = %q", e.Actor)
	}
}
