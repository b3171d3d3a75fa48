package auth

import (
	"testing"
	"time"

	"github.com/pquerna/otp/totp"
)

func TestOneTimeCodesRefuseReplay(t *testing.T) {
	key, err := totp.Generate(totp.GenerateOpts{Issuer: "nixplane", AccountName: "admin"})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 5, 1, 12, 0, 10, 0, time.UTC)
	o := &OneTimeCodes{Now: func() time.Time { return now }}
	code := func(at time.Time) string {
		c, err := totp.GenerateCode(key.Secret(), at)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	cur := code(now)
	if !o.Validate("admin", cur, key.Secret()) {
		t.Fatal("current code refused")
	}
	if o.Validate("admin", cur, key.Secret()) {
		t.Fatal("the same code was accepted twice")
	}
	if o.Validate("admin", code(now.Add(-totpPeriod)), key.Secret()) {
		t.Fatal("an older step was accepted after a newer one")
	}
	if !o.Validate("other", cur, key.Secret()) {
		t.Fatal("another user's use of a step blocked this user")
	}
	if !o.Validate("admin", code(now.Add(totpPeriod)), key.Secret()) {
		t.Fatal("the next step (clock skew) refused")
	}
	for _, bad := range []string{"", "12345", "1234567", "abcdef", code(now.Add(5 * totpPeriod))} {
		if o.Validate("fresh", bad, key.Secret()) {
			t.Fatalf("code %q accepted", bad)
		}
	}
	if o.Validate("fresh", code(now), "") {
		t.Fatal("accepted without a secret")
	}
	// A nil checker has no memory and the real clock; it still checks the
	// code itself.
	var stateless *OneTimeCodes
	real := code(time.Now())
	if !stateless.Validate("admin", real, key.Secret()) || !stateless.Validate("admin", real, key.Secret()) {
		t.Fatal("nil checker refused a current code")
	}
	if far := code(time.Now().Add(5 * totpPeriod)); far != real && stateless.Validate("admin", far, key.Secret()) {
		t.Fatal("nil checker accepted a code five steps away")
	}
}
