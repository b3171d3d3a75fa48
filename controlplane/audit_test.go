package controlplane_test

import (
	"context"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"unicode/utf8"

	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// TestAuditKeepsLongFieldsReadable: a caller's long host id or command,
// cut for the audit record, is cut between characters, so the audit log
// stays readable (an invalid UTF-8 string would fail every later listing).
func TestAuditKeepsLongFieldsReadable(t *testing.T) {
	e := startSecEnv(t, nil)
	ctx := context.Background()
	fc := fleetv1.NewFleetServiceClient(e.conn)
	longHost := strings.Repeat("a", 63) + "é"
	if _, err := fc.RefreshHost(e.grpcCtx(ctx, credRead), &fleetv1.RefreshHostRequest{HostId: longHost}); err == nil {
		t.Fatal("refresh of an unknown host succeeded")
	}
	if _, err := fc.RunCommand(e.grpcCtx(ctx, credOperate), &fleetv1.RunCommandRequest{HostId: "m-1", Command: strings.Repeat("b", 199) + "€"}); err == nil {
		t.Fatal("an unknown command succeeded")
	}
	evs, err := adminv1.NewAdminServiceClient(e.conn).ListAuditEvents(e.grpcCtx(ctx, credAdmin), &adminv1.ListAuditEventsRequest{Limit: 10})
	if err != nil {
		t.Fatalf("list audit events: %v", err)
	}
	var actions []string
	for _, ev := range evs.Events {
		if !utf8.ValidString(ev.HostId) || !utf8.ValidString(ev.Detail) {
			t.Fatalf("invalid UTF-8 in %v", ev)
		}
		actions = append(actions, ev.Action)
	}
	if got := strings.Join(actions, " "); got != "RunCommand RefreshHost" {
		t.Fatalf("audit actions = %q, want both calls", got)
	}
}

// TestLoginAuditKeepsTheLogReadable: a login attempt with a user name that
// is not UTF-8 (anyone can post the login form) is audited readably.
func TestLoginAuditKeepsTheLogReadable(t *testing.T) {
	e := startSecEnv(t, nil)
	form := url.Values{"username": {"\xffroot" + strings.Repeat("x", 60) + "é"}, "password": {"guess"}}
	req, err := http.NewRequest(http.MethodPost, e.origin+"/login", strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Origin", e.origin)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("login: %d, want 401", resp.StatusCode)
	}
	evs, err := adminv1.NewAdminServiceClient(e.conn).ListAuditEvents(e.grpcCtx(context.Background(), credAdmin), &adminv1.ListAuditEventsRequest{Limit: 10})
	if err != nil {
		t.Fatalf("list audit events: %v", err)
	}
	if len(evs.Events) != 1 || evs.Events[0].Action != "login" || !strings.HasPrefix(evs.Events[0].Actor, "user:\uFFFDroot") {
		t.Fatalf("audit = %v, want the refused login", evs.Events)
	}
}
