import { END, START, type StateGraph } from "@langchain/langgraph";
import type { BaseCheckpointSaver } from "@langchain/langgraph-checkpoint";
import { latestTuple, savedWork, statusOf, type SavedWork, type ThreadStatus } from "../inspect/history.ts";
import { END_OF_WORKFLOW, isWorkflow, type WorkflowShape } from "../workflow/builder.ts";
import { asStateGraph, prepareRun, type RunTarget } from "./prepare.ts";

/** Where a step stands on a thread's current branch. */
export type StepStatus = "done" | "failed" | "running" | "pending" | "skipped";

/** A step of a workflow (or a node of a plain graph) and, for a thread, where it stands. */
export interface StepOnThread {
  name: string;
  /** `map` for a fan-out; a plain graph's nodes are all `step`. */
  kind: "step" | "map";
  /**
   * `done`: finished on the branch. `failed`: its task's error is recorded in the latest checkpoint.
   * `running`: due, and the process running the thread is alive. `pending`: not run yet (or due again in
   * a loop, or due on a thread that was stopped). `skipped`: the branch went past it without running it
   * (a `when` that did not hold, a route that jumped over it, or a thread that completed without it).
   */
  status: StepStatus;
  /** For a fan-out that is due: how many of its items are saved, of how many. */
  items?: { done: number; total: number };
}

/** Where every step of a workflow stands on one thread. */
export interface ThreadSteps {
  thread: string;
  /** The thread as a whole (see `statusOf`). */
  status: ThreadStatus;
  /**
   * Set when the thread's latest checkpoint says another workflow ran it (by name; "graph" for a plain
   * graph): the marks are then of steps the thread may never have had.
   */
  otherWorkflow?: string;
  /** Every step, in declared order. */
  steps: StepOnThread[];
}

/**
 * The steps of a cairn workflow in declared order, or the nodes of a plain LangGraph `StateGraph`.
 *
 * @example
 * ```ts
 * graphSteps(novel); // [{ name: "interpret_brief", kind: "step" }, …, { name: "edit_chapters", kind: "map" }, …]
 * ```
 */
export function graphSteps(target: RunTarget): { name: string; kind: "step" | "map" }[] {
  if (isWorkflow(target)) return target.describe().steps.map((s) => ({ name: s.name, kind: s.kind }));
  return Object.keys(asStateGraph(target).nodes).map((name) => ({ name, kind: "step" as const }));
}

/**
 * Where each step of a thread stands on its current branch, read from the store: the latest checkpoint,
 * its saved task writes (finished fan-out items, a failed task's error) and the steps it records as done.
 * Pass the graph the thread runs: which steps are due is the graph's to say.
 *
 * @throws CairnError `THREAD_NOT_FOUND` when the store has no such thread.
 *
 * @example
 * ```ts
 * const store = await openStore("file:.cairn");
 * try {
 *   const marks = await threadSteps(novel, store.saver, "novel-001", store.uri);
 *   console.log(workflowDiagram(novel, marks));
 * } finally {
 *   await store.close();
 * }
 * ```
 */
export async function threadSteps(target: RunTarget, saver: BaseCheckpointSaver, thread: string, storeUri: string): Promise<ThreadSteps> {
  const latest = await latestTuple(saver, thread, storeUri);
  const { status } = statusOf(latest);
  const saved = await savedWork(saver, thread);
  // The graph says which tasks are due from the latest checkpoint, and pairs each saved write (a result
  // or an error) with its task; nothing runs and nothing is written.
  const prepared = prepareRun(target, saver, thread, new AbortController().signal, () => {});
  const snapshot = await prepared.graph.getState({ configurable: { thread_id: thread } });
  const stepOf = (node: string) => (prepared.workflow ? prepared.workflow.stepOfNode(node) : node);
  const due: DueTask[] = snapshot.tasks.map((t) => ({
    step: stepOf(t.name),
    item: t.name === stepOf(t.name) && prepared.workflow?.isMapStep(t.name) === true,
    saved: t.result !== undefined,
    failed: t.error !== undefined && t.error !== null,
  }));
  const steps = markSteps(graphSteps(target), { status, saved, due, ordered: isWorkflow(target) });
  const recorded = (latest.metadata as { cairn?: { workflow?: string } } | undefined)?.cairn?.workflow;
  return recorded !== undefined && recorded !== prepared.name ? { thread, status, steps, otherWorkflow: recorded } : { thread, status, steps };
}

