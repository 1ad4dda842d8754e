import { setMaxListeners } from "node:events";
import { isGraphDrained, Overwrite, START, type StateSnapshot } from "@langchain/langgraph";
import type { BaseCheckpointSaver, CheckpointTuple } from "@langchain/langgraph-checkpoint";
import { customAlphabet } from "nanoid";
import { CairnError, isCairnError } from "../errors.ts";
import { checkCheckpointId, checkpointNotFound, currentBranch, latestTuple, readHistory, spentAt, spentInAll } from "../inspect/history.ts";
import { FileCheckpointSaver } from "../store/file.ts";
import { withStore, type OpenedStore } from "../store/open.ts";
import { errorWrites, visibleState } from "../store/steps.ts";
import { DONE_CHANNEL, isWorkflow, undoChannel, unknownStep, type UndoRecord, type Workflow } from "../workflow/builder.ts";
import { attemptKey, type RunEvent, type StopReason } from "../workflow/instrument.ts";
import { formatUsd, NO_USAGE, UsageCallbackHandler, type Pricing, type Usage } from "../workflow/usage.ts";
import { currentFingerprint, finishedOn } from "./fingerprint.ts";
import { applyMigration, checkFingerprint, migrationFor } from "./guard.ts";
import { describeTarget, parseInput, prepareRun, rawInput, type PreparedRun, type RunTarget } from "./prepare.ts";
import { keepFinalCheckpoint, Retention, type CleanupReport } from "./prune.ts";

/** The step names of a target: literal for a cairn workflow, any string for a plain StateGraph. */
export type StepName<T> = T extends Workflow<any, infer N> ? N : string;
/** The state of a target, without cairn's internal fields. */
export type StateOf<T> = T extends Workflow<infer S, any> ? import("zod").infer<S> : Record<string, unknown>;

export interface RunCommonOptions {
  /** A store URI (`file:<dir>`, `sqlite:<path>`, `postgres://…`) or an opened store. Default: CAIRN_STORE or `file:.cairn`. */
  store?: string | OpenedStore;
  /** Directory that relative store paths resolve against. */
  cwd?: string;
  /** Called for every task start/end, log line and checkpoint. */
  onEvent?: (event: RunEvent) => void;
  /** Cancels the run: running steps see their `ctx.signal` aborted. */
  signal?: AbortSignal;
  /**
   * Called once the thread and store are settled, before any step runs. `notices` says what a resume
   * noticed but did not refuse (a change that touches no finished step, a forced resume, an input that
   * cannot be checked, a migrated state).
   */
  onStart?: (info: { thread: string; store: string; skipped: string[]; notices: string[] }) => void;
  /**
   * Abort this signal to stop cleanly: running steps and items finish and are saved, nothing new
   * starts, and the run returns `status: "stopped"` at the next step boundary (what Ctrl+C does).
   */
  drain?: AbortSignal;
  /**
   * Stop at a step boundary once the thread has spent this many dollars (counting earlier runs of the
   * thread). Resuming with a higher budget continues.
   */
  budgetUsd?: number;
  /** Prices per million tokens by model name; laid over the workflow's own `pricing`. */
  pricing?: Pricing;
}

export interface StartOptions extends RunCommonOptions {
  /** The input, laid over the workflow's `defaultInput`; validated against its schema before anything is written. */
  input?: unknown;
  /**
   * Where `input` came from, recorded in the thread's fingerprint: `file:<absolute path>` makes a resume
   * re-read that file and refuse if it changed (see `readInputFile`). Default: `default` without an
   * input, `given` with one (a resume cannot re-read it; pass `input` to `resume` to have it checked).
   */
  inputSource?: string;
  /** The thread id; generated when absent. Must not exist yet. */
  thread?: string;
}

