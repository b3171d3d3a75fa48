package auth

import (
	"strings"
	"testing"
)

// FuzzSessionIDFromCookies: any Cookie header is parsed without panicking,
// and what comes out is the value of a nixplane_session pair, bounded in
// length and free of separators.
func FuzzSessionIDFromCookies(f *testing.F) {
	for _, seed := range []string{
		"", "nixplane_session=abc", "a=1; nixplane_session=xyz; b=2", "nixplane_session=", "nixplane_session",
		"nixplane_session=" + strings.Repeat("x", 200), "x=nixplane_session=evil", ";;;=;", "nixplane_session=a;nixplane_session=b",
		"NIXPLANE_SESSION=upper", "nixplane_session=\x00\xff",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, header string) {
		got := SessionIDFromCookies([]string{header})
		if got == "" {
			return
		}
		if len(got) > 128 {
			t.Fatalf("session id of %d bytes accepted", len(got))
		}
		if strings.ContainsRune(got, ';') {
			t.Fatalf("session id %q holds a separator", got)
		}
		if !strings.Contains(header, SessionCookie+"="+got) {
			t.Fatalf("session id %q is not the value of a %s pair in %q", got, SessionCookie, header)
		}
	})
}
