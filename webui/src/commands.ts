// CommandTracker remembers what the page knows about recent command runs, so
// that events and RPC answers can arrive in any order: a fast command's end
// often reaches the page on the watch stream before the RunCommand answer
// that names it. States only move forward (an end is never undone by an
// older "running"), and a command started from this page is reported once,
// whichever of its end and its RunCommand answer comes second.

import type { BulkInfo } from "./events";
import { isTerminal, type CommandInfo, type CommandStateName } from "./model";

/** Commands remembered; the oldest is forgotten first. */
export const TRACKED_COMMANDS = 500;

/** stateRank orders states along a run: an update never moves a command back. */
export function stateRank(s: CommandStateName | string): number {
  switch (s) {
    case "":
    case "unknown":
      return 0;
    case "validating":
      return 1;
    case "queued":
      return 2;
    case "running":
      return 3;
    case "post-validation":
      return 4;
    default:
      return isTerminal(s as CommandStateName) ? 5 : 0;
  }
}

/** advances reports whether next may replace cur: a later state, or the same stage with news. */
export function advances(cur: string, next: string): boolean {
  return stateRank(next) >= stateRank(cur) && !(isTerminal(cur as CommandStateName) && cur !== next);
}

/** CommandTracker holds recent commands' latest states and the page's own runs. */
export class CommandTracker {
  private readonly known = new Map<string, CommandInfo>();
  private readonly mine = new Set<string>();

  constructor(private readonly limit = TRACKED_COMMANDS) {}

  /**
   * seen records a command from any source and returns the most advanced
   * view of it: an older state than the one known is not taken.
   */
  seen(cmd: CommandInfo): CommandInfo {
    if (!cmd.id) return cmd;
    const cur = this.known.get(cmd.id);
    if (cur && !advances(cur.state, cmd.state)) return cur;
    this.known.delete(cmd.id);
    this.known.set(cmd.id, cmd);
    while (this.known.size > this.limit) {
      const oldest = this.known.keys().next().value;
      if (oldest === undefined) break;
      this.known.delete(oldest);
      this.mine.delete(oldest);
    }
    return cmd;
  }

  /** get returns the latest known view of a command. */
  get(id: string): CommandInfo | undefined {
    return this.known.get(id);
  }

  /**
   * claim marks a command as started by this page: its end is reported
   * once, by ended(), whether it is already known or still to come.
   */
  claim(cmd: CommandInfo): void {
    if (!cmd.id) return;
    this.mine.add(cmd.id);
    this.seen(cmd);
  }

  /** ended records a command's end; true when this page started it and has not reported it yet. */
  ended(cmd: CommandInfo): boolean {
    this.seen(cmd);
    return this.mine.delete(cmd.id);
  }

  /** pending lists the page's own commands whose end has not arrived. */
  pending(): string[] {
    return Array.from(this.mine);
  }
}

/** Ended bulk runs remembered, so a late "running" cannot bring one back. */
export const TRACKED_BULKS = 100;

/**
 * BulkRuns holds the bulk runs the page has heard of: the running ones are
 * shown next to Bulk Actions until they end. An ended run never comes back
 * to running (its end is kept, so an RPC answer that arrives after the end
 * event still learns it), and a running one never loses progress to an
 * older event.
 */
export class BulkRuns {
  private readonly runs = new Map<string, BulkInfo>();
  private readonly ended = new Map<string, BulkInfo>();

  constructor(private readonly limit = TRACKED_BULKS) {}

  /** seen records a run's state and returns the latest view; a run without an id is returned as is. */
  seen(b: BulkInfo): BulkInfo {
    if (!b.id) return b;
    const done = this.ended.get(b.id);
    if (done) return done;
    const cur = this.runs.get(b.id);
    const next = cur ? { ...b, prNumber: b.prNumber || cur.prNumber, commit: b.commit || cur.commit } : b;
    if (b.state === "running" || b.state === "unknown") {
      if (cur && b.done < cur.done) return cur;
      this.runs.set(b.id, next);
      return next;
    }
    this.runs.delete(b.id);
    this.ended.set(b.id, next);
    while (this.ended.size > this.limit) {
      const oldest = this.ended.keys().next().value;
      if (oldest === undefined) break;
      this.ended.delete(oldest);
    }
    return next;
  }

  /**
   * sync takes a snapshot's runs not yet ended: each is seen as its progress
   * event would be, and a running run the snapshot no longer lists (it ended
   * meanwhile) stops showing. It returns the runs it dropped.
   */
  sync(active: BulkInfo[]): BulkInfo[] {
    const listed = new Set<string>();
    for (const b of active) {
      if (!b.id) continue;
      listed.add(b.id);
      this.seen(b);
    }
    const dropped: BulkInfo[] = [];
    for (const [id, b] of this.runs) {
      if (listed.has(id)) continue;
      this.runs.delete(id);
      dropped.push(b);
    }
    return dropped;
  }

  /** running lists the runs not yet ended, in the order they were first heard of. */
  running(): BulkInfo[] {
    return Array.from(this.runs.values());
  }

  /** forget drops a running run whose end the page can no longer learn. */
  forget(id: string): void {
    this.runs.delete(id);
  }
}
