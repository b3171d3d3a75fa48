package nix

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestAgentTLSOptions: caFile, tlsClientCert and tlsClientKey become the
// agent's --ca-file, --tls-client-cert and --tls-client-key in all three
// modules, as plain paths (the agent re-reads them at every reconnect);
// a key in the Nix store or a certificate without its key fail assertions.
func TestAgentTLSOptions(t *testing.T) {
	var got struct {
		NixOS      string          `json:"nixos"`
		Darwin     []string        `json:"darwin"`
		HM         string          `json:"hm"`
		Good       []bool          `json:"good"`
		StoreKey   []bool          `json:"storeKey"`
		CertOnly   []bool          `json:"certOnly"`
		Messages   []string        `json:"messages"`
		Creds      json.RawMessage `json:"creds"`
		DefaultOut string          `json:"defaultOut"`
	}
	eval(t, `let `+fakeEnv+`
	  tls = agentCfg // { caFile = "/etc/nixplane/ca.pem"; tlsClientCert = "/var/lib/tls/cert.pem"; tlsClientKey = "/var/lib/tls/key.pem"; };
	  nixos = c: import ./modules/agent.nix {
	    inherit lib pkgs;
	    config = { networking.hostName = "web-1"; nix.package = "/nix/store/nix"; services.nixplane-agent = c; };
	  };
	  darwin = c: import ./modules/darwin.nix { inherit lib pkgs; config.services.nixplane-agent = c; };
	  hm = c: import ./modules/home-manager.nix {
	    inherit lib pkgs;
	    config = { services.nixplane-agent = c; home.homeDirectory = "/home/alice"; home.profileDirectory = "/home/alice/.nix-profile"; };
	  };
	  tlsAssertions = c: import ./modules/agent-assertions.nix { inherit lib; cfg = c; };
	  oks = c: map (a: a.assertion) (tlsAssertions c);
	  hmMain = builtins.elemAt (hm tls).config.content.contents 0;
	  hmLinux = builtins.elemAt (hm tls).config.content.contents 1;
	in {
	  nixos = (nixos tls).config.content.systemd.services.nixplane-agent.serviceConfig.ExecStart;
	  creds = (nixos tls).config.content.systemd.services.nixplane-agent.serviceConfig.LoadCredential;
	  darwin = (darwin tls).config.content.launchd.daemons.nixplane-agent.serviceConfig.ProgramArguments;
	  hm = hmLinux.content.systemd.user.services.nixplane-agent.Service.ExecStart;
	  good = map (a: a.assertion) ((nixos tls).config.content.assertions ++ (darwin tls).config.content.assertions ++ hmMain.assertions);
	  storeKey = oks (tls // { tlsClientKey = "${builtins.storeDir}/abc-key.pem"; });
	  certOnly = oks (tls // { tlsClientKey = null; });
	  messages = map (a: a.message) (tlsAssertions tls);
	  defaultOut = (nixos agentCfg).config.content.systemd.services.nixplane-agent.serviceConfig.ExecStart;
	}`, &got)

	for _, want := range []string{"'--ca-file' '/etc/nixplane/ca.pem'", "'--tls-client-cert' '/var/lib/tls/cert.pem'", "'--tls-client-key' '/var/lib/tls/key.pem'"} {
		if !strings.Contains(got.NixOS, want) {
			t.Errorf("NixOS ExecStart lacks %s:\n%s", want, got.NixOS)
		}
		if !strings.Contains(got.HM, want) {
			t.Errorf("Home Manager ExecStart lacks %s:\n%s", want, got.HM)
		}
	}
	if d := strings.Join(got.Darwin, " "); !strings.Contains(d, "--tls-client-cert /var/lib/tls/cert.pem --tls-client-key /var/lib/tls/key.pem") ||
		!strings.Contains(d, "--ca-file /etc/nixplane/ca.pem") {
		t.Errorf("darwin ProgramArguments = %q", got.Darwin)
	}
	// Not systemd credentials: those are copied once at start, and a
	// renewed certificate would not be seen until a restart.
	if strings.Contains(string(got.Creds), "tls") {
		t.Errorf("LoadCredential = %s; the certificate and key must stay plain paths", got.Creds)
	}
	for i, ok := range got.Good {
		if !ok {
			t.Errorf("assertion %d fails for a good TLS setup", i)
		}
	}
	if len(got.StoreKey) != 2 || !got.StoreKey[0] || got.StoreKey[1] {
		t.Errorf("key in the Nix store: assertions %v, want [true false]", got.StoreKey)
	}
	if len(got.CertOnly) != 2 || got.CertOnly[0] {
		t.Errorf("certificate without key: assertions %v, want the first to fail", got.CertOnly)
	}
	if len(got.Messages) != 2 || !strings.Contains(got.Messages[1], "must not be in the Nix store") {
		t.Errorf("assertion messages = %q", got.Messages)
	}
	if strings.Contains(got.DefaultOut, "--tls-client") || strings.Contains(got.DefaultOut, "--ca-file") {
		t.Errorf("unset TLS options reach the command line:\n%s", got.DefaultOut)
	}
}
