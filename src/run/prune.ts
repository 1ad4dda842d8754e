import { hostname } from "node:os";
import type { CheckpointTuple } from "@langchain/langgraph-checkpoint";
import { CairnError, isCairnError } from "../errors.ts";
import { latestTuple, readHistory, statusOf, type HistoryEntry, type ThreadStatus } from "../inspect/history.ts";
import { FileArtifactStore, isArtifactRef } from "../store/artifacts.ts";
import { withStore, type OpenedStore } from "../store/open.ts";

/**
 * Retention and cleanup: removing checkpoints (`prune`), whole threads (`removeThread`) and artifacts
 * nothing refers to any more (`gcArtifacts`). Which checkpoints go is decided by pure functions of a
 * thread's history; the store does the deleting (see `OpenedStore.deleteCheckpoints`).
 *
 * A thread's newest checkpoint is never removed by pruning: it is what a resume continues from, and
 * with its pending writes it holds every finished task of an unfinished step. cairn workflows rebuild
 * the state before any finished step from it alone, so `--from-step` keeps working after a prune; a
 * plain LangGraph graph needs the checkpoint before that step (`HISTORY_PRUNED` once it is gone).
 */

/** Where to find the store: a URI or an opened store (as for `run`), and the folder relative paths resolve against. */
export interface StoreChoice {
  store?: string | OpenedStore;
  cwd?: string;
}

/** How long an artifact is spared after it was put, whatever refers to it: 1 hour. */
export const DEFAULT_ARTIFACT_GRACE_MS = 60 * 60 * 1000;

const THREAD_STATUSES: readonly ThreadStatus[] = ["completed", "failed", "interrupted", "running"];
const UNITS: Record<string, number> = { s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 604_800_000 };

/**
 * An age as milliseconds: `30d`, `12h`, `90m`, `45s`, `2w` (or a number of milliseconds as it is).
 * `label` names the option in the error (`--older-than`).
 *
 * @throws CairnError `INVALID_ARGUMENT` for anything else.
 */
export function parseAge(value: string | number, label = "age"): number {
  if (typeof value === "number") {
    if (Number.isFinite(value) && value >= 0) return value;
  } else {
    const m = /^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$/.exec(value);
    if (m) return Number(m[1]) * UNITS[m[2]!]!;
  }
  throw new CairnError(
    "INVALID_ARGUMENT",
    `${label} ${JSON.stringify(value)} is not an age. Write a number and a unit: s, m, h, d or w (seconds to weeks), e.g. ${label.startsWith("--") ? `${label} 30d` : "30d"}.`,
  );
}

// -------------------------------------------------------------------------------------------------
// Deciding (pure)

/**
 * The checkpoints of a history (oldest first, as `readHistory` returns it) that a prune removes: every
 * one outside the `keepLast` newest and, with `olderThan`, written before it (both rules must agree
 * when both are given). The newest checkpoint is always kept.
 */
export function checkpointsToPrune(history: readonly HistoryEntry[], rules: { keepLast?: number; before?: number }): string[] {
  const n = history.length;
  return history
    .filter((e, i) => {
      if (i === n - 1) return false;
      if (rules.keepLast !== undefined && i >= n - rules.keepLast) return false;
      if (rules.before !== undefined && !(Date.parse(e.ts) < rules.before)) return false;
      return true;
    })
    .map((e) => e.id);
}

// -------------------------------------------------------------------------------------------------
// prune

export interface PruneOptions extends StoreChoice {
  /** Keep the N newest checkpoints of each matched thread (N ≥ 1). */
  keepLast?: number;
  /** Remove checkpoints older than this: `30d`, `12h` … or milliseconds. */
  olderThan?: string | number;
  /**
   * With `olderThan`: also remove whole threads whose newest checkpoint is older than that. Without
   * it, a thread always keeps its newest checkpoint.
   */
  threads?: boolean;
  /** Only threads with this status (or one of these). */
  status?: ThreadStatus | readonly ThreadStatus[];
  /** Only this thread (`THREAD_NOT_FOUND` if the store has none such). */
  thread?: string;
  /** Say what would be removed; remove nothing. */
  dryRun?: boolean;
  /** Artifacts put less than this long ago are never removed. Default 1 hour. */
  grace?: string | number;
  /** The clock, for `olderThan` and the grace period. */
  now?: Date;
}

