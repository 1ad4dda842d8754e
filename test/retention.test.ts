/**
 * Retention and cleanup through cairn's public API, against a file store, a SQLite file and Postgres:
 * `prune` (keep-last, older-than, whole threads, status, dry run), per-workflow `retention` during a
 * long run, `removeThread` and artifact GC. What matters most is checked in every store: after pruning,
 * a resume reruns no finished step and ends in the state of an uninterrupted run, and `fromStep` still
 * works for a workflow (a plain graph needs the checkpoint before the step).
 *
 * Every step counts its executions in a map the test owns.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { nanoid } from "nanoid";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import {
  appendList,
  artifactRef,
  gcArtifacts,
  listThreads,
  openStore,
  prune,
  readHistory,
  removeThread,
  resume,
  run,
  savedWork,
  spentInAll,
  stateAt,
  workflow,
  type OpenedStore,
  type StepContext,
} from "cairn";
import plainGraph from "./fixtures/plain-graph.ts";
import { expectCode, rejection } from "./helpers/errors.ts";
import { dropSchema, postgresUri, requirePostgresInCI, uniqueSchema } from "./helpers/postgres.ts";

const postgres = await requirePostgresInCI();

const threadId = (label: string) => `${label}-${nanoid(8)}`;
const HOUR = 3_600_000;
const later = (ms: number) => new Date(Date.now() + ms);

/** Executions per step (or per fan-out item), owned by one test. */
class Counter {
  readonly counts: Record<string, number> = {};
  hit(key: string): void {
    this.counts[key] = (this.counts[key] ?? 0) + 1;
  }
}

/** Bytes an artifact of `label` holds: a PNG signature and the label. */
const bytesOf = (label: string) => Uint8Array.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, ...new TextEncoder().encode(label)]);

const dirs: string[] = [];
async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "cairn-retention-"));
  dirs.push(dir);
  return dir;
}
afterAll(async () => {
  for (const dir of dirs.splice(0)) await rm(dir, { recursive: true, force: true });
});

/**
 * Three steps, a fan-out of four items and a last step. Item `failItem` (if any) fails on its first
 * attempt; every step writes 8 KB so pruning frees something measurable.
 */
function pipeline(counter: Counter, options: { failItem?: number; label?: string } = {}) {
  let failed = false;
  const S = z.object({
    topic: z.string().default("tides"),
    a: z.string().optional(),
    b: z.string().optional(),
    c: z.string().optional(),
    items: z.array(z.string()).default([]),
    d: z.string().optional(),
    log: appendList(z.string()),
  });
  const pad = (s: string) => `${s} ${"·".repeat(8 * 1024)}`;
  const step = (name: "a" | "b" | "c" | "d", from: (s: z.infer<typeof S>) => string) => async (s: z.infer<typeof S>) => {
    counter.hit(name);
    return { [name]: pad(`${name}(${from(s).slice(0, 40)})`), log: [name] };
  };
  return workflow(options.label ?? "prunable", { state: S })
    .step("alpha", step("a", (s) => s.topic))
    .step("beta", step("b", (s) => s.a!))
    .step("gamma", step("c", (s) => s.b!))
    .map("fan", {
      over: (s) => [0, 1, 2, 3].map((i) => `${s.c!.slice(0, 20)}#${i}`),
      run: async (item: string, ctx) => {
        counter.hit(`fan#${ctx.index}`);
        if (ctx.index === options.failItem && !failed) {
          failed = true;
          throw new Error(`item ${ctx.index} failed once`);
        }
        return `drawn ${item}`;
      },
      into: "items",
    })
    .step("delta", step("d", (s) => s.items.join("+")));
}

interface StoreKind {
  name: string;
  skip?: string;
  uri: () => Promise<string>;
  cleanup?: () => Promise<void>;
}

const schemas: string[] = [];
const KINDS: StoreKind[] = [
  { name: "file", uri: async () => `file:${await tempDir()}` },
  { name: "sqlite", uri: async () => `sqlite:${join(await tempDir(), "cairn.db")}` },
  {
    name: "postgres",
    skip: postgres.ok ? undefined : postgres.reason,
    uri: async () => {
      const schema = uniqueSchema("cairn_retention");
      schemas.push(schema);
      return postgresUri(schema);
    },
    cleanup: async () => {
      for (const s of schemas.splice(0)) await dropSchema(s);
    },
  },
];