export interface ResumeOptions<Step extends string = string> extends RunCommonOptions {
  thread: string;
  /** Rerun this step and every step after it, from the state before it. */
  fromStep?: Step;
  /** Continue from this checkpoint of the thread's history instead of the latest. */
  checkpoint?: string;
  /**
   * Resume even though the workflow or its input changed since the thread's work was saved (what
   * `FINGERPRINT_MISMATCH` refuses). The differences are still reported through `onStart`'s `notices`.
   */
  force?: boolean;
  /**
   * When the thread's journal is damaged (`CHECKPOINT_CORRUPT`), continue from the newest checkpoint
   * left intact instead of refusing: the damage is set aside for good (those checkpoints are never
   * served again) and every skipped checkpoint is announced through `onStart`'s `notices`. File store
   * only; without it a damaged thread is refused and nothing is written.
   */
  fallback?: boolean;
  /**
   * The input as it is now, to check against the one the thread started with. Without it, a thread
   * started from a file (`inputSource: "file:…"`) re-reads that file, and one started from the
   * workflow's `defaultInput` compares with the current default.
   */
  input?: unknown;
  /** Where `input` came from (`file:<absolute path>`), recorded so that later resumes re-read it. */
  inputSource?: string;
}

export interface RunResult<State = Record<string, unknown>> {
  thread: string;
  /**
   * `already-completed`: a resume found nothing left to do and ran nothing. `stopped`: the run stopped
   * cleanly at a step boundary (`drain`, Ctrl+C, or the budget); resume it to go on.
   */
  status: "completed" | "already-completed" | "stopped";
  state: State;
  /** Tasks run by this call (a fan-out counts one per item). */
  tasksRun: number;
  store: string;
  usage: RunUsage;
  /**
   * The workflow's `cleanupOnSuccess` ran after the thread completed: what it removed (every checkpoint
   * but the final one, and the artifacts only those referred to).
   */
  cleanedUp?: CleanupReport;
  /** Present when `status` is `stopped`. */
  stopped?: {
    reason: StopReason;
    /** The steps due next: what a resume runs first. */
    next: string[];
    /** Fan-out items that were due but not started. */
    itemsNotStarted: number;
  };
}

/** Money and tokens, from this call's point of view. */
export interface RunUsage {
  /** Spent by this call, including attempts that failed. */
  run: Usage;
  /** Spent by the thread in all, on every branch (a step rerun by `fromStep` counts each time it ran). */
  thread: Usage;
  /** Spent before this call on work this call did not redo: what resuming saved. */
  reused: Usage;
  /** Spent by this call on attempts that failed (not in any checkpoint). */
  failed: Usage;
}

/**
 * Start a new thread and run it to the end, checkpointing durably after every step.
 *
 * @example
 * ```ts
 * const result = await run(moralVideo, { input: { topic: "honesty" }, thread: "video-001" });
 * ```
 */
export async function run<T extends RunTarget>(target: T, options: StartOptions = {}): Promise<RunResult<StateOf<T>>> {
  const thread = options.thread ?? newThreadId();
  checkThreadId(thread);
  const input = parseInput(target, options.input);
  const fingerprint = currentFingerprint(target, rawInput(target, options.input), options.inputSource ?? (options.input === undefined ? "default" : "given"));
  return withStore(options, async (store) => {
    const existing = await store.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } });
    if (existing) {
      throw new CairnError(
        "THREAD_EXISTS",
        `Thread "${thread}" already exists in store ${store.uri}. Continue it with \`cairn resume … --thread ${thread}\`, or pick another --thread id.`,
        { thread },
      );
    }
    // One writer per thread: fail fast if another process holds it (on the file store a new thread is
    // locked by its first write).
    return asWriter(store, thread, () => {
      const prepared = prepare(target, store, thread, options);
      prepared.saver.fingerprint = fingerprint.record;
      options.onStart?.({ thread, store: store.uri, skipped: [], notices: [] });
      return execute(prepared, store, thread, input, [], options);
    });
  });
}

/**
 * Continue a thread: from its latest checkpoint (finished steps never run again), from the state before a
 * named step (`fromStep`, which forks and keeps the old branch in history), or from any checkpoint.
 *
 * @example
 * ```ts
 * await resume(moralVideo, { thread: "video-001", fromStep: "video_assembler" });
 * ```
 */
