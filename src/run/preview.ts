import type { CheckpointTuple } from "@langchain/langgraph-checkpoint";
import { USAGE_CHANNEL } from "../channels.ts";
import { CairnError, isCairnError } from "../errors.ts";
import { branchOf, checkCheckpointId, checkpointNotFound, latestTuple, readHistory } from "../inspect/history.ts";
import { addUsage, NO_USAGE, type Usage } from "../workflow/usage.ts";
import { isWorkflow, unknownStep } from "../workflow/builder.ts";
import { dueSteps, finishedOn } from "./fingerprint.ts";
import { checkFingerprint, migrationFor } from "./guard.ts";
import { describeTarget, prepareRun, type RunTarget } from "./prepare.ts";
import { brokenRouting, checkpointBefore, withStore, type ResumeOptions, type StepName } from "./run.ts";

/** What a resume would do with one step. */
export interface ResumePlanStep {
  step: string;
  /**
   * `reuse`: finished, kept, not run again. `run`: due now, runs first. `later`: runs if the workflow
   * reaches it (after the steps due now; a conditional step may still be skipped).
   */
  action: "reuse" | "run" | "later";
  /** Why a step runs (or, for `stale`, why a reused step is a problem). */
  reason?: "failed" | "not finished" | "never ran" | "restarted" | "stale" | "routing failed";
  /** For a fan-out due now: its items, how many are saved (reused), failed, and will run. */
  items?: { total: number; saved: number; failed: number; toRun: number };
  /** What this step's kept runs spent (for `reuse`, money a resume does not pay again). */
  spent: Usage;
}

/** What `resume` would do, computed without running or writing anything. */
export interface ResumePlan {
  thread: string;
  store: string;
  from: { kind: "latest" } | { kind: "checkpoint"; id: string } | { kind: "step"; step: string };
  /** `refused`: the resume would stop with `refusal` before running anything. */
  outcome: "runs" | "already-completed" | "refused";
  refusal?: { code: string; message: string };
  /** Changes noticed that do not block the resume, a migration that would be applied. */
  notices: string[];
  steps: ResumePlanStep[];
  /** Spent on the work the resume keeps: what resuming saves. */
  reused: Usage;
}

/**
 * Preview a resume: which steps (and fan-out items) would be reused and which would run, why, and the
 * spend being reused; and whether the resume would be refused (fingerprint or schema mismatch). Reads
 * only: nothing is run or written. `cairn resume --dry-run` prints it.
 *
 * @example
 * ```ts
 * const plan = await previewResume(novel, { thread: "book-1" });
 * for (const s of plan.steps) console.log(s.step, s.action, s.reason ?? "", s.items ?? "");
 * ```
 */
