# NixOS module: services.nixplane (the control plane server).
#
# Runs under a dynamic user with its database in /var/lib/<stateDirectory>;
# secrets (admin password, TLS key) arrive through systemd credentials, so
# the service never needs read access to their original locations.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.nixplane;
  inherit (lib) mkIf mkOption mkEnableOption types optional optionals;

  dataDir = "/var/lib/${cfg.stateDirectory}";
  port = lib.toInt (lib.last (lib.splitString ":" cfg.listen));
  tls = cfg.tlsCert != null;

  flags = [
    "serve"
    "--listen" cfg.listen
    "--data-dir" dataDir
    "--branch" cfg.branch
  ]
  ++ optionals (cfg.fleetRepo != null) [ "--fleet-repo" cfg.fleetRepo ]
  ++ optionals (cfg.versionUrl != null) [ "--version-url" cfg.versionUrl ]
  ++ optionals tls [ "--tls-cert" "%d/tls-cert" "--tls-key" "%d/tls-key" ]
  ++ optional cfg.trustProxyHeaders "--trust-proxy-headers"
  ++ cfg.extraFlags;

  # Reads the admin password from the credential into the environment, the
  # one place nixplane takes it from without exposing it in the process list.
  start = pkgs.writeShellScript "nixplane-start" ''
    set -eu
    if [ -n "''${CREDENTIALS_DIRECTORY:-}" ] && [ -r "$CREDENTIALS_DIRECTORY/admin-password" ]; then
      NIXPLANE_ADMIN_PASSWORD=$(cat "$CREDENTIALS_DIRECTORY/admin-password")
      export NIXPLANE_ADMIN_PASSWORD
    fi
    exec ${cfg.package}/bin/nixplane "$@"
  '';
in
{
  options.services.nixplane = {
    enable = mkEnableOption "the nixplane control plane server";

    package = mkOption {
      type = types.package;
      description = "The nixplane package (the flake's nixosModules.server sets it).";
    };

    listen = mkOption {
      type = types.str;
      default = "127.0.0.1:8080";
      example = "0.0.0.0:8443";
      description = "Address of the one port serving gRPC, grpc-web, REST and the web UI.";
    };

    stateDirectory = mkOption {
      type = types.str;
      default = "nixplane";
      description = "Name of the systemd StateDirectory; the database is /var/lib/<name>/nixplane.db.";
    };

    fleetRepo = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "https://github.com/you/nixcfg";
      description = "Fleet git repository; the target commit and flake.lock come from its branch.";
    };

    branch = mkOption {
      type = types.str;
      default = "main";
      description = "Branch of the fleet repository that hosts deploy.";
    };

    versionUrl = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "URL of a version.json giving the target, instead of fleetRepo.";
    };

    tlsCert = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/var/lib/acme/fleet.example.org/fullchain.pem";
      description = "TLS certificate (PEM). With tlsKey, nixplane serves TLS itself and browsers get HTTP/2.";
    };

    tlsKey = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/var/lib/acme/fleet.example.org/key.pem";
      description = "TLS private key (PEM), passed as a systemd credential.";
    };

    trustProxyHeaders = mkOption {
      type = types.bool;
      default = false;
      description = "Honour X-Forwarded-Proto from a TLS-terminating reverse proxy on the same machine.";
    };

    adminPasswordFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/nixplane-admin";
      description = ''
        File holding the password of the `admin` user created on first start.
        Without it the password is generated and printed once to the journal.
        Only used when the database is created.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the listen port in the firewall.";
    };

    extraFlags = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--log-retention" "720h" "--allowed-origins" "https://fleet.example.org" ];
      description = "Further `nixplane serve` flags.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = (cfg.tlsCert == null) == (cfg.tlsKey == null);
        message = "services.nixplane: set both tlsCert and tlsKey, or neither.";
      }
      {
        assertion = cfg.fleetRepo == null || cfg.versionUrl == null;
        message = "services.nixplane: set fleetRepo or versionUrl, not both.";
      }
    ];

    # The CLI, for `nixplane hosts`, `nixplane run` … against the API.
    environment.systemPackages = [ cfg.package ];

    networking.firewall.allowedTCPPorts = optional cfg.openFirewall port;

    systemd.services.nixplane = {
      description = "nixplane control plane";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # git mirrors the fleet repository.
      path = [ pkgs.git pkgs.openssh ];
      environment.HOME = dataDir;
      serviceConfig = {
        ExecStart = "${start} ${lib.escapeShellArgs flags}";
        DynamicUser = true;
        StateDirectory = cfg.stateDirectory;
        StateDirectoryMode = "0700";
        LoadCredential =
          optional (cfg.adminPasswordFile != null) "admin-password:${cfg.adminPasswordFile}"
          ++ optionals tls [ "tls-cert:${cfg.tlsCert}" "tls-key:${cfg.tlsKey}" ];
        Restart = "on-failure";
        RestartSec = "2s";
        # Let in-flight streams end (grpc Stop) and the store close.
        TimeoutStopSec = "30s";

        AmbientCapabilities = optional (port < 1024) "CAP_NET_BIND_SERVICE";
        CapabilityBoundingSet = optional (port < 1024) "CAP_NET_BIND_SERVICE";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged" ];
        UMask = "0077";
      };
    };
  };
}
