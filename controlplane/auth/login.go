package auth

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
	"golang.org/x/time/rate"

	"github.com/nixplane/nixplane/controlplane/store"
	"github.com/nixplane/nixplane/controlplane/validate"
)

// AdminUser is the user created on first start.
const AdminUser = "admin"

// HashPassword returns the bcrypt hash of a password.
func HashPassword(pw string) ([]byte, error) {
	if len(pw) < 8 || len(pw) > 72 {
		return nil, errors.New("password must be 8 to 72 bytes long")
	}
	return bcrypt.GenerateFromPassword([]byte(pw), bcrypt.DefaultCost)
}

// EnsureAdmin creates the admin user when no user exists yet. The password is
// the given one, or a generated one when empty; generated reports which, so
// the caller can print it once.
func EnsureAdmin(ctx context.Context, users store.Users, password string) (pw string, created bool, err error) {
	n, err := users.CountUsers(ctx)
	if err != nil || n > 0 {
		return "", false, err
	}
	pw = password
	if pw == "" {
		var b [15]byte
		_, _ = rand.Read(b[:])
		pw = base64.RawURLEncoding.EncodeToString(b[:])
	}
	h, err := HashPassword(pw)
	if err != nil {
		return "", false, fmt.Errorf("admin password: %w", err)
	}
	err = users.CreateUser(ctx, store.User{Name: AdminUser, PasswordHash: h, CreatedAt: time.Now()})
	if errors.Is(err, store.ErrExists) {
		return "", false, nil
	}
	return pw, err == nil, err
}

// LoginPage renders the login form.
type LoginPage func(w io.Writer, errMsg, username, next string) error

// Sessions issues and ends browser sessions over plain HTTP: GET and POST
// /login, POST /logout.
type Sessions struct {
	Auth *Authenticator
	// Render writes the login page.
	Render LoginPage
	// SecureCookies marks cookies Secure; set under TLS. Requests whose
	// x-nixplane-secure header says TLS get Secure cookies too.
	SecureCookies bool
	// Audit records logins; may be nil.
	Audit store.Audit
	Log   *slog.Logger

	limOnce   sync.Once
	perClient *limiterSet
	perUser   *limiterSet
}

func (s *Sessions) limits() {
	s.limOnce.Do(func() {
		// 5 attempts then one every 12 s, per client address and per account.
		s.perClient = newLimiterSet(rate.Every(12*time.Second), 5)
		s.perUser = newLimiterSet(rate.Every(12*time.Second), 5)
	})
}

// ServeHTTP handles /login and /logout.
func (s *Sessions) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/login" && r.Method == http.MethodGet:
		s.render(w, http.StatusOK, "", "", safeNext(r.URL.Query().Get("next")))
	case r.URL.Path == "/login" && r.Method == http.MethodPost:
		s.login(w, r)
	case r.URL.Path == "/logout" && r.Method == http.MethodPost:
		s.logout(w, r)
	default:
		w.Header().Set("Allow", "GET, POST")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	}
}

func (s *Sessions) render(w http.ResponseWriter, code int, msg, user, next string) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	if err := s.Render(w, msg, user, next); err != nil {
		s.logger().Error("render login page", "err", err)
	}
}

func (s *Sessions) logger() *slog.Logger {
	if s.Log != nil {
		return s.Log
	}
	return slog.Default()
}

// safeNext keeps redirects on this site: only absolute paths, no scheme or
// host, no protocol-relative "//evil". Control characters and backslashes
// are refused anywhere: browsers drop tabs and newlines from URLs and read a
// backslash as '/', so "/<tab>/evil" would become "//evil".
func safeNext(next string) string {
	if !strings.HasPrefix(next, "/") || strings.HasPrefix(next, "//") ||
		strings.ContainsFunc(next, func(r rune) bool { return r < 0x20 || r == 0x7f || r == '\\' }) {
		return "/"
	}
	return next
}

