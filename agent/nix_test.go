package agent

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/nixplane/nixplane/agent/internal/fakeserver"
	"github.com/nixplane/nixplane/agent/internal/testgit"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// offlineNix prepares the environment for Debian's nix-bin to evaluate and
// build flakes offline in a private HOME, and returns the nix binary. It
// skips the test when nix is not installed.
func offlineNix(t *testing.T) string {
	t.Helper()
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
	return nix
}

func nixCmd(t *testing.T, dir, nix string, args ...string) string {
	t.Helper()
	cmd := exec.Command(nix, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("nix %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// statusAfter returns the first status report after the n-th message of c.
func statusAfter(t *testing.T, c *fakeserver.Conn, n int, what string) *agentv1.StatusReport {
	t.Helper()
	var rep *agentv1.StatusReport
	fakeserver.Eventually(t, wait, what, func() bool {
		for _, m := range c.Messages()[n:] {
			if s := m.GetStatus(); s != nil {
				rep = s
				return true
			}
		}
		return false
	})
	return rep
}

// TestSystemCheckWithARealFleetFlake runs the agent against a fleet flake
// whose input is another local git repository, so flake.lock, evaluation
// and the build are real nix: after the "activation" (nix build of the
// host's toplevel into the current-system link) System is ok; after a pull
// of a flake.lock update it is outdated, with the lock hash moved; a switch
// makes it ok again. Without nix it says unknown and why.
func TestSystemCheckWithARealFleetFlake(t *testing.T) {
	nix := offlineNix(t)
	system := map[string]string{"amd64": "x86_64", "arm64": "aarch64"}[runtime.GOARCH] + "-" + runtime.GOOS

	input := testgit.New(t, map[string]string{"flake.nix": `{ outputs = { self }: { marker = "one"; }; }` + "\n"})
	fleetFlake := `{
  inputs.sys.url = "git+file://` + input.Bare + `?ref=main";
  outputs = { self, sys }: {
    nixosConfigurations.web1.config.system.build.toplevel = derivation {
      name = "toplevel-web1"; system = "` + system + `"; builder = "/bin/sh";
      args = [ "-c" "echo ${sys.marker} > $out" ];
    };
  };
}
`
	e := newEnv(t, nil)
	testgit.Git(t, e.origin.Work, "rm", "--quiet", "-r", "hosts")
	e.origin.Commit(t, "real fleet flake", map[string]string{"flake.nix": fleetFlake, "flake.lock": "-"})
	nixCmd(t, e.origin.Work, nix, "flake", "lock")
	lock1, err := os.ReadFile(filepath.Join(e.origin.Work, "flake.lock"))
	if err != nil || !strings.Contains(string(lock1), input.Bare) {
		t.Fatalf("flake.lock does not lock the local input: %v\n%s", err, lock1)
	}
	e.origin.Commit(t, "lock the system input", nil)

	cur := filepath.Join(e.dir, "current-system")
	activate := filepath.Join(e.dir, "activate")
	// The rebuild stand-in activates by building the host's toplevel from
	// the flake it is given into the current-system link.
	script := "#!/bin/sh\nflake=\"${3%#*}\"\nexec " + nix + " build --no-write-lock-file -o " + cur + " \"$flake#nixosConfigurations.web1.config.system.build.toplevel\"\n"
	if err := os.WriteFile(activate, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	e.cfg.NixCommand, e.cfg.CurrentSystem, e.cfg.RebuildCommand = nix, cur, activate
	e.start()
	c := e.conn(1)

	// Nothing activated yet: unknown, with the reason.
	c.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Refresh{Refresh: &agentv1.RefreshStatus{RequestId: "before"}}})
	rep := statusAfter(t, c, 0, "status before any activation")
	if !rep.GetNixAvailable() || rep.GetSystem().GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN ||
		!strings.Contains(rep.GetSystem().GetMessage(), "no running system at "+cur) {
		t.Fatalf("before activation: %v", rep)
	}

	n := len(c.Messages())
	run(c, "s1", typesv1.CommandKind_COMMAND_KIND_SWITCH)
	if res := result(t, c, "s1"); res.GetOutcome() != agentv1.Outcome_OUTCOME_SUCCEEDED {
		t.Fatalf("switch: %v\n%s", res, strings.Join(c.Lines("s1"), "\n"))
	}
	rep = statusAfter(t, c, n, "status after the switch")
	sys := rep.GetSystem()
	if sys.GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK || !strings.HasPrefix(sys.GetExpectedPath(), "/nix/store/") ||
		sys.GetExpectedPath() != sys.GetCurrentPath() || rep.GetLockHash() != sha(string(lock1)) {
		t.Fatalf("after the switch: %v (lock %s, want %s)", rep, rep.GetLockHash(), sha(string(lock1)))
	}
	firstSystem := sys.GetCurrentPath()

	// The input moves and the fleet's lock follows it.
	input.Commit(t, "marker two", map[string]string{"flake.nix": `{ outputs = { self }: { marker = "two"; }; }` + "\n"})
	nixCmd(t, e.origin.Work, nix, "flake", "update")
	lock2, _ := os.ReadFile(filepath.Join(e.origin.Work, "flake.lock"))
	if string(lock2) == string(lock1) {
		t.Fatal("nix flake update did not change flake.lock")
	}
	e.origin.Commit(t, "flake.lock: update sys", nil)

	n = len(c.Messages())
	run(c, "p1", typesv1.CommandKind_COMMAND_KIND_PULL)
	if res := result(t, c, "p1"); res.GetOutcome() != agentv1.Outcome_OUTCOME_SUCCEEDED {
		t.Fatalf("pull: %v", res)
	}
	rep = statusAfter(t, c, n, "status after the pull")
	sys = rep.GetSystem()
	if sys.GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_OUTDATED || sys.GetCurrentPath() != firstSystem ||
		sys.GetExpectedPath() == firstSystem || rep.GetLockHash() != sha(string(lock2)) {
		t.Fatalf("after pulling the lock update: %v", rep)
	}

	n = len(c.Messages())
	run(c, "s2", typesv1.CommandKind_COMMAND_KIND_SWITCH)
	if res := result(t, c, "s2"); res.GetOutcome() != agentv1.Outcome_OUTCOME_SUCCEEDED {
		t.Fatalf("second switch: %v", res)
	}
	rep = statusAfter(t, c, n, "status after the second switch")
	if sys := rep.GetSystem(); sys.GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK || sys.GetCurrentPath() == firstSystem {
		t.Fatalf("after the second switch: %v", rep)
	}
}

// TestSystemWithoutNixIsUnknown: an agent without nix reports the System
// check unknown and says why.
func TestSystemWithoutNixIsUnknown(t *testing.T) {
	e := newEnv(t, nil)
	e.start()
	c := e.conn(1)
	c.Send(&agentv1.ConnectResponse{Msg: &agentv1.ConnectResponse_Refresh{Refresh: &agentv1.RefreshStatus{RequestId: "r"}}})
	rep := statusAfter(t, c, 0, "a status report")
	if rep.GetNixAvailable() || rep.GetSystem().GetStatus() != typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN ||
		rep.GetSystem().GetMessage() != "nix is not available on this host" || rep.GetSystem().GetCheckedAt() == nil {
		t.Fatalf("without nix: %v", rep)
	}
}