/** One thread in a prune report. */
export interface PrunedThread {
  thread: string;
  status: ThreadStatus;
  /** Checkpoints it had (root namespace). */
  checkpoints: number;
  /** Checkpoints removed (or, in a dry run, that would be). */
  removed: number;
  /** Whether the whole thread was removed (`threads: true`). */
  removedThread: boolean;
  /** Bytes freed: on disk for the file store, the stored bytes of its rows otherwise. */
  bytesFreed: number;
  /** Why nothing was done to it: another process is writing it, or its graph needs its history. */
  skipped?: string;
}

export interface PruneReport {
  store: string;
  dryRun: boolean;
  /** Threads the filters matched (status, thread). */
  matched: number;
  /** Threads something was removed from, or that were skipped, with the numbers. */
  threads: PrunedThread[];
  checkpointsRemoved: number;
  threadsRemoved: number;
  /** Freed by removing checkpoints and threads. */
  bytesFreed: number;
  artifacts: ArtifactGcReport;
}

/**
 * Remove old checkpoints across a store (or one thread): keep the `keepLast` newest of each thread,
 * and/or remove those older than `olderThan`; with `threads`, remove whole threads whose newest
 * checkpoint is older than `olderThan`. `status` and `thread` narrow which threads are looked at. A
 * thread keeps its newest checkpoint and its pending writes, so resuming it is unaffected. Then the
 * artifacts no checkpoint of any thread refers to any more are removed (see {@link gcArtifacts}).
 *
 * A thread another live process is writing is skipped (reported with the reason); with `thread`, that
 * is a `THREAD_LOCKED` error. So is a plain graph's thread whose LangGraph `DeltaChannel`s rebuild
 * values from older checkpoints.
 *
 * @throws CairnError `INVALID_ARGUMENT` without `keepLast` or `olderThan` (nothing would say what to
 *   remove), for `threads` without `olderThan`, or a bad value; `THREAD_NOT_FOUND` for an unknown `thread`.
 *
 * @example
 * ```ts
 * const report = await prune({ store: "file:.cairn", keepLast: 5, status: "completed" });
 * console.log(`${report.checkpointsRemoved} checkpoints removed, ${report.bytesFreed} bytes freed`);
 * ```
 */
