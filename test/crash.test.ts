import { spawn } from "node:child_process";
import { appendFileSync, closeSync, openSync, readFileSync, readSync, statSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { isDeepStrictEqual } from "node:util";
import { describe, expect, it } from "vitest";
import { FileCheckpointSaver, savedWork } from "cairn";
import { seededRandom } from "../graphs/lib/random.ts";
import crashGraph, { FAN_OUT_STEP, FAN_OUT_WIDTH } from "./fixtures/crash-graph.ts";

/**
 * Crash test: SIGKILL `cairn run` and `cairn resume` at seeded random moments, resume until a resume
 * exits 0, and check that the thread ends in the state of an uninterrupted run and that no step or
 * fan-out item whose result was committed to the store ever ran again.
 *
 * CRASH_ITERATIONS (default 25) sets the least number of killed threads and CRASH_MIN_KILLS (default 30) the
 * least number of SIGKILLs that land (a thread's resumes are killed too, so most runs reach both with the
 * 25 threads; more threads are started until both hold); CRASH_SEED (default below) the PRNG
 * seed, printed with every failure so a run's kill schedule can be replayed (the interleaving itself
 * depends on the machine's timing). CRASH_VERBOSE=1 prints every thread's processes and execution log.
 */

const REPO = fileURLToPath(new URL("..", import.meta.url));
const BIN = join(REPO, "bin", "cairn.js");
const GRAPH = "test/fixtures/crash-graph.ts";
const ITERATIONS = Number(process.env.CRASH_ITERATIONS ?? 25);
const MIN_KILLS = Number(process.env.CRASH_MIN_KILLS ?? 30);
const SEED = Number(process.env.CRASH_SEED ?? 0x5eed_ca1);
/** Share of resumes that are killed too; after MAX_KILLED_RESUMES of one thread none is, so each thread ends. */
const RESUME_KILL_RATE = 0.3;
const MAX_KILLED_RESUMES = 3;
/** Processes per thread before it is reported as never completing. */
const MAX_ATTEMPTS = 10;
/** Share of kills aimed at the startup (opening the store, writing the input checkpoint) rather than the steps. */
const STARTUP_KILL_RATE = 0.1;

/** Every unit of work the execution log names: plain steps, and one key per fan-out item. */
const KEYS = crashGraph.steps.flatMap((step) =>
  step === FAN_OUT_STEP ? Array.from({ length: FAN_OUT_WIDTH }, (_, i) => `${step}#${i}`) : [step],
);


/** When to SIGKILL a child: some time after it was spawned, or after it logged its first step start. */
interface KillPlan {
  from: "spawn" | "first-step";
  ms: number;
}

interface Child {
  command: "run" | "resume";
  code: number | null;
  killed: boolean;
  /** The kill planned for it, if any (it may have exited first). */
  plan?: KillPlan;
  ms: number;
  /** When its first execution-log line appeared, since spawn. */
  firstStepMs?: number;
  /** When the SIGKILL was sent, since spawn. */
  killedAtMs?: number;
  /** Its execution-log lines, each with when the harness first saw it (since spawn, to within ~2 ms). */
  lines: { text: string; ms: number }[];
  stdout: string;
  stderr: string;
}

function describePlan(plan: KillPlan): string {
  return plan.from === "spawn" ? `${Math.round(plan.ms)} ms after spawn` : `${Math.round(plan.ms)} ms after its first step`;
}

/**
 * Run the cairn binary on the crash graph, SIGKILLing it as planned if it is still running. Startup (tsx,
 * imports) varies by hundreds of milliseconds, so kills aimed at the steps are timed from the child's
 * first line in the execution log, which is watched every 2 ms (also to time-stamp its lines).
 */
function cairn(command: "run" | "resume", thread: string, store: string, execLog: string, plan?: KillPlan): Promise<Child> {
  const args = [BIN, command, GRAPH, "--thread", thread, "--store", `file:${store}`, "--json"];
  let offset = statSync(execLog, { throwIfNoEntry: false })?.size ?? 0;
  const lines: Child["lines"] = [];
  let partial = "";
  const started = performance.now();
  /** Read what the child appended since the last look. */
  const poll = () => {
    const size = statSync(execLog).size;
    if (size <= offset) return;
    const fd = openSync(execLog, "r");
    try {
      const bytes = Buffer.alloc(size - offset);
      readSync(fd, bytes, 0, bytes.length, offset);
      offset = size;
      const parts = (partial + bytes.toString("utf8")).split("\n");
      partial = parts.pop()!;
      const ms = performance.now() - started;
      for (const text of parts) lines.push({ text, ms });
    } finally {
      closeSync(fd);
    }
  };
  const child = spawn(process.execPath, args, { cwd: REPO, env: { ...process.env, CRASH_EXEC_LOG: execLog }, stdio: ["ignore", "pipe", "pipe"] });
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  child.stdout.on("data", (b: Buffer) => out.push(b));
  child.stderr.on("data", (b: Buffer) => err.push(b));
  let killedAtMs: number | undefined;
  const kill = () => {
    if (child.exitCode === null && child.signalCode === null) killedAtMs = performance.now() - started;
    child.kill("SIGKILL");
  };
  let killTimer: NodeJS.Timeout | undefined;
  let firstStepMs: number | undefined;
  if (plan?.from === "spawn") killTimer = setTimeout(kill, plan.ms);
  const watch = setInterval(() => {
    poll();
    if (firstStepMs !== undefined || lines.length === 0) return;
    firstStepMs = lines[0]!.ms;
    if (plan?.from === "first-step") killTimer = setTimeout(kill, plan.ms);
  }, 2);
  return new Promise((resolve, reject) => {
    child.on("error", reject);
    child.on("close", (code, signal) => {
      clearInterval(watch);
      clearTimeout(killTimer);
      poll();
      resolve({
        command,
        code,
        killed: signal === "SIGKILL",
        plan,
        ms: performance.now() - started,
        firstStepMs,
        killedAtMs,
        lines,
        stdout: Buffer.concat(out).toString("utf8"),
        stderr: Buffer.concat(err).toString("utf8"),
      });
    });
  });
}

/**
 * The work the store holds as committed for a thread, as a resume will find it: steps recorded done in
 * the latest checkpoint or in task writes saved against it, and fan-out items gathered or saved. A
 * committed unit must never run again. Undefined when the thread has no checkpoint yet.
 */
async function committed(store: string, thread: string): Promise<Set<string> | undefined> {
  const saver = new FileCheckpointSaver({ dir: store, stepFiles: false });
  try {
    if (!(await saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } }))) return undefined;
    const saved = await savedWork(saver, thread);
    const done = new Set<string>();
    for (const step of saved.steps) {
      if (step === FAN_OUT_STEP) for (let i = 0; i < FAN_OUT_WIDTH; i += 1) done.add(`${step}#${i}`);
      else done.add(step);
    }
    for (const i of saved.items[FAN_OUT_STEP] ?? []) done.add(`${FAN_OUT_STEP}#${i}`);
    return done;
  } finally {
    await saver.close();
  }
}

