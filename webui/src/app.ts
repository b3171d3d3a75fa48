// The dashboard: hydrates hostStore from the server-rendered page, opens one
// WatchFleet stream over grpc-web and routes every event through the store;
// renderHost draws each changed host once per animation frame.

import { create, fromJson } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { FleetService, SnapshotSchema, type Snapshot } from "./gen/nixplane/fleet/v1/fleet_pb";
import { Account } from "./account";
import { BulkRuns, CommandTracker } from "./commands";
import { blockReason, describeBlock, errorText } from "./errors";
import { activeBulksOf, applyEvent, bulkFromProto, bulkProgressText, type BulkInfo } from "./events";
import { LogPanel } from "./logview";
import {
  backoffDelay,
  commandFromProto,
  formatAge,
  formatDuration,
  hostPatchFromProto,
  isBusy,
  isTerminal,
  lineFromProto,
  shortHash,
  type CommandInfo,
  type CompartmentName,
  type HostPatch,
} from "./model";
import {
  newView,
  renderBulkProgress,
  renderHostView,
  renderPullRequests,
  RenderScheduler,
  setOnScreen,
  type HostView,
} from "./render";
import { Selection } from "./selection";
import { GlobalStore, HostStore, ServerClock } from "./store";
import { blockedDialog, confirmDialog, openMenu, showToast } from "./ui";

// ─── constants and client ────────────────────────────────────────────────

const CSRF_TOKEN = document.querySelector<HTMLMetaElement>('meta[name="csrf-token"]')?.content ?? "";
/** Commands whose output is worth opening the log panel for. */
const LOGGED_COMMANDS = new Set(["pull", "switch", "test", "pull-switch", "rollback", "do-all"]);

const csrfInterceptor: Interceptor = (next) => (req) => {
  req.header.set("x-csrf-token", CSRF_TOKEN);
  return next(req);
};
const transport = createGrpcWebTransport({ baseUrl: location.origin, interceptors: [csrfInterceptor] });
const client = createClient(FleetService, transport);

function el<T extends HTMLElement = HTMLElement>(id: string): T {
  const e = document.getElementById(id);
  if (!e) throw new Error(`page element #${id} missing`);
  return e as T;
}

const rowsEl = el("host-rows");
const cardsEl = el("host-cards");

// ─── state ───────────────────────────────────────────────────────────────

const clock = new ServerClock();
const selection = new Selection();
/** Cached elements per host: [table row, card]. */
const views = new Map<string, HostView[]>();
let orderDirty = false;

const scheduler = new RenderScheduler(
  (cb) => requestAnimationFrame(cb),
  (ids, all) => flushHosts(ids, all),
  () => renderGlobal(),
);

/** hostStore is the single source of truth for host state. */
export const hostStore = new HostStore((id, change) => {
  if (change === "heartbeat") {
    // Live data only: nothing page-wide changes (the online count does not).
    scheduler.heartbeat(id);
    return;
  }
  if (change === "add") createViews(id);
  if (change === "remove") removeViews(id);
  scheduler.host(id);
  scheduler.global();
});

/** globalState holds the pending PR, fleet target and connection state. */
export const globalState = new GlobalStore(() => {
  scheduler.global();
  scheduler.all();
});

const logs = new LogPanel(
  (id) => hostStore.get(id)?.hostname ?? id,
  (id) => {
    const h = hostStore.get(id);
    return !h ? "gone" : isBusy(h) ? "busy" : h.online ? "online" : "offline";
  },
);
/** Recent commands' latest states; commands started from this page get a toast at their end. */
const commands = new CommandTracker();
/** Bulk runs started from this page: their end gets a toast. */
const ownBulks = new Set<string>();
/** Bulk runs not yet ended, shown next to Bulk Actions. */
const bulks = new BulkRuns();

// ─── rendering ───────────────────────────────────────────────────────────

function viewOf(root: HTMLElement): HostView {
  return newView(root, (sel) => root.querySelector<HTMLElement>(sel));
}

