/**
 * cairn's behaviour suite: resume, restart from a step, time travel, status and the notebook API, run
 * through the public entry points against one store. Each store gets a few-line test file that calls
 * `behaviourSuite` with a way to make (and clean up) an empty store.
 *
 * Every step counts its executions in a map the test owns, so "ran exactly once" is asserted, not
 * assumed; every workflow appends to a reducer field, so a step applied twice shows in the final state.
 */
import { expectCode, rejection } from "../helpers/errors.ts";
import type { RunnableConfig } from "@langchain/core/runnables";
import { Annotation, END, Send, START, StateGraph } from "@langchain/langgraph";
import {
  BaseCheckpointSaver,
  type ChannelVersions,
  type Checkpoint,
  type CheckpointListOptions,
  type CheckpointMetadata,
  type CheckpointTuple,
  type PendingWrite,
  uuid6,
} from "@langchain/langgraph-checkpoint";
import { nanoid } from "nanoid";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import {
  appendList,
  isCairnError,
  listThreads,
  open,
  openStore,
  readHistory,
  resume,
  run,
  stateAt,
  workflow,
  type CairnError,
  type CairnErrorCode,
  type OpenedStore,
  type StepContext,
} from "cairn";

export interface TestStore {
  /** A store URI for an empty store. */
  uri: string;
  /** Remove everything the store holds (the temp directory, the Postgres schema). */
  cleanup(): Promise<void>;
}

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
  /** The counts of the given keys, as an object (so a failed assertion shows all of them). */
  pick(keys: readonly string[]): Record<string, number> {
    return Object.fromEntries(keys.map((k) => [k, this.of(k)]));
  }
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
const threadId = (label: string) => `${label}-${nanoid(10)}`;


const STEPS = ["s1", "s2", "s3", "s4", "s5"] as const;
type FiveStep = (typeof STEPS)[number];

/** What the five-step workflow's state holds after s2 of an uninterrupted run. */
const AFTER_S2 = {
  topic: "a lost wallet",
  trail: ["s1", "s2"],
  outline: "outline of a lost wallet",
  notes: "notes on outline of a lost wallet",
};

const FiveState = z.object({
  topic: z.string().min(1),
  /** Every step appends its name: a step applied twice shows here. */
  trail: appendList(z.string()),
  outline: z.string().optional(),
  notes: z.string().optional(),
  draft: z.string().optional(),
  edited: z.string().optional(),
  final: z.string().optional(),
});
type Five = z.infer<typeof FiveState>;

interface FiveOptions {
  /** This step throws while its execution count is at most `failTimes`. */
  failAt?: FiveStep;
  failTimes?: number;
  /** Receives `<step>:<ctx.attempt>` for every execution. */
  attempts?: string[];
  /** Receives a copy of the state each execution of a step was given. */
  seen?: Map<string, Five[]>;
}

/** Five sequential steps, each building on the one before and appending to `trail`. */
function fiveSteps(counter: Counter, options: FiveOptions = {}) {
  const { failAt, failTimes = 1, attempts, seen } = options;
  const step =
    (name: FiveStep, update: (s: Five) => Partial<Five>) =>
    async (s: Five, ctx: StepContext): Promise<Partial<Five>> => {
      const n = counter.hit(name);
      attempts?.push(`${name}:${ctx.attempt}`);
      seen?.set(name, [...(seen.get(name) ?? []), structuredClone(s)]);
      await sleep(2);
      if (name === failAt && n <= failTimes) throw new Error(`simulated failure of ${name} (execution ${n})`);
      return { ...update(s), trail: [name] };
    };
  return workflow("five", { state: FiveState, defaultInput: { topic: "a lost wallet" } })
    .step("s1", step("s1", (s) => ({ outline: `outline of ${s.topic}` })))
    .step("s2", step("s2", (s) => ({ notes: `notes on ${s.outline}` })))
    .step("s3", step("s3", (s) => ({ draft: `draft from ${s.notes}` })))
    .step("s4", step("s4", (s) => ({ edited: `edited ${s.draft}` })))
    .step("s5", step("s5", (s) => ({ final: `${s.edited} after [${s.trail.join(",")}]` })));
}

const FanState = z.object({
  n: z.number().int().min(1),
  items: z.array(z.number()).default([]),
  results: z.array(z.string()).default([]),
  summary: z.string().optional(),
  trail: appendList(z.string()),
});

