import type { BaseCheckpointSaver } from "@langchain/langgraph-checkpoint";
import { diffArrays } from "diff";
import { CairnError } from "../errors.ts";
import { isArtifactRef } from "../store/artifacts.ts";
import { isInternalChannel } from "../store/steps.ts";
import { branchCheckpoints, lastRunOf } from "./branch.ts";
import { latestTuple, readHistory } from "./history.ts";
import { stateAt, type StateAt } from "./state.ts";

/** One key of a path into a state: a field or object key, or an array index. */
export type PathSegment = string | number;

/** One difference between two states, at a field or somewhere inside one. */
export interface StateChange {
  /** Where, for people: `title`, `scenes[2].prompt`, `meta["a b"]`. */
  path: string;
  /** The same place as keys, for programs: `["scenes", 2, "prompt"]`. */
  segments: PathSegment[];
  kind: "added" | "removed" | "changed";
  /** The value in the earlier state; absent when `kind` is `added`. */
  before?: unknown;
  /** The value in the later state; absent when `kind` is `removed`. */
  after?: unknown;
}

/**
 * A state to compare: a thread's latest state, the state at one of its checkpoints, the state right
 * after a step, or the state right before it. Name at most one of `checkpoint`, `step`, `beforeStep`.
 *
 * `step` and `beforeStep` look at the step's last run on the thread's current branch (the branch that
 * leads to its newest checkpoint). A run is the step's consecutive checkpoints: a fan-out writes two
 * (its items, then their gathering), a loop over one step writes one per pass; `beforeStep` is the state
 * just before the first of them, `step` the state after the last.
 */
export interface StateRef {
  thread: string;
  checkpoint?: string;
  step?: string;
  beforeStep?: string;
}

/** Two states of one or two threads, and what differs from the first (`a`) to the second (`b`). */
export interface StateDiff {
  a: StateAt;
  b: StateAt;
  /** Empty when the two states are equal. */
  changes: StateChange[];
}

/**
 * What differs between two states, field by field and, inside objects and arrays, key by key and item by
 * item. Pure: no store, no I/O.
 *
 * - Channels that are graph machinery rather than state (cairn's `__cairn_*`, LangGraph's `branch:…`)
 *   are ignored; a field holding `undefined` counts as absent. Fields come in code-unit order (stores
 *   return channels in different orders), keys inside a field in the order the values hold them.
 * - Strings, numbers, booleans, `null` and artifact references (`kind: "cairn.artifact"`, compared as a
 *   whole) are leaves: a difference is one `changed` entry with both values.
 * - Objects are compared key by key. Arrays of the same length are compared index by index; arrays whose
 *   length changed are aligned first, so items appended, inserted or removed show as such rather than as
 *   every later item changed. Indexes are those of the later state, except for removed items (the
 *   earlier state's).
 *
 * @example
 * ```ts
 * diffStates(
 *   { title: "Dusk", chapters: ["one"], scenes: [{ prompt: "a" }] },
 *   { title: "Dawn", chapters: ["one", "two"], scenes: [{ prompt: "b" }] },
 * );
 * // [
 * //   { path: "chapters[1]", segments: ["chapters", 1], kind: "added", after: "two" },
 * //   { path: "scenes[0].prompt", segments: ["scenes", 0, "prompt"], kind: "changed", before: "a", after: "b" },
 * //   { path: "title", segments: ["title"], kind: "changed", before: "Dusk", after: "Dawn" },
 * // ]
 * ```
 */
export function diffStates(a: Record<string, unknown>, b: Record<string, unknown>): StateChange[] {
  const out: StateChange[] = [];
  // Fields in code-unit order: the order a store returns channels in differs between stores.
  const keys = unionKeys(a ?? {}, b ?? {})
    .filter((k) => !isInternalChannel(k))
    .sort((p, q) => (p < q ? -1 : p > q ? 1 : 0));
  for (const k of keys) diffValue(a?.[k], b?.[k], [k], out);
  return out;
}

/**
 * Read two states of a store and compare them: the states `a` and `b` name, and {@link diffStates} of
 * their values (the earlier-to-later reading is yours: `a` is "before", `b` is "after").
 *
 * @throws CairnError `THREAD_NOT_FOUND` for a thread the store does not have, `CHECKPOINT_NOT_FOUND` for a
 *   checkpoint id not in the thread, `UNKNOWN_STEP` for a step with no checkpoint on the thread's current
 *   branch, `INVALID_ARGUMENT` when a ref names more than one of checkpoint, step and beforeStep,
 *   `HISTORY_PRUNED` when the checkpoint before a step is no longer in the thread.
 *
 * @example
 * ```ts
 * const store = await openStore("file:.cairn");
 * try {
 *   // What the last run of story_generator changed in thread video-001.
 *   const d = await diffCheckpoints(store.saver, store.uri, { thread: "video-001", beforeStep: "story_generator" }, { thread: "video-001", step: "story_generator" });
 *   for (const c of d.changes) console.log(c.kind, c.path);
 * } finally {
 *   await store.close();
 * }
 * ```
 */
