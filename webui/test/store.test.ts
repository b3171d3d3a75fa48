import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { create } from "@bufbuild/protobuf";
import { BinaryWriter } from "@bufbuild/protobuf/wire";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { SnapshotSchema } from "../src/gen/nixplane/fleet/v1/fleet_pb";
import { CommandState, CompartmentStatus } from "../src/gen/nixplane/types/v1/types_pb";
import { blockReason, describeBlock, errorInfoReason } from "../src/errors";
import { applyEvent, type EventSink } from "../src/events";
import { LogTab, MAX_TAB_LINES } from "../src/logs";
import {
  backoffDelay,
  hostFromProto,
  indicatorState,
  isStale,
  lastSeenView,
  type LogLine,
} from "../src/model";
import { Selection } from "../src/selection";
import { GlobalStore, HostStore, ServerClock, type HostChange } from "../src/store";
import { ev, host, T0 } from "./helpers";

function setup(ids: string[] = ["web-1", "web-2"]) {
  const changes: [string, HostChange][] = [];
  const hosts = new HostStore((id, c) => changes.push([id, c]));
  const global = new GlobalStore();
  hosts.hydrate(create(SnapshotSchema, { hosts: ids.map((id) => host(id)) }));
  changes.length = 0;
  return { hosts, global, changes };
}

describe("hostStore", () => {
  it("hydrates every host of the snapshot, sorted by name", () => {
    const { hosts } = setup(["web-2", "db-1", "web-1"]);
    assert.deepEqual(
      hosts.all().map((h) => h.id),
      ["db-1", "web-1", "web-2"],
    );
    assert.equal(hosts.get("db-1")?.metrics?.cpu, 10);
    assert.equal(hosts.get("db-1")?.updateStatus.lock.status, "outdated");
  });

  it("deep-merges metrics", () => {
    const { hosts } = setup();
    assert.ok(hosts.update("web-1", { metrics: { cpu: 93 } }));
    assert.deepEqual(hosts.get("web-1")?.metrics, { cpu: 93, ram: 20, swap: 1, load: 0.5 });
  });

  it("deep-merges the update status compartments", () => {
    const { hosts } = setup();
    hosts.update("web-1", { updateStatus: { git: { status: "outdated", message: "Behind", checkedAt: T0 } } });
    const u = hosts.get("web-1")!.updateStatus;
    assert.equal(u.git.status, "outdated");
    assert.equal(u.git.message, "Behind");
    assert.equal(u.lock.status, "outdated");
    assert.equal(u.lock.message, "flake.lock outdated");
    assert.equal(u.system.status, "ok");
  });

  it("ignores an update for an unknown host", () => {
    const { hosts, changes } = setup();
    assert.equal(hosts.update("ghost", { online: false }), false);
    assert.equal(hosts.has("ghost"), false);
    assert.deepEqual(changes, []);
  });

  it("never moves lastSeen backwards", () => {
    const { hosts } = setup();
    hosts.update("web-1", { lastSeen: T0 + 5000 });
    hosts.update("web-1", { lastSeen: T0 + 1000 });
    assert.equal(hosts.get("web-1")?.lastSeen, T0 + 5000);
  });

  it("setOffline clears the running command", () => {
    const { hosts } = setup();
    hosts.update("web-1", {
      runningCommand: {
        id: "c1", hostId: "web-1", command: "switch", state: "running", blockReason: "", message: "",
        exitCode: 0, phase: "", progressCurrent: 0, progressTotal: 0, overdue: false, bulkId: "",
      },
    });
    hosts.setOffline("web-1");
    assert.equal(hosts.get("web-1")?.online, false);
    assert.equal(hosts.get("web-1")?.runningCommand, null);
  });
});

