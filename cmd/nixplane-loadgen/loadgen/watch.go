package loadgen

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// watchMethod is WatchFleet's full method name, the grpc-web request path.
const watchMethod = "/nixplane.fleet.v1.FleetService/WatchFleet"

// maxFrame bounds one message a watcher accepts: a snapshot of a large fleet
// is several megabytes.
const maxFrame = 512 << 20

// Phases of a run: events are sampled only inside the measured window, or
// apart while a reconnect storm lasts.
const (
	phaseOff int32 = iota
	phaseMeasure
	phaseStorm
)

// window holds the run's phase.
type window struct{ phase atomic.Int32 }

// watcher is one WatchFleet stream (reconnected when it ends) and what it
// saw. Its fields are written by its own goroutine and read after it ended.
type watcher struct {
	kind  string // "grpc-web" or "grpc"
	addr  string
	token string
	dial  func(ctx context.Context, addr string) (net.Conn, error)
	win   *window

	mu         sync.Mutex
	snapshots  int   // every snapshot, the first of each stream included
	resyncs    int64 // snapshots replacing a stream that fell behind, in the window
	resyncsAll int64
	reconnects int64
	errors     []string
	hbEvents   int64    // heartbeat events in the window
	responses  int64    // WatchFleetResponse messages in the window
	events     int64    // events in them
	hbLat      []uint32 // µs from the agent's send time to arrival, in the window
	stormLat   []uint32 // the same during a reconnect storm
	lineLat    []uint32 // µs from the line's time to arrival
	lines      map[string]map[uint64]struct{}
	complete   map[string]uint64 // command id → stored line count at its end
}

func newWatcher(kind, addr, token string, dial func(context.Context, string) (net.Conn, error), win *window) *watcher {
	return &watcher{kind: kind, addr: addr, token: token, dial: dial, win: win,
		lines: map[string]map[uint64]struct{}{}, complete: map[string]uint64{}}
}

func (w *watcher) ready() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.snapshots > 0
}

// run watches until ctx ends, reconnecting after a pause when the stream
// breaks (e.g. the server restarts).
func (w *watcher) run(ctx context.Context) {
	first := true
	for ctx.Err() == nil {
		if !first {
			w.mu.Lock()
			w.reconnects++
			w.mu.Unlock()
		}
		first = false
		var err error
		if w.kind == "grpc-web" {
			err = w.watchWeb(ctx)
		} else {
			err = w.watchGRPC(ctx)
		}
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			w.mu.Lock()
			if len(w.errors) < 5 {
				w.errors = append(w.errors, err.Error())
			}
			w.mu.Unlock()
		}
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func (w *watcher) watchGRPC(ctx context.Context) error {
	cc, err := grpc.NewClient("passthrough:///"+w.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(w.dial), grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxFrame)))
	if err != nil {
		return err
	}
	defer cc.Close()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+w.token)
	stream, err := fleetv1.NewFleetServiceClient(cc).WatchFleet(ctx, &fleetv1.WatchFleetRequest{})
	if err != nil {
		return err
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		w.handle(resp, time.Now())
	}
}

