package github

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/nixplane/nixplane/controlplane/github/standin"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

var quietLog = slog.New(slog.DiscardHandler)

const testToken = "ghp_test_token"

// fixture is a bare origin with a main branch, the stand-in API over it and
// a poller against the stand-in.
type fixture struct {
	t       *testing.T
	ctx     context.Context
	origin  string
	api     *standin.Server
	srv     *httptest.Server
	mu      sync.Mutex
	changes []*fleetv1.PendingPR
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		t.Fatalf("git is required: %v", err)
	}
	f := &fixture{t: t, ctx: context.Background(), origin: filepath.Join(t.TempDir(), "fleet.git")}
	if out, err := exec.Command("git", "init", "--quiet", "--bare", "--initial-branch=main", f.origin).CombinedOutput(); err != nil {
		t.Fatalf("git init: %v: %s", err, out)
	}
	var err error
	f.api, err = standin.New(standin.Config{Owner: "acme", Repo: "fleet", Origin: f.origin, Token: testToken, Log: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	f.srv = httptest.NewServer(f.api.Handler())
	t.Cleanup(f.srv.Close)
	f.commit("main", "", map[string]string{"flake.lock": lock(1), "README.md": "fleet\n"}, "Initial fleet")
	return f
}

func lock(n int) string {
	return "{\n  \"nodes\": { \"nixpkgs\": { \"locked\": { \"rev\": \"" + strings.Repeat(string(rune('a'+n)), 40) + "\" } } },\n  \"version\": 7\n}\n"
}

func (f *fixture) commit(branch, from string, files map[string]string, msg string) string {
	f.t.Helper()
	sha, err := f.api.CommitFiles(f.ctx, branch, from, files, msg)
	if err != nil {
		f.t.Fatal(err)
	}
	return sha
}

func (f *fixture) open(pr standin.PR) int {
	f.t.Helper()
	n, err := f.api.OpenPR(f.ctx, pr)
	if err != nil {
		f.t.Fatal(err)
	}
	return n
}

func (f *fixture) poller(mod func(*Config)) *Poller {
	f.t.Helper()
	cfg := Config{Repo: "acme/fleet", Token: testToken, APIURL: f.srv.URL, Log: quietLog, OnChange: func(pr *fleetv1.PendingPR) {
		f.mu.Lock()
		f.changes = append(f.changes, pr)
		f.mu.Unlock()
	}}
	if mod != nil {
		mod(&cfg)
	}
	p, err := New(cfg)
	if err != nil {
		f.t.Fatal(err)
	}
	return p
}

func (f *fixture) changeLog() []*fleetv1.PendingPR {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*fleetv1.PendingPR(nil), f.changes...)
}

