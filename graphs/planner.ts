/**
 * A planner that turns a brief into a plan of tasks with dependencies and executes it, independent tasks
 * in parallel: the MetaPlanner pattern (a "vibe" decomposed into a workflow of nodes, run in dependency
 * order, resumable at any node) on cairn.
 *
 *   plan       asks the model for an overview and lays out 10–15 tasks with ids, kinds and `dependsOn`
 *              lists; the plan is checked to be a DAG before anything runs
 *   execute    a fan-out over the tasks that are ready (every dependency done, not done yet), at most
 *              CONCURRENCY at once; each task calls the model with its dependencies' outputs
 *   record     folds the wave's results into `done`, reports completed/total tasks, and loops back to
 *              `execute` while tasks remain, so every wave is checkpointed
 *   summarize  writes <outDir>/<thread>/report.md listing every task and its output
 *
 * Each task start and end is appended to <outDir>/<thread>/trace.log (time, process id, event, task,
 * wave): it shows which tasks ran side by side and which a resume ran again.
 *
 *   cairn run graphs/planner.ts --thread plan-001
 *   cairn resume graphs/planner.ts --thread plan-001 --from-step summarize
 */
import { appendFileSync, mkdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { HumanMessage, SystemMessage } from "@langchain/core/messages";
import { z } from "zod";
import { workflow } from "cairn";
import { chatModel, EXAMPLE_PRICING } from "./lib/model.ts";
import { hashText, seededRandom } from "./lib/random.ts";

/** At most this many tasks of a wave call the model at once. */
export const CONCURRENCY = 3;

const KINDS = ["research", "outline", "style", "write", "design", "review", "assemble"] as const;

const Task = z.object({
  id: z.string(),
  title: z.string(),
  kind: z.enum(KINDS),
  dependsOn: z.array(z.string()),
});
type Task = z.infer<typeof Task>;

const TaskResult = z.object({ id: z.string(), wave: z.number().int(), output: z.string() });
type TaskResult = z.infer<typeof TaskResult>;

const State = z.object({
  brief: z.string().min(1),
  seed: z.number().int().default(5),
  /** Milliseconds each stand-in model call takes. */
  delayMs: z.number().int().min(0).default(150),
  /** The report and trace go to <outDir>/<thread>/. */
  outDir: z.string().min(1).default("out/planner"),
  /** For trying the plan check: corrupt the derived plan with a cycle or a dependency on a missing task. */
  breakPlan: z.enum(["cycle", "unknown-dependency"]).optional(),

  overview: z.string().optional(),
  tasks: z.array(Task).default([]),
  /** The results of the wave that just ran, in task order (the fan-out's output). */
  wave: z.array(TaskResult).default([]),
  /** Finished tasks by id. */
  done: z.record(z.string(), TaskResult).default({}),
  waves: z.number().int().default(0),
  report: z.object({ path: z.string(), tasks: z.number(), waves: z.number() }).optional(),
});
type State = z.infer<typeof State>;

async function ask(s: Pick<State, "seed" | "delayMs">, signal: AbortSignal, system: string, prompt: string): Promise<string> {
  const model = await chatModel({ seed: s.seed, delayMs: s.delayMs });
  const reply = await model.invoke([new SystemMessage(system), new HumanMessage(prompt)], { signal });
  return typeof reply.content === "string" ? reply.content : JSON.stringify(reply.content);
}

const id = (n: number) => `t${String(n).padStart(2, "0")}`;

/**
 * Lay out the plan from the brief and seed: research, then an outline and a visual style, sections to
 * write and visuals to design, a review, and a final assembly that depends on everything left open. The
 * shape (how many of each, which extra links) is drawn from a generator seeded by both, so a brief
 * always gets the same plan. A hosted planner would parse its reply into the same `Task` list; the check
 * in `checkPlan` applies to it unchanged.
 */
function derivePlan(brief: string, seed: number): Task[] {
  const rand = seededRandom(hashText(brief) ^ seed);
  const pick = <T>(items: readonly T[]): T => items[Math.floor(rand() * items.length)]!;
  const size = 10 + Math.floor(rand() * 6);
  const tasks: Task[] = [];
  const add = (kind: Task["kind"], title: string, dependsOn: string[]) => {
    const task = { id: id(tasks.length + 1), title, kind, dependsOn: [...new Set(dependsOn)].sort() };
    tasks.push(task);
    return task.id;
  };
  const topics = ["the audience", "reference material", "the subject matter", "comparable works"];
  const research = topics.slice(0, 3 + Math.floor(rand() * 2)).map((topic) => add("research", `Research ${topic}`, []));
  const outlineInputs = research.filter(() => rand() < 0.7);
  const outline = add("outline", "Outline the piece", outlineInputs.length ? outlineInputs : research);
  const style = add("style", "Define the visual style", [pick(research)]);
  // What is left after research, outline, style, review and assembly: sections, and visuals for most.
  const rest = size - research.length - 4;
  const sections = Math.ceil(rest / 2);
  const written: string[] = [];
  for (let i = 1; i <= sections; i += 1) {
    const previous = written[written.length - 1];
    written.push(add("write", `Write section ${i}`, previous && rand() < 0.25 ? [outline, previous] : [outline]));
  }
  const designed = written.slice(0, rest - sections).map((section, i) => add("design", `Design visuals for section ${i + 1}`, [style, section]));
  const review = add("review", "Review the draft", written);
  const needed = new Set(tasks.flatMap((t) => t.dependsOn));
  const open = tasks.map((t) => t.id).filter((t) => !needed.has(t));
  add("assemble", "Assemble the final piece", [review, ...designed, ...open]);
  return tasks;
}

/** Apply the `breakPlan` input: the corruptions a model's plan can have. */
function breakPlan(tasks: Task[], how: State["breakPlan"]): Task[] {
  if (how === undefined) return tasks;
  const first = tasks[0]!;
  const last = tasks[tasks.length - 1]!;
  if (how === "cycle") return tasks.map((t) => (t === first ? { ...t, dependsOn: [last.id] } : t));
  const middle = tasks[Math.floor(tasks.length / 2)]!;
  return tasks.map((t) => (t === middle ? { ...t, dependsOn: [...t.dependsOn, id(tasks.length + 4)] } : t));
}

const named = (t: Task) => `${t.id} "${t.title}"`;

/**
 * Throw unless the plan can run to the end: unique ids, every dependency a task of the plan, and no
 * cycle (a task in a cycle would never become ready, and the loop would never finish).
 */
function checkPlan(tasks: Task[]): void {
  const byId = new Map<string, Task>();
  const duplicates = new Set<string>();
  for (const t of tasks) {
    if (byId.has(t.id)) duplicates.add(t.id);
    byId.set(t.id, t);
  }
  if (duplicates.size) throw new Error(`The plan is invalid: task id(s) ${[...duplicates].join(", ")} are used more than once.`);
  const missing = tasks.flatMap((t) => t.dependsOn.filter((d) => !byId.has(d)).map((d) => `${named(t)} depends on ${d}`));
  if (missing.length) {
    throw new Error(`The plan is invalid: it refers to tasks it does not contain: ${missing.join("; ")}. Its tasks are ${tasks.map((t) => t.id).join(", ")}.`);
  }
  // Depth-first search; a dependency met again while still on the path closes a cycle.
  const state = new Map<string, "open" | "closed">();
  const path: Task[] = [];
  const visit = (t: Task): Task[] | undefined => {
    if (state.get(t.id) === "closed") return undefined;
    if (state.get(t.id) === "open") return [...path.slice(path.indexOf(t)), t];
    state.set(t.id, "open");
    path.push(t);
    for (const d of t.dependsOn) {
      const cycle = visit(byId.get(d)!);
      if (cycle) return cycle;
    }
    path.pop();
    state.set(t.id, "closed");
    return undefined;
  };
  for (const t of tasks) {
    const cycle = visit(t);
    if (cycle) {
      throw new Error(
        `The plan is invalid: its dependencies form a cycle, so these tasks could never start: ${cycle.map(named).join(" → depends on ")}.`,
      );
    }
  }
}

/** Tasks not done whose dependencies are all done, in plan order. */
function readyTasks(tasks: readonly Task[], done: Record<string, unknown>): Task[] {
  return tasks.filter((t) => !(t.id in done) && t.dependsOn.every((d) => d in done));
}

function traceFile(outDir: string, thread: string): string {
  return join(outDir, thread, "trace.log");
}

/** One trace line, appended synchronously so a process killed mid-task has logged its start. */
function trace(file: string, event: "start" | "end", task: string, wave: number): void {
  mkdirSync(dirname(file), { recursive: true });
  appendFileSync(file, `${new Date().toISOString()} ${process.pid} ${event} ${task} wave=${wave}\n`);
}

function renderReport(s: State, summary: string): string {
  const results = s.tasks.map((t) => ({ task: t, result: s.done[t.id]! }));
  results.sort((a, b) => a.result.wave - b.result.wave || a.task.id.localeCompare(b.task.id));
  const row = (cells: string[]) => `| ${cells.join(" | ")} |`;
  return [
    `# Plan report`,
    ``,
    `Brief: ${s.brief}`,
    ``,
    `${s.tasks.length} tasks in ${s.waves} waves (seed ${s.seed}).`,
    ``,
    `## Summary`,
    ``,
    summary,
    ``,
    `## Plan`,
    ``,
    s.overview ?? "",
    ``,
    row(["wave", "task", "kind", "title", "depends on"]),
    row(["---", "---", "---", "---", "---"]),
    ...results.map(({ task, result }) => row([String(result.wave), task.id, task.kind, task.title, task.dependsOn.join(", ") || "—"])),
    ``,
    `## Outputs`,
    ``,
    ...results.flatMap(({ task, result }) => [`### ${task.id} ${task.title}`, ``, result.output, ``]),
  ].join("\n");
}

export default workflow("planner", {
  state: State,
  defaultInput: { brief: "a three-minute animated explainer on how tides work, calm and curious, for museum visitors" },
  version: "1",
  pricing: EXAMPLE_PRICING,
})
  .step("plan", async (s, ctx) => {
    const overview = await ask(s, ctx.signal, "You plan content production as a graph of tasks.", `Plan the work for this brief: ${s.brief} [sentences:3]`);
    const tasks = breakPlan(derivePlan(s.brief, s.seed), s.breakPlan);
    checkPlan(tasks);
    const first = readyTasks(tasks, {});
    ctx.log(`${tasks.length} tasks; wave 1: ${first.length} ready (${first.map((t) => t.id).join(" ")})`);
    return { overview, tasks };
  })
  .map("execute", {
    over: (s) =>
      readyTasks(s.tasks, s.done).map((task) => ({
        task,
        wave: s.waves + 1,
        inputs: task.dependsOn.map((d) => ({ id: d, title: s.tasks.find((t) => t.id === d)!.title, output: s.done[d]!.output })),
        brief: s.brief,
        seed: s.seed,
        delayMs: s.delayMs,
        outDir: s.outDir,
      })),
    run: async ({ task, wave, inputs, brief, seed, delayMs, outDir }, ctx) => {
      const file = traceFile(outDir, ctx.thread);
      trace(file, "start", task.id, wave);
      const context = inputs.map((i) => `- ${i.id} ${i.title}: ${i.output}`).join("\n") || "(none: this task starts from the brief)";
      const sentences = task.kind === "assemble" ? 4 : 2;
      const output = await ask(
        { seed, delayMs },
        ctx.signal,
        `You carry out one ${task.kind} task of a production plan.`,
        `Brief: ${brief}\nTask ${task.id}: ${task.title}\nResults it builds on:\n${context}\n[sentences:${sentences}]`,
      );
      trace(file, "end", task.id, wave);
      return { id: task.id, wave, output };
    },
    into: "wave",
    concurrency: CONCURRENCY,
  })
  .step("record", (s, ctx) => {
    const done = { ...s.done };
    for (const r of s.wave) done[r.id] = r;
    const waves = s.waves + 1;
    const finished = Object.keys(done).length;
    const next = readyTasks(s.tasks, done);
    if (s.wave.length === 0 && finished < s.tasks.length) {
      // checkPlan rules this out; without it the loop back to execute would never end.
      throw new Error(`No task was ready in wave ${waves} although ${s.tasks.length - finished} remain; the plan cannot progress.`);
    }
    ctx.progress(finished, s.tasks.length, `tasks done after wave ${waves}`);
    const ran = s.wave.map((r) => r.id).join(" ");
    const then = next.length ? `; wave ${waves + 1}: ${next.length} ready (${next.map((t) => t.id).join(" ")})` : "";
    ctx.log(`wave ${waves}: ran ${ran}; ${finished}/${s.tasks.length} tasks done${then}`);
    return { done, waves };
  })
  .step("summarize", async (s, ctx) => {
    // The plan's end results: the tasks nothing else builds on.
    const needed = new Set(s.tasks.flatMap((t) => t.dependsOn));
    const results = s.tasks.filter((t) => !needed.has(t.id)).map((t) => `${t.title}: ${s.done[t.id]!.output}`);
    const summary = await ask(s, ctx.signal, "You summarise finished production work.", `Brief: ${s.brief}\nResults:\n${results.join("\n")}\n[sentences:3]`);
    const path = join(s.outDir, ctx.thread, "report.md");
    mkdirSync(dirname(path), { recursive: true });
    writeFileSync(path, renderReport(s, summary));
    ctx.log(`wrote ${path}`);
    return { report: { path, tasks: s.tasks.length, waves: s.waves } };
  })
  .route("record", (s) => (Object.keys(s.done).length < s.tasks.length ? "execute" : "summarize"), { targets: ["execute", "summarize"] });
