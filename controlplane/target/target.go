// Package target finds the fleet target — the commit and flake.lock every
// host should run — from a version.json URL or from the fleet repository
// itself (a mirror clone: branch head plus the flake.lock at that commit).
// It polls with a timeout, caches the result, refetches on demand, and
// reports a failing fetch as an error, never as "up to date".
package target

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nixplane/nixplane/controlplane/validate"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// Config configures a [Poller].
type Config struct {
	// RepoURL is the fleet repository; Branch its deployed branch.
	RepoURL, Branch string
	// VersionURL serves version.json; it wins over RepoURL when both are set.
	VersionURL string
	// MirrorDir holds the mirror clone of RepoURL.
	MirrorDir string
	// Interval between polls (default 60s); Timeout bounds one fetch
	// (default 20s).
	Interval, Timeout time.Duration
	// OnChange receives every fetched target (nil when unconfigured).
	OnChange func(*fleetv1.FleetTarget)
	Client   *http.Client
	Log      *slog.Logger
}

// Poller fetches the target periodically and on demand.
type Poller struct {
	cfg  Config
	mu   sync.Mutex // serialises fetches
	last time.Time
}

// NewPoller returns a poller; Run starts it.
func NewPoller(cfg Config) *Poller {
	if cfg.Interval <= 0 {
		cfg.Interval = 60 * time.Second
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 20 * time.Second
	}
	if cfg.Branch == "" {
		cfg.Branch = "main"
	}
	if cfg.Client == nil {
		cfg.Client = &http.Client{Timeout: cfg.Timeout}
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	return &Poller{cfg: cfg}
}

// Configured reports whether a target source is set.
func (p *Poller) Configured() bool { return p.cfg.RepoURL != "" || p.cfg.VersionURL != "" }

// Run polls until ctx ends.
func (p *Poller) Run(ctx context.Context) {
	if !p.Configured() {
		return
	}
	t := time.NewTicker(p.cfg.Interval)
	defer t.Stop()
	for {
		p.fetchAndPublish(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Refetch fetches now (unless a fetch finished within the last two
// seconds) and publishes the result.
func (p *Poller) Refetch(ctx context.Context) {
	if !p.Configured() {
		return
	}
	p.mu.Lock()
	recent := time.Since(p.last) < 2*time.Second
	p.mu.Unlock()
	if !recent {
		p.fetchAndPublish(ctx)
	}
}

func (p *Poller) fetchAndPublish(ctx context.Context) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	t, err := p.Fetch(ctx)
	if err != nil {
		if ctx.Err() != nil && errors.Is(context.Cause(ctx), context.Canceled) {
			return
		}
		p.cfg.Log.Warn("fetch fleet target", "err", err)
		t = &fleetv1.FleetTarget{Error: err.Error(), Branch: p.cfg.Branch}
	}
	t.FetchedAt = timestamppb.Now()
	if p.cfg.VersionURL != "" {
		t.Source = validate.RedactURL(p.cfg.VersionURL)
	} else {
		t.Source = validate.RedactURL(p.cfg.RepoURL)
	}
	if t.Error != "" {
		for _, raw := range []string{p.cfg.VersionURL, p.cfg.RepoURL} {
			if raw != "" {
				t.Error = strings.ReplaceAll(t.Error, raw, validate.RedactURL(raw))
			}
		}
	}
	p.last = time.Now()
	if p.cfg.OnChange != nil {
		p.cfg.OnChange(t)
	}
}

// Fetch returns the target once.
func (p *Poller) Fetch(ctx context.Context) (*fleetv1.FleetTarget, error) {
	if p.cfg.VersionURL != "" {
		return p.fetchVersionJSON(ctx)
	}
	return p.fetchRepo(ctx)
}

// VersionJSON is the version.json format.
type VersionJSON struct {
	GitCommit string `json:"gitCommit"`
	LockHash  string `json:"lockHash"`
	Message   string `json:"message"`
	Branch    string `json:"branch"`
	// Timestamp is RFC 3339 or unix seconds.
	Timestamp json.RawMessage `json:"timestamp"`
}

var commitRe = regexp.MustCompile(`^[0-9a-f]{7,64}$`)
var lockRe = regexp.MustCompile(`^[0-9a-f]{64}$`)

// ParseVersionJSON validates a version.json document.
func ParseVersionJSON(b []byte) (*fleetv1.FleetTarget, error) {
	var v VersionJSON
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("version.json is not valid JSON: %w", err)
	}
	v.GitCommit = strings.ToLower(strings.TrimSpace(v.GitCommit))
	v.LockHash = strings.ToLower(strings.TrimSpace(v.LockHash))
	if v.GitCommit == "" {
		return nil, errors.New("version.json is missing gitCommit")
	}
	if !commitRe.MatchString(v.GitCommit) {
		return nil, errors.New("version.json gitCommit is not a hex commit id")
	}
	if v.LockHash != "" && !lockRe.MatchString(v.LockHash) {
		return nil, errors.New("version.json lockHash is not a sha256 hex digest")
	}
	if len(v.Message) > 4096 || len(v.Branch) > 256 {
		return nil, errors.New("version.json message or branch too long")
	}
	t := &fleetv1.FleetTarget{GitCommit: v.GitCommit, LockHash: v.LockHash, Message: strings.ToValidUTF8(v.Message, "\uFFFD"), Branch: v.Branch}
	if ts := parseTimestamp(v.Timestamp); !ts.IsZero() {
		t.CommittedAt = timestamppb.New(ts)
	}
	return t, nil
}

func parseTimestamp(raw json.RawMessage) time.Time {
	if len(raw) == 0 {
		return time.Time{}
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		if t, err := time.Parse(time.RFC3339, s); err == nil {
			return t
		}
		if n, err := strconv.ParseInt(s, 10, 64); err == nil {
			return time.Unix(n, 0)
		}
		return time.Time{}
	}
	var n int64
	if json.Unmarshal(raw, &n) == nil && n > 0 {
		return time.Unix(n, 0)
	}
	return time.Time{}
}

func (p *Poller) fetchVersionJSON(ctx context.Context) (*fleetv1.FleetTarget, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.cfg.VersionURL, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Cache-Control", "no-cache")
	resp, err := p.cfg.Client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetch version.json: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetch version.json: HTTP %d", resp.StatusCode)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("read version.json: %w", err)
	}
	return ParseVersionJSON(b)
}

func (p *Poller) git(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "git", args...)
	cmd.Env = append(os.Environ(), "GIT_TERMINAL_PROMPT=0")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		// Bounded, between characters and as UTF-8: it becomes the
		// target's error, sent to every page.
		msg := validate.Printable(strings.TrimSpace(stderr.String()), 300)
		return nil, fmt.Errorf("git %s: %v: %s", args[0], err, msg)
	}
	return out, nil
}

