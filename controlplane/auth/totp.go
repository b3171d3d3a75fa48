package auth

import (
	"crypto/subtle"
	"sync"
	"time"

	"github.com/pquerna/otp"
	"github.com/pquerna/otp/totp"
)

// totpPeriod is the length of one TOTP time step.
const totpPeriod = 30 * time.Second

// OneTimeCodes checks TOTP codes (RFC 6238, six digits, 30 s steps, one
// step of clock skew either way) and accepts each time step at most once
// per user: a code seen over a shoulder or replayed from a captured request
// is refused even inside its validity window. One instance is shared by
// every place that checks codes (login, destructive commands, enrolment).
// The zero value is ready to use; a nil *OneTimeCodes checks codes without
// replay protection.
type OneTimeCodes struct {
	// Now is the clock; nil means time.Now.
	Now func() time.Time

	mu   sync.Mutex
	used map[string]int64 // user → last accepted time step
}

// Validate reports whether code is a current code of secret that user has
// not used before. A match marks its time step (and the ones before it) as
// used for user.
func (o *OneTimeCodes) Validate(user, code, secret string) bool {
	now := time.Now()
	if o != nil && o.Now != nil {
		now = o.Now()
	}
	step, ok := matchStep(code, secret, now)
	if !ok {
		return false
	}
	if o == nil {
		return true
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if last, seen := o.used[user]; seen && step <= last {
		return false
	}
	if o.used == nil {
		o.used = map[string]int64{}
	}
	o.used[user] = step
	return true
}

// matchStep returns the time step whose code equals code, trying the
// current step and one on either side.
func matchStep(code, secret string, now time.Time) (int64, bool) {
	if len(code) != 6 || secret == "" {
		return 0, false
	}
	opts := totp.ValidateOpts{Period: uint(totpPeriod / time.Second), Digits: otp.DigitsSix, Algorithm: otp.AlgorithmSHA1}
	for _, skew := range []int64{0, -1, 1} {
		at := now.Add(time.Duration(skew) * totpPeriod)
		want, err := totp.GenerateCodeCustom(secret, at, opts)
		if err != nil {
			return 0, false
		}
		if subtle.ConstantTimeCompare([]byte(want), []byte(code)) == 1 {
			return at.Unix() / int64(totpPeriod/time.Second), true
		}
	}
	return 0, false
}
