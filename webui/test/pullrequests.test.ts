import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { create, fromJson, type JsonValue } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { BulkCommandSchema, BulkState, SnapshotSchema } from "../src/gen/nixplane/fleet/v1/fleet_pb";
import { CommandState } from "../src/gen/nixplane/types/v1/types_pb";
import { BulkRuns } from "../src/commands";
import { activeBulksOf, applyEvent, bulkFromProto, bulkLabel, bulkProgressText, type BulkInfo, type EventSink } from "../src/events";
import type { CommandInfo } from "../src/model";
import { compartmentTooltip, oneLine, pullRequestsStatus, PR_ERROR_INLINE } from "../src/model";
import { newView, renderBulkProgress, renderHostView, renderPullRequests } from "../src/render";
import { GlobalStore, HostStore } from "../src/store";
import { ev, FakeEl, fakeLayout, host, T0 } from "./helpers";

const MIN = 60_000;
const PR = { number: 42, title: "flake.lock: update", url: "https://github.example/o/r/pull/42", mergeable: true };
const HOSTILE = "<img src=x onerror=alert(1)>";

function stores(configured = true) {
  const hosts = new HostStore();
  const global = new GlobalStore();
  applyEvent(ev({ case: "snapshot", value: { hosts: [host("web-1")], pullRequestsConfigured: configured, pendingPr: PR, pullRequestsCheckedAt: timestampFromMs(T0) } }), {
    hosts,
    global,
  });
  return { hosts, global };
}

function prChanged(value: Record<string, unknown>) {
  return { kind: { case: "pendingPrChanged", value } };
}

function els() {
  return { status: new FakeEl(), statusError: new FakeEl(), statusSince: new FakeEl(), merge: new FakeEl(), mergeSep: new FakeEl(), mergeNumber: new FakeEl() };
}

