package auth

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	"github.com/nixplane/nixplane/tests/testpki"
)

// withPeer is ctx as a gRPC handler sees a TLS peer that presented certs
// (nil: a plaintext peer).
func withPeer(ctx context.Context, certs ...*x509.Certificate) context.Context {
	p := &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 4242}}
	if certs != nil {
		p.AuthInfo = credentials.TLSInfo{State: tls.ConnectionState{PeerCertificates: certs}}
	}
	return peer.NewContext(ctx, p)
}

func TestCertificateHostNames(t *testing.T) {
	u, _ := url.Parse("spiffe://fleet/web-1")
	for _, tc := range []struct {
		name string
		cert *x509.Certificate
		want []string
	}{
		{"DNS SANs win over the CN", &x509.Certificate{Subject: pkix.Name{CommonName: "web-9"}, DNSNames: []string{"web-1", "web-1.example.org"}}, []string{"web-1", "web-1.example.org"}},
		{"CN without any SAN", &x509.Certificate{Subject: pkix.Name{CommonName: "web-1"}}, []string{"web-1"}},
		{"CN ignored beside an IP SAN", &x509.Certificate{Subject: pkix.Name{CommonName: "web-1"}, IPAddresses: []net.IP{net.IPv4(10, 0, 0, 1)}}, nil},
		{"CN ignored beside a URI SAN", &x509.Certificate{Subject: pkix.Name{CommonName: "web-1"}, URIs: []*url.URL{u}}, nil},
		{"nothing", &x509.Certificate{}, nil},
	} {
		if got := CertificateHostNames(tc.cert); !slices.Equal(got, tc.want) {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

// TestAgentClientCertificate: with AgentClientCAs set, the agent stream
// needs the token and a certificate naming the token's host; other methods
// do not look at certificates.
func TestAgentClientCertificate(t *testing.T) {
	f := newFixture(t)
	ca := testpki.NewCA(t, "agents")
	f.authn.AgentClientCAs = ca.Pool()
	other := testpki.NewCA(t, "other")
	now := f.clock.Now()
	web1 := ca.Client("web-1", testpki.DNS("web-1")).Cert
	web1CN := ca.Client("web-1").Cert
	web1FQDN := ca.Client("", testpki.DNS("web-1.example.org")).Cert
	web1Wild := ca.Client("", testpki.DNS("*")).Cert
	web2 := ca.Client("", testpki.DNS("web-2")).Cert
	web1Server := ca.Client("", testpki.DNS("web-1"), testpki.ExtKeyUsage(x509.ExtKeyUsageServerAuth)).Cert
	web1Expired := ca.Client("", testpki.DNS("web-1"), testpki.Validity(now.Add(-48*time.Hour), now.Add(-24*time.Hour))).Cert
	web1Foreign := other.Client("", testpki.DNS("web-1")).Cert
	// An intermediate CA under the agents' CA, sent along by the agent.
	inter := ca.Intermediate("agents intermediate")
	viaInter := inter.Client("", testpki.DNS("web-1"))

	connect := agentv1.AgentService_Connect_FullMethodName
	for _, tc := range []struct {
		name   string
		method string
		token  string
		certs  []*x509.Certificate
		want   codes.Code
		msg    string
	}{
		{"token and certificate", connect, "agent:web-1", []*x509.Certificate{web1}, codes.OK, ""},
		{"CN-only certificate", connect, "agent:web-1", []*x509.Certificate{web1CN}, codes.OK, ""},
		{"chain through an intermediate", connect, "agent:web-1", viaInter.Certs(), codes.OK, ""},
		{"plaintext connection", connect, "agent:web-1", nil, codes.Unauthenticated, "requires an agent client certificate"},
		{"TLS without a certificate", connect, "agent:web-1", []*x509.Certificate{}, codes.Unauthenticated, "requires an agent client certificate"},
		{"another host's certificate", connect, "agent:web-1", []*x509.Certificate{web2}, codes.PermissionDenied, `names "web-2", not host "web-1"`},
		{"FQDN is not the host name", connect, "agent:web-1", []*x509.Certificate{web1FQDN}, codes.PermissionDenied, "not host"},
		{"wildcard is no host name", connect, "agent:web-1", []*x509.Certificate{web1Wild}, codes.PermissionDenied, "not host"},
		{"server-only certificate", connect, "agent:web-1", []*x509.Certificate{web1Server}, codes.Unauthenticated, "not valid for client authentication"},
		{"expired certificate", connect, "agent:web-1", []*x509.Certificate{web1Expired}, codes.Unauthenticated, "not valid"},
		{"foreign CA", connect, "agent:web-1", []*x509.Certificate{web1Foreign}, codes.Unauthenticated, "not issued by this server's agent client CA"},
		{"intermediate not sent", connect, "agent:web-1", []*x509.Certificate{viaInter.Cert}, codes.Unauthenticated, "not issued"},
		{"bad token beats a good certificate", connect, "read", []*x509.Certificate{web1}, codes.PermissionDenied, "only agents"},
		{"other methods ignore certificates", fleetv1.FleetService_ListHosts_FullMethodName, "read", nil, codes.OK, ""},
		{"an agent certificate grants nothing else", fleetv1.FleetService_ListHosts_FullMethodName, "agent:web-1", []*x509.Certificate{web1}, codes.PermissionDenied, "agent tokens may only"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			if tc.certs != nil {
				ctx = withPeer(ctx, tc.certs...)
			} else {
				ctx = withPeer(ctx)
			}
			id, err := f.authn.Authenticate(ctx, tc.method, bearer(f.tok[tc.token]))
			if status.Code(err) != tc.want || !strings.Contains(status.Convert(err).Message(), tc.msg) {
				t.Fatalf("Authenticate = %v, %v; want %s containing %q", id, err, tc.want, tc.msg)
			}
		})
	}

	// Without AgentClientCAs the token alone is enough, as before.
	f.authn.AgentClientCAs = nil
	if _, err := f.authn.Authenticate(withPeer(context.Background()), connect, bearer(f.tok["agent:web-1"])); err != nil {
		t.Errorf("token alone without AgentClientCAs: %v", err)
	}
}

func TestLoadCertPool(t *testing.T) {
	dir := t.TempDir()
	good := testpki.NewCA(t, "agents").WriteCert(dir, "ca")
	if pool, err := LoadCertPool(good); err != nil || pool == nil {
		t.Fatalf("LoadCertPool: %v", err)
	}
	bad := filepath.Join(dir, "key.pem")
	if err := os.WriteFile(bad, []byte("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadCertPool(bad); err == nil || !strings.Contains(err.Error(), "holds no PEM certificates") {
		t.Errorf("LoadCertPool(key file) = %v", err)
	}
	if _, err := LoadCertPool(filepath.Join(dir, "missing.pem")); err == nil {
		t.Error("LoadCertPool(missing file) succeeded")
	}
}
