import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { z } from "zod";
import { isCairnError, listThreads, loadGraph, openStore, resume, run, savedWork, stateAt, workflow } from "cairn";

const root = new URL("..", import.meta.url).pathname;
const joinGraph = join(root, "test/fixtures/join-graph.ts");

function cli(args: string[], env: Record<string, string> = {}) {
  const child = spawn(process.execPath, [join(root, "bin/cairn.js"), ...args], { env: { ...process.env, ...env }, cwd: root });
  let out = "";
  let err = "";
  child.stdout.on("data", (d) => (out += d));
  child.stderr.on("data", (d) => (err += d));
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; out: string; err: string }>((resolve) =>
    child.on("close", (code, signal) => resolve({ code, signal, out, err })),
  );
  return { child, done };
}

describe("graphs with parallel branches and a join edge", () => {
  it("a kill inside the joined node leaves the thread unfinished, and resume runs that node", async () => {
    const dir = await mkdtemp(join(tmpdir(), "cairn-join-"));
    const store = `file:${join(dir, "store")}`;
    const marker = join(dir, "marker");
    const { child, done } = cli(["run", joinGraph, "--thread", "j1", "--store", store], { JOIN_MARKER: marker, JOIN_SLEEP_MS: "20000" });
    const deadline = Date.now() + 30_000;
    while (!existsSync(marker) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    expect(existsSync(marker)).toBe(true);
    child.kill("SIGKILL");
    expect((await done).signal).toBe("SIGKILL");

    const threads = await cli(["threads", "--store", store, "--json"]).done;
    const [thread] = JSON.parse(threads.out) as { thread: string; status: string; next: string[] }[];
    expect(thread).toMatchObject({ thread: "j1", status: "interrupted" });
    expect(thread!.next).toContain("nc");

    const resumed = await cli(["resume", joinGraph, "--thread", "j1", "--store", store, "--json"], { JOIN_MARKER: marker }).done;
    expect(resumed.code).toBe(0);
    const state = JSON.parse(resumed.out) as { log: string[] };
    expect([...state.log].sort()).toEqual(["na", "nb", "nc"]);
    expect(await readFile(marker, "utf8")).toBe("nc started\nnc started\n");
  }, 90_000);

  it("restarts from, and inspects after, a node that ran in parallel with another", async () => {
    const dir = await mkdtemp(join(tmpdir(), "cairn-join-"));
    const store = await openStore(`file:${join(dir, "store")}`);
    try {
      const graph = await loadGraph(joinGraph);
      await run(graph, { thread: "j2", store });
      const after = await stateAt(store.saver, store.uri, "j2", { step: "nb" });
      expect([...(after.values.log as string[])].sort()).toEqual(["na", "nb"]);
      const again = await resume(graph, { thread: "j2", store, fromStep: "nb" });
      // Restarting the parallel superstep reruns na and nb together, then nc; nothing is doubled.
      expect([...(again.state.log as string[])].sort()).toEqual(["na", "nb", "nc"]);
      const [summary] = await listThreads(store.saver, ["j2"]);
      expect(summary?.status).toBe("completed");
    } finally {
      await store.close();
    }
  });
});

describe("input validation", () => {
  const wf = workflow("typo", { state: z.object({ topic: z.string().default("x"), count: z.number().default(1) }) }).step("go", async (s) => ({
    count: s.count + 1,
  }));

  it("refuses a misspelt field instead of dropping it, suggests the field, and creates no thread", async () => {
    const dir = await mkdtemp(join(tmpdir(), "cairn-typo-"));
    const store = await openStore(`file:${join(dir, "store")}`);
    try {
      const error = await run(wf, { input: { topc: "dragons" }, thread: "t", store }).catch((e: unknown) => e);
      expect(isCairnError(error, "INVALID_INPUT")).toBe(true);
      expect((error as Error).message).toContain('"topc" (did you mean "topic"?)');
      expect(await store.listThreadIds()).toEqual([]);
    } finally {
      await store.close();
    }
  });
});

describe("savedWork", () => {
  const failing = new Set<number>([3]);
  const wf = workflow("saved", { state: z.object({ xs: z.array(z.number()).default([0, 1, 2, 3, 4]), ys: z.array(z.number()).default([]) }) })
    .step("prepare", async () => ({}))
    .map("double", {
      over: (s) => s.xs,
      run: async (x) => {
        if (failing.has(x)) throw new Error(`item ${x} failed`);
        return x * 2;
      },
      into: "ys",
    });

  it("names the finished steps and, for an unfinished fan-out, the items already saved", async () => {
    const dir = await mkdtemp(join(tmpdir(), "cairn-saved-"));
    const store = await openStore(`file:${join(dir, "store")}`);
    try {
      const error = await run(wf, { thread: "s", store }).catch((e: unknown) => e);
      expect(isCairnError(error, "STEP_FAILED")).toBe(true);
      expect(await savedWork(store.saver, "s")).toEqual({ steps: ["prepare"], items: { double: [0, 1, 2, 4] } });
      failing.clear();
      await resume(wf, { thread: "s", store });
      expect(await savedWork(store.saver, "s")).toEqual({ steps: ["prepare", "double"], items: {} });
    } finally {
      await store.close();
    }
  });
});