func TestPollerFindsTheFlakeUpdateAndIgnoresOthers(t *testing.T) {
	f := newFixture(t)
	p := f.poller(nil)

	// Nothing open yet: none, reported once.
	if pr, err := p.Poll(f.ctx); err != nil || pr != nil {
		t.Fatalf("empty repository: got %v, %v", pr, err)
	}

	f.commit("docs", "main", map[string]string{"README.md": "fleet, fixed\n"}, "docs: typo")
	f.open(standin.PR{Title: "docs: fix a typo", Head: "docs"})
	f.commit("ci", "main", map[string]string{".github/workflows/ci.yml": "on: push\n"}, "ci: bump action")
	f.open(standin.PR{Title: "Bump actions/checkout", Labels: []string{"dependencies"}, Head: "ci"})
	f.commit("draft-lock", "main", map[string]string{"flake.lock": lock(2)}, "flake.lock: Update")
	f.open(standin.PR{Title: "flake.lock: Update", Head: "draft-lock", Draft: true})
	f.commit("staging", "main", map[string]string{"README.md": "staging\n"}, "staging")
	f.commit("staging-lock", "staging", map[string]string{"flake.lock": lock(3)}, "flake.lock: Update")
	f.open(standin.PR{Title: "Update flake.lock", Head: "staging-lock", Base: "staging"})
	f.commit("update-flake-lock", "main", map[string]string{"flake.lock": lock(4)}, "flake.lock: Update")
	want := f.open(standin.PR{Title: "chore: bump inputs", Labels: []string{"Flake-Update"}, Head: "update-flake-lock"})

	pr, err := p.Poll(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if pr.GetNumber() != int32(want) || pr.Title != "chore: bump inputs" || !pr.Mergeable || pr.UpdatedAt == nil ||
		!strings.HasSuffix(pr.Url, "/acme/fleet/pull/"+strconv.Itoa(want)) {
		t.Fatalf("found %v, want PR #%d, mergeable, with URL and time", pr, want)
	}
	// Polling again without change reports nothing new.
	if _, err := p.Poll(f.ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.changeLog(); len(got) != 2 || got[0] != nil || got[1].GetNumber() != int32(want) {
		t.Fatalf("changes = %v, want [nil, #%d]", got, want)
	}

	// Closed: nothing pending any more.
	f.api.ClosePR(want)
	if pr, err := p.Poll(f.ctx); err != nil || pr != nil {
		t.Fatalf("after close: got %v, %v", pr, err)
	}
	if got := f.changeLog(); len(got) != 3 || got[2] != nil {
		t.Fatalf("changes = %v, want a final nil", got)
	}
}

func TestPollerNewestCandidateWinsAndConflictsAreNotMergeable(t *testing.T) {
	f := newFixture(t)
	f.commit("old-update", "main", map[string]string{"flake.lock": lock(2)}, "flake.lock: Update")
	f.open(standin.PR{Title: "flake.lock: Update", Head: "old-update"})
	f.commit("new-update", "main", map[string]string{"flake.lock": lock(3)}, "flake.lock: Update")
	newer := f.open(standin.PR{Title: "Update flake inputs", Head: "new-update"})
	// main moves its lock too: the newer PR now conflicts.
	f.commit("main", "main", map[string]string{"flake.lock": lock(5)}, "flake.lock: by hand")

	pr, err := f.poller(nil).Poll(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if pr.GetNumber() != int32(newer) {
		t.Fatalf("found #%d, want the newest #%d", pr.GetNumber(), newer)
	}
	if pr.Mergeable {
		t.Fatal("a conflicting PR is reported mergeable")
	}
}

func TestPollerRuleIsConfigurable(t *testing.T) {
	f := newFixture(t)
	f.commit("bump", "main", map[string]string{"flake.lock": lock(2)}, "bump")
	n := f.open(standin.PR{Title: "weekly bump", Labels: []string{"nix"}, Head: "bump"})

	if pr, err := f.poller(nil).Poll(f.ctx); err != nil || pr != nil {
		t.Fatalf("default rule: got %v, %v; want none", pr, err)
	}
	rule, err := ParseRule("nix", "-")
	if err != nil {
		t.Fatal(err)
	}
	pr, err := f.poller(func(c *Config) { c.Rule = rule }).Poll(f.ctx)
	if err != nil || pr.GetNumber() != int32(n) {
		t.Fatalf("label rule: got %v, %v; want #%d", pr, err, n)
	}
	rule, _ = ParseRule("-", "^weekly")
	if pr, err := f.poller(func(c *Config) { c.Rule = rule }).Poll(f.ctx); err != nil || pr.GetNumber() != int32(n) {
		t.Fatalf("title rule: got %v, %v; want #%d", pr, err, n)
	}
}

func TestPollerKeepsTheLastPROnErrors(t *testing.T) {
	f := newFixture(t)
	f.commit("u", "main", map[string]string{"flake.lock": lock(2)}, "flake.lock: Update")
	n := f.open(standin.PR{Title: "flake.lock: Update", Head: "u"})
	p := f.poller(nil)
	if _, err := p.Poll(f.ctx); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		code int
		want error
	}{
		{http.StatusBadGateway, ErrUnavailable},
		{http.StatusUnauthorized, ErrUnauthorized},
		{http.StatusNotFound, ErrNotFound},
	} {
		f.api.SetFault(func(*http.Request) (int, string) { return tc.code, "injected" })
		pr, err := p.Poll(f.ctx)
		if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), "injected") {
			t.Fatalf("HTTP %d: err = %v, want %v with GitHub's message", tc.code, err, tc.want)
		}
		if pr.GetNumber() != int32(n) || p.Pending().GetNumber() != int32(n) {
			t.Fatalf("HTTP %d: the known PR was dropped: %v", tc.code, pr)
		}
	}
	if h := p.Health(); h.Failures != 3 || h.LastError == nil || h.LastSuccess.IsZero() {
		t.Fatalf("health = %+v, want 3 failures after a success", h)
	}
	if got := f.changeLog(); len(got) != 1 {
		t.Fatalf("errors were reported as changes: %v", got)
	}
	f.api.SetFault(nil)
	if _, err := p.Poll(f.ctx); err != nil {
		t.Fatal(err)
	}
	if h := p.Health(); h.Failures != 0 || h.LastError != nil {
		t.Fatalf("health after recovery = %+v", h)
	}
}

func TestWrongTokenIsUnauthorized(t *testing.T) {
	f := newFixture(t)
	_, err := f.poller(func(c *Config) { c.Token = "wrong" }).Poll(f.ctx)
	if !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("err = %v, want ErrUnauthorized", err)
	}
}

