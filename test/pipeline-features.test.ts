/**
 * The features long pipelines lean on, through cairn's public API against real stores: fan-out
 * concurrency, retries, token and money accounting, budgets, draining, artifacts, batched saves of
 * fan-out items, cleanup on success and the event stream.
 *
 * Every step counts its executions in a map the test owns, so "ran exactly once" is asserted, not
 * assumed.
 */
import { createHash } from "node:crypto";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { HumanMessage } from "@langchain/core/messages";
import type { RunnableConfig } from "@langchain/core/runnables";
import {
  BaseCheckpointSaver,
  type ChannelVersions,
  type Checkpoint,
  type CheckpointListOptions,
  type CheckpointMetadata,
  type CheckpointTuple,
  type PendingWrite,
} from "@langchain/langgraph-checkpoint";
import Database from "better-sqlite3";
import { nanoid } from "nanoid";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { z } from "zod";
import {
  artifactRef,
  isCairnError,
  listThreads,
  openStore,
  readHistory,
  resume,
  run,
  savedWork,
  stateAt,
  TransientError,
  workflow,
  type ArtifactRef,
  type OpenedStore,
  type RetryPolicy,
  type RunEvent,
  type StepContext,
  type Usage,
} from "cairn";
import { EXAMPLE_PRICING, StandInChatModel } from "../graphs/lib/model.ts";
import pipeline, { coverBytes, frameBytes } from "./fixtures/pipeline-graph.ts";
import { expectCode, rejection } from "./helpers/errors.ts";
import { dropSchema, postgresUri, requirePostgresInCI, uniqueSchema } from "./helpers/postgres.ts";

// In CI an unreachable server fails this file; elsewhere the Postgres cases are skipped with the reason.
const postgres = await requirePostgresInCI();

// -------------------------------------------------------------------------------------------------
// Helpers

/** Executions per step (or per fan-out item), owned by one test. */
class Counter {
  readonly counts: Record<string, number> = {};
  hit(key: string): number {
    this.counts[key] = (this.counts[key] ?? 0) + 1;
    return this.counts[key];
  }
  of(key: string): number {
    return this.counts[key] ?? 0;
  }
}

/** A promise the test settles by hand: lets a test decide exactly when each item finishes. */
class Gate {
  readonly promise: Promise<void>;
  open!: () => void;
  fail!: (error: Error) => void;
  constructor() {
    this.promise = new Promise<void>((resolve, reject) => {
      this.open = resolve;
      this.fail = reject;
    });
    // A gate failed before anyone awaits it must not count as an unhandled rejection.
    this.promise.catch(() => {});
  }
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
const threadId = (label: string) => `${label}-${nanoid(8)}`;
const range = (n: number) => Array.from({ length: n }, (_, i) => i);
const sha256 = (bytes: Uint8Array) => createHash("sha256").update(bytes).digest("hex");

/** Events of one run, with filters by type. */
class Events {
  readonly all: RunEvent[] = [];
  readonly on = (e: RunEvent) => void this.all.push(e);
  of<T extends RunEvent["type"]>(type: T): Extract<RunEvent, { type: T }>[] {
    return this.all.filter((e): e is Extract<RunEvent, { type: T }> => e.type === type);
  }
}

/** Tokens and calls exactly; dollars to 1e-12 (sums of floats may differ in the last bit by order). */
function expectUsage(actual: Usage | undefined, expected: Usage): void {
  expect(actual).toBeDefined();
  expect({ ...actual!, usd: undefined }).toEqual({ ...expected, usd: undefined });
  expect(actual!.usd).toBeCloseTo(expected.usd, 12);
}

const usd = (amount: number, calls = 1): Usage => ({ usd: amount, inputTokens: 0, outputTokens: 0, calls });

const dirs: string[] = [];
async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "cairn-pipeline-"));
  dirs.push(dir);
  return dir;
}

/** One file store for the tests that need no store of their own; each test uses threads of its own. */
let store: OpenedStore;
beforeAll(async () => {
  store = await openStore(`file:${await tempDir()}`);
});
afterAll(async () => {
  await store?.close();
  for (const dir of dirs.splice(0)) await rm(dir, { recursive: true, force: true });
});

// -------------------------------------------------------------------------------------------------
// Concurrency

describe("fan-out concurrency", () => {
  const S = z.object({ n: z.number(), out: z.array(z.number()).default([]) });
  /** Items that each take `ms`, long enough that the items allowed to overlap do overlap. */
  function tracked(concurrency: number | undefined, ms: number) {
    const seen = { running: 0, peak: 0 };
    const wf = workflow("concurrency", { state: S }).map("work", {
      over: (s) => range(s.n),
      concurrency,
      run: async (i) => {
        seen.running += 1;
        seen.peak = Math.max(seen.peak, seen.running);
        await sleep(ms);
        seen.running -= 1;
        return i * 2;
      },
      into: "out",
    });
    return { wf, seen };
  }

  it("runs at most 3 of 12 items at once with concurrency 3, and all 12 at once without a limit", async () => {
    const limited = tracked(3, 30);
    const r = await run(limited.wf, { input: { n: 12 }, store, thread: threadId("conc") });
    expect(limited.seen.peak).toBe(3);
    expect(r.state.out).toEqual(range(12).map((i) => i * 2));

    const unlimited = tracked(undefined, 150);
    await run(unlimited.wf, { input: { n: 12 }, store, thread: threadId("conc") });
    expect(unlimited.seen.peak).toBe(12);
  });

  it("refuses a concurrency or saveEvery that is not a whole number ≥ 1", () => {
    const base = workflow("bad", { state: S });
    for (const concurrency of [0, -1, 1.5, Number.NaN]) {
      let error: unknown;
      try {
        base.map("work", { over: (s) => range(s.n), run: (i) => i, into: "out", concurrency });
      } catch (e) {
        error = e;
      }
      expectCode(error, "INVALID_ARGUMENT");
      expect(error.message).toContain(`concurrency ${String(concurrency)}`);
    }
    let error: unknown;
    try {
      base.map("work", { over: (s) => range(s.n), run: (i) => i, into: "out", saveEvery: 0 });
    } catch (e) {
      error = e;
    }
    expectCode(error, "INVALID_ARGUMENT");
  });
});