/** A task due at the latest checkpoint, as far as marking its step goes. */
interface DueTask {
  step: string;
  /** One item of a fan-out (not its gather). */
  item: boolean;
  /** Its writes are saved (it finished; they are not folded into a checkpoint yet). */
  saved: boolean;
  failed: boolean;
}

/**
 * Mark each step from what the thread has saved and what is due. `ordered`: declared order is the order
 * steps run in (a cairn workflow), so a step that is neither done nor due while a later one is was passed
 * over; a plain graph's node order says nothing about that.
 */
function markSteps(
  steps: { name: string; kind: "step" | "map" }[],
  thread: { status: ThreadStatus; saved: SavedWork; due: DueTask[]; ordered: boolean },
): StepOnThread[] {
  const done = new Set(thread.saved.steps);
  const dueSteps = new Set(thread.due.map((t) => t.step));
  const reached = steps.map((s) => done.has(s.name) || dueSteps.has(s.name));
  return steps.map((s, i) => {
    const mark: StepOnThread = { name: s.name, kind: s.kind, status: "pending" };
    const tasks = thread.due.filter((t) => t.step === s.name);
    if (s.kind === "map" && tasks.length > 0) {
      const items = tasks.filter((t) => t.item);
      const savedItems = thread.saved.items[s.name]?.length ?? 0;
      // With every item saved and only the gather due, the item tasks are gone: the saved parts count.
      mark.items = items.length > 0 ? { done: items.filter((t) => t.saved && !t.failed).length, total: items.length } : { done: savedItems, total: savedItems };
    }
    if (tasks.some((t) => t.failed)) mark.status = "failed";
    // Due: unless every task's output is saved and the step recorded itself done (a crash before the fold).
    else if (tasks.length > 0 && !(tasks.every((t) => t.saved) && done.has(s.name))) mark.status = thread.status === "running" ? "running" : "pending";
    else if (done.has(s.name)) mark.status = "done";
    else if (thread.status === "completed" || (thread.ordered && reached.slice(i + 1).some(Boolean))) mark.status = "skipped";
    return mark;
  });
}

/**
 * The workflow as a Mermaid flowchart (`flowchart TD`): a start and an end, one node per step (a fan-out
 * as a subroutine box saying what it gathers into), edges for the declared order and for routes (a route
 * back to an earlier step is labelled "loop"), a dotted "skip" edge past each step with a `when`, and for
 * a route whose targets are unknown a dotted edge to a "?" with a note asking for `targets`. With a
 * thread's marks (`threadSteps`), each step is coloured by its status, a fan-out under way shows its
 * items ("37/120 items"), and a legend names the thread and the colours. A plain LangGraph `StateGraph` is
 * drawn from its nodes, edges and conditional edges, marked by node name.
 *
 * @example
 * ```ts
 * import novel from "./graphs/novel.ts";
 * writeFileSync("novel.md", "```mermaid\n" + workflowDiagram(novel) + "\n```\n");
 * ```
 */
export function workflowDiagram(target: RunTarget, marks?: ThreadSteps): string {
  const chart = new Chart(marks);
  if (isWorkflow(target)) drawWorkflow(chart, target.describe());
  else drawPlainGraph(chart, asStateGraph(target));
  return chart.render();
}

const START_ID = "START";
const END_ID = "END";

function drawWorkflow(chart: Chart, shape: WorkflowShape): void {
  const names = shape.steps.map((s) => s.name);
  const routes = new Map(shape.routes.map((r) => [r.from, r]));
  chart.terminal(START_ID, "start");
  for (const s of shape.steps) {
    const lines = s.kind === "map" ? [s.name, `× items → ${s.into ?? "?"}`] : [s.name];
    if (s.conditional) lines.push("(when)");
    chart.step(s.name, s.kind, lines);
  }
  chart.terminal(END_ID, "end");

  /** Where the workflow goes after a step: its route's targets, or the next declared step. */
  const exits = (step: string): string[] | "unknown" => {
    const route = routes.get(step);
    if (route) return route.targetsFrom === "unknown" ? "unknown" : route.targets;
    return [names[names.indexOf(step) + 1] ?? END_OF_WORKFLOW];
  };
  /**
   * An edge from `from` into `target`; and since the workflow enters a step by testing its `when`, when
   * the target has one, a dotted edge from `from` to wherever the workflow goes on past it.
   */
  const enter = (from: string, fromIndex: number, target: string, skipped: string[]): void => {
    const label = skipped.length > 0 ? `skip ${skipped.join(", ")}` : target !== END_OF_WORKFLOW && names.indexOf(target) <= fromIndex ? "loop" : undefined;
    chart.edge(from, target === END_OF_WORKFLOW ? END_ID : chart.idOf(target), skipped.length > 0 ? "dotted" : "solid", label);
    const step = shape.steps.find((s) => s.name === target);
    if (!step?.conditional || skipped.includes(target)) return;
    const past = exits(target);
    if (past === "unknown") chart.unknownRoute(from, target, `skip ${[...skipped, target].join(", ")}`);
    else for (const next of past) enter(from, fromIndex, next, [...skipped, target]);
  };

  enter(START_ID, -1, names[0] ?? END_OF_WORKFLOW, []);
  names.forEach((name, i) => {
    const past = exits(name);
    if (past === "unknown") chart.unknownRoute(chart.idOf(name), name, "route");
    else for (const next of past) enter(chart.idOf(name), i, next, []);
  });
}