func TestEnterpriseAPIPath(t *testing.T) {
	f := newFixture(t)
	f.commit("u", "main", map[string]string{"flake.lock": lock(2)}, "flake.lock: Update")
	n := f.open(standin.PR{Title: "flake.lock: Update", Head: "u"})
	pr, err := f.poller(func(c *Config) { c.APIURL = f.srv.URL + "/api/v3" }).Poll(f.ctx)
	if err != nil || pr.GetNumber() != int32(n) {
		t.Fatalf("got %v, %v", pr, err)
	}
	if f.api.Requests("GET /repos/acme/fleet/pulls") == 0 {
		t.Fatal("the stand-in saw no list request")
	}
}

func TestMergeIsRealGitAndChecksState(t *testing.T) {
	f := newFixture(t)
	f.commit("u", "main", map[string]string{"flake.lock": lock(2)}, "flake.lock: Update")
	n := f.open(standin.PR{Title: "flake.lock: Update", Head: "u"})
	p := f.poller(nil)
	if _, err := p.Poll(f.ctx); err != nil {
		t.Fatal(err)
	}
	res, err := p.Merge(f.ctx, int32(n), "alice")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("git", "-C", f.origin, "rev-parse", "main").Output()
	if err != nil || strings.TrimSpace(string(out)) != res.SHA {
		t.Fatalf("main = %s (%v), want the merge commit %s", out, err, res.SHA)
	}
	got, err := exec.Command("git", "-C", f.origin, "show", "main:flake.lock").Output()
	if err != nil || string(got) != lock(2) {
		t.Fatalf("main's flake.lock after merge = %q (%v)", got, err)
	}
	if p.Pending() != nil {
		t.Fatal("the merged PR is still pending")
	}
	if _, err := p.Merge(f.ctx, int32(n), "alice"); !errors.Is(err, ErrNotMergeable) {
		t.Fatalf("second merge: err = %v, want ErrNotMergeable", err)
	}
	if _, err := p.Merge(f.ctx, 999, "alice"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown PR: err = %v, want ErrNotFound", err)
	}
}

func TestParseRule(t *testing.T) {
	for _, tc := range []struct {
		labels, title string
		ok            bool
		match         []string // titles that match
		labelsWant    int
	}{
		{"", "", true, []string{"flake.lock: Update", "Update flake inputs", "chore: flake update"}, len(DefaultLabels)},
		{"a, b ,,c", "", true, nil, 3},
		{"-", "^bump", true, []string{"bump nixpkgs"}, 0},
		{"x", "-", true, nil, 1},
		{"-", "-", false, nil, 0},
		{"", "(", false, nil, 0},
	} {
		r, err := ParseRule(tc.labels, tc.title)
		if (err == nil) != tc.ok {
			t.Errorf("ParseRule(%q, %q) err = %v, want ok=%v", tc.labels, tc.title, err, tc.ok)
			continue
		}
		if !tc.ok {
			continue
		}
		if len(r.Labels) != tc.labelsWant {
			t.Errorf("ParseRule(%q, %q) labels = %v", tc.labels, tc.title, r.Labels)
		}
		for _, m := range tc.match {
			if r.Title == nil || !r.Title.MatchString(m) {
				t.Errorf("ParseRule(%q, %q) does not match %q", tc.labels, tc.title, m)
			}
		}
	}
	if r := DefaultRule(); r.Title.MatchString("docs: fix typo") {
		t.Error("the default title pattern matches an unrelated PR")
	}
}

