package nix

import (
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// nixInstantiate returns the nix-instantiate binary and an environment that
// keeps Nix away from the user's store, cache and configuration. Without
// nix-instantiate the tests are skipped, except in CI (CI=true) where that
// is a failure.
func nixInstantiate(t *testing.T) (string, []string) {
	t.Helper()
	bin, err := exec.LookPath("nix-instantiate")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("nix-instantiate not found (install Debian's nix-bin): %v", err)
		}
		t.Skip("nix-instantiate not found; install nix-bin to check the Nix files")
	}
	tmp := t.TempDir()
	env := append(os.Environ(),
		"HOME="+tmp,
		"XDG_CACHE_HOME="+filepath.Join(tmp, "cache"),
		"XDG_CONFIG_HOME="+filepath.Join(tmp, "config"),
		"XDG_DATA_HOME="+filepath.Join(tmp, "data"),
		"NIX_STATE_DIR="+filepath.Join(tmp, "state"),
		"NIX_LOG_DIR="+filepath.Join(tmp, "log"),
		"NIX_PATH=",
		"NIX_CONFIG=experimental-features = nix-command flakes\nbuild-users-group =\nsandbox = false\nsubstituters =",
	)
	return bin, env
}

// nixFiles lists every .nix file of the repository.
func nixFiles(t *testing.T) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "node_modules") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(path, ".nix") {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

func TestParse(t *testing.T) {
	bin, env := nixInstantiate(t)
	files := nixFiles(t)
	for _, want := range []string{"../flake.nix", "../nix/modules/agent.nix", "../nix/modules/server.nix", "../nix/modules/darwin.nix", "../nix/modules/home-manager.nix", "../nix/package.nix"} {
		if !slices.Contains(files, filepath.Clean(want)) {
			t.Errorf("%s missing from %v", want, files)
		}
	}
	for _, f := range files {
		cmd := exec.Command(bin, "--parse", f)
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("nix-instantiate --parse %s: %v\n%s", f, err, out)
		}
	}
}

// eval evaluates expr (paths relative to nix/) strictly and decodes the
// JSON result into v.
func eval(t *testing.T, expr string, v any) {
	t.Helper()
	bin, env := nixInstantiate(t)
	cmd := exec.Command(bin, "--eval", "--strict", "--json", "-E", expr)
	cmd.Env = env
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("nix-instantiate --eval %s: %v\n%s", expr, err, stderr)
	}
	if err := json.Unmarshal(out, v); err != nil {
		t.Fatalf("decoding %s: %v", out, err)
	}
}

func TestModulesAreFunctions(t *testing.T) {
	for _, f := range []string{"modules/agent.nix", "modules/server.nix", "modules/darwin.nix", "modules/home-manager.nix", "modules/agent-options.nix", "package.nix"} {
		var isFn bool
		eval(t, "builtins.isFunction (import ./"+f+")", &isFn)
		if !isFn {
			t.Errorf("%s does not evaluate to a function", f)
		}
	}
	var outputs bool
	eval(t, "builtins.isFunction (import ../flake.nix).outputs", &outputs)
	if !outputs {
		t.Error("flake.nix outputs is not a function")
	}
}

func TestFlakeInputsAndVendorHash(t *testing.T) {
	var inputs []string
	eval(t, "builtins.attrNames (import ../flake.nix).inputs", &inputs)
	if !slices.Equal(inputs, []string{"nixpkgs"}) {
		t.Errorf("flake inputs = %v, want [nixpkgs]", inputs)
	}
	b, err := os.ReadFile("vendor-hash.txt")
	if err != nil {
		t.Fatal(err)
	}
	if h := strings.TrimSpace(string(b)); !strings.HasPrefix(h, "sha256-") || len(h) != len("sha256-")+44 {
		t.Errorf("vendor-hash.txt holds %q, want an SRI sha256 hash", h)
	}
}