// -------------------------------------------------------------------------------------------------
// Retry

describe("retry", () => {
  const S = z.object({ out: z.array(z.number()).default([]), done: z.boolean().optional() });

  /**
   * Three items; item 1 throws `makeError(execution)` while it returns an error. Records every
   * execution as `<item>:<ctx.attempt>`.
   */
  function flaky(makeError: (execution: number) => unknown, retry: RetryPolicy | false | undefined) {
    const counter = new Counter();
    const attempts: string[] = [];
    const wf = workflow("flaky", { state: S }).map("work", {
      over: () => [0, 1, 2],
      retry,
      run: async (i, ctx) => {
        const n = counter.hit(`work#${i}`);
        attempts.push(`${i}:${ctx.attempt}`);
        await sleep(2);
        const error = i === 1 ? makeError(n) : undefined;
        if (error !== undefined) throw error;
        return i;
      },
      into: "out",
    });
    return { wf, counter, attempts };
  }

  const fast = { initialDelayMs: 5, maxDelayMs: 20 };
  const withStatus = (status: number) => Object.assign(new Error(`HTTP ${status}`), { status });

  it("retries a TransientError within the run: attempt 2, a task:retry event, the run completes", async () => {
    const { wf, counter, attempts } = flaky((n) => (n === 1 ? new TransientError("rate limited") : undefined), fast);
    const events = new Events();
    const r = await run(wf, { store, thread: threadId("retry"), onEvent: events.on });
    expect(r.status).toBe("completed");
    expect(r.state.out).toEqual([0, 1, 2]);
    expect(counter.counts).toEqual({ "work#0": 1, "work#1": 2, "work#2": 1 });
    expect(attempts.filter((a) => a.startsWith("1:"))).toEqual(["1:1", "1:2"]);
    const retries = events.of("task:retry");
    expect(retries.map((e) => ({ step: e.step, item: e.item, failedAttempt: e.failedAttempt, message: e.error.message }))).toEqual([
      { step: "work", item: 1, failedAttempt: 1, message: "rate limited" },
    ]);
    expect(events.of("task:error")).toEqual([]);
  });

  it("does not retry a permanent Error: one execution, then STEP_FAILED", async () => {
    const { wf, counter } = flaky(() => new Error("bad prompt"), fast);
    const events = new Events();
    const error = await rejection(run(wf, { store, thread: threadId("retry"), onEvent: events.on }));
    expectCode(error, "STEP_FAILED");
    expect(error.details.step).toBe("work");
    expect(error.message).toBe('Step "work" failed: bad prompt');
    expect(counter.of("work#1")).toBe(1);
    expect(events.of("task:retry")).toEqual([]);
  });

  it("treats status 429 as transient and status 400 as permanent", async () => {
    const rateLimited = flaky((n) => (n === 1 ? withStatus(429) : undefined), fast);
    const r = await run(rateLimited.wf, { store, thread: threadId("retry") });
    expect(r.status).toBe("completed");
    expect(rateLimited.counter.of("work#1")).toBe(2);

    const badRequest = flaky((n) => (n === 1 ? withStatus(400) : undefined), fast);
    expectCode(await rejection(run(badRequest.wf, { store, thread: threadId("retry") })), "STEP_FAILED");
    expect(badRequest.counter.of("work#1")).toBe(1);
  });

  it("never retries with retry: false, even a TransientError", async () => {
    const { wf, counter } = flaky((n) => (n === 1 ? new TransientError("rate limited") : undefined), false);
    expectCode(await rejection(run(wf, { store, thread: threadId("retry") })), "STEP_FAILED");
    expect(counter.of("work#1")).toBe(1);
  });

  it("uses retryOn instead of the default: a matching plain Error is retried, a TransientError it rejects is not", async () => {
    const retryOn = (e: unknown) => e instanceof Error && e.message.includes("flaky");
    const matching = flaky((n) => (n === 1 ? new Error("flaky upstream") : undefined), { ...fast, retryOn });
    const r = await run(matching.wf, { store, thread: threadId("retry") });
    expect(r.status).toBe("completed");
    expect(matching.counter.of("work#1")).toBe(2);

    const rejected = flaky((n) => (n === 1 ? new TransientError("rate limited") : undefined), { ...fast, retryOn });
    expectCode(await rejection(run(rejected.wf, { store, thread: threadId("retry") })), "STEP_FAILED");
    expect(rejected.counter.of("work#1")).toBe(1);
  });

  it("stops after maxAttempts, counting ctx.attempt 1 to 4, with 3 task:retry events", async () => {
    const { wf, counter, attempts } = flaky(() => new TransientError("still rate limited"), { ...fast, maxAttempts: 4 });
    const events = new Events();
    const error = await rejection(run(wf, { store, thread: threadId("retry"), onEvent: events.on }));
    expectCode(error, "STEP_FAILED");
    expect(counter.of("work#1")).toBe(4);
    expect(attempts.filter((a) => a.startsWith("1:"))).toEqual(["1:1", "1:2", "1:3", "1:4"]);
    expect(events.of("task:retry").map((e) => e.failedAttempt)).toEqual([1, 2, 3]);
  });

  it("applies a step's retry policy to a plain step too", async () => {
    const counter = new Counter();
    const wf = workflow("flaky-step", { state: S }).step(
      "call",
      async () => {
        if (counter.hit("call") < 3) throw withStatus(503);
        return { done: true };
      },
      { retry: fast },
    );
    const r = await run(wf, { store, thread: threadId("retry") });
    expect(r.state.done).toBe(true);
    expect(counter.of("call")).toBe(3);
  });
});

// -------------------------------------------------------------------------------------------------
// Usage

