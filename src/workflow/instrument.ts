import { setMaxListeners } from "node:events";
import { GraphDrained, isGraphDrained, RunControl } from "@langchain/langgraph";
import pLimit, { type LimitFunction } from "p-limit";
import pRetry from "p-retry";
import { CairnError } from "../errors.ts";
import type { ArtifactStore } from "../store/artifacts.ts";
import { addUsage, formatUsd, NO_USAGE, type Pricing, type Usage } from "./usage.ts";

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

/** Why a run stopped before its end without failing. */
export type StopReason = "signal" | "budget";

/** Events a run emits; the CLI renders them and programs can subscribe (`onEvent`). */
export type RunEvent =
  | {
      type: "run:start";
      thread: string;
      workflow: string;
      /** The declared steps, in order. */
      steps: string[];
      /** Steps already finished in the thread: a resume does not run them again. */
      skipped: string[];
      /** What the thread had spent before this run (reused, not paid again). */
      spentBefore: Usage;
    }
  | { type: "task:start"; thread: string; node: string; step: string; item?: number; attempt: number }
  | { type: "task:end"; thread: string; node: string; step: string; item?: number; durationMs: number; usage: Usage }
  | { type: "task:error"; thread: string; node: string; step: string; item?: number; durationMs: number; error: Error; usage: Usage }
  | { type: "task:retry"; thread: string; node: string; step: string; item?: number; failedAttempt: number; error: Error }
  /** A fan-out step's items: how many there are, how many were already saved before this run. */
  | { type: "fanout"; thread: string; step: string; total: number; done: number }
  /** A step's own report of how far it is (`ctx.progress`). */
  | { type: "progress"; thread: string; step: string; item?: number; done: number; total?: number; message?: string }
  /** Model calls counted: this report, and everything this run has spent so far. */
  | { type: "usage"; thread: string; step?: string; item?: number; usage: Usage; runTotal: Usage }
  | { type: "log"; thread: string; step: string; item?: number; message: string }
  /** The run will stop at the next step boundary (Ctrl+C, SIGTERM, `drain`, or the budget). */
  | { type: "stopping"; thread: string; reason: StopReason; message: string }
  | {
      type: "checkpoint";
      thread: string;
      checkpoint: string;
      step: string;
      durationMs: number;
      tasks: number;
      /** True when only cairn's own bookkeeping ran (a fan-out gathering its results). */
      internal: boolean;
      /** Spent by the tasks this checkpoint records. */
      usage: Usage;
      /** Spent by the thread up to and including this checkpoint. */
      total: Usage;
    };

/** Finished tasks since the last checkpoint, drained by the run's recording saver. */
export interface TaskRecord {
  node: string;
  step: string;
  startedAt: number;
  endedAt: number;
  ok: boolean;
  usage: Usage;
}

/**
 * When a failing step or item is tried again within the run. The default retries transient failures
 * (rate limits, timeouts, 5xx, dropped connections: see {@link isTransientError}) up to 3 attempts with
 * exponential backoff; a permanent failure fails at once.
 */
export interface RetryPolicy {
  /** Attempts in all, the first included. Default 3; 1 turns retrying off. */
  maxAttempts?: number;
  /** Wait before the first retry. Default 1000 ms. */
  initialDelayMs?: number;
  /** Longest wait between attempts. Default 30 000 ms. */
  maxDelayMs?: number;
  /** Each wait is the previous one times this (with random jitter up to 2×). Default 2. */
  factor?: number;
  /** Which errors are worth another attempt. Default {@link isTransientError}. */
  retryOn?: (error: unknown) => boolean;
}

/** What a task runs under: retry policy and, for a fan-out, how many items may run at once. */
export interface TaskPolicy {
  retry?: RetryPolicy | false;
  concurrency?: number;
  /** Save finished items in batches of this many (see `MapOptions.saveEvery`). */
  saveEvery?: number;
}

/** Throw this (or set `transient: true` on any error) to mark a failure as worth retrying. */
export class TransientError extends Error {
  readonly transient = true;
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "TransientError";
  }
}