function cloneTemplate(id: string): HTMLElement {
  const tpl = el<HTMLTemplateElement>(id);
  const first = tpl.content.firstElementChild;
  if (!first) throw new Error(`template #${id} is empty`);
  return first.cloneNode(true) as HTMLElement;
}

/**
 * Which host views are on screen (with a margin). Time-driven redraws (the
 * once-a-second ages and stale looks) and the ripple only touch those; a
 * view coming into sight is redrawn at once. Changes from events are drawn
 * everywhere.
 */
const viewByRoot = new Map<Element, [string, HostView]>();
const onScreen = new Map<string, number>();
const sight = new IntersectionObserver(
  (entries) => {
    for (const e of entries) {
      const found = viewByRoot.get(e.target);
      if (!found) continue;
      const [id, v] = found;
      if (v.onScreen === e.isIntersecting) continue;
      setOnScreen(v, e.isIntersecting);
      const n = (onScreen.get(id) ?? 0) + (e.isIntersecting ? 1 : -1);
      if (n > 0) onScreen.set(id, n);
      else onScreen.delete(id);
      if (e.isIntersecting) scheduler.host(id);
    }
  },
  { rootMargin: "200px 0px" },
);

function watchViews(id: string, vs: HostView[]): void {
  for (const v of vs) {
    // Until the observer's first report, a view counts as off screen.
    setOnScreen(v, false);
    const root = v.root as unknown as HTMLElement;
    viewByRoot.set(root, [id, v]);
    sight.observe(root);
  }
}

function createViews(id: string): void {
  if (views.has(id)) return;
  const row = cloneTemplate("tpl-host-row");
  const card = cloneTemplate("tpl-host-card");
  row.dataset.hostId = id;
  card.dataset.hostId = id;
  const vs = [viewOf(row), viewOf(card)];
  views.set(id, vs);
  watchViews(id, vs);
  orderDirty = true;
}

function removeViews(id: string): void {
  for (const v of views.get(id) ?? []) {
    const root = v.root as unknown as HTMLElement;
    sight.unobserve(root);
    viewByRoot.delete(root);
    root.remove();
  }
  views.delete(id);
  onScreen.delete(id);
  selection.forget(id);
}

/** renderHost writes one host into its table row and its card. */
export function renderHost(id: string): void {
  const h = hostStore.get(id);
  const vs = views.get(id);
  if (!h || !vs) return;
  const g = globalState.state;
  const ctx = {
    now: clock.serverNow(),
    pendingPR: g.pullRequestsConfigured ? g.pendingPR : null,
    prUnchecked: g.pullRequestsError !== "",
    serverVersion: globalState.state.serverVersion,
    selected: selection.has(id),
  };
  for (const v of vs) renderHostView(v, h, ctx);
}

function flushHosts(ids: Iterable<string>, all: boolean): void {
  if (orderDirty) {
    orderDirty = false;
    const rows = document.createDocumentFragment();
    const cards = document.createDocumentFragment();
    for (const h of hostStore.all()) {
      const [row, card] = views.get(h.id) ?? [];
      if (row) rows.appendChild(row.root as unknown as HTMLElement);
      if (card) cards.appendChild(card.root as unknown as HTMLElement);
    }
    rowsEl.appendChild(rows);
    cardsEl.appendChild(cards);
  }
  if (all) {
    for (const id of views.keys()) renderHost(id);
  } else {
    for (const id of ids) renderHost(id);
  }
}

function setText(id: string, text: string): void {
  const e = el(id);
  if (e.textContent !== text) e.textContent = text;
}

