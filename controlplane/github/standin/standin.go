// Package standin is a small stand-in for the GitHub REST API, backed by a
// real bare git repository. It speaks the subset nixplane's pull-request
// client uses — list, get and merge pull requests and list their files — so
// `nixplane demo` can offer a pending flake-update PR without GitHub, and
// tests can exercise Merge & Deploy end to end. Merging is real git: the
// PR's head branch is merged into its base branch of the origin (a merge
// commit, or one squashed commit), and the base ref moves only if nobody
// moved it meanwhile.
package standin

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Config configures a [Server].
type Config struct {
	// Owner and Repo name the repository the API serves ("owner/repo").
	Owner, Repo string
	// Origin is the bare git repository behind it.
	Origin string
	// Token, when set, is the bearer token every request must carry.
	Token string
	// BaseURL is the server's own URL, used for html_url links; optional.
	BaseURL string
	Log     *slog.Logger
}

// PR is a pull request of the stand-in.
type PR struct {
	Number int
	Title  string
	Labels []string
	// Head and Base are branch names of the origin.
	Head, Base string
	Draft      bool
	// Open is false once merged or closed.
	Open      bool
	Merged    bool
	MergeSHA  string
	UpdatedAt time.Time
}

// Server answers GitHub REST API requests for one repository.
type Server struct {
	cfg Config
	log *slog.Logger

	gitMu sync.Mutex // serialises git writes to the origin
	mu    sync.Mutex
	prs   []*PR
	next  int
	fault func(*http.Request) (int, string)
	// requests counts the API requests served, by "METHOD path".
	requests map[string]int
}

