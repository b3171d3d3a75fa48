// Test helpers: protobuf builders for hosts and events, and a minimal fake
// element that records writes and refuses innerHTML.

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import {
  FleetEventSchema,
  HostSchema,
  type FleetEvent,
  type Host,
} from "../src/gen/nixplane/fleet/v1/fleet_pb";
import { CompartmentStatus, HostType } from "../src/gen/nixplane/types/v1/types_pb";
import type { El } from "../src/render";

export const T0 = Date.UTC(2026, 10, 22, 12, 0, 0);

/** host builds a protobuf Host with sensible defaults. */
export function host(id: string, over: MessageInitShape<typeof HostSchema> = {}): Host {
  const base: MessageInitShape<typeof HostSchema> = {
    hostId: id,
    hostname: id,
    hostType: HostType.NIXOS,
    online: true,
    lastSeen: timestampFromMs(T0),
    metrics: { cpuPercent: 10, ramPercent: 20, swapPercent: 1, load1: 0.5 },
    agentVersion: "1.0.0",
    generation: "0123456789abcdef0123456789abcdef01234567",
    themeColor: "#7aa2f7",
    updateStatus: {
      agent: { status: CompartmentStatus.OK, message: "current" },
      git: { status: CompartmentStatus.OK, message: "Up to date" },
      lock: { status: CompartmentStatus.OUTDATED, message: "flake.lock outdated" },
      system: { status: CompartmentStatus.OK, message: "current" },
      tests: { status: CompartmentStatus.UNKNOWN, message: "" },
    },
  };
  return create(HostSchema, Object.assign(base, over));
}

/** ev builds a FleetEvent from a oneof case and its value. */
export function ev(kind: NonNullable<MessageInitShape<typeof FleetEventSchema>["kind"]>): FleetEvent {
  return create(FleetEventSchema, { kind });
}

/** FakeEl is an element that keeps what the render functions write. */
export class FakeEl implements El {
  private text: string | null = "";
  textWrites = 0;
  title = "";
  checked = false;
  hidden: boolean | string = false;
  disabled = false;
  readonly classes = new Set<string>();
  readonly dataset: { [key: string]: string | undefined } = {};
  readonly attrs = new Map<string, string>();
  readonly props = new Map<string, string>();
  readonly classList = {
    toggle: (t: string, force?: boolean): boolean => {
      const on = force ?? !this.classes.has(t);
      if (on) this.classes.add(t);
      else this.classes.delete(t);
      return on;
    },
    contains: (t: string): boolean => this.classes.has(t),
  };
  readonly style = {
    setProperty: (n: string, v: string): void => {
      this.props.set(n, v);
    },
    removeProperty: (n: string): string => {
      this.props.delete(n);
      return "";
    },
  };

  get textContent(): string | null {
    return this.text;
  }
  set textContent(v: string | null) {
    this.text = v;
    this.textWrites++;
  }
  set innerHTML(_v: string) {
    throw new Error("innerHTML must not be used for host data");
  }
  setAttribute(name: string, value: string): void {
    if (/^on/i.test(name)) throw new Error(`event handler attribute ${name}`);
    this.attrs.set(name, value);
  }
}

/** fakeLayout returns a root and a find() that hands out one FakeEl per selector. */
export function fakeLayout(): { root: FakeEl; find: (sel: string) => FakeEl; els: Map<string, FakeEl> } {
  const els = new Map<string, FakeEl>();
  const find = (sel: string): FakeEl => {
    let e = els.get(sel);
    if (!e) {
      e = new FakeEl();
      els.set(sel, e);
    }
    return e;
  };
  return { root: new FakeEl(), find, els };
}
