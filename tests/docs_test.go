package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nixplane/nixplane/controlplane/status"
)

// The documentation's runnable recipes. A recipe is marked by an HTML
// comment `<!-- tested -->` on the line before either a fenced ```sh block
// (the whole block is one recipe) or a table (every inline code span of a
// row that starts with `curl ` is one recipe). Other blocks are prose with
// placeholders and are not run.
//
// The test runs each recipe verbatim with bash (set -euo pipefail), in
// document order, as one operator session: variables a recipe sets are
// visible to the recipes after it in the same document. It rewrites only the
// addresses and paths in docSubstitutions. Every recipe needs an entry in
// the document's check table, and every entry needs its recipe, so a
// changed recipe cannot go untested.

// docRecipe is one runnable recipe of a document.
type docRecipe struct {
	doc  string
	line int
	text string
}

var (
	testedMarker = regexp.MustCompile(`^\s*<!--\s*tested\s*-->\s*$`)
	inlineCode   = regexp.MustCompile("`([^`]+)`")
)

// extractRecipes returns the runnable recipes of a markdown document.
func extractRecipes(name, text string) ([]docRecipe, error) {
	lines := strings.Split(text, "\n")
	var out []docRecipe
	for i := 0; i < len(lines); i++ {
		if !testedMarker.MatchString(lines[i]) {
			continue
		}
		j := i + 1
		for j < len(lines) && strings.TrimSpace(lines[j]) == "" {
			j++
		}
		if j == len(lines) {
			return nil, fmt.Errorf("%s:%d: tested marker at the end of the document", name, i+1)
		}
		switch next := strings.TrimSpace(lines[j]); {
		case next == "```sh" || next == "```bash":
			var body []string
			k := j + 1
			for ; k < len(lines) && strings.TrimSpace(lines[k]) != "```"; k++ {
				body = append(body, lines[k])
			}
			if k == len(lines) {
				return nil, fmt.Errorf("%s:%d: unterminated code block", name, j+1)
			}
			if len(body) == 0 {
				return nil, fmt.Errorf("%s:%d: empty tested code block", name, j+1)
			}
			out = append(out, docRecipe{doc: name, line: j + 2, text: strings.Join(body, "\n")})
			i = k
		case strings.HasPrefix(next, "|"):
			n := 0
			k := j
			for ; k < len(lines) && strings.HasPrefix(strings.TrimSpace(lines[k]), "|"); k++ {
				for _, m := range inlineCode.FindAllStringSubmatch(lines[k], -1) {
					if strings.HasPrefix(m[1], "curl ") {
						out = append(out, docRecipe{doc: name, line: k + 1, text: m[1]})
						n++
					}
				}
			}
			if n == 0 {
				return nil, fmt.Errorf("%s:%d: tested table without curl recipes", name, j+1)
			}
			i = k - 1
		default:
			return nil, fmt.Errorf("%s:%d: tested marker not followed by a ```sh block or a table", name, i+1)
		}
	}
	return out, nil
}

// docCheck judges one recipe's standard output; stream recipes do not end
// by themselves and are stopped once their check passes.
type docCheck struct {
	stream bool
	check  func(out string, env *docEnv) error
}

// docEnv is what checks know about the session.
type docEnv struct {
	server *Server
	// vars are the session's variables after the previous recipe.
	vars map[string]string
}

// jsonValues decodes every JSON value of out in order.
func jsonValues(out string) ([]any, error) {
	dec := json.NewDecoder(strings.NewReader(out))
	dec.UseNumber()
	var vs []any
	for {
		var v any
		err := dec.Decode(&v)
		if errors.Is(err, io.EOF) {
			if len(vs) == 0 {
				return nil, errors.New("no JSON in the output")
			}
			return vs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("output is not JSON: %v", err)
		}
		vs = append(vs, v)
	}
}

// oneJSON decodes out as exactly one JSON object.
func oneJSON(out string) (map[string]any, error) {
	vs, err := jsonValues(out)
	if err != nil {
		return nil, err
	}
	if len(vs) != 1 {
		return nil, fmt.Errorf("want one JSON value, got %d", len(vs))
	}
	m, ok := vs[0].(map[string]any)
	if !ok {
		return nil, fmt.Errorf("want a JSON object, got %T", vs[0])
	}
	return m, nil
}

// dig follows keys (strings) and indexes (ints) into a decoded JSON value.
func dig(v any, path ...any) (any, error) {
	for i, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				return nil, fmt.Errorf("%v: not an object", path[:i])
			}
			if v, ok = m[k]; !ok {
				return nil, fmt.Errorf("%v: no field %q", path[:i], k)
			}
		case int:
			a, ok := v.([]any)
			if !ok || k >= len(a) {
				return nil, fmt.Errorf("%v: no element %d", path[:i], k)
			}
			v = a[k]
		}
	}
	return v, nil
}