export async function prune(options: PruneOptions): Promise<PruneReport> {
  const { keepLast, thread } = options;
  if (keepLast !== undefined && !(Number.isInteger(keepLast) && keepLast >= 1)) {
    throw new CairnError("INVALID_ARGUMENT", `keepLast ${String(keepLast)} is not a whole number of 1 or more (the newest checkpoint is always kept), e.g. --keep-last 5.`);
  }
  const age = options.olderThan === undefined ? undefined : parseAge(options.olderThan, "--older-than");
  if (keepLast === undefined && age === undefined) throw noRule();
  if (options.threads && age === undefined) {
    throw new CairnError("INVALID_ARGUMENT", "--threads removes whole threads whose newest checkpoint is older than --older-than; pass --older-than too, e.g. --older-than 30d --threads.");
  }
  const statuses = statusList(options.status);
  emptyGc(false, options); // a bad grace is refused before anything is removed
  const now = (options.now ?? new Date()).getTime();
  const before = age === undefined ? undefined : now - age;
  const dryRun = options.dryRun === true;

  return withStore(options, async (store) => {
    if (thread !== undefined) await latestTuple(store.saver, thread, store.uri);
    const ids = thread !== undefined ? [thread] : await store.listThreadIds();
    const report: PruneReport = {
      store: store.uri,
      dryRun,
      matched: 0,
      threads: [],
      checkpointsRemoved: 0,
      threadsRemoved: 0,
      bytesFreed: 0,
      artifacts: emptyGc(dryRun, options),
    };
    const gone: Exclusions = { threads: new Set(), checkpoints: new Map() };
    for (const id of ids) {
      const latest = await store.saver.getTuple({ configurable: { thread_id: id, checkpoint_ns: "" } });
      if (!latest) continue;
      const { status } = statusOf(latest);
      if (statuses && !statuses.includes(status)) continue;
      report.matched += 1;
      const history = await readHistory(store.saver, id);
      const entry: PrunedThread = { thread: id, status, checkpoints: history.length, removed: 0, removedThread: false, bytesFreed: 0 };
      if (usesDeltaChannels(latest)) {
        if (thread !== undefined) throw deltaRefused(id);
        report.threads.push({ ...entry, skipped: "its graph uses LangGraph DeltaChannels, which rebuild values from older checkpoints" });
        continue;
      }
      try {
        refuseIfRunning(store, id, latest);
        if (options.threads && before !== undefined && Date.parse(latest.checkpoint.ts) < before) {
          entry.bytesFreed = await store.threadBytes(id);
          if (!dryRun) await store.saver.deleteThread(id);
          entry.removed = history.length;
          entry.removedThread = true;
          gone.threads.add(id);
        } else {
          const doomed = checkpointsToPrune(history, { keepLast, before });
          if (doomed.length === 0) continue;
          const result = await store.deleteCheckpoints(id, doomed, { dryRun });
          if (result.deleted.length === 0) continue;
          entry.removed = result.deleted.length;
          entry.bytesFreed = result.bytesFreed;
          gone.checkpoints.set(id, new Set(result.deleted));
        }
      } catch (error) {
        if (thread === undefined && isCairnError(error, "THREAD_LOCKED")) {
          const holder = error.details.holder as { pid?: number; host?: string } | undefined;
          report.threads.push({ ...entry, skipped: holder?.pid !== undefined ? `being written by pid ${holder.pid} on ${holder.host ?? "this host"}` : "being written by another process" });
          continue;
        }
        throw error;
      }
      report.threads.push(entry);
      report.checkpointsRemoved += entry.removed;
      report.threadsRemoved += entry.removedThread ? 1 : 0;
      report.bytesFreed += entry.bytesFreed;
    }
    if (report.checkpointsRemoved > 0) {
      report.artifacts = await collectGarbage(store, { dryRun, grace: options.grace, now: options.now, exclude: dryRun ? gone : undefined });
    }
    return report;
  });
}

/** The error for a prune that says nothing about what to remove. */
function noRule(): CairnError {
  return new CairnError(
    "INVALID_ARGUMENT",
    "Say what to prune: --keep-last <n> (keep the n newest checkpoints of each thread) and/or --older-than <age> (remove checkpoints older than 30d, 12h, …; add --threads to remove whole threads that old). " +
      "Narrow it with --status completed|failed|interrupted and --thread <id>; --dry-run shows what would go.",
  );
}

function statusList(status: PruneOptions["status"]): ThreadStatus[] | undefined {
  if (status === undefined) return undefined;
  const list = (typeof status === "string" ? [status] : [...status]).flatMap((s) => s.split(",")).map((s) => s.trim()).filter(Boolean) as ThreadStatus[];
  for (const s of list) {
    if (!THREAD_STATUSES.includes(s)) {
      throw new CairnError("INVALID_ARGUMENT", `--status ${JSON.stringify(s)} is not a thread status. Use ${THREAD_STATUSES.join(", ")} (several separated by commas).`);
    }
  }
  return list;
}

/** LangGraph's DeltaChannel keeps only changes per checkpoint and rebuilds its value from the ancestors. */
function usesDeltaChannels(tuple: CheckpointTuple): boolean {
  const md = (tuple.metadata ?? {}) as Record<string, unknown>;
  return md.delta_writes_versioned === true || md.counters_since_delta_snapshot !== undefined;
}

function deltaRefused(thread: string): CairnError {
  return new CairnError(
    "INVALID_ARGUMENT",
    `Thread "${thread}" is not pruned: its graph uses LangGraph DeltaChannels, whose values are rebuilt from older checkpoints, so removing them would change its state. Remove the whole thread with: cairn rm ${thread}`,
    { thread },
  );
}

