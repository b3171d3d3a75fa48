package controlplane_test

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nixplane/nixplane/controlplane/store"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// TestBulkDestructiveCommandsNeedTOTP: a user with TOTP cannot reboot or
// roll back hosts through a bulk run, which carries no one-time code; the
// per-host RunCommand with a code is the way. Other bulk commands pass.
func TestBulkDestructiveCommandsNeedTOTP(t *testing.T) {
	const secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
	e := startSecEnv(t, func(st *store.SQLite) {
		ctx := context.Background()
		if err := st.SetPendingTOTP(ctx, "alice", secret); err != nil {
			t.Fatal(err)
		}
		if err := st.ConfirmTOTP(ctx, "alice", secret); err != nil {
			t.Fatal(err)
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	agent := connectMatrixAgent(t, ctx, e)

	for _, cmd := range []string{"reboot", "rollback", " Reboot"} {
		code, body := e.sessionREST(t, "POST", "/api/bulk-commands", `{"command":"`+cmd+`","host_ids":["m-1"]}`)
		if code != http.StatusConflict || !strings.Contains(string(body), "TOTP_REQUIRED") {
			t.Fatalf("bulk %q without a code: %d %s, want 409 with reason TOTP_REQUIRED", cmd, code, body)
		}
		_, err := fleetv1.NewFleetServiceClient(e.conn).RunBulkCommand(e.grpcCtx(ctx, credSession),
			&fleetv1.RunBulkCommandRequest{Command: cmd, All: true})
		if status.Code(err) != codes.FailedPrecondition || blockReason(err) != fleetv1.BlockReason_BLOCK_REASON_TOTP_REQUIRED.String() {
			t.Fatalf("gRPC bulk %q: %v (reason %q)", cmd, err, blockReason(err))
		}
	}
	// A harmless bulk command still runs, and it is the first thing the
	// agent is asked to do.
	if code, body := e.sessionREST(t, "POST", "/api/bulk-commands", `{"command":"refresh","host_ids":["m-1"]}`); code != 200 {
		t.Fatalf("bulk refresh: %d %s", code, body)
	}
	waitAgentRun(t, agent, "refresh")
}
