// renderHost: the one function that writes a host's state into the page,
// into the table row and the card alike. It works on cached element
// references (a HostView per layout) and writes only what changed, so a
// heartbeat touches a few text nodes and never moves the layout. All text
// goes in through textContent or title: host data is never parsed as HTML.
//
// The element types are structural, so node tests drive these functions
// with small fake elements instead of a browser DOM.

import { bulkProgressText, type BulkInfo } from "./events";
import {
  COMPARTMENTS,
  HIGH_METRIC,
  commandBadge,
  compartmentTooltip,
  formatAge,
  indicatorState,
  isBusy,
  lastSeenView,
  metricText,
  pullRequestsStatus,
  safeColor,
  shortHash,
  type CompartmentName,
  type HostState,
  type PendingPRState,
  type PullRequestsPoll,
} from "./model";

/** El is the part of an element the render functions use. */
export interface El {
  textContent: string | null;
  title: string;
  readonly classList: { toggle(token: string, force?: boolean): boolean; contains(token: string): boolean };
  readonly dataset: { [key: string]: string | undefined };
  readonly style: { setProperty(name: string, value: string): void; removeProperty(name: string): string };
  setAttribute(name: string, value: string): void;
}

/** CheckboxEl is a checkbox input. */
export interface CheckboxEl extends El {
  checked: boolean;
}

/** HostView is one layout's (row or card) cached elements for one host. */
export interface HostView {
  root: El;
  fields: Partial<Record<ViewField, El>>;
  select: CheckboxEl | null;
  comps: Partial<Record<CompartmentName, El>>;
  /** Last values written, keyed by field and property: skips no-op writes. */
  prev: Map<string, string>;
  /** lastSeen of the last heartbeat shown, to restart the ripple on a new one. */
  beat: number | null;
  /**
   * The view is on screen (or near it). Only views on screen play the
   * heartbeat ripple: with a thousand hosts, ripples nobody sees would keep
   * the page drawing every frame.
   */
  onScreen: boolean;
}

/** The data-field names a HostView looks up. */
export const VIEW_FIELDS = [
  "status",
  "name",
  "badge",
  "type",
  "location",
  "device",
  "cpu",
  "cpu-val",
  "ram",
  "ram-val",
  "last-seen",
  "agent",
  "generation",
  "refresh",
] as const;
/** One data-field name. */
export type ViewField = (typeof VIEW_FIELDS)[number];

/** RenderContext is what rendering needs besides the host. */
export interface RenderContext {
  /** Estimated server time, epoch ms. */
  now: number;
  pendingPR: PendingPRState | null;
  /** The pending PR is the last one known: looking for pull requests fails. */
  prUnchecked?: boolean;
  serverVersion: string;
  selected: boolean;
}

/** newView builds a HostView from a root and a lookup of its parts. */
export function newView(
  root: El,
  find: (selector: string) => El | null,
): HostView {
  const fields: Partial<Record<ViewField, El>> = {};
  for (const f of VIEW_FIELDS) {
    const el = find(`[data-field="${f}"]`);
    if (el) fields[f] = el;
  }
  const comps: Partial<Record<CompartmentName, El>> = {};
  for (const c of COMPARTMENTS) {
    const el = find(`[data-compartment="${c}"]`);
    if (el) comps[c] = el;
  }
  return {
    root,
    fields,
    select: find('[data-field="select"]') as CheckboxEl | null,
    comps,
    prev: new Map(),
    beat: null,
    onScreen: true,
  };
}

function put(v: HostView, key: string, value: string, write: () => void): void {
  if (v.prev.get(key) === value) return;
  v.prev.set(key, value);
  write();
}

function text(v: HostView, f: ViewField, value: string): void {
  const el = v.fields[f];
  if (el) put(v, `${f}.text`, value, () => (el.textContent = value));
}

function title(v: HostView, key: string, el: El | undefined, value: string): void {
  if (el) put(v, `${key}.title`, value, () => (el.title = value));
}

