package cli

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/nixplane/nixplane/controlplane"
	"github.com/nixplane/nixplane/controlplane/auth"
	"github.com/nixplane/nixplane/controlplane/fleetapi"
	"github.com/nixplane/nixplane/controlplane/store"
	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// target says where an administrative command acts: a data directory
// (offline) or a running server (online, with a token).
type target struct {
	dataDir, server, token, tokenFile string
	json                              bool
}

func targetFlags(f *flags) *target {
	t := &target{}
	f.StringVar(&t.dataDir, "data-dir", "", "act on this data directory directly; a running server sees a new host when its agent connects (use --server to see it at once)")
	f.StringVar(&t.server, "server", "", "act through a running server's API, e.g. http://127.0.0.1:8080")
	f.StringVar(&t.token, "token", "", "API token for --server (prefer NIXPLANE_TOKEN)")
	f.StringVar(&t.tokenFile, "token-file", "", "file holding the API token for --server")
	f.BoolVar(&t.json, "json", false, "print JSON")
	return t
}

func (t *target) check() error {
	switch {
	case t.dataDir != "" && t.server != "":
		return usagef("give either --data-dir or --server, not both")
	case t.dataDir == "" && t.server == "":
		return usagef("give --data-dir DIR (offline) or --server URL (online)")
	}
	return nil
}

// dial connects to a server URL (http:// plaintext HTTP/2, https:// TLS)
// with a bearer token on every call.
func dial(server, token string) (*grpc.ClientConn, error) {
	u, err := url.Parse(server)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, usagef("--server must be an http:// or https:// URL, got %q", server)
	}
	if token == "" {
		return nil, usagef("no API token: set NIXPLANE_TOKEN or --token-file")
	}
	creds := insecure.NewCredentials()
	if u.Scheme == "https" {
		creds = credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12})
	}
	return grpc.NewClient(u.Host, grpc.WithTransportCredentials(creds),
		grpc.WithPerRPCCredentials(bearer{token: token, secure: u.Scheme == "https"}))
}

