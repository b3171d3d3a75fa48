package target

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

func TestParseVersionJSON(t *testing.T) {
	lock := strings.Repeat("ab", 32)
	for _, tc := range []struct {
		name, doc string
		ok        bool
		commit    string
		at        time.Time
	}{
		{"full", `{"gitCommit":"ABCDEF1234","lockHash":"` + strings.ToUpper(lock) + `","message":"m","branch":"main","timestamp":"2026-03-01T12:00:00Z"}`,
			true, "abcdef1234", time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)},
		{"unix seconds", `{"gitCommit":"abcdef1","timestamp":1772366400}`, true, "abcdef1", time.Unix(1772366400, 0)},
		{"unix seconds as a string", `{"gitCommit":"abcdef1","timestamp":"1772366400"}`, true, "abcdef1", time.Unix(1772366400, 0)},
		{"bad timestamp is ignored", `{"gitCommit":"abcdef1","timestamp":"yesterday"}`, true, "abcdef1", time.Time{}},
		{"not JSON", `<html>`, false, "", time.Time{}},
		{"no commit", `{"lockHash":"` + lock + `"}`, false, "", time.Time{}},
		{"short commit", `{"gitCommit":"abc"}`, false, "", time.Time{}},
		{"non-hex commit", `{"gitCommit":"main"}`, false, "", time.Time{}},
		{"commit with a newline", `{"gitCommit":"abcdef1\nx"}`, false, "", time.Time{}},
		{"bad lock", `{"gitCommit":"abcdef1","lockHash":"sha256-xyz"}`, false, "", time.Time{}},
		{"huge message", `{"gitCommit":"abcdef1","message":"` + strings.Repeat("m", 5000) + `"}`, false, "", time.Time{}},
	} {
		got, err := ParseVersionJSON([]byte(tc.doc))
		if (err == nil) != tc.ok {
			t.Errorf("%s: err = %v, want ok=%v", tc.name, err, tc.ok)
			continue
		}
		if err != nil {
			continue
		}
		if got.GitCommit != tc.commit {
			t.Errorf("%s: commit %q, want %q", tc.name, got.GitCommit, tc.commit)
		}
		if tc.at.IsZero() != (got.CommittedAt == nil) || (!tc.at.IsZero() && !got.CommittedAt.AsTime().Equal(tc.at)) {
			t.Errorf("%s: committed at %v, want %v", tc.name, got.CommittedAt, tc.at)
		}
	}
}

var hexCommit = regexp.MustCompile(`^[0-9a-f]{7,64}$`)

func FuzzParseVersionJSON(f *testing.F) {
	f.Add([]byte(`{"gitCommit":"abcdef1234","lockHash":"` + strings.Repeat("0", 64) + `","message":"m","timestamp":"2026-03-01T12:00:00Z"}`))
	f.Add([]byte(`{"gitCommit":"ABCDEF1","timestamp":1772366400}`))
	f.Add([]byte(`{"gitCommit":" abcdef1 ","message":"\u00ff\ud800"}`))
	f.Add([]byte(`{"gitCommit":1}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(`{"gitCommit":"abcdef1"}{"gitCommit":"zzz"}`))
	f.Fuzz(func(t *testing.T, doc []byte) {
		got, err := ParseVersionJSON(doc)
		if err != nil {
			if got != nil {
				t.Fatal("error with a target")
			}
			return
		}
		if !hexCommit.MatchString(got.GitCommit) {
			t.Fatalf("accepted commit %q", got.GitCommit)
		}
		if got.LockHash != "" && !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(got.LockHash) {
			t.Fatalf("accepted lock hash %q", got.LockHash)
		}
		if !utf8.ValidString(got.Message) || len(got.Message) > 4096*3 {
			t.Fatalf("accepted message of %d bytes", len(got.Message))
		}
	})
}

// TestTargetTextIsUTF8: a commit message in another encoding and a long
// git error naming a non-ASCII path reach the target as valid UTF-8, so
// every page and watcher can still be sent the target.
func TestTargetTextIsUTF8(t *testing.T) {
	dir := t.TempDir()
	origin := filepath.Join(dir, "fleet.git")
	run := func(stdin string, args ...string) string {
		t.Helper()
		cmd := exec.Command("git", args...)
		cmd.Stdin = strings.NewReader(stdin)
		cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@x", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@x")
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("git %v: %v", args, err)
		}
		return strings.TrimSpace(string(out))
	}
	run("", "init", "--quiet", "--bare", "--initial-branch=main", origin)
	tree := run("", "-C", origin, "mktree")
	commit := run("Caf\xe9 au lait: latin-1 bytes\n", "-C", origin, "commit-tree", tree)
	run("", "-C", origin, "update-ref", "refs/heads/main", commit)

	var got []*fleetv1.FleetTarget
	fetch := func(repo string) *fleetv1.FleetTarget {
		p := NewPoller(Config{RepoURL: repo, MirrorDir: filepath.Join(t.TempDir(), "mirror"), Log: slog.New(slog.DiscardHandler),
			OnChange: func(tg *fleetv1.FleetTarget) { got = append(got, tg) }})
		p.Refetch(context.Background())
		if len(got) == 0 {
			t.Fatal("no target published")
		}
		tg := got[len(got)-1]
		if _, err := proto.Marshal(tg); err != nil {
			t.Fatalf("target %q cannot be sent: %v", tg, err)
		}
		return tg
	}
	if tg := fetch(origin); tg.GitCommit != commit || !strings.HasPrefix(tg.Message, "Caf") {
		t.Fatalf("target = %v", tg)
	}
	if tg := fetch(filepath.Join(dir, strings.Repeat("é", 200))); tg.Error == "" {
		t.Fatalf("a missing repository gave no error: %v", tg)
	}
}

// TestTargetHidesURLCredentials: a password or token in the repository or
// version.json URL never reaches readers through the target's source or
// error.
func TestTargetHidesURLCredentials(t *testing.T) {
	for _, cfg := range []Config{
		{RepoURL: "https://ci:s3cret-token@127.0.0.1:1/acme/fleet.git"},
		{VersionURL: "http://ci:s3cret-token@127.0.0.1:1/version.json"},
	} {
		cfg.MirrorDir = filepath.Join(t.TempDir(), "mirror")
		cfg.Log = slog.New(slog.DiscardHandler)
		var tg *fleetv1.FleetTarget
		cfg.OnChange = func(x *fleetv1.FleetTarget) { tg = x }
		NewPoller(cfg).Refetch(context.Background())
		if tg == nil || tg.Error == "" || tg.Source == "" {
			t.Fatalf("target = %v, want an error and a source", tg)
		}
		if strings.Contains(tg.Source+tg.Error, "s3cret") {
			t.Fatalf("the credential leaked: source %q, error %q", tg.Source, tg.Error)
		}
	}
}