func TestAgentArgs(t *testing.T) {
	var got []string
	eval(t, `(import ./modules/agent-args.nix).agentArgs {
		serverUrl = "https://fleet.example.org"; hostname = "web-1"; tokenFile = "/run/t";
		repoUrl = "https://example.org/fleet"; hostType = "nixos"; branch = "main";
		location = null; deviceType = ""; themeColor = "#336699"; extraFlags = [ "--log-level" "debug" ];
	}`, &got)
	want := []string{"--server", "https://fleet.example.org", "--hostname", "web-1", "--token-file", "/run/t",
		"--repo-url", "https://example.org/fleet", "--host-type", "nixos", "--branch", "main",
		"--theme-color", "#336699", "--log-level", "debug"}
	if !slices.Equal(got, want) {
		t.Errorf("agentArgs = %q\nwant        %q", got, want)
	}
}

// fakeEnv is the module arguments for evaluating a module against
// testdata/fakelib.nix instead of nixpkgs.
const fakeEnv = `
  lib = import ./testdata/fakelib.nix;
  pkgs = {
    writeShellScript = name: text: { outPath = "/nix/store/00000000000000000000000000000000-${name}"; inherit text; };
    git = "/nix/store/git"; openssh = "/nix/store/openssh";
    stdenv = { isLinux = true; isDarwin = false; };
  };
  agentCfg = {
    enable = true; package = "/nix/store/agent"; serverUrl = "https://fleet.example.org";
    hostname = "web-1"; tokenFile = "/run/secrets/token"; repoUrl = "https://example.org/fleet";
    branch = "main"; interval = "5s"; location = null; deviceType = "server"; themeColor = null;
    sshKeyFile = "/run/secrets/key"; caFile = null; tlsClientCert = null; tlsClientKey = null; extraFlags = [ ];
  };
`

type service struct {
	RestartIfChanged *bool          `json:"restartIfChanged"`
	ServiceConfig    map[string]any `json:"serviceConfig"`
}

func TestAgentModule(t *testing.T) {
	var got struct {
		Options    map[string]map[string]any `json:"options"`
		Enabled    bool                      `json:"enabled"`
		Service    service                   `json:"service"`
		Sudo       []map[string]any          `json:"sudo"`
		User       map[string]any            `json:"user"`
		SystemPkgs []string                  `json:"systemPkgs"`
	}
	eval(t, `let `+fakeEnv+`
	  m = import ./modules/agent.nix {
	    inherit lib pkgs;
	    config = { networking.hostName = "from-networking"; nix.package = "/nix/store/nix"; services.nixplane-agent = agentCfg; };
	  };
	  c = m.config.content;
	in {
	  options = m.options.services.nixplane-agent;
	  enabled = m.config.condition;
	  service = { inherit (c.systemd.services.nixplane-agent) restartIfChanged serviceConfig; };
	  sudo = c.security.sudo.extraRules;
	  user = c.users.users.nixplane-agent;
	  systemPkgs = c.environment.systemPackages;
	}`, &got)

	names := make([]string, 0, len(got.Options))
	for n := range got.Options {
		names = append(names, n)
	}
	slices.Sort(names)
	wantNames := []string{"branch", "caFile", "deviceType", "enable", "extraFlags", "hostname", "interval", "location", "package", "repoUrl", "serverUrl", "sshKeyFile", "themeColor", "tlsClientCert", "tlsClientKey", "tokenFile"}
	if !slices.Equal(names, wantNames) {
		t.Errorf("options = %v, want %v", names, wantNames)
	}
	if d := got.Options["hostname"]["default"]; d != "from-networking" {
		t.Errorf("hostname default = %v, want networking.hostName", d)
	}
	if !got.Enabled {
		t.Error("config is not conditional on enable")
	}
	if got.Service.RestartIfChanged == nil || *got.Service.RestartIfChanged {
		t.Error("restartIfChanged must be false: the agent restarts itself after reporting a switch")
	}
	sc := got.Service.ServiceConfig
	for k, want := range map[string]any{"Restart": "always", "RestartForceExitStatus": "101", "User": "nixplane-agent", "StateDirectory": "nixplane-agent"} {
		if sc[k] != want {
			t.Errorf("serviceConfig.%s = %v, want %v", k, sc[k], want)
		}
	}
	for _, k := range []string{"NoNewPrivileges", "RestrictSUIDSGID", "ProtectSystem"} {
		if _, ok := sc[k]; ok {
			t.Errorf("serviceConfig.%s is set; sudo and activation need it unset", k)
		}
	}
	creds, _ := json.Marshal(sc["LoadCredential"])
	if string(creds) != `["token:/run/secrets/token","ssh-key:/run/secrets/key"]` {
		t.Errorf("LoadCredential = %s", creds)
	}
	exe, _ := sc["ExecStart"].(string)
	for _, want := range []string{"'/nix/store/agent/bin/nixplane-agent'", "'--token-file' '%d/token'", "'--ssh-key-file' '%d/ssh-key'",
		"'--hostname' 'web-1'", "'--host-type' 'nixos'", "'--device-type' 'server'", "'--state-dir' '/var/lib/nixplane-agent'",
		"'--rebuild-command' '/nix/store/00000000000000000000000000000000-nixplane-rebuild'",
		"'--reboot-command' '/run/wrappers/bin/sudo -n /run/current-system/sw/bin/reboot'"} {
		if !strings.Contains(exe, want) {
			t.Errorf("ExecStart lacks %s:\n%s", want, exe)
		}
	}
	if strings.Contains(exe, "--location") {
		t.Errorf("ExecStart passes an unset location:\n%s", exe)
	}
	rules, _ := json.Marshal(got.Sudo)
	for _, want := range []string{`"users":["nixplane-agent"]`, `nixplane-rebuild-root"`, `/run/current-system/sw/bin/reboot \"\"`, `"NOPASSWD"`} {
		if !strings.Contains(string(rules), want) {
			t.Errorf("sudo rules lack %s: %s", want, rules)
		}
	}
	if strings.Contains(string(rules), "ALL") {
		t.Errorf("sudo rules are too broad: %s", rules)
	}
	if got.User["isSystemUser"] != true {
		t.Errorf("agent user = %v, want a system user", got.User)
	}
	if !slices.Contains(got.SystemPkgs, "/nix/store/agent") {
		t.Error("the agent package is not on the system path, so --self-path cannot see a new agent")
	}
}

