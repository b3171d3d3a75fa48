// The log panel in the page: tabs, the line list, follow mode, copy and
// download. The data lives in a LogBook (logs.ts); this file only draws it.
// Lines are inserted with textContent, so output is never parsed as HTML.

import { formatLine, LogBook, MAX_TAB_LINES, type LogSection, type LogTab } from "./logs";
import type { LogLine } from "./model";

/** LogPanel draws a LogBook. */
export class LogPanel {
  readonly book = new LogBook();
  private readonly panel: HTMLElement;
  private readonly tabsEl: HTMLElement;
  private readonly body: HTMLElement;
  private readonly follow: HTMLInputElement;
  private shownHost: string | null = null;
  /** Section header elements of the shown tab, by command id. */
  private readonly headers = new Map<string, HTMLElement>();

  constructor(
    private readonly hostName: (id: string) => string,
    private readonly hostState: (id: string) => string,
  ) {
    this.panel = req("log-panel");
    this.tabsEl = req("log-tabs");
    this.body = req("log-body");
    this.follow = req("log-follow") as HTMLInputElement;
    this.body.addEventListener("scroll", () => {
      const atBottom = this.body.scrollHeight - this.body.scrollTop - this.body.clientHeight < 8;
      if (this.follow.checked !== atBottom) this.follow.checked = atBottom;
    });
    this.follow.addEventListener("change", () => this.scroll());
    this.tabsEl.addEventListener("click", (e) => {
      const t = e.target as HTMLElement;
      const tab = t.closest<HTMLElement>("[data-host-id]");
      if (!tab?.dataset.hostId) return;
      if (t.closest(".log-tab-close")) this.close(tab.dataset.hostId);
      else this.show(tab.dataset.hostId);
    });
    req("log-close").addEventListener("click", () => (this.panel.hidden = true));
    req("log-copy").addEventListener("click", () => void this.copy());
    req("log-download").addEventListener("click", () => this.download());
  }

  /** show makes a host's tab active and the panel visible. */
  show(hostId: string): LogTab {
    const { tab } = this.book.open(hostId);
    this.book.active = hostId;
    this.panel.hidden = false;
    this.renderTabs();
    this.renderBody();
    return tab;
  }

  /** close removes a tab. */
  close(hostId: string): void {
    this.book.close(hostId);
    if (this.book.tabs.size === 0) this.panel.hidden = true;
    this.renderTabs();
    this.renderBody();
  }

  /** changed redraws after lines were added to a tab. */
  changed(hostId: string, appended: LogLine[] | null): void {
    if (this.book.active !== hostId || this.shownHost !== hostId) {
      this.renderTabs();
      return;
    }
    if (appended === null) {
      this.renderBody();
      return;
    }
    for (const l of appended) this.body.appendChild(lineEl(l));
    while (this.body.childElementCount > MAX_TAB_LINES + 50) this.body.firstElementChild?.remove();
    this.scroll();
  }

  /**
   * sectionChanged redraws one command's section header after its state
   * changed; a section not drawn yet redraws the tab.
   */
  sectionChanged(hostId: string, commandId: string): void {
    if (this.book.active !== hostId || this.shownHost !== hostId) {
      this.renderTabs();
      return;
    }
    const s = this.book.tabs.get(hostId)?.sections.find((x) => x.commandId === commandId);
    const head = this.headers.get(commandId);
    if (!s || !head) {
      this.renderBody();
      return;
    }
    const text = sectionTitle(s);
    if (head.textContent !== text) head.textContent = text;
    head.dataset.state = s.state;
  }

  /** renderTabs redraws the tab strip (few elements; rebuilt whole). */
  renderTabs(): void {
    const frag = document.createDocumentFragment();
    for (const id of this.book.tabs.keys()) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "log-tab";
      b.setAttribute("role", "tab");
      b.dataset.hostId = id;
      b.dataset.state = this.hostState(id);
      b.setAttribute("aria-selected", String(id === this.book.active));
      const name = document.createElement("span");
      name.textContent = this.hostName(id);
      const x = document.createElement("span");
      x.className = "log-tab-close";
      x.textContent = "×";
      x.title = "Close tab";
      b.append(name, x);
      frag.appendChild(b);
    }
    this.tabsEl.replaceChildren(frag);
  }

  private renderBody(): void {
    const id = this.book.active;
    this.shownHost = id;
    const tab = id ? this.book.tabs.get(id) : undefined;
    const frag = document.createDocumentFragment();
    this.headers.clear();
    if (tab) {
      for (const s of tab.sections) {
        const head = document.createElement("div");
        head.className = "log-section";
        head.dataset.commandId = s.commandId;
        head.dataset.state = s.state;
        head.textContent = sectionTitle(s);
        this.headers.set(s.commandId, head);
        frag.appendChild(head);
        for (const l of s.lines) frag.appendChild(lineEl(l));
      }
      if (tab.sections.length === 0) {
        const empty = document.createElement("div");
        empty.className = "log-empty";
        empty.textContent = tab.historyLoaded ? "No commands have run on this host yet." : "Loading…";
        frag.appendChild(empty);
      }
    }
    this.body.replaceChildren(frag);
    this.scroll();
  }

  private scroll(): void {
    if (this.follow.checked) this.body.scrollTop = this.body.scrollHeight;
  }

  private activeText(): string {
    const id = this.book.active;
    const tab = id ? this.book.tabs.get(id) : undefined;
    return tab ? tab.text() : "";
  }

  private async copy(): Promise<void> {
    try {
      await navigator.clipboard.writeText(this.activeText());
      this.panel.dataset.copied = String(Date.now());
    } catch {
      // Clipboard access can be refused; the download still works.
    }
  }

  private download(): void {
    const id = this.book.active;
    if (!id) return;
    const tab = this.book.tabs.get(id);
    const cmd = tab?.latest();
    const blob = new Blob([this.activeText()], { type: "text/plain;charset=utf-8" });
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = `${id}${cmd ? `-${cmd.command || "command"}-${cmd.commandId}` : ""}.log`;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  }
}

/** sectionTitle is a section header's text: command, id and state. */
export function sectionTitle(s: LogSection): string {
  return `── ${s.command || "command"} ${s.commandId}${s.state ? ` · ${s.state}` : ""} ──`;
}

function lineEl(l: LogLine): HTMLElement {
  const d = document.createElement("div");
  d.className = `log-line log-${l.stream}`;
  d.dataset.seq = String(l.seq);
  d.textContent = formatLine(l);
  return d;
}

function req(id: string): HTMLElement {
  const el = document.getElementById(id);
  if (!el) throw new Error(`page element #${id} missing`);
  return el;
}