function renderGlobal(): void {
  const g = globalState.state;
  const now = clock.serverNow();
  const t = g.target;
  setText("target-commit", t?.gitCommit ? shortHash(t.gitCommit) : "unknown");
  setText("target-message", t?.message ?? "");
  setText("target-age", t?.committedAt ? formatAge(t.committedAt, now) : "");
  const err = el("target-error");
  setText("target-error", t?.error ?? "");
  err.hidden = !t?.error;
  const targetTitle = t ? [t.gitCommit, t.branch && `on ${t.branch}`, t.source && `from ${t.source}`].filter(Boolean).join(" ") : "";
  if (el("fleet-target").title !== targetTitle) el("fleet-target").title = targetTitle;
  setText("server-version", g.serverVersion || "—");

  renderPullRequests(
    { status: el("pr-status"), statusError: el("pr-status-error"), statusSince: el("pr-status-since"), merge: el<HTMLButtonElement>("merge-deploy"), mergeSep: el("merge-deploy-sep"), mergeNumber: el("merge-deploy-number") },
    globalState.pullRequests(),
    now,
  );
  renderBulkProgress(el("bulk-progress"), bulks.running());

  const conn = el("connection-state");
  conn.dataset.state = g.connection;
  let text: string;
  switch (g.connection) {
    case "open":
      text = "Live";
      break;
    case "connecting":
      text = "Connecting…";
      break;
    case "reconnecting": {
      const wait = g.retryAt === null ? 0 : Math.max(0, g.retryAt - Date.now());
      text = wait > 0 ? `Disconnected — reconnecting in ${formatDuration(wait + 999)} (attempt ${g.attempt})` : "Reconnecting…";
      break;
    }
    case "paused":
      text = "Paused";
      break;
    default:
      text = "Disconnected";
  }
  setText("connection-state", text);
  conn.title = g.lastError;

  const all = hostStore.all();
  const online = all.filter((h) => h.online).length;
  setText("fleet-count", `${online}/${all.length} online`);
  el("empty-state").hidden = all.length > 0;
  el("host-table").classList.toggle("is-empty", all.length === 0);
  renderSelectionBar();
}

function renderSelectionBar(): void {
  const n = selection.size;
  el("selection-bar").hidden = n === 0;
  setText("selection-count", `${n} selected`);
  const allBox = el<HTMLInputElement>("select-all");
  allBox.checked = n > 0 && n === hostStore.size;
  allBox.indeterminate = n > 0 && n < hostStore.size;
}

// ─── hydration ───────────────────────────────────────────────────────────

function readSnapshot(): Snapshot {
  const text = document.getElementById("fleet-snapshot")?.textContent ?? "";
  try {
    return fromJson(SnapshotSchema, JSON.parse(text || "{}"), { ignoreUnknownFields: true });
  } catch (err) {
    console.warn("fleet snapshot unreadable; waiting for the stream", err);
    return create(SnapshotSchema);
  }
}

/** hydrate fills the stores from the first paint and caches its elements. */
function hydrate(): void {
  const serverTime = Date.parse(document.body.dataset.serverTime ?? "");
  if (Number.isFinite(serverTime)) clock.observe(serverTime);
  const cards = new Map<string, HTMLElement>();
  for (const card of cardsEl.querySelectorAll<HTMLElement>(":scope > .host-card[data-host-id]")) {
    if (card.dataset.hostId) cards.set(card.dataset.hostId, card);
  }
  for (const row of rowsEl.querySelectorAll<HTMLElement>(":scope > tr[data-host-id]")) {
    const id = row.dataset.hostId ?? "";
    const card = cards.get(id);
    if (!id || !card) continue;
    const vs = [viewOf(row), viewOf(card)];
    views.set(id, vs);
    watchViews(id, vs);
  }
  const snap = readSnapshot();
  hostStore.hydrate(snap);
  globalState.hydrate(snap);
  syncBulks(activeBulksOf(snap));
  // Elements the snapshot does not explain are dropped.
  for (const id of Array.from(views.keys())) {
    if (!hostStore.has(id)) removeViews(id);
  }
  scheduler.all();
}

// ─── the watch stream ────────────────────────────────────────────────────

let watchAbort: AbortController | null = null;
let streams = 0;