// wantField checks that the JSON object in out has want at path.
func wantField(out string, want any, path ...any) error {
	m, err := oneJSON(out)
	if err != nil {
		return err
	}
	return wantIn(m, want, path...)
}

func wantIn(v any, want any, path ...any) error {
	got, err := dig(v, path...)
	if err != nil {
		return err
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		return fmt.Errorf("%v is %v, want %v", path, got, want)
	}
	return nil
}

// nonEmpty checks that the JSON object in out has a non-empty string at
// path.
func nonEmpty(v any, path ...any) error {
	got, err := dig(v, path...)
	if err != nil {
		return err
	}
	if s, ok := got.(string); !ok || s == "" {
		return fmt.Errorf("%v is %v, want a non-empty string", path, got)
	}
	return nil
}

// all runs checks in order and returns the first failure.
func all(errs ...error) error {
	return errors.Join(errs...)
}

// contains checks that out holds every substring.
func contains(out string, subs ...string) error {
	for _, s := range subs {
		if !strings.Contains(out, s) {
			return fmt.Errorf("output lacks %q", s)
		}
	}
	return nil
}

// hostIDs returns the host_id of every element of list.
func hostIDs(list any) []string {
	a, _ := list.([]any)
	var ids []string
	for _, e := range a {
		if m, ok := e.(map[string]any); ok {
			ids = append(ids, fmt.Sprint(m["host_id"]))
		}
	}
	return ids
}

// fieldValues returns field of every element of the list at key of the
// JSON object in out.
func fieldValues(out, key, field string) ([]string, error) {
	m, err := oneJSON(out)
	if err != nil {
		return nil, err
	}
	list, ok := m[key].([]any)
	if !ok {
		return nil, fmt.Errorf("no list %q in the answer", key)
	}
	var vs []string
	for _, e := range list {
		if o, ok := e.(map[string]any); ok {
			vs = append(vs, fmt.Sprint(o[field]))
		}
	}
	return vs, nil
}

// firstLineJSON decodes the first line of a newline-delimited JSON stream.
func firstLineJSON(out string) (map[string]any, error) {
	line, _, ok := strings.Cut(out, "\n")
	if !ok {
		return nil, errors.New("no complete line yet")
	}
	return oneJSON(line)
}

// snapshotHasWeb1 checks that a REST watch started with a snapshot holding
// web-1.
func snapshotHasWeb1(out string, _ *docEnv) error {
	m, err := firstLineJSON(out)
	if err != nil {
		return err
	}
	hosts, err := dig(m, "result", "events", 0, "snapshot", "hosts")
	if err != nil {
		return err
	}
	if !slices.Contains(hostIDs(hosts), "web-1") {
		return fmt.Errorf("snapshot hosts %v lack web-1", hostIDs(hosts))
	}
	return nil
}

