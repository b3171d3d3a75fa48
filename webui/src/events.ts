// applyEvent routes one FleetEvent from the watch stream into the stores.
// It is defensive: a malformed or unknown event is ignored, never thrown on,
// because one bad event must not stop the stream that carries all the others.

import type { BulkCommand, FleetEvent, Snapshot } from "./gen/nixplane/fleet/v1/fleet_pb";
import { BulkState } from "./gen/nixplane/fleet/v1/fleet_pb";
import {
  commandFromProto,
  hostFromProto,
  hostPatchFromProto,
  isTerminal,
  lineFromProto,
  metricsFromProto,
  shortHash,
  targetFromProto,
  tsMs,
  type CommandInfo,
  type HostPatch,
  type LogLine,
} from "./model";
import type { GlobalStore, HostStore, ServerClock } from "./store";

/** A bulk run's progress as the page shows it. */
export interface BulkInfo {
  id: string;
  command: string;
  state: "running" | "succeeded" | "partial" | "failed" | "unknown";
  done: number;
  total: number;
  message: string;
  /** For merge-and-deploy: the merged PR (0 when unknown) and the commit deployed. */
  prNumber: number;
  commit: string;
}

/** EventSink receives what is not host or global state: logs, command and bulk news. */
export interface EventSink {
  commandQueued?(cmd: CommandInfo): void;
  commandUpdated?(cmd: CommandInfo): void;
  commandOutput?(hostId: string, commandId: string, lines: LogLine[]): void;
  commandComplete?(cmd: CommandInfo): void;
  bulkProgress?(bulk: BulkInfo): void;
  /**
   * snapshot follows a (re)started stream's snapshot, with its commands and
   * bulk runs not yet ended: a run it does not list has ended.
   */
  snapshot?(resync: boolean, active: CommandInfo[], bulks: BulkInfo[]): void;
}

/** Stores is what events write into. */
export interface Stores {
  hosts: HostStore;
  global: GlobalStore;
  clock?: ServerClock;
  sink?: EventSink;
}

/** bulkFromProto converts a bulk run. */
export function bulkFromProto(b: BulkCommand): BulkInfo {
  const states: Record<number, BulkInfo["state"]> = {
    [BulkState.RUNNING]: "running",
    [BulkState.SUCCEEDED]: "succeeded",
    [BulkState.PARTIAL]: "partial",
    [BulkState.FAILED]: "failed",
  };
  const results = Array.isArray(b.results) ? b.results : [];
  const done = results.filter((r) => r.blockReason || (r.command && isTerminal(commandFromProto(r.command).state))).length;
  return {
    id: b.bulkId,
    command: b.command,
    state: states[b.state] ?? "unknown",
    done,
    total: results.length,
    message: typeof b.message === "string" ? b.message : "",
    prNumber: typeof b.prNumber === "number" && Number.isInteger(b.prNumber) && b.prNumber > 0 ? b.prNumber : 0,
    commit: typeof b.commit === "string" ? b.commit : "",
  };
}

/**
 * activeBulksOf returns a snapshot's bulk runs not yet ended (the first
 * paint's or a stream's), converted as a BulkProgress event's run is; runs
 * without an id are left out.
 */
export function activeBulksOf(snap: Pick<Snapshot, "activeBulks">): BulkInfo[] {
  const list: unknown = snap.activeBulks;
  if (!Array.isArray(list)) return [];
  return list
    .filter((b): b is BulkCommand => !!b && typeof b === "object" && typeof (b as BulkCommand).bulkId === "string" && (b as BulkCommand).bulkId !== "")
    .map(bulkFromProto);
}

/**
 * bulkLabel names a bulk run for people: "Merge & Deploy PR #42 (abc1234)"
 * for a merge-and-deploy, "Do All" for do-all, else the command.
 */
export function bulkLabel(b: Pick<BulkInfo, "command" | "prNumber" | "commit">): string {
  switch (b.command) {
    case "merge-and-deploy": {
      let s = "Merge & Deploy";
      if (b.prNumber > 0) s += ` PR #${b.prNumber}`;
      if (b.commit) s += ` (${shortHash(b.commit)})`;
      return s;
    }
    case "do-all":
      return "Do All";
    default:
      return b.command || "bulk run";
  }
}

/** bulkProgressText is a bulk run's progress line: "Merge & Deploy PR #42 (abc1234): 3/10 hosts". */
export function bulkProgressText(b: BulkInfo): string {
  const label = bulkLabel(b);
  if (b.state === "running") return b.total > 0 ? `${label}: ${b.done}/${b.total} hosts` : `${label}…`;
  return `${label} on ${b.total} hosts: ${b.state}${b.message ? ` — ${b.message}` : ""}`;
}

function hostIdOf(v: unknown): string {
  if (v && typeof v === "object" && "hostId" in v) {
    const id = (v as { hostId: unknown }).hostId;
    if (typeof id === "string") return id;
  }
  return "";
}

