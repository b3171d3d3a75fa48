// Package github finds the pending flake-update pull request of the fleet
// repository on GitHub (or GitHub Enterprise, or any server speaking the
// same REST API) and merges it.
//
// A [Poller] looks for the open pull request that updates flake.lock, by a
// rule that is explicit and configurable ([Rule]): it targets the deployed
// branch, is not a draft, carries one of the rule's labels or has a title
// matching its pattern, and changes flake.lock and nothing but flake.lock
// files (a PR that carries code is not an input update). The newest such PR
// wins. Each change of the pending PR is handed to a callback (the hub, which
// publishes PendingPRChanged). A failing poll keeps the last known PR, is
// logged and is kept as [Poller.Health]: a GitHub outage never looks like
// "no PR pending".
//
// A [Deployer] implements Merge & Deploy on top of it.
package github

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	gh "github.com/google/go-github/v92/github"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// DefaultLabels are the labels that mark a flake-update PR by default:
// Dependabot and Renovate use "dependencies", the update-flake-lock action
// is usually configured with "flake-update" or "automated".
var DefaultLabels = []string{"dependencies", "flake-update", "automated"}

// DefaultTitlePattern matches the titles of flake-update PRs by default:
// "flake.lock: Update", "Update flake.lock", "chore: update flake inputs".
const DefaultTitlePattern = `(?i)flake\.lock|update flake|flake update`

// LockFile is the file a flake-update PR must change.
const LockFile = "flake.lock"

// Rule says which open pull request is the pending flake update.
type Rule struct {
	// Labels: a PR carrying any of them is a candidate (case-insensitive).
	Labels []string
	// Title: a PR whose title matches is a candidate.
	Title *regexp.Regexp
}

// DefaultRule is [DefaultLabels] or [DefaultTitlePattern].
func DefaultRule() Rule {
	return Rule{Labels: slices.Clone(DefaultLabels), Title: regexp.MustCompile(DefaultTitlePattern)}
}

// ParseRule builds a rule from a comma-separated label list and a title
// regular expression; empty values take the defaults, "-" disables one.
func ParseRule(labels, title string) (Rule, error) {
	r := DefaultRule()
	switch strings.TrimSpace(labels) {
	case "":
	case "-":
		r.Labels = nil
	default:
		r.Labels = nil
		for _, l := range strings.Split(labels, ",") {
			if l = strings.TrimSpace(l); l != "" {
				r.Labels = append(r.Labels, l)
			}
		}
	}
	switch strings.TrimSpace(title) {
	case "":
	case "-":
		r.Title = nil
	default:
		re, err := regexp.Compile(title)
		if err != nil {
			return Rule{}, fmt.Errorf("PR title pattern: %w", err)
		}
		r.Title = re
	}
	if len(r.Labels) == 0 && r.Title == nil {
		return Rule{}, errors.New("the PR rule needs labels or a title pattern")
	}
	return r, nil
}

// Candidate reports whether pr may be the flake update by label or title
// (the flake.lock check is separate: it needs another request).
func (r Rule) Candidate(pr *gh.PullRequest) bool {
	for _, l := range pr.Labels {
		for _, want := range r.Labels {
			if strings.EqualFold(l.GetName(), want) {
				return true
			}
		}
	}
	return r.Title != nil && r.Title.MatchString(pr.GetTitle())
}

// String describes the rule for logs and errors.
func (r Rule) String() string {
	var parts []string
	if len(r.Labels) > 0 {
		parts = append(parts, "label in ["+strings.Join(r.Labels, ", ")+"]")
	}
	if r.Title != nil {
		parts = append(parts, "title matches "+r.Title.String())
	}
	return strings.Join(parts, " or ") + ", changing " + LockFile
}

// Config configures a [Poller].
type Config struct {
	// Repo is "owner/name".
	Repo string
	// Token authenticates to the API (a fine-grained token with pull
	// requests read/write and contents write is enough).
	Token string
	// APIURL is the REST API base, e.g. https://github.example.com/api/v3/;
	// empty means api.github.com.
	APIURL string
	// Base is the branch PRs must target (the deployed branch; default main).
	Base string
	// Rule picks the flake-update PR; zero means [DefaultRule].
	Rule Rule
	// MergeMethod is merge, squash or rebase (default merge).
	MergeMethod string
	// Interval between polls (default 60s); Timeout bounds one poll or one
	// merge (default 20s).
	Interval, Timeout time.Duration
	// OnChange receives the pending PR (nil: none) whenever it changes.
	OnChange func(*fleetv1.PendingPR)
	// OnHealth receives the poll health after every poll, failed or not
	// (not after a shutdown cancelled it).
	OnHealth func(Health)
	// HTTPClient is the client to use; nil means one with Timeout.
	HTTPClient *http.Client
	Log        *slog.Logger
}

