//go:build !linux

package loadgen

import "syscall"

func bindNoPort(_, _ string, _ syscall.RawConn) error { return nil }

func raiseFileLimit(uint64) uint64 { return 0 }
