package tests

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// TestCLIRunFollow: `nixplane run test HOST --follow` streams the output
// and exits with the command's outcome; without --follow it prints the
// command id alone.
func TestCLIRunFollow(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "good", "bad")
	f.WriteScript("hosts/good/tests/02-disk-space.sh", "#!/bin/sh\necho 'disk 40% full'\n")
	f.WriteScript("hosts/bad/tests/02-disk-space.sh", "#!/bin/sh\necho 'disk 97% full'\nexit 1\n")
	f.Commit("Tests")
	s.StartAgent(f, "good", AgentOptions{})
	s.StartAgent(f, "bad", AgentOptions{})
	s.WaitOnline("good")
	s.WaitOnline("bad")
	env := []string{"NIXPLANE_TOKEN=" + s.AdminToken}

	res := runCLI(t, env, "run", "test", "good", "--server", s.URL, "--follow")
	if res.code != 0 {
		t.Errorf("run test good --follow: exit %d, want 0\nstdout:\n%s\nstderr:\n%s", res.code, res.stdout, res.stderr)
	}
	out := strings.Split(res.stdout, "\n")
	for _, want := range []string{"configuration present", "disk 40% full"} {
		if !slices.Contains(out, want) {
			t.Errorf("run test good --follow: stdout lacks the line %q:\n%s", want, res.stdout)
		}
	}

	res = runCLI(t, env, "run", "test", "bad", "--server", s.URL, "--follow")
	if res.code == 0 {
		t.Errorf("run test bad --follow: exit 0 for a failing test\nstdout:\n%s\nstderr:\n%s", res.stdout, res.stderr)
	}
	if !slices.Contains(strings.Split(res.stdout, "\n"), "disk 97% full") {
		t.Errorf("run test bad --follow: stdout lacks the failing script's line:\n%s", res.stdout)
	}

	// Without --follow: the command id alone on stdout, usable with logs.
	res = runCLI(t, env, "run", "test", "good", "--server", s.URL)
	if res.code != 0 {
		t.Fatalf("run test good: exit %d: %s", res.code, res.stderr)
	}
	id := singleLine(t, "run test good", res.stdout)
	if c := s.WaitCommand(id); c.State != typesv1.CommandState_COMMAND_STATE_SUCCEEDED || c.HostId != "good" {
		t.Errorf("command %s printed by run: %s on %s", id, c.State, c.HostId)
	}
	res = runCLI(t, env, "logs", id, "--server", s.URL)
	if res.code != 0 || !slices.Contains(strings.Split(res.stdout, "\n"), "disk 40% full") {
		t.Errorf("logs %s: exit %d, stdout:\n%s\nstderr:\n%s", id, res.code, res.stdout, res.stderr)
	}

	// No token: a clear usage error, not a hang or a crash.
	res = runCLI(t, nil, "run", "test", "good", "--server", s.URL)
	if res.code == 0 || !strings.Contains(res.stderr, "NIXPLANE_TOKEN") {
		t.Errorf("run without a token: exit %d, stderr %q", res.code, res.stderr)
	}
}

// TestCLIHostsJSON: `nixplane hosts --server URL --json` is JSON with the
// hosts in it.
func TestCLIHostsJSON(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "alpha")
	s.StartAgent(f, "alpha", AgentOptions{})
	s.AddHost("beta")
	s.WaitOnline("alpha")

	res := runCLI(t, []string{"NIXPLANE_TOKEN=" + s.AdminToken}, "hosts", "--server", s.URL, "--json")
	if res.code != 0 {
		t.Fatalf("hosts --json: exit %d: %s", res.code, res.stderr)
	}
	var plain struct {
		Hosts []map[string]any `json:"hosts"`
	}
	if err := json.Unmarshal([]byte(res.stdout), &plain); err != nil {
		t.Fatalf("hosts --json is not JSON: %v\n%s", err, res.stdout)
	}
	var list fleetv1.ListHostsResponse
	if err := protojson.Unmarshal([]byte(res.stdout), &list); err != nil {
		t.Fatalf("hosts --json does not decode as ListHostsResponse: %v", err)
	}
	byID := map[string]*fleetv1.Host{}
	for _, h := range list.Hosts {
		byID[h.HostId] = h
	}
	if h := byID["alpha"]; h == nil || !h.Online || h.Generation != f.Head() {
		t.Errorf("hosts --json: alpha is %v, want online at %s", h, f.Head())
	}
	if h := byID["beta"]; h == nil || h.Online {
		t.Errorf("hosts --json: beta is %v, want present and offline", h)
	}
	if len(plain.Hosts) != 2 || plain.Hosts[0]["host_id"] != "alpha" {
		t.Errorf("hosts --json: want 2 hosts sorted by host_id (proto field names), got %v", plain.Hosts)
	}
}

// TestCLISecretsOnStdout: `tokens create` and `hosts add` against a data
// directory print the secret alone on one stdout line, and the secrets
// work against the server that runs on that directory.
func TestCLISecretsOnStdout(t *testing.T) {
	s := StartServer(t)
	f := NewFleet(t, "gamma")

	res := runCLI(t, nil, "tokens", "create", "ci", "--data-dir", s.DataDir)
	if res.code != 0 {
		t.Fatalf("tokens create ci: exit %d: %s", res.code, res.stderr)
	}
	token := singleLine(t, "tokens create ci", res.stdout)
	if strings.Contains(res.stderr, token) {
		t.Error("tokens create printed the secret on stderr too")
	}
	if r := s.Do("GET", "/api/hosts", token, nil); r.code != http.StatusOK {
		t.Errorf("GET /api/hosts with the new read token: %d %s", r.code, r.body)
	}
	// Default scope is read: it cannot run commands.
	if r := s.Do("POST", "/api/hosts/gamma/commands", token, []byte(`{"command": "test"}`)); r.code != http.StatusForbidden {
		t.Errorf("RunCommand with a read token: %d, want 403: %s", r.code, r.body)
	}
	// The same name twice is refused and prints no secret.
	res = runCLI(t, nil, "tokens", "create", "ci", "--data-dir", s.DataDir)
	if res.code == 0 || res.stdout != "" {
		t.Errorf("tokens create ci again: exit %d, stdout %q", res.code, res.stdout)
	}

	// A host registered offline while the server runs can connect.
	res = runCLI(t, nil, "hosts", "add", "gamma", "--data-dir", s.DataDir)
	if res.code != 0 {
		t.Fatalf("hosts add gamma: exit %d: %s", res.code, res.stderr)
	}
	agentToken := singleLine(t, "hosts add gamma", res.stdout)
	a := s.StartAgentWithToken(f, "gamma", agentToken, AgentOptions{})
	waitFor(t, stateTimeout, func() (bool, string) {
		// The running server learns of a host registered behind its back
		// when the host's agent connects.
		r := s.Do("GET", "/api/hosts/gamma", s.AdminToken, nil)
		var h fleetv1.GetHostResponse
		ok := r.code == http.StatusOK && unmarshalJSON.Unmarshal(r.body, &h) == nil && h.Host.GetOnline()
		return ok, "GET /api/hosts/gamma: " + string(r.body) + "\nagent log:\n" + a.log.String()
	})
}
