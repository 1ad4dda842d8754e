import type { BaseCheckpointSaver } from "@langchain/langgraph-checkpoint";
import { CairnError } from "../errors.ts";
import { visibleState } from "../store/steps.ts";
import type { Usage } from "../workflow/usage.ts";
import { branchCheckpoints, lastRunOf } from "./branch.ts";
import { checkCheckpointId, checkpointNotFound, latestTuple, readHistory, spentAt, summarizeThread, type HistoryEntry, type ThreadSummary } from "./history.ts";

/** The state of a thread at one point: the latest checkpoint, after a named step, or a given checkpoint. */
export interface StateAt {
  thread: string;
  checkpoint: string;
  step: string;
  ts: string;
  values: Record<string, unknown>;
  /** What the thread had spent at this checkpoint. */
  spent: Usage;
}

/**
 * Read a thread's state. With `step`, the state right after that step last finished on the thread's
 * current branch; with `checkpoint`, the state at that checkpoint; otherwise the latest state.
 */
export async function stateAt(
  saver: BaseCheckpointSaver,
  storeUri: string,
  thread: string,
  at: { step?: string; checkpoint?: string } = {},
): Promise<StateAt> {
  if (at.step !== undefined && at.checkpoint !== undefined) {
    throw new CairnError(
      "INVALID_ARGUMENT",
      `--step "${at.step}" and --checkpoint "${at.checkpoint}" cannot be used together: pass one of them.`,
      { thread },
    );
  }
  checkCheckpointId(thread, at.checkpoint);
  const latest = await latestTuple(saver, thread, storeUri);
  let id = latest.checkpoint.id;
  let entry: HistoryEntry | undefined;
  if (at.step !== undefined || at.checkpoint !== undefined) {
    const history = await readHistory(saver, thread);
    if (at.checkpoint !== undefined) {
      entry = history.find((e) => e.id === at.checkpoint);
      if (!entry) throw checkpointNotFound(thread, at.checkpoint, storeUri);
    } else {
      const branch = await branchCheckpoints(saver, thread, history);
      entry = branch[lastRunOf(branch, thread, at.step!).last]!.entry;
    }
    id = entry.id;
  }
  const tuple =
    id === latest.checkpoint.id ? latest : await saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "", checkpoint_id: id } });
  if (!tuple) throw new CairnError("CHECKPOINT_NOT_FOUND", `Checkpoint "${id}" of thread "${thread}" could not be read.`, { thread, checkpoint: id });
  const step = entry?.step ?? ((tuple.metadata as { cairn?: { step?: string } } | undefined)?.cairn?.step ?? tuple.metadata?.source ?? "?");
  return { thread, checkpoint: id, step, ts: tuple.checkpoint.ts, values: visibleState(tuple.checkpoint.channel_values as Record<string, unknown>), spent: spentAt(tuple) };
}

/**
 * A summary of every thread in a store, newest first. With `bytes` (an opened store's `threadBytes`),
 * each summary says how much space its thread takes.
 */
export async function listThreads(
  saver: BaseCheckpointSaver,
  threadIds: string[],
  options: { bytes?: (thread: string) => Promise<number> } = {},
): Promise<ThreadSummary[]> {
  const out: ThreadSummary[] = [];
  for (const id of threadIds) {
    const s = await summarizeThread(saver, id);
    if (s && options.bytes) s.bytes = await options.bytes(id);
    if (s) out.push(s);
  }
  return out.sort((a, b) => (a.updated < b.updated ? 1 : a.updated > b.updated ? -1 : 0));
}