export async function resume<T extends RunTarget>(target: T, options: ResumeOptions<StepName<T>>): Promise<RunResult<StateOf<T>>> {
  const { thread, fromStep, checkpoint } = options;
  if (fromStep !== undefined && checkpoint !== undefined) {
    throw new CairnError(
      "INVALID_ARGUMENT",
      `--from-step and --checkpoint cannot be used together: --from-step "${fromStep}" restarts before a step, --checkpoint "${checkpoint}" continues from one checkpoint. Pass one of them.`,
      { thread },
    );
  }
  checkThreadId(thread);
  checkCheckpointId(thread, checkpoint);
  const { steps, name } = describeTarget(target);
  if (fromStep !== undefined && !steps.includes(fromStep)) throw unknownStep(name, fromStep, steps);
  return withStore(options, async (store) => {
    const fallbackNotices: string[] = [];
    const latest = await latestOrFallback(store, thread, options.fallback === true, fallbackNotices);
    // One writer per thread: taken once the thread is known to exist and be readable, before anything is
    // decided from it. Fails fast with THREAD_LOCKED naming the holder; released when the resume ends.
    return asWriter(store, thread, async () => {
      const at = checkpoint === undefined ? latest : await store.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "", checkpoint_id: checkpoint } });
      if (!at) throw checkpointNotFound(thread, checkpoint!, store.uri);
      // Every check before anything is written: a refused resume leaves the thread as it was.
      const check = await checkFingerprint(target, store, thread, at, options);
      if (check.refusal) throw check.refusal;
      const wf = isWorkflow(target) ? target : undefined;
      // The state the run will start from must parse with the current schema (or migrate): checked before
      // any write where that state is known up front (a restart without history rebuilds it first).
      const startsAt = fromStep !== undefined ? (await checkpointBefore(store.saver, thread, fromStep)).tuple : at;
      const migrationAt = wf && startsAt ? migrationFor(wf, startsAt, check.recorded) : undefined;
      const notices = [...fallbackNotices, ...check.notices];
      const prepared = prepare(target, store, thread, options);
      prepared.saver.fingerprint = check.current.record;
      const config = { configurable: { thread_id: thread } };
      let moved = true;
      try {
        if (checkpoint !== undefined) {
          prepared.saver.nextLabel = "fork";
          await prepared.graph.updateState(at.config, undefined, "__copy__");
        } else if (fromStep !== undefined) {
          await rewindTo(prepared, store, thread, fromStep);
        } else if (brokenRouting(latest)) {
          prepared.saver.nextLabel = "retry-routing";
          await prepared.graph.updateState(latest.config, undefined, "__copy__");
        } else moved = false;
        if (wf) {
          const head = moved ? await store.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } }) : at;
          const migration = moved && head ? migrationFor(wf, head, check.recorded) : migrationAt;
          // A fork (a copy) records no step: route as the step that produced the checkpoint it copies.
          if (migration && head) notices.push(await applyMigration(prepared, head, migration, checkpoint !== undefined ? producerOf(wf, at) : undefined));
        }
      } catch (error) {
        throw restartRoutingFailed(error, thread, store.uri, finishedOn(at).length);
      }
      // One snapshot serves every question below: with thousands of saved fan-out items, each
      // getState costs as much as preparing the whole superstep.
      let snapshot = await prepared.graph.getState(config);
      if (checkpoint === undefined && fromStep === undefined) {
        // Finished is decided by the graph (what its edges say is due), not by the checkpoint alone; and
        // saved task output not yet folded into a checkpoint (a crash right after a step) is unfinished work.
        const finished = () => snapshot.next.length === 0 && (latest.pendingWrites ?? []).length === 0 && latest.metadata?.source !== "input";
        if (finished() && wf && (check.report?.structure.length ?? 0) > 0) {
          // The workflow changed since the thread completed (a step appended, a route changed): ask its
          // routing again, as the last step, whether anything is due now.
          const producer = producerOf(wf, latest);
          if (producer !== undefined) {
            prepared.saver.nextLabel = "reroute";
            try {
              await prepared.graph.updateState(latest.config, {}, wf.lastNodeOf(producer));
            } catch (error) {
              throw restartRoutingFailed(error, thread, store.uri, finishedOn(latest).length);
            }
            snapshot = await prepared.graph.getState(config);
            if (snapshot.next.length > 0) notices.push(`the workflow now goes on after "${producer}": ${[...new Set(snapshot.next.map((n) => wf.stepOfNode(n)))].join(", ")} will run`);
          }
        }
        if (snapshot.next.length === 0 && (finished() || snapshot.metadata?.source === "update")) {
          const total = spentAt(latest);
          const spent = await spentInAll(store.saver, thread);
          options.onStart?.({ thread, store: store.uri, skipped: await finishedSteps(prepared, store, thread, snapshot), notices });
          return {
            thread,
            status: "already-completed",
            state: visibleState(snapshot.values) as StateOf<T>,
            tasksRun: 0,
            store: store.uri,
            usage: { run: NO_USAGE, thread: spent, reused: total, failed: NO_USAGE },
          };
        }
      }
      const skipped = await finishedSteps(prepared, store, thread, snapshot);
      options.onStart?.({ thread, store: store.uri, skipped, notices });
      return execute(prepared, store, thread, null, skipped, options, snapshot);
    });
  });
}

