# Assertions on the TLS settings, shared by the NixOS, nix-darwin and Home
# Manager agent modules: { lib, cfg } to a list of { assertion, message }.
{ lib, cfg }:
[
  {
    assertion = (cfg.tlsClientCert == null) == (cfg.tlsClientKey == null);
    message = "services.nixplane-agent.tlsClientCert and tlsClientKey must be set together.";
  }
  {
    assertion = cfg.tlsClientKey == null || !(lib.hasPrefix builtins.storeDir cfg.tlsClientKey);
    message = "services.nixplane-agent.tlsClientKey must not be in the Nix store (it is world-readable there).";
  }
]
