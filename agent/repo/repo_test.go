package repo

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nixplane/nixplane/agent/internal/testgit"
)

func runExec(ctx context.Context, dir string, env []string, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir, cmd.Env = dir, env
	out, err := cmd.CombinedOutput()
	if err != nil {
		return errors.New(err.Error() + ": " + string(out))
	}
	return nil
}

func newRepo(t *testing.T, o *testgit.Origin) *Repo {
	t.Helper()
	return &Repo{Dir: filepath.Join(t.TempDir(), "state", "repo"), URL: o.Bare, Branch: o.Branch}
}

func TestEnsureClonesPrivately(t *testing.T) {
	o := testgit.New(t, map[string]string{"flake.nix": "{}\n", "flake.lock": "{\"version\":7}\n"})
	r := newRepo(t, o)
	ctx := context.Background()
	cloned, err := r.Ensure(ctx, runExec)
	if err != nil || !cloned {
		t.Fatalf("Ensure = %v, %v; want a clone", cloned, err)
	}
	st, err := os.Stat(r.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o700 {
		t.Errorf("clone mode = %v, want 0700", st.Mode().Perm())
	}
	head, subject := r.Head(ctx)
	if want := testgit.Git(t, o.Work, "rev-parse", "HEAD"); head != want || subject != "initial" {
		t.Errorf("Head = %q %q, want %q initial", head, subject, want)
	}
	sum := sha256.Sum256([]byte("{\"version\":7}\n"))
	if got := r.LockHash(); got != hex.EncodeToString(sum[:]) {
		t.Errorf("LockHash = %q", got)
	}
	if cloned, err := r.Ensure(ctx, runExec); err != nil || cloned {
		t.Errorf("second Ensure = %v, %v; want the clone kept", cloned, err)
	}
}

func TestPullMakesTreeEqualOrigin(t *testing.T) {
	o := testgit.New(t, map[string]string{"flake.nix": "{}\n", "hosts/a/config.nix": "original\n", "flake.lock": "one\n"})
	r := newRepo(t, o)
	ctx := context.Background()
	if _, err := r.Ensure(ctx, runExec); err != nil {
		t.Fatal(err)
	}
	oldLock := r.LockHash()
	// Local damage: a modified tracked file, an untracked file, an ignored
	// build result, a deleted tracked file.
	if err := os.WriteFile(filepath.Join(r.Dir, "hosts/a/config.nix"), []byte("tampered\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(r.Dir, "untracked.txt"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(r.Dir, "newdir/sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(r.Dir, "flake.nix")); err != nil {
		t.Fatal(err)
	}
	// Meanwhile origin moves on.
	want := o.Commit(t, "update lock", map[string]string{"flake.lock": "two\n"})

	if err := r.Pull(ctx, runExec); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(r.Dir, "hosts/a/config.nix"))
	if err != nil || string(b) != "original\n" {
		t.Errorf("tracked file = %q, %v; want it restored", b, err)
	}
	if _, err := os.Stat(filepath.Join(r.Dir, "flake.nix")); err != nil {
		t.Errorf("deleted tracked file not restored: %v", err)
	}
	for _, p := range []string{"untracked.txt", "newdir"} {
		if _, err := os.Stat(filepath.Join(r.Dir, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still there after pull (err %v)", p, err)
		}
	}
	if head, subject := r.Head(ctx); head != want || subject != "update lock" {
		t.Errorf("Head = %q %q, want %q", head, subject, want)
	}
	if r.LockHash() == oldLock {
		t.Error("lock hash did not follow the new flake.lock")
	}
	if st := testgit.Git(t, r.Dir, "status", "--porcelain", "--ignored"); st != "" {
		t.Errorf("tree differs from origin:\n%s", st)
	}
}

func TestEnsureReclonesCorruptOrForeignClone(t *testing.T) {
	o := testgit.New(t, map[string]string{"flake.nix": "{}\n"})
	other := testgit.New(t, map[string]string{"other": "x\n"})
	ctx := context.Background()
	cases := map[string]func(t *testing.T, r *Repo){
		"corrupt HEAD": func(t *testing.T, r *Repo) {
			if err := os.WriteFile(filepath.Join(r.Dir, ".git", "HEAD"), []byte("garbage\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		},
		"no .git": func(t *testing.T, r *Repo) {
			if err := os.RemoveAll(filepath.Join(r.Dir, ".git")); err != nil {
				t.Fatal(err)
			}
		},
		"wrong remote": func(t *testing.T, r *Repo) {
			testgit.Git(t, r.Dir, "remote", "set-url", "origin", other.Bare)
		},
	}
	for name, damage := range cases {
		t.Run(name, func(t *testing.T) {
			r := newRepo(t, o)
			if _, err := r.Ensure(ctx, runExec); err != nil {
				t.Fatal(err)
			}
			damage(t, r)
			if err := r.Valid(ctx); err == nil {
				t.Fatal("Valid accepted a damaged clone")
			}
			if err := r.Pull(ctx, runExec); err != nil {
				t.Fatalf("Pull on a damaged clone: %v", err)
			}
			if err := r.Valid(ctx); err != nil {
				t.Fatalf("clone still invalid: %v", err)
			}
			if head, _ := r.Head(ctx); head != testgit.Git(t, o.Work, "rev-parse", "HEAD") {
				t.Errorf("Head = %q after re-clone", head)
			}
		})
	}
}

func TestLsRemote(t *testing.T) {
	o := testgit.New(t, map[string]string{"a": "b"})
	ctx := context.Background()
	if err := (&Repo{URL: o.Bare, Branch: "main"}).LsRemote(ctx); err != nil {
		t.Errorf("LsRemote: %v", err)
	}
	err := (&Repo{URL: o.Bare, Branch: "nope"}).LsRemote(ctx)
	if err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("LsRemote on a missing branch = %v", err)
	}
	if err := (&Repo{URL: filepath.Join(t.TempDir(), "missing"), Branch: "main"}).LsRemote(ctx); err == nil {
		t.Error("LsRemote on a missing repository succeeded")
	}
}

func TestSSHKeyEnv(t *testing.T) {
	r := &Repo{SSHKeyFile: "/keys/it's"}
	var got string
	for _, e := range r.Env() {
		if strings.HasPrefix(e, "GIT_SSH_COMMAND=") {
			got = e
		}
	}
	if !strings.Contains(got, `-i '/keys/it'\''s'`) || !strings.Contains(got, "IdentitiesOnly=yes") || !strings.Contains(got, "StrictHostKeyChecking=accept-new") {
		t.Errorf("GIT_SSH_COMMAND = %q", got)
	}
}
