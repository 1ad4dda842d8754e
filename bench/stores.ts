/**
 * Checkpoint savers under plain LangGraph graphs, the same graph and durability for each: what a saver
 * costs per step, how its bytes on disk grow, and how it reads a deep history. cairn's file store is
 * measured against LangGraph's SqliteSaver (synchronous=FULL), PostgresSaver (when reachable),
 * MemorySaver and no checkpointer at all.
 */
import { mkdtemp, readdir, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { Annotation, END, MemorySaver, START, StateGraph, type BaseCheckpointSaver } from "@langchain/langgraph";
import { openStore, type OpenedStore } from "../src/index.ts";

export interface SaverCase {
  name: string;
  /** Opens a saver on `dir`; `close` releases it. Reopening the same dir reads what was written. */
  open: (dir: string) => Promise<{ saver: BaseCheckpointSaver | undefined; close: () => Promise<void>; bytes: () => Promise<number | undefined> }>;
}

export function saverCases(postgresUri: string | undefined): SaverCase[] {
  const fromStore = (uri: (dir: string) => string, files: (dir: string) => string | undefined) => async (dir: string) => {
    const store: OpenedStore = await openStore(uri(dir));
    const path = files(dir);
    return { saver: store.saver, close: () => store.close(), bytes: async () => (path ? sizeOf(path) : undefined) };
  };
  const cases: SaverCase[] = [
    { name: "no checkpointer", open: async () => ({ saver: undefined, close: async () => {}, bytes: async () => undefined }) },
    {
      name: "MemorySaver",
      open: async () => {
        const saver = new MemorySaver();
        // Its bytes: what it holds, serialized, as it would be written somewhere.
        return { saver, close: async () => {}, bytes: async () => memoryBytes(saver) };
      },
    },
    { name: "SqliteSaver (FULL)", open: fromStore((d) => `sqlite:${join(d, "cairn.db")}`, (d) => d) },
    { name: "cairn file store", open: fromStore((d) => `file:${join(d, "store")}`, (d) => join(d, "store")) },
  ];
  if (postgresUri) {
    // One schema per bench folder, so reopening the folder reads what was written there.
    const schema = (dir: string) => `cairn_bench_${basename(dir).toLowerCase().replace(/[^a-z0-9]/g, "_")}`;
    cases.splice(3, 0, {
      name: "PostgresSaver",
      open: fromStore((d) => `${postgresUri}${postgresUri.includes("?") ? "&" : "?"}schema=${schema(d)}`, () => undefined),
    });
  }
  return cases;
}

export async function sizeOf(path: string): Promise<number> {
  const s = await stat(path).catch(() => undefined);
  if (!s) return 0;
  if (!s.isDirectory()) return s.size;
  let total = 0;
  for (const name of await readdir(path)) total += await sizeOf(join(path, name));
  return total;
}

function memoryBytes(saver: MemorySaver): number {
  let total = 0;
  const storage = (saver as unknown as { storage: Record<string, Record<string, Record<string, [Uint8Array, Uint8Array, string?]>>> }).storage;
  for (const ns of Object.values(storage)) for (const cps of Object.values(ns)) for (const [cp, md] of Object.values(cps)) total += cp.byteLength + md.byteLength;
  const writes = (saver as unknown as { writes: Record<string, Record<string, [string, string, Uint8Array]>> }).writes;
  for (const w of Object.values(writes)) for (const [, , v] of Object.values(w)) total += v.byteLength;
  return total;
}

const median = (values: number[]) => {
  const s = [...values].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

async function withDir<R>(fn: (dir: string) => Promise<R>): Promise<R> {
  const dir = await mkdtemp(join(tmpdir(), "cairn-bench-"));
  try {
    return await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

// -------------------------------------------------------------------------------------------------
// linear: trivial steps over ~10 KB of state that does not change

export interface LinearRow {
  saver: string;
  msPerStep: number;
  bytesPerCheckpoint: number | undefined;
}

export async function linear(cases: SaverCase[], steps: number, runs: number): Promise<LinearRow[]> {
  const State = Annotation.Root({ blob: Annotation<string>(), n: Annotation<number>() });
  const rows: LinearRow[] = [];
  for (const c of cases) {
    const times: number[] = [];
    let bytes: number | undefined;
    for (let r = 0; r < runs; r += 1) {
      await withDir(async (dir) => {
        const opened = await c.open(dir);
        try {
          const graph = new StateGraph(State)
            .addNode("step", (s: typeof State.State) => ({ n: s.n + 1 }))
            .addEdge(START, "step")
            .addConditionalEdges("step", (s: typeof State.State) => (s.n < steps ? "step" : END))
            .compile({ checkpointer: opened.saver });
          const t = performance.now();
          await graph.invoke({ blob: "x".repeat(10_240), n: 0 }, { configurable: { thread_id: "linear" }, durability: "sync", recursionLimit: steps + 10 });
          times.push((performance.now() - t) / steps);
          const b = await opened.bytes();
          bytes = b === undefined ? undefined : b / (steps + 2);
        } finally {
          await opened.close();
        }
      });
    }
    rows.push({ saver: c.name, msPerStep: median(times), bytesPerCheckpoint: bytes });
  }
  return rows;
}

// -------------------------------------------------------------------------------------------------
// accumulate: each step appends a 4 KB chapter to a list (a reducer)

export interface AccumulateRow {
  saver: string;
  bytesAtHalf: number | undefined;
  bytesAtEnd: number | undefined;
  finalStateBytes: number;
  firstMs: number;
  lastMs: number;
}

export async function accumulate(cases: SaverCase[], steps: number): Promise<AccumulateRow[]> {
  const State = Annotation.Root({ chapters: Annotation<string[]>({ reducer: (a, b) => a.concat(b), default: () => [] }), n: Annotation<number>() });
  const rows: AccumulateRow[] = [];
  for (const c of cases) {
    await withDir(async (dir) => {
      const opened = await c.open(dir);
      try {
        const stamps: number[] = [];
        let bytesAtHalf: number | undefined;
        const graph = new StateGraph(State)
          .addNode("write", async (s: typeof State.State) => {
            stamps.push(performance.now());
            // Measured as the step starts: the previous step's checkpoint is on disk (durability "sync").
            if (s.n === steps / 2) bytesAtHalf = await opened.bytes();
            return { chapters: [`chapter ${s.n} `.padEnd(4096, "abcdefghij")], n: s.n + 1 };
          })
          .addEdge(START, "write")
          .addConditionalEdges("write", (s: typeof State.State) => (s.n < steps ? "write" : END))
          .compile({ checkpointer: opened.saver });
        const t0 = performance.now();
        const final = await graph.invoke({ n: 0 }, { configurable: { thread_id: "accumulate" }, durability: "sync", recursionLimit: steps + 10 });
        stamps.push(performance.now());
        void t0;
        const gaps = stamps.slice(1).map((t, i) => t - stamps[i]!);
        const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
        rows.push({
          saver: c.name,
          bytesAtHalf,
          bytesAtEnd: await opened.bytes(),
          finalStateBytes: Buffer.byteLength(JSON.stringify(final)),
          firstMs: mean(gaps.slice(0, 20)),
          lastMs: mean(gaps.slice(-20)),
        });
      } finally {
        await opened.close();
      }
    });
  }
  return rows;
}

// -------------------------------------------------------------------------------------------------
// deep history: a thread of many checkpoints, read back by a fresh process's saver

export interface DeepRow {
  saver: string;
  depth: number;
  latestColdMs: number;
  latestWarmMs: number;
  list10Ms: number;
  walkBackMs: number;
}

export async function deepHistory(cases: SaverCase[], depths: number[], runs: number): Promise<DeepRow[]> {
  const State = Annotation.Root({ n: Annotation<number>() });
  const rows: DeepRow[] = [];
  for (const c of cases) {
    if (c.name === "no checkpointer") continue;
    // MemorySaver cannot be reopened: its reads are measured on the instance that wrote.
    const inMemory = c.name === "MemorySaver";
    for (const depth of depths) {
      await withDir(async (dir) => {
        const writer = await c.open(dir);
        const graph = new StateGraph(State)
          .addNode("step", (s: typeof State.State) => ({ n: s.n + 1 }))
          .addEdge(START, "step")
          .addConditionalEdges("step", (s: typeof State.State) => (s.n < depth - 2 ? "step" : END))
          .compile({ checkpointer: writer.saver });
        await graph.invoke({ n: 0 }, { configurable: { thread_id: "deep" }, durability: "sync", recursionLimit: depth + 10 });
        if (!inMemory) await writer.close();
        const cold: number[] = [];
        const warm: number[] = [];
        const list10: number[] = [];
        const walk: number[] = [];
        const back = Math.min(4000, Math.floor(depth * 0.8));
        for (let r = 0; r < runs; r += 1) {
          const reader = inMemory ? writer : await c.open(dir);
          try {
            const saver = reader.saver!;
            const config = { configurable: { thread_id: "deep", checkpoint_ns: "" } };
            let t = performance.now();
            await saver.getTuple(config);
            cold.push(performance.now() - t);
            t = performance.now();
            await saver.getTuple(config);
            warm.push(performance.now() - t);
            t = performance.now();
            for await (const _ of saver.list(config, { limit: 10 }));
            list10.push(performance.now() - t);
            t = performance.now();
            let seen = 0;
            for await (const _ of saver.list(config)) if ((seen += 1) >= back) break;
            walk.push(performance.now() - t);
          } finally {
            await reader.close();
          }
        }
        rows.push({ saver: c.name, depth, latestColdMs: median(cold), latestWarmMs: median(warm), list10Ms: median(list10), walkBackMs: median(walk) });
      });
    }
  }
  return rows;
}

/** Drop the Postgres schemas the bench made. */
export async function dropBenchSchemas(postgresUri: string): Promise<void> {
  const { default: pg } = await import("pg");
  const client = new pg.Client({ connectionString: postgresUri });
  await client.connect();
  try {
    const { rows } = await client.query<{ nspname: string }>("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'cairn_bench_%'");
    for (const { nspname } of rows) await client.query(`DROP SCHEMA "${nspname}" CASCADE`);
  } finally {
    await client.end();
  }
}
