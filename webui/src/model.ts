// Host state as the page keeps it: plain data converted from the protobuf
// messages, the deep merge that applies partial updates, and the pure
// derivations (stale, busy, last-seen text) the render functions use. Nothing
// here touches the DOM, so node's test runner imports it directly.

import { timestampMs, type Timestamp } from "@bufbuild/protobuf/wkt";
import type {
  Command,
  FleetTarget,
  Host,
  PendingPR,
} from "./gen/nixplane/fleet/v1/fleet_pb";
import {
  CommandState,
  CompartmentStatus,
  HostType,
  OutputStream,
  type Compartment,
  type Metrics,
  type OutputLine,
  type UpdateStatus,
} from "./gen/nixplane/types/v1/types_pb";

/** The five status compartments, in display order. */
export const COMPARTMENTS = ["agent", "git", "lock", "system", "tests"] as const;
/** One status compartment's name. */
export type CompartmentName = (typeof COMPARTMENTS)[number];
/** A compartment's state as the page shows it. */
export type CompStatus = "ok" | "outdated" | "error" | "working" | "unknown";

/** CPU or RAM use at or above this percentage is marked high. */
export const HIGH_METRIC = 80;
/** A host whose last heartbeat is older than this looks stale. */
export const STALE_AFTER_MS = 60_000;

/** One compartment's state. */
export interface CompartmentState {
  status: CompStatus;
  message: string;
  /** Epoch milliseconds, or null when never checked. */
  checkedAt: number | null;
}

/** Live resource use; percentages 0–100. */
export interface HostMetrics {
  cpu: number;
  ram: number;
  swap: number;
  load: number;
}

/** A command run as the page tracks it. */
export interface CommandInfo {
  id: string;
  hostId: string;
  command: string;
  state: CommandStateName;
  blockReason: string;
  message: string;
  exitCode: number;
  phase: string;
  progressCurrent: number;
  progressTotal: number;
  overdue: boolean;
  bulkId: string;
}

/** A command state's short name. */
export type CommandStateName =
  | "unknown"
  | "validating"
  | "blocked"
  | "queued"
  | "running"
  | "post-validation"
  | "succeeded"
  | "partial"
  | "failed"
  | "stopped"
  | "timed-out";

/** Everything the page knows about one host. */
export interface HostState {
  id: string;
  hostname: string;
  hostType: "nixos" | "darwin" | "home-manager" | "unknown";
  themeColor: string;
  location: string;
  deviceType: string;
  osVersion: string;
  nixpkgsVersion: string;
  repoUrl: string;
  online: boolean;
  /** Server time of the last heartbeat, epoch milliseconds. */
  lastSeen: number | null;
  heartbeatIntervalMs: number;
  metrics: HostMetrics | null;
  agentVersion: string;
  agentOutdated: boolean;
  generation: string;
  generationMessage: string;
  lockHash: string;
  runningCommand: CommandInfo | null;
  updateStatus: Record<CompartmentName, CompartmentState>;
  availableCommands: string[];
  tests: { passed: number; total: number; failed: string[] } | null;
  /** A refresh asked from this page is in flight (drives the spinner). */
  refreshing: boolean;
}

/** A partial HostState; metrics and updateStatus merge field by field. */
export type HostPatch = Partial<Omit<HostState, "id" | "metrics" | "updateStatus">> & {
  metrics?: Partial<HostMetrics> | null;
  updateStatus?: Partial<Record<CompartmentName, CompartmentState>>;
};

/** The fleet target as the header shows it. */
export interface TargetState {
  gitCommit: string;
  message: string;
  branch: string;
  committedAt: number | null;
  error: string;
  source: string;
}

/** The pending flake-update pull request. */
export interface PendingPRState {
  number: number;
  title: string;
  url: string;
  mergeable: boolean;
}

/** One output line of a command. */
export interface LogLine {
  seq: number;
  stream: "stdout" | "stderr" | "system";
  text: string;
  time: number | null;
}

