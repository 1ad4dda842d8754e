import type { BaseCheckpointSaver, CheckpointTuple } from "@langchain/langgraph-checkpoint";
import { DONE_CHANNEL, MAP_PREFIX, USAGE_CHANNEL } from "../channels.ts";
import { addUsage, NO_USAGE, type Usage } from "../workflow/usage.ts";
import { CairnError } from "../errors.ts";
import { processState } from "../store/process.ts";
import { errorWrites, nodesThatRan, pendingNodes } from "../store/steps.ts";

/** One checkpoint of a thread, as `cairn history` shows it. */
export interface HistoryEntry {
  id: string;
  parent: string | undefined;
  /** The step that produced this checkpoint ("input" for the first; "a+b" when parallel steps ran). */
  step: string;
  /** The steps that ran to produce it (empty for input, restart and fork checkpoints). */
  steps: string[];
  source: string;
  ts: string;
  durationMs: number | undefined;
  tasks: number | undefined;
  /** Spent by the tasks this checkpoint records, and by the thread up to it (absent before cairn counted). */
  usage: Usage | undefined;
  total: Usage | undefined;
}

export type ThreadStatus = "completed" | "failed" | "interrupted" | "running";

export interface ThreadSummary {
  thread: string;
  status: ThreadStatus;
  /** The last step that finished (the step of the newest checkpoint). */
  lastStep: string;
  checkpoints: number;
  updated: string;
  /** For a failed thread, the failing task's message. */
  error?: string;
  /** Steps still due on an unfinished thread. */
  next: string[];
  /** What the thread has spent on model calls, on every branch, including finished items of an unfinished step. */
  spent: Usage;
  /** Space the thread takes in the store, when asked for (see `OpenedStore.threadBytes`). */
  bytes?: number;
}

interface CairnMeta {
  step?: string;
  steps?: string[];
  durationMs?: number;
  tasks?: number;
  pid?: number;
  host?: string;
  usage?: Usage;
  total?: Usage;
}

/**
 * A thread's root checkpoints, newest first, for what they recorded (metadata, ids, parents): without
 * their state where the store can leave it out (the file store's `listMetadata`), so a big state is not
 * loaded once per checkpoint to sum spend or list history.
 */
export function listRecorded(saver: BaseCheckpointSaver, thread: string): AsyncIterable<CheckpointTuple> {
  const config = { configurable: { thread_id: thread, checkpoint_ns: "" } };
  const lean = (saver as { listMetadata?: (c: typeof config) => AsyncIterable<CheckpointTuple> }).listMetadata;
  return typeof lean === "function" ? lean.call(saver, config) : saver.list(config);
}

const cairnMeta = (tuple: CheckpointTuple): CairnMeta => ((tuple.metadata as { cairn?: CairnMeta } | undefined)?.cairn ?? {});

/**
 * Every root checkpoint of a thread, oldest first. After a prune, the oldest ones left may name a
 * parent that is gone (`parent` is kept as recorded); their step is still read from cairn's metadata.
 */
export async function readHistory(saver: BaseCheckpointSaver, thread: string): Promise<HistoryEntry[]> {
  const tuples: CheckpointTuple[] = [];
  for await (const t of listRecorded(saver, thread)) tuples.push(t);
  tuples.reverse();
  const byId = new Map(tuples.map((t) => [t.checkpoint.id, t]));
  return tuples.map((t) => {
    const meta = cairnMeta(t);
    const parentId = t.parentConfig?.configurable?.checkpoint_id as string | undefined;
    let step = meta.step;
    if (!step) {
      const source = t.metadata?.source ?? "loop";
      if (source !== "loop") step = source;
      else {
        const parent = parentId ? byId.get(parentId) : undefined;
        // Without its parent (pruned), what changed since cannot be told: the node that ran is unknown.
        const ran = parentId && !parent ? [] : nodesThatRan(parent?.checkpoint.versions_seen, t.checkpoint.versions_seen);
        step = ran.join("+") || `step ${t.metadata?.step ?? "?"}`;
      }
    }
    const source = t.metadata?.source ?? "loop";
    return {
      id: t.checkpoint.id,
      parent: parentId,
      step,
      steps: meta.steps ?? (source === "loop" && step !== "start" ? step.split("+") : []),
      source,
      ts: t.checkpoint.ts,
      durationMs: meta.durationMs,
      tasks: meta.tasks,
      usage: meta.usage,
      total: meta.total,
    };
  });
}