describe("applyEvent", () => {
  it("applies a heartbeat: online, last seen, merged metrics", () => {
    const { hosts, global, changes } = setup();
    hosts.setOffline("web-1");
    const ok = applyEvent(
      ev({ case: "hostHeartbeat", value: { hostId: "web-1", lastSeen: timestampFromMs(T0 + 10_000), metrics: { cpuPercent: 81, ramPercent: 22 } } }),
      { hosts, global },
    );
    assert.ok(ok);
    const h = hosts.get("web-1")!;
    assert.equal(h.online, true);
    assert.equal(h.lastSeen, T0 + 10_000);
    assert.equal(h.metrics?.cpu, 81);
    assert.ok(changes.some(([id, c]) => id === "web-1" && c === "update"));
  });

  it("tells the listener a heartbeat is live data only, unless it brings the host back", () => {
    const { hosts, global, changes } = setup();
    const hb = ev({ case: "hostHeartbeat", value: { hostId: "web-1", lastSeen: timestampFromMs(T0 + 5000) } });
    applyEvent(hb, { hosts, global });
    hosts.setOffline("web-2");
    changes.length = 0;
    applyEvent(ev({ case: "hostHeartbeat", value: { hostId: "web-2", lastSeen: timestampFromMs(T0 + 5000) } }), { hosts, global });
    applyEvent(ev({ case: "hostHeartbeat", value: { hostId: "web-2", lastSeen: timestampFromMs(T0 + 6000) } }), { hosts, global });
    assert.deepEqual(changes, [
      ["web-2", "update"],
      ["web-2", "heartbeat"],
    ]);
  });

  it("ignores a heartbeat for an unknown host", () => {
    const { hosts, global, changes } = setup();
    const ok = applyEvent(ev({ case: "hostHeartbeat", value: { hostId: "ghost", metrics: { cpuPercent: 1 } } }), { hosts, global });
    assert.equal(ok, false);
    assert.equal(hosts.has("ghost"), false);
    assert.deepEqual(changes, []);
  });

  it("ignores malformed and unknown events without throwing", () => {
    const { hosts, global, changes } = setup();
    const before = JSON.stringify(hosts.all());
    const bad: unknown[] = [
      null,
      undefined,
      42,
      "host_heartbeat",
      {},
      { kind: null },
      { kind: { case: undefined } },
      { kind: { case: "somethingNew", value: { hostId: "web-1" } } },
      { kind: { case: "hostHeartbeat", value: {} } },
      { kind: { case: "hostHeartbeat", value: { hostId: 7 } } },
      { kind: { case: "hostHeartbeat" } },
      { kind: { case: "hostOffline", value: { hostId: "" } } },
      { kind: { case: "hostRegistered", value: { host: null } } },
      { kind: { case: "hostRegistered", value: { host: { hostId: "" } } } },
      { kind: { case: "hostStatusChanged", value: {} } },
      { kind: { case: "commandQueued", value: {} } },
      { kind: { case: "commandComplete", value: { command: undefined } } },
      { kind: { case: "commandOutput", value: { hostId: "web-1" } } },
      { kind: { case: "targetChanged", value: {} } },
      { kind: { case: "bulkProgress", value: {} } },
      { kind: { case: "snapshot", value: { hosts: "not a list" } } },
    ];
    for (const e of bad.slice(0, -1)) {
      assert.doesNotThrow(() => assert.equal(applyEvent(e, { hosts, global }), false, JSON.stringify(e)));
    }
    assert.equal(JSON.stringify(hosts.all()), before);
    assert.deepEqual(changes, []);
    // A snapshot whose hosts are not a list is treated as an empty fleet, not a crash.
    assert.doesNotThrow(() => applyEvent(bad[bad.length - 1], { hosts, global }));
  });

  it("marks a host offline", () => {
    const { hosts, global } = setup();
    assert.ok(applyEvent(ev({ case: "hostOffline", value: { hostId: "web-2", reason: "stream closed" } }), { hosts, global }));
    assert.equal(hosts.get("web-2")?.online, false);
    assert.equal(indicatorState(hosts.get("web-2")!, T0), "offline");
  });

  it("adds a new host and removes a deleted one", () => {
    const { hosts, global, changes } = setup();
    assert.ok(applyEvent(ev({ case: "hostRegistered", value: { host: host("mac-1", { hostname: "mac-1" }) } }), { hosts, global }));
    assert.ok(hosts.has("mac-1"));
    assert.deepEqual(changes.at(-1), ["mac-1", "add"]);
    assert.ok(applyEvent(ev({ case: "hostRemoved", value: { hostId: "web-1" } }), { hosts, global }));
    assert.equal(hosts.has("web-1"), false);
    assert.deepEqual(changes.at(-1), ["web-1", "remove"]);
    assert.equal(applyEvent(ev({ case: "hostRemoved", value: { hostId: "web-1" } }), { hosts, global }), false);
  });

  it("replaces the whole state on a resync snapshot", () => {
    const { hosts, global } = setup(["a", "b"]);
    hosts.update("b", { metrics: { cpu: 99 } });
    const snaps: boolean[] = [];
    const active: string[] = [];
    const sink: EventSink = {
      snapshot: (r, cmds) => {
        snaps.push(r);
        active.push(...cmds.map((c) => `${c.id} ${c.state}`));
      },
    };
    const snap = create(SnapshotSchema, {
      hosts: [host("b", { metrics: { cpuPercent: 5 } }), host("c")],
      activeCommands: [
        { commandId: "c7", hostId: "b", command: "switch", state: CommandState.RUNNING },
        { commandId: "c8", hostId: "c", command: "test", state: CommandState.SUCCEEDED },
      ],
      serverVersion: "2.0.0",
      pendingPr: { number: 42, title: "Update flake.lock", mergeable: true },
      resync: true,
    });
    assert.ok(applyEvent(ev({ case: "snapshot", value: snap }), { hosts, global, sink }));
    assert.deepEqual(hosts.all().map((h) => h.id), ["b", "c"]);
    assert.equal(hosts.get("b")?.metrics?.cpu, 5);
    assert.equal(global.state.serverVersion, "2.0.0");
    assert.equal(global.state.pendingPR?.number, 42);
    assert.deepEqual(snaps, [true]);
    assert.deepEqual(active, ["c7 running"], "the sink hears the commands not yet ended");
    assert.equal(hosts.get("b")?.runningCommand?.id, "c7");
  });

  it("tracks a command from queued to complete and passes output on", () => {
    const { hosts, global } = setup();
    const seen: string[] = [];
    const sink: EventSink = {
      commandQueued: (c) => seen.push(`queued ${c.id}`),
      commandOutput: (h, c, lines) => seen.push(`output ${h} ${c} ${lines.map((l) => l.seq).join(",")}`),
      commandComplete: (c) => seen.push(`complete ${c.id} ${c.state}`),
    };
    const cmd = { commandId: "c1", hostId: "web-1", command: "switch", state: CommandState.QUEUED };
    applyEvent(ev({ case: "commandQueued", value: { command: cmd } }), { hosts, global, sink });
    assert.equal(hosts.get("web-1")?.runningCommand?.command, "switch");
    assert.equal(indicatorState(hosts.get("web-1")!, T0), "busy");
    applyEvent(
      ev({ case: "commandOutput", value: { commandId: "c1", hostId: "web-1", lines: [{ seq: 1n, text: "building" }, { seq: 2n, text: "done" }] } }),
      { hosts, global, sink },
    );
    applyEvent(ev({ case: "commandComplete", value: { command: { ...cmd, state: CommandState.SUCCEEDED } } }), { hosts, global, sink });
    assert.equal(hosts.get("web-1")?.runningCommand, null);
    assert.deepEqual(seen, ["queued c1", "output web-1 c1 1,2", "complete c1 succeeded"]);
  });

  it("applies status changes, pending PR and target changes", () => {
    const { hosts, global } = setup();
    applyEvent(
      ev({
        case: "hostStatusChanged",
        value: { host: host("web-1", { updateStatus: { git: { status: CompartmentStatus.ERROR, message: "fetch failed" } } }) },
      }),
      { hosts, global },
    );
    assert.equal(hosts.get("web-1")?.updateStatus.git.status, "error");
    applyEvent(ev({ case: "pendingPrChanged", value: { pendingPr: { number: 7, title: "bump" } } }), { hosts, global });
    assert.equal(global.state.pendingPR?.number, 7);
    applyEvent(ev({ case: "pendingPrChanged", value: {} }), { hosts, global });
    assert.equal(global.state.pendingPR, null);
    applyEvent(ev({ case: "targetChanged", value: { target: { gitCommit: "abcdef0123", message: "fix" } } }), { hosts, global });
    assert.equal(global.state.target?.gitCommit, "abcdef0123");
  });
});

