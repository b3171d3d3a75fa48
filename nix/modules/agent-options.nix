# Options shared by the NixOS, nix-darwin and Home Manager agent modules.
# Takes lib and returns an attribute set of option declarations.
{ lib }:
let
  inherit (lib) mkOption types;
  nullStr = description: mkOption {
    type = types.nullOr types.str;
    default = null;
    inherit description;
  };
in
{
  enable = lib.mkEnableOption "the nixplane agent, which keeps this host connected to a nixplane control plane";

  serverUrl = mkOption {
    type = types.str;
    example = "https://fleet.example.org";
    description = "URL of the control plane: https://host:port, or http://host:port for plain HTTP/2 (h2c) on a trusted network.";
  };

  tokenFile = mkOption {
    type = types.str;
    example = "/run/secrets/nixplane-token";
    description = ''
      File holding this host's agent token (printed by `nixplane hosts add`).
      Give a path outside the Nix store (agenix, sops-nix or a file you
      placed); the file is read at service start and never copied to the store.
    '';
  };

  repoUrl = mkOption {
    type = types.str;
    example = "https://github.com/you/nixcfg";
    description = "Fleet repository the agent clones and builds from.";
  };

  branch = mkOption {
    type = types.str;
    default = "main";
    description = "Branch of the fleet repository to follow.";
  };

  interval = mkOption {
    type = types.str;
    default = "5s";
    example = "30s";
    description = "Heartbeat interval (a Go duration).";
  };

  location = nullStr "Where the host is, shown in the fleet view.";
  deviceType = nullStr "Kind of device, e.g. server, desktop, laptop.";
  themeColor = nullStr "Display colour in the fleet view, #rrggbb.";

  sshKeyFile = mkOption {
    type = types.nullOr types.str;
    default = null;
    description = "SSH private key for a repository reached over SSH. Like tokenFile, a path outside the Nix store.";
  };

  caFile = mkOption {
    type = types.nullOr types.str;
    default = null;
    example = "/etc/nixplane/ca.pem";
    description = "PEM CA bundle trusted, besides the system roots, for the server's certificate (for a server whose certificate comes from a private CA).";
  };

  tlsClientCert = mkOption {
    type = types.nullOr types.str;
    default = null;
    example = "/var/lib/nixplane-agent-tls/cert.pem";
    description = ''
      PEM client certificate for a server started with --agent-client-ca: issued
      by that CA, with this host's name (hostname) as a DNS name. Set together
      with tlsClientKey. The agent reads both files again at every reconnect, so
      renewing them in place needs no restart; they must be readable by the
      agent's user (nixplane-agent under the NixOS module).
    '';
  };

  tlsClientKey = mkOption {
    type = types.nullOr types.str;
    default = null;
    example = "/var/lib/nixplane-agent-tls/key.pem";
    description = "Private key of tlsClientCert. Like tokenFile, a path outside the Nix store.";
  };

  extraFlags = mkOption {
    type = types.listOf types.str;
    default = [ ];
    example = [ "--health-check-command" "curl -fsS http://127.0.0.1/health" "--log-level" "debug" ];
    description = "Further nixplane-agent command-line flags.";
  };
}
