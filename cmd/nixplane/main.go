// Command nixplane is the nixplane control plane server and its command line.
// See `nixplane help`.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/nixplane/nixplane/cmd/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Main(ctx, os.Args[1:], cli.Env{Stdout: os.Stdout, Stderr: os.Stderr, Getenv: os.Getenv})
	stop()
	os.Exit(code)
}
