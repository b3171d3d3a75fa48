# Home Manager module: services.nixplane-agent for a user's Home Manager
# configuration — a launchd agent on macOS, a systemd user service on Linux.
# The agent runs `home-manager switch --flake <clone>#<hostname>` as the user.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.nixplane-agent;
  inherit (lib) mkIf mkMerge mkOption types;
  inherit (import ./agent-args.nix) agentArgs;
  stateDir = "${config.home.homeDirectory}/.local/state/nixplane-agent";

  command = [ "${cfg.package}/bin/nixplane-agent" ] ++ agentArgs {
    inherit (cfg) serverUrl hostname tokenFile repoUrl branch interval location deviceType themeColor sshKeyFile caFile tlsClientCert tlsClientKey extraFlags;
    hostType = "home-manager";
    inherit stateDir;
    selfPath = "${config.home.profileDirectory}/bin/nixplane-agent";
  };

  path = lib.concatStringsSep ":" [
    "${config.home.profileDirectory}/bin"
    "/run/current-system/sw/bin"
    "/nix/var/nix/profiles/default/bin"
    "${pkgs.git}/bin"
    "${pkgs.openssh}/bin"
    "/usr/bin"
    "/bin"
  ];
in
{
  options.services.nixplane-agent = import ./agent-options.nix { inherit lib; } // {
    package = mkOption {
      type = types.package;
      description = "The nixplane-agent package (the flake's homeManagerModules.agent sets it).";
    };

    hostname = mkOption {
      type = types.str;
      example = "alice@laptop";
      description = "Name the host is registered under; also its attribute in the fleet flake's homeConfigurations.";
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = !(lib.hasPrefix builtins.storeDir cfg.tokenFile);
          message = "services.nixplane-agent.tokenFile must not be in the Nix store (it is world-readable there).";
        }
      ] ++ import ./agent-assertions.nix { inherit lib cfg; };
      home.packages = [ cfg.package ];
    }

    (mkIf pkgs.stdenv.isLinux {
      systemd.user.services.nixplane-agent = {
        Unit = {
          Description = "nixplane agent";
          After = [ "network-online.target" ];
          # The switch that changes this unit is run by the agent itself:
          # keep it running; it exits with 101 after reporting and is
          # started again with the new unit.
          X-SwitchMethod = "keep-old";
          StartLimitIntervalSec = 0;
        };
        Service = {
          ExecStart = lib.escapeShellArgs command;
          Environment = [ "PATH=${path}" ];
          Restart = "always";
          RestartSec = "5s";
          RestartForceExitStatus = "101";
        };
        Install.WantedBy = [ "default.target" ];
      };
    })

    (mkIf pkgs.stdenv.isDarwin {
      launchd.agents.nixplane-agent = {
        enable = true;
        config = {
          Label = "org.nixplane.agent";
          ProgramArguments = command;
          EnvironmentVariables.PATH = path;
          # Restarted whenever it exits, 101 included.
          KeepAlive = true;
          RunAtLoad = true;
          ThrottleInterval = 5;
          StandardOutPath = "${config.home.homeDirectory}/Library/Logs/nixplane-agent.log";
          StandardErrorPath = "${config.home.homeDirectory}/Library/Logs/nixplane-agent.log";
        };
      };
    })
  ]);
}