var repoRE = regexp.MustCompile(`^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}$`)

// ReadToken reads a token file: the first non-empty line, trimmed. An
// unreadable or empty file is an error that names the file.
func ReadToken(path string) (string, error) {
	if path == "" {
		return "", errors.New("no GitHub token file given (--github-token-file)")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read GitHub token file: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if line = strings.TrimSpace(line); line != "" {
			if strings.ContainsAny(line, " \t") {
				return "", fmt.Errorf("GitHub token file %s: the token contains white space", path)
			}
			return line, nil
		}
	}
	return "", fmt.Errorf("GitHub token file %s is empty", path)
}

// Health is the outcome of the latest polls, for operators.
type Health struct {
	// LastSuccess is when a poll last succeeded (zero: never).
	LastSuccess time.Time
	// LastError is the latest poll's error, nil after a success.
	LastError error
	// Failures counts polls failed in a row.
	Failures int
}

// Poller polls GitHub for the pending flake-update PR.
type Poller struct {
	cfg          Config
	owner, name  string
	client       *gh.Client
	wake         chan struct{}
	pollMu       sync.Mutex // one poll at a time
	mu           sync.Mutex
	pr           *fleetv1.PendingPR
	prHead       string
	health       Health
	everReported bool
	// recheck: GitHub had not computed the PR's mergeability yet.
	recheck bool
	// lockChange caches whether a PR head changes flake.lock, by
	// "number@head"; it is rebuilt from the candidates of each poll.
	lockChange map[string]bool
}

// New validates cfg and returns a poller; Run starts it.
func New(cfg Config) (*Poller, error) {
	if !repoRE.MatchString(cfg.Repo) {
		return nil, fmt.Errorf("GitHub repository %q is not owner/name", cfg.Repo)
	}
	if cfg.Token == "" {
		return nil, errors.New("no GitHub token")
	}
	if cfg.Base == "" {
		cfg.Base = "main"
	}
	if len(cfg.Rule.Labels) == 0 && cfg.Rule.Title == nil {
		cfg.Rule = DefaultRule()
	}
	switch cfg.MergeMethod {
	case "":
		cfg.MergeMethod = "merge"
	case "merge", "squash", "rebase":
	default:
		return nil, fmt.Errorf("merge method %q: want merge, squash or rebase", cfg.MergeMethod)
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 60 * time.Second
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 20 * time.Second
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: cfg.Timeout}
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	opts := []gh.ClientOptionsFunc{gh.WithHTTPClient(cfg.HTTPClient), gh.WithAuthToken(cfg.Token), gh.WithUserAgent("nixplane")}
	if cfg.APIURL != "" {
		u, err := url.Parse(cfg.APIURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("GitHub API URL %q is not an http(s) URL", cfg.APIURL)
		}
		if u.Scheme == "http" && !loopback(u.Hostname()) {
			// The token would cross the network readable by anyone on the way.
			return nil, fmt.Errorf("GitHub API URL %q: use https (plain http only to this machine)", cfg.APIURL)
		}
		base := cfg.APIURL
		if !strings.HasSuffix(base, "/") {
			base += "/"
		}
		opts = append(opts, gh.WithURLs(&base, &base))
	}
	client, err := gh.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("GitHub client: %w", err)
	}
	owner, name, _ := strings.Cut(cfg.Repo, "/")
	return &Poller{cfg: cfg, owner: owner, name: name, client: client, wake: make(chan struct{}, 1)}, nil
}

// loopback reports whether host names this machine.
func loopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Repo returns "owner/name".
func (p *Poller) Repo() string { return p.cfg.Repo }

// Run polls until ctx ends; [Poller.Wake] polls early.
func (p *Poller) Run(ctx context.Context) {
	t := time.NewTicker(p.cfg.Interval)
	defer t.Stop()
	for {
		_, _ = p.Poll(ctx)
		var soon <-chan time.Time
		p.mu.Lock()
		if p.recheck && p.cfg.Interval > RecheckAfter {
			soon = time.After(RecheckAfter) // once per poll, not a hot loop
		}
		p.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-soon:
		case <-p.wake:
		}
	}
}

