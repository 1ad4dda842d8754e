/**
 * The pipeline features as a person at a terminal meets them, through the `cairn` binary
 * (test/helpers/cli.ts) on a file store: Ctrl+C and SIGTERM that drain, budgets, YAML input, artifacts,
 * and the money columns of the reading commands. The graph is test/fixtures/pipeline-graph.ts; its
 * execution log (PIPELINE_EXEC_LOG) tells which frames ran in which process.
 *
 * Each spawn loads tsx and the graph (a few seconds on a busy machine), so checks that need no terminal
 * read the store through the API instead.
 */
import { createHash } from "node:crypto";
import { readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { listThreads, openStore, readHistory, resume, run, savedWork, stateAt, type OpenedStore, type Usage } from "cairn";
import pipeline, { coverBytes, frameBytes } from "./fixtures/pipeline-graph.ts";
import { cairn, removeWorkdirs, spawnCairn, waitForOutput, workdir } from "./helpers/cli.ts";

const GRAPH = "test/fixtures/pipeline-graph.ts";

afterAll(removeWorkdirs);

const storeOf = (cwd: string) => `file:${join(cwd, "store")}`;
const lines = (text: string) => text.split("\n").filter((l) => l.length > 0);
const threadIdOf = (stderr: string) => /^thread (\S+) · store /m.exec(stderr)?.[1];
const sha256 = (bytes: Uint8Array) => createHash("sha256").update(bytes).digest("hex");
const range = (n: number) => Array.from({ length: n }, (_, i) => i);

/** Dollars as the CLI prints them: cents from $1 up, four decimals below. */
const dollars = (usd: number) => (usd >= 1 ? `$${usd.toFixed(2)}` : `$${usd.toFixed(4)}`);
const describeUsage = (u: Usage) => `${dollars(u.usd)} (${u.inputTokens} in + ${u.outputTokens} out tokens, ${u.calls} model call${u.calls === 1 ? "" : "s"})`;

/** The execution log: how many times each frame started and how many times it finished. */
async function executions(file: string): Promise<{ started: Record<string, number>; ended: Record<string, number> }> {
  const text = await readFile(file, "utf8").catch(() => "");
  const started: Record<string, number> = {};
  const ended: Record<string, number> = {};
  for (const line of lines(text)) {
    const [key, end] = line.split(" ");
    const into = end === "end" ? ended : started;
    into[key!] = (into[key!] ?? 0) + 1;
  }
  return { started, ended };
}

const frames = (counts: Record<string, number>) =>
  Object.keys(counts)
    .filter((k) => k.startsWith("render#"))
    .map((k) => Number(k.slice("render#".length)))
    .sort((a, b) => a - b);

async function withStore<T>(cwd: string, fn: (store: OpenedStore) => Promise<T>): Promise<T> {
  const store = await openStore(storeOf(cwd));
  try {
    return await fn(store);
  } finally {
    await store.close();
  }
}

/**
 * The state an uninterrupted run of the pipeline ends in, made through the API in a store of its own.
 * `delayMs` only paces the frames (nothing else depends on it), so the reference run does not wait.
 */
async function uninterrupted(input: { delayMs: number } & Record<string, unknown>): Promise<Record<string, unknown>> {
  const cwd = await workdir();
  const r = await run(pipeline, { input: { ...input, delayMs: 0 }, store: storeOf(cwd) });
  expect(r.status).toBe("completed");
  return { ...r.state, delayMs: input.delayMs };
}

// -------------------------------------------------------------------------------------------------

describe("Ctrl+C and SIGTERM drain the run", () => {
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    it(`${signal}: running frames finish and are saved, queued ones do not start, exit 130 with the resume command`, async () => {
      const cwd = await workdir();
      const log = join(cwd, "exec.log");
      const env = { PIPELINE_EXEC_LOG: log };
      const input = { frames: 12, delayMs: 300 };
      const { child, done } = spawnCairn(cwd, ["run", GRAPH, "--input", JSON.stringify(input), "--store", storeOf(cwd)], env);
      await waitForOutput(child, /frame \d+ saved[\s\S]*frame \d+ saved/);
      child.kill(signal);
      const stopped = await done;
      expect(stopped.code, stopped.stderr).toBe(130);
      const thread = threadIdOf(stopped.stderr)!;

      // Everything that started finished (a drain waits for it); the rest never started.
      const first = await executions(log);
      const ran = frames(first.started);
      expect(frames(first.ended)).toEqual(ran);
      expect(ran.length).toBeGreaterThanOrEqual(2);
      expect(ran.length).toBeLessThan(12);
      const saved = await withStore(cwd, (s) => savedWork(s.saver, thread));
      expect(saved).toEqual({ steps: ["plan"], items: { render: ran } });

      const err = lines(stopped.stderr);
      expect(err).toContain(`■ ${signal}: finishing the work in flight and saving it; nothing new starts. Press Ctrl+C again to exit at once.`);
      expect(stopped.stderr).toMatch(new RegExp(`^■ stopped before render \\(${12 - ran.length} items not started\\) after 1 step in `, "m"));
      const command = `cairn resume ${GRAPH} --thread ${thread} --store ${storeOf(cwd)}`;
      expect(err).toContain(`  Continue with: ${command}`);

      if (signal === "SIGTERM") return;
      // The exact command it printed: only the frames that never started run.
      const resumed = await cairn(cwd, command.split(" ").slice(1), env);
      expect(resumed.code, resumed.stderr).toBe(0);
      expect(lines(resumed.stderr)).toContain(`  · render: ${ran.length} of 12 items already saved; running the other ${12 - ran.length}`);
      const all = await executions(log);
      expect(all.started).toEqual({ plan: 1, assemble: 1, ...Object.fromEntries(range(12).map((i) => [`render#${i}`, 1])) });
      const state = await withStore(cwd, (s) => stateAt(s.saver, s.uri, thread));
      expect(state.values).toEqual(await uninterrupted(input));
    }, 60_000);
  }

  it("a second SIGINT exits at once, losing only the frames in flight; a resume completes with the right state", async () => {
    const cwd = await workdir();
    const log = join(cwd, "exec.log");
    const input = { frames: 4, delayMs: 2_000 };
    const thread = "twice";
    const { child, done } = spawnCairn(cwd, ["run", GRAPH, "--input", JSON.stringify(input), "--thread", thread, "--store", storeOf(cwd)], { PIPELINE_EXEC_LOG: log });
    // Frames 0 and 1 are saved; 2 and 3 have started and need two more seconds.
    await waitForOutput(child, /rendering frame 3/);
    await vi.waitFor(async () => expect(await withStore(cwd, (s) => savedWork(s.saver, thread))).toEqual({ steps: ["plan"], items: { render: [0, 1] } }), {
      timeout: 1_500,
      interval: 50,
    });
    child.kill("SIGINT");
    await new Promise((r) => setTimeout(r, 100));
    child.kill("SIGINT");
    const stopped = await done;
    expect(stopped.code, stopped.stderr).toBe(130);
    expect(stopped.stderr).toContain(
      "■ SIGINT again: exiting now. Work saved so far is kept; work in flight (and finished items held for a batch) will rerun on resume.",
    );
    // At once: frames 2 and 3 had two seconds left and never ended.
    const first = await executions(log);
    expect(frames(first.started)).toEqual([0, 1, 2, 3]);
    expect(frames(first.ended)).toEqual([0, 1]);

    const expected = await uninterrupted(input);
    // The resume runs in this process; the graph logs its executions to the same file.
    const previous = process.env.PIPELINE_EXEC_LOG;
    process.env.PIPELINE_EXEC_LOG = log;
    try {
      const r = await resume(pipeline, { thread, store: storeOf(cwd) });
      expect(r.status).toBe("completed");
      expect(r.state).toEqual(expected);
    } finally {
      if (previous === undefined) delete process.env.PIPELINE_EXEC_LOG;
      else process.env.PIPELINE_EXEC_LOG = previous;
    }
    const all = await executions(log);
    expect(all.started).toEqual({ plan: 1, "render#0": 1, "render#1": 1, "render#2": 2, "render#3": 2, assemble: 1 });
  }, 60_000);
});

