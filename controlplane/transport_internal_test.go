package controlplane

import (
	"bytes"
	"io"
	"net"
	"testing"
	"testing/iotest"
)

func TestIsNativeGRPC(t *testing.T) {
	for ct, want := range map[string]bool{
		"application/grpc":               true,
		"application/grpc+proto":         true,
		"application/grpc+json":          true,
		"application/grpc;charset=utf-8": true,
		"application/grpc-web":           false,
		"application/grpc-web+proto":     false,
		"application/grpc-web-text":      false,
		"application/grpcx":              false,
		"application/json":               false,
		"":                               false,
	} {
		if got := isNativeGRPC(ct); got != want {
			t.Errorf("isNativeGRPC(%q) = %v, want %v", ct, got, want)
		}
	}
}

// readerConn is a net.Conn that reads from r.
type readerConn struct {
	net.Conn
	r io.Reader
}

func (c readerConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// TestAckStripConn: the removed range disappears however the reads are cut,
// and nothing else changes.
func TestAckStripConn(t *testing.T) {
	stream := []byte("0123456789abcdefghijklmnopqrstuvwxyz")
	for _, tc := range []struct {
		name     string
		from, to int64
		want     string
	}{
		{"middle", 10, 19, "0123456789jklmnopqrstuvwxyz"},
		{"start", 0, 9, "9abcdefghijklmnopqrstuvwxyz"},
		{"end", 27, 36, "0123456789abcdefghijklmnopq"},
	} {
		for name, wrap := range map[string]func(io.Reader) io.Reader{
			"whole":    func(r io.Reader) io.Reader { return r },
			"one byte": iotest.OneByteReader,
			"halves":   iotest.HalfReader,
		} {
			c := &ackStripConn{Conn: readerConn{r: wrap(bytes.NewReader(stream))}, from: tc.from, to: tc.to}
			got, err := io.ReadAll(c)
			if err != nil || string(got) != tc.want {
				t.Errorf("%s, %s reads: %q, %v; want %q", tc.name, name, got, err, tc.want)
			}
		}
	}
}