// RecheckAfter is how soon a PR whose mergeability GitHub was still
// computing is looked at again.
const RecheckAfter = 5 * time.Second

// Wake asks Run to poll now.
func (p *Poller) Wake() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// Pending returns the last known pending PR (nil: none).
func (p *Poller) Pending() *fleetv1.PendingPR {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pr
}

// Health returns the outcome of the latest polls.
func (p *Poller) Health() Health {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.health
}

// Poll looks for the pending PR once and reports changes. On an error the
// last known PR stays, the error is logged and returned.
func (p *Poller) Poll(ctx context.Context) (*fleetv1.PendingPR, error) {
	p.pollMu.Lock()
	defer p.pollMu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	pr, head, err := p.find(ctx)
	if err != nil {
		if errors.Is(context.Cause(ctx), context.Canceled) {
			return p.Pending(), err // shutting down
		}
		p.mu.Lock()
		p.health.LastError = err
		p.health.Failures++
		n, last := p.health.Failures, p.pr
		p.mu.Unlock()
		attrs := []any{"repo", p.cfg.Repo, "failures_in_a_row", n, "err", err}
		if last != nil {
			attrs = append(attrs, "keeping_pr", last.Number)
		}
		level := slog.LevelWarn
		if errors.Is(err, ErrUnauthorized) {
			level = slog.LevelError
		}
		p.cfg.Log.Log(ctx, level, "poll GitHub for the flake-update PR", attrs...)
		p.reportHealth()
		return last, err
	}
	p.set(pr, head)
	p.reportHealth()
	return pr, nil
}

// reportHealth hands the current health to OnHealth.
func (p *Poller) reportHealth() {
	if p.cfg.OnHealth != nil {
		p.cfg.OnHealth(p.Health())
	}
}

// set installs pr and reports it when it changed (or was never reported).
func (p *Poller) set(pr *fleetv1.PendingPR, head string) {
	p.mu.Lock()
	recovered := p.health.Failures > 0
	p.health = Health{LastSuccess: time.Now()}
	changed := !p.everReported || !proto.Equal(p.pr, pr)
	p.pr, p.prHead, p.everReported = pr, head, true
	p.mu.Unlock()
	if recovered {
		p.cfg.Log.Info("GitHub polls succeed again", "repo", p.cfg.Repo)
	}
	if !changed {
		return
	}
	if pr != nil {
		p.cfg.Log.Info("pending flake-update PR", "repo", p.cfg.Repo, "pr", pr.Number, "title", pr.Title, "mergeable", pr.Mergeable)
	} else {
		p.cfg.Log.Info("no pending flake-update PR", "repo", p.cfg.Repo, "rule", p.cfg.Rule.String())
	}
	if p.cfg.OnChange != nil {
		p.cfg.OnChange(pr)
	}
}

// forget drops the pending PR at once (after it was merged), without
// waiting for the next poll.
func (p *Poller) forget(number int32) {
	p.mu.Lock()
	match := p.pr != nil && p.pr.Number == number
	p.mu.Unlock()
	if match {
		p.set(nil, "")
	}
	p.Wake()
}

// find returns the pending PR and its head commit, or nil.
func (p *Poller) find(ctx context.Context) (*fleetv1.PendingPR, string, error) {
	var candidates []*gh.PullRequest
	opt := &gh.PullRequestListOptions{State: "open", Base: p.cfg.Base, Sort: "updated", Direction: "desc", ListOptions: gh.ListOptions{PerPage: 100}}
	for page := 0; page < 10; page++ {
		prs, resp, err := p.client.PullRequests.List(ctx, p.owner, p.name, opt)
		if err != nil {
			return nil, "", apiError("list pull requests", err)
		}
		for _, pr := range prs {
			if !pr.GetDraft() && pr.GetBase().GetRef() == p.cfg.Base && p.cfg.Rule.Candidate(pr) {
				candidates = append(candidates, pr)
			}
		}
		if resp == nil || resp.NextPage == 0 {
			break
		}
		opt.Page = resp.NextPage
	}
	// Newest update first; a tie goes to the higher number.
	slices.SortStableFunc(candidates, func(a, b *gh.PullRequest) int {
		if c := b.GetUpdatedAt().Compare(a.GetUpdatedAt().Time); c != 0 {
			return c
		}
		return b.GetNumber() - a.GetNumber()
	})
	for _, c := range candidates {
		ok, err := p.changesLock(ctx, c)
		if err != nil {
			return nil, "", err
		}
		if !ok {
			continue
		}
		full, _, err := p.client.PullRequests.Get(ctx, p.owner, p.name, c.GetNumber())
		if err != nil {
			return nil, "", apiError(fmt.Sprintf("get pull request #%d", c.GetNumber()), err)
		}
		p.mu.Lock()
		p.recheck = full.Mergeable == nil
		p.mu.Unlock()
		return pendingOf(full), full.GetHead().GetSHA(), nil
	}
	p.mu.Lock()
	p.recheck = false
	p.mu.Unlock()
	return nil, "", nil
}