function data(v: HostView, key: string, el: El | undefined, name: string, value: string): void {
  if (el) put(v, `${key}.data.${name}`, value, () => (el.dataset[name] = value));
}

function cls(v: HostView, key: string, el: El | undefined, name: string, on: boolean): void {
  if (el) put(v, `${key}.cls.${name}`, on ? "1" : "0", () => el.classList.toggle(name, on));
}

const typeIcons: Record<HostState["hostType"], [string, string]> = {
  nixos: ["❄", "NixOS"],
  darwin: ["⌘", "macOS (nix-darwin)"],
  "home-manager": ["⌂", "Home Manager"],
  unknown: ["?", "Unknown host type"],
};

/** locationIcon picks a symbol for a location name. */
export function locationIcon(loc: string): string {
  switch (loc.toLowerCase()) {
    case "":
      return "";
    case "home":
      return "⌂";
    case "cloud":
      return "☁";
    case "office":
    case "work":
      return "▦";
    default:
      return "◉";
  }
}

/** deviceIcon picks a symbol for a device type. */
export function deviceIcon(dev: string): string {
  switch (dev.toLowerCase()) {
    case "":
      return "";
    case "server":
      return "▤";
    case "desktop":
      return "▭";
    case "laptop":
      return "⌨";
    case "gaming":
      return "◈";
    default:
      return "▪";
  }
}

/**
 * renderHostView writes a host into one layout. It is the only code that
 * changes a host's elements after the first paint.
 */
export function renderHostView(v: HostView, h: HostState, ctx: RenderContext): void {
  const state = indicatorState(h, ctx.now);
  const busy = isBusy(h);
  const root = v.root;
  cls(v, "root", root, "host-offline", !h.online);
  cls(v, "root", root, "host-stale", state === "stale");
  cls(v, "root", root, "host-busy", busy);
  cls(v, "root", root, "selected", ctx.selected);
  data(v, "root", root, "state", state);
  const color = safeColor(h.themeColor);
  put(v, "root.color", color, () => {
    if (color) root.style.setProperty("--host-color", color);
    else root.style.removeProperty("--host-color");
  });
  if (v.select) {
    const sel = v.select;
    put(v, "select.checked", ctx.selected ? "1" : "0", () => (sel.checked = ctx.selected));
  }

  // Status indicator: the ripple restarts on each new heartbeat by
  // alternating between two identical animations (no forced reflow).
  const status = v.fields.status;
  data(v, "status", status, "state", state);
  if (status && h.online && h.lastSeen !== null && h.lastSeen !== v.beat) {
    const first = v.beat === null;
    v.beat = h.lastSeen;
    if (!first && v.onScreen) {
      const odd = !status.classList.contains("beat-a");
      status.classList.toggle("beat-a", odd);
      status.classList.toggle("beat-b", !odd);
    }
  }
  const stateText =
    state === "offline"
      ? `Offline — last seen ${formatAge(h.lastSeen, ctx.now)}`
      : state === "busy"
        ? `Running ${h.runningCommand?.command ?? "a command"}`
        : state === "stale"
          ? `No heartbeat for ${formatAge(h.lastSeen, ctx.now).replace(" ago", "")}`
          : "Online";
  title(v, "status", status, stateText);

  text(v, "name", h.hostname);
  const nameTitle = [h.hostname, h.osVersion, h.nixpkgsVersion ? `nixpkgs ${h.nixpkgsVersion}` : ""]
    .filter(Boolean)
    .join("\n");
  title(v, "name", v.fields.name, nameTitle);

  const badge = commandBadge(h);
  text(v, "badge", badge);
  cls(v, "badge", v.fields.badge, "overdue", h.runningCommand?.overdue === true);
  title(v, "badge", v.fields.badge, h.runningCommand?.phase ?? "");

  const [typeIcon, typeName] = typeIcons[h.hostType];
  text(v, "type", typeIcon);
  title(v, "type", v.fields.type, [typeName, h.osVersion].filter(Boolean).join(" — "));
  text(v, "location", locationIcon(h.location));
  title(v, "location", v.fields.location, h.location);
  text(v, "device", deviceIcon(h.deviceType));
  title(v, "device", v.fields.device, h.deviceType);

  const m = h.metrics;
  text(v, "cpu-val", metricText(m?.cpu));
  cls(v, "cpu", v.fields.cpu, "metric-high", m !== null && m.cpu >= HIGH_METRIC);
  title(v, "cpu", v.fields.cpu, m ? `CPU ${m.cpu.toFixed(1)}%` : "No metrics");
  text(v, "ram-val", metricText(m?.ram));
  cls(v, "ram", v.fields.ram, "metric-high", m !== null && m.ram >= HIGH_METRIC);
  title(
    v,
    "ram",
    v.fields.ram,
    m ? `RAM ${Math.round(m.ram)}%, swap ${Math.round(m.swap)}%, load ${m.load.toFixed(2)}` : "No metrics",
  );

  const seen = lastSeenView(h, ctx.now);
  text(v, "last-seen", seen.text);
  data(v, "last-seen", v.fields["last-seen"], "level", seen.level);

  text(v, "agent", h.agentVersion || "—");
  cls(v, "agent", v.fields.agent, "outdated", h.agentOutdated);
  title(
    v,
    "agent",
    v.fields.agent,
    h.agentOutdated ? `Agent ${h.agentVersion} differs from server ${ctx.serverVersion}` : `Agent ${h.agentVersion}`,
  );

  text(v, "generation", h.generation ? shortHash(h.generation) : "—");
  title(v, "generation", v.fields.generation, [h.generation, h.generationMessage].filter(Boolean).join("\n"));

  for (const name of COMPARTMENTS) {
    const el = v.comps[name];
    if (!el) continue;
    const c = h.updateStatus[name];
    data(v, `comp.${name}`, el, "status", c.status);
    title(v, `comp.${name}`, el, compartmentTooltip(name, c, ctx.now, ctx.pendingPR, ctx.prUnchecked === true));
    if (name === "lock") cls(v, "comp.lock", el, "has-pr", ctx.pendingPR !== null);
  }

  cls(v, "refresh", v.fields.refresh, "loading", h.refreshing);
}