function journalPath(store: string, thread: string): string {
  return join(new FileCheckpointSaver({ dir: store }).threadDir(thread), "journal.log");
}

/** Whether the journal ends in a partial record: the kill landed in the middle of a write. */
function tornTail(store: string, thread: string): boolean {
  try {
    const bytes = readFileSync(journalPath(store, thread));
    return bytes.length > 0 && bytes[bytes.length - 1] !== 0x0a;
  } catch {
    return false;
  }
}

/** The fields of a journal record that failure reports show. */
interface JournalLine {
  k?: string;
  id?: string;
  parent?: string | null;
  cp?: string;
  task?: string;
  path?: string;
  md?: { d?: { source?: string; cairn?: { step?: string; pid?: number } } };
  w?: { ch: string }[];
}

/**
 * The last records of a journal, one line each: the line's prefix (its checksum, and the framing the
 * store puts before the JSON), the record's kind and what it records (a checkpoint and the step that
 * wrote it, or a task's writes and their channels), for failure reports. A torn last line is shown as such.
 */
function journalTail(store: string, thread: string, count = 10): string {
  let text: string;
  try {
    text = readFileSync(journalPath(store, thread), "utf8");
  } catch (error) {
    return `    (no journal: ${(error as Error).message})`;
  }
  const lines = text.split("\n");
  const torn = lines.pop();
  const described = lines.slice(-count).map((line) => {
    const brace = line.indexOf("{");
    const crc = brace === -1 ? line.slice(0, 8) : line.slice(0, brace).trim();
    const json = brace === -1 ? "" : line.slice(brace);
    try {
      const r = JSON.parse(json) as JournalLine;
      const md = r.md?.d;
      if (r.k === "cp") return `${crc} cp ${r.id} parent ${r.parent} step ${md?.cairn?.step ?? md?.source} pid ${md?.cairn?.pid} (${line.length} bytes)`;
      if (r.k === "w") return `${crc} w on ${r.cp} task ${r.task} [${r.path}] → ${(r.w ?? []).map((w) => w.ch).join(",")} (${line.length} bytes)`;
      return `${crc} ${r.k} (${line.length} bytes)`;
    } catch {
      return `${crc} unparsable (${line.length} bytes): ${line.slice(0, 120)}`;
    }
  });
  if (torn) described.push(`torn tail: ${torn.length} bytes without a newline, starting ${torn.slice(0, 80)}`);
  return described.map((l) => `    ${l}`).join("\n");
}

