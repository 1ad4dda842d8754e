import { existsSync, readFileSync, rmSync, statSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FileCheckpointSaver, isCairnError, run, type RunEvent } from "cairn";
import planner, { CONCURRENCY } from "../graphs/planner.ts";
import { seededRandom } from "../graphs/lib/random.ts";
import { cairn, removeWorkdirs, spawnCairn, workdir } from "./helpers/cli.ts";

/**
 * The planner example: a plan of tasks with dependencies, executed wave by wave with independent tasks in
 * parallel. Checked through the `cairn` binary and the public API: the plan is a DAG, tasks start only
 * after their dependencies ended and run side by side up to the concurrency limit, the report lists every
 * task, a bad plan fails naming its tasks, SIGKILL + resume ends in the uninterrupted report rerunning
 * only tasks in flight, and a restart from `summarize` runs nothing else.
 */

const GRAPH = "graphs/planner.ts";
const KILL_SEED = 0x91a7;
/** Threads killed in the kill test; odd ones have their first resume killed too. */
const KILLED_THREADS = 4;

interface Task {
  id: string;
  title: string;
  kind: string;
  dependsOn: string[];
}
interface TaskResult {
  id: string;
  wave: number;
  output: string;
}
interface Final {
  overview: string;
  tasks: Task[];
  wave: TaskResult[];
  done: Record<string, TaskResult>;
  waves: number;
  report: { path: string; tasks: number; waves: number };
}

/** Problems that keep a plan from being a DAG over its own tasks; empty when it is one. */
function dagProblems(tasks: Task[]): string[] {
  const ids = new Set(tasks.map((t) => t.id));
  const problems: string[] = [];
  if (ids.size !== tasks.length) problems.push("duplicate ids");
  for (const t of tasks) for (const d of t.dependsOn) if (!ids.has(d)) problems.push(`${t.id} depends on unknown ${d}`);
  // Kahn: repeatedly remove tasks whose dependencies are all removed; what is left sits on a cycle.
  const left = new Map(tasks.map((t) => [t.id, t]));
  let removed = true;
  while (removed) {
    removed = false;
    for (const [id, t] of left) {
      if (t.dependsOn.every((d) => !left.has(d))) {
        left.delete(id);
        removed = true;
      }
    }
  }
  if (left.size) problems.push(`cycle among ${[...left.keys()].join(", ")}`);
  return problems;
}

/** The wave each task belongs in: 1 for tasks without dependencies, else one after its latest dependency. */
function expectedWaves(tasks: Task[]): Record<string, number> {
  const waves: Record<string, number> = {};
  const byId = new Map(tasks.map((t) => [t.id, t]));
  const waveOf = (id: string): number => (waves[id] ??= 1 + Math.max(0, ...byId.get(id)!.dependsOn.map(waveOf)));
  for (const t of tasks) waveOf(t.id);
  return waves;
}

interface TraceLine {
  at: number;
  pid: number;
  event: "start" | "end";
  task: string;
}

function readTrace(file: string): TraceLine[] {
  if (!existsSync(file)) return [];
  return readFileSync(file, "utf8")
    .split("\n")
    .filter((l) => l !== "")
    .map((l) => {
      const [iso, pid, event, task] = l.split(" ");
      return { at: Date.parse(iso!), pid: Number(pid), event: event as TraceLine["event"], task: task! };
    });
}

/** Starts of a task that came before some dependency had ended: each one a violation. */
function orderViolations(tasks: Task[], trace: TraceLine[]): string[] {
  const out: string[] = [];
  for (const start of trace.filter((l) => l.event === "start")) {
    const task = tasks.find((t) => t.id === start.task)!;
    for (const d of task.dependsOn) {
      if (!trace.some((l) => l.event === "end" && l.task === d && l.at <= start.at)) out.push(`${task.id} started before its dependency ${d} ended`);
    }
  }
  return out;
}

/** The most tasks running at one moment, from start/end pairs of one process (an end counts before a start at the same ms). */
function maxInFlight(trace: TraceLine[]): number {
  const events = trace.map((l) => ({ at: l.at, delta: l.event === "start" ? 1 : -1 })).sort((a, b) => a.at - b.at || a.delta - b.delta);
  let now = 0;
  let max = 0;
  for (const e of events) max = Math.max(max, (now += e.delta));
  return max;
}

