package testpki

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func verify(l *Leaf, roots *x509.CertPool, name string, usage x509.ExtKeyUsage) error {
	inter := x509.NewCertPool()
	for _, c := range l.Chain {
		inter.AddCert(c)
	}
	_, err := l.Cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, DNSName: name, KeyUsages: []x509.ExtKeyUsage{usage}})
	return err
}

func TestServerAndClientVerify(t *testing.T) {
	ca := NewCA(t, "root")
	srv := ca.Server()
	for _, name := range []string{"127.0.0.1", "::1", "localhost"} {
		if err := verify(srv, ca.Pool(), name, x509.ExtKeyUsageServerAuth); err != nil {
			t.Errorf("server certificate for %s: %v", name, err)
		}
	}
	if err := verify(srv, ca.Pool(), "", x509.ExtKeyUsageClientAuth); err == nil {
		t.Error("the server certificate verifies for client authentication")
	}
	cl := ca.Client("web-1", DNS("web-1", "web-1.example.org"))
	if cl.Cert.Subject.CommonName != "web-1" || strings.Join(cl.Cert.DNSNames, ",") != "web-1,web-1.example.org" {
		t.Errorf("client certificate names: CN %q, DNS %q", cl.Cert.Subject.CommonName, cl.Cert.DNSNames)
	}
	if err := verify(cl, ca.Pool(), "", x509.ExtKeyUsageClientAuth); err != nil {
		t.Errorf("client certificate: %v", err)
	}
	if err := verify(cl, NewCA(t, "other").Pool(), "", x509.ExtKeyUsageClientAuth); err == nil {
		t.Error("a certificate verifies against a foreign CA")
	}
	if c := ca.Client(""); c.Cert.Subject.CommonName != "" {
		t.Errorf("empty CN gave %q", c.Cert.Subject.CommonName)
	}
}

func TestOptions(t *testing.T) {
	ca := NewCA(t, "root")
	now := time.Now()
	expired := ca.Client("web-1", Validity(now.Add(-48*time.Hour), now.Add(-24*time.Hour)))
	if err := verify(expired, ca.Pool(), "", x509.ExtKeyUsageClientAuth); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("expired certificate: %v", err)
	}
	serverOnly := ca.Client("web-1", ExtKeyUsage(x509.ExtKeyUsageServerAuth))
	if err := verify(serverOnly, ca.Pool(), "", x509.ExtKeyUsageClientAuth); err == nil {
		t.Error("a server-only certificate verifies for client authentication")
	}
	ip := ca.Issue(IPs(net.IPv4(127, 0, 0, 9)), ExtKeyUsage(x509.ExtKeyUsageServerAuth))
	if err := verify(ip, ca.Pool(), "127.0.0.9", x509.ExtKeyUsageServerAuth); err != nil {
		t.Errorf("IP SAN: %v", err)
	}
	if a, b := ca.Client("x").Cert.SerialNumber, ca.Client("x").Cert.SerialNumber; a.Cmp(b) == 0 {
		t.Error("two certificates share a serial number")
	}
}

func TestIntermediateChain(t *testing.T) {
	root := NewCA(t, "root")
	inter := root.Intermediate("inter").Intermediate("inter 2")
	l := inter.Client("", DNS("web-1"))
	if len(l.Chain) != 2 || len(l.Certs()) != 3 || l.Certs()[1] != inter.Cert {
		t.Fatalf("chain of %d, certs %d", len(l.Chain), len(l.Certs()))
	}
	if err := verify(l, root.Pool(), "", x509.ExtKeyUsageClientAuth); err != nil {
		t.Errorf("through two intermediates: %v", err)
	}
	l.Chain = nil
	if err := verify(l, root.Pool(), "", x509.ExtKeyUsageClientAuth); err == nil {
		t.Error("verifies without its intermediates")
	}
}

func TestFilesAndPEM(t *testing.T) {
	ca := NewCA(t, "root")
	dir := t.TempDir()
	l := ca.Intermediate("inter").Server()
	certFile, keyFile := l.WriteFiles(dir, "server")
	if certFile != filepath.Join(dir, "server.pem") || keyFile != filepath.Join(dir, "server.key") {
		t.Errorf("files %s, %s", certFile, keyFile)
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if len(pair.Certificate) != 2 {
		t.Errorf("the certificate file holds %d certificates, want the leaf and its intermediate", len(pair.Certificate))
	}
	if got := l.TLS(); len(got.Certificate) != 2 {
		t.Errorf("TLS() holds %d certificates", len(got.Certificate))
	}
	if fi, err := os.Stat(keyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file: %v, %v", fi, err)
	}
	caFile := ca.WriteCert(dir, "ca")
	b, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) || !pool.Equal(ca.Pool()) {
		t.Error("the CA file does not hold the CA certificate")
	}
}
