import type { CheckpointTuple } from "@langchain/langgraph-checkpoint";
import { DONE_CHANNEL, FINGERPRINT_CHANNEL } from "../channels.ts";
import { pendingNodes } from "../store/steps.ts";
import { isWorkflow, type Workflow } from "../workflow/builder.ts";
import { hashOf } from "../workflow/hash.ts";

export { hashOf };
import { asStateGraph, type RunTarget } from "./prepare.ts";

/**
 * A thread's fingerprint: what its saved work depends on, recorded so that a resume under changed code or
 * input can say what changed instead of silently mixing old and new outputs.
 *
 * - structure: the steps, their kinds and order, and where routes lead (for a plain graph: nodes, edges,
 *   conditional edges), plus the workflow's declared `version` and `fingerprint`;
 * - input: the validated input the thread started with;
 * - per step: the hash of what the step declares it depends on (`fingerprint` on `.step`/`.map`), kept
 *   in the state with the step's output (`__cairn_fp`), so it is saved atomically with what it describes.
 *
 * The first two ride in every checkpoint's `metadata.cairn.fingerprint` as short hashes; the first
 * checkpoint a run writes also carries the readable detail that a mismatch is explained with.
 */

/** What `metadata.cairn.fingerprint` holds. */
export interface FingerprintRecord {
  /** Hash of the structure (steps, routes, version, the workflow's declared fingerprint). */
  structure: string;
  /** Hash of the validated input. */
  input: string;
  /** The workflow's declared version, readable. */
  version?: string;
  /** The readable structure, one line per step (on the first checkpoint each run writes). */
  shape?: string[];
  /** Hash of the workflow's declared `fingerprint` (on the first checkpoint each run writes). */
  config?: string;
  /** The checkpoint that carries this record's readable detail (on the checkpoints after it). */
  detailAt?: string;
  /** Hash of each input field (on the first checkpoint each run writes). */
  inputFields?: Record<string, string>;
  /**
   * Where the input came from (on every checkpoint): `file:<absolute path>` (a resume re-reads the file
   * to see whether it changed), `default` (the workflow's `defaultInput`), or `given` (cannot be re-read).
   */
  inputSource?: string;
}

/** The fingerprint the current code gives a thread with a given input. */
export interface CurrentFingerprint {
  record: FingerprintRecord;
  /** The current steps in order (workflow) or nodes (plain graph). */
  steps: string[];
  /** Hash of each step's declared fingerprint, for the steps that declare one. */
  stepHashes: Record<string, string>;
}

/** One readable line per step: what a structure diff compares. */
export function shapeLines(target: RunTarget): string[] {
  if (isWorkflow(target)) {
    const shape = target.describe();
    const routes = new Map(shape.routes.map((r) => [r.from, r]));
    return shape.steps.map((s) => {
      let line = `${s.name} (${s.kind === "map" ? `fan-out into ${s.into}` : "step"}${s.conditional ? ", conditional" : ""})`;
      const route = routes.get(s.name);
      if (route) line += ` → ${route.targets.length ? route.targets.join(" | ") : "route"}`;
      return line;
    });
  }
  const graph = asStateGraph(target);
  const out = new Map<string, string[]>();
  for (const node of Object.keys(graph.nodes)) out.set(node, []);
  for (const [from, to] of graph.edges) out.get(String(from))?.push(String(to));
  for (const [from, to] of (graph as unknown as { waitingEdges?: Set<[string[], string]> }).waitingEdges ?? []) {
    for (const f of from) out.get(f)?.push(`${to} (join)`);
  }
  for (const [from, branches] of Object.entries(graph.branches ?? {})) {
    for (const [name, branch] of Object.entries(branches)) {
      const ends = (branch as { ends?: Record<string, string> }).ends;
      out.get(from)?.push(`branch ${name}${ends ? `: ${Object.values(ends).join(" | ")}` : ""}`);
    }
  }
  const starts = [...graph.edges].filter(([from]) => from === "__start__").map(([, to]) => String(to));
  return [
    ...(starts.length ? [`start → ${starts.sort().join(" | ")}`] : []),
    ...[...out].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([node, to]) => `${node}${to.length ? ` → ${to.sort().join(" | ")}` : ""}`),
  ];
}

