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
import { accumulate, deepHistory, dropBenchSchemas, linear, saverCases } from "./stores.ts";
import { bigStateSection } from "./big-state.ts";

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
  const only = process.env.BENCH_ONLY;
  const reachable = await postgresReachable();
  const lines: string[] = [];
  lines.push("# Benchmark results", "");
  lines.push(`Written by \`npm run bench\` on ${new Date().toISOString()} · Node ${process.version} · ${cpus().length} × ${cpus()[0]?.model ?? "cpu"} · medians of ${RUNS} runs.`, "");
  if (only === undefined || only === "stores") lines.push(...(await storesSection(reachable ? POSTGRES : undefined)));
  if (only === undefined || only === "fanout") lines.push(...(await fanoutSection(reachable)));
  if (only === undefined || only === "bigstate") lines.push(...(await bigStateSection()));
  const out = fileURLToPath(new URL("RESULTS.md", import.meta.url));
  await writeFile(out, `${lines.join("\n")}\n`);
  process.stdout.write(`${lines.join("\n")}\n\nwritten to ${out}\n`);
}

const ms = (x: number) => (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));
const kib = (x: number | undefined) => (x === undefined ? "—" : x >= 1024 * 1024 ? `${(x / 1024 / 1024).toFixed(1)} MiB` : `${(x / 1024).toFixed(1)} KiB`);

async function storesSection(postgres: string | undefined): Promise<string[]> {
  const cases = saverCases(postgres);
  const steps = Number(process.env.BENCH_STEPS ?? 200);
  const depths = (process.env.BENCH_DEPTHS ?? "50,5000").split(",").map(Number);
  const lines: string[] = [];
  try {
    process.stderr.write(`linear: ${steps} steps…\n`);
    const lin = await linear(cases, steps, RUNS);
    const floor = lin.find((r) => r.saver === "no checkpointer")!.msPerStep;
    lines.push(`## linear: ${steps} trivial steps over ~10 KB of state that does not change (plain LangGraph graph, durability "sync")`, "");
    lines.push("| saver | ms per step | × no checkpointer | bytes per checkpoint |", "|---|---|---|---|");
    for (const r of lin) lines.push(`| ${r.saver} | ${ms(r.msPerStep)} | ${(r.msPerStep / floor).toFixed(2)} | ${kib(r.bytesPerCheckpoint)} |`);
    lines.push("");

    process.stderr.write(`accumulate: ${steps} steps…\n`);
    const acc = await accumulate(cases, steps);
    lines.push(`## accumulate: ${steps} steps, each appending a 4 KB chapter to a list (a reducer)`, "");
    lines.push(`| saver | bytes after ${steps / 2} steps | after ${steps} | growth | × final state | ms per step, first 20 | last 20 | last / first |`, "|---|---|---|---|---|---|---|---|");
    for (const r of acc) {
      const growth = r.bytesAtHalf && r.bytesAtEnd ? (r.bytesAtEnd / r.bytesAtHalf).toFixed(2) : "—";
      const ratio = r.bytesAtEnd ? (r.bytesAtEnd / r.finalStateBytes).toFixed(1) : "—";
      lines.push(`| ${r.saver} | ${kib(r.bytesAtHalf)} | ${kib(r.bytesAtEnd)} | ${growth} | ${ratio} | ${ms(r.firstMs)} | ${ms(r.lastMs)} | ${(r.lastMs / r.firstMs).toFixed(2)} |`);
    }
    lines.push("", "Bytes: the store's files on disk (the SQLite database with its WAL; the file store's folder); MemorySaver: the serialized checkpoints it holds. Postgres: not measured.", "");

    process.stderr.write(`deep history: depths ${depths.join(", ")}…\n`);
    const deep = await deepHistory(cases, depths, RUNS);
    lines.push("## deep history: a thread of many checkpoints, read by a saver opened afresh", "");
    lines.push("| saver | checkpoints | latest, first read | latest, again | list 10 | walk back 80 % (at most 4,000) |", "|---|---|---|---|---|---|");
    for (const r of deep) lines.push(`| ${r.saver} | ${r.depth} | ${ms(r.latestColdMs)} ms | ${ms(r.latestWarmMs)} ms | ${ms(r.list10Ms)} ms | ${ms(r.walkBackMs)} ms |`);
    lines.push("", "MemorySaver cannot be reopened: its reads are on the instance that wrote the thread.", "");
  } finally {
    if (postgres) await dropBenchSchemas(postgres).catch(() => {});
  }
  return lines;
}

async function fanoutSection(postgresReachable: boolean): Promise<string[]> {
  const stores = [...STORES];
  if (postgresReachable) stores.push({ name: "postgres", open: () => openStore(`${POSTGRES}${POSTGRES.includes("?") ? "&" : "?"}schema=cairn_bench`) });
  const n = Number(process.env.BENCH_FANOUT_ITEMS ?? 2000);
  process.stderr.write(`fan-out of ${n} items, ${RUNS} runs per cell…\n`);
  const fan = await benchFanout(stores, n);
  const plainNone = await benchPlainFanout(n);
  const plainMemory = await benchPlainFanout(n, new MemorySaver());
  const lines: string[] = [];
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
  return lines;
}

await main();