/**
 * Run `body` as the thread's one writer: its lock taken first (THREAD_LOCKED, naming the holder, when
 * another live process or store object has it) and given up when the run ends, however it ends, so the
 * same store object, another one or another process can continue the thread afterwards.
 */
async function asWriter<T>(store: OpenedStore, thread: string, body: () => Promise<T>): Promise<T> {
  await store.lockThread(thread);
  try {
    return await body();
  } finally {
    // Also after losing the lock: a write still under way is checked against the lock it started
    // under (LeaseTable.write), and a release removes only this process's own lease.
    await store.releaseThread(thread).catch(() => {});
  }
}

/**
 * The thread's latest checkpoint; with `fallback`, a thread the file store refuses as damaged has its
 * damage set aside first, and what was skipped is said in `notices` (never silently).
 */
async function latestOrFallback(store: OpenedStore, thread: string, fallback: boolean, notices: string[]): Promise<CheckpointTuple> {
  try {
    return await latestTuple(store.saver, thread, store.uri);
  } catch (error) {
    if (!fallback || !isCairnError(error, "CHECKPOINT_CORRUPT")) throw error;
    if (!(store.saver instanceof FileCheckpointSaver)) {
      error.message += ` (--fallback applies to the file store only; this store is ${store.uri}.)`;
      throw error;
    }
    const { damage, skipped } = await store.saver.setAsideDamage(thread);
    if (damage.length === 0) throw error;
    for (const d of damage) notices.push(`--fallback: set aside the damaged record at byte ${d.offset} of ${d.file} (${d.why})`);
    for (const s of skipped) notices.push(`--fallback: skipped checkpoint ${s.checkpoint}: ${s.why}`);
    const latest = await latestTuple(store.saver, thread, store.uri);
    const step = (latest.metadata as { cairn?: { step?: unknown } } | undefined)?.cairn?.step;
    notices.push(`--fallback: continuing from checkpoint ${latest.config.configurable?.checkpoint_id}${typeof step === "string" ? ` (after step "${step}")` : ""}, the newest intact one`);
    return latest;
  }
}

/**
 * Put the thread back to the state before `step` first ran on its current branch. With the checkpoint
 * before that step still in history, fork from it (a copy, so history keeps the old branch). Without it
 * (pruned), a cairn workflow rebuilds that state from the latest one: each step recorded, the first
 * time it ran, the values it replaced. A workflow whose branch was pruned rebuilds even when the step
 * shows in what is left: its first run may have been in the part that is gone (a loop).
 */
