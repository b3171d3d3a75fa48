package controlplane

import (
	"bytes"
	"io"
	"net"
	"testing"
	"testing/iotest"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
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

// writeConn is a net.Conn that records what is written to it.
type writeConn struct {
	net.Conn
	out bytes.Buffer
}

func (c *writeConn) Write(p []byte) (int, error) { return c.out.Write(p) }

// clientBytes is what an HTTP/2 client sends: the preface, its SETTINGS,
// optionally the acknowledgement of the server's SETTINGS, and optionally a
// request with the given headers.
func clientBytes(t *testing.T, ack bool, headers ...[2]string) []byte {
	t.Helper()
	var b bytes.Buffer
	b.WriteString(http2.ClientPreface)
	fr := http2.NewFramer(&b, nil)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	if ack {
		if err := fr.WriteSettingsAck(); err != nil {
			t.Fatal(err)
		}
	}
	if len(headers) > 0 {
		var hb bytes.Buffer
		enc := hpack.NewEncoder(&hb)
		for _, h := range headers {
			if err := enc.WriteField(hpack.HeaderField{Name: h[0], Value: h[1]}); err != nil {
				t.Fatal(err)
			}
		}
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
	}
	return b.Bytes()
}

// TestMatchNativeGRPC: only a direct gRPC request goes to grpc-go; a
// connection that goes to net/http after the matcher's SETTINGS is handed
// over with the acknowledgement located, or closed when it never came.
func TestMatchNativeGRPC(t *testing.T) {
	req := func(ct string, extra ...[2]string) [][2]string {
		return append([][2]string{{":method", "POST"}, {":scheme", "http"}, {":authority", "fleet"}, {":path", "/x/Y"}, {"content-type", ct}}, extra...)
	}
	for _, tc := range []struct {
		name     string
		in       []byte
		grpc     bool
		ackKnown bool
		unusable bool
	}{
		{"agent", clientBytes(t, true, req("application/grpc")...), true, false, false},
		{"agent before its ack", clientBytes(t, false, req("application/grpc+proto")...), true, false, false},
		{"grpc-web", clientBytes(t, true, req("application/grpc-web+proto")...), false, true, false},
		{"through a proxy", clientBytes(t, true, req("application/grpc", [2]string{"x-forwarded-for", "10.0.0.1"})...), false, true, false},
		{"through a proxy, via", clientBytes(t, true, req("application/grpc", [2]string{"via", "2 envoy"})...), false, true, false},
		{"idle after its ack", clientBytes(t, true), false, true, false},
		{"idle without an ack", clientBytes(t, false), false, false, true},
	} {
		pc := &portConn{Conn: &writeConn{}}
		got := matchNativeGRPC(pc, bytes.NewReader(tc.in))
		if got != tc.grpc || (pc.settingsAckEnd > 0) != tc.ackKnown || pc.unusable != tc.unusable {
			t.Errorf("%s: grpc=%v ackEnd=%d unusable=%v; want grpc=%v ack known=%v unusable=%v",
				tc.name, got, pc.settingsAckEnd, pc.unusable, tc.grpc, tc.ackKnown, tc.unusable)
		}
		if tc.ackKnown {
			// The recorded offset is just past the acknowledgement frame.
			pre := len(http2.ClientPreface) + frameHeaderLen // preface, empty SETTINGS
			if want := int64(pre + frameHeaderLen); pc.settingsAckEnd != want {
				t.Errorf("%s: ack ends at %d, want %d", tc.name, pc.settingsAckEnd, want)
			}
		}
	}
}
