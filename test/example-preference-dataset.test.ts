import type { ChildProcess } from "node:child_process";
import { closeSync, existsSync, openSync, readFileSync, readSync, statSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FileCheckpointSaver, savedWork } from "cairn";
import { seededRandom } from "../graphs/lib/random.ts";
import { CONCURRENCY } from "../graphs/preference-dataset.ts";
import { cairn, removeWorkdirs, spawnCairn, workdir } from "./helpers/cli.ts";

/**
 * The preference-dataset example through the `cairn` binary: 1,000 pair jobs, 16 at a time, each pair
 * appended to a JSONL dataset. The dataset must hold every pair exactly once, byte for byte what an
 * uninterrupted run writes, after SIGKILLs at seeded random moments of the pairs step, after Ctrl+C, and
 * after a run whose jobs failed for good. PAIRS_KILL_SEED replays a kill schedule.
 *
 * The graph's trace (PREFERENCE_TRACE) has one line per job execution: `<pid> <id> run` before the model
 * calls, `skip` when the pair was already in the file, then `wrote` or `refused`.
 */

const GRAPH = "graphs/preference-dataset.ts";
const JOBS = 1000;
const KILLS = 6;
const SEED = Number(process.env.PAIRS_KILL_SEED ?? 0x9a1b5);

interface Result {
  id: string;
  ok: boolean;
  attempts: number;
  durationMs: number;
  reused: boolean;
}
interface FinalState {
  dataset: string;
  results: Result[];
  stats: { jobs: number; succeeded: number; failed: number; retried: number; reused: number; datasetLines: number };
  jobDurationsMs: { timed: number; min: number; median: number; p95: number; max: number; mean: number };
  failures: { id: string; reason: string }[];
}
interface TraceLine {
  pid: number;
  id: string;
  what: "run" | "skip" | "wrote" | "refused";
}

let dir: string;
/** The uninterrupted run, set by the first test: its final state and its dataset, line by id. The others compare with it. */
let reference: { state: FinalState; lines: Map<string, string> };

beforeAll(async () => {
  dir = await workdir("cairn-pairs-");
});
afterAll(removeWorkdirs);

function traceOf(file: string): TraceLine[] {
  if (!existsSync(file)) return [];
  return readFileSync(file, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => {
      const [pid, id, what] = l.split(" ");
      return { pid: Number(pid), id: id!, what: what as TraceLine["what"] };
    });
}

/** The dataset as written: every line must parse and every id appear once. */
function readDataset(thread: string): Map<string, string> {
  const text = readFileSync(join(dir, "out", "preference-dataset", thread, "dataset.jsonl"), "utf8");
  expect(text.endsWith("\n")).toBe(true);
  const lines = new Map<string, string>();
  for (const line of text.slice(0, -1).split("\n")) {
    const pair = JSON.parse(line) as Record<string, unknown>;
    expect(Object.keys(pair)).toEqual(["id", "subtopic", "prompt", "chosen", "rejected"]);
    const id = pair.id as string;
    expect(lines.has(id), `${id} twice in the dataset of ${thread}`).toBe(false);
    lines.set(id, line);
  }
  return lines;
}

/** Dataset equal to the uninterrupted run's: the same ids, each line identical. */
function expectReferenceDataset(lines: Map<string, string>): void {
  expect([...lines.keys()].sort()).toEqual([...reference.lines.keys()].sort());
  const differing = [...lines].filter(([id, line]) => reference.lines.get(id) !== line).map(([id]) => id);
  expect(differing).toEqual([]);
}

/** The final state's statistics agree with the dataset and the job results. */
function expectConsistentStats(state: FinalState, lines: Map<string, string>): void {
  expect(state.stats.jobs).toBe(JOBS);
  expect(state.stats.succeeded).toBe(lines.size);
  expect(state.stats.datasetLines).toBe(lines.size);
  expect(state.stats.succeeded + state.stats.failed).toBe(JOBS);
  expect(new Set(state.results.filter((r) => r.ok).map((r) => r.id))).toEqual(new Set(lines.keys()));
  expect(state.stats.reused).toBe(state.results.filter((r) => r.reused).length);
}

