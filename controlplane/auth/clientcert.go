package auth

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/nixplane/nixplane/controlplane/validate"
)

// errNoClientCert is the answer to an agent that presented its token but no
// client certificate to a server that requires one.
var errNoClientCert = status.Error(codes.Unauthenticated,
	"this server requires an agent client certificate: start the agent with --tls-client-cert and --tls-client-key")

// LoadCertPool reads a PEM bundle of CA certificates. A file without a
// single certificate is an error, so a mistyped path to a key or an empty
// file is not taken for "trust nothing".
func LoadCertPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read CA bundle: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("CA bundle %s holds no PEM certificates", path)
	}
	return pool, nil
}

// CertificateHostNames are the host names a client certificate speaks for:
// its DNS subject alternative names, or, for a certificate without any
// subject alternative name, its subject common name. This is the rule TLS
// clients apply to server certificates, turned around.
func CertificateHostNames(cert *x509.Certificate) []string {
	if len(cert.DNSNames) > 0 {
		return cert.DNSNames
	}
	if len(cert.IPAddresses) > 0 || len(cert.EmailAddresses) > 0 || len(cert.URIs) > 0 || cert.Subject.CommonName == "" {
		return nil
	}
	return []string{cert.Subject.CommonName}
}

// certNamesHost reports whether cert speaks for host (names compared
// without regard to case, as DNS does; no wildcards).
func certNamesHost(cert *x509.Certificate, host string) bool {
	for _, n := range CertificateHostNames(cert) {
		if strings.EqualFold(n, host) {
			return true
		}
	}
	return false
}

// checkAgentCert is the second factor of an agent connection when
// AgentClientCAs is set: the TLS peer must have presented a client
// certificate that chains to AgentClientCAs, is valid for client
// authentication, and names host. The TLS handshake has already checked the
// chain (the server asks with VerifyClientCertIfGiven); it is checked again
// here so that this rule does not depend on how the listener is set up.
func (a *Authenticator) checkAgentCert(ctx context.Context, host string) error {
	var state *credentials.TLSInfo
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			state = &ti
		}
	}
	if state == nil || len(state.State.PeerCertificates) == 0 {
		a.logger().Warn("agent refused: no client certificate", "host", host)
		return errNoClientCert
	}
	certs := state.State.PeerCertificates
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: a.AgentClientCAs, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, CurrentTime: a.now()}); err != nil {
		a.logger().Warn("agent refused: client certificate not valid", "host", host, "err", err)
		var unknown x509.UnknownAuthorityError
		if errors.As(err, &unknown) {
			return status.Error(codes.Unauthenticated, "the agent client certificate is not issued by this server's agent client CA")
		}
		return status.Error(codes.Unauthenticated, "the agent client certificate is not valid for client authentication")
	}
	if !certNamesHost(certs[0], host) {
		names := validate.Printable(strings.Join(CertificateHostNames(certs[0]), ", "), 200)
		a.logger().Warn("agent refused: client certificate is for another host", "host", host, "cert_names", names)
		return status.Errorf(codes.PermissionDenied, "the agent client certificate names %q, not host %q", names, host)
	}
	return nil
}