/** The chain of checkpoints that leads to `head` (oldest first): the thread's current branch. */
export function branchOf(entries: HistoryEntry[], head: string): HistoryEntry[] {
  const byId = new Map(entries.map((e) => [e.id, e]));
  const chain: HistoryEntry[] = [];
  let cur = byId.get(head);
  while (cur) {
    chain.push(cur);
    cur = cur.parent ? byId.get(cur.parent) : undefined;
  }
  return chain.reverse();
}

/** The thread's current branch: the chain that leads to its newest checkpoint, oldest first. */
export function currentBranch(entries: HistoryEntry[]): HistoryEntry[] {
  const head = entries[entries.length - 1];
  return head ? branchOf(entries, head.id) : [];
}

/** Refuse an empty checkpoint id up front (an empty id would silently mean "the latest"). */
export function checkCheckpointId(thread: string, checkpoint: string | undefined): void {
  if (checkpoint !== undefined && checkpoint.trim() === "") {
    throw new CairnError("INVALID_ARGUMENT", `--checkpoint is empty. Pass a checkpoint id from: cairn history ${thread}`, { thread });
  }
}

export function checkpointNotFound(thread: string, checkpoint: string, storeUri: string): CairnError {
  return new CairnError(
    "CHECKPOINT_NOT_FOUND",
    `No checkpoint "${checkpoint}" in thread "${thread}". List its checkpoints with: cairn history ${thread} --store ${storeUri}`,
    { thread, checkpoint },
  );
}

/** Latest checkpoint of a thread, or THREAD_NOT_FOUND naming the store and how to list threads. */
export async function latestTuple(saver: BaseCheckpointSaver, thread: string, storeUri: string): Promise<CheckpointTuple> {
  const tuple = await saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } });
  if (!tuple) {
    throw new CairnError(
      "THREAD_NOT_FOUND",
      `No thread "${thread}" in store ${storeUri}. List the threads with: cairn threads --store ${storeUri}`,
      { thread, store: storeUri },
    );
  }
  return tuple;
}

/**
 * Where a thread stands, from its newest checkpoint alone: failed if a task's error is recorded there,
 * running if work is due and the process that wrote it is still alive on this host, interrupted if
 * work is due otherwise, completed when nothing is due and no task output is waiting to be applied.
 */
export function statusOf(tuple: CheckpointTuple): { status: ThreadStatus; next: string[]; error?: string } {
  const errors = errorWrites(tuple);
  const next = pendingNodes(tuple.checkpoint);
  const waitingWrites = (tuple.pendingWrites ?? []).length > 0;
  if (errors.length > 0) return { status: "failed", next, error: errors[0]!.message };
  if (next.length === 0 && !waitingWrites && tuple.metadata?.source !== "input") return { status: "completed", next };
  const meta = cairnMeta(tuple);
  if (meta.pid !== undefined && processState(meta.pid, meta.host) === "alive") return { status: "running", next };
  return { status: "interrupted", next };
}

export async function summarizeThread(saver: BaseCheckpointSaver, thread: string): Promise<ThreadSummary | undefined> {
  const tuple = await saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } });
  if (!tuple) return undefined;
  let checkpoints = 0;
  const spending = new Spending();
  for await (const t of listRecorded(saver, thread)) {
    checkpoints += 1;
    spending.add(t);
  }
  const spent = addUsage(spending.total(), pendingUsage(tuple));
  const { status, next, error } = statusOf(tuple);
  const history = cairnMeta(tuple).step;
  return {
    thread,
    status,
    lastStep: history ?? tuple.metadata?.source ?? "?",
    checkpoints,
    updated: tuple.checkpoint.ts,
    error,
    next,
    spent,
  };
}

/**
 * What a thread has spent on every branch: each checkpoint records what its step spent, so their sum
 * counts a step rerun by `--from-step` as often as it ran; plus the saved items of an unfinished step.
 * Once checkpoints were pruned their share is gone from the sum; the running total a checkpoint records
 * (its branch's spend) still counts, so the result never falls below the largest one kept.
 */