/** The ids of the pair jobs a thread's store holds as saved, as a resume will find them. */
async function savedJobs(thread: string): Promise<Set<string>> {
  const saver = new FileCheckpointSaver({ dir: join(dir, ".cairn"), stepFiles: false });
  try {
    const work = await savedWork(saver, thread);
    // Item i of the fan-out is the i-th prompt, as in the reference run's results.
    const ids = reference.state.results.map((r) => r.id);
    return new Set(work.steps.includes("pairs") ? ids : (work.items.pairs ?? []).map((i) => ids[i]!));
  } finally {
    await saver.close();
  }
}

/** Signal the child once it has written `count` new pairs (its `wrote` lines); resolves whether it was signalled. */
function signalAfter(child: ChildProcess, trace: string, count: number, signal: NodeJS.Signals): Promise<boolean> {
  return new Promise((resolve) => {
    let offset = 0;
    let seen = 0;
    const pid = `${child.pid} `;
    const wrote = / wrote$/;
    const timer = setInterval(() => {
      const size = existsSync(trace) ? statSync(trace).size : 0;
      if (size > offset) {
        const fd = openSync(trace, "r");
        const bytes = Buffer.alloc(size - offset);
        readSync(fd, bytes, 0, bytes.length, offset);
        closeSync(fd);
        const text = bytes.toString("utf8");
        const complete = text.lastIndexOf("\n") + 1;
        offset += Buffer.byteLength(text.slice(0, complete));
        seen += text.slice(0, complete).split("\n").filter((l) => l.startsWith(pid) && wrote.test(l)).length;
      }
      if (seen >= count) {
        clearInterval(timer);
        resolve(child.kill(signal));
      }
    }, 3);
    child.on("close", () => {
      clearInterval(timer);
      resolve(false);
    });
  });
}

