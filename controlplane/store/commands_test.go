package store

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

func cmd(id, host string, created time.Time, st typesv1.CommandState) *fleetv1.Command {
	return &fleetv1.Command{
		CommandId: id, HostId: host, Command: "switch", State: st,
		CreatedAt: timestamppb.New(created), Actor: "user:admin",
	}
}

func lines(from, to uint64) []*typesv1.OutputLine {
	var ls []*typesv1.OutputLine
	for i := from; i <= to; i++ {
		ls = append(ls, &typesv1.OutputLine{
			Seq: i, Stream: typesv1.OutputStream_OUTPUT_STREAM_STDOUT,
			Text: fmt.Sprintf("line %d", i), Time: timestamppb.New(t0.Add(time.Duration(i) * time.Millisecond)),
		})
	}
	return ls
}

func seqs(ls []*typesv1.OutputLine) []uint64 {
	var out []uint64
	for _, l := range ls {
		out = append(out, l.Seq)
	}
	return out
}

func TestCommandsCRUD(t *testing.T) {
	s := openTemp(t)
	ctx := t.Context()
	mustCreateHost(t, s, "web1", nil)

	c := cmd("c1", "web1", t0, typesv1.CommandState_COMMAND_STATE_QUEUED)
	wantErr(t, s.CreateCommand(ctx, c), nil)
	wantErr(t, s.CreateCommand(ctx, c), ErrExists)
	wantErr(t, s.CreateCommand(ctx, cmd("c2", "ghost", t0, typesv1.CommandState_COMMAND_STATE_QUEUED)), ErrNotFound)
	for _, bad := range []*fleetv1.Command{nil, {HostId: "web1"}, {CommandId: "x"}} {
		if err := s.CreateCommand(ctx, bad); err == nil || errors.Is(err, ErrNotFound) {
			t.Errorf("CreateCommand(%v) = %v, want validation error", bad, err)
		}
	}

	got, err := s.GetCommand(ctx, "c1")
	wantErr(t, err, nil)
	if !proto.Equal(got, c) {
		t.Fatalf("GetCommand = %v\nwant %v", got, c)
	}
	_, err = s.GetCommand(ctx, "nope")
	wantErr(t, err, ErrNotFound)

	// A missing created_at is filled from the clock in the stored copy.
	noTime := &fleetv1.Command{CommandId: "c-notime", HostId: "web1"}
	wantErr(t, s.CreateCommand(ctx, noTime), nil)
	if noTime.CreatedAt != nil {
		t.Fatal("CreateCommand modified the caller's record")
	}
	if got, _ := s.GetCommand(ctx, "c-notime"); got.GetCreatedAt() == nil {
		t.Fatal("stored command has no created_at")
	}

	upd := proto.CloneOf(c)
	upd.State = typesv1.CommandState_COMMAND_STATE_SUCCEEDED
	upd.ExitCode = 0
	upd.Message = "done"
	upd.FinishedAt = timestamppb.New(t0.Add(time.Minute))
	wantErr(t, s.UpdateCommand(ctx, upd), nil)
	got, _ = s.GetCommand(ctx, "c1")
	if !proto.Equal(got, upd) {
		t.Fatalf("after update = %v\nwant %v", got, upd)
	}
	wantErr(t, s.UpdateCommand(ctx, cmd("nope", "web1", t0, 0)), ErrNotFound)
	wantErr(t, s.UpdateCommand(ctx, cmd("c1", "otherhost", t0, 0)), ErrNotFound)
	if err := s.UpdateCommand(ctx, &fleetv1.Command{CommandId: "c1"}); err == nil {
		t.Fatal("UpdateCommand without host succeeded")
	}
}

func TestWithClock(t *testing.T) {
	now := t0.Add(42 * time.Hour)
	s := openTemp(t, WithClock(func() time.Time { return now }))
	ctx := t.Context()
	wantErr(t, s.CreateHost(ctx, Host{ID: "h"}, nil), nil)
	wantErr(t, s.CreateCommand(ctx, &fleetv1.Command{CommandId: "c", HostId: "h"}), nil)
	h, _ := s.GetHost(ctx, "h")
	c, _ := s.GetCommand(ctx, "c")
	if !h.CreatedAt.Equal(ms(now)) || !c.GetCreatedAt().AsTime().Equal(now) {
		t.Fatalf("created = %v, %v; want %v", h.CreatedAt, c.GetCreatedAt().AsTime(), now)
	}
}

