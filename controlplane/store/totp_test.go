package store

import (
	"context"
	"testing"
)

// TestTOTPEnrolment: a pending secret guards nothing until confirmed;
// confirming a secret that was replaced meanwhile fails; disabling needs the
// enabled secret and clears a pending one too.
func TestTOTPEnrolment(t *testing.T) {
	ctx := context.Background()
	s := openTemp(t)
	wantErr(t, s.CreateUser(ctx, User{Name: "alice", PasswordHash: []byte("bcrypt")}), nil)
	wantErr(t, s.SetPendingTOTP(ctx, "nobody", "AAAA"), ErrNotFound)
	if _, err := s.PendingTOTP(ctx, "nobody"); err == nil {
		t.Fatal("pending TOTP of a missing user")
	}

	wantErr(t, s.SetPendingTOTP(ctx, "alice", "FIRST"), nil)
	wantErr(t, s.SetPendingTOTP(ctx, "alice", "SECOND"), nil)
	if u, _ := s.GetUser(ctx, "alice"); u.TOTPSecret != "" {
		t.Fatalf("pending secret enabled early: %q", u.TOTPSecret)
	}
	if p, err := s.PendingTOTP(ctx, "alice"); err != nil || p != "SECOND" {
		t.Fatalf("pending = %q, %v", p, err)
	}
	wantErr(t, s.ConfirmTOTP(ctx, "alice", "FIRST"), ErrNotFound)
	wantErr(t, s.ConfirmTOTP(ctx, "alice", "SECOND"), nil)
	u, _ := s.GetUser(ctx, "alice")
	if p, _ := s.PendingTOTP(ctx, "alice"); u.TOTPSecret != "SECOND" || p != "" {
		t.Fatalf("after confirm: secret %q, pending %q", u.TOTPSecret, p)
	}
	wantErr(t, s.ConfirmTOTP(ctx, "alice", "SECOND"), ErrNotFound) // nothing pending any more

	wantErr(t, s.SetPendingTOTP(ctx, "alice", "THIRD"), nil)
	wantErr(t, s.DisableTOTP(ctx, "alice", "OTHER"), ErrNotFound)
	wantErr(t, s.DisableTOTP(ctx, "alice", "SECOND"), nil)
	u, _ = s.GetUser(ctx, "alice")
	if p, _ := s.PendingTOTP(ctx, "alice"); u.TOTPSecret != "" || p != "" {
		t.Fatalf("after disable: secret %q, pending %q", u.TOTPSecret, p)
	}
	wantErr(t, s.DisableTOTP(ctx, "alice", ""), ErrNotFound)
}
