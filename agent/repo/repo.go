// Package repo keeps the agent's isolated clone of the fleet repository: a
// private (0700) git checkout under the agent's state directory that always
// equals the remote branch after a pull, so what the host builds is exactly
// what was pushed. It runs the real git binary.
package repo

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Exec runs one git invocation for a command whose output the user watches:
// name with args in dir, with env as its complete environment. It returns an
// error when the process fails. Callers plug in the command executor so the
// output streams and the process can be stopped.
type Exec func(ctx context.Context, dir string, env []string, name string, args ...string) error

// Repo is the isolated clone. The zero value is not usable; fill the fields.
type Repo struct {
	// Dir is where the clone lives (<state-dir>/repo).
	Dir string
	// URL is the remote to clone (origin).
	URL string
	// Branch is the branch to follow.
	Branch string
	// SSHKeyFile, when set, is the private key git uses over SSH.
	SSHKeyFile string
	// Git is the git binary; empty means "git" from PATH.
	Git string

	mu       sync.Mutex
	headKey  string
	head     string
	subject  string
	lockKey  string
	lockHash string
}

// Env is the environment git runs with: the agent's, no terminal prompts,
// and the SSH key when one is configured.
func (r *Repo) Env() []string {
	env := append(os.Environ(), "GIT_TERMINAL_PROMPT=0", "LC_ALL=C")
	if r.SSHKeyFile != "" {
		env = append(env, "GIT_SSH_COMMAND=ssh -i "+shellQuote(r.SSHKeyFile)+" -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new -o BatchMode=yes")
	}
	return env
}

func (r *Repo) git() string {
	if r.Git != "" {
		return r.Git
	}
	return "git"
}

// Valid reports whether Dir holds a usable clone of URL; when it does not,
// the error says why.
func (r *Repo) Valid(ctx context.Context) error {
	if _, err := os.Stat(r.Dir); err != nil {
		return err
	}
	gitDir, err := r.output(ctx, "rev-parse", "--absolute-git-dir")
	if err != nil {
		return fmt.Errorf("not a git repository: %w", err)
	}
	want, _ := filepath.EvalSymlinks(filepath.Join(r.Dir, ".git"))
	if got, _ := filepath.EvalSymlinks(gitDir); want == "" || got != want {
		return fmt.Errorf("git directory is %q, want %q", gitDir, filepath.Join(r.Dir, ".git"))
	}
	if _, err := r.output(ctx, "rev-parse", "--verify", "--quiet", "HEAD^{commit}"); err != nil {
		return fmt.Errorf("no valid HEAD: %w", err)
	}
	remote, err := r.output(ctx, "config", "--get", "remote.origin.url")
	if err != nil {
		return fmt.Errorf("no origin remote: %w", err)
	}
	if remote != r.URL {
		return fmt.Errorf("origin is %q, want %q", remote, r.URL)
	}
	return nil
}