describe("usage", () => {
  const S = z.object({ prompt: z.string(), answer: z.string().optional(), billed: z.boolean().optional() });
  const PROMPT = "Write two sentences about a lighthouse keeper. [sentences:2]";

  function askAndBill(pricing: typeof EXAMPLE_PRICING | undefined) {
    return workflow("usage", { state: S, defaultInput: { prompt: PROMPT }, pricing })
      .step("ask", async (s, ctx) => {
        const reply = await new StandInChatModel({ delayMs: 1 }).invoke([new HumanMessage(s.prompt)], { signal: ctx.signal });
        return { answer: String(reply.content) };
      })
      .step("bill", async (_s, ctx) => {
        ctx.usage({ usd: 0.5 });
        ctx.usage({ inputTokens: 1000, outputTokens: 2000, model: "stand-in" });
        return { billed: true };
      });
  }

  /** The tokens the stand-in reports for PROMPT, read from the model itself. */
  async function modelTokens(): Promise<{ input: number; output: number }> {
    const reply = await new StandInChatModel({ delayMs: 1 }).invoke([new HumanMessage(PROMPT)]);
    const meta = reply.usage_metadata!;
    expect(meta.input_tokens).toBeGreaterThan(0);
    return { input: meta.input_tokens, output: meta.output_tokens };
  }

  it("counts a chat model's tokens automatically, prices them, and adds what steps report", async () => {
    const tokens = await modelTokens();
    const price = (input: number, output: number) => (input * 3 + output * 15) / 1e6;
    const ask: Usage = { usd: price(tokens.input, tokens.output), inputTokens: tokens.input, outputTokens: tokens.output, calls: 1 };
    const bill: Usage = { usd: 0.5 + price(1000, 2000), inputTokens: 1000, outputTokens: 2000, calls: 2 };
    const total: Usage = { usd: ask.usd + bill.usd, inputTokens: ask.inputTokens + 1000, outputTokens: ask.outputTokens + 2000, calls: 3 };

    const thread = threadId("usage");
    const r = await run(askAndBill(EXAMPLE_PRICING), { store, thread });
    expect(r.usage.run.inputTokens).toBeGreaterThan(0);
    expectUsage(r.usage.run, total);
    expectUsage(r.usage.thread, total);
    expectUsage(r.usage.reused, usd(0, 0));
    expectUsage(r.usage.failed, usd(0, 0));

    const history = await readHistory(store.saver, thread);
    const byStep = Object.fromEntries(history.map((h) => [h.step, h]));
    expectUsage(byStep.ask!.usage, ask);
    expectUsage(byStep.ask!.total, ask);
    expectUsage(byStep.bill!.usage, bill);
    expectUsage(byStep.bill!.total, total);
    // The running total is the sum of the steps' shares.
    const summed = history.reduce((sum, h) => sum + (h.usage?.usd ?? 0), 0);
    expect(history[history.length - 1]!.total!.usd).toBeCloseTo(summed, 12);

    const [summary] = await listThreads(store.saver, [thread]);
    expectUsage(summary!.spent, total);
  });

  it("prices tokens with the run's pricing over the workflow's, and counts tokens at $0 without a price", async () => {
    const tokens = await modelTokens();
    const priced = await run(askAndBill(EXAMPLE_PRICING), {
      store,
      thread: threadId("usage"),
      pricing: { "stand-in": { inputPerMillion: 1_000_000, outputPerMillion: 0 } },
    });
    // $1 per input token, output free; "bill" reports 1000 input tokens of the same model.
    expectUsage(priced.usage.run, { usd: tokens.input + 0.5 + 1000, inputTokens: tokens.input + 1000, outputTokens: tokens.output + 2000, calls: 3 });

    const unpriced = await run(askAndBill(undefined), { store, thread: threadId("usage") });
    expectUsage(unpriced.usage.run, { usd: 0.5, inputTokens: tokens.input + 1000, outputTokens: tokens.output + 2000, calls: 3 });
  });

  it("fails the step when a step reports a negative amount, naming the field", async () => {
    const wf = workflow("bad-usage", { state: S, defaultInput: { prompt: "x" } }).step("bill", async (_s, ctx) => {
      ctx.usage({ usd: -1 });
      return { billed: true };
    });
    const error = await rejection(run(wf, { store, thread: threadId("usage") }));
    expectCode(error, "STEP_FAILED");
    expect(isCairnError(error.cause, "INVALID_ARGUMENT")).toBe(true);
    expect(error.message).toContain("usd = -1");
  });

  it("keeps the spend of the finished items of a failed fan-out, and a resume reuses it", async () => {
    const FanS = z.object({ out: z.array(z.number()).default([]) });
    const counter = new Counter();
    const wf = workflow("fan-usage", { state: FanS }).map("work", {
      over: () => [0, 1, 2, 3],
      run: async (i, ctx) => {
        const n = counter.hit(`work#${i}`);
        await sleep(i === 3 ? 1 : 10);
        ctx.usage({ usd: 0.25 });
        if (i === 3 && n === 1) throw new Error("content filter");
        return i;
      },
      into: "out",
    });
    const thread = threadId("usage");
    const events = new Events();
    expectCode(await rejection(run(wf, { store, thread, onEvent: events.on })), "STEP_FAILED");
    // The failed item had spent its quarter before failing.
    const failed = events.of("task:error");
    expect(failed.map((e) => ({ item: e.item, usage: e.usage }))).toEqual([{ item: 3, usage: usd(0.25) }]);
    expect(events.of("task:end").map((e) => e.usage)).toEqual([usd(0.25), usd(0.25), usd(0.25)]);
    const [summary] = await listThreads(store.saver, [thread]);
    expectUsage(summary!.spent, usd(0.75, 3));

    const resumed = await resume(wf, { store, thread });
    expect(resumed.status).toBe("completed");
    expect(resumed.state.out).toEqual([0, 1, 2, 3]);
    expect(counter.counts).toEqual({ "work#0": 1, "work#1": 1, "work#2": 1, "work#3": 2 });
    expectUsage(resumed.usage.reused, usd(0.75, 3));
    expectUsage(resumed.usage.run, usd(0.25));
    expectUsage(resumed.usage.thread, usd(1, 4));
  });

  it("counts the spend of every attempt of a retried item in the thread's total", async () => {
    const FanS = z.object({ out: z.array(z.number()).default([]) });
    const counter = new Counter();
    const wf = workflow("retry-usage", { state: FanS }).map("work", {
      over: () => [0, 1],
      retry: { initialDelayMs: 5 },
      run: async (i, ctx) => {
        ctx.usage({ usd: 0.5 });
        if (counter.hit(`work#${i}`) === 1 && i === 1) throw new TransientError("overloaded");
        return i;
      },
      into: "out",
    });
    const r = await run(wf, { store, thread: threadId("usage") });
    expectUsage(r.usage.run, usd(1.5, 3));
    expectUsage(r.usage.thread, usd(1.5, 3));
  });
});

