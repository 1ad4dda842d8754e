/**
 * `npm run bench`: measures cairn on this machine and writes bench/RESULTS.md. Absolute times drift on
 * shared machines, so every table pairs them with a ratio measured in the same run. Each cell is the
 * median of several runs. Postgres rows appear when a server is reachable (CAIRN_TEST_POSTGRES_URI, else
 * 127.0.0.1:5432/test).
 */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Annotation, MemorySaver, Send, START, StateGraph, type BaseCheckpointSaver } from "@langchain/langgraph";
import { z } from "zod";
import { openStore, run, resume, workflow, type OpenedStore } from "../src/index.ts";

const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const POSTGRES = process.env.CAIRN_TEST_POSTGRES_URI ?? "postgres://postgres@127.0.0.1:5432/test";

interface StoreCase {
  name: string;
  open: (dir: string) => Promise<OpenedStore>;
}

const STORES: StoreCase[] = [
  { name: "file", open: (dir) => openStore(`file:${join(dir, "store")}`) },
  { name: "sqlite (FULL)", open: (dir) => openStore(`sqlite:${join(dir, "cairn.db")}`) },
];

async function postgresReachable(): Promise<boolean> {
  try {
    const store = await openStore(`${POSTGRES}${POSTGRES.includes("?") ? "&" : "?"}schema=cairn_bench`);
    await store.close();
    return true;
  } catch {
    return false;
  }
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

// -------------------------------------------------------------------------------------------------
// Fan-out: one step of N cheap items, as a dataset generator runs it.

const FanState = z.object({ n: z.number(), failAt: z.number().default(-1), results: z.array(z.number()).default([]) });
const failedOnce = new Set<string>();

function fanout(saveEvery: number, concurrency?: number) {
  return workflow("bench-fanout", { state: FanState })
    .step("items", () => ({}))
    .map("work", {
      over: (s) => Array.from({ length: s.n }, (_, i) => ({ i, failAt: s.failAt })),
      run: (item, ctx) => {
        const key = `${ctx.thread}:${item.i}`;
        if (item.i === item.failAt && !failedOnce.has(key)) {
          failedOnce.add(key);
          throw new Error("bench: fails once");
        }
        return item.i * 2;
      },
      into: "results",
      saveEvery,
      concurrency,
      retry: false,
    });
}

interface FanRow {
  store: string;
  saveEvery: number;
  runMs: number;
  resumeMs: number;
  itemsRerun: number;
}

async function benchFanout(stores: StoreCase[], n: number): Promise<FanRow[]> {
  const rows: FanRow[] = [];
  for (const store of stores) {
    for (const saveEvery of [1, 100]) {
      const wf = fanout(saveEvery);
      const runTimes: number[] = [];
      const resumeTimes: number[] = [];
      let rerun = 0;
      for (let r = 0; r < RUNS; r += 1) {
        const dir = await mkdtemp(join(tmpdir(), "cairn-bench-"));
        const opened = await store.open(dir);
        try {
          const thread = `fan-${saveEvery}-${r}-${Date.now()}`;
          let t = performance.now();
          await run(wf, { input: { n }, thread, store: opened });
          runTimes.push(performance.now() - t);
          // One item fails once; the resume must rerun only that item.
          const failing = `${thread}-fail`;
          await run(wf, { input: { n, failAt: Math.floor(n / 2) }, thread: failing, store: opened }).catch(() => {});
          t = performance.now();
          const resumed = await resume(wf, { thread: failing, store: opened });
          resumeTimes.push(performance.now() - t);
          rerun = resumed.tasksRun;
        } finally {
          await opened.close();
          await rm(dir, { recursive: true, force: true });
        }
      }
      rows.push({ store: store.name, saveEvery, runMs: median(runTimes), resumeMs: median(resumeTimes), itemsRerun: rerun });
    }
  }
  return rows;
}

/**
 * The same fan-out in plain LangGraph: the floor cairn's numbers are read against. LangGraph's runner
 * races every running task of a superstep on each completion, so its own time grows faster than the
 * item count.
 */
async function benchPlainFanout(n: number, checkpointer?: BaseCheckpointSaver): Promise<number> {
  const State = Annotation.Root({ results: Annotation<number[]>({ reducer: (a, b) => a.concat(b), default: () => [] }) });
  const graph = new StateGraph(State)
    .addNode("work", async (item: { i: number }) => ({ results: [item.i * 2] }))
    .addConditionalEdges(START, () => Array.from({ length: n }, (_, i) => new Send("work", { i })))
    .compile({ checkpointer });
  const times: number[] = [];
  for (let r = 0; r < RUNS; r += 1) {
    const t = performance.now();
    await graph.invoke({}, { configurable: { thread_id: `plain-${r}-${Date.now()}` }, durability: "sync" });
    times.push(performance.now() - t);
  }
  return median(times);
}

// -------------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const stores = [...STORES];
  if (await postgresReachable()) stores.push({ name: "postgres", open: () => openStore(`${POSTGRES}${POSTGRES.includes("?") ? "&" : "?"}schema=cairn_bench`) });
  const n = Number(process.env.BENCH_FANOUT_ITEMS ?? 2000);
  process.stderr.write(`fan-out of ${n} items, ${RUNS} runs per cell…\n`);
  const fan = await benchFanout(stores, n);
  const plainNone = await benchPlainFanout(n);
  const plainMemory = await benchPlainFanout(n, new MemorySaver());

  const lines: string[] = [];
  lines.push("# Benchmark results", "");
  lines.push(`Written by \`npm run bench\` on ${new Date().toISOString()} · Node ${process.version} · ${cpus().length} × ${cpus()[0]?.model ?? "cpu"} · medians of ${RUNS} runs.`, "");
  lines.push(`## Fan-out: one step of ${n} trivial items (a cairn workflow, \`run\`)`, "");
  lines.push("`saveEvery 1` saves every item as it finishes; `saveEvery 100` saves them in batches of 100 (a hard crash loses the finished items not yet written: see `MapOptions.saveEvery`). The resume column: one item failed once, the resume reruns it and gathers the step.", "");
  lines.push(`Floor: the same fan-out as a plain LangGraph \`StateGraph\` with \`Send\`: ${(plainNone / 1000).toFixed(2)} s with no checkpointer, ${(plainMemory / 1000).toFixed(2)} s with \`MemorySaver\`. "× floor" divides by the no-checkpointer time.`, "");
  lines.push("| store | saveEvery | run | × floor | per item | resume after one failed item | tasks the resume ran |", "|---|---|---|---|---|---|---|");
  for (const r of fan) {
    lines.push(
      `| ${r.store} | ${r.saveEvery} | ${(r.runMs / 1000).toFixed(2)} s | ${(r.runMs / plainNone).toFixed(2)} | ${((r.runMs / n) * 1000).toFixed(0)} µs | ${r.resumeMs.toFixed(0)} ms | ${r.itemsRerun} |`,
    );
  }
  lines.push("", "\"Tasks the resume ran\" counts the failed item and the gather step that folds the results into the state.", "");
  const out = fileURLToPath(new URL("RESULTS.md", import.meta.url));
  await writeFile(out, `${lines.join("\n")}\n`);
  process.stdout.write(`${lines.join("\n")}\n\nwritten to ${out}\n`);
}

await main();