// apiChecks are the checks of docs/api.md's recipes, keyed by the recipe
// text as written.
var apiChecks = map[string]docCheck{
	`S=http://127.0.0.1:8080 H="Authorization: Bearer $TOKEN"
curl -s $S/healthz`: {check: func(out string, _ *docEnv) error {
		if out != "ok\n" {
			return fmt.Errorf("healthz answered %q", out)
		}
		return nil
	}},

	`ID=$(curl -s -X POST -H "$H" -d '{"command":"pull-switch"}' $S/api/hosts/web-1/commands | jq -r .command.command_id)
curl -sN -H "$H" $S/api/commands/$ID/log/follow | jq -r '.result.lines[].text'
curl -s -H "$H" $S/api/commands/$ID | jq -r .command.state`: {check: func(out string, _ *docEnv) error {
		lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
		if lines[len(lines)-1] != "COMMAND_STATE_SUCCEEDED" {
			return fmt.Errorf("last line %q, want COMMAND_STATE_SUCCEEDED", lines[len(lines)-1])
		}
		return contains(out, "pull-switch started on web-1", "rebuild switch --flake")
	}},

	`curl -s -H "$H" $S/api/hosts`: {check: func(out string, _ *docEnv) error {
		m, err := oneJSON(out)
		if err != nil {
			return err
		}
		if ids := hostIDs(m["hosts"]); !slices.Contains(ids, "web-1") {
			return fmt.Errorf("hosts %v lack web-1", ids)
		}
		return nil
	}},
	`curl -s -H "$H" $S/api/hosts/web-1`: {check: func(out string, _ *docEnv) error {
		return all(wantField(out, "web-1", "host", "host_id"), wantField(out, true, "host", "online"))
	}},
	`curl -s -X POST -H "$H" $S/api/hosts/web-1/refresh`: {check: func(out string, _ *docEnv) error {
		m, err := oneJSON(out)
		if err != nil {
			return err
		}
		_, err = dig(m, "host", "update_status", "git", "status")
		return all(wantIn(m, "web-1", "host_id"), wantIn(m, true, "online"), err)
	}},
	`curl -s -X POST -H "$H" -d '{"command":"test"}' $S/api/hosts/web-1/commands`: {check: func(out string, _ *docEnv) error {
		m, err := oneJSON(out)
		if err != nil {
			return err
		}
		return all(wantIn(m, "test", "command", "command"), wantIn(m, "web-1", "command", "host_id"), nonEmpty(m, "command", "command_id"))
	}},
	`curl -s -X POST -H "$H" -d '{"command":"pull","force":true}' $S/api/hosts/web-1/commands`: {check: func(out string, _ *docEnv) error {
		m, err := oneJSON(out)
		if err != nil {
			return err
		}
		return all(wantIn(m, "pull", "command", "command"), nonEmpty(m, "command", "command_id"))
	}},
	`curl -s -H "$H" $S/api/commands/$ID`: {check: func(out string, e *docEnv) error {
		return all(wantField(out, e.vars["ID"], "command", "command_id"), wantField(out, "pull-switch", "command", "command"),
			wantField(out, "COMMAND_STATE_SUCCEEDED", "command", "state"))
	}},
	`curl -s -H "$H" "$S/api/hosts/web-1/commands?page_size=20"`: {check: func(out string, _ *docEnv) error {
		m, err := oneJSON(out)
		if err != nil {
			return err
		}
		cmds, _ := m["commands"].([]any)
		if len(cmds) < 3 {
			return fmt.Errorf("%d commands, want at least the 3 run so far", len(cmds))
		}
		ids := hostIDs(cmds)
		for _, id := range ids {
			if id != "web-1" {
				return fmt.Errorf("a command of %s in web-1's list", id)
			}
		}
		// Newest first: the forced pull was the last one run.
		return all(wantIn(cmds, "pull", 0, "command"), wantIn(cmds, "pull-switch", len(cmds)-1, "command"))
	}},
	`curl -s -H "$H" $S/api/commands`: {check: func(out string, _ *docEnv) error {
		m, err := oneJSON(out)
		if err != nil {
			return err
		}
		if cmds, _ := m["commands"].([]any); len(cmds) < 3 {
			return fmt.Errorf("%d commands, want at least 3", len(cmds))
		}
		return nil
	}},
	`curl -s -H "$H" $S/api/commands/$ID/log`: {check: func(out string, e *docEnv) error {
		m, err := oneJSON(out)
		if err != nil {
			return err
		}
		lines, _ := m["lines"].([]any)
		var texts []string
		for _, l := range lines {
			texts = append(texts, fmt.Sprint(l.(map[string]any)["text"]))
		}
		return all(wantIn(m, e.vars["ID"], "command", "command_id"), wantIn(m, false, "more"),
			contains(strings.Join(texts, "\n"), "rebuild switch --flake"))
	}},
	`curl -sN -H "$H" $S/api/commands/$ID/log/follow`: {check: func(out string, _ *docEnv) error {
		vs, err := jsonValues(out)
		if err != nil {
			return err
		}
		for i, v := range vs {
			if _, err := dig(v, "result", "lines"); err != nil {
				return fmt.Errorf("message %d: %v", i, err)
			}
		}
		return all(wantIn(vs[len(vs)-1], "COMMAND_STATE_SUCCEEDED", "result", "command", "state"),
			contains(out, "rebuild switch --flake"))
	}},
	`curl -s -X POST -H "$H" $S/api/commands/$ID/stop`: {check: func(out string, e *docEnv) error {
		return all(wantField(out, e.vars["ID"], "command", "command_id"), wantField(out, "COMMAND_STATE_SUCCEEDED", "command", "state"))
	}},
	`curl -s -X POST -H "$H" -d '{"command":"test","all":true}' $S/api/bulk-commands`: {check: func(out string, _ *docEnv) error {
		m, err := oneJSON(out)
		if err != nil {
			return err
		}
		results, _ := dig(m, "bulk", "results")
		if ids := hostIDs(results); !slices.Equal(ids, []string{"web-1"}) {
			return fmt.Errorf("bulk hosts %v, want [web-1]", ids)
		}
		return all(wantIn(m, "test", "bulk", "command"), nonEmpty(m, "bulk", "bulk_id"))
	}},
	`curl -sN -H "$H" $S/api/watch`:                                         {stream: true, check: snapshotHasWeb1},
	`curl -sN -H "$H" "$S/api/watch?skip_heartbeats=true&skip_output=true"`: {stream: true, check: snapshotHasWeb1},
	`curl -s -H "$H" $S/api/target`: {check: func(out string, _ *docEnv) error {
		m, err := oneJSON(out)
		if err != nil {
			return err
		}
		// The test server has no fleet repository: no target yet.
		return all(wantIn(m, nil, "target"), wantIn(m, false, "pull_requests_configured"))
	}},
	`curl -s -H "$H" $S/api/whoami`: {check: func(out string, _ *docEnv) error {
		return all(wantField(out, "token:e2e-admin", "actor"), wantField(out, "SCOPE_ADMIN", "scope"))
	}},
	`curl -s -X POST -H "$H" -d '{"hostname":"web-2","host_type":"HOST_TYPE_NIXOS"}' $S/api/hosts`: {check: func(out string, _ *docEnv) error {
		m, err := oneJSON(out)
		if err != nil {
			return err
		}
		return all(wantIn(m, "web-2", "host", "host_id"), wantIn(m, "HOST_TYPE_NIXOS", "host", "host_type"), nonEmpty(m, "agent_token"))
	}},
	`curl -s -X POST -H "$H" $S/api/hosts/web-2/token/rotate`: {check: func(out string, _ *docEnv) error {
		m, err := oneJSON(out)
		if err != nil {
			return err
		}
		return nonEmpty(m, "agent_token")
	}},
	`curl -s -X DELETE -H "$H" $S/api/hosts/web-2`: {check: func(out string, e *docEnv) error {
		if _, err := oneJSON(out); err != nil {
			return err
		}
		if r := e.server.Do("GET", "/api/hosts/web-2", e.server.AdminToken, nil); r.code != 404 {
			return fmt.Errorf("web-2 after the removal: status %d, want 404", r.code)
		}
		return nil
	}},
	`curl -s -X POST -H "$H" -d '{"name":"ci-2","scope":"SCOPE_OPERATE"}' $S/api/tokens`: {check: func(out string, _ *docEnv) error {
		m, err := oneJSON(out)
		if err != nil {
			return err
		}
		return all(wantIn(m, "ci-2", "token", "name"), wantIn(m, "SCOPE_OPERATE", "token", "scope"), nonEmpty(m, "secret"))
	}},
	`curl -s -H "$H" $S/api/tokens`: {check: func(out string, _ *docEnv) error {
		names, err := fieldValues(out, "tokens", "name")
		if err != nil {
			return err
		}
		if !slices.Contains(names, "ci-2") || !slices.Contains(names, "e2e-admin") {
			return fmt.Errorf("tokens %v, want ci-2 and e2e-admin", names)
		}
		return nil
	}},
	`curl -s -X DELETE -H "$H" $S/api/tokens/ci-2`: {check: func(out string, e *docEnv) error {
		if _, err := oneJSON(out); err != nil {
			return err
		}
		r := e.server.Do("GET", "/api/tokens", e.server.AdminToken, nil)
		names, err := fieldValues(string(r.body), "tokens", "name")
		if err != nil {
			return err
		}
		if slices.Contains(names, "ci-2") {
			return fmt.Errorf("ci-2 still listed after the revoke: %v", names)
		}
		return nil
	}},
	`curl -s -H "$H" "$S/api/audit?limit=20"`: {check: func(out string, _ *docEnv) error {
		actions, err := fieldValues(out, "events", "action")
		if err != nil {
			return err
		}
		if !slices.Contains(actions, "AddHost") || !slices.Contains(actions, "RunCommand") {
			return fmt.Errorf("audit actions %v lack AddHost or RunCommand", actions)
		}
		return nil
	}},
	`curl -s -H "$H" $S/metrics`: {check: func(out string, _ *docEnv) error {
		return contains(out, "# TYPE ", "\nnixplane_")
	}},
	`curl -s $S/api/openapi.json`: {check: func(out string, _ *docEnv) error {
		m, err := oneJSON(out)
		if err != nil {
			return err
		}
		_, err = dig(m, "paths", "/api/hosts/{host_id}/commands")
		return err
	}},

	`curl -s -w '%{http_code}\n' -X POST -H "$H" -d '{"command":"reboot-now"}' $S/api/hosts/web-1/commands
curl -s -X POST -H "$H" -d '{"command":"reboot-now"}' $S/api/hosts/web-1/commands | jq -r '.details[0].reason'`: {check: func(out string, _ *docEnv) error {
		if !strings.HasSuffix(out, "}409\nBLOCK_REASON_UNKNOWN_COMMAND\n") {
			return fmt.Errorf("want the error JSON, 409 and BLOCK_REASON_UNKNOWN_COMMAND, got %q", out)
		}
		body := strings.TrimSuffix(out, "409\nBLOCK_REASON_UNKNOWN_COMMAND\n")
		return all(wantField(body, "9", "code"), nonEmpty(mustJSON(body), "message"))
	}},

	`grpcurl -plaintext 127.0.0.1:8080 list
grpcurl -plaintext 127.0.0.1:8080 describe nixplane.fleet.v1.FleetService
grpcurl -plaintext 127.0.0.1:8080 grpc.health.v1.Health/Check
A="authorization: Bearer $TOKEN" F=nixplane.fleet.v1.FleetService
grpcurl -plaintext -H "$A" 127.0.0.1:8080 $F/ListHosts
grpcurl -plaintext -H "$A" -d '{"host_id":"web-1"}' 127.0.0.1:8080 $F/RefreshHost
GID=$(grpcurl -plaintext -H "$A" -d '{"host_id":"web-1","command":"switch"}' 127.0.0.1:8080 $F/RunCommand | jq -r .command.commandId)
grpcurl -plaintext -H "$A" -d "{\"command_id\":\"$GID\"}" 127.0.0.1:8080 $F/FollowCommandLog
grpcurl -plaintext -H "$A" -d "{\"command_id\":\"$GID\"}" 127.0.0.1:8080 $F/StopCommand`: {check: func(out string, _ *docEnv) error {
		return contains(protoJSONSpaces(out), "nixplane.fleet.v1.FleetService\n", "nixplane.admin.v1.AdminService\n",
			"service FleetService {", "rpc RunCommand", `"status": "SERVING"`, `"hostId": "web-1"`,
			"rebuild switch --flake", `"command": "switch"`, `"state": "COMMAND_STATE_SUCCEEDED"`)
	}},
	`grpcurl -plaintext -H "$A" -d '{"skip_heartbeats":true}' 127.0.0.1:8080 $F/WatchFleet`: {stream: true, check: func(out string, _ *docEnv) error {
		return contains(protoJSONSpaces(out), `"snapshot": {`, `"hostId": "web-1"`, `"serverVersion"`)
	}},

	`export NIXPLANE_SERVER=$S NIXPLANE_TOKEN=$TOKEN
nixplane hosts
nixplane status web-1
nixplane refresh web-1
nixplane run test web-1 --follow
nixplane logs $ID`: {check: func(out string, _ *docEnv) error {
		return all(contains(out, "HOST  ", "web-1  true", "web-1  online", "configuration present", "rebuild switch --flake"),
			regexpIn(out, `(?m)^  git\s+\S+`))
	}},
}