// -------------------------------------------------------------------------------------------------
// Budget

describe("budget", () => {
  const S = z.object({ trail: z.array(z.string()).default([]) });
  const STEPS = ["s1", "s2", "s3", "s4", "s5"] as const;

  /** Five steps, each reporting $1. */
  function dollarSteps(counter: Counter) {
    const spend = (name: string) => async (s: z.infer<typeof S>, ctx: StepContext) => {
      counter.hit(name);
      ctx.usage({ usd: 1 });
      return { trail: [...s.trail, name] };
    };
    return workflow("budget", { state: S }).step("s1", spend("s1")).step("s2", spend("s2")).step("s3", spend("s3")).step("s4", spend("s4")).step("s5", spend("s5"));
  }

  it("stops at the step boundary where the budget is reached, resumes nothing under it, and completes above it", async () => {
    const counter = new Counter();
    const wf = dollarSteps(counter);
    const thread = threadId("budget");
    const events = new Events();

    const first = await run(wf, { store, thread, budgetUsd: 2.5, onEvent: events.on });
    expect(first.status).toBe("stopped");
    expect(first.stopped).toEqual({ reason: "budget", next: ["s4"], itemsNotStarted: 0 });
    expect(counter.counts).toEqual({ s1: 1, s2: 1, s3: 1 });
    expect(first.state.trail).toEqual(["s1", "s2", "s3"]);
    expectUsage(first.usage.thread, usd(3, 3));
    expect(events.of("stopping").map((e) => e.reason)).toEqual(["budget"]);

    const again = await resume(wf, { store, thread, budgetUsd: 2.5 });
    expect(again.status).toBe("stopped");
    expect(again.stopped?.reason).toBe("budget");
    expect(again.tasksRun).toBe(0);
    expect(counter.counts).toEqual({ s1: 1, s2: 1, s3: 1 });

    const done = await resume(wf, { store, thread, budgetUsd: 10 });
    expect(done.status).toBe("completed");
    expect(done.state.trail).toEqual([...STEPS]);
    expect(counter.counts).toEqual({ s1: 1, s2: 1, s3: 1, s4: 1, s5: 1 });
    expectUsage(done.usage.reused, usd(3, 3));
    expectUsage(done.usage.run, usd(2, 2));
    expectUsage(done.usage.thread, usd(5, 5));
  });

  it("refuses a negative or NaN budget with INVALID_ARGUMENT, creating no thread", async () => {
    const counter = new Counter();
    const wf = dollarSteps(counter);
    for (const budgetUsd of [-1, Number.NaN, Number.POSITIVE_INFINITY]) {
      const thread = threadId("budget-bad");
      const error = await rejection(run(wf, { store, thread, budgetUsd }));
      expectCode(error, "INVALID_ARGUMENT");
      expect(error.message).toContain(`Budget ${String(budgetUsd)}`);
      expect(await store.listThreadIds()).not.toContain(thread);
    }
    expect(counter.counts).toEqual({});
  });
});

// -------------------------------------------------------------------------------------------------
// Drain

describe("drain", () => {
  it("stops a fan-out cleanly: running items finish and are saved, queued ones do not start, a resume runs only those", async () => {
    const S = z.object({ out: z.array(z.number()).default([]) });
    const counter = new Counter();
    const wf = workflow("drain", { state: S }).map("work", {
      over: () => range(20),
      concurrency: 2,
      run: async (i) => {
        counter.hit(`work#${i}`);
        await sleep(20 + (i % 3) * 5);
        return i * 10;
      },
      into: "out",
    });
    const thread = threadId("drain");
    const drain = new AbortController();
    const events = new Events();
    const first = await run(wf, {
      store,
      thread,
      drain: drain.signal,
      onEvent: (e) => {
        events.on(e);
        if (e.type === "task:end" && events.of("task:end").length === 4) drain.abort();
      },
    });
    const ranFirst = Object.keys(counter.counts).length;
    expect(first.status).toBe("stopped");
    expect(first.stopped?.reason).toBe("signal");
    expect(first.stopped?.next).toEqual(["work"]);
    // The four that finished before the stop, plus the one running beside the fourth.
    expect(ranFirst).toBe(5);
    expect(first.stopped?.itemsNotStarted).toBe(20 - ranFirst);
    expect(events.of("stopping").map((e) => e.reason)).toEqual(["signal"]);
    const saved = await savedWork(store.saver, thread);
    expect(saved.items.work).toHaveLength(ranFirst);
    expect(saved.items.work).toEqual(Object.keys(counter.counts).map((k) => Number(k.split("#")[1])).sort((a, b) => a - b));

    const resumedEvents = new Events();
    const second = await resume(wf, { store, thread, onEvent: resumedEvents.on });
    expect(second.status).toBe("completed");
    expect(second.state.out).toEqual(range(20).map((i) => i * 10));
    // Every item ran exactly once across the two runs.
    expect(counter.counts).toEqual(Object.fromEntries(range(20).map((i) => [`work#${i}`, 1])));
    expect(resumedEvents.of("task:start").filter((e) => e.item !== undefined)).toHaveLength(20 - ranFirst);
    expect(resumedEvents.of("fanout")).toEqual([{ type: "fanout", thread, step: "work", total: 20, done: ranFirst }]);
  });
});

// -------------------------------------------------------------------------------------------------
// Artifacts

const PNG = (label: string) => Uint8Array.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, ...new TextEncoder().encode(label), 0, 255, 128]);

interface ArtifactBackend {
  name: string;
  skip?: string;
  open(): Promise<{ uri: string; cleanup: () => Promise<void> }>;
  /** How many copies of these bytes the store holds (files or rows). */
  copies(uri: string, ref: ArtifactRef, opened: OpenedStore): Promise<number>;
  /** Replace the stored bytes with others, as disk damage would. */
  corrupt(uri: string, ref: ArtifactRef, opened: OpenedStore): Promise<void>;
}