export async function diffCheckpoints(saver: BaseCheckpointSaver, storeUri: string, a: StateRef, b: StateRef): Promise<StateDiff> {
  const stateA = await readRef(saver, storeUri, a);
  const stateB = await readRef(saver, storeUri, b);
  return { a: stateA, b: stateB, changes: diffStates(stateA.values, stateB.values) };
}

/**
 * Read `cairn diff`'s `<thread>` or `<thread>@<checkpoint-id>` notation. Thread ids may contain `@`, so
 * the text is split at its last `@`, and a text that is itself the id of a thread in the store names that
 * thread's latest state, unless the split also names a real checkpoint (then it is refused as ambiguous).
 *
 * @throws CairnError `INVALID_ARGUMENT` for `thread@` with no checkpoint, or an ambiguous text.
 */
export async function parseStateRef(saver: BaseCheckpointSaver, text: string): Promise<StateRef> {
  const at = text.lastIndexOf("@");
  if (at <= 0) return { thread: text };
  const thread = text.slice(0, at);
  const checkpoint = text.slice(at + 1);
  if (!(await threadExists(saver, text))) {
    if (checkpoint.trim() === "") {
      throw new CairnError(
        "INVALID_ARGUMENT",
        `"${text}" names no checkpoint after the "@". Write ${thread}@<checkpoint-id> (ids from: cairn history ${thread}), or ${thread} alone for its latest state.`,
        { thread },
      );
    }
    return { thread, checkpoint };
  }
  if (checkpoint !== "" && (await threadExists(saver, thread)) && (await readHistory(saver, thread)).some((e) => e.id === checkpoint)) {
    throw new CairnError(
      "INVALID_ARGUMENT",
      `"${text}" is ambiguous: it is the id of a thread, and also checkpoint "${checkpoint}" of thread "${thread}". ` +
        `For the thread "${text}", name one of its checkpoints: "${text}@<checkpoint-id>" (ids from: cairn history '${text}'); ` +
        `for the checkpoint, compare it within its thread: cairn diff '${thread}' ${checkpoint} <other-checkpoint-id>.`,
      { thread: text },
    );
  }
  return { thread: text };
}

// -------------------------------------------------------------------------------------------------
// Reading the two states

async function threadExists(saver: BaseCheckpointSaver, thread: string): Promise<boolean> {
  return (await saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } })) !== undefined;
}

async function readRef(saver: BaseCheckpointSaver, storeUri: string, ref: StateRef): Promise<StateAt> {
  const named = (["checkpoint", "step", "beforeStep"] as const).filter((k) => ref[k] !== undefined);
  if (named.length > 1) {
    throw new CairnError(
      "INVALID_ARGUMENT",
      `A state of thread "${ref.thread}" was named by ${named.map((k) => `${k} "${ref[k]}"`).join(" and ")}: name it by one of them.`,
      { thread: ref.thread },
    );
  }
  if (ref.beforeStep === undefined) return stateAt(saver, storeUri, ref.thread, { step: ref.step, checkpoint: ref.checkpoint });
  // The thread first, so an unknown thread is THREAD_NOT_FOUND rather than an unknown step.
  await latestTuple(saver, ref.thread, storeUri);
  const step = ref.beforeStep;
  const branch = await branchCheckpoints(saver, ref.thread, await readHistory(saver, ref.thread));
  const { first } = lastRunOf(branch, ref.thread, step);
  // The checkpoint before the run is its parent, which is on the branch unless it was pruned.
  const parent = first > 0 ? branch[first - 1]!.entry.id : undefined;
  if (parent === undefined) {
    throw new CairnError(
      "HISTORY_PRUNED",
      `The checkpoint before step "${step}" is no longer in thread "${ref.thread}" (pruned). Compare checkpoints that remain instead; list them with: cairn history ${ref.thread} --store ${storeUri}`,
      { thread: ref.thread, step },
    );
  }
  return stateAt(saver, storeUri, ref.thread, { checkpoint: parent });
}

// -------------------------------------------------------------------------------------------------
// Comparing values (pure)

function unionKeys(a: object, b: object): string[] {
  const keys = Object.keys(a);
  const seen = new Set(keys);
  for (const k of Object.keys(b)) if (!seen.has(k)) keys.push(k);
  return keys;
}