/** watch keeps one WatchFleet stream open, reconnecting with backoff. */
async function watch(ctrl: AbortController): Promise<void> {
  let attempt = 0;
  while (!ctrl.signal.aborted) {
    globalState.update({ connection: attempt === 0 ? "connecting" : "reconnecting", retryAt: null });
    try {
      let first = true;
      for await (const res of client.watchFleet({}, { signal: ctrl.signal })) {
        if (first) {
          first = false;
          attempt = 0;
          streams++;
          globalState.update({ connection: "open", attempt: 0, lastError: "" });
        }
        for (const ev of res.events ?? []) applyEvent(ev, { hosts: hostStore, global: globalState, clock, sink });
      }
      globalState.update({ lastError: "stream ended" });
    } catch (err) {
      if (ctrl.signal.aborted) break;
      const ce = ConnectError.from(err);
      if (ce.code === Code.Unauthenticated) {
        location.assign(`/login?next=${encodeURIComponent(location.pathname)}`);
        return;
      }
      globalState.update({ lastError: ce.rawMessage || String(err) });
    }
    if (ctrl.signal.aborted) break;
    attempt++;
    const delay = backoffDelay(attempt);
    globalState.update({ connection: "reconnecting", attempt, retryAt: Date.now() + delay });
    await sleep(delay, ctrl.signal);
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done(): void {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done);
  });
}

function startWatch(): void {
  watchAbort?.abort();
  const ctrl = new AbortController();
  watchAbort = ctrl;
  void watch(ctrl);
}

function stopWatch(): void {
  watchAbort?.abort();
  watchAbort = null;
  globalState.update({ connection: "paused", retryAt: null });
}

// ─── events that are not host state: logs, commands, bulk runs ───────────

/**
 * noteCommand takes a command's state from any source (stream event, RPC
 * answer, stored log) in whatever order they arrive: the tracker keeps the
 * most advanced state, the host's log tab shows it, and the end of a command
 * this page started is reported once.
 */
function noteCommand(cmd: CommandInfo): CommandInfo {
  const c = commands.seen(cmd);
  if (isTerminal(c.state) && commands.ended(c)) {
    const name = hostStore.get(c.hostId)?.hostname ?? c.hostId;
    showToast(`${c.command} on ${name}: ${c.state}${c.message ? ` — ${c.message}` : ""}`, c.state === "succeeded" ? "ok" : "error");
  }
  const tab = logs.book.tabs.get(c.hostId);
  if (tab && tab.setState(c.id, c.state, c.command)) logs.sectionChanged(c.hostId, c.id);
  return c;
}

/** settleOwnCommands asks for the state of own commands whose end the stream may have missed. */
async function settleOwnCommands(active: Set<string>): Promise<void> {
  for (const id of commands.pending()) {
    if (active.has(id)) continue;
    try {
      const res = await client.getCommand({ commandId: id });
      if (res.command) noteCommand(commandFromProto(res.command));
    } catch (err) {
      console.warn("command state unavailable", id, err);
    }
  }
}

const sink = {
  snapshot(resync: boolean, active: CommandInfo[], running: BulkInfo[]): void {
    for (const c of active) noteCommand(c);
    syncBulks(running);
    // After a reconnect or resync, lines and ends may have been missed:
    // reload open tabs and ask for own commands that are no longer active.
    if (resync || streams > 1) {
      for (const id of logs.book.tabs.keys()) void loadHistory(id);
      void settleOwnCommands(new Set(active.map((c) => c.id)));
    }
  },
  commandQueued(cmd: CommandInfo): void {
    noteCommand(cmd);
  },
  commandUpdated(cmd: CommandInfo): void {
    noteCommand(cmd);
  },
  commandOutput(hostId: string, commandId: string, lines: ReturnType<typeof lineFromProto>[]): void {
    const tab = logs.book.tabs.get(hostId);
    if (!tab) return;
    const res = tab.add(commandId, lines);
    logs.changed(hostId, res.reordered ? null : res.appended);
    if (res.gapAfter !== null) void fetchLines(hostId, commandId, res.gapAfter);
  },
  commandComplete(cmd: CommandInfo): void {
    noteCommand(cmd);
  },
  bulkProgress(b: BulkInfo): void {
    noteBulk(b);
  },
};

/**
 * noteBulk takes a bulk run's state from an event or an RPC answer: running
 * runs show next to Bulk Actions, and the end of one this page started is
 * reported once.
 */
