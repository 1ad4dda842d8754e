import type { RunnableConfig } from "@langchain/core/runnables";
import { CairnError } from "../errors.ts";
import { currentBranch, latestTuple, readHistory, type HistoryEntry } from "../inspect/history.ts";
import { openStore, type OpenedStore } from "../store/open.ts";
import { isWorkflow, unknownStep } from "../workflow/builder.ts";
import { asStateGraph, describeTarget, type RunTarget } from "./prepare.ts";
import { checkpointBefore, rebuildBefore, resume, type ResumeOptions, type RunResult, type StateOf, type StepName } from "./run.ts";
import { visibleState } from "../store/steps.ts";

/** A thread opened for notebook-style work: read its states, try a step, continue from a step. */
export interface ThreadHandle<T extends RunTarget> {
  readonly thread: string;
  readonly store: OpenedStore;
  /** The latest state. */
  state(): Promise<StateOf<T>>;
  /** Every checkpoint of the thread, oldest first. */
  history(): Promise<HistoryEntry[]>;
  /** The state just before `step` first ran on the thread's current branch. */
  stateBefore(step: StepName<T>): Promise<StateOf<T>>;
  /** The state just after `step` last finished on the thread's current branch. */
  stateAfter(step: StepName<T>): Promise<StateOf<T>>;
  /**
   * Run one step on a state (by default the state before it) and return its update. Nothing is written:
   * use it to try a prompt change before rerunning for real.
   */
  tryStep(step: StepName<T>, state?: StateOf<T>): Promise<Partial<StateOf<T>>>;
  /** Rerun `step` and everything after it, for real (a fork; the old branch stays in history). */
  continueFrom(step: StepName<T>, options?: Omit<ResumeOptions<StepName<T>>, "thread" | "store" | "fromStep">): Promise<RunResult<StateOf<T>>>;
  /** Continue from the latest checkpoint. */
  resume(options?: Omit<ResumeOptions<StepName<T>>, "thread" | "store">): Promise<RunResult<StateOf<T>>>;
  /** Close the store if this handle opened it. */
  close(): Promise<void>;
}

/**
 * Open a thread of a workflow for experiments in a script.
 *
 * @example
 * ```ts
 * const run = await open(moralVideo, { thread: "video-001" });
 * const before = await run.stateBefore("story_generator");
 * const draft = await run.tryStep("story_generator", before); // runs one step, writes nothing
 * await run.close();
 * ```
 */
export async function open<T extends RunTarget>(
  target: T,
  options: { thread: string; store?: string | OpenedStore; cwd?: string },
): Promise<ThreadHandle<T>> {
  const ownsStore = typeof options.store !== "object";
  const store = typeof options.store === "object" ? options.store : await openStore(options.store, { cwd: options.cwd });
  const { thread } = options;
  const { name, steps } = describeTarget(target);
  try {
    await latestTuple(store.saver, thread, store.uri);
  } catch (error) {
    if (ownsStore) await store.close();
    throw error;
  }
  const checkStep = (step: string) => {
    if (!steps.includes(step)) throw unknownStep(name, step, steps);
  };
  const valuesAt = async (id: string) => {
    const tuple = await store.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "", checkpoint_id: id } });
    return tuple?.checkpoint.channel_values as Record<string, unknown> | undefined;
  };
  const notRun = (step: string) =>
    new CairnError("UNKNOWN_STEP", `Step "${step}" has no checkpoint on thread "${thread}" (it has not run, or its checkpoints were pruned).`, { thread, step });

  const handle: ThreadHandle<T> = {
    thread,
    store,
    async state() {
      const tuple = await latestTuple(store.saver, thread, store.uri);
      return visibleState(tuple.checkpoint.channel_values as Record<string, unknown>) as StateOf<T>;
    },
    history: () => readHistory(store.saver, thread),
    async stateBefore(step) {
      checkStep(step);
      const before = await checkpointBefore(store.saver, thread, step);
      const saved = before.tuple && (visibleState(before.tuple.checkpoint.channel_values as Record<string, unknown>) as StateOf<T>);
      // A pruned workflow branch may have lost the step's first run: rebuilt below, as a restart would.
      if (saved && !(before.truncated && isWorkflow(target))) return saved;
      // History pruned: a cairn workflow rebuilds the state from the records its steps left.
      const latest = await latestTuple(store.saver, thread, store.uri);
      const current = latest.checkpoint.channel_values as Record<string, unknown>;
      const rebuilt = isWorkflow(target) ? rebuildBefore(current, step) : undefined;
      if (!rebuilt && saved) return saved;
      if (!rebuilt) throw notRun(step);
      const state = { ...current, ...rebuilt.fields };
      for (const k of rebuilt.absent) delete state[k];
      return visibleState(state) as StateOf<T>;
    },
    async stateAfter(step) {
      checkStep(step);
      const last = currentBranch(await readHistory(store.saver, thread)).filter((e) => e.steps.includes(step)).pop();
      const values = last ? await valuesAt(last.id) : undefined;
      if (!values) throw notRun(step);
      return visibleState(values) as StateOf<T>;
    },
    async tryStep(step, state) {
      checkStep(step);
      const input = state ?? (await handle.stateBefore(step));
      const log = (m: string) => console.log(`  [${step}] ${m}`);
      const ctx = {
        thread,
        signal: new AbortController().signal,
        log,
        progress: (done: number, total?: number, message?: string) => log(`${done}${total === undefined ? "" : `/${total}`}${message ? ` ${message}` : ""}`),
        usage: () => {},
        // Bytes are stored content-addressed; nothing in the thread refers to them until a real run does.
        artifacts: { put: store.artifacts.put.bind(store.artifacts), get: store.artifacts.get.bind(store.artifacts) },
      };
      if (isWorkflow(target)) return (await target.runStepAlone(step, input as never, ctx)) as Partial<StateOf<T>>;
      const node = (asStateGraph(target).nodes as Record<string, { runnable: { invoke(i: unknown, c?: RunnableConfig): Promise<unknown> } }>)[step]!;
      return (await node.runnable.invoke(input, { configurable: { thread_id: thread } })) as Partial<StateOf<T>>;
    },
    continueFrom: (step, opts = {}) => resume(target, { ...opts, thread, store, fromStep: step } as ResumeOptions<StepName<T>>),
    resume: (opts = {}) => resume(target, { ...opts, thread, store } as ResumeOptions<StepName<T>>),
    async close() {
      if (ownsStore) await store.close();
    },
  };
  return handle;
}

