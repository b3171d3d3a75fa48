// Host selection for bulk actions: click toggles, shift-click selects the
// range from the last clicked host, Escape clears.

/** Selection is the set of selected host ids. */
export class Selection {
  private ids = new Set<string>();
  private anchor: string | null = null;

  /** has reports whether a host is selected. */
  has(id: string): boolean {
    return this.ids.has(id);
  }

  /** size is the number of selected hosts. */
  get size(): number {
    return this.ids.size;
  }

  /** list returns the selected ids in display order. */
  list(order: string[]): string[] {
    return order.filter((id) => this.ids.has(id));
  }

  /**
   * click sets one host (or, with shift and an earlier click, the range
   * between them in display order) to checked. It returns the changed ids.
   */
  click(id: string, checked: boolean, shift: boolean, order: string[]): string[] {
    let targets = [id];
    if (shift && this.anchor !== null && this.anchor !== id) {
      const a = order.indexOf(this.anchor);
      const b = order.indexOf(id);
      if (a >= 0 && b >= 0) targets = order.slice(Math.min(a, b), Math.max(a, b) + 1);
    }
    this.anchor = id;
    const changed: string[] = [];
    for (const t of targets) {
      if (this.ids.has(t) !== checked) {
        if (checked) this.ids.add(t);
        else this.ids.delete(t);
        changed.push(t);
      }
    }
    return changed;
  }

  /** setAll selects exactly these ids; it returns the changed ids. */
  setAll(ids: string[]): string[] {
    const next = new Set(ids);
    const changed = [...this.ids].filter((i) => !next.has(i)).concat(ids.filter((i) => !this.ids.has(i)));
    this.ids = next;
    return changed;
  }

  /** clear deselects everything; it returns the changed ids. */
  clear(): string[] {
    this.anchor = null;
    return this.setAll([]);
  }

  /** forget drops a removed host. */
  forget(id: string): void {
    this.ids.delete(id);
    if (this.anchor === id) this.anchor = null;
  }
}
