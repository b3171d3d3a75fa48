{
  description = "nixplane: a control plane for fleets of Nix machines (NixOS, nix-darwin, Home Manager)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The version the Go code declares (cmd/internal/buildinfo), so the
      # agent's reported version matches what the server expects.
      version =
        let m = builtins.match ''.*var Version = "([^"]+)".*''
          (builtins.readFile ./cmd/internal/buildinfo/buildinfo.go);
        in if m == null then "0.0.0" else builtins.head m;
      commit = self.rev or self.dirtyRev or "dirty";

      # go.mod asks for Go 1.26.
      nixplanePackages = pkgs: pkgs.callPackage ./nix/package.nix {
        buildGoModule = pkgs.buildGo126Module or pkgs.buildGoModule;
        src = self;
        inherit version commit;
      };

      # Wraps a module so its package option defaults to this flake's build.
      withPackage = module: attr: { lib, pkgs, ... }: {
        imports = [ module ];
        services.${attr}.package =
          lib.mkDefault (nixplanePackages pkgs).${if attr == "nixplane" then "nixplane" else "nixplane-agent"};
      };
    in
    {
      packages = forAllSystems (pkgs:
        let p = nixplanePackages pkgs;
        in {
          inherit (p) nixplane nixplane-agent;
          default = p.nixplane;
        });

      overlays.default = final: _prev: nixplanePackages final;

      nixosModules = {
        agent = withPackage ./nix/modules/agent.nix "nixplane-agent";
        server = withPackage ./nix/modules/server.nix "nixplane";
      };
      darwinModules.agent = withPackage ./nix/modules/darwin.nix "nixplane-agent";
      homeManagerModules.agent = withPackage ./nix/modules/home-manager.nix "nixplane-agent";

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [ (pkgs.go_1_26 or pkgs.go) pkgs.gcc pkgs.git pkgs.nodejs pkgs.sqlite ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);
    };
}