const BACKENDS: ArtifactBackend[] = [
  {
    name: "file",
    async open() {
      const dir = await tempDir();
      return { uri: `file:${dir}`, cleanup: async () => {} };
    },
    async copies(uri, ref) {
      const folder = join(uri.slice("file:".length), "artifacts", ref.sha256.slice(0, 2));
      return (await readdir(folder)).filter((n) => n.startsWith(ref.sha256)).length;
    },
    async corrupt(_uri, ref, opened) {
      await writeFile(opened.artifacts.locate(ref), PNG("damaged"));
    },
  },
  {
    name: "sqlite",
    async open() {
      const dir = await tempDir();
      return { uri: `sqlite:${join(dir, "cairn.db")}`, cleanup: async () => {} };
    },
    async copies(uri, ref) {
      const db = new Database(uri.slice("sqlite:".length));
      try {
        return (db.prepare("SELECT COUNT(*) AS n FROM cairn_artifacts WHERE sha256 = ?").get(ref.sha256) as { n: number }).n;
      } finally {
        db.close();
      }
    },
    async corrupt(uri, ref) {
      const db = new Database(uri.slice("sqlite:".length));
      try {
        db.prepare("UPDATE cairn_artifacts SET data = ? WHERE sha256 = ?").run(Buffer.from(PNG("damaged")), ref.sha256);
      } finally {
        db.close();
      }
    },
  },
  {
    name: "postgres",
    skip: postgres.ok ? undefined : postgres.reason,
    async open() {
      const schema = uniqueSchema("cairn_artifacts");
      return { uri: postgresUri(schema), cleanup: () => dropSchema(schema) };
    },
    async copies(uri, ref) {
      return withPg(uri, async (client, schema) => {
        const { rows } = await client.query<{ n: string }>(`SELECT COUNT(*) AS n FROM "${schema}".cairn_artifacts WHERE sha256 = $1`, [ref.sha256]);
        return Number(rows[0]!.n);
      });
    },
    async corrupt(uri, ref) {
      await withPg(uri, (client, schema) => client.query(`UPDATE "${schema}".cairn_artifacts SET data = $1 WHERE sha256 = $2`, [Buffer.from(PNG("damaged")), ref.sha256]));
    },
  },
];

async function withPg<T>(uri: string, fn: (client: pg.Client, schema: string) => Promise<T>): Promise<T> {
  const url = new URL(uri);
  const schema = url.searchParams.get("schema")!;
  url.searchParams.delete("schema");
  const client = new pg.Client({ connectionString: url.toString() });
  await client.connect();
  try {
    return await fn(client, schema);
  } finally {
    await client.end();
  }
}

describe("artifacts", () => {
  for (const backend of BACKENDS) {
    describe.skipIf(backend.skip !== undefined)(`on the ${backend.name} store`, () => {
      let made: { uri: string; cleanup: () => Promise<void> };
      let opened: OpenedStore;
      beforeAll(async () => {
        made = await backend.open();
        opened = await openStore(made.uri);
      });
      afterAll(async () => {
        await opened?.close();
        await made?.cleanup();
      });

      it("stores bytes once by content, returns them intact, and refuses damaged or missing ones", async () => {
        const bytes = PNG(`frame for ${backend.name}`);
        const ref = await opened.artifacts.put(bytes, { mediaType: "image/png", name: "frame.png" });
        expect(ref).toEqual({ kind: "cairn.artifact", sha256: sha256(bytes), size: bytes.byteLength, mediaType: "image/png", name: "frame.png" });
        expect(artifactRef.parse(ref)).toEqual(ref);

        const again = await opened.artifacts.put(Uint8Array.from(bytes), { mediaType: "image/png", name: "other-name.png" });
        expect(again.sha256).toBe(ref.sha256);
        expect(await backend.copies(made.uri, ref, opened)).toBe(1);
        expect(await opened.artifacts.has(ref.sha256)).toBe(true);
        expect(Buffer.from(await opened.artifacts.get(ref)).equals(Buffer.from(bytes))).toBe(true);

        if (backend.name === "file") {
          const path = join(made.uri.slice("file:".length), "artifacts", ref.sha256.slice(0, 2), `${ref.sha256}.png`);
          expect(opened.artifacts.locate(ref)).toBe(path);
          expect(Buffer.from(await readFile(path)).equals(Buffer.from(bytes))).toBe(true);
        }

        await backend.corrupt(made.uri, ref, opened);
        const damaged = await rejection(opened.artifacts.get(ref));
        expectCode(damaged, "CHECKPOINT_CORRUPT");
        expect(damaged.details.file).toBe(opened.artifacts.locate(ref));
        expect(damaged.message).toContain(opened.artifacts.locate(ref));
        expect(damaged.message).toContain(`sha256:${ref.sha256.slice(0, 12)}`);

        const never = { ...ref, sha256: sha256(PNG("never stored")) };
        const missing = await rejection(opened.artifacts.get(never));
        expectCode(missing, "ARTIFACT_NOT_FOUND");
        expect(await opened.artifacts.has(never.sha256)).toBe(false);
      });

      it("runs a workflow that keeps artifacts through ctx.artifacts and references in the state", async () => {
        const thread = threadId("art");
        const title = `frames on ${backend.name}`;
        const r = await run(pipeline, { store: opened, thread, input: { title, frames: 3, delayMs: 1 } });
        expect(r.status).toBe("completed");
        const frames = range(3).map((i) => frameBytes(title, i));
        expect(r.state.rendered.map((f) => f.image)).toEqual(
          frames.map((b, i) => ({ kind: "cairn.artifact", sha256: sha256(b), size: b.byteLength, mediaType: "image/png", name: `frame-${i}.png` })),
        );
        for (const [i, f] of r.state.rendered.entries()) {
          expect(Buffer.from(await opened.artifacts.get(f.image)).equals(Buffer.from(frames[i]!))).toBe(true);
        }
        const cover = coverBytes(frames);
        expect(r.state.cover?.sha256).toBe(sha256(cover));
        expect(Buffer.from(await opened.artifacts.get(r.state.cover!)).equals(Buffer.from(cover))).toBe(true);
        expect(r.state.summary).toEqual({ frames: 3, bytes: frames.reduce((n, f) => n + f.byteLength, 0) });

        if (backend.name === "file") {
          // The thread's files on disk hold the references, never the bytes (nor their base64).
          const folder = join(made.uri.slice("file:".length), "threads", thread);
          const names = await readdir(folder);
          expect(names).toContain("journal.log");
          const text = (await Promise.all(names.filter((n) => n.endsWith(".log") || n.endsWith(".json")).map((n) => readFile(join(folder, n), "utf8")))).join("\n");
          for (const f of r.state.rendered) expect(text).toContain(f.image.sha256);
          expect(text).not.toContain("FRAME-MARKER");
          expect(text).not.toContain(Buffer.from(frames[0]!).toString("base64").slice(0, 40));
          expect(text).not.toContain("iVBORw0KGgo");
        }
      });
    });
  }
});