func TestListCommandsPaging(t *testing.T) {
	s := openTemp(t)
	ctx := t.Context()
	mustCreateHost(t, s, "a", nil)
	mustCreateHost(t, s, "b", nil)
	// 7 runs on a, 4 on b; c-a-3 and c-a-4 share a millisecond, so the id
	// breaks the tie.
	type run struct {
		id, host string
		at       time.Duration
	}
	runs := []run{
		{"c-a-0", "a", 0}, {"c-b-0", "b", 1}, {"c-a-1", "a", 2}, {"c-a-2", "a", 3},
		{"c-a-3", "a", 4}, {"c-a-4", "a", 4}, {"c-b-1", "b", 5}, {"c-b-2", "b", 5},
		{"c-a-5", "a", 6}, {"c-b-3", "b", 7}, {"c-a-6", "a", 8},
	}
	for _, r := range runs {
		wantErr(t, s.CreateCommand(ctx, cmd(r.id, r.host, t0.Add(r.at*time.Second), typesv1.CommandState_COMMAND_STATE_SUCCEEDED)), nil)
	}
	// Newest first; within one millisecond, id descending.
	wantAll := []string{"c-a-6", "c-b-3", "c-a-5", "c-b-2", "c-b-1", "c-a-4", "c-a-3", "c-a-2", "c-a-1", "c-b-0", "c-a-0"}
	wantA := []string{"c-a-6", "c-a-5", "c-a-4", "c-a-3", "c-a-2", "c-a-1", "c-a-0"}

	for _, tc := range []struct {
		host  string
		limit int
		want  []string
	}{
		{"", 3, wantAll}, {"", 1, wantAll}, {"", 11, wantAll}, {"", 0, wantAll}, {"", 100, wantAll},
		{"a", 2, wantA}, {"a", 7, wantA}, {"b", 3, []string{"c-b-3", "c-b-2", "c-b-1", "c-b-0"}},
		{"nohost", 5, nil},
	} {
		t.Run(fmt.Sprintf("host=%q limit=%d", tc.host, tc.limit), func(t *testing.T) {
			var got []string
			cursor, pages := "", 0
			for {
				cs, next, err := s.ListCommands(ctx, tc.host, tc.limit, cursor)
				wantErr(t, err, nil)
				if tc.limit > 0 && len(cs) > tc.limit {
					t.Fatalf("page of %d > limit %d", len(cs), tc.limit)
				}
				for _, c := range cs {
					got = append(got, c.CommandId)
				}
				pages++
				if next == "" {
					break
				}
				if len(cs) == 0 {
					t.Fatal("empty page with a next cursor")
				}
				cursor = next
				if pages > 20 {
					t.Fatal("paging does not end")
				}
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Fatalf("got %v\nwant %v", got, tc.want)
			}
			wantPages := 1
			if tc.limit > 0 && len(tc.want) > 0 {
				wantPages = (len(tc.want) + tc.limit - 1) / tc.limit
			}
			if pages != wantPages {
				t.Fatalf("pages = %d, want %d", pages, wantPages)
			}
		})
	}

	t.Run("bad cursor", func(t *testing.T) {
		for _, cur := range []string{"!!!", "Zm9v", commandCursor{createdAt: 1}.encode()} {
			_, _, err := s.ListCommands(ctx, "", 5, cur)
			wantErr(t, err, ErrInvalidCursor)
		}
	})
}

func TestActiveAndPrune(t *testing.T) {
	s := openTemp(t)
	ctx := t.Context()
	mustCreateHost(t, s, "h", nil)
	var wantActive []string
	for st := typesv1.CommandState_COMMAND_STATE_UNSPECIFIED; st <= typesv1.CommandState_COMMAND_STATE_TIMED_OUT; st++ {
		c := cmd("c-"+st.String(), "h", t0.Add(time.Duration(st)*time.Second), st)
		if Terminal(st) {
			c.FinishedAt = timestamppb.New(t0.Add(time.Hour + time.Duration(st)*time.Second))
		} else {
			wantActive = append(wantActive, c.CommandId)
		}
		wantErr(t, s.CreateCommand(ctx, c), nil)
	}
	// A terminal run without a finish time is pruned by its creation time.
	wantErr(t, s.CreateCommand(ctx, cmd("blocked-nofinish", "h", t0, typesv1.CommandState_COMMAND_STATE_BLOCKED)), nil)
	wantErr(t, s.AppendLines(ctx, "c-COMMAND_STATE_FAILED", lines(1, 5)), nil)

	active, err := s.ActiveCommands(ctx)
	wantErr(t, err, nil)
	var got []string
	for _, c := range active {
		got = append(got, c.CommandId)
	}
	if fmt.Sprint(got) != fmt.Sprint(wantActive) || len(got) != 5 {
		t.Fatalf("ActiveCommands = %v, want %v", got, wantActive)
	}

	n, err := s.PruneCommands(ctx, t0.Add(time.Minute))
	if err != nil || n != 1 {
		t.Fatalf("PruneCommands(before finishes) = %d, %v; want 1", n, err)
	}
	n, err = s.PruneCommands(ctx, t0.Add(2*time.Hour))
	if err != nil || n != 6 {
		t.Fatalf("PruneCommands = %d, %v; want 6", n, err)
	}
	_, err = s.ReadLines(ctx, "c-COMMAND_STATE_FAILED", 0, 0)
	wantErr(t, err, ErrNotFound)
	var lineRows int
	if err := s.r.QueryRowContext(ctx, `SELECT COUNT(*) FROM command_lines`).Scan(&lineRows); err != nil || lineRows != 0 {
		t.Fatalf("lines left after prune: %d, %v", lineRows, err)
	}
	active, _ = s.ActiveCommands(ctx)
	if len(active) != 5 {
		t.Fatalf("prune removed active runs: %d left", len(active))
	}
}