// changesLock reports whether pr changes flake.lock; the answer is cached
// per head commit.
func (p *Poller) changesLock(ctx context.Context, pr *gh.PullRequest) (bool, error) {
	key := fmt.Sprintf("%d@%s", pr.GetNumber(), pr.GetHead().GetSHA())
	p.mu.Lock()
	v, ok := p.lockChange[key]
	p.mu.Unlock()
	if ok && pr.GetHead().GetSHA() != "" {
		return v, nil
	}
	v, err := p.listChangesLock(ctx, pr.GetNumber())
	if err != nil {
		return false, err
	}
	p.mu.Lock()
	if p.lockChange == nil || len(p.lockChange) > 1000 {
		p.lockChange = map[string]bool{}
	}
	p.lockChange[key] = v
	p.mu.Unlock()
	return v, nil
}

// listChangesLock asks GitHub whether PR number is a pure lock update: it
// changes flake.lock and nothing but flake.lock files. A PR that also
// changes other files carries code, not only input updates, and one click
// must not merge and deploy code nobody reviewed as such.
func (p *Poller) listChangesLock(ctx context.Context, number int) (bool, error) {
	opt := &gh.ListOptions{PerPage: 100}
	rootLock := false
	for page := 0; page < 30; page++ { // GitHub lists at most 3000 files
		files, resp, err := p.client.PullRequests.ListFiles(ctx, p.owner, p.name, number, opt)
		if err != nil {
			return false, apiError(fmt.Sprintf("list files of pull request #%d", number), err)
		}
		for _, f := range files {
			if path.Base(f.GetFilename()) != LockFile {
				return false, nil
			}
			if f.GetFilename() == LockFile {
				rootLock = true
			}
		}
		if resp == nil || resp.NextPage == 0 {
			return rootLock, nil
		}
		opt.Page = resp.NextPage
	}
	return false, nil
}

// pendingOf converts a PR. Mergeable means GitHub computed it as
// conflict-free and nothing (draft, branch protection) blocks the merge; a
// mergeability GitHub has not computed yet counts as not mergeable.
func pendingOf(pr *gh.PullRequest) *fleetv1.PendingPR {
	state := pr.GetMergeableState()
	mergeable := pr.GetMergeable() && state != "dirty" && state != "blocked" && state != "draft"
	out := &fleetv1.PendingPR{Number: int32(pr.GetNumber()), Title: pr.GetTitle(), Url: pr.GetHTMLURL(), Mergeable: mergeable}
	if t := pr.GetUpdatedAt(); !t.IsZero() {
		out.UpdatedAt = timestamppb.New(t.Time)
	}
	return out
}

// Errors of the API, wrapped around GitHub's own.
var (
	// ErrUnauthorized: GitHub rejected the token (401) or its permissions (403).
	ErrUnauthorized = errors.New("GitHub rejected the token")
	// ErrNotMergeable: GitHub refused the merge (405, 409, 422).
	ErrNotMergeable = errors.New("GitHub refused the merge")
	// ErrNotFound: the repository or PR does not exist for this token.
	ErrNotFound = errors.New("not found on GitHub")
	// ErrUnavailable: GitHub could not be reached or failed (5xx, timeout).
	ErrUnavailable = errors.New("GitHub is unavailable")
)

