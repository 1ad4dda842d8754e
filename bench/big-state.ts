/**
 * Very large states: a workflow whose first step makes a big state and whose second step fails once;
 * run it to the failure, resume, and measure the time of each and the process's peak resident memory.
 *
 *     npx tsx bench/big-state.ts list 1000000 [store-uri]    a list of N small objects ({ i, tag })
 *     npx tsx bench/big-state.ts strings 200 [store-uri]     a list of N strings of 1 MiB each
 *     npx tsx bench/big-state.ts 100000                      the same as `list 100000`
 *
 * The store: `file` (the default) or `sqlite` for a new one in a temporary folder, or any store URI. One case per process, so the peak is that case's
 * (`process.resourceUsage().maxRSS`). `BENCH_ONLY=bigstate npm run bench` runs the standard cases, each
 * in its own child process, and writes their section of bench/RESULTS.md.
 */
import { execFile } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { promisify } from "node:util";
import { z } from "zod";
import { resume, run, workflow } from "../src/index.ts";

type Shape = "list" | "strings";

export interface BigStateResult {
  shape: Shape;
  count: number;
  store: string;
  /** Bytes of the big field as JSON. */
  jsonBytes: number;
  /** Resident memory with cairn loaded, before the state exists. */
  baseRss: number;
  peakRss: number;
  runMs: number;
  resumeMs: number;
}

const MIB = 2 ** 20;

function bigWorkflow(shape: Shape, count: number) {
  let fail = true;
  const stop = () => {
    if (fail) {
      fail = false;
      throw new Error("stopped after the big step");
    }
  };
  if (shape === "list") {
    return workflow("big-state", { state: z.object({ rows: z.array(z.object({ i: z.number(), tag: z.string() })).default([]), total: z.number().default(0) }) })
      .step("fill", () => ({ rows: Array.from({ length: count }, (_, i) => ({ i, tag: `row-${i}` })) }))
      .step("sum", (s) => (stop(), { total: s.rows.reduce((a, r) => a + r.i, 0) }), { retry: false });
  }
  return workflow("big-state", { state: z.object({ rows: z.array(z.string()).default([]), total: z.number().default(0) }) })
    .step("fill", () => ({ rows: Array.from({ length: count }, (_, i) => `${i} `.padEnd(MIB, String.fromCharCode(97 + (i % 26)))) }))
    .step("sum", (s) => (stop(), { total: s.rows.reduce((a, r) => a + r.length, 0) }), { retry: false });
}

/** JSON size of a list without building its text in one piece. */
function jsonSize(rows: unknown[]): number {
  let size = 2 + Math.max(0, rows.length - 1);
  for (const r of rows) size += Buffer.byteLength(JSON.stringify(r));
  return size;
}

export async function measure(shape: Shape, count: number, storeUri?: string): Promise<BigStateResult> {
  const dir = await mkdtemp(join(tmpdir(), "cairn-big-state-"));
  // "file" and "sqlite" mean a fresh store in a temporary folder; anything else is a store URI.
  const uri = !storeUri || storeUri === "file" ? `file:${dir}` : storeUri === "sqlite" ? `sqlite:${join(dir, "big.db")}` : storeUri;
  try {
    const wf = bigWorkflow(shape, count);
    const baseRss = process.memoryUsage.rss();
    let t = performance.now();
    await run(wf, { store: uri, thread: "big" }).then(
      () => Promise.reject(new Error("the run was meant to fail after the big step")),
      () => {},
    );
    const runMs = performance.now() - t;
    t = performance.now();
    const done = await resume(wf, { store: uri, thread: "big" });
    const resumeMs = performance.now() - t;
    const peakRss = process.resourceUsage().maxRSS * 1024;
    const rows = done.state.rows as unknown[];
    if (rows.length !== count) throw new Error(`resumed with ${rows.length} items, expected ${count}`);
    return { shape, count, store: uri.split(":")[0]!, jsonBytes: jsonSize(rows), baseRss, peakRss, runMs, resumeMs };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

const mib = (bytes: number) => `${(bytes / MIB).toFixed(0)} MiB`;
const secs = (ms: number) => `${(ms / 1000).toFixed(1)} s`;
const label = (r: BigStateResult) => (r.shape === "list" ? `${r.count.toLocaleString("en-US")} objects` : `${r.count} strings of 1 MiB`);

export function describe(r: BigStateResult): string {
  const factor = (r.peakRss - r.baseRss) / r.jsonBytes;
  return `${label(r)} (${mib(r.jsonBytes)} of JSON) on ${r.store}: run to the failure ${secs(r.runMs)}, resume ${secs(r.resumeMs)}, peak RSS ${mib(r.peakRss)} (${mib(r.baseRss)} before the state; ${factor.toFixed(1)} × the JSON above that)`;
}

/** The standard cases: a million small objects and 200 MiB of text on the file store, the million on SQLite. */
export const BIG_STATE_CASES: [store: string, shape: Shape, count: number][] = [
  ["file", "list", 100_000],
  ["file", "list", 1_000_000],
  ["file", "strings", 200],
  ["sqlite", "list", 1_000_000],
];

/** Each case in a fresh process (so the peak is its own): the section of bench/RESULTS.md. */
export async function bigStateSection(cases = BIG_STATE_CASES): Promise<string[]> {
  const script = fileURLToPath(import.meta.url);
  const results: BigStateResult[] = [];
  for (const [store, shape, count] of cases) {
    process.stderr.write(`big state: ${shape} ${count} on ${store}…\n`);
    const { stdout } = await promisify(execFile)(process.execPath, ["--import", "tsx", script, shape, String(count), store, "--json"], { maxBuffer: 1 << 20 });
    results.push(JSON.parse(stdout.trim().split("\n").pop()!) as BigStateResult);
  }
  const lines = ["## Very large states: a big list made by one step, a failure in the next, a resume", ""];
  lines.push(
    `Measured ${new Date().toISOString()} (\`BENCH_ONLY=bigstate npm run bench\`). One process per row; peak RSS is the process's ` +
      '(`maxRSS`), "before" is its resident memory with cairn loaded and no state yet. The last column is (peak − before) ÷ the JSON size of the big field.',
    "",
  );
  lines.push("| state | JSON | store | run to the failure | resume | peak RSS | before | (peak − before) ÷ JSON |", "|---|---|---|---|---|---|---|---|");
  for (const r of results) {
    lines.push(`| ${label(r)} | ${mib(r.jsonBytes)} | ${r.store} | ${secs(r.runMs)} | ${secs(r.resumeMs)} | ${mib(r.peakRss)} | ${mib(r.baseRss)} | ${((r.peakRss - r.baseRss) / r.jsonBytes).toFixed(1)} |`);
  }
  lines.push("");
  return lines;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const args = process.argv.slice(2).filter((a) => a !== "--json");
  const json = process.argv.includes("--json");
  const [first, second, third] = args;
  const shape: Shape = first === "strings" ? "strings" : "list";
  const count = Number((first === "list" || first === "strings" ? second : first) ?? (shape === "list" ? 1_000_000 : 200));
  const uri = first === "list" || first === "strings" ? third : second;
  const result = await measure(shape, count, uri);
  console.log(json ? JSON.stringify(result) : describe(result));
}
