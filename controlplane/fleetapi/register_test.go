package fleetapi

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/store"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// TestRegisterHost: a valid request stores the host with the hash of the
// token it returns; a hostile name is an *InvalidHostError and stores
// nothing; a second registration is store.ErrExists and keeps the first
// token.
func TestRegisterHost(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "nixplane.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rec, tok, err := RegisterHost(ctx, st, &fleetv1.AddHostRequest{Hostname: " web-1 "}, time.Now())
	if err != nil || rec.HostId != "web-1" || !strings.HasPrefix(tok, auth.AgentTokenPrefix) {
		t.Fatalf("RegisterHost = %v, %q, %v", rec, tok, err)
	}
	if id, err := st.HostIDByTokenHash(ctx, auth.HashSecret(tok)); err != nil || id != "web-1" {
		t.Fatalf("the token's hash finds %q, %v; want web-1", id, err)
	}

	var invalid *InvalidHostError
	for _, name := range []string{"", "<img src=x onerror=alert(1)>", "a/b", strings.Repeat("x", 300)} {
		if _, _, err := RegisterHost(ctx, st, &fleetv1.AddHostRequest{Hostname: name}, time.Now()); !errors.As(err, &invalid) {
			t.Errorf("host name %.20q: %v, want an *InvalidHostError", name, err)
		}
	}
	if hs, err := st.ListHosts(ctx); err != nil || len(hs) != 1 {
		t.Fatalf("hosts stored after the refusals: %d, %v; want 1", len(hs), err)
	}

	rec2, tok2, err := RegisterHost(ctx, st, &fleetv1.AddHostRequest{Hostname: "web-1"}, time.Now())
	if !errors.Is(err, store.ErrExists) || rec2.GetHostId() != "web-1" || tok2 != "" {
		t.Fatalf("second registration = %v, %q, %v; want store.ErrExists naming web-1", rec2, tok2, err)
	}
	if id, err := st.HostIDByTokenHash(ctx, auth.HashSecret(tok)); err != nil || id != "web-1" {
		t.Fatalf("the first token no longer works: %q, %v", id, err)
	}
}
