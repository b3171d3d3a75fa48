package store

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

func bulkRun(id string, created time.Time, st fleetv1.BulkState) BulkRun {
	b := &fleetv1.BulkCommand{BulkId: id, Command: "merge-and-deploy", State: st, CreatedAt: timestamppb.New(created),
		Actor: "user:admin", PrNumber: 7, Commit: "0123456789abcdef0123456789abcdef01234567",
		Results: []*fleetv1.BulkHostResult{
			{HostId: "a", Message: "pull-switch: done", Command: &fleetv1.Command{CommandId: "cmd-a", HostId: "a", Command: "pull-switch",
				State: typesv1.CommandState_COMMAND_STATE_SUCCEEDED, BulkId: id}},
			{HostId: "b", Message: "waiting"},
		}}
	if st != fleetv1.BulkState_BULK_STATE_RUNNING {
		b.FinishedAt = timestamppb.New(created.Add(time.Minute))
		b.Message = "done"
	}
	return BulkRun{Bulk: b, Plan: BulkPlan{Steps: []string{"pull-switch"}, Batches: [][]string{{"a"}, {"b"}}, Concurrency: 10, MaxFailures: 1,
		Hosts: map[string]BulkHostProgress{"a": {Step: 0, CommandID: "cmd-a", Ended: true, OK: true}}}}
}

func TestBulksSaveGet(t *testing.T) {
	s := openTemp(t)
	ctx := t.Context()
	r := bulkRun("bulk-1", t0, fleetv1.BulkState_BULK_STATE_RUNNING)
	wantErr(t, s.SaveBulk(ctx, r), nil)
	got, err := s.GetBulk(ctx, "bulk-1")
	wantErr(t, err, nil)
	if !proto.Equal(got.Bulk, r.Bulk) || fmt.Sprint(got.Plan) != fmt.Sprint(r.Plan) {
		t.Fatalf("GetBulk = %v %+v, want %v %+v", got.Bulk, got.Plan, r.Bulk, r.Plan)
	}

	// Saving again replaces: a host's progress and the state.
	r.Plan.Hosts["b"] = BulkHostProgress{CommandID: "cmd-b"}
	r.Bulk.Results[1].Message = "pull-switch running"
	wantErr(t, s.SaveBulk(ctx, r), nil)
	got, _ = s.GetBulk(ctx, "bulk-1")
	if got.Plan.Hosts["b"].CommandID != "cmd-b" || got.Bulk.Results[1].Message != "pull-switch running" {
		t.Fatalf("after second save: %v %+v", got.Bulk, got.Plan)
	}
	if un, err := s.UnfinishedBulks(ctx); err != nil || len(un) != 1 {
		t.Fatalf("UnfinishedBulks = %d, %v", len(un), err)
	}

	_, err = s.GetBulk(ctx, "bulk-nope")
	wantErr(t, err, ErrNotFound)
	for _, bad := range []BulkRun{
		{},
		{Bulk: &fleetv1.BulkCommand{State: fleetv1.BulkState_BULK_STATE_RUNNING, CreatedAt: timestamppb.New(t0)}},
		{Bulk: &fleetv1.BulkCommand{BulkId: "x", CreatedAt: timestamppb.New(t0)}},
		{Bulk: &fleetv1.BulkCommand{BulkId: "x", State: fleetv1.BulkState_BULK_STATE_RUNNING}},
	} {
		if err := s.SaveBulk(ctx, bad); err == nil {
			t.Errorf("SaveBulk(%v) succeeded", bad.Bulk)
		}
	}
}

func TestBulksUnfinishedAndPrune(t *testing.T) {
	s := openTemp(t)
	ctx := t.Context()
	// Created in this order, all in the same millisecond: r0 ended, r1
	// running, r2..r5 ended, r6 running.
	states := []fleetv1.BulkState{fleetv1.BulkState_BULK_STATE_SUCCEEDED, fleetv1.BulkState_BULK_STATE_RUNNING,
		fleetv1.BulkState_BULK_STATE_FAILED, fleetv1.BulkState_BULK_STATE_PARTIAL, fleetv1.BulkState_BULK_STATE_SUCCEEDED,
		fleetv1.BulkState_BULK_STATE_SUCCEEDED, fleetv1.BulkState_BULK_STATE_RUNNING}
	for i, st := range states {
		wantErr(t, s.SaveBulk(ctx, bulkRun(fmt.Sprintf("r%d", i), t0, st)), nil)
	}
	un, err := s.UnfinishedBulks(ctx)
	wantErr(t, err, nil)
	if len(un) != 2 || un[0].Bulk.BulkId != "r1" || un[1].Bulk.BulkId != "r6" {
		t.Fatalf("UnfinishedBulks = %v", un)
	}

	n, err := s.PruneBulks(ctx, 2)
	wantErr(t, err, nil)
	if n != 3 {
		t.Fatalf("PruneBulks deleted %d, want 3 (r0, r2, r3)", n)
	}
	for i := range states {
		id := fmt.Sprintf("r%d", i)
		_, err := s.GetBulk(ctx, id)
		if gone := i == 0 || i == 2 || i == 3; gone {
			wantErr(t, err, ErrNotFound)
		} else {
			wantErr(t, err, nil)
		}
	}

	// An unfinished run that ends leaves the unfinished list; an ended run
	// without a finish time gets one.
	r := bulkRun("r1", t0, fleetv1.BulkState_BULK_STATE_FAILED)
	r.Bulk.FinishedAt = nil
	wantErr(t, s.SaveBulk(ctx, r), nil)
	un, _ = s.UnfinishedBulks(ctx)
	if len(un) != 1 || un[0].Bulk.BulkId != "r6" {
		t.Fatalf("UnfinishedBulks after r1 ended = %v", un)
	}
	var finished int64
	if err := s.r.QueryRowContext(ctx, `SELECT finished_at FROM bulk_runs WHERE id = 'r1'`).Scan(&finished); err != nil || finished == 0 {
		t.Fatalf("finished_at of r1 = %d, %v", finished, err)
	}

	// keep 0 deletes every ended run, never a running one.
	if n, err := s.PruneBulks(ctx, 0); err != nil || n != 3 {
		t.Fatalf("PruneBulks(0) = %d, %v; want 3", n, err)
	}
	if _, err := s.GetBulk(ctx, "r6"); err != nil {
		t.Fatalf("running run pruned: %v", err)
	}
}

// TestBulksSurviveReopen: what a restarted server reads back.
func TestBulksSurviveReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nixplane.db")
	ctx := t.Context()
	s, err := Open(ctx, path, WithLogger(quietOptions().logger))
	if err != nil {
		t.Fatal(err)
	}
	r := bulkRun("bulk-1", t0, fleetv1.BulkState_BULK_STATE_RUNNING)
	wantErr(t, s.SaveBulk(ctx, r), nil)
	wantErr(t, s.Close(), nil)
	s, err = Open(ctx, path, WithLogger(quietOptions().logger))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	un, err := s.UnfinishedBulks(ctx)
	if err != nil || len(un) != 1 || !proto.Equal(un[0].Bulk, r.Bulk) || un[0].Plan.Hosts["a"] != r.Plan.Hosts["a"] ||
		fmt.Sprint(un[0].Plan.Batches) != "[[a] [b]]" || un[0].Plan.MaxFailures != 1 {
		t.Fatalf("after reopen: %v, %v", un, err)
	}
}