func TestReadToken(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	if tok, err := ReadToken(write("ok", "\n  ghp_abc  \n")); err != nil || tok != "ghp_abc" {
		t.Fatalf("got %q, %v", tok, err)
	}
	for name, path := range map[string]string{
		"missing": filepath.Join(dir, "nope"),
		"empty":   write("empty", " \n\n"),
		"spaces":  write("spaces", "ghp abc\n"),
		"none":    "",
	} {
		if _, err := ReadToken(path); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	for name, cfg := range map[string]Config{
		"repo":  {Repo: "no-slash", Token: "t"},
		"token": {Repo: "a/b"},
		"url":   {Repo: "a/b", Token: "t", APIURL: "ftp://x"},
		// The token must not cross a network in clear text.
		"plain http": {Repo: "a/b", Token: "t", APIURL: "http://github.example.com/api/v3/"},
		"method":     {Repo: "a/b", Token: "t", MergeMethod: "octopus"},
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	for _, u := range []string{"https://github.example.com/api/v3/", "http://127.0.0.1:8081", "http://localhost:1/", "http://[::1]:2"} {
		if _, err := New(Config{Repo: "a/b", Token: "t", APIURL: u}); err != nil {
			t.Errorf("%s: %v", u, err)
		}
	}
}

func TestPollerAsksForFilesOncePerHeadCommit(t *testing.T) {
	f := newFixture(t)
	f.commit("u", "main", map[string]string{"flake.lock": lock(2)}, "flake.lock: Update")
	n := f.open(standin.PR{Title: "flake.lock: Update", Head: "u"})
	p := f.poller(nil)
	files := "GET /repos/acme/fleet/pulls/" + strconv.Itoa(n) + "/files"
	for range 3 {
		if pr, err := p.Poll(f.ctx); err != nil || pr.GetNumber() != int32(n) {
			t.Fatalf("got %v, %v", pr, err)
		}
	}
	if got := f.api.Requests(files); got != 1 {
		t.Fatalf("files listed %d times for one head commit, want 1", got)
	}
	// A new push to the PR is looked at again.
	f.commit("u", "u", map[string]string{"flake.lock": lock(3)}, "flake.lock: Update again")
	if _, err := p.Poll(f.ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.api.Requests(files); got != 2 {
		t.Fatalf("files listed %d times after a push, want 2", got)
	}
}

// TestMergeRefusesAHeadThatMovedSinceTheCheck: a push to the PR after the
// poll checked it (say, a file beside flake.lock) is not merged unseen; the
// next poll checks the new head, and then it merges. A PR that is not the
// pending flake update is never merged.
func TestMergeRefusesAHeadThatMovedSinceTheCheck(t *testing.T) {
	f := newFixture(t)
	f.commit("u", "main", map[string]string{"flake.lock": lock(2)}, "flake.lock: Update")
	n := f.open(standin.PR{Title: "flake.lock: Update", Head: "u"})
	f.commit("docs", "main", map[string]string{"README.md": "docs\n"}, "docs")
	other := f.open(standin.PR{Title: "docs: more", Head: "docs"})
	p := f.poller(nil)
	if pr, err := p.Poll(f.ctx); err != nil || pr.GetNumber() != int32(n) {
		t.Fatalf("poll: %v, %v", pr, err)
	}
	before := f.api.Requests("PUT /repos/acme/fleet/pulls/" + strconv.Itoa(n) + "/merge")

	if _, err := p.Merge(f.ctx, int32(other), "alice"); !errors.Is(err, ErrNotMergeable) || !strings.Contains(err.Error(), "not the pending") {
		t.Fatalf("merge of another PR: err = %v, want ErrNotMergeable naming the pending PR", err)
	}
	f.commit("u", "u", map[string]string{"flake.lock": lock(3)}, "flake.lock: Update again")
	_, err := p.Merge(f.ctx, int32(n), "alice")
	if !errors.Is(err, ErrNotMergeable) || !strings.Contains(err.Error(), "moved") {
		t.Fatalf("merge after the head moved: err = %v, want ErrNotMergeable saying the head moved", err)
	}
	if got := f.api.Requests("PUT /repos/acme/fleet/pulls/" + strconv.Itoa(n) + "/merge"); got != before {
		t.Fatalf("a merge was attempted for an unchecked head (%d requests)", got-before)
	}
	if out, err := exec.Command("git", "-C", f.origin, "show", "main:flake.lock").Output(); err != nil || string(out) != lock(1) {
		t.Fatalf("main changed: %q %v", out, err)
	}
	// Checked again, the new head is the pending update and merges.
	if _, err := p.Poll(f.ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Merge(f.ctx, int32(n), "alice"); err != nil {
		t.Fatalf("merge after a new check: %v", err)
	}
}

// TestLockUpdateThatCarriesCodeIsNotPending: a PR that changes flake.lock
// and other files is not a flake-update PR — one click must not merge and
// deploy code — while lock files of sub-flakes may come along.
func TestLockUpdateThatCarriesCodeIsNotPending(t *testing.T) {
	f := newFixture(t)
	f.commit("mixed", "main", map[string]string{"flake.lock": lock(2), "hosts/web/extra.nix": "{ }\n"}, "flake.lock: Update")
	f.open(standin.PR{Title: "flake.lock: Update", Head: "mixed"})
	p := f.poller(nil)
	if pr, err := p.Poll(f.ctx); err != nil || pr != nil {
		t.Fatalf("poll with only a mixed PR: %v, %v; want none pending", pr, err)
	}
	f.commit("sub", "main", map[string]string{"flake.lock": lock(3), "tools/flake.lock": lock(4)}, "flake.lock: Update")
	n := f.open(standin.PR{Title: "flake.lock: Update", Head: "sub"})
	if pr, err := p.Poll(f.ctx); err != nil || pr.GetNumber() != int32(n) {
		t.Fatalf("poll with a root and sub-flake lock update: %v, %v; want #%d", pr, err, n)
	}
	f.commit("subonly", "main", map[string]string{"tools/flake.lock": lock(5)}, "flake.lock: Update tools")
	f.open(standin.PR{Title: "flake.lock: Update tools", Head: "subonly"})
	if pr, err := p.Poll(f.ctx); err != nil || pr.GetNumber() != int32(n) {
		t.Fatalf("a sub-flake-only update displaced #%d: %v, %v", n, pr, err)
	}
}