// -------------------------------------------------------------------------------------------------
// saveEvery

/** A saver that passes everything to `inner` and logs each write: what the store actually received. */
class CountingSaver extends BaseCheckpointSaver {
  readonly log: { op: "put" | "putWrites"; channels: string[] }[] = [];
  constructor(private readonly inner: BaseCheckpointSaver) {
    super(inner.serde);
  }
  /** Task writes received, errors excluded. */
  get itemWrites(): number {
    return this.log.filter((l) => l.op === "putWrites" && !l.channels.includes("__error__")).length;
  }
  getTuple(config: RunnableConfig): Promise<CheckpointTuple | undefined> {
    return this.inner.getTuple(config);
  }
  list(config: RunnableConfig, options?: CheckpointListOptions): AsyncGenerator<CheckpointTuple> {
    return this.inner.list(config, options);
  }
  put(config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata, newVersions: ChannelVersions): Promise<RunnableConfig> {
    this.log.push({ op: "put", channels: [] });
    return this.inner.put(config, checkpoint, metadata, newVersions);
  }
  putWrites(config: RunnableConfig, writes: PendingWrite[], taskId: string, taskPath?: string): Promise<void> {
    this.log.push({ op: "putWrites", channels: writes.map(([channel]) => channel) });
    return this.inner.putWrites(config, writes, taskId, taskPath);
  }
  getNextVersion(current: number | undefined): number {
    return this.inner.getNextVersion(current);
  }
  deleteThread(threadId: string): Promise<void> {
    return this.inner.deleteThread(threadId);
  }
}

describe("saveEvery", () => {
  const S = z.object({ n: z.number(), out: z.array(z.number()).default([]) });

  /** A fan-out whose items each wait for their gate; the store is wrapped to count what it receives. */
  function gated(n: number, saveEvery: number, concurrency?: number) {
    const counter = new Counter();
    const gates = range(n).map(() => new Gate());
    const wf = workflow("batched", { state: S }).map("work", {
      over: (s) => range(s.n),
      saveEvery,
      concurrency,
      run: async (i) => {
        counter.hit(`work#${i}`);
        await gates[i]!.promise;
        return i;
      },
      into: "out",
    });
    const counting = new CountingSaver(store.saver);
    const wrapped: OpenedStore = { ...store, saver: counting, close: async () => {} };
    return { wf, counter, gates, counting, wrapped };
  }

  /** The test's view of the run: events, and a wait until `n` events of a type have arrived. */
  function tracker() {
    const events = new Events();
    const until = (type: RunEvent["type"], n: number) => vi.waitFor(() => expect(events.of(type).length).toBeGreaterThanOrEqual(n), { timeout: 5_000, interval: 5 });
    return { events, until };
  }

  it("holds finished items until 5 are done, saves leftovers after 2 s, and saves the rest at the step boundary", async () => {
    const { wf, gates, counting, wrapped } = gated(8, 5);
    const { events, until } = tracker();
    const thread = threadId("batch");
    const running = run(wf, { store: wrapped, thread, input: { n: 8 }, onEvent: events.on });
    await until("task:start", 8);
    const before = counting.itemWrites;
    const opsBefore = counting.log.length;
    const received = () => counting.itemWrites - before;

    for (const i of [0, 1, 2, 3]) gates[i]!.open();
    await until("task:end", 4);
    await sleep(100);
    expect(received()).toBe(0);

    gates[4]!.open();
    await vi.waitFor(() => expect(received()).toBe(5), { timeout: 1_000, interval: 5 });

    // Two more finish and no batch fills: they are written once they have waited 2 seconds.
    const heldAt = Date.now();
    gates[5]!.open();
    gates[6]!.open();
    await until("task:end", 7);
    await sleep(100);
    expect(received()).toBe(5);
    await vi.waitFor(() => expect(received()).toBe(7), { timeout: 4_000, interval: 10 });
    expect(Date.now() - heldAt).toBeGreaterThanOrEqual(1_900);

    gates[7]!.open();
    const r = await running;
    expect(r.state.out).toEqual(range(8));
    // The step boundary wrote the last item before the checkpoint that ends the step (not 2 s later).
    expect(counting.log.slice(opsBefore, opsBefore + 9).map((l) => l.op)).toEqual([...Array<string>(8).fill("putWrites"), "put"]);
  });

  it("writes the held items when another item fails, so a resume reruns only the failed one", async () => {
    const { wf, counter, gates, counting, wrapped } = gated(6, 10);
    const { events, until } = tracker();
    const thread = threadId("batch");
    const running = rejection(run(wf, { store: wrapped, thread, input: { n: 6 }, onEvent: events.on }));
    await until("task:start", 6);
    const before = counting.itemWrites;

    for (const i of [0, 1, 2]) gates[i]!.open();
    await until("task:end", 3);
    await sleep(100);
    expect(counting.itemWrites - before).toBe(0);

    gates[3]!.fail(new Error("item 3 broke"));
    gates[4]!.open();
    gates[5]!.open();
    expectCode(await running, "STEP_FAILED");
    expect(counting.itemWrites - before).toBe(5);
    expect(await savedWork(store.saver, thread)).toEqual({ steps: [], items: { work: [0, 1, 2, 4, 5] } });

    // The resume's item 3 runs without a gate to wait on.
    gates[3] = new Gate();
    gates[3].open();
    const r = await resume(wf, { store, thread });
    expect(r.state.out).toEqual(range(6));
    expect(counter.counts).toEqual({ "work#0": 1, "work#1": 1, "work#2": 1, "work#3": 2, "work#4": 1, "work#5": 1 });
  });

  it("writes the held items when the run is stopped, so a resume runs only the items that never started", async () => {
    const { wf, counter, gates, counting, wrapped } = gated(6, 10, 2);
    const { events, until } = tracker();
    const thread = threadId("batch");
    const drain = new AbortController();
    const running = run(wf, { store: wrapped, thread, input: { n: 6 }, drain: drain.signal, onEvent: events.on });
    await until("task:start", 2);
    const before = counting.itemWrites;

    gates[0]!.open();
    gates[1]!.open();
    await until("task:start", 4);
    await sleep(50);
    expect(counting.itemWrites - before).toBe(0);

    drain.abort();
    gates[2]!.open();
    gates[3]!.open();
    const r = await running;
    expect(r.status).toBe("stopped");
    expect(r.stopped).toEqual({ reason: "signal", next: ["work"], itemsNotStarted: 2 });
    // Returned well within the 2 s a held write may wait: the stop itself wrote them.
    expect(counting.itemWrites - before).toBe(4);
    expect(await savedWork(store.saver, thread)).toEqual({ steps: [], items: { work: [0, 1, 2, 3] } });

    gates[4]!.open();
    gates[5]!.open();
    const done = await resume(wf, { store, thread });
    expect(done.state.out).toEqual(range(6));
    expect(counter.counts).toEqual(Object.fromEntries(range(6).map((i) => [`work#${i}`, 1])));
  });
});

