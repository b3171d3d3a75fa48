package tests

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// A minimal grpc-web client over HTTP/1.1, as a browser speaks it:
// POST /<service>/<method> with content-type application/grpc-web+proto,
// length-prefixed frames (1 flag byte, 4 bytes big-endian length), data
// frames (flag 0x00) then one trailer frame (flag 0x80) holding
// "grpc-status" and "grpc-message" as HTTP/1-style header lines. An error
// before any message may come "trailers-only", in the HTTP headers.

// webStream is one grpc-web response being read.
type webStream struct {
	resp *http.Response
	r    *bufio.Reader
	done bool
}

// GRPCWeb starts a grpc-web call of method (e.g.
// "/nixplane.fleet.v1.FleetService/RefreshHost") with token ("" for none).
// The caller reads the answer with Recv and must Close the stream.
func (s *Server) GRPCWeb(ctx context.Context, method, token string, req proto.Message) (*webStream, error) {
	b, err := proto.Marshal(req)
	if err != nil {
		return nil, err
	}
	frame := make([]byte, 5+len(b))
	binary.BigEndian.PutUint32(frame[1:5], uint32(len(b)))
	copy(frame[5:], b)
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, s.URL+method, bytes.NewReader(frame))
	if err != nil {
		return nil, err
	}
	hr.Header.Set("Content-Type", "application/grpc-web+proto")
	hr.Header.Set("Accept", "application/grpc-web+proto")
	hr.Header.Set("X-Grpc-Web", "1")
	if token != "" {
		hr.Header.Set("Authorization", "Bearer "+token)
	}
	// A transport of its own: HTTP/1.1 only, like a browser over plain http.
	resp, err := (&http.Client{Transport: s.webTr}).Do(hr)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		return nil, fmt.Errorf("grpc-web %s: HTTP %d (%s): %s", method, resp.StatusCode, resp.Proto, body)
	}
	if resp.ProtoMajor != 1 {
		resp.Body.Close()
		return nil, fmt.Errorf("grpc-web %s: answered over %s, want HTTP/1.1", method, resp.Proto)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/grpc-web") {
		resp.Body.Close()
		return nil, fmt.Errorf("grpc-web %s: content-type %q", method, ct)
	}
	return &webStream{resp: resp, r: bufio.NewReader(resp.Body)}, nil
}

// Recv reads the next message into m. At the end of the stream it returns
// io.EOF for status OK, else the status as a gRPC error.
func (w *webStream) Recv(m proto.Message) error {
	if w.done {
		return io.EOF
	}
	var hdr [5]byte
	if _, err := io.ReadFull(w.r, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			w.done = true
			// Trailers-only answer: the status is in the HTTP headers.
			if code := w.resp.Header.Get("Grpc-Status"); code != "" {
				return statusFrom(code, w.resp.Header.Get("Grpc-Message"))
			}
			return errors.New("grpc-web: body ended without a trailer frame")
		}
		return err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > 64<<20 {
		return fmt.Errorf("grpc-web: frame of %d bytes", n)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(w.r, payload); err != nil {
		return fmt.Errorf("grpc-web: short frame: %w", err)
	}
	if hdr[0]&0x80 != 0 {
		w.done = true
		tr := parseTrailer(payload)
		if tr["grpc-status"] == "" {
			return fmt.Errorf("grpc-web: trailer without grpc-status: %q", payload)
		}
		return statusFrom(tr["grpc-status"], tr["grpc-message"])
	}
	if hdr[0] != 0 {
		return fmt.Errorf("grpc-web: unexpected frame flag %#x", hdr[0])
	}
	return proto.Unmarshal(payload, m)
}

// Close ends the call.
func (w *webStream) Close() error { return w.resp.Body.Close() }

// parseTrailer reads "key: value\r\n" lines; keys are lower-cased.
func parseTrailer(b []byte) map[string]string {
	out := map[string]string{}
	for _, line := range strings.Split(string(b), "\r\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok {
			out[strings.ToLower(strings.TrimSpace(k))] = strings.TrimSpace(v)
		}
	}
	return out
}

// statusFrom turns grpc-status and grpc-message into nil-safe errors:
// io.EOF for OK, a status error otherwise.
func statusFrom(code, msg string) error {
	c, err := strconv.Atoi(code)
	if err != nil {
		return fmt.Errorf("grpc-web: bad grpc-status %q", code)
	}
	if c == 0 {
		return io.EOF
	}
	if m, err := url.PathUnescape(msg); err == nil {
		msg = m
	}
	return status.Error(codes.Code(c), msg)
}

// GRPCWebUnary makes a unary grpc-web call and decodes the answer into resp.
func (s *Server) GRPCWebUnary(ctx context.Context, method, token string, req, resp proto.Message) error {
	st, err := s.GRPCWeb(ctx, method, token, req)
	if err != nil {
		return err
	}
	defer st.Close()
	if err := st.Recv(resp); err != nil {
		if errors.Is(err, io.EOF) {
			return errors.New("grpc-web: OK without a message")
		}
		return err
	}
	if err := st.Recv(resp.ProtoReflect().New().Interface()); !errors.Is(err, io.EOF) {
		return fmt.Errorf("grpc-web: after the answer: %v (want the OK trailer)", err)
	}
	return nil
}
