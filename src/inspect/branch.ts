import type { BaseCheckpointSaver } from "@langchain/langgraph-checkpoint";
import { CairnError } from "../errors.ts";
import { currentBranch, type HistoryEntry } from "./history.ts";

/** A checkpoint of a thread's current branch, and the steps whose results it is the state right after. */
export interface BranchCheckpoint {
  entry: HistoryEntry;
  /** The steps that ran to produce it; for a fork, those of the checkpoint it is a copy of. */
  steps: string[];
}

/**
 * The thread's current branch, oldest first, with the steps each checkpoint stands for.
 *
 * A restart (`--from-step`) or a resume from a checkpoint forks: LangGraph writes a copy of a checkpoint
 * and gives the copy that checkpoint's parent. The copied checkpoint is then on the old branch only, and
 * the fork, which ran nothing, stands in its place on the new one: it takes the copied checkpoint's steps
 * (found among the earlier children of the same parent by equal channel versions), so the step that
 * made the copied state is still found on the branch.
 */
export async function branchCheckpoints(saver: BaseCheckpointSaver, thread: string, history: HistoryEntry[]): Promise<BranchCheckpoint[]> {
  const order = new Map(history.map((e, i) => [e.id, i]));
  const resolved = new Map<string, string[]>();
  const versions = async (id: string) =>
    JSON.stringify((await saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "", checkpoint_id: id } }))?.checkpoint.channel_versions ?? null);
  const stepsOf = async (e: HistoryEntry): Promise<string[]> => {
    if (e.source !== "fork") return e.steps;
    const known = resolved.get(e.id);
    if (known) return known;
    resolved.set(e.id, e.steps);
    const at = order.get(e.id)!;
    // Newest first: a fork of a fork copies the latest copy.
    const siblings = history.filter((c, i) => i < at && c.parent === e.parent).reverse();
    if (siblings.length > 0) {
      const mine = await versions(e.id);
      for (const c of siblings) {
        if ((await versions(c.id)) !== mine) continue;
        resolved.set(e.id, await stepsOf(c));
        break;
      }
    }
    return resolved.get(e.id)!;
  };
  const out: BranchCheckpoint[] = [];
  for (const entry of currentBranch(history)) out.push({ entry, steps: await stepsOf(entry) });
  return out;
}

/**
 * The last run of `step` on a branch: the indexes of its first and last checkpoints. A run is the step's
 * consecutive checkpoints (a fan-out writes two: its items, then their gathering; a loop over one step
 * writes one per pass).
 *
 * @throws CairnError `UNKNOWN_STEP` naming the steps that do have checkpoints on the branch.
 */
export function lastRunOf(branch: BranchCheckpoint[], thread: string, step: string): { first: number; last: number } {
  let last = -1;
  branch.forEach((b, i) => {
    if (b.steps.includes(step)) last = i;
  });
  if (last === -1) {
    const ran = [...new Set(branch.flatMap((b) => b.steps))];
    throw new CairnError("UNKNOWN_STEP", `Step "${step}" has no checkpoint in thread "${thread}". Steps with checkpoints: ${ran.join(", ") || "none"}.`, {
      thread,
      step,
      valid: ran,
    });
  }
  let first = last;
  while (first > 0 && branch[first - 1]!.steps.includes(step)) first -= 1;
  return { first, last };
}