/** Item durations between 5 and 40 ms, all different; item 7 takes 24 ms, so several siblings finish after it fails. */
const itemDelay = (i: number) => 5 + ((i * 13) % 36);

interface FanOptions {
  failingItem: number;
  /** Fail the item on every attempt instead of only the first. */
  always?: boolean;
  attempts?: string[];
  /** When each item finished or failed (ms since epoch). */
  finishedAt?: Map<number, number>;
  failedAt?: number[];
}

/** list (20 items) -> work (a fan-out, one task per item) -> sum. */
function fanOut(counter: Counter, options: FanOptions) {
  const { failingItem, always = false, attempts, finishedAt, failedAt } = options;
  return workflow("fan", { state: FanState })
    .step("list", async (s) => {
      counter.hit("list");
      return { items: Array.from({ length: s.n }, (_, i) => i), trail: ["list"] };
    })
    .map("work", {
      over: (s) => s.items,
      run: async (item, ctx) => {
        const n = counter.hit(`work#${ctx.index}`);
        attempts?.push(`work#${ctx.index}:${ctx.attempt}`);
        await sleep(itemDelay(ctx.index));
        if (ctx.index === failingItem && (always || n === 1)) {
          failedAt?.push(Date.now());
          throw new Error(`simulated failure of item ${ctx.index} (execution ${n})`);
        }
        finishedAt?.set(ctx.index, Date.now());
        return `r${item}`;
      },
      into: "results",
    })
    .step("sum", async (s) => {
      counter.hit("sum");
      return { summary: s.results.join(","), trail: ["sum"] };
    });
}

const workKeys = (n: number) => Array.from({ length: n }, (_, i) => `work#${i}`);

const LoopState = z.object({
  topic: z.string(),
  chapters: z.array(z.string()).default([]),
  book: z.string().optional(),
  trail: appendList(z.string()),
});

/** plan -> write (looping until four chapters) -> edit. */
function loopWorkflow(counter: Counter) {
  return workflow("loop", { state: LoopState })
    .step("plan", async () => {
      counter.hit("plan");
      return { trail: ["plan"] };
    })
    .step("write", async (s) => {
      counter.hit("write");
      return { chapters: [...s.chapters, `chapter ${s.chapters.length + 1} of ${s.topic}`], trail: ["write"] };
    })
    .step("edit", async (s) => {
      counter.hit("edit");
      return { book: s.chapters.join(" | "), trail: ["edit"] };
    })
    .route("write", (s) => (s.chapters.length < 4 ? "write" : "edit"));
}

/** A plain LangGraph graph: a -> Send x n -> work -> collect -> END. It uses no cairn API. */
const PlainState = Annotation.Root({
  n: Annotation<number>(),
  items: Annotation<number[]>(),
  results: Annotation<string[]>({ reducer: (a, b) => a.concat(b), default: () => [] }),
  summary: Annotation<string>(),
});

function plainGraph(counter: Counter, failingItem: number) {
  return new StateGraph(PlainState)
    .addNode("a", async (s) => {
      counter.hit("a");
      return { items: Array.from({ length: s.n }, (_, i) => i) };
    })
    .addNode("work", async (arg: unknown) => {
      const { item } = arg as { item: number };
      const n = counter.hit(`work#${item}`);
      await sleep(itemDelay(item));
      if (item === failingItem && n === 1) throw new Error(`simulated failure of item ${item}`);
      return { results: [`r${item}`] };
    })
    .addNode("collect", async (s) => {
      counter.hit("collect");
      const sorted = [...s.results].sort((x, y) => Number(x.slice(1)) - Number(y.slice(1)));
      return { summary: sorted.join(",") };
    })
    .addEdge(START, "a")
    .addConditionalEdges("a", (s) => s.items.map((item) => new Send("work", { item })), ["work"])
    .addEdge("work", "collect")
    .addEdge("collect", END);
}

/**
 * A saver that shows only the latest checkpoint of each thread, as if everything older had been pruned:
 * `getTuple` of any other id returns undefined and `list` yields only the latest. Writes pass through.
 */
class LatestOnlySaver extends BaseCheckpointSaver {
  constructor(private readonly inner: BaseCheckpointSaver) {
    super(inner.serde);
  }