// Ensure makes Dir a valid clone: it keeps a valid one, and removes and
// clones again one that is missing, corrupt or points elsewhere. It returns
// whether it cloned.
func (r *Repo) Ensure(ctx context.Context, run Exec) (bool, error) {
	if r.Valid(ctx) == nil {
		return false, nil
	}
	r.invalidate()
	if err := os.RemoveAll(r.Dir); err != nil {
		return false, fmt.Errorf("remove broken clone: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(r.Dir), 0o700); err != nil {
		return false, err
	}
	if err := os.Mkdir(r.Dir, 0o700); err != nil {
		return false, err
	}
	// Mkdir is subject to the umask; be explicit.
	if err := os.Chmod(r.Dir, 0o700); err != nil {
		return false, err
	}
	if err := run(ctx, r.Dir, r.Env(), r.git(), "clone", "--branch", r.Branch, "--single-branch", "--", r.URL, "."); err != nil {
		_ = os.RemoveAll(r.Dir)
		return false, fmt.Errorf("clone %s: %w", r.URL, err)
	}
	return true, nil
}

// Pull makes the working tree equal origin/<branch>: fetch, hard reset,
// and removal of every untracked and ignored file. A missing or broken
// clone is cloned afresh first.
func (r *Repo) Pull(ctx context.Context, run Exec) error {
	defer r.invalidate()
	cloned, err := r.Ensure(ctx, run)
	if err != nil {
		return err
	}
	if cloned {
		return nil
	}
	ref := "refs/remotes/origin/" + r.Branch
	steps := [][]string{
		{"fetch", "--prune", "origin", "+refs/heads/" + r.Branch + ":" + ref},
		{"checkout", "--force", "-B", r.Branch, ref},
		{"reset", "--hard", ref},
		{"clean", "-ffdx"},
	}
	for _, s := range steps {
		if err := run(ctx, r.Dir, r.Env(), r.git(), s...); err != nil {
			return fmt.Errorf("git %s: %w", s[0], err)
		}
	}
	return nil
}

// Head returns the full commit hash of HEAD and its subject line; both are
// empty when there is no clone. It is cached until the clone changes.
func (r *Repo) Head(ctx context.Context) (hash, subject string) {
	key := statKey(filepath.Join(r.Dir, ".git", "HEAD"), filepath.Join(r.Dir, ".git", "index"),
		filepath.Join(r.Dir, ".git", "packed-refs"), filepath.Join(r.Dir, ".git", "refs", "heads", r.Branch))
	r.mu.Lock()
	if key == r.headKey && key != "" {
		h, s := r.head, r.subject
		r.mu.Unlock()
		return h, s
	}
	r.mu.Unlock()
	out, err := r.output(ctx, "log", "-1", "--format=%H%n%s", "HEAD")
	if err != nil {
		return "", ""
	}
	hash, subject, _ = strings.Cut(out, "\n")
	r.mu.Lock()
	r.headKey, r.head, r.subject = key, hash, subject
	r.mu.Unlock()
	return hash, subject
}

// LockHash returns the sha256 (hex) of the clone's flake.lock, or "" when
// there is none. It is cached by the file's size and modification time.
func (r *Repo) LockHash() string {
	path := filepath.Join(r.Dir, "flake.lock")
	key := statKey(path)
	r.mu.Lock()
	defer r.mu.Unlock()
	if key == r.lockKey {
		return r.lockHash
	}
	r.lockKey, r.lockHash = key, ""
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		r.lockKey = ""
		return ""
	}
	r.lockHash = hex.EncodeToString(h.Sum(nil))
	return r.lockHash
}

// LsRemote checks that the remote is reachable and has the branch.
func (r *Repo) LsRemote(ctx context.Context) error {
	cmd := exec.CommandContext(ctx, r.git(), "ls-remote", "--exit-code", "--heads", "--", r.URL, r.Branch)
	cmd.Env = r.Env()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() == 2 {
			return fmt.Errorf("branch %q not found at %s", r.Branch, r.URL)
		}
		return fmt.Errorf("git ls-remote %s: %v: %s", r.URL, err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

func (r *Repo) invalidate() {
	r.mu.Lock()
	r.headKey, r.lockKey = "", ""
	r.mu.Unlock()
}

// output runs a quick read-only git command in Dir and returns its trimmed
// stdout.
func (r *Repo) output(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, r.git(), append([]string{"-C", r.Dir}, args...)...)
	cmd.Env = r.Env()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		if msg := strings.TrimSpace(stderr.String()); msg != "" {
			return "", fmt.Errorf("%w: %s", err, msg)
		}
		return "", err
	}
	return strings.TrimSpace(string(out)), nil
}

// statKey identifies the current versions of files by size and mtime; a
// missing file contributes a marker so its creation changes the key.
func statKey(paths ...string) string {
	var b strings.Builder
	for _, p := range paths {
		st, err := os.Stat(p)
		if err != nil {
			b.WriteString("-;")
			continue
		}
		fmt.Fprintf(&b, "%d:%d;", st.Size(), st.ModTime().UnixNano())
	}
	return b.String()
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
