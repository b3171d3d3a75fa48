// Small page widgets: the toast, the confirm and blocked-command dialogs, and
// dropdown menus. Texts are always set with textContent.

import type { BlockInfo } from "./errors";

function byId<T extends HTMLElement>(id: string): T {
  const el = document.getElementById(id);
  if (!el) throw new Error(`page element #${id} missing`);
  return el as T;
}

let toastTimer: ReturnType<typeof setTimeout> | undefined;

/** showToast shows a short message at the bottom of the page. */
export function showToast(text: string, kind: "info" | "error" | "ok" = "info"): void {
  const t = byId("toast");
  t.textContent = text;
  t.dataset.kind = kind;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (t.hidden = true), kind === "error" ? 8000 : 5000);
}

function runDialog(d: HTMLDialogElement): Promise<string> {
  return new Promise((resolve) => {
    d.returnValue = "cancel";
    d.addEventListener("close", () => resolve(d.returnValue || "cancel"), { once: true });
    d.showModal();
  });
}

/** ConfirmOptions configures the confirm dialog. */
export interface ConfirmOptions {
  title: string;
  text: string;
  ok: string;
  /** Ask for a TOTP code too. */
  totp?: boolean;
  danger?: boolean;
}

/** confirmDialog asks a yes/no question; it resolves with the answer and any TOTP code. */
export async function confirmDialog(o: ConfirmOptions): Promise<{ ok: boolean; totp: string }> {
  const d = byId<HTMLDialogElement>("confirm-dialog");
  byId("confirm-title").textContent = o.title;
  byId("confirm-text").textContent = o.text;
  const ok = byId<HTMLButtonElement>("confirm-ok");
  ok.textContent = o.ok;
  ok.classList.toggle("btn-danger", o.danger !== false);
  ok.classList.toggle("btn-primary", o.danger === false);
  const totpRow = byId("confirm-totp-row");
  const totp = byId<HTMLInputElement>("confirm-totp");
  totpRow.hidden = !o.totp;
  totp.value = "";
  const answer = await runDialog(d);
  return { ok: answer === "ok", totp: totp.value.trim() };
}

/** blockedDialog explains why a command was refused and offers what can be done. */
export async function blockedDialog(
  info: BlockInfo,
  hostName: string,
  serverMessage: string,
): Promise<{ choice: "cancel" | "refresh" | "force" | "totp"; totp: string }> {
  const d = byId<HTMLDialogElement>("blocked-dialog");
  d.dataset.canForce = String(info.canForce);
  byId("blocked-title").textContent = `${info.title}: ${hostName}`;
  byId("blocked-reason").textContent = info.text;
  byId("blocked-detail").textContent = serverMessage;
  byId("blocked-force").hidden = !info.canForce;
  byId("blocked-retry").hidden = !info.needsTotp;
  byId("blocked-totp-row").hidden = !info.needsTotp;
  const totp = byId<HTMLInputElement>("blocked-totp");
  totp.value = "";
  const answer = await runDialog(d);
  const choice = answer === "refresh" || answer === "force" || answer === "totp" ? answer : "cancel";
  return { choice, totp: totp.value.trim() };
}

/** openMenu shows a menu next to its button and closes it on the next outside click or Escape. */
export function openMenu(menu: HTMLElement, anchor: HTMLElement, onClose: () => void = () => {}): () => void {
  menu.hidden = false;
  const r = anchor.getBoundingClientRect();
  const w = menu.offsetWidth;
  const h = menu.offsetHeight;
  const left = Math.max(4, Math.min(window.innerWidth - w - 4, r.right - w));
  const below = r.bottom + 4 + h <= window.innerHeight;
  menu.style.left = `${left}px`;
  menu.style.top = `${below ? r.bottom + 4 : Math.max(4, r.top - h - 4)}px`;
  anchor.setAttribute("aria-expanded", "true");
  const close = (): void => {
    menu.hidden = true;
    anchor.setAttribute("aria-expanded", "false");
    document.removeEventListener("pointerdown", outside, true);
    document.removeEventListener("keydown", esc, true);
    window.removeEventListener("scroll", close, true);
    onClose();
  };
  const outside = (e: Event): void => {
    const t = e.target as Node | null;
    if (t && (menu.contains(t) || anchor.contains(t))) return;
    close();
  };
  const esc = (e: KeyboardEvent): void => {
    if (e.key === "Escape") {
      e.stopPropagation();
      close();
    }
  };
  document.addEventListener("pointerdown", outside, true);
  document.addEventListener("keydown", esc, true);
  window.addEventListener("scroll", close, true);
  return close;
}
