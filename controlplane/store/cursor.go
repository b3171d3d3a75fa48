package store

import (
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrInvalidCursor is returned for a page cursor this store did not issue.
// Callers map it to an invalid-argument error.
var ErrInvalidCursor = errors.New("store: invalid page cursor")

// commandCursor is the position after the last command of a page: runs are
// ordered by (created_at, id) descending, so the pair is unique and stable
// under inserts. Encoded opaquely so callers never build one.
type commandCursor struct {
	createdAt int64 // unix milliseconds
	id        string
}

const cursorPrefix = "c1:"

func (c commandCursor) encode() string {
	raw := cursorPrefix + strconv.FormatInt(c.createdAt, 10) + ":" + c.id
	return base64.RawURLEncoding.EncodeToString([]byte(raw))
}

func decodeCommandCursor(s string) (commandCursor, error) {
	raw, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return commandCursor{}, fmt.Errorf("%w: %v", ErrInvalidCursor, err)
	}
	rest, ok := strings.CutPrefix(string(raw), cursorPrefix)
	if !ok {
		return commandCursor{}, fmt.Errorf("%w: unknown format", ErrInvalidCursor)
	}
	ms, id, ok := strings.Cut(rest, ":")
	if !ok || id == "" {
		return commandCursor{}, fmt.Errorf("%w: no id", ErrInvalidCursor)
	}
	n, err := strconv.ParseInt(ms, 10, 64)
	if err != nil {
		return commandCursor{}, fmt.Errorf("%w: bad time: %v", ErrInvalidCursor, err)
	}
	return commandCursor{createdAt: n, id: id}, nil
}