func (p *Poller) fetchRepo(ctx context.Context) (*fleetv1.FleetTarget, error) {
	dir := p.cfg.MirrorDir
	if _, err := os.Stat(dir + "/HEAD"); err != nil {
		_ = os.RemoveAll(dir)
		if _, err := p.git(ctx, "clone", "--mirror", "--quiet", "--", p.cfg.RepoURL, dir); err != nil {
			return nil, err
		}
	} else if _, err := p.git(ctx, "-C", dir, "fetch", "--prune", "--quiet", "origin"); err != nil {
		return nil, err
	}
	out, err := p.git(ctx, "-C", dir, "rev-parse", "--verify", "refs/heads/"+p.cfg.Branch+"^{commit}")
	if err != nil {
		return nil, fmt.Errorf("branch %q not found in the fleet repository", p.cfg.Branch)
	}
	commit := strings.TrimSpace(string(out))
	t := &fleetv1.FleetTarget{GitCommit: commit, Branch: p.cfg.Branch}
	if out, err := p.git(ctx, "-C", dir, "log", "-1", "--format=%ct%x00%s", commit); err == nil {
		ts, msg, _ := strings.Cut(strings.TrimSpace(string(out)), "\x00")
		t.Message = strings.ToValidUTF8(msg, "\uFFFD") // git keeps other encodings as they are
		if n, err := strconv.ParseInt(ts, 10, 64); err == nil {
			t.CommittedAt = timestamppb.New(time.Unix(n, 0))
		}
	}
	if lock, err := p.git(ctx, "-C", dir, "show", commit+":flake.lock"); err == nil {
		sum := sha256.Sum256(lock)
		t.LockHash = hex.EncodeToString(sum[:])
	}
	return t, nil
}
