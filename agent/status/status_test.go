package status

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/nixplane/nixplane/agent/internal/testgit"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// nixSystem is this machine's Nix system name.
func nixSystem() string {
	arch := map[string]string{"amd64": "x86_64", "arm64": "aarch64"}[runtime.GOARCH]
	return arch + "-" + runtime.GOOS
}

func writeExec(t *testing.T, path, body string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
}

// fakeNix writes a nix stand-in that records its arguments and prints the
// contents of outFile (or fails when failFile exists).
func fakeNix(t *testing.T, dir string) (nix, outFile, argsFile, failFile string) {
	nix = filepath.Join(dir, "bin", "nix")
	outFile, argsFile, failFile = filepath.Join(dir, "out"), filepath.Join(dir, "args"), filepath.Join(dir, "fail")
	writeExec(t, nix, `echo "$@" > `+argsFile+`
if [ -e `+failFile+` ]; then echo "error: attribute 'web1' missing" >&2; exit 1; fi
printf '%s' "$(cat `+outFile+`)"
`)
	return
}

func TestSystemCheckWithFakeNix(t *testing.T) {
	dir := t.TempDir()
	nix, outFile, argsFile, failFile := fakeNix(t, dir)
	flake := filepath.Join(dir, "repo")
	writeExec(t, filepath.Join(flake, "flake.nix"), "{}")
	sysA, sysB := filepath.Join(dir, "sys-a"), filepath.Join(dir, "sys-b")
	for _, d := range []string{sysA, sysB} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cur := filepath.Join(dir, "current-system")
	if err := os.Symlink(sysA, cur); err != nil {
		t.Fatal(err)
	}
	c := &SystemChecker{Nix: nix, Flake: flake, HostType: typesv1.HostType_HOST_TYPE_NIXOS, Host: "web1", CurrentSystem: cur, Timeout: 10 * time.Second}
	ctx := context.Background()

	if err := os.WriteFile(outFile, []byte(sysA), 0o644); err != nil {
		t.Fatal(err)
	}
	res := c.Check(ctx)
	if res.GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK || res.GetCurrentPath() != sysA || res.GetExpectedPath() != sysA || res.GetCheckedAt() == nil {
		t.Errorf("equal paths: %v", res)
	}
	args, _ := os.ReadFile(argsFile)
	if want := "eval --raw --no-write-lock-file " + flake + "#nixosConfigurations.web1.config.system.build.toplevel.outPath"; strings.TrimSpace(string(args)) != want {
		t.Errorf("nix args = %q, want %q", args, want)
	}

	if err := os.WriteFile(outFile, []byte(sysB), 0o644); err != nil {
		t.Fatal(err)
	}
	if res := c.Check(ctx); res.GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_OUTDATED || res.GetExpectedPath() != sysB {
		t.Errorf("different paths: %v", res)
	}

	if err := os.WriteFile(failFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if res := c.Check(ctx); res.GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_ERROR || !strings.Contains(res.GetMessage(), "attribute 'web1' missing") {
		t.Errorf("failing eval: %v", res)
	}

	slow := filepath.Join(dir, "slow-nix")
	writeExec(t, slow, "exec sleep 30\n")
	sc := *c
	sc.Nix, sc.Timeout = slow, 200*time.Millisecond
	if res := sc.Check(ctx); res.GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_ERROR || !strings.Contains(res.GetMessage(), "timed out") {
		t.Errorf("slow eval: %v", res)
	}

	missing := *c
	missing.Nix = filepath.Join(dir, "no-nix-here")
	if res := missing.Check(ctx); res.GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN || !strings.Contains(res.GetMessage(), "nix is not available") {
		t.Errorf("no nix: %v", res)
	}
	noSys := *c
	noSys.CurrentSystem = filepath.Join(dir, "nothing")
	if res := noSys.Check(ctx); res.GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN || !strings.Contains(res.GetMessage(), "no running system") {
		t.Errorf("no current system: %v", res)
	}
}

func TestAttr(t *testing.T) {
	for _, tc := range []struct {
		t    typesv1.HostType
		host string
		want string
	}{
		{typesv1.HostType_HOST_TYPE_NIXOS, "web1", "nixosConfigurations.web1.config.system.build.toplevel.outPath"},
		{typesv1.HostType_HOST_TYPE_DARWIN, "mac", "darwinConfigurations.mac.system.outPath"},
		{typesv1.HostType_HOST_TYPE_HOME_MANAGER, "me@box", `homeConfigurations."me@box".activationPackage.outPath`},
	} {
		if got := Attr(tc.t, tc.host); got != tc.want {
			t.Errorf("Attr(%v, %q) = %q, want %q", tc.t, tc.host, got, tc.want)
		}
	}
}

func TestTestScripts(t *testing.T) {
	dir := t.TempDir()
	writeExec(t, filepath.Join(dir, "20-b"), "")
	writeExec(t, filepath.Join(dir, "10-a"), "")
	if err := os.WriteFile(filepath.Join(dir, "README"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	got, err := TestScripts(dir)
	if err != nil || !reflect.DeepEqual(got, []string{"10-a", "20-b"}) {
		t.Errorf("TestScripts = %v, %v", got, err)
	}
	if got, err := TestScripts(filepath.Join(dir, "missing")); err != nil || len(got) != 0 {
		t.Errorf("missing dir: %v, %v", got, err)
	}
}

// TestSystemCheckWithRealNix evaluates a tiny real flake with the nix on
// this machine, builds it as the "running system", and checks ok, then
// outdated after the flake changes.
func TestSystemCheckWithRealNix(t *testing.T) {
	nix, err := exec.LookPath("nix")
	if err != nil {
		t.Skip("nix is not installed")
	}
	home := t.TempDir()
	t.Setenv("HOME", home)
	t.Setenv("XDG_CACHE_HOME", filepath.Join(home, ".cache"))
	t.Setenv("XDG_CONFIG_HOME", filepath.Join(home, ".config"))
	t.Setenv("XDG_STATE_HOME", filepath.Join(home, ".local/state"))
	t.Setenv("XDG_DATA_HOME", filepath.Join(home, ".local/share"))
	t.Setenv("NIX_CONFIG", "experimental-features = nix-command flakes\nbuild-users-group =\nsandbox = false\nsubstituters =")
	flake := func(marker string) string {
		return `{
  outputs = { self }: {
    nixosConfigurations.web1.config.system.build.toplevel = derivation {
      name = "toplevel"; system = "` + nixSystem() + `"; builder = "/bin/sh";
      args = [ "-c" "echo ` + marker + ` > $out" ];
    };
  };
}
`
	}
	o := testgit.New(t, map[string]string{"flake.nix": flake("one")})
	repo := o.Work
	cur := filepath.Join(t.TempDir(), "current-system")
	build := exec.Command(nix, "build", "--no-write-lock-file", "-o", cur, repo+"#nixosConfigurations.web1.config.system.build.toplevel")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("nix build: %v\n%s", err, out)
	}
	c := &SystemChecker{Nix: nix, Flake: repo, HostType: typesv1.HostType_HOST_TYPE_NIXOS, Host: "web1", CurrentSystem: cur, Timeout: time.Minute}
	res := c.Check(context.Background())
	if res.GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK || !strings.HasPrefix(res.GetExpectedPath(), "/nix/store/") {
		t.Fatalf("after building: %v", res)
	}
	o.Commit(t, "change", map[string]string{"flake.nix": flake("two")})
	res = c.Check(context.Background())
	if res.GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_OUTDATED || res.GetExpectedPath() == res.GetCurrentPath() {
		t.Fatalf("after a change: %v", res)
	}
	bad := *c
	bad.Host = "nosuchhost"
	if res := bad.Check(context.Background()); res.GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_ERROR {
		t.Fatalf("unknown host: %v", res)
	}
}