/**
 * applyEvent applies one event. It returns false when the event was ignored
 * (malformed, unknown kind, or about a host the page does not know).
 */
export function applyEvent(ev: unknown, s: Stores): boolean {
  try {
    return apply(ev, s);
  } catch (err) {
    // A message that passed decoding but breaks an assumption is dropped.
    console.warn("fleet event ignored", err);
    return false;
  }
}

function apply(ev: unknown, s: Stores): boolean {
  if (!ev || typeof ev !== "object" || !("kind" in ev)) return false;
  const kind = (ev as FleetEvent).kind;
  if (!kind || typeof kind !== "object" || !kind.value) return false;
  switch (kind.case) {
    case "snapshot": {
      const snap = kind.value;
      const hosts = (Array.isArray(snap.hosts) ? snap.hosts : []).filter((h) => h && h.hostId).map(hostFromProto);
      const active = (Array.isArray(snap.activeCommands) ? snap.activeCommands : []).map(commandFromProto);
      for (const cmd of active) {
        const h = hosts.find((x) => x.id === cmd.hostId);
        if (h && !h.runningCommand && !isTerminal(cmd.state)) h.runningCommand = cmd;
      }
      s.hosts.replaceAll(hosts);
      s.global.hydrate(snap);
      s.sink?.snapshot?.(
        snap.resync === true,
        active.filter((c) => c.id && !isTerminal(c.state)),
        activeBulksOf(snap),
      );
      return true;
    }
    case "hostHeartbeat": {
      const hb = kind.value;
      const id = hostIdOf(hb);
      if (!id || !s.hosts.has(id)) return false;
      const lastSeen = tsMs(hb.lastSeen);
      s.clock?.observe(lastSeen);
      const patch: HostPatch = { online: true };
      if (lastSeen !== null) patch.lastSeen = lastSeen;
      const m = metricsFromProto(hb.metrics);
      if (m) patch.metrics = m;
      // A heartbeat that brings a host back online changes its state.
      return s.hosts.update(id, patch, s.hosts.get(id)?.online ? "heartbeat" : "update");
    }
    case "hostOffline": {
      const id = hostIdOf(kind.value);
      if (!id) return false;
      return s.hosts.setOffline(id, tsMs(kind.value.lastSeen));
    }
    case "hostRegistered": {
      const h = kind.value.host;
      if (!h || !h.hostId) return false;
      s.hosts.add(hostFromProto(h));
      return true;
    }
    case "hostRemoved": {
      const id = hostIdOf(kind.value);
      return id ? s.hosts.remove(id) : false;
    }
    case "hostStatusChanged": {
      const h = kind.value.host;
      if (!h || !h.hostId) return false;
      if (!s.hosts.has(h.hostId)) {
        s.hosts.add(hostFromProto(h));
        return true;
      }
      return s.hosts.update(h.hostId, hostPatchFromProto(h));
    }
    case "commandQueued":
    case "commandUpdated": {
      if (!kind.value.command) return false;
      const cmd = commandFromProto(kind.value.command);
      if (!cmd.hostId || !cmd.id) return false;
      const h = s.hosts.get(cmd.hostId);
      if (h) {
        const cur = h.runningCommand;
        if (isTerminal(cmd.state)) {
          if (cur && cur.id === cmd.id) s.hosts.update(cmd.hostId, { runningCommand: null });
        } else if (!cur || cur.id === cmd.id || kind.case === "commandQueued") {
          s.hosts.update(cmd.hostId, { runningCommand: cmd });
        }
      }
      if (kind.case === "commandQueued") s.sink?.commandQueued?.(cmd);
      else s.sink?.commandUpdated?.(cmd);
      return h !== undefined;
    }
    case "commandOutput": {
      const out = kind.value;
      const id = hostIdOf(out);
      if (!id || typeof out.commandId !== "string" || !out.commandId) return false;
      const lines = (Array.isArray(out.lines) ? out.lines : []).map(lineFromProto).filter((l) => l.seq > 0);
      s.sink?.commandOutput?.(id, out.commandId, lines);
      return true;
    }
    case "commandComplete": {
      if (!kind.value.command) return false;
      const cmd = commandFromProto(kind.value.command);
      if (!cmd.hostId) return false;
      const h = s.hosts.get(cmd.hostId);
      if (h && (!h.runningCommand || h.runningCommand.id === cmd.id)) {
        s.hosts.update(cmd.hostId, { runningCommand: null });
      }
      s.sink?.commandComplete?.(cmd);
      return h !== undefined;
    }
    case "pendingPrChanged": {
      s.global.notePullRequests(kind.value);
      return true;
    }
    case "targetChanged": {
      const t = targetFromProto(kind.value.target);
      if (!t) return false;
      s.global.update({ target: t });
      return true;
    }
    case "bulkProgress": {
      if (!kind.value.bulk) return false;
      s.sink?.bulkProgress?.(bulkFromProto(kind.value.bulk));
      return true;
    }
    default:
      return false;
  }
}
