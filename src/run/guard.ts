import { existsSync } from "node:fs";
import { Overwrite, START } from "@langchain/langgraph";
import type { CheckpointTuple } from "@langchain/langgraph-checkpoint";
import { z } from "zod";
import { CairnError, isCairnError } from "../errors.ts";
import { branchOf, readHistory } from "../inspect/history.ts";
import type { OpenedStore } from "../store/open.ts";
import { visibleState } from "../store/steps.ts";
import { DONE_CHANNEL } from "../channels.ts";
import { isWorkflow, type Workflow } from "../workflow/builder.ts";
import { hashOf } from "../workflow/hash.ts";
import {
  compareFingerprints,
  currentFingerprint,
  dueSteps,
  finishedOn,
  recordedFingerprint,
  type CurrentFingerprint,
  type FingerprintRecord,
  type FingerprintReport,
} from "./fingerprint.ts";
import { readInputFile } from "./input.ts";
import { rawInput, type PreparedRun, type RunTarget } from "./prepare.ts";

/**
 * What a resume checks before it writes anything: that the workflow and input the thread's work was
 * saved under still hold (fingerprints), and that the saved state still parses with the current schema
 * (or can be migrated). Pure decisions over what the store holds; the writes are in `applyMigration`.
 */

export interface FingerprintCheck {
  /** The fingerprint the resumed run records from now on. */
  current: CurrentFingerprint;
  /** The fingerprint recorded with the checkpoint the resume continues from (absent on old threads). */
  recorded: FingerprintRecord | undefined;
  report: FingerprintReport | undefined;
  /** What changed but does not block this resume (or was forced), as readable lines. */
  notices: string[];
  /** The error a resume without `force` raises, when it would be refused. */
  refusal: CairnError | undefined;
}

export interface GuardOptions {
  fromStep?: string;
  checkpoint?: string;
  force?: boolean;
  input?: unknown;
  inputSource?: string;
}

/** The input hash of a thread whose input is not known (saved before cairn recorded fingerprints). */
const UNKNOWN_INPUT = "unknown";

/**
 * Compare the thread's recorded fingerprint (at `at`, the checkpoint the resume continues from) with the
 * current code and input, and decide: continue, continue with notices, or refuse (`refusal`).
 */
