import { hostname } from "node:os";
import type { RunnableConfig } from "@langchain/core/runnables";
import {
  BaseCheckpointSaver,
  type ChannelVersions,
  type Checkpoint,
  type CheckpointListOptions,
  type CheckpointMetadata,
  type CheckpointTuple,
  type PendingWrite,
} from "@langchain/langgraph-checkpoint";
import { USAGE_CHANNEL } from "../channels.ts";
import { CairnError } from "../errors.ts";
import { findUnstorable } from "../store/values.ts";
import type { RunRuntime } from "../workflow/instrument.ts";
import { compactFingerprint, type FingerprintRecord } from "./fingerprint.ts";
import { addUsage, NO_USAGE, subtractUsage, type Usage } from "../workflow/usage.ts";

/** What cairn adds to every checkpoint's metadata, on every store. */
export interface CairnMetadata {
  /** The step whose completion this checkpoint records ("input", "restart:<step>", "fork" for the others). */
  step: string;
  /** Every step that ran to produce this checkpoint (several when parallel branches ran in one superstep). */
  steps: string[];
  /** Wall time of the step's tasks, first start to last end. */
  durationMs: number;
  /** How many tasks ran in the step (a fan-out runs one per item). */
  tasks: number;
  /** How many of them failed. */
  failed: number;
  workflow: string;
  pid: number;
  host: string;
  /** Spent by the tasks this checkpoint records (model calls, tokens, money). */
  usage: Usage;
  /** Spent by the thread up to and including this checkpoint. */
  total: Usage;
  /** What the thread's work depends on (structure, input), to check on resume; see `FingerprintRecord`. */
  fingerprint?: FingerprintRecord;
}

/**
 * Wraps the run's saver so that each root checkpoint carries `metadata.cairn`: which step produced it,
 * how long it took, which process wrote it. Reads pass straight through.
 */
export class RecordingSaver extends BaseCheckpointSaver {
  /** A label for the next checkpoint that no task produced (a restart or a fork). */
  nextLabel: string | undefined;
  /**
   * The fingerprint of the code and input this run works under. The first checkpoint this saver writes
   * carries it in full (the readable detail a mismatch is explained with); later ones only its hashes.
   */
  fingerprint: FingerprintRecord | undefined;
  /** The checkpoint that carries this run's full fingerprint (the first one it wrote). */
  private fingerprintAt: string | undefined;
  /** The thread's spend at the last checkpoint this saver wrote, to tell each step's share. */
  private last: { id: string; total: Usage } | undefined;
  /** Task writes held back by a fan-out's `saveEvery`, written together. */
  private batch: { config: RunnableConfig; writes: PendingWrite[]; taskId: string; taskPath?: string }[] = [];
  private batchTimer: NodeJS.Timeout | undefined;
  private flushing: Promise<void> = Promise.resolve();
  /** Task writes on their way to the store. */
  private readonly inflight = new Set<Promise<unknown>>();
  /**
   * Called after each root checkpoint is saved, once every task write sent before it has settled
   * (retention prunes the thread here: the writes of a checkpoint it removes must not land after it).
   */
  afterCheckpoint: ((checkpoint: string) => Promise<void>) | undefined;

  constructor(
    readonly inner: BaseCheckpointSaver,
    private readonly runtime: RunRuntime,
    private readonly workflow: string,
    private readonly options: { checkValues?: boolean } = {},
  ) {
    super(inner.serde);
  }

  getTuple(config: RunnableConfig): Promise<CheckpointTuple | undefined> {
    return this.inner.getTuple(config);
  }

  list(config: RunnableConfig, options?: CheckpointListOptions): AsyncGenerator<CheckpointTuple> {
    return this.inner.list(config, options);
  }

