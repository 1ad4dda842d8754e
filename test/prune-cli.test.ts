/**
 * `cairn prune`, `cairn rm` and the SIZE column of `cairn threads` as a person at a terminal meets them,
 * through the `cairn` binary (test/helpers/cli.ts): what they print, their exit codes, that a refused or
 * dry-run command writes nothing, that a thread another process is running is left alone, and that a
 * pruned thread resumes (also after a kill in the middle of a run that prunes itself as it goes).
 *
 * Threads that several tests only read are made once through the API (a spawn costs a second or more).
 */
import { readdir, readFile, stat } from "node:fs/promises";
import { join, relative } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { openStore, readHistory, run } from "cairn";
import moralVideo from "../graphs/moral-video.ts";
import retained from "./fixtures/retention-graph.ts";
import type { ChildProcess } from "node:child_process";
import { cairn, removeWorkdirs, spawnCairn, waitForOutput, workdir } from "./helpers/cli.ts";
import { dropSchema, postgresUri, requirePostgresInCI, uniqueSchema } from "./helpers/postgres.ts";

const postgres = await requirePostgresInCI();
const cleanups: (() => Promise<unknown>)[] = [];
afterAll(async () => {
  await removeWorkdirs();
  for (const cleanup of cleanups.splice(0)) await cleanup().catch(() => {});
});

const GRAPH = "graphs/moral-video.ts";
const escape = (text: string) => text.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
const lines = (text: string) => text.split("\n").filter((l) => l.length > 0);

/** Every file of a store with its size and modification time: equal before and after means nothing was written. */
async function storeFiles(root: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    for (const e of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
      const path = join(dir, e.name);
      if (e.isDirectory()) await walk(path);
      else {
        const s = await stat(path);
        out.push(`${relative(root, path)} ${s.size} ${s.mtimeMs}`);
      }
    }
  };
  await walk(root);
  return out.sort();
}

/** Resolves once the child's stderr has printed `text` `n` times. */
function waitForCount(child: ChildProcess, text: string, n: number, timeoutMs = 60_000): Promise<void> {
  return new Promise((resolve, reject) => {
    let seen = "";
    const timer = setTimeout(() => reject(new Error(`"${text}" not printed ${n} times within ${timeoutMs} ms; saw:\n${seen}`)), timeoutMs);
    const onData = (d: Buffer) => {
      seen += d;
      if (seen.split(text).length - 1 >= n) {
        clearTimeout(timer);
        child.stderr!.off("data", onData);
        resolve();
      }
    };
    child.stderr!.on("data", onData);
  });
}

async function historyLength(uri: string, thread: string): Promise<number> {
  const store = await openStore(uri);
  try {
    return (await readHistory(store.saver, thread)).length;
  } finally {
    await store.close();
  }
}