export async function previewResume<T extends RunTarget>(target: T, options: ResumeOptions<StepName<T>>): Promise<ResumePlan> {
  const { thread, fromStep, checkpoint } = options;
  if (fromStep !== undefined && checkpoint !== undefined) {
    throw new CairnError("INVALID_ARGUMENT", `--from-step and --checkpoint cannot be used together. Pass one of them.`, { thread });
  }
  checkCheckpointId(thread, checkpoint);
  const { steps, name } = describeTarget(target);
  if (fromStep !== undefined && !steps.includes(fromStep)) throw unknownStep(name, fromStep, steps);
  const wf = isWorkflow(target) ? target : undefined;
  return withStore(options, async (store) => {
    const latest = await latestTuple(store.saver, thread, store.uri);
    const at = checkpoint === undefined ? latest : await store.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "", checkpoint_id: checkpoint } });
    if (!at) throw checkpointNotFound(thread, checkpoint!, store.uri);

    let refusal: CairnError | undefined;
    const notices: string[] = [];
    let recorded;
    try {
      const check = await checkFingerprint(target, store, thread, at, options);
      refusal = check.refusal;
      recorded = check.recorded;
      notices.push(...check.notices);
    } catch (error) {
      if (!isCairnError(error)) throw error;
      refusal = error;
    }
    if (wf) {
      try {
        const migration = migrationFor(wf, at, recorded);
        if (migration) notices.push(`the saved state would be migrated from version ${migration.from ?? "(none)"} to ${migration.to ?? "(none)"} (fields: ${Object.keys(migration.changes).join(", ")})`);
      } catch (error) {
        if (!isCairnError(error)) throw error;
        refusal ??= error;
      }
    }

    // Compiled only to ask LangGraph what is due: getState reads, it never writes.
    const prepared = prepareRun(target, store.saver, thread, new AbortController().signal, () => {});
    const stepOf = (node: string) => (wf ? wf.stepOfNode(node) : node);
    const history = await readHistory(store.saver, thread);
    const branch = branchOf(history, at.checkpoint.id);
    const spentBy = new Map<string, Usage>();
    for (const e of branch) for (const s of e.steps) spentBy.set(s, addUsage(spentBy.get(s), e.usage));

    let finished = wf ? finishedOn(at) : [...new Set(branch.flatMap((e) => e.steps))];
    let restarted: string[] = [];
    let dueAt: CheckpointTuple | undefined = at;
    let from: ResumePlan["from"] = checkpoint !== undefined ? { kind: "checkpoint", id: checkpoint } : { kind: "latest" };
    if (fromStep !== undefined) {
      from = { kind: "step", step: fromStep };
      const before = await checkpointBefore(store.saver, thread, fromStep);
      const at = finished.indexOf(fromStep);
      if (at !== -1) {
        // The restarted steps, and whatever was in progress on the branch left behind, run again.
        restarted = [...finished.slice(at), ...dueSteps(target, latest).filter((s) => !finished.includes(s))];
        finished = finished.slice(0, at);
      } else if (!dueSteps(target, latest).includes(fromStep)) {
        throw new CairnError("INVALID_ARGUMENT", `Step "${fromStep}" has not run yet in thread "${thread}", so there is nothing to restart. Preview a plain resume instead (without --from-step).`, { thread, step: fromStep });
      }
      if (!before.tuple && before.ran && !wf) {
        throw new CairnError("HISTORY_PRUNED", `The checkpoint before step "${fromStep}" is no longer in thread "${thread}" (pruned), and a plain LangGraph graph records no way to rebuild it.`, { thread, step: fromStep });
      }
      dueAt = at !== -1 ? before.tuple : latest;
    }

    // What is due where the resume starts, with the state of each due task.
    const tasks = new Map<string, { total: number; saved: number; failed: number; spent: Usage }>();
    const nodeOfTask = new Map<string, string>();
    let dueNames: string[] = [];
    if (dueAt) {
      const snapshot = await prepared.graph.getState(dueAt.config);
      const usageByTask = new Map<string, Usage>();
      for (const [task, channel, value] of dueAt.pendingWrites ?? []) if (channel === USAGE_CHANNEL) usageByTask.set(task, addUsage(usageByTask.get(task), value as Usage));
      for (const task of snapshot.tasks) {
        nodeOfTask.set(task.id, task.name);
        // A fan-out's gather task is not one of its items.
        if (wf && task.name !== stepOf(task.name)) continue;
        const step = stepOf(task.name);
        const t = tasks.get(step) ?? { total: 0, saved: 0, failed: 0, spent: NO_USAGE };
        t.total += 1;
        // Output saved for a restarted step belongs to the branch left behind: it all runs again.
        if (restarted.includes(step)) {
          tasks.set(step, t);
          continue;
        }
        if (task.error) t.failed += 1;
        else if (task.result !== undefined) {
          t.saved += 1;
          t.spent = addUsage(t.spent, usageByTask.get(task.id));
        }
        tasks.set(step, t);
      }
      // Before the first step the graph's entry is due: the first step runs (unless its `when` skips it).
      dueNames = [...new Set(snapshot.next.map((n) => (n === "__start__" ? steps[0]! : stepOf(n))))];
      if (fromStep !== undefined && restarted.length && !dueNames.includes(fromStep)) dueNames = [fromStep];
      if (fromStep === undefined && checkpoint === undefined && snapshot.next.length === 0 && (at.pendingWrites ?? []).length === 0 && at.metadata?.source !== "input") {
        if (wf && notices.some((n) => n.includes("since this thread completed"))) {
          notices.push("a resume asks the changed workflow's routing again, as the last finished step, and runs any step now due after it");
        }
        return plan("already-completed", []);
      }
    } else if (fromStep !== undefined) dueNames = [fromStep];
    const brokenTask = fromStep === undefined && checkpoint === undefined ? brokenRouting(at) : undefined;
    const routing = brokenTask === undefined ? undefined : stepOf(nodeOfTask.get(brokenTask) ?? brokenTask);

    const planned: ResumePlanStep[] = [];
    for (const step of steps) {
      const t = tasks.get(step);
      if (dueNames.includes(step) || step === routing) {
        const entry: ResumePlanStep = { step, action: "run", spent: t?.spent ?? NO_USAGE };
        entry.reason = step === routing ? "routing failed" : restarted.includes(step) ? "restarted" : t && t.failed > 0 ? "failed" : finished.includes(step) || (t && t.saved > 0) ? "not finished" : "never ran";
        if (t && (wf?.isMapStep(step) ?? false)) entry.items = { total: t.total, saved: t.saved, failed: t.failed, toRun: t.total - t.saved };
        planned.push(entry);
      } else if (finished.includes(step)) {
        const stale = (refusal?.details.stale as string[] | undefined)?.includes(step);
        planned.push({ step, action: "reuse", spent: spentBy.get(step) ?? NO_USAGE, ...(stale ? { reason: "stale" as const } : {}) });
      } else {
        planned.push({ step, action: "later", reason: restarted.includes(step) ? "restarted" : "never ran", spent: NO_USAGE });
      }
    }
    return plan(refusal ? "refused" : "runs", planned);

    function plan(outcome: ResumePlan["outcome"], list: ResumePlanStep[]): ResumePlan {
      let reused = NO_USAGE;
      for (const s of list) if (s.action === "reuse" || (s.action === "run" && s.items)) reused = addUsage(reused, s.spent);
      const out: ResumePlan = { thread, store: store.uri, from, outcome: refusal ? "refused" : outcome, notices, steps: list, reused };
      if (refusal) out.refusal = { code: refusal.code, message: refusal.message };
      return out;
    }
  });
}
