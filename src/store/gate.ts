/**
 * Exclusion between the operations of one saver on one thread: reads and writes share the thread
 * (any number at once), a compaction or a deletion has it alone. Waiting callers are served in arrival
 * order, so a compaction waiting for the writes in flight is not starved by the writes that follow, and
 * those wait until it has swapped the journal.
 *
 * Not re-entrant: a holder must not ask the same gate again (it would wait behind a queued exclusive
 * caller that waits for it). The saver only takes the gate in its public methods, which never call one
 * another while holding it.
 */
export class ThreadGate {
  private sharedHolders = 0;
  private exclusiveHeld = false;
  private readonly waiting: { exclusive: boolean; grant: () => void }[] = [];

  async shared<T>(fn: () => Promise<T>): Promise<T> {
    await this.enter(false);
    try {
      return await fn();
    } finally {
      this.leave(false);
    }
  }

  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    await this.enter(true);
    try {
      return await fn();
    } finally {
      this.leave(true);
    }
  }

  /** Whether nobody holds or waits for the gate (it can be forgotten). */
  get idle(): boolean {
    return this.sharedHolders === 0 && !this.exclusiveHeld && this.waiting.length === 0;
  }

  private enter(exclusive: boolean): Promise<void> {
    if (this.waiting.length === 0 && !this.exclusiveHeld && (!exclusive || this.sharedHolders === 0)) {
      this.take(exclusive);
      return Promise.resolve();
    }
    return new Promise((grant) => this.waiting.push({ exclusive, grant }));
  }

  private take(exclusive: boolean): void {
    if (exclusive) this.exclusiveHeld = true;
    else this.sharedHolders += 1;
  }

  private leave(exclusive: boolean): void {
    if (exclusive) this.exclusiveHeld = false;
    else this.sharedHolders -= 1;
    while (this.waiting.length > 0 && !this.exclusiveHeld) {
      const next = this.waiting[0]!;
      if (next.exclusive && this.sharedHolders > 0) break;
      this.waiting.shift();
      this.take(next.exclusive);
      next.grant();
      if (next.exclusive) break;
    }
  }
}