function noteBulk(b: BulkInfo): void {
  const cur = bulks.seen(b);
  scheduler.global();
  if (cur.state === "running" || cur.state === "unknown" || !ownBulks.delete(cur.id)) return;
  showToast(bulkProgressText(cur), cur.state === "succeeded" ? "ok" : "error");
}

/**
 * syncBulks takes the bulk runs a snapshot (the first paint's or a
 * stream's) lists as running, the way their progress events would be
 * taken, so a run shows as soon as the page loads. A run shown as running
 * that the snapshot no longer lists ended meanwhile: it is hidden, and for
 * one this page started its end is asked for, to be reported.
 */
function syncBulks(running: BulkInfo[]): void {
  const ended = bulks.sync(running).filter((b) => ownBulks.has(b.id));
  scheduler.global();
  if (ended.length > 0) void settleBulks(ended);
}

/** settleBulks asks for the state of own runs whose end the stream did not bring. */
async function settleBulks(runs: BulkInfo[]): Promise<void> {
  for (const b of runs) {
    try {
      const res = await client.getBulkCommand({ bulkId: b.id });
      if (res.bulk) noteBulk(bulkFromProto(res.bulk));
      else ownBulks.delete(b.id);
    } catch (err) {
      if (ConnectError.from(err).code === Code.NotFound) ownBulks.delete(b.id);
      else console.warn("bulk run state unavailable", b.id, err);
    }
  }
}

/** loadHistory fills a tab with the host's latest command log. */
async function loadHistory(hostId: string): Promise<void> {
  const { tab } = logs.book.open(hostId);
  try {
    const list = await client.listCommands({ hostId, pageSize: 1 });
    const latest = list.commands[0];
    if (latest) {
      const cmd = noteCommand(commandFromProto(latest));
      tab.setState(cmd.id, cmd.state, cmd.command);
      await fetchLines(hostId, cmd.id, 0);
    }
  } catch (err) {
    showToast(errorText(err, "Loading the log"), "error");
  } finally {
    tab.historyLoaded = true;
    logs.changed(hostId, null);
  }
}

/** fetchLines loads a command's stored lines after a seq into its tab. */
async function fetchLines(hostId: string, commandId: string, afterSeq: number): Promise<void> {
  let after = afterSeq;
  for (let page = 0; page < 10; page++) {
    const res = await client.getCommandLog({ commandId, afterSeq: BigInt(after), limit: 5000 });
    const tab = logs.book.tabs.get(hostId);
    if (!tab) return;
    const lines = res.lines.map(lineFromProto);
    const added = tab.add(commandId, lines, res.command?.command ?? "");
    logs.changed(hostId, added.reordered ? null : added.appended);
    if (res.command) noteCommand(commandFromProto(res.command));
    const last = lines[lines.length - 1];
    if (!res.more || !last) return;
    after = last.seq;
  }
}

/** openLog shows a host's log tab, loading its history the first time. */
function openLog(hostId: string): void {
  const created = !logs.book.tabs.has(hostId);
  logs.show(hostId);
  if (created) void loadHistory(hostId);
}

// ─── actions ─────────────────────────────────────────────────────────────

function hostName(id: string): string {
  return hostStore.get(id)?.hostname ?? id;
}

/** refreshHost asks the server for a host's fresh status. */
async function refreshHost(id: string): Promise<void> {
  if (!hostStore.update(id, { refreshing: true })) return;
  try {
    const res = await client.refreshHost({ hostId: id });
    let patch: HostPatch;
    if (res.host) {
      patch = hostPatchFromProto(res.host);
    } else {
      patch = { online: res.online, generation: res.generation, agentVersion: res.agentVersion, agentOutdated: res.agentOutdated };
    }
    hostStore.update(id, patch);
    globalState.notePullRequests({ pendingPr: res.pendingPr });
    if (!res.refreshed) showToast(`${hostName(id)} did not answer in time; showing its last known status`, "info");
  } catch (err) {
    const ce = ConnectError.from(err);
    if (ce.code === Code.NotFound) {
      showToast(`${hostName(id)} no longer exists`, "error");
      hostStore.remove(id);
      return;
    }
    showToast(errorText(err, `Refreshing ${hostName(id)}`), "error");
  } finally {
    hostStore.update(id, { refreshing: false });
  }
}

