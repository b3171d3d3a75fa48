// Package tests is nixplane's end-to-end suite: it builds the real
// nixplane and nixplane-agent binaries once, runs them as child processes
// against real SQLite data directories and real local git repositories, and
// talks to them over every transport the server offers — native gRPC,
// grpc-web over HTTP/1.1, REST and the command line. The only stand-in is
// the rebuild tool, which the tests point at shell scripts.
//
// Run it with `go test -race ./tests/`.
package tests
