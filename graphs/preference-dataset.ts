/**
 * A preference-dataset generator in the shape of VellumForge2: one model call plans subtopics of a
 * topic, a fan-out writes prompts for each subtopic, a fan-out of one job per prompt writes a chosen and
 * a rejected answer and appends the pair to a JSONL dataset, and a last step checks the dataset and
 * records statistics. With the defaults that is 25 subtopics × 40 prompts = 1,000 pair jobs, 16 at a time.
 *
 * Each pair lands in `<outDir>/<thread>/dataset.jsonl` exactly once across any number of crashes and
 * resumes: cairn saves finished jobs, and the dataset file itself (a `JsonlSink` keyed by prompt id)
 * remembers every pair it holds, so a job that wrote its line but was not yet saved when the process
 * died finds the line on resume and does not call the model again.
 *
 * Runs offline with the deterministic stand-in model. Simulated failures, to watch retries and resume:
 * - `rateLimitPercent` of the jobs get a rate limit (429) on their first attempt; cairn retries them.
 * - `refusalPercent` of the jobs get a refusal as their chosen answer; the job is counted as failed and
 *   writes no pair (retrying would not help: the same prompt gets the same answer).
 * - `PREFERENCE_FAIL_PROMPTS=<id>,<id>` makes those jobs fail for good (a provider error that persists
 *   until someone fixes it): the run ends with the pairs step failed and every other job saved; resume
 *   without the variable and only those jobs run.
 *
 *   cairn run graphs/preference-dataset.ts --thread pairs-001
 *   cairn inspect pairs-001
 *
 * `PREFERENCE_TRACE=<file>` appends one line per job execution (`<pid> <id> run|skip|wrote|refused`), so
 * tests can count what ran again after a kill.
 */
import { appendFileSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { HumanMessage, SystemMessage } from "@langchain/core/messages";
import { z } from "zod";
import { JsonlSink, TransientError, workflow, type StepContext } from "cairn";
import { chatModel, EXAMPLE_PRICING } from "./lib/model.ts";
import { hashText } from "./lib/random.ts";

/** Pair jobs running at once: what a provider's rate limit allows. */
export const CONCURRENCY = 16;
/**
 * Finished pair jobs saved to the store together (`saveEvery`). 1 (each job saved as it finishes): on
 * 1,000 jobs a batch of 50 halved the store's fdatasyncs but did not make the run measurably faster (the
 * file store already commits jobs that finish together in one sync; docs/examples/preference-dataset.md
 * has the numbers), and a crash would lose more finished jobs from the store.
 */
export const SAVE_EVERY = 1;

const Prompt = z.object({ id: z.string(), subtopic: z.string(), text: z.string() });
type Prompt = z.infer<typeof Prompt>;

/** What a pair job leaves in the state: its outcome, never the texts (those live in the dataset). */
const JobResult = z.object({
  id: z.string(),
  ok: z.boolean(),
  /** The attempt that gave this outcome (2 or more after a retried rate limit or an earlier failed run). */
  attempts: z.number().int(),
  /** Wall time of that attempt, model calls and the durable append included; 0 when `reused`. */
  durationMs: z.number(),
  /** The pair was already in the dataset (a re-run after a crash, or a restart from `pairs`): no model was called. */
  reused: z.boolean(),
  reason: z.string().optional(),
});
type JobResult = z.infer<typeof JobResult>;

/** One line of the dataset. */
interface Pair {
  id: string;
  subtopic: string;
  prompt: string;
  chosen: string;
  rejected: string;
}

/** What every job needs from the state, carried in each fan-out item. */
interface JobConfig {
  dataset: string;
  seed: number;
  delayMs: number;
  rateLimitPercent: number;
  refusalPercent: number;
}

const State = z.object({
  topic: z.string().min(1),
  subtopicCount: z.number().int().min(1).max(500).default(25),
  promptsPerSubtopic: z.number().int().min(1).max(500).default(40),
  /** Milliseconds each stand-in model call takes. */
  delayMs: z.number().int().min(0).default(10),
  seed: z.number().int().default(7),
  rateLimitPercent: z.number().min(0).max(100).default(1),
  refusalPercent: z.number().min(0).max(100).default(1),
  /** The dataset goes to `<outDir>/<thread>/dataset.jsonl`, relative to the working directory. */
  outDir: z.string().min(1).default("out/preference-dataset"),

  dataset: z.string().optional(),
  subtopicNames: z.array(z.string()).default([]),
  promptSets: z.array(z.array(Prompt)).default([]),
  results: z.array(JobResult).default([]),
  /** Kept flat and short so `cairn inspect` shows them whole. */
  stats: z
    .object({ jobs: z.number(), succeeded: z.number(), failed: z.number(), retried: z.number(), reused: z.number(), datasetLines: z.number() })
    .optional(),
  jobDurationsMs: z.object({ timed: z.number(), min: z.number(), median: z.number(), p95: z.number(), max: z.number(), mean: z.number() }).optional(),
  failures: z.array(z.object({ id: z.string(), reason: z.string() })).default([]),
});

async function ask(config: { seed: number; delayMs: number }, ctx: StepContext, system: string, prompt: string): Promise<string> {
  const model = await chatModel(config);
  const reply = await model.invoke([new SystemMessage(system), new HumanMessage(prompt)], { signal: ctx.signal });
  return typeof reply.content === "string" ? reply.content : JSON.stringify(reply.content);
}

/** `count` items from a model's list: one per line, or (the stand-in writes prose) one per sentence. */
function listItems(text: string, count: number, what: string): string[] {
  const lines = text.split("\n").map((l) => l.replace(/^\s*(\d+[.)]|[-*])\s*/, "").trim()).filter(Boolean);
  const items = lines.length >= count ? lines : (text.match(/[^.!?\n]+[.!?]?/g) ?? []).map((s) => s.trim()).filter(Boolean);
  if (items.length < count) throw new Error(`the model listed ${items.length} ${what}, ${count} were asked for`);
  return items.slice(0, count).map((s) => s.replace(/[.!?]$/, ""));
}