interface Kill {
  /** Index of the killed process within the thread's attempts. */
  process: number;
  command: "run" | "resume";
  plan: KillPlan;
  torn: boolean;
  committed: Set<string> | undefined;
  /** The journal's last records right after the kill. */
  tail: string;
}

interface Verdict {
  violations: string[];
  extra: number;
  /** Reruns of a unit that had logged its end: the kill fell after its work, before its writes were saved. */
  finishedNotSaved: { key: string; kill: number }[];
  perKeyExtra: Map<string, number>;
}

/**
 * Check one thread's execution log against its kills. The log holds the fixture's start and end lines and
 * the harness's `# <command>` and `# kill <n>` markers, written while no child was running, so the
 * order is exact. A unit may run again only if a kill happened while it was in flight (started, result
 * not yet committed); once committed at a kill, it must never start again.
 */
function judge(log: string, kills: Kill[]): Verdict {
  const violations: string[] = [];
  const finishedNotSaved: Verdict["finishedNotSaved"] = [];
  /** The last kill (index into `kills`) that found the unit ended but not committed. */
  const endedUncommittedAt = new Map<string, number>();
  const starts = new Map<string, number>();
  const ends = new Map<string, number>();
  /** Kills since the unit's latest start at which it was not committed. */
  const inFlightKills = new Map<string, number>();
  const endedSinceStart = new Set<string>();
  /** Indexes (into `kills`) of the kills logged so far. */
  const seenKills: number[] = [];
  const lines = log.split("\n").filter((l) => l !== "");
  for (const [n, line] of lines.entries()) {
    if (line.startsWith("# kill ")) {
      const index = Number(line.slice("# kill ".length));
      const kill = kills[index]!;
      seenKills.push(index);
      for (const key of starts.keys()) {
        if (kill.committed?.has(key)) continue;
        inFlightKills.set(key, (inFlightKills.get(key) ?? 0) + 1);
        if (endedSinceStart.has(key)) endedUncommittedAt.set(key, index);
      }
      continue;
    }
    if (line.startsWith("#")) continue;
    const [key, end] = line.split(" ");
    if (!key || !KEYS.includes(key) || (end !== undefined && end !== "end")) {
      violations.push(`log line ${n + 1} is not a known unit: ${JSON.stringify(line)}`);
      continue;
    }
    if (end) {
      ends.set(key, (ends.get(key) ?? 0) + 1);
      endedSinceStart.add(key);
      continue;
    }
    const runs = starts.get(key) ?? 0;
    if (runs > 0) {
      const committedAt = seenKills.find((i) => kills[i]!.committed?.has(key));
      if (committedAt !== undefined) {
        const k = kills[committedAt]!;
        violations.push(
          `${key} started again (execution ${runs + 1}, log line ${n + 1}) although the store had committed it when ${k.command} #${k.process} was killed ${describePlan(k.plan)}`,
        );
      } else if ((inFlightKills.get(key) ?? 0) === 0) {
        violations.push(`${key} started again (execution ${runs + 1}, log line ${n + 1}) with no kill while it was in flight`);
      }
      const at = endedUncommittedAt.get(key);
      if (at !== undefined) finishedNotSaved.push({ key, kill: at });
    }
    starts.set(key, runs + 1);
    inFlightKills.set(key, 0);
    endedSinceStart.delete(key);
    endedUncommittedAt.delete(key);
  }
  for (const key of KEYS) if (!ends.get(key)) violations.push(`${key} never completed (starts: ${starts.get(key) ?? 0})`);
  const perKeyExtra = new Map<string, number>();
  let extra = 0;
  for (const [key, runs] of starts) {
    if (runs > 1) perKeyExtra.set(key, runs - 1);
    extra += runs - 1;
  }
  // The coarse bound: each kill can cost at most the work in flight, one step or one fan-out's width.
  if (extra > kills.length * FAN_OUT_WIDTH) violations.push(`${extra} extra executions for ${kills.length} kills (bound ${kills.length * FAN_OUT_WIDTH})`);
  return { violations, extra, finishedNotSaved, perKeyExtra };
}

/** Field names whose values differ, so a mismatch is reported without printing a megabyte of state. */
function differingFields(actual: Record<string, unknown>, expected: Record<string, unknown>): string[] {
  const keys = new Set([...Object.keys(actual), ...Object.keys(expected)]);
  return [...keys].filter((k) => !isDeepStrictEqual(actual[k], expected[k]));
}