/** PanelEl is an element that can be hidden. */
export interface PanelEl extends El {
  hidden: boolean | string;
}

/** ButtonEl is a button. */
export interface ButtonEl extends PanelEl {
  disabled: boolean;
}

/** The page-wide elements that show pull requests. */
export interface PullRequestEls {
  /** The status line next to Bulk Actions, shown while looking fails, and its two parts. */
  status: PanelEl;
  statusError: El;
  statusSince: El;
  /** The Merge & Deploy entry in Bulk Actions, its separator and number. */
  merge: ButtonEl;
  mergeSep: PanelEl;
  mergeNumber: El;
}

function setText(e: El, value: string): void {
  if (e.textContent !== value) e.textContent = value;
}

function setTitle(e: El, value: string): void {
  if (e.title !== value) e.title = value;
}

function setHidden(e: PanelEl, value: boolean): void {
  if (e.hidden !== value) e.hidden = value;
}

/**
 * renderPullRequests writes the pull-request parts of Bulk Actions: the
 * Merge & Deploy entry for the pending (or last known) PR and, while looking
 * for pull requests fails, a status line naming the error and the last
 * success. Without PR support configured, none of it shows.
 */
export function renderPullRequests(e: PullRequestEls, p: PullRequestsPoll, now: number): void {
  const st = pullRequestsStatus(p, now);
  setHidden(e.status, st.hidden);
  setText(e.statusError, st.error);
  setText(e.statusSince, st.since ? ` ${st.since}` : "");
  setTitle(e.status, st.title);
  if (e.status.dataset.kind !== "error") e.status.dataset.kind = "error";

  const pr = p.configured ? p.pendingPR : null;
  setHidden(e.merge, pr === null);
  setHidden(e.mergeSep, pr === null);
  setText(e.mergeNumber, pr ? String(pr.number) : "");
  const disabled = pr !== null && !pr.mergeable;
  if (e.merge.disabled !== disabled) e.merge.disabled = disabled;
  let mergeTitle = "";
  if (pr) {
    mergeTitle = pr.mergeable ? pr.title : `${pr.title} (cannot be merged)`;
    if (!st.hidden) mergeTitle += `\nLast known pull request: looking for pull requests fails (${p.error})`;
  }
  setTitle(e.merge, mergeTitle);
}

