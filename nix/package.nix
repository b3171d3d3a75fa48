# The nixplane binaries. Called by flake.nix (and usable with callPackage):
#   callPackage ./nix/package.nix { src = ./.; version = "…"; commit = "…"; }
#
# vendorHash comes from nix/vendor-hash.txt; after go.mod/go.sum change,
# refresh it as docs/operations.md describes.
{ lib
, buildGoModule
, src
, version
, commit ? "unknown"
}:
let
  vendorHash = lib.fileContents ./vendor-hash.txt;
  ldflags = [
    "-s"
    "-w"
    "-X github.com/nixplane/nixplane/cmd/internal/buildinfo.Version=${version}"
    "-X github.com/nixplane/nixplane/cmd/internal/buildinfo.Commit=${commit}"
  ];
  meta = {
    homepage = "https://github.com/nixplane/nixplane";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
in
{
  # Server and CLI. go-sqlite3 needs cgo.
  nixplane = buildGoModule {
    pname = "nixplane";
    inherit version src vendorHash ldflags;
    subPackages = [ "cmd/nixplane" ];
    env.CGO_ENABLED = "1";
    # The test suite needs git, a browser and free ports; it runs in CI
    # (make test), not in the sandbox.
    doCheck = false;
    meta = meta // {
      description = "Control plane for fleets of Nix machines: server, web UI and CLI";
      mainProgram = "nixplane";
    };
  };

  # The agent is static: it runs on every host, including during a switch.
  nixplane-agent = buildGoModule {
    pname = "nixplane-agent";
    inherit version src vendorHash ldflags;
    subPackages = [ "cmd/nixplane-agent" ];
    env.CGO_ENABLED = "0";
    doCheck = false;
    meta = meta // {
      description = "nixplane agent: connects a NixOS, nix-darwin or Home Manager host to its control plane";
      mainProgram = "nixplane-agent";
    };
  };
}