// protoJSONSpaces normalizes the space after a key's colon, which protojson
// varies on purpose between builds.
func protoJSONSpaces(out string) string {
	return regexp.MustCompile(`":\s+`).ReplaceAllString(out, `": `)
}

func mustJSON(s string) map[string]any {
	m, _ := oneJSON(s)
	return m
}

func regexpIn(out, re string) error {
	if !regexp.MustCompile(re).MatchString(out) {
		return fmt.Errorf("output does not match %s", re)
	}
	return nil
}

// docSubstitutions are the only rewrites of a recipe: the documented
// address and paths become the test server's.
func docSubstitutions(s *Server, backupDir string) *strings.Replacer {
	return strings.NewReplacer(
		"127.0.0.1:8080", s.Addr,
		"/var/lib/nixplane/", s.DataDir+"/",
		"/var/lib/nixplane ", s.DataDir+" ",
		"/var/lib/nixplane\n", s.DataDir+"\n",
		"/var/backup/", backupDir+"/",
	)
}

// docSession runs the recipes of one document as one shell session.
type docSession struct {
	t *testing.T
	s *Server
	// dir is the session's working directory.
	dir   string
	env   []string
	state string
	repl  *strings.Replacer
}

// syncBuffer is a bytes.Buffer safe for a writer goroutine and a reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// vars reads the session's variables as the last recipe left them.
func (d *docSession) vars() map[string]string {
	d.t.Helper()
	out, err := exec.Command("bash", "-c", `set -a; . "$1"; env -0`, "bash", d.state).Output()
	if err != nil {
		d.t.Fatalf("read the session variables: %v", err)
	}
	vars := map[string]string{}
	for _, kv := range strings.Split(string(out), "\x00") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			vars[k] = v
		}
	}
	return vars
}

