import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { hostFromProto, mergeHost, type HostState } from "../src/model";
import { HEARTBEAT_RENDER_MS, newView, renderHostView, RenderScheduler, type RenderContext } from "../src/render";
import { fakeLayout, host, T0 } from "./helpers";

const HOSTILE = `</script><img src=x onerror=alert(1)>`;

function ctx(over: Partial<RenderContext> = {}): RenderContext {
  return { now: T0 + 2000, pendingPR: null, serverVersion: "1.0.0", selected: false, ...over };
}

function layout() {
  const l = fakeLayout();
  return { ...l, view: newView(l.root, l.find) };
}

describe("renderHostView", () => {
  it("writes host data as text, never as HTML", () => {
    const h = hostFromProto(
      host("web-1", {
        hostname: HOSTILE,
        osVersion: `NixOS <b onmouseover=alert(2)>`,
        generationMessage: `<img src=x onerror=alert(3)>`,
        themeColor: `red;background:url(javascript:alert(4))`,
        updateStatus: { git: { status: 3, message: `Behind: <script>alert(5)</script>` } },
      }),
    );
    const { view, els, root } = layout();
    renderHostView(view, h, ctx());
    assert.equal(els.get('[data-field="name"]')!.textContent, HOSTILE);
    assert.match(els.get('[data-field="name"]')!.title, /NixOS <b onmouseover=alert\(2\)>/);
    assert.match(els.get('[data-field="generation"]')!.title, /<img src=x onerror=alert\(3\)>/);
    assert.match(els.get('[data-compartment="git"]')!.title, /<script>alert\(5\)<\/script>/);
    // An invalid theme colour is not passed to CSS at all.
    assert.equal(root.props.has("--host-color"), false);
  });

  it("renders metrics, high marks, compartments and the PR dot", () => {
    const h = mergeHost(hostFromProto(host("web-1")), { metrics: { cpu: 80, ram: 79.4 } });
    const { view, els, root } = layout();
    renderHostView(view, h, ctx({ pendingPR: { number: 12, title: "Update flake.lock", url: "", mergeable: true } }));
    assert.equal(els.get('[data-field="cpu-val"]')!.textContent, "80%");
    assert.ok(els.get('[data-field="cpu"]')!.classes.has("metric-high"));
    assert.equal(els.get('[data-field="ram-val"]')!.textContent, "79%");
    assert.ok(!els.get('[data-field="ram"]')!.classes.has("metric-high"));
    assert.equal(els.get('[data-compartment="lock"]')!.dataset.status, "outdated");
    assert.ok(els.get('[data-compartment="lock"]')!.classes.has("has-pr"));
    assert.match(els.get('[data-compartment="lock"]')!.title, /Pending PR #12/);
    assert.equal(els.get('[data-field="generation"]')!.textContent, "0123456");
    assert.equal(root.props.get("--host-color"), "#7aa2f7");
    assert.equal(root.dataset.state, "online");
  });

  it("shows offline, stale and busy states", () => {
    const base = hostFromProto(host("web-1"));
    const { view, root, els } = layout();
    renderHostView(view, base, ctx({ now: T0 + 61_000 }));
    assert.equal(root.dataset.state, "stale");
    assert.ok(root.classes.has("host-stale"));
    assert.equal(els.get('[data-field="last-seen"]')!.dataset.level, "stale");
    renderHostView(view, { ...base, online: false }, ctx({ now: T0 + 61_000 }));
    assert.equal(root.dataset.state, "offline");
    assert.ok(root.classes.has("host-offline"));
    assert.ok(!root.classes.has("host-stale"));
    const busy: HostState = mergeHost(base, {
      runningCommand: {
        id: "c1", hostId: "web-1", command: "switch", state: "running", blockReason: "", message: "",
        exitCode: 0, phase: "building", progressCurrent: 3, progressTotal: 10, overdue: false, bulkId: "",
      },
    });
    renderHostView(view, busy, ctx());
    assert.equal(root.dataset.state, "busy");
    assert.equal(els.get('[data-field="badge"]')!.textContent, "switch 3/10");
  });

  it("skips writes that change nothing and restarts the ripple on a heartbeat", () => {
    const h = hostFromProto(host("web-1"));
    const { view, els } = layout();
    renderHostView(view, h, ctx());
    const name = els.get('[data-field="name"]')!;
    const status = els.get('[data-field="status"]')!;
    const writes = name.textWrites;
    renderHostView(view, h, ctx());
    assert.equal(name.textWrites, writes);
    assert.equal(status.classes.has("beat-a") || status.classes.has("beat-b"), false);
    renderHostView(view, mergeHost(h, { lastSeen: T0 + 5000, metrics: { cpu: 50 } }), ctx({ now: T0 + 5000 }));
    assert.ok(status.classes.has("beat-a"));
    renderHostView(view, mergeHost(h, { lastSeen: T0 + 10_000 }), ctx({ now: T0 + 10_000 }));
    assert.ok(status.classes.has("beat-b") && !status.classes.has("beat-a"));
    assert.equal(name.textWrites, writes);
  });

  it("renders the row and the card alike", () => {
    const h = hostFromProto(host("web-1", { agentVersion: "0.9.0", agentOutdated: true }));
    const row = layout();
    const card = layout();
    for (const v of [row.view, card.view]) renderHostView(v, h, ctx({ selected: true }));
    for (const l of [row, card]) {
      assert.equal(l.els.get('[data-field="agent"]')!.textContent, "0.9.0");
      assert.ok(l.els.get('[data-field="agent"]')!.classes.has("outdated"));
      assert.ok(l.root.classes.has("selected"));
      assert.equal(l.els.get('[data-field="select"]')!.checked, true);
    }
  });
});

describe("RenderScheduler", () => {
  it("coalesces renders into one pass per frame", () => {
    const frames: (() => void)[] = [];
    const passes: { ids: string[]; all: boolean }[] = [];
    let globals = 0;
    const s = new RenderScheduler(
      (cb) => frames.push(cb),
      (ids, all) => passes.push({ ids: [...ids], all }),
      () => globals++,
    );
    for (let i = 0; i < 50; i++) s.host("web-1");
    s.host("web-2");
    s.global();
    assert.equal(frames.length, 1);
    frames.shift()!();
    assert.deepEqual(passes, [{ ids: ["web-1", "web-2"], all: false }]);
    assert.equal(globals, 1);
    s.all();
    frames.shift()!();
    assert.deepEqual(passes[1], { ids: [], all: true });
    assert.equal(frames.length, 0);
  });

  it("draws heartbeats at most every HEARTBEAT_RENDER_MS, other changes in the next frame", () => {
    const frames: (() => void)[] = [];
    const timers: { cb: () => void; ms: number }[] = [];
    const passes: string[][] = [];
    let now = 1000;
    const s = new RenderScheduler(
      (cb) => frames.push(cb),
      (ids) => passes.push([...ids]),
      () => {},
      (cb, ms) => timers.push({ cb, ms }),
      () => now,
    );
    // The first heartbeat after a quiet time is drawn in the next frame.
    s.heartbeat("a");
    assert.equal(frames.length, 1);
    frames.shift()!();
    assert.deepEqual(passes, [["a"]]);
    // Heartbeats right after a pass wait for the throttle, coalesced.
    now += 16;
    s.heartbeat("b");
    s.heartbeat("c");
    s.heartbeat("b");
    assert.equal(frames.length, 0, "no frame before the throttle ends");
    assert.equal(timers.length, 1);
    assert.equal(timers[0]!.ms, HEARTBEAT_RENDER_MS - 16);
    now += HEARTBEAT_RENDER_MS;
    timers.shift()!.cb();
    assert.equal(frames.length, 1);
    frames.shift()!();
    assert.deepEqual(passes[1], ["b", "c"]);
    // A state change is not held back, and takes waiting heartbeats along.
    now += 10;
    s.heartbeat("d");
    s.host("e");
    assert.equal(frames.length, 1);
    frames.shift()!();
    assert.deepEqual(passes[2], ["d", "e"]);
    // The timer set for "d" finds nothing left to draw.
    timers.shift()?.cb();
    assert.equal(frames.length, 0);
  });
});
