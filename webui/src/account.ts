// The signed-in user's menu: two-factor (TOTP) enrolment for everyone and,
// for admins, the API token panel, both over AdminService. Every text from
// the server is set with textContent; the QR code is an image built from the
// PNG bytes of BeginTOTPEnrollment (img-src allows data: URLs).

import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { AdminService, Scope, type APIToken, type WhoAmIResponse } from "./gen/nixplane/admin/v1/admin_pb";
import { errorText } from "./errors";
import { confirmDialog, openMenu, showToast } from "./ui";

/** AccountView is what the user menu offers a caller. */
export interface AccountView {
  /** The API token panel (admin scope only). */
  tokens: boolean;
  /** The two-factor entry, and whether it sets up or turns off. */
  totp: "enable" | "disable" | "none";
}

/** accountView decides the menu from WhoAmI; without an answer, nothing is offered. */
export function accountView(who: Pick<WhoAmIResponse, "scope" | "session" | "totpEnabled"> | null): AccountView {
  if (!who) return { tokens: false, totp: "none" };
  return {
    tokens: who.scope === Scope.ADMIN,
    totp: !who.session ? "none" : who.totpEnabled ? "disable" : "enable",
  };
}

/** TotpStep is where the two-factor dialog stands. */
export type TotpStep = "begin" | "confirm" | "disable";

/** totpStep is the dialog's step: turning it off when on, confirming a code while a secret is shown, else beginning. */
export function totpStep(on: boolean, enrolling: boolean): TotpStep {
  return on ? "disable" : enrolling ? "confirm" : "begin";
}

/** TotpControls says which parts of the two-factor dialog a step shows. */
export interface TotpControls {
  /** The current password, asked before a secret is made. */
  password: boolean;
  /** The QR code and secret. */
  secret: boolean;
  /** The six-digit code. */
  code: boolean;
  begin: boolean;
  confirm: boolean;
  disable: boolean;
}

/** totpControls decides the dialog for a step. */
export function totpControls(step: TotpStep): TotpControls {
  return {
    password: step === "begin",
    secret: step === "confirm",
    code: step !== "begin",
    begin: step === "begin",
    confirm: step === "confirm",
    disable: step === "disable",
  };
}

/** scopeName names a token scope. */
export function scopeName(s: Scope): string {
  switch (s) {
    case Scope.READ:
      return "read";
    case Scope.OPERATE:
      return "operate";
    case Scope.ADMIN:
      return "admin";
    default:
      return "unknown";
  }
}

/** scopeFromName parses a scope name from the form; anything else is read. */
export function scopeFromName(name: string): Scope {
  return name === "admin" ? Scope.ADMIN : name === "operate" ? Scope.OPERATE : Scope.READ;
}

/** TOKEN_NAME is the server's rule for token names. */
export const TOKEN_NAME = /^[A-Za-z0-9._-]{1,64}$/;

/** formatWhen writes a timestamp as "YYYY-MM-DD HH:MM UTC", or a dash. */
export function formatWhen(t: Timestamp | undefined): string {
  if (!t) return "—";
  const d = timestampDate(t);
  if (!Number.isFinite(d.getTime())) return "—";
  return `${d.toISOString().slice(0, 16).replace("T", " ")} UTC`;
}

/** pngDataUrl turns PNG bytes into a data: URL; anything that is not a PNG gives "". */
export function pngDataUrl(png: Uint8Array): string {
  const sig = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
  if (png.length < sig.length || sig.some((b, i) => png[i] !== b)) return "";
  let bin = "";
  for (let i = 0; i < png.length; i += 0x8000) bin += String.fromCharCode(...png.subarray(i, i + 0x8000));
  return `data:image/png;base64,${btoa(bin)}`;
}

function byId<T extends HTMLElement = HTMLElement>(id: string): T {
  const e = document.getElementById(id);
  if (!e) throw new Error(`page element #${id} missing`);
  return e as T;
}