/**
 * SQLite and Postgres threads have no writer lock: a thread whose newest checkpoint was written by a
 * process still alive on this host (other than this one) is taken to be running and left alone. (The
 * file store's writer lock refuses by itself.)
 */
function refuseIfRunning(store: OpenedStore, thread: string, latest: CheckpointTuple): void {
  if (store.kind === "file") return;
  const meta = (latest.metadata as { cairn?: { pid?: number; host?: string } } | undefined)?.cairn;
  if (meta?.pid === process.pid && (meta.host === undefined || meta.host === hostname())) return;
  if (statusOf(latest).status !== "running") return;
  throw new CairnError(
    "THREAD_LOCKED",
    `Thread "${thread}" is being run by pid ${meta?.pid} on ${meta?.host ?? hostname()} (that process wrote its newest checkpoint and is still alive); wait for that run to finish or stop it, then try again.`,
    { thread, holder: { pid: meta?.pid, host: meta?.host } },
  );
}

// -------------------------------------------------------------------------------------------------
// removeThread

export interface RemoveThreadOptions extends StoreChoice {
  /** Say what would be removed; remove nothing. */
  dryRun?: boolean;
  /** Grace period of the artifact GC that follows (default 1 hour). */
  grace?: string | number;
  now?: Date;
}

export interface RemovedThread {
  store: string;
  thread: string;
  dryRun: boolean;
  /** Its checkpoints (root namespace). */
  checkpoints: number;
  /** Bytes freed by removing the thread (see `OpenedStore.threadBytes`). */
  bytesFreed: number;
  /** The artifact GC that followed. */
  artifacts: ArtifactGcReport;
}

/**
 * Delete a whole thread, then the artifacts no checkpoint of any thread refers to any more.
 *
 * @throws CairnError `THREAD_NOT_FOUND` for an unknown thread; `THREAD_LOCKED` when another live
 *   process is writing it (the file store's writer lock; on SQLite and Postgres, the process that wrote
 *   its newest checkpoint is still running).
 *
 * @example
 * ```ts
 * const { checkpoints, bytesFreed } = await removeThread("video-001", { store: "sqlite:cairn.db" });
 * ```
 */
export async function removeThread(thread: string, options: RemoveThreadOptions = {}): Promise<RemovedThread> {
  const dryRun = options.dryRun === true;
  emptyGc(dryRun, options); // a bad grace is refused before anything is removed
  return withStore(options, async (store) => {
    const latest = await latestTuple(store.saver, thread, store.uri);
    refuseIfRunning(store, thread, latest);
    const checkpoints = (await readHistory(store.saver, thread)).length;
    const bytesFreed = await store.threadBytes(thread);
    if (!dryRun) await store.saver.deleteThread(thread);
    const exclude = dryRun ? { threads: new Set([thread]), checkpoints: new Map() } : undefined;
    const artifacts = await collectGarbage(store, { dryRun, grace: options.grace, now: options.now, exclude });
    return { store: store.uri, thread, dryRun, checkpoints, bytesFreed, artifacts };
  });
}

// -------------------------------------------------------------------------------------------------
// Artifacts

export interface GcArtifactsOptions extends StoreChoice {
  /** Artifacts put less than this long ago are kept, referenced or not. Default 1 hour. */
  grace?: string | number;
  dryRun?: boolean;
  now?: Date;
}

export interface ArtifactGcReport {
  dryRun: boolean;
  /** The grace period applied, in milliseconds. */
  graceMs: number;
  /** Artifacts removed (or that would be), with the bytes each took. */
  removed: { sha256: string; bytes: number }[];
  bytesFreed: number;
  /** Artifacts kept because a checkpoint refers to them. */
  referenced: number;
  /** Artifacts kept, unreferenced, because they were put within the grace period. */
  recent: number;
}