const TRANSIENT_STATUS = new Set([408, 409, 425, 429, 500, 502, 503, 504, 529]);
const TRANSIENT_CODES = new Set(["ETIMEDOUT", "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "EPIPE", "EAI_AGAIN", "ENETUNREACH", "EHOSTUNREACH", "UND_ERR_SOCKET", "UND_ERR_CONNECT_TIMEOUT", "UND_ERR_HEADERS_TIMEOUT", "UND_ERR_BODY_TIMEOUT"]);
const TRANSIENT_NAMES = new Set(["TimeoutError", "RateLimitError", "APIConnectionError", "APIConnectionTimeoutError", "InternalServerError", "TransientError"]);

/**
 * Whether a failure is likely to go away on its own: an explicit `transient` flag, an HTTP status of
 * 408, 409, 425, 429 or 5xx (as model SDKs attach it: `status`, `statusCode`, `response.status`), a
 * network error code, or a timeout / rate-limit error class. Everything else (bad requests, auth,
 * content filters, bugs) is permanent: retrying would only pay again for the same failure.
 */
export function isTransientError(error: unknown): boolean {
  if (typeof error !== "object" || error === null) return false;
  const e = error as { transient?: unknown; status?: unknown; statusCode?: unknown; response?: { status?: unknown }; code?: unknown; name?: unknown; cause?: unknown };
  if (typeof e.transient === "boolean") return e.transient;
  const status = e.status ?? e.statusCode ?? e.response?.status;
  if (typeof status === "number") return TRANSIENT_STATUS.has(status);
  if (typeof e.code === "string" && TRANSIENT_CODES.has(e.code)) return true;
  if (typeof e.name === "string" && TRANSIENT_NAMES.has(e.name)) return true;
  return e.cause !== undefined && e.cause !== error ? isTransientError(e.cause) : false;
}

/** One run's shared machinery, handed to the graph when it is compiled for that run. */
export class RunRuntime {
  readonly finished: TaskRecord[] = [];
  /** Every task that failed in this run, in order. */
  readonly failedTasks: TaskRecord[] = [];
  /** Tasks started in this run. */
  taskCount = 0;
  /** Tasks that were due but did not run to the end because the run was stopping (a resume runs them). */
  notStarted = 0;
  /** Failures recorded in the thread before this run, by `attemptKey`: earlier attempts of a step or item. */
  previousFailures = new Map<string, number>();
  /** Whether this run continues an existing thread (a resume) rather than starting one. */
  resumed = false;
  /** Prices for turning token counts into money. */
  pricing: Pricing | undefined;
  /** Stop at the next step boundary once the thread has spent this much. */
  budgetUsd: number | undefined;
  /** Where `ctx.artifacts` keeps bytes: the run's store. */
  artifacts: ArtifactStore | undefined;
  /** LangGraph's drain switch for this run: the loop stops at the next superstep boundary. */
  readonly control = new RunControl();
  /** Set once a stop was requested. */
  stopReason: StopReason | undefined;
  /** What the thread had spent when this run started, on every branch (the budget counts it all). */
  private spentBefore: Usage = NO_USAGE;
  /** Everything this run spent, and the part spent by tasks that then failed (not in any checkpoint). */
  runUsage: Usage = NO_USAGE;
  lostUsage: Usage = NO_USAGE;
  private readonly taskUsage = new Map<string, Usage>();
  /** Fan-out tasks whose writes may be saved in batches, with the batch size (`saveEvery`). */
  private readonly batched = new Map<string, number>();
  /** Writes out every batched task write; set by the run's saver. */
  flushWrites: () => Promise<void> = async () => {};
  private readonly limiters = new Map<string, LimitFunction>();
  /** Aborted when a stop is requested: cuts short a wait between retries. */
  private readonly stopping = new AbortController();
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
  ) {
    setMaxListeners(0, this.stopping.signal);
  }

  /**
   * Run one task: wait for a slot when the step limits its concurrency, time it, retry transient
   * failures, report it, and on failure hold the error until every sibling task that is still running
   * has finished and had its writes saved (see `settled`), then rethrow. A task that has not started
   * when the run is stopping does not start: it leaves no writes, so a resume runs it.
   */
  async task<T>(node: string, item: number | undefined, taskId: string | undefined, fn: (attempt: number) => Promise<T>, policy: TaskPolicy = {}): Promise<T> {
    const id = taskId ?? `anonymous-${(this.anonymous += 1)}`;
    const step = this.stepOf(node);
    if (taskId !== undefined) this.unsettled.add(id);
    if (taskId !== undefined && policy.saveEvery !== undefined && policy.saveEvery > 1) this.batched.set(taskId, policy.saveEvery);
    const body = () => this.attempt(node, step, item, id, fn, policy.retry);
    // The slot is held only while the task runs: a failed task waits for its siblings (below) without
    // it, or the siblings queued behind it could never start and the wait would never end.
    const outcome = await (policy.concurrency ? this.limiter(step, policy.concurrency)(body) : body());
    if ("result" in outcome) return outcome.result;
    this.holding.add(id);
    this.wake();
    try {
      await this.untilSiblingsSaved();
      // Siblings' writes held for a batch go to the store before the failure ends the superstep.
      await this.flushWrites();
    } finally {
      this.holding.delete(id);
      this.unsettled.delete(id);
    }
    throw outcome.error;
  }

  /** One task's run, start to finish: its result, or the error it failed with (already reported). */
  private async attempt<T>(
    node: string,
    step: string,
    item: number | undefined,
    id: string,
    fn: (attempt: number) => Promise<T>,
    retry: RetryPolicy | false | undefined,
  ): Promise<{ result: T } | { error: unknown }> {
    if (this.stopReason === undefined && this.overBudget()) this.requestStop("budget");
    // A cancelled run starts nothing more either; what has not started is left for a resume.
    if (this.stopReason !== undefined || this.signal.aborted) {
      this.notStarted += 1;
      throw this.notStarting(id);
    }
    const startedAt = this.now();
    this.taskCount += 1;
    const first = this.attemptOf(node, item);
    this.emit({ type: "task:start", thread: this.thread, node, step, item, attempt: first });
    try {
      const result = await this.withRetry(node, step, item, first, fn, retry);
      const endedAt = this.now();
      const usage = this.taskUsage.get(id) ?? NO_USAGE;
      this.finished.push({ node, step, startedAt, endedAt, ok: true, usage });
      this.emit({ type: "task:end", thread: this.thread, node, step, item, durationMs: endedAt - startedAt, usage });
      return { result };
    } catch (error) {
      const usage = this.taskUsage.get(id) ?? NO_USAGE;
      this.taskUsage.delete(id);
      // Spent by attempts that did not finish: no checkpoint will ever record it.
      this.lostUsage = addUsage(this.lostUsage, usage);
      if (isGraphDrained(error)) {
        // Started, then stopped while waiting to retry: unfinished, so the resume runs it again.
        this.notStarted += 1;
        throw this.notStarting(id);
      }
      const endedAt = this.now();
      const record = { node, step, startedAt, endedAt, ok: false, usage };
      this.finished.push(record);
      this.failedTasks.push(record);
      const err = error instanceof Error ? error : new Error(String(error));
      this.emit({ type: "task:error", thread: this.thread, node, step, item, durationMs: endedAt - startedAt, error: err, usage });
      return { error };
    }
  }

  /** A task that will not run: LangGraph treats a drained task as unstarted (no error is saved). */
  private notStarting(id: string): GraphDrained {
    this.unsettled.delete(id);
    this.wake();
    return new GraphDrained(this.stopReason ?? "shutdown");
  }

  private async withRetry<T>(node: string, step: string, item: number | undefined, first: number, fn: (attempt: number) => Promise<T>, retry: RetryPolicy | false | undefined): Promise<T> {
    const call = async (n: number) => {
      try {
        return await fn(first + n - 1);
      } catch (error) {
        // p-retry only handles Error instances; a thrown string must still fail the task, not crash it.
        throw error instanceof Error ? error : new Error(String(error));
      }
    };
    const policy = retry === false ? { maxAttempts: 1 } : (retry ?? {});
    const maxAttempts = policy.maxAttempts ?? 3;
    if (maxAttempts <= 1) return call(1);
    const retryOn = policy.retryOn ?? isTransientError;
    const initial = policy.initialDelayMs ?? 1000;
    const factor = policy.factor ?? 2;
    const max = policy.maxDelayMs ?? 30_000;
    // p-retry drives the attempts; the wait between them is ours, so a stop can cut it short without
    // abandoning an attempt that is still running (its result is paid for and must be saved).
    return pRetry(call, {
      retries: maxAttempts - 1,
      minTimeout: 0,
      maxTimeout: 0,
      onFailedAttempt: async ({ error, attemptNumber, retriesLeft }) => {
        if (retriesLeft === 0 || this.stopReason !== undefined || !retryOn(error)) return;
        this.emit({ type: "task:retry", thread: this.thread, node, step, item, failedAttempt: first + attemptNumber - 1, error });
        const wait = Math.min(max, initial * factor ** (attemptNumber - 1)) * (1 + Math.random());
        await this.pause(wait);
      },
      shouldRetry: ({ error }) => {
        if (!retryOn(error)) return false;
        // Stopping: the item did not finish, so it is left for the resume rather than failed.
        if (this.stopReason !== undefined) throw new GraphDrained(this.stopReason);
        return true;
      },
    });
  }

  /** Wait `ms`, or less if a stop is requested meanwhile. */
  private pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.stopping.signal.removeEventListener("abort", done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.stopping.signal.addEventListener("abort", done, { once: true });
    });
  }

  private limiter(step: string, concurrency: number): LimitFunction {
    let limit = this.limiters.get(step);
    if (!limit) {
      limit = pLimit(concurrency);
      this.limiters.set(step, limit);
    }
    return limit;
  }

  /** Ask the run to stop at the next step boundary; tasks not yet started do not start. */
  requestStop(reason: StopReason, message?: string): void {
    if (this.stopReason !== undefined) return;
    this.stopReason = reason;
    this.control.requestDrain(reason);
    this.stopping.abort(reason);
    const spent = this.spent();
    const text =
      message ??
      (reason === "budget"
        ? `budget of ${formatUsd(this.budgetUsd ?? 0)} reached (spent ${formatUsd(spent.usd)}): stopping at the next step boundary`
        : "stopping at the next step boundary; finished work is kept");
    this.emit({ type: "stopping", thread: this.thread, reason, message: text });
  }

  /** Count a model call (or a step's own report) against its task, the run and the budget. */
  recordUsage(taskId: string | undefined, usage: Usage, step?: string, item?: number): void {
    if (taskId !== undefined) this.taskUsage.set(taskId, addUsage(this.taskUsage.get(taskId), usage));
    this.runUsage = addUsage(this.runUsage, usage);
    this.emit({ type: "usage", thread: this.thread, step, item, usage, runTotal: this.runUsage });
    // Crossing the budget stops what has not started yet, retries included.
    if (this.stopReason === undefined && this.overBudget()) this.requestStop("budget");
  }

  /** `ctx.artifacts` for one step or item. */
  artifactsFor(where: string): { put: ArtifactStore["put"]; get: ArtifactStore["get"] } {
    const store = () => {
      if (!this.artifacts) throw new CairnError("INVALID_ARGUMENT", `${where} used ctx.artifacts, but this run has no artifact store. Run it with cairn's run() or resume(), which open one with the checkpoint store.`);
      return this.artifacts;
    };
    return { put: (bytes, options) => store().put(bytes, options), get: (ref) => store().get(ref) };
  }

  /** What a task has spent so far (all its attempts). */
  usageOf(taskId: string | undefined): Usage {
    return (taskId !== undefined && this.taskUsage.get(taskId)) || NO_USAGE;
  }

  /** The thread's spend: before this run, on every branch, plus everything this run has spent. */
  spent(): Usage {
    return addUsage(this.spentBefore, this.runUsage);
  }

  overBudget(): boolean {
    return this.budgetUsd !== undefined && this.spent().usd >= this.budgetUsd;
  }

  /** A checkpoint was saved: a step boundary, where the budget is checked. */
  checkpointed(): void {
    if (this.stopReason === undefined && this.overBudget()) this.requestStop("budget");
  }

  /** The thread's spend when the run starts. */
  startFrom(spent: Usage): void {
    this.spentBefore = spent;
  }

  /** How many finished items of this task's fan-out are saved together (1: each on its own). */
  saveEveryOf(taskId: string): number {
    return this.batched.get(taskId) ?? 1;
  }

  /** The run's saver calls this once a task's writes are saved (or held for a batch). */
  settled(taskId: string): void {
    this.taskUsage.delete(taskId);
    this.batched.delete(taskId);
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
