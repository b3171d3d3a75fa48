// The log panel's data: one tab per host, each holding the output of the
// commands seen for that host, ordered and de-duplicated by sequence number
// (history loaded with GetCommandLog and live CommandOutput lines overlap).

import { advances } from "./commands";
import type { LogLine } from "./model";

/** Lines kept per tab; older lines are dropped first. */
export const MAX_TAB_LINES = 5000;

/** LogSection is one command's output inside a tab. */
export interface LogSection {
  commandId: string;
  command: string;
  state: string;
  lines: LogLine[];
  /** Highest seq held. */
  lastSeq: number;
  /** Lines before firstSeq were dropped or never loaded. */
  firstSeq: number;
}

/** AddResult says how the tab changed. */
export interface AddResult {
  /** Lines appended at the end (render them incrementally). */
  appended: LogLine[];
  /** Lines were inserted before the end: render the tab again. */
  reordered: boolean;
  /** A gap: lines after this seq are missing and should be fetched. */
  gapAfter: number | null;
}

/** LogTab is one host's output. */
export class LogTab {
  readonly sections: LogSection[] = [];
  /** Live lines may arrive before history: gaps are only reported once history is in. */
  historyLoaded = false;

  constructor(readonly hostId: string) {}

  /** section finds or creates a command's section. */
  section(commandId: string, command = ""): LogSection {
    let s = this.sections.find((x) => x.commandId === commandId);
    if (!s) {
      s = { commandId, command, state: "", lines: [], lastSeq: 0, firstSeq: 1 };
      this.sections.push(s);
    } else if (command && !s.command) {
      s.command = command;
    }
    return s;
  }

  /**
   * setState records a command's state in its section, creating the
   * section if needed. It returns whether the section's header changed. A
   * state never moves back: an ended command stays ended when an older
   * "running" answer arrives after its end.
   */
  setState(commandId: string, state: string, command = ""): boolean {
    const before = this.sections.find((x) => x.commandId === commandId);
    const hadName = before?.command ?? "";
    const s = this.section(commandId, command);
    let changed = before === undefined || s.command !== hadName;
    if (s.state !== state && advances(s.state, state)) {
      s.state = state;
      changed = true;
    }
    return changed;
  }

  /** add merges lines of one command. */
  add(commandId: string, lines: LogLine[], command = ""): AddResult {
    const s = this.section(commandId, command);
    const last = this.sections[this.sections.length - 1] === s;
    const res: AddResult = { appended: [], reordered: false, gapAfter: null };
    const sorted = [...lines].sort((a, b) => a.seq - b.seq);
    for (const l of sorted) {
      if (!Number.isFinite(l.seq) || l.seq <= 0) continue;
      if (l.seq > s.lastSeq) {
        if (this.historyLoaded && s.lastSeq > 0 && l.seq > s.lastSeq + 1 && res.gapAfter === null) {
          res.gapAfter = s.lastSeq;
        }
        s.lines.push(l);
        s.lastSeq = l.seq;
        if (last && !res.reordered) res.appended.push(l);
        else res.reordered = true;
      } else if (l.seq >= s.firstSeq) {
        const i = lowerBound(s.lines, l.seq);
        if (s.lines[i]?.seq === l.seq) continue;
        s.lines.splice(i, 0, l);
        res.reordered = true;
      }
    }
    if (this.trim()) res.reordered = true;
    if (res.reordered) res.appended = [];
    return res;
  }

  /** lineCount is the number of lines held. */
  lineCount(): number {
    return this.sections.reduce((n, s) => n + s.lines.length, 0);
  }

  /** latest is the newest section. */
  latest(): LogSection | undefined {
    return this.sections[this.sections.length - 1];
  }

  private trim(): boolean {
    let over = this.lineCount() - MAX_TAB_LINES;
    if (over <= 0) return false;
    while (over > 0 && this.sections.length > 0) {
      const s = this.sections[0]!;
      const n = Math.min(over, s.lines.length);
      const dropped = s.lines.splice(0, n);
      if (dropped.length > 0) s.firstSeq = dropped[dropped.length - 1]!.seq + 1;
      over -= n;
      if (s.lines.length === 0 && this.sections.length > 1) this.sections.shift();
      else if (n === 0) break;
    }
    return true;
  }

  /** text is the tab as a plain-text log, for copy and download. */
  text(): string {
    const out: string[] = [];
    for (const s of this.sections) {
      out.push(`=== ${s.command || "command"} ${s.commandId}${s.state ? ` (${s.state})` : ""} ===`);
      for (const l of s.lines) out.push(formatLine(l));
    }
    return out.join("\n") + "\n";
  }
}

function lowerBound(lines: LogLine[], seq: number): number {
  let lo = 0;
  let hi = lines.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (lines[mid]!.seq < seq) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function pad(n: number): string {
  return n < 10 ? `0${n}` : `${n}`;
}

/** formatLine writes "[HH:MM:SS] [ERR] text" (UTC). */
export function formatLine(l: LogLine): string {
  let prefix = "";
  if (l.time !== null) {
    const d = new Date(l.time);
    prefix = `[${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}] `;
  }
  const tag = l.stream === "stderr" ? "[ERR] " : l.stream === "system" ? "[SYS] " : "";
  return prefix + tag + l.text;
}

/** LogBook holds the open tabs and which one is shown. */
export class LogBook {
  readonly tabs = new Map<string, LogTab>();
  active: string | null = null;

  /** open returns a host's tab, creating it; created says whether it is new. */
  open(hostId: string): { tab: LogTab; created: boolean } {
    let tab = this.tabs.get(hostId);
    const created = !tab;
    if (!tab) {
      tab = new LogTab(hostId);
      this.tabs.set(hostId, tab);
    }
    return { tab, created };
  }

  /** close removes a tab and picks another to show. */
  close(hostId: string): void {
    this.tabs.delete(hostId);
    if (this.active === hostId) {
      const ids = Array.from(this.tabs.keys());
      this.active = ids.length > 0 ? ids[ids.length - 1]! : null;
    }
  }
}