describe("--budget-usd", () => {
  it("stops at the budget with exit 3, names the spend and a resume command with a higher budget that completes", async () => {
    const cwd = await workdir();
    const store = storeOf(cwd);
    const input = { frames: 8, delayMs: 50 };
    const r = await cairn(cwd, ["run", GRAPH, "--input", JSON.stringify(input), "--store", store, "--budget-usd", "0.6"]);
    expect(r.code, r.stderr).toBe(3);
    const thread = threadIdOf(r.stderr)!;

    const { spent, items } = await withStore(cwd, async (s) => {
      const [summary] = await listThreads(s.saver, [thread]);
      return { spent: summary!.spent, items: (await savedWork(s.saver, thread)).items.render ?? [] };
    });
    // The run stopped only once the budget was reached, and the spend is the plan plus the saved frames.
    expect(spent.usd).toBeGreaterThanOrEqual(0.6);
    expect(items.length).toBeLessThan(8);
    expect(spent.calls).toBe(1 + items.length);

    const err = lines(r.stderr);
    expect(r.stderr).toMatch(/^■ budget of \$0\.6000 reached \(spent \$0\.\d{4}\): stopping at the next step boundary$/m);
    expect(err).toContain(`  spent: ${describeUsage(spent)} in all; ${dollars(spent.usd)} by this run.`);
    const higher = (2 * Math.max(spent.usd, 0.6)).toFixed(2);
    const command = `cairn resume ${GRAPH} --thread ${thread} --store ${store} --budget-usd ${higher}`;
    expect(err).toContain(`  The budget of $0.6000 is reached. Continue with a higher one: ${command}`);

    const resumed = await cairn(cwd, command.split(" ").slice(1));
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(resumed.stderr).toMatch(/^completed thread /m);
    const state = await withStore(cwd, (s) => stateAt(s.saver, s.uri, thread));
    expect(state.values).toEqual(await uninterrupted(input));
    expect(state.spent.usd).toBeCloseTo(spent.usd + (8 - items.length) * 0.125, 12);
  }, 60_000);

  it("refuses a budget that is not an amount with exit 2, writing nothing", async () => {
    const cwd = await workdir();
    const r = await cairn(cwd, ["run", GRAPH, "--store", storeOf(cwd), "--budget-usd", "abc"]);
    expect(r.code, r.stderr).toBe(2);
    expect(lines(r.stderr)).toHaveLength(1);
    expect(r.stderr).toMatch(/^cairn: --budget-usd "abc" is not an amount of dollars\. .*--budget-usd 2\.50$/m);
    expect(await readdir(join(cwd, "store")).catch(() => [])).toEqual([]);
  }, 30_000);
});