/**
 * Remove the artifacts that no checkpoint of any thread in the store refers to, in its state or in its
 * pending writes (finished items of an unfinished fan-out). An artifact put less than `grace` ago
 * (default 1 hour) is kept anyway: a running step may have put it and not yet checkpointed the state
 * that refers to it. A step that puts bytes the store already has touches them, which restarts their
 * grace period; the deletion itself rechecks that time.
 *
 * @example
 * ```ts
 * const { removed, bytesFreed } = await gcArtifacts({ store: "file:.cairn", grace: "1d" });
 * ```
 */
export async function gcArtifacts(options: GcArtifactsOptions = {}): Promise<ArtifactGcReport> {
  return withStore(options, (store) => collectGarbage(store, options));
}

interface Exclusions {
  threads: Set<string>;
  checkpoints: Map<string, Set<string>>;
}

function emptyGc(dryRun: boolean, options: { grace?: string | number }): ArtifactGcReport {
  const graceMs = options.grace === undefined ? DEFAULT_ARTIFACT_GRACE_MS : parseAge(options.grace, "--grace");
  return { dryRun, graceMs, removed: [], bytesFreed: 0, referenced: 0, recent: 0 };
}

/** GC over an opened store; `exclude` leaves checkpoints out of the reference scan (a dry run's "after"). */
async function collectGarbage(
  store: OpenedStore,
  options: { grace?: string | number; dryRun?: boolean; now?: Date; exclude?: Exclusions },
): Promise<ArtifactGcReport> {
  const report = emptyGc(options.dryRun === true, options);
  const cutoff = new Date((options.now ?? new Date()).getTime() - report.graceMs);
  // Temporary files of artifact writes a crash cut short (file store): never read, older than the grace.
  if (!options.dryRun && store.artifacts instanceof FileArtifactStore) report.bytesFreed += await store.artifacts.removeTemporaryFiles(cutoff);
  const stored = await store.artifacts.list();
  if (stored.length === 0) return report;
  const referenced = await referencedArtifacts(store, { exclude: options.exclude });
  for (const a of stored) {
    if (referenced.has(a.sha256)) report.referenced += 1;
    else if (a.touchedAt > cutoff) report.recent += 1;
    else {
      const bytes = options.dryRun ? a.bytes : await store.artifacts.delete(a.sha256, { touchedBefore: cutoff });
      if (bytes > 0) report.removed.push({ sha256: a.sha256, bytes });
      else report.recent += 1;
      report.bytesFreed += bytes;
    }
  }
  return report;
}

/**
 * The hashes of every artifact some checkpoint refers to, in any thread and namespace, in its channel
 * values or its pending writes. A value stored once per unique channel version (the file store's and
 * cairn's Postgres versions) is walked once; LangGraph's plain integer versions repeat across branches,
 * so such values are walked at every checkpoint. With `only`, the scan stops once all of those are found.
 */
async function referencedArtifacts(store: OpenedStore, opts: { exclude?: Exclusions; only?: Set<string> } = {}): Promise<Set<string>> {
  const found = new Set<string>();
  const done = () => opts.only !== undefined && [...opts.only].every((s) => found.has(s));
  for (const thread of await store.listThreadIds()) {
    if (opts.exclude?.threads.has(thread)) continue;
    const skip = opts.exclude?.checkpoints.get(thread);
    const walked = new Set<string>();
    for await (const t of store.saver.list({ configurable: { thread_id: thread } })) {
      const ns = (t.config.configurable?.checkpoint_ns as string | undefined) ?? "";
      if (ns === "" && skip?.has(t.checkpoint.id)) continue;
      collectTupleRefs(t, found, walked);
      if (done()) return found;
    }
  }
  return found;
}

function collectTupleRefs(t: CheckpointTuple, into: Set<string>, walked?: Set<string>): void {
  const ns = (t.config.configurable?.checkpoint_ns as string | undefined) ?? "";
  for (const [channel, value] of Object.entries(t.checkpoint.channel_values ?? {})) {
    const version = t.checkpoint.channel_versions[channel];
    if (walked && typeof version === "string" && /^\d+\.\d+$/.test(version)) {
      const key = `${ns}\u0000${channel}\u0000${version}`;
      if (walked.has(key)) continue;
      walked.add(key);
    }
    collectRefs(value, into);
  }
  for (const [, , value] of t.pendingWrites ?? []) collectRefs(value, into);
}