/** Pairs of tasks whose runs overlapped in time. */
function overlaps(trace: TraceLine[]): [string, string][] {
  const spans = trace
    .filter((l) => l.event === "start")
    .map((s) => ({ task: s.task, start: s.at, end: trace.find((e) => e.event === "end" && e.task === s.task && e.pid === s.pid)!.at }));
  const out: [string, string][] = [];
  for (const [i, a] of spans.entries()) for (const b of spans.slice(i + 1)) if (a.start < b.end && b.start < a.end) out.push([a.task, b.task]);
  return out;
}

/**
 * The task results a resume will not produce again: every `{ id, wave, output }` in the thread's latest
 * checkpoint or in the task writes saved against it (a finished item of a wave that was cut short).
 * Read through LangGraph's saver interface and found by the example's own result shape, not by cairn's
 * channel names. Undefined when the thread has no checkpoint yet. (`savedWork` would do, but it hides a looping fan-out's saved items once the fan-out has
 * finished once; see docs/examples/planner.md.)
 */
async function committedTasks(storeDir: string, thread: string, ids: Set<string>): Promise<Set<string> | undefined> {
  const saver = new FileCheckpointSaver({ dir: storeDir, stepFiles: false });
  try {
    const tuple = await saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } });
    if (!tuple) return undefined;
    const found = new Set<string>();
    const walk = (value: unknown): void => {
      if (Array.isArray(value)) return value.forEach(walk);
      if (typeof value !== "object" || value === null) return;
      const o = value as Record<string, unknown>;
      const keys = Object.keys(o).sort().join(",");
      if (keys === "id,output,wave" && typeof o.id === "string" && ids.has(o.id) && typeof o.output === "string") found.add(o.id);
      else Object.values(o).forEach(walk);
    };
    walk(tuple.checkpoint.channel_values);
    walk((tuple.pendingWrites ?? []).map(([, , value]) => value));
    return found;
  } finally {
    await saver.close();
  }
}

interface Proc {
  pid: number;
  code: number;
  killed: boolean;
  stdout: string;
  stderr: string;
  /** From spawn to its first task start, when it started one. */
  firstStartMs?: number;
}

/** When to SIGKILL a child: `ms` after spawn, `ms` after its `start`-th task start, or once `holds()` does. */
type KillPlan = ({ ms: number } & ({ from: "spawn" } | { from: "start"; start: number })) | { from: "condition"; holds: () => Promise<boolean> };

/**
 * Run the binary and SIGKILL it as planned if it is still running. Task starts are timed by watching the
 * trace file every 2 ms: kills aimed at tasks land inside a wave whatever the machine's startup time.
 */
async function runKilled(dir: string, args: string[], trace: string, kill?: KillPlan): Promise<Proc> {
  const offset = existsSync(trace) ? statSync(trace).size : 0;
  const started = performance.now();
  const { child, done } = spawnCairn(dir, args);
  let timer: NodeJS.Timeout | undefined;
  let firstStartMs: number | undefined;
  const arm = (ms: number) => (timer ??= setTimeout(() => child.kill("SIGKILL"), ms));
  if (kill?.from === "spawn") arm(kill.ms);
  let checking = false;
  const check = async (holds: () => Promise<boolean>) => {
    checking = true;
    try {
      if (await holds()) arm(0);
    } finally {
      checking = false;
    }
  };
  const watch = setInterval(() => {
    if (kill?.from === "condition" && !checking && timer === undefined) void check(kill.holds);
    if (!existsSync(trace) || statSync(trace).size <= offset) return;
    const starts = readFileSync(trace, "utf8").slice(offset).split("\n").filter((l) => l.split(" ")[2] === "start").length;
    if (starts > 0) firstStartMs ??= performance.now() - started;
    if (kill?.from === "start" && starts >= kill.start) arm(kill.ms);
  }, 2);
  const result = await done;
  clearInterval(watch);
  clearTimeout(timer);
  return { pid: child.pid!, code: result.code, killed: result.signal === "SIGKILL", stdout: result.stdout, stderr: result.stderr, firstStartMs };
}

afterAll(removeWorkdirs);

