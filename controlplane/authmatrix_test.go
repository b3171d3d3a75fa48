package controlplane_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/api/annotations"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/fleetapi"
	"github.com/nixplane/nixplane/controlplane/store"
	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// alicePassword is the seeded user alice's password.
const alicePassword = "alice's long password"

// secEnv is a running server seeded for security tests: hosts m-1, m-2 (both
// with agent tokens; m-3 never connects), API tokens of each scope, and the
// user alice with a live and an expired browser session.
type secEnv struct {
	addr   string
	origin string
	// agent tokens by host
	agent map[string]string
	// API tokens by scope name
	api map[string]string
	// alice's live session id and its CSRF token; her expired session id.
	session, csrf, expired string
	// conn is a native gRPC connection to the server.
	conn *grpc.ClientConn
}

// startSecEnv seeds a data directory and runs the server in-process on
// 127.0.0.1:0. seedUser may change alice before the server starts (e.g.
// give her TOTP).
func startSecEnv(t *testing.T, seedUser func(st *store.SQLite)) *secEnv {
	return startSecEnvWith(t, seedUser, nil)
}

// startSecEnvWith is startSecEnv with a change to the server's Config (nil:
// none); a config with TLS gets a plain HTTP origin all the same.
func startSecEnvWith(t *testing.T, seedUser func(st *store.SQLite), tune func(*controlplane.Config)) *secEnv {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	dir := t.TempDir()
	st, err := controlplane.OpenStore(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	e := &secEnv{agent: map[string]string{}, api: map[string]string{}}
	for _, h := range []string{"m-1", "m-2", "m-3"} {
		_, tok, err := fleetapi.RegisterHost(ctx, st, &fleetv1.AddHostRequest{Hostname: h}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		e.agent[h] = tok
	}
	for _, sc := range []adminv1.Scope{adminv1.Scope_SCOPE_READ, adminv1.Scope_SCOPE_OPERATE, adminv1.Scope_SCOPE_ADMIN} {
		name := auth.Scope(sc).String()
		tk, secret, err := fleetapi.NewAPIToken(name, sc, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.CreateAPIToken(ctx, tk); err != nil {
			t.Fatal(err)
		}
		e.api[name] = secret
	}
	pw, err := auth.HashPassword(alicePassword)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.CreateUser(ctx, store.User{Name: "alice", PasswordHash: pw}); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	e.session, e.csrf, e.expired = auth.NewSecret(""), "csrf-"+auth.NewSecret(""), auth.NewSecret("")
	for _, s := range []store.Session{
		{IDHash: auth.HashSecret(e.session), User: "alice", CSRFToken: e.csrf, ExpiresAt: now.Add(time.Hour)},
		{IDHash: auth.HashSecret(e.expired), User: "alice", CSRFToken: e.csrf, CreatedAt: now.Add(-48 * time.Hour),
			LastUsed: now.Add(-25 * time.Hour), ExpiresAt: now.Add(-24 * time.Hour)},
	} {
		if err := st.CreateSession(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	if seedUser != nil {
		seedUser(st)
	}
	st.Close()

	ready := make(chan string, 1)
	done := make(chan error, 1)
	cfg := controlplane.Config{Listen: "127.0.0.1:0", DataDir: dir, Version: "1.0.0",
		Out: io.Discard, Log: slog.New(slog.DiscardHandler), MaxMessageBytes: 64 << 10, Ready: func(a string) { ready <- a }}
	if tune != nil {
		tune(&cfg)
	}
	go func() { done <- controlplane.Run(ctx, cfg) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server: %v", err)
		}
	})
	select {
	case e.addr = <-ready:
	case err := <-done:
		t.Fatalf("server did not start: %v", err)
	}
	e.origin = "http://" + e.addr
	e.conn, err = grpc.NewClient(e.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.conn.Close() })
	return e
}

// cred is one way of presenting (or not) a credential.
type cred string

const (
	credNone          cred = "no credential"
	credMalformed     cred = "malformed"
	credExpired       cred = "expired session"
	credSessionNoCSRF cred = "session without CSRF"
	credSession       cred = "session with CSRF"
	credForeignOrigin cred = "foreign Origin"
	credAgent         cred = "agent token"
	credOtherAgent    cred = "another host's agent token"
	credRead          cred = "read token"
	credOperate       cred = "operate token"
	credAdmin         cred = "admin token"
)

var allCreds = []cred{credNone, credMalformed, credExpired, credSessionNoCSRF, credSession, credForeignOrigin,
	credAgent, credOtherAgent, credRead, credOperate, credAdmin}

// headers are the HTTP headers (and so the gRPC metadata) of a credential.
// Session cells send the same-origin Origin a browser would send, except
// the foreign-Origin cell. The agent cells use m-1's and m-2's tokens; the
// agent stream's hello always speaks for m-1.
func (e *secEnv) headers(c cred) map[string]string {
	cookie := auth.SessionCookie + "=" + e.session
	switch c {
	case credNone:
		return nil
	case credMalformed:
		return map[string]string{"Authorization": "Bearer not-a-token"}
	case credExpired:
		return map[string]string{"Cookie": auth.SessionCookie + "=" + e.expired, "X-Csrf-Token": e.csrf, "Origin": e.origin}
	case credSessionNoCSRF:
		return map[string]string{"Cookie": cookie, "Origin": e.origin}
	case credSession:
		return map[string]string{"Cookie": cookie, "X-Csrf-Token": e.csrf, "Origin": e.origin}
	case credForeignOrigin:
		return map[string]string{"Cookie": cookie, "X-Csrf-Token": e.csrf, "Origin": "https://evil.example"}
	case credAgent:
		return map[string]string{"Authorization": "Bearer " + e.agent["m-1"]}
	case credOtherAgent:
		return map[string]string{"Authorization": "Bearer " + e.agent["m-2"]}
	case credRead, credOperate, credAdmin:
		return map[string]string{"Authorization": "Bearer " + e.api[strings.TrimSuffix(string(c), " token")]}
	}
	panic("unknown credential " + c)
}

// access is who may call a method, as each RPC's comment in proto/ says.
type access int

const (
	readOnly    access = iota + 1 // read scope; sessions without CSRF
	readPost                      // read scope; sessions with CSRF
	operate                       // operate scope; sessions with CSRF
	adminWrite                    // admin scope; sessions with CSRF
	adminRead                     // admin scope; sessions
	sessionOnly                   // browser sessions only, with CSRF
	agentOnly                     // the host's own agent token
)

func (a access) mutating() bool { return a != readOnly && a != adminRead && a != agentOnly }

// matrixCase is a method's row: who may call it, a request, and the code the
// handler answers that request with once the caller is authorized.
type matrixCase struct {
	access access
	req    proto.Message
	ok     codes.Code
}

// matrixCases has one row per RPC of the three services. Requests target
// real objects where that changes nothing; where an authorized call would
// change state for the other cells, it targets a missing or existing one
// so that the handler refuses it with a fixed code.
var matrixCases = map[string]matrixCase{
	fleetv1.FleetService_ListHosts_FullMethodName:        {readOnly, &fleetv1.ListHostsRequest{}, codes.OK},
	fleetv1.FleetService_GetHost_FullMethodName:          {readOnly, &fleetv1.GetHostRequest{HostId: "m-1"}, codes.OK},
	fleetv1.FleetService_WatchFleet_FullMethodName:       {readOnly, &fleetv1.WatchFleetRequest{SkipHeartbeats: true}, codes.OK},
	fleetv1.FleetService_RefreshHost_FullMethodName:      {readPost, &fleetv1.RefreshHostRequest{HostId: "m-3"}, codes.OK},
	fleetv1.FleetService_RunCommand_FullMethodName:       {operate, &fleetv1.RunCommandRequest{HostId: "m-3", Command: "pull"}, codes.FailedPrecondition}, // offline
	fleetv1.FleetService_StopCommand_FullMethodName:      {operate, &fleetv1.StopCommandRequest{CommandId: "nope"}, codes.NotFound},
	fleetv1.FleetService_GetCommand_FullMethodName:       {readOnly, &fleetv1.GetCommandRequest{CommandId: "nope"}, codes.NotFound},
	fleetv1.FleetService_ListCommands_FullMethodName:     {readOnly, &fleetv1.ListCommandsRequest{}, codes.OK},
	fleetv1.FleetService_GetCommandLog_FullMethodName:    {readOnly, &fleetv1.GetCommandLogRequest{CommandId: "nope"}, codes.NotFound},
	fleetv1.FleetService_FollowCommandLog_FullMethodName: {readOnly, &fleetv1.FollowCommandLogRequest{CommandId: "nope"}, codes.NotFound},
	fleetv1.FleetService_AddHost_FullMethodName:          {adminWrite, &fleetv1.AddHostRequest{Hostname: "m-1"}, codes.AlreadyExists},
	fleetv1.FleetService_RemoveHost_FullMethodName:       {adminWrite, &fleetv1.RemoveHostRequest{HostId: "ghost"}, codes.NotFound},
	fleetv1.FleetService_RotateHostToken_FullMethodName:  {adminWrite, &fleetv1.RotateHostTokenRequest{HostId: "ghost"}, codes.NotFound},
	fleetv1.FleetService_RunBulkCommand_FullMethodName:   {operate, &fleetv1.RunBulkCommandRequest{Command: "nope", HostIds: []string{"m-3"}}, codes.FailedPrecondition},
	fleetv1.FleetService_GetBulkCommand_FullMethodName:   {readOnly, &fleetv1.GetBulkCommandRequest{BulkId: "nope"}, codes.NotFound},
	fleetv1.FleetService_GetFleetTarget_FullMethodName:   {readOnly, &fleetv1.GetFleetTargetRequest{}, codes.OK},
	fleetv1.FleetService_MergeAndDeploy_FullMethodName:   {operate, &fleetv1.MergeAndDeployRequest{PrNumber: 1}, codes.Unimplemented}, // no PR source configured

	adminv1.AdminService_WhoAmI_FullMethodName:                {readOnly, &adminv1.WhoAmIRequest{}, codes.OK},
	adminv1.AdminService_CreateAPIToken_FullMethodName:        {adminWrite, &adminv1.CreateAPITokenRequest{Name: "read"}, codes.AlreadyExists},
	adminv1.AdminService_ListAPITokens_FullMethodName:         {adminRead, &adminv1.ListAPITokensRequest{}, codes.OK},
	adminv1.AdminService_RevokeAPIToken_FullMethodName:        {adminWrite, &adminv1.RevokeAPITokenRequest{Name: "ghost"}, codes.NotFound},
	adminv1.AdminService_ListAuditEvents_FullMethodName:       {adminRead, &adminv1.ListAuditEventsRequest{Limit: 1}, codes.OK},
	adminv1.AdminService_BeginTOTPEnrollment_FullMethodName:   {sessionOnly, &adminv1.BeginTOTPEnrollmentRequest{Password: alicePassword}, codes.OK}, // 3 of the 5 password attempts
	adminv1.AdminService_ConfirmTOTPEnrollment_FullMethodName: {sessionOnly, &adminv1.ConfirmTOTPEnrollmentRequest{Code: "12"}, codes.InvalidArgument},
	adminv1.AdminService_DisableTOTP_FullMethodName:           {sessionOnly, &adminv1.DisableTOTPRequest{Code: "123456"}, codes.FailedPrecondition}, // not enabled

	agentv1.AgentService_Connect_FullMethodName: {agentOnly, &agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{
		Hello: &agentv1.Hello{Hostname: "m-1", AgentVersion: "1.0.0"}}}, codes.OK},
}

// expected is the code a credential gets for a method, from the rules in the
// proto comments: missing, malformed and expired credentials are
// Unauthenticated; a caller of the wrong kind or too small a scope, and a
// session's mutating call without its CSRF token or from a foreign origin,
// are PermissionDenied; everything else reaches the handler.
func expected(a access, c cred, ok codes.Code) codes.Code {
	switch c {
	case credNone, credMalformed, credExpired:
		return codes.Unauthenticated
	}
	if a == agentOnly {
		if c == credAgent {
			return ok
		}
		return codes.PermissionDenied // other agents: their token speaks for m-2, not m-1
	}
	switch c {
	case credAgent, credOtherAgent:
		return codes.PermissionDenied
	case credSessionNoCSRF, credForeignOrigin:
		if a.mutating() {
			return codes.PermissionDenied
		}
		return ok
	case credSession:
		return ok
	}
	if a == sessionOnly {
		return codes.PermissionDenied
	}
	need := map[access]cred{readOnly: credRead, readPost: credRead, operate: credOperate, adminWrite: credAdmin, adminRead: credAdmin}[a]
	rank := map[cred]int{credRead: 1, credOperate: 2, credAdmin: 3}
	if rank[c] < rank[need] {
		return codes.PermissionDenied
	}
	return ok
}

// httpStatus is the REST answer for a gRPC code: the gateway's mapping,
// except FailedPrecondition (a blocked command) is 409 Conflict.
func httpStatus(c codes.Code) int {
	switch c {
	case codes.OK:
		return http.StatusOK
	case codes.Unauthenticated:
		return http.StatusUnauthorized
	case codes.PermissionDenied:
		return http.StatusForbidden
	case codes.NotFound:
		return http.StatusNotFound
	case codes.AlreadyExists, codes.FailedPrecondition:
		return http.StatusConflict
	case codes.InvalidArgument:
		return http.StatusBadRequest
	case codes.Unimplemented:
		return http.StatusNotImplemented
	case codes.ResourceExhausted:
		return http.StatusTooManyRequests
	}
	panic(fmt.Sprintf("no HTTP status for %v in this test", c))
}

// servedMethods lists every RPC of the three services from the generated
// descriptors.
func servedMethods() []protoreflect.MethodDescriptor {
	var out []protoreflect.MethodDescriptor
	for _, f := range []protoreflect.FileDescriptor{fleetv1.File_nixplane_fleet_v1_fleet_proto,
		adminv1.File_nixplane_admin_v1_admin_proto, agentv1.File_nixplane_agent_v1_agent_proto} {
		for i := 0; i < f.Services().Len(); i++ {
			svc := f.Services().Get(i)
			for j := 0; j < svc.Methods().Len(); j++ {
				out = append(out, svc.Methods().Get(j))
			}
		}
	}
	return out
}

func fullName(m protoreflect.MethodDescriptor) string {
	return "/" + string(m.Parent().FullName()) + "/" + string(m.Name())
}

// TestAuthMatrixCoversEveryRPC: a new RPC in the contract fails here until
// it has a row in the matrix.
func TestAuthMatrixCoversEveryRPC(t *testing.T) {
	seen := map[string]bool{}
	for _, m := range servedMethods() {
		name := fullName(m)
		seen[name] = true
		c, ok := matrixCases[name]
		if !ok {
			t.Errorf("RPC %s has no row in the auth matrix", name)
			continue
		}
		if c.req.ProtoReflect().Descriptor() != m.Input() {
			t.Errorf("RPC %s: row request is %s, want %s", name, c.req.ProtoReflect().Descriptor().FullName(), m.Input().FullName())
		}
	}
	for name := range matrixCases {
		if !seen[name] {
			t.Errorf("the auth matrix has a row for %s, which the contract does not define", name)
		}
	}
	if len(seen) < 25 {
		t.Fatalf("only %d RPCs found in the descriptors", len(seen))
	}
}

// TestAuthMatrix calls every RPC with every credential over native gRPC,
// grpc-web and (where the RPC has an HTTP rule) REST, and checks each
// answer's exact code.
func TestAuthMatrix(t *testing.T) {
	e := startSecEnv(t, func(st *store.SQLite) {
		// An enrolment under way must not count as TOTP being enabled.
		if err := st.SetPendingTOTP(context.Background(), "alice", "JBSWY3DPEHPK3PXP"); err != nil {
			t.Fatal(err)
		}
	})
	client := &http.Client{Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	cells := 0
	for _, m := range servedMethods() {
		name := fullName(m)
		row, ok := matrixCases[name]
		if !ok {
			continue // TestAuthMatrixCoversEveryRPC reports it
		}
		rule, hasHTTP := proto.GetExtension(m.Options(), annotations.E_Http).(*annotations.HttpRule)
		hasHTTP = hasHTTP && rule != nil
		for _, c := range allCreds {
			want := expected(row.access, c, row.ok)
			hdr := e.headers(c)
			if got := e.callGRPC(t, m, hdr, row.req); got != want {
				t.Errorf("gRPC %s with %s: %v, want %v", m.Name(), c, got, want)
			}
			if got := e.callWeb(t, client, m, hdr, row.req); got != want {
				t.Errorf("grpc-web %s with %s: %v, want %v", m.Name(), c, got, want)
			}
			cells += 2
			if hasHTTP {
				if got := e.callREST(t, client, m, rule, hdr, row.req); got != httpStatus(want) {
					t.Errorf("REST %s with %s: HTTP %d, want %d", m.Name(), c, got, httpStatus(want))
				}
				cells++
			}
		}
	}
	t.Logf("%d cells", cells)
	e.checkAudited(t)
}

// checkAudited: every mutating RPC the matrix let through is in the audit
// log with its actor and the result the handler gave.
func (e *secEnv) checkAudited(t *testing.T) {
	t.Helper()
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+e.api["admin"])
	evs, err := adminv1.NewAdminServiceClient(e.conn).ListAuditEvents(ctx, &adminv1.ListAuditEventsRequest{Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	type key struct{ actor, action, result string }
	seen := map[key]int{}
	for _, ev := range evs.Events {
		seen[key{ev.Actor, ev.Action, ev.Result}]++
	}
	for name, row := range matrixCases {
		if !row.access.mutating() {
			continue
		}
		result := "ok"
		if row.ok != codes.OK {
			result = row.ok.String()
		}
		action := name[strings.LastIndexByte(name, '/')+1:]
		actors := []string{"user:alice"}
		if row.access != sessionOnly {
			actors = append(actors, "token:admin")
		}
		for _, actor := range actors {
			// One authorized call per transport.
			want := 2
			if proto.GetExtension(methodByName(t, name).Options(), annotations.E_Http).(*annotations.HttpRule) != nil {
				want = 3
			}
			if n := seen[key{actor, action, result}]; n != want {
				t.Errorf("audit log has %d records of %s by %s with result %s, want %d", n, action, actor, result, want)
			}
		}
	}
	for k := range seen {
		if k.actor != "user:alice" && !strings.HasPrefix(k.actor, "token:") {
			t.Errorf("audit record by %q: refused callers must not reach the handlers", k.actor)
		}
	}
}

func methodByName(t *testing.T, full string) protoreflect.MethodDescriptor {
	for _, m := range servedMethods() {
		if fullName(m) == full {
			return m
		}
	}
	t.Fatalf("no method %s", full)
	return nil
}

// callGRPC makes the call on the native gRPC connection and returns the
// code of its first answer: OK when a message arrives.
func (e *secEnv) callGRPC(t *testing.T, m protoreflect.MethodDescriptor, hdr map[string]string, req proto.Message) codes.Code {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for k, v := range hdr {
		ctx = metadata.AppendToOutgoingContext(ctx, strings.ToLower(k), v)
	}
	resp := dynamicpb.NewMessage(m.Output())
	if !m.IsStreamingClient() && !m.IsStreamingServer() {
		return status.Code(e.conn.Invoke(ctx, fullName(m), req, resp))
	}
	s, err := e.conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: m.IsStreamingServer(), ClientStreams: m.IsStreamingClient()}, fullName(m))
	if err != nil {
		return status.Code(err)
	}
	if err := s.SendMsg(req); err != nil && !errors.Is(err, io.EOF) {
		return status.Code(err)
	}
	if !m.IsStreamingClient() {
		_ = s.CloseSend()
	}
	err = s.RecvMsg(resp)
	if errors.Is(err, io.EOF) {
		t.Fatalf("gRPC %s: stream ended OK without a message", m.Name())
	}
	return status.Code(err)
}

// callWeb makes the call as a browser's grpc-web client would, over
// HTTP/1.1, and returns the code of its first answer.
func (e *secEnv) callWeb(t *testing.T, client *http.Client, m protoreflect.MethodDescriptor, hdr map[string]string, req proto.Message) codes.Code {
	t.Helper()
	b, err := proto.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	return e.webRaw(t, client, fullName(m), hdr, b)
}

// webRaw posts one grpc-web data frame holding payload.
func (e *secEnv) webRaw(t *testing.T, client *http.Client, method string, hdr map[string]string, payload []byte) codes.Code {
	t.Helper()
	frame := make([]byte, 5+len(payload))
	binary.BigEndian.PutUint32(frame[1:5], uint32(len(payload)))
	copy(frame[5:], payload)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+e.addr+method, bytes.NewReader(frame))
	if err != nil {
		t.Fatal(err)
	}
	r.Header.Set("Content-Type", "application/grpc-web+proto")
	r.Header.Set("X-Grpc-Web", "1")
	for k, v := range hdr {
		r.Header.Set(k, v)
	}
	resp, err := client.Do(r)
	if err != nil {
		t.Fatalf("grpc-web %s: %v", method, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("grpc-web %s: HTTP %d", method, resp.StatusCode)
	}
	br := bufio.NewReader(resp.Body)
	var h [5]byte
	if _, err := io.ReadFull(br, h[:]); err != nil {
		// Trailers-only: the status is in the headers.
		c, perr := strconv.Atoi(resp.Header.Get("Grpc-Status"))
		if perr != nil {
			t.Fatalf("grpc-web %s: no frame and no grpc-status header (%v)", method, err)
		}
		return codes.Code(c)
	}
	if h[0] == 0 {
		return codes.OK
	}
	body := make([]byte, binary.BigEndian.Uint32(h[1:]))
	if _, err := io.ReadFull(br, body); err != nil {
		t.Fatalf("grpc-web %s: short trailer: %v", method, err)
	}
	for _, line := range strings.Split(string(body), "\r\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.EqualFold(strings.TrimSpace(k), "grpc-status") {
			c, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatalf("grpc-web %s: grpc-status %q", method, v)
			}
			return codes.Code(c)
		}
	}
	t.Fatalf("grpc-web %s: trailer without grpc-status: %q", method, body)
	return codes.Unknown
}