async function rewindTo(prepared: PreparedRun, store: OpenedStore, thread: string, step: string): Promise<void> {
  const before = await checkpointBefore(store.saver, thread, step);
  const fork = async (tuple: CheckpointTuple) => {
    prepared.saver.nextLabel = `restart:${step}`;
    const producer = prepared.workflow ? producerOf(prepared.workflow, tuple) : undefined;
    if (producer !== undefined) {
      // Fork as the step that produced that checkpoint, so the current workflow's routing decides what
      // runs next (a step inserted since then runs; a copy would keep the old route).
      await prepared.graph.updateState(tuple.config, {}, prepared.workflow!.lastNodeOf(producer));
    } else {
      // Before the first step (or a plain graph): a copy; the first step is routed when the input is read.
      await prepared.graph.updateState(tuple.config, undefined, "__copy__");
    }
  };
  if (before.tuple && !(before.truncated && prepared.workflow)) return fork(before.tuple);
  const latest = await prepared.graph.getState({ configurable: { thread_id: thread } });
  const rebuilt = prepared.workflow ? rebuildBefore(latest.values as Record<string, unknown>, step) : undefined;
  if (prepared.workflow && rebuilt) {
    const update: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(rebuilt.fields)) update[k] = prepared.isReducer(k) ? new Overwrite(v) : v;
    // Writing undefined unsets a field: the restarted steps had created it.
    for (const k of rebuilt.absent) update[k] = undefined;
    update[DONE_CHANNEL] = new Overwrite(rebuilt.doneBefore);
    for (const s of rebuilt.undone) update[undoChannel(s)] = null;
    const last = rebuilt.doneBefore[rebuilt.doneBefore.length - 1];
    prepared.saver.nextLabel = `restart:${step}`;
    // The latest checkpoint's own id: its pending writes (items of a step being restarted) are not folded in.
    await prepared.graph.updateState(latest.config, update, last === undefined ? START : prepared.workflow.lastNodeOf(last));
    return;
  }
  if (before.tuple) return fork(before.tuple);
  if (!before.ran) {
    const stepOf = (n: string) => (prepared.workflow ? prepared.workflow.stepOfNode(n) : n);
    // Restarting the step that is due next is the same as continuing.
    if (latest.next.some((n) => stepOf(n) === step)) return;
    throw new CairnError(
      "INVALID_ARGUMENT",
      `Step "${step}" has not run yet in thread "${thread}", so there is nothing to restart. Continue the thread with \`cairn resume … --thread ${thread}\`.`,
      { thread, step },
    );
  }
  throw new CairnError(
    "HISTORY_PRUNED",
    `The checkpoint before step "${step}" is no longer in thread "${thread}" (pruned), and a plain LangGraph graph records no way to rebuild it. ` +
      `Restart from a step whose earlier checkpoint is still kept (\`cairn history ${thread}\` lists them), or start a new thread.`,
    { thread, step },
  );
}

/**
 * The checkpoint just before `step` first ran on the thread's current branch: what a restart from that
 * step starts from. `tuple` is absent when the step never ran there (`ran: false`) or history was pruned.
 * `truncated`: the branch's oldest checkpoint left has a parent that was pruned. Then a step found in
 * what is left may have run before too: a plain graph's node that the oldest kept checkpoint has already
 * seen (LangGraph's `versions_seen`) first ran in the pruned part, and has no `tuple`.
 */
export async function checkpointBefore(
  saver: BaseCheckpointSaver,
  thread: string,
  step: string,
): Promise<{ ran: boolean; tuple?: CheckpointTuple; truncated: boolean }> {
  const history = await readHistory(saver, thread);
  const branch = currentBranch(history);
  const oldest = branch[0];
  const truncated = oldest?.parent !== undefined && !history.some((e) => e.id === oldest.parent);
  if (truncated) {
    const at = await saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "", checkpoint_id: oldest!.id } });
    if (at?.checkpoint.versions_seen[step] !== undefined) return { ran: true, truncated };
  }
  const first = branch.find((e) => e.steps.includes(step));
  if (!first) return { ran: false, truncated };
  const tuple = first.parent
    ? await saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "", checkpoint_id: first.parent } })
    : undefined;
  return { ran: true, tuple, truncated };
}

/** The workflow step whose completion a checkpoint records (its own steps, else the last one finished). */
function producerOf(wf: Workflow<any, string>, tuple: CheckpointTuple): string | undefined {
  const steps = (tuple.metadata as { cairn?: { steps?: string[] } } | undefined)?.cairn?.steps ?? [];
  const own = steps.filter((s) => wf.steps.includes(s)).pop();
  if (own !== undefined) return own;
  const done = ((tuple.checkpoint.channel_values as Record<string, unknown>)[DONE_CHANNEL] as string[] | undefined) ?? [];
  return done.filter((s) => wf.steps.includes(s)).pop();
}

/**
 * A `when`/route function that threw while a restart, a migration or a reroute asked it where to go:
 * nothing ran, and the message says so (the step failed reporting reads these details).
 */
function restartRoutingFailed(error: unknown, thread: string, store: string, stepsSaved: number): unknown {
  const routing = routingFailure(error);
  if (!routing) return error;
  return new CairnError(
    "STEP_FAILED",
    `${routing.message.replace(/^its /, `Step "${routing.details.step}": its `)} (while deciding where the thread goes on; nothing was run)`,
    { ...routing.details, thread, stepsSaved, itemsSaved: 0, itemsFailed: 0, store },
    { cause: routing.cause },
  );
}