/**
 * A plain StateGraph from its own structure: nodes, edges (a join's sources each drawn to it),
 * conditional edges (to their path map, or to every node when they declare none, as LangGraph assumes),
 * and a node's declared `ends`. A node with no way out ends the run.
 */
function drawPlainGraph(chart: Chart, graph: StateGraph<any, any, any, any, any, any>): void {
  const nodes = graph.nodes as Record<string, { ends?: readonly string[] }>;
  const names = Object.keys(nodes);
  const idOf = (n: string) => (n === START ? START_ID : n === END ? END_ID : chart.idOf(n));
  chart.terminal(START_ID, "start");
  for (const name of names) chart.step(name, "step", [name]);
  chart.terminal(END_ID, "end");
  const leaves = new Set<string>();
  for (const [from, to] of graph.allEdges) {
    chart.edge(idOf(from), idOf(to), "solid");
    leaves.add(from);
  }
  for (const [from, branches] of Object.entries(graph.branches)) {
    for (const branch of Object.values(branches)) {
      const ends = branch.ends ?? Object.fromEntries([...names.filter((n) => n !== from), END].map((n) => [n, n]));
      for (const [label, to] of Object.entries(ends)) chart.edge(idOf(from), idOf(to), "dotted", label === to ? undefined : label);
      leaves.add(from);
    }
  }
  for (const [from, spec] of Object.entries(nodes)) {
    for (const to of spec.ends ?? []) chart.edge(idOf(from), idOf(to), "dotted");
    if (spec.ends?.length) leaves.add(from);
  }
  for (const name of names) if (!leaves.has(name)) chart.edge(idOf(name), END_ID, "solid");
}

/** Colours per status, readable on light and dark backgrounds. */
const STATUS_STYLES: Record<StepStatus, string> = {
  done: "fill:#d1fadf,stroke:#12b76a,color:#05603a",
  failed: "fill:#fee4e2,stroke:#d92d20,color:#7a271a,stroke-width:2px",
  running: "fill:#fef0c7,stroke:#f79009,color:#7a2e0e,stroke-width:2px",
  pending: "fill:#f2f4f7,stroke:#98a2b3,color:#344054",
  skipped: "fill:#ffffff,stroke:#98a2b3,color:#667085,stroke-dasharray:4 3",
};
const NOTE_STYLE = "fill:#fffbe6,stroke:#d4b106,color:#5c4a00";

/**
 * Mermaid text for one flowchart. Node ids are generated (`s_<name>`, other characters as `_`, made
 * unique), never the step name itself: a name may hold `-` (which Mermaid reads as part of an arrow) or be
 * a keyword (`end`, `style`, `class`). Every label is a quoted string with `"`, `<`, `>`, `&`, `#`, `%`
 * and backticks written as Mermaid entity codes.
 */
class Chart {
  private readonly ids = new Map<string, string>();
  private readonly nodes: string[] = [];
  private readonly edges: string[] = [];
  private readonly seen = new Set<string>();
  private readonly classes = new Map<string, string[]>();
  private readonly unknowns = new Set<string>();
  private readonly marks: Map<string, StepOnThread> | undefined;

  constructor(private readonly thread: ThreadSteps | undefined) {
    this.marks = thread && new Map(thread.steps.map((s) => [s.name, s]));
  }