describe("preference-dataset example", () => {
  it("writes 1,000 jobs' pairs once each and reports statistics at the end and in inspect", async () => {
    const trace = join(dir, "reference.trace");
    const r = await cairn(dir, ["run", GRAPH, "--thread", "reference", "--json"], { PREFERENCE_TRACE: trace });
    expect(r.code, r.stderr).toBe(0);
    const state = JSON.parse(r.stdout) as FinalState;
    const lines = readDataset("reference");
    reference = { state, lines };

    expectConsistentStats(state, lines);
    // The seeded stand-in failures happen: some refusals (failed), some rate limits (retried).
    expect(state.stats.failed).toBeGreaterThan(0);
    expect(state.stats.failed).toBeLessThan(30);
    expect(state.stats.retried).toBeGreaterThan(0);
    expect(state.stats.reused).toBe(0);
    expect(state.failures.map((f) => f.reason)).toEqual(Array(state.stats.failed).fill("the chosen answer is a refusal"));
    expect(state.jobDurationsMs.timed).toBe(JOBS);
    const d = state.jobDurationsMs;
    expect(d.min).toBeGreaterThanOrEqual(10); // two stand-in calls of 10 ms, run side by side
    expect([d.min <= d.median, d.median <= d.p95, d.p95 <= d.max]).toEqual([true, true, true]);
    for (const line of lines.values()) {
      const pair = JSON.parse(line) as Record<string, string>;
      expect(pair.chosen).not.toBe(pair.rejected);
      expect(pair.prompt).toMatch(/^Write a scene: /);
    }

    // One execution per job; only the rate-limited ones tried twice, in the same process.
    const t = traceOf(trace);
    const runs = new Map<string, number>();
    for (const l of t) if (l.what === "run") runs.set(l.id, (runs.get(l.id) ?? 0) + 1);
    expect(runs.size).toBe(JOBS);
    expect([...runs.values()].filter((n) => n === 2).length).toBe(state.stats.retried);
    expect(t.filter((l) => l.what === "wrote").length).toBe(state.stats.succeeded);
    expect(t.filter((l) => l.what === "skip")).toEqual([]);

    // The statistics at the end of the run, and in `cairn inspect`.
    const s = state.stats;
    expect(r.stderr).toContain(`· complete: 1000 jobs: ${s.succeeded} succeeded, ${s.failed} failed, ${s.retried} retried, 0 already in the dataset (not generated again)`);
    expect(r.stderr).toMatch(/· complete: job time \(1000 timed\): min \d+ms, median \d+ms, p95 \d+ms, max \d+ms, mean \d+ms/);
    expect(r.stderr).toContain(`· complete: out/preference-dataset/reference/dataset.jsonl: ${s.succeeded} pairs, each prompt id once`);
    const inspect = await cairn(dir, ["inspect", "reference"]);
    expect(inspect.code, inspect.stderr).toBe(0);
    expect(inspect.stdout).toMatch(new RegExp(`\\n  stats +${escape(JSON.stringify(s))}\\n`));
    expect(inspect.stdout).toMatch(new RegExp(`\\n  jobDurationsMs +${escape(JSON.stringify(d))}\\n`));
  }, 60_000);

  it(`keeps every pair exactly once through ${KILLS} SIGKILLs in the pairs step; only jobs in flight call the model again`, async () => {
    const trace = join(dir, "killed.trace");
    const random = seededRandom(SEED);
    const pids: number[] = [];
    const plans: number[] = [];
    /** Per kill: the ids of the pair jobs the store held as saved right after it. */
    const saved: Set<string>[] = [];
    for (let k = 0; k < KILLS; k += 1) {
      const args = k === 0 ? ["run", GRAPH, "--thread", "killed", "--json"] : ["resume", GRAPH, "--thread", "killed", "--json"];
      const { child, done } = spawnCairn(dir, args, { PREFERENCE_TRACE: trace });
      pids.push(child.pid!);
      // After 20–120 new pairs from this process: always while it generates pairs (6 × 120 < 1,000).
      const after = 20 + Math.floor(random() * 100);
      plans.push(after);
      const killed = await signalAfter(child, trace, after, "SIGKILL");
      const end = await done;
      expect(killed && end.signal === "SIGKILL", `process ${k} (seed ${SEED}) was not killed after ${after} new pairs: exit ${end.code}\n${end.stderr}`).toBe(true);
      saved.push(await savedJobs("killed"));
    }
    const final = spawnCairn(dir, ["resume", GRAPH, "--thread", "killed", "--json"], { PREFERENCE_TRACE: trace });
    pids.push(final.child.pid!);
    const r = await final.done;
    expect(r.code, r.stderr).toBe(0);
    const state = JSON.parse(r.stdout) as FinalState;
    const lines = readDataset("killed");
    expectReferenceDataset(lines);
    expectConsistentStats(state, lines);
    expect(state.stats.failed).toBe(reference.state.stats.failed);

    const t = traceOf(trace);
    const byProcess = pids.map((pid) => t.filter((l) => l.pid === pid));
    expect(byProcess.reduce((n, p) => n + p.length, 0), "trace lines from unknown processes").toBe(t.length);
    const report: string[] = [];
    let regenerated = 0;
    let reran = 0;
    for (let k = 0; k < KILLS; k += 1) {
      const mine = byProcess[k]!;
      const later = byProcess.slice(k + 1).flat();
      // cairn's guarantee: a job the store saved never runs again.
      expect(later.filter((l) => saved[k]!.has(l.id)), `process ${k}: saved jobs that ran again`).toEqual([]);
      const ended = new Set(mine.filter((l) => l.what !== "run").map((l) => l.id));
      const inFlight = new Set(mine.filter((l) => l.what === "run" && !ended.has(l.id)).map((l) => l.id));
      // The concurrency limit holds, so a kill catches at most that many jobs mid-generation.
      expect(inFlight.size, `process ${k}: jobs in flight at the kill`).toBeLessThanOrEqual(CONCURRENCY);
      // The dataset's guarantee: a job whose pair was written, saved or not, never calls the model again.
      const wrote = new Set(mine.filter((l) => l.what === "wrote").map((l) => l.id));
      expect(later.filter((l) => l.what === "run" && wrote.has(l.id)), `process ${k}: pairs generated again after they were written`).toEqual([]);
      const touched = new Set(mine.map((l) => l.id));
      const again = new Set(later.filter((l) => touched.has(l.id)).map((l) => l.id));
      const regen = new Set(later.filter((l) => l.what === "run" && inFlight.has(l.id)).map((l) => l.id));
      regenerated += regen.size;
      reran += again.size;
      report.push(`#${k} killed after ${plans[k]} new pairs: ${inFlight.size} in flight, ${ended.size - [...ended].filter((id) => saved[k]!.has(id)).length} finished but not yet saved; ${again.size} ran again, ${regen.size} of them calling the model`);
    }
    // Every job ended in the end; those reused from the file are the ones whose last execution was a skip.
    const last = new Map<string, TraceLine["what"]>();
    for (const l of t) if (l.what !== "run") last.set(l.id, l.what);
    expect(last.size).toBe(JOBS);
    expect(state.stats.reused).toBe([...last.values()].filter((w) => w === "skip").length);
    console.log(`preference-dataset kill test (seed ${SEED}): ${KILLS} kills; ${reran} jobs ran again, ${regenerated} of them called the model again (the others found their pair in the file)\n  ${report.join("\n  ")}`);
  }, 120_000);

  it("Ctrl+C drains the pairs step (exit 130); jobs that then fail for good fail the step with the rest saved; the resume after the fix runs only them", async () => {
    // Three jobs that succeed at once in the reference, late in the fan-out so the Ctrl+C comes before them.
    const plain = reference.state.results.filter((x) => x.ok && x.attempts === 1);
    const broken = [plain[700]!.id, plain[800]!.id, plain[900]!.id];
    const env = { PREFERENCE_TRACE: join(dir, "interrupted.trace"), PREFERENCE_FAIL_PROMPTS: broken.join(",") };
    const trace = () => traceOf(env.PREFERENCE_TRACE);

    const { child, done } = spawnCairn(dir, ["run", GRAPH, "--thread", "interrupted", "--json"], env);
    expect(await signalAfter(child, env.PREFERENCE_TRACE, 300, "SIGINT")).toBe(true);
    const stopped = await done;
    expect(stopped.code, stopped.stderr).toBe(130);
    expect(stopped.stderr).toContain("■ SIGINT: finishing the work in flight and saving it; nothing new starts.");
    expect(stopped.stderr).toMatch(/■ stopped before pairs \(\d+ items not started\)/);
    expect(stopped.stderr).toContain("Continue with: cairn resume graphs/preference-dataset.ts --thread interrupted");
    const first = trace();
    // Drained: every job that started finished, and its pair (if any) is in the file.
    const ended = new Set(first.filter((l) => l.what !== "run").map((l) => l.id));
    expect(first.filter((l) => l.what === "run" && !ended.has(l.id))).toEqual([]);
    expect(readDataset("interrupted").size).toBe(first.filter((l) => l.what === "wrote").length);
    expect(broken.filter((id) => ended.has(id))).toEqual([]);

    // The resume meets the broken jobs: the step fails once every other job has finished and is saved.
    const failed = await cairn(dir, ["resume", GRAPH, "--thread", "interrupted"], env);
    expect(failed.code, failed.stderr).toBe(1);
    for (const id of broken) expect(failed.stderr).toMatch(new RegExp(`✗ pairs\\[\\d+\\] failed after [\\d.]+m?s: the provider rejected the request for ${id} \\(400\\)`));
    expect(failed.stderr).toContain(`${JOBS - 3} tasks of this step finished and are saved; 3 failed. A resume reruns only the failed ones.`);
    expect(failed.stderr).toContain("Continue with: cairn resume graphs/preference-dataset.ts --thread interrupted");
    const second = trace().slice(first.length);
    // Everything finished before the stop was saved: nothing ran twice.
    expect(second.filter((l) => ended.has(l.id))).toEqual([]);
    expect(new Set([...ended, ...second.map((l) => l.id)]).size).toBe(JOBS);
    expect([...readDataset("interrupted").keys()].sort()).toEqual([...reference.lines.keys()].filter((id) => !broken.includes(id)).sort());

    // The cause fixed (the variable unset), the resume runs the three broken jobs and nothing else.
    const r = await cairn(dir, ["resume", GRAPH, "--thread", "interrupted", "--json"], { PREFERENCE_TRACE: env.PREFERENCE_TRACE });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain("· pairs: 997 of 1000 items already saved; running the other 3");
    const third = trace().slice(first.length + second.length);
    expect(third.map((l) => `${l.id} ${l.what}`).sort()).toEqual(broken.flatMap((id) => [`${id} run`, `${id} wrote`]).sort());
    const state = JSON.parse(r.stdout) as FinalState;
    const lines = readDataset("interrupted");
    expectReferenceDataset(lines);
    expectConsistentStats(state, lines);
    expect(state.stats.reused).toBe(0);
    // Their successful attempt is the second: the failed one is on record.
    expect(state.results.filter((x) => broken.includes(x.id)).map((x) => x.attempts)).toEqual([2, 2, 2]);
    expect(state.stats.retried).toBe(reference.state.stats.retried + 3);
  }, 90_000);
});

function escape(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
