// Package nix holds the Nix packaging of nixplane — the package expression
// used by the repository's flake.nix, and the NixOS, nix-darwin and Home
// Manager modules in nix/modules — and the tests that check them with
// nix-instantiate without network access or nixpkgs. It contains no Go
// code besides those tests.
package nix
