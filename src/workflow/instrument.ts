import { setMaxListeners } from "node:events";

/**
 * What every node of a cairn run goes through, for cairn workflows and plain LangGraph graphs alike:
 * timing, events, a run-scoped abort signal, and the rule that a failing task waits for its running
 * siblings before its error is raised.
 *
 * Why the wait: LangGraph aborts a superstep's shared signal on the first task error, and the runnable
 * layer then discards every sibling that finishes afterwards, so a fan-out of 200 items with one failure
 * reruns all 200 on resume. Holding the error until the siblings settle lets their results be saved as
 * pending writes first, so the resume reruns only the failed item. "Saved" is judged by the saver seeing
 * the sibling's writes, not by its node function returning: LangGraph still has to run the task's
 * writers after that, and an abort in between would turn a finished item into a failed one.
 */

/**
 * LangGraph races every task of a superstep against one abort signal, so a fan-out wider than ten trips
 * Node's listener-leak warning on it. That signal is shared on purpose; say so before the tasks pile up.
 */
export function markSharedSignal(config: { signal?: AbortSignal } | undefined): void {
  if (config?.signal) setMaxListeners(0, config.signal);
}

/** Events a run emits; the CLI renders them and programs can subscribe. */
export type RunEvent =
  | { type: "task:start"; thread: string; node: string; step: string; item?: number }
  | { type: "task:end"; thread: string; node: string; step: string; item?: number; durationMs: number }
  | { type: "task:error"; thread: string; node: string; step: string; item?: number; durationMs: number; error: Error }
  | { type: "log"; thread: string; step: string; item?: number; message: string }
  | {
      type: "checkpoint";
      thread: string;
      checkpoint: string;
      step: string;
      durationMs: number;
      tasks: number;
      /** True when only cairn's own bookkeeping ran (a fan-out gathering its results). */
      internal: boolean;
    };

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
  /** Failures recorded in the thread before this run, by `attemptKey`: earlier attempts of a step or item. */
  previousFailures = new Map<string, number>();
  /** Started tasks whose writes are not yet saved. */
  private unsettled = new Set<string>();
  /** Failed tasks holding back their error until their siblings are saved. */
  private holding = new Set<string>();
  private waiters: (() => void)[] = [];
  private anonymous = 0;

  constructor(
    readonly thread: string,
    /** Aborted only when the whole run is cancelled, never because a sibling task failed. */
    readonly signal: AbortSignal,
    readonly emit: (event: RunEvent) => void,
    /** Maps a graph node to the workflow step it belongs to (e.g. a fan-out's gather node). */
    readonly stepOf: (node: string) => string = (node) => node,
    readonly now: () => number = Date.now,
  ) {}

  /**
   * Run one task: time it, report it, and on failure hold the error until every sibling task that is
   * still running has finished and had its writes saved (see `settled`), then rethrow.
   */
  async task<T>(node: string, item: number | undefined, taskId: string | undefined, fn: () => Promise<T>): Promise<T> {
    const id = taskId ?? `anonymous-${(this.anonymous += 1)}`;
    const step = this.stepOf(node);
    const startedAt = this.now();
    this.taskCount += 1;
    if (taskId !== undefined) this.unsettled.add(id);
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
      this.holding.add(id);
      this.wake();
      try {
        await this.untilSiblingsSaved();
      } finally {
        this.holding.delete(id);
        this.unsettled.delete(id);
      }
      throw error;
    }
  }

  /** The run's saver calls this once a task's writes are durably saved. */
  settled(taskId: string): void {
    if (this.unsettled.delete(taskId)) this.wake();
  }

  /** Which attempt this is of a step (or of one item of a fan-out): 1 unless an earlier one failed. */
  attemptOf(node: string, item: number | undefined): number {
    return 1 + (this.previousFailures.get(attemptKey(node, item)) ?? 0);
  }

  /** Take the tasks finished since the last call (one superstep's worth under sync durability). */
  drainFinished(): TaskRecord[] {
    return this.finished.splice(0);
  }

  private untilSiblingsSaved(): Promise<void> {
    return new Promise((resolve) => {
      const check = () => {
        for (const id of this.unsettled) {
          if (!this.holding.has(id)) {
            this.waiters.push(check);
            return;
          }
        }
        resolve();
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

export function attemptKey(node: string, item: number | undefined): string {
  return item === undefined ? node : `${node}#${item}`;
}