/** Generated thread ids: letters and digits only, so they never read as a flag or need quoting. */
const newThreadId = customAlphabet("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", 12);

/** Steps already finished on the thread's current branch: the work a resume does not redo. */
async function finishedSteps(prepared: PreparedRun, store: OpenedStore, thread: string, known?: StateSnapshot): Promise<string[]> {
  if (prepared.workflow) {
    const wf = prepared.workflow;
    const snapshot = known ?? (await prepared.graph.getState({ configurable: { thread_id: thread } }));
    // A step due again (a loop back to it) is not finished, whatever it did before.
    const due = new Set(snapshot.next.map((n) => wf.stepOfNode(n)));
    return (((snapshot.values as Record<string, unknown>)[DONE_CHANNEL] as string[] | undefined) ?? []).filter((s) => !due.has(s));
  }
  const branch = currentBranch(await readHistory(store.saver, thread));
  return [...new Set(branch.flatMap((e) => e.steps).filter((step) => prepared.steps.includes(step)))];
}

/**
 * The state before `step` first ran, rebuilt from a later state of a cairn workflow: every step records,
 * the first time it finishes, the values of the fields it replaced. Undefined if `step` has not finished.
 */
export function rebuildBefore(
  values: Record<string, unknown>,
  step: string,
): { fields: Record<string, unknown>; absent: string[]; doneBefore: string[]; undone: string[] } | undefined {
  const done = (values[DONE_CHANNEL] as string[] | undefined) ?? [];
  const at = done.indexOf(step);
  if (at === -1) return undefined;
  const undone = done.slice(at);
  const restored = new Map<string, { value: unknown } | "absent">();
  // Latest step first, so the earliest step's record (the value before `step` ran) is the one that stays.
  for (const s of [...undone].reverse()) {
    const undo = values[undoChannel(s)] as UndoRecord | undefined | null;
    for (const [k, v] of Object.entries(undo?.fields ?? {})) restored.set(k, { value: v });
    for (const k of undo?.absent ?? []) restored.set(k, "absent");
  }
  const fields: Record<string, unknown> = {};
  const absent: string[] = [];
  for (const [k, r] of restored) {
    if (r === "absent") absent.push(k);
    else fields[k] = r.value;
  }
  return { fields, absent, doneBefore: done.slice(0, at), undone };
}