/** renderBulkProgress writes the running bulk runs next to Bulk Actions; none hides it. */
export function renderBulkProgress(e: PanelEl, runs: BulkInfo[]): void {
  setHidden(e, runs.length === 0);
  setText(e, runs.map(bulkProgressText).join(" · "));
  setTitle(e, runs.map((b) => [bulkProgressText(b), b.message].filter(Boolean).join(" — ")).join("\n"));
}

/** Heartbeat-only changes are drawn at most this often (ms). */
export const HEARTBEAT_RENDER_MS = 250;

/** setOnScreen records whether a view is on screen; one leaving the screen stops its ripple. */
export function setOnScreen(v: HostView, on: boolean): void {
  v.onScreen = on;
  const status = v.fields.status;
  if (!on && status) {
    status.classList.toggle("beat-a", false);
    status.classList.toggle("beat-b", false);
  }
}

/**
 * RenderScheduler coalesces render requests into one pass per animation
 * frame: a burst of heartbeats for one host renders it once. Heartbeats that
 * change nothing but live data (metrics, last seen, the ripple) wait for a
 * pass at most every HEARTBEAT_RENDER_MS: a big fleet's steady stream of
 * heartbeats then costs a few frames a second instead of every frame, since
 * each frame's style, layout and paint cost grows with the page, not with
 * the number of hosts changed. Everything else is drawn in the next frame.
 */
export class RenderScheduler {
  private dirty = new Set<string>();
  private everything = false;
  private globals = false;
  private scheduled = false;
  private timer = false;
  private lastFlush = Number.NEGATIVE_INFINITY;

  constructor(
    private readonly requestFrame: (cb: () => void) => void,
    private readonly flushHosts: (ids: Iterable<string>, all: boolean) => void,
    private readonly flushGlobal: () => void,
    private readonly setTimer: (cb: () => void, ms: number) => void = (cb, ms) => void setTimeout(cb, ms),
    private readonly now: () => number = () => performance.now(),
    private readonly lazyMs = HEARTBEAT_RENDER_MS,
  ) {}

  /** host marks one host for the next frame. */
  host(id: string): void {
    this.dirty.add(id);
    this.schedule();
  }

  /**
   * heartbeat marks one host whose live data changed: it is drawn with the
   * next pass, which comes no later than HEARTBEAT_RENDER_MS after the last.
   */
  heartbeat(id: string): void {
    this.dirty.add(id);
    if (this.scheduled || this.timer) return;
    const wait = this.lastFlush + this.lazyMs - this.now();
    if (wait <= 0) {
      this.schedule();
      return;
    }
    this.timer = true;
    this.setTimer(() => {
      this.timer = false;
      if (this.dirty.size > 0 || this.everything || this.globals) this.schedule();
    }, wait);
  }

  /** all marks every host (a clock tick, a PR change). */
  all(): void {
    this.everything = true;
    this.schedule();
  }

  /** global marks the page-wide parts (header, footer, menus). */
  global(): void {
    this.globals = true;
    this.schedule();
  }

  /** flush renders what is marked now. */
  flush(): void {
    this.scheduled = false;
    this.lastFlush = this.now();
    const ids = this.dirty;
    const all = this.everything;
    const globals = this.globals;
    this.dirty = new Set();
    this.everything = false;
    this.globals = false;
    if (all || ids.size > 0) this.flushHosts(ids, all);
    if (globals) this.flushGlobal();
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    this.requestFrame(() => this.flush());
  }
}