func TestServerModule(t *testing.T) {
	var got struct {
		Ports   []int          `json:"ports"`
		Service map[string]any `json:"service"`
	}
	eval(t, `let `+fakeEnv+`
	  m = import ./modules/server.nix {
	    inherit lib pkgs;
	    config.services.nixplane = {
	      enable = true; package = "/nix/store/server"; listen = "0.0.0.0:443"; stateDirectory = "nixplane";
	      fleetRepo = "https://example.org/fleet"; branch = "main"; versionUrl = null;
	      tlsCert = "/var/lib/acme/c.pem"; tlsKey = "/var/lib/acme/k.pem"; trustProxyHeaders = false;
	      adminPasswordFile = "/run/secrets/admin"; openFirewall = true; extraFlags = [ ];
	    };
	  };
	  c = m.config.content;
	in { ports = c.networking.firewall.allowedTCPPorts; service = c.systemd.services.nixplane.serviceConfig; }`, &got)
	if !slices.Equal(got.Ports, []int{443}) {
		t.Errorf("firewall ports = %v, want [443]", got.Ports)
	}
	sc := got.Service
	for k, want := range map[string]any{"DynamicUser": true, "StateDirectory": "nixplane", "ProtectSystem": "strict", "NoNewPrivileges": true} {
		if sc[k] != want {
			t.Errorf("serviceConfig.%s = %v, want %v", k, sc[k], want)
		}
	}
	for k, want := range map[string]string{
		"LoadCredential":      `["admin-password:/run/secrets/admin","tls-cert:/var/lib/acme/c.pem","tls-key:/var/lib/acme/k.pem"]`,
		"AmbientCapabilities": `["CAP_NET_BIND_SERVICE"]`,
	} {
		if b, _ := json.Marshal(sc[k]); string(b) != want {
			t.Errorf("serviceConfig.%s = %s, want %s", k, b, want)
		}
	}
	exe, _ := sc["ExecStart"].(string)
	for _, want := range []string{"-nixplane-start 'serve'", "'--listen' '0.0.0.0:443'", "'--data-dir' '/var/lib/nixplane'",
		"'--fleet-repo' 'https://example.org/fleet'", "'--tls-cert' '%d/tls-cert'", "'--tls-key' '%d/tls-key'"} {
		if !strings.Contains(exe, want) {
			t.Errorf("ExecStart lacks %s:\n%s", want, exe)
		}
	}
	if strings.Contains(exe, "--version-url") || strings.Contains(exe, "admin") {
		t.Errorf("ExecStart passes an unset flag or the password:\n%s", exe)
	}
}

