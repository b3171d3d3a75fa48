# Command line of nixplane-agent from a module's settings. Uses builtins only,
# so it evaluates without nixpkgs (the Go test in nix/ checks it that way).
#
# agentArgs { serverUrl, hostname, tokenFile, repoUrl, ... } returns the
# argument list; null or empty optional settings are left out, so the
# agent's own defaults apply.
let
  opt = flag: value:
    if value == null || value == "" then [ ] else [ "--${flag}" (toString value) ];
in
{
  agentArgs =
    { serverUrl
    , hostname
    , tokenFile
    , repoUrl
    , hostType
    , stateDir ? null
    , branch ? null
    , interval ? null
    , location ? null
    , deviceType ? null
    , themeColor ? null
    , sshKeyFile ? null
    , caFile ? null
    , tlsClientCert ? null
    , tlsClientKey ? null
    , rebuildCommand ? null
    , rebootCommand ? null
    , selfPath ? null
    , extraFlags ? [ ]
    }:
    builtins.concatLists [
      (opt "server" serverUrl)
      (opt "hostname" hostname)
      (opt "token-file" tokenFile)
      (opt "repo-url" repoUrl)
      (opt "host-type" hostType)
      (opt "state-dir" stateDir)
      (opt "branch" branch)
      (opt "interval" interval)
      (opt "location" location)
      (opt "device-type" deviceType)
      (opt "theme-color" themeColor)
      (opt "ssh-key-file" sshKeyFile)
      (opt "ca-file" caFile)
      (opt "tls-client-cert" tlsClientCert)
      (opt "tls-client-key" tlsClientKey)
      (opt "rebuild-command" rebuildCommand)
      (opt "reboot-command" rebootCommand)
      (opt "self-path" selfPath)
      extraFlags
    ];
}
