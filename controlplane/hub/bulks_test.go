package hub

import (
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// bulkEvent is a BulkProgress event of a merge-and-deploy on two hosts,
// done of them ended.
func bulkEvent(id string, state fleetv1.BulkState, created time.Time, done int) *fleetv1.FleetEvent {
	b := &fleetv1.BulkCommand{BulkId: id, Command: "merge-and-deploy", State: state, PrNumber: 42, Commit: "abcdef0123",
		CreatedAt: timestamppb.New(created)}
	for i, host := range []string{"a", "b"} {
		r := &fleetv1.BulkHostResult{HostId: host, Message: "waiting"}
		if i < done {
			r.Message = "pull-switch: done"
		}
		b.Results = append(b.Results, r)
	}
	return &fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_BulkProgress{BulkProgress: &fleetv1.BulkProgress{Bulk: b}}}
}

func bulkIDs(bs []*fleetv1.BulkCommand) []string {
	var ids []string
	for _, b := range bs {
		ids = append(ids, b.BulkId)
	}
	return ids
}

func TestSnapshotCarriesRunningBulks(t *testing.T) {
	th := newTestHub(t, 0, "a", "b")
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	running := fleetv1.BulkState_BULK_STATE_RUNNING

	if got := th.Snapshot().ActiveBulks; len(got) != 0 {
		t.Fatalf("snapshot before any run lists %v", bulkIDs(got))
	}
	// Published newest first: the snapshot still lists them oldest first.
	th.Publish(bulkEvent("bulk-2", running, t0.Add(time.Minute), 0))
	th.Publish(bulkEvent("bulk-1", running, t0, 0))
	latest := bulkEvent("bulk-1", running, t0, 1)
	th.Publish(latest)

	snap := th.Snapshot()
	if ids := bulkIDs(snap.ActiveBulks); len(ids) != 2 || ids[0] != "bulk-1" || ids[1] != "bulk-2" {
		t.Fatalf("snapshot during the runs lists %v, want [bulk-1 bulk-2]", ids)
	}
	if !proto.Equal(snap.ActiveBulks[0], latest.GetBulkProgress().Bulk) {
		t.Fatalf("snapshot has bulk-1 as %v, want its latest progress %v", snap.ActiveBulks[0], latest.GetBulkProgress().Bulk)
	}
	w, wsnap := th.Subscribe(WatchOptions{})
	if ids := bulkIDs(wsnap.ActiveBulks); len(ids) != 2 {
		t.Fatalf("a new watcher's snapshot lists %v, want both runs", ids)
	}
	if ids := bulkIDs(th.ActiveBulks()); len(ids) != 2 || ids[0] != "bulk-1" {
		t.Fatalf("ActiveBulks = %v, want [bulk-1 bulk-2]", ids)
	}

	// Each way a run ends drops it; the event still reaches watchers.
	th.Publish(bulkEvent("bulk-1", fleetv1.BulkState_BULK_STATE_PARTIAL, t0, 2))
	if ids := bulkIDs(th.Snapshot().ActiveBulks); len(ids) != 1 || ids[0] != "bulk-2" {
		t.Fatalf("snapshot after bulk-1 ended lists %v, want [bulk-2]", ids)
	}
	evs := drain(t, th.Hub, w)
	if len(evs) != 1 || evs[0].GetBulkProgress().GetBulk().GetState() != fleetv1.BulkState_BULK_STATE_PARTIAL {
		t.Fatalf("watcher got %v, want bulk-1's end", evs)
	}
	for _, end := range []fleetv1.BulkState{fleetv1.BulkState_BULK_STATE_SUCCEEDED, fleetv1.BulkState_BULK_STATE_FAILED} {
		th.Publish(bulkEvent("bulk-x", running, t0, 0))
		th.Publish(bulkEvent("bulk-x", end, t0, 2))
	}
	th.Publish(bulkEvent("bulk-2", fleetv1.BulkState_BULK_STATE_FAILED, t0.Add(time.Minute), 0))
	if got := th.Snapshot().ActiveBulks; len(got) != 0 {
		t.Fatalf("snapshot after every run ended lists %v", bulkIDs(got))
	}
	// A progress event without a run id is passed on but not kept.
	th.Publish(&fleetv1.FleetEvent{Kind: &fleetv1.FleetEvent_BulkProgress{BulkProgress: &fleetv1.BulkProgress{}}})
	if got := th.ActiveBulks(); len(got) != 0 {
		t.Fatalf("an empty progress event was kept: %v", got)
	}
}

func TestResyncSnapshotCarriesRunningBulks(t *testing.T) {
	th := newTestHub(t, 4, "a")
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	w, _ := th.Subscribe(WatchOptions{})
	th.Publish(bulkEvent("bulk-ended", fleetv1.BulkState_BULK_STATE_RUNNING, t0, 0))
	th.Publish(bulkEvent("bulk-running", fleetv1.BulkState_BULK_STATE_RUNNING, t0, 0))
	th.Publish(bulkEvent("bulk-ended", fleetv1.BulkState_BULK_STATE_SUCCEEDED, t0, 2))
	// Past the queue limit: the watcher is set for a resync.
	for seq := uint64(1); seq <= 5; seq++ {
		th.Publish(outputEvent(seq))
	}
	latest := bulkEvent("bulk-running", fleetv1.BulkState_BULK_STATE_RUNNING, t0, 1)
	th.Publish(latest)
	evs := drain(t, th.Hub, w)
	if len(evs) != 1 || evs[0].GetSnapshot() == nil || !evs[0].GetSnapshot().Resync {
		t.Fatalf("the overflowing watcher got %d events, want one resync snapshot", len(evs))
	}
	got := evs[0].GetSnapshot().ActiveBulks
	if len(got) != 1 || !proto.Equal(got[0], latest.GetBulkProgress().Bulk) {
		t.Fatalf("resync snapshot lists %v, want bulk-running with its latest progress", bulkIDs(got))
	}
}