// watchWeb speaks grpc-web over HTTP/1.1 as a browser does: one POST whose
// response body is a sequence of length-prefixed frames (flag byte, 4-byte
// big-endian length), data frames (flag 0x00) then one trailer frame (0x80).
func (w *watcher) watchWeb(ctx context.Context) error {
	req, _ := proto.Marshal(&fleetv1.WatchFleetRequest{})
	frame := make([]byte, 5+len(req))
	binary.BigEndian.PutUint32(frame[1:5], uint32(len(req)))
	copy(frame[5:], req)
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+w.addr+watchMethod, bytes.NewReader(frame))
	if err != nil {
		return err
	}
	hr.Header.Set("Content-Type", "application/grpc-web+proto")
	hr.Header.Set("Accept", "application/grpc-web+proto")
	hr.Header.Set("X-Grpc-Web", "1")
	hr.Header.Set("Authorization", "Bearer "+w.token)
	tr := &http.Transport{
		DialContext:       func(ctx context.Context, _, addr string) (net.Conn, error) { return w.dial(ctx, addr) },
		ForceAttemptHTTP2: false,
		// A non-nil empty map turns HTTP/2 off: browsers never speak h2c.
		TLSNextProto:       map[string]func(string, *tls.Conn) http.RoundTripper{},
		DisableCompression: true,
	}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Do(hr)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 1 {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("grpc-web watch: %s over %s: %s", resp.Status, resp.Proto, strings.TrimSpace(string(body)))
	}
	if code := resp.Header.Get("Grpc-Status"); code != "" && code != "0" {
		return fmt.Errorf("grpc-web watch: grpc-status %s: %s", code, resp.Header.Get("Grpc-Message"))
	}
	r := bufio.NewReaderSize(resp.Body, 64<<10)
	var hdr [5]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return fmt.Errorf("grpc-web watch: %w", err)
		}
		n := binary.BigEndian.Uint32(hdr[1:])
		if n > maxFrame {
			return fmt.Errorf("grpc-web watch: frame of %d bytes", n)
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(r, payload); err != nil {
			return fmt.Errorf("grpc-web watch: short frame: %w", err)
		}
		at := time.Now()
		if hdr[0]&0x80 != 0 {
			return fmt.Errorf("grpc-web watch ended: %s", strings.TrimSpace(strings.ReplaceAll(string(payload), "\r\n", "; ")))
		}
		var m fleetv1.WatchFleetResponse
		if err := proto.Unmarshal(payload, &m); err != nil {
			return fmt.Errorf("grpc-web watch: %w", err)
		}
		w.handle(&m, at)
	}
}

// handle accounts one response that arrived at at.
func (w *watcher) handle(resp *fleetv1.WatchFleetResponse, at time.Time) {
	phase := w.win.phase.Load()
	in := phase == phaseMeasure
	w.mu.Lock()
	defer w.mu.Unlock()
	if in {
		w.responses++
		w.events += int64(len(resp.Events))
	}
	for _, ev := range resp.Events {
		switch k := ev.Kind.(type) {
		case *fleetv1.FleetEvent_Snapshot:
			w.snapshots++
			if k.Snapshot.Resync {
				w.resyncsAll++
				if in {
					w.resyncs++
				}
			}
		case *fleetv1.FleetEvent_HostHeartbeat:
			if k.HostHeartbeat.SentAt == nil {
				continue
			}
			switch phase {
			case phaseMeasure:
				w.hbEvents++
				w.hbLat = append(w.hbLat, micros(at.Sub(k.HostHeartbeat.SentAt.AsTime())))
			case phaseStorm:
				w.stormLat = append(w.stormLat, micros(at.Sub(k.HostHeartbeat.SentAt.AsTime())))
			}
		case *fleetv1.FleetEvent_CommandOutput:
			id := k.CommandOutput.CommandId
			seen := w.lines[id]
			if seen == nil {
				seen = map[uint64]struct{}{}
				w.lines[id] = seen
			}
			for _, l := range k.CommandOutput.Lines {
				seen[l.Seq] = struct{}{}
				if l.Time != nil {
					w.lineLat = append(w.lineLat, micros(at.Sub(l.Time.AsTime())))
				}
			}
		case *fleetv1.FleetEvent_CommandComplete:
			if c := k.CommandComplete.Command; c != nil {
				w.complete[c.CommandId] = c.LineCount
			}
		}
	}
}

func micros(d time.Duration) uint32 {
	if d < 0 {
		return 0
	}
	if us := d.Microseconds(); us < 1<<32-1 {
		return uint32(us)
	}
	return 1<<32 - 1
}

// errNoSnapshot: a watcher never got its first snapshot.
var errNoSnapshot = errors.New("watchers got no snapshot")