async function execute(
  prepared: PreparedRun,
  store: OpenedStore,
  thread: string,
  input: unknown,
  skipped: string[],
  options: RunCommonOptions,
  /** On a resume: the thread's state as the run starts. */
  snapshot?: StateSnapshot,
): Promise<RunResult<any>> {
  const { runtime } = prepared;
  const config = { configurable: { thread_id: thread } };
  let reused = NO_USAGE;
  if (snapshot) {
    recordPreviousFailures(prepared, snapshot);
    // What the branch a resume keeps has spent: its latest checkpoint's total and its saved items.
    reused = spentAt(await latestTuple(store.saver, thread, store.uri));
    announceSavedItems(prepared, thread, snapshot);
  }
  runtime.startFrom(input === null ? await spentInAll(store.saver, thread) : NO_USAGE);
  runtime.resumed = input === null;
  runtime.emit({ type: "run:start", thread, workflow: prepared.name, steps: prepared.steps, skipped, spentBefore: reused });
  const finish = async (status: RunResult["status"], values: Record<string, unknown>): Promise<RunResult<any>> => {
    const usage = { run: runtime.runUsage, thread: await spentInAll(store.saver, thread), reused, failed: runtime.lostUsage };
    const result: RunResult<any> = { thread, status, state: visibleState(values), tasksRun: runtime.taskCount, store: store.uri, usage };
    if (status === "stopped") {
      const snapshot = await prepared.graph.getState(config);
      const stepOf = (n: string) => (prepared.workflow ? prepared.workflow.stepOfNode(n) : n);
      result.stopped = { reason: runtime.stopReason ?? "signal", next: [...new Set(snapshot.next.map(stepOf))], itemsNotStarted: runtime.notStarted };
    }
    return result;
  };
  if (runtime.overBudget()) {
    // Nothing may start past the budget; say so before running anything.
    runtime.requestStop("budget", `budget of ${formatUsd(options.budgetUsd!)} already reached (thread has spent ${formatUsd(runtime.spent().usd)}): nothing run`);
    const snapshot = await prepared.graph.getState(config);
    return finish("stopped", snapshot.values as Record<string, unknown>);
  }
  const onDrain = () => runtime.requestStop("signal");
  if (options.drain?.aborted) onDrain();
  options.drain?.addEventListener("abort", onDrain, { once: true });
  const usageHandler = new UsageCallbackHandler((task, usage) => runtime.recordUsage(task, usage), () => runtime.pricing);
  try {
    const values = await prepared.graph.invoke(input as never, {
      configurable: { thread_id: thread },
      // "sync": a step's checkpoint is on disk before the next step starts, so a crash loses no finished step.
      durability: "sync",
      recursionLimit: 100_000,
      control: runtime.control,
      callbacks: [usageHandler],
    });
    const result = await finish("completed", values as Record<string, unknown>);
    const cleanup = prepared.workflow?.cleanupOnSuccess;
    const keepLast = prepared.workflow?.retention?.keepLast;
    if (cleanup === true || (typeof cleanup === "function" && cleanup(result.state))) {
      result.cleanedUp = await keepFinalCheckpoint(store, thread);
    } else if (keepLast !== undefined) {
      await new Retention(store, thread, keepLast).pruneNow().catch((error: unknown) => retentionFailed(prepared, thread, error));
    }
    return result;
  } catch (error) {
    // A stop (drain, budget) ends the superstep with no failed task: the run stopped, it did not fail.
    if (isGraphDrained(error) && runtime.failedTasks.length === 0) {
      // Items held for a batch must be written before "everything finished is saved" is said.
      await prepared.saver.flush();
      const snapshot = await prepared.graph.getState(config);
      return finish("stopped", snapshot.values as Record<string, unknown>);
    }
    // Items held for a batch are written before the run reports how it failed; if that fails too, the
    // first error is the one to report.
    await prepared.saver.flush().catch(() => {});
    // Only a task's failure, or the workflow's routing code failing between steps, is a step failure;
    // store and setup errors keep their own message.
    const routing = routingFailure(error);
    if (runtime.failedTasks.length === 0 && !routing) throw error;
    throw await stepFailed(prepared, store, thread, routing ?? error, routing?.details.step);
  } finally {
    options.drain?.removeEventListener("abort", onDrain);
  }
}

/** For each fan-out due on resume: how many items it has and how many are already saved. */
function announceSavedItems(prepared: PreparedRun, thread: string, snapshot: StateSnapshot): void {
  if (!prepared.workflow) return;
  const counts = new Map<string, { total: number; done: number }>();
  for (const task of snapshot.tasks) {
    if (!prepared.workflow.isMapStep(task.name)) continue;
    const c = counts.get(task.name) ?? { total: 0, done: 0 };
    c.total += 1;
    if (task.result !== undefined && !task.error) c.done += 1;
    counts.set(task.name, c);
  }
  for (const [step, c] of counts) prepared.runtime.emit({ type: "fanout", thread, step, total: c.total, done: c.done });
}

/** Tell the runtime which due tasks failed before, so steps can see `ctx.attempt`. */
function recordPreviousFailures(prepared: PreparedRun, snapshot: StateSnapshot): void {
  for (const task of snapshot.tasks) {
    if (!task.error) continue;
    const item = task.path?.[0] === "__pregel_push" && typeof task.path[1] === "number" ? task.path[1] : undefined;
    const key = attemptKey(task.name, item);
    prepared.runtime.previousFailures.set(key, (prepared.runtime.previousFailures.get(key) ?? 0) + 1);
  }
}

/** A workflow's `when`/`over`/route function that threw between steps (see the builder's `userCode`). */
function routingFailure(error: unknown): CairnError | undefined {
  const errors = error instanceof AggregateError ? error.errors : [error];
  return errors.find((e): e is CairnError => isCairnError(e, "STEP_FAILED") && e.details.routing === true);
}