// run runs one recipe and checks it.
func (d *docSession) run(r docRecipe, c docCheck) {
	t := d.t
	t.Helper()
	script := "set -a\n. \"$DOCTEST_STATE\"\nset -euo pipefail\n" + d.repl.Replace(r.text) + "\nexport -p > \"$DOCTEST_STATE.next\"\n"
	timeout := 90 * time.Second
	if c.stream {
		timeout = stateTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "-c", script)
	cmd.Dir = d.dir
	cmd.Env = append(slices.Clone(d.env), "DOCTEST_STATE="+d.state)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr syncBuffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	env := &docEnv{server: d.s, vars: d.vars()}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start bash: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	fail := func(format string, args ...any) {
		t.Helper()
		t.Errorf("%s:%d: %s\nrecipe:\n%s\nstdout:\n%s\nstderr:\n%s", r.doc, r.line, fmt.Sprintf(format, args...), r.text, stdout.String(), stderr.String())
	}
	if c.stream {
		// Poll until the first output passes the check, then stop the
		// stream; a stream that ends by itself is a failure.
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		var last error
		for {
			select {
			case err := <-done:
				fail("the stream ended by itself (%v); last check: %v", err, last)
				return
			case <-ctx.Done():
				<-done
				fail("no passing output within %s: %v", timeout, last)
				return
			case <-tick.C:
			}
			if last = c.check(stdout.String(), env); last == nil {
				cancel()
				<-done
				return
			}
		}
	}
	if err := <-done; err != nil {
		fail("exit: %v", err)
		return
	}
	if err := c.check(stdout.String(), env); err != nil {
		fail("check: %v", err)
		return
	}
	if err := os.Rename(d.state+".next", d.state); err != nil {
		t.Fatalf("keep the session variables: %v", err)
	}
}