describe("pull-request poll health", () => {
  it("takes the error and last success from the snapshot", () => {
    const global = new GlobalStore();
    global.hydrate(
      create(SnapshotSchema, {
        pullRequestsConfigured: true,
        pullRequestsError: "  GitHub answered 401 Bad credentials\n",
        pullRequestsCheckedAt: timestampFromMs(T0 - 5 * MIN),
      }),
    );
    assert.equal(global.state.pullRequestsError, "GitHub answered 401 Bad credentials");
    assert.equal(global.state.pullRequestsCheckedAt, T0 - 5 * MIN);
    const st = pullRequestsStatus(global.pullRequests(), T0);
    assert.equal(st.hidden, false);
    assert.equal(st.text, "Pull requests: GitHub answered 401 Bad credentials · last success 5m ago");
    assert.match(st.title, /Last success: 2026-11-22T11:55:00.000Z \(5m ago\)/);
    assert.match(st.title, /No pull request was pending/);
  });

  it("sets the error from an event, keeps the last known PR, and a later success clears it", () => {
    const s = stores();
    assert.ok(applyEvent(ev({ case: "pendingPrChanged", value: { pullRequestsError: "GitHub answered 502", pullRequestsCheckedAt: timestampFromMs(T0) } }), s));
    const g = s.global.state;
    assert.equal(g.pullRequestsError, "GitHub answered 502");
    assert.deepEqual(g.pendingPR, PR, "the last known PR stays while looking fails");
    assert.equal(g.pullRequestsCheckedAt, T0);
    const st = pullRequestsStatus(s.global.pullRequests(), T0 + 3 * MIN);
    assert.equal(st.text, "Pull requests: GitHub answered 502 · last success 3m ago");
    assert.match(st.title, /Last known pull request: #42 flake\.lock: update/);

    // Looking works again: the error goes, and so does the PR it no longer lists.
    applyEvent(ev({ case: "pendingPrChanged", value: { pullRequestsCheckedAt: timestampFromMs(T0 + 4 * MIN) } }), s);
    assert.equal(g.pullRequestsError, "");
    assert.equal(g.pendingPR, null);
    assert.equal(g.pullRequestsCheckedAt, T0 + 4 * MIN);
    assert.equal(pullRequestsStatus(s.global.pullRequests(), T0 + 4 * MIN).hidden, true);

    // A refresh answer carries no poll health: the error it cannot see stays.
    applyEvent(ev({ case: "pendingPrChanged", value: { pullRequestsError: "timeout" } }), s);
    s.global.notePullRequests({ pendingPr: create(SnapshotSchema, { pendingPr: { number: 7, title: "t" } }).pendingPr });
    assert.equal(g.pullRequestsError, "timeout");
    assert.equal(s.global.state.pendingPR?.number, 7);
    s.global.notePullRequests({});
    assert.equal(s.global.state.pendingPR?.number, 7, "a refresh without a PR keeps the last known one while looking fails");
  });

  it("ignores malformed and absent fields", () => {
    const s = stores();
    applyEvent(ev({ case: "pendingPrChanged", value: { pendingPr: PR, pullRequestsError: "rate limited", pullRequestsCheckedAt: timestampFromMs(T0 + MIN) } }), s);
    const g = s.global.state;
    const cases = [
      { pullRequestsError: 42, pullRequestsCheckedAt: "yesterday", pendingPr: PR },
      { pullRequestsError: { text: "x" }, pullRequestsCheckedAt: { seconds: "soon", nanos: 0 }, pendingPr: PR },
      { pullRequestsError: null, pullRequestsCheckedAt: timestampFromMs(T0 - MIN), pendingPr: PR },
      { pullRequestsError: undefined, pullRequestsCheckedAt: null, pendingPr: PR },
    ];
    cases.forEach((value, i) => {
      assert.ok(applyEvent(prChanged(value), s), `case ${i}`);
      assert.equal(g.pullRequestsError, "rate limited", `case ${i}`);
      assert.equal(g.pullRequestsCheckedAt, T0 + MIN, `case ${i}: the last success neither breaks nor moves back`);
      assert.deepEqual(g.pendingPR, PR, `case ${i}`);
    });
    // A PR with number 0 or a broken shape is no PR; the last known one stays while looking fails.
    assert.ok(applyEvent(prChanged({ pendingPr: { number: 0 }, pullRequestsError: "rate limited" }), s));
    assert.deepEqual(g.pendingPR, PR);
    // Events that are not objects are dropped without touching the state.
    assert.equal(applyEvent(prChanged(null as unknown as Record<string, unknown>), s), false);
    assert.equal(g.pullRequestsError, "rate limited");
  });

  it("shows nothing when pull requests are not configured", () => {
    const s = stores(false);
    applyEvent(ev({ case: "pendingPrChanged", value: { pendingPr: PR, pullRequestsError: "boom" } }), s);
    assert.equal(pullRequestsStatus(s.global.pullRequests(), T0).hidden, true);
    const e = els();
    renderPullRequests(e, s.global.pullRequests(), T0);
    assert.equal(e.status.hidden, true);
    assert.equal(e.merge.hidden, true);
    assert.equal(e.mergeSep.hidden, true);
    assert.equal(e.statusError.textContent, "");
    assert.equal(e.statusSince.textContent, "");
  });
});

describe("renderPullRequests", () => {
  it("writes the error as text with a tooltip, keeps the merge entry for the last known PR, and clears on success", () => {
    const e = els();
    const poll = { configured: true, error: `GitHub answered 401 ${HOSTILE}`, checkedAt: T0 - 5 * MIN, pendingPR: PR };
    renderPullRequests(e, poll, T0);
    assert.equal(e.status.hidden, false);
    assert.equal(e.status.dataset.kind, "error");
    assert.equal(e.statusError.textContent, `Pull requests: GitHub answered 401 ${HOSTILE}`);
    assert.equal(e.statusSince.textContent, " · last success 5m ago");
    assert.match(e.status.title, /^Looking for pull requests failed:\nGitHub answered 401 <img/);
    assert.equal(e.merge.hidden, false);
    assert.equal(e.mergeNumber.textContent, "42");
    assert.match(e.merge.title, /^flake\.lock: update\nLast known pull request: looking for pull requests fails/);

    const writes = e.statusError.textWrites + e.statusSince.textWrites;
    renderPullRequests(e, poll, T0);
    assert.equal(e.statusError.textWrites + e.statusSince.textWrites, writes, "an unchanged line is not rewritten");
    renderPullRequests(e, poll, T0 + 2 * MIN);
    assert.equal(e.statusSince.textContent, " · last success 7m ago", "the age ticks");

    renderPullRequests(e, { ...poll, error: "", checkedAt: T0 }, T0);
    assert.equal(e.status.hidden, true);
    assert.equal(e.statusError.textContent, "");
    assert.equal(e.statusSince.textContent, "");
    assert.equal(e.status.title, "");
    assert.equal(e.merge.title, PR.title);

    renderPullRequests(e, { ...poll, error: "", pendingPR: { ...PR, mergeable: false } }, T0);
    assert.equal(e.merge.disabled, true);
    renderPullRequests(e, { ...poll, error: "", pendingPR: null }, T0);
    assert.equal(e.merge.hidden, true);
    assert.equal(e.mergeSep.hidden, true);
  });

  it("shortens a long or multi-line error inline, whole in the tooltip", () => {
    const long = `line one\n\tline two\u0000${"x".repeat(400)}`;
    const st = pullRequestsStatus({ configured: true, error: long, checkedAt: null, pendingPR: null }, T0);
    assert.ok(st.text.startsWith("Pull requests: line one line two xxx"));
    assert.ok(st.text.endsWith("… · no success yet"), st.text);
    assert.ok(st.title.includes(long));
    assert.equal(Array.from(oneLine("é".repeat(300), PR_ERROR_INLINE)).length, PR_ERROR_INLINE);
    assert.equal(oneLine("abc def", 5), "abc…");
    assert.equal(oneLine(" a\r\n b ", 10), "a b");
  });

  it("the Lock compartment keeps the last known PR in its dot and tooltip", () => {
    const l = fakeLayout();
    const view = newView(l.root, l.find);
    const s = stores();
    const state = s.hosts.get("web-1")!;
    renderHostView(view, state, { now: T0, pendingPR: PR, prUnchecked: true, serverVersion: "1", selected: false });
    const lock = l.els.get('[data-compartment="lock"]')!;
    assert.ok(lock.classes.has("has-pr"));
    assert.match(lock.title, /Pending PR #42: flake\.lock: update\n\(last known: pull requests cannot be checked now\)$/);
    renderHostView(view, state, { now: T0, pendingPR: PR, prUnchecked: false, serverVersion: "1", selected: false });
    assert.match(lock.title, /Pending PR #42: flake\.lock: update$/);
    assert.doesNotMatch(compartmentTooltip("git", state.updateStatus.git, T0, PR, true), /PR/);
  });
});

describe("merge-and-deploy runs", () => {
  function bulk(over: Partial<BulkInfo> = {}): BulkInfo {
    return { id: "b1", command: "merge-and-deploy", state: "running", done: 1, total: 4, message: "", prNumber: 42, commit: "0123456789abcdef", ...over };
  }

  it("name the PR and the short commit", () => {
    const b = bulkFromProto(
      create(BulkCommandSchema, {
        bulkId: "b1",
        command: "merge-and-deploy",
        state: BulkState.RUNNING,
        prNumber: 42,
        commit: "0123456789abcdef0123456789abcdef01234567",
        results: [
          { hostId: "a", command: { commandId: "c1", hostId: "a", command: "pull-switch", state: CommandState.SUCCEEDED } },
          { hostId: "b", command: { commandId: "c2", hostId: "b", command: "pull-switch", state: CommandState.RUNNING } },
          { hostId: "c" },
        ],
      }),
    );
    assert.equal(b.prNumber, 42);
    assert.equal(bulkLabel(b), "Merge & Deploy PR #42 (0123456)");
    assert.equal(bulkProgressText(b), "Merge & Deploy PR #42 (0123456): 1/3 hosts");
    assert.equal(bulkProgressText({ ...b, state: "partial", done: 3, message: "1 host failed" }), "Merge & Deploy PR #42 (0123456) on 3 hosts: partial — 1 host failed");
    assert.equal(bulkLabel({ command: "merge-and-deploy", prNumber: 0, commit: "" }), "Merge & Deploy");
    assert.equal(bulkLabel({ command: "switch", prNumber: 0, commit: "" }), "switch");
    assert.equal(bulkProgressText({ ...b, total: 0, done: 0 }), "Merge & Deploy PR #42 (0123456)…");
  });

  it("ignore a malformed PR number or commit", () => {
    const raw = { bulkId: "b1", command: "merge-and-deploy", state: BulkState.RUNNING, prNumber: -3, commit: 7, results: [], message: "" };
    const b = bulkFromProto(raw as never);
    assert.equal(b.prNumber, 0);
    assert.equal(b.commit, "");
    assert.equal(bulkLabel(b), "Merge & Deploy");
  });

  it("show while running, keep progress and the PR, and never come back once ended", () => {
    const runs = new BulkRuns();
    assert.equal(runs.seen(bulk({ done: 2 }))?.done, 2);
    assert.equal(runs.seen(bulk({ done: 1 }))?.done, 2, "older progress does not win");
    runs.seen(bulk({ done: 3, prNumber: 0, commit: "" }));
    assert.equal(runs.running()[0]?.prNumber, 42);
    runs.seen(bulk({ id: "b2", command: "switch", prNumber: 0, commit: "" }));
    const e = new FakeEl();
    renderBulkProgress(e, runs.running());
    assert.equal(e.hidden, false);
    assert.equal(e.textContent, "Merge & Deploy PR #42 (0123456): 3/4 hosts · switch: 1/4 hosts");
    const end = runs.seen(bulk({ state: "succeeded", done: 4, prNumber: 0, commit: "" }));
    assert.equal(end?.prNumber, 42);
    assert.equal(runs.seen(bulk({ done: 4 })).state, "succeeded", "an ended run stays ended");
    assert.equal(runs.running().length, 1);
    runs.forget("b2");
    renderBulkProgress(e, runs.running());
    assert.equal(e.hidden, true);
    assert.equal(e.textContent, "");
  });

  /** deploy is a running merge-and-deploy of PR #42 on two hosts, one of them deployed. */
  const deploy = {
    bulkId: "bulk-7",
    command: "merge-and-deploy",
    state: BulkState.RUNNING,
    prNumber: 42,
    commit: "abcdef0123456789abcdef0123456789abcdef01",
    results: [
      { hostId: "web-1", command: { commandId: "c1", hostId: "web-1", command: "pull-switch", state: CommandState.SUCCEEDED } },
      { hostId: "web-2", command: { commandId: "c2", hostId: "web-2", command: "pull-switch", state: CommandState.RUNNING } },
    ],
  };

  it("show on first paint from the page's snapshot", () => {
    // The page's snapshot is protojson, read as the page reads it.
    const json: JsonValue = {
      hosts: [{ hostId: "web-1" }],
      activeBulks: [
        {
          bulkId: "bulk-7",
          command: "merge-and-deploy",
          state: "BULK_STATE_RUNNING",
          prNumber: 42,
          commit: "abcdef0123456789abcdef0123456789abcdef01",
          results: [
            { hostId: "web-1", command: { commandId: "c1", hostId: "web-1", command: "pull-switch", state: "COMMAND_STATE_SUCCEEDED" } },
            { hostId: "web-2", command: { commandId: "c2", hostId: "web-2", command: "pull-switch", state: "COMMAND_STATE_RUNNING" } },
          ],
        },
        { bulkId: "", command: "switch", state: "BULK_STATE_RUNNING" },
      ],
    };
    const snap = fromJson(SnapshotSchema, json, { ignoreUnknownFields: true });
    const runs = new BulkRuns();
    assert.deepEqual(runs.sync(activeBulksOf(snap)), []);
    const e = new FakeEl();
    e.hidden = true;
    renderBulkProgress(e, runs.running());
    assert.equal(e.hidden, false);
    assert.equal(e.textContent, "Merge & Deploy PR #42 (abcdef0): 1/2 hosts", "a run without an id is left out");
    assert.deepEqual(activeBulksOf(create(SnapshotSchema, {})), []);
    assert.deepEqual(activeBulksOf({ activeBulks: "nope" as never }), []);
  });

  it("come from stream snapshots as from progress events, and hide when a resync no longer lists them", () => {
    const hosts = new HostStore();
    const global = new GlobalStore();
    const runs = new BulkRuns();
    const snapshots: { resync: boolean; bulks: BulkInfo[] }[] = [];
    const sink: EventSink = {
      snapshot(resync: boolean, _active: CommandInfo[], bulks: BulkInfo[]) {
        snapshots.push({ resync, bulks });
        runs.sync(bulks);
      },
      bulkProgress(b: BulkInfo) {
        runs.seen(b);
      },
    };
    const s = { hosts, global, sink };
    assert.ok(applyEvent(ev({ case: "snapshot", value: { hosts: [host("web-1"), host("web-2")], activeBulks: [deploy] } }), s));
    assert.equal(snapshots.length, 1);
    assert.deepEqual(snapshots[0]?.bulks, [bulkFromProto(create(BulkCommandSchema, deploy))], "the same conversion as a progress event's");
    const e = new FakeEl();
    renderBulkProgress(e, runs.running());
    assert.equal(e.textContent, "Merge & Deploy PR #42 (abcdef0): 1/2 hosts");

    // Another run starts; a resync snapshot still lists both, the deploy
    // with older progress than its latest event: the later progress stays.
    const done = { ...deploy, results: deploy.results.map((r) => ({ ...r, command: { ...r.command, state: CommandState.SUCCEEDED } })) };
    assert.ok(applyEvent(ev({ case: "bulkProgress", value: { bulk: done } }), s));
    assert.ok(applyEvent(ev({ case: "bulkProgress", value: { bulk: { bulkId: "bulk-8", command: "switch", state: BulkState.RUNNING, results: [{ hostId: "web-1" }] } } }), s));
    applyEvent(ev({ case: "snapshot", value: { resync: true, hosts: [host("web-1")], activeBulks: [deploy, { bulkId: "bulk-8", command: "switch", state: BulkState.RUNNING, results: [{ hostId: "web-1" }] }] } }), s);
    renderBulkProgress(e, runs.running());
    assert.equal(e.textContent, "Merge & Deploy PR #42 (abcdef0): 2/2 hosts · switch: 0/1 hosts");

    // The deploy ended while the page was behind: the resync snapshot no
    // longer lists it, so it is hidden and handed back.
    applyEvent(ev({ case: "snapshot", value: { resync: true, hosts: [host("web-1")], activeBulks: [{ bulkId: "bulk-8", command: "switch", state: BulkState.RUNNING, results: [{ hostId: "web-1" }] }] } }), s);
    assert.equal(snapshots.at(-1)?.resync, true);
    renderBulkProgress(e, runs.running());
    assert.equal(e.textContent, "switch: 0/1 hosts");
    const dropped = runs.sync([]);
    assert.deepEqual(dropped.map((b) => b.id), ["bulk-8"]);
    renderBulkProgress(e, runs.running());
    assert.equal(e.hidden, true);
    // A late progress event of a dropped run that is still running brings it back.
    runs.seen(bulkFromProto(create(BulkCommandSchema, deploy)));
    assert.equal(runs.running().length, 1);
  });
});