describe("derivations", () => {
  it("looks stale after 60 s without a heartbeat", () => {
    const h = hostFromProto(host("web-1"));
    assert.equal(isStale(h, T0 + 59_000), false);
    assert.equal(indicatorState(h, T0 + 59_000), "online");
    assert.equal(isStale(h, T0 + 61_000), true);
    assert.equal(indicatorState(h, T0 + 61_000), "stale");
    assert.equal(lastSeenView(h, T0 + 5_000).level, "ok");
    assert.equal(lastSeenView(h, T0 + 30_000).level, "warn");
    assert.equal(lastSeenView(h, T0 + 61_000).text, "1m ago");
    // Offline hosts are offline, not stale.
    assert.equal(isStale({ ...h, online: false }, T0 + 600_000), false);
    // A long heartbeat interval stretches the limit.
    assert.equal(isStale({ ...h, heartbeatIntervalMs: 45_000 }, T0 + 80_000), false);
  });

  it("backs off from 1 s to 30 s", () => {
    assert.equal(backoffDelay(1, 0.5), 1000);
    assert.equal(backoffDelay(2, 0.5), 2000);
    assert.equal(backoffDelay(5, 0.5), 16000);
    assert.equal(backoffDelay(6, 0.5), 30000);
    assert.equal(backoffDelay(50, 1), 30000);
    for (let i = 1; i < 10; i++) {
      for (const r of [0, 0.3, 1]) {
        const d = backoffDelay(i, r);
        assert.ok(d >= 1000 && d <= 30000, `attempt ${i}: ${d}`);
      }
    }
  });

  it("estimates server time from heartbeats", () => {
    let now = T0 + 120_000; // browser clock two minutes ahead
    const clock = new ServerClock(() => now);
    clock.observe(T0 + 10); // delayed in transit
    clock.observe(T0 + 50); // arrived at once: the best estimate
    assert.equal(clock.serverNow(), T0 + 50);
    now += 1000;
    assert.equal(clock.serverNow(), T0 + 1050);
  });
});