export async function spentInAll(saver: BaseCheckpointSaver, thread: string): Promise<Usage> {
  const latest = await saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } });
  if (!latest) return NO_USAGE;
  const spending = new Spending();
  for await (const t of listRecorded(saver, thread)) spending.add(t);
  return addUsage(spending.total(), pendingUsage(latest));
}

/**
 * The sum of what checkpoints spent; once some were pruned (a parent is missing), at least the largest
 * running total among those left (see spentInAll).
 */
class Spending {
  private sum: Usage = NO_USAGE;
  private floor: Usage = NO_USAGE;
  private readonly ids = new Set<string>();
  private readonly parents = new Set<string>();
  add(tuple: CheckpointTuple): void {
    const meta = cairnMeta(tuple);
    this.sum = addUsage(this.sum, meta.usage);
    if (meta.total) this.floor = largest(this.floor, meta.total);
    this.ids.add(tuple.checkpoint.id);
    const parent = tuple.parentConfig?.configurable?.checkpoint_id as string | undefined;
    if (parent) this.parents.add(parent);
  }
  total(): Usage {
    const pruned = [...this.parents].some((p) => !this.ids.has(p));
    return pruned ? largest(this.sum, this.floor) : this.sum;
  }
}

function largest(a: Usage, b: Usage): Usage {
  return {
    usd: Math.max(a.usd ?? 0, b.usd ?? 0),
    inputTokens: Math.max(a.inputTokens ?? 0, b.inputTokens ?? 0),
    outputTokens: Math.max(a.outputTokens ?? 0, b.outputTokens ?? 0),
    calls: Math.max(a.calls ?? 0, b.calls ?? 0),
  };
}

function pendingUsage(tuple: CheckpointTuple): Usage {
  let total = NO_USAGE;
  for (const [, channel, value] of tuple.pendingWrites ?? []) if (channel === USAGE_CHANNEL) total = addUsage(total, value as Usage);
  return total;
}

/**
 * What the branch leading to a checkpoint has spent: the total it records, plus what its saved but not
 * yet folded task writes spent (the finished items of a fan-out that then failed or was stopped).
 */
export function spentAt(tuple: CheckpointTuple): Usage {
  return addUsage(cairnMeta(tuple).total, pendingUsage(tuple));
}

/** The work a resume of a thread will not redo. */
export interface SavedWork {
  /** Steps finished on the thread's current branch, in the order they first finished. */
  steps: string[];
  /** For fan-out steps that are due (not gathered yet): the indexes of the items whose results are saved. */
  items: Record<string, number[]>;
}

/**
 * What a thread has saved, as a resume will find it: finished steps, including those whose output is
 * saved but not yet folded into a checkpoint, and the finished items of an unfinished fan-out.
 */
export async function savedWork(saver: BaseCheckpointSaver, thread: string): Promise<SavedWork> {
  const tuple = await saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } });
  if (!tuple) return { steps: [], items: {} };
  const values = tuple.checkpoint.channel_values as Record<string, unknown>;
  const steps: string[] = [];
  const items: Record<string, Set<number>> = {};
  // Values are lists, except a reset the gather node writes (an Overwrite) once it has folded the items in.
  const addSteps = (list: unknown) => {
    if (Array.isArray(list)) for (const s of list as string[]) if (!steps.includes(s)) steps.push(s);
  };
  const addItems = (channel: string, parts: unknown) => {
    const step = channel.slice(MAP_PREFIX.length);
    if (Array.isArray(parts)) for (const part of parts as { i: number }[]) (items[step] ??= new Set()).add(part.i);
  };
  if (DONE_CHANNEL in values) addSteps(values[DONE_CHANNEL]);
  else addSteps(currentBranch(await readHistory(saver, thread)).flatMap((e) => e.steps));
  for (const [channel, value] of Object.entries(values)) if (channel.startsWith(MAP_PREFIX)) addItems(channel, value);
  for (const [, channel, value] of tuple.pendingWrites ?? []) {
    if (channel === DONE_CHANNEL) addSteps(value);
    else if (channel.startsWith(MAP_PREFIX)) addItems(channel, value);
  }
  const out: Record<string, number[]> = {};
  // A fan-out's channel is emptied when its items are gathered, so parts still there belong to the pass
  // now due, even when the step finished before (a fan-out inside a loop).
  for (const [step, set] of Object.entries(items)) out[step] = [...set].sort((a, b) => a - b);
  return { steps, items: out };
}