export async function checkFingerprint(target: RunTarget, store: OpenedStore, thread: string, at: CheckpointTuple, options: GuardOptions): Promise<FingerprintCheck> {
  const recorded = recordedFingerprint(at);
  const notices: string[] = [];
  let input: unknown;
  let checked = false;
  let source = recorded?.inputSource;
  if (options.input !== undefined) {
    input = rawInput(target, options.input);
    checked = true;
    source = options.inputSource ?? "given";
  } else if (source?.startsWith("file:")) {
    const path = source.slice("file:".length);
    if (existsSync(path)) {
      try {
        input = rawInput(target, await readInputFile(path));
        checked = true;
      } catch (error) {
        notices.push(`the input file ${path} this thread was started from cannot be read now (${error instanceof Error ? error.message : String(error)}), so the input was not checked`);
      }
    } else {
      notices.push(`the input file ${path} this thread was started from is gone, so the input was not checked`);
    }
  } else if (source === "default") {
    input = rawInput(target, undefined);
    checked = true;
  }
  const current = currentFingerprint(target, input, source);
  if (!recorded || recorded.input === UNKNOWN_INPUT || !checked) {
    // What the input was is not known (a thread saved before cairn kept fingerprints, or an input that
    // cannot be re-read): keep the thread's own record, or mark it unknown, never a hash of nothing.
    current.record.input = recorded?.input ?? UNKNOWN_INPUT;
    delete current.record.inputFields;
    checked = checked && recorded !== undefined && recorded.input !== UNKNOWN_INPUT;
  }
  if (!recorded) {
    // Nothing to compare with, but a step the thread is due to run must still exist: LangGraph would
    // otherwise find nothing due and end the thread silently.
    const missingDue = dueSteps(target, at).filter((s) => !current.steps.includes(s));
    if (missingDue.length > 0) {
      const finished = await finishedSteps(target, store, thread, at, true);
      const report: FingerprintReport = { structure: [], input: [], inputChecked: false, stale: [], affected: [], firstAffected: undefined, missingDue, refuse: true };
      const lines = missingDue.map((s) => `step "${s}" is not in the workflow any more`);
      return { current, recorded, report, notices, refusal: mismatchError(thread, report, lines, finished, undefined, { checkpoint: options.checkpoint, migrates: false }) };
    }
    notices.push("this thread was saved before cairn recorded fingerprints: changes to the workflow or input since then cannot be detected");
    return { current, recorded, report: undefined, notices, refusal: undefined };
  }
  const changed = recorded.structure !== current.record.structure || (checked && recorded.input !== current.record.input);
  const detail = changed ? await findDetail(store, thread, at, recorded) : recorded.shape ? recorded : undefined;
  const finished = await finishedSteps(target, store, thread, at, changed);
  const report = compareFingerprints(target, at, recorded, detail, current, { checked }, finished);
  const wf = isWorkflow(target) ? target : undefined;
  const lines = [...report.structure, ...report.input, ...report.stale.map((s) => `step "${s}" is stale: what it declares it depends on (its fingerprint) changed since it ran`)];
  if (lines.length === 0) return { current, recorded, report, notices, refusal: undefined };

  const fromStep = options.fromStep;
  let refuse = report.refuse;
  if (fromStep !== undefined && report.input.length === 0 && report.affected.length > 0) {
    // A restart at or before the first affected step reruns everything the change touches.
    const at = finished.indexOf(fromStep);
    refuse = at === -1 ? true : at > finished.indexOf(report.affected[0]!);
  } else if (fromStep !== undefined && report.input.length === 0) {
    refuse = false;
  }
  if (report.missingDue.length > 0 && fromStep === undefined) refuse = true;
  // A thread with nothing left to do runs nothing on a plain resume: there is nothing to refuse.
  const completed = fromStep === undefined && report.missingDue.length === 0 && dueSteps(target, at).length === 0 && (at.pendingWrites ?? []).length === 0 && at.metadata?.source !== "input";
  if (completed) refuse = false;
  const migrates = wf?.migrate !== undefined && report.structure.every((l) => l.startsWith("version "));
  const refusal = refuse ? mismatchError(thread, report, lines, finished, source, { checkpoint: options.checkpoint, migrates }) : undefined;
  if (refuse && options.force && report.missingDue.length === 0) {
    notices.push(`resuming with --force although the workflow or input changed: ${lines.join("; ")}`);
    return { current, recorded, report, notices, refusal: undefined };
  }
  if (completed) notices.push(`the workflow or input changed since this thread completed: ${lines.join("; ")}`);
  else if (!refuse) notices.push(`the workflow or input changed, but no finished step that this resume keeps is affected: ${lines.join("; ")}`);
  return { current, recorded, report, notices, refusal };
}

/** The fingerprint that carries the readable detail for `recorded` (its own, or the run's first checkpoint's). */
async function findDetail(store: OpenedStore, thread: string, at: CheckpointTuple, recorded: FingerprintRecord): Promise<FingerprintRecord | undefined> {
  if (recorded.shape) return recorded;
  if (recorded.detailAt) {
    const fp = recordedFingerprint(await store.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "", checkpoint_id: recorded.detailAt } }));
    if (fp?.shape) return fp;
  }
  for await (const t of store.saver.list({ configurable: { thread_id: thread, checkpoint_ns: "" } }, { before: at.config })) {
    const fp = recordedFingerprint(t);
    if (fp?.shape && fp.structure === recorded.structure && fp.input === recorded.input) return fp;
  }
  return undefined;
}

/**
 * Steps finished on the branch of `at`, in the order they first finished. A step due again (a loop)
 * counts: its earlier runs are kept, so a change to it affects them.
 */
async function finishedSteps(target: RunTarget, store: OpenedStore, thread: string, at: CheckpointTuple, needed: boolean): Promise<string[]> {
  if (isWorkflow(target)) return finishedOn(at);
  // A plain graph keeps no record in its state: read the branch (only when something changed).
  if (!needed) return [];
  const branch = branchOf(await readHistory(store.saver, thread), at.checkpoint.id);
  const steps: string[] = [];
  for (const e of branch) for (const s of e.steps) if (!steps.includes(s)) steps.push(s);
  return steps;
}