func TestDarwinAndHomeManagerModules(t *testing.T) {
	var got struct {
		Darwin map[string]any `json:"darwin"`
		HM     map[string]any `json:"hm"`
		HMCond bool           `json:"hmCond"`
	}
	eval(t, `let `+fakeEnv+`
	  d = import ./modules/darwin.nix { inherit lib pkgs; config.services.nixplane-agent = agentCfg; };
	  h = import ./modules/home-manager.nix {
	    inherit lib pkgs;
	    config = { services.nixplane-agent = agentCfg; home.homeDirectory = "/home/alice"; home.profileDirectory = "/home/alice/.nix-profile"; };
	  };
	  linux = builtins.elemAt h.config.content.contents 1;
	in {
	  darwin = d.config.content.launchd.daemons.nixplane-agent.serviceConfig;
	  hmCond = linux.condition;
	  hm = linux.content.systemd.user.services.nixplane-agent;
	}`, &got)
	args, _ := json.Marshal(got.Darwin["ProgramArguments"])
	for _, want := range []string{`"--host-type","darwin"`, `"--token-file","/run/secrets/token"`, `"--self-path","/run/current-system/sw/bin/nixplane-agent"`} {
		if !strings.Contains(string(args), want) {
			t.Errorf("darwin ProgramArguments lack %s: %s", want, args)
		}
	}
	if got.Darwin["KeepAlive"] != true || got.Darwin["RunAtLoad"] != true {
		t.Errorf("darwin daemon must be KeepAlive and RunAtLoad: %v", got.Darwin)
	}
	if !got.HMCond {
		t.Error("systemd user service not enabled on Linux")
	}
	svc, _ := got.HM["Service"].(map[string]any)
	unit, _ := got.HM["Unit"].(map[string]any)
	if svc["RestartForceExitStatus"] != "101" || svc["Restart"] != "always" || unit["X-SwitchMethod"] != "keep-old" {
		t.Errorf("home-manager service = %v", got.HM)
	}
	if exe, _ := svc["ExecStart"].(string); !strings.Contains(exe, "'--host-type' 'home-manager'") ||
		!strings.Contains(exe, "'--state-dir' '/home/alice/.local/state/nixplane-agent'") {
		t.Errorf("home-manager ExecStart = %s", exe)
	}
}

// TestVendorHashIsCurrent recomputes buildGoModule's vendorHash the way its
// fixed-output derivation does (`go mod vendor`, then the NAR hash of the
// directory) and fails when nix/vendor-hash.txt no longer matches go.mod and
// go.sum: run `make vendor-hash`.
func TestVendorHashIsCurrent(t *testing.T) {
	nixBin, err := exec.LookPath("nix")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("nix not found (install Debian's nix-bin): %v", err)
		}
		t.Skip("nix not found; install nix-bin to check the vendor hash")
	}
	dir := filepath.Join(t.TempDir(), "vendor")
	vendor := exec.Command("go", "mod", "vendor", "-o", dir)
	vendor.Dir = ".."
	if out, err := vendor.CombinedOutput(); err != nil {
		t.Fatalf("go mod vendor: %v\n%s", err, out)
	}
	home := t.TempDir()
	hash := exec.Command(nixBin, "--extra-experimental-features", "nix-command", "hash", "path", dir)
	hash.Env = append(os.Environ(), "HOME="+home, "XDG_CACHE_HOME="+filepath.Join(home, "cache"))
	out, err := hash.Output()
	if err != nil {
		t.Fatalf("nix hash path: %v", err)
	}
	b, err := os.ReadFile("vendor-hash.txt")
	if err != nil {
		t.Fatal(err)
	}
	if got, have := strings.TrimSpace(string(out)), strings.TrimSpace(string(b)); got != have {
		t.Errorf("nix/vendor-hash.txt = %s, but the Go dependencies hash to %s: run 'make vendor-hash'", have, got)
	}
}
