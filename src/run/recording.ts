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
import type { RunRuntime } from "../workflow/instrument.ts";

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
}

/**
 * Wraps the run's saver so that each root checkpoint carries `metadata.cairn`: which step produced it,
 * how long it took, which process wrote it. Reads pass straight through.
 */
export class RecordingSaver extends BaseCheckpointSaver {
  /** A label for the next checkpoint that no task produced (a restart or a fork). */
  nextLabel: string | undefined;

  constructor(
    readonly inner: BaseCheckpointSaver,
    private readonly runtime: RunRuntime,
    private readonly workflow: string,
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
    try {
      await this.inner.putWrites(config, writes, taskId, taskPath);
    } finally {
      // Saved or failed to save, the task is done: a sibling holding back its error must not wait forever.
      this.runtime.settled(taskId);
    }
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
    if ((config.configurable?.checkpoint_ns ?? "") !== "") return this.inner.put(config, checkpoint, metadata, newVersions);
    const tasks = this.runtime.drainFinished();
    const steps = [...new Set(tasks.map((t) => t.step))];
    let step: string;
    if (metadata.source === "input") step = "input";
    else if (this.nextLabel !== undefined && tasks.length === 0) step = this.nextLabel;
    else step = steps.join("+") || (metadata.step === 0 ? "start" : metadata.source);
    if (tasks.length === 0) this.nextLabel = undefined;
    const durationMs = tasks.length ? Math.max(...tasks.map((t) => t.endedAt)) - Math.min(...tasks.map((t) => t.startedAt)) : 0;
    const cairn: CairnMetadata = {
      step,
      steps,
      durationMs,
      tasks: tasks.length,
      failed: tasks.filter((t) => !t.ok).length,
      workflow: this.workflow,
      pid: process.pid,
      host: hostname(),
    };
    const saved = await this.inner.put(config, checkpoint, { ...metadata, cairn } as CheckpointMetadata, newVersions);
    this.runtime.emit({
      type: "checkpoint",
      thread: this.runtime.thread,
      checkpoint: checkpoint.id,
      step,
      durationMs,
      tasks: tasks.length,
      internal: tasks.length > 0 && tasks.every((t) => t.node !== t.step),
    });
    return saved;
  }
}