// waitIdle waits until no host runs a command, as an operator would before
// the next recipe.
func waitIdle(t *testing.T, s *Server) {
	t.Helper()
	waitFor(t, commandTimeout, func() (bool, string) {
		rc := s.Host("web-1").GetRunningCommand()
		return rc == nil, fmt.Sprintf("web-1 still runs %s %s", rc.GetCommand(), rc.GetCommandId())
	})
}

// grpcurlPath returns a directory holding grpcurl: the one on PATH, or one
// built with go install into dir (through the Go module proxy).
func grpcurlPath(dir string) (string, error) {
	if p, err := exec.LookPath("grpcurl"); err == nil {
		return filepath.Dir(p), nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "install", "github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOBIN="+dir, "CGO_ENABLED=0", "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go install grpcurl: %v\n%s", err, out)
	}
	return dir, nil
}

// docRecipes reads a document and pairs each recipe with its check.
func docRecipes(t *testing.T, name string, checks map[string]docCheck) []docRecipe {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", name))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := extractRecipes(name, string(b))
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, r := range rs {
		if _, ok := checks[r.text]; !ok {
			t.Errorf("%s:%d: recipe without a check in tests/docs_test.go:\n%s", r.doc, r.line, r.text)
		}
		seen[r.text] = true
	}
	for text := range checks {
		if !seen[text] {
			t.Errorf("%s: a check's recipe is no longer in the document:\n%s", name, text)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return rs
}

// docTools returns the PATH for recipes: nixplane, jq, curl, and grpcurl
// when it could be had (needGRPCurl says whether a recipe needs it).
func docTools(t *testing.T, needGRPCurl bool) (path string, haveGRPCurl bool) {
	t.Helper()
	for _, tool := range []string{"bash", "curl", "jq"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("the documented recipes need %s on PATH (apt-get install %s): %v", tool, tool, err)
		}
	}
	path = filepath.Dir(bins.nixplane) + string(os.PathListSeparator) + os.Getenv("PATH")
	if !needGRPCurl {
		return path, false
	}
	dir, err := grpcurlPath(t.TempDir())
	if err != nil {
		if os.Getenv("NIXPLANE_REQUIRE_GRPCURL") == "1" {
			t.Fatalf("grpcurl is required (NIXPLANE_REQUIRE_GRPCURL=1): %v", err)
		}
		t.Logf("grpcurl is not available, its recipes are skipped: %v", err)
		return path, false
	}
	return dir + string(os.PathListSeparator) + path, true
}

// newDocSession prepares a session against s with TOKEN set to token.
func newDocSession(t *testing.T, s *Server, token, path string, repl *strings.Replacer) *docSession {
	state := filepath.Join(t.TempDir(), "session.env")
	if err := os.WriteFile(state, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	env := baseEnv("TOKEN="+token, "PATH="+path)
	return &docSession{t: t, s: s, dir: t.TempDir(), env: env, state: state, repl: repl}
}

// TestDocsAPIRecipes runs every tested recipe of docs/api.md against a
// server with a live agent for web-1.
func TestDocsAPIRecipes(t *testing.T) {
	rs := docRecipes(t, "docs/api.md", apiChecks)
	needGRPCurl := slices.ContainsFunc(rs, func(r docRecipe) bool { return strings.Contains(r.text, "grpcurl ") })
	path, haveGRPCurl := docTools(t, needGRPCurl)

	s := StartServer(t)
	f := NewFleet(t, "web-1")
	s.StartAgent(f, "web-1", AgentOptions{})
	s.WaitOnline("web-1")
	d := newDocSession(t, s, s.AdminToken, path, docSubstitutions(s, t.TempDir()))
	ran := 0
	for _, r := range rs {
		if strings.Contains(r.text, "grpcurl ") && !haveGRPCurl {
			t.Logf("%s:%d: skipped: grpcurl is not available", r.doc, r.line)
			continue
		}
		waitIdle(t, s)
		d.run(r, apiChecks[r.text])
		if t.Failed() {
			return // later recipes build on this one
		}
		ran++
	}
	t.Logf("%d of %d recipes of docs/api.md ran and passed", ran, len(rs))
}

// TestExtractRecipes: the extractor finds marked blocks and table rows,
// ignores unmarked ones and refuses a dangling marker.
func TestExtractRecipes(t *testing.T) {
	doc := "intro\n```sh\nnot run $PLACEHOLDER\n```\n<!-- tested -->\n```sh\necho a\necho b\n```\n\n<!-- tested -->\n| what | request |\n|---|---|\n| x | `curl -s $S/a` and `jq` |\n| y | `curl -s $S/b` |\n\ntail\n"
	rs, err := extractRecipes("x.md", doc)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range rs {
		got = append(got, fmt.Sprintf("%d:%s", r.line, r.text))
	}
	want := []string{"7:echo a\necho b", "14:curl -s $S/a", "15:curl -s $S/b"}
	if !slices.Equal(got, want) {
		t.Errorf("recipes %q, want %q", got, want)
	}
	for _, bad := range []string{"<!-- tested -->\nprose\n", "<!-- tested -->\n```sh\necho\n", "<!-- tested -->\n"} {
		if _, err := extractRecipes("bad.md", bad); err == nil {
			t.Errorf("extractRecipes(%q) accepted a dangling marker", bad)
		}
	}
}

// sqlite3 runs the sqlite3 shell on db and returns its output.
func sqlite3(t *testing.T, db, sql string) string {
	t.Helper()
	out, err := exec.Command("sqlite3", db, sql).CombinedOutput()
	if err != nil {
		t.Fatalf("sqlite3 %s %q: %v\n%s", db, sql, err, out)
	}
	return string(out)
}

// copyToDataDir copies a database file into a new data directory as
// nixplane.db and returns the directory.
func copyToDataDir(t *testing.T, db string) string {
	t.Helper()
	b, err := os.ReadFile(db)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "nixplane.db"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// backupHolds opens a copy of the backup db as a data directory, offline
// with the CLI, and checks that it holds exactly hosts.
func backupHolds(t *testing.T, db string, hosts ...string) error {
	t.Helper()
	res := runCLI(t, nil, "hosts", "list", "--data-dir", copyToDataDir(t, db), "--json")
	if res.code != 0 {
		return fmt.Errorf("hosts list on %s: exit %d: %s", db, res.code, res.stderr)
	}
	m, err := oneJSON(res.stdout)
	if err != nil {
		return fmt.Errorf("hosts list on %s: %v", db, err)
	}
	if ids := hostIDs(m["hosts"]); !slices.Equal(ids, hosts) {
		return fmt.Errorf("hosts in %s: %v, want %v", db, ids, hosts)
	}
	return nil
}

// TestDocsOperationsRecipes runs the tested recipes of docs/operations.md:
// an online backup taken while a command writes its log, a compacted copy,
// the schema query, and token rotation through the CLI. It also checks the
// guide's claims around them: the backup opens and holds the fleet, a newer
// schema is refused with the message the guide quotes, a rotated agent
// token takes the host offline and the new one brings it back, and a
// revoked API token is refused.
func TestDocsOperationsRecipes(t *testing.T) {
	if _, err := exec.LookPath("sqlite3"); err != nil {
		t.Fatalf("the backup recipes need sqlite3 on PATH (apt-get install sqlite3): %v", err)
	}
	path, _ := docTools(t, false)
	s := StartServer(t)
	f := NewFleet(t, "web-1")
	// A switch that writes its log for a while: the backup runs meanwhile.
	agent := s.StartAgent(f, "web-1", AgentOptions{Rebuild: "#!/bin/sh\ni=0\nwhile [ $i -lt 300 ]; do echo \"building unit $i\"; i=$((i+1)); sleep 0.01; done\necho 'switch done'\n"})
	s.WaitOnline("web-1")
	var oldCI struct {
		Secret string `json:"secret"`
	}
	r := s.Do("POST", "/api/tokens", s.AdminToken, []byte(`{"name":"ci","scope":"SCOPE_OPERATE"}`))
	if err := json.Unmarshal(r.body, &oldCI); r.code != 200 || err != nil || oldCI.Secret == "" {
		t.Fatalf("create token ci: %d %s", r.code, r.body)
	}
	backups := t.TempDir()
	d := newDocSession(t, s, s.AdminToken, path, docSubstitutions(s, backups))
	var running string

	checks := map[string]docCheck{
		`B=/var/backup/nixplane-$(date +%F).db
sqlite3 /var/lib/nixplane/nixplane.db ".backup '$B'"
sqlite3 "$B" 'PRAGMA integrity_check'`: {check: func(out string, e *docEnv) error {
			if out != "ok\n" {
				return fmt.Errorf("integrity check printed %q, want ok", out)
			}
			if c := s.Command(running); status.IsTerminal(c.State) {
				t.Logf("the switch ended (%s) before the backup did; the backup still ran against a live server", c.State)
			}
			ms, _ := filepath.Glob(filepath.Join(backups, "nixplane-*.db"))
			if len(ms) != 1 {
				return fmt.Errorf("backups %v, want one", ms)
			}
			return backupHolds(t, ms[0], "web-1")
		}},
		`sqlite3 /var/lib/nixplane/nixplane.db "VACUUM INTO '/var/backup/nixplane-compact.db'"`: {check: func(out string, _ *docEnv) error {
			return backupHolds(t, filepath.Join(backups, "nixplane-compact.db"), "web-1")
		}},
		`sqlite3 /var/lib/nixplane/nixplane.db 'SELECT version, name FROM schema_migrations'`: {check: func(out string, _ *docEnv) error {
			return regexpIn(out, `\A1\|0001_init\n(\d+\|\d{4}_\w+\n)*\z`)
		}},
		`export NIXPLANE_SERVER=http://127.0.0.1:8080 NIXPLANE_TOKEN=$TOKEN
nixplane hosts rotate-token web-1 > web-1.token
nixplane tokens create ci-2 --scope operate > ci-2.token
nixplane tokens list
nixplane tokens revoke ci`: {check: func(out string, e *docEnv) error {
			return all(regexpIn(out, `(?m)^NAME\s+SCOPE$`), regexpIn(out, `(?m)^ci-2\s+operate$`), regexpIn(out, `(?m)^ci\s+operate$`))
		}},
	}
	rs := docRecipes(t, "docs/operations.md", checks)
	for _, rc := range rs {
		if strings.HasPrefix(rc.text, "B=/var/backup/") {
			running = s.RunCommand("web-1", "switch").CommandId
			waitFor(t, commandTimeout, func() (bool, string) {
				c := s.Command(running)
				return c.LineCount > 20 || status.IsTerminal(c.State), fmt.Sprintf("switch %s has %d lines", running, c.LineCount)
			})
		} else {
			waitIdle(t, s)
		}
		d.run(rc, checks[rc.text])
		if t.Failed() {
			return
		}
	}

	// A newer schema is refused with the message the guide quotes.
	ms, _ := filepath.Glob(filepath.Join(backups, "nixplane-*.db"))
	future := copyToDataDir(t, ms[0])
	known := strings.Count(sqlite3(t, filepath.Join(future, "nixplane.db"), "SELECT version FROM schema_migrations"), "\n")
	sqlite3(t, filepath.Join(future, "nixplane.db"), "INSERT INTO schema_migrations VALUES (9999, '9999_future', 0)")
	res := runCLI(t, nil, "hosts", "list", "--data-dir", future)
	want := fmt.Sprintf("database schema is newer than this nixplane supports: database is at version 9999, this binary knows up to %d; run a newer nixplane", known)
	if res.code == 0 || !strings.Contains(res.stderr, want) {
		t.Errorf("a database of a newer schema: exit %d, stderr %q, want %q", res.code, res.stderr, want)
	}
	guide, err := os.ReadFile("../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	quoted := strings.NewReplacer("9999", "N", fmt.Sprint(known), "M").Replace(want)
	if !strings.Contains(strings.Join(strings.Fields(string(guide)), " "), quoted) {
		t.Errorf("docs/operations.md does not quote the refusal as the server says it: %q", quoted)
	}

	// The rotated agent token: the live stream is closed, the old token
	// refused, and the new one from web-1.token brings the host back.
	s.WaitOffline("web-1", stateTimeout)
	agent.Kill()
	tok, err := os.ReadFile(filepath.Join(d.dir, "web-1.token"))
	if err != nil {
		t.Fatal(err)
	}
	s.StartAgentWithToken(f, "web-1", singleLine(t, "web-1.token", string(tok)), AgentOptions{})
	s.WaitOnline("web-1")

	// The new API token works with its scope; the revoked one is refused.
	ci2, err := os.ReadFile(filepath.Join(d.dir, "ci-2.token"))
	if err != nil {
		t.Fatal(err)
	}
	if r := s.Do("GET", "/api/whoami", singleLine(t, "ci-2.token", string(ci2)), nil); r.code != 200 || !strings.Contains(string(r.body), "SCOPE_OPERATE") {
		t.Errorf("whoami with the new token: %d %s", r.code, r.body)
	}
	if r := s.Do("GET", "/api/whoami", oldCI.Secret, nil); r.code != 401 {
		t.Errorf("whoami with the revoked token: %d %s, want 401", r.code, r.body)
	}
}