function mismatchError(
  thread: string,
  report: FingerprintReport,
  lines: string[],
  finished: string[],
  source: string | undefined,
  how: { checkpoint?: string; migrates: boolean },
): CairnError {
  const at = how.checkpoint === undefined ? "" : ` --checkpoint ${how.checkpoint}`;
  const newInput = report.input.length && source?.startsWith("file:") ? ` --input @${source.slice("file:".length)}` : "";
  const ways: string[] = [];
  if (report.missingDue.length > 0) {
    const restart = finished.filter((s) => !report.missingDue.includes(s)).pop();
    const at = report.missingDue.map((s) => `"${s}"`).join(", ");
    const message =
      `Thread "${thread}" is due to run ${at}, which the workflow no longer has, so it cannot continue where it stopped (--force cannot help: there is no such step to run).\n` +
      lines.map((l) => `  - ${l}`).join("\n") +
      `\nWays on:\n` +
      (restart ? `  cairn resume … --thread ${thread} --from-step ${restart}   rerun from a step the workflow still has\n` : "") +
      `  cairn run … --thread <new-id>   start a new thread`;
    return new CairnError("FINGERPRINT_MISMATCH", message, { thread, changes: lines, missingDue: report.missingDue, fromStep: restart });
  }
  if (report.firstAffected !== undefined && report.input.length === 0) {
    ways.push(`  cairn resume … --thread ${thread} --from-step ${report.firstAffected}   rerun from the first affected step (earlier finished steps are kept)`);
  }
  ways.push(
    how.migrates
      ? `  cairn resume … --thread ${thread}${at} --force   resume under the new version: the workflow's migrate() brings the saved state up to date`
      : `  cairn resume … --thread ${thread}${at} --force   resume anyway, keeping every finished step as it is`,
  );
  ways.push(`  cairn run …${newInput} --thread <new-id>   start a new thread${report.input.length ? " with the new input" : ""}`);
  const message =
    `Thread "${thread}" was saved under a different workflow or input than it would resume with now:\n` +
    lines.map((l) => `  - ${l}`).join("\n") +
    `\nFinished work this affects: ${report.affected.join(", ")}.\nWays on:\n${ways.join("\n")}`;
  return new CairnError("FINGERPRINT_MISMATCH", message, {
    thread,
    changes: lines,
    affected: report.affected,
    stale: report.stale,
    fromStep: report.input.length === 0 ? report.firstAffected : undefined,
  });
}

// -------------------------------------------------------------------------------------------------
// State schema

/** A saved state that no longer parses, and how to bring it up to date. */
export interface Migration {
  /** The fields to write: the migrated value of each changed field, `undefined` for removed ones. */
  changes: Record<string, unknown>;
  from: string | undefined;
  to: string | undefined;
  /** Saved fan-out items that a migration makes run again (their task ids change with the checkpoint). */
  itemsLost: number;
  /** Only fields the schema now defaults were filled in (no `migrate` involved). */
  defaultsOnly?: boolean;
}

/**
 * Check the state at `tuple` against the workflow's current schema. Undefined when it parses; a
 * migration when it does not and the workflow declares `migrate`; otherwise STATE_SCHEMA_MISMATCH naming
 * each field at fault.
 */
