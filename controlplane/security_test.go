package controlplane_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"image/png"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pquerna/otp/totp"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/fleetapi"
	"github.com/nixplane/nixplane/controlplane/store"
	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	"github.com/nixplane/nixplane/tests/testpki"
)

// sessionREST makes a REST call as alice's browser would: session cookie,
// CSRF token, same-origin Origin. It returns status and body.
func (e *secEnv) sessionREST(t *testing.T, method, path, body string) (int, []byte) {
	t.Helper()
	return e.restWith(t, e.headers(credSession), method, path, body)
}

func (e *secEnv) restWith(t *testing.T, hdr map[string]string, method, path, body string) (int, []byte) {
	t.Helper()
	r, err := http.NewRequest(method, "http://"+e.addr+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	r.Header.Set("Content-Type", "application/json")
	for k, v := range hdr {
		r.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func (e *secEnv) whoami(t *testing.T) *adminv1.WhoAmIResponse {
	t.Helper()
	code, body := e.sessionREST(t, "GET", "/api/whoami", "")
	if code != 200 {
		t.Fatalf("whoami: %d %s", code, body)
	}
	var w struct {
		Actor       string `json:"actor"`
		Session     bool   `json:"session"`
		TOTPEnabled bool   `json:"totp_enabled"`
	}
	if err := json.Unmarshal(body, &w); err != nil {
		t.Fatal(err)
	}
	return &adminv1.WhoAmIResponse{Actor: w.Actor, Session: w.Session, TotpEnabled: w.TOTPEnabled}
}

// wrongCode is a six-digit code that is not secret's current one (nor its
// neighbours').
func wrongCode(t *testing.T, secret string) string {
	now := time.Now()
	valid := map[string]bool{}
	for _, d := range []time.Duration{-30 * time.Second, 0, 30 * time.Second} {
		c, err := totp.GenerateCode(secret, now.Add(d))
		if err != nil {
			t.Fatal(err)
		}
		valid[c] = true
	}
	for _, c := range []string{"000000", "111111", "222222", "333333"} {
		if !valid[c] {
			return c
		}
	}
	t.Fatal("no wrong code found")
	return ""
}

// TestTOTPEnrolmentAndDestructiveCommands walks a user through TOTP
// enrolment over REST, then shows that reboot and rollback need a fresh
// code once it is on (409 / FailedPrecondition with reason TOTP_REQUIRED)
// and are accepted with one, and that every step is in the audit log with
// actor and result.
func TestTOTPEnrolmentAndDestructiveCommands(t *testing.T) {
	e := startSecEnv(t, nil)

	if code, body := e.sessionREST(t, "POST", "/api/totp/enrollment/confirm", `{"code":"123456"}`); code != http.StatusConflict {
		t.Fatalf("confirm before begin: %d %s, want 409", code, body)
	}
	code, body := e.sessionREST(t, "POST", "/api/totp/enrollment", beginBody(alicePassword))
	if code != 200 {
		t.Fatalf("begin: %d %s", code, body)
	}
	var begin struct {
		Secret     string `json:"secret"`
		OtpauthURI string `json:"otpauth_uri"`
		QrPng      []byte `json:"qr_png"`
	}
	if err := json.Unmarshal(body, &begin); err != nil {
		t.Fatal(err)
	}
	if len(begin.Secret) < 16 || !strings.HasPrefix(begin.OtpauthURI, "otpauth://totp/"+fleetapi.TOTPIssuer+":alice?") ||
		!strings.Contains(begin.OtpauthURI, "secret="+begin.Secret) {
		t.Fatalf("enrolment answer: secret %q, uri %q", begin.Secret, begin.OtpauthURI)
	}
	img, err := png.Decode(bytes.NewReader(begin.QrPng))
	if err != nil || img.Bounds().Dx() < 100 {
		t.Fatalf("QR code is not a usable PNG: %v", err)
	}
	if e.whoami(t).TotpEnabled {
		t.Fatal("TOTP enabled before the enrolment was confirmed")
	}
	if code, body := e.sessionREST(t, "POST", "/api/totp/enrollment/confirm", `{"code":"`+wrongCode(t, begin.Secret)+`"}`); code != http.StatusBadRequest {
		t.Fatalf("confirm with a wrong code: %d %s, want 400", code, body)
	}
	if e.whoami(t).TotpEnabled {
		t.Fatal("a wrong code enabled TOTP")
	}
	// Each accepted code must come from a later time step than the last
	// (replay guard): confirm with the previous step's code, reboot with the
	// current one, disable with the next one — all within the allowed skew.
	if code, body := e.sessionREST(t, "POST", "/api/totp/enrollment/confirm", `{"code":"`+mustCode(t, begin.Secret, -30*time.Second)+`"}`); code != 200 {
		t.Fatalf("confirm: %d %s", code, body)
	}
	if !e.whoami(t).TotpEnabled {
		t.Fatal("TOTP not enabled after confirmation")
	}
	if code, body := e.sessionREST(t, "POST", "/api/totp/enrollment", beginBody(alicePassword)); code != http.StatusConflict {
		t.Fatalf("begin while enabled: %d %s, want 409", code, body)
	}

	// m-1 online, so the commands get past the offline check.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	agent := connectMatrixAgent(t, ctx, e)

	for _, cmd := range []string{"reboot", "rollback", "REBOOT "} {
		code, body := e.sessionREST(t, "POST", "/api/hosts/m-1/commands", `{"command":"`+cmd+`"}`)
		if code != http.StatusConflict || !strings.Contains(string(body), "TOTP_REQUIRED") {
			t.Fatalf("%s without a code: %d %s, want 409 with reason TOTP_REQUIRED", cmd, code, body)
		}
		code, body = e.sessionREST(t, "POST", "/api/hosts/m-1/commands", `{"command":"`+cmd+`","totp":"`+wrongCode(t, begin.Secret)+`"}`)
		if code != http.StatusConflict || !strings.Contains(string(body), "TOTP_REQUIRED") {
			t.Fatalf("%s with a wrong code: %d %s, want 409 with reason TOTP_REQUIRED", cmd, code, body)
		}
	}
	// The same over gRPC: FailedPrecondition with an ErrorInfo reason.
	gctx := e.grpcCtx(ctx, credSession)
	_, err = fleetv1.NewFleetServiceClient(e.conn).RunCommand(gctx, &fleetv1.RunCommandRequest{HostId: "m-1", Command: "reboot"})
	if status.Code(err) != codes.FailedPrecondition || blockReason(err) != fleetv1.BlockReason_BLOCK_REASON_TOTP_REQUIRED.String() {
		t.Fatalf("gRPC reboot without a code: %v (reason %q)", err, blockReason(err))
	}
	code, body = e.sessionREST(t, "POST", "/api/hosts/m-1/commands", `{"command":"reboot","totp":"`+mustCode(t, begin.Secret, 0)+`"}`)
	if code != 200 {
		t.Fatalf("reboot with a fresh code: %d %s", code, body)
	}
	var run struct {
		Command struct {
			CommandID string `json:"command_id"`
			Actor     string `json:"actor"`
		} `json:"command"`
	}
	if err := json.Unmarshal(body, &run); err != nil || run.Command.CommandID == "" || run.Command.Actor != "user:alice" {
		t.Fatalf("reboot answer: %s (%v)", body, err)
	}
	waitAgentRun(t, agent, "reboot")

	// Guesses are bounded: four codes tried so far, the fifth is judged,
	// the sixth is refused unread.
	wrong := `{"command":"rollback","totp":"` + wrongCode(t, begin.Secret) + `"}`
	if code, body := e.sessionREST(t, "POST", "/api/hosts/m-1/commands", wrong); code != http.StatusConflict {
		t.Fatalf("fifth guess: %d %s, want 409", code, body)
	}
	if code, body := e.sessionREST(t, "POST", "/api/hosts/m-1/commands", wrong); code != http.StatusTooManyRequests {
		t.Fatalf("sixth guess: %d %s, want 429", code, body)
	}

	// Disable needs a current code, too.
	if code, body := e.sessionREST(t, "POST", "/api/totp/disable", `{"code":"`+wrongCode(t, begin.Secret)+`"}`); code != http.StatusBadRequest {
		t.Fatalf("disable with a wrong code: %d %s", code, body)
	}
	if code, body := e.sessionREST(t, "POST", "/api/totp/disable", `{"code":"`+mustCode(t, begin.Secret, 30*time.Second)+`"}`); code != 200 {
		t.Fatalf("disable: %d %s", code, body)
	}
	if e.whoami(t).TotpEnabled {
		t.Fatal("TOTP still enabled after disable")
	}

	// Everything above is in the audit log, newest first, with actor and
	// result.
	evs, err := adminv1.NewAdminServiceClient(e.conn).ListAuditEvents(e.grpcCtx(ctx, credAdmin), &adminv1.ListAuditEventsRequest{Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for i := len(evs.Events) - 1; i >= 0; i-- {
		ev := evs.Events[i]
		if ev.Time == nil || ev.Id == 0 {
			t.Fatalf("audit record without id or time: %v", ev)
		}
		got = append(got, ev.Actor+" "+ev.Action+" "+ev.Result+" "+ev.HostId)
	}
	want := []string{
		"user:alice ConfirmTOTPEnrollment FailedPrecondition ",
		"user:alice BeginTOTPEnrollment ok ",
		"user:alice ConfirmTOTPEnrollment InvalidArgument ",
		"user:alice ConfirmTOTPEnrollment ok ",
		"user:alice BeginTOTPEnrollment FailedPrecondition ",
		"user:alice RunCommand FailedPrecondition m-1", "user:alice RunCommand FailedPrecondition m-1",
		"user:alice RunCommand FailedPrecondition m-1", "user:alice RunCommand FailedPrecondition m-1",
		"user:alice RunCommand FailedPrecondition m-1", "user:alice RunCommand FailedPrecondition m-1",
		"user:alice RunCommand FailedPrecondition m-1",
		"user:alice RunCommand ok m-1",
		"user:alice RunCommand FailedPrecondition m-1",
		"user:alice RunCommand ResourceExhausted m-1",
		"user:alice DisableTOTP InvalidArgument ",
		"user:alice DisableTOTP ok ",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("audit log:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	for _, ev := range evs.Events {
		if strings.Contains(ev.Detail, begin.Secret) {
			t.Fatal("the TOTP secret leaked into the audit log")
		}
	}
}

// beginBody is the JSON body of POST /api/totp/enrollment.
func beginBody(password string) string {
	b, err := json.Marshal(map[string]string{"password": password})
	if err != nil {
		panic(err)
	}
	return string(b)
}

// TestTOTPEnrolmentNeedsPassword: a session alone cannot begin an
// enrolment. A missing or wrong password is refused (400 / InvalidArgument,
// "wrong password") without starting one, guesses are limited per user
// (429 / ResourceExhausted, even for the right password then), and every
// refusal is in the audit log without the password.
func TestTOTPEnrolmentNeedsPassword(t *testing.T) {
	e := startSecEnv(t, nil)
	ctx := context.Background()
	admin := adminv1.NewAdminServiceClient(e.conn)

	noEnrolment := func(t *testing.T) {
		t.Helper()
		code, body := e.sessionREST(t, "POST", "/api/totp/enrollment/confirm", `{"code":"123456"}`)
		if code != http.StatusConflict || !strings.Contains(string(body), "no TOTP enrolment under way") {
			t.Fatalf("a refused begin left an enrolment behind: confirm answered %d %s", code, body)
		}
	}
	wrongPassword := func(t *testing.T, what string, code int, body []byte) {
		t.Helper()
		var st struct {
			Code    int    `json:"code"`
			Message string `json:"message"`
		}
		if err := json.Unmarshal(body, &st); err != nil {
			t.Fatalf("%s: %d %s: %v", what, code, body, err)
		}
		if code != http.StatusBadRequest || codes.Code(st.Code) != codes.InvalidArgument || st.Message != "wrong password" {
			t.Fatalf("%s: %d %s, want 400 InvalidArgument \"wrong password\"", what, code, body)
		}
	}

	// No password at all, an empty one, a wrong one, the right one with a
	// character missing: all refused alike. The empty ones cost no attempt.
	start := time.Now()
	for _, tc := range []struct{ name, body string }{
		{"no password", `{}`},
		{"empty password", beginBody("")},
		{"wrong password", beginBody("not alice's password")},
		{"truncated password", beginBody(alicePassword[:len(alicePassword)-1])},
	} {
		code, body := e.sessionREST(t, "POST", "/api/totp/enrollment", tc.body)
		wrongPassword(t, tc.name, code, body)
	}
	noEnrolment(t)
	_, err := admin.BeginTOTPEnrollment(e.grpcCtx(ctx, credSession), &adminv1.BeginTOTPEnrollmentRequest{Password: "ALICE'S LONG PASSWORD"})
	if status.Code(err) != codes.InvalidArgument || status.Convert(err).Message() != "wrong password" {
		t.Fatalf("gRPC begin with a wrong password: %v, want InvalidArgument \"wrong password\"", err)
	}
	noEnrolment(t)
	if e.whoami(t).TotpEnabled {
		t.Fatal("TOTP enabled after refused enrolments")
	}

	// Three guesses spent; two more are judged, then even the right
	// password is refused unread.
	for i := 0; i < 2; i++ {
		code, body := e.sessionREST(t, "POST", "/api/totp/enrollment", beginBody("guess "+strconv.Itoa(i)))
		wrongPassword(t, "guess "+strconv.Itoa(i), code, body)
	}
	code, body := e.sessionREST(t, "POST", "/api/totp/enrollment", beginBody(alicePassword))
	if code != http.StatusTooManyRequests || !strings.Contains(string(body), "too many password attempts") {
		skipIfRefilled(t, start)
		t.Fatalf("sixth attempt: %d %s, want 429", code, body)
	}
	_, err = admin.BeginTOTPEnrollment(e.grpcCtx(ctx, credSession), &adminv1.BeginTOTPEnrollmentRequest{Password: alicePassword})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("gRPC begin over the limit: %v, want ResourceExhausted", err)
	}
	// An empty password is still judged at once: it needs no attempt.
	code, body = e.sessionREST(t, "POST", "/api/totp/enrollment", beginBody(""))
	wrongPassword(t, "empty password over the limit", code, body)
	noEnrolment(t)

	// The password guesses are counted apart from one-time code guesses.
	if code, body := e.sessionREST(t, "POST", "/api/totp/enrollment/confirm", `{"code":"123456"}`); code != http.StatusConflict {
		t.Fatalf("confirm after the password limit: %d %s, want 409", code, body)
	}

	evs, err := admin.ListAuditEvents(e.grpcCtx(ctx, credAdmin), &adminv1.ListAuditEventsRequest{Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for i := len(evs.Events) - 1; i >= 0; i-- {
		ev := evs.Events[i]
		if ev.Action != "BeginTOTPEnrollment" {
			continue
		}
		got = append(got, ev.Actor+" "+ev.Result)
		for _, pw := range []string{alicePassword, "not alice's password", "guess 0"} {
			if strings.Contains(ev.Detail, pw) {
				t.Fatalf("a password leaked into the audit log: %q", ev.Detail)
			}
		}
	}
	want := strings.Repeat("user:alice InvalidArgument\n", 5) + strings.Repeat("user:alice InvalidArgument\n", 2) +
		"user:alice ResourceExhausted\nuser:alice ResourceExhausted\nuser:alice InvalidArgument"
	if strings.Join(got, "\n") != want {
		t.Fatalf("audit log of BeginTOTPEnrollment:\n%s\nwant:\n%s", strings.Join(got, "\n"), want)
	}
}

// skipIfRefilled skips a test whose guesses since start took longer than
// the limiter's refill interval (12 seconds): a guess allowed then is the
// limiter working, not failing. Each guess costs a bcrypt comparison, slow
// under the race detector on a busy machine.
func skipIfRefilled(t *testing.T, start time.Time) {
	t.Helper()
	if d := time.Since(start); d >= 12*time.Second {
		t.Skipf("the guesses took %v, so the limiter refilled an attempt meanwhile; the limit cannot be observed", d.Round(time.Millisecond))
	}
}

// TestTOTPEnrolmentRightPassword: the right password begins an enrolment
// over gRPC, and the limit is per user: alice's spent guesses leave bob's
// untouched.
func TestTOTPEnrolmentRightPassword(t *testing.T) {
	const bobPassword = "bob's other password"
	bobSession := auth.NewSecret("")
	e := startSecEnv(t, func(st *store.SQLite) {
		ctx := context.Background()
		pw, err := auth.HashPassword(bobPassword)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.CreateUser(ctx, store.User{Name: "bob", PasswordHash: pw}); err != nil {
			t.Fatal(err)
		}
		if err := st.CreateSession(ctx, store.Session{IDHash: auth.HashSecret(bobSession), User: "bob", CSRFToken: "bob-csrf",
			ExpiresAt: time.Now().Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
	})
	ctx := context.Background()
	admin := adminv1.NewAdminServiceClient(e.conn)
	start := time.Now()
	for i := 0; i < 6; i++ {
		code, body := e.sessionREST(t, "POST", "/api/totp/enrollment", beginBody("guess "+strconv.Itoa(i)))
		if want := map[bool]int{true: http.StatusBadRequest, false: http.StatusTooManyRequests}[i < 5]; code != want {
			if i == 5 {
				skipIfRefilled(t, start)
			}
			t.Fatalf("alice's guess %d: %d %s, want %d", i, code, body, want)
		}
	}
	bob := metadata.AppendToOutgoingContext(ctx, "cookie", auth.SessionCookie+"="+bobSession, "x-csrf-token", "bob-csrf", "origin", e.origin)
	// Bob's own password is not alice's.
	if _, err := admin.BeginTOTPEnrollment(bob, &adminv1.BeginTOTPEnrollmentRequest{Password: alicePassword}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("bob with alice's password: %v, want InvalidArgument", err)
	}
	res, err := admin.BeginTOTPEnrollment(bob, &adminv1.BeginTOTPEnrollmentRequest{Password: bobPassword})
	if err != nil {
		t.Fatalf("bob with his password: %v", err)
	}
	if len(res.Secret) < 16 || !strings.Contains(res.OtpauthUri, ":bob?") || len(res.QrPng) == 0 {
		t.Fatalf("enrolment answer: %v", res)
	}
	code, err := totp.GenerateCode(res.Secret, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.ConfirmTOTPEnrollment(bob, &adminv1.ConfirmTOTPEnrollmentRequest{Code: code}); err != nil {
		t.Fatalf("bob confirms: %v", err)
	}
	who, err := admin.WhoAmI(bob, &adminv1.WhoAmIRequest{})
	if err != nil || !who.TotpEnabled || who.Actor != "user:bob" {
		t.Fatalf("bob after enrolment: %v %v", who, err)
	}
}

// mustCode returns secret's code for the time step at now+offset.
func mustCode(t *testing.T, secret string, offset time.Duration) string {
	t.Helper()
	c, err := totp.GenerateCode(secret, time.Now().Add(offset))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func blockReason(err error) string {
	for _, d := range status.Convert(err).Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info.Reason
		}
	}
	return ""
}

// grpcCtx carries a credential's headers as gRPC metadata.
func (e *secEnv) grpcCtx(ctx context.Context, c cred) context.Context {
	for k, v := range e.headers(c) {
		ctx = metadata.AppendToOutgoingContext(ctx, strings.ToLower(k), v)
	}
	return ctx
}

// connectMatrixAgent connects m-1's agent and waits for its welcome.
func connectMatrixAgent(t *testing.T, ctx context.Context, e *secEnv) agentv1.AgentService_ConnectClient {
	t.Helper()
	s, err := agentv1.NewAgentServiceClient(e.conn).Connect(e.grpcCtx(ctx, credAgent))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&agentv1.ConnectRequest{Msg: &agentv1.ConnectRequest_Hello{Hello: &agentv1.Hello{Hostname: "m-1", AgentVersion: "1.0.0"}}}); err != nil {
		t.Fatal(err)
	}
	if m, err := s.Recv(); err != nil || m.GetWelcome() == nil {
		t.Fatalf("no welcome: %v %v", m, err)
	}
	return s
}

// waitAgentRun reads the agent stream until a RunCommand of kind arrives.
func waitAgentRun(t *testing.T, s agentv1.AgentService_ConnectClient, kind string) {
	t.Helper()
	for {
		m, err := s.Recv()
		if err != nil {
			t.Fatalf("agent stream ended waiting for %s: %v", kind, err)
		}
		if r := m.GetRun(); r != nil {
			if !strings.Contains(strings.ToLower(r.Kind.String()), kind) {
				t.Fatalf("agent got %v, want %s", r.Kind, kind)
			}
			return
		}
	}
}

// TestSecurityHeaders: UI pages, REST answers (success, error and an
// oversize refusal) carry CSP with frame-ancestors, X-Frame-Options,
// nosniff and a referrer policy; HSTS only under TLS.
func TestSecurityHeaders(t *testing.T) {
	e := startSecEnv(t, nil)
	check := func(t *testing.T, e *secEnv, client *http.Client, base string, hsts bool) {
		for _, tc := range []struct {
			name, method, path, body string
			hdr                      map[string]string
			want                     int
		}{
			{"login page", "GET", "/login", "", nil, 200},
			{"dashboard without session", "GET", "/", "", nil, http.StatusSeeOther},
			{"dashboard", "GET", "/", "", e.headers(credSession), 200},
			{"REST read", "GET", "/api/hosts", "", e.headers(credRead), 200},
			{"REST refused", "GET", "/api/hosts", "", nil, 401},
			{"REST oversize", "POST", "/api/hosts", strings.Repeat("x", controlplane.MaxRESTBody+1), e.headers(credAdmin), 413},
			{"OpenAPI", "GET", "/api/openapi.json", "", nil, 200},
		} {
			r, err := http.NewRequest(tc.method, base+tc.path, strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range tc.hdr {
				r.Header.Set(k, v)
			}
			resp, err := client.Do(r)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Errorf("%s: %d, want %d", tc.name, resp.StatusCode, tc.want)
			}
			h := resp.Header
			csp := h.Get("Content-Security-Policy")
			for _, d := range []string{"default-src 'self'", "frame-ancestors 'none'", "base-uri 'none'", "form-action 'self'"} {
				if !strings.Contains(csp, d) {
					t.Errorf("%s: CSP %q lacks %q", tc.name, csp, d)
				}
			}
			if strings.Contains(csp, "unsafe-inline") || strings.Contains(csp, "unsafe-eval") {
				t.Errorf("%s: CSP allows inline or eval: %q", tc.name, csp)
			}
			if h.Get("X-Frame-Options") != "DENY" || h.Get("X-Content-Type-Options") != "nosniff" {
				t.Errorf("%s: X-Frame-Options %q, X-Content-Type-Options %q", tc.name, h.Get("X-Frame-Options"), h.Get("X-Content-Type-Options"))
			}
			if rp := h.Get("Referrer-Policy"); rp != "same-origin" && rp != "no-referrer" && rp != "strict-origin-when-cross-origin" {
				t.Errorf("%s: Referrer-Policy %q", tc.name, rp)
			}
			if got := h.Get("Strict-Transport-Security"); hsts != strings.HasPrefix(got, "max-age=31536000") {
				t.Errorf("%s: Strict-Transport-Security %q (TLS: %v)", tc.name, got, hsts)
			}
		}
	}
	noRedirect := func(req *http.Request, via []*http.Request) error { return http.ErrUseLastResponse }
	t.Run("plain HTTP", func(t *testing.T) {
		check(t, e, &http.Client{CheckRedirect: noRedirect}, "http://"+e.addr, false)
	})
	t.Run("behind a TLS proxy", func(t *testing.T) {
		for _, trust := range []bool{false, true} {
			pe := startSecEnvWith(t, nil, func(c *controlplane.Config) { c.TrustProxyHeaders = trust })
			r, _ := http.NewRequest("GET", "http://"+pe.addr+"/login", nil)
			r.Header.Set("X-Forwarded-Proto", "https")
			resp, err := http.DefaultClient.Do(r)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if got := resp.Header.Get("Strict-Transport-Security") != ""; got != trust {
				t.Errorf("X-Forwarded-Proto: https with trust %v: HSTS sent %v", trust, got)
			}
		}
	})
	t.Run("TLS", func(t *testing.T) {
		ca := testpki.NewCA(t, "nixplane test")
		certFile, keyFile := ca.Server().WriteFiles(t.TempDir(), "server")
		pool := ca.Pool()
		te := startSecEnvWith(t, nil, func(c *controlplane.Config) { c.TLSCert, c.TLSKey = certFile, keyFile })
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
		defer tr.CloseIdleConnections()
		te.origin = "https://" + te.addr
		check(t, te, &http.Client{Transport: tr, CheckRedirect: noRedirect}, "https://"+te.addr, true)
		// The session cookie a TLS login sets is Secure.
		resp, err := (&http.Client{Transport: tr, CheckRedirect: noRedirect}).PostForm("https://"+te.addr+"/login",
			url.Values{"username": {"alice"}, "password": {alicePassword}})
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusSeeOther || len(resp.Cookies()) != 1 || !resp.Cookies()[0].Secure || !resp.Cookies()[0].HttpOnly {
			t.Fatalf("TLS login: %d, cookies %v", resp.StatusCode, resp.Cookies())
		}
		if resp.ProtoMajor != 2 {
			t.Errorf("TLS answered over %s, want HTTP/2 by ALPN", resp.Proto)
		}
	})
}

// TestOversizeInput: a message over the server's limit is refused with
// ResourceExhausted on gRPC and grpc-web and 413 on REST, and the server
// keeps serving.
func TestOversizeInput(t *testing.T) {
	e := startSecEnv(t, nil) // MaxMessageBytes: 64 KiB
	big := &fleetv1.AddHostRequest{Hostname: "big-1", Location: strings.Repeat("x", 100<<10)}
	ctx := e.grpcCtx(context.Background(), credAdmin)
	fc := fleetv1.NewFleetServiceClient(e.conn)
	if _, err := fc.AddHost(ctx, big); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("gRPC: %v, want ResourceExhausted", err)
	}
	b, _ := proto.Marshal(big)
	client := &http.Client{Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	if got := e.webRaw(t, client, fleetv1.FleetService_AddHost_FullMethodName, e.headers(credAdmin), b); got != codes.ResourceExhausted {
		t.Fatalf("grpc-web: %v, want ResourceExhausted", got)
	}
	for name, body := range map[string]string{
		"over the gRPC limit":  `{"hostname":"big-1","location":"` + strings.Repeat("x", 100<<10) + `"}`,
		"over the REST limit":  `{"hostname":"big-1","location":"` + strings.Repeat("x", controlplane.MaxRESTBody) + `"}`,
		"chunked, over limits": "chunked:" + strings.Repeat("y", controlplane.MaxRESTBody+10),
	} {
		var rd io.Reader = strings.NewReader(body)
		if strings.HasPrefix(body, "chunked:") {
			rd = io.MultiReader(strings.NewReader(`{"hostname":"big-1","location":"`), strings.NewReader(body), strings.NewReader(`"}`))
		}
		r, _ := http.NewRequest("POST", "http://"+e.addr+"/api/hosts", rd)
		r.Header.Set("Authorization", "Bearer "+e.api["admin"])
		resp, err := client.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Errorf("REST %s: %d, want 413", name, resp.StatusCode)
		}
	}
	// Still serving, and nothing was created.
	h, err := fc.ListHosts(ctx, &fleetv1.ListHostsRequest{})
	if err != nil || len(h.Hosts) != 3 {
		t.Fatalf("after oversize input: %v hosts, %v", len(h.GetHosts()), err)
	}
}

// TestStreamsPerCaller: one caller holds at most
// fleetapi.DefaultMaxStreamsPerCaller watch and log streams at once; the
// next is ResourceExhausted, another caller is not affected, and closing a
// stream frees its place.
func TestStreamsPerCaller(t *testing.T) {
	e := startSecEnv(t, nil)
	fc := fleetv1.NewFleetServiceClient(e.conn)
	open := func(c cred) (fleetv1.FleetService_WatchFleetClient, context.CancelFunc, error) {
		ctx, cancel := context.WithCancel(e.grpcCtx(context.Background(), c))
		w, err := fc.WatchFleet(ctx, &fleetv1.WatchFleetRequest{SkipHeartbeats: true})
		if err == nil {
			_, err = w.Recv()
		}
		if err != nil {
			cancel()
			return nil, nil, err
		}
		return w, cancel, nil
	}
	var cancels []context.CancelFunc
	defer func() {
		for _, c := range cancels {
			c()
		}
	}()
	for i := 0; i < fleetapi.DefaultMaxStreamsPerCaller; i++ {
		_, cancel, err := open(credRead)
		if err != nil {
			t.Fatalf("watch %d: %v", i, err)
		}
		cancels = append(cancels, cancel)
	}
	if _, _, err := open(credRead); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("watch over the limit: %v, want ResourceExhausted", err)
	}
	// A log follow counts against the same caller.
	lf, err := fc.FollowCommandLog(e.grpcCtx(context.Background(), credRead), &fleetv1.FollowCommandLogRequest{CommandId: "nope"})
	if err == nil {
		_, err = lf.Recv()
	}
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("log follow over the limit: %v, want ResourceExhausted", err)
	}
	if _, cancel, err := open(credSession); err != nil {
		t.Fatalf("another caller: %v", err)
	} else {
		cancels = append(cancels, cancel)
	}
	cancels[0]()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, cancel, err := open(credRead)
		if err == nil {
			cancels = append(cancels, cancel)
			break
		}
		if status.Code(err) != codes.ResourceExhausted || time.Now().After(deadline) {
			t.Fatalf("after closing one watch: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // poll interval
	}
}