// apiError classifies a go-github error and says what was being done.
func apiError(what string, err error) error {
	var er *gh.ErrorResponse
	var rl *gh.RateLimitError
	var arl *gh.AbuseRateLimitError
	switch {
	case errors.As(err, &rl), errors.As(err, &arl):
		return fmt.Errorf("%s: %w: rate limited: %v", what, ErrUnavailable, err)
	case errors.As(err, &er) && er.Response != nil:
		msg := er.Message
		switch code := er.Response.StatusCode; {
		case code == http.StatusUnauthorized || code == http.StatusForbidden:
			return fmt.Errorf("%s: %w (HTTP %d: %s)", what, ErrUnauthorized, code, msg)
		case code == http.StatusNotFound:
			return fmt.Errorf("%s: %w (HTTP 404: %s)", what, ErrNotFound, msg)
		case code == http.StatusMethodNotAllowed || code == http.StatusConflict || code == http.StatusUnprocessableEntity:
			return fmt.Errorf("%s: %w (HTTP %d: %s)", what, ErrNotMergeable, code, msg)
		default:
			return fmt.Errorf("%s: %w (HTTP %d: %s)", what, ErrUnavailable, code, msg)
		}
	case errors.Is(err, context.Canceled):
		return fmt.Errorf("%s: %w", what, err)
	}
	return fmt.Errorf("%s: %w: %v", what, ErrUnavailable, err)
}

// MergeResult is a merged PR.
type MergeResult struct {
	// Number is the merged PR's number.
	Number int32
	// SHA is the commit the base branch now points at.
	SHA string
}

// Merge checks that PR number is still open, targets the base branch, is
// the pending flake-update PR with the head commit the last poll checked,
// and is mergeable; then it merges exactly that head commit (GitHub refuses
// the merge if the head moves meanwhile).
func (p *Poller) Merge(ctx context.Context, number int32, actor string) (MergeResult, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	var pr *gh.PullRequest
	for attempt := 0; ; attempt++ {
		var err error
		pr, _, err = p.client.PullRequests.Get(ctx, p.owner, p.name, int(number))
		if err != nil {
			return MergeResult{}, apiError(fmt.Sprintf("get pull request #%d", number), err)
		}
		// GitHub computes mergeability in the background; ask again briefly.
		if pr.Mergeable != nil || pr.GetState() != "open" || attempt == 3 {
			break
		}
		select {
		case <-ctx.Done():
			return MergeResult{}, apiError(fmt.Sprintf("get pull request #%d", number), ctx.Err())
		case <-time.After(time.Second):
		}
	}
	// Only the head a poll checked (it changes flake.lock, it is what the
	// operator was shown) is merged: a later push is checked first.
	p.mu.Lock()
	pending, checked := p.pr, p.prHead
	p.mu.Unlock()
	head := pr.GetHead().GetSHA()
	switch {
	case pr.GetState() != "open":
		return MergeResult{}, fmt.Errorf("pull request #%d: %w: it is %s", number, ErrNotMergeable, pr.GetState())
	case pr.GetBase().GetRef() != p.cfg.Base:
		return MergeResult{}, fmt.Errorf("pull request #%d: %w: it targets %q, not the deployed branch %q", number, ErrNotMergeable, pr.GetBase().GetRef(), p.cfg.Base)
	case pending == nil || pending.Number != number:
		return MergeResult{}, fmt.Errorf("pull request #%d: %w: it is not the pending flake-update PR", number, ErrNotMergeable)
	case head == "" || head != checked:
		p.Wake()
		return MergeResult{}, fmt.Errorf("pull request #%d: %w: its head moved to %s since it was checked at %s; it is being checked again, try once it shows",
			number, ErrNotMergeable, shortSHA(head), shortSHA(checked))
	case !pendingOf(pr).Mergeable:
		return MergeResult{}, fmt.Errorf("pull request #%d: %w: GitHub says it is not mergeable (%s)", number, ErrNotMergeable, orUnknown(pr.GetMergeableState()))
	}
	res, _, err := p.client.PullRequests.Merge(ctx, p.owner, p.name, int(number), "Merged by "+actor+" with nixplane Merge & Deploy",
		&gh.PullRequestOptions{SHA: head, MergeMethod: p.cfg.MergeMethod})
	if err != nil {
		return MergeResult{}, apiError(fmt.Sprintf("merge pull request #%d", number), err)
	}
	if !res.GetMerged() {
		return MergeResult{}, fmt.Errorf("merge pull request #%d: %w: %s", number, ErrNotMergeable, res.GetMessage())
	}
	p.cfg.Log.Info("merged flake-update PR", "repo", p.cfg.Repo, "pr", number, "commit", res.GetSHA(), "actor", actor)
	p.forget(number)
	return MergeResult{Number: number, SHA: res.GetSHA()}, nil
}

// shortSHA abbreviates a commit id for messages.
func shortSHA(s string) string {
	if s == "" {
		return "(none)"
	}
	return s[:min(len(s), 12)]
}

func orUnknown(s string) string {
	if s == "" {
		return "not computed yet"
	}
	return s
}
