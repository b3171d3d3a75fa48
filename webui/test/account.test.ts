import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { accountView, formatWhen, pngDataUrl, scopeFromName, scopeName, TOKEN_NAME, totpControls, totpStep } from "../src/account";
import { Scope } from "../src/gen/nixplane/admin/v1/admin_pb";

describe("account menu", () => {
  it("offers the token panel to admins only", () => {
    assert.equal(accountView({ scope: Scope.ADMIN, session: true, totpEnabled: false }).tokens, true);
    assert.equal(accountView({ scope: Scope.OPERATE, session: true, totpEnabled: false }).tokens, false);
    assert.equal(accountView({ scope: Scope.READ, session: true, totpEnabled: false }).tokens, false);
    assert.equal(accountView(null).tokens, false, "no answer, no panel");
  });

  it("offers two-factor set-up or turning it off, to sessions only", () => {
    assert.equal(accountView({ scope: Scope.READ, session: true, totpEnabled: false }).totp, "enable");
    assert.equal(accountView({ scope: Scope.READ, session: true, totpEnabled: true }).totp, "disable");
    assert.equal(accountView({ scope: Scope.ADMIN, session: false, totpEnabled: false }).totp, "none");
    assert.equal(accountView(null).totp, "none");
  });

  it("asks for the password before a secret is made, and for a code after", () => {
    assert.equal(totpStep(false, false), "begin");
    assert.equal(totpStep(false, true), "confirm");
    assert.equal(totpStep(true, false), "disable");
    assert.equal(totpStep(true, true), "disable", "on wins over a stale enrolment");
    const begin = totpControls("begin");
    assert.deepEqual(begin, { password: true, secret: false, code: false, begin: true, confirm: false, disable: false });
    for (const step of ["confirm", "disable"] as const) {
      const c = totpControls(step);
      assert.equal(c.password, false, `${step}: no password field`);
      assert.equal(c.code, true, `${step}: a code field`);
      assert.equal(c.begin, false, `${step}: no set-up button`);
    }
    assert.equal(totpControls("confirm").secret, true, "the secret is shown while confirming");
    assert.equal(totpControls("disable").secret, false, "the secret is never shown once on");
    // Exactly one action button per step.
    for (const step of ["begin", "confirm", "disable"] as const) {
      const c = totpControls(step);
      assert.equal([c.begin, c.confirm, c.disable].filter(Boolean).length, 1, step);
    }
  });

  it("names and parses scopes", () => {
    for (const s of [Scope.READ, Scope.OPERATE, Scope.ADMIN]) assert.equal(scopeFromName(scopeName(s)), s);
    assert.equal(scopeName(Scope.UNSPECIFIED), "unknown");
    assert.equal(scopeFromName("root"), Scope.READ, "an unknown name is the least scope");
  });

  it("checks token names like the server", () => {
    for (const ok of ["ci", "deploy-bot_2", "a.b", "x".repeat(64)]) assert.ok(TOKEN_NAME.test(ok), ok);
    for (const bad of ["", "x".repeat(65), "has space", "<img>", "ünï", "a/b"]) assert.ok(!TOKEN_NAME.test(bad), bad);
  });

  it("formats times in UTC and absent ones as a dash", () => {
    assert.equal(formatWhen(timestampFromMs(Date.UTC(2026, 10, 22, 3, 52, 41))), "2026-11-22 03:52 UTC");
    assert.equal(formatWhen(undefined), "—");
  });

  it("makes a data URL of PNG bytes only", () => {
    const png = new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3]);
    assert.equal(pngDataUrl(png), `data:image/png;base64,${Buffer.from(png).toString("base64")}`);
    assert.equal(pngDataUrl(new TextEncoder().encode("<svg onload=alert(1)>")), "");
    assert.equal(pngDataUrl(new Uint8Array()), "");
  });
});