func clientAddr(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

func (s *Sessions) login(w http.ResponseWriter, r *http.Request) {
	s.limits()
	r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
	if err := r.ParseForm(); err != nil {
		s.render(w, http.StatusBadRequest, "Malformed login form.", "", "/")
		return
	}
	user := strings.TrimSpace(r.PostFormValue("username"))
	pw := r.PostFormValue("password")
	code := strings.TrimSpace(r.PostFormValue("totp"))
	next := safeNext(r.PostFormValue("next"))
	if origin := r.Header.Get("Origin"); origin != "" && !s.Auth.OriginAllowed(origin, r.Host) && !sameSiteFetch(r, origin) {
		s.render(w, http.StatusForbidden, "Login from a foreign origin refused.", user, next)
		return
	}
	now := time.Now()
	if wait := max(s.perClient.reserve(clientAddr(r), now), s.perUser.reserve(strings.ToLower(user), now)); wait > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(wait.Seconds()))))
		s.audit(r.Context(), user, "login", "ResourceExhausted")
		s.render(w, http.StatusTooManyRequests, "Too many login attempts. Try again later.", user, next)
		return
	}
	u, err := s.Auth.Stores.GetUser(r.Context(), user)
	if err != nil {
		// Spend the same time as a real check, so names cannot be probed.
		_ = bcrypt.CompareHashAndPassword(dummyHash, []byte(pw))
		s.audit(r.Context(), user, "login", "Unauthenticated")
		s.render(w, http.StatusUnauthorized, "Wrong user name or password.", user, next)
		return
	}
	if bcrypt.CompareHashAndPassword(u.PasswordHash, []byte(pw)) != nil {
		s.audit(r.Context(), user, "login", "Unauthenticated")
		s.render(w, http.StatusUnauthorized, "Wrong user name or password.", user, next)
		return
	}
	if u.TOTPSecret != "" && !s.Auth.Codes.Validate(u.Name, code, u.TOTPSecret) {
		s.audit(r.Context(), user, "login", "Unauthenticated")
		s.render(w, http.StatusUnauthorized, "Wrong or missing one-time code.", user, next)
		return
	}
	sid := NewSecret("")
	var csrf [32]byte
	_, _ = rand.Read(csrf[:])
	sess := store.Session{IDHash: HashSecret(sid), User: u.Name, CSRFToken: base64.RawURLEncoding.EncodeToString(csrf[:]),
		CreatedAt: now, LastUsed: now, ExpiresAt: now.Add(s.Auth.SessionMax)}
	if err := s.Auth.Stores.CreateSession(r.Context(), sess); err != nil {
		s.logger().Error("create session", "err", err)
		s.render(w, http.StatusInternalServerError, "Could not create a session; see the server log.", user, next)
		return
	}
	s.audit(r.Context(), user, "login", "ok")
	http.SetCookie(w, &http.Cookie{Name: SessionCookie, Value: sid, Path: "/", HttpOnly: true,
		SameSite: http.SameSiteLaxMode, Secure: s.secure(r), Expires: sess.ExpiresAt})
	http.Redirect(w, r, next, http.StatusSeeOther)
}

func (s *Sessions) secure(r *http.Request) bool {
	return s.SecureCookies || r.TLS != nil || r.Header.Get(MDSecure) == "1"
}

func (s *Sessions) logout(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
	c, err := r.Cookie(SessionCookie)
	if err == nil {
		id, err := s.Auth.IdentifySession(r.Context(), c.Value)
		if err == nil {
			tok := r.PostFormValue("csrf_token")
			if tok == "" {
				tok = r.Header.Get("X-CSRF-Token")
			}
			if !csrfMatches(tok, id.CSRFToken) || !s.Auth.OriginAllowed(r.Header.Get("Origin"), r.Host) {
				http.Error(w, "missing or wrong CSRF token", http.StatusForbidden)
				return
			}
			if err := s.Auth.Stores.DeleteSession(r.Context(), id.SessionIDHash); err != nil {
				s.logger().Error("delete session", "err", err)
			}
			s.audit(r.Context(), id.Name, "logout", "ok")
		}
	}
	http.SetCookie(w, &http.Cookie{Name: SessionCookie, Value: "", Path: "/", HttpOnly: true,
		SameSite: http.SameSiteLaxMode, Secure: s.secure(r), MaxAge: -1})
	http.Redirect(w, r, "/login", http.StatusSeeOther)
}

func (s *Sessions) audit(ctx context.Context, user, action, result string) {
	if s.Audit == nil {
		return
	}
	if err := s.Audit.AppendAudit(ctx, store.AuditEvent{Time: time.Now(), Actor: "user:" + validate.Printable(user, 64), Action: action, Result: result}); err != nil {
		s.logger().Warn("audit", "err", err)
	}
}

var dummyHash, _ = bcrypt.GenerateFromPassword([]byte("nixplane-dummy-password"), bcrypt.DefaultCost)

// limiterSet holds one token bucket per key, bounded in size.
type limiterSet struct {
	mu    sync.Mutex
	every rate.Limit
	burst int
	m     map[string]*rate.Limiter
}

func newLimiterSet(every rate.Limit, burst int) *limiterSet {
	return &limiterSet{every: every, burst: burst, m: map[string]*rate.Limiter{}}
}

// reserve takes one attempt for key and returns how long the caller must
// wait first (0: go ahead). A refused attempt consumes nothing.
func (l *limiterSet) reserve(key string, now time.Time) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	lim, ok := l.m[key]
	if !ok {
		if len(l.m) >= 100_000 { // bound memory under a spray of keys
			clear(l.m)
		}
		lim = rate.NewLimiter(l.every, l.burst)
		l.m[key] = lim
	}
	r := lim.ReserveN(now, 1)
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return d
	}
	return 0
}

// sameSiteFetch accepts a form post whose Origin is "null" (privacy
// settings may hide it) when the browser itself says it came from this
// site.
func sameSiteFetch(r *http.Request, origin string) bool {
	return origin == "null" && r.Header.Get("Sec-Fetch-Site") == "same-origin"
}
