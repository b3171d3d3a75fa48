// Package testpki issues throwaway certificates for tests only: a
// self-signed ECDSA P-256 certificate authority, intermediate CAs under it,
// and server and client certificates, with PEM encoding, files written into
// a directory and a [x509.CertPool] that trusts the CA.
//
// Every key is made fresh in memory for one test and nothing checks that a
// certificate is sensible beyond what crypto/x509 refuses, so tests can
// issue the bad certificates (expired, wrong key usage, foreign CA) they
// need. None of it is fit for real use.
package testpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Validity of a certificate issued without the [Validity] option: valid
// from an hour ago (so small clock differences do not matter) for a day.
const (
	DefaultBackdate = time.Hour
	DefaultLifetime = 24 * time.Hour
)

// Option changes the template of a certificate before it is signed; it is
// applied after the defaults, so it can override any of them.
type Option func(*x509.Certificate)

// CN sets the subject's common name.
func CN(name string) Option { return func(c *x509.Certificate) { c.Subject.CommonName = name } }

// DNS adds DNS subject alternative names.
func DNS(names ...string) Option {
	return func(c *x509.Certificate) { c.DNSNames = append(c.DNSNames, names...) }
}

// IPs adds IP subject alternative names.
func IPs(ips ...net.IP) Option {
	return func(c *x509.Certificate) { c.IPAddresses = append(c.IPAddresses, ips...) }
}

// ExtKeyUsage replaces the extended key usages (for example a server-only
// certificate offered as a client certificate).
func ExtKeyUsage(u ...x509.ExtKeyUsage) Option {
	return func(c *x509.Certificate) { c.ExtKeyUsage = u }
}

// Validity sets the validity period (for example one wholly in the past:
// an expired certificate).
func Validity(notBefore, notAfter time.Time) Option {
	return func(c *x509.Certificate) { c.NotBefore, c.NotAfter = notBefore, notAfter }
}

// CA is a certificate authority for one test. Its methods fail the test on
// any error, so call sites stay one line.
type CA struct {
	// Cert and Key are the CA's certificate and private key.
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
	// chain is the CA's own certificate followed by its issuers up to, but
	// not including, the root: what a leaf sends along with itself.
	chain []*x509.Certificate
	t     testing.TB
}

// Leaf is an issued end-entity certificate and its key.
type Leaf struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
	// Chain holds the intermediate CAs between the leaf and the root, in
	// the order a TLS peer sends them (empty when the root signed it).
	Chain []*x509.Certificate
	t     testing.TB
}

// NewCA makes a self-signed root CA named name.
func NewCA(t testing.TB, name string) *CA {
	t.Helper()
	cert, key := sign(t, caTemplate(name), nil, nil)
	return &CA{Cert: cert, Key: key, t: t}
}

// Intermediate issues a CA named name under ca; certificates it issues
// carry the chain up to (not including) the root.
func (ca *CA) Intermediate(name string) *CA {
	ca.t.Helper()
	cert, key := sign(ca.t, caTemplate(name), ca.Cert, ca.Key)
	return &CA{Cert: cert, Key: key, chain: append([]*x509.Certificate{cert}, ca.chain...), t: ca.t}
}

// Issue signs a leaf certificate (key usage digital signature, no extended
// key usage, default validity) changed by opts.
func (ca *CA) Issue(opts ...Option) *Leaf {
	ca.t.Helper()
	tmpl := &x509.Certificate{KeyUsage: x509.KeyUsageDigitalSignature}
	setValidity(tmpl)
	for _, o := range opts {
		o(tmpl)
	}
	cert, key := sign(ca.t, tmpl, ca.Cert, ca.Key)
	return &Leaf{Cert: cert, Key: key, Chain: ca.chain, t: ca.t}
}

