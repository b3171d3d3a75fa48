// Package buildinfo holds the version and source commit of the nixplane
// binaries. Release builds set them with
//
//	-ldflags "-X github.com/nixplane/nixplane/cmd/internal/buildinfo.Version=1.2.3
//	          -X github.com/nixplane/nixplane/cmd/internal/buildinfo.Commit=<git sha>"
//
// (the Nix package does); otherwise the commit comes from the Go build's VCS
// stamp when there is one. Library packages never read this: mains pass the
// values into their typed Config, so tests can choose them.
package buildinfo

import "runtime/debug"

// Version is the release version of this build.
var Version = "0.1.0"

// Commit is the git commit this build was made from; see [SourceCommit].
var Commit = ""

// SourceCommit returns Commit, or the VCS revision Go stamped into the
// binary, or "unknown".
func SourceCommit() string {
	if Commit != "" {
		return Commit
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && s.Value != "" {
				return s.Value
			}
		}
	}
	return "unknown"
}