// -------------------------------------------------------------------------------------------------
// cleanupOnSuccess

describe("cleanupOnSuccess", () => {
  const S = z.object({
    keep: z.boolean().default(false),
    round: z.number().default(0),
    image: artifactRef.optional(),
    done: z.string().optional(),
  });
  // "draw" runs three times, each replacing the image of the round before: the final state refers to the
  // last one, only older checkpoints to the first two. (The value "draw" first replaced, none, is what
  // --from-step draw restores: the workflow's undo record keeps it, so it would stay referenced too.)
  const make = (cleanupOnSuccess: boolean | ((s: z.infer<typeof S>) => boolean), label = "cleanup") =>
    workflow("cleanup", { state: S, cleanupOnSuccess })
      .step("draw", async (s, ctx) => ({ round: s.round + 1, image: await ctx.artifacts.put(PNG(`${label}-${s.round + 1}`), { mediaType: "image/png" }) }))
      .step("finish", async () => ({ done: "yes" }))
      .route("draw", (s) => (s.round < 3 ? "draw" : "finish"));

  it("keeps only the final checkpoint and the artifacts it refers to; the final state stays readable", async () => {
    const thread = threadId("cleanup");
    const r = await run(make(true, thread), { store, thread });
    expect(r.status).toBe("completed");
    const image = { kind: "cairn.artifact", sha256: sha256(PNG(`${thread}-3`)), size: PNG(`${thread}-3`).byteLength, mediaType: "image/png" };
    expect(r.state).toEqual({ keep: false, round: 3, image, done: "yes" });
    expect(r.cleanedUp).toMatchObject({ artifacts: 2 });
    expect(r.cleanedUp!.checkpoints).toBeGreaterThanOrEqual(4);
    expect(r.cleanedUp!.bytesFreed).toBeGreaterThan(2 * PNG(`${thread}-1`).byteLength);

    const history = await readHistory(store.saver, thread);
    expect(history.map((h) => h.step)).toEqual(["finish"]);
    const [summary] = await listThreads(store.saver, [thread]);
    expect(summary).toMatchObject({ thread, status: "completed", checkpoints: 1, lastStep: "finish" });
    expect((await stateAt(store.saver, store.uri, thread)).values).toEqual(r.state);
    expect(await store.artifacts.has(image.sha256)).toBe(true);
    expect(await store.artifacts.has(sha256(PNG(`${thread}-1`)))).toBe(false);
    expect(await store.artifacts.has(sha256(PNG(`${thread}-2`)))).toBe(false);
    // Resuming a cleaned-up thread finds it finished.
    expect((await resume(make(true, thread), { store, thread })).status).toBe("already-completed");
  });

  it("keeps an artifact another thread still refers to", async () => {
    const other = threadId("cleanup-other");
    const shared = `shared-${other}`;
    // The other thread keeps everything; its first rounds' checkpoints refer to the same bytes.
    await run(make(false, shared), { store, thread: other });
    const thread = threadId("cleanup");
    const r = await run(make(true, shared), { store, thread });
    expect(r.cleanedUp).toMatchObject({ artifacts: 0 });
    expect(await store.artifacts.has(sha256(PNG(`${shared}-1`)))).toBe(true);
  });

  it("keeps the whole thread when the function says so", async () => {
    const wf = make((s) => !s.keep);
    const kept = threadId("cleanup");
    const r = await run(wf, { store, thread: kept, input: { keep: true } });
    expect(r.cleanedUp).toBeUndefined();
    expect((await readHistory(store.saver, kept)).length).toBeGreaterThan(1);

    const dropped = threadId("cleanup");
    expect((await run(wf, { store, thread: dropped })).cleanedUp).toBeDefined();
    expect(await readHistory(store.saver, dropped)).toHaveLength(1);
  });
});

// -------------------------------------------------------------------------------------------------
// Events