/** tsMs converts an optional Timestamp to epoch milliseconds; a malformed one is null. */
export function tsMs(ts: Timestamp | undefined): number | null {
  if (!ts || typeof ts !== "object") return null;
  const ms = timestampMs(ts);
  return Number.isFinite(ms) && ms > 0 ? ms : null;
}

function str(v: unknown): string {
  return typeof v === "string" ? v : "";
}

function num(v: unknown): number {
  return typeof v === "number" && Number.isFinite(v) ? v : 0;
}

/** compStatus maps the protobuf enum to the page's status name. */
export function compStatus(s: CompartmentStatus | undefined): CompStatus {
  switch (s) {
    case CompartmentStatus.OK:
      return "ok";
    case CompartmentStatus.OUTDATED:
      return "outdated";
    case CompartmentStatus.ERROR:
      return "error";
    case CompartmentStatus.WORKING:
      return "working";
    default:
      return "unknown";
  }
}

function compartmentFromProto(c: Compartment | undefined): CompartmentState {
  if (!c) return { status: "unknown", message: "", checkedAt: null };
  return { status: compStatus(c.status), message: str(c.message), checkedAt: tsMs(c.checkedAt) };
}

/** updateStatusFromProto converts every compartment; absent ones are unknown. */
export function updateStatusFromProto(u: UpdateStatus | undefined): Record<CompartmentName, CompartmentState> {
  return {
    agent: compartmentFromProto(u?.agent),
    git: compartmentFromProto(u?.git),
    lock: compartmentFromProto(u?.lock),
    system: compartmentFromProto(u?.system),
    tests: compartmentFromProto(u?.tests),
  };
}

/** metricsFromProto converts metrics; absent metrics are null. */
export function metricsFromProto(m: Metrics | undefined): HostMetrics | null {
  if (!m) return null;
  return { cpu: num(m.cpuPercent), ram: num(m.ramPercent), swap: num(m.swapPercent), load: num(m.load1) };
}

const stateNames: Record<number, CommandStateName> = {
  [CommandState.VALIDATING]: "validating",
  [CommandState.BLOCKED]: "blocked",
  [CommandState.QUEUED]: "queued",
  [CommandState.RUNNING]: "running",
  [CommandState.POST_VALIDATION]: "post-validation",
  [CommandState.SUCCEEDED]: "succeeded",
  [CommandState.PARTIAL]: "partial",
  [CommandState.FAILED]: "failed",
  [CommandState.STOPPED]: "stopped",
  [CommandState.TIMED_OUT]: "timed-out",
};

/** isTerminal reports whether a command state ends the run. */
export function isTerminal(s: CommandStateName): boolean {
  return s === "blocked" || s === "succeeded" || s === "partial" || s === "failed" || s === "stopped" || s === "timed-out";
}

/** commandFromProto converts a command run. */
export function commandFromProto(c: Command): CommandInfo {
  return {
    id: str(c.commandId),
    hostId: str(c.hostId),
    command: str(c.command),
    state: stateNames[c.state] ?? "unknown",
    blockReason: str(c.blockReason),
    message: str(c.message),
    exitCode: num(c.exitCode),
    phase: str(c.phase),
    progressCurrent: num(c.progressCurrent),
    progressTotal: num(c.progressTotal),
    overdue: c.overdue === true,
    bulkId: str(c.bulkId),
  };
}

function hostTypeName(t: HostType): HostState["hostType"] {
  switch (t) {
    case HostType.NIXOS:
      return "nixos";
    case HostType.DARWIN:
      return "darwin";
    case HostType.HOME_MANAGER:
      return "home-manager";
    default:
      return "unknown";
  }
}

