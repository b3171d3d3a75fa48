// Command nixplane-loadgen puts a nixplane server under a measured load:
// simulated agents that heartbeat (and optionally stream command output),
// browser-like grpc-web watchers and native gRPC watchers. It reports what
// the server handled, what it cost in CPU and memory, how late events
// reached watchers, and what was dropped. See docs/PERFORMANCE.md.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/nixplane/nixplane/cmd/nixplane-loadgen/loadgen"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := loadgen.Main(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