/** runCommand queues a command; a refused one opens the blocked-command dialog. */
async function runCommand(id: string, command: string, force = false, totp = ""): Promise<void> {
  try {
    const res = await client.runCommand({ hostId: id, command, force, totp });
    const cmd = res.command ? commandFromProto(res.command) : null;
    if (cmd) {
      // The command's events may have come before this answer, its end
      // included: the tracker holds whichever is newer.
      commands.claim(cmd);
      if (LOGGED_COMMANDS.has(command)) {
        const created = !logs.book.tabs.has(id);
        const tab = logs.show(id);
        tab.setState(cmd.id, cmd.state, cmd.command);
        logs.changed(id, null);
        // Lines that streamed before the tab existed come from the store.
        if (created) void fetchLines(id, cmd.id, 0).finally(() => (tab.historyLoaded = true));
      } else {
        showToast(`${command} sent to ${hostName(id)}`, "info");
      }
      noteCommand(cmd);
    }
  } catch (err) {
    const reason = blockReason(err);
    if (reason === null) {
      showToast(errorText(err, `${command} on ${hostName(id)}`), "error");
      return;
    }
    const info = describeBlock(reason, command);
    const answer = await blockedDialog(info, hostName(id), ConnectError.from(err).rawMessage);
    if (answer.choice === "force") await runCommand(id, command, true, totp);
    else if (answer.choice === "totp") await runCommand(id, command, force, answer.totp);
    else if (answer.choice === "refresh") await refreshHost(id);
  }
}

async function stopCommand(id: string): Promise<void> {
  const cmd = hostStore.get(id)?.runningCommand;
  if (!cmd) {
    showToast(`Nothing runs on ${hostName(id)}`, "info");
    return;
  }
  try {
    await client.stopCommand({ commandId: cmd.id });
    showToast(`Stopping ${cmd.command} on ${hostName(id)}`, "info");
  } catch (err) {
    showToast(errorText(err, `Stopping ${cmd.command}`), "error");
  }
}

async function removeHost(id: string): Promise<void> {
  const c = await confirmDialog({
    title: `Remove ${hostName(id)}?`,
    text: "The host, its agent token and its command history are deleted. Its agent can no longer connect.",
    ok: "Remove",
  });
  if (!c.ok) return;
  try {
    await client.removeHost({ hostId: id });
  } catch (err) {
    const ce = ConnectError.from(err);
    if (ce.code !== Code.FailedPrecondition) {
      showToast(errorText(err, `Removing ${hostName(id)}`), "error");
      return;
    }
    const again = await confirmDialog({
      title: `${hostName(id)} is online`,
      text: "Remove it anyway? Its agent stream is closed.",
      ok: "Remove anyway",
    });
    if (!again.ok) return;
    try {
      await client.removeHost({ hostId: id, force: true });
    } catch (err2) {
      showToast(errorText(err2, `Removing ${hostName(id)}`), "error");
      return;
    }
  }
  hostStore.remove(id);
  logs.close(id);
  showToast(`${hostName(id)} removed`, "ok");
}

/** hostAction runs a ⋮ menu entry. */
async function hostAction(id: string, action: string): Promise<void> {
  switch (action) {
    case "log":
      openLog(id);
      return;
    case "stop":
      await stopCommand(id);
      return;
    case "remove":
      await removeHost(id);
      return;
    case "reboot": {
      const c = await confirmDialog({ title: `Reboot ${hostName(id)}?`, text: "The machine restarts now.", ok: "Reboot", totp: true });
      if (c.ok) await runCommand(id, "reboot", false, c.totp);
      return;
    }
    case "rollback": {
      const c = await confirmDialog({
        title: `Roll back ${hostName(id)}?`,
        text: "The previous generation is activated.",
        ok: "Roll back",
        totp: true,
      });
      if (c.ok) await runCommand(id, "rollback", false, c.totp);
      return;
    }
    default:
      await runCommand(id, action);
  }
}