  async putWrites(config: RunnableConfig, writes: PendingWrite[], taskId: string, taskPath?: string): Promise<void> {
    if (this.options.checkValues) checkWrites(writes);
    const every = this.runtime.saveEveryOf(taskId);
    if (every > 1 && !writes.some(([channel]) => channel === "__error__")) {
      // Held back: written with the next batch, at the step boundary, or before a failure or stop
      // surfaces, whichever comes first. A hard crash loses at most the batch (see MapOptions.saveEvery).
      this.batch.push({ config, writes, taskId, taskPath });
      this.runtime.settled(taskId);
      if (this.batch.length >= every) await this.flush();
      else this.batchTimer ??= setTimeout(() => void this.flush().catch(() => {}), BATCH_MAX_DELAY_MS).unref();
      return;
    }
    try {
      await this.track(this.inner.putWrites(config, writes, taskId, taskPath));
    } finally {
      // Saved or failed to save, the task is done: a sibling holding back its error must not wait forever.
      this.runtime.settled(taskId);
    }
  }

  private track<T>(write: Promise<T>): Promise<T> {
    this.inflight.add(write);
    const settled = () => this.inflight.delete(write);
    write.then(settled, settled);
    return write;
  }

  /** Write every held-back task write now (concurrently, so a file store commits them in one sync). */
  flush(): Promise<void> {
    clearTimeout(this.batchTimer);
    this.batchTimer = undefined;
    const pending = this.batch.splice(0);
    const previous = this.flushing;
    this.flushing = (async () => {
      await previous;
      await Promise.all(pending.map((w) => this.track(this.inner.putWrites(w.config, w.writes, w.taskId, w.taskPath))));
    })();
    return this.flushing;
  }

  deleteThread(threadId: string): Promise<void> {
    return this.inner.deleteThread(threadId);
  }

  getNextVersion(current: number | undefined): number {
    return this.inner.getNextVersion(current);
  }

  getDeltaChannelHistory(options: Parameters<BaseCheckpointSaver["getDeltaChannelHistory"]>[0]) {
    return this.inner.getDeltaChannelHistory(options);
  }

  async put(config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata, newVersions: ChannelVersions): Promise<RunnableConfig> {
    if (this.options.checkValues) checkChannels(checkpoint, newVersions);
    if ((config.configurable?.checkpoint_ns ?? "") !== "") return this.inner.put(config, checkpoint, metadata, newVersions);
    await this.flush();
    const tasks = this.runtime.drainFinished();
    const steps = [...new Set(tasks.map((t) => t.step))];
    let step: string;
    if (metadata.source === "input") step = "input";
    else if (this.nextLabel !== undefined && tasks.length === 0) step = this.nextLabel;
    else step = steps.join("+") || (metadata.step === 0 ? "start" : metadata.source);
    if (tasks.length === 0) this.nextLabel = undefined;
    const durationMs = tasks.length ? Math.max(...tasks.map((t) => t.endedAt)) - Math.min(...tasks.map((t) => t.startedAt)) : 0;
    const total = await this.totalAt(config, checkpoint, tasks.reduce((sum, t) => addUsage(sum, t.usage), NO_USAGE));
    // A checkpoint cairn or the user made (a restart, a fork, an update) spent nothing, whatever its
    // parent's total. One folding in task writes saved by an earlier process did: count it.
    const made = metadata.source === "fork" || metadata.source === "update" || metadata.source === "input";
    const usage = made ? NO_USAGE : subtractUsage(total, await this.previousTotal(config));
    const cairn: CairnMetadata = {
      step,
      steps,
      durationMs,
      tasks: tasks.length,
      failed: tasks.filter((t) => !t.ok).length,
      workflow: this.workflow,
      pid: process.pid,
      host: hostname(),
      usage,
      total,
    };
    if (this.fingerprint) {
      cairn.fingerprint = this.fingerprintAt ? compactFingerprint(this.fingerprint, this.fingerprintAt) : this.fingerprint;
      this.fingerprintAt ??= checkpoint.id;
    }
    const saved = await this.inner.put(config, checkpoint, { ...metadata, cairn } as CheckpointMetadata, newVersions);
    this.last = { id: checkpoint.id, total };
    if (this.afterCheckpoint) {
      await Promise.allSettled([...this.inflight]);
      await this.afterCheckpoint(checkpoint.id);
    }
    this.runtime.emit({
      type: "checkpoint",
      thread: this.runtime.thread,
      checkpoint: checkpoint.id,
      step,
      durationMs,
      tasks: tasks.length,
      internal: tasks.length > 0 && tasks.every((t) => t.node !== t.step),
      usage,
      total,
    });
    this.runtime.checkpointed();
    return saved;
  }