for (const kind of KINDS) {
  describe.skipIf(kind.skip !== undefined)(`retention and cleanup on the ${kind.name} store`, () => {
    let store: OpenedStore;
    beforeAll(async () => {
      store = await openStore(await kind.uri());
    });
    afterAll(async () => {
      await store?.close();
      await kind.cleanup?.();
    });

    /** The final state of an uninterrupted run of `pipeline`. */
    async function reference(): Promise<Record<string, unknown>> {
      const r = await run(pipeline(new Counter()), { store, thread: threadId("reference") });
      return r.state;
    }

    it("prune --keep-last, then a resume of a failed thread reruns no finished step and ends in the uninterrupted state", async () => {
      const expected = await reference();
      const counter = new Counter();
      const wf = pipeline(counter, { failItem: 2 });
      const thread = threadId("failed");
      const failure = await rejection(run(wf, { store, thread }));
      expectCode(failure, "STEP_FAILED");
      const before = await readHistory(store.saver, thread);
      const spent = await spentInAll(store.saver, thread);
      expect(before.length).toBeGreaterThan(3);

      const report = await prune({ store, keepLast: 1, thread });
      expect(report.threads).toEqual([
        { thread, status: "failed", checkpoints: before.length, removed: before.length - 1, removedThread: false, bytesFreed: expect.any(Number) },
      ]);
      expect(report.bytesFreed).toBeGreaterThan(3 * 8 * 1024);
      const after = await readHistory(store.saver, thread);
      expect(after.map((e) => e.id)).toEqual([before.at(-1)!.id]);
      // The newest checkpoint kept its pending writes: the three finished items are still saved.
      expect(await savedWork(store.saver, thread)).toEqual({ steps: ["alpha", "beta", "gamma"], items: { fan: [0, 1, 3] } });
      expect(await spentInAll(store.saver, thread)).toEqual(spent);

      const resumed = await resume(wf, { store, thread });
      expect(resumed.status).toBe("completed");
      expect(resumed.state).toEqual(expected);
      expect(counter.counts).toEqual({ a: 1, b: 1, c: 1, "fan#0": 1, "fan#1": 1, "fan#2": 2, "fan#3": 1, d: 1 });
    });

    it("fromStep after pruning rebuilds the state before the step for a workflow", async () => {
      const expected = await reference();
      const counter = new Counter();
      const wf = pipeline(counter);
      const thread = threadId("rebuild");
      await run(wf, { store, thread });
      await prune({ store, keepLast: 1, thread });
      expect(await readHistory(store.saver, thread)).toHaveLength(1);

      const restarted = await resume(wf, { store, thread, fromStep: "beta" });
      expect(restarted.state).toEqual(expected);
      expect(counter.counts).toEqual({ a: 1, b: 2, c: 2, "fan#0": 2, "fan#1": 2, "fan#2": 2, "fan#3": 2, d: 2 });
      // The notebook view agrees: the state before "c" is rebuilt too.
      expect((await stateAt(store.saver, store.uri, thread)).values).toEqual(expected);
    });

    it("a plain StateGraph restarts from a step whose earlier checkpoint is kept, and says HISTORY_PRUNED otherwise", async () => {
      const thread = threadId("plain");
      const done = await run(plainGraph, { store, thread, input: { topic: "moths" } });
      expect(done.state.log).toEqual(["make_outline", "write_draft", "polish"]);
      await prune({ store, keepLast: 2, thread });
      const kept = await readHistory(store.saver, thread);
      expect(kept.map((e) => e.step)).toEqual(["write_draft", "polish"]);

      const error = await rejection(resume(plainGraph, { store, thread, fromStep: "write_draft" }));
      expectCode(error, "HISTORY_PRUNED");
      expect(error.message).toBe(
        `The checkpoint before step "write_draft" is no longer in thread "${thread}" (pruned), and a plain LangGraph graph records no way to rebuild it. ` +
          `Restart from a step whose earlier checkpoint is still kept (\`cairn history ${thread}\` lists them), or start a new thread.`,
      );
      // make_outline ran before the oldest kept checkpoint too: its first run is gone.
      expectCode(await rejection(resume(plainGraph, { store, thread, fromStep: "make_outline" })), "HISTORY_PRUNED");

      const again = await resume(plainGraph, { store, thread, fromStep: "polish" });
      expect(again.state).toEqual(done.state);
    });

    it("bytes shrink and the latest state is unchanged", async () => {
      const thread = threadId("bytes");
      await run(pipeline(new Counter()), { store, thread });
      const latest = () => store.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } });
      const before = await latest();
      const size = await store.threadBytes(thread);
      const dry = await prune({ store, keepLast: 1, thread, dryRun: true });
      expect(await store.threadBytes(thread)).toBe(size);
      const real = await prune({ store, keepLast: 1, thread });
      expect(real.threads[0]!.removed).toBe(dry.threads[0]!.removed);
      const after = await latest();
      expect(after!.checkpoint).toEqual(before!.checkpoint);
      expect(after!.pendingWrites).toEqual(before!.pendingWrites);
      const left = await store.threadBytes(thread);
      expect(left).toBeLessThan(size);
      expect(size - left).toBeGreaterThanOrEqual(real.bytesFreed * 0.9);
      expect(real.bytesFreed).toBeGreaterThan(4 * 8 * 1024);
    });

    it("--older-than, --threads, --status and --dry-run choose what goes; no rule at all is refused", async () => {
      // Only this test's two threads: a store of their own.
      const own = await openStore(await kind.uri());
      try {
        const done = threadId("done");
        const broken = threadId("broken");
        await run(pipeline(new Counter()), { store: own, thread: done });
        await rejection(run(pipeline(new Counter(), { failItem: 0 }), { store: own, thread: broken }));
        const lengths = async () => [(await readHistory(own.saver, done)).length, (await readHistory(own.saver, broken)).length];
        const initial = await lengths();

        expectCode(await rejection(prune({ store: own })), "INVALID_ARGUMENT");
        expectCode(await rejection(prune({ store: own, status: "failed" })), "INVALID_ARGUMENT");
        expectCode(await rejection(prune({ store: own, keepLast: 0 })), "INVALID_ARGUMENT");
        expectCode(await rejection(prune({ store: own, olderThan: "3 fortnights" })), "INVALID_ARGUMENT");
        expectCode(await rejection(prune({ store: own, keepLast: 1, threads: true })), "INVALID_ARGUMENT");
        expectCode(await rejection(prune({ store: own, keepLast: 1, status: "finished" as never })), "INVALID_ARGUMENT");
        expectCode(await rejection(prune({ store: own, keepLast: 1, thread: "no-such-thread" })), "THREAD_NOT_FOUND");
        expect(await lengths()).toEqual(initial);

        // Everything is minutes old: nothing is older than an hour.
        const fresh = await prune({ store: own, olderThan: "1h" });
        expect(fresh).toMatchObject({ matched: 2, checkpointsRemoved: 0, threads: [] });

        const dry = await prune({ store: own, keepLast: 1, dryRun: true });
        expect(dry.checkpointsRemoved).toBe(initial[0]! - 1 + initial[1]! - 1);
        expect(await lengths()).toEqual(initial);

        const failedOnly = await prune({ store: own, keepLast: 1, status: "failed" });
        expect(failedOnly.threads.map((t) => [t.thread, t.status, t.removed])).toEqual([[broken, "failed", initial[1]! - 1]]);
        expect(await lengths()).toEqual([initial[0], 1]);

        const none = await prune({ store: own, keepLast: 1, status: "interrupted" });
        expect(none).toMatchObject({ matched: 0, checkpointsRemoved: 0 });

        // Two hours from now, every checkpoint is older than an hour; each thread keeps its newest.
        const aged = await prune({ store: own, olderThan: "1h", now: later(2 * HOUR) });
        expect(aged.threads.map((t) => [t.thread, t.removed, t.removedThread])).toEqual([[done, initial[0]! - 1, false]]);
        expect(await lengths()).toEqual([1, 1]);

        // Whole threads go only with --threads, and --status still narrows it.
        const whole = await prune({ store: own, olderThan: "1h", threads: true, status: "completed", now: later(2 * HOUR) });
        expect(whole).toMatchObject({ threadsRemoved: 1, checkpointsRemoved: 1 });
        expect(await own.listThreadIds()).toEqual([broken]);
      } finally {
        await own.close();
      }
    });

    it("retention keeps at most keepLast + slack checkpoints while a long loop runs, and the run resumes after a failure", async () => {
      const counter = new Counter();
      let failAtRound: number | undefined = 14;
      const most = { checkpoints: 0 };
      const S = z.object({ rounds: z.number().default(18), n: z.number().default(0), lines: appendList(z.string()), done: z.string().optional() });
      const make = (retention?: { keepLast: number }) =>
        workflow("long-loop", { state: S, retention })
          .step("write", async (s, ctx: StepContext) => {
            most.checkpoints = Math.max(most.checkpoints, (await readHistory(store.saver, ctx.thread)).length);
            counter.hit(`write#${s.n + 1}`);
            if (retention && s.n + 1 === failAtRound) {
              failAtRound = undefined;
              throw new Error(`round ${s.n + 1} failed once`);
            }
            return { n: s.n + 1, lines: [`line ${s.n + 1} ${"~".repeat(2048)}`] };
          })
          .step("end", async (s) => ({ done: `${s.lines.length} lines` }))
          .route("write", (s) => (s.n < s.rounds ? "write" : "end"));
      const expected = (await run(make(), { store, thread: threadId("loop-ref") })).state;
      for (const key of Object.keys(counter.counts)) delete counter.counts[key];
      most.checkpoints = 0;

      const thread = threadId("loop");
      const wf = make({ keepLast: 3 });
      expectCode(await rejection(run(wf, { store, thread })), "STEP_FAILED");
      // keepLast 3, slack max(3, 10): never more than 13 checkpoints; it did grow past keepLast between prunes.
      expect(most.checkpoints).toBeGreaterThan(3);
      expect(most.checkpoints).toBeLessThanOrEqual(13);
      expect((await readHistory(store.saver, thread)).length).toBeLessThanOrEqual(13);

      const resumed = await resume(wf, { store, thread });
      expect(resumed.state).toEqual(expected);
      expect(most.checkpoints).toBeLessThanOrEqual(13);
      const rounds = Object.fromEntries(Array.from({ length: 18 }, (_, i) => [`write#${i + 1}`, i + 1 === 14 ? 2 : 1]));
      expect(counter.counts).toEqual(rounds);
      // A run that completes is pruned to keepLast.
      expect(await readHistory(store.saver, thread)).toHaveLength(3);

      // And a restart from the first round rebuilds the state before it.
      const restarted = await resume(wf, { store, thread, fromStep: "write" });
      expect(restarted.state).toEqual(expected);
      expect(counter.counts["write#1"]).toBe(2);
    });

    it("cleanupOnSuccess keeps the final state and the artifacts it refers to", async () => {
      const S = z.object({ round: z.number().default(0), image: artifactRef.optional() });
      const label = threadId("img");
      const wf = workflow("tidy", { state: S, cleanupOnSuccess: true })
        .step("draw", async (s, ctx) => ({ round: s.round + 1, image: await ctx.artifacts.put(bytesOf(`${label}-${s.round + 1}`), { mediaType: "image/png" }) }))
        .route("draw", (s) => (s.round < 2 ? "draw" : "end"));
      const thread = threadId("tidy");
      const r = await run(wf, { store, thread });
      expect(r.cleanedUp).toMatchObject({ artifacts: 1 });
      expect(await readHistory(store.saver, thread)).toHaveLength(1);
      expect((await stateAt(store.saver, store.uri, thread)).values).toEqual(r.state);
      expect(await store.artifacts.has(r.state.image!.sha256)).toBe(true);
      const first = (await store.artifacts.list()).map((a) => a.sha256);
      expect(first).toContain(r.state.image!.sha256);
      expect(Buffer.from(await store.artifacts.get(r.state.image!))).toEqual(Buffer.from(bytesOf(`${label}-2`)));
    });

    it("artifact GC keeps what a checkpoint refers to (state or saved items) and what was put recently", async () => {
      const own = await openStore(await kind.uri());
      try {
        const S = z.object({ image: artifactRef.optional(), parts: z.array(artifactRef).default([]) });
        let fail = true;
        const wf = workflow("gc", { state: S })
          .step("draw", async (_s, ctx) => ({ image: await ctx.artifacts.put(bytesOf("kept-in-state"), { mediaType: "image/png" }) }))
          .map("render_parts", {
            over: () => [0, 1],
            run: async (i: number, ctx) => {
              if (i === 1 && fail) {
                fail = false;
                throw new Error("part 1 failed");
              }
              return ctx.artifacts.put(bytesOf(`kept-in-saved-item-${i}`), { mediaType: "image/png" });
            },
            into: "parts",
          });
        const thread = threadId("gc");
        expectCode(await rejection(run(wf, { store: own, thread })), "STEP_FAILED");
        const orphan = await own.artifacts.put(bytesOf("orphan"), { mediaType: "image/png" });

        // Just put: the orphan is within the grace period.
        const now = await gcArtifacts({ store: own });
        expect(now).toMatchObject({ removed: [], referenced: 2, recent: 1, graceMs: HOUR });
        const dry = await gcArtifacts({ store: own, now: later(2 * HOUR), dryRun: true });
        expect(dry.removed).toEqual([{ sha256: orphan.sha256, bytes: expect.any(Number) }]);
        expect(await own.artifacts.has(orphan.sha256)).toBe(true);

        // A touched artifact is not deleted by a GC that decided before the touch.
        expect(await own.artifacts.delete(orphan.sha256, { touchedBefore: new Date(Date.now() - HOUR) })).toBe(0);
        expect(await own.artifacts.has(orphan.sha256)).toBe(true);

        const aged = await gcArtifacts({ store: own, now: later(2 * HOUR) });
        expect(aged.removed.map((r) => r.sha256)).toEqual([orphan.sha256]);
        expect(aged.bytesFreed).toBeGreaterThanOrEqual(orphan.size);
        expect(aged.referenced).toBe(2);
        expect(await own.artifacts.has(orphan.sha256)).toBe(false);

        // The thread still resumes: its saved item's artifact is there.
        const done = await resume(wf, { store: own, thread });
        expect(done.state.parts.map((p) => p.sha256)).toHaveLength(2);
        for (const p of done.state.parts) expect(await own.artifacts.has(p.sha256)).toBe(true);

        // A bad grace period is refused before anything is removed.
        expectCode(await rejection(removeThread(thread, { store: own, grace: "soon" })), "INVALID_ARGUMENT");
        expect(await own.listThreadIds()).toEqual([thread]);

        // removeThread, then a GC two hours on: nothing refers to the thread's artifacts any more.
        const removed = await removeThread(thread, { store: own, now: later(2 * HOUR) });
        expect(removed).toMatchObject({ thread, checkpoints: expect.any(Number), dryRun: false });
        expect(removed.bytesFreed).toBeGreaterThan(0);
        expect(removed.artifacts.removed).toHaveLength(3);
        expect(await own.listThreadIds()).toEqual([]);
        expect(await own.artifacts.list()).toEqual([]);
        expectCode(await rejection(removeThread(thread, { store: own })), "THREAD_NOT_FOUND");
      } finally {
        await own.close();
      }
    });

    it("cairn threads data: each thread's size", async () => {
      const thread = threadId("sized");
      await run(pipeline(new Counter()), { store, thread });
      const [summary] = await listThreads(store.saver, [thread], { bytes: (t) => store.threadBytes(t) });
      expect(summary!.bytes).toBe(await store.threadBytes(thread));
      expect(summary!.bytes).toBeGreaterThan(5 * 8 * 1024);
      expect(await store.threadBytes("no-such-thread")).toBe(0);
    });
  });
}