// Server issues a server certificate for the loopback names: CN and IP SAN
// 127.0.0.1, IP SAN ::1 and DNS SAN localhost; opts may add or change.
func (ca *CA) Server(opts ...Option) *Leaf {
	ca.t.Helper()
	base := []Option{CN("127.0.0.1"), IPs(net.IPv4(127, 0, 0, 1), net.IPv6loopback), DNS("localhost"),
		ExtKeyUsage(x509.ExtKeyUsageServerAuth)}
	return ca.Issue(append(base, opts...)...)
}

// Client issues a client-authentication certificate with common name cn
// (none when empty); opts add DNS SANs ([DNS]) or change the rest.
func (ca *CA) Client(cn string, opts ...Option) *Leaf {
	ca.t.Helper()
	base := []Option{ExtKeyUsage(x509.ExtKeyUsageClientAuth)}
	if cn != "" {
		base = append(base, CN(cn))
	}
	return ca.Issue(append(base, opts...)...)
}

// PEM is the CA certificate in PEM.
func (ca *CA) PEM() []byte { return CertPEM(ca.Cert) }

// Pool is a pool that trusts ca alone.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// WriteCert writes the CA certificate's PEM to dir/name.pem and returns
// the path.
func (ca *CA) WriteCert(dir, name string) string {
	ca.t.Helper()
	return writeFile(ca.t, filepath.Join(dir, name+".pem"), ca.PEM())
}

// CertPEM is the leaf certificate followed by its chain, in PEM.
func (l *Leaf) CertPEM() []byte {
	return CertPEM(append([]*x509.Certificate{l.Cert}, l.Chain...)...)
}

// KeyPEM is the private key as a PEM "EC PRIVATE KEY" block.
func (l *Leaf) KeyPEM() []byte {
	l.t.Helper()
	der, err := x509.MarshalECPrivateKey(l.Key)
	if err != nil {
		l.t.Fatalf("testpki: marshal key: %v", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
}

// TLS is the leaf as a [tls.Certificate] for a tls.Config, chain included.
func (l *Leaf) TLS() tls.Certificate {
	l.t.Helper()
	c, err := tls.X509KeyPair(l.CertPEM(), l.KeyPEM())
	if err != nil {
		l.t.Fatalf("testpki: key pair: %v", err)
	}
	return c
}

// Certs is the leaf followed by its chain, as a TLS peer presents them.
func (l *Leaf) Certs() []*x509.Certificate {
	return append([]*x509.Certificate{l.Cert}, l.Chain...)
}

// WriteFiles writes the certificate (with its chain) to dir/name.pem and
// the key to dir/name.key, both mode 0600, and returns the two paths.
func (l *Leaf) WriteFiles(dir, name string) (certFile, keyFile string) {
	l.t.Helper()
	return writeFile(l.t, filepath.Join(dir, name+".pem"), l.CertPEM()),
		writeFile(l.t, filepath.Join(dir, name+".key"), l.KeyPEM())
}

// CertPEM encodes certificates as consecutive PEM "CERTIFICATE" blocks.
func CertPEM(certs ...*x509.Certificate) []byte {
	var b []byte
	for _, c := range certs {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return b
}

func caTemplate(name string) *x509.Certificate {
	tmpl := &x509.Certificate{Subject: pkix.Name{CommonName: name}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	setValidity(tmpl)
	return tmpl
}

func setValidity(tmpl *x509.Certificate) {
	now := time.Now()
	tmpl.NotBefore, tmpl.NotAfter = now.Add(-DefaultBackdate), now.Add(DefaultLifetime)
}

// sign makes a key and a certificate for it from tmpl, signed by parent
// (nil: self-signed), with a random serial number.
func sign(t testing.TB, tmpl, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("testpki: generate key: %v", err)
	}
	if tmpl.SerialNumber, err = rand.Int(rand.Reader, big.NewInt(1<<62)); err != nil {
		t.Fatalf("testpki: serial number: %v", err)
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatalf("testpki: sign %q: %v", tmpl.Subject.CommonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("testpki: parse %q: %v", tmpl.Subject.CommonName, err)
	}
	return cert, key
}

func writeFile(t testing.TB, path string, b []byte) string {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatalf("testpki: %v", err)
	}
	return path
}