  idOf(name: string): string {
    let id = this.ids.get(name);
    if (id === undefined) {
      const base = `s_${name.replace(/[^A-Za-z0-9_]/g, "_")}`;
      const taken = new Set(this.ids.values());
      id = base;
      for (let n = 2; taken.has(id); n += 1) id = `${base}_${n}`;
      this.ids.set(name, id);
    }
    return id;
  }

  terminal(id: string, text: string): void {
    this.nodes.push(`${id}(["${escapeLabel(text)}"])`);
  }

  step(name: string, kind: "step" | "map", lines: string[]): void {
    const id = this.idOf(name);
    const mark = this.marks?.get(name);
    const text = [...lines];
    if (mark?.items && mark.items.done < mark.items.total) text.push(`${mark.items.done}/${mark.items.total} items`);
    const label = text.map(escapeLabel).join("<br/>");
    this.nodes.push(kind === "map" ? `${id}[["${label}"]]` : `${id}["${label}"]`);
    if (mark) this.classify(id, mark.status);
  }

  edge(from: string, to: string, style: "solid" | "dotted" | "line", label?: string): void {
    const arrow = style === "solid" ? "-->" : style === "dotted" ? "-.->" : "-.-";
    const line = `${from} ${arrow}${label === undefined ? "" : `|"${escapeLabel(label)}"|`} ${to}`;
    if (this.seen.has(line)) return;
    this.seen.add(line);
    this.edges.push(line);
  }

  /** A route whose targets cannot be known: a dotted edge to "?", and a note saying how to declare them. */
  unknownRoute(from: string, step: string, label: string): void {
    const unknown = `q_${this.idOf(step).slice(2)}`;
    const note = `note_${this.idOf(step).slice(2)}`;
    if (!this.unknowns.has(unknown)) {
      this.unknowns.add(unknown);
      this.nodes.push(`${unknown}{{"?"}}`);
      const hint = `route after ${step}: targets unknown. Declare them: .route("${step}", fn, { targets: [ … ] })`;
      this.nodes.push(`${note}>"${escapeLabel(hint)}"]`);
      this.classify(note, "note");
    }
    this.edge(from, unknown, "dotted", label);
    this.edge(unknown, note, "line");
  }

  render(): string {
    const out = ["flowchart TD", ...this.nodes.map(indent), ...this.edges.map(indent)];
    if (this.thread) {
      const statuses = Object.keys(STATUS_STYLES) as StepStatus[];
      out.push(indent(`subgraph legend["${escapeLabel(`thread ${this.thread.thread} · ${this.thread.status}`)}"]`));
      out.push(indent(indent("direction LR")));
      for (const s of statuses) {
        out.push(indent(indent(`legend_${s}["${s}"]`)));
        this.classify(`legend_${s}`, s);
      }
      // Invisible links keep the legend on one line (a subgraph's direction applies to linked nodes).
      out.push(indent(indent(statuses.map((s) => `legend_${s}`).join(" ~~~ "))));
      out.push(indent("end"));
      out.push(indent("style legend fill:none,stroke:#d0d5dd"));
      for (const s of statuses) out.push(indent(`classDef ${s} ${STATUS_STYLES[s]}`));
    }
    if (this.classes.has("note")) out.push(indent(`classDef note ${NOTE_STYLE}`));
    for (const [name, ids] of this.classes) out.push(indent(`class ${ids.join(",")} ${name}`));
    return out.join("\n");
  }

  private classify(id: string, name: string): void {
    const ids = this.classes.get(name) ?? [];
    ids.push(id);
    this.classes.set(name, ids);
  }
}

const indent = (line: string) => `  ${line}`;

/**
 * Text safe inside a quoted Mermaid label: characters Mermaid would read as markup or syntax (and ";",
 * which ends a statement) become entity codes (`#34;`, `#35;` …), which it turns back into the characters
 * when it draws. Line breaks become spaces. Three words get one letter as a code, because Mermaid reads
 * whole lines before it reads quotes: a line holding "direction LR" is a direction statement, and on a
 * line holding "style" or "classDef" its entity pass drops the last ";" (breaking the last entity code).
 */
function escapeLabel(text: string): string {
  return text
    .replace(/[\r\n]+/g, " ")
    .replace(/[#"<>&%`;]/g, (c) => `#${c.charCodeAt(0)};`)
    .replace(/direction/g, "d#105;rection")
    .replace(/style/g, "st#121;le")
    .replace(/classDef/g, "cl#97;ssDef");
}