type bearer struct {
	token  string
	secure bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

func (b bearer) RequireTransportSecurity() bool { return b.secure }

// fleet connects to --server (or NIXPLANE_SERVER) for the commands that
// only work through a running server; close the connection when done.
func (t *target) fleet() (fleetv1.FleetServiceClient, *grpc.ClientConn, error) {
	if t.server == "" { // flags.parse has already read NIXPLANE_SERVER
		return nil, nil, usagef("give --server URL (or NIXPLANE_SERVER)")
	}
	c, err := t.conn()
	if err != nil {
		return nil, nil, err
	}
	return fleetv1.NewFleetServiceClient(c), c, nil
}

func (t *target) conn() (*grpc.ClientConn, error) {
	tok := t.token
	if t.tokenFile != "" {
		b, err := os.ReadFile(t.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("read token file: %w", err)
		}
		tok = strings.TrimSpace(string(b))
	}
	return dial(t.server, tok)
}

// rpcErr turns a gRPC error into a plain message.
func rpcErr(err error) error {
	if s, ok := status.FromError(err); ok {
		return fmt.Errorf("%s: %s", s.Code(), s.Message())
	}
	return err
}

func hosts(ctx context.Context, args []string, env Env) error {
	sub := "list"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		sub, args = args[0], args[1:]
	}
	f := newFlags("hosts "+sub, env)
	t := targetFlags(f)
	hostType := f.String("type", "nixos", "host type: nixos, darwin or home-manager")
	location := f.String("location", "", "where the host is (e.g. home, office, cloud)")
	device := f.String("device-type", "", "what it is (e.g. server, desktop, laptop)")
	color := f.String("color", "", "theme colour #rrggbb")
	force := f.Bool("force", false, "remove even when online")
	pos, err := f.parse(args)
	if err != nil {
		return err
	}
	if sub == "list" && t.server == "" && t.dataDir == "" {
		t.server = env.Getenv("NIXPLANE_SERVER")
	}
	if err := t.check(); err != nil {
		return err
	}
	one := func() (string, error) {
		if len(pos) != 1 {
			return "", usagef("hosts %s takes one host name", sub)
		}
		return pos[0], nil
	}
	switch sub {
	case "add":
		name, err := one()
		if err != nil {
			return err
		}
		ht, err := parseHostType(*hostType)
		if err != nil {
			return err
		}
		req := &fleetv1.AddHostRequest{Hostname: name, HostType: ht, Location: *location, DeviceType: *device, ThemeColor: *color}
		var tok string
		if t.dataDir != "" {
			tok, err = addHostOffline(ctx, t.dataDir, req)
		} else {
			tok, err = withConn(t, func(c *grpc.ClientConn) (string, error) {
				r, err := fleetv1.NewFleetServiceClient(c).AddHost(ctx, req)
				return r.GetAgentToken(), err
			})
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(env.Stderr, "Registered host %q. Its agent token follows on stdout (shown once).\n", name)
		fmt.Fprintln(env.Stdout, tok)
		return nil
	case "remove":
		name, err := one()
		if err != nil {
			return err
		}
		if t.dataDir != "" {
			err = withStore(ctx, t.dataDir, func(st *store.SQLite) error { return st.DeleteHost(ctx, name) })
			if errors.Is(err, store.ErrNotFound) {
				return fmt.Errorf("no host named %q", name)
			}
		} else {
			_, err = withConn(t, func(c *grpc.ClientConn) (string, error) {
				_, err := fleetv1.NewFleetServiceClient(c).RemoveHost(ctx, &fleetv1.RemoveHostRequest{HostId: name, Force: *force})
				return "", err
			})
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(env.Stderr, "Removed host %q.\n", name)
		return nil
	case "rotate-token":
		name, err := one()
		if err != nil {
			return err
		}
		var tok string
		if t.dataDir != "" {
			tok = auth.NewSecret(auth.AgentTokenPrefix)
			err = withStore(ctx, t.dataDir, func(st *store.SQLite) error { return st.SetHostToken(ctx, name, auth.HashSecret(tok)) })
		} else {
			tok, err = withConn(t, func(c *grpc.ClientConn) (string, error) {
				r, err := fleetv1.NewFleetServiceClient(c).RotateHostToken(ctx, &fleetv1.RotateHostTokenRequest{HostId: name})
				return r.GetAgentToken(), err
			})
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(env.Stderr, "New agent token for %q follows on stdout (shown once); the old one no longer works.\n", name)
		fmt.Fprintln(env.Stdout, tok)
		return nil
	case "list":
		if len(pos) > 0 {
			return usagef("hosts list takes no arguments")
		}
		var list []*fleetv1.Host
		if t.dataDir != "" {
			err = withStore(ctx, t.dataDir, func(st *store.SQLite) error {
				hs, err := st.ListHosts(ctx)
				for _, h := range hs {
					list = append(list, h.Record)
				}
				return err
			})
		} else {
			_, err = withConn(t, func(c *grpc.ClientConn) (string, error) {
				r, err := fleetv1.NewFleetServiceClient(c).ListHosts(ctx, &fleetv1.ListHostsRequest{})
				list = r.GetHosts()
				return "", err
			})
		}
		if err != nil {
			return err
		}
		return printHosts(env, list, t.json)
	}
	return usagef("unknown hosts command %q (add, list, remove, rotate-token)", sub)
}

func parseHostType(s string) (typesv1.HostType, error) {
	switch strings.ToLower(s) {
	case "nixos", "":
		return typesv1.HostType_HOST_TYPE_NIXOS, nil
	case "darwin", "macos", "nix-darwin":
		return typesv1.HostType_HOST_TYPE_DARWIN, nil
	case "home-manager", "hm":
		return typesv1.HostType_HOST_TYPE_HOME_MANAGER, nil
	}
	return 0, usagef("unknown host type %q (nixos, darwin, home-manager)", s)
}

func withStore(ctx context.Context, dir string, fn func(*store.SQLite) error) error {
	st, err := controlplane.OpenStore(ctx, dir)
	if err != nil {
		return err
	}
	defer st.Close()
	return fn(st)
}

func withConn(t *target, fn func(*grpc.ClientConn) (string, error)) (string, error) {
	c, err := t.conn()
	if err != nil {
		return "", err
	}
	defer c.Close()
	s, err := fn(c)
	if err != nil {
		return "", rpcErr(err)
	}
	return s, nil
}

func addHostOffline(ctx context.Context, dir string, req *fleetv1.AddHostRequest) (string, error) {
	var rec *fleetv1.Host
	var tok string
	err := withStore(ctx, dir, func(st *store.SQLite) (err error) {
		rec, tok, err = fleetapi.RegisterHost(ctx, st, req, time.Now())
		return err
	})
	var invalid *fleetapi.InvalidHostError
	switch {
	case errors.As(err, &invalid):
		return "", usagef("%v", err)
	case errors.Is(err, store.ErrExists):
		return "", fmt.Errorf("host %q exists already (rotate its token with 'nixplane hosts rotate-token')", rec.HostId)
	}
	return tok, err
}

var jsonOut = protojson.MarshalOptions{UseProtoNames: true, Multiline: true, Indent: "  "}

func printHosts(env Env, hs []*fleetv1.Host, asJSON bool) error {
	sort.Slice(hs, func(i, j int) bool { return hs[i].HostId < hs[j].HostId })
	if asJSON {
		b, err := jsonOut.Marshal(&fleetv1.ListHostsResponse{Hosts: hs})
		if err != nil {
			return err
		}
		fmt.Fprintln(env.Stdout, string(b))
		return nil
	}
	w := tabwriter.NewWriter(env.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "HOST\tONLINE\tTYPE\tAGENT\tGENERATION\tGIT\tLOCK\tSYSTEM\tTESTS\tRUNNING")
	for _, h := range hs {
		us := h.GetUpdateStatus()
		running := "-"
		if rc := h.GetRunningCommand(); rc != nil {
			running = rc.Command
		}
		fmt.Fprintf(w, "%s\t%v\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", h.HostId, h.Online, hostTypeName(h.HostType), dash(h.AgentVersion),
			dash(short(h.Generation)), comp(us.GetGit()), comp(us.GetLock()), comp(us.GetSystem()), comp(us.GetTests()), running)
	}
	return w.Flush()
}

func hostTypeName(t typesv1.HostType) string {
	return strings.ToLower(strings.TrimPrefix(t.String(), "HOST_TYPE_"))
}

func comp(c *typesv1.Compartment) string {
	if c == nil {
		return "-"
	}
	return strings.ToLower(strings.TrimPrefix(c.Status.String(), "COMPARTMENT_STATUS_"))
}

func short(s string) string {
	if len(s) > 7 {
		return s[:7]
	}
	return s
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func tokens(ctx context.Context, args []string, env Env) error {
	if len(args) == 0 {
		return usagef("tokens needs a command: create, list, revoke")
	}
	sub, args := args[0], args[1:]
	f := newFlags("tokens "+sub, env)
	t := targetFlags(f)
	scope := f.String("scope", "read", "scope of the new token: read, operate or admin")
	ttl := f.Duration("ttl", 0, "lifetime of the new token (0: no expiry)")
	pos, err := f.parse(args)
	if err != nil {
		return err
	}
	if err := t.check(); err != nil {
		return err
	}
	switch sub {
	case "create":
		if len(pos) != 1 {
			return usagef("tokens create takes one token name")
		}
		sc := adminv1.Scope(auth.ParseScope(*scope))
		if sc == adminv1.Scope_SCOPE_UNSPECIFIED {
			return usagef("unknown scope %q (read, operate, admin)", *scope)
		}
		var secret string
		if t.dataDir != "" {
			rec, sec, err := fleetapi.NewAPIToken(pos[0], sc, *ttl)
			if err != nil {
				return usagef("%v", err)
			}
			err = withStore(ctx, t.dataDir, func(st *store.SQLite) error { return st.CreateAPIToken(ctx, rec) })
			if errors.Is(err, store.ErrExists) {
				return fmt.Errorf("a token named %q exists already", pos[0])
			}
			if err != nil {
				return err
			}
			secret = sec
		} else {
			secret, err = withConn(t, func(c *grpc.ClientConn) (string, error) {
				r, err := adminv1.NewAdminServiceClient(c).CreateAPIToken(ctx, &adminv1.CreateAPITokenRequest{Name: pos[0], Scope: sc, Ttl: durationpb.New(*ttl)})
				return r.GetSecret(), err
			})
			if err != nil {
				return err
			}
		}
		fmt.Fprintf(env.Stderr, "Created API token %q with scope %s. The secret follows on stdout (shown once).\n", pos[0], *scope)
		fmt.Fprintln(env.Stdout, secret)
		return nil
	case "list":
		var list []*adminv1.APIToken
		if t.dataDir != "" {
			err = withStore(ctx, t.dataDir, func(st *store.SQLite) error {
				ts, err := st.ListAPITokens(ctx)
				for _, x := range ts {
					list = append(list, &adminv1.APIToken{Name: x.Name, Scope: adminv1.Scope(auth.ParseScope(x.Scope))})
				}
				return err
			})
		} else {
			_, err = withConn(t, func(c *grpc.ClientConn) (string, error) {
				r, err := adminv1.NewAdminServiceClient(c).ListAPITokens(ctx, &adminv1.ListAPITokensRequest{})
				list = r.GetTokens()
				return "", err
			})
		}
		if err != nil {
			return err
		}
		if t.json {
			b, _ := json.MarshalIndent(list, "", "  ")
			fmt.Fprintln(env.Stdout, string(b))
			return nil
		}
		w := tabwriter.NewWriter(env.Stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(w, "NAME\tSCOPE")
		for _, x := range list {
			fmt.Fprintf(w, "%s\t%s\n", x.Name, strings.ToLower(strings.TrimPrefix(x.Scope.String(), "SCOPE_")))
		}
		return w.Flush()
	case "revoke":
		if len(pos) != 1 {
			return usagef("tokens revoke takes one token name")
		}
		if t.dataDir != "" {
			err = withStore(ctx, t.dataDir, func(st *store.SQLite) error { return st.RevokeAPIToken(ctx, pos[0]) })
			if errors.Is(err, store.ErrNotFound) {
				return fmt.Errorf("no token named %q", pos[0])
			}
		} else {
			_, err = withConn(t, func(c *grpc.ClientConn) (string, error) {
				_, err := adminv1.NewAdminServiceClient(c).RevokeAPIToken(ctx, &adminv1.RevokeAPITokenRequest{Name: pos[0]})
				return "", err
			})
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(env.Stderr, "Revoked API token %q.\n", pos[0])
		return nil
	}
	return usagef("unknown tokens command %q (create, list, revoke)", sub)
}