describe("events", () => {
  it("report the plan, fan-out progress, steps' own progress and each checkpoint's spend", async () => {
    const S = z.object({ out: z.array(z.number()).default([]), end: z.boolean().optional() });
    const counter = new Counter();
    const wf = workflow("events", { state: S })
      .step("intro", async (_s, ctx) => {
        ctx.usage({ usd: 1 });
        ctx.progress(1, 1, "introduced");
        return {};
      })
      .map("items", {
        over: () => [0, 1, 2, 3],
        run: async (i, ctx) => {
          const n = counter.hit(`items#${i}`);
          // Item 2 fails before the others finish: they are saved before its error ends the run.
          await sleep(i === 2 ? 1 : 10);
          ctx.usage({ usd: 0.5 });
          ctx.progress(n, undefined, `item ${i}`);
          if (i === 2 && n === 1) throw new Error("item 2 broke");
          return i;
        },
        into: "out",
      })
      .step("outro", async () => ({ end: true }));
    const thread = threadId("events");

    const first = new Events();
    expectCode(await rejection(run(wf, { store, thread, onEvent: first.on })), "STEP_FAILED");
    expect(first.of("run:start")).toEqual([
      { type: "run:start", thread, workflow: "events", steps: ["intro", "items", "outro"], skipped: [], spentBefore: usd(0, 0) },
    ]);
    expect(first.of("fanout")).toEqual([{ type: "fanout", thread, step: "items", total: 4, done: 0 }]);
    const progress = first.of("progress").map(({ step, item, done, total, message }) => ({ step, item, done, total, message }));
    expect(progress[0]).toEqual({ step: "intro", item: undefined, done: 1, total: 1, message: "introduced" });
    expect(progress.slice(1).sort((a, b) => a.item! - b.item!)).toEqual(
      [0, 1, 2, 3].map((i) => ({ step: "items", item: i, done: 1, total: undefined, message: `item ${i}` })),
    );
    const intro = first.of("checkpoint").find((e) => e.step === "intro")!;
    expectUsage(intro.usage, usd(1));
    expectUsage(intro.total, usd(1));

    const second = new Events();
    const r = await resume(wf, { store, thread, onEvent: second.on });
    expect(r.state).toEqual({ out: [0, 1, 2, 3], end: true });
    expect(second.of("run:start")).toEqual([
      { type: "run:start", thread, workflow: "events", steps: ["intro", "items", "outro"], skipped: ["intro"], spentBefore: usd(2.5, 4) },
    ]);
    expect(second.of("fanout")).toEqual([{ type: "fanout", thread, step: "items", total: 4, done: 3 }]);
    expect(second.of("progress").map(({ item, done, message }) => ({ item, done, message }))).toEqual([{ item: 2, done: 2, message: "item 2" }]);
    const checkpoints = second.of("checkpoint").filter((e) => e.tasks > 0);
    expect(checkpoints.map((e) => ({ step: e.step, tasks: e.tasks, internal: e.internal }))).toEqual([
      { step: "items", tasks: 1, internal: false },
      { step: "items", tasks: 1, internal: true },
      { step: "outro", tasks: 1, internal: false },
    ]);
    // The fan-out's checkpoint records all four items, three of them saved by the first run.
    expectUsage(checkpoints[0]!.usage, usd(2, 4));
    expectUsage(checkpoints[0]!.total, usd(3, 5));
    expectUsage(checkpoints[2]!.usage, usd(0, 0));
    expectUsage(checkpoints[2]!.total, usd(3, 5));
  });
});

// -------------------------------------------------------------------------------------------------
// Regressions found in review

describe("failures under a concurrency limit, routing failures, budgets and plain graphs", () => {
  const Items = z.object({ xs: z.array(z.number()).default([]) });

  it("a failing item under concurrency 1 does not block the items queued behind it: all run, the others are saved", async () => {
    const counter = new Counter();
    const wf = workflow("queued-failure", { state: Items }).map("work", {
      over: () => range(4),
      run: (i) => {
        counter.hit(`work#${i}`);
        if (i === 0) throw new Error("item 0 is broken");
        return i;
      },
      into: "xs",
      concurrency: 1,
      retry: false,
    });
    const thread = threadId("queued");
    const error = await rejection(run(wf, { store, thread }));
    expectCode(error, "STEP_FAILED");
    expect(range(4).map((i) => counter.of(`work#${i}`))).toEqual([1, 1, 1, 1]);
    expect(await savedWork(store.saver, thread)).toEqual({ steps: [], items: { work: [1, 2, 3] } });
  });

  it("a route function that throws fails naming the step; the resume reruns the step before it and goes on", async () => {
    const counter = new Counter();
    let broken = true;
    const wf = workflow("routing-failure", { state: z.object({ n: z.number().default(0), done: z.boolean().default(false) }) })
      .step("write", (s) => (counter.hit("write"), { n: s.n + 1 }))
      .step("finish", () => (counter.hit("finish"), { done: true }), {
        when: () => {
          if (broken) throw new Error("the condition reads a field that is not there");
          return true;
        },
      });
    const thread = threadId("routing");
    const error = await rejection(run(wf, { store, thread }));
    expectCode(error, "STEP_FAILED");
    expect(error.message).toBe('Step "finish" failed: its when() function threw: the condition reads a field that is not there');
    broken = false;
    const resumed = await resume(wf, { store, thread });
    expect(resumed.status).toBe("completed");
    expect(resumed.state).toEqual({ n: 1, done: true });
    expect(counter.counts).toEqual({ write: 2, finish: 1 });
  });

  it("crossing the budget stops a retrying step: no further attempt is paid for", async () => {
    const counter = new Counter();
    const wf = workflow("budget-retry", { state: Items }).step(
      "flaky",
      (_s, ctx) => {
        counter.hit("flaky");
        ctx.usage({ usd: 1 });
        throw new TransientError("rate limited (429)");
      },
      { retry: { maxAttempts: 4, initialDelayMs: 5 } },
    );
    const result = await run(wf, { store, thread: threadId("budget-retry"), budgetUsd: 0.5 });
    expect(result.status).toBe("stopped");
    expect(result.stopped?.reason).toBe("budget");
    expect(counter.of("flaky")).toBe(1);
    expectUsage(result.usage.failed, usd(1));
  });

  it("gives a plain StateGraph node no retries of cairn's own", async () => {
    const { Annotation, StateGraph, START, END } = await import("@langchain/langgraph");
    let calls = 0;
    const graph = new StateGraph(Annotation.Root({ n: Annotation<number>() }))
      .addNode("flaky", () => {
        calls += 1;
        throw new TransientError("rate limited (429)");
      })
      .addEdge(START, "flaky")
      .addEdge("flaky", END);
    const error = await rejection(run(graph, { store, thread: threadId("plain-retry"), input: { n: 0 } }));
    expectCode(error, "STEP_FAILED");
    expect(calls).toBe(1);
  });
});