describe("planner example", () => {
  let dir = "";
  let reference: Final;
  let referenceReport = "";
  /** From the reference run's spawn to its first task start, and from there to its last task end. */
  let startupMs = 0;
  let spanMs = 0;
  let delayMs = 0;

  it("plans a DAG, runs each task after its dependencies, independent ones side by side, and reports every task", async () => {
    dir = await workdir("cairn-planner-");
    const trace = join(dir, "out/planner/ref/trace.log");
    const proc = await runKilled(dir, ["run", GRAPH, "--thread", "ref", "--json"], trace);
    expect(proc.code, proc.stderr).toBe(0);
    reference = JSON.parse(proc.stdout) as Final;
    const { tasks, done } = reference;

    expect(tasks.length).toBeGreaterThanOrEqual(10);
    expect(tasks.length).toBeLessThanOrEqual(15);
    expect(dagProblems(tasks)).toEqual([]);
    // Every task ran in the first wave where all its dependencies were done: the waves are the DAG's layers.
    const waves = expectedWaves(tasks);
    expect(Object.fromEntries(Object.values(done).map((r) => [r.id, r.wave]))).toEqual(waves);
    expect(reference.waves).toBe(Math.max(...Object.values(waves)));

    const lines = readTrace(trace);
    for (const t of tasks) expect(lines.filter((l) => l.task === t.id).map((l) => l.event), t.id).toEqual(["start", "end"]);
    expect(orderViolations(tasks, lines)).toEqual([]);
    // The default plan has a wave wider than the limit: tasks overlap, never more than CONCURRENCY at once.
    expect(Math.max(...Object.values(waves).map((w) => Object.values(waves).filter((x) => x === w).length))).toBeGreaterThan(CONCURRENCY);
    expect(overlaps(lines).length).toBeGreaterThan(0);
    expect(maxInFlight(lines)).toBe(CONCURRENCY);

    referenceReport = readFileSync(join(dir, reference.report.path), "utf8");
    for (const t of tasks) expect(referenceReport).toContain(`| ${t.id} | ${t.kind} | ${t.title} |`);
    for (const t of tasks) expect(referenceReport).toContain(`### ${t.id} ${t.title}\n\n${done[t.id]!.output}`);
    // Progress: one line per wave with completed/total tasks, ending at all of them.
    const progress = [...proc.stderr.matchAll(/wave (\d+): ran [^;]+; (\d+)\/(\d+) tasks done/g)].map((m) => [Number(m[1]), Number(m[2]), Number(m[3])]);
    expect(progress.map(([w]) => w)).toEqual(Array.from({ length: reference.waves }, (_, i) => i + 1));
    expect(progress.at(-1)).toEqual([reference.waves, tasks.length, tasks.length]);

    startupMs = proc.firstStartMs!;
    spanMs = lines.at(-1)!.at - lines[0]!.at;
    delayMs = (planner.parseInput(planner.defaultInput) as { delayMs: number }).delayMs;
  });

  it("gives every brief and seed a valid plan, the same one each time, and reports completed/total after each wave", async () => {
    const root = await mkdtemp(join(tmpdir(), "cairn-planner-api-"));
    try {
      const inputs = [1, 2, 3, 6, 9].map((seed, i) => ({ seed, brief: i % 2 ? "a podcast episode about night trains" : "a children's picture book about a lost kite" }));
      for (const input of inputs) {
        const progress: [number, number | undefined][] = [];
        const onEvent = (e: RunEvent) => {
          if (e.type === "progress" && e.step === "record") progress.push([e.done, e.total]);
        };
        const options = { input: { ...input, delayMs: 0, outDir: join(root, "out") }, store: `file:${join(root, "store")}` };
        const first = await run(planner, { ...options, thread: `seed-${input.seed}`, onEvent });
        const { tasks, done } = first.state;
        expect(tasks.length, `seed ${input.seed}`).toBeGreaterThanOrEqual(10);
        expect(tasks.length).toBeLessThanOrEqual(15);
        expect(dagProblems(tasks), `seed ${input.seed}`).toEqual([]);
        expect(Object.keys(done).sort()).toEqual(tasks.map((t) => t.id).sort());
        expect(progress.map(([, total]) => total)).toEqual(progress.map(() => tasks.length));
        expect(progress.map(([n]) => n)).toEqual([...progress.map(([n]) => n)].sort((a, b) => a - b));
        expect(progress.at(-1)).toEqual([tasks.length, tasks.length]);
        const again = await run(planner, { ...options, thread: `seed-${input.seed}-again` });
        expect(again.state.tasks).toEqual(tasks);
        expect(again.state.done).toEqual(done);
      }
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });

  it("fails on a plan with a cycle, naming the tasks in it, before any task runs", async () => {
    const r = await cairn(dir, ["run", GRAPH, "--thread", "cycle", "--input", '{"breakPlan":"cycle"}']);
    expect(r.code).toBe(1);
    const last = reference.tasks.at(-1)!;
    const cycle = /its dependencies form a cycle, so these tasks could never start: (.*)\./.exec(r.stderr)?.[1];
    expect(cycle, r.stderr).toBeDefined();
    const named = cycle!.split(" → depends on ");
    // t01 was made to depend on the final task, which depends (through the plan) on t01.
    expect(named[0]).toBe(`t01 "${reference.tasks[0]!.title}"`);
    expect(named.at(-1)).toBe(named[0]);
    expect(named[1]).toBe(`${last.id} "${last.title}"`);
    expect(r.stderr).toContain('Step "plan" failed');
    expect(existsSync(join(dir, "out/planner/cycle/trace.log"))).toBe(false);
  });

  it("fails on a plan that depends on a task it does not contain, naming both", async () => {
    const root = await mkdtemp(join(tmpdir(), "cairn-planner-bad-"));
    try {
      const input = { breakPlan: "unknown-dependency", outDir: join(root, "out"), delayMs: 0 } as const;
      const error = await run(planner, { input, thread: "unknown", store: `file:${join(root, "store")}` }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(isCairnError(error, "STEP_FAILED")).toBe(true);
      const middle = reference.tasks[Math.floor(reference.tasks.length / 2)]!;
      const missing = `t${String(reference.tasks.length + 4).padStart(2, "0")}`;
      expect((error as Error).message).toContain(`it refers to tasks it does not contain: ${middle.id} "${middle.title}" depends on ${missing}.`);
      expect(existsSync(join(root, "out"))).toBe(false);
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });

  it("after SIGKILL at seeded moments and resume, ends with the uninterrupted report, rerunning only tasks in flight", async () => {
    const random = seededRandom(KILL_SEED);
    const ids = new Set(reference.tasks.map((t) => t.id));
    const waves = expectedWaves(reference.tasks);
    const waveSizes = Object.values(waves).reduce<number[]>((sizes, w) => ((sizes[w - 1] = (sizes[w - 1] ?? 0) + 1), sizes), []);
    const partlySaved = (saved: Set<string> | undefined) =>
      waveSizes.some((size, i) => {
        const n = [...(saved ?? [])].filter((id) => waves[id] === i + 1).length;
        return n > 0 && n < size;
      });
    /**
     * Whether a wave has tasks saved while another of its tasks started under half a model call ago: a
     * kill now cuts the wave short (one whose last task is about to end might be saved before the kill).
     */
    const waveCutShort = async (thread: string, trace: string): Promise<boolean> => {
      const saved = await committedTasks(join(dir, ".cairn"), thread, ids);
      if (!saved) return false;
      const lines = readTrace(trace);
      const now = Date.now();
      const running = (id: string) =>
        lines.some((l) => l.task === id && l.event === "start" && now - l.at < delayMs / 2) && !lines.some((l) => l.task === id && l.event === "end");
      return waveSizes.some((_, i) => {
        const wave = reference.tasks.filter((t) => waves[t.id] === i + 1).map((t) => t.id);
        return wave.some((id) => saved.has(id)) && wave.some((id) => !saved.has(id) && running(id));
      });
    };
    /** Kills that found a wave partly saved: its finished tasks must not run again. */
    let partial = 0;
    const failures: string[] = [];
    let kills = 0;
    let reruns = 0;
    const histories: string[] = [];
    // Thread 0 is killed during startup or the plan step; thread 1 as soon as the store holds part of a
    // wave while another task of it still runs; the rest up to 1.5 model calls after a random task
    // start, so kills land before, during and just after a wave's saves. Odd threads' first resume is
    // killed too. Drawn up front, so the schedule does not depend on which thread finishes first.
    const atTask = (tasks: number): KillPlan => ({ from: "start", start: 1 + Math.floor(random() * tasks), ms: random() * delayMs * 1.5 });
    const schedule = Array.from({ length: KILLED_THREADS }, (_, n) => {
      const thread = `kill-${n}`;
      const trace = join(dir, `out/planner/${thread}/trace.log`);
      const first: KillPlan =
        n === 0 ? { from: "spawn", ms: startupMs * (0.5 + 0.4 * random()) } : n === 1 ? { from: "condition", holds: () => waveCutShort(thread, trace) } : atTask(reference.tasks.length);
      return { thread, trace, plans: [first, n % 2 === 1 ? atTask(3) : undefined] };
    });

    const killThread = async ({ thread, trace, plans }: (typeof schedule)[number]) => {
      const procs: Proc[] = [];
      /** For each killed process, the tasks the store held at its kill (undefined: no thread yet). */
      const committed = new Map<number, Set<string> | undefined>();
      let exists = false;
      for (let attempt = 0; attempt < 4; attempt += 1) {
        // A kill before the input checkpoint was written leaves no thread: start it again.
        const args = [exists ? "resume" : "run", GRAPH, "--thread", thread, "--json"];
        const proc = await runKilled(dir, args, trace, plans[attempt]);
        procs.push(proc);
        if (!proc.killed) break;
        kills += 1;
        const saved = await committedTasks(join(dir, ".cairn"), thread, ids);
        committed.set(proc.pid, saved);
        if (partlySaved(saved)) partial += 1;
        exists = saved !== undefined;
      }
      const last = procs.at(-1)!;
      const startsIn = (p: Proc) => readTrace(trace).filter((l) => l.pid === p.pid && l.event === "start").map((l) => l.task).join(" ");
      const history = procs.map((p) => (p.killed ? `[${startsIn(p)}] killed, saved: ${committed.get(p.pid) ? [...committed.get(p.pid)!].sort().join(" ") : "no thread"}` : `[${startsIn(p)}] exit ${p.code}`)).join(" → ");
      histories.push(`${thread}: ${history}`);
      if (last.code !== 0 || last.killed) {
        failures.push(`${thread}: no process completed: ${history}\n${last.stderr}`);
        return;
      }
      const final = JSON.parse(last.stdout) as Final;
      for (const field of ["overview", "tasks", "done", "waves"] as const) {
        if (JSON.stringify(final[field]) !== JSON.stringify(reference[field])) failures.push(`${thread}: ${field} differs from the uninterrupted run (${history})`);
      }
      if (readFileSync(join(dir, final.report.path), "utf8") !== referenceReport) failures.push(`${thread}: report.md differs from the uninterrupted run`);

      const lines = readTrace(trace);
      failures.push(...orderViolations(reference.tasks, lines).map((v) => `${thread}: ${v}`));
      const order = procs.map((p) => p.pid);
      for (const t of reference.tasks) {
        const runs = lines.filter((l) => l.task === t.id && l.event === "start").map((l) => order.indexOf(l.pid));
        if (!lines.some((l) => l.task === t.id && l.event === "end")) failures.push(`${thread}: ${t.id} never finished`);
        if (new Set(runs).size !== runs.length) failures.push(`${thread}: ${t.id} started twice in one process`);
        for (const [i, p] of runs.slice(1).entries()) {
          // Between its previous start and this one, every kill must have found it not yet saved.
          const saved = procs.slice(runs[i]!, p).find((q) => committed.get(q.pid)?.has(t.id));
          if (saved) failures.push(`${thread}: ${t.id} ran again in process ${p + 1} although it was saved when process ${order.indexOf(saved.pid) + 1} was killed (${history})`);
          reruns += 1;
        }
      }
    };
    const began = performance.now();
    // Two threads at a time, one per core; kills are timed from each child's own task starts.
    const lanes = [schedule.filter((_, n) => n % 2 === 0), schedule.filter((_, n) => n % 2 === 1)];
    await Promise.all(lanes.map(async (lane) => {
      for (const entry of lane) await killThread(entry);
    }));
    console.log(
      `planner kill test: seed ${KILL_SEED}, ${KILLED_THREADS} threads, ${kills} kills (${partial} with a wave partly saved), ${reruns} tasks rerun (in flight at a kill), ` +
        `reference: first task ${Math.round(startupMs)} ms after spawn, tasks span ${Math.round(spanMs)} ms; ${((performance.now() - began) / 1000).toFixed(1)} s`,
    );
    if (process.env.PLANNER_VERBOSE) console.log(histories.sort().join("\n"));
    expect(failures).toEqual([]);
    expect(kills).toBeGreaterThanOrEqual(KILLED_THREADS);
    expect(partial).toBeGreaterThanOrEqual(1);
  }, 240_000);

  it("reruns only the summary with --from-step summarize", async () => {
    const trace = join(dir, "out/planner/ref/trace.log");
    const traceBefore = readFileSync(trace, "utf8");
    const report = join(dir, reference.report.path);
    rmSync(report);
    const r = await cairn(dir, ["resume", GRAPH, "--thread", "ref", "--from-step", "summarize", "--json"]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain("↺ restarting from summarize");
    expect(r.stderr.match(/^✓ \S+/gm)).toEqual(["✓ summarize"]);
    expect(readFileSync(trace, "utf8")).toBe(traceBefore);
    expect(readFileSync(report, "utf8")).toBe(referenceReport);
    expect(JSON.parse(r.stdout)).toEqual(reference);
  });
});