func TestAppendLines(t *testing.T) {
	s := openTemp(t)
	ctx := t.Context()
	mustCreateHost(t, s, "h", nil)
	wantErr(t, s.CreateCommand(ctx, cmd("c", "h", t0, typesv1.CommandState_COMMAND_STATE_RUNNING)), nil)
	wantErr(t, s.CreateCommand(ctx, cmd("empty", "h", t0, typesv1.CommandState_COMMAND_STATE_RUNNING)), nil)

	// Out of order, with a resend overlapping what is stored.
	wantErr(t, s.AppendLines(ctx, "c", lines(4, 6)), nil)
	wantErr(t, s.AppendLines(ctx, "c", lines(1, 3)), nil)
	resend := lines(3, 8)
	resend[0].Text = "changed: must not replace the stored line"
	wantErr(t, s.AppendLines(ctx, "c", resend), nil)
	wantErr(t, s.AppendLines(ctx, "c", nil), nil)

	all, err := s.ReadLines(ctx, "c", 0, 0)
	wantErr(t, err, nil)
	if fmt.Sprint(seqs(all)) != "[1 2 3 4 5 6 7 8]" {
		t.Fatalf("seqs = %v", seqs(all))
	}
	want := lines(1, 8)
	for i := range want { // stored with millisecond precision
		want[i].Time = timestamppb.New(ms(want[i].Time.AsTime()))
		if !proto.Equal(all[i], want[i]) {
			t.Fatalf("line %d = %v, want %v", i, all[i], want[i])
		}
	}
	c, _ := s.GetCommand(ctx, "c")
	if c.LineCount != 8 {
		t.Fatalf("LineCount = %d, want 8", c.LineCount)
	}

	for _, tc := range []struct {
		after uint64
		limit int
		want  string
	}{
		{0, 3, "[1 2 3]"}, {3, 3, "[4 5 6]"}, {6, 3, "[7 8]"}, {8, 3, "[]"}, {2, 0, "[3 4 5 6 7 8]"},
	} {
		ls, err := s.ReadLines(ctx, "c", tc.after, tc.limit)
		wantErr(t, err, nil)
		if fmt.Sprint(seqs(ls)) != tc.want {
			t.Errorf("ReadLines(after %d, limit %d) = %v, want %s", tc.after, tc.limit, seqs(ls), tc.want)
		}
	}

	ls, err := s.ReadLines(ctx, "empty", 0, 10)
	if err != nil || len(ls) != 0 {
		t.Fatalf("ReadLines(empty) = %v, %v", ls, err)
	}
	_, err = s.ReadLines(ctx, "nope", 0, 10)
	wantErr(t, err, ErrNotFound)
	wantErr(t, s.AppendLines(ctx, "nope", lines(1, 2)), ErrNotFound)

	// A bad line fails the whole call and stores nothing of it.
	bad := lines(9, 10)
	bad = append(bad, &typesv1.OutputLine{Seq: 0, Text: "no seq"})
	if err := s.AppendLines(ctx, "c", bad); err == nil {
		t.Fatal("AppendLines with seq 0 succeeded")
	}
	if err := s.AppendLines(ctx, "c", []*typesv1.OutputLine{nil}); err == nil {
		t.Fatal("AppendLines with a nil line succeeded")
	}
	if ls, _ := s.ReadLines(ctx, "c", 8, 0); len(ls) != 0 {
		t.Fatalf("rejected batch stored lines %v", seqs(ls))
	}
}

func TestDeleteHostCascades(t *testing.T) {
	s := openTemp(t)
	ctx := t.Context()
	mustCreateHost(t, s, "gone", nil)
	mustCreateHost(t, s, "kept", nil)
	for _, h := range []string{"gone", "kept"} {
		for i := range 3 {
			id := fmt.Sprintf("%s-%d", h, i)
			wantErr(t, s.CreateCommand(ctx, cmd(id, h, t0.Add(time.Duration(i)*time.Second), typesv1.CommandState_COMMAND_STATE_SUCCEEDED)), nil)
			wantErr(t, s.AppendLines(ctx, id, lines(1, 4)), nil)
		}
	}
	wantErr(t, s.DeleteHost(ctx, "gone"), nil)

	for i := range 3 {
		_, err := s.GetCommand(ctx, fmt.Sprintf("gone-%d", i))
		wantErr(t, err, ErrNotFound)
		ls, err := s.ReadLines(ctx, fmt.Sprintf("kept-%d", i), 0, 0)
		if err != nil || len(ls) != 4 {
			t.Fatalf("kept lines = %d, %v", len(ls), err)
		}
	}
	var n int
	if err := s.r.QueryRowContext(ctx, `SELECT COUNT(*) FROM command_lines WHERE command_id LIKE 'gone-%'`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("orphan lines: %d, %v", n, err)
	}
	cs, _, err := s.ListCommands(ctx, "", 0, "")
	if err != nil || len(cs) != 3 {
		t.Fatalf("commands left = %d, %v", len(cs), err)
	}
}