/** Artifact hashes inside a value; bytes (typed arrays) are not walked. */
function collectRefs(value: unknown, into: Set<string>, seen = new WeakSet<object>()): void {
  if (typeof value !== "object" || value === null) return;
  if (ArrayBuffer.isView(value) || value instanceof ArrayBuffer || seen.has(value)) return;
  seen.add(value);
  if (isArtifactRef(value)) {
    into.add(value.sha256);
    return;
  }
  for (const v of Array.isArray(value) ? value : Object.values(value)) collectRefs(v, into, seen);
}

// -------------------------------------------------------------------------------------------------
// For runs: retention and cleanup on success

/**
 * A workflow's `retention: { keepLast }` as its run goes: after each checkpoint, once the thread holds
 * `keepLast + slack` checkpoints (slack = max(keepLast, 10)), prune it back to the `keepLast` newest.
 * The newest is the checkpoint the run continues from, so it is never among them.
 */
export class Retention {
  readonly slack: number;
  private count: number | undefined;

  constructor(
    private readonly store: OpenedStore,
    private readonly thread: string,
    readonly keepLast: number,
  ) {
    this.slack = Math.max(keepLast, 10);
  }

  /** Call after each root checkpoint is saved. Returns how many checkpoints were removed. */
  async afterCheckpoint(): Promise<number> {
    this.count = this.count === undefined ? (await readHistory(this.store.saver, this.thread)).length : this.count + 1;
    return this.count >= this.keepLast + this.slack ? this.pruneNow() : 0;
  }

  /** Prune to the `keepLast` newest now. */
  async pruneNow(): Promise<number> {
    const history = await readHistory(this.store.saver, this.thread);
    const doomed = checkpointsToPrune(history, { keepLast: this.keepLast });
    const { deleted } = doomed.length ? await this.store.deleteCheckpoints(this.thread, doomed) : { deleted: [] };
    this.count = history.length - deleted.length;
    return deleted.length;
  }
}

/** What `cleanupOnSuccess` removed. */
export interface CleanupReport {
  /** Checkpoints removed (all but the final one). */
  checkpoints: number;
  /** Artifacts removed: referred to only by the removed checkpoints. */
  artifacts: number;
  /** Bytes freed by both. */
  bytesFreed: number;
}

/**
 * Keep only a finished thread's final checkpoint (its state stays readable), then remove the artifacts
 * that only the removed checkpoints referred to: not the final state's, not any other thread's, and
 * not one put again after the final checkpoint was written (another run may be about to use it).
 */
export async function keepFinalCheckpoint(store: OpenedStore, thread: string): Promise<CleanupReport> {
  const tuples: CheckpointTuple[] = [];
  for await (const t of store.saver.list({ configurable: { thread_id: thread, checkpoint_ns: "" } })) tuples.push(t);
  const [final, ...older] = tuples;
  if (!final || older.length === 0) return { checkpoints: 0, artifacts: 0, bytesFreed: 0 };
  const candidates = new Set<string>();
  for (const t of older) collectTupleRefs(t, candidates);
  const kept = new Set<string>();
  collectTupleRefs(final, kept);
  for (const sha of kept) candidates.delete(sha);
  const { deleted, bytesFreed } = await store.deleteCheckpoints(
    thread,
    older.map((t) => t.checkpoint.id),
  );
  const report: CleanupReport = { checkpoints: deleted.length, artifacts: 0, bytesFreed };
  if (candidates.size === 0) return report;
  const elsewhere = await referencedArtifacts(store, { only: candidates });
  const touchedBefore = new Date(final.checkpoint.ts);
  for (const sha of candidates) {
    if (elsewhere.has(sha)) continue;
    const bytes = await store.artifacts.delete(sha, { touchedBefore });
    if (bytes > 0) {
      report.artifacts += 1;
      report.bytesFreed += bytes;
    }
  }
  return report;
}

