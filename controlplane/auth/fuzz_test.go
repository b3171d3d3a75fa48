package auth

import (
	"net/url"
	"strings"
	"testing"
)

// FuzzOriginAllowed: a browser's Origin header is accepted only when it is
// an http(s) origin of the request's own host or one configured origin.
func FuzzOriginAllowed(f *testing.F) {
	for _, s := range [][2]string{
		{"http://127.0.0.1:8080", "127.0.0.1:8080"}, {"https://evil.example", "127.0.0.1:8080"},
		{"null", "h"}, {"", "h"}, {"javascript://h", "h"}, {"http://h@evil", "evil"}, {"https://ops.example", "x"},
		{"http://H", "h"}, {"http://h/", "h"}, {"http://h:80", "h"},
	} {
		f.Add(s[0], s[1])
	}
	a := &Authenticator{AllowedOrigins: []string{"https://ops.example/"}}
	f.Fuzz(func(t *testing.T, origin, host string) {
		if !a.OriginAllowed(origin, host) {
			return
		}
		if strings.EqualFold(origin, "https://ops.example") {
			return
		}
		u, err := url.Parse(origin)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || host == "" || !strings.EqualFold(u.Host, host) {
			t.Fatalf("accepted origin %q for host %q", origin, host)
		}
	})
}

// FuzzSafeNext: a login redirect target from the form or query string
// stays on this site whatever it holds.
func FuzzSafeNext(f *testing.F) {
	for _, s := range []string{"/", "/hosts?x=1", "//evil.example", "/\\evil.example", "/\t/evil", "https://evil.example",
		"javascript:alert(1)", "", "/%2F%2Fevil", "\x00/", "/ok\r\nSet-Cookie: x=1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, next string) {
		got := safeNext(next)
		if got != "/" && got != next {
			t.Fatalf("safeNext(%q) = %q: rewritten, not kept or refused", next, got)
		}
		if !strings.HasPrefix(got, "/") || strings.HasPrefix(got, "//") ||
			strings.ContainsFunc(got, func(r rune) bool { return r < 0x20 || r == 0x7f || r == '\\' }) {
			t.Fatalf("safeNext(%q) = %q leaves the site", next, got)
		}
		if u, err := url.Parse(got); err == nil && (u.Scheme != "" || u.Host != "") {
			t.Fatalf("safeNext(%q) = %q has scheme %q host %q", next, got, u.Scheme, u.Host)
		}
	})
}
