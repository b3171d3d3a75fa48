// Package status computes the agent's view of its host's status: the system
// check (does the running system equal what the flake in the clone builds
// for this host?) and the list of the host's test scripts.
package status

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// DefaultCheckTimeout bounds one system check's evaluation.
const DefaultCheckTimeout = 2 * time.Minute

// SystemChecker compares the running system with the flake's output for
// the host.
type SystemChecker struct {
	// Nix is the nix binary: a path, or a name looked up in PATH. Empty
	// means "nix".
	Nix string
	// Flake is the directory of the flake (the agent's clone).
	Flake string
	// HostType selects the flake output and the default current system.
	HostType typesv1.HostType
	// Host is the attribute name of the host's configuration.
	Host string
	// CurrentSystem is the symlink to the running system (or Home Manager
	// generation); empty means the host type's default.
	CurrentSystem string
	// Timeout bounds the evaluation; zero means DefaultCheckTimeout.
	Timeout time.Duration
	// Now gives the check time; nil means time.Now.
	Now func() time.Time
}

// DefaultCurrentSystem is where the running system of a host type is linked.
func DefaultCurrentSystem(t typesv1.HostType) string {
	if t == typesv1.HostType_HOST_TYPE_HOME_MANAGER {
		if home, err := os.UserHomeDir(); err == nil {
			return filepath.Join(home, ".local/state/nix/profiles/home-manager")
		}
		return ""
	}
	return "/run/current-system"
}

// Attr is the flake attribute (after '#') whose value is the out path of
// the host's configuration.
func Attr(t typesv1.HostType, host string) string {
	q := quoteAttr(host)
	switch t {
	case typesv1.HostType_HOST_TYPE_DARWIN:
		return "darwinConfigurations." + q + ".system.outPath"
	case typesv1.HostType_HOST_TYPE_HOME_MANAGER:
		return "homeConfigurations." + q + ".activationPackage.outPath"
	default:
		return "nixosConfigurations." + q + ".config.system.build.toplevel.outPath"
	}
}

func quoteAttr(s string) string {
	for _, r := range s {
		if !(r == '-' || r == '_' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9') {
			return `"` + strings.ReplaceAll(s, `"`, `\"`) + `"`
		}
	}
	return s
}

// NixPath returns the nix binary's path, or "" when there is none.
func (c *SystemChecker) NixPath() string {
	n := c.Nix
	if n == "" {
		n = "nix"
	}
	p, err := exec.LookPath(n)
	if err != nil {
		return ""
	}
	return p
}

// Check runs the system check. It never fails: problems are reported in the
// result's status and message.
func (c *SystemChecker) Check(ctx context.Context) *typesv1.SystemCheck {
	now := time.Now
	if c.Now != nil {
		now = c.Now
	}
	res := &typesv1.SystemCheck{}
	defer func() { res.CheckedAt = timestamppb.New(now()) }()

	cur := c.CurrentSystem
	if cur == "" {
		cur = DefaultCurrentSystem(c.HostType)
	}
	nix := c.NixPath()
	if nix == "" {
		res.Status = typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN
		res.Message = "nix is not available on this host"
		return res
	}
	current, err := filepath.EvalSymlinks(cur)
	if err != nil {
		res.Status = typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN
		res.Message = fmt.Sprintf("no running system at %s", cur)
		return res
	}
	res.CurrentPath = current
	if c.Flake == "" {
		res.Status = typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN
		res.Message = "no clone of the fleet repository yet"
		return res
	}
	if _, err := os.Stat(filepath.Join(c.Flake, "flake.nix")); err != nil {
		res.Status = typesv1.CompartmentStatus_COMPARTMENT_STATUS_UNKNOWN
		res.Message = "the repository has no flake.nix"
		return res
	}
	timeout := c.Timeout
	if timeout <= 0 {
		timeout = DefaultCheckTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	attr := Attr(c.HostType, c.Host)
	cmd := exec.CommandContext(ctx, nix, "eval", "--raw", "--no-write-lock-file", c.Flake+"#"+attr)
	// The environment passes through, NIX_CONFIG included.
	cmd.Env = os.Environ()
	cmd.WaitDelay = 2 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		res.Status = typesv1.CompartmentStatus_COMPARTMENT_STATUS_ERROR
		msg := lastLines(stderr.String(), 3)
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			msg = fmt.Sprintf("timed out after %s", timeout)
		} else if msg == "" {
			msg = err.Error()
		}
		res.Message = "evaluating ." + attr + " failed: " + msg
		return res
	}
	res.ExpectedPath = strings.TrimSpace(string(out))
	if res.ExpectedPath == res.CurrentPath {
		res.Status = typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK
		res.Message = "running system matches the configuration"
	} else {
		res.Status = typesv1.CompartmentStatus_COMPARTMENT_STATUS_OUTDATED
		res.Message = "running system differs from the configuration (switch needed)"
	}
	return res
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.TrimSpace(strings.Join(lines, " "))
}

// TestScripts lists the executable regular files in dir, sorted by name.
// A missing directory means no tests.
func TestScripts(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range ents {
		st, err := os.Stat(filepath.Join(dir, e.Name()))
		if err != nil || !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
			continue
		}
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names, nil
}