  /**
   * The thread's spend at a new checkpoint. A cairn workflow keeps it in the state (each saved task adds
   * its own share, so items saved before a crash still count); a plain graph adds this step's tasks to
   * the parent checkpoint's total.
   */
  private async totalAt(config: RunnableConfig, checkpoint: Checkpoint, stepUsage: Usage): Promise<Usage> {
    const inState = checkpoint.channel_values[USAGE_CHANNEL] as Usage | undefined;
    if (inState && typeof inState === "object") return addUsage(NO_USAGE, inState);
    if (Object.keys(checkpoint.channel_versions).includes(USAGE_CHANNEL)) return NO_USAGE;
    return addUsage(await this.previousTotal(config), stepUsage);
  }

  /** The spend recorded at the parent checkpoint (the one `config` points at). */
  private async previousTotal(config: RunnableConfig): Promise<Usage> {
    const parent = config.configurable?.checkpoint_id as string | undefined;
    if (!parent) return NO_USAGE;
    if (this.last?.id === parent) return this.last.total;
    const at = { configurable: { thread_id: config.configurable?.thread_id, checkpoint_ns: "", checkpoint_id: parent } };
    // Only the metadata is needed: a store that can read it without the state (the file store) does.
    const lean = (this.inner as { listMetadata?: (c: RunnableConfig) => AsyncIterable<CheckpointTuple> }).listMetadata;
    if (typeof lean === "function") {
      for await (const tuple of lean.call(this.inner, at)) return totalOf(tuple);
      return totalOf(undefined);
    }
    return totalOf(await this.inner.getTuple(at));
  }
}

/**
 * Refuse a checkpoint holding a value the store would not give back as it is (see `findUnstorable`).
 * Only the channels this checkpoint changed are walked: the others were checked when they were written.
 */
function checkChannels(checkpoint: Checkpoint, newVersions: ChannelVersions): void {
  for (const channel of Object.keys(newVersions)) {
    const unstorable = findUnstorable(checkpoint.channel_values[channel], rootOf(channel));
    if (!unstorable) continue;
    throw new CairnError(
      "INVALID_STATE",
      `The state cannot be saved exactly: ${unstorable.path} (channel "${channel}") is ${unstorable.kind}. Instead, ${unstorable.instead}. Nothing was saved for this checkpoint.`,
      { channel, path: unstorable.path, kind: unstorable.kind },
    );
  }
}

/** The same check for task writes (a graph's input arrives as one, before its first checkpoint). */
function checkWrites(writes: PendingWrite[]): void {
  for (const [channel, value] of writes) {
    const unstorable = findUnstorable(value, rootOf(channel));
    if (!unstorable) continue;
    throw new CairnError(
      "INVALID_STATE",
      `The state cannot be saved exactly: ${unstorable.path} (channel "${channel}") is ${unstorable.kind}. Instead, ${unstorable.instead}. Nothing was saved for this write.`,
      { channel, path: unstorable.path, kind: unstorable.kind },
    );
  }
}

/** A graph's input travels in LangGraph's `__start__` channel: name it as the input. */
function rootOf(channel: string): string {
  return channel === "__start__" ? "input" : channel;
}

/** How long a held-back fan-out write may wait for its batch to fill. */
export const BATCH_MAX_DELAY_MS = 2000;

/** The thread's spend recorded with a checkpoint (zero for checkpoints written before cairn counted it). */
export function totalOf(tuple: CheckpointTuple | undefined): Usage {
  const cairn = (tuple?.metadata as { cairn?: Partial<CairnMetadata> } | undefined)?.cairn;
  return addUsage(NO_USAGE, cairn?.total);
}
