package fleetapi

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pquerna/otp/totp"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/commands"
	"github.com/nixplane/nixplane/controlplane/hub"
	"github.com/nixplane/nixplane/controlplane/store"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

const fuzzTOTPSecret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"

// FuzzRunCommandRequest sends any REST body the gateway would accept for
// POST /api/hosts/{id}/commands through RunCommand, as a user with TOTP set
// up, against a real store, hub and command manager with web-1 offline.
// Nothing may run, every refusal is NotFound or FailedPrecondition with a
// printable message, and whatever resolves to reboot or rollback is
// refused for its missing or wrong one-time code (or, past the guess
// limit, ResourceExhausted) before anything else.
func FuzzRunCommandRequest(f *testing.F) {
	for _, s := range []string{
		`{"host_id":"web-1","command":"pull"}`,
		`{"host_id":"web-1","command":"reboot"}`,
		`{"host_id":"web-1","command":" ReBoot\t","totp":"123456"}`,
		`{"host_id":"web-1","command":"rollback","force":true}`,
		`{"host_id":"web-1","command":"stop"}`,
		`{"host_id":"ghost","command":"switch"}`,
		`{"host_id":"web-1","command":"rm -rf /\u0000"}`,
		`{"host_id":"","command":""}`,
		`{"hostId":"web-1","command":"REBOOT"}`,
	} {
		f.Add([]byte(s))
	}
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(f.TempDir(), "fuzz.db"))
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { st.Close() })
	if err := st.CreateHost(ctx, store.Host{ID: "web-1", Record: &fleetv1.Host{HostId: "web-1", Hostname: "web-1"}, CreatedAt: time.Now()}, []byte("h")); err != nil {
		f.Fatal(err)
	}
	if err := st.CreateUser(ctx, store.User{Name: "alice", PasswordHash: []byte("x"), TOTPSecret: fuzzTOTPSecret}); err != nil {
		f.Fatal(err)
	}
	h, err := hub.New(ctx, hub.Config{Store: st})
	if err != nil {
		f.Fatal(err)
	}
	m, err := commands.New(ctx, commands.Config{Hub: h, Store: st})
	if err != nil {
		f.Fatal(err)
	}
	fl := &Fleet{Hub: h, Commands: m, Store: st, Users: st}
	uctx := auth.WithIdentity(ctx, &auth.Identity{Kind: auth.KindUser, Name: "alice", Scope: auth.ScopeAdmin,
		SessionIDHash: []byte("s"), TOTPEnabled: true})

	f.Fuzz(func(t *testing.T, body []byte) {
		var req fleetv1.RunCommandRequest
		if protojson.Unmarshal(body, &req) != nil {
			return
		}
		resp, err := fl.RunCommand(uctx, &req)
		if err == nil {
			t.Fatalf("%q ran on an offline host: %v", body, resp)
		}
		s := status.Convert(err)
		k, known := commands.Kinds[strings.ToLower(strings.TrimSpace(req.Command))]
		destructive := known && (k.Kind == typesv1.CommandKind_COMMAND_KIND_REBOOT || k.Kind == typesv1.CommandKind_COMMAND_KIND_ROLLBACK)
		if destructive && req.Totp != "" && s.Code() == codes.ResourceExhausted {
			return // code guesses are rate limited
		}
		if s.Code() != codes.NotFound && s.Code() != codes.FailedPrecondition {
			t.Fatalf("%q: code %v (%s)", body, s.Code(), s.Message())
		}
		if strings.ContainsFunc(s.Message(), func(r rune) bool { return r < 0x20 || r == 0x7f }) {
			t.Fatalf("%q: message not printable: %q", body, s.Message())
		}
		if destructive && !totp.Validate(req.Totp, fuzzTOTPSecret) && reason(err) != fleetv1.BlockReason_BLOCK_REASON_TOTP_REQUIRED.String() {
			t.Fatalf("%q: %s without a valid code refused with %v, want TOTP_REQUIRED", body, req.Command, err)
		}
	})
}

func reason(err error) string {
	for _, d := range status.Convert(err).Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info.Reason
		}
	}
	return ""
}