describe("--input @file.yaml", () => {
  it("reads the input from a YAML file", async () => {
    const cwd = await workdir();
    await writeFile(join(cwd, "input.yaml"), "# two quick frames\ntitle: frames from yaml\nframes: 2\ndelayMs: 1\n");
    const r = await cairn(cwd, ["run", GRAPH, "--input", "@input.yaml", "--store", storeOf(cwd), "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const state = JSON.parse(r.stdout) as { title: string; frames: number; rendered: { image: { sha256: string } }[] };
    expect(state).toEqual(await uninterrupted({ title: "frames from yaml", frames: 2, delayMs: 1 }));
    expect(state.rendered.map((f) => f.image.sha256)).toEqual([0, 1].map((i) => sha256(frameBytes("frames from yaml", i))));
  }, 30_000);

  it("refuses invalid YAML with exit 2, naming the file, writing nothing", async () => {
    const cwd = await workdir();
    await writeFile(join(cwd, "bad.yaml"), "title: [unclosed\nframes: 2\n");
    const r = await cairn(cwd, ["run", GRAPH, "--input", "@bad.yaml", "--store", storeOf(cwd)]);
    expect(r.code, r.stderr).toBe(2);
    const err = lines(r.stderr);
    expect(err[0]).toMatch(/^cairn: Input file "bad\.yaml" is not valid YAML: /);
    expect(r.stderr).not.toMatch(/^ {4}at /m);
    expect(await readdir(join(cwd, "store")).catch(() => [])).toEqual([]);
  }, 30_000);
});

describe("reading a finished thread", () => {
  const THREAD = "frames-1";
  const TITLE = "a harbour in fog";
  let cwd: string;
  let total: Usage;
  let planUsage: Usage;
  beforeAll(async () => {
    cwd = await workdir();
    const r = await run(pipeline, { input: { title: TITLE, frames: 3, delayMs: 1 }, thread: THREAD, store: storeOf(cwd) });
    expect(r.status).toBe("completed");
    total = r.usage.thread;
    planUsage = await withStore(cwd, async (s) => (await readHistory(s.saver, THREAD)).find((h) => h.step === "plan")!.usage!);
  }, 30_000);

  const expected = () => {
    const bytes = [...range(3).map((i) => frameBytes(TITLE, i))];
    const cover = coverBytes(bytes);
    return [
      ...bytes.map((b, i) => ({ field: `rendered[${i}].image`, name: `frame-${i}.png`, bytes: b })),
      { field: "cover", name: "cover.png", bytes: cover },
    ];
  };

  it("cairn artifacts lists every reference and --out writes the files with their bytes", async () => {
    const out = join(cwd, "exported");
    const r = await cairn(cwd, ["artifacts", THREAD, "--store", storeOf(cwd), "--out", out]);
    expect(r.code, r.stderr).toBe(0);
    const rows = lines(r.stdout).map((l) => l.split(/ {2,}/));
    const size = (n: number) => (n < 1024 ? `${n} B` : `${(n / 1024).toFixed(1)} KB`);
    expect(rows).toEqual([
      ["FIELD", "NAME", "TYPE", "SIZE", "SHA256", "WHERE"],
      ...expected().map((a) => {
        const hash = sha256(a.bytes);
        return [a.field, a.name, "image/png", size(a.bytes.byteLength), hash.slice(0, 12), join(cwd, "store", "artifacts", hash.slice(0, 2), `${hash}.png`)];
      }),
      ["4 references, 4 distinct artifacts."],
    ]);
    expect(lines(r.stderr)).toEqual([`wrote 4 files to ${out}`]);
    expect((await readdir(out)).sort()).toEqual(["cover.png", "frame-0.png", "frame-1.png", "frame-2.png"]);
    for (const a of expected()) expect(Buffer.from(await readFile(join(out, a.name))).equals(Buffer.from(a.bytes))).toBe(true);
  }, 30_000);

  it("cairn inspect describes artifacts instead of printing bytes, and says what was spent", async () => {
    const r = await cairn(cwd, ["inspect", THREAD, "--store", storeOf(cwd)]);
    expect(r.code, r.stderr).toBe(0);
    const cover = expected()[3]!.bytes;
    expect(r.stdout).toMatch(new RegExp(`^\\s+cover\\s+artifact cover\\.png \\(image/png, ${cover.byteLength} B, sha256:${sha256(cover).slice(0, 12)}\\)$`, "m"));
    expect(lines(r.stdout)).toContain(`spent so far: ${describeUsage(total)}`);
    expect(r.stdout).not.toContain("FRAME-MARKER");
    expect(r.stdout).not.toContain("iVBORw0KGgo");
  }, 30_000);

  it("cairn threads shows the money and tokens spent", async () => {
    const r = await cairn(cwd, ["threads", "--store", storeOf(cwd)]);
    expect(r.code, r.stderr).toBe(0);
    const [header, row, ...rest] = lines(r.stdout).map((l) => l.split(/ {2,}/));
    expect(header).toEqual(["THREAD", "STATUS", "LAST STEP", "CHECKPOINTS", "SIZE", "SPENT", "TOKENS", "UPDATED"]);
    expect(row![4]).toMatch(/^\d+\.\d KB$/);
    expect([...row!.slice(0, 4), ...row!.slice(5, 7)]).toEqual([THREAD, "completed", "assemble", "6", dollars(total.usd), String(total.inputTokens + total.outputTokens)]);
    expect(rest).toEqual([]);
  }, 30_000);

  it("cairn history shows each step's cost and the running total", async () => {
    const r = await cairn(cwd, ["history", THREAD, "--store", storeOf(cwd)]);
    expect(r.code, r.stderr).toBe(0);
    const rows = lines(r.stdout).map((l) => l.split(/ {2,}/));
    expect(rows[0]).toEqual(["#", "CHECKPOINT", "STEP", "TIME", "DURATION", "TASKS", "COST", "TOKENS", "TOTAL", "SOURCE"]);
    const plan = rows.find((c) => c[2] === "plan")!;
    expect(plan.slice(5)).toEqual(["1", dollars(planUsage.usd), String(planUsage.inputTokens + planUsage.outputTokens), dollars(planUsage.usd), "loop"]);
    const items = rows.find((c) => c[2] === "render" && c[5] === "3")!;
    expect(items.slice(5)).toEqual(["3", "$0.3750", "0", dollars(total.usd), "loop"]);
    expect(lines(r.stdout).at(-1)).toBe(`status: completed · spent ${describeUsage(total)}`);
  }, 30_000);
});
