import type { ChildProcess } from "node:child_process";
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FileCheckpointSaver, readHistory, savedWork } from "cairn";
import { seededRandom } from "../graphs/lib/random.ts";
import novel from "../graphs/novel.ts";
import { cairn, removeWorkdirs, spawnCairn, workdir, type CliResult } from "./helpers/cli.ts";

/*
 * graphs/novel.ts through the `cairn` binary, as its README section shows it: the book it writes, cost
 * and tokens per step, a budget stop, Ctrl+C, kill -9 and a restart from a step. Every model call appends
 * its key to NOVEL_EXEC_LOG before it starts, so "nothing finished ran again" is checked by counting
 * calls; and the book of every interrupted thread must equal the uninterrupted one byte for byte (the
 * stand-in model's text depends only on the prompt, never on time).
 */

const GRAPH = "graphs/novel.ts";
const BOOK = "the-last-winter-at-skerry-light.md";
const CHAPTERS = 6;
const CHARACTERS = 4;
/** Every model call of a run with the default input, in order: one key per call. */
const KEYS = [
  "interpret_brief",
  "build_world",
  ...Array.from({ length: CHARACTERS }, (_, i) => `create_characters#${i + 1}`),
  "outline_plot",
  "plan_chapters",
  ...Array.from({ length: CHAPTERS }, (_, i) => `write_chapter#${i + 1}`),
  ...Array.from({ length: CHAPTERS }, (_, i) => `edit_chapters#${i + 1}`),
  "continuity_check",
  "write_blurb",
  "assemble_book",
];
/** Stops the default run after its third chapter. */
const BUDGET = 0.05;
const KILL_SEED = 0x0b00c;
const KILL_THREADS = 2;
/** Resumes of one thread that are killed too, after its killed run; the next resume finishes. */
const KILLED_RESUMES = 1;

let cwd: string;
let reference: string;

beforeAll(async () => {
  cwd = await workdir("cairn-novel-");
});
afterAll(removeWorkdirs);

const execLog = (name: string) => join(cwd, `${name}.exec.log`);
/** The keys a log holds from byte `from` on; none when no model call has been made yet. */
const keysIn = async (file: string, from = 0) => (await readFile(file, "utf8").catch(() => "")).slice(from).split("\n").filter(Boolean);
const bookOf = (thread: string) => readFile(join(cwd, "out", "novel", thread, BOOK), "utf8");
const byteLength = async (file: string) => (await stat(file).catch(() => undefined))?.size ?? 0;

/** How many times each key occurs. */
function counts(keys: string[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const k of keys) out[k] = (out[k] ?? 0) + 1;
  return out;
}

const once = Object.fromEntries(KEYS.map((k) => [k, 1]));

/** The steps the CLI reported finished, with the cost text of each line ("✓ name  85ms  $0.0149 · 1067 tokens"). */
const finished = (stderr: string) => [...stderr.matchAll(/^✓ (\S+)\s+.*?(\$\d+\.\d{4} · [\d.k]+ tokens)?$/gm)].map((m) => ({ step: m[1]!, cost: m[2] }));

/**
 * The model calls whose results the store holds for a thread, as a resume will find them: chapters in the
 * latest checkpoint or in task writes saved against it, finished steps, and saved items of the editing
 * fan-out. None of these may run again.
 */
async function committed(thread: string): Promise<Set<string> | undefined> {
  const saver = new FileCheckpointSaver({ dir: join(cwd, ".cairn"), stepFiles: false });
  try {
    const tuple = await saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } });
    if (!tuple) return undefined;
    const chapters = [...(((tuple.checkpoint.channel_values as Record<string, unknown>).chapters as { number: number }[] | undefined) ?? [])];
    for (const [, channel, value] of tuple.pendingWrites ?? []) if (channel === "chapters") chapters.push(...(value as { number: number }[]));
    const done = new Set(chapters.map((c) => `write_chapter#${c.number}`));
    const saved = await savedWork(saver, thread);
    // write_chapter is marked done after its first chapter; its chapters are counted above.
    for (const step of saved.steps) if (step !== "write_chapter") for (const k of KEYS) if (k === step || k.startsWith(`${step}#`)) done.add(k);
    for (const i of saved.items.edit_chapters ?? []) done.add(`edit_chapters#${i + 1}`);
    return done;
  } finally {
    await saver.close();
  }
}

/** Send the child `signal` `ms` after `key` appears in its part of the execution log (from byte `offset`). */
function signalAfter(child: ChildProcess, log: string, offset: number, key: string, ms: number, signal: NodeJS.Signals = "SIGKILL"): void {
  // Reads of the log overlap (one every 5 ms): the first that sees the key arms the signal, once.
  let armed = false;
  const watch = setInterval(() => {
    void keysIn(log, offset).then((keys) => {
      if (armed || !keys.includes(key) || child.exitCode !== null) return;
      armed = true;
      clearInterval(watch);
      setTimeout(() => child.kill(signal), ms);
    });
  }, 5);
  child.on("close", () => clearInterval(watch));
}

