// Turning RPC errors into what a person should read: the reason a command
// was blocked (FailedPrecondition with a google.rpc.ErrorInfo detail whose
// reason is a BlockReason name) and short toast texts for everything else.

import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { Code, ConnectError } from "@connectrpc/connect";

/** errorInfoReason decodes the reason field of a serialized google.rpc.ErrorInfo. */
export function errorInfoReason(bytes: Uint8Array): string {
  const r = new BinaryReader(bytes);
  let reason = "";
  while (r.pos < r.len) {
    const [no, wt] = r.tag();
    if (no === 1 && wt === WireType.LengthDelimited) reason = r.string();
    else r.skip(wt);
  }
  return reason;
}

/** blockReason returns the BlockReason name of a refused command, or null. */
export function blockReason(err: unknown): string | null {
  if (!(err instanceof ConnectError) || err.code !== Code.FailedPrecondition) return null;
  for (const d of err.details) {
    if ("type" in d && d.value instanceof Uint8Array && d.type.endsWith("google.rpc.ErrorInfo")) {
      try {
        const reason = errorInfoReason(d.value);
        if (reason) return reason;
      } catch {
        // A detail that does not decode is skipped.
      }
    }
  }
  return "";
}

/** BlockInfo is what the blocked-command dialog shows. */
export interface BlockInfo {
  title: string;
  text: string;
  /** The block can be overridden with force. */
  canForce: boolean;
  /** A TOTP code would let it through. */
  needsTotp: boolean;
}

/** describeBlock explains a BlockReason name. */
export function describeBlock(reason: string, command: string): BlockInfo {
  switch (reason) {
    case "BLOCK_REASON_OFFLINE":
      return { title: "Host is offline", text: `The host has no live agent, so ${command} cannot run now.`, canForce: false, needsTotp: false };
    case "BLOCK_REASON_BUSY":
      return { title: "Host is busy", text: `Another command is running on this host. Wait for it or stop it, then run ${command} again.`, canForce: false, needsTotp: false };
    case "BLOCK_REASON_UNKNOWN_COMMAND":
      return { title: "Unknown command", text: `The server does not know the command "${command}".`, canForce: false, needsTotp: false };
    case "BLOCK_REASON_ALREADY_CURRENT":
      return { title: "Already current", text: `Nothing to do: the host already is where ${command} would bring it. Force runs it anyway.`, canForce: true, needsTotp: false };
    case "BLOCK_REASON_TOTP_REQUIRED":
      return { title: "TOTP code required", text: `${command} needs a fresh TOTP code.`, canForce: false, needsTotp: true };
    default:
      return { title: "Command refused", text: `The server refused ${command}.`, canForce: false, needsTotp: false };
  }
}

/** errorText is a short toast text for a failed call. */
export function errorText(err: unknown, what: string): string {
  const e = ConnectError.from(err);
  switch (e.code) {
    case Code.NotFound:
      return `${what}: not found (it no longer exists)`;
    case Code.Unavailable:
      return `${what}: server unreachable`;
    case Code.Unauthenticated:
      return `${what}: session expired, log in again`;
    case Code.PermissionDenied:
      return `${what}: not allowed`;
    case Code.DeadlineExceeded:
      return `${what}: timed out`;
    case Code.Canceled:
      return `${what}: cancelled`;
    default:
      if (e.cause instanceof TypeError) return `${what}: network error`;
      return `${what} failed: ${e.rawMessage || "unknown error"}`;
  }
}
