package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestClientCertificateValidation: a client certificate needs its key and
// an https server, and both files must load when the agent starts.
func TestClientCertificateValidation(t *testing.T) {
	dir := t.TempDir()
	tok := filepath.Join(dir, "tok")
	junk := filepath.Join(dir, "junk.pem")
	for _, f := range []string{tok, junk} {
		if err := os.WriteFile(f, []byte("npa_x\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	base := Config{Hostname: "web-1", TokenFile: tok, RepoURL: "https://example.org/fleet", StateDir: dir}
	for _, tc := range []struct {
		name              string
		server, cert, key string
		want              string
	}{
		{"plain HTTP", "http://fleet.example:8080", junk, junk, "--tls-client-cert needs an https:// server"},
		{"no key", "https://fleet.example", junk, "", "needs both --tls-client-cert and --tls-client-key"},
		{"no certificate", "https://fleet.example", "", junk, "needs both"},
		{"not a key pair", "https://fleet.example", junk, junk, "load client certificate"},
	} {
		cfg := base
		cfg.Server, cfg.ClientCertFile, cfg.ClientKeyFile = tc.server, tc.cert, tc.key
		if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Validate = %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
	cfg := base
	cfg.Server = "https://fleet.example"
	if err := cfg.Validate(); err != nil {
		t.Errorf("without a client certificate: %v", err)
	}
}
