// The page's single source of truth: hostStore holds every host, globalState
// the fleet-wide facts (pending PR, fleet target, connection). Every change
// goes through these, and every change notifies a listener that schedules
// the render; nothing else writes host state.

import type { Snapshot } from "./gen/nixplane/fleet/v1/fleet_pb";
import {
  compareHosts,
  hostFromProto,
  mergeHost,
  nextPullRequestsPoll,
  targetFromProto,
  type HostPatch,
  type HostState,
  type PendingPRState,
  type PullRequestsNews,
  type PullRequestsPoll,
  type TargetState,
} from "./model";

/** What changed about a host; "heartbeat" is live data only (metrics, last seen). */
export type HostChange = "update" | "heartbeat" | "add" | "remove";

/** HostListener hears every host change. */
export type HostListener = (id: string, change: HostChange) => void;

/** HostStore is the Map of hosts with the only update path. */
export class HostStore {
  private hosts = new Map<string, HostState>();
  private listener: HostListener;

  constructor(listener: HostListener = () => {}) {
    this.listener = listener;
  }

  /** listen replaces the change listener. */
  listen(listener: HostListener): void {
    this.listener = listener;
  }

  /** hydrate loads the server-rendered snapshot's hosts. */
  hydrate(snapshot: Snapshot): void {
    this.replaceAll(snapshot.hosts.filter((h) => h && h.hostId).map(hostFromProto));
  }

  /** get returns a host, or undefined. */
  get(id: string): HostState | undefined {
    return this.hosts.get(id);
  }

  /** has reports whether the host is known. */
  has(id: string): boolean {
    return this.hosts.has(id);
  }

  /** all returns every host, sorted by name. */
  all(): HostState[] {
    return Array.from(this.hosts.values()).sort(compareHosts);
  }

  /** size is the number of hosts. */
  get size(): number {
    return this.hosts.size;
  }

  /**
   * update merges a patch into a known host (deep for metrics and
   * updateStatus). An unknown host is ignored: it returns false. change
   * tells the listener whether only live data changed.
   */
  update(id: string, patch: HostPatch, change: "update" | "heartbeat" = "update"): boolean {
    const cur = this.hosts.get(id);
    if (!cur) return false;
    this.hosts.set(id, mergeHost(cur, patch));
    this.listener(id, change);
    return true;
  }

  /** setOffline marks a host offline; its running command cannot go on. */
  setOffline(id: string, lastSeen: number | null = null): boolean {
    const patch: HostPatch = { online: false, runningCommand: null };
    if (lastSeen !== null) patch.lastSeen = lastSeen;
    return this.update(id, patch);
  }

  /** add inserts a new host; a known one is updated with it instead. */
  add(host: HostState): void {
    if (!host.id) return;
    const cur = this.hosts.get(host.id);
    if (cur) {
      const { id: _id, refreshing: _r, ...patch } = host;
      this.update(host.id, patch);
      return;
    }
    this.hosts.set(host.id, { ...host });
    this.listener(host.id, "add");
  }

  /** remove deletes a host; it returns false when it was not known. */
  remove(id: string): boolean {
    if (!this.hosts.delete(id)) return false;
    this.listener(id, "remove");
    return true;
  }

  /** replaceAll makes the store hold exactly these hosts. */
  replaceAll(hosts: HostState[]): void {
    const keep = new Set(hosts.map((h) => h.id));
    for (const id of Array.from(this.hosts.keys())) {
      if (!keep.has(id)) this.remove(id);
    }
    for (const h of hosts) {
      const cur = this.hosts.get(h.id);
      if (cur) {
        // A snapshot is the whole truth: replace, keeping only UI state.
        this.hosts.set(h.id, { ...h, refreshing: cur.refreshing });
        this.listener(h.id, "update");
      } else {
        this.add(h);
      }
    }
  }
}

/** ConnectionState is the watch stream's state as the footer shows it. */
export type ConnectionState = "connecting" | "open" | "reconnecting" | "paused" | "closed";

/** GlobalData is what is not about one host. */
export interface GlobalData {
  pendingPR: PendingPRState | null;
  pullRequestsConfigured: boolean;
  /** Why the last look for pull requests failed; empty when it worked. */
  pullRequestsError: string;
  /** When pull requests were last looked for successfully, epoch ms. */
  pullRequestsCheckedAt: number | null;
  target: TargetState | null;
  serverVersion: string;
  connection: ConnectionState;
  /** Reconnect attempt number while reconnecting. */
  attempt: number;
  /** Epoch ms of the next reconnect attempt. */
  retryAt: number | null;
  /** Last stream error text, shown in the footer's tooltip. */
  lastError: string;
}

/** GlobalStore holds GlobalData and notifies on change. */
export class GlobalStore {
  readonly state: GlobalData = {
    pendingPR: null,
    pullRequestsConfigured: false,
    pullRequestsError: "",
    pullRequestsCheckedAt: null,
    target: null,
    serverVersion: "",
    connection: "connecting",
    attempt: 0,
    retryAt: null,
    lastError: "",
  };
  private listener: () => void;

  constructor(listener: () => void = () => {}) {
    this.listener = listener;
  }

  /** listen replaces the change listener. */
  listen(listener: () => void): void {
    this.listener = listener;
  }

  /** update merges a patch and notifies. */
  update(patch: Partial<GlobalData>): void {
    Object.assign(this.state, patch);
    this.listener();
  }

  /** hydrate loads the snapshot's fleet-wide facts. */
  hydrate(s: Snapshot): void {
    const configured = s.pullRequestsConfigured === true;
    const poll = nextPullRequestsPoll({ ...this.pullRequests(), configured }, s);
    this.update({
      pendingPR: poll.pendingPR,
      pullRequestsConfigured: configured,
      pullRequestsError: poll.error,
      pullRequestsCheckedAt: poll.checkedAt,
      target: targetFromProto(s.target),
      serverVersion: typeof s.serverVersion === "string" ? s.serverVersion : "",
    });
  }

  /** pullRequests is the pull-request poll's state. */
  pullRequests(): PullRequestsPoll {
    const g = this.state;
    return { configured: g.pullRequestsConfigured, error: g.pullRequestsError, checkedAt: g.pullRequestsCheckedAt, pendingPR: g.pendingPR };
  }

  /**
   * notePullRequests applies a PendingPRChanged event or a refresh answer
   * (see nextPullRequestsPoll); withPR false leaves the pending PR alone.
   */
  notePullRequests(news: PullRequestsNews, withPR = true): void {
    const poll = nextPullRequestsPoll(this.pullRequests(), news, withPR);
    this.update({ pendingPR: poll.pendingPR, pullRequestsError: poll.error, pullRequestsCheckedAt: poll.checkedAt });
  }
}

/**
 * ServerClock estimates server time from heartbeat timestamps, so "last
 * seen" ages are right even when the browser's clock is off. The offset is
 * the smallest (client − server) difference among recent samples: network
 * delay only ever makes it larger.
 */
export class ServerClock {
  private samples: number[] = [];
  private offset = 0;
  private readonly now: () => number;

  constructor(now: () => number = () => Date.now()) {
    this.now = now;
  }

  /** observe records a server time that was current when it arrived. */
  observe(serverMs: number | null): void {
    if (serverMs === null || !Number.isFinite(serverMs)) return;
    this.samples.push(this.now() - serverMs);
    if (this.samples.length > 32) this.samples.shift();
    this.offset = Math.min(...this.samples);
  }

  /** serverNow is the estimated current server time. */
  serverNow(): number {
    return this.now() - this.offset;
  }
}