// New returns a stand-in for the repository cfg names.
func New(cfg Config) (*Server, error) {
	if cfg.Owner == "" || cfg.Repo == "" {
		return nil, errors.New("standin: owner and repo are required")
	}
	if _, err := os.Stat(filepath.Join(cfg.Origin, "HEAD")); err != nil {
		return nil, fmt.Errorf("standin: %s is not a bare git repository: %w", cfg.Origin, err)
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	return &Server{cfg: cfg, log: cfg.Log, next: 1, requests: map[string]int{}}, nil
}

// SetFault installs f: when it returns a non-zero status for a request, the
// request is answered with that status and message instead. nil removes it.
func (s *Server) SetFault(f func(r *http.Request) (status int, message string)) {
	s.mu.Lock()
	s.fault = f
	s.mu.Unlock()
}

// Requests returns how many requests "METHOD /path" were served (the path
// without the query).
func (s *Server) Requests(methodPath string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.requests[methodPath]
}

// OpenPR opens a pull request from pr.Head into pr.Base (default "main")
// and returns its number. Both branches must exist in the origin.
func (s *Server) OpenPR(ctx context.Context, pr PR) (int, error) {
	if pr.Base == "" {
		pr.Base = "main"
	}
	for _, b := range []string{pr.Head, pr.Base} {
		if _, err := s.revParse(ctx, "refs/heads/"+b); err != nil {
			return 0, fmt.Errorf("standin: branch %q: %w", b, err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	pr.Number = s.next
	s.next++
	pr.Open, pr.Merged, pr.MergeSHA = true, false, ""
	if pr.UpdatedAt.IsZero() {
		pr.UpdatedAt = time.Now().UTC().Truncate(time.Second)
	}
	p := pr
	p.Labels = append([]string(nil), pr.Labels...)
	s.prs = append(s.prs, &p)
	return p.Number, nil
}

// ClosePR closes a pull request without merging it.
func (s *Server) ClosePR(number int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p := s.find(number); p != nil {
		p.Open = false
		p.UpdatedAt = time.Now().UTC().Truncate(time.Second)
	}
}

// PR returns a copy of a pull request.
func (s *Server) PR(number int) (PR, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.find(number)
	if p == nil {
		return PR{}, false
	}
	c := *p
	c.Labels = append([]string(nil), p.Labels...)
	return c, true
}

// OpenPRs returns the open pull requests.
func (s *Server) OpenPRs() []PR {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []PR
	for _, p := range s.prs {
		if p.Open {
			c := *p
			c.Labels = append([]string(nil), p.Labels...)
			out = append(out, c)
		}
	}
	return out
}

func (s *Server) find(number int) *PR {
	for _, p := range s.prs {
		if p.Number == number {
			return p
		}
	}
	return nil
}

// CommitFiles creates (or moves) branch to a new commit on top of from (a
// branch or commit; "" for a first commit) that writes files (path →
// content), without a work tree. It returns the new commit.
func (s *Server) CommitFiles(ctx context.Context, branch, from string, files map[string]string, message string) (string, error) {
	s.gitMu.Lock()
	defer s.gitMu.Unlock()
	var parent string
	if from != "" {
		var err error
		if parent, err = s.revParse(ctx, from+"^{commit}"); err != nil {
			return "", fmt.Errorf("standin: %q: %w", from, err)
		}
	}
	idx, err := os.CreateTemp("", "standin-index-")
	if err != nil {
		return "", err
	}
	idxPath := idx.Name()
	idx.Close()
	os.Remove(idxPath) // git wants to create it
	defer os.Remove(idxPath)
	env := []string{"GIT_INDEX_FILE=" + idxPath}
	readTree := []string{"read-tree", "--empty"}
	if parent != "" {
		readTree = []string{"read-tree", parent}
	}
	if _, err := s.git(ctx, env, nil, readTree...); err != nil {
		return "", err
	}
	for path, body := range files {
		blob, err := s.git(ctx, env, []byte(body), "hash-object", "-w", "--stdin")
		if err != nil {
			return "", err
		}
		if _, err := s.git(ctx, env, nil, "update-index", "--add", "--cacheinfo", "100644,"+blob+","+path); err != nil {
			return "", err
		}
	}
	tree, err := s.git(ctx, env, nil, "write-tree")
	if err != nil {
		return "", err
	}
	args := []string{"commit-tree", tree}
	if parent != "" {
		args = append(args, "-p", parent)
	}
	commit, err := s.git(ctx, nil, []byte(message), args...)
	if err != nil {
		return "", err
	}
	if _, err := s.git(ctx, nil, nil, "update-ref", "refs/heads/"+branch, commit); err != nil {
		return "", err
	}
	s.touch(branch)
	return commit, nil
}

// touch marks open PRs whose head is branch as updated.
func (s *Server) touch(branch string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.prs {
		if p.Open && p.Head == branch {
			p.UpdatedAt = time.Now().UTC().Truncate(time.Second)
		}
	}
}

// git runs git in the origin with extra environment and stdin; it returns
// trimmed stdout.
func (s *Server) git(ctx context.Context, env []string, stdin []byte, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "git", append([]string{"-C", s.cfg.Origin}, args...)...)
	cmd.Env = append(os.Environ(), "GIT_TERMINAL_PROMPT=0",
		"GIT_AUTHOR_NAME=nixplane stand-in", "GIT_AUTHOR_EMAIL=standin@nixplane.invalid",
		"GIT_COMMITTER_NAME=nixplane stand-in", "GIT_COMMITTER_EMAIL=standin@nixplane.invalid")
	cmd.Env = append(cmd.Env, env...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return strings.TrimSpace(string(out)), &gitError{args: args, err: err, stderr: strings.TrimSpace(stderr.String())}
	}
	return strings.TrimSpace(string(out)), nil
}

type gitError struct {
	args   []string
	err    error
	stderr string
}

func (e *gitError) Error() string {
	return fmt.Sprintf("git %s: %v: %s", e.args[0], e.err, e.stderr)
}

func (e *gitError) Unwrap() error { return e.err }

func (s *Server) revParse(ctx context.Context, rev string) (string, error) {
	return s.git(ctx, nil, nil, "rev-parse", "--verify", "--quiet", rev)
}

// mergeTree merges head into base without a work tree; it reports the tree
// and whether the merge is clean.
func (s *Server) mergeTree(ctx context.Context, base, head string) (tree string, clean bool, err error) {
	out, err := s.git(ctx, nil, nil, "merge-tree", "--write-tree", "--no-messages", base, head)
	var ge *gitError
	var ee *exec.ExitError
	if errors.As(err, &ge) && errors.As(ge.err, &ee) && ee.ExitCode() == 1 {
		return "", false, nil // conflicts
	}
	if err != nil {
		return "", false, err
	}
	tree, _, _ = strings.Cut(out, "\n")
	return tree, true, nil
}

// Handler returns the HTTP handler of the API.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	prefix := "/repos/" + s.cfg.Owner + "/" + s.cfg.Repo
	mux.HandleFunc("GET "+prefix+"/pulls", s.listPulls)
	mux.HandleFunc("GET "+prefix+"/pulls/{number}", s.getPull)
	mux.HandleFunc("GET "+prefix+"/pulls/{number}/files", s.listFiles)
	mux.HandleFunc("PUT "+prefix+"/pulls/{number}/merge", s.mergePull)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// GitHub Enterprise serves the API under /api/v3.
		if p, ok := strings.CutPrefix(r.URL.Path, "/api/v3"); ok {
			r2 := r.Clone(r.Context())
			r2.URL.Path = p
			r = r2
		}
		s.mu.Lock()
		s.requests[r.Method+" "+r.URL.Path]++
		fault := s.fault
		s.mu.Unlock()
		if s.cfg.Token != "" {
			got, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if subtle.ConstantTimeCompare([]byte(got), []byte(s.cfg.Token)) != 1 {
				writeError(w, http.StatusUnauthorized, "Bad credentials")
				return
			}
		}
		if fault != nil {
			if code, msg := fault(r); code != 0 {
				writeError(w, code, msg)
				return
			}
		}
		mux.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, map[string]any{"message": msg, "documentation_url": "https://docs.github.com/rest"})
}

type jsonLabel struct {
	Name string `json:"name"`
}

type jsonBranch struct {
	Ref string `json:"ref"`
	SHA string `json:"sha"`
}

type jsonPR struct {
	Number         int         `json:"number"`
	State          string      `json:"state"`
	Title          string      `json:"title"`
	HTMLURL        string      `json:"html_url"`
	Draft          bool        `json:"draft"`
	Labels         []jsonLabel `json:"labels"`
	UpdatedAt      time.Time   `json:"updated_at"`
	Merged         bool        `json:"merged"`
	Mergeable      *bool       `json:"mergeable,omitempty"`
	MergeableState string      `json:"mergeable_state,omitempty"`
	MergeCommitSHA string      `json:"merge_commit_sha,omitempty"`
	Head           jsonBranch  `json:"head"`
	Base           jsonBranch  `json:"base"`
}

func (s *Server) render(ctx context.Context, p PR, detail bool) jsonPR {
	j := jsonPR{Number: p.Number, State: "open", Title: p.Title, Draft: p.Draft, UpdatedAt: p.UpdatedAt, Merged: p.Merged,
		MergeCommitSHA: p.MergeSHA, Head: jsonBranch{Ref: p.Head}, Base: jsonBranch{Ref: p.Base}, Labels: []jsonLabel{}}
	base := s.cfg.BaseURL
	if base == "" {
		base = "http://standin.invalid"
	}
	j.HTMLURL = fmt.Sprintf("%s/%s/%s/pull/%d", strings.TrimRight(base, "/"), s.cfg.Owner, s.cfg.Repo, p.Number)
	if !p.Open {
		j.State = "closed"
	}
	for _, l := range p.Labels {
		j.Labels = append(j.Labels, jsonLabel{Name: l})
	}
	j.Head.SHA, _ = s.revParse(ctx, "refs/heads/"+p.Head)
	j.Base.SHA, _ = s.revParse(ctx, "refs/heads/"+p.Base)
	if detail && p.Open {
		_, clean, err := s.mergeTree(ctx, j.Base.SHA, j.Head.SHA)
		if err == nil {
			j.Mergeable = &clean
			j.MergeableState = "clean"
			if !clean {
				j.MergeableState = "dirty"
			}
			if p.Draft {
				j.MergeableState = "draft"
			}
		}
	}
	return j
}

func (s *Server) pull(w http.ResponseWriter, r *http.Request) (PR, bool) {
	n, err := strconv.Atoi(r.PathValue("number"))
	if err != nil {
		writeError(w, http.StatusNotFound, "Not Found")
		return PR{}, false
	}
	p, ok := s.PR(n)
	if !ok {
		writeError(w, http.StatusNotFound, "Not Found")
	}
	return p, ok
}

func (s *Server) listPulls(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	state := q.Get("state")
	if state == "" {
		state = "open"
	}
	s.mu.Lock()
	var prs []PR
	for i := len(s.prs) - 1; i >= 0; i-- { // newest first, like GitHub's default sort
		p := s.prs[i]
		if (state == "open" && !p.Open) || (state == "closed" && p.Open) {
			continue
		}
		if b := q.Get("base"); b != "" && p.Base != b {
			continue
		}
		prs = append(prs, *p)
	}
	s.mu.Unlock()
	out := []jsonPR{}
	for _, p := range prs {
		out = append(out, s.render(r.Context(), p, false))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) getPull(w http.ResponseWriter, r *http.Request) {
	p, ok := s.pull(w, r)
	if !ok {
		return
	}
	writeJSON(w, http.StatusOK, s.render(r.Context(), p, true))
}

func (s *Server) listFiles(w http.ResponseWriter, r *http.Request) {
	p, ok := s.pull(w, r)
	if !ok {
		return
	}
	out, err := s.git(r.Context(), nil, nil, "diff", "--name-status", "--no-renames", "refs/heads/"+p.Base+"...refs/heads/"+p.Head)
	if err != nil {
		s.log.Warn("standin: list files", "pr", p.Number, "err", err)
		writeError(w, http.StatusInternalServerError, "could not compare the branches")
		return
	}
	type file struct {
		Filename string `json:"filename"`
		Status   string `json:"status"`
	}
	files := []file{}
	names := map[string]string{"A": "added", "M": "modified", "D": "removed"}
	for _, line := range strings.Split(out, "\n") {
		st, name, ok := strings.Cut(line, "\t")
		if !ok {
			continue
		}
		status := names[st]
		if status == "" {
			status = "changed"
		}
		files = append(files, file{Filename: name, Status: status})
	}
	writeJSON(w, http.StatusOK, files)
}

var shaRE = regexp.MustCompile(`^[0-9a-f]{40}$`)

func (s *Server) mergePull(w http.ResponseWriter, r *http.Request) {
	p, ok := s.pull(w, r)
	if !ok {
		return
	}
	var body struct {
		CommitTitle   string  `json:"commit_title"`
		CommitMessage *string `json:"commit_message"`
		SHA           string  `json:"sha"`
		MergeMethod   string  `json:"merge_method"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&body); err != nil {
		writeError(w, http.StatusBadRequest, "Problems parsing JSON")
		return
	}
	if body.SHA != "" && !shaRE.MatchString(body.SHA) {
		writeError(w, http.StatusUnprocessableEntity, "sha is not a commit id")
		return
	}
	method := body.MergeMethod
	if method == "" {
		method = "merge"
	}
	if method != "merge" && method != "squash" {
		writeError(w, http.StatusUnprocessableEntity, "merge method "+method+" is not supported here")
		return
	}
	if !p.Open {
		writeError(w, http.StatusMethodNotAllowed, "Pull Request is not mergeable")
		return
	}
	if p.Draft {
		writeError(w, http.StatusMethodNotAllowed, "Pull Request is still a draft")
		return
	}
	ctx := r.Context()
	s.gitMu.Lock()
	defer s.gitMu.Unlock()
	head, err1 := s.revParse(ctx, "refs/heads/"+p.Head)
	base, err2 := s.revParse(ctx, "refs/heads/"+p.Base)
	if err1 != nil || err2 != nil {
		writeError(w, http.StatusUnprocessableEntity, "Head or base branch is missing")
		return
	}
	if body.SHA != "" && body.SHA != head {
		writeError(w, http.StatusConflict, "Head branch was modified. Review and try the merge again.")
		return
	}
	tree, clean, err := s.mergeTree(ctx, base, head)
	if err != nil {
		s.log.Warn("standin: merge", "pr", p.Number, "err", err)
		writeError(w, http.StatusInternalServerError, "merge failed")
		return
	}
	if !clean {
		writeError(w, http.StatusMethodNotAllowed, "Pull Request is not mergeable")
		return
	}
	title := body.CommitTitle
	if title == "" {
		title = fmt.Sprintf("Merge pull request #%d from %s/%s", p.Number, s.cfg.Owner, p.Head)
		if method == "squash" {
			title = fmt.Sprintf("%s (#%d)", p.Title, p.Number)
		}
	}
	msg := title + "\n"
	if body.CommitMessage != nil && *body.CommitMessage != "" {
		msg += "\n" + *body.CommitMessage + "\n"
	} else if method == "merge" {
		msg += "\n" + p.Title + "\n"
	}
	args := []string{"commit-tree", tree, "-p", base}
	if method == "merge" {
		args = append(args, "-p", head)
	}
	commit, err := s.git(ctx, nil, []byte(msg), args...)
	if err == nil {
		// Moves the base only if it is still where the merge started.
		_, err = s.git(ctx, nil, nil, "update-ref", "refs/heads/"+p.Base, commit, base)
	}
	if err != nil {
		s.log.Warn("standin: merge", "pr", p.Number, "err", err)
		writeError(w, http.StatusConflict, "Base branch was modified. Review and try the merge again.")
		return
	}
	s.mu.Lock()
	if q := s.find(p.Number); q != nil {
		q.Open, q.Merged, q.MergeSHA = false, true, commit
		q.UpdatedAt = time.Now().UTC().Truncate(time.Second)
	}
	s.mu.Unlock()
	s.log.Info("standin: merged pull request", "pr", p.Number, "base", p.Base, "commit", commit)
	writeJSON(w, http.StatusOK, map[string]any{"sha": commit, "merged": true, "message": "Pull Request successfully merged"})
}