  private latest(config: RunnableConfig): Promise<CheckpointTuple | undefined> {
    const thread_id = config.configurable?.thread_id as string | undefined;
    const checkpoint_ns = (config.configurable?.checkpoint_ns as string | undefined) ?? "";
    return this.inner.getTuple({ configurable: { thread_id, checkpoint_ns } });
  }

  async getTuple(config: RunnableConfig): Promise<CheckpointTuple | undefined> {
    const latest = await this.latest(config);
    const id = config.configurable?.checkpoint_id as string | undefined;
    if (latest === undefined || (id !== undefined && id !== latest.checkpoint.id)) return undefined;
    return latest;
  }

  async *list(config: RunnableConfig, options: CheckpointListOptions = {}): AsyncGenerator<CheckpointTuple> {
    const { limit, ...rest } = options;
    let left = limit ?? Infinity;
    for await (const tuple of this.inner.list(config, rest)) {
      if (left <= 0) return;
      const latest = await this.latest(tuple.config);
      if (latest?.checkpoint.id !== tuple.checkpoint.id) continue;
      left -= 1;
      yield tuple;
    }
  }

  put(config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata, newVersions: ChannelVersions): Promise<RunnableConfig> {
    return this.inner.put(config, checkpoint, metadata, newVersions);
  }

  putWrites(config: RunnableConfig, writes: PendingWrite[], taskId: string, taskPath?: string): Promise<void> {
    return this.inner.putWrites(config, writes, taskId, taskPath);
  }

  getNextVersion(current: number | undefined): number {
    return this.inner.getNextVersion(current);
  }

  deleteThread(threadId: string): Promise<void> {
    return this.inner.deleteThread(threadId);
  }
}

// -------------------------------------------------------------------------------------------------
// The suite

/**
 * Declare the behaviour suite for one store. `makeStore` is called once for the suite; every test
 * works on threads of its own.
 */
