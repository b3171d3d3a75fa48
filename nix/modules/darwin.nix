# nix-darwin module: services.nixplane-agent as a launchd daemon.
#
# darwin-rebuild must run as root, so the daemon runs as root and calls it
# directly (no sudo). launchd restarts it whenever it exits (KeepAlive),
# which covers exit status 101 after a switch replaced the agent.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.nixplane-agent;
  inherit (lib) mkIf mkOption types;
  inherit (import ./agent-args.nix) agentArgs;
  stateDir = "/var/lib/nixplane-agent";
  logFile = "/var/log/nixplane-agent.log";
in
{
  options.services.nixplane-agent = import ./agent-options.nix { inherit lib; } // {
    package = mkOption {
      type = types.package;
      description = "The nixplane-agent package (the flake's darwinModules.agent sets it).";
    };

    hostname = mkOption {
      type = types.str;
      example = "studio";
      description = "Name the host is registered under; also its attribute in the fleet flake's darwinConfigurations.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = !(lib.hasPrefix builtins.storeDir cfg.tokenFile);
        message = "services.nixplane-agent.tokenFile must not be in the Nix store (it is world-readable there).";
      }
    ] ++ import ./agent-assertions.nix { inherit lib cfg; };

    environment.systemPackages = [ cfg.package ];

    launchd.daemons.nixplane-agent.serviceConfig = {
      Label = "org.nixplane.agent";
      ProgramArguments = [ "${cfg.package}/bin/nixplane-agent" ] ++ agentArgs {
        inherit (cfg) serverUrl hostname tokenFile repoUrl branch interval location deviceType themeColor sshKeyFile caFile tlsClientCert tlsClientKey extraFlags;
        hostType = "darwin";
        inherit stateDir;
        selfPath = "/run/current-system/sw/bin/nixplane-agent";
      };
      EnvironmentVariables = {
        HOME = stateDir;
        PATH = lib.concatStringsSep ":" [
          "/run/current-system/sw/bin"
          "/nix/var/nix/profiles/default/bin"
          "${pkgs.git}/bin"
          "${pkgs.openssh}/bin"
          "/usr/bin"
          "/bin"
          "/usr/sbin"
          "/sbin"
        ];
      };
      KeepAlive = true;
      RunAtLoad = true;
      ThrottleInterval = 5;
      StandardOutPath = logFile;
      StandardErrorPath = logFile;
    };
  };
}
