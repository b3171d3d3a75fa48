package controlplane

import (
	"strings"
	"testing"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// TestAuditFields: the audit record names the host and what was asked,
// including the PR of a merge-and-deploy, bounded and printable.
func TestAuditFields(t *testing.T) {
	for _, tc := range []struct {
		req        proto.Message
		host, want string
	}{
		{&fleetv1.RunCommandRequest{HostId: "web-1", Command: "switch"}, "web-1", "switch"},
		{&fleetv1.MergeAndDeployRequest{PrNumber: 42, HostIds: []string{"web-1"}}, "", "PR #42"},
		{&fleetv1.MergeAndDeployRequest{}, "", ""},
		{&fleetv1.GetBulkCommandRequest{BulkId: "bulk-1"}, "", "bulk-1"},
	} {
		host, detail := auditFields(tc.req)
		if host != tc.host || detail != tc.want {
			t.Errorf("%v: host %q detail %q, want %q %q", tc.req, host, detail, tc.host, tc.want)
		}
	}
	// Hostile input is bounded, printable and valid UTF-8.
	host, detail := auditFields(&fleetv1.RunCommandRequest{HostId: "web-1\x00\n", Command: strings.Repeat("é", 300)})
	if strings.ContainsAny(host+detail, "\x00\n") || len(detail) > 210 || !utf8.ValidString(detail) {
		t.Errorf("hostile input kept as %q %q", host, detail)
	}
}