export function behaviourSuite(name: string, makeStore: () => Promise<TestStore>): void {
  describe(name, () => {
    let made: TestStore;
    let store: OpenedStore;

    beforeAll(async () => {
      made = await makeStore();
      store = await openStore(made.uri);
    });
    afterAll(async () => {
      await store?.close();
      await made?.cleanup();
    });

    const history = (thread: string) => readHistory(store.saver, thread);
    const checkpointCount = async (thread: string) => (await history(thread)).length;

    /** The final state of an uninterrupted run of the five-step workflow. */
    async function uninterruptedFive(): Promise<Five> {
      const result = await run(fiveSteps(new Counter()), { thread: threadId("reference"), store });
      expect(result.status).toBe("completed");
      return result.state;
    }

    /** A completed run of the five-step workflow on a new thread. */
    async function completedFive(counter: Counter): Promise<{ thread: string; wf: ReturnType<typeof fiveSteps> }> {
      const wf = fiveSteps(counter);
      const thread = threadId("five");
      await run(wf, { thread, store });
      expect(counter.pick(STEPS)).toEqual({ s1: 1, s2: 1, s3: 1, s4: 1, s5: 1 });
      return { thread, wf };
    }

    describe("fail at a step, then resume", () => {
      it("keeps the steps before the failure and reruns from the failed step", async () => {
        const counter = new Counter();
        const wf = fiveSteps(counter, { failAt: "s3" });
        const thread = threadId("fail-s3");

        // By URI, as the CLI does: run and resume open and close the store themselves.
        const error = await rejection(run(wf, { thread, store: made.uri }));
        expectCode(error, "STEP_FAILED");
        expect(error.details).toMatchObject({ thread, step: "s3", stepsSaved: 2 });
        expect(error.message).toContain("simulated failure of s3");
        expect(counter.pick(STEPS)).toEqual({ s1: 1, s2: 1, s3: 1, s4: 0, s5: 0 });

        const result = await resume(wf, { thread, store: made.uri });
        expect(result.status).toBe("completed");
        expect(counter.pick(STEPS)).toEqual({ s1: 1, s2: 1, s3: 2, s4: 1, s5: 1 });
        expect(result.state.trail).toEqual(["s1", "s2", "s3", "s4", "s5"]);
        expect(result.state).toEqual(await uninterruptedFive());
      });
    });

    describe("fan-out with a failing item", () => {
      it("reruns only the failed item on resume and gathers results in item order", async () => {
        const counter = new Counter();
        const finishedAt = new Map<number, number>();
        const failedAt: number[] = [];
        const wf = fanOut(counter, { failingItem: 7, finishedAt, failedAt });
        const thread = threadId("fan");

        const error = await rejection(run(wf, { thread, store, input: { n: 20 } }));
        expectCode(error, "STEP_FAILED");
        expect(error.details).toMatchObject({ thread, step: "work", itemsSaved: 19, itemsFailed: 1 });
        // The failure came while slower siblings were still running.
        expect(failedAt).toHaveLength(1);
        expect([...finishedAt.values()].filter((t) => t > failedAt[0]!).length).toBeGreaterThan(0);
        expect(counter.pick(workKeys(20))).toEqual(Object.fromEntries(workKeys(20).map((k) => [k, 1])));
        expect(counter.of("sum")).toBe(0);

        const result = await resume(wf, { thread, store });
        expect(result.status).toBe("completed");
        expect(counter.pick(workKeys(20))).toEqual(Object.fromEntries(workKeys(20).map((k) => [k, k === "work#7" ? 2 : 1])));
        expect(counter.pick(["list", "sum"])).toEqual({ list: 1, sum: 1 });
        expect(result.state.results).toEqual(Array.from({ length: 20 }, (_, i) => `r${i}`));
        expect(result.state.trail).toEqual(["list", "sum"]);
      });

      it("fails again naming the step when the item fails every time, without rerunning the others", async () => {
        const counter = new Counter();
        const wf = fanOut(counter, { failingItem: 7, always: true });
        const thread = threadId("fan-always");

        expectCode(await rejection(run(wf, { thread, store, input: { n: 20 } })), "STEP_FAILED");
        const again = await rejection(resume(wf, { thread, store }));
        expectCode(again, "STEP_FAILED");
        expect(again.details.step).toBe("work");
        expect(again.message).toContain('"work"');
        expect(counter.pick(workKeys(20))).toEqual(Object.fromEntries(workKeys(20).map((k) => [k, k === "work#7" ? 2 : 1])));
        expect(counter.pick(["list", "sum"])).toEqual({ list: 1, sum: 0 });
      });
    });

    describe("a plain LangGraph StateGraph", () => {
      it("resumes only the failed item, restarts from a node, and labels history with node names", async () => {
        const counter = new Counter();
        const graph = plainGraph(counter, 7);
        const thread = threadId("plain");

        const error = await rejection(run(graph, { thread, store, input: { n: 20 } }));
        expectCode(error, "STEP_FAILED");
        expect(error.details.step).toBe("work");
        expect(counter.pick(["a", "collect", ...workKeys(20)])).toEqual({
          a: 1,
          collect: 0,
          ...Object.fromEntries(workKeys(20).map((k) => [k, 1])),
        });

        const resumed = await resume(graph, { thread, store });
        expect(resumed.status).toBe("completed");
        expect(counter.pick(["a", "collect", ...workKeys(20)])).toEqual({
          a: 1,
          collect: 1,
          ...Object.fromEntries(workKeys(20).map((k) => [k, k === "work#7" ? 2 : 1])),
        });
        const expectedSummary = Array.from({ length: 20 }, (_, i) => `r${i}`).join(",");
        expect(resumed.state.summary).toBe(expectedSummary);
        expect([...(resumed.state.results as string[])].sort()).toEqual(Array.from({ length: 20 }, (_, i) => `r${i}`).sort());

        const before = await history(thread);
        const restarted = await resume(graph, { thread, store, fromStep: "collect" });
        expect(counter.pick(["a", "collect", ...workKeys(20)])).toEqual({
          a: 1,
          collect: 2,
          ...Object.fromEntries(workKeys(20).map((k) => [k, k === "work#7" ? 2 : 1])),
        });
        expect(restarted.state.summary).toBe(expectedSummary);
        expect(restarted.state.results).toHaveLength(20);

        const after = await history(thread);
        expect(after.length).toBeGreaterThan(before.length);
        const labels = before.map((e) => e.step);
        expect(labels[0]).toBe("input");
        const nodes = labels.filter((s) => ["a", "work", "collect"].includes(s));
        expect(nodes).toEqual(["a", "work", "collect"]);
        // The restart's new checkpoints carry node names too.
        expect(after.slice(before.length).map((e) => e.step)).toContain("collect");
      });
    });

    describe("fromStep", () => {
      it("reruns the step and the ones after it, keeping the old branch in history", async () => {
        const counter = new Counter();
        const seen = new Map<string, Five[]>();
        const wf = fiveSteps(counter, { seen });
        const thread = threadId("from-step");
        await run(wf, { thread, store });
        const reference = await uninterruptedFive();
        const before = await history(thread);
        const oldS5 = before.filter((e) => e.step === "s5").pop();
        expect(oldS5).toBeDefined();

        const result = await resume(wf, { thread, store, fromStep: "s3" });
        expect(result.status).toBe("completed");
        expect(counter.pick(STEPS)).toEqual({ s1: 1, s2: 1, s3: 2, s4: 2, s5: 2 });
        expect(result.state).toEqual(reference);
        // The restarted step is given exactly the state it was given the first time.
        expect(seen.get("s3")).toHaveLength(2);
        expect(seen.get("s3")![1]).toEqual(seen.get("s3")![0]);
        expect(seen.get("s3")![0]).toEqual(AFTER_S2);

        const after = await history(thread);
        expect(after.length).toBeGreaterThan(before.length);
        const afterIds = after.map((e) => e.id);
        for (const old of before) expect(afterIds).toContain(old.id);
        expect(afterIds).toContain(oldS5!.id);

        const second = await resume(wf, { thread, store, fromStep: "s4" });
        expect(counter.pick(STEPS)).toEqual({ s1: 1, s2: 1, s3: 2, s4: 3, s5: 3 });
        expect(second.state).toEqual(reference);
        expect((await history(thread)).length).toBeGreaterThan(after.length);
      });
    });

    describe("fromStep with pruned history", () => {
      it("rebuilds the state before the step from the latest checkpoint alone", async () => {
        const pruned: OpenedStore = { ...store, saver: new LatestOnlySaver(store.saver) };
        const counter = new Counter();
        const wf = fiveSteps(counter);
        const thread = threadId("pruned");
        await run(wf, { thread, store: pruned });
        expect(await readHistory(pruned.saver, thread)).toHaveLength(1);

        const result = await resume(wf, { thread, store: pruned, fromStep: "s3" });
        expect(counter.pick(STEPS)).toEqual({ s1: 1, s2: 1, s3: 2, s4: 2, s5: 2 });
        expect(result.state.trail).toEqual(["s1", "s2", "s3", "s4", "s5"]);
        expect(result.state).toEqual(await uninterruptedFive());
      });

      it("rebuilds a loop's list from empty when restarting the looping step", async () => {
        const pruned: OpenedStore = { ...store, saver: new LatestOnlySaver(store.saver) };
        const reference = await run(loopWorkflow(new Counter()), { thread: threadId("loop-ref"), store, input: { topic: "tides" } });
        expect(reference.state.chapters).toHaveLength(4);

        const counter = new Counter();
        const wf = loopWorkflow(counter);
        const thread = threadId("loop");
        await run(wf, { thread, store: pruned, input: { topic: "tides" } });
        expect(counter.pick(["plan", "write", "edit"])).toEqual({ plan: 1, write: 4, edit: 1 });

        const result = await resume(wf, { thread, store: pruned, fromStep: "write" });
        expect(counter.pick(["plan", "write", "edit"])).toEqual({ plan: 1, write: 8, edit: 2 });
        expect(result.state.chapters).toHaveLength(4);
        expect(result.state).toEqual(reference.state);
      });

      it("gives the restarted step the state it was given on its first run", async () => {
        const pruned: OpenedStore = { ...store, saver: new LatestOnlySaver(store.saver) };
        const seen = new Map<string, Five[]>();
        const wf = fiveSteps(new Counter(), { seen });
        const thread = threadId("pruned-seen");
        await run(wf, { thread, store: pruned });
        await resume(wf, { thread, store: pruned, fromStep: "s3" });
        expect(seen.get("s3")).toHaveLength(2);
        expect(seen.get("s3")![0]).toEqual(AFTER_S2);
        // Fields that s3, s4 and s5 set for the first time must not be there yet when s3 reruns.
        expect(seen.get("s3")![1]).toEqual(AFTER_S2);
      });

      it("gives the notebook's stateBefore the state after the previous step", async () => {
        const pruned: OpenedStore = { ...store, saver: new LatestOnlySaver(store.saver) };
        const thread = threadId("pruned-nb");
        const wf = fiveSteps(new Counter());
        await run(wf, { thread, store: pruned });
        const handle = await open(wf, { thread, store: pruned });
        try {
          expect(await handle.stateBefore("s3")).toEqual(AFTER_S2);
        } finally {
          await handle.close();
        }
      });
    });

    describe("resume from a checkpoint", () => {
      it("continues from the given checkpoint and reruns only what came after it", async () => {
        const counter = new Counter();
        const { thread, wf } = await completedFive(counter);
        const afterS2 = (await history(thread)).find((e) => e.step === "s2");
        expect(afterS2).toBeDefined();

        const result = await resume(wf, { thread, store, checkpoint: afterS2!.id });
        expect(result.status).toBe("completed");
        expect(counter.pick(STEPS)).toEqual({ s1: 1, s2: 1, s3: 2, s4: 2, s5: 2 });
        expect(result.state).toEqual(await uninterruptedFive());
      });

      it("rejects an unknown checkpoint id with CHECKPOINT_NOT_FOUND", async () => {
        const counter = new Counter();
        const { thread, wf } = await completedFive(counter);
        const count = await checkpointCount(thread);
        const error = await rejection(resume(wf, { thread, store, checkpoint: "no-such-checkpoint" }));
        expectCode(error, "CHECKPOINT_NOT_FOUND");
        expect(error.details).toMatchObject({ thread, checkpoint: "no-such-checkpoint" });
        expect(await checkpointCount(thread)).toBe(count);
        expect(counter.pick(STEPS)).toEqual({ s1: 1, s2: 1, s3: 1, s4: 1, s5: 1 });
      });

      it("refuses fromStep and checkpoint together, writing nothing", async () => {
        const counter = new Counter();
        const { thread, wf } = await completedFive(counter);
        const entries = await history(thread);
        const afterS2 = entries.find((e) => e.step === "s2")!;
        const error = await rejection(resume(wf, { thread, store, fromStep: "s3", checkpoint: afterS2.id }));
        expectCode(error, "INVALID_ARGUMENT");
        expect(error.message).toContain("--from-step");
        expect(error.message).toContain("--checkpoint");
        expect(await checkpointCount(thread)).toBe(entries.length);
        expect(counter.pick(STEPS)).toEqual({ s1: 1, s2: 1, s3: 1, s4: 1, s5: 1 });
      });
    });

    describe("usage errors and finished threads", () => {
      it("resumes a finished thread as already-completed, running nothing", async () => {
        const counter = new Counter();
        const { thread, wf } = await completedFive(counter);
        const count = await checkpointCount(thread);
        const result = await resume(wf, { thread, store: made.uri });
        expect(result.status).toBe("already-completed");
        expect(result.tasksRun).toBe(0);
        expect(result.state).toEqual(await uninterruptedFive());
        expect(counter.pick(STEPS)).toEqual({ s1: 1, s2: 1, s3: 1, s4: 1, s5: 1 });
        expect(await checkpointCount(thread)).toBe(count);
      });

      it("rejects resuming an unknown thread with THREAD_NOT_FOUND", async () => {
        const thread = threadId("missing");
        const error = await rejection(resume(fiveSteps(new Counter()), { thread, store }));
        expectCode(error, "THREAD_NOT_FOUND");
        expect(error.details.thread).toBe(thread);
        expect(error.message).toContain(store.uri);
        expect((await store.listThreadIds()).includes(thread)).toBe(false);
      });

      it("rejects run on an existing thread with THREAD_EXISTS, writing nothing", async () => {
        const counter = new Counter();
        const { thread, wf } = await completedFive(counter);
        const entries = await history(thread);
        const error = await rejection(run(wf, { thread, store: made.uri }));
        expectCode(error, "THREAD_EXISTS");
        expect(error.details.thread).toBe(thread);
        expect(counter.pick(STEPS)).toEqual({ s1: 1, s2: 1, s3: 1, s4: 1, s5: 1 });
        expect((await history(thread)).map((e) => e.id)).toEqual(entries.map((e) => e.id));
      });

      it("rejects an unknown fromStep with UNKNOWN_STEP listing the valid steps", async () => {
        const counter = new Counter();
        const { thread, wf } = await completedFive(counter);
        const count = await checkpointCount(thread);
        // @ts-expect-error fromStep only accepts the workflow's step names
        const error = await rejection(resume(wf, { thread, store, fromStep: "s9" }));
        expectCode(error, "UNKNOWN_STEP");
        expect(error.message).toMatchInlineSnapshot(`"Unknown step "s9" in workflow "five". Valid steps: s1, s2, s3, s4, s5."`);
        expect(error.details).toMatchObject({ step: "s9", valid: [...STEPS] });
        expect(await checkpointCount(thread)).toBe(count);
        expect(counter.pick(STEPS)).toEqual({ s1: 1, s2: 1, s3: 1, s4: 1, s5: 1 });
      });

      it("rejects input that fails the schema with INVALID_INPUT, creating no thread", async () => {
        const counter = new Counter();
        const thread = threadId("invalid");
        const threadsBefore = await store.listThreadIds();
        const error = await rejection(run(fiveSteps(counter), { thread, store, input: { topic: 42 } }));
        expectCode(error, "INVALID_INPUT");
        expect(error.details.fields).toEqual(["topic"]);
        expect(error.message).toContain("topic");
        expect(counter.pick(STEPS)).toEqual({ s1: 0, s2: 0, s3: 0, s4: 0, s5: 0 });
        expect(await store.listThreadIds()).toEqual(threadsBefore);
        const summaries = await listThreads(store.saver, await store.listThreadIds());
        expect(summaries.map((s) => s.thread)).not.toContain(thread);
      });
    });

    describe("thread status", () => {
      it("lists completed and failed threads, and a resumed one as completed", async () => {
        const { thread: done } = await completedFive(new Counter());
        const wf = fiveSteps(new Counter(), { failAt: "s4" });
        const failed = threadId("status-failed");
        expectCode(await rejection(run(wf, { thread: failed, store })), "STEP_FAILED");

        const summaries = await listThreads(store.saver, await store.listThreadIds());
        const byThread = new Map(summaries.map((s) => [s.thread, s]));
        expect(byThread.get(done)).toMatchObject({ status: "completed", lastStep: "s5", checkpoints: await checkpointCount(done) });
        expect(byThread.get(failed)).toMatchObject({ status: "failed", lastStep: "s3" });
        expect(byThread.get(failed)?.error).toContain("simulated failure of s4");

        await resume(wf, { thread: failed, store });
        const [again] = await listThreads(store.saver, [failed]);
        expect(again).toMatchObject({ thread: failed, status: "completed", lastStep: "s5" });
      });
    });

    describe("notebook API", () => {
      it("reads the state before a step, tries a step without writing, and continues from a step", async () => {
        const counter = new Counter();
        const { thread, wf } = await completedFive(counter);
        const reference = await uninterruptedFive();
        const afterS2 = (await stateAt(store.saver, store.uri, thread, { step: "s2" })).values;
        const handle = await open(wf, { thread, store });
        try {
          const before = await handle.stateBefore("s3");
          expect(before).toEqual(afterS2);
          expect(before).toMatchObject(AFTER_S2);

          const count = await checkpointCount(thread);
          const update = await handle.tryStep("s3");
          expect(update).toEqual({ draft: `draft from ${afterS2.notes}`, trail: ["s3"] });
          expect(counter.pick(STEPS)).toEqual({ s1: 1, s2: 1, s3: 2, s4: 1, s5: 1 });
          expect(await checkpointCount(thread)).toBe(count);
          // Unchanged by the try (exact keys are the "reading states" case's business).
          expect(await handle.state()).toMatchObject(reference);

          const result = await handle.continueFrom("s4");
          expect(counter.pick(STEPS)).toEqual({ s1: 1, s2: 1, s3: 2, s4: 2, s5: 2 });
          expect(result.state).toEqual(reference);
        } finally {
          await handle.close();
        }
      });
    });

    describe("reading states", () => {
      it("returns only the workflow's state fields, never LangGraph's or cairn's channels", async () => {
        const { thread, wf } = await completedFive(new Counter());
        const fields = Object.keys(FiveState.shape);
        const extra = (values: object) => Object.keys(values).filter((k) => !fields.includes(k));
        const handle = await open(wf, { thread, store });
        try {
          const found: Record<string, string[]> = {};
          found["state()"] = extra(await handle.state());
          found["stateAt(latest)"] = extra((await stateAt(store.saver, store.uri, thread)).values);
          for (const step of STEPS) {
            found[`stateAt(step ${step})`] = extra((await stateAt(store.saver, store.uri, thread, { step })).values);
            found[`stateBefore(${step})`] = extra(await handle.stateBefore(step));
            found[`stateAfter(${step})`] = extra(await handle.stateAfter(step));
          }
          for (const entry of await history(thread)) {
            found[`stateAt(checkpoint ${entry.step})`] = extra((await stateAt(store.saver, store.uri, thread, { checkpoint: entry.id })).values);
          }
          expect(Object.entries(found).filter(([, keys]) => keys.length > 0)).toEqual([]);
          expect(await handle.stateBefore("s3")).toEqual(AFTER_S2);
          expect((await stateAt(store.saver, store.uri, thread, { step: "s2" })).values).toEqual(AFTER_S2);
        } finally {
          await handle.close();
        }
      });
    });

    describe("one writer per thread", () => {
      /** A checkpoint on top of the thread's latest, written straight through `saver.put`. */
      async function putOnTop(on: OpenedStore, thread: string, label: string): Promise<{ id: string; put: Promise<RunnableConfig> }> {
        const latest = await on.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } });
        const id = uuid6(-3);
        const checkpoint: Checkpoint = { ...latest!.checkpoint, id, ts: new Date().toISOString() };
        const put = on.saver.put(latest!.config, checkpoint, { ...latest!.metadata, source: "update", step: 99, parents: {}, label } as CheckpointMetadata, {});
        return { id, put };
      }

      it("refuses a write started under a lock that was taken over, even when the lock is released before the write commits", async () => {
        // LangGraph has a step's task writes and its checkpoint under way at once: when the first is refused
        // the run ends and gives up its lock while the second is still on its way. That one must still meet
        // the lock it started under, not find no lock held at all and pass.
        const { thread } = await completedFive(new Counter());
        const other = await openStore(made.uri);
        try {
          await store.lockThread(thread);
          // Another writer breaks the lock, writes, and finishes.
          await other.unlockThread(thread, { force: true });
          await other.lockThread(thread);
          const theirs = await putOnTop(other, thread, "theirs");
          await theirs.put;
          await other.releaseThread(thread);

          const ours = await putOnTop(store, thread, "ours");
          const released = store.releaseThread(thread);
          expectCode(await rejection(ours.put), "THREAD_LOCKED");
          await released;

          const latest = await store.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } });
          expect(latest?.checkpoint.id).toBe(theirs.id);
          const ids = (await history(thread)).map((e) => e.id);
          expect(ids).not.toContain(ours.id);
          // With no lock held by anyone now, a new write by this process goes through.
          const after = await putOnTop(store, thread, "after");
          await after.put;
          expect((await store.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } }))?.checkpoint.id).toBe(after.id);
        } finally {
          await other.close();
        }
      });
    });

    describe("ctx.attempt", () => {
      it("is 1 on a first run and 2 on the resume after that step failed", async () => {
        const attempts: string[] = [];
        const wf = fiveSteps(new Counter(), { failAt: "s3", attempts });
        const thread = threadId("attempt");
        expectCode(await rejection(run(wf, { thread, store })), "STEP_FAILED");
        expect(attempts).toEqual(["s1:1", "s2:1", "s3:1"]);
        await resume(wf, { thread, store });
        expect(attempts).toEqual(["s1:1", "s2:1", "s3:1", "s3:2", "s4:1", "s5:1"]);
      });

      it("counts attempts per fan-out item", async () => {
        const attempts: string[] = [];
        const wf = fanOut(new Counter(), { failingItem: 7, attempts });
        const thread = threadId("attempt-fan");
        expectCode(await rejection(run(wf, { thread, store, input: { n: 20 } })), "STEP_FAILED");
        expect([...attempts].sort()).toEqual(workKeys(20).map((k) => `${k}:1`).sort());
        attempts.length = 0;
        await resume(wf, { thread, store });
        expect(attempts).toEqual(["work#7:2"]);
      });
    });
  });
}