/** hostFromProto converts a complete host. */
export function hostFromProto(h: Host): HostState {
  const running = h.runningCommand ? commandFromProto(h.runningCommand) : null;
  const interval = h.heartbeatInterval
    ? Number(h.heartbeatInterval.seconds) * 1000 + Math.floor(h.heartbeatInterval.nanos / 1e6)
    : 0;
  return {
    id: str(h.hostId),
    hostname: str(h.hostname) || str(h.hostId),
    hostType: hostTypeName(h.hostType),
    themeColor: str(h.themeColor),
    location: str(h.location),
    deviceType: str(h.deviceType),
    osVersion: str(h.osVersion),
    nixpkgsVersion: str(h.nixpkgsVersion),
    repoUrl: str(h.repoUrl),
    online: h.online === true,
    lastSeen: tsMs(h.lastSeen),
    heartbeatIntervalMs: Number.isFinite(interval) ? interval : 0,
    metrics: metricsFromProto(h.metrics),
    agentVersion: str(h.agentVersion),
    agentOutdated: h.agentOutdated === true,
    generation: str(h.generation),
    generationMessage: str(h.generationMessage),
    lockHash: str(h.lockHash),
    runningCommand: running && !isTerminal(running.state) ? running : null,
    updateStatus: updateStatusFromProto(h.updateStatus),
    availableCommands: Array.isArray(h.availableCommands) ? h.availableCommands.filter((c) => typeof c === "string") : [],
    tests: h.tests
      ? { passed: num(h.tests.passed), total: num(h.tests.total), failed: h.tests.failed.filter((f) => typeof f === "string") }
      : null,
    refreshing: false,
  };
}

/**
 * hostPatchFromProto is a complete host as a patch: every durable field, the
 * metrics only when present, and the UI-only fields left alone.
 */
export function hostPatchFromProto(h: Host): HostPatch {
  const { id: _id, refreshing: _r, metrics, ...rest } = hostFromProto(h);
  const patch: HostPatch = rest;
  if (metrics) patch.metrics = metrics;
  return patch;
}

/** targetFromProto converts the fleet target. */
export function targetFromProto(t: FleetTarget | undefined): TargetState | null {
  if (!t) return null;
  return {
    gitCommit: str(t.gitCommit),
    message: str(t.message),
    branch: str(t.branch),
    committedAt: tsMs(t.committedAt),
    error: str(t.error),
    source: str(t.source),
  };
}

/** prFromProto converts the pending PR; none or number 0 is null. */
export function prFromProto(p: PendingPR | undefined): PendingPRState | null {
  if (!p || !p.number) return null;
  return { number: p.number, title: str(p.title), url: str(p.url), mergeable: p.mergeable === true };
}

/** The pull-request poll's health as the page keeps it. */
export interface PullRequestsPoll {
  /** PR support is configured on the server. */
  configured: boolean;
  /** Why the last look for pull requests failed; empty when it worked. */
  error: string;
  /** When pull requests were last looked for successfully, epoch ms. */
  checkedAt: number | null;
  /** The pending PR, or the last one known while looking fails. */
  pendingPR: PendingPRState | null;
}

/** What a snapshot, PendingPRChanged event or refresh answer says about pull requests. */
export interface PullRequestsNews {
  pendingPr?: PendingPR | undefined;
  pullRequestsError?: unknown;
  pullRequestsCheckedAt?: Timestamp | undefined;
}

/**
 * nextPullRequestsPoll applies news about pull requests. A field that is
 * absent or malformed leaves what the page knew: an error that is not a
 * string is ignored, a missing or broken time keeps the last success, and
 * the last success never moves back. While looking fails, a missing PR
 * keeps the last known one (the server cannot know it is gone).
 */
export function nextPullRequestsPoll(cur: PullRequestsPoll, news: PullRequestsNews, withPR = true): PullRequestsPoll {
  const next = { ...cur };
  if (typeof news.pullRequestsError === "string") next.error = news.pullRequestsError.trim();
  const at = tsMs(news.pullRequestsCheckedAt);
  if (at !== null && (cur.checkedAt === null || at > cur.checkedAt)) next.checkedAt = at;
  if (withPR) {
    const pr = prFromProto(news.pendingPr);
    next.pendingPR = pr === null && next.error !== "" ? cur.pendingPR : pr;
  }
  return next;
}

/** The longest poll error shown inline; the tooltip holds all of it. */
export const PR_ERROR_INLINE = 160;

