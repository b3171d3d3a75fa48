package hub

import (
	"fmt"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// fillAll sets every field of m to a value that is not its default, so a
// copy that forgets a field is caught (fields added to the contract too).
func fillAll(m protoreflect.Message) {
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		switch {
		case fd.IsList():
			l := m.Mutable(fd).List()
			if fd.Kind() == protoreflect.MessageKind {
				l.Append(protoreflect.ValueOfMessage(l.NewElement().Message()))
			} else {
				l.Append(scalar(fd, i))
			}
		case fd.IsMap():
			continue
		case fd.Kind() == protoreflect.MessageKind:
			m.Set(fd, protoreflect.ValueOfMessage(m.NewField(fd).Message()))
		default:
			m.Set(fd, scalar(fd, i))
		}
	}
}

func scalar(fd protoreflect.FieldDescriptor, i int) protoreflect.Value {
	switch fd.Kind() {
	case protoreflect.StringKind:
		return protoreflect.ValueOfString(fmt.Sprint("v", i))
	case protoreflect.BoolKind:
		return protoreflect.ValueOfBool(true)
	case protoreflect.EnumKind:
		return protoreflect.ValueOfEnum(1)
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return protoreflect.ValueOfInt32(int32(i + 1))
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return protoreflect.ValueOfInt64(int64(i + 1))
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return protoreflect.ValueOfUint32(uint32(i + 1))
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return protoreflect.ValueOfUint64(uint64(i + 1))
	case protoreflect.DoubleKind:
		return protoreflect.ValueOfFloat64(float64(i) + 0.5)
	case protoreflect.FloatKind:
		return protoreflect.ValueOfFloat32(float32(i) + 0.5)
	case protoreflect.BytesKind:
		return protoreflect.ValueOfBytes([]byte{byte(i + 1)})
	}
	panic(fmt.Sprintf("field %s: kind %v not handled", fd.FullName(), fd.Kind()))
}

// TestSharedViewEqualsView: the cheap view that shares nested messages
// carries every field the deep copy does.
func TestSharedViewEqualsView(t *testing.T) {
	rec := &fleetv1.Host{}
	fillAll(rec.ProtoReflect())
	for _, online := range []bool{true, false} {
		hr := hostRef{rec: rec, online: online, lastSeen: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC),
			metrics: &typesv1.Metrics{CpuPercent: 12}, interval: 5 * time.Second}
		deep, shared := hr.view(), hr.sharedView()
		if !proto.Equal(deep, shared) {
			t.Fatalf("online=%v: shared view differs from the deep copy:\n deep   %v\n shared %v", online, deep, shared)
		}
		if shared.UpdateStatus != rec.UpdateStatus || deep.UpdateStatus == rec.UpdateStatus {
			t.Fatal("the shared view should share nested messages, the deep one not")
		}
	}
}

// TestSnapshotAndEventsDoNotAliasCallersCopies: Host and Hosts return deep
// copies a caller may change without touching the hub or a watcher's view.
func TestSnapshotAndEventsDoNotAliasCallersCopies(t *testing.T) {
	th := newTestHub(t, 0, "a")
	if _, err := th.UpdateRecord("a", func(h *fleetv1.Host) {
		h.UpdateStatus = &typesv1.UpdateStatus{System: &typesv1.Compartment{Status: typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK, Message: "measured"}}
	}); err != nil {
		t.Fatal(err)
	}
	_, snap := th.Subscribe(WatchOptions{})
	before := proto.Clone(snap).(*fleetv1.Snapshot)
	h, _ := th.Host("a")
	h.UpdateStatus.System.Message = "changed by a caller"
	for _, x := range th.Hosts() {
		x.UpdateStatus.System.Message = "changed by a caller"
	}
	if !proto.Equal(before, snap) {
		t.Fatal("changing a Host or Hosts result changed a watcher's snapshot")
	}
	if got, _ := th.Host("a"); got.UpdateStatus.System.Message == "changed by a caller" {
		t.Fatal("changing a Host result changed the hub's record")
	}
}