export function migrationFor(wf: Workflow<any, string>, tuple: CheckpointTuple, recorded: FingerprintRecord | undefined): Migration | undefined {
  const values = tuple.checkpoint.channel_values as Record<string, unknown>;
  // A thread that has not finished its first step holds only its input.
  const fromInput = !Object.keys(wf.schema.shape).some((k) => k in values) && typeof values["__start__"] === "object";
  const saved = fromInput ? { ...(values["__start__"] as Record<string, unknown>) } : visibleState(values);
  const parsed = wf.schema.safeParse(saved);
  const itemsLost = new Set((tuple.pendingWrites ?? []).filter(([, ch]) => ch !== "__error__").map(([task]) => task)).size;
  if (parsed.success) {
    // Filling defaults is not worth rerunning saved fan-out items: it waits for the next step boundary.
    if (itemsLost > 0) return undefined;
    // Fields the schema now gives a default for, absent from the saved state: write the defaults, or
    // the steps would read undefined where the type promises a value.
    const changes: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(parsed.data as Record<string, unknown>)) if (!(k in saved) && v !== undefined) changes[k] = v;
    if (Object.keys(changes).length === 0) return undefined;
    return { changes, from: recorded?.version, to: wf.version, itemsLost: 0, defaultsOnly: true };
  }
  // Saved fields the schema no longer declares are handed to migrate() too, so it can carry them over.
  const undeclared = Object.keys(saved).filter((k) => saved[k] !== undefined && !(k in wf.schema.shape));
  const from = recorded?.version;
  const problems = [
    z.prettifyError(parsed.error),
    ...(undeclared.length ? [`(saved fields the schema no longer declares: ${undeclared.join(", ")})`] : []),
  ].join("\n");
  const fields = parsed.error.issues.map((i: z.core.$ZodIssue) => i.path.join("."));
  const versions = `saved under version ${from ?? "(none)"}, the workflow is now at version ${wf.version ?? "(none)"}`;
  if (!wf.migrate) {
    throw new CairnError(
      "STATE_SCHEMA_MISMATCH",
      `The saved state of thread "${tuple.config.configurable?.thread_id}" no longer matches the state schema of workflow "${wf.name}" (${versions}):\n` +
        `${problems}\n` +
        `Declare how to bring old states up to date: workflow("${wf.name}", { state, version: "…", migrate: (old, { version }) => ({ ...old, /* fixed fields */ }) }); ` +
        `or resume an earlier checkpoint with --checkpoint, or start a new thread.`,
      { thread: tuple.config.configurable?.thread_id, fields, version: from },
      { cause: parsed.error },
    );
  }
  let migrated: Record<string, unknown>;
  try {
    migrated = wf.migrate(structuredClone(saved), { version: from });
  } catch (error) {
    throw new CairnError(
      "STATE_SCHEMA_MISMATCH",
      `The migrate() function of workflow "${wf.name}" threw on the saved state of thread "${tuple.config.configurable?.thread_id}" (${versions}): ${error instanceof Error ? error.message : String(error)}. Fix migrate() and resume again; nothing was written.`,
      { thread: tuple.config.configurable?.thread_id, version: from },
      { cause: error },
    );
  }
  const check = wf.schema.safeParse(migrated);
  if (!check.success) {
    throw new CairnError(
      "STATE_SCHEMA_MISMATCH",
      `The migrate() function of workflow "${wf.name}" returned a state that still does not match the schema (${versions}):\n${z.prettifyError(check.error)}\nFix migrate() and resume again; nothing was written.`,
      { thread: tuple.config.configurable?.thread_id, fields: check.error.issues.map((i: z.core.$ZodIssue) => i.path.join(".")), version: from },
      { cause: check.error },
    );
  }
  const next = check.data as Record<string, unknown>;
  const changes: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(next)) if (!(k in saved) || hashOf(saved[k]) !== hashOf(v)) changes[k] = v;
  // A declared field migrate() left out is unset; undeclared ones have no channel in the graph to write.
  for (const k of Object.keys(saved)) if (!(k in next) && k in wf.schema.shape) changes[k] = undefined;
  return { changes, from, to: wf.version, itemsLost };
}

/**
 * Save the migrated state as a new checkpoint (labelled `migrate`) attributed to the step that produced
 * the current one, so the workflow's routing continues where it stood. Returns a notice for the user.
 */
export async function applyMigration(prepared: PreparedRun, head: CheckpointTuple, migration: Migration, producer?: string): Promise<string> {
  const wf = prepared.workflow!;
  const produced = (head.metadata as { cairn?: { steps?: string[] } } | undefined)?.cairn?.steps ?? [];
  const done = ((head.checkpoint.channel_values as Record<string, unknown>)[DONE_CHANNEL] as string[] | undefined) ?? [];
  const last = produced.filter((s) => wf.steps.includes(s)).pop() ?? producer ?? done.filter((s) => wf.steps.includes(s)).pop();
  const update: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(migration.changes)) update[k] = v !== undefined && prepared.isReducer(k) ? new Overwrite(v) : v;
  prepared.saver.nextLabel = "migrate";
  // The head's own id: LangGraph then neither folds its pending writes (saved fan-out items) into the
  // state nor re-sends them; the items rerun, as the notice says.
  await prepared.graph.updateState(head.config, update, last === undefined ? START : wf.lastNodeOf(last));
  const fields = Object.keys(migration.changes);
  const lost = migration.itemsLost ? ` ${migration.itemsLost} saved fan-out item(s) of the step in progress run again.` : "";
  const how = migration.defaultsOnly ? "filled in fields the schema now gives defaults" : `migrated the saved state from version ${migration.from ?? "(none)"} to ${migration.to ?? "(none)"}`;
  return `${how} (fields: ${fields.join(", ") || "none"}).${lost}`;
}

export function isRefusal(error: unknown): boolean {
  return isCairnError(error, "FINGERPRINT_MISMATCH") || isCairnError(error, "STATE_SCHEMA_MISMATCH");
}