// callREST makes the call through the REST gateway, following the RPC's
// HTTP rule, and returns the HTTP status. Every answer must be JSON.
func (e *secEnv) callREST(t *testing.T, client *http.Client, m protoreflect.MethodDescriptor, rule *annotations.HttpRule, hdr map[string]string, req proto.Message) int {
	t.Helper()
	var method, tmpl string
	switch p := rule.Pattern.(type) {
	case *annotations.HttpRule_Get:
		method, tmpl = http.MethodGet, p.Get
	case *annotations.HttpRule_Post:
		method, tmpl = http.MethodPost, p.Post
	case *annotations.HttpRule_Delete:
		method, tmpl = http.MethodDelete, p.Delete
	default:
		t.Fatalf("%s: HTTP rule %v not handled by this test", m.Name(), rule)
	}
	fields := req.ProtoReflect().Descriptor().Fields()
	path := tmpl
	for {
		i := strings.IndexByte(path, '{')
		if i < 0 {
			break
		}
		j := strings.IndexByte(path[i:], '}') + i
		fd := fields.ByName(protoreflect.Name(path[i+1 : j]))
		if fd == nil {
			t.Fatalf("%s: path field %s unknown", m.Name(), path[i+1:j])
		}
		path = path[:i] + url.PathEscape(req.ProtoReflect().Get(fd).String()) + path[j+1:]
	}
	var body io.Reader
	if rule.Body == "*" {
		b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		body = bytes.NewReader(b)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r, err := http.NewRequestWithContext(ctx, method, "http://"+e.addr+path, body)
	if err != nil {
		t.Fatal(err)
	}
	r.Header.Set("Content-Type", "application/json")
	for k, v := range hdr {
		r.Header.Set(k, v)
	}
	resp, err := client.Do(r)
	if err != nil {
		t.Fatalf("REST %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("REST %s %s: content type %q", method, path, ct)
	}
	if !m.IsStreamingServer() {
		_, _ = io.Copy(io.Discard, resp.Body)
	}
	return resp.StatusCode
}