async function bulk(command: string, hostIds: string[], all: boolean): Promise<void> {
  const label = command === "do-all" ? "Do All (pull → switch → test)" : command;
  if (all || command === "switch" || command === "do-all") {
    const n = all ? hostStore.all().filter((h) => h.online).length : hostIds.length;
    const c = await confirmDialog({ title: `Run ${label} on ${n} hosts?`, text: "Hosts run it in parallel batches; one host's failure does not stop the others.", ok: "Run", danger: false });
    if (!c.ok) return;
  }
  try {
    const res = await client.runBulkCommand({ command, hostIds, all });
    showToast(`${label} started on ${all ? "all hosts" : `${hostIds.length} hosts`}`, "info");
    // Its end may have come first: noting the answer reports it then.
    if (res.bulk) {
      ownBulks.add(res.bulk.bulkId);
      noteBulk(bulkFromProto(res.bulk));
    }
    scheduler.global();
  } catch (err) {
    showToast(errorText(err, `Bulk ${label}`), "error");
  }
}

async function mergeAndDeploy(): Promise<void> {
  const pr = globalState.state.pendingPR;
  if (!pr) return;
  const chosen = selection.list(hostStore.all().map((h) => h.id));
  const who = chosen.length > 0 ? `the ${chosen.length} selected hosts pull` : "every online host pulls";
  const c = await confirmDialog({
    title: `Merge & Deploy PR #${pr.number}?`,
    text: `${pr.title}\n\nThe pull request is merged, then ${who} and switch in batches, canary first.`,
    ok: "Merge & Deploy",
    danger: false,
  });
  if (!c.ok) return;
  try {
    const res = await client.mergeAndDeploy({ prNumber: pr.number, hostIds: chosen });
    if (res.bulk) {
      const b = bulkFromProto(res.bulk);
      const commit = b.commit ? ` (${shortHash(b.commit)})` : "";
      showToast(`Merged PR #${b.prNumber || pr.number}${commit}; deploying`, "info");
      ownBulks.add(b.id);
      noteBulk(b);
    } else {
      showToast(`Merging PR #${pr.number} and deploying`, "info");
    }
  } catch (err) {
    showToast(errorText(err, "Merge & Deploy"), "error");
  }
}

const compartmentCooldown = new Map<string, number>();

/** compartmentClick: working → offer stop; git/lock/agent → refresh; tests behind → run test. */
async function compartmentClick(id: string, name: CompartmentName): Promise<void> {
  const key = `${id}/${name}`;
  const now = Date.now();
  if ((compartmentCooldown.get(key) ?? 0) > now) return;
  compartmentCooldown.set(key, now + 500);
  const h = hostStore.get(id);
  if (!h) return;
  const c = h.updateStatus[name];
  if (c.status === "working") {
    const cmd = h.runningCommand;
    const answer = await confirmDialog({
      title: `Stop ${cmd?.command ?? "the running command"} on ${h.hostname}?`,
      text: c.message || "A command is working on this.",
      ok: "Stop",
    });
    if (answer.ok) await stopCommand(id);
    return;
  }
  if (name === "tests" && (c.status === "outdated" || c.status === "error")) {
    await runCommand(id, "test");
    return;
  }
  if (name === "git" || name === "lock" || name === "agent") {
    await refreshHost(id);
    return;
  }
  showToast(`${h.hostname} ${name}: ${c.message || c.status}`, "info");
}

// ─── wiring ──────────────────────────────────────────────────────────────

function displayOrder(): string[] {
  return hostStore.all().map((h) => h.id);
}