describe("cairn prune and cairn rm on a file store", () => {
  let cwd: string;
  let storeDir: string;
  let uri: string;
  const cli = (args: string[], env?: Record<string, string>) => cairn(cwd, [...args, "--store", uri], env);

  beforeAll(async () => {
    cwd = await workdir();
    storeDir = join(cwd, "store");
    uri = `file:${storeDir}`;
    const store = await openStore(uri);
    try {
      await run(moralVideo, { store, thread: "video-ok" });
      await run(moralVideo, { store, thread: "video-fail", input: { failOnceAt: "character_designer" } }).catch(() => {});
    } finally {
      await store.close();
    }
  });

  it("refuses a prune with no filter, and one whose filters match nothing, writing nothing", async () => {
    const before = await storeFiles(storeDir);
    const none = await cli(["prune"]);
    expect(none.code).toBe(2);
    expect(none.stderr.trim()).toBe(
      "cairn: Say what to prune: --keep-last <n> (keep the n newest checkpoints of each thread) and/or --older-than <age> (remove checkpoints older than 30d, 12h, …; add --threads to remove whole threads that old). " +
        "Narrow it with --status completed|failed|interrupted and --thread <id>; --dry-run shows what would go.",
    );
    const nothing = await cli(["prune", "--keep-last", "50"]);
    expect(nothing.code).toBe(2);
    expect(nothing.stdout).toBe("");
    expect(nothing.stderr.trim()).toBe(
      "cairn: nothing to prune: no checkpoint of the 2 matching threads is covered by --keep-last 50 (every thread keeps its newest checkpoint). Nothing was removed.",
    );
    const noThread = await cli(["prune", "--keep-last", "1", "--status", "interrupted"]);
    expect(noThread.code).toBe(2);
    expect(noThread.stderr).toContain(`cairn: nothing to prune: no thread of ${uri} matches --keep-last 1 --status interrupted. Nothing was removed.`);
    // (The library's own refusals, e.g. --threads without --older-than, are tested through the API.)
    for (const [args, message] of [
      [["prune", "--older-than", "3 weeks"], '--older-than "3 weeks" is not an age'],
      [["prune", "--keep-last", "two"], '--keep-last "two" is not a whole number'],
      [["prune", "--keep-last", "1", "--thread", "nope"], 'No thread "nope"'],
    ] as const) {
      const r = await cli([...args]);
      expect(r.code, args.join(" ")).toBe(2);
      expect(r.stderr).toContain(message);
    }
    expect(await storeFiles(storeDir)).toEqual(before);
  }, 60_000);

  it("--dry-run says what would go and writes nothing", async () => {
    const before = await storeFiles(storeDir);
    const r = await cli(["prune", "--keep-last", "2", "--dry-run"]);
    expect(r.code, r.stderr).toBe(0);
    const out = lines(r.stdout);
    expect(out[0]).toMatch(/^THREAD +STATUS +CHECKPOINTS +TO REMOVE +KEPT +TO FREE$/);
    expect(out).toContainEqual(expect.stringMatching(/^video-ok +completed +9 +7 +2 +\d+\.\d KB$/));
    expect(out).toContainEqual(expect.stringMatching(/^video-fail +failed +6 +4 +2 +\d+\.\d KB$/));
    expect(out.at(-1)).toMatch(/^would free \d+\.\d KB in all \(dry run: nothing was removed\)$/);
    expect(await storeFiles(storeDir)).toEqual(before);
  }, 30_000);

  it("prunes a failed thread, which then resumes without redoing finished work; threads shows the size shrink", async () => {
    const sizeOf = async () => {
      const r = await cli(["threads", "--json"]);
      expect(r.code, r.stderr).toBe(0);
      return (JSON.parse(r.stdout) as { thread: string; bytes: number }[]).find((t) => t.thread === "video-fail")!.bytes;
    };
    const store = await openStore(uri);
    const before = await store.threadBytes("video-fail").finally(() => store.close());
    const r = await cli(["prune", "--keep-last", "1", "--status", "failed"]);
    expect(r.code, r.stderr).toBe(0);
    const out = lines(r.stdout);
    expect(out[0]).toMatch(/^THREAD +STATUS +CHECKPOINTS +REMOVED +KEPT +FREED$/);
    expect(out[1]).toMatch(/^video-fail +failed +6 +5 +1 +\d+\.\d KB$/);
    expect(out[2]).toMatch(/^removed 5 checkpoints from 1 thread; freed \d+\.\d KB$/);
    expect(out[3]).toBe("artifacts: removed 0 that no checkpoint refers to; kept 0 referenced");
    expect(out).toHaveLength(5);
    expect(await historyLength(uri, "video-ok")).toBe(9);
    const after = await sizeOf();
    expect(after).toBeLessThan(before);

    const table = await cli(["threads"]);
    expect(lines(table.stdout)[0]).toMatch(/^THREAD +STATUS +LAST STEP +CHECKPOINTS +SIZE +SPENT +TOKENS +UPDATED$/);
    expect(table.stdout).toMatch(/^video-fail +failed +script_segmenter +1 +\d+\.\d KB +\$/m);

    const history = await cli(["history", "video-fail"]);
    expect(lines(history.stdout).at(-2)).toBe("(older checkpoints were pruned)");

    const resumed = await cli(["resume", GRAPH, "--thread", "video-fail"]);
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(resumed.stderr).toContain("already done: context_analyzer, web_researcher, story_generator, script_segmenter");
    expect(resumed.stderr).toContain("character_designer: 5 of 6 items already saved; running the other 1");
    expect(resumed.stderr).toMatch(/completed thread video-fail: 2 steps run/);
  }, 60_000);

  it("rm asks for --yes off a terminal, names an unknown thread, and removes a thread", async () => {
    const refused = await cli(["rm", "video-ok"]);
    expect(refused.code).toBe(2);
    expect(refused.stderr.trim()).toMatch(
      new RegExp(`^cairn: cairn rm removes thread video-ok \\(9 checkpoints, \\d+\\.\\d KB\\) from ${escape(uri)} for good; confirm with --yes: cairn rm video-ok --yes --store ${escape(uri)}$`),
    );
    const unknown = await cli(["rm", "nope", "--yes"]);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr.trim()).toBe(`cairn: No thread "nope" in store ${uri}. List the threads with: cairn threads --store ${uri}`);
    expect(await historyLength(uri, "video-ok")).toBe(9);

    const removed = await cli(["rm", "video-ok", "--yes"]);
    expect(removed.code, removed.stderr).toBe(0);
    const out = lines(removed.stdout);
    expect(out[0]).toMatch(/^removed thread video-ok: 9 checkpoints, \d+\.\d KB$/);
    expect(out[1]).toBe("artifacts: removed 0 that no checkpoint refers to; kept 0 referenced");
    expect(out[2]).toMatch(/^freed \d+\.\d KB in all$/);
    expect(await readdir(join(storeDir, "threads"))).toEqual(["video-fail"]);
  }, 60_000);
});