function cell(text: string): HTMLTableCellElement {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

async function copyText(text: string, what: string): Promise<void> {
  try {
    await navigator.clipboard.writeText(text);
    showToast(`${what} copied`, "ok");
  } catch {
    showToast(`Copying was refused: select the ${what.toLowerCase()} and copy it by hand`, "error");
  }
}

/** Account wires the user menu and its dialogs. */
export class Account {
  private readonly admin;
  private who: WhoAmIResponse | null = null;
  private closeMenu: (() => void) | null = null;
  private step: TotpStep = "begin";

  constructor(transport: Transport) {
    this.admin = createClient(AdminService, transport);
    byId("user-button").addEventListener("click", () => this.toggleMenu());
    byId("user-menu").addEventListener("click", (e) => {
      const b = (e.target as HTMLElement).closest<HTMLButtonElement>("button[data-account]");
      if (!b || b.disabled) return;
      this.closeMenu?.();
      if (b.dataset.account === "tokens") void this.openTokens();
      else if (b.dataset.account === "totp") this.openTotp();
    });
    byId("tokens-close").addEventListener("click", () => byId<HTMLDialogElement>("tokens-dialog").close());
    byId("token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      void this.createToken();
    });
    byId("token-rows").addEventListener("click", (e) => {
      const b = (e.target as HTMLElement).closest<HTMLButtonElement>("button[data-revoke]");
      if (b?.dataset.revoke) void this.revokeToken(b.dataset.revoke);
    });
    byId("token-copy").addEventListener("click", () => void copyText(byId("token-secret").textContent ?? "", "Token"));
    byId("totp-close").addEventListener("click", () => byId<HTMLDialogElement>("totp-dialog").close());
    byId("totp-copy").addEventListener("click", () => void copyText(byId("totp-secret").textContent ?? "", "Secret"));
    // Enter in either field submits the form: what it does follows the step.
    byId("totp-form").addEventListener("submit", (e) => {
      e.preventDefault();
      if (this.step === "begin") void this.beginTotp();
      else void this.submitTotp();
    });
  }

  /** load asks who the caller is and shows what the menu offers them. */
  async load(): Promise<void> {
    try {
      this.who = await this.admin.whoAmI({});
    } catch (err) {
      console.warn("WhoAmI failed", err);
      this.who = null;
    }
    this.renderMenu();
  }

  private renderMenu(): void {
    const v = accountView(this.who);
    byId("menu-tokens").hidden = !v.tokens;
    const totp = byId<HTMLButtonElement>("menu-totp");
    totp.hidden = v.totp === "none";
    totp.disabled = v.totp === "none";
    totp.textContent = v.totp === "disable" ? "Two-factor authentication: on…" : "Set up two-factor authentication…";
  }

  private toggleMenu(): void {
    if (this.closeMenu) {
      this.closeMenu();
      return;
    }
    this.closeMenu = openMenu(byId("user-menu"), byId("user-button"), () => (this.closeMenu = null));
  }

  // ─── API tokens ────────────────────────────────────────────────────────

  private async openTokens(): Promise<void> {
    byId("token-secret-box").hidden = true;
    byId("token-secret").textContent = "";
    const d = byId<HTMLDialogElement>("tokens-dialog");
    if (!d.open) d.showModal();
    await this.listTokens();
  }

  private async listTokens(): Promise<void> {
    const body = byId("token-rows");
    try {
      const res = await this.admin.listAPITokens({});
      this.renderTokens(res.tokens);
    } catch (err) {
      body.replaceChildren();
      showToast(errorText(err, "Listing API tokens"), "error");
    }
  }

  private renderTokens(tokens: APIToken[]): void {
    const now = Date.now();
    const rows = tokens.map((t) => {
      const tr = document.createElement("tr");
      tr.dataset.token = t.name;
      const expired = t.expiresAt !== undefined && timestampDate(t.expiresAt).getTime() <= now;
      tr.dataset.expired = String(expired);
      const revoke = document.createElement("button");
      revoke.type = "button";
      revoke.className = "btn btn-quiet";
      revoke.dataset.revoke = t.name;
      revoke.textContent = "Revoke";
      const action = document.createElement("td");
      action.appendChild(revoke);
      tr.append(
        cell(t.name),
        cell(scopeName(t.scope)),
        cell(formatWhen(t.createdAt)),
        cell(t.expiresAt ? `${formatWhen(t.expiresAt)}${expired ? " (expired)" : ""}` : "never"),
        cell(t.lastUsedAt ? formatWhen(t.lastUsedAt) : "never"),
        action,
      );
      return tr;
    });
    byId("token-rows").replaceChildren(...rows);
    byId("tokens-empty").hidden = tokens.length > 0;
  }

  private async createToken(): Promise<void> {
    const name = byId<HTMLInputElement>("token-name").value.trim();
    if (!TOKEN_NAME.test(name)) {
      showToast("A token name is 1–64 letters, digits, '.', '_' or '-'", "error");
      return;
    }
    const scope = scopeFromName(byId<HTMLSelectElement>("token-scope").value);
    const days = Number(byId<HTMLSelectElement>("token-ttl").value);
    const ttl = Number.isFinite(days) && days > 0 ? { seconds: BigInt(days * 86400), nanos: 0 } : undefined;
    const button = byId<HTMLButtonElement>("token-create");
    button.disabled = true;
    try {
      const res = await this.admin.createAPIToken({ name, scope, ttl });
      byId("token-secret-name").textContent = res.token?.name ?? name;
      byId("token-secret").textContent = res.secret;
      byId("token-secret-box").hidden = false;
      byId<HTMLInputElement>("token-name").value = "";
      await this.listTokens();
    } catch (err) {
      const ce = ConnectError.from(err);
      showToast(ce.code === Code.AlreadyExists ? `A token named ${name} exists already` : errorText(err, "Creating the token"), "error");
    } finally {
      button.disabled = false;
    }
  }

  private async revokeToken(name: string): Promise<void> {
    const c = await confirmDialog({
      title: `Revoke ${name}?`,
      text: "Everything using this token loses access at once.",
      ok: "Revoke",
    });
    if (!c.ok) return;
    try {
      await this.admin.revokeAPIToken({ name });
      showToast(`Token ${name} revoked`, "ok");
      if (byId("token-secret-name").textContent === name) {
        byId("token-secret-box").hidden = true;
        byId("token-secret").textContent = "";
      }
    } catch (err) {
      showToast(errorText(err, `Revoking ${name}`), "error");
    }
    await this.listTokens();
  }

  // ─── two-factor ────────────────────────────────────────────────────────

  private openTotp(): void {
    this.renderTotp(false);
    const d = byId<HTMLDialogElement>("totp-dialog");
    if (!d.open) d.showModal();
  }

  /** renderTotp shows the dialog for the current state; enrolling while a secret is shown. */
  private renderTotp(enrolling: boolean): void {
    this.step = totpStep(this.who?.totpEnabled === true, enrolling);
    const c = totpControls(this.step);
    byId("totp-status").textContent =
      this.step === "disable"
        ? "Two-factor authentication is on. Logins, reboots and rollbacks ask for a code. Enter a current code to turn it off."
        : this.step === "confirm"
          ? "Not on yet: it starts once a code from the app is confirmed."
          : "Two-factor authentication is off. With it on, logins, reboots and rollbacks ask for a six-digit code from an app. Enter your current password to set it up.";
    byId("totp-enrol").hidden = !c.secret;
    byId("totp-password-row").hidden = !c.password;
    byId("totp-code-row").hidden = !c.code;
    byId("totp-begin").hidden = !c.begin;
    byId("totp-confirm").hidden = !c.confirm;
    byId("totp-disable").hidden = !c.disable;
    byId<HTMLInputElement>("totp-password").value = "";
    byId<HTMLInputElement>("totp-code").value = "";
    this.showTotpError("");
    if (!c.secret) {
      byId("totp-qr-box").replaceChildren();
      byId("totp-secret").textContent = "";
    }
  }

  /** showTotpError writes a refusal into the dialog; "" hides it. */
  private showTotpError(text: string): void {
    const e = byId("totp-error");
    e.textContent = text;
    e.hidden = text === "";
  }

  private async beginTotp(): Promise<void> {
    const field = byId<HTMLInputElement>("totp-password");
    const password = field.value;
    if (password === "") {
      this.showTotpError("Enter your current password to set up two-factor authentication.");
      field.focus();
      return;
    }
    const button = byId<HTMLButtonElement>("totp-begin");
    button.disabled = true;
    try {
      const res = await this.admin.beginTOTPEnrollment({ password });
      const url = pngDataUrl(res.qrPng);
      const box = byId("totp-qr-box");
      box.replaceChildren();
      if (url) {
        const img = document.createElement("img");
        img.id = "totp-qr";
        img.className = "totp-qr";
        img.alt = "QR code of the TOTP secret";
        img.width = 192;
        img.height = 192;
        img.src = url;
        box.appendChild(img);
      }
      byId("totp-secret").textContent = res.secret;
      this.renderTotp(true);
      byId("totp-code").focus();
    } catch (err) {
      const ce = ConnectError.from(err);
      if (ce.code === Code.FailedPrecondition) await this.load();
      this.renderTotp(false);
      // The server's own words: "wrong password", or how long to wait.
      this.showTotpError(errorText(err, "Setting up two-factor authentication"));
      if (this.step === "begin") byId("totp-password").focus();
    } finally {
      field.value = "";
      button.disabled = false;
    }
  }

  private async submitTotp(): Promise<void> {
    const code = byId<HTMLInputElement>("totp-code").value.trim();
    if (!/^[0-9]{6}$/.test(code)) {
      showToast("The code has six digits", "error");
      return;
    }
    const disabling = this.who?.totpEnabled === true;
    try {
      if (disabling) await this.admin.disableTOTP({ code });
      else await this.admin.confirmTOTPEnrollment({ code });
    } catch (err) {
      showToast(errorText(err, disabling ? "Turning two-factor off" : "Confirming the code"), "error");
      return;
    }
    await this.load();
    showToast(disabling ? "Two-factor authentication is off" : "Two-factor authentication is on", "ok");
    this.renderTotp(false);
  }
}