function onHostClick(e: MouseEvent): void {
  const target = e.target as HTMLElement;
  const root = target.closest<HTMLElement>("[data-host-id]");
  const id = root?.dataset.hostId;
  if (!id) return;
  const select = target.closest<HTMLInputElement>('input[data-field="select"]');
  if (select) {
    for (const changed of selection.click(id, select.checked, e.shiftKey, displayOrder())) scheduler.host(changed);
    scheduler.global();
    return;
  }
  const comp = target.closest<HTMLElement>("[data-compartment]");
  if (comp?.dataset.compartment) {
    void compartmentClick(id, comp.dataset.compartment as CompartmentName);
    return;
  }
  const action = target.closest<HTMLElement>("[data-action]");
  if (action?.dataset.action === "refresh") {
    void refreshHost(id);
  } else if (action?.dataset.action === "menu") {
    showHostMenu(id, action);
  }
}

let closeHostMenu: (() => void) | null = null;

function showHostMenu(id: string, anchor: HTMLElement): void {
  closeHostMenu?.();
  const menu = el("host-menu");
  const h = hostStore.get(id);
  if (!h) return;
  menu.dataset.hostId = id;
  const busy = isBusy(h);
  for (const b of menu.querySelectorAll<HTMLButtonElement>("button[data-command]")) {
    const c = b.dataset.command ?? "";
    if (c === "stop") b.disabled = !busy;
    else if (c === "log" || c === "remove") b.disabled = false;
    else b.disabled = !h.online || busy;
  }
  closeHostMenu = openMenu(menu, anchor, () => (closeHostMenu = null));
}

el("host-menu").addEventListener("click", (e) => {
  const b = (e.target as HTMLElement).closest<HTMLButtonElement>("button[data-command]");
  const id = el("host-menu").dataset.hostId;
  if (!b || b.disabled || !id) return;
  closeHostMenu?.();
  void hostAction(id, b.dataset.command ?? "");
});

rowsEl.addEventListener("click", onHostClick);
cardsEl.addEventListener("click", onHostClick);

el("select-all").addEventListener("change", (e) => {
  const on = (e.target as HTMLInputElement).checked;
  for (const id of on ? selection.setAll(displayOrder()) : selection.clear()) scheduler.host(id);
  scheduler.global();
});
el("selection-clear").addEventListener("click", () => clearSelection());
el("selection-bar").addEventListener("click", (e) => {
  const b = (e.target as HTMLElement).closest<HTMLElement>("[data-bulk]");
  if (b?.dataset.bulk) void bulk(b.dataset.bulk, selection.list(displayOrder()), false);
});

let closeBulkMenu: (() => void) | null = null;
el("bulk-actions-button").addEventListener("click", () => {
  if (closeBulkMenu) {
    closeBulkMenu();
    return;
  }
  closeBulkMenu = openMenu(el("bulk-actions-menu"), el("bulk-actions-button"), () => (closeBulkMenu = null));
});
el("bulk-actions-menu").addEventListener("click", (e) => {
  const b = (e.target as HTMLElement).closest<HTMLButtonElement>("button");
  if (!b || b.disabled) return;
  closeBulkMenu?.();
  if (b.dataset.action === "merge-deploy") void mergeAndDeploy();
  else if (b.dataset.bulkAll) void bulk(b.dataset.bulkAll, [], true);
});

function clearSelection(): void {
  for (const id of selection.clear()) scheduler.host(id);
  scheduler.global();
}

document.addEventListener("keydown", (e) => {
  const t = e.target as HTMLElement | null;
  const typing = t !== null && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.isContentEditable);
  if (e.key === "Escape" && !document.querySelector("dialog[open]")) {
    clearSelection();
  } else if ((e.ctrlKey || e.metaKey) && e.key === "a" && !typing && !el("log-panel").contains(t)) {
    e.preventDefault();
    for (const id of selection.setAll(displayOrder())) scheduler.host(id);
    scheduler.global();
  }
});

// bfcache: a page kept in the back/forward cache must not hold its stream.
window.addEventListener("pagehide", () => stopWatch());
window.addEventListener("pageshow", (e) => {
  if (e.persisted) startWatch();
});

// Last seen, stale looks and ages tick every second, for the hosts in sight.
setInterval(() => {
  for (const id of onScreen.keys()) scheduler.host(id);
  scheduler.global();
}, 1000);

hydrate();
startWatch();
void new Account(transport).load();