describe.skipIf(!postgres.ok)("Postgres blobs", () => {
  it("pruning deletes the blobs only the removed checkpoints read, and no other thread's", async () => {
    const schema = uniqueSchema("cairn_blobs");
    const store = await openStore(postgresUri(schema));
    const client = new pg.Client({ connectionString: postgresUri(schema).replace(/\?.*$/, "") });
    await client.connect();
    try {
      const thread = threadId("blobs");
      const other = threadId("other");
      await run(pipeline(new Counter()), { store, thread });
      await run(pipeline(new Counter()), { store, thread: other });
      const count = async (t: string) =>
        Number((await client.query(`SELECT count(*) AS n FROM "${schema}".checkpoint_blobs WHERE thread_id = $1`, [t])).rows[0].n);
      const unread = async (t: string) =>
        Number(
          (
            await client.query(
              `SELECT count(*) AS n FROM "${schema}".checkpoint_blobs b WHERE b.thread_id = $1 AND NOT EXISTS (
                 SELECT 1 FROM "${schema}".checkpoints c WHERE c.thread_id = b.thread_id AND c.checkpoint_ns = b.checkpoint_ns
                   AND c.checkpoint -> 'channel_versions' ->> b.channel = b.version)`,
              [t],
            )
          ).rows[0].n,
        );
      const before = { mine: await count(thread), other: await count(other) };
      expect(await unread(thread)).toBe(0);
      await prune({ store, keepLast: 1, thread });
      expect(await count(thread)).toBeLessThan(before.mine);
      expect(await unread(thread)).toBe(0);
      expect(await count(other)).toBe(before.other);
      const writes = await client.query(`SELECT DISTINCT checkpoint_id FROM "${schema}".checkpoint_writes WHERE thread_id = $1`, [thread]);
      const kept = (await readHistory(store.saver, thread)).map((e) => e.id);
      for (const row of writes.rows as { checkpoint_id: string }[]) expect(kept).toContain(row.checkpoint_id);
    } finally {
      await client.end();
      await store.close();
      await dropSchema(schema);
    }
  });
});