/** The fingerprint of `target` run on `input` (the validated input; undefined when it is not known). */
export function currentFingerprint(target: RunTarget, input: unknown, inputSource?: string): CurrentFingerprint {
  const shape = shapeLines(target);
  const wf = isWorkflow(target) ? (target as Workflow<any, string>) : undefined;
  const config = wf?.fingerprint === undefined ? undefined : hashOf(wf.fingerprint);
  const record: FingerprintRecord = {
    structure: hashOf({ shape, version: wf?.version, config }),
    input: hashOf(input),
    shape,
    inputFields: fieldHashes(input),
  };
  if (wf?.version !== undefined) record.version = wf.version;
  if (config !== undefined) record.config = config;
  if (inputSource !== undefined) record.inputSource = inputSource;
  const stepHashes: Record<string, string> = {};
  const steps = wf ? wf.steps : Object.keys(asStateGraph(target).nodes);
  if (wf) {
    for (const step of wf.steps) {
      const declared = wf.stepFingerprint(step);
      if (declared !== undefined) stepHashes[step] = hashOf(declared);
    }
  }
  return { record, steps, stepHashes };
}

function fieldHashes(input: unknown): Record<string, string> | undefined {
  if (typeof input !== "object" || input === null || Array.isArray(input)) return undefined;
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(input)) out[k] = hashOf(v);
  return out;
}

/** The fingerprint recorded with a checkpoint (undefined for checkpoints written before cairn kept one). */
export function recordedFingerprint(tuple: CheckpointTuple | undefined): FingerprintRecord | undefined {
  const fp = (tuple?.metadata as { cairn?: { fingerprint?: FingerprintRecord } } | undefined)?.cairn?.fingerprint;
  return fp && typeof fp.structure === "string" && typeof fp.input === "string" ? fp : undefined;
}

/** The hashes every checkpoint carries (the detail rides only on the first one of each run). */
export function compactFingerprint(record: FingerprintRecord, detailAt?: string): FingerprintRecord {
  const out: FingerprintRecord = { structure: record.structure, input: record.input };
  if (detailAt !== undefined) out.detailAt = detailAt;
  if (record.version !== undefined) out.version = record.version;
  if (record.inputSource !== undefined) out.inputSource = record.inputSource;
  return out;
}

/** What differs between a thread's recorded fingerprint and the current code and input. */
export interface FingerprintReport {
  /** Readable lines: what changed in the structure (steps added, removed, moved, rerouted; version). */
  structure: string[];
  /** Readable lines: which input fields changed. Empty when the input is unchanged or cannot be checked. */
  input: string[];
  /** Whether the input could be compared at all (given, re-read from its file, or the default input). */
  inputChecked: boolean;
  /** Finished steps whose declared fingerprint changed since they ran, in the order they finished. */
  stale: string[];
  /** Finished steps the changes affect, in the order they finished (some may no longer exist). */
  affected: string[];
  /**
   * The earliest affected finished step that the current workflow still has: the step to restart from
   * with `--from-step`. Undefined when no finished step is affected, or none of them exists any more.
   */
  firstAffected: string | undefined;
  /** Steps due next that the current graph no longer has: the thread cannot continue there. */
  missingDue: string[];
  /** Whether a resume must be refused (without `force`). */
  refuse: boolean;
}

/**
 * Compare a thread's saved fingerprint with the current one. Pure: `tuple` is the checkpoint the resume
 * continues from, `detail` the recorded fingerprint that carries the readable shape (found in history
 * when `tuple`'s own has only hashes).
 */