describe("Selection", () => {
  it("selects a range with shift and clears", () => {
    const order = ["a", "b", "c", "d", "e"];
    const s = new Selection();
    s.click("b", true, false, order);
    assert.deepEqual(s.click("d", true, true, order), ["c", "d"]);
    assert.deepEqual(s.list(order), ["b", "c", "d"]);
    s.click("c", false, false, order);
    assert.deepEqual(s.list(order), ["b", "d"]);
    assert.deepEqual(s.clear().sort(), ["b", "d"]);
    assert.equal(s.size, 0);
  });
});

describe("LogTab", () => {
  const line = (seq: number, text = `line ${seq}`): LogLine => ({ seq, stream: "stdout", text, time: null });

  it("orders and de-duplicates history and live lines", () => {
    const tab = new LogTab("web-1");
    const live = tab.add("c1", [line(3), line(4)], "switch");
    assert.deepEqual(live.appended.map((l) => l.seq), [3, 4]);
    const hist = tab.add("c1", [line(1), line(2), line(3)]);
    assert.equal(hist.reordered, true);
    assert.deepEqual(tab.sections[0]!.lines.map((l) => l.seq), [1, 2, 3, 4]);
    const dup = tab.add("c1", [line(4)]);
    assert.deepEqual(dup.appended, []);
    assert.equal(tab.lineCount(), 4);
  });

  it("reports a gap once history is loaded", () => {
    const tab = new LogTab("web-1");
    tab.historyLoaded = true;
    tab.add("c1", [line(1)]);
    assert.equal(tab.add("c1", [line(5)]).gapAfter, 1);
  });

  it("keeps at most MAX_TAB_LINES lines", () => {
    const tab = new LogTab("web-1");
    const many = Array.from({ length: MAX_TAB_LINES + 10 }, (_, i) => line(i + 1));
    tab.add("c1", many);
    assert.equal(tab.lineCount(), MAX_TAB_LINES);
    assert.equal(tab.sections[0]!.lines[0]!.seq, 11);
  });

  it("exports text with stream tags", () => {
    const tab = new LogTab("web-1");
    tab.add("c1", [{ seq: 1, stream: "stderr", text: "boom", time: Date.UTC(2026, 0, 1, 3, 4, 5) }], "test");
    assert.equal(tab.text(), "=== test c1 ===\n[03:04:05] [ERR] boom\n");
  });
});

describe("errors", () => {
  function errorInfo(reason: string): Uint8Array {
    return new BinaryWriter().tag(1, 2).string(reason).tag(2, 2).string("nixplane.dev").finish();
  }

  it("decodes the BlockReason of a refused command", () => {
    assert.equal(errorInfoReason(errorInfo("BLOCK_REASON_BUSY")), "BLOCK_REASON_BUSY");
    const err = new ConnectError("host busy", Code.FailedPrecondition);
    err.details.push({ type: "google.rpc.ErrorInfo", value: errorInfo("BLOCK_REASON_ALREADY_CURRENT") });
    assert.equal(blockReason(err), "BLOCK_REASON_ALREADY_CURRENT");
    assert.equal(describeBlock("BLOCK_REASON_ALREADY_CURRENT", "switch").canForce, true);
    assert.equal(describeBlock("BLOCK_REASON_BUSY", "switch").canForce, false);
    assert.equal(blockReason(new ConnectError("nope", Code.NotFound)), null);
    assert.equal(blockReason(new Error("network")), null);
  });
});
