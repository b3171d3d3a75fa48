# NixOS module: services.nixplane-agent.
#
# The agent runs as its own system user. It may run exactly two things as
# root, through sudo: a small rebuild wrapper that accepts only
# `switch --flake <its clone>#<this host>` and `switch --rollback`, and
# `reboot` without arguments.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.nixplane-agent;
  inherit (lib) mkIf mkOption types;
  inherit (import ./agent-args.nix) agentArgs;

  user = "nixplane-agent";
  stateDir = "/var/lib/nixplane-agent";
  flakeRef = "${stateDir}/repo#${cfg.hostname}";

  # Runs as root (the sudo rule below names this store path and nothing
  # else); refuses every argument list the agent has no business sending.
  rootRebuild = pkgs.writeShellScript "nixplane-rebuild-root" ''
    set -eu
    case "$*" in
      "switch --flake ${flakeRef}" | "switch --rollback")
        exec /run/current-system/sw/bin/nixos-rebuild "$@" ;;
      *)
        echo "nixplane-rebuild: refusing arguments: $*" >&2
        exit 2 ;;
    esac
  '';

  # What the agent calls instead of nixos-rebuild (--rebuild-command gets
  # the same arguments and is not run through sudo by the agent).
  rebuild = pkgs.writeShellScript "nixplane-rebuild" ''
    exec /run/wrappers/bin/sudo -n ${rootRebuild} "$@"
  '';

  rebootCmd = "/run/wrappers/bin/sudo -n /run/current-system/sw/bin/reboot";

  args = agentArgs {
    inherit (cfg) serverUrl hostname repoUrl branch interval location deviceType themeColor caFile tlsClientCert tlsClientKey extraFlags;
    hostType = "nixos";
    stateDir = stateDir;
    # %d is systemd's credentials directory (LoadCredential below).
    tokenFile = "%d/token";
    sshKeyFile = if cfg.sshKeyFile == null then null else "%d/ssh-key";
    rebuildCommand = "${rebuild}";
    rebootCommand = rebootCmd;
    selfPath = "/run/current-system/sw/bin/nixplane-agent";
  };
in
{
  options.services.nixplane-agent = import ./agent-options.nix { inherit lib; } // {
    package = mkOption {
      type = types.package;
      description = "The nixplane-agent package (the flake's nixosModules.agent sets it).";
    };

    hostname = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = "Name the host is registered under; also its attribute in the fleet flake's nixosConfigurations.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = !(lib.hasPrefix builtins.storeDir cfg.tokenFile);
        message = "services.nixplane-agent.tokenFile must not be in the Nix store (it is world-readable there).";
      }
      {
        assertion = cfg.hostname != "";
        message = "services.nixplane-agent.hostname is empty; set it or networking.hostName.";
      }
    ] ++ import ./agent-assertions.nix { inherit lib cfg; };

    # On PATH as well, so that --self-path finds the agent binary of the
    # newly activated system and the agent can tell when a switch replaced it.
    environment.systemPackages = [ cfg.package ];

    users.users.${user} = {
      isSystemUser = true;
      group = user;
      home = stateDir;
      description = "nixplane agent";
    };
    users.groups.${user} = { };

    security.sudo.extraRules = [
      {
        users = [ user ];
        runAs = "root";
        commands = [
          { command = "${rootRebuild}"; options = [ "NOPASSWD" ]; }
          # "" in sudoers: no arguments allowed.
          { command = ''/run/current-system/sw/bin/reboot ""''; options = [ "NOPASSWD" ]; }
        ];
      }
    ];

    systemd.services.nixplane-agent = {
      description = "nixplane agent";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # A switch run by the agent must not restart the agent in the middle
      # of reporting it: the agent sends the result first, notices a new
      # binary, and exits with 101 on its own (RestartForceExitStatus).
      restartIfChanged = false;
      # git for the clone, nix for the system check, ssh for SSH remotes.
      path = [ config.nix.package pkgs.git pkgs.openssh ];
      environment.HOME = stateDir;
      unitConfig.StartLimitIntervalSec = 0;
      serviceConfig = {
        ExecStart = lib.escapeShellArgs ([ "${cfg.package}/bin/nixplane-agent" ] ++ args);
        User = user;
        Group = user;
        StateDirectory = "nixplane-agent";
        StateDirectoryMode = "0700";
        LoadCredential = [ "token:${cfg.tokenFile}" ]
          ++ lib.optional (cfg.sshKeyFile != null) "ssh-key:${cfg.sshKeyFile}";
        Restart = "always";
        RestartSec = "5s";
        RestartForceExitStatus = "101";

        # Hardening. nixos-rebuild, started through sudo, inherits this
        # unit's sandbox, and activation must be able to do everything a
        # root activation does. Hence, deliberately NOT set:
        #  - NoNewPrivileges: sudo is setuid; it would refuse to run.
        #  - RestrictSUIDSGID: activation creates the setuid wrappers in
        #    /run/wrappers (security.wrappers).
        #  - ProtectSystem, ProtectHome, ReadOnlyPaths: activation writes
        #    /etc, /boot, /nix/var/nix/profiles and creates home directories.
        #  - ProtectKernelTunables/Modules, ProtectHostname, ProtectClock,
        #    PrivateDevices, DevicePolicy: activation sets the hostname and
        #    sysctls, loads modules and installs the boot loader on a disk.
        # What is set restricts nothing an activation needs:
        PrivateTmp = true;
        UMask = "0077";
        LockPersonality = true;
        RestrictRealtime = true;
        SystemCallArchitectures = "native";
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
      };
    };
  };
}