export function compareFingerprints(
  target: RunTarget,
  tuple: CheckpointTuple,
  recorded: FingerprintRecord,
  detail: FingerprintRecord | undefined,
  current: CurrentFingerprint,
  currentInput: { checked: boolean },
  /** Steps finished on the branch, in the order they first finished (a loop step due again included). */
  finished: string[],
): FingerprintReport {
  const wf = isWorkflow(target) ? (target as Workflow<any, string>) : undefined;
  const values = tuple.checkpoint.channel_values as Record<string, unknown>;
  const due = dueSteps(target, tuple);

  const structure: string[] = [];
  let firstChanged: number | undefined;
  if (recorded.structure !== current.record.structure) {
    const before = detail?.shape;
    const after = current.record.shape ?? [];
    if (before) {
      structure.push(...describeShapeChange(before, after));
      // A plain graph's lines are sorted by node name, not in running order: any change may affect all.
      firstChanged = wf ? firstDifference(before, after) : structure.length ? 0 : undefined;
    } else {
      structure.push("the steps or routes changed (the thread's record of its old structure is no longer in the store)");
      firstChanged = 0;
    }
    if (detail && detail.version !== current.record.version) {
      structure.push(`version ${detail.version ?? "(none)"} → ${current.record.version ?? "(none)"}`);
      firstChanged = 0;
    }
    if (detail && detail.config !== current.record.config) {
      structure.push("the workflow's declared fingerprint changed");
      firstChanged = 0;
    }
    if (structure.length === 0) {
      structure.push("the workflow's structure hash changed");
      firstChanged = 0;
    }
  }

  const input: string[] = [];
  if (currentInput.checked && recorded.input !== current.record.input) {
    const before = detail?.inputFields;
    const after = current.record.inputFields ?? {};
    if (before) {
      for (const k of Object.keys(after)) {
        if (!(k in before)) input.push(`input field "${k}" added`);
        else if (before[k] !== after[k]) input.push(`input field "${k}" changed`);
      }
      for (const k of Object.keys(before)) if (!(k in after)) input.push(`input field "${k}" removed`);
    }
    if (input.length === 0) input.push("the input changed");
  }

  const fps = (values[FINGERPRINT_CHANNEL] as Record<string, string> | undefined) ?? {};
  const stale = finished.filter((s) => fps[s] !== undefined && current.stepHashes[s] !== undefined && fps[s] !== current.stepHashes[s]);

  // Which finished work the changes touch: with a changed input or an unknown structure change, all of it;
  // with a structure change at position k of the current steps, every finished step declared at or after k.
  const affected = new Set<string>(stale);
  if (input.length > 0) for (const s of finished) affected.add(s);
  if (firstChanged !== undefined) {
    const order = current.steps;
    for (const s of finished) {
      const at = order.indexOf(s);
      if (at === -1 || at >= firstChanged) affected.add(s);
    }
  }
  const known = new Set(current.steps);
  const affectedList = finished.filter((s) => affected.has(s));
  const missingDue = due.filter((s) => !known.has(s));
  return {
    structure,
    input,
    inputChecked: currentInput.checked,
    stale,
    affected: affectedList,
    firstAffected: affectedList.find((s) => known.has(s)),
    missingDue,
    refuse: affectedList.length > 0 || missingDue.length > 0,
  };
}

/** The steps a checkpoint has due (a fan-out's gather node counts as its step). */
export function dueSteps(target: RunTarget, tuple: CheckpointTuple): string[] {
  const wf = isWorkflow(target) ? (target as Workflow<any, string>) : undefined;
  const due = pendingNodes(tuple.checkpoint)
    .filter((n) => n !== "__start__")
    .map((n) => (wf ? wf.stepOfNode(n) : n));
  return [...new Set(due)];
}

/** Steps finished on the branch of a checkpoint, in the order they first finished (cairn workflows). */
export function finishedOn(tuple: CheckpointTuple): string[] {
  const done: string[] = [];
  const add = (list: unknown) => {
    if (Array.isArray(list)) for (const s of list) if (typeof s === "string" && !done.includes(s)) done.push(s);
  };
  add((tuple.checkpoint.channel_values as Record<string, unknown>)[DONE_CHANNEL]);
  for (const [, channel, value] of tuple.pendingWrites ?? []) if (channel === DONE_CHANNEL) add(value);
  return done;
}

/** Readable lines for what changed between two structures (one line per step). */
export function describeShapeChange(before: string[], after: string[]): string[] {
  const nameOf = (line: string) => line.split(" ")[0]!;
  const beforeNames = before.map(nameOf);
  const afterNames = after.map(nameOf);
  const out: string[] = [];
  for (const [i, line] of after.entries()) {
    const name = afterNames[i]!;
    const was = beforeNames.indexOf(name);
    if (was === -1) out.push(`step "${name}" was added${i > 0 ? ` after "${afterNames[i - 1]}"` : " at the start"}`);
    else if (before[was] !== line) out.push(`step ${describeLineChange(before[was]!, line)}`);
  }
  for (const name of beforeNames) if (!afterNames.includes(name)) out.push(`step "${name}" was removed`);
  const common = afterNames.filter((n) => beforeNames.includes(n));
  const commonBefore = beforeNames.filter((n) => afterNames.includes(n));
  if (common.join("\u0000") !== commonBefore.join("\u0000")) out.push(`steps were reordered: ${commonBefore.join(", ")} → ${common.join(", ")}`);
  return out;
}

function describeLineChange(before: string, after: string): string {
  const name = before.split(" ")[0]!;
  const was = before.slice(name.length).trim() || "(no edges)";
  const now = after.slice(name.length).trim() || "(no edges)";
  return `"${name}" changed: was ${JSON.stringify(was)}, now ${JSON.stringify(now)}`;
}

/** The index of the first line that differs (the length of the shorter list when one is a prefix). */
function firstDifference(before: string[], after: string[]): number | undefined {
  const n = Math.max(before.length, after.length);
  for (let i = 0; i < n; i += 1) if (before[i] !== after[i]) return i;
  return undefined;
}