/**
 * The task whose routing code (`when`, `over`, a route) threw after the step itself finished. LangGraph
 * runs routing while saving the step's writes, so the store holds both the step's output and an error
 * for that task, and continuing from there would apply the output and route nowhere. Such a task is
 * run again instead (its routing with it): the resume forks a copy of the checkpoint without the writes.
 */
export function brokenRouting(tuple: CheckpointTuple): string | undefined {
  const byTask = new Map<string, Set<string>>();
  for (const [task, channel] of tuple.pendingWrites ?? []) byTask.set(task, (byTask.get(task) ?? new Set()).add(channel));
  for (const [task, channels] of byTask) if (channels.has("__error__") && [...channels].some((c) => c !== "__error__")) return task;
  return undefined;
}

/** The error for a failed step: which step, why, and what is saved. */
async function stepFailed(prepared: PreparedRun, store: OpenedStore, thread: string, error: unknown, routingStep?: string): Promise<CairnError> {
  const failed = prepared.runtime.failedTasks[0];
  const cause = error instanceof AggregateError ? (error.errors[0] as unknown) : error;
  const message = cause instanceof Error ? cause.message : String(cause);
  const latest = await store.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } });
  let stepsSaved = 0;
  let itemsSaved = 0;
  let itemsFailed = 0;
  // A routing failure is no task's: there are no items of it to count.
  if (latest) stepsSaved = (await finishedSteps(prepared, store, thread)).length;
  if (latest && routingStep === undefined) {
    itemsFailed = errorWrites(latest).length;
    itemsSaved = new Set((latest.pendingWrites ?? []).filter(([, ch]) => ch !== "__error__").map(([task]) => task)).size;
  }
  const step = routingStep ?? failed?.step ?? "unknown";
  const { runtime } = prepared;
  // What this run spent, and the part that went to attempts that failed (no checkpoint records it).
  const usage = { run: runtime.runUsage, failed: runtime.lostUsage, thread: await spentInAll(store.saver, thread) };
  return new CairnError("STEP_FAILED", `Step "${step}" failed: ${message}`, { thread, step, stepsSaved, itemsSaved, itemsFailed, store: store.uri, usage }, { cause });
}

function prepare(target: RunTarget, store: OpenedStore, thread: string, options: RunCommonOptions): PreparedRun {
  // One signal for the run, shared by every task (a fan-out of thousands listens to it at once).
  const controller = new AbortController();
  setMaxListeners(0, controller.signal);
  if (options.signal) {
    if (options.signal.aborted) controller.abort(options.signal.reason);
    else options.signal.addEventListener("abort", () => controller.abort(options.signal!.reason), { once: true });
  }
  if (options.budgetUsd !== undefined && !(typeof options.budgetUsd === "number" && Number.isFinite(options.budgetUsd) && options.budgetUsd > 0)) {
    throw new CairnError("INVALID_ARGUMENT", `Budget ${String(options.budgetUsd)} is not an amount of dollars; pass a number above 0 (e.g. --budget-usd 2.50).`, { thread });
  }
  const prepared = prepareRun(target, store.saver, thread, controller.signal, options.onEvent ?? (() => {}), (runtime) => {
    runtime.artifacts = store.artifacts;
    runtime.budgetUsd = options.budgetUsd;
    if (options.pricing) runtime.pricing = { ...runtime.pricing, ...options.pricing };
  });
  const keepLast = prepared.workflow?.retention?.keepLast;
  if (keepLast !== undefined) {
    const retention = new Retention(store, thread, keepLast);
    // A prune that fails is reported and the run goes on: the journal is either the old or the new one.
    prepared.saver.afterCheckpoint = () => retention.afterCheckpoint().then(
      () => {},
      (error: unknown) => retentionFailed(prepared, thread, error),
    );
  }
  return prepared;
}

function retentionFailed(prepared: PreparedRun, thread: string, error: unknown): void {
  const message = error instanceof Error ? error.message : String(error);
  prepared.runtime.emit({ type: "log", thread, step: "retention", message: `could not prune the thread: ${message}` });
}

function checkThreadId(thread: string): void {
  if (typeof thread !== "string" || thread.length === 0 || thread.length > 200 || /[\u0000-\u001f]/.test(thread)) {
    throw new CairnError("INVALID_ARGUMENT", `Invalid thread id ${JSON.stringify(thread)}: use 1–200 printable characters.`, { thread });
  }
}

export { withStore };