/** oneLine folds whitespace and control characters and shortens to max characters. */
export function oneLine(s: string, max: number): string {
  const flat = s.replace(/[\u0000-\u001f\u007f-\u009f\s]+/gu, " ").trim();
  const chars = Array.from(flat);
  return chars.length <= max ? flat : `${chars.slice(0, max - 1).join("").trimEnd()}…`;
}

/** The pull-request status line near Bulk Actions. */
export interface PullRequestsStatus {
  /** Nothing to show: PRs not configured, or looking works. */
  hidden: boolean;
  /** The whole line: error + " " + since. */
  text: string;
  /** "Pull requests: <error, on one line>"; it may be cut short on screen. */
  error: string;
  /** "· last success 5m ago"; always shown whole. */
  since: string;
  title: string;
}

/**
 * pullRequestsStatus derives the status line: shown only when PRs are
 * configured and the last look failed, naming the error and the last
 * success; the tooltip adds the whole error and the PR the page keeps.
 */
export function pullRequestsStatus(p: PullRequestsPoll, now: number): PullRequestsStatus {
  if (!p.configured || p.error === "") return { hidden: true, text: "", error: "", since: "", title: "" };
  const error = `Pull requests: ${oneLine(p.error, PR_ERROR_INLINE)}`;
  const since = p.checkedAt === null ? "· no success yet" : `· last success ${formatAge(p.checkedAt, now)}`;
  const lines = ["Looking for pull requests failed:", p.error];
  lines.push(p.checkedAt === null ? "No look has succeeded yet." : `Last success: ${new Date(p.checkedAt).toISOString()} (${formatAge(p.checkedAt, now)})`);
  lines.push(p.pendingPR ? `Last known pull request: #${p.pendingPR.number} ${p.pendingPR.title}` : "No pull request was pending at the last success.");
  return { hidden: false, text: `${error} ${since}`, error, since, title: lines.join("\n") };
}

/** lineFromProto converts one output line. */
export function lineFromProto(l: OutputLine): LogLine {
  const stream = l.stream === OutputStream.STDERR ? "stderr" : l.stream === OutputStream.SYSTEM ? "system" : "stdout";
  return { seq: Number(l.seq), stream, text: str(l.text), time: tsMs(l.time) };
}

/**
 * mergeHost applies a patch: top-level fields replace, metrics and
 * updateStatus merge field by field so a partial update keeps the rest, and
 * lastSeen never moves backwards.
 */
export function mergeHost(cur: HostState, patch: HostPatch): HostState {
  const { metrics, updateStatus, ...flat } = patch;
  const next: HostState = { ...cur, ...flat, id: cur.id };
  if (metrics === null) {
    next.metrics = null;
  } else if (metrics) {
    const base: HostMetrics = cur.metrics ?? { cpu: 0, ram: 0, swap: 0, load: 0 };
    next.metrics = { ...base, ...definedOnly(metrics) };
  }
  if (updateStatus) {
    next.updateStatus = { ...cur.updateStatus };
    for (const name of COMPARTMENTS) {
      const c = updateStatus[name];
      if (c) next.updateStatus[name] = { ...c };
    }
  }
  if (cur.lastSeen !== null && (next.lastSeen === null || next.lastSeen < cur.lastSeen)) {
    next.lastSeen = cur.lastSeen;
  }
  return next;
}

function definedOnly<T extends object>(o: T): Partial<T> {
  const out: Partial<T> = {};
  for (const [k, v] of Object.entries(o)) {
    if (v !== undefined) (out as Record<string, unknown>)[k] = v;
  }
  return out;
}

/** isBusy reports whether a command runs on the host. */
export function isBusy(h: HostState): boolean {
  return h.runningCommand !== null && !isTerminal(h.runningCommand.state);
}

/** staleAfter is how long a host may stay silent before it looks stale. */
export function staleAfter(h: HostState): number {
  return Math.max(STALE_AFTER_MS, 2 * h.heartbeatIntervalMs);
}

/** isStale reports an online host whose last heartbeat is too old. */
export function isStale(h: HostState, now: number): boolean {
  return h.online && h.lastSeen !== null && now - h.lastSeen > staleAfter(h);
}