/**
 * One thread killed with SIGKILL in its run and its first KILLED_RESUMES resumes, each time at a seeded
 * moment within a chapter or an edit that is not saved yet, then resumed to the end. Every model call a
 * process starts is checked against what the store had saved when the previous process was killed.
 */
async function killedThread(thread: string, random: () => number) {
  const log = execLog(thread);
  const violations: string[] = [];
  const landed: string[] = [];
  let saved: Set<string> | undefined;
  let final: CliResult | undefined;
  for (let attempt = 0; attempt <= KILLED_RESUMES + 1; attempt += 1) {
    const command = saved === undefined ? "run" : "resume";
    const offset = await byteLength(log);
    const { child, done } = spawnCairn(cwd, [command, GRAPH, "--thread", thread], { NOVEL_EXEC_LOG: log });
    const targets = KEYS.filter((k) => /^(write|edit)_chapters?#/.test(k) && !saved?.has(k)).slice(0, attempt === 0 ? 4 : undefined);
    // The kill lands in the target's model call, or just after it while its result is being saved.
    if (attempt <= KILLED_RESUMES && targets.length) signalAfter(child, log, offset, targets[Math.floor(random() * targets.length)]!, random() * 100);
    const result = await done;
    const keys = await keysIn(log, offset);
    for (const key of keys) if (saved?.has(key)) violations.push(`${key} ran again in ${command} #${attempt + 1} although the store had saved it`);
    if (result.signal !== "SIGKILL") {
      final = result;
      break;
    }
    landed.push(keys.at(-1)!);
    saved = await committed(thread);
  }
  return { thread, violations, landed, final };
}

describe("graphs/novel.ts", () => {
  it("writes the book as Markdown with every step's cost and tokens, one model call per unit of work", async () => {
    const r = await cairn(cwd, ["run", GRAPH, "--thread", "ref"], { NOVEL_EXEC_LOG: execLog("ref") });
    expect(r.code, r.stderr).toBe(0);
    const steps = finished(r.stderr);
    expect(steps.map((s) => s.step)).toEqual([...novel.steps.slice(0, 5), ...Array(CHAPTERS).fill("write_chapter"), ...novel.steps.slice(6)]);
    expect(steps.filter((s) => !s.cost)).toEqual([]);
    expect(r.stderr).toMatch(/^completed thread ref: 15 steps in .*\n {2}spent: \$\d+\.\d{4} \(\d+ in \+ [\d.k]+ out tokens, 23 model calls\) by this run/m);
    expect(await keysIn(execLog("ref"))).toEqual(KEYS);

    reference = await bookOf("ref");
    const headings = [...reference.matchAll(/^## (.*)$/gm)].map((m) => m[1]);
    expect(headings[0]).toBe("Contents");
    expect(headings.slice(1)).toHaveLength(CHAPTERS);
    headings.slice(1).forEach((h, i) => expect(h).toMatch(new RegExp(`^Chapter ${i + 1}: \\S`)));
    expect(reference.startsWith("# The Last Winter at Skerry Light\n\n*literary fiction · for adult readers*\n\n> ")).toBe(true);
    expect(r.stderr).toContain(`· assemble_book: wrote out/novel/ref/${BOOK}: ${CHAPTERS} chapters, `);
  });

  it("shows each step's cost and tokens in cairn history, and the thread's spend in cairn threads", async () => {
    const history = await cairn(cwd, ["history", "ref"]);
    expect(history.code, history.stderr).toBe(0);
    const [header, ...rows] = history.stdout.split("\n");
    expect(header).toMatch(/ STEP .* COST +TOKENS +TOTAL +SOURCE$/);
    // Rows of checkpoints whose step spent something: "8  <id>  write_chapter  <time>  85ms  1  $0.0149  1067  $0.0283  loop".
    const costed = rows.flatMap((r) => {
      const m = /^\d+ +\S+ +(\S+) +\S+ +\d+ms +\d+ +\$\d+\.\d{4} +[\d.k]+ +\$(\d+\.\d{4}) +loop$/.exec(r);
      return m ? [{ step: m[1]!, total: m[2]! }] : [];
    });
    expect(new Set(costed.map((c) => c.step))).toEqual(new Set(novel.steps));
    expect(costed.filter((c) => c.step === "write_chapter")).toHaveLength(CHAPTERS);

    // The per-step costs add up to the thread's total, which cairn threads shows.
    const saver = new FileCheckpointSaver({ dir: join(cwd, ".cairn"), stepFiles: false });
    const entries = await readHistory(saver, "ref").finally(() => saver.close());
    const total = entries.at(-1)!.total!;
    expect(total.calls).toBe(KEYS.length);
    expect(entries.reduce((n, e) => n + (e.usage?.usd ?? 0), 0)).toBeCloseTo(total.usd, 10);
    expect(costed.at(-1)?.total).toBe(total.usd.toFixed(4));
    const threads = await cairn(cwd, ["threads"]);
    expect(threads.stdout.split("\n")[0]).toMatch(/^THREAD +STATUS +LAST STEP +CHECKPOINTS +SIZE +SPENT +TOKENS +UPDATED$/);
    expect(threads.stdout).toMatch(new RegExp(`^ref +completed +assemble_book +\\d+ +[\\d.]+ [KM]?B +\\$${total.usd.toFixed(4).replace(".", "\\.")} +[\\d.k]+ `, "m"));
  });

  it(`stops at a step boundary once the budget ($${BUDGET}) is spent, and a resume with a higher one finishes the same book`, async () => {
    const log = execLog("budget");
    const stopped = await cairn(cwd, ["run", GRAPH, "--thread", "budget", "--budget-usd", String(BUDGET)], { NOVEL_EXEC_LOG: log });
    expect(stopped.code, stopped.stderr).toBe(3);
    const spent = Number(/budget of \$0\.0500 reached \(spent \$(\d+\.\d+)\)/.exec(stopped.stderr)?.[1]);
    expect(spent).toBeGreaterThanOrEqual(BUDGET);
    expect(stopped.stderr).toMatch(/■ stopped before write_chapter after \d+ steps/);
    expect(stopped.stderr).toMatch(/Continue with a higher one: cairn resume graphs\/novel\.ts --thread budget --budget-usd \d/);
    const first = await keysIn(log);
    // The stand-in's spend is deterministic: the budget is reached with the third chapter (as the README says).
    expect(first).toEqual(KEYS.slice(0, KEYS.indexOf("write_chapter#3") + 1));

    const resumed = await cairn(cwd, ["resume", GRAPH, "--thread", "budget", "--budget-usd", "1"], { NOVEL_EXEC_LOG: log });
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(resumed.stderr).toContain(`resuming reused $${spent.toFixed(4)} (`);
    expect(counts(await keysIn(log))).toEqual(once);
    expect(await bookOf("budget")).toBe(reference);
  });

  it("on Ctrl+C finishes the chapter in flight, exits 130 naming the resume command, and the resume rewrites nothing", async () => {
    const log = execLog("sigint");
    const { child, done } = spawnCairn(cwd, ["run", GRAPH, "--thread", "sigint"], { NOVEL_EXEC_LOG: log });
    // Ctrl+C while chapter 2's model call is running.
    signalAfter(child, log, 0, "write_chapter#2", 20, "SIGINT");
    const stopped = await done;
    expect(stopped.code, stopped.stderr).toBe(130);
    expect(stopped.stderr).toContain("■ SIGINT: finishing the work in flight and saving it");
    expect(stopped.stderr).toMatch(/■ stopped before write_chapter after \d+ steps/);
    expect(stopped.stderr).toContain("Continue with: cairn resume graphs/novel.ts --thread sigint\n");
    // Chapter 2, being written when the signal came, finished and was saved; chapter 3 never started.
    expect((await keysIn(log)).filter((k) => k.startsWith("write_chapter#"))).toEqual(["write_chapter#1", "write_chapter#2"]);
    expect([...(await committed("sigint"))!].filter((k) => k.startsWith("write_chapter#")), stopped.stderr).toEqual(["write_chapter#1", "write_chapter#2"]);

    const resumed = await cairn(cwd, ["resume", GRAPH, "--thread", "sigint"], { NOVEL_EXEC_LOG: log });
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(counts(await keysIn(log))).toEqual(once);
    expect(await bookOf("sigint")).toBe(reference);
  });

  it(`survives kill -9 in the chapters and the edits (${KILL_THREADS} threads), never rerunning saved work`, async () => {
    const threads = await Promise.all(Array.from({ length: KILL_THREADS }, (_, n) => killedThread(`kill-${n}`, seededRandom(KILL_SEED + n))));
    for (const t of threads) {
      expect(t.violations).toEqual([]);
      expect(t.final?.code, `${t.thread} never completed:\n${t.final?.stderr}`).toBe(0);
      const ran = counts(await keysIn(execLog(t.thread)));
      expect(Object.keys(ran).sort()).toEqual([...KEYS].sort());
      expect(await bookOf(t.thread)).toBe(reference);
    }
    const landed = threads.flatMap((t) => t.landed);
    expect(landed.length).toBeGreaterThanOrEqual(3);
    const extra = (await Promise.all(threads.map(async (t) => (await keysIn(execLog(t.thread))).length - KEYS.length))).reduce((a, b) => a + b, 0);
    console.log(`novel kill -9: ${landed.length} kills, during ${landed.join(", ")}; ${extra} model calls rerun`);
  }, 90_000);

  it("--from-step edit_chapters reruns editing onward only and reports what resuming reused", async () => {
    const log = execLog("ref");
    const offset = await byteLength(log);
    const r = await cairn(cwd, ["resume", GRAPH, "--thread", "ref", "--from-step", "edit_chapters"], { NOVEL_EXEC_LOG: log });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain("↺ restarting from edit_chapters");
    expect(r.stderr).toMatch(/resuming reused \$\d+\.\d{4} \(\d+ in \+ [\d.k]+ out tokens, 14 model calls\) of earlier work/);
    expect(counts(await keysIn(log, offset))).toEqual(Object.fromEntries(KEYS.slice(KEYS.indexOf("edit_chapters#1")).map((k) => [k, 1])));
    expect(await bookOf("ref")).toBe(reference);
  });
});
