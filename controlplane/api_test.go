package controlplane_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
)

// rest sends a REST call with a bearer token and returns status and body;
// every answer must be JSON.
func rest(t *testing.T, addr, token, method, path, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+addr+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("%s %s answered %q, not JSON", method, path, ct)
	}
	if resp.Header.Get("X-Content-Type-Options") != "nosniff" {
		t.Fatalf("%s %s answered without nosniff", method, path)
	}
	return resp.StatusCode, string(b)
}

// TestBadInputGetsClearErrors sends malformed, hostile and unknown input to
// every mutating REST route and checks the status code, that the answer is
// a JSON error, and that nothing was created by a refused call.
func TestBadInputGetsClearErrors(t *testing.T) {
	addr, admin, _ := startServer(t, adminv1.Scope_SCOPE_ADMIN)
	cases := []struct {
		name, method, path, body string
		want                     int
	}{
		{"hostile host name", "POST", "/api/hosts", `{"hostname":"<img src=x onerror=alert(1)>"}`, 400},
		{"upper-case host name", "POST", "/api/hosts", `{"hostname":"Web-1"}`, 400},
		{"empty host name", "POST", "/api/hosts", `{}`, 400},
		{"host name too long", "POST", "/api/hosts", `{"hostname":"` + strings.Repeat("a", 64) + `"}`, 400},
		{"bad theme colour", "POST", "/api/hosts", `{"hostname":"ok-1","theme_color":"red; background:url(x)"}`, 400},
		{"existing host", "POST", "/api/hosts", `{"hostname":"m-1"}`, 409},
		{"malformed JSON", "POST", "/api/hosts", `{"hostname":`, 400},
		{"unknown field", "POST", "/api/hosts", `{"hostname":"ok-2","root":true}`, 400},
		{"bad token name", "POST", "/api/tokens", `{"name":"a b/c"}`, 400},
		{"unknown scope", "POST", "/api/tokens", `{"name":"t1","scope":99}`, 400},
		{"negative ttl", "POST", "/api/tokens", `{"name":"t2","ttl":"-5s"}`, 400},
		{"existing token", "POST", "/api/tokens", `{"name":"test-token"}`, 409},
		{"revoke unknown token", "DELETE", "/api/tokens/nope", ``, 404},
		{"bulk without hosts", "POST", "/api/bulk-commands", `{"command":"pull"}`, 400},
		{"bulk unknown host", "POST", "/api/bulk-commands", `{"command":"pull","host_ids":["ghost"]}`, 404},
		{"bulk host twice", "POST", "/api/bulk-commands", `{"command":"pull","host_ids":["m-1","m-1"]}`, 400},
		{"bulk unknown command", "POST", "/api/bulk-commands", `{"command":"rm -rf","host_ids":["m-1"]}`, 409},
		{"unknown bulk run", "GET", "/api/bulk-commands/nope", ``, 404},
		{"run unknown command", "POST", "/api/hosts/m-1/commands", `{"command":"format-disk"}`, 409},
		{"run on unknown host", "POST", "/api/hosts/ghost/commands", `{"command":"pull"}`, 404},
		{"bad page token", "GET", "/api/commands?page_token=%%%", ``, 400},
		{"commands of unknown host", "GET", "/api/hosts/ghost/commands", ``, 404},
		{"unknown command id", "GET", "/api/commands/nope", ``, 404},
		{"log of unknown command", "GET", "/api/commands/nope/log", ``, 404},
		{"stop unknown command", "POST", "/api/commands/nope/stop", `{}`, 404},
		{"rotate unknown host", "POST", "/api/hosts/ghost/token/rotate", `{}`, 404},
		{"remove unknown host", "DELETE", "/api/hosts/ghost", ``, 404},
		{"merge and deploy unconfigured", "POST", "/api/pending-pr/merge-and-deploy", `{"pr_number":1}`, 501},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, body := rest(t, addr, admin, tc.method, tc.path, tc.body)
			if code != tc.want {
				t.Fatalf("%s %s: %d %s, want %d", tc.method, tc.path, code, body, tc.want)
			}
			var e struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
			}
			if err := json.Unmarshal([]byte(body), &e); err != nil || e.Code == 0 || e.Message == "" {
				t.Fatalf("not a JSON error: %q", body)
			}
		})
	}
	code, body := rest(t, addr, admin, "GET", "/api/hosts", "")
	if code != 200 || strings.Count(body, `"host_id"`) != 1 {
		t.Fatalf("refused calls created hosts: %d %s", code, body)
	}
	code, body = rest(t, addr, admin, "GET", "/api/tokens", "")
	if code != 200 || strings.Count(body, `"name"`) != 1 {
		t.Fatalf("refused calls created tokens: %d %s", code, body)
	}
}

// TestRotatedTokenClosesStream: rotating a host's token ends its live
// stream and the old token is refused from then on; the new one works.
func TestRotatedTokenClosesStream(t *testing.T) {
	addr, admin, hostToken := startServer(t, adminv1.Scope_SCOPE_ADMIN)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	connect := func(tok string) (agentv1.AgentService_ConnectClient, error) {
		ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+tok), 20*time.Second)
		t.Cleanup(cancel)
		s, err := agentv1.NewAgentServiceClient(conn).Connect(ctx)
		if err != nil {
			return nil, err
		}
		if err := s.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: &agentv1.Hello{Hostname: "m-1", AgentVersion: "0.1.0"}}}); err != nil {
			return nil, err
		}
		_, err = s.Recv() // welcome, or the refusal
		return s, err
	}
	old, err := connect(hostToken)
	if err != nil {
		t.Fatalf("connect with the host token: %v", err)
	}
	code, body := rest(t, addr, admin, "POST", "/api/hosts/m-1/token/rotate", `{}`)
	if code != 200 {
		t.Fatalf("rotate: %d %s", code, body)
	}
	var r struct {
		AgentToken string `json:"agent_token"`
	}
	if err := json.Unmarshal([]byte(body), &r); err != nil || !strings.HasPrefix(r.AgentToken, "npa_") {
		t.Fatalf("rotate answer: %s", body)
	}
	if _, err := old.Recv(); err == nil {
		t.Fatal("the stream of the rotated token stayed open")
	}
	if _, err := connect(hostToken); err == nil {
		t.Fatal("the old token still connects")
	}
	if _, err := connect(r.AgentToken); err != nil {
		t.Fatalf("the new token: %v", err)
	}
}

// TestHostileAgentMessageEndsStream: a heartbeat with a non-hex generation
// ends the agent's stream with InvalidArgument, and the host's record keeps
// the generation its hello gave.
func TestHostileAgentMessageEndsStream(t *testing.T) {
	addr, admin, hostToken := startServer(t, adminv1.Scope_SCOPE_ADMIN)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+hostToken), 20*time.Second)
	defer cancel()
	s, err := agentv1.NewAgentServiceClient(conn).Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: &agentv1.Hello{Hostname: "m-1", Generation: "abc1234"}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatalf("welcome: %v", err)
	}
	if err := s.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Heartbeat{Heartbeat: &agentv1.Heartbeat{
		Generation: "<img src=x onerror=alert(1)>"}}}); err != nil {
		t.Fatal(err)
	}
	_, err = s.Recv()
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("stream ended with %v, want InvalidArgument", err)
	}
	code, body := rest(t, addr, admin, "GET", "/api/hosts/m-1", "")
	if code != 200 || !strings.Contains(body, `"generation":"abc1234"`) {
		t.Fatalf("host record after a hostile heartbeat: %d %s", code, body)
	}
}
