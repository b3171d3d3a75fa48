package agent

import (
	"os"
	"path/filepath"
	"testing"
)

func TestPreviousHomeGeneration(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{"home-manager-3-link", "home-manager-7-link", "home-manager-9-link", "other-8-link"} {
		if err := os.Mkdir(filepath.Join(dir, n), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	profile := filepath.Join(dir, "home-manager")
	if err := os.Symlink("home-manager-9-link", profile); err != nil {
		t.Fatal(err)
	}
	got, err := previousHomeGeneration(profile)
	if err != nil || got != filepath.Join(dir, "home-manager-7-link") {
		t.Errorf("previousHomeGeneration = %q, %v", got, err)
	}
	if err := os.Remove(profile); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("home-manager-3-link", profile); err != nil {
		t.Fatal(err)
	}
	if _, err := previousHomeGeneration(profile); err == nil {
		t.Error("found a generation before the first one")
	}
}
