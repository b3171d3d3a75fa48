package controlplane

import (
	"context"
	"log/slog"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/store"
	"github.com/nixplane/nixplane/controlplane/validate"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// recoverUnary turns a handler panic into Internal and logs the stack, so
// one bad request cannot take the server down.
func recoverUnary(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if r := recover(); r != nil {
				log.Error("panic in handler", "method", info.FullMethod, "panic", r, "stack", string(debug.Stack()))
				err = status.Error(codes.Internal, "internal error; see the server log")
			}
		}()
		return h(ctx, req)
	}
}

func recoverStream(log *slog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) (err error) {
		defer func() {
			if r := recover(); r != nil {
				log.Error("panic in handler", "method", info.FullMethod, "panic", r, "stack", string(debug.Stack()))
				err = status.Error(codes.Internal, "internal error; see the server log")
			}
		}()
		return h(srv, ss)
	}
}

// auditUnary records every mutating call — who, what, which host, and the
// result code — after it ran.
func auditUnary(a store.Audit, policy auth.Policy, log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		resp, err := h(ctx, req)
		if rule := policy[info.FullMethod]; !rule.Mutating || rule.Public {
			return resp, err
		}
		ev := store.AuditEvent{Time: time.Now(), Actor: auth.FromContext(ctx).Actor(), Action: methodName(info.FullMethod), Result: "ok"}
		if err != nil {
			ev.Result = status.Code(err).String()
		}
		if m, ok := req.(proto.Message); ok {
			ev.HostID, ev.Detail = auditFields(m)
		}
		if c, ok := resp.(interface{ GetCommand() *fleetv1.Command }); ok && c.GetCommand() != nil {
			ev.HostID = c.GetCommand().HostId
			ev.Detail = c.GetCommand().Command + " " + c.GetCommand().CommandId
		}
		if b, ok := resp.(interface{ GetBulk() *fleetv1.BulkCommand }); ok && b.GetBulk() != nil {
			ev.Detail = validate.Printable(strings.TrimSpace(ev.Detail+" "+b.GetBulk().BulkId), 200)
		}
		if aerr := a.AppendAudit(context.WithoutCancel(ctx), ev); aerr != nil {
			log.Warn("write audit record", "err", aerr)
		}
		return resp, err
	}
}

func methodName(full string) string {
	for i := len(full) - 1; i >= 0; i-- {
		if full[i] == '/' {
			return full[i+1:]
		}
	}
	return full
}

// auditFields picks the host and a short detail from a request by field
// name, without secrets (no request carries one in these fields).
func auditFields(m proto.Message) (host, detail string) {
	r := m.ProtoReflect()
	fields := r.Descriptor().Fields()
	get := func(name string) string {
		if fd := fields.ByName(protoName(name)); fd != nil && fd.Kind().String() == "string" && !fd.IsList() {
			return r.Get(fd).String()
		}
		return ""
	}
	host = get("host_id")
	if host == "" {
		host = get("hostname")
	}
	for _, k := range []string{"command", "command_id", "name", "bulk_id"} {
		if v := get(k); v != "" {
			if detail != "" {
				detail += " "
			}
			detail += v
		}
	}
	// The PR a merge-and-deploy asked for.
	if fd := fields.ByName("pr_number"); fd != nil && fd.Kind() == protoreflect.Int32Kind {
		if n := r.Get(fd).Int(); n != 0 {
			detail = strings.TrimSpace(detail + " PR #" + strconv.FormatInt(n, 10))
		}
	}
	// Bounded between characters and without control characters: a cut
	// rune would make every later listing of the audit log fail.
	return validate.Printable(host, 64), validate.Printable(detail, 200)
}

// metrics are the Prometheus series the server exports at /metrics.
type metrics struct {
	reg        *prometheus.Registry
	grpc       *grpcprom.ServerMetrics
	heartbeats prometheus.Counter
	agents     prometheus.Gauge
	resyncs    prometheus.Counter
	commands   *prometheus.CounterVec
	unary      grpc.UnaryServerInterceptor
	stream     grpc.StreamServerInterceptor
}

func newMetrics() *metrics {
	m := &metrics{
		reg:        prometheus.NewRegistry(),
		grpc:       grpcprom.NewServerMetrics(),
		heartbeats: prometheus.NewCounter(prometheus.CounterOpts{Name: "nixplane_heartbeats_total", Help: "Heartbeats received from agents."}),
		agents:     prometheus.NewGauge(prometheus.GaugeOpts{Name: "nixplane_agents_connected", Help: "Agents with a live stream."}),
		resyncs:    prometheus.NewCounter(prometheus.CounterOpts{Name: "nixplane_watcher_resyncs_total", Help: "Watchers that fell behind and were sent a fresh snapshot."}),
		commands:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nixplane_commands_total", Help: "Ended commands by command and final state."}, []string{"command", "state"}),
	}
	m.reg.MustRegister(m.grpc, m.heartbeats, m.agents, m.resyncs, m.commands,
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	m.unary = m.grpc.UnaryServerInterceptor()
	m.stream = m.grpc.StreamServerInterceptor()
	return m
}

// Heartbeat implements agentapi.Metrics.
func (m *metrics) Heartbeat() { m.heartbeats.Inc() }

// Connected implements agentapi.Metrics.
func (m *metrics) Connected(d int) { m.agents.Add(float64(d)) }

func (m *metrics) resync() { m.resyncs.Inc() }

func (m *metrics) commandDone(c *fleetv1.Command) {
	m.commands.WithLabelValues(c.Command, c.State.String()).Inc()
}

func protoName(s string) protoreflect.Name { return protoreflect.Name(s) }