function diffValue(x: unknown, y: unknown, segments: PathSegment[], out: StateChange[]): void {
  if (x === undefined && y === undefined) return;
  if (x === undefined) return void out.push({ path: pathOf(segments), segments, kind: "added", after: y });
  if (y === undefined) return void out.push({ path: pathOf(segments), segments, kind: "removed", before: x });
  if (Array.isArray(x) && Array.isArray(y)) return diffArray(x, y, segments, out);
  if (isRecord(x) && isRecord(y)) {
    for (const k of unionKeys(x, y)) diffValue(x[k], y[k], [...segments, k], out);
    return;
  }
  if (!sameLeaf(x, y)) out.push({ path: pathOf(segments), segments, kind: "changed", before: x, after: y });
}

function diffArray(x: unknown[], y: unknown[], segments: PathSegment[], out: StateChange[]): void {
  const item = (i: number): PathSegment[] => [...segments, i];
  if (x.length === y.length) {
    for (let i = 0; i < x.length; i += 1) diffValue(x[i], y[i], item(i), out);
    return;
  }
  const kx = x.map(canonical);
  const ky = y.map(canonical);
  // The unchanged head and tail need no alignment; most changes in a pipeline's state are appends.
  let head = 0;
  while (head < x.length && head < y.length && kx[head] === ky[head]) head += 1;
  let tail = 0;
  while (tail < x.length - head && tail < y.length - head && kx[x.length - 1 - tail] === ky[y.length - 1 - tail]) tail += 1;
  const midX = kx.slice(head, x.length - tail);
  const midY = ky.slice(head, y.length - tail);
  // Beyond this many edits the alignment costs more than it explains; pair the items by position instead.
  const aligned = midX.length && midY.length ? diffArrays(midX, midY, { maxEditLength: 400 }) : undefined;
  const runs = aligned ?? [
    ...(midX.length ? [{ removed: true, added: false, count: midX.length }] : []),
    ...(midY.length ? [{ removed: false, added: true, count: midY.length }] : []),
  ];
  let i = head;
  let j = head;
  for (let r = 0; r < runs.length; r += 1) {
    const run = runs[r]!;
    if (!run.added && !run.removed) {
      i += run.count;
      j += run.count;
      continue;
    }
    // A removed run next to an added one is items replaced: pair them and compare inside.
    const next = runs[r + 1];
    const pairsWithNext = next !== undefined && (run.removed ? next.added : next.removed);
    const removed = run.removed ? run.count : pairsWithNext ? next.count : 0;
    const added = run.added ? run.count : pairsWithNext ? next.count : 0;
    if (pairsWithNext) r += 1;
    const paired = Math.min(removed, added);
    for (let p = 0; p < paired; p += 1) diffValue(x[i + p], y[j + p], item(j + p), out);
    for (let p = paired; p < removed; p += 1) out.push({ path: pathOf(item(i + p)), segments: item(i + p), kind: "removed", before: x[i + p] });
    for (let p = paired; p < added; p += 1) out.push({ path: pathOf(item(j + p)), segments: item(j + p), kind: "added", after: y[j + p] });
    i += removed;
    j += added;
  }
}

/** A plain object whose keys are compared one by one (an artifact reference is a leaf). */
function isRecord(v: unknown): v is Record<string, unknown> {
  if (typeof v !== "object" || v === null || isArtifactRef(v)) return false;
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

function sameLeaf(x: unknown, y: unknown): boolean {
  if (x === y) return true;
  if (typeof x === "number" && typeof y === "number") return Number.isNaN(x) && Number.isNaN(y);
  if (typeof x !== "object" || typeof y !== "object" || x === null || y === null) return false;
  return canonical(x) === canonical(y);
}

/** A text equal for equal values whatever their key order: for equality and for aligning array items. */
function canonical(value: unknown): string {
  if (value === undefined) return "undefined";
  if (value === null || typeof value !== "object") {
    if (typeof value === "bigint") return `${value}n`;
    if (typeof value === "number" && !Number.isFinite(value)) return String(value);
    return JSON.stringify(value) ?? String(value);
  }
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  if (ArrayBuffer.isView(value)) return `<${value.constructor.name} ${Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString("base64")}>`;
  if (value instanceof Date) return `<Date ${value.toISOString()}>`;
  if (value instanceof Map) return `<Map ${canonical([...value.entries()])}>`;
  if (value instanceof Set) return `<Set ${canonical([...value.values()])}>`;
  const entries = Object.entries(value as Record<string, unknown>)
    .filter(([, v]) => v !== undefined)
    .sort(([p], [q]) => (p < q ? -1 : p > q ? 1 : 0));
  return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonical(v)}`).join(",")}}`;
}

/** `scenes[2].prompt`; keys that are not identifiers as `meta["a b"]`. */
function pathOf(segments: PathSegment[]): string {
  let out = "";
  for (const s of segments) {
    if (typeof s === "number") out += `[${s}]`;
    else if (/^[A-Za-z_$][A-Za-z0-9_$]*$/.test(s)) out += out === "" ? s : `.${s}`;
    else out += `[${JSON.stringify(s)}]`;
  }
  return out;
}
