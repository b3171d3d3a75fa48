import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { advances, CommandTracker } from "../src/commands";
import { LogTab } from "../src/logs";
import type { CommandInfo, CommandStateName } from "../src/model";

function cmd(id: string, state: CommandStateName, over: Partial<CommandInfo> = {}): CommandInfo {
  return {
    id,
    hostId: "web-1",
    command: "test",
    state,
    blockReason: "",
    message: "",
    exitCode: 0,
    phase: "",
    progressCurrent: 0,
    progressTotal: 0,
    overdue: false,
    bulkId: "",
    ...over,
  };
}

describe("CommandTracker", () => {
  it("never moves a command back from its end", () => {
    const t = new CommandTracker();
    t.seen(cmd("c1", "queued"));
    t.seen(cmd("c1", "running"));
    t.seen(cmd("c1", "succeeded"));
    assert.equal(t.seen(cmd("c1", "running")).state, "succeeded");
    assert.equal(t.seen(cmd("c1", "queued")).state, "succeeded");
    assert.equal(t.get("c1")?.state, "succeeded");
    // Progress news within the same stage is taken.
    t.seen(cmd("c2", "running", { progressCurrent: 1 }));
    assert.equal(t.seen(cmd("c2", "running", { progressCurrent: 2 })).progressCurrent, 2);
  });

  it("reports an own command's end once when the end comes after the answer", () => {
    const t = new CommandTracker();
    t.seen(cmd("c1", "queued"));
    t.claim(cmd("c1", "queued"));
    assert.deepEqual(t.pending(), ["c1"]);
    assert.equal(t.ended(cmd("c1", "succeeded")), true);
    assert.equal(t.ended(cmd("c1", "succeeded")), false);
    assert.deepEqual(t.pending(), []);
  });

  it("reports an own command's end once when the end came before the answer", () => {
    const t = new CommandTracker();
    // The watch stream delivered the whole run before RunCommand answered.
    t.seen(cmd("c1", "queued"));
    t.seen(cmd("c1", "running"));
    assert.equal(t.ended(cmd("c1", "succeeded")), false, "not claimed yet: nothing to report");
    t.claim(cmd("c1", "running"));
    const latest = t.get("c1");
    assert.equal(latest?.state, "succeeded", "the answer's older state does not win");
    assert.equal(t.ended(latest!), true);
    assert.equal(t.ended(latest!), false);
  });

  it("does not report commands other pages started", () => {
    const t = new CommandTracker();
    assert.equal(t.ended(cmd("c9", "failed")), false);
  });

  it("forgets the oldest commands beyond its limit", () => {
    const t = new CommandTracker(3);
    for (const id of ["a", "b", "c", "d"]) t.claim(cmd(id, "running"));
    assert.equal(t.get("a"), undefined);
    assert.deepEqual(t.pending(), ["b", "c", "d"]);
  });

  it("orders states along a run", () => {
    assert.ok(advances("", "queued"));
    assert.ok(advances("queued", "running"));
    assert.ok(advances("running", "failed"));
    assert.ok(!advances("running", "queued"));
    assert.ok(!advances("succeeded", "running"));
    assert.ok(!advances("succeeded", "failed"), "one end does not replace another");
  });
});

describe("LogTab.setState", () => {
  it("creates the section, names it and keeps its end", () => {
    const tab = new LogTab("web-1");
    assert.equal(tab.setState("c1", "running", "test"), true, "a new section changes the tab");
    assert.equal(tab.setState("c1", "running", "test"), false, "nothing new");
    assert.equal(tab.setState("c1", "succeeded"), true);
    assert.equal(tab.setState("c1", "running"), false, "an older answer after the end");
    assert.equal(tab.sections[0]?.state, "succeeded");
    assert.equal(tab.sections[0]?.command, "test");
    assert.equal(tab.setState("c2", "", ""), true);
    assert.equal(tab.setState("c2", "", "switch"), true, "the name arriving changes the header");
  });
});