/** The status indicator's state. */
export type IndicatorState = "online" | "offline" | "busy" | "stale";

/** indicatorState derives the status indicator. */
export function indicatorState(h: HostState, now: number): IndicatorState {
  if (!h.online) return "offline";
  if (isBusy(h)) return "busy";
  if (isStale(h, now)) return "stale";
  return "online";
}

/** formatDuration writes an age compactly: 5s, 3m, 2h, 4d. */
export function formatDuration(ms: number): string {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h`;
  return `${Math.floor(h / 24)}d`;
}

/** formatAge writes "5s ago", or "never" for a missing time. */
export function formatAge(then: number | null, now: number): string {
  if (then === null) return "never";
  return `${formatDuration(now - then)} ago`;
}

/** The last-seen cell's text and freshness class. */
export interface LastSeen {
  text: string;
  level: "ok" | "warn" | "stale" | "none";
}

/** lastSeenView derives the last-seen cell (ok ≤10 s, warn ≤50 s). */
export function lastSeenView(h: HostState, now: number): LastSeen {
  if (h.lastSeen === null) return { text: "never", level: "none" };
  const age = now - h.lastSeen;
  const text = formatAge(h.lastSeen, now);
  if (!h.online) return { text, level: "none" };
  if (age <= 10_000) return { text, level: "ok" };
  if (age <= 50_000) return { text, level: "warn" };
  return { text, level: "stale" };
}

/** shortHash is the first 7 characters of a commit. */
export function shortHash(s: string): string {
  return s.slice(0, 7);
}

/** metricText writes a percentage, or a dash when unknown. */
export function metricText(v: number | undefined): string {
  return v === undefined || !Number.isFinite(v) ? "—" : `${Math.round(v)}%`;
}

/** safeColor returns a #rgb / #rrggbb colour, or "" for anything else. */
export function safeColor(c: string): string {
  return /^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$/.test(c) ? c : "";
}

const compLabels: Record<CompartmentName, string> = {
  agent: "Agent",
  git: "Git",
  lock: "Lock",
  system: "System",
  tests: "Tests",
};

/** compartmentLabel is a compartment's display name. */
export function compartmentLabel(c: CompartmentName): string {
  return compLabels[c];
}

/** compartmentTooltip writes the tooltip: label, status, message, check time, PR. */
export function compartmentTooltip(
  name: CompartmentName,
  c: CompartmentState,
  now: number,
  pr: PendingPRState | null,
  prUnchecked = false,
): string {
  const lines = [`${compLabels[name]}: ${c.status}`];
  if (c.message) lines.push(c.message);
  lines.push(c.checkedAt === null ? "Not checked yet" : `Checked ${formatAge(c.checkedAt, now)}`);
  if (name === "lock" && pr) {
    lines.push(`Pending PR #${pr.number}: ${pr.title}`);
    if (prUnchecked) lines.push("(last known: pull requests cannot be checked now)");
  }
  return lines.join("\n");
}

/** commandBadge is the short running-command text shown next to the status. */
export function commandBadge(h: HostState): string {
  const c = h.runningCommand;
  if (!c || isTerminal(c.state)) return "";
  let s = c.command || "…";
  if (c.progressTotal > 0) s += ` ${c.progressCurrent}/${c.progressTotal}`;
  return s;
}

/** backoffDelay is the wait before reconnect attempt n (1-based): 1 s doubling to 30 s, ±20 % jitter. */
export function backoffDelay(attempt: number, rand: number = Math.random()): number {
  const base = Math.min(30_000, 1000 * 2 ** Math.max(0, attempt - 1));
  const jittered = base * (0.8 + 0.4 * Math.min(1, Math.max(0, rand)));
  return Math.round(Math.min(30_000, Math.max(1000, jittered)));
}

/** compareHosts orders hosts by name, then id. */
export function compareHosts(a: HostState, b: HostState): number {
  return a.hostname < b.hostname ? -1 : a.hostname > b.hostname ? 1 : a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}
