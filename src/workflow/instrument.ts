/**
 * What every node of a cairn run goes through, for cairn workflows and plain LangGraph graphs alike:
 * timing, events, a run-scoped abort signal, and the rule that a failing task waits for its running
 * siblings before its error is raised.
 *
 * Why the wait: LangGraph aborts a superstep's shared signal on the first task error, and the runnable
 * layer then discards every sibling that finishes afterwards, so a fan-out of 200 items with one failure
 * reruns all 200 on resume. Holding the error until the siblings settle lets their results be saved as
 * pending writes first, so the resume reruns only the failed item.
 */

/** Events a run emits; the CLI renders them and programs can subscribe. */
export type RunEvent =
  | { type: "task:start"; thread: string; node: string; step: string; item?: number }
  | { type: "task:end"; thread: string; node: string; step: string; item?: number; durationMs: number }
  | { type: "task:error"; thread: string; node: string; step: string; item?: number; durationMs: number; error: Error }
  | { type: "log"; thread: string; step: string; item?: number; message: string }
  | { type: "checkpoint"; thread: string; checkpoint: string; step: string; durationMs: number; tasks: number };

/** Finished tasks since the last checkpoint, drained by the run's recording saver. */
export interface TaskRecord {
  node: string;
  step: string;
  startedAt: number;
  endedAt: number;
  ok: boolean;
}

/** One run's shared machinery, handed to the graph when it is compiled for that run. */
export class RunRuntime {
  readonly finished: TaskRecord[] = [];
  /** Every task that failed in this run, in order. */
  readonly failedTasks: TaskRecord[] = [];
  /** Tasks started in this run. */
  taskCount = 0;
  private inflight = 0;
  private failedWaiting = 0;
  private waiters: (() => void)[] = [];

  constructor(
    readonly thread: string,
    /** Aborted only when the whole run is cancelled, never because a sibling task failed. */
    readonly signal: AbortSignal,
    readonly emit: (event: RunEvent) => void,
    /** Maps a graph node to the workflow step it belongs to (e.g. a fan-out's gather node). */
    readonly stepOf: (node: string) => string = (node) => node,
    readonly now: () => number = Date.now,
  ) {}

  /** Run one task: time it, report it, and on failure wait for running siblings before rethrowing. */
  async task<T>(node: string, item: number | undefined, fn: () => Promise<T>): Promise<T> {
    const step = this.stepOf(node);
    const startedAt = this.now();
    this.inflight += 1;
    this.taskCount += 1;
    this.emit({ type: "task:start", thread: this.thread, node, step, item });
    try {
      const result = await fn();
      const endedAt = this.now();
      this.finished.push({ node, step, startedAt, endedAt, ok: true });
      this.emit({ type: "task:end", thread: this.thread, node, step, item, durationMs: endedAt - startedAt });
      return result;
    } catch (error) {
      const endedAt = this.now();
      const record = { node, step, startedAt, endedAt, ok: false };
      this.finished.push(record);
      this.failedTasks.push(record);
      const err = error instanceof Error ? error : new Error(String(error));
      this.emit({ type: "task:error", thread: this.thread, node, step, item, durationMs: endedAt - startedAt, error: err });
      this.failedWaiting += 1;
      try {
        await this.untilOnlyFailuresRemain();
      } finally {
        this.failedWaiting -= 1;
      }
      throw error;
    } finally {
      this.inflight -= 1;
      this.wake();
    }
  }

  /** Take the tasks finished since the last call (one superstep's worth under sync durability). */
  drainFinished(): TaskRecord[] {
    return this.finished.splice(0);
  }

  private untilOnlyFailuresRemain(): Promise<void> {
    return new Promise((resolve) => {
      const check = () => {
        if (this.inflight - this.failedWaiting <= 0) resolve();
        else this.waiters.push(check);
      };
      check();
    });
  }

  private wake(): void {
    const waiting = this.waiters.splice(0);
    for (const w of waiting) w();
  }

  /** Keep this object out of any JSON LangGraph makes of a config. */
  toJSON(): string {
    return "[cairn RunRuntime]";
  }
}
