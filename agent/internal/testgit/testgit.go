// Package testgit makes real git repositories for the agent's tests: a
// bare origin in a temporary directory and a work tree that commits and
// pushes to it.
package testgit

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Origin is a bare repository plus a work tree pushing to it.
type Origin struct {
	// Bare is the origin's path (usable as a clone URL).
	Bare string
	// Work is the pushing work tree.
	Work string
	// Branch is the branch commits go to.
	Branch string
}

// Env is the environment for test git commands: no user config, fixed
// identity.
func Env() []string {
	return append(os.Environ(),
		"GIT_CONFIG_GLOBAL=/dev/null", "GIT_CONFIG_NOSYSTEM=1",
		"GIT_AUTHOR_NAME=test", "GIT_AUTHOR_EMAIL=test@example.invalid",
		"GIT_COMMITTER_NAME=test", "GIT_COMMITTER_EMAIL=test@example.invalid",
	)
}

// Git runs git in dir and returns its trimmed output, failing the test on
// error.
func Git(t testing.TB, dir string, args ...string) string {
	t.Helper()
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	cmd.Env = Env()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("git %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// New makes an origin with branch "main" and one commit holding files.
func New(t testing.TB, files map[string]string) *Origin {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git is not installed")
	}
	root := t.TempDir()
	o := &Origin{Bare: filepath.Join(root, "origin.git"), Work: filepath.Join(root, "work"), Branch: "main"}
	Git(t, root, "init", "--quiet", "--bare", "--initial-branch=main", o.Bare)
	Git(t, root, "init", "--quiet", "--initial-branch=main", o.Work)
	Git(t, o.Work, "remote", "add", "origin", o.Bare)
	o.Commit(t, "initial", files)
	return o
}

// Commit writes files (path → content; content "-" deletes; a path ending
// in ".sh" or containing "/tests/" is made executable), commits them with
// msg, pushes, and returns the new commit hash.
func (o *Origin) Commit(t testing.TB, msg string, files map[string]string) string {
	t.Helper()
	for p, content := range files {
		full := filepath.Join(o.Work, p)
		if content == "-" {
			if err := os.Remove(full); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		mode := os.FileMode(0o644)
		if strings.HasSuffix(p, ".sh") || strings.Contains(p, "/tests/") {
			mode = 0o755
		}
		if err := os.WriteFile(full, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	Git(t, o.Work, "add", "-A")
	Git(t, o.Work, "commit", "--quiet", "--allow-empty", "-m", msg)
	Git(t, o.Work, "push", "--quiet", "origin", "HEAD:refs/heads/"+o.Branch)
	return Git(t, o.Work, "rev-parse", "HEAD")
}