for (const kind of ["file", "sqlite", "postgres"] as const) {
  describe.skipIf(kind === "postgres" && !postgres.ok)(`a thread another process is running (${kind} store)`, () => {
    it("is refused by rm and skipped by prune", async () => {
      const cwd = await workdir();
      const schema = uniqueSchema("cairn_busy");
      const uri = kind === "file" ? `file:${join(cwd, "store")}` : kind === "sqlite" ? `sqlite:${join(cwd, "cairn.db")}` : postgresUri(schema);
      if (kind === "postgres") cleanups.push(() => dropSchema(schema));
      const { child, done } = spawnCairn(cwd, ["run", "test/fixtures/pipeline-graph.ts", "--thread", "busy", "--store", uri, "--input", '{"frames":4,"delayMs":60000}']);
      try {
        await waitForOutput(child, /rendering frame/);
        const rm = await cairn(cwd, ["rm", "busy", "--yes", "--store", uri]);
        expect(rm.code, rm.stderr).toBe(1);
        expect(rm.stderr).toMatch(kind === "file" ? /Thread "busy" is being written by pid \d+ on / : /Thread "busy" is being run by pid \d+ on /);
        const pruned = await cairn(cwd, ["prune", "--keep-last", "1", "--store", uri]);
        expect(pruned.code).toBe(2);
        expect(pruned.stderr).toMatch(/^cairn: skipped thread busy: being written by pid \d+ on \S+\.$/m);
        const one = await cairn(cwd, ["prune", "--keep-last", "1", "--thread", "busy", "--store", uri]);
        expect(one.code).toBe(1);
        expect(one.stderr).toContain('Thread "busy" is being');
      } finally {
        child.kill("SIGKILL");
        await done;
      }
      expect(await historyLength(uri, "busy")).toBeGreaterThan(1);
      // Its process is gone: the thread can be pruned now.
      const after = await cairn(cwd, ["prune", "--keep-last", "1", "--store", uri]);
      expect(after.code, after.stderr).toBe(0);
      expect(await historyLength(uri, "busy")).toBe(1);
    }, 90_000);
  });
}

describe("a workflow with retention, killed mid-run", () => {
  it("holds at most keepLast + slack checkpoints and resumes without redoing finished rounds", async () => {
    const cwd = await workdir();
    const uri = `file:${join(cwd, "store")}`;
    const log = join(cwd, "exec.log");
    const input = { rounds: 30, delayMs: 40 };
    const reference = await run(retained, { store: `file:${join(cwd, "reference")}`, input: { ...input, delayMs: 0 } });

    const { child, done } = spawnCairn(cwd, ["run", "test/fixtures/retention-graph.ts", "--thread", "loop", "--store", uri, "--input", JSON.stringify(input)], {
      RETENTION_EXEC_LOG: log,
    });
    // Past the first prune (at 12 checkpoints), in the middle of the loop.
    await waitForCount(child, "✓ write", 16);
    child.kill("SIGKILL");
    await done;
    const killedAt = lines(await readFile(log, "utf8")).length;
    expect(killedAt).toBeGreaterThanOrEqual(16);
    expect(killedAt).toBeLessThan(30);
    expect(await historyLength(uri, "loop")).toBeLessThanOrEqual(12);

    const resumed = await cairn(cwd, ["resume", "test/fixtures/retention-graph.ts", "--thread", "loop", "--store", uri, "--json"], { RETENTION_EXEC_LOG: log });
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(JSON.parse(resumed.stdout)).toEqual({ ...reference.state, delayMs: input.delayMs });
    // Each round ran once, except the one in flight at the kill, which ran again.
    const starts = lines(await readFile(log, "utf8"));
    const counts = new Map<string, number>();
    for (const s of starts) counts.set(s, (counts.get(s) ?? 0) + 1);
    const again = [...counts].filter(([, n]) => n > 1).map(([s]) => s);
    expect(again.length).toBeLessThanOrEqual(1);
    if (again.length) expect(again).toEqual([starts[killedAt - 1]]);
    expect(counts.size).toBe(30);
    expect(await historyLength(uri, "loop")).toBe(2);
  }, 90_000);
});