describe("crash recovery: SIGKILL at random moments, then resume", () => {
  it(`ends every killed thread in the uninterrupted state, rerunning only work in flight (${ITERATIONS}+ threads, ${MIN_KILLS}+ kills)`, async () => {
    const root = await mkdtemp(join(tmpdir(), "cairn-crash-"));
    const began = performance.now();
    let keep = false;
    try {
      // The reference: one uninterrupted run, timed, with the moment its first step starts.
      const refLog = join(root, "reference.log");
      appendFileSync(refLog, "# run\n");
      const ref = await cairn("run", "reference", join(root, "reference"), refLog);
      expect(ref.code, ref.stderr).toBe(0);
      expect(ref.firstStepMs).toBeDefined();
      const reference = JSON.parse(ref.stdout) as Record<string, unknown>;
      const refVerdict = judge(readFileSync(refLog, "utf8"), []);
      expect(refVerdict.violations).toEqual([]);
      expect(refVerdict.extra).toBe(0);
      const startupMs = ref.firstStepMs!;
      /** From a run's first step to just past its last step's end, when the final checkpoint is written. */
      const span = (child: Child) => child.lines.at(-1)!.ms - child.firstStepMs! + 40;
      // Re-measured whenever a run outlives its planned kill: the machine's pace drifts during the test.
      let stepsMs = span(ref);

      const random = seededRandom(SEED);
      // Most kills land anywhere from the first step to the process's exit (a resume's exit comes sooner:
      // `share` is the part of the steps it has left); a few land in the startup, where the store is
      // opened and the thread and its input checkpoint are written.
      const plan = (share: number): KillPlan =>
        random() < STARTUP_KILL_RATE ? { from: "spawn", ms: startupMs * (0.6 + 0.4 * random()) } : { from: "first-step", ms: random() * stepsMs * share };
      const shareLeft = (done: Set<string> | undefined) =>
        done === undefined ? 1 : Math.max(1, crashGraph.steps.filter((step) => !done.has(step === FAN_OUT_STEP ? `${step}#${FAN_OUT_WIDTH - 1}` : step)).length) / crashGraph.steps.length;
      const failures: string[] = [];
      let processes = 1;
      let runKills = 0;
      let resumeKills = 0;
      let tornKills = 0;
      let missedKills = 0;
      let extraTotal = 0;
      /** Reruns of a unit that had logged its end, with how long before the kill that end line was seen. */
      const endedThenRerun: { key: string; ms: number }[] = [];
      const extraByKey = new Map<string, number>();

      let killedThreads = 0;
      let uninterruptedThreads = 0;
      const landed = () => runKills + resumeKills;
      for (let n = 0; (killedThreads < ITERATIONS || landed() < MIN_KILLS) && n < 3 * ITERATIONS; n += 1) {
        const thread = `crash-${n}`;
        const store = join(root, `store-${n}`);
        const execLog = join(root, `exec-${n}.log`);
        const children: Child[] = [];
        const kills: Kill[] = [];
        let final: Child | undefined;
        let hasCheckpoint = false;
        let killedResumes = 0;
        /** Set when a process failed on its own (not killed): the thread is reported and not judged. */
        let broken: string | undefined;
        for (let attempt = 0; attempt < MAX_ATTEMPTS && !final; attempt += 1) {
          // A thread killed before its first checkpoint does not exist yet; a user starts it again.
          const command = attempt === 0 || !hasCheckpoint ? "run" : "resume";
          const kill = attempt === 0 || (killedResumes < MAX_KILLED_RESUMES && random() < RESUME_KILL_RATE);
          appendFileSync(execLog, `# ${command}\n`);
          const child = await cairn(command, thread, store, execLog, kill ? plan(shareLeft(kills.at(-1)?.committed)) : undefined);
          children.push(child);
          processes += 1;
          if (child.plan && !child.killed) {
            missedKills += 1;
            if (command === "run" && child.code === 0) stepsMs = span(child);
          }
          if (child.killed) {
            const torn = tornTail(store, thread);
            const done = await committed(store, thread);
            hasCheckpoint = done !== undefined;
            kills.push({ process: attempt, command, plan: child.plan!, torn, committed: done, tail: journalTail(store, thread) });
            appendFileSync(execLog, `# kill ${kills.length - 1}\n`);
            if (command === "run") runKills += 1;
            else {
              resumeKills += 1;
              killedResumes += 1;
            }
            if (torn) tornKills += 1;
            continue;
          }
          if (child.code !== 0) {
            broken = `cairn ${command} (process ${attempt + 1}) exited ${child.code}:\n${child.stderr.trim()}`;
            break;
          }
          hasCheckpoint = true;
          if (command === "resume") final = child;
        }
        const log = readFileSync(execLog, "utf8");
        const context = () =>
          [
            `  store: ${store}`,
            `  processes: ${children.map((c) => `${c.command}${c.killed ? `(killed ${describePlan(c.plan!)})` : `(exit ${c.code}${c.plan ? `; kill planned ${describePlan(c.plan)} came too late` : ""})`}`).join(" → ")}`,
            `  committed at each kill: ${kills.map((k, n) => `#${n} ${k.committed ? `[${[...k.committed].join(",")}]` : "no thread"}`).join("; ")}`,
            `  execution log: ${log.trim().split("\n").join(" | ")}`,
            ...kills.map((k, n) => `  journal tail after kill #${n}:\n${k.tail}`),
            `  journal tail at the end:\n${journalTail(store, thread)}`,
          ].join("\n");
        if (!final) {
          failures.push(`${thread}: ${broken ?? `no resume exited 0 in ${MAX_ATTEMPTS} processes`}\n${context()}`);
          continue;
        }
        if (process.env.CRASH_VERBOSE) console.log(`${thread}\n${context()}`);
        const state = JSON.parse(final.stdout) as Record<string, unknown>;
        if (!isDeepStrictEqual(state, reference)) {
          failures.push(`${thread}: final state differs from the uninterrupted run in ${differingFields(state, reference).join(", ")}\n${context()}`);
        }
        // A thread whose first run outlived its kill is checked too, but does not count as a killed one.
        if (kills.length > 0) killedThreads += 1;
        else uninterruptedThreads += 1;
        const verdict = judge(log, kills);
        if (verdict.violations.length) failures.push(`${thread}:\n  ${verdict.violations.join("\n  ")}\n${context()}`);
        extraTotal += verdict.extra;
        for (const { key, kill } of verdict.finishedNotSaved) {
          const killed = children[kills[kill]!.process]!;
          const endSeen = [...killed.lines].reverse().find((l) => l.text === `${key} end`);
          if (endSeen && killed.killedAtMs !== undefined) endedThenRerun.push({ key, ms: Math.max(0, killed.killedAtMs - endSeen.ms) });
        }
        for (const [key, n] of verdict.perKeyExtra) extraByKey.set(key, (extraByKey.get(key) ?? 0) + n);
      }

      const kills = runKills + resumeKills;
      console.log(
        [
          `crash test: seed ${SEED}, ${killedThreads} killed threads (+${uninterruptedThreads} whose run outlived its kill), ${processes} cairn processes, ${((performance.now() - began) / 1000).toFixed(1)} s`,
          `  reference run ${Math.round(ref.ms)} ms, first step at ${Math.round(startupMs)} ms; kills drawn up to ${Math.round(span(ref))} ms (last ${Math.round(stepsMs)} ms) after a child's first step, ${STARTUP_KILL_RATE * 100}% in its startup instead`,
          `  kills: ${kills} (${runKills} runs, ${resumeKills} resumes; ${missedKills} planned kills came after the process exited), ${tornKills} left a torn journal tail`,
          `  extra executions: ${extraTotal} (bound ${kills * FAN_OUT_WIDTH}); ${endedThenRerun.length} of them reran a unit that had logged its end but whose writes were not yet in the journal` +
            (endedThenRerun.length ? ` (unit: ms from its end line to the kill, ±2: ${endedThenRerun.map((e) => `${e.key}: ${Math.round(e.ms)}`).join(", ")})` : ""),
          `  extra by unit: ${[...extraByKey].map(([k, n]) => `${k}×${n}`).join(", ") || "none"}`,
          `  failures: ${failures.length}`,
        ].join("\n"),
      );
      keep = failures.length > 0;
      if (keep) console.log(`crash test (seed ${SEED}) failed; stores and execution logs kept in ${root}`);
      expect(failures).toEqual([]);
      expect(killedThreads, `only ${killedThreads} of ${ITERATIONS} threads were killed: the kills came after the runs ended`).toBeGreaterThanOrEqual(ITERATIONS);
      expect(kills, `only ${kills} SIGKILLs landed (at least ${MIN_KILLS} wanted): the kills came after the processes ended`).toBeGreaterThanOrEqual(MIN_KILLS);
    } finally {
      if (!keep) await rm(root, { recursive: true, force: true });
    }
    // A budget for a machine shared with the rest of the suite (about 2 minutes alone), not a speed check.
  }, 600_000);
});
