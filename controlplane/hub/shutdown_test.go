package hub

import (
	"context"
	"errors"
	"testing"

	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
)

// TestCloseAllRefusesNewSessions: after CloseAll every session is closed
// with ErrShutdown, no new one is registered (not even for a host that was
// offline), and Drained fires once the closed sessions disconnected.
func TestCloseAllRefusesNewSessions(t *testing.T) {
	th := newTestHub(t, 0, "a", "b", "c")
	a := th.connect(t, "a", 0)
	b := th.connect(t, "b", 0)
	// A replaced session does not count twice.
	b2 := th.connect(t, "b", 0)
	select {
	case <-th.Drained():
		t.Fatal("Drained before CloseAll")
	default:
	}

	th.CloseAll()
	for name, s := range map[string]session{"a": a, "b": b2} {
		if !errors.Is(context.Cause(s.ctx), ErrShutdown) {
			t.Fatalf("session %s cause = %v, want ErrShutdown", name, context.Cause(s.ctx))
		}
	}
	for _, id := range []string{"a", "c"} {
		c, _, err := th.Connect(id, &agentv1.Hello{Hostname: id}, &recSender{}, func(error) {})
		if !errors.Is(err, ErrShutdown) || c != nil {
			t.Fatalf("Connect %s after CloseAll = %v, %v; want ErrShutdown", id, c, err)
		}
	}
	if h, _ := th.Host("c"); h.Online {
		t.Fatal("host c came online after CloseAll")
	}

	th.Disconnect(a.conn, "server shutting down")
	th.Disconnect(b.conn, "replaced") // the replaced session: no effect
	select {
	case <-th.Drained():
		t.Fatal("Drained while host b's session is still registered")
	default:
	}
	th.Disconnect(b2.conn, "server shutting down")
	select {
	case <-th.Drained():
	default:
		t.Fatal("not Drained after every session disconnected")
	}
	th.CloseAll() // idempotent
}

// TestDrainedWithoutSessions: a hub with no agents is drained at once, and a
// host removed while connected counts off.
func TestDrainedWithoutSessions(t *testing.T) {
	th := newTestHub(t, 0, "a")
	th.connect(t, "a", 0)
	th.RemoveHost("a")
	th.CloseAll()
	select {
	case <-th.Drained():
	default:
		t.Fatal("not Drained with no session left")
	}
}