/** Whether a seeded share (`percent`) of ids gets a simulated event named `what`. */
function simulated(what: string, id: string, seed: number, percent: number): boolean {
  return hashText(`${seed}:${what}:${id}`) % 10_000 < percent * 100;
}

/** Answers a quality check rejects: here, refusals. */
function isRefusal(answer: string): boolean {
  return /^(I can(no|')t|I'm sorry|I am unable)/i.test(answer.trim());
}

/** `<outDir>/<thread>/dataset.jsonl`, with the thread id made safe as a folder name as cairn's file store does. */
function datasetPath(outDir: string, thread: string): string {
  let folder = "";
  for (const byte of Buffer.from(thread, "utf8")) {
    const c = String.fromCharCode(byte);
    folder += /[A-Za-z0-9_-]/.test(c) ? c : `%${byte.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return join(outDir, folder, "dataset.jsonl");
}

/**
 * One sink per dataset file per process, opened by the first job that needs it (sixteen start at once,
 * so the promise is shared) and closed by the `complete` step. The file has one writer at a time because
 * its path contains the thread id and cairn lets one process write a thread.
 */
const sinks = new Map<string, Promise<JsonlSink<Pair>>>();

function datasetSink(path: string): Promise<JsonlSink<Pair>> {
  const file = resolve(path);
  const cached = sinks.get(file);
  if (cached) return cached;
  const opening = JsonlSink.open<Pair>(file, { key: (pair) => pair.id });
  sinks.set(file, opening);
  // A failed open is not cached: the job's retry or the next run opens again.
  opening.catch(() => closeSink(path, opening));
  return opening;
}

/**
 * Close a process's sink and forget it: at the end, and after a write failed (the sink then refuses every
 * append; a reopen reads the file afresh, e.g. after another process resumed the thread meanwhile). Only
 * the given sink is forgotten, not one a later job has opened since.
 */
async function closeSink(path: string, which = sinks.get(resolve(path))): Promise<void> {
  const file = resolve(path);
  if (sinks.get(file) === which) sinks.delete(file);
  await (await which?.catch(() => undefined))?.close();
}

function trace(id: string, what: "run" | "skip" | "wrote" | "refused"): void {
  const file = process.env.PREFERENCE_TRACE;
  // Synchronous, so a job killed mid-flight has always logged that it started.
  if (file) appendFileSync(file, `${process.pid} ${id} ${what}\n`);
}

/** Jobs that fail for good in this process (PREFERENCE_FAIL_PROMPTS), as a provider error that persists until fixed. */
function brokenPrompts(): Set<string> {
  return new Set((process.env.PREFERENCE_FAIL_PROMPTS ?? "").split(",").map((s) => s.trim()).filter(Boolean));
}

async function makePair(prompt: Prompt, config: JobConfig, ctx: StepContext): Promise<JobResult> {
  const opened = datasetSink(config.dataset);
  const sink = await opened;
  if (sink.has(prompt.id)) {
    trace(prompt.id, "skip");
    return { id: prompt.id, ok: true, attempts: ctx.attempt, durationMs: 0, reused: true };
  }
  trace(prompt.id, "run");
  const started = performance.now();
  if (ctx.attempt === 1 && simulated("429", prompt.id, config.seed, config.rateLimitPercent)) {
    throw new TransientError(`rate limited (429) writing the pair for ${prompt.id}`);
  }
  if (brokenPrompts().has(prompt.id)) {
    throw new Error(`the provider rejected the request for ${prompt.id} (400); PREFERENCE_FAIL_PROMPTS lists it — unset it and resume`);
  }
  const [generated, rejected] = await Promise.all([
    ask(config, ctx, "You are a skilled fiction writer. Answer with vivid, specific, well-paced prose.", `${prompt.text} [sentences:4]`),
    ask({ ...config, seed: config.seed + 1 }, ctx, "Answer briefly and generically.", `${prompt.text} [sentences:2]`),
  ]);
  // The stand-in never refuses; hosted models do for some prompts, and the same prompt gets the same refusal.
  const chosen = simulated("refusal", prompt.id, config.seed, config.refusalPercent) ? "I can't help with that request." : generated;
  if (isRefusal(chosen)) {
    trace(prompt.id, "refused");
    return { id: prompt.id, ok: false, attempts: ctx.attempt, durationMs: Math.round(performance.now() - started), reused: false, reason: "the chosen answer is a refusal" };
  }
  try {
    // Resolves once the line is fdatasync'ed: a pair saved in the store is always in the file.
    await sink.append({ id: prompt.id, subtopic: prompt.subtopic, prompt: prompt.text, chosen, rejected });
  } catch (error) {
    await closeSink(config.dataset, opened);
    throw error;
  }
  trace(prompt.id, "wrote");
  return { id: prompt.id, ok: true, attempts: ctx.attempt, durationMs: Math.round(performance.now() - started), reused: false };
}

/** The value below which `q` of the sorted values lie (nearest rank). */
function quantile(sorted: number[], q: number): number {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]! : 0;
}

/** Read the dataset back: every line must parse, and each id must appear once. */
function readDataset(path: string): { ids: Set<string>; lines: number } {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return { ids: new Set(), lines: 0 };
    throw error;
  }
  const ids = new Set<string>();
  const lines = text.split("\n").filter((l) => l.trim() !== "");
  for (const [n, line] of lines.entries()) {
    const id = (JSON.parse(line) as Partial<Pair>).id;
    if (typeof id !== "string") throw new Error(`${path} line ${n + 1} has no id`);
    if (ids.has(id)) throw new Error(`${path} has the pair ${id} twice (line ${n + 1})`);
    ids.add(id);
  }
  return { ids, lines: lines.length };
}

/**
 * The workflow, with the fan-out's concurrency and save batch as parameters so they can be measured;
 * the default export uses {@link CONCURRENCY} and {@link SAVE_EVERY}.
 */
export function preferenceDataset(options: { concurrency?: number; saveEvery?: number } = {}) {
  return workflow("preference-dataset", {
    state: State,
    defaultInput: { topic: "fantasy fiction: scenes a novelist might write" },
    version: "1",
    pricing: EXAMPLE_PRICING,
  })
    .step("subtopics", async (s, ctx) => {
      const text = await ask(s, ctx, "You plan synthetic preference datasets.", `List ${s.subtopicCount} distinct subtopics of "${s.topic}", one per line. [sentences:${s.subtopicCount}]`);
      const subtopics = listItems(text, s.subtopicCount, "subtopics");
      ctx.log(`${subtopics.length} subtopics of "${s.topic}"`);
      return { subtopicNames: subtopics, dataset: datasetPath(s.outDir, ctx.thread) };
    })
    .map("prompts", {
      over: (s) => s.subtopicNames.map((subtopic) => ({ subtopic, topic: s.topic, count: s.promptsPerSubtopic, seed: s.seed, delayMs: s.delayMs })),
      run: async (item, ctx) => {
        const text = await ask(item, ctx, "You write prompts for a fiction-writing model.", `Write ${item.count} distinct user prompts about "${item.subtopic}" (topic: ${item.topic}), one per line. [sentences:${item.count}]`);
        const pad = (n: number) => String(n).padStart(3, "0");
        // The id is the prompt's position: stable across runs, and the dataset's key.
        return listItems(text, item.count, "prompts").map((p, i) => ({ id: `s${pad(ctx.index)}-p${pad(i)}`, subtopic: item.subtopic, text: `Write a scene: ${p}.` }));
      },
      into: "promptSets",
    })
    .map("pairs", {
      over: (s) => {
        const config: JobConfig = { dataset: s.dataset!, seed: s.seed, delayMs: s.delayMs, rateLimitPercent: s.rateLimitPercent, refusalPercent: s.refusalPercent };
        return s.promptSets.flat().map((prompt) => ({ prompt, config }));
      },
      run: ({ prompt, config }, ctx) => makePair(prompt, config, ctx),
      into: "results",
      concurrency: options.concurrency ?? CONCURRENCY,
      saveEvery: options.saveEvery ?? SAVE_EVERY,
      retry: { maxAttempts: 3, initialDelayMs: 20, maxDelayMs: 200 },
    })
    .step("complete", async (s, ctx) => {
      await closeSink(s.dataset!);
      const ok = s.results.filter((r) => r.ok);
      const { ids, lines } = readDataset(s.dataset!);
      const okIds = new Set(ok.map((r) => r.id));
      const missing = [...okIds].filter((id) => !ids.has(id));
      const unexpected = [...ids].filter((id) => !okIds.has(id));
      if (missing.length || unexpected.length || lines !== ok.length) {
        throw new Error(
          `${s.dataset} does not match the jobs: ${lines} lines for ${ok.length} succeeded jobs` +
            `${missing.length ? `; missing ${missing.slice(0, 5).join(", ")}` : ""}${unexpected.length ? `; not from a succeeded job: ${unexpected.slice(0, 5).join(", ")}` : ""}`,
        );
      }
      const timed = s.results.filter((r) => !r.reused).map((r) => r.durationMs).sort((a, b) => a - b);
      const stats = {
        jobs: s.results.length,
        succeeded: ok.length,
        failed: s.results.length - ok.length,
        retried: s.results.filter((r) => r.attempts > 1).length,
        reused: s.results.filter((r) => r.reused).length,
        datasetLines: lines,
      };
      const jobDurationsMs = {
        timed: timed.length,
        min: timed[0] ?? 0,
        median: quantile(timed, 0.5),
        p95: quantile(timed, 0.95),
        max: timed.at(-1) ?? 0,
        mean: timed.length ? Math.round(timed.reduce((a, b) => a + b, 0) / timed.length) : 0,
      };
      const failures = s.results.filter((r) => !r.ok).map((r) => ({ id: r.id, reason: r.reason ?? "unknown" }));
      ctx.log(`${stats.jobs} jobs: ${stats.succeeded} succeeded, ${stats.failed} failed, ${stats.retried} retried, ${stats.reused} already in the dataset (not generated again)`);
      ctx.log(`job time (${jobDurationsMs.timed} timed): min ${jobDurationsMs.min}ms, median ${jobDurationsMs.median}ms, p95 ${jobDurationsMs.p95}ms, max ${jobDurationsMs.max}ms, mean ${jobDurationsMs.mean}ms`);
      for (const f of failures.slice(0, 5)) ctx.log(`failed ${f.id}: ${f.reason}`);
      if (failures.length > 5) ctx.log(`… and ${failures.length - 5} more failures (cairn inspect ${ctx.thread} --json)`);
      ctx.log(`${s.dataset}: ${lines} pairs, each prompt id once`);
      return { stats, jobDurationsMs, failures };
    });
}

export default preferenceDataset();
