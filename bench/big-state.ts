/**
 * A state with one big list: run a workflow that fills it, stop after it, resume, and print the time and
 * the peak resident memory. `npx tsx bench/big-state.ts [items] [store-uri]` (default 1000000 items,
 * a temporary file store).
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { z } from "zod";
import { resume, run, workflow } from "../src/index.ts";
import { findUnstorableField } from "../src/store/values.ts";

const count = Number(process.argv[2] ?? 1_000_000);
const dir = await mkdtemp(join(tmpdir(), "cairn-big-state-"));
const uri = process.argv[3] ?? `file:${dir}`;
let peak = 0;
const sample = setInterval(() => (peak = Math.max(peak, process.memoryUsage.rss())), 20);
let fail = true;
const wf = workflow("big-state", { state: z.object({ rows: z.array(z.object({ i: z.number(), tag: z.string() })).default([]), total: z.number().default(0) }) })
  .step("fill", () => ({ rows: Array.from({ length: count }, (_, i) => ({ i, tag: `row-${i}` })) }))
  .step(
    "sum",
    (s) => {
      if (fail) {
        fail = false;
        throw new Error("stopped after the big step");
      }
      return { total: s.rows.reduce((a, r) => a + r.i, 0) };
    },
    { retry: false },
  );
try {
  const rows = Array.from({ length: count }, (_, i) => ({ i, tag: `row-${i}` }));
  let t = performance.now();
  findUnstorableField({ rows });
  const check = performance.now() - t;
  t = performance.now();
  await run(wf, { store: uri, thread: "big" }).catch(() => {});
  const first = performance.now() - t;
  t = performance.now();
  const done = await resume(wf, { store: uri, thread: "big" });
  const second = performance.now() - t;
  peak = Math.max(peak, process.memoryUsage.rss());
  console.log(
    `${count} items on ${uri.split(":")[0]}: value check ${check.toFixed(0)} ms, run to the failure ${(first / 1000).toFixed(1)} s, resume ${(second / 1000).toFixed(1)} s, ` +
      `peak RSS ${(peak / 2 ** 20).toFixed(0)} MiB, total ${done.state.total}`,
  );
} finally {
  clearInterval(sample);
  await rm(dir, { recursive: true, force: true });
}
