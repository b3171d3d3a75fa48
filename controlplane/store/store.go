// Package store keeps nixplane's durable state: hosts and their agent-token
// hashes, users and sessions, API tokens, command runs with their full logs,
// bulk runs, the audit log and settings.
//
// Callers depend on the small per-resource interfaces below, never on the
// SQLite type, so another backend (PostgreSQL, for several replicas) can be
// added without touching them. The embedded default is [SQLite].
//
// Live host state (online, metrics, running command) is not kept here: it
// lives in memory in the hub. Only last-seen is written, in batches.
package store

import (
	"context"
	"errors"
	"time"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// Errors every backend returns, matched with errors.Is.
var (
	// ErrNotFound: no such record.
	ErrNotFound = errors.New("store: not found")
	// ErrExists: a record with that key exists already.
	ErrExists = errors.New("store: already exists")
)

// Host is the durable record of a host.
type Host struct {
	// ID is the host name.
	ID string
	// Record holds the host's durable fields; live fields (online, metrics,
	// running command) are not stored and come back zero.
	Record    *fleetv1.Host
	LastSeen  time.Time
	CreatedAt time.Time
}

// Hosts stores hosts and their agent-token hashes.
type Hosts interface {
	// CreateHost inserts a host with its token hash; ErrExists if present.
	CreateHost(ctx context.Context, h Host, tokenHash []byte) error
	// GetHost returns a host; ErrNotFound if absent.
	GetHost(ctx context.Context, id string) (Host, error)
	// ListHosts returns every host sorted by id.
	ListHosts(ctx context.Context) ([]Host, error)
	// UpdateHostRecord replaces a host's durable record; ErrNotFound if absent.
	UpdateHostRecord(ctx context.Context, id string, rec *fleetv1.Host) error
	// DeleteHost removes a host with its commands and logs; ErrNotFound if absent.
	DeleteHost(ctx context.Context, id string) error
	// SetHostToken replaces a host's token hash; ErrNotFound if absent.
	SetHostToken(ctx context.Context, id string, tokenHash []byte) error
	// HostIDByTokenHash returns the host a token hash belongs to; ErrNotFound.
	HostIDByTokenHash(ctx context.Context, tokenHash []byte) (string, error)
	// SaveLastSeen writes many hosts' last-seen times in one transaction;
	// unknown ids are ignored.
	SaveLastSeen(ctx context.Context, seen map[string]time.Time) error
}

// User is a person who logs in to the web UI.
type User struct {
	Name         string
	PasswordHash []byte // bcrypt
	TOTPSecret   string // base32; empty when TOTP is not set up
	CreatedAt    time.Time
}

// Users stores users.
type Users interface {
	// CreateUser inserts a user; ErrExists if present.
	CreateUser(ctx context.Context, u User) error
	// GetUser returns a user; ErrNotFound if absent.
	GetUser(ctx context.Context, name string) (User, error)
	// UpdateUser replaces a user's password hash and TOTP secret.
	UpdateUser(ctx context.Context, u User) error
	// CountUsers returns how many users exist.
	CountUsers(ctx context.Context) (int, error)
}

// Session is a logged-in browser session. The session id itself is never
// stored: only its sha256.
type Session struct {
	IDHash    []byte
	User      string
	CSRFToken string
	CreatedAt time.Time
	LastUsed  time.Time
	ExpiresAt time.Time // absolute expiry
}

// Sessions stores browser sessions.
type Sessions interface {
	CreateSession(ctx context.Context, s Session) error
	// GetSession returns a session by id hash; ErrNotFound if absent.
	GetSession(ctx context.Context, idHash []byte) (Session, error)
	// TouchSession records use of a session (idle expiry).
	TouchSession(ctx context.Context, idHash []byte, at time.Time) error
	DeleteSession(ctx context.Context, idHash []byte) error
	// DeleteExpiredSessions removes sessions past absolute expiry, or idle
	// since before idleBefore.
	DeleteExpiredSessions(ctx context.Context, now, idleBefore time.Time) (int, error)
}

// APIToken is a named token for automation. Only its sha256 is stored.
type APIToken struct {
	Name       string
	Hash       []byte
	Scope      string // read, operate, admin
	CreatedAt  time.Time
	ExpiresAt  time.Time // zero: never
	LastUsedAt time.Time
}

// APITokens stores API tokens.
type APITokens interface {
	// CreateAPIToken inserts a token; ErrExists if the name is taken.
	CreateAPIToken(ctx context.Context, t APIToken) error
	// APITokenByHash returns a token by hash; ErrNotFound if absent.
	APITokenByHash(ctx context.Context, hash []byte) (APIToken, error)
	ListAPITokens(ctx context.Context) ([]APIToken, error)
	// RevokeAPIToken deletes a token by name; ErrNotFound if absent.
	RevokeAPIToken(ctx context.Context, name string) error
	TouchAPIToken(ctx context.Context, name string, at time.Time) error
}

// Commands stores command runs and their output.
type Commands interface {
	// CreateCommand inserts a command run; ErrExists on a duplicate id.
	CreateCommand(ctx context.Context, c *fleetv1.Command) error
	// UpdateCommand replaces a command run's record; ErrNotFound if absent.
	UpdateCommand(ctx context.Context, c *fleetv1.Command) error
	// GetCommand returns a command run; ErrNotFound if absent.
	GetCommand(ctx context.Context, id string) (*fleetv1.Command, error)
	// ListCommands returns runs newest first, of one host or all (hostID
	// empty), at most limit, starting after the cursor (empty: newest). It
	// returns the cursor for the next page, empty at the end.
	ListCommands(ctx context.Context, hostID string, limit int, cursor string) ([]*fleetv1.Command, string, error)
	// ActiveCommands returns runs not in a terminal state.
	ActiveCommands(ctx context.Context) ([]*fleetv1.Command, error)
	// AppendLines stores output lines of one command in one transaction.
	// A line whose seq is already stored is ignored (agents may resend).
	AppendLines(ctx context.Context, commandID string, lines []*typesv1.OutputLine) error
	// ReadLines returns lines with seq > afterSeq in order, at most limit.
	ReadLines(ctx context.Context, commandID string, afterSeq uint64, limit int) ([]*typesv1.OutputLine, error)
	// PruneCommands deletes ended runs (and their logs) finished before t.
	PruneCommands(ctx context.Context, before time.Time) (int, error)
}

// AuditEvent is one recorded action.
type AuditEvent struct {
	ID     int64
	Time   time.Time
	Actor  string
	Action string
	HostID string
	Result string
	Detail string
}

// Audit stores the audit log.
type Audit interface {
	AppendAudit(ctx context.Context, e AuditEvent) error
	// ListAudit returns events newest first, of one host or all, with id
	// below beforeID (0: no bound), at most limit.
	ListAudit(ctx context.Context, hostID string, limit int, beforeID int64) ([]AuditEvent, error)
}

// Settings stores small key/value settings.
type Settings interface {
	// GetSetting returns a value; ErrNotFound if unset.
	GetSetting(ctx context.Context, key string) (string, error)
	SetSetting(ctx context.Context, key, value string) error
}

// BulkRun is the durable record of a bulk run: what readers see, and what a
// restarted server needs to continue it.
type BulkRun struct {
	// Bulk is the run as the API returns it. A run is unfinished while its
	// state is RUNNING.
	Bulk *fleetv1.BulkCommand
	// Plan says how to continue the run.
	Plan BulkPlan
}

// BulkPlan is how a bulk run proceeds: every host runs Steps in order,
// batch after batch, and the run halts when more than MaxFailures hosts
// failed. Hosts records each host's progress, so that a restarted server
// neither repeats nor skips a step.
type BulkPlan struct {
	Steps   []string   `json:"steps"`
	Batches [][]string `json:"batches"`
	// Concurrency bounds hosts at once within a batch.
	Concurrency int  `json:"concurrency"`
	Force       bool `json:"force,omitempty"`
	// MaxFailures below zero never halts.
	MaxFailures int `json:"max_failures"`
	// Hosts holds the progress of hosts that started; a host absent has
	// not started.
	Hosts map[string]BulkHostProgress `json:"hosts,omitempty"`
}

// BulkHostProgress is one host's progress in a bulk run.
type BulkHostProgress struct {
	// Step is the index in Steps of the step started last.
	Step int `json:"step"`
	// CommandID is that step's command; empty until it was queued.
	CommandID string `json:"command_id,omitempty"`
	// Ended says the host's part is over; OK that every step succeeded.
	Ended bool `json:"ended,omitempty"`
	OK    bool `json:"ok,omitempty"`
}

// Bulks stores bulk runs.
type Bulks interface {
	// SaveBulk inserts or replaces a run by its bulk id.
	SaveBulk(ctx context.Context, r BulkRun) error
	// GetBulk returns a run; ErrNotFound if absent.
	GetBulk(ctx context.Context, id string) (BulkRun, error)
	// UnfinishedBulks returns the runs still RUNNING, in the order they
	// were first saved (creation order).
	UnfinishedBulks(ctx context.Context) ([]BulkRun, error)
	// PruneBulks deletes ended runs but the newest keep (by first save) and
	// returns how many it deleted. Unfinished runs are never deleted.
	PruneBulks(ctx context.Context, keep int) (int, error)
}

// Store is every interface at once: what a backend implements. Callers take
// the narrow interface they use.
type Store interface {
	Hosts
	Users
	Sessions
	APITokens
	Commands
	Audit
	Settings
	Bulks
	Close() error
}