describe("artifact tables made before artifacts recorded when they were put", () => {
  it("SQLite: the column is added, and old rows count as old", async () => {
    const file = join(await tempDir(), "old.db");
    const { default: Database } = await import("better-sqlite3");
    const db = new Database(file);
    db.exec("CREATE TABLE cairn_artifacts (sha256 TEXT PRIMARY KEY, media_type TEXT NOT NULL, size INTEGER NOT NULL, data BLOB NOT NULL)");
    db.prepare("INSERT INTO cairn_artifacts VALUES (?, ?, ?, ?)").run("a".repeat(64), "image/png", 3, Buffer.from([1, 2, 3]));
    db.close();
    const store = await openStore(`sqlite:${file}`);
    try {
      expect(await store.artifacts.list()).toEqual([{ sha256: "a".repeat(64), bytes: 3, touchedAt: new Date(0) }]);
      const gc = await gcArtifacts({ store });
      expect(gc.removed).toEqual([{ sha256: "a".repeat(64), bytes: 3 }]);
    } finally {
      await store.close();
    }
  });

  it.skipIf(!postgres.ok)("Postgres: the column is added, and old rows count as old", async () => {
    const schema = uniqueSchema("cairn_old_artifacts");
    const client = new pg.Client({ connectionString: postgresUri(schema).replace(/\?.*$/, "") });
    await client.connect();
    try {
      await client.query(`CREATE SCHEMA "${schema}"`);
      await client.query(`CREATE TABLE "${schema}".cairn_artifacts (sha256 TEXT PRIMARY KEY, media_type TEXT NOT NULL, size BIGINT NOT NULL, data BYTEA NOT NULL)`);
      await client.query(`INSERT INTO "${schema}".cairn_artifacts VALUES ($1, 'image/png', 3, $2)`, ["b".repeat(64), Buffer.from([1, 2, 3])]);
      const store = await openStore(postgresUri(schema));
      try {
        expect(await store.artifacts.list()).toEqual([{ sha256: "b".repeat(64), bytes: 3, touchedAt: new Date(0) }]);
        expect((await gcArtifacts({ store })).removed).toEqual([{ sha256: "b".repeat(64), bytes: 3 }]);
      } finally {
        await store.close();
      }
    } finally {
      await client.end();
      await dropSchema(schema);
    }
  });
});
